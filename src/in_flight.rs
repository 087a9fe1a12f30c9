//! `in_flight` and `in_flight_ordered`: a concurrent async map inside the stream's own task,
//! capped by a shared limit.
//!
//! The futures run in a [`FuturesUnordered`] owned by the stream (no spawn, so they may
//! borrow); in input order, an output that comes before the earlier ones' waits in a reorder
//! buffer ([`Ordered`], as in a `FuturesOrdered`). Each future runs under a unit of the
//! [`InFlightLimit`]; an item is pulled from upstream first and then waits for a unit, so a
//! stream whose upstream is idle holds no unit that another stream could use. The stream
//! holds the units ([`Held`] says whether a future has one) and gives each back as soon as its
//! future ends, before the output is yielded: in input order, a finished future gives its unit
//! back at once and waits for the earlier ones; the queue (running plus finished) never holds
//! more than the limit's [`limit`](InFlightLimit::limit) (of an adaptive limit: as it stood
//! when the last item was pulled), as `buffered(n)` never holds more than `n`.
//!
//! The engine ([`Core`]) is shared by the whole family: it is generic over the queue of running
//! futures ([`Queue`]: completion order or input order) and over how an upstream item starts
//! ([`Start`]: a plain item always runs under a unit; a fallible stream's `Err` passes through
//! as a finished future that holds none).
//!
//! A limit is fixed ([`InFlightLimit::new`]) or adaptive ([`InFlightLimit::adaptive`], the
//! algorithm in [`crate::adaptive`]). The limit's units are its semaphore's permits. Of a fixed
//! limit, a unit taken without waiting costs one atomic operation and so does giving it back
//! while nobody waits ([`Spare`]); no clock is read, nothing is counted. Of an adaptive one, a
//! running future also holds a [`Ticket`] (when it started, in which generation of the limit,
//! with how many in flight); when it ends, its latency travels with its output to the stream,
//! which reports it with the outcome ([`Start::Outcome`] says whether the output is a
//! failure). A future dropped before it ends reports nothing. Lowering an adaptive limit
//! leaves a debt that the next permits taken pay, so giving a unit back needs no bookkeeping.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{FuturesOrdered, FuturesUnordered, Stream};
use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::adaptive::Adaptive;
use crate::error::{ConfigError, count_up_to, or_panic};
use crate::macros::size_hint_plus;
use crate::sync::atomic::{AtomicUsize, Ordering};

/// A cap on concurrent operations, shared by every stream that holds a clone.
///
/// All streams using clones of one limit together never run more than
/// [`limit`](InFlightLimit::limit) futures at once; waiting streams are served first come, first
/// served. A plain number converts into a private limit wherever a limit is accepted.
///
/// The limit is fixed ([`new`](Self::new)) or finds its own level
/// ([`adaptive`](Self::adaptive)) from the latency and the failures of the operations it lets
/// through.
///
/// # Examples
///
/// ```
/// use futures::{stream, StreamExt};
/// use stagepipe::prelude::*;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let limit = InFlightLimit::new(4);
/// let a = stream::iter(0..10u32).in_flight(&limit, |x| async move { x });
/// let b = stream::iter(0..10u32).in_flight(&limit, |x| async move { x });
/// let (a, b): (Vec<u32>, Vec<u32>) = tokio::join!(a.collect(), b.collect());
/// assert_eq!(a.len() + b.len(), 20);
/// assert_eq!(limit.in_use(), 0);
/// # }
/// ```
#[derive(Clone)]
pub struct InFlightLimit {
    semaphore: Arc<Semaphore>,
    /// Of a fixed limit, the units given back without the semaphore's lock (see [`Spare`]).
    spare: Arc<Spare>,
    /// The fixed limit (of an adaptive one: its `max`).
    limit: usize,
    adaptive: Option<Arc<Adaptive>>,
    name: Option<Arc<str>>,
}

impl InFlightLimit {
    /// Creates a limit of `limit` concurrent operations.
    ///
    /// # Panics
    ///
    /// Panics if `limit` is zero or larger than tokio's `Semaphore::MAX_PERMITS`.
    /// [`InFlightLimit::try_new`] returns an error instead.
    #[track_caller]
    pub fn new(limit: usize) -> Self {
        or_panic(Self::try_new(limit))
    }

