//! [`KeyedRateLimiter`]: one quota per key.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::Quota;
use tokio::time::sleep_until;

use super::gcra::{Credit, Gcra, Timeline};
use super::quota_of;
use crate::error::{ConfigError, nonzero, or_panic};

/// Below this many keys the map is never swept.
const MIN_SWEEP: usize = 64;

/// A rate limit per key (per tenant, per host, ...): every key gets its own quota, and every
/// clone of the handle shares the same per-key state.
///
/// Used by [`rate_limit_by`](crate::PipelineExt::rate_limit_by) and directly with
/// [`until_key_ready`](Self::until_key_ready). Each key follows the same GCRA rules and accuracy
/// promises as [`RateLimiter`](crate::RateLimiter).
///
/// # Memory
///
/// A key's state is only kept while it still matters: once a key has been idle long enough to
/// regain its full burst, plus one timer tick (the most a late waiter may make up), its state
/// equals a fresh key's and may be dropped. The map is swept of such keys whenever it has
/// doubled since the last sweep (and [`retain_recent`](Self::retain_recent) sweeps on demand),
/// so memory is bounded by the keys active within about one burst period.
///
/// ```
/// use std::time::Duration;
/// use stagepipe::KeyedRateLimiter;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let limiter = KeyedRateLimiter::per_second(10);
/// let start = Instant::now();
/// limiter.until_key_ready(&"alice").await;
/// limiter.until_key_ready(&"bob").await; // another key: at once
/// assert_eq!(start.elapsed(), Duration::ZERO);
/// limiter.until_key_ready(&"alice").await; // alice's second cell: 100 ms later
/// assert_eq!(start.elapsed(), Duration::from_millis(100));
/// # }
/// ```
pub struct KeyedRateLimiter<K> {
    shared: Arc<Shared<K>>,
    /// This handle's own credit for timer lateness, and the key it was earned on, for
    /// [`until_key_ready`](Self::until_key_ready).
    credit: Mutex<Option<(K, Credit)>>,
}

pub(super) struct Shared<K> {
    gcra: Gcra,
    pub(super) clock: Timeline,
    keys: Mutex<Keys<K>>,
}

struct Keys<K> {
    states: HashMap<K, KeyState>,
    sweep_at: usize,
}

/// One key's schedules: its slots (`tat`) and its releases (see [`Gcra::release`]).
#[derive(Debug, Clone, Copy, Default)]
struct KeyState {
    tat: u64,
    released: u64,
}

impl<K> Shared<K> {
    fn lock(&self) -> MutexGuard<'_, Keys<K>> {
        // The state is a map of plain numbers: a panic elsewhere cannot leave it inconsistent.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Hash + Eq + Clone> Shared<K> {
    /// Reserves `key`'s next slot for a cell taken as of `arrival` (at most one tick before
    /// `now`): `(deadline, tat before, tat after)`; the slot is due at once if
    /// `deadline <= now`.
    pub(super) fn reserve(&self, key: &K, arrival: u64, now: u64) -> (u64, u64, u64) {
        let mut keys = self.lock();
        let state = keys.entry(&self.gcra, key, now);
        let (deadline, after) = self.gcra.reserve(state.tat, arrival);
        // The slot's own start (the deadline if the key was idle): the slot is `after - before`.
        let before = state.tat.max(deadline);
        state.tat = after;
        (deadline, before, after)
    }

    /// Releases a cell of `key` whose slot is due, at `now`; `Err(at)` if it must wait until
    /// `at` so that no window holds more than `burst + (T + 1 ms) / interval` of the key's cells.
    pub(super) fn release(&self, key: &K, now: u64) -> Result<(), u64> {
        let mut keys = self.lock();
        let state = keys.entry(&self.gcra, key, now);
        state.released = self.gcra.release(state.released, now)?;
        Ok(())
    }

    pub(super) fn refund(&self, key: &K, before: u64, after: u64) {
        // As `Tat::refund`: the last slot is undone; an earlier one shortens the key's line by
        // one slot, since its release schedule bounds the rate anyway.
        if let Some(state) = self.lock().states.get_mut(key) {
            state.tat = if state.tat == after {
                before
            } else {
                state.tat.saturating_sub(after - before)
            };
        }
    }
}

