//! Reading the environment: the flat `RawEnv` that `envy` fills with every variable of
//! `docs/configuration.md` as an optional string (flat because `envy` with `#[serde(flatten)]`
//! fails on numbers, and strings because this crate, not serde, must word the errors), and the
//! parsing helpers that turn one raw value into a typed one or into a `ConfigError` naming the
//! variable, showing the value and saying what is allowed. An empty value counts as unset.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::Deserialize;

use crate::error::ConfigError;

/// Declares `RawEnv` and the list of variable names from one table, so the two cannot drift.
macro_rules! raw_env {
    ($($field:ident => $name:literal,)*) => {
        /// Every variable this crate reads, as given (no `Debug`: it holds the password).
        #[derive(Default, Deserialize)]
        pub(crate) struct RawEnv {
            $(pub(crate) $field: Option<String>,)*
        }

        /// The names of every variable this crate reads, in the order of `docs/configuration.md`'s
        /// table (checked by `reference_doc`).
        pub(crate) const VARIABLES: &[&str] = &[$($name,)*];

        #[cfg(test)]
        const FIELDS: &[&str] = &[$(stringify!($field),)*];
    };
}

raw_env! {
    database_url => "DATABASE_URL",
    db_host => "DB_HOST",
    db_port => "DB_PORT",
    db_user => "DB_USER",
    db_password => "DB_PASSWORD",
    db_name => "DB_NAME",
    db_pool_size => "DB_POOL_SIZE",
    db_max_overflow => "DB_MAX_OVERFLOW",
    db_pool_timeout => "DB_POOL_TIMEOUT",
    db_pool_recycle => "DB_POOL_RECYCLE",
    db_pool_pre_ping => "DB_POOL_PRE_PING",
    db_idle_timeout => "DB_IDLE_TIMEOUT",
    db_connect_timeout => "DB_CONNECT_TIMEOUT",
    db_pool_mode => "DB_POOL_MODE",
    db_isolation_level => "DB_ISOLATION_LEVEL",
    db_application_name => "DB_APPLICATION_NAME",
    db_statement_timeout_ms => "DB_STATEMENT_TIMEOUT_MS",
    db_jit => "DB_JIT",
    db_statement_cache => "DB_STATEMENT_CACHE",
    db_ssl_mode => "DB_SSL_MODE",
    db_ssl_root_cert => "DB_SSL_ROOT_CERT",
    db_echo => "DB_ECHO",
    db_slow_statement_ms => "DB_SLOW_STATEMENT_MS",
    db_connect_retries => "DB_CONNECT_RETRIES",
    db_connect_retry_delay_ms => "DB_CONNECT_RETRY_DELAY_MS",
    db_auto_migrate => "DB_AUTO_MIGRATE",
    db_tx_max_retries => "DB_TX_MAX_RETRIES",
    db_pooler => "DB_POOLER",
    database_replica_url => "DATABASE_REPLICA_URL",
    db_replica_max_wait_ms => "DB_REPLICA_MAX_WAIT_MS",
    db_idempotency_ttl => "DB_IDEMPOTENCY_TTL",
    db_leak_detection_ms => "DB_LEAK_DETECTION_MS",
    db_idle_in_transaction_timeout_ms => "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
    db_failover_retry_ms => "DB_FAILOVER_RETRY_MS",
    app_host => "APP_HOST",
    app_port => "APP_PORT",
    app_workers => "APP_WORKERS",
    app_body_limit => "APP_BODY_LIMIT",
    app_shutdown_timeout => "APP_SHUTDOWN_TIMEOUT",
    log_format => "LOG_FORMAT",
}

impl RawEnv {
    /// Keeps only the variables of [`VARIABLES`] (names are case-sensitive, as in the
    /// environment; the last of repeated names wins) and lets `envy` fill the struct.
    pub(crate) fn from_vars<I>(vars: I) -> Result<RawEnv, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let known: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(name, _)| VARIABLES.contains(&name.as_str()))
            .collect();
        envy::from_iter(known).map_err(|err| ConfigError::Environment(err.to_string()))
    }
}

/// The process environment's variables of [`VARIABLES`]. Unrelated variables that are not
/// UTF-8 are skipped (`std::env::vars` would panic on them); one of ours that is not UTF-8 is an
/// error naming it, without its value.
pub(crate) fn process_vars() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| VARIABLES.contains(n)) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| ConfigError::Environment(format!("{name} is not valid UTF-8")))?;
        vars.push((name.to_owned(), value));
    }
    Ok(vars)
}

/// libpq's environment variables that sqlx 0.9 reads to fill what a URL leaves out
/// (`PgConnectOptions::new_without_pgpass`). `PGPASSFILE` is not among them: it names a file,
/// which is where a password may come from when none is configured.
pub(crate) const LIBPQ_VARIABLES: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGAPPNAME",
    "PGOPTIONS",
];

