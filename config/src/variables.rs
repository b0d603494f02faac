//! Every environment variable, declared once: its name, the settings field it fills and how
//! it is read, its default, what it accepts and what it means. From this table come the
//! settings structs and their parsing (the default when unset, the range or words checked, the
//! error naming the variable), [`crate::Settings::report`] (each field shown as its reader
//! writes it), and the two documents a user reads: the variable table of
//! `docs/configuration.md` and `.env.example` ([`reference_table`], [`env_example`], written by
//! `cargo run -p app --example config_reference`). Adding a variable is one row here.
//! The rules that tie variables together are [`DatabaseSettings::checked`].

use std::path::PathBuf;
use std::time::Duration;

use crate::url::{DatabaseUrl, ServerParts, assemble};
use crate::{ConfigError, Defaults, IsolationLevel, LogFormat, PoolMode, Pooler, SslMode};

/// What a variable is when unset.
pub(crate) enum Fallback {
    /// This value, parsed like a given one.
    Value(&'static str),
    /// No value.
    Unset,
    /// The service's own ([`Defaults`]).
    Service(fn(&Defaults) -> &'static str),
    /// Worked out from other variables, as the text says; `.env.example` shows the second value
    /// (what the service's default database gets, or nothing where it depends on the machine).
    Computed(&'static str, &'static str, fn(&Env) -> String),
}

/// What a variable accepts, checked by [`Env::parse`].
pub(crate) enum Allowed {
    /// Whole numbers from the first to the second, and what else the text says.
    Range(u64, u64, &'static str),
    /// One of [`BOOLS`].
    Bool,
    /// These words (any case, `-`, `_` and spaces alike).
    Words(&'static [&'static str]),
    Text(&'static str),
    /// Text that passes the check (when given; not a value taken from the URL).
    Checked(&'static str, fn(&str) -> bool),
}

/// One environment variable.
pub(crate) struct Var {
    pub(crate) name: &'static str,
    pub(crate) fallback: Fallback,
    pub(crate) allowed: Allowed,
    /// The `DATABASE_URL` query parameters that stand in for the variable when it is unset (a
    /// URL's `sslmode=require` is never downgraded to the default `prefer`).
    pub(crate) in_url: &'static [&'static str],
    /// The effective value as `check-config` prints it (a password as `***`).
    pub(crate) shown: fn(&crate::Settings) -> String,
    pub(crate) meaning: &'static str,
}

/// `Struct in group { NAME field: Type as reader = fallback, allowed, meaning; … }`: the field
/// is read by `Env::reader` and shown in the report by `show!(reader, …)`; a row without a
/// field (`NAME [shown] = …`) is a variable read by another one's reader.
macro_rules! settings {
    ($($(#[$doc:meta])* $Struct:ident in $group:ident {
        $($NAME:ident $($field:ident: $ty:ty as $read:ident $(, url $($alias:literal)+)?)? $([$shown:expr])?
            = $fallback:expr, $allowed:expr, $meaning:literal;)*
    })*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Debug)]
            pub struct $Struct {
                $($(#[doc = concat!("`", stringify!($NAME), "`: ", $meaning, ".")] pub $field: $ty,)?)*
            }
            impl $Struct {
                pub(crate) fn read(env: &Env) -> Result<$Struct, ConfigError> {
                    Ok($Struct { $($($field: env.$read(&$NAME)?,)?)* })
                }
            }
            $(pub(crate) const $NAME: Var = Var {
                name: stringify!($NAME), fallback: $fallback, allowed: $allowed, meaning: $meaning,
                in_url: &[$($($($alias,)+)?)?],
                shown: $(|s| show!($read, &s.$group.$field, &$NAME))? $($shown)?,
            };)*
        )*
        /// Every variable, in the order of the documentation's table and the report.
        pub(crate) const VARIABLES: &[Var] = &[$($($NAME,)*)*];
    };
}

/// A field's value as `check-config` prints it: durations in their variable's unit, 0 for off,
/// nothing for an unset path or URL.
macro_rules! show {
    (duration, $value:expr, $var:expr) => {
        ($value.as_millis() / u128::from(unit($var))).to_string()
    };
    (optional, $value:expr, $var:expr) => {
        show!(duration, $value.unwrap_or_default(), $var)
    };
    (path, $value:expr, $var:expr) => {
        $value.iter().map(|p| p.display().to_string()).collect()
    };
    (replica, $value:expr, $var:expr) => {
        $value.iter().map(ToString::to_string).collect()
    };
    ($read:ident, $value:expr, $var:expr) => {
        $value.to_string()
    };
}

use Allowed::{Bool, Checked, Range, Text, Words};
use Fallback::{Computed, Service, Unset, Value};

/// The spellings of a boolean: `true` at even places, `false` at odd ones.
const BOOLS: [&str; 8] = ["true", "false", "1", "0", "yes", "no", "on", "off"];

/// The milliseconds in a unit of a duration variable: its unit is in its name, milliseconds for
/// a name ending in `_MS`, else seconds.
fn unit(var: &Var) -> u64 {
    if var.name.ends_with("_MS") { 1 } else { 1000 }
}
/// What Postgres accepts without truncating (63 bytes) and what can go in a startup packet and
/// a log line unescaped (printable ASCII).
fn fits_a_startup_packet(value: &str) -> bool {
    value.len() <= 63 && value.bytes().all(|b| (0x20..=0x7e).contains(&b))
}
/// Whether the database is the service's default (an embedded SQLite file).
fn embedded(env: &Env) -> String {
    (env.given(&DATABASE_URL).is_none() && env.given(&DB_HOST).is_none()).to_string()
}
fn cpus(_: &Env) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    cpus.clamp(1, 1024).to_string()
}
fn part(s: &crate::Settings, get: fn(ServerParts) -> String) -> String {
    s.database.url.server_parts().map(get).unwrap_or_default()
}

settings! {
    /// The database and pool settings. `Debug` shows the password as `***`.
    DatabaseSettings in database {
        DATABASE_URL url: DatabaseUrl as url = Service(|d| d.database_url), Text("`postgres://`, `postgresql://`, `postgresql+<driver>://` (the driver suffix is dropped), `mysql://` and `mariadb://` (MariaDB; the second is read as the first), `sqlite:`"), "the database; the embedded SQLite file is created and migrated on first start";
        DB_HOST [|s| part(s, |p| p.host)] = Unset, Text("a host name, an IP address, or a socket directory starting with `/`"), "when `DATABASE_URL` is unset and this is set, the PostgreSQL URL is assembled from `DB_HOST`…`DB_NAME`";
        DB_PORT [|s| part(s, |p| p.port.to_string())] = Value("5432"), Range(1, 65_535, ""), "port of the assembled URL";
        DB_USER [|s| part(s, |p| p.user)] = Value("postgres"), Text("any text"), "user of the assembled URL";
        DB_PASSWORD [|s| if s.database.url.has_password() { "***".into() } else { String::new() }] = Unset, Text("any text (spaces kept)"), "password of the assembled URL; kept out of every URL string, shown as `***`";
        DB_NAME [|s| part(s, |p| p.database)] = Value("postgres"), Text("any text"), "database of the assembled URL";
        DB_POOL_SIZE pool_size: u32 as parse = Value("10"), Range(1, 10_000, ""), "connections the pool keeps open (its minimum)";
        DB_MAX_OVERFLOW max_overflow: u32 as parse = Value("20"), Range(0, 9_999, ", and `DB_POOL_SIZE + DB_MAX_OVERFLOW` at most 10000"), "extra connections opened in a burst; the pool's maximum is the sum";
        DB_POOL_TIMEOUT pool_timeout: Duration as duration = Value("30"), Range(1, 86_400, ""), "seconds a request waits for a connection before 503 `pool_timeout`; with `DB_POOLER=transaction` this includes the wait in the pooler's queue at `BEGIN`";
        DB_POOL_RECYCLE pool_recycle: Duration as duration = Value("3600"), Range(1, 86_400, ""), "seconds a connection may live before it is replaced";
        DB_POOL_PRE_PING pool_pre_ping: bool as parse = Value("true"), Bool, "check a connection that sat idle for a second or more before handing it out";
        DB_IDLE_TIMEOUT idle_timeout: Duration as duration = Value("600"), Range(1, 86_400, ""), "seconds an idle connection above the pool size is kept";
        DB_CONNECT_TIMEOUT connect_timeout: Duration as duration = Value("10"), Range(1, 86_400, ""), "seconds for one connection attempt; also the service's bound on `BEGIN` (except behind a transaction-mode pooler, where `BEGIN` waits for a server connection within `DB_POOL_TIMEOUT`), `COMMIT` and `ROLLBACK` (and, added to the statement timeout, on a statement) before it closes the connection";
        DB_POOL_MODE pool_mode: PoolMode as parse = Value("queue"), Words(&["queue", "serverless"]), "`serverless` keeps no connection between requests (short-lived runtimes)";
        DB_ISOLATION_LEVEL isolation_level: IsolationLevel as parse = Value("repeatable_read"), Words(&["read_committed", "repeatable_read", "serializable"]), "isolation of every transaction unless its route says otherwise";
        DB_APPLICATION_NAME application_name: String as parse, url "application_name" = Service(|d| d.application_name), Checked("1 to 63 printable ASCII characters", fits_a_startup_packet), "PostgreSQL `application_name`, seen in `pg_stat_activity`; the availability probe uses it with `-probe` appended";
        DB_STATEMENT_TIMEOUT_MS statement_timeout: Option<Duration> as optional = Value("0"), Range(0, 86_400_000, ""), "PostgreSQL `statement_timeout` in milliseconds; 0 is no limit; plus `DB_CONNECT_TIMEOUT`, the service's own bound on a statement's reply";
        DB_JIT jit: bool as parse = Value("false"), Bool, "PostgreSQL `jit` (off by default: short OLTP queries only pay for compiling)";
        DB_STATEMENT_CACHE statement_cache: usize as parse, url "statement-cache-capacity" = Value("100"), Range(0, 10_000, ""), "prepared statements cached per connection; must be 0 (its default there) with `DB_POOLER=transaction`";
        DB_SSL_MODE ssl_mode: SslMode as parse, url "sslmode" "ssl-mode" = Value("prefer"), Words(&["disable", "prefer", "require", "verify-ca", "verify-full", "disabled", "preferred", "required", "verify-identity"]), "TLS to the database, as libpq's `sslmode` (see [TLS](#tls)); the last four are MariaDB's spellings of the same modes (`verify-identity` is `verify-full`)";
        DB_SSL_ROOT_CERT ssl_root_cert: Option<PathBuf> as path, url "sslrootcert" "ssl-root-cert" "ssl-ca" = Unset, Text("a file path"), "the CA certificate(s) (PEM) that `verify-ca` and `verify-full` trust";
        DB_ECHO echo: bool as parse = Value("false"), Bool, "log every SQL statement at INFO";
        DB_SLOW_STATEMENT_MS slow_statement: Duration as duration = Value("1000"), Range(0, 86_400_000, ""), "log statements slower than this at WARN; 0 turns it off";
        DB_CONNECT_RETRIES connect_retries: u32 as parse = Value("5"), Range(1, 1_000, ""), "connection attempts at start-up, the first included";
        DB_CONNECT_RETRY_DELAY_MS connect_retry_delay: Duration as duration = Value("2000"), Range(0, 600_000, ""), "pause between two start-up attempts";
        DB_AUTO_MIGRATE auto_migrate: bool as parse = Computed("`true` with the embedded SQLite default, else `false`", "true", embedded), Bool, "apply pending migrations at start-up";
        DB_TX_MAX_RETRIES tx_max_retries: u32 as parse = Value("3"), Range(0, 100, ""), "re-runs of a request after a serialization failure or deadlock";
        DB_POOLER pooler: Pooler as parse = Value("none"), Words(&["none", "transaction"]), "`transaction`: PostgreSQL is reached through a transaction-mode pooler ([scale-out](scale-out.md))";
        DATABASE_REPLICA_URL replica_url: Option<DatabaseUrl> as replica = Unset, Text("a `postgres://` URL, same forms as `DATABASE_URL`"), "a streaming replica for `GET`/`HEAD` transactions; needs a PostgreSQL primary";
        DB_REPLICA_MAX_WAIT_MS replica_max_wait: Duration as duration = Value("100"), Range(0, 60_000, ""), "how long a read carrying a consistency token waits for the replica before it runs on the primary";
        DB_IDEMPOTENCY_TTL idempotency_ttl: Duration as duration = Value("86400"), Range(1, 2_592_000, ""), "seconds an `Idempotency-Key` and its stored response are kept";
        DB_LEAK_DETECTION_MS leak_detection: Option<Duration> as optional = Value("10000"), Range(0, 86_400_000, ""), "log a transaction still open after this many milliseconds at WARN; 0 turns it off";
        DB_IDLE_IN_TRANSACTION_TIMEOUT_MS idle_in_transaction_timeout: Option<Duration> as optional = Value("30000"), Range(0, 86_400_000, ""), "PostgreSQL `idle_in_transaction_session_timeout`, a startup parameter of every direct connection: the server ends a transaction its client abandoned (a partition) after this many milliseconds, releasing its locks; 0 turns it off (behind `DB_POOLER=transaction` use `ALTER ROLE … SET` or PgBouncer's `idle_transaction_timeout`)";
        DB_FAILOVER_RETRY_MS failover_retry: Duration as duration = Value("5000"), Range(0, 600_000, ""), "how long a request whose PostgreSQL primary was lost before `COMMIT` is re-run while a new primary takes over, before 503 `database_unavailable`";
    }
    /// The HTTP server's settings.
    ServerSettings in server {
        APP_HOST host: String as parse = Value("127.0.0.1"), Checked("a host name or an IP address, without spaces", |v| !v.contains(|c: char| c.is_whitespace() || c.is_control())), "where the HTTP server listens";
        APP_PORT port: u16 as parse = Value("8080"), Range(0, 65_535, ""), "HTTP port; 0 picks a free one (logged in the `listening` line)";
        APP_WORKERS workers: usize as parse = Computed("number of CPUs", "", cpus), Range(1, 1_024, ""), "actix-web worker threads; the pool is shared by all of them";
        APP_BODY_LIMIT body_limit: usize as parse = Value("65536"), Range(1, 1 << 30, ""), "largest request body in bytes (413 above it)";
        APP_SHUTDOWN_TIMEOUT shutdown_timeout: Duration as duration = Value("30"), Range(1, 86_400, ""), "seconds in-flight requests get to finish after SIGTERM or Ctrl-C";
    }
    /// How the service logs.
    LogSettings in log {
        LOG_FORMAT format: LogFormat as parse = Value("pretty"), Words(&["pretty", "json"]), "log lines for humans or one JSON object per line; `RUST_LOG` filters (default `info`)";
    }
}

/// The variables of [`VARIABLES`] that are set, read by `envy` (which keys them in lower case;
/// the last of repeated names wins), with the service's [`Defaults`] and, once read, the
/// database URL whose query parameters stand in for unset variables.
pub(crate) struct Env {
    vars: std::collections::BTreeMap<String, String>,
    pub(crate) defaults: Defaults,
    pub(crate) url: Option<DatabaseUrl>,
}

impl Env {
    /// Keeps only our variables (names are case-sensitive), read by `envy`.
    pub(crate) fn new(
        vars: impl IntoIterator<Item = (String, String)>,
        defaults: Defaults,
    ) -> Result<Env, ConfigError> {
        let ours = vars
            .into_iter()
            .filter(|(name, _)| VARIABLES.iter().any(|var| var.name == name));
        let vars = envy::from_iter(ours)
            .map_err(|err| ConfigError::Unreadable(format!("the environment: {err}")))?;
        Ok(Env {
            vars,
            defaults,
            url: None,
        })
    }

