//! loom models of the pool's hand-offs (`scripts/loom`): a consumer queues jobs, workers take
//! them, park and are woken, a finished job wakes its consumer, a source goes away with jobs
//! queued or running, a job splits off work for another worker.
//!
//! The workers run the real worker loop ([`worker`]) on loom threads, counted in as
//! [`Shared::claim_start`] counts them in on a tokio runtime. A wake-up that is lost leaves
//! every thread waiting, which loom reports as a deadlock.

use std::future::poll_fn;
use std::sync::atomic::AtomicUsize as Count;
use std::sync::atomic::Ordering::SeqCst;
use std::task::Poll;

use loom::future::block_on;
use loom::thread::{self, JoinHandle};

use super::*;
use crate::sync::{AtomicWaker, model};

/// The pool's workers, each on a loom thread.
pub(crate) struct Workers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts the workers of `pool` (a fixed one) on loom threads.
    pub(crate) fn start(pool: &WorkerPool) -> Self {
        let shared = pool.handle.shared.clone();
        assert!(!shared.adaptive, "the models run a fixed pool's workers");
        {
            let mut state = shared.lock();
            shared.set_live(&mut state, shared.workers);
        }
        let threads = (0..shared.workers)
            .map(|index| {
                let me = Presence::new(shared.clone(), index);
                thread::spawn(move || block_on(worker(me)))
            })
            .collect();
        Self { shared, threads }
    }

    /// Marks the calling thread as one of the workers' runtime, as a worker that ran there or
    /// a consumer that started them would: a fan-out polled on it borrows slots.
    pub(crate) fn serve_here(&self) {
        let generation = self.shared.generation.load(Ordering::Relaxed);
        WORKERS_HERE.set((Arc::as_ptr(&self.shared) as usize, generation));
    }

    /// Drops `pool`, the model's last handle (jobs still running may hold others), so that the
    /// workers stop; waits for them, then checks that the pool is back to idle: no worker busy
    /// or counted in, no job queued.
    pub(crate) fn stop(self, pool: WorkerPool) {
        drop(pool);
        for thread in self.threads {
            thread.join().expect("a worker never panics");
        }
        assert_eq!(self.shared.busy.load(Ordering::Relaxed), 0, "busy workers");
        let state = self.shared.lock();
        assert_eq!(state.live, 0, "workers counted in");
        assert_eq!(self.shared.live.load(Ordering::Relaxed), 0);
        let queued: usize = state.sources.iter().flatten().map(|q| q.jobs.len()).sum();
        assert_eq!(queued, 0, "jobs left queued");
        assert_eq!(state.held, 0, "slots left in use");
        assert!(state.handed.is_empty(), "jobs left handed over");
    }
}

struct Nobody;

impl Consumer for Nobody {
    fn wake_consumer(&self) {}
}

fn source(pool: &WorkerPool) -> SourceId {
    pool.register(Weak::<Nobody>::new())
}

/// What became of each job (bookkeeping of the model, not modelled itself), and the waker of
/// the consumer waiting for them.
struct Ledger {
    ran: Vec<Count>,
    dropped: Vec<Count>,
    done: Count,
    consumer: AtomicWaker,
}

impl Ledger {
    fn new(jobs: usize) -> Arc<Self> {
        Arc::new(Self {
            ran: (0..jobs).map(|_| Count::new(0)).collect(),
            dropped: (0..jobs).map(|_| Count::new(0)).collect(),
            done: Count::new(0),
            consumer: AtomicWaker::new(),
        })
    }

    /// Waits until `n` jobs have run, as a fan-out consumer waits for results: registers its
    /// waker, then looks.
    fn wait_for(&self, n: usize) {
        block_on(poll_fn(|cx| {
            self.consumer.register(cx.waker());
            match self.done.load(SeqCst) >= n {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        }));
    }

    fn ran(&self) -> Vec<usize> {
        self.ran.iter().map(|n| n.load(SeqCst)).collect()
    }

    fn dropped(&self) -> Vec<usize> {
        self.dropped.iter().map(|n| n.load(SeqCst)).collect()
    }
}

/// Counts the drop of job `i`.
struct Dropped(usize, Arc<Ledger>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.1.dropped[self.0].fetch_add(1, SeqCst);
    }
}

/// Job `i`: counts its run and hands the worker the consumer's waker, as a fan-out chunk does
/// when its results are in.
fn job(i: usize, ledger: &Arc<Ledger>) -> Job {
    let dropped = Dropped(i, ledger.clone());
    Box::pin(async move {
        let ledger = &dropped.1;
        ledger.ran[i].fetch_add(1, SeqCst);
        ledger.done.fetch_add(1, SeqCst);
        ledger.consumer.take()
    })
}

