//! [`Batch`] and [`BatchDedupe`]: size- and time-bounded batches, one core for both.
//!
//! The core collects items into a `Vec` and emits it when it holds `max` items, when `wait` has
//! passed since its first item, or when the input ends. What differs between the two streams is
//! only which items the core admits into the current batch, an [`Admit`] policy: every item
//! ([`All`]) or the first item of each key ([`FirstOfKey`]).

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::stream::FusedStream;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::error::{ConfigError, nonzero, or_panic};

/// How many upstream items one call to `poll_next` may drop (duplicates, replaced values)
/// before the stream yields to the runtime, waking itself first. Keeps a stream whose upstream
/// is always ready but whose items are all dropped from holding its task forever.
pub(crate) const POLL_BUDGET: u32 = 128;

/// Room reserved up front for a batch; a larger `max` grows the batch as items arrive.
const PREALLOC: usize = 1024;

/// The timer of a wait that starts at an item (a batch's first, a debounced item).
///
/// A wait starts when the stream first needs its end: when upstream is pending (or the stream
/// yields) with the item still waiting, which is still the poll in which the item arrived.
/// Items that arrive and leave within one poll (a batch filled by a ready upstream) never read
/// the clock or touch the timer. The `Sleep` is boxed, allocated at the first wait and reset
/// for every later one, so the streams that use it stay `Unpin` when their upstream is.
pub(crate) struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
    wait: Duration,
    // When the current wait ends, once it has started.
    at: Option<Instant>,
    // Whether `sleep` is set to `at` and has been polled.
    armed: bool,
}

impl Deadline {
    pub(crate) fn new(wait: Duration) -> Self {
        Self {
            sleep: None,
            wait,
            at: None,
            armed: false,
        }
    }

    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }

    /// Forgets the current wait; the next one starts when it is first needed.
    pub(crate) fn clear(&mut self) {
        self.at = None;
        self.armed = false;
    }

    /// When the current wait ends, starting it now if it has not started.
    pub(crate) fn at(&mut self) -> Instant {
        *self.at.get_or_insert_with(|| Instant::now() + self.wait)
    }

    /// Whether the current wait's timer has fired (checked without polling it).
    pub(crate) fn has_fired(&self) -> bool {
        self.armed && self.sleep.as_ref().is_some_and(|sleep| sleep.is_elapsed())
    }

    /// Arms the timer for the current wait if needed and polls it; `true` once it is due.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        let at = self.at();
        let sleep = match &mut self.sleep {
            Some(sleep) if self.armed => sleep,
            Some(sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => self.sleep.insert(Box::pin(sleep_until(at))),
        };
        self.armed = true;
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// Checks a `wait`-like duration parameter.
pub(crate) fn nonzero_duration(
    parameter: &'static str,
    value: Duration,
) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::new(parameter, "must be a non-zero duration"))
    } else {
        Ok(())
    }
}

/// Which items enter the current batch.
pub(crate) trait Admit<T> {
    /// Whether admitting can refuse an item (then fewer than `max` items may fill a batch).
    const MAY_REFUSE: bool;
    /// Decides for one item; an admitted item joins the current batch.
    fn admit(&mut self, item: &T) -> bool;
    /// Called when the current batch is emitted.
    fn clear(&mut self);
}

/// Admits every item.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct All;

impl<T> Admit<T> for All {
    const MAY_REFUSE: bool = false;

    #[inline]
    fn admit(&mut self, _: &T) -> bool {
        true
    }

    #[inline]
    fn clear(&mut self) {}
}

/// Admits the first item of each key in the current batch.
pub(crate) struct FirstOfKey<K, F> {
    keys: KeySet<K>,
    key: F,
}

impl<T, K: Hash + Eq, F: FnMut(&T) -> K> Admit<T> for FirstOfKey<K, F> {
    const MAY_REFUSE: bool = true;

