//! rtrs-perf: IOPS and latency benchmarks for rtrs-poll.
//!
//! ```text
//!  rtrs-perf [--json]                       the main job: embedded server + client over shm,
//!                                           4 KiB writes at QD 32 for 5 s, fio-like summary
//!  rtrs-perf server --listen ADDR [--backend null|ram:SIZE|fail:N] [--cores LIST] [--always-invalidate on|off]
//!  rtrs-perf client --connect ADDR[,ADDR] --rw R --bs B --iodepth N --cores LIST --runtime S
//!                   [--numjobs N] [--ramp-time S] [--number-ios N] [--rwmixread N] [--sessname NAME]
//!                   [--mp-policy P] [--verify] [--json] [--hist FILE] [--ctl SOCKET]
//!                   [--connections N] [--sessions N] [--churn-sessions N] [--ready FILE]
//!                   [--reconnect-delay S] [--reconnect-backoff S]
//!  rtrs-perf plot LOG... [--out FILE.svg] [--tag read|write]   percentiles of --hist logs
//!  rtrs-perf fabric-lat --fabric shm|tcp --size B --iters N [--json]   fabric round trips
//!  rtrs-perf fabric-bw  --fabric shm|tcp --size B --iters N [--json]   fabric streaming
//!  rtrs-perf hostile --target tcp:IP:PORT --attack NAME [--secs S] [--count N]   a hostile peer
//! ```

/// `println!` that survives a closed stdout (`rtrs-perf ... | head`): the
/// line is dropped and the run goes on to its normal end (its children are
/// still stopped by PID), where `println!` would panic on EPIPE.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("rtrs-perf: stdout: {e}");
            }
        }
    }};
}

mod churn;
mod cores;
mod engine_bench;
mod fabric_bench;
mod fio;
mod floor;
mod histlog;
mod hostile;
mod ibdev;
mod lane;
mod plot;
mod progress;
mod report;

use clap::{Parser, Subcommand, ValueEnum};
use fabric_bench::{Opts, Test};
use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::{with_backend, Address, Backends, Fabric, Memory, OnFabric};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "rtrs-perf",
    version,
    about = "IOPS and latency benchmarks for rtrs-poll"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// With no subcommand: print the main job's summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Counts heap allocations per thread, so the client cores can report
/// allocations per IO in steady state.
#[global_allocator]
static ALLOC: engine_bench::alloc_count::Counting = engine_bench::alloc_count::Counting;
/// Whether the counting allocator is installed (it is, above).
pub const COUNTING: bool = true;

static STOP: std::sync::OnceLock<pollers::Shutdown> = std::sync::OnceLock::new();

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    STOP.get().is_some_and(|s| s.is_set())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FabricKind {
    Shm,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    Client,
    Server,
}

#[derive(clap::Args, Debug, Clone)]
struct FabricArgs {
    /// Backend to measure (ignored when --addr is given).
    #[arg(long, value_enum, default_value = "shm")]
    fabric: FabricKind,
    /// Payload per message in bytes.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(0..=(64 << 20)))]
    size: u32,
    /// Measured iterations.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    iters: u64,
    /// Iterations before measuring.
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
    /// Outstanding messages (fabric-bw).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1024))]
    window: u32,
    /// Cores for the client and the server, e.g. 0,1.
    #[arg(long, default_value = "0,1", value_parser = cores::parse)]
    cores: Cores,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Run one side only (default: the client, which starts the server itself).
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// Address to listen on or connect to (default: a private one on this host).
    #[arg(long)]
    addr: Option<Address>,
    /// rdma: the RDMA device (as perftest's -d), e.g. rxe0: both sides use
    /// the address of its --ib-port and --gid-index (instead of --addr).
    #[arg(short = 'd', long)]
    ib_dev: Option<String>,
    /// rdma: the device's port.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    ib_port: u8,
    /// rdma: the GID index whose address to use (default: the port's first
    /// IPv4 GID, the RoCE v2 one).
    #[arg(long)]
    gid_index: Option<u32>,
}

