//! The service under more load than it can take: load shedding (429 with `Retry-After`),
//! waiting for room (`admission_wait`), per-job deadlines, the item limit per job, and that
//! every admitted job is answered in full, in order.
//!
//! Real sockets on 127.0.0.1 on tokio's paused clock: the upstream's latency and every
//! deadline are virtual time, which advances only when every task waits, so the timings below
//! are exact (a request and its answer take no virtual time).

mod common;

use std::time::Duration;

use common::{Harness, Reader, bounded, eventually, inputs_of, ok_line, open_config, read_to_end};
use futures::future::join_all;
use stagepipe_service::app::{Config, Line};
use stagepipe_service::upstream::UpstreamConfig;
use tokio::time::{Instant, sleep};

/// An upstream answering after `latency`.
fn upstream(latency: Duration) -> UpstreamConfig {
    UpstreamConfig {
        latency,
        ..UpstreamConfig::default()
    }
}

/// A refused job's one line.
async fn refusal_line(response: reqwest::Response) -> Line {
    let bytes = response.bytes().await.unwrap();
    serde_json::from_slice(&bytes).expect("one JSON line")
}

fn error_line(error: &str) -> Line {
    Line {
        error: Some(error.to_string()),
        ..Line::default()
    }
}

/// Posts a job of `n` inputs and checks it is refused up front: 413 and the error line naming
/// the limit `max`.
async fn assert_refused_as_too_large(h: &Harness, n: i64, max: i64) {
    let refused = h.post(&inputs_of(0, n), "continue").await;
    assert_eq!(refused.status(), 413);
    assert_eq!(
        refusal_line(refused).await,
        error_line(&format!(
            "too many inputs: a job may have at most {max}, this one has {n}"
        ))
    );
}

/// A 429's `Retry-After`, in seconds.
fn retry_after(response: &reqwest::Response) -> u64 {
    assert_eq!(response.status(), 429);
    let header = response
        .headers()
        .get("retry-after")
        .expect("a Retry-After");
    header.to_str().unwrap().parse().expect("whole seconds")
}

/// The lines of an admitted job of `inputs`, all answered.
fn all_ok(inputs: &[i64]) -> Vec<Line> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, x)| ok_line(i, *x))
        .collect()
}

/// `elapsed` is `expected`, give or take the timer's millisecond ticks.
fn assert_about(elapsed: Duration, expected: Duration) {
    assert!(
        elapsed >= expected && elapsed <= expected + Duration::from_millis(5),
        "{elapsed:?}, expected {expected:?}"
    );
}

