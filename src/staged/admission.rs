//! Admission of request groups ([`GroupBuilder::admit`](super::GroupBuilder::admit)): bounds on
//! the admitted groups open at once and on the requests they hold, a wait for room in arrival
//! order, and refusals that say which bound was full and when room is likely.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How far back the completion rates behind [`GroupRefused::retry_after`] look.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// The least history a rate is computed over, and the spacing of its samples.
const RATE_SPACING: Duration = Duration::from_secs(1);

/// The bound an admission found full; see [`GroupRefused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AdmissionBound {
    /// [`PipelineBuilder::max_open_groups`](super::PipelineBuilder::max_open_groups): admitted
    /// groups open at once.
    OpenGroups,
    /// [`PipelineBuilder::max_pending_requests`](super::PipelineBuilder::max_pending_requests):
    /// requests reserved by the admitted groups and not yet answered.
    PendingRequests,
}

/// A group refused by [`GroupBuilder::admit`](super::GroupBuilder::admit): which bound had no
/// room, and an estimate of when it will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupRefused {
    /// The bound that had no room.
    pub bound: AdmissionBound,
    /// How long until there is likely room for this group, at the rate admitted groups ended
    /// (for [`OpenGroups`](AdmissionBound::OpenGroups)) or their requests were answered (for
    /// [`PendingRequests`](AdmissionBound::PendingRequests)) over the last ten seconds: the
    /// groups waiting ahead of it and itself, or the requests it lacks (with those the waiting
    /// groups reserve), over that rate. `Duration::MAX` when nothing ended in that time;
    /// `None` while there is less than a second of history to go by.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for GroupRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bound {
            AdmissionBound::OpenGroups => f.write_str("no room: too many groups open"),
            AdmissionBound::PendingRequests => f.write_str("no room: too many requests pending"),
        }
    }
}

impl std::error::Error for GroupRefused {}

/// A pipeline's admission bounds, and what they have seen.
pub(super) struct Admission {
    /// One permit per open group; `None`: no bound.
    groups: Option<Arc<Semaphore>>,
    /// One permit per pending request; `None`: no bound.
    requests: Option<Arc<Semaphore>>,
    /// The most requests one group may reserve.
    max_requests: usize,
    /// The most admissions waiting at once.
    max_waiting: usize,
    /// Admissions waiting now, and the requests they reserve.
    waiting: AtomicUsize,
    waiting_requests: AtomicUsize,
    /// Requests reserved by admitted groups, not answered yet.
    pending: AtomicUsize,
    /// Admissions refused so far.
    refused: AtomicU64,
    throughput: Throughput,
}

/// A bound as a semaphore, or none when it cannot bind.
fn bound(limit: usize) -> Option<Arc<Semaphore>> {
    (limit < Semaphore::MAX_PERMITS).then(|| Arc::new(Semaphore::new(limit)))
}

/// Figures of the admissions: waiting now, requests pending now, refused so far.
pub(super) struct AdmissionFigures {
    pub(super) waiting: u64,
    pub(super) pending: u64,
    pub(super) refused: u64,
}

impl Admission {
    /// At most `max_groups` admitted groups open and `max_requests` requests pending
    /// (`usize::MAX`, or anything tokio's semaphore cannot count: no bound).
    pub(super) fn new(max_groups: usize, max_requests: usize) -> Self {
        Self {
            groups: bound(max_groups),
            requests: bound(max_requests),
            max_requests: max_requests.min(u32::MAX as usize),
            max_waiting: max_groups,
            waiting: AtomicUsize::new(0),
            waiting_requests: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            throughput: Throughput::default(),
        }
    }

    pub(super) fn figures(&self) -> AdmissionFigures {
        AdmissionFigures {
            waiting: self.waiting.load(Ordering::Acquire) as u64,
            pending: self.pending.load(Ordering::Acquire) as u64,
            refused: self.refused.load(Ordering::Acquire),
        }
    }

