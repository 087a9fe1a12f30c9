//! [`Call`]: one policy stack (retry, circuit breaker, rate limit, timeout, in-flight cap,
//! stats) around any async function, usable inside any operator.
//!
//! The layers always apply in one fixed order, whatever the order of the builder calls:
//!
//! ```text
//! retry( circuit breaker( rate limit( timeout( in-flight( f(item) )))))
//! ```
//!
//! so every attempt is checked by the breaker, takes a cell of the rate limit, is timed out and
//! holds an in-flight unit while it runs, and a timeout is a failure the breaker counts.

mod cached;
mod error;
mod retry;
mod run;
mod stats;
mod timeout;

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{ConfigError, nonzero_duration};
use crate::{Backoff, BreakerError, CircuitBreaker, InFlightLimit, RateLimiter};

pub use cached::CachedCall;
pub use error::CallError;
pub use retry::{CallRetry, NoRetry, RetryAll, Retrying};
use stats::RunGuard;
pub use stats::{CallStats, CallStatsSnapshot};
use timeout::{Elapsed, Timeout};

/// One policy stack around an async function: a timeout, a rate limit, an in-flight cap, a
/// circuit breaker, retries and stats, each optional, applied in one fixed order.
///
/// Build it with [`Call::new(f)`](Self::new), where `f: Fn(T) -> Fut` and
/// `Fut: Future<Output = Result<U, E>>`, then add any of the layers. [`run(item)`](Self::run)
/// returns a `Send + 'static` future of `Result<U, CallError<E>>`, and `Call` is a cheap
/// [`Clone`] (one `Arc`) that shares its handles, so it drops into any operator:
/// `.in_flight(20, move |x| call.run(x))` or `.fan_out_ordered(&pool, move |x| call.run(x))`.
///
/// # The order of the layers
///
/// Whatever the order of the builder calls, a run is
///
/// ```text
/// retry( circuit breaker( rate limit( timeout( in-flight( f(item) )))))
/// ```
///
/// (resilience4j's order: Retry, CircuitBreaker, RateLimiter, TimeLimiter, Bulkhead). So:
///
/// * every **attempt** (retries included) goes through the breaker, takes one cell of the rate
///   limit, is timed out on its own and holds one unit of the in-flight limit while `f` runs;
/// * the **breaker** sees timeouts as failures (`failure_threshold` timeouts in a row open it),
///   and while it is open an attempt is rejected at once: `f` is not called, no cell is taken;
/// * the **timeout** starts once the attempt has its rate-limit cell, and covers the wait for
///   an in-flight unit and `f` itself;
/// * `f(item)` is called only when the attempt holds its in-flight unit.
///
/// # Retries
///
/// [`retry`](Self::retry) retries every error (timeouts and rejections included);
/// [`retry_if`](Self::retry_if) only those its predicate accepts. Each further attempt gets a
/// clone of the item, so **a retrying call needs `T: Clone`** (a call without retries does not);
/// the last allowed attempt takes the item itself. The waits come from the
/// [`Backoff`] exactly as in [`Backoff::retry`].
///
/// # Cancel safety
///
/// Dropping a `run` future drops the attempt in progress and gives back what it held: its
/// in-flight unit at once, and its rate-limit slot if it was still waiting for one (see
/// [`RateLimiter::until_ready`]). A dropped breaker trial leaves the breaker half-open; stats
/// count the run as `cancelled`.
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
/// let limiter = RateLimiter::per_second(1000).burst(50); // the API's quota
/// let breaker = CircuitBreaker::new(5, Duration::from_secs(10));
/// let stats = CallStats::new("fetch");
/// let call = Call::new(|id: u32| async move {
///     tokio::time::sleep(Duration::from_millis(10)).await; // the request
///     if id % 50 == 7 { Err(format!("{id}: not found")) } else { Ok(id * 2) }
/// })
/// .timeout(Duration::from_millis(100))
/// .rate_limit(&limiter)
/// .circuit_breaker(&breaker)
/// .retry_if(Backoff::exponential(Duration::from_millis(10)), |e: &CallError<String>| {
///     !e.is_failed() // retry timeouts and rejections, not "not found"
/// })
/// .stats(&stats);
///
/// let results: Vec<Result<u32, CallError<String>>> = stream::iter(0..100u32)
///     .in_flight(20, move |id| call.run(id))
///     .collect()
///     .await;
/// assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 98);
/// let s = stats.snapshot();
/// assert_eq!((s.calls, s.successes, s.failures, s.retries), (100, 98, 2, 0));
/// println!("{s}");
/// # }
/// ```
pub struct Call<F, R = NoRetry> {
    inner: Arc<Inner<F, R>>,
}

