//! Typed, validated settings for a service built on `sea-orm-actix-tx`, read from the environment (and a `.env`
//! file) as described in `docs/configuration.md`. This crate is the only place that reads the
//! environment: [`Settings::load`] at start-up, [`Settings::from_vars`] in tests. Every variable
//! is declared once (`variables.rs`), and its parsing, its error, its line in
//! [`Settings::report`] and its row in the documentation come from that declaration. A bad value
//! stops start-up with one line naming the variable, its value (never a password) and what is
//! allowed; the rest of the service only ever sees valid settings, and gets the driver's pool
//! from [`DatabaseSettings::connect`].

mod connect;
mod database;
mod error;
#[cfg(test)]
mod reference_doc;
#[cfg(test)]
mod test_support;
mod url;
mod variables;

pub use database::*;
pub use error::ConfigError;
pub use url::DatabaseUrl;
pub use variables::{DatabaseSettings, LogSettings, ServerSettings, env_example, reference_table};

use variables::{Env, VARIABLES};

/// What a service sets for itself: the settings when their variables are unset. A library has
/// no business naming a service, so these come from the service (its binary's `main`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// `DB_APPLICATION_NAME` when unset: the name PostgreSQL shows in `pg_stat_activity`.
    pub application_name: &'static str,
    /// `DATABASE_URL` when neither it nor `DB_HOST` is set: usually an embedded SQLite file,
    /// migrated at start-up unless `DB_AUTO_MIGRATE` says otherwise.
    pub database_url: &'static str,
}

impl Default for Defaults {
    /// A service that sets nothing: `sea-orm-actix-tx` as the application name, an SQLite file
    /// `app.db` in the working directory.
    fn default() -> Defaults {
        Defaults {
            application_name: "sea-orm-actix-tx",
            database_url: "sqlite://app.db?mode=rwc",
        }
    }
}

/// Every setting of the service. `Debug` shows the password as `***`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `DATABASE_URL` and the `DB_*` variables.
    pub database: DatabaseSettings,
    /// The `APP_*` variables.
    pub server: ServerSettings,
    /// `LOG_FORMAT`.
    pub log: LogSettings,
}

/// libpq's environment variables, from which sqlx 0.9 fills what a URL leaves out.
/// `PGPASSFILE` is not among them: it names a file, where a password may come from when none
/// is configured.
const LIBPQ_VARIABLES: &str = "PGHOST PGHOSTADDR PGPORT PGUSER PGPASSWORD PGDATABASE PGSSLMODE \
     PGSSLROOTCERT PGSSLCERT PGSSLKEY PGAPPNAME PGOPTIONS";

/// `DB_POOLER` alone, after reading `./.env` like [`Settings::load`]: for tools that must refuse
/// to run through a transaction-mode pooler whatever else the environment holds (the
/// `migration` crate's CLI, run by `sea-orm-cli migrate`).
///
/// # Errors
/// [`ConfigError`] when `.env` cannot be read or `DB_POOLER` is invalid.
pub fn pooler_from_env() -> Result<Pooler, ConfigError> {
    load_dotenv()?;
    Env::new(process_vars()?, Defaults::default())?.parse(&variables::DB_POOLER)
}

impl Settings {
    /// Reads `./.env` if present into the process environment (as `dotenvy` does: variables
    /// already set win), removes libpq's `PG*` variables from it (docs/configuration.md: the
    /// driver would otherwise fill unset parts of the URL from them, behind the settings'
    /// back), then reads the settings with the service's own [`Defaults`]. Call it at start-up,
    /// before other threads read or write the environment.
    ///
    /// # Errors
    /// [`ConfigError`] when `.env` exists but cannot be read, or a variable is invalid.
    #[allow(unsafe_code)] // the workspace denies unsafe code; this is its one exception
    pub fn load(defaults: &Defaults) -> Result<Settings, ConfigError> {
        load_dotenv()?;
        for name in LIBPQ_VARIABLES.split_whitespace() {
            // SAFETY: called at start-up before the process starts other threads (this
            // function's documented contract, as for `dotenvy`, which sets variables the same
            // way), so no other thread reads the environment meanwhile.
            unsafe { std::env::remove_var(name) };
        }
        Settings::from_vars(process_vars()?, defaults)
    }

