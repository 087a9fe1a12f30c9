//! The shared state of [`CircuitBreaker::redis`]: one breaker for a whole fleet.
//!
#![doc = include_str!("breaker.md")]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::Script;
use futures::future::BoxFuture;
use tokio::time::Instant;

use super::{ConnectionManager, RESPONSE_TIMEOUT, RedisError, Unavailable};
use crate::circuit_breaker::{Shared, Ticket};
use crate::error::{ConfigError, nonzero, nonzero_duration, or_panic};
use crate::{CircuitBreaker, CircuitState};

/// How long a half-open trial holds its lease unless set with
/// [`CircuitBreaker::trial_lease`].
const DEFAULT_TRIAL_LEASE: Duration = Duration::from_secs(10);

/// KEYS: state, trial lease. ARGV: token, lease (ms).
/// Returns {code, gen, failures, ms}: 0 admitted (closed), 1 rejected (open, `ms` left),
/// 2 admitted as the trial (in the new period `gen`), 3 rejected (another caller's trial).
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'open', 'failures', 'until', 'gen')
local failures = tonumber(s[2]) or 0
local gen = tonumber(s[4]) or 0
if s[1] ~= '1' then
  return {0, gen, failures, 0}
end
local left = (tonumber(s[3]) or 0) - now
if left > 0 then
  return {1, gen, failures, left}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
  return {2, gen, failures, 0}
end
return {3, gen, failures, 0}
",
    )
});

/// KEYS: state, trial lease. ARGV: gen, trial (0/1), ok (0/1), token, failure_threshold,
/// open_for (ms). Returns {open (0/1), failures, ms left open, effect} (see `Effect`).
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = redis.call('HMGET', KEYS[1], 'open', 'failures', 'until', 'gen')
local failures = tonumber(s[2]) or 0
local gen = tonumber(s[4]) or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local open_for = tonumber(ARGV[6])
local function seen(effect)
  if s[1] == '1' then
    return {1, failures, math.max((tonumber(s[3]) or 0) - now, 0), effect}
  end
  return {0, failures, 0, effect}
end
if tonumber(ARGV[1]) ~= gen then
  return seen(0)
end
if ARGV[2] == '1' then
  if redis.call('GET', KEYS[2]) == ARGV[4] then
    redis.call('DEL', KEYS[2])
  end
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 'open', '0', 'failures', 0, 'gen', gen + 1)
    return {0, 0, 0, 4}
  end
  redis.call('HSET', KEYS[1], 'open', '1', 'until', now + open_for, 'gen', gen + 1)
  return {1, failures, open_for, 3}
end
if s[1] == '1' then
  return seen(0)
end
if ARGV[3] == '1' then
  if failures ~= 0 then
    redis.call('HSET', KEYS[1], 'failures', 0)
  end
  return {0, 0, 0, 1}
end
failures = failures + 1
if failures >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'open', '1', 'failures', failures, 'until', now + open_for,
    'gen', gen + 1)
  return {1, failures, open_for, 2}
end
redis.call('HSET', KEYS[1], 'failures', failures)
return {0, failures, 0, 1}
",
    )
});

/// KEYS: a lease. ARGV: the holder's value. Deletes the key only if it still holds that value.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// What a recorded outcome did (the last element of `RECORD`'s reply).
const IGNORED: i64 = 0;
const OPENED: i64 = 2;
const REOPENED: i64 = 3;
const CLOSED_BY_TRIAL: i64 = 4;

/// Runs one round trip, failing with a timeout error after [`RESPONSE_TIMEOUT`] whatever the
/// connection does meanwhile (a reconnection in progress, say). While `reach` says Redis is
/// away, fails at once unless it is this handle's turn to probe (see [`Reachability`]).
pub(super) async fn bounded<T>(
    reach: &Reachability,
    round_trip: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    reach.gate()?;
    reach.sent.fetch_add(1, Ordering::Relaxed);
    match tokio::time::timeout(RESPONSE_TIMEOUT, round_trip).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from((
            ::redis::ErrorKind::Io,
            "no answer from Redis within the response timeout",
        ))),
    }
}

/// Spawns `fut` on the current tokio runtime, if there is one (work a dropped future leaves
/// behind; without a runtime, the leases it would release expire by themselves).
pub(super) fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(fut);
    }
}

/// How often a handle tries Redis again while it is away; the calls in between follow the
/// handle's policy at once instead of each waiting out a timeout.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// The instant `Reachability` counts from.
static BASE: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

