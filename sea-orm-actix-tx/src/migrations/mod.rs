//! The layer's own tables, as sea-orm-migration migrations the service adds to its `Migrator`
//! after its own:
//!
//! ```ignore
//! fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!     let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(m20240101_000001_create_todo::Migration)];
//!     all.extend(sea_orm_actix_tx::migrations::all());
//!     all
//! }
//! ```
//!
//! * `m20261201_000001_create_idempotency_key`: the `idempotency_key` table of
//!   `Idempotency-Key` (one row per key of a completed `POST`: the request's fingerprint and the
//!   response to replay), on PostgreSQL, MariaDB/MySQL and SQLite. Expired rows are deleted by
//!   the layer itself, a batch at a time after some of the requests that store a key
//!   ([`clean_expired_idempotency_keys`](crate::transaction::clean_expired_idempotency_keys)
//!   does it on demand).

use sea_orm_migration::MigrationTrait;

mod m20261201_000001_create_idempotency_key;

/// Every migration of the layer, oldest first. Their names are stable: a database that
/// recorded one keeps it.
pub fn all() -> Vec<Box<dyn MigrationTrait>> {
    vec![Box::new(m20261201_000001_create_idempotency_key::Migration)]
}
