//! The RNBD server on the RTRS server: exports named devices (RAM, a file
//! or a block device: [`super::backend`]) and answers SESS_INFO, OPEN, CLOSE and IO as the kernel's rnbd-server does
//! (wire spec §9.4-9.6), with per-export access rules and access modes
//! enforced on IO (docs/rnbd.md).

use super::backend::{BackendCounters, Event, FileStore, Op, Ring};
use crate::srv::{ConInfo, Handler, Identity, IoDir, SrvIo, Verdict};
use rtrs_proto::rnbd::*;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Devices one session may have open at once.
pub const MAX_OPEN: usize = 256;
const SECTOR: u64 = 512;
/// A device slot: 0 free, else `export index + 1` in the low bits and the
/// access mode above.
const SLOT_EXPORT: u32 = 0xff_ffff;
const SLOT_MODE_SHIFT: u32 = 24;

fn slot_mode(slot: u32) -> u32 {
    (slot >> SLOT_MODE_SHIFT) & 0x3
}

enum Store {
    Ram(mempool::Region),
    File(FileStore),
}

/// A device the server exports.
pub struct Export {
    name: String,
    store: Store,
    size: u64,
    writers: AtomicU32,
    read_only: bool,
    allow: Vec<Rule>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Export({} {} bytes", self.name, self.size)?;
        if let Store::File(fs) = &self.store {
            write!(f, " {}", fs.describe())?;
        }
        if self.read_only {
            write!(f, " ro")?;
        }
        if !self.allow.is_empty() {
            write!(f, " allow {:?}", self.allow)?;
        }
        write!(f, ")")
    }
}

/// Who may open an export: an export with rules serves the sessions that
/// match one of them; one without serves any session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The session name the client gave in its handshake (`allow=NAME`).
    Sessname(String),
    /// The id of the pre-shared key the client proved (`allow-key=ID`;
    /// tcp with `--auth-key`): a client that proved none matches no such
    /// rule.
    KeyId(String),
}

