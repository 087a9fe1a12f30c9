//! The limiters' fine timer (sub-millisecond wake-ups on a real clock): on a paused clock it
//! changes nothing (no early release, no spinning), a dropped waiter leaves nothing behind, and
//! many waiters on a multi-thread runtime all get their cells.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::Instant;

/// A stream that counts how often it is polled.
struct Counted<S> {
    inner: S,
    polls: Arc<AtomicUsize>,
}

impl<S: Stream + Unpin> Stream for Counted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.poll_next_unpin(cx)
    }
}

/// On a paused clock (auto-advance), cells at 10 000 a second never go out before their slots,
/// all go out by one tick after the last slot, and the stream is polled at most twice per cell
/// plus once per tick: nothing wakes it in a loop.
#[tokio::test(start_paused = true)]
async fn on_a_paused_clock_no_cell_is_early_and_nothing_spins() {
    let interval = Duration::from_micros(100);
    let limiter = RateLimiter::per(interval);
    let polls = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let at: Vec<Duration> = Counted {
        inner: stream::iter(0..500u32).rate_limit(&limiter),
        polls: Arc::clone(&polls),
    }
    .map(|_| start.elapsed())
    .collect()
    .await;
    assert_eq!(at.len(), 500);
    for (k, at) in at.iter().enumerate() {
        assert!(*at >= interval * k as u32, "cell {k} at {at:?}");
    }
    let last = interval * 499;
    assert!(at[499] <= last + Duration::from_millis(1), "{:?}", at[499]);
    let ticks = (last.as_millis() + 1) as usize;
    let polls = polls.load(Ordering::SeqCst);
    assert!(polls <= 2 * 500 + ticks, "{polls} polls for 500 cells");
}

/// The same for direct callers and a keyed limiter's callers, with waits of a few ticks.
#[tokio::test(start_paused = true)]
async fn on_a_paused_clock_direct_callers_wait_exactly_as_before() {
    let limiter = RateLimiter::per(Duration::from_micros(2_500)).burst(2);
    let keyed = KeyedRateLimiter::per(Duration::from_millis(3));
    let start = Instant::now();
    let mut at = Vec::new();
    for _ in 0..5 {
        limiter.until_ready().await;
        at.push(start.elapsed());
    }
    // Two at once, then one every 2.5 ms (tokio's timer fires on whole milliseconds: 3, 5, 8).
    assert_eq!(at, [0, 0, 3, 5, 8].map(Duration::from_millis));
    let start = Instant::now();
    let mut at = Vec::new();
    for key in [1, 2, 1, 1] {
        keyed.until_key_ready(&key).await;
        at.push(start.elapsed());
    }
    assert_eq!(at, [0, 0, 3, 6].map(Duration::from_millis));
}

/// A waker that counts its clones (through the `Arc`'s count).
struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// Polls `fut` once with a waker of its own, asserts it is pending and holds the waker
/// somewhere (tokio's timer, the fine timer), then drops it: no copy of the waker is left.
fn poll_once_then_drop<F: Future>(fut: F) {
    let noop = Arc::new(Noop);
    let waker = Waker::from(Arc::clone(&noop));
    let mut fut = Box::pin(fut);
    assert!(
        fut.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    drop(waker);
    assert!(Arc::strong_count(&noop) > 1, "the wait holds the waker");
    drop(fut);
    assert_eq!(
        Arc::strong_count(&noop),
        1,
        "a dropped wait leaves no waker"
    );
}

/// On a real clock, a waiter dropped while it waits leaves no waker behind (so no task is kept
/// alive), whichever way it waited.
#[tokio::test]
async fn a_dropped_waiter_leaves_no_waker_behind() {
    // Ten seconds apart: the second cell cannot come during the test.
    let limiter = RateLimiter::per(Duration::from_secs(10));
    limiter.until_ready().await;
    poll_once_then_drop(limiter.until_ready());
    poll_once_then_drop(stream::iter(0..2).rate_limit(&limiter).collect::<Vec<_>>());

    let keyed = KeyedRateLimiter::per(Duration::from_secs(10));
    keyed.until_key_ready(&1).await;
    poll_once_then_drop(keyed.until_key_ready(&1));
    poll_once_then_drop(
        stream::iter([1, 1, 1])
            .rate_limit_by(&keyed, |k: &i32| *k)
            .collect::<Vec<_>>(),
    );
}

/// Many waiters of one limiter on a multi-thread runtime (real clock): each task gets all its
/// cells, each stream its items in order, and the limiter never runs faster than its quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_on_a_multi_thread_runtime_all_get_their_cells() {
    let interval = Duration::from_micros(50);
    let limiter = RateLimiter::per(interval);
    let keyed = KeyedRateLimiter::per(interval);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..6u32 {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..150 {
                limiter.until_ready().await;
            }
            vec![t; 150]
        }));
    }
    for _ in 0..2 {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            stream::iter(0..300u32).rate_limit(&limiter).collect().await
        }));
    }
    for key in 0..3u32 {
        let by_key = keyed.clone();
        tasks.push(tokio::spawn(async move {
            stream::iter(0..200u32)
                .rate_limit_by(&by_key, move |_| key)
                .collect()
                .await
        }));
        let keyed = keyed.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                keyed.until_key_ready(&key).await;
            }
            vec![key; 100]
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    let elapsed = start.elapsed();
    for (t, got) in out[..6].iter().enumerate() {
        assert_eq!(got, &vec![t as u32; 150]);
    }
    for got in &out[6..8] {
        assert_eq!(got, &(0..300).collect::<Vec<_>>());
    }
    for (key, pair) in out[8..].chunks(2).enumerate() {
        assert_eq!(pair[0], (0..200).collect::<Vec<_>>());
        assert_eq!(pair[1], vec![key as u32; 100]);
    }
    // 1 500 cells of the shared quota: at most `1 + (T + 1 ms) / interval` in `T`.
    assert!(
        elapsed >= interval * 1_499 - Duration::from_millis(1),
        "{elapsed:?}"
    );
}
