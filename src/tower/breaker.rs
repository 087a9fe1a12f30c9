//! [`CircuitBreaker`] as a tower layer.

use std::fmt;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower_service::Service;

use crate::{BreakerError, CircuitBreaker};

/// A service guarded by a shared [`CircuitBreaker`]: made by using the breaker as a [`Layer`](tower_layer::Layer).
///
/// Each call is one call of the breaker: an `Err` of the inner service counts as a failure, and
/// while the breaker is open a call is rejected with [`BreakerError::Open`] **without calling
/// the inner service**. To decide that before the inner service sees the request, `call` moves
/// the inner service (readied by `poll_ready`) into the response future and leaves a clone in
/// its place, as tower recommends for services that call their inner service later; so the inner
/// service must be `Clone`. An error of the inner `poll_ready` is returned as
/// [`BreakerError::Failed`] and not counted.
///
/// ```
/// use std::time::Duration;
/// use stagepipe::{BreakerError, CircuitBreaker, CircuitState};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let breaker = CircuitBreaker::new(1, Duration::from_secs(5));
/// let svc = ServiceBuilder::new()
///     .layer(breaker.clone())
///     .service(service_fn(|_: ()| async { Err::<(), _>("down") }));
/// assert_eq!(svc.clone().oneshot(()).await, Err(BreakerError::Failed("down")));
/// assert_eq!(breaker.state(), CircuitState::Open);
/// assert_eq!(svc.oneshot(()).await, Err(BreakerError::Open(())));
/// # }
/// ```
#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: CircuitBreaker,
}

service_parts!(BreakerService<S>, breaker: CircuitBreaker, "");

impl<S> BreakerService<S> {
    /// Wraps `inner`, guarding each call with `breaker`.
    pub fn new(inner: S, breaker: CircuitBreaker) -> Self {
        Self { inner, breaker }
    }
}

impl<S, Req> Service<Req> for BreakerService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BreakerError<(), S::Error>;
    type Future = BoxFuture<'static, Result<S::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Failed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The readied service goes with the request; its clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let breaker = self.breaker.clone();
        Box::pin(async move { breaker.call(async move { ready.call(req).await }).await })
    }
}

impl_debug!(impl[S: fmt::Debug] BreakerService<S> => BreakerService |this| {
    inner: &this.inner,
    breaker: &this.breaker,
});
