//! A primary that goes away in the middle of a transaction, before `COMMIT`, or a server that
//! refuses a write as read-only (a standby):
//! the server ends the request's backend (`pg_terminate_backend`, what a Patroni switchover or a
//! fast shutdown does to every session: SQLSTATE 57P01). The request is re-run while
//! `DB_FAILOVER_RETRY_MS` lasts, on a budget of its own, and answered 503 `database_unavailable`
//! with Retry-After after it; never 500.

use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

use crate::support::fault_proxy::{FaultProxy, upstream_of};
use crate::support::{TestApp, admin_url, assert_unavailable};
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

/// How many times the first statement of `POST /test/counted-write` succeeded (one test uses
/// it).
static COUNTED_RUNS: AtomicU32 = AtomicU32::new(0);

/// `POST /test/counted-write`: reads (which begins the transaction), counts that the read ran,
/// inserts a warehouse and answers 201.
fn counted_write_route(cfg: &mut actix_web::web::ServiceConfig, layer: &sea_orm_actix_tx::Layer) {
    use actix_web::{HttpResponse, web};
    use sea_orm::ConnectionTrait;
    async fn counted_write(
        tx: sea_orm_actix_tx::Tx,
    ) -> Result<HttpResponse, app::problem::ApiError> {
        tx.execute_unprepared("SELECT count(*) FROM warehouse")
            .await?;
        COUNTED_RUNS.fetch_add(1, Ordering::SeqCst);
        tx.execute_unprepared("INSERT INTO warehouse (code, name) VALUES ('PL-2', 'checked')")
            .await?;
        Ok(HttpResponse::Created().json(json!({"created": true})))
    }
    cfg.route(
        "/test/counted-write",
        web::post().to(counted_write).wrap(layer.transactional()),
    );
}

/// Opened by the one test of `POST /test/write-then-wait`, once it has ended the backend.
static GATE: std::sync::LazyLock<tokio::sync::watch::Sender<bool>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// `POST /test/write-then-wait`: inserts a warehouse, then waits (outside the database, its
/// session idle in the transaction) until [`GATE`] opens, and answers 201: the next round trip
/// is the layer's own, before `COMMIT`.
fn write_then_wait_route(cfg: &mut actix_web::web::ServiceConfig, layer: &sea_orm_actix_tx::Layer) {
    use actix_web::{HttpResponse, web};
    use sea_orm::ConnectionTrait;
    async fn write_then_wait(
        tx: sea_orm_actix_tx::Tx,
    ) -> Result<HttpResponse, app::problem::ApiError> {
        tx.execute_unprepared(
            "INSERT INTO warehouse (code, name) VALUES ('PL-3', 'before commit')",
        )
        .await?;
        let mut gate = GATE.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        Ok(HttpResponse::Created().json(json!({"created": true})))
    }
    cfg.route(
        "/test/write-then-wait",
        web::post().to(write_then_wait).wrap(layer.transactional()),
    );
}

pub(crate) fn routes(cfg: &mut actix_web::web::ServiceConfig, layer: &sea_orm_actix_tx::Layer) {
    slow_write_route(cfg, layer);
    counted_write_route(cfg, layer);
    write_then_wait_route(cfg, layer);
}

/// The service under `name` (each test its own: the ender picks backends by it).
async fn app(name: &str, failover_ms: &str) -> TestApp {
    TestApp::builder()
        .env(&[
            ("DB_APPLICATION_NAME", name),
            ("DB_FAILOVER_RETRY_MS", failover_ms),
        ])
        .routes(routes)
        .spawn()
        .await
}

/// Ends the backend of the service called `name` that is inside `pg_sleep`, if one is; returns
/// how many it ended.
pub(crate) async fn end_sleeping_backend(app: &TestApp, name: &str) -> i64 {
    app.scalar(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{name}' AND state = 'active' AND query LIKE '%pg_sleep%'"
    ))
    .await
}

/// `POST /test/slow-write` on the service called `name`, its backend ended by the server while
/// the write sleeps in its statement; the answer.
pub(crate) async fn slow_write_whose_session_ends(app: &TestApp, name: &str) -> reqwest::Response {
    let request = app.send_json("/test/slow-write", json!({}));
    let ender = async {
        app.wait_until("the write's backend is ended", || async {
            end_sleeping_backend(app, name).await > 0
        })
        .await;
    };
    let (res, ()) = tokio::join!(request, ender);
    res
}

/// The answer to a write whose first attempt lost its primary: 201 from the re-run, the
/// warehouse `code` committed once (the lost attempt left nothing), one more re-run counted
/// since `reruns_before`, and `DB_TX_MAX_RETRIES`' budget untouched.
async fn assert_re_run_once(app: &TestApp, res: reqwest::Response, code: &str, reruns_before: f64) {
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 201, "re-run on a new session: {body}");
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM warehouse WHERE code = '{code}'"
        ))
        .await,
        1,
        "the lost attempt left nothing, the re-run committed once"
    );
    assert_eq!(
        metric(app, "db_requests_rerun_total{reason=\"primary_lost\"}").await - reruns_before,
        1.0
    );
    assert_eq!(
        metric(app, "db_transaction_retries_total ").await,
        0.0,
        "DB_TX_MAX_RETRIES' budget is not touched"
    );
}

