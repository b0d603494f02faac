//! A `COMMIT` whose reply is lost (`docs/transactions.md`): the connection between the app and
//! PostgreSQL is cut by the test's own proxy at the `COMMIT` of a receipt, and the answer must
//! match what the database holds: 201 when the server committed, 503 with `Retry-After` when it did
//! not, 500 `commit_outcome_unknown` without `Retry-After` when the outcome cannot be learned.
//!
//! Across a promotion (the last tests): a real streaming replica of the test's own is promoted
//! while the app waits for the outcome, and the proxy is pointed at it. The new primary reuses
//! the lost transaction's id for another transaction that commits, so a resolution by id alone
//! would answer 201 for a receipt that is not there.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::fault_proxy::{Cut, FaultProxy, upstream_of};
use crate::support::process::OwnServer;
use crate::support::replica::{ReplicaPair, text};
use crate::support::{
    Server, TestApp, TestDatabase, admin_url, assert_commit_outcome_unknown, assert_unavailable,
    connect_to, pooled_upstream,
};
use crate::transactions::metric;

/// An app behind a fresh proxy, with one warehouse and one product (created before any fault).
async fn app_behind_proxy(overrides: &[(&str, &str)]) -> (FaultProxy, TestApp, Value) {
    let proxy = FaultProxy::start(&upstream_of(&admin_url())).await;
    let app = TestApp::builder()
        .behind(&proxy)
        .env(overrides)
        .spawn()
        .await;
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    let receipt = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});
    (proxy, app, receipt)
}

async fn movements(app: &TestApp) -> i64 {
    app.scalar("SELECT count(*) FROM movement").await
}

#[tokio::test]
async fn a_commit_whose_reply_is_lost_after_the_server_committed_answers_the_handlers_201() {
    let (proxy, app, receipt) = app_behind_proxy(&[]).await;
    proxy.cut_next_commit(Cut::AfterForwarding);

    let res = app.post("/receipts", &receipt).await;

    assert!(proxy.fired(), "the proxy cut the receipt's COMMIT");
    assert_eq!(
        res.status(),
        201,
        "the server committed: the handler's answer"
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["quantity"], 5, "{body}");
    assert_eq!(movements(&app).await, 1, "the receipt is stored once");
    app.assert_invariant().await;
}

#[tokio::test]
async fn a_commit_cut_before_it_reached_the_server_answers_503_with_retry_after_and_stores_nothing()
{
    let (proxy, app, receipt) = app_behind_proxy(&[]).await;
    proxy.cut_next_commit(Cut::BeforeForwarding);

    let res = app.post("/receipts", &receipt).await;

    assert!(proxy.fired(), "the proxy cut the receipt's COMMIT");
    assert_unavailable(res, "the COMMIT never reached the server").await;
    assert_eq!(movements(&app).await, 0, "nothing was committed");
    assert_eq!(app.stock(1, 1).await, 0);

    let retried = app.post("/receipts", &receipt).await;
    assert_eq!(retried.status(), 201, "the database is still there");
    assert_eq!(movements(&app).await, 1);
}

#[tokio::test]
async fn a_commit_whose_outcome_cannot_be_learned_answers_500_commit_outcome_unknown_without_retry_after()
 {
    // DB_CONNECT_TIMEOUT bounds the search for the outcome.
    let (proxy, app, receipt) = app_behind_proxy(&[("DB_CONNECT_TIMEOUT", "1")]).await;
    proxy.cut_next_commit_and_isolate(Cut::AfterForwarding);

    let res = app.post("/receipts", &receipt).await;

    assert!(proxy.fired(), "the proxy cut the receipt's COMMIT");
    assert_commit_outcome_unknown(res, "no server to ask").await;
    // The server did commit: "unknown" is honest, the answer never claims a rollback.
    assert_eq!(movements(&app).await, 1);
}

#[tokio::test]
async fn behind_pgbouncer_a_lost_commit_reply_is_resolved_through_another_checkout() {
    let proxy = FaultProxy::start(&pooled_upstream()).await;
    let app = TestApp::builder().pooled().behind(&proxy).spawn().await;
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    let receipt = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});

    for (cut, status, stored) in [
        (Cut::AfterForwarding, 201, 1),
        (Cut::BeforeForwarding, 503, 1),
    ] {
        proxy.cut_next_commit(cut);
        let res = app.post("/receipts", &receipt).await;
        assert!(proxy.fired(), "{cut:?}: the proxy cut the COMMIT");
        assert_eq!(res.status(), status, "{cut:?}");
        assert_eq!(movements(&app).await, stored, "{cut:?}");
    }
}

