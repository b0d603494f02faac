//! The service under test: [`TestApp`], the real application on a random port over a database
//! of the test's own, and the helpers tests assert with.

use std::sync::OnceLock;
use std::time::Duration;

use app::Application;
use config::Settings;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use app::startup::{ExtraRoutes, LayerOptions};

use super::database::{Server, SqliteFile, TestDatabase, connect_to};
use super::fault_proxy::FaultProxy;
use super::pgbouncer;
use super::replica::ReplicaPair;
use serde_json::{Value, json};

/// The backend of the test's fresh database: on the run's PostgreSQL (`TEST_DATABASE_URL`), on
/// the run's MariaDB (`TEST_MARIADB_URL`), or an SQLite file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Postgres,
    Mariadb,
    Sqlite,
}

/// What a [`TestApp`] keeps alive and drops with it.
enum Keep {
    /// A database the test (or nobody) owns: nothing to drop.
    Nothing,
    Database(TestDatabase),
    Sqlite {
        _file: SqliteFile,
    },
}

impl Keep {
    /// `database`, kept, and its URL.
    fn database(database: TestDatabase) -> (Keep, String) {
        let url = database.url.clone();
        (Keep::Database(database), url)
    }

    fn name(&self) -> Option<&str> {
        match self {
            Keep::Database(database) => Some(&database.name),
            Keep::Nothing | Keep::Sqlite { .. } => None,
        }
    }
}

/// Where the app's database comes from when it is not a fresh one.
enum Given {
    Database(TestDatabase),
    Url(String),
}

/// How a test starts the service: [`TestApp::builder`], options, then [`spawn`](Self::spawn).
/// Without options: the real application over a fresh PostgreSQL database, migrated at start-up,
/// with the test settings ([`test_settings`]), the API only and the inventory's layer as it is.
#[must_use = "the app starts with `.spawn().await`"]
pub struct TestAppBuilder<'a> {
    backend: Backend,
    given: Option<Given>,
    pooled: bool,
    replica: Option<&'a ReplicaPair>,
    proxy: Option<&'a FaultProxy>,
    env: Vec<(String, String)>,
    routes: ExtraRoutes,
    layer: LayerOptions,
}

impl<'a> TestAppBuilder<'a> {
    /// A fresh database on `backend` (default: PostgreSQL).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Over `database` (e.g. one the test created on a server of its own, or the database of an
    /// app it stopped) instead of a fresh one; dropped with the app.
    pub fn database(mut self, database: TestDatabase) -> Self {
        self.given = Some(Given::Database(database));
        self
    }

    /// Over the database at `url`, which the test keeps (e.g. on a PostgreSQL server of its own
    /// that it stops and starts).
    pub fn url(mut self, url: &str) -> Self {
        self.given = Some(Given::Url(url.to_owned()));
        self
    }

    /// Behind a real PgBouncer in transaction mode with `DB_POOLER=transaction`: the run's shared
    /// one ([`pgbouncer::shared`]), or with [`replica`](Self::replica) (the shared pair only) one in
    /// front of each server of the pair ([`ReplicaPair::bouncers`]). The database is migrated on
    /// its direct URL first (migrations do not run through the pooler); `TestApp::db` stays a
    /// direct connection. PostgreSQL only.
    pub fn pooled(mut self) -> Self {
        self.pooled = true;
        self
    }

    /// With a streaming replica: the database is created on `pair`'s primary,
    /// `DATABASE_REPLICA_URL` names it on the replica, and `spawn` returns once the replica has
    /// replayed the migrations. `TestApp::db` is a connection to the primary.
    pub fn replica(mut self, pair: &'a ReplicaPair) -> Self {
        self.replica = Some(pair);
        self
    }

