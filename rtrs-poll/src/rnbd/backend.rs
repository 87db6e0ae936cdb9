//! File and block-device backends of the RNBD server: opened with O_DIRECT
//! where the file system or device takes it, served through one io_uring per
//! connection so a slow disk never stalls the polling core (docs/rnbd.md).
//!
//! ```text
//!  on_io (core)  -> Slot[chunk] = op, the request's Deferred held -> SQE(s) (Read | Write [+ linked fdatasync] | Fsync | Fallocate)
//!  poll          -> one io_uring_enter for the batch, then CQEs -> Deferred::complete(errno)
//!                   short transfer: the rest again;  EOF / zero bytes: -EIO;  res < 0: that errno
//! ```

use crate::srv::{Deferred, IoId};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// SQ entries at most per ring (more requests wait in the handler).
const MAX_SQ_ENTRIES: u32 = 4096;
/// CQ entries at most (the kernel's IORING_MAX_CQ_ENTRIES is 65536).
const MAX_CQ_ENTRIES: u32 = 65536;

/// What backs a file export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A block device.
    Block,
}

/// An open file or block device and how IO on it must look.
#[derive(Debug)]
pub struct FileStore {
    pub(crate) file: File,
    pub(crate) kind: FileKind,
    /// Opened with O_DIRECT (else buffered, through the page cache).
    pub(crate) direct: bool,
    /// On a memory file system (tmpfs): its page cache is the data, a
    /// read or write is a copy that waits for no device, and io_uring
    /// would hand every write to a kernel worker (shmem takes no
    /// IOCB_NOWAIT writes): served at once on the core, as RAM is.
    pub(crate) inline: bool,
    /// Offsets and lengths are multiples of this (reported to the client
    /// as its logical block size).
    pub(crate) lbs: u32,
    /// The device's physical block size (at least `lbs`).
    pub(crate) pbs: u32,
    /// IO buffers must be aligned to this (O_DIRECT).
    pub(crate) mem_align: u32,
    /// The registered-file index in every connection's ring, or
    /// [`NOT_FIXED`]: not registered (an export added at runtime), named
    /// by its descriptor.
    pub(crate) fixed: u32,
    /// Size in bytes.
    pub(crate) size: u64,
}

/// A file not registered with the rings (see [`FileStore::fixed`]).
pub(crate) const NOT_FIXED: u32 = u32::MAX;

impl FileStore {
    /// The ring's name for the file: its fixed index, or its descriptor
    /// when it is not registered.
    pub(crate) fn target(&self) -> (u32, i32) {
        (self.fixed, self.file.as_raw_fd())
    }

    /// Opens `path` (a regular file or a block device) with O_DIRECT when
    /// it accepts it, else buffered; `block` requires a block device.
    pub fn open(path: &std::path::Path, write: bool, block: bool) -> std::io::Result<FileStore> {
        let open = |direct: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(path)
        };
        // (A device node on devtmpfs is a device, not tmpfs data.)
        let inline = std::fs::metadata(path)?.is_file() && on_tmpfs(path);
        let (file, direct, why) = match open(!inline) {
            Ok(f) => (f, !inline, None),
            // EINVAL: the file system does not do O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false)?, false, Some(e)),
            Err(e) => return Err(e),
        };
        let ft = file.metadata()?.file_type();
        let kind = if ft.is_block_device() {
            FileKind::Block
        } else if ft.is_file() {
            FileKind::Regular
        } else {
            return Err(std::io::Error::other(
                "neither a regular file nor a block device",
            ));
        };
        if block && kind != FileKind::Block {
            return Err(std::io::Error::other("not a block device"));
        }
        if let Some(e) = why {
            tracing::warn!(
                path = %path.display(),
                "rnbd: O_DIRECT refused ({e}): served buffered, through the page cache"
            );
        }
        let fd = file.as_raw_fd();
        let (size, lbs, pbs, mem_align) = match kind {
            FileKind::Block => {
                let mut size: u64 = 0;
                let mut lbs: libc::c_int = 0;
                let mut pbs: libc::c_uint = 0;
                // SAFETY: the block ioctls write one integer of the type
                // given into the pointed-to local; fd is open.
                let r = unsafe {
                    if libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) != 0
                        || libc::ioctl(fd, libc::BLKSSZGET as _, &mut lbs as *mut libc::c_int) != 0
                        || libc::ioctl(fd, libc::BLKPBSZGET as _, &mut pbs as *mut libc::c_uint)
                            != 0
                    {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                r?;
                let lbs = (lbs as u32).max(512);
                (size, lbs, pbs.max(lbs), lbs)
            }
            FileKind::Regular => {
                let size = file.metadata()?.len();
                let (mem, offset) = if direct { dio_align(&file) } else { (0, 0) };
                let lbs = offset.max(512);
                (size, lbs, lbs.max(4096), mem.max(512))
            }
        };
        let lbs = if lbs.is_power_of_two() && lbs <= 65536 {
            lbs
        } else {
            return Err(std::io::Error::other(format!("an odd block size {lbs}")));
        };
        Ok(FileStore {
            file,
            kind,
            direct,
            inline,
            lbs,
            pbs: pbs.clamp(lbs, 65536),
            mem_align,
            fixed: NOT_FIXED,
            size: size / u64::from(lbs) * u64::from(lbs),
        })
    }

