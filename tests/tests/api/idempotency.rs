//! `Idempotency-Key` on `POST` (`docs/api.md`): a repeat gets the stored response and writes
//! nothing, a concurrent duplicate is 409 `idempotency_key_in_use`, a different request with the
//! key (another body, path or `Content-Type`) is 422 `idempotency_key_reused`, a key is scoped
//! (the same key from two scopes is two keys), and the key survives an app restart and a lost
//! `COMMIT` reply.

use futures_util::future::join_all;
use sea_orm::ConnectionTrait;
use sea_orm_actix_tx::LayerBuilder;
use serde_json::{Value, json};

use crate::support::fault_proxy::{Cut, FaultProxy, upstream_of};
use crate::support::{
    Backend, CONCURRENT_POOL, TestApp, admin_url, on_every_backend, problem, spawn_app,
};
use crate::transactions::{create_test_tables, metric, routes};

// The layer's own statements differ per backend (advisory lock, placeholders, upsert): these
// run on PostgreSQL, MariaDB, SQLite and behind PgBouncer in transaction mode.
on_every_backend!(
    a_repeat_with_the_same_key_gets_the_stored_response_and_writes_nothing,
    without_the_header_every_post_writes_again,
    fifty_concurrent_identical_posts_with_one_key_make_one_movement,
    the_same_key_for_a_different_request_is_422_idempotency_key_reused,
    a_4xx_is_stored_and_replayed_although_its_writes_were_rolled_back,
    the_same_key_and_body_with_another_content_type_is_a_different_request,
);

async fn post_with_key(app: &TestApp, path: &str, key: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

fn replayed(res: &reqwest::Response) -> bool {
    res.headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// A warehouse and a product, and the body of a receipt of 5 of them.
async fn receipt(app: &TestApp) -> Value {
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5})
}

async fn movements(app: &TestApp) -> i64 {
    app.scalar("SELECT count(*) FROM movement").await
}

