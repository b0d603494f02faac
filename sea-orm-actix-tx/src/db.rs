//! The pools: the primary's, connected with retries at start-up, and the read replica's,
//! connected lazily; migrations; the `SELECT 1` ping of `/health/ready` and `app ping`; and the
//! pool's numbers for the health check and metrics.

use std::time::{Duration, Instant};

use config::DatabaseSettings;

use crate::availability::Availability;
#[cfg(feature = "mysql")]
use sea_orm::Statement;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};

/// Start-up failures of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbSetupError {
    #[error("could not connect to the database {url} after {attempts} attempt(s): {reason}")]
    /// No connection after every attempt.
    Connect {
        /// The URL, without its password.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last attempt's error.
        reason: String,
    },
    #[error("{found} is older than the oldest version supported, {needed} (docs/requirements.md)")]
    /// The server is older than the oldest supported version.
    UnsupportedVersion {
        /// The server and version found.
        found: String,
        /// The oldest version supported.
        needed: &'static str,
    },
    #[error("cannot read the server's version: {0}")]
    /// The server's version could not be read.
    Version(String),
}

/// The oldest PostgreSQL every feature works on: 13, for `pg_current_xact_id()` and
/// `pg_xact_status(xid8)`, which resolve a `COMMIT` whose reply was lost.
pub const MIN_POSTGRES: (u32, u32) = (13, 0);
/// The oldest MariaDB supported: 10.6, the first with atomic DDL (a migration interrupted by a
/// crash leaves no half-made table). CI tests 10.11.
pub const MIN_MARIADB: (u32, u32) = (10, 6);

