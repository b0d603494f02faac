//! Where a read runs when a streaming replica is configured (`DATABASE_REPLICA_URL`,
//! `docs/scale-out.md`), and the consistency token that lets every client read its own writes. The
//! rule is stated in the parent module; this file holds its mechanics.
//!
//! * A token is the primary's WAL insert position read right after a write committed
//!   (`pg_current_wal_insert_lsn()`, which is past the commit record once `COMMIT` returned). It
//!   is one more round trip after each committed write, paid only when a replica is configured:
//!   `COMMIT` is a message of its own ([`round_trip`](super::round_trip)), and the position is
//!   read after it on any pooled primary connection, given up after [`CHECK_BUDGET`] (the
//!   client's next reads then go to the primary).
//! * A read carrying a token runs on the replica once `pg_last_wal_replay_lsn()` there has reached
//!   the token. The last replay position seen is remembered, so most reads with a token decide
//!   without a query; otherwise the replica is polled every [`POLL_EVERY`] for at most
//!   `DB_REPLICA_MAX_WAIT_MS`, outside any transaction (a `REPEATABLE READ` snapshot would be
//!   taken by the poll itself), and the snapshot is taken after replay passed the token.
//! * The token is parsed strictly and bounded ([`parse_token`]): anything else is ignored. A
//!   forged position can only make a read wait up to `DB_REPLICA_MAX_WAIT_MS` and then run on the
//!   primary, the same as a replica that lags.
//! * The replica's reachability is an [`Availability`] of its own: while it is down, reads go to
//!   the primary without trying it, and its probe brings it back. The probe must see the server
//!   answer (`SELECT 1` within [`CHECK_BUDGET`]), not merely log in: a transaction-mode pooler in
//!   front of the replica logs clients in while its server is gone and holds their queries, so a
//!   read that waits there is given up and re-run on the primary only once a probe says "down". A background check every
//!   [`CHECK_EVERY`] measures the lag and notices a replica that went away while no read used it.
//!
//! Every query here is a single simple-protocol message outside a transaction, which a
//! transaction-mode pooler in front of either server forwards to one server connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use actix_web::http::header::{self, HeaderName, HeaderValue};
#[cfg(feature = "postgres")]
use sea_orm::sqlx::{self, Row as _};
#[cfg(feature = "postgres")]
use sea_orm::{ConnAcquireErr, RuntimeErr};
use sea_orm::{DatabaseConnection, DbErr};

use crate::availability::Availability;
use crate::headers;

/// The request and response header that carries the token ([`headers::CONSISTENCY_TOKEN`],
/// lower-cased as `HeaderName` needs).
pub const TOKEN_HEADER: HeaderName = HeaderName::from_static("consistency-token");
/// The cookie that carries the token for clients that keep cookies.
pub const TOKEN_COOKIE: &str = headers::CONSISTENCY_COOKIE;
/// How often a read with a token asks the replica how far it has replayed.
pub const POLL_EVERY: Duration = Duration::from_millis(1);
/// How often the replica's lag and reachability are checked in the background.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The longest a background or readiness check of the replica may take.
pub const CHECK_BUDGET: Duration = Duration::from_millis(500);

const TOKEN_PREFIX: &str = "v1-";
/// The longest header or cookie value looked at; anything longer is not a token.
const TOKEN_MAX_LEN: usize = 64;

/// A position in the primary's write-ahead log (PostgreSQL's `pg_lsn`, `X/Y` in hex).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Not a WAL position: the token of a write whose position could not be read. A read
    /// carrying it runs on the primary at once, so its client still reads its own write.
    pub const PRIMARY: Lsn = Lsn(u64::MAX);

    /// Parses PostgreSQL's text form `16/B374D848`.
    pub fn parse_pg(text: &str) -> Option<Lsn> {
        let (high, low) = text.trim().split_once('/')?;
        if high.is_empty() || low.is_empty() || high.len() > 8 || low.len() > 8 {
            return None;
        }
        let high = u32::from_str_radix(high, 16).ok()?;
        let low = u32::from_str_radix(low, 16).ok()?;
        Some(Lsn((u64::from(high) << 32) | u64::from(low)))
    }

    /// The token a client sends back (opaque to it).
    pub fn token(self) -> String {
        format!("{TOKEN_PREFIX}{:016x}", self.0)
    }
}

