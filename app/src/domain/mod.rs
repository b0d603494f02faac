//! The inventory's rules, apart from HTTP: functions that take `&impl ConnectionTrait` (so they
//! run inside a request's transaction or a job's) and return domain values or a `DomainError`.

pub mod catalog;
pub mod error;
mod rendered;
pub mod stock;
pub mod values;

pub use error::DomainError;
