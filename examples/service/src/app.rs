//! The service: an axum app holding one shared `Pipeline`.
//!
//! * `POST /jobs?on_error=cancel|continue&deadline_ms=N` with a JSON array of integers opens a
//!   request group for that caller and streams its results back as NDJSON, one line per input
//!   in submission order, each line written as soon as it and every earlier one are done.
//! * `GET /stats`: the pipeline's, the upstream call's and the server's figures as JSON;
//!   `GET /metrics`: every metric as a Prometheus text exposition (see [`crate::telemetry`]).
//!
//! Every caller shares one set of workers (the pipeline's pool) and one `Call` toward the
//! upstream: its timeout, rate limit, in-flight limit, circuit breaker, retries and stats are
//! shared by all callers. A caller that disconnects drops its response body, which drops its
//! group's results and so cancels its unfinished requests.
//!
//! # Overload
//!
//! Backpressure alone would let a service under more load than it can take hold every job it
//! is sent, each waiting longer than the last. The service bounds what it holds instead, and
//! says so:
//!
//! * **Load shedding.** At most [`Config::max_open_jobs`] jobs are open at once, holding at
//!   most [`Config::max_pending_inputs`] inputs without a line yet. A job that finds no room is
//!   refused with `429 Too Many Requests`, a `Retry-After` header (whole seconds) and a JSON
//!   line saying which bound was full. `Retry-After` is the time the room it needs takes to
//!   free at the rate jobs ended (inputs were answered) over the last ten seconds: the jobs
//!   waiting ahead of it plus one, over the job rate; or the inputs it lacks over the input
//!   rate. It is rounded, at least 1, 1 while there is less than a second of history, and at
//!   most [`Config::retry_after_max`] (also when nothing ended at all). With
//!   [`Config::admission_wait`], a job first waits up to that long for room, in arrival order
//!   (at most `max_open_jobs` requests wait at once; more are refused at once).
//! * **Deadline.** A job may run at most [`Config::job_deadline`], counted from its arrival
//!   (the admission wait included); `?deadline_ms=N` shortens it for one job (a longer one is
//!   capped; `0` is refused with 400). A job that passes it ends with the closing line
//!   `{"error":"the job's deadline of N ms passed before it finished","abandoned":M}`, `M`
//!   inputs left without a line, and its group is cancelled: its queued inputs never run and
//!   its upstream calls in flight are dropped.
//! * **Size.** A job of more than [`Config::max_items_per_job`] inputs (or more than
//!   `max_pending_inputs`, which it could never fit) is refused up front with
//!   `413 Payload Too Large` and a JSON line, never truncated. The request body is limited to
//!   24 bytes per allowed input (plus 1 KiB); a longer body is refused with 413 by axum before
//!   it is parsed.
//!
//! Every admitted job is answered in full: one line per input, in order, unless a closing line
//! (deadline or shutdown) says how many inputs were abandoned.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures::StreamExt;
use futures::future::BoxFuture;
use metrics::Histogram;
use serde::{Deserialize, Serialize};
use stagepipe::prelude::*;
use stagepipe::{AdmissionBound, Retrying};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::admission::retry_after;
use crate::telemetry::{self, ServiceMetrics};

