//! The client half: a session whose queues (`CltCore`s) the application's
//! threads drive themselves, one thread per queue at a time.
//!
//! ```text
//!  rtrs_client_submit(clt, q, ..): permit -> copy a write's data into its registered
//!      buffer (a read: remember where its data goes) -> CltCore::write/read (posted now)
//!  rtrs_client_poll(clt, q, ..):   CltCore::poll -> copy a read's data out -> permit back
//!  a queue is guarded by a flag, not a lock: a second thread in it gets -EBUSY
//! ```

use crate::server::errno_of;
use crate::server::fabric_error;
use crate::{boundary, c_str, Error, RTRS_READ, RTRS_WRITE};
use minstant::Instant;
use rtrs_fabric::{with_backend, Address, Fabric, OnFabric};
use rtrs_poll::clt::{Client, CltConfig, CltCore, CltError, Completion, Dir};
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Client settings. Zero (or NULL) fields take the default shown.
#[repr(C)]
#[derive(Debug)]
pub struct rtrs_client_cfg {
    /// `sizeof(struct rtrs_client_cfg)` as the caller compiled it: fields
    /// added in later versions of the library take their defaults for an
    /// older caller. Required (0 is -EINVAL).
    pub size: u32,
    /// The session name: 1..=254 bytes without '/' or '.'.
    pub sessname: *const c_char,
    /// The server's addresses, one path each ("shm:NAME", "tcp:HOST:PORT"
    /// or, in a library built with the rdma feature, "rdma:HOST:PORT"; all
    /// of one kind): `naddrs` C strings.
    pub addrs: *const *const c_char,
    /// Entries of `addrs` (1..=128).
    pub naddrs: usize,
    /// IO queues (connections per path; one per application thread that
    /// submits); 0: 1.
    pub queues: u32,
    /// The largest data length of one IO; 0: 131072 (capped by the
    /// server's chunk size).
    pub max_io_size: u32,
    /// How long each path may take to connect, in milliseconds; 0: 30000.
    pub connect_timeout_ms: u32,
    /// tcp: prove the pre-shared key in this file to the server (and check
    /// that the server holds it); NULL: none.
    pub auth_key_file: *const c_char,
}

/// The first version's size: every field up to `connect_timeout_ms`.
const CLIENT_CFG_V1: usize = std::mem::offset_of!(rtrs_client_cfg, auth_key_file);

/// A finished IO.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct rtrs_completion {
    /// The `tag` given to `rtrs_client_submit`.
    pub tag: u64,
    /// 0 or a negative errno (the server handler's, or -ECONNABORTED when
    /// no path could carry it).
    pub err: i32,
    /// The data length submitted.
    pub len: u32,
}

/// One queue: its core, where each read's data goes, and completions
/// polled but not yet handed out. Sized at open: no allocation per IO.
struct Queue<F: Fabric> {
    core: CltCore<F>,
    /// By permit: the application's buffer for a read in flight (address).
    reads: Box<[usize]>,
    got: Vec<Completion>,
    ready: VecDeque<rtrs_completion>,
    /// The lazy clock (as a pollers core's, issue 12): the `now` polls are
    /// given, read after a poll with work and every IDLE_CLOCK_EVERY polls,
    /// so an idle poll reads no clock.
    now: Instant,
    polls: u64,
}

/// What a queue does, whatever its fabric.
trait Ops: Send {
    fn submit(
        &mut self,
        dir: Dir,
        usr: &[u8],
        data: *mut u8,
        len: usize,
        tag: u64,
    ) -> Result<(), Error>;
    fn poll(&mut self, out: &mut [rtrs_completion]) -> usize;
}

