//! Counters, gauges and histograms of every shared handle, through the [`metrics`] facade
//! (feature `metrics`).
//!
//! With the feature on, [`Stats`](crate::Stats), [`CallStats`](crate::CallStats), staged
//! pipelines, [`WorkerPool`](crate::WorkerPool), [`RateLimiter`](crate::RateLimiter), adaptive
//! [`InFlightLimit`](crate::InFlightLimit)s and named [`CircuitBreaker`](crate::CircuitBreaker)s
//! publish what they count to whatever recorder the application installed:
//! `metrics-exporter-prometheus` for a Prometheus scrape, a bridge to OpenTelemetry, or any
//! other [`metrics::Recorder`]. With the feature off, none of this code exists and the handles
//! cost what they always did.
//!
//! # When handles register: install the recorder first
//!
//! A handle asks the recorder for its metrics **once, when it is created**, and keeps them: no
//! name is looked up per item. So the recorder must be installed before the handles are built
//! (usually the first thing in `main`); a handle built before that keeps the no-op metrics it
//! got and never publishes. [`metrics::set_global_recorder`] (or an exporter's `install`) is the
//! usual way. [`metrics::with_local_recorder`] also works for handles created inside its
//! closure, except the per-stage metrics of a pipeline: those register at the stage's first
//! finished run, on a worker of the pool, so they need a global recorder.
//!
//! | handle | registers |
//! |---|---|
//! | [`Stats`](crate::Stats) | at [`Stats::new`](crate::Stats::new) |
//! | [`CallStats`](crate::CallStats) | at [`CallStats::new`](crate::CallStats::new) |
//! | a pipeline's stage | at the stage's first finished run (on the pool's worker) |
//! | [`WorkerPool`](crate::WorkerPool) | at [`WorkerPool::new`](crate::WorkerPool::new) (also a private pool made from a number) |
//! | [`RateLimiter`](crate::RateLimiter) | at construction (and again for the new limiter [`burst`](crate::RateLimiter::burst) builds) |
//! | [`CircuitBreaker`](crate::CircuitBreaker) | at [`named`](crate::CircuitBreaker::named); an unnamed breaker publishes nothing |
//! | adaptive [`InFlightLimit`](crate::InFlightLimit) | at [`adaptive`](crate::InFlightLimit::adaptive) (under `name="unnamed"`), and again for the new limit [`named`](crate::InFlightLimit::named) builds; a fixed limit publishes nothing |
//!
//! Registering describes the metrics too (unit and help text), for exporters that print them.
//! Recording costs one call through the recorder's handle per event (an atomic add for a
//! counter or gauge in the common exporters, a little more for a histogram); without a
//! recorder, a branch. A `with_stats` point records a counter and a histogram per item.
//!
//! # Labels
//!
//! Every metric carries the label `name`: the handle's name ([`Stats::new`](crate::Stats::new),
//! [`CallStats::new`](crate::CallStats::new), [`CircuitBreaker::named`](crate::CircuitBreaker::named)).
//! Handles of one name share their series: their counts add up.
//!
//! * A [`WorkerPool`](crate::WorkerPool) or [`RateLimiter`](crate::RateLimiter) has no name:
//!   they publish under `name="unnamed"` ([`UNNAMED`]), summed over every pool (every limiter)
//!   of the process. The pool gauges are kept by adding and subtracting, so the sum is exact.
//! * An adaptive [`InFlightLimit`](crate::InFlightLimit) publishes under its
//!   [`named`](crate::InFlightLimit::named) name, else under `name="unnamed"`. Its gauge is kept
//!   by adding and subtracting, like the pool gauges: the limits of one name add up, and a
//!   limit's share leaves the gauge with its last handle.
//! * A [`CircuitBreaker`](crate::CircuitBreaker) publishes only once it is
//!   [`named`](crate::CircuitBreaker::named): a state is a breaker's own and cannot be summed.
//! * A staged pipeline has no name either: its `name` label is the type name of its stages
//!   ([`std::any::type_name`] of [`StateMachine::Stage`](crate::StateMachine::Stage), e.g.
//!   `my_service::Step`), and each stage metric adds the label `stage`, the stage's `Debug`
//!   (e.g. `Parse`). Pipelines whose machines share a stage type share their series.
//!
//! Not published: a fixed [`InFlightLimit`](crate::InFlightLimit) (its limit never moves, and
//! its use is [`in_use`](crate::InFlightLimit::in_use)),
//! [`KeyedRateLimiter`](crate::KeyedRateLimiter), and a pipeline's group and request counts
//! (they stay in [`Pipeline::stats`](crate::Pipeline::stats)).
//!
//! # The metrics
//!
//! Counters end in `_total`, times are in seconds (`_seconds`, as `f64`) and are histograms: a
//! Prometheus exporter renders each as a histogram (or a summary) with `_sum` and `_count`, so
//! `rate(x_seconds_sum[1m])` is the fraction of time spent so, and `x_seconds_sum` the total
//! that the handle's snapshot reports.
//!
//! | name | type | unit | labels | what |
//! |---|---|---|---|---|
//! | `stagepipe_stream_items_total` | counter | items | `name` | items that passed the handle's `with_stats` points (`Ok` items of `try_with_stats`) |
//! | `stagepipe_stream_errors_total` | counter | items | `name` | `Err` items of `try_with_stats` points, plus failed timed runs ([`Stats::record_run`](crate::Stats::record_run)) |
//! | `stagepipe_stream_upstream_wait_seconds` | histogram | seconds | `name` | one per wait on upstream (the point was starved): from the poll that found upstream not ready to the item (or the end) it then produced |
//! | `stagepipe_stream_downstream_wait_seconds` | histogram | seconds | `name` | one per item handed over (the point was backpressured): from handing it over to the next poll |
//! | `stagepipe_stream_runs_total` | counter | runs | `name` | timed runs ([`Stats::record_run`](crate::Stats::record_run)), failed ones included |
//! | `stagepipe_stream_run_latency_seconds` | histogram | seconds | `name` | the time of each timed run |
//! | `stagepipe_call_calls_total` | counter | runs | `name` | runs of a [`Call`](crate::Call) started |
//! | `stagepipe_call_successes_total` | counter | runs | `name` | runs that returned `Ok` |
//! | `stagepipe_call_failures_total` | counter | runs | `name` | runs that returned `Err` |
//! | `stagepipe_call_cancelled_total` | counter | runs | `name` | runs dropped before they finished |
//! | `stagepipe_call_retries_total` | counter | attempts | `name` | attempts after the first |
//! | `stagepipe_call_timeouts_total` | counter | attempts | `name` | attempts that timed out |
//! | `stagepipe_call_rejected_total` | counter | attempts | `name` | attempts rejected by an open circuit breaker |
//! | `stagepipe_call_limiter_wait_seconds` | histogram | seconds | `name` | one per attempt that waited for a cell of the rate limiter: the wait |
//! | `stagepipe_call_latency_seconds` | histogram | seconds | `name` | the time of each finished run (all its attempts and waits) |
//! | `stagepipe_stage_runs_total` | counter | runs | `name`, `stage` | runs of the stage, failed ones included |
//! | `stagepipe_stage_errors_total` | counter | runs | `name`, `stage` | runs of the stage that failed (an error or a panic) |
//! | `stagepipe_stage_latency_seconds` | histogram | seconds | `name`, `stage` | the time of each run of the stage |
//! | `stagepipe_pool_workers` | gauge | workers | `name` | workers of the pools alive |
//! | `stagepipe_pool_busy_workers` | gauge | workers | `name` | workers running a job now |
//! | `stagepipe_pool_queued_jobs` | gauge | jobs | `name` | jobs queued and not started (a job is a chunk of one stream's items) |
//! | `stagepipe_rate_limit_cells_total` | counter | cells | `name` | cells the limiter let through (streams, [`until_ready`](crate::RateLimiter::until_ready), successful [`check`](crate::RateLimiter::check)s) |
//! | `stagepipe_rate_limit_wait_seconds` | histogram | seconds | `name` | one per cell that had to wait (a stream's item, an `until_ready` call): from the request to its release |
//! | `stagepipe_in_flight_limit` | gauge | operations | `name` | the current limit of the adaptive in-flight limits (summed over the limits of one name) |
//! | `stagepipe_circuit_breaker_state` | gauge | state | `name` | 0 closed, 1 half-open, 2 open |
//! | `stagepipe_circuit_breaker_transitions_total` | counter | transitions | `name`, `to` | state changes, by the state entered: `to` is `closed`, `half-open` or `open` |
//! | `stagepipe_circuit_breaker_rejected_total` | counter | calls | `name` | calls rejected without running (open, or half-open with its trial running) |
//!
//! Notes on the values:
//!
//! * The counters match the handles' snapshots ([`Stats::snapshot`](crate::Stats::snapshot),
//!   [`CallStats::snapshot`](crate::CallStats::snapshot), [`Pipeline::stats`](crate::Pipeline::stats)):
//!   both are recorded at the same points.
//! * The pool gauges change when a job is queued, started, finished, taken back or dropped,
//!   and `stagepipe_pool_workers` when a pool is built or its last handle (and worker) goes,
//!   and when an [adaptive](crate::WorkerPool::adaptive) pool adds or retires a worker (it
//!   shows the pool's [`workers`](crate::WorkerPool::workers)); an idle pool shows 0 busy and
//!   0 queued.
//! * A breaker turns from open to half-open when `open_for` has passed; the gauge shows it when
//!   a call next arrives and starts the trial (until then it still reads 2). Each state change
//!   is counted once, as the breaker's `tracing` events report them.
//!
//! # Examples
//!
//! A recorder of your own (here one that keeps counters only) sees what the handles count:
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::{Arc, Mutex};
//!
//! use futures::{stream, StreamExt};
//! use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
//! use stagepipe::prelude::*;
//!
//! /// Keeps every counter it hands out, by key.
//! #[derive(Default)]
//! struct Counters(Mutex<Vec<(Key, Arc<AtomicU64>)>>);
//!
//! impl Recorder for Counters {
//!     fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
//!     fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
//!     fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
//!     fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
//!         let value = Arc::new(AtomicU64::new(0));
//!         self.0.lock().unwrap().push((key.clone(), value.clone()));
//!         Counter::from_arc(value)
//!     }
//!     fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
//!         Gauge::noop()
//!     }
//!     fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
//!         Histogram::noop()
//!     }
//! }
//!
//! let recorder = Counters::default();
//! // In a service: `metrics::set_global_recorder(..)` (or an exporter's `install()`) first
//! // thing in `main`. Handles register when they are created, so create them after it.
//! let stats = metrics::with_local_recorder(&recorder, || Stats::new("parse"));
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! stream::iter(0..100).with_stats(&stats).count().await;
//! # });
//! let counters = recorder.0.lock().unwrap();
//! let (key, items) = counters
//!     .iter()
//!     .find(|(key, _)| key.name() == stagepipe::metrics::STREAM_ITEMS)
//!     .unwrap();
//! assert_eq!(key.labels().map(|l| (l.key(), l.value())).collect::<Vec<_>>(), [("name", "parse")]);
//! assert_eq!(items.load(Ordering::Relaxed), 100);
//! ```
//!
//! For Prometheus, a service installs `metrics-exporter-prometheus` instead, which serves (or
//! renders) every metric above:
//!
//! ```ignore
//! let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
//!     .set_buckets_for_metric(
//!         metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
//!         &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
//!     )?
//!     .install_recorder()?;
//! // ... build the pools, limiters, breakers and stats, then serve `handle.render()` at /metrics
//! ```

