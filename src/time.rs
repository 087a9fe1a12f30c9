//! Time that cannot overflow: every deadline computed from a user's duration saturates.
//!
//! `Instant::now() + Duration::MAX` panics, and a clock cannot add much more than a few
//! centuries on some platforms. So every wait the crate derives from a duration it was given
//! (a batch's `wait`, a debounce's `quiet`, a backoff, a timeout, a dedupe window, a rate
//! limiter's period) goes through [`deadline`]: a duration longer than [`FAR_FUTURE`] waits
//! that long, about 30 years, the same horizon as tokio's own far deadlines. In practice such a
//! wait never ends, and no duration, however large, panics.
//!
//! [`fine`] is a timer for the last stretch of a wait, with sub-millisecond wake-ups on a real
//! clock (the rate limiters wait on it).

pub(crate) mod fine;

use std::time::Duration;

use tokio::time::{Instant, sleep_until};

/// About 30 years: the longest wait the crate makes (as tokio's `Instant::far_future`).
pub(crate) const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// When a wait of `d` that starts at `now` ends: `now + d`, or [`FAR_FUTURE`] after `now` if
/// `d` is longer.
#[inline]
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    // `now + FAR_FUTURE` fits: tokio makes the same assumption for its own far deadlines.
    now + d.min(FAR_FUTURE)
}

/// Sleeps for `d` on tokio's timer (not at all for zero), never panicking however large `d` is.
pub(crate) async fn sleep(d: Duration) {
    if !d.is_zero() {
        sleep_until(deadline(Instant::now(), d)).await;
    }
}

/// `d` in nanoseconds, saturating at `u64::MAX` (584 years).
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_saturate_at_the_far_future() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(deadline(now, FAR_FUTURE), now + FAR_FUTURE);
        assert_eq!(deadline(now, Duration::MAX), now + FAR_FUTURE);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
        assert_eq!(nanos(Duration::from_millis(3)), 3_000_000);
    }
}
