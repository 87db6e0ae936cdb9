//! The RTRS client: a session of paths, each of one service connection
//! (cid 0) and one IO connection per core, as the kernel's rtrs-client.
//!
//! ```text
//!  Client (the embedder's handle)        commands ──> control thread (ctl, library-owned)
//!    open / add_path / remove_path /                  per path: a ClientPath machine
//!    disconnect / reconnect / subscribe               CON_REQ/RSP cid 0..=cores, INFO,
//!                     <── CltEvent (path up/down,     heartbeats (RTT), reconnects on
//!                         session lost/reconnected)   the kernel's schedule
//!  CltCore (one per core, the embedder's thread)  <── spsc: paths, cons, teardowns
//!    permit (= server chunk id) -> header slot     ──> mpsc: "path failed" reports
//!    [usr][rdma_write|rdma_read] -> WRITE_WITH_IMM on the path mp_policy picks
//!    -> response imm -> Completion on the same core; a failed path's IO moves over
//!  CltSess (shared): one registered region of QD data buffers and QD header
//!    slots, per-permit read MRs, the permit pool
//! ```

mod con;
mod core;
mod ctl;
mod machine;
mod msg;
mod path;

pub use self::core::{CltCore, Completion, Submitter};
pub use crate::sess::path::{PathState, ReconnectPolicy};
pub use crate::sess::DownReason;
pub use path::{CltPath, CoreStats, PathId, PathStats};

use crate::sess::mp_policy::MpPolicy;
use ctl::{CltControl, Shared};
use msg::{Cmd, CtlMsg};
use rtrs_fabric::{Access, Address, Fabric, FabricError, Memory, Mr, Pd};
use rtrs_proto::imm::ImmLayout;
use rtrs_proto::{ProtoError, NAME_MAX};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Direction of a client IO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Data to the server.
    Write,
    /// Data from the server.
    Read,
}

/// Most scatter-gather entries of one write's data.
pub const MAX_SG: usize = 8;

/// A permit: the right to one IO in flight, and the server chunk (and local
/// buffer) it uses. Not `Copy` or `Clone`: whoever holds it owns the buffer;
/// it is taken from the session's pool, lent to the core while its IO is in
/// flight, and comes back in the IO's [`Completion`].
#[derive(Debug, PartialEq, Eq)]
pub struct IoPermit(pub(crate) mempool::Slot);

impl IoPermit {
    /// The chunk id.
    pub fn id(&self) -> u32 {
        self.0.index()
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct CltConfig {
    /// The session name (no `/` or `.`, at most 254 bytes).
    pub sessname: String,
    /// The server's addresses, one path each.
    pub paths: Vec<Address>,
    /// Cores of the session (one [`CltCore`] each).
    pub cores: usize,
    /// Connections per path, cid 0 included: `None` (the default) one IO
    /// connection per core (`cores + 1`); the kernel's client makes
    /// `nr_cpus + 1` of them, whatever IO it does, so a server sees that
    /// many. With more IO connections than cores, each core takes several
    /// (connection `cid` goes to core `(cid - 1) % cores`) and sends its IO
    /// on them in turn.
    pub connections: Option<u16>,
    /// Cap on the data of one IO (and the size of each permit's buffer); the
    /// server's `max_io_size` when larger.
    pub max_io_size: u32,
    /// Path selection.
    pub mp_policy: MpPolicy,
    /// Reconnect delay, attempts and backoff.
    pub reconnect: ReconnectPolicy,
    /// How long each connection, and the INFO exchange, may take.
    pub connect_timeout: Duration,
    /// Heartbeat interval (the kernel's: 5 s).
    pub hb_interval: Duration,
    /// Missed heartbeats before a path is dead (the kernel's: 5).
    pub hb_missed_max: u32,
    /// How read buffers are keyed.
    pub read_keys: ReadKeys,
    /// A housekeeping CPU for the control thread; `None`: unpinned.
    pub control_cpu: Option<usize>,
    /// Where the session's uuids and its reconnect jitter come from: a
    /// fixed seed makes a run reproducible (simulations, tests); `None`
    /// (the default): random, as two clients must never share a uuid.
    pub seed: Option<u64>,
}

/// How the client exposes its read buffers (one per permit) to the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadKeys {
    /// Keyed once, for the session: each permit's buffer keeps one rkey, as
    /// userspace initiators do with memory registered once (SPDK's NVMe-oF
    /// host). The buffers are this session's own and hold nothing but data
    /// the server reads into them, so a read costs no re-key.
    #[default]
    Session,
    /// A fresh key for every read, invalidated before the read completes
    /// (by the server's SEND_WITH_INV where the fabric allows, else
    /// locally): the kernel client's fast registration per IO, so a server
    /// can write a buffer only while the read it was given is in flight.
    /// Costs a re-key and an invalidation per read.
    PerIo,
}

impl std::fmt::Display for ReadKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadKeys::Session => "session",
            ReadKeys::PerIo => "per-io",
        })
    }
}

