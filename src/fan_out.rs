//! `fan_out_ordered` and `fan_out`: a parallel async map on a [`WorkerPool`].
//!
//! The consumer's task pulls items from upstream, calls the user's closure to make each item's
//! future and hands the futures to the pool in batches. Workers run them and write each result
//! into the stream's own result channel ([`Chan`]); the consumer reads them back in input order
//! (a ring of slots, one per item in the pool) or in completion order.
//!
//! The stream never has more than `window` items in the pool: queued, running, or finished and
//! not yet consumed. That bounds the reorder buffer even behind one slow item, and is the
//! backpressure: upstream is not pulled while the window is full.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;

use crate::error::{ConfigError, or_panic, window_size};
use crate::macros::size_hint_plus;
use crate::pool::{self, Job, SourceId, WorkerPool};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{Arc, AtomicWaker, Mutex, MutexGuard, Weak};

mod watch;

use watch::Deferred;

/// What a job produced: its value, or the payload of its panic.
type Outcome<U> = Result<U, Box<dyn Any + Send + 'static>>;

/// One stream's result channel, shared with the jobs it submitted.
struct Chan<U> {
    state: Mutex<ChanState<U>>,
    consumer: AtomicWaker,
    closed: AtomicBool,
    /// Wakers of workers running this stream's pending jobs, to cancel them on drop. At most one
    /// per worker of the pool.
    running: Mutex<Vec<Waker>>,
    /// Nanoseconds per item of the last finished chunk, to size the next chunks.
    item_nanos: AtomicU64,
}

struct ChanState<U> {
    ordered: bool,
    /// Ordered: the sequence number of `slots[0]`.
    base: u64,
    /// Ordered: one slot per item in the pool, filled when its job finishes.
    slots: VecDeque<Option<Outcome<U>>>,
    /// Unordered: finished results in completion order.
    done: VecDeque<Outcome<U>>,
}

impl<U> Chan<U> {
    fn new(ordered: bool) -> Self {
        Self {
            state: Mutex::new(ChanState {
                ordered,
                base: 0,
                slots: VecDeque::new(),
                done: VecDeque::new(),
            }),
            consumer: AtomicWaker::new(),
            closed: AtomicBool::new(false),
            running: Mutex::new(Vec::new()),
            item_nanos: AtomicU64::new(u64::MAX),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ChanState<U>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stores finished outcomes `(seq, outcome)`, draining `done`. Returns the consumer's waker
    /// if it can now make progress; the worker wakes it (once per chunk of jobs, see `pool.rs`).
    fn complete(&self, done: &mut Vec<(u64, Outcome<U>)>) -> Option<Waker> {
        if done.is_empty() {
            return None;
        }
        if self.is_closed() {
            done.clear();
            return None;
        }
        let wake = {
            let mut state = self.lock();
            if state.ordered {
                for (seq, outcome) in done.drain(..) {
                    let index = (seq - state.base) as usize;
                    state.slots[index] = Some(outcome);
                }
                matches!(state.slots.front(), Some(Some(_)))
            } else {
                let was_empty = state.done.is_empty();
                state
                    .done
                    .extend(done.drain(..).map(|(_, outcome)| outcome));
                was_empty
            }
        };
        if wake { self.consumer.take() } else { None }
    }

    /// Moves every result the consumer may yield now into `out`; returns how many.
    fn drain_ready(&self, out: &mut VecDeque<Outcome<U>>) -> usize {
        let mut state = self.lock();
        let before = out.len();
        if state.ordered {
            while matches!(state.slots.front(), Some(Some(_))) {
                if let Some(Some(outcome)) = state.slots.pop_front() {
                    out.push_back(outcome);
                }
                state.base += 1;
            }
        } else {
            out.append(&mut state.done);
        }
        out.len() - before
    }

    fn register_running(&self, waker: &Waker) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if !running.iter().any(|w| w.will_wake(waker)) {
            running.push(waker.clone());
        }
    }

    /// Marks the stream gone and wakes every worker running one of its jobs, which then drops it.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in running {
            waker.wake();
        }
    }
}

impl<U: Send> pool::Consumer for Chan<U> {
    fn wake_consumer(&self) {
        self.consumer.wake();
    }
}

