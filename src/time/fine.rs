//! A fine timer: waits that end within a fraction of a millisecond of their deadline on a real
//! clock, with tokio's clock still the authority.
//!
//! tokio's timer has a resolution of one millisecond, and its driver parks for whole
//! milliseconds counted from the current tick, so a task sleeping on it wakes up to a little
//! more than a millisecond after its deadline. That is too coarse for a rate limiter whose
//! interval is a few microseconds.
//!
//! A [`Sleep`] therefore waits on two timers at once. It arms tokio's timer for its deadline,
//! exactly as `tokio::time::sleep_until` does, and it registers its task's waker with a
//! process-wide background thread (`stagepipe-timer`), which keeps the deadlines of the waits in
//! a map under a mutex and sleeps on a condition variable until the first one (on Linux,
//! `wait_timeout` returns within about 50–100 µs of it). On a real clock the thread wakes the
//! task at its deadline, before tokio's timer would, or [`GRAIN`] after the wait began if the
//! deadline is nearer than that. The thread is started by the first wait that needs it, and
//! parks without a timeout while no wait is registered.
//!
//! tokio's clock decides when a wait is over: a [`Sleep`] is ready once
//! `tokio::time::Instant::now()` has reached its deadline, whoever polls it. The fine timer is
//! asked only while tokio's clock agrees with the real one (within [`SKEW`]), and once per wait:
//! on a paused clock (`start_paused`, `time::advance`, auto-advance) it is mostly not asked at
//! all, and where it is (a clock paused a moment ago) and wakes the task before tokio's clock
//! reached the deadline, it is not asked again: the wait goes on on tokio's timer alone, which
//! drives a paused clock as before. So a wait costs at most one extra poll, never a spin, and
//! tokio's timer never wakes the task earlier than a plain tokio sleep would.
//!
//! An entry leaves the map when it fires or when its [`Sleep`] is reset, completes or is
//! dropped: the map holds only the waits in progress, and never keeps a waker (and so a task)
//! alive after its wait is gone.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;

/// An entry of the fine timer: its real-clock deadline, and a number that tells apart entries
/// with the same deadline.
type Key = (std::time::Instant, u64);

/// The fine timer's state, shared with its thread.
struct Timers {
    /// The wakers to wake, by deadline.
    entries: BTreeMap<Key, Waker>,
    next_id: u64,
    thread: Thread,
}

/// What the fine timer's thread is doing, for a registration to know whether to notify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thread {
    NotStarted,
    /// It could not be spawned: waits stay on tokio's timer.
    Unavailable,
    /// Waking the entries that fell due; it looks at the map again before it sleeps.
    Waking,
    /// Asleep until this instant, or (`None`) until notified.
    Sleeping(Option<std::time::Instant>),
}

static TIMERS: Mutex<Timers> = Mutex::new(Timers {
    entries: BTreeMap::new(),
    next_id: 0,
    thread: Thread::NotStarted,
});

