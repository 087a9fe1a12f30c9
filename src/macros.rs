//! The parts every stream and handle type repeats, written once: accessors of the upstream
//! stream, `Stream` impls that hand each call to a shared engine, `Debug` and `From<&Handle>`
//! impls, and the size hint of a stream that holds items.
//!
//! Each macro expands to ordinary items at its call site; none hides any logic.

/// `get_ref`, `get_mut` and `get_pin_mut` of a stream type, reaching its upstream stream (of
/// type `$inner`) through field `$field` (pinned) and one more `get_ref()` (`get_mut()`,
/// `get_pin_mut()`) per `.` in the parentheses, as futures-util's macro of the same name:
/// `delegate_access_inner!(pub stream, S, ())` for a field that is the upstream itself,
/// `delegate_access_inner!(pub core, S, (.))` through an engine that has these accessors.
macro_rules! delegate_access_inner {
    ($vis:vis $field:ident, $inner:ty, ($($ind:tt)*)) => {
        /// A reference to the upstream stream.
        $vis fn get_ref(&self) -> &$inner {
            (&self.$field) $($ind get_ref())*
        }

        /// A mutable reference to the upstream stream. Items taken from it directly bypass
        /// this stream.
        $vis fn get_mut(&mut self) -> &mut $inner {
            (&mut self.$field) $($ind get_mut())*
        }

        /// A pinned mutable reference to the upstream stream.
        $vis fn get_pin_mut(self: ::std::pin::Pin<&mut Self>) -> ::std::pin::Pin<&mut $inner> {
            self.project().$field $($ind get_pin_mut())*
        }
    };
}

/// `Stream` and `FusedStream` for a stream type that hands every call to its pinned field
/// `core`: the engine it shares with the other streams of its family, whose inherent
/// `poll_next`, `size_hint` and `is_terminated` do the work. Given `Debug where [bounds]`,
/// also `Debug`, printed by the engine's `fmt_as(name, f)` under the type's name.
///
/// `delegate_stream!(impl[generics] Name<params> where [bounds] => Item; Debug where [bounds]);`
macro_rules! delegate_stream {
    (
        impl[$($g:tt)*] $name:ident<$($p:ident),*> where [$($bounds:tt)*] => $item:ty;
        Debug where [$($debug:tt)*]
    ) => {
        delegate_stream!(impl[$($g)*] $name<$($p),*> where [$($bounds)*] => $item);

        impl<$($g)*> ::std::fmt::Debug for $name<$($p),*>
        where
            $($debug)*
        {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                self.core.fmt_as(stringify!($name), f)
            }
        }
    };
    (impl[$($g:tt)*] $name:ident<$($p:ident),*> where [$($bounds:tt)*] => $item:ty) => {
        impl<$($g)*> ::futures::Stream for $name<$($p),*>
        where
            $($bounds)*
        {
            type Item = $item;

            #[inline]
            fn poll_next(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<Option<$item>> {
                self.project().core.poll_next(cx)
            }

            fn size_hint(&self) -> (usize, Option<usize>) {
                self.core.size_hint()
            }
        }

        impl<$($g)*> ::futures::stream::FusedStream for $name<$($p),*>
        where
            $($bounds)*
        {
            fn is_terminated(&self) -> bool {
                self.core.is_terminated()
            }
        }
    };
}

/// `Debug` printing a struct named `$name` with the given fields, each an expression of
/// `$this` (the value formatted); a trailing `..` marks that it shows only some of them
/// (`finish_non_exhaustive`):
///
/// `impl_debug!(impl[S: Debug] Name<S> => Name |this| { stream: &this.stream } ..);`
macro_rules! impl_debug {
    (@finish $s:ident ..) => {
        $s.finish_non_exhaustive()
    };
    (@finish $s:ident) => {
        $s.finish()
    };
    (
        impl[$($g:tt)*] $ty:ty $(where [$($b:tt)*])? => $name:ident
        |$this:ident| { $($field:ident: $value:expr),* $(,)? } $($more:tt)?
    ) => {
        impl<$($g)*> ::std::fmt::Debug for $ty $(where $($b)*)? {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                let $this = self;
                let mut s = f.debug_struct(stringify!($name));
                $(s.field(stringify!($field), $value);)*
                impl_debug!(@finish s $($more)?)
            }
        }
    };
}

