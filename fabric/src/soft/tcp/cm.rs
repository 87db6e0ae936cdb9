//! The tcp connection manager: rdma_cm's dance on the data connection itself,
//! before the QP takes it over.
//!
//! ```text
//!  active                                passive
//!  connect() (non-blocking) ─────────>   accept(): ConnectRequest after REQ
//!  REQ  qp caps, pdata ──────────────>   ConnectRequest event
//!       <──────────────── ACC caps, pdata  (accept)   or   REJ pdata (reject)
//!  QP takes the socket                   (accept: the QP takes the socket)
//!  RTU ──────────────────────────────>   the QP's core reads it: Established
//!  Established
//!  FIN / RST / TCP user timeout <─────>  Disconnected event, QP flushed
//! ```
//! With a pre-shared key ([`TcpConfig::auth`](super::TcpConfig)), a mutual
//! challenge-response comes first (HELLO, CHALLENGE, PROOF: see
//! [`auth`](super::auth)); a peer without the key never gets to send a REQ.
//! Before that, at the door: a source address the application does not
//! admit, or a host with too many connections in handshakes already, is
//! closed right after `accept`; out of descriptors (EMFILE), the listener
//! sheds the connection at the head of its backlog with a spare descriptor
//! and rests a moment, so it neither spins nor leaves peers hanging. Each is
//! a [`CmEvent::Refused`] for the application to log and count.
//!
//! Messages are 96 bytes, read exactly, so nothing after them is consumed
//! here. The passive QP is ready to send from `accept` on (as after
//! rdma_accept), so its core reads the stream from the RTU on; the CM learns
//! of the RTU from the QP. Afterwards the CM keeps its own descriptor of the socket and polls it
//! for the peer's FIN or a reset only (never for data), which is how it sees a
//! peer go away; the core that drives the QP sees the same end of stream and
//! flushes.

use super::auth::{self, AuthKey, Role, NONCE_LEN, PROOF_LEN};
use super::{sock, Link, QpShared, TcpFabric, TcpQp};
pub(super) use crate::soft::cm::MSG_LEN;
use crate::soft::cm::{conn_in, disconnected, u32_at, Layout};
use crate::{
    Address, Admit, Cm, CmEvent, CmRefusal, ConnId, FabricError, PrivateData, QpState, Result,
};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Length of every CM message.
/// The tcp CM message: magic "rctp", version, kind, private data length,
/// then the sender's QP number and queue depths (or, for the auth kinds, a
/// nonce and a proof), the private data at 40.
const LAYOUT: Layout = Layout {
    magic: Some(0x7074_6372),
    version: 1,
    version_at: 4,
    kind_at: 6,
    kinds: 8,
    plen_at: 7,
    pdata_at: 40,
    errors: [
        "a tcp CM message is 96 bytes",
        "not a tcp fabric CM message (bad magic)",
        "tcp CM version mismatch",
        "unknown tcp CM message",
    ],
};
/// How long a connect may take, from the SYN to the ACC or REJ.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `connect` itself waits for the TCP handshake before leaving it
/// to `poll_event`: not at all (a control thread never waits for the
/// network; a handshake already done is finished at once).
const CONNECT_WAIT_MS: i32 = 0;
/// How often `poll_event` looks for an accepted QP's RTU.
const RTU_POLL: Duration = Duration::from_millis(1);
/// How long a listener rests after running out of descriptors.
const FD_REST: Duration = Duration::from_millis(50);
/// Where the auth messages carry their nonce and proof.
const NONCE_AT: usize = 8;
const PROOF_AT: usize = NONCE_AT + NONCE_LEN;

/// Why an AUTH_FAIL (its byte 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthFail {
    /// The listener needs a key; the peer sent none.
    KeyRequired = 1,
    /// The proof did not match: another key.
    BadProof = 2,
    /// The peer offered a key; this listener has none.
    NoKey = 3,
    /// The listener does not admit the peer's address.
    NotAdmitted = 4,
    /// Too many of the peer's connections are in handshakes.
    Busy = 5,
}

impl AuthFail {
    fn from_byte(b: u8) -> &'static str {
        match b {
            1 => "the listener requires a pre-shared key (--auth-key) and we have none",
            2 => "the listener refused our proof: our pre-shared keys differ",
            3 => "the listener has no pre-shared key, so it cannot prove it holds ours",
            4 => "the listener does not admit our address (its --allow)",
            5 => "the listener has too many of our connections in handshakes",
            _ => "the listener refused our authentication",
        }
    }
}

/// What the CM of a fabric is set up with.
#[derive(Clone, Debug)]
pub(super) struct CmConfig {
    pub auth: Option<Arc<AuthKey>>,
    pub max_pending_per_host: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Req = 1,
    Acc = 2,
    Rej = 3,
    Rtu = 4,
    Hello = 5,
    Challenge = 6,
    Proof = 7,
    AuthFail = 8,
}

