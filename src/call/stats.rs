//! [`CallStats`] and [`CallStatsSnapshot`]: what a [`Call`](crate::Call) did and how long its
//! runs took.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::time::nanos;

/// Counters and a latency histogram shared by every clone, recorded by the
/// [`Call`](crate::Call)s built with [`stats`](crate::Call::stats).
///
/// A run counts once in `calls` when it starts and once in `successes`, `failures` or
/// `cancelled` when it ends; `retries`, `timeouts` and `rejected` count attempts. The latency of
/// a run (all its attempts, waits included) goes into a fixed-size histogram with logarithmic
/// buckets (eight per power of two), so memory stays at 8 KiB however many runs are recorded. A
/// percentile is reported as the mean of the values in its bucket: exact when they are equal (as
/// on a paused clock), and otherwise within an eighth of the true value. Times use `tokio::time::Instant`, so a paused clock measures them
/// exactly.
///
/// ```
/// use std::time::Duration;
/// use stagepipe::{Call, CallStats};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let stats = CallStats::new("lookup");
/// let call = Call::new(|n: u64| async move {
///     tokio::time::sleep(Duration::from_millis(n)).await;
///     Ok::<_, String>(n)
/// })
/// .stats(&stats);
/// for n in [10, 10, 10, 40] {
///     call.run(n).await.unwrap();
/// }
/// let s = stats.snapshot();
/// assert_eq!((s.calls, s.successes, s.failures), (4, 4, 0));
/// assert_eq!(s.p50, Duration::from_millis(10));
/// assert_eq!(s.max, Duration::from_millis(40));
/// println!("{s}");
/// # }
/// ```
#[derive(Clone)]
pub struct CallStats {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    calls: AtomicU64,
    // Successes are not counted apart: every finished run is in the histogram, so they are its
    // count less the failures (one atomic add less per run).
    failures: AtomicU64,
    cancelled: AtomicU64,
    retries: AtomicU64,
    timeouts: AtomicU64,
    rejected: AtomicU64,
    limiter_wait_ns: AtomicU64,
    latency: Histogram,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::CallMetrics,
}

impl CallStats {
    /// Creates a recorder named `name` (the name starts its `Display` line).
    pub fn new(name: impl Into<String>) -> Self {
        let counter = || AtomicU64::new(0);
        let name = name.into();
        Self {
            inner: Arc::new(Inner {
                #[cfg(feature = "metrics")]
                metrics: crate::metrics::CallMetrics::new(&name),
                name,
                calls: counter(),
                failures: counter(),
                cancelled: counter(),
                retries: counter(),
                timeouts: counter(),
                rejected: counter(),
                limiter_wait_ns: counter(),
                latency: Histogram::new(),
            }),
        }
    }

    /// The name given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A copy of the current figures.
    pub fn snapshot(&self) -> CallStatsSnapshot {
        let i = &self.inner;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let latency = i.latency.summary();
        // Read after the histogram, which a failure reaches after `failures` (release and
        // acquire): a failure is never taken for a success, though a snapshot taken while one
        // is being recorded may count one success too few.
        let failures = load(&i.failures);
        CallStatsSnapshot {
            name: i.name.clone(),
            calls: load(&i.calls),
            successes: latency.finished.saturating_sub(failures),
            failures,
            cancelled: load(&i.cancelled),
            retries: load(&i.retries),
            timeouts: load(&i.timeouts),
            rejected: load(&i.rejected),
            limiter_wait: Duration::from_nanos(load(&i.limiter_wait_ns)),
            p50: latency.p50,
            p90: latency.p90,
            p99: latency.p99,
            max: latency.max,
            mean: latency.mean,
        }
    }

    /// Counts a run that starts, whose end is recorded by [`finished`](Self::finished) or
    /// [`cancelled`](Self::cancelled) (or by the guard of [`resume`](Self::resume)).
    #[inline]
    pub(crate) fn started(&self) {
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.inner.metrics.started();
    }

