//! [`Pipeline`]: a state machine and a worker pool, shared by every clone and every group.

use std::any::Any;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;

use super::admission::Admission;
use super::drain::Drain;
use super::graph::{GraphEdge, GraphNode, PipelineGraph};
use super::group::GroupBuilder;
use super::table::Table;
use super::{Next, StageError, StateMachine};
use crate::error::{ConfigError, nonzero, or_panic, window_size};
use crate::{Stats, WorkerPool};

/// A staged pipeline: a [`StateMachine`] run on a shared [`WorkerPool`] for many request groups.
///
/// Cloning shares the machine, the pool and the stats. Open a request group with
/// [`group`](Pipeline::group), or run a whole stream as one group with
/// [`through`](crate::PipelineExt::through).
///
/// # Examples
///
/// ```
/// use futures::StreamExt;
/// use stagepipe::prelude::*;
///
/// #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
/// enum Step { Add, Double }
///
/// struct Machine;
///
/// impl StateMachine for Machine {
///     type Stage = Step;
///     type Data = u64;
///     type Error = std::convert::Infallible;
///
///     fn start(&self) -> Step { Step::Add }
///
///     async fn run(&self, stage: Step, n: u64) -> Result<Next<Step, u64>, Self::Error> {
///         Ok(match stage {
///             Step::Add => Next::Stage(Step::Double, n + 1),
///             Step::Double => Next::Done(n * 2),
///         })
///     }
/// }
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() {
/// let pipeline = Pipeline::builder(Machine).workers(2).build();
/// let (tx, results) = pipeline.group().ordered().open();
/// let submit = async move {
///     for n in 0..5 {
///         tx.submit(n).await.unwrap();
///     }
///     // dropping `tx` ends the group after its last result
/// };
/// let (_, out): (_, Vec<_>) = tokio::join!(submit, results.collect());
/// let out: Vec<u64> = out.into_iter().map(Result::unwrap).collect();
/// assert_eq!(out, [2, 4, 6, 8, 10]);
/// # }
/// ```
pub struct Pipeline<M: StateMachine> {
    pub(super) inner: Arc<Inner<M>>,
}

pub(super) struct Inner<M: StateMachine> {
    pub(super) machine: M,
    pub(super) pool: WorkerPool,
    pub(super) window: usize,
    dag: bool,
    /// Per stage, in the order of their first finished runs: figures and routes taken.
    stages: Table<M::Stage, StageEntry<M::Stage>, STAGE_SLOTS>,
    /// The first stage of each request, counted.
    starts: Table<M::Stage, AtomicU64, ROUTE_SLOTS>,
    pub(super) requests_done: AtomicU64,
    pub(super) requests_failed: AtomicU64,
    /// The time per request the groups measured (nanoseconds; `u64::MAX` before the first
    /// measurement): every group runs the same machine, so a new group sizes its first jobs by
    /// it (see `Run`).
    pub(super) item_nanos: AtomicU64,
    pub(super) drain: Arc<Drain>,
    pub(super) admission: Arc<Admission>,
}

impl<M: StateMachine> Clone for Pipeline<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<M: StateMachine> fmt::Debug for Pipeline<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("pool", &self.inner.pool)
            .field("window", &self.inner.window)
            .field("dag", &self.inner.dag)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Pipeline`]: `Pipeline::builder(machine).workers(4).dag().build()`.
#[must_use = "a builder does nothing until `build` is called"]
pub struct PipelineBuilder<M> {
    machine: M,
    pool: Option<WorkerPool>,
    workers: Option<usize>,
    window: Option<usize>,
    dag: bool,
    max_open_groups: usize,
    max_pending_requests: usize,
}

impl_debug!(impl[M] PipelineBuilder<M> => PipelineBuilder |this| {
    workers: &this.workers,
    window: &this.window,
    dag: &this.dag,
    max_open_groups: &this.max_open_groups,
    max_pending_requests: &this.max_pending_requests,
} ..);

impl<M: StateMachine> PipelineBuilder<M> {
    /// Runs the pipeline on a new pool of `workers` workers (default: the machine's available
    /// parallelism). At most `workers` requests run at once across all groups.
    ///
    /// # Panics
    ///
    /// Panics if `workers` is zero; [`try_workers`](Self::try_workers) returns the error
    /// instead.
    #[track_caller]
    pub fn workers(self, workers: usize) -> Self {
        or_panic(self.try_workers(workers))
    }

    /// [`workers`](Self::workers), returning a [`ConfigError`] naming `workers` if it is zero.
    pub fn try_workers(mut self, workers: usize) -> Result<Self, ConfigError> {
        nonzero("workers", workers as u64)?;
        self.workers = Some(workers);
        Ok(self)
    }

    /// Runs the pipeline on an existing shared pool instead of a new one, so that the pipeline
    /// and other streams share one set of workers. Overrides [`workers`](Self::workers).
    pub fn pool(mut self, pool: &WorkerPool) -> Self {
        self.pool = Some(pool.clone());
        self
    }

    /// The default window of each group: how many of its requests may be in the pool at once
    /// (default: four times the workers, at least 256). A group can also set its own with
    /// [`GroupBuilder::window`].
    ///
    /// # Panics
    ///
    /// Panics if `window` is zero or above 2^30; [`try_window`](Self::try_window) returns the
    /// error instead.
    #[track_caller]
    pub fn window(self, window: usize) -> Self {
        or_panic(self.try_window(window))
    }

    /// [`window`](Self::window), returning a [`ConfigError`] naming `window` if it is zero or
    /// above 2^30.
    pub fn try_window(mut self, window: usize) -> Result<Self, ConfigError> {
        window_size(window)?;
        self.window = Some(window);
        Ok(self)
    }

    /// DAG mode: a request routed back to a stage it already visited fails with
    /// [`StageError::Cycle`] instead of running it again.
    pub fn dag(mut self) -> Self {
        self.dag = true;
        self
    }

    /// Bounds the groups admitted with [`GroupBuilder::admit`] that are open at once (their
    /// result stream not ended or dropped) to `max`; an admission finding them all taken waits
    /// for one to close, or is refused (see [`admit`](GroupBuilder::admit)). Default:
    /// `usize::MAX`, no bound (as is any value tokio's `Semaphore` cannot count). Groups opened
    /// with [`open`](GroupBuilder::open) or [`through`](crate::PipelineExt::through) neither
    /// take a slot nor wait for one.
    ///
    /// # Panics
    ///
    /// Panics if `max` is zero; [`try_max_open_groups`](Self::try_max_open_groups) returns the
    /// error instead.
    #[track_caller]
    pub fn max_open_groups(self, max: usize) -> Self {
        or_panic(self.try_max_open_groups(max))
    }

    /// [`max_open_groups`](Self::max_open_groups), returning a [`ConfigError`] naming `max` if
    /// it is zero.
    pub fn try_max_open_groups(mut self, max: usize) -> Result<Self, ConfigError> {
        nonzero("max", max as u64)?;
        self.max_open_groups = max;
        Ok(self)
    }

    /// Bounds the requests that the groups admitted with [`GroupBuilder::admit`] reserve and
    /// that have no result yet to `max`: a group reserves its requests when it is admitted,
    /// and each one goes back as its result is yielded (the rest when the group closes).
    /// Default: `usize::MAX`, no bound.
    ///
    /// # Panics
    ///
    /// Panics if `max` is zero; [`try_max_pending_requests`](Self::try_max_pending_requests)
    /// returns the error instead.
    #[track_caller]
    pub fn max_pending_requests(self, max: usize) -> Self {
        or_panic(self.try_max_pending_requests(max))
    }

    /// [`max_pending_requests`](Self::max_pending_requests), returning a [`ConfigError`] naming
    /// `max` if it is zero.
    pub fn try_max_pending_requests(mut self, max: usize) -> Result<Self, ConfigError> {
        nonzero("max", max as u64)?;
        self.max_pending_requests = max;
        Ok(self)
    }

    /// Builds the pipeline. Its workers start on the tokio runtime of the first group that
    /// submits work, and again on the runtime of the next group to need them once that runtime
    /// has shut down, so a pipeline kept in a `static` serves every runtime that uses it (see
    /// [`WorkerPool`]'s "Runtimes").
    pub fn build(self) -> Pipeline<M> {
        let pool = match (self.pool, self.workers) {
            (Some(pool), _) => pool,
            (None, Some(workers)) => WorkerPool::new(workers),
            (None, None) => {
                WorkerPool::new(std::thread::available_parallelism().map_or(1, usize::from))
            }
        };
        let window = self
            .window
            .unwrap_or_else(|| pool.workers().saturating_mul(4).max(DEFAULT_GROUP_WINDOW));
        Pipeline {
            inner: Arc::new(Inner {
                machine: self.machine,
                pool,
                window,
                dag: self.dag,
                stages: Table::new(),
                starts: Table::new(),
                requests_done: AtomicU64::new(0),
                requests_failed: AtomicU64::new(0),
                item_nanos: AtomicU64::new(u64::MAX),
                drain: Arc::default(),
                admission: Arc::new(Admission::new(
                    self.max_open_groups,
                    self.max_pending_requests,
                )),
            }),
        }
    }
}

impl<M: StateMachine> Pipeline<M> {
    /// Starts building a pipeline around `machine`.
    pub fn builder(machine: M) -> PipelineBuilder<M> {
        PipelineBuilder {
            machine,
            pool: None,
            workers: None,
            window: None,
            dag: false,
            max_open_groups: usize::MAX,
            max_pending_requests: usize::MAX,
        }
    }

    /// Like [`builder`](Self::builder)`(machine).workers(workers).build()`, or an error naming
    /// `workers` if it is zero.
    pub fn try_new(machine: M, workers: usize) -> Result<Self, ConfigError> {
        nonzero("workers", workers as u64)?;
        Ok(Self::builder(machine).workers(workers).build())
    }

    /// Starts a request group: configure it, then [`open`](GroupBuilder::open) it for a
    /// submitter and the group's own result stream. Defaults: unordered, carrying on after
    /// errors.
    pub fn group(&self) -> GroupBuilder<M> {
        GroupBuilder::new(self.clone())
    }

    /// Drains the pipeline for a graceful shutdown: no new groups or submissions are accepted
    /// from now on (`submit` returns [`GroupClosed`](super::GroupClosed), a group opened now is
    /// closed at once), every open group's result stream ends after the requests already
    /// submitted, and this resolves once every group has closed (its results read to the end,
    /// or its stream dropped). A group whose results nobody reads keeps the drain waiting:
    /// bound it with [`tokio::time::timeout`].
    ///
    /// ```
    /// use futures::StreamExt;
    /// use stagepipe::prelude::*;
    ///
    /// # #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)] struct S;
    /// # struct Echo;
    /// # impl StateMachine for Echo {
    /// #     type Stage = S; type Data = u32; type Error = String;
    /// #     fn start(&self) -> S { S }
    /// #     async fn run(&self, _: S, n: u32) -> Result<Next<S, u32>, String> { Ok(Next::Done(n)) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pipeline = Pipeline::builder(Echo).workers(2).build();
    /// let (tx, results) = pipeline.group().ordered().open();
    /// tx.submit(1).await.unwrap();
    /// let reader = tokio::spawn(results.collect::<Vec<_>>());
    /// pipeline.drain().await; // `tx` is still held: the drain ends the group anyway
    /// assert!(tx.submit(2).await.is_err());
    /// assert_eq!(reader.await.unwrap().len(), 1);
    /// # }
    /// ```
    pub async fn drain(&self) {
        self.inner.drain.drain().await;
    }

    /// [`drain`](Self::drain), for at most `limit`: resolves `true` once every group has closed,
    /// or `false` after `limit`, when every group still open is cancelled. Such a group's
    /// result stream yields, at its next poll, a last item
    /// [`StageError::DrainTimedOut`] counting its requests left without a result; its
    /// unfinished requests are abandoned. A result already finished when the drain times out
    /// is still yielded before it. A `limit` too large for the clock waits about 30 years.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it resolves leaves the pipeline draining (as
    /// [`drain`](Self::drain) does) but cancels no group.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use stagepipe::prelude::*;
    ///
    /// # #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)] struct S;
    /// struct Slow;
    /// impl StateMachine for Slow {
    ///     type Stage = S; type Data = u64; type Error = String;
    ///     fn start(&self) -> S { S }
    ///     async fn run(&self, _: S, secs: u64) -> Result<Next<S, u64>, String> {
    ///         tokio::time::sleep(Duration::from_secs(secs)).await;
    ///         Ok(Next::Done(secs))
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let pipeline = Pipeline::builder(Slow).workers(2).build();
    /// let (tx, results) = pipeline.group().ordered().open();
    /// tx.submit(1).await.unwrap();
    /// tx.submit(100).await.unwrap();
    /// let reader = tokio::spawn(async move { results.collect::<Vec<_>>().await });
    /// // One request takes 100 s: the drain gives up after 5 s and cancels the group.
    /// assert!(!pipeline.drain_timeout(Duration::from_secs(5)).await);
    /// let results = reader.await.unwrap();
    /// assert_eq!(results[0].as_ref().ok(), Some(&1));
    /// assert!(matches!(results[1], Err(StageError::DrainTimedOut { abandoned: 1 })));
    /// # }
    /// ```
    pub async fn drain_timeout(&self, limit: Duration) -> bool {
        let at = crate::time::deadline(Instant::now(), limit);
        let drained = tokio::time::timeout_at(at, self.drain()).await.is_ok();
        if !drained {
            self.inner.drain.abort();
        }
        drained
    }

    /// The state machine.
    pub fn machine(&self) -> &M {
        &self.inner.machine
    }

    /// The worker pool the pipeline runs on.
    pub fn pool(&self) -> &WorkerPool {
        &self.inner.pool
    }

    /// The picture of the pipeline so far: its stages with their figures, and every route
    /// requests took (from the start to a stage, between stages, to done or failed), counted.
    /// Render it with [`mermaid`](PipelineGraph::mermaid) or [`dot`](PipelineGraph::dot).
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use stagepipe::GraphNode;
    ///
    /// #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    /// enum Step { Parse, Double }
    ///
    /// struct Machine;
    ///
    /// impl StateMachine for Machine {
    ///     type Stage = Step;
    ///     type Data = i64;
    ///     type Error = String;
    ///     fn start(&self) -> Step { Step::Parse }
    ///     async fn run(&self, stage: Step, n: i64) -> Result<Next<Step, i64>, String> {
    ///         match stage {
    ///             Step::Parse if n < 0 => Err(format!("{n} is negative")),
    ///             Step::Parse if n % 2 == 0 => Ok(Next::Stage(Step::Double, n)),
    ///             Step::Parse => Ok(Next::Done(n)),
    ///             Step::Double => Ok(Next::Done(n * 2)),
    ///         }
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() {
    /// let pipeline = Pipeline::builder(Machine).workers(2).build();
    /// let _: Vec<_> = stream::iter([1, 2, 3, 4, -5]).through(&pipeline).collect().await;
    ///
    /// let graph = pipeline.graph();
    /// assert_eq!(graph.requests(GraphNode::Start, GraphNode::Stage(Step::Parse)), 5);
    /// assert_eq!(graph.requests(GraphNode::Stage(Step::Parse), GraphNode::Stage(Step::Double)), 2);
    /// assert_eq!(graph.requests(GraphNode::Stage(Step::Parse), GraphNode::Done), 2);
    /// assert_eq!(graph.requests(GraphNode::Stage(Step::Parse), GraphNode::Failed), 1);
    /// assert!(graph.mermaid().contains("-->|2|"));
    /// println!("{}", graph.dot());
    /// # }
    /// ```
    pub fn graph(&self) -> PipelineGraph<M::Stage> {
        let i = &self.inner;
        let mut edges = Vec::new();
        i.starts.for_each(|stage, n| {
            edges.push(GraphEdge {
                from: GraphNode::Start,
                to: GraphNode::Stage(stage),
                requests: n.load(Ordering::Relaxed),
            });
        });
        i.stages.for_each(|stage, entry| {
            entry.routes.for_each(|to, n| {
                edges.push(GraphEdge {
                    from: GraphNode::Stage(stage),
                    to,
                    requests: n.load(Ordering::Relaxed),
                });
            });
        });
        PipelineGraph {
            stages: self.stats().stages,
            edges,
        }
    }

    /// Per-stage and per-group figures so far.
    pub fn stats(&self) -> PipelineStats<M::Stage> {
        let i = &self.inner;
        let mut stages = Vec::new();
        i.stages.for_each(|stage, entry| {
            let s = entry.stats.snapshot();
            stages.push((
                stage,
                StageStats {
                    runs: s.runs,
                    errors: s.errors,
                    mean: s.mean(),
                    max: s.max,
                    total: s.busy,
                },
            ));
        });
        let (opened, closed) = i.drain.groups();
        let admission = i.admission.figures();
        PipelineStats {
            stages,
            groups_opened: opened,
            groups_open: opened - closed.min(opened),
            requests_done: i.requests_done.load(Ordering::Relaxed),
            requests_failed: i.requests_failed.load(Ordering::Relaxed),
            groups_waiting: admission.waiting,
            requests_pending: admission.pending,
            groups_refused: admission.refused,
        }
    }
}

impl<M: StateMachine> Inner<M> {
    /// Records one finished run of `stage` that took `took` and sent its request `to`.
    fn record(&self, stage: M::Stage, took: Duration, to: GraphNode<M::Stage>) {
        let entry = || StageEntry {
            stats: Stats::stage(stage),
            routes: Table::new(),
        };
        self.stages.with(stage, entry, |e| {
            e.stats.record_run(took, to == GraphNode::Failed);
            e.routes.with(to, AtomicU64::default, |n| {
                n.fetch_add(1, Ordering::Relaxed)
            });
        });
    }

    /// Runs one request from the machine's first stage to `Done`, timing every stage, and
    /// counts it once it ends.
    pub(super) async fn run_request(
        self: Arc<Self>,
        data: M::Data,
    ) -> Result<M::Data, StageError<M>> {
        let result = self.drive(data).await;
        self.requests_done.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.requests_failed.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn drive(&self, mut data: M::Data) -> Result<M::Data, StageError<M>> {
        // Every call into the machine is inside an unwind guard: `start`, and `run` both while
        // it makes the stage's future (a plain `fn run` may check its input or `assert!` before
        // the future exists) and while the future runs. A panic ends this request only.
        let mut stage = match catch_unwind(AssertUnwindSafe(|| self.machine.start())) {
            Ok(stage) => stage,
            Err(panic) => {
                return Err(StageError::StartPanicked {
                    message: panic_message(&*panic),
                });
            }
        };
        self.starts.with(stage, AtomicU64::default, |n| {
            n.fetch_add(1, Ordering::Relaxed)
        });
        let mut path = Vec::new();
        let mut clock = Instant::now();
        loop {
            if self.dag {
                if path.contains(&stage) {
                    path.push(stage);
                    return Err(StageError::Cycle { path });
                }
                path.push(stage);
            }
            let machine = &self.machine;
            let ran = AssertUnwindSafe(async move { machine.run(stage, data).await })
                .catch_unwind()
                .await;
            let now = Instant::now();
            let to = match &ran {
                Ok(Ok(Next::Stage(next, _))) => GraphNode::Stage(*next),
                Ok(Ok(Next::Done(_))) => GraphNode::Done,
                _ => GraphNode::Failed,
            };
            self.record(stage, now.saturating_duration_since(clock), to);
            clock = now;
            match ran {
                Ok(Ok(Next::Stage(next, d))) => {
                    stage = next;
                    data = d;
                }
                Ok(Ok(Next::Done(d))) => return Ok(d),
                Ok(Err(error)) => return Err(StageError::Failed { stage, error }),
                Err(panic) => {
                    return Err(StageError::Panicked {
                        stage,
                        message: panic_message(&*panic),
                    });
                }
            }
        }
    }
}

/// A stage's figures and where its runs sent their requests.
struct StageEntry<S> {
    stats: Stats,
    routes: Table<GraphNode<S>, AtomicU64, ROUTE_SLOTS>,
}

/// Stages whose figures are found without a lock (a pipeline with more stages still works).
const STAGE_SLOTS: usize = 32;

/// Routes out of one stage found without a lock.
const ROUTE_SLOTS: usize = 8;

/// The message of a panic payload: its string, or empty if it is not a string.
fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// The smallest default window of a request group (measured best for many groups sharing
/// one pool; a lone fan-out stream's default is larger).
const DEFAULT_GROUP_WINDOW: usize = 256;

/// Figures of one stage of a [`Pipeline`], from [`PipelineStats::stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct StageStats {
    /// Times the stage ran, failed runs included. A run counts as soon as it ends (returns,
    /// fails or panics), even if its request is dropped or abandoned later; a run cut short by
    /// cancellation (its group's results dropped, or the group cancelled on an error, while the
    /// stage was running) did not finish and is not counted, here or in the other figures.
    pub runs: u64,
    /// Runs that returned an error or panicked.
    pub errors: u64,
    /// Mean time of a run.
    pub mean: Duration,
    /// Longest run.
    pub max: Duration,
    /// Total time spent in the stage's counted runs.
    pub total: Duration,
}

/// A snapshot of a [`Pipeline`]'s figures: per stage and per group.
///
/// `Display` prints an aligned table, one line per stage.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct PipelineStats<S> {
    /// Each stage that has finished a run, in the order of their first finished runs.
    pub stages: Vec<(S, StageStats)>,
    /// Request groups opened so far (a `through` stream counts as one).
    pub groups_opened: u64,
    /// Request groups whose result stream is still alive.
    pub groups_open: u64,
    /// Requests that finished (with a value or an error); requests cancelled before the end
    /// are not counted.
    pub requests_done: u64,
    /// Requests that finished with an error.
    pub requests_failed: u64,
    /// Admissions ([`GroupBuilder::admit`]) waiting for room now.
    pub groups_waiting: u64,
    /// Requests reserved by the admitted groups open now and not yet answered.
    pub requests_pending: u64,
    /// Admissions refused so far.
    pub groups_refused: u64,
}

