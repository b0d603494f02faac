//! The request's database transaction: every rule about when it begins, commits, rolls back and
//! is retried lives in this one module.
//!
//! * [`Transactional`] is an actix-web middleware wrapped around a route (`web::post().wrap(..)`).
//!   It buffers the request body (bounded by `APP_BODY_LIMIT`), runs the handler, and then decides:
//!   commit when the response is below 400 and no statement failed, otherwise roll back. A
//!   serialization failure (40001) or deadlock (40P01), raised by a statement or by the commit,
//!   rolls back and runs the whole request again with its body, up to `DB_TX_MAX_RETRIES` times
//!   with jittered backoff, then answers 503 `serialization_failure`. A commit that fails replaces
//!   the handler's response: the client never sees a success for work that was not committed.
//! * [`Tx`] is the extractor through which a handler reaches the transaction. It implements
//!   SeaORM's `ConnectionTrait`, so domain functions taking `&impl ConnectionTrait` run inside it.
//!   It is lazy: `BEGIN` is sent with the first statement, so a request that never queries takes
//!   no connection from the pool. Every statement error passes through it and is recorded,
//!   because PostgreSQL turns the `COMMIT` of an aborted transaction into a rollback while the
//!   driver reports success: a request whose statement failed is never answered 2xx.
//! * [`with_transaction`] applies the same rules to background jobs and CLI code.
//! * [`DbFailure`] classifies a `DbErr` once (SQLSTATE, pool timeout, lost connection).
//!
//! Isolation: PostgreSQL connections carry `default_transaction_isolation` as a startup
//! parameter, so a plain `BEGIN` already runs at `DB_ISOLATION_LEVEL` with no extra round trip.
//! `GET` and `HEAD` run `READ ONLY`; a route may declare its own level and access mode with
//! [`Transactional::isolation`] / [`Transactional::read_write`], documented where it is declared.
//! Either costs one `SET TRANSACTION` round trip (SeaORM sends it after `BEGIN`).

use std::future::{Future, Ready, ready};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::Method;
use actix_web::web::{Bytes, BytesMut};
use actix_web::{FromRequest, HttpMessage, HttpRequest, ResponseError, web};
use futures_util::{FutureExt, StreamExt};
use sea_orm::sqlx;
use sea_orm::{
    AccessMode, ConnAcquireErr, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, ExecResult, IsolationLevel, QueryResult, RuntimeErr, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait,
};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::metrics::Metrics;
use crate::problem::ApiError;

/// How the transaction of every request is run; shared as `web::Data<TxConfig>`.
#[derive(Clone, Debug)]
pub struct TxConfig {
    /// Isolation level of a transaction that declares none (`DB_ISOLATION_LEVEL`).
    pub isolation: IsolationLevel,
    /// Whether connections already carry `isolation` as their default (PostgreSQL startup
    /// parameter), so that `BEGIN` needs no `SET TRANSACTION` for it.
    pub isolation_is_connection_default: bool,
    /// Re-runs after a serialization failure or deadlock (`DB_TX_MAX_RETRIES`).
    pub max_retries: u32,
    /// Largest request body buffered for re-runs (`APP_BODY_LIMIT`).
    pub body_limit: usize,
}

/// What a route or job declares about its transaction. Unset fields take the defaults: the
/// configured isolation, `READ ONLY` for `GET`/`HEAD`, `READ WRITE` otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct TxPolicy {
    pub isolation: Option<IsolationLevel>,
    pub access: Option<AccessMode>,
}

/// How a request's transaction ended, for the request log and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// No statement was run: no transaction was opened.
    None,
    Commit,
    Rollback,
}

impl TxOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TxOutcome::None => "none",
            TxOutcome::Commit => "commit",
            TxOutcome::Rollback => "rollback",
        }
    }
}

/// Left in the request's extensions by [`Transactional`] for the request logger.
#[derive(Clone, Copy, Debug)]
pub struct TxReport {
    pub outcome: TxOutcome,
    pub retries: u32,
}

// ---------------------------------------------------------------------------------------------
// Classification of database errors
// ---------------------------------------------------------------------------------------------

/// What went wrong in the database, decided once from a `DbErr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// SQLSTATE 40001: retry the whole transaction.
    SerializationFailure,
    /// SQLSTATE 40P01: retry the whole transaction.
    Deadlock,
    /// SQLSTATE 23505, with the constraint's name when the server gives it.
    UniqueViolation(Option<String>),
    /// SQLSTATE 23503.
    ForeignKeyViolation(Option<String>),
    /// SQLSTATE 23514.
    CheckViolation(Option<String>),
    /// SQLSTATE 22003: a value left its column's range.
    OutOfRange,
    /// SQLSTATE 57014: `statement_timeout` (or a cancel).
    StatementTimeout,
    /// No connection within the pool's acquire timeout.
    PoolTimeout,
    /// The connection or the server went away.
    Unavailable,
    /// Anything else: a bug or an unexpected server condition.
    Other,
}

