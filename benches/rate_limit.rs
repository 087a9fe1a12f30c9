//! Achieved rate against the configured one, on the real clock: `rate_limit` beside governor's
//! `until_ready` and a tokio `interval` pacer, at 1k/s, 10k/s and 100k/s, with burst 1 and
//! burst 100.
//!
//! Before the criterion groups, each variant runs once for about 0.5 s and prints
//! `achieved/configured = (items - burst) / (rate * elapsed)`: the items released beyond the
//! initial burst, per second, over the configured rate (1.00 is exact, above 1.00 would break the
//! quota). Criterion then reports each variant's throughput (elements per second) on shorter
//! runs that include the initial burst.
//!
//! Two environment variables narrow or vary the report (handy for `/usr/bin/time`):
//! `RATE_LIMIT_BENCH_RATES` (comma-separated rates, e.g. `100000`) and
//! `RATE_LIMIT_BENCH_THREADS` (a multi-thread runtime with that many workers instead of the
//! current-thread one). On Linux each line also gives the CPU time the process spent during the
//! run (every thread's, from `/proc/self/task/*/schedstat`).

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

/// The rates to run: [`RATES`], or those listed in `RATE_LIMIT_BENCH_RATES`.
fn rates() -> Vec<u32> {
    match std::env::var("RATE_LIMIT_BENCH_RATES") {
        Ok(list) => list
            .split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .expect("RATE_LIMIT_BENCH_RATES: rates per second")
            })
            .collect(),
        Err(_) => RATES.to_vec(),
    }
}

/// A current-thread runtime, or a multi-thread one with `RATE_LIMIT_BENCH_THREADS` workers.
fn runtime() -> tokio::runtime::Runtime {
    match std::env::var("RATE_LIMIT_BENCH_THREADS") {
        Ok(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(
                n.parse()
                    .expect("RATE_LIMIT_BENCH_THREADS: a number of workers"),
            )
            .enable_all()
            .build()
            .unwrap(),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    }
}

/// CPU time used so far by all of this process's threads (Linux only).
fn cpu_time() -> Option<Duration> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        nanos += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(nanos))
}

/// One ~0.5 s run per variant; prints achieved/configured.
fn report(rt: &tokio::runtime::Runtime) {
    println!("achieved/configured rate, real clock, ~0.5 s per run:");
    for rate in rates() {
        for burst in BURSTS {
            for pacer in Pacer::ALL {
                let n = u64::from(rate / 2 + burst);
                let cpu = cpu_time();
                let start = Instant::now();
                // On a multi-thread runtime, run on a worker (`block_on` would run it on this
                // thread).
                let out =
                    rt.block_on(
                        async move { tokio::spawn(run(pacer, rate, burst, n)).await.unwrap() },
                    );
                let elapsed = start.elapsed().as_secs_f64();
                let ratio = (out - u64::from(burst)) as f64 / (f64::from(rate) * elapsed);
                let cpu = match (cpu, cpu_time()) {
                    (Some(before), Some(after)) => {
                        format!(", cpu {:.0} ms", (after - before).as_secs_f64() * 1e3)
                    }
                    _ => String::new(),
                };
                println!(
                    "  {:>7}/s burst {:>3}  {:<22} {:.4}  ({out} items in {elapsed:.3} s{cpu})",
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
    for rate in rates() {
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
