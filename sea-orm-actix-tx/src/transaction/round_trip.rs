//! The connection of an open transaction (PostgreSQL, MariaDB) and the bound on every round trip
//! made on it (`docs/transactions.md`, *A database that stops answering*). The server bounds a
//! statement's own work (`statement_timeout`, `max_statement_time`), but nothing on the server's
//! side bounds a reply that never arrives: with the database's packets dropped (a network
//! partition), a request would wait for the kernel to give up on the socket, many minutes, holding
//! its connection and its admission permit. So the service bounds each round trip itself
//! ([`Bounds`]), and when a bound passes it closes the connection at once (never returned to the
//! pool: its state is unknown) and the attempt fails as the database being unavailable (503), or,
//! at `COMMIT`, goes through the commit-outcome check of the parent module.
//!
//! The transaction is held as the pooled connection itself, begun, committed and rolled back
//! with one simple-query message each, through sqlx's transaction manager (what sqlx's own
//! `Transaction` sends, and the connection knows it is in a transaction) or, for a `BEGIN`
//! message whose rows are needed ([`TxConn::begin_reading`]), as queries of their own, so that the connection
//! can be closed when a bound passes: sqlx's `Transaction` keeps its connection to itself.
//! Dropped while still open (a cancelled request), it closes its connection, and the server
//! rolls the transaction back. A `READ ONLY` transaction whose end cannot change the answer is
//! ended without waiting ([`TxConn::end_unawaited`]).

use std::time::Duration;

use sea_orm::sqlx::{self, Database, Executor, pool::PoolConnection};
use sqlx_core::transaction::TransactionManager;

#[cfg(feature = "postgres")]
use super::abandoned::Mark;

/// A connection from `pool`. sqlx's `acquire` future holds the whole of opening a connection
/// (about 8.6 KB): kept on the heap, it is not moved with every statement's future that may
/// begin the transaction (bench/NOTES.md, issue 23). The heap is taken first and the future
/// made in it, instead of made on the stack and copied there.
pub(crate) async fn checkout<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Result<PoolConnection<DB>, sqlx::Error> {
    Box::into_pin(Box::write(Box::new_uninit(), pool.acquire())).await
}

/// How long one round trip on a transaction's connection may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// `BEGIN`, `COMMIT`, `ROLLBACK` and the layer's own small queries: no server work to wait
    /// for, so `DB_CONNECT_TIMEOUT`, the time a healthy server is given to answer at all.
    pub control: Duration,
    /// A handler's statement: `DB_STATEMENT_TIMEOUT_MS` plus `DB_CONNECT_TIMEOUT`, so the
    /// server's own timeout (a clean 503 `statement_timeout`… or the lock wait it cancels) always
    /// fires first when the server is reachable. `None` when `DB_STATEMENT_TIMEOUT_MS` is off: a
    /// statement may then run as long as it likes, and so may a partition hold it.
    pub statement: Option<Duration>,
    /// `BEGIN` behind a transaction-mode pooler (`DB_POOLER=transaction`): `DB_POOL_TIMEOUT`.
    /// There `BEGIN` is where the pooler queues the client until one of its server connections
    /// is free, a wait for a connection like a checkout from the service's own pool, so it is
    /// bounded like one and answered 503 `pool_timeout` past it. A pooler or server that is
    /// gone is told apart by the availability probe (`crate::availability`), not by this
    /// bound. `None` on a direct connection: `BEGIN` is bounded by [`control`](Self::control).
    pub pooled_begin: Option<Duration>,
}

impl Bounds {
    /// The bounds of the settings: `DB_CONNECT_TIMEOUT` for `BEGIN`/`COMMIT`/`ROLLBACK`, plus `DB_STATEMENT_TIMEOUT_MS` for a statement.
    pub fn new(statement_timeout: Option<Duration>, connect_timeout: Duration) -> Bounds {
        Bounds {
            control: connect_timeout,
            statement: statement_timeout.map(|t| t + connect_timeout),
            pooled_begin: None,
        }
    }

    /// The same bounds behind a transaction-mode pooler: `BEGIN` may wait `pool_timeout` for
    /// the pooler's server connection ([`pooled_begin`](Self::pooled_begin)).
    pub fn behind_pooler(self, pool_timeout: Duration) -> Bounds {
        Bounds {
            pooled_begin: Some(pool_timeout),
            ..self
        }
    }

