//! `stagepipe::redis::DedupeWindow` against a real Redis (`scripts/with-redis cargo test
//! --features redis --test redis_dedupe`): the `dedupe_with` operator across handles, window
//! expiry, order; `claim` / `done` / drop; concurrent claimers; the policies while Redis is away.
//!
//! Real Redis means real time: the tests wait for what Redis reports (a key's expiry), with
//! generous hang guards, and assert values, order and counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use redis::AsyncCommands;
use stagepipe::PipelineExt;
use stagepipe::redis::{DedupeWindow, Unavailable};
use tokio::time::timeout;

const GUARD: Duration = Duration::from_secs(20);
const LONG: Duration = Duration::from_secs(60);

mod common;
use common::redis_env::{conn, dead_conn, unique};

fn key(name: &str, key: &str) -> String {
    format!("stagepipe:dedupe:{{{name}}}:{key}")
}

/// Waits until `key` no longer exists (expired or deleted).
async fn until_gone(key: &str) {
    let mut c = conn().await;
    timeout(GUARD, async {
        while c.exists::<_, bool>(key).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the key goes");
}

#[tokio::test]
async fn duplicates_are_dropped_across_handles_in_order() {
    let name = unique("across");
    let a = DedupeWindow::redis(&conn().await, &name, LONG);
    let b = DedupeWindow::redis(&conn().await, &name, LONG);
    let first: Vec<u32> = stream::iter([1u32, 2, 1, 3, 2, 3])
        .dedupe_with(&a, |x| *x)
        .collect()
        .await;
    assert_eq!(first, [1, 2, 3]);
    let second: Vec<u32> = stream::iter([3u32, 4, 2, 5, 4, 1, 6])
        .dedupe_with(&b, |x| *x)
        .collect()
        .await;
    assert_eq!(second, [4, 5, 6], "seen through the other handle");
    let mut c = conn().await;
    let ttl: i64 = c.pttl(key(&name, "4")).await.unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "marked for the window: {ttl} ms");
}

#[tokio::test]
async fn many_items_keep_their_order_through_batches() {
    let name = unique("order");
    let window = DedupeWindow::redis(&conn().await, &name, LONG);
    // 1000 items ready at once (several batches), each key five times.
    let items: Vec<(usize, u32)> = (0..1000).map(|i| (i, (i % 200) as u32)).collect();
    let passed: Vec<(usize, u32)> = stream::iter(items)
        .dedupe_with(&window, |(_, k)| format!("k{k}"))
        .collect()
        .await;
    let expected: Vec<(usize, u32)> = (0..200).map(|i| (i, i as u32)).collect();
    assert_eq!(passed, expected);
    // One pipelined round trip per batch of ready items.
    assert_eq!(
        window.round_trips(),
        1000u64.div_ceil(DedupeWindow::MAX_BATCH as u64)
    );
}

#[tokio::test]
async fn items_arriving_one_by_one_pass_in_order() {
    let name = unique("trickle");
    let window = DedupeWindow::redis(&conn().await, &name, LONG);
    let (tx, rx) = tokio::sync::mpsc::channel::<u32>(1);
    let producer = tokio::spawn(async move {
        for x in [5u32, 5, 6, 7, 6, 8] {
            tx.send(x).await.unwrap();
            tokio::task::yield_now().await;
        }
    });
    let passed: Vec<u32> = tokio_stream::wrappers::ReceiverStream::new(rx)
        .dedupe_with(&window, |x| *x)
        .collect()
        .await;
    producer.await.unwrap();
    assert_eq!(passed, [5, 6, 7, 8]);
}

#[tokio::test]
async fn a_key_passes_again_once_the_window_has_passed() {
    let name = unique("expiry");
    let window = DedupeWindow::redis(&conn().await, &name, Duration::from_millis(200));
    let once: Vec<&str> = stream::iter(["x", "x", "y"])
        .dedupe_with(&window, |s| *s)
        .collect()
        .await;
    assert_eq!(once, ["x", "y"]);
    until_gone(&key(&name, "x")).await;
    let again: Vec<&str> = stream::iter(["x", "x"])
        .dedupe_with(&window, |s| *s)
        .collect()
        .await;
    assert_eq!(again, ["x"]);
}

#[tokio::test]
async fn claim_done_and_drop() {
    let name = unique("claims");
    let a = DedupeWindow::redis(&conn().await, &name, LONG);
    let b = DedupeWindow::redis(&conn().await, &name, LONG);
    let claim = a.claim("m1").await.unwrap().expect("a new key is claimed");
    assert_eq!(a.round_trips(), 1);
    assert_eq!(claim.key(), "m1");
    assert!(b.claim("m1").await.unwrap().is_none(), "held by a's claim");
    assert!(!b.is_done("m1").await.unwrap(), "held, not done");
    // Dropped without `done` (a failed processing): released for a redelivery.
    drop(claim);
    until_gone(&key(&name, "m1")).await;
    let claim = b.claim("m1").await.unwrap().expect("released: claimable");
    assert!(claim.done().await.unwrap());
    assert!(a.claim("m1").await.unwrap().is_none(), "done: skipped");
    assert!(a.is_done("m1").await.unwrap());
    assert!(!a.is_done("never").await.unwrap());
    assert!(b.claim("m1").await.unwrap().is_none());
    let mut c = conn().await;
    let value: String = c.get(key(&name, "m1")).await.unwrap();
    assert_eq!(value, "done");
    let ttl: i64 = c.pttl(key(&name, "m1")).await.unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "done for the window: {ttl} ms");
    // An explicit release works as a drop, at once.
    let claim = a.claim("m2").await.unwrap().unwrap();
    claim.release().await.unwrap();
    assert!(b.claim("m2").await.unwrap().is_some());
}

