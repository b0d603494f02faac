//! The request's database transaction: when it begins, commits, rolls back and is retried. This
//! file holds the middleware and the decisions; each mechanism it relies on has a file of its own:
//!
//! * `mod.rs` (this file): [`Transactional`] (the body kept for re-runs, admission, the retry
//!   loop, the commit-or-roll-back decision, a handle that outlived its request, when on-commit
//!   hooks run, the `Idempotency-Key` steps), [`Admission`], [`TxConfig`] and
//!   [`with_transaction`].
//! * `lazy.rs`: [`Tx`] (the extractor, `ConnectionTrait`, [`Tx::on_commit`]) and the transaction
//!   of one attempt: begun on first use, on the replica or the primary, its statements, its
//!   first failure, its `COMMIT` (with the transaction id and server identity that `outcome.rs`
//!   needs) or `ROLLBACK`, and the warning for a transaction open past `DB_LEAK_DETECTION_MS`. Beside it, in `lazy/`:
//!   `savepoint.rs` ([`TxSavepoint`], SeaORM's `TransactionTrait`: nested transactions as
//!   savepoints), `ledger.rs` (the open savepoints and the failures at each level: which ones a
//!   rollback forgives) and `stream.rs` (`StreamTrait`, [`TxStream`]).
//! * `failure.rs`: [`DbFailure`], what a database error means (retry, 503, 500, …).
//! * `peer.rs`: whether the client is still connected before `COMMIT`.
//! * `session.rs`: [`Session`], how `BEGIN` is written on a direct connection or behind a
//!   transaction-mode pooler ([`Pooled`]), and whether statements are prepared by name.
//! * `server_defaults.rs`: the server's defaults, learned once through the pooler, so that a
//!   pooled `BEGIN` sets only what differs from them.
//! * `routing.rs`: primary or replica for a read, and the consistency token.
//! * `outcome.rs`: the outcome of a transaction whose `COMMIT` reply was lost.
//! * `round_trip.rs`: the transaction's connection and the bound on each round trip on it.
//! * `abandoned.rs`: a transaction abandoned when a bound passed is ended on the server
//!   (`pg_terminate_backend` of the backend holding its mark, in the background).
//! * `idempotency.rs`: `Idempotency-Key`: claiming a key, storing and replaying a response.
//! * `side_conn.rs`: the connection of a query outside a request's transaction (WAL position,
//!   a lost `COMMIT`'s status, the replica's checks), closed when its bound passes.
//!
//! The rules, as a whole:
//!
//! * [`Transactional`] is an actix-web middleware wrapped around a route (`web::post().wrap(..)`).
//!   It buffers the request body (bounded by `APP_BODY_LIMIT`), runs the handler, and then decides:
//!   commit when the response is below 400, no statement failed and the client is still
//!   connected; otherwise roll back. A serialization failure (40001) or deadlock (40P01), raised
//!   by a statement or by the commit, rolls back and runs the whole request again with its body,
//!   up to `DB_TX_MAX_RETRIES` times with jittered backoff, then answers 503
//!   `serialization_failure`. A commit that fails replaces the handler's response: the client
//!   never sees a success for work that was not committed.
//! * [`Tx`] is the extractor through which a handler reaches the transaction. It implements
//!   SeaORM's `ConnectionTrait`, so domain functions taking `&impl ConnectionTrait` run inside it,
//!   and `TransactionTrait` (a nested `begin` is a savepoint, [`TxSavepoint`]) and `StreamTrait`.
//!   It is lazy: `BEGIN` is sent with the first statement, so a request that never queries takes
//!   no connection from the pool. Every statement error passes through it and is recorded,
//!   because PostgreSQL turns the `COMMIT` of an aborted transaction into a rollback while the
//!   driver reports success: a request whose statement failed is never answered 2xx.
//! * A `COMMIT` whose reply is lost (the connection broke while it was in flight, or the server
//!   ended the session instead of answering) is resolved, not guessed: a writing transaction's
//!   id and its server's identity (postmaster start, WAL timeline) are read in its `BEGIN`
//!   message, and after the break another connection asks (`outcome.rs`). The id's status
//!   counts only on the same server run; on another (a promoted standby, a restarted server)
//!   only the request's `Idempotency-Key` record, stored in the same transaction, tells.
//!   Committed → the handler's own response; not committed → 503 `database_unavailable`, or a
//!   re-run within `DB_FAILOVER_RETRY_MS` when the primary was lost (another server answered,
//!   or a primary lost in the failover window); unknown (no answer in time; another server and
//!   no key) → 500 `commit_outcome_unknown` without `Retry-After`.
//! * Every round trip on the transaction's connection is bounded on the service's side
//!   (`round_trip.rs`): `BEGIN`, `COMMIT` and `ROLLBACK` by `DB_CONNECT_TIMEOUT`, a statement by
//!   `DB_STATEMENT_TIMEOUT_MS` + `DB_CONNECT_TIMEOUT`; behind a transaction-mode pooler `BEGIN`
//!   waits for a server connection, a pool wait bounded by `DB_POOL_TIMEOUT` (503
//!   `pool_timeout`). Past its bound (a partition holding the
//!   packets) the connection is closed and the attempt fails as 503 `database_unavailable`; a
//!   `COMMIT` past its bound is a lost reply, resolved as above.
//! * `Idempotency-Key` on `POST` (`idempotency.rs`): a key belongs to the request's scope (the
//!   service's [`idempotency_scope`](crate::LayerBuilder::idempotency_scope) function, else
//!   [`DEFAULT_IDEMPOTENCY_SCOPE`]); each attempt first claims (scope, key) in its
//!   transaction (a replay, a duplicate still running (409) or a reused key (422) is answered
//!   without running the handler); a response below 400 is stored in the same transaction as
//!   the handler's writes, a 4xx after the rollback, a 5xx never. A store that finds the key
//!   committed by a duplicate fails the attempt as a serialization failure, and the re-run
//!   replays.
//! * A handler that panics is caught: 500 and a rollback. A client that disconnects before the
//!   commit gets a rollback (`peer.rs`; register [`on_connect`] on the server).
//! * Leaks: a [`Tx`] handle still alive when the handler has returned (cloned into a spawned
//!   task) means writes that would run after the answer: the request is rolled back, answered
//!   500, logged and counted (`db_transaction_leaks_total`). A transaction open longer than
//!   `DB_LEAK_DETECTION_MS` is logged at WARN with its route and request id while still open.
//! * On-commit hooks ([`Tx::on_commit`]) run once, after the commit of the attempt that
//!   committed; never after a rollback, and not for attempts that were re-run.
//! * A PostgreSQL `READ ONLY` transaction at READ COMMITTED or REPEATABLE READ, without
//!   on-commit hooks, is answered without waiting for its end: its reads are final and its end
//!   cannot fail for a logical reason, so a `ROLLBACK` is queued and completed when the
//!   connection goes back to the pool (closed if that fails). At SERIALIZABLE a read waits for
//!   its `COMMIT`, which can fail with 40001 (`docs/transactions.md`, *Ending a read without
//!   waiting*).
//! * Pool errors: no connection within `DB_POOL_TIMEOUT` is 503 `pool_timeout`; a database that
//!   cannot be reached is 503 `database_unavailable`, answered fast ([`crate::availability`]).
//! * [`with_transaction`] applies the same rules to background jobs and CLI code.
//! * [`DbFailure`] classifies a `DbErr` once (SQLSTATE, pool timeout, lost connection).
//!
//! Isolation and round trips: PostgreSQL connections carry `default_transaction_isolation` as a
//! startup parameter, and the isolation level and access mode that differ from it go into the
//! `BEGIN` statement itself (`BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY`), so a transaction
//! costs `BEGIN`, its statements and `COMMIT`, nothing more (and a read at READ COMMITTED or
//! REPEATABLE READ does not wait for its end, above). MariaDB's connections get their
//! default level when they open, and a transaction begins with one message too (`START
//! TRANSACTION READ ONLY`, or `SET TRANSACTION ISOLATION LEVEL …; START TRANSACTION` for a level
//! that differs). MariaDB does not abort a transaction whose statement failed (a `COMMIT` would
//! commit the statements before it): the recorded first failure is what forbids the commit on
//! every backend. Its deadlock (1213) and lock wait timeout (1205) are retried like 40P01. Behind a transaction-mode pooler
//! (`DB_POOLER=transaction`) nothing is kept between transactions: every `BEGIN` carries the
//! isolation level and the settings (`SET LOCAL …`) that differ from the server's defaults
//! (learned once at start-up) in the same message, and statements are
//! never prepared by name ([`Session`]). `GET` and `HEAD` run `READ ONLY`; a
//! route may declare its own level and access mode with [`Transactional::isolation`] /
//! [`Transactional::read_write`], documented where it is declared.
//!
//! Read replica (`DATABASE_REPLICA_URL`, `docs/scale-out.md`; mechanics in `routing.rs`): a
//! `READ ONLY` transaction runs on the replica, and everything else on the primary. After a write
//! commits, the response carries a consistency token (header `Consistency-Token`, cookie
//! `consistency_token`) naming the primary's WAL position. A read that sends a token back runs on
//! the replica only once the replica has replayed that position, waiting at most
//! `DB_REPLICA_MAX_WAIT_MS`, and otherwise on the primary; a read without a token never waits. A
//! replica that is down, fails to begin, or lags beyond the wait sends reads to the primary, never
//! to a 503. A read that failed on the replica (a recovery conflict's 40001, or the replica going
//! away mid-read) is re-run on the primary. A route that must see the primary's newest state
//! declares [`Transactional::primary`] with its reason.