impl std::str::FromStr for ReadKeys {
    type Err = String;
    fn from_str(s: &str) -> Result<ReadKeys, String> {
        match s {
            "session" => Ok(ReadKeys::Session),
            "per-io" => Ok(ReadKeys::PerIo),
            _ => Err(format!(
                "unknown read-keys {s:?} (expected session or per-io)"
            )),
        }
    }
}

impl CltConfig {
    /// Connections per path, cid 0 included.
    pub fn cid_num(&self) -> u16 {
        self.connections.unwrap_or(self.cores as u16 + 1)
    }

    /// A session `sessname` to `paths` with one core and the kernel's
    /// defaults otherwise.
    pub fn new(sessname: &str, paths: Vec<Address>) -> CltConfig {
        CltConfig {
            sessname: sessname.to_string(),
            paths,
            cores: 1,
            connections: None,
            max_io_size: 128 << 10,
            mp_policy: MpPolicy::default(),
            reconnect: ReconnectPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            hb_interval: crate::sess::hb::HB_INTERVAL,
            hb_missed_max: crate::sess::hb::HB_MISSED_MAX,
            read_keys: ReadKeys::default(),
            control_cpu: None,
            seed: None,
        }
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum CltError {
    /// Bad settings.
    #[error("client configuration: {0}")]
    Config(&'static str),
    /// The fabric failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// The server sent something malformed.
    #[error("protocol: {0}")]
    Proto(ProtoError),
    /// A path went down (or could not come up), with why.
    #[error("path {addr}: {reason}")]
    PathDown {
        /// The path's address.
        addr: String,
        /// Why.
        reason: DownReason,
    },
    /// The session already has a path to this address (-EEXIST).
    #[error("the session already has a path to {0}")]
    Exists(String),
    /// No path with this id (-ENOENT).
    #[error("no path {0}")]
    NoSuchPath(PathId),
    /// The last path of a session cannot be removed (-EBUSY).
    #[error("the last path of a session cannot be removed")]
    LastPath,
    /// The control thread is gone (the client is closing).
    #[error("the client's control thread is gone")]
    Gone,
    /// Header or data too large for the session's chunks (-EMSGSIZE).
    #[error("IO too large for the session's chunks")]
    MsgSize,
    /// No connected path could take the IO (-ECONNABORTED).
    #[error("no connected path")]
    NoPath,
    /// A ring is full, a core has too many submitters, or the path is busy
    /// connecting (-EBUSY).
    #[error("busy: a ring is full or the path is connecting")]
    Busy,
}

impl CltError {
    /// The kernel's errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            CltError::MsgSize => -libc::EMSGSIZE,
            CltError::NoPath => -libc::ECONNABORTED,
            CltError::Busy | CltError::LastPath => -libc::EBUSY,
            CltError::PathDown { reason, .. } => reason.errno(),
            CltError::Exists(_) => -libc::EEXIST,
            CltError::NoSuchPath(_) => -libc::ENOENT,
            CltError::Config(_) => -libc::EINVAL,
            _ => -libc::ECONNRESET,
        }
    }
}

/// What every core and the control loop share.
pub(crate) struct CltSess<F: Fabric> {
    pub(crate) queue_depth: u32,
    pub(crate) chunk_size: u32,
    pub(crate) max_hdr_size: u32,
    pub(crate) layout: ImmLayout,
    pub(crate) buf_size: usize,
    pub(crate) mem: Arc<dyn Memory>,
    /// The registrations on the first path's device (the others share it
    /// or have their own: [`PathMem`]).
    pub(crate) first: Arc<PathMem<F>>,
    /// The permits: slots of the data buffers, taken as tokens.
    pub(crate) slots: mempool::Slots,
    pub(crate) policy: AtomicU8,
    /// The server refreshes chunk keys (always_invalidate).
    pub(crate) new_rkey: bool,
    /// Ask the server to invalidate read buffers (NEED_INVAL): only where
    /// the fabric lets a peer invalidate our keys.
    pub(crate) need_inval: bool,
    /// [`ReadKeys::PerIo`]: re-key each read buffer per read.
    pub(crate) per_io_keys: bool,
}

impl<F: Fabric> CltSess<F> {
    /// Takes a permit, searching from `core`'s part of the pool.
    pub(crate) fn get_permit(&self, core: u32) -> Option<IoPermit> {
        self.slots.get(core).map(IoPermit)
    }
    /// Returns a permit to the pool.
    pub(crate) fn put_permit(&self, p: IoPermit) {
        if let Err(e) = self.slots.put(p.0) {
            // Cannot happen: a permit comes from this session's pool.
            tracing::error!("a permit of another session was put back: {e}");
        }
    }
    pub(crate) fn buf_off(&self, id: u32) -> usize {
        id as usize * self.buf_size
    }
    pub(crate) fn hdr_off(&self, id: u32) -> usize {
        self.queue_depth as usize * self.buf_size + id as usize * self.max_hdr_size as usize
    }
}

/// The session's memory registered on one device: what paths on that
/// device post from (`lmr`) and let the server write reads into (`rd_mrs`,
/// one per permit). Paths on one device share it.
pub(crate) struct PathMem<F: Fabric> {
    pub(crate) pd: F::Pd,
    pub(crate) lmr: F::Mr,
    pub(crate) rd_mrs: Vec<F::Mr>,
}

impl<F: Fabric> PathMem<F> {
    /// Registers the session's memory on `pd`'s device.
    pub(crate) fn register(
        pd: F::Pd,
        mem: &Arc<dyn Memory>,
        queue_depth: u32,
        buf_size: usize,
        per_io_keys: bool,
    ) -> rtrs_fabric::Result<PathMem<F>> {
        let lmr = pd.reg_mr(mem.clone(), Access::LOCAL_WRITE)?;
        let mut access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
        if per_io_keys {
            access = access | Access::PER_IO_KEY;
        }
        let rd_mrs = (0..queue_depth as usize)
            .map(|i| pd.reg_mr_range(mem.clone(), i * buf_size, buf_size, access))
            .collect::<rtrs_fabric::Result<Vec<_>>>()?;
        if per_io_keys {
            // Keyed per read: no key is valid until a read is submitted.
            for mr in &rd_mrs {
                mr.invalidate();
            }
        }
        Ok(PathMem { pd, lmr, rd_mrs })
    }
}

/// Geometry from cid 0's CON_RSP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) queue_depth: u16,
    pub(crate) max_io_size: u32,
    pub(crate) max_hdr_size: u32,
    pub(crate) new_rkey: bool,
}