static NOTIFY: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, Timers> {
    // The state is a map and two plain values, each updated in one step: a panic elsewhere
    // cannot leave it inconsistent.
    TIMERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `waker` to be woken at `deadline` (on the real clock): the entry's key, or `None`
/// if the fine timer's thread cannot run.
fn register(deadline: std::time::Instant, waker: &Waker) -> Option<Key> {
    let mut timers = lock();
    match timers.thread {
        Thread::NotStarted => {
            let spawned = std::thread::Builder::new()
                .name("stagepipe-timer".into())
                .spawn(run);
            timers.thread = match spawned {
                // It locks the state before it looks at the map: it will see this entry.
                Ok(_) => Thread::Waking,
                Err(_) => Thread::Unavailable,
            };
        }
        Thread::Unavailable => return None,
        Thread::Waking | Thread::Sleeping(_) => {}
    }
    if timers.thread == Thread::Unavailable {
        return None;
    }
    let key = (deadline, timers.next_id);
    timers.next_id += 1;
    timers.entries.insert(key, waker.clone());
    if let Thread::Sleeping(until) = timers.thread {
        if until.is_none_or(|until| deadline < until) {
            NOTIFY.notify_one();
        }
    }
    Some(key)
}

/// The fine timer's thread: wakes every entry whose deadline has passed, then sleeps until the
/// next deadline (or until notified of an earlier one).
fn run() {
    let mut due = Vec::new();
    let mut timers = lock();
    loop {
        let now = std::time::Instant::now();
        while let Some(entry) = timers.entries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        if !due.is_empty() {
            timers.thread = Thread::Waking;
            drop(timers);
            for waker in due.drain(..) {
                // A waker that panics must not stop the timer for every other wait.
                let _ = catch_unwind(AssertUnwindSafe(|| waker.wake()));
            }
            timers = lock();
            continue;
        }
        let next = timers.entries.first_key_value().map(|(key, _)| key.0);
        timers.thread = Thread::Sleeping(next);
        timers = match next {
            Some(at) => {
                NOTIFY
                    .wait_timeout(timers, at.saturating_duration_since(now))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => NOTIFY.wait(timers).unwrap_or_else(PoisonError::into_inner),
        };
    }
}

/// A [`Sleep`]'s entry with the fine timer, removed when the sleep is reset or dropped.
#[derive(Debug, Default)]
struct Entry {
    /// The entry's key, while it may still be in the map.
    key: Option<Key>,
    /// The waker it was registered with, to see whether a poll brings a new one.
    waker: Option<Waker>,
}

impl Entry {
    fn register(&mut self, deadline: std::time::Instant, waker: &Waker) -> bool {
        self.key = register(deadline, waker);
        self.waker = self.key.map(|_| waker.clone());
        self.key.is_some()
    }

    /// Updates the registered waker to `waker` if it would not wake the same task: `false` if
    /// the entry is gone (it fired).
    fn update(&mut self, waker: &Waker) -> bool {
        let Some(key) = self.key else {
            return false;
        };
        if self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            return true;
        }
        match lock().entries.get_mut(&key) {
            Some(registered) => {
                registered.clone_from(waker);
                self.waker = Some(waker.clone());
                true
            }
            None => {
                self.cancel();
                false
            }
        }
    }

    /// Removes the entry if it has not fired.
    fn cancel(&mut self) {
        self.waker = None;
        if let Some(key) = self.key.take() {
            // Taken out under the lock, dropped after it.
            let waker = lock().entries.remove(&key);
            drop(waker);
        }
    }

    /// Whether the entry is still in the fine timer's map.
    #[cfg(test)]
    fn is_registered(&self) -> bool {
        self.key
            .is_some_and(|key| lock().entries.contains_key(&key))
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.cancel();
    }
}

pin_project! {
    /// Waits until tokio's clock reaches a deadline, waking within a fraction of a millisecond
    /// of it on a real clock (see the [module docs](self)).
    pub(crate) struct Sleep {
        #[pin]
        sleep: tokio::time::Sleep,
        deadline: Instant,
        // Whether this wait has asked the fine timer (once at most: a wake-up that came too
        // early for tokio's clock is not renewed).
        asked: bool,
        entry: Entry,
    }
}

/// Waits until `deadline` on tokio's clock, with the fine timer's precision on a real clock.
pub(crate) fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        sleep: tokio::time::sleep_until(deadline),
        deadline,
        asked: false,
        entry: Entry::default(),
    }
}

/// The instant on the real clock as far from now as `deadline` is from `now` on tokio's, if
/// tokio's clock follows the real one (it is not paused, nor moved by hand by more than
/// [`SKEW`]).
fn real_deadline(deadline: Instant, now: Instant) -> Option<std::time::Instant> {
    let real_now = std::time::Instant::now();
    let now = now.into_std();
    let skew = real_now
        .checked_duration_since(now)
        .unwrap_or_else(|| now.duration_since(real_now));
    if skew > SKEW {
        return None;
    }
    let wait = deadline.saturating_duration_since(now.into()).max(GRAIN);
    real_now.checked_add(wait)
}

