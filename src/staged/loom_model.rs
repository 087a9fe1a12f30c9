//! loom models of request groups (`scripts/loom`): submissions racing the group's close, its
//! cancel-on-error and the pipeline's drain; a group opened while the pipeline drains.
//!
//! The groups, submitters and the drain are the real ones; tokio's channel between a
//! submitter and its group is not loom's, so each of its calls is one step of the model (its
//! own interleavings are tokio's to check). The pool's workers run on loom threads (see
//! `pool/loom_model.rs`).

use futures::StreamExt;
use futures::stream::FusedStream;
use loom::future::block_on;
use loom::thread;

use super::{GroupClosed, Next, Pipeline, StageError, StateMachine};
use crate::WorkerPool;
use crate::pool::loom_model::Workers;
use crate::sync::model;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Step;

/// Finishes every request with its data, except `fail`, which fails.
struct Echo {
    fail: Option<u32>,
}

impl StateMachine for Echo {
    type Stage = Step;
    type Data = u32;
    type Error = u32;

    fn start(&self) -> Step {
        Step
    }

    async fn run(&self, _: Step, data: u32) -> Result<Next<Step, u32>, u32> {
        match self.fail == Some(data) {
            true => Err(data),
            false => Ok(Next::Done(data)),
        }
    }
}

fn pipeline(pool: &WorkerPool, fail: Option<u32>) -> Pipeline<Echo> {
    Pipeline::builder(Echo { fail })
        .pool(pool)
        .window(2)
        .build()
}

/// Submits `data` in turn: which were accepted, and which refused (with their data back).
fn submit_all(tx: &super::Submitter<Echo>, data: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for &d in data {
        match block_on(tx.submit(d)) {
            Ok(()) => accepted.push(d),
            Err(GroupClosed(back)) => refused.push(back),
        }
    }
    (accepted, refused)
}

/// Runs `body` in a loom model with a one-worker pool whose worker runs on a loom thread and a
/// pipeline on it (request `fail` fails, if any); afterwards the worker is stopped.
fn on_pipeline(fail: Option<u32>, body: impl Fn(&Pipeline<Echo>) + Send + Sync + 'static) {
    model(move || {
        let pool = WorkerPool::new(1);
        let workers = Workers::start(&pool);
        let pipeline = pipeline(&pool, fail);
        body(&pipeline);
        drop(pipeline);
        workers.stop(pool);
    });
}

/// Submissions race the pipeline's drain, then the group's results are read: each is accepted
/// and its result delivered (in order), or refused with its data back; the results end exactly
/// once, after the last accepted request; the drain resolves only once the group has closed,
/// and refuses every submission after it.
#[test]
fn loom_group_submit_races_drain() {
    on_pipeline(None, |pipeline| {
        let (tx, mut results) = pipeline.group().ordered().open();
        let late = tx.clone();
        let drainer = {
            let pipeline = pipeline.clone();
            thread::spawn(move || {
                block_on(pipeline.drain());
                assert_eq!(pipeline.stats().groups_open, 0, "drained with a group open");
                assert_eq!(block_on(late.submit(9)), Err(GroupClosed(9)));
            })
        };
        let (accepted, mut refused) = submit_all(&tx, &[1, 2]);
        let delivered: Vec<u32> = block_on(results.by_ref().collect::<Vec<_>>())
            .into_iter()
            .map(|r| r.expect("no request fails"))
            .collect();
        assert!(results.is_terminated());
        assert!(
            block_on(results.next()).is_none(),
            "the results ended twice"
        );
        drainer.join().unwrap();
        assert_eq!(
            delivered, accepted,
            "accepted requests not delivered, or out of order"
        );
        refused.extend(&accepted);
        refused.sort_unstable();
        assert_eq!(refused, [1, 2], "a request neither accepted nor given back");
    });
}

/// The first request fails in a cancel-on-error group while a second is submitted: the error
/// is the group's last item, the second request is refused with its data or abandoned, and
/// the group refuses submissions once its results have ended.
#[test]
fn loom_group_cancel_on_error_races_submit() {
    on_pipeline(Some(1), |pipeline| {
        let (tx, mut results) = pipeline.group().ordered().cancel_on_error().open();
        let late = tx.clone();
        let submitter = thread::spawn(move || submit_all(&tx, &[1, 2]));
        let out = block_on(results.by_ref().collect::<Vec<_>>());
        let (accepted, refused) = submitter.join().unwrap();
        assert!(matches!(
            out.as_slice(),
            [Err(StageError::Failed { error: 1, .. })]
        ));
        assert_eq!(accepted[0], 1);
        assert!(accepted.len() + refused.len() == 2 && refused.iter().all(|&d| d == 2));
        assert!(block_on(results.next()).is_none());
        assert_eq!(block_on(late.submit(3)), Err(GroupClosed(3)));
        block_on(pipeline.drain());
    });
}

/// A group opens while the pipeline starts draining: either it sees the drain and is closed
/// at once, or the drain waits for it to close.
#[test]
fn loom_group_open_races_drain() {
    model(|| {
        let pool = WorkerPool::new(1);
        let pipeline = pipeline(&pool, None);
        let drainer = {
            let pipeline = pipeline.clone();
            thread::spawn(move || {
                block_on(pipeline.drain());
                pipeline.stats().groups_open
            })
        };
        let (tx, mut results) = pipeline.group().open();
        let closed_at_open = results.is_terminated();
        drop(tx);
        assert!(block_on(results.next()).is_none());
        let open_after_drain = drainer.join().unwrap();
        assert!(
            open_after_drain == 0 || closed_at_open,
            "the drain ended while a group it did not close was open ({open_after_drain} open, \
             closed at open: {closed_at_open})"
        );
    });
}
