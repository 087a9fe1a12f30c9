//! Errors shared by every constructor.

use std::fmt;
use std::time::Duration;

/// An invalid configuration value, refused at construction.
///
/// Returned by the `try_*` constructors (such as [`WorkerPool::try_new`](crate::WorkerPool::try_new));
/// the panicking constructors panic with the same message. [`Display`](fmt::Display) names the
/// parameter exactly as it is written in the constructor's signature.
///
/// ```
/// use stagepipe::WorkerPool;
///
/// let err = WorkerPool::try_new(0).unwrap_err();
/// assert_eq!(err.parameter(), "workers");
/// assert!(err.to_string().contains("workers"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    parameter: &'static str,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) const fn new(parameter: &'static str, reason: &'static str) -> Self {
        Self { parameter, reason }
    }

    /// The name of the parameter that was refused, as written in the constructor's signature.
    pub fn parameter(&self) -> &'static str {
        self.parameter
    }

    /// Why the value was refused, e.g. `"must be greater than zero"`.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// Panics with this error's message; used by the panicking constructors.
    #[track_caller]
    pub(crate) fn panic(self) -> ! {
        panic!("{self}")
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.parameter, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// `Err` naming `parameter` if `value` is zero.
pub(crate) fn nonzero(parameter: &'static str, value: u64) -> Result<(), ConfigError> {
    positive(parameter, value != 0)
}

/// `Err` naming `parameter` if `value` is zero.
pub(crate) fn nonzero_duration(
    parameter: &'static str,
    value: Duration,
) -> Result<(), ConfigError> {
    positive(parameter, !value.is_zero())
}

fn positive(parameter: &'static str, is_positive: bool) -> Result<(), ConfigError> {
    if is_positive {
        Ok(())
    } else {
        Err(ConfigError::new(parameter, "must be greater than zero"))
    }
}

/// The largest window any stream or group accepts: far beyond what memory allows, and well
/// inside what tokio's channels and semaphores can count.
pub(crate) const MAX_WINDOW: usize = 1 << 30;

/// `Err` naming `parameter` if `value` is zero, or above `max` (`too_large` says so).
pub(crate) fn count_up_to(
    parameter: &'static str,
    value: usize,
    max: usize,
    too_large: &'static str,
) -> Result<(), ConfigError> {
    nonzero(parameter, value as u64)?;
    if value > max {
        return Err(ConfigError::new(parameter, too_large));
    }
    Ok(())
}

/// `Err` naming `window` if it is zero or above [`MAX_WINDOW`].
pub(crate) fn window_size(window: usize) -> Result<(), ConfigError> {
    count_up_to("window", window, MAX_WINDOW, "must be at most 2^30")
}

/// Unwraps a constructor result, panicking at the caller with the error's message.
#[track_caller]
pub(crate) fn or_panic<T>(result: Result<T, ConfigError>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => e.panic(),
    }
}