/// What happened to a session's paths, for the embedder
/// ([`Client::subscribe`]); each is also logged once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CltEvent {
    /// A path came up (`reconnect`: it was up before).
    PathUp {
        /// The path.
        path: PathId,
        /// Its server address.
        addr: String,
        /// Whether this is a reconnect.
        reconnect: bool,
    },
    /// A path went down; its IO moved to the others; it reconnects on the
    /// kernel's schedule.
    PathDown {
        /// The path.
        path: PathId,
        /// Its server address.
        addr: String,
        /// Why.
        reason: DownReason,
    },
    /// A path closed for good (out of attempts, or disconnected by the
    /// operator); `reconnect_path` brings it back.
    PathClosed {
        /// The path.
        path: PathId,
        /// Its server address.
        addr: String,
        /// Why.
        reason: DownReason,
    },
    /// A path was removed.
    PathRemoved {
        /// The path.
        path: PathId,
        /// Its server address.
        addr: String,
    },
    /// The last connected path went down (the kernel's
    /// `RTRS_CLT_LINK_EV_DISCONNECTED`): new IO fails until a path is back.
    SessionLost,
    /// A path came up while none was (the kernel's
    /// `RTRS_CLT_LINK_EV_RECONNECTED`): the server may have dropped the
    /// session meanwhile, so upper layers re-open what they had open.
    SessionReconnected,
}

