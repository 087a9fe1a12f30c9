//! `with_stats`: exact counts and where the time goes, on a paused clock.

use std::time::Duration;

use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::sleep;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn counts_items_exactly_across_streams_sharing_a_handle() {
    let stats = Stats::new("shared");
    let a = stream::iter(0..1234u32).with_stats(&stats).count();
    let b = stream::iter(0..766u32).with_stats(stats.clone()).count();
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a, b), (1234, 766));
    assert_eq!(stats.snapshot().items, 2000);
}

/// A slow source (10 ms per item) and a fast consumer: the point waits on upstream.
#[tokio::test(start_paused = true)]
async fn an_upstream_bound_point_waits_on_upstream() {
    let stats = Stats::new("after-source");
    let n = stream::iter(0..20u32)
        .then(|i| async move {
            sleep(ms(10)).await;
            i
        })
        .with_stats(&stats)
        .count()
        .await;
    assert_eq!(n, 20);
    let s = stats.snapshot();
    assert_eq!(s.items, 20);
    assert_eq!(s.upstream_wait, ms(200));
    assert_eq!(s.downstream_wait, Duration::ZERO);
    assert_eq!(s.elapsed, ms(200));
    assert_eq!(s.items_per_sec(), 100.0);
}

/// A fast source and a slow consumer (10 ms per item): the point waits on downstream.
#[tokio::test(start_paused = true)]
async fn a_downstream_bound_point_waits_on_downstream() {
    let stats = Stats::new("before-sink");
    stream::iter(0..20u32)
        .with_stats(&stats)
        .for_each(|_| sleep(ms(10)))
        .await;
    let s = stats.snapshot();
    assert_eq!(s.items, 20);
    assert_eq!(s.upstream_wait, Duration::ZERO);
    assert_eq!(s.downstream_wait, ms(200));
}

/// Two points around a slow operator tell which side is the bottleneck.
#[tokio::test(start_paused = true)]
async fn two_points_locate_a_slow_operator() {
    let before = Stats::new("before");
    let after = Stats::new("after");
    stream::iter(0..10u32)
        .with_stats(&before)
        .in_flight(1, |i| async move {
            sleep(ms(50)).await;
            i
        })
        .with_stats(&after)
        .for_each(|_| async {})
        .await;
    let (b, a) = (before.snapshot(), after.snapshot());
    assert_eq!((b.items, a.items), (10, 10));
    assert_eq!(
        a.upstream_wait,
        ms(500),
        "after the operator: starved by it"
    );
    assert_eq!(a.downstream_wait, Duration::ZERO);
    assert_eq!(b.upstream_wait, Duration::ZERO);
    assert!(
        b.downstream_wait >= ms(400),
        "before the operator: held back by it"
    );
}

#[tokio::test(start_paused = true)]
async fn timed_runs_and_display() {
    let stats = Stats::new("stage");
    stats.record_run(ms(10), false);
    stats.record_run(ms(30), true);
    let s = stats.snapshot();
    assert_eq!((s.runs, s.errors, s.max, s.mean()), (2, 1, ms(30), ms(20)));
    let line = s.to_string();
    assert!(line.starts_with("stage: 0 items"), "{line}");
    assert!(line.contains("2 runs, 1 errors"), "{line}");
}
