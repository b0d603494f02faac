//! Builds the application: the pool, migrations when asked, the shared state, the middleware and
//! the routes, bound to its listener. `main` and the integration tests both call
//! [`Application::build`], so the tests run the real thing.

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use config::Settings;
use sea_orm::DatabaseConnection;

use crate::availability::Availability;
use crate::db::{self, DbSetupError};
use crate::metrics::Metrics;
use crate::problem::{path_error, query_error, unknown_route};
use crate::routes;
use crate::routes::health::{READY_BUDGET, ReadyQueue};
use crate::telemetry::RequestTelemetry;
use crate::transaction::{self, Admission, Replica, TxConfig};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] DbSetupError),
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
            db::migrate(&db).await?;
            tracing::info!("migrations applied");
        }
        let replica = db::connect_replica(&settings.database).await?;
        Self::build_with_replica(settings, db, replica, |_| {})
    }

    /// Binds the application over an existing pool. `extra_routes` are mounted beside the API
    /// (tests mount routes that provoke failures on the real middleware).
    pub fn build_with(
        settings: Settings,
        db: DatabaseConnection,
        extra_routes: fn(&mut web::ServiceConfig),
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
        extra_routes: fn(&mut web::ServiceConfig),
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

fn server(
    settings: &Settings,
    db: DatabaseConnection,
    replica: Option<DatabaseConnection>,
    listener: TcpListener,
    extra_routes: fn(&mut web::ServiceConfig),
) -> Result<Server, StartupError> {
    let database = &settings.database;
    let availability = Availability::new(&db, database.connect_timeout);
    let tx_config = web::Data::new(TxConfig {
        availability: Some(availability.clone()),
        admission: Some(Admission::new(
            2 * database.max_connections() as usize,
            database.pool_timeout,
        )),
        replica: replica.map(|replica| {
            Replica::new(replica, database.connect_timeout, database.replica_max_wait)
        }),
        ..TxConfig::new(database, settings.server.body_limit)
    });
    let availability = web::Data::new(availability);
    let ready_queue = web::Data::new(ReadyQueue(Admission::new(
        database.max_connections() as usize,
        READY_BUDGET,
    )));
    let metrics = web::Data::new(Metrics::new(
        database.min_connections(),
        database.max_connections(),
    ));
    let db = web::Data::new(db);
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let server = HttpServer::new(move || {
        App::new()
            .wrap(RequestTelemetry)
            .app_data(db.clone())
            .app_data(tx_config.clone())
            .app_data(metrics.clone())
            .app_data(availability.clone())
            .app_data(ready_queue.clone())
            .app_data(web::PathConfig::default().error_handler(path_error))
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .configure(extra_routes)
            .configure(routes::configure)
            .default_service(web::to(unknown_route))
    })
    .on_connect(transaction::on_connect)
    .workers(settings.server.workers)
    .shutdown_timeout(settings.server.shutdown_timeout.as_secs())
    .listen(listener)
    .map_err(|source| StartupError::Bind { addr, source })?
    .run();
    Ok(server)
}
