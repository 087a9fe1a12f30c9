//! What the service's test files share: a service and its upstream on 127.0.0.1 at ephemeral
//! ports, a client, an NDJSON reader, and the expected lines.
//!
//! Every wait is a poll for a condition or a read, bounded by a deadline on tokio's clock: real
//! time in the multi-threaded tests, virtual time in the paused-clock ones.

#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use stagepipe_service::app::{Config, Line, Service, StatsReport};
use stagepipe_service::upstream::{Upstream, UpstreamConfig, UpstreamReport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// Every test is bounded: a hang fails the test instead of the run.
pub async fn bounded<F: Future<Output = ()>>(test: F) {
    timeout(Duration::from_secs(120), test)
        .await
        .expect("the test finishes within 120 s");
}

/// Waits until `check` holds, polling; fails after 20 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// A service under test, its upstream and a client.
pub struct Harness {
    pub upstream: Upstream,
    pub service: Service,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

/// Limits that never bind unless a test sets them.
pub fn open_config() -> Config {
    Config {
        upstream: None,
        workers: 32,
        upstream_in_flight: 8,
        upstream_timeout: Duration::from_secs(10),
        rate_per_second: 1_000_000,
        burst: 1_000,
        breaker_threshold: 1_000_000,
        breaker_open_for: Duration::from_secs(1),
        retry_attempts: 1,
        retry_initial: Duration::from_millis(1),
        job_window: 256,
        shutdown_deadline: Duration::from_secs(30),
        max_open_jobs: usize::MAX,
        max_pending_inputs: usize::MAX,
        admission_wait: Duration::ZERO,
        job_deadline: Duration::MAX,
        max_items_per_job: 100_000,
        retry_after_max: Duration::from_secs(30),
    }
}

impl Harness {
    pub async fn start(mut config: Config, upstream: UpstreamConfig) -> Self {
        let upstream = Upstream::start(upstream).await.expect("upstream starts");
        config.upstream = Some(upstream.url());
        let service = Service::new(&config);
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(service.clone().serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            upstream,
            service,
            addr,
            client: reqwest::Client::new(),
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /jobs?on_error=..`: the response, headers read.
    pub async fn post(&self, inputs: &[i64], on_error: &str) -> reqwest::Response {
        self.post_query(inputs, &format!("on_error={on_error}"))
            .await
    }

    /// `POST /jobs?{query}`: the response, headers read.
    pub async fn post_query(&self, inputs: &[i64], query: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/jobs?{query}")))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(inputs).unwrap())
            .send()
            .await
            .expect("the service answers")
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(content_type, "text/plain; version=0.0.4");
        response.text().await.unwrap()
    }

    /// Posts a job and reads every line; the response must end cleanly.
    pub async fn job(&self, inputs: &[i64], on_error: &str) -> Vec<Line> {
        let response = self.post(inputs, on_error).await;
        assert_eq!(response.status(), 200);
        let mut reader = Reader::new(response);
        let mut lines = Vec::new();
        while let Some(line) = reader.next().await.expect("the body ends cleanly") {
            lines.push(line);
        }
        lines
    }

    /// `GET /stats`, over HTTP.
    pub async fn stats(&self) -> StatsReport {
        self.client
            .get(self.url("/stats"))
            .send()
            .await
            .unwrap()
            .json_body()
            .await
    }

    /// `GET /control` on the upstream, over HTTP.
    pub async fn upstream_report(&self) -> UpstreamReport {
        self.client
            .get(format!("{}/control", self.upstream.url()))
            .send()
            .await
            .unwrap()
            .json_body()
            .await
    }

    /// Switches the upstream down or up through its control endpoint.
    pub async fn set_upstream_down(&self, down: bool) {
        let response = self
            .client
            .post(format!("{}/control?down={down}", self.upstream.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(self.upstream.report().down, down);
    }

    /// Waits until nothing is open or running anywhere in the service; its last `/stats`.
    pub async fn settled(&self) -> StatsReport {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.stats().await;
            if s.pipeline.groups_open == 0 && s.stage_runs_running == 0 && s.limits.in_flight == 0 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not settle: {s:?}"
            );
            sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn begin_shutdown(&mut self) {
        let _ = self.stop.take().unwrap().send(());
    }

    /// Waits for the server task to return.
    pub async fn server_exit(&mut self) -> std::io::Result<()> {
        timeout(Duration::from_secs(20), self.server.take().unwrap())
            .await
            .expect("the server exits")
            .expect("the server task does not panic")
    }
}

pub trait JsonBody {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> T;
}

impl JsonBody for reqwest::Response {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> T {
        assert_eq!(self.status(), 200);
        let bytes = self.bytes().await.unwrap();
        serde_json::from_slice(&bytes).expect("valid JSON")
    }
}

/// Reads an NDJSON body line by line as chunks arrive.
pub struct Reader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Reader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next whole line, `Ok(None)` at a clean end; a partial line at the end is an error.
    pub async fn next(&mut self) -> Result<Option<Line>, String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| format!("not a whole line: {e}"));
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) if self.buffer.is_empty() => return Ok(None),
                Ok(None) => return Err("half-written line at the end".to_string()),
                Err(e) => return Err(format!("body error: {e}")),
            }
        }
    }
}

pub fn ok_line(index: usize, input: i64) -> Line {
    Line {
        index: Some(index),
        input: Some(input),
        output: Some(2 * input + 1),
        error: None,
        abandoned: None,
    }
}

/// Client `c`'s inputs: distinct across clients, so a result in the wrong response shows.
pub fn inputs_of(client: i64, n: i64) -> Vec<i64> {
    (0..n).map(|i| client * 1_000_000 + i).collect()
}

/// Reads a response to its end: its result lines, then its closing line if it has one.
pub async fn read_to_end(reader: &mut Reader) -> (Vec<Line>, Option<Line>) {
    let mut lines = Vec::new();
    while let Some(line) = reader.next().await.expect("a clean end, every line whole") {
        lines.push(line);
    }
    let closing = match lines.last() {
        Some(last) if last.abandoned.is_some() => lines.pop(),
        _ => None,
    };
    (lines, closing)
}

/// The closing line of a job cut short by a shutdown, `abandoned` inputs left without a line.
pub fn closing_line(abandoned: usize) -> Line {
    Line {
        error: Some("the server shut down before this job finished".to_string()),
        abandoned: Some(abandoned),
        ..Line::default()
    }
}
