//! The service behind a real PgBouncer in `pool_mode = transaction` (`DB_POOLER=transaction`,
//! `docs/scale-out.md`): the API, the transaction rules and settings, serverless mode, several
//! instances sharing one pooler, and what must refuse to run through it.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::pgbouncer;
use crate::support::process::{Binary, free_port, run_binary};
use crate::support::{
    TestApp, TestDatabase, assert_pool_timeout, assert_unavailable, problem, test_settings,
};
use crate::transactions::{
    CONFLICTING, create_test_tables, forty_conflicting_increments_end_exact, routes,
};

async fn pooled_app_with_test_routes(overrides: &[(&str, &str)]) -> TestApp {
    let app = TestApp::builder()
        .pooled()
        .env(overrides)
        .routes(routes)
        .spawn()
        .await;
    create_test_tables(&app).await;
    app
}

#[tokio::test]
async fn the_api_works_behind_pgbouncer_as_debian_ships_it() {
    let app = TestApp::builder().pooled().spawn().await;

    let ready = app.get("/health/ready").await;
    assert_eq!(
        ready.status(),
        200,
        "the readiness check runs through the pooler"
    );
    let a = app.warehouse("A").await;
    let b = app.warehouse("B").await;
    let p = app.product("SKU-1").await;
    app.receive(a, p, 10).await;
    let transfer = app
        .post(
            "/transfers",
            &json!({"from_warehouse_id": a, "to_warehouse_id": b, "product_id": p, "quantity": 3}),
        )
        .await;
    assert_eq!(transfer.status(), 201);
    let shipment = app
        .post(
            "/shipments",
            &json!({"warehouse_id": b, "product_id": p, "quantity": 5}),
        )
        .await;
    let (status, body) = problem(shipment).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("insufficient_stock"))
    );
    let stock: Value = app
        .get(&format!("/products/{p}/stock"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(stock["total"], 10);
    assert_eq!(app.stock(a, p).await, 7);
    assert_eq!(app.stock(b, p).await, 3);
    let movements: Value = app.get("/movements").await.json().await.expect("json");
    assert_eq!(movements["items"].as_array().map(Vec::len), Some(2));
    app.assert_invariant().await;
}

/// The queries PgBouncer has passed on for `database` so far (`SHOW STATS`, `total_query_count`):
/// each request-reply cycle on a server connection.
fn queries_of(database: &str) -> u64 {
    let rows = pgbouncer::shared().show("STATS");
    let row = rows
        .iter()
        .find(|row| row.split('|').next() == Some(database))
        .unwrap_or_else(|| panic!("no STATS row for {database}: {rows:?}"));
    row.split('|')
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("total_query_count in {row}"))
}

/// A transfer's round trips, as PgBouncer counts them: the `BEGIN` message (which also reads
/// what a lost `COMMIT` reply needs), each of its four statements (unnamed behind the pooler:
/// a prepare and an execute), `COMMIT`, and the pool's release `Sync`. Nothing more: the layer
/// asks nothing of its own before `COMMIT` (docs/benchmarks.md, the control sends the same).
#[tokio::test]
async fn behind_pgbouncer_a_transfer_costs_its_begin_its_statements_its_commit_and_nothing_else() {
    let app = TestApp::builder().pooled().spawn().await;
    let (a, b, p) = (
        app.warehouse("A").await,
        app.warehouse("B").await,
        app.product("SKU-1").await,
    );
    app.receive(a, p, 10).await;
    let transfer =
        json!({"from_warehouse_id": a, "to_warehouse_id": b, "product_id": p, "quantity": 1});
    // The first transfer creates the destination's stock row; the one measured finds both.
    assert_eq!(app.post("/transfers", &transfer).await.status(), 201);
    let database = app.database_name();
    let before = queries_of(&database);
    assert_eq!(app.post("/transfers", &transfer).await.status(), 201);
    let after = queries_of(&database);
    assert_eq!(
        after - before,
        1 + 4 * 2 + 1 + 1,
        "BEGIN, four statements prepared and executed, COMMIT, the release Sync"
    );
}

