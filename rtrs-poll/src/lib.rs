//! rtrs-poll: the Linux kernel's RTRS (RDMA Transport) and RNBD rebuilt as a
//! userspace, busy-polling dataplane.
//!
//! ```text
//!  clt   client sessions, paths, permits, multipath policies, failover
//!  srv   server sessions, chunk buffers, IO handler API, rkey refresh
//!  proto sans-IO RTRS 2.0 + RNBD 2.0 messages and immediates, byte-exact
//!  fabric verbs-shaped API: shm, tcp, and (feature "rdma") real verbs
//! ```
#![warn(missing_docs)]

pub mod clt;
pub mod fabric;
pub mod proto;
pub mod rnbd;
pub mod sess;
pub mod srv;
