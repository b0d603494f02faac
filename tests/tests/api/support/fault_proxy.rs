//! A TCP proxy of the tests' own between the app and PostgreSQL (or MariaDB) that breaks
//! connections at a chosen point of the protocol: at the next `COMMIT` (or `ROLLBACK`) a client
//! sends (sqlx sends both as simple queries: PostgreSQL's `Q` message, MariaDB's `COM_QUERY`),
//! before or after forwarding it. It reads the client's messages (PostgreSQL: startup, then typed messages;
//! MariaDB: length-prefixed packets) and copies the server's bytes untouched, so it needs a
//! connection without TLS (`DB_SSL_MODE=disable`). Everything stops when it is dropped.
//!
//! It can also hold a connection instead of cutting it, as a network partition does: from a
//! chosen message on, nothing more passes in either direction, and the sockets stay open until
//! the client closes its end ([`FaultProxy::hold_next`]).
//!
//! A partition the server does not see ([`FaultProxy::partition_next`]) goes further: the held
//! connection's server end stays open after the client closed its own (the server learns
//! nothing, as when the client's close is lost in the partition and an idle backend sends
//! nothing that would find out), and new connections are refused until [`FaultProxy::heal`].
//!
//! One entry: [`FaultProxy::start`], then [`FaultProxy::cut_next_commit`],
//! [`FaultProxy::cut_next_rollback`], [`FaultProxy::hold_next`] or
//! [`FaultProxy::partition_next`]; [`FaultProxy::retarget`] sends new connections to another
//! server (a promoted standby).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Where the armed cut falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// The server receives the `COMMIT`; its reply never reaches the client.
    AfterForwarding,
    /// The server never receives the `COMMIT`.
    BeforeForwarding,
}

/// Where an armed hold falls; from there on the connection passes nothing either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The next statement whose text contains this (a simple query, or the Parse of a
    /// prepared one) is not forwarded.
    Statement(&'static str),
    /// The next `COMMIT` is not forwarded.
    Commit,
    /// The next `COMMIT` is forwarded; the server's reply is not.
    CommitReply,
}

impl Hold {
    fn matches(&self, protocol: Protocol, message: &[u8]) -> bool {
        match self {
            Hold::Statement(needle) => {
                sql_of(protocol, message).is_some_and(|(_, sql)| sql.contains(needle))
            }
            Hold::Commit | Hold::CommitReply => is_commit(protocol, message),
        }
    }
}

/// The wire protocol the proxy reads the client's side of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Postgres,
    Mysql,
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    cut: Cut,
    /// The simple query the cut falls at: `COMMIT` or `ROLLBACK`.
    at: &'static str,
    /// After the cut, break every other connection and refuse new ones (the database becomes
    /// unreachable for the app).
    then_isolate: bool,
}

