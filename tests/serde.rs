//! Feature `serde`: the snapshots of the figures as JSON, and back.

use std::time::Duration;

use futures::{StreamExt, stream};
use serde_json::{Value, json};
use stagepipe::prelude::*;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
enum Step {
    Parse,
    Double,
}

struct Machine;

impl StateMachine for Machine {
    type Stage = Step;
    type Data = i64;
    type Error = String;

    fn start(&self) -> Step {
        Step::Parse
    }

    async fn run(&self, stage: Step, n: i64) -> Result<Next<Step, i64>, String> {
        match stage {
            Step::Parse if n < 0 => Err("negative".into()),
            Step::Parse => Ok(Next::Stage(Step::Double, n)),
            Step::Double => {
                tokio::time::sleep(Duration::from_millis(n as u64)).await;
                Ok(Next::Done(n * 2))
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn pipeline_stats_as_json_name_their_stages_and_round_trip() {
    let pipeline = Pipeline::builder(Machine).workers(2).build();
    let out: Vec<_> = stream::iter([3, -1, 5]).through(&pipeline).collect().await;
    assert_eq!(out.len(), 3);
    let stats = pipeline.stats();
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["groups_opened"], 1);
    assert_eq!(json["groups_open"], 0);
    assert_eq!(json["requests_done"], 3);
    assert_eq!(json["requests_failed"], 1);
    // Stages: `[stage, figures]` pairs in the order of their first runs; durations as serde's
    // `{secs, nanos}`.
    assert_eq!(json["stages"][0][0], "Parse");
    assert_eq!(json["stages"][0][1]["runs"], 3);
    assert_eq!(json["stages"][0][1]["errors"], 1);
    assert_eq!(json["stages"][1][0], "Double");
    assert_eq!(
        json["stages"][1][1]["max"],
        json!({"secs": 0, "nanos": 5_000_000})
    );
    assert_eq!(
        json["stages"][1][1]["total"],
        json!({"secs": 0, "nanos": 8_000_000})
    );
    let back: PipelineStats<Step> = serde_json::from_value(json).unwrap();
    assert_eq!(back, stats);
}

#[tokio::test(start_paused = true)]
async fn stats_and_call_stats_snapshots_as_json_round_trip() {
    let stats = Stats::new("lines");
    let _: Vec<_> = stream::iter(0..4).with_stats(&stats).collect().await;
    let snapshot = stats.snapshot();
    let json = serde_json::to_value(&snapshot).unwrap();
    assert_eq!(json["name"], "lines");
    assert_eq!(json["items"], 4);
    assert!(json["upstream_wait"].is_object());
    let back: StatsSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back, snapshot);

    let call_stats = CallStats::new("upstream");
    let call = Call::new(|x: u32| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if x == 0 { Err("zero") } else { Ok(x) }
    })
    .stats(&call_stats);
    for x in [1, 0, 2] {
        let _ = call.run(x).await;
    }
    let snapshot = call_stats.snapshot();
    let json = serde_json::to_value(&snapshot).unwrap();
    let fields = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    for field in [
        "calls",
        "successes",
        "failures",
        "retries",
        "rejected",
        "p99",
        "limiter_wait",
    ] {
        assert!(
            fields(&json).iter().any(|f| f == field),
            "{field} in {json}"
        );
    }
    assert_eq!(
        (json["calls"].clone(), json["failures"].clone()),
        (json!(3), json!(1))
    );
    assert_eq!(json["max"], json!({"secs": 0, "nanos": 10_000_000}));
    let back: CallStatsSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back, snapshot);
}