use std::any::type_name;
use std::time::Duration;

use ::metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit, with_recorder,
};

use crate::CircuitState;

/// `stagepipe_stream_items_total`, counter, label `name`: items that passed the `with_stats`
/// points of a [`Stats`](crate::Stats) handle.
pub const STREAM_ITEMS: &str = "stagepipe_stream_items_total";
/// `stagepipe_stream_errors_total`, counter, label `name`: `Err` items of `try_with_stats`
/// points plus failed timed runs.
pub const STREAM_ERRORS: &str = "stagepipe_stream_errors_total";
/// `stagepipe_stream_upstream_wait_seconds`, histogram (seconds), label `name`: each wait of a
/// `with_stats` point on upstream.
pub const STREAM_UPSTREAM_WAIT: &str = "stagepipe_stream_upstream_wait_seconds";
/// `stagepipe_stream_downstream_wait_seconds`, histogram (seconds), label `name`: for each item
/// handed over, the time until the point was polled again.
pub const STREAM_DOWNSTREAM_WAIT: &str = "stagepipe_stream_downstream_wait_seconds";
/// `stagepipe_stream_runs_total`, counter, label `name`: timed runs recorded with
/// [`Stats::record_run`](crate::Stats::record_run).
pub const STREAM_RUNS: &str = "stagepipe_stream_runs_total";
/// `stagepipe_stream_run_latency_seconds`, histogram (seconds), label `name`: the time of each
/// timed run.
pub const STREAM_RUN_LATENCY: &str = "stagepipe_stream_run_latency_seconds";

