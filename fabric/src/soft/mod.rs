//! Software backends that keep RDMA semantics where there is no RDMA NIC.
//!
//! ```text
//!   shm  one host: rings and registered memory in memfds both sides map;
//!        the responder copies once, straight between registered memories
//!   tcp  hosts over TCP: framed verbs over busy-polled non-blocking sockets
//! ```
//! Both keep what a NIC enforces: rkeys are checked (wrong, invalidated or out
//! of bounds: `RemAccessErr` and the QP goes to error), a SEND with no receive
//! posted stalls (RNR retry; `RnrRetryExcErr` when the budget is finite), a
//! peer that goes away flushes everything outstanding (`WrFlushErr`) and raises
//! a disconnect event.

/// Request opcodes on the wire of both software backends (shm descriptors,
/// tcp frames).
pub mod op {
    /// SEND.
    pub const SEND: u8 = 1;
    /// SEND_WITH_IMM.
    pub const SEND_IMM: u8 = 2;
    /// SEND_WITH_INV.
    pub const SEND_INV: u8 = 3;
    /// RDMA_WRITE.
    pub const WRITE: u8 = 4;
    /// RDMA_WRITE_WITH_IMM.
    pub const WRITE_IMM: u8 = 5;
    /// RDMA_READ (no payload travels with the request).
    pub const READ: u8 = 6;
}

pub(crate) mod cm;
pub(crate) mod engine;
pub(crate) mod mr;
pub mod shm;
pub mod tcp;
pub(crate) mod verbs;

