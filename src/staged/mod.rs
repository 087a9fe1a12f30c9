//! Staged pipelines: a state machine of async stages, run for many request groups on one
//! shared [`WorkerPool`](crate::WorkerPool).
//!
//! A user writes a [`StateMachine`]: an enum of stages and one async [`run`](StateMachine::run)
//! that runs a stage on a request's data and says where it goes [`Next`]. A [`Pipeline`] holds
//! the machine and a worker pool; it is `Clone` and shared by a whole service. Each caller opens
//! a request group ([`Pipeline::group`]), submits requests through its [`Submitter`] and reads
//! its own results from its [`GroupResults`] stream.
//!
//! Built from the operators: a group's results are its submitted requests run through the same
//! fan-out core as [`fan_out_ordered`](crate::PipelineExt::fan_out_ordered) /
//! [`fan_out`](crate::PipelineExt::fan_out) on the pipeline's pool, with a bounded window per
//! group (so groups are isolated and served round-robin), per-stage figures in the same
//! [`Stats`](crate::Stats) type as [`with_stats`](crate::PipelineExt::with_stats), and
//! cancel-on-error as an adapter on the group's output.

mod admission;
mod drain;
mod error;
mod graph;
mod group;
#[cfg(all(test, stagepipe_loom))]
mod loom_model;
mod pipeline;
mod table;

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;

pub use admission::{AdmissionBound, GroupRefused};
pub use error::{GroupClosed, StageError};
pub use graph::{GraphEdge, GraphNode, PipelineGraph};
pub use group::{GroupBuilder, GroupResults, Submitter, Through};
pub use pipeline::{Pipeline, PipelineBuilder, PipelineStats, StageStats};

/// Where a request goes after a stage: to another stage, or out of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Next<S, D> {
    /// Run stage `S` next, on data `D`.
    Stage(S, D),
    /// The request is finished; `D` is its result.
    Done(D),
}

/// A state machine of async stages: the program of a [`Pipeline`].
///
/// `Stage` is usually a small `enum`; [`run`](StateMachine::run) matches on it, does the stage's
/// work on the request's data and returns where the request goes [`Next`], choosing by the data
/// (routing). A request runs from [`start`](StateMachine::start) to [`Next::Done`] inside one
/// slot of the pipeline's worker pool.
///
/// # Panics
///
/// A panic in the machine stays inside the request it hit; the group and the pipeline keep
/// serving (a [`cancel_on_error`](GroupBuilder::cancel_on_error) group ends there, as for any
/// error). A panic in [`run`](StateMachine::run) yields [`StageError::Panicked`] naming the
/// stage, whether it happens while `run` makes the stage's future (a plain `fn run` that checks
/// its input before returning an `async` block) or while the future runs. A panic in
/// [`start`](StateMachine::start) yields [`StageError::StartPanicked`]: the request never
/// reached a stage.
///
/// # Examples
///
/// ```
/// use stagepipe::{Next, StateMachine};
///
/// #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
/// enum Step { Parse, Double, Store }
///
/// struct Machine;
///
/// impl StateMachine for Machine {
///     type Stage = Step;
///     type Data = String;
///     type Error = std::num::ParseIntError;
///
///     fn start(&self) -> Step {
///         Step::Parse
///     }
///
///     async fn run(&self, stage: Step, data: String) -> Result<Next<Step, String>, Self::Error> {
///         Ok(match stage {
///             Step::Parse => {
///                 let n: i64 = data.trim().parse()?;
///                 // Route by the data: odd numbers skip the doubling stage.
///                 if n % 2 == 0 { Next::Stage(Step::Double, n.to_string()) } else { Next::Stage(Step::Store, n.to_string()) }
///             }
///             Step::Double => Next::Stage(Step::Store, (data.parse::<i64>()? * 2).to_string()),
///             Step::Store => Next::Done(data),
///         })
///     }
/// }
/// ```
pub trait StateMachine: Send + Sync + 'static {
    /// The stages: `Copy + Eq + Hash + Debug`, usually a field-less `enum`.
    type Stage: Copy + Eq + Hash + Debug + Send + Sync + 'static;
    /// A request's data, handed from stage to stage.
    type Data: Send + 'static;
    /// The error a stage may fail with.
    type Error: Send + 'static;

    /// The stage every request starts in. Called once per request, on the pool's worker that
    /// runs it; a panic here yields [`StageError::StartPanicked`] for that request.
    fn start(&self) -> Self::Stage;

    /// Runs `stage` on `data` and says where the request goes next.
    ///
    /// It may be an `async fn`, or a plain `fn` that does some work before it returns the
    /// stage's future: both the call and the future run on the pool, and a panic in either
    /// yields [`StageError::Panicked`] for that request.
    fn run(
        &self,
        stage: Self::Stage,
        data: Self::Data,
    ) -> impl Future<Output = Result<Next<Self::Stage, Self::Data>, Self::Error>> + Send;
}
