//! The transaction of one attempt, begun on first use, and the [`Tx`] extractor through which a
//! handler uses it. When to commit, roll back or re-run is decided in the parent module; this one
//! begins, runs statements, remembers the first failure, and ends.
//!
//! * Begin: on the first statement, never before, so a request that never queries takes no
//!   connection. A read with a replica route ([`ReadRoute`]) begins on the replica when the replica
//!   is up and has replayed the read's consistency token (at once without one), and on the primary
//!   otherwise or when the replica fails to begin. The pool checkout gives up at the request's
//!   deadline (503 `pool_timeout`) and goes through [`Availability`] (a fast 503 while the database
//!   is down). A `BEGIN` that hits a connection the server had closed (57P01, a restart) is tried
//!   on another pooled connection.
//! * On PostgreSQL and MariaDB the transaction is a pooled connection held in a `TxConn`
//!   ([`round_trip`]) and begun with one simple-query message written by
//!   [`Session`](super::Session) (`BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY`, plus the
//!   settings behind a pooler; MariaDB's `START TRANSACTION READ ONLY`, preceded in the same
//!   message by `SET TRANSACTION ISOLATION LEVEL …` when the level differs from the connection's
//!   default), where SeaORM's `begin_with_options` would send `BEGIN` and then `SET TRANSACTION`,
//!   one more round trip. Statements are bound exactly as SeaORM binds them (`sea-query-sqlx`), by
//!   name and cached unless behind a transaction-mode pooler, and every round trip is bounded
//!   ([`round_trip`]). Dropped while still open (a cancelled job), the connection is closed rather
//!   than returned to the pool, and the server rolls back. SQLite uses SeaORM's transaction
//!   (`BEGIN IMMEDIATE` for writers).
//! * Every statement's error is recorded ([`DbFailure`]); the first one forbids the commit,
//!   unless it happened inside a savepoint that was then rolled back ([`ledger`]).
//! * Nested transactions: SeaORM's `TransactionTrait` on [`Tx`] begins a savepoint
//!   ([`TxSavepoint`], in [`savepoint`]); `StreamTrait` streams a query's rows on the
//!   transaction's connection ([`stream`]).
//! * End: `COMMIT` or `ROLLBACK`, each bounded. On PostgreSQL a writing transaction reads its id
//!   in its `BEGIN` message, so that a `COMMIT` whose reply is lost is resolved ([`outcome`]); on
//!   MariaDB such a `COMMIT` is answered as unknown. A PostgreSQL `READ ONLY` transaction at READ
//!   COMMITTED or REPEATABLE READ without on-commit hooks is not waited for: its end is queued
//!   and completed when the connection goes back to the pool (`Slot::end_changes_nothing`,
//!   [`TxConn::end_unawaited`](round_trip::TxConn::end_unawaited)).
//! * When its `BEGIN` completed is kept for the leak warning (`leak.rs`); the hooks of
//!   [`Tx::on_commit`] are kept here and run when the parent module says the attempt committed.

use std::future::{Ready, ready};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest};
#[cfg(feature = "mysql")]
use sea_orm::sqlx::MySql;
#[cfg(feature = "postgres")]
use sea_orm::sqlx::Postgres;
use sea_orm::sqlx::{self, Executor as _};
use sea_orm::{
    AccessMode, ConnAcquireErr, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, ExecResult, IsolationLevel, QueryResult, RuntimeErr, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait, Values,
};
use sea_query_sqlx::SqlxValues;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

/// Work a handler registers to run only after its transaction committed.
type OnCommit = Box<dyn FnOnce() + Send>;

#[cfg(feature = "postgres")]
use super::abandoned::Mark;
use super::failure::{DbFailure, FailureKind};
use super::idempotency::Record;
#[cfg(feature = "postgres")]
use super::outcome::{self, Resolved};
use super::round_trip::{self, Bounds, TxConn};
use super::routing::ReadRoute;
use super::session::BeginSql;
use super::{TxConfig, TxOutcome, TxPolicy};
use crate::Error;
use crate::availability::Availability;
use crate::failover::Failover;
use crate::metrics::Metrics;

/// How this attempt's transaction is begun.
enum Begin {
    /// The whole `BEGIN …` message, one round trip ([`Session::begin`](super::Session::begin)).
    #[cfg(feature = "postgres")]
    Postgres(BeginSql),
    /// The whole `START TRANSACTION …` message, one round trip
    /// ([`Session::start_transaction`](super::Session::start_transaction)).
    #[cfg(feature = "mysql")]
    Mysql(BeginSql),
    /// SeaORM's options (SQLite).
    Orm(TransactionOptions),
}

enum Open {
    #[cfg(feature = "postgres")]
    Postgres(TxConn<Postgres>),
    #[cfg(feature = "mysql")]
    Mysql(TxConn<MySql>),
    Orm(DatabaseTransaction),
}

