//! `RateLimiter::redis` and `KeyedRateLimiter::redis` against a real Redis server: the one
//! `scripts/with-redis` starts (`STAGEPIPE_TEST_REDIS`). Every test uses limiter names of its
//! own, so the tests run in parallel on one server.
//!
//! Real Redis means real time: the tests assert counts and bounds that follow from the
//! deadlines Redis hands out (a cell is never released before its deadline), never that
//! something happened within a wall-clock time.

use std::num::NonZeroU32;
use std::time::Duration;

use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use stagepipe::redis::{self, ConnectionManager, Unavailable};
use stagepipe::{Call, Quota};
use tokio::time::Instant;

/// A hang guard: far above anything a test waits for.
const GUARD: Duration = Duration::from_secs(20);

mod common;
use common::redis_env::{conn, unique as name};

fn n(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap()
}

/// `burst` cells, then one per 10 s: a test sees exactly the burst.
fn slow(burst: u32) -> Quota {
    Quota::with_period(Duration::from_secs(10))
        .unwrap()
        .allow_burst(n(burst))
}

async fn guard<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .expect("hang guard: the limiter never answered")
}

async fn get_tat(conn: &mut ConnectionManager, key: &str) -> Option<u64> {
    ::redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_handles_on_two_connections_share_one_budget() {
    let name = name("share");
    let a = RateLimiter::redis(&conn().await, &name, slow(5));
    let b = RateLimiter::redis(&conn().await, &name, slow(5));
    let mut taken = 0;
    for i in 0..12 {
        let handle = if i % 2 == 0 { &a } else { &b };
        taken += u32::from(guard(handle.try_acquire()).await);
    }
    assert_eq!(taken, 5, "the two handles together get one burst");
}

#[tokio::test]
async fn waiters_on_two_connections_are_paced_by_one_quota() {
    // 50 ms apart, burst 2: 10 cells between two handles span at least 8 intervals, since
    // no cell is released before its Redis deadline.
    let name = name("pace");
    let quota = Quota::with_period(Duration::from_millis(50))
        .unwrap()
        .allow_burst(n(2));
    let a = RateLimiter::redis(&conn().await, &name, quota);
    let b = RateLimiter::redis(&conn().await, &name, quota);
    let start = Instant::now();
    let take = |l: RateLimiter| async move {
        let mut at = Vec::new();
        for _ in 0..5 {
            l.until_ready().await;
            at.push(start.elapsed());
        }
        at
    };
    let (at_a, at_b) = guard(futures::future::join(take(a), take(b))).await;
    let mut all: Vec<Duration> = at_a.into_iter().chain(at_b).collect();
    all.sort();
    assert_eq!(all.len(), 10);
    // the k-th cell (0-based) is due no earlier than (k - burst + 1) intervals after the first
    // reservation, which came after `start`
    for (k, at) in all.iter().enumerate().skip(2) {
        let due = Duration::from_millis(50) * (k as u32 - 1);
        assert!(*at >= due, "cell {k} released at {at:?}, due {due:?}");
    }
    // and Redis keeps the key only while it matters
    let mut c = conn().await;
    let key = format!("stagepipe:limiter:{{{name}}}");
    let pttl: i64 = ::redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        (-2..=600).contains(&pttl) && pttl != -1,
        "the key expires once idle: PTTL {pttl}"
    );
}

#[tokio::test]
async fn clones_share_the_budget() {
    let limiter = RateLimiter::redis(&conn().await, &name("clones"), slow(3));
    let clone = limiter.clone();
    assert!(guard(limiter.try_acquire()).await);
    assert!(guard(clone.try_acquire()).await);
    assert!(guard(clone.clone().try_acquire()).await);
    assert!(!guard(limiter.try_acquire()).await);
    assert!(!guard(clone.try_acquire()).await);
}

