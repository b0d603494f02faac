//! What happens once the handler has answered: commit or roll back, re-run, and which answer the
//! client gets. Pure functions of what the attempt saw, so the rules are read and tested here
//! without a database; the middleware in the parent module only carries them out.

use super::failure::{DbFailure, FailureKind};

/// Whether the attempt's transaction may commit: the handler answered below 400, no handle to
/// the transaction outlived the handler (a leak: writes would run after the answer), and the
/// client is still there to receive the answer.
pub(super) fn may_commit(status_ok: bool, leaked: bool, client_gone: bool) -> bool {
    status_ok && !leaked && !client_gone
}

/// What the attempt saw, once its transaction has ended.
#[derive(Debug)]
pub(super) struct Ended<'a> {
    /// The transaction was meant to commit ([`may_commit`]).
    pub meant_to_commit: bool,
    /// The first failure of the attempt: a statement, the idempotency store or the `COMMIT`.
    pub failure: Option<&'a DbFailure>,
    pub leaked: bool,
    pub client_gone: bool,
    /// The attempt ran on the read replica.
    pub on_replica: bool,
    /// Re-runs already made, and how many are allowed (`DB_TX_MAX_RETRIES`).
    pub retries: u32,
    pub max_retries: u32,
    /// Time is left of `DB_FAILOVER_RETRY_MS`, counted from the request's first primary lost.
    pub failover_left: bool,
}

/// The next step of the request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Run the whole request again; `from_primary` when the replica failed it.
    Rerun { from_primary: bool },
    /// Nothing was committed: answer the failure (the handler's success is never sent).
    Fail,
    /// A handle outlived its request: rolled back, 500 `internal`.
    Internal,
    /// The client went away before the commit: rolled back, 499 for the log.
    ClientClosed,
    /// The handler's own answer: committed, or a handler error that rolled back.
    Answer,
}

