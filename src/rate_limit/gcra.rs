//! The generic cell rate algorithm on tokio's clock, with reservations.
//!
//! Time is kept as nanoseconds since a base [`Instant`] taken when the limiter was built, so a
//! theoretical arrival time fits in one `AtomicU64` and a paused tokio clock drives everything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::Quota;

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

    /// Whether a key whose state is `tat` is indistinguishable from a fresh one at `now`.
    #[inline]
    pub(crate) fn is_idle(&self, tat: u64, now: u64) -> bool {
        tat <= now
    }
}

/// The limiter's view of tokio's clock, and the timer lateness it has observed.
///
/// When a waiter's timer fires late, the slots that passed while it slept are still owed to the
/// cells that were waiting: for a short while after a late wake-up (as long as the lateness
/// itself), reservations are taken as of `now - lateness`, so the schedule keeps its absolute
/// deadlines and timer lateness does not accumulate. On a paused clock timers are exact and this
/// never applies.
#[derive(Debug)]
pub(crate) struct Timeline {
    base: Instant,
    late: AtomicU64,
    late_at: AtomicU64,
}

impl Timeline {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            late: AtomicU64::new(0),
            late_at: AtomicU64::new(0),
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

    /// `now`, moved back by the lateness of a recent late wake-up.
    #[inline]
    pub(crate) fn effective(&self, now: u64) -> u64 {
        let late = self.late.load(Ordering::Relaxed);
        if late == 0 {
            return now;
        }
        let at = self.late_at.load(Ordering::Relaxed);
        if now.saturating_sub(at) <= late {
            now.saturating_sub(late)
        } else {
            now
        }
    }

    /// Records that a waiter whose slot was due at `deadline` woke at `now`.
    #[inline]
    pub(crate) fn woke(&self, deadline: u64, now: u64) {
        let late = now.saturating_sub(deadline);
        if late == 0 {
            if self.late.load(Ordering::Relaxed) != 0 {
                self.late.store(0, Ordering::Relaxed);
            }
        } else {
            self.late_at.store(now, Ordering::Relaxed);
            self.late.store(late, Ordering::Relaxed);
        }
    }
}

/// One theoretical arrival time, shared lock-free.
#[derive(Debug, Default)]
pub(crate) struct Tat(AtomicU64);

impl Tat {
    /// Reserves a slot at `now`; returns `(deadline, tat before, tat after)`.
    #[inline]
    pub(crate) fn reserve(&self, gcra: &Gcra, now: u64) -> (u64, u64, u64) {
        let mut before = self.0.load(Ordering::Acquire);
        loop {
            let (deadline, after) = gcra.reserve(before, now);
            match self
                .0
                .compare_exchange_weak(before, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return (deadline, before, after),
                Err(actual) => before = actual,
            }
        }
    }

    /// Takes a slot at `now` only if it conforms at once; `false` leaves the state untouched.
    #[inline]
    pub(crate) fn try_take(&self, gcra: &Gcra, now: u64, real_now: u64) -> bool {
        let mut before = self.0.load(Ordering::Acquire);
        loop {
            let (deadline, after) = gcra.reserve(before, now);
            if deadline > real_now {
                return false;
            }
            match self
                .0
                .compare_exchange_weak(before, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => before = actual,
            }
        }
    }

    /// Gives a reserved slot back, if no later reservation was made since.
    #[inline]
    pub(crate) fn refund(&self, before: u64, after: u64) {
        let _ = self
            .0
            .compare_exchange(after, before, Ordering::AcqRel, Ordering::Relaxed);
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
}
