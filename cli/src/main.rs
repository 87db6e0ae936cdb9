//! rtrs: the operator CLI.
//!
//! ```text
//!  rtrs serve --listen ADDR[,ADDR] --export NAME=ram:SIZE[,ro][,allow=SESS|...] [--export NAME=file:PATH|NAME=dev:/dev/X]
//!             [--cores LIST] [--always-invalidate on|off] [--queue-depth N] [--chunk-size BYTES]
//!             [--config FILE.toml] [--ctl SOCKET] [--metrics ADDR]
//!  rtrs ctl [--socket SOCKET] [--json] list sessions|paths|devices | stats [--session S] [--path P]
//!           [--core N] | disconnect PATH | close SESSION | force-close SESSION DEV_ID
//!           | export add NAME SPEC | export remove NAME
//!           | (a client's socket) list paths | stats [--path P] | add-path ADDR | remove-path P
//!           | disconnect P | reconnect P | mp-policy round-robin|min-inflight|min-latency
//!  rtrs doctor [--cores LIST] [--json]
//! ```
//! `serve` is an RNBD server over RTRS, as the kernel's rnbd-server: the
//! kernel's rnbd-client maps its exports with `map_device`.

mod config;
mod ctl;
mod doctor;
mod metrics;
use clap::{Parser, Subcommand};
use config::{Access, Settings};
use rtrs_fabric::{with_backend, Address, Backends, Fabric, OnFabric};
use rtrs_poll::rnbd::{Export, RnbdServer, Rule};
use rtrs_poll::srv::{CorePool, Server, SrvConfig, SrvEvent};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "rtrs", version, about = "rtrs-poll's operator CLI")]
struct Cli {
    /// Log lines as text (the default), or as one JSON object each (for
    /// log shippers). RUST_LOG sets the level (info by default).
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve RNBD devices over RTRS until Ctrl-C or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Look into a running server or client session, or act on it, over
    /// its control socket (`rtrs serve --ctl PATH`, `rtrs-perf client --ctl
    /// PATH`).
    Ctl(CtlArgs),
    /// Check this host for pinned pollers: hugepages, memlock, isolated
    /// cores, the clocksource, RDMA devices, interrupts on the poll cores.
    /// Exits non-zero when something would stop a run.
    Doctor {
        /// The poll cores to check, e.g. 1 or 2,3.
        #[arg(long, default_value = "0", value_delimiter = ',')]
        cores: Vec<usize>,
        /// One JSON object per finding.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The server's or client's control socket (default:
    /// /run/rtrs/ctl.sock for root, else $XDG_RUNTIME_DIR/rtrs/ctl.sock).
    #[arg(long)]
    socket: Option<std::path::PathBuf>,
    /// The JSON response as it is.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// List sessions, paths or devices.
    List {
        #[arg(value_enum)]
        what: ListWhat,
    },
    /// Counters (per path: the kernel's rdma read/write count and bytes,
    /// inflight, and ours; per core: polls, busy share, IOs, latency).
    Stats {
        /// Only this session (name or uuid).
        #[arg(long)]
        session: Option<String>,
        /// Only this path (its id, or a unique prefix of it).
        #[arg(long)]
        path: Option<String>,
        /// Only this core (index).
        #[arg(long)]
        core: Option<usize>,
    },
    /// Close a path's connections, as the kernel's sysfs `disconnect`: on
    /// a server its client reconnects; on a client the path stays down
    /// until `reconnect`.
    Disconnect {
        /// The path's id (from `list paths`; on a server a unique prefix,
        /// on a client pathN, N or its address).
        path: String,
    },
    /// Client: reconnect a path now (the kernel's sysfs `reconnect`).
    Reconnect {
        /// pathN, N or its address.
        path: String,
    },
    /// Client: remove a path (the kernel's sysfs `remove_path`; not the
    /// last one).
    RemovePath {
        /// pathN, N or its address.
        path: String,
    },
    /// Client: add a path to ADDR (the kernel's sysfs `add_path`).
    AddPath {
        /// shm:NAME, tcp:HOST:PORT or rdma:HOST:PORT.
        addr: String,
    },
    /// Client: the multipath policy (the kernel's sysfs `mpath_policy`):
    /// round-robin, min-inflight or min-latency.
    MpPolicy { policy: String },
    /// Close every path of a session.
    Close {
        /// The session's name or uuid.
        session: String,
    },
    /// Close one open device of a session (its IO fails from now on), as
    /// the kernel's rnbd-server `force_close`.
    ForceClose {
        /// The session's name or uuid.
        session: String,
        /// The device id (from `list devices`).
        device_id: u32,
    },
    /// Add or remove an export at runtime.
    #[command(subcommand)]
    Export(ExportCmd),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ListWhat {
    Sessions,
    Paths,
    Devices,
}

#[derive(Subcommand, Debug)]
enum ExportCmd {
    /// Serve NAME from now on: SPEC as in --export NAME=SPEC (ram:SIZE or
    /// file:PATH, then ,ro ,allow=... ,allow-key=...).
    Add { name: String, spec: String },
    /// Stop serving NAME (refused with EBUSY while a session has it open).
    Remove { name: String },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Settings in TOML (scripts/deploy/rtrs.toml; docs/deploy.md); flags
    /// given here override the file's.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Address(es) to listen on: shm:NAME, tcp:HOST:PORT or rdma:HOST:PORT.
    #[arg(long, value_delimiter = ',')]
    listen: Vec<Address>,
    /// A device to export: NAME=ram:SIZE (e.g. ram0=ram:1G), NAME=file:PATH
    /// or NAME=dev:/dev/X (a block device; files and devices are served
    /// through io_uring, with O_DIRECT where they take it), then options: ,ro (read-only: opens for writing get -EPERM),
    /// ,allow=SESS[|SESS...] (only these session names may open it, others
    /// get -EACCES), ,allow-key=ID[|ID...] (the same by key id). Names are
    /// unique (docs/rnbd.md).
    #[arg(long = "export")]
    exports: Vec<String>,
    /// Cores for the IO connections, e.g. 1 or 0,1 (default: 0).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Serve the counters in the Prometheus text format at
    /// http://ADDR/metrics (e.g. 127.0.0.1:9465).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// The control socket for `rtrs ctl` (a unix socket, mode 0600, for
    /// this uid and root; off unless given).
    #[arg(long)]
    ctl: Option<std::path::PathBuf>,
    /// Refresh each chunk's rkey after every IO (the kernel's default: on).
    #[arg(long, value_parser = on_off, action = clap::ArgAction::Set)]
    always_invalidate: Option<bool>,
    /// Chunks per session (the kernel's sess_queue_depth; default 512).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    queue_depth: Option<u16>,
    /// Bytes per chunk (the kernel's max_chunk_size: a power of two >= 8192;
    /// default 131072).
    #[arg(long)]
    chunk_size: Option<u32>,
    /// Heartbeat interval in milliseconds (the kernel's: 5000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    hb_interval_ms: Option<u64>,
    /// Missed heartbeats before a path is dead (the kernel's: 5).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    hb_missed: Option<u32>,
    /// A housekeeping CPU for the control thread (default: unpinned).
    #[arg(long)]
    control_cpu: Option<usize>,
    /// How the poll cores are scheduled: normal (default) or idle
    /// (SCHED_IDLE: kernel work on a poll core's CPU -- soft-RoCE's
    /// tasklets, a NIC's softirqs -- runs the moment it is ready; for poll
    /// cores that are not isolated; docs/deploy.md).
    #[arg(long)]
    poll_sched: Option<pollers::CoreSched>,
    #[command(flatten)]
    access: AccessArgs,
}

/// Who may connect, and how much they may take.
#[derive(clap::Args, Debug)]
struct AccessArgs {
    /// Source networks that may connect, e.g. 10.0.0.0/8,192.168.1.7/32
    /// (default: any).
    #[arg(long, value_delimiter = ',')]
    allow: Vec<ipnet::IpNet>,
    /// tcp: admit only clients that prove they hold this pre-shared key
    /// (mutual HMAC-SHA256 challenge-response before any RTRS byte; a file
    /// of at least 16 bytes that only its owner may read).
    #[arg(long)]
    auth_key: Option<std::path::PathBuf>,
    /// Serve a non-loopback tcp address with no access rule (--allow or
    /// --auth-key): any host that reaches the port may open any export.
    #[arg(long)]
    insecure: bool,
    /// Sessions in all (default 256).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_sessions: Option<u64>,
    /// Sessions from one source host (default 16).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_sessions_per_host: Option<u64>,
    /// Paths of one session (the kernel's limit: 128).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=128))]
    max_paths_per_session: Option<u64>,
    /// Connections of one source host still in their handshake (default 256).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_handshakes_per_host: Option<u64>,
    /// Seconds a path may take to finish its handshake (default 30).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    handshake_timeout: Option<u64>,
    /// Chunk memory all sessions may hold (e.g. 4G; default: a quarter of
    /// the host's memory).
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// Hugepage memory this server takes at most (e.g. 2G; default: three
    /// quarters of the host's reserved hugepages); past it, regions come
    /// from 4 KiB pages (logged once).
    #[arg(long, value_parser = parse_bytes)]
    hugepage_limit: Option<u64>,
    /// Memory registrations (keys) of all paths; one host may hold a
    /// quarter (default: from the memory budget: its chunks twice, plus
    /// 4096).
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..=(1 << 22)))]
    max_registrations: Option<u32>,
    /// Sessions whose chunk memory is preallocated at start (one region,
    /// hugepages when reserved, registered once; within the memory
    /// budget); sessions beyond get memory of their own while the budget
    /// allows. 0: none (default 2).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=4096))]
    prealloc_sessions: Option<u64>,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        Some((i, 't' | 'T')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad size {s:?}: expected e.g. 512M, 4G"))
}

