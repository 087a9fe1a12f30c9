//! The `metrics` feature: what the handles publish, read back through a recorder of our own
//! (installed globally once; each test uses names of its own).
//!
//! Pools and rate limiters have no name, so they all publish under `name="unnamed"`: the tests
//! that build them take `SERIAL` and compare against the values they found on entry.

use std::any::type_name;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{StreamExt, stream};
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use stagepipe::metrics as names;
use stagepipe::prelude::*;
use tokio::sync::Semaphore;
use tokio::time::sleep;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The values of one histogram, in the order they were recorded.
#[derive(Default)]
struct Values(Mutex<Vec<f64>>);

impl HistogramFn for Values {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A recorder that keeps every counter, gauge and histogram it hands out, and every
/// description, by key.
#[derive(Default)]
struct Store {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Key, Arc<Values>>>,
    described: Mutex<HashMap<String, (Kind, Option<Unit>)>>,
}

impl Recorder for Store {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        let name = key.as_str().to_owned();
        self.described
            .lock()
            .unwrap()
            .insert(name, (Kind::Counter, unit));
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        let name = key.as_str().to_owned();
        self.described
            .lock()
            .unwrap()
            .insert(name, (Kind::Gauge, unit));
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        let name = key.as_str().to_owned();
        self.described
            .lock()
            .unwrap()
            .insert(name, (Kind::Histogram, unit));
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(counters.entry(key.clone()).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut gauges = self.gauges.lock().unwrap();
        Gauge::from_arc(gauges.entry(key.clone()).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.histograms.lock().unwrap();
        Histogram::from_arc(histograms.entry(key.clone()).or_default().clone())
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<metrics::Label> = labels
        .iter()
        .map(|&(k, v)| metrics::Label::new(k, v.to_owned()))
        .collect();
    Key::from_parts(name, labels)
}

impl Store {
    /// A counter's value; `None` if it was never registered.
    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Option<u64> {
        let counters = self.counters.lock().unwrap();
        counters
            .get(&key(name, labels))
            .map(|c| c.load(Ordering::SeqCst))
    }

    /// A gauge's value; `None` if it was never registered.
    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Option<f64> {
        let gauges = self.gauges.lock().unwrap();
        gauges
            .get(&key(name, labels))
            .map(|g| f64::from_bits(g.load(Ordering::SeqCst)))
    }

    /// A histogram's values; `None` if it was never registered.
    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Option<Vec<f64>> {
        let histograms = self.histograms.lock().unwrap();
        histograms
            .get(&key(name, labels))
            .map(|h| h.0.lock().unwrap().clone())
    }

    /// Every key registered so far.
    fn keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = self.counters.lock().unwrap().keys().cloned().collect();
        keys.extend(self.gauges.lock().unwrap().keys().cloned());
        keys.extend(self.histograms.lock().unwrap().keys().cloned());
        keys
    }
}

/// The global recorder, installed on first use.
fn store() -> &'static Store {
    static STORE: OnceLock<&'static Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let store: &'static Store = Box::leak(Box::default());
        metrics::set_global_recorder(store).expect("no other recorder in this test binary");
        store
    })
}

/// Taken by the tests that build pools or rate limiters (which share `name="unnamed"`).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const UNNAMED: &[(&str, &str)] = &[("name", names::UNNAMED)];

/// Yields until `done` holds (other tasks of the runtime run meanwhile).
async fn settle(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never settled: {what}");
}

fn sum(values: &[f64]) -> f64 {
    values.iter().sum()
}

fn assert_close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

