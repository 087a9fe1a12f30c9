//! The consumer: a [`StreamSource`] of jobs, in batches, each job claimed in the fleet's
//! dedupe window and run through a [`Call`] guarded by the fleet's rate limit and circuit
//! breaker (all three shared through Redis), each batch's results written in one idempotent
//! insert, then marked done and acknowledged.
//!
//! ```text
//! StreamSource ──► batch(100, 1 s) ──► per job (in_flight): DedupeWindow::claim ──► Call
//! (XREADGROUP,                          (timeout, RateLimiter::redis, CircuitBreaker::redis))
//!  XAUTOCLAIM)     ──► per batch: INSERT ... ON CONFLICT DO NOTHING ──► claim.done() ──► ack
//! ```
//!
//! What happens to a job that comes back (redelivered after a crash, or claimed from a slow
//! consumer):
//!
//! * its previous run finished (marked done): the dedupe window says so, and the job is
//!   acknowledged without running again;
//! * its previous run is still under a live claim (a slow consumer, or a dead one whose lease
//!   has not lapsed): it is left pending, to come back after `claim_idle`;
//! * its previous run died between the insert and `done`: it runs again, and the insert keyed
//!   by the job's id leaves the first row as it is.
//!
//! A job whose work failed, or a batch the database refused, is not acknowledged: it comes
//! back after `claim_idle`, and after `max_deliveries` it goes to the dead-letter stream.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, future, stream};
use stagepipe::redis::{Claim, DedupeWindow, Message, SourceStats, StreamSource, connect};
use stagepipe::{Call, CallRetry, CircuitBreaker, InFlightLimit, PipelineExt, Quota, RateLimiter};

use crate::config::ConsumeConfig;
use crate::db::Db;
use crate::job::{Job, JobError, JobResult, process};

/// What a consumer did, printed as JSON when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Jobs whose work succeeded.
    pub processed: u64,
    /// Rows this consumer inserted.
    pub written: u64,
    /// Jobs processed again whose row was there already (a run that died between the insert
    /// and marking the job done).
    pub duplicates: u64,
    /// Jobs acknowledged without running: done already, says the dedupe window.
    pub skipped: u64,
    /// Jobs left pending because another consumer's claim holds them.
    pub held: u64,
    /// Jobs that failed (malformed, failed work, refused by the breaker or the dedupe window,
    /// or a batch the database refused): left pending, for another delivery.
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
            "skipped": self.skipped,
            "held": self.held,
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
    skipped: AtomicU64,
    held: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The dedupe window the consumers of `stream` in `group` share.
pub fn dedupe_window(
    conn: &stagepipe::redis::ConnectionManager,
    cfg: &ConsumeConfig,
) -> DedupeWindow {
    DedupeWindow::redis(
        conn,
        &format!("{}:{}", cfg.stream, cfg.group),
        cfg.dedupe_window,
    )
    .claim_lease(cfg.dedupe_lease)
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
    // The source's blocking reads hold their connection: it gets one of its own; the limiter,
    // breaker and dedupe window share another.
    let source_conn = connect(&cfg.redis).await?;
    let conn = connect(&cfg.redis).await?;
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

    let name = format!("{}:jobs", cfg.stream);
    let breaker = CircuitBreaker::redis(&conn, &name, cfg.breaker_threshold, cfg.breaker_open);
    let consumer: Arc<str> = cfg.consumer.as_str().into();
    let work = cfg.work;
    let mut call = Call::new(move |job: Job| {
        let consumer = consumer.clone();
        async move { process(job, &consumer, work).await }
    })
    .timeout(cfg.timeout)
    .circuit_breaker(&breaker);
    if let Some(rate) = cfg.rate.and_then(NonZeroU32::new) {
        call = call.rate_limit(RateLimiter::redis(&conn, &name, Quota::per_second(rate)));
    }
    let worker = Worker {
        call,
        window: dedupe_window(&conn, cfg),
        limit: InFlightLimit::new(cfg.concurrency),
        db,
        counters: Counters::default(),
    };

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
        .for_each(|batch| worker.run_batch(batch))
        .await;

    let drained = drainer.await?;
    let c = &worker.counters;
    let summary = Summary {
        processed: c.processed.load(Ordering::Relaxed),
        written: c.written.load(Ordering::Relaxed),
        duplicates: c.duplicates.load(Ordering::Relaxed),
        skipped: c.skipped.load(Ordering::Relaxed),
        held: c.held.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        source: handle.stats(),
    };
    drained?;
    Ok(summary)
}

