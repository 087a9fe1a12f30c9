//! `GET /metrics` through `metrics-exporter-prometheus`: the library's metrics (the upstream
//! `Call`, its named breaker, the pipeline's stages, the `lines` written) and the service's own
//! (admitted, shed, deadline, open), with their HELP and TYPE lines and latency histograms.
//!
//! One test in a process of its own: the recorder is the process's, so the figures here are
//! exactly this test's.

mod common;

use std::time::Duration;

use common::{Harness, Reader, bounded, ok_line, open_config, read_to_end};
use stagepipe_service::app::Config;
use stagepipe_service::upstream::UpstreamConfig;

/// The value of the series `series` (name and labels) in `text`.
fn value(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn metrics_are_rendered_by_the_prometheus_exporter() {
    bounded(async {
        let h = Harness::start(
            Config {
                max_open_jobs: 1,
                upstream_in_flight: 2,
                ..open_config()
            },
            UpstreamConfig {
                latency: Duration::from_millis(20),
                ..UpstreamConfig::default()
            },
        )
        .await;
        let inputs: Vec<i64> = (0..10).collect();
        assert_eq!(h.job(&inputs, "continue").await.len(), 10);
        // One job open: the next is shed.
        let mut open = Reader::new(h.post(&[100], "continue").await);
        assert_eq!(h.post(&[200], "continue").await.status(), 429);
        assert_eq!(read_to_end(&mut open).await, (vec![ok_line(0, 100)], None));
        // Ten inputs two at a time, 20 ms each: the deadline ends the job at 50 ms.
        let response = h.post_query(&inputs, "deadline_ms=50").await;
        let (lines, closing) = read_to_end(&mut Reader::new(response)).await;
        assert_eq!(lines.len(), 4);
        assert_eq!(closing.unwrap().abandoned, Some(6));
        h.settled().await;

        let text = h.metrics().await;
        // The library's, under the names of `stagepipe::metrics`: the upstream call (named by
        // its `CallStats`), its breaker (named `upstream`), the stages, the lines written.
        let upstream = "{name=\"upstream\"}";
        assert!(text.contains("# TYPE stagepipe_call_calls_total counter\n"));
        assert!(text.contains("# HELP stagepipe_call_calls_total "));
        assert_eq!(
            value(&text, &format!("stagepipe_call_successes_total{upstream}")),
            15.0
        );
        assert_eq!(
            value(&text, &format!("stagepipe_circuit_breaker_state{upstream}")),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "stagepipe_stage_runs_total{name=\"stagepipe_service::app::Stage\",stage=\"Finish\"}"
            ),
            15.0
        );
        assert_eq!(
            value(&text, "stagepipe_stream_items_total{name=\"lines\"}"),
            15.0
        );
        // Latencies are histograms with the service's buckets. A call's latency includes
        // its wait for the in-flight limit: every item entered the call stage at once, so the
        // first two of each job took 20 ms, the next two 40 ms, and so on.
        assert!(text.contains("# TYPE stagepipe_call_latency_seconds histogram\n"));
        let bucket = |le: &str| {
            let series = format!("stagepipe_call_latency_seconds_bucket{{name=\"upstream\",le=\"{le}\"}}");
            value(&text, &series)
        };
        assert_eq!(bucket("0.01"), 0.0);
        assert_eq!(bucket("0.025"), 5.0, "two of the first job, one, two of the last");
        assert_eq!(bucket("0.05"), 9.0);
        assert_eq!(bucket("+Inf"), 15.0);
        assert_eq!(
            value(&text, &format!("stagepipe_call_latency_seconds_count{upstream}")),
            15.0
        );
        // Runs started include the six the deadline cancelled.
        assert_eq!(
            value(&text, &format!("stagepipe_call_calls_total{upstream}")),
            21.0
        );
        assert_eq!(
            value(&text, &format!("stagepipe_call_cancelled_total{upstream}")),
            6.0
        );

        // The service's own.
        assert!(text.contains("# TYPE stagepipe_service_jobs_shed_total counter\n"));
        assert!(text.contains(
            "# HELP stagepipe_service_jobs_shed_total Jobs refused with 429 Too Many Requests"
        ));
        assert_eq!(value(&text, "stagepipe_service_jobs_admitted_total"), 3.0);
        assert_eq!(value(&text, "stagepipe_service_jobs_shed_total"), 1.0);
        assert_eq!(value(&text, "stagepipe_service_jobs_too_large_total"), 0.0);
        assert_eq!(
            value(&text, "stagepipe_service_jobs_deadline_exceeded_total"),
            1.0
        );
        assert_eq!(value(&text, "stagepipe_service_jobs_open"), 0.0);
        assert_eq!(value(&text, "stagepipe_service_inputs_pending"), 0.0);
        assert_eq!(value(&text, "stagepipe_service_groups_opened_total"), 3.0);
        assert_eq!(value(&text, "stagepipe_service_groups_open"), 0.0);
        assert_eq!(value(&text, "stagepipe_service_upstream_in_flight"), 0.0);
        assert!(text.contains("# TYPE stagepipe_service_job_duration_seconds histogram\n"));
        assert_eq!(
            value(&text, "stagepipe_service_job_duration_seconds_count"),
            3.0
        );
        assert_eq!(
            value(&text, "stagepipe_service_admission_wait_seconds_count"),
            3.0
        );
        // The hand-written names of old are gone.
        assert!(!text.contains("stagepipe_groups_open "));
        assert!(!text.contains("stagepipe_stage_runs_total{stage="));
    })
    .await;
}
