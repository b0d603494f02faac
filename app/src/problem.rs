//! The HTTP face of every failure: one enum whose variants are the error codes of `docs/api.md`
//! (*Errors*), each rendered as RFC 9457 problem details (`application/problem+json`). Database and
//! unexpected errors are logged where they are classified and answered here with a generic text, so
//! a body never carries SQL, a stack trace or a secret. Also the handlers that turn actix's own
//! rejections (unknown route, wrong method, bad path or query) into the same bodies.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use sea_orm::DbErr;
use sea_orm_actix_tx::{DbFailure, Error as LayerError, FailureKind, problem_response};
use serde::Serialize;

pub use sea_orm_actix_tx::PROBLEM_JSON;

/// Every failure of the service: the inventory's own, and the database layer's.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `malformed_json`: the body is not JSON.
    #[error("{0}")]
    MalformedJson(String),
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
    /// 422 `validation_failed`: the text names the field.
    #[error("{0}")]
    Validation(String),
    /// The database layer's failures (pool, database, transaction rules, `Idempotency-Key`,
    /// body size), answered as the layer renders them.
    #[error(transparent)]
    Layer(#[from] LayerError),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::AlreadyExists(_) => "already_exists",
            ApiError::InsufficientStock(_) => "insufficient_stock",
            ApiError::Validation(_) => "validation_failed",
            ApiError::Layer(e) => e.code(),
        }
    }

    /// The inventory's meaning of a constraint the database enforced, when it has one: a taken
    /// unique key, a stock row that would go negative, a missing referenced row, a value out of
    /// range. `None` for everything the layer answers itself.
    pub fn of_constraint(failure: &DbFailure) -> Option<ApiError> {
        Some(match &failure.kind {
            FailureKind::UniqueViolation(_) => {
                ApiError::AlreadyExists("a record with the same unique key exists".into())
            }
            FailureKind::CheckViolation(Some(c)) if c.contains("quantity") => {
                ApiError::InsufficientStock("the stock would become negative".into())
            }
            FailureKind::ForeignKeyViolation(_) => {
                ApiError::NotFound("a referenced record does not exist".into())
            }
            FailureKind::OutOfRange => {
                ApiError::Validation("quantity: the result would exceed the supported range".into())
            }
            _ => return None,
        })
    }
}

impl From<DbFailure> for ApiError {
    fn from(failure: DbFailure) -> ApiError {
        ApiError::of_constraint(&failure).unwrap_or_else(|| ApiError::Layer(failure.into()))
    }
}

impl From<DbErr> for ApiError {
    fn from(err: DbErr) -> ApiError {
        ApiError::from(DbFailure::classify(&err))
    }
}

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
    "statement_timeout",
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
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AlreadyExists(_) | ApiError::InsufficientStock(_) => StatusCode::CONFLICT,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Layer(e) => e.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Layer(e) => e.error_response(),
            other => problem_response(other.status_code(), other.code(), other.to_string()),
        }
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
        let own = [
            ApiError::MalformedJson(String::new()),
            ApiError::UnsupportedMediaType,
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::AlreadyExists(String::new()),
            ApiError::InsufficientStock(String::new()),
            ApiError::Validation(String::new()),
        ];
        for err in &own {
            // No wildcard on purpose: a new variant does not compile here until it is listed
            // above and its code in ERROR_CODES.
            match err {
                ApiError::MalformedJson(_)
                | ApiError::UnsupportedMediaType
                | ApiError::NotFound(_)
                | ApiError::MethodNotAllowed
                | ApiError::AlreadyExists(_)
                | ApiError::InsufficientStock(_)
                | ApiError::Validation(_)
                | ApiError::Layer(_) => {}
            }
            assert!(ERROR_CODES.contains(&err.code()), "{}", err.code());
        }
        for code in LayerError::CODES {
            assert!(ERROR_CODES.contains(code), "the layer's {code}");
        }
        let mut all: Vec<&str> = own.iter().map(ApiError::code).collect();
        all.extend(LayerError::CODES);
        all.sort_unstable();
        all.dedup();
        let mut listed = ERROR_CODES.to_vec();
        listed.sort_unstable();
        assert_eq!(
            all, listed,
            "ERROR_CODES lists exactly the codes a client can receive"
        );
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
