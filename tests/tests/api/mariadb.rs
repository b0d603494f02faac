//! The transaction layer's rules on MariaDB, provoked through test-only routes on the real
//! middleware, where MariaDB differs from PostgreSQL: a failed statement does not abort the
//! transaction (a `COMMIT` would keep the statements before it), isolation and
//! `max_statement_time` are session settings, and deadlocks and lock wait timeouts are told by
//! error number. The domain's own tests run on MariaDB in `stock::mariadb`.

use std::collections::HashMap;
use std::sync::Mutex;

use actix_web::{HttpRequest, HttpResponse, web};
use app::problem::ApiError;
use sea_orm::{ConnectionTrait, DatabaseConnection, IsolationLevel, Statement, TransactionTrait};
use sea_orm_actix_tx::{Layer, Tx};
use serde_json::{Value, json};

use crate::support::{Backend, TestApp, problem};
use crate::transactions::{get_write, insert, metric, swallow, write_then, write_then_panic};

fn routes(cfg: &mut web::ServiceConfig, layer: &Layer) {
    let tx = layer.transactional();
    cfg.route(
        "/mdb/write-then/{status}",
        web::post().to(write_then).wrap(tx.clone()),
    )
    .route(
        "/mdb/panic",
        web::post().to(write_then_panic).wrap(tx.clone()),
    )
    .route("/mdb/swallow", web::post().to(swallow).wrap(tx.clone()))
    .route("/mdb/get-write", web::get().to(get_write).wrap(tx.clone()))
    .route(
        "/mdb/sees-commits",
        web::get().to(sees_commits).wrap(tx.clone()),
    )
    .route(
        "/mdb/sees-commits",
        web::post().to(sees_commits).wrap(tx.clone()),
    )
    .route(
        "/mdb/sees-commits-read-committed",
        web::post().to(sees_commits).wrap(
            layer
                .transactional()
                .isolation(IsolationLevel::ReadCommitted),
        ),
    )
    .route("/mdb/session", web::get().to(session).wrap(tx.clone()))
    .route("/mdb/signal", web::post().to(signal).wrap(tx.clone()))
    .route("/mdb/sleep", web::post().to(sleep).wrap(tx.clone()));
}

async fn count_warehouses(db: &impl ConnectionTrait) -> Result<i64, ApiError> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) FROM warehouse",
        ))
        .await?
        .ok_or(ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
    row.try_get_by_index::<i64>(0)
        .map_err(|_| ApiError::Layer(sea_orm_actix_tx::Error::Internal))
}

/// Reads, lets another connection commit a row, reads again: a REPEATABLE READ snapshot does
/// not see the new row, READ COMMITTED does.
async fn sees_commits(
    tx: Tx,
    pool: web::Data<DatabaseConnection>,
) -> Result<HttpResponse, ApiError> {
    let before = count_warehouses(&tx).await?;
    pool.execute_unprepared(&format!(
        "INSERT INTO warehouse (code, name) VALUES ('C{}', 'concurrent')",
        fastrand::u32(..)
    ))
    .await?;
    let after = count_warehouses(&tx).await?;
    Ok(HttpResponse::Ok().json(json!({"saw_concurrent_commit": after > before})))
}

