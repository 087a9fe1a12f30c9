//! Request groups: a submitter and the group's own result stream, and `through`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::admission::{GroupRefused, Ticket};
use super::drain::Drain;
use super::pipeline::{Inner, Pipeline};
use super::{GroupClosed, StageError, StateMachine};
use crate::error::{ConfigError, nonzero_duration, or_panic, window_size};
use crate::fan_out::Core;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{Arc, AtomicWaker};

type Outcome<M> = Result<<M as StateMachine>::Data, StageError<M>>;
type KeyFn<D> = Arc<dyn Fn(&D) -> u64 + Send + Sync>;

/// Configures a request group before it is opened; from [`Pipeline::group`].
#[must_use = "a group builder does nothing until `open` is called"]
pub struct GroupBuilder<M: StateMachine> {
    pipeline: Pipeline<M>,
    ordered: bool,
    cancel_on_error: bool,
    window: usize,
    key: Option<KeyFn<M::Data>>,
    deadline: Option<Deadline>,
}

/// When a group's deadline passes: a duration from its opening, or an instant.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    After(Duration),
    At(Instant),
}

impl<M: StateMachine> fmt::Debug for GroupBuilder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupBuilder")
            .field("ordered", &self.ordered)
            .field("cancel_on_error", &self.cancel_on_error)
            .field("window", &self.window)
            .field("keyed", &self.key.is_some())
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl<M: StateMachine> GroupBuilder<M> {
    pub(super) fn new(pipeline: Pipeline<M>) -> Self {
        let window = pipeline.inner.window;
        Self {
            pipeline,
            ordered: false,
            cancel_on_error: false,
            window,
            key: None,
            deadline: None,
        }
    }

    /// Yields results in submission order (default: completion order).
    pub fn ordered(mut self) -> Self {
        self.ordered = true;
        self
    }

    /// Ends the group at its first error: the error is the group's last item (in an ordered
    /// group, after every earlier result), requests not yet finished are abandoned, and later
    /// submissions (and one already waiting) return [`GroupClosed`] with their data.
    pub fn cancel_on_error(mut self) -> Self {
        self.cancel_on_error = true;
        self
    }

    /// How many of this group's requests may be in the pool at once (queued, running, or
    /// finished and unread); the submit buffer holds as many again. A full window makes
    /// [`Submitter::submit`] wait. Default: the pipeline's window.
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
        window_size(window)?;
        self.window = window;
        Ok(self)
    }

    /// Ends the group `deadline` after it is opened, if it has not ended by then: the group is
    /// cancelled (its unfinished requests abandoned, later submissions refused with
    /// [`GroupClosed`]) and its result stream yields a last item,
    /// [`StageError::DeadlineExceeded`], counting the requests submitted to it that were left
    /// without a result. A result already finished when the deadline passes is still yielded
    /// before it. A deadline too far for the clock waits about 30 years; a group whose results
    /// all came before its deadline ends as usual.
    ///
    /// The deadline is a timer on tokio's clock, started when the result stream is first
    /// polled (inside a runtime) but counted from [`open`](Self::open).
    ///
    /// # Panics
    ///
    /// Panics if `deadline` is zero; [`try_deadline`](Self::try_deadline) returns the error
    /// instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use stagepipe::prelude::*;
    ///
    /// # #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)] struct S;
    /// struct Sleepy;
    /// impl StateMachine for Sleepy {
    ///     type Stage = S; type Data = u64; type Error = String;
    ///     fn start(&self) -> S { S }
    ///     async fn run(&self, _: S, secs: u64) -> Result<Next<S, u64>, String> {
    ///         tokio::time::sleep(Duration::from_secs(secs)).await;
    ///         Ok(Next::Done(secs))
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let pipeline = Pipeline::builder(Sleepy).workers(4).build();
    /// let (tx, results) = pipeline.group().ordered().deadline(Duration::from_secs(10)).open();
    /// for secs in [1, 2, 30, 3] {
    ///     tx.submit(secs).await.unwrap();
    /// }
    /// drop(tx);
    /// let results: Vec<_> = results.collect().await;
    /// // Ordered: the request of 30 s holds back the one after it; both are abandoned at 10 s.
    /// assert_eq!(results.len(), 3);
    /// assert!(matches!(results[2], Err(StageError::DeadlineExceeded { abandoned: 2 })));
    /// # }
    /// ```
    #[track_caller]
    pub fn deadline(self, deadline: Duration) -> Self {
        or_panic(self.try_deadline(deadline))
    }

    /// [`deadline`](Self::deadline), returning a [`ConfigError`] naming `deadline` if it is
    /// zero.
    pub fn try_deadline(mut self, deadline: Duration) -> Result<Self, ConfigError> {
        nonzero_duration("deadline", deadline)?;
        self.deadline = Some(Deadline::After(deadline));
        Ok(self)
    }

    /// [`deadline`](Self::deadline) at an instant on tokio's clock rather than after a duration
    /// (a deadline counted from the arrival of the request the group serves, say). An instant
    /// already past ends the group at its first poll.
    pub fn deadline_at(mut self, deadline: Instant) -> Self {
        self.deadline = Some(Deadline::At(deadline));
        self
    }

    /// Keyed ordering: requests with equal keys run one at a time, in submission order;
    /// requests with different keys run in parallel (per-account or per-entity processing).
    ///
    /// Keys are compared by hash: two different keys whose 64-bit hashes collide are also run
    /// one at a time (never the other way round). In an [`ordered`](Self::ordered) keyed group
    /// results come in the order requests are released to the pool, which keeps submission
    /// order within each key.
    pub fn keyed<K, F>(mut self, key: F) -> Self
    where
        K: Hash,
        F: Fn(&M::Data) -> K + Send + Sync + 'static,
    {
        let hasher = RandomState::new();
        self.key = Some(Arc::new(move |data: &M::Data| hasher.hash_one(key(data))));
        self
    }

    /// Opens the group once the pipeline's admission bounds
    /// ([`max_open_groups`](super::PipelineBuilder::max_open_groups),
    /// [`max_pending_requests`](super::PipelineBuilder::max_pending_requests)) have room for
    /// it and its `requests` requests, as [`open`](Self::open) does; or refuses it.
    ///
    /// With room now, the group is admitted at once. Else it waits up to `wait` for room, in
    /// arrival order, behind the admissions already waiting: at most `max_open_groups` wait at
    /// once, and one that finds that many waiting is refused at once, as is every admission
    /// when `wait` is zero. A refusal ([`GroupRefused`]) names the bound that had no room and
    /// estimates when there will be. A group reserving more requests than
    /// `max_pending_requests` (or `u32::MAX`) could never fit: it is refused at once.
    ///
    /// An admitted group holds its slot until its result stream ends or is dropped, and its
    /// `requests` until each has its result yielded; it may submit more than it reserved (the
    /// extra ones are not counted). The pipeline's figures ([`Pipeline::stats`]) count the
    /// admissions waiting, the requests pending and the refusals.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future before it resolves leaves the queue, and nothing is
    /// admitted.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use stagepipe::prelude::*;
    /// use stagepipe::AdmissionBound;
    ///
    /// # #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)] struct S;
    /// # struct Echo;
    /// # impl StateMachine for Echo {
    /// #     type Stage = S; type Data = u32; type Error = String;
    /// #     fn start(&self) -> S { S }
    /// #     async fn run(&self, _: S, n: u32) -> Result<Next<S, u32>, String> { Ok(Next::Done(n)) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let pipeline = Pipeline::builder(Echo).workers(2).max_open_groups(1).build();
    /// let (tx, results) = pipeline.group().admit(2, Duration::ZERO).await.unwrap();
    /// // The one slot is taken: refused at once, or after waiting 1 s for it.
    /// let refused = pipeline.group().admit(1, Duration::ZERO).await.unwrap_err();
    /// assert_eq!(refused.bound, AdmissionBound::OpenGroups);
    /// assert!(pipeline.group().admit(1, Duration::from_secs(1)).await.is_err());
    /// assert_eq!(pipeline.stats().groups_refused, 2);
    ///
    /// tx.submit(1).await.unwrap();
    /// tx.submit(2).await.unwrap();
    /// drop(tx);
    /// assert_eq!(results.count().await, 2);
    /// // The group has closed: its slot is free again.
    /// assert!(pipeline.group().admit(1, Duration::ZERO).await.is_ok());
    /// # }
    /// ```
    pub async fn admit(
        self,
        requests: usize,
        wait: Duration,
    ) -> Result<(Submitter<M>, GroupResults<M>), GroupRefused> {
        let admission = Arc::clone(&self.pipeline.inner.admission);
        let ticket = admission.admit(requests, wait).await?;
        let (tx, mut results) = self.open();
        results.hold(ticket);
        Ok((tx, results))
    }

    /// Opens the group: a [`Submitter`] and the group's own result stream.
    ///
    /// Requests progress while the results are read: the result stream pulls submitted
    /// requests into the pool as its window allows. Dropping the submitter (or
    /// [`Submitter::close`]) ends the stream after the last result; dropping the stream cancels
    /// the group's unfinished requests.
    pub fn open(self) -> (Submitter<M>, GroupResults<M>) {
        let (tx, rx) = mpsc::channel(self.window);
        let results = self.open_with(Source::Channel(rx), 0);
        let shared = Arc::clone(&results.shared);
        (
            Submitter {
                tx: Some(tx),
                shared,
            },
            results,
        )
    }

    /// Opens the group over `requests`, all of them given up front: the result stream pulls
    /// each request from the iterator as the group's window has room for it (no task, no
    /// channel; a request stays in the iterator until then), and ends after the last result.
    ///
    /// The iterator must know its length (`ExactSizeIterator`: a `Vec`, an array, a slice's
    /// iterator, a `Range` of `u32` or `usize`, and maps of those), as every request of it
    /// counts as submitted: a group cut short by its
    /// [`deadline`](Self::deadline) or a timed-out drain counts those not yet pulled among its
    /// `abandoned`. When the pipeline starts [draining](super::Pipeline::drain), the group
    /// pulls no more requests; its results end, after those of the requests already pulled,
    /// with [`StageError::Drained`] counting the requests left without a result.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::StreamExt;
    /// use stagepipe::prelude::*;
    ///
    /// # #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)] struct S;
    /// struct Double;
    /// impl StateMachine for Double {
    ///     type Stage = S; type Data = u64; type Error = String;
    ///     fn start(&self) -> S { S }
    ///     async fn run(&self, _: S, n: u64) -> Result<Next<S, u64>, String> { Ok(Next::Done(2 * n)) }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pipeline = Pipeline::builder(Double).workers(2).build();
    /// let numbers: Vec<u64> = (1..=100).collect();
    /// let results = pipeline.group().ordered().window(4).submit_all(numbers);
    /// let doubled: Vec<u64> = results.map(Result::unwrap).collect().await;
    /// assert_eq!(doubled, (1..=100).map(|n| 2 * n).collect::<Vec<_>>());
    /// # }
    /// ```
    pub fn submit_all<I>(self, requests: I) -> GroupResults<M>
    where
        I: IntoIterator<Item = M::Data>,
        I::IntoIter: ExactSizeIterator + Send + 'static,
    {
        let requests = requests.into_iter();
        let len = requests.len() as u64;
        self.open_with(Source::Iter(Box::new(requests.fuse())), len)
    }

    /// [`submit_all`](Self::submit_all) once the pipeline's admission bounds have room for the
    /// group and every one of its requests, as [`admit`](Self::admit) (reserving
    /// `requests.len()`) does; or refuses it, with the requests dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`admit`](Self::admit) is.
    pub async fn admit_all<I>(
        self,
        requests: I,
        wait: Duration,
    ) -> Result<GroupResults<M>, GroupRefused>
    where
        I: IntoIterator<Item = M::Data>,
        I::IntoIter: ExactSizeIterator + Send + 'static,
    {
        let requests = requests.into_iter();
        let admission = Arc::clone(&self.pipeline.inner.admission);
        let ticket = admission.admit(requests.len(), wait).await?;
        let mut results = self.submit_all(requests);
        results.hold(ticket);
        Ok(results)
    }

    /// Opens the group over `source`, with `submitted` requests counted as submitted already.
    fn open_with(self, source: Source<M::Data>, submitted: u64) -> GroupResults<M> {
        let inner = self.pipeline.inner;
        let shared = Arc::new(GroupShared {
            closed: AtomicBool::new(false),
            submitted: AtomicU64::new(submitted),
            drain: Arc::clone(&inner.drain),
        });
        let deadline = self.deadline.map(|deadline| match deadline {
            Deadline::After(d) => crate::time::deadline(Instant::now(), d),
            Deadline::At(at) => at,
        });
        let drain_waker = Arc::new(AtomicWaker::new());
        let gate = self.key.map(|key| KeyGate::new(key, self.window));
        let mut results = GroupResults {
            source: Some(source),
            gate,
            run: Run::new(inner, self.ordered, self.window),
            shared: shared.clone(),
            cancel_on_error: self.cancel_on_error,
            drain_waker,
            deadline,
            timer: None,
            yielded: 0,
            ticket: None,
            drained: None,
        };
        // Counted as open (`Run::new`) before it registers, and both before it looks at the
        // drain: registering takes the drain's lock, which the drain takes too once it is
        // draining, so either the drain finds the group counted (and waits for it) or the
        // group finds the pipeline draining (and closes at once).
        shared.drain.register(&results.drain_waker);
        if results.shared.drain.is_draining() {
            // Opened while the pipeline drains: closed at once; a group given its requests up
            // front (the only kind with requests submitted at opening) says it ran none.
            results.cancel();
            if submitted > 0 {
                results.drained = Some(submitted);
            }
        }
        results
    }
}

