//! Tests of url.rs.

use super::*;

use crate::test_support::{Vars, vars};

impl DatabaseUrl {
    /// The password the driver gets, read back from its options' `Debug`.
    pub(crate) fn password(&self) -> Option<String> {
        let debug = match &self.target {
            Target::Postgres(pg) => format!("{pg:?}"),
            Target::Mysql(my) => format!("{my:?}"),
            Target::Sqlite(..) => return None,
        };
        let rest = debug.split("password: Some(\"").nth(1)?;
        rest.split('"').next().map(str::to_owned)
    }
}

/// A password with every character that has a meaning in a URL.
const HOSTILE: &str = "p@ss:w/rd%";

fn parsed(raw: &str) -> DatabaseUrl {
    DatabaseUrl::parse("DATABASE_URL", raw)
        .unwrap_or_else(|err| panic!("{raw} should parse: {err}"))
}

fn parse_error(raw: &str) -> String {
    match DatabaseUrl::parse("DATABASE_URL", raw) {
        Ok(url) => panic!("{raw} should fail, got {url}"),
        Err(err) => err.to_string(),
    }
}

fn assembled(pairs: Vars) -> Result<Option<DatabaseUrl>, ConfigError> {
    assemble(&Env::new(vars(pairs), crate::Defaults::default()).expect("readable"))
}

fn assembled_ok(pairs: Vars) -> DatabaseUrl {
    match assembled(pairs) {
        Ok(Some(url)) => url,
        Ok(None) => panic!("{pairs:?} should assemble a URL"),
        Err(err) => panic!("{pairs:?} should assemble: {err}"),
    }
}

fn parts(url: &DatabaseUrl) -> ServerParts {
    url.server_parts()
        .unwrap_or_else(|| panic!("{url} should be a server URL"))
}

#[test]
fn describe_names_the_database_and_server_and_never_the_password() {
    let cases = [
        (
            "postgres://u:hunter2@db.internal/inv",
            r#"database "inv" on db.internal:5432 (postgres)"#,
        ),
        (
            "mysql://root:hunter2@127.0.0.1:3307/shop",
            r#"database "shop" on 127.0.0.1:3307 (mysql)"#,
        ),
        (
            "sqlite://data/inventory.db?mode=rwc",
            r#"SQLite file "data/inventory.db""#,
        ),
        ("sqlite::memory:", "the in-memory SQLite database"),
    ];
    for (raw, described) in cases {
        let url = parsed(raw);
        assert_eq!(url.describe(), described, "{raw}");
        assert!(!url.describe().contains("hunter2"), "{raw}");
    }
}

#[test]
fn every_postgres_spelling_is_normalised_to_postgres() {
    for raw in [
        "postgres://u:pw@db:5432/inv",
        "postgresql://u:pw@db:5432/inv",
        "postgresql+asyncpg://u:pw@db:5432/inv",
        "postgresql+psycopg://u:pw@db:5432/inv",
        "postgres+whatever://u:pw@db:5432/inv",
        "PostgreSQL://u:pw@db:5432/inv",
        "  postgres://u:pw@db:5432/inv  ",
    ] {
        let url = parsed(raw);
        assert_eq!(url.backend(), Backend::Postgres, "{raw}");
        assert_eq!(url.to_string(), "postgres://u:***@db:5432/inv", "{raw}");
        assert_eq!(url.password().as_deref(), Some("pw"), "{raw}");
        assert!(url.has_password(), "{raw}");
    }
}

#[test]
fn every_mysql_and_mariadb_spelling_is_normalised_to_mysql() {
    for raw in [
        "mysql://u:pw@db:3306/inv",
        "mariadb://u:pw@db:3306/inv",
        "mysql+pymysql://u:pw@db:3306/inv",
        "mariadb+mariadbconnector://u:pw@db:3306/inv",
        "MariaDB://u:pw@db:3306/inv",
    ] {
        let url = parsed(raw);
        assert_eq!(url.backend(), Backend::Mysql, "{raw}");
        assert_eq!(url.to_string(), "mysql://u:***@db:3306/inv", "{raw}");
        assert_eq!(url.password().as_deref(), Some("pw"), "{raw}");
    }
    let p = parts(&parsed("mariadb://root@127.0.0.1/mysql"));
    assert_eq!(
        (
            p.host.as_str(),
            p.port,
            p.user.as_str(),
            p.database.as_str()
        ),
        ("127.0.0.1", 3306, "root", "mysql")
    );
}

