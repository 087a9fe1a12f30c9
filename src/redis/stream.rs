//! [`StreamSource`]: a consumer-group reader of one Redis stream, as a [`Stream`] of
//! [`Message`]s that are acknowledged once their work is done.

mod message;
mod reader;
mod reply;
mod shared;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ::redis::RedisError;
use ::redis::aio::ConnectionManager;
use futures::Stream;
use futures::stream::FusedStream;
use tokio::sync::mpsc;

pub use message::{Ack, Entry, FieldError, Message};
pub use shared::{SourceHandle, SourceStats};

use self::reader::{Item, Reader};
use self::shared::{Phase, Shared};
use super::RESPONSE_TIMEOUT;
use crate::ConfigError;

/// A consumer-group reader of one Redis stream: a [`Stream`] of
/// `Result<`[`Message`]`, `[`StreamError`]`>`, each message acknowledged (`XACK`, in batches)
/// only when the work downstream says it is done.
///
/// Built with [`StreamSource::builder`]. Once polled, a task of its own (on the tokio runtime)
/// sends its commands one at a time on the connection it was given:
///
/// * **New entries**: `XREADGROUP GROUP <group> <consumer> COUNT <count> BLOCK <block>
///   STREAMS <stream> >`. The group is created on demand (`XGROUP CREATE <stream> <group> 0
///   MKSTREAM`, from the stream's first entry; an existing group is kept), unless
///   [`create_group(false)`](StreamSourceBuilder::create_group): then a missing group is the
///   error item [`StreamError::NoGroup`].
/// * **Entries of dead consumers**: at the start and every
///   [`claim_every`](StreamSourceBuilder::claim_every), `XAUTOCLAIM` takes over entries
///   pending longer than [`claim_idle`](StreamSourceBuilder::claim_idle) and hands them out
///   again, with their delivery count ([`Message::deliveries`]).
/// * **Poison entries**: an entry that would be delivered more than
///   [`max_deliveries`](StreamSourceBuilder::max_deliveries) times is moved to the
///   [dead-letter stream](StreamSourceBuilder::dead_letter) instead (`XADD`, then `XACK`,
///   atomically) and not handed out.
/// * **Acknowledgements**: [`Message::ack`] (or an [`Ack`] split off the message) queues the
///   id; the queue is sent as one `XACK <stream> <group> <id>...` when it holds
///   [`ack_batch`](StreamSourceBuilder::ack_batch)'s `max` ids or its `wait` has passed. A
///   message dropped without `ack` stays pending and is claimed again after `claim_idle`.
///   This source acknowledges each id at most once, and never hands out an id that is still
///   out.
///
/// Errors (Redis unreachable, a timeout, a malformed reply) are items, never panics: the
/// source then backs off (50 ms, doubling up to 1 s) and tries again, so the stream goes on
/// after an error; stop at the first one with `take_while` if that suits. A source has no
/// [`Unavailable`](super::Unavailable) policy: while Redis is away there is nothing to read,
/// so it yields those errors and waits; acknowledgements that fail stay queued and are sent
/// again. If Redis comes back empty (restarted without persistence), the group is created
/// again on the new stream (unless `create_group(false)`), and acknowledgements of entries it
/// no longer knows are counted in [`SourceStats::stale_acks`].
///
/// **Bounded.** The source reads only while the stream has room for one more reply: at most
/// two replies (`2 × count` messages) are read and not yet taken from the stream, so a slow
/// consumer slows the reading down.
///
/// **Shutdown.** [`handle()`](Self::handle) gives a [`SourceHandle`] whose
/// [`drain`](SourceHandle::drain) stops the reading, lets the messages handed out finish,
/// sends the last acknowledgements, and resolves; the stream ends after the messages it had
/// read. **Dropping** the stream (a `take(n)` that is done, say) stops the reading at once,
/// sends the acknowledgements made so far and ends the task; a message acknowledged after
/// that may not be acknowledged in Redis (it then stays pending and is claimed again), nor is
/// one the stream had read and not handed out. A read already sent to Redis when the stream is
/// dropped may still take up to `count` entries for this consumer during its last `block`:
/// they stay pending too.
///
/// **The connection.** A blocking read holds its connection for up to `block`, and Redis
/// answers nothing else on it meanwhile: give the source a connection of its own
/// ([`connect`](super::connect) again), not the one a limiter or breaker uses. The source caps
/// each `block` so that its own acknowledgements and claims are not late.
///
/// ```no_run
/// use futures::StreamExt;
/// use stagepipe::redis::{connect, StreamSource};
/// use std::time::Duration;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let conn = connect("redis://127.0.0.1/").await?;
/// let source = StreamSource::builder(&conn, "jobs", "workers", "worker-1")
///     .count(100)
///     .claim_idle(Duration::from_secs(30))
///     .max_deliveries(5)
///     .build();
/// let handle = source.handle();
/// tokio::spawn(async move {
///     tokio::time::sleep(Duration::from_secs(60)).await; // or until Ctrl-C
///     handle.drain().await.ok();
/// });
/// let mut messages = source;
/// while let Some(item) = messages.next().await {
///     let msg = item?;
///     println!("{}: {:?}", msg.id(), msg.text("body"));
///     msg.ack();
/// }
/// # Ok(()) }
/// ```
#[must_use = "streams do nothing unless polled"]
pub struct StreamSource {
    shared: Arc<Shared>,
    /// The task, before the first poll.
    start: Option<Box<Reader>>,
    rx: mpsc::Receiver<Item>,
    buf: std::vec::IntoIter<Message>,
    done: bool,
}