pin_project! {
    /// Runs a user future on a worker; resolves to `None` as soon as the owning stream is gone.
    /// The first time the future has to wait, the chunk's finished outcomes are handed over and
    /// its unstarted items are split off into a job of their own for idle workers to take, so a
    /// slow item never holds back results that are ready or items that could run.
    ///
    /// Every call into user code happens inside an unwind guard: polling the future, and dropping
    /// it, whether it finished (a panic there becomes the item's outcome) or was cancelled (a
    /// panic there is swallowed: nobody is left to see it). So a worker never dies of user code.
    struct Cancellable<'a, Fut, U> {
        #[pin]
        fut: Option<Fut>,
        chan: &'a Arc<Chan<U>>,
        done: &'a mut Vec<(u64, Outcome<U>)>,
        // The consumer's waker, held back by the job (see [`make_job`]).
        held: &'a mut Option<Deferred>,
        rest: &'a mut NotStarted<Fut>,
        // The sequence number of the first item in `rest`.
        next_seq: u64,
        // Whether the unstarted items were split off.
        split: bool,
        // The waker registered with the stream to cancel this future: the worker's, or a later
        // worker's if the job was put back after its worker was dropped (see `pool.rs`).
        registered: Option<Waker>,
    }

    impl<Fut, U> PinnedDrop for Cancellable<'_, Fut, U> {
        fn drop(this: Pin<&mut Self>) {
            drop_caught(this.project().fut);
        }
    }
}

/// Drops the future in `slot` inside an unwind guard, returning the panic of its destructor.
fn drop_caught<Fut>(slot: Pin<&mut Option<Fut>>) -> Option<Box<dyn Any + Send + 'static>> {
    std::panic::catch_unwind(AssertUnwindSafe(move || {
        let mut slot = slot;
        slot.set(None);
    }))
    .err()
}

impl<Fut, U> Future for Cancellable<'_, Fut, U>
where
    Fut: Future<Output = U> + Send + 'static,
    U: Send + 'static,
{
    type Output = Option<Outcome<U>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if this.chan.is_closed() {
            return Poll::Ready(None);
        }
        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Some(match drop_caught(this.fut) {
                None => Ok(value),
                Some(panic) => Err(panic),
            })),
            Err(panic) => {
                drop_caught(this.fut);
                Poll::Ready(Some(Err(panic)))
            }
            Ok(Poll::Pending) => {
                if let Some(waker) = this.held.take().and_then(Deferred::take) {
                    waker.wake();
                }
                if let Some(waker) = this.chan.complete(this.done) {
                    waker.wake();
                }
                if !*this.split {
                    *this.split = true;
                    split_off(this.rest, *this.next_seq, this.chan);
                }
                if !this
                    .registered
                    .as_ref()
                    .is_some_and(|waker| waker.will_wake(cx.waker()))
                {
                    this.chan.register_running(cx.waker());
                    *this.registered = Some(cx.waker().clone());
                    if this.chan.is_closed() {
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            }
        }
    }
}

/// The futures of a chunk that have not started yet. Dropped one by one inside an unwind guard
/// (the stream is gone), so one panicking destructor neither aborts the process nor skips the
/// others.
struct NotStarted<Fut>(std::vec::IntoIter<Fut>);

impl<Fut> Drop for NotStarted<Fut> {
    fn drop(&mut self) {
        for fut in self.0.by_ref() {
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(fut)));
        }
    }
}

/// Hands the unstarted futures in `rest` (the first numbered `first_seq`) to whoever polls this
/// job, as a job of their own; keeps them if nobody collects (then this job runs them).
fn split_off<Fut>(rest: &mut NotStarted<Fut>, first_seq: u64, chan: &Arc<Chan<Fut::Output>>)
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    if rest.0.len() == 0 || !pool::collecting() {
        return;
    }
    let futs: Vec<Fut> = rest.0.by_ref().collect();
    pool::spill(make_job(futs, first_seq, chan.clone()));
}