/// `stagepipe_call_calls_total`, counter, label `name`: runs of a [`Call`](crate::Call) started.
pub const CALL_CALLS: &str = "stagepipe_call_calls_total";
/// `stagepipe_call_successes_total`, counter, label `name`: runs that returned `Ok`.
pub const CALL_SUCCESSES: &str = "stagepipe_call_successes_total";
/// `stagepipe_call_failures_total`, counter, label `name`: runs that returned `Err`.
pub const CALL_FAILURES: &str = "stagepipe_call_failures_total";
/// `stagepipe_call_cancelled_total`, counter, label `name`: runs dropped before they finished.
pub const CALL_CANCELLED: &str = "stagepipe_call_cancelled_total";
/// `stagepipe_call_retries_total`, counter, label `name`: attempts after the first.
pub const CALL_RETRIES: &str = "stagepipe_call_retries_total";
/// `stagepipe_call_timeouts_total`, counter, label `name`: attempts that timed out.
pub const CALL_TIMEOUTS: &str = "stagepipe_call_timeouts_total";
/// `stagepipe_call_rejected_total`, counter, label `name`: attempts rejected by an open breaker.
pub const CALL_REJECTED: &str = "stagepipe_call_rejected_total";
/// `stagepipe_call_limiter_wait_seconds`, histogram (seconds), label `name`: each attempt's
/// wait for a cell of the rate limiter (attempts that did not wait are not recorded).
pub const CALL_LIMITER_WAIT: &str = "stagepipe_call_limiter_wait_seconds";
/// `stagepipe_call_latency_seconds`, histogram (seconds), label `name`: the time of each
/// finished run.
pub const CALL_LATENCY: &str = "stagepipe_call_latency_seconds";

