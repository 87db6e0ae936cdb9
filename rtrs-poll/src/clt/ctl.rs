//! The client's control thread: every path's connection rounds, INFO
//! exchange, heartbeats, reconnects and operator commands, driven by each
//! path's [`ClientPath`] machine. Nothing here waits for the network: a
//! connect is a state with a deadline, CM events are dispatched to the path
//! they belong to, and the only blocking call is the CM's bounded wait for
//! its next event, so one path connecting or timing out never delays
//! another path's heartbeat.
//!
//! ```text
//!  embedder (Client) ──Cmd──┐                 ┌──CoreMsg (spsc per core)──> cores
//!  cores ──PathFailed───────┴─> mpsc inbox ─> │ CltControl: CM events -> path machines
//!                                             │   cid 0: INFO_RSP, heartbeats (RTT)
//!                                             └──CltEvent (per subscriber)──> embedder
//! ```

use super::con::{CltCon, WR_HB, WR_INFO_REQ, WR_INFO_RSP, WR_KIND, WR_RECV};
use super::core::{req_table, CoreMsg};
use super::path::{CltPath, PathId};
use super::{
    make_sess, CltConfig, CltCore, CltError, CltEvent, CltSess, Geometry, PathMem, MAX_SG,
};
use crate::fabric::{
    memory, Access, Address, Cm, CmEvent, ConnId, Fabric, Memory, Mr, Pd, Qp, QpCap, RecvWr,
    SendWr, Wc, WcOpcode, WcStatus,
};
use crate::proto::imm::Imm;
use crate::proto::{
    slice_chunks, ConnReqRepr, ConnRsp, ConnRspRepr, InfoReq, InfoReqRepr, InfoRsp, SgDesc,
    MAX_PATHS_NUM, PRIVATE_DATA_LEN, SERVICE_CON_QUEUE_DEPTH,
};
use crate::sess::hb::{hb_wr, HbAction, Heartbeat, Signal};
use crate::sess::path::{ClientPath, PathAction, PathEvent, PathState, ReconnectPolicy};
use crate::sess::{DownReason, CONTROL_TICK};
use minstant::Instant;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A command's answer, sent back to the caller waiting on it.
pub(crate) type Reply<T> = SyncSender<Result<T, CltError>>;

/// Answers a command. A caller that stopped waiting (its handle dropped)
/// loses nothing by not hearing it.
fn answer<T>(to: Reply<T>, r: Result<T, CltError>) {
    if to.send(r).is_err() {
        tracing::debug!("a command's caller stopped waiting for its answer");
    }
}

/// What reaches the control thread's inbox.
pub(crate) enum CtlMsg<F: Fabric> {
    /// A core saw path `slot` fail in connection round `epoch`; its
    /// connection comes back to be destroyed here, off the core (after the
    /// CM has disconnected it).
    PathFailed {
        slot: usize,
        epoch: u16,
        reason: DownReason,
        con: CltCon<F>,
    },
    /// A core let go of a connection the control thread tore down.
    Retired(CltCon<F>),
    /// An operator command from the [`super::Client`] handle.
    Cmd(Cmd),
}

/// Operator commands (the kernel's sysfs verbs).
pub(crate) enum Cmd {
    AddPath(Address, Reply<PathId>),
    RemovePath(PathId, Reply<()>),
    Disconnect(PathId, Reply<()>),
    Reconnect(PathId, Reply<()>),
    SetReconnect(ReconnectPolicy),
}

/// What the handle and the control thread share.
#[derive(Default)]
pub(crate) struct Shared {
    /// Live paths, in the order they were added.
    pub(crate) paths: Mutex<Vec<Arc<CltPath>>>,
    /// Event subscribers.
    pub(crate) subs: Mutex<Vec<Sender<CltEvent>>>,
}

/// The session, the cores' halves, for [`super::Client::open`].
pub(crate) type Opened<F> = (Arc<CltSess<F>>, Vec<CltCore<F>>);

struct Opening<F: Fabric> {
    reply: Reply<Opened<F>>,
    addrs: VecDeque<Address>,
    cores: Vec<CltCore<F>>,
}

/// A core's inbox, with what did not fit yet (never dropped).
struct CoreLink<F: Fabric> {
    tx: pollers::spsc::Producer<CoreMsg<F>>,
    backlog: VecDeque<CoreMsg<F>>,
    warned: bool,
}

impl<F: Fabric> CoreLink<F> {
    fn send(&mut self, core: usize, m: CoreMsg<F>) {
        if self.backlog.is_empty() {
            match self.tx.push(m) {
                Ok(()) => return,
                Err(pollers::Full(m)) => self.backlog.push_back(m),
            }
        } else {
            self.backlog.push_back(m);
        }
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                core,
                "a core's inbox is full (is it polled?): messages wait"
            );
        }
    }

    fn flush(&mut self) {
        while let Some(m) = self.backlog.pop_front() {
            if let Err(pollers::Full(m)) = self.tx.push(m) {
                self.backlog.push_front(m);
                return;
            }
        }
        self.warned = false;
    }
}

/// The scratch memory of an INFO exchange.
struct Info<F: Fabric> {
    mem: Arc<dyn Memory>,
    _mr: F::Mr,
}

