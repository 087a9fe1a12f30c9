//! Load shedding: how many jobs, and how many of their inputs, the service holds at once, and
//! what a caller that finds it full is told.
//!
//! A job is admitted with a [`Ticket`]: a slot among [`Config::max_open_jobs`] and one unit of
//! [`Config::max_pending_inputs`] per input. The ticket gives an input's unit back as its line
//! is written and the job's slot when its response ends (or is dropped). A job that finds no
//! room waits up to [`Config::admission_wait`] for it, in arrival order (at most as many
//! requests wait at once as there are job slots); then, or at once, it is refused with a
//! [`Full`]: how long to wait before trying again, estimated from the rate at which jobs ended
//! and inputs were answered over the last ten seconds.
//!
//! [`Config::max_open_jobs`]: crate::app::Config::max_open_jobs
//! [`Config::max_pending_inputs`]: crate::app::Config::max_pending_inputs
//! [`Config::admission_wait`]: crate::app::Config::admission_wait

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::telemetry::ServiceMetrics;

/// How far back the completion rates behind `Retry-After` look.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// The least history a rate is computed over, and the spacing of its samples.
const RATE_SPACING: Duration = Duration::from_secs(1);

/// The admission bounds of one service, and what they have seen.
pub(crate) struct Admission {
    /// One permit per job slot; `None`: no bound.
    jobs: Option<Arc<Semaphore>>,
    /// One permit per pending input; `None`: no bound.
    inputs: Option<Arc<Semaphore>>,
    /// The most requests waiting for room at once.
    max_waiting: usize,
    /// Requests waiting for room now, and their inputs.
    waiting: AtomicUsize,
    waiting_inputs: AtomicUsize,
    /// The longest `Retry-After`.
    retry_after_max: Duration,
    /// Jobs admitted and open now, inputs of admitted jobs without a line yet.
    open: AtomicUsize,
    pending: AtomicUsize,
    /// Jobs refused for lack of room.
    shed: AtomicU64,
    throughput: Throughput,
    metrics: ServiceMetrics,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("open", &self.open.load(Ordering::Relaxed))
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("shed", &self.shed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Why a job was refused: which bound was full, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full {
    /// The bound that had no room.
    pub(crate) bound: Bound,
    /// Whole seconds, at least one: the `Retry-After` header.
    pub(crate) retry_after: u64,
}

/// An admission bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// `max_open_jobs`.
    Jobs,
    /// `max_pending_inputs`.
    Inputs,
}

/// Figures of the admission bounds, for `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdmissionReport {
    pub(crate) open: usize,
    pub(crate) waiting: usize,
    pub(crate) pending: usize,
    pub(crate) shed: u64,
}

/// A bound as a semaphore, or none when it cannot bind.
fn bound(limit: usize) -> Option<Arc<Semaphore>> {
    (limit < Semaphore::MAX_PERMITS).then(|| Arc::new(Semaphore::new(limit)))
}

impl Admission {
    /// Bounds of `max_jobs` open jobs and `max_inputs` pending inputs (`usize::MAX`: none).
    pub(crate) fn new(
        max_jobs: usize,
        max_inputs: usize,
        retry_after_max: Duration,
        metrics: ServiceMetrics,
    ) -> Self {
        Self {
            jobs: bound(max_jobs),
            inputs: bound(max_inputs),
            max_waiting: max_jobs,
            waiting: AtomicUsize::new(0),
            waiting_inputs: AtomicUsize::new(0),
            retry_after_max,
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
            throughput: Throughput::default(),
            metrics,
        }
    }

