//! A real PostgreSQL primary and streaming replica for the tests of `DATABASE_REPLICA_URL`
//! (`docs/scale-out.md`): `initdb` (whose defaults already allow streaming: `wal_level = replica`,
//! WAL senders, `replication` lines for loopback in `pg_hba.conf`), `pg_basebackup -R -X stream`, a
//! second `pg_ctl start`, on free ports, as the `postgres` user (see [`OwnServer`]). One pair
//! serves every test of a run that only reads and writes ([`ReplicaPair::shared`]; each test has
//! its own database, created on the primary and replayed on the replica) and is stopped by a
//! watchdog when the test process exits; a test that stops or pauses the replica starts a pair of
//! its own ([`ReplicaPair::start`]), dropped with it. [`ReplicaPair::bouncers`] puts a PgBouncer in
//! transaction mode in front of each server of the shared pair, once per run. A test starts the
//! app over a pair with `TestApp::builder().replica(pair)` (and `.pooled()`: through the
//! bouncers).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::support::pgbouncer::PgBouncer;
use crate::support::process::OwnServer;
use crate::support::{TestApp, connect_to};

pub struct ReplicaPair {
    pub primary: OwnServer,
    pub replica: OwnServer,
}

/// A PgBouncer (`pool_mode = transaction`, see [`crate::support::pgbouncer`]) in front of each server of
/// the shared pair.
pub struct Bouncers {
    pub primary: PgBouncer,
    pub replica: PgBouncer,
}

impl ReplicaPair {
    /// A pair of the test's own (about 10 s), stopped and deleted when dropped.
    pub fn start() -> ReplicaPair {
        let primary = OwnServer::start();
        let replica = OwnServer::replica_of(&primary);
        ReplicaPair { primary, replica }
    }

    /// The run's shared pair, started on first use. Never stop or pause it.
    pub fn shared() -> &'static ReplicaPair {
        static SHARED: OnceLock<ReplicaPair> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pair = ReplicaPair::start();
            pair.primary.stop_when_this_process_exits();
            pair.replica.stop_when_this_process_exits();
            pair
        })
    }

    /// The run's PgBouncers in front of the shared pair, started on first use (with the pair).
    pub fn bouncers() -> &'static Bouncers {
        static SHARED: OnceLock<Bouncers> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pair = ReplicaPair::shared();
            Bouncers {
                primary: PgBouncer::in_front_of("127.0.0.1", pair.primary.port),
                replica: PgBouncer::in_front_of("127.0.0.1", pair.replica.port),
            }
        })
    }

    /// A connection to `app`'s database on the replica, for assertions behind the app's back.
    pub async fn on_replica(&self, app: &TestApp) -> DatabaseConnection {
        connect_to(&self.replica.url(&app.database_name())).await
    }

    /// Waits until the replica has replayed everything the primary has written so far.
    pub async fn wait_for_replay(&self, app: &TestApp) {
        self.wait_for_replay_of(&app.database_name()).await;
    }

    /// Waits (up to 30 s) until the replica has replayed everything the primary has written so
    /// far, and answers on `database`: a database created a moment ago on the primary may not
    /// exist on the replica yet, the more so while other tests create theirs (replaying a
    /// `CREATE DATABASE` copies the template: seconds on a loaded machine).
    pub async fn wait_for_replay_of(&self, database: &str) {
        let primary = connect_to(&self.primary.url("postgres")).await;
        let target = text(&primary, "SELECT pg_current_wal_insert_lsn()::text").await;
        let _ = primary.close().await;
        let admin = connect_to(&self.replica.url("postgres")).await;
        let sql = format!("SELECT (pg_last_wal_replay_lsn() >= '{target}')::text");
        let deadline = Instant::now() + Duration::from_secs(30);
        while text(&admin, &sql).await != "true" {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the replica to replay the primary's WAL"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = admin.close().await;
        // The database itself answers on the replica.
        let replica = connect_to(&self.replica.url(database)).await;
        let _ = replica.close().await;
    }
}

impl ReplicaPair {
    /// The replica stops streaming from the primary (its `primary_conninfo` emptied and
    /// reloaded): what the primary commits from now on never reaches it, as when a primary
    /// crashes before its WAL was sent. Waits until the WAL receiver is gone.
    pub async fn stop_streaming(&self) {
        let admin = connect_to(&self.replica.url("postgres")).await;
        for sql in [
            "ALTER SYSTEM SET primary_conninfo = ''",
            "SELECT pg_reload_conf()",
        ] {
            admin
                .execute_unprepared(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while text(&admin, "SELECT count(*)::text FROM pg_stat_wal_receiver").await != "0" {
            assert!(Instant::now() < deadline, "the WAL receiver did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = admin.close().await;
    }

    /// Promotes the replica (`pg_promote`, waiting until it takes writes, on a new timeline).
    pub async fn promote(&self) {
        let admin = connect_to(&self.replica.url("postgres")).await;
        let promoted = text(&admin, "SELECT pg_promote(true, 60)::text").await;
        assert_eq!(promoted, "true", "the replica was promoted");
        let _ = admin.close().await;
    }
}

/// One text value from `db`.
pub async fn text(db: &DatabaseConnection, sql: &str) -> String {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("one row");
    row.try_get_by_index::<String>(0).expect("text")
}

/// How long a test allows beyond a configured wait for the HTTP round trip and scheduling.
pub const MARGIN: Duration = Duration::from_millis(700);
