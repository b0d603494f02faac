//! Builds the application: the pool, migrations when asked, the shared state, the middleware and
//! the routes, bound to its listener. `main` and the integration tests both call
//! [`Application::build`], so the tests run the real thing.

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, ResponseError, web};
use config::Settings;
use migration::{Migrator, MigratorTrait};
use prometheus_client::registry::Registry;
use sea_orm::DatabaseConnection;
use sea_orm_actix_tx::db::{self, DbSetupError};
use sea_orm_actix_tx::{Admission, BuildError, Layer, LayerBuilder};

use crate::json::BodyLimit;
use crate::metrics::HttpMetrics;
use crate::problem::{ApiError, path_error, query_error, unknown_route};
use crate::routes;
use crate::routes::health::{MetricsRegistry, READY_BUDGET, ReadyQueue};
use crate::telemetry::RequestTelemetry;

/// Test routes mounted beside the API on the real middleware: `(config, layer)`.
pub type ExtraRoutes = fn(&mut web::ServiceConfig, &Layer);

/// A test hook: more of the layer's options, given to its builder after the inventory's own
/// (tests scope `Idempotency-Key` with it; the inventory itself has no authentication and uses
/// the one default scope).
pub type LayerOptions = for<'r> fn(LayerBuilder<'r>) -> LayerBuilder<'r>;

/// The inventory's layer as it is: no options added.
fn no_options(builder: LayerBuilder<'_>) -> LayerBuilder<'_> {
    builder
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] DbSetupError),
    #[error("migration failed: {0}")]
    Migrate(sea_orm::DbErr),
    #[error(transparent)]
    Layer(#[from] BuildError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

pub struct Application {
    port: u16,
    server: Server,
    db: DatabaseConnection,
    replica: Option<DatabaseConnection>,
}

impl Application {
    /// Connects (with retries), migrates when `DB_AUTO_MIGRATE` says so, and binds. The server
    /// runs once [`run_until_stopped`](Self::run_until_stopped) is awaited.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let db = db::connect(&settings.database).await?;
        if settings.database.auto_migrate {
            migrate(&db).await?;
            tracing::info!("migrations applied");
        }
        let replica = db::connect_replica(&settings.database).await?;
        Self::build_with_replica(settings, db, replica, |_, _| {})
    }

    /// Binds the application over an existing pool. `extra_routes` are mounted beside the API
    /// (tests mount routes that provoke failures on the real middleware).
    pub fn build_with(
        settings: Settings,
        db: DatabaseConnection,
        extra_routes: ExtraRoutes,
    ) -> Result<Application, StartupError> {
        Self::build_with_replica(settings, db, None, extra_routes)
    }

    /// [`build_with`](Self::build_with), reading from `replica` (the pool of
    /// [`db::connect_replica`]) when there is one. Call it inside the Tokio runtime that should
    /// run the replica's background check.
    pub fn build_with_replica(
        settings: Settings,
        db: DatabaseConnection,
        replica: Option<DatabaseConnection>,
        extra_routes: ExtraRoutes,
    ) -> Result<Application, StartupError> {
        Self::build_with_layer(settings, db, replica, extra_routes, no_options)
    }

    /// [`build_with_replica`](Self::build_with_replica), with `layer_options` added to the
    /// layer's builder (a test hook).
    pub fn build_with_layer(
        settings: Settings,
        db: DatabaseConnection,
        replica: Option<DatabaseConnection>,
        extra_routes: ExtraRoutes,
        layer_options: LayerOptions,
    ) -> Result<Application, StartupError> {
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&addr).map_err(|source| StartupError::Bind {
            addr: addr.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?
            .port();
        let server = server(
            &settings,
            db.clone(),
            replica.clone(),
            listener,
            extra_routes,
            layer_options,
        )?;
        tracing::info!(port, backend = db::backend_name(&db), "listening");
        Ok(Application {
            port,
            server,
            db,
            replica,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Serves until SIGTERM or Ctrl-C, lets in-flight requests finish (up to
    /// `APP_SHUTDOWN_TIMEOUT`), then closes the pools.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        tracing::info!("server stopped; closing the pool");
        if let Err(e) = self.db.close().await {
            tracing::warn!(error = %e, "closing the pool failed");
        }
        if let Some(replica) = self.replica
            && let Err(e) = replica.close().await
        {
            tracing::warn!(error = %e, "closing the replica's pool failed");
        }
        served
    }
}

/// Applies every pending migration of the inventory (the layer's own included).
pub async fn migrate(db: &DatabaseConnection) -> Result<(), StartupError> {
    Migrator::up(db, None).await.map_err(StartupError::Migrate)
}

fn server(
    settings: &Settings,
    db: DatabaseConnection,
    replica: Option<DatabaseConnection>,
    listener: TcpListener,
    extra_routes: ExtraRoutes,
    layer_options: LayerOptions,
) -> Result<Server, StartupError> {
    let database = &settings.database;
    let log_format = settings.log.format;
    let mut registry = Registry::default();
    // No `idempotency_scope`: the inventory has no authentication, so every `Idempotency-Key`
    // is in the one default scope.
    let builder = Layer::builder(db, database)
        .replica(replica)
        .body_limit(settings.server.body_limit)
        .metrics(&mut registry)
        .on_failure(|failure| ApiError::of_constraint(failure).map(|e| e.error_response()));
    let layer = layer_options(builder).build()?;
    let http_metrics = HttpMetrics::register(&mut registry);
    let registry = web::Data::new(MetricsRegistry(registry));
    let ready_queue = web::Data::new(ReadyQueue(Admission::new(
        database.max_connections() as usize,
        READY_BUDGET,
    )));
    let body_limit = web::Data::new(BodyLimit(settings.server.body_limit));
    let shared = web::Data::new(layer.clone());
    // The pool itself, for handlers and jobs outside a request's transaction.
    let pool = web::Data::new(layer.db().clone());
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let server = HttpServer::new(move || {
        let layer = layer.clone();
        App::new()
            .wrap(RequestTelemetry::new(http_metrics.clone(), log_format))
            .app_data(shared.clone())
            .app_data(pool.clone())
            .app_data(registry.clone())
            .app_data(ready_queue.clone())
            .app_data(body_limit.clone())
            .app_data(web::PathConfig::default().error_handler(path_error))
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .configure(|cfg| extra_routes(cfg, &layer))
            .configure(|cfg| routes::configure(cfg, &layer))
            .default_service(web::to(unknown_route))
    })
    .on_connect(sea_orm_actix_tx::on_connect)
    .workers(settings.server.workers)
    .shutdown_timeout(settings.server.shutdown_timeout.as_secs())
    .listen(listener)
    .map_err(|source| StartupError::Bind { addr, source })?
    .run();
    Ok(server)
}
