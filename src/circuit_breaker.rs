//! [`CircuitBreaker`], [`CircuitState`], [`BreakerError`] and the [`Breaker`] stream.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::stream::FusedStream;
use futures::{Stream, TryFuture};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::error::{ConfigError, nonzero, or_panic};

/// The state of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are rejected without running, until `open_for` has passed since it opened.
    Open,
    /// `open_for` has passed: the next call runs as a trial (and calls arriving while it runs
    /// are rejected). Its success closes the breaker, its failure opens it again.
    HalfOpen,
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        })
    }
}

/// A call refused by an open breaker, or a call that failed.
///
/// `Display` of `Failed` is the call's own error (and `source` is its source), so the breaker is
/// transparent to error reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerError<T, E> {
    /// The breaker was open (or half-open with its trial call running): the call did not run.
    /// The item comes back (`()` for [`CircuitBreaker::call`]).
    Open(T),
    /// The call ran and returned this error.
    Failed(E),
}

impl<T, E> BreakerError<T, E> {
    /// Whether the call was rejected without running.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }

    /// The call's error, if it ran and failed.
    pub fn into_failed(self) -> Option<E> {
        match self {
            Self::Failed(e) => Some(e),
            Self::Open(_) => None,
        }
    }
}

impl<T, E: fmt::Display> fmt::Display for BreakerError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open(_) => f.write_str("circuit breaker is open"),
            Self::Failed(e) => e.fmt(f),
        }
    }
}

impl<T: fmt::Debug, E: Error> Error for BreakerError<T, E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Open(_) => None,
            Self::Failed(e) => e.source(),
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
/// Half-open, with its one trial call running.
const TRIAL: u8 = 2;

/// A circuit breaker shared by every clone: after `failure_threshold` consecutive failures it
/// opens and rejects calls without running them; after `open_for` it lets one trial call
/// through, which closes it on success or opens it again on failure.
///
/// Use it on a stream with [`circuit_breaker`](crate::PipelineExt::circuit_breaker) or around
/// any future with [`call`](Self::call); every holder of a clone feeds and obeys the same state.
///
/// * **Closed**: calls run. A failure (`Err`) adds one to the consecutive-failure count, a
///   success resets it; at `failure_threshold` the breaker opens.
/// * **Open**: calls are rejected at once with [`BreakerError::Open`], without running.
/// * **Half-open** (once `open_for` has passed): exactly one trial call runs; calls arriving
///   while it runs are rejected as `Open`. Success closes the breaker, failure opens it again
///   for `open_for`. A trial call that is dropped unfinished leaves the breaker half-open for
///   the next call.
///
/// Outcomes of calls that started while the breaker was closed but finish after it opened are
/// ignored. The state lives in a few atomics (no lock); the success path costs two atomic
/// loads. Every state change emits a `tracing` event (target `stagepipe::circuit_breaker`:
/// `warn` when it opens, `info` when it half-opens or closes).
///
/// ```
/// use std::time::Duration;
/// use stagepipe::{BreakerError, CircuitBreaker, CircuitState};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let breaker = CircuitBreaker::new(2, Duration::from_secs(1));
/// for _ in 0..2 {
///     let r = breaker.call(async { Err::<(), _>("down") }).await;
///     assert_eq!(r, Err(BreakerError::Failed("down")));
/// }
/// assert_eq!(breaker.state(), CircuitState::Open);
/// let r = breaker.call(async { Ok::<_, &str>(1) }).await;
/// assert_eq!(r, Err(BreakerError::Open(()))); // rejected without running
///
/// tokio::time::sleep(Duration::from_secs(1)).await;
/// assert_eq!(breaker.state(), CircuitState::HalfOpen);
/// assert_eq!(breaker.call(async { Ok::<_, &str>(1) }).await, Ok(1)); // the trial
/// assert_eq!(breaker.state(), CircuitState::Closed);
/// # }
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

struct Shared {
    failure_threshold: u32,
    open_for: u64,
    base: Instant,
    state: AtomicU8,
    failures: AtomicU32,
    /// When the breaker last opened, in nanoseconds since `base`. Written before `state`
    /// becomes `OPEN` (release), read after `state` is seen `OPEN` (acquire).
    opened_at: AtomicU64,
}

