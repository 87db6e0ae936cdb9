//! Remote keys: what peers use to reach an [`RdmaMr`](super::RdmaMr).
//!
//! ```text
//!   RdmaMr ── local registration: lkey (LOCAL_WRITE | MW_BIND, no remote rights)
//!      └── Keys ─┬─ Window: a type-1 memory window bound over it   (the usual case)
//!                └─ Registration: a second registration with rights (no windows)
//!   PdInner ── Binders: a few RC QPs, each connected to itself, with a CQ,
//!              that carry nothing but BIND_MW
//! ```
//!
//! * Window. Re-keying binds the window again: the provider advances the key
//!   byte (as the kernel's `ib_inc_rkey` on a fast-registered MR) and keeps
//!   the index. Invalidating binds it with length 0: no key reaches the
//!   memory until the next re-key. A bind is a work request on a QP in RTS of
//!   the same PD, so the PD keeps [`Binders`]; a re-key posts one signaled
//!   bind and polls its CQ for the completion. Nothing is pinned or
//!   registered per IO (soft-RoCE runs the bind inside the post's syscall).
//! * Registration, for devices without memory windows (siw): a re-key
//!   registers the range again and deregisters the old registration.
//!
//! The process-wide registry (key index -> keys) lets a LOCAL_INV work
//! request or a peer's SEND_WITH_INV find the keys to drop; a window's index
//! never changes, so the registry is written when an MR is made, not per IO.

use super::{lock, FabricError, PdInner, Result};
use rdma_sys as ib;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Binders per PD: one per thread that re-keys, in the common case.
const BINDERS: usize = 8;
/// `IBV_LINK_LAYER_ETHERNET` (a #define bindgen does not carry).
const LINK_LAYER_ETHERNET: u8 = 2;
/// Longest a bind may take before it counts as failed.
const BIND_TIMEOUT: Duration = Duration::from_secs(1);

/// An RC QP connected to itself (loopback) and its CQ: it is in RTS, so it
/// can post BIND_MW, and it never sends a packet.
struct Binder {
    qp: *mut ib::ibv_qp,
    cq: *mut ib::ibv_cq,
}

impl Drop for Binder {
    fn drop(&mut self) {
        // SAFETY: both are ours; the QP goes first (it uses the CQ).
        unsafe {
            ib::ibv_destroy_qp(self.qp);
            ib::ibv_destroy_cq(self.cq);
        }
    }
}

fn verbs_err(what: &'static str, rc: i32) -> FabricError {
    FabricError::io(what, std::io::Error::from_raw_os_error(rc.abs()))
}

