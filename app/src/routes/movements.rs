//! Receipts, shipments, transfers, the movement ledger and stock views.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use entity::movement;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::catalog::page;
use super::{List, PageQuery, path_id};
use crate::domain::stock::{self, MovementFilter};
use crate::domain::values::{Id, Page, Quantity};
use crate::json::{JsonBody, integer};
use crate::problem::{ApiError, PROBLEM_JSON, Problem};
use sea_orm_actix_tx::Tx;

/// A receipt or a shipment.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StockChange {
    #[schema(value_type = Id)]
    #[serde(deserialize_with = "integer")]
    pub warehouse_id: i64,
    #[schema(value_type = Id)]
    #[serde(deserialize_with = "integer")]
    pub product_id: i64,
    #[schema(value_type = Quantity)]
    #[serde(deserialize_with = "integer")]
    pub quantity: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTransfer {
    #[schema(value_type = Id)]
    #[serde(deserialize_with = "integer")]
    pub from_warehouse_id: i64,
    /// Must differ from `from_warehouse_id` (422 otherwise).
    #[schema(value_type = Id)]
    #[serde(deserialize_with = "integer")]
    pub to_warehouse_id: i64,
    #[schema(value_type = Id)]
    #[serde(deserialize_with = "integer")]
    pub product_id: i64,
    #[schema(value_type = Quantity)]
    #[serde(deserialize_with = "integer")]
    pub quantity: i64,
}

/// One row of the append-only ledger.
#[derive(Debug, Serialize, ToSchema)]
pub struct Movement {
    pub id: i64,
    /// `receipt`, `shipment` or `transfer`
    pub kind: &'static str,
    pub product_id: i64,
    pub from_warehouse_id: Option<i64>,
    pub to_warehouse_id: Option<i64>,
    pub quantity: i64,
    pub created_at: DateTime<Utc>,
}

impl From<movement::Model> for Movement {
    fn from(m: movement::Model) -> Self {
        Movement {
            id: m.id,
            kind: stock::kind_name(m.kind),
            product_id: m.product_id,
            from_warehouse_id: m.from_warehouse_id,
            to_warehouse_id: m.to_warehouse_id,
            quantity: m.quantity,
            created_at: m.created_at,
        }
    }
}

fn created(m: movement::Model) -> HttpResponse {
    HttpResponse::Created().json(Movement::from(m))
}

fn parse_change(body: &StockChange) -> Result<(Id, Id, Quantity), ApiError> {
    Ok((
        Id::parse("warehouse_id", body.warehouse_id)?,
        Id::parse("product_id", body.product_id)?,
        Quantity::parse(body.quantity)?,
    ))
}

#[utoipa::path(post, path = "/receipts", request_body = StockChange, responses(
    (status = 201, body = Movement, description = "The receipt, recorded"),
    (status = 404, body = Problem, content_type = PROBLEM_JSON,
        description = "`not_found`: no such warehouse or product")))]
pub async fn receive(
    tx: Tx,
    JsonBody(body): JsonBody<StockChange>,
) -> Result<HttpResponse, ApiError> {
    let (warehouse, product, quantity) = parse_change(&body)?;
    Ok(created(
        stock::receive(&tx, warehouse, product, quantity).await?,
    ))
}

#[utoipa::path(post, path = "/shipments", request_body = StockChange, responses(
    (status = 201, body = Movement, description = "The shipment, recorded"),
    (status = 404, body = Problem, content_type = PROBLEM_JSON,
        description = "`not_found`: no such warehouse or product"),
    (status = 409, body = Problem, content_type = PROBLEM_JSON,
        description = "`insufficient_stock`: the warehouse holds less than `quantity`")))]
pub async fn ship(tx: Tx, JsonBody(body): JsonBody<StockChange>) -> Result<HttpResponse, ApiError> {
    let (warehouse, product, quantity) = parse_change(&body)?;
    Ok(created(
        stock::ship(&tx, warehouse, product, quantity).await?,
    ))
}

#[utoipa::path(post, path = "/transfers", request_body = NewTransfer, responses(
    (status = 201, body = Movement, description = "The transfer, recorded"),
    (status = 404, body = Problem, content_type = PROBLEM_JSON,
        description = "`not_found`: no such warehouse or product"),
    (status = 409, body = Problem, content_type = PROBLEM_JSON,
        description = "`insufficient_stock`: the source holds less than `quantity`"),
    (status = 422, body = Problem, content_type = PROBLEM_JSON,
        description = "`validation_failed`: a field is missing, unknown, of the wrong type or out of range, or both warehouses are the same")))]
