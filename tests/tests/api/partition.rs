//! A database whose packets stop arriving (a network partition), caused by the tests' own proxy
//! holding one connection: nothing passes either way and nothing is closed. Every round trip is
//! bounded on the service side (`DB_CONNECT_TIMEOUT`, plus `DB_STATEMENT_TIMEOUT_MS` for a
//! statement): the request is answered when the bound passes, the held connection is closed (never
//! returned to the pool), and a `COMMIT` without reply goes through the commit-outcome check
//! (`docs/transactions.md`).
//!
//! The app has a pool of one connection, so a connection that was not closed, or a permit that
//! was not given back, makes the request that follows fail. MariaDB cannot be asked about
//! another session's transaction: a `COMMIT` without reply is answered 500
//! `commit_outcome_unknown` there, whether or not the server committed.

use std::time::{Duration, Instant};

use sea_orm::{ConnectOptions, Database};
use sea_orm_actix_tx::transaction::Replica;
use serde_json::{Value, json};

use crate::support::fault_proxy::{FaultProxy, Hold, upstream_of};
use crate::support::replica::ReplicaPair;
use crate::support::{Backend, Server, TestApp, assert_commit_outcome_unknown, assert_unavailable};

/// `DB_STATEMENT_TIMEOUT_MS` + `DB_CONNECT_TIMEOUT` below: a statement's bound.
const STATEMENT_BOUND: Duration = Duration::from_millis(1_300);
/// `DB_CONNECT_TIMEOUT` below: the bound of `BEGIN` and `COMMIT`.
const CONTROL_BOUND: Duration = Duration::from_secs(1);
/// What a busy two-core machine may add to a bound before the answer arrives. Without the
/// bound the answer would take as long as the kernel keeps retransmitting: many minutes.
const MARGIN: Duration = Duration::from_secs(4);

struct Receipt {
    body: Value,
    warehouse: i64,
    product: i64,
}

async fn app_behind_proxy(server: Server) -> (FaultProxy, TestApp, Receipt) {
    let upstream = upstream_of(&server.admin_url());
    let overrides = [
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_TIMEOUT", "5"),
        ("DB_CONNECT_TIMEOUT", "1"),
        ("DB_STATEMENT_TIMEOUT_MS", "300"),
    ];
    let (proxy, app) = match server {
        Server::Postgres => {
            let proxy = FaultProxy::start(&upstream).await;
            let app = TestApp::builder()
                .behind(&proxy)
                .env(&overrides)
                .spawn()
                .await;
            (proxy, app)
        }
        Server::Mariadb => {
            let proxy = FaultProxy::start_mysql(&upstream).await;
            let app = TestApp::builder()
                .backend(Backend::Mariadb)
                .behind(&proxy)
                .env(&overrides)
                .spawn()
                .await;
            (proxy, app)
        }
    };
    let warehouse = app.warehouse("W1").await;
    let product = app.product("P1").await;
    let body = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 5});
    let receipt = Receipt {
        body,
        warehouse,
        product,
    };
    (proxy, app, receipt)
}

/// POSTs `body`, failing the test (instead of hanging it) when no answer comes.
async fn post_timed(app: &TestApp, path: &str, body: &Value) -> (reqwest::Response, Duration) {
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(30), app.post(path, body))
        .await
        .expect("an answer, not a request hanging on a partitioned connection");
    (res, started.elapsed())
}

async fn movements(app: &TestApp) -> i64 {
    app.scalar("SELECT count(*) FROM movement").await
}

/// The held connection was closed by the app, and a pool of one serves the next receipt.
async fn assert_connection_closed_and_pool_usable(
    proxy: &FaultProxy,
    app: &TestApp,
    receipt: &Receipt,
) {
    assert!(
        proxy.held_connection_closed(Duration::from_secs(10)).await,
        "the app closed the connection that got no reply"
    );
    let (next, _) = post_timed(app, "/receipts", &receipt.body).await;
    assert_eq!(next.status(), 201, "the pool's one connection was replaced");
}

#[tokio::test]
async fn a_statement_without_reply_is_answered_503_within_its_bound_and_its_connection_closed() {
    a_statement_without_reply_is_answered_503(Server::Postgres, "INSERT INTO \"movement\"").await;
}

#[tokio::test]
async fn on_mariadb_a_statement_without_reply_is_answered_503_within_its_bound() {
    a_statement_without_reply_is_answered_503(Server::Mariadb, "INSERT INTO `movement`").await;
}

