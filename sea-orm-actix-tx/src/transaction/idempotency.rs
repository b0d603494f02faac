//! `Idempotency-Key` on `POST` (`docs/scale-out.md`, the IETF httpapi idempotency-key draft): the
//! mechanics behind the rule in the parent module. Nothing here knows the service's domain: any `POST`
//! route wrapped in [`Transactional`](super::Transactional) gets it.
//!
//! * The key (1..=255 visible ASCII characters, else 422 `validation_failed` naming the header),
//!   its scope and a fingerprint of the request (SHA-256 of method, path and query, body and
//!   `Content-Type`) are read once per request.
//! * A key belongs to a scope: the string the service's
//!   [`idempotency_scope`](crate::LayerBuilder::idempotency_scope) function returns for the
//!   request (the authenticated user or API client), or [`DEFAULT_SCOPE`] (the empty string)
//!   when it returns `None` or none is given. The row is found by (scope, key): the same key in
//!   two scopes is two keys, and a client never gets the response stored for another scope's
//!   key. A scope longer than [`MAX_SCOPE_LEN`] bytes is stored as `sha256:` and its digest
//!   in hex.
//! * Every attempt first claims the key inside its own transaction. On PostgreSQL it takes a
//!   transaction-scoped advisory lock on (scope, key) without waiting
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
use chrono::{DateTime, SecondsFormat, SubsecRound as _, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, Value};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::headers::{IDEMPOTENT_REPLAYED, IdempotencyKey};

use super::Tx;

pub const HEADER: &str = IdempotencyKey::NAME;
pub const REPLAYED_HEADER: &str = IDEMPOTENT_REPLAYED;

/// The scope of a key when the service gives no scope function, or it returns `None` for the
/// request: one scope shared by every client (a service without authentication).
pub const DEFAULT_SCOPE: &str = "";

/// The longest scope stored as it is, in bytes (the column is `varbinary(255)` on MariaDB/MySQL);
/// a longer one is stored as `sha256:` and its hex digest.
pub const MAX_SCOPE_LEN: usize = 255;

/// A stored key is cleaned up after one stored key in this many (on average).
pub const CLEAN_ONE_IN: u32 = 16;
/// Rows deleted per clean-up transaction.
const CLEAN_BATCH: u64 = 100;

