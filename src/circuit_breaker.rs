//! [`CircuitBreaker`], [`CircuitState`], [`BreakerError`] and the [`Breaker`] stream.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::stream::{Fuse, FusedStream};
use futures::{Stream, StreamExt, TryFuture};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::error::{ConfigError, nonzero, nonzero_duration, or_panic};
use crate::macros::size_hint_plus;
use crate::time;

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

// The state word: the state in its low 2 bits, the consecutive-failure count in the next 32 and
// the period in the top 30. Every state change starts a new period, and a permit remembers the
// period it was issued in: an outcome of a period that is over is ignored. The period, the
// state and the count change together, with one compare-and-swap, so no outcome can slip into
// a later period between a check and an update. (Periods wrap after 2^30 state changes; a call
// would have to span exactly a multiple of that many to be mistaken for a current one.)
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
/// Half-open, with its one trial call running.
const TRIAL: u64 = 2;
/// Just opened by a failure while closed: its caller is recording `opened_at`. Rejects calls
/// like `OPEN`, and only that caller leaves it (for `OPEN`, in the same period).
const OPENING: u64 = 3;

const STATE: u64 = 0b11;
const FAILURES_SHIFT: u32 = 2;
const PERIOD_SHIFT: u32 = 34;
const PERIOD: u64 = u64::MAX << PERIOD_SHIFT;

fn state_of(word: u64) -> u64 {
    word & STATE
}

fn failures_of(word: u64) -> u32 {
    // Truncating to the 32 bits of the count is intended.
    (word >> FAILURES_SHIFT) as u32
}

/// `word`'s period with `state` and `failures`.
fn with(word: u64, state: u64, failures: u32) -> u64 {
    (word & PERIOD) | (u64::from(failures) << FAILURES_SHIFT) | state
}

/// The period after `word`'s, in `state`, with `failures`.
fn next_period(word: u64, state: u64, failures: u32) -> u64 {
    with(
        (word & PERIOD).wrapping_add(1 << PERIOD_SHIFT),
        state,
        failures,
    )
}

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
/// An outcome counts only while the breaker is still in the state its call started in: each
/// time the breaker opens, half-opens or closes, the outcomes of calls started before are
/// ignored when they come. A call that started while closed and fails after the breaker opened
/// does not extend or re-open it, even once it has closed again; its success does not reset the
/// new count of failures. While half-open, only the trial call's outcome counts.
///
/// The state lives in two atomics (no lock); the success path costs two atomic loads. Every
/// state change emits a `tracing` event (target `stagepipe::circuit_breaker`: `warn` when it
/// opens, `info` when it half-opens or closes).
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
    /// The in-memory state: the breaker itself, or a Redis-backed breaker's local fallback.
    pub(crate) shared: Arc<Shared>,
    /// The state in Redis, for a breaker made by [`CircuitBreaker::redis`].
    #[cfg(feature = "redis")]
    pub(crate) redis: Option<crate::redis::RedisBreaker>,
}

pub(crate) struct Shared {
    failure_threshold: u32,
    open_for: Duration,
    base: Instant,
    /// The period, the state and the consecutive-failure count (see `CLOSED`).
    word: AtomicU64,
    /// The name its `tracing` events carry, if it was given one.
    name: Option<Box<str>>,
    /// When the breaker last opened, in nanoseconds since `base`. Written only by the caller
    /// that holds the breaker in `OPENING` or `TRIAL`, before the word becomes `OPEN`
    /// (release); read after the word is seen `OPEN` (acquire).
    opened_at: AtomicU64,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::BreakerMetrics,
}

/// What a caller was let through as, and in which period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Permit {
    trial: bool,
    /// The period bits of the state word when the permit was issued.
    period: u64,
}

impl Shared {
    pub(crate) fn new(
        failure_threshold: u32,
        open_for: Duration,
        name: Option<Box<str>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            failure_threshold,
            open_for,
            base: Instant::now(),
            word: AtomicU64::new(CLOSED),
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::BreakerMetrics::new(name.as_deref()),
            name,
            opened_at: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        time::nanos(Instant::now().saturating_duration_since(self.base))
    }

    /// Whether `open_for` has not passed yet since the breaker last opened (a period too long
    /// for the clock never passes).
    fn still_open(&self) -> bool {
        let opened_at = self.opened_at.load(Ordering::Acquire);
        self.now() < opened_at.saturating_add(time::nanos(self.open_for))
    }

