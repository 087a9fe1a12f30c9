//! Cancellation fuzzing: every operator and every `Call` layer, dropped at a random point by a
//! consumer that also abandons `next()` at random (a `select!` with a timer), leaks nothing.
//!
//! Every input item and every user future carries a guard, so "nothing leaked" is a count: once
//! the stream is dropped and the runtime has run, no guard is alive. Every shared budget is back
//! to idle: no pool worker busy, no in-flight permit held, no rate-limit cell kept by the dropped
//! stream, no circuit-breaker trial outstanding. And every handle still serves a new stream in
//! full. All on a paused clock: each case is deterministic given its seed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gauge, Guard, Rng};
use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt, TryStreamExt};
use proptest::prelude::*;
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An input item: its number and a guard that lives as long as any copy of it.
#[derive(Clone)]
struct Tok {
    x: u64,
    _live: Arc<Guard>,
}

/// The shared handles every case runs against, and the gauge of live items and futures.
struct Handles {
    live: Gauge,
    pool: WorkerPool,
    limit: InFlightLimit,
    limiter: RateLimiter,
    keyed: KeyedRateLimiter<u64>,
    breaker: CircuitBreaker,
    stats: Stats,
    call_stats: CallStats,
    delays: Arc<Vec<u64>>,
}

impl Handles {
    fn new(rng: &mut Rng) -> Self {
        Self {
            live: Gauge::default(),
            pool: WorkerPool::new(3),
            limit: InFlightLimit::new(4),
            limiter: RateLimiter::per(ms(10)),
            keyed: KeyedRateLimiter::per(ms(10)),
            breaker: CircuitBreaker::new(2, ms(50)),
            stats: Stats::new("fuzz"),
            call_stats: CallStats::new("fuzz"),
            delays: Arc::new((0..16).map(|_| rng.below(40)).collect()),
        }
    }

    fn input(&self, n: u64) -> BoxStream<'static, Tok> {
        let live = self.live.clone();
        stream::iter(0..n)
            .map(move |x| Tok {
                x,
                _live: Arc::new(live.enter()),
            })
            .boxed()
    }

    /// The user's async function: holds a guard from the moment it is made, sleeps a while,
    /// fails for some items.
    fn work(&self) -> impl Fn(Tok) -> BoxFut + Clone + Send + Sync + 'static {
        let live = self.live.clone();
        let delays = self.delays.clone();
        move |tok: Tok| {
            let guard = live.enter();
            let delay = delays[(tok.x % 16) as usize];
            async move {
                let _guard = guard;
                sleep(ms(delay)).await;
                if tok.x % 7 == 3 {
                    Err(format!("item {} failed", tok.x))
                } else {
                    Ok(tok.x)
                }
            }
            .boxed()
        }
    }
}

type BoxFut = futures::future::BoxFuture<'static, Result<u64, String>>;

/// The operators under test, each as a stream of `()`.
const OPS: &[&str] = &[
    "fan_out_ordered",
    "fan_out",
    "in_flight",
    "in_flight_ordered",
    "fan_out_by_key",
    "rate_limit",
    "rate_limit_by",
    "batch",
    "batch_dedupe",
    "dedupe_by",
    "debounce",
    "retry",
    "retry_if",
    "circuit_breaker",
    "with_stats",
    "through",
    "submit_all",
    "admit_all_keyed",
    "try_fan_out_ordered",
    "try_fan_out",
    "try_in_flight",
    "try_in_flight_ordered",
    "try_batch",
    "try_with_stats",
    "call",
];

/// A three-stage machine whose middle stage is the user's function.
struct Machine(Gauge, Arc<Vec<u64>>);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Step {
    Parse,
    Work,
}

impl StateMachine for Machine {
    type Stage = Step;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Step {
        Step::Parse
    }

