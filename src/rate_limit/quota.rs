//! `Quota`: how fast cells replenish and how many may be taken at once.

use std::num::NonZeroU32;
use std::time::Duration;

/// A rate: one cell replenishes every [`replenish_interval`](Self::replenish_interval), and up
/// to [`burst_size`](Self::burst_size) cells may be taken back to back.
///
/// The same vocabulary as governor's `Quota` (the constructors have the same names, arguments
/// and meaning), owned by this crate so that a rate limit costs no dependency. With the cargo
/// feature `governor`, a `governor::Quota` converts into this one with `From`.
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use stagepipe::Quota;
///
/// let five = NonZeroU32::new(5).unwrap();
/// let q = Quota::per_second(five);
/// assert_eq!(q.replenish_interval(), Duration::from_millis(200));
/// assert_eq!(q.burst_size(), five);
///
/// let q = Quota::with_period(Duration::from_millis(10)).unwrap().allow_burst(five);
/// assert_eq!(q.burst_size_replenished_in(), Duration::from_millis(50));
/// assert!(Quota::with_period(Duration::ZERO).is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    interval: Duration,
    burst: NonZeroU32,
}

impl Quota {
    /// `n` cells per `period`, spread evenly, with a burst of `n`.
    const fn spread(period: Duration, n: NonZeroU32) -> Self {
        let nanos = period.as_nanos() / n.get() as u128;
        // At most `period`'s nanoseconds, so it fits in a `u64` for any period used here.
        Self {
            interval: Duration::from_nanos(nanos as u64),
            burst: n,
        }
    }

    /// `max_burst` cells per second, with a burst of `max_burst`.
    pub const fn per_second(max_burst: NonZeroU32) -> Self {
        Self::spread(Duration::from_secs(1), max_burst)
    }

    /// `max_burst` cells per minute, with a burst of `max_burst`.
    pub const fn per_minute(max_burst: NonZeroU32) -> Self {
        Self::spread(Duration::from_secs(60), max_burst)
    }

    /// `max_burst` cells per hour, with a burst of `max_burst`.
    pub const fn per_hour(max_burst: NonZeroU32) -> Self {
        Self::spread(Duration::from_secs(3600), max_burst)
    }

    /// One cell every `replenish_1_per`, with a burst of 1; `None` if the period is zero.
    pub const fn with_period(replenish_1_per: Duration) -> Option<Self> {
        if replenish_1_per.is_zero() {
            return None;
        }
        Some(Self {
            interval: replenish_1_per,
            burst: NonZeroU32::MIN,
        })
    }

    /// The same rate with a burst of `max_burst` cells.
    pub const fn allow_burst(self, max_burst: NonZeroU32) -> Self {
        Self {
            burst: max_burst,
            ..self
        }
    }

    /// How many cells may be taken back to back.
    pub const fn burst_size(&self) -> NonZeroU32 {
        self.burst
    }

    /// How long one cell takes to replenish.
    pub const fn replenish_interval(&self) -> Duration {
        self.interval
    }

    /// How long a whole burst takes to replenish (saturating).
    pub fn burst_size_replenished_in(&self) -> Duration {
        self.interval.saturating_mul(self.burst.get())
    }
}

#[cfg(feature = "governor")]
#[cfg_attr(docsrs, doc(cfg(feature = "governor")))]
impl From<governor::Quota> for Quota {
    /// The same interval and burst.
    fn from(quota: governor::Quota) -> Self {
        Self {
            interval: quota.replenish_interval(),
            burst: quota.burst_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    #[test]
    fn rates_spread_the_period() {
        assert_eq!(
            Quota::per_second(n(3)).replenish_interval(),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(
            Quota::per_minute(n(60)).replenish_interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Quota::per_hour(n(2)).replenish_interval(),
            Duration::from_secs(1800)
        );
        assert_eq!(Quota::per_hour(n(2)).burst_size(), n(2));
        let huge = Quota::with_period(Duration::MAX).unwrap().allow_burst(n(9));
        assert_eq!(huge.burst_size_replenished_in(), Duration::MAX);
    }

    #[cfg(feature = "governor")]
    #[test]
    fn converts_from_governor() {
        let g = governor::Quota::per_second(n(4)).allow_burst(n(2));
        let q = Quota::from(g);
        assert_eq!(q, Quota::per_second(n(4)).allow_burst(n(2)));
    }
}