    /// Connected through `proxy` (`FaultProxy::start` in front of the run's PostgreSQL, or of its
    /// PgBouncer ([`pooled_upstream`]) with [`pooled`](Self::pooled); `FaultProxy::start_mysql`
    /// in front of MariaDB), with `DB_SSL_MODE=disable`. The database is migrated on its direct
    /// URL first, so that nothing of the set-up passes the proxy's faults; `TestApp::db` stays a
    /// direct connection, so assertions work whatever the proxy does.
    pub fn behind(mut self, proxy: &'a FaultProxy) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// Overrides of the test settings (after those the options above set; the last one of a
    /// name wins). May be given more than once.
    pub fn env(mut self, vars: &[(&str, &str)]) -> Self {
        self.env
            .extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    /// Test routes mounted beside the API (`fn(&mut web::ServiceConfig, &Layer)`).
    pub fn routes(mut self, routes: ExtraRoutes) -> Self {
        self.routes = routes;
        self
    }

    /// More of the layer's options, given to its builder after the inventory's own (e.g. an
    /// `Idempotency-Key` scope).
    pub fn layer(mut self, options: LayerOptions) -> Self {
        self.layer = options;
        self
    }

    /// Creates the database, migrates it, and starts the application on a random port.
    pub async fn spawn(self) -> TestApp {
        init_logs();
        let (keep, direct_url) = match self.given {
            Some(Given::Database(database)) => Keep::database(database),
            Some(Given::Url(url)) => (Keep::Nothing, url),
            None => match (self.backend, self.replica) {
                (Backend::Postgres, None) => Keep::database(TestDatabase::create().await),
                (Backend::Postgres, Some(pair)) => Keep::database(
                    TestDatabase::create_at(Server::Postgres, &pair.primary.url("postgres")).await,
                ),
                (Backend::Mariadb, None) => {
                    Keep::database(TestDatabase::create_on(Server::Mariadb).await)
                }
                (Backend::Sqlite, None) => {
                    let (file, url) = SqliteFile::new();
                    (Keep::Sqlite { _file: file }, url)
                }
                (backend, Some(_)) => panic!("a replica pair is PostgreSQL, not {backend:?}"),
            },
        };
        let name = || {
            keep.name()
                .expect("a database of the test's own, by name")
                .to_owned()
        };

        let mut url = direct_url.clone();
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut set = |name: &str, value: &str| vars.push((name.to_owned(), value.to_owned()));
        if self.pooled {
            assert_eq!(self.backend, Backend::Postgres, "PgBouncer is PostgreSQL's");
            url = match self.replica {
                Some(pair) => {
                    assert!(
                        std::ptr::eq(pair, ReplicaPair::shared()),
                        "the PgBouncers of `ReplicaPair::bouncers` are in front of the shared pair"
                    );
                    ReplicaPair::bouncers().primary.url(&name())
                }
                None => pgbouncer::shared().url(&name()),
            };
            set("DB_POOLER", "transaction");
            set("DB_AUTO_MIGRATE", "false");
        }
        if let Some(pair) = self.replica {
            let replica_url = if self.pooled {
                ReplicaPair::bouncers().replica.url(&name())
            } else {
                pair.replica.url(&name())
            };
            set("DATABASE_REPLICA_URL", &replica_url);
        }
        if let Some(proxy) = self.proxy {
            assert_ne!(
                self.backend,
                Backend::Sqlite,
                "SQLite has no connection to proxy"
            );
            url = proxy.url(&url);
            set("DB_AUTO_MIGRATE", "false");
            set("DB_SSL_MODE", "disable");
        }
        vars.extend(self.env);

        // Behind a pooler or a proxy, the migrations run on the direct URL first; otherwise the
        // app's own pool runs them, as at start-up.
        let settings = test_settings(&url, &pairs(&vars));
        let pool = if self.pooled || self.proxy.is_some() {
            let direct = connect_to(&direct_url).await;
            app::startup::migrate(&direct)
                .await
                .expect("migrations apply on the direct URL");
            let _ = direct.close().await;
            sea_orm_actix_tx::db::connect(&settings.database)
                .await
                .unwrap_or_else(|e| panic!("the app connects to {url}: {e}"))
        } else {
            let pool = sea_orm_actix_tx::db::connect(&settings.database)
                .await
                .expect("the app connects to its test database");
            app::startup::migrate(&pool)
                .await
                .expect("migrations apply");
            pool
        };
        let app = launch(settings, pool, &direct_url, keep, self.routes, self.layer).await;
        if let Some(pair) = self.replica {
            pair.wait_for_replay(&app).await;
        }
        app
    }
}

fn pairs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The real application over a fresh PostgreSQL database: `TestApp::builder().spawn()`.
pub async fn spawn_app() -> TestApp {
    TestApp::builder().spawn().await
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// The application's own pool (to observe its statistics).
    pub pool: DatabaseConnection,
    /// A separate connection for assertions.
    pub db: DatabaseConnection,
    /// Whatever must live as long as the app (its test database, its SQLite file), dropped
    /// with it.
    database: Keep,
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
    Settings::from_vars(vars, &app::DEFAULTS).expect("test settings are valid")
}

/// The `host:port` of the run's shared PgBouncer, for a proxy in front of it.
pub fn pooled_upstream() -> String {
    super::fault_proxy::upstream_of(&pgbouncer::shared().url("postgres"))
}

async fn launch(
    settings: Settings,
    pool: DatabaseConnection,
    direct_url: &str,
    database: Keep,
    extra_routes: ExtraRoutes,
    layer_options: LayerOptions,
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
        database,
        server,
    }
}

impl TestApp {
    /// The one way to start the service in a test (besides the [`spawn_app`] shorthand): see
    /// [`TestAppBuilder`].
    pub fn builder<'a>() -> TestAppBuilder<'a> {
        TestAppBuilder {
            backend: Backend::Postgres,
            given: None,
            pooled: false,
            replica: None,
            proxy: None,
            env: Vec::new(),
            routes: super::no_routes,
            layer: |layer| layer,
        }
    }

