//! End-to-end harness: an RTRS server with a RAM-disk handler on its own
//! thread, and a client driven from the test thread.

#![allow(dead_code)]

use minstant::Instant;
use rtrs_fabric::{Address, Fabric};
use rtrs_poll::clt::{Client, CltConfig, CltCore, Completion};
use rtrs_poll::srv::{ClosedPath, Handler, IoDir, Server, SrvConfig, SrvEvent, SrvIo, Verdict};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The user header tests send: op byte, then the byte offset in the RAM disk.
pub const OP_IO: u8 = 1;
/// Ask the handler to fail with the errno in bytes 1..5.
pub const OP_FAIL: u8 = 2;
/// Ask the handler to defer the request and complete it on its next poll.
pub const OP_LATER: u8 = 3;

pub fn usr(op: u8, off: u64) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[0] = op;
    u[8..].copy_from_slice(&off.to_le_bytes());
    u
}

/// A RAM disk shared by every connection's handler.
pub struct Ram {
    disk: Arc<Mutex<Vec<u8>>>,
    later: Vec<rtrs_poll::Deferred>,
}

impl Ram {
    /// A handler over `disk`.
    pub fn new(disk: Arc<Mutex<Vec<u8>>>) -> Ram {
        Ram {
            disk,
            later: Vec::new(),
        }
    }
}

impl Handler for Ram {
    fn on_io(&mut self, mut io: SrvIo<'_>) -> Verdict {
        let dir = io.dir();
        let (usr, data) = io.parts();
        if usr.len() < 16 {
            return Verdict::Done(-libc::EINVAL);
        }
        let off = u64::from_le_bytes(usr[8..16].try_into().unwrap()) as usize;
        let op = usr[0];
        match op {
            OP_FAIL => {
                let e = i32::from_le_bytes(usr[1..5].try_into().unwrap());
                return Verdict::Done(e);
            }
            OP_IO | OP_LATER => {}
            _ => return Verdict::Done(-libc::EOPNOTSUPP),
        }
        let mut disk = self.disk.lock().unwrap();
        let end = off + data.len();
        if end > disk.len() {
            return Verdict::Done(-libc::ENOSPC);
        }
        match dir {
            IoDir::Write => disk[off..end].copy_from_slice(data),
            IoDir::Read => data.copy_from_slice(&disk[off..end]),
        }
        drop(disk);
        if op == OP_LATER {
            self.later.push(io.defer());
            return Verdict::Later;
        }
        Verdict::Done(0)
    }
    fn poll(&mut self) -> usize {
        let n = self.later.len();
        for d in self.later.drain(..) {
            d.complete(0);
        }
        n
    }
}

/// A server (its control on the library's thread) whose IO connections
/// are polled by a thread of the test's.
pub struct TestServer {
    stop: Arc<AtomicBool>,
    /// While set, the IO connections are not polled (a hung core).
    pub pause: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<ClosedPath>>>,
    closed: Arc<Mutex<Vec<ClosedPath>>>,
    counters: Arc<rtrs_poll::srv::SrvCounters>,
    pub disk: Arc<Mutex<Vec<u8>>>,
    /// Passes of the polling thread in which no connection had work, and
    /// the clock reads (pollers::clock) the connections made in them.
    pub idle_passes: Arc<std::sync::atomic::AtomicU64>,
    pub idle_pass_reads: Arc<std::sync::atomic::AtomicU64>,
}

impl TestServer {
    pub fn start<F: Fabric>(
        fabric: F,
        addrs: &[Address],
        cfg: SrvConfig,
        disk_len: usize,
    ) -> TestServer {
        let disk = Arc::new(Mutex::new(vec![0u8; disk_len]));
        let d = disk.clone();
        let mut s = Self::start_with(
            fabric,
            addrs,
            cfg,
            move |_: &rtrs_poll::srv::ConInfo| Ram {
                disk: d.clone(),
                later: Vec::new(),
            },
            |_| {},
        );
        s.disk = disk;
        s
    }