    /// Creates a limit, or an error naming `limit` if it is zero or too large.
    pub fn try_new(limit: usize) -> Result<Self, ConfigError> {
        let too_large = "must be at most Semaphore::MAX_PERMITS";
        count_up_to("limit", limit, Semaphore::MAX_PERMITS, too_large)?;
        Ok(Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            spare: Arc::default(),
            limit,
            adaptive: None,
            name: None,
        })
    }

    /// Creates an adaptive limit: it starts at `min` and finds its own level between `min` and
    /// `max` from the operations it lets through, raised while their latency stays near the
    /// lowest it has measured, lowered when latency grows or operations fail or time out.
    ///
    /// # The algorithm
    ///
    /// A gradient on the minimum round-trip time, after Netflix's
    /// [concurrency-limits](https://github.com/Netflix/concurrency-limits) (`GradientLimit`,
    /// `VegasLimit`, `AIMDLimit`) and TCP Vegas (Brakmo and Peterson, "TCP Vegas: End to End
    /// Congestion Avoidance on a Global Internet", 1995). Finished operations are gathered in
    /// windows of about one round trip (`max(4, limit)` of them, all started since the limit
    /// last moved). A window's lowest latency is compared with the lowest of all windows (the
    /// latency with no queue, the *baseline*):
    ///
    /// * within 5% of the baseline, the limit grows, if the window used it: it doubles at
    ///   first (slow start, which ends at the first window whose mean latency is 20% over the
    ///   baseline), then adds `max(1, log10(limit))` at a time;
    /// * higher, the limit moves half way to the concurrency the service absorbs without a
    ///   queue (by Little's law: what was in flight × 1.05 × baseline / latency), plus that
    ///   allowance;
    /// * each failure or timeout multiplies it by 0.9 at once (after a run of them, it
    ///   climbs back by doubling up to half where the run began);
    /// * every 30 windows it halves for one window, to measure the baseline again (so a
    ///   service that became slower for good is not taken for a queue forever).
    ///
    /// Over a service whose latency is flat up to a concurrency *knee* and grows in
    /// proportion beyond it, the limit settles just over the knee (35 for a knee of 32, 18
    /// for 16), where throughput is highest and latency still near its floor, and it follows
    /// the knee down when the service slows. The limit is judged by minimum latencies, so
    /// noise that only adds latency (a coarse timer, a long tail) does not pull it down.
    ///
    /// # What an operation reports
    ///
    /// Each operation reports when it ends, through the unit it holds:
    ///
    /// * [`in_flight`](crate::PipelineExt::in_flight),
    ///   [`in_flight_ordered`](crate::PipelineExt::in_flight_ordered) and [`run`](Self::run):
    ///   a success, with its latency from taking the unit to the future's end;
    /// * [`try_in_flight`](crate::TryPipelineExt::try_in_flight) and
    ///   [`try_in_flight_ordered`](crate::TryPipelineExt::try_in_flight_ordered): the same, and
    ///   an `Err` is a drop;
    /// * a [`Call`](crate::Call) with [`in_flight`](crate::Call::in_flight): the attempt's
    ///   outcome, an `Err` or a timeout being a drop (a timeout while still waiting for a unit
    ///   says nothing of the service, and reports nothing);
    /// * as a tower layer (feature `tower`), each call: a success, with its latency from the
    ///   unit taken in `poll_ready` to the response;
    /// * an operation cancelled (its future dropped) reports nothing.
    ///
    /// In input order ([`in_flight_ordered`](crate::PipelineExt::in_flight_ordered)), an
    /// operation's latency is measured when it ends and reaches the limit when its result is
    /// yielded.
    ///
    /// When the limit is lowered below what is in flight, nothing new starts until enough
    /// have finished: the operations in flight are never cut short.
    ///
    /// The limit now is [`current`](Self::current), its last changes
    /// [`history`](Self::history); each change is a `tracing` event at DEBUG (target
    /// `stagepipe::in_flight`, fields `name`, `limit`, `previous`, `reason`), and with the
    /// `metrics` feature the gauge `stagepipe_in_flight_limit` (see [`named`](Self::named)).
    ///
    /// # Panics
    ///
    /// Panics if `min` is zero, `max` is below `min`, or `max` is larger than tokio's
    /// `Semaphore::MAX_PERMITS` (the message names the parameter).
    /// [`InFlightLimit::try_adaptive`] returns the error instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::InFlightLimit;
    /// use stagepipe::PipelineExt;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limit = InFlightLimit::adaptive(1, 100);
    /// assert_eq!(limit.current(), 1);
    ///
    /// // A service that answers in 10 ms with up to 20 requests in flight, and slows down in
    /// // proportion beyond that.
    /// let in_flight = std::sync::atomic::AtomicUsize::new(0);
    /// let served = stream::iter(0..3000u32)
    ///     .in_flight(&limit, |x| {
    ///         let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    ///         let in_flight = &in_flight;
    ///         async move {
    ///             let ms = 10 * now.max(20) as u64 / 20;
    ///             tokio::time::sleep(Duration::from_millis(ms)).await;
    ///             in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    ///             x
    ///         }
    ///     })
    ///     .count()
    ///     .await;
    /// assert_eq!(served, 3000);
    /// // Settled near the knee (22: 1.05 × 20 + log10(22)), or at half of it while probing.
    /// assert!((11..=24).contains(&limit.current()), "{}", limit.current());
    /// assert!(limit.history().len() > 1);
    /// # }
    /// ```
    #[track_caller]
    pub fn adaptive(min: usize, max: usize) -> Self {
        or_panic(Self::try_adaptive(min, max))
    }

    /// [`adaptive`](Self::adaptive), or an error naming `min` if it is zero or above `max`,
    /// or `max` if it is larger than tokio's `Semaphore::MAX_PERMITS`.
    ///
    /// ```
    /// use stagepipe::InFlightLimit;
    ///
    /// assert_eq!(InFlightLimit::try_adaptive(0, 10).unwrap_err().parameter(), "min");
    /// assert_eq!(InFlightLimit::try_adaptive(20, 10).unwrap_err().parameter(), "min");
    /// assert_eq!(InFlightLimit::try_adaptive(4, 64).unwrap().current(), 4);
    /// ```
    pub fn try_adaptive(min: usize, max: usize) -> Result<Self, ConfigError> {
        Self::try_adaptive_named(min, max, None)
    }

    fn try_adaptive_named(
        min: usize,
        max: usize,
        name: Option<Arc<str>>,
    ) -> Result<Self, ConfigError> {
        count_up_to("min", min, max, "must be at most `max`")?;
        let too_large = "must be at most Semaphore::MAX_PERMITS";
        count_up_to("max", max, Semaphore::MAX_PERMITS, too_large)?;
        let semaphore = Arc::new(Semaphore::new(min));
        let adaptive = Adaptive::new(
            Arc::clone(&semaphore),
            min,
            max,
            name.as_deref().map(Into::into),
        );
        Ok(Self {
            semaphore,
            spare: Arc::default(),
            limit: max,
            adaptive: Some(Arc::new(adaptive)),
            name,
        })
    }

    /// Gives the limit a name, carried by its `tracing` events (field `name`), its `Debug`
    /// output and, with the `metrics` feature, the `name` label of an adaptive limit's gauge
    /// `stagepipe_in_flight_limit` (an unnamed adaptive limit publishes under
    /// `name="unnamed"`; a fixed limit publishes nothing).
    ///
    /// This builds a new limit with the same configuration and no unit in use (an adaptive
    /// one starts again at its `min`): call it before sharing the handle (clones taken
    /// earlier keep the old limit).
    ///
    /// ```
    /// use stagepipe::InFlightLimit;
    ///
    /// let db = InFlightLimit::adaptive(2, 64).named("db");
    /// assert_eq!(db.name(), Some("db"));
    /// assert_eq!(db.current(), 2);
    /// ```
    #[must_use]
    pub fn named(self, name: impl Into<String>) -> Self {
        let name: Option<Arc<str>> = Some(name.into().into());
        match &self.adaptive {
            Some(adaptive) => Self::try_adaptive_named(adaptive.min(), adaptive.max(), name)
                .expect("the same configuration is valid"),
            None => Self {
                semaphore: Arc::new(Semaphore::new(self.limit)),
                spare: Arc::default(),
                name,
                ..self
            },
        }
    }

    /// The name given with [`named`](Self::named), if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The maximum number of operations running at once: the same as
    /// [`current`](Self::current).
    #[inline]
    pub fn limit(&self) -> usize {
        match &self.adaptive {
            None => self.limit,
            Some(adaptive) => adaptive.current(),
        }
    }

    /// The limit now: of a fixed limit, always its value; of an adaptive one, where it stands
    /// between its `min` and `max`.
    ///
    /// ```
    /// use stagepipe::InFlightLimit;
    ///
    /// assert_eq!(InFlightLimit::new(8).current(), 8);
    /// assert_eq!(InFlightLimit::adaptive(2, 64).current(), 2);
    /// ```
    pub fn current(&self) -> usize {
        self.limit()
    }

    /// Whether the limit is [`adaptive`](Self::adaptive).
    pub fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// The last changes of an adaptive limit, oldest first: when (on tokio's clock) and the
    /// new limit. The first entry is the limit's start at its `min`, until more than
    /// 64 changes have pushed it out: at most the last 64 are kept. Empty for a fixed limit.
    ///
    /// ```
    /// use stagepipe::InFlightLimit;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limit = InFlightLimit::adaptive(4, 64);
    /// let history = limit.history();
    /// assert_eq!(history.len(), 1);
    /// assert_eq!(history[0].1, 4);
    /// assert!(InFlightLimit::new(4).history().is_empty());
    /// # }
    /// ```
    pub fn history(&self) -> Vec<(Instant, usize)> {
        match &self.adaptive {
            None => Vec::new(),
            Some(adaptive) => adaptive.history(),
        }
    }

    /// Runs `fut` while holding one unit of this limit, waiting for a free unit first: the same
    /// budget as the [`in_flight`](crate::PipelineExt::in_flight) operator, for a direct caller
    /// (inside a stage of a staged pipeline, say). Waiting callers are served first come, first
    /// served. Of an [`adaptive`](Self::adaptive) limit, a finished `fut` counts as a success
    /// whose latency is the time `fut` ran.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future before it completes gives the unit back (or leaves the
    /// queue) at once.
    ///
    /// # Examples
    ///
    /// ```
    /// use stagepipe::InFlightLimit;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let db = InFlightLimit::new(2);
    /// let rows = db.run(async { 42 }).await;
    /// assert_eq!(rows, 42);
    /// assert_eq!(db.in_use(), 0);
    /// # }
    /// ```
    pub async fn run<F: Future>(&self, fut: F) -> F::Output {
        if self.adaptive.is_some() {
            // Boxed, so that the future of a fixed limit's run stays as small as it was.
            return Box::pin(async {
                let permit = self.acquire().await;
                let out = fut.await;
                self.finish(permit, false);
                out
            })
            .await;
        }
        self.run_fixed(fut).await
    }

    /// [`run`](Self::run) of a fixed limit (of an adaptive one, it holds a unit but reports
    /// nothing).
    pub(crate) async fn run_fixed<F: Future>(&self, fut: F) -> F::Output {
        // A free unit is taken without the queue's future (no waiter can be ahead while units
        // are free, so first come, first served still holds).
        if self.adaptive.is_none() && self.try_take_fixed() {
            let _unit = Unit(self);
            return fut.await;
        }
        let _permit = match self.semaphore.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = self.spare.wait(&self.semaphore);
                self.semaphore
                    .acquire()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        fut.await
    }

    /// Takes a free unit of a fixed limit at once, if there is one (no waiter can be ahead
    /// while units are free), for a holder that gives it back with
    /// [`give_back`](Self::give_back): `false` takes nothing.
    #[inline]
    pub(crate) fn try_take_fixed(&self) -> bool {
        debug_assert!(self.adaptive.is_none(), "an adaptive limit's units report");
        if self.spare.take() {
            return true;
        }
        match self.semaphore.try_acquire() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back a unit taken by [`try_take_fixed`](Self::try_take_fixed) or
    /// [`poll_unit`](Self::poll_unit).
    #[inline]
    pub(crate) fn give_back(&self) {
        self.give_back_many(1);
    }

    /// Gives back `n` units taken by [`try_take_fixed`](Self::try_take_fixed) or
    /// [`poll_unit`](Self::poll_unit).
    #[inline]
    pub(crate) fn give_back_many(&self, n: usize) {
        match self.adaptive {
            None => self.spare.give_back(n, &self.semaphore),
            Some(_) => self.semaphore.add_permits(n),
        }
    }

    /// [`poll_permit`](Self::poll_permit) for a holder that keeps no permit but gives the
    /// unit back with [`give_back`](Self::give_back): a free unit of a fixed limit is taken
    /// without a handle on the semaphore.
    #[inline]
    pub(crate) fn poll_unit(
        &self,
        acquire: &mut Option<Acquire>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        if self.adaptive.is_some() {
            std::task::ready!(self.poll_permit(acquire, cx)).forget();
            return Poll::Ready(());
        }
        if !self.try_take_fixed() {
            let wait = acquire.get_or_insert_with(|| self.wait());
            std::task::ready!(wait.as_mut().poll(cx))
                .expect("the semaphore is never closed")
                .forget();
        }
        *acquire = None;
        Poll::Ready(())
    }

    /// Takes a unit of this limit, waiting for one first (first come, first served), for a
    /// holder that reports the outcome itself through [`finish`](Self::finish).
    pub(crate) async fn acquire(&self) -> Permit {
        loop {
            let permit = match self.semaphore.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => self
                    .semaphore
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
            };
            if let Some(permit) = self.keep(permit) {
                return Permit {
                    permit,
                    ticket: self.ticket(),
                };
            }
        }
    }

    /// Takes a unit of this limit for a stream or service that holds it past a call: a free
    /// unit at once, else through the queue's wait in `acquire` (first come, first served),
    /// which is kept across polls and cleared once the unit is taken. The holder then takes
    /// its [`ticket`](Self::ticket).
    pub(crate) fn poll_permit(
        &self,
        acquire: &mut Option<Acquire>,
        cx: &mut Context<'_>,
    ) -> Poll<OwnedSemaphorePermit> {
        if self.adaptive.is_none() {
            return self.poll_semaphore(acquire, cx);
        }
        loop {
            let permit = std::task::ready!(self.poll_semaphore(acquire, cx));
            if let Some(permit) = self.keep(permit) {
                return Poll::Ready(permit);
            }
        }
    }

    /// A permit of the semaphore: a free one at once, else through the queue's wait in
    /// `acquire`, kept across polls and cleared once the permit is taken.
    #[inline(always)]
    fn poll_semaphore(
        &self,
        acquire: &mut Option<Acquire>,
        cx: &mut Context<'_>,
    ) -> Poll<OwnedSemaphorePermit> {
        let permit = match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let wait = acquire.get_or_insert_with(|| self.wait());
                std::task::ready!(wait.as_mut().poll(cx)).expect("the semaphore is never closed")
            }
        };
        *acquire = None;
        Poll::Ready(permit)
    }

    /// A wait in the semaphore's queue, counted as a waiter of the spare units.
    fn wait(&self) -> Acquire {
        let (semaphore, spare) = (Arc::clone(&self.semaphore), Arc::clone(&self.spare));
        Box::pin(async move {
            let _waiting = spare.wait(&semaphore);
            semaphore.acquire_owned().await
        })
    }

    /// Whether a permit the semaphore gave may be used: always, unless the adaptive limit is
    /// lower than the units out (it was lowered while they ran, or after the semaphore handed
    /// this one to its waiter): then the permit pays that debt, and the caller waits again.
    #[inline]
    fn keep(&self, permit: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        match &self.adaptive {
            None => Some(permit),
            Some(adaptive) => Self::repay_debt(adaptive, permit),
        }
    }

    // Out of line: a fixed limit's path stays small.
    #[cold]
    #[inline(never)]
    fn repay_debt(
        adaptive: &Adaptive,
        permit: OwnedSemaphorePermit,
    ) -> Option<OwnedSemaphorePermit> {
        adaptive.repay(permit)
    }

    /// For a unit just taken: of an adaptive limit, when it was taken and how many are in
    /// flight with it; of a fixed limit, nothing (no clock is read).
    #[inline]
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        self.adaptive.as_deref().map(Self::ticket_of)
    }

    #[cold]
    #[inline(never)]
    fn ticket_of(adaptive: &Adaptive) -> Ticket {
        let in_flight = u32::try_from(adaptive.in_flight()).unwrap_or(u32::MAX);
        Ticket {
            started: Instant::now(),
            generation: adaptive.generation(),
            in_flight: NonZeroU32::new(in_flight).unwrap_or(NonZeroU32::MIN),
        }
    }

    /// The operation holding `permit` ended now, failed (a drop signal) or not: reports it to
    /// an adaptive limit, then gives the unit back.
    pub(crate) fn finish(&self, permit: Permit, failed: bool) {
        let Permit { permit, ticket } = permit;
        if let Some(ticket) = ticket {
            self.report(ticket.end(), failed);
        }
        // Given back after the report, so that a lowered limit is in force first.
        drop(permit);
    }

    /// Reports an operation's end to an adaptive limit: a drop if `failed`, else a success.
    #[cold]
    #[inline(never)]
    pub(crate) fn report(&self, ended: Ended, failed: bool) {
        if let Some(adaptive) = &self.adaptive {
            match failed {
                true => adaptive.dropped(),
                false => adaptive.success(
                    ended.generation,
                    ended.in_flight.get() as usize,
                    Duration::try_from_secs_f32(ended.latency).unwrap_or(Duration::MAX),
                ),
            }
        }
    }

    /// How many operations are running now, across every stream sharing this limit.
    pub fn in_use(&self) -> usize {
        match &self.adaptive {
            // Two reads: a unit given back between them may be seen in both.
            None => self
                .limit
                .saturating_sub(self.semaphore.available_permits() + self.spare.units()),
            Some(adaptive) => adaptive.in_flight(),
        }
    }
}

