//! A template for a new staged pipeline: copy this file and fill in the parts marked `TODO`.
//!
//! ```text
//! cargo run --example skeleton
//! ```
//!
//! The shape: an enum of stages, a data type that travels through them, a machine whose `run`
//! does one stage and says where the request goes next, a `Pipeline` built once and shared
//! (clone it into every task that needs it), and request groups, one per caller or batch.

use futures::StreamExt;
use stagepipe::prelude::*;

/// TODO: one variant per stage.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Stage {
    Fetch,
    Transform,
    Store,
}

/// TODO: the data a request carries from stage to stage. It need not be `Clone`.
#[derive(Debug)]
struct Request {
    id: u64,
    payload: String,
}

/// TODO: your error type. Anything `Send + 'static`; a `std::error::Error` gives nicer messages.
#[derive(Debug)]
struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// TODO: the machine holds what every stage shares: clients, connection pools, config,
/// `RateLimiter`/`CircuitBreaker` handles. It is shared by all workers (`Send + Sync`).
struct Machine {
    suffix: String,
}

impl StateMachine for Machine {
    type Stage = Stage;
    type Data = Request;
    type Error = Error;

    fn start(&self) -> Stage {
        Stage::Fetch
    }

    async fn run(&self, stage: Stage, mut req: Request) -> Result<Next<Stage, Request>, Error> {
        match stage {
            Stage::Fetch => {
                // TODO: I/O goes here (await freely; a worker runs one request at a time, so
                // size `workers` for your I/O concurrency).
                req.payload = format!("item-{}", req.id);
                Ok(Next::Stage(Stage::Transform, req))
            }
            Stage::Transform => {
                // TODO: route by the data: return a different `Next::Stage` per case.
                if req.id % 10 == 9 {
                    return Err(Error(format!("request {} is not wanted", req.id)));
                }
                req.payload.push_str(&self.suffix);
                Ok(Next::Stage(Stage::Store, req))
            }
            Stage::Store => {
                // TODO: write the result somewhere, or hand it back to the caller.
                Ok(Next::Done(req))
            }
        }
    }
}

#[tokio::main]
async fn main() {
    // Build once; `.dag()` refuses routes back to a visited stage.
    let pipeline = Pipeline::builder(Machine {
        suffix: "-done".to_string(),
    })
    .workers(8)
    .dag()
    .build();

    // One group per caller: `.ordered()` for submission order, `.cancel_on_error()` to stop
    // at the first error (later submits get their data back in `GroupClosed`).
    let (tx, results) = pipeline.group().ordered().open();
    let submit = async move {
        for id in 0..20 {
            if let Err(GroupClosed(req)) = tx
                .submit(Request {
                    id,
                    payload: String::new(),
                })
                .await
            {
                eprintln!("not submitted: {req:?}");
                break;
            }
        }
        // Dropping `tx` ends `results` after the last result.
    };
    let read = results.for_each(|r| async move {
        match r {
            Ok(req) => println!("ok    {:>3} {}", req.id, req.payload),
            Err(e) => println!("error {e}"),
        }
    });
    tokio::join!(submit, read);

    // Or run a whole stream as one ordered group:
    let n = futures::stream::iter((100..105).map(|id| Request {
        id,
        payload: String::new(),
    }))
    .through(&pipeline)
    .filter(|r| futures::future::ready(r.is_ok()))
    .count()
    .await;
    println!("{n} of 5 through the pipeline");
    println!("{}", pipeline.stats());
}
