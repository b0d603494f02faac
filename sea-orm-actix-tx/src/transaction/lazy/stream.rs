//! SeaORM's `StreamTrait` on [`Tx`] and [`TxSavepoint`]: a query whose rows are read one by one
//! on the request's transaction (`Entity::find().stream(&tx)`), for a result too large to hold.
//!
//! * The stream runs on the transaction's connection, inside the innermost savepoint open, and
//!   sees the request's own uncommitted writes. It holds the transaction while it lives: any
//!   other statement of the request waits until it is dropped, as the connection can carry one
//!   query at a time (so a handler that sends one while holding the stream waits forever, as
//!   with SeaORM's own transaction streams). Dropped before its end, the rest of its rows are
//!   read and discarded by the driver before the next statement.
//! * Bound ([`round_trip`]): the statement bound (`DB_STATEMENT_TIMEOUT_MS` +
//!   `DB_CONNECT_TIMEOUT`) applies to the wait for each row, not to the whole stream, whose
//!   length depends on the consumer (a handler may do work between rows). A partition is thus
//!   detected within one bound, as for any statement, and closes the connection. The server's
//!   own statement timeout, where set, still bounds the statement as a whole.
//! * An error (the query's, or a row's) is recorded like any statement's, and ends the stream.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use sea_orm::sqlx;
use sea_orm::{DatabaseTransaction, DbBackend, DbErr, QueryResult, Statement, StreamTrait};
use sea_query_sqlx::SqlxValues;

use super::{Open, Slot, Tx, TxConn, TxSavepoint, query_err, round_trip};

/// The rows of a query streamed on the request's transaction.
pub type TxStream<'a> = Pin<Box<dyn Stream<Item = Result<QueryResult, DbErr>> + Send + 'a>>;

impl Slot {
    /// Streams the rows of `stmt` for the handle `scope` (see [`Slot::open_in`]).
    async fn stream(&self, scope: Option<u64>, stmt: Statement) -> Result<TxStream<'_>, DbErr> {
        let mut open = self.open_in(scope).await?;
        let bound = self.bounds.statement;
        Ok(Box::pin(async_stream::stream! {
            let mut rows: TxStream<'_> = match &mut *open {
                #[cfg(feature = "postgres")]
                Open::Postgres(held) => Box::pin(sqlx_rows(self, held, stmt, bound)),
                #[cfg(feature = "mysql")]
                Open::Mysql(held) => Box::pin(sqlx_rows(self, held, stmt, bound)),
                Open::Orm(tx) => Box::pin(orm_rows(self, tx, stmt)),
            };
            while let Some(row) = rows.next().await {
                yield row;
            }
        }))
    }
}

/// The rows of `stmt` on the connection of `held`, the wait for each bounded by `bound`; a wait
/// past its bound closes the connection. Ends at the first error, recorded.
fn sqlx_rows<'a, DB>(
    slot: &'a Slot,
    held: &'a mut TxConn<DB>,
    mut stmt: Statement,
    bound: Option<Duration>,
) -> impl Stream<Item = Result<QueryResult, DbErr>> + Send + 'a
where
    DB: sqlx::Database + sqlx::database::HasStatementCache,
    SqlxValues: sqlx::IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    QueryResult: From<DB::Row>,
{
    async_stream::stream! {
        let mut timed_out = None;
        match held.conn() {
            Err(e) => yield Err(slot.record(query_err(e))),
            Ok(conn) => {
                let mut rows = slot.bind::<DB>(&mut stmt).fetch(conn);
                loop {
                    match round_trip::within(bound, rows.try_next()).await {
                        Ok(Some(row)) => yield Ok(QueryResult::from(row)),
                        Ok(None) => break,
                        Err(e) if round_trip::is_timed_out(&e) => {
                            timed_out = Some(e);
                            break;
                        }
                        Err(e) => {
                            yield Err(slot.record(query_err(e)));
                            break;
                        }
                    }
                }
            }
        }
        if let Some(e) = timed_out {
            // The rows no longer borrow the connection: it can be closed.
            if let Err(e) = held.settle::<()>(Err(e)) {
                yield Err(slot.record(query_err(e)));
            }
        }
    }
}

/// The rows of `stmt` on SeaORM's transaction (SQLite). Ends at the first error, recorded.
fn orm_rows<'a>(
    slot: &'a Slot,
    tx: &'a DatabaseTransaction,
    stmt: Statement,
) -> impl Stream<Item = Result<QueryResult, DbErr>> + Send + 'a {
    async_stream::stream! {
        match tx.stream_raw(stmt).await {
            Ok(mut rows) => {
                while let Some(row) = rows.next().await {
                    let failed = row.is_err();
                    yield slot.observe(row);
                    if failed {
                        break;
                    }
                }
            }
            Err(e) => yield Err(slot.record(e)),
        }
    }
}

impl StreamTrait for Tx {
    type Stream<'a> = TxStream<'a>;

    fn get_database_backend(&self) -> DbBackend {
        self.0.db.get_database_backend()
    }

    fn stream_raw<'a>(
        &'a self,
        stmt: Statement,
    ) -> Pin<Box<dyn Future<Output = Result<TxStream<'a>, DbErr>> + 'a + Send>> {
        Box::pin(self.0.stream(None, stmt))
    }
}

impl StreamTrait for TxSavepoint {
    type Stream<'a> = TxStream<'a>;

    fn get_database_backend(&self) -> DbBackend {
        self.slot.db.get_database_backend()
    }

    fn stream_raw<'a>(
        &'a self,
        stmt: Statement,
    ) -> Pin<Box<dyn Future<Output = Result<TxStream<'a>, DbErr>> + 'a + Send>> {
        Box::pin(self.slot.stream(Some(self.id), stmt))
    }
}
