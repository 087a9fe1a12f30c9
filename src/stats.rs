//! `with_stats`, [`Stats`] and [`StatsSnapshot`]: counts, rates, and where the time goes.
//!
//! A [`WithStats`] point records, besides the item count, two waits:
//!
//! * **upstream wait**: the time between a poll that found upstream not ready and the moment
//!   upstream produced the next item (or ended). The point was *starved*.
//! * **downstream wait**: the time between handing an item over and the next poll. The point was
//!   *backpressured*: whatever comes after it was busy.
//!
//! Put one `with_stats` before and one after a slow operator: the point before it waits on
//! downstream, the point after it waits on upstream, and the operator is the bottleneck.
//!
//! The same [`Stats`] type also records timed runs (count, errors, mean and max time), which is
//! how staged pipelines report per-stage figures.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::time::nanos;

/// A shared statistics recorder; cloning the handle shares the counters.
///
/// Many streams may record into one `Stats` (their counts add up). Timing uses
/// `tokio::time::Instant`, so a paused clock measures it exactly.
///
/// # Examples
///
/// ```
/// use futures::{stream, StreamExt};
/// use stagepipe::prelude::*;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let stats = Stats::new("source");
/// let n = stream::iter(0..1000u32).with_stats(&stats).count().await;
/// assert_eq!(n, 1000);
/// let snapshot = stats.snapshot();
/// assert_eq!(snapshot.items, 1000);
/// println!("{snapshot}");
/// # }
/// ```
#[derive(Clone)]
pub struct Stats {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    items: AtomicU64,
    upstream_wait_ns: AtomicU64,
    downstream_wait_ns: AtomicU64,
    runs: AtomicU64,
    errors: AtomicU64,
    busy_ns: AtomicU64,
    max_ns: AtomicU64,
    /// Streams that started and have not ended yet.
    open: AtomicUsize,
    span: Mutex<Span>,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::StatsMetrics,
}

#[derive(Default, Clone, Copy)]
struct Span {
    started: Option<Instant>,
    /// When the last open stream ended; `None` while any is open.
    ended: Option<Instant>,
}

/// A point-in-time copy of a [`Stats`] handle's figures.
///
/// `Display` prints one line, e.g.
/// `parse: 1000 items in 2.000s (500.0/s); waited on upstream 1.500s (75%), on downstream 0.000s (0%)`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// The name given to [`Stats::new`].
    pub name: String,
    /// Items that passed the point(s) recording into this handle.
    pub items: u64,
    /// From the first poll to the end of the last stream (or to now, while any is running).
    pub elapsed: Duration,
    /// Total time spent waiting for upstream to produce an item.
    pub upstream_wait: Duration,
    /// Total time between handing an item over and being polled again.
    pub downstream_wait: Duration,
    /// Timed runs recorded (staged pipelines record one per stage run).
    pub runs: u64,
    /// Failures: timed runs that failed, plus the `Err` items that passed a
    /// [`try_with_stats`](crate::TryPipelineExt::try_with_stats) point (its `Ok` items are
    /// counted in [`items`](Self::items)).
    pub errors: u64,
    /// Total time spent in timed runs.
    pub busy: Duration,
    /// The longest timed run.
    pub max: Duration,
}

