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
//!   response to replay, with `created_at`/`expires_at`), primary key `request_key`, and the
//!   index `idempotency_key_expires_idx` on `expires_at`. Raw SQL per backend: PostgreSQL
//!   (`text`, `bytea`, `timestamptz`), MariaDB/MySQL (`varchar(255)` key, `char(64)`
//!   fingerprint, `longblob` body, `datetime(6)`), SQLite (`text`, `blob`).
//! * `m20261204_000001_scope_idempotency_key`: scopes the keys. Adds `scope`, the request's
//!   scope ([`LayerBuilder::idempotency_scope`](crate::LayerBuilder::idempotency_scope); the
//!   default scope is the empty string, the column's default), and moves the primary key to
//!   (`scope`, `request_key`). PostgreSQL: `scope text`, the primary key dropped and added again,
//!   stored keys kept (in the default scope). MariaDB/MySQL: `scope varbinary(255)` (compared
//!   byte for byte; the key's index is 255 + 1020 bytes, within InnoDB's 3072), the primary key
//!   swapped in one `ALTER TABLE`, stored keys kept. SQLite, which cannot alter a primary key:
//!   the table is dropped and created again in the new shape, forgetting the stored keys (a
//!   short-lived cache). `down` restores the first migration's table (on PostgreSQL and
//!   MariaDB after deleting the rows of non-default scopes).
//!
//! Expired rows are deleted by the layer itself, not by a database job: after one in
//! [`CLEAN_ONE_IN`](crate::transaction::CLEAN_ONE_IN) requests that store a key, a background
//! transaction deletes up to 100 rows whose `expires_at` has passed (by the `expires_at`
//! index; on PostgreSQL `FOR UPDATE SKIP LOCKED`, so concurrent cleaners do not wait for each
//! other). [`clean_expired_idempotency_keys`](crate::transaction::clean_expired_idempotency_keys)
//! does one batch on demand. An expired row is never replayed, even before it is deleted.

use sea_orm_migration::MigrationTrait;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbErr};

mod m20261201_000001_create_idempotency_key;
mod m20261204_000001_scope_idempotency_key;

/// Runs each `;`-separated statement of `sql` (DDL written per backend) on `db`.
async fn execute_script(db: &impl ConnectionTrait, sql: &str) -> Result<(), DbErr> {
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        db.execute_unprepared(statement).await?;
    }
    Ok(())
}

/// Every migration of the layer, oldest first. Their names are stable: a database that
/// recorded one keeps it.
pub fn all() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m20261201_000001_create_idempotency_key::Migration),
        Box::new(m20261204_000001_scope_idempotency_key::Migration),
    ]
}