    /// Tests: `file` (a pipe, say) served buffered as `size` bytes.
    #[cfg(test)]
    pub(crate) fn raw(file: File, size: u64) -> FileStore {
        FileStore {
            file,
            kind: FileKind::Regular,
            direct: false,
            inline: false,
            lbs: 512,
            pbs: 512,
            mem_align: 512,
            fixed: NOT_FIXED,
            size,
        }
    }

    /// `O_DIRECT, 512-byte blocks, block device` and the like.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{}, {}-byte blocks, {}",
            if self.inline {
                "tmpfs, served inline"
            } else if self.direct {
                "O_DIRECT"
            } else {
                "buffered (no O_DIRECT)"
            },
            self.lbs,
            match self.kind {
                FileKind::Regular => "file",
                FileKind::Block => "block device",
            }
        )
    }

    /// Zeroes a range at once (the synchronous fallback): punches a hole,
    /// else zeroes the range with fallocate.
    pub(crate) fn zero_sync(&self, off: u64, len: u64) -> Result<(), i32> {
        let mut last = 0;
        for mode in [PUNCH, ZERO] {
            // SAFETY: fallocate on an open fd; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off as i64, len as i64) };
            if r == 0 {
                return Ok(());
            }
            last = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if last != libc::EOPNOTSUPP {
                break;
            }
        }
        Err(-last)
    }

    /// Whether a request of `len` bytes at `off` in `buf` fits the O_DIRECT
    /// rules (always, when buffered).
    pub(crate) fn aligned(&self, off: u64, len: usize, buf: *const u8) -> bool {
        !self.direct
            || (off % u64::from(self.lbs) == 0
                && len % self.lbs as usize == 0
                && (buf as usize) % self.mem_align as usize == 0)
    }
}

/// Whether `path` is on tmpfs (a memory file system).
fn on_tmpfs(path: &std::path::Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data; all zeros is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statfs buffer.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == TMPFS_MAGIC
}

/// The O_DIRECT alignment of a regular file's memory and offsets (statx
/// STATX_DIOALIGN, Linux 6.1+); zeros when the kernel does not say.
fn dio_align(file: &File) -> (u32, u32) {
    // SAFETY: statx is plain old data; all zeros is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the empty path with AT_EMPTY_PATH names it,
    // and stx is a valid statx buffer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return (0, 0);
    }
    (stx.stx_dio_mem_align, stx.stx_dio_offset_align)
}

/// What the backends fell back on or refused, counted (and logged once).
#[derive(Debug, Default)]
pub struct BackendCounters {
    sync_fallbacks: AtomicU64,
    misaligned: AtomicU64,
    short_transfers: AtomicU64,
    fallocate_fallbacks: AtomicU64,
    io_errors: AtomicU64,
    logged: AtomicU8,
}

/// The kinds of [`BackendCounters`], for the once-only logs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    /// A connection's io_uring could not be set up: file IO is served
    /// synchronously on the core.
    SyncFallback = 0,
    /// An O_DIRECT request not aligned to the logical block size (-EINVAL).
    Misaligned = 1,
    /// A short read or write, its rest submitted again (or -EIO at EOF).
    ShortTransfer = 2,
    /// A fallocate mode the file or device does not support; the other
    /// zeroing mode was tried.
    FallocateFallback = 3,
    /// The backend answered an IO with an error (its errno to the client).
    IoError = 4,
}

