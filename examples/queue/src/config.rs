//! The command line, and the consumer's settings it makes.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// `stagepipe-queue`: a queue of jobs on a Redis stream, consumed by a fleet of processes.
#[derive(Debug, Parser)]
#[command(name = "stagepipe-queue", version, about)]
pub struct Cli {
    /// The Redis server.
    #[arg(
        long,
        env = "STAGEPIPE_QUEUE_REDIS",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis: String,
    /// The stream of jobs.
    #[arg(long, default_value = "jobs")]
    pub stream: String,
    /// The consumer group that shares the jobs.
    #[arg(long, default_value = "workers")]
    pub group: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The two halves of a queue.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Adds jobs to the stream.
    Produce {
        /// How many jobs.
        #[arg(long)]
        jobs: u64,
        /// The id of the first job (the next ones count up).
        #[arg(long, default_value_t = 0)]
        first: i64,
    },
    /// Consumes jobs until Ctrl-C (or SIGINT), then drains and prints a summary (JSON).
    Consume(ConsumeArgs),
}

/// The consumer's options.
#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    /// This consumer's name in the group (default: `consumer-<pid>`).
    #[arg(long)]
    pub consumer: Option<String>,
    /// Where results go: `sqlite://path` or `postgres://...`.
    #[arg(long, default_value = "sqlite://queue.db")]
    pub db: String,
    /// Jobs per batch (and per read, and per database write).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// The longest a batch waits to fill up, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub batch_wait_ms: u64,
    /// Jobs of a batch worked on at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// The most jobs per second the whole fleet starts (no limit if absent).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Consecutive failed jobs (fleet-wide) that open the circuit breaker.
    #[arg(long, default_value_t = 20)]
    pub breaker_threshold: u32,
    /// How long the breaker stays open, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub breaker_open_ms: u64,
    /// The longest one job may take, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// How long a job stays unacknowledged before another consumer claims it, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub claim_idle_ms: u64,
    /// Deliveries before a job goes to the dead-letter stream (`<stream>:dead`).
    #[arg(long, default_value_t = 5)]
    pub max_deliveries: u32,
    /// Simulated work per job, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub work_ms: u64,
    /// How long a job done stays remembered by the fleet's dedupe window, in milliseconds.
    #[arg(long, default_value_t = 86_400_000)]
    pub dedupe_window_ms: u64,
    /// How long a consumer's claim on a job holds before it lapses (the consumer died), in
    /// milliseconds. Keep it above the job timeout.
    #[arg(long, default_value_t = 15_000)]
    pub dedupe_lease_ms: u64,
}

/// Everything a consumer needs, resolved.
#[derive(Debug, Clone)]
pub struct ConsumeConfig {
    /// The Redis server's URL.
    pub redis: String,
    /// The stream of jobs.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// This consumer's name.
    pub consumer: String,
    /// The database URL.
    pub db: String,
    /// Jobs per batch.
    pub batch: usize,
    /// The longest a batch waits to fill up.
    pub batch_wait: Duration,
    /// Jobs of a batch worked on at once.
    pub concurrency: usize,
    /// Jobs per second, if limited.
    pub rate: Option<u32>,
    /// Consecutive failures that open the breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open.
    pub breaker_open: Duration,
    /// The longest one job may take.
    pub timeout: Duration,
    /// How long before an unacknowledged job is claimed by another consumer.
    pub claim_idle: Duration,
    /// Deliveries before the dead-letter stream.
    pub max_deliveries: u32,
    /// Simulated work per job.
    pub work: Duration,
    /// How long a job done stays remembered.
    pub dedupe_window: Duration,
    /// How long a claim on a job holds.
    pub dedupe_lease: Duration,
}

impl ConsumeConfig {
    /// The settings of `args` for `stream` and `group` on the server at `redis`.
    pub fn new(redis: &str, stream: &str, group: &str, args: &ConsumeArgs) -> Self {
        ConsumeConfig {
            redis: redis.to_owned(),
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: args
                .consumer
                .clone()
                .unwrap_or_else(|| format!("consumer-{}", std::process::id())),
            db: args.db.clone(),
            batch: args.batch,
            batch_wait: Duration::from_millis(args.batch_wait_ms),
            concurrency: args.concurrency,
            rate: args.rate,
            breaker_threshold: args.breaker_threshold,
            breaker_open: Duration::from_millis(args.breaker_open_ms),
            timeout: Duration::from_millis(args.timeout_ms),
            claim_idle: Duration::from_millis(args.claim_idle_ms),
            max_deliveries: args.max_deliveries,
            work: Duration::from_millis(args.work_ms),
            dedupe_window: Duration::from_millis(args.dedupe_window_ms),
            dedupe_lease: Duration::from_millis(args.dedupe_lease_ms),
        }
    }
}