#[tokio::test]
async fn in_the_failover_window_a_commit_known_not_to_have_committed_is_re_run() {
    let name = "commit-outcome-window";
    let proxy = FaultProxy::start(&upstream_of(&admin_url())).await;
    let app = TestApp::builder()
        .behind(&proxy)
        .env(&[
            ("DB_APPLICATION_NAME", name),
            ("DB_FAILOVER_RETRY_MS", "30000"),
        ])
        .routes(crate::primary_lost::routes)
        .spawn()
        .await;
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    let receipt = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});
    // A session the server ends opens the failover window (and is re-run).
    let opened = crate::primary_lost::slow_write_whose_session_ends(&app, name).await;
    assert_eq!(opened.status(), 201);
    let before = metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await;
    proxy.cut_next_commit(Cut::BeforeForwarding);

    let res = app.post("/receipts", &receipt).await;

    assert!(proxy.fired(), "the proxy cut the receipt's COMMIT");
    assert_eq!(
        res.status(),
        201,
        "known not committed, in the window: re-run, not 503"
    );
    assert_eq!(movements(&app).await, 1, "stored once, by the re-run");
    let reruns = metric(&app, "db_requests_rerun_total{reason=\"primary_lost\"}").await - before;
    assert_eq!(reruns, 1.0);
}

#[tokio::test]
async fn a_commit_whose_session_is_ended_while_it_waits_for_a_synchronous_standby_answers_the_handlers_201()
 {
    // A server of the test's own, stopped when the test ends however it ends (no database to
    // drop: a DROP DATABASE would wait for the standby too): once `synchronous_standby_names`
    // is in effect, every commit waits for a standby that never comes.
    let server = OwnServer::start_with_inventory().await;
    let app = TestApp::builder()
        .url(&server.url("inventory"))
        .spawn()
        .await;
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    let receipt = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});
    app.execute("ALTER SYSTEM SET synchronous_standby_names = 'absent'")
        .await;
    app.execute("SELECT pg_reload_conf()").await;

    // The server applies the reload in its own time: a receipt that committed without waiting
    // came too early and does not count (it committed, and is counted below); the next is tried.
    let mut answered = 0;
    for attempt in 0.. {
        assert!(
            attempt < 50,
            "no receipt's COMMIT ever waited for the standby"
        );
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
        let request = async {
            let res = app.post("/receipts", &receipt).await;
            let _ = done_tx.send(());
            res
        };
        let ender = async {
            loop {
                let ended = app
                    .scalar(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE wait_event = 'SyncRep'",
                    )
                    .await;
                if ended > 0 {
                    return true;
                }
                if done_rx.try_recv().is_ok() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let (res, waited) = tokio::join!(request, ender);
        // Ended while it waited, the backend had committed locally and closed the session
        // without answering the COMMIT (PostgreSQL logs a warning saying so): resolved on the
        // same server as committed, the handler's answer, not a 503.
        assert_eq!(res.status(), 201, "committed: the handler's answer");
        answered += 1;
        if waited {
            break;
        }
    }
    assert_eq!(movements(&app).await, answered);
}

/// An app over a primary and streaming replica of the test's own, behind a proxy to the
/// primary, with one warehouse and one product (replayed on the replica).
struct Promotion {
    pair: ReplicaPair,
    proxy: FaultProxy,
    app: TestApp,
    receipt: Value,
}

impl Promotion {
    async fn start() -> Promotion {
        let pair = ReplicaPair::start();
        let proxy = FaultProxy::start(&format!("127.0.0.1:{}", pair.primary.port)).await;
        let database =
            TestDatabase::create_at(Server::Postgres, &pair.primary.url("postgres")).await;
        // Time enough to promote the replica while the app looks for the outcome.
        let app = TestApp::builder()
            .database(database)
            .behind(&proxy)
            .env(&[
                ("DB_CONNECT_TIMEOUT", "30"),
                ("DB_FAILOVER_RETRY_MS", "30000"),
            ])
            .spawn()
            .await;
        let warehouse = app.warehouse("W1").await;
        let product = app.product("P1").await;
        let receipt = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});
        pair.wait_for_replay(&app).await;
        Promotion {
            pair,
            proxy,
            app,
            receipt,
        }
    }

    /// Posts the receipt (with `key` as its `Idempotency-Key`) with its `COMMIT` cut after
    /// the old primary received it and the database unreachable; returns the request still
    /// waiting for its answer and the id the old primary gave the transaction, once it
    /// committed there.
    async fn post_and_lose_the_commit_reply(
        &self,
        key: Option<&str>,
    ) -> (tokio::task::JoinHandle<reqwest::Response>, i64) {
        self.proxy.cut_next_commit_and_isolate(Cut::AfterForwarding);
        let mut post = self.app.client.post(self.app.url("/receipts"));
        if let Some(key) = key {
            post = post.header("Idempotency-Key", key);
        }
        let request = tokio::spawn(post.json(&self.receipt).send());
        let request = tokio::spawn(async move {
            request
                .await
                .expect("the request task ends")
                .expect("request sent")
        });
        assert!(
            self.proxy.wait_fired(Duration::from_secs(30)).await,
            "the proxy cut the receipt's COMMIT"
        );
        let app = &self.app;
        app.wait_until("the old primary committed the receipt", || async {
            app.scalar("SELECT count(*) FROM movement").await == 1
        })
        .await;
        let xid = app.scalar("SELECT xmin::text::bigint FROM movement").await;
        (request, xid)
    }

    /// Promotes the replica and points the proxy at it; the database is reachable again.
    async fn fail_over(&self) {
        self.pair.promote().await;
        let new_primary = format!("127.0.0.1:{}", self.pair.replica.port);
        self.proxy.retarget(&new_primary).await;
        self.proxy.heal();
    }

    /// Promotes the replica, which never received the receipt, and has it hand out the
    /// receipt's transaction id again to a transaction that commits; then points the proxy at
    /// it. Returns a connection to the new primary.
    async fn fail_over_reusing(&self, xid: i64) -> sea_orm::DatabaseConnection {
        self.pair.promote().await;
        let new = connect_to(&self.pair.replica.url(&self.app.database_name())).await;
        loop {
            let next: i64 = text(&new, "SELECT pg_current_xact_id()::text")
                .await
                .parse()
                .expect("an id");
            if next >= xid {
                break;
            }
        }
        let status = text(&new, &format!("SELECT pg_xact_status('{xid}'::xid8)::text")).await;
        assert_eq!(
            status, "committed",
            "the new primary says the receipt's id committed: an answer for another transaction"
        );
        assert_eq!(count(&new, "movement").await, 0, "the receipt is not there");
        let new_primary = format!("127.0.0.1:{}", self.pair.replica.port);
        self.proxy.retarget(&new_primary).await;
        self.proxy.heal();
        new
    }
}

