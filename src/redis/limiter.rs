//! The shared state of [`RateLimiter::redis`](crate::RateLimiter::redis) and
//! [`KeyedRateLimiter::redis`](crate::KeyedRateLimiter::redis): a GCRA kept in Redis.
//!
//! # Design
//!
//! **One script, Redis's clock.** Each quota is one Redis key holding its theoretical arrival
//! time (TAT), in microseconds of Redis's own clock. A decision is one `EVALSHA` of a Lua script
//! (through [`redis::Script`](::redis::Script), which loads the script on a `NOSCRIPT` reply):
//! the script reads `TIME`, reserves `n` cells on the key (`base = max(tat, now)`, cell `j` due
//! at `max(now, base + j·interval - tolerance)`, the TAT moved to `base + n·interval`), stores
//! the new TAT with an expiry (`PX`) at the instant the key would be indistinguishable from a
//! fresh one, and replies with Redis's `now` and `base`. The decision is atomic on the server,
//! the deadlines are absolute on one clock for the whole fleet, and nothing leaks: an idle key
//! expires. The tolerance is `(burst - 1)·interval`; the interval is rounded up to whole
//! microseconds (so the limiter never runs faster than its quota).
//!
//! **One round trip for many waiters.** The handles of one process that share a limiter (its
//! clones) share one queue. A waiter joins the queue; if no round trip is in flight, a task is
//! spawned to make one. While it is in flight, newcomers queue, and the next round trip
//! reserves cells for all of them at once (for a keyed limiter, for all their keys at once: one
//! script call with one Redis key per quota). Each waiter gets its cell's deadline on a oneshot
//! channel and sleeps until it.
//!
//! **Never early.** A deadline is converted to the local clock conservatively: `local = reply
//! arrival + (deadline - Redis's now at the script)`. Redis read its clock before the reply
//! left, so the local instant is never before the Redis deadline: a cell is released late by
//! at most the reply's trip back plus the timer's lateness, never early.
//!
//! **The bound.** The deadlines Redis hands out follow the GCRA: in any window of length `T`
//! (on Redis's clock) at most `burst + ⌊T / interval⌋` of them. Each cell is released at its
//! deadline plus a delay `D` of its own (the conversion slack above, plus scheduling), so in any
//! window of length `T` at most `burst + ⌊(T + D) / interval⌋` cells are released across the
//! fleet: while `D` stays below one interval, at most one cell more than
//! `burst + T / interval`. That one cell is the whole cost of the conversion; a runtime that
//! stalls a waiter for longer than an interval can bunch its release with later ones (unlike the
//! in-memory limiter, which also keeps a release schedule; across processes that would cost a
//! second round trip per cell).
//!
//! **Cancellation.** A waiter dropped before its release gives its cell back when it safely
//! can: first to a waiter of the same quota queued in this process (which then needs no round
//! trip), else by a compare-and-set script that restores the TAT only if it is still the one
//! this cell's reservation set (no later reservation happened). Otherwise the cell is spent:
//! the fleet runs one cell below its quota, never above.
//!
//! **Unavailable.** A failed round trip (refused connection, a timeout after
//! [`RESPONSE_TIMEOUT`](super::RESPONSE_TIMEOUT), a server error) applies each waiter's
//! [`Unavailable`] policy, logs a warning (target `stagepipe::redis`) once per outage, and backs
//! off (10 ms doubling to 1 s) before the next attempt: [`FailOpen`](Unavailable::FailOpen)
//! waiters go at once, [`FailClosed`](Unavailable::FailClosed) waiters queue again and go with
//! the first round trip that succeeds, and [`Local`](Unavailable::Local) waiters take a cell of
//! an in-memory GCRA of `interval × replicas`, burst `max(1, burst / replicas)`, kept by the
//! handle while Redis is away.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

use super::{ConnectionManager, Unavailable};
use crate::KeyedRateLimiter;
use crate::rate_limit::gcra::Gcra;

/// Reserves cells: `KEYS` are the quotas' keys, `ARGV` = interval (µs), tolerance (µs), mode
/// (`1`: only a cell that conforms now), then one count per key. Replies `{now, base...}`:
/// `base` is `-1` for a key whose cell (mode `1`) does not conform.
const RESERVE: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local t = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local only_now = ARGV[3] == '1'
local out = {now}
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[3 + i])
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  local base = math.max(tat, now)
  if only_now and base - tol > now then
    out[i + 1] = -1
  else
    local new = base + n * t
    redis.call('SET', key, string.format('%.0f', new), 'PX', math.max(1, math.ceil((new - now) / 1000)))
    out[i + 1] = base
  end
