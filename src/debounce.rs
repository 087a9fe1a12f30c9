//! [`Debounce`]: passes an item on once the input has been quiet for a while.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{Fuse, FusedStream};
use futures::{Stream, StreamExt};
use pin_project_lite::pin_project;

use crate::batch::{Deadline, POLL_BUDGET};
use crate::error::{ConfigError, nonzero_duration};

pin_project! {
    /// Stream for the [`debounce`](crate::PipelineExt::debounce) method.
    ///
    /// Dropping it drops the item it holds back; take it first with
    /// [`take_held`](Debounce::take_held) or [`into_inner`](Debounce::into_inner) to keep it.
    #[must_use = "streams do nothing unless polled"]
    pub struct Debounce<S: Stream> {
        #[pin]
        stream: Fuse<S>,
        held: Option<S::Item>,
        // Due `quiet` after `held` arrived.
        deadline: Deadline,
    }
}

impl<S: Stream> Debounce<S> {
    /// [`debounce`](crate::PipelineExt::debounce) for a `quiet` that may be refused: a
    /// [`ConfigError`] naming `quiet` if it is zero, where `debounce` panics.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::stream;
    /// use stagepipe::Debounce;
    ///
    /// let err = Debounce::try_new(stream::iter(0..3), Duration::ZERO).unwrap_err();
    /// assert_eq!(err.parameter(), "quiet");
    /// ```
    pub fn try_new(stream: S, quiet: Duration) -> Result<Self, ConfigError> {
        nonzero_duration("quiet", quiet)?;
        Ok(Self {
            stream: stream.fuse(),
            held: None,
            deadline: Deadline::new(quiet),
        })
    }

    delegate_access_inner!(pub stream, S, (.));

    /// The item waiting for the quiet period to pass, if any.
    pub fn held(&self) -> Option<&S::Item> {
        self.held.as_ref()
    }

    /// Takes the item waiting for the quiet period out of the stream, for example to use it on
    /// shutdown.
    pub fn take_held(self: Pin<&mut Self>) -> Option<S::Item> {
        let this = self.project();
        this.deadline.clear();
        this.held.take()
    }

    /// Consumes this stream, returning the underlying stream and the item it held back.
    pub fn into_inner(self) -> (S, Option<S::Item>) {
        (self.stream.into_inner(), self.held)
    }
}

impl<S: Stream> Stream for Debounce<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let mut this = self.project();

        // The held item's deadline comes before anything upstream has now: an item arriving at
        // the deadline's very instant does not replace it.
        if this.deadline.has_fired() {
            this.deadline.clear();
            return Poll::Ready(this.held.take());
        }

        let mut budget = POLL_BUDGET;
        loop {
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    // A newer item restarts the wait.
                    this.deadline.clear();
                    *this.held = Some(item);
                    budget -= 1;
                    if budget == 0 {
                        this.deadline.at();
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Poll::Ready(None) => {
                    // The input ended: the item waiting goes out at once.
                    this.deadline.clear();
                    return Poll::Ready(this.held.take());
                }
                Poll::Pending => {
                    if this.held.is_none() {
                        return Poll::Pending;
                    }
                    if this.deadline.poll_due(cx) {
                        this.deadline.clear();
                        return Poll::Ready(this.held.take());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // At least one item if any is held or to come: a burst leaves only its last.
        let held = usize::from(self.held.is_some());
        let (lower, upper) = self.stream.size_hint();
        (
            usize::from(held > 0 || lower > 0),
            upper.and_then(|u| u.checked_add(held)),
        )
    }
}

impl<S: Stream> FusedStream for Debounce<S> {
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated() && self.held.is_none()
    }
}

impl_debug!(impl[S: Stream + fmt::Debug] Debounce<S> where [S::Item: fmt::Debug] => Debounce |this| {
    stream: this.stream.get_ref(),
    held: &this.held,
    quiet: &this.deadline.wait(),
} ..);
