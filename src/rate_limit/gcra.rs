//! The generic cell rate algorithm on tokio's clock, with reservations.
//!
//! Time is kept as nanoseconds since a base [`Instant`] taken when the limiter was built, so a
//! theoretical arrival time fits in one `AtomicU64` and a paused tokio clock drives everything.
//!
//! A quota keeps two schedules. The slots ([`Tat`]) give each cell a deadline and each waiter
//! its place in line; the releases ([`Released`]) record when cells actually went out, and
//! hold back a cell whose release would put more than `burst + (T + 1 tick) / interval` cells
//! in some window of length `T` (a consumer polled late, a runtime that stalled). Timer lateness
//! is made up per waiter, never on the shared state: see [`Credit`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Quota;

use crate::error::{ConfigError, nonzero};
use tokio::time::Instant;

/// The quota in the algorithm's own terms: the emission interval `t` and the burst tolerance
/// `tol = (burst - 1) * t`, both in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    t: u64,
    tol: u64,
    burst: u32,
}

impl Gcra {
    /// `rate` cells per second, burst 1; the interval is rounded up, so the limiter never
    /// runs faster than `rate`. An error names `rate` if it is zero.
    pub(crate) fn try_per_second(rate: u32) -> Result<Self, ConfigError> {
        nonzero("rate", u64::from(rate))?;
        Ok(Self::new(
            Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(rate))),
            1,
        ))
    }

    /// One cell per `period`, burst 1. An error names `period` if it is zero.
    pub(crate) fn try_per(period: Duration) -> Result<Self, ConfigError> {
        if period.is_zero() {
            return Err(ConfigError::new("period", "must be greater than zero"));
        }
        Ok(Self::new(period, 1))
    }

    pub(crate) fn new(interval: Duration, burst: u32) -> Self {
        let t = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Self {
            t,
            tol: t.saturating_mul(u64::from(burst - 1)),
            burst,
        }
    }

    pub(crate) fn from_quota(quota: &Quota) -> Self {
        Self::new(quota.replenish_interval(), quota.burst_size().get())
    }

    pub(crate) fn with_burst(self, burst: u32) -> Self {
        Self::new(Duration::from_nanos(self.t), burst)
    }

    pub(crate) fn interval(&self) -> Duration {
        Duration::from_nanos(self.t)
    }

    pub(crate) fn burst(&self) -> u32 {
        self.burst
    }

    /// Reserves the next slot for a cell that arrives at `now`, given the theoretical arrival
    /// time `tat`. Returns the slot's deadline (`<= now`: conforming at once) and the new `tat`.
    #[inline]
    pub(crate) fn reserve(&self, tat: u64, now: u64) -> (u64, u64) {
        let deadline = now.max(tat.saturating_sub(self.tol));
        (deadline, tat.max(deadline).saturating_add(self.t))
    }

    /// Releases a cell at `now`, given the release schedule's theoretical time `released`: the
    /// new `released`, or `Err(at)`, the earliest instant the cell may go out.
    ///
    /// This is the GCRA on release instants with a tolerance of one timer tick beyond the
    /// burst's, which holds exactly when every window of length `T` has at most
    /// `burst + (T + 1 tick) / interval` releases.
    #[inline]
    pub(crate) fn release(&self, released: u64, now: u64) -> Result<u64, u64> {
        let earliest = released.saturating_sub(self.tol.saturating_add(TICK));
        if earliest > now {
            Err(earliest)
        } else {
            Ok(released.max(now).saturating_add(self.t))
        }
    }

    /// Whether a key whose schedules are `tat` and `released` is indistinguishable from a fresh
    /// one from `now` on: for every arrival from one tick before `now` (the most a waiter's
    /// [`Credit`] back-dates) and every release from `now`.
    #[inline]
    pub(crate) fn is_idle(&self, tat: u64, released: u64, now: u64) -> bool {
        tat.saturating_add(TICK) <= now && released <= now
    }
}

/// One tick of tokio's timer (its resolution, 1 ms), in nanoseconds: the most timer lateness a
/// waiter may make up (the most any reservation is back-dated), and the release schedule's
/// tolerance beyond the burst.
pub(crate) const TICK: u64 = 1_000_000;

