//! The RTRS server: sessions of paths of connections, as the kernel's
//! rtrs-server runs them, over any fabric. [`Server::listen`] starts the
//! server's own control thread; the embedder runs only the cores its IO
//! connections are placed on, and hears about paths through events.
//!
//! ```text
//!  Server (handle) ── listen_also / on_event / subscribe ──> control thread (ctl)
//!    CM events: CONNECT_REQUEST -> checks of spec §4.3 -> session (chunks, one region)
//!                                -> path (MRs over the chunks) -> con (QP + CQ) -> accept
//!    cid 0 of each path: INFO_REQ -> INFO_RSP, heartbeat, admin IO    (polled here)
//!    IO cids: handed to cores as pollers (`place`)                    (polled there)
//!    closing paths: disconnect every con, drop the session with its last path
//!  SrvCon (one per cid): WRITE_WITH_IMM lands in a chunk -> Handler::on_io(usr, data)
//!    -> response chain: [RDMA_WRITE data] [SEND_WITH_INV] WRITE_WITH_IMM | REG + SEND(RKEY_RSP)
//! ```

mod admit;
mod con;
mod ctl;
pub(crate) mod deferred;
pub mod lat;
mod machine;
mod path;

pub use crate::sess::DownReason;
pub use con::SrvCon;
pub use deferred::{Deferred, SrvIo};
pub use path::{ConCounters, PathState, PathStats, PathTotals, SrvPath};

use ctl::{Shared, SrvControl, SrvMsg};
use rtrs_fabric::{Address, Fabric, FabricError};
use rtrs_proto::imm::ImmLayout;
use rtrs_proto::{DEFAULT_MAX_CHUNK_SIZE, DEFAULT_SESS_QUEUE_DEPTH, MAX_HDR_SIZE, MIN_CHUNK_SIZE};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Server settings (the kernel module's parameters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvConfig {
    /// Chunks per session (`sess_queue_depth`).
    pub queue_depth: u16,
    /// Bytes per chunk (`max_chunk_size`): a power of two, at least 8192.
    pub max_chunk_size: u32,
    /// Refresh a chunk's rkey after every IO (`always_invalidate`).
    pub always_invalidate: bool,
    /// Heartbeat interval (the kernel's: 5 s).
    pub hb_interval: Duration,
    /// Missed heartbeats before a path is dead (the kernel's: 5).
    pub hb_missed_max: u32,
    /// A housekeeping CPU for the control thread; `None`: unpinned.
    pub control_cpu: Option<usize>,
    /// Who may connect and how much they may take.
    pub limits: Limits,
}

/// Admission limits and access rules of a server: checked at each connect
/// request, before anything is allocated. Each refusal answers with the
/// errno shown, is logged once with its reason and counted
/// ([`SrvCounters::refusals`], through [`Server::counters`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Source networks that may connect (empty: any). Checked first:
    /// -EACCES.
    pub allow: Vec<ipnet::IpNet>,
    /// Sessions in all (-ENOMEM beyond).
    pub max_sessions: usize,
    /// Sessions from one source host (-ENOMEM beyond).
    pub max_sessions_per_host: usize,
    /// Paths of one session (the kernel's 128 at most; -ECONNRESET beyond,
    /// as the kernel's).
    pub max_paths_per_session: usize,
    /// Connections of one source host in paths that have not finished
    /// their handshake (-EBUSY beyond).
    pub max_handshakes_per_host: usize,
    /// A path must finish its handshake (every cid, then INFO_REQ) in this
    /// long; else it is torn down, and its session with its memory when it
    /// was the last.
    pub handshake_timeout: Duration,
    /// Chunk memory of all sessions (queue_depth x max_chunk_size each),
    /// checked before a session is allocated (-ENOMEM beyond).
    pub memory_budget: u64,
    /// Memory registrations (keys) of all paths: the software fabrics'
    /// registration table is this big. None: from the budget (its chunks,
    /// registered on two paths each, and room for connections). A path
    /// takes queue_depth of them with always_invalidate (one otherwise)
    /// plus one per connection; one host may hold a quarter (-ENOMEM
    /// beyond), so no host fills the table for the others.
    pub max_registrations: Option<u32>,
    /// Sessions whose chunk memory is preallocated at start, in one
    /// registered region shared by all sessions (the kernel's chunk
    /// mempool), within `memory_budget`; sessions beyond get memory of
    /// their own while the budget allows. 0: none preallocated.
    pub prealloc_sessions: usize,
    /// Serve a tcp address other hosts reach with neither `allow` nor a
    /// fabric that authenticates its peers (tcp's pre-shared key): refused
    /// unless this is set, and then logged as INSECURE. Loopback and shm
    /// listeners need nothing.
    pub insecure: bool,
}

