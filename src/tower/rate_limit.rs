//! [`RateLimiter`] as a tower layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tower_service::Service;

use crate::RateLimiter;

/// A service that takes one cell of a shared [`RateLimiter`] per call: made by using the
/// limiter as a [`Layer`](tower_layer::Layer).
///
/// `poll_ready` waits for a cell (on tokio's timer) and then for the inner service; `call`
/// spends the cell. Clones share the limiter's quota with every other holder of the handle. A
/// clone starts without a cell; a cell taken by `poll_ready` and never spent by a `call` is
/// lost (the quota is never exceeded), and a service dropped while it waits gives its slot back
/// as [`RateLimiter::until_ready`] does. With a Redis-backed limiter
/// ([`RateLimiter::redis`], feature `redis`), `poll_ready` always waits through
/// [`until_ready`](RateLimiter::until_ready): the synchronous check it tries first cannot
/// make a round trip.
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use stagepipe::RateLimiter;
/// use tokio::time::Instant;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let limiter = RateLimiter::per(Duration::from_millis(100));
/// let svc = ServiceBuilder::new()
///     .layer(limiter.clone())
///     .service(service_fn(|x: u32| async move { Ok::<_, Infallible>(x) }));
/// let start = Instant::now();
/// for x in 0..3 {
///     svc.clone().oneshot(x).await.unwrap(); // a clone per call: still one quota
/// }
/// assert_eq!(start.elapsed(), Duration::from_millis(200));
/// # }
/// ```
pub struct RateLimitService<S> {
    inner: S,
    limiter: RateLimiter,
    state: State,
}

service_parts!(
    RateLimitService<S>,
    limiter: RateLimiter,
    " (a cell taken and not spent is lost)"
);

enum State {
    /// No cell yet.
    Idle,
    /// Waiting for the reserved slot.
    Waiting(Pin<Box<dyn Future<Output = ()> + Send + Sync>>),
    /// A cell is taken, for the next call.
    Ready,
}

impl<S> RateLimitService<S> {
    /// Wraps `inner`, taking a cell of `limiter` per call.
    pub fn new(inner: S, limiter: RateLimiter) -> Self {
        Self {
            inner,
            limiter,
            state: State::Idle,
        }
    }
}

impl<S, Req> Service<Req> for RateLimitService<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            match &mut self.state {
                State::Ready => return self.inner.poll_ready(cx),
                State::Idle => {
                    self.state = if self.limiter.check() {
                        State::Ready
                    } else {
                        let limiter = self.limiter.clone();
                        State::Waiting(Box::pin(async move { limiter.until_ready().await }))
                    };
                }
                State::Waiting(wait) => {
                    ready!(wait.as_mut().poll(cx));
                    self.state = State::Ready;
                }
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Ready => self.inner.call(req),
            _ => panic!("{}", super::NOT_READY),
        }
    }
}

impl<S: Clone> Clone for RateLimitService<S> {
    /// A clone sharing the quota, without a cell of its own yet.
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.limiter.clone())
    }
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Waiting(_) => "waiting",
            State::Ready => "ready",
        }
    }
}

impl_debug!(impl[S: fmt::Debug] RateLimitService<S> => RateLimitService |this| {
    inner: &this.inner,
    limiter: &this.limiter,
    state: &this.state.name(),
});
