//! The tcp fabric: hosts over TCP, one connection per queue pair.
//!
//! ```text
//!  QP A  post_send ─> WQE ring (psn-indexed, kept until acked)
//!        CQ poll ───> tx buffer: request pieces | READ response pieces | ACK/NAK
//!                     one send() ────── TCP ──────> rx buffer of B (one recv())
//!                                                   B's core executes in psn order
//!                                                   against B's MR table: WRITE
//!                                                   lands from the rx buffer in the
//!                                                   MR, SEND in the posted receive,
//!                                                   READ queues a response
//!  QP A  <── ack (on every frame) / READ response / NAK / RNR NAK ───────── B
//! ```
//! The core busy-polls its non-blocking sockets when it polls a CQ: per QP at
//! most two `send`s (what was posted, then what executing the peer's requests
//! produced; each everything gathered so far in a preallocated tx buffer) and
//! one `recv` into a preallocated rx buffer (up to four when they fill it). Payloads stream in
//! pieces, so buffers are fixed at QP creation whatever the message size. The
//! connection manager ([`TcpCm`]) makes the connection on the slow-path thread
//! and hands the socket to the QP once the handshake is done.
//!
//! What a NIC enforces is enforced by the responder: rkeys (a refusal NAKs the
//! request, both QPs go to error), receive-not-ready (RNR NAK; the initiator
//! retries the request and everything after it every 0.64 ms, `rnr_retry`
//! times), and a peer that goes away (EOF, reset, or TCP's user timeout)
//! flushes everything outstanding.

mod auth;
mod cm;
mod sock;
mod watch;
mod wire;

pub use auth::{AuthKey, MIN_KEY_LEN};
pub use cm::TcpCm;

use super::engine::{CoreCell, PolledQp, QpCore, SharedState, SoftCq};
use super::mr::MrTable;
use crate::fabric::{
    Access, Cq, Fabric, FabricError, Memory, Mr, Opcode, Pd, Qp, QpCap, QpState, RecvWr, Result,
    SendWr, Sge, Wc, WcOpcode, WcStatus,
};
use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use wire::{kind, op, Hdr, F_ACKREQ, F_FIRST, F_LAST, HDR, MAX_INLINE, MAX_SEND_SGE};

/// One RNR retry's wait (what rdma_cm's default min_rnr_timer gives: 0.64 ms).
const RNR_TIMER: Duration = Duration::from_micros(640);
/// Smallest piece worth a header when the tx buffer is nearly full.
const MIN_PIECE: u32 = 512;
/// Receives per QP per poll at most (each fills the rx buffer).
const RECV_BATCH: usize = 4;

/// Sizes a fabric allocates up front, and its access rules.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Memory regions per PD.
    pub max_mrs: u32,
    /// Bytes of each QP's tx buffer (what one poll can hand to one `send`).
    pub tx_buf: usize,
    /// Bytes of each QP's rx buffer (what one `recv` can take in).
    pub rx_buf: usize,
    /// Largest payload piece per frame; longer messages stream in pieces.
    pub piece: u32,
    /// A pre-shared key: listeners admit only peers that prove they hold
    /// it, connects only listeners that prove it (mutual HMAC-SHA256
    /// challenge-response before any RTRS byte).
    pub auth: Option<Arc<AuthKey>>,
    /// Connections one host may have between accept and its connect
    /// request (authentication included); more are closed at once.
    pub max_pending_per_host: usize,
}

impl TcpConfig {
    /// This config with the pre-shared key read from `path` (see
    /// [`AuthKey::from_file`]).
    pub fn with_auth_key_file(self, path: &std::path::Path) -> std::result::Result<Self, String> {
        Ok(TcpConfig {
            auth: Some(Arc::new(AuthKey::from_file(path)?)),
            ..self
        })
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_mrs: 1 << 16,
            tx_buf: 256 << 10,
            rx_buf: 256 << 10,
            piece: 64 << 10,
            auth: None,
            max_pending_per_host: 64,
        }
    }
}

/// The tcp fabric.
#[derive(Clone, Debug, Default)]
pub struct TcpFabric {
    inner: Arc<FabricInner>,
}

#[derive(Debug, Default)]
struct FabricInner {
    cfg: TcpConfig,
    next_qp: AtomicU32,
    next_cq: AtomicU64,
    /// Watches the sockets of armed (idle) QPs.
    watcher: watch::Watcher,
}

impl TcpFabric {
    /// A fabric with default sizes.
    pub fn new() -> TcpFabric {
        TcpFabric::with_config(TcpConfig::default())
    }
    /// A fabric with the given sizes (buffers are clamped to sane minimums).
    pub fn with_config(cfg: TcpConfig) -> TcpFabric {
        let tx_buf = cfg.tx_buf.clamp(16 << 10, 1 << 30);
        let rx_buf = cfg.rx_buf.clamp(4 << 10, 1 << 30);
        let piece = cfg
            .piece
            .clamp(MIN_PIECE, wire::MAX_PIECE)
            .min((tx_buf / 2) as u32);
        TcpFabric {
            inner: Arc::new(FabricInner {
                cfg: TcpConfig {
                    tx_buf,
                    rx_buf,
                    piece,
                    ..cfg
                },
                next_qp: AtomicU32::new(1),
                next_cq: AtomicU64::new(1),
                watcher: watch::Watcher::default(),
            }),
        }
    }
}

impl Fabric for TcpFabric {
    type Pd = TcpPd;
    type Mr = TcpMr;
    type Cq = TcpCq;
    type Qp = TcpQp;
    type Cm = TcpCm;

    fn name(&self) -> &'static str {
        "tcp"
    }

    fn alloc_pd(&self) -> Result<TcpPd> {
        self.alloc_pd_sized(self.inner.cfg.max_mrs)
    }

    fn alloc_pd_sized(&self, max_mrs: u32) -> Result<TcpPd> {
        Ok(TcpPd {
            inner: Arc::new(PdInner {
                fabric: self.inner.clone(),
                mrs: MrTable::new(max_mrs),
            }),
        })
    }

    fn create_cm(&self) -> Result<TcpCm> {
        Ok(TcpCm::new(cm::CmConfig {
            auth: self.inner.cfg.auth.clone(),
            max_pending_per_host: self.inner.cfg.max_pending_per_host.max(1),
        }))
    }
}

// ---------------------------------------------------------------------------
// Protection domain and memory regions.

#[derive(Debug)]
struct PdInner {
    fabric: Arc<FabricInner>,
    mrs: MrTable,
}

