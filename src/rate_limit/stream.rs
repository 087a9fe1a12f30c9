//! The [`RateLimit`] and [`RateLimitBy`] streams: one engine over the direct and the keyed
//! limiter.

use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use super::gcra::{Credit, Timeline};
use super::keyed::{KeyedRateLimiter, Shared as KeyedShared};
use super::{Limiter, RateLimiter, Reserved, Shared, take_or_reserve};
use crate::macros::size_hint_plus;
use crate::time::fine;
use futures::stream::{Fuse, FusedStream};
use futures::{Stream, StreamExt};
use pin_project_lite::pin_project;

/// A limiter handle a stream draws on: its shared state and the keys of its quotas.
trait Handle {
    type Shared;
    type Key;
    fn shared(&self) -> &Arc<Self::Shared>;

    /// For a Redis-backed handle, the wait for one cell of `key`.
    #[cfg(feature = "redis")]
    fn redis_wait(&self, key: &Self::Key) -> Option<crate::redis::Wait>;
}

impl Handle for RateLimiter {
    type Shared = Shared;
    type Key = ();

    #[inline]
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    #[cfg(feature = "redis")]
    fn redis_wait(&self, (): &()) -> Option<crate::redis::Wait> {
        self.redis.as_ref().map(|r| r.wait(&()))
    }
}

impl<K> Handle for KeyedRateLimiter<K> {
    type Shared = KeyedShared<K>;
    type Key = K;

    #[inline]
    fn shared(&self) -> &Arc<KeyedShared<K>> {
        KeyedRateLimiter::shared(self)
    }

    #[cfg(feature = "redis")]
    fn redis_wait(&self, key: &K) -> Option<crate::redis::Wait> {
        self.redis_side().map(|r| r.wait(key))
    }
}

/// How a stream finds an item's key: none for a [`RateLimiter`] ([`Unkeyed`]), the user's
/// function for a [`KeyedRateLimiter`].
trait KeyFn<T> {
    type Key;
    fn key(&mut self, item: &T) -> Self::Key;
}

/// The key function of a stream on a direct limiter: one quota, no key.
#[derive(Debug, Clone, Copy)]
struct Unkeyed;

impl<T> KeyFn<T> for Unkeyed {
    type Key = ();

    #[inline]
    fn key(&mut self, _: &T) {}
}

impl<T, K, F: FnMut(&T) -> K> KeyFn<T> for F {
    type Key = K;

    #[inline]
    fn key(&mut self, item: &T) -> K {
        self(item)
    }
}

/// An item waiting for its key's slot, and the slot, given back if the stream drops it first.
struct Held<T, L, K> {
    item: Option<(T, K)>,
    shared: Arc<L>,
    reserved: Reserved,
    /// When the item arrived (for the wait the limiter imposed on it).
    since: u64,
    /// The limiter's refund, chosen where the key's bounds are known, so that the stream types
    /// need none.
    refund: fn(&L, &K, u64, u64),
}

impl<T, L, K> Held<T, L, K> {
    fn key(&self) -> &K {
        &self.item.as_ref().expect("a held item is released once").1
    }

    /// The item and its key; the slot is the item's for good.
    fn release(mut self) -> (T, K) {
        self.item.take().expect("a held item is released once")
    }
}

impl<T, L, K> Drop for Held<T, L, K> {
    fn drop(&mut self) {
        if let Some((_, key)) = &self.item {
            (self.refund)(&self.shared, key, self.reserved.before, self.reserved.after);
        }
    }
}

/// A stream's timer, kept from one wait to the next: a sleep on the fine timer (see
/// [`fine`]), which is ready only once tokio's clock has reached the instant it was armed for.
#[derive(Default)]
struct Timer {
    sleep: Option<Pin<Box<fine::Sleep>>>,
}

impl Timer {
    /// Arms the timer for `at` (on the limiter's timeline, as `now`).
    fn arm(&mut self, clock: &Timeline, at: u64, now: u64) {
        let at = clock.instant(at, now);
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(fine::sleep_until(at))),
        }
    }

    /// Waits until the timer fires: `Ready(now)`.
    fn poll(&mut self, clock: &Timeline, cx: &mut Context<'_>) -> Poll<u64> {
        if let Some(sleep) = self.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
        }
        Poll::Ready(clock.now())
    }
}

