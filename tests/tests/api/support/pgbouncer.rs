//! A real PgBouncer of the test run's own, in front of the test PostgreSQL ([`shared`]) or of
//! a server of the tests' own ([`PgBouncer::in_front_of`], e.g. each server of the replica
//! pair): Debian's package (1.18, installed by `scripts/test`) with its default settings except
//! what a transaction-mode deployment sets (`pool_mode = transaction`, a small
//! `default_pool_size`, trust auth on loopback) and, on purpose, no
//! `ignore_startup_parameters`. One instance per server serves every test of a run (each test
//! keeps its own database, reached through the `*` fallback entry); it is started on first use
//! on a free port, as the `postgres` user (PgBouncer refuses to run as root), and stopped by a
//! small watchdog when the test process exits.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sea_orm::sqlx::postgres::PgConnectOptions;

use crate::support::admin_url;
use crate::support::process::{free_port, is_root, on_exit_of_this_process};

/// Server connections PgBouncer opens per database: fewer than a test app's pool (2 + 8).
pub const SERVER_POOL_SIZE: u32 = 3;

pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    /// The server every database is forwarded to (the `*` entry).
    upstream: (String, u16),
    /// Databases forwarded elsewhere (`name = host=… port=…` entries before `*`).
    entries: Mutex<Vec<(String, u16)>>,
}

/// The run's PgBouncer in front of the test PostgreSQL, started on first use.
pub fn shared() -> &'static PgBouncer {
    static SHARED: OnceLock<PgBouncer> = OnceLock::new();
    SHARED.get_or_init(|| {
        let upstream = PgConnectOptions::from_str(&admin_url()).expect("TEST_DATABASE_URL parses");
        PgBouncer::in_front_of(upstream.get_host(), upstream.get_port())
    })
}

fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        "/usr/sbin/pgbouncer"
    } else {
        "pgbouncer"
    }
}

impl PgBouncer {
    /// A PgBouncer of this test process in front of the server at `host:port`, stopped by a
    /// watchdog when the process exits (keep it in a static, shared by the run's tests).
    pub fn in_front_of(host: &str, upstream_port: u16) -> PgBouncer {
        let dir = std::env::temp_dir().join(format!("inventory-pgb-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let bouncer = PgBouncer {
            port: free_port(),
            dir,
            upstream: (host.to_owned(), upstream_port),
            entries: Mutex::new(Vec::new()),
        };
        bouncer.write_ini(&[]);
        let dir = &bouncer.dir;
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        let mut command = if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres", &dir.to_string_lossy()])
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown of {dir:?} failed");
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", binary()]);
            c
        } else {
            Command::new(binary())
        };
        let output = command
            .arg("-d")
            .arg(dir.join("pgbouncer.ini"))
            .output()
            .unwrap_or_else(|e| {
                panic!("pgbouncer runs ({e}); scripts/test installs Debian's pgbouncer package")
            });
        assert!(
            output.status.success(),
            "pgbouncer failed to start:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        bouncer.stop_with_this_process();
        let port = bouncer.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer does not listen on {port}:\n{}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// Writes `pgbouncer.ini`: `entries` first, then every other database to the upstream.
    fn write_ini(&self, entries: &[(String, u16)]) {
        let d = self.dir.display();
        let (host, upstream_port) = (&self.upstream.0, self.upstream.1);
        let mut databases = String::new();
        for (name, port) in entries {
            databases.push_str(&format!("{name} = host={host} port={port}\n"));
        }
        let ini = format!(
            "[databases]\n\
             {databases}\
             * = host={host} port={upstream_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {d}/userlist.txt\n\
             admin_users = postgres\n\
             pool_mode = transaction\n\
             default_pool_size = {SERVER_POOL_SIZE}\n\
             max_client_conn = 2000\n\
             logfile = {d}/pgbouncer.log\n\
             pidfile = {d}/pgbouncer.pid\n",
            port = self.port,
        );
        // Written in place: the file keeps its owner, the user PgBouncer runs as.
        std::fs::write(self.dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
    }

    /// Forwards `database` to `port` on the upstream host from now on (`None`: back to the
    /// `*` entry's port), as an operator would: edit `pgbouncer.ini`, then `RELOAD`. PgBouncer
    /// closes the database's server connections and opens new ones at the new address; other
    /// databases are not touched. A port nothing listens on is a server that is gone, as
    /// PgBouncer sees it: it still logs clients in, holds their queries and retries the server
    /// every `server_login_retry` (15 s).
    pub fn forward(&self, database: &str, port: Option<u16>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|(name, _)| name != database);
        entries.push((database.to_owned(), port.unwrap_or(self.upstream.1)));
        self.write_ini(&entries);
        self.admin("RELOAD");
    }

    /// A static lives until the process exits and is never dropped: a detached watchdog stops
    /// PgBouncer and removes its directory once this test process is gone.
    fn stop_with_this_process(&self) {
        let d = self.dir.display();
        on_exit_of_this_process(&format!(
            "kill \"$(cat {d}/pgbouncer.pid)\" 2>/dev/null; rm -rf {d}"
        ));
    }

    /// The URL of `database` through PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// PgBouncer's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// Rows of an admin-console `SHOW …` (psql, simple protocol), as `|`-separated lines.
    pub fn show(&self, what: &str) -> Vec<String> {
        self.admin(&format!("SHOW {what}"))
    }

    /// Runs an admin-console command (psql, simple protocol); its rows as `|`-separated lines.
    pub fn admin(&self, command: &str) -> Vec<String> {
        let output = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "pgbouncer", "-At", "-c", command])
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Client connections PgBouncer holds for `database` (`SHOW CLIENTS`).
    pub fn clients_of(&self, database: &str) -> usize {
        self.show("CLIENTS")
            .iter()
            .filter(|row| row.split('|').nth(2) == Some(database))
            .count()
    }
}
