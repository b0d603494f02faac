//! TLS to the database, against a PostgreSQL server that accepts only TLS connections and
//! presents a certificate for `localhost` signed by a CA of the test's own (`tls_server`):
//! what each `DB_SSL_MODE` connects to, and that a connection which must not be made stops the
//! real binary at start-up with exit code 1 and one line saying why.

use std::process::Output;

use sea_orm::{ConnectionTrait, Statement};

use crate::support::process::BIN;
use crate::support::tls_server::tls_server;

/// A case's environment.
type Vars<'a> = &'a [(&'a str, &'a str)];

/// Connects as the service does, with these settings, and asks the server whether the
/// connection is encrypted.
async fn connection_is_encrypted(vars: &[(&str, &str)]) -> bool {
    let mut pairs: Vec<(String, String)> = vec![
        ("DB_CONNECT_RETRIES".into(), "1".into()),
        ("DB_POOL_SIZE".into(), "1".into()),
        ("DB_MAX_OVERFLOW".into(), "0".into()),
    ];
    pairs.extend(vars.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    let settings =
        config::Settings::from_vars(pairs, &app::DEFAULTS).unwrap_or_else(|e| panic!("{e}"));
    let db = sea_orm_actix_tx::db::connect(&settings.database)
        .await
        .unwrap_or_else(|e| panic!("{vars:?} should connect: {e}"));
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ))
        .await
        .expect("pg_stat_ssl is readable")
        .expect("one row for this connection");
    let encrypted = row.try_get_by_index::<bool>(0).expect("a boolean");
    let _ = db.close().await;
    encrypted
}

/// `app serve` with a bare environment plus `vars`, one connection attempt; killed by
/// `timeout` after 60 s should it start serving.
fn serve(vars: &[(&str, &str)]) -> Output {
    std::process::Command::new("timeout")
        .args(["60", BIN, "serve"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("DB_CONNECT_RETRIES", "1"),
            ("APP_PORT", "0"),
            // The fatal error as one plain line on stderr.
            ("LOG_FORMAT", "pretty"),
        ])
        .envs(vars.iter().copied())
        .output()
        .expect("the binary runs")
}

#[tokio::test]
async fn require_encrypts_without_checking_the_certificate() {
    let tls = tls_server();
    let by_address = tls.url_by_address();
    assert!(
        connection_is_encrypted(&[("DATABASE_URL", &by_address), ("DB_SSL_MODE", "require")]).await
    );
}

#[tokio::test]
async fn verify_full_with_the_ca_connects_to_the_name_on_the_certificate() {
    let tls = tls_server();
    let ca = tls.ca.to_string_lossy();
    let url = tls.url();
    assert!(
        connection_is_encrypted(&[
            ("DATABASE_URL", &url),
            ("DB_SSL_MODE", "verify-full"),
            ("DB_SSL_ROOT_CERT", &ca),
        ])
        .await
    );
    let by_address = tls.url_by_address();
    assert!(
        connection_is_encrypted(&[
            ("DATABASE_URL", &by_address),
            ("DB_SSL_MODE", "verify-ca"),
            ("DB_SSL_ROOT_CERT", &ca),
        ])
        .await,
        "verify-ca checks the signature, not the name"
    );
}

#[test]
fn a_connection_that_must_not_be_made_stops_start_up_with_one_line() {
    let tls = tls_server();
    let (url, by_address) = (tls.url(), tls.url_by_address());
    let (ca, other_ca) = (tls.ca.to_string_lossy(), tls.other_ca.to_string_lossy());
    let cases: [(&str, Vars, &str); 4] = [
        (
            "verify-full with a CA that did not sign the server's certificate",
            &[
                ("DATABASE_URL", &url),
                ("DB_SSL_MODE", "verify-full"),
                ("DB_SSL_ROOT_CERT", &other_ca),
            ],
            "certificate verify failed",
        ),
        (
            "verify-ca with a CA that did not sign the server's certificate",
            &[
                ("DATABASE_URL", &url),
                ("DB_SSL_MODE", "verify-ca"),
                ("DB_SSL_ROOT_CERT", &other_ca),
            ],
            "certificate verify failed",
        ),
        (
            "verify-full to an address the certificate does not name",
            &[
                ("DATABASE_URL", &by_address),
                ("DB_SSL_MODE", "verify-full"),
                ("DB_SSL_ROOT_CERT", &ca),
            ],
            "mismatch",
        ),
        (
            "disable against a server that accepts only TLS",
            &[("DATABASE_URL", &by_address), ("DB_SSL_MODE", "disable")],
            "no encryption",
        ),
    ];
    for (reason, vars, expected) in cases {
        let output = serve(vars);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{reason}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{reason}: {stderr}");
        assert!(
            stderr.starts_with("error: could not connect to the database")
                && stderr.contains(expected),
            "{reason}: {stderr}"
        );
    }
}