#[derive(clap::Args, Debug, Clone)]
struct ServerArgs {
    /// Address(es) to listen on: shm:NAME or tcp:HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    listen: Vec<Address>,
    /// Storage behind the server: null, ram:SIZE (e.g. ram:1G), or fail:N
    /// (a fault injector: every Nth IO per connection fails with EIO).
    #[arg(long, default_value = "null", value_parser = engine_bench::parse_backend)]
    backend: engine_bench::Backend,
    /// Cores for the IO connections, e.g. 1 or 0,1.
    #[arg(long, default_value = "1", value_parser = cores::parse)]
    cores: Cores,
    /// Refresh each chunk's rkey after every IO (the kernel's default: on).
    #[arg(long, default_value = "on", value_parser = engine_bench::parse_on_off, action = clap::ArgAction::Set)]
    always_invalidate: bool,
    /// Chunks per session.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..))]
    queue_depth: u16,
    /// Bytes per chunk (a power of two >= 8192).
    #[arg(long, default_value = "128k", value_parser = engine_bench::parse_size)]
    chunk_size: u64,
    #[command(flatten)]
    hb: HbArgs,
    /// tcp: admit only clients that prove they hold this pre-shared key
    /// (a file of at least 16 bytes, mode 600).
    #[arg(long)]
    auth_key: Option<std::path::PathBuf>,
    /// Source networks that may connect (CIDR, comma-separated; empty:
    /// any). A tcp listener other hosts reach needs this, --auth-key or
    /// --insecure.
    #[arg(long, value_delimiter = ',')]
    allow: Vec<ipnet::IpNet>,
    /// Serve a tcp address other hosts reach to any host (no --allow, no
    /// --auth-key): logged as INSECURE.
    #[arg(long)]
    insecure: bool,
}

#[derive(clap::Args, Debug, Clone)]
struct HbArgs {
    /// Heartbeat interval in milliseconds (the kernel's: 5000).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    hb_interval_ms: u64,
    /// Missed heartbeats before a path is dead (the kernel's: 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    hb_missed: u32,
}

