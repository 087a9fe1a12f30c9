//! A `WorkerPool` or `Pipeline` kept in a `static` serves every runtime that polls it: runtimes
//! used one after another (as each `#[tokio::test]` builds its own), a runtime that shuts down
//! with jobs in flight, two runtimes alive at once, and a first poll outside any runtime.
//!
//! These build real runtimes by hand. A pool whose workers died with their runtime shows as a
//! hang; `guard` turns a hang into a failure. It bounds waiting only, never asserts a time.

mod common;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use common::{Gauge, panic_message};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::runtime::{Builder, Runtime};
use tokio::sync::Semaphore;

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn current_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

/// A kind of runtime, by name.
type Kind = (&'static str, fn() -> Runtime);

/// Fails the test instead of hanging forever (inside a runtime with a timer).
async fn guard<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(out) => out,
        Err(_) => panic!("hung: {what}"),
    }
}

/// Waits until `n` workers of `pool` are running jobs.
async fn busy(pool: &WorkerPool, n: usize) {
    guard("the workers to be busy", async {
        while pool.busy() < n {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Doubles `x` on `pool`, in order; every eighth item sleeps on the polling runtime's timer
/// (which only works if the workers live on a running runtime), the others yield.
async fn doubled(pool: &WorkerPool, n: u64) -> Vec<u64> {
    stream::iter(0..n)
        .fan_out_ordered(pool, |x| async move {
            if x % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else {
                tokio::task::yield_now().await;
            }
            x * 2
        })
        .collect()
        .await
}

fn expected(n: u64) -> Vec<u64> {
    (0..n).map(|x| x * 2).collect()
}

#[test]
fn a_static_pool_serves_runtimes_one_after_another() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(2));
    let runtimes: [Kind; 3] = [
        ("multi-thread", multi_thread),
        ("current-thread", current_thread),
        ("multi-thread again", multi_thread),
    ];
    for (name, build) in runtimes {
        let rt = build();
        let out = rt.block_on(guard(name, doubled(&POOL, 1000)));
        assert_eq!(out, expected(1000), "{name}");
        // A second stream on the same runtime finds its workers alive.
        let out = rt.block_on(guard(name, doubled(&POOL, 100)));
        assert_eq!(out, expected(100), "{name}, second stream");
        drop(rt);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Step {
    Add,
    Double,
}

struct Machine;

impl StateMachine for Machine {
    type Stage = Step;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Step {
        Step::Add
    }

    async fn run(&self, stage: Step, n: u64) -> Result<Next<Step, u64>, String> {
        Ok(match stage {
            Step::Add => {
                tokio::task::yield_now().await;
                Next::Stage(Step::Double, n + 1)
            }
            Step::Double => {
                if n % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Next::Done(n * 2)
            }
        })
    }
}

/// One ordered group on `pipeline`: submits `0..n` while reading the results.
async fn group(pipeline: &Pipeline<Machine>, n: u64) -> Vec<u64> {
    let (tx, results) = pipeline.group().ordered().open();
    let submit = async move {
        for x in 0..n {
            tx.submit(x).await.unwrap();
        }
    };
    let (_, out): (_, Vec<_>) = tokio::join!(submit, results.collect());
    out.into_iter().map(Result::unwrap).collect()
}

#[test]
fn a_static_pipeline_serves_runtimes_one_after_another() {
    static PIPELINE: LazyLock<Pipeline<Machine>> =
        LazyLock::new(|| Pipeline::builder(Machine).workers(2).build());
    let want: Vec<u64> = (0..500).map(|x| (x + 1) * 2).collect();
    let runtimes: [Kind; 2] = [
        ("multi-thread", multi_thread),
        ("current-thread", current_thread),
    ];
    for (name, build) in runtimes {
        let rt = build();
        let out = rt.block_on(guard(name, group(&PIPELINE, 500)));
        assert_eq!(out, want, "{name}");
        drop(rt);
    }
    let stats = PIPELINE.stats();
    assert_eq!(stats.stage(Step::Double).map(|s| s.runs), Some(1000));
}

/// Polls a new stream of `pool` once, outside any runtime; returns the panic message.
fn first_poll_outside_a_runtime(pool: &WorkerPool) -> String {
    let payload = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut s = stream::iter(0..3u64).fan_out_ordered(pool, |x| async move { x });
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let _ = futures::Stream::poll_next(std::pin::Pin::new(&mut s), &mut cx);
    }))
    .expect_err("polling outside a runtime panics");
    panic_message(&*payload)
}

/// The message names the crate and the type, and says what to do.
fn assert_says_what_to_do(message: &str) {
    for part in [
        "stagepipe",
        "WorkerPool",
        "outside a tokio runtime",
        "inside one",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[test]
fn a_first_poll_outside_any_runtime_panics_and_leaves_the_static_pool_usable() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(2));
    assert_says_what_to_do(&first_poll_outside_a_runtime(&POOL));
    // Once more: still nothing started, still the same message.
    assert_says_what_to_do(&first_poll_outside_a_runtime(&POOL));

    let rt = current_thread();
    let out = rt.block_on(guard("after a poll outside", doubled(&POOL, 200)));
    assert_eq!(out, expected(200));
    drop(rt);
    let rt = multi_thread();
    let out = rt.block_on(guard("in the next runtime", doubled(&POOL, 200)));
    assert_eq!(out, expected(200));
}

#[test]
fn a_static_pipeline_polled_first_outside_any_runtime_panics_and_stays_usable() {
    static PIPELINE: LazyLock<Pipeline<Machine>> =
        LazyLock::new(|| Pipeline::builder(Machine).workers(2).build());
    let payload = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let results = stream::iter(0..3u64).through(&PIPELINE);
        futures::pin_mut!(results);
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let _ = futures::Stream::poll_next(results, &mut cx);
    }))
    .expect_err("polling outside a runtime panics");
    assert_says_what_to_do(&panic_message(&*payload));

    let rt = multi_thread();
    let out = rt.block_on(guard("after a poll outside", group(&PIPELINE, 100)));
    assert_eq!(out, (0..100).map(|x| (x + 1) * 2).collect::<Vec<_>>());
}

