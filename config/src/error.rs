//! `ConfigError`, the one error type of this crate. Every variant displays as a single line that
//! names the variable, shows the offending value when that is safe (never a password: a database
//! URL is shown with its password replaced by `***`, or not at all when it cannot be parsed far
//! enough to strip the password) and says what is allowed, so an operator can fix the
//! environment from the message alone.

/// Why the settings could not be read. `Display` is one line, fit for a start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable holds a value outside what is allowed: `invalid NAME="value": expected …`. The
    /// fields are the variable, its value and what is allowed; the value is `None` when it is
    /// not shown because it is (or may contain) a secret, and when shown it is either not secret
    /// or already redacted.
    #[error("invalid {0}{shown}: {2}", shown = shown(.1))]
    Invalid(&'static str, Option<String>, String),
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
            ConfigError::Invalid(variable, ..) => Some(variable),
            ConfigError::Unreadable(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_value_is_quoted_and_named_on_one_line() {
        let err = ConfigError::Invalid(
            "DB_POOL_SIZE",
            Some("a\nb".to_owned()),
            "expected a whole number".to_owned(),
        );
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
        let err = ConfigError::Invalid("DATABASE_URL", None, "invalid port number".to_owned());
        assert_eq!(
            err.to_string(),
            "invalid DATABASE_URL (value not shown, it may contain a password): invalid port number"
        );
    }
}
