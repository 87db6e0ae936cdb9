//! The RTRS client: a session of paths, each of one service connection
//! (cid 0) and one IO connection per core, as the kernel's rtrs-client.
//!
//! ```text
//!  Client (control loop, slow-path thread)
//!    open: per path, cid 0..=cores one after another (CON_REQ / CON_RSP),
//!          then INFO_REQ / INFO_RSP on cid 0 -> the server's chunk table
//!    cid 0: heartbeats (and their RTT for min-latency); failed paths:
//!          tear down, reconnect with the kernel's delay, jitter and budget
//!  CltCore (one per core, owned by the embedder's core thread)
//!    permit (= server chunk id) -> header slot [usr][rdma_write|rdma_read]
//!    -> WRITE_WITH_IMM on the path mp_policy picks -> response imm
//!    -> Completion on the same core; a failed path's IO moves to another
//!  CltSess (shared): one registered region of QD data buffers and QD header
//!    slots, per-permit read MRs (re-keyed per read), the permit pool, paths
//! ```

mod con;
mod core;
mod path;

pub use self::core::{CltCore, Completion, Dir, Submitter, MAX_SG, REMOTE_USR_MAX};
pub use path::{CltPath, LinkState, PathStats};

use self::core::CoreMsg;
use crate::fabric::{
    memory, Access, Address, Cm, CmEvent, ConnId, Fabric, FabricError, Memory, Mr, Qp, QpCap,
    RecvWr, SendWr, Wc, WcOpcode, WcStatus,
};
use crate::proto::imm::{Imm, ImmLayout};
use crate::proto::{
    slice_chunks, ConnReqRepr, ConnRsp, ConnRspRepr, InfoReqRepr, InfoRsp, ProtoError, NAME_MAX,
    SERVICE_CON_QUEUE_DEPTH,
};
use crate::sess::hb::{HbAction, Heartbeat};
use crate::sess::mp_policy::MpPolicy;
use crate::sess::path::{ClientPath, PathAction, ReconnectPolicy};
use crate::sess::permit::Permits;
use con::{CltCon, WR_HB, WR_INFO_REQ, WR_INFO_RSP, WR_KIND, WR_RECV};
use minstant::Instant;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A permit: the right to one IO in flight, and the server chunk (and local
/// buffer) it uses. Not `Copy`: whoever holds it owns the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct IoPermit(pub(crate) u32);

impl IoPermit {
    /// The chunk id.
    pub fn id(&self) -> u32 {
        self.0
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct CltConfig {
    /// The session name (no `/` or `.`, at most 254 bytes).
    pub sessname: String,
    /// The server's addresses, one path each.
    pub paths: Vec<Address>,
    /// IO connections per path (one per core).
    pub cores: usize,
    /// Cap on the data of one IO (and the size of each permit's buffer); the
    /// server's `max_io_size` when larger.
    pub max_io_size: u32,
    /// Path selection.
    pub mp_policy: MpPolicy,
    /// Reconnect delay, attempts and backoff.
    pub reconnect: ReconnectPolicy,
    /// How long each connection, and the INFO exchange, may take.
    pub connect_timeout: Duration,
    /// Heartbeat interval (the kernel's: 5 s).
    pub hb_interval: Duration,
    /// How read buffers are keyed.
    pub read_keys: ReadKeys,
}

/// How the client exposes its read buffers (one per permit) to the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadKeys {
    /// Keyed once, for the session: each permit's buffer keeps one rkey, as
    /// userspace initiators do with memory registered once (SPDK's NVMe-oF
    /// host). The buffers are this session's own and hold nothing but data
    /// the server reads into them, so a read costs no re-key.
    #[default]
    Session,
    /// A fresh key for every read, invalidated before the read completes
    /// (by the server's SEND_WITH_INV where the fabric allows, else
    /// locally): the kernel client's fast registration per IO, so a server
    /// can write a buffer only while the read it was given is in flight.
    /// Costs a re-key and an invalidation per read.
    PerIo,
}

impl std::fmt::Display for ReadKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadKeys::Session => "session",
            ReadKeys::PerIo => "per-io",
        })
    }
}

impl std::str::FromStr for ReadKeys {
    type Err = String;
    fn from_str(s: &str) -> Result<ReadKeys, String> {
        match s {
            "session" => Ok(ReadKeys::Session),
            "per-io" => Ok(ReadKeys::PerIo),
            _ => Err(format!(
                "unknown read-keys {s:?} (expected session or per-io)"
            )),
        }
    }
}

