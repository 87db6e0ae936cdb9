//! The connection manager over librdmacm, with user-managed QPs: the QP is
//! never attached to the `cm_id`; its number travels in `rdma_conn_param`
//! and we drive its state transitions with `rdma_init_qp_attr`.

use super::{decode_pdata, encode_pdata, QpInner, RdmaFabric, RdmaQp};
use crate::{Address, Cm, CmEvent, ConnId, FabricError, PrivateData, Result};
use rdma_sys as ib;
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Address and route resolution timeout.
const RESOLVE_MS: i32 = 2000;
/// RDMA READs in flight per direction (responder resources / initiator depth).
const RD_ATOMIC: u8 = 16;
/// RNR NAK timer: 12 is 0.64 ms, the unit `QpCap::rnr_retry` counts in.
const MIN_RNR_TIMER: u8 = 12;
/// IB CM reject reason "consumer defined": the peer's application said no.
const REJ_CONSUMER_DEFINED: i32 = 28;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Listener,
    Active,
    Passive,
}

struct Conn {
    id: *mut ib::rdma_cm_id,
    kind: Kind,
    qp: Option<Arc<QpInner>>,
    pdata: [u8; crate::MAX_PRIVATE_DATA],
    established: bool,
    /// `Disconnected` was already reported (by a local disconnect).
    reported: bool,
}

/// The rdma_cm connection manager (one event channel).
pub struct RdmaCm {
    ch: *mut ib::rdma_event_channel,
    conns: HashMap<u64, Conn>,
    by_id: HashMap<usize, u64>,
    next: u64,
    pending: VecDeque<CmEvent>,
}

// SAFETY: the channel and cm_ids are used only through &mut self, from one
// thread at a time; librdmacm allows using them from any thread.
unsafe impl Send for RdmaCm {}

impl std::fmt::Debug for RdmaCm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaCm")
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

fn os_err(what: &'static str) -> FabricError {
    FabricError::last_os(what)
}

fn to_sockaddr(sa: &SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match sa {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut st as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut st as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
        }
    }
    st
}

/// The device that carries `addr`: a local address itself (`local`), or
/// the source address the routing table picks to reach a peer. It binds a
/// throwaway `cm_id` to that address (no network involved) and takes the
/// device librdmacm attaches to it.
pub(super) fn device_of(addr: &Address, local: bool) -> Result<*mut ib::ibv_context> {
    let sa = resolve(addr)?;
    let src = if local {
        sa.ip()
    } else {
        let any: SocketAddr = match sa {
            SocketAddr::V4(_) => "0.0.0.0:0"
                .parse()
                .map_err(|_| FabricError::Protocol("addr"))?,
            SocketAddr::V6(_) => "[::]:0"
                .parse()
                .map_err(|_| FabricError::Protocol("addr"))?,
        };
        let u = std::net::UdpSocket::bind(any)
            .and_then(|u| u.connect(sa).map(|()| u))
            .and_then(|u| u.local_addr())
            .map_err(|e| FabricError::io("find the route's source address", e))?;
        u.ip()
    };
    if src.is_unspecified() {
        // A wildcard: no one device; the first one.
        return super::dev().map(|d| d.ctx);
    }
    let mut id = std::ptr::null_mut();
    // SAFETY: a synchronous id (no channel); id is an out-parameter.
    let rc = unsafe {
        ib::rdma_create_id(
            std::ptr::null_mut(),
            &mut id,
            std::ptr::null_mut(),
            ib::rdma_port_space::RDMA_PS_TCP,
        )
    };
    if rc != 0 {
        return Err(os_err("rdma_create_id"));
    }
    let mut st = to_sockaddr(&SocketAddr::new(src, 0));
    // SAFETY: id is live; st is a valid local address.
    let rc = unsafe { ib::rdma_bind_addr(id, &mut st as *mut _ as *mut libc::sockaddr) };
    let ctx = if rc == 0 {
        // SAFETY: a bound id's `verbs` is its device (or NULL).
        unsafe { (*id).verbs }
    } else {
        std::ptr::null_mut()
    };
    let err = (rc != 0).then(|| os_err("rdma_bind_addr"));
    // SAFETY: id is ours, with no events.
    unsafe { ib::rdma_destroy_id(id) };
    if let Some(e) = err {
        return Err(e);
    }
    if ctx.is_null() {
        return Err(FabricError::BadAddress {
            addr: addr.to_string(),
            why: "no RDMA device carries this address",
        });
    }
    Ok(ctx)
}

