//! `in_flight` and the shared `InFlightLimit`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gauge, panic_message};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn a_shared_limit_is_never_exceeded_across_streams() {
    let limit = InFlightLimit::new(3);
    let running = Gauge::default();
    let job = |running: Gauge| {
        move |i: u64| {
            let running = running.clone();
            async move {
                let _guard = running.enter();
                sleep(ms(1 + i % 7)).await;
                i
            }
        }
    };
    let a = stream::iter(0..100u64).in_flight(&limit, job(running.clone()));
    let b = stream::iter(100..200u64).in_flight(limit.clone(), job(running.clone()));
    let watcher = {
        let limit = limit.clone();
        async move {
            let mut max_in_use = 0;
            for _ in 0..50 {
                max_in_use = max_in_use.max(limit.in_use());
                sleep(ms(1)).await;
            }
            max_in_use
        }
    };
    let (mut a, mut b, max_in_use): (Vec<u64>, Vec<u64>, usize) =
        tokio::join!(a.collect(), b.collect(), watcher);
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, (0..100).collect::<Vec<_>>());
    assert_eq!(b, (100..200).collect::<Vec<_>>());
    assert_eq!(running.max(), 3);
    assert_eq!(max_in_use, 3, "in_use reports the running operations");
    assert_eq!(limit.in_use(), 0, "every permit returned");
}

#[tokio::test(start_paused = true)]
async fn a_fast_item_overtakes_a_slow_one() {
    let start = Instant::now();
    let out: Vec<(u32, Duration)> = stream::iter([100u32, 10, 50])
        .in_flight(3, |d| async move {
            sleep(ms(u64::from(d))).await;
            (d, start.elapsed())
        })
        .collect()
        .await;
    assert_eq!(out, [(10, ms(10)), (50, ms(50)), (100, ms(100))]);
}

#[tokio::test(start_paused = true)]
async fn a_limit_of_one_runs_items_one_after_another() {
    let start = Instant::now();
    let out: Vec<(u32, Duration)> = stream::iter([30u32, 10, 20])
        .in_flight(1, |d| async move {
            sleep(ms(u64::from(d))).await;
            (d, start.elapsed())
        })
        .collect()
        .await;
    assert_eq!(out, [(30, ms(30)), (10, ms(40)), (20, ms(60))]);
}

#[tokio::test(start_paused = true)]
async fn futures_may_borrow_local_data() {
    let words = [String::from("alpha"), String::from("be"), String::from("c")];
    let mut lens: Vec<usize> = stream::iter(0..words.len())
        .in_flight(2, |i| {
            let w = &words[i];
            async move { w.len() }
        })
        .collect()
        .await;
    lens.sort_unstable();
    assert_eq!(lens, [1, 2, 5]);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_releases_its_permits() {
    let limit = InFlightLimit::new(2);
    let mut s = Box::pin(stream::iter(0..10u32).in_flight(&limit, |i| async move {
        sleep(Duration::from_secs(3600)).await;
        i
    }));
    assert!(futures::poll!(s.next()).is_pending());
    assert_eq!(limit.in_use(), 2);
    drop(s);
    assert_eq!(limit.in_use(), 0);
}

#[test]
fn zero_limit_is_refused_naming_the_parameter() {
    let err = InFlightLimit::try_new(0).unwrap_err();
    assert_eq!(err.parameter(), "limit");
    let panic = std::panic::catch_unwind(|| InFlightLimit::new(0)).unwrap_err();
    assert!(panic_message(&*panic).contains("limit"));
    let panic =
        std::panic::catch_unwind(|| stream::iter(0..1u32).in_flight(0, |i| async move { i }))
            .unwrap_err();
    assert!(panic_message(&*panic).contains("limit"));
}

// -- in_flight_ordered --

/// Random delays and limits: input order kept, nothing lost or duplicated, and two streams
/// sharing one limit never run more than it together.
#[tokio::test(start_paused = true)]
async fn in_flight_ordered_keeps_order_under_a_shared_limit() {
    for seed in 0..32 {
        let mut rng = common::Rng::new(seed);
        let limit = InFlightLimit::new(1 + rng.below(8) as usize);
        let running = Gauge::default();
        let delays: Vec<u64> = (0..300).map(|_| rng.below(25)).collect();
        let job = |running: Gauge, delays: Vec<u64>| {
            move |i: usize| {
                let (running, d) = (running.clone(), delays[i % delays.len()]);
                async move {
                    let _guard = running.enter();
                    sleep(ms(d)).await;
                    i
                }
            }
        };
        let a = stream::iter(0..150usize)
            .in_flight_ordered(&limit, job(running.clone(), delays.clone()));
        let b = stream::iter(150..300usize).in_flight_ordered(&limit, job(running.clone(), delays));
        let (a, b): (Vec<usize>, Vec<usize>) = tokio::join!(a.collect(), b.collect());
        assert_eq!(a, (0..150).collect::<Vec<_>>(), "seed {seed}");
        assert_eq!(b, (150..300).collect::<Vec<_>>(), "seed {seed}");
        assert!(
            running.max() <= limit.limit(),
            "seed {seed}: {} running",
            running.max()
        );
        if limit.limit() > 1 {
            assert!(running.max() > 1, "seed {seed}: never concurrent");
        }
        assert_eq!(limit.in_use(), 0, "seed {seed}");
    }
}

/// Behind a slow first item, the stream holds at most `limit` items (running or finished) and
/// pulls no further; finished items gave their permits back.
#[tokio::test(start_paused = true)]
async fn in_flight_ordered_buffers_at_most_the_limit_behind_a_slow_item() {
    let limit = InFlightLimit::new(4);
    let pulled = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut s = Box::pin(
        stream::iter(0..20u64)
            .inspect({
                let pulled = pulled.clone();
                move |_| {
                    pulled.fetch_add(1, Ordering::SeqCst);
                }
            })
            .in_flight_ordered(&limit, |i| async move {
                sleep(ms(if i == 0 { 100 } else { 10 })).await;
                i
            }),
    );
    assert!(futures::poll!(s.next()).is_pending());
    tokio::time::advance(ms(50)).await;
    assert!(futures::poll!(s.next()).is_pending());
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        4,
        "a buffer of four, no more pulled"
    );
    assert_eq!(limit.in_use(), 1, "only the slow item holds a permit");
    assert_eq!(s.next().await, Some(0));
    assert_eq!(start.elapsed(), ms(100));
    let rest: Vec<u64> = s.collect().await;
    assert_eq!(rest, (1..20).collect::<Vec<_>>());
}