    #[inline]
    pub(crate) fn acquire(&self) -> Option<Permit> {
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            CLOSED => Some(Permit {
                trial: false,
                period: word & PERIOD,
            }),
            OPEN => {
                if self.still_open() {
                    return None;
                }
                let trial = next_period(word, TRIAL, failures_of(word));
                self.word
                    .compare_exchange(word, trial, Ordering::AcqRel, Ordering::Acquire)
                    .ok()?;
                tracing::info!(target: "stagepipe::circuit_breaker", name = self.name.as_deref(), "circuit breaker half-open: trial call");
                #[cfg(feature = "metrics")]
                self.metrics.transition(CircuitState::HalfOpen);
                Some(Permit {
                    trial: true,
                    period: trial & PERIOD,
                })
            }
            _ => None,
        }
    }

    /// The state word, if it is still in `permit`'s period.
    #[inline]
    fn current(&self, permit: Permit) -> Option<u64> {
        let word = self.word.load(Ordering::Acquire);
        (word & PERIOD == permit.period).then_some(word)
    }

    #[inline]
    pub(crate) fn succeeded(&self, permit: Permit) {
        let Some(mut word) = self.current(permit) else {
            return;
        };
        if permit.trial {
            // Only the trial's caller leaves `TRIAL`.
            let closed = next_period(word, CLOSED, 0);
            if self
                .word
                .compare_exchange(word, closed, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                tracing::info!(target: "stagepipe::circuit_breaker", name = self.name.as_deref(), "circuit breaker closed: trial call succeeded");
                #[cfg(feature = "metrics")]
                self.metrics.transition(CircuitState::Closed);
            }
            return;
        }
        // Closed, in the permit's period: reset the count if there is one.
        while failures_of(word) != 0 {
            match self.word.compare_exchange_weak(
                word,
                with(word, CLOSED, 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) if actual & PERIOD == permit.period => word = actual,
                Err(_) => return,
            }
        }
    }

    pub(crate) fn failed(&self, permit: Permit) {
        let Some(mut word) = self.current(permit) else {
            return;
        };
        if permit.trial {
            // Only the trial's caller leaves `TRIAL`, so `opened_at` is its to write.
            self.opened_at.store(self.now(), Ordering::Release);
            let open = next_period(word, OPEN, failures_of(word));
            if self
                .word
                .compare_exchange(word, open, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                tracing::warn!(
                    target: "stagepipe::circuit_breaker",
                    name = self.name.as_deref(),
                    open_for = ?self.open_for,
                    "circuit breaker opened again: trial call failed"
                );
                #[cfg(feature = "metrics")]
                self.metrics.transition(CircuitState::Open);
            }
            return;
        }
        // Closed, in the permit's period: count the failure, opening at the threshold.
        let mut now = None;
        loop {
            let failures = failures_of(word).saturating_add(1);
            let new = if failures >= self.failure_threshold {
                // Read the clock before opening, so that nothing can stop the opener between
                // `OPENING` and `OPEN`.
                now.get_or_insert_with(|| self.now());
                next_period(word, OPENING, failures)
            } else {
                with(word, CLOSED, failures)
            };
            match self
                .word
                .compare_exchange_weak(word, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if state_of(new) == OPENING => {
                    self.opened_at
                        .store(now.unwrap_or_default(), Ordering::Release);
                    self.word
                        .store(with(new, OPEN, failures), Ordering::Release);
                    tracing::warn!(
                        target: "stagepipe::circuit_breaker",
                        name = self.name.as_deref(),
                        failures,
                        open_for = ?self.open_for,
                        "circuit breaker opened"
                    );
                    #[cfg(feature = "metrics")]
                    self.metrics.transition(CircuitState::Open);
                    return;
                }
                Ok(_) => return,
                Err(actual) if actual & PERIOD == permit.period => word = actual,
                Err(_) => return,
            }
        }
    }

    /// Records an outcome that did not reach the shared state of a Redis-backed breaker, if
    /// this (local) breaker is closed: its `Unavailable::Local` fallback counts this process's
    /// failures.
    #[cfg(feature = "redis")]
    pub(crate) fn record_closed(&self, ok: bool) {
        let word = self.word.load(Ordering::Acquire);
        if state_of(word) == CLOSED {
            let permit = Permit {
                trial: false,
                period: word & PERIOD,
            };
            if ok {
                self.succeeded(permit);
            } else {
                self.failed(permit);
            }
        }
    }

    /// The breaker's metrics (a Redis-backed breaker reports the state changes it makes).
    #[cfg(all(feature = "redis", feature = "metrics"))]
    pub(crate) fn metrics(&self) -> &crate::metrics::BreakerMetrics {
        &self.metrics
    }

    /// A call let through as `permit` ended without an outcome (dropped, or panicked).
    pub(crate) fn abandoned(&self, permit: Permit) {
        if !permit.trial {
            return;
        }
        if let Some(word) = self.current(permit) {
            // Back to open with the old (expired) opening time: the next call is the trial.
            let open = next_period(word, OPEN, failures_of(word));
            let _ = self
                .word
                .compare_exchange(word, open, Ordering::AcqRel, Ordering::Acquire);
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
        nonzero_duration("open_for", open_for)?;
        Ok(Self {
            shared: Shared::new(failure_threshold, open_for, None),
            #[cfg(feature = "redis")]
            redis: None,
        })
    }

    /// Gives the breaker a name, carried by its `tracing` events (field `name`) and its `Debug`
    /// output, to tell the breakers of several services apart.
    ///
    /// This builds a new, closed breaker with the same configuration: call it before sharing
    /// the handle (clones taken earlier keep the old breaker and its state). A Redis-backed
    /// breaker keeps its shared state (and its name in Redis); only its local part is new.
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::CircuitBreaker;
    ///
    /// let breaker = CircuitBreaker::new(5, Duration::from_secs(10)).named("payments");
    /// assert_eq!(breaker.name(), Some("payments"));
    /// ```
    #[must_use]
    pub fn named(self, name: impl Into<String>) -> Self {
        let name = Some(name.into().into_boxed_str());
        Self {
            shared: Shared::new(self.shared.failure_threshold, self.shared.open_for, name),
            #[cfg(feature = "redis")]
            redis: self.redis,
        }
    }

    /// The name given with [`named`](Self::named), if any.
    pub fn name(&self) -> Option<&str> {
        self.shared.name.as_deref()
    }

    /// The current state. `Open` turns into `HalfOpen` once `open_for` has passed, even before
    /// a call arrives.
    ///
    /// For a Redis-backed breaker (`CircuitBreaker::redis`, feature `redis`) this makes no
    /// round trip: it is the state this handle (or a clone) saw in its last exchange with Redis
    /// (`Closed` before the first), turning from `Open` into `HalfOpen` when the opening it saw
    /// ends; while Redis is away and the handle falls back to `Unavailable::Local`, it is the
    /// local breaker's.
    pub fn state(&self) -> CircuitState {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return redis.state(self);
        }
        self.local_state()
    }

    /// The state of the in-memory breaker.
    pub(crate) fn local_state(&self) -> CircuitState {
        let shared = &self.shared;
        match state_of(shared.word.load(Ordering::Acquire)) {
            CLOSED => CircuitState::Closed,
            OPENING => CircuitState::Open,
            OPEN if shared.still_open() => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    /// The number of consecutive failures counted while closed (while open or half-open, the
    /// count that opened the breaker).
    ///
    /// For a Redis-backed breaker (feature `redis`), the count this handle saw in its last
    /// exchange with Redis (as [`state`](Self::state)).
    pub fn consecutive_failures(&self) -> u32 {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return redis.consecutive_failures(self);
        }
        self.local_failures()
    }

    /// The consecutive-failure count of the in-memory breaker.
    pub(crate) fn local_failures(&self) -> u32 {
        failures_of(self.shared.word.load(Ordering::Relaxed))
    }

    /// The number of consecutive failures that opens the breaker.
    pub fn failure_threshold(&self) -> u32 {
        self.shared.failure_threshold
    }

    /// How long the breaker stays open before a trial call.
    pub fn open_for(&self) -> Duration {
        self.shared.open_for
    }

    /// Runs `fut` if the breaker lets it through and records its outcome; rejects it at once,
    /// without polling it, while the breaker is open.
    ///
    /// A Redis-backed breaker (feature `redis`) asks Redis before running `fut` and records the
    /// outcome before returning it: two round trips, each bounded by the Redis response
    /// timeout (1 s).
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future drops `fut`; the outcome is not recorded (a dropped trial
    /// call leaves the breaker half-open for the next call). With a Redis-backed breaker, a
    /// round trip already under way is finished in a background task (and a trial lease it
    /// obtained released), if a tokio runtime is running.
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
            breaker: self,
            fut,
            passage: Passage::default(),
            admitted: false,
            output: None,
        }
    }

    /// The fast path of [`call`](Self::call) for a caller that may not wait: a permit if the
    /// in-memory breaker is closed (one atomic load), as `call` would take it. `None` takes
    /// nothing: the breaker is open or half-open (then `call` rejects, or lets the trial
    /// through), or lives in Redis.
    #[inline]
    pub(crate) fn closed_permit(&self) -> Option<Permit> {
        #[cfg(feature = "redis")]
        if self.redis.is_some() {
            return None;
        }
        let word = self.shared.word.load(Ordering::Acquire);
        (state_of(word) == CLOSED).then_some(Permit {
            trial: false,
            period: word & PERIOD,
        })
    }

    /// Asks for a permit: `Ready(true)` once the call may run (its ticket in `passage`),
    /// `Ready(false)` if it is rejected. At once for an in-memory breaker; after a round trip
    /// for a Redis-backed one (kept in `passage` while pending).
    #[inline]
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    fn poll_admit(&self, passage: &mut Passage, cx: &mut Context<'_>) -> Poll<bool> {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            let trip = passage
                .trip
                .get_or_insert_with(|| std::sync::Mutex::new(redis.admit(&self.shared)));
            let ticket = ready!(poll_trip(trip, cx));
            passage.trip = None;
            passage.ticket = ticket;
            return Poll::Ready(ticket.is_some());
        }
        passage.ticket = self.shared.acquire().map(Ticket::Local);
        Poll::Ready(passage.ticket.is_some())
    }

    /// Records the outcome of the call `passage` let through: at once, but for a ticket of the
    /// shared state in Redis (whose round trip is kept in `passage` while pending).
    #[inline]
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    fn poll_record(&self, passage: &mut Passage, ok: bool, cx: &mut Context<'_>) -> Poll<()> {
        #[cfg(feature = "redis")]
        if let Some(trip) = &mut passage.trip {
            ready!(poll_trip(trip, cx));
            passage.trip = None;
            return Poll::Ready(());
        }
        match passage.ticket.take() {
            Some(Ticket::Local(permit)) if ok => self.shared.succeeded(permit),
            Some(Ticket::Local(permit)) => self.shared.failed(permit),
            #[cfg(feature = "redis")]
            Some(Ticket::Shared(permit)) => {
                if let Some(redis) = &self.redis {
                    let mut trip = redis.record(permit, ok, &self.shared);
                    if trip.as_mut().poll(cx).is_pending() {
                        passage.trip = Some(std::sync::Mutex::new(trip));
                        return Poll::Pending;
                    }
                }
            }
            _ => {}
        }
        Poll::Ready(())
    }

    /// The call `passage` let through (or was asking for) ends without an outcome: dropped, or
    /// panicked.
    fn abandon(&self, passage: &mut Passage) {
        #[cfg(feature = "redis")]
        if let (Some(trip), Some(redis)) = (passage.trip.take(), &self.redis) {
            let trip = trip
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            redis.finish_in_background(trip, &self.shared);
        }
        match passage.ticket.take() {
            Some(Ticket::Local(permit)) => self.shared.abandoned(permit),
            #[cfg(feature = "redis")]
            Some(Ticket::Shared(permit)) => {
                if let Some(redis) = &self.redis {
                    redis.abandoned(permit);
                }
            }
            _ => {}
        }
    }
}