    #[inline]
    fn admit(&mut self, item: &T) -> bool {
        self.keys.insert((self.key)(item))
    }

    #[inline]
    fn clear(&mut self) {
        self.keys.clear();
    }
}

/// The keys of the current batch: an open-addressing set (linear probing, at most a quarter
/// full) that is emptied in O(1) by starting a new generation, so one table serves every batch.
///
/// A slot belongs to the current batch when its tag carries the current generation; its other
/// bits are part of the key's hash, compared before the key itself. Keys of earlier batches stay
/// in their slots until overwritten, so the set holds at most its table's worth of keys: four
/// times the largest batch, rounded up to a power of two. Hashing uses foldhash (seeded per
/// process) rather than SipHash, as hashing is most of the cost; keys chosen to collide cost at
/// most `max` comparisons per item, since a batch holds at most `max` keys.
struct KeySet<K> {
    slots: Vec<Slot<K>>,
    len: usize,
    generation: u32,
    hasher: foldhash::fast::RandomState,
}

struct Slot<K> {
    /// `generation << 32 | hash >> 32`; generation 0 marks a slot never used.
    tag: u64,
    key: Option<K>,
}

impl<K: Hash + Eq> KeySet<K> {
    const FIRST: usize = 16;

    fn new() -> Self {
        Self {
            slots: Vec::new(),
            len: 0,
            generation: 1,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Adds `key`; `false` if the current batch already has it.
    #[inline]
    fn insert(&mut self, key: K) -> bool {
        if 4 * (self.len + 1) > self.slots.len() {
            self.grow();
        }
        let hash = self.hasher.hash_one(&key);
        if self.probe(hash, key) {
            self.len += 1;
            true
        } else {
            false
        }
    }

    #[inline]
    fn probe(&mut self, hash: u64, key: K) -> bool {
        let generation = u64::from(self.generation);
        let tag = (generation << 32) | (hash >> 32);
        let mask = self.slots.len() - 1;
        // Truncating the hash to pick a slot is intended.
        let mut i = hash as usize & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.tag == tag {
                if slot.key.as_ref() == Some(&key) {
                    return false;
                }
            } else if slot.tag >> 32 != generation {
                slot.tag = tag;
                slot.key = Some(key);
                return true;
            }
            i = (i + 1) & mask;
        }
    }

    /// Doubles the table, keeping the current batch's keys.
    #[cold]
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(Self::FIRST);
        let old = std::mem::replace(&mut self.slots, Self::empty_slots(size));
        let generation = u64::from(self.generation);
        for slot in old {
            if let (true, Some(key)) = (slot.tag >> 32 == generation, slot.key) {
                let hash = self.hasher.hash_one(&key);
                self.probe(hash, key);
            }
        }
    }

    fn empty_slots(size: usize) -> Vec<Slot<K>> {
        (0..size).map(|_| Slot { tag: 0, key: None }).collect()
    }

    /// Empties the set for the next batch.
    #[inline]
    fn clear(&mut self) {
        self.len = 0;
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            // Once in 2^32 batches: forget every tag so that none can match again.
            self.slots
                .iter_mut()
                .for_each(|slot| *slot = Slot { tag: 0, key: None });
            self.generation = 1;
        }
    }
}

pin_project! {
    /// The batching core shared by [`Batch`] and [`BatchDedupe`].
    struct Core<S: Stream, A> {
        #[pin]
        stream: S,
        // Due `wait` after the current batch's first item.
        deadline: Deadline,
        batch: Vec<S::Item>,
        admit: A,
        max: usize,
        // The upstream stream has ended.
        done: bool,
    }
}

impl<S: Stream, A: Admit<S::Item>> Core<S, A> {
    fn try_new(stream: S, max: usize, wait: Duration, admit: A) -> Result<Self, ConfigError> {
        nonzero("max", max as u64)?;
        nonzero_duration("wait", wait)?;
        Ok(Self {
            stream,
            deadline: Deadline::new(wait),
            batch: Vec::new(),
            admit,
            max,
            done: false,
        })
    }

