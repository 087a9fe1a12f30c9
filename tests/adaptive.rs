//! An adaptive `InFlightLimit` finds the concurrency a service handles best: against a
//! simulated service whose latency is flat up to a knee and grows in proportion beyond it, on
//! tokio's paused clock, the limit settles near the knee, follows it down, backs off on
//! failures and timeouts, stays within its bounds and is never exceeded by the streams that
//! share it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::sleep;

/// The latency of the service with no queue.
const FLOOR: Duration = Duration::from_millis(10);

/// A simulated service: `FLOOR` latency up to `knee` requests in flight, and
/// `FLOOR × in_flight / knee` beyond it (a request's latency is set by the count when it
/// arrives, itself included).
#[derive(Clone, Default)]
struct Service(Arc<State>);

#[derive(Default)]
struct State {
    knee: AtomicUsize,
    in_flight: AtomicUsize,
    most: AtomicUsize,
    failing: AtomicBool,
    hanging: AtomicBool,
}

/// Counts a request out of the service when its future ends or is dropped.
struct Leave(Arc<State>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service {
    fn new(knee: usize) -> Self {
        let service = Self::default();
        service.set_knee(knee);
        service
    }

    fn set_knee(&self, knee: usize) {
        self.0.knee.store(knee, Ordering::SeqCst);
    }

    /// How many requests are in the service now.
    fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests that were ever in the service at once.
    fn most(&self) -> usize {
        self.0.most.load(Ordering::SeqCst)
    }

    /// Makes every request fail (after its latency) while `on`.
    fn fail(&self, on: bool) {
        self.0.failing.store(on, Ordering::SeqCst);
    }

    /// Makes every request take an hour while `on`.
    fn hang(&self, on: bool) {
        self.0.hanging.store(on, Ordering::SeqCst);
    }

    /// A request: it enters the service at once (when called), then takes its latency.
    fn request(&self) -> impl Future<Output = Result<(), &'static str>> + Send + use<> {
        let state = &self.0;
        let n = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.most.fetch_max(n, Ordering::SeqCst);
        let knee = state.knee.load(Ordering::SeqCst);
        let latency = match state.hanging.load(Ordering::SeqCst) {
            true => Duration::from_secs(3600),
            false => FLOOR * n.max(knee) as u32 / knee as u32,
        };
        let failing = state.failing.load(Ordering::SeqCst);
        let leave = Leave(Arc::clone(state));
        async move {
            sleep(latency).await;
            drop(leave);
            if failing { Err("unavailable") } else { Ok(()) }
        }
    }
}

/// The median and the mean of the limits seen over the last `share` of `seen`.
fn settled(seen: &[usize], share: f64) -> (usize, f64) {
    let mut tail = seen[seen.len() - (seen.len() as f64 * share) as usize..].to_vec();
    let mean = tail.iter().sum::<usize>() as f64 / tail.len() as f64;
    tail.sort_unstable();
    (tail[tail.len() / 2], mean)
}

/// Asserts that the limit settled within 20% of `knee` (its median and its mean).
fn assert_near(seen: &[usize], share: f64, knee: usize) {
    let (median, mean) = settled(seen, share);
    let (low, high) = (knee as f64 * 0.8, knee as f64 * 1.2);
    assert!(
        (low..=high).contains(&(median as f64)) && (low..=high).contains(&mean),
        "median {median}, mean {mean:.1}, knee {knee}"
    );
}

/// Runs `n` requests through `limit` with `in_flight`, returning the limit seen after each.
async fn drive(service: &Service, limit: &InFlightLimit, n: usize) -> Vec<usize> {
    stream::iter(0..n)
        .in_flight(limit, |_| service.request())
        .map(|result| {
            result.unwrap();
            limit.current()
        })
        .collect()
        .await
}

#[tokio::test(start_paused = true)]
async fn settles_near_the_knee_through_in_flight() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(1, 1000);
    let seen = drive(&service, &limit, 20_000).await;
    assert_near(&seen, 0.5, 32);
    assert_eq!(limit.in_use(), 0);
    assert_eq!(service.in_flight(), 0);
    // It went over the knee to find it, but not far: slow start doubles at most once past it.
    assert!(service.most() <= 64, "{}", service.most());
}

#[tokio::test(start_paused = true)]
async fn settles_near_the_knee_through_in_flight_ordered() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(1, 1000);
    let seen: Vec<usize> = stream::iter(0..20_000)
        .in_flight_ordered(&limit, |_| service.request())
        .map(|_| limit.current())
        .collect()
        .await;
    assert_near(&seen, 0.5, 32);
}

#[tokio::test(start_paused = true)]
async fn settles_near_the_knee_through_a_call() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(1, 1000);
    let call = {
        let service = service.clone();
        Call::new(move |_: usize| service.request()).in_flight(&limit)
    };
    // The stream offers many more calls than the limit lets through: they wait in the call.
    let seen: Vec<usize> = stream::iter(0..20_000)
        .in_flight(1000, |i| call.run(i))
        .map(|result| {
            result.unwrap();
            limit.current()
        })
        .collect()
        .await;
    assert_near(&seen, 0.5, 32);
    assert!(service.most() <= 64, "{}", service.most());
}

