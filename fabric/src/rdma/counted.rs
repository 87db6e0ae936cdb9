//! The verbs calls that make and free objects, each counted for the
//! process's census ([`crate::live`]): a make that returned an
//! object counts one, a free that succeeded one less (a free the device
//! refused, say a PD that still has an MR, leaves the object counted: it is
//! still there). Every make and free of this backend goes through here.
//!
//! # Safety
//! Each function has the contract of the verbs call it wraps.

use crate::live::{freed, made, Kind};
use rdma_sys as ib;

/// `ibv_alloc_pd`.
pub(super) unsafe fn alloc_pd(ctx: *mut ib::ibv_context) -> *mut ib::ibv_pd {
    // SAFETY: the caller's contract.
    let pd = unsafe { ib::ibv_alloc_pd(ctx) };
    if !pd.is_null() {
        made(Kind::Pd);
    }
    pd
}

/// `ibv_dealloc_pd`.
pub(super) unsafe fn dealloc_pd(pd: *mut ib::ibv_pd) {
    // SAFETY: the caller's contract.
    let rc = unsafe { ib::ibv_dealloc_pd(pd) };
    if rc == 0 {
        freed(Kind::Pd);
    } else {
        // The object is still there (and counted): a leak to see.
        tracing::warn!(
            "ibv_dealloc_pd failed ({}): it stays allocated",
            std::io::Error::from_raw_os_error(rc.abs())
        );
    }
}

/// `ibv_reg_mr`.
pub(super) unsafe fn reg_mr(
    pd: *mut ib::ibv_pd,
    addr: *mut std::ffi::c_void,
    len: usize,
    access: i32,
) -> *mut ib::ibv_mr {
    // SAFETY: the caller's contract.
    let mr = unsafe { ib::ibv_reg_mr(pd, addr, len, access) };
    if !mr.is_null() {
        made(Kind::Mr);
    }
    mr
}

/// `ibv_dereg_mr`.
pub(super) unsafe fn dereg_mr(mr: *mut ib::ibv_mr) {
    // SAFETY: the caller's contract.
    let rc = unsafe { ib::ibv_dereg_mr(mr) };
    if rc == 0 {
        freed(Kind::Mr);
    } else {
        // The object is still there (and counted): a leak to see.
        tracing::warn!(
            "ibv_dereg_mr failed ({}): it stays allocated",
            std::io::Error::from_raw_os_error(rc.abs())
        );
    }
}

/// `ibv_create_cq`, no channel, no context.
pub(super) unsafe fn create_cq(ctx: *mut ib::ibv_context, depth: i32) -> *mut ib::ibv_cq {
    // SAFETY: the caller's contract.
    let cq =
        unsafe { ib::ibv_create_cq(ctx, depth, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
    if !cq.is_null() {
        made(Kind::Cq);
    }
    cq
}

/// `ibv_destroy_cq`.
pub(super) unsafe fn destroy_cq(cq: *mut ib::ibv_cq) {
    // SAFETY: the caller's contract.
    let rc = unsafe { ib::ibv_destroy_cq(cq) };
    if rc == 0 {
        freed(Kind::Cq);
    } else {
        // The object is still there (and counted): a leak to see.
        tracing::warn!(
            "ibv_destroy_cq failed ({}): it stays allocated",
            std::io::Error::from_raw_os_error(rc.abs())
        );
    }
}

/// `ibv_create_qp`.
pub(super) unsafe fn create_qp(
    pd: *mut ib::ibv_pd,
    attr: &mut ib::ibv_qp_init_attr,
) -> *mut ib::ibv_qp {
    // SAFETY: the caller's contract.
    let qp = unsafe { ib::ibv_create_qp(pd, attr) };
    if !qp.is_null() {
        made(Kind::Qp);
    }
    qp
}

/// `ibv_destroy_qp`.
pub(super) unsafe fn destroy_qp(qp: *mut ib::ibv_qp) {
    // SAFETY: the caller's contract.
    let rc = unsafe { ib::ibv_destroy_qp(qp) };
    if rc == 0 {
        freed(Kind::Qp);
    } else {
        // The object is still there (and counted): a leak to see.
        tracing::warn!(
            "ibv_destroy_qp failed ({}): it stays allocated",
            std::io::Error::from_raw_os_error(rc.abs())
        );
    }
}

/// `ibv_alloc_mw`.
pub(super) unsafe fn alloc_mw(pd: *mut ib::ibv_pd, kind: ib::ibv_mw_type::Type) -> *mut ib::ibv_mw {
    // SAFETY: the caller's contract.
    let mw = unsafe { ib::ibv_alloc_mw(pd, kind) }.unwrap_or(std::ptr::null_mut());
    if !mw.is_null() {
        made(Kind::Mw);
    }
    mw
}

/// `ibv_dealloc_mw`.
pub(super) unsafe fn dealloc_mw(mw: *mut ib::ibv_mw) {
    // SAFETY: the caller's contract.
    let rc = unsafe { ib::ibv_dealloc_mw(mw) };
    if rc == 0 {
        freed(Kind::Mw);
    } else {
        // The object is still there (and counted): a leak to see.
        tracing::warn!(
            "ibv_dealloc_mw failed ({}): it stays allocated",
            std::io::Error::from_raw_os_error(rc.abs())
        );
    }
}