impl Drop for StreamSource {
    fn drop(&mut self) {
        if self.start.is_none() {
            self.shared.lock().stopped = true;
            self.shared.wake.notify_one();
        }
    }
}

impl StreamSource {
    /// A builder of a source reading `stream` as `consumer` of `group`, on `conn` (a clone of
    /// it: see "The connection" above).
    pub fn builder(
        conn: &ConnectionManager,
        stream: impl Into<String>,
        group: impl Into<String>,
        consumer: impl Into<String>,
    ) -> StreamSourceBuilder {
        let stream = stream.into();
        StreamSourceBuilder {
            conn: conn.clone(),
            claim_every: None,
            cfg: Config {
                dead_letter: format!("{stream}:dead"),
                stream,
                group: group.into(),
                consumer: consumer.into(),
                count: 100,
                block: Duration::from_millis(500),
                claim_idle: Duration::from_secs(30),
                claim_every: Duration::ZERO,
                max_deliveries: None,
                ack_max: 100,
                ack_wait: Duration::from_millis(100),
                create_group: true,
            },
        }
    }

    /// A handle for a graceful shutdown and the figures, usable after the stream has moved
    /// into a pipeline.
    pub fn handle(&self) -> SourceHandle {
        SourceHandle {
            shared: self.shared.clone(),
        }
    }

    /// The source's figures so far (as [`SourceHandle::stats`]).
    pub fn stats(&self) -> SourceStats {
        self.handle().stats()
    }
}

impl Stream for StreamSource {
    type Item = Result<Message, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(reader) = this.start.take() {
            let mut state = this.shared.lock();
            if state.phase == Phase::Finished {
                // Drained before it started.
                drop(state);
                this.done = true;
                return Poll::Ready(None);
            }
            state.phase = Phase::Running;
            drop(state);
            tokio::spawn(reader.run());
        }
        if let Some(msg) = this.buf.next() {
            return Poll::Ready(Some(Ok(msg)));
        }
        match ready!(this.rx.poll_recv(cx)) {
            Some(Ok(batch)) => {
                this.buf = batch.into_iter();
                Poll::Ready(this.buf.next().map(Ok))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            (self.buf.len(), None)
        }
    }
}

impl FusedStream for StreamSource {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSource")
            .field("buffered", &self.buf.len())
            .field("started", &self.start.is_none())
            .field("done", &self.done)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The settings of a [`StreamSource`].
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) stream: String,
    pub(super) group: String,
    pub(super) consumer: String,
    pub(super) count: usize,
    pub(super) block: Duration,
    pub(super) claim_idle: Duration,
    pub(super) claim_every: Duration,
    pub(super) max_deliveries: Option<u32>,
    pub(super) dead_letter: String,
    pub(super) ack_max: usize,
    pub(super) ack_wait: Duration,
    pub(super) create_group: bool,
}

/// Builds a [`StreamSource`]: [`StreamSource::builder`], options, then
/// [`build`](Self::build).
pub struct StreamSourceBuilder {
    conn: ConnectionManager,
    claim_every: Option<Duration>,
    cfg: Config,
}

impl StreamSourceBuilder {
    /// The most entries one read (`XREADGROUP ... COUNT`) or claim takes. Default 100.
    pub fn count(mut self, count: usize) -> Self {
        self.cfg.count = count;
        self
    }

    /// How long a read waits for new entries when there are none (`BLOCK`). Default 500 ms;
    /// it must be shorter than the connection's response timeout
    /// ([`RESPONSE_TIMEOUT`](super::RESPONSE_TIMEOUT), 1 s). A drain waits for the read in
    /// progress, so this is also about how long a drain takes to stop reading.
    pub fn block(mut self, block: Duration) -> Self {
        self.cfg.block = block;
        self
    }

    /// How long an entry must have been pending (delivered, not acknowledged) before this
    /// source claims it from its consumer, taken to be dead. Longer than the longest work on
    /// one message, or slow work is delivered twice. Default 30 s.
    pub fn claim_idle(mut self, claim_idle: Duration) -> Self {
        self.cfg.claim_idle = claim_idle;
        self
    }

