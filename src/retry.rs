//! [`Backoff`], [`RetryError`] and the [`Retry`] / [`RetryIf`] streams.

use crate::error::{ConfigError, nonzero, nonzero_duration, or_panic};
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::stream::{Fuse, FusedStream};
use futures::{Stream, StreamExt, TryFuture};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::macros::size_hint_plus;
use crate::time;

/// A retry policy: how many attempts, and how long to wait between them.
///
/// Built with [`fixed`](Self::fixed) or [`exponential`](Self::exponential), then optionally
/// [`max_attempts`](Self::max_attempts) (default 3, the first attempt included),
/// [`max_delay`](Self::max_delay) and [`jitter`](Self::jitter). A `Backoff` is a plain value:
/// use it for the [`retry`](crate::PipelineExt::retry) operator or around any async call with
/// [`retry`](Self::retry). Waiting uses tokio's timer; a wait lasts at most about 30 years, so
/// any delay up to `Duration::MAX` is safe to wait.
///
/// ```
/// use std::time::Duration;
/// use stagepipe::Backoff;
///
/// let backoff = Backoff::exponential(Duration::from_millis(100))
///     .max_attempts(5)
///     .max_delay(Duration::from_millis(300));
/// // the waits after the 1st, 2nd, 3rd and 4th failed attempts
/// let waits: Vec<_> = (1..5).map(|n| backoff.delay_after(n)).collect();
/// assert_eq!(waits, [100, 200, 300, 300].map(Duration::from_millis));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    exponential: bool,
    delay: Duration,
    max_attempts: u32,
    max_delay: Option<Duration>,
    jitter: bool,
}

const DEFAULT_ATTEMPTS: u32 = 3;

impl Backoff {
    /// Waits `delay` between attempts (zero retries at once).
    pub fn fixed(delay: Duration) -> Self {
        Self {
            exponential: false,
            delay,
            max_attempts: DEFAULT_ATTEMPTS,
            max_delay: None,
            jitter: false,
        }
    }

    /// Waits `initial` after the first failed attempt, then doubles the wait after each one.
    ///
    /// # Panics
    ///
    /// If `initial` is zero (it would never grow). [`try_exponential`](Self::try_exponential)
    /// returns the error instead.
    #[track_caller]
    pub fn exponential(initial: Duration) -> Self {
        or_panic(Self::try_exponential(initial))
    }

    /// [`exponential`](Self::exponential), returning a [`ConfigError`] naming `initial` if it
    /// is zero.
    pub fn try_exponential(initial: Duration) -> Result<Self, ConfigError> {
        nonzero_duration("initial", initial)?;
        Ok(Self {
            exponential: true,
            ..Self::fixed(initial)
        })
    }

    /// Makes at most `n` attempts in total, the first one included (default 3).
    ///
    /// # Panics
    ///
    /// If `n` is zero. [`try_max_attempts`](Self::try_max_attempts) returns the error instead.
    #[track_caller]
    #[must_use]
    pub fn max_attempts(self, n: u32) -> Self {
        or_panic(self.try_max_attempts(n))
    }

    /// [`max_attempts`](Self::max_attempts), returning a [`ConfigError`] naming `n` if it is
    /// zero.
    pub fn try_max_attempts(self, n: u32) -> Result<Self, ConfigError> {
        nonzero("n", u64::from(n))?;
        Ok(Self {
            max_attempts: n,
            ..self
        })
    }

    /// Caps every wait at `d` (before jitter).
    #[must_use]
    pub fn max_delay(self, d: Duration) -> Self {
        Self {
            max_delay: Some(d),
            ..self
        }
    }

    /// Full jitter: each wait is drawn uniformly from `[0, nominal]`, so that many callers
    /// failing together do not retry together.
    #[must_use]
    pub fn jitter(self) -> Self {
        Self {
            jitter: true,
            ..self
        }
    }

    /// The number of attempts in total, the first one included.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The wait after the `attempt`-th failed attempt (counted from 1), before jitter.
    ///
    /// An exponential wait doubles exactly after each failed attempt up to `Duration::MAX`,
    /// where it stays; [`max_delay`](Self::max_delay) caps it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::Backoff;
    ///
    /// let backoff = Backoff::exponential(Duration::from_nanos(1));
    /// assert_eq!(backoff.nominal_delay_after(33), Duration::from_nanos(1 << 32));
    /// assert_eq!(backoff.nominal_delay_after(200), Duration::MAX);
    /// let capped = backoff.max_delay(Duration::from_secs(1));
    /// assert_eq!(capped.nominal_delay_after(200), Duration::from_secs(1));
    /// ```
    pub fn nominal_delay_after(&self, attempt: u32) -> Duration {
        let delay = if self.exponential {
            doubled(self.delay, attempt.saturating_sub(1))
        } else {
            self.delay
        };
        match self.max_delay {
            Some(max) => delay.min(max),
            None => delay,
        }
    }

