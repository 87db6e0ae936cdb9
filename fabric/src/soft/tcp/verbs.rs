//! The tcp fabric's verbs objects: the fabric, and the tcp backend of the
//! generic soft PD, MR, CQ and QP (`soft/verbs.rs`): its QPs' extras (the
//! socket, the watcher's wake, the RTU flag) and hooks. The RC logic is the
//! [`Engine`] each QP holds.

use super::cm::{self, TcpCm};
use super::rc::{Engine, Link};
use super::wire::{MAX_INLINE, MAX_PIECE, MAX_SEND_SGE};
use super::{watch, TcpConfig, MIN_PIECE};
use crate::live::{Kind, Live};
use crate::soft::engine::{QpCore, SoftCq};
use crate::soft::mr::MrTable;
use crate::soft::verbs::{Ids, SoftBackend, SoftEngine, SoftMr, SoftPd, SoftQp, SoftQpShared};
use crate::{Fabric, FabricError, QpCap, RecvWr, Result, SendWr, Wc};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The tcp fabric.
#[derive(Clone, Debug, Default)]
pub struct TcpFabric {
    inner: Arc<FabricInner>,
}

#[derive(Debug, Default)]
pub struct FabricInner {
    cfg: TcpConfig,
    ids: Ids,
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
                ids: Ids::default(),
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

    fn authenticates_peers(&self) -> bool {
        self.inner.cfg.auth.is_some()
    }

    fn alloc_pd(&self) -> Result<TcpPd> {
        self.alloc_pd_sized(self.inner.cfg.max_mrs)
    }

    fn alloc_pd_sized(&self, max_mrs: u32) -> Result<TcpPd> {
        Ok(SoftPd::new(PdInner {
            _live: Live::new(Kind::Pd),
            fabric: self.inner.clone(),
            mrs: Arc::new(MrTable::new(max_mrs)),
        }))
    }

    fn create_cm(&self) -> Result<TcpCm> {
        TcpCm::new(cm::CmConfig {
            auth: self.inner.cfg.auth.clone(),
            max_pending_per_host: self.inner.cfg.max_pending_per_host.max(1),
        })
    }
}

// ---------------------------------------------------------------------------
// The tcp backend of the generic verbs objects.

/// A protection domain of the tcp fabric.
pub type TcpPd = SoftPd<PdInner>;
/// A memory region of the tcp fabric; deregistered on drop. Any memory can
/// be registered (peers reach it only through this host's core).
pub type TcpMr = SoftMr<PdInner>;
/// A completion queue of the tcp fabric. Polling it drives its QPs' sockets.
pub type TcpCq = SoftCq<QpShared>;
/// A queue pair of the tcp fabric.
pub type TcpQp = SoftQp<PdInner>;
/// What a tcp QP shares between its core, its CQs and the CM.
pub(crate) type QpShared = SoftQpShared<PdInner>;

/// The tcp fabric's PD internals (the backend of the generic objects).
#[derive(Debug)]
pub struct PdInner {
    /// Counted while the PD or any MR of it lives (an MR holds its PD).
    _live: Live,
    fabric: Arc<FabricInner>,
    mrs: Arc<MrTable>,
}

/// What a tcp QP keeps beside the generic state.
pub struct TcpQpExtra {
    qp_num: u32,
    /// Passive side: the core has read the peer's RTU.
    rtu_seen: AtomicBool,
    /// The connection, once attached (kept here so dropping the QP can shut it).
    sock: OnceLock<RawFd>,
    /// Rung when an armed (idle, unpolled) QP has news: the socket turned
    /// readable (the watcher), or the CM broke the QP.
    wake: OnceLock<Arc<pollers::Wake>>,
    fabric: Arc<FabricInner>,
}

impl std::fmt::Debug for TcpQpExtra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpQpExtra(sock {:?})", self.sock.get())
    }
}

impl Drop for TcpQpExtra {
    fn drop(&mut self) {
        if let (Some(_), Some(&fd)) = (self.wake.get(), self.sock.get()) {
            self.fabric.watcher.forget(self.qp_num, fd);
        }
    }
}