/// The position a token names, or `None` for anything that is not exactly a token this service
/// issued: a client can send no value that fails the request.
pub fn parse_token(value: &[u8]) -> Option<Lsn> {
    if value.len() > TOKEN_MAX_LEN {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?.trim();
    let hex = text.strip_prefix(TOKEN_PREFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(Lsn)
}

/// The newest position among the request's `Consistency-Token` headers and its
/// `consistency_token` cookie; malformed values are ignored.
pub fn token_of(req: &HttpRequest) -> Option<Lsn> {
    let headers = req.headers();
    let from_header = headers
        .get_all(TOKEN_HEADER)
        .take(8)
        .filter_map(|v| parse_token(v.as_bytes()));
    let from_cookie = headers
        .get_all(header::COOKIE)
        .take(8)
        .filter(|v| v.len() <= 8192)
        .flat_map(|v| v.as_bytes().split(|b| *b == b';').take(64))
        .filter_map(|pair| {
            let text = std::str::from_utf8(pair).ok()?.trim();
            let (name, value) = text.split_once('=')?;
            (name == TOKEN_COOKIE).then(|| parse_token(value.as_bytes()))?
        });
    from_header.chain(from_cookie).max()
}

/// Adds the consistency token of the primary's position now to a response: after a write
/// committed, or when an `Idempotency-Key` replays one (its writes committed before now).
pub(super) async fn attach_token(headers: &mut header::HeaderMap, primary: &DatabaseConnection) {
    let lsn = position_after_commit(primary).await;
    for (name, value) in token_headers(lsn) {
        headers.append(name, value);
    }
}

/// The `Consistency-Token` header and `Set-Cookie` of a response to a committed write.
pub fn token_headers(lsn: Lsn) -> [(HeaderName, HeaderValue); 2] {
    let token = lsn.token();
    // Hex digits and a prefix of ASCII: always a valid header value.
    let value = |s: String| {
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    };
    [
        (TOKEN_HEADER, value(token.clone())),
        (
            header::SET_COOKIE,
            value(format!(
                "{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax"
            )),
        ),
    ]
}

/// How a read-only attempt is routed: to `replica` when there is one and it
/// [admits](Replica::admits) the request's `token`, else to the primary.
#[derive(Clone, Debug)]
pub(super) struct ReadRoute {
    pub replica: Option<Replica>,
    pub token: Option<Lsn>,
}

/// The streaming replica: its pool, reachability and last known replay position and lag.
/// Shared by every worker (cheap to clone).
#[derive(Clone)]
pub struct Replica(Arc<Inner>);

struct Inner {
    db: DatabaseConnection,
    availability: Availability,
    max_wait: Duration,
    /// The newest replay position seen (replay only moves forward on one server).
    replayed: AtomicU64,
    /// The lag in seconds at the last check, as `f64` bits.
    lag: AtomicU64,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("down", &self.is_down())
            .field("max_wait", &self.0.max_wait)
            .finish()
    }
}

/// The replica's state for `/health/ready` and `/metrics`.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaState {
    /// The replica answered its last check.
    pub up: bool,
    /// Seconds of replay behind the primary at the last successful check.
    pub lag_seconds: Option<f64>,
}

