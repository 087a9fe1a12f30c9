//! `retry`, `retry_if` and `Backoff` on a paused clock.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, advance, sleep};
use tokio_test::{assert_pending, assert_ready, assert_ready_eq, task};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A call log: the virtual instant (since `start`) of every attempt, per item.
#[derive(Clone)]
struct Log {
    start: Instant,
    calls: Arc<Mutex<Vec<(u32, Duration)>>>,
}

impl Log {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            calls: Arc::default(),
        }
    }

    fn record(&self, item: u32) {
        self.calls
            .lock()
            .unwrap()
            .push((item, self.start.elapsed()));
    }

    fn times(&self, item: u32) -> Vec<Duration> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(i, _)| *i == item)
            .map(|(_, t)| *t)
            .collect()
    }
}

/// An operation that fails `failures` times for every item, then succeeds with `item * 10`.
fn flaky(
    log: &Log,
    failures: u32,
) -> impl FnMut(u32) -> futures::future::Ready<Result<u32, String>> + use<> {
    let log = log.clone();
    let counts = Arc::new(Mutex::new(std::collections::HashMap::<u32, u32>::new()));
    move |item| {
        log.record(item);
        let mut counts = counts.lock().unwrap();
        let n = counts.entry(item).or_default();
        *n += 1;
        futures::future::ready(if *n > failures {
            Ok(item * 10)
        } else {
            Err(format!("item {item} attempt {n}"))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn fixed_backoff_attempt_times_and_the_item_back() {
    let log = Log::new();
    let out: Vec<_> = stream::iter([7u32])
        .retry(
            Backoff::fixed(ms(10)).max_attempts(3),
            flaky(&log, u32::MAX),
        )
        .collect()
        .await;
    assert_eq!(
        out,
        [Err(RetryError {
            item: 7,
            error: String::from("item 7 attempt 3"),
            attempts: 3,
        })]
    );
    assert_eq!(log.times(7), [0, 10, 20].map(ms));
}

#[tokio::test(start_paused = true)]
async fn default_is_three_attempts() {
    let log = Log::new();
    let out: Vec<_> = stream::iter([1u32])
        .retry(Backoff::fixed(ms(5)), flaky(&log, u32::MAX))
        .collect()
        .await;
    assert_eq!(out[0].as_ref().unwrap_err().attempts, 3);
    assert_eq!(log.times(1).len(), 3);
}

#[tokio::test(start_paused = true)]
async fn exponential_backoff_doubles() {
    let log = Log::new();
    let out: Vec<_> = stream::iter([1u32])
        .retry(
            Backoff::exponential(ms(10)).max_attempts(5),
            flaky(&log, u32::MAX),
        )
        .collect()
        .await;
    assert_eq!(out[0].as_ref().unwrap_err().attempts, 5);
    assert_eq!(log.times(1), [0, 10, 30, 70, 150].map(ms));
}

#[tokio::test(start_paused = true)]
async fn max_delay_caps_the_waits() {
    let log = Log::new();
    let _: Vec<_> = stream::iter([1u32])
        .retry(
            Backoff::exponential(ms(10))
                .max_delay(ms(25))
                .max_attempts(5),
            flaky(&log, u32::MAX),
        )
        .collect()
        .await;
    assert_eq!(log.times(1), [0, 10, 30, 55, 80].map(ms));

    let log = Log::new();
    let _: Vec<_> = stream::iter([1u32])
        .retry(
            Backoff::fixed(ms(40)).max_delay(ms(15)),
            flaky(&log, u32::MAX),
        )
        .collect()
        .await;
    assert_eq!(log.times(1), [0, 15, 30].map(ms));
}

#[tokio::test(start_paused = true)]
async fn success_after_failures_and_items_in_order() {
    let log = Log::new();
    let start = Instant::now();
    let out: Vec<_> = stream::iter(1..=3u32)
        .retry(Backoff::fixed(ms(10)).max_attempts(4), flaky(&log, 2))
        .collect()
        .await;
    assert_eq!(out, [Ok(10), Ok(20), Ok(30)]);
    // One item at a time: each takes two waits, and the next starts when it is done.
    assert_eq!(log.times(1), [0, 10, 20].map(ms));
    assert_eq!(log.times(2), [20, 30, 40].map(ms));
    assert_eq!(log.times(3), [40, 50, 60].map(ms));
    assert_eq!(start.elapsed(), ms(60));
}

#[tokio::test(start_paused = true)]
async fn upstream_is_not_pulled_while_an_item_waits() {
    let pulled = Arc::new(AtomicU32::new(0));
    let upstream = stream::iter(0..3u32).inspect({
        let pulled = pulled.clone();
        move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        }
    });
    let log = Log::new();
    let mut s = task::spawn(upstream.retry(Backoff::fixed(ms(100)), flaky(&log, 1)));
    assert_pending!(s.poll_next()); // item 0 failed once, waits 100 ms
    assert_eq!(pulled.load(Ordering::SeqCst), 1);
    advance(ms(99)).await;
    assert_pending!(s.poll_next());
    assert_eq!(pulled.load(Ordering::SeqCst), 1);
    advance(ms(1)).await;
    assert!(s.is_woken());
    assert_ready_eq!(s.poll_next(), Some(Ok(0)));
    assert_eq!(pulled.load(Ordering::SeqCst), 1);
    assert_pending!(s.poll_next());
    assert_eq!(pulled.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_if_stops_at_a_permanent_error() {
    #[derive(Debug, Clone, PartialEq)]
    enum Error {
        Busy,
        Gone,
    }
    let calls = Arc::new(AtomicU32::new(0));
    let out: Vec<_> = stream::iter([1u32, 2])
        .retry_if(
            Backoff::fixed(ms(10)).max_attempts(5),
            {
                let calls = calls.clone();
                move |item| {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        match (item, n) {
                            (1, 0) => Err(Error::Busy),
                            (1, _) => Err(Error::Gone),
                            _ => Ok(item),
                        }
                    }
                }
            },
            |e: &Error| *e == Error::Busy,
        )
        .collect()
        .await;
    assert_eq!(
        out,
        [
            Err(RetryError {
                item: 1,
                error: Error::Gone,
                attempts: 2,
            }),
            Ok(2)
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn works_on_a_not_unpin_upstream_with_async_attempts() {
    let upstream = stream::iter(0..4u32).then(|i| async move {
        sleep(ms(1)).await;
        i
    });
    let attempts = Arc::new(AtomicU32::new(0));
    let s = upstream.retry(Backoff::exponential(ms(2)).max_attempts(2), {
        let attempts = attempts.clone();
        move |i| {
            let first = attempts.fetch_add(1, Ordering::SeqCst) % 2 == 0;
            async move {
                sleep(ms(3)).await;
                if first { Err("first") } else { Ok(i * 2) }
            }
        }
    });
    let mut s: Pin<Box<dyn Stream<Item = _> + Send>> = Box::pin(s);
    let start = Instant::now();
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        out.push(r.unwrap());
    }
    assert_eq!(out, [0, 2, 4, 6]);
    // per item: 1 ms upstream + 3 ms attempt + 2 ms wait + 3 ms attempt
    assert_eq!(start.elapsed(), ms(4 * 9));
}

#[tokio::test(start_paused = true)]
async fn a_zero_delay_retries_at_once() {
    let log = Log::new();
    let out: Vec<_> = stream::iter([3u32])
        .retry(
            Backoff::fixed(Duration::ZERO).max_attempts(4),
            flaky(&log, 3),
        )
        .collect()
        .await;
    assert_eq!(out, [Ok(30)]);
    assert_eq!(log.times(3), [0, 0, 0, 0].map(ms));
}

#[tokio::test(start_paused = true)]
async fn jittered_waits_stay_within_the_nominal_delay() {
    let backoff = Backoff::exponential(ms(100)).max_delay(ms(300)).jitter();
    for attempt in 1..6 {
        let nominal = backoff.nominal_delay_after(attempt);
        let draws: Vec<Duration> = (0..200).map(|_| backoff.delay_after(attempt)).collect();
        assert!(draws.iter().all(|d| *d <= nominal), "attempt {attempt}");
        assert!(draws.iter().any(|d| *d != draws[0]), "draws vary");
        assert!(draws.iter().any(|d| *d < nominal / 2) && draws.iter().any(|d| *d > nominal / 2));
    }
    // and in the stream: every gap between attempts lies in [0, nominal]
    let log = Log::new();
    let _: Vec<_> = stream::iter([1u32])
        .retry(backoff.clone().max_attempts(6), flaky(&log, u32::MAX))
        .collect()
        .await;
    let times = log.times(1);
    assert_eq!(times.len(), 6);
    for (n, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        assert!(
            gap <= backoff.nominal_delay_after(n as u32 + 1),
            "gap {n}: {gap:?}"
        );
    }
}

#[test]
fn delays_saturate_instead_of_overflowing() {
    let backoff = Backoff::exponential(Duration::from_secs(1 << 40)).max_attempts(u32::MAX);
    assert_eq!(backoff.nominal_delay_after(100), Duration::MAX);
    assert_eq!(backoff.nominal_delay_after(1), Duration::from_secs(1 << 40));
    assert_eq!(Backoff::fixed(ms(10)).nominal_delay_after(1000), ms(10));
}

/// `n` nanoseconds, for `n` beyond `u64`.
fn nanos(n: u128) -> Duration {
    let secs = u64::try_from(n / 1_000_000_000).unwrap();
    Duration::new(secs, (n % 1_000_000_000) as u32)
}

#[test]
fn exponential_delays_double_exactly_past_32_doublings_then_saturate() {
    let backoff = Backoff::exponential(Duration::from_nanos(1)).max_attempts(u32::MAX);
    for n in 1..=70u32 {
        assert_eq!(
            backoff.nominal_delay_after(n),
            nanos(1 << (n - 1)),
            "attempt {n}"
        );
    }
    // Doubling goes on up to the largest `Duration`, then stays there.
    let max_nanos = Duration::MAX.as_nanos();
    let mut previous = Duration::ZERO;
    for n in 1..=300u32 {
        let delay = backoff.nominal_delay_after(n);
        assert!(delay >= previous, "attempt {n}: {delay:?} < {previous:?}");
        let doubled = 1u128.checked_shl(n - 1).filter(|d| *d <= max_nanos);
        assert_eq!(delay, doubled.map_or(Duration::MAX, nanos), "attempt {n}");
        previous = delay;
    }
    assert_eq!(backoff.nominal_delay_after(95), Duration::MAX);
    assert_eq!(backoff.nominal_delay_after(94), nanos(1 << 93));
    assert_eq!(backoff.nominal_delay_after(u32::MAX), Duration::MAX);

    // Any initial delay, not only powers of two.
    let backoff = Backoff::exponential(ms(300)).max_attempts(u32::MAX);
    assert_eq!(
        backoff.nominal_delay_after(40),
        ms(300) * (1 << 20) * (1 << 19)
    );

    // `max_delay` still caps, whatever the attempt.
    let capped = Backoff::exponential(Duration::from_nanos(1)).max_delay(Duration::from_secs(1));
    assert_eq!(capped.nominal_delay_after(30), nanos(1 << 29));
    for n in [31, 33, 64, 70, 95, 1000, u32::MAX] {
        assert_eq!(
            capped.nominal_delay_after(n),
            Duration::from_secs(1),
            "attempt {n}"
        );
    }
}

#[test]
fn jitter_draws_from_the_whole_nominal_delay() {
    // Beyond `u64::MAX` nanoseconds (584 years) too.
    let backoff = Backoff::fixed(Duration::MAX).jitter();
    let draws: Vec<Duration> = (0..20).map(|_| backoff.delay_after(1)).collect();
    let u64_nanos = Duration::from_nanos(u64::MAX);
    assert!(draws.iter().any(|d| *d > u64_nanos), "{draws:?}");
}

/// An operation that always fails.
fn always_fails(log: &Log) -> impl FnMut(u32) -> futures::future::Ready<Result<u32, String>> {
    flaky(log, u32::MAX)
}

#[tokio::test(start_paused = true)]
async fn the_stream_waits_out_exponential_delays_past_32_doublings() {
    // 40 attempts from 1 ns: the 33rd to 39th waits are 2^32 to 2^38 ns (4.3 to 275 s).
    let log = Log::new();
    let out: Vec<_> = stream::iter([1u32])
        .retry(
            Backoff::exponential(Duration::from_nanos(1)).max_attempts(40),
            always_fails(&log),
        )
        .collect()
        .await;
    assert_eq!(out[0].as_ref().unwrap_err().attempts, 40);
    let times = log.times(1);
    assert_eq!(times.len(), 40);
    for (n, pair) in (1u32..).zip(times.windows(2)) {
        let gap = pair[1] - pair[0];
        let nominal = nanos(1 << (n - 1));
        // tokio's timer has millisecond resolution: a wait ends within 1 ms after it is due.
        assert!(
            gap >= nominal && gap <= nominal + ms(1),
            "wait {n}: {gap:?}"
        );
    }
}

const YEAR: Duration = Duration::from_secs(365 * 86_400);

#[tokio::test(start_paused = true)]
async fn a_wait_too_long_for_the_clock_waits_without_panicking() {
    // The stream: the item waits (no `Instant` is `Duration::MAX` away), then goes with the
    // stream.
    let log = Log::new();
    let mut s =
        task::spawn(stream::iter([1u32]).retry(Backoff::fixed(Duration::MAX), always_fails(&log)));
    assert_pending!(s.poll_next());
    advance(10 * YEAR).await;
    assert!(!s.is_woken());
    assert_pending!(s.poll_next());
    assert_eq!(log.times(1).len(), 1);
    drop(s);

    // The same policy around one call.
    let log = Log::new();
    let mut op = always_fails(&log);
    let mut call = task::spawn(Backoff::fixed(Duration::MAX).retry(|| op(2)));
    assert_pending!(call.poll());
    advance(10 * YEAR).await;
    assert_pending!(call.poll());
    assert_eq!(log.times(2).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn saturated_waits_are_clamped_as_tokio_clamps_a_sleep() {
    // From the 61st failure on, the nominal wait (2^60 ns and up, then `Duration::MAX`) is
    // beyond the 30 years tokio's `sleep` waits at most: the stream waits 30 years too.
    let log = Log::new();
    let out: Vec<_> = stream::iter([1u32])
        .retry(
            Backoff::exponential(Duration::from_nanos(1)).max_attempts(100),
            always_fails(&log),
        )
        .collect()
        .await;
    assert_eq!(out[0].as_ref().unwrap_err().attempts, 100);
    let times = log.times(1);
    assert_eq!(times.len(), 100);
    let longest = 30 * YEAR;
    for (n, pair) in (1u32..).zip(times.windows(2)) {
        let gap = pair[1] - pair[0];
        let due = nanos((1 << (n - 1)).min(longest.as_nanos()));
        assert!(gap >= due && gap <= due + ms(1), "wait {n}: {gap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_retry_wraps_any_async_call() {
    let log = Log::new();
    let mut op = flaky(&log, 2);
    let result = Backoff::exponential(ms(10))
        .max_attempts(3)
        .retry(|| op(5))
        .await;
    assert_eq!(result, Ok(50));
    assert_eq!(log.times(5), [0, 10, 30].map(ms));

    let log = Log::new();
    let mut op = flaky(&log, u32::MAX);
    let result = Backoff::fixed(ms(1)).max_attempts(2).retry(|| op(6)).await;
    assert_eq!(result, Err(String::from("item 6 attempt 2")));

    let calls = AtomicU32::new(0);
    let result: Result<(), &str> = Backoff::fixed(ms(1))
        .retry_if(
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("permanent") }
            },
            |_| false,
        )
        .await;
    assert_eq!(
        (result, calls.load(Ordering::SeqCst)),
        (Err("permanent"), 1)
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_retry_futures_own_the_policy() {
    // The future does not borrow the policy: it can be built in a closure and spawned.
    let backoff = Backoff::fixed(ms(10)).max_attempts(2);
    let make =
        move |x: u32| backoff.retry(move || async move { if x > 0 { Ok(x) } else { Err(x) } });
    let handles: Vec<_> = (0..3).map(|x| tokio::spawn(make(x))).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    assert_eq!(out, [Err(0), Ok(1), Ok(2)]);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_drops_the_attempt_in_progress() {
    struct Flag(Arc<AtomicU32>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicU32::new(0));
    let mut s = task::spawn(stream::iter([1u32]).retry(Backoff::fixed(ms(1)), {
        let dropped = dropped.clone();
        move |_| {
            let flag = Flag(dropped.clone());
            async move {
                sleep(ms(1000)).await;
                drop(flag);
                Ok::<(), ()>(())
            }
        }
    }));
    assert_pending!(s.poll_next());
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    drop(s);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn fused_and_size_hint() {
    use futures::stream::FusedStream;
    let mut s = task::spawn(
        stream::iter(0..2u32).retry(Backoff::fixed(ms(1)), |i| async move { Ok::<_, ()>(i) }),
    );
    assert_eq!(s.size_hint(), (2, Some(2)));
    assert_ready_eq!(s.poll_next(), Some(Ok(0)));
    assert_ready!(s.poll_next());
    assert!(!s.enter(|_, s| s.is_terminated()));
    assert_ready_eq!(s.poll_next(), None);
    assert!(s.enter(|_, s| s.is_terminated()));
}

#[test]
fn retry_error_display_and_source() {
    let e = RetryError {
        item: 1u32,
        error: std::io::Error::other("refused"),
        attempts: 3,
    };
    assert_eq!(e.to_string(), "gave up after 3 attempts: refused");
    let one = RetryError {
        item: (),
        error: "x",
        attempts: 1,
    };
    assert_eq!(one.to_string(), "gave up after 1 attempt: x");
    let _: &dyn std::error::Error = &e;
}

#[test]
#[should_panic(expected = "`n`")]
fn zero_attempts_panics_naming_n() {
    let _ = Backoff::fixed(ms(1)).max_attempts(0);
}

#[test]
#[should_panic(expected = "`initial`")]
fn zero_initial_exponential_panics_naming_initial() {
    let _ = Backoff::exponential(Duration::ZERO);
}

#[test]
fn backoff_accessors() {
    let b = Backoff::exponential(ms(10)).max_attempts(7);
    assert_eq!(b.attempts(), 7);
    assert_eq!(b.clone(), b);
    assert!(format!("{b:?}").contains("max_attempts: 7"));
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Backoff>();
}
