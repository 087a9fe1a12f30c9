//! [`Batch`] and [`BatchDedupe`]: size- and time-bounded batches, one core for both.
//!
//! The core collects items into a `Vec` and emits it when it holds `max` items, when `wait` has
//! passed since its first item, or when the input ends. The wait starts at the first item; a
//! timer keeps it while upstream is pending, and a look at the clock every [`CHECK_EVERY`]
//! items while upstream stays ready. What differs between the two streams is only which items
//! the core admits into the current batch, an [`Admit`] policy: every item ([`All`]) or the
//! first item of each key ([`FirstOfKey`]).

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::error::{ConfigError, nonzero, nonzero_duration};
use crate::time;

/// How many upstream items one call to `poll_next` may drop (duplicates, replaced values)
/// before the stream yields to the runtime, waking itself first. Keeps a stream whose upstream
/// is always ready but whose items are all dropped from holding its task forever.
pub(crate) const POLL_BUDGET: u32 = 128;

/// While upstream stays ready, how many items a batching stream pulls at most between two looks
/// at the clock: a batch whose `wait` has passed meanwhile is emitted at the next look. (The
/// rustdoc of `Batch` and `BatchDedupe` gives this number.)
pub(crate) const CHECK_EVERY: u32 = 64;

/// Room reserved up front for a batch; a larger `max` grows the batch as items arrive.
const PREALLOC: usize = 1024;