#[tokio::test]
async fn a_write_whose_primary_ended_its_session_is_re_run_and_answered_once() {
    let name = "primary-lost-once";
    let app = app(name, "5000").await;
    let before = metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await;
    let res = slow_write_whose_session_ends(&app, name).await;
    assert_re_run_once(&app, res, "PL-1", before).await;
}

#[tokio::test]
async fn a_session_ended_after_the_handler_answered_but_before_commit_is_re_run() {
    let name = "primary-lost-before-commit";
    let app = app(name, "5000").await;
    let request = app.send_json("/test/write-then-wait", json!({}));
    let ender = async {
        app.wait_until(
            "the write's backend, idle in its transaction, is ended",
            || async {
                app.scalar(&format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = '{name}' AND state = 'idle in transaction'"
                ))
                .await
                    > 0
            },
        )
        .await;
        GATE.send_replace(true);
    };
    let (res, ()) = tokio::join!(request, ender);
    // The COMMIT after the handler finds the session ended: the server's 57P01 answers it (a
    // backend ends that way only before it commits), so the request is re-run, not answered 503.
    assert_re_run_once(&app, res, "PL-3", 0.0).await;
}

/// A statement whose connection the server closed without a word (no 57P01, no class 08: a
/// killed server, a router ending a node's sessions) is a primary lost: re-run, not 503.
#[tokio::test]
async fn a_write_whose_connection_the_server_closed_without_a_word_is_re_run() {
    let name = "primary-lost-closed";
    let proxy = FaultProxy::start(&upstream_of(&admin_url())).await;
    let app = TestApp::builder()
        .behind(&proxy)
        .env(&[("DB_APPLICATION_NAME", name)])
        .routes(routes)
        .spawn()
        .await;
    let request = app.send_json("/test/slow-write", json!({}));
    let closer = async {
        app.wait_until("the write is inside pg_sleep", || async {
            app.scalar(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}' \
                 AND state = 'active' AND query LIKE '%pg_sleep%'"
            ))
            .await
                > 0
        })
        .await;
        proxy.sever();
    };
    let (res, ()) = tokio::join!(request, closer);
    assert_re_run_once(&app, res, "PL-1", 0.0).await;
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

const FAILOVERS: &str = "db_failovers_total ";
const EVICTED: &str = "db_connections_evicted_total ";
const UNAVAILABLE: &str = "db_primary_unavailable_seconds_total ";

/// The pids of the service's backends, as an SQL array literal.
async fn backends(app: &TestApp, name: &str) -> String {
    app.text(&format!(
        "SELECT coalesce(array_agg(pid ORDER BY pid), '{{}}')::text FROM pg_stat_activity \
         WHERE application_name = '{name}'"
    ))
    .await
}

#[tokio::test]
async fn connections_opened_before_a_primary_lost_are_not_reused_and_the_loss_is_counted() {
    let name = "primary-lost-evict";
    let app = app(name, "5000").await;
    // The pool keeps DB_POOL_SIZE (2) connections open.
    app.wait_until("the pool holds two connections", || async {
        app.scalar(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'"
        ))
        .await
            >= 2
    })
    .await;
    let before = backends(&app, name).await;
    assert_eq!(metric(&app, FAILOVERS).await, 0.0);
    let res = slow_write_whose_session_ends(&app, name).await;
    assert_eq!(res.status(), 201, "re-run after the primary lost");
    // Each checkout closes the idle connection it would have handed out if that was opened
    // before the loss: a few requests go through them all.
    for code in ["AFTER-1", "AFTER-2", "AFTER-3"] {
        app.warehouse(code).await;
    }
    let old = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY('{before}'::int[])");
    app.wait_until("no connection opened before the loss is left", || async {
        app.scalar(&old).await == 0
    })
    .await;
    assert!(
        metric(&app, EVICTED).await >= 1.0,
        "the idle one was evicted"
    );
    assert_eq!(metric(&app, FAILOVERS).await, 1.0);
    assert!(
        metric(&app, UNAVAILABLE).await > 0.0,
        "from the loss to the re-run's commit"
    );
    // New connections are reused as before: nothing more is evicted.
    let evicted = metric(&app, EVICTED).await;
    for code in ["AFTER-4", "AFTER-5"] {
        app.warehouse(code).await;
    }
    assert_eq!(metric(&app, EVICTED).await, evicted);
    assert_eq!(metric(&app, FAILOVERS).await, 1.0, "one loss");
}

#[tokio::test]
async fn in_the_failover_window_a_read_only_server_is_refused_at_begin_before_the_first_statement()
{
    let name = "primary-lost-checked";
    let app = app(name, "10000").await;
    read_only(&app, name, true).await;
    let request = app.send_json("/test/counted-write", json!({}));
    let promote = async {
        app.wait_until("re-runs refused at BEGIN", || async {
            metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await >= 3.0
        })
        .await;
        assert_eq!(
            COUNTED_RUNS.load(Ordering::SeqCst),
            1,
            "only the attempt before the window ran its first statement"
        );
        read_only(&app, name, false).await;
    };
    let (res, ()) = tokio::join!(request, promote);
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 201, "re-run once the server takes writes: {body}");
    assert_eq!(
        COUNTED_RUNS.load(Ordering::SeqCst),
        2,
        "the first statement ran before the window and once the server took writes"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse WHERE code = 'PL-2'")
            .await,
        1
    );
    assert_eq!(metric(&app, FAILOVERS).await, 1.0);
    assert!(metric(&app, UNAVAILABLE).await > 0.0);
}
