//! Reads from a streaming replica with a PgBouncer in transaction mode in front of each server
//! (`DB_POOLER=transaction`, `docs/scale-out.md`): the shared pair behind the run's two PgBouncers
//! ([`ReplicaPair::bouncers`]), each test with a database of its own. Outside a transaction the app
//! sends the replica `pg_last_wal_replay_lsn()` (the token's wait and the lag check, every second)
//! and the primary `pg_current_wal_insert_lsn()` after each committed write: one simple-protocol
//! message each, which PgBouncer runs on whichever server connection it picks.

use std::time::{Duration, Instant};

use crate::support::TestApp;
use crate::support::process::free_port;
use crate::support::replica::{ReplicaPair, text};

use super::{
    reads, ready, receipts_each_read_back_with_its_token, tokenless_reads_seen_by_the_replica,
};

/// Both pools of `app` reach their server through its PgBouncer, not around it.
fn assert_behind_both_bouncers(app: &TestApp) {
    let bouncers = ReplicaPair::bouncers();
    let database = app.database_name();
    assert!(
        bouncers.primary.clients_of(&database) > 0,
        "the app has no client connection to the primary's PgBouncer"
    );
    assert!(
        bouncers.replica.clients_of(&database) > 0,
        "the app has no client connection to the replica's PgBouncer"
    );
}

#[tokio::test]
async fn behind_pgbouncer_a_client_that_sends_its_token_back_never_reads_a_stale_stock() {
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .pooled()
        .spawn()
        .await;
    receipts_each_read_back_with_its_token(&app).await;
    assert_behind_both_bouncers(&app);
}

#[tokio::test]
async fn behind_pgbouncer_reads_without_a_token_are_served_by_the_replica() {
    let pair = ReplicaPair::shared();
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .pooled()
        .spawn()
        .await;
    let on_replica = tokenless_reads_seen_by_the_replica(pair, &app).await;
    // Its sessions: the app's server connections to this database come from PgBouncer.
    let sessions = text(
        &on_replica,
        &format!(
            "SELECT count(*)::text FROM pg_stat_activity WHERE datname = '{}' \
             AND application_name = 'inventory-api' AND pid <> pg_backend_pid()",
            app.database_name()
        ),
    )
    .await;
    assert_ne!(sessions, "0", "no app session on the replica");
    assert_behind_both_bouncers(&app);
}

#[tokio::test]
async fn behind_pgbouncer_reads_go_to_the_primary_while_the_replica_is_gone_and_come_back() {
    let app = TestApp::builder()
        .replica(ReplicaPair::shared())
        .pooled()
        .spawn()
        .await;
    let bouncer = &ReplicaPair::bouncers().replica;
    let database = app.database_name();
    let w = app.warehouse("D").await;
    // A read without a token may run on a replica that has not replayed the warehouse yet (a
    // 404, as documented); the reads below are about routing, so they start once it has.
    ReplicaPair::shared().wait_for_replay(&app).await;
    app.wait_until("a read runs on the replica", || async {
        assert_eq!(app.get(&format!("/warehouses/{w}")).await.status(), 200);
        reads(&app, "replica").await > 0.0
    })
    .await;
    app.wait_until("ready says the replica is up", || async {
        ready(&app).await["replica"]["status"] == "up"
    })
    .await;

    bouncer.forward(&database, Some(free_port()));
    let primary_before = reads(&app, "primary").await;
    for i in 0..10 {
        let started = Instant::now();
        let res = app.get(&format!("/warehouses/{w}")).await;
        let elapsed = started.elapsed();
        assert_eq!(res.status(), 200, "read {i} while the replica is gone");
        assert!(
            elapsed < Duration::from_secs(3),
            "read {i} took {elapsed:?} while the replica is gone"
        );
    }
    assert_eq!(reads(&app, "primary").await, primary_before + 10.0);
    let health = ready(&app).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["replica"]["status"], "down", "{health}");

    // Back: PgBouncer reconnects within its `server_login_retry`, and the app notices alone.
    bouncer.forward(&database, None);
    let replica_before = reads(&app, "replica").await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let res = app.get(&format!("/warehouses/{w}")).await;
        assert_eq!(res.status(), 200, "a read while the replica comes back");
        if reads(&app, "replica").await > replica_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads did not return to the replica:\n{}",
            bouncer.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.wait_until("ready says the replica is up again", || async {
        ready(&app).await["replica"]["status"] == "up"
    })
    .await;
}