/// How the service is set up. The limits toward the upstream are shared by every caller.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the upstream (`http://host:port`); `None` answers locally (for benchmarks).
    pub upstream: Option<String>,
    /// Workers of the shared pipeline (stage runs at once); well above the in-flight limit,
    /// since the upstream stage is I/O-bound.
    pub workers: usize,
    /// The most upstream attempts in flight at once.
    pub upstream_in_flight: usize,
    /// Timeout of one upstream attempt.
    pub upstream_timeout: Duration,
    /// The most upstream attempts per second (retries included), and the burst after a lull.
    pub rate_per_second: u32,
    pub burst: u32,
    /// Consecutive failed attempts (timeouts included) that open the circuit breaker, and how
    /// long it stays open before a trial call.
    pub breaker_threshold: u32,
    pub breaker_open_for: Duration,
    /// Attempts per item, the first included, and the first backoff delay (doubling, with
    /// full jitter, at most 100 ms).
    pub retry_attempts: u32,
    pub retry_initial: Duration,
    /// How many of one job's inputs may be in the pipeline at once (its group's window); the
    /// rest stay in the request until there is room (`GroupBuilder::admit_all`). A shutdown
    /// lets the inputs in the pipeline finish and abandons the rest, so this also bounds how
    /// much of a job a shutdown waits for.
    pub job_window: usize,
    /// On shutdown, how long open responses may keep going before they are ended.
    pub shutdown_deadline: Duration,
    /// The most jobs open at once (admitted, their response not ended); more are refused with
    /// 429 (see the [module docs](self)). `usize::MAX`: no bound.
    pub max_open_jobs: usize,
    /// The most inputs of the open jobs without a line yet, across jobs; a job that would pass
    /// it is refused with 429. `usize::MAX`: no bound.
    pub max_pending_inputs: usize,
    /// How long a job that finds no room waits for it before it is refused; zero refuses at
    /// once.
    pub admission_wait: Duration,
    /// The longest a job may run, from its arrival; `?deadline_ms=` can shorten it, not
    /// lengthen it. `Duration::MAX`: no deadline.
    pub job_deadline: Duration,
    /// The most inputs in one job (at most `u32::MAX`); a larger job is refused with 413.
    pub max_items_per_job: usize,
    /// The longest `Retry-After` a refused job is told, in whole seconds (at least 1): when the
    /// service sees no job end at all, and the cap of every estimate.
    pub retry_after_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            upstream: None,
            workers: 64,
            upstream_in_flight: 16,
            upstream_timeout: Duration::from_secs(5),
            rate_per_second: 2000,
            burst: 50,
            breaker_threshold: 20,
            breaker_open_for: Duration::from_secs(1),
            retry_attempts: 3,
            retry_initial: Duration::from_millis(5),
            job_window: 256,
            shutdown_deadline: Duration::from_secs(10),
            max_open_jobs: 512,
            max_pending_inputs: 1 << 20,
            admission_wait: Duration::ZERO,
            job_deadline: Duration::from_secs(60),
            max_items_per_job: 100_000,
            retry_after_max: Duration::from_secs(30),
        }
    }
}

/// The stages of a job item.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Stage {
    /// Check the input (negative numbers are refused).
    Parse,
    /// Ask the upstream (it doubles the number).
    Call,
    /// Add one.
    Finish,
}

/// One upstream request, without any policy.
type Fetch = Box<dyn Fn(i64) -> BoxFuture<'static, Result<i64, String>> + Send + Sync>;
/// The upstream call: `Fetch` behind every policy, shared by all callers.
type UpstreamCall = Call<Fetch, Retrying<fn(&CallError<String>) -> bool>>;

/// The state machine of the service; also holds the one `Call` toward the upstream.
#[derive(Debug)]
pub struct Jobs {
    upstream: UpstreamCall,
}

impl Jobs {
    /// The machine for `config`.
    ///
    /// Its `Call`'s stats and breaker (both named `upstream`) and its rate limiter publish
    /// their metrics to the global `metrics` recorder installed when they are created:
    /// [`Service::new`] installs the service's ([`telemetry::prometheus`]) first.
    pub fn new(config: &Config) -> Self {
        let client = reqwest::Client::builder().tcp_nodelay(true).build();
        let client = client.expect("an HTTP client without TLS always builds");
        let base = config.upstream.clone();
        let fetch: Fetch = Box::new(move |x| Box::pin(fetch(client.clone(), base.clone(), x)));
        let backoff = Backoff::exponential(config.retry_initial)
            .max_attempts(config.retry_attempts)
            .max_delay(Duration::from_millis(100))
            .jitter();
        // Retry failures and timeouts, not rejections: an open breaker fails fast.
        let retryable: fn(&CallError<String>) -> bool = |e| !e.is_rejected();
        let upstream = Call::new(fetch)
            .timeout(config.upstream_timeout)
            .rate_limit(RateLimiter::per_second(config.rate_per_second).burst(config.burst))
            .in_flight(config.upstream_in_flight)
            .circuit_breaker(
                CircuitBreaker::new(config.breaker_threshold, config.breaker_open_for)
                    .named("upstream"),
            )
            .retry_if(backoff, retryable)
            .stats(CallStats::new("upstream"));
        Self { upstream }
    }

    /// Runs one input through every stage inline, without a pipeline (the baseline of the
    /// benchmark: the same work, a task per item).
    pub async fn process(&self, input: i64) -> Result<i64, String> {
        let (mut stage, mut value) = (self.start(), input);
        loop {
            match self.run(stage, value).await? {
                Next::Stage(next, v) => (stage, value) = (next, v),
                Next::Done(v) => return Ok(v),
            }
        }
    }
}

