//! Wake-ups a worker holds back, with a bound on how long.
//!
//! A worker running a chunk of items publishes each outcome to the stream's channel as its item
//! finishes. Waking the consumer for each one would cost a wake-up per item (for a consumer
//! polled by `block_on`, a thread unparked and a context switch each, taken from the cores the
//! workers compute on), so the worker holds the consumer's waker back until the chunk ends or
//! one of its items waits. The chunk's next item may run for long, though (spin on the CPU,
//! block its thread), and the worker cannot wake anyone before it ends. So a held waker is
//! [`defer`]red: handed to a process-wide background thread (`stagepipe-watch`) that wakes it
//! [`DELAY`] later (and at most [`TICK`] after that) unless the worker has [taken it
//! back](Deferred::take) by then. Results that finished reach their consumer within about
//! 2 ms of finishing, however long the items after them run.
//!
//! Registering is one short lock of a shared queue; taking back is one uncontended lock of the
//! entry. The thread is woken only when the queue was empty: while workers keep registering,
//! it sleeps until the first entry falls due, and at least [`TICK`], so it wakes at most once
//! per `TICK`, and finds most entries taken back (it just drops them). It starts lazily, at the
//! first registration, and parks without a timeout while nothing is queued.
//!
//! The clock is the real one: this bounds the delay of a hand-over in real time, which a paused
//! tokio clock would stop. Nothing shown to users is timed by it.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::{Duration, Instant};

/// How long after it was deferred the watch thread wakes a waker that was not taken back, at
/// the earliest; at the latest [`TICK`] later.
pub(super) const DELAY: Duration = Duration::from_millis(1);

/// The watch thread sleeps at least this long between two rounds while entries are queued, so
/// that it wakes at most once per `TICK` however many workers defer (once per chunk each).
const TICK: Duration = Duration::from_millis(1);

/// A waker held back by a worker: woken by the watch thread at its deadline unless taken back.
/// Dropping it takes it back without waking it.
pub(super) struct Deferred(Arc<Entry>);

struct Entry {
    due: Instant,
    waker: Mutex<Option<Waker>>,
}