    /// The value exactly as given (a password's spaces matter), `None` when unset or empty.
    pub(crate) fn raw(&self, var: &Var) -> Option<&str> {
        let value = self.vars.get(&var.name.to_ascii_lowercase())?;
        Some(value.as_str()).filter(|v| !v.is_empty())
    }

    /// The value trimmed, `None` when unset or blank.
    pub(crate) fn given(&self, var: &Var) -> Option<&str> {
        self.raw(var).map(str::trim).filter(|v| !v.is_empty())
    }

    /// The value given, else the URL's parameter standing in for it, else the default.
    pub(crate) fn value(&self, var: &Var) -> Option<String> {
        let in_url = || self.url.as_ref()?.query_param(var.in_url);
        let fallback = || match &var.fallback {
            Value(value) => Some(value.to_string()),
            Service(get) => Some(get(&self.defaults).to_owned()),
            Computed(_, _, compute) => Some(compute(self)),
            Unset => None,
        };
        let given = self.given(var).map(str::to_owned);
        given.or_else(in_url).or_else(fallback)
    }

    /// The value checked as declared (a whole number within the range, a boolean, one of the
    /// words, text that passes the check), then parsed as `T`.
    pub(crate) fn parse<T: std::str::FromStr>(&self, var: &Var) -> Result<T, ConfigError> {
        let value = self.value(var).unwrap_or_default();
        let in_range = |min, max| value.parse().is_ok_and(|n: u64| (min..=max).contains(&n));
        let truth = BOOLS.iter().position(|b| b.eq_ignore_ascii_case(&value));
        let text = match &var.allowed {
            Range(min, max, _) if !in_range(*min, *max) => None,
            Checked(_, ok) if self.given(var).is_some() && !ok(&value) => None,
            Bool => truth.map(|i| (i % 2 == 0).to_string()),
            Words(_) => Some(value.trim().to_ascii_lowercase().replace(['-', ' '], "_")),
            _ => Some(value.clone()),
        };
        let parsed = text.and_then(|text| text.parse().ok());
        parsed.ok_or_else(|| ConfigError::Invalid(var.name, Some(value), expected(&var.allowed)))
    }

