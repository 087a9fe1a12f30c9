//! [`DedupeWindow`]: a dedupe window shared by a fleet, over `SET NX PX`.
//!
#![doc = include_str!("dedupe.md")]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ::redis::Script;
use futures::future::BoxFuture;
use futures::stream::{Fuse, FusedStream};
use futures::{Stream, StreamExt};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::breaker::{RELEASE, Reachability, bounded, millis, spawn};
use super::{ConnectionManager, RedisError, Unavailable};
use crate::error::{ConfigError, nonzero_duration, or_panic};

/// How long a claim holds its key unless set with [`DedupeWindow::claim_lease`].
const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The value of a key marked done.
const DONE: &str = "done";

/// KEYS: the keys of a batch, in order. ARGV: the batch's value (`done:<token>`), the window
/// (ms). Marks each key with `SET NX PX`; returns 1 for each that was new, 0 for the others
/// (and for a key repeated in the batch). A key already holding the batch's own value counts
/// as new: the batch is being retried after an attempt whose answer was lost.
static MARK_BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local fresh, seen = {}, {}
for i, key in ipairs(KEYS) do
  if seen[key] then
    fresh[i] = 0
  elseif redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    fresh[i] = 1
  elseif redis.call('GET', key) == ARGV[1] then
    fresh[i] = 1
  else
    fresh[i] = 0
  end
  seen[key] = true
end
return fresh
",
    )
});

/// KEYS: the key. ARGV: the claim's value, the window (ms). Marks the key done for the window
/// if the claim still holds it, or if nobody does; returns 1 if it did.
static MARK_DONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or not v then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
",
    )
});

/// A dedupe window shared through Redis by every handle on its name, in every process: a key
/// seen (or claimed, or done) within the window is not let through again.
///
/// A cheap [`Clone`] handle. Use it on a stream with
/// [`dedupe_with`](crate::PipelineExt::dedupe_with), or for effectively-once processing of an
/// at-least-once queue with [`claim`](Self::claim) and [`Claim::done`]. The design and the
/// exact guarantees are below the example.
/// ```no_run
/// use std::time::Duration;
/// use stagepipe::redis::{self, DedupeWindow, Unavailable};
///
/// # async fn run() -> Result<(), stagepipe::redis::RedisError> {
/// let conn = redis::connect("redis://127.0.0.1/").await?;
/// let window = DedupeWindow::redis(&conn, "orders", Duration::from_secs(3600))
///     .when_unavailable(Unavailable::FailClosed);
/// if let Some(claim) = window.claim("order-17").await? {
///     // ... process order 17 ...
///     claim.done().await?;
/// }
/// # Ok(())
/// # }
/// ```
///
#[doc = include_str!("dedupe.md")]
#[derive(Clone)]
pub struct DedupeWindow {
    inner: Arc<Inner>,
    policy: Unavailable,
    lease: Duration,
}

struct Inner {
    conn: ConnectionManager,
    name: Box<str>,
    prefix: String,
    window: Duration,
    local: Mutex<LocalWindow>,
    reach: Reachability,
}

impl DedupeWindow {
    /// The most items [`dedupe_with`](crate::PipelineExt::dedupe_with) reads before it sends
    /// their keys to Redis in one round trip (and so the most it holds).
    pub const MAX_BATCH: usize = 128;

    /// The most keys the in-memory window of [`Unavailable::Local`] remembers; beyond it, the
    /// key that expires first is forgotten.
    pub const LOCAL_CAPACITY: usize = 65_536;

    /// A window of `window` kept in Redis under `name`, shared by every handle on that name.
    /// While Redis is away the handle follows its [`Unavailable`] policy,
    /// [`FailClosed`](Unavailable::FailClosed) unless set with
    /// [`when_unavailable`](Self::when_unavailable).
    ///
    /// # Panics
    ///
    /// If `window` is zero. [`try_redis`](Self::try_redis) returns the error instead.
    #[track_caller]
    pub fn redis(conn: &ConnectionManager, name: &str, window: Duration) -> Self {
        or_panic(Self::try_redis(conn, name, window))
    }