#[cfg(feature = "postgres")]
mod abandoned;
mod decision;
mod failure;
mod idempotency;
mod lazy;
mod leak;
#[cfg(feature = "postgres")]
mod outcome;
mod peer;
mod round_trip;
mod routing;
#[cfg(feature = "postgres")]
mod server_defaults;
mod session;
#[cfg(feature = "postgres")]
pub(crate) mod side_conn;

use std::future::{Future, Ready, ready};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::Method;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError};
use futures_util::FutureExt;
use sea_orm::{AccessMode, DatabaseConnection, IsolationLevel};

#[cfg(feature = "postgres")]
pub use abandoned::Terminator;
pub use failure::{DbFailure, FailureKind};
pub use idempotency::clean_expired as clean_expired_idempotency_keys;
pub use idempotency::{
    CLEAN_ONE_IN, DEFAULT_SCOPE as DEFAULT_IDEMPOTENCY_SCOPE,
    MAX_SCOPE_LEN as MAX_IDEMPOTENCY_SCOPE_LEN,
};
use idempotency::{Claim, Idempotency, Stored};
use lazy::Slot;
pub use lazy::{Tx, TxSavepoint, TxStream};
pub use peer::on_connect;
pub use round_trip::Bounds;
use routing::ReadRoute;
pub use routing::{Lsn, Replica, ReplicaState};
pub use session::{Pooled, Session};