    /// Admits a group of `requests` requests: at once if there is room, or once there is
    /// within `wait`, in arrival order; else refuses it.
    pub(super) async fn admit(
        self: &Arc<Self>,
        requests: usize,
        wait: Duration,
    ) -> Result<Ticket, GroupRefused> {
        let Some(units) = u32::try_from(requests)
            .ok()
            .filter(|_| self.requests.is_none() || requests <= self.max_requests)
        else {
            // It could never fit.
            return Err(self.refuse(AdmissionBound::PendingRequests, requests));
        };
        let permits = match self.try_permits(units) {
            Ok(permits) => permits,
            Err(bound) if wait.is_zero() => return Err(self.refuse(bound, requests)),
            Err(bound) => {
                // Join the queue, unless it is full too.
                let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
                let queued = Queued::enter(self, requests);
                if waiting >= self.max_waiting {
                    drop(queued);
                    return Err(self.refuse(bound, requests));
                }
                let at = crate::time::deadline(Instant::now(), wait);
                let permits = tokio::time::timeout_at(at, self.permits(units)).await;
                drop(queued);
                match permits {
                    Ok(permits) => permits,
                    Err(_) => return Err(self.refuse(self.full_bound(units), requests)),
                }
            }
        };
        self.pending.fetch_add(requests, Ordering::AcqRel);
        Ok(Ticket {
            _group: permits.0,
            requests: permits.1,
            pending: requests,
            admission: self.clone(),
        })
    }

    /// Both permits if there is room now; else the bound that is full.
    fn try_permits(&self, units: u32) -> Result<Permits, AdmissionBound> {
        let group = match &self.groups {
            Some(groups) => {
                Some((groups.clone().try_acquire_owned()).map_err(|_| AdmissionBound::OpenGroups)?)
            }
            None => None,
        };
        let requests = match &self.requests {
            Some(requests) => Some(
                (requests.clone().try_acquire_many_owned(units))
                    .map_err(|_| AdmissionBound::PendingRequests)?,
            ),
            None => None,
        };
        Ok((group, requests))
    }

    /// Both permits, waiting in line for each.
    async fn permits(&self, units: u32) -> Permits {
        let closed = "the admission semaphores are never closed";
        let group = match &self.groups {
            Some(groups) => Some(groups.clone().acquire_owned().await.expect(closed)),
            None => None,
        };
        let requests = match &self.requests {
            Some(requests) => Some(
                requests
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .expect(closed),
            ),
            None => None,
        };
        (group, requests)
    }

    /// The bound a group of `units` requests would find full now.
    fn full_bound(&self, units: u32) -> AdmissionBound {
        match &self.groups {
            Some(groups) if groups.available_permits() == 0 => AdmissionBound::OpenGroups,
            _ if self.requests.is_some() && units > 0 => AdmissionBound::PendingRequests,
            _ => AdmissionBound::OpenGroups,
        }
    }

    /// Refuses a group of `requests` requests that found `bound` full, and says when to come
    /// back.
    fn refuse(&self, bound: AdmissionBound, requests: usize) -> GroupRefused {
        self.refused.fetch_add(1, Ordering::AcqRel);
        let retry_after = self.throughput.rates(Instant::now()).map(|rates| {
            let secs = match bound {
                // Room for one more group once the groups waiting, and one more, have ended.
                AdmissionBound::OpenGroups => {
                    (self.waiting.load(Ordering::Acquire) + 1) as f64 / rates.groups
                }
                // Room for these requests once as many (and those waiting) have been answered.
                AdmissionBound::PendingRequests => {
                    let available = self.requests.as_ref().map_or(0, |s| s.available_permits());
                    let needed = (self.waiting_requests.load(Ordering::Acquire) + requests)
                        .saturating_sub(available)
                        .max(1);
                    needed as f64 / rates.requests
                }
            };
            // Nothing ended: an infinite (or undefined) wait.
            Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
        });
        GroupRefused { bound, retry_after }
    }
}

type Permits = (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>);