    fn take_partial(self: Pin<&mut Self>) -> Vec<S::Item> {
        let this = self.project();
        this.admit.clear();
        this.deadline.clear();
        std::mem::take(this.batch)
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<S::Item>>> {
        let mut this = self.project();

        macro_rules! emit {
            () => {{
                this.admit.clear();
                this.deadline.clear();
                return Poll::Ready(Some(std::mem::take(this.batch)));
            }};
        }

        // A batch that has been waiting: its deadline comes before anything upstream has now,
        // so an item arriving at the deadline's very instant starts the next batch.
        if this.deadline.has_fired() {
            emit!();
        }

        let mut budget = POLL_BUDGET;
        loop {
            if *this.done {
                if this.batch.is_empty() {
                    return Poll::Ready(None);
                }
                emit!();
            }
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    if this.batch.is_empty() {
                        this.batch.reserve((*this.max).min(PREALLOC));
                    }
                    if this.admit.admit(&item) {
                        this.batch.push(item);
                        if this.batch.len() >= *this.max {
                            emit!();
                        }
                    } else {
                        // Refused items make no progress towards a full batch: bound them.
                        budget -= 1;
                        if budget == 0 {
                            if Instant::now() >= this.deadline.at() {
                                emit!();
                            }
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                }
                Poll::Ready(None) => *this.done = true,
                Poll::Pending => {
                    if this.batch.is_empty() {
                        return Poll::Pending;
                    }
                    if this.deadline.poll_due(cx) {
                        emit!();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            let n = usize::from(!self.batch.is_empty());
            return (n, Some(n));
        }
        let pending = self.batch.len();
        let (lower, upper) = self.stream.size_hint();
        let lower = if A::MAY_REFUSE {
            usize::from(pending > 0 || lower > 0)
        } else {
            lower.saturating_add(pending).div_ceil(self.max)
        };
        let upper = upper.and_then(|u| u.checked_add(usize::from(pending > 0)));
        (lower, upper)
    }

    fn is_terminated(&self) -> bool {
        self.done && self.batch.is_empty()
    }
}

/// Accessors shared by both streams, written once.
macro_rules! accessors {
    () => {
        /// A reference to the underlying stream.
        pub fn get_ref(&self) -> &S {
            &self.core.stream
        }

        /// A mutable reference to the underlying stream.
        ///
        /// Taking items from it directly bypasses the batches.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.core.stream
        }

        /// A pinned mutable reference to the underlying stream.
        pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
            self.project().core.project().stream
        }

        /// The items collected so far into the batch that has not been emitted yet.
        pub fn partial(&self) -> &[S::Item] {
            &self.core.batch
        }

        /// Takes the batch that has not been emitted yet out of the stream, for example to
        /// flush it on shutdown; the next item starts a new batch with a new `wait`.
        ///
        /// The result is empty when no batch is pending.
        pub fn take_partial(self: Pin<&mut Self>) -> Vec<S::Item> {
            self.project().core.take_partial()
        }

        /// Consumes this stream, returning the underlying stream and the batch that had not
        /// been emitted yet (possibly empty).
        pub fn into_inner(self) -> (S, Vec<S::Item>) {
            (self.core.stream, self.core.batch)
        }
    };
}

pin_project! {
    /// Stream for the [`batch`](crate::PipelineExt::batch) method.
    ///
    /// Dropping it drops the batch it has not emitted yet; take that batch first with
    /// [`take_partial`](Batch::take_partial) or [`into_inner`](Batch::into_inner) to keep it.
    #[must_use = "streams do nothing unless polled"]
    pub struct Batch<S: Stream> {
        #[pin]
        core: Core<S, All>,
    }
}

impl<S: Stream> Batch<S> {
    #[track_caller]
    pub(crate) fn new(stream: S, max: usize, wait: Duration) -> Self {
        or_panic(Self::try_new(stream, max, wait))
    }

    pub(crate) fn try_new(stream: S, max: usize, wait: Duration) -> Result<Self, ConfigError> {
        Ok(Self {
            core: Core::try_new(stream, max, wait, All)?,
        })
    }

    accessors!();
}

impl<S: Stream> Stream for Batch<S> {
    type Item = Vec<S::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().core.poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.core.size_hint()
    }
}

impl<S: Stream> FusedStream for Batch<S> {
    fn is_terminated(&self) -> bool {
        self.core.is_terminated()
    }
}

impl<S: Stream + fmt::Debug> fmt::Debug for Batch<S>
where
    S::Item: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("stream", &self.core.stream)
            .field("partial", &self.core.batch)
            .field("max", &self.core.max)
            .field("wait", &self.core.deadline.wait())
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// Stream for the [`batch_dedupe`](crate::PipelineExt::batch_dedupe) method.
    ///
    /// Dropping it drops the batch it has not emitted yet; take that batch first with
    /// [`take_partial`](BatchDedupe::take_partial) or [`into_inner`](BatchDedupe::into_inner)
    /// to keep it.
    #[must_use = "streams do nothing unless polled"]
    pub struct BatchDedupe<S: Stream, K, F> {
        #[pin]
        core: Core<S, FirstOfKey<K, F>>,
    }
}