impl Rule {
    /// Whether the client `id` matches the rule.
    pub fn matches(&self, id: &Identity) -> bool {
        match self {
            Rule::Sessname(n) => *n == id.sessname,
            Rule::KeyId(k) => id.key_id.as_deref() == Some(k.as_str()),
        }
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
    /// Two exports of one name.
    #[error("export {0:?} is given twice: export names must be unique")]
    Duplicate(String),
}

/// The options after an export's device: `,ro`, `,allow=A|B`, `,allow-key=K`.
fn parse_options<'a>(
    opts: impl Iterator<Item = &'a str>,
    bad: impl Fn(&str) -> ExportError,
) -> Result<(bool, Vec<Rule>), ExportError> {
    let (mut read_only, mut allow) = (false, Vec::new());
    for opt in opts {
        let rules = if opt == "ro" {
            read_only = true;
            continue;
        } else if let Some(names) = opt.strip_prefix("allow=") {
            names
                .split('|')
                .map(|n| {
                    rtrs_proto::check_sessname(n)
                        .map(|()| Rule::Sessname(n.to_string()))
                        .map_err(|_| {
                            bad(&format!(
                                "bad session name {n:?} in allow= (1..=254 bytes without '/' or '.')"
                            ))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else if let Some(keys) = opt.strip_prefix("allow-key=") {
            keys.split('|')
                .map(|k| {
                    if k.is_empty() {
                        Err(bad("an empty key id in allow-key="))
                    } else {
                        Ok(Rule::KeyId(k.to_string()))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            return Err(bad(&format!(
                "unknown option {opt:?}: expected ro, allow=SESSNAME[|SESSNAME...] or allow-key=ID[|ID...]"
            )));
        };
        allow.extend(rules);
    }
    Ok((read_only, allow))
}

impl Export {
    /// Parses `NAME=ram:SIZE[,OPTION...]`, `NAME=file:PATH[,OPTION...]` (a
    /// regular file or a block device) or `NAME=dev:PATH[,OPTION...]` (a
    /// block device only) (SIZE with K, M or G; PATH without commas).
    /// Files and devices are opened with O_DIRECT where they accept it.
    /// Options: `ro` (a
    /// read-only export: RW and MIGRATION opens get -EPERM; a file is
    /// opened read-only), `allow=SESS[|SESS...]` (only these session names
    /// may open it; others get -EACCES) and `allow-key=ID[|ID...]` (the
    /// same by authenticated key id); `allow` and `allow-key` may repeat
    /// and add up.
    pub fn parse(spec: &str) -> Result<Export, ExportError> {
        let bad = |why: &str| ExportError::Spec(spec.to_string(), why.to_string());
        let mut parts = spec.split(',');
        let dev = parts.next().unwrap_or_default();
        let (name, what) = dev
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=ram:SIZE, NAME=file:PATH or NAME=dev:PATH"))?;
        if name.is_empty() || name.len() > 254 || name.contains("..") {
            return Err(bad("the name must be 1..=254 bytes without '..'"));
        }
        let (read_only, allow) = parse_options(parts, bad)?;
        let e = if let Some(size) = what.strip_prefix("ram:") {
            let size = parse_size(size).ok_or_else(|| bad("bad size (e.g. 64M, 1G)"))?;
            Export::ram(name, size)?
        } else if let Some(path) = what.strip_prefix("file:") {
            Export::open_file(name, std::path::Path::new(path), !read_only, false)?
        } else if let Some(path) = what.strip_prefix("dev:") {
            Export::open_file(name, std::path::Path::new(path), !read_only, true)?
        } else {
            return Err(bad("expected ram:SIZE, file:PATH or dev:PATH"));
        };
        Ok(Export {
            read_only,
            allow,
            ..e
        })
    }

    /// Tests: an export of a store opened by hand (a pipe, say).
    #[cfg(test)]
    pub(crate) fn from_store(name: &str, f: FileStore) -> Export {
        Export {
            name: name.to_string(),
            size: f.size,
            store: Store::File(f),
            writers: AtomicU32::new(0),
            read_only: false,
            allow: Vec::new(),
        }
    }

    /// The export read-only: RW and MIGRATION opens are refused (-EPERM).
    pub fn read_only(self) -> Export {
        Export {
            read_only: true,
            ..self
        }
    }

    /// Adds a rule of who may open the export (with none: any session).
    pub fn allow(mut self, rule: Rule) -> Export {
        self.allow.push(rule);
        self
    }

    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Who may open it (empty: any session).
    pub fn rules(&self) -> &[Rule] {
        &self.allow
    }

    /// A RAM device of `size` bytes: whole 512-byte sectors (any other
    /// size is refused, not rounded: the device is the size asked for).
    pub fn ram(name: &str, size: u64) -> Result<Export, ExportError> {
        if size == 0 || size % SECTOR != 0 {
            return Err(ExportError::Spec(
                name.into(),
                format!("size {size} is not a whole number of {SECTOR}-byte sectors"),
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
            read_only: false,
            allow: Vec::new(),
        })
    }

    /// A file (or block device) opened read-write.
    pub fn file(name: &str, path: &std::path::Path) -> Result<Export, ExportError> {
        Export::open_file(name, path, true, false)
    }

    fn open_file(
        name: &str,
        path: &std::path::Path,
        write: bool,
        block: bool,
    ) -> Result<Export, ExportError> {
        let f = FileStore::open(path, write, block).map_err(|e| ExportError::Io(name.into(), e))?;
        let size = f.size;
        if size == 0 {
            return Err(ExportError::Spec(
                name.into(),
                format!("{} is smaller than a block", path.display()),
            ));
        }
        Ok(Export {
            name: name.to_string(),
            store: Store::File(f),
            size,
            writers: AtomicU32::new(0),
            read_only: false,
            allow: Vec::new(),
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

    /// How the export is served: `ram`, or for a file or device whether
    /// with O_DIRECT and its logical block size.
    pub fn backend(&self) -> String {
        match &self.store {
            Store::Ram(_) => "ram".into(),
            Store::File(f) => f.describe(),
        }
    }

    /// The logical block size the clients are told (and IO must keep to).
    pub fn logical_block_size(&self) -> u32 {
        match &self.store {
            Store::Ram(_) => SECTOR as u32,
            Store::File(f) => f.lbs,
        }
    }

    /// Takes a writer for an open in `mode` (the kernel's rule: one RW
    /// opener, or two MIGRATION ones); false when it has them.
    fn take_writer(&self, mode: AccessMode) -> bool {
        match mode {
            AccessMode::Ro => true,
            AccessMode::Rw => self
                .writers
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok(),
            AccessMode::Migration => self
                .writers
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    (w < 2).then_some(w + 1)
                })
                .is_ok(),
        }
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
            Store::File(f) => f.file.read_exact_at(buf, off).map_err(io_errno),
        }
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<(), i32> {
        self.range(off, data.len())?;
        match &self.store {
            // Non-temporal stores: a RAM disk's writes land at cold places.
            Store::Ram(m) => m.write_stream(off as usize, data).map_err(|_| -libc::EIO),
            Store::File(f) => f.file.write_all_at(data, off).map_err(io_errno),
        }
    }

    fn zero(&self, off: u64, len: u64) -> Result<(), i32> {
        static ZEROS: [u8; 65536] = [0; 65536];
        self.range(off, len as usize)?;
        if let Store::File(f) = &self.store {
            return f.zero_sync(off, len);
        }
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
            Store::File(f) => f.file.sync_data().map_err(io_errno),
        }
    }
}

/// An IO error's errno for the client (-EIO when it has none).
fn io_errno(e: std::io::Error) -> i32 {
    match e.raw_os_error() {
        Some(n) if n > 0 => -n,
        _ => -libc::EIO,
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
    /// Refusal kinds already logged for this session (one bit each).
    logged: AtomicU8,
    /// Who the client is (its first path's handshake), for log lines.
    identity: Arc<OnceLock<Identity>>,
}

impl Sess {
    fn new(identity: Arc<OnceLock<Identity>>) -> Sess {
        Sess {
            ver: AtomicU8::new(0),
            devs: (0..MAX_OPEN).map(|_| AtomicU32::new(0)).collect(),
            logged: AtomicU8::new(0),
            identity,
        }
    }

    fn sessname(&self) -> &str {
        self.identity.get().map_or("?", |i| i.sessname.as_str())
    }
}

/// What an RNBD refusal was for (counted per kind: [`RnbdCounters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RnbdRefusal {
    /// OPEN by a session the export's allow rules do not name (-EACCES).
    NotAllowed = 0,
    /// OPEN for writing (RW or MIGRATION) of a read-only export (-EPERM).
    ReadOnlyExport = 1,
    /// OPEN for writing of a device that has its writers (the kernel's
    /// rule; a re-open for writing of a read-only open too) (-EPERM).
    WriterBusy = 2,
    /// An IO that would change a device this session opened read-only
    /// (-EPERM; nothing is written).
    ReadOnlyWrite = 3,
}

impl RnbdRefusal {
    /// Every kind.
    pub const ALL: [RnbdRefusal; 4] = [
        RnbdRefusal::NotAllowed,
        RnbdRefusal::ReadOnlyExport,
        RnbdRefusal::WriterBusy,
        RnbdRefusal::ReadOnlyWrite,
    ];

    /// A short stable name, for counters and JSON.
    pub fn name(self) -> &'static str {
        match self {
            RnbdRefusal::NotAllowed => "not_allowed",
            RnbdRefusal::ReadOnlyExport => "read_only_export",
            RnbdRefusal::WriterBusy => "writer_busy",
            RnbdRefusal::ReadOnlyWrite => "read_only_write",
        }
    }

    /// The errno the client gets.
    pub fn errno(self) -> i32 {
        match self {
            RnbdRefusal::NotAllowed => -libc::EACCES,
            _ => -libc::EPERM,
        }
    }
}

/// The RNBD server's refusals, counted per kind (lock-free: IO refusals
/// are counted on the data cores).
#[derive(Debug, Default)]
pub struct RnbdCounters {
    refused: [AtomicU64; RnbdRefusal::ALL.len()],
}

impl RnbdCounters {
    fn count(&self, kind: RnbdRefusal) {
        self.refused[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals of one kind so far.
    pub fn refused(&self, kind: RnbdRefusal) -> u64 {
        self.refused[kind as usize].load(Ordering::Relaxed)
    }

    /// Refusals so far, by kind (the kinds seen).
    pub fn refusals(&self) -> Vec<(RnbdRefusal, u64)> {
        RnbdRefusal::ALL
            .iter()
            .map(|&k| (k, self.refused(k)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// Exports a server holds over its life, removed ones included (an
/// export added at runtime takes a new slot; a removed one keeps its slot,
/// and its memory, until the server ends: IO finds exports by slot
/// without a lock, so a slot is never reused).
pub const MAX_EXPORTS: usize = 1024;

/// What an open of a device in a session is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenDevice {
    /// The device id the client got.
    pub device_id: u32,
    /// The export.
    pub export: String,
    /// "ro", "rw" or "migration".
    pub mode: &'static str,
}

/// The RNBD server: exports, and the sessions using them.
pub struct RnbdServer {
    /// Slots, filled in order; IO reads them with no lock.
    exports: Box<[OnceLock<Export>]>,
    /// Per slot: removed (no new opens; found by no name).
    removed: Box<[AtomicBool]>,
    /// Serializes adds and removes (never taken by IO).
    admin: Mutex<()>,
    sessions: Mutex<HashMap<[u8; 16], Arc<Sess>>>,
    max_io_size: u32,
    counters: RnbdCounters,
    backend: BackendCounters,
    /// The file exports' fds, registered in every connection's ring.
    pub(crate) files: Vec<i32>,
    /// Tests: serve file IO synchronously, as without io_uring.
    pub(crate) force_sync: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RnbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RnbdServer")
            .field("exports", &self.export_names())
            .finish()
    }
}

impl RnbdServer {
    /// A server exporting `exports`; `max_io_size` is the RTRS server's.
    /// Two exports of one name are refused.
    pub fn new(mut exports: Vec<Export>, max_io_size: u32) -> Result<Arc<RnbdServer>, ExportError> {
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(ExportError::Duplicate(e.name.clone()));
            }
        }
        if exports.len() > MAX_EXPORTS {
            return Err(ExportError::Spec(
                String::new(),
                format!("more than {MAX_EXPORTS} exports"),
            ));
        }
        // The files of the exports given now are registered with each
        // connection's ring (fixed file i); one added later is not, and is
        // named by its descriptor.
        let mut files = Vec::new();
        for e in exports.iter_mut() {
            if let Store::File(f) = &mut e.store {
                f.fixed = files.len() as u32;
                files.push(f.file.as_raw_fd());
            }
        }
        let slots: Box<[OnceLock<Export>]> = (0..MAX_EXPORTS).map(|_| OnceLock::new()).collect();
        for (slot, e) in slots.iter().zip(exports) {
            let _ = slot.set(e);
        }
        Ok(Arc::new(RnbdServer {
            exports: slots,
            removed: (0..MAX_EXPORTS).map(|_| AtomicBool::new(false)).collect(),
            admin: Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            max_io_size,
            counters: RnbdCounters::default(),
            backend: BackendCounters::default(),
            files,
            force_sync: Default::default(),
        }))
    }

    /// What the file and device backends fell back on, refused or failed.
    pub fn backend_counters(&self) -> &BackendCounters {
        &self.backend
    }

    /// Refusals of opens and IO, by kind.
    pub fn counters(&self) -> &RnbdCounters {
        &self.counters
    }

    /// A connection's ring, with the start's files registered; None (the
    /// connection's file IO served on the core) when it cannot be had:
    /// logged, counted.
    fn ring(&self, queue_depth: u32, mem: Option<Arc<mempool::Region>>) -> Option<Ring> {
        match Ring::new(queue_depth, &self.files, mem) {
            Ok(r) => Some(r),
            Err(e) => {
                self.backend.count(
                    Event::SyncFallback,
                    &format_args!(
                        "no io_uring for a connection ({e}): its file IO is served synchronously on the polling core"
                    ),
                );
                None
            }
        }
    }

    /// The handler for a new connection (of a new or known session).
    pub fn handler(self: &Arc<Self>, info: &ConInfo) -> RnbdHandler {
        let sess = match self.sessions.lock() {
            Ok(mut m) => m
                .entry(info.paths_uuid)
                .or_insert_with(|| Arc::new(Sess::new(info.identity.clone())))
                .clone(),
            Err(_) => Arc::new(Sess::new(info.identity.clone())),
        };
        // File IO goes through a ring of this connection's own; without
        // one (an old kernel, seccomp, no memory) it is served at once, on
        // the core. A server started without file exports makes it when a
        // connection first does file IO (an export added at runtime).
        let forced = self.force_sync.load(Ordering::Relaxed);
        let (ring, lazy_ring) = if forced {
            (None, None)
        } else if self.files.is_empty() {
            (None, Some((info.queue_depth, info.chunk_memory.clone())))
        } else {
            (self.ring(info.queue_depth, info.chunk_memory.clone()), None)
        };
        RnbdHandler {
            srv: self.clone(),
            sess,
            identity: info.identity.clone(),
            peer: info.peer.clone(),
            ring,
            lazy_ring,
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
            for (id, d) in s.devs.iter().enumerate() {
                let slot = d.swap(0, Ordering::AcqRel);
                self.log_close(slot, id, s.sessname(), "the session ended");
                self.release(slot);
            }
        }
    }

    /// Sessions known.
    pub fn sessions(&self) -> usize {
        self.sessions.lock().map_or(0, |m| m.len())
    }

    /// Write openers of an export.
    pub fn writers(&self, name: &str) -> Option<u32> {
        self.find(name)
            .and_then(|i| self.export(i))
            .map(|e| e.writers.load(Ordering::Relaxed))
    }

    /// The export in slot `idx` (a removed one too: IO on it may still
    /// be finishing).
    fn export(&self, idx: usize) -> Option<&Export> {
        self.exports.get(idx).and_then(OnceLock::get)
    }

    /// The slot of the export called `name` (not removed).
    fn find(&self, name: &str) -> Option<usize> {
        self.exports
            .iter()
            .enumerate()
            .map_while(|(i, s)| s.get().map(|e| (i, e)))
            .find(|(i, e)| e.name == name && !self.removed[*i].load(Ordering::SeqCst))
            .map(|(i, _)| i)
    }

    /// The exports served now: (name, size, read-only).
    pub fn export_names(&self) -> Vec<(String, u64, bool)> {
        self.exports
            .iter()
            .enumerate()
            .map_while(|(i, s)| s.get().map(|e| (i, e)))
            .filter(|(i, _)| !self.removed[*i].load(Ordering::SeqCst))
            .map(|(_, e)| (e.name.clone(), e.size, e.read_only))
            .collect()
    }

    /// Serves one more export from now on (logged); a name in use is
    /// refused.
    pub fn add_export(&self, e: Export) -> Result<(), ExportError> {
        let _g = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        if self.find(&e.name).is_some() {
            return Err(ExportError::Duplicate(e.name.clone()));
        }
        let Some(slot) = self.exports.iter().find(|s| s.get().is_none()) else {
            return Err(ExportError::Spec(
                e.name.clone(),
                format!("no room: {MAX_EXPORTS} exports were added over this server's life"),
            ));
        };
        tracing::info!(export = %e.name, size = e.size, read_only = e.read_only, "export added");
        let _ = slot.set(e);
        Ok(())
    }

    /// Stops serving an export: refused with -EBUSY while a session has it
    /// open (and -ENOENT for no such export); logged either way.
    pub fn remove_export(&self, name: &str) -> Result<(), i32> {
        let _g = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(idx) = self.find(name) else {
            tracing::info!(export = name, "remove export: no such export");
            return Err(-libc::ENOENT);
        };
        // Marked first, then the sessions scanned: an open racing with it
        // sets its slot first and checks the mark after (both SeqCst), so
        // one of the two sees the other.
        self.removed[idx].store(true, Ordering::SeqCst);
        let busy = self.openers(idx);
        if busy > 0 {
            self.removed[idx].store(false, Ordering::SeqCst);
            tracing::warn!(
                export = name,
                sessions = busy,
                "remove export refused: it is open (-EBUSY)"
            );
            return Err(-libc::EBUSY);
        }
        tracing::info!(export = name, "export removed");
        Ok(())
    }

    /// Closes device `device_id` of session `paths_uuid` (the kernel's
    /// rnbd-server `force_close`): its IO gets -ENOTCONN from now on.
    /// Returns the export's name; -ENOENT when it is not open.
    pub fn force_close(&self, paths_uuid: &[u8; 16], device_id: u32) -> Result<String, i32> {
        let sess = self
            .sessions
            .lock()
            .ok()
            .and_then(|m| m.get(paths_uuid).cloned())
            .ok_or(-libc::ENOENT)?;
        let slot = sess
            .devs
            .get(device_id as usize)
            .map_or(0, |d| d.swap(0, Ordering::AcqRel));
        let name = ((slot & SLOT_EXPORT) as usize)
            .checked_sub(1)
            .and_then(|i| self.export(i))
            .map(|e| e.name.clone())
            .ok_or(-libc::ENOENT)?;
        self.log_close(slot, device_id as usize, sess.sessname(), "by the operator");
        self.release(slot);
        Ok(name)
    }

    /// Opens of slot `idx` over all sessions.
    fn openers(&self, idx: usize) -> usize {
        let Ok(m) = self.sessions.lock() else {
            return 0;
        };
        m.values()
            .flat_map(|s| s.devs.iter())
            .filter(|d| {
                let v = d.load(Ordering::SeqCst);
                v != 0 && (v & SLOT_EXPORT) as usize == idx + 1
            })
            .count()
    }

    /// Each known session's open devices, by client session uuid.
    pub fn open_devices(&self) -> Vec<([u8; 16], Vec<OpenDevice>)> {
        let Ok(m) = self.sessions.lock() else {
            return Vec::new();
        };
        m.iter()
            .map(|(u, s)| {
                let devs = s
                    .devs
                    .iter()
                    .enumerate()
                    .filter_map(|(id, d)| {
                        let v = d.load(Ordering::Acquire);
                        let e = self.export(((v & SLOT_EXPORT) as usize).checked_sub(1)?)?;
                        Some(OpenDevice {
                            device_id: id as u32,
                            export: e.name.clone(),
                            mode: match slot_mode(v) {
                                m if m == AccessMode::Ro as u32 => "ro",
                                m if m == AccessMode::Rw as u32 => "rw",
                                _ => "migration",
                            },
                        })
                    })
                    .collect();
                (*u, devs)
            })
            .collect()
    }

    /// One line per device closed (a slot that was open).
    fn log_close(&self, slot: u32, id: usize, sessname: &str, why: &str) {
        let Some(e) = ((slot & SLOT_EXPORT) as usize)
            .checked_sub(1)
            .and_then(|i| self.export(i))
        else {
            return;
        };
        tracing::info!(
            sessname,
            export = %e.name,
            device_id = id,
            "rnbd: device {} closed ({why})",
            e.name
        );
    }

    fn release(&self, slot: u32) {
        if slot == 0 {
            return;
        }
        let (idx, mode) = ((slot & SLOT_EXPORT) as usize - 1, slot_mode(slot));
        if mode != AccessMode::Ro as u32 {
            if let Some(e) = self.export(idx) {
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
    /// Who the client of this connection's path is (set by its handshake).
    identity: Arc<OnceLock<Identity>>,
    peer: String,
    /// File and device IO in flight (None: served synchronously).
    ring: Option<Ring>,
    /// What to make the ring with at the first file IO (a server started
    /// without file exports).
    lazy_ring: Option<(u32, Option<Arc<mempool::Region>>)>,
}

impl RnbdHandler {
    /// Counts a refusal and logs it: the first of its kind in the session
    /// as a warning, the rest at debug (a client repeating a refused
    /// request cannot flood the log). Returns the errno to answer.
    fn refuse(&self, kind: RnbdRefusal, export: &str, why: &str) -> i32 {
        self.srv.counters.count(kind);
        let sessname = self.identity.get().map_or("?", |i| i.sessname.as_str());
        let bit = 1u8 << kind as u8;
        if self.sess.logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                peer = %self.peer,
                sessname,
                export,
                kind = kind.name(),
                errno = kind.errno(),
                "rnbd: refused: {why} (more of this kind from this session are counted, logged at debug)"
            );
        } else {
            tracing::debug!(peer = %self.peer, sessname, export, kind = kind.name(), "rnbd: refused: {why}");
        }
        kind.errno()
    }

    /// Whether this connection's client may open `e`.
    fn allowed(&self, e: &Export) -> bool {
        e.allow.is_empty()
            || self
                .identity
                .get()
                .is_some_and(|id| e.allow.iter().any(|r| r.matches(id)))
    }

    fn open(&mut self, v: &Open<&[u8]>, out: &mut [u8]) -> i32 {
        let name = v.dev_name();
        let Some((idx, e)) = self
            .srv
            .find(name)
            .and_then(|i| Some((i, self.srv.export(i)?)))
        else {
            return -libc::ENOENT;
        };
        let mode = v.access_mode();
        if out.len() < OpenRsp::<&[u8]>::LEN {
            // No room for the answer: open nothing the client cannot know.
            return -libc::EINVAL;
        }
        // Checked on every open, a re-open too (stricter than the kernel,
        // which checks nothing on a re-open).
        if !self.allowed(e) {
            return self.refuse(
                RnbdRefusal::NotAllowed,
                name,
                "the export's allow rules do not name this session",
            );
        }
        if e.read_only && mode != AccessMode::Ro {
            return self.refuse(
                RnbdRefusal::ReadOnlyExport,
                name,
                "an open for writing of a read-only export",
            );
        }
        // The same device again in this session: the same id. A re-open
        // for writing of a read-only open takes a writer first (the kernel
        // checks nothing on a re-open, but it checks no IO either).
        let open = self.sess.devs.iter().enumerate().find_map(|(id, d)| {
            let slot = d.load(Ordering::Acquire);
            (slot & SLOT_EXPORT == idx as u32 + 1).then_some((id, slot))
        });
        let upgrade = open.filter(|&(_, slot)| {
            slot_mode(slot) == AccessMode::Ro as u32 && mode != AccessMode::Ro
        });
        if let Some((id, _)) = open.filter(|_| upgrade.is_none()) {
            return self.open_rsp(id, e, out);
        }
        if !e.take_writer(mode) {
            return self.refuse(
                RnbdRefusal::WriterBusy,
                name,
                "an open for writing of a device that has its writers",
            );
        }
        let slot = (idx as u32 + 1) | ((mode as u32) << SLOT_MODE_SHIFT);
        let id = match upgrade {
            Some((id, ro)) => self.sess.devs[id]
                .compare_exchange(ro, slot, Ordering::AcqRel, Ordering::Acquire)
                .ok()
                .map(|_| id),
            None => self.sess.devs.iter().position(|d| {
                // SeqCst: ordered before the removed mark's check below.
                d.compare_exchange(0, slot, Ordering::SeqCst, Ordering::Acquire)
                    .is_ok()
            }),
        };
        if let (Some(id), None) = (id, upgrade) {
            // Removed meanwhile (rtrs ctl export remove): the remove scans
            // the slots after marking, this checks the mark after setting.
            if self.srv.removed[idx].load(Ordering::SeqCst) {
                self.srv
                    .release(self.sess.devs[id].swap(0, Ordering::AcqRel));
                return -libc::ENOENT;
            }
        }
        match id {
            Some(id) => {
                // Opens are control messages, rare on a core: one line each.
                tracing::info!(
                    sessname = self.identity.get().map_or("?", |i| i.sessname.as_str()),
                    export = %e.name,
                    device_id = id,
                    mode = ?mode,
                    "rnbd: device {} opened",
                    e.name
                );
                self.open_rsp(id, e, out)
            }
            None => {
                self.srv.release(slot);
                // No free id; or the read-only open was closed meanwhile.
                if upgrade.is_some() {
                    -libc::EBUSY
                } else {
                    -libc::EMFILE
                }
            }
        }
    }

    fn open_rsp(&self, id: usize, e: &Export, out: &mut [u8]) -> i32 {
        let (lbs, pbs) = match &e.store {
            Store::Ram(_) => (SECTOR as u32, SECTOR as u32),
            Store::File(f) => (f.lbs, f.pbs),
        };
        // Whole logical blocks of at most one IO.
        let max_sectors = self.srv.max_io_size / lbs * lbs / SECTOR as u32;
        let rsp = OpenRspRepr {
            device_id: id as u32,
            nsectors: e.size / SECTOR,
            max_hw_sectors: max_sectors,
            max_write_same_sectors: 0,
            max_discard_sectors: max_sectors,
            discard_granularity: lbs,
            discard_alignment: 0,
            physical_block_size: pbs as u16,
            logical_block_size: lbs as u16,
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

    fn io(&mut self, mut io: SrvIo<'_>, v: &IoRepr) -> Verdict {
        let dir = io.dir();
        let slot = self
            .sess
            .devs
            .get(v.device_id as usize)
            .map_or(0, |d| d.load(Ordering::Acquire));
        if slot == 0 {
            return Verdict::Done(-libc::ENOTCONN);
        }
        let srv = &*self.srv;
        let Some(e) = srv.export((slot & SLOT_EXPORT) as usize - 1) else {
            return Verdict::Done(-libc::ENOTCONN);
        };
        // Stricter than the kernel, which checks the mode at open only: a
        // device opened read-only is read and flushed, nothing else.
        if slot_mode(slot) == AccessMode::Ro as u32 && !reads_only(v.op, dir, io.data_len()) {
            return Verdict::Done(self.refuse(
                RnbdRefusal::ReadOnlyWrite,
                &e.name,
                "an IO that would change a device opened read-only",
            ));
        }
        let Some(off) = v.sector.checked_mul(SECTOR) else {
            return Verdict::Done(-libc::EIO);
        };
        let flags = v.flags;
        if let Store::File(f) = &e.store {
            let (op, len) = match (v.op, dir) {
                (RnbdOp::Read, IoDir::Read) => (Op::Read, io.data_len()),
                (RnbdOp::Write, IoDir::Write) => {
                    (Op::Write(flags & RNBD_F_FUA != 0), io.data_len())
                }
                (RnbdOp::Flush, _) => (Op::Sync, 0),
                (RnbdOp::Discard, _) => (Op::DISCARD, v.bi_size as usize),
                (RnbdOp::SecureErase, _) => (Op::ERASE, v.bi_size as usize),
                _ => return Verdict::Done(-libc::EINVAL),
            };
            if let Err(errno) = e.range(off, len) {
                return Verdict::Done(errno);
            }
            let buf = if matches!(op, Op::Read | Op::Write(_)) {
                io.data().as_ptr()
            } else {
                std::ptr::null()
            };
            if op != Op::Sync && !f.aligned(off, len, buf) {
                srv.backend.count(
                    Event::Misaligned,
                    &format_args!(
                        "export {}: an IO of {len} bytes at {off} not aligned to its {}-byte blocks (O_DIRECT): -EINVAL",
                        e.name, f.lbs
                    ),
                );
                return Verdict::Done(-libc::EINVAL);
            }
            if self.ring.is_none() && !f.inline {
                if let Some((qd, mem)) = self.lazy_ring.take() {
                    self.ring = srv.ring(qd, mem);
                }
            }
            if let Some(ring) = self.ring.as_mut().filter(|_| !f.inline) {
                if let Err(d) = ring.start(io.defer(), op, f.target(), len as u32, off) {
                    d.complete(-libc::EBUSY);
                }
                return Verdict::Later;
            }
        }
        let data = io.data();
        let r = match (v.op, dir) {
            (RnbdOp::Read, IoDir::Read) => e.read(off, data),
            (RnbdOp::Write, IoDir::Write) => e.write(off, data).and_then(|()| {
                if flags & RNBD_F_FUA != 0 {
                    e.flush()
                } else {
                    Ok(())
                }
            }),
            (RnbdOp::Flush, _) => e.flush(),
            (RnbdOp::Discard | RnbdOp::SecureErase, _) => e.zero(off, u64::from(v.bi_size)),
            _ => Err(-libc::EINVAL),
        };
        Verdict::Done(match r {
            Ok(()) => 0,
            Err(errno) => {
                if let Store::File(_) = e.store {
                    srv.backend.count(
                        Event::IoError,
                        &format_args!(
                            "export {}: an IO failed with errno {errno}: answered to the client",
                            e.name
                        ),
                    );
                }
                errno
            }
        })
    }
}

/// Whether an IO leaves the device's data as it is: a read, or a flush
/// that carries no data.
fn reads_only(op: RnbdOp, dir: IoDir, data_len: usize) -> bool {
    match op {
        RnbdOp::Read => dir == IoDir::Read,
        RnbdOp::Flush => dir == IoDir::Read || data_len == 0,
        RnbdOp::Write | RnbdOp::Discard | RnbdOp::SecureErase => false,
    }
}

impl Handler for RnbdHandler {
    fn on_io(&mut self, mut io: SrvIo<'_>) -> Verdict {
        let dir = io.dir();
        let (usr, data) = io.parts();
        let errno = match RnbdMsg::parse(usr) {
            Err(_) => -libc::EINVAL,
            Ok(RnbdMsg::SessInfo(v)) => {
                let ver = v.ver().min(RNBD_PROTO_VER_MAJOR);
                self.sess.ver.store(ver, Ordering::Relaxed);
                if dir == IoDir::Read {
                    match (SessInfoRepr { ver }).emit_rsp(data) {
                        Ok(_) => 0,
                        Err(_) => -libc::EINVAL,
                    }
                } else {
                    0
                }
            }
            Ok(RnbdMsg::Open(v)) => {
                if dir == IoDir::Read {
                    self.open(&v, data)
                } else {
                    -libc::EINVAL
                }
            }
            Ok(RnbdMsg::Close(v)) => {
                if let Some(d) = self.sess.devs.get(v.device_id() as usize) {
                    let slot = d.swap(0, Ordering::AcqRel);
                    let who = self.identity.get().map_or("?", |i| i.sessname.as_str());
                    self.srv
                        .log_close(slot, v.device_id() as usize, who, "by the client");
                    self.srv.release(slot);
                }
                0
            }
            Ok(RnbdMsg::Io(v)) => {
                let req = IoRepr::parse(&v);
                return self.io(io, &req);
            }
        };
        Verdict::Done(errno)
    }

    fn poll(&mut self) -> usize {
        match self.ring.as_mut() {
            Some(r) => r.poll(&self.srv.backend),
            None => 0,
        }
    }

    fn quiesce(&mut self) {
        if let Some(r) = self.ring.as_mut() {
            r.quiesce(&self.srv.backend);
        }
    }
}

/// A server exporting `exports` builds one handler per connection.
pub fn make_handler(srv: Arc<RnbdServer>) -> impl FnMut(&ConInfo) -> RnbdHandler + Send + 'static {
    move |info| srv.handler(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::srv::deferred::testkit::Bench;

    const MB: u64 = 1 << 20;

    fn server(exports: Vec<Export>) -> Arc<RnbdServer> {
        RnbdServer::new(exports, 128 << 10).unwrap()
    }

    /// A connection of session `uuid` whose client is `id` (None: before
    /// its handshake).
    fn con(srv: &Arc<RnbdServer>, uuid: u8, id: Option<Identity>) -> RnbdHandler {
        let identity = Arc::new(OnceLock::new());
        if let Some(id) = id {
            identity.set(id).unwrap();
        }
        srv.handler(&ConInfo {
            paths_uuid: [uuid; 16],
            sess_uuid: [uuid; 16],
            cid: 1,
            queue_depth: 16,
            chunk_memory: None,
            peer: "test".into(),
            identity,
        })
    }

    fn named(sessname: &str) -> Option<Identity> {
        Some(Identity {
            sessname: sessname.into(),
            key_id: None,
        })
    }

    /// One request in a chunk of its own: a write's `data` goes in, a
    /// read's comes back out.
    fn call(h: &mut RnbdHandler, usr: &[u8], dir: IoDir, data: &mut [u8]) -> i32 {
        let mut bench = Bench::new(1, 256 << 10);
        let written: &[u8] = if dir == IoDir::Write { data } else { &[] };
        let io = bench.io(0, dir, usr, written, data.len());
        match h.on_io(io) {
            Verdict::Done(e) => {
                if dir == IoDir::Read {
                    data.copy_from_slice(bench.data(0));
                }
                e
            }
            Verdict::Later => panic!("the RNBD server answers at once"),
        }
    }

    /// OPEN; the device id or the errno.
    fn open(h: &mut RnbdHandler, name: &str, mode: AccessMode) -> Result<u32, i32> {
        let mut usr = [0u8; Open::<&[u8]>::LEN];
        OpenRepr {
            access_mode: mode,
            dev_name: name,
        }
        .emit(&mut usr)
        .unwrap();
        let mut rsp = [0u8; OpenRsp::<&[u8]>::LEN];
        match call(h, &usr, IoDir::Read, &mut rsp) {
            0 => Ok(OpenRspRepr::parse(&OpenRsp::new_checked(&rsp[..]).unwrap()).device_id),
            e => Err(e),
        }
    }

    fn io(h: &mut RnbdHandler, id: u32, op: RnbdOp, dir: IoDir, off: u64, data: &mut [u8]) -> i32 {
        let mut usr = [0u8; 32];
        IoRepr {
            device_id: id,
            sector: off / SECTOR,
            op,
            flags: 0,
            bi_size: data.len() as u32,
            prio: 0,
        }
        .emit(&mut usr)
        .unwrap();
        call(h, &usr, dir, data)
    }

    fn close(h: &mut RnbdHandler, id: u32) -> i32 {
        let mut usr = [0u8; Close::<&[u8]>::LEN];
        CloseRepr { device_id: id }.emit(&mut usr).unwrap();
        call(h, &usr, IoDir::Write, &mut [])
    }

    #[test]
    fn exports_are_added_and_removed_at_runtime_but_not_while_open() {
        let srv = server(vec![Export::ram("a", MB).unwrap()]);
        let mut h = con(&srv, 1, named("s"));
        assert_eq!(open(&mut h, "b", AccessMode::Rw), Err(-libc::ENOENT));
        srv.add_export(Export::ram("b", MB).unwrap()).unwrap();
        assert!(matches!(
            srv.add_export(Export::ram("b", MB).unwrap()),
            Err(ExportError::Duplicate(_))
        ));
        let id = open(&mut h, "b", AccessMode::Rw).unwrap();
        let mut data = vec![7u8; 4096];
        assert_eq!(io(&mut h, id, RnbdOp::Write, IoDir::Write, 0, &mut data), 0);
        let devs = srv.open_devices();
        assert_eq!(devs.len(), 1);
        assert_eq!(devs[0].1[0].export, "b");
        assert_eq!(devs[0].1[0].mode, "rw");
        assert_eq!(srv.remove_export("b"), Err(-libc::EBUSY));
        // Still served after the refused remove.
        assert_eq!(io(&mut h, id, RnbdOp::Read, IoDir::Read, 0, &mut data), 0);
        assert_eq!(srv.force_close(&[1; 16], id), Ok("b".to_string()));
        assert_eq!(srv.force_close(&[1; 16], id), Err(-libc::ENOENT));
        assert_eq!(srv.force_close(&[9; 16], 0), Err(-libc::ENOENT));
        assert_eq!(
            io(&mut h, id, RnbdOp::Read, IoDir::Read, 0, &mut data),
            -libc::ENOTCONN
        );
        assert_eq!(close(&mut h, id), 0);
        assert_eq!(srv.remove_export("b"), Ok(()));
        assert_eq!(srv.remove_export("b"), Err(-libc::ENOENT));
        assert_eq!(open(&mut h, "b", AccessMode::Ro), Err(-libc::ENOENT));
        let names: Vec<String> = srv.export_names().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["a"]);
        // The name can be served again (a new slot).
        srv.add_export(Export::ram("b", MB).unwrap()).unwrap();
        assert!(open(&mut h, "b", AccessMode::Ro).is_ok());
    }

    #[test]
    fn a_read_only_open_reads_and_changes_nothing() {
        let srv = server(vec![Export::ram("r", MB).unwrap()]);
        let mut rw = con(&srv, 1, named("writer"));
        let mut ro = con(&srv, 2, named("reader"));
        let w = open(&mut rw, "r", AccessMode::Rw).unwrap();
        let mut data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
        assert_eq!(io(&mut rw, w, RnbdOp::Write, IoDir::Write, 0, &mut data), 0);
        let r = open(&mut ro, "r", AccessMode::Ro).unwrap();
        let mut junk = vec![0xa5u8; 8192];
        for (op, dir, len) in [
            (RnbdOp::Write, IoDir::Write, 8192),
            (RnbdOp::Discard, IoDir::Write, 8192),
            (RnbdOp::Discard, IoDir::Read, 0),
            (RnbdOp::SecureErase, IoDir::Write, 8192),
            (RnbdOp::Flush, IoDir::Write, 8192),
            (RnbdOp::Read, IoDir::Write, 8192),
        ] {
            let e = io(&mut ro, r, op, dir, 0, &mut junk[..len]);
            assert_eq!(e, -libc::EPERM, "{op:?} {dir:?} {len}");
        }
        // A discard of bi_size bytes with no data in the chunk.
        let mut usr = [0u8; 32];
        IoRepr {
            device_id: r,
            sector: 0,
            op: RnbdOp::Discard,
            flags: 0,
            bi_size: 8192,
            prio: 0,
        }
        .emit(&mut usr)
        .unwrap();
        assert_eq!(call(&mut ro, &usr, IoDir::Write, &mut []), -libc::EPERM);
        assert_eq!(
            srv.counters().refused(RnbdRefusal::ReadOnlyWrite),
            7,
            "every refusal counted"
        );
        // Reads and an empty flush are served; the data is the writer's.
        assert_eq!(io(&mut ro, r, RnbdOp::Flush, IoDir::Read, 0, &mut []), 0);
        let mut back = vec![0u8; 8192];
        assert_eq!(io(&mut ro, r, RnbdOp::Read, IoDir::Read, 0, &mut back), 0);
        assert!(back == data, "the read-only session changed the device");
        // The writer still writes.
        assert_eq!(io(&mut rw, w, RnbdOp::Discard, IoDir::Write, 0, &mut []), 0);
    }

    #[test]
    fn a_read_only_export_refuses_opens_for_writing() {
        let srv = server(vec![Export::parse("r=ram:1M,ro").unwrap()]);
        let mut h = con(&srv, 1, named("s"));
        assert_eq!(open(&mut h, "r", AccessMode::Rw), Err(-libc::EPERM));
        assert_eq!(open(&mut h, "r", AccessMode::Migration), Err(-libc::EPERM));
        assert_eq!(srv.writers("r"), Some(0));
        let id = open(&mut h, "r", AccessMode::Ro).unwrap();
        // A write re-open of the read-only open is refused too.
        assert_eq!(open(&mut h, "r", AccessMode::Rw), Err(-libc::EPERM));
        let mut b = vec![0u8; 512];
        assert_eq!(io(&mut h, id, RnbdOp::Read, IoDir::Read, 0, &mut b), 0);
        assert_eq!(
            srv.counters().refusals(),
            vec![(RnbdRefusal::ReadOnlyExport, 3)]
        );
    }

    #[test]
    fn a_write_reopen_of_a_read_only_open_takes_a_writer() {
        let srv = server(vec![Export::ram("r", MB).unwrap()]);
        let mut h = con(&srv, 1, named("s"));
        let mut a = con(&srv, 2, named("a"));
        let id = open(&mut h, "r", AccessMode::Ro).unwrap();
        let w = open(&mut a, "r", AccessMode::Rw).unwrap();
        // The device has its writer: the re-open is refused and the
        // read-only open stays read-only.
        assert_eq!(open(&mut h, "r", AccessMode::Rw), Err(-libc::EPERM));
        let mut b = vec![1u8; 512];
        assert_eq!(
            io(&mut h, id, RnbdOp::Write, IoDir::Write, 0, &mut b),
            -libc::EPERM
        );
        let mut close = [0u8; Close::<&[u8]>::LEN];
        CloseRepr { device_id: w }.emit(&mut close).unwrap();
        assert_eq!(call(&mut a, &close, IoDir::Write, &mut []), 0);
        // Now it takes the writer, with the same id, and writes.
        assert_eq!(open(&mut h, "r", AccessMode::Rw), Ok(id));
        assert_eq!(srv.writers("r"), Some(1));
        assert_eq!(io(&mut h, id, RnbdOp::Write, IoDir::Write, 0, &mut b), 0);
        assert_eq!(
            open(&mut h, "r", AccessMode::Rw),
            Ok(id),
            "no second writer"
        );
        assert_eq!(srv.writers("r"), Some(1));
        // The kernel's rule stays: one writer (two for migration).
        assert_eq!(open(&mut a, "r", AccessMode::Rw), Err(-libc::EPERM));
        open(&mut a, "r", AccessMode::Migration).unwrap();
        assert_eq!(srv.writers("r"), Some(2));
        srv.session_ended(&[1; 16]);
        srv.session_ended(&[2; 16]);
        assert_eq!(srv.writers("r"), Some(0));
        let c = srv.counters();
        assert_eq!(c.refused(RnbdRefusal::WriterBusy), 2);
        assert_eq!(c.refused(RnbdRefusal::ReadOnlyWrite), 1);
    }

    #[test]
    fn an_open_with_no_room_for_its_answer_opens_nothing() {
        let srv = server(vec![Export::ram("r", MB).unwrap()]);
        let mut h = con(&srv, 1, named("s"));
        let mut usr = [0u8; Open::<&[u8]>::LEN];
        OpenRepr {
            access_mode: AccessMode::Rw,
            dev_name: "r",
        }
        .emit(&mut usr)
        .unwrap();
        let mut short = [0u8; 8];
        assert_eq!(call(&mut h, &usr, IoDir::Read, &mut short), -libc::EINVAL);
        assert_eq!(srv.writers("r"), Some(0));
        assert_eq!(open(&mut h, "r", AccessMode::Rw), Ok(0));
    }

    #[test]
    fn allow_rules_name_the_sessions_served() {
        let srv = server(vec![
            Export::parse("r=ram:1M,allow=alice|bob").unwrap(),
            Export::ram("k", MB)
                .unwrap()
                .allow(Rule::KeyId("key1".into())),
            Export::ram("open", MB).unwrap(),
        ]);
        let mut carol = con(&srv, 1, named("carol"));
        assert_eq!(open(&mut carol, "r", AccessMode::Ro), Err(-libc::EACCES));
        assert!(open(&mut carol, "open", AccessMode::Rw).is_ok());
        // No handshake yet: nobody.
        let mut anon = con(&srv, 2, None);
        assert_eq!(open(&mut anon, "r", AccessMode::Ro), Err(-libc::EACCES));
        let mut alice = con(&srv, 3, named("alice"));
        assert!(open(&mut alice, "r", AccessMode::Rw).is_ok());
        let mut bob = con(&srv, 4, named("bob"));
        assert!(open(&mut bob, "r", AccessMode::Ro).is_ok());
        // Key rules match the key id, not a session of that name.
        let mut key1 = con(&srv, 5, named("key1"));
        assert_eq!(open(&mut key1, "k", AccessMode::Ro), Err(-libc::EACCES));
        let mut keyed = con(
            &srv,
            6,
            Some(Identity {
                sessname: "x".into(),
                key_id: Some("key1".into()),
            }),
        );
        assert!(open(&mut keyed, "k", AccessMode::Rw).is_ok());
        assert_eq!(
            srv.counters().refusals(),
            vec![(RnbdRefusal::NotAllowed, 3)]
        );
    }

    #[test]
    fn export_specs() {
        let e = Export::parse("r=ram:1M,ro,allow=a|b,allow=c,allow-key=k").unwrap();
        assert!(e.is_read_only());
        assert_eq!(
            e.rules(),
            [
                Rule::Sessname("a".into()),
                Rule::Sessname("b".into()),
                Rule::Sessname("c".into()),
                Rule::KeyId("k".into()),
            ]
        );
        let e = Export::parse("r=ram:1M").unwrap();
        assert!(!e.is_read_only() && e.rules().is_empty());
        for bad in [
            "r=ram:1M,",
            "r=ram:1M,rw",
            "r=ram:1M,RO",
            "r=ram:1M,allow=",
            "r=ram:1M,allow=a||b",
            "r=ram:1M,allow=a.b",
            "r=ram:1M,allow=a/b",
            "r=ram:1M,allow-key=",
            "r=ram:1M,ro=1",
            ",ro",
            // Not rounded to whole sectors: refused.
            "r=ram:1000",
            "r=ram:1",
        ] {
            assert!(
                matches!(Export::parse(bad), Err(ExportError::Spec(..))),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn duplicate_export_names_are_refused() {
        let r = RnbdServer::new(
            vec![
                Export::ram("a", MB).unwrap(),
                Export::ram("b", MB).unwrap(),
                Export::parse("a=ram:1M,ro").unwrap(),
            ],
            128 << 10,
        );
        assert!(matches!(r, Err(ExportError::Duplicate(n)) if n == "a"));
    }
}
