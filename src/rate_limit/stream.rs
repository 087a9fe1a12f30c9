//! The [`RateLimit`] and [`RateLimitBy`] streams.

use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::Stream;
use futures::stream::FusedStream;
use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep_until};

use super::gcra::{Credit, TICK, Timeline};
use super::keyed::{KeyedRateLimiter, Shared as KeyedShared};
use super::{RateLimiter, Shared};

/// An item waiting for its slot, and the slot, given back if the stream is dropped first.
struct Held<T, R: Refund> {
    item: Option<T>,
    deadline: u64,
    refund: Option<R>,
    before: u64,
    after: u64,
    /// When the item arrived (for the wait the limiter imposed on it).
    #[cfg(feature = "metrics")]
    since: u64,
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
    fn new(item: T, (deadline, before, after): (u64, u64, u64), refund: R) -> Self {
        Self {
            item: Some(item),
            deadline,
            refund: Some(refund),
            before,
            after,
            #[cfg(feature = "metrics")]
            since: 0,
        }
    }

    /// The item, and what would have given its slot back.
    fn release(mut self) -> (T, R) {
        let item = self.item.take().expect("a held item is released once");
        let refund = self.refund.take().expect("a held item is released once");
        (item, refund)
    }
}

impl<T, R: Refund> Drop for Held<T, R> {
    fn drop(&mut self) {
        if let (Some(_), Some(refund)) = (&self.item, &self.refund) {
            refund.refund(self.before, self.after);
        }
    }
}

/// A waiter's timer, armed early by the lateness it has learnt to expect.
///
/// tokio's timer rounds a deadline up to its next millisecond tick and then sleeps whole ticks,
/// so on a real clock a wake-up usually comes a little more than one tick after its deadline:
/// more than the one tick of lateness a waiter may make up (see `Credit`). The timer therefore
/// learns how late its own wake-ups are (a moving average; zero on a paused clock, where timers
/// are exact) and arms that much early, at most one tick. A wake-up before the instant it is
/// meant for never releases anything: the timer is armed again for the instant itself. So
/// instants on a paused clock are exact, and on a real clock wake-ups land just after their
/// deadlines.
#[derive(Default)]
struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The instant (on the limiter's timeline) the timer was last armed for.
    armed: u64,
    /// The instant it is meant to wake for (`armed` plus the lead).
    target: u64,
    /// Whether the timer was armed for a future instant (a real sleep, whose lateness is
    /// learnt), not for one already past.
    sleeping: bool,
    /// Expected lateness of a wake-up, in nanoseconds (an exponential moving average).
    late: u64,
}

impl Timer {
    /// Arms the timer for `target`, early by most of the expected lateness.
    fn arm(&mut self, clock: &Timeline, target: u64, now: u64) {
        let lead = (self.late / 4 * 3).min(TICK);
        self.arm_at(clock, target, target.saturating_sub(lead), now);
    }

    fn arm_at(&mut self, clock: &Timeline, target: u64, at: u64, now: u64) {
        self.target = target;
        self.armed = at;
        self.sleeping = at > now;
        let at = clock.instant(at);
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(sleep_until(at))),
        }
    }

    /// Waits until the timer fires: `Ready(now)`.
    fn poll(&mut self, clock: &Timeline, cx: &mut Context<'_>) -> Poll<u64> {
        if let Some(sleep) = self.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
        }
        let now = clock.now();
        if std::mem::take(&mut self.sleeping) {
            // A consumer that polls late is not the timer's lateness: cap what one sample adds.
            let observed = now.saturating_sub(self.armed).min(2 * TICK);
            self.late = self.late - self.late / 8 + observed / 8;
        }
        Poll::Ready(now)
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer")
            .field("target", &self.target)
            .field("late", &self.late)
            .finish_non_exhaustive()
    }
}

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
        if now < timer.target {
            // Woken early: wait for the instant itself; nothing is released before it.
            let target = timer.target;
            timer.arm_at(clock, target, target, now);
            continue;
        }
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

pin_project! {
    /// Stream for the [`rate_limit`](crate::PipelineExt::rate_limit) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct RateLimit<S: Stream> {
        #[pin]
        stream: S,
        limiter: RateLimiter,
        held: Option<Held<S::Item, Arc<Shared>>>,
        timer: Timer,
        // This stream's own credit for its timer's lateness.
        credit: Credit,
        done: bool,
    }
}

impl<S: Stream> RateLimit<S> {
    pub(crate) fn new(stream: S, limiter: RateLimiter) -> Self {
        Self {
            stream,
            limiter,
            held: None,
            timer: Timer::default(),
            credit: Credit::default(),
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
        let shared = &this.limiter.shared;
        let held = match this.held {
            Some(held) => held,
            None => {
                if *this.done {
                    return Poll::Ready(None);
                }
                let Some(item) = ready!(this.stream.poll_next(cx)) else {
                    *this.done = true;
                    return Poll::Ready(None);
                };
                let now = shared.clock.now();
                let slot = shared.reserve(this.credit.arrival(now));
                let wake_at = if slot.0 > now {
                    slot.0
                } else {
                    match shared.release(now) {
                        Ok(()) => return Poll::Ready(Some(item)),
                        Err(at) => at,
                    }
                };
                this.timer.arm(&shared.clock, wake_at, now);
                let held = this.held.insert(Held::new(item, slot, Arc::clone(shared)));
                #[cfg(feature = "metrics")]
                {
                    held.since = now;
                }
                held
            }
        };
        let now = ready!(poll_release(
            held.deadline,
            this.timer,
            &shared.clock,
            cx,
            |now| shared.release(now),
        ));
        let held = this.held.take().expect("an item is held");
        *this.credit = Credit::after_wait(held.deadline, now);
        #[cfg(feature = "metrics")]
        shared.metrics.waited(now.saturating_sub(held.since));
        Poll::Ready(Some(held.release().0))
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
        timer: Timer,
        // This stream's own credit for its timer's lateness, and the key it was earned on.
        credit: Option<(K, Credit)>,
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
            timer: Timer::default(),
            credit: None,
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
        let shared = this.limiter.shared();
        let held = match this.held {
            Some(held) => held,
            None => {
                if *this.done {
                    return Poll::Ready(None);
                }
                let Some(item) = ready!(this.stream.poll_next(cx)) else {
                    *this.done = true;
                    return Poll::Ready(None);
                };
                let key = (this.key)(&item);
                let now = shared.clock.now();
                let arrival = match this.credit {
                    Some((credited, credit)) if *credited == key => credit.arrival(now),
                    _ => now,
                };
                let slot = shared.reserve(&key, arrival, now);
                let wake_at = if slot.0 > now {
                    slot.0
                } else {
                    match shared.release(&key, now) {
                        Ok(()) => return Poll::Ready(Some(item)),
                        Err(at) => at,
                    }
                };
                this.timer.arm(&shared.clock, wake_at, now);
                let refund = KeyRefund {
                    shared: Arc::clone(shared),
                    key,
                    refund: KeyedShared::refund,
                };
                this.held.insert(Held::new(item, slot, refund))
            }
        };
        let key = &held
            .refund
            .as_ref()
            .expect("a held slot has its refund")
            .key;
        let now = ready!(poll_release(
            held.deadline,
            this.timer,
            &shared.clock,
            cx,
            |now| shared.release(key, now),
        ));
        let held = this.held.take().expect("an item is held");
        let credit = Credit::after_wait(held.deadline, now);
        let (item, refund) = held.release();
        *this.credit = Some((refund.key, credit));
        Poll::Ready(Some(item))
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
