//! A resilient client: fetch pages from a flaky API and store them in a flaky database.
//!
//! * `rate_limit` paces the requests to the API (one shared quota for the whole client);
//! * `in_flight` makes up to 8 first attempts at once;
//! * `retry_if` retries the transient failures one at a time with exponential backoff, pausing
//!   the stream meanwhile, and gives the request id back when it gives up (or at once on a
//!   permanent error);
//! * `circuit_breaker` protects the database: after 3 failed writes in a row it stops writing
//!   for a while, hands the pages back, and lets one trial write through later;
//! * `with_stats` counts what came out and where the time went.
//!
//! Run with `cargo run --example resilient_client`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};

#[derive(Debug, Clone, PartialEq)]
enum FetchError {
    /// Worth another try.
    Unavailable,
    /// Will never succeed.
    NotFound,
}

#[derive(Debug, Clone)]
struct Page {
    id: u32,
    body: String,
}

/// The flaky API: every third request fails the first time, id 13 does not exist.
struct Api {
    attempts: std::sync::Mutex<std::collections::HashMap<u32, u32>>,
}

impl Api {
    async fn fetch(&self, id: u32) -> Result<Page, FetchError> {
        sleep(Duration::from_millis(2)).await;
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(id).or_default();
            *n += 1;
            *n
        };
        match id {
            13 => Err(FetchError::NotFound),
            _ if id % 3 == 0 && attempt == 1 => Err(FetchError::Unavailable),
            _ => Ok(Page {
                id,
                body: format!("page {id}"),
            }),
        }
    }
}

/// The flaky database: down for writes 6 to 9, then back.
async fn store(writes: &AtomicU32, page: &Page) -> Result<(), String> {
    sleep(Duration::from_millis(1)).await;
    let n = writes.fetch_add(1, Ordering::SeqCst);
    if (6..=9).contains(&n) {
        Err(format!("database down (write {n})"))
    } else {
        let _ = &page.body;
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let api = Arc::new(Api {
        attempts: Default::default(),
    });
    let writes = Arc::new(AtomicU32::new(0));

    // Shared handles: every stream of this client would draw on the same quota and breaker.
    let limiter = RateLimiter::per_second(200).burst(5);
    let backoff = Backoff::exponential(Duration::from_millis(5)).max_attempts(4);
    let breaker = CircuitBreaker::new(3, Duration::from_millis(20));

    let start = Instant::now();
    let stats = Stats::new("client");
    let results: Vec<_> = stream::iter(1..=30u32)
        .rate_limit(&limiter)
        // First attempts, up to 8 at once; a failure carries its id on to the retry step.
        .in_flight(8, |id| {
            let api = api.clone();
            async move { api.fetch(id).await.map_err(|e| (id, e)) }
        })
        // Transient failures are fetched again, one at a time, with backoff.
        .retry_if(
            backoff,
            {
                let api = api.clone();
                move |first: Result<Page, (u32, FetchError)>| {
                    let api = api.clone();
                    async move {
                        match first {
                            Ok(page) => Ok(page),
                            Err((id, _)) => api.fetch(id).await,
                        }
                    }
                }
            },
            |e: &FetchError| *e == FetchError::Unavailable,
        )
        .circuit_breaker(&breaker, {
            let writes = writes.clone();
            move |fetched| {
                let writes = writes.clone();
                async move {
                    match fetched {
                        // Fetched: write it; a write error counts against the breaker.
                        Ok(page) => store(&writes, &page).await.map(|()| Ok(page.id)),
                        // Not fetched: nothing to write, pass the fetch error on.
                        Err(gave_up) => Ok(Err(gave_up)),
                    }
                }
            }
        })
        .with_stats(&stats)
        .collect()
        .await;

    let (mut stored, mut not_fetched, mut write_failed, mut rejected) = (0, 0, 0, 0);
    for result in &results {
        match result {
            Ok(Ok(_id)) => stored += 1,
            Ok(Err(gave_up)) => {
                not_fetched += 1;
                println!(
                    "request {:?} not fetched: {:?} after {} more attempt(s)",
                    gave_up.item, gave_up.error, gave_up.attempts
                );
            }
            Err(BreakerError::Failed(e)) => {
                write_failed += 1;
                println!("write failed: {e}");
            }
            Err(BreakerError::Open(fetched)) => {
                rejected += 1;
                match fetched {
                    Ok(page) => println!("page {} not written: breaker open", page.id),
                    Err(gave_up) => {
                        println!(
                            "request {:?} not fetched: {:?}",
                            gave_up.item, gave_up.error
                        )
                    }
                }
            }
        }
    }
    println!(
        "{} requests in {:?}: {stored} stored, {not_fetched} not fetched, {write_failed} writes failed, \
         {rejected} rejected by the breaker (now {})",
        results.len(),
        start.elapsed(),
        breaker.state(),
    );
    println!("{}", stats.snapshot());
}
