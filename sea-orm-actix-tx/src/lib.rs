//! The database layer of an actix-web + SeaORM service: one transaction per request, committed
//! exactly when it should be and re-run on serialization failures; a `COMMIT` whose reply was
//! lost resolved, never guessed; `Idempotency-Key`; reads on a streaming replica with
//! read-your-writes; a transaction-mode pooler; bounded round trips; fast 503s while the
//! database is down; Prometheus metrics. Its settings are the `DB_*` environment variables of
//! the settings crate ([`settings`]).
//!
//! One [`Layer`] is built at start-up from the pool (and optionally a replica and the caller's
//! metrics registry); its [`Layer::transactional`] middleware wraps the routes whose handlers take
//! a [`Tx`], which is SeaORM's `ConnectionTrait` inside the request's transaction:
//!
//! ```
//! use actix_web::{App, HttpResponse, web};
//! use prometheus_client::registry::Registry;
//! use sea_orm::ConnectionTrait;
//! use sea_orm_actix_tx::settings::{Defaults, Settings};
//! use sea_orm_actix_tx::{Error, Layer, Tx, db};
//!
//! async fn create(tx: Tx) -> Result<HttpResponse, Error> {
//!     tx.execute_unprepared("INSERT INTO note (body) VALUES ('hello')").await?;
//!     Ok(HttpResponse::Created().finish()) // below 400: the middleware commits
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vars = [("DATABASE_URL".to_owned(), "sqlite::memory:".to_owned())];
//! let settings = Settings::from_vars(vars, &Defaults::default())?;
//! let pool = db::connect(&settings.database).await?;
//! # pool.execute_unprepared("CREATE TABLE note (body text)").await?;
//! let mut registry = Registry::default();
//! let layer = Layer::builder(pool, &settings.database)
//!     .metrics(&mut registry)
//!     .build()?;
//! let tx = layer.transactional();
//! let app = App::new().route("/notes", web::post().to(create).wrap(tx.clone()));
//! # drop(app);
//! # Ok(())
//! # }
//! ```
//!
//! The rules, module by module, are described in [`transaction`].

#![deny(missing_docs)]
// SQLite runs on SeaORM's own transaction: a build with neither server backend has no use for
// the held connection, its bounded round trips and the `BEGIN` messages written for
// PostgreSQL and MariaDB. Builds with either are gated item by item and warn as usual.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql")),
    allow(
        dead_code,
        unused_imports,
        unused_variables,
        unused_macros,
        unreachable_code
    )
)]

pub mod availability;
mod body;
pub mod db;
mod error;
pub mod failover;
pub mod headers;
pub mod metrics;
pub mod migrations;
pub mod transaction;

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse};
use prometheus_client::registry::Registry;
use sea_orm::{DatabaseConnection, DbBackend};

pub use body::read_body;
pub use config as settings;
pub use error::{Error, PROBLEM_JSON, Problem, RETRY_AFTER_SECONDS, problem_response};
pub use transaction::{
    Admission, DbFailure, FailureKind, FailureMap, IdempotencyScope, Transactional, Tx, TxConfig,
    TxError, TxOutcome, TxPolicy, TxReport, TxSavepoint, TxStream, on_connect, with_transaction,
};

use availability::Availability;
use metrics::Metrics;
use transaction::{Replica, Shared};

/// The layer of one service: its pools, its rules and its metrics. Cheap to clone.
#[derive(Clone)]
pub struct Layer {
    shared: Arc<Shared>,
    availability: Availability,
}

/// Why [`LayerBuilder::build`] refused.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A replica was given for a backend that has none (only PostgreSQL streaming replicas are
    /// read from).
    #[error("a read replica is supported on PostgreSQL only, not on {0:?}")]
    ReplicaBackend(DbBackend),
}

/// Collects what a [`Layer`] needs; see [`Layer::builder`].
pub struct LayerBuilder<'r> {
    db: DatabaseConnection,
    settings: config::DatabaseSettings,
    body_limit: usize,
    replica: Option<DatabaseConnection>,
    registry: Option<&'r mut Registry>,
    on_failure: Option<FailureMap>,
    idempotency_scope: Option<IdempotencyScope>,
}

