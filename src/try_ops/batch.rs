//! `try_batch`: size- and time-bounded batches of a fallible stream's `Ok` values.
//!
//! `Ok` values collect into a `Vec` emitted when it holds `max`, when `wait` has passed since
//! its first value, or when the input ends. An `Err` ends the batch early: the partial batch is
//! emitted first, then the error, so every value and error keeps its place.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, Stream, TryStream};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::error::{ConfigError, nonzero, or_panic};
use crate::try_ops::deadline_after;

pin_project! {
    /// Stream for the [`try_batch`](crate::TryPipelineExt::try_batch) method.
    ///
    /// Dropping it drops the batch it has not emitted yet; take that batch first with
    /// [`take_partial`](TryBatch::take_partial) to keep it.
    #[must_use = "streams do nothing unless polled"]
    pub struct TryBatch<S: TryStream> {
        #[pin]
        stream: S,
        batch: Vec<S::Ok>,
        // An error that ended a partial batch: yielded right after that batch.
        error: Option<S::Error>,
        max: usize,
        wait: Duration,
        // When the current batch is due: `wait` after its first value.
        due: Option<Instant>,
        // Allocated at the first wait, reset for later ones.
        sleep: Option<Pin<Box<Sleep>>>,
        // Whether `sleep` is set to `due` and has been polled.
        armed: bool,
        done: bool,
    }
}

impl<S: TryStream> TryBatch<S> {
    #[track_caller]
    pub(crate) fn new(stream: S, max: usize, wait: Duration) -> Self {
        or_panic(Self::try_new(stream, max, wait))
    }

    pub(crate) fn try_new(stream: S, max: usize, wait: Duration) -> Result<Self, ConfigError> {
        nonzero("max", max as u64)?;
        if wait.is_zero() {
            return Err(ConfigError::new("wait", "must be a non-zero duration"));
        }
        Ok(Self {
            stream,
            batch: Vec::new(),
            error: None,
            max,
            wait,
            due: None,
            sleep: None,
            armed: false,
            done: false,
        })
    }

    /// A reference to the underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// A mutable reference to the underlying stream.
    ///
    /// Taking items from it directly bypasses the batches.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// A pinned mutable reference to the underlying stream.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream
    }

    /// The values collected so far into the batch that has not been emitted yet.
    pub fn partial(&self) -> &[S::Ok] {
        &self.batch
    }

    /// Takes the batch that has not been emitted yet out of the stream; the next value starts
    /// a new batch with a new `wait`. Empty when no batch is pending.
    pub fn take_partial(self: Pin<&mut Self>) -> Vec<S::Ok> {
        let this = self.project();
        *this.due = None;
        *this.armed = false;
        std::mem::take(this.batch)
    }
}

impl<S: TryStream> Stream for TryBatch<S> {
    type Item = Result<Vec<S::Ok>, S::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        macro_rules! emit {
            () => {{
                *this.due = None;
                *this.armed = false;
                return Poll::Ready(Some(Ok(std::mem::take(this.batch))));
            }};
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        // A batch whose timer fired comes before anything upstream has now.
        if !this.batch.is_empty()
            && *this.armed
            && this.sleep.as_ref().is_some_and(|s| s.is_elapsed())
        {
            emit!();
        }
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.stream.as_mut().try_poll_next(cx) {
                Poll::Ready(Some(Ok(value))) => {
                    if this.batch.is_empty() {
                        *this.due = Some(deadline_after(Instant::now(), *this.wait));
                        *this.armed = false;
                        this.batch.reserve((*this.max).min(1024));
                    }
                    this.batch.push(value);
                    if this.batch.len() >= *this.max {
                        emit!();
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    if this.batch.is_empty() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    *this.error = Some(e);
                    emit!();
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    if this.batch.is_empty() {
                        return Poll::Ready(None);
                    }
                    emit!();
                }
                Poll::Pending => {
                    if let Some(due) = *this.due {
                        let sleep = match this.sleep {
                            Some(sleep) if *this.armed => sleep,
                            Some(sleep) => {
                                sleep.as_mut().reset(due);
                                sleep
                            }
                            None => this.sleep.insert(Box::pin(sleep_until(due))),
                        };
                        *this.armed = true;
                        if sleep.as_mut().poll(cx).is_ready() {
                            emit!();
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let held = usize::from(self.error.is_some());
        if self.done {
            let pending = usize::from(!self.batch.is_empty());
            return (pending + held, Some(pending + held));
        }
        let pending = usize::from(!self.batch.is_empty());
        let (lower, upper) = self.stream.size_hint();
        (
            usize::from(lower > 0 || pending > 0) + held,
            upper.and_then(|u| u.checked_add(pending + held)),
        )
    }
}

impl<S: TryStream> FusedStream for TryBatch<S> {
    fn is_terminated(&self) -> bool {
        self.done && self.batch.is_empty() && self.error.is_none()
    }
}

impl<S> fmt::Debug for TryBatch<S>
where
    S: TryStream + fmt::Debug,
    S::Ok: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryBatch")
            .field("stream", &self.stream)
            .field("partial", &self.batch)
            .field("max", &self.max)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}
