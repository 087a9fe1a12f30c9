//! `CircuitBreaker::named`: the breaker's `tracing` events carry its name.
//!
//! Alone in its own test binary, like `circuit_breaker_events.rs`: `tracing` caches whether a
//! call site is wanted the first time it is hit, so a test hitting the breaker's call sites with
//! no subscriber could switch them off here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stagepipe::prelude::*;
use tokio::time::advance;

/// The `name` field and the message of an event.
type Event = (Option<String>, String);

/// A subscriber that records every event.
struct Recorder(Arc<Mutex<Vec<Event>>>);

#[derive(Default)]
struct Fields {
    name: Option<String>,
    message: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "name" {
            self.name = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "name" => self.name = Some(format!("{value:?}")),
            _ => {}
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
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0.lock().unwrap().push((fields.name, fields.message));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_named_breaker_s_events_carry_its_name() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let _guard = tracing::subscriber::set_default(Recorder(events.clone()));
    let payments = CircuitBreaker::new(1, Duration::from_millis(10)).named("payments");
    let anonymous = CircuitBreaker::new(1, Duration::from_millis(10));
    assert_eq!(
        (payments.name(), anonymous.name()),
        (Some("payments"), None)
    );
    assert!(format!("{payments:?}").contains("payments"));

    payments
        .call(async { Err::<(), _>("down") })
        .await
        .unwrap_err();
    anonymous
        .call(async { Err::<(), _>("down") })
        .await
        .unwrap_err();
    advance(Duration::from_millis(10)).await;
    payments.call(async { Ok::<_, &str>(()) }).await.unwrap();

    let events = events.lock().unwrap().clone();
    let payments = Some("payments".to_string());
    assert_eq!(
        events,
        [
            (payments.clone(), "circuit breaker opened".to_string()),
            (None, "circuit breaker opened".to_string()),
            (
                payments.clone(),
                "circuit breaker half-open: trial call".to_string()
            ),
            (
                payments,
                "circuit breaker closed: trial call succeeded".to_string()
            ),
        ]
    );
}

#[test]
fn naming_builds_a_closed_breaker_with_the_same_configuration() {
    let breaker = CircuitBreaker::new(3, Duration::from_secs(2)).named(String::from("search"));
    assert_eq!(breaker.failure_threshold(), 3);
    assert_eq!(breaker.open_for(), Duration::from_secs(2));
    assert_eq!(breaker.state(), CircuitState::Closed);
}
