//! Three processes share one `RateLimiter::redis` budget: together they never exceed the
//! quota's bound in any window of one period, and together they reach the quota.
//!
//! The processes (`limiter_proc`) print the wall-clock instants of their releases; processes
//! on one machine share that clock (and Redis, on the same machine, reads it too), so the
//! instants of the three are comparable.

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stagepipe_queue::server::RedisServer;

const RATE: u64 = 50; // cells per second: one per 20 ms
const BURST: u64 = 5;
const MILLIS: u64 = 2_000;
const PROCS: usize = 3;

#[test]
fn three_processes_share_one_quota() {
    let server = RedisServer::start();
    let start_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        + Duration::from_millis(1_500).as_nanos();
    let children: Vec<_> = (0..PROCS)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_limiter_proc"))
                .args([
                    server.url(),
                    "fleet".to_string(),
                    RATE.to_string(),
                    BURST.to_string(),
                    MILLIS.to_string(),
                    "8".to_string(),
                    start_at.to_string(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("limiter_proc starts")
        })
        .collect();
    let mut releases: Vec<u128> = Vec::new();
    let mut starts = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("limiter_proc runs");
        assert!(
            out.status.success(),
            "limiter_proc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mine: Vec<u128> = text
            .lines()
            .filter(|l| !l.starts_with("round_trips"))
            .map(|l| l.parse().expect("a release instant"))
            .collect();
        assert!(!mine.is_empty(), "every process gets cells");
        starts.push((mine[0], *mine.last().unwrap()));
        releases.extend(mine);
    }
    releases.sort_unstable();
    // the three ran at the same time: each one's releases overlap every other's
    for (a, &(first_a, last_a)) in starts.iter().enumerate() {
        for &(first_b, last_b) in &starts[a + 1..] {
            assert!(
                first_a < last_b && first_b < last_a,
                "the processes did not run together"
            );
        }
    }

    let interval = 1_000_000_000 / RATE as u128; // ns
    let period = 1_000_000_000u128; // the quota's period: RATE cells per second
    // The documented bound: in any window of length T, at most burst + ⌊(T + D) / interval⌋
    // cells, D being how late a release comes after its Redis deadline. With T one period
    // and D below two intervals (40 ms here): burst + period / interval + 1.
    let bound = BURST as usize + (period / interval) as usize + 1;
    let mut worst = 0;
    for (i, &from) in releases.iter().enumerate() {
        let within = releases[i..].partition_point(|&r| r <= from + period);
        worst = worst.max(within);
    }
    assert!(
        worst <= bound,
        "{worst} releases in one period, the bound is {bound}"
    );

    // Together they reach the quota: over the span of the releases, at least 95% of the
    // cells the quota allows in it.
    let span = releases.last().unwrap() - releases.first().unwrap();
    let allowed = BURST as f64 + span as f64 / interval as f64;
    let got = releases.len() as f64;
    eprintln!(
        "{got} releases over {span} ns ({allowed:.1} allowed); at most {worst} in one period \
         (bound {bound})"
    );
    assert!(
        got >= 0.95 * allowed,
        "{got} releases over {span} ns: the quota allows {allowed}"
    );
    assert!(
        got <= allowed + 2.0,
        "{got} releases over {span} ns: more than the quota allows ({allowed})"
    );
    assert!(
        span >= Duration::from_millis(MILLIS).as_nanos() * 9 / 10,
        "the run lasted {span} ns"
    );
}
