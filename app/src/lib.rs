//! The inventory service: an actix-web application over a SeaORM pool, built on the database
//! layer `sea-orm-actix-tx` (a transaction per request, replica reads, `Idempotency-Key`,
//! metrics) exactly as another service would use it. Here: the inventory API (`routes`,
//! `domain`), its errors (`problem`), and operations (`telemetry`, `metrics`, health).
//! `startup::Application` builds it for `main` and the tests.

pub mod cli;
pub mod domain;
pub mod json;
pub mod json_log;
pub mod log_writer;
pub mod metrics;
pub mod problem;
pub mod routes;
pub mod startup;
pub mod telemetry;

pub use startup::{Application, StartupError};

/// The inventory's own defaults: the name PostgreSQL shows for its connections, and the
/// embedded SQLite file it serves from when no database is configured.
pub const DEFAULTS: config::Defaults = config::Defaults {
    application_name: "inventory-api",
    database_url: "sqlite://inventory.db?mode=rwc",
};