fn elapsed_ms() -> u64 {
    u64::try_from(BASE.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Whether Redis answered a handle's last round trip. A handle warns once when Redis goes
/// away and once when it answers again; while it is away, one round trip every
/// [`PROBE_EVERY`] goes to Redis (a probe) and the others fail at once.
#[derive(Debug, Default)]
pub(super) struct Reachability {
    away: AtomicBool,
    /// When the last probe started (or Redis went away), in ms since `BASE`.
    last_try: AtomicU64,
    /// Round trips sent to Redis.
    sent: AtomicU64,
}

impl Reachability {
    /// `Ok` if a round trip may go to Redis now.
    fn gate(&self) -> Result<(), RedisError> {
        if !self.away.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = elapsed_ms();
        let last = self.last_try.load(Ordering::Relaxed);
        let due = now >= last.saturating_add(PROBE_EVERY.as_millis() as u64);
        if due
            && self
                .last_try
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Ok(());
        }
        Err(RedisError::from((
            ::redis::ErrorKind::Io,
            "Redis unavailable: its last round trip failed (tried again every 200 ms)",
        )))
    }

    /// A round trip failed with `error`.
    pub(super) fn failed(&self, kind: &str, name: &str, policy: Unavailable, error: &RedisError) {
        if self.away.swap(true, Ordering::Relaxed) {
            tracing::debug!(target: "stagepipe::redis", kind, name, %error, "Redis still unavailable");
        } else {
            self.last_try.store(elapsed_ms(), Ordering::Relaxed);
            tracing::warn!(
                target: "stagepipe::redis",
                kind,
                name,
                ?policy,
                %error,
                "Redis unavailable: following the handle's policy until it answers again"
            );
        }
    }

    /// A round trip was answered.
    pub(super) fn answered(&self, kind: &str, name: &str) {
        if self.away.load(Ordering::Relaxed) && self.away.swap(false, Ordering::Relaxed) {
            tracing::warn!(target: "stagepipe::redis", kind, name, "Redis answers again");
        }
    }

    /// How many round trips went to Redis (answered or not).
    pub(super) fn round_trips(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Whether the last round trip failed.
    pub(super) fn is_away(&self) -> bool {
        self.away.load(Ordering::Relaxed)
    }
}

/// `d` in whole milliseconds, rounded up, at least 1 and at most about 30 years (a value Redis
/// adds to its clock without overflow and Lua counts exactly).
pub(super) fn millis(d: Duration) -> u64 {
    let ms = d
        .min(crate::time::FAR_FUTURE)
        .as_nanos()
        .div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// A call let through by the shared state: in which period, and whether as the trial (whose
/// lease holds `token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RedisPermit {
    trial: bool,
    period: i64,
    token: u64,
}

/// The last state a handle saw: `SEEN_*` in the low two bits, the failure count above.
const SEEN_CLOSED: u64 = 0;
const SEEN_OPEN: u64 = 1;
const SEEN_HALF_OPEN: u64 = 2;

/// The Redis part of a [`CircuitBreaker`] made by [`CircuitBreaker::redis`]: the connection,
/// the keys, and what this handle last saw; and the handle's own [`Unavailable`] policy.
#[derive(Clone)]
pub(crate) struct RedisBreaker {
    inner: Arc<Inner>,
    policy: Unavailable,
}

struct Inner {
    conn: ConnectionManager,
    name: Box<str>,
    state_key: String,
    trial_key: String,
    failure_threshold: u32,
    open_for_ms: u64,
    trial_lease: Duration,
    base: Instant,
    /// The last state seen (see `SEEN_CLOSED`).
    seen: AtomicU64,
    /// When the last opening seen ends, in nanoseconds since `base`.
    open_until: AtomicU64,
    reach: Reachability,
}

impl RedisBreaker {
    fn new(
        conn: &ConnectionManager,
        name: &str,
        failure_threshold: u32,
        open_for: Duration,
        trial_lease: Duration,
        policy: Unavailable,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                conn: conn.clone(),
                name: name.into(),
                state_key: format!("stagepipe:breaker:{{{name}}}"),
                trial_key: format!("stagepipe:breaker:{{{name}}}:trial"),
                failure_threshold,
                open_for_ms: millis(open_for),
                trial_lease,
                base: Instant::now(),
                seen: AtomicU64::new(SEEN_CLOSED),
                open_until: AtomicU64::new(0),
                reach: Reachability::default(),
            }),
            policy,
        }
    }

    fn now(&self) -> u64 {
        crate::time::nanos(Instant::now().saturating_duration_since(self.inner.base))
    }

    /// Notes the state Redis reported: `seen` (a `SEEN_*`), the count, and for an open breaker
    /// how many milliseconds it stays open.
    fn saw(&self, seen: u64, failures: i64, open_ms: i64) {
        let inner = &self.inner;
        if seen == SEEN_OPEN {
            let left = Duration::from_millis(u64::try_from(open_ms).unwrap_or(0));
            let until = self.now().saturating_add(crate::time::nanos(left));
            inner.open_until.store(until, Ordering::Relaxed);
        }
        let failures = u64::try_from(failures)
            .unwrap_or(0)
            .min(u64::from(u32::MAX));
        inner.seen.store(seen | failures << 2, Ordering::Release);
    }

    /// Whether the in-memory breaker stands in for the shared state now.
    fn local_now(&self) -> bool {
        matches!(self.policy, Unavailable::Local { .. }) && self.inner.reach.is_away()
    }

    pub(crate) fn state(&self, breaker: &CircuitBreaker) -> CircuitState {
        if self.local_now() {
            return breaker.local_state();
        }
        let inner = &self.inner;
        match inner.seen.load(Ordering::Acquire) & 0b11 {
            SEEN_CLOSED => CircuitState::Closed,
            SEEN_OPEN if self.now() < inner.open_until.load(Ordering::Relaxed) => {
                CircuitState::Open
            }
            _ => CircuitState::HalfOpen,
        }
    }

    pub(crate) fn consecutive_failures(&self, breaker: &CircuitBreaker) -> u32 {
        if self.local_now() {
            return breaker.local_failures();
        }
        // The count is stored capped at `u32::MAX`.
        u32::try_from(self.inner.seen.load(Ordering::Acquire) >> 2).unwrap_or(u32::MAX)
    }

    /// What the handle's policy lets a call do while Redis is away.
    fn fallback(&self, local: &Shared) -> Option<Ticket> {
        match self.policy {
            Unavailable::FailOpen => Some(Ticket::Unrecorded),
            Unavailable::Local { .. } => local.acquire().map(Ticket::Local),
            _ => None,
        }
    }

    /// Asks Redis whether a call may run: `Some(ticket)` if it may.
    pub(crate) fn admit(&self, local: &Arc<Shared>) -> BoxFuture<'static, Option<Ticket>> {
        let this = self.clone();
        let local = Arc::clone(local);
        Box::pin(async move {
            let inner = &this.inner;
            let token = fastrand::u64(..);
            let mut conn = inner.conn.clone();
            let mut invocation = ADMIT.prepare_invoke();
            invocation
                .key(&inner.state_key)
                .key(&inner.trial_key)
                .arg(token)
                .arg(millis(inner.trial_lease));
            let reply: Result<(i64, i64, i64, i64), _> =
                bounded(&inner.reach, invocation.invoke_async(&mut conn)).await;
            match reply {
                Ok((code, period, failures, open_ms)) => {
                    inner.reach.answered("circuit_breaker", &inner.name);
                    let seen = match code {
                        0 => SEEN_CLOSED,
                        1 => SEEN_OPEN,
                        _ => SEEN_HALF_OPEN,
                    };
                    this.saw(seen, failures, open_ms);
                    let trial = code == 2;
                    if trial {
                        tracing::info!(target: "stagepipe::circuit_breaker", name = &*inner.name, "circuit breaker half-open: trial call (fleet-wide)");
                        #[cfg(feature = "metrics")]
                        local.metrics().transition(CircuitState::HalfOpen);
                    }
                    matches!(code, 0 | 2).then_some(Ticket::Shared(RedisPermit {
                        trial,
                        period,
                        token,
                    }))
                }
                Err(error) => {
                    inner
                        .reach
                        .failed("circuit_breaker", &inner.name, this.policy, &error);
                    this.fallback(&local)
                }
            }
        })
    }

    /// Records the outcome of a call `permit` let through (the future yields `None`).
    pub(crate) fn record(
        &self,
        permit: RedisPermit,
        ok: bool,
        local: &Arc<Shared>,
    ) -> BoxFuture<'static, Option<Ticket>> {
        let this = self.clone();
        let local = Arc::clone(local);
        Box::pin(async move {
            let inner = &this.inner;
            let mut conn = inner.conn.clone();
            let mut invocation = RECORD.prepare_invoke();
            invocation
                .key(&inner.state_key)
                .key(&inner.trial_key)
                .arg(permit.period)
                .arg(u8::from(permit.trial))
                .arg(u8::from(ok))
                .arg(permit.token)
                .arg(inner.failure_threshold)
                .arg(inner.open_for_ms);
            let reply: Result<(i64, i64, i64, i64), _> =
                bounded(&inner.reach, invocation.invoke_async(&mut conn)).await;
            match reply {
                Ok((open, failures, open_ms, effect)) => {
                    inner.reach.answered("circuit_breaker", &inner.name);
                    let seen = if open == 1 { SEEN_OPEN } else { SEEN_CLOSED };
                    this.saw(seen, failures, open_ms);
                    let name = &*inner.name;
                    let open_for = Duration::from_millis(inner.open_for_ms);
                    match effect {
                        OPENED => {
                            tracing::warn!(target: "stagepipe::circuit_breaker", name, failures, ?open_for, "circuit breaker opened (fleet-wide)")
                        }
                        REOPENED => {
                            tracing::warn!(target: "stagepipe::circuit_breaker", name, ?open_for, "circuit breaker opened again: trial call failed (fleet-wide)")
                        }
                        CLOSED_BY_TRIAL => {
                            tracing::info!(target: "stagepipe::circuit_breaker", name, "circuit breaker closed: trial call succeeded (fleet-wide)")
                        }
                        IGNORED => {
                            tracing::debug!(target: "stagepipe::circuit_breaker", name, "outcome of an earlier period ignored")
                        }
                        _ => {}
                    }
                    #[cfg(feature = "metrics")]
                    match effect {
                        OPENED | REOPENED => local.metrics().transition(CircuitState::Open),
                        CLOSED_BY_TRIAL => local.metrics().transition(CircuitState::Closed),
                        _ => {}
                    }
                }
                Err(error) => {
                    inner
                        .reach
                        .failed("circuit_breaker", &inner.name, this.policy, &error);
                    if matches!(this.policy, Unavailable::Local { .. }) {
                        local.record_closed(ok);
                    }
                }
            }
            None
        })
    }

    /// A call `permit` let through ended without an outcome: a trial gives its lease back (in
    /// a background task), so that the next caller becomes the trial.
    pub(crate) fn abandoned(&self, permit: RedisPermit) {
        if permit.trial {
            let this = self.clone();
            spawn(async move { this.release(permit).await });
        }
    }

    async fn release(&self, permit: RedisPermit) {
        let inner = &self.inner;
        let mut conn = inner.conn.clone();
        let mut invocation = RELEASE.prepare_invoke();
        invocation.key(&inner.trial_key).arg(permit.token);
        let released: Result<i64, _> =
            bounded(&inner.reach, invocation.invoke_async(&mut conn)).await;
        if let Err(error) = released {
            inner
                .reach
                .failed("circuit_breaker", &inner.name, self.policy, &error);
        }
    }

    /// Finishes, in a background task, a round trip whose caller was dropped: a permit it
    /// obtains is given back at once.
    pub(crate) fn finish_in_background(
        &self,
        trip: BoxFuture<'static, Option<Ticket>>,
        local: &Arc<Shared>,
    ) {
        let this = self.clone();
        let local = Arc::clone(local);
        spawn(async move {
            match trip.await {
                Some(Ticket::Shared(permit)) if permit.trial => this.release(permit).await,
                Some(Ticket::Local(permit)) => local.abandoned(permit),
                _ => {}
            }
        });
    }
}

