//! The to-do list over HTTP: the real server on a random port, each test on a fresh PostgreSQL
//! database (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`; created
//! here and dropped when the test ends), one on an SQLite file.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use example_todo::routes::{TodoError, insert};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use sea_orm_actix_tx::settings::Settings;
use sea_orm_actix_tx::{Layer, Tx};
use serde_json::{Value, json};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

async fn connect(url: &str) -> DatabaseConnection {
    let mut options = sea_orm::ConnectOptions::new(url.to_owned());
    options
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    Database::connect(options)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url} ({e}); is PostgreSQL running?"))
}

/// A fresh PostgreSQL database, dropped (with its connections) when this value is dropped.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> TestDatabase {
        let name = format!("todo_test_{:016x}", fastrand::u64(..));
        let admin = connect(&admin_url()).await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("CREATE DATABASE");
        let _ = admin.close().await;
        let mut url = url::Url::parse(&admin_url()).expect("TEST_DATABASE_URL is a valid URL");
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        TestDatabase { name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime, which cannot block on itself: use a thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let admin = connect(&admin_url()).await;
                let _ = admin.execute_unprepared(&sql).await;
                let _ = admin.close().await;
            });
        })
        .join();
    }
}

/// An SQLite file in the temporary directory, deleted (with its WAL) when dropped.
struct SqliteFile(std::path::PathBuf);

impl Drop for SqliteFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

struct TestApp {
    address: String,
    client: reqwest::Client,
    /// A connection of the test's own, for assertions behind the service's back.
    db: DatabaseConnection,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The database (or file), dropped after the server.
    _database: Box<dyn std::any::Any>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Routes that provoke failures on the real middleware, mounted beside the list's.
fn test_routes(cfg: &mut web::ServiceConfig, layer: &Layer) {
    cfg.route(
        "/test/swallow",
        web::post().to(swallow).wrap(layer.transactional()),
    )
    .route(
        "/test/write-then-fail",
        web::post().to(write_then_fail).wrap(layer.transactional()),
    );
}

/// Inserts the same title twice, ignores the second insert's unique violation and answers 201:
/// the layer must not commit, and answers through the service's `on_failure` mapping.
async fn swallow(tx: Tx) -> Result<HttpResponse, TodoError> {
    insert(&tx, "twice").await?;
    let _ = insert(&tx, "twice").await;
    Ok(HttpResponse::Created().finish())
}

/// Writes, then fails with the list's own error: the write must be rolled back.
async fn write_then_fail(tx: Tx) -> Result<HttpResponse, TodoError> {
    insert(&tx, "written").await?;
    Err(TodoError::InvalidTitle)
}

async fn spawn_on(url: &str, database: Box<dyn std::any::Any>) -> TestApp {
    let vars = [
        ("DATABASE_URL", url),
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "4"),
        ("DB_AUTO_MIGRATE", "true"),
        ("DB_CONNECT_RETRIES", "1"),
        ("APP_HOST", "127.0.0.1"),
        ("APP_PORT", "0"),
        ("APP_WORKERS", "2"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let settings = Settings::from_vars(vars, &example_todo::DEFAULTS).expect("valid test settings");
    let (server, port) = example_todo::start_with(&settings, test_routes)
        .await
        .expect("the service starts");
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
        db: connect(url).await,
        server: tokio::spawn(server),
        _database: database,
    }
}

async fn spawn() -> TestApp {
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    spawn_on(&url, Box::new(database)).await
}

async fn spawn_sqlite() -> TestApp {
    let path = std::env::temp_dir().join(format!("todo-test-{:016x}.db", fastrand::u64(..)));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    spawn_on(&url, Box::new(SqliteFile(path))).await
}

impl TestApp {
    async fn get(&self, path: &str) -> reqwest::Response {
        let url = format!("{}{path}", self.address);
        self.client.get(url).send().await.expect("request sent")
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        let url = format!("{}{path}", self.address);
        let request = self.client.post(url).json(body);
        request.send().await.expect("request sent")
    }

    async fn count(&self, sql: &str) -> i64 {
        let statement = Statement::from_string(self.db.get_database_backend(), sql);
        let row = self.db.query_one_raw(statement).await.expect("query runs");
        row.expect("one row")
            .try_get_by_index::<i64>(0)
            .expect("a count")
    }

    async fn todos(&self) -> i64 {
        self.count("SELECT count(*) FROM todo").await
    }

