//! `fan_out_ordered` / `fan_out` beside what a user would otherwise write, on the same input:
//! a sequential `then`, `buffered(16)`, a spawned task per item under `buffered(16)`, a
//! hand-rolled two-worker channel fan-out with a reorder buffer, and (CPU-bound only) rayon.
//! Then I/O-bound items (a 1 ms sleep each) on an adaptive pool against fixed pools.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use rayon::prelude::*;
use stagepipe::prelude::*;
use tokio::sync::mpsc;

const TRIVIAL_ITEMS: u64 = 1_000_000;
const CPU_ITEMS: u64 = 4_000;
const MIXED_ITEMS: u64 = 100_000;
const IO_ITEMS: u64 = 2_000;

/// A CPU-bound step: `rounds` rounds of a multiply-xorshift mix.
fn spin(x: u64, rounds: u32) -> u64 {
    let mut h = x | 1;
    for _ in 0..rounds {
        h = h
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        h ^= h >> 29;
    }
    h
}

/// Rounds of `spin` that take about 20 µs on this machine.
fn calibrate() -> u32 {
    let rounds = 100_000;
    let start = Instant::now();
    for i in 0..20 {
        black_box(spin(black_box(i), rounds));
    }
    let per_round = start.elapsed().as_secs_f64() / f64::from(20 * rounds);
    (20e-6 / per_round) as u32
}

/// The obvious hand-rolled fan-out: a channel per worker fed round-robin, a result channel, and
/// a reorder buffer keyed by sequence number.
async fn hand_rolled<F>(n: u64, f: F) -> u64
where
    F: Fn(u64) -> u64 + Send + Sync + Copy + 'static,
{
    const WORKERS: usize = 2;
    let (out_tx, mut out_rx) = mpsc::channel::<(u64, u64)>(32);
    let mut inputs = Vec::new();
    for _ in 0..WORKERS {
        let (tx, mut rx) = mpsc::channel::<(u64, u64)>(16);
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            while let Some((seq, x)) = rx.recv().await {
                if out_tx.send((seq, f(x))).await.is_err() {
                    break;
                }
            }
        });
        inputs.push(tx);
    }
    drop(out_tx);
    tokio::spawn(async move {
        for x in 0..n {
            if inputs[(x as usize) % WORKERS].send((x, x)).await.is_err() {
                break;
            }
        }
    });
    let mut pending = BTreeMap::new();
    let mut next = 0;
    let mut sum = 0u64;
    while let Some((seq, y)) = out_rx.recv().await {
        pending.insert(seq, y);
        while let Some(y) = pending.remove(&next) {
            sum = sum.wrapping_add(y);
            next += 1;
        }
    }
    sum
}

fn bench_map(c: &mut Criterion, group_name: &str, n: u64, f: fn(u64) -> u64, rayon_too: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let pool = rt.block_on(async { WorkerPool::new(2) });
    let mut group = c.benchmark_group(group_name);
    group
        .throughput(Throughput::Elements(n))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let sum = |s: u64, y: u64| async move { s.wrapping_add(y) };

    group.bench_function(BenchmarkId::new("sequential_then", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .then(move |x| async move { f(x) })
                .fold(0, sum)
        })
    });
    group.bench_function(BenchmarkId::new("buffered_16", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .map(move |x| async move { f(x) })
                .buffered(16)
                .fold(0, sum)
        })
    });
    group.bench_function(BenchmarkId::new("spawn_buffered_16", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .map(move |x| tokio::spawn(async move { f(x) }))
                .buffered(16)
                .fold(0u64, |s, y| async move { s.wrapping_add(y.unwrap()) })
        })
    });
    group.bench_function(BenchmarkId::new("hand_rolled_2_workers", n), |b| {
        b.to_async(&rt).iter(|| hand_rolled(n, f))
    });
    if rayon_too {
        group.bench_function(BenchmarkId::new("rayon_par_iter", n), |b| {
            b.iter(|| {
                (0..n)
                    .into_par_iter()
                    .map(f)
                    .reduce(|| 0, u64::wrapping_add)
            })
        });
    }
    group.bench_function(BenchmarkId::new("fan_out_ordered", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .fan_out_ordered(&pool, move |x| async move { f(x) })
                .fold(0, sum)
        })
    });
    group.bench_function(BenchmarkId::new("fan_out", n), |b| {
        b.to_async(&rt).iter(|| {
            stream::iter(0..n)
                .fan_out(&pool, move |x| async move { f(x) })
                .fold(0, sum)
        })
    });
    group.finish();
    if rayon_too {
        paired(&rt, &pool, group_name, n, f);
    }
}

