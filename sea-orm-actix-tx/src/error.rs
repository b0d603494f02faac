//! [`Error`], the layer's own failures, and how each reaches the client: RFC 9457 problem details
//! (`application/problem+json`) with a stable `code`. The service's own errors render the same
//! body through [`problem_response`]. A body never carries SQL, a stack trace or a secret:
//! database errors are logged where they are classified and answered with a fixed text.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::transaction::{DbFailure, FailureKind};

/// Seconds a client is told to wait after a 503 (`Retry-After`).
pub const RETRY_AFTER_SECONDS: &str = "1";

/// The media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A failure of the layer: the pool, the database, the transaction's rules, `Idempotency-Key`,
/// the request body. Each is answered as problem+json with a stable `code`, and a 503 tells the
/// client when to retry:
///
/// ```
/// use actix_web::ResponseError;
/// use sea_orm_actix_tx::Error;
///
/// let busy = Error::StatementTimeout.error_response();
/// assert_eq!(busy.status().as_u16(), 503);
/// assert_eq!(busy.headers().get("retry-after").unwrap(), "1");
/// assert_eq!(Error::StatementTimeout.code(), "statement_timeout");
/// // Only a retry with the same Idempotency-Key is safe: no Retry-After.
/// let unknown = Error::CommitOutcomeUnknown.error_response();
/// assert_eq!(unknown.status().as_u16(), 500);
/// assert!(unknown.headers().get("retry-after").is_none());
/// ```
/// Domain errors (a constraint that means "already exists", a missing row) are
/// the service's: it maps a [`DbFailure`] to them (see [`Layer::builder`](crate::Layer::builder)'s
/// `on_failure`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 503 `pool_timeout`: no connection within `DB_POOL_TIMEOUT`.
    #[error("no database connection became free in time; retry later")]
    PoolTimeout,
    /// 503 `database_unavailable`: the database cannot be reached.
    #[error("the database is unavailable; retry later")]
    DatabaseUnavailable,
    /// 503 `serialization_failure`: conflicts outlasted `DB_TX_MAX_RETRIES`.
    #[error("the request kept conflicting with concurrent requests; retry later")]
    SerializationFailure,
    /// 503 `statement_timeout`: a statement ran past `DB_STATEMENT_TIMEOUT_MS`.
    #[error("a database statement took too long (waiting on a lock?); retry later")]
    StatementTimeout,
    /// 500 `commit_outcome_unknown`: the connection broke during `COMMIT` and the outcome could
    /// not be established. No `Retry-After`: only a retry with the same `Idempotency-Key` is
    /// safe.
    #[error(
        "the connection to the database broke during the commit and its outcome is unknown; \
         retry only with the same Idempotency-Key"
    )]
    CommitOutcomeUnknown,
    /// 409 `idempotency_key_in_use`: another request with the same `Idempotency-Key` is still
    /// running.
    #[error("another request with this Idempotency-Key is still being processed; retry later")]
    IdempotencyKeyInUse,
    /// 422 `idempotency_key_reused`: the `Idempotency-Key` was used for a different request.
    #[error(
        "this Idempotency-Key was used for a different request (method, path, content type or body)"
    )]
    IdempotencyKeyReused,
    /// 422 `validation_failed`: the `Idempotency-Key` header is not 1..=255 visible ASCII
    /// characters, or is sent twice.
    #[error("{0}")]
    MalformedIdempotencyKey(String),
    /// 413 `payload_too_large`: the body is over the body limit (`APP_BODY_LIMIT`).
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 400 `malformed_json`: the request body could not be read (the client broke it off).
    #[error("the request body could not be read")]
    BodyUnreadable,
    /// A database failure the layer does not answer itself (a constraint violation, a value out
    /// of range, anything unexpected): 500 `internal`, unless the service maps it first.
    #[error("database failure: {}", .0.kind.describe())]
    Database(DbFailure),
    /// 500 `internal`: a handler panicked, a transaction handle outlived its request, or `Tx`
    /// was asked for on a route without the middleware. Logged where it happened.
    #[error("an internal error occurred")]
    Internal,
    /// 499 `client_closed_request`: the client went away before the commit, so the work was
    /// rolled back. Nobody receives it; it exists for the request log and metrics.
    #[error("the client closed the connection before the transaction committed")]
    ClientClosedRequest,
}