/// What a call was let through as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ticket {
    /// By the in-memory breaker (the handle's own, or a Redis-backed one's local fallback).
    Local(Permit),
    /// By the shared state in Redis.
    #[cfg(feature = "redis")]
    Shared(crate::redis::RedisPermit),
    /// Without any state (a Redis-backed breaker failing open while Redis is away): its
    /// outcome is not recorded.
    #[cfg(feature = "redis")]
    Unrecorded,
}

/// A round trip to the shared state in Redis: asking for a permit, or recording an outcome
/// (which yields `None`). In a `Mutex` only so that the futures and streams holding it stay
/// `Sync`; it is never locked (`get_mut`).
#[cfg(feature = "redis")]
pub(crate) type Trip = std::sync::Mutex<futures::future::BoxFuture<'static, Option<Ticket>>>;

#[cfg(feature = "redis")]
fn poll_trip(trip: &mut Trip, cx: &mut Context<'_>) -> Poll<Option<Ticket>> {
    trip.get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_mut()
        .poll(cx)
}

/// One call's way through a breaker: the ticket it was let through with, and the round trip to
/// Redis under way, if any.
#[derive(Default)]
struct Passage {
    ticket: Option<Ticket>,
    #[cfg(feature = "redis")]
    trip: Option<Trip>,
}