/// One round trip on `$held`'s connection (bound to `$conn` in `$round_trip`), given up after
/// `$bound` ([`round_trip`]: the connection is then closed).
macro_rules! bounded {
    ($held:ident, $bound:expr, |$conn:ident| $round_trip:expr) => {{
        let result = match $held.conn() {
            Ok($conn) => round_trip::within($bound, $round_trip).await,
            Err(e) => Err(e),
        };
        $held.settle(result)
    }};
}

/// Runs the round trip `$sqlx` with `$conn` bound to the open sqlx connection (PostgreSQL or
/// MariaDB; the same code, two driver types) within `$bound`, and `$map` on its result `$done`;
/// or `$orm` with `$tx` bound to SeaORM's transaction.
macro_rules! on_open {
    ($open:expr, $bound:expr, |$conn:ident| $sqlx:expr, |$done:ident| $map:expr, |$tx:ident| $orm:expr) => {
        match $open {
            #[cfg(feature = "postgres")]
            Open::Postgres(held) => {
                let $done = bounded!(held, $bound, |$conn| $sqlx);
                $map
            }
            #[cfg(feature = "mysql")]
            Open::Mysql(held) => {
                let $done = bounded!(held, $bound, |$conn| $sqlx);
                $map
            }
            Open::Orm($tx) => $orm,
        }
    };
}

mod ledger;
mod savepoint;
mod stream;

use ledger::Ledger;
pub use savepoint::TxSavepoint;
pub use stream::TxStream;

enum State {
    /// Nothing sent yet.
    Idle,
    Open(Open),
    /// Committed, rolled back, or abandoned after a failed `BEGIN`.
    Finished,
}

pub(super) struct Slot {
    db: DatabaseConnection,
    begin: Begin,
    /// Whether statements may be prepared by name (not behind a transaction-mode pooler).
    named_statements: bool,
    /// When the pool checkout must give up (the request's one `DB_POOL_TIMEOUT`); `None`: the
    /// pool's own acquire timeout.
    checkout_deadline: Option<tokio::time::Instant>,
    /// What the transaction is for (the route pattern), for the warnings it logs.
    label: String,
    /// Warn when the transaction is still open after this long (`DB_LEAK_DETECTION_MS`).
    leak_warning: Option<Duration>,
    /// When its `BEGIN` completed, kept only when [`Slot::leak_warning`] is on (`leak.rs`).
    opened_at: std::sync::OnceLock<Instant>,
    /// Work to run once this attempt has committed ([`Tx::on_commit`]).
    hooks: StdMutex<Vec<OnCommit>>,
    metrics: Option<Metrics>,
    availability: Option<Availability>,
    /// Whether the transaction may write: only then is its outcome worth establishing.
    read_write: bool,
    /// Bound on establishing the outcome of a `COMMIT` whose reply was lost (PostgreSQL's).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    commit_check: std::time::Duration,
    /// Bounds on each round trip on the transaction's connection.
    bounds: Bounds,
    state: Mutex<State>,
    /// The open savepoints and the first statement failure of this attempt at each of their
    /// levels (later ones are its consequences), see [`ledger`].
    ledger: StdMutex<Ledger>,
    /// The transaction's isolation level (`None` on SQLite) and access mode, which its
    /// savepoints share.
    isolation: Option<IsolationLevel>,
    access: AccessMode,
    /// A read's choice of server ([`ReadRoute`]); `None` for writes, which use `db`.
    read: Option<ReadRoute>,
    /// Set when the transaction began on the replica.
    on_replica: AtomicBool,
    /// The mark its `BEGIN` carries, so that the server can be asked to end the transaction if
    /// the layer abandons it (PostgreSQL `READ WRITE` on a direct connection, `abandoned.rs`).
    #[cfg(feature = "postgres")]
    mark: Option<Mark>,
    /// What the `BEGIN` message of a `READ WRITE` transaction read (PostgreSQL): its id and its
    /// server's identity ([`outcome`]), and whether the server takes writes.
    #[cfg(feature = "postgres")]
    begun: StdMutex<Option<outcome::Begun>>,
    /// The primary's failover epoch (PostgreSQL): told of a primary lost and of a committed
    /// write; in its window a read-write transaction checks that its server takes writes.
    failover: Option<Failover>,
    /// The `Idempotency-Key` record this attempt stored, committed with its writes: what tells
    /// whether a `COMMIT` whose reply was lost committed, on a server other than the one that
    /// ran it ([`outcome`]).
    record: StdMutex<Option<Record>>,
}

