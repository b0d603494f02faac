//! A real highly available PostgreSQL (`cluster`: etcd, three Patroni nodes in
//! `synchronous_mode`, HAProxy on Patroni's `/primary`) under the real app, with 8 clients
//! POSTing receipts with an `Idempotency-Key` through HAProxy while the primary changes: a
//! switchover, a crash of the leader's host, the old leader rejoining as a replica. Nothing
//! acknowledged may be missing on the new primary, the ledger balances, and no answer carries
//! 25006 (read-only). One cluster serves the three, in order; a loaded machine makes Patroni miss
//! its ttl, so this target is not run alongside the rest of the suite: `./scripts/test failover`
//! (`cargo test -p tests --test failover -- --test-threads=1`), which `./scripts/test` runs
//! after the main suite. `--nocapture` prints the figures `docs/scale-out.md` quotes.

mod cluster;
#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../api/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::{Cluster, Node, TTL_SECONDS, http, poll};
use crate::support::{Server, TestApp, TestDatabase, connect_to};

/// How long the cluster may take to become whole: `initdb` and two `pg_basebackup`s at the
/// start of the run, a node's restart later (seconds on an idle machine, more on a loaded one).
const WHOLE_WITHIN: Duration = Duration::from_secs(120);

/// Concurrent clients.
const CLIENTS: usize = 8;
/// Acknowledged receipts before the event, and again after it (the service writes again).
const WRITES_AROUND: usize = 40;

/// One answer a client got.
#[derive(Debug)]
struct Answer {
    key: String,
    status: u16,
    body: String,
    /// When the answer came, since the load began.
    at: Duration,
}

/// What the test measured, printed with `--nocapture` (through `Debug`, which the dead-code
/// lint does not count as a read).
#[allow(dead_code)]
#[derive(Debug)]
struct Figures {
    scenario: &'static str,
    answers: usize,
    acknowledged: usize,
    /// The longest time between two acknowledged writes (answered 2xx) while the event ran.
    longest_gap: Duration,
    /// When the event began and ended (a writable primary again), since the load began.
    event: (Duration, Duration),
    unavailable_503: usize,
    commit_outcome_unknown: usize,
    other_5xx: usize,
    reruns_primary_lost: f64,
}

/// The cluster, whole again (every node's Patroni running, a synchronous standby), off the
/// async runtime.
async fn whole_cluster() -> &'static Cluster {
    tokio::task::spawn_blocking(|| {
        let cluster = Cluster::shared();
        for node in cluster.nodes.iter().filter(|n| !n.is_running()) {
            node.start_patroni();
        }
        cluster.wait_healthy(WHOLE_WITHIN);
        cluster
    })
    .await
    .expect("the cluster starts")
}

/// The app over a fresh database on the cluster, through HAProxy.
async fn app_on(cluster: &Cluster) -> TestApp {
    let database = TestDatabase::create_at(Server::Postgres, &cluster.url("postgres")).await;
    TestApp::builder()
        .database(database)
        .env(&[
            ("DB_APPLICATION_NAME", "failover"),
            ("DB_POOL_SIZE", "4"),
            ("DB_MAX_OVERFLOW", "8"),
        ])
        .spawn()
        .await
}

