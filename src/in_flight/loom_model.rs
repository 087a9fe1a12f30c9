//! loom models of a fixed limit's spare units (`scripts/loom`): a unit given back without the
//! semaphore's lock while a holder starts to wait in the semaphore's queue, or while another
//! holder takes it. The property: no unit is lost or made up, and once the threads are done,
//! no unit is left among the spare ones while someone waits (it is in the semaphore, where the
//! waiter's acquire finds it).

use loom::thread;

use super::*;

/// Counts a waiter as one about to wait in the semaphore's queue does, and keeps it counted.
fn start_waiting(limit: &InFlightLimit) {
    std::mem::forget(limit.spare.wait(&limit.semaphore));
}

/// Once the threads are done: no unit left spare, `permits` in the semaphore.
fn assert_settled(limit: &InFlightLimit, permits: usize) {
    let spare = limit.spare.units();
    assert_eq!(spare, 0, "a unit left spare while someone waits");
    assert_eq!(limit.semaphore.available_permits(), permits);
}

/// A fixed limit of `n` with every unit taken (without permits, as `try_take_fixed` takes
/// them).
fn all_taken(n: usize) -> Arc<InFlightLimit> {
    let limit = Arc::new(InFlightLimit::new(n));
    for _ in 0..n {
        assert!(limit.try_take_fixed());
    }
    limit
}

#[test]
fn loom_in_flight_unit_given_back_while_a_holder_starts_to_wait() {
    loom::model(|| {
        let limit = all_taken(1);
        let holder = {
            let limit = limit.clone();
            thread::spawn(move || limit.give_back())
        };
        let waiter = {
            let limit = limit.clone();
            thread::spawn(move || start_waiting(&limit))
        };
        holder.join().unwrap();
        waiter.join().unwrap();
        assert_settled(&limit, 1);
    });
}

#[test]
fn loom_in_flight_two_units_given_back_while_a_holder_starts_to_wait() {
    loom::model(|| {
        let limit = all_taken(2);
        let holders: Vec<_> = (0..2)
            .map(|_| {
                let limit = limit.clone();
                thread::spawn(move || limit.give_back())
            })
            .collect();
        start_waiting(&limit);
        for holder in holders {
            holder.join().unwrap();
        }
        assert_settled(&limit, 2);
    });
}

#[test]
fn loom_in_flight_spare_unit_taken_while_a_holder_starts_to_wait() {
    loom::model(|| {
        // One unit, given back while nobody waited: it is spare.
        let limit = all_taken(1);
        limit.give_back();
        assert_eq!(limit.spare.units(), 1);
        let taker = {
            let limit = limit.clone();
            thread::spawn(move || limit.try_take_fixed())
        };
        start_waiting(&limit);
        let took = taker.join().unwrap();
        // The unit is taken (before the waiter counted itself) or waits in the semaphore for
        // the waiter; never both, never neither.
        let left = limit.spare.units() + limit.semaphore.available_permits();
        assert_eq!(usize::from(took) + left, 1);
        assert_settled(&limit, 1 - usize::from(took));
    });
}
