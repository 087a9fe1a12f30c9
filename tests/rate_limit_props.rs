//! Random consumers on shared limiters and keys, on a paused clock: in every window of length
//! `T`, the cells released for one quota (the shared limiter, or one key) number at most
//! `burst + (T + 1 ms) / period`, whatever the consumers' stalls, late polls and drops.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::stream;
use proptest::prelude::*;
use stagepipe::prelude::*;
use stagepipe::{RateLimit, RateLimitBy};
use tokio::time::{Instant, advance};
use tokio_test::task::{self, Spawn};

type Items = stream::Iter<std::vec::IntoIter<u8>>;
type Call = Pin<Box<dyn Future<Output = u8>>>;
type ByKey = RateLimitBy<Items, u8, fn(&u8) -> u8>;

/// Who is limited: the shared limiter, or one key of the keyed limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Quota {
    Shared,
    Key(u8),
}

/// One consumer: what it draws on, and what it holds.
enum Consumer {
    /// `rate_limit` on the shared limiter.
    Stream(Spawn<RateLimit<Items>>),
    /// A loop of `until_ready` calls on its own handle.
    Direct(Arc<RateLimiter>, Spawn<Call>),
    /// `rate_limit_by` on the keyed limiter, items are keys.
    Keyed(Spawn<ByKey>),
    /// A loop of `until_key_ready` calls on its own handle, keys in turn.
    KeyedDirect(Arc<KeyedRateLimiter<u8>>, Spawn<Call>, u8),
}

fn key_of(k: &u8) -> u8 {
    *k
}

fn direct_call(limiter: &Arc<RateLimiter>) -> Spawn<Call> {
    let limiter = Arc::clone(limiter);
    task::spawn(Box::pin(async move {
        limiter.until_ready().await;
        0
    }))
}

fn keyed_call(limiter: &Arc<KeyedRateLimiter<u8>>, key: u8) -> Spawn<Call> {
    let limiter = Arc::clone(limiter);
    task::spawn(Box::pin(async move {
        limiter.until_key_ready(&key).await;
        key
    }))
}

/// A fresh consumer of kind `kind % 4`.
fn consumer(kind: usize, limiter: &RateLimiter, keyed: &KeyedRateLimiter<u8>) -> Consumer {
    // Keys 0..3 in a fixed but uneven order.
    let keys: Vec<u8> = (0..400u32).map(|i| (i * 7 % 11 % 3) as u8).collect();
    match kind % 4 {
        0 => Consumer::Stream(task::spawn(
            stream::iter(vec![0u8; 400]).rate_limit(limiter),
        )),
        1 => {
            let handle = Arc::new(limiter.clone());
            let call = direct_call(&handle);
            Consumer::Direct(handle, call)
        }
        2 => Consumer::Keyed(task::spawn(
            stream::iter(keys).rate_limit_by(keyed, key_of as fn(&u8) -> u8),
        )),
        _ => {
            let handle = Arc::new(keyed.clone());
            let call = keyed_call(&handle, 0);
            Consumer::KeyedDirect(handle, call, 0)
        }
    }
}

