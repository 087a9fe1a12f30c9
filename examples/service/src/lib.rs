//! stagepipe in a tokio service: one shared `Pipeline` behind an axum HTTP API, and a flaky
//! upstream to call.
//!
//! The program (`src/main.rs`, `cargo run --release -p stagepipe-service`) serves [`app::Service`]
//! and, unless given `--upstream URL`, starts an [`upstream::Upstream`] of its own; the tests and
//! the benchmark drive these same modules.
//!
//! * [`app`]: the service: the state machine, the HTTP API, the figures, graceful shutdown.
//! * [`upstream`]: the flaky upstream API (latency, failures, down/up), with its own figures.

pub mod app;
pub mod upstream;