    /// The wait after the `attempt`-th failed attempt (counted from 1), jitter included: with
    /// [`jitter`](Self::jitter), a fresh random draw from `[0, nominal]` on every call.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let nominal = self.nominal_delay_after(attempt);
        if self.jitter && !nominal.is_zero() {
            from_nanos(fastrand::u128(0..=nominal.as_nanos()))
        } else {
            nominal
        }
    }

    /// Calls `f` and awaits its future until it returns `Ok` or the policy gives up; returns the
    /// last result.
    ///
    /// The returned future owns a copy of the policy (it does not borrow `self`), so it can be
    /// returned from a closure, as in `fan_out_ordered(n, move |x| backoff.retry(...))`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the attempt in progress; nothing else is left behind.
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::Backoff;
    /// use tokio::time::Instant;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let start = Instant::now();
    /// let mut calls = 0;
    /// let result: Result<u32, &str> = Backoff::fixed(Duration::from_millis(10))
    ///     .max_attempts(5)
    ///     .retry(|| {
    ///         calls += 1;
    ///         let n = calls;
    ///         async move { if n < 3 { Err("busy") } else { Ok(n) } }
    ///     })
    ///     .await;
    /// assert_eq!(result, Ok(3));
    /// assert_eq!(start.elapsed(), Duration::from_millis(20)); // two waits
    /// # }
    /// ```
    pub fn retry<F, Fut, U, E>(
        &self,
        f: F,
    ) -> impl Future<Output = Result<U, E>> + use<F, Fut, U, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<U, E>>,
    {
        self.retry_if(f, |_: &E| true)
    }

    /// [`retry`](Self::retry), giving up at once on an error for which `retryable` returns
    /// `false` (a permanent error).
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::Backoff;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let mut calls = 0;
    /// let result: Result<(), &str> = Backoff::fixed(Duration::from_millis(10))
    ///     .retry_if(
    ///         || {
    ///             calls += 1;
    ///             async { Err("not found") }
    ///         },
    ///         |e: &&str| *e != "not found",
    ///     )
    ///     .await;
    /// assert_eq!((result, calls), (Err("not found"), 1));
    /// # }
    /// ```
    pub fn retry_if<F, Fut, U, E, P>(
        &self,
        mut f: F,
        mut retryable: P,
    ) -> impl Future<Output = Result<U, E>> + use<F, Fut, U, E, P>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<U, E>>,
        P: FnMut(&E) -> bool,
    {
        let policy = self.clone();
        async move {
            let mut attempts = 1;
            loop {
                match f().await {
                    Ok(value) => return Ok(value),
                    Err(error) => {
                        if attempts >= policy.max_attempts || !retryable(&error) {
                            return Err(error);
                        }
                        time::sleep(policy.delay_after(attempts)).await;
                        attempts += 1;
                    }
                }
            }
        }
    }
}

/// `delay` doubled `doublings` times, saturating at `Duration::MAX`.
fn doubled(delay: Duration, doublings: u32) -> Duration {
    let nanos = delay.as_nanos();
    // `Duration::MAX` is below 2^94 ns, so a `u128` holds every doubling that can fit: one
    // that would shift a bit out is far beyond it.
    if nanos == 0 {
        Duration::ZERO
    } else if doublings < nanos.leading_zeros() {
        from_nanos(nanos << doublings)
    } else {
        Duration::MAX
    }
}

/// `nanos` nanoseconds, saturating at `Duration::MAX`.
fn from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10^9: it fits.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

/// An item whose retries were exhausted (or whose error was not retryable): the item back, the
/// last error, and how many attempts were made.
///
/// `Display` prints the attempt count and the last error; [`source`](Error::source) is the last
/// error's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryError<T, E> {
    /// The input item, given back.
    pub item: T,
    /// The error of the last attempt.
    pub error: E,
    /// How many attempts were made, the first one included.
    pub attempts: u32,
}

impl<T, E: fmt::Display> fmt::Display for RetryError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.attempts == 1 { "" } else { "s" };
        write!(
            f,
            "gave up after {} attempt{s}: {}",
            self.attempts, self.error
        )
    }
}

impl<T: fmt::Debug, E: Error> Error for RetryError<T, E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.error.source()
    }
}

/// Which errors are worth another attempt.
pub(crate) trait Classify<E> {
    fn retryable(&mut self, error: &E) -> bool;
}

/// Every error is retryable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Always;

impl<E> Classify<E> for Always {
    fn retryable(&mut self, _: &E) -> bool {
        true
    }
}

/// Errors are retryable when the predicate says so.
pub(crate) struct When<P>(P);

