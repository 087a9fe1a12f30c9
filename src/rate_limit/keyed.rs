//! [`KeyedRateLimiter`]: one quota per key.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Quota;

use super::gcra::{Credit, Gcra, Timeline};
use super::{Limiter, take};

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
    /// The quotas' state in Redis, for a handle made by [`redis`](Self::redis).
    #[cfg(feature = "redis")]
    redis: Option<crate::redis::RedisLimiter<K>>,
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

impl<K: Hash + Eq + Clone> Limiter for Shared<K> {
    type Key = K;

    #[inline]
    fn clock(&self) -> &Timeline {
        &self.clock
    }

    fn reserve(&self, key: &K, arrival: u64, now: u64) -> (u64, u64, u64) {
        let mut keys = self.lock();
        let state = keys.entry(&self.gcra, key, now);
        let (deadline, after) = self.gcra.reserve(state.tat, arrival);
        // The slot's own start (the deadline if the key was idle): the slot is `after - before`.
        let before = state.tat.max(deadline);
        state.tat = after;
        (deadline, before, after)
    }

    fn release(&self, key: &K, now: u64) -> Result<(), u64> {
        let mut keys = self.lock();
        let state = keys.entry(&self.gcra, key, now);
        state.released = self.gcra.release(state.released, now)?;
        Ok(())
    }

