//! The transaction middleware's rules, provoked through test-only routes mounted on the real
//! middleware beside the real API.

use std::collections::HashMap;
use std::sync::Mutex;

use actix_web::{HttpRequest, HttpResponse, web};
use app::domain::catalog::create_warehouse;
use app::domain::values::{Name, WarehouseCode};
use app::problem::ApiError;
use futures_util::future::join_all;
use sea_orm::{ConnectionTrait, IsolationLevel, Statement};
use sea_orm_actix_tx::{Layer, Tx};
use serde_json::{Value, json};

use crate::support::{TestApp, problem};

/// The test-only routes on the real middleware (also mounted behind PgBouncer by `pooler`).
pub(crate) fn routes(cfg: &mut web::ServiceConfig, layer: &Layer) {
    let tx = layer.transactional();
    cfg.route(
        "/test/write-then/{status}",
        web::post().to(write_then).wrap(tx.clone()),
    )
    .route(
        "/test/panic",
        web::post().to(write_then_panic).wrap(tx.clone()),
    )
    .route("/test/swallow", web::post().to(swallow).wrap(tx.clone()))
    .route(
        "/test/layer-error",
        web::post().to(layer_error).wrap(tx.clone()),
    )
    .route("/test/deferred", web::post().to(deferred).wrap(tx.clone()))
    .route("/test/settings", web::get().to(settings).wrap(tx.clone()))
    .route("/test/settings", web::post().to(settings).wrap(tx.clone()))
    .route(
        "/test/read-committed",
        web::post().to(settings).wrap(
            layer
                .transactional()
                .isolation(IsolationLevel::ReadCommitted),
        ),
    )
    .route("/test/get-write", web::get().to(get_write).wrap(tx.clone()))
    .route("/test/noop", web::get().to(noop).wrap(tx.clone()))
    .route("/test/hold/{ms}", web::post().to(hold).wrap(tx.clone()))
    .route("/test/conflict", web::post().to(conflict).wrap(tx.clone()))
    .route(
        "/test/increment",
        web::post().to(increment).wrap(tx.clone()),
    )
    .route(
        "/test/write-then-wait",
        web::post().to(write_then_wait).wrap(tx.clone()),
    )
    .route("/test/leak", web::post().to(leak).wrap(tx.clone()))
    .route(
        "/test/hooked/{status}",
        web::post().to(hooked).wrap(tx.clone()),
    );
}

static LEAK_GO: tokio::sync::Notify = tokio::sync::Notify::const_new();
static LEAKED_WRITE: Mutex<Option<bool>> = Mutex::new(None);

/// Keeps a clone of the transaction in a task that writes after the request has answered.
async fn leak(tx: Tx) -> Result<HttpResponse, ApiError> {
    insert(&tx, "BEFORE-LEAK").await?;
    let kept = tx.clone();
    tokio::spawn(async move {
        LEAK_GO.notified().await;
        let wrote = insert(&kept, "LEAKED").await.is_ok();
        *LEAKED_WRITE.lock().unwrap_or_else(|p| p.into_inner()) = Some(wrote);
    });
    Ok(HttpResponse::Created().json(json!({"leaked": true})))
}

static HOOK_RUNS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

fn hook_runs(key: &str) -> u32 {
    HOOK_RUNS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(key).copied())
        .unwrap_or(0)
}

/// Registers an on-commit hook, then behaves like `/test/conflict` (40001 on the first
/// `x-fail-times` attempts) and answers `status`.
async fn hooked(
    tx: Tx,
    req: HttpRequest,
    status: web::Path<u16>,
) -> Result<HttpResponse, ApiError> {
    let key = req
        .headers()
        .get("x-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    tx.on_commit(move || {
        *HOOK_RUNS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_insert(0) += 1;
    });
    let created = conflict(tx, req).await?;
    let status = actix_web::http::StatusCode::from_u16(*status)
        .map_err(|_| ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
    Ok(if status.is_success() {
        created
    } else {
        HttpResponse::build(status).finish()
    })
}

pub(crate) async fn insert(tx: &Tx, code: &str) -> Result<(), ApiError> {
    let code = WarehouseCode::parse(code)?;
    let name = Name::parse("test")?;
    create_warehouse(tx, &code, &name).await?;
    Ok(())
}

