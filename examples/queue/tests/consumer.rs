//! Two consumer processes on one stream, one of them killed mid-batch: the other claims what
//! it had not acknowledged, every job ends up written exactly once, and nothing is
//! acknowledged twice. With a Redis server and a SQLite file of the test's own.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;
use stagepipe_queue::db::Db;
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
    let mut b = consumer(&server.url(), &db_url, "b", &dir.0);

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
    let status = Command::new("kill")
        .args(["-INT", &b.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || b.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "b: {out:?}");
    let summary: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("b's summary");
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
    // `b` claimed what `a` held, and processed again only jobs `a` had written but not
    // acknowledged (which the idempotent insert left as they were).
    assert_eq!(field("claimed"), orphaned, "{summary}");
    assert_eq!(field("processed"), by_b + field("duplicates"));
    assert!(field("duplicates") <= field("claimed"));
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
    // `b` acknowledged every job it processed: the ones it wrote, and the ones `a` had
    // written but not acknowledged.
    assert_eq!(field("acked"), field("processed"), "{summary}");
}