    /// The guard that records how a run already counted, started at `started`, ends.
    pub(crate) fn resume(&self, started: Instant) -> RunGuard<'_> {
        RunGuard {
            stats: self,
            started,
            done: false,
        }
    }

    /// A run started at `started` ends now, `ok` or not: its outcome and latency.
    #[inline]
    pub(crate) fn finished(&self, started: Instant, ok: bool) {
        let i = &self.inner;
        if !ok {
            i.failures.fetch_add(1, Ordering::Relaxed);
        }
        let took = started.elapsed();
        i.latency.record(nanos(took));
        #[cfg(feature = "metrics")]
        i.metrics.finished(ok, took);
    }

    /// A run was dropped before it ended.
    pub(crate) fn cancelled(&self) {
        self.inner.cancelled.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.inner.metrics.cancelled();
    }

    pub(crate) fn retry(&self) {
        self.inner.retries.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.inner.metrics.retry();
    }

    pub(crate) fn timeout(&self) {
        self.inner.timeouts.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.inner.metrics.timeout();
    }

    pub(crate) fn rejected(&self) {
        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.inner.metrics.rejected();
    }

    pub(crate) fn limiter_wait(&self, d: Duration) {
        self.inner
            .limiter_wait_ns
            .fetch_add(nanos(d), Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.inner.metrics.limiter_wait(d);
    }
}

/// Records the end of one run: its outcome and latency, or `cancelled` if it is dropped first.
pub(crate) struct RunGuard<'a> {
    stats: &'a CallStats,
    started: Instant,
    done: bool,
}

impl RunGuard<'_> {
    pub(crate) fn finish(mut self, ok: bool) {
        self.done = true;
        self.stats.finished(self.started, ok);
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.stats.cancelled();
        }
    }
}

from_ref_handle!(impl[] CallStats, "the counters");

impl fmt::Debug for CallStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CallStats").field(&self.snapshot()).finish()
    }
}

/// A point-in-time copy of a [`CallStats`] handle's figures.
///
/// `Display` prints one line, e.g.
/// `lookup: 4 calls: 4 ok, 0 failed, 0 cancelled; 0 retries, 0 timeouts, 0 rejected; latency p50 10ms p90 40ms p99 40ms max 40ms mean 17.5ms; waited on the rate limit 0ns`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct CallStatsSnapshot {
    /// The name given to [`CallStats::new`].
    pub name: String,
    /// Runs started.
    pub calls: u64,
    /// Runs that returned `Ok`.
    pub successes: u64,
    /// Runs that returned `Err` (timed out, rejected or failed on their last attempt).
    pub failures: u64,
    /// Runs dropped before they finished.
    pub cancelled: u64,
    /// Attempts after the first (each waited out its backoff first).
    pub retries: u64,
    /// Attempts that timed out.
    pub timeouts: u64,
    /// Attempts rejected by an open circuit breaker (the function was not called).
    pub rejected: u64,
    /// Total time attempts waited for a cell of the rate limiter.
    pub limiter_wait: Duration,
    /// Median latency of finished runs (zero if none finished).
    pub p50: Duration,
    /// 90th percentile latency of finished runs.
    pub p90: Duration,
    /// 99th percentile latency of finished runs.
    pub p99: Duration,
    /// The longest finished run.
    pub max: Duration,
    /// Mean latency of finished runs.
    pub mean: Duration,
}

impl fmt::Display for CallStatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} calls: {} ok, {} failed, {} cancelled; {} retries, {} timeouts, {} rejected; \
             latency p50 {:?} p90 {:?} p99 {:?} max {:?} mean {:?}; waited on the rate limit {:?}",
            self.name,
            self.calls,
            self.successes,
            self.failures,
            self.cancelled,
            self.retries,
            self.timeouts,
            self.rejected,
            self.p50,
            self.p90,
            self.p99,
            self.max,
            self.mean,
            self.limiter_wait,
        )
    }
}

/// Values below this are counted exactly, one bucket each.
const LINEAR: u64 = 16;
/// Sub-buckets per power of two (from `LINEAR` up): 2^3.
const SUB_BITS: u32 = 3;
const BUCKETS: usize = 16 + (64 - 4) * 8;

/// A fixed-size histogram of nanosecond values with logarithmic buckets; each bucket keeps the
/// count and the sum of its values, so a percentile is reported as the mean of its bucket (exact
/// when the bucket's values are equal, as on a paused clock).
struct Histogram {
    buckets: Box<[Bucket]>,
    min: AtomicU64,
    max: AtomicU64,
}

#[derive(Default)]
struct Bucket {
    count: AtomicU64,
    sum: AtomicU64,
}

struct Summary {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
    /// The values recorded: runs finished.
    finished: u64,
}