    /// [`redis`](Self::redis), returning a [`ConfigError`] naming `window` if it is zero.
    pub fn try_redis(
        conn: &ConnectionManager,
        name: &str,
        window: Duration,
    ) -> Result<Self, ConfigError> {
        nonzero_duration("window", window)?;
        Ok(Self {
            inner: Arc::new(Inner {
                conn: conn.clone(),
                name: name.into(),
                prefix: format!("stagepipe:dedupe:{{{name}}}:"),
                window,
                local: Mutex::new(LocalWindow::default()),
                reach: Reachability::default(),
            }),
            policy: Unavailable::default(),
            lease: DEFAULT_LEASE,
        })
    }

    /// What this handle does while Redis cannot be reached (see the table in
    /// [`DedupeWindow`]'s docs). The policy belongs to this handle and the clones taken from it
    /// afterwards.
    #[must_use]
    pub fn when_unavailable(mut self, policy: Unavailable) -> Self {
        self.policy = policy;
        self
    }

    or_panic_setter! {
        /// How long a [`claim`](Self::claim) holds its key before it expires by itself (30 s
        /// unless set): the longest a dead holder blocks a redelivery. Keep it above the
        /// processing's timeout. Applies to the claims of this handle and of the clones taken from
        /// it afterwards.
        ///
        /// # Panics
        ///
        /// If `lease` is zero. [`try_claim_lease`](Self::try_claim_lease) returns the error
        /// instead.
        pub fn claim_lease(lease: Duration) => try_claim_lease;
    }

    /// [`claim_lease`](Self::claim_lease), returning a [`ConfigError`] naming `lease` if it is
    /// zero.
    pub fn try_claim_lease(mut self, lease: Duration) -> Result<Self, ConfigError> {
        nonzero_duration("lease", lease)?;
        self.lease = lease;
        Ok(self)
    }

    /// The window's name in Redis.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How long a key stays seen (or done).
    pub fn window(&self) -> Duration {
        self.inner.window
    }

    /// How long a claim holds its key (see [`claim_lease`](Self::claim_lease)).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The number of round trips to Redis this window's handles in this process have made
    /// (every clone counts): one per [`claim`](Self::claim), [`is_done`](Self::is_done),
    /// [`Claim::done`] and release, and
    /// one per batch of [`dedupe_with`](crate::PipelineExt::dedupe_with), however many items
    /// it holds.
    pub fn round_trips(&self) -> u64 {
        self.inner.reach.round_trips()
    }