impl std::fmt::Display for CltEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CltEvent::PathUp {
                path,
                addr,
                reconnect,
            } => write!(
                f,
                "{path} {addr}: {}",
                if *reconnect { "reconnected" } else { "up" }
            ),
            CltEvent::PathDown { path, addr, reason } => {
                write!(f, "{path} {addr}: down ({reason}); IO moved to other paths")
            }
            CltEvent::PathClosed { path, addr, reason } => {
                write!(f, "{path} {addr}: closed ({reason})")
            }
            CltEvent::PathRemoved { path, addr } => write!(f, "{path} {addr}: removed"),
            CltEvent::SessionLost => f.write_str("session lost: no path is connected"),
            CltEvent::SessionReconnected => f.write_str("session reconnected"),
        }
    }
}

/// Events of one subscriber.
pub type Events = std::sync::mpsc::Receiver<CltEvent>;

/// The client session, as its embedder holds it. The session's control
/// (connects, heartbeats, reconnects) runs on a thread of its own that
/// this handle starts and stops; the embedder runs only its cores
/// ([`CltCore::poll`]). Methods take `&self`: the handle can be shared.
pub struct Client<F: Fabric> {
    sess: Arc<CltSess<F>>,
    geo_new_rkey: bool,
    sessname: String,
    tx: pollers::mpsc::Sender<CtlMsg<F>>,
    shared: Arc<Shared>,
    slow: Option<pollers::SlowPath<CltControl<F>>>,
}

impl<F: Fabric> std::fmt::Debug for Client<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("sessname", &self.sessname)
            .field("paths", &self.paths().len())
            .finish()
    }
}

/// An operator command on its way: the control answers once it has done
/// it (a path up, say). [`Call::wait`] blocks for the answer; [`Call::poll`]
/// does not, for a caller that steps the control itself.
#[derive(Debug)]
pub struct Call<T> {
    rx: std::sync::mpsc::Receiver<Result<T, CltError>>,
}

impl<T> Call<T> {
    /// The answer, waiting for it.
    pub fn wait(self) -> Result<T, CltError> {
        self.rx.recv().unwrap_or(Err(CltError::Gone))
    }

    /// The answer if it has come (`None`: not yet).
    pub fn poll(&self) -> Option<Result<T, CltError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(Err(CltError::Gone)),
        }
    }
}

/// A session being opened by a control the caller steps
/// ([`Client::open_stepped`]).
pub struct Opening<F: Fabric> {
    sessname: String,
    control_cpu: Option<usize>,
    tx: pollers::mpsc::Sender<CtlMsg<F>>,
    shared: Arc<Shared>,
    /// Set when the open failed: the control has nothing left to do.
    stop: pollers::Shutdown,
    reply: std::sync::mpsc::Receiver<Result<ctl::Opened<F>, CltError>>,
}

impl<F: Fabric> std::fmt::Debug for Opening<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opening({})", self.sessname)
    }
}

impl<F: Fabric> Opening<F> {
    /// The handle and the cores once every path is up, the error when the
    /// open failed; `None` while it goes on (step the control).
    #[allow(clippy::type_complexity)]
    pub fn poll(&mut self) -> Option<Result<(Client<F>, Vec<CltCore<F>>), CltError>> {
        match self.reply.try_recv() {
            Ok(Ok(o)) => Some(Ok(self.take(o))),
            Ok(Err(e)) => Some(Err(e)),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(Err(CltError::Gone)),
        }
    }

    fn take(&self, o: ctl::Opened<F>) -> (Client<F>, Vec<CltCore<F>>) {
        let (sess, mut cores) = o;
        let now = pollers::clock::now();
        for c in &mut cores {
            c.absorb(now);
        }
        (
            Client {
                geo_new_rkey: sess.new_rkey,
                sess,
                sessname: self.sessname.clone(),
                tx: self.tx.clone(),
                shared: self.shared.clone(),
                slow: None,
            },
            cores,
        )
    }