impl Slot {
    pub(super) fn new(
        db: DatabaseConnection,
        config: &TxConfig,
        policy: TxPolicy,
        read_only_default: bool,
        metrics: Option<Metrics>,
    ) -> Slot {
        let access = policy.access.unwrap_or(if read_only_default {
            AccessMode::ReadOnly
        } else {
            AccessMode::ReadWrite
        });
        let isolation = policy.isolation.unwrap_or(config.isolation);
        #[cfg(feature = "postgres")]
        let mark = match (&config.terminator, db.get_database_backend()) {
            (Some(terminator), DbBackend::Postgres) if access == AccessMode::ReadWrite => {
                Some(terminator.mark())
            }
            _ => None,
        };
        let begin = match db.get_database_backend() {
            #[cfg(feature = "postgres")]
            DbBackend::Postgres => {
                let begin = config.session.begin(isolation, access);
                Begin::Postgres(match access {
                    AccessMode::ReadWrite => {
                        begin.followed_by(outcome::BeginRead(mark.as_ref().map(Mark::key)))
                    }
                    AccessMode::ReadOnly => begin,
                })
            }
            #[cfg(feature = "mysql")]
            DbBackend::MySql => Begin::Mysql(config.session.start_transaction(isolation, access)),
            // SQLite has one writer: take the write lock at BEGIN so that two writers queue on
            // busy_timeout instead of failing when a reader upgrades. Isolation does not apply.
            // (A backend the build leaves out never connects: its URL is refused.)
            _ => Begin::Orm(TransactionOptions {
                isolation_level: None,
                access_mode: None,
                sqlite_transaction_mode: (access == AccessMode::ReadWrite)
                    .then_some(SqliteTransactionMode::Immediate),
            }),
        };
        let isolation = (db.get_database_backend() != DbBackend::Sqlite).then_some(isolation);
        let failover = config
            .failover
            .clone()
            .filter(|_| db.get_database_backend() == DbBackend::Postgres);
        Slot {
            db,
            begin,
            named_statements: config.session.named_statements(),
            checkout_deadline: None,
            label: String::new(),
            leak_warning: config.leak_warning,
            opened_at: std::sync::OnceLock::new(),
            hooks: StdMutex::new(Vec::new()),
            metrics,
            availability: config.availability.clone(),
            read_write: access == AccessMode::ReadWrite,
            commit_check: config.commit_check,
            bounds: config.round_trips,
            state: Mutex::new(State::Idle),
            ledger: StdMutex::new(Ledger::new()),
            isolation,
            access,
            read: None,
            on_replica: AtomicBool::new(false),
            #[cfg(feature = "postgres")]
            mark,
            #[cfg(feature = "postgres")]
            begun: StdMutex::new(None),
            failover,
            record: StdMutex::new(None),
        }
    }

    /// Names what the transaction is for (the route pattern) in the leak warning.
    pub(super) fn labelled(mut self, label: String) -> Slot {
        self.label = label;
        self
    }

