//! `GET /metrics`: every figure as a Prometheus text exposition, through
//! `metrics-exporter-prometheus`.
//!
//! stagepipe's handles publish through the `metrics` facade (its feature `metrics`): the upstream
//! `Call`'s `CallStats` and its breaker (both named `upstream`), the pipeline's stages, the
//! worker pool, the rate limiter and the `lines` written (a `Stats`); the names are listed in
//! the `stagepipe::metrics` module docs. The service adds what the library does not publish,
//! under `stagepipe_service_` (see the constants here). One recorder serves the whole process:
//! [`prometheus`] installs it as the global `metrics` recorder the first time it is called, which
//! [`Service::new`](crate::app::Service::new) does before it creates any handle (a handle
//! registers its metrics when it is created, with the recorder installed then).
//!
//! Latencies (every metric ending in `_seconds`) are histograms with the buckets of
//! [`BUCKETS`]. Each service runs the recorder's upkeep every [`UPKEEP`] (it folds the
//! histograms' samples into their buckets, so they do not grow between scrapes).
//!
//! Several services in one process (tests) share the recorder: counters of one name add up,
//! and the figures set at scrape time from the pipeline's (`groups_*`, `requests_*`,
//! `jobs_open`, `jobs_waiting`, `inputs_pending`, `upstream_in_flight`) are the scraped
//! service's.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// `stagepipe_service_jobs_admitted_total`, counter: jobs admitted (a request group opened).
pub const JOBS_ADMITTED: &str = "stagepipe_service_jobs_admitted_total";
/// `stagepipe_service_jobs_shed_total`, counter: jobs refused with 429, for lack of room.
pub const JOBS_SHED: &str = "stagepipe_service_jobs_shed_total";
/// `stagepipe_service_jobs_too_large_total`, counter: jobs refused with 413, for having more
/// inputs than a job may have.
pub const JOBS_TOO_LARGE: &str = "stagepipe_service_jobs_too_large_total";
/// `stagepipe_service_jobs_deadline_exceeded_total`, counter: jobs ended by their deadline.
pub const JOBS_DEADLINE_EXCEEDED: &str = "stagepipe_service_jobs_deadline_exceeded_total";
/// `stagepipe_service_jobs_open`, gauge set at scrape time: jobs admitted whose group is open.
pub const JOBS_OPEN: &str = "stagepipe_service_jobs_open";
/// `stagepipe_service_jobs_waiting`, gauge set at scrape time: requests waiting for room
/// (`admission_wait`).
pub const JOBS_WAITING: &str = "stagepipe_service_jobs_waiting";
/// `stagepipe_service_inputs_pending`, gauge set at scrape time: inputs of the open jobs
/// without a line yet.
pub const INPUTS_PENDING: &str = "stagepipe_service_inputs_pending";
/// `stagepipe_service_admission_wait_seconds`, histogram: for each job admitted, from its
/// arrival to its admission.
pub const ADMISSION_WAIT: &str = "stagepipe_service_admission_wait_seconds";
/// `stagepipe_service_job_duration_seconds`, histogram: for each job admitted, from its arrival
/// to the end of its response (or the client going away).
pub const JOB_DURATION: &str = "stagepipe_service_job_duration_seconds";
/// `stagepipe_service_groups_opened_total`, counter set at scrape time: the pipeline's request
/// groups opened (one per job).
pub const GROUPS_OPENED: &str = "stagepipe_service_groups_opened_total";
/// `stagepipe_service_groups_open`, gauge set at scrape time: request groups open.
pub const GROUPS_OPEN: &str = "stagepipe_service_groups_open";
/// `stagepipe_service_requests_done_total`, counter set at scrape time: the pipeline's requests
/// (inputs) finished, failed ones included.
pub const REQUESTS_DONE: &str = "stagepipe_service_requests_done_total";
/// `stagepipe_service_requests_failed_total`, counter set at scrape time: requests failed.
pub const REQUESTS_FAILED: &str = "stagepipe_service_requests_failed_total";
/// `stagepipe_service_upstream_in_flight`, gauge set at scrape time: upstream attempts in
/// flight (the `Call`'s in-flight limit in use).
pub const UPSTREAM_IN_FLIGHT: &str = "stagepipe_service_upstream_in_flight";

/// The histogram buckets of every `_seconds` metric, in seconds.
pub const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How often a service runs the recorder's upkeep.
pub const UPKEEP: Duration = Duration::from_secs(5);

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed as the global `metrics` recorder at the first
/// call; `None` if another global recorder was installed before (the process exports its
/// metrics its own way, and `/metrics` answers 501).
///
/// Call it before creating any stagepipe handle whose metrics you want: a handle registers
/// when it is created. [`Service::new`](crate::app::Service::new) calls it first thing.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("the buckets are not empty")
                .install_recorder()
                .ok()
        })
        .as_ref()
}

