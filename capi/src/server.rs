//! The server half: a C callback behind `rtrs_poll::srv::Handler`, and
//! deferred completions from any thread.
//!
//! ```text
//!  rtrs_server_complete(srv, id, err)  (any app thread)
//!     id = gen << 32 | slot << 16 | chunk ── slot's MPSC ring ──> CHandler::poll (its core): Deferred::complete
//!  slot: one per live connection (claimed when its handler is made, released when dropped);
//!        gen changes at both, so a completion for a gone connection is refused (-ENOENT)
//!        or, when it races the close, dropped by the next owner
//! ```

use crate::{boundary, c_str, Error, RTRS_LATER, RTRS_READ, RTRS_WRITE};
use rtrs_fabric::{with_backend, Address, Fabric, OnFabric};
use rtrs_poll::srv::{ConInfo, CorePool, Handler, IoDir, Server, SrvConfig, SrvIo, Verdict};
use rtrs_poll::Deferred;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Server settings. Zero (or NULL) fields take the default shown.
#[repr(C)]
#[derive(Debug)]
pub struct rtrs_server_cfg {
    /// `sizeof(struct rtrs_server_cfg)` as the caller compiled it: fields
    /// added in later versions of the library take their defaults for an
    /// older caller. Required (0 is -EINVAL).
    pub size: u32,
    /// Where to listen: "shm:NAME" (this host), "tcp:HOST:PORT" or, in a
    /// library built with the rdma feature, "rdma:HOST:PORT".
    pub addr: *const c_char,
    /// CPUs to pin the IO cores on (`ncpus` of them); NULL: one core on
    /// CPU 0. Each core busy-polls its CPU.
    pub cpus: *const u32,
    /// Entries of `cpus`.
    pub ncpus: usize,
    /// Chunks (requests in flight) per client session; 0: 512.
    pub queue_depth: u16,
    /// Bytes per chunk, a power of two of at least 8192 (the largest IO is
    /// this less 4096 of header room); 0: 131072.
    pub max_chunk_size: u32,
    /// Connections that may be served at once (each path of a session is
    /// one per client queue, plus one); 0: 256. Requests on connections
    /// past this fail with -EBUSY without reaching the callback.
    pub max_connections: u32,
    /// Source networks that may connect: CIDRs, comma-separated (NULL:
    /// any). A tcp address other hosts reach needs this, `auth_key_file`
    /// or `insecure`; rtrs_server_open refuses it otherwise (-EACCES).
    pub allow: *const c_char,
    /// tcp: admit only clients that prove they hold the pre-shared key in
    /// this file (at least 16 bytes, mode 600); NULL: none.
    pub auth_key_file: *const c_char,
    /// Non-zero: serve a tcp address other hosts reach to any host (no
    /// `allow`, no key), logged as INSECURE.
    pub insecure: c_int,
}

/// The first version's size: every field up to `max_connections`.
const SERVER_CFG_V1: usize = std::mem::offset_of!(rtrs_server_cfg, allow);

/// A request, as the handler callback sees it. Valid during the callback;
/// with `RTRS_LATER`, `data` stays the application's to fill (a read), even
/// while the client's connection closes (its teardown waits), until
/// it calls `rtrs_server_complete` for `id`.
#[repr(C)]
#[derive(Debug)]
pub struct rtrs_srv_io {
    /// Names the request for `rtrs_server_complete`.
    pub id: u64,
    /// `RTRS_WRITE` (data holds what the client wrote) or `RTRS_READ` (fill
    /// data: it goes to the client when the request completes).
    pub dir: c_int,
    /// The user message the client sent with the request.
    pub usr: *const u8,
    /// Its length.
    pub usr_len: usize,
    /// The data: zero-copy, in the session's registered chunk.
    pub data: *mut u8,
    /// Its length (a read: the length the client asked for).
    pub data_len: usize,
}

/// The handler callback: called on a server core for each request, from
/// several cores at once when there are several (`ctx` must be safe to
/// share between them). Returns 0 or a negative errno (the request's
/// result, sent to the client now), or `RTRS_LATER`. It must not block:
/// the core serves other connections meanwhile.
pub type rtrs_handler_cb =
    Option<unsafe extern "C" fn(ctx: *mut c_void, io: *const rtrs_srv_io) -> c_int>;

/// A deferred completion on its way to a connection's core.
#[derive(Clone, Copy, Debug)]
struct Done {
    gen: u32,
    chunk: u16,
    errno: i32,
}

