//! `debounce`: exact instants on a paused clock, the last item, bad input.

use std::time::Duration;

use futures::channel::mpsc;
use futures::stream::{self, FusedStream};
use futures::{Stream, StreamExt};
use stagepipe::PipelineExt;
use tokio::time::{Instant, advance, sleep_until};
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

/// Runs `events` through `debounce(quiet)` and records when each item came out.
async fn timeline<T>(events: Vec<(u64, T)>, quiet: u64) -> Vec<(Duration, T)> {
    let t0 = Instant::now();
    let mut out = Box::pin(arriving(t0, events).debounce(ms(quiet)));
    let mut seen = Vec::new();
    while let Some(item) = out.next().await {
        seen.push((t0.elapsed(), item));
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn item_is_emitted_exactly_quiet_after_it_arrived() {
    let (tx, rx) = mpsc::unbounded();
    let mut out = task::spawn(rx.debounce(ms(50)));
    tx.unbounded_send(1).unwrap();
    assert_pending!(out.poll_next());
    advance(ms(49)).await;
    assert!(!out.is_woken());
    assert_pending!(out.poll_next());
    advance(ms(1)).await;
    assert!(out.is_woken());
    assert_ready_eq!(out.poll_next(), Some(1));
    // Nothing more until a new item comes.
    advance(ms(500)).await;
    assert!(!out.is_woken());
    assert_pending!(out.poll_next());
}

#[tokio::test(start_paused = true)]
async fn newer_item_replaces_the_waiting_one_and_restarts_the_wait() {
    let (tx, rx) = mpsc::unbounded();
    let mut out = task::spawn(rx.debounce(ms(50)));
    let t0 = Instant::now();
    tx.unbounded_send('a').unwrap();
    assert_pending!(out.poll_next());
    advance(ms(40)).await;
    tx.unbounded_send('b').unwrap();
    assert_pending!(out.poll_next());
    advance(ms(40)).await; // 50 ms after 'a', 40 ms after 'b'
    assert_pending!(out.poll_next());
    advance(ms(10)).await;
    assert_ready_eq!(out.poll_next(), Some('b'));
    assert_eq!(t0.elapsed(), ms(90));
}

#[tokio::test(start_paused = true)]
async fn bursts_give_their_last_items() {
    let events = vec![(0, 1), (10, 2), (20, 3), (100, 4), (110, 5), (300, 6)];
    assert_eq!(
        timeline(events, 50).await,
        [(ms(70), 3), (ms(160), 5), (ms(300), 6)] // 6: the input ended
    );
}

#[tokio::test(start_paused = true)]
async fn item_at_the_deadline_does_not_replace_the_waiting_one() {
    let events = vec![(0, 'a'), (50, 'b')];
    assert_eq!(timeline(events, 50).await, [(ms(50), 'a'), (ms(50), 'b')]);
}

#[tokio::test(start_paused = true)]
async fn last_item_is_emitted_at_once_when_the_input_ends() {
    let (tx, rx) = mpsc::unbounded();
    let mut out = task::spawn(rx.debounce(ms(50)));
    tx.unbounded_send(1).unwrap();
    tx.unbounded_send(2).unwrap();
    assert_pending!(out.poll_next());
    drop(tx);
    assert!(out.is_woken());
    assert_ready_eq!(out.poll_next(), Some(2));
    assert_ready_eq!(out.poll_next(), None);
    assert!(out.is_terminated());
}

#[tokio::test(start_paused = true)]
async fn ready_input_gives_only_its_last_item() {
    let out: Vec<u32> = stream::iter(0..1000).debounce(ms(10)).collect().await;
    assert_eq!(out, [999]);
    let out: Vec<u32> = stream::iter(0..0).debounce(ms(10)).collect().await;
    assert!(out.is_empty());
}

#[tokio::test(start_paused = true)]
async fn endless_ready_input_does_not_hold_the_task() {
    let mut out = task::spawn(stream::repeat(1u32).debounce(ms(10)));
    assert_pending!(out.poll_next());
    assert!(out.is_woken());
}

#[tokio::test(start_paused = true)]
async fn held_item_can_be_taken_out() {
    let (tx, rx) = mpsc::unbounded();
    let mut out = rx.debounce(ms(50));
    tx.unbounded_send(7).unwrap();
    let mut polled = task::spawn(());
    polled.enter(|cx, _| assert!(out.poll_next_unpin(cx).is_pending()));
    assert_eq!(out.held(), Some(&7));
    let (_rx, held) = out.into_inner();
    assert_eq!(held, Some(7));

    let (tx, rx) = mpsc::unbounded();
    let mut out = Box::pin(rx.debounce(ms(50)));
    tx.unbounded_send(8).unwrap();
    polled.enter(|cx, _| assert!(out.as_mut().poll_next(cx).is_pending()));
    assert_eq!(out.as_mut().take_held(), Some(8));
    // Nothing is due any more.
    advance(ms(100)).await;
    polled.enter(|cx, _| assert!(out.as_mut().poll_next(cx).is_pending()));
    drop(tx);
    assert_eq!(out.next().await, None);
}

#[test]
fn size_hint_and_debug() {
    let d = stream::iter(0..10).debounce(ms(1));
    assert_eq!(d.size_hint(), (1, Some(10)));
    assert!(format!("{d:?}").contains("quiet: 1ms"));
}

#[test]
#[should_panic(expected = "`quiet`")]
fn zero_quiet_panics() {
    let _ = stream::iter(0..3).debounce(Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_time_too_long_for_the_clock_does_not_panic() {
    let last: Vec<u32> = futures::stream::iter(0..5u32)
        .debounce(std::time::Duration::MAX)
        .collect()
        .await;
    assert_eq!(last, [4]);
}