/// The bucket of `v`.
fn bucket(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 4
    let sub = (v >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + ((e - 4) as usize) * (1 << SUB_BITS) + sub as usize
}

/// The smallest and the largest value in bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if (i as u64) < LINEAR {
        return (i as u64, i as u64);
    }
    let j = i - LINEAR as usize;
    let e = (j >> SUB_BITS) as u32 + 4;
    let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
    let low = ((1u64 << SUB_BITS) + sub) << (e - SUB_BITS);
    (low, low + ((1u64 << (e - SUB_BITS)) - 1))
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }

    fn record(&self, v: u64) {
        let b = &self.buckets[bucket(v)];
        // Release: what was counted before (a failure) is seen with the value.
        b.count.fetch_add(1, Ordering::Release);
        b.sum.fetch_add(v, Ordering::Relaxed);
        // Read first: once the extremes are set, most values change neither.
        if v < self.min.load(Ordering::Relaxed) {
            self.min.fetch_min(v, Ordering::Relaxed);
        }
        if v > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(v, Ordering::Relaxed);
        }
    }

    fn summary(&self) -> Summary {
        let buckets: Vec<(u64, u64)> = self
            .buckets
            .iter()
            .map(|b| {
                (
                    b.count.load(Ordering::Acquire),
                    b.sum.load(Ordering::Relaxed),
                )
            })
            .collect();
        let total: u64 = buckets.iter().map(|&(count, _)| count).sum();
        if total == 0 {
            return Summary {
                p50: Duration::ZERO,
                p90: Duration::ZERO,
                p99: Duration::ZERO,
                max: Duration::ZERO,
                mean: Duration::ZERO,
                finished: 0,
            };
        }
        let (min, max) = (
            self.min.load(Ordering::Relaxed),
            self.max.load(Ordering::Relaxed),
        );
        let quantile = |q: f64| -> Duration {
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            for (i, &(count, sum)) in buckets.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    // The bucket's mean, kept inside the bucket and the observed range (a
                    // snapshot taken while a value is being recorded may see its count only).
                    let (low, high) = bucket_range(i);
                    let mean = (sum / count).clamp(low, high).clamp(min, max.max(min));
                    return Duration::from_nanos(mean);
                }
            }
            Duration::from_nanos(max)
        };
        let sum: u128 = buckets.iter().map(|&(_, sum)| u128::from(sum)).sum();
        Summary {
            p50: quantile(0.50),
            p90: quantile(0.90),
            p99: quantile(0.99),
            max: Duration::from_nanos(max),
            mean: Duration::from_nanos(u64::try_from(sum / u128::from(total)).unwrap_or(u64::MAX)),
            finished: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_range(BUCKETS - 1).1, u64::MAX);
        for i in 1..BUCKETS {
            let (low, high) = bucket_range(i);
            assert_eq!(
                low,
                bucket_range(i - 1).1 + 1,
                "bucket {i} follows bucket {}",
                i - 1
            );
            assert_eq!((bucket(low), bucket(high)), (i, i), "ends of bucket {i}");
        }
    }

    #[test]
    fn a_bucket_is_at_most_an_eighth_of_its_low_end() {
        for i in LINEAR as usize..BUCKETS {
            let (low, high) = bucket_range(i);
            let width = high - low + 1;
            assert!(width * 8 <= low, "bucket {i}: width {width}, low {low}");
        }
    }

    #[test]
    fn equal_values_are_reported_exactly() {
        let h = Histogram::new();
        for _ in 0..10 {
            h.record(10_000_000);
        }
        h.record(40_000_000);
        let s = h.summary();
        assert_eq!(
            (s.p50, s.p90),
            (Duration::from_millis(10), Duration::from_millis(10))
        );
        assert_eq!(
            (s.p99, s.max),
            (Duration::from_millis(40), Duration::from_millis(40))
        );
    }

    #[test]
    fn percentiles() {
        let h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let s = h.summary();
        // Within one bucket (an eighth of a power of two) of the true value.
        let p50 = s.p50.as_nanos() as u64;
        assert!(
            (500_000 - 500_000 / 8..=500_000 + 500_000 / 8).contains(&p50),
            "{p50}"
        );
        let p99 = s.p99.as_nanos() as u64;
        assert!((990_000 - 990_000 / 8..=1_000_000).contains(&p99), "{p99}");
        assert_eq!(s.max, Duration::from_millis(1));
        assert_eq!(s.mean, Duration::from_nanos(500_500));
    }
}