/// Connects, trying `DB_CONNECT_RETRIES` times `DB_CONNECT_RETRY_DELAY_MS` apart, each attempt
/// bounded by `DB_CONNECT_TIMEOUT`, then refuses a server that is too old
/// ([`check_server_version`]). Logs one line per failed attempt. The URL in messages never
/// carries the password.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbSetupError> {
    let attempts = settings.connect_retries.max(1);
    let mut reason = String::new();
    // PostgreSQL: connections opened before a primary lost are not handed out again.
    let failover = crate::failover::Failover::new(settings.failover_retry);
    for attempt in 1..=attempts {
        let connecting = settings.connect(false, Some(failover.evict_hook()));
        match tokio::time::timeout(settings.connect_timeout, connecting).await {
            Ok(Ok(db)) => {
                tracing::info!(url = %settings.url, attempt, "connected to the database");
                #[cfg(feature = "postgres")]
                if db.get_database_backend() == DbBackend::Postgres {
                    crate::failover::register(db.get_postgres_connection_pool(), &failover);
                }
                check_server_version(&db).await?;
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
    match replica.connect(true, None).await {
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

/// Refuses a server older than [`MIN_POSTGRES`] or [`MIN_MARIADB`]. PostgreSQL's version comes
/// from the `server_version` it reports at login (no round trip); MariaDB's from `SELECT
/// VERSION()`. MySQL itself is let through with a warning: only MariaDB is tested.
pub async fn check_server_version(db: &DatabaseConnection) -> Result<(), DbSetupError> {
    let version = match db.get_database_backend() {
        #[cfg(feature = "postgres")]
        DbBackend::Postgres => {
            let conn = db
                .get_postgres_connection_pool()
                .acquire()
                .await
                .map_err(|e| DbSetupError::Version(e.to_string()))?;
            match conn.server_version_num() {
                Some(num) => ServerVersion::Postgres(num / 10000, num / 100 % 100),
                None => return Ok(()),
            }
        }
        #[cfg(feature = "mysql")]
        DbBackend::MySql => {
            let row = db
                .query_one_raw(Statement::from_string(DbBackend::MySql, "SELECT VERSION()"))
                .await
                .map_err(|e| DbSetupError::Version(e.to_string()))?;
            let text: String = row
                .ok_or_else(|| DbSetupError::Version("SELECT VERSION() returned no row".into()))?
                .try_get_by_index(0)
                .map_err(|e| DbSetupError::Version(e.to_string()))?;
            ServerVersion::parse_mysql(&text)
        }
        _ => return Ok(()),
    };
    if let ServerVersion::Mysql(..) = version {
        tracing::warn!(version = %version, "MySQL is not tested: MariaDB is the supported server of this protocol");
    }
    version.supported()
}

/// A server's version, as far as the minimum versions need it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(all(feature = "postgres", feature = "mysql")), allow(dead_code))]
enum ServerVersion {
    Postgres(u32, u32),
    Mariadb(u32, u32),
    Mysql(u32, u32),
}

impl ServerVersion {
    /// `10.11.6-MariaDB-0+deb12u1`, `5.5.5-10.11.6-MariaDB` (the prefix older clients need) or
    /// MySQL's `8.0.36`.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    fn parse_mysql(text: &str) -> ServerVersion {
        let mariadb = text.contains("MariaDB");
        let text = text.strip_prefix("5.5.5-").unwrap_or(text);
        let mut numbers = text
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        let major = numbers.next().unwrap_or(0);
        let minor = numbers.next().unwrap_or(0);
        if mariadb {
            ServerVersion::Mariadb(major, minor)
        } else {
            ServerVersion::Mysql(major, minor)
        }
    }

    fn supported(&self) -> Result<(), DbSetupError> {
        let (found, needed, label) = match *self {
            ServerVersion::Postgres(major, minor) => {
                ((major, minor), MIN_POSTGRES, "PostgreSQL 13")
            }
            ServerVersion::Mariadb(major, minor) => ((major, minor), MIN_MARIADB, "MariaDB 10.6"),
            ServerVersion::Mysql(..) => return Ok(()),
        };
        if found >= needed {
            Ok(())
        } else {
            Err(DbSetupError::UnsupportedVersion {
                found: self.to_string(),
                needed: label,
            })
        }
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // PostgreSQL 10 and later number their releases major.minor.
            ServerVersion::Postgres(major, minor) => write!(f, "PostgreSQL {major}.{minor}"),
            ServerVersion::Mariadb(major, minor) => write!(f, "MariaDB {major}.{minor}"),
            ServerVersion::Mysql(major, minor) => write!(f, "MySQL {major}.{minor}"),
        }
    }
}

/// What `/health/ready` and `/metrics` report about the pool.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolStats {
    /// Connections open now.
    pub size: u32,
    /// Connections open and idle.
    pub idle: u32,
    /// Connections checked out.
    pub in_use: u32,
    /// Connections kept open (`DB_POOL_SIZE`; 0 in serverless mode).
    pub min: u32,
    /// `DB_POOL_SIZE + DB_MAX_OVERFLOW`.
    pub max: u32,
}

/// The pool's numbers now, with its configured bounds `min` and `max`.
pub fn pool_stats(db: &DatabaseConnection, min: u32, max: u32) -> PoolStats {
    let (size, idle) = match db.get_database_backend() {
        #[cfg(feature = "postgres")]
        DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        #[cfg(feature = "mysql")]
        DbBackend::MySql => {
            let pool = db.get_mysql_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        #[cfg(feature = "sqlite")]
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

/// Runs `sql`; on PostgreSQL also `pg_is_in_recovery()` in the same message. Whether the
/// database takes writes.
async fn writable(db: &DatabaseConnection, sql: &str) -> Result<bool, sea_orm::DbErr> {
    match db.get_database_backend() {
        #[cfg(feature = "postgres")]
        DbBackend::Postgres => {
            use sea_orm::sqlx::{self, Row as _};
            use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};
            let sql = format!("{sql}; SELECT pg_is_in_recovery()::text");
            let pool = db.get_postgres_connection_pool();
            let rows =
                crate::transaction::side_conn::SideConn::fetch_all(pool, sqlx::AssertSqlSafe(sql))
                    .await
                    .map_err(|e| match e {
                        sqlx::Error::PoolTimedOut => {
                            DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)
                        }
                        e => DbErr::Conn(RuntimeErr::SqlxError(std::sync::Arc::new(e))),
                    })?;
            let in_recovery = rows
                .last()
                .and_then(|row| row.try_get::<Option<String>, _>(0).ok().flatten());
            Ok(in_recovery.as_deref() != Some("true"))
        }
        _ => db.execute_unprepared(sql).await.map(|_| true),
    }
}

/// `postgres`, `mysql` (MariaDB) or `sqlite`: the backend of `db`, for health and logs.
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
///
/// On PostgreSQL the same simple-query message also asks `pg_is_in_recovery()` (one round trip
/// either way): a server that answers but is a standby (a demoted primary, or a URL that names
/// a replica) is no writable primary, and the ping fails. Its connection is closed, not handed
/// back, when `within` passes (`transaction/side_conn.rs`).
pub async fn ping(
    db: &DatabaseConnection,
    sql: &str,
    availability: Option<&Availability>,
    within: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let select = writable(db, sql);
    let answer = match availability {
        Some(availability) => tokio::time::timeout(within, availability.guard(select)).await,
        None => tokio::time::timeout(within, select).await,
    };
    match answer {
        Ok(Ok(true)) => Ok(started.elapsed()),
        Ok(Ok(false)) => {
            Err("the database is a standby in recovery (read-only): no writable primary".to_owned())
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_and_mysql_version_strings_are_read() {
        let cases = [
            ("10.11.19-MariaDB-0+deb12u1", ServerVersion::Mariadb(10, 11)),
            ("5.5.5-10.6.18-MariaDB", ServerVersion::Mariadb(10, 6)),
            ("11.4.2-MariaDB-ubu2404", ServerVersion::Mariadb(11, 4)),
            ("8.0.36", ServerVersion::Mysql(8, 0)),
        ];
        for (text, version) in cases {
            assert_eq!(ServerVersion::parse_mysql(text), version, "{text}");
        }
    }

    #[test]
    fn servers_older_than_the_minimum_are_refused_naming_both_versions() {
        for old in [
            ServerVersion::Postgres(12, 19),
            ServerVersion::Postgres(9, 6),
            ServerVersion::Mariadb(10, 5),
            ServerVersion::Mariadb(5, 5),
        ] {
            let error = old.supported().expect_err("too old").to_string();
            assert!(error.contains(&old.to_string()), "{error}");
            assert!(
                error.contains("PostgreSQL 13") || error.contains("MariaDB 10.6"),
                "{error}"
            );
        }
        for new in [
            ServerVersion::Postgres(13, 0),
            ServerVersion::Postgres(17, 2),
            ServerVersion::Mariadb(10, 6),
            ServerVersion::Mariadb(11, 4),
            ServerVersion::Mysql(8, 0),
        ] {
            assert!(new.supported().is_ok(), "{new}");
        }
    }
}
