//! The server's control driver: the I/O half of the server's control
//! thread. It owns the CM, the listeners, the chunk memory (the pool and
//! each session's), each path's registrations and connections (cid 0 polled
//! here, IO connections handed to the embedder's cores through `place`);
//! the decisions (admission, closing, reaping, events) are
//! [`SrvMachine`]'s. Every step feeds the machine what arrived (CM events,
//! the paths' states as their connections set them) and does the actions
//! it gives, each result reported back before the next. It reads no clock:
//! `now` comes from the loop that steps it (the control thread's, or a
//! test's virtual one); its only wait is the CM's bounded wait for its next
//! event.
//!
//! ```text
//!  CM ──events──> SrvMachine ──Accept(plan)──> driver: memory, MRs, con, accept
//!  Server handle ──SrvMsg──┘  └─Close / Disconnect / Closed / DropSession / Emit
//!  cid 0 of each path: polled here (INFO_REQ, heartbeat)   IO cids -> place(cid, con)
//! ```

use super::admit::{refused, Memory as MemView, Refused};
use super::con::{SrvCon, RKEY_RSP_LEN};
use super::machine::{Plan, Request, SrvAction, SrvMachine};
use super::path::{PathState, SrvPath};
use super::{ConInfo, Handler, Place, Refusal, SrvConfig, SrvError, SrvEvent};
use crate::sess::DownReason;
use minstant::Instant;
use rtrs_fabric::{memory, Access, Address, Cm, CmEvent, CmEvents, ConnId, Fabric, Mr, Pd, QpCap};
use rtrs_proto::imm::ImmLayout;
use rtrs_proto::{
    ConnReqRepr, ConnRspRepr, MAX_HDR_SIZE, PRIVATE_DATA_LEN, SERVICE_CON_QUEUE_DEPTH,
};
use std::collections::{BTreeMap, HashMap};
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

/// A session's chunk memory.
struct SessMem {
    mem: Arc<dyn rtrs_fabric::Memory>,
    /// The session's chunks, claimed one request at a time.
    chunks: Arc<mempool::Claims>,
}

/// How soon the control thread offers a connection again to a core whose
/// inbox was full.
const UNPLACED_RETRY: Duration = Duration::from_millis(1);