impl<F: Fabric> Ops for Queue<F>
where
    CltCore<F>: Send,
{
    fn submit(
        &mut self,
        dir: Dir,
        usr: &[u8],
        data: *mut u8,
        len: usize,
        tag: u64,
    ) -> Result<(), Error> {
        if len > self.core.max_io_size() as usize {
            return Err(Error::fixed(
                -libc::EMSGSIZE,
                c"rtrs_client_submit: len exceeds rtrs_client_max_io_size",
            ));
        }
        let Some(mut p) = self.core.get_permit() else {
            return Err(Error::fixed(
                -libc::EAGAIN,
                c"rtrs_client_submit: no permit free (all IO in flight): poll, then try again",
            ));
        };
        // The IO's latency starts here: a fresh read.
        let now = pollers::clock::now();
        let r = match dir {
            Dir::Write => {
                if len > 0 {
                    // SAFETY: the caller checked data is non-null for len > 0
                    // and promises `len` readable bytes.
                    let src = unsafe { std::slice::from_raw_parts(data, len) };
                    self.core.buf(&mut p)[..len].copy_from_slice(src);
                }
                self.core.write(p, usr, len as u32, tag, now)
            }
            Dir::Read => {
                if let Some(r) = self.reads.get_mut(p.id() as usize) {
                    *r = data as usize;
                }
                self.core.read(p, usr, len as u32, tag, now)
            }
        };
        r.map_err(|(p, e)| {
            self.core.put_permit(p);
            clt_error("rtrs_client_submit", &e)
        })
    }

    fn poll(&mut self, out: &mut [rtrs_completion]) -> usize {
        if self.ready.len() < out.len() {
            let got = &mut self.got;
            self.polls += 1;
            let work = self.core.poll(self.now, &mut |c| got.push(c));
            if work > 0 || self.polls % pollers::core::IDLE_CLOCK_EVERY == 0 {
                self.now = pollers::clock::now();
            }
            for mut c in self.got.drain(..) {
                if c.dir == Dir::Read && c.errno == 0 && c.len > 0 {
                    let dst = self.reads.get(c.permit.id() as usize).copied().unwrap_or(0);
                    let src = self.core.buf(&mut c.permit);
                    let n = (c.len as usize).min(src.len());
                    if dst != 0 {
                        // SAFETY: `dst` is the buffer the application gave
                        // this read, promised writable for `len` bytes until
                        // its completion is polled (now).
                        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, n) };
                    }
                }
                self.ready.push_back(rtrs_completion {
                    tag: c.tag,
                    err: c.errno,
                    len: c.len,
                });
                self.core.put_permit(c.permit);
            }
        }
        let n = out.len().min(self.ready.len());
        for (o, c) in out.iter_mut().zip(self.ready.drain(..n)) {
            *o = c;
        }
        n
    }
}

fn clt_error(what: &str, e: &CltError) -> Error {
    let errno = match e {
        CltError::Fabric(f) => errno_of(f),
        e => e.errno(),
    };
    Error::new(errno, format!("{what}: {e}"))
}

/// A queue behind its guard: one thread in it at a time.
struct Cell {
    busy: AtomicBool,
    q: UnsafeCell<Box<dyn Ops>>,
}

// SAFETY: the queue inside is reached only by the thread that set `busy`
// (Acquire) and until it clears it (Release), so it is never shared; the
// queue itself is Send.
unsafe impl Sync for Cell {}

impl Cell {
    fn with<T>(&self, f: impl FnOnce(&mut dyn Ops) -> Result<T, Error>) -> Result<T, Error> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(Error::fixed(
                -libc::EBUSY,
                c"the queue is in use by another thread: one thread per queue at a time",
            ));
        }
        // SAFETY: `busy` is ours (see `unsafe impl Sync`).
        let r = f(unsafe { &mut **self.q.get() });
        self.busy.store(false, Ordering::Release);
        r
    }
}

/// A client session (opaque).
pub struct rtrs_client {
    queues: Box<[Cell]>,
    queue_depth: u32,
    max_io_size: u32,
    /// The `Client<F>` and its fabric: dropping it closes the session.
    sess: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for rtrs_client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rtrs_client({} queues, depth {})",
            self.queues.len(),
            self.queue_depth
        )
    }
}

