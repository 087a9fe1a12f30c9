//! `try_batch`: size- and time-bounded batches of a fallible stream's `Ok` values.
//!
//! `Ok` values collect into a `Vec` emitted when it holds `max`, when `wait` has passed since
//! its first value, or when the input ends. An `Err` ends the batch early: the partial batch is
//! emitted first, then the error, so every value and error keeps its place.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, Stream, TryStream};
use pin_project_lite::pin_project;

use crate::batch::Deadline;
use crate::error::{ConfigError, nonzero, nonzero_duration};

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
        // Due `wait` after the current batch's first value.
        deadline: Deadline,
        done: bool,
    }
}

impl<S: TryStream> TryBatch<S> {
    /// [`try_batch`](crate::TryPipelineExt::try_batch) for arguments that may be refused: a
    /// [`ConfigError`] naming `max` or `wait` if either is zero, where `try_batch` panics.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::stream;
    /// use stagepipe::TryBatch;
    ///
    /// let rows = stream::iter([Ok::<u32, String>(1), Ok(2)]);
    /// let err = TryBatch::try_new(rows, 0, Duration::from_secs(1)).unwrap_err();
    /// assert_eq!(err.parameter(), "max");
    /// ```
    pub fn try_new(stream: S, max: usize, wait: Duration) -> Result<Self, ConfigError> {
        nonzero("max", max as u64)?;
        nonzero_duration("wait", wait)?;
        Ok(Self {
            stream,
            batch: Vec::new(),
            error: None,
            max,
            deadline: Deadline::new(wait),
            done: false,
        })
    }

    delegate_access_inner!(pub stream, S, ());

    /// The values collected so far into the batch that has not been emitted yet.
    pub fn partial(&self) -> &[S::Ok] {
        &self.batch
    }

    /// Takes the batch that has not been emitted yet out of the stream; the next value starts
    /// a new batch with a new `wait`. Empty when no batch is pending.
    pub fn take_partial(self: Pin<&mut Self>) -> Vec<S::Ok> {
        let this = self.project();
        this.deadline.clear();
        std::mem::take(this.batch)
    }
}

impl<S: TryStream> Stream for TryBatch<S> {
    type Item = Result<Vec<S::Ok>, S::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        macro_rules! emit {
            () => {{
                this.deadline.clear();
                return Poll::Ready(Some(Ok(std::mem::take(this.batch))));
            }};
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        // A batch whose timer fired comes before anything upstream has now.
        if !this.batch.is_empty() && this.deadline.has_fired() {
            emit!();
        }
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.stream.as_mut().try_poll_next(cx) {
                Poll::Ready(Some(Ok(value))) => {
                    if this.batch.is_empty() {
                        this.deadline.start();
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
                    if !this.batch.is_empty() && this.deadline.poll_due(cx) {
                        emit!();
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

impl_debug!(impl[S: TryStream + fmt::Debug] TryBatch<S> where [S::Ok: fmt::Debug] => TryBatch |this| {
    stream: &this.stream,
    partial: &this.batch,
    max: &this.max,
    wait: &this.deadline.wait(),
} ..);
