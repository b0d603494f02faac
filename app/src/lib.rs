//! The inventory service: an actix-web application over a SeaORM pool, with a transaction per
//! request (`transaction`), the inventory API (`routes`, `domain`), and operations
//! (`telemetry`, `metrics`, health). `startup::Application` builds it for `main` and the tests.

pub mod availability;
pub mod cli;
pub mod db;
pub mod domain;
pub mod headers;
pub mod json;
pub mod metrics;
pub mod problem;
pub mod routes;
pub mod startup;
pub mod telemetry;
pub mod transaction;

pub use startup::{Application, StartupError};
pub use transaction::{
    Transactional, Tx, TxConfig, TxPolicy, TxSavepoint, TxStream, with_transaction,
};