/// The shortest wait the fine timer makes: a wait for a deadline nearer than this is woken this
/// long after it began (tokio's clock still decides that it is over, see [`Sleep`]).
///
/// Each wake-up costs two threads a context switch and a few system calls. A waiter whose
/// interval is a few microseconds would otherwise be woken tens of thousands of times a second
/// to release a few cells each time; with a grain of a quarter tick it is woken about 3 000
/// times a second and releases the cells that fell due meanwhile at once (a rate limiter makes
/// up to one tick of a waiter's lateness, so none is lost), while a wait longer than the grain
/// is woken at its deadline.
const GRAIN: Duration = Duration::from_micros(250);

/// How far tokio's clock may be from the real one for the fine timer to be used: on a real
/// clock the two agree (tokio reads the same clock); a paused clock soon parts from it.
const SKEW: Duration = Duration::from_millis(1);

impl Sleep {
    /// The deadline this sleep waits for.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Waits for `deadline` instead, as a new [`sleep_until`] would.
    pub(crate) fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.project();
        this.entry.cancel();
        *this.asked = false;
        *this.deadline = deadline;
        this.sleep.reset(deadline);
    }

    /// Whether this sleep has an entry in the fine timer's map.
    #[cfg(test)]
    fn is_registered(&self) -> bool {
        self.entry.is_registered()
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let deadline = *this.deadline;
        loop {
            let now = Instant::now();
            if now >= deadline {
                this.entry.cancel();
                return Poll::Ready(());
            }
            // tokio's own timer for the deadline: it alone drives a paused clock.
            if this.sleep.as_mut().poll(cx).is_ready() {
                // It fired before its deadline by tokio's clock (never expected): again.
                this.sleep.as_mut().reset(deadline);
                continue;
            }
            if !*this.asked {
                *this.asked = true;
                if let Some(at) = real_deadline(deadline, now) {
                    this.entry.register(at, cx.waker());
                }
            } else {
                // Still waiting for the fine timer, or it fired too early for tokio's clock (a
                // paused one) and is not asked again.
                this.entry.update(cx.waker());
            }
            return Poll::Pending;
        }
    }
}

