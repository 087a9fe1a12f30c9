//! `fan_out_by_key`: a parallel async map where items with equal keys run one after another.
//!
//! The consumer keeps a *key gate* in front of the fan-out core: an item whose key has an
//! item in the pool is parked (in the consumer, holding no worker) and submitted only once that
//! item has finished. So a worker never waits on another item, and items of one key run in
//! input order while items of different keys run in parallel. The core runs in completion
//! order, which tells the gate at once when a key is free; a reorder ring in the consumer then
//! yields the results in input order.
//!
//! The window bounds everything the stream holds: parked items, items in the pool, and
//! finished results waiting for an earlier one.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;

use crate::error::{ConfigError, or_panic};
use crate::fan_out::Core;
use crate::macros::size_hint_plus;
use crate::pool::WorkerPool;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One item between upstream and the consumer.
enum Slot<U> {
    /// Parked or in the pool, in this lane (one lane per key with an item in the pool).
    Pending(u64),
    Done(U),
}

/// The key gate and the reorder ring.
struct Gate<T, K, U> {
    window: usize,
    /// The sequence number of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot<U>>,
    /// The lane of each key seen lately. An entry whose lane is no longer in `lanes` is stale
    /// (its key is free); stale entries are swept out as the map grows.
    keys: Map<K, u64>,
    /// Lanes with an item in the pool, and the items parked behind it, in input order.
    lanes: Map<u64, VecDeque<(u64, T)>>,
    next_lane: u64,
    /// Parked items whose turn has come, to be submitted next.
    released: VecDeque<(u64, T)>,
    parked: usize,
    upstream_done: bool,
}

impl<T, K: Hash + Eq, U> Gate<T, K, U> {
    /// The item `seq` finished: store its result and release the next item of its lane.
    fn complete(&mut self, seq: u64, out: U) {
        let index = usize::try_from(seq - self.base).expect("a slot in the window");
        let Slot::Pending(lane) = std::mem::replace(&mut self.slots[index], Slot::Done(out)) else {
            unreachable!("an item finishes once");
        };
        let next = self.lanes.get_mut(&lane).and_then(VecDeque::pop_front);
        match next {
            Some(next) => {
                self.parked -= 1;
                self.released.push_back(next);
            }
            None => {
                self.lanes.remove(&lane);
            }
        }
    }

    /// The lane `key` is busy in, if any.
    fn busy_lane(&self, key: &K) -> Option<u64> {
        self.keys
            .get(key)
            .copied()
            .filter(|lane| self.lanes.contains_key(lane))
    }

    /// Opens a lane for `key`, whose item goes to the pool now.
    fn open_lane(&mut self, key: K) -> u64 {
        let lane = self.next_lane;
        self.next_lane += 1;
        if self.keys.len() >= 2 * self.lanes.len() + 64 {
            let lanes = &self.lanes;
            self.keys.retain(|_, lane| lanes.contains_key(lane));
        }
        self.keys.insert(key, lane);
        self.lanes.insert(lane, VecDeque::new());
        lane
    }
}

/// What the core pulls: released items first, then upstream items whose key is free; items of
/// a busy key are parked on the way.
struct Feed<'a, S: Stream, K, KF, U> {
    stream: Pin<&'a mut S>,
    key: &'a mut KF,
    gate: &'a mut Gate<S::Item, K, U>,
}

impl<S, K, KF, U> Stream for Feed<'_, S, K, KF, U>
where
    S: Stream,
    K: Hash + Eq,
    KF: FnMut(&S::Item) -> K,
{
    type Item = (u64, S::Item);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let gate = &mut *this.gate;
        if let Some(next) = gate.released.pop_front() {
            return Poll::Ready(Some(next));
        }
        // Pending without a waker below is safe: a parked item's lane has an item in the pool
        // (whose end wakes the consumer), and a full window holds items in the pool or a
        // finished first item that the consumer yields at once.
        loop {
            if gate.upstream_done {
                return if gate.parked == 0 {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            }
            if gate.slots.len() >= gate.window {
                return Poll::Pending;
            }
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    let seq = gate.base + gate.slots.len() as u64;
                    let key = (this.key)(&item);
                    if let Some(lane) = gate.busy_lane(&key) {
                        gate.slots.push_back(Slot::Pending(lane));
                        gate.lanes
                            .get_mut(&lane)
                            .expect("a busy lane")
                            .push_back((seq, item));
                        gate.parked += 1;
                        continue;
                    }
                    let lane = gate.open_lane(key);
                    gate.slots.push_back(Slot::Pending(lane));
                    return Poll::Ready(Some((seq, item)));
                }
                Poll::Ready(None) => gate.upstream_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

pin_project! {
    /// An item's future, tagged with its sequence number.
    struct Tagged<Fut> {
        seq: u64,
        #[pin]
        fut: Fut,
    }
}

impl<Fut: Future> Future for Tagged<Fut> {
    type Output = (u64, Fut::Output);

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.fut.poll(cx).map(|out| (*this.seq, out))
    }
}

pin_project! {
    /// Stream for the [`fan_out_by_key`](crate::PipelineExt::fan_out_by_key) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct FanOutByKey<S: Stream, K, KF, F, U> {
        #[pin]
        stream: S,
        key: KF,
        f: F,
        core: Core<(u64, U)>,
        gate: Gate<S::Item, K, U>,
    }
}

