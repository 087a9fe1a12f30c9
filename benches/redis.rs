//! The Redis-backed rate limiter's decisions: how many per second, and how long one takes (p50,
//! p99), against the in-memory limiter and a naive fixed-window limiter (`INCR` + `PEXPIRE`,
//! written here), one waiter at a time and 64 at once (one round trip then reserves cells for
//! all the waiters queued while the previous one was in flight).
//!
//! Needs a server: `./scripts/with-redis cargo bench --features redis --bench redis`.
//!
//! Before the criterion groups, each variant runs a fixed number of decisions and prints
//! decisions/s and the per-decision latency percentiles, measured one by one in the loop. The
//! quotas are far above the rates reached, so no decision waits for a later slot: the figures
//! are the cost of deciding.

use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stagepipe::redis::ConnectionManager;
use stagepipe::{Quota, RateLimiter};

/// A quota no benchmark reaches: a million cells a second, a burst of a million.
fn huge() -> Quota {
    Quota::with_period(Duration::from_micros(1))
        .unwrap()
        .allow_burst(NonZeroU32::new(1_000_000).unwrap())
}

fn url() -> String {
    std::env::var("STAGEPIPE_TEST_REDIS").expect(
        "STAGEPIPE_TEST_REDIS is not set: run `./scripts/with-redis cargo bench --features redis \
         --bench redis`",
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn unique(name: &str) -> String {
    format!("bench-{name}-{}", std::process::id())
}

/// The naive fixed-window limiter: `INCR` the window's counter, `PEXPIRE` it when it was new;
/// allowed while the count is within the limit. Two round trips for the first decision of a
/// window, one for the others, and up to twice the limit across a window boundary.
#[derive(Clone)]
struct FixedWindow {
    conn: ConnectionManager,
    key: String,
    limit: u64,
    window: Duration,
}

impl FixedWindow {
    async fn try_acquire(&self) -> bool {
        let mut conn = self.conn.clone();
        let count: u64 = redis::cmd("INCR")
            .arg(&self.key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if count == 1 {
            let _: () = redis::cmd("PEXPIRE")
                .arg(&self.key)
                .arg(self.window.as_millis() as u64)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        count <= self.limit
    }
}

/// Runs `total` decisions on `tasks` concurrent tasks, each decision timed on its own.
/// Returns (decisions per second, p50, p99).
async fn measure<F, Fut>(tasks: usize, total: usize, decide: F) -> (f64, Duration, Duration)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let decide = Arc::new(decide);
    let per_task = total / tasks;
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let decide = Arc::clone(&decide);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let t = Instant::now();
                    decide().await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(total);
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    (
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    )
}

fn report(c: &mut Criterion) {
    let rt = runtime();
    let conn = rt.block_on(stagepipe::redis::connect(&url())).unwrap();
    println!();
    println!(
        "{:<44} {:>8} {:>14} {:>10} {:>10}",
        "variant", "waiters", "decisions/s", "p50", "p99"
    );
    let row = |name: &str, tasks: usize, (rate, p50, p99): (f64, Duration, Duration)| {
        println!("{name:<44} {tasks:>8} {rate:>14.0} {p50:>10.1?} {p99:>10.1?}");
    };

    for tasks in [1, 64] {
        let total = 20_000;
        let memory = RateLimiter::from(huge());
        let r = rt.block_on(measure(tasks, total * 10, move || {
            let l = memory.clone();
            async move { l.until_ready().await }
        }));
        row("in-memory until_ready", tasks, r);

        let redis = RateLimiter::redis(&conn, &unique(&format!("ready-{tasks}")), huge());
        let trips = redis.clone();
        let r = rt.block_on(measure(tasks, total, move || {
            let l = redis.clone();
            async move { l.until_ready().await }
        }));
        row("redis until_ready (coalesced)", tasks, r);
        println!(
            "{:<44} {:>8} {:>14.1}",
            "  decisions per round trip",
            tasks,
            total as f64 / trips.round_trips().unwrap() as f64
        );

        let redis = RateLimiter::redis(&conn, &unique(&format!("try-{tasks}")), huge());
        let r = rt.block_on(measure(tasks, total, move || {
            let l = redis.clone();
            async move {
                assert!(l.try_acquire().await);
            }
        }));
        row("redis try_acquire (a round trip each)", tasks, r);

        let naive = FixedWindow {
            conn: conn.clone(),
            key: unique(&format!("naive-{tasks}")),
            limit: u64::MAX,
            window: Duration::from_secs(1),
        };
        let r = rt.block_on(measure(tasks, total, move || {
            let l = naive.clone();
            async move {
                assert!(l.try_acquire().await);
            }
        }));
        row("naive INCR+PEXPIRE fixed window", tasks, r);
    }
    println!();

    let mut g = c.benchmark_group("redis_limiter");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    let memory = RateLimiter::from(huge());
    g.bench_function("in_memory_until_ready", |b| {
        b.to_async(&rt).iter(|| memory.until_ready())
    });
    let redis = RateLimiter::redis(&conn, &unique("crit-ready"), huge());
    g.bench_function("redis_until_ready_single", |b| {
        b.to_async(&rt).iter(|| redis.until_ready())
    });
    let naive = FixedWindow {
        conn: conn.clone(),
        key: unique("crit-naive"),
        limit: u64::MAX,
        window: Duration::from_secs(1),
    };
    g.bench_function("naive_fixed_window_single", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(naive.try_acquire().await) })
    });
    g.throughput(Throughput::Elements(64));
    let batched = RateLimiter::redis(&conn, &unique("crit-batch"), huge());
    g.bench_function("redis_until_ready_64_waiters", |b| {
        b.to_async(&rt)
            .iter(|| futures::future::join_all((0..64).map(|_| batched.until_ready())))
    });
    g.bench_function("naive_fixed_window_64_concurrent", |b| {
        b.to_async(&rt)
            .iter(|| futures::future::join_all((0..64).map(|_| naive.try_acquire())))
    });
    g.finish();
}

criterion_group!(benches, report);
criterion_main!(benches);
