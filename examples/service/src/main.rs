//! Drop a shared pipeline into a tokio service: one `Pipeline` behind an axum HTTP API, many
//! callers at once, one set of workers and one set of limits toward the upstream API.
//!
//! ```text
//! cargo run --release -p stagepipe-service                      # starts its own flaky upstream
//! cargo run --release -p stagepipe-service -- --upstream http://127.0.0.1:9000 --addr 127.0.0.1:3000
//! cargo run --release -p stagepipe-service -- --max-open-jobs 64 --admission-wait-ms 200 \
//!     --job-deadline-ms 5000 --max-items 10000
//!
//! curl -sN -X POST 'http://127.0.0.1:3000/jobs?on_error=continue&deadline_ms=2000' \
//!      -H 'content-type: application/json' -d '[1,2,3,-4,5]'
//! curl -s http://127.0.0.1:3000/stats
//! curl -s http://127.0.0.1:3000/metrics
//! curl -s -X POST 'http://UPSTREAM/control?down=true'        # switch the upstream down / up
//! ```
//!
//! Overload (see the `app` module): past `--max-open-jobs` open jobs a job is refused with 429
//! and a `Retry-After` (after waiting up to `--admission-wait-ms` for room); a job runs at most
//! `--job-deadline-ms` (or its `deadline_ms`, if shorter), then ends with a closing line; a job
//! of more than `--max-items` inputs is refused with 413.
//!
//! Ctrl-C (or SIGTERM) shuts down gracefully: no new connections or jobs, open jobs finish the
//! inputs already submitted (at the latest at the deadline) and say how many they abandoned,
//! then the process exits.

use std::time::Duration;

use stagepipe_service::app::{Config, Service};
use stagepipe_service::upstream::{Upstream, UpstreamConfig};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut addr = "127.0.0.1:3000".to_string();
    let mut upstream_url = None;
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let Some(value) = args.next() else {
            usage();
        };
        let number = || value.parse::<u64>().ok().filter(|n| *n > 0);
        match (arg.as_str(), number()) {
            ("--addr", _) => addr = value,
            ("--upstream", _) => upstream_url = Some(value),
            ("--max-open-jobs", Some(n)) => config.max_open_jobs = n as usize,
            ("--admission-wait-ms", _) if value == "0" => config.admission_wait = Duration::ZERO,
            ("--admission-wait-ms", Some(ms)) => config.admission_wait = Duration::from_millis(ms),
            ("--job-deadline-ms", Some(ms)) => config.job_deadline = Duration::from_millis(ms),
            ("--max-items", Some(n)) => config.max_items_per_job = n as usize,
            _ => usage(),
        }
    }

    // No upstream given: start a local flaky one (5 ms latency, 10% failures).
    let local = match upstream_url {
        Some(_) => None,
        None => Some(
            Upstream::start(UpstreamConfig {
                latency: Duration::from_millis(5),
                failure_rate: 0.1,
                ..UpstreamConfig::default()
            })
            .await?,
        ),
    };
    let upstream_url = upstream_url.unwrap_or_else(|| local.as_ref().unwrap().url());

    // It installs the Prometheus recorder before it creates any stagepipe handle.
    let service = Service::new(&Config {
        upstream: Some(upstream_url.clone()),
        ..config
    });
    let listener = TcpListener::bind(&addr).await?;
    let addr = listener.local_addr()?;
    println!(
        "upstream at {upstream_url} (control: POST {upstream_url}/control?down=true|false&failure_rate=0.3&latency_ms=5)"
    );
    println!("service at http://{addr}");
    println!(
        "  curl -sN -X POST 'http://{addr}/jobs?on_error=continue' -H 'content-type: application/json' -d '[1,2,3,-4,5]'"
    );
    println!("  curl -s http://{addr}/stats");
    println!("  curl -s http://{addr}/metrics");
    println!("Ctrl-C to stop.");

    service.clone().serve(listener, shutdown_signal()).await?;
    println!(
        "shut down; final figures:\n{}",
        serde_json::to_string_pretty(&service.stats()).unwrap()
    );
    if let Some(local) = local {
        local.stop().await;
    }
    Ok(())
}

fn usage() -> ! {
    eprintln!(
        "usage: stagepipe-service [--addr HOST:PORT] [--upstream URL] [--max-open-jobs N] \
         [--admission-wait-ms MS] [--job-deadline-ms MS] [--max-items N]"
    );
    std::process::exit(2);
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    println!(
        "shutting down: no new connections or jobs; open jobs finish what they submitted, until the deadline"
    );
}
