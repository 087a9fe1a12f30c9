//! The algorithm of an adaptive [`InFlightLimit`](crate::InFlightLimit): a gradient on the
//! minimum round-trip time, in the family of Netflix's concurrency-limits (`GradientLimit`,
//! `VegasLimit`, `AIMDLimit`: <https://github.com/Netflix/concurrency-limits>) and of TCP
//! Vegas (Brakmo and Peterson, "TCP Vegas: End to End Congestion Avoidance on a Global
//! Internet", IEEE JSAC 13(8), 1995).
//!
//! # The measurement
//!
//! Each finished operation is a sample: its latency (from taking the unit to giving it back)
//! and the number of operations in flight when it started. Samples are gathered in windows of
//! about one round trip (`max(4, limit)` samples). After the limit moves, samples of operations
//! that started before are left out, so a window judges the limit it measures (TCP's rule of
//! one change per round trip). A window's **short-term RTT** is the lowest latency in it; the
//! **baseline** is the lowest short-term RTT since the last probe (the latency with no queue).
//! Comparing minimums, as Vegas and BBR do, keeps out the noise that only ever adds latency (a
//! coarse timer, scheduling, a long tail).
//!
//! # The update, once per window
//!
//! * `gradient = clamp(TOLERANCE × baseline / short, 0.5, 1)`, `TOLERANCE` = 1.05.
//! * **No queue** (`gradient == 1`): the limit grows, if the window used it. In slow start (at
//!   first, and after a run of drops up to half the limit the run began at) it becomes twice
//!   the most that was in flight; after slow start, that most plus a queue allowance
//!   `max(1, log10(limit))` (Vegas' step).
//! * **A queue** (`gradient < 1`): by Little's law, `in_flight × gradient` is the concurrency
//!   the service absorbs without queueing; the target is that plus the queue allowance, and
//!   the limit moves half way to it. (`in_flight` is that of the sample that set the
//!   short-term RTT, so an estimate does not depend on how far the limit has moved since.)
//!   Over a knee past which latency grows in proportion to concurrency, the limit settles at
//!   `x = TOLERANCE × knee + log10(x)`: 35 for a knee of 32, 18 for 16.
//! * **Slow start ends** at the first window whose mean latency is more than
//!   `SLOW_START_EXIT` (1.2) times the baseline, as TCP's HyStart watches for a delay
//!   increase. (The mean, not the minimum: the first operations of a burst meet no queue, and
//!   a coarse timer adds noise the mean averages out.) That window's longest latency then sets
//!   the target. Over a knee, slow start overshoots to twice it, for one window.
//! * **Drops** (a failure or a timeout, applied at once, not windowed): the limit falls to
//!   `BACKOFF` (0.9) of itself, as in Netflix's `AIMDLimit`; the first drop of a run also sets
//!   the slow-start threshold to half the limit, so the limit climbs back fast once calls
//!   succeed again.
//! * **Probe**: every `PROBE_EVERY` (30) windows the limit halves for one window of samples
//!   that started after it, whose minimum becomes the new baseline; then the limit is restored.
//!   So a service that became slower for good is measured again rather than taken for a queue
//!   forever (Vegas and Gradient reset their minimum the same way; the short dip is BBR's
//!   `ProbeRTT`).
//!
//! The limit is kept as an `f64` between `min` and `max`; the handle uses its integer part.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How much above the baseline a window's minimum latency may be and still count as no queue.
pub(crate) const TOLERANCE: f64 = 1.05;
/// The factor a drop (a failure or a timeout) multiplies the limit by.
pub(crate) const BACKOFF: f64 = 0.9;
/// The share of the way to the target a queued window moves the limit.
pub(crate) const SMOOTHING: f64 = 0.5;
/// How much above the baseline a window's mean latency may be and slow start go on.
pub(crate) const SLOW_START_EXIT: f64 = 1.2;
/// The fewest samples in a window.
pub(crate) const MIN_WINDOW: usize = 4;
/// Windows between two probes of the baseline.
pub(crate) const PROBE_EVERY: u32 = 30;

/// Why the limit changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Latency stayed near the baseline: grown.
    Growth,
    /// Latency grew over the baseline: lowered toward the measured capacity.
    Latency,
    /// A call failed or timed out.
    Drop,
    /// Halved for one window to measure the baseline again.
    Probe,
    /// Back to the level before the probe.
    Restore,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Growth => "growth",
            Reason::Latency => "latency",
            Reason::Drop => "drop",
            Reason::Probe => "probe",
            Reason::Restore => "restore",
        }
    }
}