impl Default for Limits {
    /// Room for a few hundred kernel-sized sessions, on a quarter of the
    /// host's memory at most.
    fn default() -> Limits {
        Limits {
            allow: Vec::new(),
            max_sessions: 256,
            max_sessions_per_host: 16,
            max_paths_per_session: rtrs_proto::MAX_PATHS_NUM,
            max_handshakes_per_host: 256,
            handshake_timeout: Duration::from_secs(30),
            memory_budget: default_memory_budget(),
            max_registrations: None,
            prealloc_sessions: 1,
            insecure: false,
        }
    }
}

/// A quarter of the host's memory (16 GiB when it cannot be read).
fn default_memory_budget() -> u64 {
    // SAFETY: sysconf only reads system values.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64 / 4
    } else {
        16 << 30
    }
}

impl Limits {
    /// The registration table's size for chunks of `chunk` bytes (see
    /// [`Limits::max_registrations`]).
    pub fn registrations(&self, chunk: u32) -> u32 {
        self.max_registrations.unwrap_or_else(|| {
            let chunks = self.memory_budget / u64::from(chunk.max(1));
            (chunks.saturating_mul(2) + 4096).min(1 << 22) as u32
        })
    }

    /// Whether `ip` may connect.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Whether a listener on `addr` is safe to open: a tcp address other
    /// hosts reach needs an allowlist, a fabric that `authenticates` its
    /// peers, or [`Limits::insecure`] said out loud.
    pub fn check_exposure(&self, addr: &Address, authenticates: bool) -> Result<(), SrvError> {
        let exposed = matches!(addr, Address::Tcp { .. }) && !addr.is_loopback();
        if !exposed || !self.allow.is_empty() || authenticates {
            return Ok(());
        }
        if !self.insecure {
            return Err(SrvError::Exposed(addr.to_string()));
        }
        tracing::warn!(%addr, "INSECURE: the listener accepts any host that reaches it (no allowlist, no key)");
        Ok(())
    }
}

/// The server's counters, kept by its control thread.
#[derive(Debug, Default)]
pub struct SrvCounters {
    refused: std::sync::atomic::AtomicU64,
    refusals: std::sync::Mutex<std::collections::BTreeMap<Refusal, u64>>,
    sessions: std::sync::atomic::AtomicU64,
    memory: std::sync::atomic::AtomicU64,
    deferred: std::sync::atomic::AtomicU64,
    pool: std::sync::atomic::AtomicU64,
    pool_huge: std::sync::atomic::AtomicBool,
    pool_failed: std::sync::atomic::AtomicU64,
    pooled: std::sync::atomic::AtomicU64,
    own_chunks: std::sync::atomic::AtomicU64,
    slabs_in_use: std::sync::atomic::AtomicU64,
    operator_closes: std::sync::atomic::AtomicU64,
}

/// The chunk pool's figures ([`SrvCounters::pool`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolFigures {
    /// Sessions preallocated (0: no pool).
    pub sessions: u64,
    /// Whether 2 MiB hugepages back it (else the 4 KiB fallback).
    pub huge: bool,
    /// Whether preallocating it failed (logged once at start).
    pub failed: bool,
    /// Sessions so far that took a slab of the pool.
    pub pooled: u64,
    /// Sessions so far that got memory of their own (pool taken or none).
    pub own: u64,
    /// Slabs held now (a session that ended holds its slab until no path
    /// or core holds its chunks).
    pub in_use: u64,
}

