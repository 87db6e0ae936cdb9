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

use crate::lane::{Lane, LaneResult, ThreadResult};
use crate::report::{histogram, LatNs};
use hdrhistogram::Histogram;
use minstant::Instant;
use rtrs_ctl::Census;
use rtrs_fabric::{Address, Fabric};
use rtrs_poll::clt::{Client, CltConfig, CltCore, CltEvent, PathState, ReadKeys, ReconnectPolicy};
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
    fn on_io(&mut self, mut io: SrvIo<'_>) -> Verdict {
        if let Some((every, n)) = self.fail.as_mut() {
            *n += 1;
            return Verdict::Done(if *n % *every == 0 { -libc::EIO } else { 0 });
        }
        let Some(ram) = self.ram.as_ref() else {
            return Verdict::Done(0);
        };
        let dir = io.dir();
        let (usr, data) = io.parts();
        if usr.len() < 16 {
            return Verdict::Done(-libc::EINVAL);
        }
        let mut o = [0u8; 8];
        o.copy_from_slice(&usr[8..16]);
        let off = u64::from_le_bytes(o) as usize;
        let r = match dir {
            IoDir::Write => ram.write_stream(off, data),
            IoDir::Read => ram.read(off, data),
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
    /// Connections per path, cid 0 included (None: one IO connection per
    /// core).
    pub connections: Option<u16>,
    /// Sessions of the same paths, their cores polled by the same threads.
    pub sessions: u32,
    /// Sessions opened and closed one after another beside them.
    pub churn_sessions: u32,
    /// A file written once every session is open.
    #[serde(skip)]
    pub ready: Option<std::path::PathBuf>,
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

/// What a run's IO came to, for the run and for each of its sessions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IoFigures {
    /// IOs completed while measuring.
    pub ios: u64,
    /// IOs submitted and completed in all, measuring or not: equal, or an
    /// IO was lost.
    pub submitted: u64,
    pub completed: u64,
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
    /// Paths that went down.
    pub path_downs: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Seconds no path could take IO (new IO waited), the longest of a core.
    pub stalled_secs: f64,
}

impl IoFigures {
    /// Adds a lane's counts.
    fn add_lane(&mut self, l: &LaneResult) {
        self.ios += l.ios;
        self.submitted += l.submitted;
        self.completed += l.completed;
        self.errors += l.errors;
        self.verify_failures += l.verify_failures;
        self.duplicates += l.duplicates;
        self.stalled_secs = self.stalled_secs.max(l.stalled_ns as f64 / 1e9);
        for (e, k) in &l.by_errno {
            *self.errors_by_errno.entry(*e).or_default() += k;
        }
    }

    /// Adds a session's path figures.
    fn add_paths(&mut self, st: &rtrs_poll::clt::PathStats) {
        self.failovers += st.failovers;
        self.path_downs += st.downs;
        self.reconnects += st.reconnects;
    }
}

/// The fio-like result.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// IOs per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// IOs, errors, failovers and reconnects of every session.
    #[serde(flatten)]
    pub io: IoFigures,
    /// The session's events, as printed.
    pub events: Vec<String>,
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
    /// Opening every session (every path up) and its RNBD device, ms.
    pub setup_ms: f64,
    /// Each session's figures.
    pub sessions: Vec<SessionSummary>,
    /// `--churn-sessions`: what the churn did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<crate::churn::ChurnSummary>,
    /// What the process held at the run's points.
    pub census: CensusPoints,
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
    pub(crate) fn new() -> DirResult {
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

/// The offsets' span without `--size` and without an RNBD device (whose
/// size it is then).
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Prints a progress line for each whole second every core is past: the
/// IOs completed in it (the `--hist` interval of that second holds the
/// same count) and each path's state now (with several sessions, how many
/// have every path up).
fn print_seconds<F: Fabric>(
    r: &mut crate::progress::Reader,
    cores: &[crate::progress::CoreCounts],
    bs: u32,
    sessions: &[Sess<F>],
) {
    use crate::progress::Line;
    while let Some(l) = r.next(cores) {
        match l {
            Line::Second { index, ios } => eprintln!(
                "[{:>3}s] {:.3} M IOPS ({ios} IOs)  {:.1} MiB/s  paths: {}",
                index + 1,
                ios as f64 / 1e6,
                (ios * u64::from(bs)) as f64 / (1 << 20) as f64,
                paths_line(sessions)
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

fn paths_line<F: Fabric>(sessions: &[Sess<F>]) -> String {
    match sessions {
        [one] => path_line(&one.clt),
        many => {
            let up = many
                .iter()
                .filter(|s| {
                    s.clt
                        .paths()
                        .iter()
                        .all(|p| p.state() == PathState::Connected)
                })
                .count();
            format!("{up} of {} sessions with every path connected", many.len())
        }
    }
}

/// Prints and keeps a session's events.
pub(crate) struct EventLog {
    rx: rtrs_poll::clt::Events,
    lines: Vec<String>,
    quiet: bool,
    /// `[sessname] ` before each line when the run has several sessions.
    prefix: String,
}

impl EventLog {
    /// A subscription to `clt`'s events; lines carry `name` when given.
    pub(crate) fn new<F: Fabric>(clt: &Client<F>, quiet: bool, name: Option<&str>) -> EventLog {
        EventLog {
            rx: clt.subscribe(),
            lines: Vec::new(),
            quiet,
            prefix: name.map(|n| format!("[{n}] ")).unwrap_or_default(),
        }
    }

    pub(crate) fn drain(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            let line = format!("event {} {}{ev}", wall(), self.prefix);
            if !self.quiet {
                eprintln!("{line}");
            }
            self.lines.push(line);
            if matches!(ev, CltEvent::SessionLost) && self.lines.len() > 10_000 {
                self.lines.remove(0);
            }
        }
    }

    fn push(&mut self, what: &str) {
        let line = format!("event {} {}{what}", wall(), self.prefix);
        if !self.quiet {
            eprintln!("{line}");
        }
        self.lines.push(line);
    }
}

/// The RNBD device session `index` opens: `{}` in `--rnbd-device` is its
/// index (`churn` for the churn's sessions).
pub(crate) fn rnbd_name(tmpl: &str, index: &str) -> String {
    tmpl.replace("{}", index)
}

/// One session of the run.
struct Sess<F: Fabric> {
    name: String,
    clt: Arc<Client<F>>,
    events: EventLog,
    rnbd: Option<RnbdClient<F>>,
    dev: Arc<OnceLock<Arc<RnbdDev>>>,
    ctl: Option<rtrs_ctl::CtlServer>,
    open_ms: f64,
    rnbd_open_ms: Option<f64>,
    /// Every path closed (out of reconnect attempts): said once.
    closed: bool,
}

/// A session's figures at the end of a run (`sessions` in the JSON).
#[derive(Clone, Debug, Serialize)]
pub struct SessionSummary {
    /// The name the server sees.
    pub name: String,
    /// Opening it: every path up (ms).
    pub open_ms: f64,
    /// Then its RNBD device open (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rnbd_open_ms: Option<f64>,
    /// Bytes of its registered memory (buffers and headers of its permits).
    pub memory_bytes: usize,
    #[serde(flatten)]
    pub io: IoFigures,
    pub paths: Vec<PathSummary>,
}

/// The process's census at the points of a run (`census` in the JSON).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CensusPoints {
    /// Before any session opened.
    pub start: Census,
    /// Every session open (and its RNBD device), before measuring.
    pub up: Census,
    /// After measuring, every session still open.
    pub end: Census,
    /// After every session closed.
    pub closed: Census,
}

fn path_summary(p: &rtrs_poll::clt::CltPath) -> PathSummary {
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
}

/// `--ctl PATH` for session `i` of `n`: PATH itself for one session,
/// PATH.i for several.
fn ctl_path(p: &std::path::Path, i: usize, n: usize) -> std::path::PathBuf {
    if n == 1 {
        return p.to_path_buf();
    }
    let mut s = p.as_os_str().to_os_string();
    s.push(format!(".{i}"));
    s.into()
}

/// Closes every session in order (its paths torn down), then drops the
/// cores: a core dropped under a live session is a path failure.
fn close_all<F: Fabric>(sessions: Vec<Sess<F>>, cores: Vec<CltCore<F>>) {
    for s in sessions {
        // The socket first: nothing steers the session while it closes.
        let Sess { clt, rnbd, ctl, .. } = s;
        drop(rnbd);
        drop(ctl);
        match Arc::try_unwrap(clt) {
            Ok(c) => c.close(),
            Err(c) => drop(c),
        }
    }
    drop(cores);
}

/// How much longer than --ramp-time the ramp waits for every core's first IO.
const WARM_MAX: Duration = Duration::from_secs(30);

/// Runs the client: opens `--sessions` sessions of the same paths, runs
/// their cores on the `--cores` threads (each thread polls its core of
/// every session in turn) for `runtime` (after a warm-up of a tenth of it,
/// at most one second), with `--churn-sessions` opened and closed beside
/// them, and sums up. Failover is not an error: IO that moves to another
/// path completes there; errors are IO that really failed.
pub fn run_client<F: Fabric>(fabric: &F, o: &ClientOpts) -> Result<Summary, String> {
    let census_start = Census::take();
    let n = o.sessions.max(1) as usize;
    // Sessions share the device in slices, or each opens its own RNBD
    // device (one writer each, the kernel's rule) and has all of it.
    let own_device = o.rnbd_device.as_deref().is_some_and(|d| d.contains("{}"));
    if o.rnbd_device.is_some() && !own_device && (n > 1 || o.churn_sessions > 0) {
        return Err(format!(
            "--rnbd-device {}: with --sessions or --churn-sessions each session opens a device \
             of its own (RNBD admits one writer a device): name them with {{}} (the session's \
             index, or \"churn\"), e.g. --rnbd-device 'd{{}}'",
            o.rnbd_device.as_deref().unwrap_or_default()
        ));
    }
    let slices = if own_device {
        1
    } else {
        n as u64 + u64::from(o.churn_sessions > 0)
    };
    let slice_of = |i: usize| {
        if own_device {
            (0, 1)
        } else {
            (i as u64, slices)
        }
    };
    let fits = |size: u64, what: &str| -> Result<(), String> {
        let blocks = size / u64::from(o.bs);
        if blocks < slices {
            return Err(format!(
                "{what} {size} holds {blocks} blocks of --bs {}: fewer than the {slices} sessions \
                 (each has a slice of its own, the churn one)",
                o.bs
            ));
        }
        Ok(())
    };
    if o.rnbd_device.is_none() || o.size.is_some() {
        fits(o.size.unwrap_or(DEFAULT_SIZE), "--size")?;
    }
    let mut cfg = CltConfig::new(&o.sessname, o.addrs.clone());
    cfg.cores = o.cores.len();
    cfg.connections = o.connections;
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
    // Bound before any session opens: a bad --ctl fails first. A socket
    // goes when the run ends, on an error too (its Drop).
    let mut ctl_socks = Vec::with_capacity(n);
    for i in 0..n {
        ctl_socks.push(
            o.ctl
                .as_deref()
                .map(|p| rtrs_ctl::CtlSocket::bind(&ctl_path(p, i, n)))
                .transpose()?,
        );
    }
    let setup = Instant::now();
    let mut sessions: Vec<Sess<F>> = Vec::with_capacity(n);
    let mut session_cores: Vec<Vec<CltCore<F>>> = Vec::with_capacity(n);
    for (i, sock) in ctl_socks.into_iter().enumerate() {
        let mut c = cfg.clone();
        if n > 1 {
            c.sessname = format!("{}-{i}", o.sessname);
        }
        let name = c.sessname.clone();
        let t = Instant::now();
        let opened = Client::open(fabric, c);
        let (clt, mut cores) = match opened {
            Ok(x) => x,
            Err(e) => {
                close_all(sessions, session_cores.into_iter().flatten().collect());
                return Err(if n == 1 {
                    e.to_string()
                } else {
                    format!("session {name} ({} of {n}): {e}", i + 1)
                });
            }
        };
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        let clt = Arc::new(clt);
        let ctl = match sock {
            Some(sock) => {
                let path = sock.path().display().to_string();
                let c = rtrs_ctl::client::serve_socket(sock, clt.clone())?;
                if o.progress && i == 0 {
                    eprintln!("rtrs-perf: control socket {path} (rtrs ctl --socket {path})");
                }
                Some(c)
            }
            None => None,
        };
        if o.bs > cores[0].max_io_size() {
            let e = format!(
                "--bs {} exceeds the server's max_io_size {}",
                o.bs,
                cores[0].max_io_size()
            );
            session_cores.push(cores);
            close_all(sessions, session_cores.into_iter().flatten().collect());
            return Err(e);
        }
        let rnbd = match &o.rnbd_device {
            Some(_) => Some(RnbdClient::new(
                &clt,
                cores[0].submitter().map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let events = EventLog::new(&clt, !o.progress, (n > 1).then_some(name.as_str()));
        sessions.push(Sess {
            name,
            clt,
            events,
            rnbd,
            dev: Arc::new(OnceLock::new()),
            ctl,
            open_ms,
            rnbd_open_ms: None,
            closed: false,
        });
        session_cores.push(cores);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<crate::progress::CoreCounts>> =
        Arc::new(o.cores.iter().map(|_| Default::default()).collect());
    // Thread k polls core k of every session.
    let mut per_thread: Vec<Vec<Lane<F>>> = o.cores.iter().map(|_| Vec::new()).collect();
    for (i, cores) in session_cores.into_iter().enumerate() {
        for (k, core) in cores.into_iter().enumerate() {
            let seed = 0x1234_5678 + k as u64 * 7919 + i as u64 * 104_729;
            per_thread[k].push(Lane::new(
                core,
                o,
                sessions[i].dev.clone(),
                i,
                k,
                slice_of(i),
                seed,
            ));
        }
    }
    let mut threads = Vec::new();
    for (k, lanes) in per_thread.into_iter().enumerate() {
        let log = core_logs[k].take();
        let (stop, measuring, progress) = (stop.clone(), measuring.clone(), progress.clone());
        let o2 = o.clone();
        let cpu = o.cores[k];
        threads.push(
            std::thread::Builder::new()
                .name(format!("rtrs-clt{k}"))
                .spawn(move || {
                    crate::pin(cpu)?;
                    o2.poll_sched
                        .apply()
                        .map_err(|e| format!("core {cpu}: --poll-sched {}: {e}", o2.poll_sched))?;
                    Ok::<_, String>(crate::lane::run_thread(
                        lanes,
                        &o2,
                        &stop,
                        &measuring,
                        &progress[k],
                        log,
                    ))
                })
                .map_err(|e| e.to_string())?,
        );
    }
    let stop_threads = |threads: Vec<std::thread::JoinHandle<Result<ThreadResult<F>, String>>>| {
        stop.store(true, Ordering::Relaxed);
        threads
            .into_iter()
            .filter_map(|t| t.join().ok().and_then(Result::ok))
            .flat_map(|r| r.lanes.into_iter().map(|(c, _)| c))
            .collect::<Vec<_>>()
    };
    // Admin IO goes through core 0's submitter: its thread polls it.
    let mut nap = || std::thread::sleep(Duration::from_micros(50));
    if let Some(tmpl) = &o.rnbd_device {
        for (i, s) in sessions.iter_mut().enumerate() {
            let Some(rn) = s.rnbd.as_mut() else { continue };
            let name = &rnbd_name(tmpl, &i.to_string());
            let t = Instant::now();
            let opened = rn.sess_info(&mut nap).and_then(|ver| {
                rn.open(name, rtrs_proto::rnbd::AccessMode::Rw, &mut nap)
                    .map(|d| (ver, d))
            });
            let refused = match opened {
                Ok((ver, d)) => {
                    if o.progress && s.dev.get().is_none() && n == 1 {
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
                        o.size
                                .filter(|&sz| sz > d.size())
                                .map(|sz| {
                                    format!(
                                "--size {sz} is larger than device {name} ({} bytes): give --size {} or less, \
                                 or no --size for the whole device",
                                d.size(),
                                d.size()
                            )
                                })
                                .or_else(|| {
                                    fits(o.size.unwrap_or(d.size()), &format!("device {name} of"))
                                        .err()
                                })
                    };
                    if refused.is_none() {
                        s.rnbd_open_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                        let _ = s.dev.set(d);
                    }
                    refused
                }
                Err(e) => Some(format!("RNBD open {name}: {e}")),
            };
            if let Some(e) = refused {
                // Refused before any IO: the cores wait for the device.
                let cores = stop_threads(threads);
                close_all(sessions, cores);
                return Err(e);
            }
        }
    }
    let setup_ms = setup.elapsed().as_secs_f64() * 1e3;
    let census_up = Census::take();
    if let Some(p) = &o.ready {
        if let Err(e) = std::fs::write(p, format!("{setup_ms:.1}\n")) {
            let cores = stop_threads(threads);
            close_all(sessions, cores);
            return Err(format!("--ready {}: {e}", p.display()));
        }
    }
    let churn_stop = AtomicBool::new(false);
    let churn_done = AtomicBool::new(o.churn_sessions == 0);
    let mut lines = crate::progress::Reader::default();
    let mut log_err = None;
    let (churn, seconds, started) = std::thread::scope(|scope| {
        let churn = (o.churn_sessions > 0).then(|| {
            let (cfg, churn_stop, churn_done) = (&cfg, &churn_stop, &churn_done);
            std::thread::Builder::new()
                .name("rtrs-churn".into())
                .spawn_scoped(scope, move || {
                    // Beside the IO threads, on the last of their CPUs.
                    if let Some(&cpu) = o.cores.last() {
                        let _ = crate::pin(cpu);
                    }
                    let _ = o.poll_sched.apply();
                    let s = crate::churn::run(fabric, o, cfg, slice_of(n), churn_stop);
                    churn_done.store(true, Ordering::Release);
                    s
                })
        });
        // The ramp: --ramp-time, and until every core has completed an IO
        // (a measured window never starts before IO flows: on a busy host
        // a session's first IO may take a while), at most WARM_MAX more.
        let warmup = Duration::from_secs_f64(o.ramp_time);
        let t0 = Instant::now();
        let warm = || progress.iter().all(crate::progress::CoreCounts::is_warm);
        while (t0.elapsed() < warmup || !warm())
            && t0.elapsed() < warmup + WARM_MAX
            && !crate::interrupted()
        {
            for s in sessions.iter_mut() {
                s.events.drain();
            }
            std::thread::sleep(rtrs_poll::sess::CONTROL_TICK);
        }
        let started = std::time::SystemTime::now();
        if let Some(l) = main_log.as_mut() {
            if let Err(e) = l.begin(started) {
                log_err.get_or_insert(e);
            }
        }
        measuring.store(true, Ordering::Relaxed);
        let start = Instant::now();
        let runtime = Duration::from_secs_f64(o.runtime);
        while (start.elapsed() < runtime || !churn_done.load(Ordering::Acquire))
            && !crate::interrupted()
            && log_err.is_none()
        {
            if let Some(Err(e)) = main_log.as_mut().map(|l| l.drain()) {
                log_err.get_or_insert(e);
            }
            for s in sessions.iter_mut() {
                s.events.drain();
                if let Some(rn) = s.rnbd.as_mut() {
                    for ev in rn.poll(&mut nap) {
                        s.events.push(&format!("rnbd: {ev:?}"));
                    }
                }
                if !s.closed && s.clt.paths().iter().all(|p| p.state() == PathState::Closed) {
                    // Out of reconnect attempts everywhere: nothing will carry its IO.
                    s.closed = true;
                    s.events.push("every path is closed");
                    eprintln!("session {}: every path is closed", s.name);
                }
            }
            if threads.iter().all(|t| t.is_finished()) {
                break;
            }
            if sessions.iter().all(|s| s.closed) {
                let line = if n == 1 {
                    "every path is closed: stopping"
                } else {
                    "every path of every session is closed: stopping"
                };
                if let Some(s) = sessions.first_mut() {
                    s.events.push(line);
                }
                break;
            }
            if o.progress {
                print_seconds(&mut lines, &progress, o.bs, &sessions);
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
        churn_stop.store(true, Ordering::Relaxed);
        let churn = churn.map(|h| match h.map(|h| h.join()) {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err("the churn thread panicked".to_string()),
            Err(e) => Err(format!("cannot start the churn thread: {e}")),
        });
        (churn, seconds, started)
    });
    stop.store(true, Ordering::Relaxed);
    let mut results: Vec<LaneResult> = Vec::new();
    let mut cores = Vec::new();
    let mut allocs = 0;
    let mut first_err = None;
    for t in threads {
        while !t.is_finished() {
            for s in sessions.iter_mut() {
                s.events.drain();
            }
            if let Some(Err(e)) = main_log.as_mut().map(|l| l.drain()) {
                log_err.get_or_insert(e);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match t.join() {
            Ok(Ok(r)) => {
                allocs += r.allocs;
                for (c, l) in r.lanes {
                    cores.push(c);
                    results.push(l);
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
    for s in sessions.iter_mut() {
        s.events.drain();
    }
    if o.progress {
        // The whole seconds the cores finished after the last look.
        print_seconds(&mut lines, &progress, o.bs, &sessions);
    }
    let churn = match churn {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            first_err.get_or_insert(e);
            None
        }
        None => None,
    };
    let census_end = Census::take();
    // Per session and per IO thread.
    let mut hist = histogram();
    let mut jobs: Vec<Job> = o
        .cores
        .iter()
        .map(|&cpu| Job {
            cpu,
            read: DirResult::new(),
            write: DirResult::new(),
            errors: 0,
            first_errno: None,
        })
        .collect();
    let mut per_session: Vec<SessionSummary> = sessions
        .iter()
        .map(|s| SessionSummary {
            name: s.name.clone(),
            open_ms: s.open_ms,
            rnbd_open_ms: s.rnbd_open_ms,
            memory_bytes: s.clt.memory_bytes(),
            io: IoFigures::default(),
            paths: s.clt.paths().iter().map(|p| path_summary(p)).collect(),
        })
        .collect();
    let mut io = IoFigures::default();
    let mut bytes = 0;
    for l in results {
        let _ = hist.add(&l.read.hist);
        let _ = hist.add(&l.write.hist);
        let j = &mut jobs[l.thread];
        let _ = j.read.hist.add(&l.read.hist);
        let _ = j.write.hist.add(&l.write.hist);
        j.read.ios += l.read.ios;
        j.read.bytes += l.read.bytes;
        j.write.ios += l.write.ios;
        j.write.bytes += l.write.bytes;
        j.errors += l.errors;
        if j.first_errno.is_none() {
            j.first_errno = l.first_errno;
        }
        if let Some(e) = &l.err {
            if l.ios == 0 {
                first_err.get_or_insert(e.clone());
            } else {
                eprintln!(
                    "session {} core {} stopped submitting: {e}",
                    sessions[l.session].name, l.thread
                );
            }
        }
        per_session[l.session].io.add_lane(&l);
        io.add_lane(&l);
        bytes += l.bytes;
    }
    if let Some(c) = &churn {
        // The churn's IO is verified IO of the run: its failures fail it.
        io.errors += c.errors;
        io.verify_failures += c.verify_failures;
        io.duplicates += c.duplicates;
        for (e, k) in &c.errors_by_errno {
            *io.errors_by_errno.entry(*e).or_default() += k;
        }
    }
    for (s, v) in sessions.iter().zip(per_session.iter_mut()) {
        let st = s.clt.stats();
        v.io.add_paths(&st);
        io.add_paths(&st);
    }
    let paths: Vec<PathSummary> = per_session.iter().flat_map(|s| s.paths.clone()).collect();
    let always_invalidate = sessions.first().is_some_and(|s| s.clt.always_invalidate());
    let mut events_out = Vec::new();
    for s in sessions.iter_mut() {
        events_out.append(&mut s.events.lines);
    }
    events_out.push(format!("event {} run over: closing the session", wall()));
    let dev_size = sessions.first().and_then(|s| s.dev.get().map(|d| d.size()));
    close_all(sessions, cores);
    let census_closed = Census::take();
    if let Some(l) = main_log {
        if let Err(e) = l.finish() {
            log_err.get_or_insert(e);
        }
    }
    if io.ios == 0 {
        return Err(first_err.unwrap_or_else(|| "no IO completed".into()));
    }
    if let Some(e) = log_err {
        return Err(e);
    }
    let ios = io.ios;
    Ok(Summary {
        iops: ios as f64 / seconds,
        bw_bytes: bytes as f64 / seconds,
        io,
        events: events_out,
        paths,
        lat_ns: LatNs::from_hist(&hist),
        config: ClientOpts {
            // The size the offsets covered.
            size: Some(o.size.or(dev_size).unwrap_or(DEFAULT_SIZE)),
            ..o.clone()
        },
        seconds,
        always_invalidate,
        allocs_per_io: crate::COUNTING.then(|| allocs as f64 / ios as f64),
        setup_ms,
        sessions: per_session,
        churn,
        census: CensusPoints {
            start: census_start,
            up: census_up,
            end: census_end,
            closed: census_closed,
        },
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
            self.io.ios,
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
            self.io.errors,
            self.io.errors_by_errno,
            self.io.verify_failures,
            self.io.duplicates,
            self.io.failovers,
            self.io.path_downs,
            self.io.reconnects,
            self.io.stalled_secs
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