/// The limiter's view of tokio's clock: nanoseconds since the limiter was built.
#[derive(Debug)]
pub(crate) struct Timeline {
    base: Instant,
}

impl Timeline {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    #[inline]
    pub(crate) fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    #[inline]
    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.base + Duration::from_nanos(nanos)
    }

    /// Now, on this timeline.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.nanos(Instant::now())
    }
}

/// A waiter's own credit for the lateness of its last timer: `late` (at most one tick) as of
/// `at`, the instant its slot was released.
///
/// When a timer fires late, the slots that passed meanwhile belong to the waiter that was
/// sleeping: for one tick after the release, that waiter's next reservations are taken as of
/// `now - late`, so a stream keeps an absolute schedule even when its interval is far below the
/// timer's resolution. The credit is private (a stream, a handle, and for a keyed limiter one
/// key): other streams, direct callers, checks and keys never see it, so they get no more than
/// the burst at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Credit {
    late: u64,
    at: u64,
}

impl Credit {
    /// The credit of a waiter whose slot due at `deadline` was released at `now`.
    #[inline]
    pub(crate) fn after_wait(deadline: u64, now: u64) -> Self {
        Self {
            late: now.saturating_sub(deadline).min(TICK),
            at: now,
        }
    }

    /// The instant a reservation made at `now` is taken as of.
    #[inline]
    pub(crate) fn arrival(self, now: u64) -> u64 {
        if self.late != 0 && now.saturating_sub(self.at) <= TICK {
            now.saturating_sub(self.late)
        } else {
            now
        }
    }
}

/// A [`Credit`] kept in a shared handle, for its direct callers.
///
/// The two halves are read and written separately: a torn read pairs a lateness of at most one
/// tick with another release's instant, which still back-dates by at most one tick.
#[derive(Debug, Default)]
pub(crate) struct HandleCredit {
    late: AtomicU64,
    at: AtomicU64,
}

impl HandleCredit {
    #[inline]
    pub(crate) fn get(&self) -> Credit {
        Credit {
            late: self.late.load(Ordering::Relaxed),
            at: self.at.load(Ordering::Relaxed),
        }
    }

    #[inline]
    pub(crate) fn set(&self, credit: Credit) {
        self.at.store(credit.at, Ordering::Relaxed);
        self.late.store(credit.late, Ordering::Relaxed);
    }
}

/// One theoretical arrival time, shared lock-free.
#[derive(Debug, Default)]
pub(crate) struct Tat(AtomicU64);

impl Tat {
    /// Reserves a slot at `now`; returns `(deadline, tat before, tat after)`, where "before"
    /// is the slot's own start (the old `tat`, or the deadline if the line was idle), so the
    /// slot is always `after - before` long.
    #[inline]
    pub(crate) fn reserve(&self, gcra: &Gcra, now: u64) -> (u64, u64, u64) {
        let mut before = self.0.load(Ordering::Acquire);
        loop {
            let (deadline, after) = gcra.reserve(before, now);
            match self
                .0
                .compare_exchange_weak(before, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return (deadline, before.max(deadline), after),
                Err(actual) => before = actual,
            }
        }
    }

    /// Takes a slot at `now` only if it conforms at once: `(tat before, tat after)`; `None`
    /// leaves the state untouched.
    #[inline]
    pub(crate) fn try_take(&self, gcra: &Gcra, now: u64) -> Option<(u64, u64)> {
        let mut before = self.0.load(Ordering::Acquire);
        loop {
            let (deadline, after) = gcra.reserve(before, now);
            if deadline > now {
                return None;
            }
            match self
                .0
                .compare_exchange_weak(before, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some((before.max(deadline), after)),
                Err(actual) => before = actual,
            }
        }
    }

    /// Gives back a reserved slot `before..after` (as [`reserve`](Self::reserve) returned it).
    ///
    /// If it is the last slot, the line goes back to where it was. If later slots were reserved
    /// since, their waiters keep them, and the line is shortened by one slot instead: the hole
    /// goes to the next newcomer, whose slot may then fall due with a later waiter's. That never
    /// lets the quota be exceeded, because every release also passes the release schedule
    /// ([`Released`]); it only keeps a cancelled waiter's cell from being lost, so that waiters
    /// dropped in any order leave the line as if they had never come.
    #[inline]
    pub(crate) fn refund(&self, before: u64, after: u64) {
        if self
            .0
            .compare_exchange(after, before, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            let slot = after - before;
            let _ = self
                .0
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                    Some(tat.saturating_sub(slot))
                });
        }
    }
}

