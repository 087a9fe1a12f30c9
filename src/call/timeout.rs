//! Deadlines that cannot overflow, and a timeout whose timer is armed only if it is needed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

/// About 30 years: the deadline used when `now + d` does not fit in an `Instant` (tokio's
/// `sleep` clamps the same way).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + d`, saturated: a duration too large for an `Instant` gives a deadline about 30 years
/// ahead, and `None` only if even that does not fit (no deadline at all).
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Option<Instant> {
    now.checked_add(d).or_else(|| now.checked_add(FAR_FUTURE))
}

/// Sleeps for `d` on tokio's timer; never panics, however large `d` is.
pub(crate) async fn sleep_for(d: Duration) {
    if d.is_zero() {
        return;
    }
    match deadline_after(Instant::now(), d) {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

pin_project! {
    /// `fut`, or `Err(Elapsed)` once `deadline` has passed. The timer is registered on the first
    /// poll that finds `fut` pending, so a call that finishes at once never touches it.
    pub(crate) struct Timeout<Fut> {
        #[pin]
        fut: Fut,
        deadline: Option<Instant>,
        #[pin]
        sleep: Option<Sleep>,
    }
}

/// The deadline passed before the future finished.
#[derive(Debug)]
pub(crate) struct Elapsed;

impl<Fut> Timeout<Fut> {
    /// Times `fut` out `d` after `now`.
    pub(crate) fn new(fut: Fut, now: Instant, d: Duration) -> Self {
        Self {
            fut,
            deadline: deadline_after(now, d),
            sleep: None,
        }
    }
}

impl<Fut: Future> Future for Timeout<Fut> {
    type Output = Result<Fut::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        if this.sleep.is_none() {
            this.sleep.set(Some(sleep_until(deadline)));
        }
        let sleep = this.sleep.as_pin_mut().expect("the timer was just armed");
        match sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}
