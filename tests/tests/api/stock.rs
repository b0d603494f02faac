//! Receipts, shipments, transfers: atomicity, the invariant, and concurrency. Every test runs
//! on PostgreSQL, on MariaDB, on the embedded SQLite file and on PostgreSQL behind PgBouncer
//! in transaction mode (`stock::postgres::…`, `stock::mariadb::…`, `stock::sqlite::…`,
//! `stock::pgbouncer::…`).

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::{TestApp, on_every_backend, problem};
use sea_orm::{ConnectionTrait, TransactionTrait};

on_every_backend!(
    receipts_shipments_and_transfers_move_stock_and_write_the_ledger,
    a_shipment_of_more_than_the_stock_is_409_insufficient_stock_and_changes_nothing,
    movements_naming_a_missing_warehouse_or_product_are_404,
    a_transfer_to_a_missing_warehouse_is_404_and_the_debit_is_rolled_back,
    opposite_transfers_on_the_same_rows_never_deadlock_and_stay_exact,
    concurrent_transfers_on_one_hot_row_end_in_201_or_409_and_quantities_are_exact,
    the_invariant_holds_under_a_few_hundred_concurrent_movements,
);

async fn receipts_shipments_and_transfers_move_stock_and_write_the_ledger(app: TestApp) {
    let (a, b, p) = (
        app.warehouse("A").await,
        app.warehouse("B").await,
        app.product("p").await,
    );
    app.receive(a, p, 10).await;
    // A second product whose SKU differs only in case is another product on every backend
    // (MariaDB's default collation would make them one key).
    let upper = app.product("P").await;
    assert_ne!(upper, p);
    let res = app
        .send_json(
            "/shipments",
            json!({"warehouse_id": a, "product_id": p, "quantity": 3}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let shipped: Value = res.json().await.unwrap();
    assert_eq!(shipped["kind"], "shipment");
    assert_eq!(shipped["from_warehouse_id"], a);
    assert_eq!(shipped["to_warehouse_id"], Value::Null);

    let res = app
        .send_json(
            "/transfers",
            json!({"from_warehouse_id": a, "to_warehouse_id": b, "product_id": p, "quantity": 4}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!((app.stock(a, p).await, app.stock(b, p).await), (3, 4));

    let stock: Value = app
        .get(&format!("/products/{p}/stock"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stock["total"], 7);
    assert_eq!(
        stock["items"][0],
        json!({"warehouse_id": a, "code": "A", "quantity": 3})
    );
    let wstock: Value = app
        .get(&format!("/warehouses/{b}/stock"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        wstock,
        json!({"warehouse_id": b, "items": [{"product_id": p, "sku": "p", "quantity": 4}]})
    );

    let moves: Value = app
        .get(&format!("/movements?warehouse_id={b}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        moves["items"].as_array().unwrap().len(),
        1,
        "only the transfer touches B"
    );
    let moves: Value = app
        .get(&format!("/movements?product_id={p}&limit=500"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(moves["items"].as_array().unwrap().len(), 3);
    app.assert_invariant().await;
}

async fn a_shipment_of_more_than_the_stock_is_409_insufficient_stock_and_changes_nothing(
    app: TestApp,
) {
    let (a, p) = (app.warehouse("A").await, app.product("p").await);
    app.receive(a, p, 5).await;
    let (status, body) = problem(
        app.send_json(
            "/shipments",
            json!({"warehouse_id": a, "product_id": p, "quantity": 6}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("insufficient_stock"))
    );
    assert_eq!(app.stock(a, p).await, 5);
    assert_eq!(app.scalar("SELECT count(*) FROM movement").await, 1);
}

async fn movements_naming_a_missing_warehouse_or_product_are_404(app: TestApp) {
    let (a, p) = (app.warehouse("A").await, app.product("p").await);
    for (path, body) in [
        (
            "/receipts",
            json!({"warehouse_id": 999, "product_id": p, "quantity": 1}),
        ),
        (
            "/receipts",
            json!({"warehouse_id": a, "product_id": 999, "quantity": 1}),
        ),
        (
            "/shipments",
            json!({"warehouse_id": 999, "product_id": p, "quantity": 1}),
        ),
        (
            "/transfers",
            json!({"from_warehouse_id": 999, "to_warehouse_id": a, "product_id": p, "quantity": 1}),
        ),
    ] {
        let (status, problem) = problem(app.post(path, &body).await).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (404, Some("not_found")),
            "{path} {body}"
        );
    }
    assert_eq!(app.scalar("SELECT count(*) FROM movement").await, 0);
}

async fn a_transfer_to_a_missing_warehouse_is_404_and_the_debit_is_rolled_back(app: TestApp) {
    let (a, p) = (app.warehouse("A").await, app.product("p").await);
    app.receive(a, p, 10).await;
    let (status, body) = problem(
        app.send_json("/transfers", json!({"from_warehouse_id": a, "to_warehouse_id": 424242, "product_id": p, "quantity": 7})).await,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    assert!(
        body["detail"].as_str().unwrap().contains("424242"),
        "{body}"
    );
    assert_eq!(
        app.stock(a, p).await,
        10,
        "the source's debit was rolled back"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM movement WHERE kind = 'transfer'")
            .await,
        0
    );
}

async fn opposite_transfers_on_the_same_rows_never_deadlock_and_stay_exact(app: TestApp) {
    let (a, b, p) = (
        app.warehouse("A").await,
        app.warehouse("B").await,
        app.product("p").await,
    );
    app.receive(a, p, 1000).await;
    app.receive(b, p, 1000).await;
    let requests = (0..200).map(|i| {
        let (from, to) = if i % 2 == 0 { (a, b) } else { (b, a) };
        app.send_json("/transfers", json!({"from_warehouse_id": from, "to_warehouse_id": to, "product_id": p, "quantity": 1}))
    });
    let statuses: Vec<u16> = join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    assert_eq!(app.stock(a, p).await + app.stock(b, p).await, 2000);
    assert_eq!(app.stock(a, p).await, 1000, "100 each way");
    if app.is_postgres() {
        let deadlocks = app
            .scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .await;
        assert_eq!(deadlocks, 0);
    }
}

async fn concurrent_transfers_on_one_hot_row_end_in_201_or_409_and_quantities_are_exact(
    app: TestApp,
) {
    let (a, b, p) = (
        app.warehouse("A").await,
        app.warehouse("B").await,
        app.product("p").await,
    );
    app.receive(a, p, 50).await;
    let requests = (0..120).map(|_| {
        app.send_json(
            "/transfers",
            json!({"from_warehouse_id": a, "to_warehouse_id": b, "product_id": p, "quantity": 1}),
        )
    });
    let statuses: Vec<u16> = join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let created = statuses.iter().filter(|s| **s == 201).count() as i64;
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
    assert_eq!(created, 50, "exactly the stock could move");
    assert_eq!((app.stock(a, p).await, app.stock(b, p).await), (0, 50));
    assert_eq!(
        app.scalar("SELECT count(*) FROM movement WHERE kind = 'transfer'")
            .await,
        created
    );
}

async fn the_invariant_holds_under_a_few_hundred_concurrent_movements(app: TestApp) {
    let mut warehouses = Vec::new();
    for c in ["W1", "W2", "W3"] {
        warehouses.push(app.warehouse(c).await);
    }
    let mut products = Vec::new();
    for s in ["x", "y"] {
        products.push(app.product(s).await);
    }
    let requests = (0..300).map(|i: usize| {
        let p = products[i % 2];
        let w = warehouses[i % 3];
        let other = warehouses[(i + 1) % 3];
        let q = (i % 5 + 1) as i64;
        match i % 3 {
            0 => app.send_json("/receipts", json!({"warehouse_id": w, "product_id": p, "quantity": q * 3})),
            1 => app.send_json("/shipments", json!({"warehouse_id": w, "product_id": p, "quantity": q})),
            _ => app.send_json("/transfers", json!({"from_warehouse_id": w, "to_warehouse_id": other, "product_id": p, "quantity": q})),
        }
    });
    let statuses: Vec<u16> = join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
    let created = statuses.iter().filter(|s| **s == 201).count() as i64;
    assert_eq!(app.scalar("SELECT count(*) FROM movement").await, created);
    app.assert_invariant().await;
}

/// Issue 11 §3: T1 transfers HOT→NEW while NEW has no stock row yet, a receipt creates that row,
/// and T2 transfers NEW→HOT. Each step waits until the previous request is blocked on a lock, so
/// the interleaving is the same every run. Locking only the rows that existed let T1's credit
/// take NEW's row out of order: a deadlock (40P01), re-run by the retry loop. Every row a transfer
/// touches must exist and be locked in one order before any change.
#[tokio::test]
async fn a_transfer_into_a_row_created_meanwhile_never_deadlocks_with_the_opposite_transfer() {
    let app = TestApp::builder()
        .env(&[
            ("DB_POOL_SIZE", "4"),
            ("DB_APPLICATION_NAME", "deadlock-test"),
        ])
        .spawn()
        .await;
    // NEW has the lower id: T2 locks it first, and T1's credit takes it last, out of order.
    let new = app.warehouse("NEW").await;
    let hot = app.warehouse("HOT").await;
    let p = app.product("P").await;
    app.receive(hot, p, 10).await;
    let retries_before = crate::transactions::metric(&app, "db_transaction_retries_total").await;

    // The test holds HOT's row, so that T1 stops at its first lock.
    let holder = app.db.begin().await.expect("begin");
    holder
        .execute_unprepared(&format!(
            "SELECT 1 FROM stock_level WHERE warehouse_id = {hot} AND product_id = {p} FOR UPDATE"
        ))
        .await
        .expect("lock HOT");
    let app = &app;
    let lock_waits = move || async move {
        app.scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'deadlock-test' AND wait_event_type = 'Lock'",
        )
        .await
    };
    let waiting = move |n: i64| async move {
        app.wait_until(
            &format!("{n} request(s) waiting on a lock"),
            move || async move { lock_waits().await >= n },
        )
        .await
    };
    // Requests that run on their own task while the test watches the locks.
    let spawn_post = |path: &str, body: Value| {
        let sent = app.client.post(app.url(path)).json(&body).send();
        tokio::spawn(async move { sent.await.map(|r| r.status().as_u16()).unwrap_or(0) })
    };
    let transfer = |from: i64, to: i64, quantity: i64| {
        spawn_post(
            "/transfers",
            json!({"from_warehouse_id": from, "to_warehouse_id": to, "product_id": p, "quantity": quantity}),
        )
    };
    let t1 = transfer(hot, new, 3);
    waiting(1).await;
    let receipt = spawn_post(
        "/receipts",
        json!({"warehouse_id": new, "product_id": p, "quantity": 5}),
    );
    // The receipt either commits at once (NEW's row did not exist) or waits for T1's row.
    let receipt_ref = &receipt;
    app.wait_until("the receipt committed or waits", move || async move {
        receipt_ref.is_finished() || lock_waits().await >= 2
    })
    .await;
    let t2 = transfer(new, hot, 2);
    waiting(if receipt.is_finished() { 2 } else { 3 }).await;
    holder.commit().await.expect("release HOT");

    let statuses = (
        t1.await.expect("t1"),
        receipt.await.expect("receipt"),
        t2.await.expect("t2"),
    );
    assert_eq!(statuses, (201, 201, 201));
    assert_eq!(
        crate::transactions::metric(app, "db_transaction_retries_total").await,
        retries_before,
        "no request was re-run: no deadlock, no serialization failure"
    );
    assert_eq!(app.stock(hot, p).await, 10 - 3 + 2);
    assert_eq!(app.stock(new, p).await, 3 + 5 - 2);
    app.assert_invariant().await;
}
