//! The client session's control as a machine without I/O (quinn's shape,
//! like [`ClientPath`], which it runs per path): CM events, cid 0's
//! completions, the cores' failure reports, the operator's commands and
//! `now` in; actions out ([`SessMachine::poll_action`]): connect, post
//! INFO_REQ or a heartbeat, make the session, hand a path to the cores,
//! tear it down, emit an event, answer a command. It owns no queue pair, no
//! CM and no clock; the driver (`ctl.rs`) does each action and reports
//! what came of it (`connect_sent`, `session_made`, `failed`, ...) before it
//! takes the next, so a failed action is seen before anything after it.
//!
//! ```text
//!  CmEvent ─┐                                         ┌─> Connect / SendInfo / PostHb
//!  cid 0 ───┼─> per path: ClientPath + Heartbeat ─────┼─> MakeSession / Attach / InstallInfo
//!  cores ───┤    session: opening, up count, geometry ├─> Up / Teardown / Closed
//!  Cmd ─────┘    (virtual time: `now` passed in)      └─> Emit(CltEvent) / Answer / Opened
//! ```

use super::path::PathId;
use super::{CltConfig, CltError, CltEvent, Geometry};
use crate::sess::hb::{HbAction, Heartbeat};
use crate::sess::path::{ClientPath, PathAction, PathEvent, PathState, ReconnectPolicy};
use crate::sess::{DownReason, CONTROL_TICK};
use minstant::Instant;
use rtrs_fabric::{Address, CmEvent, ConnId};
use rtrs_proto::{slice_chunks, ConnReqRepr, ConnRsp, ConnRspRepr, InfoRsp, MAX_PATHS_NUM};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Names a command's caller, whose answer comes out as [`CltAction::Answer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Token(pub(crate) u64);

/// What a command's caller gets when it succeeds.
#[derive(Debug)]
pub(crate) enum Answered {
    Done,
    Path(PathId),
}

/// The operator's commands (the kernel's sysfs verbs), each with its caller.
#[derive(Debug)]
pub(crate) enum MachineCmd {
    AddPath(Address, Token),
    RemovePath(PathId, Token),
    Disconnect(PathId, Token),
    Reconnect(PathId, Token),
    SetReconnect(ReconnectPolicy),
}

/// What the driver must do next.
#[derive(Debug)]
pub(crate) enum CltAction {
    /// A new path in `slot`, to `addr`: find the device that reaches it.
    NewSlot { slot: usize, addr: Address },
    /// The first CON_RSP (cid 0 of `slot`) sized the session: make its
    /// memory, permits and cores, and attach every path; then
    /// [`SessMachine::session_made`].
    MakeSession { slot: usize, geo: Geometry },
    /// Register the session's memory on `slot`'s device and tell the cores
    /// of the path; then [`SessMachine::attached`].
    Attach { slot: usize },
    /// Create connection `cid` of `slot` and send `req`; then
    /// [`SessMachine::connect_sent`] (or `failed`).
    Connect {
        slot: usize,
        cid: u16,
        req: ConnReqRepr,
    },
    /// Post INFO_REQ on `slot`'s cid 0 (or `failed`).
    SendInfo { slot: usize },
    /// INFO_RSP checked: `chunks` (address, rkey per chunk) for the path's
    /// cores, every receive posted; then [`SessMachine::info_installed`].
    InstallInfo {
        slot: usize,
        chunks: Vec<(u64, u32)>,
    },
    /// A heartbeat (`ack`: its answer) on `slot`'s cid 0 (or `failed`).
    PostHb { slot: usize, ack: bool },
    /// The heartbeat's round trip, for min-latency routing.
    Latency { slot: usize, rtt: Duration },
    /// Heartbeat intervals in a row without an answer, now.
    HbMissed { slot: usize, missed: u32 },
    /// The path is up in round `epoch`: its IO connections to the cores.
    Up {
        slot: usize,
        epoch: u16,
        reconnect: bool,
    },
    /// Disconnect `ids`, drop the round's connections, fail the path's IO
    /// over (the cores drop it). `was_up`: counted as a path that went
    /// down; `news`: a round that failed (counted, logged).
    Teardown {
        slot: usize,
        ids: Vec<ConnId>,
        why: DownReason,
        was_up: bool,
        news: bool,
        failed_reconnects: u64,
    },
    /// The path's state changed (published for the cores and the handle).
    Publish { slot: usize, state: PathState },
    /// The path is closed for good; `remove`: forget it everywhere.
    Closed {
        slot: usize,
        why: DownReason,
        remove: bool,
    },
    /// A connection of no round of ours: close it.
    Disconnect(ConnId),
    /// A connect request reached the client's CM: refuse it.
    Reject(ConnId),
    /// Tell the embedder.
    Emit(CltEvent),
    /// A command's answer.
    Answer(Token, Result<Answered, CltError>),
    /// `Client::open` is done: every path came up, or why not.
    Opened(Result<(), CltError>),
    /// Nothing is left to do (the open failed): stop the control.
    Stop,
}