struct Inner<F, R> {
    f: Arc<F>,
    policy: Policy<R>,
}

impl<F, R: Clone> Clone for Inner<F, R> {
    fn clone(&self) -> Self {
        Self {
            f: Arc::clone(&self.f),
            policy: self.policy.clone(),
        }
    }
}

/// The layers of a call, without the function.
#[derive(Clone)]
pub(crate) struct Policy<R> {
    timeout: Option<Duration>,
    limiter: Option<RateLimiter>,
    in_flight: Option<InFlightLimit>,
    breaker: Option<CircuitBreaker>,
    retry: R,
    stats: Option<CallStats>,
}

/// Why one attempt failed, before the attempt count is known.
enum Fault<E> {
    Timeout,
    Rejected,
    Failed(E),
}

impl<F> Call<F> {
    /// A call of `f` with no layers yet: add them with the builder methods.
    ///
    /// ```
    /// use stagepipe::Call;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let double = Call::new(|x: u32| async move { Ok::<_, String>(x * 2) });
    /// assert_eq!(double.run(21).await, Ok(42));
    /// # }
    /// ```
    pub fn new<T, Fut, U, E>(f: F) -> Self
    where
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<U, E>>,
    {
        Self::from_parts(Arc::new(f))
    }
}

impl<F> Call<F> {
    pub(crate) fn from_parts(f: Arc<F>) -> Self {
        Self {
            inner: Arc::new(Inner {
                f,
                policy: Policy {
                    timeout: None,
                    limiter: None,
                    in_flight: None,
                    breaker: None,
                    retry: NoRetry,
                    stats: None,
                },
            }),
        }
    }
}

impl<F, R: Clone> Call<F, R> {
    fn policy_mut(&mut self) -> &mut Policy<R> {
        &mut Arc::make_mut(&mut self.inner).policy
    }

    fn with_retry<R2>(self, retry: R2) -> Call<F, R2> {
        let Inner { f, policy } = Arc::unwrap_or_clone(self.inner);
        let Policy {
            timeout,
            limiter,
            in_flight,
            breaker,
            stats,
            retry: _,
        } = policy;
        Call {
            inner: Arc::new(Inner {
                f,
                policy: Policy {
                    timeout,
                    limiter,
                    in_flight,
                    breaker,
                    retry,
                    stats,
                },
            }),
        }
    }

    or_panic_setter! {
        /// Times out each attempt after `timeout` (counted from the moment the attempt has its
        /// rate-limit cell; the wait for an in-flight unit is included). A timed-out attempt is a
        /// failure for the breaker and ends as [`CallError::Timeout`] unless it is retried.
        ///
        /// Any duration is accepted, `Duration::MAX` included: a timeout beyond about 30 years
        /// times out after about 30 years (never, in practice).
        ///
        /// # Panics
        ///
        /// If `timeout` is zero. [`try_timeout`](Self::try_timeout) returns the error instead.
        ///
        /// ```
        /// use std::time::Duration;
        /// use stagepipe::{Call, CallError};
        ///
        /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
        /// # async fn main() {
        /// let slow = Call::new(|_: ()| async {
        ///     tokio::time::sleep(Duration::from_secs(5)).await;
        ///     Ok::<_, String>(())
        /// })
        /// .timeout(Duration::from_secs(1));
        /// assert!(matches!(slow.run(()).await, Err(CallError::Timeout { attempts: 1, .. })));
        /// # }
        /// ```
        pub fn timeout(timeout: Duration) => try_timeout;
    }