/// A chunk of one stream's futures, run in turn by one worker. Each outcome reaches the channel
/// as its item finishes, before the next item starts; the consumer is woken for them when the
/// chunk ends, when one of its items has to wait, or (the next item may run for long) by the
/// watch thread [`watch::DELAY`] after they finished, whichever comes first: one wake-up per
/// chunk rather than one per item, with a bound on how long a finished result waits. When an
/// item has to wait, the items not started yet are also split off, for other workers.
///
/// Chunks of items measured under [`HANDOVER_NANOS`] (or not measured yet) keep their outcomes
/// until their end, which comes within tens of microseconds unless a heavy item hides among
/// them, and so does a chunk run by its own consumer under a borrowed slot (nobody could take
/// them earlier).
fn make_job<Fut>(futs: Vec<Fut>, first_seq: u64, chan: Arc<Chan<Fut::Output>>) -> Job
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let n = futs.len();
    // Owned by the guard from here on, so that a job dropped before it starts drops each future
    // inside an unwind guard too.
    let mut rest = NotStarted(futs.into_iter());
    Box::pin(async move {
        // Real time, not tokio's: this is the chunk's CPU cost per item for the pool's scheduler,
        // which a paused clock would report as zero. No user-facing figure comes from it.
        let started = std::time::Instant::now();
        // Items under a microsecond (see [`HANDOVER_NANOS`]), or not measured yet (the first
        // chunks of a stream, made before any chunk ended), and chunks run by their own
        // consumer hand their outcomes over at the chunk's end.
        let measured = chan.item_nanos.load(Ordering::Relaxed);
        let each = (HANDOVER_NANOS..u64::MAX).contains(&measured) && !pool::borrowed();
        let mut done = Vec::with_capacity(if each { 1 } else { n });
        let mut held = None;
        let mut seq = first_seq;
        while let Some(fut) = rest.0.next() {
            let run = Cancellable {
                fut: Some(fut),
                chan: &chan,
                done: &mut done,
                held: &mut held,
                rest: &mut rest,
                next_seq: seq + 1,
                split: false,
                registered: None,
            };
            match run.await {
                Some(outcome) => done.push((seq, outcome)),
                None => return None,
            }
            seq += 1;
            if rest.0.len() == 0 {
                break;
            }
            if each {
                // The consumer's waker is taken only once until it is woken: at most one held.
                if let Some(waker) = chan.complete(&mut done) {
                    held = hold(waker);
                }
            }
        }
        let ran = seq - first_seq;
        let nanos = crate::time::nanos(started.elapsed());
        // The loom models set the measurement themselves: real time would make their runs
        // differ from one interleaving to the next (chunk sizes, whether the consumer borrows).
        if !cfg!(stagepipe_loom) {
            chan.item_nanos.store(nanos / ran.max(1), Ordering::Relaxed);
        }
        let last = chan.complete(&mut done);
        match held.and_then(Deferred::take) {
            Some(waker) if last.is_some() => {
                waker.wake();
                last
            }
            held => last.or(held),
        }
    })
}

/// Holds the consumer's `waker` back until the chunk ends, with a bound (see [`watch`]); wakes
/// it at once if the watch thread cannot run, and in the loom models (which check that every
/// result reaches the channel before the next item starts, and that the consumer is woken).
fn hold(waker: Waker) -> Option<Deferred> {
    let deferred = match cfg!(stagepipe_loom) {
        true => Err(waker),
        false => watch::defer(waker),
    };
    deferred.map_err(Waker::wake).ok()
}

/// A chunk aims to run about this long (judging by the last chunk's time per item), so that
/// quick items share one hand-off and slow items go one by one. It is also how often a
/// consumer of CPU-bound items is woken (once per chunk, see [`make_job`]): with two workers
/// computing on two cores, chunks of 200 µs made the CPU-bound benchmark ~3 % slower.
const CHUNK_NANOS: u64 = 500_000;

/// Items measured to take less than this (nanoseconds, judging by the last chunk) are light: a
/// hand-off costs more than they do, so they go to the pool in chunks of up to
/// [`MAX_LIGHT_CHUNK_ITEMS`]. A chunk whose item has to wait still splits off the rest.
const LIGHT_NANOS: u64 = 250;

/// Items measured to take less than this (nanoseconds, judging by the last chunk) are run by
/// the consumer itself while a slot of the pool is free (see `Core::run_borrowed`): a chunk of
/// them costs less than its hand-off to a worker and back. Heavier items go to the workers, so
/// that CPU-bound work runs on every worker while the consumer keeps the window full. A chunk
/// of light items with a heavy one among them (say 1 in 100) still counts as light.
const BORROW_NANOS: u64 = 2_000;

/// Items measured to take at least this (nanoseconds, judging by the last chunk) hand each
/// outcome over as they finish (see [`make_job`]); quicker ones at their chunk's end. A
/// hand-off per item costs a lock of the stream's channel, and once per chunk a deferral of
/// the consumer's waker (see [`watch`]): tens of nanoseconds that would weigh on a request
/// group's trivial stages.
const HANDOVER_NANOS: u64 = 1_000;