impl Drop for rtrs_client {
    fn drop(&mut self) {
        // As the Rust API does: the session first (IO in flight fails),
        // then its cores.
        drop(self.sess.take());
    }
}

/// `open` on whichever fabric the first address names.
struct Open(CltConfig);

impl OnFabric for Open {
    type Output = Result<rtrs_client, Error>;
    fn run<F: Fabric>(self, fabric: F) -> Self::Output {
        open(fabric, self.0)
    }
}

fn open<F: Fabric>(fabric: F, cfg: CltConfig) -> Result<rtrs_client, Error>
where
    CltCore<F>: Send,
{
    let (clt, cores) = Client::open(&fabric, cfg).map_err(|e| clt_error("rtrs_client_open", &e))?;
    let (qd, max_io) = (
        clt.queue_depth(),
        cores.first().map_or(0, |c| c.max_io_size()),
    );
    let queues = cores
        .into_iter()
        .map(|core| Cell {
            busy: AtomicBool::new(false),
            q: UnsafeCell::new(Box::new(Queue {
                core,
                reads: vec![0; qd as usize].into_boxed_slice(),
                got: Vec::with_capacity(qd as usize),
                ready: VecDeque::with_capacity(qd as usize),
                now: pollers::clock::now(),
                polls: 0,
            }) as Box<dyn Ops>),
        })
        .collect();
    Ok(rtrs_client {
        queues,
        queue_depth: qd,
        max_io_size: max_io,
        sess: Some(Box::new((clt, fabric))),
    })
}

/// Opens a client session: connects every path (all must come up) and
/// returns it in `*out`. Returns 0 or a negative errno (then see
/// `rtrs_last_error`).
///
/// # Safety
/// `cfg` points to a valid `rtrs_client_cfg` (`sessname` a C string,
/// `addrs` `naddrs` C strings); `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn rtrs_client_open(
    cfg: *const rtrs_client_cfg,
    out: *mut *mut rtrs_client,
) -> c_int {
    boundary(|| {
        if cfg.is_null() || out.is_null() {
            return Err(Error::fixed(
                -libc::EINVAL,
                c"rtrs_client_open: cfg or out is NULL",
            ));
        }
        // SAFETY: non-null; the caller promises a valid cfg of its size.
        let cfg = unsafe {
            crate::read_cfg(
                cfg,
                CLIENT_CFG_V1,
                c"rtrs_client_open: cfg->size must be sizeof(struct rtrs_client_cfg)",
            )
        }?;
        // SAFETY: the caller promises a C string (NULL is checked).
        let name = unsafe {
            c_str(
                cfg.sessname,
                c"rtrs_client_open: sessname is NULL or not UTF-8",
            )
        }?;
        if cfg.addrs.is_null() || cfg.naddrs == 0 {
            return Err(Error::fixed(-libc::EINVAL, c"rtrs_client_open: no addrs"));
        }
        // SAFETY: non-null; the caller promises `naddrs` entries.
        let addrs = unsafe { std::slice::from_raw_parts(cfg.addrs, cfg.naddrs) };
        let mut paths = Vec::with_capacity(addrs.len());
        for &a in addrs {
            // SAFETY: the caller promises C strings (NULL is checked).
            let a = unsafe { c_str(a, c"rtrs_client_open: an address is NULL or not UTF-8") }?;
            let a: Address = a
                .parse()
                .map_err(|e| Error::new(-libc::EINVAL, format!("rtrs_client_open: {e}")))?;
            paths.push(a);
        }
        let scheme = paths[0].scheme();
        if paths.iter().any(|p| p.scheme() != scheme) {
            return Err(Error::fixed(
                -libc::EINVAL,
                c"rtrs_client_open: the addresses are of different kinds",
            ));
        }
        let mut c = CltConfig::new(name, paths);
        if cfg.queues != 0 {
            c.cores = cfg.queues as usize;
        }
        if cfg.max_io_size != 0 {
            c.max_io_size = cfg.max_io_size;
        }
        if cfg.connect_timeout_ms != 0 {
            c.connect_timeout = Duration::from_millis(u64::from(cfg.connect_timeout_ms));
        }
        let first = c.paths[0].clone();
        // SAFETY: NULL or the caller's C string.
        let backends = unsafe { crate::c_backends(cfg.auth_key_file, "rtrs_client_open") }?;
        let clt = with_backend(&first, &backends, Open(c))
            .map_err(|e| fabric_error("rtrs_client_open", &e))??;
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { *out = Box::into_raw(Box::new(clt)) };
        Ok(0)
    })
}

