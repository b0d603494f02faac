//! Warehouses and products.

use actix_web::http::header::LOCATION;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use entity::{product, warehouse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{List, PageQuery, path_id};
use crate::domain::catalog;
use crate::domain::values::{Id, Name, Page, Sku, WarehouseCode};
use crate::json::JsonBody;
use crate::problem::{ApiError, PROBLEM_JSON, Problem};
use sea_orm_actix_tx::Tx;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWarehouse {
    /// 1..=32 characters of A-Z 0-9 _ -
    #[schema(value_type = WarehouseCode)]
    pub code: String,
    /// 1..=200 characters, not blank, no control characters
    #[schema(value_type = Name)]
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Warehouse {
    pub id: i64,
    pub code: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<warehouse::Model> for Warehouse {
    fn from(m: warehouse::Model) -> Self {
        Warehouse {
            id: m.id,
            code: m.code,
            name: m.name,
            created_at: m.created_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// 1..=64 characters of A-Z a-z 0-9 . _ -
    #[schema(value_type = Sku)]
    pub sku: String,
    /// 1..=200 characters, not blank, no control characters
    #[schema(value_type = Name)]
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Product {
    pub id: i64,
    pub sku: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<product::Model> for Product {
    fn from(m: product::Model) -> Self {
        Product {
            id: m.id,
            sku: m.sku,
            name: m.name,
            created_at: m.created_at,
        }
    }
}

pub(super) fn page(q: &PageQuery) -> Result<Page, ApiError> {
    Ok(Page::parse(q.limit.as_deref(), q.after.as_deref())?)
}

#[utoipa::path(post, path = "/warehouses", request_body = NewWarehouse, responses(
    (status = 201, body = Warehouse, headers(("Location" = String)), description = "Created"),
    (status = 409, body = Problem, content_type = PROBLEM_JSON,
        description = "`already_exists`: the code is taken")))]
pub async fn create_warehouse(
    tx: Tx,
    JsonBody(body): JsonBody<NewWarehouse>,
) -> Result<HttpResponse, ApiError> {
    let code = WarehouseCode::parse(&body.code)?;
    let name = Name::parse(&body.name)?;
    let created = catalog::create_warehouse(&tx, &code, &name).await?;
    Ok(HttpResponse::Created()
        .insert_header((LOCATION, format!("/warehouses/{}", created.id)))
        .json(Warehouse::from(created)))
}

#[utoipa::path(get, path = "/warehouses", params(PageQuery), responses(
    (status = 200, body = List<Warehouse>, description = "A page of warehouses by id")))]
pub async fn list_warehouses(
    tx: Tx,
    query: web::Query<PageQuery>,
) -> Result<web::Json<List<Warehouse>>, ApiError> {
    let paged = catalog::list_warehouses(&tx, page(&query)?).await?;
    Ok(web::Json(List {
        items: paged.items.into_iter().map(Warehouse::from).collect(),
        next_after: paged.next_after,
    }))
}

#[utoipa::path(get, path = "/warehouses/{id}",
    params(("id" = Id, Path, description = "A positive 64-bit id; anything else is 404")),
    responses((status = 200, body = Warehouse, description = "The warehouse")))]
pub async fn get_warehouse(tx: Tx, id: web::Path<i64>) -> Result<web::Json<Warehouse>, ApiError> {
    let id = path_id(*id, "warehouse")?;
    Ok(web::Json(catalog::get_warehouse(&tx, id).await?.into()))
}

#[utoipa::path(post, path = "/products", request_body = NewProduct, responses(
    (status = 201, body = Product, headers(("Location" = String)), description = "Created"),
    (status = 409, body = Problem, content_type = PROBLEM_JSON,
        description = "`already_exists`: the SKU is taken")))]
pub async fn create_product(
    tx: Tx,
    JsonBody(body): JsonBody<NewProduct>,
) -> Result<HttpResponse, ApiError> {
    let sku = Sku::parse(&body.sku)?;
    let name = Name::parse(&body.name)?;
    let created = catalog::create_product(&tx, &sku, &name).await?;
    Ok(HttpResponse::Created()
        .insert_header((LOCATION, format!("/products/{}", created.id)))
        .json(Product::from(created)))
}

#[utoipa::path(get, path = "/products", params(PageQuery), responses(
    (status = 200, body = List<Product>, description = "A page of products by id")))]
pub async fn list_products(
    tx: Tx,
    query: web::Query<PageQuery>,
) -> Result<web::Json<List<Product>>, ApiError> {
    let paged = catalog::list_products(&tx, page(&query)?).await?;
    Ok(web::Json(List {
        items: paged.items.into_iter().map(Product::from).collect(),
        next_after: paged.next_after,
    }))
}

#[utoipa::path(get, path = "/products/{id}",
    params(("id" = Id, Path, description = "A positive 64-bit id; anything else is 404")),
    responses((status = 200, body = Product, description = "The product")))]
pub async fn get_product(tx: Tx, id: web::Path<i64>) -> Result<web::Json<Product>, ApiError> {
    let id = path_id(*id, "product")?;
    Ok(web::Json(catalog::get_product(&tx, id).await?.into()))
}