struct PathCtl<F: Fabric> {
    id: PathId,
    addr: Address,
    sess_uuid: [u8; 16],
    /// cid 0 of this path may create the server's session.
    first: bool,
    cid0_seen: bool,
    sm: ClientPath,
    /// On the device that reaches the path's address (or why there is
    /// none).
    pd: Result<F::Pd, String>,
    /// The session's memory registered on that device.
    mem: Option<Arc<PathMem<F>>>,
    shared: Option<Arc<CltPath>>,
    svc: Option<CltCon<F>>,
    /// IO connections of the round, until the path is up.
    io: Vec<CltCon<F>>,
    ids: Vec<ConnId>,
    info: Option<Info<F>>,
    hb: Option<Heartbeat>,
    /// Until when the control thread polls cid 0 closely for a heartbeat's
    /// ack (its RTT is stamped when polled).
    probe_until: Option<Instant>,
    seen_recvs: u64,
    /// Counted in the session's connected paths.
    counted_up: bool,
    removing: bool,
    waiters: Vec<Reply<()>>,
    add_waiter: Option<Reply<PathId>>,
}

/// The control thread's state.
pub(crate) struct CltControl<F: Fabric> {
    pd: F::Pd,
    cm: F::Cm,
    cfg: CltConfig,
    seed: u64,
    paths_uuid: [u8; 16],
    geo: Option<Geometry>,
    need_inval: bool,
    sess: Option<Arc<CltSess<F>>>,
    /// The session's memory registered per device (paths share them).
    mems: Vec<Arc<PathMem<F>>>,
    shared: Arc<Shared>,
    slots: Vec<Option<PathCtl<F>>>,
    next_id: u32,
    cores: Vec<CoreLink<F>>,
    to_ctl: pollers::mpsc::Sender<CtlMsg<F>>,
    conns: HashMap<ConnId, (usize, u16)>,
    opening: Option<Opening<F>>,
    /// Set when the open failed: the thread has nothing left to do.
    stop: pollers::Shutdown,
    /// The session is closing (the handle dropped).
    closing: bool,
    up: usize,
    wcs: [Wc; 16],
    cm_failing: bool,
    /// A CM event that woke the loop: taken at the next step, after the
    /// cores' reports (which come without waking it), so a core's first-hand
    /// reason wins over its echo through the CM.
    woke_by: Option<CmEvent>,
}

fn uuid(seed: u64) -> [u8; 16] {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut u = [0u8; 16];
    for b in u.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    u
}

fn service_cap() -> QpCap {
    QpCap {
        max_send_wr: SERVICE_CON_QUEUE_DEPTH * 2 + 2,
        max_recv_wr: SERVICE_CON_QUEUE_DEPTH * 2 + 2,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
        rnr_retry: 7,
    }
}

fn io_cap(qd: u32) -> QpCap {
    QpCap {
        max_send_wr: qd * 4 + 1,
        max_recv_wr: qd * 3 + 1,
        max_send_sge: MAX_SG as u32 + 1,
        max_recv_sge: 1,
        max_inline_data: 0,
        rnr_retry: 7,
    }
}

/// The INFO_RSP a session of `qd` chunks receives at most.
fn info_rsp_len(qd: u32) -> usize {
    InfoRsp::<&[u8]>::HDR_LEN + SgDesc::LEN * qd as usize
}

