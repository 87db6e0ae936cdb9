//! rtrs-poll: the Linux kernel's RTRS (RDMA Transport) and RNBD rebuilt as a
//! userspace, busy-polling dataplane.
//!
//! ```text
//!  the root  what an embedder needs: Client, Server, Handler, Address,
//!            with_backend, the fabrics, errors, Instant
//!  clt       client sessions, paths, permits, multipath policies, failover
//!  srv       server sessions, chunk buffers, IO handler API, rkey refresh
//!  rnbd      the RNBD block protocol's client and server on top
//!  sess      what both sides share: heartbeats, path states, mp_policy
//!  ─────────────────────────── crates of their own ───────────────────────────
//!  rtrs-proto   sans-IO RTRS 2.0 + RNBD 2.0 messages and immediates, byte-exact
//!  rtrs-fabric  verbs-shaped API: shm, tcp, and (feature "rdma") real verbs
//! ```
//!
//! A server with a handler of its own and a client reading through it, in
//! one process over shared memory (the embedding guide, docs/embedding.md,
//! walks through it; `examples/` has fuller ones):
//!
//! ```
//! use rtrs_poll::{
//!     Address, Client, CltConfig, ConInfo, CorePool, Handler, Instant, IoDir, Server, ShmFabric,
//!     SrvConfig, SrvIo, Verdict,
//! };
//!
//! /// The storage engine: answers a read with the user message reversed.
//! struct Mirror;
//! impl Handler for Mirror {
//!     fn on_io(&mut self, mut io: SrvIo<'_>) -> Verdict {
//!         let dir = io.dir();
//!         let (usr, data) = io.parts();
//!         if dir != IoDir::Read || data.len() < usr.len() {
//!             return Verdict::Done(-libc::EINVAL);
//!         }
//!         for (d, s) in data.iter_mut().zip(usr.iter().rev()) {
//!             *d = *s;
//!         }
//!         Verdict::Done(0)
//!     }
//! }
//!
//! let fabric = ShmFabric::new();
//! let addr = Address::Shm(format!("doc-root-{}", std::process::id()));
//! let cfg = SrvConfig { queue_depth: 16, max_chunk_size: 8192, ..SrvConfig::default() };
//! let cores = CorePool::launch(&[0])?; // IO connections run on a pinned core
//! let srv = Server::listen(&fabric, &addr, cfg, |_: &ConInfo| Mirror, cores.place())?;
//!
//! let (clt, mut queues) = Client::open(&fabric, CltConfig::new("doc", vec![addr]))?;
//! let q = &mut queues[0]; // this thread is the client's core
//! let permit = q.get_permit().expect("a free permit");
//! q.read(permit, b"hello", 5, 7, Instant::now()).map_err(|(_, e)| e)?;
//! let mut done = None;
//! while done.is_none() {
//!     q.poll(Instant::now(), &mut |c| done = Some(c));
//! }
//! let mut c = done.expect("polled until done");
//! assert_eq!((c.tag, c.errno), (7, 0));
//! assert_eq!(&q.buf(&mut c.permit)[..5], b"olleh");
//! q.put_permit(c.permit);
//!
//! clt.close();
//! drop(queues);
//! srv.stop();
//! cores.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod clt;
pub mod rnbd;
pub mod sess;
pub mod srv;

pub use clt::{Client, CltConfig, CltError, CltEvent, Completion, Dir, IoPermit, Submitter};
pub use minstant::Instant;
#[cfg(feature = "rdma")]
pub use rtrs_fabric::rdma::RdmaFabric;
pub use rtrs_fabric::soft::shm::ShmFabric;
pub use rtrs_fabric::soft::tcp::{AuthKey, TcpConfig, TcpFabric};
pub use rtrs_fabric::{with_backend, Address, Backends, Fabric, FabricError, OnFabric};
pub use srv::{
    ConInfo, CorePool, Deferred, Handler, Identity, IoDir, IoId, Server, SrvConfig, SrvError,
    SrvIo, Verdict,
};
