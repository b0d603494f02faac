//! Whether the database can be reached, known fast enough to answer 503 in time.
//!
//! sqlx retries a refused connection inside the pool until the whole acquire timeout has passed
//! (`DB_POOL_TIMEOUT`, 30 s by default) and then reports a pool timeout, so during an outage
//! every request would hang for 30 s and then be told the pool was busy. [`Availability`] closes
//! that gap:
//!
//! * [`Availability::guard`] runs a pool checkout. If the checkout is still waiting after
//!   [`SUSPECT_AFTER`], a probe opens one connection of its own, outside the pool, bounded by
//!   `DB_CONNECT_TIMEOUT`. A probe that cannot reach the server marks the database down, and
//!   every waiting checkout gives up at once with a connection error (503
//!   `database_unavailable`). A probe that succeeds means the pool is merely busy: the checkout
//!   waits on, up to `DB_POOL_TIMEOUT` (503 `pool_timeout`).
//! * While the database is down, checkouts fail immediately (or, when the pool still holds idle
//!   connections, after trying one for at most [`SUSPECT_AFTER`]), and one probe runs every
//!   [`RECHECK_EVERY`]; the first probe or checkout that succeeds marks it up again, so the
//!   service recovers on its own when the server is back, and a probe that was wrong costs
//!   little. Only a refused or unroutable connection, or a server not accepting sessions,
//!   counts as down: a slow probe does not.
//! * A statement that fails because the connection or the server went away calls
//!   [`Availability::suspect`], which probes once.
//!
//! * Every probe runs `SELECT 1` once connected: a database counts as up only when it answers
//!   a query, not merely a login. On a direct connection a probe slower than
//!   `DB_CONNECT_TIMEOUT` still does not count as down (an overloaded server).
//! * [`Availability::behind_pooler`] is the primary behind a transaction-mode pooler
//!   (`DB_POOLER=transaction`). There a login proves only that the pooler is there: with its
//!   server gone, PgBouncer logs clients in (or holds the login) and holds their queries. And a
//!   query that waits is not proof of an outage either: PgBouncer queues clients while all its
//!   server connections are busy, and a queue is a pool wait (503 `pool_timeout` at
//!   `DB_POOL_TIMEOUT`). So the probe's `SELECT 1` must be answered within `DB_CONNECT_TIMEOUT`,
//!   unless a transaction of this pool began meanwhile: a queue moves, a pooler whose server is
//!   gone hands out nothing. The limit: when every server connection of the pooler is held
//!   longer than `DB_CONNECT_TIMEOUT` by transactions that are not this pool's (other
//!   instances), a queue is taken for an outage and answered 503 `database_unavailable`.
//! * [`Availability::answering`] is for a server whose accepted connection proves nothing: the
//!   read replica, perhaps behind a transaction-mode pooler. While its server is gone, PgBouncer
//!   logs clients in from its cache and holds their queries (up to `query_wait_timeout`, 120 s),
//!   or holds the login itself when it has no server parameters cached. That probe also runs
//!   `SELECT 1`, and a probe that does not get its answer within a short budget counts as down:
//!   for the replica a wrong "down" only sends reads to the primary for a while.
//!
//! At most one probe runs at a time, and while the database is up probes are at least
//! [`RECHECK_EVERY`] apart, so a busy pool costs one extra, short-lived connection per interval
//! at most (named `<DB_APPLICATION_NAME>-probe` on PostgreSQL; count it when sizing
//! `max_connections`). MariaDB is probed the same way, with the pool's own connect options.
//! SQLite is embedded: it is never probed and never down.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(feature = "mysql")]
use sea_orm::sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
#[cfg(feature = "postgres")]
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};
use sea_orm::{DatabaseConnection, DbBackend, DbErr, RuntimeErr};
use tokio::sync::watch;

/// A checkout still waiting after this long makes the database suspect.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(250);
/// How often a down database is probed, and the least time between probes while it is up.
pub const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// Shared by every worker of the server (cheap to clone).
#[derive(Clone)]
pub struct Availability(Arc<Inner>);

/// Where a probe connects: the pool's own connect options.
enum Target {
    #[cfg(feature = "postgres")]
    Postgres(PgConnectOptions),
    #[cfg(feature = "mysql")]
    Mysql(MySqlConnectOptions),
}

