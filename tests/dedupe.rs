//! `dedupe_by`: the window at exact instants, the capacity bound, bad input.

use std::time::Duration;

use futures::stream::{self, FusedStream};
use futures::{Stream, StreamExt};
use stagepipe::PipelineExt;
use tokio::time::{Instant, sleep_until};
use tokio_test::task;
use tokio_test::{assert_pending, assert_ready_eq};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Items that arrive at the given offsets from `t0`: `!Unpin`, behind an opaque type.
fn arriving<T>(t0: Instant, events: Vec<(u64, T)>) -> impl Stream<Item = T> {
    stream::iter(events).then(move |(at, item)| async move {
        sleep_until(t0 + ms(at)).await;
        item
    })
}

/// Runs `(arrival ms, key)` items through `dedupe_by(window, capacity)`; gives those that passed.
async fn passed(items: &[(u64, u32)], window: u64, capacity: usize) -> Vec<(u64, u32)> {
    let events = items.iter().map(|&item| (item.0, item)).collect();
    arriving(Instant::now(), events)
        .dedupe_by(ms(window), capacity, |item: &(u64, u32)| item.1)
        .collect()
        .await
}

#[tokio::test(start_paused = true)]
async fn drops_a_key_seen_within_the_window_and_passes_it_at_the_window() {
    let items = [
        (0, 1),
        (10, 2),
        (59, 1),
        (60, 1),
        (65, 2),
        (70, 2),
        (119, 1),
        (120, 1),
    ];
    assert_eq!(
        passed(&items, 60, 100).await,
        [(0, 1), (10, 2), (60, 1), (70, 2), (120, 1)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_duplicate_does_not_extend_the_window() {
    // Redelivered every 20 ms: it passes once per window, not never again.
    let items: Vec<(u64, u32)> = (0..10).map(|i| (i * 20, 7)).collect();
    assert_eq!(
        passed(&items, 50, 10).await,
        [(0, 7), (60, 7), (120, 7), (180, 7)]
    );
}

#[tokio::test(start_paused = true)]
async fn ready_input_is_deduplicated_in_order() {
    let out: Vec<u32> = stream::iter([3, 1, 3, 2, 1, 4, 2])
        .dedupe_by(ms(10), 100, |x| *x)
        .collect()
        .await;
    assert_eq!(out, [3, 1, 2, 4]);
}

#[tokio::test(start_paused = true)]
async fn capacity_bounds_the_memory_and_forgets_the_oldest_first() {
    // Capacity 2: after 1, 2 and 3 passed, 1 is forgotten even within the window.
    let items = [(0, 1), (1, 2), (2, 3), (3, 1), (4, 3), (5, 2)];
    assert_eq!(
        passed(&items, 1000, 2).await,
        [(0, 1), (1, 2), (2, 3), (3, 1), (5, 2)]
    );

    let mut s = Box::pin(stream::iter(0..10_000u32).dedupe_by(ms(1000), 64, |x| *x));
    while s.next().await.is_some() {
        assert!(s.remembered() <= 64);
    }
    assert_eq!(s.remembered(), 64);
}

#[tokio::test(start_paused = true)]
async fn expired_keys_are_forgotten() {
    let t0 = Instant::now();
    let events = vec![(0, 1u32), (1, 2), (2, 3), (100, 4)];
    let mut s = Box::pin(arriving(t0, events).dedupe_by(ms(50), 10, |x: &u32| *x));
    for _ in 0..3 {
        s.next().await;
    }
    assert_eq!(s.remembered(), 3);
    assert_eq!(s.next().await, Some(4));
    assert_eq!(s.remembered(), 1);
}

/// Non-`Clone`, non-`Hash` items, keyed by a `String`.
#[derive(Debug, PartialEq)]
struct Message {
    id: String,
    body: u64,
}

#[tokio::test(start_paused = true)]
async fn works_on_plain_items_with_owned_keys() {
    let messages = ["a", "b", "a", "c", "b"]
        .into_iter()
        .enumerate()
        .map(|(body, id)| Message {
            id: id.to_owned(),
            body: body as u64,
        });
    let out: Vec<u64> = stream::iter(messages)
        .dedupe_by(ms(100), 10, |m: &Message| m.id.clone())
        .map(|m| m.body)
        .collect()
        .await;
    assert_eq!(out, [0, 1, 3]);
}

#[tokio::test(start_paused = true)]
async fn endless_duplicates_do_not_hold_the_task() {
    let mut s = task::spawn(stream::repeat(1u32).dedupe_by(ms(10), 10, |x| *x));
    assert_ready_eq!(s.poll_next(), Some(1));
    assert_pending!(s.poll_next());
    assert!(s.is_woken());
}

#[tokio::test(start_paused = true)]
async fn ends_with_its_input() {
    let mut s = task::spawn(stream::iter([1u32]).dedupe_by(ms(10), 10, |x| *x));
    assert_ready_eq!(s.poll_next(), Some(1));
    assert_ready_eq!(s.poll_next(), None);
    assert!(s.is_terminated());
    assert_ready_eq!(s.poll_next(), None);
}

#[test]
fn size_hint_and_debug() {
    let s = stream::iter(0..10).dedupe_by(ms(5), 3, |x| *x);
    assert_eq!(s.size_hint(), (0, Some(10)));
    let text = format!("{s:?}");
    assert!(
        text.contains("capacity: 3") && text.contains("window: 5ms"),
        "{text}"
    );
}

#[test]
#[should_panic(expected = "`window`")]
fn zero_window_panics() {
    let _ = stream::iter(0..3).dedupe_by(Duration::ZERO, 10, |x| *x);
}

#[test]
#[should_panic(expected = "`capacity`")]
fn zero_capacity_panics() {
    let _ = stream::iter(0..3).dedupe_by(ms(10), 0, |x| *x);
}

#[tokio::test(start_paused = true)]
async fn a_window_too_long_for_the_clock_does_not_panic() {
    let once: Vec<u32> = futures::stream::iter([1, 2, 1, 3, 2])
        .dedupe_by(std::time::Duration::MAX, 16, |k| *k)
        .collect()
        .await;
    assert_eq!(once, [1, 2, 3]);
}
