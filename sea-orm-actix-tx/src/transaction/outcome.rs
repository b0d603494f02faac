//! A `COMMIT` whose reply was lost (PostgreSQL): the connection broke while `COMMIT` was in flight,
//! so the server may or may not have committed. The rules (`docs/transactions.md`) are in the
//! parent module; this file only learns, before `COMMIT`, the transaction's id and which server
//! run holds it, and afterwards what became of it.
//!
//! * A `READ WRITE` transaction's `BEGIN` message ([`BeginRead`]) assigns its id
//!   (`pg_current_xact_id()`) and reads it with the server's [`Identity`] (its postmaster's start
//!   time and its WAL timeline): no round trip of its own. The id would otherwise be assigned at
//!   the first write and have to be read before `COMMIT`, one round trip more per writing
//!   request; assigned at `BEGIN`, it costs a transaction that ends up writing nothing a commit
//!   record (a WAL flush at `COMMIT`), and changes nothing for one that writes.
//! * A transaction id names a transaction only on the server run that assigned it: a standby
//!   promoted in the old primary's place continues from the ids it replayed and may hand out
//!   again one the old primary had assigned to a transaction that never reached it; a server
//!   restarted after a crash may reuse ids whose WAL was never flushed. A promotion starts a new
//!   timeline, a restart a new postmaster: the identity read afterwards differs, and the id's
//!   status is then not trusted.
//! * After a `COMMIT` that failed without an answer from the server (I/O error, closed
//!   connection: [`reply_lost`]), one simple query on another pooled connection,
//!   inside a `READ ONLY` transaction (so that it also works behind a transaction-mode pooler),
//!   reads the identity of the server it reached, `pg_xact_status(xid)` and, when the request
//!   stored its `Idempotency-Key` record in the transaction, whether that record (this
//!   attempt's own, `idempotency.rs`) is there. The record was committed with the writes and is
//!   replicated with them: it survives a promotion where the id does not. [`decide`] reads the
//!   answer; `in progress` (the old backend has not yet noticed the lost connection) and a
//!   server still in recovery (a standby not yet promoted: what it holds may still grow) are
//!   asked again until they settle, within [`TxConfig::commit_check`](super::TxConfig). No
//!   answer within that time, or another server and no record to look for, is
//!   [`Resolved::Unknown`]: never a guess.

use std::time::Duration;

use sea_orm::sqlx::{self, Postgres, Row as _, postgres::PgRow};
use tokio::time::Instant;

use super::side_conn::SideConn;

/// What is known of a transaction whose `COMMIT` reply was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resolved {
    Committed,
    /// Not committed, said by the server that ran it.
    Aborted,
    /// Not committed, and the server that ran it is gone: another one (a promoted standby, a
    /// restarted server) holds the data now, without the transaction's record.
    AbortedElsewhere,
    /// No answer within the bound, or another server and nothing that survives it to look for.
    Unknown,
}

/// Which server run a transaction id belongs to: the postmaster's start time and the WAL
/// timeline (the first 8 hex digits of a WAL file name). Two answers with the same identity
/// come from one server run, whose ids are never reused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Identity {
    started: String,
    timeline: u32,
}

impl Identity {
    /// The identity read from `pg_postmaster_start_time()::text` and a WAL file name of the
    /// current timeline; `None` when either is missing or the file name is not one.
    pub(super) fn parse(started: Option<String>, wal_file: Option<&str>) -> Option<Identity> {
        let timeline = timeline_of(wal_file?)?;
        Some(Identity {
            started: started.filter(|s| !s.is_empty())?,
            timeline,
        })
    }
}

/// The timeline of a WAL file name (`TTTTTTTTXXXXXXXXYYYYYYYY`, 24 hex digits).
fn timeline_of(wal_file: &str) -> Option<u32> {
    let hex = wal_file.len() == 24 && wal_file.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| u32::from_str_radix(&wal_file[..8], 16).ok())
        .flatten()
}

/// The server's identity as SQL: NULL on a standby, where `pg_walfile_name` cannot run and no
/// transaction writes.
const IDENTITY_SQL: &str = "pg_postmaster_start_time()::text, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END";

/// What a writing transaction is: its id and its server's identity, read in its `BEGIN` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BeforeCommit {
    pub xid: u64,
    /// `None` if the server could not say (then its ids are trusted nowhere).
    pub identity: Option<Identity>,
}

