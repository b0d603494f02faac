//! A real highly available PostgreSQL of the test run's own, from the distribution's packages
//! (Debian bookworm: Patroni 3.0, etcd 3.4, HAProxy 2.6; `scripts/test` installs them): one etcd
//! member, three Patroni nodes in `synchronous_mode`, each running a PostgreSQL of its own, and
//! HAProxy routing to the node whose Patroni answers `GET /primary` with 200, as
//! `docs/scale-out.md` ("High availability") describes. Everything runs on free ports in one
//! temporary directory, as the `postgres` user when the tests run as root (Patroni refuses to run
//! PostgreSQL as root), and is stopped by a watchdog when the test process exits. One cluster
//! serves every test of the run ([`Cluster::shared`]); the tests run one after another
//! (`--test-threads=1`), each leaving it with a leader and its members running.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::process::{free_port, give_to_postgres, is_root, on_exit_of_this_process};

/// Patroni's leader key lives this long without a renewal: how long a crashed leader keeps it.
/// `loop_wait + 2 * retry_timeout` must stay below it (Patroni's rule).
pub const TTL_SECONDS: u64 = 10;

/// How long etcd may take to answer after its start.
const START_WITHIN: Duration = Duration::from_secs(30);

pub struct Cluster {
    dir: PathBuf,
    pub nodes: Vec<Node>,
    /// HAProxy's port: the primary, whichever node it is.
    pub port: u16,
    etcd_port: u16,
    _etcd: Child,
}

/// One Patroni node and its PostgreSQL.
pub struct Node {
    pub name: String,
    /// Its PostgreSQL.
    pub pg_port: u16,
    /// Its Patroni REST API.
    pub api_port: u16,
    config: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    patroni: Mutex<Option<Child>>,
}

/// The owner of the cluster's files and processes: `postgres` when the tests run as root.
fn server_user() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id runs");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the postgres user exists (Debian's postgresql package makes it)")
    };
    Some((id("-u"), id("-g")))
}

/// `program` as the server's user, its output appended to `log`, in `dir`.
fn command(program: &str, dir: &Path, log: &Path) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = server_user() {
        command.uid(uid).gid(gid);
    }
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    command
        .current_dir(dir)
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    command
}