struct Inner {
    /// `None` for SQLite.
    target: Option<Arc<Target>>,
    /// The pool, to see whether it holds idle connections worth trying while marked down.
    db: DatabaseConnection,
    connect_timeout: Duration,
    /// What a probe that gets no answer in time means.
    silence: Silence,
    /// Checkouts that succeeded (their `BEGIN` answered, behind a pooler): a pooler that hands
    /// out server connections is a queue, not an outage.
    progress: AtomicU64,
    /// `true` while the database is known to be unreachable.
    down: watch::Sender<bool>,
    probing: AtomicBool,
    last_probe: Mutex<Option<Instant>>,
    /// Whether the last probe that found the database down found nothing listening there.
    nothing_listens: AtomicBool,
}

/// What a probe that gets no answer to its login and `SELECT 1` in time means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Silence {
    /// A slow server, not a gone one (a direct connection to the primary): up.
    Slow,
    /// Down, for a probe bounded by this budget (the replica: a wrong "down" costs little).
    Down(Duration),
    /// Down unless a checkout of the pool succeeded meanwhile (the primary behind a pooler).
    DownUnlessQueueMoved,
}

impl std::fmt::Debug for Availability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Availability")
            .field("down", &self.is_down())
            .finish()
    }
}

impl Availability {
    /// Probes `db` (each probe bounded by `connect_timeout`) whenever a checkout or a statement finds it unreachable.
    pub fn new(db: &DatabaseConnection, connect_timeout: Duration) -> Availability {
        Availability::build(db, connect_timeout, Silence::Slow)
    }

    /// Like [`new`](Self::new), for a database reached through a transaction-mode pooler: a
    /// probe whose `SELECT 1` is not answered within `connect_timeout` counts as down, unless a
    /// checkout through [`guard`](Self::guard) succeeded meanwhile (the pooler's queue moves).
    pub fn behind_pooler(db: &DatabaseConnection, connect_timeout: Duration) -> Availability {
        Availability::build(db, connect_timeout, Silence::DownUnlessQueueMoved)
    }

    /// Like [`new`](Self::new), but the probe connects and runs `SELECT 1`, and counts the
    /// database as down unless both are done within `answer_within`.
    pub fn answering(
        db: &DatabaseConnection,
        connect_timeout: Duration,
        answer_within: Duration,
    ) -> Availability {
        Availability::build(db, connect_timeout, Silence::Down(answer_within))
    }

    fn build(db: &DatabaseConnection, connect_timeout: Duration, silence: Silence) -> Availability {
        let target = match db.get_database_backend() {
            #[cfg(feature = "postgres")]
            DbBackend::Postgres => {
                // The pool's own options, under a name of its own so that `pg_stat_activity`
                // tells the probe from the pool's connections.
                let options = db.get_postgres_connection_pool().connect_options();
                let name = format!("{}-probe", options.get_application_name().unwrap_or("app"));
                Some(Arc::new(Target::Postgres(
                    (*options).clone().application_name(&name),
                )))
            }
            #[cfg(feature = "mysql")]
            DbBackend::MySql => {
                let options = db.get_mysql_connection_pool().connect_options();
                Some(Arc::new(Target::Mysql((*options).clone())))
            }
            _ => None,
        };
        Availability(Arc::new(Inner {
            target,
            db: db.clone(),
            connect_timeout,
            silence,
            progress: AtomicU64::new(0),
            down: watch::Sender::new(false),
            probing: AtomicBool::new(false),
            last_probe: Mutex::new(None),
            nothing_listens: AtomicBool::new(false),
        }))
    }

    /// Whether the last probe found the database unreachable.
    pub fn is_down(&self) -> bool {
        *self.0.down.borrow()
    }

    /// Whether the database is down with nothing listening at its address (the connection
    /// refused or unroutable): a server that is gone, not a router (HAProxy) that accepts and
    /// closes while it has no primary to send to, nor a server shutting down or starting up.
    pub fn nothing_listens(&self) -> bool {
        self.is_down() && self.0.nothing_listens.load(Ordering::Acquire)
    }