impl CltConfig {
    /// A session `sessname` to `paths` with one core and the kernel's
    /// defaults otherwise.
    pub fn new(sessname: &str, paths: Vec<Address>) -> CltConfig {
        CltConfig {
            sessname: sessname.to_string(),
            paths,
            cores: 1,
            max_io_size: 128 << 10,
            mp_policy: MpPolicy::default(),
            reconnect: ReconnectPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            hb_interval: crate::sess::hb::HB_INTERVAL,
            read_keys: ReadKeys::default(),
        }
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum CltError {
    /// Bad settings.
    #[error("client configuration: {0}")]
    Config(&'static str),
    /// The fabric failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// The server sent something malformed.
    #[error("protocol: {0}")]
    Proto(ProtoError),
    /// The server refused the connection with this errno.
    #[error("server rejected the connection: errno {0}")]
    Rejected(i32),
    /// A connection or the INFO exchange failed.
    #[error("connecting {addr}: {why}")]
    Connect {
        /// The path's address.
        addr: String,
        /// What went wrong.
        why: String,
    },
    /// Header or data too large for the session's chunks (-EMSGSIZE).
    #[error("IO too large for the session's chunks")]
    MsgSize,
    /// No connected path could take the IO (-ECONNABORTED).
    #[error("no connected path")]
    NoPath,
    /// A ring to a core is full, or a core has too many submitters (-EBUSY).
    #[error("the core's submission ring is full")]
    Busy,
}

impl CltError {
    /// The kernel's errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            CltError::MsgSize => -libc::EMSGSIZE,
            CltError::NoPath => -libc::ECONNABORTED,
            CltError::Busy => -libc::EBUSY,
            CltError::Rejected(e) => *e,
            _ => -libc::ECONNRESET,
        }
    }
}

/// What every core and the control loop share.
pub(crate) struct CltSess<F: Fabric> {
    pub(crate) queue_depth: u32,
    pub(crate) chunk_size: u32,
    pub(crate) max_hdr_size: u32,
    pub(crate) layout: ImmLayout,
    pub(crate) buf_size: usize,
    pub(crate) mem: Arc<dyn Memory>,
    pub(crate) lmr: F::Mr,
    pub(crate) rd_mrs: Vec<F::Mr>,
    pub(crate) permits: Permits,
    pub(crate) paths: Vec<Arc<CltPath>>,
    pub(crate) policy: AtomicU8,
    /// Ask the server to invalidate read buffers (NEED_INVAL): only where
    /// the fabric lets a peer invalidate our keys.
    pub(crate) need_inval: bool,
    /// [`ReadKeys::PerIo`]: re-key each read buffer per read.
    pub(crate) per_io_keys: bool,
}

impl<F: Fabric> CltSess<F> {
    /// The key a read into permit `id`'s buffer goes out with: a fresh one
    /// per read with [`ReadKeys::PerIo`], else the session's.
    pub(crate) fn read_key(&self, id: u32) -> crate::fabric::Result<u32> {
        let mr = &self.rd_mrs[id as usize];
        if self.per_io_keys {
            mr.rekey()
        } else {
            Ok(mr.rkey())
        }
    }
    pub(crate) fn buf_off(&self, id: u32) -> usize {
        id as usize * self.buf_size
    }
    pub(crate) fn hdr_off(&self, id: u32) -> usize {
        self.queue_depth as usize * self.buf_size + id as usize * self.max_hdr_size as usize
    }
}

/// Geometry from cid 0's CON_RSP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    queue_depth: u16,
    max_io_size: u32,
    max_hdr_size: u32,
    new_rkey: bool,
}

struct PathCtl<F: Fabric> {
    addr: Address,
    sess_uuid: [u8; 16],
    sm: ClientPath,
    svc: Option<CltCon<F>>,
    ids: Vec<ConnId>,
    hb: Option<Heartbeat>,
    seen_recvs: u64,
    shared: Arc<CltPath>,
}

/// The client's control side: run [`Client::poll`] on the slow-path thread.
pub struct Client<F: Fabric> {
    pd: F::Pd,
    cm: F::Cm,
    cfg: CltConfig,
    geo: Geometry,
    paths_uuid: [u8; 16],
    paths: Vec<PathCtl<F>>,
    sess: Arc<CltSess<F>>,
    to_cores: Vec<pollers::spsc::Producer<CoreMsg<F>>>,
    wcs: [Wc; 16],
}

