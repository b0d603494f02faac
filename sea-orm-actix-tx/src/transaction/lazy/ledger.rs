//! What the attempt's transaction owes its `COMMIT`: the savepoints open on the server and the
//! first failure recorded at each nesting level, so that a failure inside a savepoint that was
//! rolled back is forgiven while any other one still forbids the commit.
//!
//! Level 0 is the request's transaction outside any savepoint; level `n` is inside the `n`-th
//! nested savepoint. A statement's failure belongs to the innermost savepoint open when it ran
//! (whichever handle ran it: the server put it there). Rolling back to the savepoint of level `n`
//! forgives the failures of levels `n` and deeper: their work is undone. Releasing it (a nested
//! commit) hands its failures to level `n - 1`: the work is kept, and so is what went wrong in
//! it. A failure that dooms the whole transaction ([`DbFailure::dooms_transaction`]: a
//! serialization failure, a deadlock, a lost connection) is recorded at level 0, never forgiven.

use super::super::failure::DbFailure;

#[derive(Default)]
pub(super) struct Ledger {
    /// The first failure at each level (with its order, so that the earliest one answers):
    /// `failures[0]` outside any savepoint, `failures[n]` inside the `n`-th. One more entry than
    /// `open`.
    failures: Vec<Option<(u64, DbFailure)>>,
    /// How many failures were recorded, to order them.
    recorded: u64,
    /// The savepoints open on the server, outermost first: the one at index `n - 1` is level `n`.
    open: Vec<u64>,
    /// Savepoints whose handle was dropped without a commit or rollback: rolled back before the
    /// transaction's next round trip.
    dropped: Vec<u64>,
    /// The id of the next savepoint.
    next_id: u64,
}

/// How a savepoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// `RELEASE SAVEPOINT`: its work (and its failures) belong to the enclosing level.
    Released,
    /// `ROLLBACK TO SAVEPOINT`: its work is undone and its failures forgiven.
    RolledBack,
}

impl Ledger {
    pub(super) fn new() -> Ledger {
        Ledger {
            failures: vec![None],
            ..Ledger::default()
        }
    }

    /// How many savepoints are open on the server (the level of the innermost).
    pub(super) fn depth(&self) -> usize {
        self.open.len()
    }

    /// The level of the savepoint `id`, while it is open.
    pub(super) fn level_of(&self, id: u64) -> Option<usize> {
        self.open.iter().position(|&open| open == id).map(|i| i + 1)
    }

    /// A new savepoint's id, before its `SAVEPOINT` is sent.
    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The savepoint `id` was set on the server, one level deeper than the innermost.
    pub(super) fn begun(&mut self, id: u64) {
        self.open.push(id);
        self.failures.push(None);
    }

    /// The handle of the savepoint `id` was dropped without a commit or rollback.
    pub(super) fn dropped(&mut self, id: u64) {
        self.dropped.push(id);
    }

    /// The outermost level whose savepoint was dropped and is still open: rolling back to it
    /// undoes every dropped one (and any deeper). The drops are taken.
    pub(super) fn take_dropped(&mut self) -> Option<usize> {
        let dropped = std::mem::take(&mut self.dropped);
        dropped.iter().filter_map(|&id| self.level_of(id)).min()
    }

    /// The savepoint of `level` ended on the server (and with it every deeper one).
    pub(super) fn ended(&mut self, level: usize, how: End) {
        debug_assert!(level >= 1, "level 0 is the transaction itself");
        let level = level.max(1);
        if level > self.open.len() {
            return;
        }
        if how == End::Released {
            self.hand_over(level);
        }
        self.failures.truncate(level);
        self.open.truncate(level - 1);
        let open = &self.open;
        self.dropped.retain(|id| open.contains(id));
    }

    /// A `RELEASE SAVEPOINT` of `id` (at `level`) failed: the savepoint is still on the server
    /// and is rolled back before the next round trip, but the handler meant to keep its work, so
    /// its failures, and `failure`, go to the enclosing level, which that rollback does not
    /// forgive.
    pub(super) fn release_failed(&mut self, id: u64, level: usize, failure: DbFailure) {
        let level = level.clamp(1, self.depth());
        self.hand_over(level);
        self.record_at(failure, level - 1);
        self.dropped.push(id);
    }

    /// Moves the failures of `level` and deeper to `level - 1`, the earliest one kept.
    fn hand_over(&mut self, level: usize) {
        let (enclosing, inner) = self.failures.split_at_mut(level);
        let enclosing = &mut enclosing[level - 1];
        for failure in inner.iter_mut().filter_map(Option::take) {
            if enclosing.as_ref().is_none_or(|(at, _)| failure.0 < *at) {
                *enclosing = Some(failure);
            }
        }
    }

    /// How many open savepoints still have a handle (were not dropped).
    pub(super) fn held(&self) -> usize {
        let dropped = &self.dropped;
        self.open.iter().filter(|id| !dropped.contains(id)).count()
    }

    /// Records a statement's failure at the innermost level (at level 0 if it dooms the whole
    /// transaction), unless that level already has one.
    pub(super) fn record(&mut self, failure: DbFailure) {
        let level = self.depth();
        self.record_at(failure, level);
    }

