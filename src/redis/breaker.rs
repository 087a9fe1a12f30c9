//! (being written) The shared state of `CircuitBreaker::redis`.

/// (being written)
#[derive(Debug)]
pub(crate) struct RedisBreaker;