impl Kind {
    fn is_auth(self) -> bool {
        matches!(
            self,
            Kind::Hello | Kind::Challenge | Kind::Proof | Kind::AuthFail
        )
    }
}

/// A CM message: the kind, the sender's QP limits, and the private data.
#[derive(Clone, Copy, Debug)]
struct Msg {
    kind: Kind,
    qp_num: u32,
    max_send_wr: u32,
    max_recv_wr: u32,
    pdata: PrivateData,
    /// Auth messages: the sender's nonce (HELLO, CHALLENGE), and its proof
    /// (CHALLENGE, PROOF); AUTH_FAIL: its reason in `nonce[0]`.
    nonce: [u8; NONCE_LEN],
    proof: [u8; PROOF_LEN],
}

impl Msg {
    fn bare(kind: Kind) -> Msg {
        Msg {
            kind,
            qp_num: 0,
            max_send_wr: 0,
            max_recv_wr: 0,
            pdata: PrivateData::empty(),
            nonce: [0; NONCE_LEN],
            proof: [0; PROOF_LEN],
        }
    }
    fn auth(kind: Kind, nonce: [u8; NONCE_LEN], proof: [u8; PROOF_LEN]) -> Msg {
        Msg {
            nonce,
            proof,
            ..Msg::bare(kind)
        }
    }
    fn auth_fail(why: AuthFail) -> Msg {
        let mut nonce = [0; NONCE_LEN];
        nonce[0] = why as u8;
        Msg::auth(Kind::AuthFail, nonce, [0; PROOF_LEN])
    }
    fn with_qp(kind: Kind, qp: &QpShared, pdata: PrivateData) -> Msg {
        let cap = qp.cap();
        Msg {
            kind,
            qp_num: qp.qp_num(),
            max_send_wr: cap.max_send_wr,
            max_recv_wr: cap.max_recv_wr,
            pdata,
            ..Msg::bare(kind)
        }
    }
    fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = LAYOUT.header(self.kind as u8);
        if self.kind.is_auth() {
            b[NONCE_AT..NONCE_AT + NONCE_LEN].copy_from_slice(&self.nonce);
            b[PROOF_AT..PROOF_AT + PROOF_LEN].copy_from_slice(&self.proof);
            return b;
        }
        LAYOUT.put_pdata(&mut b, &self.pdata);
        b[8..12].copy_from_slice(&self.qp_num.to_le_bytes());
        b[12..16].copy_from_slice(&self.max_send_wr.to_le_bytes());
        b[16..20].copy_from_slice(&self.max_recv_wr.to_le_bytes());
        b
    }
    pub(super) fn decode(b: &[u8; MSG_LEN]) -> Result<Msg> {
        let kind = match LAYOUT.check(b)? {
            1 => Kind::Req,
            2 => Kind::Acc,
            3 => Kind::Rej,
            4 => Kind::Rtu,
            5 => Kind::Hello,
            6 => Kind::Challenge,
            7 => Kind::Proof,
            _ => Kind::AuthFail,
        };
        if kind.is_auth() {
            let mut m = Msg::bare(kind);
            m.nonce.copy_from_slice(&b[NONCE_AT..NONCE_AT + NONCE_LEN]);
            m.proof.copy_from_slice(&b[PROOF_AT..PROOF_AT + PROOF_LEN]);
            return Ok(m);
        }
        Ok(Msg {
            kind,
            qp_num: u32_at(b, 8),
            max_send_wr: u32_at(b, 12),
            max_recv_wr: u32_at(b, 16),
            pdata: LAYOUT.pdata(b)?,
            ..Msg::bare(kind)
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Active: TCP connect in progress; the REQ goes once it completes.
    TcpConnecting,
    /// Active, with a key: HELLO sent, waiting for the CHALLENGE.
    AwaitChallenge,
    /// Active: REQ sent, waiting for ACC or REJ.
    AwaitAcc,
    /// Passive, with a key: socket accepted, waiting for HELLO.
    AwaitHello,
    /// Passive, with a key: CHALLENGE sent, waiting for PROOF.
    AwaitProof,
    /// Passive: socket accepted (and authenticated), waiting for REQ.
    AwaitReq,
    /// Passive: REQ reported, waiting for the application's accept/reject.
    Requested,
    /// Passive: ACC sent and the QP has the stream; waiting for its core
    /// to take in the RTU.
    AwaitRtu,
    /// The QP owns the data stream; the CM watches for its end.
    Established,
}

struct Conn {
    stream: TcpStream,
    st: St,
    qp: Option<Arc<QpShared>>,
    listener: ConnId,
    peer: String,
    /// The peer's REQ (passive side).
    req: Option<Msg>,
    /// Our REQ, until the TCP connect completes (active side).
    out: Option<Msg>,
    rbuf: [u8; MSG_LEN],
    rlen: usize,
    deadline: Option<Instant>,
    /// Passive, accepted: the stream holds something other than an RTU at
    /// its start, so the QP's core has taken the RTU (or will refuse it).
    rtu_taken: bool,
    /// Passive: the peer's address (per-host handshake limit).
    ip: Option<IpAddr>,
    /// With a key: (the active side's nonce, the passive side's).
    nonces: ([u8; NONCE_LEN], [u8; NONCE_LEN]),
    /// The events its socket is registered for with the CM's epoll.
    armed: u32,
}

impl Conn {
    /// A passive connection not yet past its REQ (a handshake slot).
    fn in_handshake(&self) -> bool {
        matches!(self.st, St::AwaitHello | St::AwaitProof | St::AwaitReq)
    }
}

/// The tcp connection manager (runs on the slow-path thread).
pub struct TcpCm {
    next_id: u64,
    listeners: BTreeMap<ConnId, TcpListener>,
    conns: BTreeMap<ConnId, Conn>,
    events: VecDeque<CmEvent>,
    cfg: CmConfig,
    admit: Option<Admit>,
    /// A descriptor kept free, given up to shed one connection when the
    /// process runs out (EMFILE).
    spare: Option<std::fs::File>,
    /// Listeners resting after running out of descriptors, until when.
    resting: BTreeMap<ConnId, Instant>,
    /// Out of descriptors now (logged once per episode).
    starved: bool,
    /// Every listener and connection is registered here (level-triggered,
    /// its current interest): waiting costs the ready ones, not all of them
    /// (a thousand idle connections cost the control thread nothing).
    ep: OwnedFd,
    /// Listeners' registered interest (0: resting).
    listen_armed: BTreeMap<ConnId, u32>,
}

impl std::fmt::Debug for TcpCm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TcpCm({} listeners, {} connections)",
            self.listeners.len(),
            self.conns.len()
        )
    }
}

