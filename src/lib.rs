//! Concurrent, parallel stream pipelines for tokio.
//!
//! `stagepipe` adds operators to every [`futures::Stream`] through the [`PipelineExt`]
//! extension trait. Everything that many streams must share (a worker pool, a rate limit, an
//! in-flight cap, a circuit breaker, stats) is a cheap [`Clone`] handle: clones share one
//! budget, so many streams (many users of one service) share one set of workers and limits.
//!
//! Every operator keeps the same promises:
//!
//! * **Backpressure and bounded memory.** An operator pulls from upstream only while its own
//!   bounded buffer has room.
//! * **No loss, no duplication.** Every input item leads to exactly one output unless the
//!   operator's purpose is to drop it (dedupe).
//! * **Cancellation.** Dropping a stream cancels the work it started and frees its share of
//!   every budget.
//! * **Time.** All waiting uses tokio's timer, so tests can run on a paused clock.
//!
//! Around a single async function, [`Call`] applies the same handles (timeout, rate limit,
//! in-flight cap, circuit breaker, retry, [`CallStats`]) in one fixed order and drops into any
//! operator: `.in_flight(20, move |x| call.run(x))`.
//!
//! # Errors
//!
//! Error types follow one chaining rule: an error's `Display` never repeats what its
//! [`source()`](std::error::Error::source) returns. Wrappers that show the user's error in their
//! message ([`StageError::Failed`], [`RetryError`], [`BreakerError::Failed`]) return *that
//! error's* source; [`CallError`] shows only what happened (timed out, rejected, failed, with the
//! attempt count) and returns the user's error as its source. So `anyhow`'s `{:#}` and `eyre`'s
//! reports print every message once.
//!
//! Invalid configuration (zero workers, a zero rate, an empty batch) is refused where it is
//! given: each constructor that can refuse a value panics with a message naming the parameter,
//! and has a `try_` twin returning [`ConfigError`].
//!
//! # Logs
//!
//! Through `tracing`: a [`with_stats`](PipelineExt::with_stats) stream's summary when it ends,
//! at DEBUG (target `stagepipe::stats`); circuit breaker state changes at INFO/WARN (target
//! `stagepipe::circuit_breaker`); each change of an adaptive [`InFlightLimit`] at DEBUG
//! (target `stagepipe::in_flight`). Metrics (counters, gauges and histograms for a Prometheus or
//! OpenTelemetry exporter): feature `metrics`, below.
//!
//! # Cargo features
//!
//! * `tower`: [`RateLimiter`], [`InFlightLimit`], [`CircuitBreaker`] and `Call::layer()` as
//!   tower `Layer`s whose services share one budget across every clone (services
//!   `RateLimitService`, `InFlightService`, `BreakerService`, `CallService`), and [`Call`] as a
//!   tower `Service`. Adds the small `tower-layer` and `tower-service` crates.
//! * `metrics`: counters, gauges and histograms of [`Stats`], [`CallStats`], pipeline stages,
//!   [`WorkerPool`], [`RateLimiter`], adaptive [`InFlightLimit`]s and named
//!   [`CircuitBreaker`]s, published through the
//!   [`metrics`](https://docs.rs/metrics) facade to whatever recorder (Prometheus or
//!   OpenTelemetry exporter) the application installs; names, labels and units in the
//!   `metrics` module. Adds the small `metrics` crate.
//! * `serde`: `Serialize` and `Deserialize` for the snapshots of the figures,
//!   [`StatsSnapshot`], [`CallStatsSnapshot`], [`PipelineStats`] and [`StageStats`], so a
//!   service can report them as they are (JSON, say). Fields keep their names; a `Duration` is
//!   serde's `{"secs": u64, "nanos": u32}`; `PipelineStats::stages` is a list of
//!   `[stage, figures]` pairs. Adds `serde` (with its derive macros).
//! * `governor`: `From<governor::Quota>` for [`Quota`], for code written against governor.
//! * `redis`: state shared across processes in Redis, behind the same handles and operators
//!   (`RateLimiter::redis`, `KeyedRateLimiter::redis`, `CircuitBreaker::redis`, a
//!   `redis::DedupeWindow` for `dedupe_with` and effectively-once processing), and
//!   `redis::StreamSource`, a consumer-group reader of a Redis stream acknowledged after
//!   processing; see the `redis` module. Adds the `redis` crate (tokio, connection manager,
//!   streams, scripts).
//!
//! ```
//! use futures::{stream, StreamExt};
//! use stagepipe::prelude::*;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! let pool = WorkerPool::new(2);
//! let squares: Vec<u64> = stream::iter(1..=5u64)
//!     .fan_out_ordered(&pool, |x| async move { x * x })
//!     .collect()
//!     .await;
//! assert_eq!(squares, [1, 4, 9, 16, 25]);
//! # }
//! ```
#![deny(missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// First: the shared macros are visible to every module declared after it.
#[macro_use]
mod macros;

