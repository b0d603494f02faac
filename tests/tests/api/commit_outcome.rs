//! A `COMMIT` whose reply is lost (`docs/transactions.md`): the connection between the app and
//! PostgreSQL is cut by the test's own proxy at the `COMMIT` of a receipt, and the answer must
//! match what the database holds: 201 when the server committed, 503 with `Retry-After` when it did
//! not, 500 `commit_outcome_unknown` without `Retry-After` when the outcome cannot be learned.

use serde_json::{Value, json};

use crate::support::fault_proxy::{Cut, FaultProxy, upstream_of};
use crate::support::{TestApp, admin_url, assert_unavailable, pooled_upstream, problem};

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
    assert!(res.headers().get("retry-after").is_none(), "no Retry-After");
    let (status, body) = problem(res).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some("commit_outcome_unknown"))
    );
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
