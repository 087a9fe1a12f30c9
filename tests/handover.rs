//! A worker hands each result over when its item finishes, not when the chunk of items it is
//! running ends: one worker, 10,000 items of a few µs, item 5000 blocking its worker thread
//! (a stand-in for an item spinning for 300 ms). Every item that finished before item 5000
//! started reaches the consumer while item 5000 still runs: the worker put each result in the
//! stream's channel as it finished, and the consumer, whose wake-up the worker holds back
//! until its chunk ends, is woken by the fan-out's watch thread instead (within about 2 ms).
//!
//! Item 5000 blocks on a channel that the consumer releases only once it has received every
//! item before it, so the test never depends on timing: if the results were held back until
//! the worker's chunk ends, the consumer would never receive them, item 5000 would give up
//! after a generous real timeout and the test fails. The consumer polls the stream on a thread
//! of its own runtime (not the workers'), so it never runs items itself under a borrowed slot
//! (a consumer running item 5000 itself could yield nothing until it ends, whatever the pool
//! did); or in a task of the workers' runtime, where it could borrow a slot only for items
//! measured under 2 µs (these take more).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use stagepipe::prelude::*;

const ITEMS: u64 = 10_000;
const BLOCKER: u64 = 5_000;
/// Generous: item 5000 is released as soon as the consumer has every item before it.
const GIVE_UP: Duration = Duration::from_secs(60);

/// A few microseconds of CPU (in a release build; more in a debug one): above the 1 µs under
/// which items hand their results over at their chunk's end.
fn spin(x: u64) -> u64 {
    let mut h = x | 1;
    for _ in 0..4_000 {
        h = black_box(h.wrapping_mul(6364136223846793005).wrapping_add(1));
        h ^= h >> 29;
    }
    h
}

/// What the items share: the release of item 5000, and whether it had to give up.
struct Blocker {
    release: Mutex<Option<mpsc::Receiver<()>>>,
    gave_up: AtomicBool,
}

impl Blocker {
    fn item(&self, i: u64) -> (u64, u64) {
        if i == BLOCKER {
            let release = self
                .release
                .lock()
                .unwrap()
                .take()
                .expect("item 5000 runs once");
            if release.recv_timeout(GIVE_UP).is_err() {
                self.gave_up.store(true, Ordering::SeqCst);
            }
        }
        (i, spin(i))
    }
}

/// Where the consumer polls the stream.
#[derive(Clone, Copy, PartialEq)]
enum Consumer {
    /// On a thread of its own (`block_on` on a runtime of its own): it never runs items itself
    /// under a borrowed slot.
    OwnThread,
    /// In a task of the runtime the pool's workers run on.
    Task,
}

/// Runs `make(pool, blocker)`'s stream to the end, polled as `consumer` says; releases item
/// 5000 once every item before it was received. Returns the items in the order yielded, and
/// whether item 5000 had to give up.
fn run_on<S>(
    consumer: Consumer,
    make: impl FnOnce(WorkerPool, Arc<Blocker>) -> S,
) -> (Vec<u64>, bool)
where
    S: Stream<Item = (u64, u64)> + Send + 'static,
{
    let workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let pool = WorkerPool::new(1);
    // Start the pool's one worker from a task of the workers' runtime, so that the consumer's
    // thread below is not one of that runtime's.
    workers.block_on({
        let pool = pool.clone();
        async move {
            tokio::spawn(async move {
                let warm: Vec<u64> = stream::iter(0..4u64)
                    .fan_out_ordered(&pool, |x| async move { x })
                    .collect()
                    .await;
                assert_eq!(warm, [0, 1, 2, 3]);
            })
            .await
            .unwrap()
        }
    });
    let (release, released) = mpsc::channel();
    let blocker = Arc::new(Blocker {
        release: Mutex::new(Some(released)),
        gave_up: AtomicBool::new(false),
    });
    let stream = make(pool, blocker.clone());
    let consume = async move {
        let mut stream = std::pin::pin!(stream);
        let mut yielded = Vec::with_capacity(ITEMS as usize);
        let mut before = 0;
        let mut release = Some(release);
        while let Some((i, h)) = stream.next().await {
            assert_eq!(h, spin(i), "item {i}'s value");
            yielded.push(i);
            if i < BLOCKER {
                before += 1;
                if before == BLOCKER {
                    // Every item before 5000 is here: item 5000 may end now.
                    let _ = release.take().unwrap().send(());
                }
            }
        }
        yielded
    };
    let yielded = match consumer {
        Consumer::OwnThread => tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(consume),
        Consumer::Task => workers.block_on(async move { tokio::spawn(consume).await.unwrap() }),
    };
    drop(workers);
    (yielded, blocker.gave_up.load(Ordering::SeqCst))
}