    /// Runs the on-commit hooks registered during this attempt, each once.
    pub(super) fn run_on_commit_hooks(&self) {
        let hooks = std::mem::take(&mut *self.hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for hook in hooks {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)).is_err() {
                tracing::error!(route = %self.label, "an on-commit hook panicked");
            }
        }
    }

    /// `DB_LEAK_DETECTION_MS`: how long the transaction may stay open before it is logged
    /// (`leak.rs`).
    pub(super) fn leak_warning(&self) -> Option<Duration> {
        self.leak_warning
    }

    /// When the transaction's `BEGIN` completed, when it has and the leak warning is on.
    pub(super) fn opened_at(&self) -> Option<Instant> {
        self.opened_at.get().copied()
    }

    /// Whether the transaction is open: begun, and not yet ending (a statement running on it
    /// holds its state, so it counts as open).
    pub(super) fn still_open(&self) -> bool {
        self.state
            .try_lock()
            .map_or(true, |state| matches!(*state, State::Open(_)))
    }

    /// Gives up the pool checkout at `deadline` (503 `pool_timeout`).
    pub(super) fn checkout_until(mut self, deadline: Option<tokio::time::Instant>) -> Slot {
        self.checkout_deadline = deadline;
        self
    }

    /// Makes this attempt a read routed by `route` (see [`super::routing`]).
    pub(super) fn reading(mut self, route: ReadRoute) -> Slot {
        self.read = Some(route);
        self
    }

    /// Whether the transaction ran on the replica.
    pub(super) fn on_replica(&self) -> bool {
        self.on_replica.load(Ordering::Acquire)
    }

    /// The open transaction, begun on first use.
    async fn open(&self) -> Result<MappedMutexGuard<'_, Open>, DbErr> {
        let mut state = self.state.lock().await;
        if matches!(*state, State::Idle) {
            let started = Instant::now();
            // On the heap: every statement's future may begin, and is moved whole when boxed.
            let begun = Box::pin(self.begin_routed()).await;
            if let Some(m) = &self.metrics {
                m.observe_acquire(started.elapsed());
            }
            match begun {
                Ok(open) => {
                    if let Err(e) = self.check_writable() {
                        // Dropping `open` closes its connection (still in its transaction).
                        *state = State::Finished;
                        return Err(e);
                    }
                    *state = State::Open(open);
                    if self.leak_warning.is_some() {
                        let _first = self.opened_at.set(Instant::now());
                    }
                }
                Err(e) => {
                    *state = State::Finished;
                    return Err(self.record(e));
                }
            }
        }
        let mut open = MutexGuard::try_map(state, |s| match s {
            State::Open(open) => Some(open),
            _ => None,
        })
        .map_err(|_| DbErr::Custom("the request's transaction has already ended".into()))?;
        self.roll_back_dropped(&mut open).await?;
        Ok(open)
    }

    /// Begins a read on the replica when its route admits it, falling back to the primary when
    /// the replica is behind, down, or fails to begin; everything else begins on the primary.
    async fn begin_routed(&self) -> Result<Open, DbErr> {
        if let Some(read) = &self.read {
            if let Some(replica) = &read.replica
                && replica.admits(read.token).await
            {
                match replica
                    .availability()
                    .guard(self.begin_now(replica.db()))
                    .await
                {
                    Ok(open) => {
                        self.on_replica.store(true, Ordering::Release);
                        self.count_read(true);
                        return Ok(open);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the replica could not begin a read; reading from the primary");
                        replica.availability().suspect();
                    }
                }
            }
            self.count_read(false);
        }
        let begin = self.begin_now(&self.db);
        match &self.availability {
            Some(availability) => availability.guard(begin).await,
            None => begin.await,
        }
    }

    fn count_read(&self, on_replica: bool) {
        if let Some(m) = &self.metrics {
            m.count_read(on_replica);
        }
    }

    /// Takes a connection from the pool and begins, by the checkout deadline if there is one.
    /// A `BEGIN` that fails because its pooled connection was closed under it (the server
    /// terminated it: 57P01, a restart, a failover) ran nothing: it is tried again on another
    /// connection instead of answering 503 while the database is up. Each failed attempt
    /// discards its dead connection, so at most as many retries as the pool has connections.
    async fn begin_now(&self, db: &DatabaseConnection) -> Result<Open, DbErr> {
        let attempt = async {
            let mut spare = match self.begin {
                #[cfg(feature = "postgres")]
                Begin::Postgres(_) => db.get_postgres_connection_pool().size(),
                #[cfg(feature = "mysql")]
                Begin::Mysql(_) => db.get_mysql_connection_pool().size(),
                Begin::Orm(_) => 0,
            };
            loop {
                match self.begin_once(db).await {
                    Err(e) if spare > 0 && is_dead_connection(&e) => {
                        spare -= 1;
                        tracing::info!(error = %e, "BEGIN hit a closed connection; taking another");
                    }
                    result => return result,
                }
            }
        };
        match self.checkout_deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or(Err(DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))),
            None => attempt.await,
        }
    }

    /// Takes a connection from `db`'s pool and begins, the `BEGIN` bounded like any round trip;
    /// behind a transaction-mode pooler, like a checkout ([`Bounds::pooled_begin`]): past it,
    /// a pool timeout.
    async fn begin_once(&self, db: &DatabaseConnection) -> Result<Open, DbErr> {
        let begun: Result<Open, sqlx::Error> = match &self.begin {
            #[cfg(feature = "postgres")]
            Begin::Postgres(sql) => {
                let conn = round_trip::checkout(db.get_postgres_connection_pool()).await;
                let conn = conn.map_err(acquire_err)?;
                let (bound, queued) = self.bounds.begin();
                let begun = match self.read_write {
                    true => self.begin_reading(conn, sql, bound).await,
                    false => TxConn::begin(conn, sql.sql(), bound).await,
                };
                begun.map(Open::Postgres).map_err(|e| match e {
                    // The pooler did not hand a server connection in time: a pool wait.
                    e if queued && round_trip::is_timed_out(&e) => sqlx::Error::PoolTimedOut,
                    e => e,
                })
            }
            #[cfg(feature = "mysql")]
            Begin::Mysql(sql) => {
                let conn = round_trip::checkout(db.get_mysql_connection_pool()).await;
                let conn = conn.map_err(acquire_err)?;
                let bound = self.bounds.control;
                TxConn::begin(conn, sql.sql(), bound).await.map(Open::Mysql)
            }
            Begin::Orm(options) => {
                return db.begin_with_options(*options).await.map(Open::Orm);
            }
        };
        #[allow(unreachable_code)]
        begun.map_err(acquire_err)
    }

    /// Begins a `READ WRITE` transaction on PostgreSQL with its [`outcome::BeginRead`] and keeps
    /// what that read.
    #[cfg(feature = "postgres")]
    async fn begin_reading(
        &self,
        conn: sqlx::pool::PoolConnection<Postgres>,
        sql: &BeginSql,
        bound: Duration,
    ) -> Result<TxConn<Postgres>, sqlx::Error> {
        let (tx, rows) = TxConn::begin_reading(conn, sql.sql(), bound, self.mark.clone()).await?;
        // Its columns are the layer's own: a row that cannot be read is a bug, and fails the
        // `BEGIN` (dropping `tx` closes the connection, still in its transaction).
        let begun = outcome::begun(rows.last())?;
        *self.begun.lock().unwrap_or_else(|p| p.into_inner()) = Some(begun);
        Ok(tx)
    }

    /// A statement bound as SeaORM binds it: by name and cached on the connection where
    /// session state is kept, unnamed behind a transaction-mode pooler ([`Session`](super::Session)).
    /// Its values are taken out of `stmt`, not copied.
    fn bind<'q, DB>(&self, stmt: &'q mut Statement) -> sqlx::query::Query<'q, DB, SqlxValues>
    where
        DB: sqlx::Database + sqlx::database::HasStatementCache,
        SqlxValues: sqlx::IntoArguments<DB>,
    {
        let values = stmt.values.take().unwrap_or(Values(Vec::new()));
        let stmt: &'q Statement = stmt;
        sqlx::query_with(sqlx::AssertSqlSafe(stmt.sql.as_str()), SqlxValues(values))
            .persistent(self.named_statements)
    }

    /// The savepoints and failures of this attempt.
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A statement's failure, classified. SQLSTATE 25006 (a write refused in a read-only
    /// transaction) is a primary lost only in a transaction begun read-write: the server it
    /// reached is a standby or a demoted primary. In one this layer began `READ ONLY` it is the
    /// handler writing in a read, a bug (500 `internal`).
    ///
    /// A primary lost opens the failover window ([`Failover::in_failover`]); within it, a
    /// primary that cannot be reached (a refused or closed connection, a checkout failed fast
    /// because the probe found no server: the router has none to send to until the new primary
    /// is promoted) is a primary lost too, re-run like one; not a server where nothing listens
    /// any more ([`Availability::nothing_listens`]): that is an outage. A reply that never came
    /// (a round-trip bound) stays a partition.
    fn classify(&self, err: &DbErr) -> DbFailure {
        let mut failure = DbFailure::classify(err);
        if self.read_write && is_read_only_refusal(err) {
            failure.kind = FailureKind::PrimaryLost;
        }
        // Where nothing listens, the database is down (an outage answered 503 at once), not
        // being failed over behind a router that accepts and closes.
        let gone = self
            .availability
            .as_ref()
            .is_some_and(Availability::nothing_listens);
        let in_failover = (self.failover.as_ref())
            .is_some_and(|failover| !self.on_replica() && failover.in_failover() && !gone);
        if failure.kind == FailureKind::Unavailable
            && in_failover
            && !sqlx_error(err).is_some_and(round_trip::is_timed_out)
        {
            failure.kind = FailureKind::PrimaryLost;
        }
        failure
    }

    /// A statement's failure ([`Self::classify`]); besides, a statement whose connection the
    /// primary closed or reset without a word (its server killed, a router ending the sessions
    /// of a node it marked down) is a primary lost: the transaction cannot have committed, and
    /// the request is re-run in the failover window it opens. Not at `COMMIT` (there a close
    /// is a lost reply, resolved), and not a connection refused at checkout.
    fn classify_statement(&self, err: &DbErr) -> DbFailure {
        let mut failure = self.classify(err);
        if failure.kind == FailureKind::Unavailable
            && self.failover.is_some()
            && !self.on_replica()
            && is_closed_by_server(err)
        {
            failure.kind = FailureKind::PrimaryLost;
        }
        failure
    }

    /// Records a statement's failure, at the level of the innermost open savepoint ([`ledger`]).
    fn record(&self, err: DbErr) -> DbErr {
        let classified = self.classify_statement(&err);
        self.suspect_if_unavailable(&classified);
        self.ledger().record(classified);
        err
    }

    /// Records a failure at `level`, whatever savepoints are open.
    fn record_at(&self, err: DbErr, level: usize) -> DbErr {
        let classified = self.classify_statement(&err);
        self.suspect_if_unavailable(&classified);
        self.ledger().record_at(classified, level);
        err
    }

    /// The attempt's `Idempotency-Key` record was written in its transaction.
    pub(super) fn commits_record(&self, record: Record) {
        *self.record.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
    }

    /// Fails the attempt as a serialization failure, so that it is re-run: the layer's own
    /// statements found a concurrent commit they cannot be serialized after.
    pub(super) fn fail_as_conflict(&self, message: &str) {
        self.ledger().record_at(
            DbFailure {
                kind: FailureKind::SerializationFailure,
                message: message.to_owned(),
            },
            0,
        );
    }

    fn observe<T>(&self, result: Result<T, DbErr>) -> Result<T, DbErr> {
        result.map_err(|e| self.record(e))
    }

    fn suspect_if_unavailable(&self, failure: &DbFailure) {
        let availability = match &self.read {
            Some(ReadRoute {
                replica: Some(replica),
                ..
            }) if self.on_replica() => Some(replica.availability()),
            _ => self.availability.as_ref(),
        };
        let gone = matches!(
            failure.kind,
            FailureKind::Unavailable | FailureKind::PrimaryLost
        );
        if let (true, Some(availability)) = (gone, availability) {
            availability.suspect();
        }
        if let (FailureKind::PrimaryLost, false, Some(failover)) =
            (&failure.kind, self.on_replica(), &self.failover)
        {
            failover.primary_lost();
        }
    }

    fn failure(&self) -> Option<DbFailure> {
        self.ledger().failure().cloned()
    }

    /// Ends the attempt: commits when `commit` is asked and no statement failed, else rolls back.
    /// Returns how it ended, and the failure that must replace the response, if any.
    pub(super) async fn finish(&self, commit: bool) -> (TxOutcome, Option<DbFailure>) {
        let ended = self.end(commit).await;
        if let (TxOutcome::Commit, None, true, Some(failover)) =
            (ended.0, &ended.1, self.read_write, &self.failover)
            && !self.on_replica()
        {
            failover.write_committed();
        }
        ended
    }

    async fn end(&self, commit: bool) -> (TxOutcome, Option<DbFailure>) {
        let state = std::mem::replace(&mut *self.state.lock().await, State::Finished);
        let State::Open(mut open) = state else {
            return (TxOutcome::None, self.failure());
        };
        if commit && self.failure().is_none() {
            // What a savepoint still open or dropped did is not committed.
            self.roll_back_savepoints(&mut open).await;
        }
        let failure = self.failure();
        #[cfg(feature = "postgres")]
        let open = match open {
            Open::Postgres(tx) if commit && failure.is_none() && self.end_changes_nothing() => {
                tx.end_unawaited();
                return (TxOutcome::Commit, None);
            }
            open => open,
        };
        if commit && failure.is_none() {
            let committed = match open {
                #[cfg(feature = "postgres")]
                Open::Postgres(tx) => return self.commit_postgres(tx).await,
                #[cfg(feature = "mysql")]
                Open::Mysql(tx) => return self.commit_mysql(tx).await,
                Open::Orm(tx) => tx.commit().await,
            };
            match committed {
                Ok(()) => (TxOutcome::Commit, None),
                Err(e) => (TxOutcome::Rollback, Some(self.commit_failed(&e))),
            }
        } else {
            let bound = self.bounds.control;
            let rolled_back = match open {
                #[cfg(feature = "postgres")]
                Open::Postgres(mut tx) => tx.rollback(bound).await.map_err(exec_err),
                #[cfg(feature = "mysql")]
                Open::Mysql(mut tx) => tx.rollback(bound).await.map_err(exec_err),
                Open::Orm(tx) => tx.rollback().await,
            };
            if let Err(e) = rolled_back {
                // The driver discards the connection; nothing was committed.
                tracing::warn!(error = %e, "rollback failed");
            }
            (TxOutcome::Rollback, failure)
        }
    }
}

