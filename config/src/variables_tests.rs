//! Tests of variables.rs.

use super::*;
use crate::test_support::{Vars, error, settings, vars};
use crate::{IsolationLevel, SslMode};

fn env(pairs: Vars) -> Env {
    Env::new(vars(pairs), Defaults::default()).expect("readable")
}

fn message<T: std::fmt::Debug>(result: Result<T, ConfigError>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn every_variable_is_read_from_its_own_name_only() {
    for var in VARIABLES {
        let env = env(&[(var.name, "x")]);
        for other in VARIABLES {
            let expected = (other.name == var.name).then_some("x");
            assert_eq!(
                env.raw(other),
                expected,
                "{} set, {} read",
                var.name,
                other.name
            );
        }
    }
}

#[test]
fn unrelated_and_lower_case_variables_are_ignored_and_the_last_repeat_wins() {
    let env = env(&[
        ("PATH", "/bin"),
        ("db_pool_size", "abc"),
        ("DB_POOL_SIZE", "7"),
        ("DB_POOL_SIZE", "8"),
    ]);
    assert_eq!(env.given(&DB_POOL_SIZE), Some("8"));
    assert_eq!(env.parse::<u32>(&DB_POOL_SIZE).ok(), Some(8));
    assert_eq!(
        settings(&[
            ("db_pool_size", "abc"),
            ("DB_POOL_SIZE", "7"),
            ("DB_POOL_SIZE", "8")
        ])
        .database
        .pool_size,
        8
    );
}

#[test]
fn blank_values_count_as_unset() {
    assert_eq!(env(&[("DB_POOL_SIZE", "")]).given(&DB_POOL_SIZE), None);
    assert_eq!(env(&[("DB_POOL_SIZE", "   ")]).given(&DB_POOL_SIZE), None);
    assert_eq!(
        env(&[("DB_POOL_SIZE", " 5 ")]).given(&DB_POOL_SIZE),
        Some("5")
    );
    assert_eq!(
        env(&[("DB_PASSWORD", " pw ")]).raw(&DB_PASSWORD),
        Some(" pw ")
    );
    assert_eq!(env(&[("DB_PASSWORD", "")]).raw(&DB_PASSWORD), None);
    assert_eq!(env(&[("DB_HOST", "  ")]).given(&DB_HOST), None);
    for blank in ["", "   "] {
        let env = env(&[("DB_POOL_SIZE", blank), ("DB_POOL_PRE_PING", blank)]);
        assert_eq!(env.parse::<u32>(&DB_POOL_SIZE).ok(), Some(10), "{blank:?}");
        assert_eq!(
            env.parse::<bool>(&DB_POOL_PRE_PING).ok(),
            Some(true),
            "{blank:?}"
        );
    }
}

#[test]
fn numbers_outside_their_range_name_the_variable_and_the_range() {
    let cases = [
        ("abc", "not a number"),
        ("0", "below the minimum"),
        ("1001", "above the maximum"),
        ("-1", "negative"),
        ("1.5", "a fraction"),
        ("99999999999999999999999", "beyond 64 bits"),
    ];
    for (value, reason) in cases {
        let expected =
            format!("invalid DB_CONNECT_RETRIES={value:?}: expected a whole number from 1 to 1000");
        let env = env(&[("DB_CONNECT_RETRIES", value)]);
        assert_eq!(
            message(env.parse::<u32>(&DB_CONNECT_RETRIES)),
            expected,
            "{reason}"
        );
        let err = error(&[("DB_CONNECT_RETRIES", value)]);
        assert_eq!(err.to_string(), expected, "{reason}");
        assert_eq!(err.variable(), Some("DB_CONNECT_RETRIES"), "{reason}");
    }
    let env = env(&[("DB_CONNECT_RETRIES", " 1000 ")]);
    assert_eq!(env.parse::<u32>(&DB_CONNECT_RETRIES).ok(), Some(1000));
}

#[test]
fn durations_are_read_in_their_unit_and_an_optional_zero_is_off() {
    let env = env(&[
        ("DB_POOL_TIMEOUT", "7"),
        ("DB_CONNECT_RETRY_DELAY_MS", "250"),
        ("DB_STATEMENT_TIMEOUT_MS", "0"),
        ("DB_LEAK_DETECTION_MS", "1500"),
    ]);
    assert_eq!(
        env.duration(&DB_POOL_TIMEOUT).ok(),
        Some(Duration::from_secs(7))
    );
    assert_eq!(
        env.duration(&DB_CONNECT_RETRY_DELAY_MS).ok(),
        Some(Duration::from_millis(250))
    );
    assert_eq!(env.optional(&DB_STATEMENT_TIMEOUT_MS).ok(), Some(None));
    assert_eq!(
        env.optional(&DB_LEAK_DETECTION_MS).ok(),
        Some(Some(Duration::from_millis(1500)))
    );
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
            env(&[("DB_ECHO", value)]).parse::<bool>(&DB_ECHO).ok(),
            Some(expected),
            "{value}"
        );
        assert_eq!(
            settings(&[("DB_ECHO", value)]).database.echo,
            expected,
            "{value}"
        );
    }
    assert_eq!(env(&[]).parse::<bool>(&DB_POOL_PRE_PING).ok(), Some(true));
    assert_eq!(env(&[]).parse::<bool>(&DB_ECHO).ok(), Some(false));
    assert_eq!(
        message(env(&[("DB_ECHO", "maybe")]).parse::<bool>(&DB_ECHO)),
        r#"invalid DB_ECHO="maybe": expected one of true, false, 1, 0, yes, no, on, off"#
    );
}

#[test]
fn words_ignore_case_and_separator_style() {
    let level = |value: &str| {
        env(&[("DB_ISOLATION_LEVEL", value)])
            .parse::<IsolationLevel>(&DB_ISOLATION_LEVEL)
            .ok()
    };
    assert_eq!(level("READ-COMMITTED"), Some(IsolationLevel::ReadCommitted));
    assert_eq!(level("read committed"), Some(IsolationLevel::ReadCommitted));
    assert_eq!(level(" Serializable "), Some(IsolationLevel::Serializable));
    assert_eq!(level(""), Some(IsolationLevel::RepeatableRead));
    let ssl = |value: &str| {
        env(&[("DB_SSL_MODE", value)])
            .parse::<SslMode>(&DB_SSL_MODE)
            .ok()
    };
    assert_eq!(ssl("verify_ca"), Some(SslMode::VerifyCa));
    assert_eq!(ssl("VERIFY-CA"), Some(SslMode::VerifyCa));
    assert_eq!(ssl("verify-identity"), Some(SslMode::VerifyFull));
    assert_eq!(ssl("Verify Full"), Some(SslMode::VerifyFull));
    assert_eq!(ssl("chaos"), None);
    assert_eq!(
        message(
            env(&[("DB_ISOLATION_LEVEL", "chaos")]).parse::<IsolationLevel>(&DB_ISOLATION_LEVEL)
        ),
        r#"invalid DB_ISOLATION_LEVEL="chaos": expected one of read_committed, repeatable_read, serializable"#
    );
}