pin_project! {
    /// The future of [`CircuitBreaker::call`]: asks for a permit on its first poll, then runs
    /// the call and records its outcome (a hand-written future, so the call is not moved again).
    struct Call<'a, Fut, O> {
        breaker: &'a CircuitBreaker,
        #[pin]
        fut: Fut,
        passage: Passage,
        admitted: bool,
        // The call's output, held while its outcome is recorded.
        output: Option<O>,
    }

    impl<'a, Fut, O> PinnedDrop for Call<'a, Fut, O> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.breaker.abandon(this.passage);
        }
    }
}

impl<Fut, U, E> Future for Call<'_, Fut, Result<U, E>>
where
    Fut: Future<Output = Result<U, E>>,
{
    type Output = Result<U, BreakerError<(), E>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.admitted {
            if !ready!(this.breaker.poll_admit(this.passage, cx)) {
                #[cfg(feature = "metrics")]
                this.breaker.shared.metrics.rejected();
                return Poll::Ready(Err(BreakerError::Open(())));
            }
            *this.admitted = true;
        }
        if this.output.is_none() {
            *this.output = Some(ready!(this.fut.poll(cx)));
        }
        let ok = matches!(this.output, Some(Ok(_)));
        ready!(this.breaker.poll_record(this.passage, ok, cx));
        let result = this.output.take().expect("the call's output is held");
        Poll::Ready(result.map_err(BreakerError::Failed))
    }
}

