//! The layer's Prometheus metrics, registered into the caller's `prometheus_client` registry (no
//! global state, so several apps in one process never mix their numbers). Every series is
//! created at registration, at zero, so dashboards and alerts never see a missing one. The names
//! are listed on [`Metrics`].

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::transaction::TxOutcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: &'static str,
}

/// The layer's series. Cheap to clone: every field shares its series.
///
/// | name | type | what |
/// |---|---|---|
/// | `db_pool_connections{state="idle"\|"in_use"}` | gauge | the pool's connections by state |
/// | `db_pool_max_connections`, `db_pool_min_connections` | gauge | the pool's bounds |
/// | `db_pool_acquire_seconds` | histogram | time to get a connection and begin |
/// | `db_transactions_total{outcome="commit"\|"rollback"\|"unknown"}` | counter | transactions by outcome |
/// | `db_transaction_retries_total` | counter | re-runs after a serialization failure or deadlock |
/// | `db_requests_rerun_total{reason="primary_lost"}` | counter | re-runs while a new primary takes over (`DB_FAILOVER_RETRY_MS`) |
/// | `db_idempotent_replays_total` | counter | answers replayed for an `Idempotency-Key` |
/// | `db_transaction_leaks_total` | counter | transaction handles that outlived their request |
/// | `db_abandoned_backends_terminated_total` | counter | server backends of abandoned transactions ended with `pg_terminate_backend` |
/// | `db_failovers_total` | counter | primaries lost: the first primary lost since the primary last committed a write |
/// | `db_connections_evicted_total` | counter | pooled connections closed instead of handed out, opened before a primary lost |
/// | `db_primary_unavailable_seconds_total` | counter | seconds from a primary lost to the next write committed |
/// | `db_reads_total{target="replica"\|"primary"}` | counter | read-only transactions by server |
/// | `db_replica_lag_seconds` | gauge | the replica's replay lag at the last check |
/// | `db_replica_pool_connections{state}`, `db_replica_pool_max_connections` | gauge | the replica's pool |
#[derive(Clone)]
pub struct Metrics {
    pool_connections: Family<StateLabel, Gauge>,
    pool_max: Gauge,
    pool_min: Gauge,
    acquire: Histogram,
    /// `db_transactions_total` of each outcome, looked up once: a family's lookup hashes its
    /// labels, on every request.
    transactions: Outcomes,
    retries: Counter,
    reruns: Family<ReasonLabel, Counter>,
    replays: Counter,
    leaks: Counter,
    abandoned_terminated: Counter,
    failovers: Counter,
    evicted: Counter,
    primary_unavailable: Counter<f64, AtomicU64>,
    /// `db_reads_total` of each target, looked up once like `transactions`.
    reads: Reads,
    replica_lag: Gauge<f64, AtomicU64>,
    replica_pool_connections: Family<StateLabel, Gauge>,
    replica_pool_max: Gauge,
}

/// The series of `db_reads_total`, one per target.
#[derive(Clone)]
struct Reads {
    replica: Counter,
    primary: Counter,
}

/// The series of `db_transactions_total`, one per outcome.
#[derive(Clone)]
struct Outcomes {
    commit: Counter,
    rollback: Counter,
    unknown: Counter,
}

