//! No duration, however large, panics: every deadline computed from a user's duration
//! saturates. One test per operator or handle, each with `Duration::MAX` on a paused clock: it
//! must not panic, and must still behave as the operator promises (a wait that never ends in
//! practice, items that still flow where they do not depend on it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_eq, task};

const MAX: Duration = Duration::MAX;
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// An operation that always fails, counting its calls.
fn always_fails(
    calls: &Arc<AtomicU32>,
) -> impl Fn(u32) -> std::future::Ready<Result<u32, String>> + Send + Sync + use<> {
    let calls = Arc::clone(calls);
    move |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err("down".to_string()))
    }
}

/// Feeds `items` to `operator` through a channel that stays open: nothing comes out within a
/// year (no timer fires, no panic). Then ends the input and returns what the stream yields next.
async fn after_a_year_and_the_end<T, S>(
    items: impl IntoIterator<Item = T>,
    operator: impl FnOnce(mpsc::UnboundedReceiver<T>) -> S,
) -> Option<S::Item>
where
    S: Stream<Item: std::fmt::Debug>,
{
    let (tx, rx) = mpsc::unbounded();
    let mut out = task::spawn(operator(rx));
    for item in items {
        tx.unbounded_send(item).unwrap();
    }
    assert_pending!(out.poll_next());
    advance(YEAR).await;
    assert!(!out.is_woken(), "no timer fires within a year");
    assert_pending!(out.poll_next());
    drop(tx);
    assert_ready!(out.poll_next())
}

#[tokio::test(start_paused = true)]
async fn batch_with_an_endless_wait_emits_full_batches_and_the_tail() {
    let batches: Vec<Vec<u32>> = stream::iter(0..7).batch(3, MAX).collect().await;
    assert_eq!(batches, [vec![0, 1, 2], vec![3, 4, 5], vec![6]]);

    // A partial batch waits for more items, however long, and goes out when the input ends.
    let tail = after_a_year_and_the_end([1, 2], |rx| rx.batch(3, MAX)).await;
    assert_eq!(tail, Some(vec![1, 2]));
}

#[tokio::test(start_paused = true)]
async fn batch_dedupe_with_an_endless_wait_emits_full_batches_and_the_tail() {
    let batches: Vec<Vec<u32>> = stream::iter([1, 2, 1, 3, 4, 4, 5])
        .batch_dedupe(3, MAX, |x| *x)
        .collect()
        .await;
    assert_eq!(batches, [vec![1, 2, 3], vec![4, 5]]);

    let tail = after_a_year_and_the_end([7, 7], |rx| rx.batch_dedupe(3, MAX, |x: &u32| *x)).await;
    assert_eq!(tail, Some(vec![7]));
}

#[tokio::test(start_paused = true)]
async fn try_batch_with_an_endless_wait_emits_full_batches_and_the_tail() {
    let rows = stream::iter([Ok(1), Ok(2), Ok(3), Ok(4), Err("torn"), Ok(5)]);
    let batches: Vec<Result<Vec<u32>, &str>> = rows.try_batch(3, MAX).collect().await;
    assert_eq!(
        batches,
        [Ok(vec![1, 2, 3]), Ok(vec![4]), Err("torn"), Ok(vec![5])]
    );

    let tail = after_a_year_and_the_end([Ok::<u32, String>(1)], |rx| rx.try_batch(3, MAX)).await;
    assert_eq!(tail, Some(Ok(vec![1])));
}

#[tokio::test(start_paused = true)]
async fn debounce_with_an_endless_quiet_emits_the_last_item_at_the_end() {
    let last = after_a_year_and_the_end([1, 2, 3], |rx| rx.debounce(MAX)).await;
    assert_eq!(last, Some(3));
}

#[tokio::test(start_paused = true)]
async fn dedupe_by_with_an_endless_window_remembers_a_key_for_years() {
    let (tx, rx) = mpsc::unbounded();
    let mut once = task::spawn(rx.dedupe_by(MAX, 16, |x: &u32| *x));
    tx.unbounded_send(1).unwrap();
    assert_ready_eq!(once.poll_next(), Some(1));
    advance(10 * YEAR).await;
    tx.unbounded_send(1).unwrap();
    tx.unbounded_send(2).unwrap();
    assert_ready_eq!(once.poll_next(), Some(2));
    drop(tx);
    assert_ready_eq!(once.poll_next(), None);
}

