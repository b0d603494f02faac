//! The small enums the settings use, and `DatabaseSettings`' rules: its pool bounds, its replica
//! and the checks that tie variables together (a URL parameter kept when its variable is unset,
//! `DB_STATEMENT_CACHE` deferring to `DB_POOLER`, the per-backend checks). Turning the settings
//! into the driver's pool lives in `connect.rs`.

use strum::{Display, EnumString};

use crate::error::ConfigError;
use crate::variables::{self as var, DatabaseSettings, Env};

/// The most connections a pool may open (`DB_POOL_SIZE + DB_MAX_OVERFLOW`).
pub const MAX_CONNECTIONS: u32 = 10_000;

/// The most connections an SQLite pool opens, whatever the pool settings say: SQLite has one
/// writer at a time, and more readers than this only add lock contention.
pub const SQLITE_MAX_CONNECTIONS: u32 = 4;

/// Which driver a URL is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display)]
#[strum(serialize_all = "lowercase")]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// MySQL's protocol: MariaDB is what is supported and tested (versions: docs/requirements.md).
    Mysql,
    /// SQLite.
    Sqlite,
}

/// `DB_POOL_MODE`: how the pool keeps connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display, EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum PoolMode {
    /// Keep `DB_POOL_SIZE` connections open; requests queue for one when all are busy.
    Queue,
    /// Keep no idle connection: each is closed when released (for short-lived runtimes whose
    /// connections would otherwise outlive them on the server).
    Serverless,
}

/// `DB_POOLER`: what stands between the service and PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display, EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum Pooler {
    /// A direct connection (or a session-mode pooler): session state may be relied on.
    None,
    /// A transaction-mode pooler (PgBouncer `pool_mode = transaction`, RDS Proxy, Supavisor,
    /// Neon's pooler): consecutive transactions of one client connection may run on different
    /// server connections, so nothing may rely on session state.
    Transaction,
}

/// `DB_ISOLATION_LEVEL`: the isolation level of every transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display, EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum IsolationLevel {
    /// `read committed`.
    ReadCommitted,
    /// `repeatable read`.
    RepeatableRead,
    /// `serializable`.
    Serializable,
}

impl IsolationLevel {
    /// The SQL spelling, as in `SET TRANSACTION ISOLATION LEVEL repeatable read` or Postgres's
    /// `default_transaction_isolation`.
    pub fn as_sql(&self) -> String {
        self.to_sea_orm().to_string().to_lowercase()
    }

    /// The same level as SeaORM names it, for `begin_with_config`.
    pub fn to_sea_orm(self) -> sea_orm::IsolationLevel {
        match self {
            IsolationLevel::ReadCommitted => sea_orm::IsolationLevel::ReadCommitted,
            IsolationLevel::RepeatableRead => sea_orm::IsolationLevel::RepeatableRead,
            IsolationLevel::Serializable => sea_orm::IsolationLevel::Serializable,
        }
    }
}

/// `DB_SSL_MODE`: whether and how the connection uses TLS (libpq's `sslmode`, without `allow`;
/// MySQL's `ssl-mode` spellings `disabled`, `preferred`, `required`, `verify_identity` are
/// accepted as their twins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display, EnumString)]
pub enum SslMode {
    /// Never TLS.
    #[strum(to_string = "disable", serialize = "disabled")]
    Disable,
    /// TLS when the server offers it.
    #[strum(to_string = "prefer", serialize = "preferred")]
    Prefer,
    /// Always TLS, the certificate not checked.
    #[strum(to_string = "require", serialize = "required")]
    Require,
    /// Always TLS, the certificate signed by a trusted CA.
    #[strum(to_string = "verify-ca", serialize = "verify_ca")]
    VerifyCa,
    /// As `VerifyCa`, and the host name matches the certificate.
    #[strum(
        to_string = "verify-full",
        serialize = "verify_full",
        serialize = "verify_identity"
    )]
    VerifyFull,
}

