//! The one error type of the domain layer; `problem.rs` maps it to HTTP.

use sea_orm::DbErr;

use super::values::InvalidValue;
use crate::problem::ApiError;
use sea_orm_actix_tx::DbFailure;

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InsufficientStock(String),
    /// Classified once in `transaction.rs` (pool timeout, unavailable, 40001, ...).
    #[error("database error: {0}")]
    Database(#[from] DbErr),
}

impl From<DomainError> for ApiError {
    fn from(err: DomainError) -> ApiError {
        match err {
            DomainError::Invalid(v) => ApiError::Validation(v.to_string()),
            DomainError::NotFound(what) => ApiError::NotFound(what),
            DomainError::AlreadyExists(what) => ApiError::AlreadyExists(what),
            DomainError::InsufficientStock(what) => ApiError::InsufficientStock(what),
            DomainError::Database(e) => ApiError::from(DbFailure::classify(&e)),
        }
    }
}

impl From<InvalidValue> for ApiError {
    fn from(v: InvalidValue) -> ApiError {
        ApiError::Validation(v.to_string())
    }
}
