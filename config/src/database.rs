//! `DatabaseSettings`: every `DB_*` variable (and `DATABASE_URL`) of `docs/configuration.md`
//! parsed, range-checked and defaulted, with the small enums they use (`Backend`, `PoolMode`,
//! `IsolationLevel`, `SslMode`) and the derived pool bounds. Turning these settings into SeaORM's
//! `ConnectOptions` lives in `connect.rs`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::database_url::{self, DatabaseUrl, UrlSource};
use crate::env::{RawEnv, boolean, choice, find_choice, number, present, range_text};
use crate::error::ConfigError;

/// The most connections a pool may open (`DB_POOL_SIZE + DB_MAX_OVERFLOW`).
pub const MAX_CONNECTIONS: u32 = 10_000;

/// The most connections an SQLite pool opens, whatever the pool settings say: SQLite has one
/// writer at a time, and more readers than this only add lock contention.
pub const SQLITE_MAX_CONNECTIONS: u32 = 4;

/// The longest timeout, in seconds, accepted for any `*_TIMEOUT` or `DB_POOL_RECYCLE`: one day.
pub(crate) const MAX_SECONDS: u64 = 86_400;

/// The longest duration, in milliseconds, accepted for the `*_MS` variables: one day.
const MAX_MILLIS: u64 = 86_400_000;

/// The longest `DB_IDEMPOTENCY_TTL`, in seconds: 30 days.
const MAX_IDEMPOTENCY_TTL: u64 = 30 * 86_400;

/// Which driver a URL is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    /// MySQL's protocol: MariaDB is what is supported and tested (versions: docs/requirements.md).
    Mysql,
    Sqlite,
}

impl Backend {
    /// The Cargo feature this backend needs, when this build was compiled without it.
    pub fn left_out(&self) -> Option<&'static str> {
        let (feature, compiled) = match self {
            Backend::Postgres => ("postgres", cfg!(feature = "postgres")),
            Backend::Mysql => ("mysql", cfg!(feature = "mysql")),
            Backend::Sqlite => ("sqlite", cfg!(feature = "sqlite")),
        };
        (!compiled).then_some(feature)
    }

    /// `postgres`, `mysql` or `sqlite`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
            Backend::Sqlite => "sqlite",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `DB_POOL_MODE`: how the pool keeps connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// Keep `DB_POOL_SIZE` connections open; requests queue for one when all are busy.
    Queue,
    /// Keep no idle connection: each is closed when released (for short-lived runtimes whose
    /// connections would otherwise outlive them on the server).
    Serverless,
}

impl PoolMode {
    const CHOICES: &[(&str, PoolMode)] = &[
        ("queue", PoolMode::Queue),
        ("serverless", PoolMode::Serverless),
    ];

    /// The variable's spelling: `queue` or `serverless`.
    pub fn as_str(&self) -> &'static str {
        name_of(*self, Self::CHOICES)
    }
}

/// `DB_POOLER`: what stands between the service and PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooler {
    /// A direct connection (or a session-mode pooler): session state may be relied on.
    None,
    /// A transaction-mode pooler (PgBouncer `pool_mode = transaction`, RDS Proxy, Supavisor,
    /// Neon's pooler): consecutive transactions of one client connection may run on different
    /// server connections, so nothing may rely on session state (see the app's
    /// `transaction/session.rs`).
    Transaction,
}

impl Pooler {
    pub(crate) const CHOICES: &[(&str, Pooler)] =
        &[("none", Pooler::None), ("transaction", Pooler::Transaction)];

    /// The variable's spelling: `none` or `transaction`.
    pub fn as_str(&self) -> &'static str {
        name_of(*self, Self::CHOICES)
    }
}

