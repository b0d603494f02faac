//! `ConfigError`, the one error type of this crate. Every variant displays as a single line that
//! names the variable, shows the offending value when that is safe (never a password: a database
//! URL is shown with its password replaced by `***`, or not at all when it cannot be parsed far
//! enough to strip the password) and says what is allowed, so an operator can fix the
//! environment from the message alone.

/// Why the settings could not be read. `Display` is one line, fit for a start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable holds a value outside what is allowed: `invalid NAME="value": expected …`.
    /// The value is `None` when it is not shown because it is (or may contain) a secret; when
    /// shown, it is either not secret or already redacted.
    #[error("invalid {variable}{}: {expected}", shown(value))]
    Invalid {
        /// The variable at fault.
        variable: &'static str,
        /// Its value, when safe to show.
        value: Option<String>,
        /// What is allowed.
        expected: String,
    },
    /// `.env` or the environment could not be read (for example a variable this crate reads is
    /// not UTF-8): what, and why. The content of `.env` is never shown.
    #[error("could not read {0}")]
    Unreadable(String),
}

/// `="value"`, or why the value is not shown.
fn shown(value: &Option<String>) -> String {
    match value {
        Some(value) => format!("={value:?}"),
        None => " (value not shown, it may contain a password)".to_owned(),
    }
}

impl ConfigError {
    /// The variable at fault, when there is one.
    pub fn variable(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { variable, .. } => Some(variable),
            ConfigError::Unreadable(_) => None,
        }
    }

    /// A value that is safe to show is not allowed.
    pub(crate) fn invalid(
        variable: &'static str,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        let (value, expected) = (Some(value.into()), expected.into());
        ConfigError::Invalid {
            variable,
            value,
            expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_value_is_quoted_and_named_on_one_line() {
        let err = ConfigError::invalid("DB_POOL_SIZE", "a\nb", "expected a whole number");
        let shown = err.to_string();
        assert_eq!(
            shown,
            r#"invalid DB_POOL_SIZE="a\nb": expected a whole number"#
        );
        assert!(!shown.contains('\n'));
        assert_eq!(err.variable(), Some("DB_POOL_SIZE"));
    }

    #[test]
    fn a_withheld_value_names_the_variable_but_not_the_value() {
        let err = ConfigError::Invalid {
            variable: "DATABASE_URL",
            value: None,
            expected: "invalid port number".to_owned(),
        };
        assert_eq!(
            err.to_string(),
            "invalid DATABASE_URL (value not shown, it may contain a password): invalid port number"
        );
    }
}