impl From<usize> for InFlightLimit {
    /// A private limit of `limit` operations.
    ///
    /// # Panics
    ///
    /// Panics if `limit` is zero or larger than tokio's `Semaphore::MAX_PERMITS` (the message
    /// names `limit`); [`InFlightLimit::try_new`] returns the error instead.
    #[track_caller]
    fn from(limit: usize) -> Self {
        Self::new(limit)
    }
}

from_ref_handle!(impl[] InFlightLimit, "the limit");

impl fmt::Debug for InFlightLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("InFlightLimit");
        if let Some(name) = &self.name {
            d.field("name", name);
        }
        d.field("limit", &self.limit());
        if let Some(adaptive) = &self.adaptive {
            d.field("min", &adaptive.min())
                .field("max", &adaptive.max());
        }
        d.field("in_use", &self.in_use()).finish()
    }
}

/// The units of a fixed limit given back by holders that took them without a permit
/// ([`InFlightLimit::try_take_fixed`]): while nobody waits in the semaphore's queue, a unit
/// given back goes here, with one atomic add instead of the semaphore's lock, and the next
/// holder takes it from here. Whoever starts to wait in the queue first counts itself in
/// `waiters`, then moves the spare units into the semaphore; whoever gives a unit back adds it
/// here first, then moves it too if someone waits. Both in that order, sequentially
/// consistent: one of the two sees the other, so no unit stays here while someone waits.
/// Units are taken from here only while nobody waits, so waiters keep their turn.
///
/// Its atomics are the crate's (`crate::sync`), so that the loom model (`loom_model.rs`) runs
/// this very code.
#[derive(Debug, Default)]
struct Spare {
    units: AtomicUsize,
    waiters: AtomicUsize,
}