/// One upstream request: `GET {base}/work?x=N` answers `2 * N` (computed here without a base).
async fn fetch(client: reqwest::Client, base: Option<String>, x: i64) -> Result<i64, String> {
    let Some(base) = base else {
        return Ok(x.wrapping_mul(2));
    };
    let unreachable = |e: reqwest::Error| format!("upstream unreachable: {e}");
    let response = client.get(format!("{base}/work?x={x}")).send().await;
    let response = response.map_err(unreachable)?;
    let status = response.status();
    let text = response.text().await.map_err(unreachable)?;
    if !status.is_success() {
        return Err(format!("upstream answered {status}: {text}"));
    }
    text.trim()
        .parse()
        .map_err(|e| format!("upstream answered {text:?}: {e}"))
}

/// A job item's data is its value; its input is known by its position in the job.
impl StateMachine for Jobs {
    type Stage = Stage;
    type Data = i64;
    type Error = String;

    fn start(&self) -> Stage {
        Stage::Parse
    }

    async fn run(&self, stage: Stage, value: i64) -> Result<Next<Stage, i64>, String> {
        match stage {
            Stage::Parse if value < 0 => Err("negative input".to_string()),
            Stage::Parse => Ok(Next::Stage(Stage::Call, value)),
            Stage::Call => match self.upstream.run(value).await {
                Ok(value) => Ok(Next::Stage(Stage::Finish, value)),
                Err(CallError::Failed { error, .. }) => Err(error),
                Err(e) if e.is_rejected() => Err("circuit open: the upstream is failing".into()),
                Err(e) => Err(format!("upstream: {e}")),
            },
            Stage::Finish => Ok(Next::Done(value + 1)),
        }
    }
}

/// One NDJSON line of a `POST /jobs` response: the input's position, the input, and its result
/// (`2 * input + 1`) or why there is none: `{"index":0,"input":1,"output":3}`,
/// `{"index":1,"input":-2,"error":"..."}`.
///
/// A response cut short closes with `{"error":"...","abandoned":N}`, `N` inputs left without a
/// line: by a shutdown (inputs not yet in the pipeline when it began, or still unfinished at
/// the shutdown deadline), or by the job's deadline. A refused job gets one such line without
/// `abandoned` as its whole body: 503 once the shutdown has begun, 429 when the service is
/// full, 413 when it has too many inputs, 400 for `deadline_ms=0`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Line {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<usize>,
}

impl Line {
    /// The closing line of a job cut short: why, and the inputs left without a line.
    fn closing(error: String, abandoned: usize) -> Self {
        let (error, abandoned) = (Some(error), Some(abandoned));
        Self {
            error,
            abandoned,
            ..Self::default()
        }
    }
}

/// `GET /stats`: the library's snapshots as they are (stagepipe's feature `serde`: durations
/// as `{"secs":..,"nanos":..}`, `pipeline.stages` as `[stage, figures]` pairs), and what only the
/// service knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// The pipeline's request groups (one per job), requests (inputs) and stages.
    pub pipeline: PipelineStats<Stage>,
    /// The pool's workers, and the stage runs occupying one now.
    pub workers: usize,
    pub stage_runs_running: usize,
    /// The upstream `Call`'s `CallStats`: `calls` counts items, each one call of the whole
    /// policy stack (its retries included); `rejected`, attempts refused by the open breaker.
    pub upstream: CallStatsSnapshot,
    pub limits: UpstreamLimits,
    /// The lines written: result lines as items, error lines as errors.
    pub lines: StatsSnapshot,
    pub server: ServerReport,
}

/// The upstream's shared limits now, and the attempts made: past the breaker, each took a cell
/// of the rate limit; `failed_attempts` failed or timed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamLimits {
    pub in_flight: usize,
    pub in_flight_limit: usize,
    pub rate_per_second: f64,
    pub burst: u32,
    /// `closed`, `open` or `half-open`.
    pub breaker: String,
    pub attempts: u64,
    pub failed_attempts: u64,
}

/// The overload figures the pipeline does not keep: jobs refused with 413 and jobs ended by
/// their deadline. (Jobs open, waiting for room, their inputs without a line yet and jobs
/// refused with 429 are the pipeline's `groups_open`, `groups_waiting`, `requests_pending` and
/// `groups_refused`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    pub jobs_too_large: u64,
    pub jobs_deadline_exceeded: u64,
}

