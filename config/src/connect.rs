//! `DatabaseSettings::connect`: the one place where the settings become the driver's pool. The
//! URL's options (parsed by sqlx) get the settings through sqlx's builder methods (startup
//! parameters, TLS, statement cache, statement logging; MariaDB's session settings; SQLite's
//! journal mode, busy timeout and foreign keys), the pool is built by sqlx and handed to SeaORM
//! as it is (`SqlxPostgresConnector::from_sqlx_postgres_pool` and its siblings): no URL goes
//! back through a string, so none can carry the password.

use std::time::Duration;

use log::LevelFilter;
use sea_orm::DatabaseConnection;
use sea_orm::sqlx::pool::PoolOptions;
use sea_orm::sqlx::{self, Connection as _};

use crate::url::Target;
use crate::{DatabaseSettings, PoolMode};
#[cfg(feature = "postgres")]
use sqlx::postgres::PgConnectOptions as PgOptions;
#[cfg(feature = "sqlite")]
use sqlx::sqlite::{SqliteConnectOptions as SqliteOptions, SqliteJournalMode};
#[cfg(feature = "mysql")]
use sqlx::{Executor as _, mysql::MySqlConnectOptions as MySqlOptions, mysql::MySqlSslMode};

/// Given a pooled connection's age, whether it must be closed instead of handed out.
pub type Evict = std::sync::Arc<dyn Fn(Duration) -> bool + Send + Sync>;

/// A connection used less than this long ago is handed out without a ping.
const PRE_PING_IDLE: Duration = Duration::from_secs(1);

/// How long an SQLite statement waits for another connection's write lock before failing.
#[cfg(feature = "sqlite")]
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The database of a driver's connect options.
type Db<O> = <<O as sqlx::ConnectOptions>::Connection as sqlx::Connection>::Database;

/// The pool, handed to SeaORM as it is; connected now (one connection opened, so that a server
/// that does not answer fails here) or on first use.
async fn open<O: sqlx::ConnectOptions>(
    pool: PoolOptions<Db<O>>,
    options: O,
    lazy: bool,
) -> Result<DatabaseConnection, sqlx::Error>
where
    DatabaseConnection: From<sqlx::Pool<Db<O>>>,
{
    Ok(DatabaseConnection::from(match lazy {
        true => pool.connect_lazy_with(options),
        false => pool.connect_with(options).await?,
    }))
}

/// Whether a connection idle this long is pinged before it is handed out.
fn needs_ping(pre_ping: bool, idle_for: Duration) -> bool {
    pre_ping && idle_for >= PRE_PING_IDLE
}

