//! End-to-end tests of the service example: one shared pipeline behind an axum HTTP API, many
//! clients at once, a flaky upstream behind it. Real sockets on 127.0.0.1, ephemeral ports.
//!
//! These run on the real clock, on a multi-threaded runtime: every wait is a poll for a
//! condition, bounded by a generous deadline, and the one timing figure (the rate toward the
//! upstream) is counted on the upstream's side with a tolerance of one burst. (The overload
//! tests, whose figures are timings, run on the paused clock instead.)

mod common;

use std::time::Duration;

use common::{
    Harness, Reader, bounded, closing_line, eventually, inputs_of, ok_line, open_config,
    read_to_end,
};
use stagepipe_service::app::{Config, Line, Stage};
use stagepipe_service::upstream::UpstreamConfig;
use tokio::time::{Instant, timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_each_get_exactly_their_own_results_in_order() {
    bounded(async {
        let h = Harness::start(
            open_config(),
            UpstreamConfig {
                latency: Duration::from_millis(1),
                ..UpstreamConfig::default()
            },
        )
        .await;
        let clients: Vec<_> = (0..50)
            .map(|c| {
                let inputs = inputs_of(c, 200);
                let h = &h;
                async move { (h.job(&inputs, "continue").await, inputs) }
            })
            .collect();
        let responses = futures::future::join_all(clients).await;
        for (lines, inputs) in &responses {
            let expected: Vec<Line> = inputs
                .iter()
                .enumerate()
                .map(|(i, x)| ok_line(i, *x))
                .collect();
            assert_eq!(lines, &expected);
        }

        let upstream = h.upstream_report().await;
        assert_eq!(upstream.calls, 50 * 200);
        assert_eq!(upstream.failures, 0);
        assert!(
            upstream.max_in_flight <= 8,
            "upstream saw {} concurrent calls, limit 8",
            upstream.max_in_flight
        );
        assert_eq!(
            upstream.max_in_flight, 8,
            "the limit, not the pool, bound the calls"
        );

        // `/stats` counts match what the clients received.
        let stats = h.settled().await;
        assert_eq!(stats.pipeline.groups_opened, 50);
        assert_eq!(stats.pipeline.requests_done, 10_000);
        assert_eq!(stats.pipeline.requests_failed, 0);
        assert_eq!(stats.lines.items, 10_000);
        assert_eq!(stats.lines.errors, 0);
        assert_eq!(stats.upstream.calls, 10_000);
        assert_eq!(stats.limits.attempts, 10_000);
        assert_eq!(stats.limits.breaker, "closed");
        let runs: Vec<(Stage, u64)> = stats
            .pipeline
            .stages
            .iter()
            .map(|(stage, s)| (*stage, s.runs))
            .collect();
        assert_eq!(
            runs,
            [
                (Stage::Parse, 10_000),
                (Stage::Call, 10_000),
                (Stage::Finish, 10_000)
            ]
        );

        let metrics = h.metrics().await;
        // The library's metrics and the service's own (tests/metrics.rs checks their values:
        // here other tests of this process add to them).
        for name in [
            "stagepipe_call_calls_total{name=\"upstream\"} ",
            "stagepipe_stage_runs_total{name=\"stagepipe_service::app::Stage\",stage=\"Call\"} ",
            "stagepipe_service_jobs_admitted_total ",
        ] {
            let value = metrics
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .unwrap_or_else(|| panic!("{name} in {metrics}"));
            assert!(value.parse::<f64>().unwrap() >= 50.0, "{name}{value}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_never_sees_more_than_the_rate() {
    bounded(async {
        const RATE: u64 = 100;
        const BURST: u64 = 10;
        let h = Harness::start(
            Config {
                rate_per_second: RATE as u32,
                burst: BURST as u32,
                ..open_config()
            },
            UpstreamConfig {
                latency: Duration::ZERO,
                window: Duration::from_secs(1),
                ..UpstreamConfig::default()
            },
        )
        .await;
        let start = Instant::now();
        let clients: Vec<_> = (0..5)
            .map(|c| {
                let inputs = inputs_of(c, 50);
                let h = &h;
                async move { (h.job(&inputs, "continue").await, inputs) }
            })
            .collect();
        for (lines, inputs) in futures::future::join_all(clients).await {
            assert_eq!(lines.len(), inputs.len());
            assert!(lines.iter().all(|l| l.output.is_some()));
        }
        // 250 calls at 100/s after a burst of 10 take at least 2.4 s: the limit was applied.
        assert!(start.elapsed() >= Duration::from_millis(2_300));

        let upstream = h.upstream_report().await;
        eprintln!("{upstream:?} in {:?}", start.elapsed());
        assert_eq!(upstream.calls, 250);
        // Any one-second window on the upstream's clock: at most what the quota allows
        // (RATE per second plus one burst), with a tolerance of one burst for socket jitter.
        assert!(
            upstream.max_per_window <= RATE + BURST + BURST,
            "upstream saw {} calls within one second; rate {RATE}/s, burst {BURST}",
            upstream.max_per_window
        );
        let stats = h.settled().await;
        assert_eq!(stats.limits.rate_per_second.round() as u64, RATE);
        assert_eq!(stats.limits.burst as u64, BURST);
        assert_eq!(stats.limits.attempts, 250);
        assert!(stats.upstream.limiter_wait > Duration::ZERO);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_upstream_every_item_ends_as_a_value_or_a_reported_error() {
    bounded(async {
        let h = Harness::start(
            Config {
                retry_attempts: 3,
                ..open_config()
            },
            UpstreamConfig {
                latency: Duration::from_millis(1),
                failure_rate: 0.3,
                ..UpstreamConfig::default()
            },
        )
        .await;
        let clients: Vec<_> = (0..10)
            .map(|c| {
                let inputs = inputs_of(c, 200);
                let h = &h;
                async move { (h.job(&inputs, "continue").await, inputs) }
            })
            .collect();
        let (mut ok, mut failed) = (0u64, 0u64);
        for (lines, inputs) in futures::future::join_all(clients).await {
            assert_eq!(lines.len(), inputs.len(), "none lost");
            for (i, (line, x)) in lines.iter().zip(&inputs).enumerate() {
                assert_eq!((line.index, line.input), (Some(i), Some(*x)));
                match (&line.output, &line.error) {
                    (Some(out), None) => {
                        assert_eq!(*out, 2 * x + 1);
                        ok += 1;
                    }
                    (None, Some(error)) => {
                        assert!(error.contains("503"), "a reported upstream error: {error}");
                        failed += 1;
                    }
                    _ => panic!("a line is a value or an error: {line:?}"),
                }
            }
        }
        eprintln!("{ok} ok, {failed} failed");
        assert_eq!(ok + failed, 2_000);
        // Three attempts each: about 0.3³ ≈ 2.7% of the items fail for good.
        assert!(ok > 1_800, "retries rescued most items: {ok} ok");

        let upstream = h.upstream_report().await;
        assert!(upstream.calls > 2_000, "failed calls were retried");
        let stats = h.settled().await;
        assert_eq!(stats.pipeline.requests_done, 2_000);
        assert_eq!(stats.pipeline.requests_failed, failed);
        assert_eq!(stats.lines.items, ok);
        assert_eq!(stats.lines.errors, failed);
        assert_eq!(stats.upstream.calls, 2_000);
        assert_eq!(stats.upstream.failures, failed);
        assert_eq!(stats.limits.attempts, upstream.calls);
        assert_eq!(stats.limits.failed_attempts, upstream.failures);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_cancel_ends_the_job_at_its_first_error() {
    bounded(async {
        let h = Harness::start(open_config(), UpstreamConfig::default()).await;
        let mut inputs: Vec<i64> = (0..50).collect();
        inputs[20] = -1;

        let lines = h.job(&inputs, "cancel").await;
        assert_eq!(lines.len(), 21);
        for (i, line) in lines[..20].iter().enumerate() {
            assert_eq!(line, &ok_line(i, i as i64));
        }
        assert_eq!(lines[20].index, Some(20));
        assert_eq!(lines[20].input, Some(-1));
        assert_eq!(lines[20].error.as_deref(), Some("Parse: negative input"));

        let lines = h.job(&inputs, "continue").await;
        assert_eq!(lines.len(), 50);
        assert!(lines[20].error.is_some());
        assert_eq!(lines[49], ok_line(49, 49));

        // The default is to carry on; an unknown policy is refused.
        let response = h
            .client
            .post(h.url("/jobs"))
            .header("content-type", "application/json")
            .body("[1, -2, 3]")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut reader = Reader::new(response);
        let mut n = 0;
        while reader.next().await.unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        assert_eq!(h.post(&[1], "sometimes").await.status(), 400);

        let stats = h.settled().await;
        assert_eq!(stats.pipeline.groups_opened, 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_when_the_upstream_is_down_and_recovers_when_it_is_back() {
    bounded(async {
        const THRESHOLD: u32 = 5;
        let h = Harness::start(
            Config {
                workers: 8,
                upstream_in_flight: 4,
                breaker_threshold: THRESHOLD,
                breaker_open_for: Duration::from_millis(200),
                retry_attempts: 2,
                ..open_config()
            },
            UpstreamConfig::default(),
        )
        .await;
        assert_eq!(h.job(&[1, 2, 3], "continue").await.len(), 3);
        let before = h.upstream_report().await.calls;

        h.set_upstream_down(true).await;
        let inputs = inputs_of(1, 100);
        let lines = h.job(&inputs, "continue").await;
        assert_eq!(lines.len(), 100);
        assert!(lines.iter().all(|l| l.error.is_some()), "every item failed");
        let open = lines
            .iter()
            .filter(|l| {
                l.error
                    .as_deref()
                    .is_some_and(|e| e.contains("circuit open"))
            })
            .count();
        assert!(open >= 50, "the open breaker refused most items: {open}");
        let stats = h.stats().await;
        assert_ne!(stats.limits.breaker, "closed");
        assert_eq!(stats.upstream.rejected, open as u64);
        // While open, the upstream is spared: it saw the calls that were already past the
        // breaker when it opened (at most one per worker) and a trial or two, not 100 items ×
        // 2 attempts.
        let seen_down = h.upstream_report().await.calls - before;
        eprintln!("{stats:?}; upstream saw {seen_down} calls while down");
        assert!(
            seen_down < 50,
            "the upstream saw {seen_down} calls while down"
        );

        h.set_upstream_down(false).await;
        // After `open_for`, a trial call goes through and closes the breaker.
        eventually("the breaker to recover", || async {
            let lines = h.job(&[7], "continue").await;
            lines[0].output == Some(15)
        })
        .await;
        assert_eq!(h.stats().await.limits.breaker, "closed");
        let inputs = inputs_of(2, 50);
        let lines = h.job(&inputs, "continue").await;
        let expected: Vec<Line> = inputs
            .iter()
            .enumerate()
            .map(|(i, x)| ok_line(i, *x))
            .collect();
        assert_eq!(lines, expected);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnecting_client_frees_its_share() {
    bounded(async {
        let h = Harness::start(
            Config {
                upstream_in_flight: 4,
                ..open_config()
            },
            UpstreamConfig {
                latency: Duration::from_millis(20),
                ..UpstreamConfig::default()
            },
        )
        .await;
        let inputs = inputs_of(0, 200);
        let mut reader = Reader::new(h.post(&inputs, "continue").await);
        for (i, x) in inputs.iter().enumerate().take(3) {
            assert_eq!(reader.next().await.unwrap(), Some(ok_line(i, *x)));
        }
        let stats = h.stats().await;
        assert_eq!(stats.pipeline.groups_open, 1);
        drop(reader); // the client goes away mid-stream

        // Its group is cancelled: pool, in-flight limit and responses all back to zero, and
        // most of its 200 items never ran.
        let stats = h.settled().await;
        eprintln!("{stats:?}");
        assert!(
            stats.pipeline.requests_done < 100,
            "the group's remaining items were cancelled, {} ran",
            stats.pipeline.requests_done
        );
        let upstream = h.upstream_report().await;
        assert_eq!(upstream.in_flight, 0);
        assert!(upstream.calls < 100);

        // The service carries on serving others.
        let inputs = inputs_of(1, 20);
        let lines = h.job(&inputs, "continue").await;
        assert_eq!(lines.len(), 20);
        assert!(lines.iter().all(|l| l.output.is_some()));
    })
    .await;
}

/// A service for the shutdown tests: jobs with a window of 4, `upstream_in_flight` calls at
/// once to an upstream that takes 5 ms a call.
async fn shutdown_harness(upstream_in_flight: usize) -> Harness {
    Harness::start(
        Config {
            upstream_in_flight,
            job_window: 4,
            ..open_config()
        },
        UpstreamConfig {
            latency: Duration::from_millis(5),
            ..UpstreamConfig::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_jobs_then_the_server_exits() {
    bounded(async {
        let mut h = shutdown_harness(2).await;
        // 2 × 1,000 calls, 2 at a time: ≥ 5 s of upstream work, far beyond what a job has
        // submitted (its window of 4) when the shutdown begins.
        let a = inputs_of(0, 1_000);
        let b = inputs_of(1, 1_000);
        let mut readers = [
            Reader::new(h.post(&a, "continue").await),
            Reader::new(h.post(&b, "continue").await),
        ];
        for (reader, inputs) in readers.iter_mut().zip([&a, &b]) {
            assert_eq!(reader.next().await.unwrap(), Some(ok_line(0, inputs[0])));
        }
        // Two upstream calls in flight: two requests running, beyond the lines read.
        eventually("two upstream calls in flight", || async {
            h.service.stats().limits.in_flight == 2
        })
        .await;

        h.begin_shutdown();
        // Every request submitted before the shutdown completes and its line is delivered, in
        // order; then the response ends with a closing line counting the rest.
        let mut done = 2; // the first line of each, read before the shutdown
        for (reader, inputs) in readers.iter_mut().zip([&a, &b]) {
            let (lines, closing) = read_to_end(reader).await;
            let expected: Vec<Line> = (1..=lines.len()).map(|i| ok_line(i, inputs[i])).collect();
            assert_eq!(lines, expected);
            // A job cut short: its inputs not yet submitted were abandoned, and counted.
            assert_eq!(closing, Some(closing_line(inputs.len() - 1 - lines.len())));
            done += lines.len();
        }
        eprintln!("{done} results delivered");
        // The 2 lines read and at least the 2 requests whose upstream calls were in flight.
        assert!(done >= 4, "{done} results");
        drop(readers);

        // Then the server exits, and refuses new connections.
        h.server_exit().await.unwrap();
        assert!(h.client.get(h.url("/stats")).send().await.is_err());
        // The abandoned inputs never ran: the pipeline and the upstream saw exactly the
        // delivered ones.
        let stats = h.service.stats();
        assert_eq!(stats.pipeline.groups_open, 0);
        assert_eq!(stats.pipeline.requests_done, done as u64);
        assert_eq!(stats.lines.items, done as u64);
        assert_eq!(h.upstream.report().calls, done as u64);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_posted_once_the_shutdown_began_is_refused() {
    bounded(async {
        let h = shutdown_harness(1).await;
        let inputs = inputs_of(0, 1_000);
        let mut reader = Reader::new(h.post(&inputs, "continue").await);
        assert_eq!(reader.next().await.unwrap(), Some(ok_line(0, inputs[0])));

        // The jobs' shutdown, without the server's: the listener still accepts connections.
        let shutdown = h.service.shutdown();
        let response = h.post(&[1, 2, 3], "continue").await;
        assert_eq!(response.status(), 503);
        let refused: Line = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(
            refused,
            Line {
                error: Some("the server is shutting down: no new jobs".to_string()),
                ..Line::default()
            }
        );

        // The open job ends with what it had submitted; then the shutdown resolves, in time.
        let (lines, closing) = read_to_end(&mut reader).await;
        let expected: Vec<Line> = (1..=lines.len()).map(|i| ok_line(i, inputs[i])).collect();
        assert_eq!(lines, expected);
        assert_eq!(closing, Some(closing_line(inputs.len() - 1 - lines.len())));
        assert!(
            timeout(Duration::from_secs(20), shutdown).await.unwrap(),
            "every job ended before the deadline"
        );
        let stats = h.settled().await;
        assert_eq!(
            stats.pipeline.groups_opened, 1,
            "the refused job opened no group"
        );
        assert_eq!(stats.pipeline.requests_done, 1 + lines.len() as u64);
        assert_eq!(stats.pipeline.groups_open, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_ends_open_jobs_with_a_closing_line() {
    bounded(async {
        let mut h = Harness::start(
            Config {
                upstream_in_flight: 1,
                shutdown_deadline: Duration::from_millis(300),
                ..open_config()
            },
            UpstreamConfig {
                latency: Duration::from_millis(50),
                ..UpstreamConfig::default()
            },
        )
        .await;
        let inputs = inputs_of(0, 100); // ≥ 5 s of upstream calls, one at a time
        let mut reader = Reader::new(h.post(&inputs, "continue").await);
        let mut lines = vec![reader.next().await.unwrap().unwrap()];

        h.begin_shutdown();
        while let Some(line) = reader.next().await.expect("a clean end, every line whole") {
            lines.push(line);
        }
        let (last, results) = lines.split_last().unwrap();
        assert!(last.error.is_some());
        let abandoned = last.abandoned.expect("a closing line");
        eprintln!("{} results, {abandoned} abandoned", results.len());
        assert!(abandoned > 0);
        assert_eq!(results.len() + abandoned, inputs.len());
        for (i, line) in results.iter().enumerate() {
            assert_eq!(line, &ok_line(i, inputs[i]));
        }

        h.server_exit().await.unwrap();
        // The ended group was cancelled: nothing left running.
        eventually("the cancelled group to drain", || async {
            let s = h.service.stats();
            s.pipeline.groups_open == 0 && s.stage_runs_running == 0 && s.limits.in_flight == 0
        })
        .await;
        assert!(h.service.stats().pipeline.requests_done < inputs.len() as u64);
    })
    .await;
}
