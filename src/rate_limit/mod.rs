//! [`RateLimiter`] and [`KeyedRateLimiter`]: shared GCRA quotas on tokio's clock, and the
//! [`rate_limit`](crate::PipelineExt::rate_limit) / [`rate_limit_by`](crate::PipelineExt::rate_limit_by)
//! streams.

mod gcra;
mod keyed;
mod quota;
mod stream;

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep_until;

use crate::error::{ConfigError, nonzero, or_panic};
use gcra::{Credit, Gcra, HandleCredit, Released, Tat, Timeline};

pub use keyed::KeyedRateLimiter;
pub use quota::Quota;
pub use stream::{RateLimit, RateLimitBy};

/// A rate limit shared by every clone: streams ([`rate_limit`](crate::PipelineExt::rate_limit))
/// and direct callers ([`until_ready`](Self::until_ready)) holding clones of one limiter draw on
/// one quota.
///
/// The quota is a number of cells per period with a burst, enforced with the generic cell rate
/// algorithm (GCRA, as in [governor]): cells conform at most once per
/// [`interval`](Self::interval) on average, and up to [`burst_size`](Self::burst_size) at once
/// after an idle spell. All waiting uses tokio's timer, so on a paused clock cells are released
/// at exact instants.
///
/// # Accuracy at high rates
///
/// Each cell is given an absolute deadline on the quota's timeline. tokio's timer has a
/// resolution of one tick (1 ms), so a waiter's timer fires up to a tick after its slot (more
/// on a busy runtime). A waiter whose timer fired late keeps that lateness, up to one tick, as a
/// credit of its own: for one tick after the release, its next reservations are taken as of
/// that much earlier, so the slots that passed while it slept are released at once when it
/// wakes, never before their deadlines. A stream whose interval is far below the timer's
/// resolution thus releases about one tick's worth of cells per wake-up: at 100 000 cells per
/// second, the ~100 cells due in that millisecond.
///
/// The credit belongs to the waiter whose timer was late (the stream, the handle of a
/// [`until_ready`](Self::until_ready) caller): other streams, other handles and
/// [`check`](Self::check) never see it, so they get at most the burst at once.
///
/// The limiter also keeps the instants at which cells actually went out, and holds back a cell
/// whose release would put more than `burst + (T + 1 ms) / interval` cells in some window of
/// length `T`: a consumer that was busy when its slot came (or a runtime that stalled) gets its
/// cell as soon as that allows, keeping its place in line, but the slots missed meanwhile are
/// not released late on top of the ones due now. Over long windows that is the quota; at one
/// instant, the burst plus one tick's worth of cells.
///
/// The price is accuracy when the interval is below the timer's resolution and the burst is
/// small: a wake-up releases at most `burst + 1 ms / interval` cells, and tokio's wake-ups come
/// somewhat more than one tick apart (timer slack, scheduling), so such a limiter runs below its
/// quota, by more on a busy runtime. A larger burst absorbs the lateness: no slot is lost while
/// a waiter's timer is late by at most one tick plus `burst - 1` intervals.
///
/// ```
/// use std::time::Duration;
/// use stagepipe::RateLimiter;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let limiter = RateLimiter::per_second(10).burst(2);
/// let start = Instant::now();
/// for _ in 0..4 {
///     limiter.until_ready().await;
/// }
/// // two at once (the burst), then one every 100 ms
/// assert_eq!(start.elapsed(), Duration::from_millis(200));
/// # }
/// ```
///
/// [governor]: https://docs.rs/governor
pub struct RateLimiter {
    shared: Arc<Shared>,
    /// This handle's own credit for timer lateness, for [`until_ready`](Self::until_ready).
    credit: HandleCredit,
}

#[derive(Debug)]
struct Shared {
    gcra: Gcra,
    clock: Timeline,
    /// The slots: each cell's deadline, and each waiter's place in line.
    tat: Tat,
    /// When cells actually went out.
    released: Released,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::RateLimitMetrics,
}

