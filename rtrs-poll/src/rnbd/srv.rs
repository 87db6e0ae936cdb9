//! The RNBD server on the RTRS server: exports named devices (RAM or a file)
//! and answers SESS_INFO, OPEN, CLOSE and IO as the kernel's rnbd-server does
//! (wire spec §9.4-9.6).

use crate::proto::rnbd::*;
use crate::srv::{ConInfo, Handler, IoDir, SrvIo, Verdict};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Devices one session may have open at once.
pub const MAX_OPEN: usize = 256;
const SECTOR: u64 = 512;

enum Store {
    Ram(mempool::Region),
    File(std::fs::File),
}

/// A device the server exports.
pub struct Export {
    name: String,
    store: Store,
    size: u64,
    writers: AtomicU32,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Export({} {} bytes)", self.name, self.size)
    }
}

/// Errors setting up exports.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A bad export spec.
    #[error("export {0:?}: {1}")]
    Spec(String, String),
    /// The backing store failed.
    #[error("export {0:?}: {1}")]
    Io(String, std::io::Error),
}

impl Export {
    /// Parses `NAME=ram:SIZE` or `NAME=file:PATH` (SIZE with K, M or G).
    pub fn parse(spec: &str) -> Result<Export, ExportError> {
        let bad = |why: &str| ExportError::Spec(spec.to_string(), why.to_string());
        let (name, what) = spec
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=ram:SIZE or NAME=file:PATH"))?;
        if name.is_empty() || name.len() > 254 || name.contains("..") {
            return Err(bad("the name must be 1..=254 bytes without '..'"));
        }
        if let Some(size) = what.strip_prefix("ram:") {
            let size = parse_size(size).ok_or_else(|| bad("bad size (e.g. 64M, 1G)"))?;
            Export::ram(name, size)
        } else if let Some(path) = what.strip_prefix("file:") {
            Export::file(name, std::path::Path::new(path))
        } else {
            Err(bad("expected ram:SIZE or file:PATH"))
        }
    }

    /// A RAM device of `size` bytes (rounded down to whole sectors).
    pub fn ram(name: &str, size: u64) -> Result<Export, ExportError> {
        let size = size / SECTOR * SECTOR;
        if size == 0 {
            return Err(ExportError::Spec(
                name.into(),
                "size below one sector".into(),
            ));
        }
        let mem = mempool::Region::anonymous(size as usize)
            .map_err(|e| ExportError::Io(name.into(), std::io::Error::other(e)))?;
        mem.prefault();
        Ok(Export {
            name: name.to_string(),
            store: Store::Ram(mem),
            size,
            writers: AtomicU32::new(0),
        })
    }

