//! Reads from a streaming replica (`DATABASE_REPLICA_URL`, `docs/scale-out.md`): every client reads
//! its own writes through the consistency token, reads without one are served by the replica, and a
//! replica that is down, paused or forged against is never an outage.

use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use app::problem::ApiError;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use sea_orm_actix_tx::{Layer, Tx};
use serde_json::{Value, json};

use crate::support::replica::{MARGIN, ReplicaPair, text};
use crate::support::{TestApp, spawn_app};
use crate::transactions::metric;

mod pgbouncer;

const TOKEN: &str = "consistency-token";

async fn receipt(app: &TestApp, warehouse: i64, product: i64) -> reqwest::Response {
    let res = app
        .post(
            "/receipts",
            &json!({"warehouse_id": warehouse, "product_id": product, "quantity": 1}),
        )
        .await;
    assert_eq!(res.status(), 201, "receipt");
    res
}

fn token_of(res: &reqwest::Response) -> String {
    res.headers()
        .get(TOKEN)
        .and_then(|v| v.to_str().ok())
        .expect("a committed write carries a Consistency-Token")
        .to_owned()
}

async fn total(res: reqwest::Response) -> i64 {
    assert_eq!(res.status(), 200, "the read is served");
    let body: Value = res.json().await.expect("json");
    body["total"].as_i64().expect("total")
}

async fn reads(app: &TestApp, target: &str) -> f64 {
    metric(app, &format!("db_reads_total{{target=\"{target}\"}}")).await
}

async fn ready(app: &TestApp) -> Value {
    let res = app.get("/health/ready").await;
    assert_eq!(
        res.status(),
        200,
        "a replica's state never makes the service unready"
    );
    res.json().await.expect("json")
}

#[tokio::test]
async fn a_client_that_sends_its_token_back_never_reads_a_stale_stock_from_the_replica() {
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .spawn()
        .await;
    let (w, p) = receipts_each_read_back_with_its_token(&app).await;

    // Without the token the same loop may be stale: it is only served.
    for _ in 0..20 {
        receipt(&app, w, p).await;
        total(app.get(&format!("/products/{p}/stock")).await).await;
    }
}

/// 200 times: a receipt, then at once its stock read with the receipt's token (half of the
/// clients send the header, half only keep the cookie); never stale, and some reads ran on the
/// replica. Returns the warehouse and product.
pub(super) async fn receipts_each_read_back_with_its_token(app: &TestApp) -> (i64, i64) {
    let w = app.warehouse("W").await;
    let p = app.product("RYW").await;
    for i in 1..=200 {
        let written = receipt(app, w, p).await;
        let token = token_of(&written);
        let read = app.client.get(app.url(&format!("/products/{p}/stock")));
        let read = if i % 2 == 0 {
            read.header(TOKEN, &token)
        } else {
            read.header("cookie", format!("consistency_token={token}"))
        };
        let seen = total(read.send().await.expect("request sent")).await;
        assert_eq!(seen, i, "read {i} with its token saw a stale stock");
    }
    let (replica, primary) = (reads(app, "replica").await, reads(app, "primary").await);
    assert_eq!(replica + primary, 200.0);
    assert!(replica > 0.0, "no read with a token ran on the replica");
    (w, p)
}

#[tokio::test]
async fn a_write_answers_its_token_as_a_header_and_a_cookie_for_the_whole_site() {
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .spawn()
        .await;
    let res = app
        .post("/warehouses", &json!({"code": "T", "name": "Token"}))
        .await;
    assert_eq!(res.status(), 201);
    let token = token_of(&res);
    let cookie = res
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a cookie")
        .to_owned();
    assert_eq!(
        cookie,
        format!("consistency_token={token}; Path=/; HttpOnly; SameSite=Lax")
    );
    let read = app.get("/warehouses").await;
    assert_eq!(read.status(), 200);
    assert!(
        read.headers().get(TOKEN).is_none(),
        "a read issues no token"
    );
    let failed = app
        .post("/warehouses", &json!({"code": "T", "name": "Again"}))
        .await;
    assert_eq!(failed.status(), 409);
    assert!(
        failed.headers().get(TOKEN).is_none(),
        "a rollback issues no token"
    );
}

#[tokio::test]
async fn reads_without_a_token_are_served_by_the_replica() {
    let pair = ReplicaPair::shared();
    let app = TestApp::builder().replica(pair).spawn().await;
    tokenless_reads_seen_by_the_replica(pair, &app).await;
}