impl DatabaseSettings {
    /// The pool of these settings, as SeaORM's connection: connected now (one connection opened
    /// to check the server answers), or `lazy`ly on first use. When given, `evict` is asked
    /// before a PostgreSQL connection is handed out: given the connection's age, `true` closes it
    /// and takes another (the layer's failover epoch: connections opened before the primary was
    /// lost are not reused).
    ///
    /// `DB_CONNECT_TIMEOUT` is not applied here: sqlx 0.9 has no connect timeout of its own, so
    /// the caller bounds each start-up attempt with [`DatabaseSettings::connect_timeout`].
    ///
    /// # Errors
    /// The driver's error when `lazy` is false and the first connection fails.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub async fn connect(
        &self,
        lazy: bool,
        evict: Option<Evict>,
    ) -> Result<DatabaseConnection, sqlx::Error> {
        match &self.url.target {
            #[cfg(feature = "postgres")]
            Target::Postgres(pg) => open(self.pool(evict), self.postgres_options(pg), lazy).await,
            #[cfg(feature = "mysql")]
            Target::Mysql(my) => {
                let session = self.mysql_session_sql();
                let pool: PoolOptions<sqlx::MySql> = self.pool(None);
                let pool = pool.after_connect(move |connection, _| {
                    let session = sqlx::AssertSqlSafe(session.clone());
                    Box::pin(async move { connection.execute(session).await.map(drop) })
                });
                open(pool, self.mysql_options(my), lazy).await
            }
            #[cfg(feature = "sqlite")]
            Target::Sqlite(lite) => open(self.pool(None), self.sqlite_options(lite), lazy).await,
        }
    }

    /// Pool bounds and timeouts, the pre-ping (and `evict`), and serverless mode's closing on
    /// release.
    pub(crate) fn pool<DB: sqlx::Database>(&self, evict: Option<Evict>) -> PoolOptions<DB> {
        let ping = self.pool_pre_ping;
        // An in-memory database vanishes with its last connection: never expire it.
        let expire = |after: Duration| Some(after).filter(|_| !self.url.in_memory);
        let pool = PoolOptions::<DB>::new()
            .max_connections(self.max_connections())
            .min_connections(self.min_connections())
            .acquire_timeout(self.pool_timeout)
            .max_lifetime(expire(self.pool_recycle))
            .idle_timeout(expire(self.idle_timeout))
            .test_before_acquire(false)
            // Ping only connections idle for a second or more: one released a moment ago is
            // almost certainly alive, and pinging it would add a round trip to every checkout.
            .before_acquire(move |connection, meta| {
                let evicted = evict.as_ref().is_some_and(|evict| evict(meta.age));
                let ping = !evicted && needs_ping(ping, meta.idle_for);
                Box::pin(async move {
                    if ping {
                        connection.ping().await?;
                    }
                    Ok(!evicted)
                })
            });
        match self.pool_mode {
            // Close every connection when it is released, so none sits idle between requests.
            PoolMode::Serverless => pool.after_release(|_, _| Box::pin(async { Ok(false) })),
            PoolMode::Queue => pool,
        }
    }

    /// Statement logging: every statement at INFO with `DB_ECHO`, slow ones at WARN.
    fn logged<O: sqlx::ConnectOptions>(&self, options: O) -> O {
        let level = |on: bool, level| if on { level } else { LevelFilter::Off };
        let slow = level(!self.slow_statement.is_zero(), LevelFilter::Warn);
        options
            .log_statements(level(self.echo, LevelFilter::Info))
            .log_slow_statements(slow, self.slow_statement)
    }

    /// The URL's options with the settings: application name, TLS, statement cache and the
    /// session settings as startup parameters (no round trip), or none of those behind a
    /// transaction-mode pooler, which refuses them (the layer sets them in each transaction).
    #[cfg(feature = "postgres")]
    pub(crate) fn postgres_options(&self, pg: &PgOptions) -> PgOptions {
        let mut pg = self
            .logged(pg.clone())
            .application_name(&self.application_name)
            .statement_cache_capacity(self.statement_cache)
            // `SslMode` displays as libpq's `sslmode`: this parse cannot fail.
            .ssl_mode(self.ssl_mode.to_string().parse().unwrap_or_default());
        if let Some(path) = &self.ssl_root_cert {
            pg = pg.ssl_root_cert(path);
        }
        if self.pooler == crate::Pooler::Transaction {
            // PgBouncer refuses `options` and sqlx's `extra_float_digits` unless told to ignore them.
            return pg.extra_float_digits(None);
        }
        let millis = |name, ms: Option<Duration>| Some((name, ms?.as_millis().to_string()));
        let jit = ("jit", if self.jit { "on" } else { "off" }.to_owned());
        let level = self.isolation_level.as_sql();
        let isolation = ("default_transaction_isolation", level);
        let timeout = millis("statement_timeout", self.statement_timeout);
        // The server's own end to a transaction whose client is gone (a partition), so that its
        // row locks do not outlive it by more than this.
        let idle = self.idle_in_transaction_timeout;
        let idle = millis("idle_in_transaction_session_timeout", idle);
        // `options` appends to what the URL's `options=` already holds.
        pg.options(timeout.into_iter().chain([jit, isolation]).chain(idle))
    }

    /// What every MariaDB connection is told when it opens (sqlx's `after_connect`: one round
    /// trip per connection, none per transaction): the default isolation level and, when set,
    /// the statement timeout as `max_statement_time` (seconds). MariaDB has no startup
    /// parameters, and sqlx 0.9 sends no connection attributes, so there is no application name.
    pub fn mysql_session_sql(&self) -> String {
        let isolation = self.isolation_level.to_sea_orm();
        let mut sql = format!("SET SESSION TRANSACTION ISOLATION LEVEL {isolation}");
        if let Some(timeout) = self.statement_timeout {
            let seconds = timeout.as_secs_f64();
            sql.push_str(&format!("; SET SESSION max_statement_time = {seconds}"));
        }
        sql
    }

    /// The URL's options with TLS, statement cache and statement logging.
    #[cfg(feature = "mysql")]
    pub(crate) fn mysql_options(&self, my: &MySqlOptions) -> MySqlOptions {
        use crate::SslMode::*;
        let mut my = self
            .logged(my.clone())
            .statement_cache_capacity(self.statement_cache)
            .ssl_mode(match self.ssl_mode {
                Disable => MySqlSslMode::Disabled,
                Prefer => MySqlSslMode::Preferred,
                Require => MySqlSslMode::Required,
                VerifyCa => MySqlSslMode::VerifyCa,
                VerifyFull => MySqlSslMode::VerifyIdentity,
            });
        if let Some(path) = &self.ssl_root_cert {
            my = my.ssl_ca(path);
        }
        my
    }

    /// WAL lets readers run while one connection writes; the busy timeout makes a writer wait
    /// for the lock instead of failing at once; foreign keys are off in SQLite unless asked for.
    #[cfg(feature = "sqlite")]
    pub(crate) fn sqlite_options(&self, sqlite: &SqliteOptions) -> SqliteOptions {
        self.logged(sqlite.clone())
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true)
    }
}
#[cfg(all(test, feature = "postgres", feature = "mysql", feature = "sqlite"))]
mod tests {
    use sea_orm::sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};
    use sea_orm::sqlx::postgres::{PgConnectOptions, PgSslMode};
    use sea_orm::sqlx::{MySql, Postgres};

    use super::*;
    use crate::test_support::settings;

    const POSTGRES: &str = "postgres://app:s3cret@db:5432/inv";

    fn pool(pairs: &[(&str, &str)]) -> PoolOptions<Postgres> {
        settings(pairs).database.pool(None)
    }

    /// The driver's options for these settings, as `connect` builds them.
    fn pg(pairs: &[(&str, &str)]) -> PgConnectOptions {
        let db = settings(pairs).database;
        match &db.url.target {
            Target::Postgres(pg) => db.postgres_options(pg),
            _ => panic!("{pairs:?} is not a PostgreSQL URL"),
        }
    }

    fn mysql(pairs: &[(&str, &str)]) -> MySqlConnectOptions {
        let db = settings(pairs).database;
        match &db.url.target {
            Target::Mysql(my) => db.mysql_options(my),
            _ => panic!("{pairs:?} is not a MariaDB URL"),
        }
    }

    #[test]
    fn the_pool_bounds_and_timeouts_come_from_the_settings() {
        let pool = pool(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_POOL_SIZE", "3"),
            ("DB_MAX_OVERFLOW", "4"),
            ("DB_POOL_TIMEOUT", "5"),
            ("DB_POOL_RECYCLE", "6"),
            ("DB_IDLE_TIMEOUT", "7"),
            ("DB_CONNECT_TIMEOUT", "8"),
        ]);
        assert_eq!(pool.get_max_connections(), 7);
        assert_eq!(pool.get_min_connections(), 3);
        assert_eq!(pool.get_acquire_timeout(), Duration::from_secs(5));
        assert_eq!(pool.get_max_lifetime(), Some(Duration::from_secs(6)));
        assert_eq!(pool.get_idle_timeout(), Some(Duration::from_secs(7)));
        assert!(!pool.get_test_before_acquire(), "no ping on every checkout");
    }

    #[test]
    fn pre_ping_checks_only_connections_idle_for_a_second() {
        assert!(!needs_ping(true, Duration::from_millis(999)));
        assert!(needs_ping(true, Duration::from_secs(1)));
        assert!(!needs_ping(false, Duration::from_secs(60)));
        assert!(settings(&[]).database.pool_pre_ping);
        assert!(
            !settings(&[("DB_POOL_PRE_PING", "false")])
                .database
                .pool_pre_ping
        );
    }

    #[test]
    fn statements_are_logged_when_echoed_and_slow_ones_at_warn() {
        let quiet = format!("{:?}", pg(&[("DATABASE_URL", POSTGRES)]));
        assert!(quiet.contains("statements_level: Off"), "{quiet}");
        assert!(quiet.contains("slow_statements_level: Warn"), "{quiet}");
        assert!(quiet.contains("slow_statements_duration: 1s"), "{quiet}");

        let echo = pg(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_ECHO", "true"),
            ("DB_SLOW_STATEMENT_MS", "0"),
        ]);
        let echo = format!("{echo:?}");
        assert!(echo.contains("statements_level: Info"), "{echo}");
        assert!(
            echo.contains("slow_statements_level: Off"),
            "0 turns slow-statement logging off rather than warning on every statement: {echo}"
        );
    }

    #[test]
    fn the_statement_timeout_is_a_startup_parameter_only_when_not_zero() {
        let none = pg(&[("DATABASE_URL", POSTGRES)]);
        assert!(
            !none
                .get_options()
                .unwrap_or_default()
                .contains("statement_timeout")
        );
        let some = pg(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ]);
        assert!(
            some.get_options()
                .unwrap_or_default()
                .contains("-c statement_timeout=1500")
        );
    }

    #[test]
    fn serverless_mode_keeps_no_minimum() {
        let pool = pool(&[("DATABASE_URL", POSTGRES), ("DB_POOL_MODE", "serverless")]);
        assert_eq!(pool.get_min_connections(), 0);
        assert_eq!(pool.get_max_connections(), 30);
    }

    #[test]
    fn postgres_gets_startup_parameters_tls_cache_and_the_password() {
        let pg = pg(&[
            (
                "DATABASE_URL",
                "postgres://app:s3cret@db:5432/inv?options=-c%20work_mem%3D8MB",
            ),
            ("DB_JIT", "on"),
            ("DB_ISOLATION_LEVEL", "read_committed"),
            ("DB_STATEMENT_CACHE", "0"),
            ("DB_SSL_MODE", "verify-ca"),
            ("DB_SSL_ROOT_CERT", "/etc/ssl/ca.pem"),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ]);
        assert_eq!(
            pg.get_options(),
            Some(
                r"-c work_mem=8MB -c statement_timeout=1500 -c jit=on -c default_transaction_isolation=read\ committed -c idle_in_transaction_session_timeout=30000"
            ),
            "ours are appended to the URL's own options"
        );
        assert!(matches!(pg.get_ssl_mode(), PgSslMode::VerifyCa));
        let debug = format!("{pg:?}");
        assert!(debug.contains("statement_cache_capacity: 0"), "{debug}");
        assert!(debug.contains("ca.pem"), "{debug}");
        assert!(
            debug.contains("\"s3cret\""),
            "the password reaches the driver: {debug}"
        );
    }

    #[test]
    fn postgres_defaults_turn_jit_off_and_start_transactions_at_repeatable_read() {
        let on = pg(&[("DATABASE_URL", "postgres://app@db/inv")]);
        assert_eq!(
            on.get_options(),
            Some(
                r"-c jit=off -c default_transaction_isolation=repeatable\ read -c idle_in_transaction_session_timeout=30000"
            )
        );
        let off = pg(&[
            ("DATABASE_URL", "postgres://app@db/inv"),
            ("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", "0"),
        ]);
        assert!(
            !off.get_options()
                .unwrap_or_default()
                .contains("idle_in_transaction")
        );
        assert!(matches!(on.get_ssl_mode(), PgSslMode::Prefer));
        assert_eq!(on.get_application_name(), Some("inventory-api"));
    }

    #[test]
    fn mariadb_gets_the_password_tls_and_cache_from_the_settings() {
        let my = mysql(&[
            (
                "DATABASE_URL",
                "mariadb://app:s3cret@db:3306/inv?ssl-mode=REQUIRED",
            ),
            ("DB_STATEMENT_CACHE", "7"),
        ]);
        assert!(matches!(my.get_ssl_mode(), MySqlSslMode::Required));
        let debug = format!("{my:?}");
        assert!(debug.contains("statement_cache_capacity: 7"), "{debug}");
        assert!(
            debug.contains("\"s3cret\""),
            "the password reaches the driver: {debug}"
        );
        let pool: PoolOptions<MySql> = settings(&[("DATABASE_URL", "mysql://db/inv")])
            .database
            .pool(None);
        assert_eq!(pool.get_max_connections(), 30);
    }

    #[test]
    fn mariadb_sessions_get_the_isolation_level_and_max_statement_time_when_they_open() {
        let db = settings(&[("DATABASE_URL", "mysql://root@db/inv")]).database;
        assert_eq!(
            db.mysql_session_sql(),
            "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"
        );
        let db = settings(&[
            ("DATABASE_URL", "mysql://root@db/inv"),
            ("DB_ISOLATION_LEVEL", "read_committed"),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ])
        .database;
        assert_eq!(
            db.mysql_session_sql(),
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
             SET SESSION max_statement_time = 1.5"
        );
    }

    #[test]
    fn the_user_is_the_url_s_or_postgres_never_pguser_nor_the_os_user() {
        let cases = [
            ("postgres://db/inv", "postgres"),
            ("postgres://app@db/inv", "app"),
            ("postgres://db/inv?user=reporting", "reporting"),
        ];
        for (url, user) in cases {
            assert_eq!(pg(&[("DATABASE_URL", url)]).get_username(), user, "{url}");
        }
    }

    #[test]
    fn sqlite_uses_wal_a_busy_timeout_and_foreign_keys() {
        let db = settings(&[]).database;
        let Target::Sqlite(sqlite) = &db.url.target else {
            panic!("the default is an SQLite file")
        };
        let sqlite = format!("{:?}", db.sqlite_options(sqlite));
        assert!(
            sqlite.contains(r#""journal_mode": Some("WAL")"#),
            "{sqlite}"
        );
        assert!(sqlite.contains(r#""foreign_keys": Some("ON")"#), "{sqlite}");
        assert!(sqlite.contains("busy_timeout: 5s"), "{sqlite}");
        assert!(sqlite.contains("inventory.db"), "{sqlite}");
        assert_eq!(pool(&[]).get_max_connections(), 4);
    }

    #[test]
    fn an_in_memory_sqlite_connection_never_expires() {
        let pool = pool(&[("DATABASE_URL", "sqlite::memory:")]);
        assert_eq!(pool.get_max_connections(), 1);
        assert_eq!(pool.get_idle_timeout(), None);
        assert_eq!(pool.get_max_lifetime(), None);
    }

    #[test]
    fn behind_a_pooler_no_startup_parameter_but_the_application_name_is_sent() {
        let pg = pg(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_POOLER", "transaction"),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ]);
        assert_eq!(pg.get_options(), None, "PgBouncer refuses `options`");
        assert_eq!(pg.get_application_name(), Some("inventory-api"));
        let debug = format!("{pg:?}");
        assert!(debug.contains("extra_float_digits: None"), "{debug}");
        assert!(debug.contains("statement_cache_capacity: 0"), "{debug}");
    }
}
