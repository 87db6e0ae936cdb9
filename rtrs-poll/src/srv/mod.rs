//! The RTRS server: sessions of paths of connections, as the kernel's
//! rtrs-server runs them, over any fabric.
//!
//! ```text
//!  Server (control loop, slow-path thread)
//!    CM events: CONNECT_REQUEST -> checks of spec §4.3 -> session (chunks, one region)
//!                                -> path (MRs over the chunks) -> con (QP + CQ) -> accept
//!    cid 0 of each path: INFO_REQ -> INFO_RSP, heartbeat, admin IO    (polled here)
//!    IO cids: handed to cores as pollers (`place`)                    (polled there)
//!    closing paths: disconnect every con, drop the session with its last path
//!  SrvCon (one per cid): WRITE_WITH_IMM lands in a chunk -> Handler::on_io(usr, data)
//!    -> response chain: [RDMA_WRITE data] [SEND_WITH_INV] WRITE_WITH_IMM | REG + SEND(RKEY_RSP)
//! ```

mod con;
mod path;

pub use con::SrvCon;
pub use path::{ConCounters, PathState, PathStats, PathTotals, SrvPath};

use crate::fabric::{
    memory, Access, Address, Cm, CmEvent, ConnId, Fabric, FabricError, Mr, Pd, QpCap,
};
use crate::proto::imm::ImmLayout;
use crate::proto::{
    ConnReq, ConnReqRepr, ConnRspRepr, DEFAULT_MAX_CHUNK_SIZE, DEFAULT_SESS_QUEUE_DEPTH,
    MAX_HDR_SIZE, MAX_PATHS_NUM, MIN_CHUNK_SIZE, SERVICE_CON_QUEUE_DEPTH,
};
use minstant::Instant;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Server settings (the kernel module's parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrvConfig {
    /// Chunks per session (`sess_queue_depth`).
    pub queue_depth: u16,
    /// Bytes per chunk (`max_chunk_size`): a power of two, at least 8192.
    pub max_chunk_size: u32,
    /// Refresh a chunk's rkey after every IO (`always_invalidate`).
    pub always_invalidate: bool,
    /// Heartbeat interval (the kernel's: 5 s); a path is dead after
    /// `HB_MISSED_MAX` silent intervals.
    pub hb_interval: Duration,
}

impl Default for SrvConfig {
    fn default() -> SrvConfig {
        SrvConfig {
            queue_depth: DEFAULT_SESS_QUEUE_DEPTH as u16,
            max_chunk_size: DEFAULT_MAX_CHUNK_SIZE,
            always_invalidate: true,
            hb_interval: crate::sess::hb::HB_INTERVAL,
        }
    }
}

impl SrvConfig {
    /// Checks the settings as the kernel module does at load time.
    pub fn layout(&self) -> Result<ImmLayout, SrvError> {
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

/// An IO request as the handler sees it: zero-copy views into the chunk.
#[derive(Debug)]
pub struct SrvIo<'a> {
    /// Which IO, for a later completion.
    pub id: IoId,
    /// Write or read.
    pub dir: IoDir,
    /// The user header (an RNBD message, for RNBD).
    pub usr: &'a [u8],
    /// Write: the data written. Read: the buffer to fill (the requested
    /// length), sent to the client when the IO completes.
    pub data: &'a mut [u8],
}

/// What the handler did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Done now, with this errno (0 or negative).
    Done(i32),
    /// Completes later through [`Handler::poll_done`]; until then the chunk
    /// and `data` stay the handler's.
    Later,
}

/// The embedder's storage engine. One instance per connection, called on the
/// connection's core only (run to completion, no locks needed).
pub trait Handler: Send + 'static {
    /// A request arrived.
    fn on_io(&mut self, io: SrvIo<'_>) -> Verdict;
    /// Completions of [`Verdict::Later`] requests, polled until `None`.
    fn poll_done(&mut self) -> Option<(IoId, i32)> {
        None
    }
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
    /// The client's address.
    pub peer: String,
}

