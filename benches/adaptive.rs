//! An adaptive in-flight limit against fixed ones, over a simulated service on the real clock:
//! latency `FLOOR` up to `KNEE` requests in flight, growing in proportion beyond it. A limit
//! too low (K/4) wastes the service, one too high (4K) only queues inside it (same throughput,
//! four times the latency); the adaptive limit should find the knee by itself.
//!
//! Criterion times `REQUESTS` requests per iteration (throughput); before that, one run of each
//! prints the service latency (mean, p99) its requests saw and where the limit ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::Instant;

const KNEE: usize = 32;
const FLOOR: Duration = Duration::from_millis(5);
const REQUESTS: usize = 2000;

/// The simulated service: how many requests are in it now.
#[derive(Clone, Default)]
struct Service(Arc<AtomicUsize>);

impl Service {
    /// One request: enters at once, takes `FLOOR × max(in_flight, KNEE) / KNEE`, returns the
    /// latency it took.
    fn request(&self) -> impl Future<Output = Duration> + use<> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        let latency = FLOOR * n.max(KNEE) as u32 / KNEE as u32;
        let service = Arc::clone(&self.0);
        async move {
            let start = Instant::now();
            tokio::time::sleep(latency).await;
            service.fetch_sub(1, Ordering::Relaxed);
            start.elapsed()
        }
    }
}

/// Runs `REQUESTS` requests through `limit`; returns their latencies.
async fn run(service: &Service, limit: &InFlightLimit) -> Vec<Duration> {
    stream::iter(0..REQUESTS)
        .in_flight(limit, |_| service.request())
        .collect()
        .await
}

fn limits() -> Vec<(String, Box<dyn Fn() -> InFlightLimit>)> {
    let fixed = |n: usize| -> (String, Box<dyn Fn() -> InFlightLimit>) {
        (
            format!("fixed_{n}"),
            Box::new(move || InFlightLimit::new(n)),
        )
    };
    vec![
        fixed(KNEE / 4),
        fixed(KNEE),
        fixed(4 * KNEE),
        (
            "adaptive_cold".into(),
            Box::new(|| InFlightLimit::adaptive(1, 1000)),
        ),
    ]
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let service = Service::default();

    // One run of each, for the latency the service's requests saw.
    eprintln!(
        "{REQUESTS} requests, service latency {FLOOR:?} up to {KNEE} in flight, proportional beyond"
    );
    eprintln!(
        "{:<16} {:>10} {:>10} {:>10} {:>8}",
        "limit", "time", "mean", "p99", "limit at end"
    );
    let warm = InFlightLimit::adaptive(1, 1000);
    rt.block_on(run(&service, &warm)); // let it find the knee once
    let mut rows = limits();
    rows.push(("adaptive_warm".into(), {
        let warm = warm.clone();
        Box::new(move || warm.clone())
    }));
    for (name, make) in &rows {
        let limit = make();
        let start = std::time::Instant::now();
        let mut latencies = rt.block_on(run(&service, &limit));
        let took = start.elapsed();
        latencies.sort_unstable();
        let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
        let p99 = latencies[latencies.len() * 99 / 100];
        eprintln!(
            "{name:<16} {took:>10.1?} {mean:>10.2?} {p99:>10.2?} {:>8}",
            limit.current()
        );
    }

    let mut group = c.benchmark_group("adaptive_knee");
    group
        .throughput(Throughput::Elements(REQUESTS as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, make) in &rows {
        group.bench_function(BenchmarkId::new(name.as_str(), REQUESTS), |b| {
            b.to_async(&rt).iter(|| {
                let limit = make();
                let service = service.clone();
                async move { run(&service, &limit).await.len() }
            })
        });
    }
    group.finish();
}

criterion_group!(adaptive, benches);
criterion_main!(adaptive);