#[tokio::test(start_paused = true)]
async fn with_stats_publishes_items_and_where_the_time_went() {
    let m = store();
    let stats = Stats::new("metrics-with-stats");
    let name = [("name", "metrics-with-stats")];
    // Upstream takes 10 ms per item (the point is starved), downstream 5 ms (backpressured).
    let n = stream::iter(0..100u32)
        .then(|x| async move {
            sleep(ms(10)).await;
            x
        })
        .with_stats(&stats)
        .then(|x| async move {
            sleep(ms(5)).await;
            x
        })
        .count()
        .await;
    assert_eq!(n, 100);

    let s = stats.snapshot();
    assert_eq!(m.counter(names::STREAM_ITEMS, &name), Some(100));
    assert_eq!(m.counter(names::STREAM_ERRORS, &name), Some(0));
    let upstream = m.histogram(names::STREAM_UPSTREAM_WAIT, &name).unwrap();
    assert_eq!(upstream, vec![secs(ms(10)); 100]);
    assert_close(sum(&upstream), secs(s.upstream_wait));
    let downstream = m.histogram(names::STREAM_DOWNSTREAM_WAIT, &name).unwrap();
    assert_eq!(downstream, vec![secs(ms(5)); 100]);
    assert_close(sum(&downstream), secs(s.downstream_wait));
    // No timed runs.
    assert_eq!(m.counter(names::STREAM_RUNS, &name), Some(0));
    assert_eq!(m.histogram(names::STREAM_RUN_LATENCY, &name), Some(vec![]));
}

#[tokio::test(start_paused = true)]
async fn try_with_stats_counts_errors_and_timed_runs_are_published() {
    let m = store();
    let stats = Stats::new("metrics-try-stats");
    let name = [("name", "metrics-try-stats")];
    let items = (0..10).map(|i| if i % 3 == 0 { Err(i) } else { Ok(i) });
    let n = stream::iter(items).try_with_stats(&stats).count().await;
    assert_eq!(n, 10);
    assert_eq!(m.counter(names::STREAM_ITEMS, &name), Some(6));
    assert_eq!(m.counter(names::STREAM_ERRORS, &name), Some(4));

    stats.record_run(ms(20), false);
    stats.record_run(ms(40), true);
    let s = stats.snapshot();
    assert_eq!((s.items, s.errors, s.runs), (6, 5, 2));
    assert_eq!(m.counter(names::STREAM_ITEMS, &name), Some(s.items));
    assert_eq!(m.counter(names::STREAM_ERRORS, &name), Some(s.errors));
    assert_eq!(m.counter(names::STREAM_RUNS, &name), Some(s.runs));
    assert_eq!(
        m.histogram(names::STREAM_RUN_LATENCY, &name),
        Some(vec![secs(ms(20)), secs(ms(40))])
    );
}

#[tokio::test(start_paused = true)]
async fn call_stats_counters_match_the_snapshot() {
    let m = store();
    let _serial = SERIAL.lock().await; // the call's rate limiter publishes as "unnamed"
    let stats = CallStats::new("metrics-call");
    let name = [("name", "metrics-call")];

    // Fails for odd inputs, sleeps `x` ms, times out above 50 ms.
    let limiter = RateLimiter::per(ms(10));
    let flaky = Call::new(|x: u64| async move {
        sleep(ms(x)).await;
        if x % 2 == 1 {
            Err(format!("{x} is odd"))
        } else {
            Ok(x)
        }
    })
    .timeout(ms(50))
    .rate_limit(&limiter)
    .retry(Backoff::fixed(ms(1)).max_attempts(2))
    .stats(&stats);
    for x in [2, 4, 3, 100, 6] {
        let _ = flaky.run(x).await;
    }

    // Always fails: the breaker opens after two attempts and rejects the third.
    let breaker = CircuitBreaker::new(2, Duration::from_secs(60));
    let down = Call::new(|_: u64| async { Err::<u64, _>("down") })
        .circuit_breaker(&breaker)
        .retry(Backoff::fixed(ms(1)).max_attempts(3))
        .stats(&stats);
    let _ = down.run(0).await;

    // A run dropped before it finishes is cancelled.
    let slow = Call::new(|x: u64| async move {
        sleep(Duration::from_secs(10)).await;
        Ok::<_, String>(x)
    })
    .stats(&stats);
    assert!(tokio::time::timeout(ms(1), slow.run(1)).await.is_err());

    let s = stats.snapshot();
    // Every figure is exercised.
    assert!(s.successes > 0 && s.failures > 0 && s.cancelled > 0, "{s}");
    assert!(s.retries > 0 && s.timeouts > 0 && s.rejected > 0, "{s}");
    assert!(s.limiter_wait > Duration::ZERO, "{s}");
    for (metric, value) in [
        (names::CALL_CALLS, s.calls),
        (names::CALL_SUCCESSES, s.successes),
        (names::CALL_FAILURES, s.failures),
        (names::CALL_CANCELLED, s.cancelled),
        (names::CALL_RETRIES, s.retries),
        (names::CALL_TIMEOUTS, s.timeouts),
        (names::CALL_REJECTED, s.rejected),
    ] {
        assert_eq!(m.counter(metric, &name), Some(value), "{metric}");
    }
    let latency = m.histogram(names::CALL_LATENCY, &name).unwrap();
    assert_eq!(latency.len() as u64, s.successes + s.failures);
    assert_close(latency.iter().copied().fold(0.0, f64::max), secs(s.max));
    let waits = m.histogram(names::CALL_LIMITER_WAIT, &name).unwrap();
    assert!(waits.iter().all(|&w| w > 0.0), "only waits are recorded");
    assert_close(sum(&waits), secs(s.limiter_wait));
}

