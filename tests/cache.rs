//! `Cache`: TTL, capacity (CLOCK eviction), singleflight, errors, cancellation, panics, and
//! the `cached` operator and `Call::cached` layer built on it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Gauge, panic_message};
use futures::{StreamExt, future::join_all, stream};
use stagepipe::prelude::*;
use stagepipe::{Cache, CallError};
use tokio::time::{advance, sleep};
use tokio_test::{assert_pending, task};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A fetch that counts its calls, takes 10 ms, and fails for odd keys if `fail_odd`.
#[derive(Clone, Default)]
struct Fetch {
    calls: Arc<AtomicU32>,
    live: Gauge,
    fail_odd: bool,
}

impl Fetch {
    fn call(&self, key: u32) -> impl Future<Output = Result<String, String>> + Send + use<> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let guard = self.live.enter();
        let fail = self.fail_odd && key % 2 == 1;
        async move {
            let _guard = guard;
            sleep(ms(10)).await;
            if fail {
                Err(format!("{key} failed"))
            } else {
                Ok(format!("v{key}"))
            }
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn values_live_for_their_ttl() {
    let cache = Cache::new(10, ms(100));
    let fetch = Fetch::default();
    assert_eq!(
        cache.try_get_with(1, || fetch.call(1)).await,
        Ok("v1".into())
    );
    advance(ms(80)).await;
    assert_eq!(
        cache.try_get_with(1, || fetch.call(1)).await,
        Ok("v1".into())
    );
    assert_eq!(cache.get(&1), Some(Ok("v1".into())));
    assert_eq!(fetch.calls(), 1);
    advance(ms(20)).await; // 100 ms after it was stored (10 ms after the call started)
    assert_eq!(cache.get(&1), None);
    assert_eq!(
        cache.try_get_with(1, || fetch.call(1)).await,
        Ok("v1".into())
    );
    assert_eq!(fetch.calls(), 2);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.coalesced, s.errors), (2, 2, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_for_one_key_make_one_call() {
    let cache = Cache::new(10, ms(1000));
    let fetch = Fetch::default();
    let f = &fetch;
    let all = join_all((0..50).map(|i| cache.try_get_with(i % 2, move || f.call(i % 2)))).await;
    for (i, got) in all.iter().enumerate() {
        assert_eq!(got.as_deref(), Ok(format!("v{}", i % 2).as_str()));
    }
    assert_eq!(fetch.calls(), 2);
    let s = cache.stats();
    assert_eq!((s.misses, s.coalesced, s.hits, s.len), (2, 48, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn the_call_goes_on_when_its_first_caller_is_dropped() {
    let cache = Cache::new(10, ms(1000));
    let fetch = Fetch::default();
    let mut first = task::spawn(cache.try_get_with(7, || fetch.call(7)));
    assert_pending!(first.poll());
    let second = cache.try_get_with(7, || fetch.call(7));
    drop(first);
    assert_eq!(second.await, Ok("v7".into()));
    assert_eq!(fetch.calls(), 1);
    assert_eq!(cache.get(&7), Some(Ok("v7".into())));
}

#[tokio::test(start_paused = true)]
async fn a_call_nobody_waits_for_is_dropped_and_the_next_caller_starts_anew() {
    let cache = Cache::new(10, ms(1000));
    let fetch = Fetch::default();
    let mut a = task::spawn(cache.try_get_with(3, || fetch.call(3)));
    let mut b = task::spawn(cache.try_get_with(3, || fetch.call(3)));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    assert_eq!(fetch.live.live(), 1);
    drop((a, b));
    assert_eq!(
        fetch.live.live(),
        0,
        "the call is dropped with its last caller"
    );
    assert_eq!(
        cache.try_get_with(3, || fetch.call(3)).await,
        Ok("v3".into())
    );
    assert_eq!(fetch.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn errors_are_shared_but_not_cached_by_default() {
    let cache = Cache::new(10, ms(1000));
    let fetch = Fetch {
        fail_odd: true,
        ..Fetch::default()
    };
    let all = join_all((0..5).map(|_| cache.try_get_with(1, || fetch.call(1)))).await;
    assert!(all.iter().all(|r| *r == Err("1 failed".to_string())));
    assert_eq!(fetch.calls(), 1, "waiters share the one call's error");
    assert_eq!(cache.get(&1), None);
    assert_eq!(
        cache.try_get_with(1, || fetch.call(1)).await,
        Err("1 failed".into())
    );
    assert_eq!(fetch.calls(), 2, "an error is not kept");
    assert_eq!(cache.stats().errors, 2);
}

#[tokio::test(start_paused = true)]
async fn errors_can_be_cached_for_their_own_ttl() {
    let cache = Cache::new(10, ms(1000)).cache_errors_for(ms(50));
    let fetch = Fetch {
        fail_odd: true,
        ..Fetch::default()
    };
    assert!(cache.try_get_with(1, || fetch.call(1)).await.is_err());
    advance(ms(40)).await;
    assert_eq!(cache.get(&1), Some(Err("1 failed".into())));
    assert_eq!(fetch.calls(), 1);
    advance(ms(10)).await;
    assert_eq!(cache.get(&1), None);
    // Values keep the long TTL.
    assert!(cache.try_get_with(2, || fetch.call(2)).await.is_ok());
    advance(ms(500)).await;
    assert_eq!(cache.get(&2), Some(Ok("v2".into())));
}

#[tokio::test(start_paused = true)]
async fn a_full_cache_evicts_by_clock_giving_read_entries_a_second_chance() {
    let cache: Cache<u32, u32, String> = Cache::new(3, ms(1000));
    for k in [1, 2, 3] {
        cache
            .try_get_with(k, || async move { Ok(k) })
            .await
            .unwrap();
    }
    assert_eq!(cache.get(&1), Some(Ok(1))); // 1 is read: it gets a second chance
    cache.try_get_with(4, || async { Ok(4) }).await.unwrap();
    assert_eq!(cache.get(&2), None, "the oldest unread entry goes");
    assert_eq!(cache.get(&1), Some(Ok(1)));
    assert_eq!(cache.get(&3), Some(Ok(3)));
    assert_eq!(cache.get(&4), Some(Ok(4)));
    let s = cache.stats();
    assert_eq!((s.len, s.evictions), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn expired_entries_make_room_before_live_ones_are_evicted() {
    let cache: Cache<u32, u32, String> = Cache::new(2, ms(100));
    cache.try_get_with(1, || async { Ok(1) }).await.unwrap();
    advance(ms(60)).await;
    cache.try_get_with(2, || async { Ok(2) }).await.unwrap();
    advance(ms(50)).await; // 1 has expired, 2 has not
    cache.try_get_with(3, || async { Ok(3) }).await.unwrap();
    assert_eq!(cache.get(&2), Some(Ok(2)));
    assert_eq!(cache.stats().evictions, 0);
}

#[tokio::test(start_paused = true)]
async fn many_keys_through_a_small_cache_stay_within_capacity() {
    let cache: Cache<u32, u32, String> = Cache::new(10, ms(1000));
    for k in 0..1000 {
        assert_eq!(
            cache.try_get_with(k, || async move { Ok(k * 2) }).await,
            Ok(k * 2)
        );
        assert!(cache.stats().len <= 10);
    }
    assert_eq!(cache.stats().evictions, 990);
    // The same key stored and expired again and again stays one entry.
    for _ in 0..1000 {
        cache.try_get_with(5000, || async { Ok(1) }).await.unwrap();
        advance(ms(1000)).await;
    }
    assert!(cache.stats().len <= 10);
}

#[tokio::test(start_paused = true)]
async fn running_calls_are_never_evicted() {
    let cache = Cache::new(1, ms(1000));
    let fetch = Fetch::default();
    let f = &fetch;
    let all = join_all((0..4).map(|k| cache.try_get_with(k, move || f.call(k)))).await;
    assert_eq!(all, ["v0", "v1", "v2", "v3"].map(|v| Ok(v.to_string())));
    assert_eq!(fetch.calls(), 4);
    assert!(cache.stats().len <= 4);
}

#[tokio::test(start_paused = true)]
async fn invalidating_a_running_call_keeps_its_result_out() {
    let cache = Cache::new(10, ms(1000));
    let fetch = Fetch::default();
    let running = cache.try_get_with(1, || fetch.call(1));
    let mut running = task::spawn(running);
    assert_pending!(running.poll());
    cache.invalidate(&1);
    assert_eq!(running.await, Ok("v1".into()));
    assert_eq!(cache.get(&1), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_call_panics_in_each_waiter_and_is_not_cached() {
    let cache: Cache<u32, u32, String> = Cache::new(10, ms(1000));
    let (c1, c2) = (cache.clone(), cache.clone());
    let calls = Arc::new(AtomicU32::new(0));
    let boom = move || {
        calls.fetch_add(1, Ordering::SeqCst);
        async {
            sleep(ms(10)).await;
            panic!("upstream exploded")
        }
    };
    let boom2 = boom.clone();
    let a = tokio::spawn(async move { c1.try_get_with(9, boom).await });
    let b = tokio::spawn(async move { c2.try_get_with(9, boom2).await });
    for joined in [a.await, b.await] {
        let payload = joined.unwrap_err().into_panic();
        assert!(!panic_message(&*payload).is_empty());
    }
    assert_eq!(cache.get(&9), None);
    assert_eq!(cache.try_get_with(9, || async { Ok(1) }).await, Ok(1));
}

#[test]
fn zero_capacity_or_ttl_is_refused_by_name() {
    let e = Cache::<u32, u32>::try_new(0, ms(1)).unwrap_err();
    assert!(e.to_string().contains("`capacity`"), "{e}");
    let e = Cache::<u32, u32>::try_new(1, Duration::ZERO).unwrap_err();
    assert!(e.to_string().contains("`ttl`"), "{e}");
    let caught = std::panic::catch_unwind(|| Cache::<u32, u32>::new(0, ms(1))).unwrap_err();
    assert!(panic_message(&*caught).contains("`capacity`"));
}

#[tokio::test(start_paused = true)]
async fn the_operator_keeps_order_and_calls_once_per_key() {
    let cache = Cache::new(100, ms(1000));
    let fetch = Fetch {
        fail_odd: true,
        ..Fetch::default()
    };
    let f = fetch.clone();
    let out: Vec<_> = stream::iter([2, 1, 2, 4, 1, 2])
        .cached(&cache, |k| *k, move |k| f.call(k))
        .collect()
        .await;
    let expected: Vec<Result<String, String>> = vec![
        Ok("v2".into()),
        Err("1 failed".into()),
        Ok("v2".into()),
        Ok("v4".into()),
        Err("1 failed".into()),
        Ok("v2".into()),
    ];
    assert_eq!(out, expected);
    assert_eq!(fetch.calls(), 4, "2 and 4 once each, the error twice");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_operator_mid_call_drops_the_call() {
    let cache = Cache::new(100, ms(1000));
    let fetch = Fetch::default();
    let f = fetch.clone();
    let mut s = task::spawn(stream::iter([1, 2]).cached(&cache, |k| *k, move |k| f.call(k)));
    assert_pending!(s.poll_next());
    assert_eq!(fetch.live.live(), 1);
    drop(s);
    assert_eq!(fetch.live.live(), 0);
    assert_eq!(cache.get(&1), None);
}

#[tokio::test(start_paused = true)]
async fn a_cached_call_skips_every_layer_on_a_hit() {
    let stats = CallStats::new("lookup");
    let limiter = RateLimiter::per(ms(100));
    let cache: Cache<u32, String, CallError<String>> = Cache::new(10, ms(1000));
    let fetch = Fetch::default();
    let f = fetch.clone();
    let call = Call::new(move |k: u32| f.call(k))
        .rate_limit(&limiter)
        .stats(&stats)
        .cached(&cache, |k: &u32| *k);
    let started = tokio::time::Instant::now();
    let out = join_all((0..20).map(|i| call.run(i % 2))).await;
    assert!(out.iter().all(Result::is_ok));
    assert_eq!(fetch.calls(), 2);
    assert_eq!(stats.snapshot().calls, 2);
    // Two cells of a 100 ms quota: the hits never waited for the limiter.
    assert_eq!(started.elapsed(), ms(110));
    assert_eq!(call.run(1).await.as_deref(), Ok("v1"));
    assert_eq!(stats.snapshot().calls, 2);
}