/// The body limit when none is given (`APP_BODY_LIMIT`'s default).
pub const DEFAULT_BODY_LIMIT: usize = 65_536;

impl Layer {
    /// Starts a layer over `db` (the primary's pool, as [`db::connect`] makes it) with the rules
    /// of `settings` (isolation, retries, pooler, timeouts, idempotency TTL, …).
    pub fn builder(
        db: DatabaseConnection,
        settings: &config::DatabaseSettings,
    ) -> LayerBuilder<'static> {
        LayerBuilder {
            db,
            settings: settings.clone(),
            body_limit: DEFAULT_BODY_LIMIT,
            replica: None,
            registry: None,
            on_failure: None,
            idempotency_scope: None,
        }
    }

    /// The middleware to wrap around each route whose handler takes a [`Tx`]. Its builder
    /// methods declare a route's own isolation level, `READ WRITE` for a `GET`, or no replica.
    pub fn transactional(&self) -> Transactional {
        Transactional::new(Arc::clone(&self.shared))
    }

    /// The primary's pool.
    pub fn db(&self) -> &DatabaseConnection {
        &self.shared.db
    }

    /// The transaction rules in force.
    pub fn config(&self) -> &TxConfig {
        &self.shared.config
    }

    /// The layer's metrics (already registered).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Sets the pool gauges (`db_pool_connections`, and the replica's with its lag) to the
    /// pools' numbers now. Call it where the registry is rendered (`GET /metrics`).
    pub fn refresh_metrics(&self) {
        let metrics = self.metrics();
        let (min, max) = metrics.pool_limits();
        let (min, max) = (min as u32, max as u32);
        let pool = db::pool_stats(self.db(), min, max);
        metrics.set_pool(pool.idle, pool.in_use);
        if let Some(replica) = self.replica() {
            let replica_pool = db::pool_stats(replica.db(), min, max);
            metrics.set_replica(&replica_pool, replica.state().lag_seconds);
        }
    }

    /// Whether the primary is answering, as the layer's probe last saw it.
    pub fn availability(&self) -> &Availability {
        &self.availability
    }

    /// The read replica, when one was given.
    pub fn replica(&self) -> Option<&Replica> {
        self.shared.config.replica.as_ref()
    }
}

impl<'r> LayerBuilder<'r> {
    /// Reads `GET`/`HEAD` transactions from this streaming replica's pool (PostgreSQL only;
    /// `None` is no replica). Call [`build`](Self::build) inside the Tokio runtime that should
    /// run the replica's background check.
    pub fn replica(mut self, replica: Option<DatabaseConnection>) -> Self {
        self.replica = replica;
        self
    }

