//! tower integration (feature `tower`): the shared handles and [`Call`](crate::Call) as
//! [`Layer`](tower_layer::Layer)s, and `Call` as a [`Service`](tower_service::Service).
//!
//! Each layer wraps a service into one that draws on the handle it was made from, so every
//! clone of the layer and of the wrapped service (and every stream or caller holding a clone of
//! the handle) shares **one** budget. tower's own `RateLimit` and `ConcurrencyLimit` keep a
//! budget per service clone instead.
//!
//! | layer | service | waits in | error |
//! |---|---|---|---|
//! | [`RateLimiter`](crate::RateLimiter) | [`RateLimitService`] | `poll_ready` (one cell per call) | the inner error |
//! | [`InFlightLimit`](crate::InFlightLimit) | [`InFlightService`] | `poll_ready` (one unit, held by the response future) | the inner error |
//! | [`CircuitBreaker`](crate::CircuitBreaker) | [`BreakerService`] | rejects in the response future, without calling the inner service | [`BreakerError<(), E>`](crate::BreakerError) |
//! | [`Call::layer()`](crate::Call::layer) | [`CallService`] | the response future (every attempt) | [`CallError<E>`](crate::CallError) |

/// The parts every service here repeats: the accessors of its inner service (field `inner`),
/// `into_inner`'s summary ending with `$note`; and, for a service drawing on a shared handle
/// (`field: Handle`), the handle's accessor and the handle as the tower `Layer` that wraps a
/// service into `$service::new(inner, handle.clone())`.
macro_rules! service_parts {
    ($service:ident<S $(, $p:ident)*> $(, $field:ident: $handle:ident)?, $note:literal) => {
        impl<S $(, $p)*> $service<S $(, $p)*> {
            $(
                #[doc = concat!("The shared [`", stringify!($handle), "`](crate::")]
                #[doc = concat!(stringify!($handle), ") behind this service.")]
                pub fn $field(&self) -> &$crate::$handle {
                    &self.$field
                }
            )?

            /// The inner service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The inner service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            #[doc = concat!("The inner service", $note, ".")]
            pub fn into_inner(self) -> S {
                self.inner
            }
        }

        $(
            impl<S> tower_layer::Layer<S> for $crate::$handle {
                type Service = $service<S>;

                fn layer(&self, inner: S) -> Self::Service {
                    $service::new(inner, self.clone())
                }
            }
        )?
    };
}

mod breaker;
mod call;
mod in_flight;
mod rate_limit;

pub use breaker::BreakerService;
pub use call::{CallLayer, CallService};
pub use in_flight::{InFlightFuture, InFlightService};
pub use rate_limit::RateLimitService;

/// The message of a `call` without a successful `poll_ready` first (tower's contract).
const NOT_READY: &str = "`call` without a successful `poll_ready` first";
