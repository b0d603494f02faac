//! `Idempotency-Key` on `POST` (`docs/scale-out.md`, the IETF httpapi idempotency-key draft): the
//! mechanics behind the rule in the parent module. Nothing here knows the service's domain: any `POST`
//! route wrapped in [`Transactional`](super::Transactional) gets it.
//!
//! * The key (1..=255 visible ASCII characters, else 422 `validation_failed` naming the header)
//!   and a fingerprint of the request (SHA-256 of method, path and query, and body) are read once
//!   per request.
//! * Every attempt first claims the key inside its own transaction. On PostgreSQL it takes a
//!   transaction-scoped advisory lock on the key without waiting
//!   (`pg_try_advisory_xact_lock`, released by `COMMIT`/`ROLLBACK`, so it also works behind a
//!   transaction-mode pooler): when another request holds it, the duplicate is answered 409
//!   `idempotency_key_in_use` at once instead of waiting (it holds no connection while the first
//!   runs; the client retries later and gets the replay). Then the stored row is read: the same
//!   fingerprint is replayed (status, body, `Location`, content type, plus `Idempotent-Replayed:
//!   true`) and nothing else runs; another fingerprint is 422 `idempotency_key_reused`.
//! * A response below 400 is stored by an upsert in the same transaction as the handler's
//!   writes, just before `COMMIT`: the key is stored if and only if the writes are committed. A
//!   4xx (whose writes were rolled back) is stored afterwards in a transaction of its own: it
//!   wrote nothing, so there is nothing to keep atomic. Responses ≥ 500 are never stored.
//! * The upsert only replaces an expired row. If it finds a live one, a duplicate committed
//!   between this attempt's snapshot and its lock (possible at REPEATABLE READ): the attempt
//!   is failed as a serialization failure, so the retry loop runs it again and the re-run
//!   replays. A re-run after 40001 is the same attempt: it claims the key again.
//! * On MariaDB/MySQL there is no non-blocking transaction-scoped lock: a concurrent duplicate
//!   runs its handler, waits at the store for the first to commit, finds its row and is re-run,
//!   and the re-run replays (so there it never gets 409).
//! * Expired keys are deleted in small batches by a background transaction, started after one
//!   stored key in [`CLEAN_ONE_IN`], so no request waits for it.

use std::time::Duration;

use actix_web::HttpResponse;
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::{Method, StatusCode};
use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, Value};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::headers::{IDEMPOTENT_REPLAYED, IdempotencyKey};

use super::Tx;

pub const HEADER: &str = IdempotencyKey::NAME;
pub const REPLAYED_HEADER: &str = IDEMPOTENT_REPLAYED;

/// A stored key is cleaned up after one stored key in this many (on average).
pub const CLEAN_ONE_IN: u32 = 16;
/// Rows deleted per clean-up transaction.
const CLEAN_BATCH: u64 = 100;

/// The key and fingerprint of one request.
#[derive(Clone, Debug)]
pub(super) struct Idempotency {
    key: String,
    fingerprint: String,
    /// The advisory lock's id: the first 8 bytes of the key's SHA-256.
    lock_id: i64,
}

