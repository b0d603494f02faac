//! Warehouses and products: create, get, and list by keyset pages.

use chrono::{DateTime, Utc};
use entity::{product, warehouse};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, NotSet, QueryFilter,
    QueryOrder, QueryResult, QuerySelect, QueryTrait, Set,
};

use super::DomainError;
use super::rendered::{Rendered, by_place};
use super::values::{Id, Name, Page, Sku, WarehouseCode};
use sea_orm_actix_tx::{DbFailure, FailureKind};

/// One page of a keyset-paginated list.
#[derive(Debug, Clone)]
pub struct Paged<T> {
    pub items: Vec<T>,
    /// The id to pass as `after` for the next page, `None` on the last page.
    pub next_after: Option<i64>,
}

impl<T> Paged<T> {
    /// Builds a page from up to `limit + 1` rows fetched in id order.
    pub fn from_rows(mut rows: Vec<T>, limit: u64, id: impl Fn(&T) -> i64) -> Self {
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let next_after = if more { rows.last().map(id) } else { None };
        Paged {
            items: rows,
            next_after,
        }
    }
}

fn unique_violation(err: DbErr, what: String) -> DomainError {
    match DbFailure::classify(&err).kind {
        FailureKind::UniqueViolation(_) => DomainError::AlreadyExists(what),
        _ => DomainError::Database(err),
    }
}

pub async fn create_warehouse(
    db: &impl ConnectionTrait,
    code: &WarehouseCode,
    name: &Name,
) -> Result<warehouse::Model, DomainError> {
    warehouse::ActiveModel {
        id: NotSet,
        code: Set(code.as_str().to_owned()),
        name: Set(name.as_str().to_owned()),
        created_at: Set(now()),
    }
    .insert(db)
    .await
    .map_err(|e| {
        unique_violation(
            e,
            format!("a warehouse with code {:?} already exists", code.as_str()),
        )
    })
}

pub async fn get_warehouse(
    db: &impl ConnectionTrait,
    id: Id,
) -> Result<warehouse::Model, DomainError> {
    warehouse::Entity::find_by_id(id.get())
        .one(db)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("warehouse {id} not found")))
}

pub async fn list_warehouses(
    db: &impl ConnectionTrait,
    page: Page,
) -> Result<Paged<warehouse::Model>, DomainError> {
    let rows = warehouse::Entity::find()
        .filter(warehouse::Column::Id.gt(page.after))
        .order_by_asc(warehouse::Column::Id)
        .limit(page.limit + 1)
        .all(db)
        .await?;
    Ok(Paged::from_rows(rows, page.limit, |w| w.id))
}

pub async fn create_product(
    db: &impl ConnectionTrait,
    sku: &Sku,
    name: &Name,
) -> Result<product::Model, DomainError> {
    product::ActiveModel {
        id: NotSet,
        sku: Set(sku.as_str().to_owned()),
        name: Set(name.as_str().to_owned()),
        created_at: Set(now()),
    }
    .insert(db)
    .await
    .map_err(|e| {
        unique_violation(
            e,
            format!("a product with sku {:?} already exists", sku.as_str()),
        )
    })
}

/// The product `id` (`GET /products/{id}`: its statement is rendered once, `rendered.rs`).
pub async fn get_product(db: &impl ConnectionTrait, id: Id) -> Result<product::Model, DomainError> {
    static GET: Rendered = Rendered::new();
    let backend = db.get_database_backend();
    let find = || {
        product::Entity::find_by_id(id.get())
            .limit(1)
            .build(backend)
    };
    let statement = GET.statement(backend, find, [id.get().into(), 1u64.into()]);
    let row = db.query_one_raw(statement).await?;
    let product = row.as_ref().map(product_at).transpose()?;
    product.ok_or_else(|| DomainError::NotFound(format!("product {id} not found")))
}

/// A row of `get_product`'s statement, its columns (the entity's, in order) read by place.
fn product_at(row: &QueryResult) -> Result<product::Model, DbErr> {
    by_place(row, |row| {
        Ok(product::Model {
            id: row.try_get_by_index(0)?,
            sku: row.try_get_by_index(1)?,
            name: row.try_get_by_index(2)?,
            created_at: row.try_get_by_index(3)?,
        })
    })
}

pub async fn list_products(
    db: &impl ConnectionTrait,
    page: Page,
) -> Result<Paged<product::Model>, DomainError> {
    let rows = product::Entity::find()
        .filter(product::Column::Id.gt(page.after))
        .order_by_asc(product::Column::Id)
        .limit(page.limit + 1)
        .all(db)
        .await?;
    Ok(Paged::from_rows(rows, page.limit, |p| p.id))
}

/// Timestamps are taken by the application, in UTC, with microsecond precision (what both
/// PostgreSQL and the embedded SQLite store), so a returned value equals the stored one.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}
