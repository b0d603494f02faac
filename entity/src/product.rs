//! `product`: an item that is stocked, identified by a unique `sku`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "product")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Unique (`product_sku_key`), 1..=64 characters.
    #[sea_orm(column_type = "Text", unique)]
    pub sku: String,
    /// 1..=200 characters, not blank.
    #[sea_orm(column_type = "Text")]
    pub name: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::stock_level::Entity")]
    StockLevel,
    #[sea_orm(has_many = "super::movement::Entity")]
    Movement,
}

impl Related<super::stock_level::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::StockLevel.def()
    }
}

impl Related<super::movement::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Movement.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
