//! The command line as a user runs it: `sea-orm-cli migrate` from the repository root (on
//! PostgreSQL and MariaDB), the binary on the embedded SQLite default with no configuration at
//! all, and the binary on MariaDB.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::support::process::{Binary, free_port, run_binary};
use crate::support::{Server, TestDatabase};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn sea_orm_cli(args: &[&str], database_url: &str) {
    // The workspace's own target directory (cargo test has released its lock once the tests
    // run): the dependencies whose features match the workspace build are reused, instead of
    // building all of them again in a directory of their own.
    let target = repo_root().join("target");
    let output = Command::new("sea-orm-cli")
        .args(args)
        .current_dir(repo_root())
        .env("DATABASE_URL", database_url)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("sea-orm-cli is installed (.ci/run installs it: cargo install sea-orm-cli@2.0.4)");
    assert!(
        output.status.success(),
        "sea-orm-cli {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn sea_orm_cli_migrate_up_creates_the_tables_and_down_removes_them() {
    sea_orm_cli_migrates_up_and_down(Server::Postgres).await;
}

#[tokio::test]
async fn sea_orm_cli_migrate_up_and_down_work_on_mariadb() {
    sea_orm_cli_migrates_up_and_down(Server::Mariadb).await;
}

async fn sea_orm_cli_migrates_up_and_down(server: Server) {
    let database = TestDatabase::create_on(server).await;
    let db = database.connect().await;
    let schema = match server {
        Server::Postgres => "'public'",
        Server::Mariadb => "DATABASE()",
    };
    let app_tables = format!(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = {schema} \
         AND table_name IN ('warehouse', 'product', 'stock_level', 'movement', \
         'idempotency_key')"
    );
    let app_tables = app_tables.as_str();
    let count = |db: &sea_orm::DatabaseConnection| {
        let db = db.clone();
        async move {
            use sea_orm::ConnectionTrait;
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                app_tables,
            ))
            .await
            .expect("query")
            .expect("row")
            .try_get_by_index::<i64>(0)
            .expect("count")
        }
    };
    assert_eq!(count(&db).await, 0);
    sea_orm_cli(&["migrate", "up"], &database.url);
    assert_eq!(count(&db).await, 5);
    // `down` undoes one migration at a time, the newest first: the scope of idempotency_key,
    // then the table, then the inventory's.
    sea_orm_cli(&["migrate", "down"], &database.url);
    assert_eq!(count(&db).await, 5, "idempotency_key unscoped, still there");
    sea_orm_cli(&["migrate", "down"], &database.url);
    assert_eq!(count(&db).await, 4, "idempotency_key dropped");
    sea_orm_cli(&["migrate", "down"], &database.url);
    assert_eq!(count(&db).await, 0);
}

