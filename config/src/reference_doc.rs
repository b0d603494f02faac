//! Checks that the configuration table of `docs/configuration.md`, the reference users read,
//! says what this crate does: one row per variable in the order of [`crate::variables::VARIABLES`],
//! each default the value `check-config` reports when the variable is unset, and each range or
//! list of words exactly what the parser accepts. A change to a variable that forgets the
//! documentation fails here.

use std::collections::BTreeMap;

use crate::Settings;
use crate::test_support::{settings, vars};
use crate::variables::VARIABLES;

const DOC: &str = include_str!("../../docs/configuration.md");

/// One row of the table: variable, default cell, allowed cell.
struct Row {
    name: String,
    default: String,
    allowed: String,
}

/// The rows of the table under `## Variables`.
fn rows() -> Vec<Row> {
    DOC.split("\n## ")
        .find(|section| section.starts_with("Variables"))
        .unwrap_or_else(|| panic!("docs/configuration.md has a `## Variables` section"))
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            assert_eq!(cells.len(), 4, "a row has four cells: {line}");
            Row {
                name: cells[0].trim_matches('`').to_owned(),
                default: cells[1].to_owned(),
                allowed: cells[2].to_owned(),
            }
        })
        .collect()
}

/// The `code` spans of a cell, in order.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

fn report_map(settings: &Settings) -> BTreeMap<String, String> {
    settings
        .report()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Other variables a value needs to be read or accepted on its own (`DB_PORT` is read only
/// with `DB_HOST`, the pool bounds limit each other, a pooler needs PostgreSQL).
fn companions(name: &str) -> &'static [(&'static str, &'static str)] {
    match name {
        "DB_PORT" | "DB_USER" | "DB_NAME" | "DB_PASSWORD" => &[("DB_HOST", "db")],
        "DB_POOL_SIZE" => &[("DB_MAX_OVERFLOW", "0")],
        "DB_MAX_OVERFLOW" => &[("DB_POOL_SIZE", "1")],
        "DB_POOLER" => &[("DATABASE_URL", "postgres://db/inv")],
        _ => &[],
    }
}

fn load(name: &str, value: &str) -> Result<Settings, String> {
    let mut pairs = vars(companions(name));
    pairs.push((name.to_owned(), value.to_owned()));
    Settings::from_vars(pairs, &crate::test_support::DEFAULTS).map_err(|err| err.to_string())
}

#[test]
fn the_documented_table_has_one_row_per_variable_in_order() {
    let names: Vec<String> = rows().into_iter().map(|row| row.name).collect();
    assert_eq!(names, VARIABLES.iter().map(|v| v.name).collect::<Vec<_>>());
}

#[test]
fn every_documented_default_is_what_check_config_reports_when_unset() {
    let defaults = report_map(&settings(&[]));
    // DB_PORT, DB_USER, DB_NAME apply only to a URL assembled from DB_HOST.
    let assembled = report_map(&settings(&[("DB_HOST", "db")]));
    for row in rows() {
        let name = row.name.as_str();
        if name == "APP_WORKERS" {
            assert_eq!(row.default, "number of CPUs");
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            assert_eq!(defaults[name], cpus.min(1024).to_string());
            continue;
        }
        let expected = match name {
            "DB_PORT" | "DB_USER" | "DB_NAME" => &assembled[name],
            _ => &defaults[name],
        };
        let documented = if row.default == "unset" {
            ""
        } else {
            code_spans(&row.default)
                .first()
                .copied()
                .unwrap_or_else(|| panic!("{name}: the default is `code` or unset"))
        };
        assert_eq!(documented, expected, "{name}'s documented default");
    }
}

#[test]
fn every_documented_range_is_exactly_what_is_accepted() {
    let mut checked = 0;
    for row in rows() {
        let name = row.name.as_str();
        let spans = code_spans(&row.allowed);
        if !row.allowed.starts_with('`') || !row.allowed.contains("` to `") {
            continue;
        }
        let bound = |i: usize| -> u64 {
            spans[i]
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {:?} is a whole number", spans[i]))
        };
        let (min, max) = (bound(0), bound(1));
        for value in [min, max] {
            if let Err(err) = load(name, &value.to_string()) {
                panic!("{name}={value} is documented as allowed: {err}");
            }
        }
        let mut outside = vec![max + 1];
        if min > 0 {
            outside.push(min - 1);
        }
        for value in outside {
            let err = load(name, &value.to_string())
                .err()
                .unwrap_or_else(|| panic!("{name}={value} is outside the documented range"));
            assert!(err.contains(name), "{err}");
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} ranges found");
}

#[test]
fn every_documented_list_of_words_is_exactly_what_is_accepted() {
    let mut checked = 0;
    for row in rows() {
        let name = row.name.as_str();
        let words = code_spans(&row.allowed);
        // A list of words and nothing else: "`a`, `b`, `c`".
        let listed = words
            .iter()
            .map(|word| format!("`{word}`"))
            .collect::<Vec<_>>()
            .join(", ");
        if words.is_empty() || row.allowed != listed {
            continue;
        }
        for word in &words {
            if let Err(err) = load(name, word) {
                panic!("{name}={word} is documented as allowed: {err}");
            }
        }
        let err = load(name, "not-a-documented-word")
            .err()
            .unwrap_or_else(|| panic!("{name} accepts a word that is not documented"));
        // Booleans: the page lists their other spellings once, above the table.
        let accepted = if words == ["true", "false"] {
            "true, false, 1, 0, yes, no, on, off".to_owned()
        } else {
            words.join(", ")
        };
        assert!(
            err.ends_with(&format!("expected one of {accepted}")),
            "{name}: the message lists exactly the documented words: {err}"
        );
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} lists found");
}
