//! The stream types of [`TryPipelineExt`](crate::TryPipelineExt), one file per combinator.
//!
//! Each builds on its infallible twin's engine: an upstream `Err` never reaches the user's
//! closure, holds no worker and no permit, and comes out at its place (input order) or at once
//! (completion order).

pub(crate) mod batch;
pub(crate) mod fan_out;
pub(crate) mod in_flight;
pub(crate) mod stats;