/// A builder method that panics (naming the parameter) where its `try_` twin returns the
/// [`ConfigError`](crate::ConfigError): `or_panic_setter! { /// docs
/// pub fn timeout(timeout: Duration) => try_timeout; }`.
macro_rules! or_panic_setter {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($arg:ident: $ty:ty) => $try_name:ident;) => {
        $(#[$doc])*
        #[track_caller]
        #[must_use]
        $vis fn $name(self, $arg: $ty) -> Self {
            $crate::error::or_panic(self.$try_name($arg))
        }
    };
}

/// `From<&Handle> for Handle`, a clone of a shared handle, so that everything taking a handle
/// also takes `&handle`; `$shared` says what the clones share.
macro_rules! from_ref_handle {
    (impl[$($g:tt)*] $ty:ty, $shared:literal) => {
        impl<$($g)*> From<&$ty> for $ty {
            #[doc = concat!("A clone of the handle: ", $shared, " is shared.")]
            fn from(handle: &$ty) -> Self {
                handle.clone()
            }
        }
    };
}

/// The size hint of a stream that holds `held` items besides what its upstream, whose hint is
/// `upstream` (`(0, Some(0))` once it has ended), has still to yield.
#[inline]
pub(crate) fn size_hint_plus(
    held: usize,
    (lower, upper): (usize, Option<usize>),
) -> (usize, Option<usize>) {
    (
        lower.saturating_add(held),
        upper.and_then(|u| u.checked_add(held)),
    )
}

/// The constructors and quota accessors of a GCRA limiter handle ([`RateLimiter`] and
/// [`KeyedRateLimiter`]), written inside its `impl` block, which has `fn from_gcra(Gcra) ->
/// Self` and the quota in `self.shared.gcra`. `$each` ends the phrases that name the quota
/// (`""`, or `" for each key"`).
///
/// [`RateLimiter`]: crate::RateLimiter
/// [`KeyedRateLimiter`]: crate::KeyedRateLimiter
macro_rules! quota_methods {
    ($each:literal) => {
        #[doc = concat!("At most `rate` cells per second", $each, ", burst 1 (change it with")]
        /// [`burst`](Self::burst)).
        ///
        /// # Panics
        ///
        /// If `rate` is zero. [`try_per_second`](Self::try_per_second) returns the error instead.
        #[track_caller]
        pub fn per_second(rate: u32) -> Self {
            $crate::error::or_panic(Self::try_per_second(rate))
        }

        /// [`per_second`](Self::per_second), returning a [`ConfigError`](crate::ConfigError)
        /// naming `rate` if it is zero.
        pub fn try_per_second(rate: u32) -> Result<Self, $crate::ConfigError> {
            $crate::rate_limit::gcra::Gcra::try_per_second(rate).map(Self::from_gcra)
        }

        #[doc = concat!("One cell per `period`", $each, ", burst 1 (change it with")]
        /// [`burst`](Self::burst)). A period beyond about 30 years counts as 30 years: the
        /// crate's longest wait (one cell, then in practice never another).
        ///
        /// # Panics
        ///
        /// If `period` is zero. [`try_per`](Self::try_per) returns the error instead.
        #[track_caller]
        pub fn per(period: ::std::time::Duration) -> Self {
            $crate::error::or_panic(Self::try_per(period))
        }

        /// [`per`](Self::per), returning a [`ConfigError`](crate::ConfigError) naming `period`
        /// if it is zero.
        pub fn try_per(period: ::std::time::Duration) -> Result<Self, $crate::ConfigError> {
            $crate::rate_limit::gcra::Gcra::try_per(period).map(Self::from_gcra)
        }

        #[doc = concat!("Allows up to `b` cells at once", $each, " after an idle spell (the rate")]
        /// stays the same).
        ///
        /// This builds a new limiter: call it before sharing the handle (clones taken earlier
        /// keep their own quota and state).
        ///
        /// # Panics
        ///
        /// If `b` is zero. [`try_burst`](Self::try_burst) returns the error instead.
        #[track_caller]
        #[must_use]
        pub fn burst(self, b: u32) -> Self {
            $crate::error::or_panic(self.try_burst(b))
        }

        /// [`burst`](Self::burst), returning a [`ConfigError`](crate::ConfigError) naming `b`
        /// if it is zero.
        pub fn try_burst(self, b: u32) -> Result<Self, $crate::ConfigError> {
            $crate::error::nonzero("b", u64::from(b))?;
            Ok(self.with_gcra(self.shared.gcra.with_burst(b)))
        }

        /// The same kind of limiter (in memory, or in Redis under the same name and policy)
        /// with the quota `gcra`: a new budget in memory, the same keys in Redis.
        fn with_gcra(&self, gcra: $crate::rate_limit::gcra::Gcra) -> Self {
            #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
            let mut limiter = Self::from_gcra(gcra);
            #[cfg(feature = "redis")]
            {
                limiter.redis = self.redis.as_ref().map(|r| r.with_gcra(&gcra));
            }
            limiter
        }

        #[doc = concat!("The average time between two cells", $each, ".")]
        pub fn interval(&self) -> ::std::time::Duration {
            self.shared.gcra.interval()
        }

        #[doc = concat!("How many cells may pass at once", $each, " after an idle spell.")]
        pub fn burst_size(&self) -> u32 {
            self.shared.gcra.burst()
        }

        #[doc = concat!("The [`Quota`](crate::Quota)", $each, ".")]
        pub fn quota(&self) -> $crate::Quota {
            $crate::rate_limit::quota_of(&self.shared.gcra)
        }
    };
}

