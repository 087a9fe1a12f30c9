//! [`KeyedRateLimiter`]: one quota per key.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::Quota;
use tokio::time::{Instant, sleep_until};

use super::gcra::{Gcra, Timeline};
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
/// regain its full burst, its state equals a fresh key's and may be dropped. The map is swept of
/// such keys whenever it has doubled since the last sweep (and [`retain_recent`](Self::retain_recent)
/// sweeps on demand), so memory is bounded by the keys active within about one burst period.
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
}

pub(super) struct Shared<K> {
    gcra: Gcra,
    pub(super) clock: Timeline,
    keys: Mutex<Keys<K>>,
}

struct Keys<K> {
    tats: HashMap<K, u64>,
    sweep_at: usize,
}

impl<K> Shared<K> {
    fn lock(&self) -> MutexGuard<'_, Keys<K>> {
        // The state is a map of plain numbers: a panic elsewhere cannot leave it inconsistent.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Hash + Eq + Clone> Shared<K> {
    /// Reserves `key`'s next slot: `None` if the cell conforms at once.
    pub(super) fn reserve(&self, key: &K, now: Instant) -> Option<(u64, u64, u64)> {
        let now = self.clock.nanos(now);
        let effective = self.clock.effective(now);
        let mut keys = self.lock();
        let (deadline, before, after) = match keys.tats.get_mut(key) {
            Some(tat) => {
                let before = *tat;
                let (deadline, after) = self.gcra.reserve(before, effective);
                *tat = after;
                (deadline, before, after)
            }
            None => {
                let (deadline, after) = self.gcra.reserve(0, effective);
                keys.insert(&self.gcra, key.clone(), after, effective);
                (deadline, 0, after)
            }
        };
        (deadline > now).then_some((deadline, before, after))
    }

    pub(super) fn refund(&self, key: &K, before: u64, after: u64) {
        let mut keys = self.lock();
        if let Some(tat) = keys.tats.get_mut(key) {
            if *tat == after {
                *tat = before;
            }
        }
    }
}

impl<K: Hash + Eq> Keys<K> {
    fn insert(&mut self, gcra: &Gcra, key: K, tat: u64, now: u64) {
        if self.tats.len() >= self.sweep_at {
            self.sweep(gcra, now);
        }
        self.tats.insert(key, tat);
    }

    fn sweep(&mut self, gcra: &Gcra, now: u64) {
        self.tats.retain(|_, tat| !gcra.is_idle(*tat, now));
        self.sweep_at = (self.tats.len() * 2).max(MIN_SWEEP);
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
    /// If `b` is zero.
    #[track_caller]
    #[must_use]
    pub fn burst(self, b: u32) -> Self {
        or_panic(nonzero("b", u64::from(b)));
        Self::from_gcra(self.shared.gcra.with_burst(b))
    }

    fn from_gcra(gcra: Gcra) -> Self {
        Self {
            shared: Arc::new(Shared {
                gcra,
                clock: Timeline::new(),
                keys: Mutex::new(Keys {
                    tats: HashMap::new(),
                    sweep_at: MIN_SWEEP,
                }),
            }),
        }
    }

    /// Waits until one cell for `key` conforms to its quota and takes it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes gives the key's slot back if no later slot was
    /// reserved for that key since.
    pub async fn until_key_ready(&self, key: &K) {
        if let Some((deadline, before, after)) = self.shared.reserve(key, Instant::now()) {
            let mut slot = KeySlot {
                shared: &self.shared,
                key,
                before,
                after,
                armed: true,
            };
            sleep_until(self.shared.clock.instant(deadline)).await;
            slot.armed = false;
            let now = self.shared.clock.nanos(Instant::now());
            self.shared.clock.woke(deadline, now);
        }
    }

    /// Takes one cell for `key` if it conforms now, without waiting: `true` if it was taken.
    pub fn check_key(&self, key: &K) -> bool {
        let now = self.shared.clock.nanos(Instant::now());
        let effective = self.shared.clock.effective(now);
        let mut keys = self.shared.lock();
        let before = keys.tats.get(key).copied().unwrap_or(0);
        let (deadline, after) = self.shared.gcra.reserve(before, effective);
        if deadline > now {
            return false;
        }
        match keys.tats.get_mut(key) {
            Some(tat) => *tat = after,
            None => keys.insert(&self.shared.gcra, key.clone(), after, effective),
        }
        true
    }

    /// Drops the state of every key that has regained its full burst (it equals a fresh key's).
    pub fn retain_recent(&self) {
        let now = self.shared.clock.nanos(Instant::now());
        let effective = self.shared.clock.effective(now);
        self.shared.lock().sweep(&self.shared.gcra, effective);
    }

    /// The number of keys whose state is kept.
    pub fn len(&self) -> usize {
        self.shared.lock().tats.len()
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

    /// The per-key quota, as governor's [`Quota`].
    pub fn quota(&self) -> Quota {
        quota_of(&self.shared.gcra)
    }

    pub(super) fn shared(&self) -> &Arc<Shared<K>> {
        &self.shared
    }
}

struct KeySlot<'a, K: Hash + Eq + Clone> {
    shared: &'a Shared<K>,
    key: &'a K,
    before: u64,
    after: u64,
    armed: bool,
}

impl<K: Hash + Eq + Clone> Drop for KeySlot<'_, K> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.refund(self.key, self.before, self.after);
        }
    }
}

impl<K> Clone for KeyedRateLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K: Hash + Eq + Clone> From<Quota> for KeyedRateLimiter<K> {
    /// A keyed limiter enforcing governor's `quota` per key, with the quota's own burst.
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
            .field("keys", &self.shared.lock().tats.len())
            .finish_non_exhaustive()
    }
}