impl<F: Fabric> std::fmt::Debug for Client<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("sessname", &self.cfg.sessname)
            .field("paths", &self.paths.len())
            .finish()
    }
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

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32) ^ (&t as *const u64 as u64)
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

impl<F: Fabric> Client<F> {
    /// Opens the session: connects every path (all must come up, as
    /// `rtrs_clt_open` requires) and returns the control side and one
    /// [`CltCore`] per core, to be moved to the core threads.
    pub fn open(fabric: &F, cfg: CltConfig) -> Result<(Client<F>, Vec<CltCore<F>>), CltError> {
        if cfg.sessname.is_empty()
            || cfg.sessname.len() >= NAME_MAX
            || cfg.sessname.contains(['/', '.'])
        {
            return Err(CltError::Config(
                "the session name must be 1..=254 bytes without '/' or '.'",
            ));
        }
        if cfg.paths.is_empty() || cfg.paths.len() > crate::proto::MAX_PATHS_NUM {
            return Err(CltError::Config("a session has 1..=128 paths"));
        }
        if cfg.cores == 0 || cfg.cores >= usize::from(crate::proto::MAX_CID_NUM) {
            return Err(CltError::Config("cores must be 1..4095"));
        }
        let pd = fabric.alloc_pd()?;
        let mut cm = fabric.create_cm()?;
        let seed = random_seed();
        let paths_uuid = uuid(seed);
        // cid 0 of the first path gives the session's geometry.
        let mut ctls = Vec::new();
        let mut first: Option<(Geometry, CltCon<F>, ConnId)> = None;
        for (i, addr) in cfg.paths.iter().enumerate() {
            let mut sm = ClientPath::new(cfg.reconnect, seed.wrapping_add(i as u64));
            let _ = sm.open();
            let sess_uuid = uuid(seed.wrapping_add(0x100 + i as u64));
            if i == 0 {
                let req = ConnReqRepr {
                    cid: 0,
                    cid_num: cfg.cores as u16 + 1,
                    recon_cnt: 1,
                    sess_uuid,
                    paths_uuid,
                    first_conn: true,
                };
                let con = CltCon::create(&pd, 0, service_cap(), 2 * SERVICE_CON_QUEUE_DEPTH)?;
                let (geo, id) = connect_one(&mut cm, addr, &con, &req, cfg.connect_timeout)?;
                first = Some((geo, con, id));
            }
            ctls.push((addr.clone(), sess_uuid, sm));
        }
        let Some((geo, svc0, id0)) = first else {
            return Err(CltError::Config("no path"));
        };
        let mut sess = make_sess::<F>(&pd, &cfg, geo)?;
        sess.need_inval = sess.per_io_keys && fabric.remote_invalidate();
        let sess = Arc::new(sess);
        let mut to_cores = Vec::new();
        let mut cores = Vec::new();
        for c in 0..cfg.cores {
            let (tx, rx) = pollers::spsc::channel(4 * cfg.paths.len() + 8);
            to_cores.push(tx);
            cores.push(CltCore::new(c as u32, sess.clone(), rx));
        }
        let paths = ctls
            .into_iter()
            .enumerate()
            .map(|(i, (addr, sess_uuid, sm))| PathCtl {
                addr,
                sess_uuid,
                sm,
                svc: None,
                ids: Vec::new(),
                hb: None,
                seen_recvs: 0,
                shared: sess.paths[i].clone(),
            })
            .collect();
        let mut clt = Client {
            pd,
            cm,
            cfg,
            geo,
            paths_uuid,
            paths,
            sess,
            to_cores,
            wcs: [Wc::default(); 16],
        };
        let mut first = Some((svc0, id0));
        for i in 0..clt.paths.len() {
            if let Err(e) = clt.connect_path(i, 1, first.take()) {
                clt.close();
                return Err(e);
            }
        }
        for c in &mut cores {
            c.absorb_cons();
        }
        Ok((clt, cores))
    }

