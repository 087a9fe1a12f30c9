//! State shared across processes in Redis (feature `redis`).
//!
//! A service that runs as N replicas has budgets that are global: one rate limit towards a
//! partner API for the whole fleet, one circuit breaker for one failing dependency, one
//! idempotency window for messages that may be redelivered to any replica, and one durable
//! queue that spreads work between replicas. This module keeps that state in Redis, behind the
//! same handles and operators as the in-memory state:
//!
//! * [`RateLimiter::redis`](crate::RateLimiter::redis) and
//!   [`KeyedRateLimiter::redis`](crate::KeyedRateLimiter::redis): a GCRA evaluated by one
//!   atomic server-side script on Redis's own clock, one round trip serving every waiter of a
//!   process queued meanwhile, deadlines converted so that no cell goes out early (the fleet's
//!   bound is in [`RateLimiter::redis`](crate::RateLimiter::redis));
//! * [`CircuitBreaker::redis`](crate::CircuitBreaker::redis): a shared failure count and state,
//!   with one half-open trial across the fleet;
//! * [`DedupeWindow`]: a dedupe window over `SET NX PX`, for streams
//!   ([`dedupe_with`](crate::PipelineExt::dedupe_with)) and for effectively-once processing of
//!   an at-least-once queue ([`DedupeWindow::claim`]);
//! * [`StreamSource`]: a consumer-group reader of a Redis stream, acknowledged after processing.
//!
//! Every handle takes a [`ConnectionManager`] (see [`connect`]) and a policy for the time Redis
//! cannot be reached ([`Unavailable`]).

mod breaker;
mod dedupe;
mod limiter;
mod stream;

use std::num::NonZeroU32;
use std::time::Duration;

pub use ::redis::RedisError;
pub use ::redis::aio::ConnectionManager;

pub(crate) use breaker::{RedisBreaker, RedisPermit};
pub use dedupe::{Claim, DedupeWindow, DedupeWith};
pub(crate) use limiter::{RedisLimiter, Wait};
pub use stream::{
    Ack, Entry, FieldError, Message, SourceHandle, SourceStats, StreamError, StreamSource,
    StreamSourceBuilder,
};

/// How long one command may take before it fails (and the handle's [`Unavailable`] policy
/// applies), as set by [`connect`].
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to the Redis server at `url` (`redis://host:port/db`) with the settings the
/// handles expect: each command fails after [`RESPONSE_TIMEOUT`] instead of hanging, and a
/// lost connection is re-established in the background with exponential backoff (capped at
/// one second between attempts).
///
/// # Errors
///
/// A malformed `url`, or a server that cannot be reached.
pub async fn connect(url: &str) -> Result<ConnectionManager, RedisError> {
    let client = ::redis::Client::open(url)?;
    ConnectionManager::new_with_config(client, config()).await
}

/// As [`connect`], without waiting for the first connection: it is made on the first command,
/// so a service can start while Redis is down (its handles then follow their [`Unavailable`]
/// policy).
///
/// # Errors
///
/// A malformed `url`.
pub fn connect_lazy(url: &str) -> Result<ConnectionManager, RedisError> {
    let client = ::redis::Client::open(url)?;
    ConnectionManager::new_lazy_with_config(client, config())
}

fn config() -> ::redis::aio::ConnectionManagerConfig {
    ::redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(6)
}

/// What a Redis-backed handle does while Redis cannot be reached (a refused connection, a
/// timeout, a server error), chosen per handle. Whatever the policy, a failure is never a
/// panic: it is a `tracing` warning (target `stagepipe::redis`), and the connection is
/// re-established in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unavailable {
    /// Let work through as if the shared state allowed it: a limiter does not wait, a breaker
    /// admits, a dedupe window sees every key as new.
    FailOpen,
    /// Hold work back until Redis answers again: a limiter waits (retrying with backoff), a
    /// breaker rejects, a dedupe window waits. Put a timeout around the work (a
    /// [`Call`](crate::Call)'s, say) to bound the wait.
    FailClosed,
    /// Fall back to the handle's own in-memory state while Redis is away: a limiter's local
    /// budget is its quota divided by `replicas` (so N replicas together stay within the
    /// quota), a breaker counts this process's failures, a dedupe window remembers this
    /// process's keys.
    Local {
        /// How many replicas share the quota.
        replicas: NonZeroU32,
    },
}

impl Default for Unavailable {
    /// [`Unavailable::FailClosed`]: never exceed a shared budget.
    fn default() -> Self {
        Unavailable::FailClosed
    }
}