impl<E, P: FnMut(&E) -> bool> Classify<E> for When<P> {
    fn retryable(&mut self, error: &E) -> bool {
        (self.0)(error)
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Fut> {
        Idle,
        Calling { #[pin] fut: Fut },
        Waiting { #[pin] sleep: Sleep },
    }
}

pin_project! {
    /// The engine behind [`Retry`] and [`RetryIf`]: one item at a time, its errors classified
    /// by `C`.
    struct Core<S: Stream, F, Fut, C> {
        #[pin]
        stream: Fuse<S>,
        f: F,
        classify: C,
        backoff: Backoff,
        item: Option<S::Item>,
        attempts: u32,
        #[pin]
        state: State<Fut>,
    }
}

impl<S: Stream, F, Fut, C> Core<S, F, Fut, C> {
    fn new(stream: S, backoff: Backoff, f: F, classify: C) -> Self {
        Self {
            stream: stream.fuse(),
            f,
            classify,
            backoff,
            item: None,
            attempts: 0,
            state: State::Idle,
        }
    }

    delegate_access_inner!(stream, Fuse<S>, ());

    fn is_terminated(&self) -> bool {
        self.stream.is_terminated() && self.item.is_none()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        size_hint_plus(usize::from(self.item.is_some()), self.stream.size_hint())
    }

    fn fmt_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result
    where
        S: fmt::Debug,
    {
        f.debug_struct(name)
            .field("stream", self.stream.get_ref())
            .field("backoff", &self.backoff)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

type Output<T, Fut> = Result<<Fut as TryFuture>::Ok, RetryError<T, <Fut as TryFuture>::Error>>;

impl<S, F, Fut, C> Core<S, F, Fut, C>
where
    S: Stream,
    S::Item: Clone,
    F: FnMut(S::Item) -> Fut,
    Fut: TryFuture,
    C: Classify<Fut::Error>,
{
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Output<S::Item, Fut>>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Idle => {
                    let Some(item) = ready!(this.stream.as_mut().poll_next(cx)) else {
                        return Poll::Ready(None);
                    };
                    *this.attempts = 1;
                    let fut = (this.f)(item.clone());
                    *this.item = Some(item);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = ready!(fut.try_poll(cx));
                    match result {
                        Ok(value) => {
                            this.state.set(State::Idle);
                            *this.item = None;
                            return Poll::Ready(Some(Ok(value)));
                        }
                        Err(error) => {
                            let attempts = *this.attempts;
                            if attempts >= this.backoff.max_attempts
                                || !this.classify.retryable(&error)
                            {
                                this.state.set(State::Idle);
                                let item = this.item.take().expect("the current item is kept");
                                return Poll::Ready(Some(Err(RetryError {
                                    item,
                                    error,
                                    attempts,
                                })));
                            }
                            let delay = this.backoff.delay_after(attempts);
                            *this.attempts += 1;
                            if delay.is_zero() {
                                let item = this.item.as_ref().expect("the current item is kept");
                                let fut = (this.f)(item.clone());
                                this.state.set(State::Calling { fut });
                            } else {
                                let sleep = sleep_until(time::deadline(Instant::now(), delay));
                                this.state.set(State::Waiting { sleep });
                            }
                        }
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.poll(cx));
                    let item = this.item.as_ref().expect("the current item is kept");
                    let fut = (this.f)(item.clone());
                    this.state.set(State::Calling { fut });
                }
            }
        }
    }
}

pin_project! {
    /// Stream for the [`retry`](crate::PipelineExt::retry) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct Retry<S: Stream, F, Fut> {
        #[pin]
        core: Core<S, F, Fut, Always>,
    }
}

impl<S: Stream, F, Fut> Retry<S, F, Fut> {
    pub(crate) fn new(stream: S, backoff: Backoff, f: F) -> Self {
        Self {
            core: Core::new(stream, backoff, f, Always),
        }
    }

    /// The retry policy.
    pub fn backoff(&self) -> &Backoff {
        &self.core.backoff
    }

    delegate_access_inner!(pub core, S, (. .));
}

delegate_stream!(
    impl[S, F, Fut] Retry<S, F, Fut>
    where [S: Stream, S::Item: Clone, F: FnMut(S::Item) -> Fut, Fut: TryFuture]
    => Output<S::Item, Fut>;
    Debug where [S: Stream + fmt::Debug]
);

pin_project! {
    /// Stream for the [`retry_if`](crate::PipelineExt::retry_if) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct RetryIf<S: Stream, F, Fut, P> {
        #[pin]
        core: Core<S, F, Fut, When<P>>,
    }
}

impl<S: Stream, F, Fut, P> RetryIf<S, F, Fut, P> {
    pub(crate) fn new(stream: S, backoff: Backoff, f: F, retryable: P) -> Self {
        Self {
            core: Core::new(stream, backoff, f, When(retryable)),
        }
    }

    /// The retry policy.
    pub fn backoff(&self) -> &Backoff {
        &self.core.backoff
    }

    delegate_access_inner!(pub core, S, (. .));
}

delegate_stream!(
    impl[S, F, Fut, P] RetryIf<S, F, Fut, P>
    where [
        S: Stream,
        S::Item: Clone,
        F: FnMut(S::Item) -> Fut,
        Fut: TryFuture,
        P: FnMut(&Fut::Error) -> bool,
    ]
    => Output<S::Item, Fut>;
    Debug where [S: Stream + fmt::Debug]
);