    /// Admits a job of `inputs` inputs that arrived at `arrived`: at once if there is room, or
    /// once there is within `wait`; else refuses it.
    ///
    /// `inputs` must fit the inputs bound (the caller refuses larger jobs up front).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        inputs: usize,
        arrived: Instant,
        wait: Duration,
    ) -> Result<Ticket, Full> {
        let units = u32::try_from(inputs).expect("a job's inputs fit the inputs bound");
        let permits = match self.try_permits(units) {
            Ok(permits) => permits,
            Err(bound) if wait.is_zero() => return Err(self.refuse(bound, inputs)),
            Err(bound) => {
                // Join the queue, unless it is full too.
                let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
                let queued = Queued::enter(self, inputs);
                if waiting >= self.max_waiting {
                    drop(queued);
                    return Err(self.refuse(bound, inputs));
                }
                let permits = tokio::time::timeout(wait, self.permits(units)).await;
                drop(queued);
                match permits {
                    Ok(permits) => permits,
                    Err(_) => return Err(self.refuse(self.full_bound(units), inputs)),
                }
            }
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        self.pending.fetch_add(inputs, Ordering::AcqRel);
        let m = &self.metrics;
        m.jobs_admitted.increment(1);
        m.jobs_open.increment(1.0);
        m.inputs_pending.increment(inputs as f64);
        m.admission_wait
            .record(Instant::now().duration_since(arrived).as_secs_f64());
        Ok(Ticket {
            job: permits.0,
            inputs: permits.1,
            pending: inputs,
            arrived,
            admission: self.clone(),
        })
    }

    /// Both permits if there is room now; else the bound that is full.
    fn try_permits(&self, units: u32) -> Result<Permits, Bound> {
        let job = match &self.jobs {
            Some(jobs) => Some(jobs.clone().try_acquire_owned().map_err(|_| Bound::Jobs)?),
            None => None,
        };
        let inputs = match &self.inputs {
            Some(inputs) => Some(
                inputs
                    .clone()
                    .try_acquire_many_owned(units)
                    .map_err(|_| Bound::Inputs)?,
            ),
            None => None,
        };
        Ok((job, inputs))
    }

    /// Both permits, waiting in line for each.
    async fn permits(&self, units: u32) -> Permits {
        let closed = "the admission semaphores are never closed";
        let job = match &self.jobs {
            Some(jobs) => Some(jobs.clone().acquire_owned().await.expect(closed)),
            None => None,
        };
        let inputs = match &self.inputs {
            Some(inputs) => Some(
                inputs
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .expect(closed),
            ),
            None => None,
        };
        (job, inputs)
    }

    /// The bound a job of `units` inputs would find full now.
    fn full_bound(&self, units: u32) -> Bound {
        match &self.jobs {
            Some(jobs) if jobs.available_permits() == 0 => Bound::Jobs,
            _ if self.inputs.is_some() && units > 0 => Bound::Inputs,
            _ => Bound::Jobs,
        }
    }

    /// Refuses a job of `inputs` inputs that found `bound` full, and says when to come back.
    fn refuse(&self, bound: Bound, inputs: usize) -> Full {
        self.shed.fetch_add(1, Ordering::AcqRel);
        self.metrics.jobs_shed.increment(1);
        let estimate = match self.throughput.rates(Instant::now()) {
            // Not enough history to say: soon.
            None => 1.0,
            Some(rates) => match bound {
                // Room for one more job once the jobs waiting, and one more, have ended.
                Bound::Jobs => (self.waiting.load(Ordering::Acquire) + 1) as f64 / rates.jobs,
                // Room for these inputs once as many (and those waiting) have been answered.
                Bound::Inputs => {
                    let available = self.inputs.as_ref().map_or(0, |s| s.available_permits());
                    let needed = (self.waiting_inputs.load(Ordering::Acquire) + inputs)
                        .saturating_sub(available)
                        .max(1);
                    needed as f64 / rates.inputs
                }
            },
        };
        Full {
            bound,
            retry_after: retry_after(estimate, self.retry_after_max),
        }
    }

    /// The admission figures now.
    pub(crate) fn report(&self) -> AdmissionReport {
        AdmissionReport {
            open: self.open.load(Ordering::Acquire),
            waiting: self.waiting.load(Ordering::Acquire),
            pending: self.pending.load(Ordering::Acquire),
            shed: self.shed.load(Ordering::Acquire),
        }
    }
}

type Permits = (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>);

/// `Retry-After` in whole seconds for an estimated wait of `estimate` seconds: rounded, at
/// least one, at most `max` (also when nothing is ending: an infinite estimate).
fn retry_after(estimate: f64, max: Duration) -> u64 {
    let max = max.as_secs().max(1);
    if estimate.is_nan() {
        return max;
    }
    (estimate.round().max(1.0) as u64).min(max)
}

/// Counts a request in the admission queue while it lives.
struct Queued<'a>(&'a Admission, usize);

impl<'a> Queued<'a> {
    /// Enters a request of `inputs` inputs, already counted in `waiting`.
    fn enter(admission: &'a Admission, inputs: usize) -> Self {
        admission.waiting_inputs.fetch_add(inputs, Ordering::AcqRel);
        admission.metrics.jobs_waiting.increment(1.0);
        Self(admission, inputs)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.waiting_inputs.fetch_sub(self.1, Ordering::AcqRel);
        self.0.metrics.jobs_waiting.decrement(1.0);
    }
}