use crate::Error;
use crate::availability::Availability;
use crate::body::read_body;
use crate::metrics::Metrics;

/// How the transaction of every request is run: the settings' rules, and the parts the
/// [`Layer`](crate::Layer) adds (availability, admission, the replica).
#[derive(Clone, Debug)]
pub struct TxConfig {
    /// Isolation level of a transaction that declares none (`DB_ISOLATION_LEVEL`).
    pub isolation: IsolationLevel,
    /// What the connections keep between transactions: how `BEGIN` is written and statements
    /// are sent (direct, or behind a transaction-mode pooler).
    pub session: Session,
    /// Re-runs after a serialization failure or deadlock (`DB_TX_MAX_RETRIES`).
    pub max_retries: u32,
    /// How long a request whose primary was lost before `COMMIT` is re-run while a new primary
    /// takes over (`DB_FAILOVER_RETRY_MS`), on a budget of its own.
    pub failover_retry: Duration,
    /// Largest request body buffered for re-runs (`APP_BODY_LIMIT`).
    pub body_limit: usize,
    /// Fails checkouts fast while the database cannot be reached; `None` waits for the pool.
    pub availability: Option<Availability>,
    /// Bounds the requests whose handlers run at once; `None` admits all.
    pub admission: Option<Admission>,
    /// A transaction still open after this long is logged at WARN (`DB_LEAK_DETECTION_MS`).
    pub leak_warning: Option<Duration>,
    /// The streaming replica for `READ ONLY` transactions (`DATABASE_REPLICA_URL`).
    pub replica: Option<Replica>,
    /// Longest wait for the status of a transaction whose `COMMIT` reply was lost
    /// (`DB_CONNECT_TIMEOUT`: the time one new connection may take).
    pub commit_check: Duration,
    /// How long an `Idempotency-Key` and its response are kept (`DB_IDEMPOTENCY_TTL`).
    pub idempotency_ttl: Duration,
    /// How long one round trip on a transaction's connection may take before the connection
    /// is closed (`DB_CONNECT_TIMEOUT`, plus `DB_STATEMENT_TIMEOUT_MS` for statements).
    pub round_trips: Bounds,
    /// Asks the server to end the transactions the layer abandons when a round trip outlives
    /// its bound (PostgreSQL on a direct connection; `None`: left to the server's timeouts).
    #[cfg(feature = "postgres")]
    pub terminator: Option<Terminator>,
    /// The primary's failover epoch (PostgreSQL): set when a primary is lost; for
    /// `DB_FAILOVER_RETRY_MS` after it, a read-write transaction checks its server takes writes
    /// ([`crate::failover`]). `None`: no check.
    pub failover: Option<crate::failover::Failover>,
}

impl TxConfig {
    /// The transaction rules of `settings`, without availability checks or admission bounds
    /// (the server adds those).
    pub fn new(settings: &config::DatabaseSettings, body_limit: usize) -> TxConfig {
        let isolation = settings.isolation_level.to_sea_orm();
        let session = match (settings.backend(), settings.pooler) {
            (config::Backend::Postgres, config::Pooler::Transaction) => {
                Session::Pooled(Pooled::new(
                    settings.jit,
                    settings.statement_timeout,
                    settings.idle_in_transaction_timeout,
                ))
            }
            // MariaDB's sessions get the level when they connect (`SET SESSION TRANSACTION
            // ISOLATION LEVEL`, the `config` crate); a pooler is refused for it there.
            (config::Backend::Postgres | config::Backend::Mysql, config::Pooler::None) => {
                Session::Direct {
                    connection_default: Some(isolation),
                }
            }
            _ => Session::Direct {
                connection_default: None,
            },
        };
        let mut round_trips = Bounds::new(settings.statement_timeout, settings.connect_timeout);
        if let Session::Pooled { .. } = session {
            round_trips = round_trips.behind_pooler(settings.pool_timeout);
        }
        TxConfig {
            isolation,
            session,
            max_retries: settings.tx_max_retries,
            failover_retry: settings.failover_retry,
            body_limit,
            availability: None,
            admission: None,
            leak_warning: settings.leak_detection,
            replica: None,
            commit_check: settings.connect_timeout,
            idempotency_ttl: settings.idempotency_ttl,
            round_trips,
            #[cfg(feature = "postgres")]
            terminator: None,
            failover: None,
        }
    }
}

