//! The synchronisation primitives of the code that hands work between threads: the worker pool,
//! fan-out's result channel, request groups and the pipeline's drain.
//!
//! Normally these are `std`'s types (and futures' `AtomicWaker`, tokio's `Notify`), re-exported
//! as they are: nothing is wrapped, so the code compiles to exactly what it would with `std`
//! imports. Built with `RUSTFLAGS="--cfg stagepipe_loom"` (`scripts/loom`), they are loom's, so
//! that loom's model checker runs that very code through every interleaving of its threads,
//! within a bound on preemptions (the models: `pool/loom_model.rs`, `fan_out/loom_model.rs`,
//! `staged/loom_model.rs`). The cfg is the crate's own rather than the usual `loom`, which
//! tokio reads too: it drops `tokio::net`, and the dev-dependencies built for the unit tests
//! would not compile.
//!
//! loom's threads take turns on one OS thread and switch only at loom's own operations, so a
//! primitive loom does not know (tokio's channel, say) runs as one indivisible step of the
//! model. That is sound for what it does, but loom does not see the ordering it gives to other
//! memory; where the modelled code relies on that ordering, the loom build wraps the primitive
//! so that loom sees it (see `Notify`).

#[cfg(not(stagepipe_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(stagepipe_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

/// `std`'s `Arc` and `Weak` either way: loom's `Arc` has neither `Weak` nor the unsized
/// coercion (`Arc<Chan<U>>` to `Weak<dyn Consumer>`) that the pool and the pipeline use. Its
/// reference counts are not modelled; what it points to is.
pub(crate) use std::sync::{Arc, Weak};

/// Atomic integers and flags.
pub(crate) mod atomic {
    #[cfg(not(stagepipe_loom))]
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    #[cfg(stagepipe_loom)]
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
}

/// The order of a Dekker-style pair of `SeqCst` accesses (each side writes its own atomic,
/// then reads the other's), for loom: call it between the write and the read on both sides.
///
/// In the C11 model every `SeqCst` operation takes its place in one total order, so one side
/// always sees the other's write, and the real build needs nothing here. loom, though, treats
/// `SeqCst` accesses as `AcqRel` (its README, "Unsupported features"), under which both sides
/// may miss each other's write: a false alarm. Under loom this is the `SeqCst` fence that
/// loom does model, so the model checks the pair with the order the real build has.
#[inline(always)]
pub(crate) fn seq_cst_pair() {
    #[cfg(stagepipe_loom)]
    loom::sync::atomic::fence(loom::sync::atomic::Ordering::SeqCst);
}

#[cfg(not(stagepipe_loom))]
pub(crate) use futures::task::AtomicWaker;

#[cfg(stagepipe_loom)]
pub(crate) use self::model::AtomicWaker;

#[cfg(not(stagepipe_loom))]
pub(crate) use tokio::sync::Notify;

#[cfg(stagepipe_loom)]
pub(crate) use self::model::Notify;

/// The `get`/`set`/`replace` and `with_borrow` accessors of `std`'s `LocalKey`, for loom's
/// (which has only `with`): import them with `#[cfg(stagepipe_loom)]`.
#[cfg(stagepipe_loom)]
pub(crate) use self::model::{LocalCell, LocalRefCell};

/// `std`'s `thread_local!` (with a `const` initialiser); under loom, loom's, whose values are
/// per model thread (loom's threads share one OS thread, so `std`'s would be shared by all of
/// them). Named apart from `thread_local`, which is also a built-in attribute.
macro_rules! sync_thread_local {
    ($($(#[$attr:meta])* static $name:ident: $t:ty = const { $init:expr };)+) => {
        $(
            #[cfg(not(stagepipe_loom))]
            ::std::thread_local! {
                $(#[$attr])*
                static $name: $t = const { $init };
            }

            #[cfg(stagepipe_loom)]
            ::loom::thread_local! {
                $(#[$attr])*
                static $name: $t = $init;
            }
        )+
    };
}

pub(crate) use sync_thread_local;

#[cfg(stagepipe_loom)]
mod model {
    use std::cell::{Cell, RefCell};
    use std::fmt;
    use std::task::Waker;

    use loom::thread::LocalKey;

    /// The contract of an `AtomicWaker` (a `wake` after a `register` wakes the registered
    /// waker, and orders what came before it), kept by a lock that loom sees: the same model
    /// as loom's own `AtomicWaker`, with the futures API the crate uses.
    #[derive(Default)]
    pub(crate) struct AtomicWaker {
        waker: loom::sync::Mutex<Option<Waker>>,
    }

    impl AtomicWaker {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        pub(crate) fn register(&self, waker: &Waker) {
            let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
            match &mut *slot {
                Some(old) if old.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            }
        }

        pub(crate) fn take(&self) -> Option<Waker> {
            self.waker.lock().unwrap_or_else(|e| e.into_inner()).take()
        }

        pub(crate) fn wake(&self) {
            if let Some(waker) = self.take() {
                waker.wake();
            }
        }
    }

    impl fmt::Debug for AtomicWaker {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("AtomicWaker")
        }
    }

    /// tokio's `Notify`, whose calls loom sees as ordered: `notified` reads the state that
    /// `notify_waiters` writes (an acquire load of tokio's, against its release or read-modify-
    /// write), which orders whatever the notifier did before it for a waiter that finds the
    /// notification already given. Each call holds a loom lock, so loom sees that order.
    #[derive(Default)]
    pub(crate) struct Notify {
        inner: tokio::sync::Notify,
        order: loom::sync::Mutex<()>,
    }

    impl Notify {
        pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
            let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.notified()
        }

        pub(crate) fn notify_waiters(&self) {
            let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.notify_waiters();
        }
    }

    /// `std`'s accessors of a `LocalKey<Cell<T>>`.
    pub(crate) trait LocalCell<T> {
        fn get(&'static self) -> T;
        fn set(&'static self, value: T);
        fn replace(&'static self, value: T) -> T;
    }

    impl<T: Copy + 'static> LocalCell<T> for LocalKey<Cell<T>> {
        fn get(&'static self) -> T {
            self.with(Cell::get)
        }

        fn set(&'static self, value: T) {
            self.with(|cell| cell.set(value));
        }

        fn replace(&'static self, value: T) -> T {
            self.with(|cell| cell.replace(value))
        }
    }

    /// `std`'s accessors of a `LocalKey<RefCell<T>>`.
    pub(crate) trait LocalRefCell<T> {
        fn replace(&'static self, value: T) -> T;
        fn with_borrow<R>(&'static self, f: impl FnOnce(&T) -> R) -> R;
        fn with_borrow_mut<R>(&'static self, f: impl FnOnce(&mut T) -> R) -> R;
    }

    impl<T: 'static> LocalRefCell<T> for LocalKey<RefCell<T>> {
        fn replace(&'static self, value: T) -> T {
            self.with(|cell| cell.replace(value))
        }

        fn with_borrow<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
            self.with(|cell| f(&cell.borrow()))
        }

        fn with_borrow_mut<R>(&'static self, f: impl FnOnce(&mut T) -> R) -> R {
            self.with(|cell| f(&mut cell.borrow_mut()))
        }
    }
}

/// Runs `f` under loom's model checker: every interleaving of its threads with at most
/// `LOOM_MAX_PREEMPTIONS` preemptions (2 unless the variable says otherwise).
#[cfg(all(test, stagepipe_loom))]
pub(crate) fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(2);
    builder.check(f);
}