/// A protection domain of the tcp fabric.
#[derive(Clone, Debug)]
pub struct TcpPd {
    inner: Arc<PdInner>,
}

/// A memory region of the tcp fabric; deregistered on drop. Any memory can
/// be registered (peers reach it only through this host's core).
#[derive(Debug)]
pub struct TcpMr {
    pd: Arc<PdInner>,
    index: u32,
}

impl Drop for TcpMr {
    fn drop(&mut self) {
        self.pd.mrs.deregister(self.index);
    }
}

impl Mr for TcpMr {
    fn addr(&self) -> u64 {
        self.pd.mrs.addr(self.index)
    }
    fn len(&self) -> usize {
        self.pd.mrs.len(self.index) as usize
    }
    fn lkey(&self) -> u32 {
        self.pd.mrs.lkey(self.index)
    }
    fn rkey(&self) -> u32 {
        self.pd.mrs.rkey(self.index)
    }
    fn rekey(&self) -> Result<u32> {
        Ok(self.pd.mrs.rekey(self.index))
    }
    fn invalidate(&self) {
        self.pd.mrs.invalidate_index(self.index);
    }
}

impl Pd<TcpFabric> for TcpPd {
    fn reg_mr(&self, mem: Arc<dyn Memory>, access: Access) -> Result<TcpMr> {
        let len = mem.len();
        self.reg_mr_range(mem, 0, len, access)
    }

    fn reg_mr_range(
        &self,
        mem: Arc<dyn Memory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<TcpMr> {
        let index = self.inner.mrs.register(mem, offset, len, access, (0, 0))?;
        Ok(TcpMr {
            pd: self.inner.clone(),
            index,
        })
    }

    fn create_cq(&self, depth: u32) -> Result<TcpCq> {
        if depth == 0 {
            return Err(FabricError::InvalidWr("CQ depth must be > 0"));
        }
        Ok(TcpCq(SoftCq::new(
            self.inner.fabric.next_cq.fetch_add(1, Ordering::Relaxed),
        )))
    }

    fn create_qp(&self, send_cq: &TcpCq, recv_cq: &TcpCq, cap: QpCap) -> Result<TcpQp> {
        if cap.max_send_sge > MAX_SEND_SGE {
            return Err(FabricError::InvalidWr("max_send_sge above 32"));
        }
        if cap.max_inline_data > MAX_INLINE {
            return Err(FabricError::InvalidWr("max_inline_data above 1024"));
        }
        let qp_num = self.inner.fabric.next_qp.fetch_add(1, Ordering::Relaxed);
        let core = QpCore::new(qp_num, cap)?;
        let engine = Engine::new(core, self.inner.clone(), &self.inner.fabric.cfg);
        let shared = Arc::new(QpShared {
            qp_num,
            cap,
            state: SharedState::new(),
            broken: AtomicBool::new(false),
            destroyed: AtomicBool::new(false),
            attach: Mutex::new(None),
            attach_ready: AtomicBool::new(false),
            rtu_seen: AtomicBool::new(false),
            sock: OnceLock::new(),
            wake: OnceLock::new(),
            fabric: self.inner.fabric.clone(),
            engine: CoreCell::new(engine),
        });
        let same = send_cq.0.id() == recv_cq.0.id();
        send_cq.0.attach(&shared, true, same);
        if !same {
            recv_cq.0.attach(&shared, false, true);
        }
        Ok(TcpQp { shared })
    }
}

// ---------------------------------------------------------------------------
// Queue pairs.

/// What the connection manager hands a QP once the handshake is done.
#[derive(Debug)]
pub(crate) struct Link {
    /// The connection (non-blocking, tuned); the QP keeps it.
    stream: TcpStream,
    /// Room for the READ responses the peer may have us owe at once (its
    /// send queue depth), allocated here on the slow path.
    reads: VecDeque<ReadOut>,
    peer_depth: usize,
    /// Passive side: the stream starts with the peer's RTU.
    expect_rtu: bool,
}

impl Link {
    pub(crate) fn new(stream: TcpStream, peer_max_send_wr: u32, expect_rtu: bool) -> Link {
        let peer_depth = peer_max_send_wr.clamp(1, 1 << 20) as usize;
        Link {
            stream,
            reads: VecDeque::with_capacity(peer_depth),
            peer_depth,
            expect_rtu,
        }
    }
}

pub(crate) struct QpShared {
    qp_num: u32,
    cap: QpCap,
    state: SharedState,
    /// Set by the connection manager (local disconnect) or on destruction:
    /// flush now.
    broken: AtomicBool,
    /// Set when the QP handle is dropped.
    destroyed: AtomicBool,
    attach: Mutex<Option<Link>>,
    attach_ready: AtomicBool,
    /// Passive side: the core has read the peer's RTU.
    rtu_seen: AtomicBool,
    /// The connection, once attached (kept here so dropping the QP can shut it).
    sock: OnceLock<RawFd>,
    /// Rung when an armed (idle, unpolled) QP has news: the socket turned
    /// readable (the watcher), or the CM broke the QP.
    wake: OnceLock<Arc<pollers::Wake>>,
    fabric: Arc<FabricInner>,
    engine: CoreCell<Engine>,
}

impl Drop for QpShared {
    fn drop(&mut self) {
        if let (Some(_), Some(&fd)) = (self.wake.get(), self.sock.get()) {
            self.fabric.watcher.forget(self.qp_num, fd);
        }
    }
}

impl QpShared {
    pub(crate) fn cap(&self) -> QpCap {
        self.cap
    }
    pub(crate) fn qp_num(&self) -> u32 {
        self.qp_num
    }
    /// Whether a connection was ever handed to this QP.
    pub(crate) fn attached(&self) -> bool {
        self.attach_ready.load(Ordering::Acquire)
    }
    pub(crate) fn attach(&self, link: Link) {
        let _ = self.sock.set(link.stream.as_raw_fd());
        *self.attach.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
        self.attach_ready.store(true, Ordering::Release);
    }
    pub(crate) fn rtu_seen(&self) -> bool {
        self.rtu_seen.load(Ordering::Acquire)
    }
    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
        if let Some(w) = self.wake.get() {
            w.ring();
        }
    }
}

/// A send work request kept (psn-indexed) until acknowledged: the core
/// transmits it in pieces, and again after an RNR NAK.
#[derive(Clone, Copy, Debug, Default)]
struct Wqe {
    op: u8,
    signaled: bool,
    inline: bool,
    nsge: u8,
    len: u32,
    /// Immediate data or the rkey to invalidate.
    word: u32,
    raddr: u64,
    rkey: u32,
}

