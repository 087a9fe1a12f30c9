//! [`PipelineExt`]: the operators, as methods on every stream.
//!
//! Each method documents its semantics, `# Panics` and an example; its body only calls the
//! constructor of the stream type that lives in the operator's own module.

use futures::Stream;

/// Operators for concurrent, parallel stream pipelines, implemented for every
/// [`Stream`].
///
/// Import it with `use stagepipe::prelude::*;` (or `use stagepipe::PipelineExt;`).
pub trait PipelineExt: Stream {
    // -- core: fan_out_ordered, fan_out, in_flight, with_stats --

    // -- resilience: rate_limit, rate_limit_by, retry, retry_if, circuit_breaker --

    // -- batching: batch_dedupe, batch, debounce, dedupe_by --

    // -- staged pipelines: through --
}

impl<S: Stream + ?Sized> PipelineExt for S {}
