//! Request groups at scale: 1M trivial requests through three stages on two workers, spread
//! over G concurrent ordered groups, each fed as fast as it accepts. Items/s should stay flat as
//! G grows, and resident memory should grow by the groups' windows of data, not of futures.
//! Prints the peak growth of resident memory seen during each G's runs.

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

async fn one_group(pipeline: Pipeline<Plus>, ids: std::ops::Range<u64>) -> u64 {
    let (tx, results) = pipeline.group().ordered().open();
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
        .map(|i| tokio::spawn(one_group(pipeline.clone(), i * per..(i + 1) * per)))
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
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn benches(c: &mut Criterion) {
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
        let peak = Arc::new(AtomicU64::new(0));
        let before = rss_kib();
        let sampler = {
            let peak = peak.clone();
            rt.spawn(async move {
                loop {
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        group.bench_function(BenchmarkId::new("groups", g), |b| {
            b.to_async(&rt).iter(|| groups(&pipeline, g))
        });
        sampler.abort();
        let grew = peak.load(Ordering::Relaxed).saturating_sub(before);
        eprintln!(
            "{g} groups: resident memory {before} KiB before, peak growth {grew} KiB ({} KiB per group)",
            grew / g
        );
    }
    group.finish();
}

criterion_group!(staged_groups, benches);
criterion_main!(staged_groups);