impl<K: Hash + Eq + Clone> Keys<K> {
    /// `key`'s state, inserted fresh if it has none (sweeping idle keys first if the map has
    /// doubled since the last sweep).
    fn entry(&mut self, gcra: &Gcra, key: &K, now: u64) -> &mut KeyState {
        // (`HashMap::entry` would need an owned key on every call: the key is cloned only to
        // be inserted.)
        if !self.states.contains_key(key) {
            if self.states.len() >= self.sweep_at {
                self.sweep(gcra, now);
            }
            self.states.insert(key.clone(), KeyState::default());
        }
        self.states.get_mut(key).expect("inserted above")
    }
}

impl<K> Keys<K> {
    fn sweep(&mut self, gcra: &Gcra, now: u64) {
        self.states
            .retain(|_, s| !gcra.is_idle(s.tat, s.released, now));
        self.sweep_at = (self.states.len() * 2).max(MIN_SWEEP);
    }
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
    /// At most `rate` cells per second for each key, burst 1 (change it with
    /// [`burst`](Self::burst)).
    ///
    /// # Panics
    ///
    /// If `rate` is zero. [`try_per_second`](Self::try_per_second) returns the error instead.
    #[track_caller]
    pub fn per_second(rate: u32) -> Self {
        or_panic(Self::try_per_second(rate))
    }

    /// [`per_second`](Self::per_second), returning a [`ConfigError`] naming `rate` if it is zero.
    pub fn try_per_second(rate: u32) -> Result<Self, ConfigError> {
        Gcra::try_per_second(rate).map(Self::from_gcra)
    }

    /// One cell per `period` for each key, burst 1 (change it with [`burst`](Self::burst)).
    ///
    /// # Panics
    ///
    /// If `period` is zero. [`try_per`](Self::try_per) returns the error instead.
    #[track_caller]
    pub fn per(period: Duration) -> Self {
        or_panic(Self::try_per(period))
    }

    /// [`per`](Self::per), returning a [`ConfigError`] naming `period` if it is zero.
    pub fn try_per(period: Duration) -> Result<Self, ConfigError> {
        Gcra::try_per(period).map(Self::from_gcra)
    }

    /// Allows each key up to `b` cells at once after an idle spell.
    ///
    /// This builds a new limiter: call it before sharing the handle.
    ///
    /// # Panics
    ///
    /// If `b` is zero. [`try_burst`](Self::try_burst) returns the error instead.
    #[track_caller]
    #[must_use]
    pub fn burst(self, b: u32) -> Self {
        or_panic(self.try_burst(b))
    }

    /// [`burst`](Self::burst), returning a [`ConfigError`] naming `b` if it is zero.
    pub fn try_burst(self, b: u32) -> Result<Self, ConfigError> {
        nonzero("b", u64::from(b))?;
        Ok(Self::from_gcra(self.shared.gcra.with_burst(b)))
    }

