//! The C ABI driven from Rust over shm: back-pressure and argument errors,
//! deferred completions from another thread (an error passed through, a
//! double completion ignored, a gone connection refused), and requests
//! past `max_connections` refused without reaching the callback.

use rtrs::*;
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the callback saw, and the deferred requests it left (id, data, len).
#[derive(Default)]
struct Ctx {
    calls: AtomicUsize,
    defer: bool,
    later: Mutex<Vec<(u64, usize, usize)>>,
}

/// Writes: done. Reads: data filled with the first user byte; deferred
/// (`RTRS_LATER`) when the context says so.
unsafe extern "C" fn handler(ctx: *mut c_void, io: *const rtrs_srv_io) -> c_int {
    // SAFETY: ctx is the test's `Ctx`, alive until the server closes; io is
    // valid for the call, its buffers for their lengths.
    let (ctx, io) = unsafe { (&*(ctx as *const Ctx), &*io) };
    ctx.calls.fetch_add(1, Ordering::Relaxed);
    if io.dir == RTRS_WRITE {
        return 0;
    }
    // SAFETY: as above.
    let fill = unsafe { *io.usr };
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(io.data, fill, io.data_len) };
    if ctx.defer {
        ctx.later
            .lock()
            .unwrap()
            .push((io.id, io.data as usize, io.data_len));
        return RTRS_LATER;
    }
    0
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn addr() -> CString {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    CString::new(format!("shm:capi-abi-{}-{n}", std::process::id())).unwrap()
}

