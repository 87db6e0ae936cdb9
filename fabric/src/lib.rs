//! The fabric: an RDMA-shaped API (verbs + rdma_cm) with backends that keep RDMA
//! semantics.
//!
//! ```text
//!   Fabric ── alloc_pd() ─> Pd ── reg_mr(memory, access) ─> Mr (lkey, rkey, rekey, invalidate)
//!      │                     └─── create_cq(depth) ──────> Cq (poll in batches: drives progress)
//!      │                     └─── create_qp(cq, cq, cap) ─> Qp (post_send / post_recv, RC)
//!      └── create_cm() ─> Cm (slow-path thread: listen, connect, accept, reject, events)
//! ```
//!
//! Everything on the hot path is generic over [`Fabric`] (static dispatch). A core
//! owns its QPs and CQs; the connection manager lives on the slow-path thread and
//! only touches a QP to attach or tear down its transport.
//!
//! Backends: [`soft::shm`] (processes on one host, no syscall on the data path),
//! [`soft::tcp`] (hosts over TCP, busy-polled sockets) and, with the `rdma`
//! feature, real verbs. [`fault::FaultFabric`] wraps any of them to inject
//! faults (black holes, delays, failed completions, killed QPs, lost CM events)
//! for tests. [`live`] counts the objects a backend holds, process-wide (a
//! census: nothing left behind after a churn of connections).
//!
//! The address picks the backend, in one place: [`with_backend`] runs work
//! written once, generic over [`Fabric`], on the fabric `shm:`, `tcp:` or
//! `rdma:` names (the `backend` module's example shows it).

pub mod addr;
mod backend;
pub mod fault;
pub mod live;
pub mod memory;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod soft;
pub mod types;

pub use addr::Address;
pub use backend::{with_backend, Backends, OnFabric};
pub use types::*;

use std::os::fd::RawFd;
use std::time::Duration;