async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app
        .get("/metrics")
        .await
        .text()
        .await
        .expect("a metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

const RERUNS: &str = "db_requests_rerun_total{reason=\"primary_lost\"}";

/// 8 clients POST receipts of 1 with a key each until `stop`; a 5xx is retried with the same
/// key (the safe retry, `docs/api.md`), anything else moves on to a new key.
async fn load(
    app: &TestApp,
    warehouse: i64,
    product: i64,
    stop: &AtomicBool,
    acknowledged: &AtomicUsize,
) -> Vec<Answer> {
    let started = Instant::now();
    let clients = (0..CLIENTS).map(|client| async move {
        let mut answers = Vec::new();
        let body = json!({"warehouse_id": warehouse, "product_id": product, "quantity": 1});
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let key = format!("{}-c{client}-{n}", fastrand::u64(..));
            loop {
                let sent = app
                    .client
                    .post(app.url("/receipts"))
                    .header("Idempotency-Key", &key)
                    .json(&body)
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await;
                let (status, text) = match sent {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        (status, res.text().await.unwrap_or_default())
                    }
                    Err(e) => (0, e.to_string()),
                };
                answers.push(Answer {
                    key: key.clone(),
                    status,
                    body: text,
                    at: started.elapsed(),
                });
                if (200..300).contains(&status) {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                if (200..500).contains(&status) || stop.load(Ordering::SeqCst) {
                    break;
                }
                // A client's pause before it retries the same key.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        answers
    });
    futures_util::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Runs the load around `event` (run off the runtime once `WRITES_AROUND` writes were
/// acknowledged; it returns once the cluster has a writable primary again), until
/// `WRITES_AROUND` more were acknowledged after it; checks what every scenario must hold and
/// returns the answers and figures.
async fn around(
    scenario: &'static str,
    cluster: &'static Cluster,
    event: impl FnOnce(&'static Cluster) + Send + 'static,
) -> (Vec<Answer>, Figures) {
    let app = app_on(cluster).await;
    let warehouse = app.warehouse("HA").await;
    let product = app.product("HA-1").await;
    let reruns_before = metric(&app, RERUNS).await;
    let stop = AtomicBool::new(false);
    let acknowledged = AtomicUsize::new(0);
    let mut event_window = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    let driver = async {
        let wait_for = |count: usize, what: &'static str| {
            let acknowledged = &acknowledged;
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while acknowledged.load(Ordering::SeqCst) < count {
                    assert!(Instant::now() < deadline, "timed out waiting for {what}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        wait_for(WRITES_AROUND, "writes acknowledged before the event").await;
        let from = started.elapsed();
        tokio::task::spawn_blocking(move || event(cluster))
            .await
            .expect("the event runs");
        let to = started.elapsed();
        event_window = (from, to);
        let after = acknowledged.load(Ordering::SeqCst) + WRITES_AROUND;
        wait_for(after, "writes acknowledged after the event").await;
        stop.store(true, Ordering::SeqCst);
    };
    let (answers, ()) = tokio::join!(load(&app, warehouse, product, &stop, &acknowledged), driver);
    let reruns = metric(&app, RERUNS).await - reruns_before;

    // Acknowledged writes, by key: the movement each answer named (a replay names the first).
    let mut acked: BTreeMap<&str, i64> = BTreeMap::new();
    for answer in answers.iter().filter(|a| (200..300).contains(&a.status)) {
        let movement: Value = serde_json::from_str(&answer.body).expect("a movement");
        acked.insert(&answer.key, movement["id"].as_i64().expect("its id"));
    }
    // An error's body (a 2xx is the movement, whose timestamps may contain any digits).
    for answer in answers.iter().filter(|a| !(200..300).contains(&a.status)) {
        let lower = answer.body.to_lowercase();
        assert!(
            !lower.contains("25006")
                && !lower.contains("read-only")
                && !lower.contains("read only"),
            "{scenario}: an answer names a read-only server: {answer:?}"
        );
        assert_ne!(answer.status, 0, "{scenario}: the service did not answer");
    }

    // On the new primary itself, not through HAProxy.
    let leader = tokio::task::spawn_blocking(move || {
        poll("a leader", Duration::from_secs(30), || cluster.leader())
    })
    .await
    .expect("a leader");
    let db = connect_to(&leader.url(&app.database_name())).await;
    let observer = TestApp::observer(db);
    let ids: BTreeSet<i64> = acked.values().copied().collect();
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let found = observer
        .scalar(&format!(
            "SELECT count(*) FROM movement WHERE kind = 'receipt' AND id IN ({list})"
        ))
        .await;
    assert_eq!(
        found as usize,
        ids.len(),
        "{scenario}: acknowledged receipts missing on the new primary {}",
        leader.name
    );
    let keys = acked
        .keys()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(",");
    let stored = observer
        .scalar(&format!(
            "SELECT count(*) FROM idempotency_key WHERE request_key IN ({keys})"
        ))
        .await;
    assert_eq!(
        stored as usize,
        acked.len(),
        "{scenario}: acknowledged keys missing on the new primary"
    );
    observer.assert_invariant().await;
    let receipts = observer
        .scalar("SELECT count(*) FROM movement WHERE kind = 'receipt'")
        .await;
    assert_eq!(
        observer.stock(warehouse, product).await,
        receipts,
        "{scenario}: the stock is the receipts of 1"
    );
    assert!(
        receipts as usize >= ids.len(),
        "{scenario}: every acknowledged receipt is a row"
    );

    // The longest time without an acknowledged write, from the last one before the event.
    let (from, to) = event_window;
    let mut times: Vec<Duration> = answers
        .iter()
        .filter(|a| (200..300).contains(&a.status))
        .map(|a| a.at)
        .collect();
    times.sort();
    let longest_gap = times
        .windows(2)
        .filter(|w| w[1] >= from)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let is_5xx = |a: &&Answer| a.status >= 500;
    let figures = Figures {
        scenario,
        answers: answers.len(),
        acknowledged: acked.len(),
        longest_gap,
        event: (from, to),
        unavailable_503: answers.iter().filter(|a| a.status == 503).count(),
        commit_outcome_unknown: answers
            .iter()
            .filter(|a| a.status == 500 && a.body.contains("commit_outcome_unknown"))
            .count(),
        other_5xx: answers
            .iter()
            .filter(is_5xx)
            .filter(|a| a.status != 503 && !a.body.contains("commit_outcome_unknown"))
            .count(),
        reruns_primary_lost: reruns,
    };
    println!("{figures:#?}");
    for answer in answers.iter().filter(is_5xx).take(10) {
        println!("  {} at {:?}: {}", answer.status, answer.at, answer.body);
    }
    (answers, figures)
}

/// Waits until a node other than `old` is Patroni's primary and takes writes through HAProxy.
fn wait_for_new_primary(cluster: &Cluster, old: &str, within: Duration) -> String {
    let name = poll("a new primary", within, || {
        cluster
            .leader()
            .filter(|n| n.name != old)
            .map(|n| n.name.clone())
    });
    poll("a write through HAProxy", within, || {
        cluster.psql_through_haproxy("INSERT INTO ha_probe VALUES (now())")
    });
    name
}

fn leader(cluster: &Cluster) -> &Node {
    poll("a leader", Duration::from_secs(30), || cluster.leader())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_loses_nothing_and_answers_no_5xx() {
    let cluster = whole_cluster().await;
    let (_, figures) = around("switchover", cluster, |cluster| {
        let old = leader(cluster);
        let candidate = poll("a synchronous standby", Duration::from_secs(30), || {
            cluster.sync_standby()
        });
        let answer = http(
            old.api_port,
            "POST",
            "/switchover",
            Some(&json!({"leader": old.name, "candidate": candidate.name})),
        );
        assert!(
            matches!(answer, Some((200, _))),
            "Patroni refused the switchover: {answer:?}\n{}",
            cluster.describe()
        );
        let new = wait_for_new_primary(cluster, &old.name, Duration::from_secs(30));
        assert_eq!(new, candidate.name);
    })
    .await;
    assert_eq!(
        figures.unavailable_503 + figures.commit_outcome_unknown + figures.other_5xx,
        0,
        "a switchover is re-run on the new primary, never answered 5xx: {figures:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b_a_crash_of_the_leaders_host_loses_nothing_and_answers_only_503_or_unknown() {
    let cluster = whole_cluster().await;
    let (_, figures) = around("leader host crash", cluster, |cluster| {
        let old = leader(cluster);
        old.crash();
        // Patroni waits for the leader key to expire (its ttl) before a standby takes over.
        wait_for_new_primary(
            cluster,
            &old.name,
            Duration::from_secs(TTL_SECONDS * 3 + 30),
        );
    })
    .await;
    assert_eq!(
        figures.other_5xx, 0,
        "only 503 or 500 commit_outcome_unknown: {figures:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c_the_old_leader_rejoins_as_a_replica_while_clients_write() {
    let cluster = tokio::task::spawn_blocking(|| {
        let cluster = Cluster::shared();
        if cluster.nodes.iter().all(Node::is_running) {
            // Run on its own: the crash of scenario (b) first, without load.
            cluster.wait_healthy(WHOLE_WITHIN);
            let old = leader(cluster);
            old.crash();
            wait_for_new_primary(
                cluster,
                &old.name,
                Duration::from_secs(TTL_SECONDS * 3 + 30),
            );
        }
        cluster
    })
    .await
    .expect("a cluster with a crashed node");
    let (_, figures) = around("old leader rejoins", cluster, |cluster| {
        let old = cluster
            .nodes
            .iter()
            .find(|n| !n.is_running())
            .expect("the crashed node");
        old.start_patroni();
        poll(
            "the old leader to stream as a replica",
            Duration::from_secs(60),
            || old.is_replica().then_some(()),
        );
        cluster.wait_healthy(WHOLE_WITHIN);
        assert!(!old.is_primary(), "the old leader came back as a replica");
    })
    .await;
    assert_eq!(
        figures.unavailable_503 + figures.commit_outcome_unknown + figures.other_5xx,
        0,
        "a replica joining changes nothing for the clients: {figures:#?}"
    );
}
