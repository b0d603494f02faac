//! Reads from a streaming replica with a PgBouncer in transaction mode in front of each server
//! (`DB_POOLER=transaction`, API.md §8): the shared pair behind the run's two PgBouncers
//! ([`ReplicaPair::bouncers`]), each test with a database of its own. Outside a transaction
//! the app sends the replica `pg_last_wal_replay_lsn()` (the token's wait and the lag check,
//! every second) and the primary `pg_current_wal_insert_lsn()` after each committed write: one
//! simple-protocol message each, which PgBouncer runs on whichever server connection it picks.

use std::time::{Duration, Instant};

use crate::helpers::TestApp;
use crate::process::free_port;
use crate::replica::{ReplicaPair, text};

use super::{TOKEN, reads, ready, receipt, token_of, total};

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
    let app = ReplicaPair::spawn_pooled_app(&[]).await;
    let w = app.warehouse("W").await;
    let p = app.product("RYW").await;
    for i in 1..=200 {
        let token = token_of(&receipt(&app, w, p).await);
        let read = app
            .client
            .get(app.url(&format!("/products/{p}/stock")))
            .header(TOKEN, token)
            .send()
            .await
            .expect("request sent");
        assert_eq!(
            total(read).await,
            i,
            "read {i} with its token saw a stale stock"
        );
    }
    let (replica, primary) = (reads(&app, "replica").await, reads(&app, "primary").await);
    assert_eq!(replica + primary, 200.0);
    assert!(replica > 0.0, "no read with a token ran on the replica");
    assert_behind_both_bouncers(&app);
}

#[tokio::test]
async fn behind_pgbouncer_reads_without_a_token_are_served_by_the_replica() {
    let pair = ReplicaPair::shared();
    let app = ReplicaPair::spawn_pooled_app(&[]).await;
    let p = app.product("R").await;
    pair.wait_for_replay(&app).await;
    // The replica's own statistics, read on a direct connection to it: index scans of
    // `product`, which only the app's `GET /products/{id}` makes there. Backends publish their
    // counts at most once a second, so keep reading until they show.
    let on_replica = pair.on_replica(&app).await;
    let scans = "SELECT COALESCE(idx_scan, 0)::text FROM pg_stat_user_tables \
                 WHERE relname = 'product'";
    let before: i64 = text(&on_replica, scans).await.parse().expect("a count");
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..10 {
            assert_eq!(app.get(&format!("/products/{p}")).await.status(), 200);
            sent += 1;
        }
        let now: i64 = text(&on_replica, scans).await.parse().expect("a count");
        if now - before >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica saw {} product lookups after {sent} reads",
            now - before
        );
    }
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
    assert_eq!(reads(&app, "replica").await, f64::from(sent as u32));
    assert_eq!(reads(&app, "primary").await, 0.0);
    assert_behind_both_bouncers(&app);
}

/// The replica's server gone behind its PgBouncer, which still logs clients in and holds
/// their queries (PgBouncer 1.18 waits `query_wait_timeout`, 120 s, retrying the server every
/// `server_login_retry`, 15 s): for this test's database only, the replica's PgBouncer is
/// pointed at a port where nothing listens, the way a stopped server looks to it.
#[tokio::test]
async fn behind_pgbouncer_reads_go_to_the_primary_while_the_replica_is_gone_and_come_back() {
    let app = ReplicaPair::spawn_pooled_app(&[]).await;
    let bouncer = &ReplicaPair::bouncers().replica;
    let database = app.database_name();
    let w = app.warehouse("D").await;
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