/// The timer of a wait that starts at an item (a batch's first, a debounced item).
///
/// A wait starts at [`start`](Self::start), or else when the stream first needs its end: when
/// upstream is pending (or the stream yields) with the item still waiting. The timer is only
/// armed then: items that arrive and leave within one poll (a batch filled by a ready
/// upstream) never touch it. The `Sleep` is boxed, allocated at the first wait and reset for
/// every later one, so the streams that use it stay `Unpin` when their upstream is.
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

    /// Starts a new wait now.
    pub(crate) fn start(&mut self) {
        self.at = Some(time::deadline(Instant::now(), self.wait));
        self.armed = false;
    }

    /// When the current wait ends, starting it now if it has not started.
    pub(crate) fn at(&mut self) -> Instant {
        *self
            .at
            .get_or_insert_with(|| time::deadline(Instant::now(), self.wait))
    }

    /// Whether the current wait has ended, by the clock (starting it now if it has not
    /// started).
    #[cold]
    pub(crate) fn is_due(&mut self) -> bool {
        Instant::now() >= self.at()
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

/// The batch length at which a batch of `len` items (fewer than `max`) is next looked at: full,
/// or `CHECK_EVERY` items on.
#[inline]
fn next_look(len: usize, max: usize) -> usize {
    max.min(len.saturating_add(CHECK_EVERY as usize))
}

/// Which items enter the current batch.
pub(crate) trait Admit<T> {
    /// Whether admitting can refuse an item (then fewer than `max` items may fill a batch).
    const MAY_REFUSE: bool;
    /// What the policy keeps about the current batch. While a poll pulls items it is moved
    /// out of the stream into a local, with the batch, so that the compiler can keep it in
    /// registers; a default value must be a valid (if slower) state.
    type State: Default;
    /// Decides for one item, given the batch so far; an admitted item joins the batch.
    fn admit(&mut self, state: &mut Self::State, item: &T, batch: &[T]) -> bool;
    /// Called when the current batch is emitted.
    fn clear(state: &mut Self::State);
}

/// Admits every item.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct All;

impl<T> Admit<T> for All {
    const MAY_REFUSE: bool = false;
    type State = ();

    #[inline]
    fn admit(&mut self, (): &mut (), _: &T, _: &[T]) -> bool {
        true
    }

    #[inline]
    fn clear((): &mut ()) {}
}

/// Admits the first item of each key in the current batch.
pub(crate) struct FirstOfKey<F> {
    key: F,
    // Batch size the key table is first sized for.
    room: usize,
}

impl<T, K: Hash + Eq, F: FnMut(&T) -> K> Admit<T> for FirstOfKey<F> {
    const MAY_REFUSE: bool = true;
    type State = KeyTable;

    #[inline]
    fn admit(&mut self, table: &mut KeyTable, item: &T, batch: &[T]) -> bool {
        if !table.has_room(batch.len() + 1) {
            let room = (batch.len() + 1).max(self.room);
            let old = std::mem::take(table);
            *table = old.rebuilt(room, batch.iter().map(|earlier| (self.key)(earlier)));
        }
        let key = (self.key)(item);
        let key_fn = &mut self.key;
        table.insert(&key, batch.len(), |earlier| key_fn(&batch[earlier]) == key)
    }

    #[inline]
    fn clear(table: &mut KeyTable) {
        table.clear();
    }
}

/// Where the keys of the current batch are: an open-addressing table (linear probing) of the
/// batch positions of its first items, a sixteenth full at most up to 64 KiB and a quarter
/// full at most beyond. Keys themselves are not stored: a slot whose tag matches is confirmed
/// by calling the key function again on the item at its position. The table is emptied in O(1) by starting a new generation, so one table serves
/// every batch, and it can always be rebuilt from the batch, which is how it grows.
///
/// A slot is one `u64`: a 16-bit generation (0 marks a slot never used), 16 bits of the key's
/// hash, and the 32-bit position. Hashing uses foldhash with a random seed per table rather
/// than SipHash, as hashing is a large part of the cost; keys chosen to collide cost at most
/// `max` key comparisons per item, since a batch holds at most `max` keys.
#[derive(Default)]
pub(crate) struct KeyTable {
    slots: Vec<u64>,
    // How many keys the table may hold, at most a quarter of its slots.
    room: usize,
    // The current generation, in `1..=GENERATIONS` once the table has slots.
    generation: u64,
    hasher: foldhash::fast::FixedState,
}

impl KeyTable {
    /// Slots per key while the table is small (up to [`Self::SPARSE_SLOTS`]), so that an
    /// item rarely lands in a taken slot and probing seldom branches the other way.
    const SPREAD: usize = 16;
    /// Slots per key at least, in a larger table.
    const MIN_SPREAD: usize = 4;
    /// 64 KiB of slots.
    const SPARSE_SLOTS: usize = 8192;
    const GENERATIONS: u64 = 0xFFFF;
    const POSITION: u64 = 0xFFFF_FFFF;
    const GENERATION_SHIFT: u32 = 48;
    const TAG: u64 = !Self::POSITION;

    /// The largest batch the table can index.
    pub(crate) const MAX_BATCH: usize = Self::POSITION as usize;

    /// Whether the table can hold `keys` keys.
    #[inline]
    fn has_room(&self, keys: usize) -> bool {
        keys <= self.room
    }

    /// A table with room for at least `room` keys (and at least twice the room of this one),
    /// filled with `keys`, the keys of the current batch in order.
    ///
    /// By value, out of line, like [`with_room`], so that the table in use never has its
    /// address taken and stays in registers.
    #[cold]
    #[inline(never)]
    fn rebuilt<K: Hash>(self, room: usize, keys: impl Iterator<Item = K>) -> Self {
        let room = room.max(2 * self.room);
        let dense = (Self::MIN_SPREAD * room).next_power_of_two();
        let sparse = (Self::SPREAD * room).next_power_of_two();
        let mut table = Self {
            slots: vec![0; dense.max(sparse.min(Self::SPARSE_SLOTS))],
            room,
            generation: 1,
            hasher: foldhash::fast::FixedState::with_seed(fastrand::u64(..)),
        };
        for (position, key) in keys.enumerate() {
            table.insert(&key, position, |_| false);
        }
        table
    }

    /// Records that the batch's item at `position` has `key`, unless an earlier item has
    /// the same key: then returns `false`. `same(p)` tells whether the item at `p` has `key`.
    #[inline]
    fn insert<K: Hash>(
        &mut self,
        key: &K,
        position: usize,
        mut same: impl FnMut(usize) -> bool,
    ) -> bool {
        let hash = self.hasher.hash_one(key);
        let current = self.generation << Self::GENERATION_SHIFT;
        let tag = current | ((hash >> Self::GENERATION_SHIFT) << 32);
        let mask = self.slots.len() - 1;
        // Truncating the hash to pick a slot is intended.
        let mut i = hash as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot >> Self::GENERATION_SHIFT != self.generation {
                self.slots[i] = tag | position as u64;
                return true;
            }
            if slot & Self::TAG == tag && same((slot & Self::POSITION) as usize) {
                return false;
            }
            i = (i + 1) & mask;
        }
    }

    /// Empties the table for the next batch.
    #[inline]
    fn clear(&mut self) {
        self.generation += 1;
        if self.generation > Self::GENERATIONS {
            // Once in 65535 batches: forget every slot so that none can match again.
            self.slots.fill(0);
            self.generation = 1;
        }
    }
}