impl SrvCounters {
    pub(crate) fn refused(&self, kind: Refusal) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.refusals.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    pub(crate) fn set_sessions(&self, n: usize, bytes: u64) {
        self.sessions.store(n as u64, Ordering::Relaxed);
        self.memory.store(bytes, Ordering::Relaxed);
    }

    /// Connect requests refused so far.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connect requests refused so far, by what for.
    pub fn refusals(&self) -> Vec<(Refusal, u64)> {
        self.refusals
            .lock()
            .map(|m| m.iter().map(|(k, n)| (*k, *n)).collect())
            .unwrap_or_default()
    }

    pub(crate) fn operator_close(&self) {
        self.operator_closes.fetch_add(1, Ordering::Relaxed);
    }

    /// Paths the operator closed ([`SrvHandle::close`] of a path or a
    /// session: `rtrs ctl disconnect`, `close`).
    pub fn operator_closes(&self) -> u64 {
        self.operator_closes.load(Ordering::Relaxed)
    }

    pub(crate) fn deferred_placement(&self) {
        self.deferred.fetch_add(1, Ordering::Relaxed);
    }

    /// Times a core could not take a new connection at once (its inbox was
    /// full) and the control thread offered it again later.
    pub fn deferred_placements(&self) -> u64 {
        self.deferred.load(Ordering::Relaxed)
    }

    pub(crate) fn set_pool(&self, sessions: usize, huge: bool) {
        self.pool.store(sessions as u64, Ordering::Relaxed);
        self.pool_huge.store(huge, Ordering::Relaxed);
    }