/// PgBouncer has [`pgbouncer::SERVER_POOL_SIZE`] (3) server connections for the database; the
/// app's own pool has one connection per request of the burst, so every request gets a client
/// connection at once and the wait is PgBouncer's queue, at `BEGIN`. Each transaction holds
/// its server connection for 500 ms, so the last of 30 waits about 5 s for it: five times
/// `DB_CONNECT_TIMEOUT`, well within `DB_POOL_TIMEOUT`.
#[tokio::test]
async fn behind_pgbouncer_a_burst_larger_than_its_pool_waits_at_begin_as_for_a_pool_connection() {
    let app = pooled_app_with_test_routes(&[
        ("DB_CONNECT_TIMEOUT", "1"),
        ("DB_POOL_TIMEOUT", "10"),
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "28"),
    ])
    .await;
    let burst = join_all((0..30).map(|_| async {
        let started = Instant::now();
        let res = app.send_json("/test/hold/500", json!({})).await;
        (res, started.elapsed())
    }))
    .await;
    let (mut served, mut waited_past_connect_timeout) = (0_i64, 0);
    for (res, took) in burst {
        if res.status() == 200 {
            served += 1;
            if took > Duration::from_secs(2) {
                waited_past_connect_timeout += 1;
            }
        } else {
            assert_pool_timeout(res, "a wait in PgBouncer's queue is a pool wait").await;
        }
    }
    assert!(
        waited_past_connect_timeout >= 5,
        "{waited_past_connect_timeout} requests waited for a server connection longer than \
         DB_CONNECT_TIMEOUT and were served"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM warehouse").await,
        served,
        "one row per request answered 200, none of the others"
    );
}