/// Most segments a checked scatter list holds.
const MAX_SEGS: usize = MAX_SEND_SGE as usize;

/// The lkey of the registration `key` (an lkey or rkey) belongs to: it
/// changes only when the region is deregistered, so a payload that spans
/// polls checks it before each copy (an rkey invalidated meanwhile does not
/// stop a transfer under way, as with a DMA; a freed region does).
fn reg_key(mrs: &MrTable, key: u32) -> u32 {
    mrs.lkey(key >> 8)
}

/// A checked scatter list: (address, length, registration lkey) in
/// registered memory of ours.
#[derive(Clone, Copy, Debug)]
struct Segs {
    s: [(usize, usize, u32); MAX_SEGS],
    n: usize,
}

impl Segs {
    const EMPTY: Segs = Segs {
        s: [(0, 0, 0); MAX_SEGS],
        n: 0,
    };

    fn push(&mut self, addr: usize, len: usize, reg: u32) {
        if len > 0 {
            self.s[self.n] = (addr, len, reg);
            self.n += 1;
        }
    }

    /// Whether every segment's registration is still the one we checked.
    fn alive(&self, mrs: &MrTable) -> bool {
        self.s[..self.n]
            .iter()
            .all(|&(_, _, reg)| reg_key(mrs, reg) == reg)
    }

    /// Copies `data` into the list starting `off` bytes in (clipped to the
    /// list). The caller checked `alive` just before.
    fn scatter(&self, mut off: usize, mut data: &[u8]) {
        for &(addr, len, _) in &self.s[..self.n] {
            if data.is_empty() {
                break;
            }
            if off >= len {
                off -= len;
                continue;
            }
            let n = (len - off).min(data.len());
            // SAFETY: (addr, len) was checked against a registration of ours
            // with LOCAL_WRITE (or REMOTE_WRITE for the rkey of an RDMA WRITE)
            // when the message started, and the caller saw that registration
            // still alive; off + n <= len.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (addr + off) as *mut u8, n) };
            data = &data[n..];
            off = 0;
        }
    }
}

/// An inbound request being received (its payload may span pieces and recvs).
#[derive(Clone, Copy, Debug)]
struct InReq {
    psn: u64,
    op: u8,
    total: u32,
    /// Payload bytes landed so far.
    at: u32,
    dest: Segs,
    word: u32,
}

/// The response to one of our READs being received.
#[derive(Clone, Copy, Debug)]
struct InResp {
    psn: u64,
    total: u32,
    at: u32,
    dest: Segs,
}

/// A READ response we owe the peer: `len` bytes of our memory at `src`.
#[derive(Clone, Copy, Debug)]
struct ReadOut {
    psn: u64,
    src: usize,
    /// The source's registration (see `reg_key`).
    reg: u32,
    len: u32,
    sent: u32,
}

/// Passive side: the RTU that opens the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rtu {
    /// Not read yet: it comes before any frame.
    Expected,
    /// Read; the connection manager has yet to hear of it.
    Seen,
    /// Told (or not expected).
    Done,
}

/// Where the payload of the frame being received goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    Discard,
    Req,
    Resp,
}

#[derive(Clone, Copy, Debug)]
struct RxFrame {
    hdr: Hdr,
    left: u32,
    sink: Sink,
}

/// A fixed buffer with its valid bytes at `lo..hi`.
struct Buf {
    b: Box<[u8]>,
    lo: usize,
    hi: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        Buf {
            b: vec![0u8; len].into_boxed_slice(),
            lo: 0,
            hi: 0,
        }
    }
    fn is_empty(&self) -> bool {
        self.lo == self.hi
    }
    fn room(&self) -> usize {
        self.b.len() - self.hi
    }
    /// Moves the valid bytes to the front.
    fn compact(&mut self) {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.lo > 0 {
            self.b.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
    }
}

/// The per-QP state a core drives: both the initiator's and the responder's
/// halves of one RC connection, and its socket buffers.
struct Engine {
    core: QpCore,
    pd: Arc<PdInner>,
    /// The connection (-1 until attached; owned by the link's stream).
    fd: RawFd,
    link: Option<TcpStream>,

    // ---- initiator
    mask: u64,
    wqes: Box<[Wqe]>,
    sges: Box<[Sge]>,
    max_sge: usize,
    inline: Box<[u8]>,
    inline_cap: usize,
    /// Next request to put on the wire, and how much of its payload is out.
    tx_psn: u64,
    tx_off: u32,
    /// Every request below this has been executed by the peer.
    acked: u64,
    /// Requests whose psn has these bits set ask for a prompt ACK.
    ack_mask: u64,
    /// The request the peer last refused as not ready, and how many times.
    rnr: (u64, u32),
    rnr_until: Option<minstant::Instant>,
    in_resp: Option<InResp>,

    // ---- responder
    /// Next request psn to execute.
    in_psn: u64,
    /// After an RNR NAK: drop requests until `in_psn` starts again.
    dropping: bool,
    in_req: Option<InReq>,
    reads: VecDeque<ReadOut>,
    peer_depth: usize,
    /// An NAK to send: (kind, psn, status code).
    nak_out: Option<(u8, u64, u32)>,
    /// The peer asked for an ACK covering `ack_want` requests.
    ack_due: bool,
    ack_want: u64,
    ack_sent: u64,

    // ---- io
    piece: u32,
    tx: Buf,
    rx: Buf,
    frame: Option<RxFrame>,
    rtu: Rtu,
    /// In the error state: finish what must go out (READ responses, the
    /// NAK), then shut the writing half; drain the reading half to EOF.
    shut: bool,
    eof: bool,
}

impl Engine {
    fn new(core: QpCore, pd: Arc<PdInner>, cfg: &TcpConfig) -> Engine {
        let cap = core.cap;
        let depth = cap.max_send_wr.next_power_of_two() as usize;
        let max_sge = cap.max_send_sge.max(1) as usize;
        let inline_cap = cap.max_inline_data as usize;
        Engine {
            core,
            pd,
            fd: -1,
            link: None,
            mask: depth as u64 - 1,
            wqes: vec![Wqe::default(); depth].into_boxed_slice(),
            sges: vec![Sge::default(); depth * max_sge].into_boxed_slice(),
            max_sge,
            inline: vec![0u8; depth * inline_cap].into_boxed_slice(),
            inline_cap,
            tx_psn: 0,
            tx_off: 0,
            acked: 0,
            ack_mask: (depth as u64 / 4).max(1) - 1,
            rnr: (u64::MAX, 0),
            rnr_until: None,
            in_resp: None,
            in_psn: 0,
            dropping: false,
            in_req: None,
            reads: VecDeque::new(),
            peer_depth: 0,
            nak_out: None,
            ack_due: false,
            ack_want: 0,
            ack_sent: 0,
            piece: cfg.piece,
            tx: Buf::new(cfg.tx_buf),
            rx: Buf::new(cfg.rx_buf),
            frame: None,
            rtu: Rtu::Done,
            shut: false,
            eof: false,
        }
    }