#[derive(Debug)]
struct AppState {
    pipeline: Pipeline<Jobs>,
    /// The lines written: results as items, errors as errors.
    lines: Stats,
    /// Set when the shutdown begins: new jobs are refused.
    shutting_down: AtomicBool,
    /// The config, its `max_items_per_job` at most `max_pending_inputs` and `u32::MAX`.
    config: Config,
    too_large: AtomicU64,
    deadline_exceeded: AtomicU64,
    metrics: ServiceMetrics,
}

/// The closing line's error of a job cut short by a shutdown.
const SHUT_DOWN: &str = "the server shut down before this job finished";
/// The error line of a job posted once the shutdown has begun.
const SHUTTING_DOWN: &str = "the server is shutting down: no new jobs";

/// The service: one shared pipeline behind an HTTP API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Service(Arc<AppState>);

impl Service {
    /// A service for `config`.
    ///
    /// First installs the process's Prometheus recorder ([`telemetry::prometheus`], once per
    /// process), so that every handle created here publishes to it; inside a tokio runtime,
    /// starts a task running its upkeep while the service lives.
    ///
    /// # Panics
    ///
    /// Panics if `max_open_jobs`, `max_pending_inputs`, `max_items_per_job` or `job_deadline`
    /// is zero.
    pub fn new(config: &Config) -> Self {
        // The recorder first: the handles below register their metrics as they are created.
        let _ = telemetry::prometheus();
        for (name, zero) in [
            ("max_open_jobs", config.max_open_jobs == 0),
            ("max_pending_inputs", config.max_pending_inputs == 0),
            ("max_items_per_job", config.max_items_per_job == 0),
            ("job_deadline", config.job_deadline.is_zero()),
        ] {
            assert!(!zero, "{name} must be greater than zero");
        }
        let metrics = ServiceMetrics::register();
        let pipeline = Pipeline::builder(Jobs::new(config)).workers(config.workers);
        let pipeline = pipeline.max_open_groups(config.max_open_jobs);
        let app = Arc::new(AppState {
            pipeline: pipeline
                .max_pending_requests(config.max_pending_inputs)
                .dag()
                .build(),
            lines: Stats::new("lines"),
            shutting_down: AtomicBool::new(false),
            config: Config {
                // A job's inputs are counted in `u32` permits.
                max_items_per_job: (config.max_items_per_job)
                    .min(config.max_pending_inputs)
                    .min(u32::MAX as usize),
                ..config.clone()
            },
            too_large: AtomicU64::new(0),
            deadline_exceeded: AtomicU64::new(0),
            metrics,
        });
        telemetry::spawn_upkeep(&app);
        Self(app)
    }

    /// The axum router.
    pub fn router(&self) -> Router {
        let stats = |State(app): State<Arc<AppState>>| async move { Json(stats_report(&app)) };
        // Room for the largest job allowed, written loosely; a longer body is refused (413).
        let body_limit = self.0.config.max_items_per_job.saturating_mul(24);
        Router::new()
            .route("/jobs", post(post_jobs))
            .route("/stats", get(stats))
            .route("/metrics", get(get_metrics))
            .layer(DefaultBodyLimit::max(body_limit.saturating_add(1024)))
            .with_state(self.0.clone())
    }

    /// The figures served at `/stats`.
    pub fn stats(&self) -> StatsReport {
        stats_report(&self.0)
    }

    /// Shuts the jobs down gracefully, for [`serve`](Self::serve) or a server of one's own
    /// around [`router`](Self::router). From the call on, `POST /jobs` is refused (503). The
    /// pipeline is drained (`Pipeline::drain_timeout`): every open job runs the inputs already
    /// submitted to it, its response streams their lines, and then ends with a closing line
    /// counting the inputs it abandoned (none if it was submitted in full). Resolves `true` once
    /// every open job has ended; or `false` at the shutdown deadline, when the groups still
    /// open are cancelled and their responses end at once with a closing line.
    ///
    /// The shutdown runs on a task of its own, started by the call: dropping the returned
    /// future does not stop it.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    pub fn shutdown(&self) -> impl Future<Output = bool> + Send + 'static {
        let app = self.0.clone();
        app.shutting_down.store(true, Ordering::Release);
        let shutdown = tokio::spawn(async move {
            app.pipeline
                .drain_timeout(app.config.shutdown_deadline)
                .await
        });
        async move { shutdown.await.expect("the shutdown task does not panic") }
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down gracefully: no new
    /// connections or jobs, open jobs end as [`shutdown`](Self::shutdown) says (their submitted
    /// inputs finish, at the latest at the shutdown deadline); a client that still does not
    /// read its response 2 s after the deadline is dropped. Returns once every connection is
    /// closed. Connections are served with `TCP_NODELAY`: each line leaves as it is written.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (give_up, gave_up) = oneshot::channel::<()>();
        let service = self.clone();
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            shutdown.await;
            let deadline = tokio::time::Instant::now() + service.0.config.shutdown_deadline;
            drop(service.shutdown());
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline + Duration::from_secs(2)).await;
                let _ = give_up.send(());
            });
        });
        tokio::select! {
            result = server.into_future() => result,
            Ok(()) = gave_up => Ok(()),
        }
    }
}

