//! The shm connection manager: rdma_cm's dance over an abstract unix
//! SOCK_SEQPACKET socket named `rtrs-poll/shm/NAME`.
//!
//! ```text
//!  active                      passive
//!  REQ  pid ring regions pdata ─>          ConnectRequest event
//!       <─ ACC pid ring regions pdata      (accept: passive QP is RTS)
//!  RTU ─>                                  Established event
//!  (Established event)
//!  DISC or socket closed  <──────────────> Disconnected event, QP flushed
//! ```
//! The socket stays open for the life of the connection: when a peer process
//! dies the kernel closes it, which is how we learn of it.
//!
//! An abstract socket has no file permissions, so the CM checks the peer's
//! credentials (SO_PEERCRED) both ways: a listener serves only processes
//! of its own user (or root), and a client talks only to a listener of its
//! own user (or root), which is who maps its memory. The memfds themselves
//! are the owner's alone (mode 600).

use super::{Link, QpShared, ShmFabric, ShmQp};
use crate::soft::cm::{conn_in, disconnected, u32_at, u64_at, Layout, MSG_LEN};
use crate::{Address, Cm, CmEvent, CmRefusal, ConnId, FabricError, PrivateData, Result};
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

/// The shm CM message: kind, private data length, version, then the
/// sender's pid, ring and region table (fd, length), then the private data.
/// The version covers what the two sides share beside the message: version 2
/// has region-table entries of (seq, fd, len) and tagged region ids (shm/mod.rs).
const LAYOUT: Layout = Layout {
    magic: None,
    version: 2,
    version_at: 2,
    kind_at: 0,
    kinds: 5,
    plen_at: 1,
    pdata_at: 32,
    errors: [
        "shm CM message of the wrong size",
        "",
        "shm CM version mismatch",
        "unknown shm CM message",
    ],
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Req = 1,
    Acc = 2,
    Rej = 3,
    Rtu = 4,
    Disc = 5,
}

#[derive(Clone, Copy, Debug)]
struct Msg {
    kind: Kind,
    pid: u32,
    ring: (i32, u64),
    regions: (i32, u64),
    pdata: PrivateData,
}