    /// Runs `checkout` (a future that takes a connection from the pool) unless the database is
    /// known to be down, and gives it up as soon as a probe finds the database unreachable.
    pub async fn guard<T>(
        &self,
        checkout: impl Future<Output = Result<T, DbErr>>,
    ) -> Result<T, DbErr> {
        if self.0.target.is_none() {
            return checkout.await;
        }
        let mut down = self.0.down.subscribe();
        if *down.borrow_and_update() {
            // Idle pooled connections may still work (a probe can be wrong): try one, briefly.
            let idle = crate::db::pool_stats(&self.0.db, 0, 0).idle > 0;
            if !idle {
                return Err(unavailable());
            }
            return match tokio::time::timeout(SUSPECT_AFTER, checkout).await {
                Ok(Ok(value)) => {
                    self.clear();
                    Ok(value)
                }
                Ok(Err(_)) | Err(_) => Err(unavailable()),
            };
        }
        let checkout = std::pin::pin!(checkout);
        let result = tokio::select! {
            biased;
            result = checkout => result,
            _ = async {
                tokio::time::sleep(SUSPECT_AFTER).await;
                self.suspect();
                // Resolves only when a probe marks the database down.
                let _ = down.wait_for(|down| *down).await;
            } => Err(unavailable()),
        };
        if result.is_ok() {
            self.0.progress.fetch_add(1, Ordering::Relaxed);
            if self.is_down() {
                self.clear();
            }
        }
        result
    }

    /// A checkout succeeded: the database answers, whatever a probe concluded.
    fn clear(&self) {
        if self.0.down.send_replace(false) {
            tracing::info!("the database answers again (a pooled connection works)");
        }
    }

    /// Something suggests the database went away: probe it (once, in the background).
    pub fn suspect(&self) {
        let Some(target) = self.0.target.clone() else {
            return;
        };
        {
            let mut last = self.0.last_probe.lock().unwrap_or_else(|p| p.into_inner());
            if !self.is_down() && last.is_some_and(|at| at.elapsed() < RECHECK_EVERY) {
                return;
            }
            if self.0.probing.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.probe_until_up(&target).await;
            this.0.probing.store(false, Ordering::Release);
        });
    }

    async fn probe_until_up(&self, target: &Target) {
        loop {
            let reachable = self.probe_once(target).await;
            let was_down = self.0.down.send_replace(!reachable);
            match (was_down, reachable) {
                (false, false) => tracing::warn!(
                    "the database cannot be reached; checkouts from its pool fail fast until it answers"
                ),
                (true, true) => tracing::info!("the database answers again"),
                _ => {}
            }
            if reachable {
                return;
            }
            tokio::time::sleep(RECHECK_EVERY).await;
            *self.0.last_probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }
}

impl Availability {
    /// One probe, its silence read as [`Silence`] says.
    async fn probe_once(&self, target: &Target) -> bool {
        let budget = match self.0.silence {
            Silence::Down(budget) => budget,
            Silence::Slow | Silence::DownUnlessQueueMoved => self.0.connect_timeout,
        };
        let before = self.0.progress.load(Ordering::Relaxed);
        let found = probe(target, budget).await;
        (self.0.nothing_listens).store(found == Probe::NothingListens, Ordering::Release);
        let moved = self.0.progress.load(Ordering::Relaxed) != before;
        let up = verdict(self.0.silence, found, moved);
        if found == Probe::Silent {
            // Once per probe while it lasts; a change to "down" is logged by the caller.
            tracing::debug!(
                within_ms = budget.as_millis() as u64,
                queue_moved = moved,
                counted_as_up = up,
                "the availability probe got no answer to SELECT 1 in time"
            );
        }
        up
    }
}

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// Connected and `SELECT 1` answered (or refused for a reason that proves a server there).
    Up,
    /// Not accepting sessions (shutting down, starting up), or the connection closed at once.
    Down,
    /// Refused or unroutable: nothing listens there.
    NothingListens,
    /// No answer within the budget.
    Silent,
}

/// Whether the database counts as up after a probe that `found` this, where silence means what
/// `silence` says; `queue_moved`: a checkout of the pool succeeded while the probe waited.
fn verdict(silence: Silence, found: Probe, queue_moved: bool) -> bool {
    match (found, silence) {
        (Probe::Up, _) => true,
        (Probe::Down | Probe::NothingListens, _) => false,
        (Probe::Silent, Silence::Slow) => true,
        (Probe::Silent, Silence::Down(_)) => false,
        (Probe::Silent, Silence::DownUnlessQueueMoved) => queue_moved,
    }
}

