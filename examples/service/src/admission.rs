//! Load shedding, the service's part: what a refused job is told.
//!
//! The bounds themselves are the pipeline's: at most [`Config::max_open_jobs`] groups admitted
//! and open (`PipelineBuilder::max_open_groups`), holding at most
//! [`Config::max_pending_inputs`] inputs without a line (`max_pending_requests`); a job is
//! admitted with `GroupBuilder::admit`, waiting up to [`Config::admission_wait`] for room in
//! arrival order, or refused with the bound that was full and an estimate of when there will be
//! room (from the rate groups ended and requests were answered over the last ten seconds).
//!
//! [`Config::max_open_jobs`]: crate::app::Config::max_open_jobs
//! [`Config::max_pending_inputs`]: crate::app::Config::max_pending_inputs
//! [`Config::admission_wait`]: crate::app::Config::admission_wait

use std::time::Duration;

/// `Retry-After` in whole seconds for a refusal's estimated wait: rounded, at least one, at
/// most `max` (also when nothing is ending: `Duration::MAX`); one when the pipeline has too
/// little history to estimate (`None`).
pub(crate) fn retry_after(estimate: Option<Duration>, max: Duration) -> u64 {
    let max = max.as_secs().max(1);
    estimate.map_or(1, |wait| {
        (wait.as_secs_f64().round().max(1.0) as u64).min(max)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_rounded_at_least_one_and_capped() {
        let max = Duration::from_secs(30);
        let secs = |s: f64| Some(Duration::from_secs_f64(s));
        assert_eq!(retry_after(secs(0.2), max), 1);
        assert_eq!(retry_after(secs(1.49), max), 1);
        assert_eq!(retry_after(secs(4.001), max), 4);
        assert_eq!(retry_after(secs(4.6), max), 5);
        assert_eq!(retry_after(secs(1e9), max), 30);
        // Nothing ends.
        assert_eq!(retry_after(Some(Duration::MAX), max), 30);
        // No history yet.
        assert_eq!(retry_after(None, max), 1);
        assert_eq!(retry_after(secs(3.0), Duration::from_millis(200)), 1);
    }
}
