//! [`Call`] as a tower layer (without a function of its own) and as a tower service.

use std::fmt;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::{Call, CallError, CallRetry, NoRetry};

/// A [`Call`] without a function, made by [`Call::layer`]: the policy stack alone, used as a
/// tower [`Layer`] around any service (which takes the function's place).
pub type CallLayer<R = NoRetry> = Call<(), R>;

impl Call<()> {
    /// A policy stack without a function, to wrap tower services: add layers with the same
    /// builder methods, then use it as a [`Layer`]. The wrapped service takes the place of the
    /// function: each attempt calls a clone of it (see [`CallService`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use stagepipe::prelude::*;
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limiter = RateLimiter::per_second(100);
    /// let stats = CallStats::new("backend");
    /// let policy = Call::layer()
    ///     .timeout(Duration::from_secs(1))
    ///     .rate_limit(&limiter)
    ///     .retry(Backoff::fixed(Duration::from_millis(10)))
    ///     .stats(&stats);
    /// let svc = ServiceBuilder::new()
    ///     .layer(policy)
    ///     .service(service_fn(|x: u32| async move { Ok::<_, String>(x * 2) }));
    /// assert_eq!(svc.oneshot(21).await, Ok(42));
    /// assert_eq!(stats.snapshot().successes, 1);
    /// # }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
    pub fn layer() -> CallLayer {
        Call::from_parts(Arc::new(()))
    }
}

impl<S, R: Clone> Layer<S> for Call<(), R> {
    type Service = CallService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            call: self.clone(),
        }
    }
}

/// A tower service running each request through a [`Call`]'s policy stack, with a service in
/// the place of the function: made by using [`Call::layer`] as a [`Layer`].
///
/// Every attempt takes its own clone of the inner service, waits for it to be ready and calls
/// it, inside the layers (so the inner service sees no request while the breaker is open or
/// before the rate limit allows it). `poll_ready` is therefore always ready: the waiting happens
/// in the response future, where the rate limit and in-flight cap shared with the other holders
/// of their handles apply. An error of the inner `poll_ready` fails the attempt like an error of
/// the call. Errors are [`CallError<S::Error>`](CallError); a retrying policy needs the request
/// to be `Clone`.
pub struct CallService<S, R = NoRetry> {
    inner: S,
    call: Call<(), R>,
}

service_parts!(CallService<S, R>, "");

impl<S, R, Req> Service<Req> for CallService<S, R>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    R: CallRetry<Req, S::Error>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = CallError<S::Error>;
    type Future = BoxFuture<'static, Result<S::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let call = self.call.clone();
        let service = self.inner.clone();
        let attempt = move |req: Req| {
            let mut service = service.clone();
            async move {
                poll_fn(|cx| service.poll_ready(cx)).await?;
                service.call(req).await
            }
        };
        Box::pin(async move { call.policy().execute(req, attempt).await })
    }
}

impl<S: Clone, R> Clone for CallService<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            call: self.call.clone(),
        }
    }
}

impl_debug!(impl[S: fmt::Debug, R: fmt::Debug] CallService<S, R> => CallService |this| {
    inner: &this.inner,
    call: &this.call,
});

/// A [`Call`] is a tower service: `call(item)` is [`run(item)`](Call::run), boxed, and it is
/// always ready (its layers wait inside the response future).
impl<F, R, T, Fut, U, E> Service<T> for Call<F, R>
where
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    R: CallRetry<T, E>,
    T: Send + 'static,
    U: Send + 'static,
    E: Send + 'static,
{
    type Response = U;
    type Error = CallError<E>;
    type Future = BoxFuture<'static, Result<U, CallError<E>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, item: T) -> Self::Future {
        Box::pin(self.run(item))
    }
}
