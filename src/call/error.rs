//! [`CallError`]: why a [`Call`](crate::Call) gave up.

use std::error::Error;
use std::fmt;

/// Why [`Call::run`](crate::Call::run) gave up: the last attempt timed out, was rejected by an
/// open circuit breaker, or failed with the function's own error. Every variant carries the
/// number of attempts made ([`attempts`](Self::attempts)), rejected attempts included.
///
/// `Display` says which of the three happened and how many attempts were made; it does not print
/// the function's error, which is the [`source`](Error::source) of a `Failed` error (so an error
/// reporter that walks the chain prints it once).
///
/// The enum and its variants are `#[non_exhaustive]`: match with `{ .. }`.
///
/// ```
/// use std::time::Duration;
/// use stagepipe::{Call, CallError};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let call = Call::new(|n: u32| async move {
///     if n == 0 { Err("zero") } else { Ok(100 / n) }
/// })
/// .timeout(Duration::from_secs(1));
/// match call.run(0).await {
///     Err(CallError::Failed { error, attempts, .. }) => assert_eq!((error, attempts), ("zero", 1)),
///     other => panic!("unexpected {other:?}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError<E> {
    /// The last attempt did not finish within the call's [`timeout`](crate::Call::timeout).
    #[non_exhaustive]
    Timeout {
        /// How many attempts were made, the first one included.
        attempts: u32,
    },
    /// The last attempt was rejected by an open [`CircuitBreaker`](crate::CircuitBreaker):
    /// the function was not called for it.
    #[non_exhaustive]
    Rejected {
        /// How many attempts were made, the first one included.
        attempts: u32,
    },
    /// The last attempt returned this error.
    #[non_exhaustive]
    Failed {
        /// The function's error.
        error: E,
        /// How many attempts were made, the first one included.
        attempts: u32,
    },
}

impl<E> CallError<E> {
    pub(crate) fn timeout(attempts: u32) -> Self {
        Self::Timeout { attempts }
    }

    pub(crate) fn rejected(attempts: u32) -> Self {
        Self::Rejected { attempts }
    }

    pub(crate) fn failed(error: E, attempts: u32) -> Self {
        Self::Failed { error, attempts }
    }

    /// How many attempts were made, the first one included (rejected attempts count).
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Timeout { attempts } | Self::Rejected { attempts } => *attempts,
            Self::Failed { attempts, .. } => *attempts,
        }
    }

    /// Whether the last attempt timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// Whether the last attempt was rejected by an open circuit breaker.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Rejected { .. })
    }

    /// Whether the last attempt returned the function's own error.
    pub fn is_failed(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }

    /// The function's error, if the last attempt returned one.
    pub fn inner(&self) -> Option<&E> {
        match self {
            Self::Failed { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The function's error, if the last attempt returned one.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Failed { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Maps the function's error with `op`, keeping the kind and the attempt count.
    pub fn map<E2>(self, op: impl FnOnce(E) -> E2) -> CallError<E2> {
        match self {
            Self::Timeout { attempts } => CallError::Timeout { attempts },
            Self::Rejected { attempts } => CallError::Rejected { attempts },
            Self::Failed { error, attempts } => CallError::Failed {
                error: op(error),
                attempts,
            },
        }
    }
}

impl<E> fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Timeout { .. } => "call timed out",
            Self::Rejected { .. } => "call rejected: the circuit breaker is open",
            Self::Failed { .. } => "call failed",
        })?;
        match self.attempts() {
            1 => Ok(()),
            n => write!(f, " (after {n} attempts)"),
        }
    }
}

impl<E: Error + 'static> Error for CallError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Failed { error, .. } => Some(error),
            _ => None,
        }
    }
}