impl Msg {
    fn bare(kind: Kind) -> Msg {
        Msg {
            kind,
            pid: std::process::id(),
            ring: (-1, 0),
            regions: (-1, 0),
            pdata: PrivateData::empty(),
        }
    }
    fn with_qp(kind: Kind, qp: &QpShared, pdata: PrivateData) -> Msg {
        let (rfd, rlen, gfd, glen) = qp.endpoint();
        Msg {
            ring: (rfd, rlen),
            regions: (gfd, glen),
            pdata,
            ..Msg::bare(kind)
        }
    }
    fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = LAYOUT.header(self.kind as u8);
        LAYOUT.put_pdata(&mut b, &self.pdata);
        b[4..8].copy_from_slice(&self.pid.to_le_bytes());
        b[8..12].copy_from_slice(&self.ring.0.to_le_bytes());
        b[12..16].copy_from_slice(&self.regions.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.ring.1.to_le_bytes());
        b[24..32].copy_from_slice(&self.regions.1.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Result<Msg> {
        let kind = match LAYOUT.check(b)? {
            1 => Kind::Req,
            2 => Kind::Acc,
            3 => Kind::Rej,
            4 => Kind::Rtu,
            _ => Kind::Disc,
        };
        Ok(Msg {
            kind,
            pid: u32_at(b, 4),
            ring: (u32_at(b, 8) as i32, u64_at(b, 16)),
            regions: (u32_at(b, 12) as i32, u64_at(b, 24)),
            pdata: LAYOUT.pdata(b)?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Active: REQ sent, waiting for ACC or REJ.
    Connecting,
    /// Passive: socket accepted, waiting for REQ.
    AwaitReq,
    /// Passive: REQ reported, waiting for the application's accept/reject.
    Requested,
    /// Passive: ACC sent, waiting for RTU.
    AwaitRtu,
    Established,
}

struct Conn {
    fd: OwnedFd,
    st: St,
    qp: Option<Arc<QpShared>>,
    listener: ConnId,
    /// The peer as the kernel vouches for it (SO_PEERCRED), and its endpoint.
    peer_pid: u32,
    peer: Option<Msg>,
}

/// The shm connection manager (runs on the slow-path thread).
pub struct ShmCm {
    next_id: u64,
    listeners: BTreeMap<ConnId, (OwnedFd, String)>,
    conns: BTreeMap<ConnId, Conn>,
    events: VecDeque<CmEvent>,
}

impl std::fmt::Debug for ShmCm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ShmCm({} listeners, {} connections)",
            self.listeners.len(),
            self.conns.len()
        )
    }
}

fn sockaddr(name: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let full = format!("rtrs-poll/shm/{name}");
    // Abstract namespace: a leading NUL, then the name (Address caps it at 100).
    for (dst, src) in sa.sun_path[1..].iter_mut().zip(full.bytes()) {
        *dst = src as libc::c_char;
    }
    let n = full.len().min(sa.sun_path.len() - 1);
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + n;
    (sa, len as libc::socklen_t)
}

fn seqpacket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(FabricError::last_os("socket(AF_UNIX)"));
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_msg(fd: RawFd, m: &Msg) -> Result<()> {
    let b = m.encode();
    // SAFETY: b is a valid buffer of MSG_LEN bytes.
    let n = unsafe {
        libc::send(
            fd,
            b.as_ptr() as *const libc::c_void,
            b.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n != b.len() as isize {
        return Err(FabricError::last_os("send on the shm CM socket"));
    }
    Ok(())
}

/// Ok(Some(msg)), Ok(None) when nothing is waiting, Err on EOF or error.
fn recv_msg(fd: RawFd) -> std::result::Result<Option<Msg>, String> {
    let mut b = [0u8; MSG_LEN + 1];
    // SAFETY: b is writable for its whole length.
    let n = unsafe { libc::recv(fd, b.as_mut_ptr() as *mut libc::c_void, b.len(), 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(format!("recv: {e}")),
        };
    }
    if n == 0 {
        return Err("peer closed the connection".into());
    }
    Msg::decode(&b[..n as usize])
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The peer's pid and uid as the kernel vouches for them.
fn peer_cred(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len describe a writable ucred.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some((cred.pid as u32, cred.uid))
}

/// Whether a peer of `uid` may share memory with us: our own user, or root
/// (who can open any process's memory anyway).
fn same_owner(uid: u32) -> bool {
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    uid == me || uid == 0
}

impl Default for ShmCm {
    fn default() -> Self {
        ShmCm::new()
    }
}

impl ShmCm {
    /// A connection manager with no listeners or connections.
    pub fn new() -> ShmCm {
        ShmCm {
            next_id: 1,
            listeners: BTreeMap::new(),
            conns: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    fn id(&mut self) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        id
    }

    fn name(addr: &Address) -> Result<&str> {
        match addr {
            Address::Shm(n) => Ok(n),
            other => Err(FabricError::WrongBackend(other.to_string(), "shm")),
        }
    }

    /// Drops a connection; `event` says what the application hears.
    fn close(&mut self, id: ConnId, event: Option<CmEvent>) {
        if let Some(c) = self.conns.remove(&id) {
            if let Some(qp) = &c.qp {
                qp.mark_broken();
            }
        }
        if let Some(e) = event {
            self.events.push_back(e);
        }
    }

    fn accept_pending(&mut self, listener: ConnId) {
        let Some((lfd, _)) = self.listeners.get(&listener) else {
            return;
        };
        let lfd = lfd.as_raw_fd();
        loop {
            // SAFETY: accept4 on our listening socket; we do not want the address.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return;
            }
            // SAFETY: fd is fresh and ours.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let Some((pid, uid)) = peer_cred(fd.as_raw_fd()) else {
                continue;
            };
            if !same_owner(uid) {
                drop(fd);
                self.events.push_back(CmEvent::Refused {
                    listener,
                    peer: format!("shm:pid {pid}"),
                    why: CmRefusal::Access,
                    detail: format!("uid {uid} is not this listener's user"),
                });
                continue;
            }
            let id = self.id();
            self.conns.insert(
                id,
                Conn {
                    fd,
                    st: St::AwaitReq,
                    qp: None,
                    listener,
                    peer_pid: pid,
                    peer: None,
                },
            );
        }
    }

    fn readable(&mut self, id: ConnId) {
        loop {
            let Some(c) = self.conns.get(&id) else {
                return;
            };
            match recv_msg(c.fd.as_raw_fd()) {
                Ok(None) => return,
                Ok(Some(m)) => self.handle(id, m),
                Err(why) => {
                    self.gone(id, &why);
                    return;
                }
            }
        }
    }

    /// The socket closed or failed.
    fn gone(&mut self, id: ConnId, why: &str) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let ev = match c.st {
            St::Established | St::AwaitRtu => Some(CmEvent::Disconnected { id }),
            St::Connecting => Some(CmEvent::Unreachable {
                id,
                reason: why.to_string(),
            }),
            St::AwaitReq | St::Requested => None,
        };
        self.close(id, ev);
    }

    fn handle(&mut self, id: ConnId, m: Msg) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match (c.st, m.kind) {
            (St::AwaitReq, Kind::Req) => {
                c.st = St::Requested;
                let (pid, listener) = (c.peer_pid, c.listener);
                c.peer = Some(m);
                let name = self
                    .listeners
                    .get(&listener)
                    .map(|l| l.1.clone())
                    .unwrap_or_default();
                self.events.push_back(CmEvent::ConnectRequest {
                    id,
                    listener,
                    private_data: m.pdata,
                    peer: format!("shm:{name}@pid{pid}"),
                    key_id: None,
                });
            }
            (St::Connecting, Kind::Acc) => {
                let qp = c.qp.clone().expect("active connections carry their QP");
                match Link::open(c.peer_pid, m.ring, m.regions) {
                    Ok(link) => {
                        qp.attach(link);
                        if send_msg(c.fd.as_raw_fd(), &Msg::bare(Kind::Rtu)).is_err() {
                            self.gone(id, "peer closed before RTU");
                            return;
                        }
                        c.st = St::Established;
                        self.events.push_back(CmEvent::Established {
                            id,
                            private_data: m.pdata,
                        });
                    }
                    Err(e) => {
                        let reason = format!("cannot map the peer's queue: {e}");
                        let _ = send_msg(c.fd.as_raw_fd(), &Msg::bare(Kind::Disc));
                        self.close(id, Some(CmEvent::Unreachable { id, reason }));
                    }
                }
            }
            (St::Connecting, Kind::Rej) => self.close(
                id,
                Some(CmEvent::Rejected {
                    id,
                    private_data: m.pdata,
                }),
            ),
            (St::AwaitRtu, Kind::Rtu) => {
                c.st = St::Established;
                self.events.push_back(CmEvent::Established {
                    id,
                    private_data: PrivateData::empty(),
                });
            }
            (_, Kind::Disc) => self.gone(id, "peer disconnected"),
            (st, kind) => {
                tracing::warn!("shm CM: unexpected {kind:?} in state {st:?}; closing");
                self.gone(id, "protocol error");
            }
        }
    }
}

impl Drop for ShmCm {
    fn drop(&mut self) {
        for c in self.conns.values() {
            if let Some(qp) = &c.qp {
                qp.mark_broken();
            }
        }
    }
}

impl Cm<ShmFabric> for ShmCm {
    fn listen(&mut self, addr: &Address) -> Result<ConnId> {
        let name = Self::name(addr)?.to_string();
        let fd = seqpacket()?;
        let (sa, len) = sockaddr(&name);
        // SAFETY: sa/len describe a valid sockaddr_un.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(FabricError::io(
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    "listen: this shm name is already in use"
                } else {
                    "bind the shm listener"
                },
                e,
            ));
        }
        // SAFETY: listen(2) on our bound socket; 64 is the kernel RTRS backlog.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
            return Err(FabricError::last_os("listen"));
        }
        let id = self.id();
        self.listeners.insert(id, (fd, name));
        Ok(id)
    }

    fn connect(&mut self, addr: &Address, qp: &ShmQp, private_data: &[u8]) -> Result<ConnId> {
        let pdata = PrivateData::new(private_data)?;
        let name = Self::name(addr)?;
        let fd = seqpacket()?;
        let (sa, len) = sockaddr(name);
        let id = self.id();
        // SAFETY: sa/len describe a valid sockaddr_un.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            self.events.push_back(CmEvent::Unreachable {
                id,
                reason: format!("connect to {addr}: {e}"),
            });
            return Ok(id);
        }
        let qp = qp.shared().clone();
        let Some((peer_pid, uid)) = peer_cred(fd.as_raw_fd()) else {
            self.events.push_back(CmEvent::Unreachable {
                id,
                reason: "cannot learn the shm listener's credentials".into(),
            });
            return Ok(id);
        };
        if !same_owner(uid) {
            // It would map our memory: only our own user's, or root's.
            self.events.push_back(CmEvent::Unreachable {
                id,
                reason: format!("the shm listener {addr} belongs to uid {uid}, not to us"),
            });
            return Ok(id);
        }
        if let Err(e) = send_msg(fd.as_raw_fd(), &Msg::with_qp(Kind::Req, &qp, pdata)) {
            self.events.push_back(CmEvent::Unreachable {
                id,
                reason: e.to_string(),
            });
            return Ok(id);
        }
        self.conns.insert(
            id,
            Conn {
                fd,
                st: St::Connecting,
                qp: Some(qp),
                listener: ConnId(0),
                peer_pid,
                peer: None,
            },
        );
        Ok(id)
    }

    fn accept(&mut self, id: ConnId, qp: &ShmQp, private_data: &[u8]) -> Result<()> {
        let pdata = PrivateData::new(private_data)?;
        let c = conn_in(&mut self.conns, id, "connect request", |c| {
            c.st == St::Requested
        })?;
        let peer = c.peer.expect("requested connections have the REQ");
        let link = match Link::open(c.peer_pid, peer.ring, peer.regions) {
            Ok(l) => l,
            Err(e) => {
                let _ = send_msg(c.fd.as_raw_fd(), &Msg::bare(Kind::Rej));
                self.close(id, None);
                return Err(e);
            }
        };
        let shared = qp.shared().clone();
        shared.attach(link);
        if let Err(e) = send_msg(c.fd.as_raw_fd(), &Msg::with_qp(Kind::Acc, &shared, pdata)) {
            c.qp = Some(shared);
            self.close(id, None);
            return Err(e);
        }
        c.qp = Some(shared);
        c.st = St::AwaitRtu;
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
        let r = send_msg(c.fd.as_raw_fd(), &m);
        self.close(id, None);
        r
    }

    fn disconnect(&mut self, id: ConnId) -> Result<()> {
        if self.listeners.remove(&id).is_some() {
            return Ok(());
        }
        let c = conn_in(&mut self.conns, id, "connection", |_| true)?;
        let _ = send_msg(c.fd.as_raw_fd(), &Msg::bare(Kind::Disc));
        let up = matches!(c.st, St::Established | St::AwaitRtu);
        self.close(id, disconnected(id, up));
        Ok(())
    }

    fn poll_event(&mut self, timeout: Duration) -> Result<Option<CmEvent>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let mut ids = Vec::with_capacity(self.listeners.len() + self.conns.len());
        let mut fds = Vec::with_capacity(ids.capacity());
        for (id, (fd, _)) in &self.listeners {
            ids.push((*id, true));
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for (id, c) in &self.conns {
            ids.push((*id, false));
            fds.push(libc::pollfd {
                fd: c.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        if fds.is_empty() {
            std::thread::sleep(timeout);
            return Ok(self.events.pop_front());
        }
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(FabricError::io("poll the shm CM sockets", e));
            }
        }
        for (pfd, (id, listener)) in fds.iter().zip(ids) {
            if pfd.revents == 0 {
                continue;
            }
            if listener {
                self.accept_pending(id);
            } else {
                self.readable(id);
            }
        }
        Ok(self.events.pop_front())
    }
}