/// The session's queue depth: how many IOs may be in flight, over all its
/// queues. -EINVAL for NULL.
///
/// # Safety
/// `clt` is NULL or an open client.
#[no_mangle]
pub unsafe extern "C" fn rtrs_client_queue_depth(clt: *const rtrs_client) -> c_int {
    // SAFETY: the caller promises NULL or an open client.
    match unsafe { clt.as_ref() } {
        Some(c) => c.queue_depth.min(c_int::MAX as u32) as c_int,
        None => -libc::EINVAL,
    }
}

/// The largest data length of one IO. -EINVAL for NULL.
///
/// # Safety
/// `clt` is NULL or an open client.
#[no_mangle]
pub unsafe extern "C" fn rtrs_client_max_io_size(clt: *const rtrs_client) -> c_int {
    // SAFETY: the caller promises NULL or an open client.
    match unsafe { clt.as_ref() } {
        Some(c) => c.max_io_size.min(c_int::MAX as u32) as c_int,
        None => -libc::EINVAL,
    }
}

/// The session's queues (`cfg->queues`). -EINVAL for NULL.
///
/// # Safety
/// `clt` is NULL or an open client.
#[no_mangle]
pub unsafe extern "C" fn rtrs_client_queues(clt: *const rtrs_client) -> c_int {
    // SAFETY: the caller promises NULL or an open client.
    match unsafe { clt.as_ref() } {
        Some(c) => c.queues.len() as c_int,
        None => -libc::EINVAL,
    }
}

fn queue(
    clt: *const rtrs_client,
    q: u32,
    what: &'static std::ffi::CStr,
) -> Result<&'static Cell, Error> {
    // SAFETY: the callers' contract: NULL or an open client, not closed
    // while the call runs (the 'static does not leave the call).
    let clt = unsafe { clt.as_ref() }.ok_or(Error::fixed(-libc::EINVAL, what))?;
    clt.queues.get(q as usize).ok_or(Error::fixed(
        -libc::EINVAL,
        c"no such queue: queue must be below rtrs_client_queues",
    ))
}

/// Submits an IO on queue `queue`: `dir` `RTRS_WRITE` sends `len` bytes of
/// `data` (copied into the session's registered memory before this
/// returns), `RTRS_READ` asks for `len` bytes into `data` (written when the
/// completion is polled: keep `data` valid until then). `usr` (`usr_len`
/// bytes, at most 4096 less 12) goes to the server's handler as is. `tag`
/// comes back in the completion. Returns 0, or -EAGAIN when every permit is
/// in flight (poll, then submit again), -EMSGSIZE, -EBUSY (another thread
/// is in this queue), -ECONNABORTED (no path), -EINVAL.
///
/// # Safety
/// `clt` is NULL or an open client; `usr` and `data` are NULL or valid for
/// their lengths (a read's `data` until its completion is polled).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rtrs_client_submit(
    clt: *const rtrs_client,
    queue: u32,
    dir: c_int,
    usr: *const c_void,
    usr_len: usize,
    data: *mut c_void,
    len: usize,
    tag: u64,
) -> c_int {
    boundary(|| {
        let cell = self::queue(clt, queue, c"rtrs_client_submit: clt is NULL")?;
        let dir = match dir {
            RTRS_WRITE => Dir::Write,
            RTRS_READ => Dir::Read,
            _ => {
                return Err(Error::fixed(
                    -libc::EINVAL,
                    c"rtrs_client_submit: dir is not RTRS_WRITE or RTRS_READ",
                ))
            }
        };
        if (usr.is_null() && usr_len > 0) || (data.is_null() && len > 0) {
            return Err(Error::fixed(
                -libc::EINVAL,
                c"rtrs_client_submit: usr or data is NULL",
            ));
        }
        let usr: &[u8] = if usr_len == 0 {
            &[]
        } else {
            // SAFETY: non-null; the caller promises `usr_len` bytes.
            unsafe { std::slice::from_raw_parts(usr.cast(), usr_len) }
        };
        cell.with(|q| q.submit(dir, usr, data.cast(), len, tag))?;
        Ok(0)
    })
}