impl Binder {
    fn new(ctx: *mut ib::ibv_context, pd: *mut ib::ibv_pd) -> Result<Binder> {
        // SAFETY: ctx is the open device; no channel, no context pointer.
        let cq =
            unsafe { ib::ibv_create_cq(ctx, 4, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(FabricError::last_os("ibv_create_cq (binder)"));
        }
        // SAFETY: all-zero init attributes are valid "nothing set" values.
        let mut init: ib::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq;
        init.recv_cq = cq;
        init.cap.max_send_wr = 4;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = ib::ibv_qp_type::IBV_QPT_RC;
        // SAFETY: pd and cq are live; init is initialised.
        let qp = unsafe { ib::ibv_create_qp(pd, &mut init) };
        if qp.is_null() {
            let e = FabricError::last_os("ibv_create_qp (binder)");
            // SAFETY: cq is ours and unused.
            unsafe { ib::ibv_destroy_cq(cq) };
            return Err(e);
        }
        let b = Binder { qp, cq };
        b.connect_to_self(ctx)?;
        Ok(b)
    }

    /// INIT -> RTR -> RTS with the QP itself as the destination, on port 1.
    fn connect_to_self(&self, ctx: *mut ib::ibv_context) -> Result<()> {
        use ib::ibv_qp_attr_mask as m;
        // SAFETY: all-zero attributes are valid; each modify sets its mask.
        let mut port: ib::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is open and `port` is writable.
        let rc = unsafe { ib::___ibv_query_port(ctx, 1, &mut port) };
        if rc != 0 {
            return Err(verbs_err("ibv_query_port", rc));
        }
        // SAFETY: as above.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_INIT;
        a.port_num = 1;
        a.qp_access_flags = ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        let mask = m::IBV_QP_STATE | m::IBV_QP_PORT | m::IBV_QP_PKEY_INDEX | m::IBV_QP_ACCESS_FLAGS;
        self.modify(&mut a, mask, "ibv_modify_qp to INIT (binder)")?;

        // SAFETY: as above.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = ib::ibv_mtu::IBV_MTU_1024;
        // SAFETY: qp is live.
        a.dest_qp_num = unsafe { (*self.qp).qp_num };
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.port_num = 1;
        if port.link_layer == LINK_LAYER_ETHERNET {
            // RoCE: addressed by GID (index 0 is always there).
            // SAFETY: ctx is open; the GID is written to a local.
            let rc = unsafe { ib::ibv_query_gid(ctx, 1, 0, &mut a.ah_attr.grh.dgid) };
            if rc != 0 {
                return Err(verbs_err("ibv_query_gid", rc));
            }
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.hop_limit = 1;
        } else {
            a.ah_attr.dlid = port.lid;
        }
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut a, mask, "ibv_modify_qp to RTR (binder)")?;

        // SAFETY: as above.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.max_rd_atomic = 1;
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_TIMEOUT
            | m::IBV_QP_RETRY_CNT
            | m::IBV_QP_RNR_RETRY
            | m::IBV_QP_SQ_PSN
            | m::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut a, mask, "ibv_modify_qp to RTS (binder)")
    }

    fn modify(
        &self,
        a: &mut ib::ibv_qp_attr,
        mask: ib::ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<()> {
        // SAFETY: qp is live and `a` is initialised for `mask`.
        let rc = unsafe { ib::ibv_modify_qp(self.qp, a, mask.0 as i32) };
        if rc != 0 {
            return Err(verbs_err(what, rc));
        }
        Ok(())
    }

    /// Binds `mw` to `len` bytes at `addr` of `mr` (length 0: unbinds) and
    /// waits for the bind to complete. Returns the window's new rkey.
    fn bind(&mut self, w: &Window, len: u64) -> Result<u32> {
        // SAFETY: all-zero is a valid ibv_mw_bind.
        let mut b: ib::ibv_mw_bind = unsafe { std::mem::zeroed() };
        b.wr_id = 1;
        b.send_flags = ib::ibv_send_flags::IBV_SEND_SIGNALED.0;
        // The MR goes along even to unbind: rxe's provider reads its lkey.
        b.bind_info.mr = w.mr;
        b.bind_info.addr = w.addr;
        b.bind_info.length = len;
        b.bind_info.mw_access_flags = w.access;
        // SAFETY: the window is allocated; the provider advances its rkey.
        let old = unsafe { (*w.mw).rkey };
        // SAFETY: qp, mw and mr are live and of one PD; `b` is initialised.
        let rc = unsafe { ib::ibv_bind_mw(self.qp, w.mw, &mut b) };
        if rc != 0 {
            return Err(verbs_err("ibv_bind_mw", rc));
        }
        // SAFETY: all-zero is a valid ibv_wc.
        let mut wc: ib::ibv_wc = unsafe { std::mem::zeroed() };
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: the CQ is live; `wc` has room for one entry.
            let n = unsafe { ib::ibv_poll_cq(self.cq, 1, &mut wc) };
            if n > 0 {
                break;
            }
            spins = spins.wrapping_add(1);
            if n < 0 || (spins % 256 == 0 && start.elapsed() > BIND_TIMEOUT) {
                // SAFETY: as above; the provider's update is undone.
                unsafe { (*w.mw).rkey = old };
                return Err(FabricError::Io {
                    what: "bind a memory window",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no completion for the bind",
                    ),
                });
            }
            std::hint::spin_loop();
        }
        if wc.status != ib::ibv_wc_status::IBV_WC_SUCCESS {
            // SAFETY: as above ("the user has to undo this on an error wc").
            unsafe { (*w.mw).rkey = old };
            return Err(FabricError::Io {
                what: "bind a memory window",
                source: std::io::Error::other(format!("completion status {}", wc.status)),
            });
        }
        // SAFETY: as above.
        Ok(unsafe { (*w.mw).rkey })
    }
}