/// `window`, `try_window`, `in_pool` and the accessors of a stream on the fan-out engine
/// (`fan_out::Core` in field `core`, the upstream stream in field `stream`); the attributes
/// given (a doc paragraph) go into `window`'s documentation.
macro_rules! fan_out_window {
    ($(#[$doc:meta])*) => {
        /// Sets how many items of this stream may be in the pool at once: queued, running, or
        /// finished and not yet yielded. This bounds the stream's memory (and, for the ordered
        /// variant, the reorder buffer behind a slow item); upstream is not pulled while the
        /// window is full. The default is four times the pool's workers, and at least 512
        /// (hand-offs to the pool happen in batches of half a window).
        $(#[$doc])*
        ///
        /// # Panics
        ///
        /// Panics if `window` is zero or above 2^30; [`try_window`](Self::try_window) returns
        /// the error instead.
        #[track_caller]
        pub fn window(self, window: usize) -> Self {
            $crate::error::or_panic(self.try_window(window))
        }

        /// [`window`](Self::window), returning a [`ConfigError`](crate::ConfigError) naming
        /// `window` if it is zero or above 2^30.
        pub fn try_window(mut self, window: usize) -> Result<Self, $crate::ConfigError> {
            self.core.try_set_window(window)?;
            Ok(self)
        }

        /// How many of this stream's items are in the pool now.
        pub fn in_pool(&self) -> usize {
            self.core.in_pool()
        }

        delegate_access_inner!(pub stream, S, ());
    };
}

/// The Redis accessors of a rate limiter (`RateLimiter`, `KeyedRateLimiter`), whose
/// `redis: Option<RedisLimiter>` holds the Redis side: `when_unavailable` (documented by the
/// attributes given), `round_trips` and `unavailable_policy`.
#[cfg(feature = "redis")]
macro_rules! redis_limiter_accessors {
    ($(#[$when:meta])*) => {
        $(#[$when])*
        #[must_use]
        pub fn when_unavailable(mut self, policy: crate::redis::Unavailable) -> Self {
            if let Some(redis) = &mut self.redis {
                redis.policy = policy;
            }
            self
        }

        /// The number of round trips to Redis this limiter's handles in this process have
        /// made (every clone of it counts; reservations and refunds); `None` for an in-memory
        /// limiter. With many waiters at once it grows by far less than one per cell: one
        /// round trip reserves cells for every waiter queued while the previous one was in
        /// flight.
        pub fn round_trips(&self) -> Option<u64> {
            self.redis.as_ref().map(|r| r.gcra.round_trips())
        }

        /// The policy this handle follows while Redis cannot be reached; `None` for an
        /// in-memory limiter.
        pub fn unavailable_policy(&self) -> Option<crate::redis::Unavailable> {
            self.redis.as_ref().map(|r| r.policy)
        }
    };
}