impl Error {
    /// The stable machine-readable `code` of the problem body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::PoolTimeout => "pool_timeout",
            Error::DatabaseUnavailable => "database_unavailable",
            Error::SerializationFailure => "serialization_failure",
            Error::StatementTimeout => "statement_timeout",
            Error::CommitOutcomeUnknown => "commit_outcome_unknown",
            Error::IdempotencyKeyInUse => "idempotency_key_in_use",
            Error::IdempotencyKeyReused => "idempotency_key_reused",
            Error::MalformedIdempotencyKey(_) => "validation_failed",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::BodyUnreadable => "malformed_json",
            Error::Database(_) | Error::Internal => "internal",
            Error::ClientClosedRequest => "client_closed_request",
        }
    }

    /// Every `code` an [`Error`] can put in a body a client receives.
    pub const CODES: &'static [&'static str] = &[
        "pool_timeout",
        "database_unavailable",
        "serialization_failure",
        "statement_timeout",
        "commit_outcome_unknown",
        "idempotency_key_in_use",
        "idempotency_key_reused",
        "validation_failed",
        "payload_too_large",
        "malformed_json",
        "internal",
    ];
}

impl From<DbFailure> for Error {
    /// What the layer answers for a classified failure. Conflicts become
    /// `serialization_failure` (once the retries are spent), the pool and the network 503s, a
    /// lost `COMMIT` reply `commit_outcome_unknown`; the rest [`Error::Database`].
    fn from(failure: DbFailure) -> Error {
        match failure.kind {
            FailureKind::SerializationFailure
            | FailureKind::Deadlock
            | FailureKind::LockWaitTimeout => Error::SerializationFailure,
            FailureKind::PoolTimeout => Error::PoolTimeout,
            FailureKind::Unavailable | FailureKind::PrimaryLost => Error::DatabaseUnavailable,
            FailureKind::StatementTimeout => Error::StatementTimeout,
            FailureKind::CommitOutcomeUnknown => {
                tracing::error!(error = %failure.message, "the outcome of a COMMIT is unknown");
                Error::CommitOutcomeUnknown
            }
            _ => Error::Database(failure),
        }
    }
}

impl From<sea_orm::DbErr> for Error {
    fn from(err: sea_orm::DbErr) -> Error {
        Error::from(DbFailure::classify(&err))
    }
}

/// The body of every error response (RFC 9457 plus a stable `code`).
#[derive(Debug, Serialize)]
pub struct Problem {
    /// Always `about:blank`: the `code` says what happened.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The reason phrase of `status`.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, in words.
    pub detail: String,
    /// The stable machine-readable code.
    pub code: &'static str,
}

/// A problem+json response; a 503 carries `Retry-After`.
pub fn problem_response(status: StatusCode, code: &'static str, detail: String) -> HttpResponse {
    let problem = Problem {
        kind: "about:blank",
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail,
        code,
    };
    let mut response = HttpResponse::build(status);
    response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
    }
    response.json(problem)
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        match self {
            Error::PoolTimeout
            | Error::DatabaseUnavailable
            | Error::SerializationFailure
            | Error::StatementTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Error::CommitOutcomeUnknown | Error::Database(_) | Error::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Error::IdempotencyKeyInUse => StatusCode::CONFLICT,
            Error::IdempotencyKeyReused | Error::MalformedIdempotencyKey(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BodyUnreadable => StatusCode::BAD_REQUEST,
            Error::ClientClosedRequest => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let detail = match self {
            Error::Database(failure) => {
                tracing::error!(error = %failure.message, "database error");
                Error::Internal.to_string()
            }
            other => other.to_string(),
        };
        problem_response(self.status_code(), self.code(), detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_a_client_can_receive_is_listed() {
        let failure = DbFailure {
            kind: FailureKind::Other,
            message: String::new(),
        };
        let errors = [
            Error::PoolTimeout,
            Error::DatabaseUnavailable,
            Error::SerializationFailure,
            Error::StatementTimeout,
            Error::CommitOutcomeUnknown,
            Error::IdempotencyKeyInUse,
            Error::IdempotencyKeyReused,
            Error::MalformedIdempotencyKey(String::new()),
            Error::PayloadTooLarge(1),
            Error::BodyUnreadable,
            Error::Database(failure),
            Error::Internal,
        ];
        for error in &errors {
            assert!(Error::CODES.contains(&error.code()), "{}", error.code());
        }
        assert!(!Error::CODES.contains(&Error::ClientClosedRequest.code()));
    }

    #[test]
    fn a_503_carries_retry_after_and_commit_outcome_unknown_does_not() {
        let busy = Error::StatementTimeout.error_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(busy.headers().contains_key(header::RETRY_AFTER));
        let unknown = Error::CommitOutcomeUnknown.error_response();
        assert_eq!(unknown.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!unknown.headers().contains_key(header::RETRY_AFTER));
    }
}