/// The step after an attempt (see [`Next`]).
///
/// * A primary lost before `COMMIT` (or at a `COMMIT` known not to have committed) is re-run while `DB_FAILOVER_RETRY_MS` lasts, on its own
///   budget (not `DB_TX_MAX_RETRIES`).
/// * A serialization failure or deadlock, or a read that the replica failed by going away, is
///   re-run while retries are left and the client is still there.
/// * Otherwise a failure replaces a success (the commit did not happen) and answers a retryable
///   conflict as such; a handler that already answered an error keeps its answer.
/// * A leak answers 500, a client that left gets no commit.
pub(super) fn next(ended: &Ended<'_>) -> Next {
    let replica_failed = ended.on_replica && ended.failure.is_some();
    match ended.failure {
        // The primary went away before COMMIT, or at a COMMIT known not to have committed (a
        // failure at COMMIT is `PrimaryLost` only then, `lazy.rs`): nothing was committed, and
        // a new primary may be there a moment later.
        Some(f)
            if f.kind == FailureKind::PrimaryLost
                && !replica_failed
                && ended.failover_left
                && !ended.client_gone =>
        {
            Next::Rerun {
                from_primary: false,
            }
        }
        Some(f)
            if (f.is_retryable()
                || replica_failed
                    && matches!(f.kind, FailureKind::Unavailable | FailureKind::PrimaryLost))
                && ended.retries < ended.max_retries
                && !ended.client_gone =>
        {
            Next::Rerun {
                from_primary: replica_failed,
            }
        }
        // A primary lost is answered 503 even when the handler turned it into an error of its
        // own: the handler cannot tell 25006 from a bug.
        Some(f)
            if ended.meant_to_commit || f.is_retryable() || f.kind == FailureKind::PrimaryLost =>
        {
            Next::Fail
        }
        _ if ended.leaked => Next::Internal,
        _ if ended.client_gone => Next::ClientClosed,
        _ => Next::Answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind) -> DbFailure {
        DbFailure {
            kind,
            message: String::new(),
        }
    }

    fn ended(failure: Option<&DbFailure>) -> Ended<'_> {
        Ended {
            meant_to_commit: true,
            failure,
            leaked: false,
            client_gone: false,
            on_replica: false,
            retries: 0,
            max_retries: 3,
            failover_left: true,
        }
    }

    #[test]
    fn a_primary_lost_is_re_run_on_its_own_budget_then_answered() {
        let lost = failure(FailureKind::PrimaryLost);
        let spent_retries = Ended {
            retries: 3,
            ..ended(Some(&lost))
        };
        assert_eq!(
            next(&spent_retries),
            Next::Rerun {
                from_primary: false
            },
            "DB_TX_MAX_RETRIES does not count"
        );
        let window_over = Ended {
            failover_left: false,
            ..ended(Some(&lost))
        };
        assert_eq!(next(&window_over), Next::Fail, "then 503");
        let handler_error = Ended {
            failover_left: false,
            meant_to_commit: false,
            ..ended(Some(&lost))
        };
        assert_eq!(
            next(&handler_error),
            Next::Fail,
            "503, not the handler's 500"
        );
        let gone = Ended {
            client_gone: true,
            ..ended(Some(&lost))
        };
        assert_eq!(next(&gone), Next::Fail, "nobody to answer");
        let on_replica = Ended {
            on_replica: true,
            ..ended(Some(&lost))
        };
        assert_eq!(
            next(&on_replica),
            Next::Rerun { from_primary: true },
            "a replica keeps its own fallback: the primary"
        );
    }

    #[test]
    fn only_a_clean_answer_below_400_to_a_present_client_commits() {
        assert!(may_commit(true, false, false));
        assert!(!may_commit(false, false, false), "4xx/5xx roll back");
        assert!(!may_commit(true, true, false), "a leaked handle rolls back");
        assert!(
            !may_commit(true, false, true),
            "a client that left gets no commit"
        );
    }

    #[test]
    fn a_committed_attempt_answers_the_handlers_response() {
        assert_eq!(next(&ended(None)), Next::Answer);
    }

    #[test]
    fn conflicts_are_re_run_until_the_retries_are_spent_then_answered() {
        for kind in [
            FailureKind::SerializationFailure,
            FailureKind::Deadlock,
            FailureKind::LockWaitTimeout,
        ] {
            let f = failure(kind);
            let mut attempt = ended(Some(&f));
            assert_eq!(
                next(&attempt),
                Next::Rerun {
                    from_primary: false
                }
            );
            attempt.retries = 3;
            assert_eq!(next(&attempt), Next::Fail, "retries spent");
            attempt.meant_to_commit = false;
            assert_eq!(next(&attempt), Next::Fail, "even after a handler error");
        }
    }

    #[test]
    fn a_failure_replaces_a_success_but_not_a_handlers_own_error() {
        let unique = failure(FailureKind::UniqueViolation(None));
        let swallowed = ended(Some(&unique));
        assert_eq!(
            next(&swallowed),
            Next::Fail,
            "a 2xx never follows a failed statement"
        );
        let answered = Ended {
            meant_to_commit: false,
            ..ended(Some(&unique))
        };
        assert_eq!(next(&answered), Next::Answer, "the handler's 4xx stands");
    }

    #[test]
    fn a_read_the_replica_lost_is_re_run_on_the_primary() {
        let gone = failure(FailureKind::Unavailable);
        let on_replica = Ended {
            on_replica: true,
            ..ended(Some(&gone))
        };
        assert_eq!(next(&on_replica), Next::Rerun { from_primary: true });
        let on_primary = ended(Some(&gone));
        assert_eq!(
            next(&on_primary),
            Next::Fail,
            "the primary going away is a 503"
        );
    }

    #[test]
    fn a_client_that_left_is_never_re_run_and_a_leak_is_internal() {
        let conflict = failure(FailureKind::SerializationFailure);
        let gone = Ended {
            client_gone: true,
            meant_to_commit: false,
            ..ended(Some(&conflict))
        };
        assert_eq!(next(&gone), Next::Fail);
        let left = Ended {
            client_gone: true,
            meant_to_commit: false,
            ..ended(None)
        };
        assert_eq!(next(&left), Next::ClientClosed);
        let leaked = Ended {
            leaked: true,
            meant_to_commit: false,
            ..ended(None)
        };
        assert_eq!(next(&leaked), Next::Internal);
    }
}
