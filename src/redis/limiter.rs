//! (being written) The shared state of `RateLimiter::redis`.

/// (being written)
#[derive(Debug)]
pub(crate) struct RedisGcra;
