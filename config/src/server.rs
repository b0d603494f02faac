//! `LOG_FORMAT`'s words; the `APP_*` variables (where to listen, how many workers, the body
//! limit and the shutdown grace period) are plain numbers and text, declared with the others
//! in `variables.rs`. The log filter itself is `RUST_LOG`, read by the subscriber.

use strum::{Display, EnumString};

pub use crate::variables::{LogSettings, ServerSettings};

/// `LOG_FORMAT`: how log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Display, EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
