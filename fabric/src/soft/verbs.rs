//! The verbs objects every software backend shares: protection domain,
//! memory region, queue pair (and the state it shares between its core, its
//! CQs and its connection manager) and, in `engine.rs`, the CQ. Each is
//! generic over a [`SoftBackend`], which keeps only what differs: how a
//! memory is tagged for peers, how a QP's engine is made and driven, and
//! what happens when a QP breaks, is destroyed or is armed.
//!
//! ```text
//!  SoftPd<B> ── reg_mr ──> SoftMr<B>   (index in B's MrTable; deregistered on drop)
//!     │      └─ create_cq ─> SoftCq<SoftQpShared<B>>
//!     └──────── create_qp ─> SoftQp<B> ─ Arc ─> SoftQpShared<B>
//!                                                 qp_num, cap, state, broken,
//!                                                 destroyed, attach (from the CM),
//!                                                 CoreCell<B::Engine>, B::QpExtra
//! ```

use super::engine::{CoreCell, PolledQp, SharedState, SoftCq};
use super::mr::MrTable;
use crate::live::{Kind, Live};
use crate::{
    Access, Cq, Fabric, FabricError, Memory, Mr, Pd, Qp, QpCap, QpState, RecvWr, Result, SendWr, Wc,
};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A software backend, implemented by its protection domain's internals.
pub trait SoftBackend: Send + Sync + Sized + 'static {
    /// The backend's fabric; its objects are the generic ones over `Self`.
    type Fabric: Fabric<
        Pd = SoftPd<Self>,
        Mr = SoftMr<Self>,
        Cq = SoftCq<SoftQpShared<Self>>,
        Qp = SoftQp<Self>,
    >;
    /// The RC engine one core drives per QP.
    type Engine: SoftEngine<Self>;
    /// What the connection manager hands a QP once connected.
    type Link: Send;
    /// What else the backend's QP shares between core and CM.
    type QpExtra: Send + Sync;
    /// Names objects in `Debug` output ("Tcp", "Shm").
    const NAME: &'static str;

    /// The PD's registrations.
    fn mrs(&self) -> &MrTable;
    /// The fabric's QP numbers and CQ ids.
    fn ids(&self) -> &Ids;
    /// The tag a registration of `mem` carries (shm: its shareable region);
    /// default: none.
    fn tag(&self, mem: &Arc<dyn Memory>) -> Result<(u32, u64)> {
        let _ = mem;
        Ok((0, 0))
    }
    /// A registration tagged `region` by `tag` is gone: called exactly once
    /// per successful `tag` (MR dropped, or its registration failed after
    /// the tag). A re-key or an invalidation is not a deregistration.
    fn untag(&self, region: u32) {
        let _ = region;
    }
    /// A new QP: its number, engine and extras (`cap` checked here).
    fn new_qp(pd: &Arc<Self>, cap: QpCap) -> Result<(u32, Self::Engine, Self::QpExtra)>;
    /// The CM hands the QP `link` (before the core may see it).
    fn on_attach(qp: &SoftQpShared<Self>, link: &Self::Link) {
        let _ = (qp, link);
    }
    /// The QP was broken (by the CM or on destruction).
    fn on_broken(qp: &SoftQpShared<Self>) {
        let _ = qp;
    }
    /// The QP handle is being dropped: tell the peer at once.
    fn on_destroy(qp: &SoftQpShared<Self>);
    /// Arms an idle QP (see `Cq::arm`); default: never (keep polling).
    fn arm(qp: &SoftQpShared<Self>, wake: &Arc<pollers::Wake>) -> bool {
        let _ = (qp, wake);
        false
    }
}

/// A backend's RC engine, as the generic QP and CQ drive it.
pub trait SoftEngine<B: SoftBackend>: Send {
    /// Picks up the connection manager's news (the link, a break).
    fn sync(&mut self, qp: &SoftQpShared<B>);
    /// Drives the QP's transport (a CQ poll), `sync` first.
    fn progress(&mut self, qp: &SoftQpShared<B>);
    /// Posts a send work request.
    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()>;
    /// Posts a receive.
    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()>;
    /// Moves waiting completions for the send and/or receive CQ to `out`.
    fn drain_wcs(&mut self, send: bool, recv: bool, out: &mut [Wc]) -> usize;
}

/// A fabric's QP numbers and CQ ids, handed out from 1.
#[derive(Debug)]
pub struct Ids {
    qp: AtomicU32,
    cq: AtomicU64,
}

