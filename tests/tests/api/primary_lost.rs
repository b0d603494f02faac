//! A primary that goes away in the middle of a transaction, before `COMMIT`, or a server that
//! refuses a write as read-only (a standby):
//! the server ends the request's backend (`pg_terminate_backend`, what a Patroni switchover or a
//! fast shutdown does to every session: SQLSTATE 57P01). The request is re-run while
//! `DB_FAILOVER_RETRY_MS` lasts, on a budget of its own, and answered 503 `database_unavailable`
//! with Retry-After after it; never 500.

use serde_json::{Value, json};

use crate::support::{TestApp, assert_unavailable};
use crate::transactions::metric;

/// `POST /test/slow-write`: inserts a warehouse, holds the transaction in a statement long
/// enough to be ended from outside, and answers 201.
fn slow_write_route(cfg: &mut actix_web::web::ServiceConfig, layer: &sea_orm_actix_tx::Layer) {
    use actix_web::{HttpResponse, web};
    use sea_orm::ConnectionTrait;
    async fn slow_write(tx: sea_orm_actix_tx::Tx) -> Result<HttpResponse, app::problem::ApiError> {
        tx.execute_unprepared("INSERT INTO warehouse (code, name) VALUES ('PL-1', 'primary lost')")
            .await?;
        tx.execute_unprepared("SELECT pg_sleep(0.3)").await?;
        Ok(HttpResponse::Created().json(json!({"created": true})))
    }
    cfg.route(
        "/test/slow-write",
        web::post().to(slow_write).wrap(layer.transactional()),
    );
}

/// The service under `name` (each test its own: the ender picks backends by it).
async fn app(name: &str, failover_ms: &str) -> TestApp {
    TestApp::builder()
        .env(&[
            ("DB_APPLICATION_NAME", name),
            ("DB_FAILOVER_RETRY_MS", failover_ms),
        ])
        .routes(slow_write_route)
        .spawn()
        .await
}

/// Ends the backend of the service called `name` that is inside `pg_sleep`, if one is; returns
/// how many it ended.
async fn end_sleeping_backend(app: &TestApp, name: &str) -> i64 {
    app.scalar(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{name}' AND state = 'active' AND query LIKE '%pg_sleep%'"
    ))
    .await
}

#[tokio::test]
async fn a_write_whose_primary_ended_its_session_is_re_run_and_answered_once() {
    let name = "primary-lost-once";
    let app = app(name, "5000").await;
    let before = metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await;
    let request = app.send_json("/test/slow-write", json!({}));
    let ender = async {
        app.wait_until("the write's backend is ended", || async {
            end_sleeping_backend(&app, name).await > 0
        })
        .await;
    };
    let (res, ()) = tokio::join!(request, ender);
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 201, "re-run on a new session: {body}");
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code = 'PL-1'")
            .await,
        1,
        "the ended attempt left nothing, the re-run committed once"
    );
    assert_eq!(
        metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await - before,
        1.0
    );
    assert_eq!(
        metric(&app, "db_transaction_retries_total ").await,
        0.0,
        "DB_TX_MAX_RETRIES' budget is not touched"
    );
}

#[tokio::test]
async fn a_primary_that_stays_lost_past_the_window_is_503_database_unavailable_never_500() {
    let name = "primary-lost-for-good";
    let app = app(name, "400").await;
    let request = app.send_json("/test/slow-write", json!({}));
    // End every attempt until the answer is in.
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let ender = async {
        let mut ended = 0;
        while done_rx.try_recv().is_err() {
            ended += end_sleeping_backend(&app, name).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        ended
    };
    let answer = async {
        let res = request.await;
        let _ = done_tx.send(());
        res
    };
    let (res, ended) = tokio::join!(answer, ender);
    assert!(ended >= 2, "more than one attempt was ended: {ended}");
    assert_unavailable(res, "the window of DB_FAILOVER_RETRY_MS is spent").await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code = 'PL-1'")
            .await,
        0,
        "nothing committed"
    );
}

/// Makes the test database refuse writes in new sessions, as a standby does (or lets them
/// again), and ends the service's sessions so that its next ones see it.
async fn read_only(app: &TestApp, name: &str, on: bool) {
    let setting = if on { "on" } else { "off" };
    let db = app.database_name();
    let alter = format!("ALTER DATABASE \"{db}\" SET default_transaction_read_only = {setting}");
    app.execute(&alter).await;
    app.scalar(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{name}'"
    ))
    .await;
}

#[tokio::test]
async fn a_write_refused_as_read_only_is_re_run_until_the_server_takes_writes_again() {
    let name = "primary-lost-read-only";
    let app = app(name, "10000").await;
    read_only(&app, name, true).await;
    let request = app.send_json("/test/slow-write", json!({}));
    let promote = async {
        app.wait_until("a write was refused as read-only and re-run", || async {
            metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await >= 1.0
        })
        .await;
        read_only(&app, name, false).await;
    };
    let (res, ()) = tokio::join!(request, promote);
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 201, "re-run once the server takes writes: {body}");
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code = 'PL-1'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_write_refused_as_read_only_past_the_window_is_503_database_unavailable() {
    let name = "primary-lost-standby";
    let app = app(name, "300").await;
    read_only(&app, name, true).await;
    let res = app.send_json("/test/slow-write", json!({})).await;
    assert_unavailable(res, "a standby for longer than DB_FAILOVER_RETRY_MS").await;
    assert!(metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await >= 1.0);
}