/// What a caller was let through as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permit {
    Normal,
    Trial,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(
            Instant::now()
                .saturating_duration_since(self.base)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
    }

    #[inline]
    fn acquire(&self) -> Option<Permit> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Some(Permit::Normal),
            OPEN => {
                let opened_at = self.opened_at.load(Ordering::Acquire);
                if self.now() < opened_at.saturating_add(self.open_for) {
                    return None;
                }
                self.state
                    .compare_exchange(OPEN, TRIAL, Ordering::AcqRel, Ordering::Acquire)
                    .ok()?;
                tracing::info!(target: "stagepipe::circuit_breaker", "circuit breaker half-open: trial call");
                Some(Permit::Trial)
            }
            _ => None,
        }
    }

    #[inline]
    fn succeeded(&self, permit: Permit) {
        match permit {
            Permit::Normal => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
            }
            Permit::Trial => {
                self.failures.store(0, Ordering::Relaxed);
                self.state.store(CLOSED, Ordering::Release);
                tracing::info!(target: "stagepipe::circuit_breaker", "circuit breaker closed: trial call succeeded");
            }
        }
    }

    fn failed(&self, permit: Permit) {
        match permit {
            Permit::Normal => {
                if self.state.load(Ordering::Acquire) != CLOSED {
                    return;
                }
                let failures = self
                    .failures
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                if failures >= self.failure_threshold {
                    self.opened_at.store(self.now(), Ordering::Release);
                    if self
                        .state
                        .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        tracing::warn!(
                            target: "stagepipe::circuit_breaker",
                            failures,
                            open_for = ?Duration::from_nanos(self.open_for),
                            "circuit breaker opened"
                        );
                    }
                }
            }
            Permit::Trial => {
                self.opened_at.store(self.now(), Ordering::Release);
                self.state.store(OPEN, Ordering::Release);
                tracing::warn!(
                    target: "stagepipe::circuit_breaker",
                    open_for = ?Duration::from_nanos(self.open_for),
                    "circuit breaker opened again: trial call failed"
                );
            }
        }
    }

    /// A call let through as `permit` ended without an outcome (dropped, or panicked).
    fn abandoned(&self, permit: Permit) {
        if permit == Permit::Trial {
            // Back to open with the old (expired) opening time: the next call is the trial.
            self.state.store(OPEN, Ordering::Release);
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker that opens after `failure_threshold` consecutive failures and stays open
    /// for `open_for` before letting a trial call through.
    ///
    /// # Panics
    ///
    /// If `failure_threshold` or `open_for` is zero. [`try_new`](Self::try_new) returns the error
    /// instead.
    #[track_caller]
    pub fn new(failure_threshold: u32, open_for: Duration) -> Self {
        or_panic(Self::try_new(failure_threshold, open_for))
    }

    /// [`new`](Self::new), returning a [`ConfigError`] naming `failure_threshold` or `open_for`
    /// if it is zero.
    pub fn try_new(failure_threshold: u32, open_for: Duration) -> Result<Self, ConfigError> {
        nonzero("failure_threshold", u64::from(failure_threshold))?;
        if open_for.is_zero() {
            return Err(ConfigError::new("open_for", "must be greater than zero"));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                failure_threshold,
                open_for: u64::try_from(open_for.as_nanos()).unwrap_or(u64::MAX),
                base: Instant::now(),
                state: AtomicU8::new(CLOSED),
                failures: AtomicU32::new(0),
                opened_at: AtomicU64::new(0),
            }),
        })
    }

    /// The current state. `Open` turns into `HalfOpen` once `open_for` has passed, even before
    /// a call arrives.
    pub fn state(&self) -> CircuitState {
        let shared = &self.shared;
        match shared.state.load(Ordering::Acquire) {
            CLOSED => CircuitState::Closed,
            OPEN => {
                let opened_at = shared.opened_at.load(Ordering::Acquire);
                if shared.now() < opened_at.saturating_add(shared.open_for) {
                    CircuitState::Open
                } else {
                    CircuitState::HalfOpen
                }
            }
            _ => CircuitState::HalfOpen,
        }
    }

    /// The number of consecutive failures counted while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// The number of consecutive failures that opens the breaker.
    pub fn failure_threshold(&self) -> u32 {
        self.shared.failure_threshold
    }

    /// How long the breaker stays open before a trial call.
    pub fn open_for(&self) -> Duration {
        Duration::from_nanos(self.shared.open_for)
    }

    /// Runs `fut` if the breaker lets it through and records its outcome; rejects it at once,
    /// without polling it, while the breaker is open.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future drops `fut`; the outcome is not recorded (a dropped trial
    /// call leaves the breaker half-open for the next call).
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::{BreakerError, CircuitBreaker};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let breaker = CircuitBreaker::new(3, Duration::from_secs(5));
    /// let r: Result<u32, BreakerError<(), String>> = breaker.call(async { Ok(7) }).await;
    /// assert_eq!(r, Ok(7));
    /// # }
    /// ```
    pub fn call<Fut, U, E>(&self, fut: Fut) -> impl Future<Output = Result<U, BreakerError<(), E>>>
    where
        Fut: Future<Output = Result<U, E>>,
    {
        Call {
            shared: &self.shared,
            fut,
            permit: None,
            started: false,
        }
    }
}

