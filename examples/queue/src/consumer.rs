//! The consumer: a [`StreamSource`] of jobs, in batches, each job through a guarded
//! [`Call`], each batch's results written in one idempotent insert, then acknowledged.
//!
//! ```text
//! StreamSource ──► batch(100, 1 s) ──► per batch: in_flight(concurrency) Call (timeout,
//! (XREADGROUP,                          rate limit, circuit breaker) ──► one INSERT ... ON
//!  XAUTOCLAIM)                          CONFLICT DO NOTHING ──► ack the jobs written
//! ```
//!
//! A job whose work failed, or a batch the database refused, is not acknowledged: it stays
//! pending, another consumer (or this one) claims it after `claim_idle`, and after
//! `max_deliveries` it goes to the dead-letter stream. A job written but not acknowledged (the
//! process died in between) is processed again by the consumer that claims it, and the insert
//! keyed by the job's id leaves the first row as it is.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, future, stream};
use stagepipe::redis::{Message, SourceStats, StreamSource, connect};
use stagepipe::{Call, CircuitBreaker, InFlightLimit, PipelineExt, RateLimiter};

use crate::config::ConsumeConfig;
use crate::db::Db;
use crate::job::{Job, JobResult, process};

/// What a consumer did, printed as JSON when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Jobs whose work succeeded.
    pub processed: u64,
    /// Rows this consumer inserted.
    pub written: u64,
    /// Jobs processed again whose row was there already (redelivered after a crash).
    pub duplicates: u64,
    /// Jobs that failed (malformed, failed work, refused by the breaker, or a batch the
    /// database refused): left pending, for another delivery.
    pub failed: u64,
    /// The source's figures: entries read, claimed, dead-lettered, acknowledged.
    pub source: SourceStats,
}

impl Summary {
    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "processed": self.processed,
            "written": self.written,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "read": self.source.read,
            "claimed": self.source.claimed,
            "dead_lettered": self.source.dead_lettered,
            "acked": self.source.acked,
            "stale_acks": self.source.stale_acks,
            "ack_commands": self.source.ack_commands,
            "read_commands": self.source.read_commands,
        })
        .to_string()
    }
}

#[derive(Default)]
struct Counters {
    processed: AtomicU64,
    written: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
}

/// Consumes jobs until `shutdown` resolves, then drains (no new jobs, the batch in hand
/// finishes, the last acknowledgements go out) and returns what it did.
///
/// # Errors
///
/// Redis or the database cannot be reached at the start, or the last acknowledgements could
/// not be sent.
pub async fn consume(
    cfg: &ConsumeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let db = Db::connect(&cfg.db).await?;
    // The source's blocking reads hold their connection: it gets one of its own.
    let source_conn = connect(&cfg.redis).await?;
    let source = StreamSource::builder(&source_conn, &cfg.stream, &cfg.group, &cfg.consumer)
        .count(cfg.batch)
        .ack_batch(cfg.batch, cfg.batch_wait)
        .claim_idle(cfg.claim_idle)
        .max_deliveries(cfg.max_deliveries)
        .build();
    let handle = source.handle();
    let drainer = tokio::spawn({
        let handle = handle.clone();
        async move {
            shutdown.await;
            tracing::info!("draining");
            handle.drain().await
        }
    });

    let breaker = CircuitBreaker::new(cfg.breaker_threshold, cfg.breaker_open).named("jobs");
    let consumer: Arc<str> = cfg.consumer.as_str().into();
    let work = cfg.work;
    let mut call = Call::new(move |job: Job| {
        let consumer = consumer.clone();
        async move { process(job, &consumer, work).await }
    })
    .timeout(cfg.timeout)
    .circuit_breaker(&breaker);
    if let Some(rate) = cfg.rate {
        call = call.rate_limit(RateLimiter::per_second(rate));
    }
    let limit = InFlightLimit::new(cfg.concurrency);
    let counters = Counters::default();

    source
        .filter_map(|item| {
            future::ready(match item {
                Ok(msg) => Some(msg),
                Err(e) => {
                    tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "stream");
                    None
                }
            })
        })
        .batch(cfg.batch, cfg.batch_wait)
        .for_each(|batch| run_batch(batch, &call, &limit, &db, &counters))
        .await;

    let drained = drainer.await?;
    let summary = Summary {
        processed: counters.processed.load(Ordering::Relaxed),
        written: counters.written.load(Ordering::Relaxed),
        duplicates: counters.duplicates.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        source: handle.stats(),
    };
    drained?;
    Ok(summary)
}

/// One batch: every job through `call` (at most `limit` at once), the results in one insert,
/// then the acknowledgements of the jobs written.
async fn run_batch<F, Fut, R>(
    batch: Vec<Message>,
    call: &Call<F, R>,
    limit: &InFlightLimit,
    db: &Db,
    counters: &Counters,
) where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<JobResult, crate::job::JobError>> + Send + 'static,
    R: stagepipe::CallRetry<Job, crate::job::JobError>,
{
    let outcomes: Vec<(Message, Option<JobResult>)> = stream::iter(batch)
        .in_flight(limit, |msg| async move {
            let result = match Job::from_message(&msg) {
                Ok(job) => call.run(job).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(r) => (msg, Some(r)),
                Err(e) => {
                    tracing::warn!(id = msg.id(), deliveries = msg.deliveries(), error = %e, "job failed");
                    (msg, None)
                }
            }
        })
        .collect()
        .await;
    let mut done = Vec::with_capacity(outcomes.len());
    let mut results = Vec::with_capacity(outcomes.len());
    for (msg, result) in outcomes {
        match result {
            Some(r) => {
                results.push(r);
                done.push(msg);
            }
            // Not acknowledged: delivered again after `claim_idle`.
            None => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    counters
        .processed
        .fetch_add(results.len() as u64, Ordering::Relaxed);
    match db.insert(&results).await {
        Ok(inserted) => {
            counters.written.fetch_add(inserted, Ordering::Relaxed);
            counters
                .duplicates
                .fetch_add(results.len() as u64 - inserted, Ordering::Relaxed);
            for msg in done {
                msg.ack();
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = results.len(), "database write failed; the jobs will be delivered again");
            counters
                .failed
                .fetch_add(results.len() as u64, Ordering::Relaxed);
        }
    }
}