impl<S, K, KF, F, U> FanOutByKey<S, K, KF, F, U>
where
    S: Stream,
    U: Send + 'static,
{
    pub(crate) fn new(stream: S, pool: WorkerPool, key: KF, f: F) -> Self {
        let window = pool.default_window();
        let mut core = Core::new(pool, false);
        core.set_window(window);
        Self {
            stream,
            key,
            f,
            core,
            gate: Gate {
                window,
                base: 0,
                slots: VecDeque::new(),
                keys: Map::default(),
                lanes: Map::default(),
                next_lane: 0,
                released: VecDeque::new(),
                parked: 0,
                upstream_done: false,
            },
        }
    }

    /// Sets how many items this stream may hold at once: parked behind an item of the same
    /// key, in the pool, or finished and waiting for an earlier item. Upstream is not pulled
    /// while the window is full. The default is four times the pool's workers, and at least
    /// 512.
    ///
    /// # Panics
    ///
    /// Panics if `window` is zero or above 2^30; [`try_window`](Self::try_window) returns the
    /// error instead.
    #[track_caller]
    pub fn window(self, window: usize) -> Self {
        or_panic(self.try_window(window))
    }

    /// [`window`](Self::window), returning a [`ConfigError`] naming `window` if it is zero or
    /// above 2^30.
    pub fn try_window(mut self, window: usize) -> Result<Self, ConfigError> {
        self.core.try_set_window(window)?;
        self.gate.window = window;
        Ok(self)
    }

    /// How many items this stream holds now: parked, in the pool, or finished and waiting.
    pub fn held(&self) -> usize {
        self.gate.slots.len()
    }

    delegate_access_inner!(pub stream, S, ());
}

impl<S, K, KF, F, Fut> Stream for FanOutByKey<S, K, KF, F, Fut::Output>
where
    S: Stream,
    K: Hash + Eq,
    KF: FnMut(&S::Item) -> K,
    F: FnMut(S::Item) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    type Item = Fut::Output;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(Slot::Done(_)) = this.gate.slots.front() {
                let Some(Slot::Done(out)) = this.gate.slots.pop_front() else {
                    unreachable!()
                };
                this.gate.base += 1;
                return Poll::Ready(Some(out));
            }
            let feed = Feed {
                stream: this.stream.as_mut(),
                key: &mut *this.key,
                gate: &mut *this.gate,
            };
            let f = &mut *this.f;
            let poll = this.core.poll_next(
                std::pin::pin!(feed),
                &mut |(seq, item)| Tagged { seq, fut: f(item) },
                cx,
            );
            match poll {
                Poll::Ready(Some((seq, out))) => this.gate.complete(seq, out),
                Poll::Ready(None) => {
                    debug_assert!(this.gate.slots.is_empty());
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let upstream = match self.gate.upstream_done {
            true => (0, Some(0)),
            false => self.stream.size_hint(),
        };
        size_hint_plus(self.gate.slots.len(), upstream)
    }
}

impl<S: Stream, K, KF, F, U> FusedStream for FanOutByKey<S, K, KF, F, U>
where
    Self: Stream,
{
    fn is_terminated(&self) -> bool {
        self.gate.upstream_done && self.gate.slots.is_empty()
    }
}

impl_debug!(impl[S: Stream + fmt::Debug, K, KF, F, U] FanOutByKey<S, K, KF, F, U> => FanOutByKey |this| {
    stream: &this.stream,
    core: &this.core,
    window: &this.gate.window,
    held: &this.gate.slots.len(),
    parked: &this.gate.parked,
    busy_keys: &this.gate.lanes.len(),
} ..);