    /// [`timeout`](Self::timeout), returning a [`ConfigError`] naming `timeout` if it is zero.
    pub fn try_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        nonzero_duration("timeout", timeout)?;
        self.policy_mut().timeout = Some(timeout);
        Ok(self)
    }

    /// Makes each attempt take one cell of `limiter` first (waiting for it), on the budget it
    /// shares with every stream and caller holding a clone. A retry takes a cell of its own.
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::{Call, RateLimiter};
    /// use tokio::time::Instant;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limiter = RateLimiter::per(Duration::from_millis(100));
    /// let call = Call::new(|x: u32| async move { Ok::<_, String>(x) }).rate_limit(&limiter);
    /// let start = Instant::now();
    /// for x in 0..3 {
    ///     call.run(x).await.unwrap();
    /// }
    /// limiter.until_ready().await; // a direct caller shares the quota
    /// assert_eq!(start.elapsed(), Duration::from_millis(300));
    /// # }
    /// ```
    #[must_use]
    pub fn rate_limit(mut self, limiter: impl Into<RateLimiter>) -> Self {
        self.policy_mut().limiter = Some(limiter.into());
        self
    }

    /// Makes each attempt hold one unit of `limit` while `f` runs (waiting for one first), on
    /// the budget it shares with every stream and caller holding a clone. A number makes a
    /// private limit, shared by the clones of this call.
    ///
    /// # Panics
    ///
    /// If `limit` is the number zero.
    ///
    /// ```
    /// use stagepipe::{Call, InFlightLimit};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let db = InFlightLimit::new(10); // shared with the streams that use the database
    /// let query = Call::new(|id: u32| async move { Ok::<_, String>(id) }).in_flight(&db);
    /// assert_eq!(query.run(3).await, Ok(3));
    /// assert_eq!(db.in_use(), 0);
    /// # }
    /// ```
    #[track_caller]
    #[must_use]
    pub fn in_flight(mut self, limit: impl Into<InFlightLimit>) -> Self {
        self.policy_mut().in_flight = Some(limit.into());
        self
    }

    /// Guards each attempt with `breaker`: an attempt's failure or timeout counts against it, and
    /// while it is open attempts are rejected without calling `f` ([`CallError::Rejected`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::{Call, CircuitBreaker, CircuitState};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let breaker = CircuitBreaker::new(2, Duration::from_secs(30));
    /// let call = Call::new(|_: ()| async {
    ///     tokio::time::sleep(Duration::from_secs(10)).await; // hangs
    ///     Ok::<_, String>(())
    /// })
    /// .timeout(Duration::from_secs(1))
    /// .circuit_breaker(&breaker);
    /// assert!(call.run(()).await.unwrap_err().is_timeout());
    /// assert!(call.run(()).await.unwrap_err().is_timeout());
    /// assert_eq!(breaker.state(), CircuitState::Open); // two timeouts in a row
    /// assert!(call.run(()).await.unwrap_err().is_rejected()); // at once, without calling f
    /// # }
    /// ```
    #[must_use]
    pub fn circuit_breaker(mut self, breaker: impl Into<CircuitBreaker>) -> Self {
        self.policy_mut().breaker = Some(breaker.into());
        self
    }

    /// Records every run into `stats`: outcomes, retries, timeouts, rejections, the time spent
    /// waiting on the rate limit, and the latency of each run (all attempts and waits included).
    /// Several calls may record into clones of one handle.
    ///
    /// ```
    /// use stagepipe::{Call, CallStats};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let stats = CallStats::new("parse");
    /// let parse = Call::new(|s: &'static str| async move { s.parse::<u32>() }).stats(&stats);
    /// assert!(parse.run("12").await.is_ok());
    /// assert!(parse.run("x").await.is_err());
    /// let s = stats.snapshot();
    /// assert_eq!((s.calls, s.successes, s.failures), (2, 1, 1));
    /// # }
    /// ```
    #[must_use]
    pub fn stats(mut self, stats: impl Into<CallStats>) -> Self {
        self.policy_mut().stats = Some(stats.into());
        self
    }

    /// Retries a failed attempt, whatever the error (timeouts and rejections included), as
    /// `backoff` says: at most [`Backoff::max_attempts`] attempts, waiting
    /// [`Backoff::delay_after`] between them. Replaces an earlier retry policy.
    ///
    /// Runs of a retrying call need `T: Clone`: each further attempt gets a clone of the item.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use std::time::Duration;
    /// use stagepipe::{Backoff, Call};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let tries = AtomicU32::new(0);
    /// let flaky = Call::new(move |x: u32| {
    ///     let n = tries.fetch_add(1, Ordering::Relaxed);
    ///     async move { if n < 2 { Err("busy") } else { Ok(x) } }
    /// })
    /// .retry(Backoff::fixed(Duration::from_millis(10)).max_attempts(5));
    /// assert_eq!(flaky.run(7).await, Ok(7)); // on the third attempt
    /// # }
    /// ```
    #[must_use]
    pub fn retry(self, backoff: Backoff) -> Call<F, Retrying<RetryAll>> {
        self.with_retry(Retrying {
            backoff,
            retryable: Arc::new(RetryAll),
        })
    }

    /// [`retry`](Self::retry), retrying only the errors for which `retryable` returns `true`;
    /// any other error ends the run at once. Needs `T: Clone` in the same way.
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::{Backoff, Call, CallError};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let call = Call::new(|_: ()| async { Err::<(), _>("not found") })
    ///     .retry_if(Backoff::fixed(Duration::from_millis(10)), |e: &CallError<&str>| {
    ///         e.is_timeout()
    ///     });
    /// assert_eq!(call.run(()).await.unwrap_err().attempts(), 1);
    /// # }
    /// ```
    #[must_use]
    pub fn retry_if<P>(self, backoff: Backoff, retryable: P) -> Call<F, Retrying<P>> {
        self.with_retry(Retrying {
            backoff,
            retryable: Arc::new(retryable),
        })
    }
}

