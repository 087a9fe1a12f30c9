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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::error::{ConfigError, nonzero, or_panic};

thread_local! {
    /// The pool (its `Shared`'s address) whose worker is polling a job on this thread, or 0.
    static ON_WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
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

/// A type-erased unit of work: a user future wrapped so that it delivers its own result. It
/// resolves to the waker of a consumer that its result unblocked, which the worker wakes once it
/// finishes its chunk of jobs (or as soon as a job has to wait), so that a consumer is woken once
/// per chunk rather than once per item.
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
    workers: usize,
    /// Workers running jobs now.
    busy: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    started: bool,
    shutdown: bool,
    /// Job queues by source id; `None` marks a free id.
    sources: Vec<Option<VecDeque<Job>>>,
    free_ids: Vec<usize>,
    /// Source ids that have queued jobs, each at most once, served round-robin.
    ready: VecDeque<usize>,
    /// Wakers of idle workers, by worker index.
    parked: Vec<Option<Waker>>,
    parked_ids: Vec<usize>,
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
        let shared = Arc::new(Shared {
            workers,
            busy: AtomicUsize::new(0),
            state: Mutex::new(state),
        });
        Ok(Self {
            handle: Arc::new(Handle { shared }),
        })
    }

    /// The number of workers: at most this many user futures run at once on the pool.
    pub fn workers(&self) -> usize {
        self.handle.shared.workers
    }

    /// How many workers are running jobs now (at most [`workers`](Self::workers)).
    pub fn busy(&self) -> usize {
        self.handle.shared.busy.load(Ordering::Relaxed)
    }

    /// The default window of a stream on this pool: how many of its items may be in the pool at
    /// once (queued, running, or finished and waiting to be consumed).
    pub(crate) fn default_window(&self) -> usize {
        self.workers().saturating_mul(4).max(DEFAULT_MIN_WINDOW)
    }

    /// Registers a new source and returns its id.
    pub(crate) fn register(&self) -> usize {
        let mut state = self.handle.shared.lock();
        match state.free_ids.pop() {
            Some(id) => {
                state.sources[id] = Some(VecDeque::new());
                id
            }
            None => {
                state.sources.push(Some(VecDeque::new()));
                state.sources.len() - 1
            }
        }
    }

    /// Whether the caller runs inside a job of one of this pool's own workers: a stream polled
    /// there is nested on its own pool, and must not wait for jobs that no worker has started.
    pub(crate) fn on_worker(&self) -> bool {
        ON_WORKER.get() == Arc::as_ptr(&self.handle.shared) as usize
    }

    /// Takes back the jobs of source `id` that no worker has started yet, into `out`; returns
    /// whether there were any.
    pub(crate) fn reclaim(&self, id: usize, out: &mut VecDeque<Job>) -> bool {
        let mut state = self.handle.shared.lock();
        let Some(queue) = state.sources[id].as_mut() else {
            return false;
        };
        if queue.is_empty() {
            return false;
        }
        out.extend(queue.drain(..));
        state.ready.retain(|&r| r != id);
        true
    }

    /// Removes a source; its queued jobs are dropped (outside the lock).
    pub(crate) fn unregister(&self, id: usize) {
        let jobs = {
            let mut state = self.handle.shared.lock();
            let jobs = state.sources[id].take();
            state.free_ids.push(id);
            state.ready.retain(|&r| r != id);
            jobs
        };
        drop(jobs);
    }

    /// Queues `jobs` (drained from the buffer) for source `id` and wakes idle workers.
    pub(crate) fn submit(&self, id: usize, jobs: &mut Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let shared = &self.handle.shared;
        let mut wake = Vec::new();
        {
            let mut state = shared.lock();
            if !state.started {
                state.started = true;
                for index in 0..shared.workers {
                    tokio::spawn(worker(shared.clone(), index));
                }
            }
            let n = jobs.len();
            let queue = state.sources[id].as_mut().expect("source registered");
            let was_empty = queue.is_empty();
            queue.extend(jobs.drain(..));
            if was_empty {
                state.ready.push_back(id);
            }
            for _ in 0..n {
                let Some(index) = state.parked_ids.pop() else {
                    break;
                };
                if let Some(waker) = state.parked[index].take() {
                    wake.push(waker);
                }
            }
        }
        for waker in wake {
            waker.wake();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (user code runs outside it), but stay
        // usable if it ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the next jobs for worker `index` into `batch`: up to `cap` from one source, fewer
    /// when the queue is short so that other workers get a share. Returns `Ready(false)`
    /// on shutdown, or `Pending` after parking the worker.
    fn poll_jobs(
        &self,
        index: usize,
        cap: usize,
        batch: &mut VecDeque<Job>,
        cx: &mut Context<'_>,
    ) -> Poll<bool> {
        let mut state = self.lock();
        if state.shutdown {
            return Poll::Ready(false);
        }
        if let Some(id) = state.ready.pop_front() {
            let workers = self.workers;
            let queue = state.sources[id]
                .as_mut()
                .expect("ready source is registered");
            let take = (queue.len() / (2 * workers)).clamp(1, cap);
            batch.extend(queue.drain(..take));
            if !queue.is_empty() {
                state.ready.push_back(id);
            }
            // Woken for another reason while parked: a submitter must not count on this worker.
            if state.parked[index].take().is_some() {
                state.parked_ids.retain(|&i| i != index);
            }
            return Poll::Ready(true);
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

/// The smallest default window. Hand-offs between the consumer and the workers happen in
/// batches of half a window, and each batch costs a few thread wake-ups; a window of 512 keeps
/// that cost under 100 ns per item (measured) while holding at most 512 items per stream.
const DEFAULT_MIN_WINDOW: usize = 512;

/// The most jobs a worker takes from one source at a time.
const MAX_CHUNK: usize = 32;

/// A chunk that takes longer than this halves the worker's chunk size: slow jobs are taken one
/// at a time, so their results are not held back and other streams get their turn.
const SLOW_CHUNK: Duration = Duration::from_micros(500);

async fn worker(shared: Arc<Shared>, index: usize) {
    let mut batch = VecDeque::with_capacity(MAX_CHUNK);
    let mut deferred: Vec<Waker> = Vec::new();
    let mut cap = 1;
    while poll_fn(|cx| shared.poll_jobs(index, cap, &mut batch, cx)).await {
        let taken = batch.len();
        let started = std::time::Instant::now();
        shared.busy.fetch_add(1, Ordering::Relaxed);
        while let Some(mut job) = batch.pop_front() {
            let unblocked = poll_fn(|cx| {
                let _on = OnWorker::enter(&shared);
                // Jobs guard every call into user code themselves (see `fan_out.rs`); this
                // second guard only keeps the worker alive should one ever get through.
                let poll = std::panic::catch_unwind(AssertUnwindSafe(|| job.as_mut().poll(cx)))
                    .unwrap_or(Poll::Ready(None));
                if poll.is_pending() {
                    wake_all(&mut deferred);
                }
                poll
            })
            .await;
            if let Some(waker) = unblocked {
                if !deferred.iter().any(|w| w.will_wake(&waker)) {
                    deferred.push(waker);
                }
            }
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(job)));
            tokio::task::consume_budget().await;
        }
        shared.busy.fetch_sub(1, Ordering::Relaxed);
        wake_all(&mut deferred);
        cap = if started.elapsed() > SLOW_CHUNK {
            (cap / 2).max(1)
        } else if taken == cap {
            (cap * 2).min(MAX_CHUNK)
        } else {
            cap
        };
    }
    wake_all(&mut deferred);
}

fn wake_all(wakers: &mut Vec<Waker>) {
    for waker in wakers.drain(..) {
        waker.wake();
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
                    .map(VecDeque::len)
                    .sum::<usize>(),
            )
            .field("busy", &self.busy())
            .finish()
    }
}
