//! The file and block-device backends through the RNBD handler: round trips
//! of every op on tmpfs, on a disk file system (O_DIRECT), synchronously,
//! on a loop device; errnos (ENOSPC, EOF as EIO, misaligned O_DIRECT); a
//! slow backend beside a fast one on one thread; teardown with IO in flight.
//! Tests that need root (mounts, loop devices) say so and pass when not.

use super::backend::{BackendCounters, FileStore, Op, Ring};
use super::srv::{Export, RnbdHandler, RnbdServer};
use crate::srv::deferred::testkit::Bench;
use crate::srv::{ConInfo, Handler, IoDir, Verdict};
use rtrs_proto::rnbd::*;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const KB: usize = 1024;

fn server(exports: Vec<Export>) -> Arc<RnbdServer> {
    RnbdServer::new(exports, 128 << 10).unwrap()
}

/// A connection's handler, its chunks and the completions it reported.
struct Con {
    h: RnbdHandler,
    bench: Bench,
    done: HashMap<u32, i32>,
}

impl Con {
    fn new(srv: &Arc<RnbdServer>, uuid: u8) -> Con {
        let h = srv.handler(&ConInfo {
            paths_uuid: [uuid; 16],
            sess_uuid: [uuid; 16],
            cid: 1,
            queue_depth: 16,
            chunk_memory: None,
            peer: "test".into(),
            identity: Arc::new(OnceLock::new()),
        });
        Con {
            h,
            bench: Bench::new(16, 256 * KB),
            done: HashMap::new(),
        }
    }

    fn open(&mut self, name: &str) -> OpenRspRepr {
        let mut usr = [0u8; Open::<&[u8]>::LEN];
        OpenRepr {
            access_mode: AccessMode::Rw,
            dev_name: name,
        }
        .emit(&mut usr)
        .unwrap();
        let io = self
            .bench
            .io(15, IoDir::Read, &usr, &[], OpenRsp::<&[u8]>::LEN);
        let v = self.h.on_io(io);
        assert_eq!(v, Verdict::Done(0), "open {name}");
        let rsp = OpenRspRepr::parse(&OpenRsp::new_checked(self.bench.data(15)).unwrap());
        self.bench.release(15);
        rsp
    }

    /// Hands request `id` to the handler: a write's `data` goes in its
    /// chunk, a read's comes back in it (`self.bench.data(id)`).
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        id: u32,
        dev: u32,
        op: RnbdOp,
        flags: u32,
        dir: IoDir,
        off: u64,
        bi_size: usize,
        data: &[u8],
    ) -> Verdict {
        let mut usr = [0u8; 32];
        IoRepr {
            device_id: dev,
            sector: off / 512,
            op,
            flags,
            bi_size: bi_size as u32,
            prio: 0,
        }
        .emit(&mut usr)
        .unwrap();
        let written: &[u8] = if dir == IoDir::Write { data } else { &[] };
        let io = self.bench.io(id, dir, &usr, written, data.len());
        self.h.on_io(io)
    }

    /// Polls for the completions there are.
    fn poll(&mut self) {
        self.h.poll();
        for (id, e) in self.bench.answers() {
            assert!(self.done.insert(id, e).is_none(), "{id} twice");
        }
    }

    /// Waits for request `id`'s errno.
    fn wait(&mut self, id: u32) -> i32 {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            self.poll();
            if let Some(e) = self.done.remove(&id) {
                return e;
            }
            assert!(Instant::now() < until, "request {id} never completed");
            std::hint::spin_loop();
        }
    }

    /// One IO, waited for.
    fn io(&mut self, dev: u32, op: RnbdOp, flags: u32, off: u64, data: &mut [u8]) -> i32 {
        let dir = match op {
            RnbdOp::Read | RnbdOp::Flush => IoDir::Read,
            _ => IoDir::Write,
        };
        let len = data.len();
        let e = match self.submit(0, dev, op, flags, dir, off, len, data) {
            Verdict::Done(e) => e,
            Verdict::Later => self.wait(0),
        };
        if dir == IoDir::Read {
            data.copy_from_slice(self.bench.data(0));
        }
        self.bench.release(0);
        e
    }

    /// A discard or erase of `len` bytes (no data travels).
    fn zero(&mut self, dev: u32, op: RnbdOp, off: u64, len: usize) -> i32 {
        let e = match self.submit(0, dev, op, 0, IoDir::Write, off, len, &[]) {
            Verdict::Done(e) => e,
            Verdict::Later => self.wait(0),
        };
        self.bench.release(0);
        e
    }
}