/// `LOG_FORMAT`: how log lines are written (the log filter itself is `RUST_LOG`, read by the
/// subscriber).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display, EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl DatabaseSettings {
    /// The driver, from the URL.
    pub fn backend(&self) -> Backend {
        self.url.backend()
    }

    /// Connections the pool keeps open: `pool_size` (0 in serverless mode), never more than
    /// [`DatabaseSettings::max_connections`].
    pub fn min_connections(&self) -> u32 {
        match self.pool_mode {
            PoolMode::Serverless => 0,
            PoolMode::Queue => self.pool_size.min(self.max_connections()),
        }
    }

    /// The most connections the pool opens: `pool_size + max_overflow`. For SQLite at most
    /// [`SQLITE_MAX_CONNECTIONS`], and exactly 1 for an in-memory database (connections to it
    /// share one cache whose table locks are not covered by the busy timeout).
    pub fn max_connections(&self) -> u32 {
        let configured = self.pool_size.saturating_add(self.max_overflow).max(1);
        match self.backend() {
            Backend::Postgres | Backend::Mysql => configured,
            Backend::Sqlite if self.url.in_memory => 1,
            Backend::Sqlite => configured.min(SQLITE_MAX_CONNECTIONS),
        }
    }

    /// The same settings pointed at `DATABASE_REPLICA_URL`, for the replica's pool; `None` when
    /// no replica is configured.
    pub fn for_replica(&self) -> Option<DatabaseSettings> {
        let mut replica = self.clone();
        replica.url = replica.replica_url.take()?;
        replica.auto_migrate = false;
        Some(replica)
    }

    /// The rules that tie variables together, after each was read on its own: the first one
    /// broken is the error, naming the variable to change.
    pub(crate) fn checked(mut self, env: &Env) -> Result<Self, ConfigError> {
        let (size, overflow, cache) = (self.pool_size, self.max_overflow, self.statement_cache);
        let pooled = self.pooler == Pooler::Transaction;
        let invalid = |variable, value: &dyn ToString, why: &str| {
            let (value, why) = (Some(value.to_string()), why.to_owned());
            Err(ConfigError::Invalid(variable, value, why))
        };
        if size + overflow > MAX_CONNECTIONS {
            let why = format!(
                "DB_POOL_SIZE + DB_MAX_OVERFLOW = {} exceeds {MAX_CONNECTIONS} connections; \
                 expected a whole number from 0 to {}",
                size + overflow,
                MAX_CONNECTIONS - size
            );
            return invalid("DB_MAX_OVERFLOW", &overflow, &why);
        }
        if pooled && env.given(&var::DB_STATEMENT_CACHE).is_some() && cache != 0 {
            return invalid("DB_STATEMENT_CACHE", &cache, CACHE_BEHIND_A_POOLER);
        }
        if pooled && self.backend() != Backend::Postgres {
            return invalid("DB_POOLER", &"transaction", POOLER_NEEDS_POSTGRES);
        }
        if pooled && self.auto_migrate {
            return invalid("DB_AUTO_MIGRATE", &true, NO_MIGRATIONS_BEHIND_A_POOLER);
        }
        if let Some(replica) = &self.replica_url
            && (replica.backend() != Backend::Postgres || self.backend() != Backend::Postgres)
        {
            return invalid("DATABASE_REPLICA_URL", replica, REPLICA_NEEDS_POSTGRES);
        }
        if pooled {
            self.statement_cache = 0;
        }
        Ok(self)
    }
}

/// Behind a transaction-mode pooler no statement is prepared by name (it would outlive its
/// transaction on a server connection other clients get next).
const CACHE_BEHIND_A_POOLER: &str = "must be 0 (or unset) with DB_POOLER=transaction: a named \
    prepared statement outlives its transaction and collides on the pooler's shared server connections";
const POOLER_NEEDS_POSTGRES: &str =
    "a transaction-mode pooler needs a PostgreSQL DATABASE_URL (set DB_POOLER=none)";
const NO_MIGRATIONS_BEHIND_A_POOLER: &str = "migrations cannot run through a transaction-mode \
    pooler (DB_POOLER=transaction); set DB_AUTO_MIGRATE=false and migrate with the direct database URL";
