//! The poll path's clock: [`now`] is `minstant::Instant::now()` (the TSC),
//! and the one place a poll loop or a poller on it reads the time, so the
//! reads can be counted.
//!
//! A core reads it after a busy iteration and once every
//! [`IDLE_CLOCK_EVERY`](crate::core::IDLE_CLOCK_EVERY) idle iterations, no
//! more (see [`run_core_live`](crate::run_core_live)); a poller reads it
//! itself only when it has work that needs an exact time (a latency stamp).
//! With the `clock-count` feature (and in this crate's tests) every read is
//! counted per thread (`reads`), which is how tests prove an idle loop
//! reads no clock.

use minstant::Instant;

#[cfg(any(test, feature = "clock-count"))]
thread_local! {
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The time now (one TSC read).
#[inline]
pub fn now() -> Instant {
    #[cfg(any(test, feature = "clock-count"))]
    READS.with(|r| r.set(r.get() + 1));
    Instant::now()
}

/// How many times this thread read the clock through [`now`].
#[cfg(any(test, feature = "clock-count"))]
pub fn reads() -> u64 {
    READS.with(|r| r.get())
}