    fn finish(
        self,
        o: ctl::Opened<F>,
        slow: Option<pollers::SlowPath<CltControl<F>>>,
    ) -> (Client<F>, Vec<CltCore<F>>) {
        let (mut c, cores) = self.take(o);
        c.slow = slow;
        (c, cores)
    }
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32) ^ (&t as *const u64 as u64)
}

impl<F: Fabric> Client<F> {
    /// Opens the session: connects every path, one after another (all
    /// must come up, as `rtrs_clt_open` requires), on the session's own
    /// control thread, and returns the handle and one [`CltCore`] per core,
    /// to be moved to the core threads.
    pub fn open(fabric: &F, cfg: CltConfig) -> Result<(Client<F>, Vec<CltCore<F>>), CltError> {
        let (lp, pending) = Client::start(fabric, cfg, pollers::clock::now())?;
        let opts = pollers::SlowOpts {
            name: format!("rtrs-clt-{}", pending.sessname),
            cpu: pending.control_cpu,
            max_wait: crate::sess::CONTROL_TICK,
        };
        let slow = pollers::SlowPath::run(lp, pending.tx.clone(), pending.stop.clone(), opts)
            .map_err(|_| CltError::Config("cannot start the control thread"))?;
        let opened = pending.reply.recv().unwrap_or(Err(CltError::Gone));
        match opened {
            Ok(o) => Ok(pending.finish(o, Some(slow))),
            Err(e) => {
                slow.stop();
                Err(e)
            }
        }
    }

    /// [`Client::open`] without a control thread: the returned
    /// [`pollers::Stepper`] is the session's control, stepped by the caller
    /// with `now` (an embedder's own event loop, or virtual time in tests);
    /// [`Opening::poll`] says when the open is done. Commands on the handle
    /// wait for the control's answer: call them from another thread than
    /// the one that steps it.
    pub fn open_stepped(
        fabric: &F,
        cfg: CltConfig,
        now: minstant::Instant,
    ) -> Result<(Opening<F>, pollers::Stepper), CltError> {
        let (lp, pending) = Client::start(fabric, cfg, now)?;
        Ok((pending, pollers::Stepper::new(lp)))
    }

    fn start(
        fabric: &F,
        cfg: CltConfig,
        now: minstant::Instant,
    ) -> Result<(pollers::SlowLoop<CltControl<F>>, Opening<F>), CltError> {
        if cfg.sessname.is_empty()
            || cfg.sessname.len() >= NAME_MAX
            || cfg.sessname.contains(['/', '.'])
        {
            return Err(CltError::Config(
                "the session name must be 1..=254 bytes without '/' or '.'",
            ));
        }
        if cfg.paths.is_empty() || cfg.paths.len() > rtrs_proto::MAX_PATHS_NUM {
            return Err(CltError::Config("a session has 1..=128 paths"));
        }
        if cfg.cores == 0 || cfg.cores >= usize::from(rtrs_proto::MAX_CID_NUM) {
            return Err(CltError::Config("cores must be 1..4095"));
        }
        if let Some(n) = cfg.connections {
            if usize::from(n) < cfg.cores + 1 || n > rtrs_proto::MAX_CID_NUM {
                return Err(CltError::Config(
                    "connections per path must be cores + 1 (an IO connection for every core, and cid 0) up to 4096",
                ));
            }
        }
        if cfg.hb_interval.is_zero() {
            return Err(CltError::Config("the heartbeat interval must not be zero"));
        }
        let pd = fabric.alloc_pd()?;
        let cm = fabric.create_cm()?;
        let shared = Arc::new(Shared::default());
        let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel(1);
        let stop = pollers::Shutdown::new();
        let (tx, rx) = pollers::mpsc::channel(1024);
        let control = CltControl::new(
            pd.clone(),
            cm,
            cfg.clone(),
            cfg.seed.unwrap_or_else(random_seed),
            fabric.remote_invalidate(),
            shared.clone(),
            tx.clone(),
            stop.clone(),
            reply_tx,
            now,
        );
        let lp = pollers::SlowLoop::with_inbox(control, rx);
        Ok((
            lp,
            Opening {
                sessname: cfg.sessname,
                control_cpu: cfg.control_cpu,
                tx,
                shared,
                stop,
                reply: reply_rx,
            },
        ))
    }