/// Reads without a token until the replica's own statistics count them (index scans of
/// `product`, which only `GET /products/{id}` makes there; backends publish their counts at
/// most once a second, so keep reading until they show), and every one counted on the
/// replica by the app. Returns a direct connection to the replica.
pub(super) async fn tokenless_reads_seen_by_the_replica(
    pair: &ReplicaPair,
    app: &TestApp,
) -> DatabaseConnection {
    let p = app.product("R").await;
    pair.wait_for_replay(app).await;
    let on_replica = pair.on_replica(app).await;
    let scans = "SELECT COALESCE(idx_scan, 0)::text FROM pg_stat_user_tables \
                 WHERE relname = 'product'";
    let before: i64 = text(&on_replica, scans).await.parse().expect("a count");
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..10 {
            let res = app.get(&format!("/products/{p}")).await;
            assert_eq!(res.status(), 200);
            sent += 1;
        }
        let now: i64 = text(&on_replica, scans).await.parse().expect("a count");
        if now - before >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica saw {} product lookups after {sent} reads",
            now - before
        );
    }
    assert_eq!(reads(app, "replica").await, f64::from(sent));
    assert_eq!(reads(app, "primary").await, 0.0);
    on_replica
}

#[tokio::test]
async fn a_forged_malformed_or_huge_token_is_ignored() {
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .spawn()
        .await;
    let p = app.product("F").await;
    // Once the replica has the product, an old (or forged low) position may be served by it
    // without being stale.
    app.wait_until("the replica has replayed the product", || async {
        app.get(&format!("/products/{p}")).await.status() == 200
    })
    .await;
    let huge = "v1-".to_owned() + &"f".repeat(4000);
    let cases = [
        (
            "v1-ffffffffffffffff",
            "a position the primary never reaches: waits, then the primary",
        ),
        ("v1-0000000000000000", "a position long replayed"),
        ("0/16B3748", "PostgreSQL's own form, not a token"),
        ("v1-zzzzzzzzzzzzzzzz", "not hex"),
        ("", "empty"),
        (huge.as_str(), "huge"),
    ];
    for (token, why) in cases {
        for header in [TOKEN, "cookie"] {
            let value = if header == "cookie" {
                format!("consistency_token={token}")
            } else {
                token.to_owned()
            };
            let res = app
                .client
                .get(app.url(&format!("/products/{p}")))
                .header(header, value)
                .send()
                .await
                .expect("request sent");
            assert_eq!(res.status(), 200, "{why} ({header})");
        }
    }
}

#[tokio::test]
async fn with_the_replica_stopped_reads_use_the_primary_and_return_to_the_replica_when_it_is_back()
{
    let pair = ReplicaPair::start();
    let app = TestApp::builder().replica(&pair).spawn().await;
    let w = app.warehouse("D").await;
    assert_eq!(ready(&app).await["replica"]["status"], "up");

    pair.replica.stop();
    for _ in 0..5 {
        let res = app.get(&format!("/warehouses/{w}")).await;
        assert_eq!(res.status(), 200, "a read while the replica is down");
    }
    let primary_reads = reads(&app, "primary").await;
    assert!(primary_reads >= 5.0, "{primary_reads} reads on the primary");
    let health = ready(&app).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["replica"]["status"], "down", "{health}");

    pair.replica.start_again();
    app.wait_until("ready says the replica is up", || async {
        ready(&app).await["replica"]["status"] == "up"
    })
    .await;
    let before = reads(&app, "replica").await;
    app.wait_until("reads return to the replica", || async {
        let res = app.get(&format!("/warehouses/{w}")).await;
        assert_eq!(res.status(), 200);
        reads(&app, "replica").await > before
    })
    .await;
}

#[tokio::test]
async fn with_replay_paused_a_read_with_a_fresh_token_answers_from_the_primary_within_the_wait() {
    let pair = ReplicaPair::start();
    let max_wait = Duration::from_millis(300);
    let app = TestApp::builder()
        .replica(&pair)
        .env(&[("DB_REPLICA_MAX_WAIT_MS", "300")])
        .spawn()
        .await;
    let w = app.warehouse("P").await;
    let p = app.product("PAUSE").await;
    pair.wait_for_replay(&app).await;
    let admin = crate::support::connect_to(&pair.replica.url("postgres")).await;
    let _ = text(&admin, "SELECT pg_wal_replay_pause()::text").await;
    app.wait_until("replay is paused", || async {
        text(&admin, "SELECT pg_get_wal_replay_pause_state()").await == "paused"
    })
    .await;

    let token = token_of(&receipt(&app, w, p).await);
    let primary_before = reads(&app, "primary").await;
    let started = Instant::now();
    let res = app
        .client
        .get(app.url(&format!("/products/{p}/stock")))
        .header(TOKEN, &token)
        .send()
        .await
        .expect("request sent");
    let elapsed = started.elapsed();
    assert_eq!(total(res).await, 1, "the read is fresh");
    assert!(
        elapsed < max_wait + MARGIN,
        "answered after {elapsed:?}, the wait is {max_wait:?}"
    );
    assert_eq!(reads(&app, "primary").await, primary_before + 1.0);
    let health = ready(&app).await;
    assert_eq!(
        health["replica"]["status"], "up",
        "a paused replica still answers"
    );
    let _ = text(&admin, "SELECT pg_wal_replay_resume()::text").await;
}