impl Spare {
    /// Takes a spare unit, if there is one and nobody waits.
    #[inline]
    fn take(&self) -> bool {
        if self.waiters.load(Ordering::SeqCst) != 0 {
            return false;
        }
        let mut units = self.units.load(Ordering::Relaxed);
        while units != 0 {
            match self.units.compare_exchange_weak(
                units,
                units - 1,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => units = now,
            }
        }
        false
    }

    /// Gives back `n` units of `semaphore`'s limit.
    #[inline]
    fn give_back(&self, n: usize, semaphore: &Semaphore) {
        if self.waiters.load(Ordering::SeqCst) != 0 {
            // Straight to the queue.
            semaphore.add_permits(n);
            return;
        }
        self.units.fetch_add(n, Ordering::SeqCst);
        crate::sync::seq_cst_pair();
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.flush(semaphore);
        }
    }

    /// Moves the spare units into the semaphore.
    fn flush(&self, semaphore: &Semaphore) {
        if self.units.load(Ordering::SeqCst) == 0 {
            return;
        }
        let units = self.units.swap(0, Ordering::SeqCst);
        if units != 0 {
            semaphore.add_permits(units);
        }
    }

    /// Counts a waiter in the semaphore's queue until the guard is dropped (call it before
    /// waiting).
    fn wait<'a>(self: &'a Arc<Self>, semaphore: &Semaphore) -> Waiting<'a> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        crate::sync::seq_cst_pair();
        self.flush(semaphore);
        Waiting(self)
    }

    fn units(&self) -> usize {
        self.units.load(Ordering::Relaxed)
    }
}