/// What a `READ WRITE` transaction's `BEGIN` message read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Begun {
    /// `None` on a server that cannot take writes (no id can be assigned there).
    pub before: Option<BeforeCommit>,
    /// `transaction_read_only`: on for a standby and for sessions read-only by default.
    pub read_only: bool,
}

/// What a `READ WRITE` transaction's `BEGIN` message carries after `BEGIN …`: one `SELECT` of
/// the mark's lock when there is one (`abandoned.rs`), the transaction's id, assigned here
/// (NULL where none can be: a standby, a read-only transaction), the server's [`Identity`] and
/// `transaction_read_only`. Same message, so no round trip of its own; the id is assigned at
/// `BEGIN` instead of at the first write, which changes nothing for a transaction that writes
/// (`docs/transactions.md`). The values come back as one text column, `|`-separated (NULL as
/// nothing): a simple query's rows are described afresh each time, and each column costs the
/// driver a name, a map entry and a value of its own (bench/NOTES.md, issue 23).
pub(super) struct BeginRead(pub Option<i64>);

impl std::fmt::Display for BeginRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Written piece by piece (no `write!`): a `READ WRITE` transaction's `BEGIN` is
        // formatted for every one, its mark's key differing each time.
        f.write_str("; SELECT format('")?;
        if let Some(key) = self.0 {
            f.write_str("%s|%s|%s|%s|%s', pg_try_advisory_xact_lock_shared(")?;
            f.write_str(itoa::Buffer::new().format(key))?;
            f.write_str("), ")?;
        } else {
            f.write_str("%s|%s|%s|%s', ")?;
        }
        f.write_str(
            "CASE WHEN pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' \
             THEN NULL ELSE pg_current_xact_id()::text END, ",
        )?;
        f.write_str(IDENTITY_SQL)?;
        f.write_str(", current_setting('transaction_read_only'))")
    }
}

/// Reads the row of [`BeginRead`] (its last column).
pub(super) fn begun(row: Option<&PgRow>) -> Result<Begun, sqlx::Error> {
    let row = row.ok_or(sqlx::Error::RowNotFound)?;
    let text: String = row.try_get(row.len().saturating_sub(1))?;
    begun_from(&text).ok_or_else(|| {
        sqlx::Error::Protocol(format!(
            "the BEGIN message's row is not what it asked for: {text:?}"
        ))
    })
}

/// [`begun`] of the column's text: its last four `|`-separated values (an empty one is NULL).
fn begun_from(text: &str) -> Option<Begun> {
    let mut values = text.rsplit('|').map(|v| Some(v).filter(|v| !v.is_empty()));
    let (read_only, wal_file) = (values.next()?, values.next()?);
    let (started, xid) = (values.next()?, values.next()?);
    Some(Begun {
        before: xid.and_then(|t| t.parse().ok()).map(|xid| BeforeCommit {
            xid,
            identity: Identity::parse(started.map(str::to_owned), wal_file),
        }),
        read_only: read_only == Some("on"),
    })
}

/// Whether a failed `COMMIT` may nevertheless have committed: the server did not answer it.
/// An answer, even the session's end (57P01 from a shutdown or a terminated backend, while it
/// waited for the `COMMIT`), means it did not commit; a backend ended while its `COMMIT` waits
/// for a synchronous standby has committed locally and closes the connection without a word,
/// which is a lost reply. (Resolving a 57P01 answer too would turn a plain outage's 503 into
/// 500 `commit_outcome_unknown`, the server being gone when it is asked.)
pub(super) fn reply_lost(err: &sqlx::Error) -> bool {
    !matches!(err, sqlx::Error::Database(_))
}

/// One answer of the server reached after the lost reply.
#[derive(Debug)]
pub(super) struct Seen {
    pub in_recovery: bool,
    pub identity: Option<Identity>,
    /// `pg_xact_status(xid)`; NULL (`None`) for an id too old, or not yet assigned there.
    pub status: Option<String>,
    /// Whether the request's own idempotency record is there; `None` without one to look for.
    pub record: Option<bool>,
}

/// What one answer says: an outcome, or ask again.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Known(Resolved),
    AskAgain,
}