    /// The session's figures: every path's summed (the address and state
    /// fields are left empty; the heartbeat RTT is the lowest of the paths).
    pub fn stats(&self) -> PathStats {
        let mut t = PathStats::default();
        let mut rtt: Option<Duration> = None;
        for p in &self.sess.paths {
            let s = p.stats();
            t.ios += s.ios;
            t.bytes += s.bytes;
            t.errors += s.errors;
            t.inflight += s.inflight;
            t.failovers += s.failovers;
            t.reconnects += s.reconnects;
            if s.hb_rtt > Duration::ZERO {
                rtt = Some(rtt.map_or(s.hb_rtt, |r| r.min(s.hb_rtt)));
            }
        }
        t.hb_rtt = rtt.unwrap_or_default();
        t
    }

    /// The session's paths.
    pub fn paths(&self) -> Vec<Arc<CltPath>> {
        self.sess.paths.clone()
    }

    /// Registers the caller's memory for [`CltCore::write_sg`] (its sg
    /// entries come from the returned MR: `mr.sge(offset, len)`).
    pub fn reg_buf(&self, mem: Arc<dyn Memory>) -> Result<F::Mr, CltError> {
        Ok(crate::fabric::Pd::reg_mr(
            &self.pd,
            mem,
            Access::LOCAL_WRITE,
        )?)
    }

    /// The session's queue depth (the server's).
    pub fn queue_depth(&self) -> u32 {
        self.sess.queue_depth
    }

    /// Whether the server refreshes chunk keys (always_invalidate).
    pub fn always_invalidate(&self) -> bool {
        self.geo.new_rkey
    }

    /// Permits in use.
    pub fn permits_in_use(&self) -> u32 {
        self.sess.permits.in_use()
    }

    /// Switches the multipath policy at runtime.
    pub fn set_mp_policy(&self, p: MpPolicy) {
        self.sess.policy.store(p.code(), Ordering::Relaxed);
    }

