//! [`PipelineExt`]: the operators, as methods on every stream.
//!
//! Each method documents its semantics, `# Panics` and an example; its body only calls the
//! constructor of the stream type that lives in the operator's own module.

use std::future::Future;

use futures::Stream;

use crate::by_key::FanOutByKey;
use crate::fan_out::{FanOut, FanOutOrdered};
use crate::in_flight::{InFlight, InFlightLimit, InFlightOrdered};
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
    /// [`FanOutOrdered::window`]; the default is four times the workers, at least 512.
    ///
    /// Items behind a slow one are computed without waiting for it (while the window has room):
    /// a worker whose item has to wait hands the items it has not started to idle workers. They
    /// are still yielded in input order.
    ///
    /// A future that panics, while polled or while dropped after it finished, re-raises its
    /// panic in the consumer at that item's place, after every earlier item; the pool and other
    /// streams keep running. Dropping the stream drops its queued and running futures at once
    /// (a panic in such a drop is swallowed). A future on the pool may itself fan out on the
    /// same pool: see [`WorkerPool`]'s "Nested use".
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
    /// never holds back the others: items that are ready, and have a free worker, finish and are
    /// yielded while it waits.
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

    /// Runs `f(item)` concurrently **inside this stream's task**, at most `limit` at once
    /// across every stream sharing the limit, and yields results **in input order**.
    ///
    /// Like [`in_flight`](PipelineExt::in_flight) (no spawn, futures may borrow, a permit held
    /// only while a future runs), with a reorder buffer like
    /// [`StreamExt::buffered`](futures::StreamExt::buffered)'s: the stream holds at most the
    /// limit's [`limit`](InFlightLimit::limit) items at once, running or finished behind an
    /// earlier one, and pulls no more from upstream meanwhile. A finished future gives its
    /// permit back at once, so a slow item holds back this stream's results, never another
    /// stream's permits.
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
    /// let db = InFlightLimit::new(8);
    /// let start = tokio::time::Instant::now();
    /// let rows: Vec<u64> = stream::iter([30u64, 10, 20])
    ///     .in_flight_ordered(&db, |ms| async move {
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///         ms
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(rows, [30, 10, 20]); // input order
    /// assert_eq!(start.elapsed(), Duration::from_millis(30)); // ran concurrently
    /// # }
    /// ```
    #[track_caller]
    fn in_flight_ordered<L, F, Fut>(self, limit: L, f: F) -> InFlightOrdered<Self, F, Fut>
    where
        Self: Sized,
        L: Into<InFlightLimit>,
        F: FnMut(Self::Item) -> Fut,
        Fut: Future,
    {
        InFlightOrdered::new(self, limit.into(), f)
    }

    /// Runs `f(item)` on a [`WorkerPool`] where items with equal keys run **one after
    /// another, in input order**, and items with different keys in parallel; yields the
    /// results **in input order** (Akka's `mapAsyncPartitioned`).
    ///
    /// `key(&item)` is called once per item, in the consumer's task. An item whose key has an
    /// item in the pool waits in the consumer (it holds no worker, so workers never wait on
    /// each other) and goes to the pool when that item has finished. Everything the stream
    /// holds (waiting items, items in the pool, finished results behind an earlier item) is
    /// bounded by its window ([`FanOutByKey::window`], default four times the workers, at
    /// least 512); upstream is not pulled while it is full. Keys of finished items are
    /// forgotten, so memory stays bounded by the window however many keys pass.
    ///
    /// A future that panics re-raises its panic in the consumer when it finishes. Dropping the
    /// stream drops its waiting items and its queued and running futures.
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
    /// // (account, amount): each account's updates apply in order, accounts in parallel.
    /// let updates = stream::iter([("a", 5), ("b", 1), ("a", -2), ("c", 7), ("b", 3)]);
    /// let applied: Vec<(&str, i32)> = updates
    ///     .fan_out_by_key(2, |(account, _)| *account, |(account, amount)| async move {
    ///         (account, amount * 10)
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(applied, [("a", 50), ("b", 10), ("a", -20), ("c", 70), ("b", 30)]);
    /// # }
    /// ```
    #[track_caller]
    fn fan_out_by_key<P, K, KF, F, Fut>(
        self,
        pool: P,
        key: KF,
        f: F,
    ) -> FanOutByKey<Self, K, KF, F, Fut::Output>
    where
        Self: Sized,
        P: Into<WorkerPool>,
        K: std::hash::Hash + Eq,
        KF: FnMut(&Self::Item) -> K,
        F: FnMut(Self::Item) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        FanOutByKey::new(self, pool.into(), key, f)
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

    /// Passes items on no faster than the limiter's quota, shared with every stream and caller
    /// holding a clone of the limiter.
    ///
    /// Each item is pulled from upstream, then held until its slot on the quota's timeline (GCRA:
    /// one per [`interval`](crate::RateLimiter::interval), up to the burst at once after an idle
    /// spell) and passed on unchanged, in order. At most one item is held; upstream is not pulled
    /// meanwhile. Waiting uses tokio's timer. Slots are absolute deadlines, and the stream makes
    /// up at most one tick (1 ms) of its own timer's lateness, so the quota is never exceeded:
    /// in any window of length `T`, at most `burst + (T + 1 ms) / interval` items pass, whatever
    /// the consumers' delays (see [`RateLimiter`](crate::RateLimiter) for the accuracy at rates
    /// above the timer's resolution).
    /// `limiter` is a [`RateLimiter`](crate::RateLimiter) or `&RateLimiter` (a shared quota).
    ///
    /// Dropping the stream while it holds an item gives that item's slot back, so the next
    /// holder of the limiter does not wait for it.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with the time driver enabled.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::{Duration, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limiter = RateLimiter::per_second(10).burst(2);
    /// let start = Instant::now();
    /// let at: Vec<Duration> = stream::iter(0..4)
    ///     .rate_limit(&limiter)
    ///     .map(|_| start.elapsed())
    ///     .collect()
    ///     .await;
    /// assert_eq!(at, [0, 0, 100, 200].map(Duration::from_millis));
    /// # }
    /// ```
    fn rate_limit<R>(self, limiter: R) -> crate::RateLimit<Self>
    where
        R: Into<crate::RateLimiter>,
        Self: Sized,
    {
        crate::RateLimit::new(self, limiter.into())
    }

    /// Passes items on no faster than their key's quota: `key(&item)` picks the quota, and every
    /// key of the [`KeyedRateLimiter`](crate::KeyedRateLimiter) has its own (per tenant, per
    /// host, ...), shared with every holder of a clone.
    ///
    /// Items keep their order: an item waiting for its key's slot holds back the items behind
    /// it, whatever their keys. For independent flows per key, split the stream, or call
    /// [`until_key_ready`](crate::KeyedRateLimiter::until_key_ready) inside a concurrent
    /// operator.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with the time driver enabled.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::{Duration, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let per_host = KeyedRateLimiter::per(Duration::from_millis(100));
    /// let start = Instant::now();
    /// let at: Vec<(&str, Duration)> = stream::iter(["a", "b", "a", "b"])
    ///     .rate_limit_by(&per_host, |host: &&str| *host)
    ///     .map(|host| (host, start.elapsed()))
    ///     .collect()
    ///     .await;
    /// let ms = Duration::from_millis;
    /// assert_eq!(at, [("a", ms(0)), ("b", ms(0)), ("a", ms(100)), ("b", ms(100))]);
    /// # }
    /// ```
    fn rate_limit_by<K, L, F>(self, limiter: L, key: F) -> crate::RateLimitBy<Self, K, F>
    where
        K: std::hash::Hash + Eq + Clone,
        L: Into<crate::KeyedRateLimiter<K>>,
        F: FnMut(&Self::Item) -> K,
        Self: Sized,
    {
        crate::RateLimitBy::new(self, limiter.into(), key)
    }

    /// Calls `f(item.clone())` until it returns `Ok` or the [`Backoff`](crate::Backoff) gives
    /// up, waiting per the backoff between attempts; yields `Ok(value)`, or a
    /// [`RetryError`](crate::RetryError) with the item back, the last error and the number of
    /// attempts.
    ///
    /// One item at a time, in order: while an item waits out its backoff the stream pauses and
    /// upstream is not pulled. For concurrent retries, wrap the call instead:
    /// `fan_out_ordered(n, move |x| backoff.retry(move || op(x.clone())))` (see
    /// [`Backoff::retry`](crate::Backoff::retry)). Dropping the stream drops the attempt or the
    /// wait in progress.
    ///
    /// # Panics
    ///
    /// When a wait is polled outside a tokio runtime with the time driver enabled.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::{Duration, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let start = Instant::now();
    /// let results: Vec<Result<u32, RetryError<u32, String>>> = stream::iter([2, 3])
    ///     .retry(Backoff::fixed(Duration::from_millis(10)).max_attempts(3), |n| async move {
    ///         if n % 2 == 0 { Ok(n / 2) } else { Err(format!("{n} is odd")) }
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(results[0], Ok(1));
    /// let err = results[1].as_ref().unwrap_err();
    /// assert_eq!((err.item, err.attempts, err.error.as_str()), (3, 3, "3 is odd"));
    /// assert_eq!(start.elapsed(), Duration::from_millis(20)); // two waits for the odd item
    /// # }
    /// ```
    fn retry<F, Fut, U, E>(self, backoff: crate::Backoff, f: F) -> crate::Retry<Self, F, Fut>
    where
        Self::Item: Clone,
        F: FnMut(Self::Item) -> Fut,
        Fut: std::future::Future<Output = Result<U, E>>,
        Self: Sized,
    {
        crate::Retry::new(self, backoff, f)
    }

    /// [`retry`](PipelineExt::retry), giving up at once on an error for which `retryable`
    /// returns `false` (a permanent error): that item's [`RetryError`](crate::RetryError)
    /// carries the attempts made so far.
    ///
    /// # Panics
    ///
    /// When a wait is polled outside a tokio runtime with the time driver enabled.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// #[derive(Debug, PartialEq)]
    /// enum Error { Busy, NotFound }
    ///
    /// let results: Vec<_> = stream::iter([404u16, 503])
    ///     .retry_if(
    ///         Backoff::exponential(Duration::from_millis(10)).max_attempts(4),
    ///         |status| async move { if status == 404 { Err::<(), _>(Error::NotFound) } else { Err(Error::Busy) } },
    ///         |e: &Error| *e == Error::Busy,
    ///     )
    ///     .map(|r| r.unwrap_err().attempts)
    ///     .collect()
    ///     .await;
    /// assert_eq!(results, [1, 4]); // the permanent error fails at once
    /// # }
    /// ```
    fn retry_if<F, Fut, U, E, P>(
        self,
        backoff: crate::Backoff,
        f: F,
        retryable: P,
    ) -> crate::RetryIf<Self, F, Fut, P>
    where
        Self::Item: Clone,
        F: FnMut(Self::Item) -> Fut,
        Fut: std::future::Future<Output = Result<U, E>>,
        P: FnMut(&E) -> bool,
        Self: Sized,
    {
        crate::RetryIf::new(self, backoff, f, retryable)
    }

    /// Calls `f(item)` while the [`CircuitBreaker`](crate::CircuitBreaker) lets calls through,
    /// recording each outcome; while it is open, yields
    /// [`BreakerError::Open(item)`](crate::BreakerError::Open) at once without calling.
    ///
    /// One call at a time, in order; the breaker is shared with every stream and
    /// [`call`](crate::CircuitBreaker::call)er holding a clone (pass `&breaker` to share it).
    /// A failed call yields [`BreakerError::Failed`](crate::BreakerError::Failed). When
    /// half-open, exactly one trial call runs across all holders; the others are rejected as
    /// `Open` while it runs. Dropping the stream drops the call in progress (a dropped trial
    /// leaves the breaker half-open for the next call). An outcome counts only if the breaker
    /// has not changed state since its call started (see
    /// [`CircuitBreaker`](crate::CircuitBreaker)).
    ///
    /// # Panics
    ///
    /// Does not panic on its own.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let breaker = CircuitBreaker::new(2, Duration::from_secs(1));
    /// let results: Vec<Result<u32, BreakerError<u32, &str>>> = stream::iter(1..=4)
    ///     .circuit_breaker(&breaker, |_| async { Err("down") })
    ///     .collect()
    ///     .await;
    /// assert_eq!(
    ///     results,
    ///     [
    ///         Err(BreakerError::Failed("down")),
    ///         Err(BreakerError::Failed("down")), // the breaker opens here
    ///         Err(BreakerError::Open(3)),        // rejected without calling
    ///         Err(BreakerError::Open(4)),
    ///     ]
    /// );
    /// assert_eq!(breaker.state(), CircuitState::Open);
    /// # }
    /// ```
    fn circuit_breaker<B, F, Fut, U, E>(self, breaker: B, f: F) -> crate::Breaker<Self, F, Fut>
    where
        B: Into<crate::CircuitBreaker>,
        F: FnMut(Self::Item) -> Fut,
        Fut: std::future::Future<Output = Result<U, E>>,
        Self: Sized,
    {
        crate::Breaker::new(self, breaker.into(), f)
    }

    // -- batching: batch_dedupe, batch, debounce, dedupe_by, dedupe_with --
    /// Groups items into batches of at most `max` items with distinct keys, emitted when full,
    /// when `wait` has passed since the batch's first item, or when the input ends.
    ///
    /// `key(&item)` names each item; an item whose key is already in the current batch is
    /// dropped (the first one wins), so a batch never holds two items with equal keys. A key may
    /// appear again in a later batch. Items keep their input order within and across batches,
    /// and a batch is never empty.
    ///
    /// A batch is emitted as soon as it holds `max` items, even while upstream is pending. The
    /// `wait` starts at the batch's first item and is not extended by later items, so a steady
    /// trickle still flushes every `wait`; a quiet stream emits nothing. An item arriving at the
    /// very instant a batch is due starts the next batch. When the input ends, the partial
    /// batch is emitted before the stream ends. While upstream stays ready, the stream checks
    /// the clock at least once every 64 items it pulls (dropped duplicates included), so a batch
    /// whose `wait` has passed is emitted after at most 64 more items even if upstream never
    /// returns `Pending`.
    ///
    /// Keys are not stored. A table of the batch's positions, reused from batch to batch,
    /// finds an earlier item whose key may be equal, and `key` is called again on that item to
    /// confirm the duplicate. So `key` is called once per item, once more per dropped duplicate
    /// (rarely also for two keys whose hashes look alike), and, in a batch past 1024 items,
    /// again on every earlier item each time the table doubles. Like the key function of
    /// [`slice::sort_by_key`](https://doc.rust-lang.org/std/primitive.slice.html#method.sort_by_key),
    /// it should give equal keys for the same item every time. The table has 8-byte slots: 16
    /// per item of `max` up to 64 KiB, 4 to 8 per item beyond.
    ///
    /// Dropping the stream drops the partial batch it has not emitted;
    /// [`BatchDedupe::take_partial`](crate::BatchDedupe::take_partial) and
    /// [`BatchDedupe::into_inner`](crate::BatchDedupe::into_inner) hand it back instead.
    ///
    /// This is the dataloader pattern: collect the ids many callers ask for, drop the
    /// duplicates, and look each batch up with one query.
    ///
    /// The timer needs a tokio runtime with the time driver enabled.
    ///
    /// # Panics
    ///
    /// Panics if `max` is zero or above `u32::MAX`, or if `wait` is zero;
    /// [`BatchDedupe::try_new`](crate::BatchDedupe::try_new) returns the error instead.
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
    /// let user_ids = stream::iter([7, 3, 7, 9, 3, 1, 7]);
    /// let batches: Vec<Vec<u32>> = user_ids
    ///     .batch_dedupe(3, Duration::from_millis(10), |id| *id)
    ///     .collect()
    ///     .await;
    /// // The second 7 repeats inside the first batch and is dropped; 3 and 7 come back in the
    /// // next batch, which is a new one.
    /// assert_eq!(batches, [vec![7, 3, 9], vec![3, 1, 7]]);
    /// # }
    /// ```
    #[track_caller]
    fn batch_dedupe<K, F>(
        self,
        max: usize,
        wait: std::time::Duration,
        key: F,
    ) -> crate::BatchDedupe<Self, K, F>
    where
        Self: Sized,
        K: std::hash::Hash + Eq,
        F: FnMut(&Self::Item) -> K,
    {
        crate::error::or_panic(crate::BatchDedupe::try_new(self, max, wait, key))
    }

    /// Groups items into batches of at most `max` items, emitted when full, when `wait` has
    /// passed since the batch's first item, or when the input ends.
    ///
    /// The same as [`batch_dedupe`](PipelineExt::batch_dedupe) without dropping anything: every
    /// item is in exactly one batch, in input order, and a batch is never empty. A batch is
    /// emitted as soon as it holds `max` items, even while upstream is pending; the `wait`
    /// starts at the batch's first item and is not extended by later items (while upstream
    /// stays ready, the clock is checked at least once every 64 items, so a batch whose `wait`
    /// has passed is emitted after at most 64 more items); an item arriving at the very instant
    /// a batch is due starts the next batch; the partial batch is emitted when the input ends. This is the queue consumer's pattern: write by size or by time, and
    /// close the input on shutdown to flush the tail.
    ///
    /// Dropping the stream drops the partial batch it has not emitted;
    /// [`Batch::take_partial`](crate::Batch::take_partial) and
    /// [`Batch::into_inner`](crate::Batch::into_inner) hand it back instead.
    ///
    /// The timer needs a tokio runtime with the time driver enabled.
    ///
    /// # Panics
    ///
    /// Panics if `max` is zero or `wait` is zero; [`Batch::try_new`](crate::Batch::try_new)
    /// returns the error instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::{sleep, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let start = Instant::now();
    /// // Five items at once, then one more after 100 ms.
    /// let events = stream::iter(0..5).chain(stream::once(async {
    ///     sleep(Duration::from_millis(100)).await;
    ///     5
    /// }));
    /// let mut batches = Box::pin(events.batch(2, Duration::from_millis(30)));
    ///
    /// assert_eq!(batches.next().await, Some(vec![0, 1])); // full: at once
    /// assert_eq!(batches.next().await, Some(vec![2, 3]));
    /// assert_eq!(batches.next().await, Some(vec![4])); // 30 ms after its first item
    /// assert_eq!(start.elapsed(), Duration::from_millis(30));
    /// assert_eq!(batches.next().await, Some(vec![5])); // the tail, when the input ends
    /// assert_eq!(batches.next().await, None);
    /// # }
    /// ```
    #[track_caller]
    fn batch(self, max: usize, wait: std::time::Duration) -> crate::Batch<Self>
    where
        Self: Sized,
    {
        crate::error::or_panic(crate::Batch::try_new(self, max, wait))
    }

    /// Passes an item on only once `quiet` has passed without a newer item; a newer item
    /// replaces the one waiting and starts the `quiet` period again.
    ///
    /// When the input ends, the item still waiting is passed on at once, then the stream ends.
    /// An item arriving at the very instant the waiting one is due does not replace it. At most
    /// one item is held. Dropping the stream drops the item it holds;
    /// [`Debounce::take_held`](crate::Debounce::take_held) and
    /// [`Debounce::into_inner`](crate::Debounce::into_inner) hand it back instead.
    ///
    /// Typical uses: react to the last of a burst of change notifications, or save a document
    /// once typing pauses.
    ///
    /// The timer needs a tokio runtime with the time driver enabled.
    ///
    /// # Panics
    ///
    /// Panics if `quiet` is zero; [`Debounce::try_new`](crate::Debounce::try_new) returns the
    /// error instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::{sleep_until, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let start = Instant::now();
    /// // Keystrokes 10 ms apart, a pause of 100 ms, then two more.
    /// let keys = stream::iter([(0, "h"), (10, "he"), (20, "hel"), (120, "hell"), (130, "hello")])
    ///     .then(|(at, text)| async move {
    ///         sleep_until(start + Duration::from_millis(at)).await;
    ///         text
    ///     });
    /// let mut saved = Box::pin(keys.debounce(Duration::from_millis(50)));
    ///
    /// assert_eq!(saved.next().await, Some("hel")); // 50 ms after the last keystroke of the burst
    /// assert_eq!(start.elapsed(), Duration::from_millis(70));
    /// assert_eq!(saved.next().await, Some("hello")); // the input ended: passed on at once
    /// assert_eq!(start.elapsed(), Duration::from_millis(130));
    /// assert_eq!(saved.next().await, None);
    /// # }
    /// ```
    #[track_caller]
    fn debounce(self, quiet: std::time::Duration) -> crate::Debounce<Self>
    where
        Self: Sized,
    {
        crate::error::or_panic(crate::Debounce::try_new(self, quiet))
    }

    /// Drops an item whose key was let through less than `window` ago, remembering at most
    /// `capacity` keys: for consumers that must not see the same message twice in a row
    /// (redelivered queue messages, repeated webhooks).
    ///
    /// An item passes when no item with an equal key has passed within the last `window`
    /// (an item exactly `window` after it passes again); a dropped duplicate does not extend
    /// the window. Items keep their order and are never delayed.
    ///
    /// **Memory bound:** at most `capacity` keys are remembered (each stored twice, so keys
    /// should be cheap to clone: ids, not documents). A key is forgotten when its `window` has
    /// passed, or earlier, oldest first, when `capacity` newer keys have passed since; so choose
    /// `capacity` at least as large as the number of distinct keys expected within one
    /// `window`, or an old duplicate can pass early.
    ///
    /// Each item's time is read from tokio's clock (a paused clock works); no timer is used.
    ///
    /// # Panics
    ///
    /// Panics if `window` is zero or `capacity` is zero;
    /// [`DedupeBy::try_new`](crate::DedupeBy::try_new) returns the error instead.
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
    /// let start = tokio::time::Instant::now();
    /// // (arrival in ms, message id)
    /// let deliveries = stream::iter([(0, 1), (5, 2), (10, 1), (30, 2), (65, 2), (70, 1)])
    ///     .then(|(at, id)| async move {
    ///         tokio::time::sleep_until(start + Duration::from_millis(at)).await;
    ///         id
    ///     });
    /// let handled: Vec<u32> = deliveries
    ///     .dedupe_by(Duration::from_millis(60), 1000, |id| *id)
    ///     .collect()
    ///     .await;
    /// // 1 at 10 ms and 2 at 30 ms repeat within 60 ms and are dropped; 2 at 65 ms and 1 at
    /// // 70 ms come 60 ms or more after the ones that passed.
    /// assert_eq!(handled, [1, 2, 2, 1]);
    /// # }
    /// ```
    #[track_caller]
    fn dedupe_by<K, F>(
        self,
        window: std::time::Duration,
        capacity: usize,
        key: F,
    ) -> crate::DedupeBy<Self, K, F>
    where
        Self: Sized,
        K: std::hash::Hash + Eq + Clone,
        F: FnMut(&Self::Item) -> K,
    {
        crate::error::or_panic(crate::DedupeBy::try_new(self, window, capacity, key))
    }

    /// Drops items whose key was seen within the window by any process sharing it: a
    /// [`DedupeWindow`](crate::redis::DedupeWindow) kept in Redis (feature `redis`).
    ///
    /// `key(&item)` renders (with `Display`) to the item's key in the window. Each key is
    /// marked with `SET NX PX`: an item passes if its key was new, and is dropped if any
    /// handle on the window, in any process, marked it within the window. The marks of the
    /// items that are ready together (at most
    /// [`DedupeWindow::MAX_BATCH`](crate::redis::DedupeWindow::MAX_BATCH)) go to Redis as one
    /// batch, in one round trip; upstream is not pulled while a batch is under way, and items
    /// keep their input order. Within a batch the first of two equal keys wins.
    ///
    /// While Redis is away the window's [`Unavailable`](crate::redis::Unavailable) policy
    /// applies: `FailClosed` holds the batch and retries it with backoff, `FailOpen` lets
    /// every item pass, `Local` asks the handle's in-memory window.
    ///
    /// # Panics
    ///
    /// Does not panic on its own. Needs a tokio runtime (for Redis's connection and its
    /// timeouts).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::PipelineExt;
    /// use stagepipe::redis::{self, DedupeWindow};
    ///
    /// # async fn run() -> Result<(), stagepipe::redis::RedisError> {
    /// let conn = redis::connect("redis://127.0.0.1/").await?;
    /// let window = DedupeWindow::redis(&conn, "webhooks", Duration::from_secs(600));
    /// let events = stream::iter([(1, "paid"), (2, "paid"), (1, "paid")]);
    /// let fresh: Vec<(u32, &str)> = events.dedupe_with(&window, |(id, _)| *id).collect().await;
    /// // Event 1 arrives twice: only its first delivery passes (unless another process
    /// // handled it within the last 10 minutes, which drops it too).
    /// assert!(fresh.len() <= 2);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    fn dedupe_with<W, K, F>(self, window: W, key: F) -> crate::redis::DedupeWith<Self, K, F>
    where
        Self: Sized,
        W: Into<crate::redis::DedupeWindow>,
        F: FnMut(&Self::Item) -> K,
        K: std::fmt::Display,
    {
        crate::redis::DedupeWith::new(self, window.into(), key)
    }

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

    /// Maps each item to `f(item)`'s result through a shared [`Cache`](crate::Cache), under
    /// the key `key(&item)`: a stored result is yielded at once, a key whose call another
    /// caller is running waits for that call (singleflight), and only a miss calls `f`. One
    /// item at a time, in input order, like [`StreamExt::then`](futures::StreamExt::then); for
    /// many lookups at once, use the cache inside a concurrent operator
    /// (`.in_flight_ordered(n, move |x| cache.try_get_with(key(&x), || f(x)))`), or
    /// [`Call::cached`](crate::Call::cached).
    ///
    /// Errors are yielded in place and cached only if the cache says so
    /// ([`Cache::cache_errors_for`](crate::Cache::cache_errors_for)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use stagepipe::Cache;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let cache: Cache<&str, usize, String> = Cache::new(100, Duration::from_secs(60));
    /// let lengths: Vec<_> = stream::iter(["a", "bb", "a", "ccc", "bb"])
    ///     .cached(&cache, |w| *w, |w| async move { Ok(w.len()) })
    ///     .collect()
    ///     .await;
    /// assert_eq!(lengths, [Ok(1), Ok(2), Ok(1), Ok(3), Ok(2)]);
    /// let s = cache.stats();
    /// assert_eq!((s.misses, s.hits), (3, 2));
    /// # }
    /// ```
    fn cached<K, V, E, KF, F, Fut>(
        self,
        cache: &crate::Cache<K, V, E>,
        key: KF,
        f: F,
    ) -> crate::Cached<Self, K, V, E, KF, F>
    where
        Self: Sized,
        K: std::hash::Hash + Eq + Clone + Send + 'static,
        V: Clone + Send + Sync + 'static,
        E: Clone + Send + Sync + 'static,
        KF: FnMut(&Self::Item) -> K,
        F: FnMut(Self::Item) -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        crate::Cached::new(self, cache.clone(), key, f)
    }
}

impl<S: Stream + ?Sized> PipelineExt for S {}
