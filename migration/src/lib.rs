//! The schema of the inventory ledger as sea-orm-migration migrations. `Migrator` lists them in
//! order; `src/main.rs` is the CLI that `sea-orm-cli migrate` runs.

pub use sea_orm_migration::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m20261122_000001_create_inventory;
mod m20261201_000001_create_idempotency_key;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_create_inventory::Migration),
            Box::new(m20261201_000001_create_idempotency_key::Migration),
        ]
    }
}
