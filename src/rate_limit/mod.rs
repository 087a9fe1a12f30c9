//! [`RateLimiter`] and [`KeyedRateLimiter`]: shared GCRA quotas on tokio's clock, and the
//! [`rate_limit`](crate::PipelineExt::rate_limit) / [`rate_limit_by`](crate::PipelineExt::rate_limit_by)
//! streams.

pub(crate) mod gcra;
mod keyed;
mod quota;
mod stream;

use std::num::NonZeroU32;
use std::sync::Arc;

use crate::time::fine;

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
/// resolution of one tick (1 ms) and wakes a task somewhat more than a tick after its deadline,
/// so waiters also use a fine timer: on a real clock a background thread (`stagepipe-timer`,
/// started by the first wait and parked while nothing waits) wakes a waiter within a fraction
/// of a millisecond of its deadline, or a quarter of a millisecond after its wait began if the
/// deadline is nearer than that (a waiter far above 1 000 cells per second is then woken a few
/// thousand times a second, not once per cell). tokio's clock stays the authority: a cell never
/// goes out before `tokio::time::Instant::now()` reaches its slot, and on a paused clock waits
/// follow tokio's timer as a plain `sleep_until` would.
///
/// A waiter whose timer fired late keeps that lateness, up to one tick, as a credit of its
/// own: for one tick after the release, its next reservations are taken as of that much
/// earlier, so the slots that passed while it slept are released at once when it wakes, never
/// before their deadlines. A stream whose interval is far below the timer's resolution thus
/// releases the cells that fell due while it slept at each wake-up: at 100 000 cells per
/// second, a few dozen every quarter of a millisecond.
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
/// The price: a wake-up more than a tick late (a busy machine, a runtime that stalled, a consumer
/// polled late) loses the slots beyond that tick when the interval is below the timer's
/// resolution and the burst is small, so such a limiter then runs below its quota. A larger
/// burst absorbs the lateness: no slot is lost while a waiter is late by at most one tick plus
/// `burst - 1` intervals.
///
/// # Shared across processes
///
/// With the cargo feature `redis`, [`RateLimiter::redis`] makes a handle whose budget lives in
/// Redis, shared by every process that uses the same name: the same methods and operators,
/// one round trip per decision (shared by the waiters that queue meanwhile), and a policy for
/// the time Redis cannot be reached. The accuracy notes above are the in-memory limiter's;
/// a Redis-backed one has its own bound (see [`RateLimiter::redis`]).
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
    /// The quota's state in Redis, for a handle made by [`redis`](Self::redis).
    #[cfg(feature = "redis")]
    redis: Option<crate::redis::RedisLimiter<()>>,
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

/// What taking a cell needs of a limiter's shared state: the same GCRA steps, on the one quota
/// of a [`RateLimiter`] (`Key = ()`) or on one key's quota of a [`KeyedRateLimiter`].
trait Limiter {
    type Key;

    fn clock(&self) -> &Timeline;

    /// Reserves the key's next slot for a cell taken as of `arrival` (at most one tick before
    /// `now`): `(deadline, tat before, tat after)`; the cell conforms at once if
    /// `deadline <= now`.
    fn reserve(&self, key: &Self::Key, arrival: u64, now: u64) -> (u64, u64, u64);

    /// Releases a cell of the key whose slot is due, at `now`; `Err(at)` if it must wait until
    /// `at` so that no window holds more than `burst + (T + 1 ms) / interval` of its cells.
    fn release(&self, key: &Self::Key, now: u64) -> Result<(), u64>;

    /// Gives a reserved slot back, if no later slot of the key was reserved since.
    fn refund(&self, key: &Self::Key, before: u64, after: u64);

    /// Notes that a cell waited `nanos` for its slot (published with feature `metrics`).
    fn waited(&self, _nanos: u64) {}
}

impl Limiter for Shared {
    type Key = ();

    #[inline]
    fn clock(&self) -> &Timeline {
        &self.clock
    }