use super::{FabricError, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Zeroed heap memory to register (tests, fuzzing: peers in the same
/// process reach it; it has no memfd).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Heap(Box<[u8]>);

#[cfg_attr(not(test), allow(dead_code))]
impl Heap {
    pub(crate) fn zeroed(len: usize) -> Heap {
        Heap(vec![0u8; len].into_boxed_slice())
    }
}

// SAFETY: a boxed slice never moves while the Box lives, so `as_ptr` stays
// valid for reads and writes of `len` bytes until the Heap drops.
unsafe impl super::Memory for Heap {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn memfd(&self) -> Option<RawFd> {
        None
    }
}

/// A shared mapping of a file (a memfd of ours or a peer's), unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access through it is by
// raw pointer (or atomics) and synchronised by the protocol that uses it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Creates a memfd of `len` bytes and maps it.
    pub(crate) fn memfd(name: &str, len: usize) -> Result<(OwnedFd, Mapping)> {
        let cname = std::ffi::CString::new(name).map_err(|_| FabricError::BadMemory("name"))?;
        // SAFETY: cname is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(FabricError::last_os("memfd_create"));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The owner's alone: a memfd is born 777, and a peer reaches it by
        // /proc/PID/fd, which checks the file's mode too.
        // SAFETY: fchmod on our own memfd.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
            return Err(FabricError::last_os("fchmod memfd"));
        }
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(FabricError::last_os("ftruncate memfd"));
        }
        let map = Mapping::map_fd(fd.as_raw_fd(), len)?;
        Ok((fd, map))
    }

    /// Maps `len` bytes of `fd` shared, read-write.
    pub(crate) fn map_fd(fd: RawFd, len: usize) -> Result<Mapping> {
        if len == 0 {
            return Err(FabricError::BadMemory("empty mapping"));
        }
        // SAFETY: a fresh shared mapping chosen by the kernel; fd is valid.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(FabricError::last_os("mmap"));
        }
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Maps a descriptor of another process (or ours) through /proc, after
    /// checking the file is at least `len` bytes long.
    pub(crate) fn map_peer(pid: u32, fd: i32, len: usize) -> Result<Mapping> {
        let path = std::ffi::CString::new(format!("/proc/{pid}/fd/{fd}"))
            .map_err(|_| FabricError::BadMemory("path"))?;
        // SAFETY: path is a valid C string.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(FabricError::last_os("open the peer's memory through /proc"));
        }
        // SAFETY: raw is a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fstat into a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: owned is valid, st is writable.
        if unsafe { libc::fstat(owned.as_raw_fd(), &mut st) } != 0 {
            return Err(FabricError::last_os("fstat the peer's memory"));
        }
        if (st.st_size as u64) < len as u64 {
            return Err(FabricError::Protocol(
                "peer memory is shorter than announced",
            ));
        }
        Mapping::map_fd(owned.as_raw_fd(), len)
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    /// Pointer to `len` bytes at `off`, if they lie inside the mapping.
    pub(crate) fn at(&self, off: u64, len: u64) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: off + len <= self.len, so the result stays inside the mapping.
        Some(unsafe { self.ptr.add(off as usize) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Copies between two scatter lists of raw segments, in order, up to the
/// shorter total. Returns the bytes copied.
///
/// # Safety
/// Every `(ptr, len)` must be valid for reads (src) or writes (dst) of `len`
/// bytes for the duration of the call; segments may overlap other processes'
/// concurrent accesses (that is the RDMA contract) but not each other.
pub(crate) unsafe fn sg_copy(src: &[(*const u8, usize)], dst: &[(*mut u8, usize)]) -> usize {
    // Lines another core wrote arrive one cache miss at a time unless asked for
    // together: touch every source line first so the misses overlap.
    for &(p, n) in src {
        if n >= 1024 {
            prefetch(p, n);
        }
    }
    let (mut si, mut so, mut di, mut doff, mut total) = (0, 0, 0, 0, 0);
    while si < src.len() && di < dst.len() {
        let (sp, sl) = src[si];
        let (dp, dl) = dst[di];
        let n = (sl - so).min(dl - doff);
        if n > 0 {
            // SAFETY: within both segments by the loop bounds; the caller vouches
            // for the segments themselves.
            unsafe { std::ptr::copy_nonoverlapping(sp.add(so), dp.add(doff), n) };
        }
        so += n;
        doff += n;
        total += n;
        if so == sl {
            si += 1;
            so = 0;
        }
        if doff == dl {
            di += 1;
            doff = 0;
        }
    }
    total
}

/// A short list on the stack, up to `N` entries, of which only the pushed
/// ones are ever written: building one costs nothing (a zeroed array of 33
/// segments was a 528-byte memset per request on the data path).
pub(crate) struct StackList<T: Copy, const N: usize> {
    buf: [std::mem::MaybeUninit<T>; N],
    len: usize,
}

impl<T: Copy, const N: usize> StackList<T, N> {
    pub(crate) const fn new() -> Self {
        StackList {
            buf: [const { std::mem::MaybeUninit::uninit() }; N],
            len: 0,
        }
    }

    /// Appends `v`; false (and nothing appended) when full.
    #[inline]
    pub(crate) fn push(&mut self, v: T) -> bool {
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                slot.write(v);
                self.len += 1;
                true
            }
            None => false,
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: the first `len` entries were written by `push` (len <= N),
        // and MaybeUninit<T> has T's layout.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const T, self.len) }
    }
}

/// Hints the CPU to fetch `len` bytes at `p` into cache.
#[inline]
fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut off = 0;
        while off < len {
            // SAFETY: a prefetch is only a hint: it never faults and reads nothing
            // the program can observe, even for an address outside any mapping.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.wrapping_add(off) as *const i8,
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_list_holds_what_was_pushed() {
        let mut l: StackList<(u32, u64), 3> = StackList::new();
        assert!(l.as_slice().is_empty());
        assert!(l.push((1, 10)));
        assert!(l.push((2, 20)));
        assert!(l.push((3, 30)));
        assert!(!l.push((4, 40)), "full");
        assert_eq!(l.as_slice(), &[(1, 10), (2, 20), (3, 30)]);
    }

    #[test]
    fn memfds_are_the_owners_alone() {
        let (fd, _map) = Mapping::memfd("perm-test", 4096).unwrap();
        // SAFETY: fstat into a zeroed stat buffer on our own descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is valid, st writable.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        assert_eq!(st.st_mode & 0o777, 0o600, "mode {:o}", st.st_mode & 0o777);
    }
}
