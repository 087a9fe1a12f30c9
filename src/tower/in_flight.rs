//! [`InFlightLimit`] as a tower layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tower_layer::Layer;
use tower_service::Service;

use crate::InFlightLimit;

type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send + Sync>>;

/// A service that holds one unit of a shared [`InFlightLimit`] per call, from `poll_ready`
/// until its response future completes or is dropped: made by using the limit as a [`Layer`].
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
    permit: Option<OwnedSemaphorePermit>,
    acquire: Option<Acquire>,
}

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

    /// The limit this service draws on.
    pub fn limit(&self) -> &InFlightLimit {
        &self.limit
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service (a unit held for the next call is given back).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Layer<S> for InFlightLimit {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService::new(inner, self.clone())
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
            let semaphore = self.limit.semaphore();
            let permit = match semaphore.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let acquire = self
                        .acquire
                        .get_or_insert_with(|| Box::pin(semaphore.clone().acquire_owned()));
                    ready!(acquire.as_mut().poll(cx)).expect("the semaphore is never closed")
                }
            };
            self.acquire = None;
            self.permit = Some(permit);
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = self.permit.take().expect(super::NOT_READY);
        InFlightFuture {
            fut: self.inner.call(req),
            permit: Some(permit),
        }
    }
}

impl<S: Clone> Clone for InFlightService<S> {
    /// A clone sharing the limit, without a unit of its own yet.
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.limit.clone())
    }
}

impl<S: fmt::Debug> fmt::Debug for InFlightService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightService")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .field("holds_unit", &self.permit.is_some())
            .finish()
    }
}

pin_project! {
    /// The response future of [`InFlightService`]: holds the call's unit of the limit until it
    /// completes or is dropped.
    #[must_use = "futures do nothing unless polled"]
    pub struct InFlightFuture<F> {
        #[pin]
        fut: F,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for InFlightFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = ready!(this.fut.poll(cx));
        this.permit.take();
        Poll::Ready(out)
    }
}

impl<F> fmt::Debug for InFlightFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightFuture")
            .field("holds_unit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}