    /// A duration in its variable's [`unit`].
    pub(crate) fn duration(&self, var: &Var) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.parse::<u64>(var)? * unit(var)))
    }

    /// A duration where 0 means off.
    pub(crate) fn optional(&self, var: &Var) -> Result<Option<Duration>, ConfigError> {
        Ok(Some(self.duration(var)?).filter(|d| !d.is_zero()))
    }

    pub(crate) fn path(&self, var: &Var) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.value(var).map(PathBuf::from))
    }

    /// `DATABASE_URL` as given, else assembled from `DB_HOST`…`DB_NAME`, else the service's.
    pub(crate) fn url(&self, var: &Var) -> Result<DatabaseUrl, ConfigError> {
        match (self.given(var), assemble(self)?) {
            (Some(given), _) => DatabaseUrl::parse(var.name, given),
            (None, Some(assembled)) => Ok(assembled),
            (None, None) => DatabaseUrl::parse(var.name, &self.value(var).unwrap_or_default()),
        }
    }

    pub(crate) fn replica(&self, var: &Var) -> Result<Option<DatabaseUrl>, ConfigError> {
        let parse = |url| DatabaseUrl::parse(var.name, url);
        self.given(var).map(parse).transpose()
    }
}

/// What the error says a variable accepts.
fn expected(allowed: &Allowed) -> String {
    match allowed {
        Range(min, max, _) => format!("expected a whole number from {min} to {max}"),
        Bool => format!("expected one of {}", BOOLS.join(", ")),
        Words(words) => format!("expected one of {}", words.join(", ")),
        Text(text) | Checked(text, _) => format!("expected {text}"),
    }
}

