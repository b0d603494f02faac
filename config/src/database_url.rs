//! `DatabaseUrl`: where the database is, with the password kept apart from the URL as a
//! `secrecy::SecretString` so that printing, logging or debugging the URL can never reveal it.
//! This module owns the accepted URL forms (`postgres://`, `postgresql://`, `postgresql+<driver>://`
//! normalised to `postgres://`; `mysql://`, `mariadb://` and their `+<driver>` forms normalised to
//! `mysql://`; and `sqlite:`), the assembly of a Postgres URL from
//! `DB_HOST`/`DB_PORT`/`DB_USER`/`DB_PASSWORD`/`DB_NAME`, and the redaction used in messages.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
#[cfg(feature = "mysql")]
use sea_orm::sqlx::mysql::MySqlSslMode;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::database::{Backend, SslMode};
use crate::env::{RawEnv, number, present, present_untrimmed};
use crate::error::ConfigError;

const DATABASE_URL: &str = "DATABASE_URL";

/// The user of a Postgres URL that names none (as `DB_USER`'s default), set explicitly on the
/// driver's options: sqlx would otherwise take `PGUSER` or the operating system's user name.
pub(crate) const DEFAULT_USER: &str = "postgres";

const EXPECTED_URL: &str = "expected postgres://user:password@host:port/database \
     (postgresql:// and postgresql+<driver>:// are accepted too), \
     mysql://user:password@host:port/database (or mariadb://) or sqlite://<file>?mode=rwc";

/// Characters left as they are in a user name, password or database name put into a URL: the
/// RFC 3986 unreserved set. Everything else is percent-encoded, including `%` itself, which the
/// `url` crate's setters would otherwise take as the start of an escape.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Characters escaped in an SQLite file name (the driver percent-decodes it).
const SQLITE_FILE: &AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'#')
    .add(b'?')
    .add(b'%')
    .add(b'/')
    .add(b'\\');

/// The query parameters that sqlx reads as a password (besides the URL's user-info part).
const PASSWORD_PARAMS: &[&str] = &["password"];

/// A database URL whose password is held separately as a secret.
///
/// `Display` and `Debug` show the password as `***`; [`DatabaseUrl::expose_secret`] is the only
/// way to get the URL with the password, and is meant for the driver alone.
#[derive(Clone)]
pub struct DatabaseUrl {
    location: Location,
    password: Option<SecretString>,
}

/// The URL without its password.
#[derive(Clone, Debug)]
enum Location {
    /// A `postgres://` or `mysql://` URL (the backend says which): no password in the
    /// user-info part nor in the query.
    Server(Backend, Url),
    /// A `sqlite:` URL as given, with the scheme in lower case (sqlx strips it textually).
    Sqlite(String),
}

/// Where the effective URL came from; decides the `DB_AUTO_MIGRATE` default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UrlSource {
    DatabaseUrl,
    DbHost,
    EmbeddedDefault,
}

