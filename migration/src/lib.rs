//! The schema of the inventory ledger as sea-orm-migration migrations. `Migrator` lists them in
//! order; `src/main.rs` is the CLI that `sea-orm-cli migrate` runs.

pub use sea_orm_migration::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m20261122_000001_create_inventory;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        // The inventory's tables, then the database layer's own (`Idempotency-Key`).
        let mut all: Vec<Box<dyn MigrationTrait>> =
            vec![Box::new(m20261122_000001_create_inventory::Migration)];
        all.extend(sea_orm_actix_tx::migrations::all());
        all
    }
}
