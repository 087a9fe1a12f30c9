//! Staged pipelines: three trivial stages, 1M requests, the three shapes of the Go stagedpipe
//! benchmark (one unordered group, 100 groups, one ordered group), and the same requests over
//! 1 to 10,000 concurrent ordered groups (items/s and resident memory should stay flat). Run
//! the Go anchor in the same session to compare items/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use stagepipe::prelude::*;

const REQUESTS: u64 = 1_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Step {
    Start,
    Two,
    Three,
}

struct Plus;

impl StateMachine for Plus {
    type Stage = Step;
    type Data = u64;
    type Error = std::convert::Infallible;

    fn start(&self) -> Step {
        Step::Start
    }

    async fn run(&self, stage: Step, n: u64) -> Result<Next<Step, u64>, Self::Error> {
        Ok(match stage {
            Step::Start => Next::Stage(Step::Two, n + 1),
            Step::Two => Next::Stage(Step::Three, n + 1),
            Step::Three => Next::Done(n + 1),
        })
    }
}

/// Submits `ids` to one group and sums its results; checks the count.
async fn one_group(pipeline: &Pipeline<Plus>, ordered: bool, ids: std::ops::Range<u64>) -> u64 {
    let builder = pipeline.group();
    let builder = if ordered { builder.ordered() } else { builder };
    let (tx, results) = builder.open();
    let n = ids.end - ids.start;
    let feeder = tokio::spawn(async move {
        for id in ids {
            tx.submit(id).await.unwrap();
        }
    });
    let (count, sum) = results
        .fold(
            (0u64, 0u64),
            |(c, s), r| async move { (c + 1, s + r.unwrap()) },
        )
        .await;
    feeder.await.unwrap();
    assert_eq!(count, n);
    sum
}

async fn groups(pipeline: &Pipeline<Plus>, g: u64) -> u64 {
    let per = REQUESTS / g;
    let tasks: Vec<_> = (0..g)
        .map(|i| {
            let p = pipeline.clone();
            tokio::spawn(async move { one_group(&p, true, i * per..(i + 1) * per).await })
        })
        .collect();
    let mut sum = 0u64;
    for t in tasks {
        sum += t.await.unwrap();
    }
    sum
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4)
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let pipeline = rt.block_on(async { Pipeline::builder(Plus).workers(2).build() });
    let mut group = c.benchmark_group("staged_3_stages");
    group
        .throughput(Throughput::Elements(REQUESTS))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));

    group.bench_function("single_group_unordered", |b| {
        b.to_async(&rt)
            .iter(|| one_group(&pipeline, false, 0..REQUESTS))
    });
    let before = rss_kib();
    group.bench_function("100_groups", |b| {
        b.to_async(&rt).iter(|| async {
            let per = REQUESTS / 100;
            let tasks: Vec<_> = (0..100)
                .map(|g| {
                    let p = pipeline.clone();
                    tokio::spawn(async move { one_group(&p, false, g * per..(g + 1) * per).await })
                })
                .collect();
            let mut sum = 0u64;
            for t in tasks {
                sum += t.await.unwrap();
            }
            sum
        })
    });
    eprintln!(
        "resident memory around the 100-group runs: {} KiB before, {} KiB after",
        before,
        rss_kib()
    );
    group.bench_function("single_group_ordered", |b| {
        b.to_async(&rt)
            .iter(|| one_group(&pipeline, true, 0..REQUESTS))
    });
    group.finish();
}

/// Request groups at scale: 1M requests spread over G concurrent ordered groups, each fed as
/// fast as it accepts. Prints the peak growth of resident memory seen during each G's runs.
fn group_scaling(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let pipeline = rt.block_on(async { Pipeline::builder(Plus).workers(2).build() });
    let mut group = c.benchmark_group("ordered_groups_3_stages");
    group
        .throughput(Throughput::Elements(REQUESTS))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for g in [1u64, 10, 100, 1_000, 10_000] {
        let (before, peak) = (rss_kib(), PeakRss::start(&rt));
        group.bench_function(BenchmarkId::new("groups", g), |b| {
            b.to_async(&rt).iter(|| groups(&pipeline, g))
        });
        let grew = peak.stop().saturating_sub(before);
        eprintln!(
            "{g} groups: resident memory {before} KiB before, peak growth {grew} KiB ({} KiB per group)",
            grew / g
        );
    }
    group.finish();
    paired(&rt, &pipeline);

    // The groups above run on one pipeline, which has measured its requests by the time the
    // 10,000 groups come: a service's steady state. A fresh pipeline's first wave of 10,000
    // groups sizes its first jobs from nothing; one run, its peak growth printed.
    let fresh = rt.block_on(async { Pipeline::builder(Plus).workers(2).build() });
    let (before, peak) = (rss_kib(), PeakRss::start(&rt));
    let started = std::time::Instant::now();
    rt.block_on(groups(&fresh, 10_000));
    let took = started.elapsed();
    let grew = peak.stop().saturating_sub(before);
    eprintln!(
        "first wave of 10000 groups on a fresh pipeline: {:.2}M items/s, peak growth {grew} KiB ({} KiB per group)",
        REQUESTS as f64 / took.as_secs_f64() / 1e6,
        grew / 10_000
    );
}

/// 10,000 groups against 100, interleaved: each round times 1M requests over 100 groups, then
/// over 10,000, on the same pipeline. Criterion measures one G after the other, seconds
/// apart, and a machine whose speed drifts (a shared host) can move one figure and not the
/// other; a round's two runs are a second apart, so their ratio keeps what the code does.
/// Prints each round's ratio of items/s and their median.
fn paired(rt: &tokio::runtime::Runtime, pipeline: &Pipeline<Plus>) {
    const ROUNDS: usize = 9;
    let time = |g| {
        let started = std::time::Instant::now();
        rt.block_on(groups(pipeline, g));
        started.elapsed().as_secs_f64()
    };
    let mut ratios: Vec<f64> = (0..ROUNDS).map(|_| time(100) / time(10_000)).collect();
    let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    ratios.sort_by(f64::total_cmp);
    eprintln!(
        "10000 groups vs 100, interleaved: items/s ratio {:.2} (median of {ROUNDS} rounds: {})",
        ratios[ROUNDS / 2],
        shown.join(", ")
    );
}

/// The peak resident memory seen every 5 ms, by a task on `rt`, from `start` to `stop`.
struct PeakRss(Arc<AtomicU64>, tokio::task::JoinHandle<()>);

impl PeakRss {
    fn start(rt: &tokio::runtime::Runtime) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let peak = peak.clone();
            rt.spawn(async move {
                loop {
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Self(peak, sampler)
    }

    fn stop(self) -> u64 {
        self.1.abort();
        self.0.load(Ordering::Relaxed)
    }
}

criterion_group!(staged, benches, group_scaling);
criterion_main!(staged);