#[tokio::test]
async fn without_a_replica_a_write_carries_no_token_and_every_read_counts_on_the_primary() {
    let app = spawn_app().await;
    let res = app
        .post("/warehouses", &json!({"code": "N", "name": "No replica"}))
        .await;
    assert_eq!(res.status(), 201);
    assert!(res.headers().get(TOKEN).is_none());
    assert!(res.headers().get("set-cookie").is_none());
    assert_eq!(app.get("/warehouses").await.status(), 200);
    assert_eq!(reads(&app, "replica").await, 0.0);
    assert_eq!(reads(&app, "primary").await, 1.0);
    let health = ready(&app).await;
    assert!(health.get("replica").is_none(), "{health}");
}

/// Fails with 40001 when it runs on a standby (as a recovery conflict cancels a read), answers
/// which server it ran on otherwise.
async fn conflict_on_standby(tx: Tx) -> Result<HttpResponse, ApiError> {
    tx.execute_unprepared(
        "DO $$ BEGIN IF pg_is_in_recovery() THEN \
         RAISE EXCEPTION 'canceling statement due to conflict with recovery' \
         USING ERRCODE = '40001'; END IF; END $$",
    )
    .await?;
    Ok(HttpResponse::Ok().finish())
}

fn routes(cfg: &mut web::ServiceConfig, layer: &Layer) {
    cfg.route(
        "/test/conflict-on-standby",
        web::get()
            .to(conflict_on_standby)
            .wrap(layer.transactional()),
    )
    // Pinned: the test reads what it must see from the primary.
    .route(
        "/test/pinned",
        web::get()
            .to(conflict_on_standby)
            .wrap(layer.transactional().primary()),
    );
}

#[tokio::test]
async fn a_read_cancelled_on_the_replica_by_a_recovery_conflict_is_re_run_on_the_primary() {
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .routes(routes)
        .spawn()
        .await;
    let res = app.get("/test/conflict-on-standby").await;
    assert_eq!(res.status(), 200);
    assert_eq!(reads(&app, "replica").await, 1.0);
    assert_eq!(reads(&app, "primary").await, 1.0);
    assert_eq!(metric(&app, "db_transaction_retries_total ").await, 1.0);
}

#[tokio::test]
async fn a_route_pinned_to_the_primary_never_reads_from_the_replica() {
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .routes(routes)
        .spawn()
        .await;
    for _ in 0..3 {
        assert_eq!(app.get("/test/pinned").await.status(), 200);
    }
    assert_eq!(reads(&app, "replica").await, 0.0);
    assert_eq!(reads(&app, "primary").await, 3.0);
    assert_eq!(metric(&app, "db_transaction_retries_total ").await, 0.0);
}

#[tokio::test]
async fn reads_your_writes_holds_with_db_pooler_transaction_too() {
    // The session of a transaction-mode pooler (settings inside every BEGIN, no named
    // statements), here on direct connections: the replica's queries are single
    // simple-protocol messages either way. Through real PgBouncers: `reads::pgbouncer`.
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .env(&[("DB_POOLER", "transaction"), ("DB_AUTO_MIGRATE", "false")])
        .spawn()
        .await;
    let w = app.warehouse("B").await;
    let p = app.product("POOLED").await;
    for i in 1..=20 {
        let token = token_of(&receipt(&app, w, p).await);
        let res = app
            .client
            .get(app.url(&format!("/products/{p}/stock")))
            .header(TOKEN, token)
            .send()
            .await
            .expect("request sent");
        assert_eq!(total(res).await, i);
    }
    assert!(reads(&app, "replica").await > 0.0);
}

#[tokio::test]
async fn the_served_binary_reads_from_the_replica_and_stops_cleanly() {
    let pair = ReplicaPair::shared();
    let database = crate::support::TestDatabase::create_at(
        crate::support::Server::Postgres,
        &pair.primary.url("postgres"),
    )
    .await;
    // The binary's replica pool must find the database there (CREATE DATABASE replayed).
    pair.wait_for_replay_of(&database.name).await;
    let replica_url = pair.replica.url(&database.name);
    let binary = crate::support::process::Binary::start(
        &std::env::temp_dir(),
        &[
            ("DATABASE_URL", database.url.as_str()),
            ("DATABASE_REPLICA_URL", replica_url.as_str()),
            ("DB_AUTO_MIGRATE", "true"),
        ],
    );
    let client = reqwest::Client::new();
    let base = binary.base();
    let created = client
        .post(format!("{base}/products"))
        .json(&json!({"sku": "BIN", "name": "Binary"}))
        .send()
        .await
        .expect("request sent");
    assert_eq!(created.status(), 201);
    let token = token_of(&created);
    let id = created.json::<Value>().await.expect("json")["id"].clone();
    let read = client
        .get(format!("{base}/products/{id}"))
        .header(TOKEN, token)
        .send()
        .await
        .expect("request sent");
    assert_eq!(
        read.status(),
        200,
        "the product is read back with its token"
    );
    // Its replica pool opens lazily: a first check that is slow on a loaded machine may
    // report it down for a moment, so wait for "up" rather than expect it at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health: Value = client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("json");
        if health["replica"]["status"] == "up" {
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, binary) = binary.stop(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status}:\n{}", binary.output());
}
