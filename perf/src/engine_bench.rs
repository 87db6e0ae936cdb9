//! End-to-end RTRS benchmarks: `rtrs-perf server`, `rtrs-perf client`, and the
//! embedded default (both over shm on two cores).
//!
//! ```text
//!  client cores: pinned threads, each keeps `iodepth` IOs in flight on its
//!                CltCore, records every latency in its own histogram
//!  client control: the library's own thread (heartbeats, reconnects); the
//!                main thread prints the session's events as they come and a
//!                progress line per second with each path's state
//!  server: IO connections on pinned cores (pollers::Cores), control on the
//!                library's thread; handler null (answers at once) or ram:SIZE
//! ```

use crate::report::{histogram, LatNs};
use hdrhistogram::Histogram;
use minstant::Instant;
use rtrs_poll::clt::{
    Client, CltConfig, CltCore, CltError, CltEvent, Dir, PathState, ReadKeys, ReconnectPolicy,
};
use rtrs_poll::fabric::{Address, Fabric};
use rtrs_poll::rnbd::{RnbdClient, RnbdDev};
use rtrs_poll::sess::mp_policy::MpPolicy;
use rtrs_poll::srv::{Handler, IoDir, Server, SrvConfig, SrvEvent, SrvIo, Verdict};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Seconds since the Unix epoch, to the millisecond: event lines carry it
/// so scripts can line them up with what they did (a link cut, say).
pub fn wall() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

/// The IO pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, half each.
    Randrw,
}

/// The server's storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Backend {
    /// Answers at once, touches no data.
    Null,
    /// A RAM disk of this many bytes.
    Ram(u64),
    /// A fault injector: every Nth IO (per connection) fails with EIO,
    /// the others answer at once as `null` does.
    Fail(u64),
}

/// Parses `null` or `ram:SIZE` (SIZE with an optional K, M or G).
pub fn parse_backend(s: &str) -> Result<Backend, String> {
    if s == "null" {
        return Ok(Backend::Null);
    }
    if let Some(n) = s.strip_prefix("fail:") {
        return match n.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Backend::Fail(n)),
            _ => Err(format!("bad backend {s:?}: fail:N takes N >= 1")),
        };
    }
    match s.strip_prefix("ram:") {
        Some(sz) => parse_size(sz).map(Backend::Ram),
        None => Err(format!(
            "bad backend {s:?}: expected null, ram:SIZE or fail:N"
        )),
    }
}

/// Parses a byte count with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected e.g. 4096, 4k, 1M"))?;
    n.checked_mul(mul)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("bad size {s:?}: must be 1 .. 2^64"))
}

/// Parses `on` / `off`.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "1" | "true" | "yes" => Ok(true),
        "off" | "0" | "false" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// The handler rtrs-perf's server runs: the user header is
/// `[op u8][pad 7][offset u64 LE]`.
pub struct PerfHandler {
    ram: Option<Arc<mempool::Region>>,
    /// `fail:N`: every Nth IO fails; the count so far.
    fail: Option<(u64, u64)>,
}

impl Handler for PerfHandler {
    fn on_io(&mut self, io: SrvIo<'_>) -> Verdict {
        if let Some((every, n)) = self.fail.as_mut() {
            *n += 1;
            return Verdict::Done(if *n % *every == 0 { -libc::EIO } else { 0 });
        }
        let Some(ram) = self.ram.as_ref() else {
            return Verdict::Done(0);
        };
        if io.usr.len() < 16 {
            return Verdict::Done(-libc::EINVAL);
        }
        let mut o = [0u8; 8];
        o.copy_from_slice(&io.usr[8..16]);
        let off = u64::from_le_bytes(o) as usize;
        let r = match io.dir {
            IoDir::Write => ram.write_stream(off, io.data),
            IoDir::Read => ram.read(off, io.data),
        };
        Verdict::Done(if r.is_ok() { 0 } else { -libc::ENOSPC })
    }
}

/// A running server.
pub struct PerfServer {
    stop: Box<dyn FnOnce() + Send>,
}

impl PerfServer {
    /// Starts a server on `addrs` with IO connections on `cores`; its
    /// control runs on the library's thread.
    pub fn start<F: Fabric>(
        fabric: F,
        addrs: Vec<Address>,
        backend: Backend,
        cores: Vec<usize>,
        cfg: SrvConfig,
    ) -> Result<PerfServer, String> {
        let fail = match backend {
            Backend::Fail(n) => Some((n, 0)),
            _ => None,
        };
        let ram: Option<Arc<mempool::Region>> = match backend {
            Backend::Null | Backend::Fail(_) => None,
            Backend::Ram(n) => {
                // A RAM disk exists before it serves: fault its pages in now.
                let r =
                    mempool::Region::anonymous(n as usize).map_err(|e| format!("ram:{n}: {e}"))?;
                r.prefault();
                Some(Arc::new(r))
            }
        };
        let pool = rtrs_poll::srv::CorePool::launch(&cores).map_err(|e| e.to_string())?;
        let srv = Server::listen(
            &fabric,
            &addrs[0],
            cfg,
            move |_: &rtrs_poll::srv::ConInfo| PerfHandler {
                ram: ram.clone(),
                fail,
            },
            pool.place(),
        );
        let srv = match srv {
            Ok(s) => s,
            Err(e) => {
                pool.stop();
                return Err(format!("listen on {}: {e}", addrs[0]));
            }
        };
        for a in &addrs[1..] {
            if let Err(e) = srv.listen_also(a) {
                drop(srv);
                pool.stop();
                return Err(format!("listen on {a}: {e}"));
            }
        }
        let events = srv.on_event(|ev| {
            if !matches!(ev, SrvEvent::PathUp { .. }) {
                eprintln!("event {} server: {ev}", wall());
            }
        });
        if let Err(e) = events {
            return Err(e.to_string());
        }
        Ok(PerfServer {
            stop: Box::new(move || {
                srv.stop();
                pool.stop();
            }),
        })
    }

