//! The schema: the `todo` table, then the layer's own tables (`Idempotency-Key`).

use sea_orm_migration::prelude::*;

pub use sea_orm_migration::MigratorTrait;

mod m20260101_000001_create_todo;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all: Vec<Box<dyn MigrationTrait>> =
            vec![Box::new(m20260101_000001_create_todo::Migration)];
        all.extend(sea_orm_actix_tx::migrations::all());
        all
    }
}