    /// The bound of `BEGIN`, and whether passing it is a wait for a connection (a pool
    /// timeout) rather than a server that stopped answering.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn begin(&self) -> (Duration, bool) {
        match self.pooled_begin {
            Some(queue) => (queue, true),
            None => (self.control, false),
        }
    }
}

/// Whether `err` is a round trip that outlived its bound (its connection is closed).
pub(super) fn is_timed_out(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
}

fn timed_out(bound: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no reply from the database within {} ms; the connection was closed",
            bound.as_millis()
        ),
    ))
}

fn closed() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the transaction's connection was closed after a round trip outlived its bound",
    ))
}

/// Runs `round_trip`, giving up after `bound` (never when `None`).
pub(super) async fn within<T>(
    bound: Option<Duration>,
    round_trip: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match bound {
        Some(bound) => tokio::time::timeout(bound, round_trip)
            .await
            .unwrap_or_else(|_| Err(timed_out(bound))),
        None => round_trip.await,
    }
}

/// How a transaction ends.
enum End {
    Commit,
    Rollback,
}

/// An open transaction on a pooled connection.
pub(super) struct TxConn<DB: Database> {
    /// `None` once closed after a round trip outlived its bound.
    conn: Option<PoolConnection<DB>>,
    /// Between a successful `BEGIN` and the end of `COMMIT` or `ROLLBACK`.
    open: bool,
    /// The mark of the transaction (PostgreSQL, `READ WRITE`): told when the layer abandons the
    /// transaction, so that the server is asked to end it (`abandoned.rs`).
    #[cfg(feature = "postgres")]
    mark: Option<Mark>,
}

impl<DB: Database> TxConn<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Sends `begin` (one simple-query message) on `conn`. A connection whose `BEGIN` failed is
    /// closed, not returned to the pool: nothing ran on it, and it is most likely dead.
    pub(super) async fn begin(
        conn: PoolConnection<DB>,
        begin: sqlx::SqlStr,
        bound: Duration,
    ) -> Result<TxConn<DB>, sqlx::Error> {
        let tx = TxConn {
            conn: Some(conn),
            open: true,
            #[cfg(feature = "postgres")]
            mark: None,
        };
        tx.send_begin(begin, bound).await
    }

    /// [`TxConn::begin`] of a `READ WRITE` transaction whose `begin` message also reads
    /// something (`outcome::BeginRead`, which may take `mark`'s lock: a round trip that
    /// outlives its bound from the `BEGIN` on tells it, `abandoned.rs`); the rows it read. The
    /// message is sent as a query of its own, not through sqlx's transaction manager (which
    /// discards rows): the connection's end is then sent by [`TxConn::end`] itself.
    #[cfg(feature = "postgres")]
    pub(super) async fn begin_reading(
        conn: PoolConnection<DB>,
        begin: sqlx::SqlStr,
        bound: Duration,
        mark: Option<Mark>,
    ) -> Result<(TxConn<DB>, Vec<DB::Row>), sqlx::Error> {
        let mut tx = TxConn {
            conn: Some(conn),
            open: true,
            mark,
        };
        let result = match tx.conn() {
            Ok(conn) => within(Some(bound), sqlx::raw_sql(begin).fetch_all(conn)).await,
            Err(e) => Err(e),
        };
        tx.begun(result)
    }

    async fn send_begin(
        mut self,
        begin: sqlx::SqlStr,
        bound: Duration,
    ) -> Result<TxConn<DB>, sqlx::Error> {
        let result = match self.conn() {
            Ok(conn) => {
                within(
                    Some(bound),
                    DB::TransactionManager::begin(conn, Some(begin)),
                )
                .await
            }
            Err(e) => Err(e),
        };
        self.begun(result).map(|(tx, ())| tx)
    }

    /// The transaction a `BEGIN` round trip opened, with what it returned; or its failure, the
    /// connection closed (nothing ran on it, and it is most likely dead).
    fn begun<T>(mut self, result: Result<T, sqlx::Error>) -> Result<(TxConn<DB>, T), sqlx::Error> {
        match self.settle(result) {
            Ok(value) => Ok((self, value)),
            Err(e) => {
                self.close();
                Err(e)
            }
        }
    }

    /// The connection, unless it was closed after a timeout.
    pub(super) fn conn(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
        self.conn.as_deref_mut().ok_or_else(closed)
    }

    /// What a bounded round trip gave; a timeout closes the connection. Inside the transaction
    /// that abandons it on the server, which is then asked to end it (`abandoned.rs`).
    pub(super) fn settle<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if matches!(&result, Err(e) if is_timed_out(e)) {
            #[cfg(feature = "postgres")]
            if let (true, Some(mark)) = (self.open, self.mark.take()) {
                mark.abandoned();
            }
            self.close();
        }
        result
    }

    /// Ends the transaction with `COMMIT`, bounded by `bound`.
    pub(super) async fn commit(&mut self, bound: Duration) -> Result<(), sqlx::Error> {
        self.end(End::Commit, bound).await
    }

    /// Ends the transaction with `ROLLBACK`, bounded by `bound`. A connection on which it fails
    /// is closed (the server then rolls back by itself), and so is one already closed.
    pub(super) async fn rollback(&mut self, bound: Duration) -> Result<(), sqlx::Error> {
        if self.conn.is_none() {
            self.open = false;
            return Ok(());
        }
        let result = self.end(End::Rollback, bound).await;
        if result.is_err() {
            self.close();
        }
        result
    }

    async fn end(&mut self, end: End, bound: Duration) -> Result<(), sqlx::Error> {
        let result = match self.conn() {
            // Begun through sqlx's transaction manager, which counts it open.
            Ok(conn) if DB::TransactionManager::get_transaction_depth(conn) > 0 => match end {
                End::Commit => within(Some(bound), DB::TransactionManager::commit(conn)).await,
                End::Rollback => within(Some(bound), DB::TransactionManager::rollback(conn)).await,
            },
            // Begun by a message of its own ([`TxConn::begin_reading`]).
            Ok(conn) => {
                let sql = match end {
                    End::Commit => "COMMIT",
                    End::Rollback => "ROLLBACK",
                };
                within(Some(bound), sqlx::raw_sql(sql).execute(conn))
                    .await
                    .map(drop)
            }
            Err(e) => Err(e),
        };
        self.settle(result)?;
        self.open = false;
        Ok(())
    }

    /// Ends a `READ ONLY` transaction without waiting for the server: a `ROLLBACK` is queued in
    /// the connection's write buffer, and the connection goes back to the pool, whose release
    /// check (sqlx's `Sync` on every connection it takes back) sends it and waits for its reply
    /// before any other checkout can have the connection; a failure there (an error, a broken
    /// connection) closes the connection instead. Only for a transaction whose end cannot change
    /// what was answered (`docs/transactions.md`, *Ending a read without waiting*): `COMMIT` and
    /// `ROLLBACK` end it alike, and the queued message saves the round trip of its own.
    #[cfg(feature = "postgres")]
    pub(super) fn end_unawaited(mut self) {
        if let Some(conn) = self.conn.as_deref_mut() {
            DB::TransactionManager::start_rollback(conn);
            self.open = false;
        }
    }

    /// Closes the connection at once, outside the pool (which may open a replacement): no
    /// `Terminate`, no waiting on a socket that may never answer.
    fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

