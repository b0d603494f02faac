//! What the layer does with the primary once it has been lost (PostgreSQL; `docs/transactions.md`,
//! *A primary that goes away*): the failover epoch of the primary's pool.
//!
//! * A "primary lost" ([`FailureKind::PrimaryLost`](crate::FailureKind): 25006 in a transaction
//!   begun read-write, 57P01–57P03, class 08) marks the instant. A connection older than the
//!   last such instant was opened before it, to a server that may since have been demoted or
//!   gone: the pool does not hand it out again (sqlx's `before_acquire`, given the connection's
//!   age, closes it and opens another; `db_connections_evicted_total`). No per-connection state:
//!   the age sqlx keeps is enough. Each checkout looks at one idle connection, so the old ones
//!   go one per checkout, each when it would have been handed out.
//! * For `DB_FAILOVER_RETRY_MS` after the last such instant (the failover window), a
//!   `READ WRITE` transaction checks whether the server takes writes (`transaction_read_only`,
//!   read in its `BEGIN` message: no round trip of its own); a server that does
//!   not (a standby a router still sends writes to) fails the attempt as a primary lost before
//!   the handler's first statement (the one that begins the transaction) runs, and the attempt
//!   is re-run.
//! * For `DB_FAILOVER_RETRY_MS` after the loss that opened it (later ones do not extend it), a
//!   primary that cannot be reached is taken for a new one being promoted
//!   (`Failover::in_failover`): the attempt is re-run like a primary lost, not answered 503 at
//!   once; a database that stays down is answered 503 when the window ends.
//! * `db_failovers_total` counts the losses the layer saw: the first primary lost after the
//!   primary last committed a write. `db_primary_unavailable_seconds_total` adds, when a write
//!   commits again, the time since that first loss (a loss that no write ends is not counted).
//!
//! The pool is connected by [`crate::db::connect`] with the epoch's check in its
//! `before_acquire`; the [`Layer`](crate::Layer) built over that pool finds the same epoch by the
//! pool's identity (its shared connect options). A pool connected any other way gets an epoch of
//! its own without eviction (the window's check and the metrics still work).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
#[cfg(feature = "postgres")]
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// The failover epoch of one pool. Cheap to clone.
#[derive(Clone)]
pub struct Failover {
    inner: Arc<Inner>,
}

struct Inner {
    /// Instants are kept as nanoseconds since this one, plus one (0: never).
    base: Instant,
    /// The last primary lost.
    last_lost: AtomicU64,
    /// The first primary lost since the primary last committed a write (0: none).
    since: AtomicU64,
    /// The primary lost that opened the current failover window (0: none), see
    /// [`Failover::in_failover`].
    opened: AtomicU64,
    /// `DB_FAILOVER_RETRY_MS`: how long after a primary lost new connections are checked.
    window: Duration,
    metrics: OnceLock<Metrics>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("window", &self.inner.window)
            .field("last_lost", &self.last_lost())
            .finish_non_exhaustive()
    }
}

impl Failover {
    /// An epoch with no primary lost yet; `window` is `DB_FAILOVER_RETRY_MS`.
    pub fn new(window: Duration) -> Failover {
        Failover {
            inner: Arc::new(Inner {
                base: Instant::now(),
                last_lost: AtomicU64::new(0),
                since: AtomicU64::new(0),
                opened: AtomicU64::new(0),
                window,
                metrics: OnceLock::new(),
            }),
        }
    }

