//! A real PgBouncer of the test run's own, in front of the test PostgreSQL: Debian's package
//! (1.18, installed by `scripts/test`) with its default settings except what a transaction-mode
//! deployment sets (`pool_mode = transaction`, a small `default_pool_size`, trust auth on
//! loopback) and, on purpose, no `ignore_startup_parameters`. One instance serves every test of
//! a run (each test keeps its own database, reached through the `*` fallback entry); it is
//! started on first use on a free port, as the `postgres` user (PgBouncer refuses to run as
//! root), and stopped by a small watchdog when the test process exits.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sea_orm::sqlx::postgres::PgConnectOptions;

use crate::helpers::admin_url;
use crate::process::{free_port, is_root, on_exit_of_this_process};

/// Server connections PgBouncer opens per database: fewer than a test app's pool (2 + 8).
pub const SERVER_POOL_SIZE: u32 = 3;

pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
}

/// The run's PgBouncer, started on first use.
pub fn shared() -> &'static PgBouncer {
    static SHARED: OnceLock<PgBouncer> = OnceLock::new();
    SHARED.get_or_init(PgBouncer::start)
}

fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        "/usr/sbin/pgbouncer"
    } else {
        "pgbouncer"
    }
}

impl PgBouncer {
    fn start() -> PgBouncer {
        let upstream = PgConnectOptions::from_str(&admin_url()).expect("TEST_DATABASE_URL parses");
        let dir = std::env::temp_dir().join(format!("inventory-pgb-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let d = dir.display();
        let ini = format!(
            "[databases]\n\
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
            host = upstream.get_host(),
            upstream_port = upstream.get_port(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
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
        let bouncer = PgBouncer { port, dir };
        bouncer.stop_with_this_process();
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
        let output = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "pgbouncer", "-At", "-c"])
            .arg(format!("SHOW {what}"))
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "SHOW {what}: {}",
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
