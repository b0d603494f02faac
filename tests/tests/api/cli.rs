//! The command line as a user runs it: `sea-orm-cli migrate` from the repository root, and the
//! binary on the embedded SQLite default with no configuration at all.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::TestDatabase;
use crate::process::{Binary, run_binary};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn sea_orm_cli(args: &[&str], database_url: &str) {
    // A target dir of its own: the test's own cargo may still hold the main one's lock.
    let target = repo_root().join("target").join("sea-orm-cli");
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
    let database = TestDatabase::create().await;
    let db = database.connect().await;
    let app_tables = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
                      AND table_name IN ('warehouse', 'product', 'stock_level', 'movement')";
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
    assert_eq!(count(&db).await, 4);
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
