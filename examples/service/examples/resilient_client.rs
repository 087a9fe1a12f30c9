//! A resilient client as one chain: read lines → parse them in parallel, in order → call a
//! flaky upstream through one `Call` (rate limit, timeout, circuit breaker, retries, stats), 20
//! at once, in order → batches of 100 → write them → print the call's stats.
//!
//! ```text
//! cargo run -p stagepipe-service --example resilient_client      # embedded sample, simulated upstream
//! cargo run -p stagepipe-service --example resilient_client -- numbers.txt --out doubled.txt --upstream http://127.0.0.1:PORT
//! ```
//!
//! It lives beside the service, whose crate has the HTTP client it uses: `--upstream` takes the
//! flaky upstream the service (`cargo run -p stagepipe-service`) starts (it prints its URL):
//! `GET URL/work?x=N` answers `2 * N`, or 503. Without it, a simulated upstream in this process
//! answers the same way: one attempt in 8 fails, one in 60 hangs past the timeout.

use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Cursor, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryFutureExt, TryStreamExt, stream};
use stagepipe::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let (mut path, mut out, mut upstream) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next(),
            "--upstream" => upstream = args.next(),
            _ if !arg.starts_with("--") => path = Some(arg),
            _ => return Err("usage: resilient_client [FILE] [--out FILE] [--upstream URL]".into()),
        }
    }
    let input: Box<dyn BufRead + Send> = match &path {
        Some(path) => Box::new(BufReader::new(File::open(path)?)),
        None => Box::new(Cursor::new(sample())),
    };
    let mut output: Box<dyn Write> = match &out {
        Some(path) => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        None => Box::new(std::io::stdout()),
    };

    let (client, attempts) = (reqwest::Client::new(), Arc::new(AtomicU64::new(0)));
    let stats = CallStats::new("upstream");
    let call = Call::new(move |x: i64| {
        let (client, url) = (client.clone(), upstream.clone());
        let attempt = attempts.fetch_add(1, Ordering::Relaxed);
        async move {
            match url {
                Some(url) => fetch(&client, &url, x).await,
                None => simulated(attempt, x).await,
            }
        }
    })
    .timeout(Duration::from_millis(250))
    .rate_limit(RateLimiter::per_second(1000).burst(20))
    .circuit_breaker(CircuitBreaker::new(10, Duration::from_millis(500)))
    .retry(
        Backoff::exponential(Duration::from_millis(5))
            .max_attempts(4)
            .jitter(),
    )
    .stats(&stats);

    let mut batches = stream::iter(input.lines())
        .map_err(|e| e.to_string())
        .try_fan_out_ordered(2, |line| async move {
            line.trim()
                .parse::<i64>()
                .map_err(|e| format!("line {line:?}: {e}"))
        })
        .try_in_flight_ordered(20, move |x| call.run(x).map_err(move |e| why(x, e)))
        .try_batch(100, Duration::from_millis(50));
    while let Some(batch) = batches.next().await {
        match batch {
            Ok(values) => values.iter().try_for_each(|y| writeln!(output, "{y}"))?,
            Err(e) => eprintln!("skipped: {e}"),
        }
    }
    output.flush()?;
    eprintln!("{}", stats.snapshot());
    Ok(())
}

/// Why the call for `x` gave up, with the upstream's own error if it answered one.
fn why(x: i64, e: CallError<String>) -> String {
    match e.inner() {
        Some(inner) => format!("{x}: {e}: {inner}"),
        None => format!("{x}: {e}"),
    }
}

/// `GET {url}/work?x=N` on the service example's upstream: `2 * N`, or an error.
async fn fetch(client: &reqwest::Client, url: &str, x: i64) -> Result<i64, String> {
    let response = client.get(format!("{url}/work?x={x}")).send().await;
    let response = response.map_err(|e| e.to_string())?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("upstream answered {status}: {text}"));
    }
    text.trim()
        .parse()
        .map_err(|e| format!("upstream answered {text:?}: {e}"))
}

/// The same upstream, simulated: 2 ms per attempt; attempt 3 of every 8 fails, attempt 50 of
/// every 60 hangs for 10 s (the timeout cuts it short).
async fn simulated(attempt: u64, x: i64) -> Result<i64, String> {
    let hang = attempt % 60 == 50;
    tokio::time::sleep(Duration::from_millis(if hang { 10_000 } else { 2 })).await;
    match attempt % 8 {
        3 => Err("upstream answered 503 Service Unavailable".to_string()),
        _ => Ok(x * 2),
    }
}

/// The embedded input: the numbers 1 to 250, and two lines that are not numbers.
fn sample() -> String {
    let mut lines: Vec<String> = (1..=250).map(|n| n.to_string()).collect();
    lines.insert(41, "forty-two".to_string());
    lines.insert(170, String::new());
    lines.join("\n")
}
