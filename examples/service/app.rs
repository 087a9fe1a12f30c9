//! The service: an axum app holding one shared `Pipeline`.
//!
//! * `POST /jobs?on_error=cancel|continue` with a JSON array of integers opens a request group
//!   for that caller and streams its results back as NDJSON, one line per input in submission
//!   order, each line written as soon as it and every earlier one are done.
//! * `GET /stats`: the pipeline's, the upstream limits' and the server's figures as JSON;
//!   `GET /metrics`: the same as a Prometheus text exposition.
//!
//! Every caller shares one set of workers (the pipeline's pool) and one set of limits toward the
//! upstream, all applied in [`Jobs::call_upstream`], the one place the upstream is called.
//! A caller that disconnects drops its response body, which drops its group's results and so
//! cancels its unfinished requests.

// Shared with the service tests and benchmark, which use parts the example itself does not.
#![allow(dead_code)]

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::{Future, IntoFuture};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use stagepipe::prelude::*;
use stagepipe::{GroupResults, Submitter};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// How the service is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the upstream API (`http://host:port`); `None` computes the upstream's answer
    /// locally (a trivial stage, for benchmarks).
    pub upstream: Option<String>,
    /// Workers of the shared pipeline: how many items are in a stage at once, across every
    /// caller. The upstream stage is I/O-bound, so this is well above the in-flight limit.
    pub workers: usize,
    /// The most upstream calls in flight at once, across every caller.
    pub upstream_in_flight: usize,
    /// Timeout of one upstream call.
    pub upstream_timeout: Duration,
    /// The most upstream calls per second, across every caller (retries included).
    pub rate_per_second: u32,
    /// How many upstream calls may go at once after an idle spell.
    pub burst: u32,
    /// Consecutive upstream failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before a trial call.
    pub breaker_open_for: Duration,
    /// Attempts per upstream call, the first included (exponential backoff between them).
    pub retry_attempts: u32,
    /// The first backoff delay (doubling, with full jitter, at most 100 ms).
    pub retry_initial: Duration,
    /// On shutdown, how long open responses may keep going before they are ended.
    pub shutdown_deadline: Duration,
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
            shutdown_deadline: Duration::from_secs(10),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline

/// The stages of a job item.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Stage {
    /// Check the input (negative numbers are refused).
    Parse,
    /// Ask the upstream (it doubles the number).
    Call,
    /// Add one.
    Finish,
}

/// One item of a job, from stage to stage.
#[derive(Debug)]
pub struct Item {
    input: i64,
    value: i64,
}

/// Why an item failed: its input, and a message.
#[derive(Debug)]
pub struct ItemError {
    input: i64,
    message: String,
}

/// The state machine of the service; also holds everything shared toward the upstream.
#[derive(Debug)]
pub struct Jobs {
    client: reqwest::Client,
    upstream: Option<String>,
    in_flight: InFlightLimit,
    limiter: RateLimiter,
    breaker: CircuitBreaker,
    backoff: Backoff,
    /// Cells taken from the limiter, and the time spent waiting for them (µs).
    rate_taken: AtomicU64,
    rate_waited_us: AtomicU64,
    /// Calls refused at once by the open breaker.
    breaker_rejected: AtomicU64,
    /// Stage runs occupying a pool worker now.
    running: AtomicUsize,
    upstream_calls: AtomicU64,
    upstream_failures: AtomicU64,
}

impl Jobs {
    /// The machine for `config`.
    pub fn new(config: &Config) -> Self {
        let client = reqwest::Client::builder()
            .timeout(config.upstream_timeout)
            .tcp_nodelay(true)
            .build()
            .expect("an HTTP client without TLS always builds");
        Self {
            client,
            upstream: config.upstream.clone(),
            in_flight: InFlightLimit::new(config.upstream_in_flight),
            limiter: RateLimiter::per_second(config.rate_per_second).burst(config.burst),
            breaker: CircuitBreaker::new(config.breaker_threshold, config.breaker_open_for),
            backoff: Backoff::exponential(config.retry_initial)
                .max_attempts(config.retry_attempts)
                .max_delay(Duration::from_millis(100))
                .jitter(),
            rate_taken: AtomicU64::new(0),
            rate_waited_us: AtomicU64::new(0),
            breaker_rejected: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            upstream_calls: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
        }
    }

