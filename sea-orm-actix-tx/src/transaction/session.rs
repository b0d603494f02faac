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
use std::time::Duration;

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
    Pooled {
        /// `DB_JIT`, set inside every transaction.
        jit: bool,
        /// `DB_STATEMENT_TIMEOUT_MS`, set inside every transaction.
        statement_timeout: Option<Duration>,
    },
}

/// The `BEGIN` of one transaction, as sent.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(super) enum BeginSql {
    Static(&'static str),
    Owned(String),
}

impl BeginSql {
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
            Session::Pooled {
                jit,
                statement_timeout,
            } => {
                let mut sql = format!(
                    "{}; SET LOCAL jit = {}",
                    begin(Some(isolation), access),
                    if *jit { "on" } else { "off" }
                );
                if let Some(timeout) = statement_timeout {
                    sql.push_str(&format!(
                        "; SET LOCAL statement_timeout = {}",
                        timeout.as_millis()
                    ));
                }
                BeginSql::Owned(sql)
            }
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
            Session::Pooled { .. } => None,
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
            Session::Pooled { .. } => "BEGIN READ ONLY; SELECT 1; COMMIT",
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
        let pooled = Session::Pooled {
            jit: false,
            statement_timeout: Some(Duration::from_millis(1500)),
        };
        assert_eq!(
            sql(pooled.begin(IsolationLevel::RepeatableRead, AccessMode::ReadOnly)),
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET LOCAL jit = off; \
             SET LOCAL statement_timeout = 1500"
        );
        let plain = Session::Pooled {
            jit: true,
            statement_timeout: None,
        };
        assert_eq!(
            sql(plain.begin(IsolationLevel::ReadCommitted, AccessMode::ReadWrite)),
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL jit = on"
        );
        assert!(!pooled.named_statements());
        assert!(pooled.ping_sql().starts_with("BEGIN READ ONLY;"));
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