#[tokio::test(start_paused = true)]
async fn follows_the_knee_down() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(1, 1000);
    let before = drive(&service, &limit, 10_000).await;
    assert_near(&before, 0.5, 32);

    service.set_knee(16);
    let after = drive(&service, &limit, 10_000).await;
    assert_near(&after, 0.5, 16);
    // And back up when the service recovers.
    service.set_knee(32);
    let again = drive(&service, &limit, 10_000).await;
    assert_near(&again, 0.5, 32);
}

#[tokio::test(start_paused = true)]
async fn follows_the_knee_down_through_a_call() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(1, 1000);
    let call = {
        let service = service.clone();
        Call::new(move |_: usize| service.request()).in_flight(&limit)
    };
    let run = |n: usize| {
        stream::iter(0..n)
            .in_flight(1000, |i| call.run(i))
            .map(|_| limit.current())
            .collect::<Vec<_>>()
    };
    assert_near(&run(10_000).await, 0.5, 32);
    service.set_knee(16);
    assert_near(&run(10_000).await, 0.5, 16);
}

#[tokio::test(start_paused = true)]
async fn failures_make_it_back_off_through_try_in_flight() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(2, 1000);
    let run = |n: usize| {
        stream::iter((0..n).map(Ok::<_, &str>))
            .try_in_flight(&limit, |_| service.request())
            .map(|result| (result.is_err(), limit.current()))
            .collect::<Vec<_>>()
    };
    let healthy: Vec<usize> = run(10_000).await.into_iter().map(|(_, l)| l).collect();
    assert_near(&healthy, 0.5, 32);

    // Every call fails: each failure takes 10% off, down to `min`.
    service.fail(true);
    let failing = run(500).await;
    assert!(failing.iter().all(|&(failed, _)| failed));
    assert!(failing.windows(2).all(|w| w[1].1 <= w[0].1), "never up");
    assert_eq!(limit.current(), 2);

    // It comes back once calls succeed again.
    service.fail(false);
    let recovered: Vec<usize> = run(10_000).await.into_iter().map(|(_, l)| l).collect();
    assert_near(&recovered, 0.5, 32);
}

