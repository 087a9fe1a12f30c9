//! loom models of fan-out's result channel (`scripts/loom`): the consumer hands chunks of items
//! to the pool, workers write their results into the stream's [`Chan`] (the reorder slots, or
//! the completion queue) and wake the consumer; a chunk whose item has to wait hands over what
//! it has and splits off the rest; a stream dropped early cancels what runs.
//!
//! The streams are the real [`FanOutOrdered`] and [`FanOut`], polled on loom's main thread;
//! the pool's workers run its real worker loop on loom threads (see `pool/loom_model.rs`).

use std::sync::atomic::AtomicUsize as Count;
use std::sync::atomic::Ordering::SeqCst;

use futures::{StreamExt, stream};
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

/// Three items on two workers, the middle one waiting once: every result reaches the consumer
/// once, in input order, and the consumer is always woken for it.
#[test]
fn loom_fan_out_ordered_delivers_in_order() {
    model(|| {
        let pool = WorkerPool::new(2);
        let workers = Workers::start(&pool);
        let ledger = Arc::new(Ledger::default());
        let waits = [0, 1, 0];
        let items = stream::iter(0..3u32);
        let l = ledger.clone();
        let mut s = FanOutOrdered::new(items, pool.clone(), move |x| {
            Item::new(x, Some(waits[x as usize]), &l)
        });
        let out: Vec<u32> = block_on(s.by_ref().collect());
        assert_eq!(out, [0, 10, 20]);
        assert_idle(&s.core, 3);
        drop(s);
        workers.stop(pool);
        assert_eq!(ledger.dropped.load(SeqCst), 3);
    });
}

/// The same in completion order: every result once.
#[test]
fn loom_fan_out_unordered_delivers_each_once() {
    model(|| {
        let pool = WorkerPool::new(2);
        let workers = Workers::start(&pool);
        let ledger = Arc::new(Ledger::default());
        let waits = [1, 0, 0];
        let items = stream::iter(0..3u32);
        let l = ledger.clone();
        let mut s = FanOut::new(items, pool.clone(), move |x| {
            Item::new(x, Some(waits[x as usize]), &l)
        });
        let mut out: Vec<u32> = block_on(s.by_ref().collect());
        out.sort_unstable();
        assert_eq!(out, [0, 10, 20]);
        assert_idle(&s.core, 3);
        drop(s);
        workers.stop(pool);
        assert_eq!(ledger.dropped.load(SeqCst), 3);
    });
}

/// Items measured light go to the pool two to a chunk; the first item of a chunk waits, so the
/// chunk splits off its second item, which the other worker may take: results still come in
/// order, each once.
#[test]
fn loom_fan_out_split_chunks_keep_order() {
    model(|| {
        let pool = WorkerPool::new(2);
        let workers = Workers::start(&pool);
        let ledger = Arc::new(Ledger::default());
        let items = stream::iter(0..8u32);
        let l = ledger.clone();
        let mut s = FanOutOrdered::new(items, pool.clone(), move |x| {
            Item::new(x, Some(u32::from(x == 0)), &l)
        });
        // Measured light: chunks of n / (2 * workers) = 2 items.
        s.core.chan.item_nanos.store(0, Ordering::Relaxed);
        let out: Vec<u32> = block_on(s.by_ref().collect());
        assert_eq!(out, (0..8).map(|x| x * 10).collect::<Vec<_>>());
        assert_idle(&s.core, 8);
        drop(s);
        workers.stop(pool);
        assert_eq!(ledger.dropped.load(SeqCst), 8);
    });
}

/// The consumer takes the first result and drops the stream while the second item waits on a
/// worker (or is still queued): the worker is woken to drop it, every item's future is dropped
/// exactly once, and the pool ends idle.
#[test]
fn loom_fan_out_dropped_stream_cancels_running_items() {
    model(|| {
        let pool = WorkerPool::new(2);
        let workers = Workers::start(&pool);
        let ledger = Arc::new(Ledger::default());
        let items = stream::iter(0..2u32);
        let l = ledger.clone();
        let mut s = FanOutOrdered::new(items, pool.clone(), move |x| {
            Item::new(x, (x == 0).then_some(0), &l)
        });
        assert_eq!(block_on(s.next()), Some(0));
        drop(s);
        workers.stop(pool);
        assert_eq!(ledger.made.load(SeqCst), 2);
        assert_eq!(ledger.dropped.load(SeqCst), 2);
    });
}
