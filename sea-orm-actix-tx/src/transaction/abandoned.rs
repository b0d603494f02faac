//! A transaction the layer abandoned (PostgreSQL): a round trip on its connection outlived its
//! bound (a partition at a statement, at `COMMIT`, at `BEGIN`), so the layer closed its end of
//! the connection and answered. The server does not see that close while the partition lasts
//! (and, once it heals, an idle backend sends nothing that would make it notice), so the
//! transaction stays open on the server with its row locks until
//! `idle_in_transaction_session_timeout` (`DB_IDLE_IN_TRANSACTION_TIMEOUT_MS`) ends it, or, for a
//! statement still running, its `statement_timeout`. Meanwhile every write of the same rows waits.
//! The layer asks the server to end that backend (`pg_terminate_backend`, on another
//! connection) as soon as the server answers (`docs/transactions.md`, *A database that stops
//! answering*).
//!
//! Which backend: sqlx 0.9 keeps the backend's process id (its `BackendKeyData`) to itself and
//! gives a pooled connection no identity that a pid learned once could be kept under. So every
//! `READ WRITE` transaction marks itself, in the message of its `BEGIN` (no round trip of its
//! own): `SELECT format('%s|…', pg_try_advisory_xact_lock_shared(key), …)` (`outcome::BeginRead`), a transaction-scoped shared
//! advisory lock on a key of its own ([`Mark`]: 31 random bits of the process, 32 of a counter).
//! A shared advisory lock blocks no other shared one and nothing else but an exclusive advisory
//! lock on the same key; the `try` form never waits. The server releases it when the
//! transaction ends, however it ends, so a backend holding it (`pg_locks`) is that
//! transaction, still open: nothing else can be hit, and a transaction that ended by itself is
//! not looked for. `READ ONLY` transactions are not marked: they hold no row locks (their
//! snapshot and their `ACCESS SHARE` table locks are left to the server's timeouts).
//!
//! [`Terminator`] ends the abandoned backends in the background, never on the request's path: one
//! task at a time per pool takes every key still waiting, asks on one pooled connection
//! ([`SideConn`], closed when its bound passes), each attempt bounded by `DB_CONNECT_TIMEOUT`,
//! and tries again with backoff until the server answers or, per key, its deadline passes
//! (`DB_IDLE_IN_TRANSACTION_TIMEOUT_MS`, after which the server's own timeout has ended it; 60 s
//! when that is off). `db_abandoned_backends_terminated_total` counts the backends ended.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::sqlx::{self, Postgres, Row as _};
use tokio::time::Instant;

use super::side_conn::SideConn;
use crate::metrics::Metrics;

/// How long the layer keeps asking when the server has no `idle_in_transaction_session_timeout`.
const WITHOUT_SERVER_TIMEOUT: Duration = Duration::from_secs(60);
/// First pause between two attempts that got no answer; doubled up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Ends, on the server, the transactions the layer abandoned on one pool. Cheap to clone.
#[derive(Clone)]
pub struct Terminator {
    inner: Arc<Inner>,
}

struct Inner {
    pool: sqlx::Pool<Postgres>,
    /// Bound on one attempt (`DB_CONNECT_TIMEOUT`).
    attempt: Duration,
    /// How long a key is asked for (`DB_IDLE_IN_TRANSACTION_TIMEOUT_MS`).
    give_up_after: Duration,
    metrics: Option<Metrics>,
    /// High bits of every key of this process: random, so that two processes' keys differ.
    salt: u32,
    next: AtomicU32,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Keys of abandoned transactions, each with the instant after which it is no longer asked.
    pending: Vec<(i64, Instant)>,
    /// Whether a task is working through `pending`.
    running: bool,
}

impl fmt::Debug for Terminator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Terminator")
            .field("attempt", &self.inner.attempt)
            .field("give_up_after", &self.inner.give_up_after)
            .finish_non_exhaustive()
    }
}

/// The mark of one transaction: the key of its advisory lock.
#[derive(Clone)]
pub(super) struct Mark {
    key: i64,
    terminator: Terminator,
}

impl Mark {
    /// The key of the lock that marks the transaction, taken in its `BEGIN` message
    /// (`pg_try_advisory_xact_lock_shared(key)`, written by `outcome::BeginRead`).
    pub(super) fn key(&self) -> i64 {
        self.key
    }

    /// Asks the server, in the background, to end the backend of this transaction, which the
    /// layer has just abandoned.
    pub(super) fn abandoned(&self) {
        self.terminator.abandoned(self.key);
    }
}