/// Job `i` that, polled by a worker, first splits off `rest` for another worker (as a fan-out
/// chunk does when an item has to wait) and waits once.
fn splitting_job(i: usize, ledger: &Arc<Ledger>, rest: Job) -> Job {
    let mut rest = Some(rest);
    let mut finish = job(i, ledger);
    Box::pin(poll_fn(move |cx| {
        if let Some(rest) = rest.take() {
            assert!(collecting(), "a worker collects split-off jobs");
            spill(rest);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        finish.as_mut().poll(cx)
    }))
}

/// Runs `body` in a loom model with a two-worker pool (workers on loom threads), a ledger of
/// `jobs` jobs and a registered source; if `all_run`, waits until every job has run. Then it
/// drops the source (its stream goes away), stops the workers and checks that every job ran
/// at most once (exactly once if `all_run`) and was dropped exactly once.
fn on_pool(
    jobs: usize,
    all_run: bool,
    body: impl Fn(&WorkerPool, SourceId, &Arc<Ledger>) + Send + Sync + 'static,
) {
    model(move || {
        let pool = WorkerPool::new(2);
        let workers = Workers::start(&pool);
        let ledger = Ledger::new(jobs);
        let source = source(&pool);
        body(&pool, source, &ledger);
        if all_run {
            ledger.wait_for(jobs);
            assert_eq!(ledger.ran(), vec![1; jobs]);
        }
        pool.unregister(source);
        workers.stop(pool);
        let ran = ledger.ran();
        assert!(ran.iter().all(|&n| n <= 1), "ran {ran:?}");
        assert_eq!(ledger.dropped(), vec![1; jobs]);
    });
}

/// Two jobs queued one after the other while two workers take jobs and park: each job runs
/// exactly once, the consumer is woken once both are done, and the pool goes back to idle.
#[test]
fn loom_pool_jobs_run_once_and_wake_their_consumer() {
    on_pool(2, true, |pool, source, ledger| {
        pool.submit(source, &mut vec![job(0, ledger)]);
        pool.submit(source, &mut vec![job(1, ledger)]);
    });
}

/// A job splits off the rest of its chunk, which goes back to the front of the queue for the
/// other worker (woken for it), or for itself: both run once.
#[test]
fn loom_pool_split_off_jobs_run_once() {
    on_pool(2, true, |pool, source, ledger| {
        let rest = job(1, ledger);
        pool.submit(source, &mut vec![splitting_job(0, ledger, rest)]);
    });
}

/// The source goes away (its stream is dropped) while its jobs are queued, running, or being
/// split off: every job runs at most once and is dropped exactly once, and the workers end
/// idle.
#[test]
fn loom_pool_unregister_drops_each_job_once() {
    on_pool(3, false, |pool, source, ledger| {
        let rest = job(1, ledger);
        pool.submit(
            source,
            &mut vec![splitting_job(0, ledger, rest), job(2, ledger)],
        );
        // The harness unregisters the source now, racing the workers.
    });
}

/// Job `i` counted in `running` from its first poll to its end (checked against the pool's
/// one worker); if `waits`, it has to wait once (waking itself) before it ends.
fn counted_job(i: usize, ledger: &Arc<Ledger>, running: &Arc<Count>, waits: bool) -> Job {
    let running = running.clone();
    let mut started = false;
    let mut waited = !waits;
    let mut finish = job(i, ledger);
    Box::pin(poll_fn(move |cx| {
        if !started {
            started = true;
            let now = running.fetch_add(1, SeqCst) + 1;
            assert!(now <= 1, "{now} jobs running on a pool of one worker");
        }
        if !waited {
            waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        running.fetch_sub(1, SeqCst);
        finish.as_mut().poll(cx)
    }))
}

/// A consumer borrows the slot of a one-worker pool to run its own queued job while the worker
/// looks for work: no two jobs run at once, a borrowed job that has to wait is handed over
/// with its slot and resumed by the worker, every job runs once, and the slot count ends at
/// zero.
#[test]
fn loom_pool_borrowed_slots_keep_the_cap() {
    for waits in [false, true] {
        model(move || {
            let pool = WorkerPool::new(1);
            let workers = Workers::start(&pool);
            let ledger = Ledger::new(2);
            let running = Arc::new(Count::new(0));
            let source = source(&pool);
            pool.submit(
                source,
                &mut vec![
                    counted_job(0, &ledger, &running, waits),
                    counted_job(1, &ledger, &running, false),
                ],
            );
            if let Some(mut job) = pool.borrow_job(source) {
                let mut cx = Context::from_waker(futures::task::noop_waker_ref());
                let (poll, spilled) = pool.poll_borrowed(&mut job, &mut cx);
                let pending = poll.is_pending().then_some(job);
                assert!(pool.give_back(source, pending, spilled, false).is_none());
            }
            ledger.wait_for(2);
            assert_eq!(ledger.ran(), vec![1, 1]);
            pool.unregister(source);
            workers.stop(pool);
        });
    }
}