    /// A server with any handler; `on_closed` sees every closed path.
    pub fn start_with<F: Fabric, H: Handler>(
        fabric: F,
        addrs: &[Address],
        cfg: SrvConfig,
        make: impl FnMut(&rtrs_poll::srv::ConInfo) -> H + Send + 'static,
        mut on_closed: impl FnMut(&ClosedPath) + Send + 'static,
    ) -> TestServer {
        let disk = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, paused) = (stop.clone(), pause.clone());
        let addrs = addrs.to_vec();
        let closed = Arc::new(Mutex::new(Vec::new()));
        let cl = closed.clone();
        let idle_passes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let idle_pass_reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (ip, ipr) = (idle_passes.clone(), idle_pass_reads.clone());
        let thread = std::thread::spawn(move || {
            let cons: Arc<Mutex<Vec<Box<dyn pollers::Poller>>>> = Arc::default();
            let c2 = cons.clone();
            let mut offered = false;
            let srv = Server::listen(
                &fabric,
                &addrs[0],
                cfg,
                make,
                // Every connection is first refused, as by a core whose
                // inbox is full: the control thread must offer it again.
                Box::new(move |_cid, p| {
                    let mut cs = c2.lock().unwrap();
                    if offered {
                        offered = false;
                        cs.push(p);
                        Ok(())
                    } else {
                        offered = true;
                        Err(p)
                    }
                }),
            )
            .unwrap();
            for a in &addrs[1..] {
                srv.listen_also(a).unwrap();
            }
            let ev_cl = cl.clone();
            srv.on_event(move |ev| {
                if let SrvEvent::PathClosed(c) = ev {
                    on_closed(c);
                    ev_cl.lock().unwrap().push(c.clone());
                }
            })
            .unwrap();
            ready_tx.send(srv.counters()).unwrap();
            while !s.load(Ordering::Relaxed) {
                if paused.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let now = Instant::now();
                let mut cs = cons.lock().unwrap();
                let reads = pollers::clock::reads();
                let mut work = 0;
                for c in cs.iter_mut() {
                    work += c.poll(now);
                }
                if work == 0 && !cs.is_empty() {
                    ip.fetch_add(1, Ordering::Relaxed);
                    ipr.fetch_add(pollers::clock::reads() - reads, Ordering::Relaxed);
                }
                cs.retain(|c| !c.finished());
            }
            srv.stop();
            let closed = cl.lock().unwrap().clone();
            closed
        });
        let counters = ready_rx.recv().unwrap();
        TestServer {
            counters,
            stop,
            pause,
            thread: Some(thread),
            closed,
            disk,
            idle_passes,
            idle_pass_reads,
        }
    }

    /// The server's counters.
    pub fn counters(&self) -> &rtrs_poll::srv::SrvCounters {
        &self.counters
    }

    /// The server's refusals so far, by kind.
    pub fn refusals(&self) -> Vec<(rtrs_poll::srv::Refusal, u64)> {
        self.counters.refusals()
    }

    /// Sessions now, and their chunk memory.
    pub fn sessions(&self) -> (usize, u64) {
        self.counters.sessions()
    }

    /// The paths closed so far, with reasons.
    pub fn closed(&self) -> Vec<ClosedPath> {
        self.closed.lock().unwrap().clone()
    }

    /// An RNBD server of `exports` whose ended sessions close what they
    /// had open (as `rtrs serve` wires it).
    pub fn rnbd<F: Fabric>(
        fabric: F,
        addrs: &[Address],
        cfg: SrvConfig,
        exports: Vec<rtrs_poll::rnbd::Export>,
    ) -> (TestServer, Arc<rtrs_poll::rnbd::RnbdServer>) {
        let rnbd = rtrs_poll::rnbd::RnbdServer::new(exports, cfg.max_io_size()).unwrap();
        let (r2, r3) = (rnbd.clone(), rnbd.clone());
        let srv = Self::start_with(
            fabric,
            addrs,
            cfg,
            move |info: &rtrs_poll::srv::ConInfo| r2.handler(info),
            move |c| {
                if c.session_ended {
                    r3.session_ended(&c.paths_uuid);
                }
            },
        );
        (srv, rnbd)
    }

    /// Stops the server; returns the paths it closed, with reasons.
    pub fn stop(mut self) -> Vec<ClosedPath> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client driven from the calling thread.
pub struct TestClient<F: Fabric> {
    pub clt: Client<F>,
    pub core: CltCore<F>,
}