/// A waiter counted in [`Spare::waiters`].
struct Waiting<'a>(&'a Spare);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A unit taken by [`InFlightLimit::try_take_fixed`], given back when dropped.
struct Unit<'a>(&'a InFlightLimit);

impl Drop for Unit<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// A unit of an [`InFlightLimit`], given back when dropped, and (of an adaptive limit) its
/// [`Ticket`], for [`InFlightLimit::finish`].
pub(crate) struct Permit {
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) ticket: Option<Ticket>,
}

/// When an adaptive limit's unit was taken, in which generation of the limit, and how many
/// were in flight then (itself included). A plain value (no drop glue, so a fixed limit's
/// futures pay nothing for it): a unit dropped without a report (a cancelled operation)
/// reports nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    started: Instant,
    generation: u32,
    in_flight: NonZeroU32,
}

impl Ticket {
    /// The operation ends now.
    #[cold]
    #[inline(never)]
    pub(crate) fn end(self) -> Ended {
        Ended {
            generation: self.generation,
            in_flight: self.in_flight,
            latency: self.started.elapsed().as_secs_f32(),
        }
    }
}

/// An operation of an adaptive limit that ended: its generation, in-flight count and latency
/// (in seconds). Kept small, and a plain value: it travels with the operation's output to the
/// stream that reports it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ended {
    generation: u32,
    in_flight: NonZeroU32,
    latency: f32,
}