impl std::fmt::Debug for Sleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sleep")
            .field("deadline", &self.deadline)
            .field("fine", &self.entry.key.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::task::Wake;

    use super::*;

    /// A waker that counts its wakes and reports each on a channel.
    struct Counting {
        wakes: AtomicUsize,
        tx: Mutex<mpsc::Sender<()>>,
    }

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            let _ = self.tx.lock().unwrap().send(());
        }
    }

    fn counting() -> (Arc<Counting>, Waker, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let counting = Arc::new(Counting {
            wakes: AtomicUsize::new(0),
            tx: Mutex::new(tx),
        });
        let waker = Waker::from(Arc::clone(&counting));
        (counting, waker, rx)
    }

    /// A sleep for `deadline` on a clock paused just now, polled once with `cx`, registered with
    /// the fine timer. (Paused again until the fine timer is asked: a stall between the pause
    /// and the poll parts the clocks, and then it is rightly not asked.)
    fn registered_on_a_clock_paused_just_now(cx: &mut Context<'_>) -> (Pin<Box<Sleep>>, Instant) {
        loop {
            tokio::time::pause();
            let deadline = Instant::now() + Duration::from_micros(1_500);
            let mut sleep = Box::pin(sleep_until(deadline));
            assert!(sleep.as_mut().poll(cx).is_pending());
            if sleep.entry.key.is_some() {
                return (sleep, deadline);
            }
            tokio::time::resume();
        }
    }

    /// The fine timer follows the real clock: on a paused one it may fire before tokio's clock
    /// reaches the deadline. It fires once, and the sleep then ends on tokio's timer, which
    /// wakes it as a plain tokio sleep would.
    #[tokio::test]
    async fn on_a_paused_clock_an_early_fine_wake_is_not_renewed() {
        let (counting, waker, rx) = counting();
        let mut cx = Context::from_waker(&waker);
        let (mut sleep, deadline) = registered_on_a_clock_paused_just_now(&mut cx);
        // The paused clock stands still while the fine timer's thread wakes the task.
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the fine timer wakes the task");
        assert_eq!(counting.wakes.load(Ordering::SeqCst), 1);
        for _ in 0..3 {
            assert!(sleep.as_mut().poll(&mut cx).is_pending());
            assert!(!sleep.is_registered());
        }
        assert_eq!(counting.wakes.load(Ordering::SeqCst), 1);

        tokio::time::advance(Duration::from_micros(1_499)).await;
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        assert_eq!(counting.wakes.load(Ordering::SeqCst), 1);
        // tokio's timer fires on a millisecond tick after the deadline, as a plain tokio sleep
        // would: which one depends on where the clock was paused within a tick (counted from
        // the runtime's start), so move on to one that is past the deadline whatever that was.
        tokio::time::advance(Duration::from_micros(1_501)).await;
        assert_eq!(counting.wakes.load(Ordering::SeqCst), 2);
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
        assert!(Instant::now() > deadline);
        assert!(!sleep.is_registered());
    }

    /// Ready as soon as tokio's clock has reached the deadline, however it got there; the
    /// entry is gone then.
    #[tokio::test]
    async fn ready_once_tokios_clock_reaches_the_deadline() {
        let (_counting, waker, _rx) = counting();
        let mut cx = Context::from_waker(&waker);
        let (mut sleep, deadline) = registered_on_a_clock_paused_just_now(&mut cx);
        tokio::time::advance(Duration::from_micros(1_499)).await;
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        tokio::time::advance(Duration::from_micros(1)).await;
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
        assert!(!sleep.is_registered());
        assert_eq!(Instant::now(), deadline);
    }

    /// Once a paused clock has moved away from the real one, the fine timer is not asked.
    #[tokio::test(start_paused = true)]
    async fn a_clock_moved_by_hand_does_without_the_fine_timer() {
        tokio::time::advance(Duration::from_secs(3600)).await;
        let (counting, waker, _rx) = counting();
        let mut cx = Context::from_waker(&waker);
        let deadline = Instant::now() + Duration::from_micros(100);
        let mut sleep = Box::pin(sleep_until(deadline));
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        assert!(sleep.entry.key.is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(counting.wakes.load(Ordering::SeqCst), 1);
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
    }

    /// Dropping or resetting a sleep takes its entry out of the map: no waker (so no task) is
    /// kept alive by the fine timer.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_or_reset_sleep_leaves_no_waker_behind() {
        let (counting, waker, _rx) = counting();
        // An entry an hour away on the real clock: it cannot fire during the test.
        let mut entry = Entry::default();
        assert!(entry.register(
            std::time::Instant::now() + Duration::from_secs(3600),
            &waker
        ));
        assert!(entry.is_registered());
        // ours, the waker's, the map's copy and the entry's
        assert_eq!(Arc::strong_count(&counting), 4);
        drop(entry);
        assert_eq!(Arc::strong_count(&counting), 2);

        let mut entry = Entry::default();
        assert!(entry.register(
            std::time::Instant::now() + Duration::from_secs(3600),
            &waker
        ));
        entry.cancel();
        assert!(!entry.is_registered());
        assert_eq!(Arc::strong_count(&counting), 2);
        drop(waker);
        assert_eq!(Arc::strong_count(&counting), 1);
        assert_eq!(counting.wakes.load(Ordering::SeqCst), 0);
    }

    /// A new waker replaces the registered one; the old task is not woken.
    #[test]
    fn a_new_waker_replaces_the_registered_one() {
        let (first, waker1, rx1) = counting();
        let (second, waker2, rx2) = counting();
        let mut entry = Entry::default();
        assert!(entry.register(
            std::time::Instant::now() + Duration::from_millis(1),
            &waker1
        ));
        if entry.update(&waker2) {
            rx2.recv_timeout(Duration::from_secs(30))
                .expect("the fine timer wakes the task");
            assert_eq!(second.wakes.load(Ordering::SeqCst), 1);
            assert_eq!(first.wakes.load(Ordering::SeqCst), 0);
        } else {
            // (It fired before the update: the first waker had it.)
            rx1.recv_timeout(Duration::from_secs(30))
                .expect("the fine timer wakes the task");
            assert_eq!(second.wakes.load(Ordering::SeqCst), 0);
        }
        assert!(!entry.is_registered());
    }
}
