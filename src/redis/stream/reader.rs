//! The source's task: one loop that sends the source's commands one at a time, so none of
//! them ever queues behind the source's own blocking read. It reads new entries, claims idle
//! ones (moving the over-delivered to the dead-letter stream) and sends the acknowledgements in
//! batches; then, when draining, stops reading and waits for the messages out to settle.

use std::future::poll_fn;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{RedisError, Script, Value};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::message::{Ack, Entry, Message};
use super::reply::{self, RawEntry};
use super::shared::{Counters, Shared};
use super::{Config, StreamError};
use crate::time::deadline;

/// What the stream receives: a batch of messages (never empty), or an error.
pub(super) type Item = Result<Vec<Message>, StreamError>;

/// Claims entries idle for at least ARGV[3] ms (`XAUTOCLAIM` from cursor ARGV[4], `COUNT`
/// ARGV[5]) for consumer ARGV[2] of group ARGV[1] on stream KEYS[1], reads each one's delivery
/// count, and moves every entry delivered more than ARGV[6] times (0: no limit) to the
/// dead-letter stream KEYS[2] (`XADD` with its fields and where it came from, then `XACK`), in
/// one atomic step. Returns `{cursor, {{id, fields, deliveries}, ...}, {dead-lettered id, ...}}`.
const CLAIM: &str = r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local max = tonumber(ARGV[6])
local out, dead = {}, {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local id = e[1]
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local n = 1
    if p[1] then n = p[1][4] end
    if max > 0 and n > max then
      local f = e[2]
      f[#f + 1] = 'stagepipe-stream'
      f[#f + 1] = KEYS[1]
      f[#f + 1] = 'stagepipe-group'
      f[#f + 1] = ARGV[1]
      f[#f + 1] = 'stagepipe-id'
      f[#f + 1] = id
      f[#f + 1] = 'stagepipe-deliveries'
      f[#f + 1] = tostring(n)
      redis.call('XADD', KEYS[2], '*', unpack(f))
      redis.call('XACK', KEYS[1], ARGV[1], id)
      dead[#dead + 1] = id
    else
      out[#out + 1] = {id, e[2], n}
    end
  end
end
return {r[1], out, dead}
";

/// The first pause after a failed command; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How many times a drain tries to send its last acknowledgements.
const FINAL_ATTEMPTS: u32 = 3;

pub(super) struct Reader {
    pub(super) conn: ConnectionManager,
    pub(super) cfg: Config,
    pub(super) shared: Arc<Shared>,
    pub(super) tx: Option<mpsc::Sender<Item>>,
    script: Script,
    /// Where the next claim starts.
    cursor: String,
    next_claim: Instant,
    /// An error to hand to the stream with the next free slot (a failed `XACK`).
    report: Option<StreamError>,
    backoff: Duration,
}

/// Marks the task finished however it ends: returned, or aborted with its stream.
struct FinishOnDrop(Arc<Shared>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

enum Woken<'a> {
    Permit(mpsc::Permit<'a, Item>),
    Closed,
    Other,
}

fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

impl Reader {
    pub(super) fn new(
        conn: ConnectionManager,
        cfg: Config,
        shared: Arc<Shared>,
        tx: mpsc::Sender<Item>,
    ) -> Self {
        Reader {
            conn,
            cfg,
            shared,
            tx: Some(tx),
            script: Script::new(CLAIM),
            cursor: "0-0".to_owned(),
            next_claim: Instant::now(),
            report: None,
            backoff: MIN_BACKOFF,
        }
    }

    pub(super) async fn run(mut self) {
        let _finish = FinishOnDrop(self.shared.clone());
        if self.cfg.create_group {
            if let Err(e) = self.create_group().await {
                self.report = Some(e);
            }
        }
        self.read_loop().await;
        self.tx = None; // the stream hands out what it holds, then ends
        if self.stopped() {
            // The stream is gone: send what was acknowledged so far, once, and stop.
            if let Err(e) = self.flush_all().await {
                tracing::warn!(
                    target: "stagepipe::redis",
                    stream = %self.cfg.stream,
                    error = %e,
                    "acknowledgements not sent as the stream was dropped: those entries stay pending"
                );
            }
        } else {
            self.settle_loop().await;
        }
    }

    /// Draining, or the stream dropped: no more reading.
    fn draining(&self) -> bool {
        let state = self.shared.lock();
        state.draining || state.stopped
    }

    fn stopped(&self) -> bool {
        self.shared.lock().stopped
    }

    async fn flush_all(&mut self) -> Result<(), StreamError> {
        while !self.shared.lock().queued.is_empty() {
            self.flush().await?;
        }
        Ok(())
    }

    /// When the acknowledgements queued now must be sent, if any are.
    fn ack_deadline(&self) -> Option<Instant> {
        let state = self.shared.lock();
        if state.queued.len() >= self.cfg.ack_max {
            Some(Instant::now())
        } else {
            state
                .queued_since
                .map(|since| deadline(since, self.cfg.ack_wait))
        }
    }

    async fn read_loop(&mut self) {
        loop {
            if self.draining() {
                return;
            }
            let ack_deadline = self.ack_deadline();
            if ack_deadline.is_some_and(|d| d <= Instant::now()) {
                if let Err(e) = self.flush().await {
                    self.report = Some(e);
                    self.pause().await;
                }
                continue;
            }
            let Some(tx) = self.tx.clone() else { return };
            let permit = match wait(&self.shared, Some(&tx), ack_deadline).await {
                Woken::Permit(p) => p,
                Woken::Closed => {
                    self.shared.lock().stopped = true;
                    return;
                }
                Woken::Other => continue,
            };
            if let Some(e) = self.report.take() {
                permit.send(Err(e));
                continue;
            }
            let result = if self.next_claim <= Instant::now() {
                self.claim().await
            } else {
                self.read().await
            };
            match result {
                Ok(batch) => {
                    self.backoff = MIN_BACKOFF;
                    if !batch.is_empty() {
                        permit.send(Ok(batch));
                    }
                }
                Err(e) => {
                    permit.send(Err(e));
                    self.pause().await;
                }
            }
        }
    }

    /// Draining: waits for the messages out to settle, sending their acknowledgements.
    async fn settle_loop(&mut self) {
        let mut failures = 0;
        loop {
            let (idle, queued) = {
                let state = self.shared.lock();
                (state.outstanding.is_empty(), !state.queued.is_empty())
            };
            let ack_deadline = self.ack_deadline();
            if queued && (idle || ack_deadline.is_some_and(|d| d <= Instant::now())) {
                match self.flush().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures >= FINAL_ATTEMPTS {
                            tracing::warn!(
                                target: "stagepipe::redis",
                                stream = %self.cfg.stream,
                                error = %e,
                                "the last acknowledgements were not sent: those entries stay pending"
                            );
                            self.shared.lock().final_error = Some(e);
                            return;
                        }
                        self.pause().await;
                    }
                }
                continue;
            }
            if idle && !queued {
                return;
            }
            wait(&self.shared, None, ack_deadline).await;
        }
    }

    /// Waits out the backoff after a failed command (cut short by a drain), and doubles it.
    async fn pause(&mut self) {
        let until = deadline(Instant::now(), self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        while Instant::now() < until && !self.draining() {
            wait(&self.shared, None, Some(until)).await;
        }
    }

    fn failed(&self, command: &'static str, error: RedisError) -> StreamError {
        Counters::add(&self.shared.counters.errors, 1);
        tracing::warn!(target: "stagepipe::redis", stream = %self.cfg.stream, %error, "{command} failed");
        StreamError::Redis { command, error }
    }

    async fn create_group(&mut self) -> Result<(), StreamError> {
        let created: Result<Value, _> = ::redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.cfg.stream)
            .arg(&self.cfg.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(self.failed("XGROUP CREATE", e)),
        }
    }

    /// A missing group: created again if the source may, else the error that says so.
    async fn no_group(&mut self) -> Result<(), StreamError> {
        if self.cfg.create_group {
            self.create_group().await
        } else {
            Counters::add(&self.shared.counters.errors, 1);
            Err(StreamError::NoGroup {
                stream: self.cfg.stream.clone(),
                group: self.cfg.group.clone(),
            })
        }
    }

    /// How long the next read may block: its `block`, but no later than the next claim or
    /// the moment acknowledgements must go out (the read holds the connection until then).
    fn block_for(&self, now: Instant) -> Duration {
        let mut block = self
            .cfg
            .block
            .min(self.next_claim.saturating_duration_since(now));
        let state = self.shared.lock();
        if let Some(since) = state.queued_since {
            block = block.min(deadline(since, self.cfg.ack_wait).saturating_duration_since(now));
        } else if !state.outstanding.is_empty() {
            block = block.min(self.cfg.ack_wait);
        }
        block.max(Duration::from_millis(1))
    }

    async fn read(&mut self) -> Result<Vec<Message>, StreamError> {
        for attempt in 0..2 {
            let block = self.block_for(Instant::now());
            Counters::add(&self.shared.counters.read_commands, 1);
            let reply: Result<Value, _> = ::redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg("COUNT")
                .arg(self.cfg.count)
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
                .arg("STREAMS")
                .arg(&self.cfg.stream)
                .arg(">")
                .query_async(&mut self.conn)
                .await;
            match reply {
                Ok(v) => {
                    let entries = reply::read(v).map_err(|e| self.failed("XREADGROUP", e))?;
                    Counters::add(&self.shared.counters.read, entries.len());
                    return Ok(self.hand_out(entries));
                }
                Err(e) if is_nogroup(&e) && attempt == 0 => self.no_group().await?,
                Err(e) => return Err(self.failed("XREADGROUP", e)),
            }
        }
        Ok(Vec::new())
    }

    async fn claim(&mut self) -> Result<Vec<Message>, StreamError> {
        let now = Instant::now();
        // Whatever happens, the next claim is not before its time (a failing claim must not
        // starve the reads).
        self.next_claim = deadline(now, self.cfg.claim_every);
        let min_idle = u64::try_from(self.cfg.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut result = Err(None);
        for attempt in 0..2 {
            let reply: Result<Value, _> = self
                .script
                .key(&self.cfg.stream)
                .key(&self.cfg.dead_letter)
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(min_idle)
                .arg(&self.cursor)
                .arg(self.cfg.count)
                .arg(self.cfg.max_deliveries.unwrap_or(0))
                .invoke_async(&mut self.conn)
                .await;
            match reply {
                Err(e) if is_nogroup(&e) && attempt == 0 => self.no_group().await?,
                other => {
                    result = other.map_err(Some);
                    break;
                }
            }
        }
        let claimed = match result.and_then(|v| reply::claimed(v).map_err(Some)) {
            Ok(c) => c,
            Err(Some(e)) => return Err(self.failed("XAUTOCLAIM", e)),
            Err(None) => return Ok(Vec::new()),
        };
        if claimed.cursor != "0-0" {
            // More of the pending list to scan: go on at once.
            self.next_claim = now;
        }
        self.cursor = claimed.cursor;
        if !claimed.dead.is_empty() {
            Counters::add(&self.shared.counters.dead_lettered, claimed.dead.len());
            tracing::warn!(
                target: "stagepipe::redis",
                stream = %self.cfg.stream,
                dead_letter = %self.cfg.dead_letter,
                ids = ?claimed.dead,
                "entries delivered too many times moved to the dead-letter stream"
            );
        }
        let messages = self.hand_out(claimed.entries);
        Counters::add(&self.shared.counters.claimed, messages.len());
        Ok(messages)
    }

    /// Messages for `entries`, each registered as out; an entry that is out already (claimed
    /// back from this very consumer while its work still runs, or acknowledged and not yet
    /// sent) is not handed out twice.
    fn hand_out(&self, entries: Vec<RawEntry>) -> Vec<Message> {
        let mut state = self.shared.lock();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            if state.outstanding.contains(&e.id) || state.queued.contains(&e.id) {
                continue;
            }
            state.outstanding.insert(e.id.clone());
            out.push(Message {
                ack: Ack {
                    id: Some(e.id.clone()),
                    shared: self.shared.clone(),
                },
                entry: Entry {
                    id: e.id,
                    fields: e.fields,
                    deliveries: e.deliveries,
                },
            });
        }
        out
    }

    /// Sends one batch of the queued acknowledgements: one `XACK` of up to `ack_max` ids.
    async fn flush(&mut self) -> Result<(), StreamError> {
        let ids: Vec<Arc<str>> = {
            let mut state = self.shared.lock();
            let n = state.queued.len().min(self.cfg.ack_max);
            if n == 0 {
                state.queued_since = None;
                return Ok(());
            }
            let ids = state.queued.drain(..n).collect();
            state.queued_since = if state.queued.is_empty() {
                None
            } else {
                Some(Instant::now())
            };
            ids
        };
        let mut xack = ::redis::cmd("XACK");
        xack.arg(&self.cfg.stream).arg(&self.cfg.group);
        for id in &ids {
            xack.arg(&**id);
        }
        let sent: Result<i64, _> = xack.query_async(&mut self.conn).await;
        match sent {
            Ok(confirmed) => {
                Counters::add(&self.shared.counters.ack_commands, 1);
                Counters::add(&self.shared.counters.acked, ids.len());
                let stale = ids
                    .len()
                    .saturating_sub(usize::try_from(confirmed).unwrap_or(0));
                Counters::add(&self.shared.counters.stale_acks, stale);
                self.backoff = MIN_BACKOFF;
                Ok(())
            }
            Err(e) => {
                let mut state = self.shared.lock();
                state.queued.splice(0..0, ids);
                state.queued_since.get_or_insert_with(Instant::now);
                drop(state);
                Err(self.failed("XACK", e))
            }
        }
    }
}

/// Waits for a wake-up of the task (draining started, acknowledgements queued), for
/// `until`, or, given a sender, for a free slot in the channel to the stream.
async fn wait<'a>(
    shared: &Shared,
    tx: Option<&'a mpsc::Sender<Item>>,
    until: Option<Instant>,
) -> Woken<'a> {
    let mut notified = pin!(shared.wake.notified());
    let mut sleep = pin!(until.map(sleep_until));
    let mut reserve = pin!(tx.map(|tx| tx.reserve()));
    poll_fn(|cx| {
        if notified.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Woken::Other);
        }
        if let Some(sleep) = sleep.as_mut().as_pin_mut() {
            if sleep.poll(cx).is_ready() {
                return Poll::Ready(Woken::Other);
            }
        }
        match reserve.as_mut().as_pin_mut().map(|r| r.poll(cx)) {
            Some(Poll::Ready(Ok(permit))) => Poll::Ready(Woken::Permit(permit)),
            Some(Poll::Ready(Err(_))) => Poll::Ready(Woken::Closed),
            _ => Poll::Pending,
        }
    })
    .await
}