/// Bounds how many handlers of transactional routes run at once (twice the pool's connections
/// in the server); the others wait here, in arrival order, holding only their buffered body.
/// Without it a thousand concurrent clients mean a thousand handler futures and a thousand
/// checkouts queued in the pool, which costs memory and wake-ups for no extra throughput. The
/// headroom above the pool size lets requests that do not query, or are between queries, go on
/// while every connection is busy. A request that cannot get in within `DB_POOL_TIMEOUT` gets
/// 503 `pool_timeout`, as it would have from the pool.
#[derive(Clone, Debug)]
pub struct Admission {
    permits: Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

impl Admission {
    /// At most `permits` requests run their handlers at once; the others wait up to `wait`.
    pub fn new(permits: usize, wait: Duration) -> Admission {
        Admission {
            permits: Arc::new(tokio::sync::Semaphore::new(permits.max(1))),
            wait,
        }
    }

    /// Waits for a turn, up to the wait given to [`Admission::new`].
    pub async fn enter(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        self.enter_until(tokio::time::Instant::now() + self.wait)
            .await
    }

    /// Waits for a turn until `deadline`: the request's one `DB_POOL_TIMEOUT`, which the pool
    /// checkout that follows spends the rest of. A free turn is taken without a timer: tokio's
    /// semaphore hands a released permit to the first waiter, so a permit is free only when
    /// nobody waits, and taking it does not jump the queue.
    pub async fn enter_until(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(permit);
        }
        match tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(Error::PoolTimeout),
        }
    }

    /// How long a request may wait for its turn and its connection together.
    pub fn wait(&self) -> Duration {
        self.wait
    }
}

/// What a route or job declares about its transaction. Unset fields take the defaults: the
/// configured isolation, `READ ONLY` for `GET`/`HEAD`, `READ WRITE` otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct TxPolicy {
    /// The isolation level; `None` takes `DB_ISOLATION_LEVEL`.
    pub isolation: Option<IsolationLevel>,
    /// `READ ONLY` or `READ WRITE`; `None` takes the method's (`GET`/`HEAD` read only).
    pub access: Option<AccessMode>,
    /// Never read from the replica.
    pub primary: bool,
}

/// How a request's transaction ended, for the request log and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// No statement was run: no transaction was opened.
    None,
    /// Committed.
    Commit,
    /// Rolled back (or never committed).
    Rollback,
    /// The `COMMIT` was sent, its reply lost, and its outcome could not be established.
    Unknown,
}

impl TxOutcome {
    /// `none`, `commit`, `rollback` or `unknown`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TxOutcome::None => "none",
            TxOutcome::Commit => "commit",
            TxOutcome::Rollback => "rollback",
            TxOutcome::Unknown => "unknown",
        }
    }
}

/// Left in the request's extensions by [`Transactional`] for the request logger.
#[derive(Clone, Copy, Debug)]
pub struct TxReport {
    /// How the request's last transaction ended.
    pub outcome: TxOutcome,
    /// How many times the request was re-run.
    pub retries: u32,
}

// ---------------------------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------------------------

/// Full-jitter exponential backoff: a random wait up to 2 ms · 2^attempt, capped at 50 ms. Short,
/// because the conflicting transaction has usually just committed when 40001 is raised.
fn backoff(attempt: u32) -> Duration {
    full_jitter(Duration::from_millis(2), Duration::from_millis(50), attempt)
}

/// The wait before re-running a request whose primary was lost: up to 50 ms · 2^attempt,
/// capped at one second. Longer than a conflict's: a new primary takes a moment to be promoted
/// and routed to.
fn failover_backoff(attempt: u32) -> Duration {
    full_jitter(Duration::from_millis(50), Duration::from_secs(1), attempt)
}

/// A random wait between a quarter of and the whole of `first` · 2^attempt, at most `cap`.
fn full_jitter(first: Duration, cap: Duration, attempt: u32) -> Duration {
    let cap_us = (first.as_micros() << attempt.min(5)).min(cap.as_micros()) as u64;
    Duration::from_micros(fastrand::u64(cap_us / 4..=cap_us))
}