impl Terminator {
    /// Ends the abandoned transactions of `pool`, each attempt bounded by `attempt`
    /// (`DB_CONNECT_TIMEOUT`), each transaction asked for until `idle_in_transaction_timeout`
    /// has passed (60 s when `None`), counted in `metrics`.
    pub fn new(
        pool: sqlx::Pool<Postgres>,
        attempt: Duration,
        idle_in_transaction_timeout: Option<Duration>,
        metrics: Option<Metrics>,
    ) -> Terminator {
        let salt = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32;
        Terminator {
            inner: Arc::new(Inner {
                pool,
                attempt,
                give_up_after: idle_in_transaction_timeout.unwrap_or(WITHOUT_SERVER_TIMEOUT),
                metrics,
                // 31 bits: the key stays a positive bigint.
                salt: salt & 0x7fff_ffff,
                next: AtomicU32::new(0),
                queue: Mutex::new(Queue::default()),
            }),
        }
    }

    /// A mark for one more transaction.
    pub(super) fn mark(&self) -> Mark {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        Mark {
            key: key(self.inner.salt, n),
            terminator: self.clone(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn abandoned(&self, key: i64) {
        let start = {
            let mut queue = self.queue();
            let deadline = Instant::now() + self.inner.give_up_after;
            queue.pending.push((key, deadline));
            !std::mem::replace(&mut queue.running, true)
        };
        if !start {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.clone().work());
            }
            Err(_) => {
                self.queue().running = false;
                tracing::warn!(key, "no runtime to end an abandoned transaction in");
            }
        }
    }

    /// Works through the pending keys until none is left.
    async fn work(self) {
        // Cleared on every way out, a cancelled task (its runtime stopping) included.
        let mut running = Running(Some(self.clone()));
        let mut pause = FIRST_PAUSE;
        loop {
            let keys: Vec<i64> = {
                let mut queue = self.queue();
                let now = Instant::now();
                queue.pending.retain(|(key, deadline)| {
                    let keep = *deadline > now;
                    if !keep {
                        tracing::warn!(
                            key,
                            "gave up ending an abandoned transaction: the server did not answer in time; its own idle_in_transaction_session_timeout ends it"
                        );
                    }
                    keep
                });
                if queue.pending.is_empty() {
                    queue.running = false;
                    running.0 = None;
                    return;
                }
                queue.pending.iter().map(|(key, _)| *key).collect()
            };
            match tokio::time::timeout(self.inner.attempt, terminate(&self.inner.pool, &keys)).await
            {
                Ok(Ok(ended)) => {
                    self.queue().pending.retain(|(key, _)| !keys.contains(key));
                    if let Some(metrics) = &self.inner.metrics {
                        metrics.count_abandoned_terminated(ended);
                    }
                    tracing::info!(
                        asked = keys.len(),
                        ended,
                        "ended the backends of abandoned transactions"
                    );
                    pause = FIRST_PAUSE;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "could not end abandoned transactions yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Err(_) => {
                    tracing::debug!("no answer while ending abandoned transactions yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }
}

/// Clears [`Queue::running`] when the task ends without having done it itself.
struct Running(Option<Terminator>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(terminator) = self.0.take() {
            terminator.queue().running = false;
        }
    }
}

/// The key of transaction `n` of the process whose keys start with `salt` (31 bits).
fn key(salt: u32, n: u32) -> i64 {
    (i64::from(salt) << 32) | i64::from(n)
}

/// The `pg_locks` columns of a bigint advisory key: `(classid, objid)`.
fn lock_columns(key: i64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// Ends the backends that hold the advisory lock of one of `keys` in this database; returns how
/// many were ended. One simple query on a pooled connection, closed if cancelled.
async fn terminate(pool: &sqlx::Pool<Postgres>, keys: &[i64]) -> Result<u64, sqlx::Error> {
    // The keys are numbers of our own: formatting them into the statement is safe.
    let pairs: Vec<String> = keys
        .iter()
        .map(|key| {
            let (classid, objid) = lock_columns(*key);
            format!("('{classid}'::oid, '{objid}'::oid)")
        })
        .collect();
    let sql = format!(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted \
         AND l.pid <> pg_backend_pid() \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND (l.classid, l.objid) IN ({})",
        pairs.join(", ")
    );
    let rows = SideConn::fetch_all(pool, sqlx::AssertSqlSafe(sql)).await?;
    let mut ended = 0;
    for row in rows {
        if row.try_get::<bool, _>(0)? {
            ended += 1;
        }
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_positive_and_its_lock_columns_are_its_two_halves() {
        let key = key(0x7fff_ffff, u32::MAX);
        assert!(key > 0);
        assert_eq!(lock_columns(key), (0x7fff_ffff, u32::MAX));
        assert_eq!(lock_columns(super::key(5, 7)), (5, 7));
    }
}
