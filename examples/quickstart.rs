//! A chained pipeline: parse lines in parallel on a shared worker pool, keep their order, call a
//! (simulated) slow service with a cap on concurrent calls, and print the results and where the
//! time went.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::time::Duration;

use futures::{StreamExt, stream};
use stagepipe::prelude::*;

/// CPU-bound work: a checksum of the line, repeated to take a little while.
fn checksum(line: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..2_000 {
        for b in line.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[tokio::main]
async fn main() {
    let pool = WorkerPool::new(std::thread::available_parallelism().map_or(2, usize::from));
    let source = Stats::new("source");
    let parsed = Stats::new("parsed");
    let sink = Stats::new("sink");

    let lines = (0..2_000u32).map(|i| format!("order-{i:05},customer-{},{}", i % 97, i * 3));
    let results: Vec<(String, u64)> = stream::iter(lines)
        .with_stats(&source)
        // CPU-bound: parallel on every core, results in input order.
        .fan_out_ordered(&pool, |line| async move {
            let sum = checksum(&line);
            let id = line.split(',').next().unwrap_or_default().to_string();
            (id, sum)
        })
        .with_stats(&parsed)
        // I/O-bound: at most 16 calls to the "service" at once, completion order.
        .in_flight(16, |(id, sum)| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            (id, sum % 1_000)
        })
        .with_stats(&sink)
        .collect()
        .await;

    for (id, score) in results.iter().take(5) {
        println!("{id}: {score}");
    }
    println!("... {} results", results.len());
    println!();
    for stats in [&source, &parsed, &sink] {
        println!("{}", stats.snapshot());
    }
}
