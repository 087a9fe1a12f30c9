//! [`CachedCall`]: a [`Call`] behind a shared [`Cache`].

use std::fmt;
use std::future::Future;
use std::hash::Hash;

use super::{Call, CallError, CallRetry};
use crate::Cache;

/// A [`Call`] whose results are kept in a shared [`Cache`], from [`Call::cached`].
///
/// The cache is the outermost layer: a hit returns at once without touching the call's rate
/// limit, breaker or stats; concurrent misses for one key make one run of the call (retries
/// and all) and share its result. Errors are cached only if the cache says so
/// ([`Cache::cache_errors_for`]).
pub struct CachedCall<F, R, K, KF, U, E> {
    call: Call<F, R>,
    cache: Cache<K, U, CallError<E>>,
    key: KF,
}

impl<F, R> Call<F, R> {
    /// Keeps this call's results in `cache`, under the key `key(&item)`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use stagepipe::{Cache, CallError};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let stats = CallStats::new("lookup");
    /// let cache: Cache<u32, String, CallError<String>> = Cache::new(100, Duration::from_secs(60));
    /// let lookup = Call::new(|id: u32| async move {
    ///     tokio::time::sleep(Duration::from_millis(5)).await;
    ///     Ok::<_, String>(format!("user {id}"))
    /// })
    /// .timeout(Duration::from_secs(1))
    /// .stats(&stats)
    /// .cached(&cache, |id: &u32| *id);
    ///
    /// // 100 requests for 5 users: 5 calls.
    /// let names: Vec<_> = stream::iter((0..100u32).map(|i| i % 5))
    ///     .in_flight_ordered(10, move |id| lookup.run(id))
    ///     .collect()
    ///     .await;
    /// assert_eq!(names[7].as_deref(), Ok("user 2"));
    /// assert_eq!(stats.snapshot().calls, 5);
    /// let c = cache.stats();
    /// assert_eq!(c.misses, 5);
    /// assert_eq!(c.hits + c.coalesced, 95);
    /// # }
    /// ```
    pub fn cached<K, KF, U, E>(
        self,
        cache: &Cache<K, U, CallError<E>>,
        key: KF,
    ) -> CachedCall<F, R, K, KF, U, E> {
        CachedCall {
            call: self,
            cache: cache.clone(),
            key,
        }
    }
}

impl<F, R, K, KF, U, E> CachedCall<F, R, K, KF, U, E> {
    /// Runs the call for `item`, or answers from the cache.
    pub fn run<T, Fut>(
        &self,
        item: T,
    ) -> impl Future<Output = Result<U, CallError<E>>> + Send + 'static + use<F, R, K, KF, U, E, T, Fut>
    where
        KF: Fn(&T) -> K,
        K: Hash + Eq + Clone + Send + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
        R: CallRetry<T, E>,
        T: Send + 'static,
        U: Clone + Send + Sync + 'static,
        E: Clone + Send + Sync + 'static,
    {
        let key = (self.key)(&item);
        let call = self.call.clone();
        self.cache.try_get_with(key, move || call.run(item))
    }

    /// The cache.
    pub fn cache(&self) -> &Cache<K, U, CallError<E>> {
        &self.cache
    }

    /// The call behind the cache.
    pub fn call(&self) -> &Call<F, R> {
        &self.call
    }
}

impl<F, R, K, KF: Clone, U, E> Clone for CachedCall<F, R, K, KF, U, E> {
    fn clone(&self) -> Self {
        Self {
            call: self.call.clone(),
            cache: self.cache.clone(),
            key: self.key.clone(),
        }
    }
}

impl<F, R, K, KF, U, E> fmt::Debug for CachedCall<F, R, K, KF, U, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedCall")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}
