//! A small, deliberately flaky upstream HTTP API: the system behind the service.
//!
//! `GET /work?x=N` answers `2 * N` as text after an injectable latency, or fails with 503 at an
//! injectable rate (decided by a deterministic hash of the call's number, so a run is
//! reproducible), or always while it is switched down. `POST /control` changes the behaviour
//! at run time (`?latency_ms=5&failure_rate=0.3&down=true`); `GET /control` reports what the
//! upstream has seen as JSON: calls, failures, the most concurrent calls and the most calls in
//! any window of `window_ms`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How the upstream behaves; every field can be changed at run time.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamConfig {
    /// Latency of every call.
    pub latency: Duration,
    /// Share of calls that fail with 503, in `0.0..=1.0`.
    pub failure_rate: f64,
    /// The window over which the most calls are counted (`max_per_window`).
    pub window: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(2),
            failure_rate: 0.0,
            window: Duration::from_secs(1),
        }
    }
}

/// What the upstream has seen, from `GET /control` or [`Upstream::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamReport {
    /// Calls received (failed ones included).
    pub calls: u64,
    /// Calls answered with an error (injected failures and calls while down).
    pub failures: u64,
    /// Calls being served now.
    pub in_flight: usize,
    /// The most calls served at once.
    pub max_in_flight: usize,
    /// The most calls that arrived within any one window of `window_ms`.
    pub max_per_window: u64,
    /// The counting window, in milliseconds.
    pub window_ms: u64,
    /// Whether the upstream is switched down.
    pub down: bool,
}

struct Shared {
    latency_us: AtomicU64,
    /// Failure rate in parts per million.
    failure_ppm: AtomicU64,
    down: AtomicBool,
    calls: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    window: Duration,
    /// Arrivals within the last window (bounded by the rate the upstream is called at).
    arrivals: Mutex<(VecDeque<Instant>, u64)>,
}

impl Shared {
    fn arrive(&self) -> u64 {
        let now = Instant::now();
        let mut guard = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let (recent, max) = &mut *guard;
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            recent.pop_front();
        }
        recent.push_back(now);
        *max = (*max).max(recent.len() as u64);
        self.calls.fetch_add(1, Ordering::Relaxed)
    }

    fn report(&self) -> UpstreamReport {
        UpstreamReport {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
            max_per_window: self.arrivals.lock().unwrap_or_else(|e| e.into_inner()).1,
            window_ms: self.window.as_millis() as u64,
            down: self.down.load(Ordering::Relaxed),
        }
    }
}

/// Counts a call as in flight while it lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running upstream server; dropping it (or [`Upstream::stop`]) stops it.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Upstream {
    /// Starts an upstream on `127.0.0.1` at an ephemeral port.
    pub async fn start(config: UpstreamConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        // Each answer leaves as it is written.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let shared = Arc::new(Shared {
            latency_us: AtomicU64::new(config.latency.as_micros() as u64),
            failure_ppm: AtomicU64::new(ppm(config.failure_rate)),
            down: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            window: config.window,
            arrivals: Mutex::new((VecDeque::new(), 0)),
        });
        let router = Router::new()
            .route("/work", get(work))
            .route("/control", get(report).post(control))
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            let _ = serve.await;
        });
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the upstream has seen so far.
    pub fn report(&self) -> UpstreamReport {
        self.shared.report()
    }

    /// Switches the upstream fully down (every call fails) or back up.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Relaxed);
    }

    /// Changes the latency of every call.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Changes the share of calls that fail.
    pub fn set_failure_rate(&self, rate: f64) {
        self.shared.failure_ppm.store(ppm(rate), Ordering::Relaxed);
    }

    /// Stops accepting calls and waits for the server task to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn ppm(rate: f64) -> u64 {
    (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u64
}

/// A well-mixed hash of the call's number (splitmix64): which calls fail is reproducible.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Deserialize)]
struct WorkQuery {
    x: i64,
}

async fn work(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<WorkQuery>,
) -> (StatusCode, String) {
    let n = shared.arrive();
    let _in_flight = InFlight::enter(&shared);
    let latency = shared.latency_us.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_micros(latency)).await;
    }
    let down = shared.down.load(Ordering::Relaxed);
    let fail = mix(n) % 1_000_000 < shared.failure_ppm.load(Ordering::Relaxed);
    if down || fail {
        shared.failures.fetch_add(1, Ordering::Relaxed);
        let why = if down { "down" } else { "injected failure" };
        return (StatusCode::SERVICE_UNAVAILABLE, why.to_string());
    }
    (StatusCode::OK, q.x.wrapping_mul(2).to_string())
}

async fn report(State(shared): State<Arc<Shared>>) -> axum::Json<UpstreamReport> {
    axum::Json(shared.report())
}

#[derive(Deserialize)]
struct ControlQuery {
    latency_ms: Option<u64>,
    failure_rate: Option<f64>,
    down: Option<bool>,
}

async fn control(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<ControlQuery>,
) -> axum::Json<UpstreamReport> {
    if let Some(ms) = q.latency_ms {
        shared.latency_us.store(ms * 1000, Ordering::Relaxed);
    }
    if let Some(rate) = q.failure_rate {
        shared.failure_ppm.store(ppm(rate), Ordering::Relaxed);
    }
    if let Some(down) = q.down {
        shared.down.store(down, Ordering::Relaxed);
    }
    axum::Json(shared.report())
}
