//! loom models of fan-out's result channel (`scripts/loom`): the consumer hands chunks of items
//! to the pool, workers write their results into the stream's [`Chan`] (the reorder slots, or
//! the completion queue) and wake the consumer; a chunk whose item has to wait hands over what
//! it has and splits off the rest; a stream dropped early cancels what runs.
//!
//! The streams are the real [`FanOutOrdered`] and [`FanOut`], polled on loom's main thread;
//! the pool's workers run its real worker loop on loom threads (see `pool/loom_model.rs`).

use std::sync::atomic::AtomicUsize as Count;
use std::sync::atomic::Ordering::SeqCst;

use futures::{Stream, StreamExt, stream};
use loom::future::block_on;

use super::*;
use crate::pool::loom_model::Workers;
use crate::sync::model;

/// What became of the items' futures (bookkeeping of the model, not modelled itself).
#[derive(Default)]
struct Ledger {
    made: Count,
    dropped: Count,
}

/// Item `x`'s future: returns `x * 10` after waiting `waits` times, waking itself each time (an
/// item whose I/O is ready at once), or never if `waits` is `None` (it only ends by being
/// cancelled). Counts its drop.
struct Item {
    x: u32,
    waits: Option<u32>,
    ledger: Arc<Ledger>,
}

impl Item {
    fn new(x: u32, waits: Option<u32>, ledger: &Arc<Ledger>) -> Self {
        ledger.made.fetch_add(1, SeqCst);
        Self {
            x,
            waits,
            ledger: ledger.clone(),
        }
    }
}