    pub(crate) fn pool_failed(&self) {
        self.pool_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn pool_session(&self) {
        self.pooled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn slab_taken(&self, taken: bool) {
        if taken {
            self.slabs_in_use.fetch_add(1, Ordering::Relaxed);
        } else {
            self.slabs_in_use.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn own_chunks_session(&self) {
        self.own_chunks.fetch_add(1, Ordering::Relaxed);
    }

    /// The chunk pool: its size, and how sessions got their chunks.
    pub fn pool(&self) -> PoolFigures {
        PoolFigures {
            sessions: self.pool.load(Ordering::Relaxed),
            huge: self.pool_huge.load(Ordering::Relaxed),
            failed: self.pool_failed.load(Ordering::Relaxed) > 0,
            pooled: self.pooled.load(Ordering::Relaxed),
            own: self.own_chunks.load(Ordering::Relaxed),
            in_use: self.slabs_in_use.load(Ordering::Relaxed),
        }
    }

    /// Sessions now, and the chunk memory they hold (bytes).
    pub fn sessions(&self) -> (usize, u64) {
        (
            self.sessions.load(Ordering::Relaxed) as usize,
            self.memory.load(Ordering::Relaxed),
        )
    }
}

/// What a refusal was for (counted per kind: [`SrvCounters::refusals`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// The source is not in the allowlist.
    Access,
    /// A malformed or out-of-order connect request (the kernel's checks).
    Protocol,
    /// Too many sessions in all.
    Sessions,
    /// Too many sessions from this host.
    SessionsPerHost,
    /// Too many paths in the session.
    Paths,
    /// Too many connections of this host in handshakes.
    Handshakes,
    /// The memory budget (or the system) has no room for the session.
    Memory,
    /// A path between these addresses exists (-EEXIST).
    Duplicate,
    /// The peer failed the listener's authentication (tcp pre-shared key).
    Auth,
    /// The peer's handshake did not finish in time (the fabric's).
    Timeout,
    /// No file descriptors or memory were left to take the connection.
    Resources,
}

impl Refusal {
    /// A short stable name, for counters and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Access => "access",
            Refusal::Protocol => "protocol",
            Refusal::Sessions => "sessions",
            Refusal::SessionsPerHost => "sessions_per_host",
            Refusal::Paths => "paths",
            Refusal::Handshakes => "handshakes",
            Refusal::Memory => "memory",
            Refusal::Duplicate => "duplicate",
            Refusal::Auth => "auth",
            Refusal::Timeout => "timeout",
            Refusal::Resources => "resources",
        }
    }
}

impl Default for SrvConfig {
    fn default() -> SrvConfig {
        SrvConfig {
            queue_depth: DEFAULT_SESS_QUEUE_DEPTH as u16,
            max_chunk_size: DEFAULT_MAX_CHUNK_SIZE,
            always_invalidate: true,
            hb_interval: crate::sess::hb::HB_INTERVAL,
            hb_missed_max: crate::sess::hb::HB_MISSED_MAX,
            control_cpu: None,
            limits: Limits::default(),
        }
    }
}

impl SrvConfig {
    /// Checks the settings as the kernel module does at load time.
    pub fn layout(&self) -> Result<ImmLayout, SrvError> {
        if self.hb_interval.is_zero() {
            return Err(SrvError::Config("the heartbeat interval must not be zero"));
        }
        if self.max_chunk_size < MIN_CHUNK_SIZE || !self.max_chunk_size.is_power_of_two() {
            return Err(SrvError::Config(
                "max_chunk_size must be a power of two of at least 8192",
            ));
        }
        if self.queue_depth == 0 {
            return Err(SrvError::Config("queue_depth must be 1..=65535"));
        }
        ImmLayout::new(self.queue_depth.into(), self.max_chunk_size)
            .map_err(|_| SrvError::Config("bits(queue_depth) + bits(max_chunk_size) exceed 28"))
    }
    /// `max_chunk_size - MAX_HDR_SIZE`: the largest IO.
    pub fn max_io_size(&self) -> u32 {
        self.max_chunk_size - MAX_HDR_SIZE
    }
}

/// Server errors (setup and control; IO errors are errnos on the wire).
#[derive(Debug, thiserror::Error)]
pub enum SrvError {
    /// Bad settings.
    #[error("server configuration: {0}")]
    Config(&'static str),
    /// The fabric failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// The control thread is gone.
    #[error("the server's control thread is gone")]
    Gone,
    /// A tcp listener other hosts reach, with no access rule.
    #[error("{0} is reachable by other hosts and has no access rule: give it an allowlist (Limits::allow, rtrs --allow) or a pre-shared key (TcpConfig::auth, --auth-key), or say insecure (Limits::insecure, --insecure) to serve any host")]
    Exposed(String),
}

/// Direction of an IO request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDir {
    /// The client wrote data (in `SrvIo::data`).
    Write,
    /// The client reads: fill `SrvIo::data`.
    Read,
}

/// Names an IO in flight, to complete it later from the same core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoId(pub(crate) u32);

impl IoId {
    /// The chunk the request sits in.
    pub fn chunk(self) -> u32 {
        self.0
    }
}

/// What the handler did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Done now, with this errno (0 or negative).
    Done(i32),
    /// Deferred ([`SrvIo::defer`]): the [`Deferred`] answers it later, from
    /// any thread. (Later without deferring answers -EIO, logged.)
    Later,
}