from_ref_handle!(impl[] CircuitBreaker, "the state");

impl_debug!(impl[] CircuitBreaker => CircuitBreaker |this| {
    name: &this.name(),
    state: &this.state(),
    consecutive_failures: &this.consecutive_failures(),
    failure_threshold: &this.failure_threshold(),
    open_for: &this.open_for(),
});

pin_project! {
    /// Stream for the [`circuit_breaker`](crate::PipelineExt::circuit_breaker) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct Breaker<S, F, Fut>
    where
        S: Stream,
        Fut: TryFuture,
    {
        #[pin]
        stream: Fuse<S>,
        breaker: CircuitBreaker,
        f: F,
        // An item waiting for the breaker's answer (a round trip, for a Redis-backed breaker).
        item: Option<S::Item>,
        #[pin]
        call: Option<Fut>,
        // A call's outcome, held while it is recorded.
        outcome: Option<Result<Fut::Ok, Fut::Error>>,
        passage: Passage,
    }

    impl<S, F, Fut> PinnedDrop for Breaker<S, F, Fut>
    where
        S: Stream,
        Fut: TryFuture,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.breaker.abandon(this.passage);
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
            stream: stream.fuse(),
            breaker,
            f,
            item: None,
            call: None,
            outcome: None,
            passage: Passage::default(),
        }
    }
}

impl<S, F, Fut> Breaker<S, F, Fut>
where
    S: Stream,
    Fut: TryFuture,
{
    /// The breaker this stream obeys.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    delegate_access_inner!(pub stream, S, (.));
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
        if this.outcome.is_none() {
            if this.call.is_none() {
                if this.item.is_none() {
                    let Some(item) = ready!(this.stream.poll_next(cx)) else {
                        return Poll::Ready(None);
                    };
                    *this.item = Some(item);
                }
                let admitted = ready!(this.breaker.poll_admit(this.passage, cx));
                let item = this.item.take().expect("an item waits for the breaker");
                if !admitted {
                    #[cfg(feature = "metrics")]
                    this.breaker.shared.metrics.rejected();
                    return Poll::Ready(Some(Err(BreakerError::Open(item))));
                }
                this.call.set(Some((this.f)(item)));
            }
            let fut = this.call.as_mut().as_pin_mut().expect("a call is running");
            let result = ready!(fut.try_poll(cx));
            this.call.set(None);
            *this.outcome = Some(result);
        }
        let ok = matches!(this.outcome, Some(Ok(_)));
        ready!(this.breaker.poll_record(this.passage, ok, cx));
        let outcome = this.outcome.take().expect("a call's outcome is held");
        Poll::Ready(Some(outcome.map_err(BreakerError::Failed)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let held = usize::from(self.item.is_some())
            + usize::from(self.call.is_some())
            + usize::from(self.outcome.is_some());
        size_hint_plus(held, self.stream.size_hint())
    }
}

impl<S, F, Fut> FusedStream for Breaker<S, F, Fut>
where
    Self: Stream,
    S: Stream,
    Fut: TryFuture,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
            && self.item.is_none()
            && self.call.is_none()
            && self.outcome.is_none()
    }
}

impl_debug!(impl[S: fmt::Debug + Stream, F, Fut: TryFuture] Breaker<S, F, Fut> => Breaker |this| {
    stream: this.stream.get_ref(),
    breaker: &this.breaker,
    running: &this.call.is_some(),
} ..);
