//! The shared worker pool: `n` long-lived tasks that run the jobs of many streams fairly.
//!
//! Each stream that runs on the pool registers as a *source* and gets its own job queue. Idle
//! workers take one job at a time from the sources in round-robin order, so a source with a
//! million queued jobs cannot starve another source. A source never has more than its window of
//! jobs in the pool (queued, running or finished but not yet consumed): the window is enforced by
//! the stream that owns the source (see `fan_out.rs`), so nothing here grows without bound.

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::error::{ConfigError, nonzero, or_panic};
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Arc, Mutex, MutexGuard, Weak, sync_thread_local};
#[cfg(stagepipe_loom)]
use crate::sync::{LocalCell as _, LocalRefCell as _};

sync_thread_local! {
    /// The pool (its `Shared`'s address) whose worker is polling a job on this thread, or 0.
    static ON_WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

sync_thread_local! {
    /// A pool (its `Shared`'s address) and the set of its workers (see [`Shared::generation`])
    /// that ran on this thread, or started from it: the thread belongs to the runtime those
    /// workers live on.
    static WORKERS_HERE: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, 0)) };
}

sync_thread_local! {
    /// Whether the job being polled on this thread runs under a slot its own consumer borrowed
    /// (see [`WorkerPool::poll_borrowed`]): its results can reach nobody before it returns.
    static BORROWED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the job being polled on this thread runs under a slot borrowed by its own consumer.
pub(crate) fn borrowed() -> bool {
    BORROWED.get()
}

/// Returns `Pending` once, waking itself: a worker awaits it after waking a consumer, so that
/// a consumer that is a task of the worker's runtime runs before the worker's next job. tokio
/// puts a task woken from one of its threads in that thread's LIFO slot, which no other thread
/// may take: while the worker went on with its next jobs, the consumer would wait for them to
/// end (or for the worker's budget to run out), however long their items spin. A task that
/// wakes itself while it runs is queued behind the others instead, so the thread runs the
/// consumer first, then the worker again (or another thread takes the worker).
fn yield_to_consumer() -> impl Future<Output = ()> {
    let mut yielded = false;
    poll_fn(move |cx| {
        if std::mem::replace(&mut yielded, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

/// Marks this thread as running a job of `shared` until dropped (restoring the previous mark).
struct OnWorker(usize);

impl OnWorker {
    fn enter(shared: &Arc<Shared>) -> Self {
        Self(ON_WORKER.replace(Arc::as_ptr(shared) as usize))
    }
}

impl Drop for OnWorker {
    fn drop(&mut self) {
        ON_WORKER.set(self.0);
    }
}

/// A type-erased unit of work: a chunk of one stream's futures wrapped so that it delivers its
/// own results. It resolves to the waker of a consumer that its results unblocked, which the
/// worker wakes when the job ends, so that a consumer is woken once per chunk rather than once
/// per item. A job whose item has to wait splits off its unstarted items (see [`spill`]).
pub(crate) type Job = Pin<Box<dyn Future<Output = Option<Waker>> + Send + 'static>>;

/// A pool of long-lived worker tasks shared by every stream and request group that holds a clone.
///
/// At most [`workers`](WorkerPool::workers) user futures run at once across every stream sharing
/// the pool; each worker runs one future at a time to completion, so the pool uses every thread of
/// a multi-threaded runtime for CPU-bound work, and `workers` is the concurrency cap for I/O-bound
/// work. Streams are served fairly: workers take jobs from the streams in round-robin order.
///
/// The workers are spawned on the current tokio runtime when the first job arrives, so a pool can
/// be built before the runtime is entered, but it must be *used* inside one. Cloning the handle
/// shares the workers; when the last handle (and the last stream using the pool) is dropped, the
/// workers stop.
///
/// A stream of light items (measured at under 2 µs each) does not always wait for a worker:
/// while a slot is free (fewer than `workers` futures run), its consumer runs the stream's own
/// queued futures itself, under that slot, which saves the hand-off to a worker thread and
/// back (it costs more than such items do). Heavier items always go to the workers. Such a slot counts against the cap like a worker; a future that has to
/// wait is handed to a worker together with its slot. The consumer does this only on a thread
/// of the runtime the workers live on (see below), so its futures run where they would on a
/// worker.
///
/// # Runtimes
///
/// A pool serves whichever runtime polls it, so a pool (or a [`Pipeline`](crate::Pipeline))
/// kept in a `static` works in every runtime that uses it, one after another, as each
/// `#[tokio::test]` builds its own. The workers live on the runtime whose stream found the pool
/// without live workers: its first use, or the first use after the runtime they ran on shut
/// down (its workers die with it). Nothing is lost when that happens: the jobs of streams that
/// died with the runtime are dropped with them, and the jobs of a stream that outlives it,
/// queued or half-run on a worker that was dropped, stay queued and run (or resume) on the fresh
/// workers. A stream waiting on workers that died is woken to start them.
///
/// While two runtimes are alive at once, the workers stay on the one that started them, which
/// serves the streams of both: their futures run on its threads, and the timers and tasks they
/// create belong to it. If it is a current-thread runtime, it runs them only while it is driven
/// (inside its `block_on`), and the other runtime's streams wait meanwhile. A future that was
/// half-run there when that runtime shut down resumes on the next one with whatever timer or
/// I/O resource it took from the dead one, which tokio then refuses: polling such a timer
/// panics, and the panic reaches the stream's consumer at that item's place. Runtimes that
/// share a pool at the same time (tests run in parallel, say) are best given one pool each
/// when their futures use timers or I/O.
///
/// Polling a stream of a pool that has no live workers outside any tokio runtime panics with a
/// message saying so; the pool is left as it was and works inside a runtime afterwards.
///
/// # Panics in user code
///
/// Every call into a user future on a worker is guarded: a panic while it is polled, or while it
/// is dropped after it finished, reaches the stream's consumer at that item's place (as inline
/// code would); a panic while a cancelled future is dropped (its stream is gone) is swallowed,
/// after the panic hook has reported it. A worker never dies of user code.
///
/// # Nested use
///
/// A future running on the pool may itself fan out on the same pool (library code that was
/// handed the pool does not know its caller). Such a nested stream never waits for a job of its
/// own that no worker has started: when it would wait, it first yields once so that idle workers
/// can take its jobs, then runs the jobs still queued on its own worker, one at a time (the outer
/// future waits meanwhile, so the worker still runs one future at a time). So nesting completes
/// even when every worker is busy with an outer item (on one worker, the nested stream simply
/// runs inline), and at most `workers` futures still make progress at once. This holds for streams polled
/// inside a job of the pool; a nested stream moved into a separately spawned task that an outer
/// item awaits is an ordinary consumer and can still exhaust the pool.
///
/// [`WorkerPool::adaptive`] builds a pool that sizes itself between two bounds, for I/O-bound
/// work whose best concurrency is not known in advance.
///
/// A plain number converts into a private pool wherever a pool is accepted:
/// `s.fan_out_ordered(4, f)` is `s.fan_out_ordered(WorkerPool::new(4), f)`.
///
/// # Examples
///
/// Two streams share one pool of two workers:
///
/// ```
/// use futures::{stream, StreamExt};
/// use stagepipe::prelude::*;
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() {
/// let pool = WorkerPool::new(2);
/// let a = stream::iter(0..100u32).fan_out_ordered(&pool, |x| async move { x * 2 });
/// let b = stream::iter(0..100u32).fan_out(&pool, |x| async move { x + 1 });
/// let (a, b): (Vec<u32>, Vec<u32>) = tokio::join!(a.collect(), b.collect());
/// assert_eq!(a, (0..100).map(|x| x * 2).collect::<Vec<_>>());
/// assert_eq!(b.len(), 100);
/// # }
/// ```
#[derive(Clone)]
pub struct WorkerPool {
    handle: Arc<Handle>,
}

/// The owner of the workers: dropping the last one shuts them down.
struct Handle {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    /// The workers a fresh set starts with: all of a fixed pool's, an adaptive pool's `min`.
    workers: usize,
    /// The most workers alive at once: `workers` for a fixed pool.
    max: usize,
    /// Whether the pool sizes itself (see [`WorkerPool::adaptive`]).
    adaptive: bool,
    /// Workers of an adaptive pool whose job is waiting on a pending future (see
    /// [`Controller`]). Untouched by a fixed pool.
    waiting: AtomicUsize,
    /// Whether the runtime of an adaptive pool's workers refused a timer (no time driver): its
    /// idle workers then stay.
    untimed: AtomicBool,
    /// Workers running jobs now.
    busy: AtomicUsize,
    /// Sets of workers started so far: tells the runtime of the live set from the runtime of
    /// one that died (see [`WorkerPool::serves_here`]).
    generation: AtomicU64,
    /// A copy of [`State::live`], written under the lock, read without it by a consumer about
    /// to wait (see [`WorkerPool::keep_serving`]).
    live: AtomicUsize,
    state: Mutex<State>,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::PoolMetrics,
}

#[derive(Default)]
struct State {
    /// Workers alive: spawned and not dropped yet. Zero before the first job and after the
    /// runtime they ran on shut down; the next stream to need them spawns a fresh set.
    live: usize,
    /// Slots in use: workers holding a job, plus slots borrowed by consumers that run their own
    /// jobs on their own task (see [`WorkerPool::borrow_job`]). Never above [`Shared::cap`]:
    /// this is the cap on user futures running at once.
    held: usize,
    /// Jobs that a consumer started under a borrowed slot and that have to wait, handed over
    /// with their slot (still counted in `held`) for the next free worker to resume. Workers
    /// take them before any queued job, whatever the cap: the slot comes with the job.
    handed: VecDeque<(SourceId, Job)>,
    shutdown: bool,
    /// Job queues by source id; `None` marks a free id.
    sources: Vec<Option<Queue>>,
    free_ids: Vec<usize>,
    /// Registrations so far: tells a source apart from a later one that reuses its id.
    epochs: u64,
    /// Sources that have queued jobs, each listed at most once, served round-robin. An entry of
    /// a source that is gone (or whose jobs were taken back) is skipped when it comes up.
    ready: VecDeque<SourceId>,
    /// Wakers of idle workers, by worker index.
    parked: Vec<Option<Waker>>,
    parked_ids: Vec<usize>,
    /// Worker indexes not in use by a live worker of an adaptive pool (indexes at or above
    /// `parked.len()` are free too). Unused by a fixed pool.
    free_workers: Vec<usize>,
    /// The sizing controller of an adaptive pool.
    controller: Option<Controller>,
}

/// One source's queued jobs.
struct Queue {
    jobs: VecDeque<Job>,
    epoch: u64,
    /// The stream that owns the source, woken when the workers it may wait on are gone.
    consumer: Weak<dyn Consumer>,
    /// Worker time owed, in nanoseconds: charged for every job the source ran, repaid by one
    /// [`QUANTUM`] each time its turn is skipped because it is in debt.
    debt: u64,
    /// Whether the source has an entry in `ready`.
    listed: bool,
}

/// The worker time a source in debt is forgiven each time its turn comes round. Sources are
/// served round-robin by time, not by job: a source whose jobs took long waits until the others
/// have had as much (deficit round-robin). Small against a job's usual time, so that a source of
/// short jobs loses little of its turn; many turns in a row cost one extra pass (`next_job`).
const QUANTUM: u64 = 20_000;

/// The most debt a source carries, so that one very long job does not push it back for long.
const MAX_DEBT: u64 = 100_000_000;

/// The consumer of a source, as the pool sees it.
pub(crate) trait Consumer: Send + Sync {
    /// Wakes the consumer if it waits: the workers running its jobs are gone, so it has to
    /// start fresh ones (see [`WorkerPool::keep_serving`]).
    fn wake_consumer(&self);
}

/// A registered source: its slot, and the registration it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceId {
    id: usize,
    epoch: u64,
}

impl State {
    /// The queue of `source`, if it is still registered.
    fn queue(&mut self, source: SourceId) -> Option<&mut VecDeque<Job>> {
        match self.sources.get_mut(source.id) {
            Some(Some(queue)) if queue.epoch == source.epoch => Some(&mut queue.jobs),
            _ => None,
        }
    }

    /// Lists `source` as ready (it has queued jobs) and takes the wakers of up to `n` idle
    /// workers (no more than there are free slots: a worker woken without one parks again).
    fn wake_for(&mut self, source: SourceId, n: usize, cap: usize, wake: &mut Vec<Waker>) {
        if let Some(Some(queue)) = self.sources.get_mut(source.id) {
            if queue.epoch == source.epoch && !queue.listed {
                queue.listed = true;
                self.ready.push_back(source);
            }
        }
        self.wake_idle(n.min(cap.saturating_sub(self.held)), wake);
    }

    /// Takes the wakers of up to `n` idle workers.
    fn wake_idle(&mut self, n: usize, wake: &mut Vec<Waker>) {
        for _ in 0..n {
            let Some(index) = self.parked_ids.pop() else {
                break;
            };
            if let Some(waker) = self.parked[index].take() {
                wake.push(waker);
            }
        }
    }
}

impl WorkerPool {
    /// Creates a pool of `workers` long-lived worker tasks.
    ///
    /// # Panics
    ///
    /// Panics if `workers` is zero. [`WorkerPool::try_new`] returns an error instead.
    #[track_caller]
    pub fn new(workers: usize) -> Self {
        or_panic(Self::try_new(workers))
    }

    /// Creates a pool of `workers` worker tasks, or an error naming `workers` if it is zero.
    ///
    /// ```
    /// use stagepipe::WorkerPool;
    ///
    /// assert_eq!(WorkerPool::try_new(3).unwrap().workers(), 3);
    /// assert!(WorkerPool::try_new(0).unwrap_err().to_string().contains("workers"));
    /// ```
    pub fn try_new(workers: usize) -> Result<Self, ConfigError> {
        nonzero("workers", workers as u64)?;
        let state = State {
            parked: (0..workers).map(|_| None).collect(),
            ..State::default()
        };
        Ok(Self::build(workers, workers, state))
    }

    /// Creates a pool that sizes itself between `min` and `max` workers: it starts `min`,
    /// adds workers while they raise throughput and retires the ones that idle.
    ///
    /// Meant for I/O-bound work, whose futures mostly wait: a worker whose future is pending
    /// keeps it, so concurrency is the number of workers, and the right number depends on the
    /// latency of whatever the futures wait for. An adaptive pool finds it instead of being told.
    /// For CPU-bound work it stays where it started (see below): a fixed pool of one worker per
    /// runtime thread is the right size there.
    ///
    /// # How it sizes itself
    ///
    /// A hill-climbing controller, in the manner of the .NET thread pool's "hill climbing"
    /// (Fuentes, Hellerstein et al., *Optimizing concurrency levels in the .NET ThreadPool*,
    /// 2008), reduced to single steps of one worker:
    ///
    /// * Throughput is measured over samples of job ends (a job is a chunk of one stream's
    ///   items): a sample ends at the first job end after at least
    ///   4 × [`workers`](Self::workers) (and at least 8) job ends, and its throughput is job ends
    ///   per second of tokio's clock (so that it runs on a paused clock in tests).
    /// * **Grow**: at the end of a sample, one worker is added (up to `max`) if every worker is
    ///   busy (none is parked), jobs are queued, and at least one worker's job is *waiting on a
    ///   pending future*. A worker that is polling (CPU-bound work) never counts as waiting, so
    ///   CPU-bound work never grows the pool, whatever the timing.
    /// * **Keep or undo**: the sample after a step is compared with the one before it. With `n`
    ///   workers before the step, the step added `1/n` of the workers; it is kept if throughput
    ///   rose by at least half of that (`1/(2n)`), so linear scaling keeps growing and a
    ///   plateau stops it (a flat margin such as 10% would stop linear scaling at ten workers).
    ///   Otherwise the step is undone (one worker retires at its next job end) and growth stops
    ///   until the load changes: a sample's throughput moves more than 10% from where it
    ///   stopped, or a worker runs out of work and parks.
    /// * **Shrink**: a worker that has been parked with nothing to do for one second (tokio's
    ///   clock) retires, as long as more than `min` are alive.
    ///
    /// [`workers`](Self::workers) reports the current count, which moves;
    /// [`max_workers`](Self::max_workers) the bound. Each change is logged through `tracing`
    /// at DEBUG level, target `stagepipe::pool`; with feature `metrics`, the
    /// `stagepipe_pool_workers` gauge follows the count.
    ///
    /// A fixed pool ([`new`](Self::new)) does none of this: its workers run a loop without
    /// the sampling, the counting of waiting jobs or the idle timer.
    ///
    /// The idle timer is a tokio timer, so the runtime that runs the workers needs its time
    /// driver (`enable_time` or `enable_all` on a runtime builder; `#[tokio::main]` and
    /// `#[tokio::test]` enable it). Without it the pool still grows, but its idle workers stay
    /// (the panic hook reports tokio's refusal of the timer).
    ///
    /// # Panics
    ///
    /// Panics if `min` is zero or greater than `max`. [`WorkerPool::try_adaptive`] returns an
    /// error instead.
    ///
    /// # Examples
    ///
    /// Requests that each wait 10 ms: the pool grows from one worker to serve them
    /// concurrently.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let pool = WorkerPool::adaptive(1, 16);
    /// let started = tokio::time::Instant::now();
    /// let out: Vec<u32> = stream::iter(0..400u32)
    ///     .fan_out(&pool, |x| async move {
    ///         tokio::time::sleep(Duration::from_millis(10)).await;
    ///         x
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(out.len(), 400);
    /// // One worker would have taken 4 s.
    /// assert!(started.elapsed() < Duration::from_secs(2));
    /// assert!(pool.workers() > 1 && pool.workers() <= pool.max_workers());
    /// # }
    /// ```
    #[track_caller]
    pub fn adaptive(min: usize, max: usize) -> Self {
        or_panic(Self::try_adaptive(min, max))
    }

    /// Creates a pool that sizes itself between `min` and `max` workers (see
    /// [`WorkerPool::adaptive`]), or an error naming `min` if it is zero or above `max` (as
    /// [`InFlightLimit::try_adaptive`](crate::InFlightLimit::try_adaptive) does).
    ///
    /// ```
    /// use stagepipe::WorkerPool;
    ///
    /// let pool = WorkerPool::try_adaptive(2, 8).unwrap();
    /// assert_eq!((pool.workers(), pool.max_workers()), (2, 8));
    /// assert_eq!(WorkerPool::try_adaptive(0, 8).unwrap_err().parameter(), "min");
    /// assert_eq!(WorkerPool::try_adaptive(4, 2).unwrap_err().parameter(), "min");
    /// ```
    pub fn try_adaptive(min: usize, max: usize) -> Result<Self, ConfigError> {
        nonzero("min", min as u64)?;
        if max < min {
            return Err(ConfigError::new("min", "must be at most `max`"));
        }
        // Worker indexes (and their parking slots) are taken as the pool grows.
        let state = State {
            controller: Some(Controller::default()),
            ..State::default()
        };
        Ok(Self::build(min, max, state))
    }

    fn build(workers: usize, max: usize, state: State) -> Self {
        let shared = Arc::new(Shared {
            workers,
            max,
            adaptive: state.controller.is_some(),
            waiting: AtomicUsize::new(0),
            untimed: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            state: Mutex::new(state),
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::PoolMetrics::new(workers),
        });
        Self {
            handle: Arc::new(Handle { shared }),
        }
    }

    /// The number of workers: at most this many user futures run at once on the pool.
    ///
    /// For an [adaptive](Self::adaptive) pool, the workers alive now (`min` while none are,
    /// before the first job or after their runtime shut down): it moves as the pool grows and
    /// shrinks, between `min` and [`max_workers`](Self::max_workers).
    pub fn workers(&self) -> usize {
        let shared = &self.handle.shared;
        if shared.adaptive {
            shared.live.load(Ordering::Relaxed).max(shared.workers)
        } else {
            shared.workers
        }
    }

    /// The most workers the pool runs at once: [`workers`](Self::workers) for a fixed pool,
    /// `max` for an [adaptive](Self::adaptive) one.
    ///
    /// ```
    /// use stagepipe::WorkerPool;
    ///
    /// assert_eq!(WorkerPool::new(3).max_workers(), 3);
    /// assert_eq!(WorkerPool::adaptive(1, 32).max_workers(), 32);
    /// ```
    pub fn max_workers(&self) -> usize {
        self.handle.shared.max
    }

    /// How many workers are running jobs now (at most [`workers`](Self::workers)).
    pub fn busy(&self) -> usize {
        self.handle.shared.busy.load(Ordering::Relaxed)
    }

    /// The default window of a stream on this pool: how many of its items may be in the pool at
    /// once (queued, running, or finished and waiting to be consumed).
    pub(crate) fn default_window(&self) -> usize {
        self.max_workers().saturating_mul(4).max(DEFAULT_MIN_WINDOW)
    }

    /// Registers a new source, owned by `consumer`.
    pub(crate) fn register(&self, consumer: Weak<dyn Consumer>) -> SourceId {
        let mut state = self.handle.shared.lock();
        state.epochs += 1;
        let queue = Queue {
            jobs: VecDeque::new(),
            epoch: state.epochs,
            consumer,
            debt: 0,
            listed: false,
        };
        let source = SourceId {
            id: state.free_ids.pop().unwrap_or(state.sources.len()),
            epoch: queue.epoch,
        };
        if source.id == state.sources.len() {
            state.sources.push(Some(queue));
        } else {
            state.sources[source.id] = Some(queue);
        }
        source
    }

    /// Whether the caller's thread belongs to the runtime that the pool's live workers run on
    /// (one of them ran a job on it, or they were started from it). Only there does a consumer
    /// borrow a slot ([`Self::borrow_job`]): the futures it runs then belong to the workers'
    /// runtime as if a worker ran them (see "Runtimes" above). Errs on the side of `false`: a
    /// thread of that runtime that no worker has used yet says no.
    pub(crate) fn serves_here(&self) -> bool {
        let shared = &self.handle.shared;
        WORKERS_HERE.get()
            == (
                Arc::as_ptr(shared) as usize,
                shared.generation.load(Ordering::Relaxed),
            )
    }

    /// Whether the caller runs inside a job of one of this pool's own workers: a stream polled
    /// there is nested on its own pool, and must not wait for jobs that no worker has started.
    pub(crate) fn on_worker(&self) -> bool {
        ON_WORKER.get() == Arc::as_ptr(&self.handle.shared) as usize
    }

    /// Takes back the jobs of `source` that no worker has started yet, into `out`; returns
    /// whether there were any.
    pub(crate) fn reclaim(&self, source: SourceId, out: &mut VecDeque<Job>) -> bool {
        let mut state = self.handle.shared.lock();
        let Some(queue) = state.queue(source) else {
            return false;
        };
        if queue.is_empty() {
            return false;
        }
        #[cfg(feature = "metrics")]
        self.handle.shared.metrics.dequeued(queue.len());
        out.extend(queue.drain(..));
        true
    }

    /// Removes a source; its queued jobs are dropped (outside the lock).
    pub(crate) fn unregister(&self, source: SourceId) {
        let (jobs, handed) = {
            let mut state = self.handle.shared.lock();
            if state.queue(source).is_none() {
                return;
            }
            // Handed-over jobs of the source give their slots back with them.
            let mut handed = VecDeque::new();
            if !state.handed.is_empty() {
                let (theirs, others) = std::mem::take(&mut state.handed)
                    .into_iter()
                    .partition(|(of, _)| *of == source);
                state.handed = others;
                handed = theirs;
                state.held -= handed.len();
                #[cfg(feature = "metrics")]
                self.handle.shared.metrics.dequeued(handed.len());
            }
            let jobs = state.sources[source.id].take();
            #[cfg(feature = "metrics")]
            self.handle
                .shared
                .metrics
                .dequeued(jobs.as_ref().map_or(0, |q| q.jobs.len()));
            state.free_ids.push(source.id);
            (jobs, handed)
        };
        drop(handed);
        drop(jobs);
    }

    /// Queues `jobs` (drained from the buffer) for `source` and wakes idle workers.
    pub(crate) fn submit(&self, source: SourceId, jobs: &mut Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let shared = &self.handle.shared;
        let mut wake = Vec::new();
        let start = {
            let mut state = shared.lock();
            let start = match shared.claim_start(&mut state) {
                Ok(start) => start,
                Err(NoRuntime) => {
                    drop(state);
                    NoRuntime.panic()
                }
            };
            let n = jobs.len();
            #[cfg(feature = "metrics")]
            shared.metrics.queued(n);
            let queue = state.queue(source).expect("source registered");
            queue.extend(jobs.drain(..));
            let cap = shared.cap(&state);
            state.wake_for(source, n, cap, &mut wake);
            start
        };
        if let Some(runtime) = start {
            shared.spawn_workers(&runtime);
        }
        for waker in wake {
            waker.wake();
        }
    }

    /// Called by a consumer about to wait for its jobs (its waker registered where a finishing
    /// job wakes it): if the workers are gone (their runtime shut down), starts fresh ones on
    /// the current runtime, which take the jobs still queued. One relaxed load while they live.
    ///
    /// A consumer waiting when the last worker goes is woken (see [`Consumer`]), and so gets
    /// here again.
    #[inline]
    pub(crate) fn keep_serving(&self) {
        if self.handle.shared.live.load(Ordering::Relaxed) == 0 {
            self.handle.shared.restart();
        }
    }

    /// Puts `jobs` back at the front of `source`'s queue (see [`Shared::requeue`]).
    pub(crate) fn requeue(&self, source: SourceId, jobs: Vec<Job>) {
        self.handle.shared.requeue(source, jobs);
    }

    /// Borrows a slot for the consumer of `source` and takes the first of its jobs that no
    /// worker has started, for the consumer to run on its own task (see [`Self::poll_borrowed`])
    /// instead of waiting for a worker to: no hand-off between threads. `None` if every slot
    /// is in use (workers and other consumers hold them all) or no job of `source` is queued.
    ///
    /// The slot counts against the cap like a worker's: no worker starts a job while it is
    /// borrowed and every other slot is in use. The consumer gives it back with
    /// [`Self::give_back`] before it returns from its poll, so a slot never waits on a consumer
    /// that is not polled.
    pub(crate) fn borrow_job(&self, source: SourceId) -> Option<Job> {
        let shared = &self.handle.shared;
        let mut state = shared.lock();
        if state.held >= shared.cap(&state) {
            return None;
        }
        let job = state.queue(source)?.pop_front()?;
        state.held += 1;
        #[cfg(feature = "metrics")]
        shared.metrics.dequeued(1);
        Some(job)
    }

    /// Polls a borrowed job on the consumer's task as a worker would: a stream polled inside it
    /// is nested on this pool (the job holds a slot). Returns the poll and the jobs it split
    /// off.
    pub(crate) fn poll_borrowed(
        &self,
        job: &mut Job,
        cx: &mut Context<'_>,
    ) -> (Poll<Option<Waker>>, Vec<Job>) {
        let _on = OnWorker::enter(&self.handle.shared);
        let outer = BORROWED.replace(true);
        let poll = poll_collecting(job, cx);
        BORROWED.set(outer);
        poll
    }

    /// Gives back the slot borrowed by [`Self::borrow_job`], and the jobs the borrowed job split
    /// off (put back at the front of `source`'s queue). If the job has to wait (`pending`), it
    /// keeps the slot, as it would on a worker: both are handed over to the next free worker,
    /// which resumes the job (see [`State::handed`]); a worker is free, since the slot was. If
    /// `next` (and the job finished), borrows the slot again at once for the next queued job of
    /// `source`, unless a worker is parked while another stream's jobs are queued (the slot is
    /// its turn). Otherwise wakes idle workers for the jobs queued that the slot kept from them.
    pub(crate) fn give_back(
        &self,
        source: SourceId,
        mut pending: Option<Job>,
        mut spilled: Vec<Job>,
        next: bool,
    ) -> Option<Job> {
        let shared = &self.handle.shared;
        let mut wake = Vec::new();
        let next = {
            let mut state = shared.lock();
            let others = !state.parked_ids.is_empty() && state.queued_besides(source);
            let cap = shared.cap(&state);
            if state.queue(source).is_none() {
                // The source is gone, and so are its jobs (dropped below, outside the lock).
                state.held -= 1;
                None
            } else {
                let waits = pending.is_some();
                match pending.take() {
                    Some(job) => {
                        #[cfg(feature = "metrics")]
                        shared.metrics.queued(1);
                        state.handed.push_back((source, job));
                        state.wake_idle(1, &mut wake);
                    }
                    None => state.held -= 1,
                }
                #[cfg(feature = "metrics")]
                shared.metrics.queued(spilled.len());
                let queue = state.queue(source).expect("source registered");
                for job in spilled.drain(..).rev() {
                    queue.push_front(job);
                }
                let job = match next && !others && !waits {
                    true => queue.pop_front(),
                    false => None,
                };
                let queued = queue.len();
                if job.is_some() {
                    state.held += 1;
                    #[cfg(feature = "metrics")]
                    shared.metrics.dequeued(1);
                }
                if queued > 0 {
                    state.wake_for(source, queued, cap, &mut wake);
                } else if others {
                    let free = cap.saturating_sub(state.held);
                    state.wake_idle(free.min(1), &mut wake);
                }
                job
            }
        };
        drop((pending, spilled));
        for waker in wake {
            waker.wake();
        }
        next
    }
}

/// The pool needs workers and no tokio runtime is there to run them.
struct NoRuntime;

impl NoRuntime {
    #[cold]
    fn panic(self) -> ! {
        panic!(
            "a stagepipe WorkerPool was used outside a tokio runtime: its workers are spawned on \
             the runtime that polls its streams, so poll the stream (or read the group's results) \
             inside one, e.g. in `#[tokio::main]`, `#[tokio::test]` or `Runtime::block_on`"
        );
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (user code runs outside it), but stay
        // usable if it ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If no worker is alive, counts a fresh set in and returns the current runtime to spawn
    /// it on (outside the lock: see [`Shared::spawn_workers`]). Leaves the pool as it was when
    /// there is no runtime.
    fn claim_start(&self, state: &mut State) -> Result<Option<tokio::runtime::Handle>, NoRuntime> {
        if state.live > 0 || state.shutdown {
            return Ok(None);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NoRuntime)?;
        if let Some(controller) = &mut state.controller {
            // No worker is alive: every index is free; the fresh set takes `0..workers`.
            controller.restart();
            self.untimed.store(false, Ordering::Relaxed);
            let slots = state.parked.len().max(self.workers);
            state.parked.resize_with(slots, || None);
            state.free_workers = (self.workers..slots).rev().collect();
            tracing::debug!(
                target: "stagepipe::pool",
                workers = self.workers,
                "adaptive pool: starting workers"
            );
        }
        self.set_live(state, self.workers);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // This thread belongs to the runtime the fresh set is spawned on.
        WORKERS_HERE.set((self as *const Self as usize, generation));
        Ok(Some(runtime))
    }

    /// Counts `live` workers alive (under the lock), keeping the lock-free copy and, for an
    /// adaptive pool, the workers gauge in step.
    fn set_live(&self, state: &mut State, live: usize) {
        state.live = live;
        self.live.store(live, Ordering::Release);
        #[cfg(feature = "metrics")]
        if self.adaptive {
            self.metrics.set_workers(live.max(self.workers));
        }
    }

    /// Starts a fresh set of workers if none is alive (see [`WorkerPool::keep_serving`]).
    #[cold]
    fn restart(self: &Arc<Self>) {
        let mut state = self.lock();
        match self.claim_start(&mut state) {
            Ok(None) => {}
            Ok(Some(runtime)) => {
                drop(state);
                self.spawn_workers(&runtime);
            }
            Err(NoRuntime) => {
                drop(state);
                NoRuntime.panic();
            }
        }
    }

    /// Spawns the set of workers counted in by [`Shared::claim_start`], without the lock held:
    /// a runtime that is shutting down drops each one at once, and its [`Presence`] then takes
    /// the lock to count it out.
    fn spawn_workers(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        for index in 0..self.workers {
            let me = Presence::new(self.clone(), index);
            if self.adaptive {
                runtime.spawn(run::<true>(me));
            } else {
                runtime.spawn(worker(me));
            }
        }
        // Workers die only with their runtime (or the pool): none left already means that the
        // runtime refused them, and waiting on it would never end.
        if self.lock().live == 0 {
            panic!(
                "a stagepipe WorkerPool was used on a tokio runtime that is shutting down, which \
                 cannot run its workers: poll the stream on a runtime that is running"
            );
        }
    }

    /// Puts `jobs`, split off a job that has to wait, back at the front of `source`'s queue, in
    /// order, for idle workers to take. Dropped (outside the lock) if the source is gone.
    fn requeue(&self, source: SourceId, mut jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut wake = Vec::new();
        {
            let mut state = self.lock();
            if let Some(queue) = state.queue(source) {
                let n = jobs.len();
                #[cfg(feature = "metrics")]
                self.metrics.queued(n);
                for job in jobs.drain(..).rev() {
                    queue.push_front(job);
                }
                let cap = self.cap(&state);
                state.wake_for(source, n, cap, &mut wake);
            }
        }
        drop(jobs);
        for waker in wake {
            waker.wake();
        }
    }

    /// The cap on slots in use ([`State::held`]): the workers alive (a fixed pool's `workers`
    /// while none are).
    fn cap(&self, state: &State) -> usize {
        state.live.max(self.workers)
    }

    /// A worker's job ended after `nanos` of worker time: charges `source` for it and gives
    /// the worker's slot back (`holding`), before the worker wakes the job's consumer, which
    /// may then borrow the slot.
    fn end_job(&self, source: SourceId, nanos: u64, holding: &mut bool) {
        let mut state = self.lock();
        state.charge(source, nanos);
        if std::mem::take(holding) {
            state.held -= 1;
        }
    }

    /// The next job for worker `index`, which then holds a slot (`holding`): none is taken
    /// while every slot is in use. Returns `Ready(None)` on shutdown, or `Pending` after
    /// parking the worker.
    ///
    /// A worker of an adaptive pool may also be told to retire (`Ready(None)`, with `counted`
    /// cleared: it is already counted out), to undo a growth step that did not pay.
    fn poll_job<const ADAPTIVE: bool>(
        &self,
        index: usize,
        holding: &mut bool,
        counted: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(SourceId, Job)>> {
        let mut state = self.lock();
        debug_assert!(!*holding, "a worker asks for a job holding a slot");
        if state.shutdown {
            return Poll::Ready(None);
        }
        let handed = state.handed.pop_front();
        if handed.is_some() {
            // It brings its slot: `held` stays.
            *holding = true;
            #[cfg(feature = "metrics")]
            self.metrics.dequeued(1);
            if state.parked[index].take().is_some() {
                state.parked_ids.retain(|&i| i != index);
            }
            return Poll::Ready(handed);
        }
        if ADAPTIVE && self.retire_undone(&mut state, index) {
            *counted = false;
            return Poll::Ready(None);
        }
        let next = match state.held < self.cap(&state) {
            true => state.next_job(),
            // Every slot is in use (consumers borrowed some): whoever gives one back wakes a
            // parked worker if jobs are queued.
            false => None,
        };
        if let Some(next) = next {
            state.held += 1;
            *holding = true;
            #[cfg(feature = "metrics")]
            self.metrics.dequeued(1);
            // Woken for another reason while parked: a submitter must not count on this worker.
            if state.parked[index].take().is_some() {
                state.parked_ids.retain(|&i| i != index);
            }
            return Poll::Ready(Some(next));
        }
        if ADAPTIVE {
            if let Some(controller) = &mut state.controller {
                // Out of work: the load changed.
                controller.stalled = None;
            }
        }
        let slot = &mut state.parked[index];
        match slot {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => w.clone_from(cx.waker()),
            None => {
                *slot = Some(cx.waker().clone());
                state.parked_ids.push(index);
            }
        }
        Poll::Pending
    }
}

impl State {
    /// Charges `source` for `nanos` of worker time.
    fn charge(&mut self, source: SourceId, nanos: u64) {
        if let Some(Some(queue)) = self.sources.get_mut(source.id) {
            if queue.epoch == source.epoch {
                queue.debt = queue.debt.saturating_add(nanos).min(MAX_DEBT);
            }
        }
    }

    /// The next job, from the ready sources in round-robin order (deficit round-robin by time):
    /// a source whose turn comes is forgiven one [`QUANTUM`] of its debt and served if that
    /// clears it, else it waits for its next turn. If a whole round clears nobody, every ready
    /// source is forgiven the smallest remaining debt at once (as many rounds as that takes),
    /// so picking a job never takes more than two passes over the ready sources.
    fn next_job(&mut self) -> Option<(SourceId, Job)> {
        let mut least = u64::MAX;
        for _ in 0..self.ready.len() {
            let source = self.ready.pop_front()?;
            let Some(queue) = self.listed_queue(source) else {
                continue;
            };
            queue.debt = queue.debt.saturating_sub(QUANTUM);
            if queue.debt == 0 {
                return Some(self.take_from(source));
            }
            least = least.min(queue.debt);
            self.ready.push_back(source);
        }
        if self.ready.is_empty() {
            return None;
        }
        let mut first = None;
        for (at, &source) in self.ready.iter().enumerate() {
            if let Some(Some(queue)) = self.sources.get_mut(source.id) {
                if queue.epoch == source.epoch {
                    queue.debt = queue.debt.saturating_sub(least);
                    if queue.debt == 0 && first.is_none() && !queue.jobs.is_empty() {
                        first = Some(at);
                    }
                }
            }
        }
        let source = self.ready.remove(first?)?;
        self.listed_queue(source)?;
        Some(self.take_from(source))
    }

    /// The queue of a source taken from `ready`, if it is still there and has jobs; otherwise
    /// its entry is dropped (and the source, if still there, is no longer listed).
    fn listed_queue(&mut self, source: SourceId) -> Option<&mut Queue> {
        let queue = self.sources.get_mut(source.id)?.as_mut()?;
        if queue.epoch != source.epoch {
            return None;
        }
        if queue.jobs.is_empty() {
            queue.listed = false;
            return None;
        }
        Some(queue)
    }

    /// Takes the next job of `source` (just removed from `ready`, with jobs queued), listing the
    /// source again at the end of `ready` if it has more.
    fn take_from(&mut self, source: SourceId) -> (SourceId, Job) {
        let queue = self.sources[source.id]
            .as_mut()
            .expect("a listed source is registered");
        let job = queue.jobs.pop_front().expect("a listed source has a job");
        if queue.jobs.is_empty() {
            queue.listed = false;
        } else {
            self.ready.push_back(source);
        }
        (source, job)
    }
}

sync_thread_local! {
    /// Jobs split off the job being polled on this thread because one of its items has to wait
    /// (see `fan_out.rs`), collected by whoever polls it: `None` when nobody collects.
    static SPILL: std::cell::RefCell<Option<Vec<Job>>> = const { std::cell::RefCell::new(None) };
}

/// Polls `job`, collecting the jobs it splits off while it is polled.
pub(crate) fn poll_collecting(
    job: &mut Job,
    cx: &mut Context<'_>,
) -> (Poll<Option<Waker>>, Vec<Job>) {
    let outer = SPILL.replace(Some(Vec::new()));
    // Jobs guard every call into user code themselves (see `fan_out.rs`); this second guard
    // only keeps a worker alive should a panic ever get through.
    let poll = std::panic::catch_unwind(AssertUnwindSafe(|| job.as_mut().poll(cx)))
        .unwrap_or(Poll::Ready(None));
    let spilled = SPILL.replace(outer).unwrap_or_default();
    (poll, spilled)
}

/// Whether whoever polls the current job collects the jobs it splits off.
pub(crate) fn collecting() -> bool {
    SPILL.with_borrow(Option::is_some)
}

/// Hands `job` to whoever is polling the current job, for idle workers to take. Only called
/// when [`collecting`].
pub(crate) fn spill(job: Job) {
    SPILL.with_borrow_mut(|spill| {
        debug_assert!(spill.is_some(), "a job is split only for a collector");
        if let Some(jobs) = spill {
            jobs.push(job);
        }
    });
}

/// The smallest default window. Hand-offs between the consumer and the workers happen in
/// batches of half a window, and each batch costs a few thread wake-ups; a window of 512 keeps
/// that cost under 100 ns per item (measured) while holding at most 512 items per stream.
const DEFAULT_MIN_WINDOW: usize = 512;

/// A live worker, owned by its task. Dropped with the task, whichever way it goes: the worker
/// returns (the pool shut down), its runtime shuts down and drops it (between two polls, maybe
/// in the middle of a job), or `spawn` drops it at once (the runtime is shutting down).
struct Presence {
    shared: Arc<Shared>,
    index: usize,
    /// The job being run, and its source: put back at the front of its queue if the worker is
    /// dropped before it ends, so that no item is lost.
    job: Option<(SourceId, Job)>,
    /// Whether the worker is counted in [`State::live`] and owns its index: a worker of an
    /// adaptive pool that retires counts itself out (and frees its index) before it goes.
    counted: bool,
    /// Whether the job being run (by a worker of an adaptive pool) has waited on a pending
    /// future, counted in [`Shared::waiting`].
    waiting: bool,
    /// Whether the worker holds a slot (counted in [`State::held`]): from taking a job until
    /// it next asks for one (or is dropped).
    holding: bool,
    /// The set of workers it belongs to (see [`Shared::generation`]).
    generation: u64,
}

impl Presence {
    fn new(shared: Arc<Shared>, index: usize) -> Self {
        Self {
            index,
            job: None,
            counted: true,
            waiting: false,
            holding: false,
            generation: shared.generation.load(Ordering::Relaxed),
            shared,
        }
    }
}

impl Drop for Presence {
    /// Counts the worker out and puts back the job it was running. The last worker to go wakes
    /// the consumers whose jobs are queued: they start fresh workers when they next wait.
    fn drop(&mut self) {
        let shared = &self.shared;
        let job = self.job.take();
        if job.is_some() {
            shared.busy.fetch_sub(1, Ordering::Relaxed);
        }
        let holding = std::mem::take(&mut self.holding);
        if self.waiting {
            shared.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        let mut wake = Vec::new();
        let mut consumers = Vec::new();
        let orphan = {
            let mut state = shared.lock();
            if holding {
                state.held -= 1;
            }
            if self.counted {
                debug_assert!(state.live > 0, "a worker counted out twice");
                shared.count_out(&mut state, self.index);
            }
            let orphan = match job {
                Some((source, job)) => match state.queue(source) {
                    Some(queue) => {
                        queue.push_front(job);
                        #[cfg(feature = "metrics")]
                        shared.metrics.queued(1);
                        let cap = shared.cap(&state);
                        state.wake_for(source, 1, cap, &mut wake);
                        None
                    }
                    // Its stream is gone.
                    None => Some(job),
                },
                None => None,
            };
            if state.live == 0 && !state.shutdown {
                consumers.extend(
                    state
                        .sources
                        .iter()
                        .flatten()
                        .filter(|queue| !queue.jobs.is_empty())
                        .filter_map(|queue| queue.consumer.upgrade()),
                );
            }
            orphan
        };
        let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(orphan)));
        for waker in wake {
            waker.wake();
        }
        for consumer in consumers {
            consumer.wake_consumer();
        }
    }
}

/// The worker loop of a fixed pool.
async fn worker(me: Presence) {
    run::<false>(me).await;
}

/// The worker loop; an adaptive pool's workers (`ADAPTIVE`) also feed its [`Controller`], retire
/// when it says so or when idle, and count the jobs that wait on a pending future.
async fn run<const ADAPTIVE: bool>(mut me: Presence) {
    let shared = me.shared.clone();
    loop {
        let next = if ADAPTIVE {
            next_or_retire(&shared, &mut me).await
        } else {
            poll_fn(|cx| shared.poll_job::<false>(me.index, &mut me.holding, &mut me.counted, cx))
                .await
        };
        let Some((source, job)) = next else {
            break;
        };
        // The scheduler's charge is the CPU time the job took, so it reads the real clock: on a
        // paused tokio clock every job would look free. Nothing shown to users uses this clock.
        let started = std::time::Instant::now();
        WORKERS_HERE.set((Arc::as_ptr(&shared) as usize, me.generation));
        shared.busy.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        let busy = shared.metrics.busy();
        let (_, job) = me.job.insert((source, job));
        let waiting = &mut me.waiting;
        let unblocked = poll_fn(|cx| {
            let _on = OnWorker::enter(&shared);
            let (poll, spilled) = poll_collecting(job, cx);
            shared.requeue(source, spilled);
            if ADAPTIVE && poll.is_pending() && !*waiting {
                *waiting = true;
                shared.waiting.fetch_add(1, Ordering::Relaxed);
            }
            poll
        })
        .await;
        let job = me.job.take();
        shared.busy.fetch_sub(1, Ordering::Relaxed);
        if ADAPTIVE {
            // Still counted as waiting while the sample is judged: this worker is busy with
            // work that waits as much as the others are.
            shared.job_ended();
            if me.waiting {
                me.waiting = false;
                shared.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
        #[cfg(feature = "metrics")]
        drop(busy);
        let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(job)));
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        shared.end_job(source, nanos, &mut me.holding);
        // The consumer a finished job's results unblocked, woken once per job (a chunk of items,
        // which may also have handed results over before, see `fan_out.rs`).
        match unblocked {
            Some(waker) => {
                waker.wake();
                yield_to_consumer().await;
            }
            None => tokio::task::consume_budget().await,
        }
    }
}

/// The next job of a worker of an adaptive pool, or `None` when it stops: the pool shut down,
/// the controller undid a growth step, or the worker has been parked for [`IDLE`] with more
/// than `min` workers alive.
async fn next_or_retire(shared: &Arc<Shared>, me: &mut Presence) -> Option<(SourceId, Job)> {
    let mut idle: Option<Pin<Box<tokio::time::Sleep>>> = None;
    poll_fn(|cx| {
        loop {
            if let Poll::Ready(next) =
                shared.poll_job::<true>(me.index, &mut me.holding, &mut me.counted, cx)
            {
                return Poll::Ready(next);
            }
            // Parked. At `min` workers, nobody retires: no timer to keep.
            if shared.live.load(Ordering::Relaxed) <= shared.workers
                || shared.untimed.load(Ordering::Relaxed)
            {
                idle = None;
                return Poll::Pending;
            }
            let timer = match &mut idle {
                Some(timer) => timer,
                // tokio panics here if the runtime has no time driver.
                None => match std::panic::catch_unwind(|| Box::pin(tokio::time::sleep(IDLE))) {
                    Ok(timer) => idle.insert(timer),
                    Err(_) => {
                        shared.untimed.store(true, Ordering::Relaxed);
                        return Poll::Pending;
                    }
                },
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            idle = None;
            if shared.retire_idle(me.index) {
                me.counted = false;
                return Poll::Ready(None);
            }
        }
    })
    .await
}

/// How long a worker of an adaptive pool stays parked with nothing to do before it retires
/// (when more than `min` are alive), on tokio's clock.
const IDLE: Duration = Duration::from_secs(1);

/// A sample of an adaptive pool's throughput lasts at least this many job ends per worker...
const SAMPLE_JOBS_PER_WORKER: u64 = 4;

/// ...and at least this many.
const MIN_SAMPLE_JOBS: u64 = 8;

/// Growth that stopped resumes when a sample's throughput moves this far (a fraction) from
/// where it stopped: the load changed.
const STALL_BAND: f64 = 0.1;

/// The hill-climbing controller of an adaptive pool (see [`WorkerPool::adaptive`]), kept under
/// the pool's lock and fed by every job end.
#[derive(Default)]
struct Controller {
    /// Start of the current sample, on tokio's clock (`None` until the workers start).
    since: Option<tokio::time::Instant>,
    /// Job ends in the current sample.
    ended: u64,
    /// Throughput before the growth step that the current sample measures, if it measures one.
    probing: Option<f64>,
    /// Throughput at which growth stopped (a step did not pay), while it is stopped.
    stalled: Option<f64>,
    /// Workers to retire at their next job end, to undo a step.
    retire: usize,
}

impl Controller {
    /// A fresh set of workers starts: nothing measured yet.
    fn restart(&mut self) {
        *self = Self {
            since: Some(tokio::time::Instant::now()),
            ..Self::default()
        };
    }
}

/// What the controller does at the end of a sample.
enum Step {
    Grow,
    Undo,
    Hold,
}

impl Controller {
    /// Ends a sample of `rate` job ends per second with `workers` workers (those due to
    /// retire not counted); `pressure` says whether every worker is busy, jobs are queued and
    /// some job waits on a pending future.
    fn decide(&mut self, rate: f64, workers: usize, pressure: bool, max: usize) -> Step {
        if let Some(before) = self.probing.take() {
            // The step took the pool from `workers - 1` to `workers`: keep it if it raised
            // throughput by half of the workers it added, or more.
            let added = 1.0 / workers.saturating_sub(1).max(1) as f64;
            if rate < before * (1.0 + added / 2.0) {
                self.stalled = Some(before);
                self.retire += 1;
                return Step::Undo;
            }
        } else if let Some(at) = self.stalled {
            if (rate - at).abs() <= at * STALL_BAND {
                return Step::Hold;
            }
            self.stalled = None;
        }
        if pressure && workers < max {
            self.probing = Some(rate);
            return Step::Grow;
        }
        Step::Hold
    }
}

impl Shared {
    /// Counts worker `index` out (under the lock): it no longer parks, its index is free, and
    /// one fewer worker is alive.
    fn count_out(&self, state: &mut State, index: usize) {
        if state.parked[index].take().is_some() {
            state.parked_ids.retain(|&i| i != index);
        }
        if self.adaptive {
            state.free_workers.push(index);
        }
        let live = state.live.saturating_sub(1);
        self.set_live(state, live);
    }

    /// Whether worker `index` of an adaptive pool retires to undo a growth step (counted out
    /// if so).
    fn retire_undone(&self, state: &mut State, index: usize) -> bool {
        let Some(controller) = &mut state.controller else {
            return false;
        };
        if controller.retire == 0 {
            return false;
        }
        controller.retire -= 1;
        if state.live <= self.workers {
            return false;
        }
        self.count_out(state, index);
        tracing::debug!(
            target: "stagepipe::pool",
            workers = state.live,
            "adaptive pool: retired a worker, the last one added did not raise throughput"
        );
        true
    }

    /// Whether worker `index` of an adaptive pool, idle for [`IDLE`], retires (counted out if
    /// so): it does if it is still parked (nobody handed it work) and more than `min` are alive.
    fn retire_idle(&self, index: usize) -> bool {
        let mut state = self.lock();
        if state.live <= self.workers || state.parked[index].is_none() || !state.handed.is_empty() {
            return false;
        }
        self.count_out(&mut state, index);
        tracing::debug!(
            target: "stagepipe::pool",
            workers = state.live,
            "adaptive pool: retired an idle worker"
        );
        true
    }

    /// A job of an adaptive pool ended: counts it in the sample and, at the sample's end,
    /// grows the pool by one worker or undoes the last step as the controller says.
    fn job_ended(self: &Arc<Self>) {
        let mut wake = None;
        let grow = {
            let mut state = self.lock();
            let live = state.live;
            let Some(controller) = &mut state.controller else {
                return;
            };
            controller.ended += 1;
            if controller.ended < (SAMPLE_JOBS_PER_WORKER * live as u64).max(MIN_SAMPLE_JOBS) {
                return;
            }
            let now = tokio::time::Instant::now();
            let since = *controller.since.get_or_insert(now);
            let elapsed = now.saturating_duration_since(since);
            if elapsed.is_zero() {
                return;
            }
            let rate = controller.ended as f64 / elapsed.as_secs_f64();
            controller.since = Some(now);
            controller.ended = 0;
            let workers = live.saturating_sub(controller.retire);
            let pressure = state.parked_ids.is_empty()
                && self.waiting.load(Ordering::Relaxed) > 0
                && state.has_queued();
            let controller = state.controller.as_mut().expect("an adaptive pool");
            match controller.decide(rate, workers, pressure, self.max) {
                Step::Hold => None,
                Step::Undo => {
                    // A parked worker retires at once; otherwise the next to end a job does.
                    if let Some(index) = state.parked_ids.pop() {
                        wake = state.parked[index].take();
                    }
                    None
                }
                Step::Grow => {
                    let index = state.free_workers.pop().unwrap_or_else(|| {
                        state.parked.push(None);
                        state.parked.len() - 1
                    });
                    self.set_live(&mut state, live + 1);
                    tracing::debug!(
                        target: "stagepipe::pool",
                        workers = live + 1,
                        jobs_per_second = rate,
                        "adaptive pool: added a worker"
                    );
                    Some(index)
                }
            }
        };
        if let Some(waker) = wake {
            waker.wake();
        }
        if let Some(index) = grow {
            // Called on a worker, so on the runtime the workers live on.
            let me = Presence::new(self.clone(), index);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(run::<true>(me))),
                Err(_) => drop(me),
            }
        }
    }
}

impl State {
    /// Whether any source but `source` has jobs queued.
    fn queued_besides(&self, source: SourceId) -> bool {
        self.ready.iter().any(|&other| {
            other != source
                && matches!(self.sources.get(other.id), Some(Some(queue)) if queue.epoch == other.epoch && !queue.jobs.is_empty())
        })
    }

    /// Whether any source has jobs queued.
    fn has_queued(&self) -> bool {
        self.ready.iter().any(|source| {
            matches!(self.sources.get(source.id), Some(Some(queue)) if queue.epoch == source.epoch && !queue.jobs.is_empty())
        })
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let wake: Vec<Waker> = {
            let mut state = self.shared.lock();
            state.shutdown = true;
            state.parked_ids.clear();
            state.parked.iter_mut().filter_map(Option::take).collect()
        };
        for waker in wake {
            waker.wake();
        }
    }
}

impl From<usize> for WorkerPool {
    /// A private pool of `workers` workers.
    ///
    /// # Panics
    ///
    /// Panics if `workers` is zero.
    #[track_caller]
    fn from(workers: usize) -> Self {
        Self::new(workers)
    }
}

impl From<&WorkerPool> for WorkerPool {
    /// A clone of the handle: the workers are shared.
    fn from(pool: &WorkerPool) -> Self {
        pool.clone()
    }
}

impl fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.handle.shared.lock();
        f.debug_struct("WorkerPool")
            .field("workers", &self.workers())
            .field("streams", &(state.sources.len() - state.free_ids.len()))
            .field(
                "queued",
                &state
                    .sources
                    .iter()
                    .flatten()
                    .map(|queue| queue.jobs.len())
                    .sum::<usize>(),
            )
            .field("busy", &self.busy())
            .finish()
    }
}

#[cfg(all(test, stagepipe_loom))]
pub(crate) mod loom_model;

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Job {
        Box::pin(async { None })
    }

    struct Nobody;

    impl Consumer for Nobody {
        fn wake_consumer(&self) {}
    }

    fn state_with(sources: usize, jobs: usize) -> State {
        let mut state = State::default();
        for id in 0..sources {
            state.sources.push(Some(Queue {
                jobs: (0..jobs).map(|_| noop()).collect(),
                epoch: id as u64,
                consumer: Weak::<Nobody>::new(),
                debt: 0,
                listed: true,
            }));
            state.ready.push_back(SourceId {
                id,
                epoch: id as u64,
            });
        }
        state
    }

    /// One worker serving a heavy source (5 ms jobs) and a light one (160 µs jobs): each gets
    /// about half of the worker's time, not half of its jobs.
    #[test]
    fn sources_are_served_by_time_used_not_by_job() {
        let mut state = state_with(2, 100_000);
        let cost = [5_000_000u64, 160_000];
        let mut time = [0u64; 2];
        for _ in 0..20_000 {
            let (source, _job) = state.next_job().expect("jobs are queued");
            time[source.id] += cost[source.id];
            state.charge(source, cost[source.id]);
        }
        let ratio = time[1] as f64 / time[0] as f64;
        assert!(
            (0.9..=1.1).contains(&ratio),
            "light/heavy worker time {ratio:.2} ({time:?})"
        );
    }

    /// A source alone is served whatever its debt: debt never idles a worker.
    #[test]
    fn a_source_in_debt_is_served_when_it_is_alone() {
        let mut state = state_with(1, 3);
        for _ in 0..3 {
            let (source, _job) = state.next_job().expect("served despite its debt");
            state.charge(source, MAX_DEBT);
        }
        assert!(state.next_job().is_none());
    }

    /// The controller grows only under pressure (every worker busy, jobs queued, a job waiting
    /// on a pending future): CPU-bound work, whose jobs never wait, never grows the pool.
    #[test]
    fn the_controller_grows_only_under_pressure() {
        let mut c = Controller::default();
        for rate in [100.0, 1_000.0, 10_000.0] {
            assert!(matches!(c.decide(rate, 2, false, 32), Step::Hold));
        }
        assert!(matches!(c.decide(100.0, 2, true, 32), Step::Grow));
        assert_eq!(c.probing, Some(100.0));
        assert!(matches!(
            Controller::default().decide(100.0, 32, true, 32),
            Step::Hold
        ));
    }

    /// A step from `n` to `n + 1` workers is kept if throughput rose by `1/(2n)` or more, and
    /// undone otherwise; growth then stays stopped until throughput moves by more than 10%.
    #[test]
    fn the_controller_keeps_steps_that_pay_and_undoes_the_others() {
        let mut c = Controller::default();
        assert!(matches!(c.decide(100.0, 4, true, 32), Step::Grow));
        // 4 -> 5 workers: at least 12.5% more needed.
        assert!(matches!(c.decide(113.0, 5, true, 32), Step::Grow));
        assert!(matches!(c.decide(118.0, 6, true, 32), Step::Undo));
        assert_eq!((c.retire, c.stalled), (1, Some(113.0)));
        // Stalled while throughput stays within 10%...
        assert!(matches!(c.decide(120.0, 5, true, 32), Step::Hold));
        assert!(matches!(c.decide(105.0, 5, true, 32), Step::Hold));
        // ...and growing again once it moves further.
        assert!(matches!(c.decide(130.0, 5, true, 32), Step::Grow));
        assert_eq!(c.stalled, None);
    }

    /// Equal jobs are still served strictly in turn.
    #[test]
    fn equal_sources_alternate() {
        let mut state = state_with(3, 10);
        let order: Vec<usize> = (0..9)
            .map(|_| {
                let (source, _job) = state.next_job().expect("jobs are queued");
                state.charge(source, QUANTUM / 2);
                source.id
            })
            .collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }
}