/// One connection's mailbox for deferred completions.
struct Slot {
    /// Changes when the slot is claimed and when it is released.
    gen: AtomicU32,
    used: AtomicBool,
    tx: pollers::mpsc::Sender<Done>,
    /// The receiver, while no connection holds it (taken only when a
    /// connection starts or ends: never on the IO path).
    rx: Mutex<Option<pollers::mpsc::Receiver<Done>>>,
}

struct Registry {
    slots: Box<[Slot]>,
}

impl Registry {
    fn new(n: usize, queue_depth: usize) -> Registry {
        let slots = (0..n)
            .map(|_| {
                // Room for every request of the session at once, and as
                // many stale ones: completing never finds it full in
                // practice (and says -EAGAIN if it does).
                let (tx, rx) = pollers::mpsc::channel(2 * queue_depth.max(1));
                Slot {
                    gen: AtomicU32::new(0),
                    used: AtomicBool::new(false),
                    tx,
                    rx: Mutex::new(Some(rx)),
                }
            })
            .collect();
        Registry { slots }
    }

    /// A free slot for a new connection: (index, gen, receiver).
    fn claim(&self) -> Option<(u16, u32, pollers::mpsc::Receiver<Done>)> {
        for (i, s) in self.slots.iter().enumerate() {
            if s.used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let Some(mut rx) = s.rx.lock().ok().and_then(|mut g| g.take()) else {
                s.used.store(false, Ordering::Release);
                continue;
            };
            let gen = s.gen.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
            while rx.pop().is_some() {} // completions for the previous owner
            return Some((i as u16, gen, rx));
        }
        None
    }

    fn release(&self, i: u16, rx: pollers::mpsc::Receiver<Done>) {
        let s = &self.slots[usize::from(i)];
        s.gen.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut g) = s.rx.lock() {
            *g = Some(rx);
        }
        s.used.store(false, Ordering::Release);
    }

    fn complete(&self, id: u64, errno: i32) -> Result<(), Error> {
        let (gen, slot, chunk) = ((id >> 32) as u32, (id >> 16) as u16, id as u16);
        let Some(s) = self.slots.get(usize::from(slot)) else {
            return Err(Error::fixed(
                -libc::ENOENT,
                c"rtrs_server_complete: no such IO id",
            ));
        };
        if s.gen.load(Ordering::Acquire) != gen || !s.used.load(Ordering::Acquire) {
            return Err(Error::fixed(
                -libc::ENOENT,
                c"rtrs_server_complete: the request's connection is gone",
            ));
        }
        s.tx.push(Done { gen, chunk, errno }).map_err(|_| {
            Error::fixed(
                -libc::EAGAIN,
                c"rtrs_server_complete: the connection's ring is full",
            )
        })
    }
}

/// The callback and its context, shared by every connection's handler.
#[derive(Clone, Copy)]
struct Callback {
    cb: unsafe extern "C" fn(*mut c_void, *const rtrs_srv_io) -> c_int,
    /// The application's `ctx` (an address: the application promises it
    /// may be used from any core).
    ctx: usize,
}

/// One connection's handler: calls the C callback; deferred requests wait
/// in `ids` (by chunk) for their completion to come through the slot.
struct CHandler {
    call: Callback,
    reg: Arc<Registry>,
    /// (slot, gen, receiver); None: no slot was free (-EBUSY to all).
    slot: Option<(u16, u32, pollers::mpsc::Receiver<Done>)>,
    /// The requests the application deferred, by chunk.
    ids: Box<[Option<Deferred>]>,
}

impl Handler for CHandler {
    fn on_io(&mut self, mut io: SrvIo<'_>) -> Verdict {
        let Some((slot, gen, _)) = &self.slot else {
            return Verdict::Done(-libc::EBUSY);
        };
        let chunk = io.id().chunk();
        let dir = match io.dir() {
            IoDir::Write => RTRS_WRITE,
            IoDir::Read => RTRS_READ,
        };
        let (usr, data) = io.parts();
        let c = rtrs_srv_io {
            id: u64::from(*gen) << 32 | u64::from(*slot) << 16 | u64::from(chunk as u16),
            dir,
            usr: usr.as_ptr(),
            usr_len: usr.len(),
            data: data.as_mut_ptr(),
            data_len: data.len(),
        };
        // SAFETY: `cb` is the function the application registered, with
        // the context it gave (valid until rtrs_server_close, which stops
        // the cores first); `c` points into this request's chunk, valid
        // for the call.
        let r = unsafe { (self.call.cb)(self.call.ctx as *mut c_void, &c) };
        match r {
            RTRS_LATER => match self.ids.get_mut(chunk as usize) {
                Some(s) => {
                    *s = Some(io.defer());
                    Verdict::Later
                }
                None => Verdict::Done(-libc::EIO),
            },
            r if r <= 0 => Verdict::Done(r),
            _ => Verdict::Done(-libc::EIO),
        }
    }

