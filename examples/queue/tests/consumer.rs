//! Two consumer processes on one stream, one of them killed mid-batch: the other claims what
//! it had not acknowledged, every job ends up written exactly once, and nothing is
//! acknowledged twice. With a Redis server and a SQLite file of the test's own.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use redis::Value;
use redis::aio::ConnectionManager;
use stagepipe_queue::config::{Cli, Command as Cmd, ConsumeConfig};
use stagepipe_queue::consumer::dedupe_window;
use stagepipe_queue::db::Db;
use stagepipe_queue::job::{JobResult, checksum};
use stagepipe_queue::producer::{payload, produce};
use stagepipe_queue::server::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_stagepipe-queue");
const JOBS: i64 = 600;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "stagepipe-queue-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn consumer(redis: &str, db: &str, name: &str, logs: &Path) -> Child {
    Command::new(BIN)
        .args(["--redis", redis, "consume", "--consumer", name, "--db", db])
        // 100 jobs of 20 ms, 4 at a time: half a second per batch, long enough to be killed in.
        .args(["--batch", "100", "--work-ms", "20", "--concurrency", "4"])
        .args(["--claim-idle-ms", "1000", "--batch-wait-ms", "200"])
        // A dead consumer's claims on its jobs lapse soon after the jobs are claimed back.
        .args(["--dedupe-lease-ms", "1500"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(File::create(logs.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("the consumer binary")
}

/// Polls `cond` until it holds; a hang guard, not a time limit on the behaviour.
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "hang guard: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn query_int(conn: &mut ConnectionManager, cmd: &redis::Cmd) -> i64 {
    match cmd.query_async::<Value>(conn).await.unwrap() {
        Value::Int(n) => n,
        Value::Array(parts) => match &parts[0] {
            Value::Int(n) => *n,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

async fn pending_of(conn: &mut ConnectionManager, consumer: &str) -> i64 {
    let v: Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("jobs")
        .arg("workers")
        .query_async(conn)
        .await
        .unwrap_or(Value::Nil);
    let Value::Array(consumers) = v else { return 0 };
    for c in consumers {
        let fields: Vec<Value> = match c {
            Value::Array(f) => f,
            Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => continue,
        };
        let name = fields
            .iter()
            .position(|f| *f == Value::BulkString(b"name".to_vec()));
        let pending = fields
            .iter()
            .position(|f| *f == Value::BulkString(b"pending".to_vec()));
        if let (Some(n), Some(p)) = (name, pending) {
            if fields[n + 1] == Value::BulkString(consumer.as_bytes().to_vec()) {
                if let Value::Int(p) = fields[p + 1] {
                    return p;
                }
            }
        }
    }
    0
}

async fn rows_by(db: &Db, consumer: &str) -> i64 {
    match db {
        Db::Sqlite(p) => sqlx::query_scalar("SELECT COUNT(*) FROM job_results WHERE consumer = ?")
            .bind(consumer)
            .fetch_one(p)
            .await
            .unwrap(),
        Db::Postgres(_) => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_jobs_are_claimed_and_every_job_is_written_once() {
    let server = RedisServer::start();
    let dir = TempDir::new("kill");
    let db_url = format!("sqlite://{}", dir.0.join("results.db").display());
    let mut conn = stagepipe::redis::connect(&server.url()).await.unwrap();

    let produced = Command::new(BIN)
        .args([
            "--redis",
            &server.url(),
            "produce",
            "--jobs",
            &JOBS.to_string(),
        ])
        .output()
        .unwrap();
    assert!(produced.status.success(), "{produced:?}");

    let db = Db::connect(&db_url).await.unwrap();
    let mut a = consumer(&server.url(), &db_url, "a", &dir.0);
    let b = consumer(&server.url(), &db_url, "b", &dir.0);

    // Kill `a` once it has written a batch and holds more jobs, unacknowledged.
    until("a mid-batch", async || {
        rows_by(&db, "a").await > 0 && pending_of(&mut conn, "a").await > 0
    })
    .await;
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    let orphaned = pending_of(&mut conn, "a").await;
    assert!(orphaned > 0, "a held no jobs when killed");

    // `b` claims them (after the claim idle time) and finishes the queue.
    until("every job written and acknowledged", async || {
        db.counts().await.unwrap().0 == JOBS
            && query_int(&mut conn, redis::cmd("XPENDING").arg("jobs").arg("workers")).await == 0
    })
    .await;

    // Ctrl-C: `b` drains and prints its summary.
    let summary = stop(b).await;
    eprintln!("b: {summary}, orphaned by a: {orphaned}");
    let field = |k: &str| {
        summary[k]
            .as_i64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };

    // Every job written once.
    assert_eq!(db.counts().await.unwrap(), (JOBS, JOBS));
    let (by_a, by_b) = (rows_by(&db, "a").await, rows_by(&db, "b").await);
    assert!(
        by_a > 0 && by_b > 0,
        "the work was not shared: a {by_a}, b {by_b}"
    );
    assert_eq!(by_a + by_b, JOBS);
    assert_eq!(field("written"), by_b);
    // `b` claimed what `a` held (some twice: claimed back while `a`'s claims in the dedupe
    // window had not lapsed, they were left pending once more). It ran again only jobs `a`
    // had written and not marked done (killed in between: the idempotent insert left their
    // rows as they were); jobs `a` had marked done were acknowledged without running.
    assert!(field("claimed") >= orphaned, "{summary}");
    assert_eq!(field("processed"), by_b + field("duplicates"));
    assert!(
        field("duplicates") + field("skipped") <= orphaned,
        "{summary}"
    );
    // Nothing acknowledged twice: Redis found every id `b` acknowledged still pending, and
    // nothing is left pending or dead-lettered.
    assert_eq!(field("stale_acks"), 0, "{summary}");
    assert_eq!(field("failed"), 0, "{summary}");
    assert_eq!(field("dead_lettered"), 0);
    assert_eq!(
        query_int(&mut conn, redis::cmd("XPENDING").arg("jobs").arg("workers")).await,
        0
    );
    assert_eq!(
        query_int(&mut conn, redis::cmd("XLEN").arg("jobs:dead")).await,
        0
    );
    // `b` acknowledged every job it processed or found done.
    assert_eq!(
        field("acked"),
        field("processed") + field("skipped"),
        "{summary}"
    );
}

/// SIGINT (Ctrl-C) to a consumer: it drains, exits and prints its summary.
async fn stop(child: Child) -> serde_json::Value {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(out.stdout.trim_ascii()).expect("the summary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_job_already_done_is_acknowledged_without_running_again() {
    const N: i64 = 200;
    const DONE: usize = 50;
    let server = RedisServer::start();
    let dir = TempDir::new("dedupe");
    let db_url = format!("sqlite://{}", dir.0.join("results.db").display());
    let mut conn = stagepipe::redis::connect(&server.url()).await.unwrap();
    produce(&mut conn, "jobs", 0, N as u64).await.unwrap();
    let db = Db::connect(&db_url).await.unwrap();

    // A consumer read 50 jobs, wrote them, marked them done, and died before acknowledging.
    let Cmd::Consume(args) =
        Cli::parse_from(["stagepipe-queue", "consume", "--db", &db_url]).command
    else {
        unreachable!()
    };
    let cfg = ConsumeConfig::new(&server.url(), "jobs", "workers", &args);
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("jobs")
        .arg("workers")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("dead")
        .arg("COUNT")
        .arg(DONE)
        .arg("STREAMS")
        .arg("jobs")
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let jobs: Vec<i64> = read.keys[0]
        .ids
        .iter()
        .map(|e| e.get::<i64>("id").unwrap())
        .collect();
    assert_eq!(jobs.len(), DONE);
    let results: Vec<JobResult> = jobs
        .iter()
        .map(|&id| JobResult {
            job_id: id,
            checksum: checksum(payload(id).as_bytes()),
            consumer: "dead".into(),
            deliveries: 1,
        })
        .collect();
    assert_eq!(db.insert(&results).await.unwrap(), DONE as u64);
    let window = dedupe_window(&conn, &cfg);
    for &id in &jobs {
        assert!(
            window
                .claim(id)
                .await
                .unwrap()
                .unwrap()
                .done()
                .await
                .unwrap()
        );
    }

    let mut b = Command::new(BIN);
    b.args([
        "--redis",
        &server.url(),
        "consume",
        "--consumer",
        "b",
        "--db",
        &db_url,
    ])
    .args(["--claim-idle-ms", "300", "--batch-wait-ms", "100"])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(File::create(dir.0.join("b.log")).unwrap());
    let b = b.spawn().unwrap();
    until("every job written and acknowledged", async || {
        db.counts().await.unwrap().0 == N
            && query_int(&mut conn, redis::cmd("XPENDING").arg("jobs").arg("workers")).await == 0
    })
    .await;
    let summary = stop(b).await;
    let field = |k: &str| {
        summary[k]
            .as_i64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    assert_eq!(db.counts().await.unwrap(), (N, N));
    assert_eq!(rows_by(&db, "dead").await, DONE as i64);
    // The 50 came back to `b` (claimed), and were acknowledged without running again.
    assert_eq!(field("claimed"), DONE as i64, "{summary}");
    assert_eq!(field("skipped"), DONE as i64, "{summary}");
    assert_eq!(field("processed"), N - DONE as i64, "{summary}");
    assert_eq!(
        (field("written"), field("duplicates")),
        (N - DONE as i64, 0)
    );
    assert_eq!(field("acked"), N, "{summary}");
    assert_eq!(field("stale_acks"), 0);
}
