//! stagepipe scaled out on Redis: a queue consumer on Redis Streams.
//!
//! `stagepipe-queue produce --jobs N` adds N jobs to a stream; `stagepipe-queue consume` reads
//! them as one consumer of a consumer group ([`stagepipe::redis::StreamSource`]), batches
//! them, runs each job through a [`stagepipe::Call`] guarded by a rate limiter and a circuit
//! breaker, writes the results to SQLite or Postgres (one idempotent insert per batch, keyed
//! by the job's id), and acknowledges the jobs written. Start several consumers on one stream
//! and they share the work; kill one and the others claim the jobs it had not acknowledged.
//! Ctrl-C drains: no new jobs, the batch in hand finishes, the last acknowledgements go out.
//!
//! The parts, for the tests and the benchmark:
//!
//! * [`config`]: the command line and the consumer's settings;
//! * [`job`]: a job, read from a stream entry, and its (trivial) work;
//! * [`producer`]: adding jobs to the stream;
//! * [`db`]: the results table, on SQLite or Postgres;
//! * [`consumer`]: the consumer's pipeline;
//! * [`server`]: a throwaway `redis-server` for tests and benchmarks.

pub mod config;
pub mod consumer;
pub mod db;
pub mod job;
pub mod producer;
pub mod server;
