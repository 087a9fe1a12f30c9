//! Handles are cheap shared `Clone + Send + Sync + 'static` values; streams built from `Send`
//! parts are `Send` (they can be consumed inside spawned tasks).

use futures::{Stream, stream};
use stagepipe::prelude::*;
use stagepipe::{GroupResults, Submitter};

fn shared_handle<T: Clone + Send + Sync + 'static>() {}
fn send<T: Send>(_: &T) {}
fn send_static_stream<S: Stream + Send + 'static>(_: &S) {}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Only;

struct Machine;

impl StateMachine for Machine {
    type Stage = Only;
    type Data = String;
    type Error = std::io::Error;
    fn start(&self) -> Only {
        Only
    }
    async fn run(&self, _: Only, data: String) -> Result<Next<Only, String>, std::io::Error> {
        Ok(Next::Done(data))
    }
}

#[test]
fn handles_are_shared_handles() {
    shared_handle::<WorkerPool>();
    shared_handle::<InFlightLimit>();
    shared_handle::<Stats>();
    shared_handle::<Pipeline<Machine>>();
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Submitter<Machine>>();
    send_sync::<ConfigError>();
    send_sync::<StageError<Machine>>();
    send_sync::<GroupRefused>();
    fn send_only<T: Send + 'static>() {}
    send_only::<GroupResults<Machine>>();
}

#[tokio::test]
async fn streams_from_send_parts_are_send() {
    let pool = WorkerPool::new(1);
    let s = stream::iter(0..3u32).fan_out_ordered(&pool, |x| async move { x });
    send_static_stream(&s);
    let s = stream::iter(0..3u32).fan_out(&pool, |x| async move { x });
    send_static_stream(&s);
    let s = stream::iter(0..3u32).in_flight(2, |x| async move { x });
    send_static_stream(&s);
    let s = stream::iter(0..3u32).with_stats(Stats::new("s"));
    send_static_stream(&s);
    let pipeline = Pipeline::builder(Machine).workers(1).build();
    let s = stream::iter(vec![String::new()]).through(&pipeline);
    send_static_stream(&s);
    let (tx, results) = pipeline.group().open();
    send(&tx.submit(String::new()));
    send_static_stream(&results);
    let admit = pipeline.group().admit(1, std::time::Duration::ZERO);
    send(&admit);
    let (_tx, results) = admit.await.unwrap();
    send_static_stream(&results);
}

#[tokio::test]
async fn new_operator_streams_from_send_parts_are_send() {
    let pool = WorkerPool::new(1);
    let ok = || stream::iter([Ok::<u32, String>(1), Err(String::from("e"))]);
    let f = |x: u32| async move { Ok::<u32, String>(x) };
    send_static_stream(&ok().try_fan_out_ordered(&pool, f));
    send_static_stream(&ok().try_fan_out(&pool, f));
    send_static_stream(&ok().try_in_flight(2, f));
    send_static_stream(&ok().try_in_flight_ordered(2, f));
    send_static_stream(&ok().try_batch(2, std::time::Duration::from_millis(1)));
    send_static_stream(&ok().try_with_stats(Stats::new("s")));
    send_static_stream(&stream::iter(0..3u32).in_flight_ordered(2, |x| async move { x }));
    send_static_stream(&stream::iter(0..3u32).fan_out_by_key(
        &pool,
        |x| x % 2,
        |x| async move { x },
    ));
}
