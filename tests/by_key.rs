//! `fan_out_by_key`: equal keys one after another in input order, different keys in parallel.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Gauge, Rng, panic_message};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Random keys and delays: per key at most one running and started in input order; output in
/// input order; nothing lost or duplicated; different keys overlap.
#[tokio::test(start_paused = true)]
async fn equal_keys_run_serially_in_input_order_and_output_keeps_input_order() {
    for seed in 0..32 {
        let mut rng = Rng::new(seed);
        let n = 1 + rng.below(300) as usize;
        let keys = 1 + rng.below(6);
        let workers = 1 + rng.below(6) as usize;
        let window = 1 + rng.below(30) as usize;
        let items: Vec<(usize, u64, u64)> = (0..n)
            .map(|i| (i, rng.below(keys), rng.below(20)))
            .collect();
        let gauges: Arc<Vec<Gauge>> = Arc::new((0..keys).map(|_| Gauge::default()).collect());
        let all = Gauge::default();
        let started: Arc<Mutex<HashMap<u64, Vec<usize>>>> = Arc::default();
        let out: Vec<usize> = stream::iter(items.clone())
            .fan_out_by_key(workers, |(_, key, _)| *key, {
                let (gauges, all, started) = (gauges.clone(), all.clone(), started.clone());
                move |(i, key, delay)| {
                    let (gauges, all, started) = (gauges.clone(), all.clone(), started.clone());
                    async move {
                        let _key = gauges[key as usize].enter();
                        let _all = all.enter();
                        started.lock().unwrap().entry(key).or_default().push(i);
                        sleep(ms(delay)).await;
                        i
                    }
                }
            })
            .window(window)
            .collect()
            .await;
        let what = format!("seed {seed}: n {n}, keys {keys}, workers {workers}, window {window}");
        assert_eq!(out, (0..n).collect::<Vec<_>>(), "{what}");
        for (key, gauge) in gauges.iter().enumerate() {
            assert!(
                gauge.max() <= 1,
                "{what}: key {key} ran {} at once",
                gauge.max()
            );
        }
        let started = started.lock().unwrap();
        for (key, order) in started.iter() {
            let want: Vec<usize> = items
                .iter()
                .filter(|(_, k, _)| k == key)
                .map(|(i, _, _)| *i)
                .collect();
            assert_eq!(order, &want, "{what}: key {key} started out of order");
        }
        assert_eq!(all.live(), 0);
    }
}

/// Two keys run at the same instant; one key alone runs one item at a time.
#[tokio::test(start_paused = true)]
async fn different_keys_overlap_and_one_key_does_not() {
    let running = Gauge::default();
    let job = |running: Gauge| {
        move |(i, _key): (u32, u32)| {
            let running = running.clone();
            async move {
                let _guard = running.enter();
                sleep(ms(10)).await;
                i
            }
        }
    };
    let start = Instant::now();
    let out: Vec<u32> = stream::iter((0..10u32).map(|i| (i, i % 2)))
        .fan_out_by_key(4, |(_, key)| *key, job(running.clone()))
        .collect()
        .await;
    assert_eq!(out, (0..10).collect::<Vec<_>>());
    assert_eq!(running.max(), 2, "two keys at the same instant");
    assert_eq!(
        start.elapsed(),
        ms(50),
        "five items per key, one after another"
    );

    let running = Gauge::default();
    let start = Instant::now();
    let out: Vec<u32> = stream::iter((0..10u32).map(|i| (i, 7)))
        .fan_out_by_key(4, |(_, key)| *key, job(running.clone()))
        .collect()
        .await;
    assert_eq!(out, (0..10).collect::<Vec<_>>());
    assert_eq!(running.max(), 1);
    assert_eq!(start.elapsed(), ms(100));
}

