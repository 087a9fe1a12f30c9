//! Staged pipelines and request groups.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Gauge, panic_message};
use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Step {
    Parse,
    Work,
    Store,
}

/// Three stages; request `fail` fails in `Work`, request `panic` panics there; each request
/// sleeps `delay(id)` in `Work`; with `route_back`, `Store` routes back to `Parse`.
#[derive(Clone, Default)]
struct Machine {
    fail: Option<u64>,
    panic: Option<u64>,
    delay_ms: Option<fn(u64) -> u64>,
    live: Option<Gauge>,
    route_back: bool,
}

impl StateMachine for Machine {
    type Stage = Step;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Step {
        Step::Parse
    }

    async fn run(&self, stage: Step, id: u64) -> Result<Next<Step, u64>, String> {
        match stage {
            Step::Parse => Ok(Next::Stage(Step::Work, id)),
            Step::Work => {
                let _guard = self.live.as_ref().map(Gauge::enter);
                if let Some(delay) = self.delay_ms {
                    sleep(Duration::from_millis(delay(id))).await;
                }
                if self.fail == Some(id) {
                    return Err(format!("request {id} failed"));
                }
                if self.panic == Some(id) {
                    panic!("request {id} panicked");
                }
                Ok(Next::Stage(Step::Store, id))
            }
            Step::Store if self.route_back => Ok(Next::Stage(Step::Parse, id)),
            Step::Store => Ok(Next::Done(id)),
        }
    }
}