    /// Reads the settings from explicit `(name, value)` pairs, with the service's own
    /// [`Defaults`]; what tests use. Unrelated variables are ignored, an empty value counts as
    /// unset, and of a repeated name the last wins.
    ///
    /// # Errors
    /// [`ConfigError`] for the first invalid variable, in the order of `docs/configuration.md`'s
    /// table.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
        defaults: &Defaults,
    ) -> Result<Settings, ConfigError> {
        let mut env = Env::new(vars, *defaults)?;
        env.url = Some(env.url(&variables::DATABASE_URL)?);
        Ok(Settings {
            database: DatabaseSettings::read(&env)?.checked(&env)?,
            server: ServerSettings::read(&env)?,
            log: LogSettings::read(&env)?,
        })
    }

    /// The effective settings as `NAME=value` lines, one per variable of `docs/configuration.md`
    /// in the table's order, the password shown as `***`. The `DB_HOST`…`DB_NAME` lines show
    /// the parts of the effective PostgreSQL or MariaDB URL as the driver will use them (empty
    /// for SQLite); unset optional values are empty. For `app check-config`.
    pub fn report(&self) -> String {
        let line = |var: &variables::Var| format!("{}={}\n", var.name, (var.shown)(self));
        VARIABLES.iter().map(line).collect()
    }
}

/// The process environment's variables of ours (others, which may not be UTF-8, are never
/// read); one of ours that is not UTF-8 is an error naming it, without its value.
fn process_vars() -> Result<Vec<(String, String)>, ConfigError> {
    let read = |name: &'static str| match std::env::var(name) {
        Ok(value) => Some(Ok((name.to_owned(), value))),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => Some(Err(ConfigError::Unreadable(format!(
            "the environment: {name} is not valid UTF-8"
        )))),
    };
    VARIABLES.iter().filter_map(|var| read(var.name)).collect()
}

