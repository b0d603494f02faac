//! The end of a `READ ONLY` transaction (`docs/transactions.md`, *Ending a read without
//! waiting*): at READ COMMITTED or REPEATABLE READ a read is answered without waiting for its
//! transaction to end (no `COMMIT` is sent; a `ROLLBACK` is queued and completed when the
//! connection goes back to the pool), and a failure of that end cannot change the answer nor
//! leave a connection in a transaction for the next request. At SERIALIZABLE the read still waits
//! for its `COMMIT`. The app has a pool of one connection, so a connection returned dirty or never
//! replaced makes the next request fail.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::fault_proxy::{Cut, FaultProxy, Hold, upstream_of};
use crate::support::{TestApp, admin_url, assert_unavailable, pooled_upstream};

/// An app with one pooled connection behind a fresh proxy, with one product (made before any
/// fault); `isolation` is `DB_ISOLATION_LEVEL`.
async fn app_behind_proxy(isolation: &str) -> (FaultProxy, TestApp, i64) {
    let proxy = FaultProxy::start(&upstream_of(&admin_url())).await;
    let app = TestApp::builder()
        .behind(&proxy)
        .env(&[
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_POOL_TIMEOUT", "5"),
            ("DB_CONNECT_TIMEOUT", "1"),
            ("DB_ISOLATION_LEVEL", isolation),
        ])
        .spawn()
        .await;
    let product = app.product("P1").await;
    (proxy, app, product)
}

/// `GET /products/{id}`, bounded so that a request hanging on a connection fails the test.
async fn get_product(app: &TestApp, id: i64) -> (u16, Value) {
    let res = tokio::time::timeout(Duration::from_secs(30), app.get(&format!("/products/{id}")))
        .await
        .expect("an answer, not a request hanging on its connection");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn transactions_left_open(app: &TestApp) -> i64 {
    app.scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .await
}

#[tokio::test]
async fn a_read_at_repeatable_read_is_answered_without_sending_commit() {
    let (proxy, app, product) = app_behind_proxy("repeatable_read").await;
    // A COMMIT would never reach the server: a read that waited for one would get no reply and
    // be answered 503 after DB_CONNECT_TIMEOUT.
    proxy.hold_next(Hold::Commit);

    let (status, body) = get_product(&app, product).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sku"], "P1", "{body}");
    assert!(!proxy.held(), "the read sent no COMMIT");
    app.wait_until("the read's transaction has ended on the server", || async {
        transactions_left_open(&app).await == 0
    })
    .await;
}

#[tokio::test]
async fn a_read_whose_end_is_cut_still_answers_its_data_and_the_pool_recovers() {
    for cut in [Cut::AfterForwarding, Cut::BeforeForwarding] {
        let (proxy, app, product) = app_behind_proxy("read_committed").await;
        proxy.cut_next_rollback(cut);

        let (status, body) = get_product(&app, product).await;

        assert_eq!(
            status, 200,
            "{cut:?}: the data read, whatever the end: {body}"
        );
        assert_eq!(body["sku"], "P1", "{cut:?}: {body}");
        // The end goes out when the connection is released, after the answer.
        app.wait_until("the proxy cut the read's ROLLBACK", || async {
            proxy.fired()
        })
        .await;
        app.wait_until("the server ended the cut transaction", || async {
            transactions_left_open(&app).await == 0
        })
        .await;

        // The pool's one connection was closed, not returned in a transaction: the next read
        // and a write get a fresh one.
        let (status, body) = get_product(&app, product).await;
        assert_eq!(
            (status, &body["sku"]),
            (200, &json!("P1")),
            "{cut:?}: {body}"
        );
        let other = app.product("P2").await;
        let (status, body) = get_product(&app, other).await;
        assert_eq!(
            (status, &body["sku"]),
            (200, &json!("P2")),
            "{cut:?}: {body}"
        );
    }
}

#[tokio::test]
async fn a_serializable_read_still_waits_for_its_commit() {
    let (proxy, app, product) = app_behind_proxy("serializable").await;
    // The server gets the COMMIT; its reply never comes back.
    proxy.hold_next(Hold::CommitReply);

    let res = tokio::time::timeout(
        Duration::from_secs(30),
        app.get(&format!("/products/{product}")),
    )
    .await
    .expect("an answer after the COMMIT's bound");

    assert!(proxy.held(), "the read sent its COMMIT");
    // Its reads are an answer only once the COMMIT succeeded (a SERIALIZABLE read-only
    // transaction can fail there with 40001): without the reply, no data.
    assert_unavailable(res, "the COMMIT's reply never came").await;
    assert!(
        proxy.held_connection_closed(Duration::from_secs(10)).await,
        "the app closed the connection that got no reply"
    );
    let (status, body) = get_product(&app, product).await;
    assert_eq!((status, &body["sku"]), (200, &json!("P1")), "{body}");
}

#[tokio::test]
async fn behind_pgbouncer_a_read_whose_end_is_cut_still_answers_its_data_and_the_next_request_works()
 {
    let proxy = FaultProxy::start(&pooled_upstream()).await;
    let app = TestApp::builder()
        .pooled()
        .behind(&proxy)
        .env(&[("DB_POOL_SIZE", "1"), ("DB_MAX_OVERFLOW", "0")])
        .spawn()
        .await;
    let product = app.product("P1").await;
    proxy.cut_next_rollback(Cut::AfterForwarding);

    let (status, body) = get_product(&app, product).await;

    assert_eq!((status, &body["sku"]), (200, &json!("P1")), "{body}");
    app.wait_until("the proxy cut the read's ROLLBACK", || async {
        proxy.fired()
    })
    .await;
    // PgBouncer lost its client mid-transaction: the server connection is not handed to
    // another client in a transaction.
    app.wait_until("no server connection is left in a transaction", || async {
        transactions_left_open(&app).await == 0
    })
    .await;
    let (status, body) = get_product(&app, product).await;
    assert_eq!((status, &body["sku"]), (200, &json!("P1")), "{body}");
    let other = app.product("P2").await;
    let (status, body) = get_product(&app, other).await;
    assert_eq!((status, &body["sku"]), (200, &json!("P2")), "{body}");
}