/// How an operation's output counts for an adaptive limit.
pub(crate) trait Outcome<T> {
    /// Whether `out` is a failure (a drop signal).
    fn failed(out: &T) -> bool;
}

/// Every output is a success.
#[derive(Debug)]
pub(crate) struct Succeeds;

impl<T> Outcome<T> for Succeeds {
    #[inline]
    fn failed(_: &T) -> bool {
        false
    }
}

/// An `Err` is a failure.
#[derive(Debug)]
pub(crate) struct ErrFails;

impl<T, E> Outcome<Result<T, E>> for ErrFails {
    #[inline]
    fn failed(out: &Result<T, E>) -> bool {
        out.is_err()
    }
}

pin_project! {
    /// A future that holds a permit of the limit (if it was given one) until it completes.
    /// Its output comes with the operation's end, if it holds a ticket of an adaptive limit,
    /// for its holder to report (a fixed limit's future carries `None`, and reads no clock).
    /// The tower layer's futures are these; the streams' are [`Held`] (their types name this
    /// one in their [`Queue`]).
    pub(crate) struct WithPermit<Fut> {
        #[pin]
        fut: Fut,
        permit: Option<OwnedSemaphorePermit>,
        ticket: Option<Ticket>,
    }
}

impl<Fut> WithPermit<Fut> {
    /// `fut`, holding `permit` (if any) with its `ticket` (of an adaptive limit).
    #[cfg(feature = "tower")]
    #[inline]
    pub(crate) fn new(
        fut: Fut,
        permit: Option<OwnedSemaphorePermit>,
        ticket: Option<Ticket>,
    ) -> Self {
        Self {
            fut,
            permit,
            ticket,
        }
    }

    #[cfg(feature = "tower")]
    pub(crate) fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }
}

impl<Fut: Future> Future for WithPermit<Fut> {
    type Output = (Fut::Output, Option<Ended>);

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        this.permit.take();
        Poll::Ready((out, this.ticket.take().map(Ticket::end)))
    }
}

/// How an upstream item starts.
pub(crate) trait Start<I> {
    /// The future an item becomes.
    type Fut: Future;
    /// How its output counts for an adaptive limit.
    type Outcome: Outcome<<Self::Fut as Future>::Output>;
    /// Whether `item` runs under a permit. One that does not is started at once, holding none.
    fn needs_permit(&self, item: &I) -> bool;
    /// Makes the item's future.
    fn start(&mut self, item: I) -> Self::Fut;
}

/// Every item runs `f(item)` under a permit.
pub(crate) struct Plain<F>(pub(crate) F);

impl<I, F, Fut> Start<I> for Plain<F>
where
    F: FnMut(I) -> Fut,
    Fut: Future,
{
    type Fut = Fut;
    type Outcome = Succeeds;

    #[inline]
    fn needs_permit(&self, _: &I) -> bool {
        true
    }

    #[inline]
    fn start(&mut self, item: I) -> Fut {
        (self.0)(item)
    }
}

pin_project! {
    /// A future of the `in_flight` family's engine. Whether it holds a unit of the limit and
    /// (of an adaptive limit) its ticket travel with its output to the engine, which gives the
    /// unit back as soon as the future ends: the future holds no handle on the limit, so
    /// taking a unit costs no reference count.
    pub(crate) struct Held<Fut> {
        #[pin]
        fut: Fut,
        unit: bool,
        ticket: Option<Ticket>,
    }
}

impl<Fut: Future> Future for Held<Fut> {
    /// The output, whether the future held a unit, and its end for an adaptive limit.
    type Output = (Fut::Output, bool, Option<Ended>);

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        Poll::Ready((out, *this.unit, this.ticket.take().map(Ticket::end)))
    }
}

/// The queue a stream of the family names in its type (`FuturesUnordered<WithPermit<Fut>>`
/// in completion order, `FuturesOrdered<WithPermit<Fut>>` in input order), and the [`Store`]
/// that holds its futures.
pub(crate) trait Queue {
    type Store: Store;
}

impl<Fut> Queue for FuturesUnordered<WithPermit<Fut>> {
    type Store = Unordered<Fut>;
}

impl<Fut: Future> Queue for FuturesOrdered<WithPermit<Fut>> {
    type Store = Ordered<Fut>;
}