    fn call<T>(&self, make: impl FnOnce(msg::Reply<T>) -> Cmd) -> Result<Call<T>, CltError> {
        let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .push(CtlMsg::Cmd(make(rtx)))
            .map_err(|_| CltError::Busy)?;
        Ok(Call { rx: rrx })
    }

    /// Adds a path to `addr` at runtime (the kernel's sysfs `add_path`):
    /// returns once it is up, or with why it could not come up (it is then
    /// removed again).
    pub fn add_path(&self, addr: Address) -> Result<PathId, CltError> {
        self.begin_add_path(addr)?.wait()
    }

    /// [`Client::add_path`], its answer to come: for a caller that must not
    /// wait (the thread that steps a control, [`Client::open_stepped`]).
    pub fn begin_add_path(&self, addr: Address) -> Result<Call<PathId>, CltError> {
        self.call(|r| Cmd::AddPath(addr, r))
    }

    /// Removes a path (the kernel's `remove_path`): its IO in flight moves
    /// to the others. The last path cannot be removed (-EBUSY).
    pub fn remove_path(&self, id: PathId) -> Result<(), CltError> {
        self.begin_remove_path(id)?.wait()
    }

    /// [`Client::remove_path`], its answer to come.
    pub fn begin_remove_path(&self, id: PathId) -> Result<Call<()>, CltError> {
        self.call(|r| Cmd::RemovePath(id, r))
    }

    /// Disconnects a path for good (the kernel's sysfs `disconnect`): its
    /// IO in flight moves to the other paths; it stays down until
    /// [`Client::reconnect_path`].
    pub fn disconnect_path(&self, id: PathId) -> Result<(), CltError> {
        self.begin_disconnect_path(id)?.wait()
    }

    /// [`Client::disconnect_path`], its answer to come.
    pub fn begin_disconnect_path(&self, id: PathId) -> Result<Call<()>, CltError> {
        self.call(|r| Cmd::Disconnect(id, r))
    }

    /// Reconnects a path now (the kernel's sysfs `reconnect`: after the
    /// 1 s backoff); returns once it is up, or why the attempt failed.
    /// -EBUSY while it is connecting.
    pub fn reconnect_path(&self, id: PathId) -> Result<(), CltError> {
        self.begin_reconnect_path(id)?.wait()
    }

    /// [`Client::reconnect_path`], its answer to come.
    pub fn begin_reconnect_path(&self, id: PathId) -> Result<Call<()>, CltError> {
        self.call(|r| Cmd::Reconnect(id, r))
    }

    /// Changes every path's reconnect delay and attempts at runtime (the
    /// kernel's `max_reconnect_attempts`, `reconnect_delay_sec`).
    pub fn set_reconnect(&self, policy: ReconnectPolicy) -> Result<(), CltError> {
        self.tx
            .push(CtlMsg::Cmd(Cmd::SetReconnect(policy)))
            .map_err(|_| CltError::Busy)
    }

