//! A `COMMIT` whose reply was lost (PostgreSQL): the connection broke while `COMMIT` was in flight,
//! so the server may or may not have committed. The rules (`docs/transactions.md`) are in the
//! parent module; this file only learns the transaction's id before `COMMIT` and asks for its
//! status afterwards.
//!
//! * Before `COMMIT`, and only for a `READ WRITE` transaction, one simple query reads
//!   `pg_current_xact_id_if_assigned()`: NULL when the transaction wrote nothing (then its
//!   outcome changes nothing and a lost reply is an ordinary 503). It is one round trip more per
//!   writing request; there is no cheaper place to learn it (the id is assigned at the first
//!   write, inside the handler's statements, and the `COMMIT` reply itself is what gets lost).
//! * After a `COMMIT` that failed without an answer from the server (I/O error, closed
//!   connection: anything but a SQLSTATE), `pg_xact_status(xid)` is asked on another pooled
//!   connection, inside a `READ ONLY` transaction so that it also works behind a
//!   transaction-mode pooler. `in progress` means the old backend has not yet noticed the lost
//!   connection (it then commits the `COMMIT` it received, or aborts): asked again until it
//!   settles, within [`TxConfig::commit_check`](super::TxConfig). No answer within that time is
//!   [`Resolved::Unknown`].

use std::time::Duration;

use sea_orm::sqlx::{self, Postgres, Row as _};
use tokio::time::Instant;

use super::side_conn::SideConn;

/// What the server says about a transaction whose `COMMIT` reply was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resolved {
    Committed,
    Aborted,
    /// No answer within the bound (the server, or every path to it, is unreachable).
    Unknown,
}

/// The id of the open transaction, or `None` when it has written nothing (no id assigned).
/// A simple query: one round trip, no prepared statement (safe behind a pooler).
pub(super) async fn current_xid(conn: &mut sqlx::PgConnection) -> Result<Option<u64>, sqlx::Error> {
    let rows = sqlx::raw_sql("SELECT pg_current_xact_id_if_assigned()::text")
        .fetch_all(&mut *conn)
        .await?;
    let text: Option<String> = match rows.first() {
        Some(row) => row.try_get(0)?,
        None => None,
    };
    Ok(text.and_then(|t| t.parse().ok()))
}

/// Whether a failed `COMMIT` may nevertheless have committed: the server did not answer it
/// (an answer, such as a deferred constraint's SQLSTATE, means it did not commit).
pub(super) fn reply_lost(err: &sqlx::Error) -> bool {
    !matches!(err, sqlx::Error::Database(_))
}

/// Asks the server, on another connection of `pool`, what became of transaction `xid`, waiting
/// at most `bound` in all.
pub(super) async fn resolve(pool: &sqlx::Pool<Postgres>, xid: u64, bound: Duration) -> Resolved {
    let deadline = Instant::now() + bound;
    // The xid is a number we parsed: formatting it into the statement is safe.
    let sql = format!("BEGIN READ ONLY; SELECT pg_xact_status('{xid}'::xid8)::text; COMMIT");
    let mut pause = Duration::from_millis(2);
    loop {
        let asked = tokio::time::timeout_at(deadline, async {
            // Past the deadline its connection is closed, not handed back (`side_conn.rs`).
            let rows = SideConn::fetch_all(pool, sqlx::AssertSqlSafe(sql.clone())).await?;
            let status: Option<String> = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => None,
            };
            Ok::<_, sqlx::Error>(status)
        })
        .await;
        match asked {
            Ok(Ok(Some(status))) if status == "committed" => return Resolved::Committed,
            Ok(Ok(Some(status))) if status == "aborted" => return Resolved::Aborted,
            // `in progress`: the old backend is still finishing; a query error: try again.
            Ok(Ok(Some(_))) | Ok(Err(_)) => {}
            // NULL: the id is too old to be known (cannot happen seconds after it was read).
            Ok(Ok(None)) | Err(_) => return Resolved::Unknown,
        }
        if Instant::now() + pause >= deadline {
            return Resolved::Unknown;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
