//! The server's control thread: CM events (connect checks, accepts,
//! rejects), every path's cid 0 (INFO_REQ, heartbeats), and closing paths
//! (their connections disconnected, a session dropped with its last path).
//! IO connections go to the embedder's cores through `place`. The only wait
//! is the CM's bounded wait for its next event.
//!
//! ```text
//!  CM ──events──> SrvControl ── accept: cid 0 kept here, IO cids -> place(cid, con)
//!  Server handle ──SrvMsg──┘    reap: Closing paths -> disconnect -> Closed -> SrvEvent
//! ```

use super::con::{SrvCon, RKEY_RSP_LEN};
use super::path::{PathState, SrvPath};
use super::{ClosedPath, ConInfo, Handler, Place, Refusal, SrvConfig, SrvError, SrvEvent};
use crate::fabric::{
    memory, Access, Address, Cm, CmEvent, CmRefusal, ConnId, Fabric, Mr, Pd, QpCap,
};
use crate::proto::imm::ImmLayout;
use crate::proto::{
    ConnReq, ConnReqRepr, ConnRspRepr, MAX_HDR_SIZE, MAX_PATHS_NUM, PRIVATE_DATA_LEN,
    SERVICE_CON_QUEUE_DEPTH,
};
use crate::sess::DownReason;
use minstant::Instant;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An event callback, run on the control thread.
pub(crate) type OnEvent = Box<dyn FnMut(&SrvEvent) + Send>;

/// What reaches the control thread.
pub(crate) enum SrvMsg {
    /// Listen on one more address.
    Listen(Address, std::sync::mpsc::SyncSender<Result<(), SrvError>>),
    /// Run a callback on every event from now on.
    OnEvent(OnEvent),
    /// The operator closes paths (`rtrs ctl disconnect` / `close`): the
    /// reply is how many were open.
    Close(super::CloseTarget, std::sync::mpsc::SyncSender<usize>),
}

/// What the handle and the control thread share.
pub(crate) struct Shared<F: Fabric> {
    pub(crate) paths: Mutex<Vec<Arc<SrvPath<F>>>>,
    pub(crate) subs: Mutex<Vec<std::sync::mpsc::Sender<SrvEvent>>>,
    pub(crate) counters: Arc<super::SrvCounters>,
}

impl<F: Fabric> Shared<F> {
    /// The paths as last published (not closed yet).
    pub(crate) fn live_paths(&self) -> Vec<Arc<SrvPath<F>>> {
        self.paths.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl<F: Fabric> Default for Shared<F> {
    fn default() -> Self {
        Shared {
            paths: Mutex::new(Vec::new()),
            subs: Mutex::new(Vec::new()),
            counters: Arc::default(),
        }
    }
}

struct Sess<F: Fabric> {
    /// The source host of the connect that made it.
    host: String,
    /// Chunk memory it holds (bytes), under the memory budget.
    bytes: u64,
    /// Whether that memory is a slab of the preallocated chunk pool (else
    /// a region of its own).
    pooled: bool,
    mem: Arc<dyn crate::fabric::Memory>,
    /// The session's chunks, claimed one request at a time.
    chunks: Arc<mempool::Claims>,
    paths: Vec<Arc<SrvPath<F>>>,
}

struct ConRef {
    paths_uuid: [u8; 16],
    path: usize,
    cid: u16,
}

/// At most one refusal log line per kind this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// How soon the control thread offers a connection again to a core whose
/// inbox was full.
const UNPLACED_RETRY: Duration = Duration::from_millis(1);

/// The server's control state, run by its slow-path thread.
pub(crate) struct SrvControl<F: Fabric, H: Handler> {
    pub(crate) pd: F::Pd,
    pub(crate) cm: F::Cm,
    pub(crate) cfg: SrvConfig,
    pub(crate) layout: ImmLayout,
    pub(crate) make_handler: Box<dyn FnMut(&ConInfo) -> H + Send>,
    pub(crate) place: Place,
    sessions: HashMap<[u8; 16], Sess<F>>,
    /// What each listener listens on: a path's PD is on that address's
    /// device.
    listeners: HashMap<ConnId, Address>,
    cons: HashMap<ConnId, ConRef>,
    service: Vec<SrvCon<F, H>>,
    /// IO connections a core could not take yet (its inbox was full),
    /// offered again at every step, in order.
    /// (cid, connection, counted as deferred yet).
    unplaced: std::collections::VecDeque<(u16, Box<dyn pollers::Poller>, bool)>,
    shared: Arc<Shared<F>>,
    callbacks: Vec<OnEvent>,
    cm_failing: bool,
    /// Refusal log lines: when the last went out per kind, and how many
    /// refusals came since.
    log_gate: HashMap<Refusal, (Instant, u64)>,
    /// Session chunk memory preallocated at start (`Limits::prealloc_sessions`).
    pool: Option<Arc<mempool::ChunkPool<F::Mr>>>,
    /// New sessions are getting memory of their own (the pool is taken).
    pool_overflowing: bool,
    /// A CM event that ended the last wait, taken at the next step.
    woke_by: Option<CmEvent>,
    /// The time of the last step.
    now: Instant,
}

/// Counts a pool slab in use while the session's chunks live (they outlive
/// the session while a path or core still holds them).
struct SlabInUse(Arc<super::SrvCounters>);

impl SlabInUse {
    fn new(c: &Arc<super::SrvCounters>) -> SlabInUse {
        c.slab_taken(true);
        SlabInUse(c.clone())
    }
}

impl Drop for SlabInUse {
    fn drop(&mut self) {
        self.0.slab_taken(false);
    }
}

/// Registers the chunk pool's region on a PD (local access: remote keys are
/// made per path over each session's own slab).
struct PdRegistrar<'a, F: Fabric>(&'a F::Pd);

impl<F: Fabric> mempool::Registrar for PdRegistrar<'_, F> {
    type Handle = F::Mr;
    type Error = crate::fabric::FabricError;
    fn register(&mut self, region: &Arc<mempool::Region>) -> Result<F::Mr, Self::Error> {
        let mem: Arc<dyn crate::fabric::Memory> = region.clone();
        self.0.reg_mr(mem, Access::LOCAL_WRITE)
    }
}