/// `batch` with room for one more item (of at most `max`): the first allocation holds
/// `max` items up to [`PREALLOC`], and later ones double it up to `max`.
///
/// The batch is passed by value and grown out of line so that the batch being filled in
/// [`Core::poll_next`] never has its address taken: it stays in registers.
#[cold]
#[inline(never)]
fn with_room<T>(mut batch: Vec<T>, max: usize) -> Vec<T> {
    let room = if batch.capacity() == 0 {
        max.min(PREALLOC)
    } else {
        batch.capacity().min(max - batch.len())
    };
    batch.reserve_exact(room.max(1));
    batch
}

/// The batch and its admission state, moved out of the stream for one poll and put back when
/// this is dropped (on every return and on a panic upstream or in the key function).
///
/// As locals they can live in registers: stores into the batch or into the key table cannot
/// alias them, so the compiler does not reload them for every item.
struct Pulled<'a, T, S: Default> {
    batch: Vec<T>,
    state: S,
    home: &'a mut Vec<T>,
    state_home: &'a mut S,
}

impl<'a, T, S: Default> Pulled<'a, T, S> {
    fn take(home: &'a mut Vec<T>, state_home: &'a mut S) -> Self {
        Self {
            batch: std::mem::take(home),
            state: std::mem::take(state_home),
            home,
            state_home,
        }
    }
}

impl<T, S: Default> Drop for Pulled<'_, T, S> {
    #[inline]
    fn drop(&mut self) {
        *self.home = std::mem::take(&mut self.batch);
        *self.state_home = std::mem::take(&mut self.state);
    }
}

pin_project! {
    /// The batching core shared by [`Batch`] and [`BatchDedupe`].
    struct Core<S: Stream, A, State> {
        #[pin]
        stream: S,
        // Due `wait` after the current batch's first item.
        deadline: Deadline,
        batch: Vec<S::Item>,
        admit: A,
        state: State,
        max: usize,
        // The upstream stream has ended.
        done: bool,
    }
}

impl<S: Stream, A, State> Core<S, A, State> {
    delegate_access_inner!(stream, S, ());

    fn fmt_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result
    where
        S: fmt::Debug,
        S::Item: fmt::Debug,
    {
        f.debug_struct(name)
            .field("stream", &self.stream)
            .field("partial", &self.batch)
            .field("max", &self.max)
            .field("wait", &self.deadline.wait())
            .finish_non_exhaustive()
    }
}

impl<S: Stream, A: Admit<S::Item, State = State>, State: Default> Core<S, A, State> {
    fn try_new(stream: S, max: usize, wait: Duration, admit: A) -> Result<Self, ConfigError> {
        nonzero("max", max as u64)?;
        nonzero_duration("wait", wait)?;
        Ok(Self {
            stream,
            deadline: Deadline::new(wait),
            batch: Vec::new(),
            admit,
            state: State::default(),
            max,
            done: false,
        })
    }

