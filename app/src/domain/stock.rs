//! Stock and its ledger: receipts, shipments and transfers, each one movement row and its stock
//! changes in the caller's transaction, and the stock and movement queries.
//!
//! Concurrency rules (all enforced by the database, none by this process):
//! * stock never goes negative: a debit is one conditional `UPDATE … WHERE quantity >= n`, which
//!   PostgreSQL re-evaluates on the newest row version after waiting for its lock, so it is safe
//!   under READ COMMITTED; InnoDB's `UPDATE` always reads the newest committed version (a
//!   locking read, even under REPEATABLE READ), so it is safe there too; the CHECK constraint
//!   backs it up;
//! * a credit is one upsert (`ON CONFLICT … DO UPDATE` / MariaDB's `ON DUPLICATE KEY UPDATE`)
//!   adding to the stored quantity, never a read-modify-write in this process, so no update is
//!   lost on any backend;
//! * a transfer first locks both stock rows in warehouse-id order, creating an empty one for a
//!   warehouse that has none of the product, all in one statement before changing anything:
//!   every transaction that takes two stock rows takes them in the same order, so none waits on
//!   another in a cycle. Locking only the rows that happened to exist was not enough: a
//!   destination row created meanwhile by a receipt was then taken out of order by the credit;
//! * on MariaDB a transfer first reads the source's stock without locking it, and answers 404 or
//!   409 at once when the newest committed stock cannot cover it, before it creates anything.
//!   A row that a transaction inserted and then rolled back is what makes InnoDB deadlock: every
//!   transaction waiting on that row in its `ON DUPLICATE KEY UPDATE` is left with a gap lock
//!   (even under READ COMMITTED), and each one's insert then waits on the other's gap lock
//!   (`docs/transactions.md`, *Transfers on MariaDB*). PostgreSQL has no gap locks and skips the
//!   read;
//! * a transfer debits the source before it credits (and so checks) the destination: a transfer
//!   to a missing warehouse fails after the debit, and the rollback undoes it.

use chrono::{DateTime, Utc};
use entity::movement::MovementKind;
use entity::{movement, product, stock_level, warehouse};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ActiveEnum, ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr,
    EntityTrait, FromQueryResult, Iterable, JoinType, NotSet, QueryFilter, QueryOrder, QueryResult,
    QuerySelect, QueryTrait, RelationTrait, Set, Statement,
};

use super::DomainError;
use super::catalog::{Paged, get_product, get_warehouse, now};
use super::rendered::{Rendered, by_place};
use super::values::{Id, Page, Quantity};
use sea_orm_actix_tx::{DbFailure, FailureKind};

/// The name of a movement kind, as stored and as the API shows it.
pub fn kind_name(kind: MovementKind) -> &'static str {
    match kind {
        MovementKind::Receipt => "receipt",
        MovementKind::Shipment => "shipment",
        MovementKind::Transfer => "transfer",
    }
}

/// Adds `quantity` to the stock of `product` in `warehouse`, creating the row if needed. The
/// foreign keys check that both exist.
async fn credit(
    db: &impl ConnectionTrait,
    warehouse: Id,
    product: Id,
    quantity: Quantity,
    at: DateTime<Utc>,
) -> Result<(), DbErr> {
    static CREDIT: Rendered = Rendered::new();
    let backend = db.get_database_backend();
    let upsert = || {
        let row = stock_level::ActiveModel {
            warehouse_id: Set(warehouse.get()),
            product_id: Set(product.get()),
            quantity: Set(quantity.get()),
            updated_at: Set(at),
        };
        let add =
            Expr::col((stock_level::Entity, stock_level::Column::Quantity)).add(quantity.get());
        stock_level::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([
                    stock_level::Column::WarehouseId,
                    stock_level::Column::ProductId,
                ])
                .value(stock_level::Column::Quantity, add)
                .value(stock_level::Column::UpdatedAt, Expr::value(at))
                .to_owned(),
            )
            .build(backend)
    };
    let (w, p, q) = (warehouse.get(), product.get(), quantity.get());
    let values = [w.into(), p.into(), q.into(), at.into(), q.into(), at.into()];
    db.execute_raw(CREDIT.statement(backend, upsert, values))
        .await?;
    Ok(())
}

