//! The leak warning: a transaction still open `DB_LEAK_DETECTION_MS` after its `BEGIN` is logged
//! at WARN, once, while it is still open. The handler that holds the transaction is polled with a
//! timer beside it ([`watched`]), so the warning is logged from the request's own future, in its
//! log context (its span, or the fields the service keeps for it), and a transaction costs one
//! timer, armed at its `BEGIN`, instead of a task of its own. What follows the handler (storing
//! an `Idempotency-Key`'s response, `COMMIT`) is bounded by the round-trip bounds instead.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;

use super::lazy::Slot;

/// Runs `attempt` (a handler, or a job of `with_transaction`), which uses `slot`'s transaction
/// (`route` names it in the warning), and warns if the transaction is still open
/// `DB_LEAK_DETECTION_MS` after it began.
pub(super) async fn watched<T>(slot: &Slot, route: &str, attempt: impl Future<Output = T>) -> T {
    let Some(after) = slot.leak_warning() else {
        return attempt.await;
    };
    let mut attempt = pin!(attempt);
    let mut timer = pin!(None::<tokio::time::Sleep>);
    let mut warned = false;
    poll_fn(|cx| {
        if let Poll::Ready(done) = attempt.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        if timer.is_none()
            && let Some(opened) = slot.opened_at()
        {
            timer.set(Some(tokio::time::sleep_until((opened + after).into())));
        }
        if let Some(sleep) = timer.as_mut().as_pin_mut()
            && !warned
            && sleep.poll(cx).is_ready()
        {
            warned = true;
            if slot.still_open() {
                tracing::warn!(
                    route,
                    open_ms = after.as_millis() as u64,
                    "a transaction is still open after DB_LEAK_DETECTION_MS"
                );
            }
        }
        Poll::Pending
    })
    .await
}
