//! Session pieces both sides share, without I/O: the heartbeat, the client
//! path state machine with reconnect timing, multipath policies, and why a
//! path goes down. (Permits are `mempool::Slots`: a bitmap pool whose slot
//! index is the server chunk a request uses, wire spec §5.1.)

pub mod hb;
pub mod mp_policy;
pub mod path;
pub mod reason;

pub use reason::{DownReason, Step};

/// How often an embedder's control loop (`Server::poll`, `Client::poll`)
/// needs to run when nothing wakes it: its work is heartbeats (every 5 s)
/// and reconnects (after seconds), and connection events wake the server's
/// loop early. Each wakeup takes the CPU from a poller sharing it (the VM's
/// two vCPUs measured 1 ms ticks as a cost), so no more often than this.
pub const CONTROL_TICK: std::time::Duration = std::time::Duration::from_millis(10);