    /// A new subscription to the session's events (each subscriber gets
    /// every event from now on).
    pub fn subscribe(&self) -> Events {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut s) = self.shared.subs.lock() {
            s.push(tx);
        }
        rx
    }

    /// The session's figures: every path's summed (the address and state
    /// fields are left empty; the heartbeat RTT is the lowest of the paths).
    pub fn stats(&self) -> PathStats {
        let mut t = PathStats::default();
        let mut rtt: Option<Duration> = None;
        for p in self.paths() {
            let s = p.stats();
            t.ios += s.ios;
            t.bytes += s.bytes;
            t.errors += s.errors;
            t.inflight += s.inflight;
            t.failovers += s.failovers;
            t.reconnects += s.reconnects;
            t.failed_reconnects += s.failed_reconnects;
            t.downs += s.downs;
            t.hb_missed_peak = t.hb_missed_peak.max(s.hb_missed_peak);
            if s.hb_rtt > Duration::ZERO {
                rtt = Some(rtt.map_or(s.hb_rtt, |r| r.min(s.hb_rtt)));
            }
        }
        t.hb_rtt = rtt.unwrap_or_default();
        t
    }

    /// The session's live paths, in the order they were added.
    pub fn paths(&self) -> Vec<Arc<CltPath>> {
        self.shared
            .paths
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// A live path by id.
    pub fn path(&self, id: PathId) -> Option<Arc<CltPath>> {
        self.paths().into_iter().find(|p| p.id() == id)
    }

    /// Registers the caller's memory for [`CltCore::write_sg`] (its sg
    /// entries come from the returned MR: `mr.sge(offset, len)`). It is
    /// registered on the first path's device: where a session's paths are
    /// on several RDMA devices, `write_sg` goes on that device's paths.
    pub fn reg_buf(&self, mem: Arc<dyn Memory>) -> Result<F::Mr, CltError> {
        Ok(self.sess.first.pd.reg_mr(mem, Access::LOCAL_WRITE)?)
    }

    /// The session's queue depth (the server's).
    pub fn queue_depth(&self) -> u32 {
        self.sess.queue_depth
    }

    /// Whether the server refreshes chunk keys (always_invalidate).
    pub fn always_invalidate(&self) -> bool {
        self.geo_new_rkey
    }

    /// Bytes of the session's registered memory: a data buffer and a
    /// header slot per permit (what the session costs the client, beside
    /// its connections).
    pub fn memory_bytes(&self) -> usize {
        self.sess.mem.len()
    }

    /// Permits in use.
    pub fn permits_in_use(&self) -> u32 {
        self.sess.slots.in_use()
    }

    /// Switches the multipath policy at runtime.
    pub fn set_mp_policy(&self, p: MpPolicy) {
        self.sess.policy.store(p.code(), Ordering::Relaxed);
    }

    /// The session's name.
    pub fn sessname(&self) -> &str {
        &self.sessname
    }

    /// The multipath policy now (the kernel's sysfs `mpath_policy`).
    pub fn mp_policy(&self) -> MpPolicy {
        MpPolicy::from_code(self.sess.policy.load(Ordering::Relaxed))
    }

    /// Closes the session: every path is torn down (IO in flight completes
    /// with -ECONNABORTED on its core) and the control thread stops.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(s) = self.slow.take() {
            if s.stop().is_none() {
                tracing::error!(sessname = %self.sessname, "the control thread panicked");
            }
        }
    }
}

impl<F: Fabric> Drop for Client<F> {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn make_sess<F: Fabric>(
    pd: &F::Pd,
    cfg: &CltConfig,
    geo: Geometry,
) -> Result<CltSess<F>, CltError> {
    let qd = u32::from(geo.queue_depth);
    if qd == 0 || geo.max_hdr_size < 64 || geo.max_io_size == 0 {
        return Err(CltError::Config(
            "the server's CON_RSP has an unusable geometry",
        ));
    }
    let chunk_size = geo.max_io_size + geo.max_hdr_size;
    let layout = ImmLayout::new(qd, chunk_size).map_err(CltError::Proto)?;
    let buf_size = geo.max_io_size.min(cfg.max_io_size).max(1) as usize;
    let len = qd as usize * (buf_size + geo.max_hdr_size as usize);
    // Data buffers first (the permits' slots), header slots after.
    let region =
        Arc::new(mempool::Region::shareable(len).map_err(|e| {
            FabricError::io("create the session's buffers", std::io::Error::other(e))
        })?);
    let slots = mempool::Slots::new(region.clone(), 0, buf_size, qd, cfg.cores as u32)
        .map_err(|e| FabricError::io("carve the session's buffers", std::io::Error::other(e)))?;
    let mem: Arc<dyn Memory> = region;
    let per_io_keys = cfg.read_keys == ReadKeys::PerIo;
    let first = Arc::new(PathMem::register(
        pd.clone(),
        &mem,
        qd,
        buf_size,
        per_io_keys,
    )?);
    Ok(CltSess {
        queue_depth: qd,
        chunk_size,
        max_hdr_size: geo.max_hdr_size,
        layout,
        buf_size,
        mem,
        first,
        slots,
        new_rkey: geo.new_rkey,
        policy: AtomicU8::new(cfg.mp_policy.code()),
        need_inval: per_io_keys,
        per_io_keys,
    })
}