/// `stagepipe_stage_runs_total`, counter, labels `name` and `stage`: runs of a pipeline stage.
pub const STAGE_RUNS: &str = "stagepipe_stage_runs_total";
/// `stagepipe_stage_errors_total`, counter, labels `name` and `stage`: failed runs of a stage.
pub const STAGE_ERRORS: &str = "stagepipe_stage_errors_total";
/// `stagepipe_stage_latency_seconds`, histogram (seconds), labels `name` and `stage`: the time
/// of each run of a stage.
pub const STAGE_LATENCY: &str = "stagepipe_stage_latency_seconds";

/// `stagepipe_pool_workers`, gauge, label `name`: workers of the pools alive.
pub const POOL_WORKERS: &str = "stagepipe_pool_workers";
/// `stagepipe_pool_busy_workers`, gauge, label `name`: workers running a job now.
pub const POOL_BUSY_WORKERS: &str = "stagepipe_pool_busy_workers";
/// `stagepipe_pool_queued_jobs`, gauge, label `name`: jobs queued on the pools, not started.
pub const POOL_QUEUED_JOBS: &str = "stagepipe_pool_queued_jobs";

/// `stagepipe_rate_limit_cells_total`, counter, label `name`: cells let through.
pub const RATE_LIMIT_CELLS: &str = "stagepipe_rate_limit_cells_total";
/// `stagepipe_rate_limit_wait_seconds`, histogram (seconds), label `name`: each cell's wait,
/// for the cells that had to wait.
pub const RATE_LIMIT_WAIT: &str = "stagepipe_rate_limit_wait_seconds";

/// `stagepipe_in_flight_limit`, gauge, label `name`: the current limit of the adaptive
/// [`InFlightLimit`](crate::InFlightLimit)s of that name.
pub const IN_FLIGHT_LIMIT: &str = "stagepipe_in_flight_limit";