pub(crate) async fn write_then(tx: Tx, status: web::Path<u16>) -> Result<HttpResponse, ApiError> {
    insert(&tx, "WRITTEN").await?;
    let status = actix_web::http::StatusCode::from_u16(*status)
        .map_err(|_| ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
    Ok(HttpResponse::build(status).json(json!({"written": true})))
}

pub(crate) async fn write_then_panic(tx: Tx) -> Result<HttpResponse, ApiError> {
    insert(&tx, "PANIC").await?;
    panic!("handler panics after writing");
}

pub(crate) async fn swallow(tx: Tx) -> Result<HttpResponse, ApiError> {
    insert(&tx, "SWALLOW").await?;
    // The second insert violates the unique key; the handler ignores the error and answers 200.
    let _ = insert(&tx, "SWALLOW").await;
    Ok(HttpResponse::Ok().json(json!({"ok": true})))
}

/// A handler written against the layer's own error type: `?` on a unique violation.
async fn layer_error(tx: Tx) -> Result<HttpResponse, sea_orm_actix_tx::Error> {
    tx.execute_unprepared("INSERT INTO warehouse (code, name) VALUES ('TWICE', 'x')")
        .await?;
    tx.execute_unprepared("INSERT INTO warehouse (code, name) VALUES ('TWICE', 'x')")
        .await?;
    Ok(HttpResponse::Created().finish())
}

async fn deferred(tx: Tx) -> Result<HttpResponse, ApiError> {
    let run = |sql: &'static str| tx.execute_unprepared(sql);
    run("INSERT INTO deferred_unique (v) VALUES (1)").await?;
    run("INSERT INTO deferred_unique (v) VALUES (1)").await?;
    Ok(HttpResponse::Created().json(json!({"inserted": 2})))
}

async fn show(tx: &Tx, name: &str) -> Result<String, ApiError> {
    let row = tx
        .query_one_raw(Statement::from_string(
            tx.get_database_backend(),
            format!("SHOW {name}"),
        ))
        .await?
        .ok_or(ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
    row.try_get_by_index::<String>(0)
        .map_err(|_| ApiError::Layer(sea_orm_actix_tx::Error::Internal))
}

async fn settings(tx: Tx) -> Result<HttpResponse, ApiError> {
    let mut out = serde_json::Map::new();
    for name in [
        "transaction_isolation",
        "transaction_read_only",
        "jit",
        "statement_timeout",
        "application_name",
    ] {
        out.insert(name.to_owned(), Value::String(show(&tx, name).await?));
    }
    Ok(HttpResponse::Ok().json(out))
}

pub(crate) async fn get_write(tx: Tx) -> Result<HttpResponse, ApiError> {
    insert(&tx, "FROMGET").await?;
    Ok(HttpResponse::Ok().finish())
}

async fn noop() -> HttpResponse {
    HttpResponse::Ok().json(json!({"touched_db": false}))
}

async fn hold(tx: Tx, ms: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    insert(&tx, &format!("HOLD{}", fastrand::u32(..))).await?;
    let secs = *ms as f64 / 1000.0;
    tx.execute_unprepared(&format!("SELECT pg_sleep({secs})"))
        .await?;
    Ok(HttpResponse::Ok().json(json!({"held_ms": *ms})))
}

static ATTEMPTS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

/// Raises a real 40001 from the server on the first `x-fail-times` attempts of a request.
async fn conflict(tx: Tx, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let key = req
        .headers()
        .get("x-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let fail_times: u32 = req
        .headers()
        .get("x-fail-times")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let attempt = {
        let mut map = ATTEMPTS.lock().unwrap_or_else(|p| p.into_inner());
        let n = map
            .get_or_insert_with(HashMap::new)
            .entry(key.clone())
            .or_insert(0);
        *n += 1;
        *n
    };
    insert(&tx, &format!("C-{key}-{attempt}")).await?;
    if attempt <= fail_times {
        tx.execute_unprepared(
            "DO $$ BEGIN RAISE EXCEPTION 'provoked' USING ERRCODE = 'serialization_failure'; END $$",
        )
        .await
        ?;
    }
    Ok(HttpResponse::Created().json(json!({"attempt": attempt})))
}

/// A read-modify-write under REPEATABLE READ: concurrent requests really conflict (40001).
async fn increment(tx: Tx) -> Result<HttpResponse, ApiError> {
    tx.execute_unprepared("UPDATE counter SET n = n + 1 WHERE id = 1")
        .await?;
    Ok(HttpResponse::Created().finish())
}

/// Writes, then waits for the counter row's lock (which a test may hold), then answers 201.
async fn write_then_wait(tx: Tx) -> Result<HttpResponse, ApiError> {
    insert(&tx, &format!("WAITED{}", fastrand::u32(..))).await?;
    tx.execute_unprepared("UPDATE counter SET n = n + 1 WHERE id = 1")
        .await?;
    Ok(HttpResponse::Created().json(json!({"written": true})))
}

async fn app_with(overrides: &[(&str, &str)]) -> TestApp {
    let app = TestApp::builder()
        .env(overrides)
        .routes(routes)
        .spawn()
        .await;
    create_test_tables(&app).await;
    app
}

/// The tables the test routes use, created behind the app's back.
pub(crate) async fn create_test_tables(app: &TestApp) {
    app.db
        .execute_unprepared(
            "CREATE TABLE deferred_unique (v int, CONSTRAINT deferred_unique_v UNIQUE (v) DEFERRABLE INITIALLY DEFERRED);
             CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO counter VALUES (1, 0);",
        )
        .await
        .expect("test tables");
}

pub(crate) async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[tokio::test]
async fn a_handler_that_writes_then_answers_4xx_or_5xx_leaves_nothing_behind() {
    let app = app_with(&[]).await;
    for status in [400, 404, 409, 422, 500, 503] {
        let res = app
            .post(&format!("/test/write-then/{status}"), &json!({}))
            .await;
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(
            app.scalar("SELECT count(*) FROM warehouse").await,
            0,
            "after {status}"
        );
    }
    let res = app.send_json("/test/write-then/201", json!({})).await;
    assert_eq!(res.status(), 201);
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse").await,
        1,
        "2xx commits"
    );
}

#[tokio::test]
async fn a_handler_that_panics_is_rolled_back_with_500_and_the_server_keeps_serving() {
    let app = app_with(&[]).await;
    let (status, body) = problem(app.send_json("/test/panic", json!({})).await).await;
    assert_eq!((status, body["code"].as_str()), (500, Some("internal")));
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
    assert_eq!(
        app.send_json("/test/write-then/201", json!({}))
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn a_swallowed_statement_error_never_yields_2xx_and_commits_nothing() {
    let app = app_with(&[]).await;
    let res = app.send_json("/test/swallow", json!({})).await;
    assert!(!res.status().is_success(), "got {}", res.status());
    let (status, body) = problem(res).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_exists"))
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
}

#[tokio::test]
async fn a_handler_returning_the_layers_database_error_gets_the_services_mapping() {
    let app = app_with(&[]).await;
    let (status, body) = problem(app.send_json("/test/layer-error", json!({})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_exists")),
        "the on_failure hook, not 500 internal: {body}"
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
}

#[tokio::test]
async fn a_commit_that_fails_replaces_the_handlers_success() {
    let app = app_with(&[]).await;
    let (status, body) = problem(app.send_json("/test/deferred", json!({})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_exists"))
    );
    assert_eq!(app.scalar("SELECT count(*) FROM deferred_unique").await, 0);
}

#[tokio::test]
async fn gets_run_read_only_at_the_configured_isolation_and_writes_read_write() {
    let app = app_with(&[]).await;
    let get: Value = app.get("/test/settings").await.json().await.unwrap();
    assert_eq!(get["transaction_isolation"], "repeatable read");
    assert_eq!(get["transaction_read_only"], "on");
    let post: Value = app
        .send_json("/test/settings", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(post["transaction_isolation"], "repeatable read");
    assert_eq!(post["transaction_read_only"], "off");
    let declared: Value = app
        .send_json("/test/read-committed", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        declared["transaction_isolation"], "read committed",
        "a route's own level"
    );

    let (status, _) = problem(app.get("/test/get-write").await).await;
    assert_eq!(
        status, 500,
        "a write in a GET fails (read-only transaction)"
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
}

#[tokio::test]
async fn the_isolation_level_follows_db_isolation_level() {
    let app = app_with(&[("DB_ISOLATION_LEVEL", "serializable")]).await;
    let get: Value = app.get("/test/settings").await.json().await.unwrap();
    assert_eq!(get["transaction_isolation"], "serializable");
}

#[tokio::test]
async fn a_serialization_failure_reruns_the_whole_request_until_it_succeeds() {
    let app = app_with(&[("DB_TX_MAX_RETRIES", "3")]).await;
    let before = metric(&app, "db_transaction_retries_total").await;
    let res = app
        .client
        .post(app.url("/test/conflict"))
        .header("x-key", "TWICE")
        .header("x-fail-times", "2")
        .json(&json!({"payload": "kept across attempts"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["attempt"], 3);
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse").await,
        1,
        "only the last attempt's write"
    );
    assert_eq!(app.text("SELECT code FROM warehouse").await, "C-TWICE-3");
    assert_eq!(
        metric(&app, "db_transaction_retries_total").await - before,
        2.0
    );
}

#[tokio::test]
async fn conflicts_beyond_the_retry_budget_are_503_serialization_failure_with_retry_after() {
    let app = app_with(&[("DB_TX_MAX_RETRIES", "2")]).await;
    let res = app
        .client
        .post(app.url("/test/conflict"))
        .header("x-key", "ALWAYS")
        .header("x-fail-times", "100")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(res.headers().contains_key("retry-after"));
    let (status, body) = problem(res).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("serialization_failure"))
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
}

#[tokio::test]
async fn real_concurrent_conflicts_under_repeatable_read_are_retried_to_an_exact_count() {
    let app = app_with(CONFLICTING).await;
    forty_conflicting_increments_end_exact(&app).await;
}

/// Settings under which forty concurrent increments of one row really conflict.
pub(crate) const CONFLICTING: &[(&str, &str)] = &[
    ("DB_TX_MAX_RETRIES", "50"),
    ("DB_POOL_SIZE", "8"),
    ("DB_MAX_OVERFLOW", "0"),
];

/// Forty concurrent increments of one row under REPEATABLE READ: real 40001s, every request
/// re-run until it commits, the count exact.
pub(crate) async fn forty_conflicting_increments_end_exact(app: &TestApp) {
    let before = metric(app, "db_transaction_retries_total").await;
    let requests = (0..40).map(|_| app.send_json("/test/increment", json!({})));
    let statuses: Vec<u16> = join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    assert_eq!(app.scalar("SELECT n FROM counter WHERE id = 1").await, 40);
    assert!(
        metric(app, "db_transaction_retries_total").await > before,
        "40001s were raised and retried"
    );
}

#[tokio::test]
async fn a_request_that_never_asks_for_the_transaction_takes_no_connection() {
    let app = app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_TIMEOUT", "1"),
    ])
    .await;
    let holder = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/test/hold/3000");
        async move {
            client
                .post(url)
                .json(&json!({}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let pool = app.pool.clone();
    app.wait_until("the only connection is in use", || {
        let stats = sea_orm_actix_tx::db::pool_stats(&pool, 1, 1);
        async move { stats.size == 1 && stats.in_use == 1 }
    })
    .await;
    let res = app.get("/test/noop").await;
    assert_eq!(res.status(), 200, "no connection needed");
    let (status, body) = problem(app.get("/test/settings").await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("pool_timeout")),
        "a query does need one"
    );
    assert_eq!(holder.await.unwrap().unwrap(), 200);
}

/// Sends `POST /test/write-then-wait` over a raw connection and waits until the handler has
/// written and is blocked on the counter row's lock, which `lock` holds.
async fn start_waiting_request(app: &TestApp) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connects");
    stream
        .write_all(
            b"POST /test/write-then-wait HTTP/1.1\r\nHost: test\r\n\
              Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await
        .expect("request written");
    app.wait_until("the handler has written and waits for the lock", || async {
        app.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
    stream
}

#[tokio::test]
async fn a_client_that_disconnects_before_the_commit_gets_a_rollback() {
    use sea_orm::TransactionTrait;
    use tokio::io::AsyncReadExt;
    let app = app_with(&[]).await;
    let rollbacks = r#"db_transactions_total{outcome="rollback"}"#;
    let commits = r#"db_transactions_total{outcome="commit"}"#;

    // The client stays: the request commits.
    let lock = app.db.begin().await.unwrap();
    lock.execute_unprepared("SELECT n FROM counter WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let mut stayed = start_waiting_request(&app).await;
    lock.commit().await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = stayed.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    assert_eq!(app.scalar("SELECT n FROM counter").await, 1);
    drop(stayed);

    // The client leaves while the handler waits: nothing of its work remains.
    let before = metric(&app, rollbacks).await;
    let committed_before = metric(&app, commits).await;
    let lock = app.db.begin().await.unwrap();
    lock.execute_unprepared("SELECT n FROM counter WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let left = start_waiting_request(&app).await;
    drop(left);
    lock.commit().await.unwrap();
    app.wait_until("the abandoned request has ended", || async {
        metric(&app, rollbacks).await > before
    })
    .await;
    assert_eq!(metric(&app, commits).await, committed_before);
    assert_eq!(
        app.scalar("SELECT n FROM counter").await,
        1,
        "the update was rolled back"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse").await,
        1,
        "only the first request's insert remains"
    );
}

#[tokio::test]
async fn with_transaction_follows_the_same_commit_rollback_and_retry_rules() {
    use sea_orm_actix_tx::transaction::TxError;
    use std::sync::atomic::{AtomicU32, Ordering};
    let app = app_with(&[]).await;
    let config = sea_orm_actix_tx::TxConfig {
        isolation: IsolationLevel::RepeatableRead,
        session: sea_orm_actix_tx::transaction::Session::Direct {
            connection_default: Some(IsolationLevel::RepeatableRead),
        },
        max_retries: 3,
        failover_retry: std::time::Duration::from_secs(5),
        body_limit: 65_536,
        availability: None,
        admission: None,
        commit_check: std::time::Duration::from_secs(1),
        idempotency_ttl: std::time::Duration::from_secs(3600),
        leak_warning: None,
        replica: None,
        round_trips: sea_orm_actix_tx::transaction::Bounds::new(
            None,
            std::time::Duration::from_secs(1),
        ),
        terminator: None,
        failover: None,
    };
    let policy = sea_orm_actix_tx::TxPolicy::default();
    let count = |code: &'static str| {
        let app = &app;
        async move {
            app.scalar(&format!(
                "SELECT count(*) FROM warehouse WHERE code = '{code}'"
            ))
            .await
        }
    };

    let ok: Result<u8, TxError<ApiError>> =
        sea_orm_actix_tx::with_transaction(&app.pool, &config, policy, |tx| {
            Box::pin(async move {
                insert(tx, "JOB-OK").await?;
                Ok(7)
            })
        })
        .await;
    assert_eq!(ok.ok(), Some(7));
    assert_eq!(count("JOB-OK").await, 1);

    let failed: Result<u8, TxError<ApiError>> =
        sea_orm_actix_tx::with_transaction(&app.pool, &config, policy, |tx| {
            Box::pin(async move {
                insert(tx, "JOB-ERR").await?;
                Err(ApiError::Layer(sea_orm_actix_tx::Error::Internal))
            })
        })
        .await;
    assert!(matches!(
        failed,
        Err(TxError::Job(ApiError::Layer(
            sea_orm_actix_tx::Error::Internal
        )))
    ));
    assert_eq!(count("JOB-ERR").await, 0);

    let swallowed: Result<u8, TxError<ApiError>> =
        sea_orm_actix_tx::with_transaction(&app.pool, &config, policy, |tx| {
            Box::pin(async move {
                insert(tx, "JOB-SWALLOW").await?;
                let _ = insert(tx, "JOB-SWALLOW").await;
                Ok(1)
            })
        })
        .await;
    assert!(matches!(swallowed, Err(TxError::Database(_))));
    assert_eq!(count("JOB-SWALLOW").await, 0);

    let attempts = AtomicU32::new(0);
    let retried: Result<u32, TxError<ApiError>> =
        sea_orm_actix_tx::with_transaction(&app.pool, &config, policy, |tx| {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                insert(tx, "JOB-RETRY").await?;
                if attempt <= 2 {
                    tx.execute_unprepared(
                        "DO $$ BEGIN RAISE EXCEPTION 'provoked' USING ERRCODE = 'serialization_failure'; END $$",
                    )
                    .await?;
                }
                Ok(attempt)
            })
        })
        .await;
    assert_eq!(retried.ok(), Some(3));
    assert_eq!(count("JOB-RETRY").await, 1, "only the last attempt's write");

    let exhausted: Result<u32, TxError<ApiError>> =
        sea_orm_actix_tx::with_transaction(&app.pool, &config, policy, |tx| {
            Box::pin(async move {
                insert(tx, "JOB-NEVER").await?;
                tx.execute_unprepared(
                    "DO $$ BEGIN RAISE EXCEPTION 'provoked' USING ERRCODE = 'serialization_failure'; END $$",
                )
                .await?;
                Ok(0)
            })
        })
        .await;
    match exhausted {
        Err(TxError::Database(f)) => assert!(f.is_retryable(), "{f:?}"),
        other => panic!("expected a serialization failure, got {other:?}"),
    }
    assert_eq!(count("JOB-NEVER").await, 0);
}

#[tokio::test]
async fn a_begin_on_a_connection_the_server_just_terminated_takes_another_instead_of_503() {
    let app = app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "1"),
        ("DB_APPLICATION_NAME", "terminated-test"),
        // No ping before checkout: the dead connection reaches BEGIN, as it does when it was
        // used less than a second before the server ended it.
        ("DB_POOL_PRE_PING", "false"),
    ])
    .await;
    app.warehouse("BEFORE").await;
    let backends =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'terminated-test'";
    assert!(app.scalar(backends).await >= 1);
    // A failover or an administrator ends the pool's connections while they sit idle.
    app.scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'terminated-test'",
    )
    .await;
    app.wait_until("the server has ended the pool's connections", || async {
        app.scalar(backends).await == 0
    })
    .await;
    let res = app
        .post("/warehouses", &json!({"code": "AFTER", "name": "after"}))
        .await;
    assert_eq!(res.status(), 201, "nothing ran on the dead connection");
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code = 'AFTER'")
            .await,
        1
    );
}

#[tokio::test]
async fn the_admission_queue_and_the_pool_checkout_share_one_pool_timeout() {
    // One connection, so two transactional handlers at a time (twice the pool's size).
    let app = app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_TIMEOUT", "3"),
    ])
    .await;
    let post = |path: &str| {
        let sent = app.client.post(app.url(path)).json(&json!({})).send();
        tokio::spawn(async move { sent.await.map(|r| r.status().as_u16()).unwrap_or(0) })
    };
    let holder = post("/test/hold/8000");
    app.wait_until("the only connection is held", || async {
        app.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(8%' \
             AND state = 'active'",
        )
        .await
            == 1
    })
    .await;
    // The second request is admitted and waits for the connection until 3 s; the third arrives
    // half-way, waits for a turn, then for the connection: both within its own 3 s.
    let second = post("/test/hold/10");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    let third = app.send_json("/test/hold/10", json!({})).await;
    let waited = started.elapsed();
    let (status, body) = problem(third).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("pool_timeout")));
    assert!(
        waited < std::time::Duration::from_millis(4000),
        "answered after {waited:?}: DB_POOL_TIMEOUT (3 s) was spent twice"
    );
    assert_eq!(second.await.expect("second"), 503);
    assert_eq!(holder.await.expect("holder"), 200);
}

#[tokio::test]
async fn a_transaction_handle_kept_beyond_its_request_is_rolled_back_answered_500_and_counted() {
    let app = app_with(&[]).await;
    let before = metric(&app, "db_transaction_leaks_total").await;
    let (status, body) = problem(app.send_json("/test/leak", json!({})).await).await;
    assert_eq!((status, body["code"].as_str()), (500, Some("internal")));
    LEAK_GO.notify_one();
    app.wait_until("the leaked handle was used", || async {
        LEAKED_WRITE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    })
    .await;
    assert_eq!(
        *LEAKED_WRITE.lock().unwrap_or_else(|p| p.into_inner()),
        Some(false),
        "the task's write after the answer fails"
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
    assert_eq!(
        metric(&app, "db_transaction_leaks_total").await,
        before + 1.0
    );
}

#[tokio::test]
async fn on_commit_hooks_run_once_after_the_commit_never_after_a_rollback() {
    let app = app_with(&[("DB_TX_MAX_RETRIES", "3")]).await;
    let send = |status: u16, key: &str, fail_times: &str| {
        app.client
            .post(app.url(&format!("/test/hooked/{status}")))
            .header("x-key", key)
            .header("x-fail-times", fail_times)
            .json(&json!({}))
            .send()
    };
    let res = send(201, "HOOK-RETRIED", "2").await.expect("sent");
    assert_eq!(res.status(), 201);
    assert_eq!(
        hook_runs("HOOK-RETRIED"),
        1,
        "three attempts, one commit, one run"
    );

    let res = send(409, "HOOK-ROLLED-BACK", "0").await.expect("sent");
    assert_eq!(res.status(), 409);
    assert_eq!(hook_runs("HOOK-ROLLED-BACK"), 0, "no run after a rollback");

    let res = send(201, "HOOK-EXHAUSTED", "100").await.expect("sent");
    assert_eq!(res.status(), 503);
    assert_eq!(
        hook_runs("HOOK-EXHAUSTED"),
        0,
        "no run when nothing committed"
    );
}