    /// Records `failure` at `level` (at level 0 if it dooms the whole transaction), unless that
    /// level already has one.
    pub(super) fn record_at(&mut self, failure: DbFailure, level: usize) {
        let level = if failure.dooms_transaction() {
            0
        } else {
            level.min(self.depth())
        };
        self.recorded += 1;
        let order = self.recorded;
        self.failures[level].get_or_insert((order, failure));
    }

    /// The earliest failure not forgiven: what forbids the commit.
    pub(super) fn failure(&self) -> Option<&DbFailure> {
        self.failures
            .iter()
            .flatten()
            .min_by_key(|(order, _)| *order)
            .map(|(_, failure)| failure)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::failure::FailureKind;
    use super::*;

    fn failure(kind: FailureKind, message: &str) -> DbFailure {
        DbFailure {
            kind,
            message: message.to_owned(),
        }
    }

    fn unique(message: &str) -> DbFailure {
        failure(FailureKind::UniqueViolation(None), message)
    }

    fn open(ledger: &mut Ledger) -> u64 {
        let id = ledger.next_id();
        ledger.begun(id);
        id
    }

    fn first(ledger: &Ledger) -> Option<&str> {
        ledger.failure().map(|f| f.message.as_str())
    }

    #[test]
    fn a_failure_outside_any_savepoint_is_never_forgiven() {
        let mut ledger = Ledger::new();
        ledger.record(unique("outside"));
        let sp = open(&mut ledger);
        ledger.record(unique("inside"));
        ledger.ended(ledger.level_of(sp).expect("open"), End::RolledBack);
        assert_eq!(first(&ledger), Some("outside"));
    }

    #[test]
    fn rolling_back_forgives_the_savepoint_and_every_deeper_level() {
        let mut ledger = Ledger::new();
        let outer = open(&mut ledger);
        ledger.record(unique("level 1"));
        let _inner = open(&mut ledger);
        ledger.record(unique("level 2"));
        assert_eq!(first(&ledger), Some("level 1"));
        ledger.ended(1, End::RolledBack);
        assert_eq!(first(&ledger), None);
        assert_eq!((ledger.depth(), ledger.level_of(outer)), (0, None));
    }

    #[test]
    fn releasing_hands_the_failure_to_the_enclosing_level() {
        let mut ledger = Ledger::new();
        let _outer = open(&mut ledger);
        let _inner = open(&mut ledger);
        ledger.record(unique("level 2"));
        ledger.ended(2, End::Released);
        assert_eq!((ledger.depth(), first(&ledger)), (1, Some("level 2")));
        ledger.ended(1, End::Released);
        assert_eq!((ledger.depth(), first(&ledger)), (0, Some("level 2")));
    }

    #[test]
    fn a_released_failure_is_forgiven_when_the_enclosing_savepoint_rolls_back() {
        let mut ledger = Ledger::new();
        let _outer = open(&mut ledger);
        let _inner = open(&mut ledger);
        ledger.record(unique("level 2"));
        ledger.ended(2, End::Released);
        ledger.ended(1, End::RolledBack);
        assert_eq!(first(&ledger), None);
    }

    #[test]
    fn the_earliest_failure_answers_after_a_release() {
        let mut ledger = Ledger::new();
        let _outer = open(&mut ledger);
        let _inner = open(&mut ledger);
        ledger.record(unique("first, at level 2"));
        ledger.ended(2, End::RolledBack);
        ledger.record(unique("second, at level 1"));
        let _again = open(&mut ledger);
        ledger.record(unique("third, at level 2"));
        ledger.ended(2, End::Released);
        assert_eq!(first(&ledger), Some("second, at level 1"));
    }

    #[test]
    fn a_failure_that_dooms_the_transaction_survives_every_rollback() {
        let mut ledger = Ledger::new();
        let _sp = open(&mut ledger);
        ledger.record(unique("constraint, level 1"));
        ledger.record(failure(FailureKind::Deadlock, "deadlock"));
        ledger.ended(1, End::RolledBack);
        assert_eq!(first(&ledger), Some("deadlock"));
    }

    #[test]
    fn a_failed_release_keeps_the_failures_through_the_rollback_that_follows() {
        let mut ledger = Ledger::new();
        let sp = open(&mut ledger);
        ledger.record(unique("inside"));
        ledger.release_failed(sp, 1, failure(FailureKind::Other, "RELEASE failed"));
        assert_eq!(ledger.held(), 0);
        assert_eq!(ledger.take_dropped(), Some(1));
        ledger.ended(1, End::RolledBack);
        assert_eq!(first(&ledger), Some("inside"));
    }

    #[test]
    fn dropped_savepoints_roll_back_from_the_outermost() {
        let mut ledger = Ledger::new();
        let _a = open(&mut ledger);
        let b = open(&mut ledger);
        let c = open(&mut ledger);
        ledger.dropped(c);
        ledger.dropped(b);
        assert_eq!(ledger.take_dropped(), Some(2));
        assert_eq!(ledger.take_dropped(), None);
        ledger.ended(2, End::RolledBack);
        assert_eq!(ledger.depth(), 1);
        // A drop that an outer end already covered is nothing to do.
        let d = open(&mut ledger);
        ledger.dropped(d);
        ledger.ended(1, End::RolledBack);
        assert_eq!(ledger.take_dropped(), None);
    }
}