/// Counts an admission in the queue while it lives.
struct Queued<'a>(&'a Admission, usize);

impl<'a> Queued<'a> {
    /// Enters an admission of `requests` requests, already counted in `waiting`.
    fn enter(admission: &'a Admission, requests: usize) -> Self {
        (admission.waiting_requests).fetch_add(requests, Ordering::AcqRel);
        Self(admission, requests)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.waiting_requests.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// An admitted group's room: its slot and one unit per request not answered yet. Held by the
/// group's results; dropping it (the group closing) gives back what is left.
pub(super) struct Ticket {
    _group: Option<OwnedSemaphorePermit>,
    requests: Option<OwnedSemaphorePermit>,
    pending: usize,
    admission: Arc<Admission>,
}

impl Ticket {
    /// One of the group's requests has its result: its unit goes back.
    pub(super) fn answered(&mut self) {
        if self.pending == 0 {
            return;
        }
        self.pending -= 1;
        if let Some(requests) = &mut self.requests {
            drop(requests.split(1));
        }
        let admission = &self.admission;
        admission.pending.fetch_sub(1, Ordering::AcqRel);
        admission.throughput.requests.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        a.pending.fetch_sub(self.pending, Ordering::AcqRel);
        a.throughput.groups.fetch_add(1, Ordering::AcqRel);
        a.throughput.rates(Instant::now());
        // The permits go back as the fields drop.
    }
}

/// Groups ended and requests answered, with samples of both over the last [`RATE_WINDOW`] for
/// their recent rates. Samples are taken as groups end and as groups are refused, at most one
/// per [`RATE_SPACING`], so the ring holds a dozen at most.
#[derive(Default)]
struct Throughput {
    groups: AtomicU64,
    requests: AtomicU64,
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    groups: u64,
    requests: u64,
}

/// Groups ended and requests answered per second.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rates {
    groups: f64,
    requests: f64,
}

impl Throughput {
    /// Samples the counts at `now` if a sample is due, and returns the rates over the samples
    /// of the window; `None` before the window covers [`RATE_SPACING`].
    fn rates(&self, now: Instant) -> Option<Rates> {
        let current = Sample {
            at: now,
            groups: self.groups.load(Ordering::Acquire),
            requests: self.requests.load(Ordering::Acquire),
        };
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while (samples.front()).is_some_and(|s| now.saturating_duration_since(s.at) > RATE_WINDOW) {
            samples.pop_front();
        }
        if (samples.back()).is_none_or(|s| now.saturating_duration_since(s.at) >= RATE_SPACING) {
            samples.push_back(current);
        }
        let first = *samples.front().expect("a sample was just kept or pushed");
        let span = now.saturating_duration_since(first.at);
        if span < RATE_SPACING {
            return None;
        }
        let per_second = |n: u64, then: u64| n.saturating_sub(then) as f64 / span.as_secs_f64();
        Some(Rates {
            groups: per_second(current.groups, first.groups),
            requests: per_second(current.requests, first.requests),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rates_over_the_window() {
        let t = Throughput::default();
        let start = Instant::now();
        assert_eq!(t.rates(start), None, "no history yet");
        t.groups.fetch_add(2, Ordering::AcqRel);
        t.requests.fetch_add(20, Ordering::AcqRel);
        assert_eq!(t.rates(start + Duration::from_millis(500)), None);
        let rates = t.rates(start + Duration::from_secs(2)).unwrap();
        let expected = Rates {
            groups: 1.0,
            requests: 10.0,
        };
        assert_eq!(rates, expected);
        // Samples older than the window are dropped: nothing ended in the last 10 s.
        t.rates(start + Duration::from_secs(5));
        t.rates(start + Duration::from_secs(14));
        let rates = t.rates(start + Duration::from_secs(16)).unwrap();
        let expected = Rates {
            groups: 0.0,
            requests: 0.0,
        };
        assert_eq!(rates, expected);
        assert!(t.samples.lock().unwrap().len() <= 11);
    }
}
