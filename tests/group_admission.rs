//! Admission of request groups (`GroupBuilder::admit`): the bounds on open groups and pending
//! requests, the wait for room in arrival order, refusals with the bound and a retry-after
//! estimate, and the figures. All on tokio's paused clock.

use std::time::Duration;

use futures::StreamExt;
use stagepipe::prelude::*;
use stagepipe::{AdmissionBound, GroupResults, Submitter};
use tokio::time::{Instant, sleep};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Sleep;

/// Each request sleeps its own number of seconds.
struct Sleepy;

impl StateMachine for Sleepy {
    type Stage = Sleep;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Sleep {
        Sleep
    }

    async fn run(&self, _: Sleep, secs: u64) -> Result<Next<Sleep, u64>, String> {
        sleep(Duration::from_secs(secs)).await;
        Ok(Next::Done(secs))
    }
}

type Group = (Submitter<Sleepy>, GroupResults<Sleepy>);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Submits `requests` to an admitted group, closes it and reads it to the end on a task.
fn run(group: Group, requests: &[u64]) -> tokio::task::JoinHandle<Vec<u64>> {
    let requests = requests.to_vec();
    tokio::spawn(async move {
        let (tx, results) = group;
        for r in requests {
            tx.submit(r).await.unwrap();
        }
        drop(tx);
        results.map(Result::unwrap).collect().await
    })
}

