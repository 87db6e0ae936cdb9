//! The server's control as a machine without I/O: what the server holds
//! (sessions, their paths, each path's connections), admission
//! ([`super::admit`]), handshake deadlines, closing paths and ending
//! sessions, refusals (counted, logged once per kind per second) and the
//! events an embedder hears. CM events, what the paths' connections said
//! (a path up after INFO_REQ, a path a core or cid 0 closed), operator
//! commands and `now` in; actions out ([`SrvMachine::poll_action`]): accept
//! or reject, close a path, disconnect its connections, drop a session,
//! emit an event. The driver (`ctl.rs`) owns the CM, the memory and the
//! connections, does each action and reports what came of it
//! (`accepted`, `accept_failed`, `path_closing`) before it takes the next.
//!
//! ```text
//!  ConnectRequest ─> admit (chain) ─┬─ refused ─> Refuse (+ event, gated log)
//!                                   └─ Accept(plan) ─> driver ─> accepted / accept_failed
//!  Disconnected, handshake deadline, operator ─> Close(path) ─> driver: the path closes
//!  path Closing (seen by the driver) ─> reap: Disconnect(cons), Closed, DropSession, events
//! ```

use super::admit::{admit, refused, Admit, Memory, Refused};
use super::{CloseTarget, ClosedPath, Refusal, SrvConfig, SrvEvent};
use crate::sess::DownReason;
use minstant::Instant;
use rtrs_fabric::{CmRefusal, ConnId, WcStatus};
use rtrs_proto::ConnReqRepr;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

/// At most one refusal log line per kind this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// One path of a session, as the control knows it.
#[derive(Debug)]
pub(crate) struct PathRec {
    pub(crate) id: u64,
    pub(crate) sess_uuid: [u8; 16],
    pub(crate) peer: String,
    pub(crate) listener: ConnId,
    pub(crate) cid_num: u16,
    /// The connections accepted so far (cids).
    pub(crate) cids: Vec<u16>,
    /// Its INFO_REQ was taken: IO flows.
    pub(crate) connected: bool,
    /// Failing or closing: being torn down.
    pub(crate) closing: bool,
    /// When its first connection came (its handshake's deadline starts).
    pub(crate) born: Instant,
    pub(crate) sessname: Option<String>,
    pub(crate) reason: Option<DownReason>,
}

/// A session: who made it, its chunk memory, its paths.
#[derive(Debug)]
pub(crate) struct SessRec {
    pub(crate) host: String,
    /// Chunk memory it holds (bytes), under the memory budget.
    pub(crate) bytes: u64,
    /// Whether that memory is a slab of the preallocated chunk pool.
    pub(crate) pooled: bool,
    pub(crate) paths: Vec<PathRec>,
}

impl SessRec {
    /// The path `sess_uuid` names, unless it is closed and gone.
    pub(crate) fn live_path(&self, sess_uuid: &[u8; 16]) -> Option<&PathRec> {
        self.paths.iter().find(|p| p.sess_uuid == *sess_uuid)
    }
}

/// Everything the server holds, by session (`paths_uuid`).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) sessions: BTreeMap<[u8; 16], SessRec>,
}

impl Registry {
    /// Connections of `host` in paths still in their handshake.
    pub(crate) fn handshakes_of(&self, host: &str) -> usize {
        self.sessions
            .values()
            .flat_map(|s| &s.paths)
            .filter(|p| !p.connected && !p.closing && super::admit::host_of(&p.peer) == host)
            .map(|p| p.cids.len())
            .sum()
    }

    fn path_mut(&mut self, id: u64) -> Option<(&[u8; 16], &mut PathRec)> {
        self.sessions
            .iter_mut()
            .find_map(|(u, s)| s.paths.iter_mut().find(|p| p.id == id).map(|p| (u, p)))
    }
}

/// A connect request, as the CM handed it up.
pub(crate) struct Request<'a> {
    pub(crate) id: ConnId,
    pub(crate) listener: ConnId,
    /// CON_REQ.
    pub(crate) pdata: &'a [u8],
    pub(crate) peer: &'a str,
    /// The pre-shared key the peer proved (tcp).
    pub(crate) key_id: Option<String>,
}