#[derive(clap::Args, Debug, Clone)]
struct ClientArgs {
    /// Server address(es), one path each: shm:NAME or tcp:HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    connect: Vec<Address>,
    /// Offer the session's control socket at PATH for the run (`rtrs ctl
    /// --socket PATH list paths | stats | add-path | remove-path |
    /// disconnect | reconnect | mp-policy`; mode 0600, removed at exit).
    /// With --sessions N > 1, session i's is PATH.i.
    #[arg(long)]
    ctl: Option<std::path::PathBuf>,
    /// Connections per path, cid 0 included (the kernel's client makes
    /// nr_cpus + 1): at least one per core and cid 0, at most 4096; with
    /// more than the cores, each core sends on its connections in turn.
    /// Default: one per core, and cid 0.
    #[arg(long)]
    connections: Option<u32>,
    /// Sessions of the same paths in this process (1 to 1024), named
    /// SESSNAME-0 .. SESSNAME-(N-1) when more than one: core k of every
    /// session is polled by the one thread of `--cores[k]`, in turn (N
    /// sessions on 2 cores are 2 busy threads); each session's IO stays in
    /// its own slice of the device; the JSON has each session's figures.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    sessions: u32,
    /// Beside them, open and close this many sessions one after another
    /// (SESSNAME-churnJ, one core, on a thread of their own beside the IO
    /// threads), each with at least 64 verified IOs in a slice of its own;
    /// the run lasts until they are done (at least --runtime).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    churn_sessions: u32,
    /// Write this file once every session (and its RNBD device) is open,
    /// before IO is measured: what a script waits for.
    #[arg(long)]
    ready: Option<std::path::PathBuf>,
    #[command(flatten)]
    io: IoArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct IoArgs {
    /// IO pattern.
    #[arg(long, value_enum, default_value = "randwrite")]
    rw: engine_bench::Rw,
    /// Bytes per IO (e.g. 4k).
    #[arg(long, default_value = "4k", value_parser = engine_bench::parse_size)]
    bs: u64,
    /// IOs in flight per core.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65535))]
    iodepth: u32,
    /// Client cores, e.g. 0, 0,1, 0-3 or 0-1,3 (one IO thread each).
    #[arg(long, default_value = "0", value_parser = cores::parse)]
    cores: Cores,
    /// IO threads (fio's jobs): the first N of --cores (default: all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    numjobs: Option<u32>,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Stop once this many IOs completed while measuring (fio's
    /// number_ios), or at --runtime, whichever comes first.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    number_ios: Option<u64>,
    /// Seconds of IO before measuring, not counted (default: a tenth of
    /// --runtime, at most 1).
    #[arg(long)]
    ramp_time: Option<f64>,
    /// randrw: percent of IOs that read.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: u32,
    /// The session name the server sees.
    #[arg(long, default_value = "rtrs-perf")]
    sessname: String,
    /// Path selection: round-robin, min-inflight or min-latency.
    #[arg(long, default_value = "min-inflight")]
    mp_policy: rtrs_poll::sess::mp_policy::MpPolicy,
    /// Read buffer keys: session (keyed once) or per-io (re-keyed and
    /// invalidated per read, as the kernel client).
    #[arg(long, default_value = "session")]
    read_keys: rtrs_poll::clt::ReadKeys,
    /// How the IO threads are scheduled: normal, or idle (SCHED_IDLE: kernel
    /// work on their CPUs -- soft-RoCE's tasklets, a NIC's softirqs -- runs
    /// first; for cores that are not isolated).
    #[arg(long, default_value = "normal")]
    poll_sched: pollers::CoreSched,
    /// Device size the offsets cover (default: the whole device with
    /// --rnbd-device, else 1G). Larger than the RNBD device: an error.
    #[arg(long, value_parser = engine_bench::parse_size)]
    size: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write the latency histogram to FILE (HdrHistogram interval log).
    #[arg(long)]
    hist: Option<std::path::PathBuf>,
    /// Speak RNBD to this device of an RNBD server (`rtrs serve`, or the
    /// kernel's rnbd-server): sess_info, open, then IO on it. With
    /// --sessions or --churn-sessions each session opens its own (one
    /// writer a device): `{}` in the name is the session's index (`churn`
    /// for the churn's), e.g. 'd{}'.
    #[arg(long)]
    rnbd_device: Option<String>,
    /// Write a checked pattern and check every block read back (as fio's
    /// --verify); a mismatch counts in "errors".
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    hb: HbArgs,
    /// Seconds before a failed path's reconnect attempt (RNBD's: 30).
    #[arg(long, default_value_t = 30.0)]
    reconnect_delay: f64,
    /// Seconds each reconnect attempt sleeps before it connects, after the
    /// delay (the kernel's RTRS_RECONNECT_BACKOFF: 1; also after `rtrs ctl
    /// reconnect`, which skips the delay).
    #[arg(long, default_value_t = 1.0)]
    reconnect_backoff: f64,
    /// Reconnect attempts before a path closes for good; -1: forever.
    #[arg(long, default_value_t = -1, value_parser = clap::value_parser!(i32).range(-1..=9999))]
    max_reconnect_attempts: i32,
    /// Seconds each connection (and the INFO exchange) may take.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// tcp: prove this pre-shared key to the server, and have it prove it
    /// (a file of at least 16 bytes, mode 600).
    #[arg(long)]
    auth_key: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct HostileArgs {
    /// The server: tcp:HOST:PORT.
    #[arg(long)]
    target: Address,
    /// The attack (see docs/security.md, "Hostile peers").
    #[arg(long, value_enum)]
    attack: hostile::Attack,
    /// Seconds the attack lasts (it holds what it opened until then).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Connections or sessions the attack opens and holds (squat,
    /// conn-flood, idle-flood, slowloris; truncated: its stalled ones).
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// idle-flood: IO connections per session.
    #[arg(long, default_value_t = 64)]
    cons: usize,
    /// ro-write: the RNBD device to open read-only.
    #[arg(long, default_value = "ram0")]
    device: String,
    /// Print one JSON object instead of the summary line.
    #[arg(long)]
    json: bool,
    /// Continuous attacks: connections or messages per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// A file written once the attack is in place.
    #[arg(long)]
    ready: Option<std::path::PathBuf>,
    /// The attack ends when this file appears (or after --secs).
    #[arg(long)]
    stop_file: Option<std::path::PathBuf>,
    /// Sessions prove this pre-shared key (wrong-key: another one than the
    /// server's).
    #[arg(long)]
    auth_key: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A hostile peer: attacks a tcp server and says what it saw.
    Hostile(HostileArgs),
    /// Serve RTRS sessions until Ctrl-C.
    Server(ServerArgs),
    /// Run IO against a server and report IOPS and latency.
    Client(ClientArgs),
    /// The main job with options: an embedded server and client over shm.
    Embedded {
        #[command(flatten)]
        io: IoArgs,
        /// The server's core.
        #[arg(long, default_value_t = 1)]
        server_core: usize,
        /// The server's always_invalidate.
        #[arg(long, default_value = "on", value_parser = engine_bench::parse_on_off, action = clap::ArgAction::Set)]
        always_invalidate: bool,
    },
    /// RDMA WRITE_WITH_IMM ping-pong between two pinned processes (like ib_write_lat).
    FabricLat(FabricArgs),
    /// RDMA WRITE_WITH_IMM streaming between two pinned processes (like ib_write_bw).
    FabricBw(FabricArgs),
    /// Percentile plot (SVG) and figures of one or more --hist interval logs.
    Plot {
        /// Interval logs; several are drawn side by side.
        #[arg(required = true)]
        logs: Vec<std::path::PathBuf>,
        /// Write the plot here (SVG); without it only the figures print.
        #[arg(long, short)]
        out: Option<std::path::PathBuf>,
        /// Only intervals with this tag (read or write); default: each tag its line.
        #[arg(long)]
        tag: Option<String>,
        /// The plot's title.
        #[arg(long, default_value = "rtrs-perf latency by percentile")]
        title: String,
    },
    /// The hardware floor: a cache line, and SIZE copied bytes, bounced between two cores.
    Floor {
        /// Bytes each side copies per round trip (0: one cache line only).
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(0..=(16 << 20)))]
        size: u32,
        /// Measured round trips.
        #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
        iters: u64,
        /// The two cores, e.g. 0,1.
        #[arg(long, default_value = "0,1", value_parser = cores::parse)]
        cores: Cores,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub use cores::{pin, Cores};

/// Shareable memory for registrations (the shm fabric needs a memfd).
pub fn shareable(len: usize) -> Result<Arc<dyn Memory>, String> {
    rtrs_fabric::memory::shareable(len).map_err(|e| e.to_string())
}

fn free_tcp_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn run_fabric(test: Test, a: FabricArgs) -> Result<(), String> {
    let addr = match (&a.addr, a.fabric) {
        _ if a.ib_dev.is_some() && a.addr.is_some() => {
            return Err("--ib-dev and --addr both name the address: give one".into())
        }
        (None, _) if a.ib_dev.is_some() => {
            let dev = a.ib_dev.as_deref().unwrap_or_default();
            let root = std::path::Path::new("/sys/class/infiniband");
            let ip = ibdev::pick(root, dev, a.ib_port, a.gid_index)?;
            Address::Rdma {
                host: ip.to_string(),
                port: free_tcp_port()?,
            }
        }
        _ if a.gid_index.is_some() || a.ib_port != 1 => {
            return Err("--ib-port and --gid-index go with --ib-dev".into())
        }
        (Some(addr), _) => addr.clone(),
        (None, FabricKind::Shm) => Address::Shm(format!("rtrs-perf-{}", std::process::id())),
        (None, FabricKind::Tcp) => Address::Tcp {
            host: "127.0.0.1".into(),
            port: free_tcp_port()?,
        },
    };
    let core_of = |i: usize| a.cores.0.get(i).or(a.cores.0.last()).copied();
    let mut opts = Opts {
        test,
        size: a.size as usize,
        iters: a.iters,
        warmup: a.warmup,
        window: a.window,
        json: a.json,
        core: core_of(0),
    };
    if a.role == Some(Role::Server) {
        opts.core = core_of(if a.addr.is_some() { 0 } else { 1 });
        return on_fabric(&addr, None, FabricServer(&addr, &opts));
    }
    let child = if a.role.is_none() {
        let sub = if test == Test::Lat {
            "fabric-lat"
        } else {
            "fabric-bw"
        };
        let server_core = core_of(1).unwrap_or(1);
        let child = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args([
                sub,
                "--role",
                "server",
                "--addr",
                &addr.to_string(),
                "--size",
                &a.size.to_string(),
                "--window",
                &a.window.to_string(),
                "--cores",
                &server_core.to_string(),
            ])
            .spawn()
            .map_err(|e| format!("cannot start the server process: {e}"))?;
        Some(child)
    } else {
        None
    };
    let r = on_fabric(&addr, None, FabricClient(&addr, &opts));
    if let Some(mut c) = child {
        if r.is_err() {
            // The client did not finish (interrupted, or failed): the
            // server child would busy-poll on; stop it by its PID.
            if let Err(e) = c.kill() {
                eprintln!("stopping the server process {}: {e}", c.id());
            }
        }
        if let Err(e) = c.wait() {
            eprintln!("waiting for the server process {}: {e}", c.id());
        }
    }
    let v = r?;
    if a.json {
        outln!("{v}");
    }
    Ok(())
}

/// Runs `job` on the fabric `addr` names; tcp proves `auth_key` when given.
fn on_fabric<R, J: OnFabric<Output = Result<R, String>>>(
    addr: &Address,
    auth_key: Option<&std::path::Path>,
    job: J,
) -> Result<R, String> {
    let mut backends = Backends::default();
    match (addr, auth_key) {
        (Address::Tcp { .. }, Some(path)) => {
            backends.tcp = backends.tcp.with_auth_key_file(path)?;
        }
        (_, Some(_)) => return Err("--auth-key applies to tcp addresses only".into()),
        (_, None) => {}
    }
    with_backend(addr, &backends, job).map_err(|e| e.to_string())?
}

/// The fabric benchmark's server, on any fabric.
struct FabricServer<'a>(&'a Address, &'a Opts);

impl OnFabric for FabricServer<'_> {
    type Output = Result<(), String>;
    fn run<F: Fabric>(self, fabric: F) -> Self::Output {
        fabric_bench::server(fabric, self.0, self.1)
    }
}

/// The fabric benchmark's client, on any fabric.
struct FabricClient<'a>(&'a Address, &'a Opts);

impl OnFabric for FabricClient<'_> {
    type Output = Result<serde_json::Value, String>;
    fn run<F: Fabric>(self, fabric: F) -> Self::Output {
        fabric_bench::client(fabric, self.0, self.1)
    }
}

