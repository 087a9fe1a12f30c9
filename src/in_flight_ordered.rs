//! `in_flight_ordered`: the [`in_flight`](crate::PipelineExt::in_flight) engine with a queue
//! that yields in input order.
//!
//! The futures run in a [`FuturesOrdered`] owned by the stream, each holding a permit of the
//! shared [`InFlightLimit`] while it runs. A finished future gives its permit back at once and
//! waits in the queue for the earlier ones; the queue (running plus finished) never holds more
//! than the limit's [`limit`](InFlightLimit::limit), as `buffered(n)` never holds more than `n`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{FusedStream, FuturesOrdered, Stream};
use pin_project_lite::pin_project;

use crate::in_flight::{Core, InFlightLimit, Plain, WithPermit, in_flight_accessors};

pin_project! {
    /// Stream for the [`in_flight_ordered`](crate::PipelineExt::in_flight_ordered) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct InFlightOrdered<S: Stream, F, Fut: Future> {
        #[pin]
        core: Core<S, Plain<F>, FuturesOrdered<WithPermit<Fut>>>,
    }
}

impl<S: Stream, F, Fut: Future> InFlightOrdered<S, F, Fut> {
    pub(crate) fn new(stream: S, limit: InFlightLimit, f: F) -> Self {
        Self {
            core: Core::new(stream, limit, Plain(f)),
        }
    }

    in_flight_accessors!();
}

impl<S, F, Fut> Stream for InFlightOrdered<S, F, Fut>
where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: Future,
{
    type Item = Fut::Output;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().core.poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.core.size_hint()
    }
}

impl<S, F, Fut> FusedStream for InFlightOrdered<S, F, Fut>
where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: Future,
{
    fn is_terminated(&self) -> bool {
        self.core.is_terminated()
    }
}

impl<S: Stream + fmt::Debug, F, Fut: Future> fmt::Debug for InFlightOrdered<S, F, Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.core.fmt_fields("InFlightOrdered", f)
    }
}