    /// Stops the server and waits for it.
    pub fn stop(self) -> Result<(), String> {
        (self.stop)();
        Ok(())
    }
}

/// What the client runs.
#[derive(Clone, Debug, Serialize)]
pub struct ClientOpts {
    /// Server addresses (one path each).
    #[serde(serialize_with = "ser_addrs")]
    pub addrs: Vec<Address>,
    /// IO pattern.
    pub rw: Rw,
    /// Bytes per IO.
    pub bs: u32,
    /// IOs in flight per core.
    pub iodepth: u32,
    /// Client cores.
    pub cores: Vec<usize>,
    /// Seconds to run.
    pub runtime: f64,
    /// Stop once this many IOs completed while measuring (or at `runtime`).
    pub number_ios: Option<u64>,
    /// Multipath policy.
    #[serde(serialize_with = "ser_display")]
    pub mp_policy: MpPolicy,
    /// How read buffers are keyed.
    #[serde(serialize_with = "ser_display")]
    pub read_keys: ReadKeys,
    /// How the IO threads are scheduled (pollers::CoreSched).
    #[serde(serialize_with = "ser_display")]
    pub poll_sched: pollers::CoreSched,
    /// Device size for offsets (random and wrapping sequential); None:
    /// the RNBD device's size, or [`DEFAULT_SIZE`] without one. An RNBD
    /// device smaller than this is refused before any IO (never clamped).
    pub size: Option<u64>,
    /// Print a progress line every second.
    #[serde(skip)]
    pub progress: bool,
    /// Offer the session's control socket here for the run (`rtrs ctl`).
    #[serde(skip)]
    pub ctl: Option<std::path::PathBuf>,
    /// The server's always_invalidate, for the report (embedded runs).
    pub always_invalidate: Option<bool>,
    /// Speak RNBD to this device (the server is an RNBD server).
    pub rnbd_device: Option<String>,
    /// Write a checked pattern and check every block read back.
    pub verify: bool,
    /// Heartbeat interval.
    #[serde(serialize_with = "ser_millis")]
    pub hb_interval: Duration,
    /// Missed heartbeats before a path is dead.
    pub hb_missed: u32,
    /// How long each connection (and INFO) may take.
    #[serde(serialize_with = "ser_millis")]
    pub connect_timeout: Duration,
    /// Reconnect delay and attempts.
    #[serde(serialize_with = "ser_reconnect")]
    pub reconnect: ReconnectPolicy,
    /// randrw: percent of IOs that read.
    pub rwmixread: u32,
    /// Seconds of IO before measuring starts (not counted).
    pub ramp_time: f64,
    /// The session name the server sees.
    pub sessname: String,
    /// Write an HdrHistogram interval log here.
    #[serde(skip)]
    pub hist: Option<std::path::PathBuf>,
}

fn ser_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn ser_reconnect<S: serde::Serializer>(r: &ReconnectPolicy, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(3))?;
    m.serialize_entry("delay_ms", &(r.delay.as_millis() as u64))?;
    m.serialize_entry("max_attempts", &r.max_attempts)?;
    m.serialize_entry("backoff_ms", &(r.backoff.as_millis() as u64))?;
    m.end()
}

fn ser_addrs<S: serde::Serializer>(a: &[Address], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(a.iter().map(|x| x.to_string()))
}

fn ser_display<S: serde::Serializer, T: std::fmt::Display>(p: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string())
}

/// The fio-like result.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// IOs per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// IOs completed.
    pub ios: u64,
    /// IOs completed with an error (including verify mismatches).
    pub errors: u64,
    /// Errors by errno (0: a verify mismatch or a duplicate completion).
    pub errors_by_errno: BTreeMap<i32, u64>,
    /// Blocks read back that did not hold what was written.
    pub verify_failures: u64,
    /// Completions of IOs that were not in flight (an IO completing twice).
    pub duplicates: u64,
    /// IOs moved to another path when theirs failed (not errors).
    pub failovers: u64,
    /// Paths that went down, and successful reconnects.
    pub path_downs: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// The session's events, as printed.
    pub events: Vec<String>,
    /// Seconds no path could take IO (new IO waited).
    pub stalled_secs: f64,
    /// Each path at the end.
    pub paths: Vec<PathSummary>,
    /// Completion latency.
    pub lat_ns: LatNs,
    /// What ran.
    pub config: ClientOpts,
    /// Seconds measured.
    pub seconds: f64,
    /// Whether the server refreshed rkeys per IO.
    pub always_invalidate: bool,
    /// Heap allocations per IO on the client cores in steady state, when a
    /// counting allocator is installed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocs_per_io: Option<f64>,
    /// Per client core (the fio-shaped JSON's jobs).
    #[serde(skip)]
    pub jobs: Vec<Job>,
    /// When measuring started.
    #[serde(skip)]
    pub started: Option<std::time::SystemTime>,
}