impl DatabaseUrl {
    /// Parses a database URL.
    ///
    /// `postgres://`, `postgresql://` and `postgresql+<driver>://` (for example
    /// `postgresql+asyncpg://`, as written for Python drivers) all become `postgres://`;
    /// `sqlite:` URLs are kept as given. A password in the user-info part or in a `password=`
    /// query parameter is moved out of the URL into a secret.
    ///
    /// # Errors
    /// [`ConfigError`] naming `DATABASE_URL` when the value is not a URL, uses another scheme,
    /// has a password that is not UTF-8 once percent-decoded, or has an `sslmode` or
    /// `statement-cache-capacity` parameter the driver would reject. The message shows the URL
    /// with its password as `***`, or no value at all when it cannot be parsed far enough to
    /// strip the password.
    pub fn parse(raw: &str) -> Result<DatabaseUrl, ConfigError> {
        let raw = raw.trim();
        let Some((scheme, rest)) = raw.split_once(':') else {
            return Err(ConfigError::withheld(DATABASE_URL, EXPECTED_URL));
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "sqlite" {
            if let Some(feature) = Backend::Sqlite.left_out() {
                return Err(ConfigError::invalid(
                    DATABASE_URL,
                    "sqlite:…",
                    format!(
                        "this build leaves out sqlite: it needs sea-orm-actix-tx's `{feature}` feature"
                    ),
                ));
            }
            return parse_sqlite(&format!("sqlite:{rest}"));
        }
        let driver_suffix = |base: &str| {
            scheme
                .strip_prefix(base)
                .is_some_and(|tail| tail.is_empty() || tail.starts_with('+'))
        };
        if driver_suffix("postgres") || driver_suffix("postgresql") {
            return parse_server(Backend::Postgres, &format!("postgres:{rest}"));
        }
        if driver_suffix("mysql") || driver_suffix("mariadb") {
            // sqlx has one MySQL driver, which speaks to MariaDB too.
            return parse_server(Backend::Mysql, &format!("mysql:{rest}"));
        }
        // Another scheme. Show the value only when it has an authority (`scheme://…`) that the
        // URL parser can split, so that its password can be replaced; a bare `word:word` could
        // be a password pasted into the wrong variable.
        match redact_foreign(raw) {
            Some(shown) => Err(ConfigError::invalid(
                DATABASE_URL,
                shown,
                format!("the scheme is not supported; {EXPECTED_URL}"),
            )),
            None => Err(ConfigError::withheld(DATABASE_URL, EXPECTED_URL)),
        }
    }

    /// Builds `postgres://user:password@host:port/name`, the user, password and database name
    /// percent-encoded (the password is kept as a secret, outside the URL).
    ///
    /// # Errors
    /// [`ConfigError`] naming `DB_HOST` when the host cannot be put in a URL.
    pub(crate) fn from_parts(
        host: &str,
        port: u16,
        user: &str,
        password: Option<SecretString>,
        database: &str,
    ) -> Result<DatabaseUrl, ConfigError> {
        let bad_host = || {
            ConfigError::invalid(
                "DB_HOST",
                host,
                "expected a host name, an IP address or the path of a socket directory",
            )
        };
        let mut url = Url::parse("postgres://localhost").map_err(|_| bad_host())?;
        if host.starts_with('/') {
            // A Unix socket directory: sqlx takes it from the `host` query parameter.
            url.query_pairs_mut().append_pair("host", host);
        } else {
            let bracketed;
            let host = if host.contains(':') && !host.starts_with('[') {
                bracketed = format!("[{host}]");
                bracketed.as_str()
            } else {
                host
            };
            url.set_host(Some(host)).map_err(|_| bad_host())?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(bad_host());
            }
        }
        url.set_port(Some(port)).map_err(|()| bad_host())?;
        url.set_username(&encode(user)).map_err(|()| bad_host())?;
        url.set_path(&format!("/{}", encode(database)));
        Ok(DatabaseUrl {
            location: Location::Server(Backend::Postgres, url),
            password: password.filter(|p| !p.expose_secret().is_empty()),
        })
    }

