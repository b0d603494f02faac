//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' annotations and
//! the request/response types, so it cannot drift from what the server does. A handler declares
//! its own outcomes (201, 409 `insufficient_stock`, ...); the errors that come from the layer
//! around it are added here, once, by the shape of the operation ([`LayerErrors`]): a JSON body
//! can be malformed, too large, of another media type or of the wrong shape; a query can be
//! invalid; an `{id}` can name nothing; a transactional route can find the database unavailable.

use actix_web::HttpResponse;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::Type;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{List, OUTSIDE_TRANSACTIONS, catalog, health, movements};
use crate::db::PoolStats;
use crate::problem::{ErrorCode, PROBLEM_JSON, Problem};

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
        Problem, ErrorCode, PoolStats,
        catalog::Warehouse, catalog::NewWarehouse, catalog::Product, catalog::NewProduct,
        movements::Movement, movements::StockChange, movements::NewTransfer,
        List<catalog::Warehouse>, List<catalog::Product>, List<movements::Movement>,
    )),
    modifiers(&LayerErrors),
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", responses(
    (status = 200, description = "This document", content_type = "application/json")))]
pub async fn document() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

/// Declares on every operation the problem responses of the layer it runs in (see the module
/// documentation). A status the handler declares itself keeps the handler's description.
struct LayerErrors;

impl Modify for LayerErrors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            let transactional = !OUTSIDE_TRANSACTIONS.contains(&path.as_str());
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                declare_layer_errors(operation, transactional);
            }
        }
    }
}

fn declare_layer_errors(operation: &mut Operation, transactional: bool) {
    let params_in = |place: ParameterIn| {
        operation
            .parameters
            .iter()
            .flatten()
            .any(|p| p.parameter_in == place)
    };
    let (in_path, in_query) = (params_in(ParameterIn::Path), params_in(ParameterIn::Query));
    let mut errors: Vec<(u16, &str)> = Vec::new();
    if operation.request_body.is_some() {
        errors.extend([
            (400, "`malformed_json`: the body is not JSON"),
            (
                413,
                "`payload_too_large`: the body is over `APP_BODY_LIMIT` bytes",
            ),
            (
                415,
                "`unsupported_media_type`: the body is not sent as `application/json`",
            ),
            (
                422,
                "`validation_failed`: a field is missing, unknown, of the wrong type or out of \
                 range; `detail` names it",
            ),
        ]);
    }
    if in_query {
        errors.push((
            422,
            "`validation_failed`: a query parameter is unknown or out of range; `detail` names it",
        ));
    }
    if in_path {
        errors.push((404, "`not_found`: no such id"));
    }
    if transactional {
        errors.extend([
            (
                500,
                "`internal`: an unexpected failure, logged; the body says nothing more. \
                 `commit_outcome_unknown`: the connection broke during `COMMIT` and its outcome \
                 could not be established (no `Retry-After`; retry only with the same \
                 `Idempotency-Key`)",
            ),
            (
                503,
                "`pool_timeout`, `database_unavailable` or `serialization_failure`: retry after \
                 `Retry-After` seconds",
            ),
        ]);
    }
    for (status, description) in errors {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| problem_response(status, description));
    }
}

fn problem_response(status: u16, description: &str) -> RefOr<utoipa::openapi::Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        PROBLEM_JSON,
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if status == 503 {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(0)),
                )
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    RefOr::T(response.build())
}