impl<F: Fabric, H: Handler> SrvControl<F, H> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pd: F::Pd,
        cm: F::Cm,
        listener: (ConnId, Address),
        cfg: SrvConfig,
        layout: ImmLayout,
        make_handler: Box<dyn FnMut(&ConInfo) -> H + Send>,
        place: Place,
        shared: Arc<Shared<F>>,
    ) -> SrvControl<F, H> {
        SrvControl {
            listeners: HashMap::from([listener]),
            pd,
            cm,
            cfg,
            layout,
            make_handler,
            place,
            sessions: HashMap::new(),
            cons: HashMap::new(),
            service: Vec::new(),
            unplaced: std::collections::VecDeque::new(),
            shared,
            callbacks: Vec::new(),
            cm_failing: false,
            log_gate: HashMap::new(),
            pool: None,
            pool_overflowing: false,
            woke_by: None,
            now: Instant::now(),
        }
        .with_pool()
    }

    /// Preallocates the chunk pool: `prealloc_sessions` session slabs
    /// (queue_depth x max_chunk_size each, within the memory budget) in one
    /// shareable region, from hugepages when reserved, touched now and
    /// registered once on the server's PD. Without it (none asked, or the
    /// memory is not there) sessions get regions of their own, as before:
    /// logged once, counted.
    fn with_pool(mut self) -> Self {
        let slab = usize::from(self.cfg.queue_depth) * self.cfg.max_chunk_size as usize;
        let fit = (self.cfg.limits.memory_budget / slab.max(1) as u64) as usize;
        let n = self.cfg.limits.prealloc_sessions.min(fit);
        if n == 0 {
            return self;
        }
        let made = mempool::Region::shareable(n * slab)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                r.prefault();
                let mut reg = PdRegistrar::<F>(&self.pd);
                mempool::ChunkPool::new(Arc::new(r), slab, &mut reg).map_err(|e| e.to_string())
            });
        match made {
            Ok(pool) => {
                let huge = pool.region().is_huge();
                tracing::info!(
                    "chunk pool: {n} sessions x {} MiB preallocated on {} and registered once",
                    slab >> 20,
                    if huge {
                        "2 MiB hugepages"
                    } else {
                        "4 KiB pages (no hugepages free)"
                    }
                );
                self.shared.counters.set_pool(n, huge);
                self.pool = Some(Arc::new(pool));
            }
            Err(e) => {
                tracing::warn!(
                    "chunk pool of {n} sessions x {} MiB not preallocated ({e}): each session gets memory of its own",
                    slab >> 20
                );
                self.shared.counters.pool_failed();
            }
        }
        self
    }

    /// Logs the event (one line; a session's first path up and its last
    /// path closed add the session's own line) and tells the embedder.
    fn emit(&mut self, ev: SrvEvent) {
        match &ev {
            SrvEvent::PathUp {
                sessname,
                paths_uuid,
                ..
            } => {
                let connected = self.sessions.get(paths_uuid).map_or(0, |s| {
                    s.paths
                        .iter()
                        .filter(|p| p.state() == PathState::Connected)
                        .count()
                });
                if connected == 1 {
                    tracing::info!(sessname = %sessname, "session {sessname} connected");
                }
                tracing::info!("{ev}");
            }
            SrvEvent::PathClosed(c) => {
                let who = c.sessname.as_deref().unwrap_or("?");
                let line = format!("path {who} ({}) closed: {}", c.peer, c.reason);
                // A peer's or the operator's close is the normal course
                // (flushed work requests follow a peer's disconnect); the
                // rest are failures.
                match c.reason {
                    DownReason::Completion {
                        status: crate::fabric::WcStatus::WrFlushErr,
                        ..
                    }
                    | DownReason::Disconnected { .. }
                    | DownReason::Operator
                    | DownReason::Removed
                    | DownReason::SessionClosed => tracing::info!("{line}"),
                    _ => tracing::warn!("{line}"),
                }
                if c.session_ended {
                    tracing::info!(sessname = %who, "session {who} closed");
                }
            }
            SrvEvent::Refused { .. } => tracing::warn!("{ev}"),
        }
        self.notify(ev);
    }

    /// Tells the embedder's callbacks and subscribers (no log line).
    fn notify(&mut self, ev: SrvEvent) {
        for f in &mut self.callbacks {
            f(&ev);
        }
        if let Ok(mut subs) = self.shared.subs.lock() {
            subs.retain(|s| s.send(ev.clone()).is_ok());
        }
    }

    fn refuse(&mut self, peer: &str, r: Refused) {
        self.shared.counters.refused(r.kind);
        let ev = SrvEvent::Refused {
            peer: peer.to_string(),
            kind: r.kind,
            errno: -r.errno,
            why: r.why,
        };
        // A flood is not a flood of log lines: one line per kind per
        // second, then how many more there were (every one is counted and
        // reaches the event subscribers).
        let now = self.now;
        let gate = self.log_gate.entry(r.kind).or_insert((now, 0));
        if now.saturating_duration_since(gate.0) >= REFUSAL_LOG_EVERY || gate.1 == 0 {
            let more = gate.1.saturating_sub(1);
            *gate = (now, 1);
            if more > 0 {
                tracing::warn!(
                    "{more} more refusals of kind {} in the last second",
                    r.kind.name()
                );
            }
            self.emit(ev);
        } else {
            gate.1 += 1;
            self.notify(ev);
        }
    }

    /// The chunks of a new session: a slab of the chunk pool while one is
    /// free, else a region of its own within the memory budget (logged once
    /// per run of overflows, counted). The slab goes back to the pool when
    /// the last path and core holding the chunks let go of them.
    fn session_chunks(
        &mut self,
        qd: u16,
        cs: usize,
    ) -> Result<(Arc<dyn crate::fabric::Memory>, mempool::Claims, bool), Refused> {
        let bytes = usize::from(qd) * cs;
        let memory = |e: mempool::PoolError| {
            refused(
                Refusal::Memory,
                libc::ENOMEM,
                format!("session chunks: {e}"),
            )
        };
        if let Some(pool) = &self.pool {
            if let Ok(lease) = pool.lease() {
                self.pool_overflowing = false;
                let region = pool.region().clone();
                let chunks = mempool::Claims::new_at(region.clone(), lease.offset(), cs, qd.into())
                    .map_err(memory)?
                    .keeping((lease, SlabInUse::new(&self.shared.counters)));
                self.shared.counters.pool_session();
                return Ok((region, chunks, true));
            }
        }
        let pool_bytes = self.pool.as_ref().map_or(0, |p| p.region().len() as u64);
        let held: u64 = self
            .sessions
            .values()
            .filter(|s| !s.pooled)
            .map(|s| s.bytes)
            .sum();
        let budget = self.cfg.limits.memory_budget;
        if pool_bytes + held + bytes as u64 > budget {
            return Err(refused(
                Refusal::Memory,
                libc::ENOMEM,
                format!(
                    "the memory budget ({} MiB, {} MiB of it preallocated) has {} MiB left, a session takes {} MiB",
                    budget >> 20,
                    pool_bytes >> 20,
                    budget.saturating_sub(pool_bytes + held) >> 20,
                    bytes >> 20
                ),
            ));
        }
        if self.pool.is_some() && !self.pool_overflowing {
            self.pool_overflowing = true;
            tracing::warn!(
                "the chunk pool's {} preallocated sessions are taken: new sessions get chunk memory of their own (within the budget) until one is free; preallocate more with --prealloc-sessions",
                self.cfg.limits.prealloc_sessions
            );
        }
        self.shared.counters.own_chunks_session();
        let region = mempool::Region::shareable(bytes)
            .map(Arc::new)
            .map_err(memory)?;
        let chunks = mempool::Claims::new(region.clone(), cs, qd.into()).map_err(memory)?;
        Ok((region, chunks, false))
    }

    /// Closes the paths `target` names (gracefully: each connection is
    /// disconnected at the next step, the client reconnects as after the
    /// kernel's sysfs `disconnect`); logged and counted once per path.
    fn close_by_operator(&mut self, target: super::CloseTarget) -> usize {
        let mut n = 0;
        for s in self.sessions.values() {
            for p in &s.paths {
                let hit = match target {
                    super::CloseTarget::Path(u) => p.sess_uuid == u,
                    super::CloseTarget::Session(u) => p.paths_uuid == u,
                };
                if hit && p.state() < PathState::Closing {
                    tracing::info!(
                        peer = %p.peer,
                        sessname = ?p.sessname(),
                        "the operator closes the path"
                    );
                    p.close(DownReason::Operator);
                    self.shared.counters.operator_close();
                    n += 1;
                }
            }
        }
        n
    }

    fn publish_sessions(&self) {
        let bytes = self.sessions.values().map(|s| s.bytes).sum();
        self.shared
            .counters
            .set_sessions(self.sessions.len(), bytes);
    }

    /// Connections of `host` in paths still in their handshake.
    fn handshakes_of(&self, host: &str) -> usize {
        self.cons
            .values()
            .filter(|c| {
                self.sessions
                    .get(&c.paths_uuid)
                    .and_then(|s| s.paths.get(c.path))
                    .is_some_and(|p| p.state() == PathState::Connecting && host_of(&p.peer) == host)
            })
            .count()
    }

    /// Paths that did not finish their handshake in time are closed (their
    /// session, and its memory, go with its last path).
    fn reap_handshakes(&mut self, now: Instant) {
        let limit = self.cfg.limits.handshake_timeout;
        for s in self.sessions.values() {
            for p in &s.paths {
                if p.state() == PathState::Connecting
                    && now.saturating_duration_since(p.born) > limit
                {
                    p.close(DownReason::Timeout {
                        cid: 0,
                        step: crate::sess::Step::Info,
                    });
                }
            }
        }
    }

    /// One pass: CM events (the one that ended the last wait first), cid 0
    /// of every path, closing paths.
    fn step(&mut self, now: Instant) {
        if let Some(ev) = self.woke_by.take() {
            self.on_cm_event(ev);
        }
        loop {
            match self.cm.poll_event(Duration::ZERO) {
                Ok(Some(ev)) => self.on_cm_event(ev),
                Ok(None) => break,
                Err(e) => {
                    if !self.cm_failing {
                        self.cm_failing = true;
                        tracing::warn!("server CM: {e}");
                    }
                    break;
                }
            }
        }
        let mut newly_up = Vec::new();
        for con in &mut self.service {
            let was = con.path.state();
            con.poll_at(now);
            // Once more: a software fabric sends what the first poll posted
            // (an ack, INFO_RSP) when its CQ is polled, and the loop may
            // sleep next.
            con.poll_at(now);
            if was == PathState::Connecting && con.path.state() == PathState::Connected {
                newly_up.push(con.path.clone());
            }
        }
        self.reap_handshakes(now);
        if !self.unplaced.is_empty() {
            self.place_waiting();
        }
        for p in newly_up {
            self.emit(SrvEvent::PathUp {
                sessname: p.sessname().unwrap_or("?").to_string(),
                peer: p.peer.clone(),
                paths_uuid: p.paths_uuid,
            });
        }
        self.reap();
    }

    /// Hands waiting IO connections to their cores, in order, until one
    /// cannot take more.
    fn place_waiting(&mut self) {
        while let Some((cid, con, counted)) = self.unplaced.pop_front() {
            match (self.place)(cid, con) {
                Ok(()) => continue,
                Err(con) => self.unplaced.push_front((cid, con, counted)),
            }
            // Every connection now waiting is counted once; the log line is
            // once per backlog (it says how many wait).
            let new = self.unplaced.iter().filter(|(_, _, c)| !c).count();
            if new > 0 && self.unplaced.len() == new {
                tracing::warn!(
                    cid,
                    waiting = new,
                    "a core's inbox is full: new connections wait for the next step"
                );
            }
            for (_, _, c) in self.unplaced.iter_mut().filter(|(_, _, c)| !*c) {
                *c = true;
                self.shared.counters.deferred_placement();
            }
            return;
        }
    }

    fn publish_paths(&self) {
        if let Ok(mut l) = self.shared.paths.lock() {
            *l = self
                .sessions
                .values()
                .flat_map(|s| s.paths.iter())
                .filter(|p| p.state() < PathState::Closed)
                .cloned()
                .collect();
        }
    }

    fn on_cm_event(&mut self, ev: CmEvent) {
        match ev {
            CmEvent::ConnectRequest {
                id,
                listener,
                private_data,
                peer,
                key_id,
            } => {
                let pd = private_data.as_bytes();
                if let Err(r) = self.on_connect(id, listener, pd, &peer, key_id) {
                    let mut rsp = [0u8; PRIVATE_DATA_LEN];
                    if let Err(e) = ConnRspRepr::reject(-(r.errno as i16)).emit(&mut rsp) {
                        tracing::warn!("reject {peer}: {e}");
                    }
                    if let Err(e) = self.cm.reject(id, &rsp) {
                        tracing::warn!("reject {peer}: {e}");
                    }
                    self.refuse(&peer, r);
                }
            }
            CmEvent::Disconnected { id } => {
                let cid = self.cons.get(&id).map_or(0, |r| r.cid);
                if let Some(path) = self.path_of(id) {
                    path.close(DownReason::Disconnected { cid });
                }
            }
            CmEvent::Refused {
                peer, why, detail, ..
            } => {
                let (kind, errno) = match why {
                    CmRefusal::Access => (Refusal::Access, libc::EACCES),
                    CmRefusal::Auth => (Refusal::Auth, libc::EACCES),
                    CmRefusal::Malformed => (Refusal::Protocol, libc::EPROTO),
                    CmRefusal::TimedOut => (Refusal::Timeout, libc::ETIMEDOUT),
                    CmRefusal::Handshakes => (Refusal::Handshakes, libc::EBUSY),
                    CmRefusal::Resources => (Refusal::Resources, libc::EMFILE),
                };
                self.refuse(&peer, refused(kind, errno, detail));
            }
            _ => {}
        }
    }

    fn path_of(&self, id: ConnId) -> Option<Arc<SrvPath<F>>> {
        let r = self.cons.get(&id)?;
        self.sessions.get(&r.paths_uuid)?.paths.get(r.path).cloned()
    }

    /// The access rules and limits, then spec §4.3 in order, each refusal
    /// with its errno, kind and why (the caller logs and counts it once).
    fn on_connect(
        &mut self,
        id: ConnId,
        listener: ConnId,
        pd: &[u8],
        peer: &str,
        key_id: Option<String>,
    ) -> Result<(), Refused> {
        let host = host_of(peer).to_string();
        let limits = &self.cfg.limits;
        if !limits.allow.is_empty() {
            // shm peers are local processes: the segment's permissions
            // guard them, not source networks.
            let ok = match ip_of(&host) {
                Some(ip) => limits.allows(ip),
                None => peer.starts_with("shm:"),
            };
            if !ok {
                return Err(refused(
                    Refusal::Access,
                    libc::EACCES,
                    "not in the allowlist",
                ));
            }
        }
        let req = match ConnReq::new_checked(pd) {
            Ok(v) => ConnReqRepr::parse(&v),
            Err(e) => {
                return Err(refused(
                    Refusal::Protocol,
                    libc::ECONNRESET,
                    format!("CON_REQ: {e}"),
                ))
            }
        };
        if self.handshakes_of(&host) >= limits.max_handshakes_per_host {
            return Err(refused(
                Refusal::Handshakes,
                libc::EBUSY,
                format!(
                    "{} connections of this host in handshakes",
                    limits.max_handshakes_per_host
                ),
            ));
        }
        if !self.sessions.contains_key(&req.paths_uuid) {
            if !req.first_conn {
                return Err(refused(
                    Refusal::Protocol,
                    libc::ENXIO,
                    "no such session and not first_conn",
                ));
            }
            if self.sessions.len() >= limits.max_sessions {
                return Err(refused(
                    Refusal::Sessions,
                    libc::ENOMEM,
                    format!("{} sessions already", limits.max_sessions),
                ));
            }
            let of_host = self.sessions.values().filter(|s| s.host == host).count();
            if of_host >= limits.max_sessions_per_host {
                return Err(refused(
                    Refusal::SessionsPerHost,
                    libc::ENOMEM,
                    format!("{of_host} sessions of this host already"),
                ));
            }
            let (qd, cs) = (self.cfg.queue_depth, self.cfg.max_chunk_size as usize);
            let (mem, chunks, pooled) = self.session_chunks(qd, cs)?;
            self.sessions.insert(
                req.paths_uuid,
                Sess {
                    host: host.clone(),
                    bytes: (usize::from(qd) * cs) as u64,
                    pooled,
                    mem,
                    chunks: Arc::new(chunks),
                    paths: Vec::new(),
                },
            );
            self.publish_sessions();
        }
        let sess = self
            .sessions
            .get_mut(&req.paths_uuid)
            .ok_or_else(|| refused(Refusal::Protocol, libc::ENXIO, "no such session"))?;
        let live = sess
            .paths
            .iter()
            .position(|p| p.sess_uuid == req.sess_uuid && p.state() < PathState::Closed);
        let (idx, path) = match live {
            Some(i) => {
                let p = sess.paths[i].clone();
                if p.state() != PathState::Connecting || p.cid_num != req.cid_num {
                    return Err(refused(
                        Refusal::Protocol,
                        libc::ECONNRESET,
                        format!("path exists and is {:?}", p.state()),
                    ));
                }
                // No cid twice in one path (the kernel's `con[cid]` check).
                if self
                    .cons
                    .values()
                    .any(|c| c.paths_uuid == req.paths_uuid && c.path == i && c.cid == req.cid)
                {
                    return Err(refused(
                        Refusal::Protocol,
                        libc::ECONNRESET,
                        format!("cid {} already connected", req.cid),
                    ));
                }
                (i, p)
            }
            None => {
                let alive = sess.paths.iter().filter(|p| p.state() < PathState::Closing);
                let most = self.cfg.limits.max_paths_per_session.min(MAX_PATHS_NUM);
                if alive.clone().count() >= most {
                    return Err(refused(
                        Refusal::Paths,
                        libc::ECONNRESET,
                        format!("the session has {most} paths"),
                    ));
                }
                // The kernel refuses a second path between the same two
                // addresses (client host, server address; ports ignored).
                if alive
                    .clone()
                    .any(|p| p.listener == listener && host_of(&p.peer) == host_of(peer))
                {
                    return Err(refused(
                        Refusal::Duplicate,
                        libc::EEXIST,
                        "a path from this address exists",
                    ));
                }
                // The path's PD is on its listener's device (each link's
                // own, where a host has several).
                let pd = match self.listeners.get(&listener) {
                    Some(a) => self.pd.for_address(a, true).map_err(|e| {
                        refused(
                            Refusal::Protocol,
                            libc::ENODEV,
                            format!("the device of {a}: {e}"),
                        )
                    })?,
                    None => self.pd.clone(),
                };
                self.check_registrations(peer, req.cid_num)?;
                let sess = self
                    .sessions
                    .get_mut(&req.paths_uuid)
                    .expect("the session was found above");
                let mrs =
                    register::<F>(&pd, &self.cfg, &sess.mem, sess.chunks.base()).map_err(|e| {
                        refused(
                            Refusal::Memory,
                            libc::ENOMEM,
                            format!("registering chunks: {e}"),
                        )
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
                    (self.cfg.hb_interval, self.cfg.hb_missed_max),
                    sess.chunks.clone(),
                    pd,
                    mrs,
                    key_id,
                ));
                sess.paths.push(p.clone());
                (sess.paths.len() - 1, p)
            }
        };
        let cid = req.cid;
        let local = |what: String| DownReason::Local { cid, what };
        let mut con = self.create_con(&path, req.cid).map_err(|e| {
            let what = format!("cannot create the connection: {e}");
            path.close(local(what.clone()));
            refused(Refusal::Memory, libc::ENOMEM, what)
        })?;
        let rsp = ConnRspRepr {
            errno: 0,
            queue_depth: self.cfg.queue_depth,
            max_io_size: self.cfg.max_io_size(),
            max_hdr_size: MAX_HDR_SIZE,
            new_rkey: self.cfg.always_invalidate,
        };
        let mut buf = [0u8; PRIVATE_DATA_LEN];
        rsp.emit(&mut buf)
            .map_err(|e| refused(Refusal::Protocol, libc::EINVAL, format!("CON_RSP: {e}")))?;
        if let Err(e) = con.post_initial_recvs() {
            let what = format!("cannot post receives: {e}");
            path.close(local(what.clone()));
            return Err(refused(Refusal::Memory, libc::ENOMEM, what));
        }
        if let Err(e) = self.cm.accept(id, con.qp(), &buf) {
            let what = format!("accept failed: {e}");
            path.close(local(what.clone()));
            return Err(refused(Refusal::Protocol, libc::ECONNRESET, what));
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
            self.unplaced.push_back((req.cid, Box::new(con), false));
            self.place_waiting();
        }
        self.publish_paths();
        Ok(())
    }

    /// The registration table's share: a new path of `cid_num` connections
    /// from `peer` must fit in the table, and its host in a quarter of it.
    fn check_registrations(&self, peer: &str, cid_num: u16) -> Result<(), Refused> {
        let cap = u64::from(self.cfg.limits.registrations(self.cfg.max_chunk_size));
        let need = path_registrations(&self.cfg, cid_num);
        let host = host_of(peer);
        let (mut all, mut of_host) = (0u64, 0u64);
        for p in self.sessions.values().flat_map(|s| &s.paths) {
            let n = path_registrations(&self.cfg, p.cid_num);
            all += n;
            if host_of(&p.peer) == host {
                of_host += n;
            }
        }
        if all + need > cap {
            return Err(refused(
                Refusal::Memory,
                libc::ENOMEM,
                format!("the registration table is full ({all} of {cap} held, {need} asked)"),
            ));
        }
        if of_host + need > cap / 4 {
            return Err(refused(
                Refusal::Memory,
                libc::ENOMEM,
                format!(
                    "this host holds {of_host} registrations; a host may hold a quarter of {cap}"
                ),
            ));
        }
        Ok(())
    }

    fn create_con(&mut self, path: &Arc<SrvPath<F>>, cid: u16) -> Result<SrvCon<F, H>, SrvError> {
        let qd = u32::from(self.cfg.queue_depth);
        // With always_invalidate the 8-byte RKEY_RSP goes inline: the peer
        // finds it in the request itself (on shm: in the descriptor's cache
        // line) instead of fetching it from our memory. On every connection:
        // the kernel's client sends its admin IO (RNBD's open) on cid 0.
        let inline = if self.cfg.always_invalidate {
            RKEY_RSP_LEN as u32
        } else {
            0
        };
        let (send, recv, buf_len) = if cid == 0 {
            let info_rsp =
                crate::proto::InfoRsp::<&[u8]>::HDR_LEN + crate::proto::SgDesc::LEN * qd as usize;
            (
                SERVICE_CON_QUEUE_DEPTH * 2 + 2,
                SERVICE_CON_QUEUE_DEPTH * 2 + 2,
                super::con::INFO_REQ_LEN + info_rsp.max(RKEY_RSP_LEN * qd as usize),
            )
        } else {
            // Per response at most: re-key, data write, SEND_WITH_INV and
            // the response; responses are signaled every queue depth, so
            // up to two queue depths of them sit in the queue unreaped.
            let per_io = if self.cfg.always_invalidate { 4 } else { 3 };
            let send = qd * per_io * 2 + 1;
            (send, qd + 1, RKEY_RSP_LEN * qd as usize)
        };
        let pd = &path.pd;
        let cq = pd.create_cq(send + recv)?;
        let cap = QpCap {
            max_send_wr: send,
            max_recv_wr: recv,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: inline,
            rnr_retry: 7,
        };
        let qp = pd.create_qp(&cq, &cq, cap)?;
        let mem = memory::shareable(buf_len)?;
        let mr = pd.reg_mr(mem.clone(), Access::LOCAL_WRITE)?;
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
                queue_depth: path.queue_depth,
                chunk_memory: Some(path.chunks.region().clone()),
                peer: path.peer.clone(),
                identity: path.identity().clone(),
            }),
        ))
    }

    /// Tears down closing paths: disconnects their connections, forgets
    /// them, and drops a session with its last path.
    fn reap(&mut self) {
        let mut closed = Vec::new();
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
                if let Err(e) = self.cm.disconnect(id) {
                    tracing::debug!("disconnect: {e}");
                }
            }
            if let Some(s) = self.sessions.get(&uuid) {
                let p = &s.paths[i];
                p.set_closed();
                closed.push(ClosedPath {
                    paths_uuid: uuid,
                    session_ended: false,
                    sessname: p.sessname().map(str::to_string),
                    peer: p.peer.clone(),
                    reason: p
                        .close_reason()
                        .cloned()
                        .unwrap_or(DownReason::SessionClosed),
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
            if let Some(c) = closed.iter_mut().rev().find(|c| c.paths_uuid == u) {
                c.session_ended = true;
            }
            self.sessions.remove(&u);
            self.cons.retain(|_, c| c.paths_uuid != u);
        }
        if !closed.is_empty() {
            self.publish_paths();
            self.publish_sessions();
        }
        for c in closed {
            self.emit(SrvEvent::PathClosed(c));
        }
    }
}