/// What the driver must make of an admitted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// A session (chunk memory), then path `path` with this connection.
    NewSession { path: u64 },
    /// Path `path` of an existing session with this connection.
    NewPath { path: u64 },
    /// Connection `req.cid` of path `path`.
    NextCid { path: u64 },
}

impl Plan {
    pub(crate) fn path(&self) -> u64 {
        match *self {
            Plan::NewSession { path } | Plan::NewPath { path } | Plan::NextCid { path } => path,
        }
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub(crate) enum SrvAction {
    /// Make what `plan` says and accept connection `id`; then
    /// [`SrvMachine::accepted`] or [`SrvMachine::accept_failed`].
    Accept {
        id: ConnId,
        listener: ConnId,
        req: ConnReqRepr,
        plan: Plan,
        peer: String,
        key_id: Option<String>,
    },
    /// A refusal: counted; `id` (a request the CM handed up) is rejected
    /// with `errno` on the wire.
    Refuse {
        id: Option<ConnId>,
        refused: Refused,
    },
    /// Close path `path` (its connections stop taking IO); then
    /// [`SrvMachine::path_closing`] with the reason it closed with.
    Close { path: u64, why: DownReason },
    /// Disconnect these connections (a closing path's).
    Disconnect(Vec<ConnId>),
    /// Path `path` is closed: forget it.
    Closed { path: u64 },
    /// The session's last path closed: drop it and its memory.
    DropSession([u8; 16]),
    /// The sessions, and the chunk memory they hold, now.
    Publish { sessions: usize, bytes: u64 },
    /// Tell the embedder (logged already).
    Emit(SrvEvent),
}

/// The server's control, without I/O.
pub(crate) struct SrvMachine {
    cfg: SrvConfig,
    pub(crate) reg: Registry,
    /// Accepted connections: their session, path and cid.
    cons: BTreeMap<ConnId, ([u8; 16], u64, u16)>,
    next_path: u64,
    /// The accept the driver is making: its session, path and cid.
    pending: Option<(ConnId, [u8; 16], PathRec, bool)>,
    /// Refusal log lines: when the last went out per kind, and how many
    /// refusals came since.
    log_gate: HashMap<Refusal, (Instant, u64)>,
    now: Instant,
    actions: VecDeque<SrvAction>,
}

impl SrvMachine {
    pub(crate) fn new(cfg: SrvConfig, now: Instant) -> SrvMachine {
        SrvMachine {
            cfg,
            reg: Registry::default(),
            cons: BTreeMap::new(),
            next_path: 0,
            pending: None,
            log_gate: HashMap::new(),
            now,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, if any.
    pub(crate) fn poll_action(&mut self) -> Option<SrvAction> {
        self.actions.pop_front()
    }

    /// When a path's handshake runs out (the next deadline of
    /// [`SrvMachine::poll`]).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let limit = self.cfg.limits.handshake_timeout;
        self.reg
            .sessions
            .values()
            .flat_map(|s| &s.paths)
            .filter(|p| !p.connected && !p.closing)
            .map(|p| p.born + limit)
            .min()
    }

    /// A connect request: admitted (an accept to make) or refused.
    pub(crate) fn connect_request(&mut self, r: Request<'_>, mem: Memory, now: Instant) {
        let Request {
            id,
            listener,
            pdata,
            peer,
            key_id,
        } = r;
        self.now = now;
        let (req, admitted) = match admit(&self.reg, &self.cfg, mem, listener, pdata, peer) {
            Ok(v) => v,
            Err(r) => return self.refuse(Some(id), peer, r),
        };
        let (plan, rec, new_sess) = match admitted {
            Admit::NextCid { path } => (Plan::NextCid { path }, None, false),
            Admit::NewSession | Admit::NewPath => {
                let path = self.next_path;
                self.next_path += 1;
                let rec = PathRec {
                    id: path,
                    sess_uuid: req.sess_uuid,
                    peer: peer.to_string(),
                    listener,
                    cid_num: req.cid_num,
                    cids: Vec::new(),
                    connected: false,
                    closing: false,
                    born: now,
                    sessname: None,
                    reason: None,
                };
                let new_sess = admitted == Admit::NewSession;
                let plan = if new_sess {
                    Plan::NewSession { path }
                } else {
                    Plan::NewPath { path }
                };
                (plan, Some(rec), new_sess)
            }
        };
        if let Some(rec) = rec {
            self.pending = Some((id, req.paths_uuid, rec, new_sess));
        }
        self.actions.push_back(SrvAction::Accept {
            id,
            listener,
            req,
            plan,
            peer: peer.to_string(),
            key_id,
        });
    }

    /// The driver accepted connection `id` (cid `cid` of its plan's path);
    /// `pooled`: a new session's memory is a slab of the chunk pool.
    pub(crate) fn accepted(
        &mut self,
        id: ConnId,
        paths_uuid: [u8; 16],
        path: u64,
        cid: u16,
        pooled: bool,
    ) {
        // The driver answers each accept before it takes the next action:
        // a pending new path is this one's.
        if let Some((_, u, rec, new_sess)) = self.pending.take().filter(|p| p.0 == id) {
            if new_sess {
                self.reg.sessions.insert(
                    u,
                    SessRec {
                        host: super::admit::host_of(&rec.peer).to_string(),
                        bytes: super::admit::session_bytes(&self.cfg),
                        pooled,
                        paths: Vec::new(),
                    },
                );
                self.publish();
            }
            if let Some(s) = self.reg.sessions.get_mut(&u) {
                s.paths.push(rec);
            }
        }
        if let Some((_, p)) = self.reg.path_mut(path) {
            p.cids.push(cid);
        }
        self.cons.insert(id, (paths_uuid, path, cid));
    }

    /// The driver could not make the accept of `id`: refused, with why
    /// (the driver closed a path it had already, and dropped what it made
    /// for a new one).
    pub(crate) fn accept_failed(&mut self, id: ConnId, peer: &str, r: Refused) {
        if self.pending.as_ref().is_some_and(|p| p.0 == id) {
            self.pending = None;
        }
        self.refuse(Some(id), peer, r);
    }

    /// The CM refused a peer itself (its handshake, authentication, ...).
    pub(crate) fn cm_refused(&mut self, peer: &str, why: CmRefusal, detail: String, now: Instant) {
        self.now = now;
        let (kind, errno) = match why {
            CmRefusal::Access => (Refusal::Access, libc::EACCES),
            CmRefusal::Auth => (Refusal::Auth, libc::EACCES),
            CmRefusal::Malformed => (Refusal::Protocol, libc::EPROTO),
            CmRefusal::TimedOut => (Refusal::Timeout, libc::ETIMEDOUT),
            CmRefusal::Handshakes => (Refusal::Handshakes, libc::EBUSY),
            CmRefusal::Resources => (Refusal::Resources, libc::EMFILE),
        };
        self.refuse(None, peer, refused(kind, errno, detail));
    }

    fn refuse(&mut self, id: Option<ConnId>, peer: &str, r: Refused) {
        let ev = SrvEvent::Refused {
            peer: peer.to_string(),
            kind: r.kind,
            errno: -r.errno,
            why: r.why.clone(),
        };
        let kind = r.kind;
        self.actions.push_back(SrvAction::Refuse { id, refused: r });
        // A flood is not a flood of log lines: one line per kind per
        // second, then how many more there were (every one is counted and
        // reaches the event subscribers).
        let now = self.now;
        let gate = self.log_gate.entry(kind).or_insert((now, 0));
        if now.saturating_duration_since(gate.0) >= REFUSAL_LOG_EVERY || gate.1 == 0 {
            let more = gate.1.saturating_sub(1);
            *gate = (now, 1);
            if more > 0 {
                tracing::warn!(
                    "{more} more refusals of kind {} in the last second",
                    kind.name()
                );
            }
            tracing::warn!("{ev}");
        } else {
            gate.1 += 1;
        }
        self.actions.push_back(SrvAction::Emit(ev));
    }

    /// Connection `id` was disconnected by its peer (or its CM).
    pub(crate) fn disconnected(&mut self, id: ConnId, now: Instant) {
        self.now = now;
        if let Some(&(_, path, cid)) = self.cons.get(&id) {
            self.close(path, DownReason::Disconnected { cid });
        }
    }

    fn close(&mut self, path: u64, why: DownReason) {
        if let Some((_, p)) = self.reg.path_mut(path) {
            if !p.closing {
                self.actions.push_back(SrvAction::Close { path, why });
            }
        }
    }

    /// Path `path` took its INFO_REQ (`sessname`): it is connected.
    pub(crate) fn path_up(&mut self, path: u64, sessname: &str) {
        let Some((u, p)) = self.reg.path_mut(path) else {
            return;
        };
        if p.connected || p.closing {
            return;
        }
        p.connected = true;
        p.sessname = Some(sessname.to_string());
        let (u, peer) = (*u, p.peer.clone());
        let connected = self.reg.sessions.get(&u).map_or(0, |s| {
            s.paths.iter().filter(|p| p.connected && !p.closing).count()
        });
        if connected == 1 {
            tracing::info!(sessname = %sessname, "session {sessname} connected");
        }
        let ev = SrvEvent::PathUp {
            sessname: sessname.to_string(),
            peer,
            paths_uuid: u,
        };
        tracing::info!("{ev}");
        self.actions.push_back(SrvAction::Emit(ev));
    }

    /// Path `path` is closing, with `why` (a core's or cid 0's reason, or
    /// the one a [`SrvAction::Close`] gave: whichever came first).
    pub(crate) fn path_closing(&mut self, path: u64, why: Option<DownReason>) {
        if let Some((_, p)) = self.reg.path_mut(path) {
            p.closing = true;
            if why.is_some() {
                p.reason = why;
            }
        }
    }

    /// The operator closes the paths `target` names (gracefully: the client
    /// reconnects as after the kernel's sysfs `disconnect`); returns how
    /// many were open.
    pub(crate) fn close_by_operator(&mut self, target: CloseTarget, now: Instant) -> usize {
        self.now = now;
        let mut hit = Vec::new();
        for (u, s) in &self.reg.sessions {
            for p in &s.paths {
                let named = match target {
                    CloseTarget::Path(x) => p.sess_uuid == x,
                    CloseTarget::Session(x) => *u == x,
                };
                if named && !p.closing {
                    tracing::info!(
                        peer = %p.peer,
                        sessname = ?p.sessname,
                        "the operator closes the path"
                    );
                    hit.push(p.id);
                }
            }
        }
        for &path in &hit {
            self.close(path, DownReason::Operator);
        }
        hit.len()
    }

    /// The deadlines at `now` (handshakes that took too long), then the
    /// closing paths torn down and sessions without paths dropped.
    pub(crate) fn poll(&mut self, now: Instant) {
        self.now = now;
        let limit = self.cfg.limits.handshake_timeout;
        let late: Vec<u64> = self
            .reg
            .sessions
            .values()
            .flat_map(|s| &s.paths)
            .filter(|p| !p.connected && !p.closing && now.saturating_duration_since(p.born) > limit)
            .map(|p| p.id)
            .collect();
        for path in late {
            self.close(
                path,
                DownReason::Timeout {
                    cid: 0,
                    step: crate::sess::Step::Info,
                },
            );
        }
    }

    /// Tears down the closing paths: disconnects their connections,
    /// forgets them, and drops a session with its last path.
    pub(crate) fn reap(&mut self) {
        let mut closed = Vec::new();
        for (u, s) in &mut self.reg.sessions {
            let (gone, kept): (Vec<PathRec>, Vec<PathRec>) = std::mem::take(&mut s.paths)
                .into_iter()
                .partition(|p| p.closing);
            s.paths = kept;
            for p in gone {
                closed.push((*u, p));
            }
        }
        if closed.is_empty() {
            return;
        }
        let mut events = Vec::new();
        for (u, p) in closed {
            let ids: Vec<ConnId> = self
                .cons
                .iter()
                .filter(|(_, c)| c.1 == p.id)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                self.cons.remove(id);
            }
            self.actions.push_back(SrvAction::Disconnect(ids));
            self.actions.push_back(SrvAction::Closed { path: p.id });
            let ended = self
                .reg
                .sessions
                .get(&u)
                .is_some_and(|s| s.paths.is_empty());
            if ended {
                self.reg.sessions.remove(&u);
                self.actions.push_back(SrvAction::DropSession(u));
            }
            events.push(ClosedPath {
                paths_uuid: u,
                session_ended: ended,
                sessname: p.sessname,
                peer: p.peer,
                reason: p.reason.unwrap_or(DownReason::SessionClosed),
            });
        }
        self.publish();
        for c in events {
            self.emit_closed(c);
        }
    }

    fn emit_closed(&mut self, c: ClosedPath) {
        let who = c.sessname.as_deref().unwrap_or("?");
        let line = format!("path {who} ({}) closed: {}", c.peer, c.reason);
        // A peer's or the operator's close is the normal course (flushed
        // work requests follow a peer's disconnect); the rest are failures.
        match c.reason {
            DownReason::Completion {
                status: WcStatus::WrFlushErr,
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
        self.actions
            .push_back(SrvAction::Emit(SrvEvent::PathClosed(c)));
    }

    fn publish(&mut self) {
        let bytes = self.reg.sessions.values().map(|s| s.bytes).sum();
        self.actions.push_back(SrvAction::Publish {
            sessions: self.reg.sessions.len(),
            bytes,
        });
    }

    /// The server stops: every path closes.
    pub(crate) fn stop(&mut self, now: Instant) {
        self.now = now;
        let all: Vec<u64> = self
            .reg
            .sessions
            .values()
            .flat_map(|s| &s.paths)
            .map(|p| p.id)
            .collect();
        for path in all {
            self.close(path, DownReason::SessionClosed);
        }
    }

    /// Whether the machine thinks path `path` is up, closing, or unknown.
    pub(crate) fn path_view(&self, path: u64) -> Option<(bool, bool)> {
        self.reg
            .sessions
            .values()
            .flat_map(|s| &s.paths)
            .find(|p| p.id == path)
            .map(|p| (p.connected, p.closing))
            .or_else(|| {
                self.pending
                    .as_ref()
                    .filter(|x| x.2.id == path)
                    .map(|_| (false, false))
            })
    }
}

#[cfg(test)]
mod tests {
    //! The server's control alone: no fabric, no thread; the test plays
    //! the driver.
    use super::*;
    use crate::srv::Limits;
    use rtrs_proto::PRIVATE_DATA_LEN;

    const S: Duration = Duration::from_secs(1);

    fn cfg() -> SrvConfig {
        SrvConfig {
            queue_depth: 4,
            max_chunk_size: 8192,
            limits: Limits {
                handshake_timeout: 30 * S,
                max_sessions_per_host: 2,
                ..Limits::default()
            },
            ..SrvConfig::default()
        }
    }

    fn req(cid: u16, path: u8, sess: u8) -> Vec<u8> {
        let mut b = vec![0u8; PRIVATE_DATA_LEN];
        ConnReqRepr {
            cid,
            cid_num: 2,
            recon_cnt: 1,
            sess_uuid: [path; 16],
            paths_uuid: [sess; 16],
            first_conn: true,
        }
        .emit(&mut b)
        .unwrap();
        b
    }

    const NO_POOL: Memory = Memory {
        slab_free: false,
        pool_bytes: 0,
    };

    /// Plays the driver: accepts as planned, closes paths as asked.
    fn drive(m: &mut SrvMachine) -> Vec<SrvAction> {
        let mut out = Vec::new();
        while let Some(a) = m.poll_action() {
            match &a {
                SrvAction::Accept { id, req, plan, .. } => {
                    m.accepted(*id, req.paths_uuid, plan.path(), req.cid, false)
                }
                SrvAction::Close { path, why } => m.path_closing(*path, Some(why.clone())),
                _ => {}
            }
            out.push(a);
        }
        out
    }

    fn connect(m: &mut SrvMachine, id: u64, pd: &[u8], peer: &str, now: Instant) -> Vec<SrvAction> {
        let r = Request {
            id: ConnId(id),
            listener: ConnId(0),
            pdata: pd,
            peer,
            key_id: None,
        };
        m.connect_request(r, NO_POOL, now);
        drive(m)
    }

    #[test]
    fn a_path_is_admitted_connected_and_reaped_with_its_session() {
        let t0 = Instant::now();
        let mut m = SrvMachine::new(cfg(), t0);
        let a = connect(&mut m, 1, &req(0, 1, 9), "tcp:10.0.0.1:5", t0);
        assert!(
            matches!(
                a[0],
                SrvAction::Accept {
                    plan: Plan::NewSession { .. },
                    ..
                }
            ),
            "{a:?}"
        );
        let a = connect(&mut m, 2, &req(1, 1, 9), "tcp:10.0.0.1:5", t0);
        let path = match &a[0] {
            SrvAction::Accept {
                plan: Plan::NextCid { path },
                ..
            } => *path,
            x => panic!("{x:?}"),
        };
        // cid 1 twice: refused.
        let a = connect(&mut m, 3, &req(1, 1, 9), "tcp:10.0.0.1:5", t0);
        assert!(
            matches!(&a[0], SrvAction::Refuse { refused, .. } if refused.kind == Refusal::Protocol)
        );
        m.path_up(path, "unit");
        assert!(matches!(
            drive(&mut m)[..],
            [SrvAction::Emit(SrvEvent::PathUp { .. })]
        ));
        m.disconnected(ConnId(2), t0);
        drive(&mut m);
        m.reap();
        let a = drive(&mut m);
        let closed = a.iter().find_map(|a| match a {
            SrvAction::Emit(SrvEvent::PathClosed(c)) => Some(c.clone()),
            _ => None,
        });
        let c = closed.expect("the path closed");
        assert!(c.session_ended);
        assert_eq!(c.reason, DownReason::Disconnected { cid: 1 });
        assert!(a.iter().any(|a| matches!(a, SrvAction::DropSession(_))));
        assert!(m.reg.sessions.is_empty());
    }

    #[test]
    fn a_handshake_that_does_not_finish_is_closed_at_its_deadline() {
        let t0 = Instant::now();
        let mut m = SrvMachine::new(cfg(), t0);
        connect(&mut m, 1, &req(0, 1, 9), "tcp:10.0.0.1:5", t0);
        assert_eq!(m.poll_timeout(), Some(t0 + 30 * S));
        m.poll(t0 + 30 * S);
        assert!(
            drive(&mut m).is_empty(),
            "not before the deadline has passed"
        );
        m.poll(t0 + 31 * S);
        let a = drive(&mut m);
        assert!(
            matches!(
                &a[..],
                [SrvAction::Close {
                    why: DownReason::Timeout { .. },
                    ..
                }]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn refusals_are_checked_before_anything_is_made() {
        let t0 = Instant::now();
        let mut m = SrvMachine::new(cfg(), t0);
        // A malformed CON_REQ.
        let a = connect(&mut m, 1, &[0u8; 8], "tcp:10.0.0.1:5", t0);
        assert!(
            matches!(&a[0], SrvAction::Refuse { refused, .. } if refused.kind == Refusal::Protocol)
        );
        // Two sessions of one host, then a third refused.
        connect(&mut m, 2, &req(0, 1, 1), "tcp:10.0.0.1:5", t0);
        connect(&mut m, 3, &req(0, 2, 2), "tcp:10.0.0.1:6", t0);
        let a = connect(&mut m, 4, &req(0, 3, 3), "tcp:10.0.0.1:7", t0);
        assert!(
            matches!(&a[0], SrvAction::Refuse { refused, .. } if refused.kind == Refusal::SessionsPerHost),
            "{a:?}"
        );
        // A second path between the same two addresses.
        let a = connect(&mut m, 5, &req(0, 4, 1), "tcp:10.0.0.1:8", t0);
        assert!(
            matches!(&a[0], SrvAction::Refuse { refused, .. } if refused.kind == Refusal::Duplicate),
            "{a:?}"
        );
        assert_eq!(m.reg.sessions.len(), 2, "nothing made for the refused");
    }

    #[test]
    fn a_flood_of_refusals_is_one_log_line_a_second_and_every_one_counted() {
        let t0 = Instant::now();
        let mut m = SrvMachine::new(cfg(), t0);
        let mut refusals = 0;
        for i in 0..100 {
            for a in connect(&mut m, i, &[1u8; 4], "tcp:10.0.0.9:1", t0) {
                refusals += usize::from(matches!(a, SrvAction::Refuse { .. }));
            }
        }
        assert_eq!(refusals, 100);
        assert_eq!(m.log_gate.get(&Refusal::Protocol).map(|g| g.1), Some(100));
    }
}
