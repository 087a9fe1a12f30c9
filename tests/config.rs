//! Invalid configuration is refused where it is given, naming the parameter: every refusable
//! value has a `try_` twin returning `ConfigError`, and its panicking form says the same.

mod common;

use std::time::Duration;

use common::panic_message;
use futures::stream;
use stagepipe::prelude::*;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Only;

struct Echo;

impl StateMachine for Echo {
    type Stage = Only;
    type Data = u32;
    type Error = String;

    fn start(&self) -> Only {
        Only
    }

    async fn run(&self, _: Only, n: u32) -> Result<Next<Only, u32>, String> {
        Ok(Next::Done(n))
    }
}

fn named<T: std::fmt::Debug>(result: Result<T, ConfigError>, parameter: &str) {
    let err = result.expect_err("refused");
    assert_eq!(err.parameter(), parameter);
    assert!(err.to_string().contains(parameter), "{err}");
}

fn panics_naming<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe, parameter: &str) {
    let payload = std::panic::catch_unwind(f).err().expect("panics");
    let message = panic_message(&*payload);
    assert!(message.contains(parameter), "{message}");
}

#[test]
fn backoff_twins_name_their_parameter() {
    named(Backoff::try_exponential(Duration::ZERO), "initial");
    named(
        Backoff::fixed(Duration::from_millis(1)).try_max_attempts(0),
        "n",
    );
    assert!(Backoff::try_exponential(Duration::from_millis(1)).is_ok());
    panics_naming(|| Backoff::exponential(Duration::ZERO), "initial");
    panics_naming(|| Backoff::fixed(Duration::ZERO).max_attempts(0), "n");
}

#[test]
fn limiter_burst_twins_name_their_parameter() {
    named(RateLimiter::per_second(10).try_burst(0), "b");
    named(KeyedRateLimiter::<u32>::per_second(10).try_burst(0), "b");
    assert_eq!(
        RateLimiter::per_second(10)
            .try_burst(3)
            .unwrap()
            .burst_size(),
        3
    );
    panics_naming(|| RateLimiter::per_second(10).burst(0), "b");
}

#[test]
fn pipeline_builder_twins_name_their_parameter() {
    named(
        Pipeline::builder(Echo).try_workers(0).map(|_| ()),
        "workers",
    );
    named(Pipeline::builder(Echo).try_window(0).map(|_| ()), "window");
    named(
        Pipeline::builder(Echo).try_window(1 << 62).map(|_| ()),
        "window",
    );
    panics_naming(|| Pipeline::builder(Echo).window(1 << 62), "window");
}

#[tokio::test]
async fn a_huge_group_window_is_refused_at_the_builder_not_at_open() {
    let pipeline = Pipeline::builder(Echo).workers(1).build();
    named(pipeline.group().try_window(1 << 62).map(|_| ()), "window");
    named(pipeline.group().try_window(0).map(|_| ()), "window");
    // The largest accepted window opens a group that works.
    let (tx, results) = pipeline.group().try_window(1 << 30).unwrap().open();
    tx.submit(7).await.unwrap();
    drop(tx);
    let out: Vec<_> = futures::StreamExt::collect::<Vec<_>>(results).await;
    let values: Vec<u32> = out
        .into_iter()
        .map(|r| r.expect("no stage fails"))
        .collect();
    assert_eq!(values, [7]);
}

#[tokio::test]
async fn fan_out_window_twins_name_their_parameter() {
    named(
        stream::iter(0..3u32)
            .fan_out_ordered(1, |x| async move { x })
            .try_window(0)
            .map(|_| ()),
        "window",
    );
    named(
        stream::iter(0..3u32)
            .fan_out(1, |x| async move { x })
            .try_window(1 << 62)
            .map(|_| ()),
        "window",
    );
}

