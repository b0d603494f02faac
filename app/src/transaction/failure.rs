//! What went wrong in the database, classified once from a `DbErr` (SQLSTATE, SQLite result
//! code, pool timeout, lost connection), and how each kind reaches the client (API.md §3).

use sea_orm::sqlx;
use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};

use crate::problem::ApiError;

/// What went wrong in the database, decided once from a `DbErr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// SQLSTATE 40001: retry the whole transaction.
    SerializationFailure,
    /// SQLSTATE 40P01: retry the whole transaction.
    Deadlock,
    /// SQLSTATE 23505, with the constraint's name when the server gives it.
    UniqueViolation(Option<String>),
    /// SQLSTATE 23503.
    ForeignKeyViolation(Option<String>),
    /// SQLSTATE 23514.
    CheckViolation(Option<String>),
    /// SQLSTATE 22003: a value left its column's range.
    OutOfRange,
    /// SQLSTATE 57014: `statement_timeout` (or a cancel).
    StatementTimeout,
    /// No connection within the pool's acquire timeout.
    PoolTimeout,
    /// The connection or the server went away.
    Unavailable,
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
            FailureKind::UniqueViolation(_) => "unique violation",
            FailureKind::ForeignKeyViolation(_) => "foreign key violation",
            FailureKind::CheckViolation(_) => "check violation",
            FailureKind::OutOfRange => "value out of range",
            FailureKind::StatementTimeout => "statement timeout",
            FailureKind::PoolTimeout => "no pooled connection became free in time",
            FailureKind::Unavailable => "the database cannot be reached",
            FailureKind::CommitOutcomeUnknown => "the outcome of a COMMIT is unknown",
            FailureKind::Other => "database error",
        }
    }
}

/// A classified database error. `message` is for logs only: it may carry SQL and server text.
#[derive(Clone, Debug)]
pub struct DbFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl DbFailure {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::SerializationFailure | FailureKind::Deadlock
        )
    }

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
                // connection exceptions, admin shutdown, crash recovery, too many connections
                c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                    FailureKind::Unavailable
                }
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

impl From<DbFailure> for ApiError {
    fn from(f: DbFailure) -> ApiError {
        match f.kind {
            FailureKind::SerializationFailure | FailureKind::Deadlock => {
                ApiError::SerializationFailure
            }
            FailureKind::UniqueViolation(_) => {
                ApiError::AlreadyExists("a record with the same unique key exists".into())
            }
            FailureKind::CheckViolation(Some(c)) if c.contains("quantity") => {
                ApiError::InsufficientStock("the stock would become negative".into())
            }
            FailureKind::ForeignKeyViolation(_) => {
                ApiError::NotFound("a referenced record does not exist".into())
            }
            FailureKind::PoolTimeout => ApiError::PoolTimeout,
            FailureKind::Unavailable => ApiError::DatabaseUnavailable,
            FailureKind::CommitOutcomeUnknown => {
                tracing::error!(error = %f.message, "the outcome of a COMMIT is unknown");
                ApiError::CommitOutcomeUnknown
            }
            FailureKind::OutOfRange => {
                ApiError::Validation("quantity: the result would exceed the supported range".into())
            }
            FailureKind::StatementTimeout | FailureKind::CheckViolation(_) | FailureKind::Other => {
                tracing::error!(error = %f.message, "database error");
                ApiError::Internal
            }
        }
    }
}

impl From<DbErr> for ApiError {
    fn from(err: DbErr) -> ApiError {
        ApiError::from(DbFailure::classify(&err))
    }
}
