//! `DatabaseSettings::connect_options`: the one place where the settings become SeaORM's
//! `ConnectOptions` (pool bounds and timeouts, pre-ping, statement logging) and sqlx's
//! per-backend options (Postgres startup parameters, TLS and statement cache; MariaDB's session
//! settings, TLS and statement cache; SQLite journal mode, busy timeout and foreign keys). The
//! URL handed to SeaORM never carries the password: it is set on sqlx's `PgConnectOptions` /
//! `MySqlConnectOptions` directly, so no `Debug` of the options and no SeaORM error message
//! (which quote the URL) can reveal it.

use std::time::Duration;

use log::LevelFilter;
use sea_orm::ConnectOptions;
#[cfg(feature = "mysql")]
use sea_orm::sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};
#[cfg(feature = "postgres")]
use sea_orm::sqlx::postgres::{PgConnectOptions, PgSslMode};
#[cfg(feature = "sqlite")]
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
#[cfg(feature = "mysql")]
use sea_orm::sqlx::{AssertSqlSafe, Executor as _};
#[cfg(any(feature = "postgres", feature = "mysql"))]
use secrecy::ExposeSecret;

#[cfg(any(feature = "postgres", feature = "mysql"))]
use crate::database::PoolMode;
#[cfg(feature = "postgres")]
use crate::database::Pooler;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use crate::database::SslMode;
use crate::database::{Backend, DatabaseSettings};

/// A connection used less than this long ago is handed out without a ping (see
/// `connect_options`).
const PRE_PING_IDLE: Duration = Duration::from_secs(1);