/// Errors of the fabric's control and posting calls. Data-path failures are
/// reported as completions ([`WcStatus`]), as hardware does.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// An address string that no backend understands.
    #[error("bad address {addr:?}: {why} (expected shm:NAME, tcp:HOST:PORT or rdma:HOST:PORT)")]
    BadAddress {
        /// The string given.
        addr: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The address is for another backend.
    #[error("address {0} is not for the {1} fabric")]
    WrongBackend(String, &'static str),
    /// The address names a backend this build leaves out.
    #[error("the {0} backend is not built in (build with --features rdma)")]
    NotBuilt(&'static str),
    /// A send or receive queue is full.
    #[error("{queue} queue full ({depth} entries)")]
    QueueFull {
        /// "send", "recv" or "completion".
        queue: &'static str,
        /// Its fixed depth.
        depth: u32,
    },
    /// A work request that breaks the QP's fixed limits.
    #[error("invalid work request: {0}")]
    InvalidWr(&'static str),
    /// The QP is not connected (posting sends in Init) or has failed.
    #[error("queue pair {qp_num} is in state {state:?}")]
    BadQpState {
        /// Which QP.
        qp_num: u32,
        /// Its state.
        state: QpState,
    },
    /// Private data longer than the CM carries.
    #[error("private data of {0} bytes exceeds the {max} bytes the CM carries", max = MAX_PRIVATE_DATA)]
    PrivateDataTooLong(usize),
    /// Memory that this backend cannot register (e.g. not shareable for shm).
    #[error("cannot register memory: {0}")]
    BadMemory(&'static str),
    /// A table sized at creation is full.
    #[error("{0} table full")]
    TableFull(&'static str),
    /// An unknown key or connection id.
    #[error("unknown {what} {id:#x}")]
    Unknown {
        /// "rkey", "lkey", "connection", ...
        what: &'static str,
        /// The value.
        id: u64,
    },
    /// A QP or CQ used from two threads at once (they belong to one core).
    #[error("{0} is in use by another thread: a QP and its CQs belong to one core")]
    Busy(&'static str),
    /// A CM protocol violation by the peer.
    #[error("connection manager protocol error: {0}")]
    Protocol(&'static str),
    /// An operating-system error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl FabricError {
    /// Wraps the last OS error with context.
    pub fn last_os(what: &'static str) -> FabricError {
        FabricError::Io {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
    /// Wraps an io error with context.
    pub fn io(what: &'static str, source: std::io::Error) -> FabricError {
        FabricError::Io { what, source }
    }
}

/// Result of fabric calls.
pub type Result<T, E = FabricError> = std::result::Result<T, E>;

/// Most private data a connect, accept or reject carries (what rdma_cm allows
/// over IB/RoCE with `RDMA_PS_TCP`; RTRS's conn_req and conn_rsp are exactly 56).
pub const MAX_PRIVATE_DATA: usize = 56;

/// Memory a protection domain can register: a mempool region, or any mapping
/// that stays valid and does not move while registered.
///
/// # Safety
/// `as_ptr()..as_ptr()+len()` must be one mapping, readable and writable, that
/// stays mapped at the same address for as long as the value lives; `memfd`,
/// when `Some`, must be a file descriptor whose offset 0..len maps the same pages.
pub unsafe trait Memory: Send + Sync + 'static {
    /// First byte.
    fn as_ptr(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A file descriptor another process can map to see the same bytes.
    fn memfd(&self) -> Option<RawFd>;

    /// Copies `data` in at `off`. Bytes a peer may be writing at the same time
    /// (that is RDMA) are plain bytes: no Rust reference to them is ever made.
    fn write(&self, off: usize, data: &[u8]) -> Result<()> {
        let end = off.checked_add(data.len());
        if end.is_none_or(|e| e > self.len()) {
            return Err(FabricError::BadMemory("write outside the memory"));
        }
        // SAFETY: off + len <= self.len(), and the trait's contract makes the
        // whole range valid for writes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// Copies `buf.len()` bytes out from `off`.
    fn read(&self, off: usize, buf: &mut [u8]) -> Result<()> {
        let end = off.checked_add(buf.len());
        if end.is_none_or(|e| e > self.len()) {
            return Err(FabricError::BadMemory("read outside the memory"));
        }
        // SAFETY: off + len <= self.len(), and the range is valid for reads.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `len` bytes at `off` into `dst` at `dst_off` (one memcpy).
    fn copy_to(&self, off: usize, dst: &dyn Memory, dst_off: usize, len: usize) -> Result<()> {
        let src_end = off.checked_add(len);
        let dst_end = dst_off.checked_add(len);
        if src_end.is_none_or(|e| e > self.len()) || dst_end.is_none_or(|e| e > dst.len()) {
            return Err(FabricError::BadMemory("copy outside the memory"));
        }
        // SAFETY: both ranges are in bounds (checked above) and valid by the
        // trait's contract; `copy` tolerates overlap.
        unsafe { std::ptr::copy(self.as_ptr().add(off), dst.as_ptr().add(dst_off), len) };
        Ok(())
    }

    /// The little-endian u64 at `off` (0 when out of range).
    fn read_u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        match self.read(off, &mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }
}

/// A backend: the factory for protection domains and connection managers.
pub trait Fabric: Send + Sync + Sized + 'static {
    /// Protection domain.
    type Pd: Pd<Self>;
    /// Memory region.
    type Mr: Mr;
    /// Completion queue.
    type Cq: Cq;
    /// Reliable-connected queue pair.
    type Qp: Qp;
    /// Connection manager.
    type Cm: Cm<Self>;

    /// Short backend name ("shm", "tcp", "rdma").
    fn name(&self) -> &'static str;
    /// Whether this fabric's connection setup proves who the peer is (tcp
    /// with a pre-shared key). A server refuses to listen where other hosts
    /// reach it with neither this nor an allowlist, unless told insecure.
    fn authenticates_peers(&self) -> bool {
        false
    }
    /// Allocates a protection domain.
    fn alloc_pd(&self) -> Result<Self::Pd>;
    /// Allocates a protection domain for `max_mrs` registrations at most
    /// (the software fabrics size their registration table so; a NIC has
    /// its own limits).
    fn alloc_pd_sized(&self, max_mrs: u32) -> Result<Self::Pd> {
        let _ = max_mrs;
        self.alloc_pd()
    }
    /// Creates a connection manager (one per slow-path thread).
    fn create_cm(&self) -> Result<Self::Cm>;
    /// Whether a peer's SEND_WITH_INV can invalidate the rkeys of our MRs.
    /// Userspace verbs cannot fast-register, and devices do not invalidate
    /// ordinary MRs remotely: an engine on such a fabric does not ask its
    /// peer to invalidate (RTRS's NEED_INVAL) and invalidates locally.
    fn remote_invalidate(&self) -> bool {
        true
    }
}

/// A protection domain: memory registrations and the queues that may use them.
pub trait Pd<F: Fabric>: Send + Sync + Clone {
    /// A protection domain on the device that carries `addr`: a peer's
    /// address (`local` false: the device of the route to it) or one of
    /// ours (`local` true: a listener's, or a connection's local address).
    /// This one when it is already on that device, or when the backend has
    /// one device (the software fabrics).
    fn for_address(&self, addr: &Address, local: bool) -> Result<Self> {
        let _ = (addr, local);
        Ok(self.clone())
    }
    /// Whether `other` is on the same device (its registrations' keys work
    /// for this one's queues).
    fn same_device(&self, other: &Self) -> bool {
        let _ = other;
        true
    }
    /// Registers the whole of `mem` once. The MR keeps `mem` alive.
    fn reg_mr(&self, mem: std::sync::Arc<dyn Memory>, access: Access) -> Result<F::Mr> {
        let len = mem.len();
        self.reg_mr_range(mem, 0, len, access)
    }
    /// Registers `len` bytes of `mem` from `offset` (one MR per chunk, as the
    /// kernel's server does with always_invalidate).
    fn reg_mr_range(
        &self,
        mem: std::sync::Arc<dyn Memory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<F::Mr>;
    /// Creates a completion queue of `depth` entries.
    fn create_cq(&self, depth: u32) -> Result<F::Cq>;
    /// Creates an RC queue pair whose send completions go to `send_cq` and
    /// receive completions to `recv_cq` (which may be the same CQ).
    fn create_qp(&self, send_cq: &F::Cq, recv_cq: &F::Cq, cap: QpCap) -> Result<F::Qp>;
}

/// A registered memory region.
pub trait Mr: Send + Sync {
    /// Virtual address of the first byte (the iova peers use with the rkey).
    fn addr(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Local key, for sg entries.
    fn lkey(&self) -> u32;
    /// The current remote key (0 when invalidated).
    fn rkey(&self) -> u32;
    /// Invalidates the current rkey and makes a new one valid, at once: any
    /// access with the old key that starts after this returns fails with
    /// `RemAccessErr`. Returns the new rkey (the key byte advances, as the
    /// kernel's `ib_inc_rkey`).
    fn rekey(&self) -> Result<u32>;
    /// Invalidates the current rkey without making a new one valid.
    fn invalidate(&self);
    /// A re-key to post with [`SendWr::rekey`] on a connected QP, in order
    /// with the requests after it (one doorbell: the kernel chains REG_MR
    /// before the response that hands the key out). The key in the result
    /// becomes valid, and the old one dies, when the request executes.
    /// Backends that re-key in software do it here, at once.
    fn rekey_wr(&self) -> Result<RekeyWr<'_>> {
        Ok(RekeyWr::done(self.rekey()?))
    }
    /// The peer invalidated `rkey` (a SEND_WITH_INV we received named it):
    /// the backend brings its own view of the key in line. Returns whether
    /// `rkey` was the current key. The soft fabrics invalidate in their key
    /// table when the SEND_WITH_INV lands, so theirs only compares.
    fn peer_invalidated(&self, rkey: u32) -> bool {
        rkey != 0 && self.rkey() == 0
    }
    /// A local sg entry for `len` bytes at `offset` into the region.
    fn sge(&self, offset: usize, len: u32) -> Sge {
        Sge {
            addr: self.addr() + offset as u64,
            len,
            lkey: self.lkey(),
        }
    }
}

/// A completion queue. Polling it also drives the software backends' progress
/// for every QP attached to it, so a core polls its CQs in its loop.
pub trait Cq: Send {
    /// Fills `wcs` with up to `wcs.len()` completions, returning how many.
    fn poll(&mut self, wcs: &mut [Wc]) -> usize;
    /// Asks to be woken rather than polled (`ibv_req_notify_cq`'s role):
    /// when every QP on this CQ is quiet (nothing outstanding, nothing
    /// received and not yet taken) the fabric arranges for `wake` to ring
    /// when something arrives and returns true; the caller may then stop
    /// polling until it rings (or until it has something to post). False
    /// (the default): keep polling, as a NIC's CQ costs one memory read.
    fn arm(&mut self, wake: &std::sync::Arc<pollers::Wake>) -> bool {
        let _ = wake;
        false
    }
}

/// A reliable-connected queue pair.
pub trait Qp: Send {
    /// The QP number (unique per fabric instance).
    fn qp_num(&self) -> u32;
    /// The current state.
    fn state(&self) -> QpState;
    /// Posts one send work request.
    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()>;
    /// Posts several send work requests in order (one doorbell).
    fn post_send_batch(&mut self, wrs: &[SendWr<'_>]) -> Result<()> {
        for wr in wrs {
            self.post_send(wr)?;
        }
        Ok(())
    }
    /// Posts one receive.
    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()>;
}

/// Identifies one connection of a connection manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Private data of a CM message: up to [`MAX_PRIVATE_DATA`] bytes, inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PrivateData {
    len: u8,
    bytes: [u8; MAX_PRIVATE_DATA],
}

impl PrivateData {
    /// Copies `data`, refusing more than [`MAX_PRIVATE_DATA`] bytes.
    pub fn new(data: &[u8]) -> Result<PrivateData> {
        if data.len() > MAX_PRIVATE_DATA {
            return Err(FabricError::PrivateDataTooLong(data.len()));
        }
        let mut bytes = [0u8; MAX_PRIVATE_DATA];
        bytes[..data.len()].copy_from_slice(data);
        Ok(PrivateData {
            len: data.len() as u8,
            bytes,
        })
    }
    /// No private data.
    pub const fn empty() -> PrivateData {
        PrivateData {
            len: 0,
            bytes: [0; MAX_PRIVATE_DATA],
        }
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(MAX_PRIVATE_DATA)]
    }
}

impl std::fmt::Debug for PrivateData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateData({} bytes)", self.len)
    }
}

/// A connection-manager event (`rdma_cm_event`), delivered on the slow-path thread.
#[derive(Clone, Debug)]
pub enum CmEvent {
    /// A peer asks to connect to one of our listeners. Answer with
    /// [`Cm::accept`] or [`Cm::reject`].
    ConnectRequest {
        /// The new connection.
        id: ConnId,
        /// The listener it arrived on.
        listener: ConnId,
        /// The peer's private data.
        private_data: PrivateData,
        /// The peer's address, for logs and duplicate-path checks.
        peer: String,
        /// The id of the pre-shared key the peer proved before its request
        /// (tcp with a key); `None` on fabrics without key auth.
        key_id: Option<String>,
    },
    /// The connection is up; its QP is ready to send.
    Established {
        /// Which connection.
        id: ConnId,
        /// The accept's private data (active side), empty on the passive side.
        private_data: PrivateData,
    },
    /// The peer rejected our connect.
    Rejected {
        /// Which connection.
        id: ConnId,
        /// The reject's private data.
        private_data: PrivateData,
    },
    /// The connect could not reach a listener (no such name, refused, timed out).
    Unreachable {
        /// Which connection.
        id: ConnId,
        /// Why.
        reason: String,
    },
    /// The connection went away (either side disconnected, or the peer died).
    /// Its QP is in the error state and its outstanding requests are flushed.
    Disconnected {
        /// Which connection.
        id: ConnId,
    },
    /// The fabric turned a peer away before its connect request reached
    /// the application (the connection is closed; nothing to answer). For
    /// the application's logs and counters.
    Refused {
        /// The listener it came to.
        listener: ConnId,
        /// The peer's address.
        peer: String,
        /// What for.
        why: CmRefusal,
        /// Details for the log.
        detail: String,
    },
}

/// Why a fabric turned a peer away at the door.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CmRefusal {
    /// Its address is not admitted ([`Cm::admit`]).
    Access,
    /// It failed the listener's authentication (no key, or another key).
    Auth,
    /// Its handshake was malformed.
    Malformed,
    /// Its handshake did not finish in time.
    TimedOut,
    /// Too many of its connections are in handshakes already.
    Handshakes,
    /// No file descriptors (or memory) were left to take it.
    Resources,
}

/// Which source addresses a listener admits (see [`Cm::admit`]).
pub type Admit = std::sync::Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

impl CmEvent {
    /// The connection the event is about.
    pub fn id(&self) -> ConnId {
        match self {
            CmEvent::ConnectRequest { id, .. }
            | CmEvent::Established { id, .. }
            | CmEvent::Rejected { id, .. }
            | CmEvent::Unreachable { id, .. }
            | CmEvent::Disconnected { id } => *id,
            CmEvent::Refused { listener, .. } => *listener,
        }
    }
}

/// A control driver's events from its CM: taken one by one without
/// waiting (the one that ended the last wait first), and the control's one
/// wait; a failing CM is logged once.
#[derive(Debug)]
pub struct CmEvents {
    woke: Option<CmEvent>,
    failing: bool,
    who: &'static str,
}

impl CmEvents {
    /// For the control `who` ("client", "server"), in its log line.
    pub fn new(who: &'static str) -> CmEvents {
        CmEvents {
            woke: None,
            failing: false,
            who,
        }
    }

    /// The next event there is, without waiting.
    pub fn next<F: Fabric, C: Cm<F>>(&mut self, cm: &mut C) -> Option<CmEvent> {
        if let Some(ev) = self.woke.take() {
            return Some(ev);
        }
        match cm.poll_event(std::time::Duration::ZERO) {
            Ok(ev) => ev,
            Err(e) => {
                self.failed(e);
                None
            }
        }
    }

    /// Waits at most `max` for an event, kept for [`CmEvents::next`].
    pub fn wait<F: Fabric, C: Cm<F>>(&mut self, cm: &mut C, max: std::time::Duration) {
        match cm.poll_event(max) {
            Ok(ev) => self.woke = ev,
            Err(e) => {
                self.failed(e);
                std::thread::sleep(max);
            }
        }
    }

    fn failed(&mut self, e: FabricError) {
        if !self.failing {
            self.failing = true;
            tracing::warn!("{} CM: {e}", self.who);
        }
    }
}

/// A connection manager shaped like rdma_cm. It runs on the slow-path thread;
/// the QPs it connects are driven by cores.
pub trait Cm<F: Fabric>: Send {
    /// Listens on `addr`; connect requests arrive as [`CmEvent::ConnectRequest`].
    fn listen(&mut self, addr: &Address) -> Result<ConnId>;
    /// Turns away at the door the peers whose source address `admit`
    /// refuses, on every listener (tcp: closed right after `accept`, before
    /// they take a handshake slot; reported as [`CmEvent::Refused`]).
    /// Fabrics that only learn the address with the connect request ignore
    /// it (the application checks the request).
    fn admit(&mut self, admit: Admit) {
        let _ = admit;
    }
    /// Starts connecting `qp` to `addr` with `private_data`; the outcome arrives
    /// as an event ([`CmEvent::Established`], `Rejected` or `Unreachable`).
    fn connect(&mut self, addr: &Address, qp: &F::Qp, private_data: &[u8]) -> Result<ConnId>;
    /// Accepts a connect request, attaching `qp`.
    fn accept(&mut self, id: ConnId, qp: &F::Qp, private_data: &[u8]) -> Result<()>;
    /// Rejects a connect request.
    fn reject(&mut self, id: ConnId, private_data: &[u8]) -> Result<()>;
    /// Disconnects an established connection (or closes a listener). Both sides
    /// then see [`CmEvent::Disconnected`].
    fn disconnect(&mut self, id: ConnId) -> Result<()>;
    /// Waits up to `timeout` for the next event.
    fn poll_event(&mut self, timeout: Duration) -> Result<Option<CmEvent>>;
}