end
return out
";

/// Gives cells back: `KEYS[1]` is the quota's key, `ARGV` = the TAT the reservation left and the
/// TAT to restore. Only if the TAT is still the one expected. Replies 1 if restored.
const REFUND: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
if cur ~= tonumber(ARGV[1]) then return 0 end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local restore = tonumber(ARGV[2])
if restore > now then
  redis.call('SET', KEYS[1], string.format('%.0f', restore), 'PX', math.max(1, math.ceil((restore - now) / 1000)))
else
  redis.call('DEL', KEYS[1])
end
return 1
";

static RESERVE_SCRIPT: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(RESERVE));
static REFUND_SCRIPT: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(REFUND));

/// The most waiters one round trip reserves for; the rest go with the next.
const MAX_BATCH: usize = 4096;
/// The first backoff after a failed round trip, doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A boxed wait for one cell: what a stream holds for an item.
pub(crate) type Wait = Pin<Box<dyn Future<Output = ()> + Send + Sync + 'static>>;

/// The Redis side of a limiter handle: its shared state and the handle's own policy.
pub(crate) struct RedisLimiter<K: ?Sized> {
    pub(crate) gcra: Arc<RedisGcra>,
    pub(crate) policy: Unavailable,
    /// The Redis key of a quota key (a `K: Display` formatted after the limiter's prefix).
    key: fn(&RedisGcra, &K) -> String,
}

impl<K: ?Sized> Clone for RedisLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            gcra: Arc::clone(&self.gcra),
            policy: self.policy,
            key: self.key,
        }
    }
}

impl<K: ?Sized> fmt::Debug for RedisLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("name", &self.gcra.name)
            .field("when_unavailable", &self.policy)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter<()> {
    /// The Redis side of a [`RateLimiter`](crate::RateLimiter): one key, the limiter's name.
    pub(crate) fn direct(conn: &ConnectionManager, name: &str, gcra: &Gcra) -> Self {
        Self {
            gcra: Arc::new(RedisGcra::new(conn.clone(), name, gcra)),
            policy: Unavailable::default(),
            key: |g, ()| g.prefix.clone(),
        }
    }
}

impl<K: fmt::Display + ?Sized> RedisLimiter<K> {
    /// The Redis side of a [`KeyedRateLimiter`]: one key per quota key, after the name.
    pub(crate) fn keyed(conn: &ConnectionManager, name: &str, gcra: &Gcra) -> Self {
        Self {
            gcra: Arc::new(RedisGcra::new(conn.clone(), name, gcra)),
            policy: Unavailable::default(),
            key: |g, k| format!("{}:{k}", g.prefix),
        }
    }
}

impl<K: ?Sized> RedisLimiter<K> {
    /// The same shared state with another quota (a new queue; the Redis keys are the same).
    pub(crate) fn with_gcra(&self, gcra: &Gcra) -> Self {
        Self {
            gcra: Arc::new(RedisGcra::new(
                self.gcra.conn.clone(),
                &self.gcra.name,
                gcra,
            )),
            policy: self.policy,
            key: self.key,
        }
    }

    /// Waits for one cell of `key`'s quota (see the module docs).
    pub(crate) fn acquire(&self, key: &K) -> impl Future<Output = ()> + Send + Sync + 'static {
        let key = (self.key)(&self.gcra, key);
        Arc::clone(&self.gcra).acquire(key, self.policy)
    }

    /// [`acquire`](Self::acquire), boxed.
    pub(crate) fn wait(&self, key: &K) -> Wait {
        Box::pin(self.acquire(key))
    }

    /// Takes one cell of `key`'s quota only if it conforms now: one round trip.
    pub(crate) async fn try_acquire(&self, key: &K) -> bool {
        let key = (self.key)(&self.gcra, key);
        self.gcra.try_acquire(key, self.policy).await
    }
}

