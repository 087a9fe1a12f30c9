//! `Cache` beside what a user would otherwise write: a `Mutex<HashMap>` memo (no singleflight,
//! no TTL bookkeeping).
//!
//! * `hit`: 100k lookups of keys already stored (the cost per hit).
//! * `fan_in`: 2,000 lookups of 20 keys, 50 at once, against an upstream that takes 1 ms (real
//!   clock): the memo calls the upstream for every concurrent miss, the cache once per key. The
//!   upstream calls made are printed once per variant.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use stagepipe::Cache;
use stagepipe::prelude::*;

const HITS: u64 = 100_000;
const LOOKUPS: u64 = 2_000;
const KEYS: u64 = 20;

/// The memo a user writes by hand: look up under the lock, call on a miss, store.
#[derive(Clone, Default)]
struct Memo(Arc<Mutex<HashMap<u64, u64>>>);

impl Memo {
    async fn get_with<Fut: Future<Output = u64>>(&self, key: u64, f: impl FnOnce() -> Fut) -> u64 {
        if let Some(v) = self.0.lock().unwrap().get(&key) {
            return *v;
        }
        let v = f().await;
        self.0.lock().unwrap().insert(key, v);
        v
    }
}

fn upstream(calls: &Arc<AtomicU64>, key: u64) -> impl Future<Output = u64> + Send + use<> {
    calls.fetch_add(1, Ordering::Relaxed);
    async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        key * 2
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut group = c.benchmark_group("cache_hit");
    group
        .throughput(Throughput::Elements(HITS))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let cache: Cache<u64, u64> = Cache::new(1024, Duration::from_secs(3600));
    let memo = Memo::default();
    rt.block_on(async {
        for k in 0..KEYS {
            cache
                .try_get_with(k, || async move { Ok(k) })
                .await
                .unwrap();
            memo.get_with(k, || async move { k }).await;
        }
    });
    group.bench_function(BenchmarkId::new("cache", HITS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for i in 0..HITS {
                let k = black_box(i % KEYS);
                acc = acc.wrapping_add(cache.try_get_with(k, || async { Ok(0) }).await.unwrap());
            }
            acc
        })
    });
    group.bench_function(BenchmarkId::new("mutex_hashmap_memo", HITS), |b| {
        b.to_async(&rt).iter(|| async {
            let mut acc = 0u64;
            for i in 0..HITS {
                let k = black_box(i % KEYS);
                acc = acc.wrapping_add(memo.get_with(k, || async { 0 }).await);
            }
            acc
        })
    });
    group.finish();

    let mut group = c.benchmark_group("cache_fan_in");
    group
        .throughput(Throughput::Elements(LOOKUPS))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let calls = Arc::new(AtomicU64::new(0));
    let runs = Arc::new(AtomicU64::new(0));
    group.bench_function(BenchmarkId::new("cache", LOOKUPS), |b| {
        b.to_async(&rt).iter(|| {
            let (calls, runs) = (calls.clone(), runs.clone());
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                let cache: Cache<u64, u64> = Cache::new(1024, Duration::from_secs(3600));
                stream::iter(0..LOOKUPS)
                    .in_flight(50, |i| {
                        let calls = calls.clone();
                        cache.try_get_with(i % KEYS, move || {
                            let call = upstream(&calls, i % KEYS);
                            async move { Ok(call.await) }
                        })
                    })
                    .fold(0u64, |a, v| async move { a.wrapping_add(v.unwrap()) })
                    .await
            }
        })
    });
    report("cache", &calls, &runs);
    let (calls, runs) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    group.bench_function(BenchmarkId::new("mutex_hashmap_memo", LOOKUPS), |b| {
        b.to_async(&rt).iter(|| {
            let (calls, runs) = (calls.clone(), runs.clone());
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                let memo = Memo::default();
                stream::iter(0..LOOKUPS)
                    .in_flight(50, |i| {
                        let (memo, calls) = (memo.clone(), calls.clone());
                        async move { memo.get_with(i % KEYS, || upstream(&calls, i % KEYS)).await }
                    })
                    .fold(0u64, |a, v| async move { a.wrapping_add(v) })
                    .await
            }
        })
    });
    report("mutex_hashmap_memo", &calls, &runs);
    group.finish();
}

fn report(name: &str, calls: &AtomicU64, runs: &AtomicU64) {
    let runs = runs.load(Ordering::Relaxed).max(1);
    println!(
        "cache_fan_in/{name}: {:.1} upstream calls per {LOOKUPS} lookups of {KEYS} keys",
        calls.load(Ordering::Relaxed) as f64 / runs as f64
    );
}

criterion_group!(cache, benches);
criterion_main!(cache);