/// The server's control: [`SrvMachine`] and the I/O it asks for.
pub(crate) struct SrvControl<F: Fabric, H: Handler> {
    pub(crate) pd: F::Pd,
    pub(crate) cm: F::Cm,
    pub(crate) cfg: SrvConfig,
    pub(crate) layout: ImmLayout,
    pub(crate) make_handler: Box<dyn FnMut(&ConInfo) -> H + Send>,
    pub(crate) place: Place,
    m: SrvMachine,
    sessions: HashMap<[u8; 16], SessMem>,
    paths: BTreeMap<u64, Arc<SrvPath<F>>>,
    /// What each listener listens on: a path's PD is on that address's
    /// device.
    listeners: HashMap<ConnId, Address>,
    service: Vec<SrvCon<F, H>>,
    /// IO connections a core could not take yet (its inbox was full),
    /// offered again at every step, in order.
    /// (cid, connection, counted as deferred yet).
    unplaced: std::collections::VecDeque<(u16, Box<dyn pollers::Poller>, bool)>,
    shared: Arc<Shared<F>>,
    callbacks: Vec<OnEvent>,
    /// Session chunk memory preallocated at start (`Limits::prealloc_sessions`).
    pool: Option<Arc<mempool::ChunkPool<F::Mr>>>,
    /// New sessions are getting memory of their own (the pool is taken).
    pool_overflowing: bool,
    /// The CM's events (one that ended the last wait first).
    events: CmEvents,
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
    type Error = rtrs_fabric::FabricError;
    fn register(&mut self, region: &Arc<mempool::Region>) -> Result<F::Mr, Self::Error> {
        let mem: Arc<dyn rtrs_fabric::Memory> = region.clone();
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
        now: Instant,
    ) -> SrvControl<F, H> {
        SrvControl {
            listeners: HashMap::from([listener]),
            pd,
            cm,
            m: SrvMachine::new(cfg.clone(), now),
            cfg,
            layout,
            make_handler,
            place,
            sessions: HashMap::new(),
            paths: BTreeMap::new(),
            service: Vec::new(),
            unplaced: std::collections::VecDeque::new(),
            shared,
            callbacks: Vec::new(),
            pool: None,
            pool_overflowing: false,
            events: CmEvents::new("server"),
            now,
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
                rtrs_proto::InfoRsp::<&[u8]>::HDR_LEN + rtrs_proto::SgDesc::LEN * qd as usize;
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

    /// Tells the embedder's callbacks and subscribers.
    fn notify(&mut self, ev: SrvEvent) {
        for f in &mut self.callbacks {
            f(&ev);
        }
        if let Ok(mut subs) = self.shared.subs.lock() {
            subs.retain(|s| s.send(ev.clone()).is_ok());
        }
    }

    /// Does the machine's actions until it has none; returns how many.
    fn run(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(a) = self.m.poll_action() {
            n += usize::from(!matches!(a, SrvAction::Publish { .. }));
            self.exec(a, now);
        }
        n
    }

    fn exec(&mut self, a: SrvAction, now: Instant) {
        match a {
            SrvAction::Accept {
                id,
                listener,
                req,
                plan,
                peer,
                key_id,
            } => match self.accept(id, listener, &req, &plan, &peer, key_id, now) {
                Ok(pooled) => self
                    .m
                    .accepted(id, req.paths_uuid, plan.path(), req.cid, pooled),
                Err(r) => self.m.accept_failed(id, &peer, r),
            },
            SrvAction::Refuse { id, refused } => {
                self.shared.counters.refused(refused.kind);
                if let Some(id) = id {
                    let mut rsp = [0u8; PRIVATE_DATA_LEN];
                    if let Err(e) = ConnRspRepr::reject(-(refused.errno as i16)).emit(&mut rsp) {
                        tracing::warn!("reject: {e}");
                    }
                    if let Err(e) = self.cm.reject(id, &rsp) {
                        tracing::warn!("reject: {e}");
                    }
                }
            }
            SrvAction::Close { path, why } => {
                let reason = self.paths.get(&path).and_then(|p| {
                    p.close(why);
                    p.close_reason().cloned()
                });
                self.m.path_closing(path, reason);
            }
            SrvAction::Disconnect(ids) => {
                for id in ids {
                    if let Err(e) = self.cm.disconnect(id) {
                        tracing::debug!("disconnect: {e}");
                    }
                }
            }
            SrvAction::Closed { path } => {
                if let Some(p) = self.paths.remove(&path) {
                    p.set_closed();
                }
                self.service.retain(|c| c.path.state() < PathState::Closed);
                self.publish_paths();
            }
            SrvAction::DropSession(u) => {
                self.sessions.remove(&u);
            }
            SrvAction::Publish { sessions, bytes } => {
                self.shared.counters.set_sessions(sessions, bytes);
            }
            SrvAction::Emit(ev) => self.notify(ev),
        }
    }

    /// Makes what `plan` says and accepts connection `id`; returns whether
    /// a new session's memory is a slab of the pool. On failure what it made
    /// is dropped (a path it already had is closed).
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        id: ConnId,
        listener: ConnId,
        req: &ConnReqRepr,
        plan: &Plan,
        peer: &str,
        key_id: Option<String>,
        now: Instant,
    ) -> Result<bool, Refused> {
        let mut pooled = false;
        if let Plan::NewSession { .. } = plan {
            let (mem, chunks, p) = self.session_chunks()?;
            pooled = p;
            self.sessions.insert(
                req.paths_uuid,
                SessMem {
                    mem,
                    chunks: Arc::new(chunks),
                },
            );
        }
        let made = match plan {
            Plan::NextCid { path } => self
                .paths
                .get(path)
                .cloned()
                .ok_or_else(|| refused(Refusal::Protocol, libc::ENXIO, "no such path")),
            Plan::NewSession { .. } | Plan::NewPath { .. } => {
                self.new_path(listener, req, peer, key_id, now)
            }
        };
        let path = match made {
            Ok(p) => p,
            Err(r) => {
                if let Plan::NewSession { .. } = plan {
                    self.sessions.remove(&req.paths_uuid);
                }
                return Err(r);
            }
        };
        let new_path = !matches!(plan, Plan::NextCid { .. });
        match self.accept_con(id, &path, req) {
            Ok(()) => {
                if new_path {
                    self.paths.insert(plan.path(), path);
                }
                self.publish_paths();
                Ok(pooled)
            }
            Err((what, r)) => {
                if new_path {
                    if let Plan::NewSession { .. } = plan {
                        self.sessions.remove(&req.paths_uuid);
                    }
                } else {
                    let cid = req.cid;
                    path.close(DownReason::Local { cid, what });
                    self.m
                        .path_closing(plan.path(), path.close_reason().cloned());
                }
                Err(r)
            }
        }
    }

    /// A new path of the session `req` names: its device, its MRs.
    fn new_path(
        &mut self,
        listener: ConnId,
        req: &ConnReqRepr,
        peer: &str,
        key_id: Option<String>,
        now: Instant,
    ) -> Result<Arc<SrvPath<F>>, Refused> {
        // The path's PD is on its listener's device (each link's own,
        // where a host has several).
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
        let sess = self
            .sessions
            .get(&req.paths_uuid)
            .ok_or_else(|| refused(Refusal::Protocol, libc::ENXIO, "no such session"))?;
        let mrs = register::<F>(&pd, &self.cfg, &sess.mem, sess.chunks.base()).map_err(|e| {
            refused(
                Refusal::Memory,
                libc::ENOMEM,
                format!("registering chunks: {e}"),
            )
        })?;
        Ok(Arc::new(SrvPath::new(
            req.sess_uuid,
            req.paths_uuid,
            req.cid_num,
            peer.to_string(),
            self.layout,
            self.cfg.queue_depth.into(),
            self.cfg.max_chunk_size as usize,
            self.cfg.always_invalidate,
            (self.cfg.hb_interval, self.cfg.hb_missed_max),
            sess.chunks.clone(),
            pd,
            mrs,
            key_id,
            now,
        )))
    }

    /// Connection `req.cid` of `path`: made, its receives posted, accepted;
    /// cid 0 stays here, the others go to the cores.
    fn accept_con(
        &mut self,
        id: ConnId,
        path: &Arc<SrvPath<F>>,
        req: &ConnReqRepr,
    ) -> Result<(), (String, Refused)> {
        let mut con = self.create_con(path, req.cid).map_err(|e| {
            let what = format!("cannot create the connection: {e}");
            (what.clone(), refused(Refusal::Memory, libc::ENOMEM, what))
        })?;
        let rsp = ConnRspRepr {
            errno: 0,
            queue_depth: self.cfg.queue_depth,
            max_io_size: self.cfg.max_io_size(),
            max_hdr_size: MAX_HDR_SIZE,
            new_rkey: self.cfg.always_invalidate,
        };
        let mut buf = [0u8; PRIVATE_DATA_LEN];
        rsp.emit(&mut buf).map_err(|e| {
            let what = format!("CON_RSP: {e}");
            (what.clone(), refused(Refusal::Protocol, libc::EINVAL, what))
        })?;
        if let Err(e) = con.post_initial_recvs() {
            let what = format!("cannot post receives: {e}");
            return Err((what.clone(), refused(Refusal::Memory, libc::ENOMEM, what)));
        }
        if let Err(e) = self.cm.accept(id, con.qp(), &buf) {
            let what = format!("accept failed: {e}");
            return Err((
                what.clone(),
                refused(Refusal::Protocol, libc::ECONNRESET, what),
            ));
        }
        path.con_created();
        if req.cid == 0 {
            self.service.push(con);
        } else {
            self.unplaced.push_back((req.cid, Box::new(con), false));
            self.place_waiting();
        }
        Ok(())
    }

    /// The chunks of a new session: a slab of the chunk pool while one is
    /// free, else a region of its own (admission checked the budget; logged
    /// once per run of overflows, counted). The slab goes back to the pool
    /// when the last path and core holding the chunks let go of them.
    fn session_chunks(
        &mut self,
    ) -> Result<(Arc<dyn rtrs_fabric::Memory>, mempool::Claims, bool), Refused> {
        let (qd, cs) = (self.cfg.queue_depth, self.cfg.max_chunk_size as usize);
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

    /// What a new session's memory would come from, for admission.
    fn memory_view(&self) -> MemView {
        MemView {
            slab_free: self.pool.as_ref().is_some_and(|p| {
                let s = p.stats();
                s.in_use < u64::from(s.chunks)
            }),
            pool_bytes: self.pool.as_ref().map_or(0, |p| p.region().len() as u64),
        }
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
            let mut v: Vec<(u64, Arc<SrvPath<F>>)> = self
                .paths
                .iter()
                .filter(|(_, p)| p.state() < PathState::Closed)
                .map(|(k, p)| (*k, p.clone()))
                .collect();
            v.sort_by_key(|(k, _)| *k);
            *l = v.into_iter().map(|(_, p)| p).collect();
        }
    }

    fn on_cm_event(&mut self, ev: CmEvent, now: Instant) -> usize {
        match ev {
            CmEvent::ConnectRequest {
                id,
                listener,
                private_data,
                peer,
                key_id,
            } => {
                let mem = self.memory_view();
                let r = Request {
                    id,
                    listener,
                    pdata: private_data.as_bytes(),
                    peer: &peer,
                    key_id,
                };
                self.m.connect_request(r, mem, now);
            }
            CmEvent::Disconnected { id } => self.m.disconnected(id, now),
            CmEvent::Refused {
                peer, why, detail, ..
            } => self.m.cm_refused(&peer, why, detail, now),
            _ => {}
        }
        1 + self.run(now)
    }

    /// Tells the machine what the paths' connections did: a path whose
    /// INFO_REQ was taken is up, one a core or cid 0 closed is closing.
    fn observe_paths(&mut self) {
        let mut seen = Vec::new();
        for (&id, p) in &self.paths {
            let Some((up, closing)) = self.m.path_view(id) else {
                continue;
            };
            let st = p.state();
            if st >= PathState::Closing && !closing {
                seen.push((id, None, Some(p.close_reason().cloned())));
            } else if st == PathState::Connected && !up {
                seen.push((id, p.sessname().map(str::to_string), None));
            }
        }
        for (id, name, closing) in seen {
            match closing {
                Some(why) => self.m.path_closing(id, why),
                None => self.m.path_up(id, name.as_deref().unwrap_or("?")),
            }
        }
    }

    /// One pass: CM events (the one that ended the last wait first), cid 0
    /// of every path, the machine's deadlines, closing paths; returns the
    /// work done.
    fn step(&mut self, now: Instant) -> usize {
        let mut work = 0;
        while let Some(ev) = self.events.next(&mut self.cm) {
            work += self.on_cm_event(ev, now);
        }
        for con in &mut self.service {
            work += con.poll_at(now);
            // Once more: a software fabric sends what the first poll posted
            // (an ack, INFO_RSP) when its CQ is polled, and the loop may
            // wait next.
            work += con.poll_at(now);
        }
        if !self.unplaced.is_empty() {
            self.place_waiting();
        }
        self.observe_paths();
        self.m.poll(now);
        work += self.run(now);
        self.m.reap();
        work + self.run(now)
    }
}

impl<F: Fabric, H: Handler> pollers::Control for SrvControl<F, H> {
    type Msg = SrvMsg;