#[tokio::test]
async fn burst_keeps_the_redis_budget() {
    let name = name("burst");
    let limiter = RateLimiter::redis(&conn().await, &name, slow(1)).burst(3);
    assert_eq!(limiter.burst_size(), 3);
    assert!(limiter.round_trips().is_some(), "still in Redis");
    for _ in 0..3 {
        assert!(guard(limiter.try_acquire()).await);
    }
    assert!(!guard(limiter.try_acquire()).await);
    // the same name: the same budget
    let other = RateLimiter::redis(&conn().await, &name, slow(3));
    assert!(!guard(other.try_acquire()).await);
}

#[tokio::test]
async fn names_isolate_budgets() {
    let c = conn().await;
    let a = RateLimiter::redis(&c, &name("iso-a"), slow(1));
    let b = RateLimiter::redis(&c, &name("iso-b"), slow(1));
    assert!(guard(a.try_acquire()).await);
    assert!(guard(b.try_acquire()).await);
    assert!(!guard(a.try_acquire()).await);
    assert!(!guard(b.try_acquire()).await);
}

#[tokio::test]
async fn check_refuses_on_a_redis_handle_and_takes_nothing() {
    let limiter = RateLimiter::redis(&conn().await, &name("check"), slow(1));
    assert!(!limiter.check(), "check cannot make a round trip");
    assert_eq!(limiter.round_trips(), Some(0));
    // the burst is untouched
    assert!(guard(limiter.try_acquire()).await);
    assert!(!guard(limiter.try_acquire()).await);
    assert_eq!(limiter.round_trips(), Some(2));
    // an in-memory limiter has no round trips
    assert_eq!(RateLimiter::per_second(1).round_trips(), None);

    let keyed = KeyedRateLimiter::<&str>::redis(&conn().await, &name("check-key"), slow(1));
    assert!(!keyed.check_key(&"a"));
    assert!(guard(keyed.try_acquire_key(&"a")).await);
}

