//! The service under test: [`TestApp`], the real application on a random port over a database
//! of the test's own, and the helpers tests assert with.

use std::sync::OnceLock;
use std::time::Duration;

use app::Application;
use config::Settings;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use super::database::{Server, SqliteFile, TestDatabase, connect_to};
use serde_json::{Value, json};

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// The application's own pool (to observe its statistics).
    pub pool: DatabaseConnection,
    /// A separate connection for assertions.
    pub db: DatabaseConnection,
    /// Whatever must live as long as the app (its test database, its SQLite file), dropped
    /// with it.
    pub _database: Option<Box<dyn std::any::Any + Send + Sync>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Logs only when asked: TEST_LOG=1 cargo test
        if std::env::var_os("TEST_LOG").is_some()
            && let Ok(filter) = app::telemetry::log_filter()
        {
            let _ = app::telemetry::init(config::LogFormat::Pretty, filter, std::io::stderr);
        }
    });
}

/// Settings for a test app on `url`: small pool, two workers, random port, auto-migrate.
pub fn test_settings(url: &str, overrides: &[(&str, &str)]) -> Settings {
    let mut vars: Vec<(String, String)> = [
        ("DATABASE_URL", url),
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "8"),
        ("DB_POOL_TIMEOUT", "10"),
        ("DB_AUTO_MIGRATE", "true"),
        ("DB_CONNECT_RETRIES", "1"),
        ("DB_TX_MAX_RETRIES", "3"),
        ("APP_HOST", "127.0.0.1"),
        ("APP_PORT", "0"),
        ("APP_WORKERS", "2"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    vars.extend(
        overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Settings::from_vars_with(vars, &app::DEFAULTS).expect("test settings are valid")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[], |_, _| {}).await
}

/// The real application over a fresh database, with `overrides` of the test settings and
/// `extra_routes` mounted beside the API.
pub async fn spawn_app_with(
    overrides: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
) -> TestApp {
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    spawn_app_on(&url, Some(Box::new(database)), overrides, extra_routes).await
}

/// The real application over a fresh MariaDB database, with `overrides` of the test settings
/// and `extra_routes` mounted beside the API.
pub async fn spawn_mariadb_app_with(
    overrides: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
) -> TestApp {
    let database = TestDatabase::create_on(Server::Mariadb).await;
    let url = database.url.clone();
    spawn_app_on(&url, Some(Box::new(database)), overrides, extra_routes).await
}

/// The real application over a fresh SQLite file (the embedded default's code path), with
/// `extra_routes` mounted beside the API.
pub async fn spawn_sqlite_app_with(
    overrides: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
) -> TestApp {
    let (file, url) = SqliteFile::new();
    spawn_app_on(&url, Some(Box::new(file)), overrides, extra_routes).await
}

/// The real application over the (empty) database at `url`.
pub async fn spawn_app_on(
    url: &str,
    database: Option<Box<dyn std::any::Any + Send + Sync>>,
    overrides: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
) -> TestApp {
    spawn_app_on_with_layer(url, database, overrides, extra_routes, |layer| layer).await
}

/// [`spawn_app_on`], with `layer_options` given to the layer's builder (e.g. an
/// `Idempotency-Key` scope).
pub async fn spawn_app_on_with_layer(
    url: &str,
    database: Option<Box<dyn std::any::Any + Send + Sync>>,
    overrides: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
    layer_options: app::startup::LayerOptions,
) -> TestApp {
    init_logs();
    let settings = test_settings(url, overrides);
    let pool = sea_orm_actix_tx::db::connect(&settings.database)
        .await
        .expect("the app connects to its test database");
    app::startup::migrate(&pool)
        .await
        .expect("migrations apply");
    launch(settings, pool, url, database, extra_routes, layer_options).await
}

/// The real application behind the run's shared PgBouncer (`pool_mode = transaction`) with
/// `DB_POOLER=transaction`, over a fresh database migrated on the direct URL first (migrations
/// do not run through the pooler). `TestApp::db` stays a direct connection.
pub async fn spawn_pooled_app_with(
    overrides: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
) -> TestApp {
    let database = TestDatabase::create().await;
    let pooled_url = crate::support::pgbouncer::shared().url(&database.name);
    spawn_pooled_app_over(database, &pooled_url, overrides, extra_routes).await
}

/// The real application over `database`, migrated here on its direct URL, connected through
/// the PgBouncer URL `pooled_url` with `DB_POOLER=transaction` and `overrides`.
/// `TestApp::db` is a direct connection.
pub async fn spawn_pooled_app_over(
    database: TestDatabase,
    pooled_url: &str,
    overrides: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
) -> TestApp {
    let mut vars = vec![("DB_POOLER", "transaction"), ("DB_AUTO_MIGRATE", "false")];
    vars.extend_from_slice(overrides);
    launch_migrated(database, pooled_url, &vars, extra_routes).await
}

/// The real application over `database`, migrated here on its direct URL (so that nothing of
/// the set-up passes a pooler or a proxy), connected to `url` with `vars`; `TestApp::db` is a
/// direct connection.
async fn launch_migrated(
    database: TestDatabase,
    url: &str,
    vars: &[(&str, &str)],
    extra_routes: app::startup::ExtraRoutes,
) -> TestApp {
    init_logs();
    let direct = database.connect().await;
    app::startup::migrate(&direct)
        .await
        .expect("migrations apply on the direct URL");
    let _ = direct.close().await;
    let settings = test_settings(url, vars);
    let pool = sea_orm_actix_tx::db::connect(&settings.database)
        .await
        .unwrap_or_else(|e| panic!("the app connects to {url}: {e}"));
    let direct_url = database.url.clone();
    launch(
        settings,
        pool,
        &direct_url,
        Some(Box::new(database)),
        extra_routes,
        |layer| layer,
    )
    .await
}

/// The real application connected to PostgreSQL through `proxy` (migrated on the direct URL
/// first, so that nothing of the set-up passes the proxy's faults); `TestApp::db` stays a
/// direct connection, so assertions work whatever the proxy does. With `DB_POOLER=transaction`
/// in `overrides` the proxy must forward to the run's PgBouncer ([`pooled_upstream`]).
pub async fn spawn_app_behind(
    proxy: &crate::support::fault_proxy::FaultProxy,
    overrides: &[(&str, &str)],
) -> TestApp {
    spawn_app_behind_on(Server::Postgres, proxy, overrides).await
}

/// [`spawn_app_behind`] on MariaDB (a proxy started with `FaultProxy::start_mysql`).
pub async fn spawn_mariadb_app_behind(
    proxy: &crate::support::fault_proxy::FaultProxy,
    overrides: &[(&str, &str)],
) -> TestApp {
    spawn_app_behind_on(Server::Mariadb, proxy, overrides).await
}

async fn spawn_app_behind_on(
    server: Server,
    proxy: &crate::support::fault_proxy::FaultProxy,
    overrides: &[(&str, &str)],
) -> TestApp {
    let database = TestDatabase::create_on(server).await;
    let mut vars = vec![("DB_AUTO_MIGRATE", "false"), ("DB_SSL_MODE", "disable")];
    vars.extend_from_slice(overrides);
    // Behind the run's PgBouncer when the proxy forwards to it (`DB_POOLER=transaction`).
    let upstream = if vars.contains(&("DB_POOLER", "transaction")) {
        crate::support::pgbouncer::shared().url(&database.name)
    } else {
        database.url.clone()
    };
    launch_migrated(database, &proxy.url(&upstream), &vars, |_, _| {}).await
}

/// The `host:port` of the run's shared PgBouncer, for a proxy in front of it.
pub fn pooled_upstream() -> String {
    crate::support::fault_proxy::upstream_of(&crate::support::pgbouncer::shared().url("postgres"))
}

async fn launch(
    settings: Settings,
    pool: DatabaseConnection,
    direct_url: &str,
    database: Option<Box<dyn std::any::Any + Send + Sync>>,
    extra_routes: app::startup::ExtraRoutes,
    layer_options: app::startup::LayerOptions,
) -> TestApp {
    let replica = sea_orm_actix_tx::db::connect_replica(&settings.database)
        .await
        .expect("the replica's pool is configured");
    let application =
        Application::build_with_layer(settings, pool.clone(), replica, extra_routes, layer_options)
            .expect("the app binds");
    let port = application.port();
    let server = tokio::spawn(application.run_until_stopped());
    let db = connect_to(direct_url).await;
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client"),
        pool,
        db,
        _database: database,
        server,
    }
}