    fn on_msg(&mut self, msg: SrvMsg, now: Instant) {
        match msg {
            SrvMsg::Listen(addr, reply) => {
                let r = self.cm.listen(&addr).map_err(SrvError::from).map(|id| {
                    self.listeners.insert(id, addr.clone());
                });
                if r.is_ok() {
                    tracing::info!(%addr, "listening");
                }
                if reply.send(r).is_err() {
                    tracing::debug!("listen: the caller stopped waiting");
                }
            }
            SrvMsg::OnEvent(f) => self.callbacks.push(f),
            SrvMsg::Close(target, reply) => {
                let n = self.m.close_by_operator(target, now);
                for _ in 0..n {
                    self.shared.counters.operator_close();
                }
                self.run(now);
                if reply.send(n).is_err() {
                    tracing::debug!("close: the caller stopped waiting");
                }
            }
        }
    }

    fn poll(&mut self, now: Instant) -> usize {
        self.now = now;
        // A client's beat about to land: answer it as it comes (its RTT
        // steers the client's min-latency), not at the next tick.
        for c in &mut self.service {
            let on = c
                .peer_hb_window()
                .is_some_and(|(from, to)| from <= now && now <= to);
            c.set_watching(on);
        }
        self.step(now)
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
        beats.chain(watch).chain(self.m.poll_timeout()).min()
    }

    fn wait(&mut self, max: Duration) {
        self.events.wait(&mut self.cm, max);
    }

    fn on_stop(&mut self, now: Instant) {
        self.now = now;
        self.m.stop(now);
        self.run(now);
        self.m.reap();
        self.run(now);
    }
}

/// MRs over the session's chunks (from `base` in `mem`) for a new path: one per chunk with
/// always_invalidate, else one over them all. Each key is bumped once before
/// first use, as the kernel does.
fn register<F: Fabric>(
    pd: &F::Pd,
    cfg: &SrvConfig,
    mem: &Arc<dyn rtrs_fabric::Memory>,
    base: usize,
) -> rtrs_fabric::Result<Vec<F::Mr>> {
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    let cs = cfg.max_chunk_size as usize;
    let qd = cfg.queue_depth as usize;
    let mrs = if cfg.always_invalidate {
        (0..qd)
            .map(|i| pd.reg_mr_range(mem.clone(), base + i * cs, cs, access))
            .collect::<rtrs_fabric::Result<Vec<_>>>()?
    } else {
        vec![pd.reg_mr_range(mem.clone(), base, qd * cs, access)?]
    };
    for mr in &mrs {
        mr.rekey()?;
    }
    Ok(mrs)
}