impl Access {
    fn limits(&self) -> rtrs_poll::srv::Limits {
        let d = rtrs_poll::srv::Limits::default();
        rtrs_poll::srv::Limits {
            allow: self.allow.clone(),
            max_sessions: self.max_sessions as usize,
            max_sessions_per_host: self.max_sessions_per_host as usize,
            max_paths_per_session: self.max_paths_per_session as usize,
            max_handshakes_per_host: self.max_handshakes_per_host as usize,
            handshake_timeout: std::time::Duration::from_secs(self.handshake_timeout),
            memory_budget: self.memory_budget.unwrap_or(d.memory_budget),
            max_registrations: self.max_registrations,
            prealloc_sessions: self.prealloc_sessions as usize,
            insecure: self.insecure,
        }
    }

    /// A tcp listener that other hosts reach needs an access rule, or
    /// --insecure said out loud.
    fn check(&self, listen: &[Address]) -> Result<(), String> {
        let open: Vec<String> = listen
            .iter()
            .filter(|a| match a {
                Address::Tcp { .. } => !a.is_loopback(),
                _ => false,
            })
            .map(|a| a.to_string())
            .collect();
        if self.auth_key.is_some() && listen.iter().any(|a| !matches!(a, Address::Tcp { .. })) {
            return Err("--auth-key applies to tcp listeners only".into());
        }
        if open.is_empty() || !self.allow.is_empty() || self.auth_key.is_some() {
            return Ok(());
        }
        if !self.insecure {
            return Err(format!(
                "{} is reachable by other hosts and has no access rule: give --allow NETWORKS \
                 and/or --auth-key FILE, or --insecure to serve it to any host",
                open.join(",")
            ));
        }
        // The library logs each such listener as INSECURE when it opens it.
        Ok(())
    }
}

