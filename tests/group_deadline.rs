//! A request group's deadline (`GroupBuilder::deadline`, `deadline_at`) and a drain bounded in
//! time (`Pipeline::drain_timeout`): the group is cancelled and its stream's last item counts
//! the requests it abandoned. All on tokio's paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};
use tokio_test::{assert_pending, assert_ready, task};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Sleep;

/// Each request sleeps its own number of seconds, then is done with it; counts the runs that
/// started and those that finished.
#[derive(Default)]
struct Sleepy {
    started: Arc<AtomicU64>,
    finished: Arc<AtomicU64>,
}

impl StateMachine for Sleepy {
    type Stage = Sleep;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Sleep {
        Sleep
    }

    async fn run(&self, _: Sleep, secs: u64) -> Result<Next<Sleep, u64>, String> {
        self.started.fetch_add(1, Ordering::Relaxed);
        sleep(Duration::from_secs(secs)).await;
        self.finished.fetch_add(1, Ordering::Relaxed);
        Ok(Next::Done(secs))
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The values of a group's `Ok` results and, if it ended with one, its last error.
fn split(results: Vec<Result<u64, StageError<Sleepy>>>) -> (Vec<u64>, Option<StageError<Sleepy>>) {
    let mut values = Vec::new();
    let mut last = None;
    for result in results {
        match result {
            Ok(v) => values.push(v),
            Err(e) => {
                assert!(last.is_none(), "one error, the last item");
                last = Some(e);
            }
        }
    }
    (values, last)
}

#[tokio::test(start_paused = true)]
async fn a_group_past_its_deadline_is_cancelled_and_says_what_it_abandoned() {
    let machine = Sleepy::default();
    let (started, finished) = (machine.started.clone(), machine.finished.clone());
    let pipeline = Pipeline::builder(machine).workers(2).build();
    let deadline = Duration::from_millis(9_500);
    let (tx, results) = pipeline.group().ordered().deadline(deadline).open();
    let start = Instant::now();
    // Two workers: 4 s and 4 s; then 4 s and 30 s; then, beside the 30 s one, the 1 s ones
    // from 8 s and 9 s (the first finished at 9 s but held back behind the 30 s one).
    for s in [4, 4, 4, 30, 1, 1] {
        tx.submit(s).await.unwrap();
    }
    let results: Vec<_> = results.collect().await;
    assert_eq!(start.elapsed(), deadline);
    let (values, last) = split(results);
    assert_eq!(values, [4, 4, 4]);
    let last = last.expect("a last item");
    assert!(matches!(
        last,
        StageError::DeadlineExceeded { abandoned: 3 }
    ));
    assert_eq!(last.abandoned(), Some(3));
    assert_eq!(last.stage(), None);
    assert_eq!(
        last.to_string(),
        "the group's deadline passed: 3 requests abandoned"
    );

    // The group is closed: submissions come back, and the abandoned work stops.
    let refused = tx.submit(7).await.unwrap_err();
    assert_eq!(refused.into_inner(), 7);
    sleep(secs(60)).await;
    assert_eq!(started.load(Ordering::Relaxed), 6);
    assert_eq!(
        finished.load(Ordering::Relaxed),
        4,
        "the runs under way were dropped"
    );
    let stats = pipeline.stats();
    assert_eq!(stats.groups_open, 0);
    assert_eq!(
        stats.requests_done, 4,
        "the 1 s one held back finished, unread"
    );
    assert_eq!(pipeline.pool().busy(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_group_that_ends_before_its_deadline_ends_as_usual() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(2).build();
    let (tx, results) = pipeline.group().deadline(secs(10)).open();
    for s in [1, 2, 3] {
        tx.submit(s).await.unwrap();
    }
    drop(tx);
    let (mut values, last) = split(results.collect().await);
    values.sort_unstable();
    assert_eq!(values, [1, 2, 3]);
    assert!(last.is_none(), "no deadline item: {last:?}");
    // Far deadlines saturate instead of panicking.
    let (tx, results) = pipeline.group().deadline(Duration::MAX).open();
    tx.submit(1).await.unwrap();
    drop(tx);
    let (values, last) = split(results.collect().await);
    assert_eq!((values, last.is_none()), (vec![1], true));
}

#[tokio::test(start_paused = true)]
async fn a_result_finished_when_the_deadline_passes_comes_before_the_deadline_item() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(2).build();
    let (tx, results) = pipeline.group().ordered().deadline(secs(5)).open();
    let mut results = task::spawn(results);
    for s in [5, 5, 9] {
        tx.submit(s).await.unwrap();
    }
    assert_pending!(results.poll_next());
    // Nobody polls the results while the two 5 s requests finish and the deadline passes.
    sleep(secs(6)).await;
    assert_eq!(assert_ready!(results.poll_next()).unwrap().unwrap(), 5);
    assert_eq!(assert_ready!(results.poll_next()).unwrap().unwrap(), 5);
    let last = assert_ready!(results.poll_next()).unwrap().unwrap_err();
    assert!(matches!(
        last,
        StageError::DeadlineExceeded { abandoned: 1 }
    ));
    assert!(assert_ready!(results.poll_next()).is_none());
}

#[tokio::test(start_paused = true)]
async fn deadline_at_counts_from_an_instant_and_a_past_one_ends_the_group_at_once() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(2).build();
    let arrived = Instant::now();
    sleep(secs(3)).await;
    let (tx, results) = pipeline.group().deadline_at(arrived + secs(5)).open();
    tx.submit(1).await.unwrap();
    tx.submit(10).await.unwrap();
    let (values, last) = split(results.collect().await);
    assert_eq!(arrived.elapsed(), secs(5));
    assert_eq!(values, [1]);
    assert!(matches!(
        last,
        Some(StageError::DeadlineExceeded { abandoned: 1 })
    ));

    let (tx, results) = pipeline.group().deadline_at(arrived).open();
    tx.submit(1).await.unwrap();
    let (values, last) = split(results.collect().await);
    assert!(values.is_empty());
    assert!(matches!(
        last,
        Some(StageError::DeadlineExceeded { abandoned: 1 })
    ));
    assert_eq!(pipeline.stats().groups_open, 0);
}

#[test]
fn a_zero_deadline_is_refused_by_name() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(1).build();
    let error = pipeline.group().try_deadline(Duration::ZERO).unwrap_err();
    assert!(error.to_string().contains("deadline"), "{error}");
}

#[test]
#[should_panic(expected = "deadline")]
fn a_zero_deadline_panics_naming_it() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(1).build();
    let _ = pipeline.group().deadline(Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_resolves_true_when_every_group_closes_in_time() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(2).build();
    let (tx, results) = pipeline.group().ordered().open();
    tx.submit(2).await.unwrap();
    let reader = tokio::spawn(results.collect::<Vec<_>>());
    let start = Instant::now();
    assert!(pipeline.drain_timeout(secs(10)).await);
    assert_eq!(start.elapsed(), secs(2));
    let (values, last) = split(reader.await.unwrap());
    assert_eq!((values, last.is_none()), (vec![2], true));
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_cancels_the_groups_still_open_with_a_last_item() {
    let machine = Sleepy::default();
    let finished = machine.finished.clone();
    let pipeline = Pipeline::builder(machine).workers(4).build();
    let mut readers = Vec::new();
    let mut submitters = Vec::new();
    for group in [[1, 20, 20], [2, 3, 30]] {
        let (tx, results) = pipeline.group().ordered().open();
        for s in group {
            tx.submit(s).await.unwrap();
        }
        submitters.push(tx); // still held: the drain ends their input
        readers.push(tokio::spawn(results.collect::<Vec<_>>()));
    }
    // A group with a deadline later than the drain's: the drain's ends it.
    let (tx, results) = pipeline.group().deadline(secs(60)).open();
    tx.submit(40).await.unwrap();
    readers.push(tokio::spawn(results.collect::<Vec<_>>()));

    let start = Instant::now();
    assert!(!pipeline.drain_timeout(secs(5)).await);
    assert_eq!(start.elapsed(), secs(5));
    let mut ends = Vec::new();
    for reader in readers {
        let (values, last) = split(reader.await.unwrap());
        let last = last.expect("a last item");
        assert!(matches!(last, StageError::DrainTimedOut { .. }), "{last:?}");
        assert_eq!(
            last.to_string(),
            format!(
                "the pipeline's drain timed out: {} requests abandoned",
                last.abandoned().unwrap()
            )
        );
        ends.push((values, last.abandoned().unwrap()));
    }
    assert_eq!(ends, [(vec![1], 2), (vec![2, 3], 1), (vec![], 1)]);
    // Submissions are refused, nothing is left running and the abandoned runs never finish.
    assert!(submitters[0].submit(1).await.is_err());
    sleep(secs(60)).await;
    assert_eq!(finished.load(Ordering::Relaxed), 3);
    assert_eq!(pipeline.stats().groups_open, 0);
    assert_eq!(pipeline.pool().busy(), 0);
}
