//! The service: an axum app holding one shared `Pipeline`.
//!
//! * `POST /jobs?on_error=cancel|continue` with a JSON array of integers opens a request group
//!   for that caller and streams its results back as NDJSON, one line per input in submission
//!   order, each line written as soon as it and every earlier one are done.
//! * `GET /stats`: the pipeline's, the upstream call's and the server's figures as JSON;
//!   `GET /metrics`: the same as a Prometheus text exposition.
//!
//! Every caller shares one set of workers (the pipeline's pool) and one `Call` toward the
//! upstream: its timeout, rate limit, in-flight limit, circuit breaker, retries and stats are
//! shared by all callers. A caller that disconnects drops its response body, which drops its
//! group's results and so cancels its unfinished requests.

use std::fmt::Write as _;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use stagepipe::Retrying;
use stagepipe::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

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
    /// How many of one job's inputs may be in the pipeline at once (its group's window); as
    /// many again wait submitted. A shutdown lets the inputs submitted finish and abandons the
    /// rest, so this also bounds how much of a job a shutdown waits for.
    pub job_window: usize,
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
            job_window: 256,
            shutdown_deadline: Duration::from_secs(10),
        }
    }
}

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

impl From<i64> for Item {
    fn from(input: i64) -> Self {
        Self {
            input,
            value: input,
        }
    }
}

/// Why an item failed: its input, and a message.
#[derive(Debug)]
pub struct ItemError {
    input: i64,
    message: String,
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
            .circuit_breaker(CircuitBreaker::new(
                config.breaker_threshold,
                config.breaker_open_for,
            ))
            .retry_if(backoff, retryable)
            .stats(CallStats::new("upstream"));
        Self { upstream }
    }

    /// Runs one input through every stage inline, without a pipeline (the baseline of the
    /// benchmark: the same work, a task per item).
    pub async fn process(&self, input: i64) -> Result<i64, String> {
        let (mut stage, mut item) = (self.start(), Item::from(input));
        loop {
            match self.run(stage, item).await {
                Ok(Next::Stage(next, i)) => (stage, item) = (next, i),
                Ok(Next::Done(i)) => return Ok(i.value),
                Err(e) => return Err(e.message),
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

impl StateMachine for Jobs {
    type Stage = Stage;
    type Data = Item;
    type Error = ItemError;

    fn start(&self) -> Stage {
        Stage::Parse
    }

    async fn run(&self, stage: Stage, mut item: Item) -> Result<Next<Stage, Item>, ItemError> {
        let input = item.input;
        let fail = move |message| ItemError { input, message };
        match stage {
            Stage::Parse if item.input < 0 => Err(fail("negative input".to_string())),
            Stage::Parse => Ok(Next::Stage(Stage::Call, item)),
            Stage::Call => match self.upstream.run(item.value).await {
                Ok(value) => Ok(Next::Stage(Stage::Finish, Item { value, ..item })),
                Err(CallError::Failed { error, .. }) => Err(fail(error)),
                Err(e) if e.is_rejected() => {
                    Err(fail("circuit open: the upstream is failing".into()))
                }
                Err(e) => Err(fail(format!("upstream: {e}"))),
            },
            Stage::Finish => {
                item.value += 1;
                Ok(Next::Done(item))
            }
        }
    }
}

/// One NDJSON line of a `POST /jobs` response: the input's position, the input, and its result
/// (`2 * input + 1`) or why there is none: `{"index":0,"input":1,"output":3}`,
/// `{"index":1,"input":-2,"error":"..."}`. A response cut short by a shutdown (inputs not yet
/// submitted when it began, or still unfinished at the shutdown deadline) closes with
/// `{"error":"...","abandoned":N}`, `N` inputs left without a line. A job posted once the
/// shutdown has begun is refused with 503 and one such line, without `abandoned`.
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

/// `GET /stats`: the shared pipeline, the calls toward the upstream, and the HTTP side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub pipeline: PipelineReport,
    pub upstream: UpstreamLimits,
    pub server: ServerReport,
}

/// The pipeline's part of `/stats`: its pool, its request groups (jobs) opened and still open,
/// its requests (items) finished and failed, stage runs occupying a worker now, and per stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineReport {
    pub workers: usize,
    pub groups_opened: u64,
    pub groups_open: u64,
    pub requests_done: u64,
    pub requests_failed: u64,
    pub stage_runs_running: usize,
    pub stages: Vec<StageReport>,
}

/// One stage in `/stats`: runs (failed ones included), failed runs, mean and longest run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: String,
    pub runs: u64,
    pub errors: u64,
    pub mean_us: u64,
    pub max_us: u64,
}