impl TestApp {
    /// Assertions over `db` without an app of the test's own (its requests went to real
    /// binaries): `scalar`, `assert_invariant`, `wait_until`.
    pub fn observer(db: DatabaseConnection) -> TestApp {
        TestApp {
            address: String::new(),
            client: reqwest::Client::new(),
            pool: db.clone(),
            db,
            _database: None,
            server: tokio::spawn(async { Ok(()) }),
        }
    }

    /// The name of the test's own PostgreSQL database.
    pub fn database_name(&self) -> String {
        self._database
            .as_ref()
            .and_then(|d| d.downcast_ref::<TestDatabase>())
            .map(|d| d.name.clone())
            .expect("a test database of the test's own")
    }

    pub fn is_postgres(&self) -> bool {
        self.db.get_database_backend() == sea_orm::DbBackend::Postgres
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send_json(path, body.clone()).await
    }

    /// Like `post`, taking the body by value (for requests built in closures).
    pub async fn send_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Creates a warehouse and returns its id.
    pub async fn warehouse(&self, code: &str) -> i64 {
        let res = self
            .post(
                "/warehouses",
                &json!({"code": code, "name": format!("Warehouse {code}")}),
            )
            .await;
        assert_eq!(res.status(), 201, "creating warehouse {code}");
        res.json::<Value>().await.expect("json")["id"]
            .as_i64()
            .expect("id")
    }