/// The session settings a connection was given when it opened.
async fn session(tx: Tx) -> Result<HttpResponse, ApiError> {
    let row = tx
        .query_one_raw(Statement::from_string(
            tx.get_database_backend(),
            "SELECT @@session.tx_isolation, CAST(@@session.max_statement_time AS CHAR)",
        ))
        .await?
        .ok_or(ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
    let isolation: String = row
        .try_get_by_index(0)
        .map_err(|_| ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
    let timeout: String = row
        .try_get_by_index(1)
        .map_err(|_| ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
    Ok(HttpResponse::Ok().json(json!({"tx_isolation": isolation, "max_statement_time": timeout})))
}

static ATTEMPTS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

/// Raises the server error `x-errno` (1213 deadlock, 1205 lock wait timeout) on the first
/// `x-fail-times` attempts of a request, after a write.
async fn signal(tx: Tx, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let key = header("x-key");
    let errno: u32 = header("x-errno").parse().unwrap_or(1213);
    let fail_times: u32 = header("x-fail-times").parse().unwrap_or(0);
    let attempt = {
        let mut map = ATTEMPTS.lock().unwrap_or_else(|p| p.into_inner());
        let n = map
            .get_or_insert_with(HashMap::new)
            .entry(key.clone())
            .or_insert(0);
        *n += 1;
        *n
    };
    insert(&tx, &format!("S-{key}-{attempt}")).await?;
    if attempt <= fail_times {
        tx.execute_unprepared(&format!(
            "SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = {errno}, MESSAGE_TEXT = 'provoked'"
        ))
        .await?;
    }
    Ok(HttpResponse::Created().json(json!({"attempt": attempt})))
}

async fn sleep(tx: Tx) -> Result<HttpResponse, ApiError> {
    tx.execute_unprepared("SELECT SLEEP(3)").await?;
    Ok(HttpResponse::Ok().finish())
}

async fn app_with(overrides: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .backend(Backend::Mariadb)
        .env(overrides)
        .routes(routes)
        .spawn()
        .await
}

#[tokio::test]
async fn a_swallowed_statement_error_never_yields_2xx_and_commits_nothing_although_mariadb_would_commit_the_rest()
 {
    let app = app_with(&[]).await;
    // What the server does on its own: the failed statement is undone, the transaction goes on,
    // and COMMIT keeps the statement before it (PostgreSQL would have aborted the transaction).
    let raw = app.db.begin().await.unwrap();
    raw.execute_unprepared("INSERT INTO warehouse (code, name) VALUES ('RAW', 'x')")
        .await
        .unwrap();
    let duplicate = raw
        .execute_unprepared("INSERT INTO warehouse (code, name) VALUES ('RAW', 'x')")
        .await;
    assert!(duplicate.is_err(), "the unique key is enforced");
    raw.commit().await.unwrap();
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code = 'RAW'")
            .await,
        1,
        "MariaDB commits the statements before a failed one"
    );

    // The layer: the first failure is recorded, so the request is rolled back and answered 409.
    let (status, body) = problem(app.post("/mdb/swallow", &json!({})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_exists"))
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code = 'SWALLOW'")
            .await,
        0
    );
}

#[tokio::test]
async fn a_handler_that_writes_then_fails_or_panics_leaves_nothing_behind_and_a_2xx_commits() {
    let app = app_with(&[]).await;
    for status in [400, 404, 409, 422, 500, 503] {
        let res = app
            .post(&format!("/mdb/write-then/{status}"), &json!({}))
            .await;
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(
            app.scalar("SELECT count(*) FROM warehouse").await,
            0,
            "after {status}"
        );
    }
    let (status, _) = problem(app.post("/mdb/panic", &json!({})).await).await;
    assert_eq!(status, 500);
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);

    let res = app.post("/mdb/write-then/201", &json!({})).await;
    assert_eq!(res.status(), 201);
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 1);
}

#[tokio::test]
async fn gets_run_read_only_so_a_write_in_one_fails_and_changes_nothing() {
    let app = app_with(&[]).await;
    let (status, _) = problem(app.get("/mdb/get-write").await).await;
    assert_eq!(
        status, 500,
        "a write inside START TRANSACTION READ ONLY fails"
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
}

#[tokio::test]
async fn transactions_run_at_the_configured_isolation_and_a_route_may_declare_its_own() {
    let app = app_with(&[]).await;
    let saw = |path: &'static str, get: bool| {
        let app = &app;
        async move {
            let res = if get {
                app.get(path).await
            } else {
                app.post(path, &json!({})).await
            };
            assert_eq!(res.status(), 200, "{path}");
            res.json::<Value>().await.unwrap()["saw_concurrent_commit"]
                .as_bool()
                .unwrap()
        }
    };
    assert!(
        !saw("/mdb/sees-commits", false).await,
        "REPEATABLE READ by default"
    );
    assert!(
        !saw("/mdb/sees-commits", true).await,
        "GETs too (READ ONLY)"
    );
    assert!(
        saw("/mdb/sees-commits-read-committed", false).await,
        "a READ COMMITTED route"
    );
    let session: Value = app.get("/mdb/session").await.json().await.unwrap();
    assert_eq!(
        session,
        json!({"tx_isolation": "REPEATABLE-READ", "max_statement_time": "0.000000"})
    );

    let app = app_with(&[
        ("DB_ISOLATION_LEVEL", "read_committed"),
        ("DB_STATEMENT_TIMEOUT_MS", "1500"),
    ])
    .await;
    let session: Value = app.get("/mdb/session").await.json().await.unwrap();
    assert_eq!(
        session,
        json!({"tx_isolation": "READ-COMMITTED", "max_statement_time": "1.500000"})
    );
    let res = app.post("/mdb/sees-commits", &json!({})).await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["saw_concurrent_commit"], true);
}

