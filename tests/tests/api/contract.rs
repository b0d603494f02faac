//! `/openapi.json` against the service it describes, so that the document cannot drift from the
//! code: every response of a walk over every operation has a status, a content type, headers
//! and a body the document declares for that operation (a problem's `code` among the codes its
//! response declares; a header the document declares anywhere is declared where it is sent, a
//! `required` one is always sent, and every one matches its schema); every status and problem
//! code the document declares is one the walk provokes (500 and 503 aside, which the
//! transaction tests provoke); the walk repeats every `POST` with an `Idempotency-Key` (first
//! use, replay, the key reused for another body, the key still in use, a malformed key); the
//! constraints of the request schemas and of the `Idempotency-Key` header accept exactly what the
//! service accepts; the consistency-token headers and cookie are the ones a service with a read
//! replica sends and reads; `docs/api.md` names every header, cookie and code of the document;
//! an undeclared method is 405 with an `Allow` header naming the declared ones. schemathesis (`schemathesis.toml`) does the same by generating requests; this
//! is the deterministic check that runs with the suite.

use std::collections::BTreeSet;
use std::sync::Mutex;

use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};

use crate::support::json_schema::Validator;
use crate::support::{TestApp, spawn_app};

/// Statuses the walk does not provoke: the transaction and operations tests do (a database that
/// is down, an exhausted pool, a failed commit).
const PROVOKED_ELSEWHERE: &[u16] = &[500, 503];

const PROBLEM_JSON: &str = "application/problem+json";

/// The document fetched from the app, and the (method, path, status, code) seen so far (the
/// code of a problem response, else empty).
struct Contract {
    document: Value,
    /// Every response header the document declares somewhere, lower-case.
    api_headers: BTreeSet<String>,
    seen: Mutex<BTreeSet<(String, String, u16, String)>>,
}

/// What [`Contract::answer`] checked: the status, headers and JSON body (`Null` when not JSON).
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or_default()
    }
}