#[test]
fn batching_operators_have_try_new_twins_naming_their_parameter() {
    let wait = Duration::from_millis(10);
    named(
        stagepipe::Batch::try_new(stream::iter(0..3u32), 0, wait),
        "max",
    );
    named(
        stagepipe::Batch::try_new(stream::iter(0..3u32), 2, Duration::ZERO),
        "wait",
    );
    assert!(stagepipe::Batch::try_new(stream::iter(0..3u32), 2, wait).is_ok());
    named(
        stagepipe::BatchDedupe::try_new(stream::iter(0..3u32), 0, wait, |x| *x),
        "max",
    );
    named(
        stagepipe::BatchDedupe::try_new(stream::iter(0..3u32), 2, Duration::ZERO, |x| *x),
        "wait",
    );
    if let Ok(huge) = usize::try_from(u64::from(u32::MAX) + 1) {
        named(
            stagepipe::BatchDedupe::try_new(stream::iter(0..3u32), huge, wait, |x| *x),
            "max",
        );
    }
    named(
        stagepipe::Debounce::try_new(stream::iter(0..3u32), Duration::ZERO),
        "quiet",
    );
    named(
        stagepipe::DedupeBy::try_new(stream::iter(0..3u32), Duration::ZERO, 8, |x| *x),
        "window",
    );
    named(
        stagepipe::DedupeBy::try_new(stream::iter(0..3u32), wait, 0, |x| *x),
        "capacity",
    );
    let rows = || stream::iter([Ok::<u32, String>(1)]);
    named(stagepipe::TryBatch::try_new(rows(), 0, wait), "max");
    named(
        stagepipe::TryBatch::try_new(rows(), 1, Duration::ZERO),
        "wait",
    );

    // The operators panic with the same message, at the call.
    panics_naming(|| stream::iter(0..3u32).batch(0, wait), "max");
    panics_naming(|| stream::iter(0..3u32).batch(1, Duration::ZERO), "wait");
    panics_naming(
        || stream::iter(0..3u32).batch_dedupe(0, wait, |x| *x),
        "max",
    );
    panics_naming(|| stream::iter(0..3u32).debounce(Duration::ZERO), "quiet");
    panics_naming(
        || stream::iter(0..3u32).dedupe_by(wait, 0, |x| *x),
        "capacity",
    );
    panics_naming(|| rows().try_batch(0, wait), "max");
}

#[test]
fn handle_twins_name_their_parameter() {
    named(InFlightLimit::try_new(0), "limit");
    named(InFlightLimit::try_new(usize::MAX), "limit");
    panics_naming(|| InFlightLimit::from(0), "limit");
    panics_naming(|| InFlightLimit::from(usize::MAX), "limit");
    named(KeyedRateLimiter::<u32>::try_per_second(0), "rate");
    named(KeyedRateLimiter::<u32>::try_per(Duration::ZERO), "period");
    named(RateLimiter::try_per(Duration::ZERO), "period");
    named(
        CircuitBreaker::try_new(0, Duration::from_secs(1)),
        "failure_threshold",
    );
    named(CircuitBreaker::try_new(3, Duration::ZERO), "open_for");
    named(
        Call::new(|x: u32| async move { Ok::<_, String>(x) }).try_timeout(Duration::ZERO),
        "timeout",
    );
    named(WorkerPool::try_new(0), "workers");
    panics_naming(|| WorkerPool::from(0), "workers");
}

#[tokio::test]
async fn keyed_fan_out_window_twins_name_their_parameter() {
    let by_key = || stream::iter(0..3u32).fan_out_by_key(1, |x| *x, |x| async move { x });
    named(by_key().try_window(0).map(|_| ()), "window");
    named(by_key().try_window(1 << 62).map(|_| ()), "window");
    let oks = || stream::iter([Ok::<u32, String>(1)]);
    named(
        oks()
            .try_fan_out(1, |x| async move { Ok(x) })
            .try_window(0)
            .map(|_| ()),
        "window",
    );
}

#[test]
fn adaptive_limit_twins_name_their_parameter() {
    named(InFlightLimit::try_adaptive(0, 10), "min");
    named(InFlightLimit::try_adaptive(0, 0), "min");
    named(InFlightLimit::try_adaptive(11, 10), "min");
    named(InFlightLimit::try_adaptive(1, usize::MAX), "max");
    let err = InFlightLimit::try_adaptive(11, 10).unwrap_err();
    assert!(err.to_string().contains("max"), "{err}");
    panics_naming(|| InFlightLimit::adaptive(0, 10), "min");
    panics_naming(|| InFlightLimit::adaptive(5, 4), "min");
    panics_naming(|| InFlightLimit::adaptive(1, usize::MAX), "max");
    let limit = InFlightLimit::try_adaptive(3, 3).expect("min == max is a fixed range");
    assert_eq!((limit.current(), limit.in_use()), (3, 0));
}

#[test]
fn adaptive_pool_twins_name_their_parameter() {
    named(WorkerPool::try_adaptive(0, 4), "min");
    named(WorkerPool::try_adaptive(0, 0), "min");
    named(WorkerPool::try_adaptive(5, 4), "min");
    panics_naming(|| WorkerPool::adaptive(0, 4), "min");
    panics_naming(|| WorkerPool::adaptive(3, 2), "min");
    let pool = WorkerPool::try_adaptive(4, 4).expect("min == max is a fixed size");
    assert_eq!((pool.workers(), pool.max_workers()), (4, 4));
}
