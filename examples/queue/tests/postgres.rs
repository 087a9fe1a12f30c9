//! The consumer writing to Postgres: every job written once, and the same jobs sent again are
//! acknowledged without running (the fleet's dedupe window) and without a second row.
//!
//! Needs a PostgreSQL server: `./scripts/test` (through `scripts/with-postgres`) sets
//! `STAGEPIPE_TEST_POSTGRES`; the Redis server is the test's own.

use std::time::Duration;

use clap::Parser;
use redis::aio::ConnectionManager;
use stagepipe_queue::config::{Cli, Command as Cmd, ConsumeConfig};
use stagepipe_queue::consumer::{Summary, consume};
use stagepipe_queue::db::Db;
use stagepipe_queue::producer::produce;
use stagepipe_queue::server::RedisServer;
use tokio::sync::oneshot;

const N: i64 = 300;

async fn pg_database(name: &str) -> String {
    let base = std::env::var("STAGEPIPE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "this test needs a PostgreSQL server: run it through `./scripts/test` (or \
             `scripts/with-postgres cargo test -p stagepipe-queue`) from the repository's root, \
             or set STAGEPIPE_TEST_POSTGRES=postgres://user@host:port/db"
        )
    });
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server {base}: {e}"));
    let db = format!("queue_test_{name}");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (prefix, _) = base.rsplit_once('/').expect("a database in the URL");
    format!("{prefix}/{db}")
}

/// The group's last delivered entry id and its count of pending (unacknowledged) entries
/// (none before the consumer creates the group).
async fn group(conn: &mut ConnectionManager) -> Option<(String, i64)> {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg("jobs")
        .query_async(conn)
        .await
        .unwrap();
    let g = groups
        .iter()
        .find(|g| g.get("name") == Some(&redis::Value::BulkString(b"workers".to_vec())))?;
    let last: String = redis::from_redis_value_ref(&g["last-delivered-id"]).unwrap();
    let pending: i64 = redis::from_redis_value_ref(&g["pending"]).unwrap();
    Some((last, pending))
}

/// Runs one consumer until `done` holds, then drains it and returns its summary.
async fn consume_until(cfg: &ConsumeConfig, mut done: impl AsyncFnMut() -> bool) -> Summary {
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn({
        let cfg = cfg.clone();
        async move {
            consume(&cfg, async {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| e.to_string())
        }
    });
    // A hang guard, not a time limit on the behaviour.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: jobs not done"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    run.await.unwrap().expect("the consumer drains cleanly")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_job_is_written_once_and_a_resent_job_is_not_run_again() {
    let db_url = pg_database("consumer").await;
    let server = RedisServer::start();
    let mut conn = stagepipe::redis::connect(&server.url()).await.unwrap();
    let Cmd::Consume(args) = Cli::parse_from([
        "stagepipe-queue",
        "consume",
        "--consumer",
        "pg",
        "--db",
        &db_url,
        "--batch-wait-ms",
        "50",
    ])
    .command
    else {
        unreachable!()
    };
    let cfg = ConsumeConfig::new(&server.url(), "jobs", "workers", &args);
    let db = Db::connect(&db_url).await.unwrap();

    let last = produce(&mut conn, "jobs", 0, N as u64)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let first = consume_until(&cfg, async || {
        group(&mut conn).await == Some((last.clone(), 0))
    })
    .await;
    assert_eq!((first.processed, first.written), (N as u64, N as u64));
    assert_eq!((first.duplicates, first.skipped, first.failed), (0, 0, 0));
    assert_eq!(first.source.acked, N as u64);
    assert_eq!(db.counts().await.unwrap(), (N, N));

    // The same jobs again (new entries, same job ids): done already, says the window.
    let last = produce(&mut conn, "jobs", 0, N as u64)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let second = consume_until(&cfg, async || {
        group(&mut conn).await == Some((last.clone(), 0))
    })
    .await;
    assert_eq!(second.skipped, N as u64, "{}", second.to_json());
    assert_eq!((second.processed, second.written), (0, 0));
    assert_eq!(second.source.acked, N as u64);
    assert_eq!(db.counts().await.unwrap(), (N, N));
}