    /// How often the source looks for entries to claim (at its start, then this often).
    /// Default: half of `claim_idle`.
    pub fn claim_every(mut self, claim_every: Duration) -> Self {
        self.claim_every = Some(claim_every);
        self
    }

    /// The most times an entry is delivered: one claimed for the `max_deliveries + 1`-th
    /// time goes to the dead-letter stream instead. Default: no limit.
    pub fn max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.cfg.max_deliveries = Some(max_deliveries);
        self
    }

    /// The stream that entries delivered more than `max_deliveries` times are moved to, with
    /// their fields and four more: `stagepipe-stream`, `stagepipe-group`, `stagepipe-id` (the
    /// entry's id in its stream) and `stagepipe-deliveries`. Default `"<stream>:dead"`.
    pub fn dead_letter(mut self, stream: impl Into<String>) -> Self {
        self.cfg.dead_letter = stream.into();
        self
    }

    /// Acknowledgements are sent as one `XACK` of up to `max` ids, as soon as `max` are
    /// queued or `wait` after the first of them. Default `(100, 100 ms)`.
    pub fn ack_batch(mut self, max: usize, wait: Duration) -> Self {
        self.cfg.ack_max = max;
        self.cfg.ack_wait = wait;
        self
    }

    /// Whether the source creates its group when it is missing (the default), starting at
    /// the stream's first entry. With `false`, a missing group is the error item
    /// [`StreamError::NoGroup`] (and the source retries).
    pub fn create_group(mut self, create: bool) -> Self {
        self.cfg.create_group = create;
        self
    }

    /// The source. Nothing is sent to Redis before the stream is first polled (which must be
    /// on a tokio runtime).
    ///
    /// # Panics
    ///
    /// A zero `count`, `claim_idle`, `claim_every`, `max_deliveries` or ack batch `max`, or a
    /// `block` that is zero or not shorter than [`RESPONSE_TIMEOUT`]; the message names the
    /// parameter. [`try_build`](Self::try_build) returns the error instead.
    #[track_caller]
    pub fn build(self) -> StreamSource {
        self.try_build().unwrap_or_else(|e| e.panic())
    }

    /// As [`build`](Self::build), returning an invalid setting as an error.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid parameter.
    pub fn try_build(self) -> Result<StreamSource, ConfigError> {
        let mut cfg = self.cfg;
        if cfg.count == 0 {
            return Err(ConfigError::new("count", "must be greater than zero"));
        }
        if cfg.block < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "block",
                "must be at least one millisecond",
            ));
        }
        if cfg.block >= RESPONSE_TIMEOUT {
            return Err(ConfigError::new(
                "block",
                "must be shorter than the connection's response timeout (1 s)",
            ));
        }
        if cfg.claim_idle.is_zero() {
            return Err(ConfigError::new("claim_idle", "must be greater than zero"));
        }
        if self.claim_every.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("claim_every", "must be greater than zero"));
        }
        if cfg.max_deliveries == Some(0) {
            return Err(ConfigError::new(
                "max_deliveries",
                "must be greater than zero",
            ));
        }
        if cfg.ack_max == 0 {
            return Err(ConfigError::new("max", "must be greater than zero"));
        }
        cfg.claim_every = self
            .claim_every
            .unwrap_or(cfg.claim_idle / 2)
            .max(Duration::from_millis(1));
        let shared = Arc::new(Shared::new(cfg.ack_max));
        let (tx, rx) = mpsc::channel(1);
        let reader = Reader::new(self.conn, cfg, shared.clone(), tx);
        Ok(StreamSource {
            shared,
            start: Some(Box::new(reader)),
            rx,
            buf: Vec::new().into_iter(),
            done: false,
        })
    }
}

impl_debug!(impl[] StreamSourceBuilder => StreamSourceBuilder |this| {
    config: &this.cfg,
    claim_every: &this.claim_every,
} ..);

/// An error item of a [`StreamSource`]. The source goes on after it (backing off first).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StreamError {
    /// A command failed: Redis unreachable, a timeout, an error reply, or a reply of an
    /// unexpected shape.
    Redis {
        /// The command: `"XREADGROUP"`, `"XAUTOCLAIM"` (the claim), `"XACK"` or
        /// `"XGROUP CREATE"`.
        command: &'static str,
        /// What Redis (or the connection) said.
        error: RedisError,
    },
    /// The consumer group does not exist, and the source was built with
    /// [`create_group(false)`](StreamSourceBuilder::create_group).
    NoGroup {
        /// The stream.
        stream: String,
        /// The missing group.
        group: String,
    },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Redis { command, .. } => write!(f, "`{command}` failed"),
            StreamError::NoGroup { stream, group } => write!(
                f,
                "consumer group `{group}` of stream `{stream}` does not exist (and the source \
                 may not create it)"
            ),
        }
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StreamError::Redis { error, .. } => Some(error),
            StreamError::NoGroup { .. } => None,
        }
    }
}
