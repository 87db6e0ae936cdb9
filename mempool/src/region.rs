//! Regions: one allocation each, from 2 MiB hugepages when the system has them
//! reserved, else 4 KiB pages with `MADV_HUGEPAGE` (logged once, with the
//! command that reserves hugepages, and visible in [`Region::is_huge`]).
//! A shareable region lives in a memfd (`MFD_HUGETLB` when possible) that
//! another process maps with [`Region::map_fd`].

use crate::PoolError;
use std::alloc::Layout;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// The hugepage size this crate asks for.
pub const HUGE_PAGE: usize = 2 << 20;

static FALLBACK_LOGGED: Once = Once::new();
static BUDGET_LOGGED: Once = Once::new();

/// Hugepage bytes this process's regions hold, and how many regions fell
/// back to 4 KiB pages.
static HUGE_HELD: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicU64 = AtomicU64::new(0);
/// The most hugepage bytes this process takes (u64::MAX: not set yet).
static HUGE_LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Caps the hugepage bytes this process's regions take; past it, regions
/// come from 4 KiB pages (logged once, counted). By default three
/// quarters of the hugepages the host has reserved, so one process never
/// takes the host's last ones.
pub fn set_hugepage_limit(bytes: u64) {
    HUGE_LIMIT.store(bytes, Ordering::Relaxed);
}

/// Hugepage use of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HugeStats {
    /// Bytes of hugepages its regions hold.
    pub held: u64,
    /// The cap.
    pub limit: u64,
    /// Regions that came from 4 KiB pages (none reserved, or the cap).
    pub fallbacks: u64,
}

/// This process's hugepage use.
pub fn huge_stats() -> HugeStats {
    HugeStats {
        held: HUGE_HELD.load(Ordering::Relaxed),
        limit: huge_limit(),
        fallbacks: FALLBACKS.load(Ordering::Relaxed),
    }
}

fn huge_limit() -> u64 {
    let l = HUGE_LIMIT.load(Ordering::Relaxed);
    if l != u64::MAX {
        return l;
    }
    static DEFAULT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("HugePages_Total:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        total * HUGE_PAGE as u64 / 4 * 3
    })
}

/// Takes `len` hugepage bytes from the cap, if it has room.
fn take_huge(len: usize) -> bool {
    let limit = huge_limit();
    let mut cur = HUGE_HELD.load(Ordering::Relaxed);
    loop {
        if cur + len as u64 > limit {
            BUDGET_LOGGED.call_once(|| {
                tracing::warn!(
                    "the hugepage cap ({} MiB) is reached: regions come from 4 KiB pages \
                     (mempool::set_hugepage_limit)",
                    limit >> 20
                )
            });
            return false;
        }
        match HUGE_HELD.compare_exchange(cur, cur + len as u64, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

fn give_huge(len: usize) {
    HUGE_HELD.fetch_sub(len as u64, Ordering::AcqRel);
}

fn log_fallback(len: usize) {
    FALLBACKS.fetch_add(1, Ordering::Relaxed);
    FALLBACK_LOGGED.call_once(|| {
        tracing::warn!(
            "no 2 MiB hugepages available: falling back to 4 KiB pages with MADV_HUGEPAGE; \
             reserve them with: echo {} > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            len.div_ceil(HUGE_PAGE).max(64)
        );
    });
}

fn kernel_has_hugetlb() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .map(|s| s.contains("Hugepagesize:"))
            .unwrap_or(false)
    })
}

#[derive(Debug)]
enum Backing {
    /// hugepage-rs allocation.
    Huge(Layout),
    /// Anonymous 4 KiB pages.
    Anon,
    /// A memfd mapping (ours or a peer's).
    Memfd(OwnedFd),
}

/// One mapping of memory, zeroed, page aligned, unmapped on drop.
#[derive(Debug)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    huge: bool,
    /// Hugepage bytes taken from the process's cap (given back on drop).
    counted: usize,
    backing: Backing,
}

// SAFETY: a Region is plain memory owned by value; accesses go through raw
// pointers whose synchronisation is the user's (as with memory a NIC writes).
unsafe impl Send for Region {}
// SAFETY: as above: &Region hands out no references into the memory.
unsafe impl Sync for Region {}