/// Where a group's requests come from: its submitters' channel, or an iterator given up front.
enum Source<D> {
    Channel(mpsc::Receiver<D>),
    Iter(Box<dyn Iterator<Item = D> + Send>),
}

impl<D> Source<D> {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<D>> {
        match self {
            Self::Channel(rx) => rx.poll_recv(cx),
            Self::Iter(requests) => Poll::Ready(requests.next()),
        }
    }
}

struct GroupShared {
    closed: AtomicBool,
    /// Requests submitted so far.
    submitted: AtomicU64,
    /// The pipeline's drain.
    drain: Arc<Drain>,
}

/// Submits requests to one request group; from [`GroupBuilder::open`].
///
/// Clones submit to the same group (several tasks feeding one caller's results). The group's
/// result stream ends after the last result once every clone is dropped or
/// [`close`](Self::close)d.
pub struct Submitter<M: StateMachine> {
    tx: Option<mpsc::Sender<M::Data>>,
    shared: Arc<GroupShared>,
}

impl GroupShared {
    /// Whether submissions are refused: the group closed, or the pipeline is draining.
    fn refuses(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.drain.is_draining()
    }
}

impl<M: StateMachine> Clone for Submitter<M> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: StateMachine> fmt::Debug for Submitter<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submitter")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl<M: StateMachine> Submitter<M> {
    /// Submits one request. Waits while the group's window is full (backpressure).
    ///
    /// Returns `Err(GroupClosed(data))`, with the data, if the group is closed: by
    /// [`close`](Self::close), by cancel-on-error, or because its results were dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the request was not
    /// submitted, and the group's ordering has no hole.
    pub async fn submit(&self, data: M::Data) -> Result<(), GroupClosed<M::Data>> {
        let Some(tx) = &self.tx else {
            return Err(GroupClosed(data));
        };
        if self.shared.refuses() {
            return Err(GroupClosed(data));
        }
        match tx.reserve().await {
            Ok(permit) if !self.shared.refuses() => {
                permit.send(data);
                self.shared.submitted.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            _ => Err(GroupClosed(data)),
        }
    }

    /// Closes this handle for submissions: once every clone is closed or dropped, the result
    /// stream ends after the results of the requests already submitted.
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// Whether submissions are refused now.
    pub fn is_closed(&self) -> bool {
        self.shared.refuses() || self.tx.as_ref().is_none_or(mpsc::Sender::is_closed)
    }
}

