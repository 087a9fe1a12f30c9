//! The [`RateLimit`] and [`RateLimitBy`] streams.

use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::Stream;
use futures::stream::FusedStream;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use super::keyed::{KeyedRateLimiter, Shared as KeyedShared};
use super::{RateLimiter, Shared};

/// An item waiting for its slot, and the slot, given back if the stream is dropped first.
struct Held<T, R: Refund> {
    item: Option<T>,
    deadline: u64,
    refund: R,
    before: u64,
    after: u64,
}

trait Refund {
    fn refund(&self, before: u64, after: u64);
}

impl Refund for Arc<Shared> {
    fn refund(&self, before: u64, after: u64) {
        self.tat.refund(before, after);
    }
}

/// A keyed slot's refund; the function is chosen where `K`'s bounds are known, so that the
/// stream type itself needs none.
struct KeyRefund<K> {
    shared: Arc<KeyedShared<K>>,
    key: K,
    refund: fn(&KeyedShared<K>, &K, u64, u64),
}

impl<K> Refund for KeyRefund<K> {
    fn refund(&self, before: u64, after: u64) {
        (self.refund)(&self.shared, &self.key, before, after);
    }
}

impl<T, R: Refund> Held<T, R> {
    fn release(mut self) -> T {
        self.item.take().expect("a held item is released once")
    }
}

impl<T, R: Refund> Drop for Held<T, R> {
    fn drop(&mut self) {
        if self.item.is_some() {
            self.refund.refund(self.before, self.after);
        }
    }
}

/// Sleeps until `at`, reusing the stream's timer.
fn arm(sleep: &mut Option<Pin<Box<Sleep>>>, at: Instant) {
    match sleep {
        Some(sleep) => sleep.as_mut().reset(at),
        None => *sleep = Some(Box::pin(sleep_until(at))),
    }
}

pin_project! {
    /// Stream for the [`rate_limit`](crate::PipelineExt::rate_limit) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct RateLimit<S: Stream> {
        #[pin]
        stream: S,
        limiter: RateLimiter,
        held: Option<Held<S::Item, Arc<Shared>>>,
        sleep: Option<Pin<Box<Sleep>>>,
        done: bool,
    }
}

impl<S: Stream> RateLimit<S> {
    pub(crate) fn new(stream: S, limiter: RateLimiter) -> Self {
        Self {
            stream,
            limiter,
            held: None,
            sleep: None,
            done: false,
        }
    }

    /// The limiter this stream draws on.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The upstream stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The upstream stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The upstream stream, pinned.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream
    }

    /// The upstream stream; an item waiting for its slot is dropped (and its slot given back).
    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl<S: Stream> Stream for RateLimit<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        if this.held.is_none() {
            if *this.done {
                return Poll::Ready(None);
            }
            let Some(item) = ready!(this.stream.poll_next(cx)) else {
                *this.done = true;
                return Poll::Ready(None);
            };
            let shared = &this.limiter.shared;
            let Some((deadline, before, after)) = shared.reserve(Instant::now()) else {
                return Poll::Ready(Some(item));
            };
            arm(this.sleep, shared.clock.instant(deadline));
            *this.held = Some(Held {
                item: Some(item),
                deadline,
                refund: Arc::clone(shared),
                before,
                after,
            });
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
        }
        let held = this.held.take().expect("an item is held");
        let clock = &this.limiter.shared.clock;
        clock.woke(held.deadline, clock.nanos(Instant::now()));
        Poll::Ready(Some(held.release()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let held = usize::from(self.held.is_some());
        if self.done {
            return (held, Some(held));
        }
        let (lower, upper) = self.stream.size_hint();
        (
            lower.saturating_add(held),
            upper.and_then(|u| u.checked_add(held)),
        )
    }
}

impl<S: Stream> FusedStream for RateLimit<S> {
    fn is_terminated(&self) -> bool {
        self.done && self.held.is_none()
    }
}

impl<S: Stream + fmt::Debug> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("stream", &self.stream)
            .field("limiter", &self.limiter)
            .field("waiting", &self.held.is_some())
            .finish()
    }
}

pin_project! {
    /// Stream for the [`rate_limit_by`](crate::PipelineExt::rate_limit_by) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct RateLimitBy<S: Stream, K, F> {
        #[pin]
        stream: S,
        limiter: KeyedRateLimiter<K>,
        key: F,
        held: Option<Held<S::Item, KeyRefund<K>>>,
        sleep: Option<Pin<Box<Sleep>>>,
        done: bool,
    }
}

impl<S, K, F> RateLimitBy<S, K, F>
where
    S: Stream,
    K: Hash + Eq + Clone,
    F: FnMut(&S::Item) -> K,
{
    pub(crate) fn new(stream: S, limiter: KeyedRateLimiter<K>, key: F) -> Self {
        Self {
            stream,
            limiter,
            key,
            held: None,
            sleep: None,
            done: false,
        }
    }
}

impl<S: Stream, K, F> RateLimitBy<S, K, F> {
    /// The keyed limiter this stream draws on.
    pub fn limiter(&self) -> &KeyedRateLimiter<K> {
        &self.limiter
    }

    /// The upstream stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The upstream stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The upstream stream, pinned.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream
    }

    /// The upstream stream; an item waiting for its slot is dropped (and its slot given back).
    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl<S, K, F> Stream for RateLimitBy<S, K, F>
where
    S: Stream,
    K: Hash + Eq + Clone,
    F: FnMut(&S::Item) -> K,
{
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        if this.held.is_none() {
            if *this.done {
                return Poll::Ready(None);
            }
            let Some(item) = ready!(this.stream.poll_next(cx)) else {
                *this.done = true;
                return Poll::Ready(None);
            };
            let key = (this.key)(&item);
            let shared = this.limiter.shared();
            let Some((deadline, before, after)) = shared.reserve(&key, Instant::now()) else {
                return Poll::Ready(Some(item));
            };
            arm(this.sleep, shared.clock.instant(deadline));
            *this.held = Some(Held {
                item: Some(item),
                deadline,
                refund: KeyRefund {
                    shared: Arc::clone(shared),
                    key,
                    refund: KeyedShared::refund,
                },
                before,
                after,
            });
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
        }
        let held = this.held.take().expect("an item is held");
        let clock = &this.limiter.shared().clock;
        clock.woke(held.deadline, clock.nanos(Instant::now()));
        Poll::Ready(Some(held.release()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let held = usize::from(self.held.is_some());
        if self.done {
            return (held, Some(held));
        }
        let (lower, upper) = self.stream.size_hint();
        (
            lower.saturating_add(held),
            upper.and_then(|u| u.checked_add(held)),
        )
    }
}

impl<S, K, F> FusedStream for RateLimitBy<S, K, F>
where
    S: Stream,
    K: Hash + Eq + Clone,
    F: FnMut(&S::Item) -> K,
{
    fn is_terminated(&self) -> bool {
        self.done && self.held.is_none()
    }
}

impl<S: Stream + fmt::Debug, K, F> fmt::Debug for RateLimitBy<S, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBy")
            .field("stream", &self.stream)
            .field("limiter", &self.limiter)
            .field("waiting", &self.held.is_some())
            .finish_non_exhaustive()
    }
}