/// Removes [`LIBPQ_VARIABLES`] from the process environment, so that the driver connects with
/// exactly what this crate resolved and `check-config` reports. Several of them (`PGPASSWORD`,
/// `PGSSLROOTCERT`, `PGOPTIONS`, …) fill `Option`s of `PgConnectOptions` that no builder can
/// clear again, so overriding them after the fact is not possible; not letting the driver see
/// them is.
#[allow(unsafe_code)] // the workspace denies unsafe code; this is its one exception
pub(crate) fn forget_libpq_variables() {
    for name in LIBPQ_VARIABLES {
        if std::env::var_os(name).is_some() {
            // SAFETY: called from `Settings::load`, which runs at start-up before the process
            // starts other threads (its documented contract, as for `dotenvy`, which sets
            // variables the same way), so no other thread reads the environment meanwhile.
            unsafe { std::env::remove_var(name) };
        }
    }
}

/// Loads `./.env` into the process environment without overriding variables already set, like
/// `dotenvy` does. A missing file is fine. Parse errors do not quote the line: it may hold a
/// password.
pub(crate) fn load_dotenv() -> Result<(), ConfigError> {
    match dotenvy::from_path(".env") {
        Ok(()) => Ok(()),
        Err(err) if err.not_found() => Ok(()),
        Err(dotenvy::Error::Io(err)) => Err(ConfigError::DotEnv(err.to_string())),
        Err(dotenvy::Error::LineParse(..)) => Err(ConfigError::DotEnv(
            "a line is not in NAME=value form (not shown, it may contain a password)".to_owned(),
        )),
        Err(_) => Err(ConfigError::DotEnv(
            "a substituted variable could not be read".to_owned(),
        )),
    }
}

/// The value, trimmed, or `None` when unset or blank.
pub(crate) fn present(raw: &Option<String>) -> Option<&str> {
    raw.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The value exactly as given (for a password, where spaces may matter), `None` when unset or
/// empty.
pub(crate) fn present_untrimmed(raw: &Option<String>) -> Option<&str> {
    raw.as_deref().filter(|v| !v.is_empty())
}

/// A whole number within `range`, or `default` when unset.
pub(crate) fn number<T>(
    variable: &'static str,
    raw: &Option<String>,
    default: T,
    range: RangeInclusive<u64>,
) -> Result<T, ConfigError>
where
    T: TryFrom<u64>,
{
    let Some(value) = present(raw) else {
        return Ok(default);
    };
    let invalid = || ConfigError::invalid(variable, value, range_text(range.start(), range.end()));
    let n = u64::from_str(value).map_err(|_| invalid())?;
    if !range.contains(&n) {
        return Err(invalid());
    }
    T::try_from(n).map_err(|_| invalid())
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, in any case; `default` when unset.
pub(crate) fn boolean(
    variable: &'static str,
    raw: &Option<String>,
    default: bool,
) -> Result<bool, ConfigError> {
    let Some(value) = present(raw) else {
        return Ok(default);
    };
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(
            variable,
            value,
            "expected one of true, false, 1, 0, yes, no, on, off",
        )),
    }
}