    /// The one place the service calls the upstream: every limit toward it wraps this call,
    /// and every limit is shared by all callers.
    ///
    /// From the outside in: a retry with exponential backoff (not retrying calls the breaker
    /// refused: an open breaker fails fast); the circuit breaker; a permit of the in-flight
    /// limit; a cell of the rate limiter, taken last so that a call goes out the moment its
    /// cell is granted (calls released together by the in-flight limit never bunch up).
    async fn call_upstream(&self, x: i64) -> Result<i64, String> {
        let attempt = || {
            self.breaker.call(holding(&self.in_flight, async {
                let waiting = tokio::time::Instant::now();
                self.limiter.until_ready().await;
                let waited = waiting.elapsed().as_micros() as u64;
                self.rate_waited_us.fetch_add(waited, Ordering::Relaxed);
                self.rate_taken.fetch_add(1, Ordering::Relaxed);
                self.attempt(x).await
            }))
        };
        match self
            .backoff
            .retry_if(attempt, |e: &BreakerError<(), String>| !e.is_open())
            .await
        {
            Ok(value) => Ok(value),
            Err(BreakerError::Failed(e)) => Err(e),
            Err(BreakerError::Open(())) => {
                self.breaker_rejected.fetch_add(1, Ordering::Relaxed);
                Err("circuit open: the upstream is failing".to_string())
            }
        }
    }

