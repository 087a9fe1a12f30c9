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

use crate::error::ConfigError;
use crate::fan_out::Core;
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
                window: usize,
            }
        }

        impl<S, F, U> $name<S, F, U>
        where
            S: TryStream,
            S::Error: Send + 'static,
            U: Send + 'static,
        {
            pub(crate) fn new(stream: S, pool: WorkerPool, f: F) -> Self {
                let window = pool.default_window();
                Self {
                    stream,
                    f,
                    core: Core::new(pool, $ordered),
                    errors: VecDeque::new(),
                    held: None,
                    submitted: 0,
                    yielded: 0,
                    window,
                }
            }

            /// Sets how many `Ok` items of this stream may be in the pool at once (queued,
            /// running, or finished and not yet yielded), as
            /// [`FanOutOrdered::window`](crate::FanOutOrdered::window) does. Upstream errors
            /// waiting for their place are bounded by the same number. The default is four
            /// times the pool's workers, and at least 512.
            ///
            /// # Panics
            ///
            /// Panics if `window` is zero; [`try_window`](Self::try_window) returns an error
            /// instead.
            #[track_caller]
            pub fn window(self, window: usize) -> Self {
                crate::error::or_panic(self.try_window(window))
            }

            /// Sets the window, or returns an error naming `window` if it is zero.
            pub fn try_window(mut self, window: usize) -> Result<Self, ConfigError> {
                self.core.try_set_window(window)?;
                self.window = window;
                Ok(self)
            }

            /// How many of this stream's items are in the pool now.
            pub fn in_pool(&self) -> usize {
                self.core.in_pool()
            }

            /// A reference to the upstream stream.
            pub fn get_ref(&self) -> &S {
                &self.stream
            }

            /// A mutable reference to the upstream stream.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.stream
            }

            /// A pinned mutable reference to the upstream stream.
            pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
                self.project().stream
            }
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
                    max_errors: *this.window,
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
                let (lower, upper) = self.core.size_hint(self.stream.size_hint());
                let extra = self.errors.len() + usize::from(self.held.is_some());
                (
                    lower.saturating_add(extra),
                    upper.and_then(|u| u.checked_add(extra)),
                )
            }
        }

        impl<S, F, Fut> FusedStream for $name<S, F, Fut::Ok>
        where
            S: TryStream,
            S::Error: Send + 'static,
            F: FnMut(S::Ok) -> Fut,
            Fut: TryFuture<Error = S::Error> + Send + 'static,
            Fut::Ok: Send + 'static,
        {
            fn is_terminated(&self) -> bool {
                self.core.is_terminated() && self.errors.is_empty() && self.held.is_none()
            }
        }

        impl<S: TryStream + fmt::Debug, F, U> fmt::Debug for $name<S, F, U> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("stream", &self.stream)
                    .field("core", &self.core)
                    .field("errors_waiting", &self.errors.len())
                    .finish_non_exhaustive()
            }
        }
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
