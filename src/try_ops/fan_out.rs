//! `try_fan_out_ordered` and `try_fan_out`: the fan-out core over a fallible stream.
//!
//! Only `Ok` values reach the core (and so the user's closure and the pool). An upstream `Err`
//! is kept in the consumer with its place: the number of `Ok` values that came before it. In
//! input order it is yielded once exactly that many results have been yielded; in completion
//! order, at once. So an error never occupies a worker or a slot of the pool's window. The
//! errors waiting for their place are bounded by the window too: upstream is not pulled while
//! that many wait.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::TryFutureExt;
use futures::future::TryFuture;
use futures::stream::{FusedStream, Stream, TryStream};
use pin_project_lite::pin_project;

use crate::fan_out::Core;
use crate::macros::size_hint_plus;
use crate::pool::WorkerPool;

/// The upstream stream's `Ok` values, for the core; errors are set aside with their place.
struct Oks<'a, S: TryStream> {
    stream: Pin<&'a mut S>,
    errors: &'a mut VecDeque<(u64, S::Error)>,
    /// `Ok` values handed to the core so far.
    submitted: &'a mut u64,
    max_errors: usize,
}

impl<S: TryStream> Stream for Oks<'_, S> {
    type Item = S::Ok;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Ok>> {
        let this = self.get_mut();
        loop {
            // Errors waiting for their place are bounded: the consumer yields them, then pulls
            // again (it is polled again after every item it yields).
            if this.errors.len() >= this.max_errors {
                return Poll::Pending;
            }
            match this.stream.as_mut().try_poll_next(cx) {
                Poll::Ready(Some(Ok(value))) => {
                    *this.submitted += 1;
                    return Poll::Ready(Some(value));
                }
                Poll::Ready(Some(Err(e))) => this.errors.push_back((*this.submitted, e)),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

macro_rules! try_fan_out_stream {
    ($(#[$doc:meta])* $name:ident, $ordered:expr) => {
        pin_project! {
            $(#[$doc])*
            #[must_use = "streams do nothing unless polled"]
            pub struct $name<S: TryStream, F, U> {
                #[pin]
                stream: S,
                f: F,
                core: Core<Result<U, S::Error>>,
                // Upstream errors with their place: the number of `Ok` values before them.
                errors: VecDeque<(u64, S::Error)>,
                // A result that comes after an error due first (input order).
                held: Option<Result<U, S::Error>>,
                submitted: u64,
                // `Ok` results yielded so far.
                yielded: u64,
            }
        }

        impl<S, F, U> $name<S, F, U>
        where
            S: TryStream,
            S::Error: Send + 'static,
            U: Send + 'static,
        {
            pub(crate) fn new(stream: S, pool: WorkerPool, f: F) -> Self {
                Self {
                    stream,
                    f,
                    core: Core::new(pool, $ordered),
                    errors: VecDeque::new(),
                    held: None,
                    submitted: 0,
                    yielded: 0,
                }
            }

            fan_out_window!(
                /// Only `Ok` values go to the pool; upstream errors waiting for their place
                /// are bounded by the same number.
            );
        }

        impl<S, F, Fut> Stream for $name<S, F, Fut::Ok>
        where
            S: TryStream,
            S::Error: Send + 'static,
            F: FnMut(S::Ok) -> Fut,
            Fut: TryFuture<Error = S::Error> + Send + 'static,
            Fut::Ok: Send + 'static,
        {
            type Item = Result<Fut::Ok, S::Error>;

            fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                let mut this = self.project();
                let ordered: bool = $ordered;
                // An error whose place has come (in completion order: any error).
                macro_rules! due {
                    () => {
                        this.errors
                            .front()
                            .is_some_and(|(at, _)| !ordered || *at == *this.yielded)
                    };
                }
                macro_rules! yield_error {
                    () => {{
                        let (_, e) = this.errors.pop_front().expect("an error is due");
                        return Poll::Ready(Some(Err(e)));
                    }};
                }
                if due!() {
                    yield_error!();
                }
                if let Some(result) = this.held.take() {
                    *this.yielded += 1;
                    return Poll::Ready(Some(result));
                }
                let oks = Oks {
                    stream: this.stream.as_mut(),
                    errors: &mut *this.errors,
                    submitted: &mut *this.submitted,
                    max_errors: this.core.window(),
                };
                let f = &mut *this.f;
                let poll = this.core.poll_next(
                    std::pin::pin!(oks),
                    &mut |value| TryFutureExt::into_future(f(value)),
                    cx,
                );
                match poll {
                    Poll::Ready(Some(result)) => {
                        if ordered && due!() {
                            *this.held = Some(result);
                            yield_error!();
                        }
                        *this.yielded += 1;
                        Poll::Ready(Some(result))
                    }
                    // Every `Ok` is yielded: the errors left are due, in order.
                    Poll::Ready(None) => {
                        Poll::Ready(this.errors.pop_front().map(|(_, e)| Err(e)))
                    }
                    Poll::Pending if due!() => yield_error!(),
                    Poll::Pending => Poll::Pending,
                }
            }

            fn size_hint(&self) -> (usize, Option<usize>) {
                let extra = self.errors.len() + usize::from(self.held.is_some());
                size_hint_plus(extra, self.core.size_hint(self.stream.size_hint()))
            }
        }

        impl<S: TryStream, F, U> FusedStream for $name<S, F, U>
        where
            Self: Stream,
        {
            fn is_terminated(&self) -> bool {
                self.core.is_terminated() && self.errors.is_empty() && self.held.is_none()
            }
        }

        impl_debug!(impl[S: TryStream + fmt::Debug, F, U] $name<S, F, U> => $name |this| {
            stream: &this.stream,
            core: &this.core,
            errors_waiting: &this.errors.len(),
        } ..);
    };
}

try_fan_out_stream!(
    /// Stream for the [`try_fan_out_ordered`](crate::TryPipelineExt::try_fan_out_ordered)
    /// method.
    TryFanOutOrdered,
    true
);

try_fan_out_stream!(
    /// Stream for the [`try_fan_out`](crate::TryPipelineExt::try_fan_out) method.
    TryFanOut,
    false
);