    async fn run(&self, stage: Step, x: u64) -> Result<Next<Step, u64>, String> {
        let _guard = self.0.enter();
        match stage {
            Step::Parse => Ok(Next::Stage(Step::Work, x)),
            Step::Work => {
                sleep(ms(self.1[(x % 16) as usize])).await;
                if x % 7 == 3 {
                    Err(format!("item {x} failed"))
                } else {
                    Ok(Next::Done(x))
                }
            }
        }
    }
}

fn build(op: &str, h: &Handles, pipeline: &Pipeline<Machine>) -> BoxStream<'static, ()> {
    let input = h.input(60);
    let work = h.work();
    match op {
        "fan_out_ordered" => input.fan_out_ordered(&h.pool, work).map(drop).boxed(),
        "fan_out" => input.fan_out(&h.pool, work).map(drop).boxed(),
        "in_flight" => input.in_flight(&h.limit, work).map(drop).boxed(),
        "in_flight_ordered" => input.in_flight_ordered(&h.limit, work).map(drop).boxed(),
        "fan_out_by_key" => input
            .fan_out_by_key(&h.pool, |t: &Tok| t.x % 5, work)
            .map(drop)
            .boxed(),
        "rate_limit" => input.rate_limit(&h.limiter).map(drop).boxed(),
        "rate_limit_by" => input
            .rate_limit_by(&h.keyed, |t: &Tok| t.x % 3)
            .map(drop)
            .boxed(),
        "batch" => input.batch(4, ms(15)).map(drop).boxed(),
        "batch_dedupe" => input
            .batch_dedupe(4, ms(15), |t: &Tok| t.x % 6)
            .map(drop)
            .boxed(),
        "dedupe_by" => input
            .dedupe_by(ms(30), 8, |t: &Tok| t.x % 9)
            .map(drop)
            .boxed(),
        "debounce" => input
            .then(|t| async move {
                sleep(ms(t.x % 4 * 5)).await;
                t
            })
            .debounce(ms(8))
            .map(drop)
            .boxed(),
        "retry" => input.retry(Backoff::fixed(ms(7)), work).map(drop).boxed(),
        "retry_if" => input
            .retry_if(Backoff::exponential(ms(3)), work, |e: &String| {
                e.contains('3')
            })
            .map(drop)
            .boxed(),
        "circuit_breaker" => input.circuit_breaker(&h.breaker, work).map(drop).boxed(),
        "with_stats" => input.with_stats(&h.stats).then(work).map(drop).boxed(),
        "through" => input.map(|t| t.x).through(pipeline).map(drop).boxed(),
        "submit_all" => pipeline
            .group()
            .ordered()
            .window(4)
            .submit_all((0..60usize).map(|x| x as u64))
            .map(drop)
            .boxed(),
        "admit_all_keyed" => {
            let group = pipeline.group().keyed(|x: &u64| x % 5).window(6);
            let admitted = group.admit_all((0..60usize).map(|x| x as u64), ms(50));
            stream::once(admitted)
                .flat_map(|results| results.expect("no admission bound").map(drop))
                .boxed()
        }
        "try_fan_out_ordered" => fallible(input)
            .try_fan_out_ordered(&h.pool, work)
            .map(drop)
            .boxed(),
        "try_fan_out" => fallible(input).try_fan_out(&h.pool, work).map(drop).boxed(),
        "try_in_flight" => fallible(input)
            .try_in_flight(&h.limit, work)
            .map(drop)
            .boxed(),
        "try_in_flight_ordered" => fallible(input)
            .try_in_flight_ordered(&h.limit, work)
            .map(drop)
            .boxed(),
        "try_batch" => fallible(input).try_batch(4, ms(15)).map(drop).boxed(),
        "try_with_stats" => fallible(input)
            .try_with_stats(&h.stats)
            .map_ok(drop)
            .map(drop)
            .boxed(),
        "call" => {
            let call = Call::new(work)
                .timeout(ms(25))
                .rate_limit(&h.limiter)
                .in_flight(&h.limit)
                .circuit_breaker(&h.breaker)
                .retry(Backoff::fixed(ms(4)).max_attempts(3))
                .stats(&h.call_stats);
            input
                .fan_out_ordered(&h.pool, move |t| call.run(t))
                .map(drop)
                .boxed()
        }
        other => unreachable!("unknown operator {other}"),
    }
}