impl<F, R> Call<F, R> {
    /// Runs `f(item)` through every layer of this call (see [the order](Self#the-order-of-the-layers)).
    ///
    /// The future owns a clone of the call, so it is `'static` and may be returned from an
    /// operator's closure. A retrying call needs `T: Clone` (through its [`CallRetry`] bound).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the attempt in progress and gives back its in-flight unit and
    /// (if it was still waiting for it) its rate-limit slot.
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() {
    /// let pool = WorkerPool::new(2);
    /// let call = Call::new(|x: u64| async move { Ok::<_, String>(x * x) }).in_flight(8);
    /// let out: Vec<Result<u64, CallError<String>>> = stream::iter(1..=4u64)
    ///     .fan_out_ordered(&pool, move |x| call.run(x))
    ///     .collect()
    ///     .await;
    /// assert_eq!(out, [Ok(1), Ok(4), Ok(9), Ok(16)]);
    /// # }
    /// ```
    pub fn run<T, Fut, U, E>(
        &self,
        item: T,
    ) -> impl Future<Output = Result<U, CallError<E>>> + Send + 'static + use<F, R, T, Fut, U, E>
    where
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
        R: CallRetry<T, E>,
        T: Send + 'static,
        U: Send + 'static,
        E: Send + 'static,
    {
        run::Run::new(Arc::clone(&self.inner), item)
    }

    /// The timeout of each attempt, if one is set.
    pub fn get_timeout(&self) -> Option<Duration> {
        self.inner.policy.timeout
    }

    /// The rate limiter each attempt draws on, if one is set.
    pub fn get_rate_limit(&self) -> Option<&RateLimiter> {
        self.inner.policy.limiter.as_ref()
    }

    /// The in-flight limit each attempt holds a unit of, if one is set.
    pub fn get_in_flight(&self) -> Option<&InFlightLimit> {
        self.inner.policy.in_flight.as_ref()
    }

    /// The circuit breaker guarding each attempt, if one is set.
    pub fn get_circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.policy.breaker.as_ref()
    }

