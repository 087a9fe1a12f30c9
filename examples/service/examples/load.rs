//! The service under about three times the load it can take, in this process, over real HTTP
//! on 127.0.0.1: 200 clients post jobs open loop (each on its own schedule, whether or not its
//! earlier jobs were answered, as independent callers do), for a fixed time.
//!
//! ```text
//! cargo run --release -p stagepipe-service --example load                 # load shedding on
//! cargo run --release -p stagepipe-service --example load -- --unbounded  # the same load, no shedding
//! cargo run --release -p stagepipe-service --example load -- --compare    # both, each in a process of its own
//! ```
//!
//! The capacity is set by the simulated upstream: `--latency-ms 10` per call, `--in-flight 8`
//! calls at once, so 800 inputs/s, or 80 jobs/s of `--inputs 10`; the clients post
//! `--overload 3` times that in all. Shedding is `--max-open-jobs 16` (about 0.2 s of work);
//! `--unbounded` lifts it (and the bound on pending inputs). Both keep a job deadline of
//! `--deadline-s 30`. Other options: `--clients 200`, `--seconds 10`, `--no-metrics` (a no-op
//! `metrics` recorder instead of the Prometheus one, to see what the metrics cost).
//!
//! Reported: jobs offered, admitted (200) and shed (429, with the `Retry-After` values told),
//! the p50/p99/max latency of the admitted jobs (post to last line), the peak resident memory of
//! the process (sampled from `/proc/self/statm` every 10 ms; `VmHWM` beside it) and the most
//! jobs open at once, with a timeline per second. Every admitted job's lines are checked: one
//! per input, in order, each the right answer, none repeated, or a closing line counting the
//! ones abandoned. The program exits non-zero if any job fails the check, or any request fails.