/// The engine benchmark's client, on any fabric.
struct EngineClient<'a>(&'a engine_bench::ClientOpts);

impl OnFabric for EngineClient<'_> {
    type Output = Result<engine_bench::Summary, String>;
    fn run<F: Fabric>(self, fabric: F) -> Self::Output {
        engine_bench::run_client(&fabric, self.0)
    }
}

/// The engine benchmark's server, on any fabric.
struct EngineServer<'a> {
    a: &'a ServerArgs,
    cfg: rtrs_poll::srv::SrvConfig,
}

impl OnFabric for EngineServer<'_> {
    type Output = Result<engine_bench::PerfServer, String>;
    fn run<F: Fabric>(self, fabric: F) -> Self::Output {
        let a = self.a;
        engine_bench::PerfServer::start(
            fabric,
            a.listen.clone(),
            a.backend.clone(),
            a.cores.0.clone(),
            self.cfg,
        )
    }
}

fn run_floor(size: usize, iters: u64, cores: &Cores, json: bool) -> Result<(), String> {
    let c = (cores.0[0], *cores.0.get(1).unwrap_or(&cores.0[0]));
    let line = floor::ping_pong(0, iters, c)?;
    let copy = floor::ping_pong(size, iters, c)?;
    if json {
        let v = serde_json::json!({"test": "floor", "size": size, "line_rtt_ns": line, "copy_rtt_ns": copy});
        outln!("{v}");
    } else {
        outln!(
            "floor: cache line ping-pong RTT ns p50 {} p99 {}",
            line.p50,
            line.p99
        );
        outln!(
            "floor: ping-pong moving {size} B as fabric-lat does, RTT ns p50 {} p99 {}",
            copy.p50,
            copy.p99
        );
    }
    Ok(())
}