/// The upstream part of `/stats`, from the `Call`'s `CallStats` and its shared handles.
///
/// `calls` counts attempts made (past the breaker; each took a cell of the rate limit, so
/// `rate_taken` is the same figure), `failures` those that failed or timed out, `retries` the
/// attempts after an item's first; `breaker_rejected` counts attempts refused at once by the
/// open breaker (not retried: each ends its item). Latencies are of an item's whole call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamLimits {
    pub in_flight: usize,
    pub in_flight_limit: usize,
    pub calls: u64,
    pub failures: u64,
    pub retries: u64,
    pub timeouts: u64,
    pub rate_per_second: f64,
    pub burst: u32,
    pub rate_taken: u64,
    pub rate_waited_ms: u64,
    /// `closed`, `open` or `half-open`.
    pub breaker: String,
    pub breaker_rejected: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// The HTTP side of `/stats`: jobs accepted (each opens one group), responses still streaming,
/// result lines and error lines written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    pub jobs: u64,
    pub responses_open: usize,
    pub lines_ok: u64,
    pub lines_error: u64,
}

#[derive(Debug)]
struct AppState {
    pipeline: Pipeline<Jobs>,
    /// The lines written: results as items, errors as errors.
    lines: Stats,
    /// Set when the shutdown begins: new jobs are refused.
    shutting_down: AtomicBool,
    /// Set when the shutdown deadline has passed: open responses end at once.
    abort: watch::Sender<bool>,
    job_window: usize,
    shutdown_deadline: Duration,
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
    pub fn new(config: &Config) -> Self {
        let pipeline = Pipeline::builder(Jobs::new(config)).workers(config.workers);
        Self(Arc::new(AppState {
            pipeline: pipeline.dag().build(),
            lines: Stats::new("lines"),
            shutting_down: AtomicBool::new(false),
            abort: watch::Sender::new(false),
            job_window: config.job_window,
            shutdown_deadline: config.shutdown_deadline,
        }))
    }

    /// The axum router.
    pub fn router(&self) -> Router {
        let stats = |State(app): State<Arc<AppState>>| async move { Json(stats_report(&app)) };
        Router::new()
            .route("/jobs", post(post_jobs))
            .route("/stats", get(stats))
            .route("/metrics", get(get_metrics))
            .with_state(self.0.clone())
    }

    /// The figures served at `/stats`.
    pub fn stats(&self) -> StatsReport {
        stats_report(&self.0)
    }

    /// Shuts the jobs down gracefully, for [`serve`](Self::serve) or a server of one's own
    /// around [`router`](Self::router). From the call on, `POST /jobs` is refused (503). The
    /// pipeline is drained (`Pipeline::drain`): every open job runs the inputs already
    /// submitted to it, its response streams their lines, and then ends with a closing line
    /// counting the inputs it abandoned (none if it was submitted in full). Resolves `true` once
    /// every open job has ended; or `false` at the shutdown deadline, when the responses still
    /// open are ended at once with a closing line (which cancels their groups' unfinished
    /// inputs).
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
            let drained = tokio::time::timeout(app.shutdown_deadline, app.pipeline.drain());
            if drained.await.is_ok() {
                return true;
            }
            app.abort.send_replace(true);
            false
        });
        async move { shutdown.await.expect("the shutdown task does not panic") }
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down gracefully: no new
    /// connections or jobs, open jobs end as [`shutdown`](Self::shutdown) says (their submitted
    /// inputs finish, at the latest at the shutdown deadline); a client that still does not
    /// read its response 2 s after the deadline is dropped. Returns once every connection is
    /// closed.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (give_up, gave_up) = oneshot::channel::<()>();
        let service = self.clone();
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            shutdown.await;
            let deadline = tokio::time::Instant::now() + service.0.shutdown_deadline;
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
/// default) reports errors and carries on.
#[derive(Deserialize)]
struct JobsQuery {
    on_error: Option<OnError>,
}

#[derive(Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum OnError {
    Cancel,
    Continue,
}

async fn post_jobs(
    State(app): State<Arc<AppState>>,
    Query(query): Query<JobsQuery>,
    Json(inputs): Json<Vec<i64>>,
) -> Response {
    if app.shutting_down.load(Ordering::Acquire) {
        let error = Some(SHUTTING_DOWN.to_string());
        let refused = Line {
            error,
            ..Line::default()
        };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(refused)).into_response();
    }
    let cancel_on_error = query.on_error == Some(OnError::Cancel);
    let group = app.pipeline.group().ordered().window(app.job_window);
    let (tx, results) = if cancel_on_error {
        group.cancel_on_error().open()
    } else {
        group.open()
    };
    let total = inputs.len();
    // Submit in the background, waiting while the group's window is full; stop if it ends.
    tokio::spawn(async move {
        for input in inputs {
            if tx.submit(input.into()).await.is_err() {
                break;
            }
        }
    });
    let lines = results
        .try_with_stats(&app.lines)
        .enumerate()
        .map(|(index, result)| {
            let (input, output, error) = match result {
                Ok(item) => (Some(item.input), Some(item.value), None),
                Err(StageError::Failed { stage, error: e }) => (
                    Some(e.input),
                    None,
                    Some(format!("{stage:?}: {}", e.message)),
                ),
                Err(other) => (None, None, Some(format!("{other:?}"))),
            };
            let index = Some(index);
            let abandoned = None;
            Line {
                index,
                input,
                output,
                error,
                abandoned,
            }
        });
    // The body owns the group's results: a client that goes away drops them, which cancels
    // the group. A job cut short by a shutdown ends with a closing line: when its results end
    // before every input has a line (the drain refused the inputs not yet submitted; only an
    // error under `on_error=cancel` ends a job early otherwise), or at the shutdown deadline.
    let closing = move |written: usize| {
        let error = Some(SHUT_DOWN.to_string());
        let abandoned = Some(total - written);
        ndjson(&Line {
            error,
            abandoned,
            ..Line::default()
        })
    };
    let state = (Box::pin(lines), 0, false, app.abort.subscribe());
    let body = stream::unfold(Some(state), move |state| async move {
        let (mut lines, written, failed, mut abort) = state?;
        let line = tokio::select! {
            biased;
            line = lines.next() => match line {
                Some(line) => line,
                None if written < total && !(cancel_on_error && failed) => {
                    return Some((closing(written), None));
                }
                None => return None,
            },
            _ = abort.wait_for(|abort| *abort) => return Some((closing(written), None)),
        };
        let failed = failed || line.error.is_some();
        Some((ndjson(&line), Some((lines, written + 1, failed, abort))))
    });
    let ndjson_type = [(header::CONTENT_TYPE, "application/x-ndjson")];
    (StatusCode::OK, ndjson_type, Body::from_stream(body)).into_response()
}