#[tokio::test]
async fn an_expired_claim_neither_releases_nor_overwrites_the_next_one() {
    let name = unique("expired");
    let a = DedupeWindow::redis(&conn().await, &name, LONG).claim_lease(Duration::from_millis(200));
    assert_eq!(a.lease(), Duration::from_millis(200));
    let b = DedupeWindow::redis(&conn().await, &name, LONG);
    let stale = a.claim("k").await.unwrap().unwrap();
    let stale2 = a.claim("k2").await.unwrap();
    assert!(stale2.is_some());
    // The holder takes too long: its lease expires and b claims the key.
    until_gone(&key(&name, "k")).await;
    let fresh = b.claim("k").await.unwrap().expect("the lease expired");
    assert!(!stale.done().await.unwrap(), "b's claim holds the key");
    assert!(a.claim("k").await.unwrap().is_none());
    until_gone(&key(&name, "k2")).await;
    let fresh2 = b.claim("k2").await.unwrap().unwrap();
    stale2.unwrap().release().await.unwrap();
    assert!(a.claim("k2").await.unwrap().is_none(), "not released by a");
    assert!(fresh.done().await.unwrap());
    drop(fresh2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_concurrent_claimers_exactly_one_wins() {
    let name = unique("race");
    let handles = [
        DedupeWindow::redis(&conn().await, &name, LONG),
        DedupeWindow::redis(&conn().await, &name, LONG),
    ];
    let wins = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let window = handles[i % 2].clone();
        let wins = wins.clone();
        tasks.push(tokio::spawn(async move {
            if let Some(claim) = window.claim("job-1").await.unwrap() {
                wins.fetch_add(1, Ordering::SeqCst);
                assert!(claim.done().await.unwrap());
            }
        }));
    }
    for task in tasks {
        timeout(GUARD, task).await.unwrap().unwrap();
    }
    assert_eq!(wins.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn while_redis_is_away_each_handle_follows_its_policy() {
    let conn = dead_conn();
    let closed = DedupeWindow::redis(&conn, "away", LONG);
    assert_eq!(closed.unavailable_policy(), Unavailable::FailClosed);
    let open = closed.clone().when_unavailable(Unavailable::FailOpen);
    let local = closed.clone().when_unavailable(Unavailable::Local {
        replicas: 1.try_into().unwrap(),
    });
    timeout(GUARD, async {
        // FailClosed: a claim is refused with the error (leave the message unacknowledged).
        assert!(closed.claim("a").await.is_err());
        // FailOpen: everything is new.
        let c1 = open.claim("a").await.unwrap().unwrap();
        let c2 = open.claim("a").await.unwrap().unwrap();
        assert!(c1.done().await.unwrap() && c2.done().await.unwrap());
        let all: Vec<u32> = stream::iter([1u32, 1, 2])
            .dedupe_with(&open, |x| *x)
            .collect()
            .await;
        assert_eq!(all, [1, 1, 2]);
        // Local: the handle's in-memory window.
        let claim = local.claim("a").await.unwrap().unwrap();
        assert!(local.claim("a").await.unwrap().is_none());
        drop(claim);
        let claim = local.claim("a").await.unwrap().expect("released");
        assert!(claim.done().await.unwrap());
        assert!(local.claim("a").await.unwrap().is_none(), "done");
        assert!(local.is_done("a").await.unwrap());
        assert!(closed.is_done("a").await.is_err());
        let fresh: Vec<u32> = stream::iter([1u32, 1, 2, 1])
            .dedupe_with(&local, |x| *x)
            .collect()
            .await;
        assert_eq!(fresh, [1, 2]);
    })
    .await
    .expect("nothing waits past the response timeout");
    // FailClosed on a stream: the batch waits (upstream is held) until Redis answers.
    let mut held = stream::iter([1u32]).dedupe_with(&closed, |x| *x);
    assert!(
        timeout(Duration::from_millis(300), held.next())
            .await
            .is_err()
    );
}

#[test]
fn a_zero_window_or_lease_is_refused_with_its_name() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let conn = dead_conn();
    let err = DedupeWindow::try_redis(&conn, "x", Duration::ZERO).unwrap_err();
    assert_eq!(err.parameter(), "window");
    let window = DedupeWindow::try_redis(&conn, "x", LONG).unwrap();
    assert_eq!((window.name(), window.window()), ("x", LONG));
    assert_eq!(window.lease(), Duration::from_secs(30));
    let err = window.try_claim_lease(Duration::ZERO).unwrap_err();
    assert_eq!(err.parameter(), "lease");
}

#[tokio::test]
async fn handles_are_shared_and_their_streams_and_claims_are_send() {
    fn shared<T: Clone + Send + Sync + 'static>(_: &T) {}
    fn send_sync<T: Send + Sync + 'static>(_: &T) {}
    let window = DedupeWindow::redis(&dead_conn(), "traits", LONG);
    shared(&window);
    let s = stream::iter([1u32]).dedupe_with(&window, |x| *x);
    send_sync(&s);
    let breaker = stagepipe::CircuitBreaker::redis(&dead_conn(), "traits", 1, LONG);
    shared(&breaker);
    let s = stream::iter([1u32]).circuit_breaker(&breaker, |x| async move { Ok::<_, ()>(x) });
    send_sync(&s);
    fn send_future<F: Future + Send>(_: &F) {}
    send_future(&breaker.call(async { Ok::<_, ()>(1) }));
    send_future(&window.claim("k"));
    fn send_claim<T: Send + Sync + 'static>() {}
    send_claim::<stagepipe::redis::Claim>();
}