fn is_read_only_method(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Reads a response's body into memory (to store it for an `Idempotency-Key`), and the parts
/// worth replaying.
async fn buffer(res: HttpResponse) -> (HttpResponse, Option<Stored>) {
    let (status, headers) = (res.status(), res.headers().clone());
    let (res, body) = res.into_parts();
    match actix_web::body::to_bytes(body).await {
        Ok(bytes) => {
            let stored = Stored::of(status, &headers, &bytes);
            (res.set_body(BoxBody::new(bytes)), stored)
        }
        Err(_) => (Error::Internal.error_response(), None),
    }
}

/// The last touches of every transactional reply: the consistency token when `issue_token` (a
/// committed write, or the replay of one) and a replica is configured, and how the transaction
/// ended, for the request logger.
async fn finish_reply(
    mut reply: ServiceResponse,
    issue_token: bool,
    config: &TxConfig,
    primary: &DatabaseConnection,
    report: TxReport,
) -> ServiceResponse {
    if issue_token && config.replica.is_some() {
        routing::attach_token(reply.headers_mut(), primary).await;
    }
    reply.request().extensions_mut().insert(report);
    reply
}

// ---------------------------------------------------------------------------------------------
// Background jobs and CLI code
// ---------------------------------------------------------------------------------------------

/// Why [`with_transaction`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum TxError<E> {
    /// The closure failed; the transaction was rolled back.
    #[error("{0}")]
    Job(E),
    /// The database failed (at a statement the closure ignored, or at commit), or conflicts
    /// outlasted the retries.
    #[error("database failure: {}", .0.message)]
    Database(DbFailure),
}

/// Runs `job` in one transaction with the same rules as a request: commit when it returns `Ok`
/// and no statement failed, roll back otherwise, re-run on serialization failure or deadlock up
/// to `config.max_retries` times. The closure may run more than once.
pub async fn with_transaction<T, E, F>(
    db: &DatabaseConnection,
    config: &TxConfig,
    policy: TxPolicy,
    mut job: F,
) -> Result<T, TxError<E>>
where
    F: for<'a> FnMut(&'a Tx) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'a>>,
{
    let mut attempt = 0;
    loop {
        let tx = Tx(Arc::new(Slot::new(db.clone(), config, policy, false, None)));
        let result = leak::watched(&tx.0, "", job(&tx)).await;
        let (_, failure) = tx.0.finish(result.is_ok()).await;
        if failure.is_none() && result.is_ok() {
            tx.0.run_on_commit_hooks();
        }
        match failure {
            Some(f) if f.is_retryable() && attempt < config.max_retries => {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Some(f) => return Err(TxError::Database(f)),
            None => return result.map_err(TxError::Job),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The middleware
// ---------------------------------------------------------------------------------------------

/// Maps a database failure the layer does not answer itself (a constraint violation, a value
/// out of range) to the service's own response; `None` leaves it to the layer (500 `internal`).
pub type FailureMap = Arc<dyn Fn(&DbFailure) -> Option<HttpResponse> + Send + Sync>;

/// The scope of a request's `Idempotency-Key` (the authenticated user or API client); `None`
/// is [`DEFAULT_IDEMPOTENCY_SCOPE`]. See
/// [`LayerBuilder::idempotency_scope`](crate::LayerBuilder::idempotency_scope).
pub type IdempotencyScope = Arc<dyn Fn(&HttpRequest) -> Option<String> + Send + Sync>;

/// What every transactional route of one [`Layer`](crate::Layer) shares.
pub(crate) struct Shared {
    pub(crate) db: DatabaseConnection,
    pub(crate) config: TxConfig,
    pub(crate) metrics: Metrics,
    pub(crate) on_failure: Option<FailureMap>,
    pub(crate) idempotency_scope: Option<IdempotencyScope>,
}

impl Shared {
    /// The response for a failure that ends the request: the service's mapping first.
    fn answer(&self, failure: DbFailure) -> HttpResponse {
        if let Some(response) = self.on_failure.as_ref().and_then(|map| map(&failure)) {
            return response;
        }
        Error::from(failure).error_response()
    }
}

/// Runs the wrapped route in a transaction (see the module documentation). Made by
/// [`Layer::transactional`](crate::Layer::transactional), so it always has the pools and rules
/// it needs. Wrap routes, not the app: the retry loop re-dispatches the request to the route's
/// handler, which is safe only once routing is done.
#[derive(Clone)]
pub struct Transactional {
    policy: TxPolicy,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Transactional {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactional")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Transactional {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Transactional {
            policy: TxPolicy::default(),
            shared,
        }
    }

    /// Run this route at `level` instead of `DB_ISOLATION_LEVEL`.
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.policy.isolation = Some(level);
        self
    }

    /// Run this route `READ WRITE` even for `GET`.
    pub fn read_write(mut self) -> Self {
        self.policy.access = Some(AccessMode::ReadWrite);
        self
    }

    /// Never run this route on the replica, even with a consistency token that it has
    /// replayed (for reads that must see other clients' newest writes).
    pub fn primary(mut self) -> Self {
        self.policy.primary = true;
        self
    }
}

impl<S, B> Transform<S, ServiceRequest> for Transactional
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Transform = TransactionalService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(TransactionalService {
            service: Rc::new(service),
            policy: self.policy,
            shared: Arc::clone(&self.shared),
        }))
    }
}

