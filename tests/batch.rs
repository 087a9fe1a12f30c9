//! `batch` and `batch_dedupe`: sizes, the timer, the tail, dedupe and bad input, on a paused clock.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::channel::mpsc;
use futures::stream::{self, FusedStream};
use futures::{Stream, StreamExt};
use proptest::prelude::*;
use stagepipe::PipelineExt;
use tokio::time::{Instant, advance, sleep, sleep_until};
use tokio_test::task;
use tokio_test::{assert_pending, assert_ready, assert_ready_eq};

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

/// Non-`Clone`, non-`Hash` items.
#[derive(Debug, PartialEq)]
struct Row {
    key: String,
    value: u64,
}

fn row(key: &str, value: u64) -> Row {
    Row {
        key: key.to_owned(),
        value,
    }
}

#[tokio::test(start_paused = true)]
async fn full_batch_is_emitted_at_once_while_upstream_is_pending() {
    let (tx, rx) = mpsc::unbounded();
    let mut batches = task::spawn(rx.batch(3, ms(100)));
    assert_pending!(batches.poll_next());

    tx.unbounded_send(1).unwrap();
    tx.unbounded_send(2).unwrap();
    assert!(batches.is_woken());
    assert_pending!(batches.poll_next());
    tx.unbounded_send(3).unwrap();
    tx.unbounded_send(4).unwrap();
    // The channel still holds 4 and then is pending: [1, 2, 3] comes now, not after `wait`.
    assert_ready_eq!(batches.poll_next(), Some(vec![1, 2, 3]));
    assert_pending!(batches.poll_next());

    advance(ms(100)).await;
    assert!(batches.is_woken());
    assert_ready_eq!(batches.poll_next(), Some(vec![4]));
}

#[tokio::test(start_paused = true)]
async fn partial_batch_is_emitted_exactly_wait_after_its_first_item() {
    let (tx, rx) = mpsc::unbounded();
    let mut batches = task::spawn(rx.batch(10, ms(100)));
    let t0 = Instant::now();

    tx.unbounded_send(1).unwrap();
    assert_pending!(batches.poll_next());
    advance(ms(60)).await;
    // A later item does not restart the timer.
    tx.unbounded_send(2).unwrap();
    assert_pending!(batches.poll_next());
    advance(ms(39)).await;
    assert!(!batches.is_woken());
    assert_pending!(batches.poll_next());
    advance(ms(1)).await;
    assert!(batches.is_woken());
    assert_ready_eq!(batches.poll_next(), Some(vec![1, 2]));
    assert_eq!(t0.elapsed(), ms(100));

    // The next batch gets a timer of its own, from its own first item.
    advance(ms(500)).await;
    tx.unbounded_send(3).unwrap();
    assert_pending!(batches.poll_next());
    advance(ms(99)).await;
    assert_pending!(batches.poll_next());
    advance(ms(1)).await;
    assert_ready_eq!(batches.poll_next(), Some(vec![3]));
    assert_eq!(t0.elapsed(), ms(700));
}

