//! [`TryPipelineExt`]: the concurrent operators for fallible streams (`Stream<Item = Result<T, E>>`).
//!
//! Each method documents its semantics, `# Panics` and an example; its body only calls the
//! constructor of the stream type in `try_ops/`.

use std::time::Duration;

use futures::TryStream;
use futures::future::TryFuture;

use crate::in_flight::InFlightLimit;
use crate::pool::WorkerPool;
use crate::stats::Stats;
use crate::try_ops::batch::TryBatch;
use crate::try_ops::fan_out::{TryFanOut, TryFanOutOrdered};
use crate::try_ops::in_flight::{TryInFlight, TryInFlightOrdered};
use crate::try_ops::stats::TryWithStats;

/// Operators for fallible streams, implemented for every [`TryStream`] (every
/// `Stream<Item = Result<T, E>>`), named after
/// [`TryStreamExt`](futures::TryStreamExt)'s `try_` methods.
///
/// The closures map an `Ok` value to a future of `Result<U, E>`, with the same error type `E`
/// as upstream. An upstream `Err` never reaches the closure: it is passed through **at its
/// place** by the input-order operators (after every earlier item, before every later one) and
/// as soon as it arrives by the completion-order ones. It holds no worker and no permit. No
/// item is lost or duplicated: each input yields exactly one output.
///
/// Import it with `use stagepipe::prelude::*;` (or `use stagepipe::TryPipelineExt;`).
pub trait TryPipelineExt: TryStream {
    /// Runs `f(value)` for every `Ok` value on a [`WorkerPool`], in parallel on all the
    /// runtime's threads, and yields the results **in input order**, upstream errors at their
    /// places.
    ///
    /// The fallible twin of [`fan_out_ordered`](crate::PipelineExt::fan_out_ordered), with the
    /// same window ([`TryFanOutOrdered::window`](crate::TryFanOutOrdered::window)), panics and
    /// cancellation. An upstream `Err` waits in the consumer (not in the pool) until every
    /// earlier result has been yielded; at most a window of errors waits at once (upstream is
    /// not pulled meanwhile).
    ///
    /// The futures and their results move to the pool's workers, so `Fut`, its `Ok` value and
    /// the error type `E` are `Send + 'static`.
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
    /// let lines = stream::iter([Ok("1"), Ok("x"), Err("read failed".to_string()), Ok("4")]);
    /// let parsed: Vec<Result<u32, String>> = lines
    ///     .try_fan_out_ordered(2, |s| async move { s.parse::<u32>().map_err(|e| e.to_string()) })
    ///     .collect()
    ///     .await;
    /// assert_eq!(parsed[0], Ok(1));
    /// assert!(parsed[1].is_err()); // the closure's error
    /// assert_eq!(parsed[2], Err("read failed".to_string())); // upstream's, at its place
    /// assert_eq!(parsed[3], Ok(4));
    /// # }
    /// ```
    #[track_caller]
    fn try_fan_out_ordered<P, F, Fut>(self, pool: P, f: F) -> TryFanOutOrdered<Self, F, Fut::Ok>
    where
        Self: Sized,
        Self::Error: Send + 'static,
        P: Into<WorkerPool>,
        F: FnMut(Self::Ok) -> Fut,
        Fut: TryFuture<Error = Self::Error> + Send + 'static,
        Fut::Ok: Send + 'static,
    {
        TryFanOutOrdered::new(self, pool.into(), f)
    }

    /// Runs `f(value)` for every `Ok` value on a [`WorkerPool`], in parallel, and yields the
    /// results **in completion order**; an upstream `Err` is yielded as soon as it arrives.
    ///
    /// The fallible twin of [`fan_out`](crate::PipelineExt::fan_out); bounds as for
    /// [`try_fan_out_ordered`](TryPipelineExt::try_fan_out_ordered).
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
    /// let out: Vec<Result<u64, &str>> = stream::iter([Ok(3u64), Err("bad row"), Ok(4)])
    ///     .try_fan_out(&pool, |n| async move { Ok(n * n) })
    ///     .collect()
    ///     .await;
    /// assert_eq!(out.len(), 3);
    /// assert!(out.contains(&Err("bad row")));
    /// assert!(out.contains(&Ok(9)) && out.contains(&Ok(16)));
    /// # }
    /// ```
    #[track_caller]
    fn try_fan_out<P, F, Fut>(self, pool: P, f: F) -> TryFanOut<Self, F, Fut::Ok>
    where
        Self: Sized,
        Self::Error: Send + 'static,
        P: Into<WorkerPool>,
        F: FnMut(Self::Ok) -> Fut,
        Fut: TryFuture<Error = Self::Error> + Send + 'static,
        Fut::Ok: Send + 'static,
    {
        TryFanOut::new(self, pool.into(), f)
    }

