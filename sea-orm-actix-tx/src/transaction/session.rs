//! What a connection may rely on: session state on a direct connection, nothing behind a
//! transaction-mode pooler (`DB_POOLER=transaction`, `docs/scale-out.md`).
//!
//! On a direct connection the server settings travel once, as startup parameters (`-c jit=off
//! -c default_transaction_isolation=…`, see the `config` crate), and statements are prepared by
//! name and cached per connection. Behind PgBouncer in `pool_mode = transaction`, one client
//! connection's consecutive transactions run on whatever server connection is free, so:
//!
//! * Settings are applied inside every transaction, in the same simple-query message as its
//!   `BEGIN` (`BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL jit = off; SET LOCAL
//!   statement_timeout = 1500`): one round trip, the same count as a direct `BEGIN`. `SET
//!   LOCAL` ends with the transaction, so nothing leaks into the next client's transaction.
//!   Only what differs from the server's defaults is sent, once those are learned at start-up
//!   ([`Pooled::learn`], `server_defaults.rs`): with the database's or role's defaults set to
//!   the service's settings (`ALTER DATABASE … SET`, `docs/scale-out.md`) a transaction begins
//!   with `BEGIN` alone.
//! * No statement is prepared by name: a named statement outlives its transaction on a server
//!   connection that another client gets next (sqlx's `sqlx_s_1` of two clients collide, or one
//!   runs the other's). Statements use the unnamed statement instead, which is safe inside a
//!   transaction because the pooler keeps the server connection until `COMMIT`. It costs one
//!   more round trip per statement (Parse/Describe, then Bind/Execute): the price of the pooler.
//! * Every statement runs inside a transaction, the readiness check included
//!   ([`Session::ping_sql`]); outside one, Parse and Execute may reach different servers.
//!
//! MariaDB connections are always direct (no pooler is supported for it): the default isolation
//! level and `max_statement_time` are set once per connection (the `config` crate), and
//! [`Session::start_transaction`] writes MariaDB's `START TRANSACTION`.
//!
//! Migrations are refused through the pooler (`app migrate`, and the `migration` crate's CLI):
//! they prepare named statements outside any request transaction.