#[test]
fn a_mysql_url_takes_the_drivers_ssl_mode_spellings() {
    assert!(DatabaseUrl::parse("DATABASE_URL", "mysql://u@db/inv?ssl-mode=REQUIRED").is_ok());
    assert!(
        DatabaseUrl::parse("DATABASE_URL", "mysql://u@db/inv?ssl-mode=verify_identity").is_ok()
    );
    // libpq's `require` is not one of MySQL's `ssl-mode` spellings. (The old parser's message
    // listed the accepted ones, VERIFY_IDENTITY among them; sqlx's names only the bad value.)
    let err = parse_error("mysql://u:s3cret@db/inv?ssl-mode=require");
    assert!(
        err.starts_with(r#"invalid DATABASE_URL="mysql://u:***@db/inv?ssl-mode=require": "#),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn sqlite_urls_are_kept_as_given() {
    for raw in [
        "sqlite://inventory.db?mode=rwc",
        "sqlite:inventory.db",
        "sqlite::memory:",
        "sqlite://?mode=memory",
        "sqlite:///var/lib/inv/data.db?mode=rwc",
    ] {
        let url = parsed(raw);
        assert_eq!(url.backend(), Backend::Sqlite, "{raw}");
        assert_eq!(url.to_string(), raw);
        assert!(url.password().is_none(), "{raw}");
        assert!(!url.has_password(), "{raw}");
        assert!(url.server_parts().is_none(), "{raw}");
    }
    assert_eq!(
        parsed("SQLite://x.db").to_string(),
        "sqlite://x.db",
        "the scheme is lower-cased because sqlx strips it textually"
    );
}

#[test]
fn bad_urls_are_rejected_naming_database_url() {
    let cases = [
        (
            "oracle://u@db/inv",
            "scheme is not supported",
            "another driver",
        ),
        ("localhost:5432/inv", "expected postgres://", "no scheme"),
        ("inventory.db", "expected postgres://", "a bare file name"),
        (
            "postgres://u@db:99999/inv",
            "invalid port number",
            "port out of range",
        ),
        (
            "postgres://u@db/inv?sslmode=sometimes",
            "sslmode",
            "an sslmode sqlx rejects",
        ),
        (
            "postgres://db/inv?statement-cache-capacity=lots",
            "statement-cache-capacity=lots",
            "bad cache",
        ),
        ("sqlite://", "no database file", "no file"),
        (
            "sqlite://my db.db",
            "not a valid URL",
            "a space in the host part",
        ),
    ];
    for (raw, expected, reason) in cases {
        let err = match DatabaseUrl::parse("DATABASE_URL", raw) {
            Ok(url) => panic!("{raw} ({reason}) should fail, got {url}"),
            Err(err) => err,
        };
        assert_eq!(err.variable(), Some("DATABASE_URL"), "{reason}: {err}");
        let err = err.to_string();
        assert!(err.starts_with("invalid DATABASE_URL"), "{reason}: {err}");
        assert!(err.contains(expected), "{reason}: {err}");
    }
}

#[test]
fn a_password_never_appears_in_an_error_about_the_url() {
    let cases = [
        ("postgres://u:s3cret@db:99999/inv", "bad port, unparsable"),
        (
            "postgres://u:s3cret@db/inv?sslmode=sometimes",
            "bad sslmode",
        ),
        (
            "postgres://u@db/inv?password=s3cret&sslmode=x",
            "password in the query",
        ),
        ("postgres://u:s3cret%FF@db/inv", "password not UTF-8"),
        ("oracle://u:s3cret@db/inv", "another scheme"),
        (
            "oracle://u@db/inv?password=s3cret",
            "another scheme, query password",
        ),
        ("s3cret", "a password pasted into the wrong variable"),
        ("s3cret:s3cret", "looks like a scheme"),
        ("postgres://u:s3cret@/inv", "no host"),
    ];
    for (raw, reason) in cases {
        match DatabaseUrl::parse("DATABASE_URL", raw) {
            Ok(url) => panic!("{raw} ({reason}) should fail, got {url}"),
            Err(err) => {
                let shown = format!("{err} {err:?}");
                assert!(!shown.contains("s3cret"), "{reason}: {shown}");
                assert!(shown.contains("DATABASE_URL"), "{reason}: {shown}");
            }
        }
    }
}

#[test]
fn a_redacted_url_still_helps_to_find_the_mistake() {
    // The URL is shown with its password as `***`, then the driver's reason, which names the
    // bad value, and what is accepted.
    let err = parse_error("postgres://u:s3cret@db/inv?sslmode=sometimes");
    let reason = err
        .strip_prefix(r#"invalid DATABASE_URL="postgres://u:***@db/inv?sslmode=sometimes": "#)
        .unwrap_or_else(|| panic!("{err}"));
    assert!(reason.contains(r#""sometimes""#), "{err}");
    assert!(
        reason.contains("sslmode is one of disable, prefer, require, verify-ca, verify-full"),
        "{err}"
    );
    assert!(
        !reason.contains("error with configuration"),
        "said once: {err}"
    );
    let err = parse_error("oracle://u:s3cret@db/inv");
    assert!(err.contains(r#""oracle://u:***@db/inv""#), "{err}");
}

#[test]
fn the_password_is_shown_as_stars_in_display_and_debug() {
    let url = parsed("postgres://app:s3cret@db:5432/inv?sslmode=require");
    assert_eq!(
        url.to_string(),
        "postgres://app:***@db:5432/inv?sslmode=require"
    );
    assert_eq!(
        format!("{url:?}"),
        r#"DatabaseUrl("postgres://app:***@db:5432/inv?sslmode=require")"#
    );
    assert_eq!(url.password().as_deref(), Some("s3cret"));
}

#[test]
fn a_password_given_as_a_query_parameter_is_redacted_and_reaches_the_driver() {
    let url = parsed("postgres://app@db/inv?sslmode=require&password=s3cret");
    assert_eq!(url.password().as_deref(), Some("s3cret"));
    assert!(url.has_password());
    assert_eq!(
        url.to_string(),
        "postgres://app@db/inv?sslmode=require&password=***"
    );
    assert!(!format!("{url:?}").contains("s3cret"));
    assert_eq!(url.query_param(&["password"]).as_deref(), Some("***"));
    assert_eq!(url.query_param(&["sslmode"]).as_deref(), Some("require"));

    let socket = parsed("postgres:///inv?host=/run/postgresql&password=s3cret");
    assert!(!socket.to_string().contains("s3cret"), "{socket}");
    assert!(!format!("{socket:?}").contains("s3cret"));
    assert_eq!(socket.password().as_deref(), Some("s3cret"));
    assert_eq!(parts(&socket).host, "/run/postgresql");
}

#[test]
fn a_percent_encoded_password_is_decoded_for_the_driver() {
    let url = parsed("postgres://app:p%40ss%3Aw%2Frd%25@db/inv");
    assert_eq!(url.password().as_deref(), Some(HOSTILE));
    assert_eq!(url.to_string(), "postgres://app:***@db/inv");
    assert_eq!(parts(&url).user, "app");
    assert_eq!(parts(&url).database, "inv");
}

#[test]
fn an_empty_password_counts_as_none() {
    for raw in ["postgres://app:@db/inv", "postgres://app@db/inv"] {
        let url = parsed(raw);
        assert!(url.password().is_none(), "{raw}");
        assert!(!url.has_password(), "{raw}");
    }
}

#[test]
fn parts_are_assembled_into_a_postgres_url_with_a_hostile_password_encoded() {
    let url = assembled_ok(&[
        ("DB_HOST", "db.internal"),
        ("DB_PORT", "6543"),
        ("DB_USER", "app user"),
        ("DB_PASSWORD", HOSTILE),
        ("DB_NAME", "inv/entory"),
    ]);
    assert_eq!(url.backend(), Backend::Postgres);
    assert_eq!(
        url.to_string(),
        "postgres://app%20user:***@db.internal:6543/inv%2Fentory"
    );
    assert_eq!(url.password().as_deref(), Some(HOSTILE));
    let p = parts(&url);
    assert_eq!(
        (
            p.host.as_str(),
            p.port,
            p.user.as_str(),
            p.database.as_str()
        ),
        ("db.internal", 6543, "app user", "inv/entory")
    );
    assert!(!url.to_string().contains("p@ss"));
    assert!(!format!("{url:?}").contains("p@ss"));
    assert!(!url.describe().contains("p@ss"));
}

#[test]
fn a_password_with_spaces_and_non_ascii_reaches_the_driver_intact() {
    for password in [" pw ", "pä ss#?&=+", "%41"] {
        let url = assembled_ok(&[("DB_HOST", "db"), ("DB_PASSWORD", password)]);
        assert_eq!(url.password().as_deref(), Some(password), "{password:?}");
        assert_eq!(url.to_string(), "postgres://postgres:***@db:5432/postgres");
    }
}

#[test]
fn nothing_is_assembled_without_db_host() {
    assert!(matches!(assembled(&[("DB_USER", "app")]), Ok(None)));
    assert!(matches!(assembled(&[("DB_HOST", "  ")]), Ok(None)));
}

#[test]
fn an_ipv6_host_and_a_socket_directory_can_be_assembled() {
    let v6 = assembled_ok(&[("DB_HOST", "::1")]);
    assert_eq!(v6.to_string(), "postgres://postgres@[::1]:5432/postgres");
    let socket = assembled_ok(&[("DB_HOST", "/run/postgresql"), ("DB_NAME", "inv")]);
    let p = parts(&socket);
    assert_eq!(
        (p.host.as_str(), p.database.as_str()),
        ("/run/postgresql", "inv")
    );
}

#[test]
fn a_host_that_cannot_be_in_a_url_is_rejected_naming_db_host() {
    let err = match assembled(&[("DB_HOST", "bad host"), ("DB_PASSWORD", "s3cret")]) {
        Err(err) => err,
        Ok(url) => panic!("bad host should fail, got {url:?}"),
    };
    assert_eq!(err.variable(), Some("DB_HOST"));
    let err = err.to_string();
    assert!(
        err.starts_with(r#"invalid DB_HOST="bad host": expected a host name"#),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn the_database_is_read_from_the_path_the_query_or_the_file() {
    let cases = [
        ("postgres://u@db/inv", "inv"),
        ("postgres://u@db/inv?dbname=other", "other"),
        ("mysql://u@db/shop", "shop"),
    ];
    for (raw, database) in cases {
        assert_eq!(parts(&parsed(raw)).database, database, "{raw}");
    }
    let cases = [
        (
            "sqlite://inventory.db?mode=rwc",
            r#"SQLite file "inventory.db""#,
        ),
        (
            "sqlite:///var/lib/data.db",
            r#"SQLite file "/var/lib/data.db""#,
        ),
        ("sqlite::memory:", "the in-memory SQLite database"),
    ];
    for (raw, described) in cases {
        assert_eq!(parsed(raw).describe(), described, "{raw}");
    }
}

#[test]
fn a_server_url_without_a_database_uses_the_users_name_as_the_driver_does() {
    assert_eq!(parts(&parsed("postgres://u@db")).database, "u");
    assert_eq!(parts(&parsed("postgres://db/")).user, "postgres");
}

#[test]
fn in_memory_sqlite_is_recognised() {
    assert!(parsed("sqlite::memory:").in_memory);
    assert!(parsed("sqlite://?mode=memory").in_memory);
    assert!(parsed("sqlite://file.db?mode=memory&cache=shared").in_memory);
    assert!(!parsed("sqlite://inventory.db?mode=rwc").in_memory);
    assert!(!parsed("postgres://db/inv").in_memory);
}

#[test]
fn postgres_parts_reflect_what_the_driver_will_use() {
    let p = parts(&parsed("postgres://app%20x:pw@db.internal/inv"));
    assert_eq!(p.host, "db.internal");
    assert_eq!(p.port, 5432);
    assert_eq!(p.user, "app x");
    assert_eq!(p.database, "inv");
    assert!(parsed("sqlite::memory:").server_parts().is_none());
}