#[test]
fn in_flight_ordered_refuses_a_zero_limit() {
    let panic = std::panic::catch_unwind(|| {
        stream::iter(0..1u32).in_flight_ordered(0, |i| async move { i })
    })
    .unwrap_err();
    assert!(panic_message(&*panic).contains("`limit`"));
}

/// Dropped while its first item runs and later ones have finished behind it, an ordered stream
/// gives back the units still held (the finished items gave theirs back as they ended).
#[tokio::test(start_paused = true)]
async fn dropping_an_ordered_stream_behind_a_slow_item_releases_its_permits() {
    let limit = InFlightLimit::new(3);
    let mut s = Box::pin(
        stream::iter(0..10u64).in_flight_ordered(&limit, |i| async move {
            sleep(ms(if i == 0 { 3_600_000 } else { 10 })).await;
            i
        }),
    );
    assert!(futures::poll!(s.next()).is_pending());
    assert_eq!(limit.in_use(), 3);
    tokio::time::advance(ms(10)).await;
    assert!(futures::poll!(s.next()).is_pending());
    assert_eq!(
        limit.in_use(),
        1,
        "items 1 and 2 finished, waiting for item 0"
    );
    drop(s);
    assert_eq!(limit.in_use(), 0);
}

/// Items that end in reverse order come out in input order, each as soon as all the earlier
/// ones have.
#[tokio::test(start_paused = true)]
async fn in_flight_ordered_yields_reverse_finishers_in_input_order() {
    let start = Instant::now();
    let out: Vec<(u64, Duration)> = stream::iter(0..8u64)
        .in_flight_ordered(8, |i| async move {
            sleep(ms(80 - 10 * i)).await;
            i
        })
        .map(|i| (i, start.elapsed()))
        .collect()
        .await;
    assert_eq!(out, (0..8).map(|i| (i, ms(80))).collect::<Vec<_>>());
}

/// Units given back without the semaphore's lock reach the callers waiting in its queue: tasks
/// on several threads share one limit through `InFlightLimit::run`, `in_flight`,
/// `in_flight_ordered` and a `Call`, never run more than it together, and all finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn units_given_back_reach_waiters_across_threads() {
    let limit = InFlightLimit::new(3);
    let running = Gauge::default();
    let work = |running: Gauge| async move {
        let _guard = running.enter();
        tokio::task::yield_now().await;
    };
    let mut tasks = Vec::new();
    for task in 0..12 {
        let (limit, running) = (limit.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            match task % 4 {
                0 => {
                    for _ in 0..300 {
                        limit.run(work(running.clone())).await;
                    }
                    300
                }
                1 => {
                    stream::iter(0..300)
                        .in_flight(&limit, |_| work(running.clone()))
                        .count()
                        .await
                }
                2 => {
                    stream::iter(0..300)
                        .in_flight_ordered(&limit, |_| work(running.clone()))
                        .count()
                        .await
                }
                _ => {
                    let call = Call::new(move |_: u32| {
                        let work = work(running.clone());
                        async move {
                            work.await;
                            Ok::<_, String>(())
                        }
                    })
                    .in_flight(&limit);
                    for i in 0..300 {
                        call.run(i).await.unwrap();
                    }
                    300
                }
            }
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 300);
    }
    assert!(running.max() <= 3, "{} running", running.max());
    assert_eq!(limit.in_use(), 0);
}