async fn a_statement_without_reply_is_answered_503(server: Server, insert: &'static str) {
    let (proxy, app, receipt) = app_behind_proxy(server).await;
    proxy.hold_next(Hold::Statement(insert));

    let (res, elapsed) = post_timed(&app, "/receipts", &receipt.body).await;

    assert!(proxy.held(), "the proxy held the receipt's INSERT");
    assert!(
        elapsed >= STATEMENT_BOUND && elapsed < STATEMENT_BOUND + MARGIN,
        "answered after the statement's bound, not before and not much later: {elapsed:?}"
    );
    assert_unavailable(res, "a statement without reply").await;
    assert_eq!(movements(&app).await, 0, "nothing was committed");
    assert_eq!(
        app.stock(receipt.warehouse, receipt.product).await,
        0,
        "the stock change before it is rolled back"
    );

    assert_connection_closed_and_pool_usable(&proxy, &app, &receipt).await;
    assert_eq!(movements(&app).await, 1);
    app.assert_invariant().await;
}

#[tokio::test]
async fn a_commit_whose_reply_never_comes_is_resolved_and_answered_201_when_the_server_committed() {
    let (proxy, app, receipt) = app_behind_proxy(Server::Postgres).await;
    proxy.hold_next(Hold::CommitReply);

    let (res, elapsed) = post_timed(&app, "/receipts", &receipt.body).await;

    assert!(
        proxy.held(),
        "the proxy held the reply to the receipt's COMMIT"
    );
    assert!(
        elapsed >= CONTROL_BOUND && elapsed < CONTROL_BOUND + MARGIN,
        "answered after the COMMIT's bound and the outcome check: {elapsed:?}"
    );
    assert_eq!(
        res.status(),
        201,
        "the server committed: the handler's answer"
    );
    assert_eq!(movements(&app).await, 1, "stored once");

    assert_connection_closed_and_pool_usable(&proxy, &app, &receipt).await;
    assert_eq!(movements(&app).await, 2);
    app.assert_invariant().await;
}

#[tokio::test]
async fn a_commit_that_never_reaches_the_server_is_answered_503_and_stores_nothing() {
    let (proxy, app, receipt) = app_behind_proxy(Server::Postgres).await;
    proxy.hold_next(Hold::Commit);

    let (res, elapsed) = post_timed(&app, "/receipts", &receipt.body).await;

    assert!(proxy.held(), "the proxy held the receipt's COMMIT");
    assert!(
        elapsed >= CONTROL_BOUND && elapsed < CONTROL_BOUND + MARGIN,
        "answered after the COMMIT's bound and the outcome check: {elapsed:?}"
    );
    assert_unavailable(
        res,
        "the server rolled back when the app closed the connection: a retry is safe",
    )
    .await;
    assert_eq!(movements(&app).await, 0, "nothing was committed");

    assert_connection_closed_and_pool_usable(&proxy, &app, &receipt).await;
    assert_eq!(movements(&app).await, 1);
}

#[tokio::test]
async fn on_mariadb_a_commit_without_reply_is_answered_500_commit_outcome_unknown() {
    // Held after the server committed, and held before it: the same honest answer.
    for (hold, stored) in [(Hold::CommitReply, 1), (Hold::Commit, 0)] {
        let (proxy, app, receipt) = app_behind_proxy(Server::Mariadb).await;
        proxy.hold_next(hold);

        let (res, elapsed) = post_timed(&app, "/receipts", &receipt.body).await;

        assert!(proxy.held(), "{hold:?}: the proxy held the COMMIT");
        assert!(
            elapsed >= CONTROL_BOUND && elapsed < CONTROL_BOUND + MARGIN,
            "{hold:?}: answered after the COMMIT's bound: {elapsed:?}"
        );
        assert_commit_outcome_unknown(res, &format!("{hold:?}")).await;
        assert_eq!(movements(&app).await, stored, "{hold:?}");

        assert_connection_closed_and_pool_usable(&proxy, &app, &receipt).await;
        assert_eq!(movements(&app).await, stored + 1, "{hold:?}");
    }
}

/// A query outside any request's transaction (here the replica's check, bounded by 500 ms) whose
/// answer is held closes its connection when its bound passes. Handed back to sqlx's pool, the
/// connection would be pinged on release with no bound, and the partition would keep the pool's
/// one slot for as long as the kernel keeps the socket.
#[tokio::test]
async fn a_query_outside_a_transaction_past_its_bound_closes_its_connection() {
    let pair = ReplicaPair::shared();
    let replica_url = pair.replica.url("postgres");
    let proxy = FaultProxy::start(&upstream_of(&replica_url)).await;
    let mut options = ConnectOptions::new(proxy.url(&replica_url));
    options
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    let db = Database::connect(options)
        .await
        .expect("connects through the proxy");
    let replica = Replica::new(db, CONTROL_BOUND, Duration::from_millis(100));

    proxy.hold_next(Hold::Statement("pg_last_wal_replay_lsn"));
    let state = replica.check().await;
    assert!(proxy.held(), "the proxy held a check's query");
    assert!(!state.up, "a check without an answer is not up");
    assert!(
        proxy.held_connection_closed(MARGIN).await,
        "the connection of the query past its bound was closed, not handed back"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !replica.check().await.up {
        assert!(
            Instant::now() < deadline,
            "a pool of one serves the next check on a new connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
