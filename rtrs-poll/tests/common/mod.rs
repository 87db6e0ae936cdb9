//! Shared by the integration tests: memory for registrations, and the fabric
//! conformance suite every backend runs.
#![allow(dead_code)]

pub mod conformance;

use rtrs_poll::fabric::Memory;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Shareable memory for tests: a memfd mapped shared.
pub struct TestMem {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory, accessed by raw pointer.
unsafe impl Send for TestMem {}
// SAFETY: as above.
unsafe impl Sync for TestMem {}

impl TestMem {
    pub fn new(len: usize) -> Arc<TestMem> {
        // SAFETY: constant C string.
        let fd = unsafe { libc::memfd_create(c"rtrs-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: our memfd.
        assert_eq!(
            unsafe { libc::ftruncate(fd.as_raw_fd(), len.max(1) as i64) },
            0
        );
        // SAFETY: shared mapping of our memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Arc::new(TestMem {
            fd,
            ptr: ptr as *mut u8,
            len,
        })
    }
    pub fn fill(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: in bounds (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) };
        v
    }
    pub fn addr(&self, off: usize) -> u64 {
        self.ptr as u64 + off as u64
    }
}

impl Drop for TestMem {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len.max(1)) };
    }
}

// SAFETY: the mapping lives as long as the value and the memfd maps the same pages.
unsafe impl Memory for TestMem {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn memfd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

/// A deterministic pattern, different for every seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
