//! One process of a fleet sharing a rate limit in Redis, for `tests/limiter_fleet.rs`.
//!
//! `limiter_proc URL NAME RATE BURST MILLIS [WAITERS] [START_AT_NS]` makes a
//! [`RateLimiter::redis`](stagepipe::RateLimiter::redis) handle named `NAME` with a quota of
//! `RATE` cells per second and a burst of `BURST`, waits until the wall clock reaches
//! `START_AT_NS` (nanoseconds since the Unix epoch; default: now), then runs `WAITERS` tasks
//! (default 8) that each take cells with `until_ready` for `MILLIS` milliseconds. It prints the
//! wall-clock instant (`CLOCK_REALTIME`, nanoseconds since the epoch) at which each cell was
//! released, one per line, then `round_trips N`. Processes on one machine share that clock.

use std::num::NonZeroU32;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stagepipe::{Quota, RateLimiter};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos()
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i}: {what}"))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: limiter_proc URL NAME RATE BURST MILLIS [WAITERS] [START_AT_NS]");
        std::process::exit(2);
    }
    let url = &args[1];
    let name = &args[2];
    let rate: NonZeroU32 = arg(&args, 3, "RATE, cells per second (> 0)");
    let burst: NonZeroU32 = arg(&args, 4, "BURST (> 0)");
    let millis: u64 = arg(&args, 5, "MILLIS, how long to run");
    let waiters: usize = args.get(6).map_or(8, |_| arg(&args, 6, "WAITERS"));
    let start_at: u128 = args.get(7).map_or(0, |_| arg(&args, 7, "START_AT_NS"));

    let conn = stagepipe::redis::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let limiter = RateLimiter::redis(&conn, name, Quota::per_second(rate).allow_burst(burst));

    let wait = start_at.saturating_sub(now_ns());
    tokio::time::sleep(Duration::from_nanos(
        u64::try_from(wait).unwrap_or(u64::MAX),
    ))
    .await;
    let end = tokio::time::Instant::now() + Duration::from_millis(millis);

    let tasks: Vec<_> = (0..waiters)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let mut released = Vec::new();
                while tokio::time::Instant::now() < end {
                    limiter.until_ready().await;
                    released.push(now_ns());
                }
                released
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("a waiter task"));
    }
    all.sort_unstable();
    let mut out = String::new();
    for at in all {
        out.push_str(&format!("{at}\n"));
    }
    out.push_str(&format!(
        "round_trips {}\n",
        limiter.round_trips().unwrap_or(0)
    ));
    print!("{out}");
}
