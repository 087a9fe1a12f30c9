//! `try_with_stats`: a [`with_stats`](crate::PipelineExt::with_stats) point that counts a
//! fallible stream's `Ok` items as items and its `Err` items as errors.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::TryStreamExt;
use futures::stream::{FusedStream, IntoStream, Stream, TryStream};
use pin_project_lite::pin_project;

use crate::stats::{Stats, WithStats};

pin_project! {
    /// Stream for the [`try_with_stats`](crate::TryPipelineExt::try_with_stats) method.
    #[must_use = "streams do nothing unless polled"]
    pub struct TryWithStats<S> {
        #[pin]
        point: WithStats<IntoStream<S>>,
    }
}

impl<S: TryStream> TryWithStats<S> {
    pub(crate) fn new(stream: S, stats: Stats) -> Self {
        Self {
            point: WithStats::new(stream.into_stream(), stats),
        }
    }

    /// The stats handle this stream records into.
    pub fn stats(&self) -> &Stats {
        self.point.stats()
    }

    delegate_access_inner!(pub point, S, (. .));
}

impl<S: TryStream> Stream for TryWithStats<S> {
    type Item = Result<S::Ok, S::Error>;

    #[inline]
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().point.poll_point(cx, Result::is_err)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.point.size_hint()
    }
}

impl<S: TryStream> FusedStream for TryWithStats<S> {
    fn is_terminated(&self) -> bool {
        self.point.is_terminated()
    }
}

impl_debug!(impl[S: fmt::Debug] TryWithStats<S> => TryWithStats |this| {
    stream: this.point.get_ref().get_ref(),
    stats: this.point.stats(),
} ..);
