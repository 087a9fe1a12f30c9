//! The future of [`Call::run`](super::Call::run): the first attempt on a fast path, written by
//! hand, and whatever has to wait on the general path of [`Policy`](super::Policy), boxed.
//!
//! On its first poll, the run reads the clock once (for the stats, the rate limit and the
//! timeout alike) and takes what the attempt needs without waiting, if it can: a permit of a
//! closed in-memory breaker (one atomic load), a free unit of a fixed in-flight limit, a cell
//! of an in-memory rate limiter that goes out at once. Then it calls `f(item)` and polls its
//! future in place, under the timeout, whose timer is registered only if that future is
//! pending when polled. A call that succeeds on its first attempt allocates nothing and moves
//! no other future.
//!
//! Anything else continues on the general path ([`Policy::attempts`](super::Policy)), boxed
//! with a clone of the call: a breaker that is not closed (the rejection, or the trial), a
//! limiter whose cell must be waited for (or in Redis), an in-flight unit to wait for (or of an
//! adaptive limit), and the retries after a failed first attempt. Taking those fast steps in the
//! order breaker, in-flight unit, rate-limit cell leaves nothing to undo when one fails but
//! the unit, given back at once: the breaker's closed permit has no effect until its outcome
//! is recorded, and a cell that does not go out at once is not taken.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use super::{CallError, CallRetry, Inner};
use crate::circuit_breaker::Permit;
use crate::time;

/// The rest of a run on the general path.
type Slow<U, E> = Pin<Box<dyn Future<Output = Result<U, CallError<E>>> + Send>>;