/// The state the clones of one Redis-backed handle share: the connection, the quota in
/// microseconds, the queue of waiters, the backoff and the in-memory fallback.
pub(crate) struct RedisGcra {
    conn: ConnectionManager,
    name: String,
    /// `stagepipe:limiter:{name}`: the braces make every key of one limiter hash to one slot.
    prefix: String,
    gcra: Gcra,
    /// The emission interval, µs.
    t: u64,
    /// The burst tolerance, µs.
    tol: u64,
    queue: Mutex<Queue>,
    round_trips: AtomicU64,
    /// The in-memory GCRA of [`Unavailable::Local`] (quota / replicas), made when first needed.
    fallback: Mutex<Option<(NonZeroU32, KeyedRateLimiter<String>)>>,
}

#[derive(Default)]
struct Queue {
    waiters: Vec<Waiter>,
    /// Whether a task is making (or about to make) a round trip.
    driving: bool,
    /// While Redis is unavailable: when to try again, and the backoff after that.
    down: Option<(Instant, Duration)>,
}

struct Waiter {
    key: String,
    policy: Unavailable,
    tx: oneshot::Sender<Grant>,
}

/// What a waiter gets from a round trip.
enum Grant {
    Cell(Cell),
    Unavailable,
}

/// A reserved cell: its local release instant, and its slot `before..after` on Redis's clock
/// (µs) for a refund.
struct Cell {
    gcra: Arc<RedisGcra>,
    key: String,
    at: Instant,
    before: u64,
    after: u64,
    armed: bool,
}

impl Cell {
    /// Moves the cell out (the original is disarmed).
    fn take(&mut self) -> Cell {
        self.armed = false;
        Cell {
            gcra: Arc::clone(&self.gcra),
            key: std::mem::take(&mut self.key),
            armed: true,
            ..*self
        }
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        if self.armed {
            let cell = self.take();
            Arc::clone(&cell.gcra).give_back(cell);
        }
    }
}

impl RedisGcra {
    fn new(conn: ConnectionManager, name: &str, gcra: &Gcra) -> Self {
        let t = u64::try_from(gcra.interval().as_nanos().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .clamp(1, 1 << 50);
        let tol = t.saturating_mul(u64::from(gcra.burst() - 1)).min(1 << 51);
        Self {
            conn,
            name: name.to_owned(),
            prefix: format!("stagepipe:limiter:{{{name}}}"),
            gcra: *gcra,
            t,
            tol,
            queue: Mutex::new(Queue::default()),
            round_trips: AtomicU64::new(0),
            fallback: Mutex::new(None),
        }
    }

    pub(crate) fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A queue of senders and two plain fields: a panic elsewhere leaves it consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for one cell of the quota stored at `key`.
    async fn acquire(self: Arc<Self>, key: String, policy: Unavailable) {
        loop {
            match Arc::clone(&self).request(key.clone(), policy).await {
                Grant::Cell(mut cell) => {
                    // (A timer for an instant already past would still wait for the timer's
                    // next tick.) The fine timer wakes the waiter within a fraction of a
                    // millisecond of the cell's instant, as the in-memory limiter's waiters.
                    if cell.at > Instant::now() {
                        crate::time::fine::sleep_until(cell.at).await;
                    }
                    cell.armed = false;
                    return;
                }
                Grant::Unavailable => match policy {
                    Unavailable::Local { replicas } => {
                        let fallback = self.fallback(replicas);
                        fallback.until_key_ready_in_memory(&key).await;
                        return;
                    }
                    Unavailable::FailClosed => continue,
                    _ => return,
                },
            }
        }
    }

    /// Queues a waiter and starts a round trip if none is under way.
    async fn request(self: Arc<Self>, key: String, policy: Unavailable) -> Grant {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.lock();
            let backing_off = matches!(queue.down, Some((at, _)) if at > Instant::now());
            if backing_off && policy != Unavailable::FailClosed {
                return Grant::Unavailable;
            }
            queue.waiters.push(Waiter { key, policy, tx });
            if !queue.driving {
                queue.driving = true;
                tokio::spawn(Arc::clone(&self).drive());
            }
        }
        // The driver answers every waiter it takes (a dropped driver, on a runtime shutting
        // down, drops the sender: that counts as unavailable).
        rx.await.unwrap_or(Grant::Unavailable)
    }

