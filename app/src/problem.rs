//! The HTTP face of every failure: one enum whose variants are the error codes of API.md §3, each
//! rendered as RFC 9457 problem details (`application/problem+json`). Database and unexpected
//! errors are logged where they are classified and answered here with a generic text, so a body
//! never carries SQL, a stack trace or a secret. Also the handlers that turn actix's own
//! rejections (unknown route, wrong method, bad path or query) into the same bodies.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `malformed_json`: the body is not JSON.
    #[error("{0}")]
    MalformedJson(String),
    /// 413 `payload_too_large`: the body is over `APP_BODY_LIMIT` bytes.
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415 `unsupported_media_type`: a body without a JSON content type.
    #[error("the request body must be sent as application/json")]
    UnsupportedMediaType,
    /// 404 `not_found`: an unknown route or id.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("this method is not allowed on this resource")]
    MethodNotAllowed,
    /// 409 `already_exists`: a unique key is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// 409 `insufficient_stock`: the stock would become negative.
    #[error("{0}")]
    InsufficientStock(String),
    /// 409 `idempotency_key_in_use`: another request with the same `Idempotency-Key` is
    /// still running.
    #[error("another request with this Idempotency-Key is still being processed; retry later")]
    IdempotencyKeyInUse,
    /// 422 `idempotency_key_reused`: the `Idempotency-Key` was used for a different request.
    #[error("this Idempotency-Key was used for a different request (method, path or body)")]
    IdempotencyKeyReused,
    /// 422 `validation_failed`: the text names the field.
    #[error("{0}")]
    Validation(String),
    /// 503 `pool_timeout`: no connection within `DB_POOL_TIMEOUT`.
    #[error("no database connection became free in time; retry later")]
    PoolTimeout,
    /// 503 `database_unavailable`: the database cannot be reached.
    #[error("the database is unavailable; retry later")]
    DatabaseUnavailable,
    /// 503 `serialization_failure`: conflicts outlasted `DB_TX_MAX_RETRIES`.
    #[error("the request kept conflicting with concurrent requests; retry later")]
    SerializationFailure,
    /// 500 `commit_outcome_unknown`: the connection broke during `COMMIT` and the outcome
    /// could not be established. No `Retry-After`: only a retry with the same
    /// `Idempotency-Key` is safe.
    #[error(
        "the connection to the database broke during the commit and its outcome is unknown; \
         retry only with the same Idempotency-Key"
    )]
    CommitOutcomeUnknown,
    /// 500 `internal`: logged where it happened; the body says nothing more.
    #[error("an internal error occurred")]
    Internal,
    /// 499 `client_closed_request`: the client went away before the commit, so the work was
    /// rolled back. Nobody receives it; it exists for the request log and metrics (the status
    /// nginx uses for the same event).
    #[error("the client closed the connection before the transaction committed")]
    ClientClosedRequest,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::AlreadyExists(_) => "already_exists",
            ApiError::InsufficientStock(_) => "insufficient_stock",
            ApiError::IdempotencyKeyInUse => "idempotency_key_in_use",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::Validation(_) => "validation_failed",
            ApiError::PoolTimeout => "pool_timeout",
            ApiError::DatabaseUnavailable => "database_unavailable",
            ApiError::SerializationFailure => "serialization_failure",
            ApiError::CommitOutcomeUnknown => "commit_outcome_unknown",
            ApiError::Internal => "internal",
            ApiError::ClientClosedRequest => "client_closed_request",
        }
    }
}

/// The body of every error response (RFC 9457 plus our stable `code`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the `code` says what happened.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable error code (API.md §3).
    pub code: &'static str,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AlreadyExists(_)
            | ApiError::InsufficientStock(_)
            | ApiError::IdempotencyKeyInUse => StatusCode::CONFLICT,
            ApiError::Validation(_) | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::PoolTimeout
            | ApiError::DatabaseUnavailable
            | ApiError::SerializationFailure => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::CommitOutcomeUnknown | ApiError::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::ClientClosedRequest => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let problem = Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: self.code(),
        };
        let mut response = HttpResponse::build(status);
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
        }
        response.json(problem)
    }
}

/// `default_service` of the app: any path no route knows.
pub async fn unknown_route() -> HttpResponse {
    ApiError::NotFound("no such route".into()).error_response()
}

/// `default_service` of every resource: a path that exists, with a method it does not serve.
pub async fn method_not_allowed() -> HttpResponse {
    ApiError::MethodNotAllowed.error_response()
}

/// `PathConfig` error handler: an id that is not a positive integer names no resource.
pub fn path_error(_: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::NotFound("no such resource".into()).into()
}

/// `QueryConfig` error handler: a malformed query string.
pub fn query_error(err: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::Validation(format!("query: {err}")).into()
}