/// `DB_ISOLATION_LEVEL`: the isolation level of every transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsolationLevel {
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl IsolationLevel {
    const CHOICES: &[(&str, IsolationLevel)] = &[
        ("read_committed", IsolationLevel::ReadCommitted),
        ("repeatable_read", IsolationLevel::RepeatableRead),
        ("serializable", IsolationLevel::Serializable),
    ];

    /// The variable's spelling: `read_committed`, `repeatable_read` or `serializable`.
    pub fn as_str(&self) -> &'static str {
        name_of(*self, Self::CHOICES)
    }

    /// The SQL spelling, as in `SET TRANSACTION ISOLATION LEVEL repeatable read` or Postgres's
    /// `default_transaction_isolation`.
    pub fn as_sql(&self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "read committed",
            IsolationLevel::RepeatableRead => "repeatable read",
            IsolationLevel::Serializable => "serializable",
        }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    const CHOICES: &[(&str, SslMode)] = &[
        ("disable", SslMode::Disable),
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
        ("verify-full", SslMode::VerifyFull),
        ("disabled", SslMode::Disable),
        ("preferred", SslMode::Prefer),
        ("required", SslMode::Require),
        ("verify-identity", SslMode::VerifyFull),
    ];

    /// The accepted spellings, for messages.
    pub(crate) const EXPECTED: &str = "disable, prefer, require, verify-ca, verify-full";

    /// The variable's spelling: `disable`, `prefer`, `require`, `verify-ca` or `verify-full`.
    pub fn as_str(&self) -> &'static str {
        name_of(*self, Self::CHOICES)
    }

    /// Parses one of the accepted spellings (any case, `verify_ca` as well as `verify-ca`).
    pub(crate) fn parse(value: &str) -> Option<SslMode> {
        find_choice(value, Self::CHOICES)
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(PoolMode, Pooler, IsolationLevel, SslMode);

fn name_of<T: Copy + PartialEq>(value: T, choices: &[(&'static str, T)]) -> &'static str {
    choices
        .iter()
        .find(|(_, choice)| *choice == value)
        .map_or("", |(name, _)| name)
}

/// The database and pool settings. `Debug` shows the password as `***`.
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    /// `DATABASE_URL`, or assembled from `DB_HOST`, `DB_PORT`, `DB_USER`, `DB_PASSWORD`,
    /// `DB_NAME`, or the embedded SQLite default.
    pub url: DatabaseUrl,
    /// `DB_POOL_SIZE` (1..=10000, default 10): connections kept open, the pool's minimum.
    pub pool_size: u32,
    /// `DB_MAX_OVERFLOW` (0..=10000, default 20): extra connections allowed in a burst;
    /// `pool_size + max_overflow` is at most [`MAX_CONNECTIONS`].
    pub max_overflow: u32,
    /// `DB_POOL_TIMEOUT` (seconds, 1..=86400, default 30): how long a request waits for a
    /// connection before `503 pool_timeout`.
    pub pool_timeout: Duration,
    /// `DB_POOL_RECYCLE` (seconds, 1..=86400, default 3600): the longest a connection lives.
    pub pool_recycle: Duration,
    /// `DB_POOL_PRE_PING` (default true): check a connection that has been idle before handing
    /// it out.
    pub pool_pre_ping: bool,
    /// `DB_IDLE_TIMEOUT` (seconds, 1..=86400, default 600): how long an idle connection above
    /// the pool size is kept.
    pub idle_timeout: Duration,
    /// `DB_CONNECT_TIMEOUT` (seconds, 1..=86400, default 10): the bound on one connection
    /// attempt. sqlx 0.9 has no per-connection connect timeout (its pool bounds connecting by
    /// the acquire timeout, and SeaORM's `connect_timeout` is that same knob), so this is not in
    /// [`DatabaseSettings::connect_options`]: the caller wraps each start-up connection attempt
    /// in it.
    pub connect_timeout: Duration,
    /// `DB_POOL_MODE` (default `queue`).
    pub pool_mode: PoolMode,
    /// `DB_ISOLATION_LEVEL` (default `repeatable_read`).
    pub isolation_level: IsolationLevel,
    /// `DB_APPLICATION_NAME` (1..=63 printable ASCII characters, default the service's
    /// [`Defaults::application_name`](crate::Defaults); when
    /// unset, an `application_name` parameter of `DATABASE_URL` is used).
    pub application_name: String,
    /// `DB_STATEMENT_TIMEOUT_MS` (0..=86400000, default 0): Postgres `statement_timeout`;
    /// `None` when 0 (no limit).
    pub statement_timeout: Option<Duration>,
    /// `DB_JIT` (default false): Postgres `jit`.
    pub jit: bool,
    /// `DB_STATEMENT_CACHE` (0..=10000, default 100; when unset, a `statement-cache-capacity`
    /// parameter of `DATABASE_URL` is used): prepared statements cached per connection; 0
    /// behind PgBouncer in transaction mode.
    pub statement_cache: usize,
    /// `DB_SSL_MODE` (default `prefer`; when unset, an `sslmode` parameter of `DATABASE_URL` is
    /// used, so that a URL asking for TLS is never downgraded).
    pub ssl_mode: SslMode,
    /// `DB_SSL_ROOT_CERT` (default none; when unset, an `sslrootcert` parameter of
    /// `DATABASE_URL`): CA certificate file; its existence is checked when connecting.
    pub ssl_root_cert: Option<PathBuf>,
    /// `DB_ECHO` (default false): log every SQL statement at INFO.
    pub echo: bool,
    /// `DB_SLOW_STATEMENT_MS` (0..=86400000, default 1000): statements slower than this are
    /// logged at WARN; 0 turns slow-statement logging off.
    pub slow_statement: Duration,
    /// `DB_CONNECT_RETRIES` (1..=1000, default 5): the total number of connection attempts at
    /// start-up, the first one included (so 1 means no retry).
    pub connect_retries: u32,
    /// `DB_CONNECT_RETRY_DELAY_MS` (0..=600000, default 2000): the pause between two attempts.
    pub connect_retry_delay: Duration,
    /// `DB_AUTO_MIGRATE` (default true for the embedded SQLite default, that is when neither
    /// `DATABASE_URL` nor `DB_HOST` is set, else false): run pending migrations at start-up.
    pub auto_migrate: bool,
    /// `DB_TX_MAX_RETRIES` (0..=100, default 3): re-runs of a request after a serialization
    /// failure or deadlock.
    pub tx_max_retries: u32,
    /// `DB_POOLER` (default `none`).
    pub pooler: Pooler,
    /// `DATABASE_REPLICA_URL` (default none): a PostgreSQL streaming replica for `GET`/`HEAD`
    /// transactions, with the same pool settings as the primary.
    pub replica_url: Option<DatabaseUrl>,
    /// `DB_REPLICA_MAX_WAIT_MS` (0..=60000, default 100): how long a read carrying a
    /// consistency token waits for the replica to catch up before it runs on the primary.
    pub replica_max_wait: Duration,
    /// `DB_IDEMPOTENCY_TTL` (seconds, 1..=2592000, default 86400): how long an
    /// `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
    /// `DB_LEAK_DETECTION_MS` (0..=86400000, default 10000): a transaction still open after
    /// this long is logged at WARN; `None` when 0 (off).
    pub leak_detection: Option<Duration>,
    /// `DB_IDLE_IN_TRANSACTION_TIMEOUT_MS` (0..=86400000, default 30000): PostgreSQL
    /// `idle_in_transaction_session_timeout`, the server's own end to a transaction its client
    /// abandoned (a partition); `None` when 0 (off).
    pub idle_in_transaction_timeout: Option<Duration>,
    /// `DB_FAILOVER_RETRY_MS` (0..=600000, default 5000): how long a request whose primary was
    /// lost before COMMIT is re-run, waiting for a new primary, before 503.
    pub failover_retry: Duration,
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
            Backend::Sqlite if self.url.is_in_memory() => 1,
            Backend::Sqlite => configured.min(SQLITE_MAX_CONNECTIONS),
        }
    }

    /// The same settings pointed at `DATABASE_REPLICA_URL`, for the replica's pool (same pool
    /// bounds, timeouts and session settings); `None` when no replica is configured.
    pub fn for_replica(&self) -> Option<DatabaseSettings> {
        let url = self.replica_url.clone()?;
        Some(DatabaseSettings {
            url,
            replica_url: None,
            auto_migrate: false,
            ..self.clone()
        })
    }

    /// Reads every database variable, in the order of `docs/configuration.md`'s table; the first
    /// bad one is the error.
    pub(crate) fn from_raw(
        raw: &RawEnv,
        defaults: &crate::Defaults,
    ) -> Result<DatabaseSettings, ConfigError> {
        let (url, source) = database_url::resolve(raw, defaults.database_url)?;
        let pool_size = number("DB_POOL_SIZE", &raw.db_pool_size, 10, 1..=10_000)?;
        let max_overflow: u32 = number("DB_MAX_OVERFLOW", &raw.db_max_overflow, 20, 0..=10_000)?;
        if pool_size + max_overflow > MAX_CONNECTIONS {
            return Err(ConfigError::invalid(
                "DB_MAX_OVERFLOW",
                max_overflow.to_string(),
                format!(
                    "DB_POOL_SIZE + DB_MAX_OVERFLOW = {} exceeds {MAX_CONNECTIONS} connections; {}",
                    pool_size + max_overflow,
                    range_text(0, MAX_CONNECTIONS - pool_size)
                ),
            ));
        }
        // When a variable is unset, a parameter of `DATABASE_URL` for the same setting is kept
        // (sqlx would apply it, and then this crate's default would silently override it: an
        // `sslmode=require` URL must not be downgraded to `prefer`). Those parameters were
        // checked by `DatabaseUrl::parse`.
        let application_name = match present(&raw.db_application_name) {
            Some(_) => application_name(&raw.db_application_name)?,
            None => url
                .query_param(&["application_name"])
                .unwrap_or_else(|| defaults.application_name.to_owned()),
        };
        let pooler = choice("DB_POOLER", &raw.db_pooler, Pooler::None, Pooler::CHOICES)?;
        let statement_cache = match url.query_param(&["statement-cache-capacity"]) {
            // Behind a transaction-mode pooler no statement is ever prepared by name (a named
            // statement outlives its transaction on a server connection that other clients get
            // next), so there is nothing to cache.
            _ if pooler == Pooler::Transaction => {
                let cache: usize =
                    number("DB_STATEMENT_CACHE", &raw.db_statement_cache, 0, 0..=10_000)?;
                if cache != 0 {
                    return Err(ConfigError::invalid(
                        "DB_STATEMENT_CACHE",
                        cache.to_string(),
                        "must be 0 (or unset) with DB_POOLER=transaction: a named prepared \
                         statement outlives its transaction and collides on the pooler's shared \
                         server connections",
                    ));
                }
                0
            }
            Some(in_url) if present(&raw.db_statement_cache).is_none() => {
                in_url.parse().unwrap_or(100)
            }
            _ => number(
                "DB_STATEMENT_CACHE",
                &raw.db_statement_cache,
                100,
                0..=10_000,
            )?,
        };
        let ssl_mode = match url.query_param(&["sslmode", "ssl-mode"]) {
            Some(in_url) if present(&raw.db_ssl_mode).is_none() => {
                SslMode::parse(&in_url).unwrap_or(SslMode::Prefer)
            }
            _ => choice(
                "DB_SSL_MODE",
                &raw.db_ssl_mode,
                SslMode::Prefer,
                SslMode::CHOICES,
            )?,
        };
        let ssl_root_cert = present(&raw.db_ssl_root_cert)
            .map(str::to_owned)
            .or_else(|| url.query_param(&["sslrootcert", "ssl-root-cert", "ssl-ca"]))
            .map(PathBuf::from);
        let statement_timeout_ms: u64 = number(
            "DB_STATEMENT_TIMEOUT_MS",
            &raw.db_statement_timeout_ms,
            0,
            0..=MAX_MILLIS,
        )?;
        let slow_statement_ms = number(
            "DB_SLOW_STATEMENT_MS",
            &raw.db_slow_statement_ms,
            1000,
            0..=MAX_MILLIS,
        )?;
        let auto_migrate = boolean(
            "DB_AUTO_MIGRATE",
            &raw.db_auto_migrate,
            source == UrlSource::EmbeddedDefault,
        )?;
        if pooler == Pooler::Transaction {
            if url.backend() != Backend::Postgres {
                return Err(ConfigError::invalid(
                    "DB_POOLER",
                    pooler.as_str(),
                    "a transaction-mode pooler needs a PostgreSQL DATABASE_URL (set DB_POOLER=none)",
                ));
            }
            if auto_migrate {
                return Err(ConfigError::invalid(
                    "DB_AUTO_MIGRATE",
                    "true",
                    "migrations cannot run through a transaction-mode pooler (DB_POOLER=transaction); \
                     set DB_AUTO_MIGRATE=false and migrate with the direct database URL",
                ));
            }
        }
        let replica_url = match present(&raw.database_replica_url) {
            None => None,
            Some(value) => {
                let replica =
                    DatabaseUrl::parse(value).map_err(|e| e.renamed("DATABASE_REPLICA_URL"))?;
                if replica.backend() != Backend::Postgres || url.backend() != Backend::Postgres {
                    return Err(ConfigError::invalid(
                        "DATABASE_REPLICA_URL",
                        replica.to_string(),
                        "a read replica needs PostgreSQL URLs for both the primary and the replica",
                    ));
                }
                Some(replica)
            }
        };
        Ok(DatabaseSettings {
            pool_size,
            max_overflow,
            pool_timeout: seconds("DB_POOL_TIMEOUT", &raw.db_pool_timeout, 30)?,
            pool_recycle: seconds("DB_POOL_RECYCLE", &raw.db_pool_recycle, 3600)?,
            pool_pre_ping: boolean("DB_POOL_PRE_PING", &raw.db_pool_pre_ping, true)?,
            idle_timeout: seconds("DB_IDLE_TIMEOUT", &raw.db_idle_timeout, 600)?,
            connect_timeout: seconds("DB_CONNECT_TIMEOUT", &raw.db_connect_timeout, 10)?,
            pool_mode: choice(
                "DB_POOL_MODE",
                &raw.db_pool_mode,
                PoolMode::Queue,
                PoolMode::CHOICES,
            )?,
            isolation_level: choice(
                "DB_ISOLATION_LEVEL",
                &raw.db_isolation_level,
                IsolationLevel::RepeatableRead,
                IsolationLevel::CHOICES,
            )?,
            application_name,
            statement_timeout: (statement_timeout_ms > 0)
                .then(|| Duration::from_millis(statement_timeout_ms)),
            jit: boolean("DB_JIT", &raw.db_jit, false)?,
            statement_cache,
            ssl_mode,
            ssl_root_cert,
            echo: boolean("DB_ECHO", &raw.db_echo, false)?,
            slow_statement: Duration::from_millis(slow_statement_ms),
            connect_retries: number("DB_CONNECT_RETRIES", &raw.db_connect_retries, 5, 1..=1000)?,
            connect_retry_delay: Duration::from_millis(number(
                "DB_CONNECT_RETRY_DELAY_MS",
                &raw.db_connect_retry_delay_ms,
                2000,
                0..=600_000,
            )?),
            auto_migrate,
            tx_max_retries: number("DB_TX_MAX_RETRIES", &raw.db_tx_max_retries, 3, 0..=100)?,
            pooler,
            replica_url,
            replica_max_wait: Duration::from_millis(number(
                "DB_REPLICA_MAX_WAIT_MS",
                &raw.db_replica_max_wait_ms,
                100,
                0..=60_000,
            )?),
            idempotency_ttl: Duration::from_secs(number(
                "DB_IDEMPOTENCY_TTL",
                &raw.db_idempotency_ttl,
                86_400,
                1..=MAX_IDEMPOTENCY_TTL,
            )?),
            leak_detection: match number(
                "DB_LEAK_DETECTION_MS",
                &raw.db_leak_detection_ms,
                10_000u64,
                0..=MAX_MILLIS,
            )? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            idle_in_transaction_timeout: match number(
                "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
                &raw.db_idle_in_transaction_timeout_ms,
                30_000u64,
                0..=MAX_MILLIS,
            )? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            failover_retry: Duration::from_millis(number(
                "DB_FAILOVER_RETRY_MS",
                &raw.db_failover_retry_ms,
                5000,
                0..=600_000,
            )?),
            url,
        })
    }
}

/// A whole number of seconds, 1..=86400.
pub(crate) fn seconds(
    variable: &'static str,
    raw: &Option<String>,
    default: u64,
) -> Result<Duration, ConfigError> {
    number(variable, raw, default, 1..=MAX_SECONDS).map(Duration::from_secs)
}

/// `DB_APPLICATION_NAME`: what Postgres accepts without truncating (63 bytes) and what can go in
/// a startup packet and a log line unescaped (printable ASCII).
fn application_name(raw: &Option<String>) -> Result<String, ConfigError> {
    let value = present(raw).unwrap_or_default();
    let printable = value.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if value.is_empty() || value.len() > 63 || !printable {
        return Err(ConfigError::invalid(
            "DB_APPLICATION_NAME",
            value,
            "expected 1 to 63 printable ASCII characters",
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{Vars, error, settings};

    const SECONDS_ERR: &str = "expected a whole number from 1 to 86400";

    #[test]
    fn an_empty_environment_gives_the_documented_defaults() {
        let db = settings(&[]).database;
        assert_eq!(
            db.url.without_password(),
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
        assert_eq!(db.url.without_password(), "postgres://app@db:6543/inv");
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
            (&[("DB_MAX_OVERFLOW", "-1")], "from 0 to 10000", "negative"),
            (
                &[("DB_MAX_OVERFLOW", "10001")],
                "from 0 to 10000",
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
            db.url.without_password(),
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
        assert_eq!(
            db.url.expose_secret(),
            "postgres://inventory:p%40ss%3Aw%2Frd%25@db.internal:6543/stock"
        );
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
        assert_eq!(db.url.without_password(), "postgres://app@primary/inv");
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