pub async fn transfer(
    tx: Tx,
    JsonBody(body): JsonBody<NewTransfer>,
) -> Result<HttpResponse, ApiError> {
    let from = Id::parse("from_warehouse_id", body.from_warehouse_id)?;
    let to = Id::parse("to_warehouse_id", body.to_warehouse_id)?;
    let product = Id::parse("product_id", body.product_id)?;
    let quantity = Quantity::parse(body.quantity)?;
    if from == to {
        return Err(ApiError::Validation(
            "to_warehouse_id: must differ from from_warehouse_id".into(),
        ));
    }
    Ok(created(
        stock::transfer(&tx, from, to, product, quantity).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MovementQuery {
    /// Only movements of this product.
    #[param(value_type = Option<i64>, minimum = 1)]
    pub product_id: Option<String>,
    /// Matches movements from or to this warehouse.
    #[param(value_type = Option<i64>, minimum = 1)]
    pub warehouse_id: Option<String>,
    /// 1..=500, default 50.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// Return items with an id greater than this.
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after: Option<String>,
}

fn filter_id(field: &'static str, raw: Option<&str>) -> Result<Option<Id>, ApiError> {
    raw.map(|raw| {
        raw.parse::<i64>()
            .ok()
            .and_then(|v| Id::parse(field, v).ok())
            .ok_or_else(|| {
                ApiError::Validation(format!("{field}: must be a positive integer, got {raw:?}"))
            })
    })
    .transpose()
}

#[utoipa::path(get, path = "/movements", params(MovementQuery), responses(
    (status = 200, body = List<Movement>, description = "A page of movements by id")))]
pub async fn list(
    tx: Tx,
    query: web::Query<MovementQuery>,
) -> Result<web::Json<List<Movement>>, ApiError> {
    let filter = MovementFilter {
        product: filter_id("product_id", query.product_id.as_deref())?,
        warehouse: filter_id("warehouse_id", query.warehouse_id.as_deref())?,
    };
    let page: Page = page(&PageQuery {
        limit: query.limit.clone(),
        after: query.after.clone(),
    })?;
    let paged = stock::list_movements(&tx, filter, page).await?;
    Ok(web::Json(List {
        items: paged.items.into_iter().map(Movement::from).collect(),
        next_after: paged.next_after,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WarehouseStockItem {
    pub product_id: i64,
    pub sku: String,
    pub quantity: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WarehouseStock {
    pub warehouse_id: i64,
    pub items: Vec<WarehouseStockItem>,
}

#[utoipa::path(get, path = "/warehouses/{id}/stock",
    params(("id" = Id, Path, description = "A positive 64-bit id; anything else is 404")),
    responses((status = 200, body = WarehouseStock, description = "The warehouse's stock")))]
pub async fn warehouse_stock(
    tx: Tx,
    id: web::Path<i64>,
) -> Result<web::Json<WarehouseStock>, ApiError> {
    let id = path_id(*id, "warehouse")?;
    let rows = stock::warehouse_stock(&tx, id).await?;
    Ok(web::Json(WarehouseStock {
        warehouse_id: id.get(),
        items: rows
            .into_iter()
            .map(|r| WarehouseStockItem {
                product_id: r.product_id,
                sku: r.sku,
                quantity: r.quantity,
            })
            .collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductStockItem {
    pub warehouse_id: i64,
    pub code: String,
    pub quantity: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductStock {
    pub product_id: i64,
    /// Sum of `items[].quantity`.
    pub total: i64,
    pub items: Vec<ProductStockItem>,
}

#[utoipa::path(get, path = "/products/{id}/stock",
    params(("id" = Id, Path, description = "A positive 64-bit id; anything else is 404")),
    responses((status = 200, body = ProductStock, description = "The product's stock")))]
pub async fn product_stock(
    tx: Tx,
    id: web::Path<i64>,
) -> Result<web::Json<ProductStock>, ApiError> {
    let id = path_id(*id, "product")?;
    let rows = stock::product_stock(&tx, id).await?;
    Ok(web::Json(ProductStock {
        product_id: id.get(),
        total: rows.iter().map(|r| r.quantity).sum(),
        items: rows
            .into_iter()
            .map(|r| ProductStockItem {
                warehouse_id: r.warehouse_id,
                code: r.code,
                quantity: r.quantity,
            })
            .collect(),
    }))
}
