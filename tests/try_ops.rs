//! `TryPipelineExt`: upstream errors pass through at their place, the closure sees only `Ok`s.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gauge, Rng, panic_message};
use futures::{StreamExt, TryStreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, sleep};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An input of `n` items with errors at random places (about one in four), with a delay for
/// each `Ok`: `Ok((index, delay))` or `Err(index)`.
fn input(rng: &mut Rng, n: usize) -> Vec<Result<(usize, u64), usize>> {
    (0..n)
        .map(|i| {
            if rng.below(4) == 0 {
                Err(i)
            } else {
                Ok((i, rng.below(20)))
            }
        })
        .collect()
}

/// What every operator must yield for `input`: `Ok(index * 3)` for an `Ok`, the `Err` itself.
fn expected(input: &[Result<(usize, u64), usize>]) -> Vec<Result<usize, usize>> {
    input.iter().map(|r| r.map(|(i, _)| i * 3)).collect()
}

fn oks(input: &[Result<(usize, u64), usize>]) -> usize {
    input.iter().filter(|r| r.is_ok()).count()
}

/// The closure every test uses: sleeps the item's delay, counts its calls.
fn job(
    calls: &Arc<AtomicUsize>,
) -> impl FnMut((usize, u64)) -> futures::future::BoxFuture<'static, Result<usize, usize>> + use<> {
    let calls = calls.clone();
    move |(i, d)| {
        calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            sleep(ms(d)).await;
            Ok(i * 3)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn try_fan_out_ordered_passes_errors_at_their_place() {
    for seed in 0..48 {
        let mut rng = Rng::new(seed);
        let n = rng.below(250) as usize;
        let workers = 1 + rng.below(6) as usize;
        let window = 1 + rng.below(20) as usize;
        let input = input(&mut rng, n);
        let calls = Arc::new(AtomicUsize::new(0));
        let out: Vec<Result<usize, usize>> = stream::iter(input.clone())
            .try_fan_out_ordered(workers, job(&calls))
            .window(window)
            .collect()
            .await;
        assert_eq!(
            out,
            expected(&input),
            "seed {seed}: n {n}, workers {workers}, window {window}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), oks(&input), "seed {seed}");
    }
}

#[tokio::test(start_paused = true)]
async fn try_fan_out_yields_every_item_once() {
    for seed in 0..32 {
        let mut rng = Rng::new(seed);
        let n = rng.below(250) as usize;
        let input = input(&mut rng, n);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut out: Vec<Result<usize, usize>> = stream::iter(input.clone())
            .try_fan_out(1 + rng.below(6) as usize, job(&calls))
            .window(1 + rng.below(20) as usize)
            .collect()
            .await;
        out.sort_unstable_by_key(|r| match r {
            Ok(v) => v / 3,
            Err(i) => *i,
        });
        assert_eq!(out, expected(&input), "seed {seed}");
        assert_eq!(calls.load(Ordering::SeqCst), oks(&input), "seed {seed}");
    }
}

#[tokio::test(start_paused = true)]
async fn try_in_flight_ordered_passes_errors_at_their_place() {
    for seed in 0..48 {
        let mut rng = Rng::new(seed);
        let n = rng.below(250) as usize;
        let limit = InFlightLimit::new(1 + rng.below(10) as usize);
        let input = input(&mut rng, n);
        let calls = Arc::new(AtomicUsize::new(0));
        let out: Vec<Result<usize, usize>> = stream::iter(input.clone())
            .try_in_flight_ordered(&limit, job(&calls))
            .collect()
            .await;
        assert_eq!(out, expected(&input), "seed {seed}");
        assert_eq!(calls.load(Ordering::SeqCst), oks(&input), "seed {seed}");
        assert_eq!(limit.in_use(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn try_in_flight_yields_every_item_once() {
    for seed in 0..32 {
        let mut rng = Rng::new(seed);
        let n = rng.below(250) as usize;
        let input = input(&mut rng, n);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut out: Vec<Result<usize, usize>> = stream::iter(input.clone())
            .try_in_flight(1 + rng.below(10) as usize, job(&calls))
            .collect()
            .await;
        out.sort_unstable_by_key(|r| match r {
            Ok(v) => v / 3,
            Err(i) => *i,
        });
        assert_eq!(out, expected(&input), "seed {seed}");
        assert_eq!(calls.load(Ordering::SeqCst), oks(&input), "seed {seed}");
    }
}

/// The closure's own errors come out at their places too, beside upstream's.
#[tokio::test(start_paused = true)]
async fn closure_errors_and_upstream_errors_keep_their_places() {
    let input = vec![Ok(1u32), Err("upstream"), Ok(2), Ok(3), Err("again")];
    let f = |n: u32| async move {
        sleep(ms(u64::from(10 - n))).await;
        if n == 2 { Err("closure") } else { Ok(n * 10) }
    };
    let want = [
        Ok(10),
        Err("upstream"),
        Err("closure"),
        Ok(30),
        Err("again"),
    ];
    let a: Vec<_> = stream::iter(input.clone())
        .try_fan_out_ordered(2, f)
        .collect()
        .await;
    assert_eq!(a, want);
    let b: Vec<_> = stream::iter(input)
        .try_in_flight_ordered(2, f)
        .collect()
        .await;
    assert_eq!(b, want);
}

/// Many errors in a row, more than the window: all pass, in order, and upstream is not pulled
/// further ahead than the window allows.
#[tokio::test(start_paused = true)]
async fn a_run_of_errors_longer_than_the_window_passes_in_order() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let input: Vec<Result<u32, u32>> = (0..300)
        .map(|i| {
            if (100..250).contains(&i) {
                Err(i)
            } else {
                Ok(i)
            }
        })
        .collect();
    let window = 4;
    let mut s = Box::pin(
        stream::iter(input.clone())
            .inspect({
                let pulled = pulled.clone();
                move |_| {
                    pulled.fetch_add(1, Ordering::SeqCst);
                }
            })
            .try_fan_out_ordered(2, |i| async move {
                sleep(ms(1)).await;
                Ok(i)
            })
            .window(window),
    );
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        out.push(r);
        // A window of `Ok`s in the pool, a window of errors waiting, and one item in hand.
        assert!(pulled.load(Ordering::SeqCst) <= out.len() + 2 * window + 1);
    }
    assert_eq!(out, input);
}

/// An `Err` takes no permit: with the only permit busy for an hour, it still comes out at once.
#[tokio::test(start_paused = true)]
async fn an_error_takes_no_permit_and_no_worker() {
    let start = Instant::now();
    let limit = InFlightLimit::new(1);
    let mut s = Box::pin(
        stream::iter([Ok(3600u64), Err("bad"), Ok(1)]).try_in_flight(&limit, |secs| async move {
            sleep(Duration::from_secs(secs)).await;
            Ok(secs)
        }),
    );
    assert_eq!(s.next().await, Some(Err("bad")));
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(limit.in_use(), 1);

    let pool = WorkerPool::new(1);
    let mut s = Box::pin(stream::iter([Ok(3600u64), Err("bad")]).try_fan_out(
        &pool,
        |secs| async move {
            sleep(Duration::from_secs(secs)).await;
            Ok(secs)
        },
    ));
    assert_eq!(s.next().await, Some(Err("bad")));
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_hundred_items_of_ten_ms_at_twenty_in_flight_take_fifty_ms() {
    let start = Instant::now();
    let running = Gauge::default();
    let n = stream::iter((0..100u32).map(Ok::<u32, ()>))
        .try_in_flight(20, |i| {
            let running = running.clone();
            async move {
                let _guard = running.enter();
                sleep(ms(10)).await;
                Ok(i)
            }
        })
        .try_fold(0, |n, _| async move { Ok(n + 1) })
        .await;
    assert_eq!(n, Ok(100));
    assert_eq!(start.elapsed(), ms(50));
    assert_eq!(running.max(), 20);
}

#[tokio::test(start_paused = true)]
async fn try_batch_flushes_the_partial_batch_before_an_error() {
    for seed in 0..64 {
        let mut rng = Rng::new(seed);
        let n = rng.below(200) as usize;
        let max = 1 + rng.below(8) as usize;
        let input: Vec<Result<usize, usize>> = (0..n)
            .map(|i| if rng.below(5) == 0 { Err(i) } else { Ok(i) })
            .collect();
        let out: Vec<Result<Vec<usize>, usize>> = stream::iter(input.clone())
            .try_batch(max, ms(10))
            .collect()
            .await;
        // Flattened, the batches and errors give back the input, in order.
        let flat: Vec<Result<usize, usize>> = out
            .iter()
            .flat_map(|r| match r {
                Ok(batch) => batch.iter().map(|&v| Ok(v)).collect::<Vec<_>>(),
                Err(e) => vec![Err(*e)],
            })
            .collect();
        assert_eq!(flat, input, "seed {seed}");
        // Batches are never empty and never over `max`; a ready upstream fills them, so only
        // the batch before an error (or the last one) may be short.
        for (k, r) in out.iter().enumerate() {
            if let Ok(batch) = r {
                assert!(!batch.is_empty() && batch.len() <= max, "seed {seed}");
                let last = k + 1 == out.len();
                if !last && out[k + 1].is_ok() {
                    assert_eq!(batch.len(), max, "seed {seed}: a short batch at {k}");
                }
            }
        }
    }
    let out: Vec<Result<Vec<u32>, &str>> = stream::iter([Ok(1), Ok(2), Err("e"), Ok(3)])
        .try_batch(5, ms(10))
        .collect()
        .await;
    assert_eq!(out, [Ok(vec![1, 2]), Err("e"), Ok(vec![3])]);
}

#[tokio::test(start_paused = true)]
async fn try_batch_emits_when_the_wait_has_passed_since_the_first_value() {
    let start = Instant::now();
    // Values at 0, 4, 8, ... ms; batches of up to 100 waiting 10 ms.
    let source = stream::iter(0..8u64).then(move |i| async move {
        tokio::time::sleep_until(start + ms(4 * i)).await;
        Ok::<u64, ()>(i)
    });
    let at: Vec<(Vec<u64>, Duration)> = source
        .try_batch(100, ms(10))
        .map_ok(|b| (b, start.elapsed()))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        at,
        [
            (vec![0, 1, 2], ms(10)),
            (vec![3, 4, 5], ms(22)),
            (vec![6, 7], ms(28)), // the input ended: the tail at once
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn try_batch_with_the_longest_wait_does_not_panic() {
    let out: Vec<Result<Vec<u32>, ()>> = stream::iter([Ok(1), Ok(2)])
        .chain(stream::pending().take_until(sleep(Duration::from_secs(3600))))
        .try_batch(10, Duration::MAX)
        .collect()
        .await;
    assert_eq!(out, [Ok(vec![1, 2])]);
}

#[tokio::test(start_paused = true)]
async fn try_with_stats_counts_oks_as_items_and_errors_as_errors() {
    let stats = Stats::new("parse");
    let out: Vec<Result<u32, String>> = stream::iter(["1", "x", "3", "", "5"])
        .map(|s| s.parse::<u32>().map_err(|e| e.to_string()))
        .try_with_stats(&stats)
        .collect()
        .await;
    assert_eq!(out.len(), 5);
    let s = stats.snapshot();
    assert_eq!((s.items, s.errors), (3, 2));
    assert!(s.to_string().contains("3 items"), "{s}");
    assert!(s.to_string().contains("2 errors"), "{s}");
}

#[test]
fn bad_arguments_are_refused_naming_the_parameter() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let s = || stream::iter([Ok::<u32, ()>(1)]);
    let f = |x: u32| async move { Ok::<u32, ()>(x) };
    let panic = std::panic::catch_unwind(|| s().try_batch(0, ms(1))).unwrap_err();
    assert!(panic_message(&*panic).contains("`max`"));
    let panic = std::panic::catch_unwind(|| s().try_batch(1, Duration::ZERO)).unwrap_err();
    assert!(panic_message(&*panic).contains("`wait`"));
    let panic = std::panic::catch_unwind(|| s().try_in_flight(0, f)).unwrap_err();
    assert!(panic_message(&*panic).contains("`limit`"));
    let panic = std::panic::catch_unwind(|| s().try_in_flight_ordered(0, f)).unwrap_err();
    assert!(panic_message(&*panic).contains("`limit`"));
    let panic = std::panic::catch_unwind(|| s().try_fan_out_ordered(0, f)).unwrap_err();
    assert!(panic_message(&*panic).contains("`workers`"));
    let panic = std::panic::catch_unwind(|| s().try_fan_out_ordered(1, f).window(0)).unwrap_err();
    assert!(panic_message(&*panic).contains("`window`"));
    let err = s().try_fan_out(1, f).try_window(0).unwrap_err();
    assert_eq!(err.parameter(), "window");
}