    /// The policy this handle follows while Redis is away.
    pub fn unavailable_policy(&self) -> Unavailable {
        self.policy
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalWindow> {
        self.inner
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn failed(&self, error: &RedisError) {
        self.inner
            .reach
            .failed("dedupe", &self.inner.name, self.policy, error);
    }

    fn answered(&self) {
        self.inner.reach.answered("dedupe", &self.inner.name);
    }

    /// Sends `request`, bounded by the response timeout, and notes whether Redis answered.
    async fn ask<T>(
        &self,
        request: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let reply = bounded(&self.inner.reach, request).await;
        match &reply {
            Ok(_) => self.answered(),
            Err(error) => self.failed(error),
        }
        reply
    }

    /// Claims `key` for processing: `Some(claim)` if nobody has it (in any process), `None` if
    /// it was marked done within the window or another claim holds it.
    ///
    /// Process the item only under the claim, then call [`Claim::done`]; a claim dropped
    /// without `done` releases the key, so a redelivery can be processed. The exact
    /// guarantee: [`DedupeWindow`]'s docs. [`is_done`](Self::is_done) tells the two cases of
    /// `None` apart.
    ///
    /// # Errors
    ///
    /// Redis did not answer (within [`RESPONSE_TIMEOUT`](super::RESPONSE_TIMEOUT)) and the
    /// handle fails closed: hold the item back (leave the message unacknowledged). Under
    /// `FailOpen` the claim is granted without Redis; under `Local` the in-memory window
    /// decides.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after Redis granted the claim but before it returned (or a
    /// response lost to the timeout) leaves the key claimed until the lease expires.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use stagepipe::redis::DedupeWindow;
    /// # async fn run(window: DedupeWindow) -> Result<(), stagepipe::redis::RedisError> {
    /// match window.claim(42u64).await? {
    ///     Some(claim) => {
    ///         // ... process item 42 ...
    ///         claim.done().await?;
    ///     }
    ///     None => println!("42 is done, or being processed elsewhere"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn claim(&self, key: impl fmt::Display) -> Result<Option<Claim>, RedisError> {
        let key = key.to_string();
        let token = fastrand::u64(..);
        let value = format!("claim:{token}");
        let mut conn = self.inner.conn.clone();
        let mut set = ::redis::cmd("SET");
        set.arg(self.redis_key(&key))
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.lease));
        let backing = match self.ask(set.query_async::<Option<String>>(&mut conn)).await {
            Ok(reply) => {
                if reply.is_none() {
                    return Ok(None);
                }
                Backing::Redis
            }
            Err(error) => match self.policy {
                Unavailable::FailOpen => Backing::Nowhere,
                Unavailable::Local { .. } => {
                    let now = Instant::now();
                    let lease = crate::time::deadline(now, self.lease);
                    if !self.local().set_nx(&key, Some(token), lease, now) {
                        return Ok(None);
                    }
                    Backing::Local
                }
                _ => return Err(error),
            },
        };
        Ok(Some(Claim {
            window: self.clone(),
            key,
            token,
            backing,
            open: true,
        }))
    }

    /// Whether `key` is marked done (or seen by
    /// [`dedupe_with`](crate::PipelineExt::dedupe_with)) within the window: tells the two
    /// cases of a [`claim`](Self::claim) that returned `None` apart (done: acknowledge the
    /// message; held by a live claim: leave it for redelivery).
    ///
    /// # Errors
    ///
    /// Redis did not answer (under `Local`, the in-memory window answers instead).
    pub async fn is_done(&self, key: impl fmt::Display) -> Result<bool, RedisError> {
        let key = key.to_string();
        let mut conn = self.inner.conn.clone();
        let mut get = ::redis::cmd("GET");
        get.arg(self.redis_key(&key));
        match self.ask(get.query_async::<Option<String>>(&mut conn)).await {
            Ok(value) => Ok(value.is_some_and(|v| v.starts_with(DONE))),
            Err(error) => {
                if matches!(self.policy, Unavailable::Local { .. }) {
                    return Ok(self.local().is_done(&key, Instant::now()));
                }
                Err(error)
            }
        }
    }

    /// One round trip marking every key of `keys` with `SET NX PX window` (the value
    /// `done:<token>`, the batch's own): whether each was new.
    fn mark_batch(
        &self,
        keys: Vec<String>,
        token: u64,
    ) -> BoxFuture<'static, Result<Vec<bool>, RedisError>> {
        let mut conn = self.inner.conn.clone();
        let mut invocation = MARK_BATCH.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(format!("{DONE}:{token}"))
            .arg(millis(self.inner.window));
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let fresh: Vec<i64> = bounded(&inner.reach, invocation.invoke_async(&mut conn)).await?;
            Ok(fresh.iter().map(|&f| f == 1).collect())
        })
    }

    /// The in-memory window's answer for `keys` (each marked if new).
    fn mark_locally<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Vec<bool> {
        let now = Instant::now();
        let until = crate::time::deadline(now, self.inner.window);
        let mut local = self.local();
        keys.map(|key| local.set_nx(key, None, until, now))
            .collect()
    }
}

from_ref_handle!(impl[] DedupeWindow, "the window");

impl fmt::Debug for DedupeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeWindow")
            .field("name", &self.inner.name)
            .field("window", &self.inner.window)
            .field("lease", &self.lease)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Where a claim is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    Redis,
    /// In the handle's in-memory window (`Unavailable::Local`).
    Local,
    /// Nowhere (`Unavailable::FailOpen`).
    Nowhere,
}

