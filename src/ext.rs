//! [`PipelineExt`]: the operators, as methods on every stream.
//!
//! Each method documents its semantics, `# Panics` and an example; its body only calls the
//! constructor of the stream type that lives in the operator's own module.

use futures::Stream;

/// Operators for concurrent, parallel stream pipelines, implemented for every
/// [`Stream`].
///
/// Import it with `use stagepipe::prelude::*;` (or `use stagepipe::PipelineExt;`).
pub trait PipelineExt: Stream {
    // -- core: fan_out_ordered, fan_out, in_flight, with_stats --

    // -- resilience: rate_limit, rate_limit_by, retry, retry_if, circuit_breaker --

    // -- batching: batch_dedupe, batch, debounce, dedupe_by --
    /// Groups items into batches of at most `max` items with distinct keys, emitted when full,
    /// when `wait` has passed since the batch's first item, or when the input ends.
    ///
    /// `key(&item)` names each item; an item whose key is already in the current batch is
    /// dropped (the first one wins), so a batch never holds two items with equal keys. A key may
    /// appear again in a later batch. Items keep their input order within and across batches,
    /// and a batch is never empty.
    ///
    /// A batch is emitted as soon as it holds `max` items, even while upstream is pending. The
    /// `wait` starts at the batch's first item and is not extended by later items, so a steady
    /// trickle still flushes every `wait`; a quiet stream emits nothing. An item arriving at the
    /// very instant a batch is due starts the next batch. When the input ends, the partial
    /// batch is emitted before the stream ends. The key set is reused from batch to batch and
    /// holds at most `max` keys.
    ///
    /// Dropping the stream drops the partial batch it has not emitted;
    /// [`BatchDedupe::take_partial`](crate::BatchDedupe::take_partial) and
    /// [`BatchDedupe::into_inner`](crate::BatchDedupe::into_inner) hand it back instead.
    ///
    /// This is the dataloader pattern: collect the ids many callers ask for, drop the
    /// duplicates, and look each batch up with one query.
    ///
    /// The timer needs a tokio runtime with the time driver enabled.
    ///
    /// # Panics
    ///
    /// Panics if `max` is zero or `wait` is zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let user_ids = stream::iter([7, 3, 7, 9, 3, 1, 7]);
    /// let batches: Vec<Vec<u32>> = user_ids
    ///     .batch_dedupe(3, Duration::from_millis(10), |id| *id)
    ///     .collect()
    ///     .await;
    /// // The second 7 repeats inside the first batch and is dropped; 3 and 7 come back in the
    /// // next batch, which is a new one.
    /// assert_eq!(batches, [vec![7, 3, 9], vec![3, 1, 7]]);
    /// # }
    /// ```
    #[track_caller]
    fn batch_dedupe<K, F>(
        self,
        max: usize,
        wait: std::time::Duration,
        key: F,
    ) -> crate::BatchDedupe<Self, K, F>
    where
        Self: Sized,
        K: std::hash::Hash + Eq,
        F: FnMut(&Self::Item) -> K,
    {
        crate::BatchDedupe::new(self, max, wait, key)
    }

    /// Groups items into batches of at most `max` items, emitted when full, when `wait` has
    /// passed since the batch's first item, or when the input ends.
    ///
    /// The same as [`batch_dedupe`](PipelineExt::batch_dedupe) without dropping anything: every
    /// item is in exactly one batch, in input order, and a batch is never empty. A batch is
    /// emitted as soon as it holds `max` items, even while upstream is pending; the `wait`
    /// starts at the batch's first item and is not extended by later items; an item arriving at
    /// the very instant a batch is due starts the next batch; the partial batch is emitted when
    /// the input ends. This is the queue consumer's pattern: write by size or by time, and
    /// close the input on shutdown to flush the tail.
    ///
    /// Dropping the stream drops the partial batch it has not emitted;
    /// [`Batch::take_partial`](crate::Batch::take_partial) and
    /// [`Batch::into_inner`](crate::Batch::into_inner) hand it back instead.
    ///
    /// The timer needs a tokio runtime with the time driver enabled.
    ///
    /// # Panics
    ///
    /// Panics if `max` is zero or `wait` is zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::{sleep, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let start = Instant::now();
    /// // Five items at once, then one more after 100 ms.
    /// let events = stream::iter(0..5).chain(stream::once(async {
    ///     sleep(Duration::from_millis(100)).await;
    ///     5
    /// }));
    /// let mut batches = Box::pin(events.batch(2, Duration::from_millis(30)));
    ///
    /// assert_eq!(batches.next().await, Some(vec![0, 1])); // full: at once
    /// assert_eq!(batches.next().await, Some(vec![2, 3]));
    /// assert_eq!(batches.next().await, Some(vec![4])); // 30 ms after its first item
    /// assert_eq!(start.elapsed(), Duration::from_millis(30));
    /// assert_eq!(batches.next().await, Some(vec![5])); // the tail, when the input ends
    /// assert_eq!(batches.next().await, None);
    /// # }
    /// ```
    #[track_caller]
    fn batch(self, max: usize, wait: std::time::Duration) -> crate::Batch<Self>
    where
        Self: Sized,
    {
        crate::Batch::new(self, max, wait)
    }

