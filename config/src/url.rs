//! `DatabaseUrl`: a database URL normalised to what the driver reads (`postgresql://` and
//! `postgresql+<driver>://` to `postgres://`, `mariadb://` and `mysql+<driver>://` to
//! `mysql://`; or assembled from `DB_HOST`…`DB_NAME`), then parsed by the driver's own parser
//! (sqlx's `PgConnectOptions`, `MySqlConnectOptions`, `SqliteConnectOptions`). What is kept as
//! text is the URL with its password replaced by `***`, for messages and `check-config`: no
//! `Display`, `Debug` or error of this type can reveal the password.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use url::Url;

use crate::database::Backend;
use crate::error::ConfigError;
use crate::variables::{self as var, Env};

const EXPECTED_URL: &str = "expected postgres://user:password@host:port/database \
     (postgresql:// and postgresql+<driver>:// are accepted too), \
     mysql://user:password@host:port/database (or mariadb://) or sqlite://<file>?mode=rwc";

/// Characters left as they are in a user name, password or database name put into a URL: the
/// RFC 3986 unreserved set (`%` included in what is encoded: the `url` crate's setters would
/// take it as the start of an escape).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A database URL as the driver parsed it, and its text with the password as `***`.
#[derive(Clone)]
pub struct DatabaseUrl {
    pub(crate) target: Target,
    backend: Backend,
    /// An SQLite database that lives in memory: it disappears with its last connection.
    pub(crate) in_memory: bool,
    shown: String,
    has_password: bool,
}

/// The driver's options, per backend.
#[derive(Clone)]
pub(crate) enum Target {
    #[cfg(feature = "postgres")]
    Postgres(sea_orm::sqlx::postgres::PgConnectOptions),
    #[cfg(feature = "mysql")]
    Mysql(sea_orm::sqlx::mysql::MySqlConnectOptions),
    #[cfg(feature = "sqlite")]
    Sqlite(sea_orm::sqlx::sqlite::SqliteConnectOptions),
}

/// Host, port, user and database of a server URL as the driver will use them.
pub(crate) struct ServerParts {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
}

/// The [`ServerParts`] of PostgreSQL's or MariaDB's options (same getters): the host, or the
/// socket directory; a database left out is the user's name.
#[cfg(any(feature = "postgres", feature = "mysql"))]
macro_rules! server_parts {
    ($options:expr) => {{
        let (host, user) = ($options.get_host(), $options.get_username().to_owned());
        let socket = $options.get_socket().map(|path| path.display().to_string());
        ServerParts {
            host: socket.unwrap_or_else(|| host.to_owned()),
            port: $options.get_port(),
            database: $options.get_database().unwrap_or(&user).to_owned(),
            user,
        }
    }};
}