/// Runs requests of one group on the pipeline's pool: the fan-out core, with per-group figures.
struct Run<M: StateMachine> {
    core: Option<Core<(u64, Outcome<M>)>>,
    inner: Arc<Inner<M>>,
    /// The time per request the group started from (the pipeline's, or `u64::MAX`), until the
    /// group has measured its own and given it to the pipeline; then `None`.
    seeded: Option<u64>,
}

impl<M: StateMachine> Run<M> {
    fn new(inner: Arc<Inner<M>>, ordered: bool, window: usize) -> Self {
        inner.drain.group_opened();
        let mut core = Core::new(inner.pool.clone(), ordered);
        core.set_window(window);
        // Every group runs the same machine: a new one sizes its jobs by what the others
        // measured. Else, before its first job is measured, it would cut its first requests
        // into jobs of a few each: thousands of new groups, thousands of small jobs.
        let seeded = inner.item_nanos.load(Ordering::Relaxed);
        core.seed_item_nanos(seeded);
        Self {
            core: Some(core),
            inner,
            seeded: Some(seeded),
        }
    }

    fn poll_next<S>(
        &mut self,
        stream: Pin<&mut S>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(u64, Outcome<M>)>>
    where
        S: Stream<Item = (u64, M::Data)>,
    {
        let Some(core) = &mut self.core else {
            return Poll::Ready(None);
        };
        let inner = &self.inner;
        let poll = core.poll_next(
            stream,
            &mut |(key, data)| {
                let inner = inner.clone();
                // The request stays data until a worker runs it: its state machine's future
                // (often kilobytes) is made and boxed only then, so a group's window of
                // queued requests costs little more than the requests themselves.
                async move { (key, Box::pin(inner.run_request(data)).await) }
            },
            cx,
        );
        // The group's first measurement of its own goes to the pipeline, for the groups
        // opened after it.
        if let Some(seeded) = self.seeded {
            let measured = core.item_nanos();
            if measured != seeded {
                self.inner.item_nanos.store(measured, Ordering::Relaxed);
                self.seeded = None;
            }
        }
        if let Poll::Ready(None) = poll {
            self.finish();
        }
        poll
    }

    /// Abandons unfinished requests (the core's drop cancels them).
    fn finish(&mut self) {
        if let Some(core) = self.core.take() {
            // Its last measurement too.
            let measured = core.item_nanos();
            if measured != u64::MAX {
                self.inner.item_nanos.store(measured, Ordering::Relaxed);
            }
            self.inner.drain.group_closed();
        }
    }

    fn is_terminated(&self) -> bool {
        self.core.is_none()
    }
}

impl<M: StateMachine> Drop for Run<M> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Holds back requests whose key has a request in the pool (keyed groups).
struct KeyGate<D> {
    key: KeyFn<D>,
    /// Keys with a request in the pool, and the requests parked behind it.
    busy: HashMap<u64, VecDeque<D>>,
    /// Released requests, to be pulled next.
    released: VecDeque<(u64, D)>,
    parked: usize,
    max_parked: usize,
}

impl<D> KeyGate<D> {
    fn new(key: KeyFn<D>, max_parked: usize) -> Self {
        Self {
            key,
            busy: HashMap::new(),
            released: VecDeque::new(),
            parked: 0,
            max_parked,
        }
    }