impl<F: Fabric> TestClient<F> {
    pub fn open(fabric: &F, addrs: Vec<Address>, name: &str) -> TestClient<F> {
        let mut cfg = CltConfig::new(name, addrs);
        cfg.connect_timeout = Duration::from_secs(10);
        Self::open_with(fabric, cfg)
    }

    pub fn open_with(fabric: &F, cfg: CltConfig) -> TestClient<F> {
        let (clt, mut cores) = Client::open(fabric, cfg).unwrap();
        TestClient {
            clt,
            core: cores.pop().unwrap(),
        }
    }

    /// Polls until `n` completions arrived (or 60 s passed: a loaded host is
    /// slow, and a lost completion stays lost).
    pub fn wait(&mut self, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        if n == 0 {
            return out;
        }
        while out.len() < n && Instant::now() < deadline {
            self.core.poll(Instant::now(), &mut |c| out.push(c));
        }
        assert!(
            out.len() >= n,
            "completions missing after 60 s: {} of {n}; {} in flight on this core; paths {:?}",
            out.len(),
            self.core.inflight(),
            self.clt
                .paths()
                .iter()
                .map(|p| (p.state(), p.stats()))
                .collect::<Vec<_>>()
        );
        out
    }

    /// Submits a 4 KiB write of `pattern(tag)` at `off` (tag `tag`) without
    /// waiting for it.
    pub fn submit_write(&mut self, tag: u64, off: u64) {
        let mut p = self.core.get_permit().expect("a permit");
        self.core.buf(&mut p)[..4096].copy_from_slice(&pattern(tag, 4096));
        self.core
            .write(p, &usr(OP_IO, off), 4096, tag, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
    }

    /// Writes `data` at `off` of the RAM disk; returns the errno.
    pub fn write(&mut self, off: u64, data: &[u8]) -> i32 {
        let mut p = self.core.get_permit().expect("a permit");
        self.core.buf(&mut p)[..data.len()].copy_from_slice(data);
        self.core
            .write(p, &usr(OP_IO, off), data.len() as u32, 7, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
        let c = self.wait(1).pop().unwrap();
        let e = c.errno;
        self.core.put_permit(c.permit);
        e
    }

    /// An RNBD IO on `dev`: `op` at byte `off` of `bi_size` bytes, with
    /// `data` in the chunk (ops that travel as RTRS writes) or reading
    /// `bi_size` bytes (the others); returns errno and the data read.
    pub fn rnbd_io(
        &mut self,
        dev: &rtrs_poll::rnbd::RnbdDev,
        op: rtrs_proto::rnbd::RnbdOp,
        off: u64,
        bi_size: u32,
        data: &[u8],
    ) -> (i32, Vec<u8>) {
        let h = rtrs_poll::rnbd::clt::io_hdr(dev, op, off, bi_size, 0);
        let mut p = self.core.get_permit().expect("a permit");
        let sent = if op.is_rtrs_write() {
            self.core.buf(&mut p)[..data.len()].copy_from_slice(data);
            self.core.write(p, &h, data.len() as u32, 9, Instant::now())
        } else {
            self.core.read(p, &h, bi_size, 9, Instant::now())
        };
        sent.map_err(|(_, e)| e).unwrap();
        let mut c = self.wait(1).pop().unwrap();
        let got = if op.is_rtrs_write() {
            Vec::new()
        } else {
            self.core.buf(&mut c.permit)[..bi_size as usize].to_vec()
        };
        let e = c.errno;
        self.core.put_permit(c.permit);
        (e, got)
    }

    /// Reads `len` bytes at `off`; returns errno and data.
    pub fn read(&mut self, off: u64, len: usize) -> (i32, Vec<u8>) {
        let p = self.core.get_permit().expect("a permit");
        self.core
            .read(p, &usr(OP_IO, off), len as u32, 8, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
        let mut c = self.wait(1).pop().unwrap();
        let data = self.core.buf(&mut c.permit)[..len].to_vec();
        let e = c.errno;
        self.core.put_permit(c.permit);
        (e, data)
    }
}

/// Bytes that differ for every (seed, index): the shared pattern, seed first.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    super::pattern(len, seed)
}
