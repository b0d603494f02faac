//! Creates `todo`, with the unique index `todo_title_key` on its title.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_pk_auto, boolean, string_len, timestamp_with_time_zone};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Todo {
    Table,
    Id,
    Title,
    Done,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Todo::Table)
                    .col(big_pk_auto(Todo::Id))
                    .col(string_len(Todo::Title, 200))
                    .col(boolean(Todo::Done).default(false))
                    .col(timestamp_with_time_zone(Todo::CreatedAt))
                    .to_owned(),
            )
            .await?;
        // Named, so that the service recognises it in a unique violation (409 title_taken).
        manager
            .create_index(
                Index::create()
                    .name(crate::routes::TITLE_KEY)
                    .table(Todo::Table)
                    .col(Todo::Title)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Todo::Table).to_owned())
            .await
    }
}