/// PgBouncer still logs clients in (or holds their login) and holds their queries while its
/// server is gone: the availability probe's `SELECT 1` gets no answer and nothing of the pool
/// begins, so the request is answered 503 `database_unavailable` soon after
/// `DB_CONNECT_TIMEOUT`, not after `DB_POOL_TIMEOUT`.
#[tokio::test]
async fn behind_pgbouncer_whose_server_is_gone_requests_fail_fast_as_database_unavailable() {
    let app = TestApp::builder()
        .pooled()
        .env(&[("DB_CONNECT_TIMEOUT", "1"), ("DB_POOL_TIMEOUT", "10")])
        .spawn()
        .await;
    let bouncer = pgbouncer::shared();
    let database = app.database_name();
    let w = app.warehouse("W").await;
    let p = app.product("P").await;
    let receipt = json!({"warehouse_id": w, "product_id": p, "quantity": 1});

    bouncer.forward(&database, Some(free_port()));
    for i in 0..3 {
        let started = Instant::now();
        let res = app.post("/receipts", &receipt).await;
        let took = started.elapsed();
        assert_unavailable(res, &format!("receipt {i} with PgBouncer's server gone")).await;
        assert!(
            took < Duration::from_secs(4),
            "receipt {i} took {took:?}: the outage must not wait for DB_POOL_TIMEOUT"
        );
    }

    // Back: PgBouncer reconnects within its `server_login_retry` (15 s); the app notices alone.
    bouncer.forward(&database, None);
    let deadline = Instant::now() + Duration::from_secs(40);
    while app.post("/receipts", &receipt).await.status() != 201 {
        assert!(
            Instant::now() < deadline,
            "receipts did not succeed again:\n{}",
            bouncer.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.stock(w, p).await,
        1,
        "only the receipt answered 201 is stored"
    );
}

#[tokio::test]
async fn without_db_pooler_pgbouncer_refuses_the_connection_and_the_error_says_what_to_set() {
    let database = TestDatabase::create().await;
    let settings = test_settings(
        &pgbouncer::shared().url(&database.name),
        &[("DB_AUTO_MIGRATE", "false")],
    );
    let err = match sea_orm_actix_tx::db::connect(&settings.database).await {
        Ok(_) => panic!("PgBouncer 1.18 accepts no `options` startup parameter"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("unsupported startup parameter"), "{err}");
    assert!(err.contains("DB_POOLER=transaction"), "{err}");
}

#[tokio::test]
async fn every_transaction_behind_pgbouncer_carries_the_configured_isolation_jit_and_timeout() {
    let app = pooled_app_with_test_routes(&[
        ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ("DB_APPLICATION_NAME", "pooled-settings"),
    ])
    .await;
    // More concurrent requests than PgBouncer has server connections, so that transactions land
    // on server connections other requests used before: nothing may depend on session state.
    let reads = join_all((0..24).map(|_| app.get("/test/settings"))).await;
    for res in reads {
        assert_eq!(res.status(), 200);
        let settings: Value = res.json().await.expect("json");
        assert_eq!(
            settings["transaction_isolation"], "repeatable read",
            "{settings}"
        );
        assert_eq!(settings["transaction_read_only"], "on", "{settings}");
        assert_eq!(settings["jit"], "off", "{settings}");
        assert_eq!(settings["statement_timeout"], "1500ms", "{settings}");
        assert_eq!(
            settings["application_name"], "pooled-settings",
            "{settings}"
        );
    }
    let write: Value = app
        .send_json("/test/settings", json!({}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(write["transaction_isolation"], "repeatable read");
    assert_eq!(write["transaction_read_only"], "off");
    let declared: Value = app
        .send_json("/test/read-committed", json!({}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        declared["transaction_isolation"], "read committed",
        "a route's own level travels in its BEGIN"
    );
}

#[tokio::test]
async fn behind_pgbouncer_the_statement_timeout_cancels_a_slow_statement_and_rolls_back() {
    let app = pooled_app_with_test_routes(&[("DB_STATEMENT_TIMEOUT_MS", "100")]).await;
    let res = app.send_json("/test/hold/400", json!({})).await;
    crate::support::assert_statement_timeout(res, "pg_sleep(0.4) is cancelled at 100 ms").await;
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
    let quick = app.send_json("/test/hold/10", json!({})).await;
    assert_eq!(quick.status(), 200, "a statement under the timeout runs");
}

#[tokio::test]
async fn behind_pgbouncer_a_swallowed_statement_error_never_yields_2xx() {
    let app = pooled_app_with_test_routes(&[]).await;
    let (status, body) = problem(app.send_json("/test/swallow", json!({})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_exists"))
    );
    let (status, _) = problem(app.send_json("/test/deferred", json!({})).await).await;
    assert_eq!(status, 409, "a failing COMMIT replaces the success");
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
    assert_eq!(app.scalar("SELECT count(*) FROM deferred_unique").await, 0);
}

#[tokio::test]
async fn behind_pgbouncer_real_serialization_failures_are_retried_to_an_exact_count() {
    let app = pooled_app_with_test_routes(CONFLICTING).await;
    forty_conflicting_increments_end_exact(&app).await;
}

#[tokio::test]
async fn serverless_behind_pgbouncer_keeps_no_client_connection_between_requests() {
    let bouncer = pgbouncer::shared();
    let app = TestApp::builder()
        .pooled()
        .env(&[("DB_POOL_MODE", "serverless")])
        .spawn()
        .await;
    let name = app.database_name();
    let warehouses = join_all(
        (0..6).map(|i| app.send_json("/warehouses", json!({"code": format!("W{i}"), "name": "w"}))),
    )
    .await;
    assert!(warehouses.iter().all(|r| r.status() == 201));
    app.wait_until("PgBouncer holds no client of this app", || {
        let clients = bouncer.clients_of(&name);
        async move { clients == 0 }
    })
    .await;

    // The same app in queue mode keeps its pool's minimum open: the check above can fail.
    let queued = TestApp::builder()
        .pooled()
        .env(&[("DB_POOL_SIZE", "2")])
        .spawn()
        .await;
    let queued_name = queued.database_name();
    queued
        .wait_until("a queue-mode pool keeps its minimum", || {
            let clients = bouncer.clients_of(&queued_name);
            async move { clients >= 2 }
        })
        .await;
}

/// Four real binaries, one PgBouncer, one database: 400 concurrent movements, a third of them on
/// one hot stock row.
#[tokio::test]
async fn four_instances_behind_one_pgbouncer_keep_the_invariant_under_400_concurrent_movements() {
    let database = TestDatabase::create().await;
    let direct = database.connect().await;
    app::startup::migrate(&direct)
        .await
        .expect("migrations apply");
    let url = pgbouncer::shared().url(&database.name);
    let dir = std::env::temp_dir();
    let instances: Vec<Binary> = (0..4)
        .map(|_| {
            Binary::start(
                &dir,
                &[
                    ("DATABASE_URL", &url),
                    ("DB_POOLER", "transaction"),
                    ("DB_POOL_SIZE", "2"),
                    ("DB_MAX_OVERFLOW", "6"),
                    ("DB_POOL_TIMEOUT", "30"),
                    ("DB_TX_MAX_RETRIES", "10"),
                    ("APP_WORKERS", "1"),
                ],
            )
        })
        .collect();
    let bases: Vec<String> = instances.iter().map(Binary::base).collect();
    let client = reqwest::Client::new();
    let post = |i: usize, path: &'static str, body: Value| {
        let request = client
            .post(format!("{}{path}", bases[i % bases.len()]))
            .json(&body);
        async move { request.send().await.expect("request sent") }
    };
    let created = |res: reqwest::Response| async move {
        assert_eq!(res.status(), 201);
        res.json::<Value>().await.expect("json")["id"]
            .as_i64()
            .expect("id")
    };
    let mut w = Vec::new();
    for (i, code) in ["HOT", "W2", "W3"].into_iter().enumerate() {
        w.push(created(post(i, "/warehouses", json!({"code": code, "name": code})).await).await);
    }
    let mut p = Vec::new();
    for (i, sku) in ["P1", "P2"].into_iter().enumerate() {
        p.push(created(post(i, "/products", json!({"sku": sku, "name": sku})).await).await);
    }
    for (i, (wh, pr)) in [(w[0], p[0]), (w[1], p[0]), (w[2], p[1]), (w[0], p[1])]
        .into_iter()
        .enumerate()
    {
        let body = json!({"warehouse_id": wh, "product_id": pr, "quantity": 60});
        assert_eq!(post(i, "/receipts", body).await.status(), 201);
    }
    let seeded: i64 = 4;

    let requests = (0..400).map(|i| {
        let (path, body) = match i % 6 {
            // The hot row (HOT, P1): shipments and transfers out, both ways.
            0 => ("/shipments", json!({"warehouse_id": w[0], "product_id": p[0], "quantity": 2})),
            1 => (
                "/transfers",
                json!({"from_warehouse_id": w[0], "to_warehouse_id": w[1], "product_id": p[0], "quantity": 1}),
            ),
            2 => (
                "/transfers",
                json!({"from_warehouse_id": w[1], "to_warehouse_id": w[0], "product_id": p[0], "quantity": 1}),
            ),
            3 => ("/receipts", json!({"warehouse_id": w[2], "product_id": p[0], "quantity": 1})),
            4 => (
                "/transfers",
                json!({"from_warehouse_id": w[2], "to_warehouse_id": w[0], "product_id": p[1], "quantity": 3}),
            ),
            _ => ("/shipments", json!({"warehouse_id": w[0], "product_id": p[1], "quantity": 1})),
        };
        post(i, path, body)
    });
    let statuses: Vec<u16> = join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let unexpected: Vec<&u16> = statuses
        .iter()
        .filter(|s| **s != 201 && **s != 409)
        .collect();
    assert!(
        unexpected.is_empty(),
        "only 201 and 409 expected: {unexpected:?}"
    );
    let committed = statuses.iter().filter(|s| **s == 201).count() as i64;
    assert!(committed > 200, "most movements succeed: {committed}");

    let check = TestApp::observer(direct);
    assert_eq!(
        check.scalar("SELECT count(*) FROM movement").await,
        seeded + committed,
        "one movement row per 201"
    );
    check.assert_invariant().await;
    for instance in instances {
        let (status, binary) = instance.stop(Duration::from_secs(30)).await;
        assert!(status.success(), "{}", binary.output());
    }
}

#[tokio::test]
async fn what_cannot_work_behind_the_pooler_is_refused_with_one_line() {
    let url = "postgres://postgres@127.0.0.1:6432/inventory";
    // (arguments, variables besides DATABASE_URL, exit code, what the one line says)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], i32, &'a str);
    let cases: &[Case] = &[
        (
            &["check-config"],
            &[("DB_POOLER", "transaction"), ("DB_STATEMENT_CACHE", "100")],
            2,
            "DB_STATEMENT_CACHE",
        ),
        (
            &["check-config"],
            &[("DB_POOLER", "transaction"), ("DB_AUTO_MIGRATE", "true")],
            2,
            "direct database URL",
        ),
        (
            &["migrate", "up"],
            &[("DB_POOLER", "transaction")],
            2,
            "direct URL",
        ),
    ];
    for (args, vars, code, says) in cases {
        let mut all = vec![("DATABASE_URL", url)];
        all.extend_from_slice(vars);
        let output = run_binary(args, &all);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(*code),
            "{args:?} {vars:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(says), "{args:?} {vars:?}: {stderr}");
    }
    // The migration crate's CLI, as `sea-orm-cli migrate up` runs it from the repository root.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let output = std::process::Command::new("sea-orm-cli")
        .args(["migrate", "up"])
        .current_dir(root)
        .env("DATABASE_URL", url)
        .env("DB_POOLER", "transaction")
        // The workspace's own target directory, as in cli.rs: what the workspace built is reused.
        .env("CARGO_TARGET_DIR", root.join("target"))
        .output()
        .expect("sea-orm-cli is installed (scripts/test installs it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot run through a transaction-mode pooler"),
        "{stderr}"
    );

    let output = run_binary(
        &["check-config"],
        &[("DATABASE_URL", url), ("DB_POOLER", "transaction")],
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0));
    for line in [
        "DB_POOLER=transaction",
        "DB_STATEMENT_CACHE=0",
        "DB_AUTO_MIGRATE=false",
    ] {
        assert!(report.lines().any(|l| l == line), "{line} in\n{report}");
    }
}