/// One direction's IO on one core (or all of them).
#[derive(Clone, Debug)]
pub struct DirResult {
    /// Completion latency, ns.
    pub hist: Histogram<u64>,
    /// IOs completed while measuring.
    pub ios: u64,
    /// Bytes they moved.
    pub bytes: u64,
}

impl DirResult {
    fn new() -> DirResult {
        DirResult {
            hist: histogram(),
            ios: 0,
            bytes: 0,
        }
    }
}

/// One client core's figures (a "job" in the fio-shaped JSON).
#[derive(Clone, Debug)]
pub struct Job {
    /// The CPU it ran on.
    pub cpu: usize,
    /// Reads.
    pub read: DirResult,
    /// Writes.
    pub write: DirResult,
    /// Failed IOs and verify mismatches.
    pub errors: u64,
    /// The errno of its first failed IO (0: a verify mismatch or a duplicate).
    pub first_errno: Option<i32>,
}

/// A path's figures at the end of a run.
#[derive(Clone, Debug, Serialize)]
pub struct PathSummary {
    /// The server address.
    pub addr: String,
    /// Its state.
    pub state: String,
    /// IOs it completed.
    pub ios: u64,
    /// IOs moved off it when it failed.
    pub failovers: u64,
    /// Times it went down.
    pub downs: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Failed reconnect attempts.
    pub failed_reconnects: u64,
    /// Last heartbeat round trip, ns.
    pub hb_rtt_ns: u64,
    /// Most heartbeat intervals in a row without an answer.
    pub hb_missed_peak: u32,
    /// Why it last went down.
    pub last_reason: Option<String>,
}

struct CoreResult<F: Fabric> {
    /// Handed back so the session closes before its cores go.
    core: CltCore<F>,
    read: DirResult,
    write: DirResult,
    ios: u64,
    errors: u64,
    by_errno: BTreeMap<i32, u64>,
    /// The errno of the first failed IO (0: none, or a verify mismatch first).
    first_errno: Option<i32>,
    verify_failures: u64,
    duplicates: u64,
    bytes: u64,
    allocs: u64,
    stalled_ns: u64,
}

/// Counts heap allocations on threads that opt in (rtrs-perf installs it as
/// the global allocator).
pub mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    /// The counting allocator.
    pub struct Counting;

    // SAFETY: forwards to the system allocator unchanged; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as the caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as the caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as the caller's.
            unsafe { System.realloc(ptr, layout, new) }
        }
    }

    /// Allocations made by this thread so far.
    pub fn this_thread() -> u64 {
        COUNT.try_with(|c| c.get()).unwrap_or(0)
    }
}

struct Gen {
    x: u64,
    rw: Rw,
    bs: u64,
    blocks: u64,
    seq: u64,
    /// randrw: percent of reads.
    mix: u64,
}

impl Gen {
    fn next(&mut self) -> (Dir, u64) {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        let rand_block = self.x % self.blocks;
        let seq_block = {
            self.seq = (self.seq + 1) % self.blocks;
            self.seq
        };
        match self.rw {
            Rw::Read => (Dir::Read, seq_block * self.bs),
            Rw::Write => (Dir::Write, seq_block * self.bs),
            Rw::Randread => (Dir::Read, rand_block * self.bs),
            Rw::Randwrite => (Dir::Write, rand_block * self.bs),
            Rw::Randrw if (self.x >> 32) % 100 < self.mix => (Dir::Read, rand_block * self.bs),
            Rw::Randrw => (Dir::Write, rand_block * self.bs),
        }
    }
}

fn usr_hdr(off: u64) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[0] = 1;
    u[8..].copy_from_slice(&off.to_le_bytes());
    u
}

/// The verify pattern of the block at `off`, generation `seq`: a header
/// (magic, offset, generation, checksum of the rest) then pseudo-random
/// bytes, as fio's verify headers do.
fn fill_block(buf: &mut [u8], off: u64, seq: u64) {
    let mut x =
        off.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xd6e8_feb8_6659_fd93) | 1;
    for b in buf.iter_mut().skip(32) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let sum = checksum(&buf[32.min(buf.len())..]);
    let head = [VERIFY_MAGIC, off, seq, sum];
    for (i, w) in head.iter().enumerate() {
        if buf.len() >= (i + 1) * 8 {
            buf[i * 8..(i + 1) * 8].copy_from_slice(&w.to_le_bytes());
        }
    }
}