pin_project! {
    /// The future of [`CircuitBreaker::call`]: asks for a permit on its first poll, then runs
    /// the call and records its outcome (a hand-written future, so the call is not moved again).
    struct Call<'a, Fut> {
        shared: &'a Shared,
        #[pin]
        fut: Fut,
        permit: Option<Permit>,
        started: bool,
    }

    impl<'a, Fut> PinnedDrop for Call<'a, Fut> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(permit) = this.permit.take() {
                this.shared.abandoned(permit);
            }
        }
    }
}

impl<Fut, U, E> Future for Call<'_, Fut>
where
    Fut: Future<Output = Result<U, E>>,
{
    type Output = Result<U, BreakerError<(), E>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.started {
            *this.started = true;
            match this.shared.acquire() {
                Some(permit) => *this.permit = Some(permit),
                None => return Poll::Ready(Err(BreakerError::Open(()))),
            }
        }
        let result = ready!(this.fut.poll(cx));
        if let Some(permit) = this.permit.take() {
            match &result {
                Ok(_) => this.shared.succeeded(permit),
                Err(_) => this.shared.failed(permit),
            }
        }
        Poll::Ready(result.map_err(BreakerError::Failed))
    }
}

impl From<&CircuitBreaker> for CircuitBreaker {
    /// A clone of the handle: the state is shared.
    fn from(breaker: &CircuitBreaker) -> Self {
        breaker.clone()
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .field("consecutive_failures", &self.consecutive_failures())
            .field("failure_threshold", &self.shared.failure_threshold)
            .field("open_for", &self.open_for())
            .finish()
    }
}

pin_project! {
    /// Stream for the [`circuit_breaker`](crate::PipelineExt::circuit_breaker) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct Breaker<S, F, Fut> {
        #[pin]
        stream: S,
        breaker: CircuitBreaker,
        f: F,
        #[pin]
        call: Option<Fut>,
        permit: Option<Permit>,
        done: bool,
    }

    impl<S, F, Fut> PinnedDrop for Breaker<S, F, Fut> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(permit) = this.permit.take() {
                this.breaker.shared.abandoned(permit);
            }
        }
    }
}

impl<S, F, Fut> Breaker<S, F, Fut>
where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: TryFuture,
{
    pub(crate) fn new(stream: S, breaker: CircuitBreaker, f: F) -> Self {
        Self {
            stream,
            breaker,
            f,
            call: None,
            permit: None,
            done: false,
        }
    }
}

impl<S, F, Fut> Breaker<S, F, Fut> {
    /// The breaker this stream obeys.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The upstream stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The upstream stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The upstream stream, pinned.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream
    }
}

impl<S, F, Fut> Stream for Breaker<S, F, Fut>
where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: TryFuture,
{
    type Item = Result<Fut::Ok, BreakerError<S::Item, Fut::Error>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if this.call.is_none() {
            if *this.done {
                return Poll::Ready(None);
            }
            let Some(item) = ready!(this.stream.poll_next(cx)) else {
                *this.done = true;
                return Poll::Ready(None);
            };
            let Some(permit) = this.breaker.shared.acquire() else {
                return Poll::Ready(Some(Err(BreakerError::Open(item))));
            };
            *this.permit = Some(permit);
            this.call.set(Some((this.f)(item)));
        }
        let fut = this.call.as_mut().as_pin_mut().expect("a call is running");
        let result = ready!(fut.try_poll(cx));
        this.call.set(None);
        let shared = &this.breaker.shared;
        let permit = this.permit.take().expect("a running call holds a permit");
        Poll::Ready(Some(match result {
            Ok(value) => {
                shared.succeeded(permit);
                Ok(value)
            }
            Err(error) => {
                shared.failed(permit);
                Err(BreakerError::Failed(error))
            }
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let running = usize::from(self.call.is_some());
        if self.done {
            return (running, Some(running));
        }
        let (lower, upper) = self.stream.size_hint();
        (
            lower.saturating_add(running),
            upper.and_then(|u| u.checked_add(running)),
        )
    }
}

impl<S, F, Fut> FusedStream for Breaker<S, F, Fut>
where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: TryFuture,
{
    fn is_terminated(&self) -> bool {
        self.done && self.call.is_none()
    }
}

impl<S: fmt::Debug, F, Fut> fmt::Debug for Breaker<S, F, Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("stream", &self.stream)
            .field("breaker", &self.breaker)
            .field("running", &self.call.is_some())
            .finish_non_exhaustive()
    }
}