pin_project! {
    /// The future of [`Call::run`](super::Call::run).
    pub(crate) struct Run<F, R, T, Fut, U, E> {
        inner: Arc<Inner<F, R>>,
        // When the run started, once its stats have counted it.
        started: Option<Instant>,
        #[pin]
        state: State<T, Fut, U, E>,
    }

    impl<F, R, T, Fut, U, E> PinnedDrop for Run<F, R, T, Fut, U, E> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            let StateProj::Running { unit, .. } = this.state.as_mut().project() else {
                // Not started (nothing to record), finished, or on the general path (whose
                // future records its own end).
                return;
            };
            let unit = *unit;
            // `f`'s future goes first, then its unit.
            this.state.set(State::Done);
            let policy = &this.inner.policy;
            if let (true, Some(limit)) = (unit, &policy.in_flight) {
                limit.give_back();
            }
            if let (Some(stats), Some(_)) = (&policy.stats, this.started) {
                stats.cancelled();
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<T, Fut, U, E> {
        // Not polled yet.
        Start { item: Option<T> },
        // The first attempt, let through at once: `f(item)` is running.
        Running {
            #[pin]
            fut: Fut,
            // The timeout's deadline, and its timer once `fut` has been pending.
            deadline: Option<Instant>,
            #[pin]
            sleep: Option<Sleep>,
            // The item for a retry, if one may follow.
            next: Option<T>,
            // Whether it holds a unit of the in-flight limit.
            unit: bool,
            // Its permit of the breaker, if it has one.
            permit: Option<Permit>,
        },
        Slow { fut: Slow<U, E> },
        Done,
    }
}

impl<F, R, T, Fut, U, E> Run<F, R, T, Fut, U, E> {
    pub(crate) fn new(inner: Arc<Inner<F, R>>, item: T) -> Self {
        Self {
            inner,
            started: None,
            state: State::Start { item: Some(item) },
        }
    }
}

impl<F, R, T, Fut, U, E> Run<F, R, T, Fut, U, E>
where
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    R: CallRetry<T, E>,
    T: Send + 'static,
    U: Send + 'static,
    E: Send + 'static,
{
    /// The first poll: counts the run and lets its first attempt through at once if nothing
    /// has to wait (see the module's documentation), else hands it to the general path.
    fn start(
        inner: &Arc<Inner<F, R>>,
        started: &mut Option<Instant>,
        item: T,
    ) -> State<T, Fut, U, E> {
        let policy = &inner.policy;
        // One clock read for the stats, the rate limit and the timeout.
        let now = (policy.stats.is_some() || policy.limiter.is_some() || policy.timeout.is_some())
            .then(Instant::now);
        if let Some(stats) = &policy.stats {
            stats.started();
            *started = now;
        }
        let permit = match &policy.breaker {
            None => None,
            Some(breaker) => match breaker.closed_permit() {
                Some(permit) => Some(permit),
                None => return Self::slow(inner, *started, item, now),
            },
        };
        let unit = match &policy.in_flight {
            None => false,
            Some(limit) if !limit.is_adaptive() && limit.try_take_fixed() => true,
            Some(_) => return Self::slow(inner, *started, item, now),
        };
        if let (Some(limiter), Some(now)) = (&policy.limiter, now) {
            if !limiter.try_ready_at(now) {
                if let (true, Some(limit)) = (unit, &policy.in_flight) {
                    limit.give_back();
                }
                return Self::slow(inner, *started, item, Some(now));
            }
        }
        let next = policy.retry.copy_for_retry(&item, 1);
        let deadline = policy
            .timeout
            .zip(now)
            .map(|(d, now)| time::deadline(now, d));
        State::Running {
            fut: (inner.f)(item),
            deadline,
            sleep: None,
            next,
            unit,
            permit,
        }
    }

    /// The whole run on the general path, from its first attempt; `now` is the current
    /// instant if it was read.
    fn slow(
        inner: &Arc<Inner<F, R>>,
        started: Option<Instant>,
        item: T,
        now: Option<Instant>,
    ) -> State<T, Fut, U, E> {
        let inner = Arc::clone(inner);
        State::Slow {
            fut: Box::pin(async move {
                let policy = &inner.policy;
                let run = policy.stats.as_ref().zip(started).map(|(s, t)| s.resume(t));
                policy.attempts(item, |x| (inner.f)(x), 1, now, run).await
            }),
        }
    }

    /// The first attempt ended (`None`: it timed out) and has given back its unit: records
    /// its outcome, and returns the run's result, or the general path that retries it.
    fn settle(
        inner: &Arc<Inner<F, R>>,
        started: Option<Instant>,
        outcome: Option<Result<U, E>>,
        next: Option<T>,
        permit: Option<Permit>,
    ) -> Result<Result<U, CallError<E>>, Slow<U, E>> {
        let policy = &inner.policy;
        let ok = matches!(outcome, Some(Ok(_)));
        if let (Some(permit), Some(breaker)) = (permit, &policy.breaker) {
            match ok {
                true => breaker.shared.succeeded(permit),
                false => breaker.shared.failed(permit),
            }
        }
        let error = match outcome {
            Some(Ok(value)) => {
                Self::finish(inner, started, true);
                return Ok(Ok(value));
            }
            Some(Err(e)) => CallError::failed(e, 1),
            None => {
                if let Some(stats) = &policy.stats {
                    stats.timeout();
                }
                CallError::timeout(1)
            }
        };
        match next {
            Some(next) if policy.retry.retryable(&error) => Err(Self::retry(inner, started, next)),
            _ => {
                Self::finish(inner, started, false);
                Ok(Err(error))
            }
        }
    }

    /// Records the end of the run in the stats.
    #[inline]
    fn finish(inner: &Inner<F, R>, started: Option<Instant>, ok: bool) {
        if let (Some(stats), Some(started)) = (&inner.policy.stats, started) {
            stats.finished(started, ok);
        }
    }

    /// The rest of the run on the general path, after a failed first attempt: the backoff's
    /// wait, then the attempts from the second on, with `next`.
    fn retry(inner: &Arc<Inner<F, R>>, started: Option<Instant>, next: T) -> Slow<U, E> {
        let inner = Arc::clone(inner);
        Box::pin(async move {
            let policy = &inner.policy;
            let run = policy.stats.as_ref().zip(started).map(|(s, t)| s.resume(t));
            time::sleep(policy.retry.delay_after(1)).await;
            if let Some(stats) = &policy.stats {
                stats.retry();
            }
            policy.attempts(next, |x| (inner.f)(x), 2, None, run).await
        })
    }
}

impl<F, R, T, Fut, U, E> Future for Run<F, R, T, Fut, U, E>
where
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    R: CallRetry<T, E>,
    T: Send + 'static,
    U: Send + 'static,
    E: Send + 'static,
{
    type Output = Result<U, CallError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Start { item } => {
                    let item = item.take().expect("`Run` polled after completion");
                    let state = Self::start(this.inner, this.started, item);
                    this.state.set(state);
                }
                StateProj::Running {
                    fut,
                    deadline,
                    mut sleep,
                    next,
                    unit,
                    permit,
                } => {
                    let outcome = match fut.poll(cx) {
                        Poll::Ready(out) => Some(out),
                        Poll::Pending => {
                            let Some(deadline) = *deadline else {
                                return Poll::Pending;
                            };
                            if sleep.is_none() {
                                sleep.set(Some(sleep_until(deadline)));
                            }
                            let sleep = sleep.as_pin_mut().expect("the timer was just armed");
                            match sleep.poll(cx) {
                                Poll::Ready(()) => None,
                                Poll::Pending => return Poll::Pending,
                            }
                        }
                    };
                    let (next, unit, permit) = (next.take(), *unit, *permit);
                    // `f`'s future and the timer go first, then the unit.
                    this.state.set(State::Done);
                    if let (true, Some(limit)) = (unit, &this.inner.policy.in_flight) {
                        limit.give_back();
                    }
                    match Self::settle(this.inner, *this.started, outcome, next, permit) {
                        Ok(result) => return Poll::Ready(result),
                        Err(fut) => this.state.set(State::Slow { fut }),
                    }
                }
                StateProj::Slow { fut } => {
                    let result = std::task::ready!(fut.as_mut().poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                StateProj::Done => panic!("`Run` polled after completion"),
            }
        }
    }
}
