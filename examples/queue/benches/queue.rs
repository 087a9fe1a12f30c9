//! Consumer throughput: messages per second through `StreamSource` (read, `batch(100, 1 s)`,
//! a trivial job, `ack`) with 1, 2 and 4 consumer processes, against a hand-written
//! `XREADGROUP COUNT 100` / `XACK` loop doing the same work.
//!
//! Every consumer is an OS process of its own, as a fleet of consumers is: the bench binary
//! runs itself again with `--child source|hand URL STREAM CONSUMER`, and the child reads the
//! stream as that consumer of group `g` on a runtime of its own until told to stop. A round:
//! the parent fills a fresh stream on a private `redis-server` and creates the group, starts
//! the consumer processes and waits until each has connected (it prints `ready`), then starts
//! the clock and tells them all to go (a `go` line on their stdin), and stops the clock when
//! Redis reports every entry delivered to the group and none pending (`XINFO GROUPS`, polled
//! every 2 ms). Process start-up and connecting are not measured; the source or the loop is.
//! It then closes the children's stdin: each stops (the source through `SourceHandle::drain`),
//! prints the sum of the ids it worked on and how many, and exits; the parent checks that the
//! fleet saw every message once. Children are killed and reaped if the parent fails, and end
//! by themselves when their stdin closes (the parent gone). Each figure is the median of
//! `ROUNDS` rounds.
//!
//! `cargo bench -p stagepipe-queue` (set `QUEUE_BENCH_MESSAGES` for another run length,
//! `QUEUE_BENCH_CONSUMERS=1,4` for some consumer counts only).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::Value;
use redis::aio::ConnectionManager;
use redis::streams::StreamInfoGroupsReply;
use stagepipe::PipelineExt;
use stagepipe::redis::{StreamSource, connect};
use stagepipe_queue::producer::produce;
use stagepipe_queue::server::RedisServer;
use tokio::sync::oneshot;

const ROUNDS: usize = 3;
const BATCH: usize = 100;
/// How long a round may take before the bench gives up on it.
const ROUND_LIMIT: Duration = Duration::from_secs(300);
/// How long a child may take to stop once told to.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The work per message: read its `id` field, add it up.
fn work(id: &[u8], sum: &AtomicU64, count: &AtomicU64) {
    let n: u64 = std::str::from_utf8(id).unwrap().parse().unwrap();
    sum.fetch_add(n, Ordering::Relaxed);
    count.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Child: one consumer.
// ---------------------------------------------------------------------------------------------

/// Runs one consumer (`source` or `hand`) and prints `SUM COUNT` when stopped.
fn child(variant: &str, url: &str, stream: &str, consumer: &str) {
    // As `#[tokio::main]` on this machine would: a multi-threaded runtime (2 workers).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Stdin: a `go` line, then end of file to stop (also when the parent is gone).
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut line = String::new();
        if stdin.read_line(&mut line).is_ok() && line.trim() == "go" {
            let _ = go_tx.send(());
            let _ = std::io::copy(&mut stdin, &mut std::io::sink());
        }
        let _ = stop_tx.send(());
    });
    let sum = Arc::new(AtomicU64::new(0));
    let count = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let conn = connect(url).await.unwrap();
        println!("ready");
        std::io::stdout().flush().unwrap();
        if go_rx.await.is_err() {
            return; // The parent went away before the start.
        }
        match variant {
            "source" => run_source(&conn, stream, consumer, &sum, &count, stop_rx).await,
            "hand" => run_hand(conn, stream, consumer, &sum, &count, stop_rx).await,
            other => panic!("unknown consumer kind {other:?}"),
        }
    });
    println!(
        "{} {}",
        sum.load(Ordering::Relaxed),
        count.load(Ordering::Relaxed)
    );
}