/// One HTTP/1.0 request to a local port (Patroni's REST API, etcd): the status and body, or
/// `None` when nothing answered in time.
pub fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, String)> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    // Patroni answers a switchover once it is done: seconds.
    let wait = if method == "GET" { 2 } else { 30 };
    stream
        .set_read_timeout(Some(Duration::from_secs(wait)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `check` every 50 ms until it gives a value; panics with `what` after `within`.
pub fn poll<T>(what: &str, within: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll_explained(what, within, String::new, check)
}

/// Like [`poll`], the panic message followed by `explain()` (the cluster's state, its logs).
pub fn poll_explained<T>(
    what: &str,
    within: Duration,
    explain: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}\n{}",
            explain()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// The run's cluster, its processes started on first use; [`wait_healthy`](Self::wait_healthy)
    /// waits until it is whole (about 10 s after the start on an idle machine). A cluster that
    /// was slow to become whole is still the run's: a later test waits for it again instead of
    /// starting another.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("inventory-ha-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let etcd_port = free_port();
        let etcd_peer_port = free_port();
        let port = free_port();
        let nodes: Vec<Node> = (0..3)
            .map(|i| {
                let name = format!("node{i}");
                Node {
                    config: dir.join(format!("{name}.yml")),
                    data: dir.join(format!("{name}-data")),
                    name,
                    pg_port: free_port(),
                    api_port: free_port(),
                    dir: dir.clone(),
                    patroni: Mutex::new(None),
                }
            })
            .collect();
        for node in &nodes {
            node.write_config(etcd_port);
        }
        write_haproxy_config(&dir, port, &nodes);
        give_to_postgres(&dir);
        // Whatever happens next, the watchdog stops it all when the test process exits: each
        // Patroni first (so that none restarts its PostgreSQL), then the servers, etcd, HAProxy.
        let d = dir.display();
        let pg_ctl = tests::postgres_bin().join("pg_ctl");
        let as_owner = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let mut cleanup = String::new();
        for node in &nodes {
            cleanup.push_str(&format!(
                "kill -9 \"$(cat {d}/{}.pid)\" 2>/dev/null; ",
                node.name
            ));
        }
        for node in &nodes {
            cleanup.push_str(&format!(
                "{as_owner}{} -D {} -m immediate stop >/dev/null 2>&1; ",
                pg_ctl.display(),
                node.data.display()
            ));
        }
        cleanup.push_str(&format!(
            "kill \"$(cat {d}/etcd.pid)\" \"$(cat {d}/haproxy.pid)\" 2>/dev/null; sleep 1; rm -rf {d}"
        ));
        on_exit_of_this_process(&cleanup);

        let etcd = command("etcd", &dir, &dir.join("etcd.log"))
            .args(["--name", "etcd0", "--data-dir"])
            .arg(dir.join("etcd-data"))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{etcd_port}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{etcd_port}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{etcd_peer_port}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{etcd_peer_port}"))
            .arg("--initial-cluster")
            .arg(format!("etcd0=http://127.0.0.1:{etcd_peer_port}"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("etcd runs ({e}); scripts/test installs Debian's etcd-server package")
            });
        std::fs::write(dir.join("etcd.pid"), etcd.id().to_string()).expect("etcd.pid");
        let cluster = Cluster {
            dir,
            nodes,
            port,
            etcd_port,
            _etcd: etcd,
        };
        poll("etcd to answer /health", START_WITHIN, || {
            http(cluster.etcd_port, "GET", "/health", None).filter(|(status, _)| *status == 200)
        });
        for node in &cluster.nodes {
            node.start_patroni();
        }
        let output = Command::new("haproxy")
            .arg("-f")
            .arg(cluster.dir.join("haproxy.cfg"))
            .arg("-D")
            .arg("-p")
            .arg(cluster.dir.join("haproxy.pid"))
            .output()
            .unwrap_or_else(|e| {
                panic!("haproxy runs ({e}); scripts/test installs Debian's haproxy package")
            });
        assert!(
            output.status.success(),
            "haproxy failed to start:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        cluster
    }

    /// The URL of `database` through HAProxy: the primary, whichever node it is.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Patroni's view of the cluster (`GET /cluster` on any node that answers).
    pub fn members(&self) -> Option<Vec<Value>> {
        self.nodes.iter().find_map(|node| {
            let (status, body) = http(node.api_port, "GET", "/cluster", None)?;
            let cluster: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
            cluster["members"].as_array().cloned()
        })
    }

    /// The node whose Patroni answers `GET /primary` with 200, if one does.
    pub fn leader(&self) -> Option<&Node> {
        self.nodes.iter().find(|node| node.is_primary())
    }

    /// The member Patroni names the synchronous standby, if there is one.
    pub fn sync_standby(&self) -> Option<&Node> {
        let members = self.members()?;
        let name = members
            .iter()
            .find(|m| m["role"] == "sync_standby" && m["state"] == "running")?["name"]
            .as_str()?
            .to_owned();
        self.nodes.iter().find(|node| node.name == name)
    }

    /// Waits until the cluster is whole: a leader, every node's Patroni running and its
    /// PostgreSQL streaming from the leader, a synchronous standby, and the leader answering
    /// writes through HAProxy.
    pub fn wait_healthy(&self, within: Duration) {
        poll_explained(
            "a leader, a synchronous standby, every member running and streaming",
            within,
            || self.describe(),
            || {
                let members = self.members()?;
                let leader = members.iter().find(|m| m["role"] == "leader")?;
                let timeline = leader["timeline"].as_u64()?;
                let whole = members.len() == self.nodes.len()
                    && members.iter().all(|m| {
                        m["state"] == "running"
                            && (m["role"] == "leader" || m["timeline"].as_u64() == Some(timeline))
                    })
                    && members.iter().any(|m| m["role"] == "sync_standby");
                let leader = self.node(leader["name"].as_str()?);
                // Every standby streams from the leader (Patroni 3.0's /cluster does not say).
                let streaming = psql(
                    leader.pg_port,
                    "postgres",
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )?;
                let streaming = streaming == (self.nodes.len() - 1).to_string();
                (whole && streaming).then_some(())
            },
        );
        poll_explained(
            "a write through HAProxy",
            within,
            || self.describe(),
            || {
                self.psql_through_haproxy(
                "CREATE TABLE IF NOT EXISTS ha_probe (at timestamptz); INSERT INTO ha_probe VALUES (now())",
            )
            },
        );
    }

    /// Runs `sql` through HAProxy with psql (one connection, a second to connect); `None`
    /// when it failed.
    pub fn psql_through_haproxy(&self, sql: &str) -> Option<String> {
        psql(self.port, "postgres", sql)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node of the cluster")
    }

    /// The cluster's state as Patroni sees it and the end of each node's log, for failure
    /// messages.
    pub fn describe(&self) -> String {
        let mut text = format!("members: {:#?}\n", self.members());
        for node in &self.nodes {
            let log = std::fs::read_to_string(self.dir.join(format!("{}.log", node.name)))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            text.push_str(&format!("--- {} (the end of its log)\n{tail}\n", node.name));
        }
        text
    }
}

/// Runs `sql` on `port`'s `database` with psql; its output, or `None` when it failed.
pub fn psql(port: u16, database: &str, sql: &str) -> Option<String> {
    let output = Command::new("psql")
        .env("PGCONNECT_TIMEOUT", "1")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", database, "-Atq", "-c", sql])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

impl Node {
    fn write_config(&self, etcd_port: u16) {
        let dir = self.dir.display();
        let yaml = format!(
            "scope: inventory\n\
             name: {name}\n\
             restapi:\n  listen: 127.0.0.1:{api}\n  connect_address: 127.0.0.1:{api}\n\
             etcd3:\n  hosts: 127.0.0.1:{etcd_port}\n\
             bootstrap:\n\
             \x20 dcs:\n\
             \x20   ttl: {TTL_SECONDS}\n\
             \x20   loop_wait: 1\n\
             \x20   retry_timeout: 3\n\
             \x20   synchronous_mode: true\n\
             \x20   postgresql:\n\
             \x20     use_pg_rewind: true\n\
             \x20     parameters:\n\
             \x20       wal_log_hints: 'on'\n\
             \x20       max_connections: 60\n\
             \x20       fsync: 'off'\n\
             \x20 initdb:\n  - encoding: UTF8\n  - auth: trust\n\
             postgresql:\n\
             \x20 listen: 127.0.0.1:{pg}\n\
             \x20 connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n\
             \x20 bin_dir: {bin}\n\
             \x20 pgpass: {dir}/{name}.pgpass\n\
             \x20 authentication:\n\
             \x20   superuser:\n      username: postgres\n\
             \x20   replication:\n      username: postgres\n\
             \x20   rewind:\n      username: postgres\n\
             \x20 parameters:\n    unix_socket_directories: '{dir}'\n\
             \x20 pg_hba:\n\
             \x20 - local all all trust\n\
             \x20 - host all all 127.0.0.1/32 trust\n\
             \x20 - host replication all 127.0.0.1/32 trust\n",
            name = self.name,
            api = self.api_port,
            pg = self.pg_port,
            data = self.data.display(),
            bin = tests::postgres_bin().display(),
        );
        std::fs::write(&self.config, yaml).expect("patroni config");
    }

    /// Starts this node's Patroni (which starts its PostgreSQL: a new leader, a replica, or a
    /// former leader that rejoins with `pg_rewind`).
    pub fn start_patroni(&self) {
        let log = self.dir.join(format!("{}.log", self.name));
        let child = command("patroni", &self.dir, &log)
            .arg(&self.config)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("patroni runs ({e}); scripts/test installs Debian's patroni package")
            });
        std::fs::write(
            self.dir.join(format!("{}.pid", self.name)),
            child.id().to_string(),
        )
        .expect("pid file");
        *self.patroni.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
    }

    /// Whether Patroni runs here (started and not killed).
    pub fn is_running(&self) -> bool {
        self.patroni
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// A host crash: SIGKILL of Patroni, of its PostgreSQL and of every PostgreSQL process, at
    /// once. Nothing is shut down: no session gets an error, the sockets just stop.
    pub fn crash(&self) {
        let mut patroni = self.patroni.lock().unwrap_or_else(|p| p.into_inner());
        let mut pids: Vec<String> = Vec::new();
        if let Some(child) = patroni.as_ref() {
            pids.push(child.id().to_string());
        }
        let postmaster = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned));
        if let Some(postmaster) = postmaster {
            let children = Command::new("pgrep")
                .args(["-P", &postmaster])
                .output()
                .expect("pgrep runs");
            pids.extend(
                String::from_utf8_lossy(&children.stdout)
                    .split_whitespace()
                    .map(str::to_owned),
            );
            pids.push(postmaster);
        }
        // A backend may have ended since pgrep listed it: kill says so, and that is fine.
        let _ = Command::new("kill")
            .arg("-9")
            .args(&pids)
            .stderr(Stdio::null())
            .status()
            .expect("kill runs");
        if let Some(mut child) = patroni.take() {
            let _ = child.wait();
        }
        poll(
            "every killed process to be gone",
            Duration::from_secs(10),
            || (!pids.iter().any(|pid| alive(pid))).then_some(()),
        );
    }

    /// Whether this node's Patroni answers `GET /primary` with 200 (HAProxy's check).
    pub fn is_primary(&self) -> bool {
        matches!(http(self.api_port, "GET", "/primary", None), Some((200, _)))
    }

    /// Whether this node's Patroni answers `GET /replica` with 200 (a running standby).
    pub fn is_replica(&self) -> bool {
        matches!(http(self.api_port, "GET", "/replica", None), Some((200, _)))
    }

    /// The URL of `database` on this node's PostgreSQL, directly.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.pg_port)
    }
}

/// Whether process `pid` exists and is not a zombie (`/proc/<pid>/stat`).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn write_haproxy_config(dir: &Path, port: u16, nodes: &[Node]) {
    let mut servers = String::new();
    for node in nodes {
        servers.push_str(&format!(
            "    server {} 127.0.0.1:{} check port {}\n",
            node.name, node.pg_port, node.api_port
        ));
    }
    // The lines of docs/scale-out.md ("High availability"), with this run's ports.
    let config = format!(
        "global\n\
         \x20   maxconn 1000\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 1s\n\
         \x20   timeout client 30m\n\
         \x20   timeout server 30m\n\
         \x20   timeout check 1s\n\
         listen primary\n\
         \x20   bind 127.0.0.1:{port}\n\
         \x20   option httpchk GET /primary\n\
         \x20   http-check expect status 200\n\
         \x20   default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 1 on-marked-down shutdown-sessions\n\
         {servers}"
    );
    std::fs::write(dir.join("haproxy.cfg"), config).expect("haproxy.cfg");
}