    /// One upstream call, without any limit.
    async fn attempt(&self, x: i64) -> Result<i64, String> {
        let Some(base) = &self.upstream else {
            return Ok(x.wrapping_mul(2));
        };
        self.upstream_calls.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let response = self
                .client
                .get(format!("{base}/work?x={x}"))
                .send()
                .await
                .map_err(|e| format!("upstream unreachable: {e}"))?;
            let status = response.status();
            let text = response
                .text()
                .await
                .map_err(|e| format!("upstream body: {e}"))?;
            if !status.is_success() {
                return Err(format!("upstream answered {status}: {text}"));
            }
            text.trim()
                .parse::<i64>()
                .map_err(|e| format!("upstream answered {text:?}: {e}"))
        }
        .await;
        if result.is_err() {
            self.upstream_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Runs one input through every stage inline, without a pipeline (the baseline of the
    /// benchmark: the same work, a task per item).
    pub async fn process(&self, input: i64) -> Result<i64, String> {
        let mut stage = self.start();
        let mut item = Item {
            input,
            value: input,
        };
        loop {
            match self.run(stage, item).await {
                Ok(Next::Stage(next, i)) => {
                    stage = next;
                    item = i;
                }
                Ok(Next::Done(i)) => return Ok(i.value),
                Err(e) => return Err(e.message),
            }
        }
    }
}

/// Runs `fut` while holding a permit of `limit` (waiting for one first).
async fn holding<F: Future>(limit: &InFlightLimit, fut: F) -> F::Output {
    let mut fut = Some(fut);
    let once = stream::once(async {}).in_flight(limit, move |()| {
        fut.take().expect("`once` yields a single item")
    });
    let mut once = pin!(once);
    once.next().await.expect("`once` yields a single item")
}

/// Counts a stage run as running while it lives (a cancelled run is dropped, and uncounted).
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn enter(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StateMachine for Jobs {
    type Stage = Stage;
    type Data = Item;
    type Error = ItemError;

    fn start(&self) -> Stage {
        Stage::Parse
    }

    async fn run(&self, stage: Stage, mut item: Item) -> Result<Next<Stage, Item>, ItemError> {
        let _running = Running::enter(&self.running);
        let input = item.input;
        let fail = |message: String| ItemError { input, message };
        match stage {
            Stage::Parse if item.input < 0 => Err(fail("negative input".to_string())),
            Stage::Parse => Ok(Next::Stage(Stage::Call, item)),
            Stage::Call => {
                item.value = self.call_upstream(item.value).await.map_err(fail)?;
                Ok(Next::Stage(Stage::Finish, item))
            }
            Stage::Finish => {
                item.value += 1;
                Ok(Next::Done(item))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire formats

/// One NDJSON line of a `POST /jobs` response.
///
/// A result: `{"index":0,"input":1,"output":3}`; an error:
/// `{"index":1,"input":-2,"error":"..."}`; a response ended by the server's shutdown deadline
/// closes with `{"error":"...","abandoned":N}` (`N` inputs without a line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Position of the input in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<i64>,
    /// The result (`2 * input + 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<i64>,
    /// Why there is no result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On the closing line of a response ended by shutdown: inputs left without a line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<usize>,
}

/// `GET /stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// The shared pipeline.
    pub pipeline: PipelineReport,
    /// Calls toward the upstream.
    pub upstream: UpstreamLimits,
    /// The HTTP side.
    pub server: ServerReport,
}

/// The pipeline's part of `/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineReport {
    /// Workers of the shared pool.
    pub workers: usize,
    /// Request groups (jobs) opened so far.
    pub groups_opened: u64,
    /// Request groups whose results are still alive.
    pub groups_open: u64,
    /// Items finished (value or error).
    pub requests_done: u64,
    /// Items finished with an error.
    pub requests_failed: u64,
    /// Stage runs occupying a pool worker now.
    pub stage_runs_running: usize,
    /// Per stage.
    pub stages: Vec<StageReport>,
}

/// One stage in `/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// The stage's name.
    pub stage: String,
    /// Runs, failed ones included.
    pub runs: u64,
    /// Failed runs.
    pub errors: u64,
    /// Mean run time, µs.
    pub mean_us: u64,
    /// Longest run, µs.
    pub max_us: u64,
}

/// The upstream limits' part of `/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamLimits {
    /// Calls in flight now.
    pub in_flight: usize,
    /// The in-flight limit.
    pub in_flight_limit: usize,
    /// Attempts made.
    pub calls: u64,
    /// Attempts that failed.
    pub failures: u64,
    /// The rate limit, calls per second.
    pub rate_per_second: f64,
    /// The rate limit's burst.
    pub burst: u32,
    /// Cells taken from the rate limiter.
    pub rate_taken: u64,
    /// Total time calls waited for the rate limiter, ms.
    pub rate_waited_ms: u64,
    /// The circuit breaker: `closed`, `open` or `half-open`.
    pub breaker: String,
    /// Calls refused at once by the open breaker.
    pub breaker_rejected: u64,
}

/// The HTTP side of `/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    /// `POST /jobs` requests received.
    pub jobs: u64,
    /// Responses still streaming.
    pub responses_open: usize,
    /// Result lines written.
    pub lines_ok: u64,
    /// Error lines written.
    pub lines_error: u64,
}

// ---------------------------------------------------------------------------------------------
// The HTTP app

struct AppState {
    pipeline: Pipeline<Jobs>,
    jobs: AtomicU64,
    responses_open: AtomicUsize,
    lines_ok: AtomicU64,
    lines_error: AtomicU64,
    /// Set when the shutdown deadline has passed: open responses end at once.
    abort: watch::Sender<bool>,
    shutdown_deadline: Duration,
}

/// The service: one shared pipeline behind an HTTP API. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    state: Arc<AppState>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("pipeline", &self.state.pipeline)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service for `config`.
    pub fn new(config: &Config) -> Self {
        let pipeline = Pipeline::builder(Jobs::new(config))
            .workers(config.workers)
            .dag()
            .build();
        Self {
            state: Arc::new(AppState {
                pipeline,
                jobs: AtomicU64::new(0),
                responses_open: AtomicUsize::new(0),
                lines_ok: AtomicU64::new(0),
                lines_error: AtomicU64::new(0),
                abort: watch::Sender::new(false),
                shutdown_deadline: config.shutdown_deadline,
            }),
        }
    }

    /// The state machine (shared with the pipeline).
    pub fn jobs(&self) -> &Jobs {
        self.state.pipeline.machine()
    }