/// `fan_out_ordered` against the sequential `then`, interleaved: each round times one run of
/// each, back to back. Criterion measures one after the other, seconds apart, and a machine
/// whose speed drifts (a shared host) can move one figure and not the other; a round's two
/// runs are milliseconds apart, so their ratio keeps what the code does. Prints each round's
/// speed-up and their median.
fn paired(rt: &tokio::runtime::Runtime, pool: &WorkerPool, name: &str, n: u64, f: fn(u64) -> u64) {
    const ROUNDS: usize = 15;
    let time = |parallel: bool| {
        let started = std::time::Instant::now();
        let sum = rt.block_on(async {
            let items = stream::iter(0..n);
            let sum = |s: u64, y: u64| async move { s.wrapping_add(y) };
            match parallel {
                true => {
                    items
                        .fan_out_ordered(pool, move |x| async move { f(x) })
                        .fold(0, sum)
                        .await
                }
                false => items.then(move |x| async move { f(x) }).fold(0, sum).await,
            }
        });
        std::hint::black_box(sum);
        started.elapsed().as_secs_f64()
    };
    let mut speedups: Vec<f64> = (0..ROUNDS).map(|_| time(false) / time(true)).collect();
    let shown: Vec<String> = speedups.iter().map(|r| format!("{r:.2}")).collect();
    speedups.sort_by(f64::total_cmp);
    eprintln!(
        "{name}: fan_out_ordered vs sequential_then, interleaved: speed-up {:.2} (median of {ROUNDS} rounds: {})",
        speedups[ROUNDS / 2],
        shown.join(", ")
    );
}

static ROUNDS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn cpu_bound(x: u64) -> u64 {
    spin(x, *ROUNDS.get().expect("calibrated"))
}

fn trivial(x: u64) -> u64 {
    x + 1
}

/// One item in a hundred is CPU-bound (~20 µs), the rest trivial.
fn mixed(x: u64) -> u64 {
    if x % 100 == 0 { cpu_bound(x) } else { x + 1 }
}

/// `fan_out` of items that each sleep 1 ms (real clock): completion time on an adaptive pool
/// (`adaptive(1, 64)`, built fresh for each run so that it grows from one worker every time,
/// and one kept across runs) against fixed pools of 2, 16 and 64 workers.
fn bench_io_bound(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("io_bound_1ms");
    group
        .throughput(Throughput::Elements(IO_ITEMS))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let run = |pool: WorkerPool| async move {
        stream::iter(0..IO_ITEMS)
            .fan_out(&pool, |x| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                x
            })
            .fold(0u64, |s, y| async move { s.wrapping_add(y) })
            .await
    };
    group.bench_function(BenchmarkId::new("adaptive_1_64_fresh", IO_ITEMS), |b| {
        b.to_async(&rt).iter(|| run(WorkerPool::adaptive(1, 64)))
    });
    let warm = WorkerPool::adaptive(1, 64);
    group.bench_function(BenchmarkId::new("adaptive_1_64_kept", IO_ITEMS), |b| {
        b.to_async(&rt).iter(|| run(warm.clone()))
    });
    for workers in [2, 16, 64] {
        let pool = WorkerPool::new(workers);
        group.bench_function(
            BenchmarkId::new(format!("fixed_{workers}"), IO_ITEMS),
            |b| b.to_async(&rt).iter(|| run(pool.clone())),
        );
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    ROUNDS.get_or_init(calibrate);
    bench_map(c, "trivial_map", TRIVIAL_ITEMS, trivial, false);
    bench_map(c, "cpu_bound_20us", CPU_ITEMS, cpu_bound, true);
    bench_map(c, "mixed_1_in_100_heavy", MIXED_ITEMS, mixed, true);
    bench_io_bound(c);
}

criterion_group!(fan_out, benches);
criterion_main!(fan_out);