/// The service [`Transactional`] wraps around a route.
pub struct TransactionalService<S> {
    service: Rc<S>,
    policy: TxPolicy,
    shared: Arc<Shared>,
}

impl<S, B> Service<ServiceRequest> for TransactionalService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let (service, policy) = (Rc::clone(&self.service), self.policy);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let (http, mut payload) = req.into_parts();
            let request = match Request::read(service, shared, policy, http, &mut payload).await {
                Ok(request) => request,
                Err(refused) => return Ok(refused),
            };
            // One `DB_POOL_TIMEOUT` per request: the admission queue and the pool checkout share
            // it, so a request is answered 503 `pool_timeout` after it at the latest.
            let _admitted = match request.admit().await {
                Ok(permit) => permit,
                Err(e) => return Ok(request.reply_with(e.error_response())),
            };
            let mut read = request.read_route();
            let mut retries = 0;
            // When the primary was first lost, and the re-runs made since (their own budget).
            let mut failover: Option<(Instant, u32)> = None;
            loop {
                let slot = Arc::new(request.slot(read.as_ref()));
                let response = match request.claim_and_run(&slot, retries).await {
                    Ran::Handler(response) => response,
                    Ran::Answered(reply) => return Ok(reply),
                };
                let (leaked, client_gone) = request.handles_and_peer(&slot, &response);
                let success = decision::may_commit(is_ok(&response), leaked, client_gone);
                let (response, stored) = request
                    .keep_for_key(&slot, response, success, client_gone)
                    .await;
                let (outcome, failure) = request.end(&slot, success).await;
                if slot.on_replica() && failure.is_some() {
                    // A re-run reads from the primary: the replica cancelled or lost it.
                    if let Some(read) = &mut read {
                        read.replica = None;
                    }
                }
                let primary_lost = failure
                    .as_ref()
                    .is_some_and(|f| f.kind == FailureKind::PrimaryLost && !slot.on_replica());
                if primary_lost && failover.is_none() {
                    failover = Some((Instant::now(), 0));
                }
                let window = request.shared.config.failover_retry;
                let next = decision::next(&decision::Ended {
                    meant_to_commit: success,
                    failure: failure.as_ref(),
                    leaked,
                    client_gone,
                    on_replica: slot.on_replica(),
                    retries,
                    max_retries: request.shared.config.max_retries,
                    failover_left: failover.is_none_or(|(since, _)| since.elapsed() < window),
                });
                if let decision::Next::Rerun { .. } = next {
                    drop(response);
                    match &mut failover {
                        // A primary lost: its own budget, DB_FAILOVER_RETRY_MS.
                        Some((since, reruns)) if primary_lost => {
                            let left = window.saturating_sub(since.elapsed());
                            tokio::time::sleep(failover_backoff(*reruns).min(left)).await;
                            *reruns += 1;
                            request.shared.metrics.count_rerun("primary_lost");
                        }
                        _ => {
                            tokio::time::sleep(backoff(retries)).await;
                            retries += 1;
                            request.shared.metrics.count_retry();
                        }
                    }
                    continue;
                }
                let reply = request
                    .answer(next, failure, response, stored, outcome)
                    .await;
                let report = TxReport { outcome, retries };
                let committed_write = outcome == TxOutcome::Commit && request.writes;
                return Ok(request.finish(reply, committed_write, report).await);
            }
        })
    }
}

/// What the handler gave, before the decision: its response, or an error response.
type Response = Result<ServiceResponse<BoxBody>, HttpResponse>;

fn is_ok(response: &Response) -> bool {
    matches!(response, Ok(res) if res.status().as_u16() < 400)
}

/// What an attempt came to before the decision.
enum Ran {
    /// The handler ran (or the key's claim failed, recorded in the slot).
    Handler(Response),
    /// The `Idempotency-Key` answered without running the handler: a replay, 409 or 422.
    Answered(ServiceResponse),
}

/// One request through [`Transactional`]: what stays the same across its attempts.
struct Request<S> {
    service: Rc<S>,
    shared: Arc<Shared>,
    policy: TxPolicy,
    http: HttpRequest,
    /// The body, kept for re-runs.
    body: actix_web::web::Bytes,
    deadline: Option<tokio::time::Instant>,
    idempotency: Option<Idempotency>,
    read_only_default: bool,
    writes: bool,
    route: String,
}