/// Opens one connection outside the pool. Only a server that refuses the connection, cannot be
/// routed to, or is not accepting sessions (shutting down, starting up, crashed) counts as
/// down. Anything else is a server that is there: a probe slower than `within` (an overloaded
/// server), a refusal such as too many connections or a bad password, a TLS or local error.
/// Declaring such a server down would fail every checkout at once although the pool may hold
/// healthy connections; the pool reports those problems itself.
///
/// The probe also runs `SELECT 1`, and connecting and the answer must both fit in `budget`,
/// else it is [`Probe::Silent`], which [`verdict`] reads by where the server is ([`Silence`]).
async fn probe(target: &Target, budget: Duration) -> Probe {
    let connected: Result<Result<(), sqlx::Error>, tokio::time::error::Elapsed> = match target {
        #[cfg(feature = "postgres")]
        Target::Postgres(options) => {
            tokio::time::timeout(budget, async {
                let mut conn: PgConnection = options.connect().await?;
                sqlx::raw_sql("SELECT 1").execute(&mut conn).await?;
                let _ = conn.close().await;
                Ok::<(), sqlx::Error>(())
            })
            .await
        }
        #[cfg(feature = "mysql")]
        Target::Mysql(options) => {
            tokio::time::timeout(budget, async {
                let mut conn: MySqlConnection = options.connect().await?;
                sqlx::raw_sql("SELECT 1").execute(&mut conn).await?;
                let _ = conn.close().await;
                Ok::<(), sqlx::Error>(())
            })
            .await
        }
        // No target is ever made without a server backend (SQLite is probed by its pool).
        #[cfg(not(any(feature = "postgres", feature = "mysql")))]
        _ => return Probe::Up,
    };
    let up = |up: bool| if up { Probe::Up } else { Probe::Down };
    match connected {
        Ok(Ok(())) => Probe::Up,
        // The server answered: only "shutting down / starting up" (57P…, MariaDB 1053 with
        // 08S01) and connection exceptions (08…) mean it is not there.
        Ok(Err(sqlx::Error::Database(e))) => {
            let code = e.code().unwrap_or_default();
            up(!(code.starts_with("57P") || code.starts_with("08")))
        }
        Ok(Err(sqlx::Error::Io(e))) => {
            use std::io::ErrorKind::*;
            match e.kind() {
                ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable => {
                    Probe::NothingListens
                }
                ConnectionReset | UnexpectedEof => Probe::Down,
                _ => Probe::Up,
            }
        }
        Ok(Err(_)) => Probe::Up,
        Err(_) => Probe::Silent,
    }
}

/// The error a checkout gets while the database is down; classified as unavailable.
fn unavailable() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(
        "the database cannot be reached".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn options(port: u16) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(port)
            .username("probe")
            .ssl_mode(sqlx::postgres::PgSslMode::Disable)
    }

    #[tokio::test]
    async fn a_refused_connection_counts_as_down() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        // The listener is closed again: nothing listens there.
        let found = probe(&Target::Postgres(options(port)), Duration::from_secs(2)).await;
        assert_eq!(found, Probe::NothingListens);
        for silence in [
            Silence::Slow,
            Silence::Down(Duration::from_secs(1)),
            Silence::DownUnlessQueueMoved,
        ] {
            assert!(!verdict(silence, found, true), "{silence:?}");
        }
    }

    #[tokio::test]
    async fn a_server_slower_than_the_probe_does_not_count_as_down() {
        // Accepts the TCP connection and never answers the startup message, like an
        // overloaded server.
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("address").port();
        let found = probe(&Target::Postgres(options(port)), Duration::from_millis(200)).await;
        assert_eq!(found, Probe::Silent);
        assert!(verdict(Silence::Slow, found, false));
        drop(listener);
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_in_time_counts_as_down_for_an_answering_probe() {
        // The same silent server, as a pooler holding the login of a client whose server is
        // gone looks: for the replica's probe it is down.
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("address").port();
        let started = Instant::now();
        let budget = Duration::from_millis(200);
        let found = probe(&Target::Postgres(options(port)), budget).await;
        assert!(!verdict(Silence::Down(budget), found, false));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the budget bounds the probe"
        );
        drop(listener);
    }

    #[test]
    fn behind_a_pooler_silence_is_an_outage_unless_the_queue_moved() {
        let silence = Silence::DownUnlessQueueMoved;
        assert!(
            !verdict(silence, Probe::Silent, false),
            "a pooler whose server is gone"
        );
        assert!(verdict(silence, Probe::Silent, true), "a queue that moves");
        assert!(verdict(silence, Probe::Up, false));
    }
}
