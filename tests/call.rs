//! `Call`: one policy stack around an async fn, on tokio's paused clock.

mod common;

use std::error::Error as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Gauge, Rng, panic_message};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};
use tokio_test::{assert_pending, task};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Instants (since `start`) recorded by a test function.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Duration>>>);

impl Log {
    fn push(&self, start: Instant) {
        self.0.lock().unwrap().push(start.elapsed());
    }

    fn get(&self) -> Vec<Duration> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test(start_paused = true)]
async fn each_retry_takes_a_cell_of_the_rate_limit() {
    let start = Instant::now();
    let log = Log::default();
    let limiter = RateLimiter::per(ms(100));
    let stats = CallStats::new("flaky");
    let tries = Arc::new(AtomicU32::new(0));
    let call = Call::new({
        let (log, tries) = (log.clone(), tries.clone());
        move |x: u32| {
            log.push(start);
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move { if n < 2 { Err("busy") } else { Ok(x) } }
        }
    })
    .rate_limit(&limiter)
    .retry(Backoff::fixed(ms(10)).max_attempts(3))
    .stats(&stats);

    assert_eq!(call.run(7).await, Ok(7));
    // 0: the first cell; 10: backoff over, the next cell is due at 100; 110 → 200.
    assert_eq!(log.get(), [0, 100, 200].map(ms));
    let s = stats.snapshot();
    assert_eq!((s.calls, s.successes, s.retries), (1, 1, 2));
    assert_eq!(s.limiter_wait, ms(180));
    assert_eq!(s.max, ms(200));
}