fn io_opts(
    addrs: Vec<Address>,
    a: &IoArgs,
    progress: bool,
) -> Result<engine_bench::ClientOpts, String> {
    if a.runtime <= 0.0 || !a.runtime.is_finite() {
        return Err(format!(
            "--runtime {} must be a positive number of seconds",
            a.runtime
        ));
    }
    let bs = u32::try_from(a.bs).map_err(|_| format!("--bs {} is too large", a.bs))?;
    if !(a.connect_timeout > 0.0 && a.connect_timeout.is_finite()) {
        return Err(format!(
            "--connect-timeout {} must be a positive number of seconds",
            a.connect_timeout
        ));
    }
    if !(a.reconnect_delay >= 0.0 && a.reconnect_delay.is_finite()) {
        return Err(format!(
            "--reconnect-delay {} must be a number of seconds >= 0",
            a.reconnect_delay
        ));
    }
    if !(a.reconnect_backoff >= 0.0 && a.reconnect_backoff.is_finite()) {
        return Err(format!(
            "--reconnect-backoff {} must be a number of seconds >= 0",
            a.reconnect_backoff
        ));
    }
    if let Some(size) = a.size.filter(|&s| s < a.bs) {
        return Err(format!("--size {size} is smaller than --bs {}", a.bs));
    }
    let ramp_time = a.ramp_time.unwrap_or((a.runtime / 10.0).min(1.0));
    if !(ramp_time >= 0.0 && ramp_time.is_finite()) {
        return Err(format!(
            "--ramp-time {ramp_time} must be a number of seconds >= 0"
        ));
    }
    let mut cores = a.cores.0.clone();
    if let Some(n) = a.numjobs {
        if n as usize > cores.len() {
            return Err(format!(
                "--numjobs {n} needs as many --cores, got {} ({})",
                cores.len(),
                cores::compact(&cores)
            ));
        }
        cores.truncate(n as usize);
    }
    if a.rwmixread != 50 && a.rw != engine_bench::Rw::Randrw {
        return Err(format!(
            "--rwmixread applies to --rw randrw, not {}",
            format!("{:?}", a.rw).to_lowercase()
        ));
    }
    if a.sessname.is_empty() || a.sessname.len() > 64 {
        return Err(format!("--sessname {:?} must be 1 to 64 bytes", a.sessname));
    }
    Ok(engine_bench::ClientOpts {
        addrs,
        rw: a.rw,
        bs,
        iodepth: a.iodepth,
        cores,
        runtime: a.runtime,
        number_ios: a.number_ios,
        mp_policy: a.mp_policy,
        read_keys: a.read_keys,
        poll_sched: a.poll_sched,
        size: a.size,
        progress,
        ctl: None,
        always_invalidate: None,
        rnbd_device: a.rnbd_device.clone(),
        verify: a.verify,
        hb_interval: std::time::Duration::from_millis(a.hb.hb_interval_ms),
        hb_missed: a.hb.hb_missed,
        connect_timeout: std::time::Duration::from_secs_f64(a.connect_timeout),
        reconnect: rtrs_poll::clt::ReconnectPolicy {
            delay: std::time::Duration::from_secs_f64(a.reconnect_delay),
            max_attempts: a.max_reconnect_attempts,
            backoff: std::time::Duration::from_secs_f64(a.reconnect_backoff),
        },
        rwmixread: a.rwmixread,
        ramp_time,
        sessname: a.sessname.clone(),
        hist: a.hist.clone(),
        connections: None,
        sessions: 1,
        churn_sessions: 0,
        ready: None,
    })
}