    /// Which driver this URL is for.
    pub fn backend(&self) -> Backend {
        match self.location {
            Location::Server(backend, _) => backend,
            Location::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The full URL including the password, percent-encoded. For the driver only: never log it.
    pub fn expose_secret(&self) -> String {
        match &self.password {
            Some(password) => self.render(Some(&encode(password.expose_secret()))),
            None => self.render(None),
        }
    }

    /// The URL with no password at all (not even a placeholder).
    pub fn without_password(&self) -> String {
        self.render(None)
    }

    /// The database's name: the path of a Postgres URL (or its `dbname` parameter), the file of
    /// an SQLite URL. `None` when the URL names none (Postgres then uses the user's name) or for
    /// an in-memory SQLite database.
    pub fn database_name(&self) -> Option<String> {
        match &self.location {
            Location::Server(_, url) => query_param(url, &["dbname"]).or_else(|| {
                let path = url.path().trim_start_matches('/');
                Some(decode(path)).filter(|name| !name.is_empty())
            }),
            Location::Sqlite(raw) => {
                let file = sqlite_file(raw);
                (!file.is_empty() && !self.is_in_memory()).then(|| decode(file))
            }
        }
    }

    /// The same server and credentials, another database. For SQLite: another file in the same
    /// directory, `name` plus `.db` when `name` has no extension; an in-memory URL is returned
    /// unchanged.
    pub fn with_database(&self, name: &str) -> DatabaseUrl {
        let location = match &self.location {
            Location::Server(backend, url) => {
                let mut url = url.clone();
                remove_query_params(&mut url, &["dbname"]);
                url.set_path(&format!("/{}", encode(name)));
                Location::Server(*backend, url)
            }
            Location::Sqlite(raw) if self.is_in_memory() || sqlite_file(raw).is_empty() => {
                Location::Sqlite(raw.clone())
            }
            Location::Sqlite(raw) => {
                let prefix_len = sqlite_prefix(raw).len();
                let file = sqlite_file(raw);
                let params = &raw[prefix_len + file.len()..];
                let directory = file.rfind('/').map_or("", |i| &file[..=i]);
                let extension = if name.contains('.') { "" } else { ".db" };
                let name = utf8_percent_encode(name, SQLITE_FILE);
                Location::Sqlite(format!(
                    "{}{directory}{name}{extension}{params}",
                    &raw[..prefix_len]
                ))
            }
        };
        DatabaseUrl {
            location,
            password: self.password.clone(),
        }
    }

    /// The password, when the URL has one.
    pub fn password(&self) -> Option<&SecretString> {
        self.password.as_ref()
    }

    /// True for an SQLite database that lives in memory (`sqlite::memory:`, `mode=memory`): it
    /// disappears with its last connection.
    pub(crate) fn is_in_memory(&self) -> bool {
        match &self.location {
            Location::Server(..) => false,
            Location::Sqlite(raw) => {
                let file = sqlite_file(raw);
                file == ":memory:"
                    || sqlite_params(raw).any(|(key, value)| key == "mode" && value == "memory")
            }
        }
    }

    /// The last value of one of the named query parameters (server URLs only).
    pub(crate) fn query_param(&self, names: &[&str]) -> Option<String> {
        match &self.location {
            Location::Server(_, url) => query_param(url, names),
            Location::Sqlite(_) => None,
        }
    }

    /// Host, port, user and database of a server URL as the driver will use them, for the
    /// settings report and the driver's options: a user a Postgres URL leaves out is
    /// [`DEFAULT_USER`] (MariaDB's driver uses `root`), a database it leaves out the user's
    /// name. `None` for SQLite.
    pub(crate) fn server_parts(&self) -> Option<ServerParts> {
        let Location::Server(backend, url) = &self.location else {
            return None;
        };
        let default_port = match backend {
            Backend::Mysql => "3306",
            _ => "5432",
        };
        let host = query_param(url, &["host", "hostaddr"])
            .or_else(|| url.host_str().map(str::to_owned))
            .unwrap_or_default();
        let port = query_param(url, &["port"])
            .or_else(|| url.port().map(|p| p.to_string()))
            .unwrap_or_else(|| default_port.to_owned());
        let default_user = match backend {
            Backend::Mysql => "root",
            _ => DEFAULT_USER,
        };
        let user = query_param(url, &["user"])
            .or_else(|| Some(decode(url.username())))
            .filter(|user| !user.is_empty())
            .unwrap_or_else(|| default_user.to_owned());
        Some(ServerParts {
            host,
            port,
            // Without a database name PostgreSQL uses the user's.
            database: self.database_name().unwrap_or_else(|| user.clone()),
            user,
        })
    }

    /// Which database this is, for a person and never with a password: `database "inv" on
    /// db.internal:5432 (postgres)`, or `SQLite file "inventory.db"`.
    pub fn describe(&self) -> String {
        match (&self.location, self.server_parts()) {
            (Location::Server(backend, _), Some(parts)) => format!(
                "database {:?} on {}:{} ({backend})",
                parts.database, parts.host, parts.port
            ),
            _ if self.is_in_memory() => "the in-memory SQLite database".to_owned(),
            _ => format!("SQLite file {:?}", self.database_name().unwrap_or_default()),
        }
    }

    /// The URL with `password_text` (already percent-encoded) as its password.
    fn render(&self, password_text: Option<&str>) -> String {
        match &self.location {
            Location::Sqlite(raw) => raw.clone(),
            Location::Server(_, url) => {
                let Some(text) = password_text else {
                    return url.as_str().to_owned();
                };
                let mut url = url.clone();
                if url.set_password(Some(text)).is_err() {
                    // No host in the authority (a socket given as `?host=`): the password goes
                    // back where it came from, the query.
                    let decoded = decode(text);
                    url.query_pairs_mut().append_pair("password", &decoded);
                }
                url.into()
            }
        }
    }
}

/// Host, port, user and database name of a server URL, for the settings report.
pub(crate) struct ServerParts {
    pub host: String,
    pub port: String,
    pub user: String,
    pub database: String,
}

impl fmt::Display for DatabaseUrl {
    /// The URL with the password shown as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = match self.password {
            Some(_) => self.render(Some("***")),
            None => self.render(None),
        };
        f.write_str(&shown)
    }
}