/// The embedder's storage engine. One instance per connection, called on the
/// connection's core only (run to completion, no locks needed).
///
/// A request is answered at once ([`Verdict::Done`]) or later: the handler
/// [`defer`](SrvIo::defer)s it, and the [`Deferred`] token, which owns the
/// request's chunk and is `Send`, completes it from any thread. Here writes
/// are made "durable" by a flusher thread, which answers them:
///
/// ```
/// use rtrs_poll::{Deferred, Handler, IoDir, SrvIo, Verdict};
/// use std::sync::mpsc;
///
/// struct Journal {
///     /// To the flusher thread (the journal's own ring, in real life).
///     flush: mpsc::Sender<Deferred>,
/// }
///
/// impl Handler for Journal {
///     fn on_io(&mut self, io: SrvIo<'_>) -> Verdict {
///         if io.dir() != IoDir::Write {
///             return Verdict::Done(-libc::EOPNOTSUPP);
///         }
///         if let Err(mpsc::SendError(d)) = self.flush.send(io.defer()) {
///             d.complete(-libc::EIO); // the flusher is gone
///         }
///         Verdict::Later
///     }
/// }
/// # use rtrs_poll::{Address, Client, CltConfig, ConInfo, CorePool, Instant, Server, ShmFabric, SrvConfig};
/// # let fabric = ShmFabric::new();
/// # let addr = Address::Shm(format!("doc-handler-{}", std::process::id()));
/// # let cfg = SrvConfig { queue_depth: 16, max_chunk_size: 8192, ..SrvConfig::default() };
/// # let cores = CorePool::launch(&[0])?;
/// let (tx, rx) = mpsc::channel::<Deferred>();
/// let flusher = std::thread::spawn(move || {
///     for d in rx {
///         let _bytes = d.data(); // (made durable here)
///         d.complete(0);
///     }
/// });
/// let srv = Server::listen(&fabric, &addr, cfg, move |_: &ConInfo| Journal {
///     flush: tx.clone(),
/// }, cores.place())?;
/// # let (clt, mut queues) = Client::open(&fabric, CltConfig::new("doc", vec![addr]))?;
/// # let q = &mut queues[0];
/// # let p = q.get_permit().expect("a permit");
/// # q.write(p, b"", 100, 1, Instant::now()).map_err(|(_, e)| e)?;
/// # let mut done = None;
/// # while done.is_none() {
/// #     q.poll(Instant::now(), &mut |c| done = Some(c));
/// # }
/// # let c = done.expect("polled until done");
/// # assert_eq!((c.tag, c.errno), (1, 0));
/// # q.put_permit(c.permit);
/// # clt.close();
/// # drop(queues);
/// # srv.stop();
/// # cores.stop();
/// # flusher.join().unwrap();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Handler: Send + 'static {
    /// A request arrived.
    fn on_io(&mut self, io: SrvIo<'_>) -> Verdict;
    /// Called on every poll of the connection, on its core: a handler that
    /// finishes work there (an io_uring's completions, a ring of its own)
    /// completes its [`Deferred`]s here. Returns how much it did (work
    /// keeps the connection from parking).
    fn poll(&mut self) -> usize {
        0
    }
    /// The connection is going away: a handler that lent a [`Deferred`]'s
    /// data to something that may still touch it (a kernel IO into the
    /// buffer) waits for that here. Called once, on teardown, on the
    /// connection's core. (Deferreds completed or dropped later release
    /// their chunks themselves.)
    fn quiesce(&mut self) {}
}

/// Who a connection's handler serves.
#[derive(Clone, Debug)]
pub struct ConInfo {
    /// The client session (the same on all its paths).
    pub paths_uuid: [u8; 16],
    /// The path.
    pub sess_uuid: [u8; 16],
    /// The connection in the path.
    pub cid: u16,
    /// Chunks of the session: every [`IoId::chunk`] is below it, so a
    /// handler can size its per-request state at setup.
    pub queue_depth: u32,
    /// The session's chunk memory (every `SrvIo::data` lies in it), for a
    /// handler that registers it with the kernel once (io_uring fixed
    /// buffers); `None` where there is no such region.
    pub chunk_memory: Option<Arc<mempool::Region>>,
    /// The client's address.
    pub peer: String,
    /// Who the path's client is: set by the path's handshake (INFO_REQ on
    /// cid 0), so a handler made earlier reads it when it needs it; empty
    /// until then.
    pub identity: Arc<std::sync::OnceLock<Identity>>,
}

/// Who a path's client is, as far as the server knows, for per-export
/// access rules (`rnbd::srv::Rule`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The session name the client gave in INFO_REQ (the kernel's sessname).
    pub sessname: String,
    /// The id of the pre-shared key the client proved in the tcp fabric's
    /// connection setup (that of the path's first connection); `None` on
    /// fabrics and listeners without key auth.
    pub key_id: Option<String>,
}

/// Where IO connections go: called once per IO cid with the connection as a
/// poller (e.g. `Cores::add` on core `(cid - 1) % cores`). A core that
/// cannot take it now (its inbox is full) gives it back: the control thread
/// keeps it and offers it again at its next step (logged, counted as
/// `deferred_placements`), so no connection is dropped.
pub type Place =
    Box<dyn FnMut(u16, Box<dyn pollers::Poller>) -> Result<(), Box<dyn pollers::Poller>> + Send>;

