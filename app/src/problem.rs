//! The HTTP face of every failure: one enum whose variants are the error codes of `docs/api.md`
//! (*Errors*), each rendered as RFC 9457 problem details (`application/problem+json`). Database and
//! unexpected errors are logged where they are classified and answered here with a generic text, so
//! a body never carries SQL, a stack trace or a secret. Also the handlers that turn actix's own
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

/// The media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every `code` a client can receive (`docs/api.md`, *Errors*): the values the OpenAPI document
/// allows in [`Problem::code`]. `client_closed_request` is not among them: nobody receives it.
pub const ERROR_CODES: &[&str] = &[
    "malformed_json",
    "payload_too_large",
    "unsupported_media_type",
    "not_found",
    "method_not_allowed",
    "already_exists",
    "insufficient_stock",
    "validation_failed",
    "pool_timeout",
    "database_unavailable",
    "serialization_failure",
    "idempotency_key_in_use",
    "idempotency_key_reused",
    "commit_outcome_unknown",
    "internal",
];

/// The schema of [`Problem::code`]: a string, one of [`ERROR_CODES`].
pub struct ErrorCode;

impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(ERROR_CODES.iter().copied()))
            .description(Some(
                "Stable machine-readable error code: branch on it and the status, never on `detail`.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for ErrorCode {}

/// The body of every error response (RFC 9457 plus our stable `code`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the `code` says what happened.
    #[serde(rename = "type")]
    #[schema(value_type = String, pattern = "^about:blank$")]
    pub kind: &'static str,
    /// The reason phrase of `status`.
    pub title: String,
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What went wrong, in words; for `validation_failed` it names the field.
    pub detail: String,
    #[schema(value_type = ErrorCode)]
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
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
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
/// `allow` lists the methods it does serve (RFC 9110 requires the header on a 405).
pub fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = ApiError::MethodNotAllowed.error_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// `PathConfig` error handler: an id that is not a positive integer names no resource.
pub fn path_error(_: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::NotFound("no such resource".into()).into()
}

/// `QueryConfig` error handler: a malformed query string.
pub fn query_error(err: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::Validation(format!("query: {err}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_a_client_can_receive_is_in_the_documented_list() {
        let errors = [
            ApiError::MalformedJson(String::new()),
            ApiError::PayloadTooLarge(1),
            ApiError::UnsupportedMediaType,
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::AlreadyExists(String::new()),
            ApiError::InsufficientStock(String::new()),
            ApiError::Validation(String::new()),
            ApiError::PoolTimeout,
            ApiError::DatabaseUnavailable,
            ApiError::SerializationFailure,
            ApiError::IdempotencyKeyInUse,
            ApiError::IdempotencyKeyReused,
            ApiError::CommitOutcomeUnknown,
            ApiError::Internal,
            ApiError::ClientClosedRequest,
        ];
        for err in &errors {
            // No wildcard on purpose: a new variant does not compile here until it is listed
            // above and its code in ERROR_CODES (or here, if no client can receive it).
            let received = match err {
                ApiError::ClientClosedRequest => false,
                ApiError::MalformedJson(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::UnsupportedMediaType
                | ApiError::NotFound(_)
                | ApiError::MethodNotAllowed
                | ApiError::AlreadyExists(_)
                | ApiError::InsufficientStock(_)
                | ApiError::Validation(_)
                | ApiError::PoolTimeout
                | ApiError::DatabaseUnavailable
                | ApiError::SerializationFailure
                | ApiError::IdempotencyKeyInUse
                | ApiError::IdempotencyKeyReused
                | ApiError::CommitOutcomeUnknown
                | ApiError::Internal => true,
            };
            assert_eq!(
                ERROR_CODES.contains(&err.code()),
                received,
                "{}",
                err.code()
            );
        }
        assert_eq!(ERROR_CODES.len(), errors.len() - 1, "a code listed twice");
    }

    #[test]
    fn a_405_says_which_methods_are_allowed() {
        let response = method_not_allowed("GET, HEAD");
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            response.headers().get(header::ALLOW),
            Some(&HeaderValue::from_static("GET, HEAD"))
        );
    }
}
