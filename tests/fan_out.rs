//! `fan_out_ordered` / `fan_out` and the shared `WorkerPool`.

mod common;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gauge, Rng, panic_message};
use futures::{FutureExt, StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::sleep;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Random inputs, delays, pool sizes and windows: order kept, nothing lost or duplicated.
#[tokio::test(start_paused = true)]
async fn ordered_keeps_input_order_under_random_delays() {
    for seed in 0..64 {
        let mut rng = Rng::new(seed);
        let n = 1 + rng.below(300) as usize;
        let workers = 1 + rng.below(8) as usize;
        let window = 1 + rng.below(40) as usize;
        let delays: Vec<u64> = (0..n).map(|_| rng.below(20)).collect();
        let pool = WorkerPool::new(workers);
        let delays = Arc::new(delays);
        let out: Vec<usize> = stream::iter(0..n)
            .fan_out_ordered(&pool, {
                let delays = delays.clone();
                move |i| {
                    let d = delays[i];
                    async move {
                        sleep(ms(d)).await;
                        i * 3
                    }
                }
            })
            .window(window)
            .collect()
            .await;
        let expected: Vec<usize> = (0..n).map(|i| i * 3).collect();
        assert_eq!(
            out, expected,
            "seed {seed}: n {n}, workers {workers}, window {window}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn unordered_yields_the_same_multiset_in_completion_order() {
    for seed in 0..32 {
        let mut rng = Rng::new(seed);
        let n = 1 + rng.below(200) as usize;
        let delays: Arc<Vec<u64>> = Arc::new((0..n).map(|_| 1 + rng.below(50)).collect());
        let out: Vec<(u64, usize)> = stream::iter(0..n)
            .fan_out(n, {
                let delays = delays.clone();
                move |i| {
                    let d = delays[i];
                    async move {
                        sleep(ms(d)).await;
                        (d, i)
                    }
                }
            })
            .collect()
            .await;
        let mut seen: Vec<usize> = out.iter().map(|&(_, i)| i).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "seed {seed}");
        // With as many workers as items, everything starts at once: completion order is delay order.
        assert!(
            out.windows(2).all(|w| w[0].0 <= w[1].0),
            "seed {seed}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pool_caps_concurrency_across_streams() {
    let pool = WorkerPool::new(2);
    let running = Gauge::default();
    let job = |running: Gauge| {
        move |i: u32| {
            let running = running.clone();
            async move {
                let _guard = running.enter();
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                i
            }
        }
    };
    let a = stream::iter(0..500u32).fan_out_ordered(&pool, job(running.clone()));
    let b = stream::iter(0..500u32).fan_out(pool.clone(), job(running.clone()));
    let (a, mut b): (Vec<u32>, Vec<u32>) = tokio::join!(a.collect(), b.collect());
    b.sort_unstable();
    assert_eq!(a, (0..500).collect::<Vec<_>>());
    assert_eq!(b, (0..500).collect::<Vec<_>>());
    assert_eq!(
        running.max(),
        2,
        "never more than the pool's two workers at once"
    );
    assert_eq!(running.live(), 0);
}

/// A stream with a huge backlog does not starve a small stream on the same one-worker pool.
#[tokio::test(start_paused = true)]
async fn a_huge_stream_does_not_starve_a_small_one() {
    let pool = WorkerPool::new(1);
    let big_done = Arc::new(AtomicUsize::new(0));
    let big = stream::iter(0..1_000_000u32)
        .fan_out(&pool, {
            let big_done = big_done.clone();
            move |i| {
                let big_done = big_done.clone();
                async move {
                    sleep(ms(1)).await;
                    big_done.fetch_add(1, Ordering::SeqCst);
                    i
                }
            }
        })
        .window(100_000);
    let big_task = tokio::spawn(big.for_each(|_| async {}));
    // Let the big stream fill the pool with its backlog first.
    tokio::task::yield_now().await;
    sleep(ms(5)).await;
    let before = big_done.load(Ordering::SeqCst);
    let small: Vec<u32> = stream::iter(0..10u32)
        .fan_out_ordered(&pool, |i| async move {
            sleep(ms(1)).await;
            i
        })
        .collect()
        .await;
    assert_eq!(small, (0..10).collect::<Vec<_>>());
    let big_while_small = big_done.load(Ordering::SeqCst) - before;
    // Round-robin: the big stream got about as many turns as the small one (a worker takes at
    // most a chunk of 32 jobs per turn), not its 100,000-item backlog.
    assert!(
        big_while_small <= 11 * 32,
        "the big stream ran {big_while_small} items meanwhile"
    );
    big_task.abort();
}

/// One item 100x slower than the rest: the reorder buffer, and what is pulled from upstream,
/// stay within the window.
#[tokio::test(start_paused = true)]
async fn window_bounds_outstanding_items_behind_a_straggler() {
    let window = 8;
    let outstanding = Arc::new(AtomicUsize::new(0));
    let max_outstanding = Arc::new(AtomicUsize::new(0));
    let pulled = Arc::new(AtomicUsize::new(0));
    let source = stream::iter(0..200u32).inspect({
        let pulled = pulled.clone();
        move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut s = Box::pin(
        source
            .fan_out_ordered(4, {
                let outstanding = outstanding.clone();
                let max_outstanding = max_outstanding.clone();
                move |i| {
                    let now = outstanding.fetch_add(1, Ordering::SeqCst) + 1;
                    max_outstanding.fetch_max(now, Ordering::SeqCst);
                    async move {
                        sleep(ms(if i == 3 { 1000 } else { 10 })).await;
                        i
                    }
                }
            })
            .window(window),
    );
    let mut out = Vec::new();
    while let Some(i) = s.next().await {
        outstanding.fetch_sub(1, Ordering::SeqCst);
        assert!(pulled.load(Ordering::SeqCst) <= out.len() + 1 + window);
        out.push(i);
    }
    assert_eq!(out, (0..200).collect::<Vec<_>>());
    assert_eq!(max_outstanding.load(Ordering::SeqCst), window);
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_raised_at_its_place_and_the_pool_keeps_serving() {
    let pool = WorkerPool::new(2);
    let mut got = Vec::new();
    let mut s = Box::pin(
        stream::iter(0..10u32).fan_out_ordered(&pool, |i| async move {
            sleep(ms(u64::from(10 - i))).await; // later items finish first
            assert_ne!(i, 5, "item five is broken");
            i
        }),
    );
    let caught = AssertUnwindSafe(async {
        while let Some(i) = s.next().await {
            got.push(i);
        }
    })
    .catch_unwind()
    .await;
    let payload = caught.expect_err("the panic reaches the consumer");
    assert!(panic_message(&*payload).contains("item five is broken"));
    assert_eq!(got, [0, 1, 2, 3, 4], "every earlier item first");
    drop(s);

    // The same pool still serves another stream.
    let again: Vec<u32> = stream::iter(0..20u32)
        .fan_out_ordered(&pool, |i| async move { i + 1 })
        .collect()
        .await;
    assert_eq!(again, (1..21).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_drops_queued_and_running_futures() {
    let pool = WorkerPool::new(2);
    let live = Gauge::default();
    let mut s = Box::pin(
        stream::iter(0..100u32)
            .fan_out_ordered(&pool, {
                let live = live.clone();
                move |i| {
                    let guard = live.enter();
                    async move {
                        let _guard = guard;
                        sleep(Duration::from_secs(3600)).await;
                        i
                    }
                }
            })
            .window(10),
    );
    assert!(futures::poll!(s.next()).is_pending());
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        live.live(),
        10,
        "a window of ten futures: two running, eight queued"
    );
    drop(s);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(live.live(), 0, "queued and running futures are dropped");

    // The workers are free again.
    let v: Vec<u32> = stream::iter(0..4u32)
        .fan_out(&pool, |i| async move { i })
        .collect()
        .await;
    assert_eq!(v.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_send_and_run_inside_spawned_tasks() {
    let pool = WorkerPool::new(2);
    let tasks: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                stream::iter(0..1000u64)
                    .fan_out_ordered(&pool, move |i| async move { i * t })
                    .collect::<Vec<_>>()
                    .await
            })
        })
        .collect();
    for (t, task) in tasks.into_iter().enumerate() {
        let out = task.await.unwrap();
        assert_eq!(out, (0..1000).map(|i| i * t as u64).collect::<Vec<_>>());
    }
}

#[test]
fn zero_workers_are_refused_naming_the_parameter() {
    let err = WorkerPool::try_new(0).unwrap_err();
    assert_eq!(err.parameter(), "workers");
    assert!(err.to_string().contains("workers"));

    let panic = std::panic::catch_unwind(|| WorkerPool::new(0)).unwrap_err();
    assert!(panic_message(&*panic).contains("workers"));

    let panic =
        std::panic::catch_unwind(|| stream::iter(0..1u32).fan_out_ordered(0, |i| async move { i }))
            .unwrap_err();
    assert!(panic_message(&*panic).contains("workers"));
}

#[tokio::test]
async fn zero_window_is_refused_naming_the_parameter() {
    let panic = std::panic::catch_unwind(|| {
        stream::iter(0..1u32)
            .fan_out(1, |i| async move { i })
            .window(0)
    })
    .unwrap_err();
    assert!(panic_message(&*panic).contains("window"));
}

#[tokio::test]
async fn empty_input_ends_at_once() {
    let out: Vec<u32> = stream::iter(Vec::<u32>::new())
        .fan_out_ordered(3, |i| async move { i })
        .collect()
        .await;
    assert!(out.is_empty());
}