/// A key's waiting items hold no worker: with one worker and a long run of one key, another
/// key's item still gets through as soon as the worker is free.
#[tokio::test(start_paused = true)]
async fn a_waiting_item_holds_no_worker() {
    let start = Instant::now();
    let done_at: Arc<Mutex<HashMap<u32, Duration>>> = Arc::default();
    let items = [(0u32, "a"), (1, "a"), (2, "a"), (3, "b")];
    let out: Vec<u32> = stream::iter(items)
        .fan_out_by_key(1, |(_, key)| *key, {
            let done_at = done_at.clone();
            move |(i, _)| {
                let done_at = done_at.clone();
                async move {
                    sleep(ms(10)).await;
                    done_at.lock().unwrap().insert(i, start.elapsed());
                    i
                }
            }
        })
        .collect()
        .await;
    assert_eq!(out, [0, 1, 2, 3]);
    let done_at = done_at.lock().unwrap();
    assert_eq!(
        done_at[&3],
        ms(20),
        "b runs right after a's first item, before a's second"
    );
    assert_eq!(done_at[&2], ms(40));
}

#[tokio::test(start_paused = true)]
async fn the_window_bounds_what_the_stream_holds() {
    let window = 6;
    let pulled = Arc::new(AtomicUsize::new(0));
    let source = stream::iter(0..200u32).inspect({
        let pulled = pulled.clone();
        move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut s = Box::pin(
        source
            .fan_out_by_key(
                4,
                |i| i % 3,
                |i| async move {
                    // Key 0 is slow, so its items park and finished items of other keys wait.
                    sleep(ms(if i % 3 == 0 { 30 } else { 1 })).await;
                    i
                },
            )
            .window(window),
    );
    let mut out = Vec::new();
    let mut max_held = 0;
    while let Some(i) = s.next().await {
        // Held when this item was yielded: pulled and not yielded before it.
        let held = pulled.load(Ordering::SeqCst) - out.len();
        out.push(i);
        assert!(held <= window, "{held} items held");
        assert!(s.held() < window);
        max_held = max_held.max(held);
    }
    assert_eq!(out, (0..200).collect::<Vec<_>>());
    assert_eq!(max_held, window, "the window fills");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_drops_parked_queued_and_running_items() {
    let pool = WorkerPool::new(2);
    let live = Gauge::default();
    let mut s = Box::pin(
        stream::iter(0..100u32)
            .map({
                let live = live.clone();
                move |i| (i, live.enter())
            })
            .fan_out_by_key(
                &pool,
                |(i, _)| i % 4,
                |(i, guard)| async move {
                    let _guard = guard;
                    sleep(Duration::from_secs(3600)).await;
                    i
                },
            )
            .window(10),
    );
    assert!(futures::poll!(s.next()).is_pending());
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        live.live(),
        10,
        "a window of ten: four keys in the pool, six parked"
    );
    drop(s);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(live.live(), 0, "every item dropped");
    let v: Vec<u32> = stream::iter(0..4u32)
        .fan_out_by_key(&pool, |i| *i, |i| async move { i })
        .collect()
        .await;
    assert_eq!(v, [0, 1, 2, 3], "the workers are free again");
}

#[tokio::test(start_paused = true)]
async fn many_distinct_keys_are_forgotten_and_results_stay_right() {
    let out: Vec<u64> = stream::iter(0..5000u64)
        .fan_out_by_key(3, |i| i / 2, |i| async move { i * 2 })
        .window(8)
        .collect()
        .await;
    assert_eq!(out, (0..5000).map(|i| i * 2).collect::<Vec<_>>());
}

#[tokio::test]
async fn zero_window_is_refused_naming_the_parameter() {
    let s = || stream::iter(0..1u32).fan_out_by_key(1, |i| *i, |i| async move { i });
    let panic = std::panic::catch_unwind(|| s().window(0)).unwrap_err();
    assert!(panic_message(&*panic).contains("`window`"));
    assert_eq!(s().try_window(0).unwrap_err().parameter(), "window");
    let panic = std::panic::catch_unwind(|| {
        stream::iter(0..1u32).fan_out_by_key(0, |i| *i, |i| async move { i })
    })
    .unwrap_err();
    assert!(panic_message(&*panic).contains("`workers`"));
}