#[test]
fn a_runtime_dropped_with_jobs_in_flight_drops_its_streams_jobs_and_the_next_runtime_is_served() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(2));
    let live = Gauge::default();
    let started = Arc::new(AtomicUsize::new(0));
    let rt = multi_thread();
    let (l, st) = (live.clone(), started.clone());
    // A stream owned by a task of the runtime, its items never finishing.
    rt.spawn(async move {
        stream::iter(0..100u64)
            .fan_out_ordered(&*POOL, move |x| {
                let (l, st) = (l.clone(), st.clone());
                async move {
                    st.fetch_add(1, Ordering::SeqCst);
                    let _running = l.enter();
                    futures::future::pending::<()>().await;
                    x
                }
            })
            .collect::<Vec<_>>()
            .await
    });
    rt.block_on(busy(&POOL, 2));
    drop(rt);
    assert_eq!(live.live(), 0, "the dead stream's futures were dropped");
    assert_eq!(POOL.busy(), 0);

    let rt = current_thread();
    let out = rt.block_on(guard("the next runtime", doubled(&POOL, 1000)));
    assert_eq!(out, expected(1000));
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "the dead stream's items did not run again"
    );
}

/// Items of a stream that outlives its runtime: item 0 is ready at once, the others wait for a
/// permit of `gate` (which needs no runtime). Counts the futures made.
fn gated(
    pool: &WorkerPool,
    n: u64,
    gate: &Arc<Semaphore>,
    made: &Arc<AtomicUsize>,
) -> impl futures::Stream<Item = u64> + Send + Unpin + use<> {
    let (gate, made) = (gate.clone(), made.clone());
    stream::iter(0..n).fan_out_ordered(pool, move |x| {
        made.fetch_add(1, Ordering::SeqCst);
        let gate = gate.clone();
        async move {
            if x > 0 {
                let _permit = gate.acquire().await.unwrap();
                tokio::task::yield_now().await;
            }
            x
        }
    })
}

#[test]
fn a_stream_that_outlives_its_runtime_resumes_its_half_run_jobs_on_the_next() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(2));
    let gate = Arc::new(Semaphore::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    let mut s = gated(&POOL, 200, &gate, &made);

    let rt = multi_thread();
    let first = rt.block_on(async {
        let first = guard("the first item", s.next()).await;
        // Both workers hold a half-run job when the runtime goes.
        busy(&POOL, 2).await;
        first
    });
    assert_eq!(first, Some(0));
    drop(rt);
    assert_eq!(POOL.busy(), 0);

    gate.add_permits(1000);
    let rt = current_thread();
    let rest: Vec<u64> = rt.block_on(guard("the rest on the next runtime", s.collect()));
    assert_eq!(rest, (1..200).collect::<Vec<_>>());
    assert_eq!(made.load(Ordering::SeqCst), 200, "every item made once");
}

