//! `movement`: the append-only ledger. Each row is one receipt (into
//! `to_warehouse_id`), shipment (out of `from_warehouse_id`) or transfer
//! (between two different warehouses) of a positive quantity of one product.
//! The database enforces that the warehouse columns match the kind.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "movement")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub kind: MovementKind,
    pub product_id: i64,
    /// Set for shipments and transfers, `None` for receipts.
    pub from_warehouse_id: Option<i64>,
    /// Set for receipts and transfers, `None` for shipments.
    pub to_warehouse_id: Option<i64>,
    /// Always positive; the direction is given by `kind`.
    pub quantity: i64,
    pub created_at: DateTimeUtc,
}

/// What a movement does, stored as lower-case text in `movement.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "Text")]
pub enum MovementKind {
    /// Stock arrives in a warehouse from outside.
    #[sea_orm(string_value = "receipt")]
    Receipt,
    /// Stock leaves a warehouse to the outside.
    #[sea_orm(string_value = "shipment")]
    Shipment,
    /// Stock moves from one warehouse to another.
    #[sea_orm(string_value = "transfer")]
    Transfer,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::product::Entity",
        from = "Column::ProductId",
        to = "super::product::Column::Id",
        on_delete = "Restrict"
    )]
    Product,
    #[sea_orm(
        belongs_to = "super::warehouse::Entity",
        from = "Column::FromWarehouseId",
        to = "super::warehouse::Column::Id",
        on_delete = "Restrict"
    )]
    FromWarehouse,
    #[sea_orm(
        belongs_to = "super::warehouse::Entity",
        from = "Column::ToWarehouseId",
        to = "super::warehouse::Column::Id",
        on_delete = "Restrict"
    )]
    ToWarehouse,
}

impl Related<super::product::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Product.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