/// One window of samples.
#[derive(Debug, Default)]
struct Window {
    samples: usize,
    /// The lowest latency in the window, and the in-flight count its operation started with.
    shortest: Option<(Duration, usize)>,
    /// The highest latency in the window, and the in-flight count its operation started with.
    longest: Option<(Duration, usize)>,
    /// The sum of the window's latencies.
    total: Duration,
    /// The most operations in flight at the start of any sample of the window.
    busiest: usize,
}

/// The state of the gradient.
#[derive(Debug)]
pub(crate) struct Gradient {
    min: f64,
    max: f64,
    limit: f64,
    /// Slow start (doubling) while the limit is below this.
    slow_start_below: f64,
    /// Whether the last report was a drop (a run of drops lowers the threshold once).
    dropping: bool,
    baseline: Option<Duration>,
    window: Window,
    windows: u32,
    /// While probing: the limit to restore.
    restore: Option<f64>,
    /// Counts the moves of the limit by a window: samples of operations that started in an
    /// earlier generation are not measured.
    generation: u32,
}

impl Gradient {
    /// A gradient between `min` and `max` (`1 <= min <= max`), starting at `min`, in slow
    /// start.
    pub(crate) fn new(min: usize, max: usize) -> Self {
        debug_assert!(1 <= min && min <= max);
        Self {
            min: min as f64,
            max: max as f64,
            limit: min as f64,
            slow_start_below: max as f64,
            dropping: false,
            baseline: None,
            window: Window::default(),
            windows: 0,
            restore: None,
            generation: 0,
        }
    }

    /// The limit now, as a count.
    pub(crate) fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The generation an operation starting now belongs to.
    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// An operation that started in `generation` with `in_flight` operations in flight (itself
    /// included) succeeded after `latency`. Returns why the limit moved, if a window closed.
    pub(crate) fn success(
        &mut self,
        generation: u32,
        in_flight: usize,
        latency: Duration,
    ) -> Option<Reason> {
        if generation != self.generation {
            return None;
        }
        self.dropping = false;
        let w = &mut self.window;
        w.samples += 1;
        w.busiest = w.busiest.max(in_flight);
        if w.shortest.is_none_or(|(shortest, _)| latency < shortest) {
            w.shortest = Some((latency, in_flight));
        }
        if w.longest.is_none_or(|(longest, _)| latency > longest) {
            w.longest = Some((latency, in_flight));
        }
        w.total = w.total.saturating_add(latency);
        if w.samples < MIN_WINDOW.max(self.limit as usize) {
            return None;
        }
        let Window {
            samples,
            shortest,
            longest,
            busiest,
            total,
        } = std::mem::take(w);
        let shortest = shortest.expect("a full window has a shortest sample");
        let baseline = self.baseline.map_or(shortest.0, |b| b.min(shortest.0));
        self.baseline = Some(baseline);
        // In slow start, the window's mean latency is the signal (as TCP's HyStart watches for
        // a delay increase): while it stays within SLOW_START_EXIT of the baseline, the limit
        // doubles; past it, slow start ends on the window's longest latency. After slow start,
        // the window's shortest latency is the signal.
        let (short, at) = match self.limit < self.slow_start_below {
            true => {
                let mean = total / u32::try_from(samples).unwrap_or(u32::MAX);
                match mean.as_secs_f64() <= SLOW_START_EXIT * baseline.as_secs_f64() {
                    true => (baseline, busiest),
                    false => longest.expect("a full window has a longest sample"),
                }
            }
            false => shortest,
        };

        let moved = self.close(short, at, busiest, baseline);
        if moved.is_some() {
            self.generation = self.generation.wrapping_add(1);
        }
        moved
    }

    /// A window closed: its latency `short` (the lowest, or in slow start the highest, of an
    /// operation that started with `at` in flight), the most in flight at any start
    /// `busiest`, and the baseline.
    fn close(
        &mut self,
        short: Duration,
        at: usize,
        busiest: usize,
        baseline: Duration,
    ) -> Option<Reason> {
        if let Some(restore) = self.restore.take() {
            return self.set(self.limit.max(restore), Reason::Restore);
        }
        self.windows += 1;
        if self.windows >= PROBE_EVERY {
            self.windows = 0;
            self.restore = Some(self.limit);
            self.baseline = None;
            return self.set(self.limit / 2.0, Reason::Probe);
        }

        let gradient = match short.as_nanos() {
            0 => 1.0,
            short => (TOLERANCE * baseline.as_nanos() as f64 / short as f64).clamp(0.5, 1.0),
        };
        if gradient >= 1.0 {
            let busiest = busiest as f64;
            let grown = if self.limit < self.slow_start_below {
                (2.0 * busiest).min(self.slow_start_below)
            } else {
                busiest + allowance(self.limit)
            };
            self.set(self.limit.max(grown), Reason::Growth)
        } else {
            self.slow_start_below = 0.0;
            let target = at as f64 * gradient + allowance(self.limit);
            self.set(
                self.limit + SMOOTHING * (target - self.limit),
                Reason::Latency,
            )
        }
    }

