//! [`Cache`]: a shared cache of async results with a time to live, a capacity and singleflight:
//! concurrent misses for one key make one call and share its result.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};
use futures::stream::Stream;
use tokio::time::Instant;

use crate::error::{ConfigError, nonzero, or_panic};
use crate::retry::deadline_after;

/// A call's outcome as every waiter sees it: its result, or the panic it ended in.
type Outcome<V, E> = Result<Result<V, E>, Arc<Panicked>>;

/// One call, shared by its waiters.
type Flight<V, E> = Shared<BoxFuture<'static, Outcome<V, E>>>;

/// A call that panicked. `Shared` does not wake its other waiters when the future it polls
/// panics (they would wait forever), so the call catches its panic and hands it to each
/// waiter: the first re-raises the original payload, the others a panic with its message.
struct Panicked {
    payload: Mutex<Option<Box<dyn Any + Send>>>,
    message: String,
}

impl Panicked {
    fn raise(&self) -> ! {
        let payload = self
            .payload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match payload {
            Some(payload) => std::panic::resume_unwind(payload),
            None => panic!("{}", self.message),
        }
    }
}

/// A cache of async results shared by every clone: entries live for a time to live (TTL), at
/// most `capacity` of them are kept, and **concurrent misses for one key make one call** whose
/// result every caller gets (singleflight).
///
/// Errors are not cached unless [`cache_errors_for`](Self::cache_errors_for) says for how long
/// (a short, separate TTL, so a failing upstream is not hammered by every request for the same
/// key). Callers waiting on one call get its error too.
///
/// `Cache` is a cheap [`Clone`] handle, like the crate's other handles: clones share the
/// entries and the figures ([`stats`](Self::stats)). Time is tokio's clock, so tests can run
/// on a paused clock.
///
/// When the cache is full, adding a key first drops expired entries, then evicts with the
/// CLOCK policy (an approximation of least-recently-used: an entry read since the hand last
/// passed gets a second chance). Keys whose call is still running are never evicted, so the
/// cache can hold more than `capacity` entries while more than `capacity` distinct keys are
/// being fetched at once.
///
/// # Cancellation and panics
///
/// A call runs while any caller waits for it: if the caller that started it is dropped, the
/// others carry it on; if all are dropped, it is dropped too and the next caller starts anew.
/// A call that panics panics in every caller waiting for it (as if each had run it inline),
/// and is not cached.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use stagepipe::Cache;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// static CALLS: AtomicU32 = AtomicU32::new(0);
/// let users: Cache<u32, String, String> = Cache::new(1000, Duration::from_secs(60));
/// let fetch = |id: u32| async move {
///     CALLS.fetch_add(1, Ordering::Relaxed);
///     tokio::time::sleep(Duration::from_millis(10)).await; // the request
///     Ok::<_, String>(format!("user {id}"))
/// };
/// // Ten concurrent requests for one user make one call.
/// let all = futures::future::join_all((0..10).map(|_| users.try_get_with(7, || fetch(7)))).await;
/// assert!(all.iter().all(|r| r.as_deref() == Ok("user 7")));
/// assert_eq!(CALLS.load(Ordering::Relaxed), 1);
/// let s = users.stats();
/// assert_eq!((s.misses, s.coalesced, s.hits), (1, 9, 0));
/// // Later requests are hits until the entry expires.
/// assert_eq!(users.try_get_with(7, || fetch(7)).await.unwrap(), "user 7");
/// assert_eq!(CALLS.load(Ordering::Relaxed), 1);
/// # }
/// ```
pub struct Cache<K, V, E = Infallible> {
    shared: Arc<Inner<K, V, E>>,
}

struct Inner<K, V, E> {
    name: String,
    ttl: Duration,
    error_ttl: Option<Duration>,
    capacity: usize,
    state: Mutex<State<K, V, E>>,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    errors: AtomicU64,
    evictions: AtomicU64,
}

struct State<K, V, E> {
    map: HashMap<K, Entry<V, E>, foldhash::fast::RandomState>,
    /// Keys in the order the CLOCK hand visits them, each with the stamp of the entry it was
    /// pushed for (an entry removed and added again has a new stamp; the old place is skipped).
    ring: VecDeque<(K, u64)>,
    next_stamp: u64,
}

struct Entry<V, E> {
    stamp: u64,
    slot: Slot<V, E>,
}

enum Slot<V, E> {
    /// A call is running; the cache holds it weakly, so callers alone keep it alive.
    Pending {
        id: u64,
        flight: WeakShared<BoxFuture<'static, Outcome<V, E>>>,
    },
    /// A result, until `expires`; `used` is the CLOCK bit.
    Ready {
        value: Result<V, E>,
        expires: Instant,
        used: bool,
    },
}

