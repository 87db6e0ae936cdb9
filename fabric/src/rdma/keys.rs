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
//!   deregisters the old registration (the one syscall that kills a key
//!   there) and takes a spare registration made ahead, off the core, by
//!   the process's keys thread ([`Spares`]), which it asks for the next
//!   spare over a lock-free ring. Registering (pinning the pages) never
//!   runs on a core unless the keys thread fell behind (counted, logged
//!   once). `RTRS_RDMA_NO_MW=1` forces this mode (to test it).
//!
//! * Type-2 window, for keys made per request (`Access::PER_IO_KEY`: a
//!   client's per-IO read buffer): bound by a BIND_MW in the same chain as
//!   the request, on the QP that carries it (the window is bound to that
//!   QP), and invalidated by the peer's SEND_WITH_INV. Neither costs a
//!   syscall of its own; only when the peer did not invalidate does the
//!   next re-key drop the key first, by freeing the window for a new one
//!   (never a LOCAL_INV: see `renew_window`).
//!
//! The process-wide registry (key index -> keys) lets a LOCAL_INV work
//! request or a peer's SEND_WITH_INV find the keys to drop; a window's index
//! never changes, so the registry is written when an MR is made, not per IO.

use super::{counted, lock, FabricError, PdInner, Result};
use rdma_sys as ib;
use std::collections::HashMap;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
            counted::destroy_qp(self.qp);
            counted::destroy_cq(self.cq);
        }
    }
}

fn verbs_err(what: &'static str, rc: i32) -> FabricError {
    FabricError::io(what, std::io::Error::from_raw_os_error(rc.abs()))
}

impl Binder {
    fn new(ctx: *mut ib::ibv_context, pd: *mut ib::ibv_pd) -> Result<Binder> {
        // SAFETY: ctx is the open device; no channel, no context pointer.
        let cq = unsafe { counted::create_cq(ctx, 4) };
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
        let qp = unsafe { counted::create_qp(pd, &mut init) };
        if qp.is_null() {
            let e = FabricError::last_os("ibv_create_qp (binder)");
            // SAFETY: cq is ours and unused.
            unsafe { counted::destroy_cq(cq) };
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
        if let Err(e) = self.wait("bind a memory window") {
            // SAFETY: as above ("the user has to undo this on an error wc").
            unsafe { (*w.mw).rkey = old };
            return Err(e);
        }
        // SAFETY: as above.
        Ok(unsafe { (*w.mw).rkey })
    }

    /// Waits for the one signaled request in flight.
    fn wait(&mut self, what: &'static str) -> Result<()> {
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
                return Err(FabricError::Io {
                    what,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no completion"),
                });
            }
            std::hint::spin_loop();
        }
        if wc.status != ib::ibv_wc_status::IBV_WC_SUCCESS {
            return Err(FabricError::Io {
                what,
                source: std::io::Error::other(format!("completion status {}", wc.status)),
            });
        }
        Ok(())
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

    /// Runs one bind on a free binder (see `run`).
    fn bind(
        &self,
        ctx: *mut ib::ibv_context,
        pd: *mut ib::ibv_pd,
        w: &Window,
        len: u64,
    ) -> Result<u32> {
        self.run(ctx, pd, |b| b.bind(w, len))
    }

    /// Runs `op` on a free binder: the thread's own slot first (so cores
    /// do not meet), then any free one, else it waits for its own.
    fn run<T>(
        &self,
        ctx: *mut ib::ibv_context,
        pd: *mut ib::ibv_pd,
        op: impl FnOnce(&mut Binder) -> Result<T>,
    ) -> Result<T> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % BINDERS);
        let own = SLOT.with(|s| *s);
        for i in 0..BINDERS {
            if let Ok(mut g) = self.slots[(own + i) % BINDERS].try_lock() {
                return Self::run_on(&mut g, ctx, pd, op);
            }
        }
        Self::run_on(&mut lock(&self.slots[own]), ctx, pd, op)
    }

    fn run_on<T>(
        slot: &mut Option<Binder>,
        ctx: *mut ib::ibv_context,
        pd: *mut ib::ibv_pd,
        op: impl FnOnce(&mut Binder) -> Result<T>,
    ) -> Result<T> {
        let b = match slot {
            Some(b) => b,
            None => slot.insert(Binder::new(ctx, pd)?),
        };
        let r = op(b);
        if r.is_err() {
            // A failed request moves the QP to the error state: start afresh.
            *slot = None;
        }
        r
    }
}