/// `?on_error=cancel` ends a job at its first error (in submission order); `continue` (the
/// default) reports errors and carries on. `?deadline_ms=N` shortens the job's deadline.
#[derive(Deserialize)]
struct JobsQuery {
    on_error: Option<OnError>,
    deadline_ms: Option<u64>,
}

#[derive(Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum OnError {
    Cancel,
    Continue,
}

/// A refused job's response: `status` and one JSON line saying why.
fn refusal(status: StatusCode, error: String) -> Response {
    let line = Line {
        error: Some(error),
        ..Line::default()
    };
    (status, Json(line)).into_response()
}

async fn post_jobs(
    State(app): State<Arc<AppState>>,
    Query(query): Query<JobsQuery>,
    Json(inputs): Json<Vec<i64>>,
) -> Response {
    let arrived = Instant::now();
    if app.shutting_down.load(Ordering::Acquire) {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN.to_string());
    }
    let total = inputs.len();
    if total > app.config.max_items_per_job {
        app.too_large.fetch_add(1, Ordering::AcqRel);
        app.metrics.jobs_too_large.increment(1);
        let error = format!(
            "too many inputs: a job may have at most {}, this one has {total}",
            app.config.max_items_per_job
        );
        return refusal(StatusCode::PAYLOAD_TOO_LARGE, error);
    }
    let deadline_len = match query.deadline_ms {
        Some(0) => {
            let error = "deadline_ms must be greater than zero".to_string();
            return refusal(StatusCode::BAD_REQUEST, error);
        }
        Some(ms) => Duration::from_millis(ms).min(app.config.job_deadline),
        None => app.config.job_deadline,
    };
    let mut group = app.pipeline.group().ordered().window(app.config.job_window);
    if let Some(at) = arrived.checked_add(deadline_len) {
        group = group.deadline_at(at);
    }
    if query.on_error == Some(OnError::Cancel) {
        group = group.cancel_on_error();
    }
    let wait = app.config.admission_wait.min(deadline_len);
    let inputs: Arc<[i64]> = inputs.into();
    let requests = (0..total).map({
        let inputs = inputs.clone();
        move |index| inputs[index]
    });
    let results = match group.admit_all(requests, wait).await {
        Ok(results) => results,
        Err(full) => {
            app.metrics.jobs_shed.increment(1);
            let bound = match full.bound {
                AdmissionBound::OpenGroups => ("max_open_jobs", app.config.max_open_jobs),
                _ => ("max_pending_inputs", app.config.max_pending_inputs),
            };
            let retry_after = retry_after(full.retry_after, app.config.retry_after_max);
            let error = format!(
                "the service is full ({} = {}): retry after {retry_after} s",
                bound.0, bound.1
            );
            let mut response = refusal(StatusCode::TOO_MANY_REQUESTS, error);
            let retry_after = header::HeaderValue::from(retry_after);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
            return response;
        }
    };
    // The shutdown may have begun while the job waited for room (its group is closed).
    if app.shutting_down.load(Ordering::Acquire) {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN.to_string());
    }
    app.metrics.jobs_admitted.increment(1);
    app.metrics.admission_wait.record(arrived.elapsed());
    // One line per result; a job cut short (deadline, shutdown) ends with the group's last
    // item, which counts the inputs left without a line. The body owns the group's results: a
    // client that goes away drops them, which cancels the group and gives its room back.
    let timer = JobTimer(arrived, app.metrics.job_duration.clone());
    let lines = results.try_with_stats(&app.lines).enumerate();
    let body = lines.map(move |(index, result)| {
        let _timer = &timer;
        let abandoned = result.as_ref().err().and_then(StageError::abandoned);
        let line = match (result, abandoned) {
            (Err(StageError::DeadlineExceeded { .. }), Some(abandoned)) => {
                app.deadline_exceeded.fetch_add(1, Ordering::AcqRel);
                app.metrics.jobs_deadline_exceeded.increment(1);
                let ms = deadline_len.as_millis();
                let error = format!("the job's deadline of {ms} ms passed before it finished");
                Line::closing(error, abandoned as usize)
            }
            (_, Some(abandoned)) => Line::closing(SHUT_DOWN.to_string(), abandoned as usize),
            (result, None) => result_line(index, inputs[index], result),
        };
        ndjson(&line)
    });
    let ndjson_type = [(header::CONTENT_TYPE, "application/x-ndjson")];
    (StatusCode::OK, ndjson_type, Body::from_stream(body)).into_response()
}