impl FailureKind {
    /// A short text safe to show to an operator (no SQL, no server text).
    pub fn describe(&self) -> &'static str {
        match self {
            FailureKind::SerializationFailure => "serialization failure",
            FailureKind::Deadlock => "deadlock",
            FailureKind::UniqueViolation(_) => "unique violation",
            FailureKind::ForeignKeyViolation(_) => "foreign key violation",
            FailureKind::CheckViolation(_) => "check violation",
            FailureKind::OutOfRange => "value out of range",
            FailureKind::StatementTimeout => "statement timeout",
            FailureKind::PoolTimeout => "no pooled connection became free in time",
            FailureKind::Unavailable => "the database cannot be reached",
            FailureKind::Other => "database error",
        }
    }
}

/// A classified database error. `message` is for logs only: it may carry SQL and server text.
#[derive(Clone, Debug)]
pub struct DbFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl DbFailure {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::SerializationFailure | FailureKind::Deadlock
        )
    }

    pub fn classify(err: &DbErr) -> DbFailure {
        let kind = match err {
            DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => FailureKind::PoolTimeout,
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => FailureKind::Unavailable,
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
                classify_sqlx(e)
            }
            DbErr::Exec(RuntimeErr::Internal(_)) | DbErr::Query(RuntimeErr::Internal(_)) => {
                FailureKind::Other
            }
            _ => FailureKind::Other,
        };
        DbFailure {
            kind,
            message: err.to_string(),
        }
    }
}

fn classify_sqlx(err: &sqlx::Error) -> FailureKind {
    match err {
        sqlx::Error::Database(db) => {
            let constraint = db.constraint().map(str::to_owned);
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                "40001" => FailureKind::SerializationFailure,
                "40P01" => FailureKind::Deadlock,
                "23505" => FailureKind::UniqueViolation(constraint),
                "23503" => FailureKind::ForeignKeyViolation(constraint),
                "23514" => FailureKind::CheckViolation(constraint),
                "22003" => FailureKind::OutOfRange,
                "57014" => FailureKind::StatementTimeout,
                // connection exceptions, admin shutdown, crash recovery, too many connections
                c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                    FailureKind::Unavailable
                }
                // SQLite reports constraint failures by extended result code
                "2067" | "1555" => FailureKind::UniqueViolation(constraint),
                "787" => FailureKind::ForeignKeyViolation(constraint),
                "275" => FailureKind::CheckViolation(constraint),
                // SQLITE_BUSY / SQLITE_LOCKED: another writer holds the lock; retry like 40001
                "5" | "6" | "517" | "261" => FailureKind::SerializationFailure,
                _ => FailureKind::Other,
            }
        }
        sqlx::Error::PoolTimedOut => FailureKind::PoolTimeout,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => FailureKind::Unavailable,
        _ => FailureKind::Other,
    }
}