#[test]
fn a_stream_whose_workers_died_polled_outside_any_runtime_panics_then_completes_in_one() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(2));
    let gate = Arc::new(Semaphore::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    let mut s = gated(&POOL, 50, &gate, &made);
    let rt = multi_thread();
    assert_eq!(rt.block_on(guard("the first item", s.next())), Some(0));
    drop(rt);

    gate.add_permits(1000);
    // Outside any runtime there is no timer to guard the wait with: wait on another thread.
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            futures::executor::block_on(s.next());
        }));
        let _ = done.send((s, caught));
    });
    let (s, caught) = wait
        .recv_timeout(Duration::from_secs(60))
        .expect("hung: waiting on dead workers outside a runtime");
    let payload = caught.expect_err("waiting on dead workers outside a runtime panics");
    assert_says_what_to_do(&panic_message(&*payload));

    let rt = current_thread();
    let rest: Vec<u64> = rt.block_on(guard("the rest in a runtime", s.collect()));
    assert_eq!(rest, (1..50).collect::<Vec<_>>());
    assert_eq!(made.load(Ordering::SeqCst), 50);
}

#[test]
fn when_the_first_of_two_live_runtimes_goes_the_second_wakes_and_takes_over() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(2));
    let first = multi_thread();
    // The workers start on the first runtime.
    assert_eq!(
        first.block_on(guard("the first runtime", doubled(&POOL, 100))),
        expected(100)
    );

    // A stream of the second runtime runs on them, and waits with jobs in flight.
    let second = multi_thread();
    let gate = Arc::new(Semaphore::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    let s = gated(&POOL, 300, &gate, &made);
    let reader = second.spawn(guard("the second runtime's stream", s.collect::<Vec<_>>()));
    second.block_on(busy(&POOL, 2));
    drop(first);

    // Its consumer was woken when the workers died, and started fresh ones on its runtime.
    gate.add_permits(1000);
    let out = second.block_on(guard("the reader", reader)).unwrap();
    assert_eq!(out, (0..300).collect::<Vec<_>>());
    assert_eq!(made.load(Ordering::SeqCst), 300, "every item made once");
    // The fresh workers use the second runtime's timer.
    assert_eq!(
        second.block_on(guard("after the take-over", doubled(&POOL, 100))),
        expected(100)
    );
}

#[test]
fn two_live_runtimes_share_the_workers_of_the_first() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(2));
    let first = multi_thread();
    // The workers start on the first runtime (a current-thread runtime would run them only
    // while it is driven, inside its `block_on`: see `WorkerPool`).
    assert_eq!(
        first.block_on(guard("the first runtime", doubled(&POOL, 10))),
        expected(10)
    );
    let second = current_thread();
    let a = first.spawn(guard("the first runtime", doubled(&POOL, 500)));
    let b = second.block_on(guard("the second runtime", doubled(&POOL, 500)));
    assert_eq!(b, expected(500));
    assert_eq!(first.block_on(a).unwrap(), expected(500));
}

#[test]
fn a_future_half_run_on_the_timer_of_a_dead_runtime_panics_at_its_place_instead_of_hanging() {
    static POOL: LazyLock<WorkerPool> = LazyLock::new(|| WorkerPool::new(1));
    let first = multi_thread();
    assert_eq!(
        first.block_on(guard("the first runtime", doubled(&POOL, 10))),
        expected(10)
    );

    // The second runtime's item sleeps on the first runtime's timer, where its worker runs.
    let second = multi_thread();
    let reader = second.spawn(guard(
        "the second runtime's stream",
        stream::iter(0..1u64)
            .fan_out_ordered(&*POOL, |x| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                x
            })
            .collect::<Vec<_>>(),
    ));
    second.block_on(busy(&POOL, 1));
    drop(first);

    let joined = second.block_on(guard("the reader", reader));
    let payload = joined
        .expect_err("the item panicked")
        .try_into_panic()
        .expect("a panic, not a cancellation");
    assert!(
        !panic_message(&*payload).starts_with("hung"),
        "the item's panic, not the guard's: {}",
        panic_message(&*payload)
    );
}
