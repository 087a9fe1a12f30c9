//! stagepipe in a tokio service: one shared `Pipeline` behind an axum HTTP API, and a flaky
//! upstream to call.
//!
//! The program (`src/main.rs`, `cargo run --release -p stagepipe-service`) serves [`app::Service`]
//! and, unless given `--upstream URL`, starts an [`upstream::Upstream`] of its own; the tests, the
//! benchmark and the load test (`examples/load.rs`) drive these same modules.
//!
//! * [`app`]: the service: the state machine, the HTTP API, overload (load shedding, deadlines,
//!   job size), the figures, graceful shutdown.
//! * [`telemetry`]: `/metrics` through `metrics-exporter-prometheus`, and the service's own
//!   metrics.
//! * [`upstream`]: the flaky upstream API (latency, failures, down/up), with its own figures.

mod admission;
pub mod app;
pub mod telemetry;
pub mod upstream;