/// `--connections N` for `cores` IO cores: cid 0 and at least one IO
/// connection per core, at most the protocol's 4096.
fn connections(n: Option<u32>, cores: usize) -> Result<Option<u16>, String> {
    let Some(n) = n else { return Ok(None) };
    let max = u32::from(rtrs_proto::MAX_CID_NUM);
    let min = cores as u32 + 1;
    if n < min || n > max {
        return Err(format!(
            "--connections {n}: a path has cid 0 and at least one IO connection per core: \
             {min} to {max} with {cores} core{}",
            if cores == 1 { "" } else { "s" }
        ));
    }
    Ok(Some(n as u16))
}

fn report(s: &engine_bench::Summary, json: bool) -> Result<(), String> {
    if json {
        outln!("{}", fio::json(s)?);
    } else {
        s.print();
    }
    if s.io.errors > 0 {
        // fio's rule: a run with failed IO or a verify mismatch fails.
        return Err(format!(
            "{} IOs failed, first errno {} ({:?} by errno; 0 = verify mismatch or a second completion)",
            s.io.errors,
            fio::first_errno(s),
            s.io.errors_by_errno
        ));
    }
    Ok(())
}

fn run_client(a: ClientArgs) -> Result<(), String> {
    let mut o = io_opts(a.connect.clone(), &a.io, !a.io.json)?;
    o.ctl = a.ctl.clone();
    o.connections = connections(a.connections, o.cores.len())?;
    o.sessions = a.sessions;
    o.churn_sessions = a.churn_sessions;
    o.ready = a.ready.clone();
    let s = on_fabric(&a.connect[0], a.io.auth_key.as_deref(), EngineClient(&o))?;
    report(&s, a.io.json)
}

