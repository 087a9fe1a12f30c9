//! A circuit breaker shared through Redis by several processes (`breaker_proc`): opened by
//! failures in one, it rejects in another; after `open_for`, exactly one trial runs across the
//! processes; a trial holder that is killed does not wedge the breaker.
//!
//! Runs against `$STAGEPIPE_TEST_REDIS` if set (`scripts/with-redis`), else a private server.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use redis::AsyncCommands;
use stagepipe_queue::server::RedisServer;

const GUARD: Duration = Duration::from_secs(30);

/// The shared test server, or a private one kept alive by the returned guard.
fn redis_url() -> (String, Option<RedisServer>) {
    match std::env::var("STAGEPIPE_TEST_REDIS") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = RedisServer::start();
            (server.url(), Some(server))
        }
    }
}

fn unique(test: &str) -> String {
    format!("{test}-{}-{}", std::process::id(), fastrand_u64())
}

/// A random-enough suffix without a dependency: the clock's nanoseconds.
fn fastrand_u64() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A running `breaker_proc`: its stdin, and its stdout lines arriving on a channel.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn start(url: &str, name: &str, config: [u64; 3], command: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_breaker_proc"))
            .arg(url)
            .arg(name)
            .args(config.map(|v| v.to_string()))
            .args(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("breaker_proc starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc {
            child,
            stdin,
            lines,
        }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(GUARD)
            .expect("breaker_proc prints a line")
    }

    fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("breaker_proc reads stdin");
        stdin.flush().unwrap();
    }

    /// The rest of its output, once it has exited.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "breaker_proc failed: {status}");
        self.lines.iter().collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to its end: all its lines after `ready`.
fn run(url: &str, name: &str, config: [u64; 3], command: &[&str]) -> Vec<String> {
    let p = Proc::start(url, name, config, command);
    assert_eq!(p.line(), "ready");
    p.finish()
}

async fn conn(url: &str) -> redis::aio::ConnectionManager {
    stagepipe::redis::connect(url).await.unwrap()
}

/// Waits until the opening recorded in Redis has ended on Redis's own clock.
async fn until_half_open(url: &str, name: &str) {
    let mut c = conn(url).await;
    let until: i64 = c
        .hget(format!("stagepipe:breaker:{{{name}}}"), "until")
        .await
        .unwrap();
    tokio::time::timeout(GUARD, async {
        loop {
            let (s, us): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
            let now = s * 1000 + us / 1000;
            if now >= until {
                return;
            }
            let left = u64::try_from(until - now).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(left + 1)).await;
        }
    })
    .await
    .expect("the opening ends");
}

#[tokio::test]
async fn opened_by_failures_in_one_process_it_rejects_in_another() {
    let (url, _server) = redis_url();
    let name = unique("fleet-open");
    let config = [3, 60_000, 10_000];
    assert_eq!(
        run(&url, &name, config, &["probe"]),
        ["admitted", "state closed"]
    );
    assert_eq!(
        run(&url, &name, config, &["fail", "3"]),
        ["failed", "failed", "failed", "state open"]
    );
    assert_eq!(
        run(&url, &name, config, &["probe"]),
        ["rejected", "state open"]
    );
    assert_eq!(
        run(&url, &name, config, &["fail", "1"]),
        ["rejected", "state open"]
    );
}

#[tokio::test]
async fn after_open_for_one_trial_runs_across_the_processes() {
    let (url, _server) = redis_url();
    let name = unique("fleet-trial");
    let config = [1, 300, 10_000];
    assert_eq!(
        run(&url, &name, config, &["fail", "1"]),
        ["failed", "state open"]
    );
    let mut procs: Vec<Proc> = (0..6)
        .map(|_| Proc::start(&url, &name, config, &["trial"]))
        .collect();
    for p in &procs {
        assert_eq!(p.line(), "ready");
    }
    until_half_open(&url, &name).await;
    for p in &mut procs {
        p.tell("go");
    }
    let firsts: Vec<String> = procs.iter().map(Proc::line).collect();
    let admitted: Vec<usize> = (0..firsts.len())
        .filter(|&i| firsts[i] == "admitted")
        .collect();
    assert_eq!(admitted.len(), 1, "exactly one trial: {firsts:?}");
    assert_eq!(
        firsts.iter().filter(|l| *l == "rejected").count(),
        5,
        "{firsts:?}"
    );
    let mut trial = procs.swap_remove(admitted[0]);
    for p in procs {
        assert_eq!(p.finish(), ["state half-open"]);
    }
    trial.tell("ok");
    assert_eq!(trial.finish(), ["state closed"]);
    assert_eq!(
        run(&url, &name, config, &["probe"]),
        ["admitted", "state closed"]
    );
}

#[tokio::test]
async fn a_killed_trial_holder_does_not_wedge_the_fleet() {
    let (url, _server) = redis_url();
    let name = unique("fleet-killed");
    let config = [1, 200, 2_000];
    let trial_key = format!("stagepipe:breaker:{{{name}}}:trial");
    assert_eq!(
        run(&url, &name, config, &["fail", "1"]),
        ["failed", "state open"]
    );
    let mut holder = Proc::start(&url, &name, config, &["trial"]);
    assert_eq!(holder.line(), "ready");
    until_half_open(&url, &name).await;
    holder.tell("go");
    assert_eq!(holder.line(), "admitted");
    let mut c = conn(&url).await;
    let pttl: i64 = c.pttl(&trial_key).await.unwrap();
    assert!(pttl > 0 && pttl <= 2_000, "the lease runs: {pttl} ms left");
    // SIGKILL: no drop, no release; the lease expires by itself.
    drop(holder);
    tokio::time::timeout(GUARD, async {
        while c.exists::<_, bool>(&trial_key).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the lease expires");
    assert_eq!(
        run(&url, &name, config, &["probe"]),
        ["admitted", "state closed"]
    );
}