fn resolve(addr: &Address) -> Result<SocketAddr> {
    let Address::Rdma { host, port } = addr else {
        return Err(FabricError::WrongBackend(addr.to_string(), "rdma"));
    };
    (host.as_str(), *port)
        .to_socket_addrs()
        .map_err(|e| FabricError::io("resolve the host name", e))?
        .next()
        .ok_or_else(|| FabricError::BadAddress {
            addr: addr.to_string(),
            why: "the host name has no address",
        })
}

/// The peer's address of a cm_id, for logs.
fn peer_of(id: *mut ib::rdma_cm_id) -> String {
    // SAFETY: id is a live cm_id; the route's addresses are plain data.
    let sa = unsafe { &(*id).route.addr.dst_addr_union.dst_storage };
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin = unsafe { &*(sa as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            format!("rdma:{ip}:{}", u16::from_be(sin.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            format!("rdma:[{ip}]:{}", u16::from_be(sin6.sin6_port))
        }
        _ => "rdma:?".to_string(),
    }
}

fn conn_param(qp_num: u32, pdata: &[u8], rnr_retry: u8) -> ib::rdma_conn_param {
    ib::rdma_conn_param {
        private_data: pdata.as_ptr().cast(),
        private_data_len: pdata.len() as u8,
        responder_resources: RD_ATOMIC,
        initiator_depth: RD_ATOMIC,
        flow_control: 1,
        retry_count: 7,
        rnr_retry_count: rnr_retry.min(7),
        srq: 0,
        qp_num,
    }
}

/// Moves `qp` to `state` with the attributes the CM gives for `id`.
fn transition(id: *mut ib::rdma_cm_id, qp: &QpInner, state: u32) -> Result<()> {
    use ib::ibv_qp_attr_mask as m;
    // SAFETY: an all-zero ibv_qp_attr is valid.
    let mut attr: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
    attr.qp_state = state;
    let mut mask = 0i32;
    // SAFETY: id is live; attr and mask are writable.
    if unsafe { ib::rdma_init_qp_attr(id, &mut attr, &mut mask) } != 0 {
        return Err(os_err("rdma_init_qp_attr"));
    }
    match state {
        ib::ibv_qp_state::IBV_QPS_INIT => {
            attr.qp_access_flags = (ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | ib::ibv_access_flags::IBV_ACCESS_REMOTE_READ)
                .0;
            mask |= m::IBV_QP_ACCESS_FLAGS.0 as i32;
        }
        ib::ibv_qp_state::IBV_QPS_RTR => {
            attr.min_rnr_timer = MIN_RNR_TIMER;
            mask |= m::IBV_QP_MIN_RNR_TIMER.0 as i32;
        }
        ib::ibv_qp_state::IBV_QPS_RTS => {
            attr.retry_cnt = 7;
            attr.rnr_retry = qp.cap().rnr_retry.min(7);
            mask |= (m::IBV_QP_RETRY_CNT | m::IBV_QP_RNR_RETRY).0 as i32;
        }
        _ => {}
    }
    qp.modify(&mut attr, mask)
}

impl RdmaCm {
    pub(super) fn new() -> Result<RdmaCm> {
        // SAFETY: plain constructor.
        let ch = unsafe { ib::rdma_create_event_channel() };
        if ch.is_null() {
            return Err(os_err("rdma_create_event_channel"));
        }
        // SAFETY: ch is a live channel; its fd is ours to make non-blocking.
        let fd = unsafe { (*ch).fd };
        // SAFETY: fcntl on a valid fd.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(RdmaCm {
            ch,
            conns: HashMap::new(),
            by_id: HashMap::new(),
            next: 1,
            pending: VecDeque::new(),
        })
    }

    fn create_id(&mut self) -> Result<*mut ib::rdma_cm_id> {
        let mut id = std::ptr::null_mut();
        // SAFETY: the channel is live; id is an out-parameter.
        let rc = unsafe {
            ib::rdma_create_id(
                self.ch,
                &mut id,
                std::ptr::null_mut(),
                ib::rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(os_err("rdma_create_id"));
        }
        Ok(id)
    }

    fn add(&mut self, id: *mut ib::rdma_cm_id, kind: Kind, qp: Option<Arc<QpInner>>) -> ConnId {
        let n = self.next;
        self.next += 1;
        self.conns.insert(
            n,
            Conn {
                id,
                kind,
                qp,
                pdata: [0; crate::MAX_PRIVATE_DATA],
                established: false,
                reported: false,
            },
        );
        self.by_id.insert(id as usize, n);
        ConnId(n)
    }

    /// Destroys a connection's cm_id (its events must all be acked).
    fn remove(&mut self, n: u64) {
        if let Some(c) = self.conns.remove(&n) {
            self.by_id.remove(&(c.id as usize));
            let t0 = Instant::now();
            // SAFETY: the id is live and has no unacked event.
            unsafe { ib::rdma_destroy_id(c.id) };
            if debug() {
                eprintln!(
                    "rdma cm {:p}: destroyed id {:p} ({:?}) in {:?}",
                    self.ch,
                    c.id,
                    c.kind,
                    t0.elapsed()
                );
            }
        }
    }

    /// A connect that failed: its QP goes back to INIT-able (left as is if
    /// it never left INIT), the id is destroyed.
    fn fail(&mut self, n: u64, ev: CmEvent) -> Option<CmEvent> {
        if let Some(c) = self.conns.get(&n) {
            if c.established {
                if let Some(qp) = &c.qp {
                    qp.to_error();
                }
            }
        }
        self.remove(n);
        Some(ev)
    }

    /// Handles one raw event (already copied out and acked).
    fn handle(&mut self, raw: Raw) -> Option<CmEvent> {
        use ib::rdma_cm_event_type as t;
        if raw.event == t::RDMA_CM_EVENT_CONNECT_REQUEST {
            let listener = *self.by_id.get(&(raw.listen_id as usize))?;
            let peer = peer_of(raw.id);
            let id = self.add(raw.id, Kind::Passive, None);
            return Some(CmEvent::ConnectRequest {
                id,
                listener: ConnId(listener),
                private_data: raw.pdata,
                peer,
                key_id: None,
            });
        }
        let n = *self.by_id.get(&(raw.id as usize))?;
        let c = self.conns.get_mut(&n)?;
        let id = ConnId(n);
        let unreachable = |why: String| CmEvent::Unreachable { id, reason: why };
        match raw.event {
            t::RDMA_CM_EVENT_ADDR_RESOLVED => {
                // SAFETY: the id is live.
                if unsafe { ib::rdma_resolve_route(c.id, RESOLVE_MS) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return self.fail(n, unreachable(format!("rdma_resolve_route: {e}")));
                }
                None
            }
            t::RDMA_CM_EVENT_ROUTE_RESOLVED => {
                let qp = c.qp.clone()?;
                let r = transition(c.id, &qp, ib::ibv_qp_state::IBV_QPS_INIT).and_then(|()| {
                    let mut p = conn_param(qp.qp_num(), &c.pdata, qp.cap().rnr_retry);
                    // SAFETY: the id is live; p and its private data outlive the call.
                    if unsafe { ib::rdma_connect(c.id, &mut p) } != 0 {
                        return Err(os_err("rdma_connect"));
                    }
                    Ok(())
                });
                match r {
                    Ok(()) => None,
                    Err(e) => self.fail(n, unreachable(e.to_string())),
                }
            }
            t::RDMA_CM_EVENT_CONNECT_RESPONSE => {
                let qp = c.qp.clone()?;
                let r = transition(c.id, &qp, ib::ibv_qp_state::IBV_QPS_RTR)
                    .and_then(|()| transition(c.id, &qp, ib::ibv_qp_state::IBV_QPS_RTS))
                    .and_then(|()| {
                        // SAFETY: the id is live.
                        if unsafe { ib::rdma_establish(c.id) } != 0 {
                            return Err(os_err("rdma_establish"));
                        }
                        Ok(())
                    });
                match r {
                    Ok(()) => {
                        c.established = true;
                        qp.set_connected();
                        Some(CmEvent::Established {
                            id,
                            private_data: raw.pdata,
                        })
                    }
                    Err(e) => {
                        // SAFETY: the id is live; a reject tells the peer.
                        unsafe { ib::rdma_reject(c.id, std::ptr::null(), 0) };
                        qp.to_error();
                        self.fail(n, unreachable(e.to_string()))
                    }
                }
            }
            t::RDMA_CM_EVENT_ESTABLISHED => {
                if c.established {
                    return None;
                }
                c.established = true;
                if let Some(qp) = &c.qp {
                    qp.set_connected();
                }
                let private_data = if c.kind == Kind::Active {
                    raw.pdata
                } else {
                    PrivateData::empty()
                };
                Some(CmEvent::Established { id, private_data })
            }
            t::RDMA_CM_EVENT_REJECTED => {
                if c.kind != Kind::Active {
                    // The active side gave up on our accept (e.g. its REP
                    // handling failed): nothing was established.
                    return self.fail(n, CmEvent::Disconnected { id });
                }
                if raw.status == REJ_CONSUMER_DEFINED {
                    self.fail(
                        n,
                        CmEvent::Rejected {
                            id,
                            private_data: raw.pdata,
                        },
                    )
                } else {
                    // No listener (invalid service id, 8), timeouts, ...
                    self.fail(
                        n,
                        unreachable(format!("rejected by the peer's CM (reason {})", raw.status)),
                    )
                }
            }
            t::RDMA_CM_EVENT_ADDR_ERROR
            | t::RDMA_CM_EVENT_ROUTE_ERROR
            | t::RDMA_CM_EVENT_UNREACHABLE
            | t::RDMA_CM_EVENT_CONNECT_ERROR => {
                if c.kind == Kind::Passive && !c.established {
                    return self.fail(n, CmEvent::Disconnected { id });
                }
                let what = event_str(raw.event);
                self.fail(n, unreachable(format!("{what} (status {})", raw.status)))
            }
            t::RDMA_CM_EVENT_DISCONNECTED | t::RDMA_CM_EVENT_DEVICE_REMOVAL => {
                if let Some(qp) = &c.qp {
                    qp.to_error();
                }
                if raw.event == t::RDMA_CM_EVENT_DEVICE_REMOVAL && c.kind == Kind::Listener {
                    return None;
                }
                // Answer the peer's DREQ (DREP) at once; destroying the id
                // would too.
                // SAFETY: the id is live.
                unsafe { ib::rdma_disconnect(c.id) };
                let reported = c.reported;
                self.remove(n);
                (!reported).then_some(CmEvent::Disconnected { id })
            }
            _ => None, // TIMEWAIT_EXIT, ADDR_CHANGE, ...
        }
    }

    /// Waits up to `d` for the channel to become readable.
    fn wait_fd(&self, d: Duration) {
        let mut pfd = libc::pollfd {
            // SAFETY: the channel is live.
            fd: unsafe { (*self.ch).fd },
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = d.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    /// Takes one raw event from the channel, if any (non-blocking).
    fn next_raw(&mut self) -> Result<Option<Raw>> {
        let mut ev: *mut ib::rdma_cm_event = std::ptr::null_mut();
        // SAFETY: the channel is live (non-blocking fd); ev is an out-parameter.
        if unsafe { ib::rdma_get_cm_event(self.ch, &mut ev) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(FabricError::io("rdma_get_cm_event", e));
        }
        // SAFETY: ev is a valid event until acked; we copy what we need.
        let raw = unsafe {
            let e = &*ev;
            let conn = &e.param.conn;
            let pdata = if conn.private_data.is_null() || conn.private_data_len == 0 {
                PrivateData::empty()
            } else {
                let s = std::slice::from_raw_parts(
                    conn.private_data.cast::<u8>(),
                    usize::from(conn.private_data_len),
                );
                decode_pdata(s)
            };
            Raw {
                id: e.id,
                listen_id: e.listen_id,
                event: e.event,
                status: e.status,
                pdata,
            }
        };
        // SAFETY: ev came from rdma_get_cm_event and is acked exactly once.
        unsafe { ib::rdma_ack_cm_event(ev) };
        if debug() {
            eprintln!(
                "rdma cm {:p}: {} status {} id {:p} listen {:p}",
                self.ch,
                event_str(raw.event),
                raw.status,
                raw.id,
                raw.listen_id
            );
        }
        Ok(Some(raw))
    }
}

/// Whether `RTRS_RDMA_DEBUG` asks for every CM event on stderr.
fn debug() -> bool {
    static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *D.get_or_init(|| std::env::var_os("RTRS_RDMA_DEBUG").is_some())
}

fn event_str(ev: u32) -> String {
    // SAFETY: rdma_event_str returns a static C string for any value.
    let s = unsafe { ib::rdma_event_str(ev) };
    if s.is_null() {
        return format!("event {ev}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { std::ffi::CStr::from_ptr(s) }
        .to_string_lossy()
        .into_owned()
}

struct Raw {
    id: *mut ib::rdma_cm_id,
    listen_id: *mut ib::rdma_cm_id,
    event: u32,
    status: i32,
    pdata: PrivateData,
}

impl Drop for RdmaCm {
    fn drop(&mut self) {
        // Passive and active ids first, listeners last.
        let mut ns: Vec<(bool, u64)> = self
            .conns
            .iter()
            .map(|(n, c)| (c.kind == Kind::Listener, *n))
            .collect();
        ns.sort();
        for (_, n) in ns {
            if let Some(c) = self.conns.get(&n) {
                if let Some(qp) = &c.qp {
                    qp.to_error();
                }
            }
            self.remove(n);
        }
        // Drain what is left so that the channel can go.
        while let Ok(Some(raw)) = self.next_raw() {
            if raw.event == ib::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                // SAFETY: a new id nobody else knows; reject and destroy it.
                unsafe {
                    ib::rdma_reject(raw.id, std::ptr::null(), 0);
                    ib::rdma_destroy_id(raw.id);
                }
            }
        }
        // SAFETY: every id on the channel is destroyed.
        unsafe { ib::rdma_destroy_event_channel(self.ch) };
    }
}

impl Cm<RdmaFabric> for RdmaCm {
    fn listen(&mut self, addr: &Address) -> Result<ConnId> {
        let sa = resolve(addr)?;
        let mut st = to_sockaddr(&sa);
        let id = self.create_id()?;
        // SAFETY: id is live; st holds a valid sockaddr for its family.
        let rc = unsafe { ib::rdma_bind_addr(id, &mut st as *mut _ as *mut libc::sockaddr) };
        let rc = if rc == 0 {
            // SAFETY: id is bound.
            unsafe { ib::rdma_listen(id, 128) }
        } else {
            rc
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: id is ours, with no events.
            unsafe { ib::rdma_destroy_id(id) };
            let what = if e.kind() == std::io::ErrorKind::AddrInUse {
                "listen: the address is already in use"
            } else {
                "listen (rdma_bind_addr/rdma_listen)"
            };
            return Err(FabricError::io(what, e));
        }
        Ok(self.add(id, Kind::Listener, None))
    }

    fn connect(&mut self, addr: &Address, qp: &RdmaQp, private_data: &[u8]) -> Result<ConnId> {
        let pdata = encode_pdata(private_data)?;
        let sa = resolve(addr)?;
        let mut st = to_sockaddr(&sa);
        let id = self.create_id()?;
        let n = self.add(id, Kind::Active, Some(qp.inner().clone()));
        if let Some(c) = self.conns.get_mut(&n.0) {
            c.pdata = pdata;
        }
        // SAFETY: id is live; st is a valid destination address.
        let rc = unsafe {
            ib::rdma_resolve_addr(
                id,
                std::ptr::null_mut(),
                &mut st as *mut _ as *mut libc::sockaddr,
                RESOLVE_MS,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            self.remove(n.0);
            self.pending.push_back(CmEvent::Unreachable {
                id: n,
                reason: format!("rdma_resolve_addr {sa}: {e}"),
            });
            return Ok(n);
        }
        // The route is resolved and the REQ sent as the CM's events come
        // (poll_event): a control thread never waits for the network here.
        Ok(n)
    }

    fn accept(&mut self, id: ConnId, qp: &RdmaQp, private_data: &[u8]) -> Result<()> {
        let pdata = encode_pdata(private_data)?;
        let c = self
            .conns
            .get_mut(&id.0)
            .filter(|c| c.kind == Kind::Passive && c.qp.is_none())
            .ok_or(FabricError::Unknown {
                what: "connect request",
                id: id.0,
            })?;
        let q = qp.inner().clone();
        c.qp = Some(q.clone());
        c.pdata = pdata;
        let cid = c.id;
        let r = transition(cid, &q, ib::ibv_qp_state::IBV_QPS_INIT)
            .and_then(|()| transition(cid, &q, ib::ibv_qp_state::IBV_QPS_RTR))
            .and_then(|()| transition(cid, &q, ib::ibv_qp_state::IBV_QPS_RTS))
            .and_then(|()| {
                let mut p = conn_param(q.qp_num(), &pdata, 7);
                // SAFETY: the id is live; p and its data outlive the call.
                if unsafe { ib::rdma_accept(cid, &mut p) } != 0 {
                    return Err(os_err("rdma_accept"));
                }
                Ok(())
            });
        if debug() {
            eprintln!(
                "rdma cm {:p}: accept id {:p} qp {:#x}: {:?}",
                self.ch,
                cid,
                q.qp_num(),
                r.as_ref().err()
            );
        }
        if r.is_ok() {
            // The QP is in RTS: it may answer whatever the peer sends as
            // soon as the peer has our REP, before our CM thread sees
            // ESTABLISHED (RTRS's client sends INFO_REQ at once).
            q.set_connected();
        }
        if let Err(e) = r {
            q.to_error();
            // SAFETY: the id is live; tell the peer no.
            unsafe { ib::rdma_reject(cid, std::ptr::null(), 0) };
            self.remove(id.0);
            return Err(e);
        }
        Ok(())
    }

    fn reject(&mut self, id: ConnId, private_data: &[u8]) -> Result<()> {
        let pdata = encode_pdata(private_data)?;
        let c = self
            .conns
            .get(&id.0)
            .filter(|c| c.kind == Kind::Passive)
            .ok_or(FabricError::Unknown {
                what: "connect request",
                id: id.0,
            })?;
        // SAFETY: the id is live; pdata outlives the call.
        let rc = unsafe { ib::rdma_reject(c.id, pdata.as_ptr().cast(), pdata.len() as u8) };
        let r = if rc != 0 {
            Err(os_err("rdma_reject"))
        } else {
            Ok(())
        };
        self.remove(id.0);
        r
    }

    fn disconnect(&mut self, id: ConnId) -> Result<()> {
        let Some(c) = self.conns.get(&id.0) else {
            return Ok(()); // already gone
        };
        match c.kind {
            Kind::Listener => {
                self.remove(id.0);
                Ok(())
            }
            _ => {
                if let Some(qp) = &c.qp {
                    qp.to_error();
                }
                if c.reported {
                    return Ok(());
                }
                if debug() {
                    eprintln!("rdma cm {:p}: disconnect id {:p}", self.ch, c.id);
                }
                // SAFETY: the id is live.
                let rc = unsafe { ib::rdma_disconnect(c.id) };
                if rc != 0 || !c.established {
                    // Not connected (yet): no DISCONNECTED will come.
                    self.remove(id.0);
                } else if let Some(c) = self.conns.get_mut(&id.0) {
                    // Our side is down now (the QP flushes); the CM's own
                    // DISCONNECTED comes with the peer's DREP, or after the
                    // DREQ times out if the peer is slow to answer: report
                    // at once, and destroy the id when it comes.
                    c.reported = true;
                }
                self.pending.push_back(CmEvent::Disconnected { id });
                Ok(())
            }
        }
    }

    fn poll_event(&mut self, timeout: Duration) -> Result<Option<CmEvent>> {
        let t0 = Instant::now();
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            while let Some(raw) = self.next_raw()? {
                if let Some(ev) = self.handle(raw) {
                    return Ok(Some(ev));
                }
            }
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            self.wait_fd(left);
        }
    }
}