    fn poll(&mut self) -> usize {
        let Some((_, gen, rx)) = self.slot.as_mut() else {
            return 0;
        };
        let mut n = 0;
        while let Some(d) = rx.pop() {
            if d.gen != *gen {
                continue;
            }
            // An id not deferred, or completed twice, is dropped.
            if let Some(req) = self
                .ids
                .get_mut(usize::from(d.chunk))
                .and_then(Option::take)
            {
                req.complete(d.errno);
                n += 1;
            }
        }
        n
    }

    /// The connection is closing with requests the application deferred:
    /// their `data` stays valid until it completes each of them (the
    /// header's contract), so the chunks go back only then. A warning
    /// every 5 s names what it waits for.
    fn quiesce(&mut self) {
        let mut since = std::time::Instant::now();
        loop {
            self.poll();
            let waiting = self.ids.iter().filter(|i| i.is_some()).count();
            if waiting == 0 {
                return;
            }
            if since.elapsed() >= std::time::Duration::from_secs(5) {
                tracing::warn!(
                    waiting,
                    "a closing connection waits for the application to complete its deferred requests (rtrs_server_complete)"
                );
                since = std::time::Instant::now();
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for CHandler {
    fn drop(&mut self) {
        if let Some((slot, _, rx)) = self.slot.take() {
            self.reg.release(slot, rx);
        }
    }
}

/// A server (opaque).
pub struct rtrs_server {
    reg: Arc<Registry>,
    /// The `Server<F, CHandler>` and its fabric: dropping it stops the
    /// control thread and closes every path.
    srv: Option<Box<dyn Send>>,
    pool: Option<CorePool>,
}

impl std::fmt::Debug for rtrs_server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rtrs_server({} connection slots)", self.reg.slots.len())
    }
}

impl Drop for rtrs_server {
    fn drop(&mut self) {
        drop(self.srv.take());
        if let Some(p) = self.pool.take() {
            p.stop();
        }
    }
}

pub(crate) fn errno_of(e: &rtrs_fabric::FabricError) -> c_int {
    use rtrs_fabric::FabricError as E;
    match e {
        E::BadAddress { .. } | E::WrongBackend(..) => -libc::EINVAL,
        E::NotBuilt(_) => -libc::EPROTONOSUPPORT,
        E::Io { source, .. } => source.raw_os_error().map_or(-libc::EIO, |n| -n),
        E::TableFull(_) | E::QueueFull { .. } => -libc::ENOMEM,
        _ => -libc::EIO,
    }
}

/// `listen` on whichever fabric the address names.
struct Listen<'a> {
    addr: &'a Address,
    cfg: SrvConfig,
    call: Callback,
    reg: &'a Arc<Registry>,
    pool: &'a CorePool,
}

impl OnFabric for Listen<'_> {
    type Output = Result<Box<dyn Send>, Error>;
    fn run<F: Fabric>(self, fabric: F) -> Self::Output {
        listen(fabric, self.addr, self.cfg, self.call, self.reg, self.pool)
    }
}

/// A fabric error as the C caller sees it: its errno and what failed.
pub(crate) fn fabric_error(call: &str, e: &rtrs_fabric::FabricError) -> Error {
    Error::new(errno_of(e), format!("{call}: {e}"))
}

fn listen<F: Fabric>(
    fabric: F,
    addr: &Address,
    cfg: SrvConfig,
    call: Callback,
    reg: &Arc<Registry>,
    pool: &CorePool,
) -> Result<Box<dyn Send>, Error> {
    let qd = usize::from(cfg.queue_depth);
    let r2 = reg.clone();
    let srv = Server::listen(
        &fabric,
        addr,
        cfg,
        move |_: &ConInfo| CHandler {
            call,
            reg: r2.clone(),
            slot: r2.claim(),
            ids: (0..qd).map(|_| None).collect(),
        },
        pool.place(),
    )
    .map_err(|e| {
        let errno = match &e {
            rtrs_poll::srv::SrvError::Fabric(f) => errno_of(f),
            rtrs_poll::srv::SrvError::Config(_) => -libc::EINVAL,
            rtrs_poll::srv::SrvError::Exposed(_) => -libc::EACCES,
            _ => -libc::EIO,
        };
        Error::new(errno, format!("rtrs_server_open: {e}"))
    })?;
    Ok(Box::new((srv, fabric)))
}