impl Default for Ids {
    fn default() -> Self {
        Ids {
            qp: AtomicU32::new(1),
            cq: AtomicU64::new(1),
        }
    }
}

impl Ids {
    /// A fresh QP number.
    pub(crate) fn next_qp(&self) -> u32 {
        self.qp.fetch_add(1, Ordering::Relaxed)
    }
    /// A fresh CQ id.
    pub(crate) fn next_cq(&self) -> u64 {
        self.cq.fetch_add(1, Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------
// Protection domain and memory regions.

/// A protection domain of a software backend.
pub struct SoftPd<B> {
    inner: Arc<B>,
}

impl<B> Clone for SoftPd<B> {
    fn clone(&self) -> Self {
        SoftPd {
            inner: self.inner.clone(),
        }
    }
}

impl<B: SoftBackend> std::fmt::Debug for SoftPd<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}Pd", B::NAME)
    }
}

impl<B> SoftPd<B> {
    /// A PD over the backend's internals.
    pub(crate) fn new(inner: B) -> SoftPd<B> {
        SoftPd {
            inner: Arc::new(inner),
        }
    }
    /// The backend's internals.
    pub(crate) fn backend(&self) -> &B {
        &self.inner
    }
}

/// A memory region of a software backend; deregistered on drop. Peers
/// reach it only through the owning host's core (its rkey is checked there).
pub struct SoftMr<B: SoftBackend> {
    pd: Arc<B>,
    index: u32,
    _live: Live,
}

impl<B: SoftBackend> std::fmt::Debug for SoftMr<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}Mr({})", B::NAME, self.index)
    }
}

impl<B: SoftBackend> SoftMr<B> {
    /// The backend's internals and this MR's entry in its `MrTable`.
    pub(crate) fn entry(&self) -> (&B, u32) {
        (&self.pd, self.index)
    }
}

impl<B: SoftBackend> Drop for SoftMr<B> {
    fn drop(&mut self) {
        if let Some(region) = self.pd.mrs().deregister(self.index) {
            self.pd.untag(region);
        }
    }
}

impl<B: SoftBackend> Mr for SoftMr<B> {
    fn addr(&self) -> u64 {
        self.pd.mrs().addr(self.index)
    }
    fn len(&self) -> usize {
        self.pd.mrs().len(self.index) as usize
    }
    fn lkey(&self) -> u32 {
        self.pd.mrs().lkey(self.index)
    }
    fn rkey(&self) -> u32 {
        self.pd.mrs().rkey(self.index)
    }
    fn rekey(&self) -> Result<u32> {
        Ok(self.pd.mrs().rekey(self.index))
    }
    fn invalidate(&self) {
        self.pd.mrs().invalidate_index(self.index);
    }
}

impl<B: SoftBackend> Pd<B::Fabric> for SoftPd<B> {
    fn reg_mr_range(
        &self,
        mem: Arc<dyn Memory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<SoftMr<B>> {
        let tag = self.inner.tag(&mem)?;
        let index = match self.inner.mrs().register(mem, offset, len, access, tag) {
            Ok(index) => index,
            Err(e) => {
                self.inner.untag(tag.0);
                return Err(e);
            }
        };
        Ok(SoftMr {
            pd: self.inner.clone(),
            index,
            _live: Live::new(Kind::Mr),
        })
    }

    fn create_cq(&self, depth: u32) -> Result<SoftCq<SoftQpShared<B>>> {
        if depth == 0 {
            return Err(FabricError::InvalidWr("CQ depth must be > 0"));
        }
        Ok(SoftCq::new(self.inner.ids().next_cq()))
    }

    fn create_qp(
        &self,
        send_cq: &SoftCq<SoftQpShared<B>>,
        recv_cq: &SoftCq<SoftQpShared<B>>,
        cap: QpCap,
    ) -> Result<SoftQp<B>> {
        let (qp_num, engine, extra) = B::new_qp(&self.inner, cap)?;
        let shared = Arc::new(SoftQpShared {
            qp_num,
            cap,
            state: SharedState::new(),
            broken: AtomicBool::new(false),
            destroyed: AtomicBool::new(false),
            extra,
            attach: Mutex::new(None),
            attach_ready: AtomicBool::new(false),
            engine: CoreCell::new(engine),
            _live: Live::new(Kind::Qp),
        });
        let same = send_cq.id() == recv_cq.id();
        send_cq.attach(&shared, true, same);
        if !same {
            recv_cq.attach(&shared, false, true);
        }
        Ok(SoftQp { shared })
    }
}

// ---------------------------------------------------------------------------
// Queue pairs.

/// What a QP shares between its core, its CQs and its connection manager.
pub struct SoftQpShared<B: SoftBackend> {
    pub(crate) qp_num: u32,
    pub(crate) cap: QpCap,
    /// The state the core last published.
    pub(crate) state: SharedState,
    /// Set by the connection manager (a disconnect, the peer gone) or on
    /// destruction: flush now.
    pub(crate) broken: AtomicBool,
    /// Set when the QP handle is dropped.
    pub(crate) destroyed: AtomicBool,
    /// Dropped before the link and the engine (fields drop in order): the
    /// tcp extras take the socket off the watcher while it is still open.
    pub(crate) extra: B::QpExtra,
    /// The link from the connection manager, until the core takes it.
    pub(crate) attach: Mutex<Option<B::Link>>,
    pub(crate) attach_ready: AtomicBool,
    pub(crate) engine: CoreCell<B::Engine>,
    /// Counted while any part of the QP (its handle, a CQ's or the CM's
    /// hold) lives.
    pub(crate) _live: Live,
}

impl<B: SoftBackend> std::fmt::Debug for SoftQpShared<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}QpShared({}, {:?})",
            B::NAME,
            self.qp_num,
            self.state.get()
        )
    }
}