use std::error::Error;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stagepipe_service::app::{Config, Line, Service};
use stagepipe_service::upstream::{Upstream, UpstreamConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// The load and the service's set-up.
#[derive(Debug, Clone)]
struct Args {
    clients: u64,
    seconds: u64,
    inputs: u64,
    latency_ms: u64,
    in_flight: usize,
    overload: f64,
    max_open_jobs: usize,
    deadline_s: u64,
    unbounded: bool,
    compare: bool,
    no_metrics: bool,
}

impl Args {
    fn parse() -> Result<Self, String> {
        let mut args = Self {
            clients: 200,
            seconds: 10,
            inputs: 10,
            latency_ms: 10,
            in_flight: 8,
            overload: 3.0,
            max_open_jobs: 16,
            deadline_s: 30,
            unbounded: false,
            compare: false,
            no_metrics: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| format!("{arg} needs a value"))
                    .map(|v| v.to_string())
            };
            let bad = |e: &dyn std::fmt::Display| format!("{arg}: {e}");
            match arg.as_str() {
                "--clients" => args.clients = value()?.parse().map_err(|e| bad(&e))?,
                "--seconds" => args.seconds = value()?.parse().map_err(|e| bad(&e))?,
                "--inputs" => args.inputs = value()?.parse().map_err(|e| bad(&e))?,
                "--latency-ms" => args.latency_ms = value()?.parse().map_err(|e| bad(&e))?,
                "--in-flight" => args.in_flight = value()?.parse().map_err(|e| bad(&e))?,
                "--overload" => args.overload = value()?.parse().map_err(|e| bad(&e))?,
                "--max-open-jobs" => args.max_open_jobs = value()?.parse().map_err(|e| bad(&e))?,
                "--deadline-s" => args.deadline_s = value()?.parse().map_err(|e| bad(&e))?,
                "--unbounded" => args.unbounded = true,
                "--compare" => args.compare = true,
                "--no-metrics" => args.no_metrics = true,
                _ => {
                    return Err(format!(
                        "unknown argument {arg}; options: --clients N --seconds N --inputs N \
                         --latency-ms N --in-flight N --overload X --max-open-jobs N \
                         --deadline-s N --unbounded --compare --no-metrics"
                    ));
                }
            }
        }
        Ok(args)
    }

    /// Jobs per second the upstream can serve.
    fn capacity(&self) -> f64 {
        self.in_flight as f64 * 1000.0 / self.latency_ms as f64 / self.inputs as f64
    }

    fn mode(&self) -> &'static str {
        if self.unbounded {
            "no shedding"
        } else {
            "shedding"
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Summary {
    mode: String,
    offered: u64,
    admitted: u64,
    shed: u64,
    failed_requests: u64,
    /// Admitted jobs ended by their deadline (with a closing line).
    cut_by_deadline: u64,
    /// Admitted jobs whose lines failed the check.
    bad_jobs: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    peak_rss_mib: f64,
    vm_hwm_mib: f64,
    peak_open_jobs: usize,
    retry_after_min: u64,
    retry_after_max: u64,
    /// From the first post to the last answer.
    wall_s: f64,
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = if args.compare {
        compare()
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(run(args))
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs both modes, each in a process of its own (so each has its own peak memory), and
/// prints them side by side.
fn compare() -> Result<bool, Box<dyn Error>> {
    let exe = std::env::current_exe()?;
    let pass: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--compare")
        .collect();
    let mut summaries = Vec::new();
    let mut ok = true;
    for extra in [None, Some("--unbounded")] {
        let output = Command::new(&exe).args(&pass).args(extra).output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        print!("{stdout}");
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        ok &= output.status.success();
        let summary = stdout
            .lines()
            .find_map(|l| l.strip_prefix("SUMMARY "))
            .ok_or("a run printed no summary")?;
        summaries.push(serde_json::from_str::<Summary>(summary)?);
    }
    println!("\n| | {} | {} |", summaries[0].mode, summaries[1].mode);
    println!("|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Summary) -> String| {
        println!("| {name} | {} | {} |", f(&summaries[0]), f(&summaries[1]));
    };
    row("jobs offered", &|s| s.offered.to_string());
    row("admitted (200)", &|s| s.admitted.to_string());
    row("shed (429)", &|s| s.shed.to_string());
    row("cut by the deadline", &|s| s.cut_by_deadline.to_string());
    row("p50 / p99 / max latency of admitted jobs", &|s| {
        format!("{:.0} / {:.0} / {:.0} ms", s.p50_ms, s.p99_ms, s.max_ms)
    });
    row("most jobs open at once", &|s| s.peak_open_jobs.to_string());
    row("peak RSS (statm) / VmHWM", &|s| {
        format!("{:.1} / {:.1} MiB", s.peak_rss_mib, s.vm_hwm_mib)
    });
    row("first post to last answer", &|s| {
        format!("{:.1} s", s.wall_s)
    });
    row("jobs failing the check", &|s| s.bad_jobs.to_string());
    Ok(ok)
}

/// One job's outcome, as its client saw it.
enum Outcome {
    Admitted {
        latency: Duration,
        cut_by_deadline: bool,
        check: Result<(), String>,
    },
    Shed {
        retry_after: u64,
    },
    Failed(String),
}

async fn run(args: Args) -> Result<bool, Box<dyn Error>> {
    let rss = RssSampler::start();
    if args.no_metrics {
        // Before the service installs its Prometheus recorder: every metric goes nowhere.
        metrics::set_global_recorder(metrics::NoopRecorder)?;
    }
    let upstream = Upstream::start(UpstreamConfig {
        latency: Duration::from_millis(args.latency_ms),
        ..UpstreamConfig::default()
    })
    .await?;
    let unbounded = |bound: usize| if args.unbounded { usize::MAX } else { bound };
    let config = Config {
        upstream: Some(upstream.url()),
        workers: 64,
        upstream_in_flight: args.in_flight,
        upstream_timeout: Duration::from_secs(60),
        rate_per_second: 1_000_000,
        burst: 1_000,
        breaker_threshold: u32::MAX,
        retry_attempts: 1,
        max_open_jobs: unbounded(args.max_open_jobs),
        max_pending_inputs: unbounded(args.max_open_jobs * args.inputs as usize),
        job_deadline: Duration::from_secs(args.deadline_s),
        ..Config::default()
    };
    let service = Service::new(&config);
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}/jobs", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(service.clone().serve(listener, async move {
        let _ = stopped.await;
    }));

    let capacity = args.capacity();
    let rate = capacity * args.overload;
    let every = Duration::from_secs_f64(args.clients as f64 / rate);
    println!(
        "{}: {} clients, {rate:.0} jobs/s of {} inputs for {} s ({:.1}x the capacity of {capacity:.0} jobs/s: \
         upstream {} ms x {} in flight); max_open_jobs {}, deadline {} s",
        args.mode(),
        args.clients,
        args.inputs,
        args.seconds,
        args.overload,
        args.latency_ms,
        args.in_flight,
        if args.unbounded {
            "none".to_string()
        } else {
            args.max_open_jobs.to_string()
        },
        args.deadline_s,
    );

    // The clients: each posts a job every `every`, starting at its own offset.
    let (done, mut outcomes) = mpsc::unbounded_channel::<Outcome>();
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let offered = Arc::new(AtomicU64::new(0));
    for c in 0..args.clients {
        let (done, offered, url) = (done.clone(), offered.clone(), url.clone());
        let inputs = args.inputs;
        let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let mut next = start + every.mul_f64(c as f64 / args.clients as f64);
        tokio::spawn(async move {
            let mut k = 0i64;
            while next < end {
                tokio::time::sleep_until(next).await;
                let base = c as i64 * 1_000_000_000 + k * 1_000;
                let job: Vec<i64> = (0..inputs as i64).map(|i| base + i).collect();
                let (client, url, done) = (client.clone(), url.clone(), done.clone());
                offered.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = done.send(one_job(&client, &url, job).await);
                });
                next += every;
                k += 1;
            }
        });
    }
    drop(done);

    // A timeline per second while the jobs run, and the most jobs open at once.
    let peak_open = Arc::new(AtomicU64::new(0));
    let timeline = {
        let (service, peak_open, rss) = (service.clone(), peak_open.clone(), rss.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for n in 0u64.. {
                tick.tick().await;
                let s = service.stats();
                peak_open.fetch_max(s.pipeline.groups_open, Ordering::Relaxed);
                if n % 10 == 0 {
                    println!(
                        "  t={:>3} s  open jobs {:>5}  pending inputs {:>6}  admitted {:>6}  shed {:>6}  deadline {:>4}  RSS {:>6.1} MiB",
                        n / 10,
                        s.pipeline.groups_open,
                        s.pipeline.requests_pending,
                        s.pipeline.groups_opened,
                        s.pipeline.groups_refused,
                        s.server.jobs_deadline_exceeded,
                        rss.now_mib(),
                    );
                }
            }
        })
    };

    let (mut latencies, mut retry_afters) = (Vec::new(), Vec::new());
    let (mut cut, mut bad, mut failed) = (0u64, 0u64, 0u64);
    let mut last_answer = start;
    while let Some(outcome) = outcomes.recv().await {
        match outcome {
            Outcome::Admitted {
                latency,
                cut_by_deadline,
                check,
            } => {
                latencies.push(latency);
                cut += u64::from(cut_by_deadline);
                if let Err(e) = check {
                    bad += 1;
                    if bad <= 5 {
                        eprintln!("a job failed the check: {e}");
                    }
                }
            }
            Outcome::Shed { retry_after } => retry_afters.push(retry_after),
            Outcome::Failed(e) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("a request failed: {e}");
                }
            }
        }
        last_answer = tokio::time::Instant::now();
    }
    timeline.abort();
    let _ = stop.send(());
    server.await??;
    upstream.stop().await;

    latencies.sort();
    retry_afters.sort();
    let ms = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let stats = service.stats();
    let summary = Summary {
        mode: args.mode().to_string(),
        offered: offered.load(Ordering::Relaxed),
        admitted: latencies.len() as u64,
        shed: retry_afters.len() as u64,
        failed_requests: failed,
        cut_by_deadline: cut,
        bad_jobs: bad,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
        peak_rss_mib: rss.peak_mib(),
        vm_hwm_mib: vm_hwm_mib(),
        peak_open_jobs: peak_open.load(Ordering::Relaxed) as usize,
        retry_after_min: retry_afters.first().copied().unwrap_or(0),
        retry_after_max: retry_afters.last().copied().unwrap_or(0),
        wall_s: last_answer.duration_since(start).as_secs_f64(),
    };
    rss.stop();
    let s = &summary;
    let told = if s.shed > 0 {
        format!(
            " (Retry-After {}..={} s)",
            s.retry_after_min, s.retry_after_max
        )
    } else {
        String::new()
    };
    println!(
        "offered {} jobs: admitted {} ({:.0} jobs/s served), shed {}{told}, failed requests {}",
        s.offered,
        s.admitted,
        s.admitted as f64 / s.wall_s,
        s.shed,
        s.failed_requests,
    );
    println!(
        "admitted jobs: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} cut by the deadline; {} failed the check",
        s.p50_ms, s.p99_ms, s.max_ms, s.cut_by_deadline, s.bad_jobs
    );
    println!(
        "peak RSS {:.1} MiB (statm, every 10 ms; VmHWM {:.1} MiB); most jobs open at once {}",
        s.peak_rss_mib, s.vm_hwm_mib, s.peak_open_jobs
    );
    println!(
        "service: {} groups opened, {} inputs done, {} shed, {} ended by the deadline",
        stats.pipeline.groups_opened,
        stats.pipeline.requests_done,
        stats.pipeline.groups_refused,
        stats.server.jobs_deadline_exceeded
    );
    println!("SUMMARY {}", serde_json::to_string(&summary)?);
    let consistent =
        stats.pipeline.groups_opened == s.admitted && stats.pipeline.groups_refused == s.shed;
    if !consistent {
        eprintln!("the service's figures disagree with the clients'");
    }
    Ok(bad == 0 && failed == 0 && consistent)
}

