//! The fallible operators beside their infallible twins, and `in_flight_ordered` beside
//! `futures::StreamExt::buffered`, on trivial items (so the figures are pure overhead).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;

const FAN_OUT_ITEMS: u64 = 1_000_000;
const IN_FLIGHT_ITEMS: u64 = 1_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    n: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .throughput(Throughput::Elements(n))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

fn sum(s: u64, y: u64) -> std::future::Ready<u64> {
    std::future::ready(s.wrapping_add(y))
}

fn try_sum(s: u64, y: Result<u64, u64>) -> std::future::Ready<u64> {
    std::future::ready(s.wrapping_add(y.unwrap_or_else(|e| e)))
}

fn fan_out(c: &mut Criterion) {
    let rt = runtime();
    let pool = rt.block_on(async { WorkerPool::new(2) });
    let n = FAN_OUT_ITEMS;
    let mut group = group(c, "try_fan_out_ordered_trivial", n);
    group.bench_function(BenchmarkId::new("fan_out_ordered", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .fan_out_ordered(&pool, |x| async move { black_box(x) + 1 })
                .fold(0, sum)
        })
    });
    // The same items with a `Result` output, to tell the cost of the wider output from the
    // cost of the error handling.
    group.bench_function(BenchmarkId::new("fan_out_ordered_result_output", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .fan_out_ordered(&pool, |x| async move { Ok::<u64, u64>(black_box(x) + 1) })
                .fold(0, try_sum)
        })
    });
    group.bench_function(BenchmarkId::new("try_fan_out_ordered", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter((0..n).map(Ok::<u64, u64>))
                .try_fan_out_ordered(&pool, |x| async move { Ok(black_box(x) + 1) })
                .fold(0, try_sum)
        })
    });
    group.bench_function(BenchmarkId::new("try_fan_out_ordered_1pct_err", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter((0..n).map(|x| if x % 100 == 0 { Err(x) } else { Ok(x) }))
                .try_fan_out_ordered(&pool, |x| async move { Ok(black_box(x) + 1) })
                .fold(0, try_sum)
        })
    });
    group.finish();
}

fn in_flight(c: &mut Criterion) {
    let rt = runtime();
    let n = IN_FLIGHT_ITEMS;
    let mut group = group(c, "in_flight_ordered_trivial", n);
    group.bench_function(BenchmarkId::new("buffered_16", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .map(|x| async move { black_box(x) + 1 })
                .buffered(16)
                .fold(0, sum)
        })
    });
    group.bench_function(BenchmarkId::new("in_flight_ordered_16", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .in_flight_ordered(16, |x| async move { black_box(x) + 1 })
                .fold(0, sum)
        })
    });
    group.bench_function(BenchmarkId::new("try_in_flight_ordered_16", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter((0..n).map(Ok::<u64, u64>))
                .try_in_flight_ordered(16, |x| async move { Ok(black_box(x) + 1) })
                .fold(0, try_sum)
        })
    });
    group.bench_function(BenchmarkId::new("in_flight_16", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .in_flight(16, |x| async move { black_box(x) + 1 })
                .fold(0, sum)
        })
    });
    group.finish();
}

criterion_group!(try_ops, fan_out, in_flight);
criterion_main!(try_ops);
