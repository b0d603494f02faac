//! The pools: the primary's, connected with retries at start-up, and the read replica's,
//! connected lazily; migrations; the `SELECT 1` ping of `/health/ready` and `app ping`; and the
//! pool's numbers for the health check and metrics.

use std::time::{Duration, Instant};

use config::DatabaseSettings;

use crate::availability::Availability;
use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};

/// Start-up failures of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbSetupError {
    #[error("could not connect to the database {url} after {attempts} attempt(s): {reason}")]
    Connect {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error("migration failed: {0}")]
    Migrate(DbErr),
}

/// Connects, trying `DB_CONNECT_RETRIES` times `DB_CONNECT_RETRY_DELAY_MS` apart, each attempt
/// bounded by `DB_CONNECT_TIMEOUT`. Logs one line per failed attempt. The URL in messages never
/// carries the password.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbSetupError> {
    let attempts = settings.connect_retries.max(1);
    let mut reason = String::new();
    for attempt in 1..=attempts {
        let options = settings.connect_options();
        match tokio::time::timeout(settings.connect_timeout, Database::connect(options)).await {
            Ok(Ok(db)) => {
                tracing::info!(url = %settings.url, attempt, "connected to the database");
                return Ok(db);
            }
            Ok(Err(e)) => {
                reason = e.to_string();
                if reason.contains("unsupported startup parameter") {
                    // PgBouncer refusing the startup `options` that carry the session settings.
                    reason.push_str(
                        " (a transaction-mode pooler such as PgBouncer: set DB_POOLER=transaction)",
                    );
                }
            }
            Err(_) => {
                reason = format!(
                    "no connection within {}s",
                    settings.connect_timeout.as_secs()
                )
            }
        }
        tracing::warn!(url = %settings.url, attempt, of = attempts, reason = %reason, "database connection failed");
        if attempt < attempts {
            tokio::time::sleep(settings.connect_retry_delay).await;
        }
    }
    Err(DbSetupError::Connect {
        url: settings.url.to_string(),
        attempts,
        reason,
    })
}

/// The replica's pool (`DATABASE_REPLICA_URL`, same pool settings), connected lazily: a replica
/// that is down at start-up is not an outage, reads go to the primary until it answers.
/// `None` when no replica is configured.
pub async fn connect_replica(
    settings: &DatabaseSettings,
) -> Result<Option<DatabaseConnection>, DbSetupError> {
    let Some(replica) = settings.for_replica() else {
        return Ok(None);
    };
    let mut options = replica.connect_options();
    options.connect_lazy(true);
    match Database::connect(options).await {
        Ok(db) => {
            tracing::info!(url = %replica.url, "read replica configured");
            Ok(Some(db))
        }
        Err(e) => Err(DbSetupError::Connect {
            url: replica.url.to_string(),
            attempts: 1,
            reason: e.to_string(),
        }),
    }
}

/// Applies every pending migration.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbSetupError> {
    Migrator::up(db, None).await.map_err(DbSetupError::Migrate)
}

/// What `/health/ready` and `/metrics` report about the pool.
#[derive(Clone, Copy, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PoolStats {
    /// Connections open now.
    pub size: u32,
    pub idle: u32,
    pub in_use: u32,
    /// Connections kept open (`DB_POOL_SIZE`; 0 in serverless mode).
    pub min: u32,
    /// `DB_POOL_SIZE + DB_MAX_OVERFLOW`.
    pub max: u32,
}

pub fn pool_stats(db: &DatabaseConnection, min: u32, max: u32) -> PoolStats {
    let (size, idle) = match db.get_database_backend() {
        DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        DbBackend::MySql => {
            let pool = db.get_mysql_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        DbBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        _ => (0, 0),
    };
    let idle = idle.min(size);
    PoolStats {
        size,
        idle,
        in_use: size - idle,
        min,
        max,
    }
}

pub fn backend_name(db: &DatabaseConnection) -> &'static str {
    match db.get_database_backend() {
        DbBackend::Postgres => "postgres",
        DbBackend::MySql => "mysql",
        DbBackend::Sqlite => "sqlite",
        _ => "other",
    }
}

/// `SELECT 1` through the pool (`sql` is [`Session::ping_sql`](crate::transaction::Session),
/// wrapped in a transaction behind a pooler), bounded by `within`; returns the round trip's
/// latency. With `availability`, a database known to be down answers at once and a checkout
/// gives up as soon as a probe finds it unreachable.
pub async fn ping(
    db: &DatabaseConnection,
    sql: &str,
    availability: Option<&Availability>,
    within: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let select = db.execute_unprepared(sql);
    let answer = match availability {
        Some(availability) => tokio::time::timeout(within, availability.guard(select)).await,
        None => tokio::time::timeout(within, select).await,
    };
    match answer {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(crate::transaction::DbFailure::classify(&e)
            .kind
            .describe()
            .to_owned()),
        Err(_) => Err(format!(
            "no answer within {} ms (database down or pool exhausted)",
            within.as_millis()
        )),
    }
}