impl SoftBackend for PdInner {
    type Fabric = TcpFabric;
    type Engine = Engine;
    type Link = Link;
    type QpExtra = TcpQpExtra;
    const NAME: &'static str = "Tcp";

    fn mrs(&self) -> &MrTable {
        &self.mrs
    }

    fn ids(&self) -> &Ids {
        &self.fabric.ids
    }

    fn new_qp(pd: &Arc<Self>, cap: QpCap) -> Result<(u32, Engine, TcpQpExtra)> {
        if cap.max_send_sge > MAX_SEND_SGE {
            return Err(FabricError::InvalidWr("max_send_sge above 32"));
        }
        if cap.max_inline_data > MAX_INLINE {
            return Err(FabricError::InvalidWr("max_inline_data above 1024"));
        }
        let qp_num = pd.fabric.ids.next_qp();
        let core = QpCore::new(qp_num, cap)?;
        let engine = Engine::new(core, pd.mrs.clone(), &pd.fabric.cfg);
        let extra = TcpQpExtra {
            qp_num,
            rtu_seen: AtomicBool::new(false),
            sock: OnceLock::new(),
            wake: OnceLock::new(),
            fabric: pd.fabric.clone(),
        };
        Ok((qp_num, engine, extra))
    }

    fn on_attach(qp: &QpShared, link: &Link) {
        let _ = qp.extra.sock.set(link.stream.as_raw_fd());
    }

    fn on_broken(qp: &QpShared) {
        if let Some(w) = qp.extra.wake.get() {
            w.ring();
        }
    }

    fn on_destroy(qp: &QpShared) {
        if let Some(&fd) = qp.extra.sock.get() {
            // The stream lives as long as the shared state (the CQ may still
            // hold it); shut it now so the peer flushes at once.
            // SAFETY: fd belongs to the link's stream, which is never closed
            // before the shared state drops; shutdown(2) does not close it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    fn arm(qp: &QpShared, wake: &Arc<pollers::Wake>) -> bool {
        let quiet = qp
            .engine
            .with("qp", |e| {
                e.sync(qp);
                e.quiet()
            })
            .unwrap_or(false);
        let x = &qp.extra;
        let Some(&fd) = x.sock.get() else {
            return false;
        };
        if !quiet {
            return false;
        }
        let first = x.wake.set(wake.clone()).is_ok();
        let wake = x.wake.get().unwrap_or(wake);
        match x.fabric.watcher.arm(x.qp_num, fd, wake, first) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(qp_num = x.qp_num, "tcp fabric: cannot arm: {e}");
                false
            }
        }
    }
}

impl SoftQpShared<PdInner> {
    /// Passive side: whether the core has read the peer's RTU.
    pub(crate) fn rtu_seen(&self) -> bool {
        self.extra.rtu_seen.load(Ordering::Acquire)
    }
}

impl SoftEngine<PdInner> for Engine {
    /// Hands the engine the connection manager's news: the connection,
    /// once; a break.
    fn sync(&mut self, qp: &QpShared) {
        if !self.linked() {
            if let Some(link) = qp.take_link() {
                self.attach(link);
            }
        }
        if qp.is_broken() {
            self.break_off();
        }
    }

    /// Drives the engine (see [`Engine::drive`]) and publishes what the
    /// connection manager and other threads look at.
    fn progress(&mut self, qp: &QpShared) {
        SoftEngine::sync(self, qp);
        self.drive();
        if self.take_rtu_seen() {
            qp.extra.rtu_seen.store(true, Ordering::Release);
        }
        qp.state.set(self.state());
    }

    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        Engine::post_send(self, wr)
    }

    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        Engine::post_recv(self, wr)
    }

    fn drain_wcs(&mut self, send: bool, recv: bool, out: &mut [Wc]) -> usize {
        Engine::drain_wcs(self, send, recv, out)
    }
}