/// The `default` cell of the table, and the value `.env.example` shows.
fn default_of(var: &Var, defaults: &Defaults) -> (String, &'static str) {
    match &var.fallback {
        Value(value) => (format!("`{value}`"), *value),
        Unset => ("unset".to_owned(), ""),
        Service(get) => (format!("`{}`", get(defaults)), get(defaults)),
        Computed(text, example, _) => (text.to_string(), *example),
    }
}

/// The `allowed` cell of the table.
fn allowed_of(var: &Var) -> String {
    match &var.allowed {
        Range(min, max, more) => format!("`{min}` to `{max}`{more}"),
        Bool => "`true`, `false`".to_owned(),
        Words(words) => format!("`{}`", words.join("`, `")),
        Text(text) | Checked(text, _) => text.to_string(),
    }
}

/// The variable table of `docs/configuration.md`.
pub fn reference_table(defaults: &Defaults) -> String {
    let row = |v: &Var| {
        let (default, allowed) = (default_of(v, defaults).0, allowed_of(v));
        format!("| `{}` | {default} | {allowed} | {} |\n", v.name, v.meaning)
    };
    let rows: String = VARIABLES.iter().map(row).collect();
    format!("| variable | default | allowed | meaning |\n|---|---|---|---|\n{rows}")
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
    let plain = |text: &str| text.replace('`', "").replace("](", " (").replace('[', "");
    for var in VARIABLES {
        let (meaning, allowed) = (plain(var.meaning), plain(&allowed_of(var)));
        let sentence = format!("{}: {meaning}. Allowed: {allowed}.", var.name);
        let mut line = String::from("\n#");
        for word in sentence.split(' ') {
            if line.len() + word.len() > 98 {
                // Continuation lines are indented: none can read as a `# NAME=value` line.
                text.push_str(&line);
                line = String::from("\n#  ");
            }
            line = format!("{line} {word}");
        }
        let value = default_of(var, defaults).1;
        text.push_str(&format!("{line}\n# {}={value}\n", var.name));
    }
    text
}

#[cfg(test)]
#[path = "variables_tests.rs"]
mod tests;
