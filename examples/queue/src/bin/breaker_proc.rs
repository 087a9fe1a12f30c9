//! One process of a fleet sharing a circuit breaker in Redis, for `tests/breaker_fleet.rs`.
//!
//! `breaker_proc URL NAME THRESHOLD OPEN_FOR_MS LEASE_MS COMMAND [N]` makes a
//! [`CircuitBreaker::redis`](stagepipe::CircuitBreaker::redis) handle named `NAME` (opening
//! after `THRESHOLD` consecutive failures, for `OPEN_FOR_MS`, with a trial lease of
//! `LEASE_MS`), prints `ready`, then runs `COMMAND`:
//!
//! * `fail N`: `N` failing calls, printing `failed` or `rejected` for each;
//! * `probe`: one succeeding call, printing `admitted` or `rejected`;
//! * `trial`: waits for a line `go` on stdin, then makes one call: if the breaker admits it, it
//!   prints `admitted` and waits for a line on stdin, `ok` (the call succeeds) or `fail`;
//!   otherwise it prints `rejected`.
//!
//! Then it prints `state S`, the state the handle saw last (`closed`, `open` or `half-open`).

use std::io::{BufRead, Write};
use std::time::Duration;

use stagepipe::{BreakerError, CircuitBreaker};
use tokio::sync::mpsc;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i}: {what}"))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

/// The lines of stdin, read on a thread of their own.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn outcome<U, E>(result: &Result<U, BreakerError<(), E>>) -> &'static str {
    match result {
        Ok(_) => "admitted",
        Err(BreakerError::Open(())) => "rejected",
        Err(BreakerError::Failed(_)) => "failed",
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 7 {
        eprintln!(
            "usage: breaker_proc URL NAME THRESHOLD OPEN_FOR_MS LEASE_MS (fail N | probe | trial)"
        );
        std::process::exit(2);
    }
    let url = &args[1];
    let name = &args[2];
    let threshold: u32 = arg(&args, 3, "THRESHOLD (> 0)");
    let open_for = Duration::from_millis(arg(&args, 4, "OPEN_FOR_MS (> 0)"));
    let lease = Duration::from_millis(arg(&args, 5, "LEASE_MS (> 0)"));
    let conn = stagepipe::redis::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let breaker = CircuitBreaker::redis(&conn, name, threshold, open_for).trial_lease(lease);
    say("ready");

    let mut stdin = stdin_lines();
    match args[6].as_str() {
        "fail" => {
            let n: u32 = arg(&args, 7, "N, how many failing calls");
            for _ in 0..n {
                let r = breaker.call(async { Err::<(), _>("down") }).await;
                say(outcome(&r));
            }
        }
        "probe" => {
            let r = breaker.call(async { Ok::<_, &str>(()) }).await;
            say(outcome(&r));
        }
        "trial" => {
            let go = stdin.recv().await;
            assert_eq!(go.as_deref(), Some("go"), "expected `go` on stdin");
            let r = breaker
                .call(async {
                    say("admitted");
                    match stdin.recv().await.as_deref() {
                        Some("fail") => Err("told to fail"),
                        _ => Ok(()),
                    }
                })
                .await;
            if !matches!(r, Ok(())) {
                say(outcome(&r));
            }
        }
        other => panic!("unknown command {other:?}"),
    }
    say(&format!("state {}", breaker.state()));
}