/// IO connections on pinned cores: connection `cid` goes to core
/// `(cid - 1) % cores`, so a client's per-core connections spread out.
pub struct CorePool {
    cores: Arc<std::sync::Mutex<Option<pollers::Cores>>>,
    n: usize,
}

impl std::fmt::Debug for CorePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CorePool({} cores)", self.n)
    }
}

impl CorePool {
    /// Starts one pinned core per entry of `cpus`.
    pub fn launch(cpus: &[usize]) -> Result<CorePool, pollers::PollersError> {
        CorePool::launch_sched(cpus, pollers::CoreSched::Normal)
    }

    /// [`CorePool::launch`], the cores scheduled as `sched` says
    /// ([`pollers::CoreSched`]: `Idle` where a poll core shares its CPU
    /// with kernel work the IO needs).
    pub fn launch_sched(
        cpus: &[usize],
        sched: pollers::CoreSched,
    ) -> Result<CorePool, pollers::PollersError> {
        let cores = pollers::Cores::launch_sched(
            cpus,
            sched,
            pollers::Shutdown::new(),
            Duration::from_secs(1),
            |_| Vec::new(),
        )?;
        Ok(CorePool {
            n: cores.len().max(1),
            cores: Arc::new(std::sync::Mutex::new(Some(cores))),
        })
    }

    /// Each core's figures as it runs, by core index (a connection `cid`
    /// runs on core `(cid - 1) % len`).
    pub fn live(&self) -> Vec<Arc<pollers::LiveStats>> {
        self.cores
            .lock()
            .ok()
            .and_then(|g| {
                g.as_ref()
                    .map(|c| (0..c.len()).filter_map(|i| c.live(i)).collect())
            })
            .unwrap_or_default()
    }

    /// The [`Place`] that hands connections to these cores.
    pub fn place(&self) -> Place {
        let (cores, n) = (self.cores.clone(), self.n);
        Box::new(move |cid, con| {
            let Ok(mut g) = cores.lock() else {
                return Err(con);
            };
            match g.as_mut() {
                Some(c) => c
                    .add((usize::from(cid).max(1) - 1) % n, con)
                    .map_err(|pollers::Full(con)| con),
                // Stopped: the connection closes with the server.
                None => Ok(()),
            }
        })
    }

    /// Stops the cores (they drain first) and returns their reports.
    pub fn stop(self) -> Vec<pollers::CoreReport> {
        match self.cores.lock().ok().and_then(|mut g| g.take()) {
            Some(c) => c.stop(),
            None => Vec::new(),
        }
    }
}

/// A closed path, for the embedder's logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedPath {
    /// The client session it belonged to.
    pub paths_uuid: [u8; 16],
    /// Whether it was the session's last path: the session is gone (an
    /// upper layer such as RNBD closes what the session had open).
    pub session_ended: bool,
    /// The session name (if INFO_REQ got that far).
    pub sessname: Option<String>,
    /// The client's address.
    pub peer: String,
    /// Why it closed.
    pub reason: DownReason,
}

/// What happened on the server, for the embedder ([`Server::on_event`],
/// [`Server::subscribe`]); each is also logged once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SrvEvent {
    /// A path is connected (its INFO_REQ was taken).
    PathUp {
        /// The session name.
        sessname: String,
        /// The client's address.
        peer: String,
        /// The client session.
        paths_uuid: [u8; 16],
    },
    /// A path closed.
    PathClosed(ClosedPath),
    /// A connect request was refused (also counted: [`Server::counters`]).
    Refused {
        /// The client's address.
        peer: String,
        /// What for.
        kind: Refusal,
        /// The reject's errno (negative).
        errno: i32,
        /// Why.
        why: String,
    },
}

impl std::fmt::Display for SrvEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SrvEvent::PathUp { sessname, peer, .. } => {
                write!(f, "path {sessname} ({peer}) connected")
            }
            SrvEvent::PathClosed(c) => write!(
                f,
                "path {} ({}) closed: {}{}",
                c.sessname.as_deref().unwrap_or("?"),
                c.peer,
                c.reason,
                if c.session_ended {
                    "; the session ended"
                } else {
                    ""
                }
            ),
            SrvEvent::Refused {
                peer,
                kind,
                errno,
                why,
            } => write!(
                f,
                "connect from {peer} refused ({}, {errno}): {why}",
                kind.name()
            ),
        }
    }
}

