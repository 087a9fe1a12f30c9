//! `CircuitBreaker::redis` against a real Redis (`scripts/with-redis cargo test --features redis
//! --test redis_breaker`): handles on two connections share one breaker; one half-open trial
//! fleet-wide; a trial's lease released on drop and expiring after a crash; every user of a
//! breaker (operator, `call`, `Call`, tower) works with it; the policies while Redis is away.
//!
//! Real Redis means real time: the tests wait for what Redis reports (the end of an opening on
//! Redis's clock, a lease's expiry), with generous hang guards, and assert counts and values.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use redis::AsyncCommands;
use stagepipe::prelude::*;
use stagepipe::redis::{ConnectionManager, Unavailable};
use tokio::sync::{Notify, mpsc};
use tokio::time::timeout;

/// A hang guard: far longer than anything here takes, even on a loaded machine.
const GUARD: Duration = Duration::from_secs(20);

mod common;
use common::redis_env::{conn, dead_conn, unique};

fn state_key(name: &str) -> String {
    format!("stagepipe:breaker:{{{name}}}")
}

fn trial_key(name: &str) -> String {
    format!("stagepipe:breaker:{{{name}}}:trial")
}

/// Redis's clock in milliseconds.
async fn redis_now(conn: &mut ConnectionManager) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Waits until the opening recorded in Redis has ended on Redis's own clock.
async fn until_half_open(name: &str) {
    let mut c = conn().await;
    let until: i64 = c.hget(state_key(name), "until").await.unwrap();
    timeout(GUARD, async {
        loop {
            let now = redis_now(&mut c).await;
            if now >= until {
                return;
            }
            let left = u64::try_from(until - now).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(left + 1)).await;
        }
    })
    .await
    .expect("the opening ends");
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

async fn fail(breaker: &CircuitBreaker) -> Result<(), BreakerError<(), &'static str>> {
    breaker.call(async { Err("down") }).await
}

async fn succeed(breaker: &CircuitBreaker) -> Result<u32, BreakerError<(), &'static str>> {
    breaker.call(async { Ok(7) }).await
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn opened_by_failures_through_one_handle_rejects_through_another() {
    let name = unique("open-elsewhere");
    let a = CircuitBreaker::redis(&conn().await, &name, 3, LONG);
    let b = CircuitBreaker::redis(&conn().await, &name, 3, LONG);
    for i in 1..=2 {
        assert_eq!(fail(&a).await, Err(BreakerError::Failed("down")));
        assert_eq!(a.consecutive_failures(), i);
        assert_eq!(a.state(), CircuitState::Closed);
    }
    assert_eq!(succeed(&b).await, Ok(7), "closed: b's calls run");
    // b's success reset the shared count: two more failures do not open it...
    assert_eq!(fail(&a).await, Err(BreakerError::Failed("down")));
    assert_eq!(fail(&a).await, Err(BreakerError::Failed("down")));
    assert_eq!(a.consecutive_failures(), 2);
    assert_eq!(a.state(), CircuitState::Closed);
    // ...the third does.
    assert_eq!(fail(&a).await, Err(BreakerError::Failed("down")));
    assert_eq!(a.state(), CircuitState::Open);
    assert_eq!(a.consecutive_failures(), 3);

    // b has not seen it yet (no round trip): its last view is closed.
    assert_eq!(b.state(), CircuitState::Closed);
    let ran = AtomicUsize::new(0);
    let r = b
        .call(async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(1)
        })
        .await;
    assert_eq!(r, Err(BreakerError::Open(())));
    assert_eq!(ran.load(Ordering::SeqCst), 0, "rejected without running");
    assert_eq!(b.state(), CircuitState::Open);
    assert_eq!(b.consecutive_failures(), 3);
    // Two round trips per call that ran (admit, record), one per rejection.
    assert_eq!(a.round_trips(), Some(2 * 5));
    assert_eq!(b.round_trips(), Some(2 + 1));
    assert_eq!(CircuitBreaker::new(1, LONG).round_trips(), None);
}

