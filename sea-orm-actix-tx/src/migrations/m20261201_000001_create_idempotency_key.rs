//! Creates `idempotency_key`, the transaction layer's own table (`docs/scale-out.md`,
//! `Idempotency-Key`): one row per key of a completed `POST`, with the request's fingerprint and
//! the response to replay, written in the same transaction as the request's writes. `expires_at` is
//! indexed for the clean-up of expired keys. The column is `request_key` (`key` is reserved in
//! MySQL).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const POSTGRES_UP: &str = r#"
CREATE TABLE idempotency_key (
    request_key text NOT NULL CONSTRAINT idempotency_key_pkey PRIMARY KEY,
    fingerprint text NOT NULL,
    status integer NOT NULL,
    content_type text NOT NULL,
    location text,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX idempotency_key_expires_idx ON idempotency_key (expires_at);
"#;

pub(super) const SQLITE_UP: &str = r#"
CREATE TABLE idempotency_key (
    request_key text NOT NULL CONSTRAINT idempotency_key_pkey PRIMARY KEY,
    fingerprint text NOT NULL,
    status integer NOT NULL,
    content_type text NOT NULL,
    location text,
    body blob NOT NULL,
    created_at text NOT NULL,
    expires_at text NOT NULL
);
CREATE INDEX idempotency_key_expires_idx ON idempotency_key (expires_at);
"#;

const MYSQL_UP: &str = r#"
CREATE TABLE idempotency_key (
    request_key varchar(255) NOT NULL,
    fingerprint char(64) NOT NULL,
    status integer NOT NULL,
    content_type varchar(255) NOT NULL,
    location text,
    body longblob NOT NULL,
    created_at datetime(6) NOT NULL,
    expires_at datetime(6) NOT NULL,
    CONSTRAINT idempotency_key_pkey PRIMARY KEY (request_key),
    INDEX idempotency_key_expires_idx (expires_at)
)
"#;

const DOWN: &str = "DROP TABLE IF EXISTS idempotency_key";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let sql = match db.get_database_backend() {
            DbBackend::Postgres => POSTGRES_UP,
            DbBackend::Sqlite => SQLITE_UP,
            DbBackend::MySql => MYSQL_UP,
            other => {
                return Err(DbErr::Migration(format!("unsupported backend {other:?}")));
            }
        };
        super::execute_script(db, sql).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(DOWN).await?;
        Ok(())
    }
}