/// A PD's binders, made when first used.
pub(super) struct Binders {
    slots: [Mutex<Option<Binder>>; BINDERS],
}

// SAFETY: a Binder's QP and CQ are only used under its slot's mutex.
unsafe impl Send for Binders {}
// SAFETY: as above.
unsafe impl Sync for Binders {}

impl Binders {
    pub(super) fn new() -> Binders {
        Binders {
            slots: std::array::from_fn(|_| Mutex::new(None)),
        }
    }

    /// Destroys every binder (before the PD goes).
    pub(super) fn clear(&self) {
        for s in &self.slots {
            lock(s).take();
        }
    }

    /// Runs one bind on a free binder: the thread's own slot first (so cores
    /// do not meet), then any free one, else it waits for its own.
    fn bind(
        &self,
        ctx: *mut ib::ibv_context,
        pd: *mut ib::ibv_pd,
        w: &Window,
        len: u64,
    ) -> Result<u32> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % BINDERS);
        let own = SLOT.with(|s| *s);
        for i in 0..BINDERS {
            if let Ok(mut g) = self.slots[(own + i) % BINDERS].try_lock() {
                return Self::bind_on(&mut g, ctx, pd, w, len);
            }
        }
        Self::bind_on(&mut lock(&self.slots[own]), ctx, pd, w, len)
    }

    fn bind_on(
        slot: &mut Option<Binder>,
        ctx: *mut ib::ibv_context,
        pd: *mut ib::ibv_pd,
        w: &Window,
        len: u64,
    ) -> Result<u32> {
        let b = match slot {
            Some(b) => b,
            None => slot.insert(Binder::new(ctx, pd)?),
        };
        let r = b.bind(w, len);
        if r.is_err() {
            // A failed bind moves the QP to the error state: start afresh.
            *slot = None;
        }
        r
    }
}

/// A type-1 memory window over (part of) a local registration.
struct Window {
    mw: *mut ib::ibv_mw,
    mr: *mut ib::ibv_mr,
    addr: u64,
    len: u64,
    access: u32,
}

enum Remote {
    /// A window (null after a failed unbind dropped it).
    Window(Window),
    /// A registration of its own (null when invalidated).
    Registration(*mut ib::ibv_mr),
}

/// The remote half of an MR.
pub(super) struct Keys {
    pd: Arc<PdInner>,
    ctx: *mut ib::ibv_context,
    addr: *mut u8,
    len: usize,
    /// ibv access flags of a remote registration or window.
    access: i32,
    remote: Mutex<Remote>,
    /// The key peers may use now (0: none).
    rkey: AtomicU32,
    /// The key index the registry knows us by.
    index: AtomicU32,
}

// SAFETY: the raw pointers are a registered range (kept alive by the owning
// RdmaMr), the device context (never freed) and verbs objects used under the
// `remote` mutex.
unsafe impl Send for Keys {}
// SAFETY: as above; all mutation goes through the mutex or the atomics.
unsafe impl Sync for Keys {}

/// Whether the device has type-1 memory windows (asked once, by allocating one).
pub(super) fn windows(pd: *mut ib::ibv_pd) -> bool {
    static W: OnceLock<bool> = OnceLock::new();
    *W.get_or_init(|| {
        // SAFETY: pd is live; a window allocated here is freed at once.
        match unsafe { alloc_window(pd) } {
            Some(mw) => {
                // SAFETY: mw was just allocated and is unbound.
                unsafe { ib::ibv_dealloc_mw(mw) };
                true
            }
            None => false,
        }
    })
}

/// # Safety
/// `pd` must be a live PD.
unsafe fn alloc_window(pd: *mut ib::ibv_pd) -> Option<*mut ib::ibv_mw> {
    // SAFETY: per the contract; a provider without windows has no ops.
    let ops = unsafe { &(*(*pd).context).ops };
    if ops.bind_mw.is_none() || ops.dealloc_mw.is_none() {
        return None;
    }
    // SAFETY: as above.
    unsafe { ib::ibv_alloc_mw(pd, ib::ibv_mw_type::IBV_MW_TYPE_1) }.filter(|mw| !mw.is_null())
}