/// Takes `quantity` from the stock of `product` in `warehouse` if there is that much. Returns
/// whether it did.
async fn debit(
    db: &impl ConnectionTrait,
    warehouse: Id,
    product: Id,
    quantity: Quantity,
    at: DateTime<Utc>,
) -> Result<bool, DbErr> {
    static DEBIT: Rendered = Rendered::new();
    let backend = db.get_database_backend();
    let update = || {
        stock_level::Entity::update_many()
            .col_expr(
                stock_level::Column::Quantity,
                Expr::col(stock_level::Column::Quantity).sub(quantity.get()),
            )
            .col_expr(stock_level::Column::UpdatedAt, Expr::value(at))
            .filter(stock_level::Column::WarehouseId.eq(warehouse.get()))
            .filter(stock_level::Column::ProductId.eq(product.get()))
            .filter(stock_level::Column::Quantity.gte(quantity.get()))
            .build(backend)
    };
    let (w, p, q) = (warehouse.get(), product.get(), quantity.get());
    let values = [q.into(), at.into(), w.into(), p.into(), q.into()];
    let result = db
        .execute_raw(DEBIT.statement(backend, update, values))
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Locks the stock rows of `product` in both `warehouses`, in warehouse-id order, creating an empty
/// row (quantity 0) where a warehouse has none yet: one statement, so that every row the transfer
/// will touch exists and is locked before any change. The no-op `DO UPDATE` is what locks an
/// existing row, as `SELECT … FOR UPDATE` would; a row another transaction is inserting at that
/// moment is waited for, in the same order. Only existing warehouses and products get a row (the
/// `JOIN`), so a transfer to a missing warehouse is still found by its credit, after the debit
/// (`docs/api.md`, *Movements*).
async fn lock_stock_rows(
    db: &impl ConnectionTrait,
    warehouses: [Id; 2],
    product: Id,
    at: DateTime<Utc>,
) -> Result<(), DbErr> {
    let [a, b] = warehouses;
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::MySql => {
            "INSERT INTO `stock_level` (`warehouse_id`, `product_id`, `quantity`, `updated_at`) SELECT `w`.`id`, `p`.`id`, 0, ? FROM `warehouse` AS `w` JOIN `product` AS `p` ON `p`.`id` = ? WHERE `w`.`id` IN (?, ?) ORDER BY `w`.`id` ON DUPLICATE KEY UPDATE `quantity` = `stock_level`.`quantity`"
        }
        _ => {
            r#"INSERT INTO "stock_level" ("warehouse_id", "product_id", "quantity", "updated_at") SELECT "w"."id", "p"."id", 0, $1 FROM "warehouse" AS "w" JOIN "product" AS "p" ON "p"."id" = $2 WHERE "w"."id" IN ($3, $4) ORDER BY "w"."id" ON CONFLICT ("warehouse_id", "product_id") DO UPDATE SET "quantity" = "stock_level"."quantity""#
        }
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [
            at.into(),
            product.get().into(),
            a.get().into(),
            b.get().into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Whether the newest committed stock of `product` in `warehouse` is at least `quantity`: a
/// plain read, which takes no lock and waits for none (the transfer runs at READ COMMITTED). A
/// "no" is a valid answer for the transfer: at that moment the source could not cover it. A
/// "yes" is checked again by the debit, under the row's lock.
async fn source_may_cover(
    db: &impl ConnectionTrait,
    warehouse: Id,
    product: Id,
    quantity: Quantity,
) -> Result<bool, DbErr> {
    let stored: Option<i64> = stock_level::Entity::find_by_id((warehouse.get(), product.get()))
        .select_only()
        .column(stock_level::Column::Quantity)
        .into_tuple()
        .one(db)
        .await?;
    Ok(stored.is_some_and(|q| q >= quantity.get()))
}

/// Why a debit found nothing to take: a missing warehouse or product (404), else too little
/// stock (409). Only called when no statement failed, so the transaction can still be read.
async fn explain_failed_debit(
    db: &impl ConnectionTrait,
    warehouse: Id,
    product: Id,
    quantity: Quantity,
) -> DomainError {
    if let Err(e) = get_warehouse(db, warehouse).await {
        return e;
    }
    if let Err(e) = get_product(db, product).await {
        return e;
    }
    DomainError::InsufficientStock(format!(
        "warehouse {warehouse} holds less than {} of product {product}",
        quantity.get()
    ))
}

/// Maps a foreign-key failure of a stock or movement write to the record that is missing.
fn missing_reference(err: DbErr, warehouse: Id, product: Id) -> DomainError {
    match DbFailure::classify(&err).kind {
        FailureKind::ForeignKeyViolation(Some(c)) if c.contains("product") => {
            DomainError::NotFound(format!("product {product} not found"))
        }
        FailureKind::ForeignKeyViolation(Some(_)) => {
            DomainError::NotFound(format!("warehouse {warehouse} not found"))
        }
        // SQLite does not name the constraint.
        FailureKind::ForeignKeyViolation(None) => DomainError::NotFound(format!(
            "warehouse {warehouse} or product {product} not found"
        )),
        _ => DomainError::Database(err),
    }
}

async fn record(
    db: &impl ConnectionTrait,
    kind: MovementKind,
    product: Id,
    from: Option<Id>,
    to: Option<Id>,
    quantity: Quantity,
    at: DateTime<Utc>,
) -> Result<movement::Model, DbErr> {
    let row = || movement::ActiveModel {
        id: NotSet,
        kind: Set(kind),
        product_id: Set(product.get()),
        from_warehouse_id: Set(from.map(Id::get)),
        to_warehouse_id: Set(to.map(Id::get)),
        quantity: Set(quantity.get()),
        created_at: Set(at),
    };
    let backend = db.get_database_backend();
    if backend != DbBackend::Postgres {
        return row().insert(db).await;
    }
    // What `ActiveModel::insert` sends PostgreSQL, rendered once.
    static RECORD: Rendered = Rendered::new();
    let insert = || {
        let mut insert = movement::Entity::insert(row());
        let returning = Query::returning().columns(movement::Column::iter());
        QueryTrait::query(&mut insert).returning(returning);
        insert.build(backend)
    };
    let values = [
        kind.into_value().into(),
        product.get().into(),
        from.map(Id::get).into(),
        to.map(Id::get).into(),
        quantity.get().into(),
        at.into(),
    ];
    let row = db
        .query_one_raw(RECORD.statement(backend, insert, values))
        .await?;
    row.as_ref()
        .map(movement_at)
        .transpose()?
        .ok_or(DbErr::RecordNotInserted)
}

/// The row `record` returns, its columns (`RETURNING` lists the entity's, in order) read by
/// place.
fn movement_at(row: &QueryResult) -> Result<movement::Model, DbErr> {
    by_place(row, |row| {
        Ok(movement::Model {
            id: row.try_get_by_index(0)?,
            kind: row.try_get_by_index(1)?,
            product_id: row.try_get_by_index(2)?,
            from_warehouse_id: row.try_get_by_index(3)?,
            to_warehouse_id: row.try_get_by_index(4)?,
            quantity: row.try_get_by_index(5)?,
            created_at: row.try_get_by_index(6)?,
        })
    })
}

/// Goods arrive in `warehouse`.
pub async fn receive(
    db: &impl ConnectionTrait,
    warehouse: Id,
    product: Id,
    quantity: Quantity,
) -> Result<movement::Model, DomainError> {
    let at = now();
    credit(db, warehouse, product, quantity, at)
        .await
        .map_err(|e| missing_reference(e, warehouse, product))?;
    Ok(record(
        db,
        MovementKind::Receipt,
        product,
        None,
        Some(warehouse),
        quantity,
        at,
    )
    .await?)
}

/// Goods leave `warehouse`; 409 when it holds less than `quantity`.
pub async fn ship(
    db: &impl ConnectionTrait,
    warehouse: Id,
    product: Id,
    quantity: Quantity,
) -> Result<movement::Model, DomainError> {
    let at = now();
    if !debit(db, warehouse, product, quantity, at).await? {
        return Err(explain_failed_debit(db, warehouse, product, quantity).await);
    }
    Ok(record(
        db,
        MovementKind::Shipment,
        product,
        Some(warehouse),
        None,
        quantity,
        at,
    )
    .await?)
}

/// Moves goods between two different warehouses (see the module documentation for the order).
pub async fn transfer(
    db: &impl ConnectionTrait,
    from: Id,
    to: Id,
    product: Id,
    quantity: Quantity,
) -> Result<movement::Model, DomainError> {
    let at = now();
    let backend = db.get_database_backend();
    // InnoDB: a transfer that will fail for want of stock must not create the rows it would
    // then roll back (see the module documentation).
    if backend == DbBackend::MySql && !source_may_cover(db, from, product, quantity).await? {
        return Err(explain_failed_debit(db, from, product, quantity).await);
    }
    if backend != DbBackend::Sqlite {
        // Every row this transfer touches exists and is locked, in one order, before any
        // change (PostgreSQL and InnoDB). SQLite has one writer and no row locks.
        lock_stock_rows(db, [from, to], product, at).await?;
    }
    if !debit(db, from, product, quantity, at).await? {
        return Err(explain_failed_debit(db, from, product, quantity).await);
    }
    // The source held this product, so a foreign-key failure here is the destination.
    credit(db, to, product, quantity, at)
        .await
        .map_err(|e| missing_reference(e, to, product))?;
    Ok(record(
        db,
        MovementKind::Transfer,
        product,
        Some(from),
        Some(to),
        quantity,
        at,
    )
    .await?)
}

/// A product's positive stock in one warehouse.
#[derive(Debug, Clone, FromQueryResult)]
pub struct WarehouseStockRow {
    pub product_id: i64,
    pub sku: String,
    pub quantity: i64,
}

/// The positive stock of every product in a warehouse, by product id; 404 for no warehouse.
pub async fn warehouse_stock(
    db: &impl ConnectionTrait,
    warehouse: Id,
) -> Result<Vec<WarehouseStockRow>, DomainError> {
    get_warehouse(db, warehouse).await?;
    Ok(stock_level::Entity::find()
        .select_only()
        .column(stock_level::Column::ProductId)
        .column(product::Column::Sku)
        .column(stock_level::Column::Quantity)
        .join(JoinType::InnerJoin, stock_level::Relation::Product.def())
        .filter(stock_level::Column::WarehouseId.eq(warehouse.get()))
        .filter(stock_level::Column::Quantity.gt(0))
        .order_by_asc(stock_level::Column::ProductId)
        .into_model::<WarehouseStockRow>()
        .all(db)
        .await?)
}

/// A product's positive stock in one warehouse, seen from the product.
#[derive(Debug, Clone, FromQueryResult)]
pub struct ProductStockRow {
    pub warehouse_id: i64,
    pub code: String,
    pub quantity: i64,
}

/// The positive stock of a product in every warehouse, by warehouse id; 404 for no product.
pub async fn product_stock(
    db: &impl ConnectionTrait,
    product: Id,
) -> Result<Vec<ProductStockRow>, DomainError> {
    get_product(db, product).await?;
    Ok(stock_level::Entity::find()
        .select_only()
        .column(stock_level::Column::WarehouseId)
        .column(warehouse::Column::Code)
        .column(stock_level::Column::Quantity)
        .join(JoinType::InnerJoin, stock_level::Relation::Warehouse.def())
        .filter(stock_level::Column::ProductId.eq(product.get()))
        .filter(stock_level::Column::Quantity.gt(0))
        .order_by_asc(stock_level::Column::WarehouseId)
        .into_model::<ProductStockRow>()
        .all(db)
        .await?)
}

/// Filters of the movement list; a warehouse matches either side of a movement.
#[derive(Debug, Clone, Copy, Default)]
pub struct MovementFilter {
    pub product: Option<Id>,
    pub warehouse: Option<Id>,
}

pub async fn list_movements(
    db: &impl ConnectionTrait,
    filter: MovementFilter,
    page: Page,
) -> Result<Paged<movement::Model>, DomainError> {
    let mut query = movement::Entity::find().filter(movement::Column::Id.gt(page.after));
    if let Some(p) = filter.product {
        query = query.filter(movement::Column::ProductId.eq(p.get()));
    }
    if let Some(w) = filter.warehouse {
        query = query.filter(
            Condition::any()
                .add(movement::Column::FromWarehouseId.eq(w.get()))
                .add(movement::Column::ToWarehouseId.eq(w.get())),
        );
    }
    let rows = query
        .order_by_asc(movement::Column::Id)
        .limit(page.limit + 1)
        .all(db)
        .await?;
    Ok(Paged::from_rows(rows, page.limit, |m| m.id))
}