    /// Passes an item on only once `quiet` has passed without a newer item; a newer item
    /// replaces the one waiting and starts the `quiet` period again.
    ///
    /// When the input ends, the item still waiting is passed on at once, then the stream ends.
    /// An item arriving at the very instant the waiting one is due does not replace it. At most
    /// one item is held. Dropping the stream drops the item it holds;
    /// [`Debounce::take_held`](crate::Debounce::take_held) and
    /// [`Debounce::into_inner`](crate::Debounce::into_inner) hand it back instead.
    ///
    /// Typical uses: react to the last of a burst of change notifications, or save a document
    /// once typing pauses.
    ///
    /// The timer needs a tokio runtime with the time driver enabled.
    ///
    /// # Panics
    ///
    /// Panics if `quiet` is zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    /// use tokio::time::{sleep_until, Instant};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let start = Instant::now();
    /// // Keystrokes 10 ms apart, a pause of 100 ms, then two more.
    /// let keys = stream::iter([(0, "h"), (10, "he"), (20, "hel"), (120, "hell"), (130, "hello")])
    ///     .then(|(at, text)| async move {
    ///         sleep_until(start + Duration::from_millis(at)).await;
    ///         text
    ///     });
    /// let mut saved = Box::pin(keys.debounce(Duration::from_millis(50)));
    ///
    /// assert_eq!(saved.next().await, Some("hel")); // 50 ms after the last keystroke of the burst
    /// assert_eq!(start.elapsed(), Duration::from_millis(70));
    /// assert_eq!(saved.next().await, Some("hello")); // the input ended: passed on at once
    /// assert_eq!(start.elapsed(), Duration::from_millis(130));
    /// assert_eq!(saved.next().await, None);
    /// # }
    /// ```
    #[track_caller]
    fn debounce(self, quiet: std::time::Duration) -> crate::Debounce<Self>
    where
        Self: Sized,
    {
        crate::Debounce::new(self, quiet)
    }

    /// Drops an item whose key was let through less than `window` ago, remembering at most
    /// `capacity` keys: for consumers that must not see the same message twice in a row
    /// (redelivered queue messages, repeated webhooks).
    ///
    /// An item passes when no item with an equal key has passed within the last `window`
    /// (an item exactly `window` after it passes again); a dropped duplicate does not extend
    /// the window. Items keep their order and are never delayed.
    ///
    /// **Memory bound:** at most `capacity` keys are remembered (each stored twice, so keys
    /// should be cheap to clone: ids, not documents). A key is forgotten when its `window` has
    /// passed, or earlier, oldest first, when `capacity` newer keys have passed since; so choose
    /// `capacity` at least as large as the number of distinct keys expected within one
    /// `window`, or an old duplicate can pass early.
    ///
    /// Each item's time is read from tokio's clock (a paused clock works); no timer is used.
    ///
    /// # Panics
    ///
    /// Panics if `window` is zero or `capacity` is zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stagepipe::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let start = tokio::time::Instant::now();
    /// // (arrival in ms, message id)
    /// let deliveries = stream::iter([(0, 1), (5, 2), (10, 1), (30, 2), (65, 2), (70, 1)])
    ///     .then(|(at, id)| async move {
    ///         tokio::time::sleep_until(start + Duration::from_millis(at)).await;
    ///         id
    ///     });
    /// let handled: Vec<u32> = deliveries
    ///     .dedupe_by(Duration::from_millis(60), 1000, |id| *id)
    ///     .collect()
    ///     .await;
    /// // 1 at 10 ms and 2 at 30 ms repeat within 60 ms and are dropped; 2 at 65 ms and 1 at
    /// // 70 ms come 60 ms or more after the ones that passed.
    /// assert_eq!(handled, [1, 2, 2, 1]);
    /// # }
    /// ```
    #[track_caller]
    fn dedupe_by<K, F>(
        self,
        window: std::time::Duration,
        capacity: usize,
        key: F,
    ) -> crate::DedupeBy<Self, K, F>
    where
        Self: Sized,
        K: std::hash::Hash + Eq + Clone,
        F: FnMut(&Self::Item) -> K,
    {
        crate::DedupeBy::new(self, window, capacity, key)
    }

    // -- staged pipelines: through --
}

impl<S: Stream + ?Sized> PipelineExt for S {}