/// Which paths the operator closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseTarget {
    /// One path, by its uuid (`sess_uuid`).
    Path([u8; 16]),
    /// Every path of a client session, by its uuid (`paths_uuid`).
    Session([u8; 16]),
}

/// What an operator's control plane holds of a server: its paths and
/// counters, and the control thread's command queue (slow path only).
/// Cheap to clone; works from any thread while the server runs.
pub struct SrvHandle<F: Fabric> {
    tx: pollers::mpsc::Sender<SrvMsg>,
    shared: Arc<Shared<F>>,
}

impl<F: Fabric> Clone for SrvHandle<F> {
    fn clone(&self) -> Self {
        SrvHandle {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<F: Fabric> std::fmt::Debug for SrvHandle<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SrvHandle")
    }
}

impl<F: Fabric> SrvHandle<F> {
    /// Live paths of all sessions.
    pub fn paths(&self) -> Vec<Arc<SrvPath<F>>> {
        self.shared.live_paths()
    }

    /// The server's counters.
    pub fn counters(&self) -> Arc<SrvCounters> {
        self.shared.counters.clone()
    }

    /// Closes the paths `target` names, on the control thread; returns how
    /// many were open (0: no such path or session).
    pub fn close(&self, target: CloseTarget) -> Result<usize, SrvError> {
        let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .push(SrvMsg::Close(target, rtx))
            .map_err(|_| SrvError::Gone)?;
        rrx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| SrvError::Gone)
    }
}

/// The server, as its embedder holds it: [`Server::listen`] starts its
/// control thread (CM events, handshakes, cid 0 and heartbeats of every
/// path, closing paths); dropping the handle stops it.
pub struct Server<F: Fabric, H: Handler> {
    cfg: SrvConfig,
    /// The fabric proves its peers (for listeners added later).
    authenticates: bool,
    tx: pollers::mpsc::Sender<SrvMsg>,
    shared: Arc<Shared<F>>,
    slow: Option<pollers::SlowPath<SrvControl<F, H>>>,
}

impl<F: Fabric, H: Handler> std::fmt::Debug for Server<F, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("cfg", &self.cfg)
            .field("paths", &self.paths().len())
            .finish()
    }
}

impl<F: Fabric, H: Handler> Server<F, H> {
    /// Listens on `addr` and starts the control thread. `make_handler`
    /// builds a handler per connection; `place` puts IO connections on
    /// cores.
    pub fn listen(
        fabric: &F,
        addr: &Address,
        cfg: SrvConfig,
        make_handler: impl FnMut(&ConInfo) -> H + Send + 'static,
        place: Place,
    ) -> Result<Server<F, H>, SrvError> {
        let (mut srv, lp) = Server::make(
            fabric,
            addr,
            cfg,
            Box::new(make_handler),
            place,
            pollers::clock::now(),
        )?;
        let opts = pollers::SlowOpts {
            name: "rtrs-srv-ctl".into(),
            cpu: srv.cfg.control_cpu,
            max_wait: crate::sess::CONTROL_TICK,
        };
        let slow = pollers::SlowPath::run(lp, srv.tx.clone(), pollers::Shutdown::new(), opts)
            .map_err(|_| SrvError::Config("cannot start the control thread"))?;
        srv.slow = Some(slow);
        Ok(srv)
    }

    /// [`Server::listen`] without a control thread: the returned
    /// [`pollers::Stepper`] is the server's control, stepped by the caller
    /// with `now` (an embedder's own event loop, or virtual time in tests).
    /// Until it is stepped nothing is accepted; stopping it closes every
    /// path. Calls on the handle that wait for the control (`listen_also`,
    /// `SrvHandle::close`) must come from another thread than the one that
    /// steps it.
    pub fn listen_stepped(
        fabric: &F,
        addr: &Address,
        cfg: SrvConfig,
        make_handler: impl FnMut(&ConInfo) -> H + Send + 'static,
        place: Place,
        now: minstant::Instant,
    ) -> Result<(Server<F, H>, pollers::Stepper), SrvError> {
        let (srv, lp) = Server::make(fabric, addr, cfg, Box::new(make_handler), place, now)?;
        Ok((srv, pollers::Stepper::new(lp)))
    }

