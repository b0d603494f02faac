//! Every environment variable, declared once: its name, default, what it accepts, how
//! `check-config` shows its effective value and what it means. From this table come the parsing
//! ([`Env`]: the default when unset, the range or words checked, the error naming the
//! variable), [`crate::Settings::report`], and the two documents a user reads: the variable
//! table of `docs/configuration.md` and `.env.example` ([`reference_table`], [`env_example`],
//! written by `cargo run -p app --example config_reference`). Adding a variable is one row here
//! and one field where it is used.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use crate::{ConfigError, Defaults, Settings};

/// What a variable is when unset.
#[derive(Clone, Copy)]
pub(crate) enum Fallback {
    /// This value, parsed like a given one.
    Value(&'static str),
    /// No value.
    Unset,
    /// The service's own ([`Defaults`]).
    Service(fn(&Defaults) -> &'static str),
    /// Worked out from other settings, as the text says; `.env.example` shows the second value
    /// (what the service's default database gets, or nothing where it depends on the machine).
    Computed(&'static str, &'static str),
}

/// What a variable accepts.
#[derive(Clone, Copy)]
pub(crate) enum Allowed {
    /// Whole numbers from the first to the second, and what else the text says.
    Range(u64, u64, &'static str),
    Bool,
    /// These words (any case, `-` and `_` alike).
    Words(&'static [&'static str]),
    Text(&'static str),
}

/// One environment variable.
pub(crate) struct Var {
    pub(crate) name: &'static str,
    pub(crate) fallback: Fallback,
    pub(crate) allowed: Allowed,
    /// The effective value as `check-config` prints it (a password as `***`).
    pub(crate) shown: fn(&Settings) -> String,
    pub(crate) meaning: &'static str,
}

macro_rules! variables {
    ($($name:ident = $fallback:expr, $allowed:expr, $shown:expr, $meaning:literal;)*) => {
        $(pub(crate) const $name: Var = Var {
            name: stringify!($name), fallback: $fallback, allowed: $allowed, shown: $shown,
            meaning: $meaning,
        };)*
        /// Every variable, in the order of the documentation's table and the report.
        pub(crate) const VARIABLES: &[Var] = &[$($name,)*];
    };
}

use Allowed::{Bool, Range, Text, Words};
use Fallback::{Computed, Service, Unset, Value};

const DAY_SECS: u64 = 86_400;
const DAY_MS: u64 = 86_400_000;
const ISOLATION: &[&str] = &["read_committed", "repeatable_read", "serializable"];
const SSL: &[&str] = &[
    "disable",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
    "disabled",
    "preferred",
    "required",
    "verify-identity",
];

fn secs(d: Duration) -> String {
    d.as_secs().to_string()
}
fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}
fn optional_millis(d: Option<Duration>) -> String {
    d.map_or_else(|| "0".to_owned(), millis)
}
fn part(s: &Settings, get: fn(crate::url::ServerParts) -> String) -> String {
    s.database.url.server_parts().map(get).unwrap_or_default()
}

variables! {
    DATABASE_URL = Service(|d| d.database_url), Text("`postgres://`, `postgresql://`, `postgresql+<driver>://` (the driver suffix is dropped), `mysql://` and `mariadb://` (MariaDB; the second is read as the first), `sqlite:`"),
        |s| s.database.url.to_string(), "the database; the embedded SQLite file is created and migrated on first start";
    DB_HOST = Unset, Text("a host name, an IP address, or a socket directory starting with `/`"), |s| part(s, |p| p.host),
        "when `DATABASE_URL` is unset and this is set, the PostgreSQL URL is assembled from `DB_HOST`…`DB_NAME`";
    DB_PORT = Value("5432"), Range(1, 65_535, ""), |s| part(s, |p| p.port.to_string()), "port of the assembled URL";
    DB_USER = Value("postgres"), Text("any text"), |s| part(s, |p| p.user), "user of the assembled URL";
    DB_PASSWORD = Unset, Text("any text (spaces kept)"), |s| if s.database.url.has_password() { "***".into() } else { String::new() },
        "password of the assembled URL; kept out of every URL string, shown as `***`";
    DB_NAME = Value("postgres"), Text("any text"), |s| part(s, |p| p.database), "database of the assembled URL";
    DB_POOL_SIZE = Value("10"), Range(1, 10_000, ""), |s| s.database.pool_size.to_string(), "connections the pool keeps open (its minimum)";
    DB_MAX_OVERFLOW = Value("20"), Range(0, 9_999, ", and `DB_POOL_SIZE + DB_MAX_OVERFLOW` at most 10000"), |s| s.database.max_overflow.to_string(),
        "extra connections opened in a burst; the pool's maximum is the sum";
    DB_POOL_TIMEOUT = Value("30"), Range(1, DAY_SECS, ""), |s| secs(s.database.pool_timeout), "seconds a request waits for a connection before 503 `pool_timeout`; with `DB_POOLER=transaction` this includes the wait in the pooler's queue at `BEGIN`";
    DB_POOL_RECYCLE = Value("3600"), Range(1, DAY_SECS, ""), |s| secs(s.database.pool_recycle), "seconds a connection may live before it is replaced";
    DB_POOL_PRE_PING = Value("true"), Bool, |s| s.database.pool_pre_ping.to_string(), "check a connection that sat idle for a second or more before handing it out";
    DB_IDLE_TIMEOUT = Value("600"), Range(1, DAY_SECS, ""), |s| secs(s.database.idle_timeout), "seconds an idle connection above the pool size is kept";
    DB_CONNECT_TIMEOUT = Value("10"), Range(1, DAY_SECS, ""), |s| secs(s.database.connect_timeout),
        "seconds for one connection attempt; also the service's bound on `BEGIN` (except behind a transaction-mode pooler, where `BEGIN` waits for a server connection within `DB_POOL_TIMEOUT`), `COMMIT` and `ROLLBACK` (and, added to the statement timeout, on a statement) before it closes the connection";
    DB_POOL_MODE = Value("queue"), Words(&["queue", "serverless"]), |s| s.database.pool_mode.to_string(), "`serverless` keeps no connection between requests (short-lived runtimes)";
    DB_ISOLATION_LEVEL = Value("repeatable_read"), Words(ISOLATION), |s| s.database.isolation_level.to_string(), "isolation of every transaction unless its route says otherwise";
    DB_APPLICATION_NAME = Service(|d| d.application_name), Text("1 to 63 printable ASCII characters"), |s| s.database.application_name.clone(),
        "PostgreSQL `application_name`, seen in `pg_stat_activity`; the availability probe uses it with `-probe` appended";
    DB_STATEMENT_TIMEOUT_MS = Value("0"), Range(0, DAY_MS, ""), |s| optional_millis(s.database.statement_timeout),
        "PostgreSQL `statement_timeout` in milliseconds; 0 is no limit; plus `DB_CONNECT_TIMEOUT`, the service's own bound on a statement's reply";
    DB_JIT = Value("false"), Bool, |s| s.database.jit.to_string(), "PostgreSQL `jit` (off by default: short OLTP queries only pay for compiling)";
    DB_STATEMENT_CACHE = Value("100"), Range(0, 10_000, ""), |s| s.database.statement_cache.to_string(),
        "prepared statements cached per connection; must be 0 (its default there) with `DB_POOLER=transaction`";
    DB_SSL_MODE = Value("prefer"), Words(SSL), |s| s.database.ssl_mode.to_string(),
        "TLS to the database, as libpq's `sslmode` (see [TLS](#tls)); the last four are MariaDB's spellings of the same modes (`verify-identity` is `verify-full`)";
    DB_SSL_ROOT_CERT = Unset, Text("a file path"), |s| s.database.ssl_root_cert.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "the CA certificate(s) (PEM) that `verify-ca` and `verify-full` trust";
    DB_ECHO = Value("false"), Bool, |s| s.database.echo.to_string(), "log every SQL statement at INFO";
    DB_SLOW_STATEMENT_MS = Value("1000"), Range(0, DAY_MS, ""), |s| millis(s.database.slow_statement), "log statements slower than this at WARN; 0 turns it off";
    DB_CONNECT_RETRIES = Value("5"), Range(1, 1_000, ""), |s| s.database.connect_retries.to_string(), "connection attempts at start-up, the first included";
    DB_CONNECT_RETRY_DELAY_MS = Value("2000"), Range(0, 600_000, ""), |s| millis(s.database.connect_retry_delay), "pause between two start-up attempts";
    DB_AUTO_MIGRATE = Computed("`true` with the embedded SQLite default, else `false`", "true"), Bool, |s| s.database.auto_migrate.to_string(), "apply pending migrations at start-up";
    DB_TX_MAX_RETRIES = Value("3"), Range(0, 100, ""), |s| s.database.tx_max_retries.to_string(), "re-runs of a request after a serialization failure or deadlock";
    DB_POOLER = Value("none"), Words(&["none", "transaction"]), |s| s.database.pooler.to_string(),
        "`transaction`: PostgreSQL is reached through a transaction-mode pooler ([scale-out](scale-out.md))";
    DATABASE_REPLICA_URL = Unset, Text("a `postgres://` URL, same forms as `DATABASE_URL`"), |s| s.database.replica_url.as_ref().map(ToString::to_string).unwrap_or_default(),
        "a streaming replica for `GET`/`HEAD` transactions; needs a PostgreSQL primary";
    DB_REPLICA_MAX_WAIT_MS = Value("100"), Range(0, 60_000, ""), |s| millis(s.database.replica_max_wait),
        "how long a read carrying a consistency token waits for the replica before it runs on the primary";
    DB_IDEMPOTENCY_TTL = Value("86400"), Range(1, 30 * DAY_SECS, ""), |s| secs(s.database.idempotency_ttl), "seconds an `Idempotency-Key` and its stored response are kept";
    DB_LEAK_DETECTION_MS = Value("10000"), Range(0, DAY_MS, ""), |s| optional_millis(s.database.leak_detection),
        "log a transaction still open after this many milliseconds at WARN; 0 turns it off";
    DB_IDLE_IN_TRANSACTION_TIMEOUT_MS = Value("30000"), Range(0, DAY_MS, ""), |s| optional_millis(s.database.idle_in_transaction_timeout),
        "PostgreSQL `idle_in_transaction_session_timeout`, a startup parameter of every direct connection: the server ends a transaction its client abandoned (a partition) after this many milliseconds, releasing its locks; 0 turns it off (behind `DB_POOLER=transaction` use `ALTER ROLE … SET` or PgBouncer's `idle_transaction_timeout`)";
    DB_FAILOVER_RETRY_MS = Value("5000"), Range(0, 600_000, ""), |s| millis(s.database.failover_retry),
        "how long a request whose PostgreSQL primary was lost before `COMMIT` is re-run while a new primary takes over, before 503 `database_unavailable`";
    APP_HOST = Value("127.0.0.1"), Text("a host name or address without spaces"), |s| s.server.host.clone(), "where the HTTP server listens";
    APP_PORT = Value("8080"), Range(0, 65_535, ""), |s| s.server.port.to_string(), "HTTP port; 0 picks a free one (logged in the `listening` line)";
    APP_WORKERS = Computed("number of CPUs", ""), Range(1, 1_024, ""), |s| s.server.workers.to_string(), "actix-web worker threads; the pool is shared by all of them";
    APP_BODY_LIMIT = Value("65536"), Range(1, 1 << 30, ""), |s| s.server.body_limit.to_string(), "largest request body in bytes (413 above it)";
    APP_SHUTDOWN_TIMEOUT = Value("30"), Range(1, DAY_SECS, ""), |s| secs(s.server.shutdown_timeout), "seconds in-flight requests get to finish after SIGTERM or Ctrl-C";
    LOG_FORMAT = Value("pretty"), Words(&["pretty", "json"]), |s| s.log.format.to_string(),
        "log lines for humans or one JSON object per line; `RUST_LOG` filters (default `info`)";
}

/// The variables of [`VARIABLES`] that are set, read by `envy` (which keys them in lower case).
pub(crate) struct Env(BTreeMap<String, String>);

impl Env {
    /// Keeps only our variables (names are case-sensitive; the last of repeated names wins).
    pub(crate) fn from_vars<I>(vars: I) -> Result<Env, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let ours = vars
            .into_iter()
            .filter(|(name, _)| VARIABLES.iter().any(|var| var.name == name));
        envy::from_iter(ours)
            .map(Env)
            .map_err(|err| ConfigError::Environment(err.to_string()))
    }

    /// The value exactly as given (a password's spaces matter), `None` when unset or empty.
    pub(crate) fn raw(&self, var: &Var) -> Option<&str> {
        let value = self.0.get(&var.name.to_ascii_lowercase())?;
        Some(value.as_str()).filter(|v| !v.is_empty())
    }

    /// The value trimmed, `None` when unset or blank.
    pub(crate) fn given(&self, var: &Var) -> Option<&str> {
        self.raw(var).map(str::trim).filter(|v| !v.is_empty())
    }

    /// The value given, else the declared default value.
    pub(crate) fn value(&self, var: &Var) -> Option<&'_ str> {
        match (self.given(var), var.fallback) {
            (Some(value), _) => Some(value),
            (None, Value(value)) => Some(value),
            _ => None,
        }
    }