impl From<DbFailure> for ApiError {
    fn from(f: DbFailure) -> ApiError {
        match f.kind {
            FailureKind::SerializationFailure | FailureKind::Deadlock => {
                ApiError::SerializationFailure
            }
            FailureKind::UniqueViolation(_) => {
                ApiError::AlreadyExists("a record with the same unique key exists".into())
            }
            FailureKind::CheckViolation(Some(c)) if c.contains("quantity") => {
                ApiError::InsufficientStock("the stock would become negative".into())
            }
            FailureKind::ForeignKeyViolation(_) => {
                ApiError::NotFound("a referenced record does not exist".into())
            }
            FailureKind::PoolTimeout => ApiError::PoolTimeout,
            FailureKind::Unavailable => ApiError::DatabaseUnavailable,
            FailureKind::OutOfRange => {
                ApiError::Validation("quantity: the result would exceed the supported range".into())
            }
            FailureKind::StatementTimeout | FailureKind::CheckViolation(_) | FailureKind::Other => {
                tracing::error!(error = %f.message, "database error");
                ApiError::Internal
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lazy transaction of one attempt
// ---------------------------------------------------------------------------------------------

enum State {
    /// Nothing sent yet.
    Idle,
    Open(DatabaseTransaction),
    /// Committed, rolled back, or abandoned after a failed `BEGIN`.
    Finished,
}

struct Slot {
    db: DatabaseConnection,
    options: TransactionOptions,
    metrics: Option<Metrics>,
    state: Mutex<State>,
    /// The first statement failure of this attempt (later ones are its consequences).
    failure: StdMutex<Option<DbFailure>>,
}

impl Slot {
    fn new(
        db: DatabaseConnection,
        config: &TxConfig,
        policy: TxPolicy,
        read_only_default: bool,
        metrics: Option<Metrics>,
    ) -> Slot {
        let backend = db.get_database_backend();
        let access = policy.access.unwrap_or(if read_only_default {
            AccessMode::ReadOnly
        } else {
            AccessMode::ReadWrite
        });
        let isolation = policy.isolation.unwrap_or(config.isolation);
        let options = match backend {
            // SQLite has one writer: take the write lock at BEGIN so that two writers queue on
            // busy_timeout instead of failing when a reader upgrades. Isolation does not apply.
            DbBackend::Sqlite => TransactionOptions {
                isolation_level: None,
                access_mode: None,
                sqlite_transaction_mode: (access == AccessMode::ReadWrite)
                    .then_some(SqliteTransactionMode::Immediate),
            },
            _ => TransactionOptions {
                isolation_level: (!(config.isolation_is_connection_default
                    && isolation == config.isolation))
                    .then_some(isolation),
                access_mode: (access == AccessMode::ReadOnly).then_some(AccessMode::ReadOnly),
                sqlite_transaction_mode: None,
            },
        };
        Slot {
            db,
            options,
            metrics,
            state: Mutex::new(State::Idle),
            failure: StdMutex::new(None),
        }
    }

    /// The open transaction, begun on first use.
    async fn open(&self) -> Result<MappedMutexGuard<'_, DatabaseTransaction>, DbErr> {
        let mut state = self.state.lock().await;
        if matches!(*state, State::Idle) {
            let started = Instant::now();
            let begun = self.db.begin_with_options(self.options).await;
            if let Some(m) = &self.metrics {
                m.observe_acquire(started.elapsed());
            }
            match begun {
                Ok(tx) => *state = State::Open(tx),
                Err(e) => {
                    *state = State::Finished;
                    return Err(self.record(e));
                }
            }
        }
        MutexGuard::try_map(state, |s| match s {
            State::Open(tx) => Some(tx),
            _ => None,
        })
        .map_err(|_| DbErr::Custom("the request's transaction has already ended".into()))
    }

    fn record(&self, err: DbErr) -> DbErr {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            *failure = Some(DbFailure::classify(&err));
        }
        err
    }

    fn observe<T>(&self, result: Result<T, DbErr>) -> Result<T, DbErr> {
        result.map_err(|e| self.record(e))
    }

    fn failure(&self) -> Option<DbFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends the attempt: commits when `commit` is asked and no statement failed, else rolls back.
    /// Returns how it ended, or the failure that must replace the response.
    async fn finish(&self, commit: bool) -> (TxOutcome, Option<DbFailure>) {
        let state = std::mem::replace(&mut *self.state.lock().await, State::Finished);
        let failure = self.failure();
        let State::Open(tx) = state else {
            return (TxOutcome::None, failure);
        };
        if commit && failure.is_none() {
            match tx.commit().await {
                Ok(()) => (TxOutcome::Commit, None),
                Err(e) => (TxOutcome::Rollback, Some(DbFailure::classify(&e))),
            }
        } else {
            if let Err(e) = tx.rollback().await {
                // The connection is discarded by the driver; nothing was committed.
                tracing::warn!(error = %e, "rollback failed");
            }
            (TxOutcome::Rollback, failure)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The extractor
// ---------------------------------------------------------------------------------------------

/// The request's transaction, as a handler sees it. Pass `&tx` to any function taking
/// `&impl ConnectionTrait`. Fails to extract (500) on a route without [`Transactional`].
#[derive(Clone)]
pub struct Tx(Arc<Slot>);

impl FromRequest for Tx {
    type Error = ApiError;
    type Future = Ready<Result<Tx, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(match req.extensions().get::<Arc<Slot>>() {
            Some(slot) => Ok(Tx(Arc::clone(slot))),
            None => {
                tracing::error!("a handler asked for Tx on a route without Transactional");
                Err(ApiError::Internal)
            }
        })
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Tx {
    fn get_database_backend(&self) -> DbBackend {
        self.0.db.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let tx = self.0.open().await?;
        let result = tx.execute_raw(stmt).await;
        self.0.observe(result)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        let tx = self.0.open().await?;
        let result = tx.execute_unprepared(sql).await;
        self.0.observe(result)
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        let tx = self.0.open().await?;
        let result = tx.query_one_raw(stmt).await;
        self.0.observe(result)
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let tx = self.0.open().await?;
        let result = tx.query_all_raw(stmt).await;
        self.0.observe(result)
    }
}

// ---------------------------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------------------------

/// Full-jitter exponential backoff: a random wait up to 2 ms · 2^attempt, capped at 50 ms. Short,
/// because the conflicting transaction has usually just committed when 40001 is raised.
fn backoff(attempt: u32) -> Duration {
    let cap_us = (2_000u64 << attempt.min(5)).min(50_000);
    Duration::from_micros(fastrand::u64(cap_us / 4..=cap_us))
}

fn is_read_only_method(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
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
        let result = job(&tx).await;
        let (_, failure) = tx.0.finish(result.is_ok()).await;
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

/// Runs the wrapped route in a transaction (see the module documentation). Wrap routes, not the
/// app: the retry loop re-dispatches the request to the route's handler, which is safe only once
/// routing is done. Needs `web::Data<DatabaseConnection>` and `web::Data<TxConfig>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transactional {
    policy: TxPolicy,
}

impl Transactional {
    pub fn new() -> Self {
        Self::default()
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
        }))
    }
}

pub struct TransactionalService<S> {
    service: Rc<S>,
    policy: TxPolicy,
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
        let service = Rc::clone(&self.service);
        let policy = self.policy;
        Box::pin(async move {
            let (db, config) = match (
                req.app_data::<web::Data<DatabaseConnection>>(),
                req.app_data::<web::Data<TxConfig>>(),
            ) {
                (Some(db), Some(config)) => (db.clone(), config.clone()),
                _ => {
                    tracing::error!(
                        "Transactional needs Data<DatabaseConnection> and Data<TxConfig>"
                    );
                    return Ok(req.error_response(ApiError::Internal));
                }
            };
            let metrics = req
                .app_data::<web::Data<Metrics>>()
                .map(|m| m.get_ref().clone());
            let (http, mut payload) = req.into_parts();
            let body = match read_body(&mut payload, config.body_limit).await {
                Ok(body) => body,
                Err(e) => return Ok(ServiceResponse::new(http.clone(), e.error_response())),
            };
            let read_only_default = is_read_only_method(http.method());
            let mut retries = 0;
            loop {
                let slot = Arc::new(Slot::new(
                    (**db).clone(),
                    &config,
                    policy,
                    read_only_default,
                    metrics.clone(),
                ));
                http.extensions_mut().insert(Arc::clone(&slot));
                let attempt = ServiceRequest::from_parts(http.clone(), Payload::from(body.clone()));
                let result = AssertUnwindSafe(service.call(attempt)).catch_unwind().await;
                http.extensions_mut().remove::<Arc<Slot>>();

                let response = match result {
                    Ok(Ok(res)) => Ok(res.map_into_boxed_body()),
                    Ok(Err(e)) => Err(e.error_response()),
                    Err(_) => {
                        tracing::error!("handler panicked; rolling back");
                        Err(ApiError::Internal.error_response())
                    }
                };
                let success = matches!(&response, Ok(res) if res.status().as_u16() < 400);
                let (outcome, failure) = slot.finish(success).await;
                if let (Some(m), TxOutcome::Commit | TxOutcome::Rollback) = (&metrics, outcome) {
                    m.count_transaction(outcome);
                }

                let reply = match failure {
                    Some(f) if f.is_retryable() && retries < config.max_retries => {
                        drop(response);
                        tokio::time::sleep(backoff(retries)).await;
                        retries += 1;
                        if let Some(m) = &metrics {
                            m.count_retry();
                        }
                        continue;
                    }
                    // Nothing was committed: whatever the handler answered, the client learns
                    // the truth. A handler that already answered an error keeps its answer.
                    Some(f) if success || f.is_retryable() => {
                        let err = ApiError::from(f);
                        ServiceResponse::new(http.clone(), err.error_response())
                    }
                    _ => match response {
                        Ok(res) => res,
                        Err(res) => ServiceResponse::new(http.clone(), res),
                    },
                };
                reply
                    .request()
                    .extensions_mut()
                    .insert(TxReport { outcome, retries });
                return Ok(reply);
            }
        })
    }
}

/// Reads the whole body into memory, refusing more than `limit` bytes (413).
async fn read_body(payload: &mut Payload, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|_| ApiError::MalformedJson("the request body could not be read".into()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

impl From<DbErr> for ApiError {
    fn from(err: DbErr) -> ApiError {
        ApiError::from(DbFailure::classify(&err))
    }
}