impl Shared {
    fn new(gcra: Gcra) -> Self {
        Self {
            gcra,
            clock: Timeline::new(),
            tat: Tat::default(),
            released: Released::default(),
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::RateLimitMetrics::new(),
        }
    }

    /// Reserves the next slot for a cell taken as of `arrival` (at most one tick before now):
    /// `(deadline, tat before, tat after)`; the cell conforms at once if `deadline <= now`.
    #[inline]
    fn reserve(&self, arrival: u64) -> (u64, u64, u64) {
        self.tat.reserve(&self.gcra, arrival)
    }

    /// Releases a cell whose slot is due, at `now`; `Err(at)` if it must wait until `at` so
    /// that no window holds more than `burst + (T + 1 ms) / interval` cells.
    #[inline]
    fn release(&self, now: u64) -> Result<(), u64> {
        let released = self.released.release(&self.gcra, now);
        #[cfg(feature = "metrics")]
        self.metrics.released(&released);
        released
    }
}

impl RateLimiter {
    /// At most `rate` cells per second, burst 1 (change it with [`burst`](Self::burst)).
    ///
    /// # Panics
    ///
    /// If `rate` is zero. [`try_per_second`](Self::try_per_second) returns the error instead.
    #[track_caller]
    pub fn per_second(rate: u32) -> Self {
        or_panic(Self::try_per_second(rate))
    }

    /// [`per_second`](Self::per_second), returning a [`ConfigError`] naming `rate` if it is zero.
    pub fn try_per_second(rate: u32) -> Result<Self, ConfigError> {
        Gcra::try_per_second(rate).map(Self::from_gcra)
    }

    /// One cell per `period`, burst 1 (change it with [`burst`](Self::burst)).
    ///
    /// # Panics
    ///
    /// If `period` is zero. [`try_per`](Self::try_per) returns the error instead.
    #[track_caller]
    pub fn per(period: Duration) -> Self {
        or_panic(Self::try_per(period))
    }

    /// [`per`](Self::per), returning a [`ConfigError`] naming `period` if it is zero.
    pub fn try_per(period: Duration) -> Result<Self, ConfigError> {
        Gcra::try_per(period).map(Self::from_gcra)
    }

    /// Allows up to `b` cells at once after an idle spell (the rate stays the same).
    ///
    /// This builds a new limiter: call it before sharing the handle (clones taken earlier keep
    /// their own quota and state).
    ///
    /// # Panics
    ///
    /// If `b` is zero. [`try_burst`](Self::try_burst) returns the error instead.
    #[track_caller]
    #[must_use]
    pub fn burst(self, b: u32) -> Self {
        or_panic(self.try_burst(b))
    }

    /// [`burst`](Self::burst), returning a [`ConfigError`] naming `b` if it is zero.
    pub fn try_burst(self, b: u32) -> Result<Self, ConfigError> {
        nonzero("b", u64::from(b))?;
        Ok(Self::from_gcra(self.shared.gcra.with_burst(b)))
    }

    fn from_gcra(gcra: Gcra) -> Self {
        Self::from_shared(Arc::new(Shared::new(gcra)))
    }