use sea_orm::sqlx;
use sea_orm::{AccessMode, IsolationLevel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[cfg(feature = "postgres")]
use super::server_defaults::ServerDefaults;

/// How transactions begin and statements are sent on one pool's connections.
#[derive(Clone, Debug)]
pub enum Session {
    /// Session state is kept: connections carry `connection_default` as their default
    /// isolation level (a startup parameter; `None` where the backend has none, e.g. SQLite).
    Direct {
        /// The isolation level the connections start with (`None`: the server's).
        connection_default: Option<IsolationLevel>,
    },
    /// A transaction-mode pooler: nothing outlives a transaction.
    Pooled(Pooled),
}

/// The settings of a transaction behind a transaction-mode pooler: what the service asks for,
/// and what the server's sessions already start with. Clones share what was learned.
#[derive(Clone, Debug)]
pub struct Pooled {
    /// `SET LOCAL` name and value of each setting the service asks for (`DB_JIT`,
    /// `DB_STATEMENT_TIMEOUT_MS`), the value as `pg_settings` spells it.
    wanted: Vec<(&'static str, String)>,
    /// What differs from the server's defaults, once learned ([`Pooled::learn`]).
    learned: Arc<OnceLock<Learned>>,
}

/// What a `BEGIN` must still say once the server's defaults are known.
#[derive(Debug)]
struct Learned {
    /// The server's `default_transaction_isolation` (`None`: not one of the four levels).
    isolation: Option<IsolationLevel>,
    /// The settings whose server default differs from the service's.
    differ: Vec<&'static str>,
    /// Their `SET LOCAL`s, each after a `; `, appended to every `BEGIN` (empty when none).
    set_local: String,
}

impl Pooled {
    /// `jit` (`DB_JIT`), `statement_timeout` (`DB_STATEMENT_TIMEOUT_MS`) and
    /// `idle_in_transaction_session_timeout` (`DB_IDLE_IN_TRANSACTION_TIMEOUT_MS`: the server
    /// ends a transaction its client abandoned); a timeout that is `None` is not set, the
    /// server's own applies. Until [`Pooled::learn`] has run, every `BEGIN` names its isolation
    /// level and sets them all.
    pub fn new(
        jit: bool,
        statement_timeout: Option<Duration>,
        idle_in_transaction_timeout: Option<Duration>,
    ) -> Pooled {
        let mut wanted = vec![("jit", if jit { "on" } else { "off" }.to_owned())];
        let timeouts = [
            ("statement_timeout", statement_timeout),
            (
                "idle_in_transaction_session_timeout",
                idle_in_transaction_timeout,
            ),
        ];
        for (name, timeout) in timeouts {
            if let Some(timeout) = timeout {
                wanted.push((name, timeout.as_millis().to_string()));
            }
        }
        Pooled {
            wanted,
            learned: Arc::new(OnceLock::new()),
        }
    }

    /// Learns the server's defaults through the pooler (`pool`: one simple query, on one server
    /// connection, see `server_defaults.rs` for why one is enough); from then on a `BEGIN` names
    /// its isolation level only when it differs from the server's default, and sets only the
    /// settings whose default differs. Only the first success counts.
    #[cfg(feature = "postgres")]
    pub async fn learn(&self, pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
        let defaults = ServerDefaults::read(pool).await?;
        self.adopt(&defaults);
        Ok(())
    }

    /// Learns in the background, within `bound`; a failure is logged, and every setting is
    /// still sent.
    #[cfg(feature = "postgres")]
    pub(crate) fn learn_in_background(&self, pool: sqlx::PgPool, bound: Duration) {
        let pooled = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(bound, pooled.learn(&pool)).await {
                Ok(Ok(())) => tracing::info!(
                    server_isolation = ?pooled.server_isolation(),
                    set_local = ?pooled.set_local(),
                    "server defaults learned through the pooler"
                ),
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    "could not learn the server defaults through the pooler; every transaction sets every setting"
                ),
                Err(_) => tracing::warn!(
                    "no server defaults through the pooler within DB_CONNECT_TIMEOUT; every transaction sets every setting"
                ),
            }
        });
    }

    #[cfg(feature = "postgres")]
    fn adopt(&self, defaults: &ServerDefaults) {
        let differ: Vec<&'static str> = self
            .wanted
            .iter()
            .filter(|(name, value)| defaults.get(name) != Some(value.as_str()))
            .map(|(name, _)| *name)
            .collect();
        let set_local = self.set_local_sql(|name| differ.contains(&name));
        let _ = self.learned.set(Learned {
            isolation: defaults.isolation(),
            differ,
            set_local,
        });
    }

    fn set_local_sql(&self, include: impl Fn(&'static str) -> bool) -> String {
        let mut sql = String::new();
        for (name, value) in self.wanted.iter().filter(|(name, _)| include(name)) {
            sql.push_str(&format!("; SET LOCAL {name} = {value}"));
        }
        sql
    }

    /// The settings every transaction sets with `SET LOCAL` because the server's default
    /// differs from the service's; `None` until the defaults are learned (then every setting
    /// is set).
    pub fn set_local(&self) -> Option<&[&'static str]> {
        self.learned.get().map(|l| l.differ.as_slice())
    }

    /// The server's `default_transaction_isolation`, once learned.
    pub fn server_isolation(&self) -> Option<IsolationLevel> {
        self.learned.get().and_then(|l| l.isolation)
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    fn begin(&self, isolation: IsolationLevel, access: AccessMode) -> BeginSql {
        match self.learned.get() {
            Some(learned) => {
                let isolation = (learned.isolation != Some(isolation)).then_some(isolation);
                let begin = begin(isolation, access);
                if learned.set_local.is_empty() {
                    BeginSql::Static(begin)
                } else {
                    BeginSql::Owned(format!("{begin}{}", learned.set_local))
                }
            }
            None => BeginSql::Owned(format!(
                "{}{}",
                begin(Some(isolation), access),
                self.set_local_sql(|_| true)
            )),
        }
    }
}

/// The `BEGIN` of one transaction, as sent.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(super) enum BeginSql {
    Static(&'static str),
    Owned(String),
}

impl BeginSql {
    /// The same `BEGIN` followed, in the same message, by `more` (`; …`).
    #[cfg(feature = "postgres")]
    pub(super) fn followed_by(self, more: impl std::fmt::Display) -> BeginSql {
        use std::fmt::Write as _;
        let mut sql = match self {
            BeginSql::Static(sql) => sql.to_owned(),
            BeginSql::Owned(sql) => sql,
        };
        // Room for `outcome::BeginRead`'s `SELECT` (formatted for every transaction) at once.
        sql.reserve(320);
        // Writing into a `String` cannot fail.
        let _ = write!(sql, "{more}");
        BeginSql::Owned(sql)
    }

    /// The statement text, without copying a static one.
    pub(super) fn sql(&self) -> sqlx::SqlStr {
        match self {
            BeginSql::Static(sql) => sqlx::SqlSafeStr::into_sql_str(*sql),
            BeginSql::Owned(sql) => {
                sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql.clone()))
            }
        }
    }
}