impl Contract {
    async fn of(app: &TestApp) -> Contract {
        let res = app.get("/openapi.json").await;
        assert_eq!(res.status(), 200);
        let document: Value = res.json().await.expect("the document is JSON");
        let api_headers = operations(&document)
            .flat_map(|(_, _, operation)| responses(operation))
            .flat_map(|(_, response)| response["headers"].as_object().into_iter().flatten())
            .map(|(name, _)| name.to_ascii_lowercase())
            .collect();
        Contract {
            document,
            api_headers,
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    fn operation(&self, method: &str, template: &str) -> &Value {
        let operation = &self.document["paths"][template][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in the document"
        );
        operation
    }

    /// Asserts that `res`, the answer to `method` on a path of `template`, is one the document
    /// declares, and returns its status and JSON body (`Null` for a body that is not JSON).
    async fn check(&self, method: &str, template: &str, res: reqwest::Response) -> (u16, Value) {
        let answer = self.answer(method, template, res).await;
        (answer.status, answer.body)
    }

    /// POSTs `body` to `path` (a route with no parameters) and checks the answer.
    async fn post(&self, app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
        self.check("POST", path, app.post(path, body).await).await
    }

    /// [`check`](Self::check), returning the headers too.
    async fn answer(&self, method: &str, template: &str, res: reqwest::Response) -> Answer {
        let status = res.status().as_u16();
        let what = format!("{method} {template} → {status}");
        let declared = &self.operation(method, template)["responses"][status.to_string()];
        assert!(
            declared.is_object(),
            "{what}: status not declared; the document has {}",
            self.operation(method, template)["responses"]
        );
        let headers = res.headers().clone();
        self.check_headers(&what, declared, &headers);
        let media_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let text = res.text().await.expect("a body");
        let content = &declared["content"][&media_type];
        assert!(
            content.is_object(),
            "{what}: content type {media_type:?} not declared; the document has {}",
            declared["content"]
        );
        let mut body = Value::Null;
        if media_type.ends_with("json") {
            body = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"));
            // No schema declared (the document itself) means any JSON.
            let schema = content.get("schema").unwrap_or(&Value::Bool(true));
            let errors = Validator::new(&self.document).errors(schema, &body);
            assert!(
                errors.is_empty(),
                "{what}: body breaks the declared schema:\n{}\n{body}",
                errors.join("\n")
            );
        }
        let code = if media_type == PROBLEM_JSON {
            body["code"].as_str().unwrap_or_default().to_owned()
        } else {
            String::new()
        };
        self.seen.lock().expect("not poisoned").insert((
            method.to_owned(),
            template.to_owned(),
            status,
            code,
        ));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// The headers of an answer against its declared response: the required ones are there,
    /// every one there matches its schema, and none of the API's own headers is undeclared.
    fn check_headers(&self, what: &str, declared: &Value, headers: &HeaderMap) {
        let declared_headers = declared["headers"].as_object();
        for (name, header) in declared_headers.into_iter().flatten() {
            let values: Vec<&HeaderValue> = headers.get_all(name.as_str()).iter().collect();
            if values.is_empty() {
                assert!(
                    header["required"] != true,
                    "{what}: required header {name} missing"
                );
                continue;
            }
            let schema = &header["schema"];
            for value in values {
                let text = value
                    .to_str()
                    .unwrap_or_else(|_| panic!("{what}: {name} is not visible ASCII"));
                let value = match schema["type"].as_str() {
                    Some("integer") => text
                        .parse::<i64>()
                        .map_or_else(|_| Value::from(text), Value::from),
                    _ => Value::from(text),
                };
                let errors = Validator::new(&self.document).errors(schema, &value);
                assert!(
                    errors.is_empty(),
                    "{what}: header {name} breaks its schema:\n{}",
                    errors.join("\n")
                );
            }
        }
        for name in headers.keys() {
            let declared_here = declared_headers
                .is_some_and(|d| d.keys().any(|n| n.eq_ignore_ascii_case(name.as_str())));
            assert!(
                declared_here || !self.api_headers.contains(name.as_str()),
                "{what}: sends {name}, which the document declares elsewhere but not here"
            );
        }
    }

    /// Every (method, path, status) the document declares that the walk did not provoke, and
    /// for a problem response, every code it declares that the walk did not receive.
    fn never_seen(&self) -> Vec<String> {
        let seen = self.seen.lock().expect("not poisoned");
        let mut missing = Vec::new();
        for (template, method, operation) in operations(&self.document) {
            let method = method.to_uppercase();
            for (status, response) in responses(operation) {
                let status: u16 = status.parse().expect("numeric statuses");
                if PROVOKED_ELSEWHERE.contains(&status) {
                    continue;
                }
                let got = |code: Option<&str>| {
                    seen.iter().any(|(m, t, s, c)| {
                        (m, t, *s) == (&method, template, status)
                            && code.is_none_or(|code| c == code)
                    })
                };
                let codes = declared_codes(response);
                if codes.is_empty() && !got(None) {
                    missing.push(format!("{method} {template} {status}"));
                }
                for code in codes.into_iter().filter(|code| !got(Some(*code))) {
                    missing.push(format!("{method} {template} {status} {code}"));
                }
            }
        }
        missing
    }

    /// The schema of the `Idempotency-Key` parameter of `POST template`.
    fn idempotency_key_schema(&self, template: &str) -> &Value {
        let parameters = self.operation("POST", template)["parameters"].as_array();
        let parameter = parameters
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
            .unwrap_or_else(|| panic!("POST {template} declares no Idempotency-Key header"));
        assert_eq!(parameter["required"], false, "the key is optional");
        &parameter["schema"]
    }
}

/// Every operation of the document: (path template, method, operation).
fn operations(document: &Value) -> impl Iterator<Item = (&String, &String, &Value)> {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(template, item)| {
            item.as_object()
                .expect("a path item")
                .iter()
                .map(move |(method, operation)| (template, method, operation))
        })
}

fn responses(operation: &Value) -> impl Iterator<Item = (&String, &Value)> {
    operation["responses"]
        .as_object()
        .expect("responses")
        .iter()
}

/// The `code`s a problem response declares: the `enum` of `code` in its schema's `allOf`.
fn declared_codes(response: &Value) -> Vec<&str> {
    let schema = &response["content"][PROBLEM_JSON]["schema"];
    schema["allOf"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|part| part["properties"]["code"]["enum"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

async fn send(app: &TestApp, method: &str, path: &str) -> reqwest::Response {
    let method = Method::from_bytes(method.as_bytes()).expect("a method");
    app.client
        .request(method, app.url(path))
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn every_response_of_every_operation_is_declared_by_the_document_and_every_declaration_is_used()
 {
    let app = spawn_app().await;
    let c = Contract::of(&app).await;

    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json"] {
        c.check("GET", path, app.get(path).await).await;
    }

    // Catalog: created, taken, invalid, not JSON, not sent as JSON, too large.
    let (_, w1) = c
        .post(&app, "/warehouses", &json!({"code": "W1", "name": "One"}))
        .await;
    let (_, w2) = c
        .post(&app, "/warehouses", &json!({"code": "W2", "name": "Two"}))
        .await;
    let (_, p) = c
        .post(&app, "/products", &json!({"sku": "p-1", "name": "P"}))
        .await;
    let (w1, w2, p) = (&w1["id"], &w2["id"], &p["id"]);
    for (path, taken, invalid) in [
        (
            "/warehouses",
            json!({"code": "W1", "name": "Again"}),
            json!({"code": "w", "name": "x"}),
        ),
        (
            "/products",
            json!({"sku": "p-1", "name": "Again"}),
            json!({"sku": "", "name": "x"}),
        ),
    ] {
        c.post(&app, path, &taken).await;
        c.post(&app, path, &invalid).await;
        c.check(
            "POST",
            path,
            app.post_raw(path, "application/json", "{").await,
        )
        .await;
        c.check("POST", path, app.post_raw(path, "text/plain", "{}").await)
            .await;
        c.check(
            "POST",
            path,
            app.post_raw(path, "application/json", vec![b' '; 70_000])
                .await,
        )
        .await;
    }
    for list in ["/warehouses", "/products", "/movements"] {
        for query in ["", "?limit=1", "?limit=0", "?after=x", "?bogus=1"] {
            c.check("GET", list, app.get(&format!("{list}{query}")).await)
                .await;
        }
    }
    for (template, id) in [
        ("/warehouses/{id}", w1),
        ("/warehouses/{id}/stock", w1),
        ("/products/{id}", p),
        ("/products/{id}/stock", p),
    ] {
        for id in [id.to_string(), "999999".into(), "0".into(), "x".into()] {
            let path = template.replace("{id}", &id);
            c.check("GET", template, app.get(&path).await).await;
        }
    }

    // Movements: recorded, unknown ids, short stock, invalid, same warehouse twice.
    let change =
        |w: &Value, p: &Value, q: Value| json!({"warehouse_id": w, "product_id": p, "quantity": q});
    let transfer = |from: &Value, to: &Value, q: i64| json!({"from_warehouse_id": from, "to_warehouse_id": to, "product_id": p, "quantity": q});
    let cases = [
        ("/receipts", change(w1, p, json!(10))),
        ("/receipts", change(&json!(999999), p, json!(1))),
        ("/shipments", change(w1, p, json!(3))),
        ("/shipments", change(w1, &json!(999999), json!(1))),
        ("/shipments", change(w2, p, json!(1))),
        ("/transfers", transfer(w1, w2, 2)),
        ("/transfers", transfer(w1, &json!(999999), 2)),
        ("/transfers", transfer(w1, w2, 1_000_000)),
        ("/transfers", transfer(w1, w1, 1)),
    ];
    for (path, body) in cases {
        c.post(&app, path, &body).await;
    }
    for path in ["/receipts", "/shipments", "/transfers"] {
        c.post(&app, path, &json!({"quantity": 1})).await;
        c.check(
            "POST",
            path,
            app.post_raw(path, "application/json", "{").await,
        )
        .await;
        c.check("POST", path, app.post_raw(path, "text/plain", "{}").await)
            .await;
        c.check(
            "POST",
            path,
            app.post_raw(path, "application/json", vec![b' '; 70_000])
                .await,
        )
        .await;
    }
    for query in [
        format!("?product_id={p}"),
        format!("?warehouse_id={w2}"),
        "?product_id=0".into(),
    ] {
        c.check(
            "GET",
            "/movements",
            app.get(&format!("/movements{query}")).await,
        )
        .await;
    }

    // Every POST again, with an Idempotency-Key.
    let keyed = vec![
        (
            "/warehouses",
            json!({"code": "K1", "name": "Keyed"}),
            json!({"code": "K2", "name": "Keyed"}),
        ),
        (
            "/products",
            json!({"sku": "k-1", "name": "Keyed"}),
            json!({"sku": "k-2", "name": "Keyed"}),
        ),
        (
            "/receipts",
            change(w1, p, json!(1)),
            change(w1, p, json!(2)),
        ),
        (
            "/shipments",
            change(w1, p, json!(1)),
            change(w1, p, json!(2)),
        ),
        ("/transfers", transfer(w1, w2, 1), transfer(w1, w2, 2)),
    ];
    walk_with_keys(&app, &c, keyed).await;

    let missing = c.never_seen();
    assert!(
        missing.is_empty(),
        "declared but never answered by the walk (add a request above, or drop the \
         declaration):\n{}",
        missing.join("\n")
    );
}

async fn post_with_key(app: &TestApp, path: &str, key: &[u8], body: &Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header(
            "Idempotency-Key",
            HeaderValue::from_bytes(key).expect("a sendable header value"),
        )
        .json(body)
        .send()
        .await
        .expect("request sent")
}

/// For each `POST` (all the document has) with a body it accepts and another: the first use of
/// a key, its replay, the key reused for the other body, a malformed key, a stored 4xx and its
/// replay, and a duplicate while the first request is still running, each answer checked
/// against the document.
async fn walk_with_keys(app: &TestApp, c: &Contract, cases: Vec<(&str, Value, Value)>) {
    let posts: BTreeSet<&str> = operations(&c.document)
        .filter(|(_, method, _)| *method == "post")
        .map(|(template, _, _)| template.as_str())
        .collect();
    let walked: BTreeSet<&str> = cases.iter().map(|(path, _, _)| *path).collect();
    assert_eq!(walked, posts, "every POST is walked with a key");

    for (path, body, other) in &cases {
        let path = *path;
        c.idempotency_key_schema(path);
        let send = |key: String, body: Value| async move {
            let res = post_with_key(app, path, key.as_bytes(), &body).await;
            c.answer("POST", path, res).await
        };

        let key = format!("first {path}").replace(' ', "-");
        let first = send(key.clone(), body.clone()).await;
        assert_eq!((first.status, first.replayed()), (201, false), "{path}");
        let again = send(key.clone(), body.clone()).await;
        assert_eq!((again.status, again.replayed()), (201, true), "{path}");
        assert_eq!(again.body, first.body, "{path}: the stored response");
        let reused = send(key, other.clone()).await;
        assert_eq!(
            (reused.status, reused.code(), reused.replayed()),
            (422, "idempotency_key_reused", false),
            "{path}"
        );

        let malformed = send("two words".into(), body.clone()).await;
        assert_eq!(
            (malformed.status, malformed.code()),
            (422, "validation_failed"),
            "{path}"
        );
        let detail = malformed.body["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with("Idempotency-Key"), "{path}: {detail}");

        // A 4xx is stored too, and replayed.
        let key = format!("invalid-{path}");
        let refused = send(key.clone(), json!({})).await;
        assert_eq!(
            (refused.status, refused.code(), refused.replayed()),
            (422, "validation_failed", false),
            "{path}"
        );
        let replayed = send(key, json!({})).await;
        assert_eq!(
            (replayed.status, replayed.replayed()),
            (422, true),
            "{path}"
        );
        assert_eq!(replayed.body, refused.body, "{path}: the stored 4xx");

        a_duplicate_of_a_running_request_is_409(app, c, path, other).await;
    }
}

/// Holds the first request with a key just before it stores the key (its `INSERT` into the
/// layer's table waits for this test's table lock), sends the same request again, then lets the
/// first one finish.
async fn a_duplicate_of_a_running_request_is_409(
    app: &TestApp,
    c: &Contract,
    path: &str,
    body: &Value,
) {
    let key = format!("held-{path}");
    let hold = app.db.begin().await.expect("begin");
    // EXCLUSIVE blocks the INSERT, not the SELECT with which the first request claims the key.
    hold.execute_unprepared("LOCK TABLE idempotency_key IN EXCLUSIVE MODE")
        .await
        .expect("lock the key table");
    let waiting = "SELECT count(*) FROM pg_locks l JOIN pg_class t ON t.oid = l.relation \
                   WHERE t.relname = 'idempotency_key' AND NOT l.granted \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let first = post_with_key(app, path, key.as_bytes(), body);
    let duplicate = async {
        app.wait_until("the first request waits to store its key", || async {
            app.scalar(waiting).await > 0
        })
        .await;
        let duplicate = post_with_key(app, path, key.as_bytes(), body).await;
        hold.rollback().await.expect("release the key table");
        duplicate
    };
    let (first, duplicate) = tokio::join!(first, duplicate);
    let duplicate = c.answer("POST", path, duplicate).await;
    assert_eq!(
        (duplicate.status, duplicate.code(), duplicate.replayed()),
        (409, "idempotency_key_in_use", false),
        "{path}"
    );
    let first = c.answer("POST", path, first).await;
    assert_eq!((first.status, first.replayed()), (201, false), "{path}");
}

#[tokio::test]
async fn the_idempotency_key_schema_allows_exactly_the_keys_the_service_accepts() {
    let app = spawn_app().await;
    let c = Contract::of(&app).await;
    let schema = c.idempotency_key_schema("/receipts");
    for (template, _, _) in operations(&c.document).filter(|(_, m, _)| *m == "post") {
        assert_eq!(
            c.idempotency_key_schema(template),
            schema,
            "one constraint on every POST"
        );
    }
    let w = app.warehouse("KEYS").await;
    let p = app.product("keys-1").await;
    let body = json!({"warehouse_id": w, "product_id": p, "quantity": 1});
    let every_visible: String = (0x21u8..=0x7e).map(char::from).collect();
    // Leading and trailing spaces are not in the table: HTTP strips them from a field value
    // before any server sees it, so " k " arrives as the key "k".
    let keys = [
        "a".to_owned(),
        "!".into(),
        "~".into(),
        every_visible,
        "k".repeat(255),
        "\"quoted\",{json}".into(),
        String::new(),
        "k".repeat(256),
        "two words".into(),
        "tab\there".into(),
        "cl\u{e9}".into(),
        "\u{a0}nbsp".into(),
        "\u{5f8c}".into(),
    ];
    let validator = Validator::new(&c.document);
    for key in keys {
        let allowed = validator
            .errors(schema, &Value::from(key.as_str()))
            .is_empty();
        let res = post_with_key(&app, "/receipts", key.as_bytes(), &body).await;
        let answer = c.answer("POST", "/receipts", res).await;
        if allowed {
            assert_eq!(
                answer.status, 201,
                "the document allows the key {key:?}, the service answers {}",
                answer.body
            );
        } else {
            assert_eq!(
                (answer.status, answer.code()),
                (422, "validation_failed"),
                "the document forbids the key {key:?}"
            );
            let detail = answer.body["detail"].as_str().unwrap_or_default();
            assert!(detail.starts_with("Idempotency-Key"), "{key:?}: {detail}");
        }
    }
}

#[tokio::test]
async fn the_consistency_token_is_sent_and_read_under_the_names_the_document_declares() {
    let app = TestApp::builder()
        .replica(crate::support::replica::ReplicaPair::shared())
        .spawn()
        .await;
    let c = Contract::of(&app).await;
    let created = c
        .answer(
            "POST",
            "/warehouses",
            app.post("/warehouses", &json!({"code": "T1", "name": "Token"}))
                .await,
        )
        .await;
    assert_eq!(created.status, 201);
    // With a replica, a committed write carries every header its success declares, except
    // the mark of a replay.
    let declared = c.operation("POST", "/warehouses")["responses"]["201"]["headers"]
        .as_object()
        .expect("headers");
    for name in declared.keys().filter(|n| *n != "Idempotent-Replayed") {
        assert!(
            created.headers.contains_key(name.as_str()),
            "with a replica the 201 carries {name}"
        );
    }
    let token = created.headers["consistency-token"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let cookie = created.headers["set-cookie"].to_str().expect("ASCII");
    assert_eq!(
        cookie,
        format!("consistency_token={token}; Path=/; HttpOnly; SameSite=Lax")
    );
    // A replayed answer carries the token too, a stored 4xx's included: each is checked
    // against its declared response.
    for (key, body, status) in [
        ("token-201", json!({"code": "T2", "name": "Token"}), 201),
        ("token-422", json!({}), 422),
    ] {
        for replay in [false, true] {
            let res = post_with_key(&app, "/warehouses", key.as_bytes(), &body).await;
            let answer = c.answer("POST", "/warehouses", res).await;
            assert_eq!(
                (answer.status, answer.replayed()),
                (status, replay),
                "{key}"
            );
            let tokens =
                ["consistency-token", "set-cookie"].map(|h| answer.headers.contains_key(h));
            let expected = status < 400 || replay;
            assert_eq!(tokens, [expected; 2], "{key}, replayed: {replay}");
        }
    }

    // Every read declares the token as a header and as a cookie (its only ones); a read
    // carrying the highest position there is (`Lsn::PRIMARY`) runs on the primary at once, so
    // the service reading those names shows in `db_reads_total`, while a read without one runs
    // on the replica.
    let top = "v1-ffffffffffffffff";
    let only = |template: &str, place: &str| -> String {
        let parameters: Vec<&Value> = c.operation("GET", template)["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == place)
            .collect();
        assert_eq!(parameters.len(), 1, "GET {template}: one {place} parameter");
        assert_eq!(parameters[0]["required"], false, "GET {template}: optional");
        parameters[0]["name"].as_str().expect("a name").to_owned()
    };
    let (header, cookie_name) = (only("/warehouses", "header"), only("/warehouses", "cookie"));
    assert!(header.eq_ignore_ascii_case("consistency-token"), "{header}");
    assert!(cookie.starts_with(&format!("{cookie_name}=")), "{cookie}");
    for (template, _, _) in operations(&c.document)
        .filter(|(t, m, _)| *m == "get" && !app::routes::OUTSIDE_TRANSACTIONS.contains(&t.as_str()))
    {
        assert_eq!(only(template, "header"), header, "GET {template}");
        assert_eq!(only(template, "cookie"), cookie_name, "GET {template}");
    }
    let reads = |target: &'static str| {
        let app = &app;
        async move {
            crate::transactions::metric(app, &format!("db_reads_total{{target=\"{target}\"}}"))
                .await
        }
    };
    let (replica, primary) = (reads("replica").await, reads("primary").await);
    let plain = app.get("/warehouses").await;
    assert_eq!(c.check("GET", "/warehouses", plain).await.0, 200);
    assert_eq!(
        reads("replica").await,
        replica + 1.0,
        "no token: the replica"
    );
    for (name, value) in [
        (header.clone(), top.to_owned()),
        ("cookie".to_owned(), format!("{cookie_name}={top}")),
    ] {
        let res = app
            .client
            .get(app.url("/warehouses"))
            .header(name.as_str(), value)
            .send()
            .await
            .expect("request sent");
        assert_eq!(c.check("GET", "/warehouses", res).await.0, 200);
    }
    assert_eq!(
        reads("primary").await,
        primary + 2.0,
        "the token is read from the declared header and cookie"
    );
}

/// `docs/api.md`, the reference clients read, names (in backticks) every header, cookie and
/// problem code the document declares.
#[test]
fn the_api_reference_names_every_header_cookie_and_code_of_the_document() {
    let reference = include_str!("../../../docs/api.md");
    let document = app::routes::openapi::document_json();
    let mut names = BTreeSet::new();
    for (_, _, operation) in operations(&document) {
        let parameters = operation["parameters"].as_array().into_iter().flatten();
        names.extend(
            parameters
                .filter(|p| p["in"] == "header" || p["in"] == "cookie")
                .filter_map(|p| p["name"].as_str()),
        );
        for (_, response) in responses(operation) {
            let headers = response["headers"].as_object().into_iter().flatten();
            names.extend(headers.map(|(name, _)| name.as_str()));
            names.extend(declared_codes(response));
        }
    }
    let missing: Vec<&str> = names
        .into_iter()
        .filter(|name| !reference.contains(&format!("`{name}")))
        .collect();
    assert!(missing.is_empty(), "docs/api.md does not name {missing:?}");
}

#[tokio::test]
async fn an_undeclared_method_is_405_with_an_allow_header_naming_the_declared_ones() {
    let app = spawn_app().await;
    let c = Contract::of(&app).await;
    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"];
    for (template, item) in c.document["paths"].as_object().expect("paths") {
        let path = template.replace("{id}", "1");
        let mut declared: BTreeSet<String> = item
            .as_object()
            .expect("a path item")
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        if declared.contains("GET") {
            declared.insert("HEAD".into());
        }
        for method in methods.iter().filter(|m| !declared.contains(**m)) {
            let res = send(&app, method, &path).await;
            assert_eq!(res.status(), 405, "{method} {path}");
            let allow: BTreeSet<String> = res.headers()["allow"]
                .to_str()
                .expect("ASCII")
                .split(',')
                .map(|m| m.trim().to_owned())
                .collect();
            assert_eq!(allow, declared, "Allow of {method} {path}");
            let (_, body) = crate::support::problem(res).await;
            assert_eq!(body["code"], "method_not_allowed");
        }
    }
}

/// For a request schema and a table of candidate bodies: the document's verdict (valid or not)
/// must be the handler's (anything but 422, or 422 naming the field).
async fn agree(app: &TestApp, c: &Contract, path: &str, schema: &str, bodies: Vec<(Value, &str)>) {
    let validator = Validator::new(&c.document);
    let schema = validator.component(schema);
    for (body, field) in bodies {
        let valid = validator.errors(schema, &body).is_empty();
        let (status, answer) = c.post(app, path, &body).await;
        if valid {
            assert_ne!(
                status, 422,
                "the document allows {body} but {path} refuses it: {answer}"
            );
        } else {
            assert_eq!(
                status, 422,
                "the document forbids {body} but {path} answers {status}"
            );
            let detail = answer["detail"].as_str().unwrap_or_default();
            assert!(
                detail.starts_with(field),
                "{body}: {detail} should name {field}"
            );
        }
    }
}

#[tokio::test]
async fn the_request_schemas_allow_exactly_what_the_handlers_accept() {
    let app = spawn_app().await;
    let c = Contract::of(&app).await;
    let names = [
        "x",
        " x ",
        "é".repeat(200).as_str(),
        "Entrepôt 倉庫",
        "\u{feff}",
        "a\u{200b}",
        "",
        " ",
        "\t",
        "\u{3000}",
        "\u{a0}\u{2028}",
        "a\nb",
        "a\u{7f}",
        "a\u{85}",
        "é".repeat(201).as_str(),
    ]
    .map(str::to_owned);
    let codes = [
        "A",
        "Z-9_",
        &"W".repeat(32),
        "",
        "a",
        "A B",
        "É",
        "A\n",
        &"W".repeat(33),
    ]
    .map(str::to_owned);
    let mut warehouses = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        warehouses.push((json!({"code": code, "name": format!("n{i}")}), "code"));
    }
    for (i, name) in names.iter().enumerate() {
        warehouses.push((json!({"code": format!("N{i}"), "name": name}), "name"));
    }
    agree(&app, &c, "/warehouses", "NewWarehouse", warehouses).await;

    let skus = [
        "a",
        "A.b_c-9",
        &"s".repeat(64),
        "",
        "a b",
        "a/b",
        "ü",
        "a\n",
        &"s".repeat(65),
    ]
    .map(str::to_owned);
    let products = skus
        .iter()
        .map(|sku| (json!({"sku": sku, "name": "n"}), "sku"))
        .collect();
    agree(&app, &c, "/products", "NewProduct", products).await;

    let w = app.warehouse("STOCK").await;
    let p = app.product("stock-1").await;
    let mut changes = Vec::new();
    for q in [
        json!(1),
        json!(1_000_000_000),
        json!(62.0),
        json!(0),
        json!(-1),
        json!(1_000_000_001),
        json!(1.5),
        json!("7"),
    ] {
        changes.push((
            json!({"warehouse_id": w, "product_id": p, "quantity": q}),
            "quantity",
        ));
    }
    for id in [
        json!(i64::MAX),
        json!(0),
        json!(-1),
        json!(u64::MAX),
        json!(null),
    ] {
        changes.push((
            json!({"warehouse_id": id, "product_id": p, "quantity": 1}),
            "warehouse_id",
        ));
    }
    agree(&app, &c, "/receipts", "StockChange", changes).await;
}
