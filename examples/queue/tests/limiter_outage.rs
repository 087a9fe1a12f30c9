//! A `RateLimiter::redis` stream while its Redis server is stopped mid-run and restarted: each
//! `Unavailable` policy holds, nothing panics, and every item comes out, in order.
//!
//! Each test has a server of its own (it is stopped). Real time: the assertions are counts,
//! order, and lower bounds on release instants that follow from the quotas.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, stream};
use stagepipe::Quota;
use stagepipe::prelude::*;
use stagepipe::redis::Unavailable;
use stagepipe_queue::server::RedisServer;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const GUARD: Duration = Duration::from_secs(30);

type Seen = Arc<Mutex<Vec<(u32, Instant)>>>;

struct Run {
    server: RedisServer,
    limiter: RateLimiter,
    seen: Seen,
    consumer: JoinHandle<()>,
}

fn n(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap()
}

/// A server, a limiter on it with `policy`, and a task passing `items` items through
/// `rate_limit`, noting when each came out.
async fn start(policy: Unavailable, quota: Quota, items: u32) -> Run {
    let server = RedisServer::start();
    let conn = stagepipe::redis::connect(&server.url()).await.unwrap();
    let limiter = RateLimiter::redis(&conn, "outage", quota).when_unavailable(policy);
    let seen: Seen = Arc::default();
    let consumer = tokio::spawn({
        let (limiter, seen) = (limiter.clone(), Arc::clone(&seen));
        async move {
            stream::iter(0..items)
                .rate_limit(&limiter)
                .for_each(|i| {
                    seen.lock().unwrap().push((i, Instant::now()));
                    async {}
                })
                .await;
        }
    });
    Run {
        server,
        limiter,
        seen,
        consumer,
    }
}

impl Run {
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Waits (a hang guard, not a threshold) until `count` items came out.
    async fn wait_for(&self, count: usize) {
        let start = Instant::now();
        while self.count() < count {
            assert!(
                start.elapsed() < GUARD,
                "hang guard: {} of {count} items came out",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the stream's end; every item came out once, in order.
    async fn finish(self, items: u32) -> Vec<(u32, Instant)> {
        tokio::time::timeout(GUARD, self.consumer)
            .await
            .expect("hang guard: the stream did not end")
            .expect("no panic");
        let seen = self.seen.lock().unwrap().clone();
        let order: Vec<u32> = seen.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..items).collect::<Vec<_>>(), "nothing lost");
        seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_lets_items_through_while_redis_is_down() {
    // 10 a second: 30 items would take 2.7 s through Redis
    let quota = Quota::with_period(Duration::from_millis(100)).unwrap();
    let mut run = start(Unavailable::FailOpen, quota, 30).await;
    run.wait_for(3).await;
    run.server.stop();
    // every item comes out with Redis still down
    run.wait_for(30).await;
    run.server.restart();
    let trips = run.limiter.round_trips().unwrap();
    // and the limiter uses Redis again once it is back
    let start = Instant::now();
    loop {
        let took = run.limiter.try_acquire().await;
        let now = run.limiter.round_trips().unwrap();
        assert!(now > trips);
        if took && !run.limiter.try_acquire().await {
            break; // a fresh Redis: one cell (burst 1), then none
        }
        assert!(start.elapsed() < GUARD, "hang guard: Redis never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.finish(30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_waits_for_redis_and_resumes_after_restart() {
    let quota = Quota::with_period(Duration::from_millis(100)).unwrap();
    let mut run = start(Unavailable::FailClosed, quota, 10).await;
    run.wait_for(3).await;
    run.server.stop();
    let stopped = run.count();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // at most the one item whose cell was reserved before the stop came out meanwhile
    let during = run.count();
    assert!(
        during <= stopped + 1,
        "{during} items out while Redis was down ({stopped} before)"
    );
    run.server.restart();
    let seen = run.finish(10).await;
    assert_eq!(seen.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_keeps_quota_over_replicas_while_redis_is_down() {
    // 20 a second, burst 2; two replicas: 10 a second, burst 1, each, while Redis is away
    let quota = Quota::with_period(Duration::from_millis(50))
        .unwrap()
        .allow_burst(n(2));
    let mut run = start(Unavailable::Local { replicas: n(2) }, quota, 14).await;
    run.wait_for(3).await;
    run.server.stop();
    let stopped_at = Instant::now();
    let before = run.count();
    // progress without Redis...
    run.wait_for(before + 5).await;
    let outage: Vec<Instant> = run
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, at)| *at)
        .filter(|at| *at > stopped_at)
        .collect();
    run.server.restart();
    // ...at the local quota at most: past one cell reserved in Redis before the stop and the
    // local burst, one per 100 ms
    for (i, at) in outage.iter().enumerate().skip(2) {
        let due = Duration::from_millis(100) * (i as u32 - 1);
        assert!(
            *at - stopped_at >= due,
            "outage item {i} out {:?} after the stop, due {due:?}",
            *at - stopped_at
        );
    }
    run.finish(14).await;
}
