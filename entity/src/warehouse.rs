//! `warehouse`: a place that holds stock, identified by a unique `code`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "warehouse")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Unique (`warehouse_code_key`), 1..=32 characters.
    #[sea_orm(column_type = "Text", unique)]
    pub code: String,
    /// 1..=200 characters, not blank.
    #[sea_orm(column_type = "Text")]
    pub name: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::stock_level::Entity")]
    StockLevel,
    /// Movements that took stock out of this warehouse (shipments, transfers).
    #[sea_orm(
        has_many = "super::movement::Entity",
        via_rel = "Relation::FromWarehouse"
    )]
    OutgoingMovement,
    /// Movements that brought stock into this warehouse (receipts, transfers).
    #[sea_orm(
        has_many = "super::movement::Entity",
        via_rel = "Relation::ToWarehouse"
    )]
    IncomingMovement,
}

impl Related<super::stock_level::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::StockLevel.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