/// What a lookup found.
enum Lookup<V, E> {
    Hit(Result<V, E>),
    Wait(u64, Flight<V, E>),
    Miss,
}

/// Figures of a [`Cache`], from [`Cache::stats`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// The cache's name.
    pub name: String,
    /// Lookups answered from a stored entry (errors cached by `cache_errors_for` included).
    pub hits: u64,
    /// Lookups that started a call.
    pub misses: u64,
    /// Lookups that waited for a call another caller had started.
    pub coalesced: u64,
    /// Calls that ended in an error.
    pub errors: u64,
    /// Entries dropped to make room (expired entries dropped are not counted).
    pub evictions: u64,
    /// Entries now held, running calls included.
    pub len: usize,
}

impl fmt::Display for CacheStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lookups = self.hits + self.misses + self.coalesced;
        let rate = if lookups == 0 {
            0.0
        } else {
            (self.hits + self.coalesced) as f64 * 100.0 / lookups as f64
        };
        write!(
            f,
            "{}: {} hits, {} misses, {} coalesced ({rate:.1}% without a call), {} errors, \
             {} evictions, {} entries",
            self.name,
            self.hits,
            self.misses,
            self.coalesced,
            self.errors,
            self.evictions,
            self.len
        )
    }
}

impl<K, V, E> Cache<K, V, E> {
    /// A cache of at most `capacity` entries, each kept for `ttl`.
    ///
    /// # Panics
    ///
    /// If `capacity` or `ttl` is zero, with a message naming it; see
    /// [`try_new`](Self::try_new).
    #[track_caller]
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        or_panic(Self::try_new(capacity, ttl))
    }

    /// Like [`new`](Self::new), or an error naming `capacity` or `ttl` if it is zero.
    pub fn try_new(capacity: usize, ttl: Duration) -> Result<Self, ConfigError> {
        nonzero("capacity", capacity as u64)?;
        nonzero("ttl", u64::from(!ttl.is_zero()))?;
        Ok(Self {
            shared: Arc::new(Inner {
                name: String::from("cache"),
                ttl,
                error_ttl: None,
                capacity,
                state: Mutex::new(State {
                    map: HashMap::default(),
                    ring: VecDeque::new(),
                    next_stamp: 0,
                }),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                coalesced: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
            }),
        })
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner<K, V, E>)) -> Self {
        let inner = Arc::get_mut(&mut self.shared)
            .expect("a cache is configured before it is cloned or used");
        f(inner);
        self
    }

    /// Keeps errors too, for `ttl` (usually much shorter than the values' TTL); by default
    /// errors are not cached and the next lookup calls again. A zero `ttl` keeps the default.
    ///
    /// # Panics
    ///
    /// If the cache was already cloned (configure it first).
    pub fn cache_errors_for(self, ttl: Duration) -> Self {
        self.configure(|i| i.error_ttl = (!ttl.is_zero()).then_some(ttl))
    }

    /// Names the cache in its [`stats`](Self::stats).
    ///
    /// # Panics
    ///
    /// If the cache was already cloned (configure it first).
    pub fn named(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.configure(|i| i.name = name)
    }

    /// The figures so far.
    pub fn stats(&self) -> CacheStats {
        let s = &*self.shared;
        CacheStats {
            name: s.name.clone(),
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            coalesced: s.coalesced.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            len: s.lock().map.len(),
        }
    }

    /// How many entries may be kept.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// How long a value is kept.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }
}

impl<K, V, E> Inner<K, V, E> {
    fn lock(&self) -> MutexGuard<'_, State<K, V, E>> {
        // No user code runs under the lock except `K`'s `Hash`/`Eq`; a panic there leaves
        // at worst an entry missing or stale, which the cache tolerates.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K, V, E> Cache<K, V, E>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// The value or error stored for `key`, if any and not expired (counted as a hit; a miss
    /// is not counted, since nothing is called).
    pub fn get(&self, key: &K) -> Option<Result<V, E>> {
        let s = &*self.shared;
        let Lookup::Hit(value) = s.lock().find(key) else {
            return None;
        };
        s.hits.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }

    /// Drops `key`'s entry (a call still running for it goes on for its callers, but its result
    /// is not stored).
    pub fn invalidate(&self, key: &K) {
        self.shared.lock().map.remove(key);
    }