    #[allow(clippy::type_complexity)]
    fn make(
        fabric: &F,
        addr: &Address,
        cfg: SrvConfig,
        make_handler: Box<dyn FnMut(&ConInfo) -> H + Send>,
        place: Place,
        now: minstant::Instant,
    ) -> Result<(Server<F, H>, pollers::SlowLoop<SrvControl<F, H>>), SrvError> {
        let layout = cfg.layout()?;
        cfg.limits
            .check_exposure(addr, fabric.authenticates_peers())?;
        let pd = fabric.alloc_pd_sized(cfg.limits.registrations(cfg.max_chunk_size))?;
        let mut cm = fabric.create_cm()?;
        if !cfg.limits.allow.is_empty() {
            // Turned away at the door where the fabric can (tcp), before a
            // handshake slot or a descriptor is spent; checked again on
            // every connect request (rdma, and shm peers are exempt).
            let limits = cfg.limits.clone();
            rtrs_fabric::Cm::admit(&mut cm, Arc::new(move |ip| limits.allows(ip)));
        }
        let lid = rtrs_fabric::Cm::listen(&mut cm, addr)?;
        tracing::info!(%addr, "listening");
        let shared = Arc::new(Shared::default());
        let control = SrvControl::new(
            pd,
            cm,
            (lid, addr.clone()),
            cfg.clone(),
            layout,
            make_handler,
            place,
            shared.clone(),
            now,
        );
        let (lp, tx) = pollers::SlowLoop::new(control, 256);
        Ok((
            Server {
                cfg,
                authenticates: fabric.authenticates_peers(),
                tx,
                shared,
                slow: None,
            },
            lp,
        ))
    }

    /// Also listens on `addr` (a server reachable on several addresses, as
    /// the kernel's listens on all of them: one path per address pair).
    pub fn listen_also(&self, addr: &Address) -> Result<(), SrvError> {
        self.cfg.limits.check_exposure(addr, self.authenticates)?;
        let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .push(SrvMsg::Listen(addr.clone(), rtx))
            .map_err(|_| SrvError::Gone)?;
        rrx.recv().unwrap_or(Err(SrvError::Gone))
    }

    /// Runs `f` on the control thread for every event from now on (keep
    /// it short: it delays the control work).
    pub fn on_event(&self, f: impl FnMut(&SrvEvent) + Send + 'static) -> Result<(), SrvError> {
        self.tx
            .push(SrvMsg::OnEvent(Box::new(f)))
            .map_err(|_| SrvError::Gone)
    }

    /// A new subscription to the server's events.
    pub fn subscribe(&self) -> std::sync::mpsc::Receiver<SrvEvent> {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut s) = self.shared.subs.lock() {
            s.push(tx);
        }
        rx
    }

    /// The settings.
    pub fn config(&self) -> &SrvConfig {
        &self.cfg
    }

    /// Live paths of all sessions.
    pub fn paths(&self) -> Vec<Arc<SrvPath<F>>> {
        self.shared.live_paths()
    }

    /// A handle for an operator's control plane (`rtrs ctl`).
    pub fn handle(&self) -> SrvHandle<F> {
        SrvHandle {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }

    /// The server's counters (refusals by kind, sessions and their
    /// memory), readable from any thread for as long as it is held.
    pub fn counters(&self) -> Arc<SrvCounters> {
        self.shared.counters.clone()
    }

    /// Closes every path and stops the control thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(s) = self.slow.take() {
            if s.stop().is_none() {
                tracing::error!("the server's control thread panicked");
            }
        }
    }
}

impl<F: Fabric, H: Handler> Drop for Server<F, H> {
    fn drop(&mut self) {
        self.halt();
    }
}