impl BackendCounters {
    pub(crate) fn count(&self, ev: Event, why: &dyn std::fmt::Display) {
        let c = match ev {
            Event::SyncFallback => &self.sync_fallbacks,
            Event::Misaligned => &self.misaligned,
            Event::ShortTransfer => &self.short_transfers,
            Event::FallocateFallback => &self.fallocate_fallbacks,
            Event::IoError => &self.io_errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
        let bit = 1u8 << ev as u8;
        if self.logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(event = ?ev, "rnbd backend: {why} (further ones are counted, not logged)");
        }
    }

    /// Every kind with its short stable name (for metrics and the stop
    /// summary).
    pub fn by_kind(&self) -> [(&'static str, u64); 5] {
        [
            ("io_errors", self.io_errors()),
            ("short_transfers", self.short_transfers()),
            ("misaligned", self.misaligned()),
            ("fallocate_fallbacks", self.fallocate_fallbacks()),
            ("sync_fallbacks", self.sync_fallbacks()),
        ]
    }

    /// Connections whose io_uring could not be set up (served synchronously).
    pub fn sync_fallbacks(&self) -> u64 {
        self.sync_fallbacks.load(Ordering::Relaxed)
    }
    /// O_DIRECT requests refused as misaligned (-EINVAL).
    pub fn misaligned(&self) -> u64 {
        self.misaligned.load(Ordering::Relaxed)
    }
    /// Short reads or writes (their rest submitted again).
    pub fn short_transfers(&self) -> u64 {
        self.short_transfers.load(Ordering::Relaxed)
    }
    /// Discards or erases retried with the other fallocate mode.
    pub fn fallocate_fallbacks(&self) -> u64 {
        self.fallocate_fallbacks.load(Ordering::Relaxed)
    }
    /// IOs the backend failed (their errno went to the client).
    pub fn io_errors(&self) -> u64 {
        self.io_errors.load(Ordering::Relaxed)
    }
}

/// An IO operation on a file store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    /// A write; `true`: durable (fdatasync linked after it).
    Write(bool),
    /// fdatasync.
    Sync,
    /// fallocate with this mode (PUNCH_HOLE|KEEP_SIZE or ZERO_RANGE).
    Zero(i32),
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;

impl Op {
    /// A discard: punch a hole (a block device: discard that zeroes).
    pub(crate) const DISCARD: Op = Op::Zero(PUNCH);
    /// A secure erase: zero the range.
    pub(crate) const ERASE: Op = Op::Zero(ZERO);
}

/// One request's state, in the slot of its chunk.
#[derive(Clone, Copy, Debug)]
struct Slot {
    live: bool,
    op: Op,
    /// The fixed file, or NOT_FIXED: then `raw`, its descriptor.
    fixed: u32,
    raw: i32,
    /// The chunk's data (a pointer kept as an address: the slot is Send).
    buf: usize,
    len: u32,
    off: u64,
    /// Bytes transferred so far.
    done: u32,
    /// CQEs still to come for the submitted round.
    pending: u8,
    main_res: i32,
    sync_res: i32,
    /// A fallocate mode tried already.
    tried: i32,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            live: false,
            op: Op::Sync,
            fixed: 0,
            raw: -1,
            buf: 0,
            len: 0,
            off: 0,
            done: 0,
            pending: 0,
            main_res: 0,
            sync_res: 0,
            tried: 0,
        }
    }
}

/// One connection's io_uring: sized at setup for its session's queue depth.
pub(crate) struct Ring {
    ring: IoUring,
    slots: Box<[Slot]>,
    /// The requests in flight, by chunk: each owns the chunk its SQEs
    /// point into, so the buffer stays the kernel's until the CQE.
    reqs: Box<[Option<Deferred>]>,
    /// Requests whose SQEs did not fit yet (in order).
    waiting: VecDeque<u32>,
    /// SQEs pushed and not yet submitted.
    unsubmitted: usize,
    live: usize,
    /// The ring's workers were kept off this core (at its first IO).
    placed: bool,
    /// The chunk memory, registered as fixed buffer 0 (O_DIRECT IO in it
    /// pins no pages per IO); held so it outlives the registration.
    fixed_mem: Option<Arc<mempool::Region>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ring({} live)", self.live)
    }
}

