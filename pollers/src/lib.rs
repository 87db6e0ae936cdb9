//! pollers: the threads of a DPDK-style dataplane, with no RDMA in them.
//!
//! ```text
//!   core 0 ─┐ pinned, run-to-completion: loop { poller.poll(now) }   no locks,
//!   core 1 ─┤ busy/idle accounted with the TSC, read lazily           syscalls or
//!           │                                                         allocation
//!           │ spsc / mpsc rings (bounded, Full(item) = back-pressure)
//!   slow  ──┘ control work (handshake, heartbeats, reconnects), now passed in; waits bounded
//!   Ctrl-C ──> Shutdown flag: cores stop taking work, drain, report
//! ```
//!
//! A core thread runs as an ordinary thread, or under SCHED_IDLE
//! ([`CoreSched`]) where its CPU is shared with kernel work the IO needs
//! (softirqs, soft-RoCE's tasklets): that work then preempts it at once.
#![warn(missing_docs)]

pub mod clock;
pub mod core;
pub mod mpsc;
pub mod shutdown;
pub mod slow;
pub mod spsc;
mod sync;

pub use crate::core::{
    run_core, run_core_live, Bell, CoreReport, CoreSched, CoreStats, Cores, LiveStats, Poller, Wake,
};
pub use shutdown::Shutdown;
pub use slow::{Control, SlowLoop, SlowOpts, SlowPath, Stepper};

/// A ring was full: the item comes back to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T> std::fmt::Display for Full<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ring full")
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PollersError {
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The Ctrl-C handler could not be installed.
    #[error("cannot install the Ctrl-C handler: {0}")]
    Signal(String),
}