impl Metrics {
    /// Registers every series in `registry`, the pool's bounds set to `pool_min`/`pool_max`.
    pub fn register(registry: &mut Registry, pool_min: u32, pool_max: u32) -> Metrics {
        let pool_connections = Family::<StateLabel, Gauge>::default();
        registry.register(
            "db_pool_connections",
            "Connections of the database pool by state",
            pool_connections.clone(),
        );
        let max = Gauge::default();
        max.set(i64::from(pool_max));
        registry.register(
            "db_pool_max_connections",
            "Largest number of connections the pool may open",
            max.clone(),
        );
        let min = Gauge::default();
        min.set(i64::from(pool_min));
        registry.register(
            "db_pool_min_connections",
            "Connections the pool keeps open",
            min.clone(),
        );
        let acquire = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register(
            "db_pool_acquire_seconds",
            "Time to obtain a pooled connection and begin a transaction",
            acquire.clone(),
        );
        let transactions = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "db_transactions",
            "Database transactions by outcome",
            transactions.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "db_transaction_retries",
            "Re-runs after a serialization failure or deadlock",
            retries.clone(),
        );
        let reruns = Family::<ReasonLabel, Counter>::default();
        // At zero from start-up, so that a rate can be taken before the first re-run.
        let _ = reruns.get_or_create(&ReasonLabel {
            reason: "primary_lost",
        });
        registry.register(
            "db_requests_rerun",
            "Requests re-run on a budget of their own, by reason (primary_lost: DB_FAILOVER_RETRY_MS)",
            reruns.clone(),
        );
        let replays = Counter::default();
        registry.register(
            "db_idempotent_replays",
            "Requests answered with the stored response of their Idempotency-Key",
            replays.clone(),
        );
        let leaks = Counter::default();
        registry.register(
            "db_transaction_leaks",
            "Requests whose transaction handle outlived them (rolled back, answered 500)",
            leaks.clone(),
        );
        let abandoned_terminated = Counter::default();
        registry.register(
            "db_abandoned_backends_terminated",
            "Server backends of transactions the layer abandoned (a round trip past its bound) that it ended with pg_terminate_backend",
            abandoned_terminated.clone(),
        );
        let failovers = Counter::default();
        registry.register(
            "db_failovers",
            "Primaries lost (25006 in a read-write transaction, 57P01-57P03, class 08): the first since the primary last committed a write",
            failovers.clone(),
        );
        let evicted = Counter::default();
        registry.register(
            "db_connections_evicted",
            "Pooled connections closed instead of handed out because they were opened before the primary was last lost",
            evicted.clone(),
        );
        let primary_unavailable = Counter::<f64, AtomicU64>::default();
        registry.register(
            "db_primary_unavailable_seconds",
            "Seconds from a primary lost to the next write committed on the primary",
            primary_unavailable.clone(),
        );
        // Read replica (`docs/scale-out.md`): at zero when none is configured.
        let reads = Family::<TargetLabel, Counter>::default();
        registry.register(
            "db_reads",
            "Read-only transactions by the server they ran on",
            reads.clone(),
        );
        let replica_lag = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "db_replica_lag_seconds",
            "How far the replica's replay was behind the primary at the last check",
            replica_lag.clone(),
        );
        let replica_pool_connections = Family::<StateLabel, Gauge>::default();
        registry.register(
            "db_replica_pool_connections",
            "Connections of the replica's pool by state",
            replica_pool_connections.clone(),
        );
        let replica_pool_max = Gauge::default();
        registry.register(
            "db_replica_pool_max_connections",
            "Largest number of connections the replica's pool may open (0: no replica)",
            replica_pool_max.clone(),
        );
        let target = |target| reads.get_or_create(&TargetLabel { target }).clone();
        let reads = Reads {
            replica: target("replica"),
            primary: target("primary"),
        };
        for state in ["idle", "in_use"] {
            pool_connections.get_or_create(&StateLabel { state }).set(0);
            replica_pool_connections
                .get_or_create(&StateLabel { state })
                .set(0);
        }
        let outcome = |outcome| {
            transactions
                .get_or_create(&OutcomeLabel { outcome })
                .clone()
        };
        let transactions = Outcomes {
            commit: outcome("commit"),
            rollback: outcome("rollback"),
            unknown: outcome("unknown"),
        };
        Metrics {
            pool_connections,
            pool_max: max,
            pool_min: min,
            acquire,
            transactions,
            retries,
            reruns,
            replays,
            leaks,
            abandoned_terminated,
            failovers,
            evicted,
            primary_unavailable,
            reads,
            replica_lag,
            replica_pool_connections,
            replica_pool_max,
        }
    }

    /// Counts one read-only transaction, on the replica or on the primary.
    pub fn count_read(&self, on_replica: bool) {
        match on_replica {
            true => self.reads.replica.inc(),
            false => self.reads.primary.inc(),
        };
    }

    /// The replica's pool and lag, as of now.
    pub fn set_replica(&self, pool: &crate::db::PoolStats, lag_seconds: Option<f64>) {
        self.replica_pool_max.set(i64::from(pool.max));
        self.replica_pool_connections
            .get_or_create(&StateLabel { state: "idle" })
            .set(i64::from(pool.idle));
        self.replica_pool_connections
            .get_or_create(&StateLabel { state: "in_use" })
            .set(i64::from(pool.in_use));
        if let Some(lag) = lag_seconds {
            self.replica_lag.set(lag);
        }
    }

    /// Sets the pool's gauges (`db_pool_connections`).
    pub fn set_pool(&self, idle: u32, in_use: u32) {
        self.pool_connections
            .get_or_create(&StateLabel { state: "idle" })
            .set(i64::from(idle));
        self.pool_connections
            .get_or_create(&StateLabel { state: "in_use" })
            .set(i64::from(in_use));
    }

    /// The pool's bounds as registered: `(min, max)`.
    pub fn pool_limits(&self) -> (i64, i64) {
        (self.pool_min.get(), self.pool_max.get())
    }

    /// Observes one checkout-and-begin (`db_pool_acquire_seconds`).
    pub fn observe_acquire(&self, elapsed: Duration) {
        self.acquire.observe(elapsed.as_secs_f64());
    }

    /// Counts one finished transaction by its outcome (`db_transactions_total`).
    pub fn count_transaction(&self, outcome: TxOutcome) {
        let counter = match outcome {
            TxOutcome::Commit => &self.transactions.commit,
            TxOutcome::Rollback => &self.transactions.rollback,
            TxOutcome::Unknown => &self.transactions.unknown,
            TxOutcome::None => return,
        };
        counter.inc();
    }

    /// Counts one re-run (`db_transaction_retries_total`).
    pub fn count_retry(&self) {
        self.retries.inc();
    }

    /// Counts one re-run of a request for `reason` (`db_requests_rerun_total{reason}`).
    pub fn count_rerun(&self, reason: &'static str) {
        self.reruns.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts one replayed answer (`db_idempotent_replays_total`).
    pub fn count_replay(&self) {
        self.replays.inc();
    }

    /// Counts one leaked transaction handle (`db_transaction_leaks_total`).
    pub fn count_leak(&self) {
        self.leaks.inc();
    }

    /// Counts one primary lost after the primary had committed (`db_failovers_total`).
    pub fn count_failover(&self) {
        self.failovers.inc();
    }

    /// Counts one connection closed instead of handed out (`db_connections_evicted_total`).
    pub fn count_evicted(&self) {
        self.evicted.inc();
    }

    /// Adds the time from a primary lost to the next committed write
    /// (`db_primary_unavailable_seconds_total`).
    pub fn add_primary_unavailable(&self, gap: Duration) {
        self.primary_unavailable.inc_by(gap.as_secs_f64());
    }

    /// Counts backends of abandoned transactions ended on the server
    /// (`db_abandoned_backends_terminated_total`).
    pub fn count_abandoned_terminated(&self, backends: u64) {
        self.abandoned_terminated.inc_by(backends);
    }
}