/// Where IO connections go: called once per IO cid with the connection as a
/// poller (e.g. `Cores::add` on core `(cid - 1) % cores`).
pub type Place = Box<dyn FnMut(u16, Box<dyn pollers::Poller>) + Send>;

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
        let cores = pollers::Cores::launch(
            cpus,
            pollers::Shutdown::new(),
            Duration::from_secs(1),
            |_| Vec::new(),
        )?;
        Ok(CorePool {
            n: cores.len().max(1),
            cores: Arc::new(std::sync::Mutex::new(Some(cores))),
        })
    }

    /// The [`Place`] that hands connections to these cores.
    pub fn place(&self) -> Place {
        let (cores, n) = (self.cores.clone(), self.n);
        Box::new(move |cid, con| {
            if let Ok(mut g) = cores.lock() {
                if let Some(c) = g.as_mut() {
                    if c.add((usize::from(cid).max(1) - 1) % n, con).is_err() {
                        tracing::warn!(cid, "a core's inbox is full: connection dropped");
                    }
                }
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

struct Sess<F: Fabric> {
    mem: Arc<dyn crate::fabric::Memory>,
    paths: Vec<Arc<SrvPath<F>>>,
}

struct ConRef {
    paths_uuid: [u8; 16],
    path: usize,
    cid: u16,
}

/// A closed path, for the embedder's logs and tests.
#[derive(Clone, Debug)]
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
    pub reason: String,
}

/// The server's control side: run [`Server::poll`] on the slow-path thread.
pub struct Server<F: Fabric, H: Handler> {
    pd: F::Pd,
    cm: F::Cm,
    cfg: SrvConfig,
    layout: ImmLayout,
    make_handler: Box<dyn FnMut(&ConInfo) -> H + Send>,
    place: Place,
    sessions: HashMap<[u8; 16], Sess<F>>,
    cons: HashMap<ConnId, ConRef>,
    service: Vec<SrvCon<F, H>>,
    closed: Vec<ClosedPath>,
}

impl<F: Fabric, H: Handler> std::fmt::Debug for Server<F, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("cfg", &self.cfg)
            .field("sessions", &self.sessions.len())
            .field("cons", &self.cons.len())
            .finish()
    }
}

impl<F: Fabric, H: Handler> Server<F, H> {
    /// Also listens on `addr` (a server reachable on several addresses, as
    /// the kernel's listens on all of them: one path per address pair).
    pub fn listen_also(&mut self, addr: &Address) -> Result<(), SrvError> {
        self.cm.listen(addr)?;
        Ok(())
    }

    /// Listens on `addr`. `make_handler` builds a handler per connection;
    /// `place` puts IO connections on cores.
    pub fn listen(
        fabric: &F,
        addr: &Address,
        cfg: SrvConfig,
        make_handler: impl FnMut(&ConInfo) -> H + Send + 'static,
        place: Place,
    ) -> Result<Server<F, H>, SrvError> {
        let layout = cfg.layout()?;
        let pd = fabric.alloc_pd()?;
        let mut cm = fabric.create_cm()?;
        cm.listen(addr)?;
        Ok(Server {
            pd,
            cm,
            cfg,
            layout,
            make_handler: Box::new(make_handler),
            place,
            sessions: HashMap::new(),
            cons: HashMap::new(),
            service: Vec::new(),
            closed: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SrvConfig {
        &self.cfg
    }

    /// One turn of the control loop: CM events (waiting up to `wait` for the
    /// first), the service connections, and closing paths. Returns the work
    /// done.
    pub fn poll(&mut self, now: Instant, wait: Duration) -> usize {
        let mut work = 0;
        let mut wait = wait;
        loop {
            match self.cm.poll_event(wait) {
                Ok(Some(ev)) => {
                    self.on_cm_event(ev);
                    work += 1;
                    wait = Duration::ZERO;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("cm: {e}");
                    break;
                }
            }
        }
        for con in &mut self.service {
            work += con.poll_at(now);
        }
        self.reap();
        work
    }

    /// Live paths of all sessions.
    pub fn paths(&self) -> impl Iterator<Item = &Arc<SrvPath<F>>> {
        self.sessions.values().flat_map(|s| s.paths.iter())
    }

    /// Paths closed so far, with their reasons (drained).
    pub fn take_closed(&mut self) -> Vec<ClosedPath> {
        std::mem::take(&mut self.closed)
    }

    fn on_cm_event(&mut self, ev: CmEvent) {
        match ev {
            CmEvent::ConnectRequest {
                id,
                listener,
                private_data,
                peer,
            } => {
                if let Err(errno) = self.on_connect(id, listener, private_data.as_bytes(), &peer) {
                    let mut rsp = [0u8; 56];
                    let _ = ConnRspRepr::reject(errno as i16).emit(&mut rsp);
                    if let Err(e) = self.cm.reject(id, &rsp) {
                        tracing::warn!("reject {peer}: {e}");
                    }
                }
            }
            CmEvent::Disconnected { id } => {
                if let Some(path) = self.path_of(id) {
                    path.close(u16::MAX, format_args!("disconnected"));
                }
            }
            _ => {}
        }
    }

    fn path_of(&self, id: ConnId) -> Option<Arc<SrvPath<F>>> {
        let r = self.cons.get(&id)?;
        self.sessions.get(&r.paths_uuid)?.paths.get(r.path).cloned()
    }

    /// Spec §4.3, in order. Err is the (positive) errno of the reject.
    fn on_connect(
        &mut self,
        id: ConnId,
        listener: ConnId,
        pd: &[u8],
        peer: &str,
    ) -> Result<(), i32> {
        let req = match ConnReq::new_checked(pd) {
            Ok(v) => ConnReqRepr::parse(&v),
            Err(e) => {
                tracing::warn!("connect from {peer} refused: {e}");
                return Err(libc::ECONNRESET);
            }
        };
        if !self.sessions.contains_key(&req.paths_uuid) {
            if !req.first_conn {
                tracing::warn!("connect from {peer}: no session and not first_conn");
                return Err(libc::ENXIO);
            }
            let len = self.cfg.queue_depth as usize * self.cfg.max_chunk_size as usize;
            let mem = memory::shareable(len).map_err(|e| {
                tracing::warn!("session chunks for {peer}: {e}");
                libc::ENOMEM
            })?;
            self.sessions.insert(
                req.paths_uuid,
                Sess {
                    mem,
                    paths: Vec::new(),
                },
            );
        }
        let sess = self.sessions.get_mut(&req.paths_uuid).ok_or(libc::ENXIO)?;
        let live = sess
            .paths
            .iter()
            .position(|p| p.sess_uuid == req.sess_uuid && p.state() < PathState::Closed);
        let (idx, path) = match live {
            Some(i) => {
                let p = sess.paths[i].clone();
                if p.state() != PathState::Connecting || p.cid_num != req.cid_num {
                    tracing::warn!("connect from {peer}: path exists and is {:?}", p.state());
                    return Err(libc::ECONNRESET);
                }
                // No cid twice in one path (the kernel's `con[cid]` check).
                if self
                    .cons
                    .values()
                    .any(|c| c.paths_uuid == req.paths_uuid && c.path == i && c.cid == req.cid)
                {
                    tracing::warn!("connect from {peer}: cid {} already connected", req.cid);
                    return Err(libc::ECONNRESET);
                }
                (i, p)
            }
            None => {
                let alive = sess.paths.iter().filter(|p| p.state() < PathState::Closing);
                if alive.clone().count() >= MAX_PATHS_NUM {
                    return Err(libc::ECONNRESET);
                }
                // The kernel refuses a second path between the same two
                // addresses (client host, server address; ports ignored).
                if alive
                    .clone()
                    .any(|p| p.listener == listener && host_of(&p.peer) == host_of(peer))
                {
                    tracing::warn!("connect from {peer}: a path from this address exists");
                    return Err(libc::EEXIST);
                }
                let mrs = register::<F>(&self.pd, &self.cfg, &sess.mem).map_err(|e| {
                    tracing::warn!("registering chunks for {peer}: {e}");
                    libc::ENOMEM
                })?;
                let p = Arc::new(SrvPath::new(
                    req.sess_uuid,
                    req.paths_uuid,
                    req.cid_num,
                    peer.to_string(),
                    listener,
                    self.layout,
                    self.cfg.queue_depth.into(),
                    self.cfg.max_chunk_size as usize,
                    self.cfg.always_invalidate,
                    self.cfg.hb_interval,
                    sess.mem.clone(),
                    mrs,
                ));
                sess.paths.push(p.clone());
                (sess.paths.len() - 1, p)
            }
        };
        let mut con = self.create_con(&path, req.cid).map_err(|e| {
            path.close(req.cid, format_args!("cannot create the connection: {e}"));
            libc::ENOMEM
        })?;
        let rsp = ConnRspRepr {
            errno: 0,
            queue_depth: self.cfg.queue_depth,
            max_io_size: self.cfg.max_io_size(),
            max_hdr_size: MAX_HDR_SIZE,
            new_rkey: self.cfg.always_invalidate,
        };
        let mut buf = [0u8; 56];
        let _ = rsp.emit(&mut buf);
        if let Err(e) = con.post_initial_recvs() {
            path.close(req.cid, format_args!("cannot post receives: {e}"));
            return Err(libc::ENOMEM);
        }
        if let Err(e) = self.cm.accept(id, con.qp(), &buf) {
            path.close(req.cid, format_args!("accept failed: {e}"));
            return Err(libc::ECONNRESET);
        }
        path.con_created();
        self.cons.insert(
            id,
            ConRef {
                paths_uuid: req.paths_uuid,
                path: idx,
                cid: req.cid,
            },
        );
        if req.cid == 0 {
            self.service.push(con);
        } else {
            (self.place)(req.cid, Box::new(con));
        }
        Ok(())
    }

    fn create_con(&mut self, path: &Arc<SrvPath<F>>, cid: u16) -> Result<SrvCon<F, H>, SrvError> {
        let qd = u32::from(self.cfg.queue_depth);
        let (send, recv, buf_len) = if cid == 0 {
            let info_rsp = 8 + 16 * qd as usize;
            (
                SERVICE_CON_QUEUE_DEPTH * 2 + 2,
                SERVICE_CON_QUEUE_DEPTH * 2 + 2,
                con::INFO_REQ_LEN + info_rsp.max(8 * qd as usize),
            )
        } else {
            // Per response at most: re-key, data write, SEND_WITH_INV and
            // the response; responses are signaled every queue depth, so
            // up to two queue depths of them sit in the queue unreaped.
            let per_io = if self.cfg.always_invalidate { 4 } else { 3 };
            let send = qd * per_io * 2 + 1;
            (send, qd + 1, 8 * qd as usize)
        };
        let cq = self.pd.create_cq(send + recv)?;
        let cap = QpCap {
            max_send_wr: send,
            max_recv_wr: recv,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
            rnr_retry: 7,
        };
        let qp = self.pd.create_qp(&cq, &cq, cap)?;
        let mem = memory::shareable(buf_len)?;
        let mr = self.pd.reg_mr(mem.clone(), Access::LOCAL_WRITE)?;
        Ok(SrvCon::new(
            path.clone(),
            cid,
            qp,
            cq,
            mem,
            mr,
            (self.make_handler)(&ConInfo {
                paths_uuid: path.paths_uuid,
                sess_uuid: path.sess_uuid,
                cid,
                peer: path.peer.clone(),
            }),
        ))
    }

    /// Tears down closing paths: disconnects their connections, forgets
    /// them, and drops a session with its last path.
    fn reap(&mut self) {
        let closing: Vec<([u8; 16], usize)> = self
            .sessions
            .iter()
            .flat_map(|(u, s)| {
                s.paths
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.state() == PathState::Closing)
                    .map(move |(i, _)| (*u, i))
            })
            .collect();
        for (uuid, i) in closing {
            let ids: Vec<ConnId> = self
                .cons
                .iter()
                .filter(|(_, c)| c.paths_uuid == uuid && c.path == i)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                let _ = self.cm.disconnect(id);
            }
            if let Some(s) = self.sessions.get(&uuid) {
                let p = &s.paths[i];
                p.set_closed();
                self.closed.push(ClosedPath {
                    paths_uuid: uuid,
                    session_ended: false,
                    sessname: p.sessname().map(str::to_string),
                    peer: p.peer.clone(),
                    reason: p.close_reason().unwrap_or("closed").to_string(),
                });
            }
        }
        self.service.retain(|c| c.path.state() < PathState::Closed);
        let dead: Vec<[u8; 16]> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.paths.iter().all(|p| p.state() == PathState::Closed))
            .map(|(u, _)| *u)
            .collect();
        for u in dead {
            if let Some(c) = self.closed.iter_mut().rev().find(|c| c.paths_uuid == u) {
                c.session_ended = true;
            }
            self.sessions.remove(&u);
            self.cons.retain(|_, c| c.paths_uuid != u);
        }
    }
}

/// MRs over the session's chunks for a new path: one per chunk with
/// always_invalidate, else one over them all. Each key is bumped once before
/// first use, as the kernel does.
fn register<F: Fabric>(
    pd: &F::Pd,
    cfg: &SrvConfig,
    mem: &Arc<dyn crate::fabric::Memory>,
) -> crate::fabric::Result<Vec<F::Mr>> {
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    let cs = cfg.max_chunk_size as usize;
    let qd = cfg.queue_depth as usize;
    let mrs = if cfg.always_invalidate {
        (0..qd)
            .map(|i| pd.reg_mr_range(mem.clone(), i * cs, cs, access))
            .collect::<crate::fabric::Result<Vec<_>>>()?
    } else {
        vec![pd.reg_mr_range(mem.clone(), 0, qd * cs, access)?]
    };
    for mr in &mrs {
        mr.rekey()?;
    }
    Ok(mrs)
}

/// The host part of a peer address ("tcp:1.2.3.4:5" -> "1.2.3.4"), for the
/// kernel's one-path-per-address rule (ports are ignored).
fn host_of(peer: &str) -> &str {
    let ip = peer.starts_with("tcp:") || peer.starts_with("rdma:");
    match peer.rsplit_once(':') {
        Some((h, _)) if ip => h,
        _ => peer,
    }
}