#[tokio::test]
async fn with_no_configuration_the_binary_serves_from_an_embedded_sqlite_file() {
    let dir = std::env::temp_dir().join(format!("inventory-sqlite-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let binary = Binary::start(&dir, &[]);
    let base = binary.base();
    let client = reqwest::Client::new();

    let ready: Value = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ok", "{ready}");
    assert_eq!(ready["database"]["backend"], "sqlite");

    let res = client
        .post(format!("{base}/products"))
        .json(&json!({"sku": "lite-1", "name": "Lite"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let fetched: Value = client
        .get(format!("{base}/products/{}", created["id"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, created);
    let w: Value = client
        .post(format!("{base}/warehouses"))
        .json(&json!({"code": "L", "name": "Lite"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let receipt = client
        .post(format!("{base}/receipts"))
        .json(&json!({"warehouse_id": w["id"], "product_id": created["id"], "quantity": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(receipt.status(), 201);
    let over = client
        .post(format!("{base}/shipments"))
        .json(&json!({"warehouse_id": w["id"], "product_id": created["id"], "quantity": 6}))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 409);

    assert!(
        dir.join("inventory.db").exists(),
        "the database file is created in the working directory"
    );
    drop(binary);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn with_a_mariadb_url_the_binary_migrates_serves_the_api_and_pings() {
    let database = TestDatabase::create_on(Server::Mariadb).await;
    // A directory of its own, so that no stray `.env` is read.
    let dir = std::env::temp_dir().join(format!("inventory-mariadb-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let vars = [
        ("DATABASE_URL", database.url.as_str()),
        ("DB_AUTO_MIGRATE", "true"),
    ];
    let binary = Binary::start(&dir, &vars);
    let base = binary.base();
    let client = reqwest::Client::new();
    let send = |req: reqwest::RequestBuilder| async move {
        let res = req.send().await.expect("request sent");
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        (status, body)
    };

    let (status, ready) = send(client.get(format!("{base}/health/ready"))).await;
    assert_eq!(
        (status, &ready["database"]["backend"]),
        (200, &json!("mysql")),
        "{ready}"
    );

    let (status, product) = send(
        client
            .post(format!("{base}/products"))
            .json(&json!({"sku": "maria-1", "name": "Ärger 🚚"})),
    )
    .await;
    assert_eq!(status, 201, "{product}");
    let (_, fetched) = send(client.get(format!("{base}/products/{}", product["id"]))).await;
    assert_eq!(fetched, product, "the stored row reads back as created");
    let (status, _) = send(
        client
            .post(format!("{base}/products"))
            .json(&json!({"sku": "maria-1", "name": "again"})),
    )
    .await;
    assert_eq!(status, 409);
    let mut warehouses = Vec::new();
    for code in ["M1", "M2"] {
        let (status, w) = send(
            client
                .post(format!("{base}/warehouses"))
                .json(&json!({"code": code, "name": code})),
        )
        .await;
        assert_eq!(status, 201, "{w}");
        warehouses.push(w["id"].clone());
    }
    let (a, b, p) = (&warehouses[0], &warehouses[1], &product["id"]);
    let movements = [
        (
            "/receipts",
            json!({"warehouse_id": a, "product_id": p, "quantity": 5}),
            201,
        ),
        (
            "/shipments",
            json!({"warehouse_id": a, "product_id": p, "quantity": 6}),
            409,
        ),
        (
            "/transfers",
            json!({"from_warehouse_id": a, "to_warehouse_id": b, "product_id": p, "quantity": 2}),
            201,
        ),
        (
            "/transfers",
            json!({"from_warehouse_id": a, "to_warehouse_id": 999, "product_id": p, "quantity": 1}),
            404,
        ),
        (
            "/shipments",
            json!({"warehouse_id": b, "product_id": p, "quantity": 2}),
            201,
        ),
    ];
    for (path, body, expected) in movements {
        let (status, answer) = send(client.post(format!("{base}{path}")).json(&body)).await;
        assert_eq!(status, expected, "{path} {body}: {answer}");
    }
    let (_, stock) = send(client.get(format!("{base}/products/{p}/stock"))).await;
    assert_eq!(stock["total"], 3, "{stock}");
    let (_, moves) = send(client.get(format!("{base}/movements?product_id={p}"))).await;
    assert_eq!(moves["items"].as_array().map(Vec::len), Some(3), "{moves}");
    let (status, _) = send(client.get(format!("{base}/openapi.json"))).await;
    assert_eq!(status, 200);
    drop(binary);

    let ping = run_binary(&["ping"], &vars);
    let stdout = String::from_utf8_lossy(&ping.stdout);
    assert_eq!(ping.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("mysql"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_setting_exits_2_with_one_line_naming_the_variable() {
    let output = run_binary(&["check-config"], &[("DB_POOL_SIZE", "zero")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("DB_POOL_SIZE") && stderr.contains("zero"),
        "{stderr}"
    );
}

#[test]
fn check_config_shows_the_effective_settings_with_the_password_hidden() {
    let output = run_binary(
        &["check-config"],
        &[(
            "DATABASE_URL",
            "postgresql+asyncpg://svc:hunter2-secret@db.internal:5432/inv",
        )],
    );
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("hunter2-secret"), "{stdout}");
    assert!(
        stdout.contains("***") && stdout.contains("DB_POOL_SIZE=10"),
        "{stdout}"
    );
}

#[test]
fn libpq_variables_change_neither_the_report_nor_the_connection() {
    // The harness's server (scripts/test starts it on 127.0.0.1:5432), by a URL that leaves
    // the port, the user and TLS to the defaults; every PG* variable points elsewhere.
    let settings = [
        ("DATABASE_URL", "postgres://127.0.0.1/postgres"),
        ("PGHOST", "nowhere.invalid"),
        ("PGHOSTADDR", "192.0.2.1"),
        ("PGPORT", "1"),
        ("PGUSER", "nobody"),
        ("PGPASSWORD", "wrong"),
        ("PGDATABASE", "nowhere"),
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", "/nonexistent/ca.pem"),
        ("PGAPPNAME", "psql"),
        ("PGOPTIONS", "-c no_such_setting=1"),
    ];
    let output = run_binary(&["check-config"], &settings);
    assert_eq!(output.status.code(), Some(0));
    let report = String::from_utf8_lossy(&output.stdout);
    for line in [
        "DB_HOST=127.0.0.1",
        "DB_PORT=5432",
        "DB_USER=postgres",
        "DB_PASSWORD=",
        "DB_NAME=postgres",
        "DB_APPLICATION_NAME=inventory-api",
        "DB_SSL_MODE=prefer",
        "DB_SSL_ROOT_CERT=",
    ] {
        assert!(report.lines().any(|l| l == line), "{line} in:\n{report}");
    }
    let output = run_binary(&["ping"], &settings);
    assert_eq!(
        output.status.code(),
        Some(0),
        "the settings reported are the ones used:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn an_invalid_rust_log_is_bad_configuration_exit_2_naming_it() {
    for command in ["check-config", "serve", "ping"] {
        let output = run_binary(&[command], &[("RUST_LOG", "nonsense::[")]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{command}: {stderr}");
        assert!(
            stderr.contains("RUST_LOG") && stderr.contains("nonsense::["),
            "{command}: {stderr}"
        );
    }
}

/// `app ping` against a port where nothing listens: a failure at run time, exit 1.
fn ping_nothing(format: &str) -> std::process::Output {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    run_binary(
        &["ping"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("DB_CONNECT_TIMEOUT", "2"),
            ("LOG_FORMAT", format),
        ],
    )
}

#[test]
fn a_fatal_error_in_pretty_format_is_one_line_on_stderr_and_not_logged_again() {
    let output = ping_nothing("pretty");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: could not connect"), "{stderr}");
    assert!(
        !stdout.lines().any(|l| l.contains("ERROR")),
        "no second copy in the log:\n{stdout}"
    );
}

#[test]
fn a_fatal_error_in_json_format_is_one_json_event_and_nothing_on_stderr() {
    let output = ping_nothing("json");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert_eq!(stderr.trim(), "", "no plain copy on stderr");
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let errors: Vec<&Value> = events.iter().filter(|e| e["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 1, "{stdout}");
    let message = errors[0]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("could not connect"), "{stdout}");
    assert_eq!(errors[0]["exit_code"], 1, "{stdout}");
}
