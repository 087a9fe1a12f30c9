//! Per-call overhead of `retry` and `circuit_breaker` on the success path, beside the plain
//! call, on the same input: as stream operators (beside `then`) and as wrappers of one async
//! call (beside awaiting it directly).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;

const ITEMS: u64 = 1_000_000;

/// The user's operation: trivial, always succeeds.
async fn op(x: u64) -> Result<u64, String> {
    Ok(black_box(x).wrapping_mul(3))
}

fn sum(acc: u64, r: Result<u64, impl Sized>) -> futures::future::Ready<u64> {
    futures::future::ready(acc.wrapping_add(r.map_or(0, |v| v)))
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backoff = Backoff::exponential(Duration::from_millis(10)).max_attempts(5);
    let breaker = rt.block_on(async { CircuitBreaker::new(5, Duration::from_secs(1)) });

    let mut group = c.benchmark_group("stream_success_path");
    group
        .throughput(Throughput::Elements(ITEMS))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function(BenchmarkId::new("plain_then", ITEMS), |b| {
        b.to_async(&rt)
            .iter(|| stream::iter(0..ITEMS).then(op).fold(0, sum))
    });
    group.bench_function(BenchmarkId::new("retry", ITEMS), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..ITEMS)
                .retry(backoff.clone(), op)
                .fold(0, sum)
        })
    });
    group.bench_function(BenchmarkId::new("circuit_breaker", ITEMS), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..ITEMS)
                .circuit_breaker(&breaker, op)
                .fold(0, sum)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("call_success_path");
    group
        .throughput(Throughput::Elements(ITEMS))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function(BenchmarkId::new("plain_await", ITEMS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for x in 0..ITEMS {
                acc = acc.wrapping_add(op(x).await.unwrap_or(0));
            }
            acc
        })
    });
    group.bench_function(BenchmarkId::new("backoff_retry", ITEMS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for x in 0..ITEMS {
                acc = acc.wrapping_add(backoff.retry(|| op(x)).await.unwrap_or(0));
            }
            acc
        })
    });
    group.bench_function(BenchmarkId::new("breaker_call", ITEMS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for x in 0..ITEMS {
                acc = acc.wrapping_add(breaker.call(op(x)).await.unwrap_or(0));
            }
            acc
        })
    });
    group.finish();
}

criterion_group!(resilience, benches);
criterion_main!(resilience);