/// Access flags for the local registration of an MR (no remote rights: a
/// registration with them would be reachable with its own, never-changing
/// key).
pub(super) fn local_access(pd: *mut ib::ibv_pd) -> i32 {
    let mut f = ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    if windows(pd) {
        f |= ib::ibv_access_flags::IBV_ACCESS_MW_BIND.0;
    }
    f as i32
}

impl Keys {
    /// Keys for `len` bytes at `addr`, registered locally as `local`, with
    /// the remote rights `access`; the first key is valid at once.
    pub(super) fn new(
        pd: Arc<PdInner>,
        ctx: *mut ib::ibv_context,
        local: *mut ib::ibv_mr,
        addr: *mut u8,
        len: usize,
        access: i32,
    ) -> Result<Arc<Keys>> {
        // SAFETY: the PD is live.
        let remote = match windows(pd.pd)
            .then(|| unsafe { alloc_window(pd.pd) })
            .flatten()
        {
            Some(mw) => Remote::Window(Window {
                mw,
                mr: local,
                addr: addr as u64,
                len: len as u64,
                access: access as u32,
            }),
            None => Remote::Registration(std::ptr::null_mut()),
        };
        let k = Arc::new(Keys {
            pd,
            ctx,
            addr,
            len,
            access: access | ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
            remote: Mutex::new(remote),
            rkey: AtomicU32::new(0),
            index: AtomicU32::new(u32::MAX),
        });
        k.rekey()?;
        Ok(k)
    }

    /// The key peers may use now (0: none).
    pub(super) fn rkey(&self) -> u32 {
        self.rkey.load(Ordering::Acquire)
    }

    /// Invalidates the current key and makes a new one valid.
    pub(super) fn rekey(self: &Arc<Self>) -> Result<u32> {
        let mut r = lock(&self.remote);
        let key = match &mut *r {
            Remote::Window(w) => {
                if !w.mw.is_null() {
                    match self.pd.binders.bind(self.ctx, self.pd.pd, w, w.len) {
                        Ok(k) => k,
                        Err(e) => {
                            // E.g. a re-key request that failed on its QP left
                            // the window's key behind ours: start a new one.
                            tracing::warn!("{e}; binding a new memory window");
                            // SAFETY: the window is ours; nothing else uses it.
                            unsafe { ib::ibv_dealloc_mw(w.mw) };
                            w.mw = std::ptr::null_mut();
                            self.bind_new(w)?
                        }
                    }
                } else {
                    self.bind_new(w)?
                }
            }
            Remote::Registration(mr) => {
                self.drop_registration(mr);
                // SAFETY: the range is live (the RdmaMr keeps its memory).
                let new = unsafe { self.pd.register(self.addr, self.len, self.access) }?;
                *mr = new;
                // SAFETY: just registered.
                unsafe { (*new).rkey }
            }
        };
        drop(r);
        self.publish(key);
        Ok(key)
    }

    /// A re-key as a work request: the window's next key, or `None` when
    /// there is no window to bind (the caller re-keys at once instead).
    pub(super) fn next_window_key(&self) -> Option<u32> {
        match &*lock(&self.remote) {
            // SAFETY: the window is allocated; its rkey is read under the lock.
            Remote::Window(w) if !w.mw.is_null() => Some(unsafe { ib::ibv_inc_rkey((*w.mw).rkey) }),
            _ => None,
        }
    }

    /// Fills `wr` (opcode and bind fields) to bind the window to `rkey`.
    pub(super) fn bind_wr(&self, wr: &mut ib::ibv_send_wr, rkey: u32) -> Result<()> {
        let r = lock(&self.remote);
        let Remote::Window(w) = &*r else {
            return Err(FabricError::InvalidWr(
                "re-key request for an MR without a window",
            ));
        };
        if w.mw.is_null() {
            return Err(FabricError::InvalidWr("re-key request for a freed window"));
        }
        wr.opcode = ib::ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.bind_mw_tso_union.bind_mw = ib::bind_mw_t {
            mw: w.mw,
            rkey,
            bind_info: ib::ibv_mw_bind_info {
                mr: w.mr,
                addr: w.addr,
                length: w.len,
                mw_access_flags: w.access,
            },
        };
        Ok(())
    }

