//! [`DedupeBy`]: drops an item whose key passed within a time window, in bounded memory.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{Fuse, FusedStream};
use futures::{Stream, StreamExt};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::batch::POLL_BUDGET;
use crate::error::{ConfigError, nonzero, nonzero_duration};

/// The keys that passed within the window, oldest first, in at most `capacity` entries.
struct Window<K> {
    live: HashSet<K>,
    // (expiry, key) in the order the keys passed; expiries are therefore ascending.
    order: VecDeque<(Instant, K)>,
    window: Duration,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> Window<K> {
    /// Whether `key` may pass at `now`; if so it is remembered until `now + window`.
    fn pass(&mut self, key: K, now: Instant) -> bool {
        while let Some((expiry, _)) = self.order.front() {
            if *expiry > now {
                break;
            }
            self.forget_oldest();
        }
        if self.live.contains(&key) {
            return false;
        }
        if self.order.len() == self.capacity {
            self.forget_oldest();
        }
        let expiry = crate::time::deadline(now, self.window);
        self.order.push_back((expiry, key.clone()));
        self.live.insert(key);
        true
    }

    fn forget_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.live.remove(&key);
        }
    }
}

pin_project! {
    /// Stream for the [`dedupe_by`](crate::PipelineExt::dedupe_by) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct DedupeBy<S, K, F> {
        #[pin]
        stream: Fuse<S>,
        seen: Window<K>,
        key: F,
    }
}

impl<S, K, F> DedupeBy<S, K, F>
where
    S: Stream,
    K: Hash + Eq + Clone,
    F: FnMut(&S::Item) -> K,
{
    /// [`dedupe_by`](crate::PipelineExt::dedupe_by) for arguments that may be refused: a
    /// [`ConfigError`] naming `window` or `capacity` if either is zero, where `dedupe_by`
    /// panics.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::stream;
    /// use stagepipe::DedupeBy;
    ///
    /// let ids = stream::iter([1u32, 2, 1]);
    /// let err = DedupeBy::try_new(ids, Duration::from_secs(60), 0, |id| *id).unwrap_err();
    /// assert_eq!(err.parameter(), "capacity");
    /// ```
    pub fn try_new(
        stream: S,
        window: Duration,
        capacity: usize,
        key: F,
    ) -> Result<Self, ConfigError> {
        nonzero_duration("window", window)?;
        nonzero("capacity", capacity as u64)?;
        let seen = Window {
            live: HashSet::new(),
            order: VecDeque::new(),
            window,
            capacity,
        };
        Ok(Self {
            stream: stream.fuse(),
            seen,
            key,
        })
    }

    delegate_access_inner!(pub stream, S, (.));

    /// How many keys are remembered now (at most `capacity`; expired keys are forgotten when
    /// the next item arrives).
    pub fn remembered(&self) -> usize {
        self.seen.order.len()
    }

    /// Consumes this stream, returning the underlying stream.
    pub fn into_inner(self) -> S {
        self.stream.into_inner()
    }
}

impl<S, K, F> Stream for DedupeBy<S, K, F>
where
    S: Stream,
    K: Hash + Eq + Clone,
    F: FnMut(&S::Item) -> K,
{
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let mut this = self.project();
        let mut now = None;
        let mut budget = POLL_BUDGET;
        loop {
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    // Items taken in one call arrive at the same instant: one clock read.
                    let now = *now.get_or_insert_with(Instant::now);
                    if this.seen.pass((this.key)(&item), now) {
                        return Poll::Ready(Some(item));
                    }
                    budget -= 1;
                    if budget == 0 {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Any item may be a duplicate of one that passed before.
        (0, self.stream.size_hint().1)
    }
}

impl<S, K, F> FusedStream for DedupeBy<S, K, F>
where
    Self: Stream,
    S: Stream,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
    }
}

impl_debug!(impl[S: fmt::Debug, K, F] DedupeBy<S, K, F> => DedupeBy |this| {
    stream: this.stream.get_ref(),
    window: &this.seen.window,
    capacity: &this.seen.capacity,
    remembered: &this.seen.order.len(),
} ..);