impl<S: PartialEq + Copy> PipelineStats<S> {
    /// The figures of `stage`, or `None` if it has not run.
    pub fn stage(&self, stage: S) -> Option<StageStats> {
        self.stages
            .iter()
            .find(|(s, _)| *s == stage)
            .map(|(_, st)| *st)
    }
}

impl<S: fmt::Debug> fmt::Display for PipelineStats<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.stages.iter().map(|(s, _)| format!("{s:?}")).collect();
        let w = names.iter().map(String::len).chain([5]).max().unwrap_or(5);
        writeln!(
            f,
            "{:<w$}  {:>10}  {:>8}  {:>12}  {:>12}  {:>12}",
            "stage", "runs", "errors", "mean", "max", "total"
        )?;
        for (name, (_, st)) in names.iter().zip(&self.stages) {
            writeln!(
                f,
                "{:<w$}  {:>10}  {:>8}  {:>12}  {:>12}  {:>12}",
                name,
                st.runs,
                st.errors,
                format!("{:.1?}", st.mean),
                format!("{:.1?}", st.max),
                format!("{:.1?}", st.total),
            )?;
        }
        write!(
            f,
            "groups: {} opened, {} open; requests: {} done, {} failed",
            self.groups_opened, self.groups_open, self.requests_done, self.requests_failed
        )
    }
}
