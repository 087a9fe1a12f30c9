//! [`RateLimiter`] and [`KeyedRateLimiter`]: shared GCRA quotas on tokio's clock, and the
//! [`rate_limit`](crate::PipelineExt::rate_limit) / [`rate_limit_by`](crate::PipelineExt::rate_limit_by)
//! streams.

mod gcra;
mod keyed;
mod stream;

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use tokio::time::{Instant, sleep_until};

use crate::error::{ConfigError, nonzero, or_panic};
use gcra::{Gcra, Tat, Timeline};

pub use keyed::KeyedRateLimiter;
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
/// Each cell is given an absolute deadline on the quota's timeline, and a waiter whose timer
/// fires late does not push the timeline back: the cells that became due meanwhile are released
/// at once when it wakes, never before their deadlines. So the achieved rate matches the quota
/// even when the interval is far below the timer's resolution (about 1 ms): at 100 000 cells per
/// second with burst 1, a wake-up releases the ~100 cells due in that millisecond. Below the
/// timer's resolution the burst is therefore honoured on average over one timer tick, and over
/// any longer window the count never exceeds what the quota allows since the window began.
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
#[derive(Clone)]
pub struct RateLimiter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    gcra: Gcra,
    clock: Timeline,
    tat: Tat,
}

impl Shared {
    fn new(gcra: Gcra) -> Self {
        Self {
            gcra,
            clock: Timeline::new(),
            tat: Tat::default(),
        }
    }

    /// Reserves the next slot at `now`: `None` if the cell conforms at once.
    #[inline]
    fn reserve(&self, now: Instant) -> Option<(u64, u64, u64)> {
        let now = self.clock.nanos(now);
        let (deadline, before, after) = self.tat.reserve(&self.gcra, self.clock.effective(now));
        (deadline > now).then_some((deadline, before, after))
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
    /// If `b` is zero.
    #[track_caller]
    #[must_use]
    pub fn burst(self, b: u32) -> Self {
        or_panic(nonzero("b", u64::from(b)));
        Self::from_gcra(self.shared.gcra.with_burst(b))
    }

    fn from_gcra(gcra: Gcra) -> Self {
        Self {
            shared: Arc::new(Shared::new(gcra)),
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

    /// The quota, as governor's [`Quota`].
    pub fn quota(&self) -> Quota {
        quota_of(&self.shared.gcra)
    }

    /// Takes one cell if it conforms now, without waiting: `true` if it was taken.
    pub fn check(&self) -> bool {
        let now = self.shared.clock.nanos(Instant::now());
        let effective = self.shared.clock.effective(now);
        self.shared.tat.try_take(&self.shared.gcra, effective, now)
    }

    /// Waits until one cell conforms to the quota and takes it: the same budget as every stream
    /// and caller sharing this limiter.
    ///
    /// Waiters are served in the order they call: each call reserves the next slot on the
    /// quota's timeline at once and sleeps until it (on tokio's timer).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes gives its slot back if no later slot was reserved
    /// since; otherwise that slot goes unused (the limiter never runs faster than its quota).
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
        if let Some((deadline, before, after)) = self.shared.reserve(Instant::now()) {
            let slot = Slot::new(&self.shared, deadline, before, after);
            slot.wait().await;
        }
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

    async fn wait(mut self) {
        sleep_until(self.shared.clock.instant(self.deadline)).await;
        self.armed = false;
        let now = self.shared.clock.nanos(Instant::now());
        self.shared.clock.woke(self.deadline, now);
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
    /// A limiter enforcing governor's `quota`, with the quota's own burst.
    fn from(quota: Quota) -> Self {
        Self::from_gcra(Gcra::from_quota(&quota))
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