impl fmt::Debug for DatabaseUrl {
    /// Like `Display`: the password as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.to_string())
            .finish()
    }
}

/// The effective database URL: `DATABASE_URL`, else one assembled from `DB_HOST` and friends,
/// else the service's default ([`Defaults::database_url`](crate::Defaults)).
pub(crate) fn resolve(
    raw: &RawEnv,
    default_url: &str,
) -> Result<(DatabaseUrl, UrlSource), ConfigError> {
    if let Some(url) = present(&raw.database_url) {
        return Ok((DatabaseUrl::parse(url)?, UrlSource::DatabaseUrl));
    }
    let Some(host) = present(&raw.db_host) else {
        return Ok((DatabaseUrl::parse(default_url)?, UrlSource::EmbeddedDefault));
    };
    let port = number("DB_PORT", &raw.db_port, 5432_u16, 1..=65535)?;
    let user = present(&raw.db_user).unwrap_or("postgres");
    let database = present(&raw.db_name).unwrap_or("postgres");
    let password = present_untrimmed(&raw.db_password).map(SecretString::from);
    let url = DatabaseUrl::from_parts(host, port, user, password, database)?;
    Ok((url, UrlSource::DbHost))
}

fn parse_sqlite(normalised: &str) -> Result<DatabaseUrl, ConfigError> {
    let url = DatabaseUrl {
        location: Location::Sqlite(normalised.to_owned()),
        password: None,
    };
    // SeaORM checks every URL with the `url` crate before handing it to sqlx.
    if let Err(err) = Url::parse(normalised) {
        return Err(ConfigError::invalid(
            DATABASE_URL,
            normalised,
            format!("not a valid URL ({err}); percent-encode special characters in the file name"),
        ));
    }
    if sqlite_file(normalised).is_empty() && !url.is_in_memory() {
        return Err(ConfigError::invalid(
            DATABASE_URL,
            normalised,
            "no database file; expected sqlite://<file>?mode=rwc or sqlite::memory:",
        ));
    }
    Ok(url)
}

/// A `postgres:` or `mysql:` URL (already normalised): the password moved out, the TLS mode and
/// statement cache parameters checked as the backend's driver would.
fn parse_server(backend: Backend, normalised: &str) -> Result<DatabaseUrl, ConfigError> {
    if let Some(feature) = backend.left_out() {
        return Err(ConfigError::invalid(
            DATABASE_URL,
            normalised
                .split_once('@')
                .map_or(normalised, |(scheme, _)| scheme)
                .to_owned(),
            format!(
                "this build leaves out {backend}: it needs sea-orm-actix-tx's `{feature}` feature"
            ),
        ));
    }
    let mut url = Url::parse(normalised)
        .map_err(|err| ConfigError::withheld(DATABASE_URL, format!("{err}; {EXPECTED_URL}")))?;
    let in_user_info = url.password().map(decode_utf8);
    if in_user_info.is_some() && url.set_password(None).is_err() {
        return Err(ConfigError::withheld(DATABASE_URL, EXPECTED_URL));
    }
    let in_query = remove_query_params(&mut url, PASSWORD_PARAMS)
        .pop()
        .map(|(_, value)| Ok(value));
    let had_password = in_user_info.is_some() || in_query.is_some();
    // sqlx reads the query after the user-info part, so a `password=` parameter wins.
    let password = in_query.or(in_user_info).transpose();
    let parsed = DatabaseUrl {
        location: Location::Server(backend, url),
        // Shown as `***` in the messages below whenever there was one.
        password: had_password.then(|| SecretString::from("")),
    };
    let password = password.map_err(|()| {
        ConfigError::invalid(
            DATABASE_URL,
            parsed.to_string(),
            "the password is not UTF-8 once percent-decoded",
        )
    })?;
    if let Some(mode) = parsed.query_param(&["sslmode", "ssl-mode"]) {
        // Each driver reads this parameter itself, with its own spellings.
        let (valid, expected) = match backend {
            #[cfg(feature = "mysql")]
            Backend::Mysql => (
                mode.parse::<MySqlSslMode>().is_ok(),
                "DISABLED, PREFERRED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY",
            ),
            _ => (SslMode::parse(&mode).is_some(), SslMode::EXPECTED),
        };
        if !valid {
            return Err(ConfigError::invalid(
                DATABASE_URL,
                parsed.to_string(),
                format!("sslmode={mode:?} is not one of {expected}"),
            ));
        }
    }
    if let Some(capacity) = parsed.query_param(&["statement-cache-capacity"])
        && capacity.parse::<usize>().is_err()
    {
        return Err(ConfigError::invalid(
            DATABASE_URL,
            parsed.to_string(),
            "statement-cache-capacity must be a whole number",
        ));
    }
    Ok(DatabaseUrl {
        password: password.filter(|p| !p.is_empty()).map(SecretString::from),
        ..parsed
    })
}