/// The scope, key and fingerprint of one request.
#[derive(Clone, Debug)]
pub(super) struct Idempotency {
    scope: String,
    key: String,
    fingerprint: String,
    /// The advisory lock's id: the first 8 bytes of the SHA-256 of (scope, key).
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
    /// The request's scope, key and fingerprint; `None` without the header or on a method other
    /// than `POST`. `scope` is asked only when there is a key.
    pub(super) fn read(
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
        scope: impl FnOnce() -> Option<String>,
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
        // The Content-Type as sent (none and empty are the same): the same bytes sent as
        // another media type are another request, answered differently (415, or parsed).
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let fingerprint = hex(&length_prefixed(&[
            method.as_str().as_bytes(),
            path_and_query.as_bytes(),
            body,
            content_type,
        ]));
        let scope = stored_scope(scope().unwrap_or_else(|| DEFAULT_SCOPE.to_owned()));
        let digest = length_prefixed(&[scope.as_bytes(), key.as_bytes()]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Ok(Some(Idempotency {
            scope,
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
                 WHERE scope = $1 AND request_key = $2 AND expires_at > $3",
                [
                    Value::from(self.scope.clone()),
                    Value::from(self.key.clone()),
                    Value::from(Utc::now()),
                ],
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

    /// Stores `response` for the key in `db` (the request's transaction) and returns the row
    /// written, `Ok(None)` when a live row for the key already exists (a duplicate committed
    /// first).
    pub(super) async fn store(
        &self,
        db: &impl ConnectionTrait,
        response: &Stored,
        ttl: Duration,
    ) -> Result<Option<Record>, DbErr> {
        // Microseconds, the column's precision: the row can be found again by this value.
        let now = Utc::now().trunc_subsecs(6);
        let record = Record {
            idempotency: self.clone(),
            created_at: now,
        };
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(1));
        let backend = db.get_database_backend();
        let row = [
            Value::from(self.scope.clone()),
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
                "DELETE FROM idempotency_key \
                 WHERE scope = $1 AND request_key = $2 AND expires_at <= $3",
                [
                    Value::from(self.scope.clone()),
                    Value::from(self.key.clone()),
                    Value::from(now),
                ],
            ))
            .await?;
            let mut values = row.to_vec();
            values.push(Value::from(self.scope.clone()));
            values.push(Value::from(self.key.clone()));
            let done = db
                .execute_raw(statement(
                    backend,
                    "INSERT INTO idempotency_key \
                     (scope, request_key, fingerprint, status, content_type, location, body, created_at, expires_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM DUAL WHERE NOT EXISTS \
                     (SELECT 1 FROM idempotency_key WHERE scope = $10 AND request_key = $11)",
                    values,
                ))
                .await?;
            return Ok((done.rows_affected() > 0).then_some(record));
        }
        let done = db
            .execute_raw(statement(
                backend,
                "INSERT INTO idempotency_key \
                 (scope, request_key, fingerprint, status, content_type, location, body, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (scope, request_key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 status = excluded.status, content_type = excluded.content_type, \
                 location = excluded.location, body = excluded.body, \
                 created_at = excluded.created_at, expires_at = excluded.expires_at \
                 WHERE idempotency_key.expires_at <= excluded.created_at",
                row,
            ))
            .await?;
        Ok((done.rows_affected() > 0).then_some(record))
    }
}

/// The row one attempt stored, committed with its writes: found on whichever server holds the
/// database after a promotion, it tells whether that attempt committed (`outcome.rs`). Its
/// `created_at` (to the microsecond) tells it from a row another attempt with the same key
/// stored.
#[derive(Clone, Debug)]
pub(super) struct Record {
    idempotency: Idempotency,
    created_at: DateTime<Utc>,
}

impl Record {
    /// An SQL condition (PostgreSQL, with the values as literals, for a simple query) true when
    /// the row is there.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn exists_sql(&self) -> String {
        let key = &self.idempotency;
        format!(
            "EXISTS (SELECT 1 FROM idempotency_key WHERE scope = {} AND request_key = {} \
             AND fingerprint = {} AND created_at = {})",
            literal(&key.scope),
            literal(&key.key),
            literal(&key.fingerprint),
            literal(&self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
        )
    }
}

/// `text` as a PostgreSQL escape-string literal, which reads the same whatever
/// `standard_conforming_strings` says (a key is visible ASCII, a scope any text).
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
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
        // The primary key (scope, request_key) as a row value: PostgreSQL and SQLite ≥ 3.15.
        format!(
            "DELETE FROM idempotency_key WHERE (scope, request_key) IN (SELECT scope, request_key \
             FROM idempotency_key WHERE expires_at <= $1 LIMIT {CLEAN_BATCH}{lock})"
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

/// The SHA-256 of `parts`, each preceded by its length (so no boundary between two parts can
/// move).
fn length_prefixed(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// The scope as stored: itself up to [`MAX_SCOPE_LEN`] bytes, else `sha256:` and its digest.
fn stored_scope(scope: String) -> String {
    if scope.len() <= MAX_SCOPE_LEN {
        scope
    } else {
        format!("sha256:{}", hex(&Sha256::digest(scope.as_bytes())))
    }
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
            let read =
                Idempotency::read(&Method::POST, "/receipts", &headers(values), b"{}", || None);
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
        let get = Idempotency::read(&Method::GET, "/x", &headers(&[b"k"]), b"", || None);
        assert!(matches!(get, Ok(None)));
        let none = Idempotency::read(&Method::POST, "/x", &HeaderMap::new(), b"", || None);
        assert!(matches!(none, Ok(None)));
    }

    fn read(
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
        scope: Option<&str>,
    ) -> Idempotency {
        let mut headers = headers(&[b"k"]);
        if let Some(content_type) = content_type {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(content_type).expect("a header value"),
            );
        }
        Idempotency::read(&Method::POST, path, &headers, body, || {
            scope.map(str::to_owned)
        })
        .expect("valid")
        .expect("a key")
    }

    #[test]
    fn the_fingerprint_covers_method_path_body_and_content_type() {
        let json = Some("application/json");
        let fp = |path: &str, body: &[u8]| read(path, json, body, None).fingerprint;
        assert_eq!(fp("/a", b"1"), fp("/a", b"1"));
        assert_ne!(fp("/a", b"1"), fp("/a", b"2"));
        assert_ne!(fp("/a", b"1"), fp("/b", b"1"));
        // Lengths are hashed too: the boundary between path and body cannot move.
        assert_ne!(fp("/a1", b""), fp("/a", b"1"));
        let typed = |content_type| read("/a", content_type, b"{}", None).fingerprint;
        assert_ne!(typed(json), typed(Some("text/plain")));
        assert_ne!(typed(json), typed(None));
        assert_eq!(
            typed(None),
            typed(Some("")),
            "no Content-Type is an empty one"
        );
        // The scope is not part of the request: it picks the row, not the fingerprint.
        assert_eq!(
            read("/a", json, b"1", Some("alice")).fingerprint,
            read("/a", json, b"1", Some("bob")).fingerprint
        );
    }

    #[test]
    fn the_scope_is_the_functions_or_the_default_and_a_long_one_is_hashed() {
        assert_eq!(read("/a", None, b"", None).scope, DEFAULT_SCOPE);
        assert_eq!(read("/a", None, b"", Some("alice")).scope, "alice");
        let longest = "s".repeat(MAX_SCOPE_LEN);
        assert_eq!(read("/a", None, b"", Some(&longest)).scope, longest);
        let long = "s".repeat(MAX_SCOPE_LEN + 1);
        let stored = read("/a", None, b"", Some(&long)).scope;
        assert!(
            stored.starts_with("sha256:") && stored.len() == 71,
            "{stored}"
        );
        let other = read("/a", None, b"", Some(&"t".repeat(MAX_SCOPE_LEN + 1))).scope;
        assert_ne!(stored, other);
    }

    #[test]
    fn a_record_is_looked_for_with_escaped_literals_to_the_microsecond() {
        assert_eq!(literal("plain"), "E'plain'");
        assert_eq!(literal(r"it's a \ back"), r"E'it''s a \\ back'");
        let record = Record {
            idempotency: read("/a", None, b"", Some("o'brien")),
            created_at: DateTime::from_timestamp(1_800_000_000, 123_456_000).expect("a time"),
        };
        let sql = record.exists_sql();
        assert!(sql.contains("scope = E'o''brien'"), "{sql}");
        assert!(sql.contains("request_key = E'k'"), "{sql}");
        assert!(
            sql.contains("created_at = E'2027-01-15T08:00:00.123456Z'"),
            "{sql}"
        );
    }

    #[test]
    fn the_advisory_lock_is_per_scope_and_key() {
        let lock = |scope| read("/a", None, b"", scope).lock_id;
        assert_eq!(lock(Some("alice")), lock(Some("alice")));
        assert_ne!(lock(Some("alice")), lock(Some("bob")));
        assert_ne!(lock(None), lock(Some("alice")));
    }
}
