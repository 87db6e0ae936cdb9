//! Memory to register: mempool regions seen through the fabric's [`Memory`].

use super::{FabricError, Memory, Result};
use mempool::Region;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

// SAFETY: a Region is one mapping that stays at one address, valid for reads
// and writes over `len()` bytes, until it is dropped; a shareable region's
// memfd maps the same pages from offset 0.
unsafe impl Memory for Region {
    fn as_ptr(&self) -> *mut u8 {
        Region::as_ptr(self)
    }
    fn len(&self) -> usize {
        Region::len(self)
    }
    fn memfd(&self) -> Option<RawFd> {
        self.fd().map(|fd| fd.as_raw_fd())
    }
}

/// At least `len` bytes of zeroed shareable memory (a mempool region: from
/// hugepages when reserved), which a peer process can map.
pub fn shareable(len: usize) -> Result<Arc<dyn Memory>> {
    if len == 0 {
        return Err(FabricError::BadMemory("empty memory"));
    }
    let r = Region::shareable(len).map_err(|e| FabricError::Io {
        what: "create a shareable mempool region",
        source: std::io::Error::other(e),
    })?;
    Ok(Arc::new(r))
}

/// The bytes `off..off + len` of `mem` as a shared slice, or `None` when out
/// of range.
///
/// # Safety
/// Registered memory can be written by a peer (RDMA) at any time. The caller
/// must own the range by protocol for the slice's life: no peer may write it
/// (its rkey is invalidated, or the peer waits for a response before it
/// touches the range again), and no `bytes_mut` slice over it exists.
pub unsafe fn bytes(mem: &dyn Memory, off: usize, len: usize) -> Option<&[u8]> {
    let end = off.checked_add(len)?;
    if end > mem.len() {
        return None;
    }
    // SAFETY: in bounds (checked); valid for reads by Memory's contract;
    // exclusive ownership of the range is the caller's promise.
    Some(unsafe { std::slice::from_raw_parts(mem.as_ptr().add(off), len) })
}

/// The bytes `off..off + len` of `mem` as a mutable slice, or `None` when
/// out of range.
///
/// # Safety
/// As [`bytes`], and no other slice over the range may exist while this one
/// lives.
#[allow(clippy::mut_from_ref)]
pub unsafe fn bytes_mut(mem: &dyn Memory, off: usize, len: usize) -> Option<&mut [u8]> {
    let end = off.checked_add(len)?;
    if end > mem.len() {
        return None;
    }
    // SAFETY: in bounds (checked); valid for writes by Memory's contract;
    // exclusivity is the caller's promise.
    Some(unsafe { std::slice::from_raw_parts_mut(mem.as_ptr().add(off), len) })
}