impl Slot {
    /// In the failover window ([`Failover::in_window`]), whether the server of a read-write
    /// transaction just begun on the primary takes writes (`transaction_read_only`, read in the
    /// `BEGIN` message: on for a standby and for a server whose sessions default to read-only).
    /// One that does not fails the attempt as a primary lost before the handler's first
    /// statement runs (the one that began the transaction); the attempt is re-run within
    /// `DB_FAILOVER_RETRY_MS`. Outside the window the first write finds out (25006, a primary
    /// lost too).
    fn check_writable(&self) -> Result<(), DbErr> {
        let checks = self.read_write
            && !self.on_replica()
            && self.failover.as_ref().is_some_and(Failover::in_window);
        if !checks {
            return Ok(());
        }
        #[cfg(feature = "postgres")]
        let read_only = (self.begun.lock().unwrap_or_else(|p| p.into_inner()))
            .as_ref()
            .is_some_and(|begun| begun.read_only);
        #[cfg(not(feature = "postgres"))]
        let read_only = false;
        if !read_only {
            return Ok(());
        }
        let failure = DbFailure {
            kind: FailureKind::PrimaryLost,
            message: "the server does not take writes (a standby, or a demoted primary): \
                      transaction_read_only is on"
                .to_owned(),
        };
        self.suspect_if_unavailable(&failure);
        self.ledger().record(failure.clone());
        Err(DbErr::Custom(failure.message))
    }