impl Session {
    /// The statement(s) that begin a transaction at `isolation` with `access`, in one message.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn begin(&self, isolation: IsolationLevel, access: AccessMode) -> BeginSql {
        match self {
            Session::Direct { connection_default } => {
                // The connection's default isolation needs no clause.
                let isolation = (*connection_default != Some(isolation)).then_some(isolation);
                BeginSql::Static(begin(isolation, access))
            }
            Session::Pooled(pooled) => pooled.begin(isolation, access),
        }
    }

    /// MariaDB's `START TRANSACTION` at `isolation` with `access`, as one text message. The
    /// level cannot be part of `START TRANSACTION`: when it differs from the connection's
    /// default, a `SET TRANSACTION ISOLATION LEVEL …` (which applies to the next transaction
    /// only) goes first in the same message, so it is still one round trip.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub(super) fn start_transaction(
        &self,
        isolation: IsolationLevel,
        access: AccessMode,
    ) -> BeginSql {
        let connection_default = match self {
            Session::Direct { connection_default } => *connection_default,
            Session::Pooled(_) => None,
        };
        let isolation = (connection_default != Some(isolation)).then_some(isolation);
        BeginSql::Static(start_transaction(isolation, access))
    }

    /// Whether statements may be prepared by name and cached on the connection.
    pub(super) fn named_statements(&self) -> bool {
        matches!(self, Session::Direct { .. })
    }

    /// What `/health/ready` and `app ping` send: inside a transaction behind a pooler (one
    /// simple-query message, one round trip either way).
    pub fn ping_sql(&self) -> &'static str {
        match self {
            Session::Direct { .. } => "SELECT 1",
            Session::Pooled(_) => "BEGIN READ ONLY; SELECT 1; COMMIT",
        }
    }
}

/// `BEGIN` with the isolation level and access mode in the statement itself.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn begin(isolation: Option<IsolationLevel>, access: AccessMode) -> &'static str {
    use IsolationLevel::*;
    let read_only = access == AccessMode::ReadOnly;
    match (isolation, read_only) {
        (None, false) => "BEGIN",
        (None, true) => "BEGIN READ ONLY",
        (Some(ReadUncommitted), false) => "BEGIN ISOLATION LEVEL READ UNCOMMITTED",
        (Some(ReadUncommitted), true) => "BEGIN ISOLATION LEVEL READ UNCOMMITTED, READ ONLY",
        (Some(ReadCommitted), false) => "BEGIN ISOLATION LEVEL READ COMMITTED",
        (Some(ReadCommitted), true) => "BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY",
        (Some(RepeatableRead), false) => "BEGIN ISOLATION LEVEL REPEATABLE READ",
        (Some(RepeatableRead), true) => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        (Some(Serializable), false) => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        (Some(Serializable), true) => "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY",
    }
}