    /// The stats this call records into, if set.
    pub fn get_stats(&self) -> Option<&CallStats> {
        self.inner.policy.stats.as_ref()
    }

    #[cfg(feature = "tower")]
    pub(crate) fn policy(&self) -> &Policy<R> {
        &self.inner.policy
    }
}

impl<R> Policy<R> {
    /// Runs `item` through the layers, calling `attempt` for each attempt that gets that far
    /// (for the tower service; [`Call::run`] has a fast path of its own in front of
    /// [`attempts`](Self::attempts)).
    #[cfg(feature = "tower")]
    pub(crate) async fn execute<T, U, E, A, Fut>(
        &self,
        item: T,
        attempt: A,
    ) -> Result<U, CallError<E>>
    where
        R: CallRetry<T, E>,
        A: FnMut(T) -> Fut,
        Fut: Future<Output = Result<U, E>>,
    {
        // The clock is read once per run where it can be: the start of a run is also the start
        // of its first attempt, until something waits.
        let started = self.stats.as_ref().map(|_| Instant::now());
        let run = self.stats.as_ref().zip(started).map(|(s, t)| {
            s.started();
            s.resume(t)
        });
        self.attempts(item, attempt, 1, started, run).await
    }

    /// The attempts of a run from the `attempts`-th on (with `item`), and the record of its end
    /// in the stats through `run`. `now` is the current instant if the caller knows it.
    async fn attempts<T, U, E, A, Fut>(
        &self,
        mut item: T,
        mut attempt: A,
        mut attempts: u32,
        mut now: Option<Instant>,
        run: Option<RunGuard<'_>>,
    ) -> Result<U, CallError<E>>
    where
        R: CallRetry<T, E>,
        A: FnMut(T) -> Fut,
        Fut: Future<Output = Result<U, E>>,
    {
        let result = loop {
            let next = self.retry.copy_for_retry(&item, attempts);
            let error = match self.attempt(&mut attempt, item, now.take()).await {
                Ok(value) => break Ok(value),
                Err(Fault::Timeout) => CallError::timeout(attempts),
                Err(Fault::Rejected) => CallError::rejected(attempts),
                Err(Fault::Failed(e)) => CallError::failed(e, attempts),
            };
            match next {
                Some(next) if self.retry.retryable(&error) => {
                    crate::time::sleep(self.retry.delay_after(attempts)).await;
                    if let Some(stats) = &self.stats {
                        stats.retry();
                    }
                    item = next;
                    attempts += 1;
                }
                _ => break Err(error),
            }
        };
        if let Some(run) = run {
            run.finish(result.is_ok());
        }
        result
    }

