//! Helpers shared by the unit tests: settings from a table of `(name, value)` pairs, and the
//! one-line message of the error they produce.

use crate::{ConfigError, Defaults, Settings};

/// A service's defaults, as the inventory sets them (and docs/configuration.md documents them).
pub(crate) const DEFAULTS: Defaults = Defaults {
    application_name: "inventory-api",
    database_url: "sqlite://inventory.db?mode=rwc",
};

pub(crate) fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

pub(crate) fn settings(pairs: &[(&str, &str)]) -> Settings {
    Settings::from_vars(vars(pairs), &DEFAULTS)
        .unwrap_or_else(|err| panic!("{pairs:?} should load: {err}"))
}

pub(crate) fn error(pairs: &[(&str, &str)]) -> ConfigError {
    match Settings::from_vars(vars(pairs), &DEFAULTS) {
        Ok(settings) => panic!("{pairs:?} should fail, got {settings:?}"),
        Err(err) => err,
    }
}

/// A row's variables in a table of test cases.
pub(crate) type Vars<'a> = &'a [(&'a str, &'a str)];