/// A memory window over (part of) a local registration.
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
    /// Registration mode: the next registration, made by the keys thread
    /// (null: none ready).
    spare: AtomicPtr<ib::ibv_mr>,
    /// Keys made per IO as a type-2 window (fixed for the keys' life):
    /// bound by a request on the QP that uses it (never through a binder),
    /// dropped by the peer's SEND_WITH_INV (or by freeing it).
    type2: bool,
}

// SAFETY: the raw pointers are a registered range (kept alive by the owning
// RdmaMr), the device context (never freed) and verbs objects used under the
// `remote` mutex.
unsafe impl Send for Keys {}
// SAFETY: as above; all mutation goes through the mutex or the atomics.
unsafe impl Sync for Keys {}

/// Whether the device has type-1 memory windows (asked once, by allocating
/// one); `RTRS_RDMA_NO_MW=1` says no (registrations, to test them).
pub(super) fn windows(pd: *mut ib::ibv_pd) -> bool {
    static W: OnceLock<bool> = OnceLock::new();
    *W.get_or_init(|| !env_says("RTRS_RDMA_NO_MW") && has_windows(pd, false))
}

fn env_says(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

/// Whether the device has type-2 memory windows (asked once, likewise);
/// `RTRS_RDMA_NO_MW2=1` says no (to test the fallback).
pub(super) fn windows2(pd: *mut ib::ibv_pd) -> bool {
    static W: OnceLock<bool> = OnceLock::new();
    *W.get_or_init(|| !env_says("RTRS_RDMA_NO_MW2") && windows(pd) && has_windows(pd, true))
}

fn has_windows(pd: *mut ib::ibv_pd, type2: bool) -> bool {
    // SAFETY: pd is live; a window allocated here is freed at once.
    match unsafe { alloc_window(pd, type2) } {
        Some(mw) => {
            // SAFETY: mw was just allocated and is unbound.
            unsafe { counted::dealloc_mw(mw) };
            true
        }
        None => false,
    }
}

/// # Safety
/// `pd` must be a live PD.
unsafe fn alloc_window(pd: *mut ib::ibv_pd, type2: bool) -> Option<*mut ib::ibv_mw> {
    // SAFETY: per the contract; a provider without windows has no ops.
    let ops = unsafe { &(*(*pd).context).ops };
    if ops.bind_mw.is_none() || ops.dealloc_mw.is_none() {
        return None;
    }
    let kind = if type2 {
        ib::ibv_mw_type::IBV_MW_TYPE_2
    } else {
        ib::ibv_mw_type::IBV_MW_TYPE_1
    };
    // SAFETY: as above.
    Some(unsafe { counted::alloc_mw(pd, kind) }).filter(|mw| !mw.is_null())
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
    /// the remote rights `access`; the first key is valid at once, except
    /// with `per_io` on a device with type-2 windows: no key is valid until
    /// a re-key request binds one on a QP.
    pub(super) fn new(
        pd: Arc<PdInner>,
        ctx: *mut ib::ibv_context,
        local: *mut ib::ibv_mr,
        addr: *mut u8,
        len: usize,
        access: i32,
        per_io: bool,
    ) -> Result<Arc<Keys>> {
        let type2 = per_io && windows2(pd.pd);
        let mw = if type2 {
            // SAFETY: the PD is live.
            unsafe { alloc_window(pd.pd, true) }
        } else if windows(pd.pd) {
            // SAFETY: as above.
            unsafe { alloc_window(pd.pd, false) }
        } else {
            None
        };
        if type2 && mw.is_none() {
            return Err(FabricError::last_os("ibv_alloc_mw (type 2)"));
        }
        let remote = match mw {
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
            spare: AtomicPtr::new(std::ptr::null_mut()),
            type2,
        });
        if let (true, Some(mw)) = (type2, mw) {
            // Known by its index from the start (the registry finds it for
            // a LOCAL_INV); no key is valid yet.
            // SAFETY: the window was just allocated.
            let index = unsafe { (*mw).rkey } >> 8;
            k.index.store(index, Ordering::Release);
            lock(registry()).insert(index, Arc::downgrade(&k));
        } else {
            if mw.is_none() {
                // The first registration as a spare the re-key takes (this
                // is setup, not a core); the keys thread makes the next.
                k.make_spare()?;
            }
            k.rekey()?;
        }
        Ok(k)
    }

    /// Registers the next key's registration if none is ready (the keys
    /// thread; setup).
    fn make_spare(&self) -> Result<()> {
        if !self.spare.load(Ordering::Acquire).is_null() {
            return Ok(());
        }
        // SAFETY: the range is live (the RdmaMr keeps its memory).
        let mr = unsafe { self.pd.register(self.addr, self.len, self.access) }?;
        if self
            .spare
            .compare_exchange(
                std::ptr::null_mut(),
                mr,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            // SAFETY: ours, never published.
            unsafe { counted::dereg_mr(mr) };
        }
        Ok(())
    }

    /// The key peers may use now (0: none).
    pub(super) fn rkey(&self) -> u32 {
        self.rkey.load(Ordering::Acquire)
    }

    /// Invalidates the current key and makes a new one valid.
    pub(super) fn rekey(self: &Arc<Self>) -> Result<u32> {
        let mut r = lock(&self.remote);
        let key = match &mut *r {
            Remote::Window(_) if self.type2 => {
                return Err(FabricError::InvalidWr(
                    "a type-2 window is bound by a re-key request on the QP that uses it",
                ));
            }
            Remote::Window(w) => {
                if !w.mw.is_null() {
                    match self.pd.binders.bind(self.ctx, self.pd.pd, w, w.len) {
                        Ok(k) => k,
                        Err(e) => {
                            // E.g. a re-key request that failed on its QP left
                            // the window's key behind ours: start a new one.
                            tracing::warn!("{e}; binding a new memory window");
                            // SAFETY: the window is ours; nothing else uses it.
                            unsafe { counted::dealloc_mw(w.mw) };
                            w.mw = std::ptr::null_mut();
                            self.bind_new(w)?
                        }
                    }
                } else {
                    self.bind_new(w)?
                }
            }
            Remote::Registration(mr) => {
                // The old key dies first (deregistering is how it dies here).
                self.drop_registration(mr);
                let spare = self.spare.swap(std::ptr::null_mut(), Ordering::AcqRel);
                let new = if spare.is_null() {
                    spares().missed();
                    // SAFETY: the range is live (the RdmaMr keeps its memory).
                    unsafe { self.pd.register(self.addr, self.len, self.access) }?
                } else {
                    spares().taken();
                    spare
                };
                *mr = new;
                spares().ask(self);
                // SAFETY: a live registration.
                unsafe { (*new).rkey }
            }
        };
        drop(r);
        self.publish(key);
        Ok(key)
    }

    /// A re-key as a work request: the window's next key, or `None` when
    /// there is no window to bind (the caller re-keys at once instead). A
    /// type-2 window still bound (its peer did not invalidate it) is
    /// invalidated here first: it cannot be bound again while valid.
    pub(super) fn next_window_key(&self) -> Result<Option<u32>> {
        let mut r = lock(&self.remote);
        match &mut *r {
            Remote::Window(w) if self.type2 => {
                if w.mw.is_null() || self.rkey() != 0 {
                    // Still bound (the peer did not invalidate), or lost.
                    self.renew_window(w)?;
                }
                // SAFETY: the window is allocated; its rkey is read under the lock.
                Ok(Some(unsafe { ib::ibv_inc_rkey((*w.mw).rkey) }))
            }
            Remote::Window(w) if !w.mw.is_null() => {
                // SAFETY: as above.
                Ok(Some(unsafe { ib::ibv_inc_rkey((*w.mw).rkey) }))
            }
            _ => Ok(None),
        }
    }

    /// Drops a type-2 window's current key by freeing the window and
    /// allocating a fresh, unbound one (a new index). Never a LOCAL_INV:
    /// soft-RoCE (6.1) dereferences NULL, in the kernel, when asked to
    /// invalidate a type-2 window that is already free (e.g. its peer's
    /// SEND_WITH_INV beat us); freeing is safe in every state. The rare
    /// path (the peer did not invalidate): two syscalls.
    fn renew_window(&self, w: &mut Window) -> Result<()> {
        self.rkey.store(0, Ordering::Release);
        if !w.mw.is_null() {
            // SAFETY: the window is ours; nothing else references it.
            unsafe { counted::dealloc_mw(w.mw) };
            w.mw = std::ptr::null_mut();
        }
        // SAFETY: the PD is live.
        w.mw = unsafe { alloc_window(self.pd.pd, true) }
            .ok_or_else(|| FabricError::last_os("ibv_alloc_mw (type 2)"))?;
        self.move_index(w);
        Ok(())
    }

    /// A new window has a new index: the registry learns it.
    fn move_index(&self, w: &Window) {
        // SAFETY: the window is allocated.
        let index = unsafe { (*w.mw).rkey } >> 8;
        let old = self.index.swap(index, Ordering::AcqRel);
        let mut reg = lock(registry());
        if let Some(k) = reg.remove(&old) {
            reg.insert(index, k);
        }
    }

    /// The peer's SEND_WITH_INV dropped `rkey` (only a type-2 window's can
    /// be): no key is valid now. Returns whether `rkey` was the current key.
    /// No lock: one compare-and-swap on the current key (per read).
    pub(super) fn peer_invalidated(&self, rkey: u32) -> bool {
        self.type2
            && rkey != 0
            && self
                .rkey
                .compare_exchange(rkey, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
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
        let was = self.rkey.swap(0, Ordering::AcqRel);
        match &mut *r {
            Remote::Window(w) if self.type2 => {
                if was != 0 {
                    if let Err(e) = self.renew_window(w) {
                        // No window now: no key reaches the memory; the next
                        // re-key tries again.
                        tracing::warn!("{e}");
                    }
                }
            }
            Remote::Window(w) if !w.mw.is_null() => {
                if let Err(e) = self.pd.binders.bind(self.ctx, self.pd.pd, w, 0) {
                    // Unbinding failed: free the window, which surely kills its key.
                    tracing::warn!("{e}; freeing the memory window instead");
                    // SAFETY: the window is ours; nothing else references it.
                    unsafe { counted::dealloc_mw(w.mw) };
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
        w.mw = unsafe { alloc_window(self.pd.pd, false) }
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
                    unsafe { counted::dealloc_mw(w.mw) };
                    w.mw = std::ptr::null_mut();
                }
            }
            Remote::Registration(mr) => self.drop_registration(mr),
        }
        let mut spare = self.spare.swap(std::ptr::null_mut(), Ordering::AcqRel);
        self.drop_registration(&mut spare);
        let index = self.index.swap(u32::MAX, Ordering::AcqRel);
        if index != u32::MAX {
            lock(registry()).remove(&index);
        }
    }

    fn drop_registration(&self, mr: &mut *mut ib::ibv_mr) {
        if !mr.is_null() {
            // SAFETY: *mr is our registration; after this its rkey is dead.
            unsafe { counted::dereg_mr(*mr) };
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

/// The keys thread: makes spare registrations for keys without windows,
/// off the cores. A re-key on a core asks for the next spare by pushing the
/// keys onto a lock-free ring (no syscall, no lock); the thread drains it
/// every 100 us and registers. A re-key that finds no spare registers on
/// the core itself: counted, logged once.
pub(super) struct Spares {
    tx: pollers::mpsc::Sender<Weak<Keys>>,
    taken: AtomicU64,
    missed: AtomicU64,
    ring_full: AtomicU64,
}

/// How many spare requests may wait for the keys thread.
const SPARE_RING: usize = 65536;

/// The process's keys thread (started when first needed).
pub(super) fn spares() -> &'static Spares {
    static S: OnceLock<Spares> = OnceLock::new();
    S.get_or_init(|| {
        let (tx, mut rx) = pollers::mpsc::channel::<Weak<Keys>>(SPARE_RING);
        let started = std::thread::Builder::new()
            .name("rtrs-keys".into())
            .spawn(move || loop {
                let mut n = 0;
                rx.pop_batch(256, |w| {
                    n += 1;
                    if let Some(k) = w.upgrade() {
                        if let Err(e) = k.make_spare() {
                            tracing::warn!("spare registration: {e}");
                        }
                    }
                });
                if n == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            });
        if let Err(e) = started {
            tracing::warn!("no keys thread ({e}): re-keys without windows register on the cores");
        }
        Spares {
            tx,
            taken: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            ring_full: AtomicU64::new(0),
        }
    })
}

impl Spares {
    fn ask(&self, k: &Arc<Keys>) {
        if self.tx.push(Arc::downgrade(k)).is_err() {
            // The next re-key of these keys registers on its core.
            self.ring_full.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn taken(&self) {
        self.taken.fetch_add(1, Ordering::Relaxed);
    }
    fn missed(&self) {
        if self.missed.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "a re-key found no spare registration ready and registered on its core \
                 (the keys thread is behind; counted in rdma::spare_stats)"
            );
        }
    }
    /// (spares taken, re-keys that registered on the core, spare requests
    /// the ring had no room for).
    pub(super) fn stats(&self) -> (u64, u64, u64) {
        let r = Ordering::Relaxed;
        (
            self.taken.load(r),
            self.missed.load(r),
            self.ring_full.load(r),
        )
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