/// The right to process one key, from [`DedupeWindow::claim`]: finish with
/// [`done`](Self::done); dropped without it, the key is released (in a background task) so
/// that a redelivery can be processed.
#[must_use = "a claim dropped at once releases its key: process the item, then call `done`"]
pub struct Claim {
    window: DedupeWindow,
    key: String,
    token: u64,
    backing: Backing,
    /// Not done or released yet: dropping it releases the key.
    open: bool,
}

impl Claim {
    /// The key claimed.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Marks the key done for the window: claims on it within the window return `None`.
    ///
    /// Returns `false` if this claim's lease had expired and another claim holds the key now
    /// (its holder will mark it); `true` once marked.
    ///
    /// # Errors
    ///
    /// Redis did not answer: the mark is lost, and the key stays claimed until the lease
    /// expires (then a redelivery is processed again). A claim granted while Redis was away
    /// is marked in the in-memory window (`Local`) or nowhere (`FailOpen`).
    pub async fn done(mut self) -> Result<bool, RedisError> {
        self.open = false;
        let window = &self.window;
        match self.backing {
            Backing::Redis => {
                let mut conn = window.inner.conn.clone();
                let mut invocation = MARK_DONE.prepare_invoke();
                invocation
                    .key(window.redis_key(&self.key))
                    .arg(format!("claim:{}", self.token))
                    .arg(millis(window.inner.window));
                let marked = window
                    .ask(invocation.invoke_async::<i64>(&mut conn))
                    .await?;
                Ok(marked == 1)
            }
            Backing::Local => {
                let now = Instant::now();
                let until = crate::time::deadline(now, window.inner.window);
                Ok(window.local().mark_done(&self.key, self.token, until, now))
            }
            Backing::Nowhere => Ok(true),
        }
    }

    /// Gives the key back now, so that a redelivery can be processed (what dropping the claim
    /// does in a background task).
    ///
    /// # Errors
    ///
    /// Redis did not answer: the key stays claimed until the lease expires.
    pub async fn release(mut self) -> Result<(), RedisError> {
        self.open = false;
        release(&self.window, &self.key, self.token, self.backing).await
    }
}

