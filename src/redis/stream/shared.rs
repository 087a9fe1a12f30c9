//! The state a source's reader task shares with the messages it handed out and with its
//! [`SourceHandle`]s: which ids are out, which are acknowledged and wait for the next `XACK`,
//! whether it is draining, and its counters.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::StreamError;

/// Where the reader task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Not spawned yet: the stream has not been polled.
    Idle,
    /// Reading (or draining).
    Running,
    /// Stopped: drained, or its stream dropped.
    Finished,
}

pub(super) struct State {
    pub(super) phase: Phase,
    pub(super) draining: bool,
    /// The stream was dropped.
    pub(super) stopped: bool,
    /// Ids handed out (in a message still alive, or waiting in the channel to the stream)
    /// and neither acknowledged nor dropped.
    pub(super) outstanding: HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// Ids acknowledged and not yet sent.
    pub(super) queued: Vec<Arc<str>>,
    /// When the oldest of `queued` was acknowledged.
    pub(super) queued_since: Option<Instant>,
    /// The last acknowledgements that could not be sent when the source stopped.
    pub(super) final_error: Option<StreamError>,
}

/// The counters behind [`SourceStats`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) read_commands: AtomicU64,
    pub(super) read: AtomicU64,
    pub(super) claimed: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) ack_commands: AtomicU64,
    pub(super) stale_acks: AtomicU64,
    pub(super) errors: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

pub(super) struct Shared {
    state: Mutex<State>,
    /// Wakes the reader task: draining started, the ack batch filled up or got its first id,
    /// or the last outstanding message settled while draining.
    pub(super) wake: Notify,
    /// Signalled when the task finishes.
    finished: Notify,
    pub(super) counters: Counters,
    pub(super) ack_max: usize,
}

impl Shared {
    pub(super) fn new(ack_max: usize) -> Self {
        Shared {
            state: Mutex::new(State {
                phase: Phase::Idle,
                draining: false,
                stopped: false,
                outstanding: HashSet::default(),
                queued: Vec::new(),
                queued_since: None,
                final_error: None,
            }),
            wake: Notify::new(),
            finished: Notify::new(),
            counters: Counters::default(),
            ack_max,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An id handed out has been acknowledged (`acked`) or dropped.
    pub(super) fn settle(&self, id: Arc<str>, acked: bool) {
        let mut state = self.lock();
        state.outstanding.remove(&id);
        let mut wake = state.draining && state.outstanding.is_empty();
        if acked && state.phase != Phase::Finished {
            state.queued.push(id);
            if state.queued.len() == 1 {
                state.queued_since = Some(Instant::now());
                wake = true;
            }
            wake |= state.queued.len() == self.ack_max;
        }
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Marks the task finished and tells every drain waiting for it.
    pub(super) fn finish(&self) {
        self.lock().phase = Phase::Finished;
        self.finished.notify_waiters();
    }

    async fn drain(&self) -> Result<(), StreamError> {
        {
            let mut state = self.lock();
            state.draining = true;
            if state.phase == Phase::Idle {
                state.phase = Phase::Finished;
            }
        }
        self.wake.notify_one();
        loop {
            let finished = self.finished.notified();
            let mut finished = std::pin::pin!(finished);
            finished.as_mut().enable();
            {
                let state = self.lock();
                if state.phase == Phase::Finished {
                    return match &state.final_error {
                        Some(e) => Err(e.clone()),
                        None => Ok(()),
                    };
                }
            }
            finished.await;
        }
    }

    fn stats(&self) -> SourceStats {
        let c = &self.counters;
        let (outstanding, unsent_acks) = {
            let state = self.lock();
            (state.outstanding.len(), state.queued.len())
        };
        SourceStats {
            read_commands: c.read_commands.load(Ordering::Relaxed),
            read: c.read.load(Ordering::Relaxed),
            claimed: c.claimed.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            ack_commands: c.ack_commands.load(Ordering::Relaxed),
            stale_acks: c.stale_acks.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            outstanding,
            unsent_acks,
        }
    }
}

/// A handle on a [`StreamSource`](super::StreamSource) that outlives the stream's move into
/// a pipeline: its graceful shutdown ([`drain`](Self::drain)) and its figures
/// ([`stats`](Self::stats)). `Clone` shares the one source.
#[derive(Clone)]
pub struct SourceHandle {
    pub(super) shared: Arc<Shared>,
}

impl SourceHandle {
    /// Shuts the source down gracefully and resolves when it is done: it reads and claims no
    /// more entries; the stream hands out what it had already read and then ends; the
    /// messages handed out finish (each acknowledged or dropped), and the last batch of
    /// acknowledgements is sent. Resolves at once if the stream was never polled, and as soon
    /// as its task has stopped if the stream has been dropped.
    ///
    /// Keep reading the stream until it ends (a pipeline that runs to its end does): messages
    /// it has not handed out yet keep the drain waiting. Bound the wait with
    /// [`tokio::time::timeout`] if the work itself may hang.
    ///
    /// # Errors
    ///
    /// The last acknowledgements could not be sent (Redis unreachable): those entries stay
    /// pending, and another consumer claims them after `claim_idle`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not stop the drain once started; calling `drain` again waits
    /// for the same end.
    pub async fn drain(&self) -> Result<(), StreamError> {
        self.shared.drain().await
    }

    /// The source's figures so far.
    pub fn stats(&self) -> SourceStats {
        self.shared.stats()
    }
}

impl fmt::Debug for SourceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The figures of a [`StreamSource`](super::StreamSource): what it read, claimed,
/// dead-lettered and acknowledged, and in how many commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceStats {
    /// `XREADGROUP` commands sent.
    pub read_commands: u64,
    /// New entries read (`XREADGROUP ... >`).
    pub read: u64,
    /// Entries claimed from idle consumers (`XAUTOCLAIM`), dead-lettered ones excluded.
    pub claimed: u64,
    /// Entries moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Ids sent in an `XACK`.
    pub acked: u64,
    /// `XACK` commands sent (each acknowledges a batch of ids).
    pub ack_commands: u64,
    /// Ids sent in an `XACK` that Redis found no longer pending: acknowledged already by
    /// another consumer that had it (one too slow for `claim_idle`), or dead-lettered.
    pub stale_acks: u64,
    /// Commands that failed.
    pub errors: u64,
    /// Messages handed out (or about to be) and not yet acknowledged or dropped.
    pub outstanding: usize,
    /// Acknowledgements waiting for the next `XACK`.
    pub unsent_acks: usize,
}