    /// The bind request for `rkey` was posted: it is the key from now on
    /// (the provider reads the window's current key when posting).
    /// A window keeps its index, so the registry needs no update.
    pub(super) fn bound(&self, rkey: u32) {
        let r = lock(&self.remote);
        if let Remote::Window(w) = &*r {
            if !w.mw.is_null() {
                // SAFETY: the window is allocated; written under the lock.
                unsafe { (*w.mw).rkey = rkey };
            }
        }
        self.rkey.store(rkey, Ordering::Release);
    }

    /// Invalidates the current key; no key is valid until the next re-key.
    pub(super) fn invalidate(&self) {
        let mut r = lock(&self.remote);
        self.rkey.store(0, Ordering::Release);
        match &mut *r {
            Remote::Window(w) if !w.mw.is_null() => {
                if let Err(e) = self.pd.binders.bind(self.ctx, self.pd.pd, w, 0) {
                    // Unbinding failed: free the window, which surely kills its key.
                    tracing::warn!("{e}; freeing the memory window instead");
                    // SAFETY: the window is ours; nothing else references it.
                    unsafe { ib::ibv_dealloc_mw(w.mw) };
                    w.mw = std::ptr::null_mut();
                }
            }
            Remote::Window(_) => {}
            Remote::Registration(mr) => self.drop_registration(mr),
        }
    }

    /// Allocates a window for `w` and binds it.
    fn bind_new(&self, w: &mut Window) -> Result<u32> {
        // SAFETY: the PD is live.
        w.mw = unsafe { alloc_window(self.pd.pd) }
            .ok_or_else(|| FabricError::last_os("ibv_alloc_mw"))?;
        self.pd.binders.bind(self.ctx, self.pd.pd, w, w.len)
    }

    /// Invalidates `rkey` if it is the current key (LOCAL_INV, SEND_WITH_INV).
    fn invalidate_key(&self, rkey: u32) -> bool {
        if rkey == 0 || self.rkey() != rkey {
            return false;
        }
        self.invalidate();
        true
    }

    /// Frees the window or registration (before the local registration goes).
    pub(super) fn release(&self) {
        let mut r = lock(&self.remote);
        self.rkey.store(0, Ordering::Release);
        match &mut *r {
            Remote::Window(w) => {
                if !w.mw.is_null() {
                    // SAFETY: the window is ours; nothing else references it.
                    unsafe { ib::ibv_dealloc_mw(w.mw) };
                    w.mw = std::ptr::null_mut();
                }
            }
            Remote::Registration(mr) => self.drop_registration(mr),
        }
        let index = self.index.swap(u32::MAX, Ordering::AcqRel);
        if index != u32::MAX {
            lock(registry()).remove(&index);
        }
    }

    fn drop_registration(&self, mr: &mut *mut ib::ibv_mr) {
        if !mr.is_null() {
            // SAFETY: *mr is our registration; after this its rkey is dead.
            unsafe { ib::ibv_dereg_mr(*mr) };
            *mr = std::ptr::null_mut();
        }
    }

    /// Makes `key` the current one; the registry learns a new index.
    fn publish(self: &Arc<Self>, key: u32) {
        self.rkey.store(key, Ordering::Release);
        let index = key >> 8;
        let old = self.index.swap(index, Ordering::AcqRel);
        if old != index {
            let mut reg = lock(registry());
            if old != u32::MAX {
                reg.remove(&old);
            }
            reg.insert(index, Arc::downgrade(self));
        }
    }
}

/// Key index -> the keys that own it.
fn registry() -> &'static Mutex<HashMap<u32, Weak<Keys>>> {
    static R: OnceLock<Mutex<HashMap<u32, Weak<Keys>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Invalidates `rkey` wherever it lives in this process (LOCAL_INV, or a
/// peer's SEND_WITH_INV seen in a completion). Returns whether it was ours.
pub(super) fn invalidate_rkey(rkey: u32) -> bool {
    let owner = lock(registry()).get(&(rkey >> 8)).and_then(Weak::upgrade);
    owner.is_some_and(|k| k.invalidate_key(rkey))
}