    /// The value of one series on `/metrics`.
    async fn metric(&self, name: &str) -> String {
        let text = self.get("/metrics").await.text().await.expect("text");
        let line = text.lines().find(|l| l.starts_with(&format!("{name} ")));
        let line = line.unwrap_or_else(|| panic!("{name} in {text}"));
        line[name.len() + 1..].to_owned()
    }
}

/// The status and body of a problem+json answer.
async fn problem(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let content_type = res.headers().get("content-type").cloned();
    assert_eq!(
        content_type.as_ref().and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "status {status}"
    );
    (status, res.json().await.expect("a JSON body"))
}

async fn create_read_and_mark_done(app: &TestApp) {
    let res = app.post("/todos", &json!({"title": "buy milk"})).await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().expect("text").to_owned();
    let created: Value = res.json().await.expect("json");
    assert_eq!(
        (created["title"].as_str(), created["done"].as_bool()),
        (Some("buy milk"), Some(false))
    );
    assert_eq!(location, format!("/todos/{}", created["id"]));

    let read: Value = app.get(&location).await.json().await.expect("json");
    assert_eq!(read, created);

    let res = app.post(&format!("{location}/done"), &json!({})).await;
    assert_eq!(res.status(), 200);
    let done: Value = res.json().await.expect("json");
    assert_eq!(done["done"], true);
    let read: Value = app.get(&location).await.json().await.expect("json");
    assert_eq!(read, done);
    // Counted by an on-commit hook.
    assert_eq!(app.metric("todos_created_total").await, "1");
}

#[tokio::test]
async fn a_todo_is_created_read_back_and_marked_done() {
    create_read_and_mark_done(&spawn().await).await;
}

#[tokio::test]
async fn a_todo_that_does_not_exist_is_404() {
    let app = spawn().await;
    for res in [
        app.get("/todos/42").await,
        app.post("/todos/42/done", &json!({})).await,
        app.get("/todos/not-a-number").await,
    ] {
        let (status, body) = problem(res).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("not_found")),
            "{body}"
        );
    }
}

#[tokio::test]
async fn an_empty_title_is_422_and_a_broken_body_400() {
    let app = spawn().await;
    for title in ["", "   ", &"x".repeat(201)] {
        let (status, body) = problem(app.post("/todos", &json!({"title": title})).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("validation_failed")),
            "{body}"
        );
    }
    let (status, body) = problem(app.post("/todos", &json!({"name": "x"})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );
    assert_eq!(app.todos().await, 0);
}

#[tokio::test]
async fn a_title_taken_is_409() {
    let app = spawn().await;
    assert_eq!(
        app.post("/todos", &json!({"title": "once"})).await.status(),
        201
    );
    let (status, body) = problem(app.post("/todos", &json!({"title": "once"})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("title_taken")),
        "{body}"
    );
    assert_eq!(app.todos().await, 1);
    assert_eq!(app.metric("todos_created_total").await, "1");
}

#[tokio::test]
async fn a_violation_the_handler_ignored_is_answered_through_on_failure() {
    let app = spawn().await;
    let (status, body) = problem(app.post("/test/swallow", &json!({})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("title_taken")),
        "{body}"
    );
    assert_eq!(app.todos().await, 0, "nothing committed");
}

#[tokio::test]
async fn a_handler_error_after_a_write_rolls_the_write_back() {
    let app = spawn().await;
    let (status, _) = problem(app.post("/test/write-then-fail", &json!({})).await).await;
    assert_eq!(status, 422);
    assert_eq!(app.todos().await, 0);
}

#[tokio::test]
async fn a_repeated_idempotency_key_replays_the_first_answer() {
    let app = spawn().await;
    let send = |title: &'static str| {
        let url = format!("{}/todos", app.address);
        let request = app.client.post(url).header("Idempotency-Key", "todo-1");
        request.json(&json!({"title": title})).send()
    };
    let first = send("call mum").await.expect("sent");
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.text().await.expect("body");

    let again = send("call mum").await.expect("sent");
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.expect("body"), first_body);
    assert_eq!(app.todos().await, 1);

    let (status, body) = problem(send("call dad").await.expect("sent")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    assert_eq!(app.todos().await, 1);
}

#[tokio::test]
async fn the_list_works_on_sqlite_too() {
    let app = spawn_sqlite().await;
    create_read_and_mark_done(&app).await;
    // SQLite does not name the violated index: the mapping still recognises the title's.
    let (status, body) = problem(app.post("/todos", &json!({"title": "buy milk"})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("title_taken")),
        "{body}"
    );
    assert_eq!(app.todos().await, 1);
}
