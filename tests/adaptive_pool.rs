//! `WorkerPool::adaptive`: grows while added workers raise throughput (I/O-bound work), never
//! for CPU-bound work, retires idle workers back to `min`, and survives its runtime.
//!
//! I/O-bound loads sleep on tokio's paused clock, so their timings are exact and repeatable;
//! the CPU-bound load runs on the real clock, and what it asserts does not depend on timing.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use common::Gauge;
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::runtime::Builder;
use tokio::time::Instant;

const ITEMS: u64 = 2_000;
const LATENCY: Duration = Duration::from_millis(10);

/// Runs `n` items that each wait `LATENCY` through `fan_out` on `pool`; returns the items in
/// arrival order, the time it took on tokio's clock, the most items in flight at once and the
/// most workers the pool reported while items ran.
async fn io_bound(pool: &WorkerPool, n: u64) -> (Vec<u64>, Duration, usize, usize) {
    let in_flight = Gauge::default();
    let most_workers = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let out: Vec<u64> = stream::iter(0..n)
        .fan_out(pool, {
            let (in_flight, most_workers, pool) =
                (in_flight.clone(), most_workers.clone(), pool.clone());
            move |x| {
                let (in_flight, most_workers, pool) =
                    (in_flight.clone(), most_workers.clone(), pool.clone());
                async move {
                    let _in = in_flight.enter();
                    most_workers.fetch_max(pool.workers(), Ordering::Relaxed);
                    tokio::time::sleep(LATENCY).await;
                    x
                }
            }
        })
        .collect()
        .await;
    (
        out,
        started.elapsed(),
        in_flight.max(),
        most_workers.load(Ordering::Relaxed),
    )
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

#[tokio::test(start_paused = true)]
async fn io_bound_work_grows_the_pool_and_beats_one_worker() {
    let pool = WorkerPool::adaptive(1, 32);
    assert_eq!(pool.workers(), 1);
    let (out, adaptive_time, adaptive_in_flight, most) = io_bound(&pool, ITEMS).await;
    assert_eq!(
        sorted(out),
        (0..ITEMS).collect::<Vec<_>>(),
        "every item once"
    );
    assert!(most >= 16, "grew to {most} workers");
    assert!(most <= 32);
    assert!((16..=32).contains(&adaptive_in_flight));

    let fixed = WorkerPool::new(1);
    let (out, fixed_time, fixed_in_flight, _) = io_bound(&fixed, ITEMS).await;
    assert_eq!(sorted(out), (0..ITEMS).collect::<Vec<_>>());
    assert_eq!(fixed_in_flight, 1);
    assert_eq!(fixed_time, LATENCY * ITEMS as u32);
    assert!(
        adaptive_time * 4 < fixed_time,
        "adaptive {adaptive_time:?} against one worker {fixed_time:?}"
    );
}

/// A backend that serves four requests at once: workers beyond four wait in its queue and add
/// nothing, so the steps past it are undone and growth stops near four, far below `max`.
#[tokio::test(start_paused = true)]
async fn growth_stops_where_throughput_stops_rising() {
    let pool = WorkerPool::adaptive(1, 32);
    let backend = Arc::new(tokio::sync::Semaphore::new(4));
    let most = Arc::new(AtomicUsize::new(0));
    let out: Vec<u64> = stream::iter(0..ITEMS)
        .fan_out(&pool, {
            let (pool, most, backend) = (pool.clone(), most.clone(), backend.clone());
            move |x| {
                let (pool, most, backend) = (pool.clone(), most.clone(), backend.clone());
                async move {
                    most.fetch_max(pool.workers(), Ordering::Relaxed);
                    let _permit = backend.acquire().await.unwrap();
                    tokio::time::sleep(LATENCY).await;
                    x
                }
            }
        })
        .collect()
        .await;
    assert_eq!(sorted(out), (0..ITEMS).collect::<Vec<_>>());
    let most = most.load(Ordering::Relaxed);
    assert!((4..=8).contains(&most), "grew to {most} workers");
    assert!(pool.workers() <= 6, "{} workers at the end", pool.workers());
}

/// Growth stops at `max`.
#[tokio::test(start_paused = true)]
async fn growth_stops_at_max() {
    let pool = WorkerPool::adaptive(2, 4);
    let (out, _, in_flight, most) = io_bound(&pool, ITEMS).await;
    assert_eq!(sorted(out), (0..ITEMS).collect::<Vec<_>>());
    assert_eq!(most, 4);
    assert_eq!(in_flight, 4);
    assert_eq!(pool.max_workers(), 4);
}

/// Once the load stops, the workers it added retire after a second parked, down to `min`.
#[tokio::test(start_paused = true)]
async fn idle_workers_retire_to_min_after_the_idle_period() {
    for min in [1, 3] {
        let pool = WorkerPool::adaptive(min, 32);
        let (out, _, _, most) = io_bound(&pool, ITEMS).await;
        assert_eq!(out.len(), ITEMS as usize);
        assert!(most > min);
        let grown = pool.workers();
        assert!(grown > min, "{grown} workers at the end of the load");

        // Not before a second of idling...
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(pool.workers(), grown);
        // ...but then, all of them above `min`.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(pool.workers(), min);
        assert_eq!(pool.busy(), 0);

        // The retired workers are replaced when a load comes back.
        let (out, _, _, most) = io_bound(&pool, ITEMS).await;
        assert_eq!(sorted(out), (0..ITEMS).collect::<Vec<_>>());
        assert!(most > min);
    }
}

/// Spins for about `micros` of CPU time without ever returning `Pending`.
fn burn(micros: u64) -> u64 {
    let until = std::time::Instant::now() + Duration::from_micros(micros);
    let mut x = 0u64;
    while std::time::Instant::now() < until {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}

/// CPU-bound items never leave a job waiting on a pending future, so the pool never grows,
/// however long the queue: growth needs a worker whose job waits.
#[test]
fn cpu_bound_work_does_not_grow_the_pool() {
    let runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = WorkerPool::adaptive(1, 32);
    let most = Arc::new(AtomicUsize::new(0));
    let out: Vec<u64> = runtime.block_on(
        stream::iter(0..4_000u64)
            .fan_out(&pool, {
                let (pool, most) = (pool.clone(), most.clone());
                move |x| {
                    let (pool, most) = (pool.clone(), most.clone());
                    async move {
                        most.fetch_max(pool.workers(), Ordering::Relaxed);
                        burn(50);
                        x
                    }
                }
            })
            .collect(),
    );
    assert_eq!(sorted(out), (0..4_000).collect::<Vec<_>>());
    assert_eq!(most.load(Ordering::Relaxed), 1);
    assert_eq!(pool.workers(), 1);
}

/// The same CPU-bound load with `min` at the runtime's threads: it stays there.
#[test]
fn cpu_bound_work_stays_at_min() {
    let runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = WorkerPool::adaptive(2, 32);
    let out: Vec<u64> = runtime.block_on(
        stream::iter(0..4_000u64)
            .fan_out_ordered(&pool, |x| async move {
                burn(20);
                x
            })
            .collect(),
    );
    assert_eq!(out, (0..4_000).collect::<Vec<_>>());
    assert_eq!(pool.workers(), 2);
}

/// Ordered fan-out and several streams sharing an adaptive pool: every item once, in order
/// where asked.
#[tokio::test(start_paused = true)]
async fn streams_share_an_adaptive_pool() {
    let pool = WorkerPool::adaptive(1, 16);
    let a = stream::iter(0..1_000u64).fan_out_ordered(&pool, |x| async move {
        tokio::time::sleep(LATENCY).await;
        x
    });
    let b = stream::iter(0..1_000u64).fan_out(&pool, |x| async move {
        tokio::time::sleep(LATENCY * 2).await;
        x * 2
    });
    let (a, b): (Vec<u64>, Vec<u64>) = tokio::join!(a.collect(), b.collect());
    assert_eq!(a, (0..1_000).collect::<Vec<_>>());
    assert_eq!(sorted(b), (0..1_000).map(|x| x * 2).collect::<Vec<_>>());
    assert!(pool.workers() > 1);
}

static SHARED: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::adaptive(1, 16));

/// An adaptive pool kept in a `static` serves runtimes one after another: its workers die with
/// the first, the next starts `min` fresh ones and grows them again.
#[test]
fn an_adaptive_pool_serves_runtimes_one_after_another() {
    for round in 0..3 {
        let runtime = Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let (out, _, _, most) = runtime.block_on(io_bound(&SHARED, 500));
        assert_eq!(sorted(out), (0..500).collect::<Vec<_>>(), "round {round}");
        assert!(most > 1, "round {round}: grew to {most}");
        assert!(SHARED.workers() > 1);
        drop(runtime);
        assert_eq!(
            SHARED.workers(),
            1,
            "round {round}: back to `min` with the runtime gone"
        );
    }
}

/// On a runtime without a time driver, the pool still grows and serves (its idle workers stay,
/// since they cannot time their idling).
#[test]
fn a_runtime_without_timers_still_works() {
    let runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let pool = WorkerPool::adaptive(1, 8);
    // Items wait on each other, not on a timer: each waits for the next item's turn.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let out: Vec<u64> = runtime.block_on(
        stream::iter(0..2_000u64)
            .fan_out(&pool, {
                let gate = gate.clone();
                move |x| {
                    let gate = gate.clone();
                    async move {
                        gate.add_permits(1);
                        gate.acquire().await.unwrap().forget();
                        tokio::task::yield_now().await;
                        x
                    }
                }
            })
            .collect(),
    );
    assert_eq!(sorted(out), (0..2_000).collect::<Vec<_>>());
    assert!(pool.workers() >= 1);
}