    /// Whether this transaction's end cannot change what the handler answered, so that the
    /// answer need not wait for it (PostgreSQL, `docs/transactions.md`, *Ending a read without
    /// waiting*): `READ ONLY` (nothing to commit, no commit-time check can fire), at READ
    /// COMMITTED or REPEATABLE READ (READ UNCOMMITTED is READ COMMITTED there), whose reads were
    /// final when they returned; and no on-commit hook waiting for a commit. Not at
    /// SERIALIZABLE: there a read-only transaction's `COMMIT` can fail with 40001, and what it
    /// read must then not be answered.
    pub(super) fn end_changes_nothing(&self) -> bool {
        use IsolationLevel::{ReadCommitted, ReadUncommitted, RepeatableRead};
        if self.db.get_database_backend() != DbBackend::Postgres {
            return false;
        }
        let level = matches!(
            self.isolation,
            Some(ReadUncommitted | ReadCommitted | RepeatableRead)
        );
        let no_hooks = self
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        !self.read_write && level && no_hooks
    }

    /// `COMMIT` on PostgreSQL. A writing transaction's id and its server's identity, read in its
    /// `BEGIN` message, are kept so that a `COMMIT` whose reply is lost can be resolved ([`outcome`]) instead of
    /// guessed. Known not to have committed, the attempt is re-run when the primary was lost
    /// (another server holds the data now, or the failure is a primary lost, within the
    /// failover window); otherwise it is the failure it was (503).
    #[cfg(feature = "postgres")]
    async fn commit_postgres(&self, mut tx: TxConn<Postgres>) -> (TxOutcome, Option<DbFailure>) {
        let begun = self.begun.lock().unwrap_or_else(|p| p.into_inner()).take();
        let before = begun.and_then(|begun| begun.before);
        let err = match tx.commit(self.bounds.control).await {
            Ok(()) => return (TxOutcome::Commit, None),
            Err(e) => e,
        };
        // The connection is closed by now if the bound passed: the server sees the break.
        drop(tx);
        // The server answered (even with its own end, 57P01 from a shutdown: a backend ends
        // that way only before it reads the `COMMIT`, never after committing), or no id was
        // read at `BEGIN`: not committed, and a primary lost is re-run.
        let Some(before) = before.filter(|_| outcome::reply_lost(&err)) else {
            return (
                TxOutcome::Rollback,
                Some(self.aborted_at_commit(&exec_err(err))),
            );
        };
        let record = (self.record.lock().unwrap_or_else(|p| p.into_inner()))
            .as_ref()
            .map(Record::exists_sql);
        let pool = self.db.get_postgres_connection_pool();
        let resolved = outcome::resolve(pool, &before, record.as_deref(), self.commit_check).await;
        tracing::warn!(
            error = %err,
            xid = before.xid,
            outcome = ?resolved,
            "the COMMIT reply was lost"
        );
        let err = exec_err(err);
        match resolved {
            Resolved::Committed => (TxOutcome::Commit, None),
            Resolved::Aborted => (TxOutcome::Rollback, Some(self.aborted_at_commit(&err))),
            Resolved::AbortedElsewhere => {
                // Another server answered without the transaction: the primary was lost.
                let failure = DbFailure {
                    kind: FailureKind::PrimaryLost,
                    message: format!("another server holds the data now ({err})"),
                };
                self.suspect_if_unavailable(&failure);
                (TxOutcome::Rollback, Some(failure))
            }
            Resolved::Unknown => {
                let failure = self.commit_failed(&err);
                (
                    TxOutcome::Unknown,
                    Some(DbFailure {
                        kind: FailureKind::CommitOutcomeUnknown,
                        message: failure.message,
                    }),
                )
            }
        }
    }