impl_debug!(impl[] Timer => Timer |this| {
    deadline: &this.sleep.as_ref().map(|sleep| sleep.deadline()),
} ..);

/// Waits on the stream's timer (armed) until the held slot is due and its cell may be released
/// (`release` returns when it may, if not now), and releases it: `Ready(now)`.
fn poll_release(
    deadline: u64,
    timer: &mut Timer,
    clock: &Timeline,
    cx: &mut Context<'_>,
    release: impl Fn(u64) -> Result<(), u64>,
) -> Poll<u64> {
    loop {
        let now = ready!(timer.poll(clock, cx));
        let wake_at = if now < deadline {
            deadline
        } else {
            match release(now) {
                Ok(()) => return Poll::Ready(now),
                Err(at) => at,
            }
        };
        timer.arm(clock, wake_at, now);
    }
}

/// An item waiting for its cell of a Redis-backed limiter, and the wait.
#[cfg(feature = "redis")]
type Waiting<T> = Option<(T, crate::redis::Wait)>;
/// Without Redis, never an item.
#[cfg(not(feature = "redis"))]
type Waiting<T> = Option<(T, std::convert::Infallible)>;

pin_project! {
    /// The engine of [`RateLimit`] (on a [`RateLimiter`]) and [`RateLimitBy`] (on a
    /// [`KeyedRateLimiter`]): at most one item held, waiting for its key's slot.
    #[project = CoreProj]
    struct Core<S: Stream, H: Handle, KF> {
        #[pin]
        stream: Fuse<S>,
        limiter: H,
        key: KF,
        held: Option<Held<S::Item, H::Shared, H::Key>>,
        timer: Timer,
        // This stream's own credit for its timer's lateness, and the key it was earned on.
        credit: Option<(H::Key, Credit)>,
        // On a Redis-backed limiter: the item waiting for its cell, and the wait (dropping it
        // gives the cell back).
        waiting: Waiting<S::Item>,
    }
}

impl<S: Stream, H: Handle, KF> Core<S, H, KF> {
    fn new(stream: S, limiter: H, key: KF) -> Self {
        Self {
            stream: stream.fuse(),
            limiter,
            key,
            held: None,
            timer: Timer::default(),
            credit: None,
            waiting: None,
        }
    }

    /// Whether an item is held, waiting for its cell.
    fn holds(&self) -> bool {
        self.held.is_some() || self.waiting.is_some()
    }

    delegate_access_inner!(stream, Fuse<S>, ());

    fn size_hint(&self) -> (usize, Option<usize>) {
        size_hint_plus(usize::from(self.holds()), self.stream.size_hint())
    }

    fn is_terminated(&self) -> bool {
        self.stream.is_terminated() && !self.holds()
    }

    fn fmt_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result
    where
        S: fmt::Debug,
        H: fmt::Debug,
    {
        f.debug_struct(name)
            .field("stream", self.stream.get_ref())
            .field("limiter", &self.limiter)
            .field("waiting", &self.holds())
            .finish_non_exhaustive()
    }
}

