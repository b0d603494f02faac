//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' annotations and
//! the request/response types, so it cannot drift from what the server does. A handler declares
//! its own outcomes (201, 409 `insufficient_stock`, ...); what comes from the layer around it is
//! added here, once, by the shape of the operation ([`Layer`]): a JSON body can be malformed, too
//! large, of another media type or of the wrong shape; a query can be invalid; an `{id}` can name
//! nothing; a transactional route can find the database unavailable.
//!
//! The `code`s a problem response can carry are the ones its description names in backticks:
//! each such response's schema narrows `Problem.code` to them. Response headers the service
//! always sends are marked `required` (utoipa's header type has no such field: it is set on the
//! JSON, [`document_json`]); the conditional ones ([`CONDITIONAL_HEADERS`]) are not.

use actix_web::HttpResponse;
use serde_json::Value;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{List, OUTSIDE_TRANSACTIONS, catalog, health, movements};
use crate::db::PoolStats;
use crate::problem::{ERROR_CODES, ErrorCode, PROBLEM_JSON, Problem};

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
    modifiers(&Layer),
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", responses(
    (status = 200, description = "This document", content_type = "application/json")))]
pub async fn document() -> HttpResponse {
    HttpResponse::Ok().json(document_json())
}

/// The document as served: [`ApiDoc`] with `required: true` on every response header that is
/// not one of [`CONDITIONAL_HEADERS`].
pub fn document_json() -> Value {
    let mut document = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(document) => document,
        // Plain data (strings, maps, numbers): serializing it cannot fail.
        Err(e) => unreachable!("the OpenAPI document does not serialize: {e}"),
    };
    let responses = document["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses"))
        .filter_map(Value::as_object_mut)
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let headers = response
            .get_mut("headers")
            .and_then(Value::as_object_mut)
            .into_iter()
            .flatten();
        for (name, header) in headers {
            if let (false, Some(header)) = (
                CONDITIONAL_HEADERS.contains(&name.as_str()),
                header.as_object_mut(),
            ) {
                header.insert("required".into(), Value::Bool(true));
            }
        }
    }
    document
}

/// Response headers that only some responses of a status carry (none yet).
pub const CONDITIONAL_HEADERS: &[&str] = &[];

/// Declares on every operation what the layer it runs in adds (see the module documentation).
/// A status the handler declares itself keeps the handler's description.
struct Layer;

impl Modify for Layer {
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
                narrow_problem_codes(operation);
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

/// The codes of [`ERROR_CODES`] that `description` names in backticks, in order.
fn codes_named(description: &str) -> Vec<&'static str> {
    let mut codes = Vec::new();
    for quoted in description.split('`').skip(1).step_by(2) {
        if let Some(code) = ERROR_CODES.iter().find(|c| **c == quoted)
            && !codes.contains(code)
        {
            codes.push(*code);
        }
    }
    codes
}

/// Narrows `code` in each problem response of `operation` to the codes its description names.
fn narrow_problem_codes(operation: &mut Operation) {
    for response in operation.responses.responses.values_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let codes = codes_named(&response.description);
        let Some(content) = response.content.get_mut(PROBLEM_JSON) else {
            continue;
        };
        if codes.is_empty() {
            continue;
        }
        let narrowed: Schema = AllOfBuilder::new()
            .item(Ref::from_schema_name("Problem"))
            .item(
                ObjectBuilder::new().property(
                    "code",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(codes)),
                ),
            )
            .into();
        content.schema = Some(RefOr::T(narrowed));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_response_names_the_codes_it_can_carry() {
        let document = document_json();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("a path item") {
                for (status, response) in operation["responses"].as_object().expect("responses") {
                    let Some(content) = response["content"].get(PROBLEM_JSON) else {
                        continue;
                    };
                    let codes = &content["schema"]["allOf"][1]["properties"]["code"]["enum"];
                    assert!(
                        codes.as_array().is_some_and(|c| !c.is_empty()),
                        "{method} {path} {status}: its description names no code"
                    );
                }
            }
        }
    }

    #[test]
    fn codes_are_read_from_backticks_once_each_and_only_when_known() {
        assert_eq!(
            codes_named("`not_found`: no `id`. `not_found` again, or `already_exists`"),
            ["not_found", "already_exists"]
        );
        assert!(codes_named("not_found without backticks").is_empty());
    }
}
