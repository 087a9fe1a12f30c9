//! [`Drain`]: which groups a pipeline has open, and its graceful shutdown.

use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{Arc, AtomicWaker, Mutex, Notify, Weak};

/// A pipeline's drain: whether it is draining, the groups opened and closed so far, the open
/// groups to tell when it starts (or times out), and a signal when a group closes.
#[derive(Default)]
pub(super) struct Drain {
    draining: AtomicBool,
    /// Set when a drain timed out: the groups still open end at once.
    aborted: AtomicBool,
    /// Groups opened so far (a `through` stream counts as one).
    opened: AtomicU64,
    /// Groups closed so far.
    closed: AtomicU64,
    /// The open groups (and some closed ones, pruned as the list grows).
    groups: Mutex<Vec<Weak<AtomicWaker>>>,
    /// Signalled whenever a group closes.
    signal: Notify,
}

impl Drain {
    pub(super) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(super) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Ends every group still open: each ends at its next poll (woken now).
    pub(super) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.wake_groups();
    }

    fn wake_groups(&self) {
        let groups: Vec<Weak<AtomicWaker>> = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for group in groups.iter().filter_map(Weak::upgrade) {
            group.wake();
        }
    }

    /// Registers a new group's waker slot, woken when draining starts.
    pub(super) fn register(&self, waker: &Arc<AtomicWaker>) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if groups.len() >= 64 && groups.len().is_power_of_two() {
            groups.retain(|g| g.strong_count() > 0);
        }
        groups.push(Arc::downgrade(waker));
    }

    /// A group has opened.
    pub(super) fn group_opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// A group has closed.
    pub(super) fn group_closed(&self) {
        self.closed.fetch_add(1, Ordering::AcqRel);
        self.signal.notify_waiters();
    }

    /// Groups opened and closed so far, for the figures.
    pub(super) fn groups(&self) -> (u64, u64) {
        (
            self.opened.load(Ordering::Relaxed),
            self.closed.load(Ordering::Relaxed),
        )
    }

    /// Starts draining (no new groups or submissions from now on, every open group told) and
    /// resolves once every group has closed.
    pub(super) async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.wake_groups();
        loop {
            let closed = self.signal.notified();
            let mut closed = std::pin::pin!(closed);
            closed.as_mut().enable();
            if self.closed.load(Ordering::Acquire) >= self.opened.load(Ordering::Acquire) {
                return;
            }
            closed.await;
        }
    }
}