#[tokio::test(flavor = "current_thread")]
async fn many_waiters_share_one_round_trip() {
    // 64 waiters polled before the first round trip leaves: one round trip reserves 64 cells.
    let limiter = RateLimiter::redis(&conn().await, &name("batch"), slow(64));
    let waits = (0..64).map(|_| limiter.until_ready());
    guard(futures::future::join_all(waits)).await;
    assert_eq!(limiter.round_trips(), Some(1));
    // and they took the whole burst
    assert!(!guard(limiter.try_acquire()).await);
    assert_eq!(limiter.round_trips(), Some(2));
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_is_paced_like_single_reservations() {
    // 24 waiters, burst 4, 10 ms apart: one round trip, and the cells after the burst come
    // one interval apart at the earliest, in the order the waiters queued.
    let limiter = RateLimiter::redis(
        &conn().await,
        &name("batch-pace"),
        Quota::with_period(Duration::from_millis(10))
            .unwrap()
            .allow_burst(n(4)),
    );
    let start = Instant::now();
    let waits = (0..24).map(|i| {
        let limiter = &limiter;
        async move {
            limiter.until_ready().await;
            (i, start.elapsed())
        }
    });
    let done = guard(futures::future::join_all(waits)).await;
    assert_eq!(limiter.round_trips(), Some(1));
    let at: Vec<Duration> = done.iter().map(|(_, at)| *at).collect();
    for (k, at) in at.iter().enumerate().skip(4) {
        let due = Duration::from_millis(10) * (k as u32 - 3);
        assert!(*at >= due, "waiter {k} released at {at:?}, due {due:?}");
    }
}

#[tokio::test]
async fn rate_limit_operator_draws_on_the_redis_budget() {
    let name = name("stream");
    let limiter = RateLimiter::redis(&conn().await, &name, slow(4));
    let items: Vec<u32> = guard(stream::iter(0..3).rate_limit(&limiter).collect()).await;
    assert_eq!(items, [0, 1, 2], "every item, in order");
    // another process's handle sees what the stream took: one cell left
    let other = RateLimiter::redis(&conn().await, &name, slow(4));
    assert!(guard(other.try_acquire()).await);
    assert!(!guard(other.try_acquire()).await);
}

#[tokio::test]
async fn rate_limit_operator_paces_items() {
    // burst 2, 20 ms apart: the 8th item is due 6 intervals after the first
    let limiter = RateLimiter::redis(
        &conn().await,
        &name("stream-pace"),
        Quota::with_period(Duration::from_millis(20))
            .unwrap()
            .allow_burst(n(2)),
    );
    let start = Instant::now();
    let at: Vec<(u32, Duration)> = guard(
        stream::iter(0..8)
            .rate_limit(&limiter)
            .map(|i| (i, start.elapsed()))
            .collect(),
    )
    .await;
    assert_eq!(
        at.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    assert!(at[7].1 >= Duration::from_millis(120));
}

#[tokio::test]
async fn rate_limit_by_draws_on_each_keys_redis_budget() {
    let name = name("by");
    let per_host = KeyedRateLimiter::<&str>::redis(&conn().await, &name, slow(2));
    let hosts: Vec<&str> = guard(
        stream::iter(["a", "b", "a"])
            .rate_limit_by(&per_host, |h: &&str| *h)
            .collect(),
    )
    .await;
    assert_eq!(hosts, ["a", "b", "a"]);
    let other = KeyedRateLimiter::<String>::redis(&conn().await, &name, slow(2));
    assert!(
        !guard(other.try_acquire_key(&"a".to_string())).await,
        "a spent its burst"
    );
    assert!(
        guard(other.try_acquire_key(&"b".to_string())).await,
        "b has one left"
    );
    assert!(!guard(other.try_acquire_key(&"b".to_string())).await);
    assert!(guard(other.try_acquire_key(&"c".to_string())).await);
    assert_eq!(per_host.len(), 0, "no key is kept in memory");
}

#[tokio::test(flavor = "current_thread")]
async fn keyed_waiters_of_many_keys_share_one_round_trip() {
    let limiter = KeyedRateLimiter::<u32>::redis(&conn().await, &name("keyed-batch"), slow(2));
    let keys: Vec<u32> = (0..10).flat_map(|k| [k, k]).collect();
    guard(futures::future::join_all(
        keys.iter().map(|k| limiter.until_key_ready(k)),
    ))
    .await;
    assert_eq!(limiter.round_trips(), Some(1));
    for k in 0..10 {
        assert!(!guard(limiter.try_acquire_key(&k)).await, "key {k} spent");
    }
}

#[tokio::test]
async fn a_call_takes_a_cell_per_attempt() {
    let name = name("call");
    let limiter = RateLimiter::redis(&conn().await, &name, slow(3));
    let call = Call::new(|x: u32| async move { Ok::<_, String>(x * 2) }).rate_limit(&limiter);
    assert_eq!(guard(call.run(1)).await.unwrap(), 2);
    assert_eq!(guard(call.run(2)).await.unwrap(), 4);
    assert!(guard(limiter.try_acquire()).await);
    assert!(!guard(limiter.try_acquire()).await);
}

#[cfg(feature = "tower")]
#[tokio::test]
async fn the_tower_layer_takes_a_cell_per_call() {
    use tower::{ServiceBuilder, ServiceExt, service_fn};
    let limiter = RateLimiter::redis(&conn().await, &name("tower"), slow(2));
    let svc = ServiceBuilder::new()
        .layer(limiter.clone())
        .service(service_fn(|x: u32| async move {
            Ok::<_, std::convert::Infallible>(x + 1)
        }));
    assert_eq!(guard(svc.clone().oneshot(1)).await.unwrap(), 2);
    assert_eq!(guard(svc.clone().oneshot(2)).await.unwrap(), 3);
    assert!(
        !guard(limiter.try_acquire()).await,
        "the layer spent the burst"
    );
}

#[tokio::test]
async fn a_dropped_waiter_gives_its_cell_back() {
    let name = name("refund");
    let mut c = conn().await;
    let key = format!("stagepipe:limiter:{{{name}}}");
    let limiter = RateLimiter::redis(&c, &name, slow(1));
    assert!(guard(limiter.try_acquire()).await);
    let tat = get_tat(&mut c, &key).await.expect("the key is set");
    // the next cell is due in 10 s: wait for it a moment, then give up
    let gave_up = tokio::time::timeout(Duration::from_millis(200), limiter.until_ready()).await;
    assert!(gave_up.is_err());
    // the reservation moved the TAT by one interval; the refund restores it
    let start = std::time::Instant::now();
    loop {
        let now = get_tat(&mut c, &key).await;
        if now == Some(tat) {
            break;
        }
        assert_eq!(
            now,
            Some(tat + 10_000_000),
            "one reservation, not refunded yet"
        );
        assert!(
            start.elapsed() < GUARD,
            "hang guard: the cell never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_waiters_cell_goes_to_a_queued_waiter_without_a_round_trip() {
    let name = name("hand-over");
    let mut c = conn().await;
    let key = format!("stagepipe:limiter:{{{name}}}");
    let limiter = RateLimiter::redis(&c, &name, slow(1));
    assert!(guard(limiter.try_acquire()).await);
    let tat = get_tat(&mut c, &key).await.expect("the key is set");
    let next = tat + 10_000_000;
    // A reserves the next cell (due in 10 s)
    let mut a = Box::pin(limiter.until_ready());
    assert!(futures::poll!(a.as_mut()).is_pending());
    let start = std::time::Instant::now();
    while get_tat(&mut c, &key).await != Some(next) {
        assert!(
            start.elapsed() < GUARD,
            "hang guard: A's reservation never landed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(limiter.round_trips(), Some(2));
    // B queues, then A leaves: B gets A's cell, and no round trip is made for B
    let mut b = Box::pin(limiter.until_ready());
    assert!(futures::poll!(b.as_mut()).is_pending());
    drop(a);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            futures::poll!(b.as_mut()).is_pending(),
            "B waits for A's cell"
        );
    }
    assert_eq!(limiter.round_trips(), Some(2));
    assert_eq!(get_tat(&mut c, &key).await, Some(next));
    // B leaves too: its cell is the last one reserved, so it goes back to Redis
    drop(b);
    while get_tat(&mut c, &key).await != Some(tat) {
        assert!(
            start.elapsed() < GUARD,
            "hang guard: the cell never came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(limiter.round_trips(), Some(3));
}

#[tokio::test]
async fn a_wrong_url_is_an_error_from_connect() {
    assert!(redis::connect("not a url").await.is_err());
    // nothing listens on port 1
    assert!(redis::connect("redis://127.0.0.1:1/").await.is_err());
}

#[tokio::test]
async fn fail_open_and_local_apply_when_redis_cannot_be_reached() {
    // a lazy connection to a port nothing listens on: every round trip fails
    let down = redis::connect_lazy("redis://127.0.0.1:1/").unwrap();
    let open = RateLimiter::redis(&down, &name("down-open"), slow(1))
        .when_unavailable(Unavailable::FailOpen);
    for _ in 0..3 {
        guard(open.until_ready()).await;
        assert!(guard(open.try_acquire()).await);
    }
    // Local with 2 replicas: burst 4 / 2 = 2 cells, then one per 20 s
    let local = RateLimiter::redis(&down, &name("down-local"), slow(4))
        .when_unavailable(Unavailable::Local { replicas: n(2) });
    assert!(guard(local.try_acquire()).await);
    guard(local.until_ready()).await;
    assert!(!guard(local.try_acquire()).await);
    // fail closed: a try refuses, a wait waits
    let closed = RateLimiter::redis(&down, &name("down-closed"), slow(4));
    assert_eq!(closed.unavailable_policy(), Some(Unavailable::FailClosed));
    assert!(!guard(closed.try_acquire()).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), closed.until_ready())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn debug_names_the_limiter() {
    let limiter = RateLimiter::redis(&conn().await, "debug-name", slow(1));
    let shown = format!("{limiter:?}");
    assert!(shown.contains("debug-name"), "{shown}");
    assert!(shown.contains("FailClosed"), "{shown}");
}
