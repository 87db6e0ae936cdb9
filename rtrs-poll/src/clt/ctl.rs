//! The client's control driver: the I/O half of the session's control. It
//! owns the CM, each path's device, its connections (cid 0 polled here, IO
//! connections until the cores take them), the session's memory and the
//! rings to the cores; the decisions are [`SessMachine`]'s. Every step
//! feeds the machine what arrived (CM events, cid 0's completions, the
//! cores' reports) and does the actions it gives, one after another, each
//! result reported back before the next. It reads no clock: `now` comes
//! from the loop that steps it (the control thread's, or a test's virtual
//! one), and its only wait is [`pollers::Control::wait`], the CM's bounded
//! wait for its next event.
//!
//! ```text
//!  Client ──Cmd──┐                   ┌─ SessMachine (decisions, no I/O)
//!  cores ──report┴─> inbox ─> CltControl: CM, cid 0, PDs, MRs ──CoreMsg──> cores
//!                                     └──CltEvent (per subscriber)──> embedder
//! ```

use super::con::{CltCon, WR_HB, WR_INFO_REQ, WR_INFO_RSP, WR_KIND, WR_RECV};
use super::machine::{Answered, CltAction, MachineCmd, SessMachine, Token};
use super::msg::{req_table, Cmd, CoreMsg, CtlMsg, Reply};
use super::path::{CltPath, PathId};
use super::{
    make_sess, CltConfig, CltCore, CltError, CltEvent, CltSess, Geometry, PathMem, MAX_SG,
};
use crate::sess::hb::{hb_wr, Signal};
use crate::sess::path::PathState;
use crate::sess::DownReason;
use minstant::Instant;
use rtrs_fabric::{
    memory, Access, Address, Cm, CmEvents, ConnId, Fabric, Memory, Mr, Pd, Qp, QpCap, RecvWr,
    SendWr, Wc, WcOpcode, WcStatus,
};
use rtrs_proto::imm::Imm;
use rtrs_proto::{
    InfoReq, InfoReqRepr, InfoRsp, SgDesc, PRIVATE_DATA_LEN, SERVICE_CON_QUEUE_DEPTH,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Answers a command. A caller that stopped waiting (its handle dropped)
/// loses nothing by not hearing it.
fn answer<T>(to: Reply<T>, r: Result<T, CltError>) {
    if to.send(r).is_err() {
        tracing::debug!("a command's caller stopped waiting for its answer");
    }
}

/// What the handle and the control share.
#[derive(Default)]
pub(crate) struct Shared {
    /// Live paths, in the order they were added.
    pub(crate) paths: Mutex<Vec<Arc<CltPath>>>,
    /// Event subscribers.
    pub(crate) subs: Mutex<Vec<Sender<CltEvent>>>,
}

/// The session, the cores' halves, for [`super::Client::open`].
pub(crate) type Opened<F> = (Arc<CltSess<F>>, Vec<CltCore<F>>);

/// The open's caller, and the cores it gets once every path is up.
struct Opening<F: Fabric> {
    reply: Reply<Opened<F>>,
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

/// A path's I/O objects.
struct SlotIo<F: Fabric> {
    addr: Address,
    /// On the device that reaches the path's address (or why there is
    /// none).
    pd: Result<F::Pd, String>,
    /// The session's memory registered on that device.
    mem: Option<Arc<PathMem<F>>>,
    shared: Option<Arc<CltPath>>,
    svc: Option<CltCon<F>>,
    /// IO connections of the round, until the path is up.
    io: Vec<CltCon<F>>,
    info: Option<Info<F>>,
}

/// A caller waiting for a command's answer.
enum Pending {
    Done(Reply<()>),
    Path(Reply<PathId>),
}

/// The client's control: [`SessMachine`] and the I/O it asks for.
pub(crate) struct CltControl<F: Fabric> {
    pd: F::Pd,
    cm: F::Cm,
    cfg: CltConfig,
    need_inval: bool,
    m: SessMachine,
    sess: Option<Arc<CltSess<F>>>,
    /// The session's memory registered per device (paths share them).
    mems: Vec<Arc<PathMem<F>>>,
    shared: Arc<Shared>,
    slots: Vec<Option<SlotIo<F>>>,
    cores: Vec<CoreLink<F>>,
    to_ctl: pollers::mpsc::Sender<CtlMsg<F>>,
    opening: Option<Opening<F>>,
    pending: HashMap<Token, Pending>,
    next_token: u64,
    /// Set when the open failed: the control has nothing left to do.
    stop: pollers::Shutdown,
    wcs: [Wc; 16],
    /// The CM's events; one that ended the last wait is taken at the next
    /// step, after the cores' reports (which come without waking it), so a
    /// core's first-hand reason wins over its echo through the CM.
    events: CmEvents,
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
        let mut c = CltControl {
            pd,
            cm,
            need_inval,
            m: SessMachine::open(cfg.clone(), seed, now),
            sess: None,
            mems: Vec::new(),
            shared,
            slots: Vec::new(),
            cores: Vec::new(),
            to_ctl,
            opening: Some(Opening {
                reply,
                cores: Vec::new(),
            }),
            pending: HashMap::new(),
            next_token: 0,
            stop,
            wcs: [Wc::default(); 16],
            events: CmEvents::new("client"),
            cfg,
        };
        c.run(now);
        c
    }

    fn slot(&mut self, slot: usize) -> Option<&mut SlotIo<F>> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// Does the machine's actions until it has none; returns how many
    /// (a state published counts for nothing: it is no news).
    fn run(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(a) = self.m.poll_action() {
            n += usize::from(!matches!(
                a,
                CltAction::Publish { .. } | CltAction::HbMissed { .. }
            ));
            self.exec(a, now);
        }
        n
    }

    fn exec(&mut self, a: CltAction, now: Instant) {
        match a {
            CltAction::NewSlot { slot, addr } => {
                let pd = self
                    .pd
                    .for_address(&addr, false)
                    .map_err(|e| format!("no device reaches {addr}: {e}"));
                while self.slots.len() <= slot {
                    self.slots.push(None);
                }
                self.slots[slot] = Some(SlotIo {
                    addr,
                    pd,
                    mem: None,
                    shared: None,
                    svc: None,
                    io: Vec::new(),
                    info: None,
                });
            }
            CltAction::MakeSession { slot, geo } => {
                let r = self.make_session(slot, geo);
                self.m.session_made(slot, geo, r, now);
            }
            CltAction::Attach { slot } => {
                let r = self.attach(slot);
                self.m.attached(slot, r, now);
            }
            CltAction::Connect { slot, cid, req } => match self.connect(slot, cid, req) {
                Ok(id) => self.m.connect_sent(slot, cid, id),
                Err(why) => self.m.failed(slot, why, now),
            },
            CltAction::SendInfo { slot } => {
                if let Err(why) = self.send_info(slot) {
                    self.m.failed(slot, why, now);
                }
            }
            CltAction::InstallInfo { slot, chunks } => match self.install_info(slot, &chunks) {
                Ok(()) => self.m.info_installed(slot, now),
                Err(why) => self.m.failed(slot, why, now),
            },
            CltAction::PostHb { slot, ack } => {
                let r = self
                    .slot(slot)
                    .and_then(|s| s.svc.as_mut())
                    .map(|svc| svc.post(hb_wr(WR_HB, ack)));
                if let Some(Err(e)) = r {
                    let what = if ack {
                        format!("cannot ack a heartbeat: {e}")
                    } else {
                        format!("cannot send a heartbeat: {e}")
                    };
                    self.m.failed(slot, DownReason::Local { cid: 0, what }, now);
                }
            }
            CltAction::Latency { slot, rtt } => {
                if let Some(sh) = self.slot(slot).and_then(|s| s.shared.as_ref()) {
                    sh.set_latency(rtt);
                }
            }
            CltAction::HbMissed { slot, missed } => {
                if let Some(sh) = self.slot(slot).and_then(|s| s.shared.as_ref()) {
                    sh.hb_missed_peak.fetch_max(missed, Ordering::Relaxed);
                }
            }
            CltAction::Up {
                slot,
                epoch,
                reconnect,
            } => self.up(slot, epoch, reconnect),
            CltAction::Teardown {
                slot,
                ids,
                why,
                was_up,
                news,
                failed_reconnects,
            } => self.teardown(slot, ids, &why, was_up, news, failed_reconnects),
            CltAction::Publish { slot, state } => {
                if let Some(sh) = self.slot(slot).and_then(|s| s.shared.as_ref()) {
                    sh.publish(state);
                }
            }
            CltAction::Closed { slot, why, remove } => self.closed(slot, &why, remove),
            CltAction::Disconnect(id) => {
                if let Err(e) = self.cm.disconnect(id) {
                    tracing::warn!("disconnect of an abandoned connection: {e}");
                }
            }
            CltAction::Reject(id) => {
                if let Err(e) = self.cm.reject(id, &[]) {
                    tracing::warn!("reject: {e}");
                }
            }
            CltAction::Emit(ev) => self.emit(ev),
            CltAction::Answer(to, r) => match (self.pending.remove(&to), r) {
                (Some(Pending::Done(w)), r) => answer(w, r.map(|_| ())),
                (Some(Pending::Path(w)), Ok(Answered::Path(id))) => answer(w, Ok(id)),
                (Some(Pending::Path(w)), Ok(Answered::Done)) => {
                    answer(w, Err(CltError::Config("no path id")))
                }
                (Some(Pending::Path(w)), Err(e)) => answer(w, Err(e)),
                (None, _) => {}
            },
            CltAction::Opened(r) => self.opened(r),
            CltAction::Stop => self.stop.trigger(),
        }
    }

    fn emit(&self, ev: CltEvent) {
        match &ev {
            // Ups, and everything the session's own close does, are news;
            // the rest is trouble.
            CltEvent::PathUp { .. } | CltEvent::SessionReconnected => {
                tracing::info!("{ev}")
            }
            _ if self.m.closing() => tracing::info!("{ev}"),
            _ => tracing::warn!("{ev}"),
        }
        if let Ok(mut subs) = self.shared.subs.lock() {
            subs.retain(|s| s.send(ev.clone()).is_ok());
        }
    }

    fn opened(&mut self, r: Result<(), CltError>) {
        let Some(Opening { reply, cores }) = self.opening.take() else {
            return;
        };
        match (r, self.sess.clone()) {
            (Ok(()), Some(s)) => answer(reply, Ok((s, cores))),
            (Ok(()), None) => answer(reply, Err(CltError::Config("no session"))),
            (Err(e), _) => {
                drop(cores);
                answer(reply, Err(e));
            }
        }
    }

    /// The first CON_RSP sizes the session: its memory, permits and cores;
    /// then every path is attached.
    fn make_session(&mut self, slot: usize, geo: Geometry) -> Result<(), DownReason> {
        let local = |what: String| DownReason::Local { cid: 0, what };
        let pd = match self.slot(slot).map(|s| &s.pd) {
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
        self.mems.push(sess.first.clone());
        self.sess = Some(sess);
        for s in 0..self.slots.len() {
            self.attach(s)?;
        }
        Ok(())
    }

    /// Gives path `slot` its shared half and its device's registrations,
    /// and tells the cores.
    fn attach(&mut self, slot: usize) -> Result<(), DownReason> {
        let Some(sess) = self.sess.clone() else {
            return Ok(());
        };
        let (cores, id) = (self.cfg.cores, self.m.path_id(slot));
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
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
            id.unwrap_or(PathId(u32::MAX)),
            p.addr.to_string(),
            sess.queue_depth,
            cores,
        ));
        shared.publish(PathState::Connecting);
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

    fn connect(
        &mut self,
        slot: usize,
        cid: u16,
        req: rtrs_proto::ConnReqRepr,
    ) -> Result<ConnId, DownReason> {
        let local = |what: String| DownReason::Local { cid, what };
        let qd = self.sess.as_ref().map(|s| s.queue_depth);
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return Err(local("no such path".into()));
        };
        let pd = p.pd.as_ref().map_err(|e| local(e.clone()))?;
        let con = if cid == 0 {
            let signal = Signal::every(1);
            CltCon::create(
                pd,
                0,
                req.recon_cnt,
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
            CltCon::create(pd, cid, req.recon_cnt, io_cap(qd), 2 * qd, signal)
        }
        .map_err(|e| local(format!("cannot create the connection: {e}")))?;
        let mut pdata = [0u8; PRIVATE_DATA_LEN];
        req.emit(&mut pdata)
            .map_err(|e| local(format!("CON_REQ: {e}")))?;
        let id =
            self.cm
                .connect(&p.addr, &con.qp, &pdata)
                .map_err(|e| DownReason::Unreachable {
                    cid,
                    why: e.to_string(),
                })?;
        if cid == 0 {
            p.svc = Some(con);
        } else {
            p.io.push(con);
        }
        Ok(id)
    }

    fn send_info(&mut self, slot: usize) -> Result<(), DownReason> {
        let local = |what: String| DownReason::Local { cid: 0, what };
        let qd = self.sess.as_ref().map_or(0, |s| s.queue_depth);
        let sessname = self.m.sessname().to_string();
        let Some(p) = self.slot(slot) else {
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
            sessname: &sessname,
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

    /// INFO_RSP's chunk table goes to the path (for the cores), and every
    /// receive is posted.
    fn install_info(&mut self, slot: usize, chunks: &[(u64, u32)]) -> Result<(), DownReason> {
        let qd = self.sess.as_ref().map_or(1, |s| s.queue_depth);
        let Some(p) = self.slot(slot) else {
            return Ok(());
        };
        if let Some(sh) = &p.shared {
            for (k, &(a, key)) in chunks.iter().enumerate() {
                sh.rbufs[k].addr.store(a, Ordering::Relaxed);
                sh.rbufs[k].rkey.store(key, Ordering::Release);
            }
        }
        let local = |cid: u16, e: rtrs_fabric::FabricError| DownReason::Local {
            cid,
            what: format!("cannot post receives: {e}"),
        };
        if let Some(svc) = p.svc.as_mut() {
            svc.signal = Signal::for_queue_depth(qd);
            svc.post_all_recvs().map_err(|e| local(0, e))?;
        }
        for con in &mut p.io {
            con.signal = Signal::for_queue_depth(qd);
            con.post_all_recvs().map_err(|e| local(con.cid, e))?;
        }
        Ok(())
    }

    fn up(&mut self, slot: usize, epoch: u16, reconnect: bool) {
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if let Some(sh) = &p.shared {
            sh.set_epoch(epoch);
            sh.publish(PathState::Connected);
            if reconnect {
                sh.reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Connection cid to core (cid - 1) % cores: one each, or several
        // where the path has more connections than the session has cores.
        let mut per: Vec<Vec<CltCon<F>>> = (0..self.cores.len()).map(|_| Vec::new()).collect();
        for con in std::mem::take(&mut p.io) {
            let k = (usize::from(con.cid).max(1) - 1) % per.len().max(1);
            if let Some(v) = per.get_mut(k) {
                v.push(con);
            }
        }
        for (k, cons) in per.into_iter().enumerate() {
            if let Some(c) = self.cores.get_mut(k) {
                c.send(k, CoreMsg::Cons(slot, cons));
            }
        }
    }

    fn teardown(
        &mut self,
        slot: usize,
        ids: Vec<ConnId>,
        why: &DownReason,
        was_up: bool,
        news: bool,
        failed_reconnects: u64,
    ) {
        for id in ids {
            if let Err(e) = self.cm.disconnect(id) {
                tracing::debug!(slot, "disconnect: {e}");
            }
        }
        let has_sess = self.sess.is_some();
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        p.svc = None;
        p.io.clear();
        p.info = None;
        if let (Some(sh), true) = (&p.shared, news) {
            if was_up {
                sh.went_down(why);
            } else {
                sh.set_reason(why);
            }
            sh.failed_reconnects
                .store(failed_reconnects, Ordering::Relaxed);
        }
        if has_sess {
            for (k, c) in self.cores.iter_mut().enumerate() {
                c.send(k, CoreMsg::Drop(slot));
            }
        }
    }

    fn closed(&mut self, slot: usize, why: &DownReason, remove: bool) {
        let has_sess = self.sess.is_some();
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if let Some(sh) = &p.shared {
            sh.set_reason(why);
            sh.publish(PathState::Closed);
        }
        if !remove {
            return;
        }
        let shared = p.shared.clone();
        if has_sess {
            for (k, c) in self.cores.iter_mut().enumerate() {
                c.send(k, CoreMsg::Remove(slot));
            }
        }
        if let (Some(sh), Ok(mut l)) = (shared, self.shared.paths.lock()) {
            l.retain(|x| !Arc::ptr_eq(x, &sh));
        }
        self.slots[slot] = None;
    }

    /// Polls path `slot`'s cid 0: INFO_RSP while connecting, heartbeats
    /// and their acks while up; each goes to the machine.
    fn poll_svc(&mut self, slot: usize, now: Instant) -> usize {
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return 0;
        };
        let Some(svc) = p.svc.as_mut() else { return 0 };
        let n = svc.poll(&mut self.wcs);
        let qd = self.sess.as_ref().map_or(0, |s| s.queue_depth);
        for i in 0..n {
            let wc = self.wcs[i];
            if wc.status != WcStatus::Success {
                let why = DownReason::Completion {
                    cid: 0,
                    status: wc.status,
                    opcode: wc.opcode,
                };
                self.m.failed(slot, why, now);
                break;
            }
            let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                break;
            };
            if wc.wr_id == WR_INFO_RSP && wc.opcode == WcOpcode::Recv {
                let Some(info) = p.info.take() else {
                    self.m.info_rsp(slot, &[], now);
                    continue;
                };
                let mut b = vec![0u8; (wc.byte_len as usize).min(info_rsp_len(qd))];
                match info.mem.read(InfoReq::<&[u8]>::LEN, &mut b) {
                    Ok(()) => self.m.info_rsp(slot, &b, now),
                    Err(e) => {
                        let what = format!("INFO_RSP: {e}");
                        self.m
                            .failed(slot, DownReason::Protocol { cid: 0, what }, now);
                    }
                }
                continue;
            }
            if wc.wr_id & WR_KIND != WR_RECV {
                continue;
            }
            let Some(svc) = p.svc.as_mut() else { break };
            if let Err(e) = svc.post_recv((wc.wr_id & 0xffff_ffff) as u32) {
                let what = format!("cannot repost a receive: {e}");
                self.m.failed(slot, DownReason::Local { cid: 0, what }, now);
                break;
            }
            self.m
                .svc_imm(slot, Imm::decode_clt(wc.imm).map_err(|_| ()), now);
        }
        n + self.run(now)
    }

    fn command(&mut self, cmd: Cmd, now: Instant) {
        let token = |c: &mut CltControl<F>, p: Pending| {
            let t = Token(c.next_token);
            c.next_token += 1;
            c.pending.insert(t, p);
            t
        };
        let cmd = match cmd {
            Cmd::AddPath(addr, r) => MachineCmd::AddPath(addr, token(self, Pending::Path(r))),
            Cmd::RemovePath(id, r) => MachineCmd::RemovePath(id, token(self, Pending::Done(r))),
            Cmd::Disconnect(id, r) => MachineCmd::Disconnect(id, token(self, Pending::Done(r))),
            Cmd::Reconnect(id, r) => MachineCmd::Reconnect(id, token(self, Pending::Done(r))),
            Cmd::SetReconnect(p) => MachineCmd::SetReconnect(p),
        };
        self.m.command(cmd, now);
        self.run(now);
    }
}

impl<F: Fabric> pollers::Control for CltControl<F> {
    type Msg = CtlMsg<F>;

    fn on_msg(&mut self, msg: CtlMsg<F>, now: Instant) {
        match msg {
            // Dropped here: the QP is destroyed off the cores.
            CtlMsg::Retired(con) => drop(con),
            CtlMsg::PathFailed {
                slot,
                epoch,
                reason,
                cons,
            } => {
                self.m.core_failed(slot, epoch, reason, now);
                self.run(now);
                // After the teardown's CM disconnect: the QPs go last.
                drop(cons);
            }
            CtlMsg::Cmd(c) => self.command(c, now),
        }
    }

    fn poll(&mut self, now: Instant) -> usize {
        let mut work = 0;
        while let Some(ev) = self.events.next(&mut self.cm) {
            self.m.handle_cm(ev, now);
            work += 1 + self.run(now);
        }
        for slot in 0..self.slots.len() {
            work += self.poll_svc(slot, now);
            let recvs = self
                .slot(slot)
                .and_then(|s| s.shared.as_ref())
                .map(|sh| sh.recvs());
            if let Some(r) = recvs {
                self.m.io_recvs(slot, r);
            }
        }
        self.m.poll(now);
        work += self.run(now);
        // Once more: a software fabric sends what was just posted (a beat,
        // an ack, INFO_REQ) when its CQ is polled, and the loop may wait next.
        for slot in 0..self.slots.len() {
            work += self.poll_svc(slot, now);
        }
        for c in &mut self.cores {
            c.flush();
        }
        work
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.m.poll_timeout()
    }

    fn wait(&mut self, max: Duration) {
        self.events.wait(&mut self.cm, max);
    }

    fn on_stop(&mut self, now: Instant) {
        self.m.close_all(now);
        self.run(now);
        for c in &mut self.cores {
            c.flush();
        }
    }
}