    /// An operation failed or timed out: the limit backs off.
    pub(crate) fn dropped(&mut self) -> Option<Reason> {
        if !self.dropping {
            self.dropping = true;
            self.slow_start_below = self.limit / 2.0;
        }
        self.set(self.limit * BACKOFF, Reason::Drop)
    }

    fn set(&mut self, limit: f64, reason: Reason) -> Option<Reason> {
        let limit = limit.clamp(self.min, self.max);
        let moved = limit != self.limit;
        self.limit = limit;
        moved.then_some(reason)
    }
}

/// How many changes of the limit [`Adaptive::history`] keeps.
pub(crate) const HISTORY: usize = 64;

/// The shared state of an adaptive limit: the gradient behind a lock, the limit as an atomic,
/// and the semaphore's permits kept in step with the limit.
///
/// The semaphore's permits (free plus out) are `limit + debt`: raising the limit pays the debt
/// first and adds the rest; lowering it forgets free permits and owes the rest. A permit taken
/// while a debt is owed is forgotten instead of used (the taker waits again), so no operation
/// starts while as many run as the limit allows; units given back need no bookkeeping.
pub(crate) struct Adaptive {
    semaphore: Arc<Semaphore>,
    min: usize,
    max: usize,
    name: Option<Box<str>>,
    current: AtomicUsize,
    debt: AtomicUsize,
    /// The gradient's generation, for the operations starting.
    generation: AtomicU32,
    state: Mutex<State>,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::InFlightMetrics,
}

struct State {
    gradient: Gradient,
    history: VecDeque<(Instant, usize)>,
}

/// A change of the limit, published once the lock is let go.
struct Change {
    from: usize,
    to: usize,
    reason: Reason,
}

impl Adaptive {
    /// An adaptive limit between `min` and `max` (checked by the caller), starting at `min`,
    /// whose units are the permits of `semaphore` (which holds `min`).
    pub(crate) fn new(
        semaphore: Arc<Semaphore>,
        min: usize,
        max: usize,
        name: Option<Box<str>>,
    ) -> Self {
        let mut history = VecDeque::with_capacity(HISTORY);
        history.push_back((Instant::now(), min));
        Self {
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::InFlightMetrics::new(name.as_deref(), min),
            semaphore,
            min,
            max,
            name,
            current: AtomicUsize::new(min),
            debt: AtomicUsize::new(0),
            generation: AtomicU32::new(0),
            state: Mutex::new(State {
                gradient: Gradient::new(min, max),
                history,
            }),
        }
    }

    pub(crate) fn min(&self) -> usize {
        self.min
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The limit now.
    #[inline]
    pub(crate) fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Units out now: the semaphore's permits (`limit + debt`) less the free ones. (A permit
    /// the semaphore handed to a waiter that has not taken it yet counts as out.)
    #[inline]
    pub(crate) fn in_flight(&self) -> usize {
        let permits = self.current() + self.debt.load(Ordering::Acquire);
        permits.saturating_sub(self.semaphore.available_permits())
    }

    /// Forgets a permit just taken if a debt is owed (the limit was lowered while units were
    /// out), paying one unit of it; else gives it back for use.
    #[inline]
    pub(crate) fn repay(&self, permit: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        let owed = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1));
        match owed {
            Ok(_) => {
                permit.forget();
                None
            }
            Err(_) => Some(permit),
        }
    }

    /// The generation of the gradient, for an operation starting now.
    #[inline]
    pub(crate) fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// An operation that started in `generation`, with `in_flight` units out (its own
    /// included), succeeded after `latency`.
    pub(crate) fn success(&self, generation: u32, in_flight: usize, latency: Duration) {
        self.update(|g| g.success(generation, in_flight, latency));
    }

    /// An operation failed or timed out.
    pub(crate) fn dropped(&self) {
        self.update(Gradient::dropped);
    }

    fn update(&self, f: impl FnOnce(&mut Gradient) -> Option<Reason>) {
        let change = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(reason) = f(&mut state.gradient) else {
                return;
            };
            self.generation
                .store(state.gradient.generation(), Ordering::Release);
            let (from, to) = (self.current(), state.gradient.limit());
            if from == to {
                return;
            }
            self.resize(from, to);
            self.current.store(to, Ordering::Relaxed);
            if state.history.len() == HISTORY {
                state.history.pop_front();
            }
            state.history.push_back((Instant::now(), to));
            Change { from, to, reason }
        };
        tracing::debug!(
            target: "stagepipe::in_flight",
            name = self.name(),
            limit = change.to,
            previous = change.from,
            reason = change.reason.as_str(),
            "in-flight limit changed"
        );
        #[cfg(feature = "metrics")]
        self.metrics.changed(change.from, change.to);
    }

    /// Makes the semaphore's permits match a limit moved from `from` to `to`.
    fn resize(&self, from: usize, to: usize) {
        if to > from {
            let more = to - from;
            let owed = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    Some(d.saturating_sub(more))
                })
                .expect("the update always succeeds");
            self.semaphore.add_permits(more - owed.min(more));
        } else {
            let fewer = from - to;
            let forgotten = self.semaphore.forget_permits(fewer);
            self.debt.fetch_add(fewer - forgotten, Ordering::AcqRel);
        }
    }

    /// The last changes of the limit (at most [`HISTORY`]), oldest first; the first entry of a
    /// new limit is its start at `min`.
    pub(crate) fn history(&self) -> Vec<(Instant, usize)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.history.iter().copied().collect()
    }
}

