//! The real verbs backend: libibverbs + librdmacm through `rdma-sys`.
//!
//! * Devices: librdmacm's (`rdma_get_devices`), opened once per process. A
//!   PD is on one device: `alloc_pd` gives one on the first device, and
//!   [`Pd::for_address`] one on the device that carries an address (the
//!   route's source address for a peer, the address itself for a local
//!   one), so each path of a session lives on its own link's device, as a
//!   `cm_id` to that address resolves to it. CQs, MRs and QPs are on their
//!   PD's device.
//! * QPs are created by [`Pd::create_qp`] with `ibv_create_qp`, before any
//!   connection exists, so the CM uses librdmacm's "user-managed QP" pattern:
//!   `rdma_connect`/`rdma_accept` carry the QP number in `rdma_conn_param` and
//!   no QP is attached to the `cm_id`; the CM drives INIT -> RTR -> RTS itself
//!   with the attributes `rdma_init_qp_attr` gives (overriding the retry count
//!   to 7, the RNR retry count to [`QpCap::rnr_retry`] and the RNR timer to
//!   0.64 ms), answers `CONNECT_RESPONSE` with `rdma_establish`, and moves the
//!   QP to the error state on `DISCONNECTED` so its work requests flush.
//! * Memory: see [`RdmaMr`] and `keys`. Userspace verbs cannot post fast
//!   registrations, so an MR is one local registration (its lkey never
//!   changes, it has no remote rights) plus a type-1 memory window bound over
//!   it, whose rkey is what peers use: [`Mr::rekey`] binds the window again
//!   (a new key byte, the same index), [`Mr::invalidate`] and `LOCAL_INV`
//!   unbind it. Devices without windows re-key by registering again.
//! * Private data: over IB/RoCE with `RDMA_PS_TCP` the passive side always gets
//!   56 bytes of REQ private data, whatever length was sent, so every CM
//!   message carries a 56-byte block whose last byte tags a shorter payload
//!   with its length (see [`encode_pdata`]).

mod cm;
mod counted;
mod keys;

pub use cm::RdmaCm;

use super::{
    Access, Fabric, FabricError, Memory, Mr, Opcode, Pd, Qp, QpCap, QpState, RecvWr, RekeyWr,
    Result, SendWr, Wc, WcOpcode, WcStatus, MAX_PRIVATE_DATA,
};
use keys::{invalidate_rkey, Keys};
use rdma_sys as ib;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

/// The process-wide device context (librdmacm's, so cm_ids resolve to it).
struct Device {
    ctx: *mut ib::ibv_context,
}

// SAFETY: an ibv_context is thread-safe (libibverbs serialises what needs it);
// the pointer is never freed (the device stays open for the process's life).
unsafe impl Send for Device {}
// SAFETY: as above, shared use of the context is allowed by libibverbs.
unsafe impl Sync for Device {}

fn device() -> Option<&'static Device> {
    static DEV: OnceLock<Option<Device>> = OnceLock::new();
    DEV.get_or_init(|| {
        let mut n = 0;
        // SAFETY: rdma_get_devices writes the count and returns a
        // NULL-terminated array (or NULL); we only read its first entry.
        let list = unsafe { ib::rdma_get_devices(&mut n) };
        if list.is_null() {
            return None;
        }
        let ctx = if n > 0 {
            // SAFETY: `list` is a valid array of `n` > 0 entries.
            unsafe { *list }
        } else {
            std::ptr::null_mut()
        };
        // The list is intentionally not freed: freeing it would close the
        // contexts we keep using.
        (!ctx.is_null()).then_some(Device { ctx })
    })
    .as_ref()
}

/// Whether this host has an RDMA device librdmacm can use.
pub fn available() -> bool {
    device().is_some()
}

/// Re-keys without memory windows (registrations): (spare registrations
/// taken from the keys thread, re-keys that registered on their core
/// because none was ready, spare requests the ring had no room for).
pub fn spare_stats() -> (u64, u64, u64) {
    keys::spares().stats()
}

/// Whether the device re-keys with memory windows (else by registering
/// again, which changes a key's index).
pub fn memory_windows() -> bool {
    let Ok(f) = RdmaFabric::new() else {
        return false;
    };
    f.alloc_pd().is_ok_and(|pd| keys::windows(pd.inner.pd))
}

/// The verbs fabric.
#[derive(Clone, Copy, Debug, Default)]
pub struct RdmaFabric {
    _priv: (),
}

impl RdmaFabric {
    /// A fabric over the first RDMA device, or an error when there is none.
    pub fn new() -> Result<RdmaFabric> {
        if device().is_none() {
            return Err(FabricError::Io {
                what: "open an RDMA device",
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no RDMA device"),
            });
        }
        Ok(RdmaFabric { _priv: () })
    }
}