impl fmt::Debug for RedisBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBreaker")
            .field("name", &self.inner.name)
            .field("policy", &self.policy)
            .field("trial_lease", &self.inner.trial_lease)
            .finish_non_exhaustive()
    }
}

/// The breaker shared through Redis (feature `redis`).
impl CircuitBreaker {
    /// A breaker whose state lives in Redis under `name`, shared by every handle on that name
    /// in every process: `failure_threshold` consecutive failures anywhere in the fleet open
    /// it for all, and after `open_for` exactly one trial call runs fleet-wide.
    ///
    /// Everything that takes a breaker takes this one (the
    /// [`circuit_breaker`](crate::PipelineExt::circuit_breaker) operator,
    /// [`call`](Self::call), [`Call`](crate::Call), the tower layer): each call makes a round
    /// trip before it runs and one to record its outcome. While Redis is away, the handle
    /// follows its [`Unavailable`] policy, [`FailClosed`](Unavailable::FailClosed) (reject)
    /// unless set with [`when_unavailable`](Self::when_unavailable).
    ///
    /// The handle's `tracing` events carry `name`. [`state`](Self::state) and
    /// [`consecutive_failures`](Self::consecutive_failures) make no round trip: they report
    /// what this handle saw last.
    ///
    #[doc = include_str!("breaker.md")]
    ///
    /// # Panics
    ///
    /// If `failure_threshold` or `open_for` is zero. [`try_redis`](Self::try_redis) returns the
    /// error instead.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use stagepipe::redis::{self, Unavailable};
    /// use stagepipe::{BreakerError, CircuitBreaker};
    ///
    /// # async fn run() -> Result<(), stagepipe::redis::RedisError> {
    /// let conn = redis::connect("redis://127.0.0.1/").await?;
    /// let breaker = CircuitBreaker::redis(&conn, "payments", 5, Duration::from_secs(10))
    ///     .when_unavailable(Unavailable::FailOpen);
    /// match breaker.call(async { Ok::<_, std::io::Error>("paid") }).await {
    ///     Ok(receipt) => println!("{receipt}"),
    ///     Err(BreakerError::Open(())) => println!("payments are failing fleet-wide"),
    ///     Err(BreakerError::Failed(e)) => println!("{e}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn redis(
        conn: &ConnectionManager,
        name: &str,
        failure_threshold: u32,
        open_for: Duration,
    ) -> Self {
        or_panic(Self::try_redis(conn, name, failure_threshold, open_for))
    }

    /// [`redis`](Self::redis), returning a [`ConfigError`] naming `failure_threshold` or
    /// `open_for` if it is zero.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use stagepipe::CircuitBreaker;
    ///
    /// # async fn run() -> Result<(), stagepipe::redis::RedisError> {
    /// let conn = stagepipe::redis::connect("redis://127.0.0.1/").await?;
    /// let err = CircuitBreaker::try_redis(&conn, "payments", 0, Duration::from_secs(1));
    /// assert_eq!(err.unwrap_err().parameter(), "failure_threshold");
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_redis(
        conn: &ConnectionManager,
        name: &str,
        failure_threshold: u32,
        open_for: Duration,
    ) -> Result<Self, ConfigError> {
        nonzero("failure_threshold", u64::from(failure_threshold))?;
        nonzero_duration("open_for", open_for)?;
        let redis = RedisBreaker::new(
            conn,
            name,
            failure_threshold,
            open_for,
            DEFAULT_TRIAL_LEASE,
            Unavailable::default(),
        );
        Ok(Self {
            shared: Shared::new(failure_threshold, open_for, Some(name.into())),
            redis: Some(redis),
        })
    }

    /// What this handle does while Redis cannot be reached (see [`Unavailable`]; the default
    /// is [`FailClosed`](Unavailable::FailClosed): reject). The policy belongs to this handle
    /// and the clones taken from it afterwards; other handles on the same breaker keep theirs.
    /// An in-memory breaker ignores it.
    ///
    /// * `FailClosed`: calls are rejected ([`BreakerError::Open`](crate::BreakerError::Open)).
    /// * `FailOpen`: calls run; their outcomes are not recorded.
    /// * `Local { .. }`: this handle's in-memory breaker (same threshold and period, shared
    ///   with its clones) decides and counts this process's failures.
    #[must_use]
    pub fn when_unavailable(mut self, policy: Unavailable) -> Self {
        if let Some(redis) = &mut self.redis {
            redis.policy = policy;
        }
        self
    }

    or_panic_setter! {
        /// How long a half-open trial call holds the fleet-wide trial lease (10 s unless set): if
        /// its process dies, the next trial can start that long after. Keep it above the trial's
        /// timeout, or a slow trial may overlap with the next one. An in-memory breaker ignores
        /// it.
        ///
        /// Call it before sharing the handle: the handle it returns starts over what it has seen
        /// of the shared state (clones taken earlier keep the old lease).
        ///
        /// # Panics
        ///
        /// If `lease` is zero. [`try_trial_lease`](Self::try_trial_lease) returns the error
        /// instead.
        pub fn trial_lease(lease: Duration) => try_trial_lease;
    }

    /// [`trial_lease`](Self::trial_lease), returning a [`ConfigError`] naming `lease` if it
    /// is zero.
    pub fn try_trial_lease(mut self, lease: Duration) -> Result<Self, ConfigError> {
        nonzero_duration("lease", lease)?;
        let open_for = self.open_for();
        if let Some(redis) = &mut self.redis {
            let inner = &redis.inner;
            *redis = RedisBreaker::new(
                &inner.conn,
                &inner.name,
                inner.failure_threshold,
                open_for,
                lease,
                redis.policy,
            );
        }
        Ok(self)
    }

    /// The number of round trips to Redis this handle and its clones have made (two per call
    /// it let through, one per call it rejected, fewer while Redis is away); `None` for an
    /// in-memory breaker.
    pub fn round_trips(&self) -> Option<u64> {
        self.redis
            .as_ref()
            .map(|redis| redis.inner.reach.round_trips())
    }

    /// The policy this handle follows while Redis is away, if it is
    /// [Redis-backed](Self::redis).
    pub fn unavailable_policy(&self) -> Option<Unavailable> {
        self.redis.as_ref().map(|redis| redis.policy)
    }
}