    /// Counts into `metrics` from now on (the layer's, registered after the pool was made).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn attach(&self, metrics: Metrics) {
        let _ = self.inner.metrics.set(metrics);
    }

    fn now(&self) -> u64 {
        u64::try_from(self.inner.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn age_of(&self, stamp: u64) -> Duration {
        Duration::from_nanos(self.now().saturating_sub(stamp))
    }

    fn last_lost(&self) -> Option<Duration> {
        match self.inner.last_lost.load(Ordering::Acquire) {
            0 => None,
            stamp => Some(self.age_of(stamp)),
        }
    }

    /// The primary was lost now: older connections are not reused, new ones are checked.
    pub(crate) fn primary_lost(&self) {
        let now = self.now();
        self.inner.last_lost.fetch_max(now, Ordering::AcqRel);
        let window = self.inner.window;
        let _ = (self.inner.opened).fetch_update(Ordering::AcqRel, Ordering::Acquire, |opened| {
            (opened == 0 || self.age_of(opened) >= window).then_some(now)
        });
        if self
            .inner
            .since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!("the primary was lost: connections opened before now are not reused");
            if let Some(metrics) = self.inner.metrics.get() {
                metrics.count_failover();
            }
        }
    }

    /// A write committed on the primary: a loss still open ends here.
    pub(crate) fn write_committed(&self) {
        if self.inner.since.load(Ordering::Acquire) == 0 {
            return;
        }
        let since = self.inner.since.swap(0, Ordering::AcqRel);
        if since != 0 {
            let gap = self.age_of(since);
            tracing::info!(
                unavailable_ms = gap.as_millis() as u64,
                "a write committed again after the primary was lost"
            );
            if let Some(metrics) = self.inner.metrics.get() {
                metrics.add_primary_unavailable(gap);
            }
        }
    }

    /// Whether a failover is under way: less than `DB_FAILOVER_RETRY_MS` since the primary lost
    /// that opened the window (later ones within it do not extend it). Meanwhile a primary that
    /// cannot be reached is a new one being promoted, not an outage (`Slot::classify`).
    pub(crate) fn in_failover(&self) -> bool {
        match self.inner.opened.load(Ordering::Acquire) {
            0 => false,
            opened => self.age_of(opened) < self.inner.window,
        }
    }

    /// Whether the primary was lost less than `DB_FAILOVER_RETRY_MS` ago: a read-write
    /// transaction then checks that its server takes writes.
    pub(crate) fn in_window(&self) -> bool {
        self.last_lost().is_some_and(|ago| ago < self.inner.window)
    }

    /// Whether a pooled connection `age` old was opened before the last primary lost; counts
    /// it as evicted when so.
    pub fn evicts(&self, age: Duration) -> bool {
        let evict = self.last_lost().is_some_and(|ago| age > ago);
        if evict && let Some(metrics) = self.inner.metrics.get() {
            metrics.count_evicted();
        }
        evict
    }

    /// The check the pool asks before handing out a connection (`before_acquire`).
    pub(crate) fn evict_hook(&self) -> Arc<dyn Fn(Duration) -> bool + Send + Sync> {
        let failover = self.clone();
        Arc::new(move |age| failover.evicts(age))
    }
}

/// The epochs of the pools [`crate::db::connect`] made, by the identity of each pool's connect
/// options (one `Arc` shared by the pool and all its clones).
#[cfg(feature = "postgres")]
type Registered = Vec<(Weak<sea_orm::sqlx::postgres::PgConnectOptions>, Failover)>;

#[cfg(feature = "postgres")]
static POOLS: Mutex<Registered> = Mutex::new(Vec::new());

/// Remembers `failover` as the epoch of `pool`.
#[cfg(feature = "postgres")]
pub(crate) fn register(pool: &sea_orm::sqlx::PgPool, failover: &Failover) {
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    pools.retain(|(options, _)| options.strong_count() > 0);
    pools.push((Arc::downgrade(&pool.connect_options()), failover.clone()));
}

/// The epoch [`register`]ed for `pool`, if any.
#[cfg(feature = "postgres")]
pub(crate) fn of(pool: &sea_orm::sqlx::PgPool) -> Option<Failover> {
    let options = pool.connect_options();
    let pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    pools
        .iter()
        .find(|(registered, _)| {
            // A dead entry's address may have been reused by another pool's options.
            registered.strong_count() > 0
                && std::ptr::eq(registered.as_ptr(), Arc::as_ptr(&options))
        })
        .map(|(_, failover)| failover.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_older_than_the_last_loss_are_evicted_and_the_window_follows_it() {
        let failover = Failover::new(Duration::from_secs(60));
        assert!(
            !failover.evicts(Duration::from_secs(3600)),
            "nothing lost yet"
        );
        assert!(!failover.in_window());
        failover.primary_lost();
        assert!(failover.evicts(Duration::from_secs(1)), "opened before");
        assert!(!failover.evicts(Duration::ZERO), "opened after");
        assert!(failover.in_window());
        assert!(failover.in_failover());
        let closed = Failover::new(Duration::ZERO);
        closed.primary_lost();
        assert!(!closed.in_window());
        assert!(!closed.in_failover());
    }
}
