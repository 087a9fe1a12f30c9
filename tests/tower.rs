//! The shared handles and `Call` as tower layers (feature `tower`), on tokio's paused clock.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use common::Gauge;
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Instants (since `start`) at which the inner service was called.
#[derive(Clone)]
struct Log(Arc<Mutex<Vec<Duration>>>, Instant);

impl Log {
    fn new() -> Self {
        Self(Arc::default(), Instant::now())
    }

    fn push(&self) {
        self.0.lock().unwrap().push(self.1.elapsed());
    }

    fn sorted(&self) -> Vec<Duration> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v
    }
}

/// Drives `svc` through `n` requests, one after another.
async fn drive<S>(mut svc: S, n: u32)
where
    S: Service<u32>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        svc.ready().await.unwrap().call(i).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn clones_of_a_rate_limited_service_share_one_quota() {
    let log = Log::new();
    let limiter = RateLimiter::per(ms(100));
    let svc = ServiceBuilder::new()
        .layer(limiter.clone())
        .service(service_fn({
            let log = log.clone();
            move |x: u32| {
                log.push();
                async move { Ok::<_, Infallible>(x) }
            }
        }));
    // Two clones of the service, and a second service built from another clone of the layer.
    let other = ServiceBuilder::new()
        .layer(limiter.clone())
        .service(service_fn({
            let log = log.clone();
            move |x: u32| {
                log.push();
                async move { Ok::<_, Infallible>(x) }
            }
        }));
    tokio::join!(drive(svc.clone(), 4), drive(svc, 4), drive(other, 4));
    assert_eq!(
        log.sorted(),
        (0..12).map(|i| ms(100 * i)).collect::<Vec<_>>()
    );

    // A direct caller draws on the same budget: the next cell is at 1200.
    let start = Instant::now();
    limiter.until_ready().await;
    assert_eq!(start.elapsed(), ms(100));
}

#[tokio::test(start_paused = true)]
async fn axum_routes_layered_with_one_limiter_share_its_quota() {
    let log = Log::new();
    let limiter = RateLimiter::per(ms(50));
    let handler = |log: Log| {
        move || async move {
            log.push();
            "ok"
        }
    };
    let app = Router::new()
        .route("/a", get(handler(log.clone())).route_layer(limiter.clone()))
        .route("/b", get(handler(log.clone())).route_layer(limiter.clone()));
    let request = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let responses = futures::future::join_all(
        ["/a", "/b", "/a", "/b", "/b", "/a"].map(|path| app.clone().oneshot(request(path))),
    )
    .await;
    assert!(
        responses
            .iter()
            .all(|r| r.as_ref().unwrap().status() == StatusCode::OK)
    );
    assert_eq!(log.sorted(), (0..6).map(|i| ms(50 * i)).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn clones_of_an_in_flight_service_share_one_limit() {
    let limit = InFlightLimit::new(3);
    let running = Gauge::default();
    let svc = ServiceBuilder::new()
        .layer(limit.clone())
        .service(service_fn({
            let running = running.clone();
            move |x: u32| {
                let guard = running.enter();
                async move {
                    sleep(ms(u64::from(1 + x % 5))).await;
                    drop(guard);
                    Ok::<_, Infallible>(x)
                }
            }
        }));
    let calls = (0..40u32).map(|x| svc.clone().oneshot(x));
    let out = futures::future::join_all(calls).await;
    assert!(out.iter().all(Result::is_ok));
    assert_eq!(running.max(), 3);
    assert_eq!(limit.in_use(), 0);

    // A unit held by a readied service comes back when the service is dropped.
    let mut ready = svc.clone();
    ready.ready().await.unwrap();
    assert_eq!(limit.in_use(), 1);
    drop(ready);
    assert_eq!(limit.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_layer_rejects_without_calling_the_service() {
    let breaker = CircuitBreaker::new(2, Duration::from_secs(10));
    let calls = Arc::new(AtomicU32::new(0));
    let svc = ServiceBuilder::new()
        .layer(breaker.clone())
        .service(service_fn({
            let calls = calls.clone();
            move |_: u32| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>("down") }
            }
        }));
    for _ in 0..2 {
        let err = svc.clone().oneshot(1).await.unwrap_err();
        assert_eq!(err, BreakerError::Failed("down"));
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    for _ in 0..3 {
        let err = svc.clone().oneshot(1).await.unwrap_err();
        assert_eq!(err, BreakerError::Open(()));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_call_layer_runs_every_attempt_through_the_shared_handles() {
    let log = Log::new();
    let limiter = RateLimiter::per(ms(100));
    let stats = CallStats::new("backend");
    let seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let policy = Call::layer()
        .rate_limit(&limiter)
        .timeout(Duration::from_secs(1))
        .retry(Backoff::fixed(ms(10)).max_attempts(3))
        .stats(&stats);
    let svc = ServiceBuilder::new().layer(policy).service(service_fn({
        let (log, seen) = (log.clone(), seen.clone());
        move |x: u32| {
            log.push();
            let first = seen.lock().unwrap().insert(x);
            async move { if first { Err("busy") } else { Ok(x) } }
        }
    }));
    // Two clones, two requests each; every request fails once, then succeeds: 8 attempts,
    // one cell each, so 0, 100, ..., 700 whatever the interleaving.
    let (a, b) = tokio::join!(
        async {
            let mut svc = svc.clone();
            for x in 0..2 {
                svc.ready().await.unwrap().call(x).await.unwrap();
            }
        },
        async {
            let mut svc = svc.clone();
            for x in 2..4 {
                svc.ready().await.unwrap().call(x).await.unwrap();
            }
        }
    );
    let ((), ()) = (a, b);
    assert_eq!(
        log.sorted(),
        (0..8).map(|i| ms(100 * i)).collect::<Vec<_>>()
    );
    let s = stats.snapshot();
    assert_eq!((s.calls, s.successes, s.retries), (4, 4, 4));
}

#[tokio::test(start_paused = true)]
async fn a_call_is_a_service() {
    let call = Call::new(|x: u32| async move { Ok::<_, String>(x + 1) }).timeout(ms(10));
    assert_eq!(call.clone().oneshot(1).await, Ok(2));
    let svc = ServiceBuilder::new()
        .layer(InFlightLimit::new(1))
        .service(call);
    assert_eq!(svc.oneshot(2).await, Ok(3));
}

#[tokio::test(start_paused = true)]
async fn layers_compose_in_a_service_builder() {
    let limiter = RateLimiter::per(ms(10));
    let limit = InFlightLimit::new(2);
    let breaker = CircuitBreaker::new(5, Duration::from_secs(1));
    let svc = ServiceBuilder::new()
        .layer(breaker.clone())
        .layer(limiter.clone())
        .layer(limit.clone())
        .service(service_fn(|x: u32| async move {
            sleep(ms(100)).await;
            Ok::<_, Infallible>(x)
        }));
    let start = Instant::now();
    let out = futures::future::join_all((0..4).map(|x| svc.clone().oneshot(x))).await;
    assert!(out.iter().all(Result::is_ok));
    // cells at 0 and 10 for the first two; the limit of 2 holds the others until 100 and 110.
    assert_eq!(start.elapsed(), ms(210));
    assert_eq!(limit.in_use(), 0);
}