impl Entry {
    fn take(&self) -> Option<Waker> {
        // An `Option` replaced in one step: a panic elsewhere cannot leave it inconsistent.
        self.waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Deferred {
    /// The waker, if the watch thread has not woken it yet.
    pub(super) fn take(self) -> Option<Waker> {
        self.0.take()
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// Defers `waker` (see the module's docs). `Err` gives it back if the watch thread cannot run:
/// the caller wakes it at once instead.
pub(super) fn defer(waker: Waker) -> Result<Deferred, Waker> {
    let entry = Arc::new(Entry {
        due: Instant::now() + DELAY,
        waker: Mutex::new(Some(waker)),
    });
    let mut watch = lock();
    if watch.thread == Thread::NotStarted {
        let spawned = std::thread::Builder::new()
            .name("stagepipe-watch".into())
            .spawn(run);
        // It locks the queue before it looks at it: it will see this entry.
        watch.thread = match spawned {
            Ok(_) => Thread::Awake,
            Err(_) => Thread::Unavailable,
        };
    }
    match watch.thread {
        Thread::Unavailable => {
            drop(watch);
            return Err(entry.take().expect("not shared yet"));
        }
        Thread::Idle => NOTIFY.notify_one(),
        Thread::NotStarted | Thread::Awake => {}
    }
    watch.queue.push_back(entry.clone());
    Ok(Deferred(entry))
}

/// The watch thread's queue, in order of deadline (every entry is due [`DELAY`] after it was
/// queued; two workers racing may queue theirs a few nanoseconds out of order, which delays the
/// later one by as much).
struct Watch {
    queue: VecDeque<Arc<Entry>>,
    thread: Thread,
}

/// What the watch thread is doing, for a registration to know whether to notify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thread {
    NotStarted,
    /// It could not be spawned: wakers are woken at once.
    Unavailable,
    /// Running, or asleep until the first entry falls due.
    Awake,
    /// Asleep until notified: the queue was empty.
    Idle,
}

static WATCH: Mutex<Watch> = Mutex::new(Watch {
    queue: VecDeque::new(),
    thread: Thread::NotStarted,
});

static NOTIFY: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, Watch> {
    // A queue and a plain value, each updated in one step.
    WATCH.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The watch thread: wakes the entries that fell due and were not taken back, then sleeps
/// until the next one falls due (or, with none queued, until one is).
fn run() {
    let mut due = Vec::new();
    let mut watch = lock();
    loop {
        let now = Instant::now();
        while watch.queue.front().is_some_and(|entry| entry.due <= now) {
            due.extend(watch.queue.pop_front());
        }
        if !due.is_empty() {
            watch.thread = Thread::Awake;
            drop(watch);
            for entry in due.drain(..) {
                if let Some(waker) = entry.take() {
                    // A waker that panics must not stop the watch for every other stream.
                    let _ = catch_unwind(AssertUnwindSafe(|| waker.wake()));
                }
            }
            watch = lock();
            continue;
        }
        watch = match watch.queue.front().map(|entry| entry.due) {
            Some(at) => {
                watch.thread = Thread::Awake;
                NOTIFY
                    .wait_timeout(watch, at.saturating_duration_since(now).max(TICK))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => {
                watch.thread = Thread::Idle;
                NOTIFY.wait(watch).unwrap_or_else(PoisonError::into_inner)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::task::Wake;

    struct Signal(Mutex<mpsc::Sender<()>>);

    impl Wake for Signal {
        fn wake(self: Arc<Self>) {
            let _ = self.0.lock().unwrap().send(());
        }
    }

    fn signal() -> (Waker, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        (Waker::from(Arc::new(Signal(Mutex::new(tx)))), rx)
    }

    #[test]
    fn a_deferred_waker_not_taken_back_is_woken() {
        let (waker, woken) = signal();
        let deferred = defer(waker).expect("the watch thread runs");
        // Held by the test: only the watch thread can wake it.
        assert!(woken.recv_timeout(Duration::from_secs(60)).is_ok());
        assert!(deferred.take().is_none(), "woken once, by the watch thread");
    }

    #[test]
    fn a_waker_taken_back_is_not_woken_by_the_watch() {
        let (waker, woken) = signal();
        let deferred = defer(waker).expect("the watch thread runs");
        let back = deferred.take().expect("taken back before its deadline");
        // A later entry falls due after the first one: once it is woken, the first one's
        // deadline has passed too, and the watch thread left it alone.
        let (later, later_woken) = signal();
        let _later = defer(later).expect("the watch thread runs");
        assert!(later_woken.recv_timeout(Duration::from_secs(60)).is_ok());
        assert!(woken.try_recv().is_err(), "woken although taken back");
        back.wake();
        assert!(woken.try_recv().is_ok());
    }

    #[test]
    fn a_dropped_deferral_leaves_no_waker_behind() {
        let (waker, woken) = signal();
        let count = Arc::new(());
        let guard = Waker::from(Arc::new(Guard {
            _alive: count.clone(),
            forward: Mutex::new(waker),
        }));
        drop(defer(guard).expect("the watch thread runs"));
        assert_eq!(
            Arc::strong_count(&count),
            1,
            "the waker was dropped with it"
        );
        let (later, later_woken) = signal();
        let _later = defer(later).expect("the watch thread runs");
        assert!(later_woken.recv_timeout(Duration::from_secs(60)).is_ok());
        assert!(woken.try_recv().is_err());
    }

    /// A waker that holds a count while it lives, and forwards a wake-up.
    struct Guard {
        _alive: Arc<()>,
        forward: Mutex<Waker>,
    }

    impl Wake for Guard {
        fn wake(self: Arc<Self>) {
            self.forward.lock().unwrap().wake_by_ref();
        }
    }
}
