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
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set by [`Availability::answering`]: the probe's budget for connecting and `SELECT 1`.
    answer_within: Option<Duration>,
    /// `true` while the database is known to be unreachable.
    down: watch::Sender<bool>,
    probing: AtomicBool,
    last_probe: Mutex<Option<Instant>>,
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
        Availability::build(db, connect_timeout, None)
    }

    /// Like [`new`](Self::new), but the probe connects and runs `SELECT 1`, and counts the
    /// database as down unless both are done within `answer_within`.
    pub fn answering(
        db: &DatabaseConnection,
        connect_timeout: Duration,
        answer_within: Duration,
    ) -> Availability {
        Availability::build(db, connect_timeout, Some(answer_within))
    }

    fn build(
        db: &DatabaseConnection,
        connect_timeout: Duration,
        answer_within: Option<Duration>,
    ) -> Availability {
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
            answer_within,
            down: watch::Sender::new(false),
            probing: AtomicBool::new(false),
            last_probe: Mutex::new(None),
        }))
    }

    /// Whether the last probe found the database unreachable.
    pub fn is_down(&self) -> bool {
        *self.0.down.borrow()
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
        if result.is_ok() && self.is_down() {
            self.clear();
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
            let reachable = probe(target, self.0.connect_timeout, self.0.answer_within).await;
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

/// Opens one connection outside the pool. Only a server that refuses the connection, cannot be
/// routed to, or is not accepting sessions (shutting down, starting up, crashed) counts as
/// down. Anything else is a server that is there: a probe slower than `within` (an overloaded
/// server), a refusal such as too many connections or a bad password, a TLS or local error.
/// Declaring such a server down would fail every checkout at once although the pool may hold
/// healthy connections; the pool reports those problems itself.
///
/// With `answer_within` ([`Availability::answering`]) the probe also runs `SELECT 1`, and
/// connecting and the answer must both fit in `answer_within`, else the server counts as down.
async fn probe(target: &Target, within: Duration, answer_within: Option<Duration>) -> bool {
    let query = answer_within.is_some();
    let budget = answer_within.unwrap_or(within);
    let connected: Result<Result<(), sqlx::Error>, tokio::time::error::Elapsed> = match target {
        #[cfg(feature = "postgres")]
        Target::Postgres(options) => {
            tokio::time::timeout(budget, async {
                let mut conn: PgConnection = options.connect().await?;
                if query {
                    sqlx::raw_sql("SELECT 1").execute(&mut conn).await?;
                }
                let _ = conn.close().await;
                Ok::<(), sqlx::Error>(())
            })
            .await
        }
        #[cfg(feature = "mysql")]
        Target::Mysql(options) => {
            tokio::time::timeout(budget, async {
                let mut conn: MySqlConnection = options.connect().await?;
                if query {
                    sqlx::raw_sql("SELECT 1").execute(&mut conn).await?;
                }
                let _ = conn.close().await;
                Ok::<(), sqlx::Error>(())
            })
            .await
        }
        // No target is ever made without a server backend (SQLite is probed by its pool).
        #[cfg(not(any(feature = "postgres", feature = "mysql")))]
        _ => return true,
    };
    match connected {
        Ok(Ok(())) => true,
        // The server answered: only "shutting down / starting up" (57P…, MariaDB 1053 with
        // 08S01) and connection exceptions (08…) mean it is not there.
        Ok(Err(sqlx::Error::Database(e))) => {
            let code = e.code().unwrap_or_default();
            !(code.starts_with("57P") || code.starts_with("08"))
        }
        Ok(Err(sqlx::Error::Io(e))) => !matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable
                | std::io::ErrorKind::AddrNotAvailable
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
        ),
        Ok(Err(_)) => true,
        Err(_) if query => {
            // Once per probe while it lasts: the change to "down" is logged by the caller.
            tracing::debug!(
                within_ms = budget.as_millis() as u64,
                "the availability probe got no answer to SELECT 1 in time; counting the server as down"
            );
            false
        }
        Err(_) => {
            tracing::warn!(
                within_ms = within.as_millis() as u64,
                "the availability probe got no session in time; not counting the database as down"
            );
            true
        }
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
        assert!(
            !probe(
                &Target::Postgres(options(port)),
                Duration::from_secs(2),
                None
            )
            .await
        );
    }

    #[tokio::test]
    async fn a_server_slower_than_the_probe_does_not_count_as_down() {
        // Accepts the TCP connection and never answers the startup message, like an
        // overloaded server.
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("address").port();
        assert!(
            probe(
                &Target::Postgres(options(port)),
                Duration::from_millis(200),
                None
            )
            .await
        );
        drop(listener);
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_in_time_counts_as_down_for_an_answering_probe() {
        // The same silent server, as a pooler holding the login of a client whose server is
        // gone looks: for the replica's probe it is down.
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("address").port();
        let started = Instant::now();
        let answering = Some(Duration::from_millis(200));
        assert!(
            !probe(
                &Target::Postgres(options(port)),
                Duration::from_secs(10),
                answering
            )
            .await
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the budget bounds the probe"
        );
        drop(listener);
    }
}
