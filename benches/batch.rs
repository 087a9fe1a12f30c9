//! `batch` and `batch_dedupe` beside the batchers a user would otherwise reach for:
//! tokio-stream's `chunks_timeout` (size or time) and futures' `ready_chunks` (size or
//! whatever is ready, no timer), on the same input in the same group.
//!
//! Two sources of `N` `u64`s: one always ready, and one that returns `Pending` (waking itself)
//! once every 100 items, in the middle of each 100-item batch, so that every batch has to wait
//! and the timers are exercised.

use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::{Stream, StreamExt, stream};
use stagepipe::PipelineExt;

const N: u64 = 10_000_000;
const MAX: usize = 100;
const WAIT: Duration = Duration::from_millis(10);

/// Yields `0..n`, returning `Pending` once before every item `i` with `i % 100 == 50`.
struct Stuttering {
    next: u64,
    n: u64,
    paused: bool,
}

fn stuttering(n: u64) -> Stuttering {
    Stuttering {
        next: 0,
        n,
        paused: false,
    }
}

impl Stream for Stuttering {
    type Item = u64;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u64>> {
        if self.next == self.n {
            return Poll::Ready(None);
        }
        if self.next % 100 == 50 && !self.paused {
            self.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.paused = false;
        self.next += 1;
        Poll::Ready(Some(self.next - 1))
    }
}

/// Counts the items in all batches (a check that nothing was lost, and keeps the work alive).
async fn count<S: Stream<Item = Vec<u64>>>(batches: S) -> u64 {
    let total = batches
        .fold(0u64, |n, b| async move { n + b.len() as u64 })
        .await;
    assert_eq!(total, N);
    black_box(total)
}

macro_rules! contenders {
    ($group:expr, $rt:expr, $source:expr) => {
        $group.bench_function("batch", |b| {
            b.to_async(&$rt).iter(|| count($source.batch(MAX, WAIT)))
        });
        $group.bench_function("batch_dedupe", |b| {
            b.to_async(&$rt)
                .iter(|| count($source.batch_dedupe(MAX, WAIT, |x: &u64| *x)))
        });
        $group.bench_function("chunks_timeout", |b| {
            b.to_async(&$rt).iter(|| {
                count(Box::pin(tokio_stream::StreamExt::chunks_timeout(
                    $source, MAX, WAIT,
                )))
            })
        });
        $group.bench_function("ready_chunks", |b| {
            b.to_async(&$rt).iter(|| count($source.ready_chunks(MAX)))
        });
    };
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    let mut group = c.benchmark_group("batch/ready");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(N));
    contenders!(group, rt, stream::iter(0..N));
    group.finish();

    let mut group = c.benchmark_group("batch/pending_every_100");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(N));
    contenders!(group, rt, stuttering(N));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
