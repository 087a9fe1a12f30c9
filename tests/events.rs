//! The `tracing` events the crate emits: `CircuitBreaker`'s state changes, the summary of a
//! `with_stats` stream when it ends, and the changes of an adaptive `InFlightLimit`.
//!
//! In a test binary of their own: `tracing` caches whether a call site is wanted the first time
//! it is hit, and another test hitting these call sites on another thread, with no subscriber,
//! while these install their own, could leave them switched off here. Each call site is hit only
//! by the one test here that installs a subscriber for it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::advance;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn fail(calls: &AtomicU32) -> Result<u32, String> {
    calls.fetch_add(1, Ordering::SeqCst);
    Err(String::from("down"))
}

async fn succeed(calls: &AtomicU32) -> Result<u32, String> {
    Ok(calls.fetch_add(1, Ordering::SeqCst))
}

/// One recorded event: its level, target and message.
type Event = (tracing::Level, String, String);

/// A subscriber that records every event.
struct Recorder(Arc<Mutex<Vec<Event>>>);

struct Message<'a>(&'a mut String);

impl tracing::field::Visit for Message<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            *self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        let mut message = String::new();
        event.record(&mut Message(&mut message));
        let record = (*meta.level(), meta.target().to_owned(), message);
        self.0.lock().unwrap().push(record);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn state_changes_emit_tracing_events() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let _guard = tracing::subscriber::set_default(Recorder(events.clone()));
    let breaker = CircuitBreaker::new(1, ms(10));
    let calls = AtomicU32::new(0);
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(10)).await;
    breaker.call(fail(&calls)).await.unwrap_err();
    advance(ms(10)).await;
    breaker.call(succeed(&calls)).await.unwrap();
    breaker.call(succeed(&calls)).await.unwrap(); // no change, no event
    let events = events.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .all(|(_, target, _)| target == "stagepipe::circuit_breaker")
    );
    let messages: Vec<_> = events.into_iter().map(|(_, _, m)| m).collect();
    assert_eq!(
        messages,
        [
            "circuit breaker opened",
            "circuit breaker half-open: trial call",
            "circuit breaker opened again: trial call failed",
            "circuit breaker half-open: trial call",
            "circuit breaker closed: trial call succeeded",
        ]
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn stream_summary_is_a_debug_event() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let _guard = tracing::subscriber::set_default(Recorder(events.clone()));
    let stats = Stats::new("parse");
    let n = stream::iter(0..10).with_stats(&stats).count().await;
    assert_eq!(n, 10);
    let events = events.lock().unwrap().clone();
    let [(level, target, message)] = &events[..] else {
        panic!("expected one event, got {events:?}")
    };
    assert_eq!(*level, tracing::Level::DEBUG);
    assert_eq!(target, "stagepipe::stats");
    assert!(message.contains("parse"), "{message}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn adaptive_limit_changes_are_debug_events() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let _guard = tracing::subscriber::set_default(Recorder(events.clone()));
    let limit = InFlightLimit::adaptive(1, 64).named("db");
    // Instant operations never queue: the limit doubles up to `max`.
    let n = stream::iter(0..200)
        .in_flight(&limit, |x| async move { x })
        .count()
        .await;
    assert_eq!(n, 200);
    assert_eq!(limit.current(), 64);
    let events = events.lock().unwrap().clone();
    let changes: Vec<_> = events
        .iter()
        .filter(|(_, target, _)| target == "stagepipe::in_flight")
        .collect();
    assert_eq!(changes.len(), limit.history().len() - 1, "one per change");
    for (level, _, message) in changes {
        assert_eq!(*level, tracing::Level::DEBUG);
        assert_eq!(message, "in-flight limit changed");
    }
}
