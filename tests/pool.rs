//! The shared `WorkerPool` under hostile use: futures that panic while being dropped, and
//! fan-outs nested on the pool that runs them.
//!
//! These run on real threads (a multi-thread runtime), where a dead worker or a deadlock shows
//! as a hang; `guard` turns a hang into a failure. It bounds waiting only, never asserts a time.

mod common;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::panic_message;
use futures::{FutureExt, StreamExt, stream};
use stagepipe::prelude::*;

/// Fails the test instead of hanging forever.
async fn guard<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(out) => out,
        Err(_) => panic!("hung: {what}"),
    }
}

/// Waits until no worker of `pool` is busy (a worker marks itself idle just after it handed
/// over its last result, so this may take a moment).
async fn idle(pool: &WorkerPool) {
    guard("the pool to become idle", async {
        while pool.busy() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Panics when dropped if `armed`; counts its drops.
struct PanicOnDrop {
    armed: bool,
    drops: Arc<AtomicUsize>,
}

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
        if self.armed {
            panic!("dropped a broken future");
        }
    }
}

/// Drains `s`, catching each re-raised panic: `Ok(value)` or `Err(message)` per item.
async fn drain_catching<S: futures::Stream<Item = u32> + Unpin>(
    mut s: S,
) -> Vec<Result<u32, String>> {
    let mut out = Vec::new();
    loop {
        match AssertUnwindSafe(s.next()).catch_unwind().await {
            Ok(Some(v)) => out.push(Ok(v)),
            Ok(None) => return out,
            Err(payload) => out.push(Err(panic_message(&*payload))),
        }
    }
}

/// Waits once, then yields `value`; holds its bomb until the future itself is dropped (an
/// `async` block would drop its locals while it is still being polled).
struct Finishes {
    value: u32,
    waited: bool,
    _bomb: PanicOnDrop,
}

impl Future for Finishes {
    type Output = u32;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<u32> {
        if self.waited {
            return std::task::Poll::Ready(self.value);
        }
        self.waited = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

fn future_with_drop_bomb(i: u32, bad: u32, drops: &Arc<AtomicUsize>) -> Finishes {
    Finishes {
        value: i * 10,
        waited: false,
        _bomb: PanicOnDrop {
            armed: i == bad,
            drops: drops.clone(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_panicking_in_drop_after_it_finished_is_raised_at_its_place() {
    for workers in [1, 2] {
        for ordered in [true, false] {
            let pool = WorkerPool::new(workers);
            let drops = Arc::new(AtomicUsize::new(0));
            let f = {
                let drops = drops.clone();
                move |i| future_with_drop_bomb(i, 7, &drops)
            };
            let out = if ordered {
                guard(
                    "ordered stream",
                    drain_catching(Box::pin(stream::iter(0..40u32).fan_out_ordered(&pool, f))),
                )
                .await
            } else {
                guard(
                    "unordered stream",
                    drain_catching(Box::pin(stream::iter(0..40u32).fan_out(&pool, f))),
                )
                .await
            };
            let case = format!("workers {workers}, ordered {ordered}");
            assert_eq!(out.len(), 40, "{case}: one outcome per item: {out:?}");
            let errors: Vec<&String> = out.iter().filter_map(|r| r.as_ref().err()).collect();
            assert_eq!(errors.len(), 1, "{case}: {out:?}");
            assert!(errors[0].contains("dropped a broken future"), "{case}");
            let mut values: Vec<u32> = out
                .iter()
                .filter_map(|r| r.as_ref().ok().copied())
                .collect();
            if ordered {
                assert_eq!(out[7], Err(errors[0].clone()), "{case}: at its place");
            } else {
                values.sort_unstable();
            }
            let expected: Vec<u32> = (0..40).filter(|&i| i != 7).map(|i| i * 10).collect();
            assert_eq!(values, expected, "{case}");
            assert_eq!(drops.load(Ordering::SeqCst), 40, "{case}");
            idle(&pool).await; // a dead worker would stay marked busy

            // Every worker is alive: as many concurrent blocking items as workers complete.
            let again: Vec<u32> = guard(
                "pool after the panic",
                stream::iter(0..(workers as u32 * 8))
                    .fan_out(&pool, |i| async move { i })
                    .collect(),
            )
            .await;
            assert_eq!(again.len(), workers * 8, "{case}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_future_panicking_in_drop_does_not_kill_its_worker() {
    let pool = WorkerPool::new(1);
    let drops = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let mut s = Box::pin(stream::iter(0..4u32).fan_out_ordered(&pool, {
        let drops = drops.clone();
        let started = started.clone();
        move |_| {
            let bomb = PanicOnDrop {
                armed: true,
                drops: drops.clone(),
            };
            let started = started.clone();
            async move {
                let _bomb = bomb;
                started.notify_one();
                std::future::pending::<u32>().await
            }
        }
    }));
    assert!(futures::poll!(s.next()).is_pending());
    guard("the first item to start", started.notified()).await;
    // The running future and the queued ones panic as they are dropped: nobody is left to see
    // those panics, and neither the worker nor the stream's owner dies of them.
    drop(s);
    guard("every future dropped", async {
        while drops.load(Ordering::SeqCst) < 4 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let v: Vec<u32> = guard(
        "the pool's one worker after the panics",
        stream::iter(0..10u32)
            .fan_out_ordered(&pool, |i| async move { i + 1 })
            .collect(),
    )
    .await;
    assert_eq!(v, (1..11).collect::<Vec<_>>());
    idle(&pool).await;
}

/// `fan_out` inside `fan_out`, both on `pool`: each outer item sums its own inner fan-out.
async fn nested_sums(pool: &WorkerPool, outer: u64, inner: u64, ordered: bool) -> Vec<u64> {
    let inner_pool = pool.clone();
    let f = move |o: u64| {
        let pool = inner_pool.clone();
        async move {
            let items = stream::iter(0..inner);
            if ordered {
                items
                    .fan_out_ordered(&pool, move |i| async move { o * 1000 + i })
                    .fold(0, |a, b| async move { a + b })
                    .await
            } else {
                items
                    .fan_out(&pool, move |i| async move {
                        tokio::task::yield_now().await;
                        o * 1000 + i
                    })
                    .fold(0, |a, b| async move { a + b })
                    .await
            }
        }
    };
    let mut out: Vec<u64> = stream::iter(0..outer).fan_out(pool, f).collect().await;
    out.sort_unstable();
    out
}

fn expected_sums(outer: u64, inner: u64) -> Vec<u64> {
    (0..outer)
        .map(|o| (0..inner).map(|i| o * 1000 + i).sum())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_nested_on_its_own_pool_completes() {
    for (workers, outer, inner) in [(1, 1, 10), (1, 3, 50), (2, 4, 50), (2, 16, 600), (3, 9, 40)] {
        for ordered in [true, false] {
            let pool = WorkerPool::new(workers);
            let got = guard(
                &format!("{workers} workers, {outer} × {inner}, ordered {ordered}"),
                nested_sums(&pool, outer, inner, ordered),
            )
            .await;
            assert_eq!(got, expected_sums(outer, inner), "{workers} workers");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_levels_of_nesting_on_one_worker_complete() {
    let pool = WorkerPool::new(1);
    let p1 = pool.clone();
    let out: Vec<u64> = guard(
        "three levels",
        stream::iter(0..3u64)
            .fan_out_ordered(&pool, move |a| {
                let p2 = p1.clone();
                async move {
                    let p3 = p2.clone();
                    stream::iter(0..3u64)
                        .fan_out_ordered(&p2, move |b| {
                            let p4 = p3.clone();
                            async move {
                                stream::iter(0..3u64)
                                    .fan_out_ordered(
                                        &p4,
                                        move |c| async move { a * 100 + b * 10 + c },
                                    )
                                    .fold(0, |x, y| async move { x + y })
                                    .await
                            }
                        })
                        .fold(0, |x, y| async move { x + y })
                        .await
                }
            })
            .collect(),
    )
    .await;
    let expected: Vec<u64> = (0..3u64)
        .map(|a| {
            (0..3u64)
                .flat_map(|b| (0..3u64).map(move |c| a * 100 + b * 10 + c))
                .sum()
        })
        .collect();
    assert_eq!(out, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_pipeline_sharing_its_pool_with_a_nested_fan_out_completes() {
    // A pool passed down to library code that fans out on it again, from every worker at once.
    let pool = WorkerPool::new(2);
    let hits = Arc::new(AtomicUsize::new(0));
    let p = pool.clone();
    let h = hits.clone();
    let sums: Vec<u64> = guard(
        "nested under load",
        stream::iter(0..8u64)
            .fan_out_ordered(&pool, move |o| {
                let p = p.clone();
                let h = h.clone();
                async move {
                    stream::iter(0..100u64)
                        .fan_out(&p, move |i| {
                            let h = h.clone();
                            async move {
                                h.fetch_add(1, Ordering::SeqCst);
                                o + i
                            }
                        })
                        .fold(0, |a, b| async move { a + b })
                        .await
                }
            })
            .collect(),
    )
    .await;
    assert_eq!(sums, (0..8u64).map(|o| 100 * o + 4950).collect::<Vec<_>>());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        800,
        "every inner item ran exactly once"
    );
    idle(&pool).await;
}

#[tokio::test(start_paused = true)]
async fn nested_work_run_inline_keeps_the_pools_cap_on_running_futures() {
    // One worker: the outer item holds it, so its inner items run inline, one at a time.
    let pool = WorkerPool::new(1);
    let running = common::Gauge::default();
    let p = pool.clone();
    let r = running.clone();
    let out: Vec<Vec<u64>> = stream::iter(0..2u64)
        .fan_out_ordered(&pool, move |o| {
            let p = p.clone();
            let r = r.clone();
            async move {
                stream::iter(0..5u64)
                    .fan_out_ordered(&p, move |i| {
                        let r = r.clone();
                        async move {
                            let _running = r.enter();
                            tokio::time::sleep(Duration::from_millis(10 * (5 - i))).await;
                            o * 10 + i
                        }
                    })
                    .collect()
                    .await
            }
        })
        .collect()
        .await;
    assert_eq!(out, [vec![0, 1, 2, 3, 4], vec![10, 11, 12, 13, 14]]);
    assert_eq!(
        running.max(),
        1,
        "never more inner futures at once than workers"
    );
    assert_eq!(running.live(), 0);
}

#[test]
fn polling_outside_a_runtime_says_so_and_leaves_the_pool_usable() {
    let pool = WorkerPool::new(1);
    let p = pool.clone();
    let payload = std::panic::catch_unwind(AssertUnwindSafe(move || {
        let mut s = stream::iter(0..3u32).fan_out_ordered(&p, |i| async move { i });
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let _ = futures::Stream::poll_next(std::pin::Pin::new(&mut s), &mut cx);
    }))
    .expect_err("polling outside a runtime panics");
    let message = panic_message(&*payload);
    assert!(message.contains("outside a tokio runtime"), "{message}");

    // The pool was not marked as started: used inside a runtime afterwards, it works.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out: Vec<u32> = rt.block_on(guard(
        "the pool after a use outside a runtime",
        stream::iter(0..3u32)
            .fan_out_ordered(&pool, |i| async move { i * 2 })
            .collect(),
    ));
    assert_eq!(out, [0, 2, 4]);
}

/// A leaf item: counted in `running` while it runs, it spins briefly (light enough that
/// consumers run such items themselves, long enough for other threads to run leaves meanwhile)
/// and yields to the runtime once in a while, so that its job has to wait and is resumed
/// elsewhere.
async fn counted_leaf(running: common::Gauge, x: u64) -> u64 {
    let _running = running.enter();
    let mut h = x | 1;
    for round in 0..200u32 {
        h = std::hint::black_box(h.wrapping_mul(6364136223846793005).wrapping_add(1));
        if round == 100 && x % 7 == 0 {
            tokio::task::yield_now().await;
        }
    }
    std::hint::black_box(h);
    x
}

/// Streams polled by their own tasks may run their queued items themselves under a slot
/// borrowed from the pool, on threads other than the workers'. Counted across two such
/// streams and a third whose items fan out again on the same pool (nested), on more runtime
/// threads than workers: never more leaf futures at once than the pool has workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn borrowed_slots_keep_the_cap_across_streams_and_nested_use() {
    for workers in [1, 2, 3] {
        let pool = WorkerPool::new(workers);
        let running = common::Gauge::default();
        let plain = |ordered: bool| {
            let (pool, running) = (pool.clone(), running.clone());
            tokio::spawn(async move {
                let items = stream::iter(0..3_000u64);
                let f = move |x| counted_leaf(running.clone(), x);
                let mut out: Vec<u64> = match ordered {
                    true => items.fan_out_ordered(&pool, f).collect().await,
                    false => items.fan_out(&pool, f).collect().await,
                };
                out.sort_unstable();
                out
            })
        };
        let (a, b) = (plain(true), plain(false));
        let (p, r) = (pool.clone(), running.clone());
        let nested = tokio::spawn(
            stream::iter(0..6u64)
                .fan_out_ordered(&pool, move |o| {
                    let (p, r) = (p.clone(), r.clone());
                    async move {
                        stream::iter(0..300u64)
                            .fan_out(&p, move |i| counted_leaf(r.clone(), o * 1000 + i))
                            .fold(0, |s, y| async move { s + y })
                            .await
                    }
                })
                .collect::<Vec<u64>>(),
        );
        let (a, b, nested) = guard("three streams on one pool", async {
            (a.await, b.await, nested.await)
        })
        .await;
        let all: Vec<u64> = (0..3_000).collect();
        assert_eq!(a.expect("no panic"), all);
        assert_eq!(b.expect("no panic"), all);
        let sums: Vec<u64> = (0..6u64).map(|o| 300_000 * o + 44_850).collect();
        assert_eq!(nested.expect("no panic"), sums);
        assert!(
            running.max() <= workers,
            "{} leaf futures ran at once on a pool of {workers}",
            running.max()
        );
        assert_eq!(running.live(), 0);
    }
}
