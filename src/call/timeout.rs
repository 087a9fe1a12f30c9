//! A timeout whose timer is armed only if it is needed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::time;

pin_project! {
    /// `fut`, or `Err(Elapsed)` once `deadline` has passed. The timer is registered on the first
    /// poll that finds `fut` pending, so a call that finishes at once never touches it.
    pub(crate) struct Timeout<Fut> {
        #[pin]
        fut: Fut,
        deadline: Instant,
        #[pin]
        sleep: Option<Sleep>,
    }
}

/// The deadline passed before the future finished.
#[derive(Debug)]
pub(crate) struct Elapsed;

impl<Fut> Timeout<Fut> {
    /// Times `fut` out `d` after `now` (at most about 30 years: see [`time::deadline`]).
    pub(crate) fn new(fut: Fut, now: Instant, d: Duration) -> Self {
        Self {
            fut,
            deadline: time::deadline(now, d),
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
        if this.sleep.is_none() {
            this.sleep.set(Some(sleep_until(*this.deadline)));
        }
        let sleep = this.sleep.as_pin_mut().expect("the timer was just armed");
        match sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}
