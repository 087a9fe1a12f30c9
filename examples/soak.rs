//! Soak run: many requests through one staged pipeline by 100 request groups at once, a third
//! ordered, a third `cancel_on_error` with injected failures, a third dropped at random points.
//! It samples the resident memory every 100 ms and prints it each second with the runtime's
//! live tasks and the throughput; at
//! the end it checks that every ordered group got all its results in order, that every
//! cancelled group stopped at its error, that the live tasks are back to the baseline and no
//! group is left open, and (for long runs) that memory stayed flat after warm-up.
//!
//! ```text
//! cargo run --release --example soak                          # 10M requests
//! cargo run --example soak -- --requests 100000               # the short run CI does
//! cargo run --release --example soak -- --requests 1000000 --groups 100 --group-size 1000
//! ```
//!
//! Exits with status 1 (after printing why) if a check fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use stagepipe::prelude::*;
use tokio::runtime::Handle;
use tokio::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Stage {
    Parse,
    Work,
    Store,
}

/// A request: its number, and whether it fails in `Work`.
struct Req {
    id: u64,
    fail: bool,
}

/// Three light stages; every 256th request yields in `Work`, every 4096th sleeps 1 ms, so the
/// pool sees both instant and waiting requests.
struct Soak;

impl StateMachine for Soak {
    type Stage = Stage;
    type Data = Req;
    type Error = String;

    fn start(&self) -> Stage {
        Stage::Parse
    }

    async fn run(&self, stage: Stage, req: Req) -> Result<Next<Stage, Req>, String> {
        match stage {
            Stage::Parse => Ok(Next::Stage(Stage::Work, req)),
            Stage::Work => {
                if req.id % 4096 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else if req.id % 256 == 0 {
                    tokio::task::yield_now().await;
                }
                if req.fail {
                    return Err(format!("request {} failed", req.id));
                }
                Ok(Next::Stage(Stage::Store, req))
            }
            Stage::Store => Ok(Next::Done(req)),
        }
    }
}

struct Args {
    requests: u64,
    groups: u64,
    group_size: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        requests: 10_000_000,
        groups: 100,
        group_size: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = |it: &mut dyn Iterator<Item = String>| -> u64 {
            let v = it.next().unwrap_or_default();
            match v.parse() {
                Ok(n) if n > 0 => n,
                _ => fail(&format!("{flag} needs a positive number, got {v:?}")),
            }
        };
        match flag.as_str() {
            "--requests" => args.requests = value(&mut it),
            "--groups" => args.groups = value(&mut it),
            "--group-size" => args.group_size = value(&mut it),
            _ => fail(&format!(
                "unknown argument {flag:?}; use --requests N --groups G --group-size K"
            )),
        }
    }
    args
}

fn fail(why: &str) -> ! {
    eprintln!("soak: FAILED: {why}");
    std::process::exit(1)
}

/// Resident memory in MiB, from /proc (0 where there is no /proc).
fn rss_mib() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    (pages * 4096) as f64 / (1024.0 * 1024.0)
}

/// Takes up to `n` requests from the shared budget: the first id and how many.
fn take(next_id: &AtomicU64, total: u64, n: u64) -> Option<(u64, u64)> {
    let first = next_id.fetch_add(n, Ordering::Relaxed);
    (first < total).then(|| (first, n.min(total - first)))
}

/// How one group ended, for the totals.
#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
    abandoned: AtomicU64,
}

/// An ordered group: every result, in submission order.
async fn ordered(pipeline: &Pipeline<Soak>, first: u64, n: u64, tally: &Tally) {
    let (tx, results) = pipeline.group().ordered().open();
    let submit = async move {
        for id in first..first + n {
            if tx.submit(Req { id, fail: false }).await.is_err() {
                fail("an ordered group refused a submission");
            }
        }
    };
    let (_, results) = tokio::join!(submit, results.collect::<Vec<_>>());
    let ids: Vec<u64> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| fail(&format!("ordered group: {e}")))
                .id
        })
        .collect();
    if ids != (first..first + n).collect::<Vec<_>>() {
        fail("an ordered group's results are missing, duplicated or out of order");
    }
    tally.done.fetch_add(n, Ordering::Relaxed);
}

/// A `cancel_on_error` group with one failing request: results up to its error, then the end.
async fn cancelled(pipeline: &Pipeline<Soak>, first: u64, n: u64, bad: u64, tally: &Tally) {
    let (tx, results) = pipeline.group().cancel_on_error().open();
    let submit = async move {
        for id in first..first + n {
            let req = Req {
                id,
                fail: id == bad,
            };
            if tx.submit(req).await.is_err() {
                break; // cancelled: the group ended at its error
            }
        }
    };
    let (_, results) = tokio::join!(submit, results.collect::<Vec<_>>());
    let errors = results.iter().filter(|r| r.is_err()).count();
    let last_is_error = results.last().is_some_and(|r| r.is_err());
    if errors != 1 || !last_is_error {
        fail(&format!(
            "a cancel_on_error group ended with {errors} errors, last one an error: {last_is_error}"
        ));
    }
    let mut ids: Vec<u64> = results.iter().flatten().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != results.len() - 1 || ids.contains(&bad) {
        fail("a cancel_on_error group yielded a duplicate or the failed request");
    }
    tally.done.fetch_add(ids.len() as u64, Ordering::Relaxed);
    tally.failed.fetch_add(1, Ordering::Relaxed);
}