/// A response kept for replay.
#[derive(Clone, Debug)]
pub(super) struct Stored {
    pub status: u16,
    pub content_type: String,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// What an attempt may do with its key.
pub(super) enum Claim {
    /// First use: run the handler.
    Proceed,
    /// The same request completed before: answer this.
    Replay(Stored),
    /// Another request with the key is running.
    InUse,
    /// The key was used for a different request.
    Reused,
}

impl Idempotency {
    /// The request's key and fingerprint; `None` without the header or on a method other than
    /// `POST`.
    pub(super) fn read(
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Option<Idempotency>, Error> {
        if method != Method::POST {
            return Ok(None);
        }
        let mut values = headers.get_all(HEADER);
        let Some(value) = values.next() else {
            return Ok(None);
        };
        let bytes = value.as_bytes();
        if values.next().is_some() || !IdempotencyKey::accepts(bytes) {
            return Err(Error::MalformedIdempotencyKey(format!(
                "{}: must be one header of {} to {} visible ASCII characters",
                IdempotencyKey::NAME,
                IdempotencyKey::MIN_LEN,
                IdempotencyKey::MAX_LEN
            )));
        }
        let key = String::from_utf8_lossy(bytes).into_owned();
        let mut hasher = Sha256::new();
        for part in [method.as_str().as_bytes(), path_and_query.as_bytes(), body] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        let fingerprint = hex(&hasher.finalize());
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Ok(Some(Idempotency {
            key,
            fingerprint,
            lock_id: i64::from_be_bytes(id),
        }))
    }

    /// Claims the key in `tx` (its first statements).
    pub(super) async fn claim(&self, tx: &Tx) -> Result<Claim, DbErr> {
        let backend = tx.get_database_backend();
        if backend == DbBackend::Postgres {
            let locked = tx
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT pg_try_advisory_xact_lock($1)",
                    [Value::from(self.lock_id)],
                ))
                .await?
                .map(|row| row.try_get_by_index::<bool>(0))
                .transpose()?
                .unwrap_or(false);
            if !locked {
                return Ok(Claim::InUse);
            }
        }
        let row = tx
            .query_one_raw(statement(
                backend,
                "SELECT fingerprint, status, content_type, location, body FROM idempotency_key \
                 WHERE request_key = $1 AND expires_at > $2",
                [Value::from(self.key.clone()), Value::from(Utc::now())],
            ))
            .await?;
        let Some(row) = row else {
            return Ok(Claim::Proceed);
        };
        if row.try_get_by_index::<String>(0)? != self.fingerprint {
            return Ok(Claim::Reused);
        }
        let status = row.try_get_by_index::<i32>(1)?;
        Ok(Claim::Replay(Stored {
            status: u16::try_from(status).unwrap_or(500),
            content_type: row.try_get_by_index(2)?,
            location: row.try_get_by_index(3)?,
            body: row.try_get_by_index(4)?,
        }))
    }

    /// Stores `response` for the key in `db` (the request's transaction). `Ok(false)` when a
    /// live row for the key already exists (a duplicate committed first).
    pub(super) async fn store(
        &self,
        db: &impl ConnectionTrait,
        response: &Stored,
        ttl: Duration,
    ) -> Result<bool, DbErr> {
        let now = Utc::now();
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(1));
        let backend = db.get_database_backend();
        let row = [
            Value::from(self.key.clone()),
            Value::from(self.fingerprint.clone()),
            Value::from(i32::from(response.status)),
            Value::from(response.content_type.clone()),
            Value::from(response.location.clone()),
            Value::from(response.body.clone()),
            Value::from(now),
            Value::from(expires),
        ];
        if backend == DbBackend::MySql {
            // No conditional upsert whose affected-row count tells insert from no-op (sqlx
            // sets CLIENT_FOUND_ROWS): drop an expired row, then insert unless a live one
            // exists (InnoDB's locking read waits for a duplicate still uncommitted).
            db.execute_raw(statement(
                backend,
                "DELETE FROM idempotency_key WHERE request_key = $1 AND expires_at <= $2",
                [Value::from(self.key.clone()), Value::from(now)],
            ))
            .await?;
            let mut values = row.to_vec();
            values.push(Value::from(self.key.clone()));
            let done = db
                .execute_raw(statement(
                    backend,
                    "INSERT INTO idempotency_key \
                     (request_key, fingerprint, status, content_type, location, body, created_at, expires_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM DUAL WHERE NOT EXISTS \
                     (SELECT 1 FROM idempotency_key WHERE request_key = $9)",
                    values,
                ))
                .await?;
            return Ok(done.rows_affected() > 0);
        }
        let done = db
            .execute_raw(statement(
                backend,
                "INSERT INTO idempotency_key \
                 (request_key, fingerprint, status, content_type, location, body, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (request_key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 status = excluded.status, content_type = excluded.content_type, \
                 location = excluded.location, body = excluded.body, \
                 created_at = excluded.created_at, expires_at = excluded.expires_at \
                 WHERE idempotency_key.expires_at <= excluded.created_at",
                row,
            ))
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

impl Stored {
    /// The parts of a response worth replaying, or `None` for one that must not be stored.
    pub(super) fn of(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Stored> {
        if status.is_server_error() || status.is_informational() {
            return None;
        }
        let text = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Some(Stored {
            status: status.as_u16(),
            content_type: text(header::CONTENT_TYPE).unwrap_or_default(),
            location: text(header::LOCATION),
            body: body.to_vec(),
        })
    }

    /// The stored response, marked as a replay.
    pub(super) fn replay(self) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let mut response = HttpResponse::build(status);
        response.insert_header((REPLAYED_HEADER, HeaderValue::from_static("true")));
        if let Ok(value) = HeaderValue::from_str(&self.content_type) {
            response.insert_header((header::CONTENT_TYPE, value));
        }
        if let Some(value) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            response.insert_header((header::LOCATION, value));
        }
        response.body(self.body)
    }
}