    /// A file (or block device) opened read-write.
    pub fn file(name: &str, path: &std::path::Path) -> Result<Export, ExportError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| ExportError::Io(name.into(), e))?;
        let size = f
            .metadata()
            .map_err(|e| ExportError::Io(name.into(), e))?
            .len()
            / SECTOR
            * SECTOR;
        if size == 0 {
            return Err(ExportError::Spec(
                name.into(),
                "the file is smaller than a sector".into(),
            ));
        }
        Ok(Export {
            name: name.to_string(),
            store: Store::File(f),
            size,
            writers: AtomicU32::new(0),
        })
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn range(&self, off: u64, len: usize) -> Result<(), i32> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(-libc::EIO),
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.range(off, buf.len())?;
        match &self.store {
            Store::Ram(m) => m.read(off as usize, buf).map_err(|_| -libc::EIO),
            Store::File(f) => f.read_exact_at(buf, off).map_err(|_| -libc::EIO),
        }
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<(), i32> {
        self.range(off, data.len())?;
        match &self.store {
            // Non-temporal stores: a RAM disk's writes land at cold places.
            Store::Ram(m) => m.write_stream(off as usize, data).map_err(|_| -libc::EIO),
            Store::File(f) => f.write_all_at(data, off).map_err(|_| -libc::EIO),
        }
    }

    fn zero(&self, off: u64, len: u64) -> Result<(), i32> {
        static ZEROS: [u8; 65536] = [0; 65536];
        self.range(off, len as usize)?;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(ZEROS.len() as u64) as usize;
            self.write(off + at, &ZEROS[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), i32> {
        match &self.store {
            Store::Ram(_) => Ok(()),
            Store::File(f) => f.sync_data().map_err(|_| -libc::EIO),
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let (n, mul) = match t.as_bytes().last()? {
        b'k' | b'K' => (&t[..t.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&t[..t.len() - 1], 1 << 20),
        b'g' | b'G' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    n.parse::<u64>().ok()?.checked_mul(mul)
}

/// One RTRS session's RNBD state: its open devices (lock-free for IO).
#[derive(Debug)]
struct Sess {
    ver: AtomicU8,
    /// Per device id: 0 free, else `export + 1 | mode << 24`.
    devs: Box<[AtomicU32]>,
}

impl Sess {
    fn new() -> Sess {
        Sess {
            ver: AtomicU8::new(0),
            devs: (0..MAX_OPEN).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// The RNBD server: exports, and the sessions using them.
pub struct RnbdServer {
    exports: Vec<Export>,
    sessions: Mutex<HashMap<[u8; 16], Arc<Sess>>>,
    max_io_size: u32,
}

impl std::fmt::Debug for RnbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RnbdServer")
            .field("exports", &self.exports)
            .finish()
    }
}

impl RnbdServer {
    /// A server exporting `exports`; `max_io_size` is the RTRS server's.
    pub fn new(exports: Vec<Export>, max_io_size: u32) -> Arc<RnbdServer> {
        Arc::new(RnbdServer {
            exports,
            sessions: Mutex::new(HashMap::new()),
            max_io_size,
        })
    }

    /// The handler for a new connection (of a new or known session).
    pub fn handler(self: &Arc<Self>, info: &ConInfo) -> RnbdHandler {
        let sess = match self.sessions.lock() {
            Ok(mut m) => m
                .entry(info.paths_uuid)
                .or_insert_with(|| Arc::new(Sess::new()))
                .clone(),
            Err(_) => Arc::new(Sess::new()),
        };
        RnbdHandler {
            srv: self.clone(),
            sess,
        }
    }

    /// The RTRS session ended (its last path closed): close every device it
    /// had open, as the kernel's server does.
    pub fn session_ended(&self, paths_uuid: &[u8; 16]) {
        let sess = self
            .sessions
            .lock()
            .ok()
            .and_then(|mut m| m.remove(paths_uuid));
        if let Some(s) = sess {
            for d in s.devs.iter() {
                self.release(d.swap(0, Ordering::AcqRel));
            }
        }
    }

    /// Sessions known.
    pub fn sessions(&self) -> usize {
        self.sessions.lock().map_or(0, |m| m.len())
    }

    /// Write openers of an export.
    pub fn writers(&self, name: &str) -> Option<u32> {
        self.exports
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.writers.load(Ordering::Relaxed))
    }

    fn release(&self, slot: u32) {
        if slot == 0 {
            return;
        }
        let (idx, mode) = ((slot & 0xff_ffff) as usize - 1, slot >> 24);
        if mode != AccessMode::Ro as u32 {
            if let Some(e) = self.exports.get(idx) {
                e.writers.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// The per-connection RTRS handler of the RNBD server.
#[derive(Debug)]
pub struct RnbdHandler {
    srv: Arc<RnbdServer>,
    sess: Arc<Sess>,
}

impl RnbdHandler {
    fn open(&mut self, v: &Open<&[u8]>, out: &mut [u8]) -> i32 {
        let name = v.dev_name();
        let Some(idx) = self.srv.exports.iter().position(|e| e.name == name) else {
            return -libc::ENOENT;
        };
        let e = &self.srv.exports[idx];
        let mode = v.access_mode();
        // The same device again in this session: the same id.
        let id = match self
            .sess
            .devs
            .iter()
            .position(|d| d.load(Ordering::Acquire) & 0xff_ffff == idx as u32 + 1)
        {
            Some(id) => id,
            None => {
                let ok = match mode {
                    AccessMode::Ro => true,
                    AccessMode::Rw => e
                        .writers
                        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok(),
                    AccessMode::Migration => e
                        .writers
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                            (w < 2).then_some(w + 1)
                        })
                        .is_ok(),
                };
                if !ok {
                    return -libc::EPERM;
                }
                let slot = (idx as u32 + 1) | ((mode as u32) << 24);
                let free = self.sess.devs.iter().position(|d| {
                    d.compare_exchange(0, slot, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                });
                match free {
                    Some(id) => id,
                    None => {
                        self.srv.release(slot);
                        return -libc::EMFILE;
                    }
                }
            }
        };
        let rsp = OpenRspRepr {
            device_id: id as u32,
            nsectors: e.size / SECTOR,
            max_hw_sectors: self.srv.max_io_size / SECTOR as u32,
            max_write_same_sectors: 0,
            max_discard_sectors: self.srv.max_io_size / SECTOR as u32,
            discard_granularity: SECTOR as u32,
            discard_alignment: 0,
            physical_block_size: SECTOR as u16,
            logical_block_size: SECTOR as u16,
            max_segments: 128,
            secure_discard: 0,
            obsolete_rotational: 0,
            cache_policy: match e.store {
                Store::File(_) => RNBD_WRITEBACK | RNBD_FUA,
                Store::Ram(_) => 0,
            },
        };
        match rsp.emit(out) {
            Ok(_) => 0,
            Err(_) => -libc::EINVAL,
        }
    }

    fn io(&mut self, v: &Io<&[u8]>, dir: IoDir, data: &mut [u8]) -> i32 {
        let slot = self
            .sess
            .devs
            .get(v.device_id() as usize)
            .map_or(0, |d| d.load(Ordering::Acquire));
        if slot == 0 {
            return -libc::ENOTCONN;
        }
        let Some(e) = self.srv.exports.get((slot & 0xff_ffff) as usize - 1) else {
            return -libc::ENOTCONN;
        };
        let Some(off) = v.sector().checked_mul(SECTOR) else {
            return -libc::EIO;
        };
        let flags = v.rw() & !0xff;
        let r = match (v.op(), dir) {
            (RnbdOp::Read, IoDir::Read) => e.read(off, data),
            (RnbdOp::Write, IoDir::Write) => e.write(off, data).and_then(|()| {
                if flags & RNBD_F_FUA != 0 {
                    e.flush()
                } else {
                    Ok(())
                }
            }),
            (RnbdOp::Flush, _) => e.flush(),
            (RnbdOp::Discard | RnbdOp::SecureErase, _) => e.zero(off, u64::from(v.bi_size())),
            _ => Err(-libc::EINVAL),
        };
        match r {
            Ok(()) => 0,
            Err(errno) => errno,
        }
    }
}

impl Handler for RnbdHandler {
    fn on_io(&mut self, io: SrvIo<'_>) -> Verdict {
        let errno = match RnbdMsg::parse(io.usr) {
            Err(_) => -libc::EINVAL,
            Ok(RnbdMsg::SessInfo(v)) => {
                let ver = v.ver().min(RNBD_PROTO_VER_MAJOR);
                self.sess.ver.store(ver, Ordering::Relaxed);
                if io.dir == IoDir::Read {
                    match (SessInfoRepr { ver }).emit_rsp(io.data) {
                        Ok(_) => 0,
                        Err(_) => -libc::EINVAL,
                    }
                } else {
                    0
                }
            }
            Ok(RnbdMsg::Open(v)) => {
                if io.dir == IoDir::Read {
                    self.open(&v, io.data)
                } else {
                    -libc::EINVAL
                }
            }
            Ok(RnbdMsg::Close(v)) => {
                if let Some(d) = self.sess.devs.get(v.device_id() as usize) {
                    self.srv.release(d.swap(0, Ordering::AcqRel));
                }
                0
            }
            Ok(RnbdMsg::Io(v)) => self.io(&v, io.dir, io.data),
        };
        Verdict::Done(errno)
    }
}

/// A server exporting `exports` builds one handler per connection.
pub fn make_handler(srv: Arc<RnbdServer>) -> impl FnMut(&ConInfo) -> RnbdHandler + Send + 'static {
    move |info| srv.handler(info)
}