const REPLICA_NEEDS_POSTGRES: &str =
    "a read replica needs PostgreSQL URLs for both the primary and the replica";

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::test_support::{Vars, error, settings};

    const SECONDS_ERR: &str = "expected a whole number from 1 to 86400";

    #[test]
    fn an_empty_environment_gives_the_documented_defaults() {
        let db = settings(&[]).database;
        assert_eq!(
            db.url.to_string(),
            crate::test_support::DEFAULTS.database_url
        );
        assert_eq!(db.backend(), Backend::Sqlite);
        assert_eq!(db.pool_size, 10);
        assert_eq!(db.max_overflow, 20);
        assert_eq!(db.pool_timeout, Duration::from_secs(30));
        assert_eq!(db.pool_recycle, Duration::from_secs(3600));
        assert!(db.pool_pre_ping);
        assert_eq!(db.idle_timeout, Duration::from_secs(600));
        assert_eq!(db.connect_timeout, Duration::from_secs(10));
        assert_eq!(db.pool_mode, PoolMode::Queue);
        assert_eq!(db.isolation_level, IsolationLevel::RepeatableRead);
        assert_eq!(db.application_name, "inventory-api");
        assert_eq!(db.statement_timeout, None);
        assert!(!db.jit);
        assert_eq!(db.statement_cache, 100);
        assert_eq!(db.ssl_mode, SslMode::Prefer);
        assert_eq!(db.ssl_root_cert, None);
        assert!(!db.echo);
        assert_eq!(db.slow_statement, Duration::from_millis(1000));
        assert_eq!(db.connect_retries, 5);
        assert_eq!(db.connect_retry_delay, Duration::from_millis(2000));
        assert!(db.auto_migrate);
        assert_eq!(db.tx_max_retries, 3);
    }

    #[test]
    fn every_database_variable_is_read() {
        let db = settings(&[
            ("DATABASE_URL", "postgresql+asyncpg://app:pw@db:6543/inv"),
            ("DB_POOL_SIZE", "3"),
            ("DB_MAX_OVERFLOW", "4"),
            ("DB_POOL_TIMEOUT", "5"),
            ("DB_POOL_RECYCLE", "6"),
            ("DB_POOL_PRE_PING", "off"),
            ("DB_IDLE_TIMEOUT", "7"),
            ("DB_CONNECT_TIMEOUT", "8"),
            ("DB_POOL_MODE", "Serverless"),
            ("DB_ISOLATION_LEVEL", "SERIALIZABLE"),
            ("DB_APPLICATION_NAME", "inventory worker"),
            ("DB_STATEMENT_TIMEOUT_MS", "2500"),
            ("DB_JIT", "yes"),
            ("DB_STATEMENT_CACHE", "0"),
            ("DB_SSL_MODE", "verify_full"),
            ("DB_SSL_ROOT_CERT", "/etc/ssl/ca.pem"),
            ("DB_ECHO", "1"),
            ("DB_SLOW_STATEMENT_MS", "250"),
            ("DB_CONNECT_RETRIES", "1"),
            ("DB_CONNECT_RETRY_DELAY_MS", "0"),
            ("DB_AUTO_MIGRATE", "TRUE"),
            ("DB_TX_MAX_RETRIES", "0"),
        ])
        .database;
        assert_eq!(db.url.to_string(), "postgres://app:***@db:6543/inv");
        assert_eq!(db.url.password().as_deref(), Some("pw"));
        assert_eq!(db.backend(), Backend::Postgres);
        assert_eq!((db.pool_size, db.max_overflow), (3, 4));
        assert_eq!(db.pool_timeout, Duration::from_secs(5));
        assert_eq!(db.pool_recycle, Duration::from_secs(6));
        assert!(!db.pool_pre_ping);
        assert_eq!(db.idle_timeout, Duration::from_secs(7));
        assert_eq!(db.connect_timeout, Duration::from_secs(8));
        assert_eq!(db.pool_mode, PoolMode::Serverless);
        assert_eq!(db.isolation_level, IsolationLevel::Serializable);
        assert_eq!(db.application_name, "inventory worker");
        assert_eq!(db.statement_timeout, Some(Duration::from_millis(2500)));
        assert!(db.jit);
        assert_eq!(db.statement_cache, 0);
        assert_eq!(db.ssl_mode, SslMode::VerifyFull);
        assert_eq!(db.ssl_root_cert, Some(PathBuf::from("/etc/ssl/ca.pem")));
        assert!(db.echo);
        assert_eq!(db.slow_statement, Duration::from_millis(250));
        assert_eq!(db.connect_retries, 1);
        assert_eq!(db.connect_retry_delay, Duration::ZERO);
        assert!(db.auto_migrate);
        assert_eq!(db.tx_max_retries, 0);
    }

    #[test]
    fn each_bad_value_is_named_shown_and_explained() {
        let long_name = "x".repeat(64);
        let cases: &[(Vars, &str, &str)] = &[
            (
                &[("DB_POOL_SIZE", "abc")],
                "from 1 to 10000",
                "not a number",
            ),
            (
                &[("DB_POOL_SIZE", "0")],
                "from 1 to 10000",
                "a pool needs a connection",
            ),
            (&[("DB_POOL_SIZE", "absurd")], "from 1 to 10000", "a word"),
            (
                &[("DB_POOL_SIZE", "10001")],
                "from 1 to 10000",
                "absurdly large",
            ),
            (&[("DB_MAX_OVERFLOW", "-1")], "from 0 to 9999", "negative"),
            (
                &[("DB_MAX_OVERFLOW", "10001")],
                "from 0 to 9999",
                "absurdly large",
            ),
            (
                &[("DB_POOL_TIMEOUT", "0")],
                SECONDS_ERR,
                "would time out at once",
            ),
            (&[("DB_POOL_TIMEOUT", "86401")], SECONDS_ERR, "over a day"),
            (&[("DB_POOL_RECYCLE", "0")], SECONDS_ERR, "zero lifetime"),
            (
                &[("DB_IDLE_TIMEOUT", "1h")],
                SECONDS_ERR,
                "units are not accepted",
            ),
            (&[("DB_CONNECT_TIMEOUT", "0")], SECONDS_ERR, "zero"),
            (
                &[("DB_POOL_PRE_PING", "maybe")],
                "true, false, 1, 0, yes, no, on, off",
                "not a boolean",
            ),
            (
                &[("DB_POOL_MODE", "lazy")],
                "expected one of queue, serverless",
                "unknown mode",
            ),
            (
                &[("DB_ISOLATION_LEVEL", "read_uncommitted")],
                "expected one of read_committed, repeatable_read, serializable",
                "not offered",
            ),
            (
                &[("DB_APPLICATION_NAME", &long_name)],
                "1 to 63 printable ASCII",
                "too long",
            ),
            (
                &[("DB_APPLICATION_NAME", "café")],
                "1 to 63 printable ASCII",
                "not ASCII",
            ),
            (
                &[("DB_STATEMENT_TIMEOUT_MS", "86400001")],
                "from 0 to 86400000",
                "over a day",
            ),
            (&[("DB_JIT", "2")], "true, false", "not a boolean"),
            (
                &[("DB_STATEMENT_CACHE", "10001")],
                "from 0 to 10000",
                "too large",
            ),
            (
                &[("DB_SSL_MODE", "allow")],
                "expected one of disable, prefer, require, verify-ca, verify-full",
                "allow is not offered",
            ),
            (&[("DB_ECHO", "loud")], "true, false", "not a boolean"),
            (
                &[("DB_SLOW_STATEMENT_MS", "1s")],
                "from 0 to 86400000",
                "units",
            ),
            (
                &[("DB_CONNECT_RETRIES", "0")],
                "from 1 to 1000",
                "at least one attempt",
            ),
            (
                &[("DB_CONNECT_RETRIES", "1001")],
                "from 1 to 1000",
                "too many",
            ),
            (
                &[("DB_CONNECT_RETRY_DELAY_MS", "600001")],
                "from 0 to 600000",
                "over 10 min",
            ),
            (
                &[("DB_AUTO_MIGRATE", "sometimes")],
                "true, false",
                "not a boolean",
            ),
            (&[("DB_TX_MAX_RETRIES", "101")], "from 0 to 100", "too many"),
            (
                &[("DB_HOST", "db"), ("DB_PORT", "0")],
                "from 1 to 65535",
                "port zero",
            ),
            (
                &[("DB_HOST", "db"), ("DB_PORT", "65536")],
                "from 1 to 65535",
                "port too large",
            ),
            (
                &[("DB_HOST", "bad host")],
                "expected a host name",
                "space in host",
            ),
        ];
        for (pairs, expected, reason) in cases {
            let (variable, value) = pairs[pairs.len() - 1];
            let err = error(pairs);
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("invalid {variable}={value:?}: ")),
                "{reason}: {shown}"
            );
            assert!(shown.contains(expected), "{reason}: {shown}");
            assert_eq!(err.variable(), Some(variable), "{reason}");
        }
    }

    #[test]
    fn the_documented_messages_read_exactly_as_written() {
        assert_eq!(
            error(&[("DB_POOL_SIZE", "abc")]).to_string(),
            r#"invalid DB_POOL_SIZE="abc": expected a whole number from 1 to 10000"#
        );
        assert_eq!(
            error(&[("DB_ISOLATION_LEVEL", "chaos")]).to_string(),
            r#"invalid DB_ISOLATION_LEVEL="chaos": expected one of read_committed, repeatable_read, serializable"#
        );
    }

    #[test]
    fn a_pool_maximum_over_ten_thousand_is_blamed_on_the_overflow() {
        let shown = error(&[("DB_POOL_SIZE", "9990")]).to_string();
        assert_eq!(
            shown,
            r#"invalid DB_MAX_OVERFLOW="20": DB_POOL_SIZE + DB_MAX_OVERFLOW = 10010 exceeds 10000 connections; expected a whole number from 0 to 10"#
        );
        let db = settings(&[
            ("DATABASE_URL", "postgres://db/inv"),
            ("DB_POOL_SIZE", "5000"),
            ("DB_MAX_OVERFLOW", "5000"),
        ])
        .database;
        assert_eq!(db.max_connections(), MAX_CONNECTIONS);
    }

    #[test]
    fn auto_migrate_defaults_to_true_only_for_the_embedded_database() {
        let cases: &[(Vars, bool, &str)] = &[
            (&[], true, "nothing set: the embedded SQLite default"),
            (
                &[("DATABASE_URL", ""), ("DB_HOST", " ")],
                true,
                "blank values count as unset",
            ),
            (
                &[("DATABASE_URL", crate::test_support::DEFAULTS.database_url)],
                false,
                "an explicit URL, even the same",
            ),
            (
                &[("DATABASE_URL", "postgres://db/inv")],
                false,
                "Postgres by URL",
            ),
            (&[("DB_HOST", "db")], false, "Postgres by parts"),
            (
                &[("DB_AUTO_MIGRATE", "false")],
                false,
                "turned off explicitly",
            ),
            (
                &[("DB_HOST", "db"), ("DB_AUTO_MIGRATE", "on")],
                true,
                "turned on explicitly",
            ),
        ];
        for (pairs, expected, reason) in cases {
            assert_eq!(settings(pairs).database.auto_migrate, *expected, "{reason}");
        }
    }

    #[test]
    fn the_url_is_assembled_from_db_parts_when_database_url_is_unset() {
        let db = settings(&[("DB_HOST", "db.internal")]).database;
        assert_eq!(
            db.url.to_string(),
            "postgres://postgres@db.internal:5432/postgres"
        );
        assert!(db.url.password().is_none());

        let db = settings(&[
            ("DB_HOST", "db.internal"),
            ("DB_PORT", "6543"),
            ("DB_USER", "inventory"),
            ("DB_PASSWORD", "p@ss:w/rd%"),
            ("DB_NAME", "stock"),
        ])
        .database;
        assert_eq!(db.url.password().as_deref(), Some("p@ss:w/rd%"));
        assert_eq!(
            db.url.to_string(),
            "postgres://inventory:***@db.internal:6543/stock"
        );
    }

    #[test]
    fn database_url_wins_over_the_db_parts() {
        let db = settings(&[
            ("DATABASE_URL", "postgres://app@primary/inv"),
            ("DB_HOST", "other"),
            ("DB_PASSWORD", "ignored"),
        ])
        .database;
        assert_eq!(db.url.to_string(), "postgres://app@primary/inv");
        assert!(db.url.password().is_none());
    }

    #[test]
    fn the_pool_keeps_pool_size_connections_and_allows_the_overflow() {
        let db = settings(&[("DATABASE_URL", "postgres://db/inv")]).database;
        assert_eq!((db.min_connections(), db.max_connections()), (10, 30));
    }

    #[test]
    fn serverless_mode_keeps_no_connection_open() {
        let db = settings(&[
            ("DATABASE_URL", "postgres://db/inv"),
            ("DB_POOL_MODE", "serverless"),
        ])
        .database;
        assert_eq!((db.min_connections(), db.max_connections()), (0, 30));
    }

    #[test]
    fn sqlite_pools_are_capped_and_in_memory_ones_have_one_connection() {
        let cases: &[(Vars, (u32, u32), &str)] = &[
            (&[], (4, 4), "defaults capped at four"),
            (
                &[("DB_POOL_SIZE", "1"), ("DB_MAX_OVERFLOW", "0")],
                (1, 1),
                "one connection",
            ),
            (
                &[("DB_POOL_SIZE", "2"), ("DB_MAX_OVERFLOW", "1")],
                (2, 3),
                "under the cap",
            ),
            (&[("DATABASE_URL", "sqlite::memory:")], (1, 1), "in memory"),
            (
                &[
                    ("DATABASE_URL", "sqlite::memory:"),
                    ("DB_POOL_MODE", "serverless"),
                ],
                (0, 1),
                "serverless",
            ),
        ];
        for (pairs, expected, reason) in cases {
            let db = settings(pairs).database;
            assert_eq!(
                (db.min_connections(), db.max_connections()),
                *expected,
                "{reason}"
            );
        }
    }

    #[test]
    fn settings_in_the_url_are_kept_when_their_variables_are_unset() {
        let url = "postgres://db/inv?sslmode=require&application_name=reporting\
                   &statement-cache-capacity=0&sslrootcert=/ca.pem";
        let db = settings(&[("DATABASE_URL", url)]).database;
        assert_eq!(db.ssl_mode, SslMode::Require);
        assert_eq!(db.application_name, "reporting");
        assert_eq!(db.statement_cache, 0);
        assert_eq!(db.ssl_root_cert, Some(PathBuf::from("/ca.pem")));

        let db = settings(&[
            ("DATABASE_URL", url),
            ("DB_SSL_MODE", "verify-full"),
            ("DB_APPLICATION_NAME", "api"),
            ("DB_STATEMENT_CACHE", "50"),
            ("DB_SSL_ROOT_CERT", "/other.pem"),
        ])
        .database;
        assert_eq!(db.ssl_mode, SslMode::VerifyFull);
        assert_eq!(db.application_name, "api");
        assert_eq!(db.statement_cache, 50);
        assert_eq!(db.ssl_root_cert, Some(PathBuf::from("/other.pem")));
    }

    #[test]
    fn isolation_levels_have_sql_sea_orm_and_variable_spellings() {
        let cases = [
            (
                IsolationLevel::ReadCommitted,
                "read committed",
                "read_committed",
                sea_orm::IsolationLevel::ReadCommitted,
            ),
            (
                IsolationLevel::RepeatableRead,
                "repeatable read",
                "repeatable_read",
                sea_orm::IsolationLevel::RepeatableRead,
            ),
            (
                IsolationLevel::Serializable,
                "serializable",
                "serializable",
                sea_orm::IsolationLevel::Serializable,
            ),
        ];
        for (level, sql, name, sea) in cases {
            assert_eq!(level.as_sql(), sql);
            assert_eq!(level.to_string(), name);
            assert_eq!(format!("{:?}", level.to_sea_orm()), format!("{sea:?}"));
        }
        assert_eq!(SslMode::VerifyCa.to_string(), "verify-ca");
        assert_eq!(PoolMode::Serverless.to_string(), "serverless");
        assert_eq!(Backend::Postgres.to_string(), "postgres");
    }

    #[test]
    fn the_scale_out_variables_have_their_documented_defaults() {
        let db = settings(&[("DATABASE_URL", "postgres://app@db/inv")]).database;
        assert_eq!(db.pooler, Pooler::None);
        assert!(db.replica_url.is_none());
        assert_eq!(db.replica_max_wait, Duration::from_millis(100));
        assert_eq!(db.idempotency_ttl, Duration::from_secs(86_400));
        assert_eq!(db.leak_detection, Some(Duration::from_millis(10_000)));
        assert_eq!(db.statement_cache, 100);
    }

    #[test]
    fn the_scale_out_variables_are_read() {
        let db = settings(&[
            ("DATABASE_URL", "postgres://app:pw@bouncer:6432/inv"),
            ("DB_POOLER", "Transaction"),
            (
                "DATABASE_REPLICA_URL",
                "postgresql://app:s3cret@replica/inv",
            ),
            ("DB_REPLICA_MAX_WAIT_MS", "0"),
            ("DB_IDEMPOTENCY_TTL", "60"),
            ("DB_LEAK_DETECTION_MS", "0"),
        ])
        .database;
        assert_eq!(db.pooler, Pooler::Transaction);
        assert_eq!(
            db.statement_cache, 0,
            "no statement cache behind the pooler"
        );
        let replica = db.replica_url.expect("replica");
        assert_eq!(replica.to_string(), "postgres://app:***@replica/inv");
        assert_eq!(db.replica_max_wait, Duration::ZERO);
        assert_eq!(db.idempotency_ttl, Duration::from_secs(60));
        assert_eq!(db.leak_detection, None);
    }

    #[test]
    fn the_replica_pool_takes_every_setting_but_the_url_from_the_primary() {
        let db = settings(&[
            ("DATABASE_URL", "postgres://app:pw@primary/inv"),
            ("DATABASE_REPLICA_URL", "postgres://app:pw@replica/inv"),
            ("DB_POOL_SIZE", "3"),
            ("DB_AUTO_MIGRATE", "true"),
        ])
        .database;
        let replica = db.for_replica().expect("a replica is configured");
        assert_eq!(replica.url.to_string(), "postgres://app:***@replica/inv");
        assert_eq!(replica.pool_size, 3);
        assert!(!replica.auto_migrate, "migrations never run on a replica");
        assert!(replica.for_replica().is_none());
        let without = settings(&[("DATABASE_URL", "postgres://app@db/inv")]).database;
        assert!(without.for_replica().is_none());
    }

    #[test]
    fn settings_that_cannot_work_together_are_refused_with_the_reason() {
        let pg = ("DATABASE_URL", "postgres://app@db/inv");
        let cases: &[(Vars, &str, &str)] = &[
            (
                &[
                    pg,
                    ("DB_POOLER", "transaction"),
                    ("DB_STATEMENT_CACHE", "100"),
                ],
                "DB_STATEMENT_CACHE",
                "collides",
            ),
            (&[("DB_POOLER", "transaction")], "DB_POOLER", "PostgreSQL"),
            (
                &[
                    pg,
                    ("DB_POOLER", "transaction"),
                    ("DB_AUTO_MIGRATE", "true"),
                ],
                "DB_AUTO_MIGRATE",
                "direct database URL",
            ),
            (
                &[pg, ("DB_POOLER", "session")],
                "DB_POOLER",
                "none, transaction",
            ),
            (
                &[("DATABASE_REPLICA_URL", "postgres://app@replica/inv")],
                "DATABASE_REPLICA_URL",
                "PostgreSQL URLs",
            ),
            (
                &[pg, ("DATABASE_REPLICA_URL", "redis://app:s3cret@r/0")],
                "DATABASE_REPLICA_URL",
                "not supported",
            ),
            (
                &[pg, ("DB_REPLICA_MAX_WAIT_MS", "60001")],
                "DB_REPLICA_MAX_WAIT_MS",
                "0 to 60000",
            ),
            (
                &[pg, ("DB_IDEMPOTENCY_TTL", "0")],
                "DB_IDEMPOTENCY_TTL",
                "1 to 2592000",
            ),
            (
                &[pg, ("DB_LEAK_DETECTION_MS", "-1")],
                "DB_LEAK_DETECTION_MS",
                "0 to 86400000",
            ),
        ];
        for (vars, variable, expected) in cases {
            let err = error(vars);
            assert_eq!(err.variable(), Some(*variable), "{vars:?}: {err}");
            let shown = err.to_string();
            assert!(shown.contains(expected), "{vars:?}: {shown}");
            assert!(!shown.contains("s3cret"), "{vars:?}: {shown}");
        }
        let ok = settings(&[
            pg,
            ("DB_POOLER", "transaction"),
            ("DB_STATEMENT_CACHE", "0"),
        ]);
        assert_eq!(ok.database.statement_cache, 0);
    }
}