struct Shared {
    /// Where new connections go ([`FaultProxy::retarget`] moves it).
    upstream: Mutex<SocketAddr>,
    protocol: Protocol,
    plan: Mutex<Option<Plan>>,
    /// Set once the app is cut off: new connections are closed at once.
    isolated: AtomicBool,
    /// Bumped to break every live connection.
    sever: watch::Sender<u64>,
    /// Set when the armed cut has happened.
    fired: watch::Sender<bool>,
    hold: Mutex<Option<Hold>>,
    /// Whether the armed hold is a partition the server does not see.
    unseen: AtomicBool,
    /// Set when the armed hold has happened.
    held: watch::Sender<bool>,
    /// Set when the client closed its end of the held connection.
    held_closed: watch::Sender<bool>,
}

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns every connection task (a JoinSet): aborting it ends them all.
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listens on a random loopback port and forwards to PostgreSQL at `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> FaultProxy {
        FaultProxy::start_for(upstream, Protocol::Postgres).await
    }

    /// Listens on a random loopback port and forwards to MariaDB at `upstream` (`host:port`).
    pub async fn start_mysql(upstream: &str) -> FaultProxy {
        FaultProxy::start_for(upstream, Protocol::Mysql).await
    }

    async fn start_for(upstream: &str, protocol: Protocol) -> FaultProxy {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("upstream address resolves")
            .next()
            .expect("an upstream address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            protocol,
            plan: Mutex::new(None),
            isolated: AtomicBool::new(false),
            sever: watch::channel(0).0,
            fired: watch::channel(false).0,
            hold: Mutex::new(None),
            unseen: AtomicBool::new(false),
            held: watch::channel(false).0,
            held_closed: watch::channel(false).0,
        });
        let task = tokio::spawn(accept(listener, Arc::clone(&shared)));
        FaultProxy { addr, shared, task }
    }

    /// `url` with its host and port replaced by the proxy's; TLS off for PostgreSQL (MariaDB
    /// takes it from `DB_SSL_MODE=disable`).
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        let tls_off = match (self.shared.protocol, path.contains('?')) {
            (Protocol::Mysql, _) => "",
            (Protocol::Postgres, true) => "&sslmode=disable",
            (Protocol::Postgres, false) => "?sslmode=disable",
        };
        format!(
            "{scheme}://{}{}/{path}{tls_off}",
            user.unwrap_or_default(),
            self.addr
        )
    }

    /// Arms one cut at the next `COMMIT` any client sends.
    pub fn cut_next_commit(&self, cut: Cut) {
        self.arm(Plan {
            cut,
            at: "COMMIT",
            then_isolate: false,
        });
    }

    /// Arms one cut at the next `ROLLBACK` any client sends (as [`Cut`] says of a `COMMIT`).
    pub fn cut_next_rollback(&self, cut: Cut) {
        self.arm(Plan {
            cut,
            at: "ROLLBACK",
            then_isolate: false,
        });
    }

    /// Arms one cut at the next `COMMIT`, after which the database is unreachable through the
    /// proxy: every other connection is broken and new ones are closed at once.
    pub fn cut_next_commit_and_isolate(&self, cut: Cut) {
        self.arm(Plan {
            cut,
            at: "COMMIT",
            then_isolate: true,
        });
    }

    /// Breaks every live connection now, as a server that dies or a router that ends its
    /// sessions does: the client and the server each see their connection close, with no
    /// error message. New connections pass as before.
    pub fn sever(&self) {
        self.shared.sever.send_modify(|n| *n += 1);
    }

    fn arm(&self, plan: Plan) {
        *self.shared.plan.lock().expect("plan lock") = Some(plan);
        self.shared.fired.send_replace(false);
    }

    /// Whether the armed cut has happened.
    pub fn fired(&self) -> bool {
        *self.shared.fired.borrow()
    }

    /// Arms one hold, on whichever connection first sends what `hold` names.
    pub fn hold_next(&self, hold: Hold) {
        self.shared.unseen.store(false, Ordering::SeqCst);
        self.arm_hold(hold);
    }

    /// Arms one hold, as [`FaultProxy::hold_next`], that is a partition the server does not
    /// see: once it falls, new connections are refused until [`FaultProxy::heal`], and the held
    /// connection's server end stays open after the client closed its end, for as long as the
    /// proxy lives (or until the server closes it).
    pub fn partition_next(&self, hold: Hold) {
        self.shared.unseen.store(true, Ordering::SeqCst);
        self.arm_hold(hold);
    }

    /// New connections pass again. The connection held by [`FaultProxy::partition_next`] stays
    /// as it is: its client is gone and nothing is sent to its server.
    pub fn heal(&self) {
        self.shared.isolated.store(false, Ordering::SeqCst);
    }

    /// New connections go to `upstream` (`host:port`) from now on, as a router's do once it
    /// points at a promoted standby; live ones stay where they are.
    pub async fn retarget(&self, upstream: &str) {
        let addr = tokio::net::lookup_host(upstream)
            .await
            .expect("upstream address resolves")
            .next()
            .expect("an upstream address");
        *self.shared.upstream.lock().expect("upstream lock") = addr;
    }

    /// Waits until the armed cut has happened, up to `within`; returns whether it did.
    pub async fn wait_fired(&self, within: std::time::Duration) -> bool {
        let mut fired = self.shared.fired.subscribe();
        tokio::time::timeout(within, fired.wait_for(|f| *f))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn arm_hold(&self, hold: Hold) {
        *self.shared.hold.lock().expect("hold lock") = Some(hold);
        self.shared.held.send_replace(false);
        self.shared.held_closed.send_replace(false);
    }

    /// Whether the armed hold has happened.
    pub fn held(&self) -> bool {
        *self.shared.held.borrow()
    }

    /// Waits until the client has closed its end of the held connection, up to `within`;
    /// returns whether it did.
    pub async fn held_connection_closed(&self, within: std::time::Duration) -> bool {
        let mut closed = self.shared.held_closed.subscribe();
        tokio::time::timeout(within, closed.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if shared.isolated.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                connections.spawn(relay(client, Arc::clone(&shared)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One client connection: frontend messages are read one by one (to find the `COMMIT`),
/// backend bytes are copied as they come.
async fn relay(client: TcpStream, shared: Arc<Shared>) {
    let upstream = *shared.upstream.lock().expect("upstream lock");
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let mut severed = shared.sever.subscribe();
    // Set just before a cut `COMMIT` is forwarded: its reply must not reach the client.
    let muted = AtomicBool::new(false);

    let protocol = shared.protocol;
    let frontend = async {
        // MariaDB's packets are framed alike from the first one on.
        let mut startup = protocol == Protocol::Postgres;
        loop {
            let Some(message) = read_message(protocol, &mut client_rx, startup).await else {
                return;
            };
            if startup {
                // SSLRequest / GSSENCRequest are followed by another untyped message.
                let code = message
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                startup = matches!(code, Some(80_877_103) | Some(80_877_104));
            } else if let Some(hold) = take_hold(&shared, &message) {
                muted.store(true, Ordering::SeqCst);
                let unseen = shared.unseen.load(Ordering::SeqCst);
                if unseen {
                    shared.isolated.store(true, Ordering::SeqCst);
                }
                if hold == Hold::CommitReply {
                    let _ = server_tx.write_all(&message).await;
                    let _ = server_tx.flush().await;
                }
                shared.held.send_replace(true);
                // Nothing more passes; the client's bytes are read and dropped, so that its
                // closing the connection is seen.
                while read_message(protocol, &mut client_rx, false)
                    .await
                    .is_some()
                {}
                shared.held_closed.send_replace(true);
                if unseen {
                    // The server end stays open: the server learns nothing of the close.
                    std::future::pending::<()>().await;
                }
                return;
            } else if let Some(plan) = take_plan(&shared, &message) {
                muted.store(true, Ordering::SeqCst);
                if plan.cut == Cut::AfterForwarding {
                    let _ = server_tx.write_all(&message).await;
                    let _ = server_tx.flush().await;
                }
                if plan.then_isolate {
                    shared.isolated.store(true, Ordering::SeqCst);
                    shared.sever.send_modify(|n| *n += 1);
                }
                shared.fired.send_replace(true);
                return;
            }
            if server_tx.write_all(&message).await.is_err() {
                return;
            }
        }
    };
    let backend = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if muted.load(Ordering::SeqCst) {
                // Held or cut: the reply is dropped.
                continue;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = frontend => {}
        _ = backend => {}
        _ = severed.changed() => {}
    }
    // Returning drops both sockets: the client and the server each see the connection close.
}

/// The armed cut, taken if `message` is where it falls.
fn take_plan(shared: &Shared, message: &[u8]) -> Option<Plan> {
    let mut plan = shared.plan.lock().expect("plan lock");
    plan.filter(|p| is_simple(shared.protocol, message, p.at))
        .and_then(|_| plan.take())
}

/// The armed hold, taken if `message` is where it falls.
fn take_hold(shared: &Shared, message: &[u8]) -> Option<Hold> {
    let mut hold = shared.hold.lock().expect("hold lock");
    hold.filter(|h| h.matches(shared.protocol, message))
        .and_then(|_| hold.take())
}

/// One whole client message. PostgreSQL: untyped during startup (`length`, body), typed after
/// (`type`, `length`, body). MariaDB: a packet (3-byte little-endian length, sequence number,
/// payload). `None` at end of stream.
async fn read_message(
    protocol: Protocol,
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    startup: bool,
) -> Option<Vec<u8>> {
    let mut message = Vec::new();
    let body = match protocol {
        Protocol::Postgres => {
            if !startup {
                let mut kind = [0u8; 1];
                stream.read_exact(&mut kind).await.ok()?;
                message.push(kind[0]);
            }
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).await.ok()?;
            message.extend_from_slice(&len);
            (u32::from_be_bytes(len) as usize).checked_sub(4)?
        }
        Protocol::Mysql => {
            let mut header = [0u8; 4];
            stream.read_exact(&mut header).await.ok()?;
            message.extend_from_slice(&header);
            u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize
        }
    };
    let start = message.len();
    message.resize(start + body, 0);
    stream.read_exact(&mut message[start..]).await.ok()?;
    Some(message)
}

/// The SQL a client message carries, and whether it is a simple (text) query: PostgreSQL's
/// `Q` or the `P`arse of a prepared statement; MariaDB's `COM_QUERY` or `COM_STMT_PREPARE`.
fn sql_of(protocol: Protocol, message: &[u8]) -> Option<(bool, String)> {
    let (simple, sql) = match (protocol, message.first()) {
        (Protocol::Postgres, Some(b'Q')) => (true, message.get(5..)?),
        (Protocol::Postgres, Some(b'P')) => (false, message.get(5..)?),
        (Protocol::Mysql, _) => match message.get(4) {
            Some(0x03) => (true, message.get(5..)?),
            Some(0x16) => (false, message.get(5..)?),
            _ => return None,
        },
        _ => return None,
    };
    Some((simple, String::from_utf8_lossy(sql).into_owned()))
}

/// A simple query whose whole text is `COMMIT`.
fn is_commit(protocol: Protocol, message: &[u8]) -> bool {
    is_simple(protocol, message, "COMMIT")
}

/// A simple query whose whole text is `statement`.
fn is_simple(protocol: Protocol, message: &[u8], statement: &str) -> bool {
    sql_of(protocol, message).is_some_and(|(simple, sql)| {
        simple
            && sql
                .trim_end_matches('\0')
                .trim()
                .eq_ignore_ascii_case(statement)
    })
}

/// The `host:port` of a PostgreSQL URL.
pub fn upstream_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    }
}