async fn release(
    window: &DedupeWindow,
    key: &str,
    token: u64,
    backing: Backing,
) -> Result<(), RedisError> {
    match backing {
        Backing::Redis => {
            let mut conn = window.inner.conn.clone();
            let mut invocation = RELEASE.prepare_invoke();
            invocation
                .key(window.redis_key(key))
                .arg(format!("claim:{token}"));
            window
                .ask(invocation.invoke_async::<i64>(&mut conn))
                .await
                .map(drop)
        }
        Backing::Local => {
            window.local().release(key, token);
            Ok(())
        }
        Backing::Nowhere => Ok(()),
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        match self.backing {
            Backing::Local => return self.window.local().release(&self.key, self.token),
            Backing::Nowhere => return,
            Backing::Redis => {}
        }
        let window = self.window.clone();
        let key = std::mem::take(&mut self.key);
        let (token, backing) = (self.token, self.backing);
        spawn(async move {
            let _ = release(&window, &key, token, backing).await;
        });
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("window", &self.window.inner.name)
            .field("key", &self.key)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

/// The in-memory window of [`Unavailable::Local`]: each key's expiry, and the claim holding
/// it (`None`: done or seen).
#[derive(Debug, Default)]
struct LocalWindow {
    keys: HashMap<String, (Instant, Option<u64>)>,
}

impl LocalWindow {
    /// `SET NX` with an expiry: whether `key` was free (it now holds `holder` until `until`).
    fn set_nx(&mut self, key: &str, holder: Option<u64>, until: Instant, now: Instant) -> bool {
        if let Some((expiry, _)) = self.keys.get(key) {
            if *expiry > now {
                return false;
            }
        } else if self.keys.len() >= DedupeWindow::LOCAL_CAPACITY {
            self.keys.retain(|_, (expiry, _)| *expiry > now);
            if self.keys.len() >= DedupeWindow::LOCAL_CAPACITY {
                let first = self
                    .keys
                    .iter()
                    .min_by_key(|(_, (expiry, _))| *expiry)
                    .map(|(key, _)| key.clone());
                if let Some(first) = first {
                    self.keys.remove(&first);
                }
            }
        }
        self.keys.insert(key.to_owned(), (until, holder));
        true
    }

    /// Marks `key` done until `until` if `token` holds it or nobody does.
    fn mark_done(&mut self, key: &str, token: u64, until: Instant, now: Instant) -> bool {
        match self.keys.get(key) {
            Some((expiry, holder)) if *expiry > now && *holder != Some(token) => false,
            _ => {
                self.keys.insert(key.to_owned(), (until, None));
                true
            }
        }
    }

    /// Whether `key` is marked done (or seen) at `now`.
    fn is_done(&self, key: &str, now: Instant) -> bool {
        self.keys
            .get(key)
            .is_some_and(|(expiry, holder)| *expiry > now && holder.is_none())
    }

    /// Forgets `key` if `token` holds it.
    fn release(&mut self, key: &str, token: u64) {
        if self
            .keys
            .get(key)
            .is_some_and(|(_, holder)| *holder == Some(token))
        {
            self.keys.remove(key);
        }
    }
}

/// The round trip of a batch: whether each key was new. In a `Mutex` only so that the stream
/// stays `Sync`; it is never locked (`get_mut`).
type Marking = Mutex<BoxFuture<'static, Result<Vec<bool>, RedisError>>>;

/// The first wait before a batch is retried under `FailClosed`, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pin_project! {
    /// Stream for the [`dedupe_with`](crate::PipelineExt::dedupe_with) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct DedupeWith<S, K, F>
    where
        S: Stream,
    {
        #[pin]
        stream: Fuse<S>,
        window: DedupeWindow,
        key: F,
        // Items read together, with their Redis keys, waiting for their round trip.
        batch: Vec<(S::Item, String)>,
        // The value the batch marks its keys with, the same for each retry of it.
        token: u64,
        marking: Option<Marking>,
        // `FailClosed`: the wait before the batch is retried.
        pause: Option<Pin<Box<Sleep>>>,
        backoff: Duration,
        // Items that passed, in order.
        passed: VecDeque<S::Item>,
        _key: PhantomData<fn() -> K>,
    }
}

impl<S, K, F> DedupeWith<S, K, F>
where
    S: Stream,
    F: FnMut(&S::Item) -> K,
    K: fmt::Display,
{
    pub(crate) fn new(stream: S, window: DedupeWindow, key: F) -> Self {
        Self {
            stream: stream.fuse(),
            window,
            key,
            batch: Vec::new(),
            token: 0,
            marking: None,
            pause: None,
            backoff: FIRST_BACKOFF,
            passed: VecDeque::new(),
            _key: PhantomData,
        }
    }

    /// The window this stream marks keys in.
    pub fn window(&self) -> &DedupeWindow {
        &self.window
    }

    delegate_access_inner!(pub stream, S, (.));
}

impl<S, K, F> Stream for DedupeWith<S, K, F>
where
    S: Stream,
    F: FnMut(&S::Item) -> K,
    K: fmt::Display,
{
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let mut this = self.project();
        // Whole batches of duplicates from an always-ready upstream: yield to the runtime now
        // and then.
        let mut budget = 4;
        loop {
            if let Some(item) = this.passed.pop_front() {
                return Poll::Ready(Some(item));
            }
            if let Some(pause) = this.pause {
                ready!(pause.as_mut().poll(cx));
                *this.pause = None;
            }
            if this.marking.is_none() && !this.batch.is_empty() {
                // A batch read, or one to retry.
                let keys = this.batch.iter().map(|(_, key)| key.clone()).collect();
                let marking = this.window.mark_batch(keys, *this.token);
                *this.marking = Some(Mutex::new(marking));
            }
            if let Some(marking) = this.marking {
                let reply = ready!(
                    marking
                        .get_mut()
                        .unwrap_or_else(PoisonError::into_inner)
                        .as_mut()
                        .poll(cx)
                );
                *this.marking = None;
                let window = &*this.window;
                let fresh = match reply {
                    Ok(fresh) => {
                        window.answered();
                        *this.backoff = FIRST_BACKOFF;
                        fresh
                    }
                    Err(error) => {
                        window.failed(&error);
                        match window.policy {
                            Unavailable::FailOpen => vec![true; this.batch.len()],
                            Unavailable::Local { .. } => window.mark_locally(
                                this.batch
                                    .iter()
                                    .map(|(_, key)| &key[window.inner.prefix.len()..]),
                            ),
                            _ => {
                                // Hold the batch and retry it after a pause.
                                let wait = *this.backoff;
                                *this.backoff = (wait * 2).min(MAX_BACKOFF);
                                *this.pause = Some(Box::pin(tokio::time::sleep(wait)));
                                continue;
                            }
                        }
                    }
                };
                for ((item, _), fresh) in this.batch.drain(..).zip(fresh) {
                    if fresh {
                        this.passed.push_back(item);
                    }
                }
                this.batch.clear();
                budget -= 1;
                if budget == 0 && this.passed.is_empty() {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                continue;
            }
            // Read what is ready, up to a batch.
            while this.batch.len() < DedupeWindow::MAX_BATCH {
                match this.stream.as_mut().poll_next(cx) {
                    Poll::Ready(Some(item)) => {
                        let key = this.window.redis_key(&(this.key)(&item).to_string());
                        this.batch.push((item, key));
                    }
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            *this.token = fastrand::u64(..);
            if this.batch.is_empty() {
                return if this.stream.is_terminated() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Any item read may be a duplicate; the ones that passed are certain.
        let held = self.passed.len();
        let upper = self
            .stream
            .size_hint()
            .1
            .and_then(|u| u.checked_add(held + self.batch.len()));
        (held, upper)
    }
}

impl<S, K, F> FusedStream for DedupeWith<S, K, F>
where
    S: Stream,
    F: FnMut(&S::Item) -> K,
    K: fmt::Display,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated() && self.batch.is_empty() && self.passed.is_empty()
    }
}

impl<S, K, F> fmt::Debug for DedupeWith<S, K, F>
where
    S: Stream + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeWith")
            .field("stream", self.stream.get_ref())
            .field("window", &self.window)
            .field("batch", &self.batch.len())
            .field("passed", &self.passed.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_local_window_is_set_nx_with_expiry_and_token_checks() {
        let mut w = LocalWindow::default();
        let now = Instant::now();
        let later = |ms| now + Duration::from_millis(ms);
        assert!(w.set_nx("a", Some(1), later(100), now));
        assert!(!w.set_nx("a", Some(2), later(100), now), "held");
        w.release("a", 2);
        assert!(
            !w.set_nx("a", Some(2), later(100), later(50)),
            "not 2's to release"
        );
        assert!(!w.mark_done("a", 2, later(500), later(50)), "1 holds it");
        assert!(
            w.set_nx("a", Some(2), later(200), later(100)),
            "1's lease expired"
        );
        assert!(w.mark_done("a", 2, later(300), later(150)));
        w.release("a", 2);
        assert!(
            !w.set_nx("a", Some(3), later(400), later(299)),
            "done until 300"
        );
        assert!(w.set_nx("a", None, later(400), later(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_window_forgets_the_first_expiry_when_full() {
        let mut w = LocalWindow::default();
        let now = Instant::now();
        for i in 0..DedupeWindow::LOCAL_CAPACITY {
            let until = now + Duration::from_secs(10 + i as u64);
            assert!(w.set_nx(&i.to_string(), None, until, now));
        }
        assert!(w.set_nx("new", None, now + Duration::from_secs(1), now));
        assert_eq!(w.keys.len(), DedupeWindow::LOCAL_CAPACITY);
        assert!(
            !w.keys.contains_key("0"),
            "the first to expire is forgotten"
        );
        assert!(w.keys.contains_key("1"));
    }

    #[test]
    fn milliseconds_round_up_and_saturate() {
        assert_eq!(millis(Duration::from_nanos(1)), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_secs(3)), 3000);
        assert_eq!(
            millis(Duration::MAX),
            crate::time::FAR_FUTURE.as_millis() as u64
        );
    }
}