fn dev() -> Result<&'static Device> {
    device().ok_or_else(|| FabricError::Io {
        what: "open an RDMA device",
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no RDMA device"),
    })
}

impl Fabric for RdmaFabric {
    type Pd = RdmaPd;
    type Mr = RdmaMr;
    type Cq = RdmaCq;
    type Qp = RdmaQp;
    type Cm = RdmaCm;

    fn name(&self) -> &'static str {
        "rdma"
    }

    fn remote_invalidate(&self) -> bool {
        // Keys made per IO (Access::PER_IO_KEY) are type-2 windows, which a
        // peer's SEND_WITH_INV drops; other keys are not (see `keys`).
        dev().is_ok_and(|d| RdmaPd::on(d.ctx).is_ok_and(|pd| keys::windows2(pd.inner.pd)))
    }

    fn alloc_pd(&self) -> Result<RdmaPd> {
        RdmaPd::on(dev()?.ctx)
    }

    fn create_cm(&self) -> Result<RdmaCm> {
        dev()?;
        RdmaCm::new()
    }
}

struct PdInner {
    /// The device the PD is on.
    ctx: *mut ib::ibv_context,
    pd: *mut ib::ibv_pd,
    /// QPs of this PD that bind memory windows (see `keys`).
    binders: keys::Binders,
}

// SAFETY: a PD handle may be used from any thread (verbs calls on it are
// thread-safe); it is deallocated once, on drop.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        self.binders.clear();
        // SAFETY: every MR, QP and CQ holds an Arc to us, so none is left.
        unsafe { counted::dealloc_pd(self.pd) };
    }
}

/// A protection domain.
#[derive(Clone)]
pub struct RdmaPd {
    inner: Arc<PdInner>,
}

impl RdmaPd {
    /// A PD on device `ctx` (an open context librdmacm keeps).
    fn on(ctx: *mut ib::ibv_context) -> Result<RdmaPd> {
        // SAFETY: ctx is an open device context, never closed.
        let pd = unsafe { counted::alloc_pd(ctx) };
        if pd.is_null() {
            return Err(FabricError::last_os("ibv_alloc_pd"));
        }
        Ok(RdmaPd {
            inner: Arc::new(PdInner {
                ctx,
                pd,
                binders: keys::Binders::new(),
            }),
        })
    }
}

impl std::fmt::Debug for RdmaPd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaPd").finish_non_exhaustive()
    }
}

fn ibv_access(a: Access) -> i32 {
    let mut f = 0u32;
    if a.contains(Access::LOCAL_WRITE) {
        f |= ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    }
    if a.contains(Access::REMOTE_WRITE) {
        f |= ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
    }
    if a.contains(Access::REMOTE_READ) {
        f |= ib::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    }
    f as i32
}

impl PdInner {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// The range must stay mapped until the registration is dropped.
    unsafe fn register(&self, addr: *mut u8, len: usize, access: i32) -> Result<*mut ib::ibv_mr> {
        // SAFETY: the range is mapped (the caller's contract); the PD is live.
        let mr = unsafe { counted::reg_mr(self.pd, addr.cast::<c_void>(), len, access) };
        if mr.is_null() {
            return Err(FabricError::last_os("ibv_reg_mr"));
        }
        Ok(mr)
    }
}

impl Pd<RdmaFabric> for RdmaPd {
    fn for_address(&self, addr: &super::Address, local: bool) -> Result<RdmaPd> {
        let ctx = cm::device_of(addr, local)?;
        if ctx == self.inner.ctx {
            return Ok(self.clone());
        }
        RdmaPd::on(ctx)
    }

    fn same_device(&self, other: &RdmaPd) -> bool {
        self.inner.ctx == other.inner.ctx
    }

