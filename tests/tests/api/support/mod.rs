//! Test support: the service on a fresh database ([`TestApp::builder`], [`spawn_app`]), the
//! databases ([`database`]), and the real servers and processes the suite starts of its own
//! (PgBouncer, PostgreSQL servers, the fault proxy, the binary). See `tests/README.md`.

pub mod app;
pub mod assertions;
pub mod database;
pub mod fault_proxy;
pub mod json_schema;
pub mod pgbouncer;
pub mod process;
pub mod replica;
pub mod tls_server;

pub use self::app::*;
pub use self::assertions::*;
pub use self::database::*;

/// Enough connections for the concurrent tests [`on_every_backend`] runs (SQLite caps its pool
/// at 4 writers' worth).
pub const CONCURRENT_POOL: &[(&str, &str)] = &[("DB_POOL_SIZE", "4"), ("DB_MAX_OVERFLOW", "16")];

/// Runs each named test function (`async fn name(app: TestApp)` in the calling module) with
/// [`CONCURRENT_POOL`] once per backend: `postgres::name`, `mariadb::name`, `sqlite::name` and
/// `pgbouncer::name` (PostgreSQL behind the run's PgBouncer in transaction mode). With
/// `routes = path;` first, the app mounts `path` (a `fn(&mut web::ServiceConfig)`) beside the API.
macro_rules! on_every_backend {
    (routes = $routes:path; $($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::TestApp::builder().env(crate::support::CONCURRENT_POOL).routes($routes).spawn().await).await;
            })*
        }
        mod mariadb {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::TestApp::builder().backend(crate::support::Backend::Mariadb).env(crate::support::CONCURRENT_POOL).routes($routes).spawn().await).await;
            })*
        }
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::TestApp::builder().backend(crate::support::Backend::Sqlite).env(crate::support::CONCURRENT_POOL).routes($routes).spawn().await).await;
            })*
        }
        mod pgbouncer {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::TestApp::builder().pooled().env(crate::support::CONCURRENT_POOL).routes($routes).spawn().await).await;
            })*
        }
    };
    ($($name:ident),* $(,)?) => {
        crate::support::on_every_backend!(routes = crate::support::no_routes; $($name),*);
    };
}
pub(crate) use on_every_backend;

/// No routes beside the API.
pub fn no_routes(_: &mut actix_web::web::ServiceConfig, _: &sea_orm_actix_tx::Layer) {}
