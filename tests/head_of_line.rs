//! A slow item never holds back items that are ready and have a free worker: the scenario a
//! user of `buffer_unordered` would try, on tokio's paused clock.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Gauge;
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};

const ITEMS: u64 = 4608;
const SLOW: [u64; 6] = [0, 31, 700, 2048, 3333, 4607];

/// Item `i`: `(i, when it finished)`, one second late for the slow ones.
async fn item(i: u64, start: Instant) -> (u64, Duration) {
    if SLOW.contains(&i) {
        sleep(Duration::from_secs(1)).await;
    }
    (i, start.elapsed())
}

fn check_ready_items_at_once(label: &str, yielded: &[(u64, Duration, Duration)]) {
    assert_eq!(yielded.len(), ITEMS as usize, "{label}: every item, once");
    let mut seen: Vec<u64> = yielded.iter().map(|&(i, _, _)| i).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..ITEMS).collect::<Vec<_>>(), "{label}");
    for &(i, finished, _) in yielded {
        let expected = if SLOW.contains(&i) {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        assert_eq!(finished, expected, "{label}: item {i} finished late");
    }
}

#[tokio::test(start_paused = true)]
async fn fan_out_yields_every_ready_item_while_slow_ones_wait() {
    let pool = WorkerPool::new(8);
    let start = Instant::now();
    let yielded: Vec<(u64, Duration, Duration)> = stream::iter(0..ITEMS)
        .fan_out(&pool, move |i| item(i, start))
        .map(|(i, finished)| (i, finished, start.elapsed()))
        .collect()
        .await;
    check_ready_items_at_once("fan_out", &yielded);
    let held_back: Vec<u64> = yielded
        .iter()
        .filter(|&&(i, _, out)| !SLOW.contains(&i) && out > Duration::ZERO)
        .map(|&(i, _, _)| i)
        .collect();
    assert_eq!(held_back, [] as [u64; 0], "ready items yielded late");
}

#[tokio::test(start_paused = true)]
async fn fan_out_ordered_computes_items_behind_a_slow_one_without_waiting() {
    let pool = WorkerPool::new(8);
    let start = Instant::now();
    let yielded: Vec<(u64, Duration, Duration)> = stream::iter(0..ITEMS)
        .fan_out_ordered(&pool, move |i| item(i, start))
        .window(ITEMS as usize)
        .map(|(i, finished)| (i, finished, start.elapsed()))
        .collect()
        .await;
    check_ready_items_at_once("fan_out_ordered", &yielded);
    let order: Vec<u64> = yielded.iter().map(|&(i, _, _)| i).collect();
    assert_eq!(order, (0..ITEMS).collect::<Vec<_>>(), "input order");
}

#[tokio::test(start_paused = true)]
async fn a_narrow_window_still_runs_every_item_it_holds() {
    // Behind a slow head, an ordered stream with a window of 64 computes the 63 items after it
    // at once (it may not pull further: the window bounds the reorder buffer).
    let pool = WorkerPool::new(8);
    let finished_at_zero = Arc::new(AtomicUsize::new(0));
    let counter = finished_at_zero.clone();
    let start = Instant::now();
    let mut s = Box::pin(
        stream::iter(0..1000u64)
            .fan_out_ordered(&pool, move |i| {
                let counter = counter.clone();
                async move {
                    if i == 0 {
                        sleep(Duration::from_secs(1)).await;
                    } else if start.elapsed() == Duration::ZERO {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    i
                }
            })
            .window(64),
    );
    assert_eq!(s.next().await, Some(0));
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(finished_at_zero.load(Ordering::SeqCst), 63);
    let rest: Vec<u64> = s.collect().await;
    assert_eq!(rest, (1..1000).collect::<Vec<_>>());
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Only;

struct Sleepy {
    start: Instant,
}

impl StateMachine for Sleepy {
    type Stage = Only;
    type Data = (u64, Duration);
    type Error = String;

    fn start(&self) -> Only {
        Only
    }

    async fn run(
        &self,
        _: Only,
        (i, _): (u64, Duration),
    ) -> Result<Next<Only, Self::Data>, String> {
        Ok(Next::Done(item(i, self.start).await))
    }
}

#[tokio::test(start_paused = true)]
async fn an_unordered_group_yields_every_ready_item_while_slow_ones_wait() {
    let start = Instant::now();
    let pipeline = Pipeline::builder(Sleepy { start }).workers(8).build();
    let (tx, results) = pipeline.group().open();
    let submit = async move {
        for i in 0..ITEMS {
            tx.submit((i, Duration::ZERO))
                .await
                .expect("the group is open");
        }
    };
    let collect = results
        .map(|r| {
            let (i, finished) = r.expect("no stage fails");
            (i, finished, start.elapsed())
        })
        .collect::<Vec<_>>();
    let ((), yielded) = tokio::join!(submit, collect);
    check_ready_items_at_once("unordered group", &yielded);
    let late = yielded
        .iter()
        .filter(|&&(i, _, out)| !SLOW.contains(&i) && out > Duration::ZERO)
        .count();
    assert_eq!(late, 0, "ready requests yielded late");
}

#[tokio::test(start_paused = true)]
async fn a_lazily_fed_fan_out_uses_its_whole_window() {
    for window in [4, 8, 16] {
        let running = Gauge::default();
        let r = running.clone();
        let n: usize = stream::iter(0..100u32)
            .then(|i| async move {
                sleep(Duration::from_millis(1)).await; // one item per millisecond
                i
            })
            .fan_out(WorkerPool::new(64), move |i| {
                let guard = r.enter();
                async move {
                    let _guard = guard;
                    sleep(Duration::from_millis(100)).await;
                    i
                }
            })
            .window(window)
            .count()
            .await;
        assert_eq!(n, 100);
        assert_eq!(
            running.max(),
            window,
            "window {window}: items running at once"
        );
    }
}