    /// Connects (or reconnects) path `i`: cid 0..=cores in order, then INFO.
    /// `svc0` is an already-established cid 0 (the first path at open).
    fn connect_path(
        &mut self,
        i: usize,
        recon_cnt: u16,
        svc0: Option<(CltCon<F>, ConnId)>,
    ) -> Result<(), CltError> {
        let addr = self.paths[i].addr.clone();
        let shared = self.paths[i].shared.clone();
        shared.set_state(LinkState::Connecting);
        let cid_num = self.cfg.cores as u16 + 1;
        let mut req = ConnReqRepr {
            cid: 0,
            cid_num,
            recon_cnt,
            sess_uuid: self.paths[i].sess_uuid,
            paths_uuid: self.paths_uuid,
            first_conn: true,
        };
        let mut ids = Vec::new();
        let mut svc = match svc0 {
            Some((con, id)) => {
                ids.push(id);
                con
            }
            None => {
                // cid 0 of a later path at open may not create a session.
                req.first_conn = recon_cnt > 1 || i == 0;
                let con = CltCon::create(&self.pd, 0, service_cap(), 2 * SERVICE_CON_QUEUE_DEPTH)?;
                let (geo, id) =
                    connect_one(&mut self.cm, &addr, &con, &req, self.cfg.connect_timeout)?;
                ids.push(id);
                if geo.queue_depth != self.geo.queue_depth {
                    self.paths[i].sm.set_policy(ReconnectPolicy {
                        max_attempts: 0,
                        ..self.cfg.reconnect
                    });
                    return Err(CltError::Connect {
                        addr: addr.to_string(),
                        why: format!(
                            "queue depth changed from {} to {}: reconnect disabled",
                            self.geo.queue_depth, geo.queue_depth
                        ),
                    });
                }
                con
            }
        };
        req.first_conn = true;
        let qd = self.sess.queue_depth;
        let mut io_cons = Vec::new();
        for cid in 1..cid_num {
            req.cid = cid;
            let cap = QpCap {
                max_send_wr: qd * 4 + 1,
                max_recv_wr: qd * 3 + 1,
                max_send_sge: MAX_SG as u32 + 1,
                max_recv_sge: 1,
                max_inline_data: 0,
                rnr_retry: 7,
            };
            let con = CltCon::create(&self.pd, cid, cap, 2 * qd)?;
            let (_, id) = connect_one(&mut self.cm, &addr, &con, &req, self.cfg.connect_timeout)?;
            ids.push(id);
            io_cons.push(con);
        }
        self.paths[i].ids = ids;
        // INFO_REQ / INFO_RSP on cid 0, with a buffer made for QD descriptors.
        let info = self.info_exchange(&mut svc, &shared, &addr)?;
        debug_assert!(info);
        svc.signal_every = qd.clamp(1, 512);
        svc.post_all_recvs()?;
        for (k, mut con) in io_cons.into_iter().enumerate() {
            con.signal_every = qd.clamp(1, 512);
            con.post_all_recvs()?;
            if let Err(pollers::Full(_)) = self.to_cores[k].push(CoreMsg::Con(i, con)) {
                return Err(CltError::Config("a core's inbox is full"));
            }
        }
        self.paths[i].svc = Some(svc);
        self.paths[i].hb = Some(Heartbeat::start(
            Instant::now(),
            self.cfg.hb_interval,
            crate::sess::hb::HB_MISSED_MAX,
        ));
        shared.set_state(LinkState::Connected);
        let _ = self.paths[i].sm.connected();
        if recon_cnt > 1 {
            shared
                .reconnects
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn info_exchange(
        &mut self,
        svc: &mut CltCon<F>,
        shared: &CltPath,
        addr: &Address,
    ) -> Result<bool, CltError> {
        let qd = self.sess.queue_depth as usize;
        let rsp_len = 8 + 16 * qd;
        let fail = |why: String| CltError::Connect {
            addr: addr.to_string(),
            why,
        };
        // The service connection's own buffers hold only receive slots: the
        // INFO messages use a scratch registration for the exchange.
        let mem = memory::shareable(272 + rsp_len)?;
        let mr = crate::fabric::Pd::reg_mr(&self.pd, mem.clone(), Access::LOCAL_WRITE)?;
        let mut req = [0u8; 272];
        InfoReqRepr {
            sessname: &self.cfg.sessname,
        }
        .emit(&mut req)
        .map_err(CltError::Proto)?;
        mem.write(0, &req)?;
        let rsge = [mr.sge(272, rsp_len as u32)];
        svc.qp.post_recv(&RecvWr {
            wr_id: WR_INFO_RSP,
            sg_list: &rsge,
        })?;
        let ssge = [mr.sge(0, 272)];
        svc.qp.post_send(&SendWr::send(WR_INFO_REQ, &ssge))?;
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let mut got = None;
        while got.is_none() {
            if Instant::now() > deadline {
                return Err(fail("no INFO_RSP within the connect timeout".into()));
            }
            let n = svc.poll(&mut self.wcs);
            for wc in &self.wcs[..n] {
                if wc.status != WcStatus::Success {
                    return Err(fail(format!("{:?} during the INFO exchange", wc.status)));
                }
                if wc.wr_id == WR_INFO_RSP && wc.opcode == WcOpcode::Recv {
                    got = Some(wc.byte_len as usize);
                }
            }
            if n == 0 {
                std::thread::yield_now();
            }
        }
        let len = got.unwrap_or(0).min(rsp_len);
        let mut b = vec![0u8; len];
        mem.read(272, &mut b)?;
        let v = InfoRsp::new_checked(&b[..]).map_err(CltError::Proto)?;
        let chunk_size = u64::from(self.geo.max_io_size) + u64::from(self.geo.max_hdr_size);
        slice_chunks(&v, self.geo.queue_depth, chunk_size, |k, a, key| {
            shared.rbufs[k].addr.store(a, Ordering::Relaxed);
            shared.rbufs[k].rkey.store(key, Ordering::Release);
        })
        .map_err(CltError::Proto)?;
        Ok(true)
    }

    /// One turn of the control loop: heartbeats on cid 0, failed paths torn
    /// down and reconnected on the kernel's schedule, CM events. Returns the
    /// work done.
    pub fn poll(&mut self, now: Instant) -> usize {
        let mut work = 0;
        while let Ok(Some(ev)) = self.cm.poll_event(Duration::ZERO) {
            work += 1;
            self.on_event(ev);
        }
        for i in 0..self.paths.len() {
            work += self.poll_service(i, now);
            let shared = self.paths[i].shared.clone();
            if shared.state() == LinkState::Failed {
                if let Some(PathAction::Teardown) = self.paths[i].sm.error(now) {
                    self.teardown(i);
                }
                shared.set_state(LinkState::Connecting);
                work += 1;
            }
            if let Some(PathAction::Connect { recon_cnt }) = self.paths[i].sm.handle_timeout(now) {
                work += 1;
                if let Err(e) = self.connect_path(i, recon_cnt, None) {
                    tracing::warn!(addr = %self.paths[i].addr, "reconnect failed: {e}");
                    self.teardown(i);
                    let _ = self.paths[i].sm.error(now);
                }
            }
            if self.paths[i].sm.state() == crate::sess::path::PathState::Closed {
                shared.set_state(LinkState::Closed);
            }
        }
        work
    }

    fn on_event(&mut self, ev: CmEvent) {
        if let CmEvent::Disconnected { id } = ev {
            if let Some(p) = self.paths.iter().find(|p| p.ids.contains(&id)) {
                p.shared.fail(format_args!("disconnected"));
            }
        }
    }

    fn poll_service(&mut self, i: usize, now: Instant) -> usize {
        let p = &mut self.paths[i];
        let Some(svc) = p.svc.as_mut() else { return 0 };
        let n = svc.poll(&mut self.wcs);
        for wc in &self.wcs[..n] {
            if wc.status != WcStatus::Success {
                p.shared.fail(format_args!(
                    "cid 0: {:?} completion of {:?}",
                    wc.status, wc.opcode
                ));
                return n;
            }
            if wc.wr_id & WR_KIND != WR_RECV {
                continue;
            }
            let _ = svc.post_recv((wc.wr_id & 0xffff_ffff) as u32);
            if let Some(hb) = p.hb.as_mut() {
                hb.on_recv();
                match Imm::decode_clt(wc.imm) {
                    Ok(Imm::HbAck) => {
                        hb.on_ack(now);
                        p.shared.set_latency(hb.latency());
                    }
                    Ok(Imm::HbMsg) => {
                        let wr = SendWr::write_with_imm(WR_HB, &[], 0, 0, Imm::join(9, 0));
                        let wr = if svc.signal_next() {
                            wr
                        } else {
                            wr.unsignaled()
                        };
                        let _ = svc.qp.post_send(&wr);
                    }
                    _ => {}
                }
            }
        }
        let recvs = p.shared.recvs();
        let Some(hb) = p.hb.as_mut() else { return n };
        if recvs != p.seen_recvs {
            p.seen_recvs = recvs;
            hb.on_recv();
        }
        match hb.handle_timeout(now) {
            HbAction::Wait => {}
            HbAction::Send => {
                let wr = SendWr::write_with_imm(WR_HB, &[], 0, 0, Imm::join(8, 0));
                let wr = if svc.signal_next() {
                    wr
                } else {
                    wr.unsignaled()
                };
                if let Err(e) = svc.qp.post_send(&wr) {
                    p.shared.fail(format_args!("cannot send a heartbeat: {e}"));
                }
            }
            HbAction::Dead => {
                let m = hb.missed();
                p.shared.fail(format_args!("heartbeat: {m} beats missed"));
            }
        }
        n
    }

    /// Disconnects path `i`'s connections and tells the cores to fail its
    /// IO over.
    fn teardown(&mut self, i: usize) {
        let ids = std::mem::take(&mut self.paths[i].ids);
        for id in ids {
            let _ = self.cm.disconnect(id);
        }
        self.paths[i].svc = None;
        self.paths[i].hb = None;
        for tx in &mut self.to_cores {
            let _ = tx.push(CoreMsg::Drop(i));
        }
    }

    /// Disconnects path `i` for good (the kernel's sysfs `disconnect`): its
    /// IO in flight moves to the other paths; it stays down until
    /// [`Client::reconnect_path`].
    pub fn disconnect_path(&mut self, i: usize) -> Result<(), CltError> {
        if i >= self.paths.len() {
            return Err(CltError::Config("no such path"));
        }
        let _ = self.paths[i].sm.close();
        self.paths[i].shared.set_state(LinkState::Closed);
        self.teardown(i);
        Ok(())
    }

    /// Reconnects path `i` now (the kernel's sysfs `reconnect`): the attempt
    /// starts after the reconnect backoff, in [`Client::poll`].
    pub fn reconnect_path(&mut self, i: usize, now: Instant) -> Result<(), CltError> {
        let p = self
            .paths
            .get_mut(i)
            .ok_or(CltError::Config("no such path"))?;
        if let Some(PathAction::Teardown) = p.sm.reconnect_now(now) {
            self.teardown(i);
        }
        self.paths[i].shared.set_state(LinkState::Connecting);
        Ok(())
    }

    /// Closes every path (the session's end).
    pub fn close(&mut self) {
        for i in 0..self.paths.len() {
            let _ = self.paths[i].sm.close();
            self.paths[i].shared.set_state(LinkState::Closed);
            self.teardown(i);
        }
    }
}

impl<F: Fabric> Drop for Client<F> {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connects one connection and waits for its outcome; returns the geometry
/// its CON_RSP carries.
fn connect_one<F: Fabric>(
    cm: &mut F::Cm,
    addr: &Address,
    con: &CltCon<F>,
    req: &ConnReqRepr,
    timeout: Duration,
) -> Result<(Geometry, ConnId), CltError> {
    let mut pd = [0u8; 56];
    req.emit(&mut pd).map_err(CltError::Proto)?;
    let id = cm.connect(addr, &con.qp, &pd)?;
    let deadline = Instant::now() + timeout;
    let fail = |why: String| CltError::Connect {
        addr: addr.to_string(),
        why,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(format!(
                "cid {}: no answer within {timeout:?}",
                req.cid
            )));
        }
        let ev = cm.poll_event(left.min(Duration::from_millis(50)))?;
        let Some(ev) = ev else { continue };
        if ev.id() != id {
            continue;
        }
        return match ev {
            CmEvent::Established { private_data, .. } => {
                let v = ConnRsp::new_checked(private_data.as_bytes()).map_err(CltError::Proto)?;
                let r = ConnRspRepr::parse(&v);
                if r.errno != 0 {
                    return Err(CltError::Rejected(r.errno.into()));
                }
                Ok((
                    Geometry {
                        queue_depth: r.queue_depth,
                        max_io_size: r.max_io_size,
                        max_hdr_size: r.max_hdr_size,
                        new_rkey: r.new_rkey,
                    },
                    id,
                ))
            }
            CmEvent::Rejected { private_data, .. } => {
                let errno = ConnRsp::new_checked(private_data.as_bytes())
                    .map(|v| i32::from(v.errno()))
                    .unwrap_or(-libc::ECONNRESET);
                Err(CltError::Rejected(errno))
            }
            CmEvent::Unreachable { reason, .. } => Err(fail(reason)),
            _ => Err(fail(format!(
                "cid {}: disconnected while connecting",
                req.cid
            ))),
        };
    }
}

fn make_sess<F: Fabric>(
    pd: &F::Pd,
    cfg: &CltConfig,
    geo: Geometry,
) -> Result<CltSess<F>, CltError> {
    use crate::fabric::Pd;
    let qd = u32::from(geo.queue_depth);
    if qd == 0 || geo.max_hdr_size < 64 || geo.max_io_size == 0 {
        return Err(CltError::Config(
            "the server's CON_RSP has an unusable geometry",
        ));
    }
    let chunk_size = geo.max_io_size + geo.max_hdr_size;
    let layout = ImmLayout::new(qd, chunk_size).map_err(CltError::Proto)?;
    let buf_size = geo.max_io_size.min(cfg.max_io_size).max(1) as usize;
    let len = qd as usize * (buf_size + geo.max_hdr_size as usize);
    let mem = memory::shareable(len)?;
    let lmr = pd.reg_mr(mem.clone(), Access::LOCAL_WRITE)?;
    let rd_mrs = (0..qd as usize)
        .map(|i| {
            pd.reg_mr_range(
                mem.clone(),
                i * buf_size,
                buf_size,
                Access::LOCAL_WRITE | Access::REMOTE_WRITE,
            )
        })
        .collect::<crate::fabric::Result<Vec<_>>>()?;
    let per_io_keys = cfg.read_keys == ReadKeys::PerIo;
    if per_io_keys {
        // Keyed per read: no key is valid until a read is submitted.
        for mr in &rd_mrs {
            mr.invalidate();
        }
    }
    let paths = cfg
        .paths
        .iter()
        .map(|a| Arc::new(CltPath::new(a.to_string(), qd, cfg.cores)))
        .collect();
    Ok(CltSess {
        queue_depth: qd,
        chunk_size,
        max_hdr_size: geo.max_hdr_size,
        layout,
        buf_size,
        mem,
        lmr,
        rd_mrs,
        permits: Permits::new(qd, cfg.cores as u32),
        paths,
        policy: AtomicU8::new(cfg.mp_policy.code()),
        need_inval: per_io_keys,
        per_io_keys,
    })
}
