//! Real processes for the tests that need them: the service binary as a child process (signals,
//! exit codes, its real log output), and a PostgreSQL server of a test's own (`initdb` +
//! `pg_ctl` in a temporary directory, optionally configured, e.g. for TLS) that the test may
//! stop and start without disturbing any other test.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The service binary running as a child process, its output collected line by line.
pub struct Binary {
    pub child: Child,
    pub port: u16,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            into.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    })
}

impl Binary {
    /// Runs `inventory-app serve` in `dir` with a bare environment plus `vars` (JSON logs, a
    /// random port), and waits for its `listening` log line.
    pub fn start(dir: &Path, vars: &[(&str, &str)]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_inventory-app"))
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("APP_PORT", "0")
            .env("LOG_FORMAT", "json")
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout"), Arc::clone(&stdout)),
            collect(child.stderr.take().expect("stderr"), Arc::clone(&stderr)),
        ];
        let mut binary = Binary {
            child,
            port: 0,
            stdout,
            stderr,
            readers,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        binary.port = loop {
            let port = binary.json_lines().iter().find_map(|v| {
                (v["message"] == "listening").then(|| v["port"].as_u64().expect("port") as u16)
            });
            if let Some(port) = port {
                break port;
            }
            if let Ok(Some(status)) = binary.child.try_wait() {
                panic!(
                    "the binary exited ({status}) before listening:\n{}",
                    binary.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `listening` line:\n{}",
                binary.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        binary
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line the binary has written to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// stdout and stderr, for failure messages.
    pub fn output(&self) -> String {
        let mut all = self.stdout_lines();
        all.extend(
            self.stderr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
        all.join("\n")
    }

    /// The stdout lines that are JSON objects.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// Sends SIGTERM (through the shell's `kill`, present on every machine).
    pub fn terminate(&self) {
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.pid())])
            .status()
            .expect("sh runs");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, polling up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The pipes are closed: the readers finish with the last lines.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the binary did not exit within {within:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Binary {
    /// SIGTERM, then waits (off the async runtime) for the exit; returns the status and the
    /// binary, whose output is then complete.
    pub async fn stop(mut self, within: Duration) -> (ExitStatus, Binary) {
        self.terminate();
        tokio::task::spawn_blocking(move || (self.wait_exit(within), self))
            .await
            .expect("the waiting thread finishes")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service binary built for the tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_inventory-app");

/// Runs the binary once with `args` and a bare environment plus `vars`; returns its output.
pub fn run_binary(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inventory-app"))
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .expect("the binary runs")
}

/// Runs the shell command `cleanup` once this test process has exited, however it exits: for
/// servers kept in statics (shared by the tests of a run, never dropped). A detached watchdog
/// (`setsid -f`: a session of its own, the call returns at once) polls for the process.
pub fn on_exit_of_this_process(cleanup: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}",
        pid = std::process::id()
    );
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the watchdog starts");
    assert!(status.success(), "the watchdog did not start");
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A PostgreSQL server of the test's own, in a temporary directory, on a free port. Stopped and
/// deleted when dropped.
pub struct OwnServer {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// Server options added to [`OwnServer::start_again`]'s (`-c name=value …`).
    options: String,
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// As root, hands `dir` (recursively) to the `postgres` user, which PostgreSQL and Patroni run
/// as (PostgreSQL refuses to run as root); otherwise the caller's own user keeps it.
pub fn give_to_postgres(dir: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres", &dir.to_string_lossy()])
            .status()
            .expect("chown runs");
        assert!(status.success(), "chown of {dir:?} failed");
    }
}

impl OwnServer {
    /// `initdb` and start. PostgreSQL refuses to run as root, so as root the server runs as the
    /// `postgres` user.
    pub fn start() -> OwnServer {
        OwnServer::start_with(|_| String::new())
    }

    /// Like [`OwnServer::start`], after `setup` has written what the server needs into its
    /// directory (certificates, an `hba_file`) and returned extra server options
    /// (`-c name=value …`). Everything in the directory then belongs to the server's user, as
    /// PostgreSQL wants for a private key.
    pub fn start_with(setup: impl FnOnce(&Path) -> String) -> OwnServer {
        let server = OwnServer::empty(setup);
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        server.start_again();
        server
    }

    /// A streaming replica of `primary` (`pg_basebackup -R -X stream`: it connects back to the
    /// primary as a standby), started on a port of its own. The primary's `initdb` defaults
    /// already allow it: `wal_level = replica`, WAL senders, and `replication` lines for
    /// loopback in `pg_hba.conf`.
    pub fn replica_of(primary: &OwnServer) -> OwnServer {
        let server = OwnServer::empty(|_| String::new());
        let primary_port = primary.port.to_string();
        let data = server.data();
        server.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        server.start_again();
        server
    }

    /// A directory the server's user owns, prepared by `setup` (which returns extra server
    /// options), and a free port; nothing started.
    fn empty(setup: impl FnOnce(&Path) -> String) -> OwnServer {
        let dir = std::env::temp_dir().join(format!("inventory-pg-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let options = setup(&dir);
        give_to_postgres(&dir);
        OwnServer {
            dir,
            bin: tests::postgres_bin(),
            port: free_port(),
            options,
        }
    }

    /// For a server kept in a static (shared by the tests of a run, never dropped): a detached
    /// watchdog stops it and removes its directory once this test process is gone.
    pub fn stop_when_this_process_exits(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let as_owner = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        on_exit_of_this_process(&format!(
            "{as_owner}{pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pg_ctl = pg_ctl.display(),
            data = self.data(),
            dir = self.dir.display(),
        ));
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    /// `tool` as the server's user.
    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let output = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} runs: {e}"));
        assert!(
            output.status.success(),
            "{tool} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50 {}",
            self.port,
            self.dir.to_string_lossy(),
            self.options
        );
        let log = self.dir.join("server.log").to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    /// Fast shutdown: the server rolls back open transactions and closes every connection.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// [`OwnServer::start`], off the test's runtime, with an empty database `inventory` made
    /// on it (the test's to keep: it goes with the server).
    pub async fn start_with_inventory() -> OwnServer {
        let server = tokio::task::spawn_blocking(OwnServer::start)
            .await
            .expect("server starts");
        let admin = super::connect_to(&server.url("postgres")).await;
        sea_orm::ConnectionTrait::execute_unprepared(&admin, "CREATE DATABASE inventory")
            .await
            .expect("database created");
        let _ = admin.close().await;
        server
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
