//! What an operator relies on: a tiny pool that runs dry, a database that goes away and comes
//! back, SIGTERM, the request log, start-up retries and `app ping`. These run the real binary
//! or a PostgreSQL server of the test's own where the behaviour needs one.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::support::process::{Binary, OwnServer, free_port, run_binary};
use crate::support::{TestApp, TestDatabase, assert_unavailable, problem};

/// Rows of the app's sessions waiting for a lock, seen from `db`.
async fn sessions_waiting_for_a_lock(db: &DatabaseConnection) -> i64 {
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock'",
    ))
    .await
    .ok()
    .flatten()
    .and_then(|row| row.try_get_by_index::<i64>(0).ok())
    .unwrap_or(0)
}

/// Locks the stock row of (`warehouse`, `product`) in a transaction of the test's own, so that a
/// request touching it holds its pooled connection until the returned transaction ends.
async fn lock_stock_row(
    db: &DatabaseConnection,
    warehouse: i64,
    product: i64,
) -> sea_orm::DatabaseTransaction {
    let lock = db.begin().await.expect("begin");
    lock.execute_unprepared(&format!(
        "SELECT 1 FROM stock_level WHERE warehouse_id = {warehouse} AND product_id = {product} FOR UPDATE"
    ))
    .await
    .expect("row locked");
    lock
}

/// Makes a receipt hold the app's only pooled connection: it waits for a stock row that a
/// transaction of the test's own has locked. Returns that lock and the receipt's status.
async fn hold_the_only_connection(
    app: &TestApp,
) -> (
    sea_orm::DatabaseTransaction,
    tokio::task::JoinHandle<reqwest::Result<u16>>,
    (i64, i64),
) {
    let (w, p) = (app.warehouse("A").await, app.product("P").await);
    app.receive(w, p, 10).await;
    let lock = lock_stock_row(&app.db, w, p).await;
    let held = {
        let (client, url) = (app.client.clone(), app.url("/receipts"));
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"warehouse_id": w, "product_id": p, "quantity": 5}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    app.wait_until("the receipt holds its connection", || async {
        sessions_waiting_for_a_lock(&app.db).await == 1
    })
    .await;
    (lock, held, (w, p))
}

#[tokio::test]
async fn an_exhausted_pool_answers_503_pool_timeout_after_about_the_pool_timeout_and_recovers() {
    let app = TestApp::builder()
        .env(&[
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_POOL_TIMEOUT", "1"),
        ])
        .spawn()
        .await;
    let (lock, held, (w, p)) = hold_the_only_connection(&app).await;

    let started = Instant::now();
    let res = app.get(&format!("/products/{p}")).await;
    let waited = started.elapsed();
    assert_eq!(res.headers()["retry-after"], "1");
    let (status, body) = problem(res).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("pool_timeout")));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered after {waited:?}; DB_POOL_TIMEOUT is 1 s"
    );

    lock.commit().await.expect("lock released");
    assert_eq!(held.await.expect("joined").expect("answered"), 201);
    let res = app.get(&format!("/products/{p}")).await;
    assert_eq!(res.status(), 200, "the pool serves again once freed");
    assert_eq!(app.get("/health/ready").await.status(), 200);
    assert_eq!(app.stock(w, p).await, 15);
}

#[tokio::test]
async fn readiness_answers_503_within_2_s_when_the_pool_is_exhausted_whatever_the_pool_timeout() {
    let app = TestApp::builder()
        .env(&[
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_POOL_TIMEOUT", "30"),
        ])
        .spawn()
        .await;
    let (lock, held, _) = hold_the_only_connection(&app).await;
    let started = Instant::now();
    let ready = app.get("/health/ready").await;
    let waited = started.elapsed();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.headers()["retry-after"], "1");
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["database"]["pool"]["in_use"], 1, "{body}");
    assert!(waited < Duration::from_secs(2), "answered after {waited:?}");
    lock.commit().await.expect("lock released");
    assert_eq!(held.await.expect("joined").expect("answered"), 201);
    assert_eq!(app.get("/health/ready").await.status(), 200);
}

