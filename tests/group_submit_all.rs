//! A request group given its requests up front (`GroupBuilder::submit_all`, `admit_all`): pulled
//! lazily as the window has room, every one answered or counted as abandoned by a deadline, a
//! drain or a timed-out drain. All on tokio's paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FusedStream;
use stagepipe::AdmissionBound;
use stagepipe::prelude::*;
use tokio::time::sleep;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Step;

/// Each request `(id, ms)` sleeps `ms`, then is done with `id`; fails for `ms == 999`. Counts
/// the runs in progress and their high-water mark.
#[derive(Default)]
struct Sleepy {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl StateMachine for Sleepy {
    type Stage = Step;
    type Data = (u64, u64);
    type Error = String;

    fn start(&self) -> Step {
        Step
    }

    async fn run(&self, _: Step, (id, ms): (u64, u64)) -> Result<Next<Step, (u64, u64)>, String> {
        let now = self.running.fetch_add(1, Ordering::AcqRel) + 1;
        self.most.fetch_max(now, Ordering::AcqRel);
        // Counted out when the run ends or is dropped (cancelled).
        let _running = Running(&self.running);
        sleep(Duration::from_millis(ms)).await;
        if ms == 999 {
            return Err(format!("request {id} failed"));
        }
        Ok(Next::Done((id, ms)))
    }
}

struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `n` requests `(id, ms)` with seeded random sleeps of 0 to 20 ms; counts the ones pulled.
fn requests(
    n: u64,
    seed: u64,
    pulled: &Arc<AtomicU64>,
) -> impl ExactSizeIterator<Item = (u64, u64)> + Send + 'static {
    let mut rng = fastrand::Rng::with_seed(seed);
    let sleeps: Vec<u64> = (0..n).map(|_| rng.u64(0..=20)).collect();
    let pulled = pulled.clone();
    sleeps.into_iter().enumerate().map(move |(id, ms)| {
        pulled.fetch_add(1, Ordering::AcqRel);
        (id as u64, ms)
    })
}

