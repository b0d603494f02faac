//! A transaction the layer abandoned (`docs/transactions.md`, *A database that stops answering*):
//! a round trip on its connection outlived its bound, the layer closed the connection and
//! answered, and the server, which did not see the close, keeps the transaction open with its
//! row locks. The layer asks the server to end that backend once the server answers, so the row
//! is writable again within seconds, not at `DB_IDLE_IN_TRANSACTION_TIMEOUT_MS` (left here at its
//! 30 s default, so that only the layer's termination can free the row in time). And a write
//! that waits on such a lock until `statement_timeout` is 503 `statement_timeout`, never 500.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::fault_proxy::{FaultProxy, Hold, upstream_of};
use crate::support::{
    TestApp, admin_url, assert_commit_outcome_unknown, assert_statement_timeout,
    assert_unavailable, problem,
};
use crate::transactions::metric;

/// What the issue promises: the row is writable again this soon after the partition heals.
const WRITABLE_AGAIN_WITHIN: Duration = Duration::from_secs(15);
const TERMINATED: &str = "db_abandoned_backends_terminated_total ";

/// An app behind a fresh proxy under `name`, with one connection (so that the layer's request to
/// end the backend needs a new one, refused while the partition lasts), one warehouse and one
/// product.
async fn app_behind_proxy(name: &str) -> (FaultProxy, TestApp, Value) {
    let proxy = FaultProxy::start(&upstream_of(&admin_url())).await;
    let app = TestApp::builder()
        .behind(&proxy)
        .env(&[
            ("DB_APPLICATION_NAME", name),
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_CONNECT_TIMEOUT", "1"),
            ("DB_STATEMENT_TIMEOUT_MS", "300"),
        ])
        .spawn()
        .await;
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    let receipt = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});
    (proxy, app, receipt)
}

/// The pid of the service's backend that is still inside a transaction, if one is.
async fn backend_in_transaction(app: &TestApp, name: &str) -> Option<i64> {
    let pid = app
        .scalar(&format!(
            "SELECT coalesce(max(pid), 0)::bigint FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = '{name}' \
             AND state LIKE 'idle in transaction%'"
        ))
        .await;
    (pid != 0).then_some(pid)
}

/// Heals the partition, then checks that the abandoned backend `pid` is ended and the stock
/// row written again through the app within [`WRITABLE_AGAIN_WITHIN`], by the layer's
/// termination (counted once), not by the server's 30-s timeout.
async fn heal_and_write_again(proxy: &FaultProxy, app: &TestApp, pid: i64, receipt: &Value) {
    assert_eq!(
        metric(app, TERMINATED).await,
        0.0,
        "nothing could be ended while the server was out of reach"
    );
    proxy.heal();
    let healed = Instant::now();
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    while app.scalar(&gone).await != 0 {
        assert!(
            healed.elapsed() < WRITABLE_AGAIN_WITHIN,
            "the abandoned backend {pid} is still there {:?} after the partition healed",
            healed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The availability probe may still count the database as down for a moment: ask again
    // until the answer is not a fast 503.
    loop {
        let res = app.post("/receipts", receipt).await;
        let status = res.status().as_u16();
        if status == 201 {
            break;
        }
        let (_, body) = problem(res).await;
        assert!(
            status == 503 && body["code"] == "database_unavailable",
            "{status} {body}"
        );
        assert!(
            healed.elapsed() < WRITABLE_AGAIN_WITHIN,
            "the row is not writable {:?} after the partition healed: {body}",
            healed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healed.elapsed() < WRITABLE_AGAIN_WITHIN);
    assert_eq!(metric(app, TERMINATED).await, 1.0, "the layer ended it");
    assert_eq!(
        app.scalar("SELECT count(*) FROM movement").await,
        1,
        "only the write after the partition committed"
    );
    let (warehouse, product) = (&receipt["warehouse_id"], &receipt["product_id"]);
    let stock = app.stock(
        warehouse.as_i64().unwrap_or(0),
        product.as_i64().unwrap_or(0),
    );
    assert_eq!(stock.await, 5);
    app.assert_invariant().await;
}

#[tokio::test]
async fn a_write_abandoned_at_a_statement_has_its_backend_ended_once_the_partition_heals() {
    let name = "abandoned-at-statement";
    let (proxy, app, receipt) = app_behind_proxy(name).await;
    // The receipt's stock row is written (and locked) first; its movement is held.
    proxy.partition_next(Hold::Statement("INSERT INTO \"movement\""));

    let res = app.post("/receipts", &receipt).await;

    assert!(proxy.held(), "the proxy held the receipt's movement");
    assert_unavailable(res, "the statement's bound passed").await;
    let pid = backend_in_transaction(&app, name)
        .await
        .expect("the server still holds the abandoned transaction");
    heal_and_write_again(&proxy, &app, pid, &receipt).await;
}

#[tokio::test]
async fn a_write_abandoned_at_commit_has_its_backend_ended_once_the_partition_heals() {
    let name = "abandoned-at-commit";
    let (proxy, app, receipt) = app_behind_proxy(name).await;
    proxy.partition_next(Hold::Commit);

    let res = app.post("/receipts", &receipt).await;

    assert!(proxy.held(), "the proxy held the receipt's COMMIT");
    assert_commit_outcome_unknown(res, "the outcome cannot be asked while the partition lasts")
        .await;
    let pid = backend_in_transaction(&app, name)
        .await
        .expect("the server still holds the abandoned transaction");
    heal_and_write_again(&proxy, &app, pid, &receipt).await;
}

#[tokio::test]
async fn a_write_that_waits_on_a_row_lock_past_the_statement_timeout_is_503_statement_timeout() {
    let app = TestApp::builder()
        .env(&[("DB_STATEMENT_TIMEOUT_MS", "300")])
        .spawn()
        .await;
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    let receipt = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});
    assert_eq!(app.post("/receipts", &receipt).await.status(), 201);
    // Another session holds the stock row's lock, as an abandoned transaction would.
    let holder = sea_orm::TransactionTrait::begin(&app.db)
        .await
        .expect("begin");
    sea_orm::ConnectionTrait::execute_unprepared(
        &holder,
        &format!(
            "SELECT 1 FROM stock_level WHERE warehouse_id = {warehouse} \
             AND product_id = {product} FOR UPDATE"
        ),
    )
    .await
    .expect("lock the stock row");

    let res = app.post("/receipts", &receipt).await;

    assert_statement_timeout(res, "the receipt waited on the row lock for 300 ms").await;
    holder.rollback().await.expect("rollback");
    assert_eq!(app.post("/receipts", &receipt).await.status(), 201);
    assert_eq!(app.stock(warehouse, product).await, 10);
}
