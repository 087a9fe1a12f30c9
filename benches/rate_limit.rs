//! Achieved rate against the configured one, on the real clock: `rate_limit` beside governor's
//! `until_ready` and a tokio `interval` pacer, at 1k/s, 10k/s and 100k/s, with burst 1 and
//! burst 100.
//!
//! Before the criterion groups, each variant runs once for about 0.5 s and prints
//! `achieved/configured = (items - burst) / (rate * elapsed)`: the items released beyond the
//! initial burst, per second, over the configured rate (1.00 is exact, above 1.00 would break the
//! quota). Criterion then reports each variant's throughput (elements per second) on shorter
//! runs that include the initial burst.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::MissedTickBehavior;

const RATES: [u32; 3] = [1_000, 10_000, 100_000];
const BURSTS: [u32; 2] = [1, 100];

#[derive(Clone, Copy, Debug)]
enum Pacer {
    Stagepipe,
    GovernorUntilReady,
    TokioInterval,
}

impl Pacer {
    const ALL: [Pacer; 3] = [
        Pacer::Stagepipe,
        Pacer::GovernorUntilReady,
        Pacer::TokioInterval,
    ];

    fn name(self) -> &'static str {
        match self {
            Pacer::Stagepipe => "stagepipe_rate_limit",
            Pacer::GovernorUntilReady => "governor_until_ready",
            Pacer::TokioInterval => "tokio_interval",
        }
    }
}

/// Passes `n` items at `rate` with `burst`; returns how many came out.
async fn run(pacer: Pacer, rate: u32, burst: u32, n: u64) -> u64 {
    match pacer {
        Pacer::Stagepipe => {
            let limiter = RateLimiter::per_second(rate).burst(burst);
            stream::iter(0..n)
                .rate_limit(&limiter)
                .fold(0u64, |acc, x| async move { acc + black_box(x).min(1) })
                .await
        }
        Pacer::GovernorUntilReady => {
            let quota = governor::Quota::per_second(NonZeroU32::new(rate).unwrap())
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let limiter = governor::RateLimiter::direct(quota);
            let mut count = 0;
            for x in 0..n {
                limiter.until_ready().await;
                count += black_box(x).min(1);
            }
            count
        }
        Pacer::TokioInterval => {
            // The obvious hand-written pacer: one tick per item (no burst).
            let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut count = 0;
            for x in 0..n {
                ticks.tick().await;
                count += black_box(x).min(1);
            }
            count
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One ~0.5 s run per variant; prints achieved/configured.
fn report(rt: &tokio::runtime::Runtime) {
    println!("achieved/configured rate, real clock, ~0.5 s per run:");
    for rate in RATES {
        for burst in BURSTS {
            for pacer in Pacer::ALL {
                let n = u64::from(rate / 2 + burst);
                let start = Instant::now();
                let out = rt.block_on(run(pacer, rate, burst, n));
                let elapsed = start.elapsed().as_secs_f64();
                let ratio = (out - u64::from(burst)) as f64 / (f64::from(rate) * elapsed);
                println!(
                    "  {:>7}/s burst {:>3}  {:<22} {:.4}  ({out} items in {elapsed:.3} s)",
                    rate,
                    burst,
                    pacer.name(),
                    ratio
                );
            }
        }
    }
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    report(&rt);
    for rate in RATES {
        for burst in BURSTS {
            let mut group = c.benchmark_group(format!("rate_{rate}_burst_{burst}"));
            // 50 ms of items per iteration, plus the burst
            let n = u64::from(rate / 20 + burst);
            group
                .throughput(Throughput::Elements(n))
                .sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(1));
            for pacer in Pacer::ALL {
                group.bench_function(BenchmarkId::new(pacer.name(), n), |b| {
                    b.to_async(&rt).iter(|| run(pacer, rate, burst, n))
                });
            }
            group.finish();
        }
    }
}

criterion_group!(rate_limit, benches);
criterion_main!(rate_limit);