impl Future for Item {
    type Output = u32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
        match self.waits {
            Some(0) => Poll::Ready(self.x * 10),
            Some(n) => {
                self.waits = Some(n - 1);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        self.ledger.dropped.fetch_add(1, SeqCst);
    }
}

/// The channel and the window are back to idle once the stream has ended.
fn assert_idle<U>(core: &Core<U>, items: u64) {
    assert!(core.is_terminated());
    assert_eq!(core.in_pool(), 0, "items left in the window");
    let state = core.chan.lock();
    assert!(
        state.slots.is_empty() && state.done.is_empty(),
        "results left"
    );
    if state.ordered {
        assert_eq!(state.base, items, "a reorder slot skipped or repeated");
    }
}

/// Runs `body` in a loom model on a two-worker pool whose workers run on loom threads; `body`
/// gets the pool and a maker of `Item`s, and returns how many items it made. Afterwards every
/// item made has been dropped exactly once.
fn on_pool(
    body: impl Fn(&WorkerPool, &dyn Fn(u32, Option<u32>) -> Item) -> usize + Sync + Send + 'static,
) {
    on_pool_borrowing(false, body);
}

/// [`on_pool`], with the consumer's thread on the workers' runtime if `borrowing`: the stream
/// then runs its own queued chunks under borrowed slots while the workers take the others.
fn on_pool_borrowing(
    borrowing: bool,
    body: impl Fn(&WorkerPool, &dyn Fn(u32, Option<u32>) -> Item) -> usize + Sync + Send + 'static,
) {
    on_workers(2, borrowing, body);
}

/// [`on_pool_borrowing`] on a pool of `workers` workers.
fn on_workers(
    workers: usize,
    borrowing: bool,
    body: impl Fn(&WorkerPool, &dyn Fn(u32, Option<u32>) -> Item) -> usize + Sync + Send + 'static,
) {
    model(move || {
        let pool = WorkerPool::new(workers);
        let workers = Workers::start(&pool);
        if borrowing {
            workers.serve_here();
        }
        let ledger = Arc::new(Ledger::default());
        let made = body(&pool, &|x, waits| Item::new(x, waits, &ledger));
        workers.stop(pool);
        assert_eq!(ledger.made.load(SeqCst), made);
        assert_eq!(ledger.dropped.load(SeqCst), made);
    });
}

/// Polls `s` to its end; checks that its core (`core(&s)`) is idle after `items` items.
fn run_to_end<S: Stream<Item = u32> + Unpin>(
    mut s: S,
    core: fn(&S) -> &Core<u32>,
    items: u64,
) -> Vec<u32> {
    let out = block_on(s.by_ref().collect());
    assert_idle(core(&s), items);
    out
}

/// Three items on two workers, the middle one waiting once: every result reaches the consumer
/// once, in input order, and the consumer is always woken for it.
#[test]
fn loom_fan_out_ordered_delivers_in_order() {
    on_pool(|pool, item| {
        let waits = [0, 1, 0];
        let make = |x: u32| item(x, Some(waits[x as usize]));
        let s = FanOutOrdered::new(stream::iter(0..3u32), pool.clone(), make);
        assert_eq!(run_to_end(s, |s| &s.core, 3), [0, 10, 20]);
        3
    });
}

/// The same in completion order, the first item waiting: every result once.
#[test]
fn loom_fan_out_unordered_delivers_each_once() {
    on_pool(|pool, item| {
        let make = |x: u32| item(x, Some(u32::from(x == 0)));
        let mut out = run_to_end(
            FanOut::new(stream::iter(0..3u32), pool.clone(), make),
            |s| &s.core,
            3,
        );
        out.sort_unstable();
        assert_eq!(out, [0, 10, 20]);
        3
    });
}

/// Items measured light go to the pool two to a chunk; the first item of a chunk waits, so the
/// chunk splits off its second item, which the other worker may take: results still come in
/// order, each once.
#[test]
fn loom_fan_out_split_chunks_keep_order() {
    on_pool(|pool, item| {
        let make = |x: u32| item(x, Some(u32::from(x == 0)));
        let s = FanOutOrdered::new(stream::iter(0..8u32), pool.clone(), make);
        // Measured light: chunks of n / (2 * workers) = 2 items.
        s.core.chan.item_nanos.store(0, Ordering::Relaxed);
        let want: Vec<u32> = (0..8).map(|x| x * 10).collect();
        assert_eq!(run_to_end(s, |s| &s.core, 8), want);
        8
    });
}

/// The consumer takes the first result and drops the stream while the second item waits on a
/// worker (or is still queued): the worker is woken to drop it, every item's future is dropped
/// exactly once, and the pool ends idle.
#[test]
fn loom_fan_out_dropped_stream_cancels_running_items() {
    on_pool(|pool, item| {
        let mut s = FanOutOrdered::new(stream::iter(0..2u32), pool.clone(), |x| {
            item(x, (x == 0).then_some(0))
        });
        assert_eq!(block_on(s.next()), Some(0));
        2
    });
}

/// A consumer on the workers' runtime runs its own chunks under borrowed slots while the two
/// workers take the others; its chunk whose first item waits is handed to a worker with its
/// slot and its second item split off: results come in order, each once, every future is
/// dropped once, and the pool ends with no slot in use (checked by the harness).
#[test]
fn loom_fan_out_borrowing_consumer_keeps_order() {
    on_pool_borrowing(true, |pool, item| {
        let make = |x: u32| item(x, Some(u32::from(x == 0)));
        let s = FanOutOrdered::new(stream::iter(0..4u32), pool.clone(), make);
        // Measured light: chunks of n / (2 * workers) = 1 item.
        s.core.chan.item_nanos.store(0, Ordering::Relaxed);
        let want: Vec<u32> = (0..4).map(|x| x * 10).collect();
        assert_eq!(run_to_end(s, |s| &s.core, 4), want);
        4
    });
}

/// A worker hands each result over before it starts its chunk's next item, not at the chunk's
/// end (the next item may run for long): one worker, chunks of two items (measured at 1 µs
/// each, not light), and when the second item of a chunk starts, the first one's result is
/// already in the channel (or yielded). Results come in order, each once, and the consumer is
/// always woken for them.
#[test]
fn loom_fan_out_hands_over_each_result_before_the_next_item() {
    on_workers(1, false, |pool, item| {
        let chan: Arc<std::sync::OnceLock<Arc<Chan<u32>>>> = Arc::default();
        let probe = chan.clone();
        let make = move |x: u32| {
            let fut = item(x, Some(0));
            let probe = probe.clone();
            async move {
                if x % 2 == 1 {
                    let chan = probe.get().expect("set before the stream is polled");
                    let state = chan.lock();
                    let before = u64::from(x - 1);
                    assert!(
                        state.base > before
                            || state.slots[(before - state.base) as usize].is_some(),
                        "item {x} started before the result of item {before} was handed over"
                    );
                }
                fut.await
            }
        };
        let s = FanOutOrdered::new(stream::iter(0..8u32), pool.clone(), make);
        // Measured at 1 µs per item: chunks of n / (4 * workers) = 2 items, each outcome
        // handed over as it finishes.
        s.core.chan.item_nanos.store(1_000, Ordering::Relaxed);
        assert!(chan.set(s.core.chan.clone()).is_ok());
        let want: Vec<u32> = (0..8).map(|x| x * 10).collect();
        assert_eq!(run_to_end(s, |s| &s.core, 8), want);
        8
    });
}