    fn refund(&self, key: &K, before: u64, after: u64) {
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

impl<K> KeyedRateLimiter<K> {
    quota_methods!(" for each key");

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

    fn from_shared(shared: Arc<Shared<K>>) -> Self {
        Self {
            shared,
            credit: Mutex::new(None),
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    /// An in-memory keyed limiter of the quota `gcra`.
    #[cfg(feature = "redis")]
    pub(crate) fn in_memory(gcra: Gcra) -> Self {
        Self::from_gcra(gcra)
    }

    pub(super) fn shared(&self) -> &Arc<Shared<K>> {
        &self.shared
    }

    /// The Redis side of a handle made by [`redis`](Self::redis).
    #[cfg(feature = "redis")]
    pub(super) fn redis_side(&self) -> Option<&crate::redis::RedisLimiter<K>> {
        self.redis.as_ref()
    }
}

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
impl<K: std::fmt::Display> KeyedRateLimiter<K> {
    /// A keyed limiter whose budgets are kept in Redis under `name`: each key's quota is the
    /// Redis key `stagepipe:limiter:{name}:KEY` (the key formatted with `Display`), shared by
    /// every handle made with the same name and quota, in this process or any other. Clones
    /// share it as usual; waiters of one process queued while a round trip is in flight are
    /// served together by the next one, whatever their keys (one script call for them all).
    ///
    /// Everything [`RateLimiter::redis`](crate::RateLimiter::redis) says holds per key: the
    /// script, the bound, the conversion to local time, the [`Unavailable`](crate::redis::Unavailable)
    /// policy (fail closed unless set with [`when_unavailable`](Self::when_unavailable)).
    /// [`until_key_ready`](Self::until_key_ready),
    /// [`try_acquire_key`](Self::try_acquire_key) and
    /// [`rate_limit_by`](crate::PipelineExt::rate_limit_by) work with it;
    /// [`check_key`](Self::check_key) cannot make a round trip and refuses. No key's state is
    /// kept in memory ([`len`](Self::len) is 0): Redis expires each key once idle.
    ///
    /// ```no_run
    /// use std::num::NonZeroU32;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use stagepipe::Quota;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), stagepipe::redis::RedisError> {
    /// let conn = stagepipe::redis::connect("redis://127.0.0.1/").await?;
    /// // 10 requests a second per tenant, for the whole fleet
    /// let quota = Quota::per_second(NonZeroU32::new(10).unwrap());
    /// let per_tenant = KeyedRateLimiter::<u64>::redis(&conn, "tenants", quota);
    /// let requests = [(1_u64, "a"), (2, "b"), (1, "c")];
    /// let done = stream::iter(requests)
    ///     .rate_limit_by(&per_tenant, |(tenant, _)| *tenant)
    ///     .count()
    ///     .await;
    /// assert_eq!(done, 3);
    /// # Ok(())
    /// # }
    /// ```
    pub fn redis(conn: &crate::redis::ConnectionManager, name: &str, quota: Quota) -> Self {
        let gcra = Gcra::from_quota(&quota);
        let mut limiter = Self::from_gcra(gcra);
        limiter.redis = Some(crate::redis::RedisLimiter::keyed(conn, name, &gcra));
        limiter
    }
}

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
impl<K> KeyedRateLimiter<K> {
    redis_limiter_accessors! {
        /// Sets what this handle does while Redis cannot be reached (see
        /// [`Unavailable`](crate::redis::Unavailable)); the default is
        /// [`FailClosed`](crate::redis::Unavailable::FailClosed). With
        /// [`Local`](crate::redis::Unavailable::Local), each key gets an in-memory quota of its
        /// own. An in-memory limiter never needs Redis: the policy has no effect on it.
        ///
        /// ```no_run
        /// use std::num::NonZeroU32;
        /// use stagepipe::{KeyedRateLimiter, Quota, redis::Unavailable};
        ///
        /// let conn = stagepipe::redis::connect_lazy("redis://127.0.0.1/").unwrap();
        /// let quota = Quota::per_second(NonZeroU32::new(5).unwrap());
        /// let per_host = KeyedRateLimiter::<String>::redis(&conn, "hosts", quota)
        ///     .when_unavailable(Unavailable::Local { replicas: NonZeroU32::new(3).unwrap() });
        /// assert!(per_host.unavailable_policy().is_some());
        /// ```
    }
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
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
    /// which that key's waiters are dropped. On a Redis-backed limiter, as
    /// [`RateLimiter::until_ready`](crate::RateLimiter::until_ready) says: to a queued waiter of
    /// the same key, else back to Redis if no later reservation of the key was made since,
    /// else spent.
    pub async fn until_key_ready(&self, key: &K) {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return redis.acquire(key).await;
        }
        self.until_key_ready_in_memory(key).await;
    }

    /// [`until_key_ready`](Self::until_key_ready) on the in-memory state.
    pub(crate) async fn until_key_ready_in_memory(&self, key: &K) {
        let shared = &*self.shared;
        let now = shared.clock.now();
        let arrival = match &*self.lock_credit() {
            Some((credited, credit)) if credited == key => credit.arrival(now),
            _ => now,
        };
        if let Some(credit) = take(shared, key, arrival, now).await {
            *self.lock_credit() = Some((key.clone(), credit));
        }
    }

    fn lock_credit(&self) -> MutexGuard<'_, Option<(K, Credit)>> {
        // A key and two numbers, written at once: never inconsistent.
        self.credit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one cell for `key` if it conforms now, without waiting: `true` if it was taken.
    ///
    /// A check never makes up any waiter's timer lateness: it sees the key's quota as of now.
    ///
    /// On a Redis-backed limiter ([`KeyedRateLimiter::redis`]) a check cannot make the round
    /// trip a decision takes, and it never decides without one: it returns `false` and takes
    /// nothing. Use [`try_acquire_key`](Self::try_acquire_key), which works on both.
    pub fn check_key(&self, key: &K) -> bool {
        #[cfg(feature = "redis")]
        if self.redis.is_some() {
            return false;
        }
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

    /// Takes one cell for `key` if it conforms now, without waiting for a later one: `true` if
    /// it was taken. On an in-memory limiter this is [`check_key`](Self::check_key); on a
    /// Redis-backed one it is one round trip, and while Redis is unavailable the handle's
    /// policy decides, as for [`RateLimiter::try_acquire`](crate::RateLimiter::try_acquire).
    ///
    /// ```
    /// use stagepipe::KeyedRateLimiter;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limiter = KeyedRateLimiter::per_second(1);
    /// assert!(limiter.try_acquire_key(&"a").await);
    /// assert!(!limiter.try_acquire_key(&"a").await);
    /// assert!(limiter.try_acquire_key(&"b").await); // another key's quota
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes takes no cell on an in-memory limiter; on a
    /// Redis-backed one, a round trip already sent may have taken one.
    pub async fn try_acquire_key(&self, key: &K) -> bool {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return redis.try_acquire(key).await;
        }
        self.check_key(key)
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

impl<K> Clone for KeyedRateLimiter<K> {
    /// Another handle on the same per-key state, with a credit of its own (see
    /// [`until_key_ready`](Self::until_key_ready)).
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            credit: Mutex::new(None),
            #[cfg(feature = "redis")]
            redis: self.redis.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> From<Quota> for KeyedRateLimiter<K> {
    /// A keyed limiter enforcing `quota` per key, with the quota's own burst.
    fn from(quota: Quota) -> Self {
        Self::from_gcra(Gcra::from_quota(&quota))
    }
}

from_ref_handle!(impl[K] KeyedRateLimiter<K>, "the per-key state");

impl<K> std::fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("KeyedRateLimiter");
        s.field("interval", &self.interval())
            .field("burst", &self.burst_size())
            .field("keys", &self.shared.lock().states.len());
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            s.field("redis", redis);
        }
        s.finish_non_exhaustive()
    }
}