impl<F: Fabric, H: Handler> pollers::Control for SrvControl<F, H> {
    type Msg = SrvMsg;

    fn on_msg(&mut self, msg: SrvMsg, _now: Instant) {
        match msg {
            SrvMsg::Listen(addr, reply) => {
                let r = self.cm.listen(&addr).map_err(SrvError::from).map(|id| {
                    self.listeners.insert(id, addr.clone());
                });
                if r.is_ok() {
                    tracing::info!(%addr, "listening");
                }
                let _ = reply.send(r);
            }
            SrvMsg::OnEvent(f) => self.callbacks.push(f),
            SrvMsg::Close(target, reply) => {
                let _ = reply.send(self.close_by_operator(target));
            }
        }
    }

    fn poll(&mut self, now: Instant) {
        self.now = now;
        // A client's beat about to land: answer it as it comes (its RTT
        // steers the client's min-latency), not at the next tick.
        for c in &mut self.service {
            let on = c
                .peer_hb_window()
                .is_some_and(|(from, to)| from <= now && now <= to);
            c.set_watching(on);
        }
        self.step(now);
    }

    fn wait(&mut self, max: Duration) {
        match self.cm.poll_event(max) {
            Ok(Some(ev)) => self.woke_by = Some(ev),
            Ok(None) => {}
            Err(e) => {
                if !self.cm_failing {
                    self.cm_failing = true;
                    tracing::warn!("server CM: {e}");
                }
                std::thread::sleep(max);
            }
        }
    }