const VERIFY_MAGIC: u64 = 0x5946_5952_5653_5452; // "RTSVRYFY"

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Checks a block read back: never written (all zero) or a valid header for
/// this offset with a matching checksum.
fn check_block(buf: &[u8], off: u64) -> bool {
    if buf.len() < 32 {
        return true;
    }
    let w = |i: usize| u64::from_le_bytes(buf[i * 8..(i + 1) * 8].try_into().unwrap_or([0; 8]));
    if w(0) == 0 && buf.iter().all(|&b| b == 0) {
        return true;
    }
    w(0) == VERIFY_MAGIC && w(1) == off && w(3) == checksum(&buf[32..])
}

/// The offsets' span without `--size` and without an RNBD device (whose
/// size it is then).
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// How long a core waits before trying again when no path takes IO.
const NO_PATH_WAIT: Duration = Duration::from_millis(1);

#[allow(clippy::too_many_arguments)]
fn run_core<F: Fabric>(
    mut core: CltCore<F>,
    o: &ClientOpts,
    dev: &OnceLock<Arc<RnbdDev>>,
    seed: u64,
    stop: &AtomicBool,
    measuring: &AtomicBool,
    progress: &crate::progress::CoreCounts,
    mut log: Option<crate::histlog::CoreLog>,
) -> Result<CoreResult<F>, String> {
    let (mut read, mut write) = (DirResult::new(), DirResult::new());
    let mut first_errno = None;
    let bs = o.bs;
    let mut gen = Gen {
        x: seed | 1,
        rw: o.rw,
        bs: u64::from(bs),
        blocks: (o.size.unwrap_or(DEFAULT_SIZE) / u64::from(bs)).max(1),
        seq: seed % 1024,
        mix: u64::from(o.rwmixread),
    };
    let qd = core.queue_depth() as usize;
    let (mut ios, mut errors, mut bytes) = (0u64, 0u64, 0u64);
    let mut by_errno: BTreeMap<i32, u64> = BTreeMap::new();
    let mut inflight = 0u32;
    // Which permits have an IO in flight: a completion of one that has not
    // is an IO completing twice.
    let mut in_flight = vec![false; qd];
    let mut duplicates = 0u64;
    let mut err: Option<String> = None;
    // Sized once: completions of one poll wait here to be resubmitted.
    let mut ready: Vec<(rtrs_poll::clt::IoPermit, Dir, u64, i32)> = Vec::with_capacity(qd);
    let mut free: Vec<rtrs_poll::clt::IoPermit> = Vec::with_capacity(qd);
    let mut seq = seed << 32;
    let mut allocs_at = None;
    let mut allocs = 0u64;
    let mut verify_failures = 0u64;
    let mut stalled_ns = 0u64;
    let mut no_path_since: Option<Instant> = None;
    let mut sized = false;
    // The lazy clock (as a pollers core's): read when this loop may submit
    // (the IO's latency starts there) and every IDLE_CLOCK_EVERY iterations
    // (the interval log, the no-path wait), so an iteration that only
    // waits for a completion reads no clock; a completion reads it once.
    let mut now = pollers::clock::now();
    let mut iteration = 0u64;
    let mut seconds = crate::progress::Publisher::new(progress);
    loop {
        iteration += 1;
        if inflight < o.iodepth || iteration % pollers::core::IDLE_CLOCK_EVERY == 0 {
            now = pollers::clock::now();
        }
        if let (false, Some(d)) = (sized, dev.get()) {
            // Offsets stay inside the device: a --size larger than it
            // was refused before the device was set.
            gen.blocks = (o.size.unwrap_or(d.size()) / u64::from(bs)).max(1);
            sized = true;
        }
        let stopping = stop.load(Ordering::Relaxed);
        // RNBD: no IO until the device is open (and while the session is
        // lost, until it is open again).
        let dev_ready = o.rnbd_device.is_none() || dev.get().is_some_and(|d| d.is_open());
        let waiting = no_path_since.is_some_and(|t| now.duration_since(t) < NO_PATH_WAIT);
        if !stopping && err.is_none() && dev_ready && !waiting {
            while inflight < o.iodepth {
                let mut p = match free.pop() {
                    Some(p) => p,
                    None => match core.get_permit() {
                        Some(p) => p,
                        None => break,
                    },
                };
                let (dir, off) = gen.next();
                let mut u = [0u8; 32];
                let ulen = match dev.get() {
                    Some(d) => {
                        let op = match dir {
                            Dir::Write => rtrs_poll::proto::rnbd::RnbdOp::Write,
                            Dir::Read => rtrs_poll::proto::rnbd::RnbdOp::Read,
                        };
                        u = rtrs_poll::rnbd::clt::io_hdr(d, op, off, bs, 0);
                        32
                    }
                    None => {
                        u[..16].copy_from_slice(&usr_hdr(off));
                        16
                    }
                };
                if o.verify && dir == Dir::Write {
                    seq += 1;
                    fill_block(&mut core.buf(&mut p)[..bs as usize], off, seq);
                }
                let id = p.id() as usize;
                let r = match dir {
                    Dir::Write => core.write(p, &u[..ulen], bs, off, now),
                    Dir::Read => core.read(p, &u[..ulen], bs, off, now),
                };
                match r {
                    Ok(()) => {
                        inflight += 1;
                        in_flight[id] = true;
                        if let Some(t) = no_path_since.take() {
                            stalled_ns += now.duration_since(t).as_nanos() as u64;
                        }
                    }
                    Err((p, CltError::NoPath)) => {
                        // No path takes IO now (the session is lost): wait
                        // for one; an IO never submitted is not an error.
                        free.push(p);
                        no_path_since.get_or_insert(now);
                        break;
                    }
                    Err((p, e)) => {
                        core.put_permit(p);
                        err = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        if (stopping || err.is_some()) && inflight == 0 {
            break;
        }
        let on = measuring.load(Ordering::Relaxed);
        if on && allocs_at.is_none() {
            allocs_at = Some(alloc_count::this_thread());
        }
        if !on {
            if let Some(a) = allocs_at.take() {
                allocs = alloc_count::this_thread() - a;
                if let Some(l) = log.as_mut() {
                    l.finish(now);
                }
            }
        } else {
            // The progress line's seconds and the interval log's: the same
            // boundaries (the same `now`), the same IOs (`ios` counts
            // those the intervals record).
            seconds.tick(now, ios);
            if let Some(l) = log.as_mut() {
                l.tick(now);
            }
        }
        let mut cur = log.as_mut().and_then(|l| l.cur());
        core.poll(now, &mut |c| {
            let id = c.permit.id() as usize;
            if !std::mem::replace(&mut in_flight[id], false) {
                duplicates += 1;
                errors += 1;
                first_errno.get_or_insert(0);
                *by_errno.entry(0).or_default() += 1;
                ready.push((c.permit, c.dir, c.tag, c.errno));
                return;
            }
            inflight -= 1;
            if c.errno != 0 {
                // Counted measuring or not: a failed IO is never hidden.
                errors += 1;
                first_errno.get_or_insert(c.errno.saturating_abs());
                *by_errno.entry(c.errno).or_default() += 1;
            }
            if on {
                let ns = pollers::clock::now()
                    .saturating_duration_since(c.start)
                    .as_nanos() as u64;
                let (d, i) = match (c.dir, cur.as_mut()) {
                    (Dir::Read, i) => (&mut read, i.map(|i| &mut i.read)),
                    (Dir::Write, i) => (&mut write, i.map(|i| &mut i.write)),
                };
                d.hist.saturating_record(ns.max(1));
                d.ios += 1;
                d.bytes += u64::from(c.len);
                if let Some(i) = i {
                    i.saturating_record(ns.max(1));
                }
                ios += 1;
                bytes += u64::from(c.len);
            }
            ready.push((c.permit, c.dir, c.tag, c.errno));
        });
        if !ready.is_empty() {
            seconds.warm();
        }
        for (mut p, dir, off, errno) in ready.drain(..) {
            if o.verify
                && dir == Dir::Read
                && errno == 0
                && !check_block(&core.buf(&mut p)[..bs as usize], off)
            {
                errors += 1;
                first_errno.get_or_insert(0);
                *by_errno.entry(0).or_default() += 1;
                if verify_failures < 3 {
                    eprintln!(
                        "verify: block at offset {off} does not match what was written there"
                    );
                }
                verify_failures += 1;
            }
            free.push(p);
        }
        if stop.load(Ordering::Relaxed) {
            for p in free.drain(..) {
                core.put_permit(p);
            }
        }
    }
    for p in free.drain(..) {
        core.put_permit(p);
    }
    if let Some(t) = no_path_since {
        stalled_ns += Instant::now().duration_since(t).as_nanos() as u64;
    }
    seconds.finish();
    if let Some(a) = allocs_at {
        allocs = alloc_count::this_thread() - a;
    }
    if let Some(l) = log.as_mut() {
        l.finish(Instant::now());
    }
    if let Some(e) = err {
        if ios == 0 {
            return Err(e);
        }
        eprintln!("core stopped submitting: {e}");
    }
    Ok(CoreResult {
        core,
        read,
        write,
        ios,
        errors,
        by_errno,
        first_errno,
        verify_failures,
        duplicates,
        bytes,
        allocs,
        stalled_ns,
    })
}

/// Prints a progress line for each whole second every core is past: the
/// IOs completed in it (the `--hist` interval of that second holds the
/// same count) and each path's state now.
fn print_seconds<F: Fabric>(
    r: &mut crate::progress::Reader,
    cores: &[crate::progress::CoreCounts],
    bs: u32,
    clt: &Client<F>,
) {
    use crate::progress::Line;
    while let Some(l) = r.next(cores) {
        match l {
            Line::Second { index, ios } => eprintln!(
                "[{:>3}s] {:.3} M IOPS ({ios} IOs)  {:.1} MiB/s  paths: {}",
                index + 1,
                ios as f64 / 1e6,
                (ios * u64::from(bs)) as f64 / (1 << 20) as f64,
                path_line(clt)
            ),
            Line::Lost { from, to } => eprintln!(
                "[{:>3}s] seconds {} to {} not shown: this thread fell behind the cores",
                to,
                from + 1,
                to
            ),
        }
    }
}

/// Prints and keeps the session's events.
struct EventLog {
    rx: rtrs_poll::clt::Events,
    lines: Vec<String>,
    quiet: bool,
}

impl EventLog {
    fn drain(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            let line = format!("event {} {ev}", wall());
            if !self.quiet {
                eprintln!("{line}");
            }
            self.lines.push(line);
            if matches!(ev, CltEvent::SessionLost) && self.lines.len() > 10_000 {
                self.lines.remove(0);
            }
        }
    }
}

/// How much longer than --ramp-time the ramp waits for every core's first IO.
const WARM_MAX: Duration = Duration::from_secs(30);

/// Runs the client: opens the session, runs the cores for `runtime`
/// (after a warm-up of a tenth of it, at most one second), and sums up.
/// Failover is not an error: IO that moves to another path completes
/// there; errors are IO that really failed.
pub fn run_client<F: Fabric>(fabric: &F, o: &ClientOpts) -> Result<Summary, String> {
    let mut cfg = CltConfig::new(&o.sessname, o.addrs.clone());
    cfg.cores = o.cores.len();
    cfg.mp_policy = o.mp_policy;
    cfg.read_keys = o.read_keys;
    cfg.max_io_size = o.bs.max(1);
    cfg.connect_timeout = o.connect_timeout;
    cfg.hb_interval = o.hb_interval;
    cfg.hb_missed_max = o.hb_missed;
    cfg.reconnect = o.reconnect;
    // The log file first: a path that cannot be written fails before any IO.
    let (mut core_logs, mut main_log) = match &o.hist {
        Some(p) => {
            let (c, m) = crate::histlog::channels(o.cores.len(), p)?;
            (c.into_iter().map(Some).collect(), Some(m))
        }
        None => (o.cores.iter().map(|_| None).collect::<Vec<_>>(), None),
    };
    // Bound before the session opens: a bad --ctl fails first. The socket
    // goes when the run ends, on an error too (its Drop).
    let ctl_sock = o
        .ctl
        .as_deref()
        .map(rtrs_ctl::CtlSocket::bind)
        .transpose()?;
    let (clt, mut cores) = Client::open(fabric, cfg).map_err(|e| e.to_string())?;
    let clt = Arc::new(clt);
    let ctl = match ctl_sock {
        Some(sock) => {
            let path = sock.path().display().to_string();
            let c = rtrs_ctl::client::serve_socket(sock, clt.clone())?;
            if o.progress {
                eprintln!("rtrs-perf: control socket {path} (rtrs ctl --socket {path})");
            }
            Some(c)
        }
        None => None,
    };
    let mut events = EventLog {
        rx: clt.subscribe(),
        lines: Vec::new(),
        quiet: !o.progress,
    };
    if o.bs > cores[0].max_io_size() {
        return Err(format!(
            "--bs {} exceeds the server's max_io_size {}",
            o.bs,
            cores[0].max_io_size()
        ));
    }
    let mut rnbd = match &o.rnbd_device {
        Some(_) => Some(RnbdClient::new(
            &clt,
            cores[0].submitter().map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let dev: Arc<OnceLock<Arc<RnbdDev>>> = Arc::new(OnceLock::new());
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<crate::progress::CoreCounts>> =
        Arc::new(o.cores.iter().map(|_| Default::default()).collect());
    let mut threads = Vec::new();
    for (i, core) in cores.into_iter().enumerate() {
        let log = core_logs[i].take();
        let (stop, measuring, progress) = (stop.clone(), measuring.clone(), progress.clone());
        let o2 = o.clone();
        let dev = dev.clone();
        let cpu = o.cores[i];
        threads.push(
            std::thread::Builder::new()
                .name(format!("rtrs-clt{i}"))
                .spawn(move || {
                    crate::pin(cpu)?;
                    o2.poll_sched
                        .apply()
                        .map_err(|e| format!("core {cpu}: --poll-sched {}: {e}", o2.poll_sched))?;
                    run_core(
                        core,
                        &o2,
                        &dev,
                        0x1234_5678 + i as u64 * 7919,
                        &stop,
                        &measuring,
                        &progress[i],
                        log,
                    )
                })
                .map_err(|e| e.to_string())?,
        );
    }
    // Admin IO goes through core 0's submitter: its thread polls it.
    let mut nap = || std::thread::sleep(Duration::from_micros(50));
    if let (Some(rn), Some(name)) = (rnbd.as_mut(), &o.rnbd_device) {
        let opened = rn.sess_info(&mut nap).and_then(|ver| {
            rn.open(name, rtrs_poll::proto::rnbd::AccessMode::Rw, &mut nap)
                .map(|d| (ver, d))
        });
        match opened {
            Ok((ver, d)) => {
                if o.progress {
                    eprintln!(
                        "RNBD {ver}: device {name} id {} of {} bytes, logical block {} B",
                        d.device_id(),
                        d.size(),
                        d.logical_block_size
                    );
                }
                let refused = if u64::from(o.bs) % u64::from(d.logical_block_size.max(1)) != 0 {
                    Some(format!(
                        "--bs {} is not a multiple of the device's logical block size {}",
                        o.bs, d.logical_block_size
                    ))
                } else {
                    o.size.filter(|&s| s > d.size()).map(|s| {
                        format!(
                            "--size {s} is larger than device {name} ({} bytes): give --size {} or less, \
                             or no --size for the whole device",
                            d.size(),
                            d.size()
                        )
                    })
                };
                if let Some(e) = refused {
                    // Refused before any IO: the cores wait for the device.
                    stop.store(true, Ordering::Relaxed);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
                let _ = dev.set(d);
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                for t in threads {
                    let _ = t.join();
                }
                return Err(format!("RNBD open {name}: {e}"));
            }
        }
    }
    // The ramp: --ramp-time, and until every core has completed an IO (a
    // measured window never starts before IO flows: on a busy host a
    // session's first IO may take a while), at most WARM_MAX more.
    let warmup = Duration::from_secs_f64(o.ramp_time);
    let t0 = Instant::now();
    let warm = || progress.iter().all(crate::progress::CoreCounts::is_warm);
    while (t0.elapsed() < warmup || !warm())
        && t0.elapsed() < warmup + WARM_MAX
        && !crate::interrupted()
    {
        events.drain();
        std::thread::sleep(rtrs_poll::sess::CONTROL_TICK);
    }
    let started = std::time::SystemTime::now();
    if let Some(l) = main_log.as_mut() {
        l.begin(started)?;
    }
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let runtime = Duration::from_secs_f64(o.runtime);
    let mut lines = crate::progress::Reader::default();
    let mut log_err = None;
    while start.elapsed() < runtime && !crate::interrupted() {
        events.drain();
        if let Some(Err(e)) = main_log.as_mut().map(|l| l.drain()) {
            log_err.get_or_insert(e);
        }
        if let Some(rn) = rnbd.as_mut() {
            for ev in rn.poll(&mut nap) {
                let line = format!("event {} rnbd: {ev:?}", wall());
                if o.progress {
                    eprintln!("{line}");
                }
                events.lines.push(line);
            }
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
        if clt.paths().iter().all(|p| p.state() == PathState::Closed) {
            // Out of reconnect attempts everywhere: nothing will carry IO.
            let line = format!("event {} every path is closed: stopping", wall());
            eprintln!("{line}");
            events.lines.push(line);
            break;
        }
        if o.progress {
            print_seconds(&mut lines, &progress, o.bs, &clt);
        }
        if o.number_ios
            .is_some_and(|n| progress.iter().map(|c| c.ios()).sum::<u64>() >= n)
        {
            break;
        }
        std::thread::sleep(rtrs_poll::sess::CONTROL_TICK);
    }
    measuring.store(false, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut hist = histogram();
    let mut jobs = Vec::new();
    let (mut ios, mut errors, mut bytes, mut allocs) = (0, 0, 0, 0);
    let (mut verify_failures, mut duplicates, mut stalled_ns) = (0, 0, 0);
    let mut by_errno: BTreeMap<i32, u64> = BTreeMap::new();
    let mut first_err = None;
    let mut cores = Vec::new();
    for (i, t) in threads.into_iter().enumerate() {
        while !t.is_finished() {
            events.drain();
            if let Some(Err(e)) = main_log.as_mut().map(|l| l.drain()) {
                log_err.get_or_insert(e);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match t.join() {
            Ok(Ok(r)) => {
                cores.push(r.core);
                let _ = hist.add(&r.read.hist);
                let _ = hist.add(&r.write.hist);
                jobs.push(Job {
                    cpu: o.cores[i],
                    read: r.read,
                    write: r.write,
                    errors: r.errors,
                    first_errno: r.first_errno,
                });
                ios += r.ios;
                errors += r.errors;
                bytes += r.bytes;
                allocs += r.allocs;
                verify_failures += r.verify_failures;
                duplicates += r.duplicates;
                stalled_ns = stalled_ns.max(r.stalled_ns);
                for (e, n) in r.by_errno {
                    *by_errno.entry(e).or_default() += n;
                }
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("a client core panicked".to_string());
            }
        }
    }
    events.drain();
    if o.progress {
        // The whole seconds the cores finished after the last look.
        print_seconds(&mut lines, &progress, o.bs, &clt);
    }
    let st = clt.stats();
    let paths = clt
        .paths()
        .iter()
        .map(|p| {
            let s = p.stats();
            PathSummary {
                addr: s.addr,
                state: s.state.unwrap_or(PathState::Closed).name().to_string(),
                ios: s.ios,
                failovers: s.failovers,
                downs: s.downs,
                reconnects: s.reconnects,
                failed_reconnects: s.failed_reconnects,
                hb_rtt_ns: s.hb_rtt.as_nanos() as u64,
                hb_missed_peak: s.hb_missed_peak,
                last_reason: s.last_reason.map(|r| r.to_string()),
            }
        })
        .collect();
    let always_invalidate = clt.always_invalidate();
    // The session closes first (its paths torn down in order), then its
    // cores go: a core dropped under a live session is a path failure.
    drop(rnbd);
    events
        .lines
        .push(format!("event {} run over: closing the session", wall()));
    // The socket first: nothing steers the session while it closes.
    drop(ctl);
    match Arc::try_unwrap(clt) {
        Ok(c) => c.close(),
        Err(c) => drop(c),
    }
    drop(cores);
    if let Some(l) = main_log {
        if let Err(e) = l.finish() {
            log_err.get_or_insert(e);
        }
    }
    if ios == 0 {
        return Err(first_err.unwrap_or_else(|| "no IO completed".into()));
    }
    if let Some(e) = log_err {
        return Err(e);
    }
    Ok(Summary {
        iops: ios as f64 / seconds,
        bw_bytes: bytes as f64 / seconds,
        ios,
        errors,
        errors_by_errno: by_errno,
        verify_failures,
        duplicates,
        failovers: st.failovers,
        path_downs: st.downs,
        reconnects: st.reconnects,
        events: events.lines,
        stalled_secs: stalled_ns as f64 / 1e9,
        paths,
        lat_ns: LatNs::from_hist(&hist),
        config: ClientOpts {
            // The size the offsets covered.
            size: Some(
                o.size
                    .or(dev.get().map(|d| d.size()))
                    .unwrap_or(DEFAULT_SIZE),
            ),
            ..o.clone()
        },
        seconds,
        always_invalidate,
        allocs_per_io: crate::COUNTING.then(|| allocs as f64 / ios as f64),
        jobs,
        started: Some(started),
    })
}

fn path_line<F: Fabric>(clt: &Client<F>) -> String {
    clt.paths()
        .iter()
        .map(|p| {
            let s = p.stats();
            format!(
                "{} {} inflight {} failovers {}",
                s.addr,
                s.state.unwrap_or(PathState::Closed).name(),
                s.inflight,
                s.failovers
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Summary {
    /// The fio-like text report.
    pub fn print(&self) {
        let rw = format!("{:?}", self.config.rw).to_lowercase();
        outln!(
            "{rw}: IOPS={:.0} ({:.3}M), BW={:.1}MiB/s ({} ios in {:.2}s, bs={}, iodepth={}, cores={}, always_invalidate={})",
            self.iops,
            self.iops / 1e6,
            self.bw_bytes / (1 << 20) as f64,
            self.ios,
            self.seconds,
            self.config.bs,
            self.config.iodepth,
            self.config.cores.len(),
            if self.always_invalidate { "on" } else { "off" }
        );
        let l = &self.lat_ns;
        outln!(
            "  lat (nsec): min={}, mean={}, p50={}, p90={}, p99={}, p99.9={}, p99.99={}, max={}",
            l.min,
            l.mean,
            l.p50,
            l.p90,
            l.p99,
            l.p99_9,
            l.p99_99,
            l.max
        );
        if self.config.rw == Rw::Randrw {
            for (name, pick) in [("read", 0), ("write", 1)] {
                let mut h = histogram();
                let mut ios = 0u64;
                for j in &self.jobs {
                    let d = if pick == 0 { &j.read } else { &j.write };
                    let _ = h.add(&d.hist);
                    ios += d.ios;
                }
                let l = LatNs::from_hist(&h);
                outln!(
                    "  {name}: IOPS={:.0}, lat (nsec) p50={}, p99={}, p99.9={}, max={}",
                    ios as f64 / self.seconds.max(1e-9),
                    l.p50,
                    l.p99,
                    l.p99_9,
                    l.max
                );
            }
        }
        outln!(
            "  errors={} {:?} (verify mismatches {}, completed twice {}); failovers={} path downs={} reconnects={} stalled={:.2}s",
            self.errors,
            self.errors_by_errno,
            self.verify_failures,
            self.duplicates,
            self.failovers,
            self.path_downs,
            self.reconnects,
            self.stalled_secs
        );
        if let Some(a) = self.allocs_per_io {
            outln!("  heap allocations per IO on the client cores: {a:.4}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_catches_corruption_and_misdirected_blocks() {
        let mut b = vec![0u8; 4096];
        assert!(check_block(&b, 8192), "a block never written passes");
        fill_block(&mut b, 8192, 7);
        assert!(check_block(&b, 8192));
        assert!(!check_block(&b, 4096), "the block of another offset");
        let mut flipped = b.clone();
        flipped[1000] ^= 1;
        assert!(!check_block(&flipped, 8192), "a flipped bit");
        let mut torn = b.clone();
        torn[2048..].fill(0);
        assert!(!check_block(&torn, 8192), "a torn block");
    }

    #[test]
    fn sizes_and_switches_parse() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert_eq!(parse_backend("ram:2G"), Ok(Backend::Ram(2 << 30)));
        assert!(parse_backend("disk").is_err());
        assert_eq!(parse_on_off("off"), Ok(false));
        assert!(parse_on_off("maybe").is_err());
    }
}