/// How long an SQLite statement waits for another connection's write lock before failing.
#[cfg(feature = "sqlite")]
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl DatabaseSettings {
    /// SeaORM's connect options for these settings.
    ///
    /// `DB_CONNECT_TIMEOUT` is not among them: SeaORM's `connect_timeout` is sqlx's acquire
    /// timeout under another name (it would be overridden by `pool_timeout`), and sqlx 0.9's
    /// `PgConnectOptions` has no connect timeout of its own. The caller bounds each start-up
    /// attempt with [`DatabaseSettings::connect_timeout`].
    pub fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new(self.url.without_password());
        options
            .max_connections(self.max_connections())
            .min_connections(self.min_connections())
            .acquire_timeout(self.pool_timeout)
            .max_lifetime(self.pool_recycle)
            .idle_timeout(self.idle_timeout)
            .sqlx_logging(true)
            .sqlx_logging_level(if self.echo {
                LevelFilter::Info
            } else {
                LevelFilter::Off
            })
            .sqlx_slow_statements_logging_settings(
                if self.slow_statement.is_zero() {
                    LevelFilter::Off
                } else {
                    LevelFilter::Warn
                },
                self.slow_statement,
            );
        if self.pool_pre_ping {
            // Ping only connections idle for a second or more. A connection released a moment
            // ago is almost certainly alive, and pinging it would add one round trip to every
            // checkout under load; the connections worth checking are those that sat idle long
            // enough for a server restart, a proxy or a firewall to have dropped them.
            options.test_before_acquire_if_idle_for(PRE_PING_IDLE);
        } else {
            options.test_before_acquire(false);
        }
        // A backend left out of the build never gets here: its URL is refused when parsed.
        match self.backend() {
            #[cfg(feature = "postgres")]
            Backend::Postgres => self.apply_postgres(&mut options),
            #[cfg(feature = "mysql")]
            Backend::Mysql => self.apply_mysql(&mut options),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite => self.apply_sqlite(&mut options),
            #[allow(unreachable_patterns)]
            _ => {}
        }
        options
    }

    #[cfg(feature = "postgres")]
    fn apply_postgres(&self, options: &mut ConnectOptions) {
        options.set_application_name(self.application_name.clone());
        if self.pooler == Pooler::Transaction {
            // No startup `options` behind the pooler (PgBouncer refuses them): the app applies
            // the statement timeout inside each transaction.
        } else if let Some(timeout) = self.statement_timeout {
            // Sent as a startup parameter (`-c statement_timeout=…`), no extra round trip.
            options.statement_timeout(timeout);
        }
        options.map_sqlx_postgres_opts(self.postgres_options());
        if self.pool_mode == PoolMode::Serverless {
            // Close every connection when it is released, so none sits idle between requests
            // (min_connections is 0 as well).
            options.map_sqlx_postgres_pool_opts(|pool| {
                pool.after_release(|_connection, _metadata| Box::pin(async { Ok(false) }))
            });
        }
    }

    #[cfg(feature = "postgres")]
    /// The last word on sqlx's `PgConnectOptions`, applied after SeaORM has parsed the URL and
    /// set the application name and statement timeout.
    fn postgres_options(
        &self,
    ) -> impl Fn(PgConnectOptions) -> PgConnectOptions + Send + Sync + use<> {
        let password = self.url.password().cloned();
        let jit = if self.jit { "on" } else { "off" };
        let isolation = self.isolation_level.as_sql();
        let statement_cache = self.statement_cache;
        let ssl_mode = pg_ssl_mode(self.ssl_mode);
        let ssl_root_cert = self.ssl_root_cert.clone();
        let pooled = self.pooler == Pooler::Transaction;
        // Explicit, so that neither `PGUSER` nor the operating system's user name decides it
        // (`Settings::load` removes libpq's variables; this covers the rest).
        let user = self.url.server_parts().map(|parts| parts.user);
        move |pg| {
            let mut pg = pg
                .statement_cache_capacity(statement_cache)
                .ssl_mode(ssl_mode);
            if let Some(user) = &user {
                pg = pg.username(user);
            }
            if pooled {
                // A transaction-mode pooler forwards no startup parameter but a few it knows
                // (PgBouncer 1.18 refuses `options` and sqlx's `extra_float_digits` unless told
                // to ignore them, and then drops them): the settings go into every
                // transaction instead (the app's `transaction/session.rs`).
                pg = pg.extra_float_digits(None);
            } else {
                // Startup parameters: applied by the server at connect time, no extra round
                // trip. `options` appends to what is there (SeaORM's `statement_timeout`, a
                // URL's `options=`), it does not replace it. With the default isolation set
                // here, a plain `BEGIN` already runs at the configured level.
                pg = pg.options([("jit", jit), ("default_transaction_isolation", isolation)]);
            }
            if let Some(password) = &password {
                pg = pg.password(password.expose_secret());
            }
            if let Some(path) = &ssl_root_cert {
                pg = pg.ssl_root_cert(path);
            }
            pg
        }
    }

    #[cfg(feature = "mysql")]
    /// MariaDB has no startup parameters: the session settings are one `SET` statement sent
    /// when a connection is opened (sqlx's pool `after_connect`: one round trip per physical
    /// connection, none per transaction). `application_name` has no MariaDB twin that other sessions can
    /// see: sqlx 0.9 sends no connection attributes (`performance_schema.session_connect_attrs`
    /// stays empty), and a user variable is visible to its own session only, so it is not sent.
    fn apply_mysql(&self, options: &mut ConnectOptions) {
        options.map_sqlx_mysql_opts(self.mysql_options());
        let session = self.mysql_session_sql();
        let serverless = self.pool_mode == PoolMode::Serverless;
        options.map_sqlx_mysql_pool_opts(move |pool| {
            let session = session.clone();
            let pool = pool.after_connect(move |connection, _metadata| {
                let session = session.clone();
                Box::pin(async move {
                    connection.execute(AssertSqlSafe(session)).await?;
                    Ok(())
                })
            });
            if serverless {
                pool.after_release(|_connection, _metadata| Box::pin(async { Ok(false) }))
            } else {
                pool
            }
        });
    }

    /// What every MariaDB connection is told when it opens: the default isolation level (so a
    /// plain `START TRANSACTION` runs at `DB_ISOLATION_LEVEL`) and, when set, the statement
    /// timeout as `max_statement_time` (seconds, fractional; MariaDB's twin of Postgres'
    /// `statement_timeout`). `SET SESSION TRANSACTION ISOLATION LEVEL` rather than the
    /// variable, whose name differs between versions (`tx_isolation` before MariaDB 11.1).
    pub fn mysql_session_sql(&self) -> String {
        let mut sql = format!(
            "SET SESSION TRANSACTION ISOLATION LEVEL {}",
            self.isolation_level.as_sql().to_ascii_uppercase()
        );
        if let Some(timeout) = self.statement_timeout {
            sql.push_str(&format!(
                "; SET SESSION max_statement_time = {}",
                timeout.as_secs_f64()
            ));
        }
        sql
    }

    #[cfg(feature = "mysql")]
    /// The last word on sqlx's `MySqlConnectOptions`: password, TLS and statement cache.
    fn mysql_options(
        &self,
    ) -> impl Fn(MySqlConnectOptions) -> MySqlConnectOptions + Send + Sync + use<> {
        let password = self.url.password().cloned();
        let statement_cache = self.statement_cache;
        let ssl_mode = mysql_ssl_mode(self.ssl_mode);
        let ssl_root_cert = self.ssl_root_cert.clone();
        move |my| {
            let mut my = my
                .statement_cache_capacity(statement_cache)
                .ssl_mode(ssl_mode);
            if let Some(password) = &password {
                my = my.password(password.expose_secret());
            }
            if let Some(path) = &ssl_root_cert {
                my = my.ssl_ca(path);
            }
            my
        }
    }

    #[cfg(feature = "sqlite")]
    fn apply_sqlite(&self, options: &mut ConnectOptions) {
        options.map_sqlx_sqlite_opts(sqlite_options);
        if self.url.is_in_memory() {
            // An in-memory database vanishes with its last connection: never expire it.
            options.idle_timeout(None).max_lifetime(None);
        }
    }
}