mod error;
mod ext;
// The primitives of the thread hand-offs: `std`'s, or loom's under `--cfg stagepipe_loom`.
mod sync;
mod time;
mod try_ext;

// -- core: pool, fan_out, in_flight (fixed or adaptive), stats --
mod adaptive;
mod by_key;
mod fan_out;
mod in_flight;
mod pool;
mod stats;
pub use by_key::FanOutByKey;
pub use fan_out::{FanOut, FanOutOrdered};
pub use in_flight::{InFlight, InFlightLimit, InFlightOrdered};
pub use pool::WorkerPool;
pub use stats::{Stats, StatsSnapshot, WithStats};

// -- resilience: rate_limit, retry, circuit_breaker --
mod circuit_breaker;
mod rate_limit;
mod retry;
pub use circuit_breaker::{Breaker, BreakerError, CircuitBreaker, CircuitState};
pub use rate_limit::{KeyedRateLimiter, Quota, RateLimit, RateLimitBy, RateLimiter};
pub use retry::{Backoff, Retry, RetryError, RetryIf};

// -- one policy stack around an async fn --
mod call;
pub use call::{
    CachedCall, Call, CallError, CallRetry, CallStats, CallStatsSnapshot, NoRetry, RetryAll,
    Retrying,
};

// -- a shared cache of async results, with singleflight --
mod cache;
pub use cache::{Cache, CacheStats, Cached};

// -- tower layers (feature `tower`) --
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
mod tower;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use tower::{
    BreakerService, CallLayer, CallService, InFlightFuture, InFlightService, RateLimitService,
};

// -- metrics through the `metrics` facade (feature `metrics`) --
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;

// -- shared state in Redis (feature `redis`) --
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

// -- batching: batch, batch_dedupe, debounce, dedupe_by --
mod batch;
mod debounce;
mod dedupe;
pub use batch::{Batch, BatchDedupe};
pub use debounce::Debounce;
pub use dedupe::DedupeBy;

// -- staged pipelines --
mod staged;
pub use staged::{
    AdmissionBound, GraphEdge, GraphNode, GroupBuilder, GroupClosed, GroupRefused, GroupResults,
    Next, Pipeline, PipelineBuilder, PipelineGraph, PipelineStats, StageError, StageStats,
    StateMachine, Submitter, Through,
};

// -- fallible streams: try_fan_out_ordered, try_fan_out, try_in_flight(_ordered), try_batch,
// try_with_stats --
mod try_ops;
pub use try_ops::batch::TryBatch;
pub use try_ops::fan_out::{TryFanOut, TryFanOutOrdered};
pub use try_ops::in_flight::{TryInFlight, TryInFlightOrdered};
pub use try_ops::stats::TryWithStats;

pub use error::ConfigError;
pub use ext::PipelineExt;
pub use try_ext::TryPipelineExt;

/// Everything a pipeline needs, in one import: `use stagepipe::prelude::*;`.
pub mod prelude {
    pub use crate::ConfigError;
    pub use crate::PipelineExt;
    pub use crate::TryPipelineExt;
    // -- core --
    pub use crate::{InFlightLimit, Stats, StatsSnapshot, WorkerPool};

    // -- resilience --
    pub use crate::{
        Backoff, BreakerError, CircuitBreaker, CircuitState, KeyedRateLimiter, Quota, RateLimiter,
        RetryError,
    };

    // -- call --
    pub use crate::{Call, CallError, CallStats, CallStatsSnapshot};

    // -- batching --

    // -- staged pipelines --
    pub use crate::{
        GroupClosed, GroupRefused, Next, Pipeline, PipelineStats, StageError, StageStats,
        StateMachine,
    };
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
