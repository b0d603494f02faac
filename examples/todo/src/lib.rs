//! A to-do list: a small service on `sea-orm-actix-tx` that is not the inventory, built on the
//! layer's public API only. `docs/adopting.md` walks through it; its Rust blocks are compiled as
//! this crate's doc-tests.
//!
//! * [`todo`](mod@todo): the entity; [`migration`]: its table, then the layer's.
//! * [`routes`]: the handlers (each taking the request's `Tx`), the list's errors and metrics.
//! * [`start`]: connect, migrate, build the layer, bind.

pub mod migration;
pub mod routes;
pub mod todo;

/// `docs/adopting.md`, whose Rust blocks are doc-tests of this crate (its excerpts of this
/// crate's source are checked by `tests/adopting.rs` instead).
#[cfg(doctest)]
#[doc = include_str!("../../../docs/adopting.md")]
pub struct AdoptingGuide;

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, ResponseError, web};
use prometheus_client::registry::Registry;
use sea_orm_actix_tx::settings::{Defaults, Settings};
use sea_orm_actix_tx::{BuildError, Layer, db};

use crate::migration::{Migrator, MigratorTrait};
use crate::routes::{TodoError, TodoMetrics};

/// The service's defaults: its name in `pg_stat_activity`, and an SQLite file when no database
/// is configured.
pub const DEFAULTS: Defaults = Defaults {
    application_name: "todo-example",
    database_url: "sqlite://todo.db?mode=rwc",
};

/// Routes mounted beside the list's (tests mount routes that provoke failures).
pub type ExtraRoutes = fn(&mut web::ServiceConfig, &Layer);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] db::DbSetupError),
    #[error("migration failed: {0}")]
    Migrate(sea_orm::DbErr),
    #[error(transparent)]
    Layer(#[from] BuildError),
    #[error("cannot listen: {0}")]
    Bind(#[from] std::io::Error),
}

/// Connects (with the settings' retries), migrates when `DB_AUTO_MIGRATE` says so, builds the
/// layer and binds. Returns the server (it runs when awaited) and its port.
pub async fn start(settings: &Settings) -> Result<(Server, u16), StartupError> {
    start_with(settings, |_, _| {}).await
}

/// [`start`], with `extra` routes mounted beside the list's.
pub async fn start_with(
    settings: &Settings,
    extra: ExtraRoutes,
) -> Result<(Server, u16), StartupError> {
    let db = db::connect(&settings.database).await?;
    if settings.database.auto_migrate {
        Migrator::up(&db, None)
            .await
            .map_err(StartupError::Migrate)?;
    }
    let replica = db::connect_replica(&settings.database).await?;

    let mut registry = Registry::default();
    let layer = Layer::builder(db, &settings.database)
        .replica(replica)
        .body_limit(settings.server.body_limit)
        .metrics(&mut registry)
        .on_failure(|failure| TodoError::of_failure(failure).map(|e| e.error_response()))
        .build()?;
    let metrics = web::Data::new(TodoMetrics::register(&mut registry));
    let registry = web::Data::new(registry);
    let shared = web::Data::new(layer.clone());

    let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))?;
    let port = listener.local_addr()?.port();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .app_data(registry.clone())
            .app_data(metrics.clone())
            .configure(|cfg| extra(cfg, &layer))
            .configure(|cfg| routes::configure(cfg, &layer))
    })
    // Lets the layer roll back the work of a client that went away before the commit.
    .on_connect(sea_orm_actix_tx::on_connect)
    .workers(settings.server.workers)
    .shutdown_timeout(settings.server.shutdown_timeout.as_secs())
    .listen(listener)?
    .run();
    Ok((server, port))
}