    /// The result for `key`: stored, or the running call's, or a new call of `call()` (called
    /// only on a miss). Concurrent misses for one key make one call.
    pub fn try_get_with<F, Fut>(
        &self,
        key: K,
        call: F,
    ) -> impl Future<Output = Result<V, E>> + Send + 'static + use<K, V, E, F, Fut>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let got = self.start(key, call);
        async move {
            match got {
                Got::Ready(value) => value,
                Got::Flight(finish) => finish.await,
            }
        }
    }

    /// Looks `key` up; on a miss, registers a call of `call()` and returns it. Synchronous, so
    /// that a stream can answer hits without a future.
    fn start<F, Fut>(&self, key: K, call: F) -> Got<K, V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let s = &*self.shared;
        let mut state = s.lock();
        match state.find(&key) {
            Lookup::Hit(value) => {
                drop(state);
                s.hits.fetch_add(1, Ordering::Relaxed);
                return Got::Ready(value);
            }
            Lookup::Wait(id, flight) => {
                drop(state);
                s.coalesced.fetch_add(1, Ordering::Relaxed);
                return Got::Flight(Finish::new(self.clone(), key, id, flight));
            }
            Lookup::Miss => {}
        }
        s.misses.fetch_add(1, Ordering::Relaxed);
        // The call's future counts its own error: it runs once, however many wait for it.
        let counter = Arc::clone(&self.shared);
        let flight: Flight<V, E> = AssertUnwindSafe(call())
            .catch_unwind()
            .map(move |outcome| match outcome {
                Ok(value) => {
                    if value.is_err() {
                        counter.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(value)
                }
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(Arc::new(Panicked {
                        payload: Mutex::new(Some(payload)),
                        message: format!("the cached call panicked: {message}"),
                    }))
                }
            })
            .boxed()
            .shared();
        let weak = flight.downgrade().expect("a flight not yet polled");
        let id = state.next_stamp;
        state.add(
            key.clone(),
            Slot::Pending { id, flight: weak },
            s.capacity,
            &s.evictions,
        );
        drop(state);
        Got::Flight(Finish::new(self.clone(), key, id, flight))
    }

    /// Stores the outcome of call `id` for `key`, if `key` still waits for that call.
    fn store(&self, key: &K, id: u64, outcome: &Outcome<V, E>) {
        let s = &*self.shared;
        let mut state = s.lock();
        let Some(entry) = state.map.get_mut(key) else {
            return;
        };
        if !matches!(entry.slot, Slot::Pending { id: pending, .. } if pending == id) {
            return; // stored by another caller, invalidated, or replaced by a newer call
        }
        let (value, ttl) = match outcome {
            Ok(value @ Ok(_)) => (value, Some(s.ttl)),
            Ok(value @ Err(_)) => (value, s.error_ttl),
            Err(_) => {
                state.map.remove(key); // a panic is never kept
                return;
            }
        };
        match ttl {
            Some(ttl) => {
                entry.slot = Slot::Ready {
                    value: value.clone(),
                    expires: deadline_after(ttl),
                    used: false,
                };
            }
            None => {
                state.map.remove(key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone, E: Clone> State<K, V, E> {
    fn find(&mut self, key: &K) -> Lookup<V, E> {
        let Some(entry) = self.map.get_mut(key) else {
            return Lookup::Miss;
        };
        match &mut entry.slot {
            Slot::Ready {
                value,
                expires,
                used,
            } => {
                if *expires > Instant::now() {
                    *used = true;
                    return Lookup::Hit(value.clone());
                }
            }
            Slot::Pending { id, flight } => {
                if let Some(flight) = flight.upgrade() {
                    return Lookup::Wait(*id, flight);
                }
            }
        }
        // Expired, or a call nobody waits for any more.
        self.map.remove(key);
        Lookup::Miss
    }

    /// Adds `key` (not in the map), making room first if the cache is full.
    fn add(&mut self, key: K, slot: Slot<V, E>, capacity: usize, evictions: &AtomicU64) {
        if self.map.len() >= capacity {
            self.make_room(capacity, evictions);
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.ring.push_back((key.clone(), stamp));
        self.map.insert(key, Entry { stamp, slot });
        // Places of removed entries are skipped by the hand; keep them from piling up.
        if self.ring.len() > 2 * capacity + 16 {
            let map = &self.map;
            self.ring
                .retain(|(k, stamp)| map.get(k).is_some_and(|e| e.stamp == *stamp));
        }
    }

    /// Drops entries until one below `capacity`: expired ones and dead calls first (one sweep
    /// of the hand), then by CLOCK. Running calls stay.
    fn make_room(&mut self, capacity: usize, evictions: &AtomicU64) {
        let now = Instant::now();
        let mut budget = 2 * self.ring.len() + 1;
        while self.map.len() >= capacity && budget > 0 {
            budget -= 1;
            let Some((key, stamp)) = self.ring.pop_front() else {
                return;
            };
            let Some(entry) = self.map.get_mut(&key) else {
                continue;
            };
            if entry.stamp != stamp {
                continue;
            }
            match &mut entry.slot {
                Slot::Pending { flight, .. } => {
                    if flight.upgrade().is_none() {
                        self.map.remove(&key);
                    } else {
                        self.ring.push_back((key, stamp));
                    }
                }
                Slot::Ready { expires, used, .. } => {
                    if *expires <= now {
                        self.map.remove(&key);
                    } else if std::mem::take(used) {
                        self.ring.push_back((key, stamp));
                    } else {
                        self.map.remove(&key);
                        evictions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The start of a lookup: a stored result, or a call to wait for.
enum Got<K, V, E> {
    Ready(Result<V, E>),
    Flight(Finish<K, V, E>),
}

/// Waits for call `id` and stores its outcome (whichever waiter sees it first stores it).
struct Finish<K, V, E> {
    cache: Cache<K, V, E>,
    key: K,
    id: u64,
    flight: Flight<V, E>,
}

impl<K, V, E> Finish<K, V, E> {
    fn new(cache: Cache<K, V, E>, key: K, id: u64, flight: Flight<V, E>) -> Self {
        Self {
            cache,
            key,
            id,
            flight,
        }
    }
}

// Nothing in a `Finish` is pinned: the flight is a `Shared` (itself `Unpin`).
impl<K, V, E> Unpin for Finish<K, V, E> {}

impl<K, V, E> Future for Finish<K, V, E>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    type Output = Result<V, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = ready!(self.flight.poll_unpin(cx));
        if self.id != u64::MAX {
            self.cache.store(&self.key, self.id, &outcome);
            self.id = u64::MAX; // stored (or refused) once
        }
        match outcome {
            Ok(value) => Poll::Ready(value),
            Err(panicked) => panicked.raise(),
        }
    }
}

impl<K, V, E> Clone for Cache<K, V, E> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, V, E> fmt::Debug for Cache<K, V, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.shared.name)
            .field("capacity", &self.shared.capacity)
            .field("ttl", &self.shared.ttl)
            .field("error_ttl", &self.shared.error_ttl)
            .finish_non_exhaustive()
    }
}

pin_project_lite::pin_project! {
    /// Stream for [`cached`](crate::PipelineExt::cached).
    #[must_use = "streams do nothing unless polled"]
    pub struct Cached<St, K, V, E, KF, F> {
        #[pin]
        stream: St,
        cache: Cache<K, V, E>,
        key: KF,
        f: F,
        running: Option<Finish<K, V, E>>,
    }
}

impl<St, K, V, E, KF, F> Cached<St, K, V, E, KF, F> {
    pub(crate) fn new(stream: St, cache: Cache<K, V, E>, key: KF, f: F) -> Self {
        Self {
            stream,
            cache,
            key,
            f,
            running: None,
        }
    }
}

impl<St, K, V, E, KF, F, Fut> Stream for Cached<St, K, V, E, KF, F>
where
    St: Stream,
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    KF: FnMut(&St::Item) -> K,
    F: FnMut(St::Item) -> Fut,
    Fut: Future<Output = Result<V, E>> + Send + 'static,
{
    type Item = Result<V, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(running) = this.running.as_mut() {
                let value = ready!(Pin::new(running).poll(cx));
                *this.running = None;
                return Poll::Ready(Some(value));
            }
            let Some(item) = ready!(this.stream.as_mut().poll_next(cx)) else {
                return Poll::Ready(None);
            };
            let key = (this.key)(&item);
            let f = &mut *this.f;
            match this.cache.start(key, || f(item)) {
                Got::Ready(value) => return Poll::Ready(Some(value)),
                Got::Flight(finish) => *this.running = Some(finish),
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let (lower, upper) = self.stream.size_hint();
        let running = usize::from(self.running.is_some());
        (
            lower.saturating_add(running),
            upper.and_then(|u| u.checked_add(running)),
        )
    }
}

impl<St: fmt::Debug, K, V, E, KF, F> fmt::Debug for Cached<St, K, V, E, KF, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cached")
            .field("stream", &self.stream)
            .field("cache", &self.cache)
            .field("running", &self.running.is_some())
            .finish()
    }
}