#[tokio::test(start_paused = true)]
async fn a_fixed_endless_backoff_waits_forever_in_the_stream_and_around_a_call() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut retried =
        task::spawn(stream::iter([1u32]).retry(Backoff::fixed(MAX), always_fails(&calls)));
    assert_pending!(retried.poll_next());
    advance(10 * YEAR).await;
    assert_pending!(retried.poll_next());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let calls = Arc::new(AtomicU32::new(0));
    let op = always_fails(&calls);
    let waited = tokio::time::timeout(10 * YEAR, Backoff::fixed(MAX).retry(|| op(1))).await;
    assert!(waited.is_err(), "still waiting after ten years");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_exponential_backoff_without_a_cap_saturates_after_many_attempts() {
    // From 1 s, the 40th wait would be 2^39 s (17 000 years): far beyond any clock's reach.
    let backoff = Backoff::exponential(Duration::from_secs(1)).max_attempts(100);
    assert_eq!(backoff.nominal_delay_after(200), MAX);
    let calls = Arc::new(AtomicU32::new(0));
    let mut retried =
        task::spawn(
            stream::iter([1u32]).retry_if(backoff, always_fails(&calls), |_: &String| true),
        );
    let start = Instant::now();
    assert_pending!(retried.poll_next());
    // The waits double (1 s, 2 s, 4 s, ...): 30 attempts within 2^30 s (34 years).
    while calls.load(Ordering::SeqCst) < 30 {
        advance(Duration::from_secs(1 << 20)).await;
        assert_pending!(retried.poll_next());
    }
    assert!(start.elapsed() < Duration::from_secs(1 << 30));
    // Then the waits are years long: still waiting, without a panic.
    let attempts = calls.load(Ordering::SeqCst);
    advance(YEAR).await;
    assert_pending!(retried.poll_next());
    assert!(calls.load(Ordering::SeqCst) <= attempts + 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_with_endless_timeout_and_backoff_waits_forever() {
    let call = Call::new(|_: u32| std::future::pending::<Result<u32, String>>()).timeout(MAX);
    let mut run = task::spawn(call.run(1));
    assert_pending!(run.poll());
    advance(10 * YEAR).await;
    assert_pending!(run.poll());

    let calls = Arc::new(AtomicU32::new(0));
    let call = Call::new(always_fails(&calls))
        .timeout(MAX)
        .retry(Backoff::fixed(MAX).max_attempts(2));
    let mut run = task::spawn(call.run(1));
    assert_pending!(run.poll());
    advance(10 * YEAR).await;
    assert_pending!(run.poll());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_open_for_ever_stays_open() {
    let breaker = CircuitBreaker::new(1, MAX);
    assert_eq!(breaker.open_for(), MAX);
    let failed = breaker.call(async { Err::<(), _>("down") }).await;
    assert_eq!(failed, Err(BreakerError::Failed("down")));
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(YEAR).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    let rejected = breaker.call(async { Ok::<_, &str>(1) }).await;
    assert_eq!(rejected, Err(BreakerError::Open(())));

    // The stream obeys it the same way.
    let out: Vec<Result<u32, BreakerError<u32, &str>>> = stream::iter([1u32, 2])
        .circuit_breaker(&breaker, |x| async move { Ok(x) })
        .collect()
        .await;
    assert_eq!(
        out,
        [Err(BreakerError::Open(1)), Err(BreakerError::Open(2))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_limiter_of_one_cell_per_endless_period_lets_one_through() {
    let limiter = RateLimiter::per(MAX);
    let mut limited = task::spawn(stream::iter([1u32, 2]).rate_limit(&limiter));
    assert_ready_eq!(limited.poll_next(), Some(1));
    assert_pending!(limited.poll_next());
    advance(10 * YEAR).await;
    assert_pending!(limited.poll_next());
    drop(limited);

    assert!(!limiter.check());
    let waited = tokio::time::timeout(10 * YEAR, limiter.until_ready()).await;
    assert!(waited.is_err(), "still waiting after ten years");

    // A burst lets that many through, then waits.
    let limiter = RateLimiter::per(MAX).burst(2);
    assert!(limiter.check() && limiter.check() && !limiter.check());
}

#[tokio::test(start_paused = true)]
async fn a_keyed_limiter_of_one_cell_per_endless_period_lets_one_through_per_key() {
    let limiter = KeyedRateLimiter::per(MAX);
    let mut limited =
        task::spawn(stream::iter(["a", "b", "a"]).rate_limit_by(&limiter, |k: &&str| *k));
    assert_ready_eq!(limited.poll_next(), Some("a"));
    assert_ready_eq!(limited.poll_next(), Some("b"));
    assert_pending!(limited.poll_next());
    advance(10 * YEAR).await;
    assert_pending!(limited.poll_next());
    drop(limited);

    assert!(!limiter.check_key(&"b"));
    assert!(limiter.check_key(&"c"));
    let waited = tokio::time::timeout(10 * YEAR, limiter.until_key_ready(&"a")).await;
    assert!(waited.is_err(), "still waiting after ten years");
}
