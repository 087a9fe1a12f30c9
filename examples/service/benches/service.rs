//! The service example under load: 50 clients × 200 trivial items each, over real HTTP on
//! 127.0.0.1, through the shared pipeline, versus the same service written the way one would
//! without it: a `tokio::spawn` per item (no shared pool), collected with `buffered` (the same
//! contract: results in submission order) or `buffer_unordered` (completion order, a weaker
//! contract, for reference).
//!
//! Criterion measures requests/s; a fixed number of extra rounds afterwards measures the p99
//! latency of a job (post to last line) and of an item (post to its line), printed per variant.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::post;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use stagepipe_service::app::{Config, Jobs, Line, Service};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

const CLIENTS: i64 = 50;
const ITEMS: i64 = 200;
/// Items of one job in progress at once in the baseline: the service's job window.
fn window() -> usize {
    config().job_window
}

/// Trivial items: no upstream (the call stage answers locally), limits that never bind.
fn config() -> Config {
    Config {
        upstream: None,
        workers: 2,
        upstream_in_flight: 1 << 20,
        rate_per_second: 1_000_000_000,
        burst: 1_000_000,
        breaker_threshold: u32::MAX,
        retry_attempts: 1,
        ..Config::default()
    }
}

/// The baselines' `POST /jobs`: the same machine, run inline in a task per item.
async fn spawn_jobs(State((jobs, ordered)): State<(Arc<Jobs>, bool)>, body: Bytes) -> Body {
    let inputs: Vec<i64> = serde_json::from_slice(&body).unwrap();
    let tasks = stream::iter(inputs.into_iter().enumerate()).map(move |(index, input)| {
        let jobs = jobs.clone();
        tokio::spawn(async move { (index, input, jobs.process(input).await) })
    });
    let done = if ordered {
        tasks.buffered(window()).left_stream()
    } else {
        tasks.buffer_unordered(window()).right_stream()
    };
    let lines = done.map(|done| {
        let (index, input, result) = done.expect("no panics");
        let (output, error) = match result {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        let line = Line {
            index: Some(index),
            input: Some(input),
            output,
            error,
            abandoned: None,
        };
        let mut bytes = serde_json::to_vec(&line).unwrap();
        bytes.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(bytes))
    });
    Body::from_stream(lines)
}

async fn serve(router: Router) -> String {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!("http://{}/jobs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// One round: every client posts its items and reads every line. Returns the job latencies
/// and the item latencies.
async fn round(client: &reqwest::Client, url: &str) -> (Vec<Duration>, Vec<Duration>) {
    let jobs = (0..CLIENTS).map(|c| async move {
        let inputs: Vec<i64> = (0..ITEMS).map(|i| c * 1_000 + i).collect();
        let start = Instant::now();
        let mut response = client
            .post(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&inputs).unwrap())
            .send()
            .await
            .unwrap();
        let mut items = Vec::with_capacity(ITEMS as usize);
        while let Some(chunk) = response.chunk().await.unwrap() {
            let now = start.elapsed();
            items.extend(chunk.iter().filter(|b| **b == b'\n').map(|_| now));
        }
        assert_eq!(items.len(), ITEMS as usize);
        (start.elapsed(), items)
    });
    let done = futures::future::join_all(jobs).await;
    let mut job_latencies = Vec::new();
    let mut item_latencies = Vec::new();
    for (job, items) in done {
        job_latencies.push(job);
        item_latencies.extend(items);
    }
    (job_latencies, item_latencies)
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn benches(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let variants = rt.block_on(async {
        let service = Service::new(&config());
        let jobs = Arc::new(Jobs::new(&config()));
        let spawning = |ordered: bool| {
            Router::new()
                .route("/jobs", post(spawn_jobs))
                .with_state((jobs.clone(), ordered))
        };
        [
            ("stagepipe_shared_pipeline", serve(service.router()).await),
            ("spawn_per_item_buffered", serve(spawning(true)).await),
            (
                "spawn_per_item_buffer_unordered",
                serve(spawning(false)).await,
            ),
        ]
    });

    let mut group = c.benchmark_group("service_50_clients_x_200");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements((CLIENTS * ITEMS) as u64));
    for (name, url) in &variants {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| round(&client, url));
        });
    }
    group.finish();

    for (name, url) in &variants {
        let (mut jobs, mut items) = (Vec::new(), Vec::new());
        let start = Instant::now();
        const ROUNDS: u32 = 10;
        for _ in 0..ROUNDS {
            let (j, i) = rt.block_on(round(&client, url));
            jobs.extend(j);
            items.extend(i);
        }
        let per_sec = f64::from(ROUNDS) * (CLIENTS * ITEMS) as f64 / start.elapsed().as_secs_f64();
        println!(
            "{name}: {per_sec:.0} items/s; p99 job (post to last line) {:.1?}, p99 item (post to its line) {:.1?}",
            p99(jobs),
            p99(items)
        );
    }
}

criterion_group!(service, benches);
criterion_main!(service);