    /// The axum router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/jobs", post(post_jobs))
            .route("/stats", get(get_stats))
            .route("/metrics", get(get_metrics))
            .with_state(self.state.clone())
    }

    /// The figures served at `/stats`.
    pub fn stats(&self) -> StatsReport {
        stats_report(&self.state)
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down gracefully: stops
    /// accepting connections and lets open responses finish; responses still open after the
    /// shutdown deadline are ended with a closing line (which cancels their groups). Returns
    /// once every connection is closed.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (began, shutting_down) = oneshot::channel::<()>();
        let server = axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                shutdown.await;
                let _ = began.send(());
            })
            .into_future();
        let mut server = pin!(server);
        tokio::select! {
            result = &mut server => return result,
            Ok(()) = shutting_down => {}
        }
        // Draining: no new connections; open responses go on until the deadline.
        if let Ok(result) = tokio::time::timeout(self.state.shutdown_deadline, &mut server).await {
            return result;
        }
        // Deadline: every open response writes its closing line and ends.
        self.state.abort.send_replace(true);
        match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
            Ok(result) => result,
            // A client that does not read its response: drop the connection.
            Err(_) => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnError {
    /// End the job at its first error (in submission order).
    Cancel,
    /// Report errors and carry on.
    #[default]
    Continue,
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    #[serde(default)]
    on_error: OnError,
}

async fn post_jobs(
    State(app): State<Arc<AppState>>,
    Query(query): Query<JobsQuery>,
    Json(inputs): Json<Vec<i64>>,
) -> Response {
    app.jobs.fetch_add(1, Ordering::Relaxed);
    let group = app.pipeline.group().ordered();
    let group = match query.on_error {
        OnError::Cancel => group.cancel_on_error(),
        OnError::Continue => group,
    };
    let (tx, results) = group.open();
    let total = inputs.len();
    tokio::spawn(submit_all(tx, inputs));
    let lines = Lines {
        results,
        index: 0,
        total,
        abort: app.abort.subscribe(),
        open: ResponseOpen::enter(app.clone()),
        ended: false,
    };
    let body = stream::unfold(lines, Lines::next_line);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response()
}