/// Opens a server: listens on `cfg->addr`, starts its cores and calls `cb`
/// with `ctx` for every request. On success `*out` is the server.
/// Returns 0 or a negative errno (then see `rtrs_last_error`).
///
/// # Safety
/// `cfg` points to a valid `rtrs_server_cfg` (its `addr` a C string, `cpus`
/// NULL or `ncpus` entries); `out` is writable; `ctx` stays valid, and safe
/// to use from every core, until `rtrs_server_close` returns.
#[no_mangle]
pub unsafe extern "C" fn rtrs_server_open(
    cfg: *const rtrs_server_cfg,
    cb: rtrs_handler_cb,
    ctx: *mut c_void,
    out: *mut *mut rtrs_server,
) -> c_int {
    boundary(|| {
        if cfg.is_null() || out.is_null() {
            return Err(Error::fixed(
                -libc::EINVAL,
                c"rtrs_server_open: cfg or out is NULL",
            ));
        }
        let Some(cb) = cb else {
            return Err(Error::fixed(-libc::EINVAL, c"rtrs_server_open: cb is NULL"));
        };
        // SAFETY: non-null; the caller promises a valid cfg of its size.
        let cfg = unsafe {
            crate::read_cfg(
                cfg,
                SERVER_CFG_V1,
                c"rtrs_server_open: cfg->size must be sizeof(struct rtrs_server_cfg)",
            )
        }?;
        // SAFETY: the caller promises a C string (NULL is checked).
        let addr = unsafe { c_str(cfg.addr, c"rtrs_server_open: addr is NULL or not UTF-8") }?;
        let addr: Address = addr
            .parse()
            .map_err(|e| Error::new(-libc::EINVAL, format!("rtrs_server_open: {e}")))?;
        let cpus: Vec<usize> = if cfg.cpus.is_null() || cfg.ncpus == 0 {
            vec![0]
        } else {
            // SAFETY: non-null; the caller promises `ncpus` entries.
            unsafe { std::slice::from_raw_parts(cfg.cpus, cfg.ncpus) }
                .iter()
                .map(|&c| c as usize)
                .collect()
        };
        let mut scfg = SrvConfig::default();
        if cfg.queue_depth != 0 {
            scfg.queue_depth = cfg.queue_depth;
        }
        if cfg.max_chunk_size != 0 {
            scfg.max_chunk_size = cfg.max_chunk_size;
        }
        // SAFETY: NULL or the caller's C strings.
        scfg.limits.allow = unsafe { crate::c_networks(cfg.allow, "rtrs_server_open") }?;
        scfg.limits.insecure = cfg.insecure != 0;
        // SAFETY: as above.
        let backends = unsafe { crate::c_backends(cfg.auth_key_file, "rtrs_server_open") }?;
        scfg.layout()
            .map_err(|e| Error::new(-libc::EINVAL, format!("rtrs_server_open: {e}")))?;
        let conns = match cfg.max_connections {
            0 => 256,
            n => n.min(u32::from(u16::MAX)) as usize,
        };
        let reg = Arc::new(Registry::new(conns, usize::from(scfg.queue_depth)));
        let call = Callback {
            cb,
            ctx: ctx as usize,
        };
        let pool = CorePool::launch(&cpus)
            .map_err(|e| Error::new(-libc::EIO, format!("rtrs_server_open: {e}")))?;
        let srv = with_backend(
            &addr,
            &backends,
            Listen {
                addr: &addr,
                cfg: scfg,
                call,
                reg: &reg,
                pool: &pool,
            },
        )
        .map_err(|e| fabric_error("rtrs_server_open", &e))
        .and_then(|r| r);
        let srv = match srv {
            Ok(s) => s,
            Err(e) => {
                pool.stop();
                return Err(e);
            }
        };
        let s = Box::new(rtrs_server {
            reg,
            srv: Some(srv),
            pool: Some(pool),
        });
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { *out = Box::into_raw(s) };
        Ok(0)
    })
}

