//! A pooled connection taken for one query outside a request's transaction: the primary's WAL
//! position after a commit, the status of a transaction whose `COMMIT` reply was lost, the
//! replica's replay position and lag. Their callers bound them by dropping the future when the
//! bound passes. A `PoolConnection` dropped in the middle of a query would go back to sqlx's
//! pool, whose check of a returned connection has no bound of its own: in a partition that
//! slot would stay taken until the kernel gives up on the socket, many minutes. [`SideConn`]
//! closes such a connection instead, at once and outside the pool (no `Terminate` sent on a
//! socket that may never answer), and the pool may open a replacement.

use sea_orm::sqlx::{self, Postgres, pool::PoolConnection, postgres::PgRow};

/// A connection that goes back to the pool only when its query finished.
pub(crate) struct SideConn(Option<PoolConnection<Postgres>>);

impl SideConn {
    /// Runs `sql` (one simple-query message: no prepared statement, safe behind a pooler) on a
    /// connection of `pool` and returns its rows. Cancelled before the answer (its caller's
    /// bound passed), the connection is closed rather than handed back.
    pub(crate) async fn fetch_all(
        pool: &sqlx::Pool<Postgres>,
        sql: impl sqlx::SqlSafeStr,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut side = SideConn(Some(super::round_trip::checkout(pool).await?));
        let rows = match side.0.as_deref_mut() {
            Some(conn) => sqlx::raw_sql(sql).fetch_all(conn).await,
            None => Err(sqlx::Error::PoolClosed),
        };
        // Answered (rows or an error): the pool may keep it.
        drop(side.0.take());
        rows
    }
}

impl Drop for SideConn {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}