impl DatabaseUrl {
    /// Parses a database URL given in `variable` (`DATABASE_URL`, the one assembled from
    /// `DB_HOST`…, `DATABASE_REPLICA_URL`).
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when the value is not a URL, uses another scheme or
    /// a backend this build leaves out, or the driver refuses it (a bad `sslmode`, a password
    /// that is not UTF-8, …). The message shows the URL with its password as `***`, or no value
    /// at all when it cannot be parsed far enough to strip the password.
    pub(crate) fn parse(variable: &'static str, raw: &str) -> Result<DatabaseUrl, ConfigError> {
        let raw = raw.trim();
        let invalid = |value, expected| ConfigError::Invalid(variable, value, expected);
        // Without a `:` there is no scheme: refused below as an unknown one, and never shown.
        let (scheme, rest) = raw.split_once(':').unwrap_or(("", raw));
        let scheme = scheme.to_ascii_lowercase();
        let (backend, normalised) = match scheme.split('+').next().unwrap_or_default() {
            "postgres" | "postgresql" => (Backend::Postgres, format!("postgres:{rest}")),
            "mysql" | "mariadb" => (Backend::Mysql, format!("mysql:{rest}")),
            "sqlite" if scheme == "sqlite" => (Backend::Sqlite, format!("sqlite:{rest}")),
            // Shown only when it has an authority that can be stripped of its password: a bare
            // `word:word` could be a password pasted into the wrong variable.
            _ => match redact(raw) {
                Ok((shown, _)) if raw.contains("://") => {
                    let why = format!("the scheme is not supported; {EXPECTED_URL}");
                    return Err(invalid(Some(shown), why));
                }
                _ => return Err(invalid(None, EXPECTED_URL.into())),
            },
        };
        let (shown, has_password) = match redact(&normalised) {
            // SQLite's URL is shown as it is (sqlx reads its file name textually).
            Ok((_, had)) if backend == Backend::Sqlite => (normalised.clone(), had),
            Ok(redacted) => redacted,
            Err(err) if backend == Backend::Sqlite => {
                let why = format!(
                    "not a valid URL ({err}); percent-encode special characters in the file name"
                );
                return Err(invalid(Some(normalised), why));
            }
            Err(err) => return Err(invalid(None, format!("{err}; {EXPECTED_URL}"))),
        };
        let refused =
            |err: sea_orm::sqlx::Error| invalid(Some(shown.clone()), driver_refused(backend, &err));
        // An SQLite URL's file: `sqlite://<file>?…`, `sqlite:<file>` or `sqlite::memory:`.
        let file = normalised.trim_start_matches("sqlite:");
        let file = file.trim_start_matches("//");
        let file = file.split('?').next().unwrap_or_default();
        let in_memory = backend == Backend::Sqlite
            && (file == ":memory:" || normalised.contains("mode=memory"));
        let target = match backend {
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                let pg: sea_orm::sqlx::postgres::PgConnectOptions =
                    normalised.parse().map_err(refused)?;
                // A URL without a user means `postgres`, not `PGUSER` nor the OS user's name.
                let named = Url::parse(&normalised).is_ok_and(|u| {
                    !u.username().is_empty() || u.query_pairs().any(|(k, _)| k == "user")
                });
                Target::Postgres(if named { pg } else { pg.username("postgres") })
            }
            #[cfg(feature = "mysql")]
            Backend::Mysql => Target::Mysql(normalised.parse().map_err(refused)?),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite if file.is_empty() && !in_memory => {
                let why = "no database file; expected sqlite://<file>?mode=rwc or sqlite::memory:";
                return Err(invalid(Some(normalised), why.into()));
            }
            #[cfg(feature = "sqlite")]
            Backend::Sqlite => Target::Sqlite(normalised.parse().map_err(refused)?),
            #[allow(unreachable_patterns)]
            left_out => {
                let why = format!(
                    "this build leaves out {left_out}: it needs sea-orm-actix-tx's `{left_out}` feature"
                );
                return Err(invalid(Some(format!("{scheme}:…")), why));
            }
        };
        Ok(DatabaseUrl {
            target,
            backend,
            in_memory,
            shown,
            has_password,
        })
    }

    /// Which driver this URL is for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// True when the URL carries a password (shown as `***`).
    pub fn has_password(&self) -> bool {
        self.has_password
    }

    /// The last value of one of the named query parameters.
    pub(crate) fn query_param(&self, names: &[&str]) -> Option<String> {
        let url = Url::parse(&self.shown).ok()?;
        url.query_pairs()
            .into_owned()
            .filter(|(key, _)| names.contains(&key.as_str()))
            .last()
            .map(|(_, value)| value)
    }

    /// Host (or socket directory), port, user and database as the driver will use them; `None`
    /// for SQLite.
    pub(crate) fn server_parts(&self) -> Option<ServerParts> {
        match &self.target {
            #[cfg(feature = "postgres")]
            Target::Postgres(options) => Some(server_parts!(options)),
            #[cfg(feature = "mysql")]
            Target::Mysql(options) => Some(server_parts!(options)),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Which database this is, for a person and never with a password: `database "inv" on
    /// db.internal:5432 (postgres)`, or `SQLite file "inventory.db"`.
    pub fn describe(&self) -> String {
        match (&self.target, self.server_parts()) {
            (_, Some(p)) => format!(
                "database {:?} on {}:{} ({})",
                p.database, p.host, p.port, self.backend
            ),
            _ if self.in_memory => "the in-memory SQLite database".to_owned(),
            #[cfg(feature = "sqlite")]
            (Target::Sqlite(o), None) => {
                format!("SQLite file {:?}", o.get_filename().display().to_string())
            }
            #[allow(unreachable_patterns)]
            _ => self.shown.clone(),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    /// The URL with the password shown as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for DatabaseUrl {
    /// Like `Display`: the password as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl").field(&self.shown).finish()
    }
}

/// Why the driver refused a URL, with what it accepts where its own message does not say.
fn driver_refused(backend: Backend, err: &sea_orm::sqlx::Error) -> String {
    let why = err.to_string().replace("error with configuration: ", "");
    let accepted = match (why.contains("ssl_mode"), backend) {
        (true, Backend::Mysql) => {
            "ssl-mode is one of DISABLED, PREFERRED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY"
        }
        (true, _) => "sslmode is one of disable, prefer, require, verify-ca, verify-full",
        _ if why.contains("invalid digit") => {
            "statement-cache-capacity and port must be whole numbers"
        }
        _ => return why,
    };
    format!("{why}; {accepted}")
}

/// The URL with a password (user-info or `password=`) replaced by `***`, and whether it had one.
fn redact(raw: &str) -> Result<(String, bool), url::ParseError> {
    let mut url = Url::parse(raw)?;
    let mut pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let in_query = pairs.iter().any(|(key, _)| key == "password");
    let in_user_info = url.password().is_some();
    if in_user_info && url.set_password(Some("***")).is_err() {
        return Err(url::ParseError::EmptyHost);
    }
    if in_query {
        for (_, value) in pairs.iter_mut().filter(|(key, _)| key == "password") {
            *value = "***".to_owned();
        }
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    Ok((url.into(), in_user_info || in_query))
}

/// The PostgreSQL URL of `DB_HOST`, `DB_PORT`, `DB_USER`, `DB_PASSWORD` and `DB_NAME` (the
/// parts percent-encoded), parsed like `DATABASE_URL`; `None` when `DB_HOST` is unset.
pub(crate) fn assemble(env: &Env) -> Result<Option<DatabaseUrl>, ConfigError> {
    let Some(host) = env.given(&var::DB_HOST) else {
        return Ok(None);
    };
    let bad_host = || {
        let why = "expected a host name, an IP address or the path of a socket directory";
        ConfigError::Invalid("DB_HOST", Some(host.to_owned()), why.to_owned())
    };
    let port: u16 = env.parse(&var::DB_PORT)?;
    let encode = |text: &str| utf8_percent_encode(text, COMPONENT).to_string();
    let part = |var| encode(&env.value(var).unwrap_or_default());
    let (user, name) = (part(&var::DB_USER), part(&var::DB_NAME));
    let password = env.raw(&var::DB_PASSWORD).map(encode);
    let password = password.map(|p| format!(":{p}")).unwrap_or_default();
    let url = format!("postgres://{user}{password}@localhost:{port}/{name}");
    let mut url = Url::parse(&url).map_err(|_| bad_host())?;
    if host.starts_with('/') {
        url.query_pairs_mut().append_pair("host", host);
    } else {
        // An IPv6 address goes in brackets.
        let v6 = host.contains(':') && !host.starts_with('[');
        let (open, close) = if v6 { ("[", "]") } else { ("", "") };
        let host = format!("{open}{host}{close}");
        url.set_host(Some(&host)).map_err(|_| bad_host())?;
    }
    DatabaseUrl::parse("DB_HOST", url.as_str()).map(Some)
}

#[cfg(all(test, feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[path = "url_tests.rs"]
mod tests;