struct Opening {
    addrs: VecDeque<Address>,
}

/// One path, as the session's control sees it.
struct Slot {
    id: PathId,
    addr: Address,
    sess_uuid: [u8; 16],
    /// cid 0 of this path may create the server's session.
    first: bool,
    cid0_seen: bool,
    sm: ClientPath,
    /// Its device has the session's memory and its cores know it.
    attached: bool,
    ids: Vec<ConnId>,
    info_sent: bool,
    hb: Option<Heartbeat>,
    /// Until when cid 0 is polled closely for a heartbeat's answer.
    probe_until: Option<Instant>,
    /// Receives on the path's IO connections (the cores' counters), as
    /// last reported, and as last counted as life.
    recvs: u64,
    seen_recvs: u64,
    /// Counted in the session's connected paths.
    counted_up: bool,
    removing: bool,
    waiters: Vec<Token>,
    add_waiter: Option<Token>,
}

/// The session's control, without I/O.
pub(crate) struct SessMachine {
    cfg: CltConfig,
    seed: u64,
    paths_uuid: [u8; 16],
    geo: Option<Geometry>,
    slots: Vec<Option<Slot>>,
    next_id: u32,
    conns: HashMap<ConnId, (usize, u16)>,
    opening: Option<Opening>,
    /// The session is closing (the handle dropped).
    closing: bool,
    up: usize,
    /// The time of the last input: a probe's deadline is against it.
    now: Instant,
    actions: VecDeque<CltAction>,
}

