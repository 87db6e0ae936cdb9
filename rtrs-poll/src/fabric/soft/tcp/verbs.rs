//! The verbs objects of the tcp fabric: fabric, protection domain, memory
//! regions, completion queues, queue pairs, and the state a QP shares
//! between its core and the connection manager (`QpShared`). The RC logic
//! is the [`Engine`] each QP holds in a [`CoreCell`].

use super::cm::{self, TcpCm};
use super::rc::{Engine, Link};
use super::wire::{MAX_INLINE, MAX_PIECE, MAX_SEND_SGE};
use super::{watch, TcpConfig, MIN_PIECE};
use crate::fabric::soft::engine::{CoreCell, PolledQp, QpCore, SharedState, SoftCq};
use crate::fabric::soft::mr::MrTable;
use crate::fabric::{
    Access, Cq, Fabric, FabricError, Memory, Mr, Pd, Qp, QpCap, QpState, RecvWr, Result, SendWr, Wc,
};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

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
            .clamp(MIN_PIECE, MAX_PIECE)
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
                mrs: Arc::new(MrTable::new(max_mrs)),
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
    mrs: Arc<MrTable>,
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
        let engine = Engine::new(core, self.inner.mrs.clone(), &self.inner.fabric.cfg);
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
    /// Hands the engine the connection manager's news: the connection,
    /// once; a break.
    fn sync(&self, e: &mut Engine) {
        if !e.linked() && self.attach_ready.load(Ordering::Acquire) {
            let link = self.attach.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(link) = link {
                e.attach(link);
            }
        }
        if self.broken.load(Ordering::Acquire) {
            e.break_off();
        }
    }

    /// Drives the engine (see [`Engine::drive`]) and publishes what the
    /// connection manager and other threads look at.
    fn progress(&self, e: &mut Engine) {
        self.sync(e);
        e.drive();
        if e.take_rtu_seen() {
            self.rtu_seen.store(true, Ordering::Release);
        }
        self.state.set(e.state());
    }

    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
        if let Some(w) = self.wake.get() {
            w.ring();
        }
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
            s.sync(e);
            e.post_send(wr)
        })?
    }
    fn post_send_batch(&mut self, wrs: &[SendWr<'_>]) -> Result<()> {
        let s = &*self.shared;
        s.engine.with("qp", |e| {
            s.sync(e);
            wrs.iter().try_for_each(|wr| e.post_send(wr))
        })?
    }
    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        let s = &*self.shared;
        s.engine.with("qp", |e| {
            s.sync(e);
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
                self.sync(e);
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
                self.progress(e);
                e.drain_wcs(send, recv, out)
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