fn send_msg(stream: &TcpStream, m: &Msg) -> Result<()> {
    let b = m.encode();
    match sock::send(stream.as_raw_fd(), &b) {
        Ok(n) if n == b.len() => Ok(()),
        Ok(_) => Err(FabricError::Protocol("short send of a tcp CM message")),
        Err(e) => Err(FabricError::io("send a tcp CM message", e)),
    }
}

/// Tells a peer turned away at the door why (best effort, never waits:
/// its first message may not have come yet), then it is closed.
fn turn_away(stream: &TcpStream, why: AuthFail) {
    if stream.set_nonblocking(true).is_ok() {
        if let Err(e) = send_msg(stream, &Msg::auth_fail(why)) {
            tracing::debug!("tcp CM: telling a peer it is turned away: {e}");
        }
    }
}

/// Why no message came.
enum ReadErr {
    /// Not a valid message, or a stream cut in the middle of one.
    Malformed(String),
    /// The stream ended (between messages) or failed.
    Closed(String),
}

/// Reads what has arrived of the next message: Ok(Some) once whole, Ok(None)
/// while incomplete, Err on EOF or error. Never reads past the message.
fn read_msg(c: &mut Conn) -> std::result::Result<Option<Msg>, ReadErr> {
    loop {
        match sock::recv(c.stream.as_raw_fd(), &mut c.rbuf[c.rlen..]) {
            Ok(0) if c.rlen > 0 => {
                let why = format!("the stream ended {} bytes into a message", c.rlen);
                return Err(ReadErr::Malformed(why));
            }
            Ok(0) => return Err(ReadErr::Closed("peer closed the connection".into())),
            Ok(n) => {
                c.rlen += n;
                if c.rlen == MSG_LEN {
                    c.rlen = 0;
                    return Msg::decode(&c.rbuf)
                        .map(Some)
                        .map_err(|e| ReadErr::Malformed(e.to_string()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadErr::Closed(format!("recv: {e}"))),
        }
    }
}

impl TcpCm {
    /// A connection manager with no listeners or connections.
    pub(super) fn new(cfg: CmConfig) -> Result<TcpCm> {
        // SAFETY: plain syscall; the descriptor is checked and owned below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(FabricError::last_os("epoll_create1 for the tcp CM"));
        }
        // SAFETY: a fresh descriptor we own.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        Ok(TcpCm {
            ep,
            listen_armed: BTreeMap::new(),
            next_id: 1,
            listeners: BTreeMap::new(),
            conns: BTreeMap::new(),
            events: VecDeque::new(),
            cfg,
            admit: None,
            spare: None,
            resting: BTreeMap::new(),
            starved: false,
        })
    }

    /// Registers `fd` for `events` (0: not registered) where `armed` were.
    fn interest(&self, fd: RawFd, id: ConnId, armed: u32, events: u32) -> Result<()> {
        let op = match (armed, events) {
            (a, e) if a == e => return Ok(()),
            (0, _) => libc::EPOLL_CTL_ADD,
            (_, 0) => libc::EPOLL_CTL_DEL,
            _ => libc::EPOLL_CTL_MOD,
        };
        let mut ev = libc::epoll_event { events, u64: id.0 };
        // SAFETY: both descriptors are open; `ev` lives across the call.
        if unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(FabricError::last_os("epoll_ctl (tcp CM)"));
        }
        Ok(())
    }

    /// Closes a passive connection before its REQ and tells the
    /// application why.
    fn refuse(&mut self, id: ConnId, why: CmRefusal, detail: &str) {
        if let Some(c) = self.conns.get(&id) {
            let (listener, peer) = (c.listener, c.peer.clone());
            self.close(id, None, false);
            self.events.push_back(CmEvent::Refused {
                listener,
                peer,
                why,
                detail: detail.to_string(),
            });
        }
    }

    /// Sends an AUTH_FAIL (best effort: the connection closes next).
    fn auth_fail(&mut self, id: ConnId, why: AuthFail, detail: &str) {
        if let Some(c) = self.conns.get(&id) {
            if let Err(e) = send_msg(&c.stream, &Msg::auth_fail(why)) {
                tracing::debug!("tcp CM: AUTH_FAIL to {}: {e}", c.peer);
            }
        }
        self.refuse(id, CmRefusal::Auth, detail);
    }

    /// Out of descriptors: shed the connection at the head of `listener`'s
    /// backlog with the spare descriptor (its peer hears a close, not
    /// silence) and let the listener rest a moment (no spinning on a
    /// listener that stays readable).
    fn starving(&mut self, listener: ConnId, e: &io::Error) {
        if !self.starved {
            self.starved = true;
            tracing::warn!(
                "tcp CM: out of file descriptors ({e}): new connections are closed at once \
                 until some free up"
            );
        }
        self.spare = None;
        let shed = self.listeners.get(&listener).and_then(|l| l.accept().ok());
        if let Some((stream, peer)) = shed {
            drop(stream);
            self.events.push_back(CmEvent::Refused {
                listener,
                peer: format!("tcp:{peer}"),
                why: CmRefusal::Resources,
                detail: format!("no file descriptors left ({e})"),
            });
        }
        self.spare = std::fs::File::open("/dev/null").ok();
        self.resting.insert(listener, Instant::now() + FD_REST);
    }

    fn id(&mut self) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Drops a connection; `event` says what the application hears, `broken`
    /// whether its QP must flush now (a connection the QP never got, or one
    /// we cut; when the peer cut it the QP sees the end of stream itself,
    /// after whatever the peer said last).
    fn close(&mut self, id: ConnId, event: Option<CmEvent>, broken: bool) {
        if let Some(c) = self.conns.remove(&id) {
            // The QP keeps a descriptor of the same socket: the registration
            // would outlive this one's close.
            if let Err(e) = self.interest(c.stream.as_raw_fd(), id, c.armed, 0) {
                tracing::warn!("tcp CM: {e}");
            }
            if let Some(qp) = &c.qp {
                if broken {
                    qp.mark_broken();
                    let _ = c.stream.shutdown(Shutdown::Both);
                }
            }
        }
        if let Some(e) = event {
            self.events.push_back(e);
        }
    }

    fn accept_pending(&mut self, listener: ConnId) {
        loop {
            let Some(l) = self.listeners.get(&listener) else {
                return;
            };
            let (stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    return self.starving(listener, &e);
                }
                // The peer gave up before we took it (ECONNABORTED), or a
                // firewall said no: that one is gone, the next may be fine.
                Err(e) => {
                    tracing::debug!("tcp CM: accept: {e}");
                    continue;
                }
            };
            if self.starved {
                self.starved = false;
                tracing::info!("tcp CM: file descriptors are free again");
            }
            if self.spare.is_none() {
                self.spare = std::fs::File::open("/dev/null").ok();
            }
            let ip = peer.ip();
            let peer = format!("tcp:{peer}");
            let refused = |why, detail: String| CmEvent::Refused {
                listener,
                peer: peer.clone(),
                why,
                detail,
            };
            if self.admit.as_ref().is_some_and(|admit| !admit(ip)) {
                turn_away(&stream, AuthFail::NotAdmitted);
                self.events
                    .push_back(refused(CmRefusal::Access, "not in the allowlist".into()));
                continue;
            }
            let pending = self
                .conns
                .values()
                .filter(|c| c.ip == Some(ip) && c.in_handshake())
                .count();
            if pending >= self.cfg.max_pending_per_host {
                turn_away(&stream, AuthFail::Busy);
                self.events.push_back(refused(
                    CmRefusal::Handshakes,
                    format!("{pending} connections of this host are in handshakes already"),
                ));
                continue;
            }
            if let Err(e) = sock::tune(&stream) {
                tracing::debug!("tcp CM: {peer}: {e}");
                continue;
            }
            let id = self.id();
            let st = if self.cfg.auth.is_some() {
                St::AwaitHello
            } else {
                St::AwaitReq
            };
            self.conns.insert(
                id,
                Conn {
                    stream,
                    st,
                    qp: None,
                    listener,
                    peer,
                    req: None,
                    out: None,
                    rbuf: [0; MSG_LEN],
                    rlen: 0,
                    deadline: Some(Instant::now() + CONNECT_TIMEOUT),
                    rtu_taken: false,
                    ip: Some(ip),
                    nonces: ([0; NONCE_LEN], [0; NONCE_LEN]),
                    armed: 0,
                },
            );
        }
    }

    /// The active side's TCP connect finished (or failed).
    fn connected(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match c.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                let why = format!("connect to {}: {e}", c.peer);
                return self.gone(id, &why);
            }
        }
        let req = c
            .out
            .take()
            .expect("connecting connections carry their REQ");
        if self.cfg.auth.is_some() {
            // The REQ waits for the listener's proof.
            let nonce = match auth::nonce() {
                Ok(n) => n,
                Err(e) => return self.gone(id, &format!("no random nonce: {e}")),
            };
            c.nonces.0 = nonce;
            c.out = Some(req);
            if let Err(e) = send_msg(&c.stream, &Msg::auth(Kind::Hello, nonce, [0; PROOF_LEN])) {
                return self.gone(id, &e.to_string());
            }
            c.st = St::AwaitChallenge;
            return;
        }
        if let Err(e) = send_msg(&c.stream, &req) {
            return self.gone(id, &e.to_string());
        }
        c.st = St::AwaitAcc;
    }

    fn readable(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let (in_handshake, st) = (c.in_handshake(), c.st);
        match read_msg(c) {
            Ok(None) => {}
            Ok(Some(m)) => self.handle(id, m),
            // It sent something that is not a whole, valid message.
            Err(ReadErr::Malformed(why)) if in_handshake => {
                self.refuse(id, CmRefusal::Malformed, &why)
            }
            // It had our challenge and left without proving the key (a
            // client that found our proof wrong: another key).
            Err(ReadErr::Closed(_)) if st == St::AwaitProof => self.refuse(
                id,
                CmRefusal::Auth,
                "left without proving it holds the key (another key?)",
            ),
            Err(ReadErr::Malformed(why) | ReadErr::Closed(why)) => self.gone(id, &why),
        }
    }

    /// An accepted connection's stream is readable: the RTU has come if it
    /// sits at the start (peeked, left for the QP's core to consume) or the
    /// core has already taken it.
    fn rtu_ready(&mut self, id: ConnId, revents: libc::c_short) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let seen = c.qp.as_ref().is_some_and(|q| q.rtu_seen());
        let mut b = [0u8; MSG_LEN];
        let rtu = seen
            || match sock::peek(c.stream.as_raw_fd(), &mut b) {
                Ok(MSG_LEN) => {
                    c.rtu_taken = !is_rtu(&b);
                    !c.rtu_taken
                }
                Ok(0) => return self.gone(id, "peer closed the connection"),
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) => return self.gone(id, &format!("recv: {e}")),
            };
        if rtu {
            c.st = St::Established;
            c.deadline = None;
            self.events.push_back(CmEvent::Established {
                id,
                private_data: PrivateData::empty(),
            });
        } else if revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            self.gone(id, "peer closed the connection");
        }
    }

    /// The socket closed or failed.
    fn gone(&mut self, id: ConnId, why: &str) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let (ev, broken) = match c.st {
            St::Established => (Some(CmEvent::Disconnected { id }), false),
            St::AwaitRtu => (Some(CmEvent::Disconnected { id }), true),
            St::TcpConnecting | St::AwaitChallenge | St::AwaitAcc => (
                Some(CmEvent::Unreachable {
                    id,
                    reason: why.to_string(),
                }),
                false,
            ),
            St::AwaitHello | St::AwaitProof | St::AwaitReq | St::Requested => (None, false),
        };
        self.close(id, ev, broken);
    }

    /// Hands the connection to its QP.
    fn attach(c: &Conn, qp: &QpShared, peer_max_send_wr: u32, expect_rtu: bool) -> Result<()> {
        let stream = c
            .stream
            .try_clone()
            .map_err(|e| FabricError::io("dup the connection for the QP", e))?;
        qp.attach(Link::new(stream, peer_max_send_wr, expect_rtu));
        Ok(())
    }

    fn handle(&mut self, id: ConnId, m: Msg) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match (c.st, m.kind) {
            (St::AwaitHello, Kind::Hello) => {
                let Some(key) = self.cfg.auth.clone() else {
                    return self.gone(id, "no key");
                };
                let nonce_p = match auth::nonce() {
                    Ok(n) => n,
                    Err(e) => return self.gone(id, &format!("no random nonce: {e}")),
                };
                c.nonces = (m.nonce, nonce_p);
                let proof = key.prove(Role::Passive, &m.nonce, &nonce_p);
                if let Err(e) = send_msg(&c.stream, &Msg::auth(Kind::Challenge, nonce_p, proof)) {
                    return self.gone(id, &e.to_string());
                }
                c.st = St::AwaitProof;
            }
            (St::AwaitHello, _) => self.auth_fail(
                id,
                AuthFail::KeyRequired,
                "no pre-shared key: the listener requires one",
            ),
            (St::AwaitProof, Kind::Proof) => {
                let ok = self
                    .cfg
                    .auth
                    .as_ref()
                    .is_some_and(|k| k.check(Role::Active, &c.nonces.0, &c.nonces.1, &m.proof));
                if !ok {
                    return self.auth_fail(id, AuthFail::BadProof, "wrong pre-shared key");
                }
                c.st = St::AwaitReq;
            }
            (St::AwaitProof, _) => self.auth_fail(id, AuthFail::BadProof, "no proof of the key"),
            (St::AwaitReq, Kind::Hello) => self.auth_fail(
                id,
                AuthFail::NoKey,
                "the peer offers a pre-shared key; this listener has none",
            ),
            (St::AwaitChallenge, Kind::Challenge) => {
                let Some(key) = self.cfg.auth.clone() else {
                    return self.gone(id, "no key");
                };
                if !key.check(Role::Passive, &c.nonces.0, &m.nonce, &m.proof) {
                    return self.gone(
                        id,
                        "authentication failed: the listener does not hold our pre-shared key",
                    );
                }
                let proof = key.prove(Role::Active, &c.nonces.0, &m.nonce);
                let req = c
                    .out
                    .take()
                    .expect("a connection awaiting its challenge keeps its REQ");
                if let Err(e) = send_msg(&c.stream, &Msg::auth(Kind::Proof, [0; NONCE_LEN], proof))
                    .and_then(|()| send_msg(&c.stream, &req))
                {
                    return self.gone(id, &e.to_string());
                }
                c.st = St::AwaitAcc;
            }
            (St::AwaitChallenge | St::AwaitAcc, Kind::AuthFail) => {
                let why = format!("refused: {}", AuthFail::from_byte(m.nonce[0]));
                self.gone(id, &why)
            }
            (St::AwaitReq, Kind::Req) => {
                c.st = St::Requested;
                c.req = Some(m);
                c.deadline = None;
                let (listener, peer) = (c.listener, c.peer.clone());
                // With a key, a passive connection gets here only after the
                // peer proved it (it starts in AwaitHello).
                let key_id = self.cfg.auth.as_ref().map(|k| k.id().to_string());
                self.events.push_back(CmEvent::ConnectRequest {
                    id,
                    listener,
                    private_data: m.pdata,
                    peer,
                    key_id,
                });
            }
            (St::AwaitAcc, Kind::Acc) => {
                let qp = c.qp.clone().expect("active connections carry their QP");
                if qp.attached() {
                    // Two connects raced with one QP; the first one won.
                    return self.gone(id, "the QP was connected meanwhile");
                }
                // RTU first: the QP's frames must follow it on the stream.
                if let Err(e) = send_msg(&c.stream, &Msg::bare(Kind::Rtu)) {
                    return self.gone(id, &e.to_string());
                }
                if let Err(e) = Self::attach(c, &qp, m.max_send_wr, false) {
                    return self.gone(id, &e.to_string());
                }
                c.st = St::Established;
                c.deadline = None;
                self.events.push_back(CmEvent::Established {
                    id,
                    private_data: m.pdata,
                });
            }
            (St::AwaitAcc, Kind::Rej) => self.close(
                id,
                Some(CmEvent::Rejected {
                    id,
                    private_data: m.pdata,
                }),
                false,
            ),
            (st, kind) if c.in_handshake() => {
                let why = format!("unexpected {kind:?} in state {st:?}");
                self.refuse(id, CmRefusal::Malformed, &why)
            }
            (st, kind) => {
                tracing::warn!("tcp CM: unexpected {kind:?} in state {st:?}; closing");
                self.gone(id, "protocol error");
            }
        }
    }

    fn check_qp(qp: &TcpQp) -> Result<Arc<QpShared>> {
        let s = qp.shared();
        if s.attached() {
            return Err(FabricError::BadQpState {
                qp_num: s.qp_num(),
                state: QpState::Rts,
            });
        }
        Ok(s.clone())
    }
}

