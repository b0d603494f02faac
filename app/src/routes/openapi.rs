//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' annotations and
//! the request/response types, so it cannot drift from what the server does.

use actix_web::HttpResponse;
use utoipa::OpenApi;

use super::{List, catalog, health, movements};
use crate::db::PoolStats;
use crate::problem::Problem;

#[derive(OpenApi)]
#[openapi(
    info(title = "inventory-api", description = "Inventory ledger over actix-web and SeaORM"),
    paths(
        health::live, health::ready, health::metrics,
        catalog::create_warehouse, catalog::list_warehouses, catalog::get_warehouse,
        catalog::create_product, catalog::list_products, catalog::get_product,
        movements::warehouse_stock, movements::product_stock,
        movements::receive, movements::ship, movements::transfer, movements::list,
        document,
    ),
    components(schemas(
        Problem, PoolStats,
        catalog::Warehouse, catalog::NewWarehouse, catalog::Product, catalog::NewProduct,
        movements::Movement, movements::StockChange, movements::NewTransfer,
        List<catalog::Warehouse>, List<catalog::Product>, List<movements::Movement>,
    ))
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document")))]
pub async fn document() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