/// A uuid from a seed (xorshift): sessions and paths of one client differ.
pub(crate) fn uuid(seed: u64) -> [u8; 16] {
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

impl SessMachine {
    /// A session opening `cfg.paths`, one after another, from `now`.
    pub(crate) fn open(cfg: CltConfig, seed: u64, now: Instant) -> SessMachine {
        let addrs: VecDeque<Address> = cfg.paths.iter().cloned().collect();
        let mut m = SessMachine {
            cfg,
            seed,
            paths_uuid: uuid(seed),
            geo: None,
            slots: Vec::new(),
            next_id: 0,
            conns: HashMap::new(),
            opening: Some(Opening { addrs }),
            closing: false,
            up: 0,
            now,
            actions: VecDeque::new(),
        };
        m.open_next(now);
        m
    }

    /// The next thing to do, if any.
    pub(crate) fn poll_action(&mut self) -> Option<CltAction> {
        self.actions.pop_front()
    }

    /// When [`SessMachine::poll`] has work without new input: a path's
    /// step deadline or heartbeat, or now while a heartbeat's answer is
    /// awaited closely (its round trip is the network's, not a wait's).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let probing = self
            .live()
            .any(|p| p.probe_until.is_some_and(|t| self.now < t));
        if probing {
            return Some(self.now);
        }
        self.live()
            .flat_map(|p| {
                [
                    p.sm.poll_timeout(),
                    p.hb.as_ref().map(Heartbeat::poll_timeout),
                ]
            })
            .flatten()
            .min()
    }

    /// The connections per path (cid 0 and the IO connections).
    pub(crate) fn cid_num(&self) -> u16 {
        self.cfg.cid_num()
    }

    fn live(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().flatten()
    }

    fn slot(&mut self, slot: usize) -> Option<&mut Slot> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
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
            self.cid_num(),
            self.cfg.connect_timeout,
            self.seed.wrapping_add(u64::from(id.0)),
        );
        let s = Slot {
            id,
            sess_uuid: uuid(self.seed.wrapping_add(0x100 + u64::from(id.0))),
            addr: addr.clone(),
            first,
            cid0_seen: false,
            sm,
            attached: false,
            ids: Vec::new(),
            info_sent: false,
            hb: None,
            probe_until: None,
            recvs: 0,
            seen_recvs: 0,
            counted_up: false,
            removing: false,
            waiters: Vec::new(),
            add_waiter: None,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(s);
                i
            }
            None => {
                self.slots.push(Some(s));
                self.slots.len() - 1
            }
        };
        self.actions.push_back(CltAction::NewSlot { slot, addr });
        slot
    }

    /// Starts path `slot`'s first round: attached first where the session
    /// exists (its memory on the path's device), then connecting.
    fn start(&mut self, slot: usize, now: Instant) {
        if self.geo.is_some() {
            self.actions.push_back(CltAction::Attach { slot });
            return;
        }
        self.begin(slot, None, now);
    }

    fn begin(&mut self, slot: usize, attach_failed: Option<DownReason>, now: Instant) {
        if let Some(p) = self.slot(slot) {
            p.sm.open(now);
            if let Some(why) = attach_failed {
                p.sm.handle_event(PathEvent::Failed(why), now);
            }
            tracing::info!(path = %p.id, addr = %p.addr, "connecting");
        }
        self.run_actions(slot, now);
    }

    /// The driver did [`CltAction::Attach`].
    pub(crate) fn attached(&mut self, slot: usize, r: Result<(), DownReason>, now: Instant) {
        self.now = now;
        if let (Some(p), true) = (self.slot(slot), r.is_ok()) {
            p.attached = true;
        }
        self.begin(slot, r.err(), now);
    }

    /// The driver did [`CltAction::MakeSession`] (and attached every path
    /// when it worked).
    pub(crate) fn session_made(
        &mut self,
        slot: usize,
        geo: Geometry,
        r: Result<(), DownReason>,
        now: Instant,
    ) {
        self.now = now;
        match r {
            Ok(()) => {
                self.geo = Some(geo);
                for p in self.slots.iter_mut().flatten() {
                    p.attached = true;
                }
                self.feed(slot, PathEvent::Established { cid: 0 }, now);
            }
            Err(why) => self.fail(slot, why, now),
        }
    }

    fn emit(&mut self, ev: CltEvent) {
        self.actions.push_back(CltAction::Emit(ev));
    }

    fn answer(&mut self, to: Token, r: Result<Answered, CltError>) {
        self.actions.push_back(CltAction::Answer(to, r));
    }

    /// Feeds `ev` to path `slot`'s machine and runs what it says.
    fn feed(&mut self, slot: usize, ev: PathEvent, now: Instant) {
        if let Some(p) = self.slot(slot) {
            p.sm.handle_event(ev, now);
        }
        self.run_actions(slot, now);
    }

    /// Something of path `slot` failed (an action the driver could not do,
    /// a completion error, a dead heartbeat).
    pub(crate) fn failed(&mut self, slot: usize, why: DownReason, now: Instant) {
        self.now = now;
        self.fail(slot, why, now);
    }

    fn fail(&mut self, slot: usize, why: DownReason, now: Instant) {
        self.feed(slot, PathEvent::Failed(why), now);
    }

    fn run_actions(&mut self, slot: usize, now: Instant) {
        loop {
            let Some(p) = self.slot(slot) else { return };
            let Some(a) = p.sm.poll_action() else {
                let state = p.sm.state();
                self.actions.push_back(CltAction::Publish { slot, state });
                return;
            };
            match a {
                PathAction::Connect { cid, recon_cnt } => self.connect(slot, cid, recon_cnt),
                PathAction::SendInfo => {
                    if let Some(p) = self.slot(slot) {
                        p.info_sent = true;
                    }
                    self.actions.push_back(CltAction::SendInfo { slot });
                }
                PathAction::Up { reconnect } => self.up(slot, reconnect, now),
                PathAction::Teardown(why) => self.teardown(slot, why, now),
                PathAction::Closed(why) => self.closed(slot, why),
            }
        }
    }

    fn connect(&mut self, slot: usize, cid: u16, recon_cnt: u16) {
        let (cid_num, paths_uuid) = (self.cid_num(), self.paths_uuid);
        let Some(p) = self.slot(slot) else { return };
        let req = ConnReqRepr {
            cid,
            cid_num,
            recon_cnt,
            sess_uuid: p.sess_uuid,
            paths_uuid,
            first_conn: cid > 0 || p.first || p.cid0_seen,
        };
        self.actions
            .push_back(CltAction::Connect { slot, cid, req });
    }

    /// The driver sent connection `cid` of `slot`'s CON_REQ as `id`.
    pub(crate) fn connect_sent(&mut self, slot: usize, cid: u16, id: ConnId) {
        self.conns.insert(id, (slot, cid));
        if let Some(p) = self.slot(slot) {
            p.ids.push(id);
        }
    }

    /// INFO_RSP arrived on `slot`'s cid 0: the server's chunk table, checked.
    pub(crate) fn info_rsp(&mut self, slot: usize, rsp: &[u8], now: Instant) {
        self.now = now;
        let proto = |what: String| DownReason::Protocol { cid: 0, what };
        let Some(geo) = self.geo else { return };
        let Some(p) = self.slot(slot) else { return };
        if !std::mem::replace(&mut p.info_sent, false) {
            return self.fail(slot, proto("INFO_RSP without an INFO_REQ".into()), now);
        }
        let parsed = InfoRsp::new_checked(rsp)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                let chunk_size = u64::from(geo.max_io_size) + u64::from(geo.max_hdr_size);
                let mut chunks = vec![(0u64, 0u32); usize::from(geo.queue_depth)];
                slice_chunks(&v, geo.queue_depth, chunk_size, |k, a, key| {
                    chunks[k] = (a, key);
                })
                .map_err(|e| e.to_string())
                .map(|()| chunks)
            });
        match parsed {
            Ok(chunks) => self
                .actions
                .push_back(CltAction::InstallInfo { slot, chunks }),
            Err(e) => self.fail(slot, proto(format!("INFO_RSP: {e}")), now),
        }
    }

    /// The driver did [`CltAction::InstallInfo`].
    pub(crate) fn info_installed(&mut self, slot: usize, now: Instant) {
        self.now = now;
        self.feed(slot, PathEvent::InfoDone, now);
    }

    /// A receive completed on `slot`'s cid 0 with `imm` (already reposted).
    pub(crate) fn svc_imm(
        &mut self,
        slot: usize,
        imm: Result<rtrs_proto::imm::Imm, ()>,
        now: Instant,
    ) {
        use rtrs_proto::imm::Imm;
        self.now = now;
        let Some(p) = self.slot(slot) else { return };
        let Some(hb) = p.hb.as_mut() else { return };
        hb.on_recv();
        match imm {
            Ok(Imm::HbAck) => {
                hb.on_ack(now);
                let rtt = hb.latency();
                p.probe_until = None;
                self.actions.push_back(CltAction::Latency { slot, rtt });
            }
            Ok(Imm::HbMsg) => self
                .actions
                .push_back(CltAction::PostHb { slot, ack: true }),
            _ => {}
        }
    }

    /// The receives on `slot`'s IO connections so far (the cores' counters):
    /// any of them is life for the heartbeat.
    pub(crate) fn io_recvs(&mut self, slot: usize, total: u64) {
        if let Some(p) = self.slot(slot) {
            p.recvs = total;
        }
    }

    /// Runs the deadlines at `now`: heartbeats, connection steps, delays.
    pub(crate) fn poll(&mut self, now: Instant) {
        self.now = now;
        for slot in 0..self.slots.len() {
            self.heartbeat(slot, now);
            if let Some(p) = self.slot(slot) {
                p.sm.handle_timeout(now);
            }
            self.run_actions(slot, now);
        }
    }

    fn heartbeat(&mut self, slot: usize, now: Instant) {
        let Some(p) = self.slot(slot) else { return };
        let Some(hb) = p.hb.as_mut() else { return };
        if p.recvs != p.seen_recvs {
            p.seen_recvs = p.recvs;
            hb.on_recv();
        }
        let action = hb.handle_timeout(now);
        // missed() counts the beat outstanding: intervals without an
        // answer are one fewer.
        let missed = hb.missed().saturating_sub(1);
        let why = match action {
            HbAction::Wait => None,
            HbAction::Send => {
                p.probe_until = Some(now + CONTROL_TICK);
                None
            }
            HbAction::Dead => Some(DownReason::Heartbeat {
                missed: hb.missed(),
            }),
        };
        self.actions.push_back(CltAction::HbMissed { slot, missed });
        if action == HbAction::Send {
            self.actions
                .push_back(CltAction::PostHb { slot, ack: false });
        }
        if let Some(why) = why {
            self.fail(slot, why, now);
        }
    }

    fn up(&mut self, slot: usize, reconnect: bool, now: Instant) {
        let opening = self.opening.is_some();
        let (hb_interval, hb_missed_max) = (self.cfg.hb_interval, self.cfg.hb_missed_max);
        let Some(p) = self.slot(slot) else { return };
        p.hb = Some(Heartbeat::start(now, hb_interval, hb_missed_max));
        p.seen_recvs = p.recvs;
        p.counted_up = true;
        let (id, addr, epoch) = (p.id, p.addr.to_string(), p.sm.recon_cnt());
        let waiters = std::mem::take(&mut p.waiters);
        let add = p.add_waiter.take();
        self.actions.push_back(CltAction::Up {
            slot,
            epoch,
            reconnect,
        });
        self.up += 1;
        for w in waiters {
            self.answer(w, Ok(Answered::Done));
        }
        if let Some(w) = add {
            self.answer(w, Ok(Answered::Path(id)));
        }
        if opening {
            let more = self.opening.as_ref().is_some_and(|o| !o.addrs.is_empty());
            if more {
                self.open_next(now);
            } else {
                self.opening = None;
                tracing::info!(paths = self.up, "session {} open", self.cfg.sessname);
                self.actions.push_back(CltAction::Opened(Ok(())));
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
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let ids = std::mem::take(&mut p.ids);
        for id in &ids {
            self.conns.remove(id);
        }
        p.info_sent = false;
        p.hb = None;
        p.probe_until = None;
        let was_up = std::mem::replace(&mut p.counted_up, false);
        let first_round = !p.sm.ever_up();
        let (id, addr) = (p.id, p.addr.to_string());
        let state = p.sm.state();
        // A round that failed, or a path that was up: counted and logged
        // once; tearing down what is already down is not news.
        let news = was_up || state == PathState::ConnectingErr;
        let failed_reconnects = p.sm.reconnects.1;
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
        self.actions.push_back(CltAction::Teardown {
            slot,
            ids,
            why: why.clone(),
            was_up,
            news,
            failed_reconnects,
        });
        let down = |reason: &DownReason| CltError::PathDown {
            addr: addr.clone(),
            reason: reason.clone(),
        };
        for w in waiters {
            self.answer(w, Err(down(&why)));
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
            return self.fail_open(down(&why), now);
        }
        if let Some(w) = add {
            // The kernel's add_path: a path that cannot connect is removed.
            self.answer(w, Err(down(&why)));
            if let Some(p) = self.slot(slot) {
                p.removing = true;
                p.sm.torn_down(now);
                p.sm.close(why);
            }
            return;
        }
        if let Some(p) = self.slot(slot) {
            p.sm.torn_down(now);
        }
    }

    fn fail_open(&mut self, err: CltError, now: Instant) {
        if self.opening.take().is_none() {
            return;
        }
        for slot in 0..self.slots.len() {
            if let Some(p) = self.slot(slot) {
                p.sm.close(DownReason::SessionClosed);
            }
            self.run_actions(slot, now);
        }
        self.actions.push_back(CltAction::Opened(Err(err)));
        self.actions.push_back(CltAction::Stop);
    }

    fn closed(&mut self, slot: usize, why: DownReason) {
        let Some(p) = self.slot(slot) else { return };
        let (id, addr) = (p.id, p.addr.to_string());
        let waiters = std::mem::take(&mut p.waiters);
        let remove = p.removing;
        self.actions.push_back(CltAction::Closed {
            slot,
            why: why.clone(),
            remove,
        });
        for w in waiters {
            self.answer(
                w,
                Err(CltError::PathDown {
                    addr: addr.clone(),
                    reason: why.clone(),
                }),
            );
        }
        if !remove {
            self.emit(CltEvent::PathClosed {
                path: id,
                addr,
                reason: why,
            });
            return;
        }
        self.slots[slot] = None;
        self.emit(CltEvent::PathRemoved { path: id, addr });
    }

    /// A CM event.
    pub(crate) fn handle_cm(&mut self, ev: CmEvent, now: Instant) {
        self.now = now;
        let id = ev.id();
        if let CmEvent::ConnectRequest { .. } = ev {
            tracing::warn!("a connect request reached the client's CM; refused");
            self.actions.push_back(CltAction::Reject(id));
            return;
        }
        let Some(&(slot, cid)) = self.conns.get(&id) else {
            // An event of a round already torn down. A connect of it that
            // completed anyway (a CM that retried its REQ after we gave
            // up) is closed, so the server does not keep a half-made path
            // that refuses the next round's cid 0.
            if let CmEvent::Established { .. } = ev {
                tracing::info!("closing a connection of an abandoned round");
                self.actions.push_back(CltAction::Disconnect(id));
            }
            return;
        };
        let ev = match ev {
            CmEvent::Established { private_data, .. } => {
                match self.established(slot, cid, private_data.as_bytes()) {
                    Ok(Some(geo)) => {
                        // The session is made first; then cid 0 counts.
                        self.actions.push_back(CltAction::MakeSession { slot, geo });
                        return;
                    }
                    Ok(None) => PathEvent::Established { cid },
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
    /// session's geometry: `Some` when it is the first and the session must
    /// be made.
    fn established(
        &mut self,
        slot: usize,
        cid: u16,
        pd: &[u8],
    ) -> Result<Option<Geometry>, DownReason> {
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
            return Ok(None);
        }
        if let Some(p) = self.slot(slot) {
            p.cid0_seen = true;
        }
        let geo = Geometry {
            queue_depth: r.queue_depth,
            max_io_size: r.max_io_size,
            max_hdr_size: r.max_hdr_size,
            new_rkey: r.new_rkey,
        };
        match self.geo {
            None => Ok(Some(geo)),
            Some(g) if g.queue_depth != geo.queue_depth => {
                if let Some(p) = self.slot(slot) {
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
            Some(_) => Ok(None),
        }
    }

    /// A core saw path `slot` fail in connection round `epoch`.
    pub(crate) fn core_failed(&mut self, slot: usize, epoch: u16, why: DownReason, now: Instant) {
        self.now = now;
        let current = self
            .slots
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.sm.recon_cnt() == epoch && p.sm.state() == PathState::Connected);
        if current {
            self.fail(slot, why, now);
        }
    }

    /// An operator command.
    pub(crate) fn command(&mut self, cmd: MachineCmd, now: Instant) {
        self.now = now;
        match cmd {
            MachineCmd::AddPath(addr, to) => {
                let live = self.live().count();
                if live >= MAX_PATHS_NUM {
                    let e = CltError::Config("a session has at most 128 paths");
                    return self.answer(to, Err(e));
                }
                if self.live().any(|p| p.addr == addr) {
                    return self.answer(to, Err(CltError::Exists(addr.to_string())));
                }
                let first = self.up == 0;
                let slot = self.new_slot(addr, first);
                if let Some(p) = self.slot(slot) {
                    p.add_waiter = Some(to);
                }
                self.start(slot, now);
            }
            MachineCmd::RemovePath(id, to) => {
                let Some(slot) = self.slot_of(id) else {
                    return self.answer(to, Err(CltError::NoSuchPath(id)));
                };
                if self.live().count() <= 1 {
                    return self.answer(to, Err(CltError::LastPath));
                }
                let closed = self.slot(slot).is_some_and(|p| {
                    p.removing = true;
                    // Closing already: removed when its close completes.
                    !p.sm.close(DownReason::Removed) && p.sm.state() == PathState::Closed
                });
                if closed {
                    // Nothing to tear down: forget it now.
                    self.closed(slot, DownReason::Removed);
                }
                self.run_actions(slot, now);
                self.answer(to, Ok(Answered::Done));
            }
            MachineCmd::Disconnect(id, to) => {
                let Some(slot) = self.slot_of(id) else {
                    return self.answer(to, Err(CltError::NoSuchPath(id)));
                };
                if let Some(p) = self.slot(slot) {
                    p.sm.close(DownReason::Operator);
                }
                self.run_actions(slot, now);
                self.answer(to, Ok(Answered::Done));
            }
            MachineCmd::Reconnect(id, to) => {
                let Some(slot) = self.slot_of(id) else {
                    return self.answer(to, Err(CltError::NoSuchPath(id)));
                };
                let Some(p) = self.slot(slot) else { return };
                if !p.sm.reconnect_now(now) {
                    return self.answer(to, Err(CltError::Busy));
                }
                p.waiters.push(to);
                self.run_actions(slot, now);
            }
            MachineCmd::SetReconnect(policy) => {
                self.cfg.reconnect = policy;
                for p in self.slots.iter_mut().flatten() {
                    p.sm.set_policy(policy);
                }
            }
        }
    }

    /// The session is closing (its handle dropped, or the control stops):
    /// every path closes.
    pub(crate) fn close_all(&mut self, now: Instant) {
        self.now = now;
        self.closing = true;
        for slot in 0..self.slots.len() {
            if let Some(p) = self.slot(slot) {
                p.sm.close(DownReason::SessionClosed);
            }
            self.run_actions(slot, now);
        }
        if self.opening.take().is_some() {
            self.actions
                .push_back(CltAction::Opened(Err(CltError::Config(
                    "the client was stopped",
                ))));
        }
    }

    /// Whether the session is closing (events are then news, not trouble).
    pub(crate) fn closing(&self) -> bool {
        self.closing
    }

    fn slot_of(&self, id: PathId) -> Option<usize> {
        self.slots
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.id == id))
    }

    /// The id of path `slot`.
    pub(crate) fn path_id(&self, slot: usize) -> Option<PathId> {
        self.slots.get(slot)?.as_ref().map(|p| p.id)
    }

    /// The session's sessname (INFO_REQ).
    pub(crate) fn sessname(&self) -> &str {
        &self.cfg.sessname
    }
}

#[cfg(test)]
mod tests {
    //! The session's control alone: no fabric, no thread, the driver's
    //! part played by the test (each action answered as a driver would).
    use super::*;
    use rtrs_fabric::PrivateData;
    use rtrs_proto::{ConnRspRepr, InfoRspRepr, SgDesc, MAX_HDR_SIZE, PRIVATE_DATA_LEN};

    const QD: u16 = 4;
    const S: Duration = Duration::from_secs(1);

    fn cfg() -> CltConfig {
        let mut c = CltConfig::new("unit", vec!["shm:unit-a".parse().unwrap()]);
        c.connect_timeout = 2 * S;
        c
    }

    fn con_rsp() -> PrivateData {
        let mut b = [0u8; PRIVATE_DATA_LEN];
        ConnRspRepr {
            errno: 0,
            queue_depth: QD,
            max_io_size: 8192 - MAX_HDR_SIZE,
            max_hdr_size: MAX_HDR_SIZE,
            new_rkey: false,
        }
        .emit(&mut b)
        .unwrap();
        PrivateData::new(&b).unwrap()
    }

    fn info_rsp() -> Vec<u8> {
        let descs = [SgDesc {
            addr: 0x1000,
            key: 7,
            len: 8192 * u32::from(QD),
        }];
        let r = InfoRspRepr { descs: &descs };
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b).unwrap();
        b
    }

    /// Plays the driver: every action done as asked, CM connects given ids
    /// from `next`; returns the actions' names.
    fn drive(m: &mut SessMachine, now: Instant, next: &mut u64) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(a) = m.poll_action() {
            let name = format!("{a:?}");
            seen.push(name.split([' ', '(', '{']).next().unwrap_or("").to_string());
            match a {
                CltAction::Connect { slot, cid, .. } => {
                    *next += 1;
                    m.connect_sent(slot, cid, ConnId(*next));
                }
                CltAction::MakeSession { slot, geo } => m.session_made(slot, geo, Ok(()), now),
                CltAction::Attach { slot } => m.attached(slot, Ok(()), now),
                CltAction::InstallInfo { slot, .. } => m.info_installed(slot, now),
                _ => {}
            }
        }
        seen
    }

    /// A session up on one path of 2 connections at `t0`.
    fn open(t0: Instant) -> (SessMachine, u64) {
        let mut m = SessMachine::open(cfg(), 1, t0);
        let mut next = 0;
        let a = drive(&mut m, t0, &mut next);
        assert_eq!(a[..2], ["NewSlot", "Connect"], "{a:?}");
        for id in 1..=2 {
            let ev = CmEvent::Established {
                id: ConnId(id),
                private_data: con_rsp(),
            };
            m.handle_cm(ev, t0);
            drive(&mut m, t0, &mut next);
        }
        m.info_rsp(0, &info_rsp(), t0);
        let a = drive(&mut m, t0, &mut next);
        assert!(a.contains(&"Up".to_string()), "{a:?}");
        assert!(a.contains(&"Opened".to_string()), "{a:?}");
        (m, next)
    }

    #[test]
    fn a_session_opens_one_connection_after_another() {
        let t0 = Instant::now();
        let mut m = SessMachine::open(cfg(), 1, t0);
        let mut next = 0;
        assert_eq!(
            drive(&mut m, t0, &mut next),
            ["NewSlot", "Connect", "Publish"]
        );
        m.handle_cm(
            CmEvent::Established {
                id: ConnId(1),
                private_data: con_rsp(),
            },
            t0,
        );
        // The first CON_RSP sizes the session, then cid 1 goes out.
        let a = drive(&mut m, t0, &mut next);
        assert_eq!(a[..2], ["MakeSession", "Connect"], "{a:?}");
        m.handle_cm(
            CmEvent::Established {
                id: ConnId(2),
                private_data: con_rsp(),
            },
            t0,
        );
        assert_eq!(drive(&mut m, t0, &mut next)[0], "SendInfo");
        m.info_rsp(0, &info_rsp(), t0);
        let a = drive(&mut m, t0, &mut next);
        assert_eq!(a[..2], ["InstallInfo", "Up"], "{a:?}");
        assert!(a.contains(&"Opened".to_string()), "{a:?}");
    }

    #[test]
    fn a_connect_that_never_answers_fails_the_open_at_its_deadline() {
        let t0 = Instant::now();
        let mut m = SessMachine::open(cfg(), 1, t0);
        let mut next = 0;
        drive(&mut m, t0, &mut next);
        assert_eq!(m.poll_timeout(), Some(t0 + 2 * S));
        m.poll(t0 + 2 * S - Duration::from_millis(1));
        assert!(!drive(&mut m, t0, &mut next).contains(&"Teardown".to_string()));
        m.poll(t0 + 2 * S);
        let mut opened = None;
        while let Some(a) = m.poll_action() {
            if let CltAction::Opened(r) = a {
                opened = Some(r);
            }
        }
        let e = opened.expect("the open answered").unwrap_err();
        assert_eq!(e.errno(), -libc::ETIMEDOUT, "{e}");
    }

    #[test]
    fn a_silent_path_is_dead_on_the_seventh_beat_and_reconnects_after_the_delay() {
        let t0 = Instant::now();
        let (mut m, mut next) = open(t0);
        // Beats every 5 s, none answered.
        let mut t = t0;
        let mut down = None;
        while down.is_none() && t < t0 + 60 * S {
            t += Duration::from_millis(100);
            m.poll(t);
            while let Some(a) = m.poll_action() {
                if let CltAction::Teardown { why, was_up, .. } = a {
                    assert!(was_up);
                    assert!(matches!(why, DownReason::Heartbeat { .. }), "{why:?}");
                    down = Some(t);
                }
            }
        }
        let down = down.expect("declared dead");
        assert!(
            (t0 + 35 * S..=t0 + 36 * S).contains(&down),
            "dead {:?} after the last message",
            down - t0
        );
        // The reconnect delay (30 s + 0-7 ms jitter), then the backoff (1 s).
        let at = m.poll_timeout().expect("a reconnect deadline");
        assert!((down + 30 * S..=down + 30 * S + Duration::from_millis(8)).contains(&at));
        m.poll(at);
        drive(&mut m, at, &mut next);
        let at2 = m.poll_timeout().expect("the backoff");
        assert_eq!(at2, at + S);
        m.poll(at2);
        assert!(drive(&mut m, at2, &mut next).contains(&"Connect".to_string()));
    }

    #[test]
    fn a_stale_core_report_is_ignored() {
        let t0 = Instant::now();
        let (mut m, _) = open(t0);
        let why = DownReason::Disconnected { cid: 1 };
        // Round 0 is not the round that is up (recon_cnt starts at 1).
        m.core_failed(0, 0, why.clone(), t0);
        assert!(m.poll_action().is_none());
        m.core_failed(0, 1, why, t0);
        let a: Vec<String> = std::iter::from_fn(|| m.poll_action())
            .map(|a| format!("{a:?}"))
            .collect();
        assert!(a.iter().any(|a| a.starts_with("Teardown")), "{a:?}");
    }
}