impl Ring {
    /// A ring for `queue_depth` requests with `files` registered (index i
    /// is fixed file i).
    pub(crate) fn new(
        queue_depth: u32,
        files: &[i32],
        mem: Option<Arc<mempool::Region>>,
    ) -> std::io::Result<Ring> {
        let qd = queue_depth.max(1);
        let entries = (qd * 2).next_power_of_two().min(MAX_SQ_ENTRIES);
        // Room for every CQE of every request (two each at most), so the
        // CQ does not overflow (if it does, poll flushes it).
        let cq = (qd * 2)
            .next_power_of_two()
            .clamp(entries * 2, MAX_CQ_ENTRIES);
        Ring::with_entries(qd, entries, cq, files, mem)
    }

    /// A ring of `entries` SQEs and `cq` CQEs for `qd` requests (requests
    /// that do not fit wait in order).
    pub(crate) fn with_entries(
        qd: u32,
        entries: u32,
        cq: u32,
        files: &[i32],
        mem: Option<Arc<mempool::Region>>,
    ) -> std::io::Result<Ring> {
        let qd = qd.max(1);
        // Completions are posted when this thread next enters the kernel
        // (no interrupting IPI), and the ring says when that is needed.
        let ring = match IoUring::builder()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
        {
            Ok(r) => r,
            // Before 5.19: the plain ring.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                IoUring::builder().setup_cqsize(cq).build(entries)?
            }
            Err(e) => return Err(e),
        };
        // Every op the backend uses, or none of the ring (READ, WRITE and
        // FALLOCATE came in 5.6; the probe itself too).
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(std::io::Error::other(format!(
                    "the kernel's io_uring lacks op {code}"
                )));
            }
        }
        if !files.is_empty() {
            ring.submitter().register_files(files)?;
        }
        let fixed_mem = mem.filter(|m| {
            let iov = [libc::iovec {
                iov_base: m.as_ptr().cast(),
                iov_len: m.len(),
            }];
            // SAFETY: the region stays mapped while the ring lives (the
            // ring holds it), and the kernel only uses it for the SQEs
            // that name it, whose buffers lie in it.
            match unsafe { ring.submitter().register_buffers(&iov) } {
                Ok(()) => true,
                Err(e) => {
                    // Works without: each O_DIRECT IO pins its pages.
                    tracing::debug!("rnbd backend: chunk memory not registered: {e}");
                    false
                }
            }
        });
        Ok(Ring {
            ring,
            slots: (0..qd).map(|_| Slot::default()).collect(),
            reqs: (0..qd).map(|_| None).collect(),
            waiting: VecDeque::with_capacity(qd as usize),
            unsubmitted: 0,
            live: 0,
            placed: false,
            fixed_mem,
        })
    }

    /// Keeps the ring's kernel workers (the ops io_uring cannot run without
    /// blocking: fdatasync, fallocate, a write that must update the file's
    /// mtime) off the calling thread's CPUs: on a polling core they would
    /// wait for the poller's time slice. Called once, on the core.
    fn place_workers(&mut self) {
        self.placed = true;
        // SAFETY: cpu_set_t is plain old data; all zeros is the empty set.
        let mut mine: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: this thread's affinity into a cpu_set_t of the size given.
        let r = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut mine)
        };
        // SAFETY: sysconf only reads a system value.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        if r != 0 || online <= 0 {
            return;
        }
        // SAFETY: as above.
        let mut others: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let mut any = false;
        for cpu in 0..(online as usize).min(libc::CPU_SETSIZE as usize) {
            // SAFETY: cpu is below CPU_SETSIZE, the sets' size.
            if !unsafe { libc::CPU_ISSET(cpu, &mine) } {
                // SAFETY: as above.
                unsafe { libc::CPU_SET(cpu, &mut others) };
                any = true;
            }
        }
        if !any {
            return;
        }
        if let Err(e) = self.ring.submitter().register_iowq_aff(&others) {
            tracing::debug!("rnbd backend: cannot place the io_uring workers: {e}");
        }
    }

    /// Starts `op` for request `d` on `file` (fixed index, descriptor:
    /// see [`FileStore::target`]): a read or write moves the request's data
    /// (`len` bytes), a zeroing covers `len` bytes at `off`. The ring holds
    /// `d` until its completion ([`Ring::poll`]), or [`Ring::quiesce`].
    /// Gives `d` back when its chunk is out of range or busy (nothing
    /// started).
    pub(crate) fn start(
        &mut self,
        mut d: Deferred,
        op: Op,
        file: (u32, i32),
        len: u32,
        off: u64,
    ) -> Result<(), Deferred> {
        let id = d.id().chunk();
        match self.slots.get(id as usize) {
            Some(s) if !s.live => {}
            _ => return Err(d),
        }
        if !self.placed {
            self.place_workers();
        }
        let buf = match op {
            Op::Read | Op::Write(_) => d.data_mut().as_mut_ptr() as usize,
            Op::Sync | Op::Zero(_) => 0,
        };
        self.slots[id as usize] = Slot {
            live: true,
            op,
            fixed: file.0,
            raw: file.1,
            buf,
            len,
            off,
            ..Slot::default()
        };
        self.reqs[id as usize] = Some(d);
        self.live += 1;
        self.push_or_wait(id);
        Ok(())
    }

    fn push_or_wait(&mut self, id: u32) {
        if !self.waiting.is_empty() || !self.push(id) {
            self.waiting.push_back(id);
        }
    }

    /// Pushes the SQEs of the rest of request `id`; false when the SQ has
    /// no room for them.
    fn push(&mut self, id: u32) -> bool {
        let s = &mut self.slots[id as usize];
        let ud = u64::from(id) << 1;
        let rest = s.len - s.done;
        let at = s.off + u64::from(s.done);
        let buf = (s.buf + s.done as usize) as *mut u8;
        // In the registered chunk memory: fixed buffer 0.
        let fixed = self.fixed_mem.as_ref().is_some_and(|m| {
            let base = m.as_ptr() as usize;
            buf as usize >= base && buf as usize + rest as usize <= base + m.len()
        });
        // The same SQEs on a fixed file or a descriptor (two types).
        macro_rules! sqes {
            ($fd:expr) => {{
                let fd = $fd;
                let sync = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                let (first, then) = match s.op {
                    Op::Read if fixed => (
                        opcode::ReadFixed::new(fd, buf, rest, 0).offset(at).build(),
                        None,
                    ),
                    Op::Read => (opcode::Read::new(fd, buf, rest).offset(at).build(), None),
                    Op::Write(durable) => (
                        if fixed {
                            opcode::WriteFixed::new(fd, buf, rest, 0).offset(at).build()
                        } else {
                            opcode::Write::new(fd, buf, rest).offset(at).build()
                        },
                        durable.then_some(sync.user_data(ud | 1)),
                    ),
                    Op::Sync => (sync, None),
                    Op::Zero(mode) => (
                        opcode::Fallocate::new(fd, u64::from(s.len))
                            .offset(s.off)
                            .mode(mode)
                            .build(),
                        None,
                    ),
                };
                (first, then)
            }};
        }
        let (first, then) = if s.fixed == NOT_FIXED {
            sqes!(types::Fd(s.raw))
        } else {
            sqes!(types::Fixed(s.fixed))
        };
        let first = first.user_data(ud);
        let mut sq = self.ring.submission();
        let need = 1 + usize::from(then.is_some());
        if sq.capacity() - sq.len() < need {
            return false;
        }
        // SAFETY: the SQEs point into the request's chunk data (`buf`, the
        // rest of its `len` bytes), which its Deferred, held in `reqs` until
        // the request's last CQE, keeps claimed; `Ring::quiesce` (and so the
        // ring's drop) waits for every CQE before it lets a Deferred go;
        // the fixed file stays registered for the ring's life.
        let pushed = unsafe {
            match then {
                Some(t) => sq.push_multiple(&[first.flags(squeue::Flags::IO_LINK), t]),
                None => sq.push(&first),
            }
        };
        drop(sq);
        if pushed.is_err() {
            return false;
        }
        s.pending = need as u8;
        s.main_res = 0;
        s.sync_res = 0;
        self.unsubmitted += need;
        true
    }

    /// Submits what is pushed (one syscall for the batch) and completes
    /// the requests that finished; returns how many. `counters` counts
    /// short transfers and fallbacks.
    pub(crate) fn poll(&mut self, counters: &BackendCounters) -> usize {
        let mut n = 0;
        while let Some((id, errno)) = self.next_done(counters) {
            self.answer(id, errno);
            n += 1;
        }
        n
    }

    /// Completes request `id`'s Deferred.
    fn answer(&mut self, id: IoId, errno: i32) {
        if let Some(d) = self.reqs.get_mut(id.0 as usize).and_then(Option::take) {
            d.complete(errno);
        }
    }

    /// The next finished request with its errno; `None` when none is ready.
    fn next_done(&mut self, counters: &BackendCounters) -> Option<(IoId, i32)> {
        let mut entered = false;
        loop {
            while let Some(&id) = self.waiting.front() {
                if !self.push(id) {
                    break;
                }
                self.waiting.pop_front();
            }
            // Completions wait in the kernel: task work to run, or CQEs
            // that overflowed the CQ (the enter's GETEVENTS flushes them).
            let kernel_has = {
                let sq = self.ring.submission();
                sq.taskrun() || sq.cq_overflow()
            };
            if (self.unsubmitted > 0 || (kernel_has && !entered)) && self.live > 0 {
                entered = true;
                match self.ring.submit() {
                    Ok(n) => self.unsubmitted -= n.min(self.unsubmitted),
                    // The kernel is short of room: the SQEs stay, and
                    // the next poll tries again.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                        ) => {}
                    Err(e) => counters.count(Event::IoError, &format_args!("io_uring_enter: {e}")),
                }
            }
            let cqe = self.ring.completion().next()?;
            if let Some(done) = self.on_cqe(cqe.user_data(), cqe.result(), counters) {
                return Some(done);
            }
        }
    }

    fn on_cqe(&mut self, ud: u64, res: i32, counters: &BackendCounters) -> Option<(IoId, i32)> {
        let id = (ud >> 1) as u32;
        let s = self.slots.get_mut(id as usize)?;
        if !s.live || s.pending == 0 {
            return None;
        }
        if ud & 1 == 1 {
            s.sync_res = res;
        } else {
            s.main_res = res;
        }
        s.pending -= 1;
        if s.pending > 0 {
            return None;
        }
        let errno = match s.op {
            Op::Read | Op::Write(_) if s.main_res < 0 => s.main_res,
            Op::Read | Op::Write(_) => {
                let n = s.main_res as u32;
                if n == 0 {
                    counters.count(
                        Event::ShortTransfer,
                        &"a read or write moved no bytes (past the end of a shrunk file?): -EIO",
                    );
                    -libc::EIO
                } else if n < s.len - s.done {
                    // Never acknowledge part: the rest goes again.
                    s.done += n;
                    counters.count(
                        Event::ShortTransfer,
                        &"a short read or write: the rest is submitted again",
                    );
                    self.push_or_wait(id);
                    return None;
                } else {
                    s.sync_res.min(0)
                }
            }
            Op::Sync => s.main_res.min(0),
            Op::Zero(mode) if s.main_res == -libc::EOPNOTSUPP && s.tried == 0 => {
                s.tried = mode;
                s.op = Op::Zero(if mode == PUNCH { ZERO } else { PUNCH });
                counters.count(
                    Event::FallocateFallback,
                    &format_args!(
                        "fallocate mode {mode:#x} is not supported here: the other zeroing mode is tried"
                    ),
                );
                self.push_or_wait(id);
                return None;
            }
            Op::Zero(_) => s.main_res.min(0),
        };
        if errno < 0 {
            counters.count(
                Event::IoError,
                &format_args!(
                    "{:?} failed with errno {errno}: answered to the client",
                    s.op
                ),
            );
        }
        s.live = false;
        self.live -= 1;
        Some((IoId(id), errno))
    }

    /// Waits for every request in flight to finish (the kernel no longer
    /// touches their buffers); their completions are dropped.
    pub(crate) fn quiesce(&mut self, counters: &BackendCounters) {
        // Never submitted: nothing to wait for.
        for id in std::mem::take(&mut self.waiting) {
            let Some(s) = self.slots.get_mut(id as usize) else {
                continue;
            };
            if s.live && s.pending == 0 {
                s.live = false;
                self.live -= 1;
                self.answer(IoId(id), -libc::EIO);
            }
        }
        let since = std::time::Instant::now();
        let mut warned = false;
        while self.live > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!("rnbd backend: waiting for IO in flight at teardown: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            loop {
                let Some(cqe) = self.ring.completion().next() else {
                    break;
                };
                // The connection is closing: the answer releases the chunk.
                if let Some((id, errno)) = self.on_cqe(cqe.user_data(), cqe.result(), counters) {
                    self.answer(id, errno);
                }
            }
            // A resubmitted rest or fallback waits too: push it.
            while let Some(&id) = self.waiting.front() {
                if !self.push(id) {
                    break;
                }
                self.waiting.pop_front();
            }
            if !warned && since.elapsed() > std::time::Duration::from_secs(1) {
                warned = true;
                tracing::warn!(
                    live = self.live,
                    "rnbd backend: a closing connection waits for its IO in flight"
                );
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.live > 0 {
            self.quiesce(&BackendCounters::default());
        }
    }
}