    /// One attempt: breaker( rate limit( timeout( in-flight( f(item) )))). `now` is the current
    /// instant if the caller knows it (nothing has waited since it was read).
    async fn attempt<T, U, E, A, Fut>(
        &self,
        f: &mut A,
        item: T,
        now: Option<Instant>,
    ) -> Result<U, Fault<E>>
    where
        A: FnMut(T) -> Fut,
        Fut: Future<Output = Result<U, E>>,
    {
        let limited = async {
            let now = match &self.limiter {
                Some(limiter) => self.take_cell(limiter, now).await,
                None => now,
            };
            if let Some(limit) = self.in_flight.as_ref().filter(|l| l.is_adaptive()) {
                // Boxed: a fixed limit's attempt keeps the size it had.
                return Box::pin(self.timed_adaptive(limit, f, item, now)).await;
            }
            let call = async {
                match &self.in_flight {
                    Some(limit) => limit.run_fixed(async { f(item).await }).await,
                    None => f(item).await,
                }
            };
            let result = match self.timeout {
                Some(timeout) => {
                    let now = now.unwrap_or_else(Instant::now);
                    match Timeout::new(call, now, timeout).await {
                        Ok(result) => result,
                        Err(Elapsed) => return Err(Fault::Timeout),
                    }
                }
                None => call.await,
            };
            result.map_err(Fault::Failed)
        };
        let result = match &self.breaker {
            Some(breaker) => match breaker.call(limited).await {
                Ok(value) => Ok(value),
                Err(BreakerError::Open(())) => Err(Fault::Rejected),
                Err(BreakerError::Failed(fault)) => Err(fault),
            },
            None => limited.await,
        };
        if let Some(stats) = &self.stats {
            match &result {
                Err(Fault::Timeout) => stats.timeout(),
                Err(Fault::Rejected) => stats.rejected(),
                _ => {}
            }
        }
        result
    }

    /// timeout( in-flight( f(item) )) with an adaptive in-flight limit: the unit is kept out
    /// here, outside the timeout, so that the attempt's outcome reaches the limit (a success
    /// with its latency; a failure or a timeout, both drop signals). A unit dropped with a
    /// cancelled run reports nothing.
    async fn timed_adaptive<T, U, E, A, Fut>(
        &self,
        limit: &InFlightLimit,
        f: &mut A,
        item: T,
        now: Option<Instant>,
    ) -> Result<U, Fault<E>>
    where
        A: FnMut(T) -> Fut,
        Fut: Future<Output = Result<U, E>>,
    {
        let mut held = None;
        let call = async {
            held = Some(limit.acquire().await);
            f(item).await
        };
        let result = match self.timeout {
            Some(timeout) => {
                let now = now.unwrap_or_else(Instant::now);
                Timeout::new(call, now, timeout).await
            }
            None => Ok(call.await),
        };
        if let Some(permit) = held {
            limit.finish(permit, !matches!(result, Ok(Ok(_))));
        }
        match result {
            Ok(result) => result.map_err(Fault::Failed),
            Err(Elapsed) => Err(Fault::Timeout),
        }
    }

    /// Waits for a cell of `limiter`, adding the wait to the stats. Returns the current instant
    /// if it is known: `now` if the cell was free at once, else the end of the wait if the stats
    /// read it. (`now`, when known, is also when the wait began: the first poll follows it.)
    async fn take_cell(&self, limiter: &RateLimiter, now: Option<Instant>) -> Option<Instant> {
        let mut ready = pin!(limiter.until_ready());
        let mut waited = false;
        let mut since = None; // when the wait began, if the stats need it
        poll_fn(|cx| {
            let poll = ready.as_mut().poll(cx);
            if poll.is_pending() && !waited {
                waited = true;
                if self.stats.is_some() {
                    since = Some(now.unwrap_or_else(Instant::now));
                }
            }
            poll
        })
        .await;
        if !waited {
            return now;
        }
        let (stats, since) = (self.stats.as_ref()?, since?);
        let end = Instant::now();
        stats.limiter_wait(end.saturating_duration_since(since));
        Some(end)
    }
}

impl<F, R> Clone for Call<F, R> {
    /// A clone sharing the function and every handle.
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<R: fmt::Debug> fmt::Debug for Policy<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("retry", &self.retry)
            .field("circuit_breaker", &self.breaker)
            .field("rate_limit", &self.limiter)
            .field("timeout", &self.timeout)
            .field("in_flight", &self.in_flight)
            .field("stats", &self.stats.as_ref().map(CallStats::name))
            .finish_non_exhaustive()
    }
}

impl<F, R: fmt::Debug> fmt::Debug for Call<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.policy.fmt(f)
    }
}
