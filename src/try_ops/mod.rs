//! The stream types of [`TryPipelineExt`](crate::TryPipelineExt), one file per combinator.
//!
//! Each builds on its infallible twin's engine: an upstream `Err` never reaches the user's
//! closure, holds no worker and no permit, and comes out at its place (input order) or at once
//! (completion order).

pub(crate) mod batch;
pub(crate) mod fan_out;
pub(crate) mod in_flight;
pub(crate) mod stats;

/// `Instant::now() + wait`, or a far-future instant (about 30 years on, as tokio's own far
/// deadlines) when that would overflow, so that no duration panics.
pub(crate) fn deadline_after(
    now: tokio::time::Instant,
    wait: std::time::Duration,
) -> tokio::time::Instant {
    const FAR: std::time::Duration = std::time::Duration::from_secs(86_400 * 365 * 30);
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}