impl<S, K, F> BatchDedupe<S, K, F>
where
    S: Stream,
    K: Hash + Eq,
    F: FnMut(&S::Item) -> K,
{
    #[track_caller]
    pub(crate) fn new(stream: S, max: usize, wait: Duration, key: F) -> Self {
        or_panic(Self::try_new(stream, max, wait, key))
    }

    pub(crate) fn try_new(
        stream: S,
        max: usize,
        wait: Duration,
        key: F,
    ) -> Result<Self, ConfigError> {
        let admit = FirstOfKey {
            keys: KeySet::new(),
            key,
        };
        Ok(Self {
            core: Core::try_new(stream, max, wait, admit)?,
        })
    }

    accessors!();
}

impl<S, K, F> Stream for BatchDedupe<S, K, F>
where
    S: Stream,
    K: Hash + Eq,
    F: FnMut(&S::Item) -> K,
{
    type Item = Vec<S::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().core.poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.core.size_hint()
    }
}

impl<S, K, F> FusedStream for BatchDedupe<S, K, F>
where
    S: Stream,
    K: Hash + Eq,
    F: FnMut(&S::Item) -> K,
{
    fn is_terminated(&self) -> bool {
        self.core.is_terminated()
    }
}

impl<S: Stream + fmt::Debug, K, F> fmt::Debug for BatchDedupe<S, K, F>
where
    S::Item: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchDedupe")
            .field("stream", &self.core.stream)
            .field("partial", &self.core.batch)
            .field("max", &self.core.max)
            .field("wait", &self.core.deadline.wait())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::KeySet;

    #[test]
    fn key_set_grows_and_clears_by_generation() {
        let mut set = KeySet::new();
        for round in 0..3u32 {
            for k in 0..1000u32 {
                assert!(set.insert(k * 7 + round), "first {k} in round {round}");
            }
            for k in 0..1000u32 {
                assert!(!set.insert(k * 7 + round), "repeat {k} in round {round}");
            }
            assert!(set.slots.len() >= 4000 && set.slots.len().is_power_of_two());
            set.clear();
        }
    }

    #[test]
    fn key_set_survives_the_generation_wrapping() {
        let mut set = KeySet::new();
        set.generation = u32::MAX;
        assert!(set.insert("a"));
        assert!(!set.insert("a"));
        set.clear();
        assert_eq!(set.generation, 1);
        assert!(set.insert("a"));
        assert!(set.insert("b"));
        assert!(!set.insert("b"));
    }
}