/// `stagepipe_circuit_breaker_state`, gauge, label `name`: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "stagepipe_circuit_breaker_state";
/// `stagepipe_circuit_breaker_transitions_total`, counter, labels `name` and `to` (`closed`,
/// `half-open` or `open`): state changes, by the state entered.
pub const BREAKER_TRANSITIONS: &str = "stagepipe_circuit_breaker_transitions_total";
/// `stagepipe_circuit_breaker_rejected_total`, counter, label `name`: calls rejected without
/// running.
pub const BREAKER_REJECTED: &str = "stagepipe_circuit_breaker_rejected_total";

/// Every metric name above, in the order of the table.
pub const NAMES: &[&str] = &[
    STREAM_ITEMS,
    STREAM_ERRORS,
    STREAM_UPSTREAM_WAIT,
    STREAM_DOWNSTREAM_WAIT,
    STREAM_RUNS,
    STREAM_RUN_LATENCY,
    CALL_CALLS,
    CALL_SUCCESSES,
    CALL_FAILURES,
    CALL_CANCELLED,
    CALL_RETRIES,
    CALL_TIMEOUTS,
    CALL_REJECTED,
    CALL_LIMITER_WAIT,
    CALL_LATENCY,
    STAGE_RUNS,
    STAGE_ERRORS,
    STAGE_LATENCY,
    POOL_WORKERS,
    POOL_BUSY_WORKERS,
    POOL_QUEUED_JOBS,
    RATE_LIMIT_CELLS,
    RATE_LIMIT_WAIT,
    IN_FLIGHT_LIMIT,
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    BREAKER_REJECTED,
];

/// The `name` label of the handles that have no name: every [`WorkerPool`](crate::WorkerPool)
/// and [`RateLimiter`](crate::RateLimiter), and adaptive [`InFlightLimit`](crate::InFlightLimit)s
/// not [`named`](crate::InFlightLimit::named).
pub const UNNAMED: &str = "unnamed";

static METADATA: Metadata<'static> = Metadata::new("stagepipe", Level::INFO, Some(module_path!()));

/// Registers (and describes) one handle's metrics, all under the same labels.
struct Registrar<'a> {
    recorder: &'a dyn Recorder,
    labels: Vec<Label>,
}

impl Registrar<'_> {
    /// Runs `f` with a registrar for `labels` on the current recorder (local, else global,
    /// else no-op).
    fn with<T>(labels: Vec<Label>, f: impl FnOnce(&Registrar<'_>) -> T) -> T {
        with_recorder(|recorder| f(&Registrar { recorder, labels }))
    }

    fn key(&self, name: &'static str) -> Key {
        Key::from_parts(name, self.labels.clone())
    }

    fn counter(&self, name: &'static str, unit: Unit, help: &'static str) -> Counter {
        self.recorder
            .describe_counter(KeyName::from_const_str(name), Some(unit), help.into());
        self.recorder.register_counter(&self.key(name), &METADATA)
    }

    fn gauge(&self, name: &'static str, unit: Option<Unit>, help: &'static str) -> Gauge {
        self.recorder
            .describe_gauge(KeyName::from_const_str(name), unit, help.into());
        self.recorder.register_gauge(&self.key(name), &METADATA)
    }

    /// A gauge of a number of things (workers, jobs, operations).
    fn count_gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        self.gauge(name, Some(Unit::Count), help)
    }

    fn seconds(&self, name: &'static str, help: &'static str) -> Histogram {
        self.recorder.describe_histogram(
            KeyName::from_const_str(name),
            Some(Unit::Seconds),
            help.into(),
        );
        self.recorder.register_histogram(&self.key(name), &METADATA)
    }
}

fn name_label(name: &str) -> Vec<Label> {
    vec![Label::new("name", name.to_owned())]
}

fn unnamed_label() -> Vec<Label> {
    vec![Label::from_static_parts("name", UNNAMED)]
}

/// A [`Stats`](crate::Stats) handle's metrics: a stream's (`stagepipe_stream_*`), or a pipeline
/// stage's (`stagepipe_stage_*`, where only timed runs are recorded).
pub(crate) struct StatsMetrics {
    items: Counter,
    errors: Counter,
    upstream_wait: Histogram,
    downstream_wait: Histogram,
    runs: Counter,
    latency: Histogram,
}

