//! [`PipelineExt`]: the operators, as methods on every stream.
//!
//! Each method documents its semantics, `# Panics` and an example; its body only calls the
//! constructor of the stream type that lives in the operator's own module.

use std::future::Future;

use futures::Stream;

use crate::fan_out::{FanOut, FanOutOrdered};
use crate::in_flight::{InFlight, InFlightLimit};
use crate::pool::WorkerPool;
use crate::staged::{Pipeline, StateMachine, Through};
use crate::stats::{Stats, WithStats};

/// Operators for concurrent, parallel stream pipelines, implemented for every
/// [`Stream`].
///
/// Import it with `use stagepipe::prelude::*;` (or `use stagepipe::PipelineExt;`).
pub trait PipelineExt: Stream {
    // -- core: fan_out_ordered, fan_out, in_flight, with_stats --

    /// Runs `f(item)` for every item on a [`WorkerPool`], in parallel on all the runtime's
    /// threads, and yields the results **in input order**.
    ///
    /// `pool` is a shared pool (`&pool` or a clone) or a number of workers for a private pool.
    /// The closure is called in the consumer's task; the futures it returns run on the pool's
    /// workers, so CPU-bound work inside them uses every core (unlike
    /// [`StreamExt::buffered`](futures::StreamExt::buffered), which polls every future inside
    /// the consumer's one task).
    ///
    /// At most a *window* of this stream's items is in the pool at once (queued, running, or
    /// finished and waiting for an earlier item); upstream is not pulled while the window is
    /// full, so one slow item holds back at most a window of results. Set it with
    /// [`FanOutOrdered::window`]; the default is four times the workers, at least 256.
    ///
    /// A future that panics re-raises its panic in the consumer at that item's place, after
    /// every earlier item; the pool and other streams keep running. Dropping the stream drops
    /// its queued and running futures at once.
    ///
    /// Needs a tokio runtime (multi-threaded for parallelism).
    ///
    /// # Panics
    ///
    /// Panics if `pool` is the number zero (parameter `workers`).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() {
    /// let lengths: Vec<usize> = stream::iter(["a", "bb", "ccc"])
    ///     .fan_out_ordered(2, |s| async move { s.len() })
    ///     .collect()
    ///     .await;
    /// assert_eq!(lengths, [1, 2, 3]);
    /// # }
    /// ```
    #[track_caller]
    fn fan_out_ordered<P, F, Fut>(self, pool: P, f: F) -> FanOutOrdered<Self, F, Fut::Output>
    where
        Self: Sized,
        P: Into<WorkerPool>,
        F: FnMut(Self::Item) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        FanOutOrdered::new(self, pool.into(), f)
    }

    /// Runs `f(item)` for every item on a [`WorkerPool`], in parallel, and yields the results
    /// **in completion order**.
    ///
    /// The same as [`fan_out_ordered`](PipelineExt::fan_out_ordered) (window, panics,
    /// cancellation), except that a result is yielded as soon as it is ready, so a slow item
    /// never holds back the others.
    ///
    /// # Panics
    ///
    /// Panics if `pool` is the number zero (parameter `workers`).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() {
    /// let pool = WorkerPool::new(2);
    /// let mut sums: Vec<u64> = stream::iter(1..=4u64)
    ///     .fan_out(&pool, |n| async move { (1..=n).sum::<u64>() })
    ///     .collect()
    ///     .await;
    /// sums.sort();
    /// assert_eq!(sums, [1, 3, 6, 10]);
    /// # }
    /// ```
    #[track_caller]
    fn fan_out<P, F, Fut>(self, pool: P, f: F) -> FanOut<Self, F, Fut::Output>
    where
        Self: Sized,
        P: Into<WorkerPool>,
        F: FnMut(Self::Item) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        FanOut::new(self, pool.into(), f)
    }

    /// Runs `f(item)` concurrently **inside this stream's task** (no spawn, so the futures may
    /// borrow local data), at most `limit` at once, and yields results in completion order.
    ///
    /// `limit` is a shared [`InFlightLimit`] (`&limit` or a clone) or a number for a private
    /// one: every stream holding a clone of one limit together never runs more than its limit.
    /// An item is pulled from upstream, then waits for a permit; a permit is held only while
    /// its future runs. Use it for I/O-bound calls (a database, an HTTP API); for CPU-bound
    /// work use [`fan_out`](PipelineExt::fan_out), which runs on every core.
    ///
    /// # Panics
    ///
    /// Panics if `limit` is the number zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let names = vec![String::from("slow"), String::from("fast")];
    /// let delays = [Duration::from_millis(20), Duration::from_millis(10)];
    /// let done: Vec<&str> = stream::iter(0..2)
    ///     .in_flight(2, |i| {
    ///         let name = names[i].as_str(); // borrowed: no spawn
    ///         async move {
    ///             tokio::time::sleep(delays[i]).await;
    ///             name
    ///         }
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(done, ["fast", "slow"]);
    /// # }
    /// ```
    #[track_caller]
    fn in_flight<L, F, Fut>(self, limit: L, f: F) -> InFlight<Self, F, Fut>
    where
        Self: Sized,
        L: Into<InFlightLimit>,
        F: FnMut(Self::Item) -> Fut,
        Fut: Future,
    {
        InFlight::new(self, limit.into(), f)
    }

    /// Passes items through unchanged, recording into `stats`: the item count, the elapsed
    /// time and rate, and where the time went (waiting on upstream versus on downstream).
    ///
    /// Put one `with_stats` on each side of an operator to find the bottleneck: if the point
    /// after it mostly waits on upstream while the point before it mostly waits on downstream,
    /// the operator between them is the slow part. When the stream ends, a `tracing` event at
    /// `INFO` (target `stagepipe::stats`) summarises the figures.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let before = Stats::new("before");
    /// let after = Stats::new("after");
    /// stream::iter(0..10u32)
    ///     .with_stats(&before)
    ///     .then(|x| async move {
    ///         tokio::time::sleep(Duration::from_millis(100)).await; // the slow operator
    ///         x
    ///     })
    ///     .with_stats(&after)
    ///     .for_each(|_| async {})
    ///     .await;
    /// let (b, a) = (before.snapshot(), after.snapshot());
    /// assert_eq!((b.items, a.items), (10, 10));
    /// assert!(b.downstream_wait > b.upstream_wait); // before waits on the slow operator
    /// assert!(a.upstream_wait > a.downstream_wait); // after waits on it too, from the other side
    /// assert_eq!(a.upstream_wait, Duration::from_secs(1));
    /// # }
    /// ```
    fn with_stats<S>(self, stats: S) -> WithStats<Self>
    where
        Self: Sized,
        S: Into<Stats>,
    {
        WithStats::new(self, stats.into())
    }

    // -- resilience: rate_limit, rate_limit_by, retry, retry_if, circuit_breaker --

    // -- batching: batch_dedupe, batch, debounce, dedupe_by --

    // -- staged pipelines: through --

    /// Runs every item through a staged [`Pipeline`] as one request group: results in input
    /// order, carrying on after errors (each failed request yields its [`StageError`](crate::StageError)).
    ///
    /// The group shares the pipeline's worker pool with every other group and holds at most the
    /// pipeline's window of requests in it; upstream is pulled as the window allows.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    /// enum Step { Check, Square }
    ///
    /// struct Machine;
    ///
    /// impl StateMachine for Machine {
    ///     type Stage = Step;
    ///     type Data = i64;
    ///     type Error = String;
    ///
    ///     fn start(&self) -> Step { Step::Check }
    ///
    ///     async fn run(&self, stage: Step, n: i64) -> Result<Next<Step, i64>, String> {
    ///         match stage {
    ///             Step::Check if n < 0 => Err(format!("{n} is negative")),
    ///             Step::Check => Ok(Next::Stage(Step::Square, n)),
    ///             Step::Square => Ok(Next::Done(n * n)),
    ///         }
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() {
    /// let pipeline = Pipeline::builder(Machine).workers(2).build();
    /// let out: Vec<Result<i64, String>> = stream::iter([3, -1, 4])
    ///     .through(&pipeline)
    ///     .map(|r| r.map_err(|e| e.to_string()))
    ///     .collect()
    ///     .await;
    /// assert_eq!(out, [Ok(9), Err("stage Check failed: -1 is negative".to_string()), Ok(16)]);
    /// # }
    /// ```
    fn through<M>(self, pipeline: &Pipeline<M>) -> Through<Self, M>
    where
        Self: Sized + Stream<Item = M::Data>,
        M: StateMachine,
    {
        Through::new(self, pipeline)
    }
}

impl<S: Stream + ?Sized> PipelineExt for S {}