/// What the load saw during the outage.
#[derive(Default)]
struct Seen {
    /// Movement ids of every 201.
    committed: Vec<i64>,
    /// `code` of every 503.
    unavailable: Vec<String>,
    /// Anything else that was not 201: (status, body).
    other: Vec<(u16, Value)>,
}

async fn keep_moving(
    app: Arc<TestApp>,
    products: [i64; 2],
    warehouses: [i64; 2],
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let product = products[n % 2];
        let (path, body) = match n % 3 {
            0 => (
                "/receipts",
                json!({"warehouse_id": warehouses[0], "product_id": product, "quantity": 1}),
            ),
            1 => (
                "/shipments",
                json!({"warehouse_id": warehouses[1], "product_id": product, "quantity": 1}),
            ),
            _ => (
                "/transfers",
                json!({"from_warehouse_id": warehouses[0], "to_warehouse_id": warehouses[1], "product_id": product, "quantity": 1}),
            ),
        };
        let Ok(res) = app.client.post(app.url(path)).json(&body).send().await else {
            continue;
        };
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let mut seen = seen.lock().await;
        match status {
            201 => seen
                .committed
                .push(body["id"].as_i64().expect("movement id")),
            503 => seen
                .unavailable
                .push(body["code"].as_str().unwrap_or_default().to_owned()),
            _ => seen.other.push((status, body)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fails_fast_and_the_app_recovers_without_restart_losing_nothing() {
    let server = OwnServer::start_with_inventory().await;
    // DB_POOL_TIMEOUT stays at its 30 s default: fast failure must not depend on it.
    let app = Arc::new(
        TestApp::builder()
            .url(&server.url("inventory"))
            .env(&[("DB_POOL_TIMEOUT", "30"), ("DB_CONNECT_TIMEOUT", "2")])
            .spawn()
            .await,
    );
    let warehouses = [app.warehouse("A").await, app.warehouse("B").await];
    let products = [app.product("P1").await, app.product("P2").await];
    for p in products {
        app.receive(warehouses[0], p, 1_000_000).await;
        app.receive(warehouses[1], p, 1_000_000).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let load: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(keep_moving(
                Arc::clone(&app),
                products,
                warehouses,
                Arc::clone(&stop),
                Arc::clone(&seen),
            ))
        })
        .collect();
    app.wait_until("the load commits", || async {
        seen.lock().await.committed.len() >= 20
    })
    .await;

    let server = Arc::new(server);
    let stopping = Arc::clone(&server);
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .expect("server stopped");

    let started = Instant::now();
    let res = app.get(&format!("/products/{}", products[0])).await;
    let waited = started.elapsed();
    assert_unavailable(res, "a read during the outage").await;
    assert!(
        waited < Duration::from_secs(3),
        "a read waited {waited:?} during the outage"
    );
    let started = Instant::now();
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(2));
    let write = app
        .post(
            "/receipts",
            &json!({"warehouse_id": warehouses[0], "product_id": products[0], "quantity": 7}),
        )
        .await;
    assert_unavailable(write, "a write during the outage").await;
    app.wait_until("the load is told 503 during the outage", || async {
        !seen.lock().await.unavailable.is_empty()
    })
    .await;

    let starting = Arc::clone(&server);
    tokio::task::spawn_blocking(move || starting.start_again())
        .await
        .expect("server restarted");
    app.wait_until("ready again without a restart", || async {
        app.get("/health/ready").await.status() == 200
    })
    .await;
    let before = seen.lock().await.committed.len();
    app.wait_until("the load commits again", || async {
        seen.lock().await.committed.len() >= before + 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }

    let seen = seen.lock().await;
    assert!(
        seen.other.is_empty(),
        "unexpected answers: {:?}",
        seen.other
    );
    assert!(
        seen.unavailable.iter().all(|c| c == "database_unavailable"),
        "503 codes: {:?}",
        seen.unavailable.iter().collect::<HashSet<_>>()
    );
    // No committed write lost, no success reported for a write that did not commit.
    let ids: Vec<String> = seen.committed.iter().map(i64::to_string).collect();
    let found = app
        .scalar(&format!(
            "SELECT count(*) FROM movement WHERE id IN ({})",
            ids.join(",")
        ))
        .await;
    assert_eq!(
        found as usize,
        seen.committed.len(),
        "a 201 whose movement is missing"
    );
    // A commit cut off by the shutdown may have landed without its answer: at most one per 503.
    let rows = app.scalar("SELECT count(*) FROM movement").await as usize - 4;
    assert!(
        rows >= seen.committed.len() && rows <= seen.committed.len() + seen.unavailable.len(),
        "{rows} movements for {} answers 201",
        seen.committed.len()
    );
    app.assert_invariant().await;
    app.receive(warehouses[0], products[0], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_lets_the_in_flight_request_commit_and_exits_0() {
    let database = TestDatabase::create().await;
    let dir = std::env::temp_dir();
    let binary = Binary::start(
        &dir,
        &[
            ("DATABASE_URL", database.url.as_str()),
            ("DB_AUTO_MIGRATE", "true"),
            ("APP_SHUTDOWN_TIMEOUT", "30"),
        ],
    );
    let (client, base) = (reqwest::Client::new(), binary.base());
    let create = |path: &'static str, body: Value| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let res = client
                .post(format!("{base}{path}"))
                .json(&body)
                .send()
                .await
                .expect("sent");
            assert_eq!(res.status(), 201, "{path}");
            res.json::<Value>().await.expect("json")["id"]
                .as_i64()
                .expect("id")
        }
    };
    let w = create("/warehouses", json!({"code": "W", "name": "W"})).await;
    let p = create("/products", json!({"sku": "P", "name": "P"})).await;
    create(
        "/receipts",
        json!({"warehouse_id": w, "product_id": p, "quantity": 10}),
    )
    .await;

    let db = database.connect().await;
    let lock = lock_stock_row(&db, w, p).await;
    let in_flight = tokio::spawn(create(
        "/receipts",
        json!({"warehouse_id": w, "product_id": p, "quantity": 5}),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions_waiting_for_a_lock(&db).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the receipt never reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let port = binary.port;
    let stopped = tokio::spawn(binary.stop(Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lock.commit().await.expect("lock released");
    in_flight
        .await
        .expect("the in-flight receipt is answered 201");

    let (status, binary) = stopped.await.expect("joined");
    assert_eq!(status.code(), Some(0), "{}", binary.output());
    assert!(
        binary
            .json_lines()
            .iter()
            .any(|l| l["message"] == "server stopped; closing the pool"),
        "{}",
        binary.output()
    );
    let quantity = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT quantity::bigint FROM stock_level WHERE warehouse_id = {w} AND product_id = {p}"),
        ))
        .await
        .expect("query")
        .and_then(|r| r.try_get_by_index::<i64>(0).ok());
    assert_eq!(quantity, Some(15), "the in-flight receipt committed");
}

/// The test database's URL with a password in it (trust auth ignores it), and that password.
fn url_with_password(url: &str) -> (String, String) {
    const SECRET: &str = "Sup3r-Secret-Pw";
    let parsed = url::Url::parse(url).expect("url");
    if let Some(existing) = parsed.password() {
        return (url.to_owned(), existing.to_owned());
    }
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (user, host) = rest.split_once('@').unwrap_or(("postgres", rest));
    (
        format!("{scheme}://{user}:{SECRET}@{host}"),
        SECRET.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_with_the_request_id_statements_and_slow_statements_never_the_password()
{
    let database = TestDatabase::create().await;
    let (url, secret) = url_with_password(&database.url);
    let binary = Binary::start(
        &std::env::temp_dir(),
        &[
            ("DATABASE_URL", url.as_str()),
            ("DB_AUTO_MIGRATE", "true"),
            ("DB_ECHO", "true"),
            ("DB_SLOW_STATEMENT_MS", "100"),
            ("DB_LEAK_DETECTION_MS", "200"),
            ("RUST_LOG", "debug"),
        ],
    );
    let (client, base) = (reqwest::Client::new(), binary.base());
    let res = client
        .post(format!("{base}/warehouses"))
        .header("x-request-id", "req-create-1")
        .json(&json!({"code": "LOGS", "name": "Logs"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), 201);
    let w = res.json::<Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id");
    let res = client
        .post(format!("{base}/products"))
        .json(&json!({"sku": "LOGS", "name": "Logs"}))
        .send()
        .await
        .expect("sent");
    let p = res.json::<Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id");
    let receipt = json!({"warehouse_id": w, "product_id": p, "quantity": 1});
    let res = client
        .post(format!("{base}/receipts"))
        .json(&receipt)
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), 201);

    // A statement kept waiting on a lock for longer than DB_SLOW_STATEMENT_MS.
    let db = database.connect().await;
    let lock = lock_stock_row(&db, w, p).await;
    let slow = {
        let request = client
            .post(format!("{base}/receipts"))
            .header("x-request-id", "req-slow-1")
            .json(&receipt);
        tokio::spawn(request.send())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waited_ms = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT COALESCE(max(extract(epoch FROM now() - query_start) * 1000), 0)::bigint \
                 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ))
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get_by_index::<i64>(0).ok())
            .unwrap_or(0);
        if waited_ms > 250 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the receipt never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.commit().await.expect("released");
    assert_eq!(slow.await.expect("joined").expect("answered").status(), 201);

    let (_, binary) = binary.stop(Duration::from_secs(30)).await;
    let lines = binary.stdout_lines();
    let all = binary.output();
    assert!(!all.contains(&secret), "the password appears in the output");
    let json: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();

    let of =
        |id: &str| -> Vec<&Value> { json.iter().filter(|l| l.to_string().contains(id)).collect() };
    let create = of("req-create-1");
    let request_line = create
        .iter()
        .find(|l| l["message"] == "request")
        .unwrap_or_else(|| panic!("no request line for req-create-1:\n{all}"));
    assert_eq!(request_line["method"], "POST");
    assert_eq!(request_line["route"], "/warehouses");
    assert_eq!(request_line["status"], 201);
    assert_eq!(request_line["tx"], "commit");
    assert_eq!(request_line["retries"], 0);
    assert!(request_line["latency_ms"].is_number());
    assert!(
        create.iter().any(|l| l.to_string().contains("INSERT INTO")),
        "DB_ECHO logs the request's statements with its id:\n{all}"
    );
    let slow = of("req-slow-1");
    assert!(
        slow.iter()
            .any(|l| l["level"] == "WARN" && l.to_string().contains("slow statement")),
        "the slow statement is logged at WARN with the request's id:\n{all}"
    );
    assert!(
        slow.iter().any(|l| l["level"] == "WARN"
            && l["route"] == "/receipts"
            && l.to_string()
                .contains("still open after DB_LEAK_DETECTION_MS")),
        "the transaction open past DB_LEAK_DETECTION_MS is logged at WARN with its route and \
         request id while still open:\n{all}"
    );
}

#[test]
fn start_up_retries_then_exits_non_zero_with_one_line_and_ping_reports_both_ways() {
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/nothing", free_port());
    let output = run_binary(
        &["serve"],
        &[
            ("DATABASE_URL", &unreachable),
            ("LOG_FORMAT", "json"),
            ("DB_CONNECT_RETRIES", "3"),
            ("DB_CONNECT_RETRY_DELAY_MS", "50"),
            ("DB_CONNECT_TIMEOUT", "1"),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let attempts = stdout
        .lines()
        .filter(|l| l.contains("database connection failed"))
        .count();
    assert_eq!(attempts, 3, "one log line per attempt:\n{stdout}");
    // With LOG_FORMAT=json the fatal error is one ERROR event on the log stream, not a second
    // plain line on stderr.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim(), "", "{stderr}");
    let fatal: Vec<&str> = stdout.lines().filter(|l| l.contains("\"ERROR\"")).collect();
    assert_eq!(fatal.len(), 1, "{stdout}");
    assert!(fatal[0].contains("after 3 attempt(s)"), "{stdout}");

    let output = run_binary(
        &["ping"],
        &[("DATABASE_URL", &unreachable), ("DB_CONNECT_TIMEOUT", "1")],
    );
    assert_eq!(output.status.code(), Some(1));

    let admin = crate::support::admin_url();
    let output = run_binary(&["ping"], &[("DATABASE_URL", &admin)]);
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok: postgres answered SELECT 1 in ") && l.ends_with(" ms")),
        "{stdout}"
    );
}