async fn a_repeat_with_the_same_key_gets_the_stored_response_and_writes_nothing(app: TestApp) {
    let body = receipt(&app).await;

    let first = post_with_key(&app, "/receipts", "receipt-1", &body).await;
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    let location = first.headers().get("location").cloned();
    let original: Value = first.json().await.expect("json");

    for _ in 0..2 {
        let again = post_with_key(&app, "/receipts", "receipt-1", &body).await;
        assert_eq!(again.status(), 201);
        assert!(replayed(&again), "marked Idempotent-Replayed: true");
        assert_eq!(again.headers().get("location").cloned(), location);
        assert_eq!(
            again.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        assert_eq!(again.json::<Value>().await.expect("json"), original);
    }
    assert_eq!(movements(&app).await, 1, "one movement");
    assert_eq!(app.stock(1, 1).await, 5);
    assert_eq!(metric(&app, "db_idempotent_replays_total").await, 2.0);
}

async fn without_the_header_every_post_writes_again(app: TestApp) {
    assert_eq!(metric(&app, "db_idempotent_replays_total").await, 0.0);
    let body = receipt(&app).await;
    for _ in 0..2 {
        let res = app.post("/receipts", &body).await;
        assert_eq!(res.status(), 201);
        assert!(!replayed(&res));
    }
    assert_eq!(movements(&app).await, 2);
    assert_eq!(app.scalar("SELECT count(*) FROM idempotency_key").await, 0);
}

async fn fifty_concurrent_identical_posts_with_one_key_make_one_movement(app: TestApp) {
    let body = receipt(&app).await;

    let answers = join_all((0..50).map(|_| post_with_key(&app, "/receipts", "burst", &body))).await;

    let mut originals = 0;
    for res in answers {
        match res.status().as_u16() {
            201 => originals += usize::from(!replayed(&res)),
            409 => {
                let (_, problem) = problem(res).await;
                assert_eq!(problem["code"], "idempotency_key_in_use", "{problem}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(originals, 1, "exactly one request ran the handler");
    assert_eq!(movements(&app).await, 1, "one movement");
    assert_eq!(app.stock(1, 1).await, 5);
    let later = post_with_key(&app, "/receipts", "burst", &body).await;
    assert_eq!(later.status(), 201);
    assert!(replayed(&later));
    app.assert_invariant().await;
}

async fn the_same_key_for_a_different_request_is_422_idempotency_key_reused(app: TestApp) {
    let body = receipt(&app).await;
    let first = post_with_key(&app, "/receipts", "k", &body).await;
    assert_eq!(first.status(), 201);

    let mut other_quantity = body.clone();
    other_quantity["quantity"] = json!(6);
    let cases = [
        ("a different body", "/receipts", other_quantity),
        ("a different path", "/shipments", body.clone()),
    ];
    for (what, path, request) in cases {
        let res = post_with_key(&app, path, "k", &request).await;
        let (status, problem) = problem(res).await;
        assert_eq!(status, 422, "{what}");
        assert_eq!(
            problem["code"], "idempotency_key_reused",
            "{what}: {problem}"
        );
    }
    assert_eq!(movements(&app).await, 1, "nothing more was written");
}

#[tokio::test]
async fn an_invalid_key_is_422_validation_failed_naming_the_header() {
    let app = spawn_app().await;
    let body = receipt(&app).await;
    let too_long = "k".repeat(256);
    let cases: [(&str, &[u8]); 4] = [
        ("empty", b""),
        ("256 characters", too_long.as_bytes()),
        ("a space", b"two words"),
        ("not ASCII", "cl\u{e9}".as_bytes()),
    ];
    for (what, key) in cases {
        let res = app
            .client
            .post(app.url("/receipts"))
            .header(
                "Idempotency-Key",
                reqwest::header::HeaderValue::from_bytes(key).expect("a sendable value"),
            )
            .json(&body)
            .send()
            .await
            .expect("request sent");
        let (status, problem) = problem(res).await;
        assert_eq!(status, 422, "{what}");
        assert_eq!(problem["code"], "validation_failed", "{what}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with("Idempotency-Key"), "{what}: {detail}");
    }
    assert_eq!(movements(&app).await, 0);
}

async fn the_same_key_and_body_with_another_content_type_is_a_different_request(app: TestApp) {
    let body = serde_json::to_vec(&receipt(&app).await).expect("json");
    let send = |key: &'static str, content_type: &'static str| {
        app.client
            .post(app.url("/receipts"))
            .header("Idempotency-Key", key)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
    };

    // A 415 is stored and replayed for the same request; the same bytes sent as JSON are
    // another request, not a replay of the 415.
    let first = send("typed", "text/plain").await.expect("sent");
    assert!(!replayed(&first));
    let (status, rejected) = problem(first).await;
    assert_eq!(
        (status, rejected["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let again = send("typed", "text/plain").await.expect("sent");
    assert!(replayed(&again), "the same request replays its 415");
    let as_json = send("typed", "application/json").await.expect("sent");
    assert!(!replayed(&as_json), "a stored 415 is not replayed for JSON");
    let (status, reused) = problem(as_json).await;
    assert_eq!(
        (status, reused["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    assert_eq!(movements(&app).await, 0);

    // And the other way round: a stored 201 is not replayed for the body sent as text.
    let created = send("typed-2", "application/json").await.expect("sent");
    assert_eq!(created.status(), 201);
    let as_text = send("typed-2", "text/plain").await.expect("sent");
    let (status, reused) = problem(as_text).await;
    assert_eq!(
        (status, reused["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    let replay = send("typed-2", "application/json").await.expect("sent");
    assert_eq!(replay.status(), 201);
    assert!(replayed(&replay));
    assert_eq!(movements(&app).await, 1);
}

/// The header the scoped test app takes its `Idempotency-Key` scope from (a stand-in for the
/// authenticated client: the inventory itself has no authentication and one scope).
const CLIENT: &str = "x-client";

fn scope_by_client(layer: LayerBuilder<'_>) -> LayerBuilder<'_> {
    layer.idempotency_scope(|req| {
        req.headers()
            .get(CLIENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

/// The inventory on `backend` ("postgres", "mariadb", "sqlite") with its layer scoping keys by
/// [`CLIENT`].
async fn scoped_app(backend: &str) -> TestApp {
    let backend = match backend {
        "postgres" => Backend::Postgres,
        "mariadb" => Backend::Mariadb,
        _ => Backend::Sqlite,
    };
    TestApp::builder()
        .backend(backend)
        .env(CONCURRENT_POOL)
        .layer(scope_by_client)
        .spawn()
        .await
}

async fn post_as(
    app: &TestApp,
    client: Option<&str>,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/receipts"))
        .header("Idempotency-Key", key)
        .json(body);
    if let Some(client) = client {
        request = request.header(CLIENT, client);
    }
    request.send().await.expect("request sent")
}

async fn the_same_key_from_two_scopes_runs_twice_and_never_replays_across(backend: &str) {
    let app = scoped_app(backend).await;
    let body = receipt(&app).await;

    // "Alice" differs from "alice" in one letter's case only: another scope on every backend.
    let scopes = [Some("alice"), Some("bob"), Some("Alice"), None];
    let mut originals = Vec::new();
    for scope in scopes {
        let first = post_as(&app, scope, "shared-key", &body).await;
        assert_eq!(first.status(), 201, "{scope:?}");
        assert!(!replayed(&first), "{scope:?}: a new key in its own scope");
        originals.push(first.json::<Value>().await.expect("json"));
    }
    assert_eq!(movements(&app).await, 4, "the handler ran once per scope");
    for (i, a) in originals.iter().enumerate() {
        for b in &originals[i + 1..] {
            assert_ne!(a["id"], b["id"], "four movements, four answers");
        }
    }

    // Each scope replays its own answer, never another's.
    for (scope, original) in scopes.iter().zip(&originals) {
        let again = post_as(&app, *scope, "shared-key", &body).await;
        assert_eq!(again.status(), 201, "{scope:?}");
        assert!(replayed(&again), "{scope:?}");
        assert_eq!(
            &again.json::<Value>().await.expect("json"),
            original,
            "{scope:?}"
        );
    }
    assert_eq!(movements(&app).await, 4);

    // Within its scope the key is still bound to its request.
    let mut other = body.clone();
    other["quantity"] = json!(6);
    let (status, reused) = problem(post_as(&app, Some("bob"), "shared-key", &other).await).await;
    assert_eq!(
        (status, reused["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM idempotency_key WHERE request_key = 'shared-key'")
            .await,
        4,
        "one row per scope"
    );
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM idempotency_key WHERE request_key = 'shared-key' AND scope = ''"
        )
        .await,
        1,
        "a request without a scope is in the default scope, the empty string"
    );
    app.assert_invariant().await;
}

#[tokio::test]
async fn the_same_key_from_two_scopes_runs_twice_on_postgres() {
    the_same_key_from_two_scopes_runs_twice_and_never_replays_across("postgres").await;
}

#[tokio::test]
async fn the_same_key_from_two_scopes_runs_twice_on_mariadb() {
    the_same_key_from_two_scopes_runs_twice_and_never_replays_across("mariadb").await;
}

#[tokio::test]
async fn the_same_key_from_two_scopes_runs_twice_on_sqlite() {
    the_same_key_from_two_scopes_runs_twice_and_never_replays_across("sqlite").await;
}

#[tokio::test]
async fn concurrent_requests_with_one_key_in_two_scopes_are_not_duplicates() {
    let app = scoped_app("postgres").await;
    let body = receipt(&app).await;
    let clients = ["alice", "bob"];
    let answers =
        join_all((0..20).map(|i| post_as(&app, Some(clients[i % 2]), "burst", &body))).await;
    let mut originals = 0;
    for res in answers {
        match res.status().as_u16() {
            201 => originals += usize::from(!replayed(&res)),
            409 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(originals, 2, "one run per scope");
    assert_eq!(movements(&app).await, 2);
}

async fn a_4xx_is_stored_and_replayed_although_its_writes_were_rolled_back(app: TestApp) {
    let body = receipt(&app).await;
    let first = post_with_key(&app, "/shipments", "ship-1", &body).await;
    let (status, problem_body) = problem(first).await;
    assert_eq!(
        (status, problem_body["code"].as_str()),
        (409, Some("insufficient_stock"))
    );

    app.receive(1, 1, 10).await;
    let again = post_with_key(&app, "/shipments", "ship-1", &body).await;
    assert!(replayed(&again));
    let (status, replayed_body) = problem(again).await;
    assert_eq!(status, 409);
    assert_eq!(
        replayed_body, problem_body,
        "the stored answer, not a new shipment"
    );
    assert_eq!(app.stock(1, 1).await, 10);
}

#[tokio::test]
async fn a_rerun_after_a_serialization_failure_is_the_same_attempt_not_a_replay() {
    let app = app_with_test_routes().await;
    let send = || {
        app.client
            .post(app.url("/test/conflict"))
            .header("Idempotency-Key", "rerun")
            .header("x-key", "IDEM")
            .header("x-fail-times", "1")
            .json(&json!({}))
            .send()
    };
    let first = send().await.expect("sent");
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first), "a re-run is not a replay");
    assert_eq!(first.json::<Value>().await.expect("json")["attempt"], 2);
    assert_eq!(metric(&app, "db_idempotent_replays_total").await, 0.0);

    let again = send().await.expect("sent");
    assert!(replayed(&again));
    assert_eq!(again.json::<Value>().await.expect("json")["attempt"], 2);
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 1);
}

async fn app_with_test_routes() -> TestApp {
    let app = TestApp::builder().routes(routes).spawn().await;
    create_test_tables(&app).await;
    app
}

#[tokio::test]
async fn a_key_is_replayed_by_a_new_app_over_the_same_database() {
    let first_app = spawn_app().await;
    let body = receipt(&first_app).await;
    let first = post_with_key(&first_app, "/receipts", "restart", &body).await;
    assert_eq!(first.status(), 201);
    let original: Value = first.json().await.expect("json");
    // The first app stops; its database is the new app's.
    let database = first_app.into_database();
    let app = TestApp::builder().database(database).spawn().await;
    let again = post_with_key(&app, "/receipts", "restart", &body).await;
    assert_eq!(again.status(), 201);
    assert!(replayed(&again));
    assert_eq!(again.json::<Value>().await.expect("json"), original);
    assert_eq!(movements(&app).await, 1);
}

#[tokio::test]
async fn after_a_lost_commit_reply_a_retry_with_the_key_gets_the_original_201_and_one_movement() {
    let proxy = FaultProxy::start(&upstream_of(&admin_url())).await;
    let app = TestApp::builder().behind(&proxy).spawn().await;
    let body = receipt(&app).await;
    proxy.cut_next_commit(Cut::AfterForwarding);

    let first = post_with_key(&app, "/receipts", "cut", &body).await;
    assert!(proxy.fired());
    assert_eq!(first.status(), 201);
    let original: Value = first.json().await.expect("json");

    let again = post_with_key(&app, "/receipts", "cut", &body).await;
    assert_eq!(again.status(), 201);
    assert!(replayed(&again));
    assert_eq!(again.json::<Value>().await.expect("json"), original);
    assert_eq!(movements(&app).await, 1);
}

#[tokio::test]
async fn after_a_commit_that_never_arrived_a_retry_with_the_key_runs_once() {
    let proxy = FaultProxy::start(&upstream_of(&admin_url())).await;
    let app = TestApp::builder().behind(&proxy).spawn().await;
    let body = receipt(&app).await;
    proxy.cut_next_commit(Cut::BeforeForwarding);

    let first = post_with_key(&app, "/receipts", "lost", &body).await;
    assert!(proxy.fired());
    assert_eq!(first.status(), 503, "nothing was committed, nothing stored");

    let again = post_with_key(&app, "/receipts", "lost", &body).await;
    assert_eq!(again.status(), 201);
    assert!(!replayed(&again), "the first attempt left no key behind");
    assert_eq!(movements(&app).await, 1);
}

#[tokio::test]
async fn expired_keys_are_forgotten_and_cleaned_up() {
    let app = spawn_app().await;
    let body = receipt(&app).await;
    assert_eq!(
        post_with_key(&app, "/receipts", "old", &body)
            .await
            .status(),
        201
    );
    assert_eq!(
        post_with_key(&app, "/receipts", "fresh", &body)
            .await
            .status(),
        201
    );
    app.db
        .execute_unprepared(
            "UPDATE idempotency_key SET expires_at = now() - interval '1 second' \
             WHERE request_key = 'old'",
        )
        .await
        .expect("expire one key");

    let mut other = body.clone();
    other["quantity"] = json!(7);
    let reused = post_with_key(&app, "/receipts", "old", &other).await;
    assert_eq!(reused.status(), 201, "an expired key is free again");
    assert!(!replayed(&reused));
    assert_eq!(movements(&app).await, 3);

    app.db
        .execute_unprepared("UPDATE idempotency_key SET expires_at = now() - interval '1 second'")
        .await
        .expect("expire every key");
    assert_eq!(
        sea_orm_actix_tx::transaction::clean_expired_idempotency_keys(&app.db)
            .await
            .expect("clean-up runs"),
        2
    );
    assert_eq!(app.scalar("SELECT count(*) FROM idempotency_key").await, 0);
}

#[tokio::test]
async fn with_a_replica_a_replay_carries_a_consistency_token_that_reads_the_replayed_write() {
    let app = TestApp::builder()
        .replica(crate::support::replica::ReplicaPair::shared())
        .spawn()
        .await;
    let body = receipt(&app).await;
    let product = body["product_id"].as_i64().expect("product id");
    let token = |res: &reqwest::Response| {
        res.headers()
            .get("consistency-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    let first = post_with_key(&app, "/receipts", "replayed-read", &body).await;
    assert_eq!(first.status(), 201);
    assert!(token(&first).is_some(), "the first answer carries a token");
    let again = post_with_key(&app, "/receipts", "replayed-read", &body).await;
    assert!(replayed(&again));
    let replay_token = token(&again).expect("the replay carries a token too");
    assert!(
        again
            .headers()
            .get_all("set-cookie")
            .iter()
            .any(|c| c.as_bytes().starts_with(b"consistency_token=")),
        "and its cookie"
    );

    let read = app
        .client
        .get(app.url(&format!("/products/{product}/stock")))
        .header("consistency-token", replay_token)
        .send()
        .await
        .expect("request sent");
    assert_eq!(read.status(), 200);
    let stock: Value = read.json().await.expect("json");
    assert_eq!(
        stock["total"], 5,
        "the replayed write is read back: {stock}"
    );
    assert_eq!(movements(&app).await, 1);
}
