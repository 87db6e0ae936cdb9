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