/// A URL of an unsupported scheme with its password replaced, or `None` when it has no
/// authority that the parser can split (then nothing of it is shown).
fn redact_foreign(raw: &str) -> Option<String> {
    if !raw.contains("://") {
        return None;
    }
    let mut url = Url::parse(raw).ok()?;
    if url.password().is_some() {
        url.set_password(Some("***")).ok()?;
    }
    if !remove_query_params(&mut url, PASSWORD_PARAMS).is_empty() {
        url.query_pairs_mut().append_pair("password", "***");
    }
    Some(url.into())
}

/// The last value of any of `names` in the URL's query.
fn query_param(url: &Url, names: &[&str]) -> Option<String> {
    url.query_pairs()
        .filter(|(key, _)| names.contains(&key.as_ref()))
        .last()
        .map(|(_, value)| value.into_owned())
}

/// Removes the named query parameters and returns them; leaves the URL untouched (byte for byte)
/// when there are none.
fn remove_query_params(url: &mut Url, names: &[&str]) -> Vec<(String, String)> {
    let (removed, kept): (Vec<_>, Vec<_>) = url
        .query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .partition(|(key, _)| names.contains(&key.as_str()));
    if !removed.is_empty() {
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
    }
    removed
}

fn encode(component: &str) -> String {
    utf8_percent_encode(component, COMPONENT).to_string()
}

fn decode(component: &str) -> String {
    percent_decode_str(component)
        .decode_utf8_lossy()
        .into_owned()
}

fn decode_utf8(component: &str) -> Result<String, ()> {
    percent_decode_str(component)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ())
}

/// `sqlite://` or `sqlite:`, as sqlx strips it.
fn sqlite_prefix(raw: &str) -> &'static str {
    if raw.starts_with("sqlite://") {
        "sqlite://"
    } else {
        "sqlite:"
    }
}

/// The file part of an SQLite URL: between the scheme and the `?`.
fn sqlite_file(raw: &str) -> &str {
    let rest = &raw[sqlite_prefix(raw).len()..];
    rest.split_once('?').map_or(rest, |(file, _)| file)
}