    fn on_stop(&mut self, now: Instant) {
        self.now = now;
        for s in self.sessions.values() {
            for p in &s.paths {
                p.close(DownReason::SessionClosed);
            }
        }
        self.reap();
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let now = self.now;
        if !self.unplaced.is_empty() {
            // A core's inbox was full: offer again soon.
            return Some(now + UNPLACED_RETRY);
        }
        if self.service.iter().any(|c| c.watching()) {
            return Some(now);
        }
        let beats = self.service.iter().filter_map(SrvCon::hb_deadline);
        let watch = self
            .service
            .iter()
            .filter_map(SrvCon::peer_hb_window)
            .filter(|&(_, to)| now <= to)
            .map(|(from, _)| from);
        beats.chain(watch).min()
    }
}

/// Why a connect request is refused.
pub(crate) struct Refused {
    kind: Refusal,
    /// Positive.
    errno: i32,
    why: String,
}

fn refused(kind: Refusal, errno: i32, why: impl Into<String>) -> Refused {
    Refused {
        kind,
        errno,
        why: why.into(),
    }
}

/// The IP of a host part ("tcp:1.2.3.4", "rdma:[::1]"); none for shm.
fn ip_of(host: &str) -> Option<std::net::IpAddr> {
    let h = host
        .strip_prefix("tcp:")
        .or_else(|| host.strip_prefix("rdma:"))?;
    h.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// MRs over the session's chunks (from `base` in `mem`) for a new path: one per chunk with
/// always_invalidate, else one over them all. Each key is bumped once before
/// first use, as the kernel does.
fn register<F: Fabric>(
    pd: &F::Pd,
    cfg: &SrvConfig,
    mem: &Arc<dyn crate::fabric::Memory>,
    base: usize,
) -> crate::fabric::Result<Vec<F::Mr>> {
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    let cs = cfg.max_chunk_size as usize;
    let qd = cfg.queue_depth as usize;
    let mrs = if cfg.always_invalidate {
        (0..qd)
            .map(|i| pd.reg_mr_range(mem.clone(), base + i * cs, cs, access))
            .collect::<crate::fabric::Result<Vec<_>>>()?
    } else {
        vec![pd.reg_mr_range(mem.clone(), base, qd * cs, access)?]
    };
    for mr in &mrs {
        mr.rekey()?;
    }
    Ok(mrs)
}

/// Registrations a path takes: its chunks' (one each with
/// always_invalidate, one for them all otherwise) and one per connection.
fn path_registrations(cfg: &SrvConfig, cid_num: u16) -> u64 {
    let chunks = if cfg.always_invalidate {
        u64::from(cfg.queue_depth)
    } else {
        1
    };
    chunks + u64::from(cid_num)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_hosts_and_ips() {
        assert_eq!(host_of("tcp:127.0.0.1:5000"), "tcp:127.0.0.1");
        assert_eq!(ip_of("tcp:127.0.0.1"), "127.0.0.1".parse().ok());
        assert_eq!(ip_of(host_of("rdma:[::1]:1234")), "::1".parse().ok());
        assert_eq!(ip_of(host_of("shm:x@pid7")), None);
        let l = super::super::Limits {
            allow: vec![
                "10.0.0.0/8".parse().unwrap(),
                "127.0.0.0/8".parse().unwrap(),
            ],
            ..Default::default()
        };
        assert!(l.allows("127.0.0.1".parse().unwrap()));
        assert!(!l.allows("192.168.0.1".parse().unwrap()));
    }
}