    /// Assertions over `db` without an app of the test's own (its requests went to real
    /// binaries): `scalar`, `assert_invariant`, `wait_until`.
    pub fn observer(db: DatabaseConnection) -> TestApp {
        TestApp {
            address: String::new(),
            client: reqwest::Client::new(),
            pool: db.clone(),
            db,
            database: Keep::Nothing,
            server: tokio::spawn(async { Ok(()) }),
        }
    }

    /// The name of the test's own PostgreSQL database.
    pub fn database_name(&self) -> String {
        self.database
            .name()
            .expect("a test database of the test's own")
            .to_owned()
    }

    /// Stops the app and hands over its database (e.g. to a new app over the same database).
    pub fn into_database(mut self) -> TestDatabase {
        match std::mem::replace(&mut self.database, Keep::Nothing) {
            Keep::Database(database) => database,
            Keep::Nothing | Keep::Sqlite { .. } => panic!("a test database of the test's own"),
        }
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
        let body = json!({"code": code, "name": format!("Warehouse {code}")});
        self.create("/warehouses", &body).await
    }

    /// Creates a product and returns its id.
    pub async fn product(&self, sku: &str) -> i64 {
        let body = json!({"sku": sku, "name": format!("Product {sku}")});
        self.create("/products", &body).await
    }

    /// POSTs `body` to `path`, expects 201, and returns the new resource's id.
    async fn create(&self, path: &str, body: &Value) -> i64 {
        let res = self.post(path, body).await;
        assert_eq!(res.status(), 201, "creating {body} at {path}");
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
        self.first(sql).await
    }

    /// One text value from the test database.
    pub async fn text(&self, sql: &str) -> String {
        self.first(sql).await
    }

    /// Runs one statement on the test database, behind the app's back.
    pub async fn execute(&self, sql: &str) {
        self.db
            .execute_unprepared(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The first column of the one row `sql` returns.
    async fn first<T: sea_orm::TryGetable>(&self, sql: &str) -> T {
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.db.get_database_backend(), sql))
            .await
            .expect("query runs")
            .expect("one row");
        row.try_get_by_index::<T>(0)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
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
