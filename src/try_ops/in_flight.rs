//! `try_in_flight` and `try_in_flight_ordered`: the `in_flight` engine over a fallible stream.
//!
//! An `Ok` item runs `f(value)` under a permit of the shared limit; an `Err` item becomes a
//! finished future that holds no permit and never calls `f`, queued at its place. A call that
//! returns `Err` reports a drop to an adaptive limit.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::TryStreamExt;
use futures::future::TryFuture;
use futures::stream::{FuturesOrdered, FuturesUnordered, IntoStream, TryStream};
use pin_project_lite::pin_project;

use crate::in_flight::{Core, ErrFails, InFlightLimit, Start, WithPermit};

pin_project! {
    /// An item's future: the user's call for an `Ok`, or the upstream `Err`, ready at once.
    #[project = TryFutProj]
    pub(crate) enum TryFut<Fut: TryFuture> {
        Call { #[pin] fut: Fut },
        Passed { out: Option<Result<Fut::Ok, Fut::Error>> },
    }
}

impl<Fut: TryFuture> std::future::Future for TryFut<Fut> {
    type Output = Result<Fut::Ok, Fut::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TryFutProj::Call { fut } => fut.try_poll(cx),
            TryFutProj::Passed { out } => {
                Poll::Ready(out.take().expect("TryFut polled after completion"))
            }
        }
    }
}

/// `Ok(value)` runs `f(value)` under a permit; `Err(e)` passes through without one.
pub(crate) struct TryStart<F>(F);

impl<T, E, F, Fut> Start<Result<T, E>> for TryStart<F>
where
    F: FnMut(T) -> Fut,
    Fut: TryFuture<Error = E>,
{
    type Fut = TryFut<Fut>;
    type Outcome = ErrFails;

    #[inline]
    fn needs_permit(&self, item: &Result<T, E>) -> bool {
        item.is_ok()
    }

    #[inline]
    fn start(&mut self, item: Result<T, E>) -> TryFut<Fut> {
        match item {
            Ok(value) => TryFut::Call {
                fut: (self.0)(value),
            },
            Err(e) => TryFut::Passed { out: Some(Err(e)) },
        }
    }
}

/// Defines a stream of the `try_in_flight` family (the in-flight [`Core`] over the upstream's
/// items as `Result`s, calling `f` for the `Ok` ones) whose futures run in a `$queue`.
macro_rules! try_in_flight_stream {
    ($(#[$doc:meta])* $name:ident, $queue:ident) => {
        pin_project! {
            $(#[$doc])*
            #[must_use = "streams do nothing unless polled"]
            pub struct $name<S: TryStream, F, Fut: TryFuture> {
                #[pin]
                core: Core<IntoStream<S>, TryStart<F>, $queue<WithPermit<TryFut<Fut>>>>,
            }
        }

        impl<S: TryStream, F, Fut: TryFuture> $name<S, F, Fut> {
            pub(crate) fn new(stream: S, limit: InFlightLimit, f: F) -> Self {
                let core = Core::new(stream.into_stream(), limit, TryStart(f));
                Self { core }
            }

            /// The limit this stream runs under.
            pub fn limit(&self) -> &InFlightLimit {
                self.core.limit()
            }

            delegate_access_inner!(pub core, S, (. .));
        }

        delegate_stream!(
            impl[S, F, Fut] $name<S, F, Fut>
            where [S: TryStream, F: FnMut(S::Ok) -> Fut, Fut: TryFuture<Error = S::Error>]
            => Result<Fut::Ok, S::Error>;
            Debug where [S: TryStream + fmt::Debug, Fut: TryFuture]
        );
    };
}

try_in_flight_stream!(
    /// Stream for the [`try_in_flight`](crate::TryPipelineExt::try_in_flight) method.
    TryInFlight,
    FuturesUnordered
);

try_in_flight_stream!(
    /// Stream for the [`try_in_flight_ordered`](crate::TryPipelineExt::try_in_flight_ordered)
    /// method.
    TryInFlightOrdered,
    FuturesOrdered
);