/// Submits `ids` to a group and collects its results concurrently.
async fn run_group(
    builder: stagepipe::GroupBuilder<Machine>,
    ids: impl IntoIterator<Item = u64>,
) -> (Vec<Result<u64, StageError<Machine>>>, Vec<u64>) {
    let (tx, results) = builder.open();
    let submit = async move {
        let mut refused = Vec::new();
        for id in ids {
            if let Err(GroupClosed(back)) = tx.submit(id).await {
                refused.push(back);
            }
        }
        refused
    };
    let (refused, results) = tokio::join!(submit, results.collect::<Vec<_>>());
    (results, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carry_on_yields_every_result_and_the_error() {
    let pipeline = Pipeline::builder(Machine {
        fail: Some(500),
        ..Machine::default()
    })
    .workers(4)
    .build();
    let (results, refused) = run_group(pipeline.group(), 0..1000).await;
    assert!(refused.is_empty());
    assert_eq!(results.len(), 1000);
    let mut ok: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    ok.sort_unstable();
    assert_eq!(ok, (0..1000).filter(|&i| i != 500).collect::<Vec<_>>());
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(ToString::to_string)
        .collect();
    assert_eq!(errors, ["stage Work failed: request 500 failed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_error_ends_with_the_error_and_refuses_later_submits() {
    let pipeline = Pipeline::builder(Machine {
        fail: Some(500),
        ..Machine::default()
    })
    .workers(4)
    .build();
    let (results, refused) = run_group(
        pipeline.group().ordered().cancel_on_error().window(16),
        0..1000,
    )
    .await;
    let (last, before) = results.split_last().unwrap();
    assert!(
        matches!(last, Err(StageError::Failed { stage: Step::Work, error, .. }) if error == "request 500 failed")
    );
    let before: Vec<u64> = before.iter().map(|r| *r.as_ref().unwrap()).collect();
    assert_eq!(
        before,
        (0..500).collect::<Vec<_>>(),
        "every earlier result, in order"
    );
    assert!(!refused.is_empty(), "later submits are refused");
    // Refused data comes back, and it is exactly the tail that was never accepted.
    let first_refused = refused[0];
    assert_eq!(refused, (first_refused..1000).collect::<Vec<_>>());
    assert!(first_refused > 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_mode_reports_a_cycle_with_its_path() {
    let machine = Machine {
        route_back: true,
        ..Machine::default()
    };
    let pipeline = Pipeline::builder(machine).workers(2).dag().build();
    let results: Vec<_> = stream::iter(0..3u64).through(&pipeline).collect().await;
    assert_eq!(results.len(), 3);
    for r in results {
        match r {
            Err(StageError::Cycle { path }) => {
                assert_eq!(path, [Step::Parse, Step::Work, Step::Store, Step::Parse])
            }
            other => panic!("expected a cycle, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_requests_come_back_in_order() {
    let pipeline = Pipeline::builder(Machine::default()).workers(10).build();
    let (tx, results) = pipeline.group().ordered().open();
    let feeder = tokio::spawn(async move {
        for id in 0..1_000_000u64 {
            tx.submit(id).await.unwrap();
        }
    });
    let mut next = 0u64;
    let mut results = Box::pin(results);
    while let Some(r) = results.next().await {
        assert_eq!(r.unwrap(), next);
        next += 1;
    }
    feeder.await.unwrap();
    assert_eq!(next, 1_000_000);
    let stats = pipeline.stats();
    for step in [Step::Parse, Step::Work, Step::Store] {
        assert_eq!(stats.stage(step).unwrap().runs, 1_000_000, "{step:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_match_the_counts() {
    let pipeline = Pipeline::builder(Machine {
        fail: Some(7),
        ..Machine::default()
    })
    .workers(3)
    .build();
    let results: Vec<_> = stream::iter(0..100u64).through(&pipeline).collect().await;
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    let stats = pipeline.stats();
    let parse = stats.stage(Step::Parse).unwrap();
    let work = stats.stage(Step::Work).unwrap();
    let store = stats.stage(Step::Store).unwrap();
    assert_eq!((parse.runs, parse.errors), (100, 0));
    assert_eq!((work.runs, work.errors), (100, 1));
    assert_eq!((store.runs, store.errors), (99, 0));
    assert!(work.max >= work.mean);
    assert_eq!((stats.requests_done, stats.requests_failed), (100, 1));
    assert_eq!((stats.groups_opened, stats.groups_open), (1, 0));
    let table = stats.to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("stage"), "{table}");
    assert!(
        lines[1].starts_with("Parse") && lines[1].contains(" 100 "),
        "{table}"
    );
    assert!(
        lines[2].starts_with("Work ") && lines[2].contains(" 1 "),
        "{table}"
    );
    assert!(
        lines[3].starts_with("Store") && lines[3].contains(" 99 "),
        "{table}"
    );
}

#[test]
fn zero_workers_are_refused_naming_the_parameter() {
    let panic =
        std::panic::catch_unwind(|| Pipeline::builder(Machine::default()).workers(0)).unwrap_err();
    assert!(panic_message(&*panic).contains("workers"));
    let err = Pipeline::try_new(Machine::default(), 0).unwrap_err();
    assert_eq!(err.parameter(), "workers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_many_groups_without_deadlock() {
    let pipeline = Pipeline::builder(Machine::default()).workers(1).build();
    let tasks: Vec<_> = (0..50u64)
        .map(|g| {
            let pipeline = pipeline.clone();
            tokio::spawn(async move {
                let (results, _) =
                    run_group(pipeline.group().ordered().window(4), g * 100..(g + 1) * 100).await;
                results.into_iter().map(Result::unwrap).collect::<Vec<_>>()
            })
        })
        .collect();
    for (g, task) in tasks.into_iter().enumerate() {
        let g = g as u64;
        // Each group gets exactly its own results, in order.
        assert_eq!(
            task.await.unwrap(),
            (g * 100..(g + 1) * 100).collect::<Vec<_>>()
        );
    }
    assert_eq!(pipeline.stats().groups_open, 0);
}

#[tokio::test(start_paused = true)]
async fn an_unread_group_does_not_block_another() {
    let pipeline = Pipeline::builder(Machine::default()).workers(2).build();
    let (stuck_tx, stuck_results) = pipeline.group().window(4).open();
    // Fill the unread group until its submit would wait.
    let mut accepted = 0;
    loop {
        let submit = stuck_tx.submit(accepted);
        match tokio::time::timeout(Duration::from_secs(1), submit).await {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(_)) => panic!("group closed"),
            Err(_) => break, // backpressure: the window and the submit buffer are full
        }
    }
    assert!(
        accepted <= 8,
        "the unread group holds at most its window: {accepted}"
    );
    // Start the unread group's results (so its window is in the pool) and never read again.
    let mut stuck_results = Box::pin(stuck_results);
    let first = stuck_results.next().await;
    assert!(matches!(first, Some(Ok(_))));

    let (results, _) = run_group(pipeline.group().ordered(), 1000..1100).await;
    let values: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(values, (1000..1100).collect::<Vec<_>>());
    drop(stuck_results);
    assert!(
        stuck_tx.submit(1).await.is_err(),
        "dropped results close the group"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_submit_leaves_no_hole_in_an_ordered_group() {
    let pipeline = Pipeline::builder(Machine::default()).workers(2).build();
    let (tx, results) = pipeline.group().ordered().window(2).open();
    let mut results = Box::pin(results);
    tx.submit(0).await.unwrap();
    tx.submit(1).await.unwrap();
    // The submit buffer is full and nobody reads: this submit waits, and is cancelled.
    let cancelled = tokio::time::timeout(Duration::from_millis(10), tx.submit(99)).await;
    assert!(cancelled.is_err(), "the submit was waiting");
    let feeder = async {
        for id in 2..10 {
            tx.submit(id).await.unwrap();
        }
        drop(tx);
    };
    let (_, out) = tokio::join!(feeder, results.by_ref().collect::<Vec<_>>());
    let out: Vec<u64> = out.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        out,
        (0..10).collect::<Vec<_>>(),
        "99 was never submitted; nothing stalls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_stays_in_its_request() {
    let pipeline = Pipeline::builder(Machine {
        panic: Some(3),
        ..Machine::default()
    })
    .workers(2)
    .build();
    let results: Vec<_> = stream::iter(0..10u64).through(&pipeline).collect().await;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(v) => assert_eq!(*v, i as u64),
            Err(StageError::Panicked { stage, message }) => {
                assert_eq!(i, 3);
                assert_eq!(*stage, Step::Work);
                assert_eq!(message, "request 3 panicked");
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // The pipeline keeps serving.
    let again: Vec<_> = stream::iter(10..20u64).through(&pipeline).collect().await;
    assert!(again.iter().all(Result::is_ok));
}

#[tokio::test(start_paused = true)]
async fn dropping_results_cancels_pending_requests() {
    let live = Gauge::default();
    let pipeline = Pipeline::builder(Machine {
        delay_ms: Some(|_| 3_600_000),
        live: Some(live.clone()),
        ..Machine::default()
    })
    .workers(3)
    .build();
    let (tx, results) = pipeline.group().window(8).open();
    for id in 0..8 {
        tx.submit(id).await.unwrap();
    }
    let mut results = Box::pin(results);
    assert!(futures::poll!(results.next()).is_pending());
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(live.live(), 3, "three workers run three requests");
    drop(results);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(live.live(), 0, "running requests are dropped");
    assert!(tx.submit(9).await.is_err());
    assert_eq!(pipeline.stats().groups_open, 0);
}

/// Requests with equal keys run one at a time in submission order; different keys overlap.
#[tokio::test(start_paused = true)]
async fn keyed_groups_serialise_each_key() {
    /// (key, seq, started, finished) of every run.
    type Log = Arc<Mutex<Vec<(u32, u32, Instant, Instant)>>>;
    #[derive(Clone)]
    struct Logger {
        log: Log,
        running: Arc<AtomicUsize>,
        max_running: Arc<AtomicUsize>,
    }
    impl StateMachine for Logger {
        type Stage = ();
        type Data = (u32, u32);
        type Error = ();
        fn start(&self) {}
        async fn run(&self, _: (), (key, seq): (u32, u32)) -> Result<Next<(), (u32, u32)>, ()> {
            let start = Instant::now();
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            sleep(Duration::from_millis(u64::from(
                10 + (seq * 7 + key * 3) % 20,
            )))
            .await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.log
                .lock()
                .unwrap()
                .push((key, seq, start, Instant::now()));
            Ok(Next::Done((key, seq)))
        }
    }
    let logger = Logger {
        log: Arc::default(),
        running: Arc::default(),
        max_running: Arc::default(),
    };
    let pipeline = Pipeline::builder(logger.clone()).workers(8).build();
    let (tx, results) = pipeline.group().keyed(|&(key, _)| key).open();
    let requests: Vec<(u32, u32)> = (0..60).map(|i| (i % 4, i)).collect();
    let submit = async move {
        for r in requests {
            tx.submit(r).await.unwrap();
        }
    };
    let (_, results) = tokio::join!(submit, results.collect::<Vec<_>>());
    assert_eq!(results.len(), 60);
    let log = logger.log.lock().unwrap().clone();
    for key in 0..4 {
        let runs: Vec<_> = log.iter().filter(|r| r.0 == key).collect();
        let seqs: Vec<u32> = runs.iter().map(|r| r.1).collect();
        assert_eq!(
            seqs,
            (0..60).filter(|i| i % 4 == key).collect::<Vec<_>>(),
            "key {key} in submission order"
        );
        assert!(
            runs.windows(2).all(|w| w[0].3 <= w[1].2),
            "key {key}: one at a time"
        );
    }
    assert_eq!(
        logger.max_running.load(Ordering::SeqCst),
        4,
        "different keys run in parallel"
    );
}

// -- panics before a stage's future exists --

/// A machine whose `run` is a plain `fn`: it checks its input synchronously (an `assert!`)
/// before making the stage's future. Stages: `Parse` → `Work` (doubles) → `Store` → done.
/// Request `reject.1` panics in stage `reject.0` before the stage's future exists; request
/// `fail` fails in `Work`. `start` panics on its `start_panics_on`-th call (counting from 0).
#[derive(Clone, Default)]
struct Eager {
    reject: Option<(Step, u64)>,
    fail: Option<u64>,
    start_panics_on: Option<usize>,
    starts: Arc<AtomicUsize>,
}

impl StateMachine for Eager {
    type Stage = Step;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Step {
        let call = self.starts.fetch_add(1, Ordering::SeqCst);
        if self.start_panics_on == Some(call) {
            panic!("start refused call {call}");
        }
        Step::Parse
    }

    fn run(
        &self,
        stage: Step,
        n: u64,
    ) -> impl Future<Output = Result<Next<Step, u64>, String>> + Send {
        if let Some((at, id)) = self.reject {
            assert!(stage != at || n != id, "{stage:?} rejects {n}");
        }
        let fail = self.fail == Some(n);
        async move {
            match stage {
                Step::Parse => Ok(Next::Stage(Step::Work, n)),
                Step::Work if fail => Err(format!("request {n} failed")),
                Step::Work => Ok(Next::Stage(Step::Store, n * 2)),
                Step::Store => Ok(Next::Done(n)),
            }
        }
    }
}

/// A generous bound that only guards against a hang; no test measures time with it.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Runs `ids` through a group of `builder` with its results read by a spawned task, which must
/// not die; returns the results in the order they came and the refused submissions.
async fn run_group_in_task<M: StateMachine>(
    builder: stagepipe::GroupBuilder<M>,
    ids: Vec<M::Data>,
) -> (Vec<Result<M::Data, StageError<M>>>, Vec<M::Data>) {
    let (tx, results) = builder.open();
    let consumer = tokio::spawn(results.collect::<Vec<_>>());
    let mut refused = Vec::new();
    for id in ids {
        if let Err(GroupClosed(back)) = tx.submit(id).await {
            refused.push(back);
        }
    }
    drop(tx);
    let results = tokio::time::timeout(HANG_GUARD, consumer)
        .await
        .expect("the group's results end")
        .expect("the consumer task survives the panic");
    (results, refused)
}

/// The pipeline still serves a new group, and its pool still runs other streams.
async fn assert_still_serves(pipeline: &Pipeline<Eager>) {
    let (results, refused) =
        run_group_in_task(pipeline.group().ordered(), (100..150).collect()).await;
    assert!(refused.is_empty());
    let values: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(values, (200..300).step_by(2).collect::<Vec<_>>());
    let mapped: Vec<u64> = tokio::time::timeout(
        HANG_GUARD,
        stream::iter(0..100u64)
            .fan_out_ordered(pipeline.pool(), |x| async move { x + 1 })
            .collect(),
    )
    .await
    .expect("the pool still runs jobs");
    assert_eq!(mapped, (1..101).collect::<Vec<_>>());
}

fn is_rejection(r: &Result<u64, StageError<Eager>>, stage: Step, id: u64) -> bool {
    matches!(r, Err(StageError::Panicked { stage: s, message })
        if *s == stage && *message == format!("{stage:?} rejects {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_panic_in_run_stays_in_its_request_ordered() {
    let pipeline = Pipeline::builder(Eager {
        reject: Some((Step::Work, 7)),
        ..Eager::default()
    })
    .workers(2)
    .build();
    let (results, refused) =
        run_group_in_task(pipeline.group().ordered().window(4), (0..20).collect()).await;
    assert!(refused.is_empty());
    assert_eq!(results.len(), 20);
    for (id, r) in (0..20u64).zip(&results) {
        if id == 7 {
            assert!(is_rejection(r, Step::Work, 7), "{r:?}");
        } else {
            assert_eq!(r.as_ref().ok(), Some(&(id * 2)), "request {id}");
        }
    }
    let stats = pipeline.stats();
    let work = stats.stage(Step::Work).unwrap();
    assert_eq!((work.runs, work.errors), (20, 1));
    assert_eq!(stats.stage(Step::Store).unwrap().runs, 19);
    assert_eq!((stats.requests_done, stats.requests_failed), (20, 1));
    assert_still_serves(&pipeline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_panic_in_run_stays_in_its_request_unordered() {
    let pipeline = Pipeline::builder(Eager {
        reject: Some((Step::Parse, 3)),
        ..Eager::default()
    })
    .workers(2)
    .build();
    let (results, refused) = run_group_in_task(pipeline.group(), (0..20).collect()).await;
    assert!(refused.is_empty());
    assert_eq!(results.len(), 20);
    let rejected: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert_eq!(rejected.len(), 1);
    assert!(is_rejection(rejected[0], Step::Parse, 3), "{rejected:?}");
    let mut values: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (0..20)
            .filter(|&id| id != 3)
            .map(|id| id * 2)
            .collect::<Vec<_>>()
    );
    let parse = pipeline.stats().stage(Step::Parse).unwrap();
    assert_eq!((parse.runs, parse.errors), (20, 1));
    assert_still_serves(&pipeline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_panic_in_run_stays_in_its_request_through() {
    // `Store` sees the doubled value: request 11 reaches it with 22.
    let pipeline = Pipeline::builder(Eager {
        reject: Some((Step::Store, 22)),
        ..Eager::default()
    })
    .workers(2)
    .build();
    let consumer = tokio::spawn(
        stream::iter(0..20u64)
            .through(&pipeline)
            .collect::<Vec<_>>(),
    );
    let results = tokio::time::timeout(HANG_GUARD, consumer)
        .await
        .expect("the stream ends")
        .expect("the consumer task survives the panic");
    assert_eq!(results.len(), 20);
    for (id, r) in (0..20u64).zip(&results) {
        if id == 11 {
            assert!(is_rejection(r, Step::Store, 22), "{r:?}");
        } else {
            assert_eq!(r.as_ref().ok(), Some(&(id * 2)), "request {id}");
        }
    }
    let store = pipeline.stats().stage(Step::Store).unwrap();
    assert_eq!((store.runs, store.errors), (20, 1));
    assert_still_serves(&pipeline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_panic_in_run_ends_a_cancel_on_error_group() {
    let pipeline = Pipeline::builder(Eager {
        reject: Some((Step::Work, 9)),
        ..Eager::default()
    })
    .workers(2)
    .build();
    let (results, refused) = run_group_in_task(
        pipeline.group().ordered().cancel_on_error().window(4),
        (0..200).collect(),
    )
    .await;
    let (last, before) = results.split_last().unwrap();
    assert!(is_rejection(last, Step::Work, 9), "{last:?}");
    let before: Vec<u64> = before.iter().map(|r| *r.as_ref().unwrap()).collect();
    assert_eq!(
        before,
        (0..9).map(|id| id * 2).collect::<Vec<_>>(),
        "every earlier result, in order, then the panic ends the group"
    );
    assert!(!refused.is_empty(), "later submits are refused");
    let first_refused = refused[0];
    assert!(first_refused > 9);
    assert_eq!(refused, (first_refused..200).collect::<Vec<_>>());
    assert_still_serves(&pipeline).await;
}

/// `start` panics once; with one worker requests start in submission order, so the panic
/// belongs to request 5 (the sixth call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_start_stays_in_its_request() {
    let pipeline = Pipeline::builder(Eager {
        start_panics_on: Some(5),
        ..Eager::default()
    })
    .workers(1)
    .build();
    let (results, refused) = run_group_in_task(pipeline.group().ordered(), (0..20).collect()).await;
    assert!(refused.is_empty());
    assert_eq!(results.len(), 20);
    for (id, r) in (0..20u64).zip(&results) {
        if id == 5 {
            let e = r.as_ref().unwrap_err();
            assert!(
                matches!(e, StageError::StartPanicked { message } if message == "start refused call 5"),
                "{e:?}"
            );
            assert_eq!(e.stage(), None, "no stage ran");
            assert_eq!(e.to_string(), "start panicked: start refused call 5");
        } else {
            assert_eq!(r.as_ref().ok(), Some(&(id * 2)), "request {id}");
        }
    }
    let stats = pipeline.stats();
    // The request never reached a stage: no stage counts it.
    assert_eq!(stats.stage(Step::Parse).unwrap().runs, 19);
    assert_eq!(stats.stage(Step::Parse).unwrap().errors, 0);
    assert_eq!((stats.requests_done, stats.requests_failed), (20, 1));
    assert_still_serves(&pipeline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_start_ends_a_cancel_on_error_group() {
    let pipeline = Pipeline::builder(Eager {
        start_panics_on: Some(0),
        ..Eager::default()
    })
    .workers(1)
    .build();
    let (results, refused) = run_group_in_task(
        pipeline.group().cancel_on_error().window(2),
        (0..100).collect(),
    )
    .await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(
        matches!(&results[0], Err(StageError::StartPanicked { message }) if message == "start refused call 0"),
        "{results:?}"
    );
    assert!(!refused.is_empty(), "later submits are refused");
    assert_still_serves(&pipeline).await;
}

// -- stage figures of requests cancelled later --

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Phase {
    Quick,
    Slow,
}

/// `Quick` is instant; `Slow` sleeps `id + 1` hours, then finishes (or fails, for request
/// `fail`). Counts the runs of each stage that finished, and the `Slow` runs that began.
#[derive(Clone, Default)]
struct TwoPhase {
    fail: Option<u64>,
    quick_done: Arc<AtomicUsize>,
    slow_begun: Arc<AtomicUsize>,
    slow_done: Arc<AtomicUsize>,
}

impl StateMachine for TwoPhase {
    type Stage = Phase;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Phase {
        Phase::Quick
    }

    async fn run(&self, stage: Phase, id: u64) -> Result<Next<Phase, u64>, String> {
        match stage {
            Phase::Quick => {
                self.quick_done.fetch_add(1, Ordering::SeqCst);
                Ok(Next::Stage(Phase::Slow, id))
            }
            Phase::Slow => {
                self.slow_begun.fetch_add(1, Ordering::SeqCst);
                sleep(Duration::from_secs(3600 * (id + 1))).await;
                self.slow_done.fetch_add(1, Ordering::SeqCst);
                if self.fail == Some(id) {
                    return Err(format!("request {id} failed"));
                }
                Ok(Next::Done(id))
            }
        }
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Four requests on four workers: all run `Quick` at once, then `Slow` for 1, 2, 3 and 4 hours.
/// The group is dropped after two results: requests 2 and 3 have finished `Quick` and are
/// cancelled mid-way through `Slow`. Every finished run counts; the cancelled ones do not.
#[tokio::test(start_paused = true)]
async fn stage_runs_of_a_dropped_group_still_count() {
    let machine = TwoPhase::default();
    let pipeline = Pipeline::builder(machine.clone()).workers(4).build();
    let (tx, results) = pipeline.group().window(8).open();
    for id in 0..4 {
        tx.submit(id).await.unwrap();
    }
    let start = Instant::now();
    let mut results = Box::pin(results);
    let mut out = Vec::new();
    while out.len() < 2 {
        out.push(results.next().await.unwrap().unwrap());
    }
    assert_eq!(out, [0, 1]);
    assert_eq!(start.elapsed(), 2 * HOUR);
    assert_eq!(
        machine.quick_done.load(Ordering::SeqCst),
        4,
        "all ran Quick"
    );
    assert_eq!(machine.slow_begun.load(Ordering::SeqCst), 4);
    drop(results);

    let stats = pipeline.stats();
    let quick = stats.stage(Phase::Quick).unwrap();
    assert_eq!((quick.runs, quick.errors), (4, 0), "{stats}");
    assert_eq!(quick.total, Duration::ZERO);
    let slow = stats.stage(Phase::Slow).unwrap();
    assert_eq!(machine.slow_done.load(Ordering::SeqCst), 2);
    assert_eq!(
        (slow.runs, slow.errors),
        (2, 0),
        "only finished runs: {stats}"
    );
    assert_eq!(
        (slow.total, slow.max, slow.mean),
        (3 * HOUR, 2 * HOUR, 3 * HOUR / 2)
    );
    assert_eq!((stats.requests_done, stats.requests_failed), (2, 0));
    assert_eq!(stats.groups_open, 0);

    // Nothing of the cancelled runs is recorded later either.
    sleep(10 * HOUR).await;
    assert_eq!(pipeline.stats(), stats);
    assert!(tx.submit(9).await.is_err());
}

/// As above, but the group cancels itself: request 1 fails at the end of `Slow` (2 h), which
/// abandons requests 2 and 3 in the middle of theirs.
#[tokio::test(start_paused = true)]
async fn stage_runs_of_requests_abandoned_by_cancel_on_error_still_count() {
    let machine = TwoPhase {
        fail: Some(1),
        ..TwoPhase::default()
    };
    let pipeline = Pipeline::builder(machine.clone()).workers(4).build();
    let (tx, results) = pipeline.group().cancel_on_error().window(8).open();
    for id in 0..4 {
        tx.submit(id).await.unwrap();
    }
    drop(tx);
    let results: Vec<_> = results.collect().await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0].as_ref().ok(), Some(&0));
    assert!(
        matches!(&results[1], Err(StageError::Failed { stage: Phase::Slow, error }) if error == "request 1 failed"),
        "{results:?}"
    );
    assert_eq!(machine.quick_done.load(Ordering::SeqCst), 4);
    assert_eq!(machine.slow_done.load(Ordering::SeqCst), 2);

    let stats = pipeline.stats();
    let quick = stats.stage(Phase::Quick).unwrap();
    assert_eq!((quick.runs, quick.errors), (4, 0), "{stats}");
    let slow = stats.stage(Phase::Slow).unwrap();
    assert_eq!(
        (slow.runs, slow.errors),
        (2, 1),
        "only finished runs: {stats}"
    );
    assert_eq!((slow.total, slow.max), (3 * HOUR, 2 * HOUR));
    assert_eq!((stats.requests_done, stats.requests_failed), (2, 1));
    assert_eq!(stats.groups_open, 0);
}

/// A chain of 40 stages (more than the stage table keeps without a lock): every stage's
/// figures are kept, in the order the stages first ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_stages_keep_their_figures_in_order() {
    struct Chain;
    impl StateMachine for Chain {
        type Stage = u8;
        type Data = u64;
        type Error = ();
        fn start(&self) -> u8 {
            0
        }
        async fn run(&self, stage: u8, n: u64) -> Result<Next<u8, u64>, ()> {
            Ok(if stage == 39 {
                Next::Done(n)
            } else {
                Next::Stage(stage + 1, n + 1)
            })
        }
    }
    let pipeline = Pipeline::builder(Chain).workers(2).build();
    let results: Vec<_> = tokio::time::timeout(
        HANG_GUARD,
        stream::iter(0..500u64).through(&pipeline).collect(),
    )
    .await
    .expect("the stream ends");
    let values: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(values, (39..539).collect::<Vec<_>>());
    let stats = pipeline.stats();
    let stages: Vec<u8> = stats.stages.iter().map(|(s, _)| *s).collect();
    assert_eq!(stages, (0..40).collect::<Vec<_>>());
    for (stage, st) in &stats.stages {
        assert_eq!((st.runs, st.errors), (500, 0), "stage {stage}");
    }
    assert_eq!(stats.to_string().lines().count(), 42, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitter_clones_feed_one_group_which_ends_when_every_clone_is_gone() {
    let pipeline = Pipeline::builder(Machine::default()).workers(2).build();
    let (tx, mut results) = pipeline.group().ordered().open();
    let mut other = tx.clone();
    tx.submit(1).await.unwrap();
    other.submit(2).await.unwrap();
    drop(tx);
    // One clone is still open: the stream yields both results, then waits for more.
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            results
                .next()
                .await
                .expect("a result")
                .expect("no stage fails"),
        );
    }
    assert_eq!(got, [1, 2]);
    assert!(futures::poll!(results.next()).is_pending());
    other.submit(3).await.unwrap();
    other.close();
    assert!(other.submit(4).await.is_err(), "a closed clone refuses");
    let rest: Vec<u64> = results.map(|r| r.expect("no stage fails")).collect().await;
    assert_eq!(
        rest,
        [3],
        "the stream ends once every clone is closed or dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn drain_refuses_new_work_ends_open_groups_and_waits_for_them() {
    let machine = Machine {
        delay_ms: Some(|_| 10),
        ..Machine::default()
    };
    let pipeline = Pipeline::builder(machine).workers(2).build();
    let (tx, results) = pipeline.group().ordered().open();
    let (idle_tx, idle_results) = pipeline.group().open(); // open, never used
    for id in 1..=3 {
        tx.submit(id).await.unwrap();
    }
    let reader = tokio::spawn(
        results
            .map(|r| r.expect("no stage fails"))
            .collect::<Vec<u64>>(),
    );
    let idle_reader = tokio::spawn(idle_results.collect::<Vec<_>>());
    let start = tokio::time::Instant::now();
    pipeline.drain().await;
    // The submitted requests finished (two workers, 10 ms each) and both groups ended, though
    // neither submitter was dropped.
    assert_eq!(start.elapsed(), Duration::from_millis(20));
    assert_eq!(reader.await.unwrap(), [1, 2, 3]);
    assert!(idle_reader.await.unwrap().is_empty());
    assert!(matches!(tx.submit(4).await, Err(GroupClosed(4))));
    assert!(matches!(idle_tx.submit(5).await, Err(GroupClosed(5))));
    // A group opened after the drain is closed at once.
    let (late_tx, late_results) = pipeline.group().open();
    assert!(matches!(late_tx.submit(6).await, Err(GroupClosed(6))));
    assert!(late_results.collect::<Vec<_>>().await.is_empty());
    let stats = pipeline.stats();
    assert_eq!((stats.groups_opened, stats.groups_open), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_group_until_its_results_are_read() {
    let pipeline = Pipeline::builder(Machine::default()).workers(1).build();
    let (tx, mut results) = pipeline.group().open();
    tx.submit(1).await.unwrap();
    let mut drain = tokio_test::task::spawn(pipeline.drain());
    tokio_test::assert_pending!(drain.poll());
    assert_eq!(results.next().await.map(|r| r.unwrap()), Some(1));
    assert!(
        results.next().await.is_none(),
        "the drain ended the group's input"
    );
    assert!(drain.is_woken());
    tokio_test::assert_ready!(drain.poll());
}

/// An error with a cause: `Display` shows its own message, `source()` the cause.
#[derive(Debug)]
struct Outer(std::io::Error);

impl std::fmt::Display for Outer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream refused")
    }
}

impl std::error::Error for Outer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

struct Chained;

impl StateMachine for Chained {
    type Stage = Step;
    type Data = u64;
    type Error = Outer;

    fn start(&self) -> Step {
        Step::Work
    }

    async fn run(&self, _: Step, _: u64) -> Result<Next<Step, u64>, Outer> {
        Err(Outer(std::io::Error::other("connection reset")))
    }
}

/// Prints an error chain the way anyhow's `{:#}` does: each message once, joined by ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_error_chain_shows_each_message_once() {
    let pipeline = Pipeline::builder(Chained).workers(2).build();
    let (tx, results) = pipeline.group().open();
    tx.submit(1).await.unwrap();
    drop(tx);
    let results: Vec<_> = results.collect().await;
    let [Err(error)] = &results[..] else {
        panic!("expected one error, got {}", results.len())
    };
    assert!(matches!(
        error,
        StageError::Failed {
            stage: Step::Work,
            ..
        }
    ));
    assert_eq!(
        chain(error),
        "stage Work failed: upstream refused: connection reset"
    );
}

/// The graph counts every route taken: into the first stage once per request, out of each stage
/// once per run (to the next stage, done, or failed), so each stage's routes out add up to its
/// runs and the routes into `done` and `failed` to the requests that ended there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_counts_every_route_taken() {
    use stagepipe::GraphNode as N;
    let pipeline = Pipeline::builder(Machine {
        fail: Some(3),
        panic: Some(5),
        ..Machine::default()
    })
    .workers(2)
    .build();
    let results: Vec<_> = stream::iter(0..10).through(&pipeline).collect().await;
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 2);

    let graph = pipeline.graph();
    let stats = pipeline.stats();
    assert_eq!(graph.requests(N::Start, N::Stage(Step::Parse)), 10);
    assert_eq!(
        graph.requests(N::Stage(Step::Parse), N::Stage(Step::Work)),
        10
    );
    assert_eq!(
        graph.requests(N::Stage(Step::Work), N::Stage(Step::Store)),
        8
    );
    assert_eq!(graph.requests(N::Stage(Step::Work), N::Failed), 2);
    assert_eq!(graph.requests(N::Stage(Step::Store), N::Done), 8);
    for (stage, st) in &graph.stages {
        let out: u64 = graph
            .edges
            .iter()
            .filter(|e| e.from == N::Stage(*stage))
            .map(|e| e.requests)
            .sum();
        assert_eq!(out, st.runs, "{stage:?}");
        assert_eq!(Some(*st), stats.stage(*stage));
    }
    let mermaid = graph.mermaid();
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(mermaid.contains(" -->|8| done"), "{mermaid}");
    assert!(graph.dot().contains(" -> failed [label=\"2\"];"));
}

/// A machine that routes back: each pass around the loop counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_counts_each_pass_of_a_loop_and_dag_cycles() {
    use stagepipe::GraphNode as N;
    let machine = Machine {
        route_back: true,
        ..Machine::default()
    };
    let pipeline = Pipeline::builder(machine).workers(2).dag().build();
    let results: Vec<_> = stream::iter(0..4).through(&pipeline).collect().await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(StageError::Cycle { .. })))
    );
    let graph = pipeline.graph();
    // Each request went Parse → Work → Store → Parse, where the DAG check stopped it.
    assert_eq!(
        graph.requests(N::Stage(Step::Store), N::Stage(Step::Parse)),
        4
    );
    assert_eq!(
        graph.requests(N::Stage(Step::Parse), N::Stage(Step::Work)),
        4
    );
    assert_eq!(graph.requests(N::Start, N::Stage(Step::Parse)), 4);
}