    /// The largest request body buffered for re-runs (`APP_BODY_LIMIT`); 413 above it.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Registers the layer's metrics ([`Metrics`] lists them) in the caller's `registry`.
    /// Without it they are kept in a registry of their own that nobody renders.
    pub fn metrics<'a>(self, registry: &'a mut Registry) -> LayerBuilder<'a> {
        LayerBuilder {
            db: self.db,
            settings: self.settings,
            body_limit: self.body_limit,
            replica: self.replica,
            registry: Some(registry),
            on_failure: self.on_failure,
            idempotency_scope: self.idempotency_scope,
        }
    }

    /// The service's answer to a database failure the layer does not answer itself: a
    /// constraint violation (unique, foreign key, check, by the constraint's name in
    /// [`FailureKind`]) or a value out of range. Used when such a failure ends a request: after
    /// the handler swallowed it, or when the handler returned it as the layer's own
    /// [`Error::Database`] (`?` on a SeaORM error in a handler returning `Result<_, Error>`);
    /// `None` (or no mapping) answers 500 `internal`. A handler with an error type of its own
    /// maps the failure there (e.g. with the same function).
    pub fn on_failure(
        mut self,
        map: impl Fn(&DbFailure) -> Option<HttpResponse> + Send + Sync + 'static,
    ) -> Self {
        self.on_failure = Some(Arc::new(map));
        self
    }

    /// The scope of each request's `Idempotency-Key`: whose keys it is among, typically the
    /// authenticated user or API client id (as the IETF idempotency-key draft and Stripe scope
    /// keys per client). Keys are stored and looked up by (scope, key), so a client that learns
    /// another's key never gets that client's stored response: in its own scope the key is new.
    /// The function runs once per `POST` that carries a key, before the handler; `None` (or no
    /// function, the default) is the one shared scope
    /// [`DEFAULT_IDEMPOTENCY_SCOPE`](transaction::DEFAULT_IDEMPOTENCY_SCOPE), the empty string.
    /// A scope longer than [`MAX_IDEMPOTENCY_SCOPE_LEN`](transaction::MAX_IDEMPOTENCY_SCOPE_LEN)
    /// (255) bytes is stored as `sha256:` and its hex digest.
    ///
    /// ```ignore
    /// Layer::builder(db, &settings)
    ///     .idempotency_scope(|req: &HttpRequest| {
    ///         req.extensions().get::<Authenticated>().map(|user| user.id.to_string())
    ///     })
    /// ```
    pub fn idempotency_scope(
        mut self,
        scope: impl Fn(&HttpRequest) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.idempotency_scope = Some(Arc::new(scope));
        self
    }

    /// The layer, with its availability probe, admission bound and replica check started.
    ///
    /// # Errors
    /// [`BuildError`] when the pieces do not fit together.
    pub fn build(self) -> Result<Layer, BuildError> {
        let settings = &self.settings;
        if let Some(replica) = &self.replica
            && replica.get_database_backend() != DbBackend::Postgres
        {
            return Err(BuildError::ReplicaBackend(replica.get_database_backend()));
        }
        let pooled = settings.pooler == config::Pooler::Transaction
            && self.db.get_database_backend() == DbBackend::Postgres;
        let availability = if pooled {
            Availability::behind_pooler(&self.db, settings.connect_timeout)
        } else {
            Availability::new(&self.db, settings.connect_timeout)
        };
        #[allow(unused_mut)]
        let mut config = TxConfig {
            availability: Some(availability.clone()),
            admission: Some(Admission::new(
                2 * settings.max_connections() as usize,
                settings.pool_timeout,
            )),
            replica: self.replica.map(|replica| {
                Replica::new(replica, settings.connect_timeout, settings.replica_max_wait)
            }),
            ..TxConfig::new(settings, self.body_limit)
        };
        #[cfg(feature = "postgres")]
        if let (transaction::Session::Pooled(pooled), DbBackend::Postgres) =
            (&config.session, self.db.get_database_backend())
        {
            // Once, at start-up: what a pooled BEGIN can leave to the server's defaults.
            pooled.learn_in_background(
                self.db.get_postgres_connection_pool().clone(),
                settings.connect_timeout,
            );
        }
        let mut own = Registry::default();
        let registry = match self.registry {
            Some(registry) => registry,
            None => &mut own,
        };
        let metrics = Metrics::register(
            registry,
            settings.min_connections(),
            settings.max_connections(),
        );
        #[cfg(feature = "postgres")]
        if self.db.get_database_backend() == DbBackend::Postgres {
            // The epoch of the pool `db::connect` made (its connections are evicted after a
            // primary lost), or one of its own (the window's check and the metrics only).
            let pool = self.db.get_postgres_connection_pool();
            let epoch = failover::of(pool)
                .unwrap_or_else(|| failover::Failover::new(settings.failover_retry));
            epoch.attach(metrics.clone());
            config.failover = Some(epoch);
        }
        #[cfg(feature = "postgres")]
        if let (transaction::Session::Direct { .. }, DbBackend::Postgres) =
            (&config.session, self.db.get_database_backend())
        {
            // The server is asked to end a transaction the layer abandoned in a partition.
            config.terminator = Some(transaction::Terminator::new(
                self.db.get_postgres_connection_pool().clone(),
                settings.connect_timeout,
                settings.idle_in_transaction_timeout,
                Some(metrics.clone()),
            ));
        }
        Ok(Layer {
            shared: Arc::new(Shared {
                db: self.db,
                config,
                metrics,
                on_failure: self.on_failure,
                idempotency_scope: self.idempotency_scope,
            }),
            availability,
        })
    }
}
