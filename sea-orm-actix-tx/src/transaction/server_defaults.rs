//! What every session of the database behind a transaction-mode pooler starts with, learned once
//! at start-up, so that a transaction's `BEGIN` sets only what differs from it
//! ([`Pooled`](super::session::Pooled), `docs/scale-out.md`).
//!
//! One simple query through the pooler reads `pg_settings`: one message, which the pooler runs
//! whole on one server connection. One is enough: every server connection PgBouncer opens for
//! the same database and user starts from the same defaults (`postgresql.conf`, then `ALTER
//! DATABASE … SET`, `ALTER ROLE … SET`, `ALTER ROLE … IN DATABASE … SET`), and behind the pooler
//! the layer never changes a setting outside a transaction (`SET LOCAL` ends with it). A default
//! changed while the service runs is learned at its next start; until then a transaction may run
//! with the new default of a setting it no longer sets, so change defaults before a deploy, not
//! under a running service.

use sea_orm::IsolationLevel;

/// The query: `setting` is in the setting's base unit (milliseconds for `statement_timeout` and `idle_in_transaction_session_timeout`),
/// as the layer writes its `SET LOCAL` values.
#[cfg(feature = "postgres")]
const QUERY: &str = "SELECT name, setting FROM pg_settings \
     WHERE name IN ('default_transaction_isolation', 'jit', 'statement_timeout', \
     'idle_in_transaction_session_timeout')";

/// The server's defaults of the settings the layer may set, as `pg_settings` spells them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ServerDefaults {
    settings: Vec<(String, String)>,
}

impl ServerDefaults {
    /// Defaults from (name, setting) pairs.
    #[cfg(test)]
    pub(super) fn of(settings: impl IntoIterator<Item = (String, String)>) -> ServerDefaults {
        ServerDefaults {
            settings: settings.into_iter().collect(),
        }
    }

    /// Reads them through `pool` (one round trip, once).
    #[cfg(feature = "postgres")]
    pub(super) async fn read(
        pool: &sea_orm::sqlx::PgPool,
    ) -> Result<ServerDefaults, sea_orm::sqlx::Error> {
        use sea_orm::sqlx::Row as _;
        let rows = sea_orm::sqlx::raw_sql(QUERY).fetch_all(pool).await?;
        let settings = rows
            .iter()
            .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?)))
            .collect::<Result<Vec<_>, sea_orm::sqlx::Error>>()?;
        Ok(ServerDefaults { settings })
    }

    /// The default of `name`, if the server has that setting.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.as_str())
    }

    /// `default_transaction_isolation`, if it is one of the four levels.
    pub(super) fn isolation(&self) -> Option<IsolationLevel> {
        match self.get("default_transaction_isolation")? {
            "read uncommitted" => Some(IsolationLevel::ReadUncommitted),
            "read committed" => Some(IsolationLevel::ReadCommitted),
            "repeatable read" => Some(IsolationLevel::RepeatableRead),
            "serializable" => Some(IsolationLevel::Serializable),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_read_by_name_and_the_isolation_parsed() {
        let defaults = ServerDefaults::of([
            ("jit".to_owned(), "off".to_owned()),
            (
                "default_transaction_isolation".to_owned(),
                "repeatable read".to_owned(),
            ),
        ]);
        assert_eq!(defaults.get("jit"), Some("off"));
        assert_eq!(defaults.get("statement_timeout"), None);
        assert_eq!(defaults.isolation(), Some(IsolationLevel::RepeatableRead));
        assert_eq!(ServerDefaults::default().isolation(), None);
    }
}
