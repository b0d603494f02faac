//! `ServerSettings` (the `APP_*` variables: where to listen, how many workers, the body limit
//! and the shutdown grace period) and `LogSettings` (`LOG_FORMAT`). The log filter itself is
//! `RUST_LOG`, read by the subscriber.

use std::time::Duration;

use strum::{Display, EnumString, IntoStaticStr};

use crate::error::ConfigError;
use crate::variables::{self as var, Env};

/// Where and how the HTTP server runs (variables: docs/configuration.md).
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// `APP_HOST`: the address to bind.
    pub host: String,
    /// `APP_PORT`; 0 lets the OS pick a free port (tests use it).
    pub port: u16,
    /// `APP_WORKERS` (default the number of CPUs): actix workers.
    pub workers: usize,
    /// `APP_BODY_LIMIT`: the largest request body, in bytes.
    pub body_limit: usize,
    /// `APP_SHUTDOWN_TIMEOUT`: how long in-flight requests may run after SIGTERM or Ctrl-C.
    pub shutdown_timeout: Duration,
}

impl ServerSettings {
    pub(crate) fn from_env(env: &Env) -> Result<ServerSettings, ConfigError> {
        let host = env.value(&var::APP_HOST).unwrap_or_default();
        // Whether it can be bound is only known when binding.
        if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            let expected = "expected a host name or an IP address, such as 127.0.0.1 or 0.0.0.0";
            return Err(ConfigError::invalid("APP_HOST", host, expected));
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(ServerSettings {
            host: host.to_owned(),
            port: env.number(&var::APP_PORT)?,
            workers: match env.given(&var::APP_WORKERS) {
                Some(_) => env.number(&var::APP_WORKERS)?,
                None => cpus.clamp(1, 1024),
            },
            body_limit: env.number(&var::APP_BODY_LIMIT)?,
            shutdown_timeout: env.seconds(&var::APP_SHUTDOWN_TIMEOUT)?,
        })
    }
}

/// How log lines are written.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// `LOG_FORMAT` (default `pretty`).
    pub format: LogFormat,
}

/// `LOG_FORMAT`: human-readable lines or one JSON object per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display, EnumString, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum LogFormat {
    /// Lines for humans.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `pretty` or `json`.
    pub fn as_str(&self) -> &'static str {
        self.into()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{error, settings};

    #[test]
    fn an_empty_environment_gives_the_documented_defaults() {
        let all = settings(&[]);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(all.server.host, "127.0.0.1");
        assert_eq!(all.server.port, 8080);
        assert_eq!(all.server.workers, cpus.clamp(1, 1024));
        assert_eq!(all.server.body_limit, 65_536);
        assert_eq!(all.server.shutdown_timeout, Duration::from_secs(30));
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
        assert_eq!(all.server.shutdown_timeout, Duration::from_secs(5));
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
