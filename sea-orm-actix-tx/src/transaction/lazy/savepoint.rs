//! Nested transactions inside the request's: SeaORM's `TransactionTrait` on [`Tx`] and on
//! [`TxSavepoint`], where each `begin` is a `SAVEPOINT` in the request's transaction
//! (`docs/transactions.md`, *Savepoints and streaming*).
//!
//! * `begin` (and `begin_with_config`, `begin_with_options`, `transaction`,
//!   `transaction_with_config`) begins the request's transaction if it has not begun, then sends
//!   `SAVEPOINT tx_savepoint_<level>`: one name per nesting level, so that a deeper savepoint never
//!   shadows an enclosing one. It nests inside the innermost savepoint open, whichever handle asks.
//!   A savepoint shares the request's isolation level and access mode: asking for others is an
//!   error, as nothing inside a transaction can change them.
//! * `commit` sends `RELEASE SAVEPOINT`; `rollback`, or dropping the handle, `ROLLBACK TO
//!   SAVEPOINT` then `RELEASE SAVEPOINT` (one message): the savepoint is gone from the server
//!   either way, so the server's savepoints are always the handles' ones. A dropped handle cannot
//!   wait for the server: its rollback is sent before the transaction's next round trip, the way
//!   SeaORM's own dropped transactions roll back. Ending a savepoint ends every deeper one with
//!   it: a `commit` rolls back deeper savepoints still open first, so that only committed work is
//!   kept. A savepoint still open when the request's transaction commits is rolled back.
//! * Failures ([`super::ledger`]): a statement's failure belongs to the innermost savepoint open
//!   when it ran. Rolling the savepoint back forgives it; releasing it hands it to the enclosing
//!   level, where it still forbids the request's commit. A `RELEASE` that fails keeps the
//!   savepoint's failures (the handler meant to keep its work) and the savepoint is rolled back.
//!   A failed `ROLLBACK TO SAVEPOINT`, and a failure that dooms the whole transaction (a
//!   deadlock, a serialization failure, a lost connection), is never forgiven.
//! * Each of these is one round trip, bounded like `BEGIN` and `COMMIT` ([`round_trip`]);
//!   SQLite sends them on SeaORM's transaction. Savepoints live inside the transaction, so
//!   behind a transaction-mode pooler nothing named outlives it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sea_orm::sqlx;
use sea_orm::{
    AccessMode, ConnectionTrait, DbBackend, DbErr, ExecResult, IsolationLevel, QueryResult,
    Statement, TransactionError, TransactionOptions, TransactionSession, TransactionTrait,
};
use tokio::sync::MappedMutexGuard;

use super::ledger::End;
use super::{Open, Slot, Tx, exec_err, round_trip};

/// A savepoint in the request's transaction: what `TransactionTrait::begin` on a [`Tx`] (or on
/// another `TxSavepoint`) returns. Pass `&savepoint` to anything taking `&impl ConnectionTrait`,
/// `&impl TransactionTrait` or `&impl StreamTrait`; end it with `commit` (`RELEASE SAVEPOINT`) or
/// `rollback`. Dropped without either, it is rolled back, and what failed in it is forgiven.
pub struct TxSavepoint {
    pub(super) slot: Arc<Slot>,
    pub(super) id: u64,
    level: usize,
    /// Committed or rolled back (not to be rolled back again when dropped).
    ended: bool,
}

impl fmt::Debug for TxSavepoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxSavepoint({})", name(self.level))
    }
}

/// The savepoint of nesting level `level` (1 for the outermost).
fn name(level: usize) -> String {
    format!("tx_savepoint_{level}")
}

fn ended() -> DbErr {
    DbErr::Custom("this savepoint has already ended".into())
}

impl TxSavepoint {
    /// `RELEASE SAVEPOINT`: its work becomes the enclosing level's, to be committed with the
    /// request. Fails if the savepoint has already ended (an enclosing one ended first).
    pub async fn commit(mut self) -> Result<(), DbErr> {
        self.ended = true;
        self.slot.release(self.id).await
    }

    /// `ROLLBACK TO SAVEPOINT`: its work is undone, and what failed in it is forgiven.
    pub async fn rollback(mut self) -> Result<(), DbErr> {
        self.ended = true;
        self.slot.roll_back_to(self.id).await
    }

    /// Runs `callback` in this savepoint, then commits it if the callback succeeded, else rolls
    /// it back (SeaORM's `transaction`).
    async fn run<F, T, E>(self, callback: F) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c TxSavepoint,
            ) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
            + Send,
        T: Send,
        E: fmt::Display + fmt::Debug + Send,
    {
        let result = callback(&self).await;
        let ended = match result {
            Ok(_) => self.commit().await,
            Err(_) => self.rollback().await,
        };
        ended.map_err(TransactionError::Connection)?;
        result.map_err(TransactionError::Transaction)
    }
}