#[cfg(feature = "metrics")]
impl Drop for Adaptive {
    fn drop(&mut self) {
        self.metrics.changed(self.current(), 0);
    }
}

/// The queue allowance: how far over the measured capacity the limit reaches, to keep probing
/// for more.
fn allowance(limit: f64) -> f64 {
    limit.log10().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `g` windows of samples from a service whose latency is 10 ms up to `knee` in
    /// flight and grows in proportion beyond it, every operation starting at the limit.
    fn drive(g: &mut Gradient, windows: usize, knee: usize) {
        for _ in 0..windows {
            let (in_flight, generation) = (g.limit(), g.generation());
            let latency = 10 * MS * (in_flight.max(knee) as u32) / knee as u32;
            for _ in 0..MIN_WINDOW.max(in_flight) {
                g.success(generation, in_flight, latency);
            }
        }
    }

    #[test]
    fn settles_over_the_knee_and_follows_it_down() {
        let mut g = Gradient::new(1, 1000);
        drive(&mut g, 200, 32);
        // x = TOLERANCE × 32 + log10(x): 35.1, so 35 (or half of it in a probe).
        assert!(matches!(g.limit(), 35 | 17), "{}", g.limit());
        // x = TOLERANCE × 16 + log10(x): 18.06.
        drive(&mut g, 200, 16);
        assert!(matches!(g.limit(), 18 | 9), "{}", g.limit());
    }

    #[test]
    fn slow_start_doubles_until_latency_grows() {
        let mut g = Gradient::new(1, 1000);
        let mut limits = vec![g.limit()];
        for _ in 0..6 {
            drive(&mut g, 1, 1000);
            limits.push(g.limit());
        }
        assert_eq!(limits, [1, 2, 4, 8, 16, 32, 64]);
    }

    #[test]
    fn drops_back_off_and_never_leave_the_bounds() {
        let mut g = Gradient::new(4, 50);
        drive(&mut g, 50, 1000);
        assert_eq!(g.limit(), 50);
        assert_eq!(g.dropped(), Some(Reason::Drop));
        assert_eq!(g.limit(), 45);
        for _ in 0..100 {
            g.dropped();
        }
        assert_eq!(g.limit(), 4);
        assert_eq!(g.dropped(), None);
        // Slow start again, up to half the limit the drops began at, then one step at a time.
        let mut limits = vec![];
        for _ in 0..4 {
            drive(&mut g, 1, 1000);
            limits.push(g.limit());
        }
        assert_eq!(limits, [8, 16, 25, 26]);
    }

    #[test]
    fn a_probe_halves_the_limit_for_one_window_and_ignores_older_samples() {
        let mut g = Gradient::new(1, 1000);
        drive(&mut g, 100, 32);
        while g.restore.is_none() {
            drive(&mut g, 1, 32);
        }
        let restore = g.restore.unwrap() as usize;
        assert_eq!(g.limit(), restore / 2);
        // Samples of operations started before the probe change nothing.
        let before = g.generation().wrapping_sub(1);
        for _ in 0..100 {
            assert_eq!(g.success(before, 100, 50 * MS), None);
        }
        let probe = g.generation();
        let reasons: Vec<_> = (0..MIN_WINDOW.max(g.limit()))
            .filter_map(|_| g.success(probe, g.limit(), 10 * MS))
            .collect();
        assert_eq!(reasons, [Reason::Restore]);
        assert_eq!(g.limit(), restore);
        assert_eq!(g.baseline, Some(10 * MS));
    }

    #[test]
    fn instant_operations_grow_the_limit() {
        let mut g = Gradient::new(1, 8);
        for _ in 0..100 {
            let (in_flight, generation) = (g.limit(), g.generation());
            g.success(generation, in_flight, Duration::ZERO);
        }
        assert_eq!(g.limit(), 8);
    }
}