/// An unordered group whose caller goes away after `read` results: submitter and results
/// dropped mid-flight.
async fn dropped(pipeline: &Pipeline<Soak>, first: u64, n: u64, read: u64, tally: &Tally) {
    let (tx, mut results) = pipeline.group().open();
    let submit = async {
        for id in first..first + n {
            if tx.submit(Req { id, fail: false }).await.is_err() {
                break;
            }
        }
    };
    let read_some = async {
        for _ in 0..read {
            if results.next().await.is_none() {
                break;
            }
        }
    };
    // The caller leaves as soon as it has read its share, whether or not all were submitted.
    tokio::select! {
        biased;
        () = read_some => {}
        () = async { submit.await; std::future::pending::<()>().await } => {}
    }
    drop(results);
    tally.done.fetch_add(read, Ordering::Relaxed);
    tally.abandoned.fetch_add(1, Ordering::Relaxed);
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(soak(args));
}

async fn soak(args: Args) {
    let pipeline = Pipeline::builder(Soak).build();
    // Start the pool's workers, then take the baseline.
    let warm: Vec<_> = futures::stream::iter([Req { id: 0, fail: false }])
        .through(&pipeline)
        .collect()
        .await;
    assert_eq!(warm.len(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let baseline_tasks = Handle::current().metrics().num_alive_tasks();
    let start_rss = rss_mib();
    println!(
        "soak: {} requests, {} groups at once ({} per group), {} pool workers; \
         baseline {baseline_tasks} tasks, {start_rss:.1} MiB",
        args.requests,
        args.groups,
        args.group_size,
        pipeline.pool().workers()
    );

    let next_id = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Tally::default());
    let total = args.requests;
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..args.groups {
        let (pipeline, next_id, tally) = (pipeline.clone(), next_id.clone(), tally.clone());
        let size = args.group_size;
        callers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(caller);
            while let Some((first, n)) = take(&next_id, total, size) {
                match caller % 3 {
                    0 => ordered(&pipeline, first, n, &tally).await,
                    1 => {
                        let bad = first + rng.u64(0..n);
                        cancelled(&pipeline, first, n, bad, &tally).await;
                    }
                    _ => dropped(&pipeline, first, n, rng.u64(0..=n), &tally).await,
                }
            }
        });
    }

    // Memory is judged on the samples after the first fifth of the run.
    let started = Instant::now();
    let mut samples: Vec<(u64, f64)> = Vec::new();
    // Memory is sampled every 100 ms (a run of 10M takes seconds); a line is printed each second.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.tick().await;
    let mut last_taken = 0;
    loop {
        tokio::select! {
            joined = callers.join_next() => match joined {
                Some(Ok(())) => continue,
                Some(Err(e)) => fail(&format!("a caller panicked: {e}")),
                None => break,
            },
            _ = tick.tick() => {
                let taken = next_id.load(Ordering::Relaxed).min(total);
                let rss = rss_mib();
                samples.push((taken, rss));
                if samples.len() % 10 != 0 {
                    continue;
                }
                println!(
                    "{:>5.0} s  {:>9} requests taken  {:>8.0} req/s  rss {rss:>7.1} MiB  tasks {}",
                    started.elapsed().as_secs_f64(),
                    taken,
                    (taken - last_taken) as f64,
                    Handle::current().metrics().num_alive_tasks()
                );
                last_taken = taken;
            }
        }
    }
    let elapsed = started.elapsed();

    // Dropped groups' requests may still be winding down: give the pool a moment.
    let mut tasks = Handle::current().metrics().num_alive_tasks();
    let mut open = pipeline.stats().groups_open;
    for _ in 0..100 {
        if tasks <= baseline_tasks && open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        tasks = Handle::current().metrics().num_alive_tasks();
        open = pipeline.stats().groups_open;
    }
    let stats = pipeline.stats();
    let end_rss = rss_mib();
    println!(
        "soak: {} requests in {:.1} s ({:.0}/s): {} results read, {} groups stopped at an error, \
         {} groups dropped; {} groups opened, {open} open; tasks {tasks} (baseline \
         {baseline_tasks}); rss {end_rss:.1} MiB",
        total,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        tally.done.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.abandoned.load(Ordering::Relaxed),
        stats.groups_opened,
    );
    if tasks > baseline_tasks {
        fail(&format!(
            "{tasks} live tasks at the end, {baseline_tasks} at the start"
        ));
    }
    if open != 0 {
        fail(&format!("{open} groups still open at the end"));
    }
    // Flat after warm-up: no sample after the first fifth of the run more than 25% (and 8 MiB)
    // above the highest sample of the first fifth. Only judged with at least 10 samples (a run
    // of a second or more).
    if samples.len() >= 10 {
        let warm = samples.len() / 5;
        let warm_max = samples[..warm].iter().map(|s| s.1).fold(0.0, f64::max);
        let later_max = samples[warm..].iter().map(|s| s.1).fold(0.0, f64::max);
        println!("soak: rss after warm-up {warm_max:.1} MiB, highest later {later_max:.1} MiB");
        if later_max > warm_max * 1.25 && later_max > warm_max + 8.0 {
            fail("memory grew after warm-up");
        }
    }
    println!("soak: OK");
}