fn mmap(len: usize, flags: libc::c_int, fd: libc::c_int) -> Option<*mut u8> {
    // SAFETY: a fresh mapping chosen by the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

fn advise_huge(p: *mut u8, len: usize) {
    // SAFETY: p/len is a mapping we just made; madvise only hints.
    unsafe { libc::madvise(p as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

impl Region {
    /// `len` bytes of private memory (hugepages when reserved).
    pub fn anonymous(len: usize) -> Result<Region, PoolError> {
        if len == 0 {
            return Err(PoolError::Empty);
        }
        let huge_len = len.next_multiple_of(HUGE_PAGE);
        let layout =
            Layout::from_size_align(huge_len, 4096).map_err(|_| PoolError::TooLarge(len))?;
        // hugepage-rs panics on a kernel without hugetlb (no Hugepagesize line).
        let p = if kernel_has_hugetlb() && take_huge(huge_len) {
            // SAFETY: layout has a non-zero size.
            let p = unsafe { hugepage_rs::alloc(layout) };
            if p.is_null() {
                give_huge(huge_len);
            }
            p
        } else {
            std::ptr::null_mut()
        };
        if !p.is_null() {
            return Ok(Region {
                ptr: p,
                len: huge_len,
                huge: true,
                counted: huge_len,
                backing: Backing::Huge(layout),
            });
        }
        log_fallback(len);
        let len = len.next_multiple_of(4096);
        let p = mmap(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
            .ok_or_else(|| PoolError::os("mmap anonymous memory"))?;
        advise_huge(p, len);
        Ok(Region {
            ptr: p,
            len,
            huge: false,
            counted: 0,
            backing: Backing::Anon,
        })
    }

    /// `len` bytes another process can map: a memfd, from hugepages when
    /// reserved (MFD_HUGETLB).
    pub fn shareable(len: usize) -> Result<Region, PoolError> {
        if len == 0 {
            return Err(PoolError::Empty);
        }
        let huge_len = len.next_multiple_of(HUGE_PAGE);
        if kernel_has_hugetlb() && take_huge(huge_len) {
            match Self::memfd(huge_len, libc::MFD_HUGETLB) {
                Some(mut r) => {
                    r.counted = huge_len;
                    return Ok(r);
                }
                None => give_huge(huge_len),
            }
        }
        log_fallback(len);
        let len = len.next_multiple_of(4096);
        let r = Self::memfd(len, 0).ok_or_else(|| PoolError::os("create a memfd"))?;
        advise_huge(r.ptr, r.len);
        Ok(r)
    }

    fn memfd(len: usize, extra: libc::c_uint) -> Option<Region> {
        // SAFETY: a constant C string.
        let fd = unsafe { libc::memfd_create(c"rtrs-mempool".as_ptr(), libc::MFD_CLOEXEC | extra) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return None;
        }
        let flags = libc::MAP_SHARED | if extra != 0 { libc::MAP_POPULATE } else { 0 };
        let p = mmap(len, flags, fd.as_raw_fd())?;
        Some(Region {
            ptr: p,
            len,
            huge: extra & libc::MFD_HUGETLB != 0,
            counted: 0,
            backing: Backing::Memfd(fd),
        })
    }

    /// Maps a shareable region from its file descriptor (received from the
    /// process that created it). `len` must not exceed the file's size.
    pub fn map_fd(fd: OwnedFd, len: usize) -> Result<Region, PoolError> {
        if len == 0 {
            return Err(PoolError::Empty);
        }
        // SAFETY: fstat into a zeroed buffer on a valid fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(PoolError::os("fstat the shared region"));
        }
        if (st.st_size as u64) < len as u64 {
            return Err(PoolError::TooLarge(len));
        }
        let p = mmap(len, libc::MAP_SHARED, fd.as_raw_fd())
            .ok_or_else(|| PoolError::os("map the shared region"))?;
        // Hugetlbfs files report their block size as the hugepage size.
        let huge = st.st_blksize as usize >= HUGE_PAGE;
        Ok(Region {
            ptr: p,
            len,
            huge,
            counted: 0,
            backing: Backing::Memfd(fd),
        })
    }

    /// First byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes (rounded up to the page size used).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the region is empty (never: regions have at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether 2 MiB hugepages back it (false: 4 KiB pages, THP advised).
    pub fn is_huge(&self) -> bool {
        self.huge
    }
    /// The memfd behind a shareable region.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::Memfd(fd) => Some(fd.as_fd()),
            _ => None,
        }
    }

    fn check(&self, off: usize, len: usize) -> Result<(), PoolError> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(PoolError::OutOfBounds { off, len }),
        }
    }

    /// Copies `data` in at `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), PoolError> {
        self.check(off, data.len())?;
        // SAFETY: in bounds (checked); the region is writable for its life.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Faults every page in now (zero-filling it), so first touches do not
    /// stall a core later: what a RAM disk wants before it serves IO. Keeps
    /// the bytes as they are.
    pub fn prefault(&self) {
        let mut off = 0;
        while off < self.len {
            // SAFETY: off < len; a volatile read then write of the same byte
            // at each page start (not optimised away) changes nothing.
            unsafe {
                let p = self.ptr.add(off);
                p.write_volatile(p.read_volatile());
            }
            off += 4096;
        }
    }

    /// Copies `data` in at `off` with non-temporal stores where the CPU has
    /// them (x86_64, 16-byte aligned, whole 64-byte lines): the old bytes
    /// are not read into the cache first, which halves the memory traffic of
    /// a RAM disk taking writes at cold places. Otherwise as [`Region::write`].
    pub fn write_stream(&self, off: usize, data: &[u8]) -> Result<(), PoolError> {
        self.check(off, data.len())?;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
            // SAFETY: pointer arithmetic within the checked range.
            let dst = unsafe { self.ptr.add(off) };
            if dst as usize % 16 == 0 && data.len() % 64 == 0 && !data.is_empty() {
                let mut i = 0;
                while i < data.len() {
                    // SAFETY: i + 16 <= len for both ranges (len % 64 == 0);
                    // dst + i is 16-byte aligned; SSE2 is part of x86_64.
                    unsafe {
                        let v = _mm_loadu_si128(data.as_ptr().add(i) as *const __m128i);
                        _mm_stream_si128(dst.add(i) as *mut __m128i, v);
                    }
                    i += 16;
                }
                // SAFETY: orders the streaming stores before later stores.
                unsafe { _mm_sfence() };
                return Ok(());
            }
        }
        self.write(off, data)
    }

    /// Copies `buf.len()` bytes out from `off`.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), PoolError> {
        self.check(off, buf.len())?;
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.counted > 0 {
            give_huge(self.counted);
        }
        match &self.backing {
            // SAFETY: allocated by hugepage_rs with this layout.
            Backing::Huge(layout) => unsafe { hugepage_rs::dealloc(self.ptr, *layout) },
            // SAFETY: our own mapping of len bytes, unmapped once.
            Backing::Anon | Backing::Memfd(_) => unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            },
        }
    }
}