#[tokio::test(start_paused = true)]
async fn a_full_pipeline_refuses_with_the_bound_and_frees_the_slot_when_a_group_closes() {
    let pipeline = Pipeline::builder(Sleepy)
        .workers(4)
        .max_open_groups(2)
        .build();
    let a = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    let b = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    let refused = pipeline.group().admit(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(refused.bound, AdmissionBound::OpenGroups);
    assert_eq!(refused.retry_after, None, "no history yet");
    assert_eq!(refused.to_string(), "no room: too many groups open");

    // Dropping a group's results closes it: its slot is free at once.
    drop(a);
    let c = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    // A group whose results end closes too.
    assert_eq!(run(b, &[1]).await.unwrap(), [1]);
    let d = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    let stats = pipeline.stats();
    assert_eq!(stats.groups_open, 2);
    assert_eq!(stats.groups_refused, 1);
    assert_eq!(stats.groups_waiting, 0);
    drop((c, d));
    // Groups opened with `open` take no slot.
    let _open: Vec<_> = (0..3).map(|_| pipeline.group().open()).collect();
    assert!(pipeline.group().admit(1, Duration::ZERO).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn admissions_wait_in_arrival_order_and_the_queue_is_bounded() {
    let pipeline = Pipeline::builder(Sleepy)
        .workers(4)
        .max_open_groups(1)
        .build();
    let start = Instant::now();
    let first = run(pipeline.group().admit(1, secs(60)).await.unwrap(), &[3]);
    let (p1, p2) = (pipeline.clone(), pipeline.clone());
    let second = tokio::spawn(async move {
        let group = p1.group().admit(1, secs(60)).await.unwrap();
        let admitted = start.elapsed();
        (admitted, run(group, &[2]).await.unwrap())
    });
    sleep(Duration::from_millis(10)).await;
    // One admission waits per slot: the next is refused at once, however long it would wait.
    assert_eq!(pipeline.stats().groups_waiting, 1);
    let asked = Instant::now();
    let refused = p2.group().admit(1, secs(60)).await.unwrap_err();
    assert_eq!(refused.bound, AdmissionBound::OpenGroups);
    assert_eq!(asked.elapsed(), Duration::ZERO);

    assert_eq!(first.await.unwrap(), [3]);
    let (admitted, values) = second.await.unwrap();
    assert_eq!(admitted, secs(3), "admitted when the first group closed");
    assert_eq!(values, [2]);

    // A wait that runs out is refused at its end.
    let _held = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    let asked = Instant::now();
    let refused = pipeline.group().admit(1, secs(2)).await.unwrap_err();
    assert_eq!(asked.elapsed(), secs(2));
    assert_eq!(refused.bound, AdmissionBound::OpenGroups);
    assert_eq!(pipeline.stats().groups_waiting, 0);
    assert_eq!(pipeline.stats().groups_refused, 2);
}

#[tokio::test(start_paused = true)]
async fn pending_requests_are_reserved_at_admission_and_given_back_as_results_come() {
    let pipeline = Pipeline::builder(Sleepy)
        .workers(4)
        .max_pending_requests(10)
        .build();
    // More than the bound could ever hold: refused at once.
    let refused = pipeline.group().admit(11, secs(60)).await.unwrap_err();
    assert_eq!(refused.bound, AdmissionBound::PendingRequests);
    assert_eq!(refused.to_string(), "no room: too many requests pending");

    let (tx, mut results) = pipeline
        .group()
        .ordered()
        .admit(8, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pipeline.stats().requests_pending, 8);
    let refused = pipeline.group().admit(5, Duration::ZERO).await.unwrap_err();
    assert_eq!(refused.bound, AdmissionBound::PendingRequests);
    for s in [1, 1, 5, 5, 5, 5, 5, 5] {
        tx.submit(s).await.unwrap();
    }
    // Two more fit beside the eight.
    let small = pipeline.group().admit(2, Duration::ZERO).await.unwrap();
    drop(small);
    // Each result yielded gives its request back.
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    assert_eq!(pipeline.stats().requests_pending, 6);
    let four = pipeline.group().admit(4, Duration::ZERO).await.unwrap();
    assert_eq!(pipeline.stats().requests_pending, 10);
    // Closing a group gives back what it still held.
    drop((tx, results));
    assert_eq!(pipeline.stats().requests_pending, 4);
    drop(four);
    assert_eq!(pipeline.stats().requests_pending, 0);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_estimated_from_the_rate_groups_ended() {
    let pipeline = Pipeline::builder(Sleepy)
        .workers(4)
        .max_open_groups(2)
        .build();
    let a = run(
        pipeline.group().admit(1, Duration::ZERO).await.unwrap(),
        &[4],
    );
    let b = run(
        pipeline.group().admit(1, Duration::ZERO).await.unwrap(),
        &[4],
    );
    // The first refusal starts the history (samples are taken as groups end or are refused).
    let refused = pipeline.group().admit(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(refused.retry_after, None);
    // Both end at 4 s: two groups in 4 s, one every 2 s.
    a.await.unwrap();
    b.await.unwrap();
    let _c = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    let _d = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    let refused = pipeline.group().admit(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(
        refused.retry_after,
        Some(secs(2)),
        "room for one in one group's time"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_the_longest_when_no_group_ends() {
    let pipeline = Pipeline::builder(Sleepy)
        .workers(2)
        .max_open_groups(1)
        .build();
    let _stuck = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    let refused = pipeline.group().admit(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(refused.retry_after, None);
    // Three seconds and no group ended: no end in sight.
    sleep(secs(3)).await;
    let refused = pipeline.group().admit(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(refused.retry_after, Some(Duration::MAX));
}

#[tokio::test(start_paused = true)]
async fn a_group_admitted_while_the_pipeline_drains_is_closed_and_holds_nothing() {
    let pipeline = Pipeline::builder(Sleepy)
        .workers(2)
        .max_open_groups(1)
        .build();
    pipeline.drain().await;
    let (tx, results) = pipeline.group().admit(1, Duration::ZERO).await.unwrap();
    assert!(tx.submit(1).await.is_err());
    assert_eq!(results.count().await, 0);
    assert!(pipeline.group().admit(1, Duration::ZERO).await.is_ok());
}

#[test]
fn zero_bounds_are_refused_by_name() {
    let error = Pipeline::builder(Sleepy)
        .try_max_open_groups(0)
        .unwrap_err();
    assert!(error.to_string().contains("max"), "{error}");
    let error = Pipeline::builder(Sleepy)
        .try_max_pending_requests(0)
        .unwrap_err();
    assert!(error.to_string().contains("max"), "{error}");
}

#[test]
#[should_panic(expected = "max")]
fn a_zero_bound_on_open_groups_panics() {
    let _ = Pipeline::builder(Sleepy).max_open_groups(0);
}