impl<B: SoftBackend> SoftQpShared<B> {
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
    /// Hands the QP its connection; its core takes it on its next post or poll.
    pub(crate) fn attach(&self, link: B::Link) {
        B::on_attach(self, &link);
        *self.attach.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
        self.attach_ready.store(true, Ordering::Release);
    }
    /// The link, once (the core's side of `attach`).
    pub(crate) fn take_link(&self) -> Option<B::Link> {
        if !self.attach_ready.load(Ordering::Acquire) {
            return None;
        }
        self.attach.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    /// Whether the QP was broken (see `mark_broken`).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }
    /// Breaks the QP: its core flushes on its next post or poll.
    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
        B::on_broken(self);
    }
}

impl<B: SoftBackend> PolledQp for SoftQpShared<B> {
    fn destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }
    fn arm(&self, wake: &Arc<pollers::Wake>) -> bool {
        B::arm(self, wake)
    }
    fn progress_into(&self, send: bool, recv: bool, out: &mut [Wc]) -> usize {
        self.engine
            .with("qp", |e| {
                e.progress(self);
                e.drain_wcs(send, recv, out)
            })
            .unwrap_or(0)
    }
}

/// A queue pair of a software backend.
pub struct SoftQp<B: SoftBackend> {
    shared: Arc<SoftQpShared<B>>,
}

impl<B: SoftBackend> std::fmt::Debug for SoftQp<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}Qp({})", B::NAME, self.shared.qp_num)
    }
}

impl<B: SoftBackend> SoftQp<B> {
    pub(crate) fn shared(&self) -> &Arc<SoftQpShared<B>> {
        &self.shared
    }

    /// Runs a post on the engine, after it picked up the CM's news.
    fn posting(&mut self, post: impl FnOnce(&mut B::Engine) -> Result<()>) -> Result<()> {
        let s = &*self.shared;
        s.engine.with("qp", |e| {
            e.sync(s);
            post(e)
        })?
    }
}

impl<B: SoftBackend> Drop for SoftQp<B> {
    fn drop(&mut self) {
        self.shared.destroyed.store(true, Ordering::Release);
        self.shared.mark_broken();
        B::on_destroy(&self.shared);
    }
}

impl<B: SoftBackend> Qp for SoftQp<B> {
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
        self.posting(|e| e.post_send(wr))
    }
    fn post_send_batch(&mut self, wrs: &[SendWr<'_>]) -> Result<()> {
        self.posting(|e| wrs.iter().try_for_each(|wr| e.post_send(wr)))
    }
    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        self.posting(|e| e.post_recv(wr))
    }
}

// ---------------------------------------------------------------------------
// Completion queues: polling one drives its QPs' transports.

impl<Q: PolledQp> std::fmt::Debug for SoftCq<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SoftCq({}, {} qps)", self.id(), self.len())
    }
}

impl<Q: PolledQp> Cq for SoftCq<Q> {
    fn poll(&mut self, wcs: &mut [Wc]) -> usize {
        SoftCq::poll(self, wcs)
    }
    fn arm(&mut self, wake: &Arc<pollers::Wake>) -> bool {
        SoftCq::arm(self, wake)
    }
}