    /// Makes round trips while waiters queue.
    async fn drive(self: Arc<Self>) {
        loop {
            let next = {
                let mut queue = self.lock();
                queue.waiters.retain(|w| !w.tx.is_closed());
                if queue.waiters.is_empty() {
                    queue.driving = false;
                    return;
                }
                match queue.down {
                    Some((at, _)) if at > Instant::now() => {
                        // Backing off: only fail-closed waiters wait for the next attempt.
                        let waiters = std::mem::take(&mut queue.waiters);
                        for w in waiters {
                            if w.policy == Unavailable::FailClosed {
                                queue.waiters.push(w);
                            } else {
                                let _ = w.tx.send(Grant::Unavailable);
                            }
                        }
                        Err(at)
                    }
                    _ => {
                        let n = queue.waiters.len().min(MAX_BATCH);
                        Ok(queue.waiters.drain(..n).collect::<Vec<_>>())
                    }
                }
            };
            match next {
                Ok(batch) => self.serve(batch).await,
                Err(retry_at) => sleep_until(retry_at).await,
            }
        }
    }

    /// One round trip for `batch`, and the cells handed out.
    async fn serve(self: &Arc<Self>, batch: Vec<Waiter>) {
        // Group by key, keeping each key's waiters in order.
        let mut groups: Vec<(String, Vec<Waiter>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for w in batch {
            let i = *index.entry(w.key.clone()).or_insert_with(|| {
                groups.push((w.key.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(w);
        }
        let mut invocation = RESERVE_SCRIPT.prepare_invoke();
        invocation.arg(self.t).arg(self.tol).arg(0);
        for (key, waiters) in &groups {
            invocation.key(key).arg(waiters.len());
        }
        let mut conn = self.conn.clone();
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let reply: Result<Vec<i64>, _> = invocation.invoke_async(&mut conn).await;
        let arrived = Instant::now();
        let reply = match reply {
            Ok(reply) if reply.len() == groups.len() + 1 => reply,
            Ok(reply) => {
                self.failed(&format!("unexpected reply {reply:?}"));
                return unavailable(groups);
            }
            Err(e) => {
                self.failed(&e);
                return unavailable(groups);
            }
        };
        self.recovered();
        let now = u64::try_from(reply[0]).unwrap_or(0);
        for ((key, waiters), base) in groups.into_iter().zip(&reply[1..]) {
            let base = u64::try_from(*base).unwrap_or(0);
            self.hand_out(key, waiters, now, base, arrived);
        }
    }

    /// Hands the cells reserved for `waiters` (from `base`, Redis's `now` at the script) out
    /// in order; cells whose waiters left go to newcomers of the same key, else back to Redis.
    fn hand_out(
        self: &Arc<Self>,
        key: String,
        waiters: Vec<Waiter>,
        now: u64,
        base: u64,
        arrived: Instant,
    ) {
        let n = waiters.len() as u64;
        let mut waiters = waiters.into_iter();
        let mut queue = None;
        for j in 0..n {
            let before = base + j * self.t;
            let deadline = now.max((before).saturating_sub(self.tol));
            let mut cell = Cell {
                gcra: Arc::clone(self),
                key: key.clone(),
                at: arrived + Duration::from_micros(deadline - now),
                before,
                after: before + self.t,
                armed: true,
            };
            loop {
                let next = match waiters.next() {
                    Some(w) => Some(w),
                    None => {
                        let q: &mut MutexGuard<'_, Queue> =
                            queue.get_or_insert_with(|| self.lock());
                        q.waiters
                            .iter()
                            .position(|w| w.key == key)
                            .map(|i| q.waiters.remove(i))
                    }
                };
                let Some(w) = next else {
                    // Nobody wants this cell or the later ones: give them all back at once.
                    cell.armed = false;
                    drop(queue);
                    self.refund(&key, base + n * self.t, before);
                    return;
                };
                match w.tx.send(Grant::Cell(cell.take())) {
                    Ok(()) => break,
                    Err(Grant::Cell(mut back)) => cell = back.take(),
                    Err(Grant::Unavailable) => unreachable!("a cell was sent"),
                }
            }
        }
    }

    /// A cell whose waiter left before its release: to a queued waiter of the same key, else
    /// back to Redis if no later reservation happened since.
    fn give_back(self: Arc<Self>, mut cell: Cell) {
        {
            let mut queue = self.lock();
            while let Some(i) = queue.waiters.iter().position(|w| w.key == cell.key) {
                let w = queue.waiters.remove(i);
                match w.tx.send(Grant::Cell(cell.take())) {
                    Ok(()) => return,
                    Err(Grant::Cell(mut back)) => cell = back.take(),
                    Err(Grant::Unavailable) => unreachable!("a cell was sent"),
                }
            }
        }
        cell.armed = false;
        self.refund(&cell.key, cell.after, cell.before);
    }

    /// Restores the TAT at `key` to `restore` if it is still `expected` (in the background; a
    /// failure leaves the cells spent).
    fn refund(self: &Arc<Self>, key: &str, expected: u64, restore: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut conn = self.conn.clone();
        let key = key.to_owned();
        let this = Arc::clone(self);
        runtime.spawn(async move {
            this.round_trips.fetch_add(1, Ordering::Relaxed);
            let restored: Result<i64, _> = REFUND_SCRIPT
                .key(&key)
                .arg(expected)
                .arg(restore)
                .invoke_async(&mut conn)
                .await;
            if let Err(e) = restored {
                tracing::debug!(target: "stagepipe::redis", limiter = %this.name, error = %e,
                    "a rate-limit cell could not be given back: it is spent");
            }
        });
    }

    /// Takes one cell of `key` only if it conforms now.
    async fn try_acquire(&self, key: String, policy: Unavailable) -> bool {
        let backing_off = matches!(self.lock().down, Some((at, _)) if at > Instant::now());
        let decided = if backing_off {
            None
        } else {
            let mut conn = self.conn.clone();
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            let reply: Result<Vec<i64>, _> = RESERVE_SCRIPT
                .key(&key)
                .arg(self.t)
                .arg(self.tol)
                .arg(1)
                .arg(1)
                .invoke_async(&mut conn)
                .await;
            match reply {
                Ok(reply) if reply.len() == 2 => {
                    self.recovered();
                    Some(reply[1] >= 0)
                }
                Ok(reply) => {
                    self.failed(&format!("unexpected reply {reply:?}"));
                    None
                }
                Err(e) => {
                    self.failed(&e);
                    None
                }
            }
        };
        decided.unwrap_or_else(|| match policy {
            Unavailable::FailOpen => true,
            Unavailable::Local { replicas } => self.fallback(replicas).check_key(&key),
            _ => false,
        })
    }

    /// Notes a failed round trip: a warning once per outage, and the next backoff.
    fn failed(&self, error: &dyn fmt::Display) {
        let mut queue = self.lock();
        let backoff = match queue.down {
            None => {
                tracing::warn!(target: "stagepipe::redis", limiter = %self.name, error = %error,
                    "Redis is unavailable to the rate limiter; its handles follow their \
                     `Unavailable` policy until it answers again");
                MIN_BACKOFF
            }
            Some((_, backoff)) => {
                tracing::debug!(target: "stagepipe::redis", limiter = %self.name, error = %error,
                    "Redis is still unavailable to the rate limiter");
                backoff
            }
        };
        queue.down = Some((Instant::now() + backoff, (backoff * 2).min(MAX_BACKOFF)));
    }

    fn recovered(&self) {
        let mut queue = self.lock();
        if queue.down.take().is_some() {
            tracing::info!(target: "stagepipe::redis", limiter = %self.name,
                "Redis answers the rate limiter again");
        }
    }

    /// The in-memory GCRA of `quota / replicas`, for [`Unavailable::Local`].
    fn fallback(&self, replicas: NonZeroU32) -> KeyedRateLimiter<String> {
        let mut fallback = self.fallback.lock().unwrap_or_else(|e| e.into_inner());
        match &*fallback {
            Some((r, limiter)) if *r == replicas => limiter.clone(),
            _ => {
                let interval = self.gcra.interval().saturating_mul(replicas.get());
                let burst = (self.gcra.burst() / replicas.get()).max(1);
                let limiter = KeyedRateLimiter::in_memory(Gcra::new(interval, burst));
                *fallback = Some((replicas, limiter.clone()));
                limiter
            }
        }
    }
}

/// Answers every waiter of a failed round trip: each applies its own policy.
fn unavailable(groups: Vec<(String, Vec<Waiter>)>) {
    for w in groups.into_iter().flat_map(|(_, ws)| ws) {
        let _ = w.tx.send(Grant::Unavailable);
    }
}

impl_debug!(impl[] RedisGcra => RedisGcra |this| {
    name: &this.name,
    interval_us: &this.t,
    tolerance_us: &this.tol,
} ..);
