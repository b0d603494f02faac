//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' annotations and the
//! request/response types, so it cannot drift from what the server does. A handler declares its own
//! outcomes (201, 409 `insufficient_stock`, ...); what comes from the layer around it is added
//! here, once, by the shape of the operation ([`Layer`]): a JSON body can be malformed, too large,
//! of another media type or of the wrong shape; a query can be invalid; an `{id}` can name nothing;
//! a transactional route can find the database unavailable; a `POST` on one takes an
//! `Idempotency-Key` (`docs/api.md`) and answers with a consistency token when a read replica is
//! configured, and its `GET`s take that token back (`docs/api.md`, *Consistency token*).
//!
//! The `code`s a problem response can carry are the ones its description names in backticks:
//! each such response's schema narrows `Problem.code` to them. Response headers the service
//! always sends are marked `required` (utoipa's header type has no such field: it is set on the
//! JSON, [`document_json`]); the conditional ones ([`CONDITIONAL_HEADERS`]) are not.

use actix_web::HttpResponse;
use serde_json::Value;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{List, OUTSIDE_TRANSACTIONS, catalog, health, movements};
use crate::problem::{ERROR_CODES, ErrorCode, PROBLEM_JSON, Problem};
use sea_orm_actix_tx::db::PoolStats;
use sea_orm_actix_tx::headers::{
    CONSISTENCY_COOKIE, CONSISTENCY_TOKEN, IDEMPOTENT_REPLAYED, IdempotencyKey,
};

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

/// Response headers that only some responses of a status carry: a replay's
/// `Idempotent-Replayed`, and the consistency token, sent only with a read replica configured.
pub const CONDITIONAL_HEADERS: &[&str] = &[IDEMPOTENT_REPLAYED, CONSISTENCY_TOKEN, "Set-Cookie"];

/// Declares on every operation what the layer it runs in adds (see the module documentation).
/// A status the handler declares itself keeps the handler's description, except that the
/// idempotency answers are appended to it.
struct Layer;

impl Modify for Layer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            let transactional = !OUTSIDE_TRANSACTIONS.contains(&path.as_str());
            let operations = [
                ("GET", &mut item.get),
                ("PUT", &mut item.put),
                ("POST", &mut item.post),
                ("DELETE", &mut item.delete),
                ("PATCH", &mut item.patch),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                declare_layer_errors(operation, transactional);
                // Keys are read on `POST` only; every other method but `GET` writes.
                match (transactional, method) {
                    (false, _) => {}
                    (true, "GET") => declare_token_accepted(operation),
                    (true, "POST") => {
                        declare_idempotency(operation);
                        declare_token_issued(operation, true);
                    }
                    (true, _) => declare_token_issued(operation, false),
                }
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

/// Statuses the middleware answers before the handler runs, which are therefore never stored
/// for a key nor replayed: 413 (the body is refused before the key is read).
const NEVER_REPLAYED: &[u16] = &[413];

/// Whether an answer of `status` can be a stored one replayed for a key: below 500 and not one
/// of [`NEVER_REPLAYED`].
fn replayable(status: &str) -> bool {
    let status: u16 = status.parse().unwrap_or(500);
    status < 500 && !NEVER_REPLAYED.contains(&status)
}

/// `Idempotency-Key` on a `POST` of a transactional route (`transaction::idempotency`): the
/// header, its two answers of its own, a malformed key, and the mark of a replay.
fn declare_idempotency(operation: &mut Operation) {
    let (name, min, max) = (
        IdempotencyKey::NAME,
        IdempotencyKey::MIN_LEN,
        IdempotencyKey::MAX_LEN,
    );
    let description = format!(
        "Makes the request safe to repeat. The first response below 500 is stored \
         with the key for `DB_IDEMPOTENCY_TTL` seconds, atomically with the request's writes, \
         and a repeat of the same request (method, path, body and `Content-Type`) gets it \
         again, marked `{IDEMPOTENT_REPLAYED}: true`, without writing anything. {min} to {max} \
         visible ASCII characters, in one header; anything else is 422 `validation_failed`. \
         This service has one scope of keys, shared by all clients."
    );
    let parameter = ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(min))
                .max_length(Some(max))
                .pattern(Some(IdempotencyKey::pattern())),
        ))
        .build();
    add_parameter(operation, parameter);

    declare_also(
        operation,
        409,
        "`idempotency_key_in_use`: a request with the same `Idempotency-Key` is still running \
         (this answer is not stored: retry later with the same key to get the first request's \
         answer)",
    );
    declare_also(
        operation,
        422,
        &format!(
            "`idempotency_key_reused`: the `{name}` was used before for a different request \
             (method, path, body or `Content-Type`). `validation_failed` also when `{name}` is not one header of \
             {min} to {max} visible ASCII characters (`detail` starts with `{name}`)"
        ),
    );

    let replayed = HeaderBuilder::new()
        .schema(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["true"])),
        )
        .description(Some(format!(
            "`true` on a stored response replayed for a repeated `{name}`; absent otherwise"
        )))
        .build();
    for (status, response) in operation.responses.responses.iter_mut() {
        if let (true, RefOr::T(response)) = (replayable(status), response) {
            response
                .headers
                .insert(IDEMPOTENT_REPLAYED.into(), replayed.clone());
        }
    }
}