/// Waits until the service has no job open.
async fn no_job_open(h: &Harness) {
    eventually("every job to end", || async {
        h.service.stats().pipeline.groups_open == 0
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_full_service_answers_429_with_retry_after_from_its_completion_rate() {
    bounded(async {
        let h = Harness::start(
            Config {
                max_open_jobs: 2,
                ..open_config()
            },
            upstream(Duration::from_secs(4)),
        )
        .await;
        let mut a = Reader::new(h.post(&[1], "continue").await);
        let mut b = Reader::new(h.post(&[2], "continue").await);

        // Two jobs open: a third is refused, and opens nothing.
        let refused = h.post(&[3], "continue").await;
        // No job has ended yet: no rate to go by, so soon.
        assert_eq!(retry_after(&refused), 1);
        assert_eq!(
            refusal_line(refused).await,
            error_line("the service is full (max_open_jobs = 2): retry after 1 s")
        );
        let stats = h.service.stats();
        assert_eq!(stats.pipeline.groups_open, 2);
        assert_eq!(stats.pipeline.groups_refused, 1);
        assert_eq!(stats.pipeline.requests_pending, 2);
        assert_eq!(stats.pipeline.groups_opened, 2);

        // Both end at 4 s: two jobs in 4 s, one every 2 s.
        assert_eq!(read_to_end(&mut a).await, (vec![ok_line(0, 1)], None));
        assert_eq!(read_to_end(&mut b).await, (vec![ok_line(0, 2)], None));
        no_job_open(&h).await;
        let mut c = Reader::new(h.post(&[3], "continue").await);
        let mut d = Reader::new(h.post(&[4], "continue").await);
        let refused = h.post(&[5], "continue").await;
        assert_eq!(
            retry_after(&refused),
            2,
            "room for one more in one job's time"
        );
        assert_eq!(
            refusal_line(refused).await,
            error_line("the service is full (max_open_jobs = 2): retry after 2 s")
        );

        // The admitted jobs are answered in full.
        assert_eq!(read_to_end(&mut c).await, (vec![ok_line(0, 3)], None));
        assert_eq!(read_to_end(&mut d).await, (vec![ok_line(0, 4)], None));
        no_job_open(&h).await;
        let stats = h.settled().await;
        assert_eq!(stats.pipeline.groups_refused, 2);
        assert_eq!(stats.pipeline.groups_opened, 4);
        assert_eq!(stats.pipeline.requests_done, 4);
        assert_eq!(h.upstream.report().calls, 4);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_the_most_when_no_job_ends() {
    bounded(async {
        let h = Harness::start(
            Config {
                max_open_jobs: 1,
                retry_after_max: Duration::from_secs(20),
                ..open_config()
            },
            upstream(Duration::from_secs(1_000)),
        )
        .await;
        let _stuck = h.post(&[1], "continue").await;
        assert_eq!(retry_after(&h.post(&[2], "continue").await), 1);
        sleep(Duration::from_secs(3)).await;
        // Three seconds and no job ended: the longest wait.
        let refused = h.post(&[2], "continue").await;
        assert_eq!(retry_after(&refused), 20);
        assert_eq!(
            refusal_line(refused).await,
            error_line("the service is full (max_open_jobs = 1): retry after 20 s")
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn admission_wait_admits_a_job_when_room_frees() {
    bounded(async {
        let h = Harness::start(
            Config {
                max_open_jobs: 1,
                admission_wait: Duration::from_secs(10),
                ..open_config()
            },
            upstream(Duration::from_secs(2)),
        )
        .await;
        let start = Instant::now();
        let mut a = Reader::new(h.post(&[1, 2], "continue").await);
        let waiting = async {
            let response = h.post(&[3, 4], "continue").await;
            (response.status(), start.elapsed(), Reader::new(response))
        };
        let queue_full = async {
            eventually("a job waiting for room", || async {
                h.service.stats().pipeline.groups_waiting == 1
            })
            .await;
            // One request waits per job slot: another is refused at once.
            let asked = Instant::now();
            let response = h.post(&[5], "continue").await;
            (retry_after(&response), asked.elapsed())
        };
        let (a_lines, (status, admitted_at, mut b), (refused_after, refused_in)) =
            tokio::join!(read_to_end(&mut a), waiting, queue_full);
        assert_eq!(a_lines, (all_ok(&[1, 2]), None));
        assert_eq!(refused_after, 1);
        assert!(
            refused_in < Duration::from_millis(5),
            "refused without waiting"
        );
        // Admitted when the first job ended, at 2 s, and answered in full 2 s later.
        assert_eq!(status, 200);
        assert_about(admitted_at, Duration::from_secs(2));
        assert_eq!(read_to_end(&mut b).await, (all_ok(&[3, 4]), None));
        assert!(start.elapsed() >= Duration::from_secs(4));

        // A deadline shorter than the wait bounds it: refused at the deadline.
        let mut c = Reader::new(h.post(&[6], "continue").await);
        let asked = Instant::now();
        let refused = h.post_query(&[7], "deadline_ms=500").await;
        assert_about(asked.elapsed(), Duration::from_millis(500));
        assert_eq!(retry_after(&refused), 2, "two jobs over 4 s");
        assert_eq!(read_to_end(&mut c).await, (all_ok(&[6]), None));

        no_job_open(&h).await;
        let stats = h.settled().await;
        assert_eq!(stats.pipeline.groups_refused, 2);
        assert_eq!(stats.pipeline.groups_waiting, 0);
        assert_eq!(stats.pipeline.groups_opened, 3);
        assert_eq!(h.upstream.report().calls, 5);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_job_past_its_deadline_ends_with_a_closing_line_and_its_work_stops() {
    bounded(async {
        let h = Harness::start(
            Config {
                upstream_in_flight: 1,
                job_window: 4,
                job_deadline: Duration::from_secs(60),
                ..open_config()
            },
            upstream(Duration::from_secs(1)),
        )
        .await;
        let inputs = inputs_of(0, 20);
        let start = Instant::now();
        let response = h.post_query(&inputs, "deadline_ms=4500").await;
        assert_eq!(response.status(), 200);
        let (lines, closing) = read_to_end(&mut Reader::new(response)).await;
        // One upstream call a second: four answered by 4.5 s, the fifth under way.
        assert_eq!(lines, all_ok(&inputs[..4]));
        assert_eq!(
            closing,
            Some(Line {
                error: Some("the job's deadline of 4500 ms passed before it finished".into()),
                abandoned: Some(16),
                ..Line::default()
            })
        );
        assert_about(start.elapsed(), Duration::from_millis(4_500));
        assert_eq!(h.upstream.report().calls, 5);

        // Its group was cancelled: the call under way dropped, the rest never made.
        sleep(Duration::from_secs(60)).await;
        assert_eq!(h.upstream.report().calls, 5, "no call after the deadline");
        let stats = h.settled().await;
        assert_eq!(stats.pipeline.groups_open, 0);
        assert_eq!(stats.pipeline.requests_done, 4);
        assert_eq!(stats.limits.in_flight, 0);
        assert_eq!(stats.lines.items, 4);
        assert_eq!(stats.server.jobs_deadline_exceeded, 1);
        assert_eq!(stats.pipeline.requests_pending, 0);

        // The service carries on.
        assert_eq!(h.job(&[7, 8], "continue").await, all_ok(&[7, 8]));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_configured_deadline_applies_and_caps_the_query() {
    bounded(async {
        let h = Harness::start(
            Config {
                upstream_in_flight: 1,
                job_deadline: Duration::from_millis(2_500),
                ..open_config()
            },
            upstream(Duration::from_secs(1)),
        )
        .await;
        let closing = Some(Line {
            error: Some("the job's deadline of 2500 ms passed before it finished".into()),
            abandoned: Some(8),
            ..Line::default()
        });
        for query in ["on_error=continue", "deadline_ms=100000"] {
            let start = Instant::now();
            let response = h.post_query(&inputs_of(0, 10), query).await;
            let (lines, end) = read_to_end(&mut Reader::new(response)).await;
            assert_eq!(lines.len(), 2, "{query}");
            assert_eq!(end, closing, "{query}");
            assert_about(start.elapsed(), Duration::from_millis(2_500));
        }
        // A job finished before its deadline has no closing line.
        assert_eq!(h.job(&[1, 2], "continue").await, all_ok(&[1, 2]));

        let refused = h.post_query(&[1], "deadline_ms=0").await;
        assert_eq!(refused.status(), 400);
        assert_eq!(
            refusal_line(refused).await,
            error_line("deadline_ms must be greater than zero")
        );
        assert_eq!(h.post_query(&[1], "deadline_ms=soon").await.status(), 400);
        let stats = h.settled().await;
        assert_eq!(stats.server.jobs_deadline_exceeded, 2);
        assert_eq!(stats.pipeline.groups_opened, 3);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_job_with_too_many_inputs_is_refused_up_front() {
    bounded(async {
        let h = Harness::start(
            Config {
                max_items_per_job: 10,
                ..open_config()
            },
            upstream(Duration::from_millis(5)),
        )
        .await;
        assert_refused_as_too_large(&h, 11, 10).await;
        // Nothing of it ran; a job at the limit runs in full.
        let stats = h.service.stats();
        assert_eq!(stats.pipeline.groups_opened, 0);
        assert_eq!(stats.server.jobs_too_large, 1);
        assert_eq!(h.upstream.report().calls, 0);
        let inputs = inputs_of(1, 10);
        assert_eq!(h.job(&inputs, "continue").await, all_ok(&inputs));

        // A body longer than any job allowed could be (24 bytes an input and 1 KiB) is
        // refused before it is parsed.
        let padded = format!("[1{}]", " ".repeat(10 * 24 + 1024));
        let response = h
            .client
            .post(h.url("/jobs"))
            .header("content-type", "application/json")
            .body(padded)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(h.service.stats().pipeline.groups_opened, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_bound_on_pending_inputs_sheds_by_inputs() {
    bounded(async {
        let h = Harness::start(
            Config {
                max_pending_inputs: 10,
                ..open_config()
            },
            upstream(Duration::from_secs(1)),
        )
        .await;
        // More inputs than the bound could ever hold: refused as too large.
        assert_refused_as_too_large(&h, 11, 10).await;

        let a = inputs_of(1, 8);
        let mut a_reader = Reader::new(h.post(&a, "continue").await);
        assert_eq!(h.service.stats().pipeline.requests_pending, 8);
        let refused = h.post(&inputs_of(2, 5), "continue").await;
        assert_eq!(retry_after(&refused), 1);
        assert_eq!(
            refusal_line(refused).await,
            error_line("the service is full (max_pending_inputs = 10): retry after 1 s")
        );
        // Two more fit.
        let c = inputs_of(3, 2);
        assert_eq!(h.job(&c, "continue").await, all_ok(&c));
        assert_eq!(read_to_end(&mut a_reader).await, (all_ok(&a), None));
        no_job_open(&h).await;
        assert_eq!(h.service.stats().pipeline.requests_pending, 0);
        let b = inputs_of(2, 5);
        assert_eq!(h.job(&b, "continue").await, all_ok(&b));
        assert_eq!(h.service.stats().pipeline.groups_refused, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn under_shedding_every_admitted_job_is_answered_exactly_once_in_order() {
    bounded(async {
        const CLIENTS: i64 = 40;
        const INPUTS: i64 = 25;
        let h = Harness::start(
            Config {
                max_open_jobs: 4,
                upstream_in_flight: 4,
                job_window: 8,
                ..open_config()
            },
            upstream(Duration::from_millis(10)),
        )
        .await;
        // Every client posts at once; a refused client comes back after `Retry-After`, until
        // its job is admitted.
        let clients = (0..CLIENTS).map(|c| {
            let h = &h;
            async move {
                let inputs = inputs_of(c, INPUTS);
                let mut refusals = 0u64;
                loop {
                    let response = h.post(&inputs, "continue").await;
                    if response.status() == 429 {
                        refusals += 1;
                        let after = retry_after(&response);
                        assert!((1..=30).contains(&after), "Retry-After {after}");
                        sleep(Duration::from_secs(after)).await;
                        continue;
                    }
                    assert_eq!(response.status(), 200);
                    let lines = read_to_end(&mut Reader::new(response)).await;
                    assert_eq!(lines, (all_ok(&inputs), None), "client {c}");
                    return refusals;
                }
            }
        });
        let refusals: u64 = join_all(clients).await.into_iter().sum();
        eprintln!("{refusals} refusals before every job was admitted");
        assert!(refusals >= (CLIENTS - 4) as u64, "the first wave was shed");

        // Exactly one job per client ran, and each input once: nothing lost or repeated.
        let stats = h.settled().await;
        assert_eq!(stats.pipeline.groups_refused, refusals);
        assert_eq!(stats.pipeline.groups_opened, CLIENTS as u64);
        assert_eq!(stats.pipeline.requests_done, (CLIENTS * INPUTS) as u64);
        assert_eq!(stats.lines.items, (CLIENTS * INPUTS) as u64);
        assert_eq!(h.upstream.report().calls, (CLIENTS * INPUTS) as u64);
        assert!(h.upstream.report().max_in_flight <= 4);
        assert_eq!(stats.pipeline.groups_open, 0);
        assert_eq!(stats.pipeline.requests_pending, 0);
    })
    .await;
}