    /// A `COMMIT` known not to have committed (the server answered it with an error, or says
    /// it aborted after the reply was lost): a primary lost (the server's own shutdown, or a
    /// primary unreachable in the failover window, [`Self::classify`]) stays one, re-run like a
    /// failure before `COMMIT`; a database simply down is 503.
    #[cfg(feature = "postgres")]
    fn aborted_at_commit(&self, err: &DbErr) -> DbFailure {
        let failure = self.classify(err);
        if failure.kind == FailureKind::PrimaryLost {
            self.suspect_if_unavailable(&failure);
            return failure;
        }
        self.commit_failed(err)
    }

    /// `COMMIT` on MariaDB, which has no way to ask about another session's transaction: a
    /// writing transaction whose `COMMIT` got no reply may have committed, and is answered as
    /// unknown rather than as a failure that invites a retry.
    #[cfg(feature = "mysql")]
    async fn commit_mysql(&self, mut tx: TxConn<MySql>) -> (TxOutcome, Option<DbFailure>) {
        let err = match tx.commit(self.bounds.control).await {
            Ok(()) => return (TxOutcome::Commit, None),
            Err(e) => e,
        };
        let failure = self.commit_failed(&exec_err(err));
        if self.read_write && failure.kind == FailureKind::Unavailable {
            tracing::warn!(error = %failure.message, "the COMMIT reply was lost");
            let unknown = DbFailure {
                kind: FailureKind::CommitOutcomeUnknown,
                message: failure.message,
            };
            return (TxOutcome::Unknown, Some(unknown));
        }
        (TxOutcome::Rollback, Some(failure))
    }

    /// A failure at the end of the transaction. A primary lost there is answered, not re-run:
    /// once `COMMIT` is on its way the transaction may have committed (a primary shut down
    /// while it waits for its synchronous standby has committed locally), and what is not known
    /// to have failed is not done again. Only a `COMMIT` known not to have committed is re-run
    /// ([`Self::commit_postgres`]).
    fn commit_failed(&self, err: &DbErr) -> DbFailure {
        let mut failure = DbFailure::classify(err);
        self.suspect_if_unavailable(&failure);
        if failure.kind == FailureKind::PrimaryLost {
            failure.kind = FailureKind::Unavailable;
        }
        failure
    }
}

/// SQLSTATE 25006: the server refused a write in a read-only transaction.
fn is_read_only_refusal(err: &DbErr) -> bool {
    matches!(sqlx_error(err), Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some("25006"))
}