/// An admitted job's room: its job slot and one unit per input not answered yet. Dropping it
/// gives back what is left.
pub(crate) struct Ticket {
    job: Option<OwnedSemaphorePermit>,
    inputs: Option<OwnedSemaphorePermit>,
    pending: usize,
    arrived: Instant,
    admission: Arc<Admission>,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// One of the job's inputs has its line: its unit goes back.
    pub(crate) fn answered(&mut self) {
        if self.pending == 0 {
            return;
        }
        self.pending -= 1;
        if let Some(inputs) = &mut self.inputs {
            drop(inputs.split(1));
        }
        let admission = &self.admission;
        admission.pending.fetch_sub(1, Ordering::AcqRel);
        admission.throughput.inputs.fetch_add(1, Ordering::AcqRel);
        admission.metrics.inputs_pending.decrement(1.0);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The permits go back as the fields drop, after these figures.
        let a = &self.admission;
        a.open.fetch_sub(1, Ordering::AcqRel);
        a.pending.fetch_sub(self.pending, Ordering::AcqRel);
        a.metrics.jobs_open.decrement(1.0);
        a.metrics.inputs_pending.decrement(self.pending as f64);
        let now = Instant::now();
        a.metrics
            .job_duration
            .record(now.duration_since(self.arrived).as_secs_f64());
        a.throughput.jobs.fetch_add(1, Ordering::AcqRel);
        a.throughput.rates(now);
        drop(self.job.take());
    }
}

/// Jobs ended and inputs answered, with samples of both over the last [`RATE_WINDOW`] for
/// their recent rates. Samples are taken as jobs end and as jobs are refused, at most one per
/// [`RATE_SPACING`], so the ring holds a dozen at most.
#[derive(Debug, Default)]
struct Throughput {
    jobs: AtomicU64,
    inputs: AtomicU64,
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    jobs: u64,
    inputs: u64,
}

/// Jobs ended and inputs answered per second.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rates {
    jobs: f64,
    inputs: f64,
}

impl Throughput {
    /// Samples the counts at `now` if a sample is due, and returns the rates over the samples
    /// of the window; `None` before the window covers [`RATE_SPACING`].
    fn rates(&self, now: Instant) -> Option<Rates> {
        let current = Sample {
            at: now,
            jobs: self.jobs.load(Ordering::Acquire),
            inputs: self.inputs.load(Ordering::Acquire),
        };
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > RATE_WINDOW)
        {
            samples.pop_front();
        }
        if samples
            .back()
            .is_none_or(|s| now.saturating_duration_since(s.at) >= RATE_SPACING)
        {
            samples.push_back(current);
        }
        let first = *samples.front().expect("a sample was just kept or pushed");
        let span = now.saturating_duration_since(first.at);
        if span < RATE_SPACING {
            return None;
        }
        let per_second = |n: u64, then: u64| n.saturating_sub(then) as f64 / span.as_secs_f64();
        Some(Rates {
            jobs: per_second(current.jobs, first.jobs),
            inputs: per_second(current.inputs, first.inputs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_rounded_at_least_one_and_capped() {
        let max = Duration::from_secs(30);
        assert_eq!(retry_after(0.2, max), 1);
        assert_eq!(retry_after(1.49, max), 1);
        assert_eq!(retry_after(4.001, max), 4);
        assert_eq!(retry_after(4.6, max), 5);
        assert_eq!(retry_after(1e9, max), 30);
        // Nothing ends: 1 / 0.
        assert_eq!(retry_after(f64::INFINITY, max), 30);
        assert_eq!(retry_after(f64::NAN, max), 30);
        assert_eq!(retry_after(3.0, Duration::from_millis(200)), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rates_over_the_window() {
        let t = Throughput::default();
        let start = Instant::now();
        assert_eq!(t.rates(start), None, "no history yet");
        t.jobs.fetch_add(2, Ordering::AcqRel);
        t.inputs.fetch_add(20, Ordering::AcqRel);
        assert_eq!(t.rates(start + Duration::from_millis(500)), None);
        let rates = t.rates(start + Duration::from_secs(2)).unwrap();
        assert_eq!(
            rates,
            Rates {
                jobs: 1.0,
                inputs: 10.0
            }
        );
        // Samples older than the window are dropped: nothing ended in the last 10 s.
        t.rates(start + Duration::from_secs(5));
        t.rates(start + Duration::from_secs(14));
        let rates = t.rates(start + Duration::from_secs(16)).unwrap();
        assert_eq!(
            rates,
            Rates {
                jobs: 0.0,
                inputs: 0.0
            }
        );
        assert!(t.samples.lock().unwrap().len() <= 11);
    }
}
