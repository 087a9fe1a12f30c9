//! Consumer throughput: messages per second through `StreamSource` (read, `batch(100, 1 s)`,
//! a trivial job, `ack`) with 1, 2 and 4 consumers, against a hand-written
//! `XREADGROUP COUNT 100` / `XACK` loop doing the same work.
//!
//! Consumers are tasks on one multi-threaded runtime, each with a connection of its own (so
//! they share Redis, not a socket): the benchmark measures the source, not process start-up.
//! A run ends when Redis has acknowledged every message. Each figure is the median of
//! `ROUNDS` runs on a private `redis-server`.
//!
//! `cargo bench -p stagepipe-queue` (set `QUEUE_BENCH_MESSAGES` for another run length,
//! `QUEUE_BENCH_CONSUMERS=1,4` for some consumer counts only).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::Value;
use redis::aio::ConnectionManager;
use stagepipe::PipelineExt;
use stagepipe::redis::{StreamSource, connect};
use stagepipe_queue::producer::produce;
use stagepipe_queue::server::RedisServer;

const ROUNDS: usize = 3;
const BATCH: usize = 100;

/// The work per message: read its `id` field, add it up.
fn work(id: &[u8], sum: &AtomicU64) {
    let n: u64 = std::str::from_utf8(id).unwrap().parse().unwrap();
    sum.fetch_add(n, Ordering::Relaxed);
}

async fn setup(url: &str, stream: &str, messages: u64) {
    let mut conn = connect(url).await.unwrap();
    produce(&mut conn, stream, 0, messages).await.unwrap();
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn run_source(url: &str, stream: &str, consumers: usize, messages: u64) -> Duration {
    let sum = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..consumers {
        conns.push(connect(url).await.unwrap());
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for (i, conn) in conns.iter().enumerate() {
        let source = StreamSource::builder(conn, stream, "g", format!("c{i}"))
            .count(BATCH)
            .block(Duration::from_millis(100))
            .build();
        handles.push(source.handle());
        let sum = sum.clone();
        tasks.push(tokio::spawn(async move {
            source
                .map(|m| m.unwrap())
                .batch(BATCH, Duration::from_secs(1))
                .for_each(|batch| {
                    for msg in batch {
                        work(msg.get("id").unwrap(), &sum);
                        msg.ack();
                    }
                    futures::future::ready(())
                })
                .await;
        }));
    }
    while handles.iter().map(|h| h.stats().acked).sum::<u64>() < messages {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    for h in &handles {
        h.drain().await.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(sum.load(Ordering::Relaxed), messages * (messages - 1) / 2);
    elapsed
}

/// The loop a user writes by hand: read 100, work, acknowledge them, again.
async fn hand_loop(
    mut conn: ConnectionManager,
    stream: String,
    name: String,
    sum: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    messages: u64,
) {
    while acked.load(Ordering::Relaxed) < messages {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(&name)
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Value::Array(streams) = reply else {
            continue;
        };
        let Some(Value::Array(parts)) = streams.into_iter().next() else {
            continue;
        };
        let Some(Value::Array(entries)) = parts.into_iter().nth(1) else {
            continue;
        };
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(mut e) = entry else { panic!() };
            let Value::Array(fields) = e.pop().unwrap() else {
                panic!()
            };
            let Value::BulkString(id) = e.pop().unwrap() else {
                panic!()
            };
            let mut f = fields.chunks(2);
            let value = f
                .find(|kv| kv[0] == Value::BulkString(b"id".to_vec()))
                .map(|kv| match &kv[1] {
                    Value::BulkString(b) => b.clone(),
                    _ => panic!(),
                })
                .unwrap();
            work(&value, &sum);
            ids.push(id);
        }
        let n = ids.len() as u64;
        let _: i64 = redis::cmd("XACK")
            .arg(&stream)
            .arg("g")
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .unwrap();
        acked.fetch_add(n, Ordering::Relaxed);
    }
}

async fn run_hand(url: &str, stream: &str, consumers: usize, messages: u64) -> Duration {
    let sum = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..consumers {
        conns.push(connect(url).await.unwrap());
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            tokio::spawn(hand_loop(
                conn,
                stream.to_owned(),
                format!("c{i}"),
                sum.clone(),
                acked.clone(),
                messages,
            ))
        })
        .collect();
    while acked.load(Ordering::Relaxed) < messages {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(sum.load(Ordering::Relaxed), messages * (messages - 1) / 2);
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: a quick smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    let messages: u64 = std::env::var("QUEUE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let rounds = if full { ROUNDS } else { 1 };
    let server = RedisServer::start();
    let url = server.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("queue consumer throughput, {messages} messages, batch {BATCH}, median of {rounds}");
    println!(
        "{:<12} {:>10} {:>14} {:>14} {:>7}",
        "consumers", "", "StreamSource", "hand loop", "ratio"
    );
    let mut run = 0;
    // `QUEUE_BENCH_CONSUMERS=1,4` runs those counts only.
    let counts: Vec<usize> = std::env::var("QUEUE_BENCH_CONSUMERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    for consumers in counts {
        let (mut ours, mut hand) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            run += 1;
            let stream = format!("bench:{run}:source");
            rt.block_on(setup(&url, &stream, messages));
            let d = rt.block_on(run_source(&url, &stream, consumers, messages));
            ours.push(messages as f64 / d.as_secs_f64());
            let stream = format!("bench:{run}:hand");
            rt.block_on(setup(&url, &stream, messages));
            let d = rt.block_on(run_hand(&url, &stream, consumers, messages));
            hand.push(messages as f64 / d.as_secs_f64());
            rt.block_on(async {
                let mut conn = connect(&url).await.unwrap();
                let _: Value = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
            });
        }
        let (ours, hand) = (median(ours), median(hand));
        println!(
            "{:<12} {:>10} {:>12.0}/s {:>12.0}/s {:>6.2}x",
            consumers,
            "",
            ours,
            hand,
            ours / hand
        );
    }
}
