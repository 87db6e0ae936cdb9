//! rtrs: the operator CLI.
//!
//! ```text
//!  rtrs serve --listen ADDR[,ADDR] --export NAME=ram:SIZE [--export NAME=file:PATH]
//!             [--cores LIST] [--always-invalidate on|off] [--queue-depth N] [--chunk-size BYTES]
//! ```
//! `serve` is an RNBD server over RTRS, as the kernel's rnbd-server: the
//! kernel's rnbd-client maps its exports with `map_device`.

use clap::{Parser, Subcommand};
use minstant::Instant;
use rtrs_poll::fabric::soft::shm::ShmFabric;
use rtrs_poll::fabric::soft::tcp::TcpFabric;
use rtrs_poll::fabric::{Address, Fabric};
use rtrs_poll::rnbd::{Export, RnbdServer};
use rtrs_poll::srv::{CorePool, Server, SrvConfig};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "rtrs", version, about = "rtrs-poll's operator CLI")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve RNBD devices over RTRS until Ctrl-C.
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address(es) to listen on: shm:NAME, tcp:HOST:PORT or rdma:HOST:PORT.
    #[arg(long, value_delimiter = ',', required = true)]
    listen: Vec<Address>,
    /// A device to export: NAME=ram:SIZE (e.g. ram0=ram:1G) or NAME=file:PATH.
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
    /// Cores for the IO connections, e.g. 1 or 0,1.
    #[arg(long, default_value = "0", value_delimiter = ',')]
    cores: Vec<usize>,
    /// Refresh each chunk's rkey after every IO (the kernel's default: on).
    #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    always_invalidate: bool,
    /// Chunks per session (the kernel's sess_queue_depth).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..))]
    queue_depth: u16,
    /// Bytes per chunk (the kernel's max_chunk_size: a power of two >= 8192).
    #[arg(long, default_value_t = 128 << 10)]
    chunk_size: u32,
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "1" | "true" | "yes" | "Y" => Ok(true),
        "off" | "0" | "false" | "no" | "N" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

fn serve<F: Fabric>(fabric: F, a: &ServeArgs) -> Result<(), String> {
    let cfg = SrvConfig {
        queue_depth: a.queue_depth,
        max_chunk_size: a.chunk_size,
        always_invalidate: a.always_invalidate,
        ..Default::default()
    };
    cfg.layout().map_err(|e| e.to_string())?;
    let exports = a
        .exports
        .iter()
        .map(|s| Export::parse(s).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    for e in &exports {
        eprintln!("export {}: {} bytes", e.name(), e.size());
    }
    let rnbd = RnbdServer::new(exports, cfg.max_io_size());
    let stop = pollers::Shutdown::on_ctrlc().map_err(|e| e.to_string())?;
    let pool = CorePool::launch(&a.cores).map_err(|e| e.to_string())?;
    let place = pool.place();
    let r2 = rnbd.clone();
    let mut srv = Server::listen(
        &fabric,
        &a.listen[0],
        cfg,
        move |info: &rtrs_poll::srv::ConInfo| r2.handler(info),
        place,
    )
    .map_err(|e| format!("listen on {}: {e}", a.listen[0]))?;
    for l in &a.listen[1..] {
        srv.listen_also(l)
            .map_err(|e| format!("listen on {l}: {e}"))?;
    }
    eprintln!(
        "rtrs serve: listening on {} ({} backend, always_invalidate {}, queue depth {}, chunk {} B); Ctrl-C stops",
        a.listen.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
        fabric.name(),
        if a.always_invalidate { "on" } else { "off" },
        a.queue_depth,
        a.chunk_size
    );
    while !stop.is_set() {
        srv.poll(Instant::now(), rtrs_poll::sess::CONTROL_TICK);
        for c in srv.take_closed() {
            eprintln!(
                "path {} ({}) closed: {}",
                c.sessname.as_deref().unwrap_or("?"),
                c.peer,
                c.reason
            );
            if c.session_ended {
                rnbd.session_ended(&c.paths_uuid);
            }
        }
    }
    eprintln!("rtrs serve: stopping");
    drop(srv);
    pool.stop();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve(a) => match &a.listen[0] {
            Address::Shm(_) => serve(ShmFabric::new(), &a),
            Address::Tcp { .. } => serve(TcpFabric::new(), &a),
            #[cfg(feature = "rdma")]
            Address::Rdma { .. } => rtrs_poll::fabric::rdma::RdmaFabric::new()
                .map_err(|e| e.to_string())
                .and_then(|f| serve(f, &a)),
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "the {} backend is not built into this rtrs (build with --features rdma)",
                other.scheme()
            )),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtrs: {e}");
            ExitCode::FAILURE
        }
    }
}
