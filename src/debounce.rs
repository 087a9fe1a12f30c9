//! [`Debounce`]: passes an item on once the input has been quiet for a while.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::stream::FusedStream;
use pin_project_lite::pin_project;

use crate::batch::{Deadline, POLL_BUDGET, nonzero_duration};
use crate::error::{ConfigError, or_panic};

pin_project! {
    /// Stream for the [`debounce`](crate::PipelineExt::debounce) method.
    ///
    /// Dropping it drops the item it holds back; take it first with
    /// [`take_held`](Debounce::take_held) or [`into_inner`](Debounce::into_inner) to keep it.
    #[must_use = "streams do nothing unless polled"]
    pub struct Debounce<S: Stream> {
        #[pin]
        stream: S,
        held: Option<S::Item>,
        // Due `quiet` after `held` arrived.
        deadline: Deadline,
        done: bool,
    }
}

impl<S: Stream> Debounce<S> {
    #[track_caller]
    pub(crate) fn new(stream: S, quiet: Duration) -> Self {
        or_panic(Self::try_new(stream, quiet))
    }

    pub(crate) fn try_new(stream: S, quiet: Duration) -> Result<Self, ConfigError> {
        nonzero_duration("quiet", quiet)?;
        Ok(Self {
            stream,
            held: None,
            deadline: Deadline::new(quiet),
            done: false,
        })
    }

    /// A reference to the underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// A mutable reference to the underlying stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// A pinned mutable reference to the underlying stream.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream
    }

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
        (self.stream, self.held)
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
            if *this.done {
                return Poll::Ready(this.held.take());
            }
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
                Poll::Ready(None) => *this.done = true,
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
        let held = usize::from(self.held.is_some());
        if self.done {
            return (held, Some(held));
        }
        let (lower, upper) = self.stream.size_hint();
        let lower = usize::from(held > 0 || lower > 0);
        (lower, upper.and_then(|u| u.checked_add(held)))
    }
}

impl<S: Stream> FusedStream for Debounce<S> {
    fn is_terminated(&self) -> bool {
        self.done && self.held.is_none()
    }
}

impl<S: Stream + fmt::Debug> fmt::Debug for Debounce<S>
where
    S::Item: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Debounce")
            .field("stream", &self.stream)
            .field("held", &self.held)
            .field("quiet", &self.deadline.wait())
            .finish_non_exhaustive()
    }
}