/// The release schedule's theoretical time, shared lock-free (see [`Gcra::release`]).
#[derive(Debug, Default)]
pub(crate) struct Released(AtomicU64);

impl Released {
    /// Releases a cell at `now`, or returns the earliest instant it may go out.
    #[inline]
    pub(crate) fn release(&self, gcra: &Gcra, now: u64) -> Result<(), u64> {
        let mut before = self.0.load(Ordering::Acquire);
        loop {
            let after = gcra.release(before, now)?;
            match self
                .0
                .compare_exchange_weak(before, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => before = actual,
            }
        }
    }

    /// Whether a cell could be released at `now`.
    #[inline]
    pub(crate) fn conforms(&self, gcra: &Gcra, now: u64) -> bool {
        gcra.release(self.0.load(Ordering::Acquire), now).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_per_interval() {
        let g = Gcra::new(Duration::from_nanos(10), 3);
        let mut tat = 0;
        let mut deadlines = Vec::new();
        for _ in 0..5 {
            let (d, next) = g.reserve(tat, 100);
            deadlines.push(d);
            tat = next;
        }
        assert_eq!(deadlines, [100, 100, 100, 110, 120]);
    }

    #[test]
    fn idle_time_refills_up_to_the_burst_only() {
        let g = Gcra::new(Duration::from_nanos(10), 2);
        let (_, tat) = g.reserve(0, 100);
        let (_, tat) = g.reserve(tat, 100);
        // long idle: two at once, then paced
        let (d1, tat) = g.reserve(tat, 1_000);
        let (d2, tat) = g.reserve(tat, 1_000);
        let (d3, _) = g.reserve(tat, 1_000);
        assert_eq!((d1, d2, d3), (1_000, 1_000, 1_010));
    }

    #[test]
    fn a_key_is_idle_one_tick_after_regaining_its_burst() {
        let g = Gcra::new(Duration::from_nanos(10), 1);
        assert!(!g.is_idle(100, 100, 100));
        assert!(!g.is_idle(100, 100, 100 + TICK - 1));
        assert!(g.is_idle(100, 100, 100 + TICK));
        // and once its releases, which may lag its slots, are past too
        assert!(!g.is_idle(100, 200 + TICK, 100 + TICK));
    }

    #[test]
    fn releases_allow_one_tick_beyond_the_burst() {
        let g = Gcra::new(Duration::from_micros(100), 2);
        let now = 50 * TICK;
        // burst 2 plus one tick of 100 µs intervals: 12 at one instant, the 13th 100 µs later
        let mut released = 0;
        for _ in 0..12 {
            released = g.release(released, now).unwrap();
        }
        assert_eq!(g.release(released, now), Err(now + 100_000));
        // after an idle spell, the same again
        let later = now + 10 * TICK;
        assert_eq!(g.release(released, later), Ok(later + 100_000));
    }

    #[test]
    fn credit_is_the_lateness_for_one_tick_after_the_release() {
        assert_eq!(Credit::default().arrival(7 * TICK), 7 * TICK);
        let late = TICK / 4;
        let credit = Credit::after_wait(10 * TICK, 10 * TICK + late);
        assert_eq!(credit.arrival(10 * TICK + late), 10 * TICK);
        assert_eq!(credit.arrival(11 * TICK + late), 11 * TICK);
        assert_eq!(credit.arrival(11 * TICK + late + 1), 11 * TICK + late + 1);
        // never more than one tick, however late the release
        let credit = Credit::after_wait(0, 50 * TICK);
        assert_eq!(credit.arrival(50 * TICK), 49 * TICK);
    }

    #[test]
    fn a_handle_credit_holds_what_was_set() {
        let h = HandleCredit::default();
        assert_eq!(h.get(), Credit::default());
        let c = Credit::after_wait(3, 9);
        h.set(c);
        assert_eq!(h.get(), c);
    }
}