#[tokio::test(start_paused = true)]
async fn a_named_breaker_publishes_its_state_transitions_and_rejections() {
    let m = store();
    let breaker = CircuitBreaker::new(2, Duration::from_secs(1)).named("metrics-breaker");
    let name = [("name", "metrics-breaker")];
    let to = |state: &'static str| [("name", "metrics-breaker"), ("to", state)];
    let state = || m.gauge(names::BREAKER_STATE, &name);
    let transitions = || {
        ["closed", "half-open", "open"]
            .map(|s| m.counter(names::BREAKER_TRANSITIONS, &to(s)).unwrap())
    };
    assert_eq!(state(), Some(0.0));
    assert_eq!(transitions(), [0, 0, 0]);

    for _ in 0..2 {
        let _ = breaker.call(async { Err::<(), _>("down") }).await;
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    assert_eq!(state(), Some(2.0));
    assert_eq!(transitions(), [0, 0, 1]);

    // Rejected by `call` and by the stream operator.
    assert!(breaker.call(async { Ok::<_, ()>(()) }).await.is_err());
    let out: Vec<_> = stream::iter(0..3)
        .circuit_breaker(&breaker, |x| async move { Ok::<_, ()>(x) })
        .collect()
        .await;
    assert!(out.iter().all(|r| matches!(r, Err(BreakerError::Open(_)))));
    assert_eq!(m.counter(names::BREAKER_REJECTED, &name), Some(4));

    // Half-open shows when the trial call starts; its success closes the breaker.
    sleep(Duration::from_secs(1)).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    let trial = breaker.call(async {
        assert_eq!(m.gauge(names::BREAKER_STATE, &name), Some(1.0));
        Ok::<_, ()>(())
    });
    assert_eq!(trial.await, Ok(()));
    assert_eq!(state(), Some(0.0));
    assert_eq!(transitions(), [1, 1, 1]);

    // Open again, and a failed trial opens it once more.
    for _ in 0..2 {
        let _ = breaker.call(async { Err::<(), _>("down") }).await;
    }
    sleep(Duration::from_secs(1)).await;
    let _ = breaker.call(async { Err::<(), _>("still down") }).await;
    assert_eq!(state(), Some(2.0));
    assert_eq!(transitions(), [1, 2, 3]);
    assert_eq!(m.counter(names::BREAKER_REJECTED, &name), Some(4));
}

#[tokio::test(start_paused = true)]
async fn an_unnamed_breaker_publishes_nothing() {
    let m = store();
    let breaker = CircuitBreaker::new(1, Duration::from_secs(1));
    let _ = breaker.call(async { Err::<(), _>("down") }).await;
    let _ = breaker.call(async { Ok::<_, ()>(()) }).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    let breaker_names = [
        names::BREAKER_STATE,
        names::BREAKER_TRANSITIONS,
        names::BREAKER_REJECTED,
    ];
    for key in m.keys() {
        if breaker_names.contains(&key.name()) {
            assert!(key.labels().all(|l| l.value() != names::UNNAMED), "{key:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_limiter_counts_cells_and_their_waits() {
    let m = store();
    let _serial = SERIAL.lock().await;
    let limiter = RateLimiter::per(ms(10));
    let cells = || m.counter(names::RATE_LIMIT_CELLS, UNNAMED).unwrap();
    let waits = || m.histogram(names::RATE_LIMIT_WAIT, UNNAMED).unwrap();
    let (cells0, waits0) = (cells(), waits().len());

    // Direct callers: the first cell at once, then one every 10 ms.
    for _ in 0..3 {
        limiter.until_ready().await;
    }
    assert!(!limiter.check());
    assert_eq!(cells() - cells0, 3);
    assert_eq!(waits()[waits0..], [secs(ms(10)); 2]);

    // A stream on a fresh limiter: the same.
    let limiter = RateLimiter::per(ms(10));
    let n = stream::iter(0..4).rate_limit(&limiter).count().await;
    assert_eq!(n, 4);
    assert_eq!(cells() - cells0, 7);
    assert_eq!(waits()[waits0..], [secs(ms(10)); 5]);

    // A successful check is a cell too.
    sleep(ms(10)).await;
    assert!(limiter.check());
    assert_eq!(cells() - cells0, 8);
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_publishes_its_current_limit() {
    let m = store();
    let gauge = || m.gauge(names::IN_FLIGHT_LIMIT, &[("name", "metrics-adaptive")]);
    let limit = InFlightLimit::adaptive(2, 64).named("metrics-adaptive");
    assert_eq!(gauge(), Some(2.0));
    // Instant operations never queue: the limit grows, and the gauge with it.
    let n = stream::iter(0..200)
        .in_flight(&limit, |x| async move { x })
        .count()
        .await;
    assert_eq!(n, 200);
    assert!(limit.current() > 2);
    assert_eq!(gauge(), Some(limit.current() as f64));
    // A second limit of the same name adds up; each leaves the gauge with its last handle.
    let other = InFlightLimit::adaptive(3, 64).named("metrics-adaptive");
    assert_eq!(gauge(), Some((limit.current() + 3) as f64));
    drop(limit);
    assert_eq!(gauge(), Some(3.0));
    drop(other);
    assert_eq!(gauge(), Some(0.0));
    // A fixed limit publishes nothing.
    let _ = InFlightLimit::new(4).named("metrics-fixed");
    assert!(
        m.keys()
            .iter()
            .all(|k| k.labels().all(|l| l.value() != "metrics-fixed"))
    );
}

/// The queued jobs of `pool`, as its `Debug` shows them.
fn queued(pool: &WorkerPool) -> f64 {
    let debug = format!("{pool:?}");
    let at = debug.find("queued: ").expect("Debug shows the queued jobs") + "queued: ".len();
    let digits: String = debug[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

#[tokio::test]
async fn pool_gauges_follow_the_jobs_and_return_to_zero_when_idle() {
    let m = store();
    let _serial = SERIAL.lock().await;
    let gauge = |name| m.gauge(name, UNNAMED).unwrap_or(0.0);
    let workers0 = gauge(names::POOL_WORKERS);
    // Every other pool of this binary is idle now.
    assert_eq!(gauge(names::POOL_BUSY_WORKERS), 0.0);
    assert_eq!(gauge(names::POOL_QUEUED_JOBS), 0.0);

    let pool = WorkerPool::new(2);
    assert_eq!(gauge(names::POOL_WORKERS), workers0 + 2.0);

    // Every item waits for a permit: both workers busy, the other jobs queued.
    let gate = Arc::new(Semaphore::new(0));
    let run = tokio::spawn(
        stream::iter(0..40u32)
            .fan_out(&pool, {
                let gate = gate.clone();
                move |x| {
                    let gate = gate.clone();
                    async move {
                        gate.acquire().await.unwrap().forget();
                        x
                    }
                }
            })
            .count(),
    );
    settle("both workers busy", || pool.busy() == 2).await;
    assert_eq!(gauge(names::POOL_BUSY_WORKERS), 2.0);
    assert!(queued(&pool) > 0.0, "{pool:?}");
    assert_eq!(gauge(names::POOL_QUEUED_JOBS), queued(&pool));

    gate.add_permits(40);
    assert_eq!(run.await.unwrap(), 40);
    settle("the pool idle", || pool.busy() == 0).await;
    settle("the busy gauge at zero", || {
        gauge(names::POOL_BUSY_WORKERS) == 0.0
    })
    .await;
    assert_eq!(gauge(names::POOL_QUEUED_JOBS), 0.0);

    // The workers leave the gauge with the pool.
    drop(pool);
    settle("the workers gone", || {
        gauge(names::POOL_WORKERS) == workers0
    })
    .await;
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Step {
    Parse,
    Work,
    Store,
}

/// Every fifth request fails in `Work`, which takes 10 ms.
struct Machine;

impl StateMachine for Machine {
    type Stage = Step;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Step {
        Step::Parse
    }

    async fn run(&self, stage: Step, id: u64) -> Result<Next<Step, u64>, String> {
        match stage {
            Step::Parse => Ok(Next::Stage(Step::Work, id)),
            Step::Work => {
                sleep(ms(10)).await;
                if id % 5 == 0 {
                    return Err(format!("request {id} failed"));
                }
                Ok(Next::Stage(Step::Store, id))
            }
            Step::Store => Ok(Next::Done(id)),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn pipeline_stage_metrics_match_the_pipeline_stats() {
    let m = store();
    let _serial = SERIAL.lock().await; // the pipeline's pool publishes as "unnamed"
    let workers0 = m.gauge(names::POOL_WORKERS, UNNAMED).unwrap_or(0.0);
    let pipeline = Pipeline::builder(Machine).workers(4).build();
    let results: Vec<_> = stream::iter(0..20u64).through(&pipeline).collect().await;
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 4);

    let stats = pipeline.stats();
    let pipeline_name = type_name::<Step>();
    for step in [Step::Parse, Step::Work, Step::Store] {
        let stage = format!("{step:?}");
        let labels = [("name", pipeline_name), ("stage", stage.as_str())];
        let s = stats.stage(step).unwrap();
        assert_eq!(
            m.counter(names::STAGE_RUNS, &labels),
            Some(s.runs),
            "{stage}"
        );
        assert_eq!(
            m.counter(names::STAGE_ERRORS, &labels),
            Some(s.errors),
            "{stage}"
        );
        let latency = m.histogram(names::STAGE_LATENCY, &labels).unwrap();
        assert_eq!(latency.len() as u64, s.runs, "{stage}");
        assert_close(sum(&latency), secs(s.total));
    }
    let work = [("name", pipeline_name), ("stage", "Work")];
    assert_eq!(m.counter(names::STAGE_RUNS, &work), Some(20));
    assert_eq!(m.counter(names::STAGE_ERRORS, &work), Some(4));
    assert_eq!(
        m.histogram(names::STAGE_LATENCY, &work),
        Some(vec![secs(ms(10)); 20])
    );
    // Stages are not streams: nothing is published under their names as `Stats`.
    assert_eq!(m.counter(names::STREAM_RUNS, &[("name", "Work")]), None);

    drop(pipeline);
    settle("the pipeline's workers gone", || {
        m.gauge(names::POOL_WORKERS, UNNAMED) == Some(workers0)
    })
    .await;
}

#[test]
fn handles_register_with_the_recorder_current_when_they_are_built() {
    let global = store();
    let local = Store::default();
    let stats = metrics::with_local_recorder(&local, || Stats::new("metrics-local"));
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(stream::iter(0..5).with_stats(&stats).count());
    let name = [("name", "metrics-local")];
    assert_eq!(local.counter(names::STREAM_ITEMS, &name), Some(5));
    assert_eq!(global.counter(names::STREAM_ITEMS, &name), None);
}

/// One stage (its own stage type, so its series are its own).
struct Echo;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Only;

impl StateMachine for Echo {
    type Stage = Only;
    type Data = u64;
    type Error = String;

    fn start(&self) -> Only {
        Only
    }

    async fn run(&self, _: Only, id: u64) -> Result<Next<Only, u64>, String> {
        Ok(Next::Done(id))
    }
}

#[tokio::test]
async fn every_name_is_documented_described_and_follows_the_conventions() {
    let m = store();
    let _serial = SERIAL.lock().await;
    // Build one handle of each kind, so that every family has described itself.
    let _ = Stats::new("metrics-names");
    let _ = CallStats::new("metrics-names");
    let _ = CircuitBreaker::new(1, Duration::from_secs(1)).named("metrics-names");
    let _ = RateLimiter::per_second(1);
    let _ = InFlightLimit::adaptive(1, 2).named("metrics-names");
    drop(WorkerPool::new(1)); // never started: its workers leave the gauge at once
    let workers0 = m.gauge(names::POOL_WORKERS, UNNAMED).unwrap_or(0.0);
    let pipeline = Pipeline::builder(Echo).workers(1).build();
    let _: Vec<_> = stream::iter([1u64]).through(&pipeline).collect().await;
    drop(pipeline);
    settle("the pipeline's workers gone", || {
        m.gauge(names::POOL_WORKERS, UNNAMED) == Some(workers0)
    })
    .await;

    let source = include_str!("../src/metrics.rs");
    let described = m.described.lock().unwrap().clone();
    for &name in names::NAMES {
        assert!(name.starts_with("stagepipe_"), "{name}");
        assert!(
            source.contains(&format!("//! | `{name}` |")),
            "{name} is in the module's table"
        );
        let (kind, unit) = described[name];
        match kind {
            Kind::Counter => {
                assert!(name.ends_with("_total"), "{name}");
                assert_eq!(unit, Some(Unit::Count), "{name}");
            }
            Kind::Histogram => {
                assert!(name.ends_with("_seconds"), "{name}");
                assert_eq!(unit, Some(Unit::Seconds), "{name}");
            }
            Kind::Gauge => assert!(!name.ends_with("_total"), "{name}"),
        }
    }
    assert_eq!(described.len(), names::NAMES.len());
    for key in m.keys() {
        assert!(names::NAMES.contains(&key.name()), "{key:?}");
        assert_eq!(key.labels().next().unwrap().key(), "name", "{key:?}");
    }
}

/// An adaptive pool's workers gauge follows its count: `min` when built, up as it grows, down as
/// idle workers retire, and off with the pool.
#[tokio::test(start_paused = true)]
async fn adaptive_pool_workers_gauge_follows_the_count() {
    let m = store();
    let _serial = SERIAL.lock().await;
    let gauge = || m.gauge(names::POOL_WORKERS, UNNAMED).unwrap_or(0.0);
    let workers0 = gauge();

    let pool = WorkerPool::adaptive(2, 16);
    assert_eq!(gauge(), workers0 + 2.0);
    let n = stream::iter(0..1_000u32)
        .fan_out(&pool, |x| async move {
            sleep(ms(10)).await;
            x
        })
        .count()
        .await;
    assert_eq!(n, 1_000);
    let grown = pool.workers();
    assert!(grown > 2, "{grown} workers");
    assert_eq!(gauge(), workers0 + grown as f64);

    // Idle for more than a second: back to `min`.
    sleep(ms(1_100)).await;
    assert_eq!(pool.workers(), 2);
    assert_eq!(gauge(), workers0 + 2.0);

    drop(pool);
    settle("the workers gone", || gauge() == workers0).await;
}