#[tokio::test]
async fn a_success_while_closed_resets_the_count_for_every_handle() {
    let name = unique("reset");
    let a = CircuitBreaker::redis(&conn().await, &name, 2, LONG);
    let b = CircuitBreaker::redis(&conn().await, &name, 2, LONG);
    for _ in 0..5 {
        assert_eq!(fail(&a).await, Err(BreakerError::Failed("down")));
        assert_eq!(succeed(&b).await, Ok(7));
        assert_eq!(b.consecutive_failures(), 0);
    }
    let mut c = conn().await;
    let failures: u32 = c.hget(state_key(&name), "failures").await.unwrap();
    assert_eq!(failures, 0);
    assert_eq!(fail(&b).await, Err(BreakerError::Failed("down")));
    assert_eq!(fail(&a).await, Err(BreakerError::Failed("down")));
    assert_eq!(succeed(&b).await, Err(BreakerError::Open(())));
}

/// Starts `n` calls at once, alternating between `handles`; each admitted call counts itself
/// in `ran` and then waits for `gate`. Returns the receiver of their results.
fn many_callers(
    handles: &[CircuitBreaker],
    n: usize,
    ran: &Arc<AtomicUsize>,
    gate: &Arc<Notify>,
) -> mpsc::UnboundedReceiver<Result<u32, BreakerError<(), &'static str>>> {
    let (tx, rx) = mpsc::unbounded_channel();
    for i in 0..n {
        let breaker = handles[i % handles.len()].clone();
        let (ran, gate, tx) = (ran.clone(), gate.clone(), tx.clone());
        tokio::spawn(async move {
            let r = breaker
                .call(async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok::<_, &str>(1)
                })
                .await;
            let _ = tx.send(r);
        });
    }
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_open_for_exactly_one_trial_runs_across_the_fleet() {
    let name = unique("one-trial");
    let open_for = Duration::from_millis(300);
    let handles = [
        CircuitBreaker::redis(&conn().await, &name, 1, open_for),
        CircuitBreaker::redis(&conn().await, &name, 1, open_for),
    ];
    assert_eq!(fail(&handles[0]).await, Err(BreakerError::Failed("down")));
    assert_eq!(succeed(&handles[1]).await, Err(BreakerError::Open(())));
    until_half_open(&name).await;

    let (ran, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let callers = 24;
    let mut results = many_callers(&handles, callers, &ran, &gate);
    // Every caller but the trial is rejected while the trial runs.
    for _ in 1..callers {
        let r = timeout(GUARD, results.recv()).await.unwrap().unwrap();
        assert_eq!(r, Err(BreakerError::Open(())));
    }
    assert_eq!(ran.load(Ordering::SeqCst), 1, "exactly one trial ran");
    let mut c = conn().await;
    assert!(c.exists::<_, bool>(trial_key(&name)).await.unwrap());
    gate.notify_one();
    let r = timeout(GUARD, results.recv()).await.unwrap().unwrap();
    assert_eq!(r, Ok(1), "the trial succeeds");
    // Its success closed the breaker for everyone and gave the lease back.
    assert!(!c.exists::<_, bool>(trial_key(&name)).await.unwrap());
    assert_eq!(succeed(&handles[1]).await, Ok(7));
    assert_eq!(succeed(&handles[0]).await, Ok(7));
    assert_eq!(handles[0].state(), CircuitState::Closed);
}

#[tokio::test]
async fn a_failed_trial_opens_it_again_for_open_for() {
    let name = unique("trial-fails");
    let open_for = Duration::from_millis(200);
    let a = CircuitBreaker::redis(&conn().await, &name, 2, open_for);
    let b = CircuitBreaker::redis(&conn().await, &name, 2, open_for);
    fail(&a).await.unwrap_err();
    fail(&a).await.unwrap_err();
    until_half_open(&name).await;
    assert_eq!(
        fail(&b).await,
        Err(BreakerError::Failed("down")),
        "the trial"
    );
    assert_eq!(b.state(), CircuitState::Open);
    assert_eq!(succeed(&a).await, Err(BreakerError::Open(())));
    until_half_open(&name).await;
    assert_eq!(succeed(&a).await, Ok(7), "the next trial");
    assert_eq!(succeed(&b).await, Ok(7));
}

/// A call admitted as the trial whose inner future never ends; returns it once the trial runs.
async fn running_trial(
    breaker: &CircuitBreaker,
) -> std::pin::Pin<Box<impl Future<Output = Result<u32, BreakerError<(), &'static str>>> + '_>> {
    let started = Arc::new(Notify::new());
    let signal = started.clone();
    let mut trial = Box::pin(breaker.call(async move {
        signal.notify_one();
        futures::future::pending::<Result<u32, &str>>().await
    }));
    tokio::select! {
        r = &mut trial => panic!("the trial ended: {r:?}"),
        () = started.notified() => {}
        () = tokio::time::sleep(GUARD) => panic!("no trial was admitted"),
    }
    trial
}

#[tokio::test]
async fn a_dropped_trial_gives_its_lease_back_at_once() {
    let name = unique("trial-dropped");
    let open_for = Duration::from_millis(200);
    // A lease far longer than the test: only the release can free it.
    let a = CircuitBreaker::redis(&conn().await, &name, 1, open_for).trial_lease(LONG);
    let b = CircuitBreaker::redis(&conn().await, &name, 1, open_for).trial_lease(LONG);
    fail(&a).await.unwrap_err();
    until_half_open(&name).await;
    let trial = running_trial(&a).await;
    assert_eq!(
        succeed(&b).await,
        Err(BreakerError::Open(())),
        "the trial runs"
    );
    drop(trial);
    until_gone(&trial_key(&name)).await;
    assert_eq!(succeed(&b).await, Ok(7), "the next caller is the trial");
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test]
async fn a_crashed_trial_holder_does_not_wedge_the_breaker() {
    let name = unique("trial-crashed");
    let open_for = Duration::from_millis(200);
    let lease = Duration::from_millis(400);
    let a = CircuitBreaker::redis(&conn().await, &name, 1, open_for).trial_lease(lease);
    let b = CircuitBreaker::redis(&conn().await, &name, 1, open_for).trial_lease(lease);
    fail(&a).await.unwrap_err();
    until_half_open(&name).await;
    // The holder "crashes": its call is never polled again nor dropped.
    std::mem::forget(running_trial(&a).await);
    let mut c = conn().await;
    let pttl: i64 = c.pttl(trial_key(&name)).await.unwrap();
    assert!(
        pttl > 0 && pttl <= 400,
        "the lease expires by itself: {pttl} ms left"
    );
    assert_eq!(succeed(&b).await, Err(BreakerError::Open(())));
    until_gone(&trial_key(&name)).await;
    assert_eq!(succeed(&b).await, Ok(7), "after the lease, another trial");
    assert_eq!(succeed(&a).await, Ok(7));
}

#[tokio::test]
async fn an_outcome_from_an_earlier_period_is_ignored() {
    let name = unique("stale");
    let a = CircuitBreaker::redis(&conn().await, &name, 1, Duration::from_millis(200));
    let b = CircuitBreaker::redis(&conn().await, &name, 1, Duration::from_millis(200));
    // A call admitted while closed...
    let (gate, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (wait, signal) = (gate.clone(), started.clone());
    let slow = tokio::spawn({
        let a = a.clone();
        async move {
            a.call(async move {
                signal.notify_one();
                wait.notified().await;
                Err::<(), _>("late")
            })
            .await
        }
    });
    timeout(GUARD, started.notified()).await.unwrap();
    // ...while another opens the breaker, and a trial closes it...
    assert_eq!(fail(&b).await, Err(BreakerError::Failed("down")));
    until_half_open(&name).await;
    assert_eq!(succeed(&b).await, Ok(7), "the trial closes it");
    // ...fails now, in a later period: it does not open the breaker again.
    gate.notify_one();
    let r = timeout(GUARD, slow).await.unwrap().unwrap();
    assert_eq!(r, Err(BreakerError::Failed("late")));
    assert_eq!(succeed(&b).await, Ok(7));
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test]
async fn the_operator_call_and_call_stack_use_the_shared_state() {
    let name = unique("users");
    let a = CircuitBreaker::redis(&conn().await, &name, 2, LONG);
    let b = CircuitBreaker::redis(&conn().await, &name, 2, LONG);
    let results: Vec<_> = stream::iter(1..=4u32)
        .circuit_breaker(&a, |_| async { Err::<u32, _>("down") })
        .collect()
        .await;
    assert_eq!(
        results,
        [
            Err(BreakerError::Failed("down")),
            Err(BreakerError::Failed("down")),
            Err(BreakerError::Open(3)),
            Err(BreakerError::Open(4)),
        ]
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let call = Call::new(move |x: u32| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, String>(x) }
    })
    .circuit_breaker(&b);
    let err = call.run(1).await.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // The operator on the other handle rejects too, and gives the items back.
    let results: Vec<_> = stream::iter([5u32, 6])
        .circuit_breaker(&b, |x| async move { Ok::<_, &str>(x) })
        .collect()
        .await;
    assert_eq!(
        results,
        [Err(BreakerError::Open(5)), Err(BreakerError::Open(6))]
    );
}

#[tokio::test]
async fn a_call_stack_s_timeouts_open_the_shared_breaker() {
    let name = unique("timeouts");
    let a = CircuitBreaker::redis(&conn().await, &name, 2, LONG);
    let b = CircuitBreaker::redis(&conn().await, &name, 2, LONG);
    let call = Call::new(|_: u32| futures::future::pending::<Result<u32, String>>())
        .timeout(Duration::from_millis(20))
        .circuit_breaker(&a);
    for _ in 0..2 {
        let err = call.run(1).await.unwrap_err();
        assert!(matches!(err, CallError::Timeout { .. }), "{err:?}");
    }
    assert_eq!(succeed(&b).await, Err(BreakerError::Open(())));
}

#[cfg(feature = "tower")]
#[tokio::test]
async fn the_tower_layer_uses_the_shared_state() {
    use tower::{Layer, Service, ServiceExt, service_fn};
    let name = unique("tower");
    let a = CircuitBreaker::redis(&conn().await, &name, 1, LONG);
    let b = CircuitBreaker::redis(&conn().await, &name, 1, LONG);
    let mut svc = a.layer(service_fn(|x: u32| async move { Err::<u32, _>(x) }));
    let r = svc.ready().await.unwrap().call(1).await;
    assert_eq!(r, Err(BreakerError::Failed(1)));
    let mut other = b.layer(service_fn(|x: u32| async move { Ok::<u32, u32>(x) }));
    let r = other.ready().await.unwrap().call(2).await;
    assert_eq!(r, Err(BreakerError::Open(())));
}

#[tokio::test]
async fn while_redis_is_away_each_handle_follows_its_policy() {
    let conn = dead_conn();
    let closed = CircuitBreaker::redis(&conn, "away", 2, LONG);
    assert_eq!(closed.unavailable_policy(), Some(Unavailable::FailClosed));
    let open = closed.clone().when_unavailable(Unavailable::FailOpen);
    let local = closed.clone().when_unavailable(Unavailable::Local {
        replicas: 1.try_into().unwrap(),
    });
    let ran = AtomicUsize::new(0);
    let counted = || async {
        ran.fetch_add(1, Ordering::SeqCst);
        Err::<u32, _>("down")
    };
    timeout(GUARD, async {
        // FailClosed: rejected without running.
        for _ in 0..3 {
            assert_eq!(closed.call(counted()).await, Err(BreakerError::Open(())));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        // FailOpen: every call runs; nothing is counted anywhere.
        for _ in 0..3 {
            assert_eq!(
                open.call(counted()).await,
                Err(BreakerError::Failed("down"))
            );
        }
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        // Local: the handle's own breaker counts and opens at the threshold.
        for _ in 0..2 {
            assert_eq!(
                local.call(counted()).await,
                Err(BreakerError::Failed("down"))
            );
        }
        assert_eq!(local.state(), CircuitState::Open);
        assert_eq!(local.consecutive_failures(), 2);
        assert_eq!(local.call(counted()).await, Err(BreakerError::Open(())));
        assert_eq!(ran.load(Ordering::SeqCst), 5);
    })
    .await
    .expect("no call waits past the response timeout");
}

#[test]
fn zero_threshold_or_period_is_refused_with_its_name() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let conn = dead_conn();
    let err = CircuitBreaker::try_redis(&conn, "x", 0, LONG).unwrap_err();
    assert_eq!(err.parameter(), "failure_threshold");
    let err = CircuitBreaker::try_redis(&conn, "x", 1, Duration::ZERO).unwrap_err();
    assert_eq!(err.parameter(), "open_for");
    let breaker = CircuitBreaker::try_redis(&conn, "x", 4, LONG).unwrap();
    assert_eq!((breaker.failure_threshold(), breaker.open_for()), (4, LONG));
    assert_eq!(breaker.name(), Some("x"));
    let err = breaker.try_trial_lease(Duration::ZERO).unwrap_err();
    assert_eq!(err.parameter(), "lease");
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        CircuitBreaker::redis(&conn, "x", 0, LONG)
    }));
    let message = *panic.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("failure_threshold"), "{message}");
}