/// Completes a request the callback answered with `RTRS_LATER`: `err` is 0
/// or a negative errno. May be called from any thread, concurrently. The
/// request's `data` must not be touched after this returns 0. Returns
/// -ENOENT for an id of no live connection (the teardown of a connection
/// waits for its deferred requests, so a deferred id stays live until
/// completed),
/// -EAGAIN when the connection's ring is full (try again), -EINVAL for a
/// positive `err`. An id that was not deferred, or is completed twice, is
/// ignored.
///
/// # Safety
/// `srv` is NULL or a server from `rtrs_server_open`, not yet closed.
#[no_mangle]
pub unsafe extern "C" fn rtrs_server_complete(
    srv: *const rtrs_server,
    id: u64,
    err: c_int,
) -> c_int {
    boundary(|| {
        if srv.is_null() {
            return Err(Error::fixed(
                -libc::EINVAL,
                c"rtrs_server_complete: srv is NULL",
            ));
        }
        if err > 0 {
            return Err(Error::fixed(
                -libc::EINVAL,
                c"rtrs_server_complete: err must be 0 or a negative errno",
            ));
        }
        // SAFETY: non-null; the caller promises an open server.
        let srv = unsafe { &*srv };
        srv.reg.complete(id, err)?;
        Ok(0)
    })
}

/// Closes a server: closes every path, stops the cores (they wait up to a
/// second for deferred requests) and frees it. Call it once no thread uses
/// `srv` any more. Returns 0, or -EINVAL for NULL.
///
/// # Safety
/// `srv` is NULL or a server from `rtrs_server_open`, not yet closed.
#[no_mangle]
pub unsafe extern "C" fn rtrs_server_close(srv: *mut rtrs_server) -> c_int {
    // SAFETY: the caller's promise: from rtrs_server_open, closed once.
    unsafe { crate::free(srv, c"rtrs_server_close: srv is NULL") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_reaches_only_its_connection() {
        let reg = Registry::new(2, 4);
        let (slot, gen, mut rx) = reg.claim().unwrap();
        let id = u64::from(gen) << 32 | u64::from(slot) << 16 | 3;
        reg.complete(id, -5).unwrap();
        let d = rx.pop().unwrap();
        assert_eq!((d.gen, d.chunk, d.errno), (gen, 3, -5));
        // Another connection takes the other slot; this one closes.
        let (slot2, gen2, rx2) = reg.claim().unwrap();
        assert_ne!(slot2, slot);
        reg.release(slot, rx);
        assert_eq!(reg.complete(id, 0).unwrap_err().errno, -libc::ENOENT);
        // A new owner of the first slot has a new generation.
        let (slot3, gen3, _rx3) = reg.claim().unwrap();
        assert_eq!(slot3, slot);
        assert_ne!(gen3, gen);
        assert!(reg.claim().is_none(), "two slots, two owners");
        reg.release(slot2, rx2);
        let _ = gen2;
        assert_eq!(
            reg.complete(u64::from(gen3) << 32 | 99 << 16, 0)
                .unwrap_err()
                .errno,
            -libc::ENOENT
        );
    }

    #[test]
    fn null_arguments_are_errors() {
        // SAFETY: NULLs are what is tested.
        unsafe {
            let mut out = std::ptr::null_mut();
            assert_eq!(
                rtrs_server_open(std::ptr::null(), None, std::ptr::null_mut(), &mut out),
                -libc::EINVAL
            );
            assert_eq!(rtrs_server_complete(std::ptr::null(), 0, 0), -libc::EINVAL);
            assert_eq!(rtrs_server_close(std::ptr::null_mut()), -libc::EINVAL);
            let cfg = rtrs_server_cfg {
                size: std::mem::size_of::<rtrs_server_cfg>() as u32,
                addr: c"bogus".as_ptr(),
                cpus: std::ptr::null(),
                ncpus: 0,
                queue_depth: 0,
                max_chunk_size: 0,
                max_connections: 0,
                allow: std::ptr::null(),
                auth_key_file: std::ptr::null(),
                insecure: 0,
            };
            unsafe extern "C" fn cb(_: *mut c_void, _: *const rtrs_srv_io) -> c_int {
                0
            }
            assert_eq!(
                rtrs_server_open(&cfg, Some(cb), std::ptr::null_mut(), &mut out),
                -libc::EINVAL
            );
            assert!(out.is_null());
        }
    }
}