/// The service's own metrics, registered once per service.
#[derive(Clone, Debug)]
pub(crate) struct ServiceMetrics {
    pub(crate) jobs_admitted: Counter,
    pub(crate) jobs_shed: Counter,
    pub(crate) jobs_too_large: Counter,
    pub(crate) jobs_deadline_exceeded: Counter,
    pub(crate) jobs_open: Gauge,
    pub(crate) jobs_waiting: Gauge,
    pub(crate) inputs_pending: Gauge,
    pub(crate) admission_wait: Histogram,
    pub(crate) job_duration: Histogram,
    pub(crate) groups_opened: Counter,
    pub(crate) groups_open: Gauge,
    pub(crate) requests_done: Counter,
    pub(crate) requests_failed: Counter,
    pub(crate) upstream_in_flight: Gauge,
}

impl ServiceMetrics {
    /// Describes and registers every metric with the global recorder.
    pub(crate) fn register() -> Self {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_counter!(JOBS_ADMITTED, Unit::Count, "Jobs admitted.");
        describe_counter!(
            JOBS_SHED,
            Unit::Count,
            "Jobs refused with 429 Too Many Requests: no room within the admission bounds."
        );
        describe_counter!(
            JOBS_TOO_LARGE,
            Unit::Count,
            "Jobs refused with 413 Payload Too Large: more inputs than a job may have."
        );
        describe_counter!(
            JOBS_DEADLINE_EXCEEDED,
            Unit::Count,
            "Jobs ended by their deadline, their unfinished inputs cancelled."
        );
        describe_gauge!(JOBS_OPEN, Unit::Count, "Jobs admitted and not ended.");
        describe_gauge!(
            JOBS_WAITING,
            Unit::Count,
            "Requests waiting for room to be admitted."
        );
        describe_gauge!(
            INPUTS_PENDING,
            Unit::Count,
            "Inputs of the open jobs without a result line yet."
        );
        describe_histogram!(
            ADMISSION_WAIT,
            Unit::Seconds,
            "From a job's arrival to its admission."
        );
        describe_histogram!(
            JOB_DURATION,
            Unit::Seconds,
            "From a job's arrival to the end of its response."
        );
        describe_counter!(
            GROUPS_OPENED,
            Unit::Count,
            "The pipeline's request groups opened (one per job)."
        );
        describe_gauge!(
            GROUPS_OPEN,
            Unit::Count,
            "The pipeline's request groups open."
        );
        describe_counter!(
            REQUESTS_DONE,
            Unit::Count,
            "The pipeline's requests (inputs) finished, failed ones included."
        );
        describe_counter!(
            REQUESTS_FAILED,
            Unit::Count,
            "The pipeline's requests (inputs) failed."
        );
        describe_gauge!(
            UPSTREAM_IN_FLIGHT,
            Unit::Count,
            "Upstream attempts in flight."
        );
        Self {
            jobs_admitted: metrics::counter!(JOBS_ADMITTED),
            jobs_shed: metrics::counter!(JOBS_SHED),
            jobs_too_large: metrics::counter!(JOBS_TOO_LARGE),
            jobs_deadline_exceeded: metrics::counter!(JOBS_DEADLINE_EXCEEDED),
            jobs_open: metrics::gauge!(JOBS_OPEN),
            jobs_waiting: metrics::gauge!(JOBS_WAITING),
            inputs_pending: metrics::gauge!(INPUTS_PENDING),
            admission_wait: metrics::histogram!(ADMISSION_WAIT),
            job_duration: metrics::histogram!(JOB_DURATION),
            groups_opened: metrics::counter!(GROUPS_OPENED),
            groups_open: metrics::gauge!(GROUPS_OPEN),
            requests_done: metrics::counter!(REQUESTS_DONE),
            requests_failed: metrics::counter!(REQUESTS_FAILED),
            upstream_in_flight: metrics::gauge!(UPSTREAM_IN_FLIGHT),
        }
    }
}

/// Runs the recorder's upkeep every [`UPKEEP`] while `owner` lives, on a task of the current
/// runtime; nothing outside a runtime (`render` then does the upkeep at each scrape).
pub(crate) fn spawn_upkeep<T: Send + Sync + 'static>(owner: &Arc<T>) {
    let (Some(handle), Ok(runtime)) = (prometheus(), tokio::runtime::Handle::try_current()) else {
        return;
    };
    let owner: Weak<T> = Arc::downgrade(owner);
    runtime.spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            if owner.strong_count() == 0 {
                return;
            }
            handle.run_upkeep();
        }
    });
}