impl Drop for TxSavepoint {
    fn drop(&mut self) {
        if !self.ended {
            self.slot.ledger().dropped(self.id);
        }
    }
}

#[async_trait::async_trait]
impl TransactionSession for TxSavepoint {
    async fn commit(self) -> Result<(), DbErr> {
        TxSavepoint::commit(self).await
    }

    async fn rollback(self) -> Result<(), DbErr> {
        TxSavepoint::rollback(self).await
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for TxSavepoint {
    fn get_database_backend(&self) -> DbBackend {
        self.slot.db.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.slot.execute_raw(Some(self.id), stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.slot.execute_unprepared(Some(self.id), sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.slot.query_one_raw(Some(self.id), stmt).await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.slot.query_all_raw(Some(self.id), stmt).await
    }
}

/// `TransactionTrait` for a handle: `$slot` its `Arc<Slot>`, `$scope` its savepoint's id (`None`
/// for the request's transaction itself).
macro_rules! savepoints {
    ($handle:ty, |$this:ident| $slot:expr, $scope:expr) => {
        #[async_trait::async_trait]
        impl TransactionTrait for $handle {
            type Transaction = TxSavepoint;

            async fn begin(&self) -> Result<TxSavepoint, DbErr> {
                let $this = self;
                $slot.savepoint($scope, None, None).await
            }

            async fn begin_with_config(
                &self,
                isolation_level: Option<IsolationLevel>,
                access_mode: Option<AccessMode>,
            ) -> Result<TxSavepoint, DbErr> {
                let $this = self;
                $slot.savepoint($scope, isolation_level, access_mode).await
            }

            /// SQLite's transaction mode applies to the request's `BEGIN` only, as in SeaORM.
            async fn begin_with_options(
                &self,
                options: TransactionOptions,
            ) -> Result<TxSavepoint, DbErr> {
                let $this = self;
                $slot
                    .savepoint($scope, options.isolation_level, options.access_mode)
                    .await
            }

            async fn transaction<F, T, E>(&self, callback: F) -> Result<T, TransactionError<E>>
            where
                F: for<'c> FnOnce(
                        &'c TxSavepoint,
                    )
                        -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
                    + Send,
                T: Send,
                E: fmt::Display + fmt::Debug + Send,
            {
                let savepoint = self.begin().await.map_err(TransactionError::Connection)?;
                savepoint.run(callback).await
            }

            async fn transaction_with_config<F, T, E>(
                &self,
                callback: F,
                isolation_level: Option<IsolationLevel>,
                access_mode: Option<AccessMode>,
            ) -> Result<T, TransactionError<E>>
            where
                F: for<'c> FnOnce(
                        &'c TxSavepoint,
                    )
                        -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
                    + Send,
                T: Send,
                E: fmt::Display + fmt::Debug + Send,
            {
                let savepoint = self
                    .begin_with_config(isolation_level, access_mode)
                    .await
                    .map_err(TransactionError::Connection)?;
                savepoint.run(callback).await
            }
        }
    };
}

savepoints!(Tx, |tx| tx.0, None);
savepoints!(TxSavepoint, |savepoint| savepoint.slot, Some(savepoint.id));

impl Slot {
    /// The open transaction for a statement of the handle `scope` (`None`: [`Tx`]), which fails
    /// (and is recorded) once that handle's savepoint has ended.
    pub(super) async fn open_in(
        &self,
        scope: Option<u64>,
    ) -> Result<MappedMutexGuard<'_, Open>, DbErr> {
        let open = self.open().await?;
        if let Some(id) = scope
            && self.ledger().level_of(id).is_none()
        {
            return Err(self.record(ended()));
        }
        Ok(open)
    }

    /// Sends `sql`, a savepoint's control statement(s), in one message, bounded like `BEGIN`.
    async fn control(&self, open: &mut Open, sql: String) -> Result<(), DbErr> {
        on_open!(
            open,
            Some(self.bounds.control),
            |conn| sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(conn),
            |done| done.map(drop).map_err(exec_err),
            |tx| tx.execute_unprepared(&sql).await.map(drop)
        )
    }

    /// `SAVEPOINT`, one level deeper than the innermost open, for the handle `scope`.
    async fn savepoint(
        self: &Arc<Slot>,
        scope: Option<u64>,
        isolation: Option<IsolationLevel>,
        access: Option<AccessMode>,
    ) -> Result<TxSavepoint, DbErr> {
        self.shares(isolation, access)?;
        let mut open = self.open_in(scope).await?;
        let (id, level) = {
            let mut ledger = self.ledger();
            (ledger.next_id(), ledger.depth() + 1)
        };
        match self
            .control(&mut open, format!("SAVEPOINT {}", name(level)))
            .await
        {
            Ok(()) => {
                self.ledger().begun(id);
                Ok(TxSavepoint {
                    slot: Arc::clone(self),
                    id,
                    level,
                    ended: false,
                })
            }
            Err(e) => Err(self.record(e)),
        }
    }

    /// Whether a savepoint may be asked for with `isolation` and `access`: only the request's
    /// own (any isolation on SQLite, which has one).
    fn shares(
        &self,
        isolation: Option<IsolationLevel>,
        access: Option<AccessMode>,
    ) -> Result<(), DbErr> {
        let isolation_shared = match (isolation, self.isolation) {
            (Some(asked), Some(own)) => asked == own,
            _ => true,
        };
        if isolation_shared && access.is_none_or(|asked| asked == self.access) {
            return Ok(());
        }
        Err(DbErr::Custom(format!(
            "a savepoint shares the request's transaction ({:?}, {:?}): \
             its isolation level and access mode cannot differ",
            self.isolation, self.access
        )))
    }

    /// `RELEASE SAVEPOINT` of the savepoint `id`, after rolling back any deeper one still open.
    async fn release(&self, id: u64) -> Result<(), DbErr> {
        let mut open = self.open().await?;
        let (level, depth) = {
            let ledger = self.ledger();
            (ledger.level_of(id), ledger.depth())
        };
        let Some(level) = level else {
            // Rolled back with an enclosing savepoint: its work is gone.
            return Err(self.record(ended()));
        };
        let this = name(level);
        let sql = if depth > level {
            let inner = name(level + 1);
            format!(
                "ROLLBACK TO SAVEPOINT {inner}; RELEASE SAVEPOINT {inner}; RELEASE SAVEPOINT {this}"
            )
        } else {
            format!("RELEASE SAVEPOINT {this}")
        };
        match self.control(&mut open, sql).await {
            Ok(()) => {
                let mut ledger = self.ledger();
                ledger.ended(level + 1, End::RolledBack);
                ledger.ended(level, End::Released);
                Ok(())
            }
            Err(e) => {
                let failure = super::DbFailure::classify(&e);
                self.suspect_if_unavailable(&failure);
                self.ledger().release_failed(id, level, failure);
                Err(e)
            }
        }
    }

    /// `ROLLBACK TO SAVEPOINT` of the savepoint `id`; nothing if it was already rolled back with
    /// an enclosing one.
    async fn roll_back_to(&self, id: u64) -> Result<(), DbErr> {
        let mut open = self.open().await?;
        let level = self.ledger().level_of(id);
        match level {
            Some(level) => self.roll_back_level(&mut open, level).await,
            None => Ok(()),
        }
    }

    /// Rolls back to the savepoint of `level` and removes it (and every deeper one), forgiving
    /// their failures; a failure to do so is never forgiven.
    async fn roll_back_level(&self, open: &mut Open, level: usize) -> Result<(), DbErr> {
        let this = name(level);
        let sql = format!("ROLLBACK TO SAVEPOINT {this}; RELEASE SAVEPOINT {this}");
        let result = self.control(open, sql).await;
        self.ledger().ended(level, End::RolledBack);
        result.map_err(|e| self.record_at(e, 0))
    }

    /// Rolls back the savepoints whose handles were dropped, before anything else is sent.
    pub(super) async fn roll_back_dropped(&self, open: &mut Open) -> Result<(), DbErr> {
        let level = self.ledger().take_dropped();
        match level {
            Some(level) => self.roll_back_level(open, level).await,
            None => Ok(()),
        }
    }

    /// Before `COMMIT`: rolls back every savepoint still on the server (dropped, or still held
    /// by a handle that outlived its work), so that only committed savepoints are committed.
    pub(super) async fn roll_back_savepoints(&self, open: &mut Open) {
        let (depth, held) = {
            let ledger = self.ledger();
            (ledger.depth(), ledger.held())
        };
        if depth == 0 {
            return;
        }
        if held > 0 {
            tracing::warn!(
                route = %self.label,
                savepoints = held,
                "a savepoint was still open at COMMIT; it is rolled back"
            );
        }
        let _recorded = self.roll_back_level(open, 1).await;
    }
}
