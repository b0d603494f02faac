//! The HTTP API of `docs/api.md`: which handler serves which path, and which transaction each route
//! runs in. Handlers are thin: extract, call a domain function with the request's `Tx`, map.
//!
//! Transaction declarations (the only places a route departs from the defaults):
//! * health, metrics and the OpenAPI document opt out: they are not wrapped in `Transactional`.
//! * receipts, shipments and transfers run at READ COMMITTED. Each of their writes is a single
//!   conditional `UPDATE … WHERE quantity >= n` or an upsert, which PostgreSQL re-evaluates on
//!   the newest row version after waiting for the row lock, so the invariant holds without a
//!   snapshot; under REPEATABLE READ every waiter on a hot stock row would instead fail with
//!   40001 and be retried, serialising the hot row through retries and 503s.
//! * everything else runs at `DB_ISOLATION_LEVEL`, `GET`s READ ONLY.

pub mod catalog;
pub mod health;
pub mod movements;
pub mod openapi;
mod schemas;

use actix_web::{Resource, Route, Scope, guard, web};
use sea_orm::IsolationLevel;

use sea_orm_actix_tx::{Layer, Transactional};

use crate::problem::method_not_allowed;

/// `GET`, and `HEAD` on the same handler (actix sends the headers without the body).
fn read() -> Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// The `Allow` header of a resource's 405, by the methods it serves (the OpenAPI document lists
/// the same, `HEAD` implied by `GET`).
const READ: &str = "GET, HEAD";
const READ_WRITE: &str = "GET, HEAD, POST";
const WRITE: &str = "POST";

/// Paths whose routes run outside the transaction middleware (no `pool_timeout`, no
/// `database_unavailable` from it); the OpenAPI document declares the middleware's errors on
/// every other path.
pub const OUTSIDE_TRANSACTIONS: &[&str] =
    &["/health/live", "/health/ready", "/metrics", "/openapi.json"];

fn resource(path: &str, allow: &'static str) -> Resource {
    web::resource(path).default_service(web::to(move || async move { method_not_allowed(allow) }))
}

/// A collection in a scope of its own: `[list, create, one, stock]` at `prefix`,
/// `prefix/{id}` and `prefix/{id}/stock`, each in a transaction of `tx`.
fn collection(prefix: &str, tx: &Transactional, routes: [Route; 4]) -> Scope {
    let [list, create, one, stock] = routes.map(|route| route.wrap(tx.clone()));
    web::scope(prefix)
        .service(resource("", READ_WRITE).route(list).route(create))
        .service(resource("/{id}", READ).route(one))
        .service(resource("/{id}/stock", READ).route(stock))
}

pub fn configure(cfg: &mut web::ServiceConfig, layer: &Layer) {
    let tx = layer.transactional();
    let stock_tx = layer
        .transactional()
        .isolation(IsolationLevel::ReadCommitted);

    // Grouped by first segment: actix tries a request's path against each route in turn, the
    // ones with a `{param}` by a regex, and a scope's prefix by comparing text; a request pays
    // for the routes of its own prefix only (bench/NOTES.md, issue 23).
    cfg.service(resource("/health/live", READ).route(read().to(health::live)))
        .service(resource("/health/ready", READ).route(read().to(health::ready)))
        .service(resource("/metrics", READ).route(read().to(health::metrics)))
        .service(resource("/openapi.json", READ).route(read().to(openapi::document)))
        .service(collection(
            "/warehouses",
            &tx,
            [
                read().to(catalog::list_warehouses),
                web::post().to(catalog::create_warehouse),
                read().to(catalog::get_warehouse),
                read().to(movements::warehouse_stock),
            ],
        ))
        .service(collection(
            "/products",
            &tx,
            [
                read().to(catalog::list_products),
                web::post().to(catalog::create_product),
                read().to(catalog::get_product),
                read().to(movements::product_stock),
            ],
        ))
        .service(
            resource("/receipts", WRITE)
                .route(web::post().to(movements::receive).wrap(stock_tx.clone())),
        )
        .service(
            resource("/shipments", WRITE)
                .route(web::post().to(movements::ship).wrap(stock_tx.clone())),
        )
        .service(
            resource("/transfers", WRITE)
                .route(web::post().to(movements::transfer).wrap(stock_tx.clone())),
        )
        .service(resource("/movements", READ).route(read().to(movements::list).wrap(tx.clone())));
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1..=500, default 50.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// Return items with an id greater than this.
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after: Option<String>,
}

/// A keyset page: `next_after` is the `after` of the next page, null on the last.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    pub next_after: Option<i64>,
}

/// The id in a path: anything but a positive integer names no resource (404).
pub fn path_id(
    raw: i64,
    what: &str,
) -> Result<crate::domain::values::Id, crate::problem::ApiError> {
    crate::domain::values::Id::parse("id", raw)
        .map_err(|_| crate::problem::ApiError::NotFound(format!("{what} {raw} not found")))
}