/// Drives queue `queue` (its connections, heartbeats' answers, failover)
/// and hands out up to `max` finished IOs into `out`. Returns how many, or
/// a negative errno. Call it often on every queue, also when nothing is
/// in flight: the queue makes progress only here.
///
/// # Safety
/// `clt` is NULL or an open client; `out` is NULL or has room for `max`.
#[no_mangle]
pub unsafe extern "C" fn rtrs_client_poll(
    clt: *const rtrs_client,
    queue: u32,
    out: *mut rtrs_completion,
    max: c_int,
) -> c_int {
    boundary(|| {
        let cell = self::queue(clt, queue, c"rtrs_client_poll: clt is NULL")?;
        if out.is_null() || max < 0 {
            return Err(Error::fixed(
                -libc::EINVAL,
                c"rtrs_client_poll: out is NULL or max < 0",
            ));
        }
        // SAFETY: non-null; the caller promises room for `max` entries.
        let out = unsafe { std::slice::from_raw_parts_mut(out, max as usize) };
        cell.with(|q| Ok(q.poll(out) as c_int))
    })
}

/// Closes the session: IO still in flight fails, every path is torn down,
/// and the client is freed. Call it once no thread uses `clt` any more.
/// Returns 0, or -EINVAL for NULL.
///
/// # Safety
/// `clt` is NULL or a client from `rtrs_client_open`, not yet closed.
#[no_mangle]
pub unsafe extern "C" fn rtrs_client_close(clt: *mut rtrs_client) -> c_int {
    // SAFETY: the caller's promise: from rtrs_client_open, closed once.
    unsafe { crate::free(clt, c"rtrs_client_close: clt is NULL") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue that only counts its polls.
    struct Count(usize);
    impl Ops for Count {
        fn submit(&mut self, _: Dir, _: &[u8], _: *mut u8, _: usize, _: u64) -> Result<(), Error> {
            Ok(())
        }
        fn poll(&mut self, _: &mut [rtrs_completion]) -> usize {
            self.0 += 1;
            self.0
        }
    }

    #[test]
    fn a_second_thread_in_a_queue_is_refused_not_waited_for() {
        let cell = Cell {
            busy: AtomicBool::new(false),
            q: UnsafeCell::new(Box::new(Count(0))),
        };
        let first = cell.with(|q| {
            // Another thread arrives while this one is inside.
            let second = std::thread::scope(|s| {
                s.spawn(|| cell.with(|q| Ok(q.poll(&mut []))).map_err(|e| e.errno))
                    .join()
            });
            Ok((q.poll(&mut []), second.expect("no panic")))
        });
        let (n, second) = first
            .map_err(|e| e.errno)
            .expect("the first thread gets in");
        assert_eq!((n, second), (1, Err(-libc::EBUSY)));
        // Free again once the first has left.
        assert_eq!(
            cell.with(|q| Ok(q.poll(&mut []))).map_err(|e| e.errno),
            Ok(2)
        );
    }
}
