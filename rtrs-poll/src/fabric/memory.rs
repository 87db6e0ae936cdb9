//! Memory to register: the adapter between mempool regions and the fabric.
//! (Interim: a memfd mapping until mempool's shareable region lands.)

use super::soft::Mapping;
use super::{FabricError, Memory, Result};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Shareable memory: a memfd mapped shared, which a peer process can map too.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    map: Mapping,
}

// SAFETY: the mapping stays at one address for the value's life and the memfd
// maps the same pages from offset 0.
unsafe impl Memory for SharedMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.map.ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn memfd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

/// `len` bytes of zeroed shareable memory.
pub fn shareable(len: usize) -> Result<Arc<dyn Memory>> {
    if len == 0 {
        return Err(FabricError::BadMemory("empty memory"));
    }
    let (fd, map) = Mapping::memfd("rtrs-mem", len)?;
    Ok(Arc::new(SharedMemory { fd, map }))
}