impl<F: Fabric> CltControl<F> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pd: F::Pd,
        cm: F::Cm,
        cfg: CltConfig,
        seed: u64,
        need_inval: bool,
        shared: Arc<Shared>,
        to_ctl: pollers::mpsc::Sender<CtlMsg<F>>,
        stop: pollers::Shutdown,
        reply: Reply<Opened<F>>,
        now: Instant,
    ) -> CltControl<F> {
        let addrs: VecDeque<Address> = cfg.paths.iter().cloned().collect();
        let mut c = CltControl {
            pd,
            cm,
            seed,
            paths_uuid: uuid(seed),
            geo: None,
            need_inval,
            sess: None,
            mems: Vec::new(),
            shared,
            slots: Vec::new(),
            next_id: 0,
            cores: Vec::new(),
            to_ctl,
            conns: HashMap::new(),
            opening: Some(Opening {
                reply,
                addrs,
                cores: Vec::new(),
            }),
            stop,
            closing: false,
            up: 0,
            wcs: [Wc::default(); 16],
            cm_failing: false,
            woke_by: None,
            cfg,
        };
        c.open_next(now);
        c
    }

    /// Opens the next path of `rtrs_clt_open`'s list (one after another).
    fn open_next(&mut self, now: Instant) {
        let Some(addr) = self.opening.as_mut().and_then(|o| o.addrs.pop_front()) else {
            return;
        };
        let first = self.slots.is_empty();
        let slot = self.new_slot(addr, first);
        self.start(slot, now);
    }

    fn new_slot(&mut self, addr: Address, first: bool) -> usize {
        let id = PathId(self.next_id);
        self.next_id += 1;
        let sm = ClientPath::new(
            self.cfg.reconnect,
            self.cfg.cores as u16 + 1,
            self.cfg.connect_timeout,
            self.seed.wrapping_add(u64::from(id.0)),
        );
        let pd = self
            .pd
            .for_address(&addr, false)
            .map_err(|e| format!("no device reaches {addr}: {e}"));
        let ctl = PathCtl {
            pd,
            mem: None,
            id,
            sess_uuid: uuid(self.seed.wrapping_add(0x100 + u64::from(id.0))),
            addr,
            first,
            cid0_seen: false,
            sm,
            shared: None,
            svc: None,
            io: Vec::new(),
            ids: Vec::new(),
            info: None,
            hb: None,
            probe_until: None,
            seen_recvs: 0,
            counted_up: false,
            removing: false,
            waiters: Vec::new(),
            add_waiter: None,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(s) => {
                self.slots[s] = Some(ctl);
                s
            }
            None => {
                self.slots.push(Some(ctl));
                self.slots.len() - 1
            }
        };
        slot
    }

    /// Gives path `slot` its shared half and its device's registrations,
    /// and tells the cores, once the session's geometry is known.
    fn attach(&mut self, slot: usize) -> Result<(), DownReason> {
        let Some(sess) = self.sess.clone() else {
            return Ok(());
        };
        let Some(p) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        if p.shared.is_some() {
            return Ok(());
        }
        let local = |what: String| DownReason::Local { cid: 0, what };
        let pd = p.pd.as_ref().map_err(|e| local(e.clone()))?;
        let mem = match self.mems.iter().find(|m| m.pd.same_device(pd)) {
            Some(m) => m.clone(),
            None => {
                let m = PathMem::register(
                    pd.clone(),
                    &sess.mem,
                    sess.queue_depth,
                    sess.buf_size,
                    sess.per_io_keys,
                )
                .map_err(|e| local(format!("registering the session's memory: {e}")))?;
                let m = Arc::new(m);
                self.mems.push(m.clone());
                m
            }
        };
        let first = Arc::ptr_eq(&mem, &sess.first);
        p.mem = Some(mem.clone());
        let shared = Arc::new(CltPath::new(
            p.id,
            p.addr.to_string(),
            sess.queue_depth,
            self.cfg.cores,
        ));
        shared.publish(p.sm.state());
        p.shared = Some(shared.clone());
        if let Ok(mut l) = self.shared.paths.lock() {
            l.push(shared.clone());
        }
        for (k, c) in self.cores.iter_mut().enumerate() {
            c.send(
                k,
                CoreMsg::AddPath {
                    slot,
                    path: shared.clone(),
                    mem: mem.clone(),
                    first_device: first,
                    reqs: req_table(sess.queue_depth),
                },
            );
        }
        Ok(())
    }

    fn start(&mut self, slot: usize, now: Instant) {
        let attached = self.attach(slot);
        if let Some(p) = self.slots[slot].as_mut() {
            p.sm.open(now);
            if let Err(why) = attached {
                p.sm.handle_event(PathEvent::Failed(why), now);
            }
            tracing::info!(path = %p.id, addr = %p.addr, "connecting");
        }
        self.run_actions(slot, now);
    }

    fn emit(&self, ev: CltEvent) {
        match &ev {
            // Ups, and everything the session's own close does, are news;
            // the rest is trouble.
            CltEvent::PathUp { .. } | CltEvent::SessionReconnected => {
                tracing::info!("{ev}")
            }
            _ if self.closing => tracing::info!("{ev}"),
            _ => tracing::warn!("{ev}"),
        }
        if let Ok(mut subs) = self.shared.subs.lock() {
            subs.retain(|s| s.send(ev.clone()).is_ok());
        }
    }

    /// Feeds `ev` to path `slot`'s machine and runs what it says.
    fn feed(&mut self, slot: usize, ev: PathEvent, now: Instant) {
        if let Some(p) = self.slots[slot].as_mut() {
            p.sm.handle_event(ev, now);
        }
        self.run_actions(slot, now);
    }

    fn run_actions(&mut self, slot: usize, now: Instant) {
        loop {
            let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let Some(a) = p.sm.poll_action() else {
                if let Some(sh) = &p.shared {
                    sh.publish(p.sm.state());
                }
                return;
            };
            match a {
                PathAction::Connect { cid, recon_cnt } => {
                    if let Err(why) = self.connect(slot, cid, recon_cnt) {
                        self.fail(slot, why, now);
                    }
                }
                PathAction::SendInfo => {
                    if let Err(why) = self.send_info(slot) {
                        self.fail(slot, why, now);
                    }
                }
                PathAction::Up { reconnect } => self.up(slot, reconnect, now),
                PathAction::Teardown(why) => self.teardown(slot, why, now),
                PathAction::Closed(why) => self.closed(slot, why),
            }
        }
    }

    fn fail(&mut self, slot: usize, why: DownReason, now: Instant) {
        if let Some(p) = self.slots[slot].as_mut() {
            p.sm.handle_event(PathEvent::Failed(why), now);
        }
    }

    fn connect(&mut self, slot: usize, cid: u16, recon_cnt: u16) -> Result<(), DownReason> {
        let local = |what: String| DownReason::Local { cid, what };
        let cid_num = self.cfg.cores as u16 + 1;
        let paths_uuid = self.paths_uuid;
        let qd = self.sess.as_ref().map(|s| s.queue_depth);
        let Some(p) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let pd = p.pd.as_ref().map_err(|e| local(e.clone()))?;
        let con = if cid == 0 {
            let signal = Signal::every(1);
            CltCon::create(
                pd,
                0,
                recon_cnt,
                service_cap(),
                2 * SERVICE_CON_QUEUE_DEPTH,
                signal,
            )
        } else {
            let qd = qd.ok_or_else(|| local("no session geometry".into()))?;
            // As the kernel's client: a completion every queue depth of
            // requests (min(qd, 512)), which io_cap's send queue has room
            // for. Nothing waits for a request's own completion (errors
            // complete anyway); one per request made the shm backend read
            // the server's consumer header at every poll while it waited.
            let signal = Signal::for_queue_depth(qd);
            CltCon::create(pd, cid, recon_cnt, io_cap(qd), 2 * qd, signal)
        }
        .map_err(|e| local(format!("cannot create the connection: {e}")))?;
        let req = ConnReqRepr {
            cid,
            cid_num,
            recon_cnt,
            sess_uuid: p.sess_uuid,
            paths_uuid,
            first_conn: cid > 0 || p.first || p.cid0_seen,
        };
        let mut pd = [0u8; PRIVATE_DATA_LEN];
        req.emit(&mut pd)
            .map_err(|e| local(format!("CON_REQ: {e}")))?;
        let id = self
            .cm
            .connect(&p.addr, &con.qp, &pd)
            .map_err(|e| DownReason::Unreachable {
                cid,
                why: e.to_string(),
            })?;
        self.conns.insert(id, (slot, cid));
        p.ids.push(id);
        if cid == 0 {
            p.svc = Some(con);
        } else {
            p.io.push(con);
        }
        Ok(())
    }

    fn send_info(&mut self, slot: usize) -> Result<(), DownReason> {
        let local = |what: String| DownReason::Local { cid: 0, what };
        let qd = self.sess.as_ref().map_or(0, |s| s.queue_depth);
        let Some(p) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let req_len = InfoReq::<&[u8]>::LEN;
        let rsp_len = info_rsp_len(qd);
        // The service connection's own buffers hold only receive slots: the
        // INFO messages use a scratch registration for the exchange.
        let mem = memory::shareable(req_len + rsp_len)
            .map_err(|e| local(format!("INFO scratch memory: {e}")))?;
        let pd = p.pd.as_ref().map_err(|e| local(e.clone()))?;
        let mr = pd
            .reg_mr(mem.clone(), Access::LOCAL_WRITE)
            .map_err(|e| local(format!("INFO scratch registration: {e}")))?;
        let mut req = [0u8; InfoReq::<&[u8]>::LEN];
        InfoReqRepr {
            sessname: &self.cfg.sessname,
        }
        .emit(&mut req)
        .map_err(|e| local(format!("INFO_REQ: {e}")))?;
        mem.write(0, &req)
            .map_err(|e| local(format!("INFO_REQ: {e}")))?;
        let svc = p.svc.as_mut().ok_or_else(|| local("no cid 0".into()))?;
        let rsge = [mr.sge(req_len, rsp_len as u32)];
        let ssge = [mr.sge(0, req_len as u32)];
        svc.qp
            .post_recv(&RecvWr {
                wr_id: WR_INFO_RSP,
                sg_list: &rsge,
            })
            .and_then(|()| svc.qp.post_send(&SendWr::send(WR_INFO_REQ, &ssge)))
            .map_err(|e| local(format!("cannot post INFO_REQ: {e}")))?;
        p.info = Some(Info { mem, _mr: mr });
        Ok(())
    }

    /// INFO_RSP arrived (`len` bytes): the server's chunk table goes to the
    /// path, and every receive is posted.
    fn on_info_rsp(&mut self, slot: usize, len: usize) -> Result<(), DownReason> {
        let proto = |what: String| DownReason::Protocol { cid: 0, what };
        let (Some(sess), Some(geo)) = (self.sess.clone(), self.geo) else {
            return Ok(());
        };
        let Some(p) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let (Some(info), Some(shared)) = (p.info.take(), p.shared.clone()) else {
            return Err(proto("INFO_RSP without an INFO_REQ".into()));
        };
        let mut b = vec![0u8; len.min(info_rsp_len(sess.queue_depth))];
        info.mem
            .read(InfoReq::<&[u8]>::LEN, &mut b)
            .map_err(|e| proto(format!("INFO_RSP: {e}")))?;
        let v = InfoRsp::new_checked(&b[..]).map_err(|e| proto(format!("INFO_RSP: {e}")))?;
        let chunk_size = u64::from(geo.max_io_size) + u64::from(geo.max_hdr_size);
        slice_chunks(&v, geo.queue_depth, chunk_size, |k, a, key| {
            shared.rbufs[k].addr.store(a, Ordering::Relaxed);
            shared.rbufs[k].rkey.store(key, Ordering::Release);
        })
        .map_err(|e| proto(format!("INFO_RSP: {e}")))?;
        let local = |cid: u16, e: crate::fabric::FabricError| DownReason::Local {
            cid,
            what: format!("cannot post receives: {e}"),
        };
        if let Some(svc) = p.svc.as_mut() {
            svc.signal = Signal::for_queue_depth(sess.queue_depth);
            svc.post_all_recvs().map_err(|e| local(0, e))?;
        }
        for con in &mut p.io {
            con.signal = Signal::for_queue_depth(sess.queue_depth);
            con.post_all_recvs().map_err(|e| local(con.cid, e))?;
        }
        Ok(())
    }

    fn up(&mut self, slot: usize, reconnect: bool, now: Instant) {
        let opening = self.opening.is_some();
        let Some(p) = self.slots[slot].as_mut() else {
            return;
        };
        p.hb = Some(Heartbeat::start(
            now,
            self.cfg.hb_interval,
            self.cfg.hb_missed_max,
        ));
        p.seen_recvs = p.shared.as_ref().map_or(0, |s| s.recvs());
        let (id, addr) = (p.id, p.addr.to_string());
        if let Some(sh) = &p.shared {
            sh.set_epoch(p.sm.recon_cnt());
            sh.publish(PathState::Connected);
            if reconnect {
                sh.reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
        let io = std::mem::take(&mut p.io);
        p.counted_up = true;
        let waiters = std::mem::take(&mut p.waiters);
        let add = p.add_waiter.take();
        for (k, con) in io.into_iter().enumerate() {
            if let Some(c) = self.cores.get_mut(k) {
                c.send(k, CoreMsg::Con(slot, con));
            }
        }
        self.up += 1;
        for w in waiters {
            answer(w, Ok(()));
        }
        if let Some(w) = add {
            answer(w, Ok(id));
        }
        if opening {
            let more = self.opening.as_ref().is_some_and(|o| !o.addrs.is_empty());
            if more {
                self.open_next(now);
            } else if let Some(o) = self.opening.take() {
                tracing::info!(paths = self.up, "session {} open", self.cfg.sessname);
                let sess = self.sess.clone();
                let reply = match sess {
                    Some(s) => Ok((s, o.cores)),
                    None => Err(CltError::Config("no session")),
                };
                answer(o.reply, reply);
            }
            return;
        }
        self.emit(CltEvent::PathUp {
            path: id,
            addr,
            reconnect,
        });
        if self.up == 1 {
            self.emit(CltEvent::SessionReconnected);
        }
    }

    fn teardown(&mut self, slot: usize, why: DownReason, now: Instant) {
        let Some(p) = self.slots[slot].as_mut() else {
            return;
        };
        for id in std::mem::take(&mut p.ids) {
            self.conns.remove(&id);
            if let Err(e) = self.cm.disconnect(id) {
                tracing::debug!(path = %p.id, "disconnect: {e}");
            }
        }
        p.svc = None;
        p.io.clear();
        p.info = None;
        p.hb = None;
        p.probe_until = None;
        let was_up = std::mem::replace(&mut p.counted_up, false);
        let first_round = !p.sm.ever_up();
        let (id, addr) = (p.id, p.addr.to_string());
        let state = p.sm.state();
        // A round that failed, or a path that was up: counted and logged
        // once; tearing down what is already down is not news.
        let news = was_up || state == PathState::ConnectingErr;
        if let (Some(sh), true) = (&p.shared, news) {
            if was_up {
                sh.went_down(&why);
            } else {
                sh.set_reason(&why);
            }
            sh.failed_reconnects
                .store(p.sm.reconnects.1, Ordering::Relaxed);
        }
        let waiters = if state == PathState::ConnectingErr {
            std::mem::take(&mut p.waiters)
        } else {
            Vec::new()
        };
        let add = if first_round {
            p.add_waiter.take()
        } else {
            None
        };
        if self.sess.is_some() {
            for (k, c) in self.cores.iter_mut().enumerate() {
                c.send(k, CoreMsg::Drop(slot));
            }
        }
        for w in waiters {
            answer(
                w,
                Err(CltError::PathDown {
                    addr: addr.clone(),
                    reason: why.clone(),
                }),
            );
        }
        if was_up {
            self.up -= 1;
            self.emit(CltEvent::PathDown {
                path: id,
                addr: addr.clone(),
                reason: why.clone(),
            });
            if self.up == 0 {
                self.emit(CltEvent::SessionLost);
            }
        } else if news {
            tracing::warn!(path = %id, %addr, "connecting failed: {why}");
        }
        if first_round && self.opening.is_some() && state == PathState::ConnectingErr {
            // rtrs_clt_open: if any path fails, the whole open fails.
            return self.fail_open(CltError::PathDown { addr, reason: why }, now);
        }
        if let Some(w) = add {
            // The kernel's add_path: a path that cannot connect is removed.
            answer(
                w,
                Err(CltError::PathDown {
                    addr,
                    reason: why.clone(),
                }),
            );
            if let Some(p) = self.slots[slot].as_mut() {
                p.removing = true;
                p.sm.torn_down(now);
                p.sm.close(why);
            }
            return;
        }
        if let Some(p) = self.slots[slot].as_mut() {
            p.sm.torn_down(now);
        }
    }

    fn fail_open(&mut self, err: CltError, now: Instant) {
        let Some(o) = self.opening.take() else {
            return;
        };
        drop(o.cores);
        for slot in 0..self.slots.len() {
            if let Some(p) = self.slots[slot].as_mut() {
                p.sm.close(DownReason::SessionClosed);
            }
            self.run_actions(slot, now);
        }
        answer(o.reply, Err(err));
        self.stop.trigger();
    }

    fn closed(&mut self, slot: usize, why: DownReason) {
        let Some(p) = self.slots[slot].as_mut() else {
            return;
        };
        let (id, addr) = (p.id, p.addr.to_string());
        if let Some(sh) = &p.shared {
            sh.set_reason(&why);
            sh.publish(PathState::Closed);
        }
        for w in std::mem::take(&mut p.waiters) {
            answer(
                w,
                Err(CltError::PathDown {
                    addr: addr.clone(),
                    reason: why.clone(),
                }),
            );
        }
        let removing = p.removing;
        let shared = p.shared.clone();
        if !removing {
            self.emit(CltEvent::PathClosed {
                path: id,
                addr,
                reason: why,
            });
            return;
        }
        if self.sess.is_some() {
            for (k, c) in self.cores.iter_mut().enumerate() {
                c.send(k, CoreMsg::Remove(slot));
            }
        }
        if let (Some(sh), Ok(mut l)) = (shared, self.shared.paths.lock()) {
            l.retain(|x| !Arc::ptr_eq(x, &sh));
        }
        self.slots[slot] = None;
        self.emit(CltEvent::PathRemoved { path: id, addr });
    }

    fn on_cm(&mut self, ev: CmEvent, now: Instant) {
        let id = ev.id();
        if let CmEvent::ConnectRequest { .. } = ev {
            tracing::warn!("a connect request reached the client's CM; refused");
            if let Err(e) = self.cm.reject(id, &[]) {
                tracing::warn!("reject: {e}");
            }
            return;
        }
        let Some(&(slot, cid)) = self.conns.get(&id) else {
            // An event of a round already torn down. A connect of it that
            // completed anyway (a CM that retried its REQ after we gave
            // up) is closed, so the server does not keep a half-made path
            // that refuses the next round's cid 0.
            if let CmEvent::Established { .. } = ev {
                tracing::info!("closing a connection of an abandoned round");
                if let Err(e) = self.cm.disconnect(id) {
                    tracing::warn!("disconnect of an abandoned connection: {e}");
                }
            }
            return;
        };
        let ev = match ev {
            CmEvent::Established { private_data, .. } => {
                match self.established(slot, cid, private_data.as_bytes()) {
                    Ok(()) => PathEvent::Established { cid },
                    Err(why) => PathEvent::Failed(why),
                }
            }
            CmEvent::Rejected { private_data, .. } => {
                let errno = ConnRsp::new_checked(private_data.as_bytes())
                    .map(|v| i32::from(v.errno()))
                    .unwrap_or(-libc::ECONNRESET);
                PathEvent::Failed(DownReason::Rejected { cid, errno })
            }
            CmEvent::Unreachable { reason, .. } => {
                PathEvent::Failed(DownReason::Unreachable { cid, why: reason })
            }
            _ => PathEvent::Failed(DownReason::Disconnected { cid }),
        };
        self.feed(slot, ev, now);
    }

    /// Checks connection `cid`'s CON_RSP; cid 0's gives (or must match) the
    /// session's geometry.
    fn established(&mut self, slot: usize, cid: u16, pd: &[u8]) -> Result<(), DownReason> {
        let v = ConnRsp::new_checked(pd).map_err(|e| DownReason::Protocol {
            cid,
            what: format!("CON_RSP: {e}"),
        })?;
        let r = ConnRspRepr::parse(&v);
        if r.errno != 0 {
            return Err(DownReason::Rejected {
                cid,
                errno: r.errno.into(),
            });
        }
        if cid != 0 {
            return Ok(());
        }
        if let Some(p) = self.slots[slot].as_mut() {
            p.cid0_seen = true;
        }
        let geo = Geometry {
            queue_depth: r.queue_depth,
            max_io_size: r.max_io_size,
            max_hdr_size: r.max_hdr_size,
            new_rkey: r.new_rkey,
        };
        match self.geo {
            None => self.make_session(slot, geo),
            Some(g) if g.queue_depth != geo.queue_depth => {
                if let Some(p) = self.slots[slot].as_mut() {
                    p.sm.set_policy(ReconnectPolicy {
                        max_attempts: 0,
                        ..p.sm.policy()
                    });
                }
                Err(DownReason::QueueDepthChanged {
                    was: g.queue_depth,
                    now: geo.queue_depth,
                })
            }
            Some(_) => Ok(()),
        }
    }

    /// The first CON_RSP sizes the session: its memory, permits and cores.
    fn make_session(&mut self, slot: usize, geo: Geometry) -> Result<(), DownReason> {
        let local = |what: String| DownReason::Local { cid: 0, what };
        let pd = match self.slots[slot].as_ref().map(|p| &p.pd) {
            Some(Ok(pd)) => pd.clone(),
            Some(Err(e)) => return Err(local(e.clone())),
            None => self.pd.clone(),
        };
        let mut sess = make_sess::<F>(&pd, &self.cfg, geo)
            .map_err(|e| local(format!("session memory: {e}")))?;
        sess.need_inval = sess.per_io_keys && self.need_inval;
        let sess = Arc::new(sess);
        let n = self.cfg.paths.len().max(1);
        let mut cores = Vec::new();
        for c in 0..self.cfg.cores {
            let (tx, rx) = pollers::spsc::channel(4 * n + 8);
            self.cores.push(CoreLink {
                tx,
                backlog: VecDeque::new(),
                warned: false,
            });
            cores.push(CltCore::new(
                c as u32,
                sess.clone(),
                rx,
                self.to_ctl.clone(),
            ));
        }
        if let Some(o) = self.opening.as_mut() {
            o.cores = cores;
        }
        self.geo = Some(geo);
        self.mems.push(sess.first.clone());
        self.sess = Some(sess);
        for s in 0..self.slots.len() {
            self.attach(s)?;
        }
        Ok(())
    }

    /// Polls path `slot`'s cid 0: INFO_RSP while connecting, heartbeats
    /// and their acks while up.
    fn poll_svc(&mut self, slot: usize, now: Instant) -> usize {
        let Some(p) = self.slots[slot].as_mut() else {
            return 0;
        };
        let Some(svc) = p.svc.as_mut() else { return 0 };
        let n = svc.poll(&mut self.wcs);
        let mut event = None;
        for wc in &self.wcs[..n] {
            if wc.status != WcStatus::Success {
                event = Some(Err(DownReason::Completion {
                    cid: 0,
                    status: wc.status,
                    opcode: wc.opcode,
                }));
                break;
            }
            if wc.wr_id == WR_INFO_RSP && wc.opcode == WcOpcode::Recv {
                event = Some(Ok(wc.byte_len as usize));
                continue;
            }
            if wc.wr_id & WR_KIND != WR_RECV {
                continue;
            }
            if let Err(e) = svc.post_recv((wc.wr_id & 0xffff_ffff) as u32) {
                event = Some(Err(DownReason::Local {
                    cid: 0,
                    what: format!("cannot repost a receive: {e}"),
                }));
                break;
            }
            let Some(hb) = p.hb.as_mut() else { continue };
            hb.on_recv();
            match Imm::decode_clt(wc.imm) {
                Ok(Imm::HbAck) => {
                    // Stamped now, where the ack is polled: not the tick's time.
                    hb.on_ack(Instant::now());
                    p.probe_until = None;
                    if let Some(sh) = &p.shared {
                        sh.set_latency(hb.latency());
                    }
                }
                Ok(Imm::HbMsg) => {
                    if let Err(e) = svc.post(hb_wr(WR_HB, true)) {
                        event = Some(Err(DownReason::Local {
                            cid: 0,
                            what: format!("cannot ack a heartbeat: {e}"),
                        }));
                        break;
                    }
                }
                _ => {}
            }
        }
        match event {
            Some(Ok(len)) => match self.on_info_rsp(slot, len) {
                Ok(()) => self.feed(slot, PathEvent::InfoDone, now),
                Err(why) => {
                    self.fail(slot, why, now);
                    self.run_actions(slot, now);
                }
            },
            Some(Err(why)) => {
                self.fail(slot, why, now);
                self.run_actions(slot, now);
            }
            None => self.heartbeat(slot, now),
        }
        n
    }

    fn heartbeat(&mut self, slot: usize, now: Instant) {
        let Some(p) = self.slots[slot].as_mut() else {
            return;
        };
        let (Some(hb), Some(svc)) = (p.hb.as_mut(), p.svc.as_mut()) else {
            return;
        };
        // Any receive on the path's IO connections counts as life.
        let recvs = p.shared.as_ref().map_or(0, |s| s.recvs());
        if recvs != p.seen_recvs {
            p.seen_recvs = recvs;
            hb.on_recv();
        }
        let action = hb.handle_timeout(now);
        if let Some(sh) = &p.shared {
            // missed() counts the beat outstanding: intervals without an
            // answer are one fewer.
            sh.hb_missed_peak
                .fetch_max(hb.missed().saturating_sub(1), Ordering::Relaxed);
        }
        let why = match action {
            HbAction::Wait => return,
            HbAction::Send => match svc.post(hb_wr(WR_HB, false)) {
                Ok(()) => {
                    p.probe_until = Some(now + CONTROL_TICK);
                    return;
                }
                Err(e) => DownReason::Local {
                    cid: 0,
                    what: format!("cannot send a heartbeat: {e}"),
                },
            },
            HbAction::Dead => DownReason::Heartbeat {
                missed: hb.missed(),
            },
        };
        self.fail(slot, why, now);
        self.run_actions(slot, now);
    }

    /// One pass over everything, at `now`.
    fn drive(&mut self, now: Instant) {
        if let Some(ev) = self.woke_by.take() {
            self.on_cm(ev, now);
        }
        loop {
            match self.cm.poll_event(Duration::ZERO) {
                Ok(Some(ev)) => self.on_cm(ev, now),
                Ok(None) => break,
                Err(e) => {
                    self.cm_error(e);
                    break;
                }
            }
        }
        for slot in 0..self.slots.len() {
            self.poll_svc(slot, now);
            if let Some(p) = self.slots[slot].as_mut() {
                p.sm.handle_timeout(now);
            }
            self.run_actions(slot, now);
            // Once more: a software fabric sends what was just posted (a
            // beat, an ack, INFO_REQ) when its CQ is polled, and the loop
            // may sleep next.
            self.poll_svc(slot, now);
        }
        for c in &mut self.cores {
            c.flush();
        }
    }

    fn cm_error(&mut self, e: crate::fabric::FabricError) {
        if !self.cm_failing {
            self.cm_failing = true;
            tracing::warn!("client CM: {e}");
        }
    }

    /// Whether a heartbeat's ack is awaited closely.
    fn probing(&self, now: Instant) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|p| p.probe_until.is_some_and(|t| now < t))
    }

    fn command(&mut self, cmd: Cmd, now: Instant) {
        match cmd {
            Cmd::AddPath(addr, reply) => {
                let live: Vec<&PathCtl<F>> = self.slots.iter().flatten().collect();
                if live.len() >= MAX_PATHS_NUM {
                    answer(
                        reply,
                        Err(CltError::Config("a session has at most 128 paths")),
                    );
                    return;
                }
                if live.iter().any(|p| p.addr == addr) {
                    answer(reply, Err(CltError::Exists(addr.to_string())));
                    return;
                }
                let first = self.up == 0;
                let slot = self.new_slot(addr, first);
                if let Some(p) = self.slots[slot].as_mut() {
                    p.add_waiter = Some(reply);
                }
                self.start(slot, now);
            }
            Cmd::RemovePath(id, reply) => {
                let Some(slot) = self.slot_of(id) else {
                    answer(reply, Err(CltError::NoSuchPath(id)));
                    return;
                };
                if self.slots.iter().flatten().count() <= 1 {
                    answer(reply, Err(CltError::LastPath));
                    return;
                }
                let closed = self.slots[slot].as_mut().is_some_and(|p| {
                    p.removing = true;
                    // Closing already: removed when its close completes.
                    !p.sm.close(DownReason::Removed) && p.sm.state() == PathState::Closed
                });
                if closed {
                    // Nothing to tear down: forget it now.
                    self.closed(slot, DownReason::Removed);
                }
                self.run_actions(slot, now);
                answer(reply, Ok(()));
            }
            Cmd::Disconnect(id, reply) => {
                let Some(slot) = self.slot_of(id) else {
                    answer(reply, Err(CltError::NoSuchPath(id)));
                    return;
                };
                if let Some(p) = self.slots[slot].as_mut() {
                    p.sm.close(DownReason::Operator);
                }
                self.run_actions(slot, now);
                answer(reply, Ok(()));
            }
            Cmd::Reconnect(id, reply) => {
                let Some(slot) = self.slot_of(id) else {
                    answer(reply, Err(CltError::NoSuchPath(id)));
                    return;
                };
                let Some(p) = self.slots[slot].as_mut() else {
                    return;
                };
                if !p.sm.reconnect_now(now) {
                    answer(reply, Err(CltError::Busy));
                    return;
                }
                p.waiters.push(reply);
                self.run_actions(slot, now);
            }
            Cmd::SetReconnect(policy) => {
                self.cfg.reconnect = policy;
                for p in self.slots.iter_mut().flatten() {
                    p.sm.set_policy(policy);
                }
            }
        }
    }

    fn slot_of(&self, id: PathId) -> Option<usize> {
        self.slots
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.id == id))
    }
}