impl Drop for TcpCm {
    fn drop(&mut self) {
        for c in self.conns.values() {
            if let Some(qp) = &c.qp {
                if matches!(c.st, St::Established | St::AwaitRtu) {
                    qp.mark_broken();
                    let _ = c.stream.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

impl Cm<TcpFabric> for TcpCm {
    fn admit(&mut self, admit: Admit) {
        self.admit = Some(admit);
    }
    fn listen(&mut self, addr: &Address) -> Result<ConnId> {
        let sa = sock::resolve(addr)?;
        let l = TcpListener::bind(sa).map_err(|e| {
            let what = if e.kind() == io::ErrorKind::AddrInUse {
                "listen: this tcp address is already in use"
            } else {
                "bind the tcp listener"
            };
            FabricError::io(what, e)
        })?;
        l.set_nonblocking(true)
            .map_err(|e| FabricError::io("make the tcp listener non-blocking", e))?;
        let id = self.id();
        self.listeners.insert(id, l);
        Ok(id)
    }

    fn connect(&mut self, addr: &Address, qp: &TcpQp, private_data: &[u8]) -> Result<ConnId> {
        let pdata = PrivateData::new(private_data)?;
        let sa = sock::resolve(addr);
        let qp = Self::check_qp(qp)?;
        let id = self.id();
        let unreachable = |reason: String| CmEvent::Unreachable { id, reason };
        let sa = match sa {
            Ok(sa) => sa,
            Err(FabricError::WrongBackend(a, b)) => return Err(FabricError::WrongBackend(a, b)),
            Err(e) => {
                self.events.push_back(unreachable(e.to_string()));
                return Ok(id);
            }
        };
        let stream = match sock::connect_start(&sa).and_then(|s| sock::tune(&s).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                self.events
                    .push_back(unreachable(format!("connect to {addr}: {e}")));
                return Ok(id);
            }
        };
        let req = Msg::with_qp(Kind::Req, &qp, pdata);
        self.conns.insert(
            id,
            Conn {
                stream,
                st: St::TcpConnecting,
                qp: Some(qp),
                listener: ConnId(0),
                peer: addr.to_string(),
                req: None,
                out: Some(req),
                rbuf: [0; MSG_LEN],
                rlen: 0,
                deadline: Some(Instant::now() + CONNECT_TIMEOUT),
                rtu_taken: false,
                ip: None,
                nonces: ([0; NONCE_LEN], [0; NONCE_LEN]),
                armed: 0,
            },
        );
        // A connect that completes at once (the usual case on a LAN) sends
        // its REQ now, as rdma_connect does; otherwise poll_event finishes it.
        if let Some(c) = self.conns.get(&id) {
            let mut pfd = libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, CONNECT_WAIT_MS) } > 0 {
                self.connected(id);
            }
        }
        Ok(id)
    }

    fn accept(&mut self, id: ConnId, qp: &TcpQp, private_data: &[u8]) -> Result<()> {
        let pdata = PrivateData::new(private_data)?;
        let shared = Self::check_qp(qp)?;
        let c = conn_in(&mut self.conns, id, "connect request", |c| {
            c.st == St::Requested
        })?;
        if let Err(e) = send_msg(&c.stream, &Msg::with_qp(Kind::Acc, &shared, pdata)) {
            self.close(id, None, false);
            return Err(e);
        }
        // The QP takes the stream now (ready to send, as after rdma_accept);
        // its core checks that the stream starts with the peer's RTU.
        let peer_wr = c.req.map_or(1, |r| r.max_send_wr);
        if let Err(e) = Self::attach(c, &shared, peer_wr, true) {
            self.close(id, None, false);
            return Err(e);
        }
        c.qp = Some(shared);
        c.st = St::AwaitRtu;
        c.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        Ok(())
    }

    fn reject(&mut self, id: ConnId, private_data: &[u8]) -> Result<()> {
        let pdata = PrivateData::new(private_data)?;
        let c = conn_in(&mut self.conns, id, "connect request", |c| {
            c.st == St::Requested
        })?;
        let m = Msg {
            pdata,
            ..Msg::bare(Kind::Rej)
        };
        let r = send_msg(&c.stream, &m);
        self.close(id, None, false);
        r
    }

    fn disconnect(&mut self, id: ConnId) -> Result<()> {
        if let Some(l) = self.listeners.remove(&id) {
            let armed = self.listen_armed.remove(&id).unwrap_or(0);
            return self.interest(l.as_raw_fd(), id, armed, 0);
        }
        let c = conn_in(&mut self.conns, id, "connection", |_| true)?;
        let up = matches!(c.st, St::Established | St::AwaitRtu);
        let _ = c.stream.shutdown(Shutdown::Both);
        self.close(id, disconnected(id, up), up);
        Ok(())
    }

    fn poll_event(&mut self, timeout: Duration) -> Result<Option<CmEvent>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let now = Instant::now();
        // Passive connections whose QP has taken in the RTU are up.
        let mut any_rtu = false;
        for (id, c) in self.conns.iter_mut() {
            if c.st == St::AwaitRtu {
                if c.qp.as_ref().is_some_and(|q| q.rtu_seen()) {
                    c.st = St::Established;
                    c.deadline = None;
                    self.events.push_back(CmEvent::Established {
                        id: *id,
                        private_data: PrivateData::empty(),
                    });
                } else if c.rtu_taken {
                    any_rtu = true;
                }
            }
        }
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if self.conns.get(&id).is_some_and(Conn::in_handshake) {
                self.refuse(
                    id,
                    CmRefusal::TimedOut,
                    "the handshake did not finish in time",
                );
            } else {
                self.gone(id, "timed out");
            }
        }
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        // The RTU shows in a flag the QP's core sets, not on a descriptor.
        let mut wait = if any_rtu {
            timeout.min(RTU_POLL)
        } else {
            timeout
        };
        self.resting.retain(|_, until| *until > now);
        // Bring each registration in line with what its state waits for
        // (no syscall where nothing changed).
        let mut changes = Vec::new();
        for (id, l) in &self.listeners {
            let want = match self.resting.get(id) {
                Some(until) => {
                    wait = wait.min(until.saturating_duration_since(now));
                    0
                }
                None => libc::EPOLLIN as u32,
            };
            let armed = self.listen_armed.get(id).copied().unwrap_or(0);
            if want != armed {
                changes.push((l.as_raw_fd(), *id, armed, want, true));
            }
        }
        for (id, c) in &self.conns {
            if let Some(d) = c.deadline {
                wait = wait.min(d.saturating_duration_since(now));
            }
            let want = (match c.st {
                St::TcpConnecting => libc::EPOLLOUT,
                St::AwaitRtu if !c.rtu_taken => libc::EPOLLIN | libc::EPOLLRDHUP,
                St::Established | St::AwaitRtu => libc::EPOLLRDHUP,
                _ => libc::EPOLLIN,
            }) as u32;
            if want != c.armed {
                changes.push((c.stream.as_raw_fd(), *id, c.armed, want, false));
            }
        }
        for (fd, id, armed, want, listener) in changes {
            self.interest(fd, id, armed, want)?;
            if listener {
                self.listen_armed.insert(id, want);
            } else if let Some(c) = self.conns.get_mut(&id) {
                c.armed = want;
            }
        }
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: evs is a valid buffer of 64 entries for the call.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), 64, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(FabricError::io("wait for the tcp CM sockets", e));
            }
        }
        for ev in &evs[..n.max(0) as usize] {
            let (id, revents) = (ConnId(ev.u64), ev.events as libc::c_short);
            if self.listeners.contains_key(&id) {
                self.accept_pending(id);
                continue;
            }
            // Its state now: an earlier event of this batch may have moved
            // or closed it.
            match self.conns.get(&id).map(|c| c.st) {
                None => {}
                Some(St::TcpConnecting) => self.connected(id),
                Some(St::AwaitRtu) => self.rtu_ready(id, revents),
                Some(St::Established) => self.gone(id, "peer closed the connection"),
                Some(_) => self.readable(id),
            }
        }
        Ok(self.events.pop_front())
    }
}

/// Whether `b` is an RTU (the first bytes of a passive QP's stream).
pub(super) fn is_rtu(b: &[u8; MSG_LEN]) -> bool {
    Msg::decode(b).is_ok_and(|m| m.kind == Kind::Rtu)
}

/// The RTU as it goes on the wire.
pub(super) fn rtu_bytes() -> [u8; MSG_LEN] {
    Msg::bare(Kind::Rtu).encode()
}

/// Decodes a CM message and encodes what it decoded (fuzzing: a decoder
/// that accepts must re-encode to a message it decodes the same).
pub(super) fn decode_encode(b: &[u8]) -> Result<[u8; MSG_LEN]> {
    let b: &[u8; MSG_LEN] = b
        .try_into()
        .map_err(|_| FabricError::Protocol(LAYOUT.errors[0]))?;
    Ok(Msg::decode(b)?.encode())
}