impl StatsMetrics {
    /// The metrics of `Stats::new(name)`.
    pub(crate) fn stream(name: &str) -> Self {
        Registrar::with(name_label(name), |r| Self {
            items: r.counter(
                STREAM_ITEMS,
                Unit::Count,
                "Items that passed the with_stats points.",
            ),
            errors: r.counter(
                STREAM_ERRORS,
                Unit::Count,
                "Err items of try_with_stats points, plus failed timed runs.",
            ),
            upstream_wait: r.seconds(
                STREAM_UPSTREAM_WAIT,
                "Each wait of a with_stats point on upstream (starved).",
            ),
            downstream_wait: r.seconds(
                STREAM_DOWNSTREAM_WAIT,
                "For each item handed over, the time until the next poll (backpressured).",
            ),
            runs: r.counter(
                STREAM_RUNS,
                Unit::Count,
                "Timed runs, failed ones included.",
            ),
            latency: r.seconds(STREAM_RUN_LATENCY, "The time of each timed run."),
        })
    }

    /// The metrics of the stage whose `Debug` is `stage`, in a pipeline whose stage type is `S`.
    pub(crate) fn stage<S>(stage: &str) -> Self {
        let labels = vec![
            Label::from_static_parts("name", type_name::<S>()),
            Label::new("stage", stage.to_owned()),
        ];
        Registrar::with(labels, |r| Self {
            items: Counter::noop(),
            errors: r.counter(
                STAGE_ERRORS,
                Unit::Count,
                "Runs of a pipeline stage that failed.",
            ),
            upstream_wait: Histogram::noop(),
            downstream_wait: Histogram::noop(),
            runs: r.counter(
                STAGE_RUNS,
                Unit::Count,
                "Runs of a pipeline stage, failed ones included.",
            ),
            latency: r.seconds(STAGE_LATENCY, "The time of each run of a pipeline stage."),
        })
    }

    /// An item (or, if `error`, an `Err` item) passed a point.
    #[inline]
    pub(crate) fn item(&self, error: bool) {
        if error { &self.errors } else { &self.items }.increment(1);
    }

    /// A point waited `waited` on upstream.
    #[inline]
    pub(crate) fn upstream_wait(&self, waited: Duration) {
        self.upstream_wait.record(waited.as_secs_f64());
    }

    /// A point was polled again `waited` after handing an item over.
    #[inline]
    pub(crate) fn downstream_wait(&self, waited: Duration) {
        self.downstream_wait.record(waited.as_secs_f64());
    }

    /// A timed run took `took`.
    pub(crate) fn run(&self, took: Duration, failed: bool) {
        self.runs.increment(1);
        if failed {
            self.errors.increment(1);
        }
        self.latency.record(took.as_secs_f64());
    }
}

/// A [`CallStats`](crate::CallStats) handle's metrics (`stagepipe_call_*`).
pub(crate) struct CallMetrics {
    calls: Counter,
    successes: Counter,
    failures: Counter,
    cancelled: Counter,
    retries: Counter,
    timeouts: Counter,
    rejected: Counter,
    limiter_wait: Histogram,
    latency: Histogram,
}

impl CallMetrics {
    /// The metrics of `CallStats::new(name)`.
    pub(crate) fn new(name: &str) -> Self {
        Registrar::with(name_label(name), |r| Self {
            calls: r.counter(CALL_CALLS, Unit::Count, "Runs of a Call started."),
            successes: r.counter(CALL_SUCCESSES, Unit::Count, "Runs that returned Ok."),
            failures: r.counter(CALL_FAILURES, Unit::Count, "Runs that returned Err."),
            cancelled: r.counter(
                CALL_CANCELLED,
                Unit::Count,
                "Runs dropped before they finished.",
            ),
            retries: r.counter(CALL_RETRIES, Unit::Count, "Attempts after the first."),
            timeouts: r.counter(CALL_TIMEOUTS, Unit::Count, "Attempts that timed out."),
            rejected: r.counter(
                CALL_REJECTED,
                Unit::Count,
                "Attempts rejected by an open circuit breaker.",
            ),
            limiter_wait: r.seconds(
                CALL_LIMITER_WAIT,
                "Each attempt's wait for a cell of the rate limiter.",
            ),
            latency: r.seconds(CALL_LATENCY, "The time of each finished run."),
        })
    }

    pub(crate) fn started(&self) {
        self.calls.increment(1);
    }