/// Posts one job and reads its answer to the end.
async fn one_job(client: &reqwest::Client, url: &str, inputs: Vec<i64>) -> Outcome {
    let posted = Instant::now();
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&inputs).expect("numbers serialize"))
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(e) => return Outcome::Failed(format!("post: {e}")),
    };
    match response.status().as_u16() {
        200 => {}
        429 => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            return match retry_after {
                Some(retry_after) => Outcome::Shed { retry_after },
                None => Outcome::Failed("a 429 without a Retry-After in seconds".into()),
            };
        }
        status => return Outcome::Failed(format!("status {status}")),
    }
    // Copy each chunk out as it comes: a chunk can pin the whole read buffer it was cut from,
    // and holding those until the job ends would measure the client's memory, not the
    // service's.
    let mut body = Vec::new();
    let mut response = response;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => return Outcome::Failed(format!("body: {e}")),
        }
    }
    let latency = posted.elapsed();
    let (check, cut_by_deadline) = match check(&inputs, &body) {
        Ok(cut) => (Ok(()), cut),
        Err(e) => (Err(e), false),
    };
    Outcome::Admitted {
        latency,
        cut_by_deadline,
        check,
    }
}

/// Checks a job's answer: a line per input in order, each `2x + 1`, none repeated, none
/// missing unless a closing line counts it. `Ok(true)` if a deadline's closing line ended it.
fn check(inputs: &[i64], body: &[u8]) -> Result<bool, String> {
    let mut lines = Vec::new();
    for raw in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let line: Line = serde_json::from_slice(raw).map_err(|e| format!("not a line: {e}"))?;
        lines.push(line);
    }
    let closing = match lines.last() {
        Some(last) if last.abandoned.is_some() => lines.pop(),
        _ => None,
    };
    for (i, line) in lines.iter().enumerate() {
        let x = *inputs
            .get(i)
            .ok_or_else(|| format!("{} lines for {} inputs", lines.len(), inputs.len()))?;
        if line.index != Some(i) || line.input != Some(x) {
            return Err(format!("line {i} is {line:?}, for input {x}"));
        }
        if line.output != Some(2 * x + 1) {
            return Err(format!("line {i} is {line:?}, expected {}", 2 * x + 1));
        }
    }
    match closing {
        None if lines.len() == inputs.len() => Ok(false),
        None => Err(format!(
            "{} lines for {} inputs and no closing line",
            lines.len(),
            inputs.len()
        )),
        Some(closing) if closing.abandoned == Some(inputs.len() - lines.len()) => {
            let error = closing.error.unwrap_or_default();
            Ok(error.contains("deadline"))
        }
        Some(closing) => Err(format!(
            "{} lines, closing {closing:?}, for {} inputs",
            lines.len(),
            inputs.len()
        )),
    }
}