#[tokio::test(start_paused = true)]
async fn steady_trickle_still_flushes_every_wait() {
    // One item every 10 ms for 95 ms: a timer reset per item would never fire.
    let t0 = Instant::now();
    let events = (0..10).map(|i| (i * 10, i)).collect();
    let mut batches = Box::pin(arriving(t0, events).batch(100, ms(35)));

    let mut seen = Vec::new();
    while let Some(batch) = batches.next().await {
        seen.push((t0.elapsed(), batch));
    }
    assert_eq!(
        seen,
        [
            (ms(35), vec![0, 1, 2, 3]),
            (ms(75), vec![4, 5, 6, 7]),
            (ms(90), vec![8, 9]), // the input ended
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn item_at_the_deadline_starts_the_next_batch() {
    let t0 = Instant::now();
    let events = vec![(0, 'a'), (50, 'b'), (100, 'c'), (150, 'd')];
    let mut batches = Box::pin(arriving(t0, events).batch(10, ms(100)));
    assert_eq!(batches.next().await, Some(vec!['a', 'b']));
    assert_eq!(t0.elapsed(), ms(100));
    assert_eq!(batches.next().await, Some(vec!['c', 'd']));
    assert_eq!(t0.elapsed(), ms(150));
    assert_eq!(batches.next().await, None);
}

#[tokio::test(start_paused = true)]
async fn tail_is_flushed_when_the_input_ends() {
    let (tx, rx) = mpsc::unbounded();
    let mut batches = task::spawn(rx.batch(10, ms(100)));
    tx.unbounded_send(1).unwrap();
    tx.unbounded_send(2).unwrap();
    assert_pending!(batches.poll_next());
    drop(tx);
    assert!(batches.is_woken());
    // At once, without waiting for `wait`.
    assert_ready_eq!(batches.poll_next(), Some(vec![1, 2]));
    assert_ready_eq!(batches.poll_next(), None);
    assert!(batches.is_terminated());
    assert_ready_eq!(batches.poll_next(), None);
}

#[tokio::test(start_paused = true)]
async fn tail_of_a_ready_stream_and_exact_multiples() {
    let batches: Vec<Vec<u32>> = stream::iter(0..7).batch(3, ms(10)).collect().await;
    assert_eq!(batches, [vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    let batches: Vec<Vec<u32>> = stream::iter(0..6).batch(3, ms(10)).collect().await;
    assert_eq!(batches, [vec![0, 1, 2], vec![3, 4, 5]]);
    let batches: Vec<Vec<u32>> = stream::iter(0..0).batch(3, ms(10)).collect().await;
    assert!(batches.is_empty());
}

#[tokio::test(start_paused = true)]
async fn no_empty_batch_during_a_long_quiet_period() {
    let (tx, rx) = mpsc::unbounded();
    let mut batches = task::spawn(rx.batch_dedupe(5, ms(10), |x: &u32| *x));
    assert_pending!(batches.poll_next());
    for _ in 0..100 {
        advance(ms(10)).await;
        assert!(!batches.is_woken());
        assert_pending!(batches.poll_next());
    }
    tx.unbounded_send(7).unwrap();
    assert_pending!(batches.poll_next());
    advance(ms(10)).await;
    assert_ready_eq!(batches.poll_next(), Some(vec![7]));
    // Quiet again after a timed-out batch: still nothing.
    for _ in 0..100 {
        advance(ms(10)).await;
        assert!(!batches.is_woken());
        assert_pending!(batches.poll_next());
    }
    drop(tx);
    assert_ready_eq!(batches.poll_next(), None);
}

#[tokio::test(start_paused = true)]
async fn dedupe_keeps_the_first_item_of_each_key_in_input_order() {
    let items = vec![("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("d", 6)];
    let batches: Vec<Vec<(&str, u32)>> = stream::iter(items)
        .batch_dedupe(10, ms(10), |item: &(&str, u32)| item.0)
        .collect()
        .await;
    assert_eq!(batches, [vec![("b", 1), ("a", 2), ("c", 4), ("d", 6)]]);
}

#[tokio::test(start_paused = true)]
async fn dropped_duplicates_do_not_count_towards_max() {
    let batches: Vec<Vec<u32>> = stream::iter([1, 1, 1, 2, 2, 3, 4, 4, 5])
        .batch_dedupe(3, ms(10), |x| *x)
        .collect()
        .await;
    assert_eq!(batches, [vec![1, 2, 3], vec![4, 5]]);
}

#[tokio::test(start_paused = true)]
async fn a_key_may_come_back_in_the_next_batch() {
    // By size ...
    let batches: Vec<Vec<u32>> = stream::iter([1, 2, 1, 2, 1])
        .batch_dedupe(2, ms(10), |x| *x)
        .collect()
        .await;
    assert_eq!(batches, [vec![1, 2], vec![1, 2], vec![1]]);

    // ... and by time.
    let t0 = Instant::now();
    let events = vec![(0, 1), (5, 1), (10, 1), (15, 1)];
    let batches: Vec<Vec<u32>> = arriving(t0, events)
        .batch_dedupe(10, ms(10), |x: &u32| *x)
        .collect()
        .await;
    assert_eq!(batches, [vec![1], vec![1]]);
}

#[tokio::test(start_paused = true)]
async fn works_on_unpin_less_upstream_with_plain_items() {
    let t0 = Instant::now();
    let events = vec![
        (0, row("a", 1)),
        (10, row("a", 2)),
        (20, row("b", 3)),
        (200, row("a", 4)),
    ];
    let mut batches =
        Box::pin(arriving(t0, events).batch_dedupe(10, ms(100), |r: &Row| r.key.clone()));
    assert_eq!(batches.next().await, Some(vec![row("a", 1), row("b", 3)]));
    assert_eq!(t0.elapsed(), ms(100));
    assert_eq!(batches.next().await, Some(vec![row("a", 4)]));
    assert_eq!(t0.elapsed(), ms(200));
    assert_eq!(batches.next().await, None);

    let events = vec![(0, row("x", 1)), (10, row("x", 2))];
    let batches: Vec<Vec<Row>> = arriving(Instant::now(), events)
        .batch(5, ms(100))
        .collect()
        .await;
    assert_eq!(batches, [vec![row("x", 1), row("x", 2)]]);
}

#[tokio::test(start_paused = true)]
async fn key_function_may_keep_state() {
    let mut calls = 0;
    let batches: Vec<Vec<u32>> = stream::iter(0..10)
        .batch_dedupe(4, ms(10), |x| {
            calls += 1;
            *x % 3
        })
        .collect()
        .await;
    // Only three keys exist, so the batch never fills; the input's end flushes it.
    assert_eq!(batches, [vec![0, 1, 2]]);
    // Once per item, and once more per duplicate, on the earlier item, to confirm it (rarely
    // also for two keys whose hashes look alike).
    assert!((17..=20).contains(&calls), "{calls} calls");
}

#[tokio::test(start_paused = true)]
async fn a_large_batch_keeps_dropping_duplicates_as_its_key_table_grows() {
    // 3000 distinct keys, then every key again, twice, in a batch of up to 5000.
    let batches: Vec<Vec<u32>> = stream::iter(0..9000u32)
        .batch_dedupe(5000, ms(10), |x| x % 3000)
        .collect()
        .await;
    assert_eq!(batches, [(0..3000).collect::<Vec<_>>()]);

    // Two full batches of 5000 distinct keys; within each, every key but the last comes again
    // with the next one (as `(key, 1)`, to tell the copies apart).
    let input = (0..10_000u32).flat_map(|k| {
        let again = (k % 5000 != 0).then(|| (k - 1, 1));
        again.into_iter().chain([(k, 0)])
    });
    let batches: Vec<Vec<(u32, u8)>> = stream::iter(input)
        .batch_dedupe(5000, ms(10), |(k, _)| *k)
        .collect()
        .await;
    let firsts: Vec<(u32, u8)> = (0..10_000).map(|k| (k, 0)).collect();
    assert_eq!(batches, [firsts[..5000].to_vec(), firsts[5000..].to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_key_function_keeps_the_partial_batch_and_its_keys() {
    let mut panicked = false;
    let mut batches = task::spawn(stream::iter([1, 2, 3, 99, 1, 2, 4]).batch_dedupe(
        10,
        ms(10),
        move |x: &u32| {
            if *x == 99 && !panicked {
                panicked = true;
                panic!("bad item");
            }
            *x
        },
    ));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batches.poll_next()));
    assert!(caught.is_err());
    // The item whose key panicked is gone with the panic; the batch and its keys are not.
    assert_ready_eq!(batches.poll_next(), Some(vec![1, 2, 3, 4]));
    assert_ready_eq!(batches.poll_next(), None);
}

#[tokio::test(start_paused = true)]
async fn endless_duplicates_on_a_ready_upstream_do_not_hold_the_task() {
    let mut batches = task::spawn(stream::repeat(1u32).batch_dedupe(10, ms(10), |x| *x));
    // The stream yields to the runtime and wakes itself instead of looping forever.
    assert_pending!(batches.poll_next());
    assert!(batches.is_woken());
    advance(ms(10)).await;
    assert_ready_eq!(batches.poll_next(), Some(vec![1]));
}

#[tokio::test(start_paused = true)]
async fn a_wait_too_long_for_the_clock_does_not_panic() {
    let years = Duration::from_secs(10 * 365 * 86_400);
    let (tx, rx) = mpsc::unbounded();
    let mut batches = task::spawn(rx.batch(10, Duration::MAX));
    tx.unbounded_send(1).unwrap();
    assert_pending!(batches.poll_next());
    advance(years).await;
    assert!(!batches.is_woken());
    assert_pending!(batches.poll_next());
    drop(tx);
    assert_ready_eq!(batches.poll_next(), Some(vec![1]));

    let (tx, rx) = mpsc::unbounded();
    let mut batches = task::spawn(rx.batch_dedupe(10, Duration::MAX, |x: &u32| *x));
    tx.unbounded_send(1).unwrap();
    tx.unbounded_send(1).unwrap();
    assert_pending!(batches.poll_next());
    advance(years).await;
    assert_pending!(batches.poll_next());
    drop(tx);
    assert_ready_eq!(batches.poll_next(), Some(vec![1]));

    // A long batch from a ready upstream, whose wait the stream looks at on the way.
    let batches: Vec<Vec<u32>> = stream::iter(0..1000)
        .batch(5000, Duration::MAX)
        .collect()
        .await;
    assert_eq!(batches, [(0..1000).collect::<Vec<_>>()]);
    let batches: Vec<Vec<u32>> = stream::iter(0..1000)
        .batch_dedupe(5000, Duration::MAX, |x| *x % 500)
        .collect()
        .await;
    assert_eq!(batches, [(0..500).collect::<Vec<_>>()]);
}

/// An upstream that is always ready and spends `cost` producing each item, as CPU work or a
/// blocking call inside `poll_next` would: it moves tokio's paused clock itself. (The first
/// poll of `advance` moves the clock at once, checked below; the rest of that future, a yield,
/// is dropped.) Item `i` is ready at `(i + 1) * cost` after the start.
struct Busy {
    next: u64,
    n: u64,
    cost: Duration,
}

impl Stream for Busy {
    type Item = u64;

    fn poll_next(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<u64>> {
        if self.next == self.n {
            return std::task::Poll::Ready(None);
        }
        let before = Instant::now();
        let _ = task::spawn(advance(self.cost)).poll();
        assert_eq!(
            before.elapsed(),
            self.cost,
            "the clock moved inside poll_next"
        );
        self.next += 1;
        std::task::Poll::Ready(Some(self.next - 1))
    }
}

/// The most upstream items a batching stream pulls, while upstream stays ready, between two
/// looks at the clock (documented on `Batch` and `BatchDedupe`).
const CHECK_EVERY: u32 = 64;

/// Runs `Busy` through `batches` (built from it), checking that every batch but the last was
/// emitted once `wait` had passed since its first item, and no more than `CHECK_EVERY` items
/// later; returns the batches.
async fn busy_batches<B>(
    wait: Duration,
    cost: Duration,
    make: impl FnOnce(Busy) -> B,
) -> Vec<Vec<u64>>
where
    B: Stream<Item = Vec<u64>>,
{
    let t0 = Instant::now();
    let mut batches = Box::pin(make(Busy {
        next: 0,
        n: 1000,
        cost,
    }));
    let mut out = Vec::new();
    let mut emitted = Vec::new();
    while let Some(batch) = batches.next().await {
        emitted.push(t0.elapsed());
        out.push(batch);
    }
    assert!(out.len() > 1, "one batch of {} items", out[0].len());
    for (batch, at) in out.iter().zip(&emitted).take(out.len() - 1) {
        let first = cost * (batch[0] as u32 + 1);
        assert!(
            *at >= first + wait && *at <= first + wait + cost * CHECK_EVERY,
            "batch from {} emitted at {at:?}, first item at {first:?}",
            batch[0],
        );
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_ready_upstream_cannot_hold_a_batch_past_its_wait() {
    // 1 ms per item and `wait` 10 ms: a batch of 1000 would come after a second.
    let out = busy_batches(ms(10), ms(1), |busy| busy.batch(1000, ms(10))).await;
    let items: Vec<u64> = out.into_iter().flatten().collect();
    assert_eq!(items, (0..1000).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_ready_upstream_cannot_hold_a_dedupe_batch_past_its_wait() {
    // Every other item is a duplicate: dropped, yet it takes its time.
    let out = busy_batches(ms(10), ms(1), |busy| {
        busy.batch_dedupe(1000, ms(10), |x: &u64| *x / 2)
    })
    .await;
    for batch in &out {
        assert!(
            batch.iter().all(|x| x % 2 == 0 || *x == batch[0]),
            "{batch:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_wait_starts_at_the_first_item_not_when_upstream_pauses() {
    // Five items, 1 ms apiece, then nothing: the batch is due 100 ms after its first item
    // (at 1 ms), not 100 ms after upstream first returned `Pending` (at 5 ms).
    for dedupe in [false, true] {
        let t0 = Instant::now();
        let busy = Busy {
            next: 0,
            n: 5,
            cost: ms(1),
        }
        .chain(stream::pending());
        let first = if dedupe {
            busy.batch_dedupe(10, ms(100), |x: &u64| *x)
                .boxed()
                .next()
                .await
        } else {
            busy.batch(10, ms(100)).boxed().next().await
        };
        assert_eq!(first, Some(vec![0, 1, 2, 3, 4]));
        assert_eq!(t0.elapsed(), ms(101), "dedupe: {dedupe}");
    }
}

/// Counts how many of its values are alive.
#[derive(Debug)]
struct Tracked(#[allow(dead_code)] u32, Arc<AtomicUsize>);

impl Tracked {
    fn new(n: u32, alive: &Arc<AtomicUsize>) -> Self {
        alive.fetch_add(1, Ordering::SeqCst);
        Self(n, alive.clone())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_mid_batch_keeps_what_was_emitted_and_drops_the_partial_batch() {
    let alive = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::unbounded();
    let mut batches = task::spawn(rx.batch(2, ms(100)));
    for n in 0..3 {
        tx.unbounded_send(Tracked::new(n, &alive)).unwrap();
    }
    let emitted = assert_ready!(batches.poll_next()).unwrap();
    assert_eq!(emitted.len(), 2);
    assert_pending!(batches.poll_next());
    assert_eq!(alive.load(Ordering::SeqCst), 3);
    // The partial batch (one item) goes with the stream; the emitted batch is untouched.
    drop(batches);
    assert_eq!(alive.load(Ordering::SeqCst), 2);
    drop(emitted);
    assert_eq!(alive.load(Ordering::SeqCst), 0);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn partial_batch_can_be_taken_out() {
    let (tx, rx) = mpsc::unbounded();
    let mut batches = Box::pin(rx.batch_dedupe(10, ms(100), |x: &u32| *x));
    let mut polled = task::spawn(());
    tx.unbounded_send(1).unwrap();
    tx.unbounded_send(2).unwrap();
    polled.enter(|cx, _| assert!(batches.as_mut().poll_next(cx).is_pending()));
    assert_eq!(batches.partial(), [1, 2]);
    assert_eq!(batches.as_mut().take_partial(), [1, 2]);
    assert!(batches.partial().is_empty());

    // The next item starts a new batch with a fresh key set and a fresh timer.
    advance(ms(90)).await;
    tx.unbounded_send(1).unwrap();
    let t1 = Instant::now();
    assert_eq!(batches.next().await, Some(vec![1]));
    assert_eq!(t1.elapsed(), ms(100));
}

#[tokio::test(start_paused = true)]
async fn into_inner_hands_back_the_stream_and_the_partial_batch() {
    let (tx, rx) = mpsc::unbounded();
    let mut batches = rx.batch(10, ms(100));
    tx.unbounded_send(4).unwrap();
    let mut polled = task::spawn(());
    polled.enter(|cx, _| assert!(Pin::new(&mut batches).poll_next(cx).is_pending()));
    let (mut rx, partial) = batches.into_inner();
    assert_eq!(partial, [4]);
    tx.unbounded_send(5).unwrap();
    assert_eq!(rx.next().await, Some(5));
}

#[test]
fn size_hint_counts_batches() {
    let b = stream::iter(0..10).batch(3, ms(1));
    assert_eq!(b.size_hint(), (4, Some(10)));
    let b = stream::iter(0..10).batch_dedupe(3, ms(1), |x| *x);
    assert_eq!(b.size_hint(), (1, Some(10)));
    let b = stream::iter(0..0).batch(3, ms(1));
    assert_eq!(b.size_hint(), (0, Some(0)));
}

#[test]
fn debug_shows_the_configuration() {
    let b = stream::iter(0..3).batch_dedupe(3, ms(1), |x| *x);
    let text = format!("{b:?}");
    assert!(text.starts_with("BatchDedupe"), "{text}");
    assert!(text.contains("max: 3"), "{text}");
    let b = stream::iter(0..3).batch(3, ms(1));
    assert!(format!("{b:?}").starts_with("Batch"));
}

#[test]
fn streams_are_send_when_their_parts_are() {
    fn is_send<T: Send>(_: &T) {}
    let b = stream::iter(0..3).batch(3, ms(1));
    is_send(&b);
    let b = stream::iter(0..3).batch_dedupe(3, ms(1), |x| *x);
    is_send(&b);
}

#[test]
#[should_panic(expected = "`max`")]
fn batch_zero_max_panics() {
    let _ = stream::iter(0..3).batch(0, ms(1));
}

#[test]
#[should_panic(expected = "`wait`")]
fn batch_zero_wait_panics() {
    let _ = stream::iter(0..3).batch(3, Duration::ZERO);
}

#[test]
#[should_panic(expected = "`max`")]
fn batch_dedupe_zero_max_panics() {
    let _ = stream::iter(0..3).batch_dedupe(0, ms(1), |x| *x);
}

#[test]
#[should_panic(expected = "`wait`")]
fn batch_dedupe_zero_wait_panics() {
    let _ = stream::iter(0..3).batch_dedupe(3, Duration::ZERO, |x| *x);
}

#[test]
#[should_panic(expected = "invalid `max`: must be at most 4294967295")]
#[cfg(target_pointer_width = "64")]
fn batch_dedupe_max_beyond_u32_panics() {
    let _ = stream::iter(0..3).batch_dedupe(1 << 32, ms(1), |x| *x);
}

#[test]
fn bad_input_panics_at_the_callers_line() {
    let err = std::panic::catch_unwind(|| {
        let _ = stream::iter(0..3).batch(0, ms(1));
    });
    let message = err.unwrap_err();
    let message = message.downcast_ref::<String>().unwrap();
    assert_eq!(message, "invalid `max`: must be greater than zero");
}

// ---------------------------------------------------------------------------- property tests

/// One item: a unique id (its input position) and a key with collisions.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Item {
    id: usize,
    key: u8,
}

/// Runs `items` (each after its gap in ms) through the operator on a paused clock.
fn run_batches(gaps: &[u8], keys: &[u8], max: usize, wait: u64, dedupe: bool) -> Vec<Vec<Item>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let input = gaps
            .iter()
            .zip(keys)
            .enumerate()
            .map(|(id, (&gap, &key))| (gap, Item { id, key }));
        let source = stream::iter(input).then(|(gap, item)| async move {
            if gap > 0 {
                sleep(ms(u64::from(gap))).await;
            }
            item
        });
        if dedupe {
            source
                .batch_dedupe(max, ms(wait), |i: &Item| i.key)
                .collect()
                .await
        } else {
            source.batch(max, ms(wait)).collect().await
        }
    })
}

/// Gaps: mostly 0 (a burst), sometimes a few ms.
fn gaps(n: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![6 => Just(0u8), 3 => 1u8..5, 1 => 5u8..40], n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn batch_emits_every_item_exactly_once_in_order(
        gaps in gaps(10_000),
        max in 1usize..200,
        wait in 1u64..50,
    ) {
        let keys = vec![0u8; gaps.len()];
        let batches = run_batches(&gaps, &keys, max, wait, false);
        let ids: Vec<usize> = batches.iter().flatten().map(|i| i.id).collect();
        prop_assert_eq!(ids, (0..gaps.len()).collect::<Vec<_>>());
        for b in &batches {
            prop_assert!(!b.is_empty() && b.len() <= max);
        }
    }

    #[test]
    fn batch_dedupe_keeps_first_of_each_key_per_batch(
        gaps in gaps(10_000),
        keys in prop::collection::vec(0u8..64, 10_000),
        max in 1usize..80,
        wait in 1u64..50,
    ) {
        let batches = run_batches(&gaps, &keys, max, wait, true);
        let ids: Vec<usize> = batches.iter().flatten().map(|i| i.id).collect();
        // Output in input order, each item at most once.
        prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
        for b in &batches {
            prop_assert!(!b.is_empty() && b.len() <= max);
            let distinct: HashSet<u8> = b.iter().map(|i| i.key).collect();
            prop_assert_eq!(distinct.len(), b.len());
        }
        // Every item that is missing was a duplicate within the batch it arrived in: the batch
        // whose first item came last before it.
        let firsts: Vec<usize> = batches.iter().map(|b| b[0].id).collect();
        let emitted: HashSet<usize> = ids.iter().copied().collect();
        for id in (0..gaps.len()).filter(|id| !emitted.contains(id)) {
            let at = firsts.partition_point(|&f| f < id);
            prop_assert!(at > 0, "item {} was dropped before any batch", id);
            let batch = &batches[at - 1];
            prop_assert!(
                batch.iter().any(|i| i.key == keys[id] && i.id < id),
                "item {} (key {}) was dropped but its key was not in its batch", id, keys[id]
            );
        }
    }
}