/// Tells systemd (a `Type=notify` unit: `$NOTIFY_SOCKET`) how the service
/// is doing; nothing when not run under it. A failure is logged, not fatal.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!("sd_notify {state}: {e}"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket name.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::warn!("sd_notify {state} to {}: {e}", path.to_string_lossy());
    }
}

/// The backends' settings: tcp with the listener's key and handshake
/// allowance.
fn backends(access: &Access) -> Result<Backends, String> {
    let mut b = Backends::default();
    b.tcp.max_pending_per_host = access.max_handshakes_per_host as usize;
    if let Some(path) = &access.auth_key {
        b.tcp = b.tcp.with_auth_key_file(path)?;
        if let Some(k) = &b.tcp.auth {
            tracing::info!(key = k.id(), "tcp clients must prove the pre-shared key");
        }
    }
    Ok(b)
}

/// `rtrs serve` on whichever fabric its first address names.
struct Serve<'a>(&'a Settings);

impl OnFabric for Serve<'_> {
    type Output = Result<(), String>;
    fn run<F: Fabric>(self, fabric: F) -> Self::Output {
        serve(fabric, self.0)
    }
}

/// How an export is restricted, for the startup line.
fn access_note(e: &Export) -> String {
    let mut s = String::new();
    if e.is_read_only() {
        s.push_str(", read-only");
    }
    if !e.rules().is_empty() {
        let who: Vec<String> = e
            .rules()
            .iter()
            .map(|r| match r {
                Rule::Sessname(n) => format!("session {n}"),
                Rule::KeyId(k) => format!("key {k}"),
            })
            .collect();
        s.push_str(&format!(", only for {}", who.join(", ")));
    }
    s
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "1" | "true" | "yes" | "Y" => Ok(true),
        "off" | "0" | "false" | "no" | "N" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

fn serve<F: Fabric>(fabric: F, a: &Settings) -> Result<(), String> {
    let cfg = SrvConfig {
        queue_depth: a.queue_depth,
        max_chunk_size: a.chunk_size,
        always_invalidate: a.always_invalidate,
        hb_interval: std::time::Duration::from_millis(a.hb_interval_ms),
        hb_missed_max: a.hb_missed,
        control_cpu: a.control_cpu,
        limits: a.access.limits(),
    };
    cfg.layout().map_err(|e| e.to_string())?;
    a.access.check(&a.listen)?;
    if let Some(h) = a.access.hugepage_limit {
        mempool::set_hugepage_limit(h);
    }
    let exports = a
        .exports
        .iter()
        .map(|s| Export::parse(s).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    for e in &exports {
        eprintln!(
            "export {}: {} bytes{} [{}]",
            e.name(),
            e.size(),
            access_note(e),
            e.backend()
        );
    }
    let rnbd = RnbdServer::new(exports, cfg.max_io_size()).map_err(|e| e.to_string())?;
    // Bound before any client can connect: a bad --ctl stops it here.
    let ctl_sock = a.ctl.as_deref().map(ctl::CtlSocket::bind).transpose()?;
    let stop = pollers::Shutdown::on_ctrlc().map_err(|e| e.to_string())?;
    let pool = CorePool::launch_sched(&a.cores, a.poll_sched).map_err(|e| e.to_string())?;
    let place = pool.place();
    let r2 = rnbd.clone();
    let srv = Server::listen(
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
    // The session's end closes what it had open (as the kernel's
    // rnbd-server on its link event).
    let r3 = rnbd.clone();
    srv.on_event(move |ev| {
        if let SrvEvent::PathClosed(c) = ev {
            if c.session_ended {
                r3.session_ended(&c.paths_uuid);
            }
        }
    })
    .map_err(|e| e.to_string())?;
    eprintln!(
        "rtrs serve: listening on {} ({} backend, always_invalidate {}, queue depth {}, chunk {} B, poll cores {:?} sched {}); Ctrl-C stops",
        a.listen.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
        fabric.name(),
        if a.always_invalidate { "on" } else { "off" },
        a.queue_depth,
        a.chunk_size,
        a.cores,
        a.poll_sched
    );
    let ctl_refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let backend: std::sync::Arc<dyn ctl::Backend + Send + Sync> =
        std::sync::Arc::new(ctl::SrvBackend {
            srv: srv.handle(),
            rnbd: rnbd.clone(),
            cores: a.cores.iter().copied().zip(pool.live()).collect(),
            refused: ctl_refused.clone(),
        });
    let _ctl = match (ctl_sock, &a.ctl) {
        (Some(sock), Some(p)) => {
            let b = backend.clone();
            let c = ctl::CtlServer::serve(
                sock,
                ctl::Role::Server,
                std::sync::Arc::new(move |line: &str| ctl::handle_line(line, &*b)),
                ctl_refused,
            )?;
            eprintln!("rtrs serve: control socket {}", p.display());
            Some(c)
        }
        _ => None,
    };
    if let Some(m) = a.metrics {
        let at = metrics::serve(m, srv.counters(), rnbd.clone(), backend.clone())?;
        eprintln!("rtrs serve: metrics on http://{at}/metrics");
    }
    sd_notify("READY=1");
    while !stop.is_set() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    sd_notify("STOPPING=1");
    eprintln!("rtrs serve: stopping");
    let backend: Vec<String> = rnbd
        .backend_counters()
        .by_kind()
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    eprintln!("rtrs serve: rnbd backend: {}", backend.join(", "));
    drop(_ctl);
    for (kind, n) in rnbd.counters().refusals() {
        eprintln!("rtrs serve: rnbd refusals {}: {n}", kind.name());
    }
    srv.stop();
    pool.stop();
    Ok(())
}

/// `rtrs ctl`: one request, its answer printed (a table, or the JSON
/// with --json); an error is non-zero.
fn run_ctl(a: &CtlArgs) -> Result<(), String> {
    let req = match &a.cmd {
        CtlCmd::List { what } => match what {
            ListWhat::Sessions => ctl::Request::ListSessions {},
            ListWhat::Paths => ctl::Request::ListPaths {},
            ListWhat::Devices => ctl::Request::ListDevices {},
        },
        CtlCmd::Stats {
            session,
            path,
            core,
        } => ctl::Request::Stats {
            session: session.clone(),
            path: path.clone(),
            core: *core,
        },
        CtlCmd::Disconnect { path } => ctl::Request::Disconnect { path: path.clone() },
        CtlCmd::Reconnect { path } => ctl::Request::Reconnect { path: path.clone() },
        CtlCmd::RemovePath { path } => ctl::Request::RemovePath { path: path.clone() },
        CtlCmd::AddPath { addr } => ctl::Request::AddPath { addr: addr.clone() },
        CtlCmd::MpPolicy { policy } => ctl::Request::MpPolicy {
            policy: policy.clone(),
        },
        CtlCmd::Close { session } => ctl::Request::Close {
            session: session.clone(),
        },
        CtlCmd::ForceClose { session, device_id } => ctl::Request::ForceClose {
            session: session.clone(),
            device_id: *device_id,
        },
        CtlCmd::Export(ExportCmd::Add { name, spec }) => ctl::Request::ExportAdd {
            name: name.clone(),
            spec: spec.clone(),
        },
        CtlCmd::Export(ExportCmd::Remove { name }) => {
            ctl::Request::ExportRemove { name: name.clone() }
        }
    };
    let socket = a.socket.clone().unwrap_or_else(ctl::default_socket);
    let rsp = ctl::request(&socket, &req)?;
    if a.json {
        println!("{}", serde_json::to_string(&rsp).unwrap_or_default());
    }
    if !rsp.ok {
        return Err(rsp.error.unwrap_or_else(|| "refused".into()));
    }
    if !a.json {
        let data = rsp.data.clone().unwrap_or_default();
        match rsp.role() {
            Some(ctl::Role::Client) => print!("{}", rtrs_ctl::client::human(&req, &data)),
            _ => print!("{}", ctl::human(&req, &data)),
        }
    }
    Ok(())
}

/// The settings of `rtrs serve` (its --config file under its flags), and
/// the log format the file asks for.
fn settings(a: &ServeArgs) -> Result<(Settings, Option<LogFormat>), String> {
    let file = match &a.config {
        Some(p) => config::load(p)?,
        None => config::FileConfig::default(),
    };
    Ok((config::resolve(a, &file)?, config::log_format(&file)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The config file is read before logging starts: it may set the format.
    let serve_settings = match &cli.cmd {
        Cmd::Serve(a) => match settings(a) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("rtrs: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let format = cli
        .log_format
        .or(serve_settings.as_ref().and_then(|s| s.1))
        .unwrap_or(LogFormat::Text);
    // Path changes, refusals and fallbacks are logged: RUST_LOG sets the
    // level, info by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => logs.json().try_init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    if let Err(e) = installed {
        eprintln!("rtrs: logging is not set up: {e}");
    }
    let r = match (cli.cmd, serve_settings) {
        (Cmd::Doctor { cores, json }, _) => {
            let findings = doctor::run(std::path::Path::new("/"), &cores, None);
            match doctor::print(&findings, json) {
                doctor::Level::Fail => Err("the host cannot run as asked (FAIL above)".into()),
                _ => Ok(()),
            }
        }
        (Cmd::Ctl(a), _) => run_ctl(&a),
        (Cmd::Serve(_), Some((a, _))) => backends(&a.access)
            .and_then(|b| with_backend(&a.listen[0], &b, Serve(&a)).map_err(|e| e.to_string())?),
        (Cmd::Serve(_), None) => Err("no settings".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtrs: {e}");
            ExitCode::FAILURE
        }
    }
}