/// `fan_out_ordered` with the consumer polling as `consumer` says: no item before 5000 held
/// back until it ended, every item in input order.
fn ordered_hands_over_results_as_they_finish(consumer: Consumer) {
    let (yielded, gave_up) = run_on(consumer, |pool, blocker| {
        stream::iter(0..ITEMS).fan_out_ordered(pool, move |i| {
            let blocker = blocker.clone();
            async move { blocker.item(i) }
        })
    });
    assert!(
        !gave_up,
        "the items before item 5000 were held back until it ended"
    );
    assert_eq!(yielded, (0..ITEMS).collect::<Vec<_>>(), "input order");
}

#[test]
fn fan_out_ordered_hands_over_results_as_they_finish() {
    ordered_hands_over_results_as_they_finish(Consumer::OwnThread);
}

#[test]
fn fan_out_hands_over_results_as_they_finish() {
    let (mut yielded, gave_up) = run_on(Consumer::OwnThread, |pool, blocker| {
        stream::iter(0..ITEMS).fan_out(pool, move |i| {
            let blocker = blocker.clone();
            async move { blocker.item(i) }
        })
    });
    assert!(
        !gave_up,
        "the items before item 5000 were held back until it ended"
    );
    // One worker runs the items in input order: every item before 5000 came out before it.
    let at = yielded.iter().position(|&i| i == BLOCKER).unwrap();
    assert!(yielded[..at].iter().all(|&i| i < BLOCKER));
    yielded.sort_unstable();
    assert_eq!(yielded, (0..ITEMS).collect::<Vec<_>>(), "every item, once");
}

/// The consumer is a task of the workers' own runtime: a worker thread that wakes it puts it in
/// its LIFO slot, which no other thread may take, so it must not stay there while the worker
/// goes on with item 5000.
#[test]
fn a_task_consumer_gets_results_as_they_finish() {
    ordered_hands_over_results_as_they_finish(Consumer::Task);
}

/// A one-stage machine whose request `i` is `Blocker::item(i)`.
struct Items(Arc<Blocker>);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Only;

impl StateMachine for Items {
    type Stage = Only;
    type Data = (u64, u64);
    type Error = String;

    fn start(&self) -> Only {
        Only
    }

    async fn run(&self, _: Only, (i, _): (u64, u64)) -> Result<Next<Only, (u64, u64)>, String> {
        Ok(Next::Done(self.0.item(i)))
    }
}

/// A request group runs on the same core: `ordered` or not, with the consumer polling as
/// `consumer` says, no request before 5000 is held back until it ended. (Where request 5000
/// falls in its worker's chunk depends on how the group cut its requests into chunks: these
/// check the promise, whichever way the results before it leave; the fan-out tests above are
/// the ones that need the watch thread.)
fn group_hands_over_results_as_they_finish(ordered: bool, consumer: Consumer) {
    let (mut yielded, gave_up) = run_on(consumer, |pool, blocker| {
        let pipeline = Pipeline::builder(Items(blocker)).pool(&pool).build();
        // A window as wide as a fan-out's: chunks of many requests each.
        let group = pipeline.group().window(512);
        let group = match ordered {
            true => group.ordered(),
            false => group,
        };
        group
            .submit_all((0..ITEMS).map(|i| (i, 0)).collect::<Vec<_>>())
            .map(|result| result.expect("no request fails"))
    });
    assert!(
        !gave_up,
        "the requests before request 5000 were held back until it ended"
    );
    if !ordered {
        // One worker runs the requests in submission order: every one before 5000 came out
        // before it.
        let at = yielded.iter().position(|&i| i == BLOCKER).unwrap();
        assert!(yielded[..at].iter().all(|&i| i < BLOCKER));
        yielded.sort_unstable();
    }
    assert_eq!(yielded, (0..ITEMS).collect::<Vec<_>>());
}

#[test]
fn an_ordered_group_hands_over_results_as_they_finish() {
    group_hands_over_results_as_they_finish(true, Consumer::Task);
}

#[test]
fn an_unordered_group_hands_over_results_as_they_finish() {
    group_hands_over_results_as_they_finish(false, Consumer::OwnThread);
}