impl StatsSnapshot {
    /// Items per second over [`elapsed`](Self::elapsed); zero before any time has passed.
    pub fn items_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.items as f64 / secs
        } else {
            0.0
        }
    }

    /// Mean time of a timed run; zero if there were none.
    pub fn mean(&self) -> Duration {
        if self.runs == 0 {
            Duration::ZERO
        } else {
            self.busy / u32::try_from(self.runs).unwrap_or(u32::MAX)
        }
    }

    fn share(&self, d: Duration) -> f64 {
        let total = self.elapsed.as_secs_f64();
        if total > 0.0 {
            100.0 * d.as_secs_f64() / total
        } else {
            0.0
        }
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} items in {:.3}s ({:.1}/s); waited on upstream {:.3}s ({:.0}%), on downstream {:.3}s ({:.0}%)",
            self.name,
            self.items,
            self.elapsed.as_secs_f64(),
            self.items_per_sec(),
            self.upstream_wait.as_secs_f64(),
            self.share(self.upstream_wait),
            self.downstream_wait.as_secs_f64(),
            self.share(self.downstream_wait),
        )?;
        if self.runs == 0 && self.errors > 0 {
            write!(f, "; {} errors", self.errors)?;
        }
        if self.runs > 0 {
            write!(
                f,
                "; {} runs, {} errors, mean {:?}, max {:?}",
                self.runs,
                self.errors,
                self.mean(),
                self.max
            )?;
        }
        Ok(())
    }
}

impl Stats {
    /// Creates a recorder named `name` (the name appears in `Display` and `tracing` events).
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self::with_metrics(
            #[cfg(feature = "metrics")]
            crate::metrics::StatsMetrics::stream(&name),
            name,
        )
    }

    /// The figures of one stage of a staged pipeline, named by the stage's `Debug` (with
    /// feature `metrics`, published as the pipeline's stage metrics, not as a stream's).
    pub(crate) fn stage<S: fmt::Debug>(stage: S) -> Self {
        let name = format!("{stage:?}");
        Self::with_metrics(
            #[cfg(feature = "metrics")]
            crate::metrics::StatsMetrics::stage::<S>(&name),
            name,
        )
    }

    fn with_metrics(
        #[cfg(feature = "metrics")] metrics: crate::metrics::StatsMetrics,
        name: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                items: AtomicU64::new(0),
                upstream_wait_ns: AtomicU64::new(0),
                downstream_wait_ns: AtomicU64::new(0),
                runs: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                busy_ns: AtomicU64::new(0),
                max_ns: AtomicU64::new(0),
                open: AtomicUsize::new(0),
                span: Mutex::new(Span::default()),
                #[cfg(feature = "metrics")]
                metrics,
            }),
        }
    }

    /// The name given to [`Stats::new`].
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A copy of the current figures.
    pub fn snapshot(&self) -> StatsSnapshot {
        let i = &self.inner;
        let span = *i.span.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = match span.started {
            None => Duration::ZERO,
            Some(start) => span
                .ended
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(start),
        };
        let ns = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        StatsSnapshot {
            name: i.name.clone(),
            items: i.items.load(Ordering::Relaxed),
            elapsed,
            upstream_wait: ns(&i.upstream_wait_ns),
            downstream_wait: ns(&i.downstream_wait_ns),
            runs: i.runs.load(Ordering::Relaxed),
            errors: i.errors.load(Ordering::Relaxed),
            busy: ns(&i.busy_ns),
            max: ns(&i.max_ns),
        }
    }

    /// Records one timed run that took `took`, failed or not. Staged pipelines call this once
    /// per stage run; user code may use it to time its own operations.
    pub fn record_run(&self, took: Duration, failed: bool) {
        let i = &self.inner;
        let ns = nanos(took);
        i.runs.fetch_add(1, Ordering::Relaxed);
        if failed {
            i.errors.fetch_add(1, Ordering::Relaxed);
        }
        i.busy_ns.fetch_add(ns, Ordering::Relaxed);
        if ns > i.max_ns.load(Ordering::Relaxed) {
            i.max_ns.fetch_max(ns, Ordering::Relaxed);
        }
        #[cfg(feature = "metrics")]
        i.metrics.run(took, failed);
    }

    fn stream_started(&self, now: Instant) {
        let mut span = self.inner.span.lock().unwrap_or_else(|e| e.into_inner());
        span.started.get_or_insert(now);
        span.ended = None;
        self.inner.open.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns `true` if this was the last open stream.
    fn stream_ended(&self, now: Instant) -> bool {
        let mut span = self.inner.span.lock().unwrap_or_else(|e| e.into_inner());
        let last = self.inner.open.fetch_sub(1, Ordering::Relaxed) == 1;
        if last {
            span.ended = Some(now);
        }
        last
    }
}

