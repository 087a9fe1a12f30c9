//! [`InFlightLimit`] as a tower layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::InFlightLimit;
use crate::in_flight::{Acquire, Permit, WithPermit};

/// A service that holds one unit of a shared [`InFlightLimit`] per call, from `poll_ready`
/// until its response future completes or is dropped: made by using the limit as a [`Layer`](tower_layer::Layer).
///
/// Clones (and every stream or caller holding a clone of the limit) share its units, served
/// first come, first served. A clone starts without a unit; a unit taken by `poll_ready` is
/// given back when the service is dropped.
///
/// ```
/// use std::convert::Infallible;
/// use stagepipe::InFlightLimit;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let db = InFlightLimit::new(8); // shared with the rest of the program
/// let svc = ServiceBuilder::new()
///     .layer(db.clone())
///     .service(service_fn(|x: u32| async move { Ok::<_, Infallible>(x + 1) }));
/// assert_eq!(svc.oneshot(1).await, Ok(2));
/// assert_eq!(db.in_use(), 0);
/// # }
/// ```
pub struct InFlightService<S> {
    inner: S,
    limit: InFlightLimit,
    permit: Option<Permit>,
    acquire: Option<Acquire>,
}

service_parts!(
    InFlightService<S>,
    limit: InFlightLimit,
    " (a unit held for the next call is given back)"
);

impl<S> InFlightService<S> {
    /// Wraps `inner`, holding a unit of `limit` per call.
    pub fn new(inner: S, limit: InFlightLimit) -> Self {
        Self {
            inner,
            limit,
            permit: None,
            acquire: None,
        }
    }
}

impl<S, Req> Service<Req> for InFlightService<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = InFlightFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() {
            let permit = ready!(self.limit.poll_permit(&mut self.acquire, cx));
            let ticket = self.limit.ticket();
            self.permit = Some(Permit { permit, ticket });
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = self.permit.take().expect(super::NOT_READY);
        InFlightFuture {
            // An adaptive limit hears of the call's end (a success, with its latency).
            limit: permit.ticket.map(|_| self.limit.clone()),
            inner: WithPermit::new(self.inner.call(req), Some(permit.permit), permit.ticket),
        }
    }
}

impl<S: Clone> Clone for InFlightService<S> {
    /// A clone sharing the limit, without a unit of its own yet.
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.limit.clone())
    }
}

impl_debug!(impl[S: fmt::Debug] InFlightService<S> => InFlightService |this| {
    inner: &this.inner,
    limit: &this.limit,
    holds_unit: &this.permit.is_some(),
});

pin_project! {
    /// The response future of [`InFlightService`]: holds the call's unit of the limit until it
    /// completes or is dropped.
    #[must_use = "futures do nothing unless polled"]
    pub struct InFlightFuture<F> {
        #[pin]
        inner: WithPermit<F>,
        limit: Option<InFlightLimit>,
    }
}

impl<F: Future> Future for InFlightFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let (out, ended) = ready!(this.inner.poll(cx));
        if let (Some(limit), Some(ended)) = (this.limit.take(), ended) {
            limit.report(ended, false);
        }
        Poll::Ready(out)
    }
}

impl_debug!(impl[F] InFlightFuture<F> => InFlightFuture |this| {
    holds_unit: &this.inner.holds_permit(),
} ..);