    fn take_partial(self: Pin<&mut Self>) -> Vec<S::Item> {
        let this = self.project();
        A::clear(this.state);
        this.deadline.clear();
        std::mem::take(this.batch)
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<S::Item>>> {
        let mut this = self.project();

        let mut pulled = Pulled::take(this.batch, this.state);
        macro_rules! emit {
            () => {{
                A::clear(&mut pulled.state);
                this.deadline.clear();
                return Poll::Ready(Some(std::mem::take(&mut pulled.batch)));
            }};
        }

        // A batch that has been waiting: its deadline comes before anything upstream has now,
        // so an item arriving at the deadline's very instant starts the next batch.
        if this.deadline.has_fired() {
            emit!();
        }
        if *this.done {
            return Poll::Ready(None);
        }

        let max = *this.max;
        let mut budget = POLL_BUDGET;
        // The batch's length at which to look at the clock next, or to emit it if it is full:
        // an upstream that stays ready may take its time, so the stream looks at the clock
        // every `CHECK_EVERY` items pulled, an item refused bringing the next look one closer.
        let mut look_at = next_look(pulled.batch.len(), max);
        loop {
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    if this.admit.admit(&mut pulled.state, &item, &pulled.batch) {
                        if pulled.batch.len() == pulled.batch.capacity() {
                            // Every batch's first item comes here, as an emitted or taken
                            // batch leaves an unallocated `Vec` behind: its wait starts now.
                            // (Were it not so, the wait would start at the first look.)
                            if pulled.batch.is_empty() {
                                this.deadline.start();
                            }
                            pulled.batch = with_room(std::mem::take(&mut pulled.batch), max);
                        }
                        // `with_room` left room, so `push` does not grow the batch (which
                        // would take its address).
                        assert!(pulled.batch.len() < pulled.batch.capacity());
                        pulled.batch.push(item);
                        if pulled.batch.len() >= look_at {
                            if pulled.batch.len() >= max || this.deadline.is_due() {
                                emit!();
                            }
                            look_at = next_look(pulled.batch.len(), max);
                        }
                    } else {
                        // Refused items make no progress towards a full batch: bound them.
                        budget -= 1;
                        if budget == 0 {
                            if this.deadline.is_due() {
                                emit!();
                            }
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        // The batch holds an item (the first one is always admitted), and
                        // `look_at` stays above its length until this item.
                        look_at -= 1;
                        if pulled.batch.len() >= look_at {
                            if this.deadline.is_due() {
                                emit!();
                            }
                            look_at = next_look(pulled.batch.len(), max);
                        }
                    }
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    if pulled.batch.is_empty() {
                        return Poll::Ready(None);
                    }
                    emit!();
                }
                Poll::Pending => {
                    if !pulled.batch.is_empty() && this.deadline.poll_due(cx) {
                        emit!();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            return (0, Some(0));
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
        self.done
    }
}

/// Accessors shared by both streams, written once.
macro_rules! accessors {
    () => {
        delegate_access_inner!(pub core, S, (.));

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
    ///
    /// # Time and a ready upstream
    ///
    /// A batch's `wait` starts when its first item arrives. While upstream is pending, a timer
    /// emits the batch once its `wait` has passed. While upstream stays ready, the stream looks
    /// at the clock at least once every 64 items it pulls: once `wait` has passed since a
    /// batch's first item, the batch is emitted after at most 64 more items have been pulled,
    /// even if upstream never returns `Pending`. The time those items take is upstream's own: an
    /// upstream that computes or blocks inside `poll_next` holds the stream's task meanwhile.
    #[must_use = "streams do nothing unless polled"]
    pub struct Batch<S: Stream> {
        #[pin]
        core: Core<S, All, ()>,
    }
}

impl<S: Stream> Batch<S> {
    /// [`batch`](crate::PipelineExt::batch) for arguments that may be refused: a
    /// [`ConfigError`] naming `max` or `wait` if either is zero, where `batch` panics.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::Batch;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let wait = Duration::from_secs(1);
    /// let max = 0; // read from a configuration file, say
    /// let err = Batch::try_new(stream::iter(0..5), max, wait).unwrap_err();
    /// assert_eq!(err.parameter(), "max");
    ///
    /// let batches: Vec<Vec<u32>> = Batch::try_new(stream::iter(0..5), 2, wait)
    ///     .unwrap()
    ///     .collect()
    ///     .await;
    /// assert_eq!(batches, [vec![0, 1], vec![2, 3], vec![4]]);
    /// # }
    /// ```
    pub fn try_new(stream: S, max: usize, wait: Duration) -> Result<Self, ConfigError> {
        let core = Core::try_new(stream, max, wait, All)?;
        Ok(Self { core })
    }

    accessors!();
}

delegate_stream!(
    impl[S] Batch<S> where [S: Stream] => Vec<S::Item>;
    Debug where [S: Stream + fmt::Debug, S::Item: fmt::Debug]
);

pin_project! {
    /// Stream for the [`batch_dedupe`](crate::PipelineExt::batch_dedupe) method.
    ///
    /// Dropping it drops the batch it has not emitted yet; take that batch first with
    /// [`take_partial`](BatchDedupe::take_partial) or [`into_inner`](BatchDedupe::into_inner)
    /// to keep it.
    ///
    /// # Time and a ready upstream
    ///
    /// A batch's `wait` starts when its first item arrives. While upstream is pending, a timer
    /// emits the batch once its `wait` has passed. While upstream stays ready, the stream looks
    /// at the clock at least once every 64 items it pulls, dropped duplicates included: once
    /// `wait` has passed since a batch's first item, the batch is emitted after at most 64 more
    /// items have been pulled, even if upstream never returns `Pending`. The time those items
    /// take is upstream's own: an upstream that computes or blocks inside `poll_next` holds the
    /// stream's task meanwhile.
    #[must_use = "streams do nothing unless polled"]
    pub struct BatchDedupe<S: Stream, K, F> {
        #[pin]
        core: Core<S, FirstOfKey<F>, KeyTable>,
        _key: PhantomData<fn() -> K>,
    }
}

impl<S, K, F> BatchDedupe<S, K, F>
where
    S: Stream,
    K: Hash + Eq,
    F: FnMut(&S::Item) -> K,
{
    /// [`batch_dedupe`](crate::PipelineExt::batch_dedupe) for arguments that may be refused: a
    /// [`ConfigError`] naming `max` if it is zero or above `u32::MAX`, or `wait` if it is zero,
    /// where `batch_dedupe` panics.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::stream;
    /// use stagepipe::BatchDedupe;
    ///
    /// let ids = stream::iter([7u32, 3, 7]);
    /// let err = BatchDedupe::try_new(ids, 10, Duration::ZERO, |id| *id).unwrap_err();
    /// assert_eq!(err.parameter(), "wait");
    /// ```
    pub fn try_new(stream: S, max: usize, wait: Duration, key: F) -> Result<Self, ConfigError> {
        if max > KeyTable::MAX_BATCH {
            let reason = "must be at most 4294967295 (2^32 - 1) for batch_dedupe";
            return Err(ConfigError::new("max", reason));
        }
        let admit = FirstOfKey {
            key,
            room: max.min(PREALLOC),
        };
        Ok(Self {
            core: Core::try_new(stream, max, wait, admit)?,
            _key: PhantomData,
        })
    }

    accessors!();
}

delegate_stream!(
    impl[S, K, F] BatchDedupe<S, K, F>
    where [S: Stream, K: Hash + Eq, F: FnMut(&S::Item) -> K]
    => Vec<S::Item>;
    Debug where [S: Stream + fmt::Debug, S::Item: fmt::Debug]
);

#[cfg(test)]
mod tests {
    use super::{Admit, FirstOfKey, KeyTable};

    /// Runs `items` through a first-of-key policy as `Core` does, cutting a batch every `max`
    /// admitted items; returns the batches.
    fn batches(items: &[u32], max: usize, key: impl FnMut(&u32) -> u32) -> Vec<Vec<u32>> {
        let mut policy = FirstOfKey { key, room: 4 };
        let mut table = KeyTable::default();
        let (mut out, mut batch) = (Vec::new(), Vec::new());
        for &item in items {
            if policy.admit(&mut table, &item, &batch) {
                batch.push(item);
                if batch.len() == max {
                    out.push(std::mem::take(&mut batch));
                    FirstOfKey::<fn(&u32) -> u32>::clear(&mut table);
                }
            }
        }
        out.push(batch);
        out
    }

    #[test]
    fn key_table_grows_from_the_batch_and_clears_by_generation() {
        // 3 rounds of 1000 distinct keys, each key but the last given again with the next
        // one (before it): a batch of 1000 grows the table from room for 4 keys, rebuilding it from the
        // batch each time.
        let items: Vec<u32> = (0..3u32)
            .flat_map(|round| {
                (0..1000u32).flat_map(move |k| {
                    let again = k.checked_sub(1).map(|earlier| earlier * 7 + round);
                    again.into_iter().chain([k * 7 + round])
                })
            })
            .collect();
        let out = batches(&items, 1000, |x| *x);
        assert_eq!(out.len(), 4);
        for (round, batch) in out.iter().take(3).enumerate() {
            let expected: Vec<u32> = (0..1000u32).map(|k| k * 7 + round as u32).collect();
            assert_eq!(batch, &expected, "round {round}");
        }
        assert!(out[3].is_empty());
    }

    #[test]
    fn key_table_confirms_matches_with_the_key_function() {
        // Ten items per key (x / 10): only the first of each ten joins the one batch.
        let items: Vec<u32> = (0..100).collect();
        let out = batches(&items, 100, |x| x / 10);
        assert_eq!(out, [(0..10).map(|k| k * 10).collect::<Vec<_>>()]);
    }

    #[test]
    fn key_table_survives_the_generation_wrapping() {
        let mut table = KeyTable::default().rebuilt(4, std::iter::empty::<u32>());
        table.generation = KeyTable::GENERATIONS;
        let batch = ["a"];
        assert!(table.insert(&"a", 0, |_| false));
        assert!(!table.insert(&"a", 1, |p| batch[p] == "a"));
        table.clear();
        assert_eq!(table.generation, 1);
        // Nothing of the old generation matches any more.
        assert!(table.insert(&"a", 0, |_| panic!(
            "no slot of the current batch holds a key"
        )));
    }
}