    /// Creates a product and returns its id.
    pub async fn product(&self, sku: &str) -> i64 {
        let res = self
            .post(
                "/products",
                &json!({"sku": sku, "name": format!("Product {sku}")}),
            )
            .await;
        assert_eq!(res.status(), 201, "creating product {sku}");
        res.json::<Value>().await.expect("json")["id"]
            .as_i64()
            .expect("id")
    }

    pub async fn receive(&self, warehouse: i64, product: i64, quantity: i64) {
        let res = self
            .post(
                "/receipts",
                &json!({"warehouse_id": warehouse, "product_id": product, "quantity": quantity}),
            )
            .await;
        assert_eq!(res.status(), 201, "receipt");
    }

    /// One scalar from the test database.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.db.get_database_backend(), sql))
            .await
            .expect("query runs")
            .expect("one row");
        row.try_get_by_index::<i64>(0).expect("an integer")
    }

    pub async fn text(&self, sql: &str) -> String {
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.db.get_database_backend(), sql))
            .await
            .expect("query runs")
            .expect("one row");
        row.try_get_by_index::<String>(0).expect("text")
    }

    /// The quantity of one stock row (0 when there is none).
    pub async fn stock(&self, warehouse: i64, product: i64) -> i64 {
        let sql = format!(
            "SELECT quantity FROM stock_level WHERE warehouse_id = {warehouse} AND product_id = {product}"
        );
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.db.get_database_backend(), sql))
            .await
            .expect("query runs");
        row.map_or(0, |row| row.try_get_by_index::<i64>(0).expect("an integer"))
    }

    /// Asserts the ledger's invariant (`docs/api.md`: the ledger always balances) over the whole
    /// database.
    pub async fn assert_invariant(&self) {
        let broken = self
            .scalar(
                "SELECT count(*) FROM product p WHERE \
                 COALESCE((SELECT sum(quantity) FROM stock_level s WHERE s.product_id = p.id), 0) <> \
                 COALESCE((SELECT sum(quantity) FROM movement m WHERE m.product_id = p.id AND m.kind = 'receipt'), 0) - \
                 COALESCE((SELECT sum(quantity) FROM movement m WHERE m.product_id = p.id AND m.kind = 'shipment'), 0)",
            )
            .await;
        assert_eq!(
            broken, 0,
            "products whose stock differs from receipts - shipments"
        );
        let negative = self
            .scalar("SELECT count(*) FROM stock_level WHERE quantity < 0")
            .await;
        assert_eq!(negative, 0, "negative stock rows");
    }

    /// Waits (polling, bounded) until `check` holds; panics with `what` otherwise.
    pub async fn wait_until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