    #[inline]
    fn reserve(&self, (): &(), arrival: u64, _now: u64) -> (u64, u64, u64) {
        self.tat.reserve(&self.gcra, arrival)
    }

    #[inline]
    fn release(&self, (): &(), now: u64) -> Result<(), u64> {
        let released = self.released.release(&self.gcra, now);
        #[cfg(feature = "metrics")]
        self.metrics.released(&released);
        released
    }

    fn refund(&self, (): &(), before: u64, after: u64) {
        self.tat.refund(before, after);
    }

    #[cfg(feature = "metrics")]
    fn waited(&self, nanos: u64) {
        self.metrics.waited(nanos);
    }
}

/// A slot reserved for a cell that may not go out yet.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    deadline: u64,
    before: u64,
    after: u64,
    /// When to look again: the deadline, or the instant the release schedule allows.
    wake_at: u64,
}

/// Reserves the next slot of `key` for a cell taken as of `arrival` (at most one tick before
/// `now`) and releases the cell if it may go out now: `Ok(())`, or the slot to wait for.
#[inline]
fn take_or_reserve<L: Limiter>(
    shared: &L,
    key: &L::Key,
    arrival: u64,
    now: u64,
) -> Result<(), Reserved> {
    let (deadline, before, after) = shared.reserve(key, arrival, now);
    let wake_at = if deadline > now {
        deadline
    } else {
        match shared.release(key, now) {
            Ok(()) => return Ok(()),
            Err(at) => at,
        }
    };
    Err(Reserved {
        deadline,
        before,
        after,
        wake_at,
    })
}

/// Takes a cell of `key` as of `arrival`, sleeping (on the fine timer, see [`fine`]) until its
/// slot is due and it may go out: `None` if it went out at once, else the waiter's credit (see [`Credit`]).
/// Dropping the future before it completes gives the slot back if no later slot of the key was
/// reserved since.
async fn take<L: Limiter>(shared: &L, key: &L::Key, arrival: u64, now: u64) -> Option<Credit> {
    let reserved = take_or_reserve(shared, key, arrival, now).err()?;
    let mut slot = Slot {
        shared,
        key,
        reserved,
        armed: true,
    };
    let start = now;
    let mut now = now;
    let mut wake_at = reserved.wake_at;
    loop {
        fine::sleep_until(shared.clock().instant(wake_at, now)).await;
        now = shared.clock().now();
        if now < reserved.deadline {
            wake_at = reserved.deadline;
            continue;
        }
        match shared.release(key, now) {
            Ok(()) => break,
            Err(at) => wake_at = at,
        }
    }
    slot.armed = false;
    shared.waited(now.saturating_sub(start));
    Some(Credit::after_wait(reserved.deadline, now))
}

/// A slot being waited for, given back if the wait is dropped before its cell went out.
struct Slot<'a, L: Limiter> {
    shared: &'a L,
    key: &'a L::Key,
    reserved: Reserved,
    armed: bool,
}

impl<L: Limiter> Drop for Slot<'_, L> {
    fn drop(&mut self) {
        if self.armed {
            let Reserved { before, after, .. } = self.reserved;
            self.shared.refund(self.key, before, after);
        }
    }
}

impl RateLimiter {
    quota_methods!("");

    fn from_gcra(gcra: Gcra) -> Self {
        Self::from_shared(Arc::new(Shared {
            gcra,
            clock: Timeline::new(),
            tat: Tat::default(),
            released: Released::default(),
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::RateLimitMetrics::new(),
        }))
    }

