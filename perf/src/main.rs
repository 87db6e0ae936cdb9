//! rtrs-perf: IOPS and latency benchmarks for rtrs-poll.
//!
//! ```text
//!  rtrs-perf fabric-lat --fabric shm|tcp --size B --iters N [--json]   fabric round trips
//!  rtrs-perf fabric-bw  --fabric shm|tcp --size B --iters N [--json]   fabric streaming
//! ```

mod fabric_bench;
mod floor;
mod report;

use clap::{Parser, Subcommand, ValueEnum};
use fabric_bench::{Opts, Test};
use rtrs_poll::fabric::soft::shm::ShmFabric;
use rtrs_poll::fabric::soft::tcp::TcpFabric;
use rtrs_poll::fabric::{Address, Memory};
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
    #[arg(long, default_value = "0,1", value_parser = parse_cores)]
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
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// RDMA WRITE_WITH_IMM ping-pong between two pinned processes (like ib_write_lat).
    FabricLat(FabricArgs),
    /// RDMA WRITE_WITH_IMM streaming between two pinned processes (like ib_write_bw).
    FabricBw(FabricArgs),
    /// The hardware floor: a cache line, and SIZE copied bytes, bounced between two cores.
    Floor {
        /// Bytes each side copies per round trip (0: one cache line only).
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(0..=(16 << 20)))]
        size: u32,
        /// Measured round trips.
        #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
        iters: u64,
        /// The two cores, e.g. 0,1.
        #[arg(long, default_value = "0,1", value_parser = parse_cores)]
        cores: Cores,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A list of core ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cores(pub Vec<usize>);

fn parse_cores(s: &str) -> Result<Cores, String> {
    let v: Result<Vec<usize>, _> = s.split(',').map(|c| c.trim().parse::<usize>()).collect();
    match v {
        Ok(v) if !v.is_empty() => Ok(Cores(v)),
        _ => Err(format!("bad core list {s:?}: expected e.g. 0,1")),
    }
}

/// Pins the calling thread to `core`, warning when that is not possible.
pub fn pin(core: usize) {
    // Not through get_core_ids(): it lists the calling thread's current mask,
    // which a thread spawned by an already pinned one inherits.
    let ok = core_affinity::set_for_current(core_affinity::CoreId { id: core });
    if !ok {
        eprintln!("warning: could not pin to core {core}; running unpinned");
    }
}

/// Shareable memory for registrations (the shm fabric needs a memfd).
pub fn shareable(len: usize) -> Result<Arc<dyn Memory>, String> {
    rtrs_poll::fabric::memory::shareable(len).map_err(|e| e.to_string())
}

fn free_tcp_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn run_fabric(test: Test, a: FabricArgs) -> Result<(), String> {
    let addr = match (&a.addr, a.fabric) {
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
        return with_fabric(&addr, |f| f.server(&addr, &opts));
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
                &format!("{server_core},{server_core}"),
            ])
            .spawn()
            .map_err(|e| format!("cannot start the server process: {e}"))?;
        Some(child)
    } else {
        None
    };
    let r = with_fabric(&addr, |f| f.client(&addr, &opts));
    if let Some(mut c) = child {
        let _ = c.wait();
    }
    let v = r?;
    if a.json {
        println!("{v}");
    }
    Ok(())
}

/// Runs `f` with the backend the address selects.
fn with_fabric<R>(
    addr: &Address,
    f: impl FnOnce(AnyFabric) -> Result<R, String>,
) -> Result<R, String> {
    match addr {
        Address::Shm(_) => f(AnyFabric::Shm(ShmFabric::new())),
        Address::Tcp { .. } => f(AnyFabric::Tcp(TcpFabric::new())),
        other => Err(format!(
            "the {} backend is not built into this rtrs-perf",
            other.scheme()
        )),
    }
}

enum AnyFabric {
    Shm(ShmFabric),
    Tcp(TcpFabric),
}

impl AnyFabric {
    fn server(self, addr: &Address, o: &Opts) -> Result<(), String> {
        match self {
            AnyFabric::Shm(f) => fabric_bench::server(f, addr, o),
            AnyFabric::Tcp(f) => fabric_bench::server(f, addr, o),
        }
    }
    fn client(self, addr: &Address, o: &Opts) -> Result<serde_json::Value, String> {
        match self {
            AnyFabric::Shm(f) => fabric_bench::client(f, addr, o),
            AnyFabric::Tcp(f) => fabric_bench::client(f, addr, o),
        }
    }
}

fn run_floor(size: usize, iters: u64, cores: &Cores, json: bool) -> Result<(), String> {
    let c = (cores.0[0], *cores.0.get(1).unwrap_or(&cores.0[0]));
    let line = floor::ping_pong(0, iters, c)?;
    let copy = floor::ping_pong(size, iters, c)?;
    if json {
        let v = serde_json::json!({"test": "floor", "size": size, "line_rtt_ns": line, "copy_rtt_ns": copy});
        println!("{v}");
    } else {
        println!(
            "floor: cache line ping-pong RTT ns p50 {} p99 {}",
            line.p50, line.p99
        );
        println!(
            "floor: ping-pong moving {size} B as fabric-lat does, RTT ns p50 {} p99 {}",
            copy.p50, copy.p99
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::FabricLat(a)) => run_fabric(Test::Lat, a),
        Some(Cmd::FabricBw(a)) => run_fabric(Test::Bw, a),
        Some(Cmd::Floor {
            size,
            iters,
            cores,
            json,
        }) => run_floor(size as usize, iters, &cores, json),
        None => match Cli::try_parse_from(["rtrs-perf", "fabric-lat"]) {
            Ok(Cli {
                cmd: Some(Cmd::FabricLat(a)),
            }) => run_fabric(Test::Lat, a),
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