#[tokio::test(start_paused = true)]
async fn every_request_answered_in_order_and_pulled_only_as_the_window_has_room() {
    for seed in 0..5 {
        let machine = Sleepy::default();
        let most = machine.most.clone();
        let pipeline = Pipeline::builder(machine).workers(8).build();
        let pulled = Arc::new(AtomicU64::new(0));
        let mut results = pipeline
            .group()
            .ordered()
            .window(4)
            .submit_all(requests(500, seed, &pulled));
        let mut ids = Vec::new();
        while let Some(result) = results.next().await {
            let (id, _) = result.unwrap();
            ids.push(id);
            // Pulled from the iterator only as the window has room: at most the window (and
            // the one being pulled) ahead of the results yielded.
            let ahead = pulled.load(Ordering::Acquire) - ids.len() as u64;
            assert!(ahead <= 5, "seed {seed}: {ahead} requests pulled ahead");
        }
        assert_eq!(ids, (0..500).collect::<Vec<_>>(), "seed {seed}");
        assert!(
            most.load(Ordering::Acquire) <= 4,
            "seed {seed}: window exceeded"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn unordered_yields_every_request_once() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(3).build();
    let pulled = Arc::new(AtomicU64::new(0));
    let results = pipeline
        .group()
        .window(16)
        .submit_all(requests(300, 7, &pulled));
    let mut ids: Vec<u64> = results.map(|r| r.unwrap().0).collect().await;
    ids.sort_unstable();
    assert_eq!(ids, (0..300).collect::<Vec<_>>());
    assert_eq!(pulled.load(Ordering::Acquire), 300);
}

#[tokio::test(start_paused = true)]
async fn a_drain_ends_the_group_after_the_requests_it_pulled_and_counts_the_rest() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(4).build();
    let pulled = Arc::new(AtomicU64::new(0));
    let all = (0..100usize).map(|id| (id as u64, 10));
    let counted = {
        let pulled = pulled.clone();
        all.inspect(move |_| {
            pulled.fetch_add(1, Ordering::AcqRel);
        })
    };
    let mut results = pipeline.group().ordered().window(4).submit_all(counted);
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(results.next().await.unwrap().unwrap().0);
    }
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Some(result) = results.next().await {
            rest.push(result);
        }
        rest
    });
    pipeline.drain().await;
    let rest = reader.await.unwrap();
    let (last, answered) = rest.split_last().unwrap();
    for result in answered {
        ids.push(result.as_ref().unwrap().0);
    }
    // Every request pulled before the drain began was answered, in order; none after.
    let pulled = pulled.load(Ordering::Acquire);
    assert_eq!(ids, (0..pulled).collect::<Vec<_>>());
    assert!(pulled < 100, "the drain stopped the pulling: {pulled}");
    match last {
        Err(StageError::Drained { abandoned }) => assert_eq!(*abandoned, 100 - pulled),
        other => panic!("the last item is {other:?}"),
    }
    assert_eq!(
        last.as_ref().unwrap_err().to_string(),
        format!(
            "the pipeline is draining: {} requests abandoned",
            100 - pulled
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_group_opened_while_draining_runs_nothing_and_says_so() {
    let machine = Sleepy::default();
    let most = machine.most.clone();
    let pipeline = Pipeline::builder(machine).workers(2).build();
    // A group kept open so the drain is still going when the next one opens.
    let (tx, open) = pipeline.group().open();
    tx.submit((0, 50)).await.unwrap();
    let drain = {
        let pipeline = pipeline.clone();
        tokio::spawn(async move { pipeline.drain().await })
    };
    tokio::task::yield_now().await;
    let late = pipeline.group().submit_all([(1, 1), (2, 1)]);
    // Not terminated before its last item: `select!` still polls it.
    assert!(!late.is_terminated());
    let late: Vec<_> = late.collect().await;
    assert!(
        matches!(late[..], [Err(StageError::Drained { abandoned: 2 })]),
        "{late:?}"
    );
    drop(tx);
    assert_eq!(open.count().await, 1);
    drain.await.unwrap();
    assert_eq!(
        most.load(Ordering::Acquire),
        1,
        "only the open group's request ran"
    );
    // An empty group opened while draining just ends.
    let empty: Vec<_> = pipeline.group().submit_all(Vec::new()).collect().await;
    assert!(empty.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_counts_the_requests_never_pulled_among_the_abandoned() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(4).build();
    // 40 requests of 10 ms through a window of 2: 200 ms of work, cut at 55 ms.
    let results: Vec<_> = pipeline
        .group()
        .ordered()
        .window(2)
        .deadline(Duration::from_millis(55))
        .submit_all((0..40usize).map(|id| (id as u64, 10)))
        .collect()
        .await;
    let (last, answered) = results.split_last().unwrap();
    let ids: Vec<u64> = answered.iter().map(|r| r.as_ref().unwrap().0).collect();
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
    assert_eq!(ids.len(), 10);
    match last {
        Err(StageError::DeadlineExceeded { abandoned }) => assert_eq!(*abandoned, 30),
        other => panic!("the last item is {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn cancel_on_error_ends_the_group_without_a_drained_item() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(2).build();
    let results: Vec<_> = pipeline
        .group()
        .ordered()
        .cancel_on_error()
        .submit_all([(0, 1), (1, 999), (2, 1), (3, 1)])
        .collect()
        .await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0].as_ref().unwrap().0, 0);
    assert!(
        matches!(&results[1], Err(StageError::Failed { error, .. }) if error == "request 1 failed")
    );
}

#[tokio::test(start_paused = true)]
async fn admit_all_reserves_every_request_and_gives_the_room_back() {
    let pipeline = Pipeline::builder(Sleepy::default())
        .workers(2)
        .max_pending_requests(10)
        .build();
    let too_many = pipeline
        .group()
        .admit_all((0..11usize).map(|id| (id as u64, 1)), Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(too_many.bound, AdmissionBound::PendingRequests);
    let mut first = pipeline
        .group()
        .ordered()
        .admit_all((0..6usize).map(|id| (id as u64, 5)), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pipeline.stats().requests_pending, 6);
    // 6 of 10 reserved: a second group of 5 waits for room, and gets it as results are read.
    let second = {
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let results = pipeline
                .group()
                .admit_all(
                    (100..105usize).map(|id| (id as u64, 1)),
                    Duration::from_secs(1),
                )
                .await
                .unwrap();
            results.count().await
        })
    };
    tokio::task::yield_now().await;
    assert_eq!(pipeline.stats().groups_waiting, 1);
    let mut ids = Vec::new();
    while let Some(result) = first.next().await {
        ids.push(result.unwrap().0);
    }
    assert_eq!(ids, (0..6).collect::<Vec<_>>());
    assert_eq!(second.await.unwrap(), 5);
    assert_eq!(pipeline.stats().requests_pending, 0);
    assert_eq!(pipeline.stats().groups_refused, 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_results_stops_the_pulling_and_frees_the_pool() {
    let machine = Sleepy::default();
    let running = machine.running.clone();
    let pipeline = Pipeline::builder(machine).workers(4).build();
    let pulled = Arc::new(AtomicU64::new(0));
    let mut results = pipeline
        .group()
        .window(4)
        .submit_all(requests(1_000, 3, &pulled));
    for _ in 0..20 {
        results.next().await.unwrap().unwrap();
    }
    drop(results);
    let at_drop = pulled.load(Ordering::Acquire);
    sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pulled.load(Ordering::Acquire),
        at_drop,
        "nothing pulled after the drop"
    );
    assert_eq!(running.load(Ordering::Acquire), 0);
    assert_eq!(pipeline.pool().busy(), 0);
    assert_eq!(pipeline.stats().groups_open, 0);
}

#[tokio::test(start_paused = true)]
async fn a_keyed_group_drains_its_parked_requests_then_says_what_is_left() {
    let pipeline = Pipeline::builder(Sleepy::default()).workers(4).build();
    // Keys 0..4, each request 10 ms: requests of one key run one after another.
    let all = (0..60usize).map(|id| (id as u64, 10));
    let mut results = pipeline
        .group()
        .ordered()
        .window(8)
        .keyed(|&(id, _)| id % 4)
        .submit_all(all);
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(results.next().await.unwrap().unwrap().0);
    }
    let reader = tokio::spawn(async move { results.collect::<Vec<_>>().await });
    // On the paused clock, a group that never ends lets the timeout fire.
    let ended = tokio::time::timeout(Duration::from_secs(60), pipeline.drain()).await;
    ended.expect("the drain ends once the group has ended");
    let rest = reader.await.unwrap();
    let (last, answered) = rest.split_last().unwrap();
    ids.extend(answered.iter().map(|r| r.as_ref().unwrap().0));
    let Err(StageError::Drained { abandoned }) = last else {
        panic!("the last item is {last:?}");
    };
    assert_eq!(ids.len() as u64 + abandoned, 60);
    // Each key's requests ran in submission order, none skipped before the cut.
    for key in 0..4 {
        let of_key: Vec<u64> = ids.iter().copied().filter(|id| id % 4 == key).collect();
        let expected: Vec<u64> = (0..of_key.len() as u64).map(|i| key + 4 * i).collect();
        assert_eq!(of_key, expected, "key {key}");
    }
}