    /// A whole number within the declared range.
    pub(crate) fn number<T: TryFrom<u64>>(&self, var: &Var) -> Result<T, ConfigError> {
        let (min, max) = match var.allowed {
            Range(min, max, _) => (min, max),
            _ => (0, u64::MAX),
        };
        let value = self.value(var).unwrap_or_default();
        let invalid = || {
            let expected = format!("expected a whole number from {min} to {max}");
            ConfigError::invalid(var.name, value, expected)
        };
        match value.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => T::try_from(n).map_err(|_| invalid()),
            _ => Err(invalid()),
        }
    }

    pub(crate) fn seconds(&self, var: &Var) -> Result<Duration, ConfigError> {
        self.number(var).map(Duration::from_secs)
    }

    pub(crate) fn millis(&self, var: &Var) -> Result<Duration, ConfigError> {
        self.number(var).map(Duration::from_millis)
    }

    /// Milliseconds where 0 means off.
    pub(crate) fn optional_millis(&self, var: &Var) -> Result<Option<Duration>, ConfigError> {
        Ok(Some(self.millis(var)?).filter(|d| !d.is_zero()))
    }

    /// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, in any case.
    pub(crate) fn flag(&self, var: &Var) -> Result<bool, ConfigError> {
        let value = self.value(var).unwrap_or_default();
        match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::invalid(
                var.name,
                value,
                "expected one of true, false, 1, 0, yes, no, on, off",
            )),
        }
    }

    /// One of the declared words, parsed by the enum's `FromStr` (strum).
    pub(crate) fn word<T: FromStr>(&self, var: &Var) -> Result<T, ConfigError> {
        let value = self.value(var).unwrap_or_default();
        parse_word(value).ok_or_else(|| {
            let words = match var.allowed {
                Words(words) => words.join(", "),
                _ => String::new(),
            };
            ConfigError::invalid(var.name, value, format!("expected one of {words}"))
        })
    }
}