/// A page-aligned buffer (as a chunk's data is).
struct Buf {
    v: Vec<u8>,
    at: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        let v = vec![0u8; len + 8192];
        let at = v.as_ptr().align_offset(4096);
        Buf { v, at, len }
    }
    fn filled(len: usize, seed: u8) -> Buf {
        let mut b = Buf::new(len);
        for (i, x) in b.s().iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
        }
        b
    }
    fn s(&mut self) -> &mut [u8] {
        &mut self.v[self.at..self.at + self.len]
    }
}

static N: AtomicUsize = AtomicUsize::new(0);

/// A file of `len` bytes that goes away with the guard.
struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &Path, len: u64) -> TempFile {
        let p = dir.join(format!(
            "rtrs-backend-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Every op on the export `spec` (of at least 1 MiB) opened as `f`,
/// checked by reading back; returns the export's backend description.
fn round_trip(spec: &str, sync: bool) -> String {
    let e = Export::parse(spec).unwrap();
    let backend = e.backend();
    let (size, lbs) = (e.size(), e.logical_block_size());
    let srv = server(vec![e]);
    srv.force_sync.store(sync, Ordering::Relaxed);
    let mut c = Con::new(&srv, 1);
    let rsp = c.open("f");
    assert_eq!(u32::from(rsp.logical_block_size), lbs);
    assert_eq!(rsp.nsectors, size / 512);
    let dev = rsp.device_id;
    let base = 64 * KB as u64;
    let mut a = Buf::filled(32 * KB, 7);
    assert_eq!(c.io(dev, RnbdOp::Write, 0, base, a.s()), 0);
    // A FUA write (write + fdatasync linked), then a flush.
    let mut b = Buf::filled(4 * KB, 99);
    assert_eq!(
        c.io(
            dev,
            RnbdOp::Write,
            RNBD_F_FUA | RNBD_F_SYNC,
            2 * base,
            b.s()
        ),
        0
    );
    assert_eq!(c.io(dev, RnbdOp::Flush, RNBD_F_FUA, 0, &mut []), 0);
    let mut back = Buf::new(32 * KB);
    assert_eq!(c.io(dev, RnbdOp::Read, 0, base, back.s()), 0);
    assert!(back.s() == a.s(), "{spec}: the write read back");
    let mut back4 = Buf::new(4 * KB);
    assert_eq!(c.io(dev, RnbdOp::Read, 0, 2 * base, back4.s()), 0);
    assert!(back4.s() == b.s(), "{spec}: the FUA write read back");
    // A discard in the middle of the first write reads back as zeros; its
    // neighbours stay.
    assert_eq!(c.zero(dev, RnbdOp::Discard, base + 8192, 4096), 0);
    assert_eq!(c.io(dev, RnbdOp::Read, 0, base, back.s()), 0);
    let mut want = a.s().to_vec();
    want[8192..12288].fill(0);
    assert!(back.s() == &want[..], "{spec}: after a discard");
    assert_eq!(c.zero(dev, RnbdOp::SecureErase, 2 * base, 4096), 0);
    assert_eq!(c.io(dev, RnbdOp::Read, 0, 2 * base, back4.s()), 0);
    assert!(back4.s().iter().all(|&x| x == 0), "{spec}: after an erase");
    // Past the end: -EIO, nothing read.
    assert_eq!(
        c.io(dev, RnbdOp::Read, 0, size - 512, back4.s()),
        -libc::EIO
    );
    backend
}

fn on_ext4_or_xfs(p: &Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs is plain old data; all zeros is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type, 0xEF53 | 0x5846_5342)
}

#[test]
fn every_op_round_trips_on_tmpfs() {
    let dir = Path::new("/dev/shm");
    if !dir.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let f = TempFile::new(dir, 1 << 20);
    let how = round_trip(&format!("f=file:{}", f.0.display()), false);
    eprintln!("tmpfs: {how}");
}

#[test]
fn every_op_round_trips_on_a_disk_file_system_with_o_direct() {
    let dir = Path::new("/var/tmp");
    let f = TempFile::new(dir, 2 << 20);
    let how = round_trip(&format!("f=file:{}", f.0.display()), false);
    eprintln!("/var/tmp: {how}");
    if on_ext4_or_xfs(dir) {
        assert!(how.starts_with("O_DIRECT"), "{how}");
    }
    // What the client acknowledged is in the file.
    let bytes = std::fs::read(&f.0).unwrap();
    let mut a = Buf::filled(32 * KB, 7);
    let mut want = a.s().to_vec();
    want[8192..12288].fill(0);
    assert!(bytes[64 * KB..96 * KB] == want[..]);
}

#[test]
fn every_op_round_trips_synchronously_without_io_uring() {
    let f = TempFile::new(Path::new("/var/tmp"), 1 << 20);
    round_trip(&format!("f=file:{}", f.0.display()), true);
}

#[test]
fn a_misaligned_o_direct_request_is_refused() {
    let f = TempFile::new(Path::new("/var/tmp"), 1 << 20);
    let e = Export::parse(&format!("f=file:{}", f.0.display())).unwrap();
    if !e.backend().starts_with("O_DIRECT") {
        eprintln!("skipped: /var/tmp takes no O_DIRECT ({})", e.backend());
        return;
    }
    let srv = server(vec![e]);
    let mut c = Con::new(&srv, 1);
    let dev = c.open("f").device_id;
    // A chunk's data is always aligned (chunks are powers of two from a
    // page-aligned region), but its length need not be: a length one byte
    // past the blocks, which O_DIRECT cannot take.
    let mut b = Buf::new(8192);
    assert_eq!(
        c.io(dev, RnbdOp::Write, 0, 0, &mut b.s()[..4097]),
        -libc::EINVAL
    );
    assert_eq!(srv.backend_counters().misaligned(), 1);
    assert_eq!(c.io(dev, RnbdOp::Write, 0, 0, b.s()), 0);
}

#[test]
fn a_file_that_shrank_answers_eio_not_a_partial_read() {
    let f = TempFile::new(Path::new("/var/tmp"), 1 << 20);
    let srv = server(vec![
        Export::parse(&format!("f=file:{}", f.0.display())).unwrap()
    ]);
    let mut c = Con::new(&srv, 1);
    let dev = c.open("f").device_id;
    let mut w = Buf::filled(4096, 3);
    assert_eq!(c.io(dev, RnbdOp::Write, 0, 0, w.s()), 0);
    // Someone cuts the file under the export.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.0)
        .unwrap()
        .set_len(256 * KB as u64 + 2048)
        .unwrap();
    let mut b = Buf::new(4096);
    assert_eq!(
        c.io(dev, RnbdOp::Read, 0, 512 * KB as u64, b.s()),
        -libc::EIO
    );
    // Half of it there: read, then nothing more: -EIO all the same.
    assert_eq!(
        c.io(dev, RnbdOp::Read, 0, 256 * KB as u64, b.s()),
        -libc::EIO
    );
    assert!(srv.backend_counters().short_transfers() >= 1);
    assert!(srv.backend_counters().io_errors() >= 2);
    assert_eq!(c.io(dev, RnbdOp::Read, 0, 0, b.s()), 0);
    assert!(b.s() == w.s());
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(size: &str) -> Option<Mount> {
        Mount::new(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
    }

    /// A fresh ext4 on `dev`.
    fn ext4(dev: &str) -> Option<Mount> {
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", dev])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        Mount::new(&[dev])
    }

    fn new(args: &[&str]) -> Option<Mount> {
        let dir = std::env::temp_dir().join(format!(
            "rtrs-mnt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ignored = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Mount(dir))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // A closed ring lets go of its files a moment later (the kernel
        // tears it down in the background): busy until then.
        let mut ok = false;
        for _ in 0..100 {
            ok = std::process::Command::new("umount")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !ok {
            eprintln!("could not unmount {}", self.0.display());
        }
        let _ignored = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_tmpfs_answers_enospc_and_acks_only_what_is_written() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let Some(m) = Mount::tmpfs("1M") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    // A sparse 4 MiB file on a 1 MiB file system (served inline).
    fill_until_enospc(&m.0, 4 << 20, "tmpfs");
}

#[test]
fn a_full_ext4_answers_enospc_through_io_uring_and_acks_only_what_is_written() {
    let Some(l) = Loop::as_root(8 << 20) else {
        return;
    };
    let Some(m) = Mount::ext4(&l.0) else {
        eprintln!("skipped: cannot make and mount an ext4 here");
        return;
    };
    // A sparse 16 MiB file on an 8 MiB file system (O_DIRECT, io_uring).
    fill_until_enospc(&m.0, 16 << 20, "O_DIRECT");
    drop(m);
    drop(l);
}

/// Writes a sparse file of `size` on the small file system at `dir`
/// through an export (whose backend starts with `how`) until it is full.
fn fill_until_enospc(dir: &Path, size: usize, how: &str) {
    let f = TempFile::new(dir, size as u64);
    let e = Export::parse(&format!("f=file:{}", f.0.display())).unwrap();
    assert!(e.backend().starts_with(how), "{}", e.backend());
    let srv = server(vec![e]);
    let mut c = Con::new(&srv, 1);
    let dev = c.open("f").device_id;
    let chunk = 128 * KB;
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for i in 0..size / chunk {
        let mut b = Buf::filled(chunk, i as u8);
        match c.io(dev, RnbdOp::Write, 0, (i * chunk) as u64, b.s()) {
            0 => acked.push(i),
            e => {
                assert_eq!(e, -libc::ENOSPC, "write {i}");
                refused.push(i);
            }
        }
    }
    assert!(!refused.is_empty(), "no write ran out of space");
    assert!(!acked.is_empty());
    for i in acked {
        let mut b = Buf::new(chunk);
        assert_eq!(c.io(dev, RnbdOp::Read, 0, (i * chunk) as u64, b.s()), 0);
        let mut want = Buf::filled(chunk, i as u8);
        assert!(b.s() == want.s(), "acknowledged write {i} is not there");
    }
    assert!(srv.backend_counters().io_errors() >= refused.len() as u64);
    drop(c);
    drop(srv);
    drop(f);
}

/// A loop device over a file, detached on drop.
struct Loop(String, #[allow(dead_code)] TempFile);

impl Loop {
    /// A loop device, when root and the kernel has them (else says why not).
    fn as_root(len: u64) -> Option<Loop> {
        if !is_root() {
            eprintln!("skipped: a loop device needs root");
            return None;
        }
        let l = Loop::new(len);
        if l.is_none() {
            eprintln!("skipped: no loop device here");
        }
        l
    }

    fn new(len: u64) -> Option<Loop> {
        let f = TempFile::new(Path::new("/var/tmp"), len);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&f.0)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Some(Loop(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            f,
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let ok = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("could not detach {}", self.0);
        }
    }
}

#[test]
fn a_block_device_exports_with_its_size_and_block_size() {
    // Not a block device: refused for dev:.
    let f = TempFile::new(Path::new("/var/tmp"), 1 << 20);
    assert!(Export::parse(&format!("f=dev:{}", f.0.display())).is_err());
    let Some(l) = Loop::as_root(8 << 20) else {
        return;
    };
    let e = Export::parse(&format!("f=dev:{}", l.0)).unwrap();
    assert_eq!(e.size(), 8 << 20);
    assert!(e.backend().contains("block device"), "{}", e.backend());
    drop(e);
    let how = round_trip(&format!("f=dev:{}", l.0), false);
    eprintln!("{}: {how}", l.0);
    // The file: form takes a block device too.
    round_trip(&format!("f=file:{}", l.0), false);
}

/// A pipe: reads of its read end wait until the test writes.
fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::unix::io::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

#[test]
fn a_slow_backend_does_not_stall_another_connection_on_the_same_core() {
    let (r, mut w) = pipe();
    let fast = TempFile::new(Path::new("/dev/shm"), 1 << 20);
    let srv = server(vec![
        Export::from_store("slow", FileStore::raw(r, 1 << 20)),
        Export::parse(&format!("fast=file:{}", fast.0.display())).unwrap(),
    ]);
    let (mut a, mut b) = (Con::new(&srv, 1), Con::new(&srv, 2));
    let slow = a.open("slow").device_id;
    let quick = b.open("fast").device_id;
    // A read that cannot complete until the pipe has data: handed back
    // at once, the thread free.
    let mut held = Buf::new(512);
    let t = Instant::now();
    let v = a.submit(3, slow, RnbdOp::Read, 0, IoDir::Read, 0, 512, held.s());
    assert_eq!(v, Verdict::Later);
    assert!(t.elapsed() < Duration::from_secs(1));
    // Meanwhile the other connection, polled by the same thread, does its
    // IO; the held one stays held.
    for i in 0..200u64 {
        let mut d = Buf::filled(4096, i as u8);
        assert_eq!(b.io(quick, RnbdOp::Write, 0, i % 64 * 4096, d.s()), 0);
        let mut back = Buf::new(4096);
        assert_eq!(b.io(quick, RnbdOp::Read, 0, i % 64 * 4096, back.s()), 0);
        assert!(back.s() == d.s());
        a.poll();
        assert!(a.done.is_empty(), "the held read completed with no data");
    }
    // Half the data: a short read, its rest submitted again, still held.
    let data: Vec<u8> = (0..512).map(|i| (i % 251) as u8).collect();
    w.write_all(&data[..256]).unwrap();
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        a.poll();
    }
    assert!(a.done.is_empty(), "a short read was acknowledged");
    w.write_all(&data[256..]).unwrap();
    assert_eq!(a.wait(3), 0);
    assert!(a.bench.data(3) == &data[..]);
    assert!(srv.backend_counters().short_transfers() >= 1);
}

#[test]
fn a_closing_connection_waits_for_its_io_in_flight() {
    let (r, mut w) = pipe();
    let srv = server(vec![Export::from_store("slow", FileStore::raw(r, 1 << 20))]);
    let mut a = Con::new(&srv, 1);
    let slow = a.open("slow").device_id;
    let mut held = Buf::new(512);
    let v = a.submit(2, slow, RnbdOp::Read, 0, IoDir::Read, 0, 512, held.s());
    assert_eq!(v, Verdict::Later);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        w.write_all(&[9u8; 512]).unwrap();
    });
    let t = Instant::now();
    // The engine's teardown: quiesce, then the chunk goes back.
    a.h.quiesce();
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "quiesce returned with the read in flight"
    );
    // The read's Deferred answered when its IO was done, with the data.
    assert_eq!(a.bench.answers(), vec![(2, 0)]);
    assert!(a.bench.data(2).iter().all(|&x| x == 9));
    writer.join().unwrap();
}

#[test]
fn requests_that_do_not_fit_the_sq_or_cq_wait_and_none_is_lost() {
    use std::os::unix::io::AsRawFd;
    let f = TempFile::new(Path::new("/dev/shm"), 1 << 20);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.0)
        .unwrap();
    let counters = BackendCounters::default();
    // Two SQEs for sixteen requests, half of them write + linked sync; four
    // CQEs for their 24 (what overflows waits in the kernel).
    let mut r = Ring::with_entries(16, 2, 4, &[file.as_raw_fd()], None).unwrap();
    let mut bench = Bench::new(17, 8 * KB);
    let mut bufs: Vec<Buf> = (0..16).map(|i| Buf::filled(4096, i as u8)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let op = Op::Write(i % 2 == 1);
        let d = bench.io(i as u32, IoDir::Write, &[], b.s(), 4096).defer();
        assert!(r.start(d, op, (0, -1), 4096, i as u64 * 4096).is_ok());
    }
    // A chunk past the ring's slots is handed back, nothing started.
    let d = bench.io(16, IoDir::Read, &[], &[], 0).defer();
    let back = r
        .start(d, Op::Sync, (0, -1), 0, 0)
        .expect_err("out of range");
    back.complete(0);
    assert_eq!(bench.answers(), vec![(16, 0)]);
    let mut done = HashMap::new();
    let until = Instant::now() + Duration::from_secs(20);
    while done.len() < 16 {
        r.poll(&counters);
        for (id, e) in bench.answers() {
            assert!(done.insert(id, e).is_none());
        }
        assert!(Instant::now() < until, "{} of 16 done", done.len());
    }
    assert!(done.values().all(|&e| e == 0), "{done:?}");
    let bytes = std::fs::read(&f.0).unwrap();
    for (i, b) in bufs.iter_mut().enumerate() {
        assert!(bytes[i * 4096..(i + 1) * 4096] == *b.s(), "request {i}");
    }
}

#[test]
fn without_a_ring_a_connection_is_served_synchronously_and_counted() {
    let f = TempFile::new(Path::new("/var/tmp"), 1 << 20);
    let mut srv = server(vec![
        Export::parse(&format!("f=file:{}", f.0.display())).unwrap()
    ]);
    // An fd that is not open: registering the files fails, as a ring that
    // cannot be set up would.
    Arc::get_mut(&mut srv).unwrap().files.push(1 << 20);
    let mut c = Con::new(&srv, 1);
    assert_eq!(srv.backend_counters().sync_fallbacks(), 1);
    let dev = c.open("f").device_id;
    let mut w = Buf::filled(8192, 5);
    let v = c.submit(1, dev, RnbdOp::Write, 0, IoDir::Write, 4096, 8192, w.s());
    assert_eq!(v, Verdict::Done(0), "served at once");
    c.bench.release(1);
    let mut r = Buf::new(8192);
    assert_eq!(c.io(dev, RnbdOp::Read, 0, 4096, r.s()), 0);
    assert!(r.s() == w.s());
}

#[test]
fn io_in_registered_chunk_memory_goes_through_fixed_buffers() {
    use std::os::unix::io::AsRawFd;
    let f = TempFile::new(Path::new("/var/tmp"), 1 << 20);
    let store = FileStore::open(&f.0, true, false).unwrap();
    let mut bench = Bench::new(4, 16 * KB);
    let counters = BackendCounters::default();
    let mem = bench.chunks.region().clone();
    let mut r = Ring::new(4, &[store.file.as_raw_fd()], Some(mem)).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 5 + 1) as u8).collect();
    let mut run = |bench: &mut Bench, id: u32, op: Op| {
        let (dir, src): (_, &[u8]) = match op {
            Op::Read => (IoDir::Read, &[]),
            _ => (IoDir::Write, &data),
        };
        let d = bench.io(id, dir, &[], src, 8192).defer();
        assert!(r.start(d, op, (0, -1), 8192, 4096).is_ok());
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            r.poll(&counters);
            if let Some(done) = bench.answers().pop() {
                return done;
            }
            assert!(Instant::now() < until, "never completed");
        }
    };
    assert_eq!(run(&mut bench, 1, Op::Write(true)), (1, 0));
    assert_eq!(run(&mut bench, 2, Op::Read), (2, 0));
    assert!(bench.data(2) == &data[..]);
    let on_disk = std::fs::read(&f.0).unwrap();
    assert!(on_disk[4096..4096 + 8192] == data[..]);
}