    /// Picks up the connection manager's news.
    fn sync(&mut self, shared: &QpShared) {
        if self.link.is_none() && shared.attach_ready.load(Ordering::Acquire) {
            let link = shared
                .attach
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(link) = link {
                self.fd = link.stream.as_raw_fd();
                self.link = Some(link.stream);
                self.reads = link.reads;
                self.peer_depth = link.peer_depth;
                self.rtu = if link.expect_rtu {
                    Rtu::Expected
                } else {
                    Rtu::Done
                };
                if self.core.state == QpState::Init {
                    self.core.state = QpState::Rts;
                }
            }
        }
        if self.core.state != QpState::Error && shared.broken.load(Ordering::Acquire) {
            self.fail(None);
        }
    }

    /// Error state: flush everything outstanding; the socket then winds down.
    fn fail(&mut self, failed: Option<(u64, WcStatus)>) {
        self.core.enter_error(failed);
        self.in_req = None;
        self.in_resp = None;
        self.frame = None;
        self.rnr_until = None;
        self.ack_due = false;
    }

    fn protocol_error(&mut self, why: &'static str) {
        tracing::warn!(
            "tcp fabric: QP {}: peer broke the protocol: {why}",
            self.core.qp_num
        );
        self.nak_out = None;
        self.reads.clear();
        self.fail(None);
    }

    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        self.core.post_recv(wr)
    }

    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        let opcode = wr.opcode.wc_opcode();
        match self.core.state {
            QpState::Init => {
                return Err(FabricError::BadQpState {
                    qp_num: self.core.qp_num,
                    state: QpState::Init,
                })
            }
            QpState::Error => {
                self.core.sq_room()?;
                self.core.fail_now(wr.wr_id, opcode, WcStatus::WrFlushErr);
                return Ok(());
            }
            QpState::Rts => {}
        }
        if wr.sg_list.len() > self.core.cap.max_send_sge as usize {
            return Err(FabricError::InvalidWr("sg list longer than max_send_sge"));
        }
        self.core.sq_room()?;
        let len = wr.payload_len();
        if len > i32::MAX as u64 {
            return Err(FabricError::InvalidWr("payload above 2 GiB"));
        }
        let len = len as u32;
        if wr.opcode == Opcode::Rekey {
            // `rekey_wr` re-keyed in software already: a local no-op.
            self.core.push_sq(wr.wr_id, opcode, wr.signaled, 0, false);
            return Ok(());
        }
        if wr.opcode == Opcode::LocalInv {
            if self.pd.mrs.invalidate_local(wr.invalidate_rkey) {
                self.core.push_sq(wr.wr_id, opcode, wr.signaled, 0, false);
            } else {
                self.fail(None);
                self.core.fail_now(wr.wr_id, opcode, WcStatus::LocProtErr);
            }
            return Ok(());
        }
        let inline = wr.inline && wr.opcode != Opcode::RdmaRead;
        if inline && len as usize > self.inline_cap {
            return Err(FabricError::InvalidWr(
                "inline payload above max_inline_data",
            ));
        }
        let need = if wr.opcode == Opcode::RdmaRead {
            Access::LOCAL_WRITE
        } else {
            Access::NONE
        };
        for s in wr.sg_list {
            if self
                .pd
                .mrs
                .check_lkey(s.lkey, s.addr, u64::from(s.len), need)
                .is_err()
            {
                self.fail(None);
                self.core.fail_now(wr.wr_id, opcode, WcStatus::LocProtErr);
                return Ok(());
            }
        }
        let psn = self.core.next_psn;
        let slot = (psn & self.mask) as usize;
        if inline {
            let dst = &mut self.inline[slot * self.inline_cap..][..len as usize];
            let mut off = 0;
            for s in wr.sg_list.iter().filter(|s| s.len > 0) {
                let n = s.len as usize;
                // SAFETY: the lkey check above proved s.addr..+len lies in a
                // live registration of ours.
                let src = unsafe { std::slice::from_raw_parts(s.addr as usize as *const u8, n) };
                dst[off..off + n].copy_from_slice(src);
                off += n;
            }
        } else {
            self.sges[slot * self.max_sge..][..wr.sg_list.len()].copy_from_slice(wr.sg_list);
        }
        let (wop, word) = match wr.opcode {
            Opcode::Send => (op::SEND, 0),
            Opcode::SendWithImm => (op::SEND_IMM, wr.imm),
            Opcode::SendWithInv => (op::SEND_INV, wr.invalidate_rkey),
            Opcode::RdmaWrite => (op::WRITE, 0),
            Opcode::RdmaWriteWithImm => (op::WRITE_IMM, wr.imm),
            Opcode::RdmaRead => (op::READ, 0),
            Opcode::LocalInv | Opcode::Rekey => unreachable!("handled above"),
        };
        self.wqes[slot] = Wqe {
            op: wop,
            signaled: wr.signaled,
            inline,
            nsge: wr.sg_list.len() as u8,
            len,
            word,
            raddr: wr.remote_addr,
            rkey: wr.rkey,
        };
        self.core.push_sq(wr.wr_id, opcode, wr.signaled, len, true);
        Ok(())
    }

    // ---- the poll

    /// Drives the QP: sends what is ready, receives and executes what came.
    fn progress(&mut self, shared: &QpShared) {
        self.sync(shared);
        if self.link.is_some() {
            match self.core.state {
                QpState::Rts => self.pump(),
                QpState::Error => self.wind_down(),
                QpState::Init => {}
            }
        }
        // Local operations queued behind requests that are all done.
        if let Some(e) = self.core.sq.front() {
            if !e.wire && e.psn <= self.acked {
                self.core.retire(self.acked);
            }
        }
        if self.rtu == Rtu::Seen {
            shared.rtu_seen.store(true, Ordering::Release);
            self.rtu = Rtu::Done;
        }
        shared.state.set(self.core.state);
    }

    /// Everything posted is on the wire, nothing is buffered either way
    /// and no timer runs: polling would only `recv` nothing until the peer
    /// sends (its acks of what is outstanding included).
    fn quiet(&self) -> bool {
        self.link.is_some()
            && self.core.state == QpState::Rts
            && self.rtu == Rtu::Done
            && self.core.send_wcs.is_empty()
            && self.core.recv_wcs.is_empty()
            && !self.has_output()
            && self.rx.is_empty()
            && self.frame.is_none()
            && self.in_req.is_none()
            && self.in_resp.is_none()
            && self.rnr_until.is_none()
            && !self.eof
    }

    fn has_output(&self) -> bool {
        !self.tx.is_empty()
            || self.tx_psn < self.core.next_psn
            || self.nak_out.is_some()
            || self.ack_due
            || !self.reads.is_empty()
    }

    fn pump(&mut self) {
        if self.has_output() {
            self.fill();
            if let Err(e) = self.flush() {
                return self.socket_failed(e);
            }
        }
        self.read();
        if self.core.state == QpState::Rts && self.has_output() {
            self.fill();
            if let Err(e) = self.flush() {
                return self.socket_failed(e);
            }
        }
        if self.core.state == QpState::Error {
            self.wind_down();
        }
    }

    /// The socket failed: take in what the peer said before (a NAK explains
    /// more than a reset), then flush.
    fn socket_failed(&mut self, e: io::Error) {
        if !self.eof {
            self.read();
        }
        if self.core.state == QpState::Rts {
            self.fail_io(&e);
        }
        self.tx.lo = 0;
        self.tx.hi = 0;
        self.shut = true;
        self.wind_down();
    }

    fn fail_io(&mut self, e: &io::Error) {
        if e.raw_os_error() == Some(libc::ETIMEDOUT) {
            // TCP gave up retransmitting: the RC transport's retry budget.
            let oldest = self.core.sq.iter().find(|e| e.wire).map(|e| e.psn);
            self.fail(oldest.map(|p| (p, WcStatus::RetryExcErr)));
        } else {
            self.fail(None);
        }
    }

    /// In the error state: send what must still go (READ responses owed before
    /// a refusal, then the NAK), shut the writing half, drain to EOF.
    fn wind_down(&mut self) {
        if !self.shut {
            self.tx.compact();
            while !self.reads.is_empty() && self.emit_resp() {}
            if self.reads.is_empty() {
                if let Some((k, psn, word)) = self.nak_out {
                    if self.put_ctl(k, psn, word) {
                        self.nak_out = None;
                    }
                }
            }
            if self.flush().is_err() {
                self.tx.lo = 0;
                self.tx.hi = 0;
                self.reads.clear();
                self.nak_out = None;
            }
            if self.tx.is_empty() && self.reads.is_empty() && self.nak_out.is_none() {
                sock::shutdown_write(self.fd);
                self.shut = true;
            }
        }
        if !self.eof {
            for _ in 0..RECV_BATCH {
                match sock::recv(self.fd, &mut self.rx.b) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(_) => {
                        self.eof = true;
                        break;
                    }
                }
            }
            self.rx.lo = 0;
            self.rx.hi = 0;
        }
    }

    /// One send of everything in the tx buffer (the rest waits for the next poll).
    fn flush(&mut self) -> io::Result<()> {
        if self.tx.is_empty() {
            return Ok(());
        }
        loop {
            match sock::send(self.fd, &self.tx.b[self.tx.lo..self.tx.hi]) {
                Ok(n) => {
                    self.tx.lo += n;
                    if self.tx.is_empty() {
                        self.tx.lo = 0;
                        self.tx.hi = 0;
                    }
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    // ---- receiving

    fn read(&mut self) {
        for _ in 0..RECV_BATCH {
            if self.core.state != QpState::Rts {
                return;
            }
            let room = self.rx.room();
            match sock::recv(self.fd, &mut self.rx.b[self.rx.hi..]) {
                Ok(0) => {
                    self.eof = true;
                    if self.core.state == QpState::Rts {
                        self.fail(None);
                    }
                    return;
                }
                Ok(n) => {
                    self.rx.hi += n;
                    self.parse();
                    if n < room {
                        return;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    self.eof = true;
                    if self.core.state == QpState::Rts {
                        self.fail_io(&e);
                    }
                    return;
                }
            }
        }
    }

    /// Executes the frames in the rx buffer; keeps a partial header for later.
    fn parse(&mut self) {
        if self.rtu == Rtu::Expected {
            if self.rx.hi - self.rx.lo < cm::MSG_LEN {
                return;
            }
            let m: &[u8; cm::MSG_LEN] = self.rx.b[self.rx.lo..][..cm::MSG_LEN]
                .try_into()
                .expect("length checked");
            if !cm::is_rtu(m) {
                return self.protocol_error("the stream does not start with an RTU");
            }
            self.rx.lo += cm::MSG_LEN;
            self.rtu = Rtu::Seen;
        }
        loop {
            if self.core.state != QpState::Rts {
                self.rx.lo = 0;
                self.rx.hi = 0;
                return;
            }
            if let Some(f) = &mut self.frame {
                let n = (f.left as usize).min(self.rx.hi - self.rx.lo);
                if n > 0 {
                    let data = &self.rx.b[self.rx.lo..self.rx.lo + n];
                    let mrs = &self.pd.mrs;
                    let dest = match f.sink {
                        Sink::Discard => None,
                        Sink::Req => self.in_req.as_mut().map(|r| (&r.dest, &mut r.at, r.psn)),
                        Sink::Resp => self.in_resp.as_mut().map(|r| (&r.dest, &mut r.at, r.psn)),
                    };
                    if let Some((segs, at, psn)) = dest {
                        if !segs.alive(mrs) {
                            // The region went away under the transfer.
                            let sink = f.sink;
                            self.dead_dest(sink, psn);
                            continue;
                        }
                        segs.scatter(*at as usize, data);
                        *at += n as u32;
                    }
                    self.rx.lo += n;
                    f.left -= n as u32;
                }
                if f.left > 0 {
                    break;
                }
                let f = *f;
                self.frame = None;
                self.frame_end(&f);
                continue;
            }
            if self.rx.hi - self.rx.lo < HDR {
                break;
            }
            let h = Hdr::read(&self.rx.b[self.rx.lo..]);
            self.rx.lo += HDR;
            let sink = self.on_header(&h);
            self.frame = Some(RxFrame {
                hdr: h,
                left: h.piece,
                sink,
            });
        }
        self.rx.compact();
    }

    /// The memory an inbound payload was landing in was deregistered.
    fn dead_dest(&mut self, sink: Sink, psn: u64) {
        if sink == Sink::Resp {
            return self.fail(Some((psn, WcStatus::LocProtErr)));
        }
        let local = self
            .in_req
            .is_some_and(|r| matches!(r.op, op::SEND | op::SEND_IMM | op::SEND_INV))
            .then_some(WcStatus::LocProtErr);
        let status = if local.is_some() {
            WcStatus::RemOpErr
        } else {
            WcStatus::RemAccessErr
        };
        self.refuse(psn, status, local);
    }

    fn take_ack(&mut self, ack: u64) {
        let ack = ack.min(self.core.next_psn);
        if ack > self.acked {
            self.acked = ack;
            self.core.retire(ack);
        }
    }

    fn on_header(&mut self, h: &Hdr) -> Sink {
        if !h.sane() {
            self.protocol_error("malformed frame header");
            return Sink::Discard;
        }
        self.take_ack(h.ack);
        match h.kind {
            kind::REQ => self.on_req(h),
            kind::RESP => self.on_resp(h),
            kind::NAK | kind::RNR_NAK => {
                self.on_nak(h);
                Sink::Discard
            }
            _ => Sink::Discard,
        }
    }

    /// Refuses request `psn`: the peer hears `status`, the receive we had
    /// matched (if any) completes with `local`, and this QP goes to error.
    fn refuse(&mut self, psn: u64, status: WcStatus, local: Option<WcStatus>) -> Sink {
        if let Some(local) = local {
            if let Some(r) = self.core.rq.pop_front() {
                self.core.recv_wcs.push_back(Wc::new(
                    r.wr_id,
                    local,
                    WcOpcode::Recv,
                    self.core.qp_num,
                ));
            }
        }
        self.nak_out = Some((kind::NAK, psn, status.ibv_code()));
        self.fail(None);
        Sink::Discard
    }

    fn on_req(&mut self, h: &Hdr) -> Sink {
        if h.flags & F_FIRST == 0 {
            return match &self.in_req {
                Some(r) if r.psn == h.psn && r.at == h.off && r.total == h.total => Sink::Req,
                None if self.dropping => Sink::Discard,
                _ => {
                    self.protocol_error("request piece out of sequence");
                    Sink::Discard
                }
            };
        }
        if h.psn != self.in_psn || h.off != 0 || self.in_req.is_some() {
            if self.dropping && self.in_req.is_none() && h.psn > self.in_psn {
                return Sink::Discard;
            }
            self.protocol_error("request out of sequence");
            return Sink::Discard;
        }
        let needs_recv = matches!(h.op, op::SEND | op::SEND_IMM | op::SEND_INV | op::WRITE_IMM);
        if needs_recv && self.core.rq.is_empty() {
            // Receiver not ready: drop it and all behind it until it comes again.
            self.nak_out = Some((kind::RNR_NAK, h.psn, 0));
            self.dropping = true;
            return Sink::Discard;
        }
        self.dropping = false;
        let total = u64::from(h.total);
        let dest = match h.op {
            op::WRITE | op::WRITE_IMM => {
                if total == 0 {
                    Segs::EMPTY
                } else {
                    match self
                        .pd
                        .mrs
                        .check_rkey(h.rkey, h.raddr, total, Access::REMOTE_WRITE)
                    {
                        Ok(c) => {
                            let mut d = Segs::EMPTY;
                            d.push(
                                c.ptr as usize,
                                total as usize,
                                reg_key(&self.pd.mrs, h.rkey),
                            );
                            d
                        }
                        Err(_) => return self.refuse(h.psn, WcStatus::RemAccessErr, None),
                    }
                }
            }
            op::READ => {
                let (src, reg) = if total == 0 {
                    (0, 0)
                } else {
                    match self
                        .pd
                        .mrs
                        .check_rkey(h.rkey, h.raddr, total, Access::REMOTE_READ)
                    {
                        Ok(c) => (c.ptr as usize, reg_key(&self.pd.mrs, h.rkey)),
                        Err(_) => return self.refuse(h.psn, WcStatus::RemAccessErr, None),
                    }
                };
                if self.reads.len() >= self.peer_depth {
                    self.protocol_error("more READs outstanding than the peer's queue holds");
                    return Sink::Discard;
                }
                self.reads.push_back(ReadOut {
                    psn: h.psn,
                    src,
                    reg,
                    len: h.total,
                    sent: 0,
                });
                self.in_psn += 1;
                return Sink::Discard;
            }
            _ => {
                let r = *self.core.rq.front().expect("checked non-empty");
                if r.capacity() < total {
                    return self.refuse(h.psn, WcStatus::RemInvReqErr, Some(WcStatus::LocLenErr));
                }
                let mut dest = Segs::EMPTY;
                let mut left = total;
                for s in r.sges() {
                    if left == 0 {
                        break;
                    }
                    let take = u64::from(s.len).min(left);
                    match self
                        .pd
                        .mrs
                        .check_lkey(s.lkey, s.addr, take, Access::LOCAL_WRITE)
                    {
                        Ok(c) => dest.push(c.ptr as usize, take as usize, s.lkey),
                        Err(_) => {
                            return self.refuse(
                                h.psn,
                                WcStatus::RemOpErr,
                                Some(WcStatus::LocProtErr),
                            )
                        }
                    }
                    left -= take;
                }
                if h.op == op::SEND_INV && !self.pd.mrs.invalidate(h.word) {
                    return self.refuse(
                        h.psn,
                        WcStatus::RemInvReqErr,
                        Some(WcStatus::RemInvReqErr),
                    );
                }
                dest
            }
        };
        self.in_req = Some(InReq {
            psn: h.psn,
            op: h.op,
            total: h.total,
            at: 0,
            dest,
            word: h.word,
        });
        Sink::Req
    }

    fn on_resp(&mut self, h: &Hdr) -> Sink {
        if h.flags & F_FIRST == 0 {
            return match &self.in_resp {
                Some(r) if r.psn == h.psn && r.at == h.off && r.total == h.total => Sink::Resp,
                _ => {
                    self.protocol_error("READ response piece out of sequence");
                    Sink::Discard
                }
            };
        }
        let slot = (h.psn & self.mask) as usize;
        let w = self.wqes[slot];
        if self.in_resp.is_some()
            || h.psn < self.acked
            || h.psn >= self.tx_psn.max(self.acked)
            || w.op != op::READ
            || w.len != h.total
            || h.off != 0
        {
            self.protocol_error("READ response for no outstanding READ");
            return Sink::Discard;
        }
        let mut dest = Segs::EMPTY;
        for s in &self.sges[slot * self.max_sge..][..usize::from(w.nsge)] {
            match self
                .pd
                .mrs
                .check_lkey(s.lkey, s.addr, u64::from(s.len), Access::LOCAL_WRITE)
            {
                Ok(c) => dest.push(c.ptr as usize, s.len as usize, s.lkey),
                Err(_) => {
                    self.fail(Some((h.psn, WcStatus::LocProtErr)));
                    return Sink::Discard;
                }
            }
        }
        self.in_resp = Some(InResp {
            psn: h.psn,
            total: h.total,
            at: 0,
            dest,
        });
        Sink::Resp
    }

    fn on_nak(&mut self, h: &Hdr) {
        if h.psn < self.acked || h.psn >= self.core.next_psn {
            return self.protocol_error("NAK for no outstanding request");
        }
        if h.kind == kind::NAK {
            return self.fail(Some((h.psn, WcStatus::from_ibv_code(h.word))));
        }
        let n = if self.rnr.0 == h.psn {
            self.rnr.1 + 1
        } else {
            1
        };
        self.rnr = (h.psn, n);
        let retry = self.core.cap.rnr_retry;
        if retry < 7 && n > u32::from(retry) {
            return self.fail(Some((h.psn, WcStatus::RnrRetryExcErr)));
        }
        // Go back: resend it and everything after it once the timer expires.
        self.tx_psn = h.psn;
        self.tx_off = 0;
        self.rnr_until = Some(minstant::Instant::now() + RNR_TIMER);
    }

    fn frame_end(&mut self, f: &RxFrame) {
        if f.hdr.flags & F_LAST == 0 {
            return;
        }
        match f.sink {
            Sink::Req => {
                let Some(r) = self.in_req.take() else {
                    return;
                };
                if r.at != r.total {
                    return self.protocol_error("request shorter than announced");
                }
                let qp_num = self.core.qp_num;
                match r.op {
                    op::WRITE => {}
                    op::WRITE_IMM => {
                        let rq = self.core.rq.pop_front().expect("checked at the start");
                        let mut wc = Wc::new(
                            rq.wr_id,
                            WcStatus::Success,
                            WcOpcode::RecvRdmaWithImm,
                            qp_num,
                        );
                        wc.byte_len = r.total;
                        wc.imm = r.word;
                        wc.with_imm = true;
                        self.core.recv_wcs.push_back(wc);
                    }
                    _ => {
                        let rq = self.core.rq.pop_front().expect("checked at the start");
                        let mut wc = Wc::new(rq.wr_id, WcStatus::Success, WcOpcode::Recv, qp_num);
                        wc.byte_len = r.total;
                        if r.op == op::SEND_IMM {
                            wc.imm = r.word;
                            wc.with_imm = true;
                        }
                        if r.op == op::SEND_INV {
                            wc.invalidated_rkey = r.word;
                            wc.with_inv = true;
                        }
                        self.core.recv_wcs.push_back(wc);
                    }
                }
                self.in_psn += 1;
                if f.hdr.flags & F_ACKREQ != 0 {
                    self.ack_due = true;
                    self.ack_want = self.in_psn;
                }
            }
            Sink::Resp => {
                let Some(r) = self.in_resp.take() else {
                    return;
                };
                if r.at != r.total {
                    return self.protocol_error("READ response shorter than announced");
                }
                // The response acknowledges the READ and everything before it.
                self.take_ack(r.psn + 1);
            }
            Sink::Discard => {}
        }
    }

    // ---- sending

    /// What we can acknowledge: requests executed, except that a READ counts
    /// only once its response is out.
    fn ackable(&self) -> u64 {
        self.reads.front().map_or(self.in_psn, |r| r.psn)
    }

    /// Appends a header (with the current ack) and room for `piece` bytes;
    /// returns where the payload goes.
    fn put(&mut self, mut h: Hdr) -> &mut [u8] {
        h.ack = self.ackable();
        self.ack_sent = self.ack_sent.max(h.ack);
        let at = self.tx.hi;
        let end = at + HDR + h.piece as usize;
        h.write(&mut self.tx.b[at..]);
        self.tx.hi = end;
        &mut self.tx.b[at + HDR..end]
    }

    /// A control frame, if there is room.
    fn put_ctl(&mut self, k: u8, psn: u64, word: u32) -> bool {
        if self.tx.room() < HDR {
            return false;
        }
        self.put(Hdr {
            kind: k,
            psn,
            word,
            ..Hdr::default()
        });
        true
    }

    /// Bytes of payload the tx buffer can take in one piece now, or None when
    /// it is too full to bother.
    fn piece_room(&self, remaining: u32) -> Option<u32> {
        let room = self.tx.room().saturating_sub(HDR);
        let want = remaining.min(self.piece);
        if (room as u64) < u64::from(want.min(MIN_PIECE)) || self.tx.room() < HDR {
            return None;
        }
        Some(want.min(room.min(u32::MAX as usize) as u32))
    }

    /// Puts outgoing frames in the tx buffer: an RNR NAK first, then READ
    /// responses and requests a piece at a time in turn, then an ACK if one
    /// is owed and nothing carried it.
    fn fill(&mut self) {
        if self.tx.room() < self.tx.b.len() / 4 {
            self.tx.compact();
        }
        if let Some((k, psn, word)) = self.nak_out {
            if k == kind::RNR_NAK && self.put_ctl(k, psn, word) {
                self.nak_out = None;
            }
        }
        loop {
            let mut did = false;
            if !self.reads.is_empty() {
                did |= self.emit_resp();
            }
            if self.tx_psn < self.core.next_psn && self.core.state == QpState::Rts {
                did |= self.emit_req();
            }
            if !did {
                break;
            }
        }
        if self.ack_due {
            // A READ response still owed holds the ACK back (it acknowledges
            // only what precedes it); the ACK goes once it is out.
            if self.ackable() > self.ack_sent {
                self.put_ctl(kind::ACK, 0, 0);
            }
            if self.ack_sent >= self.ack_want {
                self.ack_due = false;
            }
        }
    }

    /// One piece of the oldest READ response we owe.
    fn emit_resp(&mut self) -> bool {
        let Some(r) = self.reads.front().copied() else {
            return false;
        };
        let Some(n) = self.piece_room(r.len - r.sent) else {
            return false;
        };
        if n > 0 && reg_key(&self.pd.mrs, r.reg) != r.reg {
            // The region went away before we could read it: the stream
            // cannot carry the response, so the connection ends.
            self.reads.clear();
            self.nak_out = None;
            self.fail(None);
            return false;
        }
        let last = r.sent + n == r.len;
        let flags = if r.sent == 0 { F_FIRST } else { 0 } | if last { F_LAST } else { 0 };
        let hdr = Hdr {
            kind: kind::RESP,
            flags,
            piece: n,
            psn: r.psn,
            total: r.len,
            off: r.sent,
            ..Hdr::default()
        };
        let dst = self.put(hdr);
        if n > 0 {
            // SAFETY: src..src+len was checked against a live registration of
            // ours with REMOTE_READ when the READ was executed; sent + n <= len.
            let src = unsafe {
                std::slice::from_raw_parts((r.src + r.sent as usize) as *const u8, n as usize)
            };
            dst.copy_from_slice(src);
        }
        if last {
            self.reads.pop_front();
        } else if let Some(f) = self.reads.front_mut() {
            f.sent += n;
        }
        true
    }

    /// One piece of the next request.
    fn emit_req(&mut self) -> bool {
        if let Some(t) = self.rnr_until {
            if minstant::Instant::now() < t {
                return false;
            }
            self.rnr_until = None;
        }
        let psn = self.tx_psn;
        let slot = (psn & self.mask) as usize;
        let w = self.wqes[slot];
        let payload = if w.op == op::READ { 0 } else { w.len };
        let Some(n) = self.piece_room(payload - self.tx_off) else {
            return false;
        };
        let off = self.tx_off;
        // Where the payload comes from, checked again now that we read it.
        let mut src = [(0usize, 0usize); MAX_SEGS + 1];
        let mut nsrc = 0;
        if n > 0 && w.inline {
            src[0] = (
                self.inline[slot * self.inline_cap + off as usize..].as_ptr() as usize,
                n as usize,
            );
            nsrc = 1;
        } else if n > 0 {
            let (mut skip, mut left) = (off as u64, u64::from(n));
            for s in &self.sges[slot * self.max_sge..][..usize::from(w.nsge)] {
                if left == 0 {
                    break;
                }
                let sl = u64::from(s.len);
                if skip >= sl {
                    skip -= sl;
                    continue;
                }
                let take = (sl - skip).min(left);
                match self
                    .pd
                    .mrs
                    .check_lkey(s.lkey, s.addr + skip, take, Access::NONE)
                {
                    Ok(c) => {
                        src[nsrc] = (c.ptr as usize, take as usize);
                        nsrc += 1;
                    }
                    Err(_) => {
                        self.fail(Some((psn, WcStatus::LocProtErr)));
                        return false;
                    }
                }
                skip = 0;
                left -= take;
            }
        }
        let last = off + n == payload;
        let mut flags = if off == 0 { F_FIRST } else { 0 };
        if last {
            flags |= F_LAST;
            if w.signaled || psn & self.ack_mask == self.ack_mask {
                flags |= F_ACKREQ;
            }
        }
        let hdr = Hdr {
            kind: kind::REQ,
            op: w.op,
            flags,
            piece: n,
            psn,
            total: w.len,
            off,
            raddr: w.raddr,
            rkey: w.rkey,
            word: w.word,
            ..Hdr::default()
        };
        let dst = self.put(hdr);
        let mut at = 0;
        for &(p, len) in &src[..nsrc] {
            // SAFETY: inline bytes live in our own buffer; other segments were
            // just checked against live registrations of ours.
            let s = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
            dst[at..at + len].copy_from_slice(s);
            at += len;
        }
        if last {
            self.tx_psn += 1;
            self.tx_off = 0;
        } else {
            self.tx_off += n;
        }
        true
    }
}

/// A queue pair of the tcp fabric.
pub struct TcpQp {
    shared: Arc<QpShared>,
}

impl std::fmt::Debug for TcpQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpQp({})", self.shared.qp_num)
    }
}

impl TcpQp {
    pub(crate) fn shared(&self) -> &Arc<QpShared> {
        &self.shared
    }
}

impl Drop for TcpQp {
    fn drop(&mut self) {
        self.shared.destroyed.store(true, Ordering::Release);
        self.shared.mark_broken();
        if let Some(&fd) = self.shared.sock.get() {
            // The stream lives as long as the shared state (the CQ may still
            // hold it); shut it now so the peer flushes at once.
            // SAFETY: fd belongs to the link's stream, which is never closed
            // before the shared state drops; shutdown(2) does not close it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

impl Qp for TcpQp {
    fn qp_num(&self) -> u32 {
        self.shared.qp_num
    }
    fn state(&self) -> QpState {
        let s = &self.shared;
        if s.broken.load(Ordering::Acquire) {
            return QpState::Error;
        }
        match s.state.get() {
            QpState::Init if s.attach_ready.load(Ordering::Acquire) => QpState::Rts,
            st => st,
        }
    }
    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        let s = &*self.shared;
        s.engine.with("qp", |e| {
            e.sync(s);
            e.post_send(wr)
        })?
    }
    fn post_send_batch(&mut self, wrs: &[SendWr<'_>]) -> Result<()> {
        let s = &*self.shared;
        s.engine.with("qp", |e| {
            e.sync(s);
            wrs.iter().try_for_each(|wr| e.post_send(wr))
        })?
    }
    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        let s = &*self.shared;
        s.engine.with("qp", |e| {
            e.sync(s);
            e.post_recv(wr)
        })?
    }
}

// ---------------------------------------------------------------------------
// Completion queues.

impl PolledQp for QpShared {
    fn destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }
    fn arm(&self, wake: &Arc<pollers::Wake>) -> bool {
        let quiet = self
            .engine
            .with("qp", |e| {
                e.sync(self);
                e.quiet()
            })
            .unwrap_or(false);
        let Some(&fd) = self.sock.get() else {
            return false;
        };
        if !quiet {
            return false;
        }
        let first = self.wake.set(wake.clone()).is_ok();
        let wake = self.wake.get().unwrap_or(wake);
        match self.fabric.watcher.arm(self.qp_num, fd, wake, first) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(qp_num = self.qp_num, "tcp fabric: cannot arm: {e}");
                false
            }
        }
    }
    fn progress_into(&self, send: bool, recv: bool, out: &mut [Wc]) -> usize {
        self.engine
            .with("qp", |e| {
                e.progress(self);
                e.core.drain_wcs(send, recv, out)
            })
            .unwrap_or(0)
    }
}

/// A completion queue of the tcp fabric. Polling it drives its QPs' sockets.
pub struct TcpCq(SoftCq<QpShared>);

impl std::fmt::Debug for TcpCq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpCq({}, {} qps)", self.0.id(), self.0.len())
    }
}

impl Cq for TcpCq {
    fn poll(&mut self, wcs: &mut [Wc]) -> usize {
        self.0.poll(wcs)
    }
    fn arm(&mut self, wake: &Arc<pollers::Wake>) -> bool {
        self.0.arm(wake)
    }
}
