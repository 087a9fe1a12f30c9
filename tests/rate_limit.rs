//! `rate_limit`, `rate_limit_by`, `RateLimiter` and `KeyedRateLimiter` on a paused clock.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use stagepipe::prelude::*;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_eq, task};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The instants (since `start`) at which a rate-limited stream yields each item.
async fn release_times<S: Stream>(s: S, start: Instant) -> Vec<Duration> {
    s.map(|_| start.elapsed()).collect().await
}

#[tokio::test(start_paused = true)]
async fn burst_one_releases_one_per_interval() {
    let start = Instant::now();
    let at = release_times(
        stream::iter(0..5).rate_limit(RateLimiter::per_second(10)),
        start,
    )
    .await;
    assert_eq!(at, [0, 100, 200, 300, 400].map(ms));
}

#[tokio::test(start_paused = true)]
async fn burst_n_releases_n_at_once_then_paces() {
    let start = Instant::now();
    let limiter = RateLimiter::per(ms(100)).burst(3);
    let at = release_times(stream::iter(0..6).rate_limit(&limiter), start).await;
    assert_eq!(at, [0, 0, 0, 100, 200, 300].map(ms));
}

#[tokio::test(start_paused = true)]
async fn items_pass_unchanged_and_in_order() {
    let out: Vec<u32> = stream::iter(0..20u32)
        .rate_limit(RateLimiter::per_second(1000).burst(4))
        .collect()
        .await;
    assert_eq!(out, (0..20).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn exact_instants_polled_by_hand() {
    let limiter = RateLimiter::per(ms(50));
    let mut s = task::spawn(stream::iter(1..=3).rate_limit(&limiter));
    assert_ready_eq!(s.poll_next(), Some(1));
    assert_pending!(s.poll_next());
    advance(ms(49)).await;
    assert!(!s.is_woken());
    assert_pending!(s.poll_next());
    advance(ms(1)).await;
    assert!(s.is_woken());
    assert_ready_eq!(s.poll_next(), Some(2));
    assert_pending!(s.poll_next());
    advance(ms(50)).await;
    assert_ready_eq!(s.poll_next(), Some(3));
    assert_ready_eq!(s.poll_next(), None);
}

#[tokio::test(start_paused = true)]
async fn idle_time_refills_up_to_the_burst_only() {
    let limiter = RateLimiter::per(ms(10)).burst(2);
    for _ in 0..2 {
        limiter.until_ready().await;
    }
    advance(ms(1000)).await;
    let start = Instant::now();
    let at = release_times(stream::iter(0..4).rate_limit(&limiter), start).await;
    assert_eq!(at, [0, 0, 10, 20].map(ms));
}

#[tokio::test(start_paused = true)]
async fn a_consumer_late_by_more_than_a_tick_gets_one_cell_then_the_quota_pace() {
    let limiter = RateLimiter::per(ms(10));
    let mut s = task::spawn(stream::iter(0..10).rate_limit(&limiter));
    assert_ready_eq!(s.poll_next(), Some(0));
    assert_pending!(s.poll_next()); // item 1 is due at 10 ms
    // The consumer is busy until 35 ms: it polls 25 ms after the slot.
    advance(ms(35)).await;
    assert_ready_eq!(s.poll_next(), Some(1));
    // The slots at 20 and 30 ms passed unused: no backlog at once. A cell went out at 35 ms,
    // so the next may go one interval later, less the one tick of tolerance: at 44 ms.
    assert_pending!(s.poll_next());
    advance(ms(8)).await;
    assert_pending!(s.poll_next());
    advance(ms(1)).await;
    assert_ready_eq!(s.poll_next(), Some(2));
    assert_pending!(s.poll_next());
    advance(ms(10)).await;
    assert_ready_eq!(s.poll_next(), Some(3));
}

#[tokio::test(start_paused = true)]
async fn a_wake_late_by_less_than_a_tick_keeps_the_schedule() {
    // A timer fires up to one tick after its slot (tokio rounds deadlines up to the
    // millisecond). The stream makes that lateness up: every slot of the absolute schedule
    // (0, 0.4, 0.8, 1.2 ms...) is released at the first whole millisecond after it.
    let limiter = RateLimiter::per(Duration::from_micros(400));
    let start = Instant::now();
    let mut s = task::spawn(stream::iter(0..13).rate_limit(&limiter));
    let mut released = Vec::new();
    for _ in 0..6 {
        drain(&mut s, &mut released, start);
        advance(ms(1)).await;
    }
    assert_eq!(
        released,
        [0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5].map(ms)[..]
    );
}

#[tokio::test(start_paused = true)]
async fn a_handles_credit_is_its_own() {
    let interval = Duration::from_micros(200);
    // Alone, a handle whose call woke 0.8 ms late makes up the slots it slept through.
    let a = RateLimiter::per(interval);
    a.until_ready().await;
    let mut late = task::spawn(a.until_ready());
    assert_pending!(late.poll()); // the slot at 0.2 ms
    advance(ms(1)).await;
    assert_ready!(late.poll());
    drop(late);
    let caught_up = (0..10)
        .take_while(|_| task::spawn(a.until_ready()).poll().is_ready())
        .count();
    assert_eq!(caught_up, 4); // the slots at 0.4, 0.6, 0.8 and 1.0 ms

    // Another handle (a clone) calling at that instant gets no part of that credit.
    let a = RateLimiter::per(interval);
    let b = a.clone();
    a.until_ready().await;
    let mut late = task::spawn(a.until_ready());
    assert_pending!(late.poll());
    advance(ms(1)).await;
    assert_ready!(late.poll());
    let at_once = (0..10)
        .take_while(|_| task::spawn(b.until_ready()).poll().is_ready())
        .count();
    assert_eq!(at_once, 1);
}

#[tokio::test(start_paused = true)]
async fn a_limiter_shared_by_two_streams_and_a_direct_caller_keeps_the_combined_rate() {
    let limiter = RateLimiter::per(ms(10));
    let start = Instant::now();
    let times = Arc::new(Mutex::new(Vec::new()));
    let record = |times: Arc<Mutex<Vec<Duration>>>| {
        move |_| {
            times.lock().unwrap().push(start.elapsed());
            futures::future::ready(())
        }
    };
    let a = stream::iter(0..5)
        .rate_limit(&limiter)
        .for_each(record(times.clone()));
    let b = stream::iter(0..5)
        .rate_limit(limiter.clone())
        .for_each(record(times.clone()));
    let direct = {
        let limiter = limiter.clone();
        let times = times.clone();
        async move {
            for _ in 0..5 {
                limiter.until_ready().await;
                times.lock().unwrap().push(start.elapsed());
            }
        }
    };
    tokio::join!(a, b, direct);
    let mut times = times.lock().unwrap().clone();
    times.sort();
    let expected: Vec<Duration> = (0..15).map(|i| ms(10 * i)).collect();
    assert_eq!(times, expected);
}

#[tokio::test(start_paused = true)]
async fn until_ready_serves_callers_in_call_order() {
    let limiter = RateLimiter::per(ms(20));
    let start = Instant::now();
    let (a, b, c) = tokio::join!(
        async {
            limiter.until_ready().await;
            start.elapsed()
        },
        async {
            limiter.until_ready().await;
            start.elapsed()
        },
        async {
            limiter.until_ready().await;
            start.elapsed()
        },
    );
    assert_eq!([a, b, c], [0, 20, 40].map(ms));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_slot_back() {
    let limiter = RateLimiter::per(ms(100));
    limiter.until_ready().await;
    let mut waiter = task::spawn(limiter.until_ready());
    assert_pending!(waiter.poll()); // holds the slot at 100 ms
    drop(waiter);
    let start = Instant::now();
    limiter.until_ready().await;
    assert_eq!(start.elapsed(), ms(100));

    // Likewise a rate-limited stream dropped while it holds an item.
    let mut s = task::spawn(stream::iter(0..3).rate_limit(&limiter));
    assert_pending!(s.poll_next()); // item 0 waits for 200 ms
    drop(s);
    let start = Instant::now();
    limiter.until_ready().await;
    assert_eq!(start.elapsed(), ms(100));
}

#[tokio::test(start_paused = true)]
async fn check_takes_a_cell_only_when_one_conforms() {
    let limiter = RateLimiter::per(ms(10)).burst(2);
    assert!(limiter.check());
    assert!(limiter.check());
    assert!(!limiter.check());
    advance(ms(10)).await;
    assert!(limiter.check());
    assert!(!limiter.check());
}

#[tokio::test(start_paused = true)]
async fn from_quota_keeps_the_quota_burst() {
    let quota = Quota::per_second(NonZeroU32::new(5).unwrap());
    let limiter = RateLimiter::from(quota);
    assert_eq!(limiter.burst_size(), 5);
    assert_eq!(limiter.interval(), ms(200));
    assert_eq!(limiter.quota(), quota);
    let start = Instant::now();
    let at = release_times(stream::iter(0..7).rate_limit(limiter), start).await;
    assert_eq!(at, [0, 0, 0, 0, 0, 200, 400].map(ms));

    let limiter: RateLimiter = Quota::with_period(ms(30))
        .unwrap()
        .allow_burst(NonZeroU32::new(2).unwrap())
        .into();
    let start = Instant::now();
    let at = release_times(stream::iter(0..4).rate_limit(&limiter), start).await;
    assert_eq!(at, [0, 0, 30, 60].map(ms));
}

#[test]
fn per_second_rounds_the_interval_up() {
    assert_eq!(
        RateLimiter::per_second(3).interval(),
        Duration::from_nanos(333_333_334)
    );
    assert_eq!(
        RateLimiter::per_second(100_000).interval(),
        Duration::from_micros(10)
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_limits_are_independent_per_key() {
    let limiter = KeyedRateLimiter::per(ms(100));
    let start = Instant::now();
    let at: Vec<(char, Duration)> = stream::iter("aabab".chars())
        .rate_limit_by(&limiter, |c: &char| *c)
        .map(|c| (c, start.elapsed()))
        .collect()
        .await;
    // In order: the second `a` waits for its key, and the items behind it wait with it.
    assert_eq!(
        at,
        [
            ('a', ms(0)),
            ('a', ms(100)),
            ('b', ms(100)),
            ('a', ms(200)),
            ('b', ms(200))
        ]
    );

    // Direct callers: one key's waits never delay another key.
    let limiter = KeyedRateLimiter::per_second(10).burst(2);
    let start = Instant::now();
    let (x, y) = tokio::join!(
        async {
            for _ in 0..4 {
                limiter.until_key_ready(&"x").await;
            }
            start.elapsed()
        },
        async {
            for _ in 0..2 {
                limiter.until_key_ready(&"y").await;
            }
            start.elapsed()
        },
    );
    assert_eq!((x, y), (ms(200), ms(0)));
}

#[tokio::test(start_paused = true)]
async fn keyed_state_of_idle_keys_is_dropped() {
    let limiter = KeyedRateLimiter::per(ms(10));
    for key in 0..10u32 {
        assert!(limiter.check_key(&key));
        assert!(!limiter.check_key(&key));
    }
    assert_eq!(limiter.len(), 10);
    // Full burst regained at 10 ms; kept one more timer tick, for a waiter's credit.
    advance(ms(10)).await;
    limiter.retain_recent();
    assert_eq!(limiter.len(), 10);
    advance(ms(1)).await;
    limiter.retain_recent();
    assert!(limiter.is_empty());

    // The map is swept on its own as it grows: it never holds many idle keys.
    for key in 0..10_000u32 {
        limiter.until_key_ready(&key).await;
        advance(ms(1)).await;
    }
    assert!(limiter.len() <= 128, "{} keys kept", limiter.len());
}

#[tokio::test(start_paused = true)]
async fn keyed_dropped_waiter_gives_the_slot_back() {
    let limiter = KeyedRateLimiter::per(ms(100));
    limiter.until_key_ready(&1).await;
    let mut waiter = task::spawn(limiter.until_key_ready(&1));
    assert_pending!(waiter.poll());
    drop(waiter);
    let start = Instant::now();
    limiter.until_key_ready(&1).await;
    assert_eq!(start.elapsed(), ms(100));
}

#[tokio::test(start_paused = true)]
async fn fused_and_size_hint() {
    use futures::stream::FusedStream;
    let limiter = RateLimiter::per(ms(10));
    let mut s = task::spawn(stream::iter(0..3).rate_limit(&limiter));
    assert_eq!(s.size_hint(), (3, Some(3)));
    assert_ready!(s.poll_next());
    assert_pending!(s.poll_next());
    assert_eq!(s.size_hint(), (2, Some(2)));
    advance(ms(10)).await;
    assert_ready!(s.poll_next());
    assert_pending!(s.poll_next());
    advance(ms(10)).await;
    assert_ready!(s.poll_next());
    assert!(!s.is_terminated());
    assert_ready_eq!(s.poll_next(), None);
    assert!(s.is_terminated());
    assert_ready_eq!(s.poll_next(), None);
}

#[test]
#[should_panic(expected = "`rate`")]
fn zero_rate_panics_naming_rate() {
    let _ = RateLimiter::per_second(0);
}

#[test]
#[should_panic(expected = "`period`")]
fn zero_period_panics_naming_period() {
    let _ = RateLimiter::per(Duration::ZERO);
}

#[test]
#[should_panic(expected = "`b`")]
fn zero_burst_panics_naming_b() {
    let _ = RateLimiter::per_second(1).burst(0);
}

#[test]
#[should_panic(expected = "`rate`")]
fn keyed_zero_rate_panics_naming_rate() {
    let _ = KeyedRateLimiter::<u32>::per_second(0);
}

#[test]
fn try_twins_return_the_error() {
    assert_eq!(
        RateLimiter::try_per_second(0).unwrap_err().parameter(),
        "rate"
    );
    assert_eq!(
        RateLimiter::try_per(Duration::ZERO)
            .unwrap_err()
            .parameter(),
        "period"
    );
    assert!(RateLimiter::try_per_second(1).is_ok());
    assert_eq!(
        KeyedRateLimiter::<u8>::try_per(Duration::ZERO)
            .unwrap_err()
            .parameter(),
        "period"
    );
}

#[test]
fn panics_point_at_the_caller() {
    let err = std::panic::catch_unwind(|| RateLimiter::per_second(0)).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert_eq!(msg, "invalid `rate`: must be greater than zero");
}

#[test]
fn handles_are_shared_and_thread_safe() {
    fn shared<T: Clone + Send + Sync + 'static>() {}
    shared::<RateLimiter>();
    shared::<KeyedRateLimiter<String>>();
    fn send<T: Send>(_: &T) {}
    let keyed = KeyedRateLimiter::<String>::per_second(5);
    let key = String::from("k");
    send(&keyed.until_key_ready(&key));
    let limiter = RateLimiter::per_second(5).burst(2);
    send(&limiter.until_ready());
    let clone: RateLimiter = (&limiter).into();
    assert_eq!(format!("{clone:?}"), format!("{limiter:?}"));
    assert!(format!("{limiter:?}").contains("burst: 2"));
}

mod never_above_the_quota {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However late the consumer polls (timer lateness, a busy consumer), item `i` is never
        /// released before the quota allows since the first release: `(i + 1 - burst)` intervals.
        #[test]
        fn whatever_the_polling_delays(
            burst in 1u32..5,
            delays in proptest::collection::vec(0u64..35, 40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let released = rt.block_on(async {
                let limiter = RateLimiter::per(ms(10)).burst(burst);
                let mut s = task::spawn(stream::iter(0..delays.len()).rate_limit(&limiter));
                let start = Instant::now();
                let mut released = Vec::new();
                for delay in &delays {
                    advance(ms(*delay)).await;
                    loop {
                        match s.poll_next() {
                            std::task::Poll::Ready(Some(_)) => {
                                released.push(start.elapsed());
                                break;
                            }
                            std::task::Poll::Ready(None) => unreachable!(),
                            std::task::Poll::Pending => advance(ms(1)).await,
                        }
                    }
                }
                released
            });
            let first = released[0];
            for (i, at) in released.iter().enumerate() {
                let allowed = (i as u64 + 1).saturating_sub(u64::from(burst));
                prop_assert!(*at - first >= ms(10 * allowed), "item {i} at {at:?}, first {first:?}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn rates_above_the_timer_resolution_are_kept_exactly() {
    // 10 000 cells per second with burst 1, and a consumer that is only woken once per
    // millisecond (as by a timer of 1 ms resolution): every wake-up releases the 10 cells that
    // became due, so 100 ms pass 1 + 1 000 cells, exactly the quota.
    let limiter = RateLimiter::per(Duration::from_micros(100));
    let mut s = task::spawn(stream::iter(0..5_000).rate_limit(&limiter));
    let mut released = 0;
    for tick in 0..=100 {
        if tick > 0 {
            advance(ms(1)).await;
        }
        while let std::task::Poll::Ready(Some(_)) = s.poll_next() {
            released += 1;
        }
    }
    assert_eq!(released, 1_001);
}

#[tokio::test(start_paused = true)]
async fn direct_callers_keep_rates_above_the_timer_resolution_too() {
    let limiter = RateLimiter::per(Duration::from_micros(100));
    let count = Arc::new(Mutex::new(0u32));
    let mut caller = task::spawn({
        let count = count.clone();
        async move {
            loop {
                limiter.until_ready().await;
                *count.lock().unwrap() += 1;
            }
        }
    });
    for tick in 0..=100 {
        if tick > 0 {
            advance(ms(1)).await;
        }
        assert_pending!(caller.poll());
    }
    assert_eq!(*count.lock().unwrap(), 1_001);
}

// -- the quota after a stalled consumer: a late waiter's lateness is its own --

/// The most cells the quota lets through in a window of length `window`:
/// `burst + (window + 1 ms) / period`.
fn allowed(burst: u32, period: Duration, window: Duration) -> u64 {
    let span = (window + ms(1)).as_nanos() / period.as_nanos();
    u64::from(burst) + u64::try_from(span).unwrap()
}

/// Every window of `at` (release instants) holds no more cells than the quota allows.
fn assert_quota_kept(at: &[Duration], burst: u32, period: Duration) {
    let mut at = at.to_vec();
    at.sort();
    for i in 0..at.len() {
        for j in i..at.len() {
            let cells = (j - i + 1) as u64;
            let window = at[j] - at[i];
            assert!(
                cells <= allowed(burst, period, window),
                "{cells} cells within {window:?} (from {:?}); releases: {at:?}",
                at[i]
            );
        }
    }
}

/// Polls a rate-limited stream until it is pending, recording each release; returns how many.
fn drain<S: Stream>(s: &mut task::Spawn<S>, released: &mut Vec<Duration>, start: Instant) -> usize {
    let mut n = 0;
    while let std::task::Poll::Ready(Some(_)) = s.poll_next() {
        released.push(start.elapsed());
        n += 1;
    }
    n
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_hands_no_backlog_to_another_stream() {
    let period = Duration::from_secs(1);
    let limiter = RateLimiter::per(period);
    let start = Instant::now();
    let mut released = Vec::new();
    let mut a = task::spawn(stream::iter(0..20).rate_limit(&limiter));
    assert_ready_eq!(a.poll_next(), Some(0));
    released.push(start.elapsed());
    assert_pending!(a.poll_next()); // item 1 holds the slot due at 1 s
    // A's consumer is busy for 10 s: A is not polled meanwhile.
    advance(Duration::from_secs(10)).await;
    assert_ready_eq!(a.poll_next(), Some(1));
    released.push(start.elapsed());
    // Another stream on the same limiter, at the same instant: A's lateness is not B's credit.
    let mut b = task::spawn(stream::iter(0..20).rate_limit(&limiter));
    let at_once = drain(&mut b, &mut released, start);
    assert_eq!(
        at_once, 0,
        "B got {at_once} cells at the instant A released its late one"
    );
    // Both go on at the quota's pace.
    for _ in 0..5_000 {
        advance(ms(1)).await;
        drain(&mut a, &mut released, start);
        drain(&mut b, &mut released, start);
    }
    assert_quota_kept(&released, 1, period);
    assert!(released.len() >= 6, "{released:?}");
}

#[tokio::test(start_paused = true)]
async fn check_after_a_stalled_waiter_grants_no_backlog() {
    let period = Duration::from_secs(1);
    let limiter = RateLimiter::per(period);
    assert!(limiter.check());
    let mut waiter = task::spawn(limiter.until_ready());
    assert_pending!(waiter.poll()); // holds the slot due at 1 s
    // The waiter's task is busy for 10 s: its future is not polled meanwhile.
    advance(Duration::from_secs(10)).await;
    assert_ready!(waiter.poll());
    let granted = (0..20).take_while(|_| limiter.check()).count();
    assert_eq!(granted, 0, "check granted {granted} cells in a row");
    // A direct caller behind it waits for the next slot as usual.
    let start = Instant::now();
    limiter.until_ready().await;
    assert!(start.elapsed() <= period, "{:?}", start.elapsed());
    assert!(!limiter.check());
}

#[tokio::test(start_paused = true)]
async fn a_key_never_used_gets_its_burst_only_after_another_key_stalled() {
    let period = Duration::from_secs(1);
    let limiter = KeyedRateLimiter::per(period).burst(2);
    let mut a = task::spawn(stream::iter(['a'; 10]).rate_limit_by(&limiter, |c: &char| *c));
    assert_ready_eq!(a.poll_next(), Some('a'));
    assert_ready_eq!(a.poll_next(), Some('a'));
    assert_pending!(a.poll_next()); // the third `a` holds the slot due at 1 s
    advance(Duration::from_secs(10)).await;
    assert_ready_eq!(a.poll_next(), Some('a'));
    // Keys never used before get their burst (2), not `a`'s lateness.
    let granted = (0..20).take_while(|_| limiter.check_key(&'b')).count();
    assert_eq!(granted, 2, "a fresh key got {granted} cells at once");
    let mut c = task::spawn(stream::iter(['c'; 10]).rate_limit_by(&limiter, |c: &char| *c));
    let mut released = Vec::new();
    let at_once = drain(&mut c, &mut released, Instant::now());
    assert_eq!(
        at_once, 2,
        "a fresh key's stream got {at_once} cells at once"
    );
    let mut direct = task::spawn(async {
        let start = Instant::now();
        for _ in 0..3 {
            limiter.until_key_ready(&'d').await;
        }
        start.elapsed()
    });
    assert_pending!(direct.poll()); // two at once, the third a period later
    advance(period).await;
    assert_ready_eq!(direct.poll(), period);
}

#[tokio::test(start_paused = true)]
async fn a_stream_polled_from_select_beside_periodic_work_releases_no_backlog() {
    let period = ms(10);
    let limiter = RateLimiter::per(period);
    let start = Instant::now();
    let mut items = stream::iter(0..60).rate_limit(&limiter);
    let mut tick = tokio::time::interval(ms(7));
    let mut released = Vec::new();
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = tick.tick() => {
                ticks += 1;
                // Every fifth round of periodic work takes 25 ms: the stream is not polled
                // meanwhile, and its slot comes due while it waits.
                if ticks % 5 == 0 {
                    tokio::time::sleep(ms(25)).await;
                }
            }
            item = items.next() => match item {
                Some(_) => released.push(start.elapsed()),
                None => break,
            },
        }
    }
    assert_eq!(released.len(), 60);
    // No instant releases more than burst + 1 ms / period = 1 cell, and no window more than
    // its share.
    assert_quota_kept(&released, 1, period);
}

/// Waiters dropped out of order (the middle one first) leave the line as if they had never
/// come: the next caller is served at the first free slot, not after the dropped ones.
#[tokio::test(start_paused = true)]
async fn waiters_dropped_in_any_order_give_their_slots_back() {
    for middle_first in [true, false] {
        let limiter = RateLimiter::per(Duration::from_millis(10));
        let start = Instant::now();
        limiter.until_ready().await; // slot 0
        let mut b = task::spawn(limiter.until_ready()); // slot 10
        let mut c = task::spawn(limiter.until_ready()); // slot 20
        assert_pending!(b.poll());
        assert_pending!(c.poll());
        if middle_first {
            drop(b);
            drop(c);
        } else {
            drop(c);
            drop(b);
        }
        limiter.until_ready().await;
        assert_eq!(start.elapsed(), Duration::from_millis(10), "{middle_first}");
        limiter.until_ready().await;
        assert_eq!(start.elapsed(), Duration::from_millis(20), "{middle_first}");
    }
}

/// The same for a key of a keyed limiter, and for a stream dropped while it waits.
#[tokio::test(start_paused = true)]
async fn keyed_waiters_and_streams_dropped_out_of_order_give_their_slots_back() {
    let keyed = KeyedRateLimiter::<&str>::per(Duration::from_millis(10));
    let start = Instant::now();
    keyed.until_key_ready(&"k").await;
    let mut b = task::spawn(keyed.until_key_ready(&"k"));
    let mut c = task::spawn(keyed.until_key_ready(&"k"));
    assert_pending!(b.poll());
    assert_pending!(c.poll());
    drop(b);
    drop(c);
    keyed.until_key_ready(&"k").await;
    assert_eq!(start.elapsed(), Duration::from_millis(10));

    let limiter = RateLimiter::per(Duration::from_millis(10));
    let start = Instant::now();
    limiter.until_ready().await; // slot 0
    let mut first = task::spawn(stream::iter([1]).rate_limit(&limiter)); // slot 10
    let mut second = task::spawn(stream::iter([2]).rate_limit(&limiter)); // slot 20
    assert_pending!(first.poll_next());
    assert_pending!(second.poll_next());
    drop(first);
    drop(second);
    limiter.until_ready().await;
    assert_eq!(start.elapsed(), Duration::from_millis(10));
}
