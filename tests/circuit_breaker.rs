//! `circuit_breaker` and `CircuitBreaker` on a paused clock.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{advance, sleep};
use tokio_test::{assert_pending, assert_ready_eq, task};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn fail(calls: &AtomicU32) -> Result<u32, String> {
    calls.fetch_add(1, Ordering::SeqCst);
    Err(String::from("down"))
}

async fn succeed(calls: &AtomicU32) -> Result<u32, String> {
    Ok(calls.fetch_add(1, Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn opens_after_the_threshold_of_consecutive_failures() {
    let breaker = CircuitBreaker::new(3, ms(1000));
    let calls = AtomicU32::new(0);
    for _ in 0..2 {
        assert!(matches!(
            breaker.call(fail(&calls)).await,
            Err(BreakerError::Failed(_))
        ));
    }
    assert_eq!(breaker.consecutive_failures(), 2);
    // a success while closed resets the count
    assert!(breaker.call(succeed(&calls)).await.is_ok());
    assert_eq!(breaker.consecutive_failures(), 0);
    for _ in 0..2 {
        breaker.call(fail(&calls)).await.unwrap_err();
    }
    assert_eq!(breaker.state(), CircuitState::Closed);
    breaker.call(fail(&calls)).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn rejects_without_calling_while_open() {
    let breaker = CircuitBreaker::new(1, ms(1000));
    let calls = AtomicU32::new(0);
    breaker.call(fail(&calls)).await.unwrap_err();
    for _ in 0..5 {
        assert_eq!(
            breaker.call(succeed(&calls)).await,
            Err(BreakerError::Open(()))
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    advance(ms(999)).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    assert_eq!(
        breaker.call(succeed(&calls)).await,
        Err(BreakerError::Open(()))
    );
    advance(ms(1)).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_one_trial_under_concurrency() {
    let breaker = CircuitBreaker::new(1, ms(100));
    let calls = AtomicU32::new(0);
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(100)).await;

    let trial = breaker.call(async {
        calls.fetch_add(1, Ordering::SeqCst);
        sleep(ms(50)).await;
        Ok::<_, String>("trial")
    });
    let others = async {
        tokio::task::yield_now().await;
        let mut results = Vec::new();
        for _ in 0..5 {
            results.push(breaker.call(succeed(&calls)).await);
        }
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        results
    };
    let (trial, others) = tokio::join!(trial, others);
    assert_eq!(trial, Ok("trial"));
    assert!(others.iter().all(|r| *r == Err(BreakerError::Open(()))));
    assert_eq!(calls.load(Ordering::SeqCst), 2); // the first failure and the trial
    assert_eq!(breaker.state(), CircuitState::Closed);

    // across threads too: many tasks race for the trial, exactly one runs
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(100)).await;
    let ran = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let breaker = breaker.clone();
            let ran = ran.clone();
            tokio::spawn(async move {
                breaker
                    .call(async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        sleep(ms(10)).await;
                        Ok::<_, ()>(())
                    })
                    .await
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            admitted += 1;
        }
    }
    assert_eq!((admitted, ran.load(Ordering::SeqCst)), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn trial_success_closes_and_failure_reopens_for_open_for() {
    let breaker = CircuitBreaker::new(2, ms(100));
    let calls = AtomicU32::new(0);
    for _ in 0..2 {
        breaker.call(fail(&calls)).await.unwrap_err();
    }
    advance(ms(100)).await;
    // the trial fails: open again for another 100 ms
    assert!(matches!(
        breaker.call(fail(&calls)).await,
        Err(BreakerError::Failed(_))
    ));
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(ms(99)).await;
    assert_eq!(
        breaker.call(succeed(&calls)).await,
        Err(BreakerError::Open(()))
    );
    advance(ms(1)).await;
    // the trial succeeds: closed, count reset
    assert!(breaker.call(succeed(&calls)).await.is_ok());
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.consecutive_failures(), 0);
    // closed again: it takes the full threshold to open
    breaker.call(fail(&calls)).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Closed);
    breaker.call(fail(&calls)).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_trial_leaves_the_breaker_half_open() {
    let breaker = CircuitBreaker::new(1, ms(100));
    let calls = AtomicU32::new(0);
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(100)).await;
    let mut trial = task::spawn(breaker.call(async {
        sleep(ms(1000)).await;
        Ok::<_, String>(0)
    }));
    assert_pending!(trial.poll());
    assert_eq!(
        breaker.call(succeed(&calls)).await,
        Err(BreakerError::Open(()))
    );
    drop(trial);
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    assert!(breaker.call(succeed(&calls)).await.is_ok());
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn late_outcomes_of_calls_started_while_closed_are_ignored() {
    let breaker = CircuitBreaker::new(1, ms(100));
    let calls = AtomicU32::new(0);
    let mut slow = task::spawn(breaker.call(async {
        sleep(ms(10)).await;
        Ok::<_, String>(0)
    }));
    assert_pending!(slow.poll());
    breaker.call(fail(&calls)).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(ms(10)).await;
    assert_ready_eq!(slow.poll(), Ok(0));
    assert_eq!(breaker.state(), CircuitState::Open); // the late success did not close it
}

/// A call that started at once and ends with `result` after `after` (paused clock).
fn slow<'a>(
    breaker: &'a CircuitBreaker,
    after: Duration,
    result: Result<u32, &'static str>,
) -> task::Spawn<impl Future<Output = Result<u32, BreakerError<(), &'static str>>> + 'a> {
    let mut call = task::spawn(breaker.call(async move {
        sleep(after).await;
        result
    }));
    assert_pending!(call.poll()); // the permit is taken now
    call
}

/// Opens `breaker` (closed, threshold `n`) with `n` failures, waits `open_for`, and closes it
/// again with a successful trial: a new closed period.
async fn open_and_close_again(breaker: &CircuitBreaker) {
    let calls = AtomicU32::new(0);
    for _ in 0..breaker.failure_threshold() {
        breaker.call(fail(&calls)).await.unwrap_err();
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(breaker.open_for()).await;
    assert!(breaker.call(succeed(&calls)).await.is_ok()); // the trial
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.consecutive_failures(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failure_from_an_earlier_closed_period_does_not_reopen_the_breaker() {
    let breaker = CircuitBreaker::new(1, ms(100));
    let mut stale = slow(&breaker, ms(500), Err("late"));
    open_and_close_again(&breaker).await;

    advance(ms(500)).await;
    assert_ready_eq!(stale.poll(), Err(BreakerError::Failed("late")));
    // The call started before the breaker opened: its failure is not this period's.
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.consecutive_failures(), 0);
    let calls = AtomicU32::new(0);
    assert!(breaker.call(succeed(&calls)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_success_from_an_earlier_closed_period_does_not_reset_the_count() {
    let breaker = CircuitBreaker::new(3, ms(100));
    let mut stale = slow(&breaker, ms(500), Ok(7));
    open_and_close_again(&breaker).await;

    let calls = AtomicU32::new(0);
    for _ in 0..2 {
        breaker.call(fail(&calls)).await.unwrap_err();
    }
    advance(ms(500)).await;
    assert_ready_eq!(stale.poll(), Ok(7));
    assert_eq!(breaker.consecutive_failures(), 2); // not reset by the stale success
    breaker.call(fail(&calls)).await.unwrap_err();
    // `failure_threshold` failures of this period: open.
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn while_half_open_only_the_trials_outcome_counts() {
    let breaker = CircuitBreaker::new(1, ms(100));
    let mut stale_ok = slow(&breaker, ms(300), Ok(1));
    let mut stale_err = slow(&breaker, ms(300), Err("late"));
    let calls = AtomicU32::new(0);
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(100)).await;
    let mut trial = slow(&breaker, ms(400), Err("trial"));
    assert_eq!(breaker.state(), CircuitState::HalfOpen);

    advance(ms(200)).await; // 300 ms: the stale calls end, the trial runs on
    assert_ready_eq!(stale_ok.poll(), Ok(1));
    assert_eq!(breaker.state(), CircuitState::HalfOpen); // not closed by the stale success
    assert_eq!(breaker.consecutive_failures(), 1); // nor its count reset
    assert_ready_eq!(stale_err.poll(), Err(BreakerError::Failed("late")));
    assert_eq!(breaker.state(), CircuitState::HalfOpen); // not opened by the stale failure
    assert_eq!(
        breaker.call(succeed(&calls)).await,
        Err(BreakerError::Open(()))
    );

    advance(ms(200)).await; // 500 ms: the trial fails, open for 100 ms from now
    assert_ready_eq!(trial.poll(), Err(BreakerError::Failed("trial")));
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(ms(99)).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(ms(1)).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn the_stream_ignores_outcomes_from_an_earlier_closed_period() {
    // A failure: the breaker, closed again meanwhile, stays closed.
    let breaker = CircuitBreaker::new(1, ms(100));
    let mut s = task::spawn(stream::iter([1u32]).circuit_breaker(&breaker, |_| async {
        sleep(ms(500)).await;
        Err::<u32, _>("late")
    }));
    assert_pending!(s.poll_next());
    open_and_close_again(&breaker).await;
    advance(ms(500)).await;
    assert_ready_eq!(s.poll_next(), Some(Err(BreakerError::Failed("late"))));
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.consecutive_failures(), 0);

    // A success: the new period's failures still count.
    let breaker = CircuitBreaker::new(2, ms(100));
    let mut s = task::spawn(
        stream::iter([1u32]).circuit_breaker(&breaker, |x| async move {
            sleep(ms(500)).await;
            Ok::<_, &str>(x)
        }),
    );
    assert_pending!(s.poll_next());
    open_and_close_again(&breaker).await;
    let calls = AtomicU32::new(0);
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(500)).await;
    assert_ready_eq!(s.poll_next(), Some(Ok(1)));
    breaker.call(fail(&calls)).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn the_stream_gives_rejected_items_back() {
    let breaker = CircuitBreaker::new(2, ms(100));
    let calls = Arc::new(AtomicU32::new(0));
    let f = {
        let calls = calls.clone();
        move |item: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if item < 10 {
                    Err(format!("bad {item}"))
                } else {
                    Ok(item)
                }
            }
        }
    };
    let out: Vec<_> = stream::iter([1, 2, 30, 40])
        .circuit_breaker(&breaker, f.clone())
        .collect()
        .await;
    assert_eq!(
        out,
        [
            Err(BreakerError::Failed(String::from("bad 1"))),
            Err(BreakerError::Failed(String::from("bad 2"))),
            Err(BreakerError::Open(30)),
            Err(BreakerError::Open(40)),
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // the same breaker, shared: after open_for a stream's first item is the trial
    advance(ms(100)).await;
    let out: Vec<_> = stream::iter([50, 60])
        .circuit_breaker(breaker.clone(), f)
        .collect()
        .await;
    assert_eq!(out, [Ok(50), Ok(60)]);
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_stream_runs_one_call_at_a_time_in_order() {
    let breaker = CircuitBreaker::new(3, ms(100));
    let start = tokio::time::Instant::now();
    let out: Vec<_> = stream::iter([30u64, 10, 20])
        .circuit_breaker(&breaker, |d| async move {
            sleep(ms(d)).await;
            Ok::<_, ()>((d, start.elapsed()))
        })
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(out, [(30, ms(30)), (10, ms(40)), (20, ms(60))]);
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_during_its_trial_leaves_the_breaker_half_open() {
    let breaker = CircuitBreaker::new(1, ms(100));
    let calls = AtomicU32::new(0);
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(100)).await;
    let mut s = task::spawn(stream::iter([1u32]).circuit_breaker(&breaker, |_| async {
        sleep(ms(1000)).await;
        Ok::<_, ()>(())
    }));
    assert_pending!(s.poll_next());
    drop(s);
    assert!(breaker.call(succeed(&calls)).await.is_ok());
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[test]
fn breaker_error_display_and_source() {
    let open: BreakerError<u32, std::io::Error> = BreakerError::Open(3);
    assert_eq!(open.to_string(), "circuit breaker is open");
    assert!(open.is_open());
    let failed: BreakerError<(), std::io::Error> =
        BreakerError::Failed(std::io::Error::other("refused"));
    assert_eq!(failed.to_string(), "refused");
    assert!(failed.into_failed().is_some());
    assert_eq!(CircuitState::HalfOpen.to_string(), "half-open");
}

#[test]
#[should_panic(expected = "`failure_threshold`")]
fn zero_threshold_panics_naming_failure_threshold() {
    let _ = CircuitBreaker::new(0, ms(1));
}

#[test]
#[should_panic(expected = "`open_for`")]
fn zero_open_for_panics_naming_open_for() {
    let _ = CircuitBreaker::new(1, Duration::ZERO);
}

#[test]
fn try_new_returns_the_error() {
    assert_eq!(
        CircuitBreaker::try_new(0, ms(1)).unwrap_err().parameter(),
        "failure_threshold"
    );
    assert_eq!(
        CircuitBreaker::try_new(1, Duration::ZERO)
            .unwrap_err()
            .parameter(),
        "open_for"
    );
    let b = CircuitBreaker::try_new(2, ms(5)).unwrap();
    assert_eq!((b.failure_threshold(), b.open_for()), (2, ms(5)));
}

#[test]
fn handles_are_shared_and_thread_safe() {
    fn shared<T: Clone + Send + Sync + 'static>() {}
    shared::<CircuitBreaker>();
    let breaker = CircuitBreaker::new(1, ms(1));
    let clone: CircuitBreaker = (&breaker).into();
    assert!(format!("{clone:?}").contains("Closed"));
}