/// Samples the resident memory of the process (`/proc/self/statm`) on a thread of its own,
/// every 10 ms, keeping the peak.
#[derive(Clone)]
struct RssSampler {
    peak_pages: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    page_size: u64,
}

impl RssSampler {
    fn start() -> Self {
        let sampler = Self {
            peak_pages: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            page_size: page_size(),
        };
        let s = sampler.clone();
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                s.peak_pages.fetch_max(resident_pages(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        sampler
    }

    fn now_mib(&self) -> f64 {
        mib(resident_pages() * self.page_size)
    }

    fn peak_mib(&self) -> f64 {
        let peak = self
            .peak_pages
            .load(Ordering::Relaxed)
            .max(resident_pages());
        mib(peak * self.page_size)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident pages now: the second field of `/proc/self/statm`; 0 where there is none.
fn resident_pages() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The page size, from the auxiliary vector (`AT_PAGESZ`); 4 KiB if it cannot be read.
fn page_size() -> u64 {
    const AT_PAGESZ: u64 = 6;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 4096;
    };
    let words: Vec<u64> = auxv
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")))
        .collect();
    words
        .chunks_exact(2)
        .find(|pair| pair[0] == AT_PAGESZ)
        .map_or(4096, |pair| pair[1])
}

/// The kernel's own peak resident memory of the process (`VmHWM`), in MiB; 0 where none.
fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0.0, |kib| mib(kib * 1024))
}