/// Reads one answer. The id's status counts only on the server run that assigned it; anywhere
/// else only the record, committed with the writes, tells.
pub(super) fn decide(before: Option<&Identity>, seen: &Seen) -> Step {
    if seen.in_recovery {
        // A standby (not yet promoted, or a router's wrong turn): not final.
        return Step::AskAgain;
    }
    let same_run = before.is_some() && before == seen.identity.as_ref();
    if same_run {
        return match seen.status.as_deref() {
            Some("committed") => Step::Known(Resolved::Committed),
            Some("aborted") => Step::Known(Resolved::Aborted),
            // `in progress`: the old backend is still finishing.
            Some(_) => Step::AskAgain,
            // NULL: the id is too old to be known (not seconds after it was read).
            None => Step::Known(Resolved::Unknown),
        };
    }
    match seen.record {
        Some(true) => Step::Known(Resolved::Committed),
        Some(false) => Step::Known(Resolved::AbortedElsewhere),
        None => Step::Known(Resolved::Unknown),
    }
}

/// Asks the server, on another connection of `pool`, what became of the transaction read as
/// `before`, waiting at most `bound` in all. `record` is an SQL condition true when the
/// request's idempotency record is there (`Idempotency::record_sql`).
pub(super) async fn resolve(
    pool: &sqlx::Pool<Postgres>,
    before: &BeforeCommit,
    record: Option<&str>,
    bound: Duration,
) -> Resolved {
    let deadline = Instant::now() + bound;
    let xid = before.xid;
    // The id is a number we parsed, the start time is escaped and `record` is built from
    // escaped literals: formatting them into the statement is safe. The status is asked only
    // of the postmaster that assigned the id (elsewhere an id not yet assigned is an error,
    // not a NULL; and the answer would not count).
    let same_postmaster = match &before.identity {
        Some(identity) => format!(
            "pg_postmaster_start_time()::text = '{}'",
            identity.started.replace('\'', "''")
        ),
        None => "false".to_owned(),
    };
    let sql = format!(
        "BEGIN READ ONLY; SELECT pg_is_in_recovery(), {IDENTITY_SQL}, \
         CASE WHEN {same_postmaster} THEN pg_xact_status('{xid}'::xid8)::text END, {record}; \
         COMMIT",
        record = record.unwrap_or("NULL::boolean"),
    );
    let mut pause = Duration::from_millis(2);
    loop {
        let asked = tokio::time::timeout_at(deadline, async {
            // Past the deadline its connection is closed, not handed back (`side_conn.rs`).
            let rows = SideConn::fetch_all(pool, sqlx::AssertSqlSafe(sql.clone())).await?;
            rows.first().map(seen).transpose()
        })
        .await;
        match asked {
            Ok(Ok(Some(seen))) => match decide(before.identity.as_ref(), &seen) {
                Step::Known(resolved) => return resolved,
                Step::AskAgain => {}
            },
            // A query error (a server going away, not yet there): try again.
            Ok(Ok(None)) | Ok(Err(_)) => {}
            Err(_) => return Resolved::Unknown,
        }
        if Instant::now() + pause >= deadline {
            return Resolved::Unknown;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn seen(row: &PgRow) -> Result<Seen, sqlx::Error> {
    let wal_file: Option<String> = row.try_get(2)?;
    Ok(Seen {
        in_recovery: row.try_get(0)?,
        identity: Identity::parse(row.try_get(1)?, wal_file.as_deref()),
        status: row.try_get(3)?,
        record: row.try_get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_write_begin_reads_its_id_and_identity_in_the_same_message() {
        let marked = BeginRead(Some(42)).to_string();
        assert!(
            marked.starts_with(
                "; SELECT format('%s|%s|%s|%s|%s', pg_try_advisory_xact_lock_shared(42), CASE WHEN"
            ),
            "{marked}"
        );
        let unmarked = BeginRead(None).to_string();
        assert!(
            unmarked.starts_with("; SELECT format('%s|%s|%s|%s', CASE WHEN"),
            "{unmarked}"
        );
        for sql in [&marked, &unmarked] {
            assert!(sql.contains("ELSE pg_current_xact_id()::text END"), "{sql}");
            assert!(sql.contains(IDENTITY_SQL), "{sql}");
            assert!(
                sql.ends_with(", current_setting('transaction_read_only'))"),
                "the four values `begun` reads are the last: {sql}"
            );
            assert_eq!(sql.matches(';').count(), 1, "one statement: {sql}");
        }
    }

    #[test]
    fn the_begin_message_s_row_is_read_from_its_last_four_values() {
        let identity = Identity {
            started: "2026-12-04 21:13:37.5+00".to_owned(),
            timeline: 1,
        };
        let primary = "t|731|2026-12-04 21:13:37.5+00|000000010000000000000002|off";
        assert_eq!(
            begun_from(primary),
            Some(Begun {
                before: Some(BeforeCommit {
                    xid: 731,
                    identity: Some(identity.clone()),
                }),
                read_only: false,
            })
        );
        let unmarked = "731|2026-12-04 21:13:37.5+00|000000010000000000000002|off";
        assert_eq!(begun_from(unmarked), begun_from(primary));
        // A standby: no id, no WAL file, read-only.
        let standby = "t||2026-12-04 21:13:37.5+00||on";
        assert_eq!(
            begun_from(standby),
            Some(Begun {
                before: None,
                read_only: true,
            })
        );
        // An id without a usable identity is kept, its identity unknown.
        assert_eq!(
            begun_from("731|2026-12-04 21:13:37.5+00||off").and_then(|b| b.before),
            Some(BeforeCommit {
                xid: 731,
                identity: None,
            })
        );
        for short in ["", "off", "000000010000000000000002|off", "x|y|off"] {
            assert_eq!(begun_from(short), None, "{short:?}");
        }
    }

    #[test]
    fn the_timeline_is_the_first_eight_hex_digits_of_a_wal_file_name() {
        let cases = [
            ("000000010000000000000001", Some(1)),
            ("0000000A00000003000000FF", Some(10)),
            ("FFFFFFFF0000000000000000", Some(u32::MAX)),
            ("00000001000000000000001", None),
            ("0000000100000000000000011", None),
            ("00000001000000000000000G", None),
            ("", None),
        ];
        for (name, timeline) in cases {
            assert_eq!(timeline_of(name), timeline, "{name:?}");
        }
        assert_eq!(
            Identity::parse(None, Some("000000010000000000000001")),
            None
        );
        assert_eq!(Identity::parse(Some("t".into()), None), None);
    }

    fn identity(started: &str, timeline: u32) -> Option<Identity> {
        Some(Identity {
            started: started.to_owned(),
            timeline,
        })
    }

    fn seen(identity: Option<Identity>, status: Option<&str>, record: Option<bool>) -> Seen {
        Seen {
            in_recovery: false,
            identity,
            status: status.map(str::to_owned),
            record,
        }
    }

    #[test]
    fn on_the_server_run_that_assigned_it_the_ids_status_decides() {
        let before = identity("t0", 1);
        let cases = [
            (Some("committed"), Step::Known(Resolved::Committed)),
            (Some("aborted"), Step::Known(Resolved::Aborted)),
            (Some("in progress"), Step::AskAgain),
            (None, Step::Known(Resolved::Unknown)),
        ];
        for (status, step) in cases {
            for record in [None, Some(false), Some(true)] {
                let answer = seen(before.clone(), status, record);
                assert_eq!(
                    decide(before.as_ref(), &answer),
                    step,
                    "{status:?} {record:?}"
                );
            }
        }
    }

    #[test]
    fn on_another_server_run_only_the_record_tells_never_the_id() {
        let before = identity("t0", 1);
        let elsewhere = [
            (identity("t0", 2), "promoted: a new timeline"),
            (identity("t1", 1), "restarted: a new postmaster"),
            (None, "the server could not say"),
        ];
        for (other, why) in elsewhere {
            for status in [Some("committed"), Some("aborted"), None] {
                let cases = [
                    (Some(true), Resolved::Committed),
                    (Some(false), Resolved::AbortedElsewhere),
                    (None, Resolved::Unknown),
                ];
                for (record, resolved) in cases {
                    let answer = seen(other.clone(), status, record);
                    assert_eq!(
                        decide(before.as_ref(), &answer),
                        Step::Known(resolved),
                        "{why}: {status:?} {record:?}"
                    );
                }
            }
        }
        let unknown_before = seen(identity("t0", 1), Some("committed"), None);
        assert_eq!(
            decide(None, &unknown_before),
            Step::Known(Resolved::Unknown),
            "an identity not read before COMMIT matches nothing"
        );
    }

    #[test]
    fn a_standby_is_asked_again_until_it_is_promoted() {
        let before = identity("t0", 1);
        let standby = Seen {
            in_recovery: true,
            ..seen(None, None, Some(false))
        };
        assert_eq!(decide(before.as_ref(), &standby), Step::AskAgain);
    }
}