/// The consistency token of a write (`docs/api.md`, *Consistency token*): on its success and, when
/// it takes a key (`keyed`), on every answer replayed for the key, which carries the primary's
/// position at the replay (at or after the original write).
fn declare_token_issued(operation: &mut Operation, keyed: bool) {
    let only = if keyed {
        "Only with a read replica configured (`DATABASE_REPLICA_URL`): on the answer to a write \
         that committed, and on any answer replayed for an `Idempotency-Key`"
    } else {
        "Only with a read replica configured (`DATABASE_REPLICA_URL`): on the answer to a write \
         that committed"
    };
    let token = text_header(format!(
        "{only}. A position at or after the write, opaque: send it back in the \
         `{CONSISTENCY_TOKEN}` header of later reads so that they see the write."
    ));
    let cookie = text_header(format!(
        "{only}. `{CONSISTENCY_COOKIE}=<the token>; Path=/; HttpOnly; SameSite=Lax`, for \
         clients that keep cookies."
    ));
    for (status, response) in operation.responses.responses.iter_mut() {
        let carries = status.starts_with('2') || keyed && replayable(status);
        if let (true, RefOr::T(response)) = (carries, response) {
            response
                .headers
                .insert(CONSISTENCY_TOKEN.into(), token.clone());
            response.headers.insert("Set-Cookie".into(), cookie.clone());
        }
    }
}

/// The consistency token a read may send back, as a header or a cookie (`docs/api.md`,
/// *Consistency token*).
fn declare_token_accepted(operation: &mut Operation) {
    let description = "The token of the client's last write. With a read replica configured, \
                       the read runs on the replica once it has replayed that write (waiting at \
                       most `DB_REPLICA_MAX_WAIT_MS`), else on the primary. Any value that is \
                       not a token this service issued is ignored.";
    for (name, place) in [
        (CONSISTENCY_TOKEN, ParameterIn::Header),
        (CONSISTENCY_COOKIE, ParameterIn::Cookie),
    ] {
        let parameter = ParameterBuilder::new()
            .name(name)
            .parameter_in(place)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .build();
        add_parameter(operation, parameter);
    }
}

fn add_parameter(operation: &mut Operation, parameter: Parameter) {
    operation
        .parameters
        .get_or_insert_with(Vec::new)
        .push(parameter);
}

fn text_header(description: String) -> Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::String))
        .description(Some(description))
        .build()
}

/// Adds `description` to the operation's problem response of `status`, or declares that
/// response with it.
fn declare_also(operation: &mut Operation, status: u16, description: &str) {
    let entry = operation.responses.responses.entry(status.to_string());
    match entry.or_insert_with(|| problem_response(status, "")) {
        RefOr::T(response) if response.description.is_empty() => {
            response.description = description.to_owned();
        }
        RefOr::T(response) => {
            response.description = format!("{}. {description}", response.description);
        }
        RefOr::Ref(_) => {}
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
