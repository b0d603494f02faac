//! What went wrong in the database, classified once from a `DbErr` (SQLSTATE, MariaDB error number,
//! SQLite result code, pool timeout, lost connection), and how each kind reaches the client
//! (`docs/api.md`, *Errors*).

use sea_orm::sqlx;
#[cfg(feature = "mysql")]
use sea_orm::sqlx::mysql::MySqlDatabaseError;
use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};

/// What went wrong in the database, decided once from a `DbErr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// SQLSTATE 40001: retry the whole transaction.
    SerializationFailure,
    /// SQLSTATE 40P01, MariaDB 1213: retry the whole transaction.
    Deadlock,
    /// MariaDB 1205 (`innodb_lock_wait_timeout`): InnoDB rolls back only the statement, but the
    /// request's transaction is rolled back as for any failure, and re-run like a deadlock.
    LockWaitTimeout,
    /// SQLSTATE 23505, with the constraint's name when the server gives it.
    UniqueViolation(Option<String>),
    /// SQLSTATE 23503.
    ForeignKeyViolation(Option<String>),
    /// SQLSTATE 23514.
    CheckViolation(Option<String>),
    /// SQLSTATE 22003: a value left its column's range.
    OutOfRange,
    /// SQLSTATE 57014: `statement_timeout` (or a cancel); MariaDB 1969 `max_statement_time`.
    StatementTimeout,
    /// No connection within the pool's acquire timeout.
    PoolTimeout,
    /// The connection or the server went away.
    Unavailable,
    /// The server said it is no longer a primary that takes this transaction: SQLSTATE 25006
    /// in a transaction begun READ WRITE (a demoted primary, or a standby a router still points
    /// at; in a READ ONLY one it is the handler's write, a bug), 57P01/57P02/57P03 (administrator or crash shutdown, cannot connect now) or class 08
    /// sent by the server. Before `COMMIT` the request is re-run within
    /// `DB_FAILOVER_RETRY_MS` while a new primary takes over; past it, 503 like
    /// [`FailureKind::Unavailable`]. A reply that never came (a round-trip bound that passed)
    /// is not this: it stays [`FailureKind::Unavailable`], a partition.
    PrimaryLost,
    /// The connection broke while `COMMIT` was in flight and the transaction's status could
    /// not be learned: it may or may not have committed.
    CommitOutcomeUnknown,
    /// Anything else: a bug or an unexpected server condition.
    Other,
}

impl FailureKind {
    /// A short text safe to show to an operator (no SQL, no server text).
    pub fn describe(&self) -> &'static str {
        match self {
            FailureKind::SerializationFailure => "serialization failure",
            FailureKind::Deadlock => "deadlock",
            FailureKind::LockWaitTimeout => "lock wait timeout",
            FailureKind::UniqueViolation(_) => "unique violation",
            FailureKind::ForeignKeyViolation(_) => "foreign key violation",
            FailureKind::CheckViolation(_) => "check violation",
            FailureKind::OutOfRange => "value out of range",
            FailureKind::StatementTimeout => "statement timeout",
            FailureKind::PoolTimeout => "no pooled connection became free in time",
            FailureKind::Unavailable => "the database cannot be reached",
            FailureKind::PrimaryLost => "the primary was lost",
            FailureKind::CommitOutcomeUnknown => "the outcome of a COMMIT is unknown",
            FailureKind::Other => "database error",
        }
    }
}

/// A classified database error. `message` is for logs only: it may carry SQL and server text.
#[derive(Clone, Debug)]
pub struct DbFailure {
    /// What kind of failure it is.
    pub kind: FailureKind,
    /// The driver's text: for logs only (it may carry SQL and server text).
    pub message: String,
}

impl DbFailure {
    /// A serialization failure, deadlock or lock wait timeout: the whole transaction may be re-run.
    ///
    /// ```
    /// use sea_orm_actix_tx::{DbFailure, FailureKind};
    ///
    /// let conflict = DbFailure { kind: FailureKind::Deadlock, message: String::new() };
    /// assert!(conflict.is_retryable());
    /// let taken = DbFailure {
    ///     kind: FailureKind::UniqueViolation(Some("account_email_key".into())),
    ///     message: String::new(),
    /// };
    /// assert!(!taken.is_retryable(), "a constraint is the service's to answer");
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::SerializationFailure
                | FailureKind::Deadlock
                | FailureKind::LockWaitTimeout
        )
    }

    /// Whether the failure is the whole transaction's rather than one statement's: the
    /// transaction must be re-run (a serialization failure, a deadlock, which MariaDB answers by
    /// rolling the whole transaction back) or its connection is gone. Rolling back to a
    /// savepoint does not forgive it.
    pub fn dooms_transaction(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::SerializationFailure
                | FailureKind::Deadlock
                | FailureKind::PoolTimeout
                | FailureKind::Unavailable
                | FailureKind::PrimaryLost
                | FailureKind::CommitOutcomeUnknown
        )
    }

    /// Classifies a SeaORM error once: SQLSTATE (PostgreSQL, SQLite's result codes), MariaDB's error number, the pool, the connection.
    pub fn classify(err: &DbErr) -> DbFailure {
        let kind = match err {
            DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => FailureKind::PoolTimeout,
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => FailureKind::Unavailable,
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
                classify_sqlx(e)
            }
            DbErr::Exec(RuntimeErr::Internal(_)) | DbErr::Query(RuntimeErr::Internal(_)) => {
                FailureKind::Other
            }
            _ => FailureKind::Other,
        };
        DbFailure {
            kind,
            message: err.to_string(),
        }
    }
}