impl Replica {
    /// `db` is the replica's pool (connected lazily, so a replica that is down at start-up is
    /// not an outage). Starts the background check when called inside a Tokio runtime; the
    /// check ends when the last clone of the replica is dropped.
    pub fn new(db: DatabaseConnection, connect_timeout: Duration, max_wait: Duration) -> Replica {
        let replica = Replica(Arc::new(Inner {
            availability: Availability::answering(&db, connect_timeout, CHECK_BUDGET),
            db,
            max_wait,
            replayed: AtomicU64::new(0),
            lag: AtomicU64::new(f64::NAN.to_bits()),
        }));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch(Arc::downgrade(&replica.0)));
        }
        replica
    }

    /// The replica's pool.
    pub fn db(&self) -> &DatabaseConnection {
        &self.0.db
    }

    /// Whether the replica answers, as its probe last saw it.
    pub fn availability(&self) -> &Availability {
        &self.0.availability
    }

    /// The replica is down: reads go to the primary.
    pub fn is_down(&self) -> bool {
        self.0.availability.is_down()
    }

    /// The last known state, without a query.
    pub fn state(&self) -> ReplicaState {
        let lag = f64::from_bits(self.0.lag.load(Ordering::Relaxed));
        ReplicaState {
            up: !self.is_down(),
            lag_seconds: (!lag.is_nan()).then_some(lag),
        }
    }

    /// Whether a read carrying `token` may run on the replica: always without a token (no
    /// wait), once replay has reached the token otherwise, never while the replica is down.
    /// Waits at most `DB_REPLICA_MAX_WAIT_MS`.
    pub async fn admits(&self, token: Option<Lsn>) -> bool {
        if self.is_down() {
            return false;
        }
        let Some(token) = token else {
            return true;
        };
        if token == Lsn::PRIMARY {
            return false;
        }
        if token <= self.replayed() {
            return true;
        }
        let deadline = Instant::now() + self.0.max_wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.replay_position()).await {
                Ok(Ok(replayed)) if replayed >= token => return true,
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
            if Instant::now() + POLL_EVERY >= deadline {
                return false;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    fn replayed(&self) -> Lsn {
        Lsn(self.0.replayed.load(Ordering::Acquire))
    }

    fn saw_replayed(&self, lsn: Lsn) {
        self.0.replayed.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// `pg_last_wal_replay_lsn()` on the replica (an error when the server is not a standby).
    async fn replay_position(&self) -> Result<Lsn, DbErr> {
        let row = self
            .0
            .availability
            .guard(fetch_one(
                &self.0.db,
                "SELECT pg_last_wal_replay_lsn()::text",
            ))
            .await?;
        let lsn = text_at(&row, 0)
            .and_then(|t| Lsn::parse_pg(&t))
            .ok_or_else(not_a_standby)?;
        self.saw_replayed(lsn);
        Ok(lsn)
    }

    /// Asks the replica for its replay position and lag, within `CHECK_BUDGET` (500 ms). A replica
    /// that does not answer is probed (and marked down if it cannot be reached).
    pub async fn check(&self) -> ReplicaState {
        // The lag is 0 while everything received is replayed (an idle primary writes nothing,
        // and the time since the last replayed commit would grow for no reason).
        const LAG: &str = "SELECT pg_last_wal_replay_lsn()::text, \
             (CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
              ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) \
              END)::float8::text";
        let answer = tokio::time::timeout(
            CHECK_BUDGET,
            self.0.availability.guard(fetch_one(&self.0.db, LAG)),
        )
        .await;
        match answer {
            Ok(Ok(row)) => {
                let replayed = text_at(&row, 0).and_then(|t| Lsn::parse_pg(&t));
                let lag = text_at(&row, 1).and_then(|t| t.parse::<f64>().ok());
                if let Some(lsn) = replayed {
                    self.saw_replayed(lsn);
                }
                if let Some(lag) = lag {
                    self.0.lag.store(lag.max(0.0).to_bits(), Ordering::Relaxed);
                }
                ReplicaState {
                    up: replayed.is_some() && !self.is_down(),
                    lag_seconds: lag,
                }
            }
            Ok(Err(_)) | Err(_) => {
                self.0.availability.suspect();
                ReplicaState {
                    up: false,
                    lag_seconds: None,
                }
            }
        }
    }
}

/// Checks the replica every [`CHECK_EVERY`] while the application holds it.
async fn watch(replica: Weak<Inner>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(inner) = replica.upgrade() else {
            return;
        };
        Replica(inner).check().await;
    }
}

/// The primary's WAL insert position, read after a write committed: the client's token. When
/// it cannot be read within [`CHECK_BUDGET`] (a busy pool must not hold the response back),
/// [`Lsn::PRIMARY`], which sends the client's next reads to the primary.
pub async fn position_after_commit(primary: &DatabaseConnection) -> Lsn {
    let read = fetch_one(primary, "SELECT pg_current_wal_insert_lsn()::text");
    match tokio::time::timeout(CHECK_BUDGET, read).await {
        Ok(Ok(row)) => text_at(&row, 0)
            .and_then(|t| Lsn::parse_pg(&t))
            .unwrap_or(Lsn::PRIMARY),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read the WAL position after a commit; the client's next reads go to the primary");
            Lsn::PRIMARY
        }
        Err(_) => {
            tracing::warn!(
                "no connection to read the WAL position after a commit; the client's next reads go to the primary"
            );
            Lsn::PRIMARY
        }
    }
}