#[tokio::test]
async fn deadlocks_and_lock_wait_timeouts_are_rerun_until_they_succeed_then_503() {
    let app = app_with(&[("DB_TX_MAX_RETRIES", "3")]).await;
    for errno in ["1213", "1205"] {
        let key = format!("OK-{errno}");
        let res = app
            .client
            .post(app.url("/mdb/signal"))
            .header("x-key", &key)
            .header("x-errno", errno)
            .header("x-fail-times", "2")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{errno}");
        assert_eq!(res.json::<Value>().await.unwrap()["attempt"], 3);
        assert_eq!(
            app.scalar(&format!(
                "SELECT count(*) FROM warehouse WHERE code LIKE 'S-{key}-%'"
            ))
            .await,
            1,
            "only the successful attempt's write is kept ({errno})"
        );

        let key = format!("NEVER-{errno}");
        let res = app
            .client
            .post(app.url("/mdb/signal"))
            .header("x-key", &key)
            .header("x-errno", errno)
            .header("x-fail-times", "100")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert!(res.headers().contains_key("retry-after"), "{errno}");
        let (status, body) = problem(res).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (503, Some("serialization_failure")),
            "{errno}"
        );
    }
    // Two re-runs before each success, three (the budget) before each 503.
    assert_eq!(metric(&app, "db_transaction_retries_total").await, 10.0);
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code LIKE 'S-NEVER-%'")
            .await,
        0
    );
}

#[tokio::test]
async fn a_statement_longer_than_db_statement_timeout_ms_is_stopped_by_max_statement_time() {
    let app = app_with(&[("DB_STATEMENT_TIMEOUT_MS", "200")]).await;
    let res = app.post("/mdb/sleep", &json!({})).await;
    crate::support::assert_statement_timeout(res, "SLEEP(3) is stopped at 200 ms").await;

    let unbounded = app_with(&[]).await;
    let res = unbounded.post("/mdb/sleep", &json!({})).await;
    assert_eq!(res.status(), 200, "without the setting SLEEP(3) completes");
}

#[tokio::test]
async fn readiness_and_metrics_report_the_mysql_backend_and_its_pool() {
    let app = app_with(&[]).await;
    let res = app.get("/health/ready").await;
    assert_eq!(res.status(), 200);
    let ready: Value = res.json().await.unwrap();
    assert_eq!(ready["database"]["backend"], "mysql", "{ready}");
    let pool = &ready["database"]["pool"];
    assert_eq!(
        (pool["min"].as_u64(), pool["max"].as_u64()),
        (Some(2), Some(10))
    );
    assert!(pool["size"].as_u64().unwrap() >= 1, "{ready}");
    assert_eq!(metric(&app, "db_pool_max_connections").await, 10.0);
}