impl<S, B> Request<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    /// Buffers the body and reads the `Idempotency-Key`; a refusal (413, a malformed key) is
    /// the reply.
    async fn read(
        service: Rc<S>,
        shared: Arc<Shared>,
        policy: TxPolicy,
        http: HttpRequest,
        payload: &mut Payload,
    ) -> Result<Self, ServiceResponse> {
        let config = &shared.config;
        let refuse = |e: Error| ServiceResponse::new(http.clone(), e.error_response());
        let body = read_body(payload, config.body_limit)
            .await
            .map_err(refuse)?;
        let key = http.uri().path_and_query().map_or("", |p| p.as_str());
        let scope = || {
            shared
                .idempotency_scope
                .as_ref()
                .and_then(|scope| scope(&http))
        };
        let idempotency =
            Idempotency::read(http.method(), key, http.headers(), &body, scope).map_err(refuse)?;
        let read_only_default = is_read_only_method(http.method());
        let writes = policy
            .access
            .map_or(!read_only_default, |a| a == AccessMode::ReadWrite);
        let route = http
            .match_pattern()
            .unwrap_or_else(|| http.path().to_owned());
        let deadline = config
            .admission
            .as_ref()
            .map(|a| tokio::time::Instant::now() + a.wait());
        Ok(Request {
            service,
            shared,
            policy,
            http,
            body,
            deadline,
            idempotency,
            read_only_default,
            writes,
            route,
        })
    }

    async fn admit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Error> {
        match (&self.shared.config.admission, self.deadline) {
            (Some(admission), Some(deadline)) => admission.enter_until(deadline).await.map(Some),
            _ => Ok(None),
        }
    }

    fn read_route(&self) -> Option<ReadRoute> {
        let replica = self.shared.config.replica.clone();
        (!self.writes).then(|| ReadRoute {
            replica: replica.filter(|_| !self.policy.primary),
            token: routing::token_of(&self.http),
        })
    }

    /// The transaction of one attempt, not yet begun.
    fn slot(&self, read: Option<&ReadRoute>) -> Slot {
        let shared = &self.shared;
        let metrics = Some(shared.metrics.clone());
        let slot = Slot::new(
            shared.db.clone(),
            &shared.config,
            self.policy,
            self.read_only_default,
            metrics,
        )
        .checkout_until(self.deadline)
        .labelled(self.route.clone());
        match read {
            Some(read) => slot.reading(read.clone()),
            None => slot,
        }
    }

    /// Claims the `Idempotency-Key` first (a replay, a duplicate still running or a reused key
    /// is answered without the handler, and rolled back), then runs the handler with the
    /// attempt's transaction in the request's extensions, catching a panic.
    async fn claim_and_run(&self, slot: &Arc<Slot>, retries: u32) -> Ran {
        let claim = match &self.idempotency {
            Some(idempotency) => Some(idempotency.claim(&Tx(Arc::clone(slot))).await),
            None => None,
        };
        match claim {
            None | Some(Ok(Claim::Proceed)) => Ran::Handler(self.run_handler(slot).await),
            Some(Ok(early)) => Ran::Answered(self.answer_early(slot, early, retries).await),
            // The failure is recorded in the slot: retried or answered by the decision.
            Some(Err(e)) => Ran::Handler(Err(self.shared.answer(DbFailure::classify(&e)))),
        }
    }

    async fn run_handler(&self, slot: &Arc<Slot>) -> Response {
        self.http.extensions_mut().insert(Arc::clone(slot));
        // An empty body needs no payload stream (two allocations for the bytes of a `GET`).
        let payload = match self.body.is_empty() {
            true => Payload::None,
            false => Payload::from(self.body.clone()),
        };
        let attempt = ServiceRequest::from_parts(self.http.clone(), payload);
        let handler = leak::watched(slot, &self.route, self.service.call(attempt));
        let result = AssertUnwindSafe(handler).catch_unwind().await;
        self.http.extensions_mut().remove::<Arc<Slot>>();
        match result {
            Ok(Ok(res)) => {
                // A handler that returned the layer's own `Error::Database` (`?` on a `DbErr`;
                // actix made it a response that keeps the error) gets the service's mapping of
                // it, as a failure it swallowed would.
                let failure = match res.response().error().map(|e| e.as_error::<Error>()) {
                    Some(Some(Error::Database(failure))) => Some(failure.clone()),
                    _ => None,
                };
                match failure {
                    Some(failure) => Err(self.shared.answer(failure)),
                    None => Ok(res.map_into_boxed_body()),
                }
            }
            Ok(Err(e)) => Err(e.error_response()),
            Err(_) => {
                tracing::error!("handler panicked; rolling back");
                Err(Error::Internal.error_response())
            }
        }
    }

    async fn answer_early(&self, slot: &Slot, early: Claim, retries: u32) -> ServiceResponse {
        let metrics = &self.shared.metrics;
        let (outcome, _) = slot.finish(false).await;
        metrics.count_transaction(outcome);
        let replay = matches!(early, Claim::Replay(_));
        let answer = match early {
            Claim::Replay(stored) => {
                metrics.count_replay();
                stored.replay()
            }
            Claim::InUse => Error::IdempotencyKeyInUse.error_response(),
            Claim::Reused | Claim::Proceed => Error::IdempotencyKeyReused.error_response(),
        };
        // The replayed writes committed at or before the primary's position now: the client
        // reads them back like a first answer's.
        let report = TxReport { outcome, retries };
        self.finish(self.reply_with(answer), replay, report).await
    }

    /// Whether a handle to the transaction outlived the handler (cloned into a spawned task:
    /// whatever it writes would run after the answer, or fail unseen), and whether the client
    /// left before the commit of a successful answer. Both mean a rollback.
    fn handles_and_peer(&self, slot: &Arc<Slot>, response: &Response) -> (bool, bool) {
        let leaked = Arc::strong_count(slot) > 1;
        if leaked {
            tracing::error!(
                route = %self.route,
                "a transaction handle outlived its request (cloned into a task?); rolling back"
            );
            self.shared.metrics.count_leak();
        }
        // A transaction whose end changes nothing (a read) is not worth a system call.
        let client_gone = is_ok(response)
            && !leaked
            && !slot.end_changes_nothing()
            && peer::client_gone(&self.http);
        if client_gone {
            tracing::warn!("the client went away before the commit; rolling back");
        }
        (leaked, client_gone)
    }

    /// The response of a request with a key is kept: stored with the writes before `COMMIT`
    /// when below 400 (so the key is stored if and only if they commit), or after the rollback
    /// when 4xx. A live row found by the store is a duplicate that committed first: the attempt
    /// fails as a conflict, is re-run, and the re-run replays it.
    async fn keep_for_key(
        &self,
        slot: &Arc<Slot>,
        response: Response,
        success: bool,
        client_gone: bool,
    ) -> (Response, Option<Stored>) {
        let Some(idempotency) = self.idempotency.as_ref().filter(|_| !client_gone) else {
            return (response, None);
        };
        let (response, stored) = match response {
            Ok(res) => {
                let (req, res) = res.into_parts();
                let (res, stored) = buffer(res).await;
                (Ok(ServiceResponse::new(req, res)), stored)
            }
            Err(res) => {
                let (res, stored) = buffer(res).await;
                (Err(res), stored)
            }
        };
        if let (true, Some(stored)) = (success, &stored) {
            let ttl = self.shared.config.idempotency_ttl;
            match idempotency.store(&Tx(Arc::clone(slot)), stored, ttl).await {
                // What resolves a COMMIT whose reply is lost across a promotion.
                Ok(Some(record)) => slot.commits_record(record),
                Ok(None) => slot.fail_as_conflict("the Idempotency-Key was stored concurrently"),
                // Recorded in the slot: the decision answers it.
                Err(_) => {}
            }
        }
        (response, stored)
    }

    /// Commits or rolls back, counts it, and runs the on-commit hooks of the attempt that
    /// committed (or never needed to).
    async fn end(&self, slot: &Slot, success: bool) -> (TxOutcome, Option<DbFailure>) {
        let (outcome, failure) = slot.finish(success).await;
        self.shared.metrics.count_transaction(outcome);
        if failure.is_none() && success {
            slot.run_on_commit_hooks();
        }
        (outcome, failure)
    }

    /// The reply the decision calls for. Nothing was committed on `Fail`: whatever the handler
    /// answered, the client learns the truth.
    async fn answer(
        &self,
        next: decision::Next,
        failure: Option<DbFailure>,
        response: Response,
        stored: Option<Stored>,
        outcome: TxOutcome,
    ) -> ServiceResponse {
        let error = match (next, failure) {
            (decision::Next::Fail, Some(f)) => self.shared.answer(f),
            (decision::Next::ClientClosed, _) => Error::ClientClosedRequest.error_response(),
            (decision::Next::Answer, _) => {
                self.after_answer(stored, outcome).await;
                return match response {
                    Ok(res) => res,
                    Err(res) => self.reply_with(res),
                };
            }
            _ => Error::Internal.error_response(),
        };
        self.reply_with(error)
    }

    /// After a handler's own answer with a key: expired keys are cleaned now and then, and a
    /// 4xx (which wrote nothing) is stored in a transaction of its own, unless a duplicate
    /// stored one first.
    async fn after_answer(&self, stored: Option<Stored>, outcome: TxOutcome) {
        let (Some(idempotency), Some(stored)) = (&self.idempotency, stored) else {
            return;
        };
        let (db, config) = (&self.shared.db, &self.shared.config);
        if outcome == TxOutcome::Commit && idempotency::clean_now() {
            idempotency::spawn_clean(db.clone(), config.clone());
        } else if stored.status >= 400 {
            let kept = with_transaction(db, config, self.policy, |tx| {
                let (idempotency, stored) = (idempotency.clone(), stored.clone());
                let ttl = config.idempotency_ttl;
                Box::pin(async move { idempotency.store(tx, &stored, ttl).await })
            })
            .await;
            if let Err(e) = kept {
                tracing::warn!(error = %e, "storing a 4xx for its Idempotency-Key failed");
            }
        }
    }

    fn reply_with(&self, response: HttpResponse) -> ServiceResponse {
        ServiceResponse::new(self.http.clone(), response)
    }

    async fn finish(
        &self,
        reply: ServiceResponse,
        issue_token: bool,
        report: TxReport,
    ) -> ServiceResponse {
        finish_reply(
            reply,
            issue_token,
            &self.shared.config,
            &self.shared.db,
            report,
        )
        .await
    }
}
