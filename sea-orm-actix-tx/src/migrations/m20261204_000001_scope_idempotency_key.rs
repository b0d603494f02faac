//! Scopes `idempotency_key` (issue 19): a new column `scope`, and the primary key becomes
//! (`scope`, `request_key`), so the same key sent in two scopes (two users, two API clients) is two
//! rows and never replays across. The scope is what the service's `idempotency_scope` function
//! returns, at most 255 bytes (a longer one is stored hashed); rows that existed before, and
//! requests of a service without a scope function, are in the default scope, the empty string
//! (the column's default).
//!
//! Per backend (written with the schema builder, raw SQL only where it has no words for it):
//!
//! * PostgreSQL (in the migration's transaction): `scope text NOT NULL DEFAULT ''` is added (no
//!   rewrite: a constant default), the primary key `idempotency_key_pkey` is dropped and added
//!   again on (`scope`, `request_key`). The stored keys are kept, in the default scope.
//! * MariaDB/MySQL: `scope varbinary(255) NOT NULL DEFAULT ''` is added, and the primary key is
//!   replaced in one `ALTER TABLE` (atomic although MariaDB's DDL is not transactional). Binary,
//!   so scopes compare byte for byte: no case folding, no accent folding and no trailing-space
//!   padding between two users' ids, on MariaDB and MySQL alike. The key's index is 255 bytes of
//!   scope + 1020 of `request_key` (`varchar(255)`, 4 bytes a character in utf8mb4) = 1275 bytes,
//!   within InnoDB's 3072. The stored keys are kept, in the default scope. Each step can be run
//!   again if a previous run stopped halfway.
//! * SQLite cannot change a table's primary key: the table is dropped and created again in the
//!   new shape (in one transaction), with `scope text NOT NULL DEFAULT ''`. It only holds
//!   short-lived keys, but the keys stored before are forgotten: a retry after the upgrade of a
//!   request answered before it runs again.
//!
//! The fingerprint now covers the `Content-Type` too: on PostgreSQL and MariaDB a retry after
//! the upgrade of a request stored before it is answered 422 `idempotency_key_reused` (never run
//! twice) until the key expires.
//!
//! `down` returns to the shape of `m20261201_000001_create_idempotency_key`: on PostgreSQL and
//! MariaDB the rows of scopes other than the default are deleted first (the old key alone cannot
//! tell them apart), then the primary key is put back on `request_key` and `scope` is dropped; on
//! SQLite the table is dropped and created as that migration creates it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use super::m20261201_000001_create_idempotency_key::SQLITE_UP as SQLITE_UNSCOPED;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum IdempotencyKey {
    Table,
    Scope,
    RequestKey,
    Fingerprint,
    Status,
    ContentType,
    Location,
    Body,
    CreatedAt,
    ExpiresAt,
}

/// The primary key's name, as the first migration named it.
const PKEY: &str = "idempotency_key_pkey";
/// The index of the clean-up of expired keys, as the first migration named it.
const EXPIRES_IDX: &str = "idempotency_key_expires_idx";

// sea-query's ALTER TABLE can drop a constraint but not add a primary key (`Index::create()
// .primary()` only works inside CREATE TABLE), and MariaDB's primary key has no name to drop it
// by: those steps are raw SQL.
const POSTGRES_SCOPED_PKEY: &str = "ALTER TABLE idempotency_key ADD CONSTRAINT idempotency_key_pkey PRIMARY KEY (scope, request_key)";
const POSTGRES_UNSCOPED_PKEY: &str =
    "ALTER TABLE idempotency_key ADD CONSTRAINT idempotency_key_pkey PRIMARY KEY (request_key)";
const MYSQL_SCOPED_PKEY: &str =
    "ALTER TABLE idempotency_key DROP PRIMARY KEY, ADD PRIMARY KEY (scope, request_key)";
const MYSQL_UNSCOPED_PKEY: &str =
    "ALTER TABLE idempotency_key DROP PRIMARY KEY, ADD PRIMARY KEY (request_key)";

fn alter() -> TableAlterStatement {
    Table::alter().table(IdempotencyKey::Table).to_owned()
}

/// `scope`: `text` on PostgreSQL and SQLite, `varbinary(255)` on MariaDB/MySQL.
fn scope_column(backend: DbBackend) -> ColumnDef {
    let mut scope = ColumnDef::new(IdempotencyKey::Scope);
    if backend == DbBackend::MySql {
        scope.var_binary(255);
    } else {
        scope.text();
    }
    scope.not_null().default("").to_owned()
}