impl Consumer {
    /// Polls until pending or `max` cells were released; returns whose quota each drew on.
    fn poll(&mut self, max: usize) -> Vec<Quota> {
        let mut out = Vec::new();
        while out.len() < max {
            match self {
                Consumer::Stream(s) => match s.poll_next() {
                    Poll::Ready(Some(_)) => out.push(Quota::Shared),
                    _ => break,
                },
                Consumer::Keyed(s) => match s.poll_next() {
                    Poll::Ready(Some(k)) => out.push(Quota::Key(k)),
                    _ => break,
                },
                Consumer::Direct(handle, call) => match call.poll() {
                    Poll::Ready(_) => {
                        out.push(Quota::Shared);
                        *call = direct_call(handle);
                    }
                    Poll::Pending => break,
                },
                Consumer::KeyedDirect(handle, call, turn) => match call.poll() {
                    Poll::Ready(k) => {
                        out.push(Quota::Key(k));
                        *turn = turn.wrapping_add(1);
                        *call = keyed_call(handle, *turn % 3);
                    }
                    Poll::Pending => break,
                },
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// The clock moves on by this many microseconds; nobody is polled meanwhile.
    Advance(u64),
    /// Consumer `who` is polled (late, if its slot came due meanwhile), for at most `max` cells.
    Poll { who: usize, max: usize },
    /// Every consumer is polled until pending, as a runtime would after a wake-up.
    PollAll,
    /// A direct `check` on the shared limiter, or `check_key` on one key.
    Check(Option<u8>),
    /// Consumer `who` is dropped (giving back a slot it holds) and replaced by a fresh one.
    Drop(usize),
    /// The keyed limiter drops the state of its idle keys.
    RetainRecent,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4_000).prop_map(Op::Advance),
        1 => (0u64..40_000).prop_map(Op::Advance),
        4 => (0usize..6, 1usize..50).prop_map(|(who, max)| Op::Poll { who, max }),
        2 => Just(Op::PollAll),
        1 => proptest::option::of(0u8..3).prop_map(Op::Check),
        1 => (0usize..6).prop_map(Op::Drop),
        1 => Just(Op::RetainRecent),
    ]
}

/// Runs `ops` with six consumers (kinds 0..4, then two more streams); returns each quota's
/// release instants.
fn run(period: Duration, burst: u32, ops: &[Op]) -> HashMap<Quota, Vec<Duration>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let limiter = RateLimiter::per(period).burst(burst);
        let keyed = KeyedRateLimiter::per(period).burst(burst);
        let kinds = [0, 1, 2, 3, 0, 2];
        let mut consumers: Vec<Consumer> = kinds
            .iter()
            .map(|&k| consumer(k, &limiter, &keyed))
            .collect();
        let start = Instant::now();
        let mut released: HashMap<Quota, Vec<Duration>> = HashMap::new();
        let mut record = |quotas: Vec<Quota>| {
            for q in quotas {
                released.entry(q).or_default().push(start.elapsed());
            }
        };
        for op in ops {
            match *op {
                Op::Advance(us) => advance(Duration::from_micros(us)).await,
                Op::Poll { who, max } => record(consumers[who].poll(max)),
                Op::PollAll => {
                    for c in &mut consumers {
                        record(c.poll(usize::MAX));
                    }
                }
                Op::Check(None) => {
                    if limiter.check() {
                        record(vec![Quota::Shared]);
                    }
                }
                Op::Check(Some(k)) => {
                    if keyed.check_key(&k) {
                        record(vec![Quota::Key(k)]);
                    }
                }
                Op::Drop(who) => consumers[who] = consumer(kinds[who], &limiter, &keyed),
                Op::RetainRecent => keyed.retain_recent(),
            }
        }
        released
    })
}

/// The first window of `at` holding more cells than `burst + (T + 1 ms) / period`, if any.
fn excess(at: &[Duration], burst: u32, period: Duration) -> Option<String> {
    let mut at = at.to_vec();
    at.sort();
    for i in 0..at.len() {
        for j in i..at.len() {
            let window = at[j] - at[i];
            let span = (window + Duration::from_millis(1)).as_nanos() / period.as_nanos();
            let allowed = u64::from(burst) + u64::try_from(span).unwrap();
            let cells = (j - i + 1) as u64;
            if cells > allowed {
                return Some(format!(
                    "{cells} cells within {window:?} from {:?} (allowed {allowed})",
                    at[i]
                ));
            }
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_window_exceeds_the_quota(
        period_us in prop_oneof![Just(100u64), Just(400), Just(1_000), Just(3_000), Just(10_000)],
        burst in 1u32..4,
        ops in proptest::collection::vec(op(), 1..160),
    ) {
        let period = Duration::from_micros(period_us);
        let released = run(period, burst, &ops);
        for (quota, at) in &released {
            if let Some(e) = excess(at, burst, period) {
                prop_assert!(false, "{quota:?}: {e}");
            }
        }
    }
}