fn last() -> String {
    // SAFETY: a static or thread-local NUL-terminated string.
    unsafe { CStr::from_ptr(rtrs_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Submits a read of `buf.len()` bytes on queue 0 with user byte `usr`.
///
/// # Safety
/// `clt` is open; `buf` lives until the read's completion is polled.
unsafe fn read(clt: *const rtrs_client, usr: u8, buf: &mut [u8], tag: u64) -> c_int {
    let usr = [usr];
    // SAFETY: the caller's promises; `usr` is copied during the call.
    unsafe {
        rtrs_client_submit(
            clt,
            0,
            RTRS_READ,
            usr.as_ptr().cast(),
            1,
            buf.as_mut_ptr().cast(),
            buf.len(),
            tag,
        )
    }
}

/// A server on `a` with queue depth 4 and 8 KiB chunks, on CPU 0.
fn server_cfg(a: &CStr, max_connections: u32) -> rtrs_server_cfg {
    rtrs_server_cfg {
        size: std::mem::size_of::<rtrs_server_cfg>() as u32,
        addr: a.as_ptr(),
        cpus: std::ptr::null(),
        ncpus: 0,
        queue_depth: 4,
        max_chunk_size: 8192,
        max_connections,
        allow: std::ptr::null(),
        auth_key_file: std::ptr::null(),
        insecure: 0,
    }
}

struct Pair {
    srv: *mut rtrs_server,
    clt: *mut rtrs_client,
}

impl Pair {
    fn open(ctx: &Ctx, max_connections: u32) -> Pair {
        Pair::open_at(ctx, max_connections, &addr())
    }

    fn open_at(ctx: &Ctx, max_connections: u32, a: &CStr) -> Pair {
        // cpus NULL: one core on CPU 0 (kv.c names its CPUs).
        let scfg = server_cfg(a, max_connections);
        let mut srv = std::ptr::null_mut();
        let name = c"abi";
        let addrs = [a.as_ptr()];
        let ccfg = rtrs_client_cfg {
            size: std::mem::size_of::<rtrs_client_cfg>() as u32,
            sessname: name.as_ptr(),
            addrs: addrs.as_ptr(),
            naddrs: 1,
            queues: 1,
            max_io_size: 0,
            connect_timeout_ms: 5000,
            auth_key_file: std::ptr::null(),
        };
        let mut clt = std::ptr::null_mut();
        // SAFETY: valid configurations; ctx outlives the server (closed in
        // Drop before the test's ctx goes).
        unsafe {
            let r = rtrs_server_open(
                &scfg,
                Some(handler),
                ctx as *const Ctx as *mut c_void,
                &mut srv,
            );
            assert_eq!(r, 0, "{}", last());
            let r = rtrs_client_open(&ccfg, &mut clt);
            assert_eq!(r, 0, "{}", last());
        }
        Pair { srv, clt }
    }

    /// Polls queue 0 until `n` completions came (5 s at most).
    fn wait(&self, n: usize) -> Vec<rtrs_completion> {
        let mut got = Vec::new();
        let t0 = Instant::now();
        while got.len() < n {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "only {} of {n} completions",
                got.len()
            );
            let mut c = [rtrs_completion::default(); 8];
            // SAFETY: an open client; room for 8.
            let k = unsafe { rtrs_client_poll(self.clt, 0, c.as_mut_ptr(), 8) };
            assert!(k >= 0, "{}", last());
            got.extend_from_slice(&c[..k as usize]);
            std::thread::yield_now();
        }
        got
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once here.
        unsafe {
            if !self.clt.is_null() {
                rtrs_client_close(self.clt);
            }
            rtrs_server_close(self.srv);
        }
    }
}

#[test]
fn back_pressure_and_bad_arguments_are_error_codes() {
    let ctx = Ctx::default();
    let p = Pair::open(&ctx, 0);
    // SAFETY: an open client; buffers valid until their completions are
    // polled (they live to the end of the test).
    unsafe {
        assert_eq!(rtrs_client_queue_depth(p.clt), 4);
        assert_eq!(rtrs_client_max_io_size(p.clt), 8192 - 4096);
        assert_eq!(rtrs_client_queues(p.clt), 1);
        let mut bufs = [[0u8; 100]; 5];
        for (i, b) in bufs.iter_mut().enumerate().take(4) {
            let r = read(p.clt, i as u8 + 1, b, i as u64);
            assert_eq!(r, 0, "{}", last());
        }
        // Four permits, four in flight: the fifth waits for a poll.
        let r = read(p.clt, 9, &mut bufs[4], 4);
        assert_eq!(r, -libc::EAGAIN);
        assert!(last().contains("no permit"), "{}", last());
        let mut got = p.wait(4);
        got.sort_by_key(|c| c.tag);
        for (i, c) in got.iter().enumerate() {
            assert_eq!((c.tag, c.err, c.len), (i as u64, 0, 100));
            assert!(bufs[i].iter().all(|&b| b == i as u8 + 1), "read {i}'s data");
        }
        let big = vec![0u8; 4097];
        let r = rtrs_client_submit(
            p.clt,
            0,
            RTRS_WRITE,
            std::ptr::null(),
            0,
            big.as_ptr() as *mut c_void,
            big.len(),
            0,
        );
        assert_eq!(r, -libc::EMSGSIZE);
        // (queue, dir, len) with no buffers: a bad direction, a queue
        // past the last, data NULL for 10 bytes.
        for (q, dir, len) in [(0, 7, 0), (1, RTRS_WRITE, 0), (0, RTRS_WRITE, 10)] {
            let null = std::ptr::null_mut();
            let r = rtrs_client_submit(p.clt, q, dir, null, 0, null, len, 0);
            assert_eq!(r, -libc::EINVAL, "queue {q} dir {dir} len {len}");
        }
        assert_eq!(
            rtrs_client_poll(p.clt, 0, std::ptr::null_mut(), 1),
            -libc::EINVAL
        );
        assert_eq!(rtrs_client_queue_depth(std::ptr::null()), -libc::EINVAL);
        // Nothing failed above reached the server: 4 reads.
        assert_eq!(ctx.calls.load(Ordering::Relaxed), 4);
        // A write of nothing is fine.
        let r = rtrs_client_submit(
            p.clt,
            0,
            RTRS_WRITE,
            std::ptr::null(),
            0,
            std::ptr::null_mut(),
            0,
            9,
        );
        assert_eq!(r, 0, "{}", last());
        assert_eq!(p.wait(1)[0].tag, 9);
    }
}

#[test]
fn deferred_completions_come_from_another_thread() {
    let ctx = Ctx {
        defer: true,
        ..Ctx::default()
    };
    let mut p = Pair::open(&ctx, 0);
    let mut bufs = [[0u8; 64]; 2];
    // SAFETY: an open client and server; buffers live to the end.
    unsafe {
        for (i, b) in bufs.iter_mut().enumerate() {
            let r = read(p.clt, 0x40 + i as u8, b, i as u64);
            assert_eq!(r, 0, "{}", last());
        }
        // Deferred: nothing completes until the application says so.
        let t0 = Instant::now();
        while ctx.later.lock().unwrap().len() < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the callback was not called"
            );
            let mut c = [rtrs_completion::default(); 2];
            assert_eq!(rtrs_client_poll(p.clt, 0, c.as_mut_ptr(), 2), 0);
        }
        let later = ctx.later.lock().unwrap().clone();
        let srv = p.srv as usize;
        std::thread::spawn(move || {
            let srv = srv as *const rtrs_server;
            for (k, &(id, _, _)) in later.iter().enumerate() {
                let err = if k == 0 { 0 } else { -libc::ENOSPC };
                assert_eq!(rtrs_server_complete(srv, id, err), 0);
                // Twice: ignored.
                assert_eq!(rtrs_server_complete(srv, id, -libc::EIO), 0);
            }
            assert_eq!(rtrs_server_complete(srv, later[0].0, 5), -libc::EINVAL);
        })
        .join()
        .unwrap();
        let mut got = p.wait(2);
        got.sort_by_key(|c| c.tag);
        // The order the callback saw them in decided which got -ENOSPC.
        let errs: Vec<_> = got.iter().map(|c| c.err).collect();
        assert!(
            errs.contains(&0) && errs.contains(&-libc::ENOSPC),
            "{errs:?}"
        );
        let ok = got.iter().find(|c| c.err == 0).unwrap();
        assert!(bufs[ok.tag as usize]
            .iter()
            .all(|&b| b == 0x40 + ok.tag as u8));
        // No third completion from the double completes.
        std::thread::sleep(Duration::from_millis(50));
        let mut c = [rtrs_completion::default(); 2];
        assert_eq!(rtrs_client_poll(p.clt, 0, c.as_mut_ptr(), 2), 0);

        // The connection goes once its deferred request is completed: its
        // ids are refused from then on.
        ctx.later.lock().unwrap().clear();
        let r = read(p.clt, 1, &mut bufs[0], 5);
        assert_eq!(r, 0, "{}", last());
        let t0 = Instant::now();
        while ctx.later.lock().unwrap().is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the callback was not called"
            );
            let mut c = [rtrs_completion::default(); 2];
            rtrs_client_poll(p.clt, 0, c.as_mut_ptr(), 2);
        }
        let id = ctx.later.lock().unwrap()[0].0;
        assert_eq!(rtrs_client_close(p.clt), 0);
        p.clt = std::ptr::null_mut();
        // The closing connection waits for its deferred request (its data
        // stays valid): completing it later still reaches it.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            rtrs_server_complete(p.srv, id, 0),
            0,
            "the closing connection waited for its deferred request"
        );
        let t0 = Instant::now();
        loop {
            match rtrs_server_complete(p.srv, id, 0) {
                r if r == -libc::ENOENT => break,
                // The ring (twice the queue depth) still holds this loop's
                // earlier duplicates: the closing connection drains them as
                // it goes (on a loaded host, slower than 8 x 20 ms).
                0 => {}
                r if r == -libc::EAGAIN => {}
                r => panic!("rtrs_server_complete: {r}"),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the connection's slot was never released"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn connections_past_max_connections_are_refused() {
    let ctx = Ctx::default();
    // One slot: the path's service connection (cid 0) takes it, the IO
    // connection gets none.
    let p = Pair::open(&ctx, 1);
    let mut b = [0u8; 8];
    // SAFETY: an open client; `b` lives to the end.
    unsafe {
        let r = read(p.clt, 1, &mut b, 3);
        assert_eq!(r, 0, "{}", last());
    }
    let c = p.wait(1);
    assert_eq!((c[0].tag, c[0].err), (3, -libc::EBUSY));
    assert_eq!(ctx.calls.load(Ordering::Relaxed), 0);
}

#[test]
fn tcp_works_and_a_taken_address_is_an_error() {
    // A free port (taken back at once: a race with other processes is
    // possible, and would fail the open below loudly).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let a = CString::new(format!("tcp:127.0.0.1:{port}")).unwrap();
    let ctx = Ctx::default();
    let p = Pair::open_at(&ctx, 0, &a);
    let mut b = [0u8; 16];
    // SAFETY: an open client; `b` lives to the end.
    unsafe {
        assert_eq!(read(p.clt, 0x5a, &mut b, 1), 0, "{}", last());
    }
    let c = p.wait(1);
    assert_eq!((c[0].tag, c[0].err), (1, 0));
    assert_eq!(b, [0x5a; 16]);

    // The same address again: refused with an errno and a reason.
    let mut srv = std::ptr::null_mut();
    let cfg = server_cfg(&a, 0);
    // SAFETY: a valid configuration and context.
    let r = unsafe {
        rtrs_server_open(
            &cfg,
            Some(handler),
            &ctx as *const Ctx as *mut c_void,
            &mut srv,
        )
    };
    assert!(r < 0, "a second server on {a:?} opened");
    assert!(srv.is_null());
    assert!(last().contains("rtrs_server_open"), "{}", last());
    // An address of no known fabric.
    let bad = c"udp:127.0.0.1:1";
    let cfg = server_cfg(bad, 0);
    // SAFETY: as above.
    let r = unsafe { rtrs_server_open(&cfg, Some(handler), std::ptr::null_mut(), &mut srv) };
    assert_eq!(r, -libc::EINVAL, "{}", last());
}

/// Opens a server on `cfg`: its errno (0: opened, and closed again).
fn try_open(cfg: &rtrs_server_cfg) -> c_int {
    unsafe extern "C" fn cb(_: *mut c_void, _: *const rtrs_srv_io) -> c_int {
        0
    }
    let mut srv = std::ptr::null_mut();
    // SAFETY: a valid configuration; the callback needs no context.
    unsafe {
        let r = rtrs_server_open(cfg, Some(cb), std::ptr::null_mut(), &mut srv);
        if r == 0 {
            assert_eq!(rtrs_server_close(srv), 0);
        }
        r
    }
}

#[test]
fn an_open_tcp_server_needs_an_access_rule_and_the_cfg_its_size() {
    let a = c"tcp:0.0.0.0:0";
    let mut cfg = server_cfg(a, 0);
    assert_eq!(try_open(&cfg), -libc::EACCES);
    assert!(last().contains("no access rule"), "{}", last());
    cfg.allow = c"10.0.0.0/8, 192.168.0.0/16".as_ptr();
    assert_eq!(try_open(&cfg), 0, "{}", last());
    cfg.allow = c"10.0.0.0/33".as_ptr();
    assert_eq!(try_open(&cfg), -libc::EINVAL);
    assert!(last().contains("10.0.0.0/33"), "{}", last());
    cfg.allow = std::ptr::null();
    cfg.insecure = 1;
    assert_eq!(try_open(&cfg), 0, "{}", last());
    // A key file that is not there: an error naming it.
    cfg.insecure = 0;
    cfg.auth_key_file = c"/nonexistent/rtrs.key".as_ptr();
    assert_eq!(try_open(&cfg), -libc::EACCES);
    assert!(last().contains("/nonexistent/rtrs.key"), "{}", last());
    // No size, or one smaller than the first version's: refused.
    let mut cfg = server_cfg(c"shm:abi-size", 0);
    cfg.size = 0;
    assert_eq!(try_open(&cfg), -libc::EINVAL);
    assert!(last().contains("sizeof"), "{}", last());
    // A caller of the first version (no allow, key or insecure fields):
    // its open tcp listener is refused, its shm one opens.
    cfg.size = std::mem::offset_of!(rtrs_server_cfg, allow) as u32;
    cfg.insecure = 1; // past its size: not read
    assert_eq!(try_open(&cfg), 0, "{}", last());
    let mut old = server_cfg(a, 0);
    old.size = cfg.size;
    old.insecure = 1;
    assert_eq!(try_open(&old), -libc::EACCES);
}