/// Loads `./.env` into the process environment without overriding variables already set. A
/// missing file is fine. Parse errors do not quote the line: it may hold a password.
fn load_dotenv() -> Result<(), ConfigError> {
    let why = match dotenvy::from_path(".env") {
        Ok(()) => return Ok(()),
        Err(err) if err.not_found() => return Ok(()),
        Err(dotenvy::Error::Io(err)) => err.to_string(),
        Err(dotenvy::Error::LineParse(..)) => {
            "a line is not in NAME=value form (not shown, it may contain a password)".to_owned()
        }
        Err(_) => "a substituted variable could not be read".to_owned(),
    };
    Err(ConfigError::Unreadable(format!(".env: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{error, settings, vars};

    const SECRET: &str = "s3cret-p@ss";

    #[test]
    fn the_report_lists_every_variable_in_table_order() {
        let report = settings(&[("APP_WORKERS", "2")]).report();
        let expected = "\
DATABASE_URL=sqlite://inventory.db?mode=rwc
DB_HOST=
DB_PORT=
DB_USER=
DB_PASSWORD=
DB_NAME=
DB_POOL_SIZE=10
DB_MAX_OVERFLOW=20
DB_POOL_TIMEOUT=30
DB_POOL_RECYCLE=3600
DB_POOL_PRE_PING=true
DB_IDLE_TIMEOUT=600
DB_CONNECT_TIMEOUT=10
DB_POOL_MODE=queue
DB_ISOLATION_LEVEL=repeatable_read
DB_APPLICATION_NAME=inventory-api
DB_STATEMENT_TIMEOUT_MS=0
DB_JIT=false
DB_STATEMENT_CACHE=100
DB_SSL_MODE=prefer
DB_SSL_ROOT_CERT=
DB_ECHO=false
DB_SLOW_STATEMENT_MS=1000
DB_CONNECT_RETRIES=5
DB_CONNECT_RETRY_DELAY_MS=2000
DB_AUTO_MIGRATE=true
DB_TX_MAX_RETRIES=3
DB_POOLER=none
DATABASE_REPLICA_URL=
DB_REPLICA_MAX_WAIT_MS=100
DB_IDEMPOTENCY_TTL=86400
DB_LEAK_DETECTION_MS=10000
DB_IDLE_IN_TRANSACTION_TIMEOUT_MS=30000
DB_FAILOVER_RETRY_MS=5000
APP_HOST=127.0.0.1
APP_PORT=8080
APP_WORKERS=2
APP_BODY_LIMIT=65536
APP_SHUTDOWN_TIMEOUT=30
LOG_FORMAT=pretty
";
        assert_eq!(report, expected);
        let names: Vec<&str> = report
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            VARIABLES.iter().map(|v| v.name).collect::<Vec<_>>(),
            "one line per variable, in table order"
        );
    }

    #[test]
    fn the_report_shows_the_parts_of_a_postgres_url_and_hides_the_password() {
        let all = settings(&[
            ("DB_HOST", "db.internal"),
            ("DB_USER", "inventory"),
            ("DB_PASSWORD", SECRET),
            ("DB_NAME", "stock"),
        ]);
        let report = all.report();
        assert!(!report.contains("s3cret"), "{report}");
        for line in [
            "DATABASE_URL=postgres://inventory:***@db.internal:5432/stock",
            "DB_HOST=db.internal",
            "DB_PORT=5432",
            "DB_USER=inventory",
            "DB_PASSWORD=***",
            "DB_NAME=stock",
            "DB_AUTO_MIGRATE=false",
        ] {
            assert!(
                report.lines().any(|l| l == line),
                "{line} missing from:\n{report}"
            );
        }
    }

    #[test]
    fn the_report_fills_what_a_postgres_url_leaves_out_as_the_driver_will() {
        let report = settings(&[("DATABASE_URL", "postgres://db.internal")]).report();
        for line in [
            "DB_HOST=db.internal",
            "DB_PORT=5432",
            "DB_USER=postgres",
            "DB_NAME=postgres",
        ] {
            assert!(
                report.lines().any(|l| l == line),
                "{line} missing from:\n{report}"
            );
        }
        let report = settings(&[("DATABASE_URL", "postgres://app@db.internal")]).report();
        assert!(report.lines().any(|l| l == "DB_NAME=app"), "{report}");
    }

    #[test]
    fn the_password_never_appears_in_debug_or_the_report() {
        let encoded = "s3cret-p%40ss";
        let cases: &[&[(&str, &str)]] = &[
            &[("DATABASE_URL", "postgres://app:s3cret-p%40ss@db/inv")],
            &[(
                "DATABASE_URL",
                "postgresql://app@db/inv?password=s3cret-p%40ss",
            )],
            &[("DB_HOST", "db"), ("DB_PASSWORD", SECRET)],
        ];
        for pairs in cases {
            let all = settings(pairs);
            assert_eq!(all.database.url.password().as_deref(), Some(SECRET));
            for shown in [
                format!("{all:?}"),
                format!("{all:#?}"),
                all.report(),
                all.database.url.to_string(),
                all.database.url.describe(),
                format!("{:?}", all.database.url),
            ] {
                assert!(!shown.contains("s3cret"), "{pairs:?}: {shown}");
                assert!(!shown.contains(encoded), "{pairs:?}: {shown}");
            }
        }
    }

    #[test]
    fn no_error_message_repeats_the_password() {
        let cases: &[&[(&str, &str)]] = &[
            &[
                ("DB_HOST", "db"),
                ("DB_PASSWORD", SECRET),
                ("DB_POOL_SIZE", "0"),
            ],
            &[("DB_HOST", "bad host"), ("DB_PASSWORD", SECRET)],
            &[("DATABASE_URL", "postgres://app:s3cret-p%40ss@db:70000/inv")],
            &[(
                "DATABASE_URL",
                "postgres://app:s3cret-p%40ss@db/inv?sslmode=nope",
            )],
            &[("DATABASE_URL", "redis://app:s3cret-p%40ss@cache/0")],
        ];
        for pairs in cases {
            let err = error(pairs);
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("s3cret"), "{pairs:?}: {shown}");
        }
    }

    #[test]
    fn the_report_read_back_gives_the_same_settings() {
        let original = settings(&[
            ("DATABASE_URL", "postgres://app@db:6543/inv?sslmode=require"),
            ("DB_POOL_SIZE", "4"),
            ("DB_STATEMENT_TIMEOUT_MS", "2000"),
            ("DB_SSL_ROOT_CERT", "/ca.pem"),
            ("APP_PORT", "0"),
            ("LOG_FORMAT", "json"),
        ]);
        let pairs: Vec<(String, String)> = original
            .report()
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let again =
            Settings::from_vars(pairs, &Defaults::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.report(), original.report());
    }

    #[test]
    fn unrelated_variables_are_ignored() {
        let all = Settings::from_vars(
            vars(&[
                ("HOME", "/root"),
                ("PGPASSWORD", "whatever"),
                ("DB_POOL", "not ours"),
            ]),
            &Defaults::default(),
        );
        assert!(all.is_ok());
    }

    #[test]
    fn every_error_message_is_one_line() {
        let err = error(&[("DB_POOL_SIZE", "1\n2")]);
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn env_example_documents_every_variable_and_sets_none() {
        let example = include_str!("../../.env.example");
        let set: Vec<&str> = example
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert!(
            set.is_empty(),
            "copied to .env, these lines would override the defaults and the URL: {set:?}"
        );
        for name in VARIABLES.iter().map(|v| v.name).collect::<Vec<_>>() {
            assert!(
                example
                    .lines()
                    .any(|l| l.starts_with(&format!("# {name}="))),
                "{name} is not documented in .env.example"
            );
        }
        // Uncommented, every documented value is the default: the example cannot drift.
        let uncommented: Vec<(String, String)> = example
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter_map(|l| l.split_once('='))
            .filter(|(name, _)| {
                VARIABLES
                    .iter()
                    .map(|v| v.name)
                    .collect::<Vec<_>>()
                    .contains(name)
            })
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let from_example = Settings::from_vars(uncommented, &Defaults::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let defaults = settings(&[]);
        let workers = |r: String| {
            r.lines()
                .filter(|l| !l.starts_with("APP_WORKERS="))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(workers(from_example.report()), workers(defaults.report()));
    }

    #[test]
    fn an_empty_environment_gives_the_documented_defaults() {
        let all = settings(&[]);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(all.server.host, "127.0.0.1");
        assert_eq!(all.server.port, 8080);
        assert_eq!(all.server.workers, cpus.clamp(1, 1024));
        assert_eq!(all.server.body_limit, 65_536);
        assert_eq!(
            all.server.shutdown_timeout,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(all.log.format, LogFormat::Pretty);
    }

    #[test]
    fn every_server_and_log_variable_is_read() {
        let all = settings(&[
            ("APP_HOST", "0.0.0.0"),
            ("APP_PORT", "0"),
            ("APP_WORKERS", "3"),
            ("APP_BODY_LIMIT", "1073741824"),
            ("APP_SHUTDOWN_TIMEOUT", "5"),
            ("LOG_FORMAT", "JSON"),
        ]);
        assert_eq!(all.server.host, "0.0.0.0");
        assert_eq!(all.server.port, 0, "0 asks the OS for a free port");
        assert_eq!(all.server.workers, 3);
        assert_eq!(all.server.body_limit, 1 << 30);
        assert_eq!(
            all.server.shutdown_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(all.log.format, LogFormat::Json);
        assert_eq!(LogFormat::Json.to_string(), "json");
    }

    #[test]
    fn each_bad_value_is_named_shown_and_explained() {
        let cases = [
            (
                "APP_HOST",
                "local host",
                "expected a host name or an IP address",
                "a space",
            ),
            (
                "APP_PORT",
                "65536",
                "from 0 to 65535",
                "beyond the port range",
            ),
            ("APP_PORT", "http", "from 0 to 65535", "a service name"),
            ("APP_WORKERS", "0", "from 1 to 1024", "no worker"),
            ("APP_WORKERS", "1025", "from 1 to 1024", "too many"),
            (
                "APP_BODY_LIMIT",
                "0",
                "from 1 to 1073741824",
                "no body at all",
            ),
            (
                "APP_BODY_LIMIT",
                "1073741825",
                "from 1 to 1073741824",
                "over 1 GiB",
            ),
            ("APP_BODY_LIMIT", "64k", "from 1 to 1073741824", "units"),
            (
                "APP_SHUTDOWN_TIMEOUT",
                "0",
                "from 1 to 86400",
                "no grace period",
            ),
            (
                "LOG_FORMAT",
                "xml",
                "expected one of pretty, json",
                "unknown format",
            ),
        ];
        for (variable, value, expected, reason) in cases {
            let shown = error(&[(variable, value)]).to_string();
            assert!(
                shown.starts_with(&format!("invalid {variable}={value:?}: ")),
                "{reason}: {shown}"
            );
            assert!(shown.contains(expected), "{reason}: {shown}");
        }
    }
}