    pub(crate) fn finished(&self, ok: bool, took: Duration) {
        if ok { &self.successes } else { &self.failures }.increment(1);
        self.latency.record(took.as_secs_f64());
    }

    pub(crate) fn cancelled(&self) {
        self.cancelled.increment(1);
    }

    pub(crate) fn retry(&self) {
        self.retries.increment(1);
    }

    pub(crate) fn timeout(&self) {
        self.timeouts.increment(1);
    }

    pub(crate) fn rejected(&self) {
        self.rejected.increment(1);
    }

    pub(crate) fn limiter_wait(&self, waited: Duration) {
        self.limiter_wait.record(waited.as_secs_f64());
    }
}

/// A [`WorkerPool`](crate::WorkerPool)'s gauges (`stagepipe_pool_*`, `name="unnamed"`), kept by
/// adding and subtracting so that the pools of a process add up. Takes its workers off the
/// workers gauge when dropped with the pool.
pub(crate) struct PoolMetrics {
    /// The workers this pool adds to the workers gauge (they move with an adaptive pool).
    workers: std::sync::atomic::AtomicUsize,
    workers_gauge: Gauge,
    busy: Gauge,
    queued: Gauge,
}

impl PoolMetrics {
    /// The gauges of a new pool of `workers` workers.
    pub(crate) fn new(workers: usize) -> Self {
        let metrics = Registrar::with(unnamed_label(), |r| Self {
            workers: std::sync::atomic::AtomicUsize::new(workers),
            workers_gauge: r.count_gauge(POOL_WORKERS, "Workers of the pools alive."),
            busy: r.count_gauge(POOL_BUSY_WORKERS, "Workers of the pools running a job now."),
            queued: r.count_gauge(
                POOL_QUEUED_JOBS,
                "Jobs queued on the pools and not started.",
            ),
        });
        metrics.workers_gauge.increment(workers as f64);
        metrics
    }

    /// The pool (an adaptive one) now counts `workers` workers.
    pub(crate) fn set_workers(&self, workers: usize) {
        let before = self
            .workers
            .swap(workers, std::sync::atomic::Ordering::Relaxed);
        if workers > before {
            self.workers_gauge.increment((workers - before) as f64);
        } else if workers < before {
            self.workers_gauge.decrement((before - workers) as f64);
        }
    }

    /// `n` jobs were queued.
    #[inline]
    pub(crate) fn queued(&self, n: usize) {
        if n > 0 {
            self.queued.increment(n as f64);
        }
    }

    /// `n` queued jobs were started, taken back or dropped.
    #[inline]
    pub(crate) fn dequeued(&self, n: usize) {
        if n > 0 {
            self.queued.decrement(n as f64);
        }
    }

    /// A worker starts a job: busy until the guard is dropped (also if the worker is dropped
    /// with its runtime in the middle of the job).
    #[inline]
    pub(crate) fn busy(&self) -> BusyGuard<'_> {
        self.busy.increment(1.0);
        BusyGuard(&self.busy)
    }
}

impl Drop for PoolMetrics {
    fn drop(&mut self) {
        let workers = *self.workers.get_mut();
        self.workers_gauge.decrement(workers as f64);
    }
}

/// A worker running a job, counted in `stagepipe_pool_busy_workers` until dropped.
pub(crate) struct BusyGuard<'a>(&'a Gauge);

impl Drop for BusyGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A [`RateLimiter`](crate::RateLimiter)'s metrics (`stagepipe_rate_limit_*`, `name="unnamed"`).
#[derive(Debug)]
pub(crate) struct RateLimitMetrics {
    cells: Counter,
    wait: Histogram,
}

impl RateLimitMetrics {
    pub(crate) fn new() -> Self {
        Registrar::with(unnamed_label(), |r| Self {
            cells: r.counter(
                RATE_LIMIT_CELLS,
                Unit::Count,
                "Cells the rate limiters let through.",
            ),
            wait: r.seconds(
                RATE_LIMIT_WAIT,
                "Each cell's wait for the rate limiter, for the cells that had to wait.",
            ),
        })
    }

    /// A cell was released (if `released` is `Ok`).
    #[inline]
    pub(crate) fn released<E>(&self, released: &Result<(), E>) {
        if released.is_ok() {
            self.cells.increment(1);
        }
    }