/// Deletes the rows of every scope but the default one.
fn drop_table() -> TableDropStatement {
    Table::drop()
        .table(IdempotencyKey::Table)
        .if_exists()
        .to_owned()
}

fn delete_scoped_rows() -> DeleteStatement {
    Query::delete()
        .from_table(IdempotencyKey::Table)
        .and_where(Expr::col(IdempotencyKey::Scope).ne(""))
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                manager
                    .alter_table(
                        alter()
                            .add_column(scope_column(DbBackend::Postgres))
                            .to_owned(),
                    )
                    .await?;
                manager
                    .alter_table(alter().drop_constraint(PKEY).to_owned())
                    .await?;
                db.execute_unprepared(POSTGRES_SCOPED_PKEY).await?;
            }
            DbBackend::MySql => {
                manager
                    .alter_table(
                        alter()
                            .add_column_if_not_exists(scope_column(DbBackend::MySql))
                            .to_owned(),
                    )
                    .await?;
                db.execute_unprepared(MYSQL_SCOPED_PKEY).await?;
            }
            DbBackend::Sqlite => {
                let tx = manager.begin().await?;
                tx.drop_table(drop_table()).await?;
                tx.create_table(scoped_sqlite_table()).await?;
                tx.create_index(
                    Index::create()
                        .name(EXPIRES_IDX)
                        .table(IdempotencyKey::Table)
                        .col(IdempotencyKey::ExpiresAt)
                        .to_owned(),
                )
                .await?;
                tx.commit().await?;
            }
            other => {
                return Err(DbErr::Migration(format!("unsupported backend {other:?}")));
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                manager.exec_stmt(delete_scoped_rows()).await?;
                manager
                    .alter_table(alter().drop_constraint(PKEY).to_owned())
                    .await?;
                manager
                    .alter_table(alter().drop_column(IdempotencyKey::Scope).to_owned())
                    .await?;
                db.execute_unprepared(POSTGRES_UNSCOPED_PKEY).await?;
            }
            DbBackend::MySql => {
                manager.exec_stmt(delete_scoped_rows()).await?;
                db.execute_unprepared(MYSQL_UNSCOPED_PKEY).await?;
                manager
                    .alter_table(alter().drop_column(IdempotencyKey::Scope).to_owned())
                    .await?;
            }
            DbBackend::Sqlite => {
                let tx = manager.begin().await?;
                tx.drop_table(drop_table()).await?;
                // Exactly the table of the first migration.
                super::execute_script(tx.get_connection(), SQLITE_UNSCOPED).await?;
                tx.commit().await?;
            }
            other => {
                return Err(DbErr::Migration(format!("unsupported backend {other:?}")));
            }
        }
        Ok(())
    }
}

/// The scoped table on SQLite: the first migration's columns and types, `scope` first, the
/// primary key on both.
fn scoped_sqlite_table() -> TableCreateStatement {
    use IdempotencyKey as K;
    Table::create()
        .table(K::Table)
        .col(scope_column(DbBackend::Sqlite))
        .col(ColumnDef::new(K::RequestKey).text().not_null())
        .col(ColumnDef::new(K::Fingerprint).text().not_null())
        .col(ColumnDef::new(K::Status).integer().not_null())
        .col(ColumnDef::new(K::ContentType).text().not_null())
        .col(ColumnDef::new(K::Location).text())
        .col(ColumnDef::new(K::Body).blob().not_null())
        .col(ColumnDef::new(K::CreatedAt).text().not_null())
        .col(ColumnDef::new(K::ExpiresAt).text().not_null())
        .primary_key(Index::create().name(PKEY).col(K::Scope).col(K::RequestKey))
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_of_each_backend() {
        let pg = alter()
            .add_column(scope_column(DbBackend::Postgres))
            .to_string(PostgresQueryBuilder);
        assert_eq!(
            pg,
            r#"ALTER TABLE "idempotency_key" ADD COLUMN "scope" text NOT NULL DEFAULT ''"#
        );
        let mysql = alter()
            .add_column_if_not_exists(scope_column(DbBackend::MySql))
            .to_string(MysqlQueryBuilder);
        assert_eq!(
            mysql,
            "ALTER TABLE `idempotency_key` ADD COLUMN IF NOT EXISTS `scope` varbinary(255) NOT NULL DEFAULT ''"
        );
        let sqlite = scoped_sqlite_table().to_string(SqliteQueryBuilder);
        assert!(
            sqlite.contains(r#""scope" text NOT NULL DEFAULT ''"#)
                && sqlite.contains(
                    r#"CONSTRAINT "idempotency_key_pkey" PRIMARY KEY ("scope", "request_key")"#
                ),
            "{sqlite}"
        );
    }
}