/// Records a job's duration, from its arrival, when its response ends or is dropped.
struct JobTimer(Instant, Histogram);

impl Drop for JobTimer {
    fn drop(&mut self) {
        self.1.record(self.0.elapsed());
    }
}

/// The line of one result: its value, or why there is none.
fn result_line(index: usize, input: i64, result: Result<i64, StageError<Jobs>>) -> Line {
    let (output, error) = match result {
        Ok(output) => (Some(output), None),
        Err(StageError::Failed { stage, error }) => (None, Some(format!("{stage:?}: {error}"))),
        Err(other) => (None, Some(format!("{other:?}"))),
    };
    let (index, input) = (Some(index), Some(input));
    Line {
        index,
        input,
        output,
        error,
        abandoned: None,
    }
}

fn ndjson(line: &Line) -> Result<Bytes, std::convert::Infallible> {
    let mut bytes = serde_json::to_vec(line).expect("a line always serializes");
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}

fn stats_report(app: &AppState) -> StatsReport {
    let (pool, call) = (app.pipeline.pool(), &app.pipeline.machine().upstream);
    let limit = call.get_in_flight().expect("set in `Jobs::new`");
    let limiter = call.get_rate_limit().expect("set in `Jobs::new`");
    let upstream = call.get_stats().expect("set in `Jobs::new`").snapshot();
    let attempts = (upstream.calls + upstream.retries).saturating_sub(upstream.rejected);
    StatsReport {
        pipeline: app.pipeline.stats(),
        workers: pool.workers(),
        stage_runs_running: pool.busy(),
        limits: UpstreamLimits {
            in_flight: limit.in_use(),
            in_flight_limit: limit.limit(),
            rate_per_second: 1.0 / limiter.interval().as_secs_f64(),
            burst: limiter.burst_size(),
            breaker: call.get_circuit_breaker().unwrap().state().to_string(),
            attempts,
            // Every attempt made ends as a success, a failure or a timeout, or is cancelled.
            failed_attempts: attempts.saturating_sub(upstream.successes + upstream.cancelled),
        },
        upstream,
        lines: app.lines.snapshot(),
        server: ServerReport {
            jobs_too_large: app.too_large.load(Ordering::Acquire),
            jobs_deadline_exceeded: app.deadline_exceeded.load(Ordering::Acquire),
        },
    }
}

/// `GET /metrics`: the recorder's rendering, after setting the figures read at scrape time.
async fn get_metrics(State(app): State<Arc<AppState>>) -> Response {
    let Some(prometheus) = telemetry::prometheus() else {
        let why = "metrics are exported through the process's own recorder";
        return (StatusCode::NOT_IMPLEMENTED, why).into_response();
    };
    let stats = app.pipeline.stats();
    let in_flight = app.pipeline.machine().upstream.get_in_flight();
    let m = &app.metrics;
    m.groups_opened.absolute(stats.groups_opened);
    m.groups_open.set(stats.groups_open as f64);
    m.jobs_open.set(stats.groups_open as f64);
    m.jobs_waiting.set(stats.groups_waiting as f64);
    m.inputs_pending.set(stats.requests_pending as f64);
    m.requests_done.absolute(stats.requests_done);
    m.requests_failed.absolute(stats.requests_failed);
    m.upstream_in_flight
        .set(in_flight.map_or(0, |limit| limit.in_use()) as f64);
    let text_format = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (text_format, prometheus.render()).into_response()
}