/// Deletes up to one batch of expired keys; returns how many. Concurrent cleaners skip each
/// other's rows on PostgreSQL (`SKIP LOCKED`) instead of waiting.
pub async fn clean_expired(db: &impl ConnectionTrait) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let lock = if backend == DbBackend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let sql = if backend == DbBackend::MySql {
        // MySQL cannot select from the table it deletes from, but has DELETE … LIMIT.
        format!("DELETE FROM idempotency_key WHERE expires_at <= $1 LIMIT {CLEAN_BATCH}")
    } else {
        format!(
            "DELETE FROM idempotency_key WHERE request_key IN (SELECT request_key FROM \
             idempotency_key WHERE expires_at <= $1 LIMIT {CLEAN_BATCH}{lock})"
        )
    };
    let done = db
        .execute_raw(statement(backend, &sql, [Value::from(Utc::now())]))
        .await?;
    Ok(done.rows_affected())
}

/// Whether this stored key should start a clean-up.
pub(super) fn clean_now() -> bool {
    fastrand::u32(..CLEAN_ONE_IN) == 0
}

/// Starts a clean-up in the background, in a transaction of its own.
pub(super) fn spawn_clean(db: DatabaseConnection, config: super::TxConfig) {
    tokio::spawn(async move {
        let cleaned = super::with_transaction(&db, &config, super::TxPolicy::default(), |tx| {
            Box::pin(async move { clean_expired(tx).await })
        })
        .await;
        match cleaned {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired idempotency keys deleted"),
            Err(e) => tracing::warn!(error = %e, "cleaning expired idempotency keys failed"),
        }
    });
}

/// `$n` placeholders are PostgreSQL's; SQLite and MySQL take `?` (every statement here uses
/// its values in order).
fn statement<I: IntoIterator<Item = Value>>(backend: DbBackend, sql: &str, values: I) -> Statement {
    let sql = match backend {
        DbBackend::Postgres => sql.to_owned(),
        _ => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '$' {
                    out.push('?');
                    while chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
    };
    Statement::from_sql_and_values(backend, sql, values)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderName;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(
                HeaderName::from_static("idempotency-key"),
                HeaderValue::from_bytes(v).expect("a header value"),
            );
        }
        map
    }

    #[test]
    fn a_key_must_be_one_header_of_1_to_255_visible_ascii_characters() {
        let long = vec![b'a'; 256];
        let longest = vec![b'a'; 255];
        let cases: [(&[&[u8]], bool); 7] = [
            (&[b"abc-123_~!"], true),
            (&[&longest], true),
            (&[b""], false),
            (&[&long], false),
            (&[b"with space"], false),
            (&[b"tab\there"], false),
            (&[b"a", b"b"], false),
        ];
        for (values, ok) in cases {
            let read = Idempotency::read(&Method::POST, "/receipts", &headers(values), b"{}");
            match (read, ok) {
                (Ok(Some(_)), true) => {}
                (Err(Error::MalformedIdempotencyKey(text)), false) => {
                    assert!(text.starts_with("Idempotency-Key"), "{text}");
                }
                (other, _) => panic!("{values:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn only_a_post_with_the_header_has_a_key() {
        let get = Idempotency::read(&Method::GET, "/x", &headers(&[b"k"]), b"");
        assert!(matches!(get, Ok(None)));
        let none = Idempotency::read(&Method::POST, "/x", &HeaderMap::new(), b"");
        assert!(matches!(none, Ok(None)));
    }

    #[test]
    fn the_fingerprint_covers_method_path_and_body() {
        let fp = |path: &str, body: &[u8]| {
            Idempotency::read(&Method::POST, path, &headers(&[b"k"]), body)
                .expect("valid")
                .expect("a key")
                .fingerprint
        };
        assert_eq!(fp("/a", b"1"), fp("/a", b"1"));
        assert_ne!(fp("/a", b"1"), fp("/a", b"2"));
        assert_ne!(fp("/a", b"1"), fp("/b", b"1"));
        // Lengths are hashed too: the boundary between path and body cannot move.
        assert_ne!(fp("/a1", b""), fp("/a", b"1"));
    }
}
