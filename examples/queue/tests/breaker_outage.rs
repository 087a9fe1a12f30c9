//! A Redis-backed circuit breaker (and dedupe window) through an outage: Redis is killed
//! mid-run and restarted on the same port. While it is away each handle follows its policy
//! (`FailClosed` rejects, `FailOpen` admits, `Local` counts in memory), no call panics or
//! waits past the response timeout, and after the restart the shared breaker works again.
//!
//! Uses a `RedisServer` of its own (it stops it), never the shared one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stagepipe::redis::{DedupeWindow, Unavailable};
use stagepipe::{BreakerError, CircuitBreaker, CircuitState};
use stagepipe_queue::server::RedisServer;
use tokio::time::timeout;

/// A hang guard for one call: the response timeout (1 s) and then some.
const ONE_CALL: Duration = Duration::from_secs(5);
/// A hang guard for the reconnection after the restart.
const RECONNECT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(60);

async fn call(
    breaker: &CircuitBreaker,
    fut: impl Future<Output = Result<u32, &'static str>>,
) -> Result<u32, BreakerError<(), &'static str>> {
    timeout(ONE_CALL, breaker.call(fut))
        .await
        .expect("no call waits past the response timeout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_holds_through_an_outage_and_the_breaker_works_again_after() {
    let mut server = RedisServer::start();
    let url = server.url();
    let conn = stagepipe::redis::connect(&url).await.unwrap();
    let closed = CircuitBreaker::redis(&conn, "outage", 2, LONG);
    let open = closed.clone().when_unavailable(Unavailable::FailOpen);
    let local = closed.clone().when_unavailable(Unavailable::Local {
        replicas: 3.try_into().unwrap(),
    });
    let window = DedupeWindow::redis(&conn, "outage", LONG);
    let ran = AtomicUsize::new(0);
    let ok = || async {
        ran.fetch_add(1, Ordering::SeqCst);
        Ok::<u32, &str>(1)
    };
    let down = || async {
        ran.fetch_add(1, Ordering::SeqCst);
        Err::<u32, &str>("down")
    };

    // Up: the shared breaker works for every handle.
    assert_eq!(call(&closed, ok()).await, Ok(1));
    assert!(window.claim("before").await.unwrap().is_some());

    server.stop();
    ran.store(0, Ordering::SeqCst);
    for _ in 0..3 {
        // FailClosed: rejected, never run.
        assert_eq!(call(&closed, ok()).await, Err(BreakerError::Open(())));
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    for _ in 0..3 {
        // FailOpen: run; failures are not counted anywhere.
        assert_eq!(call(&open, down()).await, Err(BreakerError::Failed("down")));
    }
    assert_eq!(ran.load(Ordering::SeqCst), 3);
    assert_eq!(call(&open, ok()).await, Ok(1));
    // Local: the handle's in-memory breaker counts this process's failures and opens.
    assert_eq!(local.state(), CircuitState::Closed);
    assert_eq!(
        call(&local, down()).await,
        Err(BreakerError::Failed("down"))
    );
    assert_eq!(
        call(&local, down()).await,
        Err(BreakerError::Failed("down"))
    );
    assert_eq!(local.state(), CircuitState::Open);
    let before = ran.load(Ordering::SeqCst);
    assert_eq!(call(&local, ok()).await, Err(BreakerError::Open(())));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        before,
        "the local breaker rejects"
    );
    // The dedupe window fails closed too: the claim is refused, to be redelivered.
    assert!(
        timeout(ONE_CALL, window.claim("during"))
            .await
            .unwrap()
            .is_err()
    );

    server.restart();
    // Nothing was persisted: the breaker starts closed. Wait for the reconnection.
    timeout(RECONNECT, async {
        while call(&closed, ok()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the handle reconnects after the restart");
    assert_eq!(closed.state(), CircuitState::Closed);
    // Works again, shared: failures through one handle open it for a handle on another
    // connection.
    assert_eq!(
        call(&closed, down()).await,
        Err(BreakerError::Failed("down"))
    );
    assert_eq!(call(&open, down()).await, Err(BreakerError::Failed("down")));
    let other = CircuitBreaker::redis(
        &stagepipe::redis::connect(&url).await.unwrap(),
        "outage",
        2,
        LONG,
    );
    assert_eq!(call(&other, ok()).await, Err(BreakerError::Open(())));
    assert_eq!(local.state(), CircuitState::Open, "Redis's state again");
    let claim = timeout(ONE_CALL, window.claim("after"))
        .await
        .unwrap()
        .unwrap();
    assert!(claim.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_stream_failing_closed_waits_for_redis_and_then_carries_on() {
    use futures::StreamExt;
    use stagepipe::PipelineExt;

    let mut server = RedisServer::start();
    let conn = stagepipe::redis::connect(&server.url()).await.unwrap();
    let window = DedupeWindow::redis(&conn, "outage-stream", LONG);
    let (tx, rx) = tokio::sync::mpsc::channel::<u32>(4);
    let mut fresh = tokio_stream_from(rx).dedupe_with(&window, |x| *x);

    tx.send(1).await.unwrap();
    assert_eq!(timeout(ONE_CALL, fresh.next()).await.unwrap(), Some(1));
    server.stop();
    // FailClosed: the items wait (retried with backoff) while Redis is away...
    tx.send(1).await.unwrap();
    tx.send(2).await.unwrap();
    let (out_tx, mut out) = tokio::sync::mpsc::unbounded_channel();
    let forward = tokio::spawn(async move {
        while let Some(x) = fresh.next().await {
            out_tx.send(x).unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        out.try_recv().is_err(),
        "nothing passes while Redis is away"
    );
    // ...and go through once it answers (empty after the restart: 1 is new again).
    server.restart();
    tx.send(2).await.unwrap();
    tx.send(3).await.unwrap();
    drop(tx);
    timeout(RECONNECT, forward).await.unwrap().unwrap();
    let mut passed = Vec::new();
    while let Ok(x) = out.try_recv() {
        passed.push(x);
    }
    assert_eq!(passed, [1, 2, 3]);
}

/// A stream of what the channel receives.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<u32>,
) -> impl futures::Stream<Item = u32> + Send + Unpin + 'static {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }))
}