#[tokio::test(start_paused = true)]
async fn timeouts_count_as_breaker_failures_and_open_it() {
    let breaker = CircuitBreaker::new(3, Duration::from_secs(10));
    let calls = Arc::new(AtomicU32::new(0));
    let stats = CallStats::new("slow");
    let call = Call::new({
        let calls = calls.clone();
        move |_: ()| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                sleep(Duration::from_secs(1)).await;
                Ok::<_, String>(())
            }
        }
    })
    .timeout(ms(100))
    .circuit_breaker(&breaker)
    .stats(&stats);

    let start = Instant::now();
    for i in 1..=3 {
        let err = call.run(()).await.unwrap_err();
        assert!(
            matches!(err, CallError::Timeout { attempts: 1, .. }),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), ms(100 * i));
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    let err = call.run(()).await.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let s = stats.snapshot();
    assert_eq!((s.calls, s.failures, s.timeouts, s.rejected), (4, 4, 3, 1));
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_rejects_without_calling_f_or_taking_a_cell() {
    let breaker = CircuitBreaker::new(2, Duration::from_secs(10));
    let limiter = RateLimiter::per(Duration::from_secs(1));
    let calls = Arc::new(AtomicU32::new(0));
    let call = Call::new({
        let calls = calls.clone();
        move |_: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("down") }
        }
    })
    .circuit_breaker(&breaker)
    .rate_limit(&limiter);

    let start = Instant::now();
    for _ in 0..2 {
        let err = call.run(1).await.unwrap_err();
        assert_eq!(err.inner(), Some(&"down"));
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    let at_open = start.elapsed();
    assert_eq!(at_open, Duration::from_secs(1)); // the second attempt waited for its cell

    for _ in 0..5 {
        let err = call.run(1).await.unwrap_err();
        assert!(
            matches!(err, CallError::Rejected { attempts: 1, .. }),
            "{err:?}"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "f is not called while open"
    );
    assert_eq!(start.elapsed(), at_open, "a rejected attempt takes no cell");
}

#[tokio::test(start_paused = true)]
async fn retries_of_a_rejected_attempt_wait_out_the_backoff() {
    let breaker = CircuitBreaker::new(1, ms(250));
    let calls = Arc::new(AtomicU32::new(0));
    let call = Call::new({
        let calls = calls.clone();
        move |_: ()| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move { if n == 0 { Err("down") } else { Ok(n) } }
        }
    })
    .circuit_breaker(&breaker)
    .retry(Backoff::fixed(ms(100)).max_attempts(4));

    let start = Instant::now();
    // 0: fails, opens; 100, 200: rejected; 300: the half-open trial succeeds.
    assert_eq!(call.run(()).await, Ok(1));
    assert_eq!(start.elapsed(), ms(300));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_in_flight_cap_holds_across_clones_of_a_call() {
    let limit = InFlightLimit::new(3);
    let running = Gauge::default();
    let call = Call::new({
        let running = running.clone();
        move |ms_: u64| {
            let guard = running.enter();
            async move {
                sleep(ms(ms_)).await;
                drop(guard);
                Ok::<_, String>(ms_)
            }
        }
    })
    .in_flight(&limit);

    let mut rng = Rng::new(7);
    let streams = (0..4).map(|_| {
        let call = call.clone();
        let items: Vec<u64> = (0..50).map(|_| 1 + rng.below(20)).collect();
        stream::iter(items)
            .in_flight(10, move |x| call.run(x))
            .collect::<Vec<_>>()
    });
    let results = futures::future::join_all(streams).await;
    assert!(results.iter().flatten().all(Result::is_ok));
    assert_eq!(results.iter().map(Vec::len).sum::<usize>(), 200);
    assert_eq!(running.max(), 3);
    assert_eq!(limit.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn stats_count_what_happened() {
    // item 0: ok at once; 1: fails once; 2: always fails; 3: times out once; 4: slow.
    let tries: Arc<Vec<AtomicU32>> = Arc::new((0..5).map(|_| AtomicU32::new(0)).collect());
    let stats = CallStats::new("mixed");
    let call = Call::new({
        let tries = tries.clone();
        move |item: usize| {
            let n = tries[item].fetch_add(1, Ordering::SeqCst);
            async move {
                match (item, n) {
                    (1, 0) | (2, _) => Err(format!("item {item}")),
                    (3, 0) | (4, _) => {
                        sleep(Duration::from_secs(1)).await;
                        Ok(item)
                    }
                    _ => Ok(item),
                }
            }
        }
    })
    .timeout(ms(50))
    .retry(Backoff::fixed(ms(10)).max_attempts(3))
    .stats(&stats);

    let out: Vec<_> = stream::iter(0..4).then(|i| call.run(i)).collect().await;
    assert_eq!(out[0], Ok(0));
    assert_eq!(out[1], Ok(1));
    let err = out[2].clone().unwrap_err();
    assert_eq!(
        (err.attempts(), err.into_inner()),
        (3, Some("item 2".to_string()))
    );
    assert_eq!(out[3], Ok(3));

    let s = stats.snapshot();
    assert_eq!(
        (s.calls, s.successes, s.failures, s.cancelled),
        (4, 3, 1, 0)
    );
    assert_eq!((s.retries, s.timeouts, s.rejected), (1 + 2 + 1, 1, 0));
    // latencies: 0, 10, 20, 60 ms
    assert_eq!((s.max, s.mean), (ms(60), ms(90) / 4));
    let line = s.to_string();
    assert!(line.starts_with("mixed: 4 calls: 3 ok, 1 failed"), "{line}");

    // A run dropped half-way counts as cancelled.
    let mut run = task::spawn(call.run(4));
    assert_pending!(run.poll());
    drop(run);
    let s = stats.snapshot();
    assert_eq!(
        (s.calls, s.successes, s.failures, s.cancelled),
        (5, 3, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_a_run_gives_back_its_in_flight_unit_and_its_rate_limit_slot() {
    let start = Instant::now();
    let log = Log::default();
    let limit = InFlightLimit::new(1);
    let limiter = RateLimiter::per(ms(100));
    let call = Call::new({
        let log = log.clone();
        move |_: ()| {
            log.push(start);
            async {
                sleep(Duration::from_secs(3600)).await;
                Ok::<_, String>(())
            }
        }
    })
    .rate_limit(&limiter)
    .in_flight(&limit);

    let mut holding = task::spawn(call.run(())); // cell at 0, holds the unit
    assert_pending!(holding.poll());
    assert_eq!(limit.in_use(), 1);
    let mut waiting = task::spawn(call.run(())); // reserves the cell due at 100
    assert_pending!(waiting.poll());

    tokio::time::advance(ms(50)).await;
    drop(waiting);
    drop(holding);
    assert_eq!(limit.in_use(), 0, "the unit is given back");

    let mut next = task::spawn(call.run(()));
    assert_pending!(next.poll());
    tokio::time::advance(ms(50)).await;
    assert_pending!(next.poll());
    // The slot at 100 was given back, so this run got it (not the one at 200), and the unit.
    assert_eq!(log.get(), [0, 100].map(ms));
    assert_eq!(limit.in_use(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hundred_items_of_ten_ms_through_in_flight_twenty_take_fifty_ms() {
    let stats = CallStats::new("ten");
    let call = Call::new(|x: u32| async move {
        sleep(ms(10)).await;
        Ok::<_, String>(x)
    })
    .timeout(Duration::from_secs(1))
    .stats(&stats);
    let start = Instant::now();
    let out: Vec<_> = stream::iter(0..100u32)
        .in_flight(20, move |x| call.run(x))
        .collect()
        .await;
    assert_eq!(start.elapsed(), ms(50));
    assert_eq!(out.len(), 100);
    assert!(out.iter().all(Result::is_ok));
    let s = stats.snapshot();
    assert_eq!(
        (s.successes, s.p50, s.p99, s.max),
        (100, ms(10), ms(10), ms(10))
    );
}

#[tokio::test(start_paused = true)]
async fn calls_run_on_a_worker_pool() {
    let pool = WorkerPool::new(2);
    let call = Call::new(|x: u64| async move { Ok::<_, String>(x * 2) })
        .in_flight(4)
        .retry(Backoff::fixed(ms(1)));
    let out: Vec<_> = stream::iter(0..100u64)
        .fan_out_ordered(&pool, move |x| call.run(x))
        .collect()
        .await;
    assert_eq!(out, (0..100u64).map(|x| Ok(x * 2)).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn huge_durations_never_overflow() {
    let tries = Arc::new(AtomicU32::new(0));
    let call = Call::new({
        let tries = tries.clone();
        move |x: u32| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                sleep(ms(10)).await;
                if n == 0 { Err("once") } else { Ok(x) }
            }
        }
    })
    .timeout(Duration::MAX)
    .retry(Backoff::fixed(Duration::MAX).max_attempts(2));
    assert_eq!(call.run(5).await, Ok(5));

    let never =
        Call::new(|_: ()| std::future::pending::<Result<(), String>>()).timeout(Duration::MAX);
    let mut run = task::spawn(never.run(()));
    assert_pending!(run.poll());
    tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
    assert_pending!(run.poll());
}

#[tokio::test(start_paused = true)]
async fn retry_if_gives_up_at_once_on_a_permanent_error() {
    let calls = Arc::new(AtomicU32::new(0));
    let call = Call::new({
        let calls = calls.clone();
        move |_: ()| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("not found") }
        }
    })
    .retry_if(
        Backoff::fixed(ms(10)).max_attempts(5),
        |e: &CallError<&str>| e.inner() != Some(&"not found"),
    );
    let err = call.run(()).await.unwrap_err();
    assert_eq!((err.attempts(), calls.load(Ordering::SeqCst)), (1, 1));
}

#[test]
fn a_zero_timeout_is_refused_naming_the_parameter() {
    let call = || Call::new(|x: u32| async move { Ok::<_, String>(x) });
    let err = call().try_timeout(Duration::ZERO).unwrap_err();
    assert_eq!(err.parameter(), "timeout");
    assert!(call().try_timeout(ms(1)).is_ok());

    let panic = std::panic::catch_unwind(|| call().timeout(Duration::ZERO)).unwrap_err();
    assert!(panic_message(&*panic).contains("timeout"));
}

#[test]
fn the_zero_timeout_panic_points_at_the_caller() {
    let location = Arc::new(Mutex::new(None));
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new({
        let location = location.clone();
        move |info| {
            if let Some(l) = info.location() {
                *location.lock().unwrap() = Some((l.file().to_string(), l.line()));
            }
        }
    }));
    let line = line!() + 2;
    let result = std::panic::catch_unwind(|| {
        Call::new(|x: u32| async move { Ok::<_, String>(x) }).timeout(Duration::ZERO)
    });
    std::panic::set_hook(hook);
    assert!(result.is_err());
    let (file, at) = location
        .lock()
        .unwrap()
        .clone()
        .expect("the hook saw the panic");
    assert!(
        file.ends_with("call.rs") && file.contains("tests"),
        "{file}"
    );
    assert_eq!(at, line);
}

#[derive(Debug)]
struct Io;

impl std::fmt::Display for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset")
    }
}

impl std::error::Error for Io {}

#[tokio::test(start_paused = true)]
async fn errors_say_what_happened_and_chain_the_cause_once() {
    let failing = Call::new(|_: ()| async { Err::<(), _>(Io) }).retry(Backoff::fixed(ms(1)));
    let err = failing.run(()).await.unwrap_err();
    assert_eq!(err.to_string(), "call failed (after 3 attempts)");
    assert_eq!(err.source().unwrap().to_string(), "connection reset");
    assert!(!err.to_string().contains("connection reset"));

    let slow = Call::new(|_: ()| std::future::pending::<Result<(), Io>>()).timeout(ms(5));
    let err = slow.run(()).await.unwrap_err();
    assert_eq!(err.to_string(), "call timed out");
    assert!(err.source().is_none());
}

#[test]
fn calls_and_their_futures_are_send_sync_and_static() {
    fn send_sync_static<T: Send + Sync + Clone + 'static>(_: &T) {}
    fn send_static<T: Send + 'static>(_: &T) {}
    let call = Call::new(|x: u32| async move { Ok::<_, String>(x) })
        .timeout(ms(1))
        .rate_limit(RateLimiter::per_second(10))
        .in_flight(2)
        .circuit_breaker(CircuitBreaker::new(1, ms(1)))
        .retry(Backoff::fixed(ms(1)))
        .stats(CallStats::new("x"));
    send_sync_static(&call);
    send_sync_static(&CallStats::new("x"));
    let fut = call.run(1);
    send_static(&fut);
    let debug = format!("{call:?}");
    assert!(debug.contains("timeout"), "{debug}");
}

#[tokio::test(start_paused = true)]
async fn a_call_without_retry_needs_no_clone() {
    struct Body(#[allow(dead_code)] Vec<u8>); // not Clone
    let call = Call::new(|b: Body| async move { Ok::<_, String>(b.0.len()) }).timeout(ms(5));
    assert_eq!(call.run(Body(vec![1, 2, 3])).await, Ok(3));
}

/// The first attempt let through at once (every handle free) times out while `f` is pending:
/// the breaker counts it, the unit is given back, and the retry waits for a cell of the rate
/// limit and succeeds.
#[tokio::test(start_paused = true)]
async fn a_first_attempt_that_times_out_is_retried_after_waiting_for_a_cell() {
    let start = Instant::now();
    let log = Log::default();
    let limit = InFlightLimit::new(1);
    let limiter = RateLimiter::per(ms(100));
    let breaker = CircuitBreaker::new(3, Duration::from_secs(10));
    let stats = CallStats::new("slow first");
    let tries = Arc::new(AtomicU32::new(0));
    let call = Call::new({
        let (log, tries) = (log.clone(), tries.clone());
        move |x: u32| {
            log.push(start);
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                sleep(ms(if n == 0 { 1000 } else { 5 })).await;
                Ok::<_, String>(x)
            }
        }
    })
    .timeout(ms(30))
    .rate_limit(&limiter)
    .in_flight(&limit)
    .circuit_breaker(&breaker)
    .retry(Backoff::fixed(ms(10)).max_attempts(2))
    .stats(&stats);

    let mut run = task::spawn(call.run(7));
    assert_pending!(run.poll());
    assert_eq!(limit.in_use(), 1);
    tokio::time::advance(ms(30)).await;
    assert_pending!(run.poll()); // timed out: backing off
    assert_eq!(
        limit.in_use(),
        0,
        "the timed-out attempt gave its unit back"
    );
    assert_eq!(breaker.consecutive_failures(), 1);
    assert_eq!(run.await, Ok(7));
    // The retry's cell was due at 100 ms (the first took the one at 0).
    assert_eq!(log.get(), [0, 100].map(ms));
    assert_eq!(start.elapsed(), ms(105));
    assert_eq!(breaker.consecutive_failures(), 0);
    let s = stats.snapshot();
    assert_eq!(
        (s.calls, s.successes, s.failures, s.retries, s.timeouts),
        (1, 1, 0, 1, 1)
    );
    assert_eq!((s.max, s.limiter_wait), (ms(105), ms(60)));
}

/// A run whose first attempt is let through at once and dropped while `f` runs gives its unit
/// back and counts as cancelled; one that must wait for the unit runs once it is free.
#[tokio::test(start_paused = true)]
async fn a_run_waiting_for_the_unit_of_a_dropped_run_gets_it() {
    let limit = InFlightLimit::new(1);
    let stats = CallStats::new("units");
    let call = Call::new(|x: u64| async move {
        sleep(ms(x)).await;
        Ok::<_, String>(x)
    })
    .in_flight(&limit)
    .timeout(ms(500))
    .stats(&stats);

    let mut first = task::spawn(call.run(3_600_000));
    assert_pending!(first.poll());
    let mut second = task::spawn(call.run(20));
    assert_pending!(second.poll());
    tokio::time::advance(ms(100)).await;
    drop(first);
    assert!(second.is_woken());
    assert_eq!(limit.in_use(), 1, "handed to the waiting run");
    assert_pending!(second.poll()); // calls f
    tokio::time::advance(ms(20)).await;
    assert_eq!(second.await, Ok(20));
    assert_eq!(limit.in_use(), 0);
    let s = stats.snapshot();
    assert_eq!(
        (s.calls, s.successes, s.cancelled, s.timeouts),
        (2, 1, 1, 0)
    );
    // The second run waited 100 ms for its unit, then ran 20 ms.
    assert_eq!(s.max, ms(120));
}
