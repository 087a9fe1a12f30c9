//! `in_flight` and `in_flight_ordered`: a concurrent async map inside the stream's own task,
//! capped by a shared limit.
//!
//! The futures run in a [`FuturesUnordered`] (or, in input order, a [`FuturesOrdered`]) owned by
//! the stream (no spawn, so they may borrow). Each one holds a permit of the [`InFlightLimit`]'s
//! semaphore while it runs; an item is pulled from upstream first and then waits for a permit,
//! so a stream whose upstream is idle holds no permit that another stream could use. In input
//! order, a finished future gives its permit back at once and waits in the queue for the
//! earlier ones; the queue (running plus finished) never holds more than the limit's
//! [`limit`](InFlightLimit::limit), as `buffered(n)` never holds more than `n`.
//!
//! The engine ([`Core`]) is shared by the whole family: it is generic over the queue of running
//! futures ([`Queue`]: completion order or input order) and over how an upstream item starts
//! ([`Start`]: a plain item always runs under a permit; a fallible stream's `Err` passes through
//! as a finished future that holds none).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{FuturesOrdered, FuturesUnordered, Stream};
use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::error::{ConfigError, count_up_to, or_panic};
use crate::macros::size_hint_plus;

/// A cap on concurrent operations, shared by every stream that holds a clone.
///
/// All streams using clones of one limit together never run more than
/// [`limit`](InFlightLimit::limit) futures at once; waiting streams are served first come, first
/// served. A plain number converts into a private limit wherever a limit is accepted.
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
    limit: usize,
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
            limit,
        })
    }

    /// The maximum number of operations running at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Runs `fut` while holding one unit of this limit, waiting for a free unit first: the same
    /// budget as the [`in_flight`](crate::PipelineExt::in_flight) operator, for a direct caller
    /// (inside a stage of a staged pipeline, say). Waiting callers are served first come, first
    /// served.
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
        // A free unit is taken without the queue's future (no waiter can be ahead while units
        // are free, so first come, first served still holds).
        let _permit = match self.semaphore.try_acquire() {
            Ok(permit) => permit,
            Err(_) => self
                .semaphore
                .acquire()
                .await
                .expect("the semaphore is never closed"),
        };
        fut.await
    }

    /// Takes a unit of this limit for a stream or service that holds it past a call: a free
    /// unit at once, else through the queue's wait in `acquire` (first come, first served),
    /// which is kept across polls and cleared once the unit is taken.
    pub(crate) fn poll_permit(
        &self,
        acquire: &mut Option<Acquire>,
        cx: &mut Context<'_>,
    ) -> Poll<OwnedSemaphorePermit> {
        let permit = match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let wait =
                    acquire.get_or_insert_with(|| Box::pin(self.semaphore.clone().acquire_owned()));
                std::task::ready!(wait.as_mut().poll(cx)).expect("the semaphore is never closed")
            }
        };
        *acquire = None;
        Poll::Ready(permit)
    }

    /// How many operations are running now, across every stream sharing this limit.
    pub fn in_use(&self) -> usize {
        self.limit - self.semaphore.available_permits()
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

impl_debug!(impl[] InFlightLimit => InFlightLimit |this| {
    limit: &this.limit,
    in_use: &this.in_use(),
});

pin_project! {
    /// A future that holds a permit of the limit (if it was given one) until it completes.
    pub(crate) struct WithPermit<Fut> {
        #[pin]
        fut: Fut,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<Fut> WithPermit<Fut> {
    pub(crate) fn new(fut: Fut, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self { fut, permit }
    }

    #[cfg(feature = "tower")]
    pub(crate) fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }
}

impl<Fut: Future> Future for WithPermit<Fut> {
    type Output = Fut::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Fut::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        this.permit.take();
        Poll::Ready(out)
    }
}

/// How an upstream item starts.
pub(crate) trait Start<I> {
    /// The future an item becomes.
    type Fut: Future;
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

    #[inline]
    fn needs_permit(&self, _: &I) -> bool {
        true
    }

    #[inline]
    fn start(&mut self, item: I) -> Fut {
        (self.0)(item)
    }
}

/// The queue of a stream's running (and, in input order, finished but held back) futures.
pub(crate) trait Queue: Stream + Unpin + Default {
    /// The queued future.
    type Fut;
    /// Whether a finished future waits here for earlier ones: then the queue's length is the
    /// reorder buffer, and it is bounded by the limit.
    const ORDERED: bool;
    fn push(&mut self, fut: Self::Fut);
    fn len(&self) -> usize;
}

impl<Fut: Future> Queue for FuturesUnordered<Fut> {
    type Fut = Fut;
    const ORDERED: bool = false;

    #[inline]
    fn push(&mut self, fut: Fut) {
        FuturesUnordered::push(self, fut);
    }

    #[inline]
    fn len(&self) -> usize {
        FuturesUnordered::len(self)
    }
}

impl<Fut: Future> Queue for FuturesOrdered<Fut> {
    type Fut = Fut;
    const ORDERED: bool = true;

    #[inline]
    fn push(&mut self, fut: Fut) {
        self.push_back(fut);
    }

    #[inline]
    fn len(&self) -> usize {
        FuturesOrdered::len(self)
    }
}

/// A wait in a limit's queue for a unit.
pub(crate) type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send + Sync>>;

pin_project! {
    /// The engine of the `in_flight` family.
    pub(crate) struct Core<S: Stream, C, Q> {
        #[pin]
        stream: S,
        start: C,
        limit: InFlightLimit,
        running: Q,
        // An item pulled from upstream, waiting for a permit.
        waiting: Option<S::Item>,
        acquire: Option<Acquire>,
        upstream_done: bool,
    }
}

impl<S: Stream, C, Q: Queue> Core<S, C, Q> {
    pub(crate) fn new(stream: S, limit: InFlightLimit, start: C) -> Self {
        Self {
            stream,
            start,
            limit,
            running: Q::default(),
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
    Q: Queue<Fut = WithPermit<C::Fut>> + Stream<Item = <C::Fut as Future>::Output>,
{
    pub(crate) fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<<C::Fut as Future>::Output>> {
        let mut this = self.project();
        // Start as many futures as upstream and the limit allow; in input order, no more than
        // the limit may be queued (running, or finished behind an earlier item).
        loop {
            if this.waiting.is_none() {
                if *this.upstream_done || (Q::ORDERED && this.running.len() >= this.limit.limit) {
                    break;
                }
                match this.stream.as_mut().poll_next(cx) {
                    Poll::Ready(Some(item)) => {
                        if !this.start.needs_permit(&item) {
                            let fut = this.start.start(item);
                            this.running.push(WithPermit::new(fut, None));
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
            let Poll::Ready(permit) = this.limit.poll_permit(this.acquire, cx) else {
                break;
            };
            let item = this.waiting.take().expect("an item waits for the permit");
            let fut = this.start.start(item);
            this.running.push(WithPermit::new(fut, Some(permit)));
        }
        match Pin::new(&mut *this.running).poll_next(cx) {
            Poll::Ready(Some(out)) => Poll::Ready(Some(out)),
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