/// MariaDB: `START TRANSACTION`, after a `SET TRANSACTION` for a level other than the default.
#[cfg_attr(not(feature = "mysql"), allow(dead_code))]
fn start_transaction(isolation: Option<IsolationLevel>, access: AccessMode) -> &'static str {
    use IsolationLevel::*;
    let read_only = access == AccessMode::ReadOnly;
    match (isolation, read_only) {
        (None, false) => "START TRANSACTION",
        (None, true) => "START TRANSACTION READ ONLY",
        (Some(ReadUncommitted), false) => {
            "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; START TRANSACTION"
        }
        (Some(ReadUncommitted), true) => {
            "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; START TRANSACTION READ ONLY"
        }
        (Some(ReadCommitted), false) => {
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION"
        }
        (Some(ReadCommitted), true) => {
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION READ ONLY"
        }
        (Some(RepeatableRead), false) => {
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; START TRANSACTION"
        }
        (Some(RepeatableRead), true) => {
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; START TRANSACTION READ ONLY"
        }
        (Some(Serializable), false) => {
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; START TRANSACTION"
        }
        (Some(Serializable), true) => {
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; START TRANSACTION READ ONLY"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(b: BeginSql) -> String {
        match b {
            BeginSql::Static(s) => s.to_owned(),
            BeginSql::Owned(s) => s,
        }
    }

    #[test]
    fn a_direct_begin_names_only_what_differs_from_the_connection_default() {
        let direct = Session::Direct {
            connection_default: Some(IsolationLevel::RepeatableRead),
        };
        let cases = [
            (
                IsolationLevel::RepeatableRead,
                AccessMode::ReadWrite,
                "BEGIN",
            ),
            (
                IsolationLevel::RepeatableRead,
                AccessMode::ReadOnly,
                "BEGIN READ ONLY",
            ),
            (
                IsolationLevel::ReadCommitted,
                AccessMode::ReadWrite,
                "BEGIN ISOLATION LEVEL READ COMMITTED",
            ),
            (
                IsolationLevel::Serializable,
                AccessMode::ReadOnly,
                "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY",
            ),
        ];
        for (isolation, access, expected) in cases {
            assert_eq!(sql(direct.begin(isolation, access)), expected);
        }
        assert!(direct.named_statements());
        assert_eq!(direct.ping_sql(), "SELECT 1");
    }

    #[test]
    fn a_pooled_begin_carries_every_setting_in_one_message() {
        let pooled = Session::Pooled(Pooled::new(
            false,
            Some(Duration::from_millis(1500)),
            Some(Duration::from_secs(30)),
        ));
        assert_eq!(
            sql(pooled.begin(IsolationLevel::RepeatableRead, AccessMode::ReadOnly)),
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET LOCAL jit = off; \
             SET LOCAL statement_timeout = 1500; \
             SET LOCAL idle_in_transaction_session_timeout = 30000"
        );
        let plain = Session::Pooled(Pooled::new(true, None, None));
        assert_eq!(
            sql(plain.begin(IsolationLevel::ReadCommitted, AccessMode::ReadWrite)),
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL jit = on"
        );
        assert!(!pooled.named_statements());
        assert!(pooled.ping_sql().starts_with("BEGIN READ ONLY;"));
    }

    #[test]
    #[cfg(feature = "postgres")]
    fn once_the_server_defaults_are_learned_a_pooled_begin_sets_only_what_differs() {
        let defaults = |isolation: &str, jit: &str, timeout: &str| {
            ServerDefaults::of(
                [
                    ("default_transaction_isolation", isolation),
                    ("jit", jit),
                    ("statement_timeout", timeout),
                ]
                .map(|(n, v)| (n.to_owned(), v.to_owned())),
            )
        };
        let pooled = Pooled::new(false, Some(Duration::from_millis(1500)), None);
        assert_eq!(pooled.set_local(), None, "nothing learned yet");
        pooled.adopt(&defaults("repeatable read", "off", "1500"));
        assert_eq!(pooled.set_local(), Some(&[][..]));
        assert_eq!(
            pooled.server_isolation(),
            Some(IsolationLevel::RepeatableRead)
        );
        let session = Session::Pooled(pooled.clone());
        assert_eq!(
            sql(session.begin(IsolationLevel::RepeatableRead, AccessMode::ReadOnly)),
            "BEGIN READ ONLY"
        );
        assert_eq!(
            sql(session.begin(IsolationLevel::ReadCommitted, AccessMode::ReadWrite)),
            "BEGIN ISOLATION LEVEL READ COMMITTED",
            "a route's own level still travels in its BEGIN"
        );
        pooled.adopt(&defaults("read committed", "on", "0"));
        assert_eq!(
            pooled.set_local(),
            Some(&[][..]),
            "the first learning counts"
        );

        let differs = Pooled::new(false, Some(Duration::from_millis(1500)), None);
        differs.adopt(&defaults("read committed", "off", "0"));
        assert_eq!(differs.set_local(), Some(&["statement_timeout"][..]));
        assert_eq!(
            sql(Session::Pooled(differs)
                .begin(IsolationLevel::RepeatableRead, AccessMode::ReadOnly)),
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET LOCAL statement_timeout = 1500"
        );
    }

    #[test]
    fn a_mariadb_start_transaction_sets_only_a_level_that_differs_from_the_default() {
        let direct = Session::Direct {
            connection_default: Some(IsolationLevel::RepeatableRead),
        };
        let cases = [
            (
                IsolationLevel::RepeatableRead,
                AccessMode::ReadWrite,
                "START TRANSACTION",
            ),
            (
                IsolationLevel::RepeatableRead,
                AccessMode::ReadOnly,
                "START TRANSACTION READ ONLY",
            ),
            (
                IsolationLevel::ReadCommitted,
                AccessMode::ReadWrite,
                "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION",
            ),
            (
                IsolationLevel::Serializable,
                AccessMode::ReadOnly,
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; START TRANSACTION READ ONLY",
            ),
        ];
        for (isolation, access, expected) in cases {
            assert_eq!(sql(direct.start_transaction(isolation, access)), expected);
        }
    }
}