fn srv_config(
    queue_depth: u16,
    chunk: u64,
    always_invalidate: bool,
    hb: &HbArgs,
) -> Result<rtrs_poll::srv::SrvConfig, String> {
    let cfg = rtrs_poll::srv::SrvConfig {
        queue_depth,
        max_chunk_size: u32::try_from(chunk)
            .map_err(|_| format!("--chunk-size {chunk} is too large"))?,
        always_invalidate,
        hb_interval: std::time::Duration::from_millis(hb.hb_interval_ms),
        hb_missed_max: hb.hb_missed,
        ..Default::default()
    };
    cfg.layout().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn run_server(a: ServerArgs) -> Result<(), String> {
    let mut cfg = srv_config(a.queue_depth, a.chunk_size, a.always_invalidate, &a.hb)?;
    cfg.limits.allow = a.allow.clone();
    cfg.limits.insecure = a.insecure;
    let srv = on_fabric(
        &a.listen[0],
        a.auth_key.as_deref(),
        EngineServer { a: &a, cfg },
    )?;
    eprintln!(
        "serving on {} (backend {:?}, cores {:?}, always_invalidate {}); Ctrl-C stops",
        a.listen
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(","),
        a.backend,
        a.cores.0,
        if a.always_invalidate { "on" } else { "off" }
    );
    while !interrupted() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    srv.stop()
}

/// The main job: a server on one core and a client on another, over shm.
fn run_embedded(
    io: &IoArgs,
    server_core: usize,
    always_invalidate: bool,
    json: bool,
) -> Result<(), String> {
    let addr = Address::Shm(format!("rtrs-perf-main-{}", std::process::id()));
    let cfg = srv_config(512, 128 << 10, always_invalidate, &io.hb)?;
    let srv = engine_bench::PerfServer::start(
        ShmFabric::new(),
        vec![addr.clone()],
        engine_bench::Backend::Null,
        vec![server_core],
        cfg,
    )?;
    let mut o = io_opts(vec![addr], io, !json)?;
    o.always_invalidate = Some(always_invalidate);
    if !json {
        eprintln!(
            "rtrs-perf: embedded server (core {server_core}) and client (cores {:?}) over shm: {:?} bs={} iodepth={} for {} s",
            o.cores, o.rw, o.bs, o.iodepth, o.runtime
        );
    }
    let r = engine_bench::run_client(&ShmFabric::new(), &o);
    srv.stop()?;
    report(&r?, json)
}

fn main() -> ExitCode {
    // The library's logs (refusals, path changes, fallbacks): RUST_LOG
    // sets the level, warnings by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if let Ok(s) = pollers::Shutdown::on_ctrlc() {
        let _ = STOP.set(s);
    }
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Server(a)) => run_server(a),
        Some(Cmd::Client(a)) => run_client(a),
        Some(Cmd::Hostile(a)) => hostile::run(&hostile::Opts {
            target: a.target,
            attack: a.attack,
            secs: a.secs,
            count: a.count,
            cons: a.cons,
            device: a.device,
            json: a.json,
            rate: a.rate,
            ready: a.ready,
            stop_file: a.stop_file,
            auth_key: a.auth_key,
        }),
        Some(Cmd::Embedded {
            io,
            server_core,
            always_invalidate,
        }) => run_embedded(&io, server_core, always_invalidate, io.json),
        Some(Cmd::Plot {
            logs,
            out,
            tag,
            title,
        }) => plot::run(&logs, out.as_deref(), tag.as_deref(), &title),
        Some(Cmd::FabricLat(a)) => run_fabric(Test::Lat, a),
        Some(Cmd::FabricBw(a)) => run_fabric(Test::Bw, a),
        Some(Cmd::Floor {
            size,
            iters,
            cores,
            json,
        }) => run_floor(size as usize, iters, &cores, json),
        None => match Cli::try_parse_from(["rtrs-perf", "embedded", "--rw", "write"]) {
            Ok(Cli {
                cmd:
                    Some(Cmd::Embedded {
                        io,
                        server_core,
                        always_invalidate,
                    }),
                ..
            }) => run_embedded(&io, server_core, always_invalidate, cli.json),
            _ => Err("default arguments do not parse".into()),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtrs-perf: {e}");
            ExitCode::FAILURE
        }
    }
}