/// A stream's running (and, in input order, finished but held back) futures.
pub(crate) trait Store: Default {
    /// Whether a finished future waits here for earlier ones: then the store's length is the
    /// reorder buffer, and it is bounded by the limit.
    const ORDERED: bool;
    fn len(&self) -> usize;
}

/// A [`Store`] of futures of type `Fut`.
pub(crate) trait PollStore<Fut: Future>: Store {
    fn push(&mut self, fut: Held<Fut>);
    /// The next output in the store's order, with its end for an adaptive limit. `unit` is
    /// called as soon as a future that held a unit ends (in input order, possibly before
    /// earlier ones have).
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        unit: impl FnMut(),
    ) -> Poll<Option<(Fut::Output, Option<Ended>)>>;
}

/// The futures in completion order.
pub(crate) struct Unordered<Fut>(FuturesUnordered<Held<Fut>>);

impl<Fut> Default for Unordered<Fut> {
    fn default() -> Self {
        Self(FuturesUnordered::new())
    }
}

impl<Fut> Store for Unordered<Fut> {
    const ORDERED: bool = false;

    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl<Fut: Future> PollStore<Fut> for Unordered<Fut> {
    #[inline]
    fn push(&mut self, fut: Held<Fut>) {
        self.0.push(fut);
    }

    #[inline]
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        mut unit: impl FnMut(),
    ) -> Poll<Option<(Fut::Output, Option<Ended>)>> {
        let Some((out, held, ended)) = std::task::ready!(self.0.poll_next_unpin(cx)) else {
            return Poll::Ready(None);
        };
        if held {
            unit();
        }
        Poll::Ready(Some((out, ended)))
    }
}

pin_project! {
    /// A future with its place in input order.
    pub(crate) struct Indexed<Fut> {
        #[pin]
        fut: Fut,
        index: u64,
    }
}

impl<Fut: Future> Future for Indexed<Fut> {
    type Output = (u64, Fut::Output);

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        Poll::Ready((*this.index, out))
    }
}

/// The output of a future in a [`Store`].
type Done<Fut> = (<Fut as Future>::Output, Option<Ended>);

/// The futures in input order, as in a `FuturesOrdered`: they run in a `FuturesUnordered`,
/// and an output that comes before the earlier ones' waits at its place in `finished`.
pub(crate) struct Ordered<Fut: Future> {
    running: FuturesUnordered<Indexed<Held<Fut>>>,
    /// The outputs from `next_out` on, `None` where the future is still running.
    finished: VecDeque<Option<Done<Fut>>>,
    /// How many outputs `finished` holds.
    waiting: usize,
    next_in: u64,
    next_out: u64,
}

impl<Fut: Future> Default for Ordered<Fut> {
    fn default() -> Self {
        Self {
            running: FuturesUnordered::new(),
            finished: VecDeque::new(),
            waiting: 0,
            next_in: 0,
            next_out: 0,
        }
    }
}

// Nothing in it is pinned but the futures, which the `FuturesUnordered` keeps on the heap.
impl<Fut: Future> Unpin for Ordered<Fut> {}

impl<Fut: Future> Store for Ordered<Fut> {
    const ORDERED: bool = true;

    #[inline]
    fn len(&self) -> usize {
        self.running.len() + self.waiting
    }
}

impl<Fut: Future> PollStore<Fut> for Ordered<Fut> {
    #[inline]
    fn push(&mut self, fut: Held<Fut>) {
        let index = self.next_in;
        self.next_in += 1;
        self.running.push(Indexed { fut, index });
    }

    #[inline]
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        mut unit: impl FnMut(),
    ) -> Poll<Option<Done<Fut>>> {
        loop {
            if let Some(Some(_)) = self.finished.front() {
                let done = self
                    .finished
                    .pop_front()
                    .flatten()
                    .expect("an output is next");
                self.waiting -= 1;
                self.next_out += 1;
                return Poll::Ready(Some(done));
            }
            let Some((index, (out, held, ended))) =
                std::task::ready!(self.running.poll_next_unpin(cx))
            else {
                return Poll::Ready(None);
            };
            if held {
                unit();
            }
            if index == self.next_out {
                // Its place, if a later one has ended first.
                self.finished.pop_front();
                self.next_out += 1;
                return Poll::Ready(Some((out, ended)));
            }
            let at = usize::try_from(index - self.next_out).expect("at most the limit apart");
            if self.finished.len() <= at {
                self.finished.resize_with(at + 1, || None);
            }
            self.finished[at] = Some((out, ended));
            self.waiting += 1;
        }
    }
}

/// A wait in a limit's queue for a unit.
pub(crate) type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send + Sync>>;

pin_project! {
    /// The engine of the `in_flight` family.
    pub(crate) struct Core<S: Stream, C, Q: Queue> {
        #[pin]
        stream: S,
        start: C,
        limit: InFlightLimit,
        running: Q::Store,
        // The units of the limit that running futures hold: each is given back when its future
        // ends, and what is left when the stream is dropped.
        units: usize,
        // An item pulled from upstream, waiting for a permit.
        waiting: Option<S::Item>,
        acquire: Option<Acquire>,
        upstream_done: bool,
    }

    impl<S: Stream, C, Q: Queue> PinnedDrop for Core<S, C, Q> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.units > 0 {
                this.limit.give_back_many(*this.units);
            }
        }
    }
}

