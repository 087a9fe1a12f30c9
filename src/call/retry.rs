//! The retry part of a [`Call`](crate::Call): a type parameter, so that only a retrying call
//! needs `T: Clone`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::CallError;
use crate::Backoff;

/// The retry parameter of a [`Call`](crate::Call) that makes one attempt per run (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRetry;

/// The retry parameter of a [`Call`](crate::Call) built with
/// [`retry`](crate::Call::retry) (`P` = [`RetryAll`]) or [`retry_if`](crate::Call::retry_if)
/// (`P` = the predicate).
pub struct Retrying<P> {
    pub(crate) backoff: Backoff,
    pub(crate) retryable: Arc<P>,
}

impl<P> Retrying<P> {
    /// The backoff policy: attempts in total and the waits between them.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }
}

impl<P> Clone for Retrying<P> {
    fn clone(&self) -> Self {
        Self {
            backoff: self.backoff.clone(),
            retryable: Arc::clone(&self.retryable),
        }
    }
}

impl<P> fmt::Debug for Retrying<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrying")
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// The predicate of [`Call::retry`](crate::Call::retry): every error is worth another attempt
/// (timeouts and rejections included).
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryAll;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::NoRetry {}
    impl<P> Sealed for super::Retrying<P> {}
}

/// How a [`Call`](crate::Call) retries items of type `T` failing with `E`: implemented by
/// [`NoRetry`] for every `T`, and by [`Retrying`] for `T: Clone` (each further attempt gets a
/// clone of the item). Sealed: it cannot be implemented outside this crate.
pub trait CallRetry<T, E>: sealed::Sealed + Send + Sync + 'static {
    /// A copy of `item` for the next attempt, or `None` if no attempt may follow the
    /// `attempts`-th (so the last attempt takes the item without a clone).
    #[doc(hidden)]
    fn copy_for_retry(&self, item: &T, attempts: u32) -> Option<T>;

    /// Whether `error` is worth another attempt.
    #[doc(hidden)]
    fn retryable(&self, error: &CallError<E>) -> bool;

    /// The wait after the `attempts`-th failed attempt.
    #[doc(hidden)]
    fn delay_after(&self, attempts: u32) -> Duration;
}

impl<T, E> CallRetry<T, E> for NoRetry {
    #[inline]
    fn copy_for_retry(&self, _: &T, _: u32) -> Option<T> {
        None
    }

    fn retryable(&self, _: &CallError<E>) -> bool {
        false
    }

    fn delay_after(&self, _: u32) -> Duration {
        Duration::ZERO
    }
}

impl<T: Clone, E> CallRetry<T, E> for Retrying<RetryAll> {
    #[inline]
    fn copy_for_retry(&self, item: &T, attempts: u32) -> Option<T> {
        (attempts < self.backoff.attempts()).then(|| item.clone())
    }

    fn retryable(&self, _: &CallError<E>) -> bool {
        true
    }

    fn delay_after(&self, attempts: u32) -> Duration {
        self.backoff.delay_after(attempts)
    }
}

impl<T, E, P> CallRetry<T, E> for Retrying<P>
where
    T: Clone,
    P: Fn(&CallError<E>) -> bool + Send + Sync + 'static,
{
    #[inline]
    fn copy_for_retry(&self, item: &T, attempts: u32) -> Option<T> {
        (attempts < self.backoff.attempts()).then(|| item.clone())
    }

    fn retryable(&self, error: &CallError<E>) -> bool {
        (self.retryable)(error)
    }

    fn delay_after(&self, attempts: u32) -> Duration {
        self.backoff.delay_after(attempts)
    }
}