/// One write through the ring (it must be deferred, not served on the
/// core), waited for.
fn ring_write(c: &mut Con, dev: u32, off: u64, data: &mut [u8]) {
    let len = data.len();
    let v = c.submit(1, dev, RnbdOp::Write, 0, IoDir::Write, off, len, data);
    assert_eq!(v, Verdict::Later, "file IO goes through the ring");
    assert_eq!(c.wait(1), 0);
    c.bench.release(1);
}

#[test]
fn exports_added_at_runtime_go_through_the_ring_on_their_own_file() {
    let dir = Path::new("/var/tmp");
    // A server started with a file: its rings register it as fixed file 0;
    // a file export added later is named by its descriptor, never as 0.
    let (a, b) = (TempFile::new(dir, 1 << 20), TempFile::new(dir, 1 << 20));
    let srv = server(vec![
        Export::parse(&format!("a=file:{}", a.0.display())).unwrap()
    ]);
    srv.add_export(Export::parse(&format!("b=file:{}", b.0.display())).unwrap())
        .unwrap();
    let mut c = Con::new(&srv, 1);
    let dev_b = c.open("b").device_id;
    let mut data = Buf::filled(8 * KB, 42);
    ring_write(&mut c, dev_b, 0, data.s());
    let mut back = Buf::new(8 * KB);
    assert_eq!(c.io(dev_b, RnbdOp::Read, 0, 0, back.s()), 0);
    assert!(back.s() == data.s(), "b reads back");
    assert!(
        std::fs::read(&b.0).unwrap()[..8 * KB] == *data.s(),
        "in b's file"
    );
    assert!(
        std::fs::read(&a.0).unwrap().iter().all(|&x| x == 0),
        "nothing landed in a's file"
    );
    // A server started with RAM only makes a connection's ring at its
    // first file IO.
    let c2 = TempFile::new(dir, 1 << 20);
    let srv = server(vec![Export::parse("r=ram:1M").unwrap()]);
    srv.add_export(Export::parse(&format!("c=file:{}", c2.0.display())).unwrap())
        .unwrap();
    let mut c = Con::new(&srv, 2);
    let dev_c = c.open("c").device_id;
    let mut data = Buf::filled(4 * KB, 9);
    ring_write(&mut c, dev_c, 4096, data.s());
    assert!(
        std::fs::read(&c2.0).unwrap()[4096..8192] == *data.s(),
        "in c's file"
    );
}