fn ndjson(line: &Line) -> Result<Bytes, std::convert::Infallible> {
    let mut bytes = serde_json::to_vec(line).expect("a line always serializes");
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}

fn stats_report(app: &AppState) -> StatsReport {
    let (stats, call) = (app.pipeline.stats(), &app.pipeline.machine().upstream);
    let limit = call.get_in_flight().expect("set in `Jobs::new`");
    let limiter = call.get_rate_limit().expect("set in `Jobs::new`");
    let c = call.get_stats().unwrap().snapshot();
    let attempts = (c.calls + c.retries).saturating_sub(c.rejected);
    let lines = app.lines.snapshot();
    let stages = stats.stages.iter().map(|(stage, s)| StageReport {
        stage: format!("{stage:?}"),
        runs: s.runs,
        errors: s.errors,
        mean_us: s.mean.as_micros() as u64,
        max_us: s.max.as_micros() as u64,
    });
    StatsReport {
        pipeline: PipelineReport {
            workers: app.pipeline.pool().workers(),
            groups_opened: stats.groups_opened,
            groups_open: stats.groups_open,
            requests_done: stats.requests_done,
            requests_failed: stats.requests_failed,
            stage_runs_running: app.pipeline.pool().busy(),
            stages: stages.collect(),
        },
        upstream: UpstreamLimits {
            in_flight: limit.in_use(),
            in_flight_limit: limit.limit(),
            calls: attempts,
            // Every attempt made ends as a success, a failure or a timeout, or is cancelled.
            failures: attempts.saturating_sub(c.successes + c.cancelled),
            retries: c.retries,
            timeouts: c.timeouts,
            rate_per_second: 1.0 / limiter.interval().as_secs_f64(),
            burst: limiter.burst_size(),
            rate_taken: attempts,
            rate_waited_ms: c.limiter_wait.as_millis() as u64,
            breaker: call.get_circuit_breaker().unwrap().state().to_string(),
            breaker_rejected: c.rejected,
            p50_us: c.p50.as_micros() as u64,
            p99_us: c.p99.as_micros() as u64,
        },
        server: ServerReport {
            jobs: stats.groups_opened,
            // A response's body owns its group's results: it is open while the group is.
            responses_open: stats.groups_open as usize,
            lines_ok: lines.items,
            lines_error: lines.errors,
        },
    }
}

async fn get_metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let s = stats_report(&app);
    let (p, u, server) = (s.pipeline, s.upstream, s.server);
    let mut out = String::new();
    for (name, value) in [
        ("groups_opened_total", p.groups_opened),
        ("groups_open", p.groups_open),
        ("requests_done_total", p.requests_done),
        ("requests_failed_total", p.requests_failed),
        ("upstream_in_flight", u.in_flight as u64),
        ("upstream_calls_total", u.calls),
        ("upstream_failures_total", u.failures),
        ("upstream_retries_total", u.retries),
        ("upstream_timeouts_total", u.timeouts),
        ("upstream_rate_waited_ms_total", u.rate_waited_ms),
        ("breaker_open", u64::from(u.breaker != "closed")),
        ("breaker_rejected_total", u.breaker_rejected),
        ("responses_open", server.responses_open as u64),
    ] {
        let kind = ["gauge", "counter"][usize::from(name.ends_with("_total"))];
        let _ = writeln!(
            out,
            "# TYPE stagepipe_{name} {kind}\nstagepipe_{name} {value}"
        );
    }
    let _ = writeln!(out, "# TYPE stagepipe_stage_runs_total counter");
    for st in &p.stages {
        let _ = writeln!(
            out,
            "stagepipe_stage_runs_total{{stage={:?}}} {}",
            st.stage, st.runs
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
