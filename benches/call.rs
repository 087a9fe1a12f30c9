//! Per-call overhead of `Call` on the success path: every layer on (a rate limit with a huge
//! quota, an in-flight limit, a circuit breaker, retry, stats and a timeout), beside the same
//! closure awaited directly and a `Call` with no layers.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use stagepipe::prelude::*;

const ITEMS: u64 = 100_000;

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The user's operation: trivial, always succeeds.
    let f = |x: u64| async move { Ok::<_, String>(black_box(x).wrapping_mul(3)) };

    let bare = Call::new(f);
    let all = rt.block_on(async {
        Call::new(f)
            .timeout(Duration::from_secs(1))
            .rate_limit(RateLimiter::per_second(u32::MAX).burst(1_000_000))
            .in_flight(1024)
            .circuit_breaker(CircuitBreaker::new(5, Duration::from_secs(1)))
            .retry(Backoff::exponential(Duration::from_millis(10)).max_attempts(3))
            .stats(CallStats::new("bench"))
    });

    let one: Vec<(&str, Call<_, _>)> = rt.block_on(async {
        vec![
            ("timeout", Call::new(f).timeout(Duration::from_secs(1))),
            (
                "rate_limit",
                Call::new(f).rate_limit(RateLimiter::per_second(u32::MAX).burst(1_000_000)),
            ),
            ("in_flight", Call::new(f).in_flight(1024)),
            (
                "breaker",
                Call::new(f).circuit_breaker(CircuitBreaker::new(5, Duration::from_secs(1))),
            ),
            ("stats", Call::new(f).stats(CallStats::new("one"))),
        ]
    });
    let mut group = c.benchmark_group("call_one_layer");
    group
        .throughput(Throughput::Elements(ITEMS))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (name, call) in &one {
        group.bench_function(BenchmarkId::new(*name, ITEMS), |b| {
            b.to_async(&rt).iter(|| async {
                let mut acc = 0u64;
                for x in 0..ITEMS {
                    acc = acc.wrapping_add(call.run(x).await.unwrap_or(0));
                }
                acc
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("call_overhead");
    group
        .throughput(Throughput::Elements(ITEMS))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function(BenchmarkId::new("closure_awaited", ITEMS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for x in 0..ITEMS {
                acc = acc.wrapping_add(f(x).await.unwrap_or(0));
            }
            acc
        })
    });
    group.bench_function(BenchmarkId::new("call_no_layers", ITEMS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for x in 0..ITEMS {
                acc = acc.wrapping_add(bare.run(x).await.unwrap_or(0));
            }
            acc
        })
    });
    group.bench_function(BenchmarkId::new("call_all_layers", ITEMS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for x in 0..ITEMS {
                acc = acc.wrapping_add(all.run(x).await.unwrap_or(0));
            }
            acc
        })
    });
    group.finish();
    let s = all.get_stats().unwrap().snapshot();
    assert_eq!(s.calls, s.successes);
    assert_eq!((s.retries, s.timeouts, s.rejected), (0, 0, 0));
}

criterion_group!(benches_call, benches);
criterion_main!(benches_call);