    fn from_gcra(gcra: Gcra) -> Self {
        Self::from_shared(Arc::new(Shared {
            gcra,
            clock: Timeline::new(),
            keys: Mutex::new(Keys {
                states: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }))
    }

    /// Waits until one cell for `key` conforms to its quota and takes it.
    ///
    /// As with [`RateLimiter::until_ready`](crate::RateLimiter::until_ready), a call whose timer
    /// fired late keeps that lateness (at most one timer tick) as this handle's credit for
    /// `key`: only the next call for the same key through the same handle, within one tick, is
    /// served as of that much earlier. Other keys, handles and streams never see it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes gives the key's slot back, whatever the order in
    /// which that key's waiters are dropped.
    pub async fn until_key_ready(&self, key: &K) {
        let shared = &*self.shared;
        let now = shared.clock.now();
        let arrival = match &*self.lock_credit() {
            Some((credited, credit)) if credited == key => credit.arrival(now),
            _ => now,
        };
        let (deadline, before, after) = shared.reserve(key, arrival, now);
        let wake_at = if deadline > now {
            deadline
        } else {
            match shared.release(key, now) {
                Ok(()) => return,
                Err(at) => at,
            }
        };
        let slot = KeySlot {
            shared,
            key,
            deadline,
            before,
            after,
            armed: true,
        };
        let credit = slot.wait(wake_at).await;
        *self.lock_credit() = Some((key.clone(), credit));
    }

    fn lock_credit(&self) -> MutexGuard<'_, Option<(K, Credit)>> {
        // A key and two numbers, written at once: never inconsistent.
        self.credit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one cell for `key` if it conforms now, without waiting: `true` if it was taken.
    ///
    /// A check never makes up any waiter's timer lateness: it sees the key's quota as of now.
    pub fn check_key(&self, key: &K) -> bool {
        let gcra = &self.shared.gcra;
        let now = self.shared.clock.now();
        let mut keys = self.shared.lock();
        let state = keys.states.get(key).copied().unwrap_or_default();
        let (deadline, tat) = gcra.reserve(state.tat, now);
        if deadline > now {
            return false;
        }
        let Ok(released) = gcra.release(state.released, now) else {
            return false;
        };
        *keys.entry(gcra, key, now) = KeyState { tat, released };
        true
    }

    /// Drops the state of every key that has regained its full burst for at least one timer
    /// tick (it equals a fresh key's).
    pub fn retain_recent(&self) {
        let now = self.shared.clock.now();
        self.shared.lock().sweep(&self.shared.gcra, now);
    }

    /// The number of keys whose state is kept.
    pub fn len(&self) -> usize {
        self.shared.lock().states.len()
    }

    /// Whether no key's state is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K> KeyedRateLimiter<K> {
    /// The average time between two cells of one key.
    pub fn interval(&self) -> Duration {
        self.shared.gcra.interval()
    }

    /// How many cells of one key may pass at once after an idle spell.
    pub fn burst_size(&self) -> u32 {
        self.shared.gcra.burst()
    }

    /// The per-key [`Quota`].
    pub fn quota(&self) -> Quota {
        quota_of(&self.shared.gcra)
    }

    pub(super) fn shared(&self) -> &Arc<Shared<K>> {
        &self.shared
    }

    fn from_shared(shared: Arc<Shared<K>>) -> Self {
        Self {
            shared,
            credit: Mutex::new(None),
        }
    }
}

/// A reserved slot of one key whose deadline is still ahead: given back if dropped before it is
/// released.
struct KeySlot<'a, K: Hash + Eq + Clone> {
    shared: &'a Shared<K>,
    key: &'a K,
    deadline: u64,
    before: u64,
    after: u64,
    armed: bool,
}

impl<K: Hash + Eq + Clone> KeySlot<'_, K> {
    /// Sleeps (first until `wake_at`) until the slot is due and its cell may be released, and
    /// releases it; returns the waiter's credit.
    async fn wait(mut self, mut wake_at: u64) -> Credit {
        let now = loop {
            sleep_until(self.shared.clock.instant(wake_at)).await;
            let now = self.shared.clock.now();
            if now < self.deadline {
                wake_at = self.deadline;
                continue;
            }
            match self.shared.release(self.key, now) {
                Ok(()) => break now,
                Err(at) => wake_at = at,
            }
        };
        self.armed = false;
        Credit::after_wait(self.deadline, now)
    }
}

impl<K: Hash + Eq + Clone> Drop for KeySlot<'_, K> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.refund(self.key, self.before, self.after);
        }
    }
}

impl<K> Clone for KeyedRateLimiter<K> {
    /// Another handle on the same per-key state, with a credit of its own (see
    /// [`until_key_ready`](Self::until_key_ready)).
    fn clone(&self) -> Self {
        Self::from_shared(Arc::clone(&self.shared))
    }
}

impl<K: Hash + Eq + Clone> From<Quota> for KeyedRateLimiter<K> {
    /// A keyed limiter enforcing `quota` per key, with the quota's own burst.
    fn from(quota: Quota) -> Self {
        Self::from_gcra(Gcra::from_quota(&quota))
    }
}

impl<K> From<&KeyedRateLimiter<K>> for KeyedRateLimiter<K> {
    /// A clone of the handle: the per-key state is shared.
    fn from(limiter: &KeyedRateLimiter<K>) -> Self {
        limiter.clone()
    }
}

impl<K> fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("interval", &self.interval())
            .field("burst", &self.burst_size())
            .field("keys", &self.shared.lock().states.len())
            .finish_non_exhaustive()
    }
}