fn classify_sqlx(err: &sqlx::Error) -> FailureKind {
    match err {
        #[cfg(feature = "mysql")]
        sqlx::Error::Database(db) if db.try_downcast_ref::<MySqlDatabaseError>().is_some() => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map_or(FailureKind::Other, classify_mysql),
        sqlx::Error::Database(db) => {
            let constraint = db.constraint().map(str::to_owned);
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                "40001" => FailureKind::SerializationFailure,
                "40P01" => FailureKind::Deadlock,
                "23505" => FailureKind::UniqueViolation(constraint),
                "23503" => FailureKind::ForeignKeyViolation(constraint),
                "23514" => FailureKind::CheckViolation(constraint),
                "22003" => FailureKind::OutOfRange,
                "57014" => FailureKind::StatementTimeout,
                // admin or crash shutdown, cannot connect now, connection exceptions: the primary
                // is gone (25006, a read-only transaction, is one only in a transaction begun
                // READ WRITE: the request's transaction decides, `lazy.rs`)
                "57P01" | "57P02" | "57P03" => FailureKind::PrimaryLost,
                c if c.starts_with("08") => FailureKind::PrimaryLost,
                // too many connections, and the rest of class 57P
                c if c.starts_with("57P") || c == "53300" => FailureKind::Unavailable,
                // SQLite reports constraint failures by extended result code
                "2067" | "1555" => FailureKind::UniqueViolation(constraint),
                "787" => FailureKind::ForeignKeyViolation(constraint),
                "275" => FailureKind::CheckViolation(constraint),
                // SQLITE_BUSY / SQLITE_LOCKED: another writer holds the lock; retry like 40001
                "5" | "6" | "517" | "261" => FailureKind::SerializationFailure,
                _ => FailureKind::Other,
            }
        }
        sqlx::Error::PoolTimedOut => FailureKind::PoolTimeout,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => FailureKind::Unavailable,
        _ => FailureKind::Other,
    }
}

#[cfg(feature = "mysql")]
/// MariaDB (and MySQL): by error number, because one SQLSTATE (23000) covers unique, foreign-key
/// and CHECK violations; the constraint's name is read from the message, as the server gives
/// no separate field for it. Numbers without a case of their own fall back to the SQLSTATE.
fn classify_mysql(err: &MySqlDatabaseError) -> FailureKind {
    let message = err.message();
    match err.number() {
        1213 => FailureKind::Deadlock,
        1205 => FailureKind::LockWaitTimeout,
        // Duplicate entry 'x' for key 'account_email_key'
        1062 | 1586 => FailureKind::UniqueViolation(quoted_after(message, "for key '", '\'')),
        // ... a foreign key constraint fails (`db`.`t`, CONSTRAINT `name` FOREIGN KEY ...)
        1216 | 1217 | 1451 | 1452 => {
            FailureKind::ForeignKeyViolation(quoted_after(message, "CONSTRAINT `", '`'))
        }
        // MariaDB: CONSTRAINT `name` failed for `db`.`t`; MySQL: Check constraint 'name' is violated.
        4025 => FailureKind::CheckViolation(quoted_after(message, "CONSTRAINT `", '`')),
        3819 => FailureKind::CheckViolation(quoted_after(message, "constraint '", '\'')),
        // Out of range value for column / BIGINT value is out of range
        1264 | 1690 => FailureKind::OutOfRange,
        // max_statement_time exceeded (MariaDB), max_execution_time exceeded (MySQL)
        1969 | 3024 => FailureKind::StatementTimeout,
        // too many connections, server shutdown, connection killed, server gone away / lost
        1040 | 1053 | 1927 | 2006 | 2013 => FailureKind::Unavailable,
        _ => match err.code().unwrap_or_default() {
            "40001" => FailureKind::SerializationFailure,
            c if c.starts_with("08") => FailureKind::Unavailable,
            _ => FailureKind::Other,
        },
    }
}

/// The text between `prefix` and the next `end` in `message`.
#[cfg_attr(not(feature = "mysql"), allow(dead_code))]
fn quoted_after(message: &str, prefix: &str, end: char) -> Option<String> {
    let start = message.find(prefix)? + prefix.len();
    let rest = &message[start..];
    rest.find(end).map(|stop| rest[..stop].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_names_are_read_from_mariadb_messages() {
        let cases = [
            (
                "Duplicate entry 'a@example.org' for key 'account_email_key'",
                "for key '",
                '\'',
                Some("account_email_key"),
            ),
            (
                "Cannot add or update a child row: a foreign key constraint fails (`db`.`payment`, \
                 CONSTRAINT `payment_account_fkey` FOREIGN KEY (`account_id`) REFERENCES `account` (`id`))",
                "CONSTRAINT `",
                '`',
                Some("payment_account_fkey"),
            ),
            (
                "CONSTRAINT `account_balance_nonnegative` failed for `db`.`account`",
                "CONSTRAINT `",
                '`',
                Some("account_balance_nonnegative"),
            ),
            ("Duplicate entry", "for key '", '\'', None),
            ("for key 'unterminated", "for key '", '\'', None),
        ];
        for (message, prefix, end, expected) in cases {
            assert_eq!(
                quoted_after(message, prefix, end).as_deref(),
                expected,
                "{message}"
            );
        }
    }
}