/// A fallible stream of tokens: `Err` for the items `work` fails, without running it.
fn fallible(input: BoxStream<'static, Tok>) -> BoxStream<'static, Result<Tok, String>> {
    input
        .map(|t| {
            if t.x % 11 == 5 {
                Err(format!("upstream {}", t.x))
            } else {
                Ok(t)
            }
        })
        .boxed()
}

/// Polls `s` for at most `polls` items, abandoning a `next()` whenever a random timer fires
/// first, then drops it. Returns how many items it took.
async fn consume_then_drop(mut s: BoxStream<'static, ()>, polls: u64, rng: &mut Rng) -> u64 {
    let mut taken = 0;
    for _ in 0..polls {
        let patience = ms(rng.below(20));
        tokio::select! {
            item = s.next() => match item {
                Some(()) => taken += 1,
                None => break,
            },
            () = sleep(patience) => {}
        }
    }
    drop(s);
    taken
}

/// Runs one case; returns how many items the consumer took before dropping the stream.
fn run_case(op: &str, polls: u64, seed: u64) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rng = Rng::new(seed);
        let h = Handles::new(&mut rng);
        let pipeline = Pipeline::builder(Machine(h.live.clone(), h.delays.clone()))
            .pool(&h.pool)
            .build();
        let s = build(op, &h, &pipeline);
        let taken = consume_then_drop(s, polls, &mut rng).await;
        // Let the pool's workers see the cancellation (without letting the clock move: while
        // a task is ready, a paused clock stands still).
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }

        // A cell the dropped stream had reserved but not used is given back: a new caller gets
        // one within one interval of now.
        let t0 = Instant::now();
        h.limiter.until_ready().await;
        let waited = t0.elapsed();
        assert!(
            waited <= ms(10),
            "{op}: rate-limit cells kept: waited {waited:?}"
        );

        // Let every worker see the cancellation, and every timer of the dropped stream fire.
        sleep(ms(500)).await;
        assert_eq!(h.live.live(), 0, "{op}: items or futures leaked");
        assert_eq!(h.pool.busy(), 0, "{op}: pool workers left busy");
        assert_eq!(h.limit.in_use(), 0, "{op}: in-flight permits kept");
        // No trial call outstanding: a half-open (or closed) breaker lets the next call in.
        assert!(
            h.breaker.call(async { Ok::<_, String>(()) }).await.is_ok(),
            "{op}: breaker stuck with state {:?}",
            h.breaker.state()
        );

        // Every handle still serves a whole new stream.
        let xs: Vec<u64> = stream::iter(0..20u64)
            .fan_out_ordered(&h.pool, |x| async move { x })
            .in_flight_ordered(&h.limit, |x| async move { x })
            .rate_limit(&h.limiter)
            .collect()
            .await;
        assert_eq!(
            xs,
            (0..20).collect::<Vec<_>>(),
            "{op}: handles no longer serve"
        );
        let results: Vec<_> = stream::iter(0..10u64).through(&pipeline).collect().await;
        assert_eq!(results.len(), 10, "{op}: pipeline no longer serves");
        assert_eq!(h.live.live(), 0, "{op}: leaked after the second run");
        taken
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn dropping_any_operator_anywhere_leaks_nothing(
        op in 0..OPS.len(),
        polls in 0u64..40,
        seed in any::<u64>(),
    ) {
        run_case(OPS[op], polls, seed);
    }
}

/// Every operator, dropped before its first poll, after its first item, and after its last.
#[test]
fn every_operator_at_the_edges() {
    for op in OPS {
        assert_eq!(run_case(op, 0, 7), 0);
        run_case(op, 1, 7);
        // Given time, every operator yields: the streams under test are not degenerate.
        assert!(run_case(op, 200, 7) > 0, "{op} yielded nothing");
    }
}