/// The error of a statement sent on a connection the server had already closed: the server's
/// own "terminating connection" (SQLSTATE 57P01, 57P02, 57P03) or the socket found closed.
fn is_dead_connection(err: &DbErr) -> bool {
    match sqlx_error(err) {
        Some(sqlx::Error::Database(e)) => e.code().is_some_and(|c| c.starts_with("57P")),
        // A BEGIN that got no reply in time may be a partition: another try would wait as long.
        Some(e @ sqlx::Error::Io(_)) => !round_trip::is_timed_out(e),
        _ => false,
    }
}

/// The driver's error inside a SeaORM one, when there is one.
fn sqlx_error(err: &DbErr) -> Option<&sqlx::Error> {
    match err {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e),
        _ => None,
    }
}

/// A statement whose connection the server closed or reset (no SQLSTATE, no bound of ours).
fn is_closed_by_server(err: &DbErr) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(&**e, sqlx::Error::Io(io)
                if matches!(io.kind(), BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof))
        }
        _ => false,
    }
}

// The same `DbErr` shapes SeaORM gives for these failures, so that classification is one code.
fn exec_err(e: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))
}

fn query_err(e: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)))
}

fn acquire_err(e: sqlx::Error) -> DbErr {
    match e {
        sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
        sqlx::Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
        e => DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))),
    }
}

// ---------------------------------------------------------------------------------------------
// The extractor
// ---------------------------------------------------------------------------------------------

/// The request's transaction, as a handler sees it. Pass `&tx` to any function taking
/// `&impl ConnectionTrait`. Fails to extract (500) on a route without
/// [`Transactional`](super::Transactional).
#[derive(Clone)]
pub struct Tx(pub(super) Arc<Slot>);

impl FromRequest for Tx {
    type Error = Error;
    type Future = Ready<Result<Tx, Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(match req.extensions().get::<Arc<Slot>>() {
            Some(slot) => Ok(Tx(Arc::clone(slot))),
            None => {
                tracing::error!("a handler asked for Tx on a route without Transactional");
                Err(Error::Internal)
            }
        })
    }
}

impl Tx {
    /// Runs `hook` once this request's transaction has committed: never after a rollback, and
    /// once per request however often the request is re-run (a re-run's hooks are its own).
    /// For work outside the database that must not happen for uncommitted writes: publishing
    /// a message, invalidating a cache. It runs before the response is sent; spawn a task in
    /// it for anything slow.
    pub fn on_commit(&self, hook: impl FnOnce() + Send + 'static) {
        self.0
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(hook));
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Tx {
    fn get_database_backend(&self) -> DbBackend {
        self.0.db.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.0.execute_raw(None, stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.0.execute_unprepared(None, sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.0.query_one_raw(None, stmt).await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.0.query_all_raw(None, stmt).await
    }
}

/// The statements of [`ConnectionTrait`], for [`Tx`] (`scope` `None`) and for a savepoint's
/// handle ([`TxSavepoint`], `scope` its id: it fails once the savepoint has ended).
// A statement is `mut` for sqlx's arms, which take its values ([`Slot::bind`]).
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(unused_mut))]
impl Slot {
    async fn execute_raw(
        &self,
        scope: Option<u64>,
        mut stmt: Statement,
    ) -> Result<ExecResult, DbErr> {
        let mut open = self.open_in(scope).await?;
        let result = on_open!(
            &mut *open,
            self.bounds.statement,
            |conn| self.bind(&mut stmt).execute(conn),
            |done| done.map(ExecResult::from).map_err(exec_err),
            |tx| tx.execute_raw(stmt).await
        );
        self.observe(result)
    }

    async fn execute_unprepared(&self, scope: Option<u64>, sql: &str) -> Result<ExecResult, DbErr> {
        let mut open = self.open_in(scope).await?;
        let result = on_open!(
            &mut *open,
            self.bounds.statement,
            |conn| conn.execute(sqlx::AssertSqlSafe(sql.to_owned())),
            |done| done.map(ExecResult::from).map_err(exec_err),
            |tx| tx.execute_unprepared(sql).await
        );
        self.observe(result)
    }

    async fn query_one_raw(
        &self,
        scope: Option<u64>,
        mut stmt: Statement,
    ) -> Result<Option<QueryResult>, DbErr> {
        let mut open = self.open_in(scope).await?;
        let result = on_open!(
            &mut *open,
            self.bounds.statement,
            |conn| self.bind(&mut stmt).fetch_optional(conn),
            |done| done
                .map(|row| row.map(QueryResult::from))
                .map_err(query_err),
            |tx| tx.query_one_raw(stmt).await
        );
        self.observe(result)
    }

    async fn query_all_raw(
        &self,
        scope: Option<u64>,
        mut stmt: Statement,
    ) -> Result<Vec<QueryResult>, DbErr> {
        let mut open = self.open_in(scope).await?;
        let result = on_open!(
            &mut *open,
            self.bounds.statement,
            |conn| self.bind(&mut stmt).fetch_all(conn),
            |done| done
                .map(|rows| rows.into_iter().map(QueryResult::from).collect())
                .map_err(query_err),
            |tx| tx.query_all_raw(stmt).await
        );
        self.observe(result)
    }
}