    fn reg_mr_range(
        &self,
        mem: Arc<dyn Memory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<RdmaMr> {
        if offset.checked_add(len).is_none_or(|e| e > mem.len()) || len == 0 {
            return Err(FabricError::BadMemory("range outside the memory"));
        }
        // SAFETY: offset + len <= mem.len(), checked above.
        let addr = unsafe { mem.as_ptr().add(offset) };
        let pd = &self.inner;
        // SAFETY: the range lies in `mem`, which the MR keeps alive.
        let local = unsafe { pd.register(addr, len, keys::local_access(pd.pd)) }?;
        let remote = ibv_access(access)
            & (ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
                | ib::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0) as i32;
        let keys = if remote != 0 {
            let per_io = access.contains(Access::PER_IO_KEY);
            match Keys::new(pd.clone(), pd.ctx, local, addr, len, remote, per_io) {
                Ok(k) => Some(k),
                Err(e) => {
                    // SAFETY: `local` was registered above and is not used elsewhere.
                    unsafe { counted::dereg_mr(local) };
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(RdmaMr {
            _mem: mem,
            addr: addr as u64,
            len,
            local,
            keys,
            _pd: pd.clone(),
        })
    }

    fn create_cq(&self, depth: u32) -> Result<RdmaCq> {
        // SAFETY: the PD's device is open; no completion channel, no context.
        let cq = unsafe { counted::create_cq(self.inner.ctx, depth.max(1) as i32) };
        if cq.is_null() {
            return Err(FabricError::last_os("ibv_create_cq"));
        }
        Ok(RdmaCq {
            inner: Arc::new(CqInner {
                cq,
                soft: Mutex::new(VecDeque::new()),
                soft_pending: std::sync::atomic::AtomicBool::new(false),
                _pd: self.inner.clone(),
            }),
            buf: Vec::new(),
        })
    }

    fn create_qp(&self, send_cq: &RdmaCq, recv_cq: &RdmaCq, cap: QpCap) -> Result<RdmaQp> {
        // SAFETY: an all-zero ibv_qp_init_attr is a valid "nothing set" value.
        let mut attr: ib::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = send_cq.inner.cq;
        attr.recv_cq = recv_cq.inner.cq;
        attr.cap = ib::ibv_qp_cap {
            max_send_wr: cap.max_send_wr.max(1),
            max_recv_wr: cap.max_recv_wr.max(1),
            max_send_sge: cap.max_send_sge.max(1),
            max_recv_sge: cap.max_recv_sge.max(1),
            max_inline_data: cap.max_inline_data,
        };
        attr.qp_type = ib::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        // SAFETY: the PD and both CQs are live; attr is initialised.
        let qp = unsafe { counted::create_qp(self.inner.pd, &mut attr) };
        if qp.is_null() {
            return Err(FabricError::last_os("ibv_create_qp"));
        }
        // SAFETY: qp is a valid QP.
        let qp_num = unsafe { (*qp).qp_num };
        // Receives may be posted before the connection exists (our API's
        // Init state), which verbs allows from INIT on: go there now, on
        // port 1; the CM's INIT -> INIT transition later sets the real port
        // and pkey of the cm_id's route.
        // SAFETY: an all-zero ibv_qp_attr is valid.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_INIT;
        a.port_num = 1;
        a.pkey_index = 0;
        a.qp_access_flags = (ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ib::ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0;
        let mask = ib::ibv_qp_attr_mask::IBV_QP_STATE
            | ib::ibv_qp_attr_mask::IBV_QP_PORT
            | ib::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ib::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        // SAFETY: qp is live; `a` is initialised for the mask.
        let rc = unsafe { ib::ibv_modify_qp(qp, &mut a, mask.0 as i32) };
        if rc != 0 {
            // SAFETY: qp is ours and unused.
            unsafe { counted::destroy_qp(qp) };
            return Err(FabricError::io(
                "ibv_modify_qp to INIT",
                std::io::Error::from_raw_os_error(rc.abs()),
            ));
        }
        Ok(RdmaQp {
            inner: Arc::new(QpInner {
                qp,
                qp_num,
                cap,
                _pd: self.inner.clone(),
                _cqs: [send_cq.inner.clone(), recv_cq.inner.clone()],
                connected: std::sync::atomic::AtomicBool::new(false),
            }),
            send_soft: send_cq.inner.clone(),
            recv_soft: recv_cq.inner.clone(),
            sges: Vec::new(),
            wrs: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------
// Memory regions

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A memory region: a local registration (lkey) plus, with remote access,
/// the keys peers use (a memory window over it; see `keys`).
pub struct RdmaMr {
    _mem: Arc<dyn Memory>,
    addr: u64,
    len: usize,
    local: *mut ib::ibv_mr,
    keys: Option<Arc<Keys>>,
    /// The PD outlives its registrations (an MR without remote access has
    /// no keys to hold it): its dealloc fails (EBUSY, the PD leaked) while
    /// one is left. Dropped after `local` is deregistered.
    _pd: Arc<PdInner>,
}

// SAFETY: `local` is an ibv_mr only deregistered on drop; the rest is Sync.
unsafe impl Send for RdmaMr {}
// SAFETY: as above; &self methods only read `local` or lock `keys`.
unsafe impl Sync for RdmaMr {}

impl std::fmt::Debug for RdmaMr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaMr")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl RdmaMr {
    /// The keys peers use, which only an MR with remote access has.
    fn remote_keys(&self) -> Result<&Arc<Keys>> {
        self.keys.as_ref().ok_or(FabricError::BadMemory(
            "re-key of an MR without remote access",
        ))
    }
}

impl Drop for RdmaMr {
    fn drop(&mut self) {
        // Windows first: a registration with a window bound cannot go.
        if let Some(k) = &self.keys {
            k.release();
        }
        // SAFETY: `local` is our registration, used by nobody after this.
        unsafe { counted::dereg_mr(self.local) };
    }
}

impl Mr for RdmaMr {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn lkey(&self) -> u32 {
        // SAFETY: `local` stays registered for our life.
        unsafe { (*self.local).lkey }
    }
    fn rkey(&self) -> u32 {
        self.keys.as_ref().map_or(0, |k| k.rkey())
    }
    fn rekey(&self) -> Result<u32> {
        self.remote_keys()?.rekey()
    }
    fn invalidate(&self) {
        if let Some(k) = &self.keys {
            k.invalidate();
        }
    }
    fn peer_invalidated(&self, rkey: u32) -> bool {
        self.keys.as_ref().is_some_and(|k| k.peer_invalidated(rkey))
    }
    fn rekey_wr(&self) -> Result<RekeyWr<'_>> {
        let k = self.remote_keys()?;
        Ok(match k.next_window_key()? {
            Some(rkey) => RekeyWr::pending(rkey, Arc::as_ptr(k) as usize),
            None => RekeyWr::done(k.rekey()?),
        })
    }
}

// ---------------------------------------------------------------------------
// Completion queues

struct CqInner {
    cq: *mut ib::ibv_cq,
    /// Completions the backend makes itself (LOCAL_INV, posts on a QP in error).
    soft: Mutex<VecDeque<Wc>>,
    /// Whether `soft` may hold completions (so a poll takes no lock otherwise).
    soft_pending: std::sync::atomic::AtomicBool,
    _pd: Arc<PdInner>,
}

// SAFETY: ibv_cq handles may be used from any thread; the soft queue is locked.
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl CqInner {
    /// Adds completions made in software.
    fn push_soft(&self, wcs: impl IntoIterator<Item = Wc>) {
        let mut soft = lock(&self.soft);
        soft.extend(wcs);
        self.soft_pending
            .store(!soft.is_empty(), std::sync::atomic::Ordering::Release);
    }
}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: every QP using the CQ holds an Arc to us, so none is left.
        unsafe { counted::destroy_cq(self.cq) };
    }
}

/// A completion queue (polled with `ibv_poll_cq` in batches).
pub struct RdmaCq {
    inner: Arc<CqInner>,
    buf: Vec<ib::ibv_wc>,
}

impl std::fmt::Debug for RdmaCq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaCq").finish_non_exhaustive()
    }
}

fn wc_status(s: u32) -> WcStatus {
    use ib::ibv_wc_status as s_;
    match s {
        s_::IBV_WC_SUCCESS => WcStatus::Success,
        s_::IBV_WC_LOC_LEN_ERR => WcStatus::LocLenErr,
        s_::IBV_WC_LOC_QP_OP_ERR => WcStatus::LocQpOpErr,
        s_::IBV_WC_LOC_PROT_ERR => WcStatus::LocProtErr,
        s_::IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlushErr,
        s_::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemInvReqErr,
        s_::IBV_WC_REM_ACCESS_ERR => WcStatus::RemAccessErr,
        s_::IBV_WC_REM_OP_ERR => WcStatus::RemOpErr,
        s_::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExcErr,
        s_::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExcErr,
        _ => WcStatus::GeneralErr,
    }
}

fn wc_opcode(o: u32) -> WcOpcode {
    use ib::ibv_wc_opcode as o_;
    match o {
        o_::IBV_WC_SEND => WcOpcode::Send,
        o_::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
        o_::IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
        o_::IBV_WC_LOCAL_INV => WcOpcode::LocalInv,
        o_::IBV_WC_BIND_MW => WcOpcode::Rekey,
        o_::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
        _ => WcOpcode::Recv,
    }
}

impl super::Cq for RdmaCq {
    fn poll(&mut self, wcs: &mut [Wc]) -> usize {
        let mut n = 0;
        if self
            .inner
            .soft_pending
            .load(std::sync::atomic::Ordering::Acquire)
        {
            let mut soft = lock(&self.inner.soft);
            while n < wcs.len() {
                let Some(w) = soft.pop_front() else { break };
                wcs[n] = w;
                n += 1;
            }
            self.inner
                .soft_pending
                .store(!soft.is_empty(), std::sync::atomic::Ordering::Release);
        }
        let want = wcs.len() - n;
        if want == 0 {
            return n;
        }
        if self.buf.len() < want {
            // SAFETY: ibv_wc is plain data; all-zero is a valid value.
            self.buf.resize_with(want, || unsafe { std::mem::zeroed() });
        }
        // SAFETY: the CQ is live and `buf` has room for `want` entries.
        let got = unsafe { ib::ibv_poll_cq(self.inner.cq, want as i32, self.buf.as_mut_ptr()) };
        for w in self.buf.iter().take(got.max(0) as usize) {
            let status = wc_status(w.status);
            // Flushed completions carry no valid opcode: report what we can.
            let opcode = wc_opcode(w.opcode);
            let flags = ib::ibv_wc_flags(w.wc_flags);
            let with_imm = (flags & ib::ibv_wc_flags::IBV_WC_WITH_IMM).0 != 0 && status.is_ok();
            // Soft-RoCE (6.1) marks a received SEND_WITH_INV with the kernel's
            // IB_WC_WITH_INVALIDATE bit (1 << 2), which is userspace's
            // IBV_WC_IP_CSUM_OK: on a receive of an RC QP (no checksum
            // offload there) that bit can only mean the invalidation.
            let inv_bit = ib::ibv_wc_flags::IBV_WC_WITH_INV.0
                | if w.opcode == ib::ibv_wc_opcode::IBV_WC_RECV {
                    ib::ibv_wc_flags::IBV_WC_IP_CSUM_OK.0
                } else {
                    0
                };
            let with_inv = flags.0 & inv_bit != 0 && !with_imm && status.is_ok();
            // SAFETY: both union members are u32; which one is valid is given by the flags.
            let raw = unsafe { w.imm_data_invalidated_rkey_union.imm_data };
            let mut wc = Wc::new(w.wr_id, status, opcode, w.qp_num);
            wc.byte_len = w.byte_len;
            if with_imm {
                wc.imm = u32::from_be(raw);
                wc.with_imm = true;
            }
            if with_inv {
                // The device dropped the key (a type-2 window's): the owner
                // of the MR tells it (`Mr::peer_invalidated`), no lookup here.
                wc.invalidated_rkey = raw;
                wc.with_inv = true;
            }
            wcs[n] = wc;
            n += 1;
        }
        n
    }
}

// ---------------------------------------------------------------------------
// Queue pairs

pub(crate) struct QpInner {
    qp: *mut ib::ibv_qp,
    qp_num: u32,
    cap: QpCap,
    _pd: Arc<PdInner>,
    _cqs: [Arc<CqInner>; 2],
    /// Set by the CM once the QP is connected (RTS).
    connected: std::sync::atomic::AtomicBool,
}

// SAFETY: ibv_qp handles may be used from any thread (the CM modifies the
// state from the slow path while a core posts; libibverbs allows that).
unsafe impl Send for QpInner {}
// SAFETY: as above.
unsafe impl Sync for QpInner {}

impl Drop for QpInner {
    fn drop(&mut self) {
        // SAFETY: the last owner is gone (the Qp and the CM's connection).
        unsafe { counted::destroy_qp(self.qp) };
    }
}

impl QpInner {
    fn query_state(&self) -> u32 {
        // SAFETY: all-zero attrs are valid out-parameters.
        let mut attr: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: ib::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the QP is live; attr and init are writable.
        let rc = unsafe {
            ib::ibv_query_qp(
                self.qp,
                &mut attr,
                ib::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32,
                &mut init,
            )
        };
        if rc != 0 {
            return ib::ibv_qp_state::IBV_QPS_ERR;
        }
        attr.qp_state
    }

    /// Moves the QP to the error state (its work requests flush).
    pub(crate) fn to_error(&self) {
        // SAFETY: an all-zero ibv_qp_attr is valid; only qp_state is used.
        let mut attr: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ib::ibv_qp_state::IBV_QPS_ERR;
        // SAFETY: the QP is live and attr is initialised for the mask.
        unsafe {
            ib::ibv_modify_qp(
                self.qp,
                &mut attr,
                ib::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32,
            )
        };
    }

    /// Applies `attr` with `mask` (the CM's state transitions).
    pub(crate) fn modify(&self, attr: &mut ib::ibv_qp_attr, mask: i32) -> Result<()> {
        // SAFETY: the QP is live; attr is initialised for `mask`.
        let rc = unsafe { ib::ibv_modify_qp(self.qp, attr, mask) };
        if rc != 0 {
            return Err(FabricError::io(
                "ibv_modify_qp",
                std::io::Error::from_raw_os_error(rc.abs()),
            ));
        }
        Ok(())
    }

    pub(crate) fn qp_num(&self) -> u32 {
        self.qp_num
    }

    pub(crate) fn cap(&self) -> QpCap {
        self.cap
    }

    pub(crate) fn set_connected(&self) {
        self.connected
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// A reliable-connected queue pair.
pub struct RdmaQp {
    inner: Arc<QpInner>,
    send_soft: Arc<CqInner>,
    recv_soft: Arc<CqInner>,
    sges: Vec<ib::ibv_sge>,
    wrs: Vec<ib::ibv_send_wr>,
}

// SAFETY: the scratch vectors hold raw pointers only during a post; the
// handles inside are Send (see QpInner, CqInner).
unsafe impl Send for RdmaQp {}

impl std::fmt::Debug for RdmaQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaQp")
            .field("qp_num", &self.inner.qp_num)
            .finish_non_exhaustive()
    }
}

impl RdmaQp {
    pub(crate) fn inner(&self) -> &Arc<QpInner> {
        &self.inner
    }

    /// Whether `wr` is done in software by `post_chain`.
    fn in_software(wr: &SendWr<'_>) -> bool {
        wr.opcode == Opcode::LocalInv || wr.rekey.is_some_and(|r| r.handle == 0)
    }

    /// The keys a pending re-key request binds.
    fn rekey_keys<'a>(wr: &SendWr<'a>) -> Option<(&'a Keys, u32)> {
        let r = wr.rekey.filter(|r| r.handle != 0)?;
        // SAFETY: `handle` is the address of the Keys of an RdmaMr that
        // `r` borrows (RekeyWr::pending, made by RdmaMr::rekey_wr), so they
        // live at least as long as the request.
        Some((unsafe { &*(r.handle as *const Keys) }, r.rkey))
    }

    fn send_opcode(op: Opcode) -> u32 {
        use ib::ibv_wr_opcode as w;
        match op {
            Opcode::Send => w::IBV_WR_SEND,
            Opcode::SendWithImm => w::IBV_WR_SEND_WITH_IMM,
            Opcode::SendWithInv => w::IBV_WR_SEND_WITH_INV,
            Opcode::RdmaWrite => w::IBV_WR_RDMA_WRITE,
            Opcode::RdmaWriteWithImm => w::IBV_WR_RDMA_WRITE_WITH_IMM,
            Opcode::RdmaRead => w::IBV_WR_RDMA_READ,
            Opcode::LocalInv => w::IBV_WR_LOCAL_INV,
            Opcode::Rekey => w::IBV_WR_BIND_MW,
        }
    }

    fn check(&self, wr: &SendWr<'_>) -> Result<()> {
        let cap = self.inner.cap;
        if wr.sg_list.len() > cap.max_send_sge.max(1) as usize {
            return Err(FabricError::InvalidWr("sg list longer than max_send_sge"));
        }
        if wr.inline && wr.payload_len() > u64::from(cap.max_inline_data) {
            return Err(FabricError::InvalidWr(
                "inline payload above max_inline_data",
            ));
        }
        if wr.opcode != Opcode::LocalInv
            && !self
                .inner
                .connected
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(FabricError::BadQpState {
                qp_num: self.inner.qp_num,
                state: QpState::Init,
            });
        }
        Ok(())
    }

    /// Posts `wrs` (already checked) as one chain.
    fn post_chain(&mut self, wrs: &[SendWr<'_>]) -> Result<()> {
        // Done in software, with a completion made here (in order with the
        // rest only for the caller's bookkeeping; nothing goes on the wire):
        // LOCAL_INV of a key of ours (its window is unbound through a
        // binder, see `keys`), and a re-key `rekey_wr` did at once.
        self.sges.clear();
        self.wrs.clear();
        let mut local_done = Vec::new();
        for wr in wrs {
            if Self::in_software(wr) {
                let op = if wr.opcode == Opcode::LocalInv {
                    invalidate_rkey(wr.invalidate_rkey);
                    WcOpcode::LocalInv
                } else {
                    WcOpcode::Rekey
                };
                if wr.signaled {
                    local_done.push(Wc::new(wr.wr_id, WcStatus::Success, op, self.inner.qp_num));
                }
                continue;
            }
            for s in wr.sg_list {
                self.sges.push(ib::ibv_sge {
                    addr: s.addr,
                    length: s.len,
                    lkey: s.lkey,
                });
            }
        }
        let mut at = 0;
        for wr in wrs {
            if Self::in_software(wr) {
                continue;
            }
            let mut flags = 0u32;
            if wr.signaled {
                flags |= ib::ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if wr.inline {
                flags |= ib::ibv_send_flags::IBV_SEND_INLINE.0;
            }
            // SEND_WITH_INV goes out as it is: the kernel's RTRS client
            // asks for it (NEED_INVAL) on its fast-registered MRs, ours on
            // its per-IO read keys (type-2 windows); the device invalidates.
            // A user MR's key cannot be (rxe answers REM_INV_REQ).
            let opcode = wr.opcode;
            let imm = match opcode {
                Opcode::SendWithImm | Opcode::RdmaWriteWithImm => wr.imm.to_be(),
                _ => 0,
            };
            let n = wr.sg_list.len();
            // SAFETY: an all-zero ibv_send_wr is a valid empty request.
            let mut w: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
            w.wr_id = wr.wr_id;
            w.num_sge = n as i32;
            w.opcode = Self::send_opcode(opcode);
            w.send_flags = flags;
            w.imm_data_invalidated_rkey_union.imm_data = imm;
            if opcode == Opcode::SendWithInv {
                w.imm_data_invalidated_rkey_union.invalidated_rkey = wr.invalidate_rkey;
            }
            w.wr.rdma = ib::rdma_t {
                remote_addr: wr.remote_addr,
                rkey: wr.rkey,
            };
            if let Some((keys, rkey)) = Self::rekey_keys(wr) {
                keys.bind_wr(&mut w, rkey)?;
            }
            // sg_list pointers are filled below, once `sges` stops growing.
            w.sg_list = at as *mut ib::ibv_sge;
            at += n;
            self.wrs.push(w);
        }
        if !self.wrs.is_empty() {
            let base = self.sges.as_mut_ptr();
            let count = self.wrs.len();
            let wrs_ptr = self.wrs.as_mut_ptr();
            for i in 0..count {
                let w = &mut self.wrs[i];
                let idx = w.sg_list as usize;
                w.sg_list = if w.num_sge == 0 {
                    std::ptr::null_mut()
                } else {
                    // SAFETY: idx + num_sge <= sges.len(), by construction above.
                    unsafe { base.add(idx) }
                };
                w.next = if i + 1 < count {
                    // SAFETY: i + 1 < count, in bounds of `wrs`.
                    unsafe { wrs_ptr.add(i + 1) }
                } else {
                    std::ptr::null_mut()
                };
            }
            let mut bad: *mut ib::ibv_send_wr = std::ptr::null_mut();
            // SAFETY: the chain and its sg lists live in self.wrs/self.sges
            // for the call; the QP is live.
            let rc = unsafe { ib::ibv_post_send(self.inner.qp, wrs_ptr, &mut bad) };
            // The binds that were posted (all, or those before `bad`) hold
            // their new keys from here on.
            let posted = if rc == 0 {
                count
            } else if bad.is_null() {
                0
            } else {
                // SAFETY: `bad` points into self.wrs.
                unsafe { bad.offset_from(wrs_ptr) as usize }
            };
            let hw = wrs.iter().filter(|w| !Self::in_software(w));
            for (keys, rkey) in hw.take(posted).filter_map(Self::rekey_keys) {
                keys.bound(rkey);
            }
            if rc != 0 {
                // A QP in the error state refuses posts (EINVAL on rxe):
                // complete the refused requests with a flush, as hardware
                // that accepts the post would.
                if self.inner.query_state() == ib::ibv_qp_state::IBV_QPS_ERR {
                    let qp_num = self.inner.qp_num;
                    let hw = wrs.iter().filter(|w| !Self::in_software(w));
                    self.send_soft.push_soft(hw.skip(posted).map(|wr| {
                        Wc::new(
                            wr.wr_id,
                            WcStatus::WrFlushErr,
                            wr.opcode.wc_opcode(),
                            qp_num,
                        )
                    }));
                } else if rc == libc::ENOMEM {
                    return Err(FabricError::QueueFull {
                        queue: "send",
                        depth: self.inner.cap.max_send_wr,
                    });
                } else {
                    return Err(FabricError::io(
                        "ibv_post_send",
                        std::io::Error::from_raw_os_error(rc.abs()),
                    ));
                }
            }
        }
        if !local_done.is_empty() {
            self.send_soft.push_soft(local_done);
        }
        Ok(())
    }
}

impl Qp for RdmaQp {
    fn qp_num(&self) -> u32 {
        self.inner.qp_num
    }

    fn state(&self) -> QpState {
        use ib::ibv_qp_state as s;
        match self.inner.query_state() {
            s::IBV_QPS_RTS | s::IBV_QPS_SQD => QpState::Rts,
            s::IBV_QPS_SQE | s::IBV_QPS_ERR => QpState::Error,
            _ => QpState::Init,
        }
    }

    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        self.check(wr)?;
        self.post_chain(std::slice::from_ref(wr))
    }

    fn post_send_batch(&mut self, wrs: &[SendWr<'_>]) -> Result<()> {
        for wr in wrs {
            self.check(wr)?;
        }
        self.post_chain(wrs)
    }

    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        if wr.sg_list.len() > self.inner.cap.max_recv_sge.max(1) as usize {
            return Err(FabricError::InvalidWr("sg list longer than max_recv_sge"));
        }
        self.sges.clear();
        self.sges.extend(wr.sg_list.iter().map(|s| ib::ibv_sge {
            addr: s.addr,
            length: s.len,
            lkey: s.lkey,
        }));
        let mut w = ib::ibv_recv_wr {
            wr_id: wr.wr_id,
            next: std::ptr::null_mut(),
            sg_list: if self.sges.is_empty() {
                std::ptr::null_mut()
            } else {
                self.sges.as_mut_ptr()
            },
            num_sge: self.sges.len() as i32,
        };
        let mut bad: *mut ib::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: `w` and its sg list live for the call; the QP is live.
        let rc = unsafe { ib::ibv_post_recv(self.inner.qp, &mut w, &mut bad) };
        if rc != 0 {
            if self.inner.query_state() == ib::ibv_qp_state::IBV_QPS_ERR {
                self.recv_soft.push_soft([Wc::new(
                    wr.wr_id,
                    WcStatus::WrFlushErr,
                    WcOpcode::Recv,
                    self.inner.qp_num,
                )]);
                return Ok(());
            }
            if rc == libc::ENOMEM {
                return Err(FabricError::QueueFull {
                    queue: "recv",
                    depth: self.inner.cap.max_recv_wr,
                });
            }
            return Err(FabricError::io(
                "ibv_post_recv",
                std::io::Error::from_raw_os_error(rc.abs()),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Private data

/// Size of the private data block every CM message carries.
const PDATA_BLOCK: usize = MAX_PRIVATE_DATA;
/// Tag in the block's last byte for a payload shorter than the block.
const PDATA_TAG: u8 = 0xc0;

/// Encodes `data` (at most 56 bytes) in a 56-byte block. The passive side of
/// an IB/RoCE connection always sees 56 bytes of REQ private data, so a
/// shorter payload is zero-padded and its length tagged in the last byte
/// (`0xc0 | len`); a full 56-byte payload goes as is. A 56-byte payload that
/// itself ends in a valid tag preceded by zeros would be misread: RTRS's
/// messages end in reserved zero bytes, so they never do.
pub(crate) fn encode_pdata(data: &[u8]) -> Result<[u8; PDATA_BLOCK]> {
    if data.len() > MAX_PRIVATE_DATA {
        return Err(FabricError::PrivateDataTooLong(data.len()));
    }
    let mut b = [0u8; PDATA_BLOCK];
    b[..data.len()].copy_from_slice(data);
    if data.len() < PDATA_BLOCK {
        b[PDATA_BLOCK - 1] = PDATA_TAG | data.len() as u8;
    }
    Ok(b)
}

/// Decodes what [`encode_pdata`] made (any longer block is cut to 56 bytes).
pub(crate) fn decode_pdata(raw: &[u8]) -> super::PrivateData {
    let b = &raw[..raw.len().min(PDATA_BLOCK)];
    if b.len() == PDATA_BLOCK {
        let last = b[PDATA_BLOCK - 1];
        let n = usize::from(last & 0x3f);
        if last & 0xc0 == PDATA_TAG
            && n < PDATA_BLOCK
            && b[n..PDATA_BLOCK - 1].iter().all(|&x| x == 0)
        {
            return super::PrivateData::new(&b[..n]).unwrap_or(super::PrivateData::empty());
        }
    }
    super::PrivateData::new(b).unwrap_or(super::PrivateData::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_data_round_trips() {
        for n in 0..=MAX_PRIVATE_DATA {
            let d: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(7) | 1).collect();
            let b = encode_pdata(&d).unwrap();
            assert_eq!(decode_pdata(&b).as_bytes(), &d[..]);
            let mut long = b.to_vec();
            long.extend([0u8; 140]);
            assert_eq!(decode_pdata(&long).as_bytes(), &d[..]);
        }
        // Trailing zeros of a short payload survive.
        let b = encode_pdata(&[1, 0, 0, 0]).unwrap();
        assert_eq!(decode_pdata(&b).as_bytes(), &[1, 0, 0, 0]);
        assert!(encode_pdata(&[0; 57]).is_err());
    }
}