async fn run_source(
    conn: &ConnectionManager,
    stream: &str,
    consumer: &str,
    sum: &Arc<AtomicU64>,
    count: &Arc<AtomicU64>,
    stop: oneshot::Receiver<()>,
) {
    let source = StreamSource::builder(conn, stream, "g", consumer)
        .count(BATCH)
        .block(Duration::from_millis(100))
        .build();
    let handle = source.handle();
    let (sum, count) = (sum.clone(), count.clone());
    let pipeline = tokio::spawn(async move {
        source
            .map(|m| m.unwrap())
            .batch(BATCH, Duration::from_secs(1))
            .for_each(|batch| {
                for msg in batch {
                    work(msg.get("id").unwrap(), &sum, &count);
                    msg.ack();
                }
                futures::future::ready(())
            })
            .await;
    });
    let _ = stop.await;
    handle.drain().await.unwrap();
    pipeline.await.unwrap();
}

/// The loop a user writes by hand: read 100, work, acknowledge them, again.
async fn run_hand(
    mut conn: ConnectionManager,
    stream: &str,
    name: &str,
    sum: &AtomicU64,
    count: &AtomicU64,
    stop: oneshot::Receiver<()>,
) {
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = stopped.clone();
    tokio::spawn(async move {
        let _ = stop.await;
        flag.store(true, Ordering::Relaxed);
    });
    while !stopped.load(Ordering::Relaxed) {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(name)
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Value::Array(streams) = reply else {
            continue;
        };
        let Some(Value::Array(parts)) = streams.into_iter().next() else {
            continue;
        };
        let Some(Value::Array(entries)) = parts.into_iter().nth(1) else {
            continue;
        };
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(mut e) = entry else { panic!() };
            let Value::Array(fields) = e.pop().unwrap() else {
                panic!()
            };
            let Value::BulkString(id) = e.pop().unwrap() else {
                panic!()
            };
            let mut f = fields.chunks(2);
            let value = f
                .find(|kv| kv[0] == Value::BulkString(b"id".to_vec()))
                .map(|kv| match &kv[1] {
                    Value::BulkString(b) => b.clone(),
                    _ => panic!(),
                })
                .unwrap();
            work(&value, sum, count);
            ids.push(id);
        }
        let _: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg("g")
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Parent: the fleet of consumer processes, the clock, the table.
// ---------------------------------------------------------------------------------------------

/// One consumer process and its pipes.
struct Consumer {
    process: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// Consumer processes, killed and reaped on drop (so also when the bench panics).
struct Fleet(Vec<Consumer>);

impl Fleet {
    /// Starts `n` consumers of `variant` and waits until each has connected.
    fn start(variant: &str, url: &str, stream: &str, n: usize) -> Fleet {
        let exe = std::env::current_exe().expect("the bench binary's path");
        let mut fleet = Fleet(Vec::with_capacity(n));
        for i in 0..n {
            let mut process = Command::new(&exe)
                .args(["--child", variant, url, stream, &format!("c{i}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("a consumer process");
            let stdin = process.stdin.take();
            let stdout = BufReader::new(process.stdout.take().unwrap());
            fleet.0.push(Consumer {
                process,
                stdin,
                stdout,
            });
        }
        for (i, c) in fleet.0.iter_mut().enumerate() {
            let mut line = String::new();
            c.stdout.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "consumer c{i} did not come up");
        }
        fleet
    }

    /// Tells every consumer to start reading.
    fn go(&mut self) {
        for c in &mut self.0 {
            let stdin = c.stdin.as_mut().unwrap();
            stdin.write_all(b"go\n").unwrap();
            stdin.flush().unwrap();
        }
    }

    /// Panics if a consumer has exited (it would have failed: none stops before told to).
    fn check_running(&mut self) {
        for (i, c) in self.0.iter_mut().enumerate() {
            if let Some(status) = c.process.try_wait().unwrap() {
                panic!("consumer c{i} exited early: {status}");
            }
        }
    }

    /// Stops every consumer and returns the sum of the ids they worked on and how many.
    fn stop(mut self) -> (u64, u64) {
        for c in &mut self.0 {
            c.stdin = None; // End of file: stop.
        }
        let deadline = Instant::now() + STOP_LIMIT;
        let (mut sum, mut count) = (0, 0);
        for (i, c) in self.0.iter_mut().enumerate() {
            let status = loop {
                if let Some(status) = c.process.try_wait().unwrap() {
                    break status;
                }
                assert!(Instant::now() < deadline, "consumer c{i} did not stop");
                std::thread::sleep(Duration::from_millis(5));
            };
            assert!(status.success(), "consumer c{i} failed: {status}");
            let mut line = String::new();
            c.stdout.read_line(&mut line).unwrap();
            let mut figures = line.split_whitespace().map(|n| n.parse::<u64>().unwrap());
            sum += figures.next().expect("the consumer's sum");
            count += figures.next().expect("the consumer's count");
        }
        (sum, count)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.process.kill();
            let _ = c.process.wait();
        }
    }
}

/// Fills `stream` with `messages` jobs and creates group `g` at its start. Returns the last
/// entry's id.
async fn setup(url: &str, stream: &str, messages: u64) -> String {
    let mut conn = connect(url).await.unwrap();
    let ids = produce(&mut conn, stream, 0, messages).await.unwrap();
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    ids.last().unwrap().clone()
}

/// Whether group `g` has been delivered every entry of `stream`, up to `last`, and has
/// acknowledged them all.
async fn all_acked(conn: &mut ConnectionManager, stream: &str, last: &str) -> bool {
    let reply: StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    let group = reply.groups.iter().find(|g| g.name == "g").unwrap();
    group.last_delivered_id == last && group.pending == 0
}

/// One round: `consumers` processes of `variant` through a fresh stream of `messages`.
fn round(
    rt: &tokio::runtime::Runtime,
    variant: &str,
    url: &str,
    stream: &str,
    consumers: usize,
    messages: u64,
) -> Duration {
    let last = rt.block_on(setup(url, stream, messages));
    let mut conn = rt.block_on(connect(url)).unwrap();
    let mut fleet = Fleet::start(variant, url, stream, consumers);
    let start = Instant::now();
    fleet.go();
    while !rt.block_on(all_acked(&mut conn, stream, &last)) {
        fleet.check_running();
        assert!(start.elapsed() < ROUND_LIMIT, "{variant}: round too long");
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = start.elapsed();
    let (sum, count) = fleet.stop();
    assert_eq!(count, messages, "{variant}: messages worked on");
    assert_eq!(
        sum,
        messages * (messages - 1) / 2,
        "{variant}: sum of the ids"
    );
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let [variant, url, stream, consumer] = &args[2..] else {
            panic!("usage: --child source|hand URL STREAM CONSUMER");
        };
        child(variant, url, stream, consumer);
        return;
    }
    // Other arguments (cargo passes `--bench`, maybe a filter) are ignored, except that
    // `cargo test --benches` runs this without `--bench`: a quick smoke run then.
    let full = args.iter().any(|a| a == "--bench");
    let messages: u64 = std::env::var("QUEUE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let rounds = if full { ROUNDS } else { 1 };
    let server = RedisServer::start();
    let url = server.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "queue consumer throughput, {messages} messages, batch {BATCH}, one process per consumer, \
         median of {rounds}"
    );
    println!(
        "{:<12} {:>14} {:>14} {:>7}",
        "consumers", "StreamSource", "hand loop", "ratio"
    );
    let mut run = 0;
    // `QUEUE_BENCH_CONSUMERS=1,4` runs those counts only.
    let counts: Vec<usize> = std::env::var("QUEUE_BENCH_CONSUMERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    for consumers in counts {
        let (mut ours, mut hand) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            run += 1;
            let stream = format!("bench:{run}:source");
            let d = round(&rt, "source", &url, &stream, consumers, messages);
            ours.push(messages as f64 / d.as_secs_f64());
            let stream = format!("bench:{run}:hand");
            let d = round(&rt, "hand", &url, &stream, consumers, messages);
            hand.push(messages as f64 / d.as_secs_f64());
            rt.block_on(async {
                let mut conn = connect(&url).await.unwrap();
                let _: Value = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
            });
        }
        let (ours, hand) = (median(ours), median(hand));
        println!(
            "{:<12} {:>12.0}/s {:>12.0}/s {:>6.2}x",
            consumers,
            ours,
            hand,
            ours / hand
        );
    }
}