/// The most light items in one chunk.
const MAX_LIGHT_CHUNK_ITEMS: usize = 256;

/// The most items in one chunk.
const MAX_CHUNK_ITEMS: usize = 32;

/// The consumer side shared by [`FanOutOrdered`] and [`FanOut`].
pub(crate) struct Core<U> {
    pool: WorkerPool,
    source: SourceId,
    chan: Arc<Chan<U>>,
    window: usize,
    /// Items submitted so far; the next item's sequence number.
    next_seq: u64,
    /// Items in the pool: submitted and not yet yielded.
    in_pool: usize,
    upstream_done: bool,
    /// Upstream was pending at the last pull: it is pulled whenever the window has room.
    upstream_lazy: bool,
    /// Jobs made in this poll, submitted together.
    jobs: Vec<Job>,
    /// Items queued in `jobs`.
    queued: usize,
    /// Results taken from the channel, not yet yielded.
    ready: VecDeque<Outcome<U>>,
    /// Jobs taken back from the pool to run on this stream's own task: when the stream is
    /// polled by one of its own pool's workers (a nested fan-out) and no worker started them.
    inline: VecDeque<Job>,
    /// Nested: the stream yielded once to let idle workers take its jobs before taking them back.
    yielded: bool,
}

impl<U: Send + 'static> Core<U> {
    pub(crate) fn new(pool: WorkerPool, ordered: bool) -> Self {
        let window = pool.default_window();
        let chan = Arc::new(Chan::new(ordered));
        let source = pool.register(Arc::downgrade(&chan) as Weak<dyn pool::Consumer>);
        Self {
            pool,
            source,
            chan,
            window,
            next_seq: 0,
            in_pool: 0,
            upstream_done: false,
            upstream_lazy: false,
            jobs: Vec::new(),
            queued: 0,
            ready: VecDeque::new(),
            inline: VecDeque::new(),
            yielded: false,
        }
    }

    /// The time per item measured so far (nanoseconds; `u64::MAX` before the first chunk).
    pub(crate) fn item_nanos(&self) -> u64 {
        self.chan.item_nanos.load(Ordering::Relaxed)
    }

    /// Seeds the time per item of a stream not measured yet with `nanos` (`u64::MAX`: no
    /// seed), measured by other streams of the same work, so that its first jobs are sized as
    /// if it had been measured.
    pub(crate) fn seed_item_nanos(&self, nanos: u64) {
        let unmeasured = u64::MAX;
        let item_nanos = &self.chan.item_nanos;
        let _ =
            item_nanos.compare_exchange(unmeasured, nanos, Ordering::Relaxed, Ordering::Relaxed);
    }

    #[track_caller]
    pub(crate) fn set_window(&mut self, window: usize) {
        or_panic(self.try_set_window(window));
    }

    pub(crate) fn try_set_window(&mut self, window: usize) -> Result<(), ConfigError> {
        window_size(window)?;
        self.window = window;
        Ok(())
    }

    /// Pulls upstream while the window has room, submits the futures, then yields a result.
    pub(crate) fn poll_next<S, F, Fut>(
        &mut self,
        mut stream: Pin<&mut S>,
        f: &mut F,
        cx: &mut Context<'_>,
    ) -> Poll<Option<U>>
    where
        S: Stream,
        F: FnMut(S::Item) -> Fut,
        Fut: Future<Output = U> + Send + 'static,
    {
        // While upstream keeps up, refill only once half the window is free, so that jobs reach
        // the pool in batches and idle workers are woken once per batch rather than once per
        // item. A lazy upstream (pending at the last pull) is pulled whenever the window has
        // room: batching would only leave its window half used.
        let refill = self.in_pool == 0
            || self.upstream_lazy
            || self.in_pool + self.window.div_ceil(2) <= self.window;
        if refill && !self.upstream_done && self.in_pool < self.window {
            let mut futs = Vec::new();
            self.upstream_lazy = false;
            while !self.upstream_done && self.in_pool + futs.len() < self.window {
                match stream.as_mut().poll_next(cx) {
                    Poll::Ready(Some(item)) => futs.push(f(item)),
                    Poll::Ready(None) => self.upstream_done = true,
                    Poll::Pending => {
                        self.upstream_lazy = true;
                        break;
                    }
                }
            }
            self.chunk(futs);
        }
        self.flush();
        if !self.inline.is_empty() {
            self.poll_inline(cx);
        }
        let poll = self.poll_result(cx);
        if poll.is_ready() {
            self.yielded = false;
            return poll;
        }
        if !self.pool.on_worker() {
            // About to wait: run this stream's own queued jobs here instead, under a slot
            // borrowed from the pool, while one is free.
            if self.run_borrowed(cx) {
                return self.poll_result(cx);
            }
            return poll;
        }
        // Nested on its own pool: this task holds one of the pool's workers, and every other
        // worker may be doing the same, so never wait for a job that no worker has started.
        // Let idle workers take the jobs first (yield once), then run what is left here.
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        if self.pool.reclaim(self.source, &mut self.inline) {
            self.poll_inline(cx);
            return self.poll_result(cx);
        }
        Poll::Pending
    }

    /// Runs this stream's queued jobs of light items (see [`BORROW_NANOS`]) on its own task, one
    /// at a time under a slot borrowed from
    /// the pool (so the pool's cap on running futures holds), until a result is ready, no slot
    /// is free, or no job is queued; returns whether it ran any. Saves the hand-off to a worker
    /// and back, which costs more than light items do. A job that has to wait goes back to the
    /// pool with the slot (a worker resumes it) and its unstarted items are split off as on a
    /// worker; the consumer then waits as usual.
    ///
    /// Only on a thread of the runtime the workers live on: a future run here then belongs to
    /// that runtime as it would on a worker.
    fn run_borrowed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.borrowable() || !self.pool.serves_here() {
            return false;
        }
        let Some(mut job) = self.pool.borrow_job(self.source) else {
            return false;
        };
        loop {
            let (poll, spilled) = self.pool.poll_borrowed(&mut job, cx);
            // A finished job hands back the waker of this very consumer: nothing to wake (the
            // caller registers again).
            let (pending, next) = match poll {
                Poll::Pending => (Some(job), false),
                Poll::Ready(_) => (
                    None,
                    self.chan.drain_ready(&mut self.ready) == 0 && self.borrowable(),
                ),
            };
            match self.pool.give_back(self.source, pending, spilled, next) {
                Some(more) => job = more,
                None => return true,
            }
        }
    }

    /// Whether the stream's items are light enough for its consumer to run them itself (see
    /// [`BORROW_NANOS`]). Heavy items (or not measured yet) stay with the workers: the consumer
    /// is free to refill the window and yield results meanwhile.
    fn borrowable(&self) -> bool {
        self.item_nanos() < BORROW_NANOS
    }

    /// Runs the jobs taken back from the pool, one at a time as a worker would (so the pool's
    /// cap on running futures still holds); their results reach the channel as usual.
    /// A job that has to wait splits off its unstarted items; they go back to the pool, where
    /// idle workers may take them (or this stream takes them back when it would wait again).
    fn poll_inline(&mut self, cx: &mut Context<'_>) {
        while let Some(job) = self.inline.front_mut() {
            let (poll, spilled) = pool::poll_collecting(job, cx);
            self.pool.requeue(self.source, spilled);
            if poll.is_pending() {
                return;
            }
            // A finished job hands back the waker of this very consumer: nothing to wake.
            self.inline.pop_front();
        }
    }

    /// Splits new futures into chunk jobs: as many items per chunk as take about
    /// [`CHUNK_NANOS`], and at least four chunks per worker (two before any is measured).
    fn chunk<Fut>(&mut self, futs: Vec<Fut>)
    where
        Fut: Future<Output = U> + Send + 'static,
    {
        let n = futs.len();
        if n == 0 {
            return;
        }
        let item_nanos = self.item_nanos();
        let size = if item_nanos < LIGHT_NANOS {
            // Still at least two chunks per worker, so that every worker gets a share.
            (n / (2 * self.pool.workers())).clamp(1, MAX_LIGHT_CHUNK_ITEMS)
        } else {
            // Before the first chunk is measured, share the items out between the workers, two
            // chunks each (a chunk whose item has to wait splits off the rest anyway); once
            // measured, four chunks each at least. Fewer first chunks matter to streams that end
            // within their first window: 10,000 request groups of 100 requests each made half
            // as many jobs, for ~30 % less memory per open group and more items/s.
            let (by_time, share) = match item_nanos {
                u64::MAX => (u64::MAX, 2),
                nanos => (CHUNK_NANOS / nanos.max(1), 4),
            };
            let by_share = n / (share * self.pool.workers());
            usize::try_from(by_time)
                .unwrap_or(usize::MAX)
                .min(by_share)
                .clamp(1, MAX_CHUNK_ITEMS)
        };
        let mut futs = futs.into_iter();
        let mut seq = self.next_seq;
        loop {
            let chunk: Vec<Fut> = futs.by_ref().take(size).collect();
            if chunk.is_empty() {
                break;
            }
            let len = chunk.len() as u64;
            self.jobs.push(make_job(chunk, seq, self.chan.clone()));
            seq += len;
        }
        self.next_seq += n as u64;
        self.in_pool += n;
        self.queued += n;
    }

    fn flush(&mut self) {
        if self.jobs.is_empty() {
            return;
        }
        {
            let mut state = self.chan.lock();
            if state.ordered {
                let n = self.queued;
                state.slots.extend(std::iter::repeat_with(|| None).take(n));
            }
        }
        self.queued = 0;
        self.pool.submit(self.source, &mut self.jobs);
    }

    fn poll_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<U>> {
        if self.ready.is_empty() && self.in_pool > 0 && self.chan.drain_ready(&mut self.ready) == 0
        {
            self.chan.consumer.register(cx.waker());
            if self.chan.drain_ready(&mut self.ready) == 0 {
                // About to wait on the pool: make sure it has workers (after registering, so
                // that workers going from now on wake this consumer to start fresh ones).
                self.pool.keep_serving();
            }
        }
        match self.ready.pop_front() {
            Some(outcome) => {
                self.in_pool -= 1;
                match outcome {
                    Ok(value) => Poll::Ready(Some(value)),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            None if self.upstream_done && self.in_pool == 0 => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl<U> Core<U> {
    pub(crate) fn is_terminated(&self) -> bool {
        self.upstream_done && self.in_pool == 0
    }

    /// The size hint of a stream whose upstream's hint is `upstream`.
    pub(crate) fn size_hint(&self, upstream: (usize, Option<usize>)) -> (usize, Option<usize>) {
        let upstream = match self.upstream_done {
            true => (0, Some(0)),
            false => upstream,
        };
        size_hint_plus(self.in_pool, upstream)
    }

    pub(crate) fn in_pool(&self) -> usize {
        self.in_pool
    }

    pub(crate) fn window(&self) -> usize {
        self.window
    }
}

impl<U> Drop for Core<U> {
    fn drop(&mut self) {
        self.chan.close();
        self.jobs.clear();
        self.inline.clear();
        self.pool.unregister(self.source);
    }
}

impl_debug!(impl[U] Core<U> => Core |this| {
    pool: &this.pool,
    window: &this.window,
    in_pool: &this.in_pool,
    upstream_done: &this.upstream_done,
});

macro_rules! fan_out_stream {
    ($(#[$doc:meta])* $name:ident, $ordered:expr) => {
        pin_project! {
            $(#[$doc])*
            #[must_use = "streams do nothing unless polled"]
            pub struct $name<S, F, U> {
                #[pin]
                stream: S,
                f: F,
                core: Core<U>,
            }
        }

        impl<S, F, U: Send + 'static> $name<S, F, U> {
            pub(crate) fn new(stream: S, pool: WorkerPool, f: F) -> Self {
                Self { stream, f, core: Core::new(pool, $ordered) }
            }

            fan_out_window!();
        }

        impl<S, F, Fut, U> Stream for $name<S, F, U>
        where
            S: Stream,
            F: FnMut(S::Item) -> Fut,
            Fut: Future<Output = U> + Send + 'static,
            U: Send + 'static,
        {
            type Item = U;

            fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<U>> {
                let this = self.project();
                this.core.poll_next(this.stream, this.f, cx)
            }

            fn size_hint(&self) -> (usize, Option<usize>) {
                self.core.size_hint(self.stream.size_hint())
            }
        }

        impl<S, F, U> FusedStream for $name<S, F, U>
        where
            Self: Stream,
        {
            fn is_terminated(&self) -> bool {
                self.core.is_terminated()
            }
        }

        impl_debug!(impl[S: fmt::Debug, F, U] $name<S, F, U> => $name |this| {
            stream: &this.stream,
            core: &this.core,
        } ..);
    };
}

fan_out_stream!(
    /// Stream for the [`fan_out_ordered`](crate::PipelineExt::fan_out_ordered) method.
    FanOutOrdered,
    true
);

fan_out_stream!(
    /// Stream for the [`fan_out`](crate::PipelineExt::fan_out) method.
    FanOut,
    false
);

#[cfg(all(test, stagepipe_loom))]
mod loom_model;