impl<S, H, KF> Core<S, H, KF>
where
    S: Stream,
    H: Handle,
    H::Shared: Limiter<Key = H::Key>,
    H::Key: PartialEq,
    KF: KeyFn<S::Item, Key = H::Key>,
{
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
        let mut this = self.project();
        #[cfg(feature = "redis")]
        loop {
            if let Some((_, wait)) = this.waiting {
                ready!(wait.as_mut().poll(cx));
                let (item, _) = this.waiting.take().expect("an item is waiting");
                return Poll::Ready(Some(item));
            }
            if this.held.is_some() {
                // An in-memory limiter's item, waiting for its slot.
                return Self::poll_held(this, cx, None);
            }
            let Some(item) = ready!(this.stream.as_mut().poll_next(cx)) else {
                return Poll::Ready(None);
            };
            let key = this.key.key(&item);
            let Some(wait) = this.limiter.redis_wait(&key) else {
                // An in-memory limiter: the item goes the usual way below.
                return Self::poll_held(this, cx, Some((item, key)));
            };
            *this.waiting = Some((item, wait));
        }
        #[cfg(not(feature = "redis"))]
        Self::poll_held(this, cx, None)
    }

    /// The in-memory engine: `pulled` is an item already pulled from upstream, with its key.
    fn poll_held(
        this: CoreProj<'_, S, H, KF>,
        cx: &mut Context<'_>,
        pulled: Option<(S::Item, H::Key)>,
    ) -> Poll<Option<S::Item>> {
        let shared = this.limiter.shared();
        let clock = shared.clock();
        let held = match this.held {
            Some(held) => held,
            None => {
                let (item, key) = match pulled {
                    Some(pulled) => pulled,
                    None => {
                        let Some(item) = ready!(this.stream.poll_next(cx)) else {
                            return Poll::Ready(None);
                        };
                        let key = this.key.key(&item);
                        (item, key)
                    }
                };
                let now = clock.now();
                let arrival = match this.credit {
                    Some((credited, credit)) if *credited == key => credit.arrival(now),
                    _ => now,
                };
                let reserved = match take_or_reserve(&**shared, &key, arrival, now) {
                    Ok(()) => return Poll::Ready(Some(item)),
                    Err(reserved) => reserved,
                };
                this.timer.arm(clock, reserved.wake_at, now);
                this.held.insert(Held {
                    item: Some((item, key)),
                    shared: Arc::clone(shared),
                    reserved,
                    since: now,
                    refund: <H::Shared as Limiter>::refund,
                })
            }
        };
        let deadline = held.reserved.deadline;
        let key = held.key();
        let now = ready!(poll_release(deadline, this.timer, clock, cx, |now| {
            shared.release(key, now)
        }));
        let held = this.held.take().expect("an item is held");
        shared.waited(now.saturating_sub(held.since));
        let (item, key) = held.release();
        *this.credit = Some((key, Credit::after_wait(deadline, now)));
        Poll::Ready(Some(item))
    }
}

pin_project! {
    /// Stream for the [`rate_limit`](crate::PipelineExt::rate_limit) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct RateLimit<S: Stream> {
        #[pin]
        core: Core<S, RateLimiter, Unkeyed>,
    }
}

impl<S: Stream> RateLimit<S> {
    pub(crate) fn new(stream: S, limiter: RateLimiter) -> Self {
        Self {
            core: Core::new(stream, limiter, Unkeyed),
        }
    }

    /// The limiter this stream draws on.
    pub fn limiter(&self) -> &RateLimiter {
        &self.core.limiter
    }

    delegate_access_inner!(pub core, S, (. .));

    /// The upstream stream; an item waiting for its slot is dropped (and its slot given back).
    pub fn into_inner(self) -> S {
        self.core.stream.into_inner()
    }
}

delegate_stream!(
    impl[S] RateLimit<S> where [S: Stream] => S::Item;
    Debug where [S: Stream + fmt::Debug]
);

pin_project! {
    /// Stream for the [`rate_limit_by`](crate::PipelineExt::rate_limit_by) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct RateLimitBy<S: Stream, K, F> {
        #[pin]
        core: Core<S, KeyedRateLimiter<K>, F>,
    }
}

impl<S: Stream, K, F> RateLimitBy<S, K, F> {
    pub(crate) fn new(stream: S, limiter: KeyedRateLimiter<K>, key: F) -> Self {
        Self {
            core: Core::new(stream, limiter, key),
        }
    }

    /// The keyed limiter this stream draws on.
    pub fn limiter(&self) -> &KeyedRateLimiter<K> {
        &self.core.limiter
    }

    delegate_access_inner!(pub core, S, (. .));

    /// The upstream stream; an item waiting for its slot is dropped (and its slot given back).
    pub fn into_inner(self) -> S {
        self.core.stream.into_inner()
    }
}

delegate_stream!(
    impl[S, K, F] RateLimitBy<S, K, F>
    where [S: Stream, K: Hash + Eq + Clone, F: FnMut(&S::Item) -> K]
    => S::Item;
    Debug where [S: Stream + fmt::Debug]
);