/// One of `choices` (matched ignoring case, and `-`, `_` and spaces as the same character);
/// `default` when unset.
pub(crate) fn choice<T: Copy>(
    variable: &'static str,
    raw: &Option<String>,
    default: T,
    choices: &[(&'static str, T)],
) -> Result<T, ConfigError> {
    let Some(value) = present(raw) else {
        return Ok(default);
    };
    find_choice(value, choices).ok_or_else(|| {
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        ConfigError::invalid(
            variable,
            value,
            format!("expected one of {}", names.join(", ")),
        )
    })
}

/// The choice whose name matches `value` (ignoring case and `-`/`_`/space differences).
pub(crate) fn find_choice<T: Copy>(value: &str, choices: &[(&'static str, T)]) -> Option<T> {
    let wanted = normalise_choice(value);
    choices
        .iter()
        .find(|(name, _)| normalise_choice(name) == wanted)
        .map(|(_, choice)| *choice)
}

fn normalise_choice(value: &str) -> String {
    value
        .trim()
        .chars()
        .map(|c| match c {
            '-' | ' ' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// The wording of every "number out of range" message.
pub(crate) fn range_text(min: impl Display, max: impl Display) -> String {
    format!("expected a whole number from {min} to {max}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(value: &str) -> Option<String> {
        Some(value.to_owned())
    }

    fn message<T: std::fmt::Debug>(result: Result<T, ConfigError>) -> String {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn every_variable_name_is_its_field_name_in_upper_case() {
        assert_eq!(VARIABLES.len(), FIELDS.len());
        for (name, field) in VARIABLES.iter().zip(FIELDS) {
            assert_eq!(name.to_ascii_lowercase(), *field);
        }
    }

    #[test]
    fn envy_fills_every_field_from_its_variable() {
        for name in VARIABLES {
            let env = RawEnv::from_vars([(name.to_string(), "x".to_owned())]);
            let env = env.unwrap_or_else(|e| panic!("{e}"));
            let set = [
                &env.database_url,
                &env.db_host,
                &env.db_port,
                &env.db_user,
                &env.db_password,
                &env.db_name,
                &env.db_pool_size,
                &env.db_max_overflow,
                &env.db_pool_timeout,
                &env.db_pool_recycle,
                &env.db_pool_pre_ping,
                &env.db_idle_timeout,
                &env.db_connect_timeout,
                &env.db_pool_mode,
                &env.db_isolation_level,
                &env.db_application_name,
                &env.db_statement_timeout_ms,
                &env.db_jit,
                &env.db_statement_cache,
                &env.db_ssl_mode,
                &env.db_ssl_root_cert,
                &env.db_echo,
                &env.db_slow_statement_ms,
                &env.db_connect_retries,
                &env.db_connect_retry_delay_ms,
                &env.db_auto_migrate,
                &env.db_tx_max_retries,
                &env.db_pooler,
                &env.database_replica_url,
                &env.db_replica_max_wait_ms,
                &env.db_idempotency_ttl,
                &env.db_leak_detection_ms,
                &env.db_idle_in_transaction_timeout_ms,
                &env.db_failover_retry_ms,
                &env.app_host,
                &env.app_port,
                &env.app_workers,
                &env.app_body_limit,
                &env.app_shutdown_timeout,
                &env.log_format,
            ]
            .iter()
            .filter(|v| v.is_some())
            .count();
            assert_eq!(set, 1, "{name} should fill exactly one field");
        }
    }

    #[test]
    fn unrelated_and_lower_case_variables_are_ignored_and_the_last_repeat_wins() {
        let env = RawEnv::from_vars([
            ("PATH".to_owned(), "/bin".to_owned()),
            ("db_pool_size".to_owned(), "abc".to_owned()),
            ("DB_POOL_SIZE".to_owned(), "7".to_owned()),
            ("DB_POOL_SIZE".to_owned(), "8".to_owned()),
        ]);
        let env = env.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(env.db_pool_size.as_deref(), Some("8"));
    }

    #[test]
    fn blank_values_count_as_unset() {
        assert_eq!(present(&raw("")), None);
        assert_eq!(present(&raw("   ")), None);
        assert_eq!(present(&raw(" 5 ")), Some("5"));
        assert_eq!(present_untrimmed(&raw(" pw ")), Some(" pw "));
        assert_eq!(present_untrimmed(&raw("")), None);
        assert_eq!(number("N", &raw(""), 7_u32, 1..=10).ok(), Some(7));
    }

    #[test]
    fn numbers_outside_their_range_name_the_variable_and_the_range() {
        let cases = [
            ("abc", "not a number"),
            ("0", "below the minimum"),
            ("11", "above the maximum"),
            ("-1", "negative"),
            ("1.5", "a fraction"),
            ("99999999999999999999999", "beyond 64 bits"),
        ];
        for (value, reason) in cases {
            let err = message(number::<u32>("N", &raw(value), 5, 1..=10));
            assert_eq!(
                err,
                format!("invalid N={value:?}: expected a whole number from 1 to 10"),
                "{reason}"
            );
        }
        assert_eq!(number::<u32>("N", &raw(" 10 "), 5, 1..=10).ok(), Some(10));
    }

    #[test]
    fn booleans_accept_the_usual_spellings_in_any_case() {
        for (value, expected) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("On", true),
            ("false", false),
            ("0", false),
            ("NO", false),
            ("off", false),
        ] {
            assert_eq!(
                boolean("B", &raw(value), !expected).ok(),
                Some(expected),
                "{value}"
            );
        }
        assert_eq!(boolean("B", &None, true).ok(), Some(true));
        assert_eq!(
            message(boolean("B", &raw("maybe"), true)),
            r#"invalid B="maybe": expected one of true, false, 1, 0, yes, no, on, off"#
        );
    }

    #[test]
    fn choices_ignore_case_and_separator_style() {
        let choices = [("read_committed", 1), ("verify-ca", 2)];
        assert_eq!(
            choice("C", &raw("READ-COMMITTED"), 0, &choices).ok(),
            Some(1)
        );
        assert_eq!(
            choice("C", &raw("read committed"), 0, &choices).ok(),
            Some(1)
        );
        assert_eq!(choice("C", &raw("verify_ca"), 0, &choices).ok(), Some(2));
        assert_eq!(choice("C", &None, 0, &choices).ok(), Some(0));
        assert_eq!(
            message(choice("C", &raw("chaos"), 0, &choices)),
            r#"invalid C="chaos": expected one of read_committed, verify-ca"#
        );
    }
}
