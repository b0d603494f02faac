//! `ConfigError`, the one error type of this crate. Every variant displays as a single line that
//! names the variable, shows the offending value when that is safe (never a password: a database
//! URL is shown with its password replaced by `***`, or not at all when it cannot be parsed far
//! enough to strip the password) and says what is allowed, so an operator can fix the
//! environment from the message alone.

/// Why the settings could not be read. `Display` is one line, fit for a start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable holds a value outside what is allowed. `value` is safe to show: it is either
    /// not secret or already redacted.
    #[error("invalid {variable}={value:?}: {expected}")]
    Invalid {
        variable: &'static str,
        value: String,
        expected: String,
    },
    /// A variable holds a bad value that is not shown because it is (or may contain) a secret.
    #[error("invalid {variable} (value not shown, it may contain a password): {expected}")]
    Withheld {
        variable: &'static str,
        expected: String,
    },
    /// The `.env` file exists but could not be read or parsed. Its content is never shown.
    #[error("could not read .env: {0}")]
    DotEnv(String),
    /// The environment could not be read (for example a variable this crate reads is not UTF-8).
    #[error("could not read the environment: {0}")]
    Environment(String),
}

impl ConfigError {
    /// The variable at fault, when there is one.
    pub fn variable(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { variable, .. } | ConfigError::Withheld { variable, .. } => {
                Some(variable)
            }
            ConfigError::DotEnv(_) | ConfigError::Environment(_) => None,
        }
    }

    pub(crate) fn invalid(
        variable: &'static str,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            variable,
            value: value.into(),
            expected: expected.into(),
        }
    }

    pub(crate) fn withheld(variable: &'static str, expected: impl Into<String>) -> Self {
        ConfigError::Withheld {
            variable,
            expected: expected.into(),
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
        let err = ConfigError::withheld("DATABASE_URL", "invalid port number");
        assert_eq!(
            err.to_string(),
            "invalid DATABASE_URL (value not shown, it may contain a password): invalid port number"
        );
    }
}