impl<DB: Database> Drop for TxConn<DB> {
    fn drop(&mut self) {
        // Abandoned inside the transaction (a cancelled request): the connection is closed,
        // so the server rolls back, rather than returned to the pool mid-transaction.
        if let (true, Some(conn)) = (self.open, self.conn.as_mut()) {
            conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_bounded_only_when_the_server_bounds_it_too() {
        let second = Duration::from_secs(1);
        let off = Bounds::new(None, 10 * second);
        assert_eq!(off.control, 10 * second);
        assert_eq!(off.statement, None);
        let on = Bounds::new(Some(Duration::from_millis(1500)), 10 * second);
        assert_eq!(on.statement, Some(Duration::from_millis(11_500)));
        assert_eq!(on.begin(), (10 * second, false));
        let pooled = on.behind_pooler(30 * second);
        assert_eq!(
            pooled.begin(),
            (30 * second, true),
            "BEGIN waits like a checkout"
        );
        assert_eq!(
            (pooled.control, pooled.statement),
            (on.control, on.statement)
        );
    }

    #[tokio::test]
    async fn a_round_trip_past_its_bound_is_a_timeout_and_none_waits() {
        let never = std::future::pending::<Result<(), sqlx::Error>>();
        let err = within(Some(Duration::from_millis(10)), never)
            .await
            .expect_err("bounded");
        assert!(is_timed_out(&err), "{err}");
        assert!(err.to_string().contains("within 10 ms"), "{err}");
        let ready = within(None, async { Ok::<_, sqlx::Error>(7) }).await;
        assert_eq!(ready.ok(), Some(7));
    }
}
