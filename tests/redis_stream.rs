//! `stagepipe::redis::StreamSource` against a real Redis: the shared server of
//! `scripts/with-redis` (`STAGEPIPE_TEST_REDIS`), one fresh stream per test.
//!
//! Real Redis means real time: waits here are hang guards (generous timeouts) or polls for a
//! state Redis reports, never assertions about how long something took.

use std::collections::BTreeSet;
use std::future::Future;

use std::time::Duration;

use futures::StreamExt;
use redis::Value;
use stagepipe::redis::{
    ConnectionManager, FieldError, Message, StreamError, StreamSource, connect_lazy,
};

mod common;
use common::redis_env::{conn, unique};

/// Fails the test instead of hanging it.
async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("hang guard: {what}"))
}

/// Waits (polling) until `cond` holds.
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    guard(what, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn add(conn: &mut ConnectionManager, stream: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("n")
            .arg(i)
            .query_async(conn)
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

/// How many entries of `group` are pending (delivered, not acknowledged).
async fn pending(conn: &mut ConnectionManager, stream: &str, group: &str) -> i64 {
    let v: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    match v {
        Value::Array(parts) => match &parts[0] {
            Value::Int(n) => *n,
            other => panic!("XPENDING count: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

async fn next(source: &mut StreamSource) -> Message {
    guard("the next message", source.next())
        .await
        .expect("the stream ended")
        .expect("an error item")
}

fn n_of(msg: &Message) -> usize {
    msg.text("n").unwrap().parse().unwrap()
}

#[tokio::test]
async fn every_entry_is_delivered_once_and_acknowledged() {
    let (mut c, stream) = (conn().await, unique("all"));
    add(&mut c, &stream, 250).await;
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .count(40)
        .build();
    let handle = source.handle();
    let mut seen = BTreeSet::new();
    for _ in 0..250 {
        let msg = next(&mut source).await;
        assert_eq!(msg.deliveries(), 1);
        assert!(seen.insert(n_of(&msg)), "delivered twice: {}", n_of(&msg));
        msg.ack();
    }
    assert_eq!(seen, (0..250).collect());
    guard("drain", handle.drain()).await.unwrap();
    assert!(guard("end", source.next()).await.is_none());
    assert_eq!(pending(&mut c, &stream, "g").await, 0);
    let stats = handle.stats();
    assert_eq!((stats.read, stats.acked), (250, 250));
    assert_eq!((stats.outstanding, stats.unsent_acks), (0, 0));
}

#[tokio::test]
async fn entries_are_acknowledged_only_when_done_and_dropped_ones_stay_pending() {
    let (mut c, stream) = (conn().await, unique("after-done"));
    add(&mut c, &stream, 10).await;
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .ack_batch(100, Duration::from_secs(3600))
        .build();
    let handle = source.handle();
    let mut msgs = Vec::new();
    for _ in 0..10 {
        msgs.push(next(&mut source).await);
    }
    assert_eq!(pending(&mut c, &stream, "g").await, 10);
    assert_eq!(handle.stats().outstanding, 10);
    let dropped = msgs.split_off(4);
    let dropped_ids: BTreeSet<String> = dropped.iter().map(|m| m.id().to_owned()).collect();
    for msg in msgs {
        msg.ack();
    }
    drop(dropped);
    assert_eq!(
        pending(&mut c, &stream, "g").await,
        10,
        "sent before the drain"
    );
    guard("drain", handle.drain()).await.unwrap();
    assert_eq!(pending(&mut c, &stream, "g").await, 6);
    let still: Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut c)
        .await
        .unwrap();
    let still: BTreeSet<String> = match still {
        Value::Array(rows) => rows
            .into_iter()
            .map(|row| match row {
                Value::Array(f) => redis::from_redis_value(f[0].clone()).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(still, dropped_ids);
    assert_eq!(handle.stats().acked, 4);
}

#[tokio::test]
async fn acknowledgements_go_out_in_batches() {
    let (mut c, stream) = (conn().await, unique("batched"));
    add(&mut c, &stream, 300).await;
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .ack_batch(100, Duration::from_secs(3600))
        .build();
    let handle = source.handle();
    for _ in 0..300 {
        next(&mut source).await.ack();
    }
    // Three full batches go out without waiting for the drain.
    until("three XACKs", async || handle.stats().acked == 300).await;
    assert_eq!(pending(&mut c, &stream, "g").await, 0);
    guard("drain", handle.drain()).await.unwrap();
    let stats = handle.stats();
    assert_eq!(stats.ack_commands, 3, "{stats:?}");
    assert_eq!(stats.acked, 300);
}

#[tokio::test]
async fn a_batch_not_full_goes_out_after_its_wait() {
    let (mut c, stream) = (conn().await, unique("ack-wait"));
    add(&mut c, &stream, 3).await;
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .ack_batch(100, Duration::from_millis(20))
        .build();
    let handle = source.handle();
    for _ in 0..3 {
        next(&mut source).await.ack();
    }
    // Nobody polls the stream now: the source's own task sends the batch.
    until("the ack batch's wait", async || {
        pending(&mut c, &stream, "g").await == 0 && handle.stats().acked == 3
    })
    .await;
    let stats = handle.stats();
    assert_eq!((stats.acked, stats.ack_commands), (3, 1));
}

#[tokio::test]
async fn entries_of_a_dead_consumer_are_claimed_after_claim_idle() {
    let (mut c, stream) = (conn().await, unique("claim"));
    let ids = add(&mut c, &stream, 5).await;
    let mut dead = StreamSource::builder(&conn().await, &stream, "g", "dead")
        .block(Duration::from_millis(50))
        .build();
    let mut taken = Vec::new();
    for _ in 0..5 {
        // The work "crashes": nothing is acknowledged.
        taken.push(next(&mut dead).await.id().to_owned());
    }
    drop(dead);
    assert_eq!(taken, ids);
    assert_eq!(pending(&mut c, &stream, "g").await, 5);

    let mut alive = StreamSource::builder(&conn().await, &stream, "g", "alive")
        .claim_idle(Duration::from_millis(200))
        .claim_every(Duration::from_millis(50))
        .build();
    let handle = alive.handle();
    let mut claimed = Vec::new();
    for _ in 0..5 {
        let msg = next(&mut alive).await;
        assert_eq!(msg.deliveries(), 2, "{msg:?}");
        claimed.push(msg.id().to_owned());
        msg.ack();
    }
    claimed.sort();
    assert_eq!(claimed, ids);
    guard("drain", handle.drain()).await.unwrap();
    assert_eq!(pending(&mut c, &stream, "g").await, 0);
    let stats = handle.stats();
    assert_eq!((stats.claimed, stats.read, stats.acked), (5, 0, 5));
}

#[tokio::test]
async fn an_entry_delivered_too_often_goes_to_the_dead_letter_stream() {
    let (mut c, stream) = (conn().await, unique("poison"));
    let dlq = format!("{stream}:dlq");
    let ids = add(&mut c, &stream, 1).await;
    let source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .claim_idle(Duration::from_millis(100))
        .claim_every(Duration::from_millis(30))
        .max_deliveries(2)
        .dead_letter(&dlq)
        .build();
    let handle = source.handle();
    // Every delivery fails: the message is dropped, never acknowledged.
    let consumer = tokio::spawn(source.map(|m| m.unwrap().deliveries()).collect::<Vec<_>>());
    until("dead-lettered", async || handle.stats().dead_lettered == 1).await;
    guard("drain", handle.drain()).await.unwrap();
    let deliveries = guard("the consumer", consumer).await.unwrap();
    assert_eq!(deliveries, [1, 2]);
    assert_eq!(pending(&mut c, &stream, "g").await, 0);

    let dead: Value = redis::cmd("XRANGE")
        .arg(&dlq)
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    let Value::Array(entries) = dead else {
        panic!("{dead:?}")
    };
    assert_eq!(entries.len(), 1);
    let Value::Array(entry) = &entries[0] else {
        panic!()
    };
    let fields: Vec<String> = redis::from_redis_value(entry[1].clone()).unwrap();
    assert_eq!(
        fields,
        [
            "n",
            "0",
            "stagepipe-stream",
            &stream,
            "stagepipe-group",
            "g",
            "stagepipe-id",
            &ids[0],
            "stagepipe-deliveries",
            "3"
        ]
    );
}

#[tokio::test]
async fn a_missing_group_is_created_on_demand_or_reported() {
    let (mut c, stream) = (conn().await, unique("group"));
    add(&mut c, &stream, 3).await;

    let mut refused = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .create_group(false)
        .build();
    let err = guard("an error item", refused.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, StreamError::NoGroup { stream: s, group } if *s == stream && group == "g"),
        "{err:?}"
    );
    assert!(err.to_string().contains("consumer group `g`"), "{err}");
    drop(refused);

    // Created at the stream's first entry: entries added before the group are delivered.
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1").build();
    let got: Vec<usize> = vec![
        n_of(&next(&mut source).await),
        n_of(&next(&mut source).await),
        n_of(&next(&mut source).await),
    ];
    assert_eq!(got, [0, 1, 2]);

    // A stream that does not exist yet is created with its group.
    let fresh = unique("group-fresh");
    let mut source = StreamSource::builder(&conn().await, &fresh, "g2", "c1")
        .block(Duration::from_millis(20))
        .build();
    let reader = tokio::spawn(async move { next(&mut source).await.id().to_owned() });
    until("the group", async || {
        let groups: Result<Value, _> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&fresh)
            .query_async(&mut c)
            .await;
        matches!(groups, Ok(Value::Array(g)) if g.len() == 1)
    })
    .await;
    let id = add(&mut c, &fresh, 1).await.remove(0);
    assert_eq!(guard("the entry", reader).await.unwrap(), id);
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_item_and_the_source_goes_on() {
    // Port 1: nothing listens there.
    let conn = connect_lazy("redis://127.0.0.1:1/").unwrap();
    let mut source = StreamSource::builder(&conn, "s", "g", "c1").build();
    for _ in 0..2 {
        let item = guard("an error item", source.next()).await.expect("no end");
        match item {
            Err(StreamError::Redis { error, .. }) => {
                assert!(
                    error.is_io_error() || error.is_connection_refusal(),
                    "{error}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(source.stats().errors >= 2);
}

#[tokio::test]
async fn a_field_that_is_not_utf8_is_an_error_the_caller_sees() {
    let (mut c, stream) = (conn().await, unique("utf8"));
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("body")
        .arg(&b"\xff\xfe"[..])
        .query_async(&mut c)
        .await
        .unwrap();
    add(&mut c, &stream, 1).await;
    let source = StreamSource::builder(&conn().await, &stream, "g", "c1").build();
    let handle = source.handle();
    let texts: Vec<Result<String, FieldError>> = guard(
        "two items",
        source
            .take(2)
            .map(|m| {
                let m = m.unwrap();
                let text = match m.text("body") {
                    Err(FieldError::Missing { .. }) => m.text("n"),
                    other => other,
                }
                .map(str::to_owned);
                if let Err(FieldError::NotUtf8 { .. }) = &text {
                    assert_eq!(m.get("body"), Some(&b"\xff\xfe"[..]));
                }
                m.ack();
                text
            })
            .collect(),
    )
    .await;
    match &texts[0] {
        Err(e @ FieldError::NotUtf8 { field, .. }) => {
            assert_eq!(field, "body");
            assert_eq!(e.to_string(), "field `body` is not UTF-8");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(texts[1], Ok("0".to_owned()));
    guard("drain", handle.drain()).await.unwrap();
    assert_eq!(pending(&mut c, &stream, "g").await, 0);
}

#[tokio::test]
async fn a_drain_waits_for_the_messages_out_and_sends_the_last_acks() {
    let (mut c, stream) = (conn().await, unique("drain"));
    add(&mut c, &stream, 10).await;
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .ack_batch(1000, Duration::from_secs(3600))
        .block(Duration::from_millis(50))
        .build();
    let handle = source.handle();
    let mut msgs = Vec::new();
    for _ in 0..10 {
        msgs.push(next(&mut source).await);
    }
    let last = msgs.pop().unwrap();
    for m in msgs {
        m.ack();
    }
    let drain = tokio::spawn({
        let handle = handle.clone();
        async move { handle.drain().await }
    });
    // Whatever the time, the drain cannot end while a message is out.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!drain.is_finished());
    assert_eq!(pending(&mut c, &stream, "g").await, 10);
    assert_eq!(handle.stats().ack_commands, 0);
    // The stream ends: nothing new is read.
    assert!(guard("end", source.next()).await.is_none());
    add(&mut c, &stream, 1).await;
    last.ack();
    guard("drain", drain).await.unwrap().unwrap();
    assert_eq!(pending(&mut c, &stream, "g").await, 0);
    let stats = handle.stats();
    assert_eq!((stats.read, stats.acked, stats.ack_commands), (10, 10, 1));
}

#[tokio::test]
async fn a_drain_before_the_first_poll_ends_the_stream() {
    let stream = unique("drain-early");
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1").build();
    guard("drain", source.handle().drain()).await.unwrap();
    assert!(source.next().await.is_none());
    assert_eq!(source.stats().read_commands, 0);
}

#[tokio::test]
async fn dropping_the_stream_stops_its_reading() {
    let (mut c, stream) = (conn().await, unique("drop"));
    add(&mut c, &stream, 2).await;
    let mut own = conn().await;
    let client: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut own)
        .await
        .unwrap();
    let mut source = StreamSource::builder(&own, &stream, "g", "c1")
        .block(Duration::from_millis(50))
        .build();
    let handle = source.handle();
    next(&mut source).await;
    next(&mut source).await;
    drop(source);
    // The task is gone once a drain resolves...
    guard("drain after drop", handle.drain()).await.unwrap();
    let reads = handle.stats().read_commands;
    // ...and its last blocking read has run out.
    until("the last read's block", async || {
        let info: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("ID")
            .arg(client)
            .query_async(&mut c)
            .await
            .unwrap();
        !info.contains("flags=b ")
    })
    .await;
    add(&mut c, &stream, 3).await;
    let other: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("other")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let Value::Array(streams) = other else {
        panic!("{other:?}")
    };
    let Value::Array(parts) = &streams[0] else {
        panic!()
    };
    let Value::Array(entries) = &parts[1] else {
        panic!()
    };
    assert_eq!(entries.len(), 3, "the dropped source took new entries");
    assert_eq!(handle.stats().read_commands, reads);
    // What it took and never acknowledged stays pending (for a claim).
    assert_eq!(pending(&mut c, &stream, "g").await, 5);
}

#[tokio::test]
async fn a_slow_consumer_slows_the_reading() {
    let (mut c, stream) = (conn().await, unique("bounded"));
    add(&mut c, &stream, 500).await;
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .count(10)
        .build();
    let handle = source.handle();
    let held = next(&mut source).await;
    // One reply in the stream's hands and one in the channel, then the reading waits.
    until("two replies read", async || handle.stats().read == 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(handle.stats().read, 20);
    assert_eq!(pending(&mut c, &stream, "g").await, 20);
    drop(held);
    for _ in 0..30 {
        next(&mut source).await.ack();
    }
    assert!(handle.stats().read <= 20 + 30 + 10);
}

#[test]
fn invalid_settings_are_refused_naming_the_parameter() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let conn = connect_lazy("redis://127.0.0.1:1/").unwrap();
    let b = || StreamSource::builder(&conn, "s", "g", "c");
    let refused = |r: Result<StreamSource, stagepipe::ConfigError>| r.unwrap_err().parameter();
    assert_eq!(refused(b().count(0).try_build()), "count");
    assert_eq!(refused(b().block(Duration::ZERO).try_build()), "block");
    assert_eq!(
        refused(b().block(Duration::from_secs(1)).try_build()),
        "block"
    );
    assert_eq!(
        refused(b().claim_idle(Duration::ZERO).try_build()),
        "claim_idle"
    );
    assert_eq!(
        refused(b().claim_every(Duration::ZERO).try_build()),
        "claim_every"
    );
    assert_eq!(refused(b().max_deliveries(0).try_build()), "max_deliveries");
    assert_eq!(refused(b().ack_batch(0, Duration::ZERO).try_build()), "max");
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b().count(0).build()))
        .unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("`count`"), "{message}");
    assert!(b().claim_idle(Duration::MAX).try_build().is_ok());
}

#[tokio::test]
async fn acknowledgements_made_before_the_stream_is_dropped_are_sent() {
    let (mut c, stream) = (conn().await, unique("take"));
    add(&mut c, &stream, 10).await;
    let source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .ack_batch(100, Duration::from_secs(3600))
        .build();
    let handle = source.handle();
    let firsts: Vec<usize> = guard(
        "three items",
        source
            .take(3)
            .map(|m| {
                let m = m.unwrap();
                let n = n_of(&m);
                m.ack();
                n
            })
            .collect(),
    )
    .await;
    assert_eq!(firsts, [0, 1, 2]);
    guard("the task's end", handle.drain()).await.unwrap();
    // The three acknowledged are done; the seven read and never handed out stay pending.
    assert_eq!(handle.stats().acked, 3);
    assert_eq!(pending(&mut c, &stream, "g").await, 7);
}

#[tokio::test]
async fn a_message_still_out_is_not_handed_out_again_when_its_own_source_claims_it() {
    let (mut c, stream) = (conn().await, unique("self-claim"));
    let ids = add(&mut c, &stream, 1).await;
    let mut source = StreamSource::builder(&conn().await, &stream, "g", "c1")
        .claim_idle(Duration::from_millis(50))
        .claim_every(Duration::from_millis(10))
        .block(Duration::from_millis(10))
        .build();
    let handle = source.handle();
    let held = next(&mut source).await;
    // Slow work: the entry goes idle, and the source's own claim takes it (again).
    until("a claim of the held entry", async || {
        let v: Value = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("g")
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(&mut c)
            .await
            .unwrap();
        match v {
            Value::Array(rows) => match &rows[0] {
                Value::Array(row) => row[3] == Value::Int(2),
                _ => false,
            },
            _ => false,
        }
    })
    .await;
    let marker = add(&mut c, &stream, 1).await.remove(0);
    let after = next(&mut source).await;
    assert_eq!(after.id(), marker, "the held entry was handed out twice");
    assert_eq!(held.id(), ids[0]);
    held.ack();
    after.ack();
    guard("drain", handle.drain()).await.unwrap();
    assert_eq!(pending(&mut c, &stream, "g").await, 0);
    assert_eq!(handle.stats().acked, 2);
}

#[test]
fn the_public_types_cross_threads() {
    fn send<T: Send + 'static>() {}
    fn send_sync<T: Send + Sync + 'static>() {}
    send::<StreamSource>();
    send_sync::<Message>();
    send_sync::<stagepipe::redis::Ack>();
    send_sync::<stagepipe::redis::Entry>();
    send_sync::<stagepipe::redis::SourceHandle>();
    send_sync::<StreamError>();
    send_sync::<FieldError>();
    send::<stagepipe::redis::StreamSourceBuilder>();
}