    fn from_shared(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            credit: HandleCredit::default(),
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    /// Takes one cell if it conforms now, without waiting: `true` if it was taken.
    ///
    /// A check never makes up any waiter's timer lateness: it sees the quota as of now.
    ///
    /// On a Redis-backed limiter ([`RateLimiter::redis`]) a check cannot make the round trip
    /// a decision takes, and it never decides without one: it returns `false` and takes
    /// nothing. Use [`try_acquire`](Self::try_acquire), which works on both.
    pub fn check(&self) -> bool {
        #[cfg(feature = "redis")]
        if self.redis.is_some() {
            return false;
        }
        self.check_at(self.shared.clock.now())
    }

    /// [`check`](Self::check) at `now` (on the limiter's timeline), of an in-memory limiter.
    #[inline]
    fn check_at(&self, now: u64) -> bool {
        let shared = &*self.shared;
        if !shared.released.conforms(&shared.gcra, now) {
            return false;
        }
        let Some((before, after)) = shared.tat.try_take(&shared.gcra, now) else {
            return false;
        };
        if shared.release(&(), now).is_err() {
            // Another release got in between: give the slot back.
            shared.tat.refund(before, after);
            return false;
        }
        true
    }

    /// The fast path of [`until_ready`](Self::until_ready) for a caller that has just read the
    /// clock (`now`): takes a cell if one goes out at once, exactly as `until_ready` would then,
    /// and returns `true`. `false` takes nothing and changes nothing: the cell must be waited
    /// for, or this handle's credit would back-date the arrival, or the limiter is in Redis;
    /// the caller then waits in `until_ready`.
    #[inline]
    pub(crate) fn try_ready_at(&self, now: tokio::time::Instant) -> bool {
        #[cfg(feature = "redis")]
        if self.redis.is_some() {
            return false;
        }
        let now = self.shared.clock.nanos(now);
        self.credit.get().arrival(now) == now && self.check_at(now)
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
    /// On a Redis-backed limiter ([`RateLimiter::redis`]), the call joins this process's queue
    /// for the next round trip, then sleeps until its cell's deadline converted to the local
    /// clock (never before it); the timer credit does not apply. While Redis cannot be reached,
    /// the handle's [`Unavailable`](crate::redis::Unavailable) policy decides.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes gives its slot back: waiters dropped in any
    /// order leave the limiter as if they had never come (the next caller does not wait for
    /// their slots), and it never runs faster than its quota.
    ///
    /// On a Redis-backed limiter, a dropped waiter's cell goes to a waiter of this process
    /// queued for the next round trip if there is one, else back to Redis if no later
    /// reservation was made since (a compare-and-set); otherwise it is spent (the fleet runs
    /// one cell below its quota, never above).
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
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return redis.acquire(&()).await;
        }
        let shared = &*self.shared;
        let now = shared.clock.now();
        if let Some(credit) = take(shared, &(), self.credit.get().arrival(now), now).await {
            self.credit.set(credit);
        }
    }

