//! `in_flight` and the shared `InFlightLimit`.

mod common;

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