from_ref_handle!(impl[] Stats, "the counters");

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stats").field(&self.snapshot()).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Running,
    Ended,
}

pin_project! {
    /// Stream for the [`with_stats`](crate::PipelineExt::with_stats) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct WithStats<S> {
        #[pin]
        stream: S,
        stats: Stats,
        phase: Phase,
        // Set when upstream returned Pending; cleared when it produces.
        pending_since: Option<Instant>,
        // Set when an item was handed over; cleared at the next poll.
        yielded_at: Option<Instant>,
    }

    impl<S> PinnedDrop for WithStats<S> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.phase == Phase::Running {
                this.stats.stream_ended(Instant::now());
            }
        }
    }
}

impl<S> WithStats<S> {
    pub(crate) fn new(stream: S, stats: Stats) -> Self {
        Self {
            stream,
            stats,
            phase: Phase::NotStarted,
            pending_since: None,
            yielded_at: None,
        }
    }

    /// The stats handle this stream records into.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    delegate_access_inner!(pub stream, S, ());
}

impl<S: Stream> WithStats<S> {
    /// Polls upstream, recording; an item for which `is_error` holds counts as an error
    /// rather than an item.
    #[inline]
    pub(crate) fn poll_point(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        is_error: impl FnOnce(&S::Item) -> bool,
    ) -> Poll<Option<S::Item>> {
        let this = self.project();
        let inner = &this.stats.inner;
        match *this.phase {
            Phase::Ended => return Poll::Ready(None),
            Phase::NotStarted => {
                this.stats.stream_started(Instant::now());
                *this.phase = Phase::Running;
            }
            Phase::Running => {
                if let Some(at) = this.yielded_at.take() {
                    let waited = at.elapsed();
                    inner
                        .downstream_wait_ns
                        .fetch_add(nanos(waited), Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    inner.metrics.downstream_wait(waited);
                }
            }
        }
        match this.stream.poll_next(cx) {
            Poll::Pending => {
                this.pending_since.get_or_insert_with(Instant::now);
                Poll::Pending
            }
            Poll::Ready(item) => {
                let now = Instant::now();
                if let Some(since) = this.pending_since.take() {
                    let waited = now.saturating_duration_since(since);
                    inner
                        .upstream_wait_ns
                        .fetch_add(nanos(waited), Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    inner.metrics.upstream_wait(waited);
                }
                if let Some(item) = &item {
                    let error = is_error(item);
                    let counter = if error { &inner.errors } else { &inner.items };
                    counter.fetch_add(1, Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    inner.metrics.item(error);
                    *this.yielded_at = Some(now);
                } else {
                    *this.phase = Phase::Ended;
                    if this.stats.stream_ended(now) {
                        let s = this.stats.snapshot();
                        tracing::debug!(
                            target: "stagepipe::stats",
                            name = %s.name,
                            items = s.items,
                            errors = s.errors,
                            elapsed_ms = s.elapsed.as_millis() as u64,
                            items_per_sec = s.items_per_sec(),
                            upstream_wait_ms = s.upstream_wait.as_millis() as u64,
                            downstream_wait_ms = s.downstream_wait.as_millis() as u64,
                            "{s}"
                        );
                    }
                }
                Poll::Ready(item)
            }
        }
    }
}

impl<S: Stream> Stream for WithStats<S> {
    type Item = S::Item;

    #[inline]
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.poll_point(cx, |_| false)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.phase == Phase::Ended {
            (0, Some(0))
        } else {
            self.stream.size_hint()
        }
    }
}

impl<S: Stream> FusedStream for WithStats<S> {
    fn is_terminated(&self) -> bool {
        self.phase == Phase::Ended
    }
}

impl_debug!(impl[S: fmt::Debug] WithStats<S> => WithStats |this| {
    stream: &this.stream,
    stats: &this.stats,
} ..);