    /// Takes one cell if it conforms now, without waiting for a later one: `true` if it was
    /// taken. On an in-memory limiter this is [`check`](Self::check); on a Redis-backed one
    /// ([`RateLimiter::redis`]) it is one round trip, and while Redis is unavailable the
    /// handle's policy decides: [`FailOpen`](crate::redis::Unavailable::FailOpen) takes,
    /// [`FailClosed`](crate::redis::Unavailable::FailClosed) refuses (a try never waits for
    /// Redis to come back), [`Local`](crate::redis::Unavailable::Local) checks the local
    /// fallback quota.
    ///
    /// ```
    /// use stagepipe::RateLimiter;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limiter = RateLimiter::per_second(10).burst(2);
    /// assert!(limiter.try_acquire().await);
    /// assert!(limiter.try_acquire().await);
    /// assert!(!limiter.try_acquire().await); // the burst is spent
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes takes no cell on an in-memory limiter; on a
    /// Redis-backed one, a round trip already sent may have taken one.
    pub async fn try_acquire(&self) -> bool {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return redis.try_acquire(&()).await;
        }
        self.check()
    }
}

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
impl RateLimiter {
    /// A limiter whose budget is kept in Redis under `name`: every handle made with the same
    /// name and quota, in this process or any other on the same Redis, draws on one budget
    /// (and clones share it as usual). All the operators and methods of a limiter work with it:
    /// [`until_ready`](Self::until_ready), [`try_acquire`](Self::try_acquire),
    /// [`rate_limit`](crate::PipelineExt::rate_limit), [`Call::rate_limit`](crate::Call::rate_limit)
    /// and the tower layer. [`check`](Self::check) cannot make a round trip and refuses.
    ///
    /// Each decision is one atomic script on Redis's clock (GCRA, absolute deadlines); waiters
    /// of one process that arrive while a round trip is in flight are served together by the
    /// next one. A deadline is converted to the local clock so that a cell is never released
    /// before it: in any window of length `T`, the fleet releases at most
    /// `burst + ⌊(T + D) / interval⌋` cells, where `D` is how late a release came after its
    /// Redis deadline (the reply's trip back and the timer's lateness): one cell more than
    /// `burst + T / interval` while `D` is below one interval. The interval is rounded up to
    /// whole microseconds. See the [module docs](crate::redis) and `src/redis/limiter.rs` for
    /// the design.
    ///
    /// Handles sharing a name must share the quota too (each reservation is computed with the
    /// caller's quota). The Redis key is `stagepipe:limiter:{name}`; it expires once idle.
    /// While Redis cannot be reached, the handle follows its [`Unavailable`](crate::redis::Unavailable)
    /// policy: fail closed (wait) unless set with [`when_unavailable`](Self::when_unavailable).
    ///
    /// No round trip is made here: the connection is used by the first decision. Waiting
    /// spawns a task on the current tokio runtime for each round trip.
    ///
    /// ```no_run
    /// use std::num::NonZeroU32;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use stagepipe::{Quota, redis::Unavailable};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), stagepipe::redis::RedisError> {
    /// let conn = stagepipe::redis::connect("redis://127.0.0.1/").await?;
    /// // 100 calls a second to the partner API, for the whole fleet
    /// let quota = Quota::per_second(NonZeroU32::new(100).unwrap());
    /// let limiter = RateLimiter::redis(&conn, "partner-api", quota)
    ///     .when_unavailable(Unavailable::Local { replicas: NonZeroU32::new(4).unwrap() });
    /// let sent = stream::iter(0..10).rate_limit(&limiter).count().await;
    /// assert_eq!(sent, 10);
    /// # Ok(())
    /// # }
    /// ```
    pub fn redis(conn: &crate::redis::ConnectionManager, name: &str, quota: Quota) -> Self {
        let gcra = Gcra::from_quota(&quota);
        let mut limiter = Self::from_gcra(gcra);
        limiter.redis = Some(crate::redis::RedisLimiter::direct(conn, name, &gcra));
        limiter
    }

    redis_limiter_accessors! {
        /// Sets what this handle does while Redis cannot be reached (see
        /// [`Unavailable`](crate::redis::Unavailable)); the default is
        /// [`FailClosed`](crate::redis::Unavailable::FailClosed). Clones made afterwards keep it;
        /// the budget is the same. An in-memory limiter never needs Redis: the policy has no
        /// effect on it.
        ///
        /// ```no_run
        /// use std::num::NonZeroU32;
        /// use stagepipe::{Quota, RateLimiter, redis::Unavailable};
        ///
        /// # #[tokio::main]
        /// # async fn main() {
        /// let conn = stagepipe::redis::connect_lazy("redis://127.0.0.1/").unwrap();
        /// let quota = Quota::per_second(NonZeroU32::new(50).unwrap());
        /// let best_effort = RateLimiter::redis(&conn, "thumbnails", quota)
        ///     .when_unavailable(Unavailable::FailOpen);
        /// best_effort.until_ready().await; // goes at once if Redis is down
        /// # }
        /// ```
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
        Self {
            shared: Arc::clone(&self.shared),
            credit: HandleCredit::default(),
            #[cfg(feature = "redis")]
            redis: self.redis.clone(),
        }
    }
}

from_ref_handle!(impl[] RateLimiter, "the quota");

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("RateLimiter");
        s.field("interval", &self.interval())
            .field("burst", &self.burst_size());
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            s.field("redis", redis);
        }
        s.finish_non_exhaustive()
    }
}