    /// The request with `key` finished: release the next one parked behind it.
    fn release(&mut self, key: u64) {
        if let Some(queue) = self.busy.get_mut(&key) {
            match queue.pop_front() {
                Some(data) => {
                    self.parked -= 1;
                    self.released.push_back((key, data));
                }
                None => {
                    self.busy.remove(&key);
                }
            }
        }
    }
}

/// The group's submitted requests as a stream, through the key gate if there is one.
struct Feed<'a, D> {
    source: Option<&'a mut Source<D>>,
    gate: Option<&'a mut KeyGate<D>>,
}

impl<D> Stream for Feed<'_, D> {
    type Item = (u64, D);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<(u64, D)>> {
        let this = self.get_mut();
        let Some(gate) = this.gate.as_deref_mut() else {
            return match this.source.as_deref_mut() {
                Some(source) => source.poll_next(cx).map(|d| d.map(|d| (0, d))),
                None => Poll::Ready(None),
            };
        };
        if let Some(next) = gate.released.pop_front() {
            return Poll::Ready(Some(next));
        }
        // Parked requests are released when the request ahead of them finishes, which wakes
        // the group's consumer: pending here never loses a wake-up.
        while gate.parked < gate.max_parked {
            let Some(source) = this.source.as_deref_mut() else {
                break;
            };
            match source.poll_next(cx) {
                Poll::Ready(Some(data)) => {
                    let key = (gate.key)(&data);
                    match gate.busy.get_mut(&key) {
                        Some(queue) => {
                            queue.push_back(data);
                            gate.parked += 1;
                        }
                        None => {
                            gate.busy.insert(key, VecDeque::new());
                            return Poll::Ready(Some((key, data)));
                        }
                    }
                }
                Poll::Ready(None) if gate.parked == 0 => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }
}

/// The result stream of one request group; from [`GroupBuilder::open`].
///
/// Yields `Ok(data)` for each request that reached `Done`, or the [`StageError`] that stopped
/// it. Only this group's results ever reach it. Dropping it cancels the group's unfinished
/// requests and refuses later submissions.
#[must_use = "streams do nothing unless polled"]
pub struct GroupResults<M: StateMachine> {
    source: Option<Source<M::Data>>,
    gate: Option<KeyGate<M::Data>>,
    run: Run<M>,
    shared: Arc<GroupShared>,
    cancel_on_error: bool,
    /// Woken when the pipeline starts draining, and when its drain times out.
    drain_waker: Arc<AtomicWaker>,
    /// The group's deadline, and its timer once the stream has been polled.
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    /// Results yielded so far.
    yielded: u64,
    /// An admitted group's room, given back as results are yielded and when the group closes.
    ticket: Option<Ticket>,
    /// A group given its requests up front, ended by the drain before every one had a result:
    /// those left, to be yielded as [`StageError::Drained`].
    drained: Option<u64>,
}

// Nothing in a group's result stream is pinned structurally: its buffers hold plain values.
impl<M: StateMachine> Unpin for GroupResults<M> {}

impl<M: StateMachine> GroupResults<M> {
    /// Keeps an admitted group's room until it closes (a group closed at opening, by a drain,
    /// gives it back at once).
    fn hold(&mut self, ticket: Ticket) {
        if !self.run.is_terminated() {
            self.ticket = Some(ticket);
        }
    }

    /// Closes the group after an error (cancel-on-error) or when the stream is dropped.
    fn cancel(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        if let Some(Source::Channel(rx)) = &mut self.source {
            rx.close();
        }
        self.source = None;
        self.gate = None;
        self.run.finish();
        self.ticket = None;
    }

    /// If the group's deadline has passed or the pipeline's drain timed out: cancels the group
    /// and returns its last item. Else registers for both.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Option<StageError<M>> {
        let aborted = self.shared.drain.is_aborted();
        if !aborted {
            let deadline = self.deadline?;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
        let submitted = self.shared.submitted.load(Ordering::Acquire);
        let abandoned = submitted.saturating_sub(self.yielded);
        self.cancel();
        self.deadline = None;
        Some(if aborted {
            StageError::DrainTimedOut { abandoned }
        } else {
            StageError::DeadlineExceeded { abandoned }
        })
    }
}

impl<M: StateMachine> Stream for GroupResults<M> {
    type Item = Outcome<M>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Outcome<M>>> {
        let this = self.get_mut();
        if let Some(abandoned) = this.drained.take() {
            return Poll::Ready(Some(Err(StageError::Drained { abandoned })));
        }
        if this.shared.drain.is_draining() {
            // No more submissions: the stream ends after the requests already submitted.
            match &mut this.source {
                Some(Source::Channel(rx)) => rx.close(),
                // Emptied, not removed: a keyed group still releases what it has parked.
                Some(Source::Iter(requests)) => *requests = Box::new(std::iter::empty()),
                None => {}
            }
        }
        let feed = Feed {
            source: this.source.as_mut(),
            gate: this.gate.as_mut(),
        };
        let poll = this.run.poll_next(std::pin::pin!(feed), cx);
        match poll {
            Poll::Ready(Some((key, outcome))) => {
                if let Some(gate) = &mut this.gate {
                    gate.release(key);
                }
                this.yielded += 1;
                if let Some(ticket) = &mut this.ticket {
                    ticket.answered();
                }
                if outcome.is_err() && this.cancel_on_error {
                    this.cancel();
                }
                Poll::Ready(Some(outcome))
            }
            Poll::Ready(None) => {
                // Ended by the drain (not cancelled) before every request given up front had
                // a result: say how many are left.
                let cut = !this.shared.closed.load(Ordering::Acquire);
                let submitted = this.shared.submitted.load(Ordering::Acquire);
                let abandoned = submitted.saturating_sub(this.yielded);
                this.cancel();
                if cut && abandoned > 0 {
                    return Poll::Ready(Some(Err(StageError::Drained { abandoned })));
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Woken when the pipeline starts draining, to end the group's input, and when
                // its drain times out.
                this.drain_waker.register(cx.waker());
                if let Some(cut) = this.poll_cut(cx) {
                    return Poll::Ready(Some(Err(cut)));
                }
                if this.shared.drain.is_draining()
                    && matches!(&this.source, Some(Source::Channel(rx)) if !rx.is_closed())
                {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}

impl<M: StateMachine> FusedStream for GroupResults<M> {
    fn is_terminated(&self) -> bool {
        // A group opened while the pipeline drains has run nothing but still has its
        // `Drained` item to yield.
        self.run.is_terminated() && self.drained.is_none()
    }
}

impl<M: StateMachine> Drop for GroupResults<M> {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl<M: StateMachine> fmt::Debug for GroupResults<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupResults")
            .field("core", &self.run.core)
            .field("cancel_on_error", &self.cancel_on_error)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// Stream for the [`through`](crate::PipelineExt::through) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct Through<S, M: StateMachine> {
        #[pin]
        stream: S,
        run: Run<M>,
    }
}

impl<S, M: StateMachine> Through<S, M> {
    pub(crate) fn new(stream: S, pipeline: &Pipeline<M>) -> Self {
        let inner = pipeline.inner.clone();
        let window = inner.window;
        Self {
            stream,
            run: Run::new(inner, true, window),
        }
    }
}

/// A pinned stream's items tagged with key `0`, for the group machinery (`through` has no keys).
struct Tagged<'a, S> {
    stream: Pin<&'a mut S>,
}

impl<S: Stream> Stream for Tagged<'_, S> {
    type Item = (u64, S::Item);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream
            .as_mut()
            .poll_next(cx)
            .map(|d| d.map(|d| (0, d)))
    }
}

impl<S, M> Stream for Through<S, M>
where
    S: Stream<Item = M::Data>,
    M: StateMachine,
{
    type Item = Outcome<M>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Outcome<M>>> {
        let this = self.project();
        let mut tagged = Tagged {
            stream: this.stream,
        };
        this.run
            .poll_next(Pin::new(&mut tagged), cx)
            .map(|r| r.map(|(_, outcome)| outcome))
    }
}

impl<S, M> FusedStream for Through<S, M>
where
    S: Stream<Item = M::Data>,
    M: StateMachine,
{
    fn is_terminated(&self) -> bool {
        self.run.is_terminated()
    }
}

impl<S: fmt::Debug, M: StateMachine> fmt::Debug for Through<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Through")
            .field("stream", &self.stream)
            .field("core", &self.run.core)
            .finish()
    }
}