/// One row of a simple-protocol query (no prepared statement, any pooler), its columns as text.
/// Its callers bound it; a connection whose answer did not come in time is closed, not handed
/// back to the pool (`side_conn.rs`).
#[cfg(feature = "postgres")]
async fn fetch_one(
    db: &DatabaseConnection,
    sql: &'static str,
) -> Result<Vec<Option<String>>, DbErr> {
    let rows = super::side_conn::SideConn::fetch_all(db.get_postgres_connection_pool(), sql)
        .await
        .map_err(|e| match e {
            sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
            sqlx::Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
            e => DbErr::Query(RuntimeErr::SqlxError(Arc::new(e))),
        })?;
    let row = rows
        .into_iter()
        .next()
        .ok_or_else(|| DbErr::Query(RuntimeErr::SqlxError(Arc::new(sqlx::Error::RowNotFound))))?;
    Ok((0..row.len())
        .map(|i| row.try_get::<Option<String>, _>(i).ok().flatten())
        .collect())
}

/// Replicas and WAL positions are PostgreSQL's: without its driver there is nothing to ask
/// (the builder refuses a replica of another backend, so this is never reached).
#[cfg(not(feature = "postgres"))]
async fn fetch_one(_: &DatabaseConnection, _: &'static str) -> Result<Vec<Option<String>>, DbErr> {
    Err(DbErr::Custom(
        "read replicas need the layer's postgres feature".into(),
    ))
}

fn text_at(row: &[Option<String>], index: usize) -> Option<String> {
    row.get(index).cloned().flatten()
}

fn not_a_standby() -> DbErr {
    DbErr::Custom("DATABASE_REPLICA_URL names a server that is not replaying WAL".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_header_is_the_one_the_document_names() {
        assert!(
            TOKEN_HEADER
                .as_str()
                .eq_ignore_ascii_case(headers::CONSISTENCY_TOKEN)
        );
    }

    #[test]
    fn a_token_names_the_position_it_was_made_from() {
        let lsn = Lsn::parse_pg("16/B374D848").expect("pg_lsn text");
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.token(), "v1-00000016b374d848");
        assert_eq!(parse_token(lsn.token().as_bytes()), Some(lsn));
        assert_eq!(
            parse_token(Lsn::PRIMARY.token().as_bytes()),
            Some(Lsn::PRIMARY)
        );
    }

    #[test]
    fn anything_but_an_issued_token_is_ignored() {
        let long = "v1-".to_owned() + &"0".repeat(100);
        let cases: [(&[u8], &str); 9] = [
            (b"", "empty"),
            (b"v1-", "no position"),
            (b"v1-0000000000000g00", "not hex"),
            (b"v1-000000000000000", "one digit short"),
            (b"v1-00000000000000001", "one digit long"),
            (b"v2-0000000000000001", "unknown version"),
            (b"0/16B3748", "PostgreSQL's own text form"),
            (b"v1-\xff\xfe00000000000000", "not UTF-8"),
            (long.as_bytes(), "huge"),
        ];
        for (value, why) in cases {
            assert_eq!(parse_token(value), None, "{why}");
        }
    }

    #[test]
    fn pg_lsn_text_parses_strictly() {
        assert_eq!(Lsn::parse_pg("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse_pg("FFFFFFFF/FFFFFFFF"), Some(Lsn(u64::MAX)));
        for bad in ["", "0", "/1", "1/", "1/2/3", "100000000/0", "x/1"] {
            assert_eq!(Lsn::parse_pg(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_newest_token_of_header_and_cookie_wins_and_junk_is_skipped() {
        let req = actix_web::test::TestRequest::default()
            .insert_header((TOKEN_HEADER, "garbage"))
            .append_header((TOKEN_HEADER, Lsn(5).token()))
            .insert_header((
                header::COOKIE,
                format!("a=b; {TOKEN_COOKIE}={}; c", Lsn(9).token()),
            ))
            .to_http_request();
        assert_eq!(token_of(&req), Some(Lsn(9)));
        let none = actix_web::test::TestRequest::default()
            .insert_header((header::COOKIE, "consistency_token=; x=y"))
            .to_http_request();
        assert_eq!(token_of(&none), None);
    }
}