struct Worker<F, R> {
    call: Call<F, R>,
    window: DedupeWindow,
    limit: InFlightLimit,
    db: Db,
    counters: Counters,
}

/// What became of one job of a batch.
enum Outcome {
    /// Worked: write the result, mark the claim done, acknowledge.
    Ran(JobResult, Claim),
    /// Done already: acknowledge.
    Skip,
    /// Leave it pending.
    Hold,
}

impl<F, Fut, R> Worker<F, R>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<JobResult, JobError>> + Send + 'static,
    R: CallRetry<Job, JobError>,
{
    /// One job: claimed in the dedupe window, then run.
    async fn run_job(&self, msg: &Message) -> Outcome {
        let job = match Job::from_message(msg) {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(id = msg.id(), deliveries = msg.deliveries(), error = %e, "malformed job");
                Counters::add(&self.counters.failed, 1);
                return Outcome::Hold;
            }
        };
        let claim = match self.window.claim(job.id).await {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                return if self.window.is_done(job.id).await.unwrap_or(false) {
                    Counters::add(&self.counters.skipped, 1);
                    Outcome::Skip
                } else {
                    Counters::add(&self.counters.held, 1);
                    Outcome::Hold
                };
            }
            Err(e) => {
                tracing::warn!(job = job.id, error = %e, "dedupe window unavailable");
                Counters::add(&self.counters.failed, 1);
                return Outcome::Hold;
            }
        };
        match self.call.run(job).await {
            Ok(result) => Outcome::Ran(result, claim),
            Err(e) => {
                tracing::warn!(id = msg.id(), deliveries = msg.deliveries(), error = %e, "job failed");
                Counters::add(&self.counters.failed, 1);
                Outcome::Hold // the claim drops: a redelivery may run it
            }
        }
    }

    /// One batch: every job (at most `limit` at once), the results in one insert, then the
    /// claims marked done and the messages acknowledged.
    async fn run_batch(&self, batch: Vec<Message>) {
        let outcomes: Vec<(Message, Outcome)> = stream::iter(batch)
            .in_flight(&self.limit, |msg| async move {
                let outcome = self.run_job(&msg).await;
                (msg, outcome)
            })
            .collect()
            .await;
        let mut ran = Vec::with_capacity(outcomes.len());
        let mut results = Vec::with_capacity(outcomes.len());
        for (msg, outcome) in outcomes {
            match outcome {
                Outcome::Ran(result, claim) => {
                    results.push(result);
                    ran.push((msg, claim));
                }
                Outcome::Skip => msg.ack(),
                Outcome::Hold => drop(msg), // pending: delivered again after `claim_idle`
            }
        }
        Counters::add(&self.counters.processed, results.len());
        match self.db.insert(&results).await {
            Ok(inserted) => {
                let inserted = usize::try_from(inserted).unwrap_or(usize::MAX);
                Counters::add(&self.counters.written, inserted);
                Counters::add(
                    &self.counters.duplicates,
                    results.len().saturating_sub(inserted),
                );
                let (msgs, claims): (Vec<Message>, Vec<Claim>) = ran.into_iter().unzip();
                let marked = future::join_all(claims.into_iter().map(Claim::done)).await;
                for (msg, marked) in msgs.into_iter().zip(marked) {
                    if let Err(e) = marked {
                        // Written, but not remembered as done: a redelivery runs it again
                        // and the insert leaves the row as it is.
                        tracing::warn!(id = msg.id(), error = %e, "job not marked done");
                    }
                    msg.ack();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = results.len(), "database write failed; the jobs will be delivered again");
                Counters::add(&self.counters.failed, results.len());
                // Messages and claims drop: the jobs are pending and unclaimed.
            }
        }
    }
}