    /// A cell was released `nanos` after it was asked for.
    pub(crate) fn waited(&self, nanos: u64) {
        self.wait.record(Duration::from_nanos(nanos).as_secs_f64());
    }
}

/// An adaptive [`InFlightLimit`](crate::InFlightLimit)'s gauge (`stagepipe_in_flight_limit`),
/// kept by adding and subtracting so that the limits of one name add up.
pub(crate) struct InFlightMetrics {
    limit: Gauge,
}

impl InFlightMetrics {
    /// The gauge of a new limit named `name` (else `name="unnamed"`), standing at `limit`.
    pub(crate) fn new(name: Option<&str>, limit: usize) -> Self {
        let labels = name.map_or_else(unnamed_label, name_label);
        let metrics = Registrar::with(labels, |r| Self {
            limit: r.count_gauge(
                IN_FLIGHT_LIMIT,
                "The current limit of the adaptive in-flight limits.",
            ),
        });
        metrics.limit.increment(limit as f64);
        metrics
    }

    /// The limit moved from `from` to `to` (to 0 when the limit goes).
    pub(crate) fn changed(&self, from: usize, to: usize) {
        if to > from {
            self.limit.increment((to - from) as f64);
        } else {
            self.limit.decrement((from - to) as f64);
        }
    }
}

/// A [`CircuitBreaker`](crate::CircuitBreaker)'s metrics (`stagepipe_circuit_breaker_*`); no-ops
/// for an unnamed breaker.
pub(crate) struct BreakerMetrics {
    state: Gauge,
    to_closed: Counter,
    to_half_open: Counter,
    to_open: Counter,
    rejected: Counter,
}

impl BreakerMetrics {
    /// The metrics of a new, closed breaker named `name` (no-ops if it has none).
    pub(crate) fn new(name: Option<&str>) -> Self {
        let Some(name) = name else {
            return Self {
                state: Gauge::noop(),
                to_closed: Counter::noop(),
                to_half_open: Counter::noop(),
                to_open: Counter::noop(),
                rejected: Counter::noop(),
            };
        };
        let transitions = |r: &Registrar<'_>, to: CircuitState| {
            let key = Key::from_parts(
                BREAKER_TRANSITIONS,
                r.labels
                    .iter()
                    .cloned()
                    .chain([Label::from_static_parts("to", state_label(to))])
                    .collect::<Vec<_>>(),
            );
            r.recorder.register_counter(&key, &METADATA)
        };
        let metrics = Registrar::with(name_label(name), |r| {
            r.recorder.describe_counter(
                KeyName::from_const_str(BREAKER_TRANSITIONS),
                Some(Unit::Count),
                "Circuit breaker state changes, by the state entered.".into(),
            );
            Self {
                state: r.gauge(
                    BREAKER_STATE,
                    None,
                    "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                ),
                to_closed: transitions(r, CircuitState::Closed),
                to_half_open: transitions(r, CircuitState::HalfOpen),
                to_open: transitions(r, CircuitState::Open),
                rejected: r.counter(
                    BREAKER_REJECTED,
                    Unit::Count,
                    "Calls a circuit breaker rejected without running them.",
                ),
            }
        });
        metrics.state.set(state_value(CircuitState::Closed));
        metrics
    }

    /// The breaker entered `to`.
    pub(crate) fn transition(&self, to: CircuitState) {
        self.state.set(state_value(to));
        match to {
            CircuitState::Closed => &self.to_closed,
            CircuitState::HalfOpen => &self.to_half_open,
            CircuitState::Open => &self.to_open,
        }
        .increment(1);
    }

    /// A call was rejected without running.
    #[inline]
    pub(crate) fn rejected(&self) {
        self.rejected.increment(1);
    }
}

/// The value of `stagepipe_circuit_breaker_state`.
fn state_value(state: CircuitState) -> f64 {
    match state {
        CircuitState::Closed => 0.0,
        CircuitState::HalfOpen => 1.0,
        CircuitState::Open => 2.0,
    }
}

/// The `to` label of `stagepipe_circuit_breaker_transitions_total`.
fn state_label(state: CircuitState) -> &'static str {
    match state {
        CircuitState::Closed => "closed",
        CircuitState::HalfOpen => "half-open",
        CircuitState::Open => "open",
    }
}