#[tokio::test(start_paused = true)]
async fn upstream_errors_are_not_failures() {
    // An `Err` from upstream passes through without a unit: it says nothing of the service.
    let limit = InFlightLimit::adaptive(4, 1000);
    let errors = stream::iter((0..100).map(|_| Err::<u32, &str>("bad input")))
        .try_in_flight(&limit, |x| async move { Ok(x) })
        .filter(|r| futures::future::ready(r.is_err()))
        .count()
        .await;
    assert_eq!(errors, 100);
    assert_eq!(limit.current(), 4);
    assert_eq!(limit.history().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn failures_and_timeouts_make_it_back_off_through_a_call() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(2, 1000);
    let call = {
        let service = service.clone();
        Call::new(move |_: usize| service.request())
            .timeout(Duration::from_secs(1))
            .in_flight(&limit)
    };
    // Few enough calls waiting that none times out while the service is healthy (the timeout
    // covers the wait for a unit).
    let run = |n: usize| {
        stream::iter(0..n)
            .in_flight(64, |i| call.run(i))
            .map(|result| (result, limit.current()))
            .collect::<Vec<_>>()
    };
    let healthy = run(10_000).await;
    let settled_at = limit.current();
    assert!(settled_at >= 16, "{settled_at}");

    // The service hangs: every attempt times out, and the limit falls to `min`.
    service.hang(true);
    let hung = run(300).await;
    assert!(
        hung.iter()
            .all(|(r, _)| r.as_ref().unwrap_err().is_timeout())
    );
    assert_eq!(limit.current(), 2);
    assert_eq!(service.in_flight(), 0, "timed-out requests were dropped");
    service.hang(false);
    let back = run(10_000).await;
    assert!(back.iter().all(|(r, _)| r.is_ok()));
    let limits: Vec<usize> = back.iter().map(|&(_, l)| l).collect();
    assert_near(&limits, 0.5, 32);

    // The service fails fast: every failure is a drop too.
    service.fail(true);
    let failed = run(300).await;
    assert!(
        failed
            .iter()
            .all(|(r, _)| r.as_ref().unwrap_err().is_failed())
    );
    assert_eq!(limit.current(), 2);
    assert!(healthy.iter().all(|(r, _)| r.is_ok()));
}

#[tokio::test(start_paused = true)]
async fn never_leaves_its_bounds() {
    // A knee above `max`: the limit climbs to `max` and stops there.
    let service = Service::new(64);
    let limit = InFlightLimit::adaptive(8, 24);
    let seen = drive(&service, &limit, 5_000).await;
    assert!(seen.iter().all(|l| (8..=24).contains(l)));
    assert_eq!(settled(&seen, 0.5).0, 24);
    assert!(service.most() <= 24, "{}", service.most());

    // Failures push it down to `min` and no further.
    service.fail(true);
    let failed: Vec<usize> = stream::iter((0..1_000).map(Ok::<_, &str>))
        .try_in_flight(&limit, |_| service.request())
        .map(|_| limit.current())
        .collect()
        .await;
    assert!(failed.iter().all(|l| (8..=24).contains(l)));
    assert_eq!(limit.current(), 8);
    let history = limit.history();
    assert!(history.iter().all(|&(_, l)| (8..=24).contains(&l)));
    assert!(history.len() <= 64);
    assert!(history.windows(2).all(|w| w[0].0 <= w[1].0), "oldest first");
}

#[tokio::test(start_paused = true)]
async fn two_streams_sharing_it_never_exceed_the_current_limit() {
    let service = Service::new(32);
    let limit = InFlightLimit::adaptive(1, 1000);
    let checked = AtomicUsize::new(0);
    // At every start, what both streams have in flight (this request included) is within the
    // limit as it stands then, however it moved meanwhile.
    let start = |_| {
        let in_flight = service.in_flight() + 1;
        assert!(
            in_flight <= limit.current(),
            "{in_flight} in flight, limit {}",
            limit.current()
        );
        assert!(limit.in_use() <= limit.current());
        checked.fetch_add(1, Ordering::Relaxed);
        service.request()
    };
    let a = stream::iter(0..10_000).in_flight(&limit, start).count();
    let b = stream::iter(0..10_000)
        .in_flight_ordered(&limit, start)
        .count();
    // Halfway through, the service slows: the limit drops below what is in flight.
    let slow_down = async {
        sleep(Duration::from_secs(2)).await;
        service.set_knee(8);
    };
    let (a, b, ()) = tokio::join!(a, b, slow_down);
    assert_eq!((a, b), (10_000, 10_000));
    assert_eq!(checked.load(Ordering::Relaxed), 20_000);
    assert!(limit.current() <= 12, "{}", limit.current());
    assert_eq!(limit.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_operation_reports_nothing() {
    let limit = InFlightLimit::adaptive(4, 64);
    let mut stuck =
        Box::pin(stream::iter(0..10).in_flight(&limit, |_| futures::future::pending::<()>()));
    assert!(futures::poll!(stuck.next()).is_pending());
    assert_eq!(limit.in_use(), 4);
    drop(stuck);
    assert_eq!(limit.in_use(), 0);
    assert_eq!(limit.current(), 4);
    assert_eq!(limit.history().len(), 1);
    // A cancelled call reports nothing either (a timed-out one would).
    let call = Call::new(|_: ()| async {
        sleep(Duration::from_secs(10)).await;
        Ok::<_, String>(())
    })
    .in_flight(&limit);
    let run = call.run(());
    assert!(
        tokio::time::timeout(Duration::from_secs(1), run)
            .await
            .is_err()
    );
    assert_eq!(limit.in_use(), 0);
    assert_eq!(limit.history().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn run_reports_its_latency() {
    let service = Service::new(8);
    let limit = InFlightLimit::adaptive(1, 1000);
    let calls = (0..5_000).map(|_| limit.run(async { service.request().await }));
    let results = stream::iter(calls)
        .buffer_unordered(1000)
        .try_collect::<Vec<()>>()
        .await;
    assert_eq!(results.unwrap().len(), 5_000);
    // Through `run`, the limit settles near the knee just the same.
    assert!((6..=10).contains(&limit.current()) || (3..=5).contains(&limit.current()));
    assert!(service.most() <= 16, "{}", service.most());
}

#[test]
fn fixed_limits_do_not_move() {
    let limit = InFlightLimit::new(8);
    assert!(!limit.is_adaptive());
    assert_eq!(limit.current(), 8);
    assert!(limit.history().is_empty());
    let adaptive = InFlightLimit::adaptive(2, 16).named("db");
    assert!(adaptive.is_adaptive());
    assert_eq!(adaptive.name(), Some("db"));
    let debug = format!("{adaptive:?}");
    for part in ["\"db\"", "limit: 2", "min: 2", "max: 16", "in_use: 0"] {
        assert!(debug.contains(part), "{debug}");
    }
}

#[cfg(feature = "tower")]
#[tokio::test(start_paused = true)]
async fn a_tower_layer_reports_each_call() {
    use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

    let limit = InFlightLimit::adaptive(1, 8);
    let mut svc = ServiceBuilder::new()
        .layer(limit.clone())
        .service(service_fn(|x: u32| async move {
            sleep(FLOOR).await;
            Ok::<_, std::convert::Infallible>(x)
        }));
    for x in 0..100 {
        assert_eq!(svc.ready().await.unwrap().call(x).await, Ok(x));
    }
    // One call at a time: the limit grows to what that uses (twice it, in slow start), no more.
    assert_eq!(limit.current(), 2);
    assert_eq!(limit.history().len(), 2);
    assert_eq!(limit.in_use(), 0);
}