    fn from_shared(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            credit: HandleCredit::default(),
        }
    }

    /// The average time between two cells.
    pub fn interval(&self) -> Duration {
        self.shared.gcra.interval()
    }

    /// How many cells may pass at once after an idle spell.
    pub fn burst_size(&self) -> u32 {
        self.shared.gcra.burst()
    }

    /// The [`Quota`].
    pub fn quota(&self) -> Quota {
        quota_of(&self.shared.gcra)
    }

    /// Takes one cell if it conforms now, without waiting: `true` if it was taken.
    ///
    /// A check never makes up any waiter's timer lateness: it sees the quota as of now.
    pub fn check(&self) -> bool {
        let shared = &*self.shared;
        let now = shared.clock.now();
        if !shared.released.conforms(&shared.gcra, now) {
            return false;
        }
        let Some((before, after)) = shared.tat.try_take(&shared.gcra, now) else {
            return false;
        };
        if shared.release(now).is_err() {
            // Another release got in between: give the slot back.
            shared.tat.refund(before, after);
            return false;
        }
        true
    }

    /// Waits until one cell conforms to the quota and takes it: the same budget as every stream
    /// and caller sharing this limiter.
    ///
    /// Waiters are served in the order they call: each call reserves the next slot on the
    /// quota's timeline at once and sleeps until it (on tokio's timer).
    ///
    /// A call whose timer fired late keeps that lateness (at most one timer tick) as this
    /// handle's credit: the next call through the same handle within one tick is served as of
    /// that much earlier, so a loop of calls keeps the quota's rate even when the interval is
    /// below the timer's resolution. Clones have their own credit; other handles and streams
    /// never see it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes gives its slot back: waiters dropped in any
    /// order leave the limiter as if they had never come (the next caller does not wait for
    /// their slots), and it never runs faster than its quota.
    ///
    /// ```
    /// use stagepipe::RateLimiter;
    /// use tokio::time::{Duration, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limiter = RateLimiter::per(Duration::from_millis(50));
    /// let start = Instant::now();
    /// limiter.until_ready().await; // at once
    /// limiter.until_ready().await; // 50 ms later
    /// assert_eq!(start.elapsed(), Duration::from_millis(50));
    /// # }
    /// ```
    pub async fn until_ready(&self) {
        let shared = &*self.shared;
        let now = shared.clock.now();
        let (deadline, before, after) = shared.reserve(self.credit.get().arrival(now));
        let wake_at = if deadline > now {
            deadline
        } else {
            match shared.release(now) {
                Ok(()) => return,
                Err(at) => at,
            }
        };
        let slot = Slot::new(shared, deadline, before, after);
        self.credit.set(slot.wait(wake_at).await);
        #[cfg(feature = "metrics")]
        shared
            .metrics
            .waited(shared.clock.now().saturating_sub(now));
    }
}

/// A reserved slot whose deadline is still ahead: given back if dropped before it is released.
struct Slot<'a> {
    shared: &'a Shared,
    deadline: u64,
    before: u64,
    after: u64,
    armed: bool,
}

impl<'a> Slot<'a> {
    fn new(shared: &'a Shared, deadline: u64, before: u64, after: u64) -> Self {
        Self {
            shared,
            deadline,
            before,
            after,
            armed: true,
        }
    }

    /// Sleeps (first until `wake_at`) until the slot is due and its cell may be released, and
    /// releases it; returns the waiter's credit.
    async fn wait(mut self, mut wake_at: u64) -> Credit {
        let now = loop {
            sleep_until(self.shared.clock.instant(wake_at)).await;
            let now = self.shared.clock.now();
            if now < self.deadline {
                wake_at = self.deadline;
                continue;
            }
            match self.shared.release(now) {
                Ok(()) => break now,
                Err(at) => wake_at = at,
            }
        };
        self.armed = false;
        Credit::after_wait(self.deadline, now)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.tat.refund(self.before, self.after);
        }
    }
}

fn quota_of(gcra: &Gcra) -> Quota {
    let burst = NonZeroU32::new(gcra.burst()).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(gcra.interval())
        .expect("the interval is never zero")
        .allow_burst(burst)
}

impl From<Quota> for RateLimiter {
    /// A limiter enforcing `quota`, with the quota's own burst.
    fn from(quota: Quota) -> Self {
        Self::from_gcra(Gcra::from_quota(&quota))
    }
}

impl Clone for RateLimiter {
    /// Another handle on the same quota, with a credit of its own (see
    /// [`until_ready`](Self::until_ready)).
    fn clone(&self) -> Self {
        Self::from_shared(Arc::clone(&self.shared))
    }
}

impl From<&RateLimiter> for RateLimiter {
    /// A clone of the handle: the quota is shared.
    fn from(limiter: &RateLimiter) -> Self {
        limiter.clone()
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("interval", &self.interval())
            .field("burst", &self.burst_size())
            .finish_non_exhaustive()
    }
}