/// Submits a job's inputs, waiting while its window is full; stops if the job is cancelled.
async fn submit_all(tx: Submitter<Jobs>, inputs: Vec<i64>) {
    for input in inputs {
        if tx
            .submit(Item {
                input,
                value: input,
            })
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Counts a response as open while it lives.
struct ResponseOpen(Arc<AppState>);

impl ResponseOpen {
    fn enter(app: Arc<AppState>) -> Self {
        app.responses_open.fetch_add(1, Ordering::Relaxed);
        Self(app)
    }
}

impl Drop for ResponseOpen {
    fn drop(&mut self) {
        self.0.responses_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The state of one streaming response.
struct Lines {
    results: GroupResults<Jobs>,
    index: usize,
    total: usize,
    abort: watch::Receiver<bool>,
    open: ResponseOpen,
    ended: bool,
}

impl Lines {
    async fn next_line(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.ended {
            return None;
        }
        let line = tokio::select! {
            biased;
            result = self.results.next() => {
                let index = self.index;
                self.index += 1;
                let app = &self.open.0;
                match result? {
                    Ok(item) => {
                        app.lines_ok.fetch_add(1, Ordering::Relaxed);
                        Line {
                            index: Some(index),
                            input: Some(item.input),
                            output: Some(item.value),
                            error: None,
                            abandoned: None,
                        }
                    }
                    Err(error) => {
                        app.lines_error.fetch_add(1, Ordering::Relaxed);
                        let input = match &error {
                            StageError::Failed { error, .. } => Some(error.input),
                            _ => None,
                        };
                        let message = match error {
                            StageError::Failed { stage, error } => {
                                format!("{stage:?}: {}", error.message)
                            }
                            StageError::Panicked { stage, message } => {
                                format!("{stage:?} panicked: {message}")
                            }
                            other => format!("{:?}", other.stage()),
                        };
                        Line {
                            index: Some(index),
                            input,
                            output: None,
                            error: Some(message),
                            abandoned: None,
                        }
                    }
                }
            }
            _ = self.abort.wait_for(|abort| *abort) => {
                self.ended = true;
                Line {
                    index: None,
                    input: None,
                    output: None,
                    error: Some("the server shut down before this job finished".to_string()),
                    abandoned: Some(self.total - self.index),
                }
            }
        };
        let mut bytes = serde_json::to_vec(&line).expect("a line always serializes");
        bytes.push(b'\n');
        Some((Ok(Bytes::from(bytes)), self))
    }
}

fn stats_report(app: &AppState) -> StatsReport {
    let stats = app.pipeline.stats();
    let jobs = app.pipeline.machine();
    StatsReport {
        pipeline: PipelineReport {
            workers: app.pipeline.pool().workers(),
            groups_opened: stats.groups_opened,
            groups_open: stats.groups_open,
            requests_done: stats.requests_done,
            requests_failed: stats.requests_failed,
            stage_runs_running: jobs.running.load(Ordering::Relaxed),
            stages: stats
                .stages
                .iter()
                .map(|(stage, s)| StageReport {
                    stage: format!("{stage:?}"),
                    runs: s.runs,
                    errors: s.errors,
                    mean_us: s.mean.as_micros() as u64,
                    max_us: s.max.as_micros() as u64,
                })
                .collect(),
        },
        upstream: UpstreamLimits {
            in_flight: jobs.in_flight.in_use(),
            in_flight_limit: jobs.in_flight.limit(),
            calls: jobs.upstream_calls.load(Ordering::Relaxed),
            failures: jobs.upstream_failures.load(Ordering::Relaxed),
            rate_per_second: 1.0 / jobs.limiter.interval().as_secs_f64(),
            burst: jobs.limiter.burst_size(),
            rate_taken: jobs.rate_taken.load(Ordering::Relaxed),
            rate_waited_ms: jobs.rate_waited_us.load(Ordering::Relaxed) / 1000,
            breaker: jobs.breaker.state().to_string(),
            breaker_rejected: jobs.breaker_rejected.load(Ordering::Relaxed),
        },
        server: ServerReport {
            jobs: app.jobs.load(Ordering::Relaxed),
            responses_open: app.responses_open.load(Ordering::Relaxed),
            lines_ok: app.lines_ok.load(Ordering::Relaxed),
            lines_error: app.lines_error.load(Ordering::Relaxed),
        },
    }
}

async fn get_stats(State(app): State<Arc<AppState>>) -> Json<StatsReport> {
    Json(stats_report(&app))
}

async fn get_metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let s = stats_report(&app);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, value: String| {
        let _ = writeln!(
            out,
            "# TYPE stagepipe_{name} {kind}\nstagepipe_{name} {value}"
        );
    };
    metric(
        "groups_opened_total",
        "counter",
        s.pipeline.groups_opened.to_string(),
    );
    metric("groups_open", "gauge", s.pipeline.groups_open.to_string());
    metric(
        "requests_done_total",
        "counter",
        s.pipeline.requests_done.to_string(),
    );
    metric(
        "requests_failed_total",
        "counter",
        s.pipeline.requests_failed.to_string(),
    );
    metric(
        "upstream_in_flight",
        "gauge",
        s.upstream.in_flight.to_string(),
    );
    metric(
        "upstream_calls_total",
        "counter",
        s.upstream.calls.to_string(),
    );
    metric(
        "upstream_failures_total",
        "counter",
        s.upstream.failures.to_string(),
    );
    metric(
        "responses_open",
        "gauge",
        s.server.responses_open.to_string(),
    );
    metric(
        "upstream_rate_waited_ms_total",
        "counter",
        s.upstream.rate_waited_ms.to_string(),
    );
    metric(
        "breaker_open",
        "gauge",
        u8::from(s.upstream.breaker != "closed").to_string(),
    );
    metric(
        "breaker_rejected_total",
        "counter",
        s.upstream.breaker_rejected.to_string(),
    );
    let _ = writeln!(out, "# TYPE stagepipe_stage_runs_total counter");
    for st in &s.pipeline.stages {
        let _ = writeln!(
            out,
            "stagepipe_stage_runs_total{{stage=\"{}\"}} {}",
            st.stage, st.runs
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