fn sqlite_params(raw: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let params = raw.split_once('?').map_or("", |(_, params)| params);
    url::form_urlencoded::parse(params.as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "p@ss:w/rd%";

    fn parsed(raw: &str) -> DatabaseUrl {
        match DatabaseUrl::parse(raw) {
            Ok(url) => url,
            Err(err) => panic!("{raw} should parse: {err}"),
        }
    }

    fn secret(url: &DatabaseUrl) -> Option<&str> {
        url.password().map(ExposeSecret::expose_secret)
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
            assert_eq!(url.without_password(), "postgres://u@db:5432/inv", "{raw}");
            assert_eq!(url.expose_secret(), "postgres://u:pw@db:5432/inv", "{raw}");
            assert_eq!(secret(&url), Some("pw"), "{raw}");
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
            assert_eq!(url.without_password(), "mysql://u@db:3306/inv", "{raw}");
            assert_eq!(url.expose_secret(), "mysql://u:pw@db:3306/inv", "{raw}");
            assert_eq!(url.to_string(), "mysql://u:***@db:3306/inv", "{raw}");
            assert_eq!(secret(&url), Some("pw"), "{raw}");
        }
        let other = parsed("mariadb://root@127.0.0.1/mysql").with_database("test_42");
        assert_eq!(other.without_password(), "mysql://root@127.0.0.1/test_42");
        let parts = other
            .server_parts()
            .unwrap_or_else(|| panic!("a server URL"));
        assert_eq!(
            (
                parts.host.as_str(),
                parts.port.as_str(),
                parts.database.as_str()
            ),
            ("127.0.0.1", "3306", "test_42")
        );
    }

    #[test]
    fn a_mysql_url_takes_the_drivers_ssl_mode_spellings() {
        assert!(DatabaseUrl::parse("mysql://u@db/inv?ssl-mode=REQUIRED").is_ok());
        assert!(DatabaseUrl::parse("mysql://u@db/inv?ssl-mode=verify_identity").is_ok());
        let err = DatabaseUrl::parse("mysql://u:s3cret@db/inv?ssl-mode=require")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("VERIFY_IDENTITY"), "{err}");
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
            assert_eq!(url.without_password(), raw);
            assert_eq!(url.expose_secret(), raw);
            assert_eq!(url.to_string(), raw);
            assert!(url.password().is_none());
        }
        assert_eq!(
            parsed("SQLite://x.db").without_password(),
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
                "whole number",
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
            let err = match DatabaseUrl::parse(raw) {
                Ok(url) => panic!("{raw} ({reason}) should fail, got {url}"),
                Err(err) => err.to_string(),
            };
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
            match DatabaseUrl::parse(raw) {
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
        let err = DatabaseUrl::parse("postgres://u:s3cret@db/inv?sslmode=sometimes")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                r#"invalid DATABASE_URL="postgres://u:***@db/inv?sslmode=sometimes": sslmode="sometimes" is not one of disable, prefer, require, verify-ca, verify-full"#
            )
        );
        let err = DatabaseUrl::parse("oracle://u:s3cret@db/inv")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
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
        assert_eq!(
            url.without_password(),
            "postgres://app@db:5432/inv?sslmode=require"
        );
    }

    #[test]
    fn a_password_given_as_a_query_parameter_is_moved_out_of_the_url() {
        let url = parsed("postgres://app@db/inv?sslmode=require&password=s3cret");
        assert_eq!(secret(&url), Some("s3cret"));
        assert_eq!(
            url.without_password(),
            "postgres://app@db/inv?sslmode=require"
        );
        assert_eq!(url.to_string(), "postgres://app:***@db/inv?sslmode=require");

        let socket = parsed("postgres:///inv?host=/run/postgresql&password=s3cret");
        assert_eq!(
            socket.without_password(),
            "postgres:///inv?host=%2Frun%2Fpostgresql"
        );
        assert!(!socket.to_string().contains("s3cret"));
        assert!(socket.expose_secret().contains("password=s3cret"));
    }

    #[test]
    fn a_percent_encoded_password_is_decoded_and_encoded_again_for_the_driver() {
        let url = parsed("postgres://app:p%40ss%3Aw%2Frd%25@db/inv");
        assert_eq!(secret(&url), Some(HOSTILE));
        let again = parsed(&url.expose_secret());
        assert_eq!(secret(&again), Some(HOSTILE));
        assert_eq!(again.without_password(), "postgres://app@db/inv");
    }

    #[test]
    fn an_empty_password_counts_as_none() {
        assert!(parsed("postgres://app:@db/inv").password().is_none());
        assert!(parsed("postgres://app@db/inv").password().is_none());
    }

    #[test]
    fn parts_are_assembled_into_a_postgres_url_with_a_hostile_password_encoded() {
        let url = DatabaseUrl::from_parts(
            "db.internal",
            6543,
            "app user",
            Some(SecretString::from(HOSTILE)),
            "inv/entory",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url.without_password(),
            "postgres://app%20user@db.internal:6543/inv%2Fentory"
        );
        assert_eq!(
            url.expose_secret(),
            "postgres://app%20user:p%40ss%3Aw%2Frd%25@db.internal:6543/inv%2Fentory"
        );
        let reparsed = parsed(&url.expose_secret());
        assert_eq!(secret(&reparsed), Some(HOSTILE));
        assert_eq!(reparsed.database_name().as_deref(), Some("inv/entory"));
        assert!(!url.to_string().contains("p@ss"));
        assert!(!format!("{url:?}").contains("p@ss"));
    }

    #[test]
    fn an_ipv6_host_and_a_socket_directory_can_be_assembled() {
        let v6 = DatabaseUrl::from_parts("::1", 5432, "postgres", None, "postgres");
        assert_eq!(
            v6.map(|u| u.without_password()).ok().as_deref(),
            Some("postgres://postgres@[::1]:5432/postgres")
        );
        let socket = DatabaseUrl::from_parts("/run/postgresql", 5432, "postgres", None, "inv");
        let socket = socket.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            socket.server_parts().map(|p| p.host).as_deref(),
            Some("/run/postgresql")
        );
    }

    #[test]
    fn a_host_that_cannot_be_in_a_url_is_rejected_naming_db_host() {
        let err = DatabaseUrl::from_parts("bad host", 5432, "postgres", None, "postgres")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with(r#"invalid DB_HOST="bad host": expected a host name"#),
            "{err}"
        );
    }

    #[test]
    fn the_database_name_is_read_from_the_path_or_the_file() {
        let cases = [
            ("postgres://u@db/inv", Some("inv")),
            ("postgres://u@db/inv?dbname=other", Some("other")),
            ("postgres://u@db", None),
            ("sqlite://inventory.db?mode=rwc", Some("inventory.db")),
            ("sqlite:///var/lib/data.db", Some("/var/lib/data.db")),
            ("sqlite::memory:", None),
        ];
        for (raw, name) in cases {
            assert_eq!(parsed(raw).database_name().as_deref(), name, "{raw}");
        }
    }

    #[test]
    fn with_database_keeps_server_and_credentials() {
        let url = parsed("postgres://app:s3cret@db:5432/inv?sslmode=require&dbname=x");
        let other = url.with_database("test_42");
        assert_eq!(
            other.expose_secret(),
            "postgres://app:s3cret@db:5432/test_42?sslmode=require"
        );
        assert_eq!(other.database_name().as_deref(), Some("test_42"));

        let cases = [
            (
                "sqlite://inventory.db?mode=rwc",
                "sqlite://test_42.db?mode=rwc",
            ),
            ("sqlite:///tmp/dir/inv.db", "sqlite:///tmp/dir/test_42.db"),
            ("sqlite:inv.db", "sqlite:test_42.db"),
            ("sqlite::memory:", "sqlite::memory:"),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                parsed(raw).with_database("test_42").without_password(),
                expected
            );
        }
        assert_eq!(
            parsed("sqlite://inventory.db?mode=rwc")
                .with_database("other.sqlite")
                .without_password(),
            "sqlite://other.sqlite?mode=rwc"
        );
    }

    #[test]
    fn in_memory_sqlite_is_recognised() {
        assert!(parsed("sqlite::memory:").is_in_memory());
        assert!(parsed("sqlite://?mode=memory").is_in_memory());
        assert!(parsed("sqlite://file.db?mode=memory&cache=shared").is_in_memory());
        assert!(!parsed("sqlite://inventory.db?mode=rwc").is_in_memory());
        assert!(!parsed("postgres://db/inv").is_in_memory());
    }

    #[test]
    fn postgres_parts_reflect_what_the_driver_will_use() {
        let parts = parsed("postgres://app%20x:pw@db.internal/inv").server_parts();
        let parts = parts.unwrap_or_else(|| panic!("postgres"));
        assert_eq!(parts.host, "db.internal");
        assert_eq!(parts.port, "5432");
        assert_eq!(parts.user, "app x");
        assert_eq!(parts.database, "inv");
        assert!(parsed("sqlite::memory:").server_parts().is_none());
    }
}