    /// Runs `f(value)` for every `Ok` value concurrently **inside this stream's task** (no
    /// spawn, so the futures may borrow), at most `limit` at once across every stream sharing
    /// the limit, and yields results **in completion order**; an upstream `Err` is yielded as
    /// soon as it arrives and takes no permit.
    ///
    /// The fallible twin of [`in_flight`](crate::PipelineExt::in_flight). No `Send` bounds.
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
    /// let ids = stream::iter([Ok(30u64), Err("no id"), Ok(10)]);
    /// let out: Vec<Result<u64, &str>> = ids
    ///     .try_in_flight(2, |ms| async move {
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///         Ok(ms)
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(out, [Err("no id"), Ok(10), Ok(30)]);
    /// # }
    /// ```
    #[track_caller]
    fn try_in_flight<L, F, Fut>(self, limit: L, f: F) -> TryInFlight<Self, F, Fut>
    where
        Self: Sized,
        L: Into<InFlightLimit>,
        F: FnMut(Self::Ok) -> Fut,
        Fut: TryFuture<Error = Self::Error>,
    {
        TryInFlight::new(self, limit.into(), f)
    }

    /// Runs `f(value)` for every `Ok` value concurrently inside this stream's task, at most
    /// `limit` at once across every stream sharing the limit, and yields results **in input
    /// order**, upstream errors at their places.
    ///
    /// The fallible twin of [`in_flight_ordered`](crate::PipelineExt::in_flight_ordered): the
    /// stream holds at most the limit's number of items (running, finished behind an earlier
    /// item, or an upstream `Err` waiting for its place); an `Err` takes no permit.
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
    /// let db = InFlightLimit::new(4);
    /// let ids = stream::iter([Ok(30u64), Err("no id"), Ok(10)]);
    /// let out: Vec<Result<u64, &str>> = ids
    ///     .try_in_flight_ordered(&db, |ms| async move {
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///         if ms > 20 { Ok(ms) } else { Err("too fast") }
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(out, [Ok(30), Err("no id"), Err("too fast")]);
    /// # }
    /// ```
    #[track_caller]
    fn try_in_flight_ordered<L, F, Fut>(self, limit: L, f: F) -> TryInFlightOrdered<Self, F, Fut>
    where
        Self: Sized,
        L: Into<InFlightLimit>,
        F: FnMut(Self::Ok) -> Fut,
        Fut: TryFuture<Error = Self::Error>,
    {
        TryInFlightOrdered::new(self, limit.into(), f)
    }

    /// Groups `Ok` values into `Vec`s of at most `max`, emitted when full, when `wait` has
    /// passed since the batch's first value, or when the input ends; an upstream `Err` emits
    /// the partial batch first (if any), then itself, so values and errors keep their order.
    ///
    /// The fallible twin of [`batch`](crate::PipelineExt::batch). Batches are never empty. A
    /// `wait` too long for the clock (`Duration::MAX`) never fires and never panics.
    ///
    /// # Panics
    ///
    /// Panics if `max` is zero or `wait` is zero; [`TryBatch::try_new`](crate::TryBatch::try_new)
    /// returns the error instead.
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
    /// let rows = stream::iter([Ok(1), Ok(2), Ok(3), Err("torn row"), Ok(4)]);
    /// let batches: Vec<Result<Vec<u32>, &str>> =
    ///     rows.try_batch(2, Duration::from_millis(10)).collect().await;
    /// assert_eq!(batches, [Ok(vec![1, 2]), Ok(vec![3]), Err("torn row"), Ok(vec![4])]);
    /// # }
    /// ```
    #[track_caller]
    fn try_batch(self, max: usize, wait: Duration) -> TryBatch<Self>
    where
        Self: Sized,
    {
        crate::error::or_panic(TryBatch::try_new(self, max, wait))
    }

    /// Passes items through unchanged, recording into `stats` as
    /// [`with_stats`](crate::PipelineExt::with_stats) does, except that `Ok` items are counted
    /// as [`items`](crate::StatsSnapshot::items) and `Err` items as
    /// [`errors`](crate::StatsSnapshot::errors).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let stats = Stats::new("parse");
    /// let n = stream::iter(["1", "x", "3"])
    ///     .map(|s| s.parse::<u32>())
    ///     .try_with_stats(&stats)
    ///     .count()
    ///     .await;
    /// assert_eq!(n, 3);
    /// let s = stats.snapshot();
    /// assert_eq!((s.items, s.errors), (2, 1));
    /// # }
    /// ```
    fn try_with_stats<S>(self, stats: S) -> TryWithStats<Self>
    where
        Self: Sized,
        S: Into<Stats>,
    {
        TryWithStats::new(self, stats.into())
    }
}

impl<S: TryStream + ?Sized> TryPipelineExt for S {}