impl<S: Stream, C, Q: Queue> Core<S, C, Q> {
    pub(crate) fn new(stream: S, limit: InFlightLimit, start: C) -> Self {
        Self {
            stream,
            start,
            limit,
            running: Q::Store::default(),
            units: 0,
            waiting: None,
            acquire: None,
            upstream_done: false,
        }
    }

    pub(crate) fn limit(&self) -> &InFlightLimit {
        &self.limit
    }

    delegate_access_inner!(pub(crate) stream, S, ());

    /// Items pulled and not yet yielded.
    pub(crate) fn queued(&self) -> usize {
        self.running.len() + usize::from(self.waiting.is_some())
    }

    pub(crate) fn size_hint(&self) -> (usize, Option<usize>) {
        let upstream = match self.upstream_done {
            true => (0, Some(0)),
            false => self.stream.size_hint(),
        };
        size_hint_plus(self.queued(), upstream)
    }

    pub(crate) fn is_terminated(&self) -> bool {
        self.upstream_done && self.waiting.is_none() && self.running.len() == 0
    }

    pub(crate) fn fmt_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result
    where
        S: fmt::Debug,
    {
        f.debug_struct(name)
            .field("stream", &self.stream)
            .field("limit", &self.limit)
            .field("queued", &self.queued())
            .field("upstream_done", &self.upstream_done)
            .finish_non_exhaustive()
    }
}

impl<S, C, Q> Core<S, C, Q>
where
    S: Stream,
    C: Start<S::Item>,
    Q: Queue,
    Q::Store: PollStore<C::Fut>,
{
    #[inline]
    pub(crate) fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<<C::Fut as Future>::Output>> {
        let mut this = self.project();
        // Start as many futures as upstream and the limit allow; in input order, no more than
        // the limit may be queued (running, or finished behind an earlier item).
        loop {
            if this.waiting.is_none() {
                if *this.upstream_done
                    || (<Q::Store as Store>::ORDERED && this.running.len() >= this.limit.limit())
                {
                    break;
                }
                match this.stream.as_mut().poll_next(cx) {
                    Poll::Ready(Some(item)) => {
                        if !this.start.needs_permit(&item) {
                            let fut = this.start.start(item);
                            this.running.push(Held {
                                fut,
                                unit: false,
                                ticket: None,
                            });
                            continue;
                        }
                        *this.waiting = Some(item);
                    }
                    Poll::Ready(None) => {
                        *this.upstream_done = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let Poll::Ready(()) = this.limit.poll_unit(this.acquire, cx) else {
                break;
            };
            *this.units += 1;
            let ticket = this.limit.ticket();
            let item = this.waiting.take().expect("an item waits for the permit");
            let fut = this.start.start(item);
            this.running.push(Held {
                fut,
                unit: true,
                ticket,
            });
        }
        let (limit, units) = (&*this.limit, this.units);
        let give_back = || {
            *units -= 1;
            limit.give_back();
        };
        match this.running.poll_next(cx, give_back) {
            Poll::Ready(Some((out, ended))) => {
                if let Some(ended) = ended {
                    this.limit.report(ended, C::Outcome::failed(&out));
                }
                Poll::Ready(Some(out))
            }
            Poll::Ready(None) if *this.upstream_done && this.waiting.is_none() => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

/// Defines a stream of the `in_flight` family (the [`Core`] running `f(item)` for every
/// item) whose futures run in a `$queue`: the struct, its accessors, `Stream` and `Debug`.
/// `Fut: Future` is a bound of the struct only where the queue's type needs it.
macro_rules! in_flight_stream {
    ($(#[$doc:meta])* $name:ident<Fut $(: $fut_bound:ident)?>, $queue:ident) => {
        pin_project! {
            $(#[$doc])*
            #[must_use = "streams do nothing unless polled"]
            pub struct $name<S: Stream, F, Fut $(: $fut_bound)?> {
                #[pin]
                core: Core<S, Plain<F>, $queue<WithPermit<Fut>>>,
            }
        }

        impl<S: Stream, F, Fut: Future> $name<S, F, Fut> {
            pub(crate) fn new(stream: S, limit: InFlightLimit, f: F) -> Self {
                Self {
                    core: Core::new(stream, limit, Plain(f)),
                }
            }

            /// The limit this stream runs under.
            pub fn limit(&self) -> &InFlightLimit {
                self.core.limit()
            }

            delegate_access_inner!(pub core, S, (.));
        }

        delegate_stream!(
            impl[S, F, Fut] $name<S, F, Fut>
            where [S: Stream, F: FnMut(S::Item) -> Fut, Fut: Future]
            => Fut::Output;
            Debug where [S: Stream + fmt::Debug, Fut: Future]
        );
    };
}

in_flight_stream!(
    /// Stream for the [`in_flight`](crate::PipelineExt::in_flight) method.
    InFlight<Fut>,
    FuturesUnordered
);

in_flight_stream!(
    /// Stream for the [`in_flight_ordered`](crate::PipelineExt::in_flight_ordered) method.
    InFlightOrdered<Fut: Future>,
    FuturesOrdered
);

#[cfg(all(test, stagepipe_loom))]
mod loom_model;