impl<F: Fabric> pollers::Control for CltControl<F> {
    type Msg = CtlMsg<F>;
    type Timer = ();

    fn on_msg(&mut self, msg: CtlMsg<F>, now: Instant, _timers: &mut pollers::Timers<()>) {
        match msg {
            // Dropped here: the QP is destroyed off the cores.
            CtlMsg::Retired(con) => drop(con),
            CtlMsg::PathFailed {
                slot,
                epoch,
                reason,
                con,
            } => {
                let current = self
                    .slots
                    .get(slot)
                    .and_then(Option::as_ref)
                    .is_some_and(|p| {
                        p.sm.recon_cnt() == epoch && p.sm.state() == PathState::Connected
                    });
                if current {
                    self.fail(slot, reason, now);
                    self.run_actions(slot, now);
                }
                // After the teardown's CM disconnect: the QP goes last.
                drop(con);
            }
            CtlMsg::Cmd(c) => self.command(c, now),
        }
    }

    fn on_timer(&mut self, _t: (), _now: Instant, _timers: &mut pollers::Timers<()>) {}

    fn on_idle(&mut self, now: Instant, max_wait: Duration, _timers: &mut pollers::Timers<()>) {
        self.drive(now);
        if self.probing(now) {
            // A heartbeat is out: poll cid 0 closely so its RTT is the
            // network's, not the loop's sleep.
            std::thread::yield_now();
            return;
        }
        match self.cm.poll_event(max_wait) {
            Ok(Some(ev)) => self.woke_by = Some(ev),
            Ok(None) => {}
            Err(e) => {
                self.cm_error(e);
                std::thread::sleep(max_wait);
            }
        }
    }

    fn on_stop(&mut self) {
        self.closing = true;
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            if let Some(p) = self.slots[slot].as_mut() {
                p.sm.close(DownReason::SessionClosed);
            }
            self.run_actions(slot, now);
        }
        for c in &mut self.cores {
            c.flush();
        }
        if let Some(o) = self.opening.take() {
            answer(o.reply, Err(CltError::Config("the client was stopped")));
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
            .flat_map(|p| [p.sm.poll_timeout(), p.hb.as_ref().map(|h| h.poll_timeout())])
            .flatten()
            .min()
    }
}