/// An enum's value from one of its words: any case, `-`, `_` and spaces alike.
pub(crate) fn parse_word<T: FromStr>(value: &str) -> Option<T> {
    let normalised: String = value
        .trim()
        .chars()
        .map(|c| match c {
            '-' | ' ' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    normalised.parse().ok()
}

/// The `default` cell of the table, and the value `.env.example` shows.
fn default_of(var: &Var, defaults: &Defaults) -> (String, &'static str) {
    match var.fallback {
        Value(value) => (format!("`{value}`"), value),
        Unset => ("unset".to_owned(), ""),
        Service(get) => (format!("`{}`", get(defaults)), get(defaults)),
        Computed(text, example) => (text.to_owned(), example),
    }
}

fn allowed_of(var: &Var) -> String {
    match var.allowed {
        Range(min, max, more) => format!("`{min}` to `{max}`{more}"),
        Bool => "`true`, `false`".to_owned(),
        Words(words) => format!("`{}`", words.join("`, `")),
        Text(text) => text.to_owned(),
    }
}

/// The variable table of `docs/configuration.md`.
pub fn reference_table(defaults: &Defaults) -> String {
    let mut table = "| variable | default | allowed | meaning |\n|---|---|---|---|\n".to_owned();
    for var in VARIABLES {
        let (default, _) = default_of(var, defaults);
        let allowed = allowed_of(var);
        let row = format!(
            "| `{}` | {default} | {allowed} | {} |\n",
            var.name, var.meaning
        );
        table.push_str(&row);
    }
    table
}

/// The whole `.env.example`: every variable commented out at its default, with its meaning.
pub fn env_example(defaults: &Defaults) -> String {
    let mut text =
        "# Every setting, with its default. All are optional and every line here is a comment:\n\
        # copied to .env, this file changes nothing until a line is uncommented (.env is read at\n\
        # start-up, variables already in the environment win; never commit .env). Generated from\n\
        # config/src/variables.rs by `cargo run -p app --example config_reference`; the allowed\n\
        # values and where a setting may also come from: docs/configuration.md.\n"
            .to_owned();
    for var in VARIABLES {
        let (_, value) = default_of(var, defaults);
        let plain = |text: &str| text.replace('`', "").replace("](", " (").replace('[', "");
        let (meaning, allowed) = (plain(var.meaning), plain(&allowed_of(var)));
        let sentence = format!("{}: {meaning}. Allowed: {allowed}.", var.name);
        let mut line = String::from("\n#");
        for word in sentence.split(' ') {
            if line.len() + word.len() > 98 {
                // Continuation lines are indented: none can read as a `# NAME=value` line.
                text.push_str(&line);
                line = String::from("\n#  ");
            }
            line.push(' ');
            line.push_str(word);
        }
        text.push_str(&format!("{line}\n# {}={value}\n", var.name));
    }
    text
}

#[cfg(test)]
#[path = "variables_tests.rs"]
mod tests;