async fn count(db: &sea_orm::DatabaseConnection, table: &str) -> i64 {
    text(db, &format!("SELECT count(*)::text FROM {table}"))
        .await
        .parse()
        .expect("a count")
}

#[tokio::test]
async fn a_commit_lost_with_its_primary_before_it_replicated_is_re_run_on_the_new_primary_when_it_has_a_key()
 {
    let promotion = Promotion::start().await;
    promotion.pair.stop_streaming().await;
    let before = metric(
        &promotion.app,
        "db_requests_rerun_total{reason=\"primary_lost\"}",
    )
    .await;

    let (request, xid) = promotion
        .post_and_lose_the_commit_reply(Some("receipt-1"))
        .await;
    let new = promotion.fail_over_reusing(xid).await;
    let res = request.await.expect("the request's answer");

    assert_eq!(
        res.status(),
        201,
        "not committed on the new primary: re-run there"
    );
    assert!(res.headers().get("idempotent-replayed").is_none());
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["quantity"], 5, "{body}");
    assert_eq!(
        count(&new, "movement").await,
        1,
        "stored once, by the re-run"
    );
    assert_eq!(count(&new, "idempotency_key").await, 1);
    let reruns = metric(
        &promotion.app,
        "db_requests_rerun_total{reason=\"primary_lost\"}",
    )
    .await
        - before;
    assert_eq!(reruns, 1.0, "counted as a primary lost");
    let _ = new.close().await;
}

#[tokio::test]
async fn a_commit_lost_with_its_primary_is_unknown_without_a_key_whatever_the_new_primary_says_of_its_id()
 {
    let promotion = Promotion::start().await;
    promotion.pair.stop_streaming().await;

    let (request, xid) = promotion.post_and_lose_the_commit_reply(None).await;
    let new = promotion.fail_over_reusing(xid).await;
    let res = request.await.expect("the request's answer");

    assert_commit_outcome_unknown(res, "the id's status on another server is no answer").await;
    assert_eq!(count(&new, "movement").await, 0);
    let _ = new.close().await;
}

#[tokio::test]
async fn a_commit_that_replicated_before_its_primary_was_lost_answers_the_handlers_201_from_its_record()
 {
    let promotion = Promotion::start().await;
    let before = metric(
        &promotion.app,
        "db_requests_rerun_total{reason=\"primary_lost\"}",
    )
    .await;

    let (request, _) = promotion
        .post_and_lose_the_commit_reply(Some("receipt-1"))
        .await;
    promotion.pair.wait_for_replay(&promotion.app).await;
    promotion.fail_over().await;
    let res = request.await.expect("the request's answer");

    assert_eq!(res.status(), 201, "committed: the handler's answer");
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["quantity"], 5, "{body}");
    let new = promotion.pair.on_replica(&promotion.app).await;
    assert_eq!(count(&new, "movement").await, 1, "stored once");
    let reruns = metric(
        &promotion.app,
        "db_requests_rerun_total{reason=\"primary_lost\"}",
    )
    .await
        - before;
    assert_eq!(reruns, 0.0, "not run again");
    let _ = new.close().await;
}
