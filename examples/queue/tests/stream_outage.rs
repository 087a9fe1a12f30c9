//! `StreamSource` through a Redis outage, on a server of the test's own: while Redis is down
//! the stream yields error items (no panic, no end); when it comes back (empty: nothing is
//! persisted) the source creates its group again and reads the new entries.

use std::time::Duration;

use futures::StreamExt;
use redis::Value;
use stagepipe::redis::{StreamError, StreamSource, connect};
use stagepipe_queue::producer::produce;
use stagepipe_queue::server::RedisServer;

async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("hang guard: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_while_redis_is_down_then_the_group_is_created_again() {
    let mut server = RedisServer::start();
    let mut c = connect(&server.url()).await.unwrap();
    produce(&mut c, "jobs", 0, 5).await.unwrap();
    let conn = connect(&server.url()).await.unwrap();
    let mut source = StreamSource::builder(&conn, "jobs", "g", "c1")
        .block(Duration::from_millis(50))
        .ack_batch(5, Duration::from_millis(10))
        .build();
    let handle = source.handle();
    for _ in 0..5 {
        guard("a message", source.next())
            .await
            .unwrap()
            .unwrap()
            .ack();
    }
    guard("the acks", async {
        while handle.stats().acked < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    server.stop();
    for _ in 0..2 {
        match guard("an error item", source.next()).await {
            Some(Err(StreamError::Redis { .. })) => {}
            other => panic!("expected an error item, got {other:?}"),
        }
    }

    server.restart();
    let mut c = connect(&server.url()).await.unwrap();
    let ids = produce(&mut c, "jobs", 100, 3).await.unwrap();
    let mut got = Vec::new();
    guard("the entries after the restart", async {
        while got.len() < 3 {
            match source.next().await {
                Some(Ok(msg)) => {
                    assert_eq!(msg.deliveries(), 1);
                    got.push(msg.id().to_owned());
                    msg.ack();
                }
                Some(Err(_)) => {} // until the connection is back
                None => panic!("the stream ended"),
            }
        }
    })
    .await;
    assert_eq!(got, ids);
    guard("drain", handle.drain()).await.unwrap();
    let pending: Value = redis::cmd("XPENDING")
        .arg("jobs")
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    let Value::Array(p) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(p[0], Value::Int(0));
    assert!(handle.stats().errors >= 2);
}