#[cfg(feature = "sqlite")]
/// WAL lets readers run while one connection writes; the busy timeout makes a writer wait for
/// the lock instead of failing at once; foreign keys are off in SQLite unless asked for.
fn sqlite_options(sqlite: SqliteConnectOptions) -> SqliteConnectOptions {
    sqlite
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true)
}

#[cfg(feature = "postgres")]
fn pg_ssl_mode(mode: SslMode) -> PgSslMode {
    match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    }
}

#[cfg(feature = "mysql")]
fn mysql_ssl_mode(mode: SslMode) -> MySqlSslMode {
    match mode {
        SslMode::Disable => MySqlSslMode::Disabled,
        SslMode::Prefer => MySqlSslMode::Preferred,
        SslMode::Require => MySqlSslMode::Required,
        SslMode::VerifyCa => MySqlSslMode::VerifyCa,
        SslMode::VerifyFull => MySqlSslMode::VerifyIdentity,
    }
}

#[cfg(all(test, feature = "postgres", feature = "mysql", feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::test_support::settings;

    const POSTGRES: &str = "postgres://app:s3cret@db:5432/inv";

    fn options(pairs: &[(&str, &str)]) -> ConnectOptions {
        settings(pairs).database.connect_options()
    }

    #[test]
    fn the_pool_bounds_and_timeouts_come_from_the_settings() {
        let options = options(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_POOL_SIZE", "3"),
            ("DB_MAX_OVERFLOW", "4"),
            ("DB_POOL_TIMEOUT", "5"),
            ("DB_POOL_RECYCLE", "6"),
            ("DB_IDLE_TIMEOUT", "7"),
            ("DB_CONNECT_TIMEOUT", "8"),
        ]);
        assert_eq!(options.get_max_connections(), Some(7));
        assert_eq!(options.get_min_connections(), Some(3));
        assert_eq!(options.get_acquire_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(
            options.get_max_lifetime(),
            Some(Some(Duration::from_secs(6)))
        );
        assert_eq!(
            options.get_idle_timeout(),
            Some(Some(Duration::from_secs(7)))
        );
        assert_eq!(
            options.get_connect_timeout(),
            None,
            "SeaORM's connect_timeout is the acquire timeout; the caller bounds each attempt"
        );
    }

    #[test]
    fn the_url_given_to_sea_orm_carries_no_password() {
        let options = options(&[("DATABASE_URL", POSTGRES)]);
        assert_eq!(options.get_url(), "postgres://app@db:5432/inv");
        assert!(!format!("{options:?}").contains("s3cret"));

        let options = settings(&[("DB_HOST", "db"), ("DB_PASSWORD", "p@ss:w/rd%")])
            .database
            .connect_options();
        assert_eq!(options.get_url(), "postgres://postgres@db:5432/postgres");
        assert!(!format!("{options:?}").contains("p@ss"));
    }

    #[test]
    fn pre_ping_checks_only_connections_idle_for_a_second() {
        let on = options(&[("DATABASE_URL", POSTGRES)]);
        assert_eq!(
            on.get_test_before_acquire_if_idle_for(),
            Some(Duration::from_secs(1))
        );
        assert!(!on.get_test_before_acquire(), "no ping on every checkout");

        let off = options(&[("DATABASE_URL", POSTGRES), ("DB_POOL_PRE_PING", "false")]);
        assert_eq!(off.get_test_before_acquire_if_idle_for(), None);
        assert!(!off.get_test_before_acquire());
    }

    #[test]
    fn statements_are_logged_when_echoed_and_slow_ones_at_warn() {
        let quiet = options(&[]);
        assert!(quiet.get_sqlx_logging());
        assert_eq!(quiet.get_sqlx_logging_level(), LevelFilter::Off);
        assert_eq!(
            quiet.get_sqlx_slow_statements_logging_settings(),
            (LevelFilter::Warn, Duration::from_secs(1))
        );

        let echo = options(&[("DB_ECHO", "true"), ("DB_SLOW_STATEMENT_MS", "0")]);
        assert_eq!(echo.get_sqlx_logging_level(), LevelFilter::Info);
        assert_eq!(
            echo.get_sqlx_slow_statements_logging_settings().0,
            LevelFilter::Off,
            "0 turns slow-statement logging off rather than warning on every statement"
        );
    }

    #[test]
    fn the_statement_timeout_is_set_only_when_not_zero() {
        let none = options(&[("DATABASE_URL", POSTGRES)]);
        assert_eq!(none.get_statement_timeout(), None);
        let some = options(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ]);
        assert_eq!(
            some.get_statement_timeout(),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn serverless_mode_keeps_no_minimum() {
        let options = options(&[("DATABASE_URL", POSTGRES), ("DB_POOL_MODE", "serverless")]);
        assert_eq!(options.get_min_connections(), Some(0));
        assert_eq!(options.get_max_connections(), Some(30));
    }

    #[test]
    fn postgres_gets_startup_parameters_tls_cache_and_the_password() {
        let db = settings(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_JIT", "on"),
            ("DB_ISOLATION_LEVEL", "read_committed"),
            ("DB_STATEMENT_CACHE", "0"),
            ("DB_SSL_MODE", "verify-ca"),
            ("DB_SSL_ROOT_CERT", "/etc/ssl/ca.pem"),
        ])
        .database;
        let map = db.postgres_options();
        // What SeaORM has done before calling us when DB_STATEMENT_TIMEOUT_MS is set.
        let before = PgConnectOptions::new_without_pgpass()
            .password("from-pgpassword")
            .options([("statement_timeout", "1500")]);
        let pg = map(before);
        assert_eq!(
            pg.get_options(),
            Some(
                r"-c statement_timeout=1500 -c jit=on -c default_transaction_isolation=read\ committed"
            ),
            "our options are appended to SeaORM's statement_timeout"
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
        let db = settings(&[("DATABASE_URL", "postgres://app@db/inv")]).database;
        let pg = db.postgres_options()(PgConnectOptions::new_without_pgpass());
        assert_eq!(
            pg.get_options(),
            Some(r"-c jit=off -c default_transaction_isolation=repeatable\ read")
        );
        assert!(matches!(pg.get_ssl_mode(), PgSslMode::Prefer));
    }

    #[test]
    fn mariadb_gets_the_password_tls_and_cache_from_the_settings_and_not_in_the_url() {
        let db = settings(&[
            (
                "DATABASE_URL",
                "mariadb://app:s3cret@db:3306/inv?ssl-mode=REQUIRED",
            ),
            ("DB_STATEMENT_CACHE", "7"),
        ])
        .database;
        let options = db.connect_options();
        assert_eq!(
            options.get_url(),
            "mysql://app@db:3306/inv?ssl-mode=REQUIRED"
        );
        assert!(!format!("{options:?}").contains("s3cret"));
        let my = db.mysql_options()(MySqlConnectOptions::new());
        assert!(matches!(my.get_ssl_mode(), MySqlSslMode::Required));
        let debug = format!("{my:?}");
        assert!(debug.contains("statement_cache_capacity: 7"), "{debug}");
        assert!(
            debug.contains("\"s3cret\""),
            "the password reaches the driver: {debug}"
        );
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
            let db = settings(&[("DATABASE_URL", url)]).database;
            // What sqlx starts from when PGUSER is set (or the OS user's name when it is not).
            let before = PgConnectOptions::new_without_pgpass().username("from-pguser");
            let pg = db.postgres_options()(before);
            assert_eq!(pg.get_username(), user, "{url}");
        }
    }

    #[test]
    fn sqlite_uses_wal_a_busy_timeout_and_foreign_keys() {
        let sqlite = format!("{:?}", sqlite_options(SqliteConnectOptions::new()));
        assert!(
            sqlite.contains(r#""journal_mode": Some("WAL")"#),
            "{sqlite}"
        );
        assert!(sqlite.contains(r#""foreign_keys": Some("ON")"#), "{sqlite}");
        assert!(sqlite.contains("busy_timeout: 5s"), "{sqlite}");

        let options = options(&[]);
        assert_eq!(
            options.get_url(),
            crate::test_support::DEFAULTS.database_url
        );
        assert_eq!(options.get_max_connections(), Some(4));
    }

    #[test]
    fn an_in_memory_sqlite_connection_never_expires() {
        let options = options(&[("DATABASE_URL", "sqlite::memory:")]);
        assert_eq!(options.get_max_connections(), Some(1));
        assert_eq!(options.get_idle_timeout(), Some(None));
        assert_eq!(options.get_max_lifetime(), Some(None));
    }

    #[test]
    fn behind_a_pooler_no_startup_parameter_but_the_application_name_is_sent() {
        let options = options(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_POOLER", "transaction"),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ]);
        assert_eq!(options.get_statement_timeout(), None);
        let db = settings(&[
            ("DATABASE_URL", POSTGRES),
            ("DB_POOLER", "transaction"),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ])
        .database;
        let pg = db.postgres_options()(
            PgConnectOptions::new_without_pgpass().application_name("inventory-api"),
        );
        assert_eq!(pg.get_options(), None, "PgBouncer refuses `options`");
        assert_eq!(pg.get_application_name(), Some("inventory-api"));
        let debug = format!("{pg:?}");
        assert!(debug.contains("extra_float_digits: None"), "{debug}");
        assert!(debug.contains("statement_cache_capacity: 0"), "{debug}");
    }
}
