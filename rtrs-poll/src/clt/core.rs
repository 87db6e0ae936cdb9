//! A client core: the IO connections of every path on this core, the
//! requests it submitted, and their completions. Owned by one thread (the
//! embedder's core); no lock, no allocation per IO.

use super::con::{CltCon, WR_HB, WR_IO, WR_KIND, WR_RECV};
use super::msg::{CoreMsg, CtlMsg, Req};
use super::path::{bump, CltPath};
use super::{CltError, CltSess, Dir, IoPermit, PathMem, MAX_SG};
use crate::sess::hb::hb_wr;
use crate::sess::mp_policy::{MpPolicy, PathIter, PathView, MAX_PATHS};
use crate::sess::path::PathState;
use crate::sess::DownReason;
use minstant::Instant;
use rtrs_fabric::{Fabric, Mr, SendWr, Sge, Wc, WcOpcode, WcStatus};
use rtrs_proto::chunk;
use rtrs_proto::imm::Imm;
use rtrs_proto::{RdmaRead, RdmaReadRepr, RdmaWrite, RkeyRsp, SgDesc};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A finished IO.
#[derive(Debug)]
pub struct Completion {
    /// The permit, back to the caller: reuse it or put it back.
    pub permit: IoPermit,
    /// The caller's tag.
    pub tag: u64,
    /// 0 or a negative errno (from the server's handler, or -ECONNABORTED
    /// when no path could carry it).
    pub errno: i32,
    /// Write or read.
    pub dir: Dir,
    /// Data bytes.
    pub len: u32,
    /// When it was submitted.
    pub start: Instant,
}

/// A request from another thread. Its user header is already in the
/// permit's header slot (the submitter holds the permit, so the slot is
/// its to write).
struct RemoteReq {
    sub: u8,
    permit: IoPermit,
    dir: Dir,
    usr_len: u16,
    len: u32,
    tag: u64,
    start: Instant,
}

/// Submits IO to a core from another thread, through lock-free rings:
/// requests go in over the core's MPSC ring, completions come back over this
/// submitter's own SPSC ring. Made by [`CltCore::submitter`].
///
/// The application's threads submit; the core's thread only polls:
///
/// ```
/// use minstant::Instant;
/// use rtrs_poll::clt::{Client, CltConfig};
/// # use rtrs_fabric::{soft::shm::ShmFabric, Address};
/// # use rtrs_poll::srv::{ConInfo, CorePool, Handler, Server, SrvConfig, SrvIo, Verdict};
/// # struct Sink;
/// # impl Handler for Sink {
/// #     fn on_io(&mut self, io: SrvIo<'_>) -> Verdict {
/// #         Verdict::Done(if io.usr() == b"put" { 0 } else { -libc::EINVAL })
/// #     }
/// # }
/// # let fabric = ShmFabric::new();
/// # let addr = Address::Shm(format!("doc-sub-{}", std::process::id()));
/// # let cfg = SrvConfig { queue_depth: 16, max_chunk_size: 8192, ..SrvConfig::default() };
/// # let cores = CorePool::launch(&[0])?;
/// # let srv = Server::listen(&fabric, &addr, cfg, |_: &ConInfo| Sink, cores.place())?;
/// let (clt, mut queues) = Client::open(&fabric, CltConfig::new("doc", vec![addr]))?;
/// let mut core = queues.remove(0);
/// let apps: Vec<_> = (0..2u64)
///     .map(|t| {
///         let mut sub = core.submitter().expect("a submitter");
///         std::thread::spawn(move || -> Result<(), String> {
///             for i in 0..10u64 {
///                 let mut p = sub.get_permit().ok_or("no permit")?;
///                 sub.buf(&mut p)[..8].copy_from_slice(&i.to_le_bytes());
///                 sub.write(p, b"put", 8, t << 32 | i).map_err(|(_, e)| e.to_string())?;
///                 let c = loop {
///                     let mut got = None;
///                     sub.poll(&mut |c| got = Some(c));
///                     match got {
///                         Some(c) => break c,
///                         None => std::thread::yield_now(),
///                     }
///                 };
///                 assert_eq!((c.tag, c.errno), (t << 32 | i, 0));
///                 sub.put_permit(c.permit);
///             }
///             Ok(())
///         })
///     })
///     .collect();
/// while !apps.iter().all(|a| a.is_finished()) {
///     core.poll(Instant::now(), &mut |_| {}); // the core: this thread
/// }
/// for a in apps {
///     a.join().expect("no panic")?;
/// }
/// # clt.close();
/// # drop(core);
/// # srv.stop();
/// # cores.stop();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Submitter<F: Fabric> {
    id: u8,
    core: u32,
    sess: Arc<CltSess<F>>,
    tx: pollers::mpsc::Sender<RemoteReq>,
    done: pollers::spsc::Consumer<Completion>,
}

impl<F: Fabric> std::fmt::Debug for Submitter<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Submitter({} -> core {})", self.id, self.core)
    }
}

impl<F: Fabric> Submitter<F> {
    /// Takes a permit (`None`: all in flight).
    pub fn get_permit(&self) -> Option<IoPermit> {
        self.sess.get_permit(self.core)
    }
    /// Returns a permit.
    pub fn put_permit(&self, p: IoPermit) {
        self.sess.put_permit(p);
    }
    /// The permit's data buffer (as [`CltCore::buf`]).
    pub fn buf<'a>(&'a mut self, p: &'a mut IoPermit) -> &'a mut [u8] {
        self.sess.slots.bytes_mut(&mut p.0)
    }
    /// Submits a write (the core picks it up on its next poll).
    pub fn write(
        &self,
        p: IoPermit,
        usr: &[u8],
        len: u32,
        tag: u64,
    ) -> Result<(), (IoPermit, CltError)> {
        self.send(p, Dir::Write, usr, len, tag)
    }
    /// Submits a read.
    pub fn read(
        &self,
        p: IoPermit,
        usr: &[u8],
        len: u32,
        tag: u64,
    ) -> Result<(), (IoPermit, CltError)> {
        self.send(p, Dir::Read, usr, len, tag)
    }
    fn send(
        &self,
        p: IoPermit,
        dir: Dir,
        usr: &[u8],
        len: u32,
        tag: u64,
    ) -> Result<(), (IoPermit, CltError)> {
        let s = &self.sess;
        if usr.len() > s.max_hdr_size as usize {
            return Err((p, CltError::MsgSize));
        }
        if let Err(e) = s.mem.write(s.hdr_off(p.id()), usr) {
            return Err((p, e.into()));
        }
        let r = RemoteReq {
            sub: self.id,
            permit: p,
            dir,
            usr_len: usr.len() as u16,
            len,
            tag,
            start: Instant::now(),
        };
        self.tx
            .push(r)
            .map_err(|pollers::Full(r)| (r.permit, CltError::Busy))
    }
    /// Hands finished IOs to `f`; returns how many.
    pub fn poll(&mut self, f: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        while let Some(c) = self.done.pop() {
            f(c);
            n += 1;
        }
        n
    }
}

const WC_BATCH: usize = 32;

/// One path as a core sees it.
struct CorePath<F: Fabric> {
    path: Arc<CltPath>,
    mem: Arc<PathMem<F>>,
    first_device: bool,
    /// This core's connections of the path (one, or several where the
    /// path has more connections than the session has cores), taken in
    /// turn.
    cons: Vec<CltCon<F>>,
    next_con: usize,
    reqs: Box<[Req]>,
    recvs: u64,
}

/// One core's side of a client session.
pub struct CltCore<F: Fabric> {
    core: u32,
    sess: Arc<CltSess<F>>,
    paths: Vec<Option<CorePath<F>>>,
    /// The permits of this core's requests in flight, by chunk id (the
    /// request sits in one path's table; its permit is held here until
    /// the completion hands it back).
    held: Box<[Option<IoPermit>]>,
    inbox: pollers::spsc::Consumer<CoreMsg<F>>,
    to_ctl: pollers::mpsc::Sender<CtlMsg<F>>,
    /// Reports and retired connections the control thread's inbox had no
    /// room for yet (sized for two per path: never grows in practice).
    unsent: Vec<CtlMsg<F>>,
    views: Vec<PathView>,
    rr: Option<usize>,
    wcs: [Wc; WC_BATCH],
    scratch: Box<[u8]>,
    /// A remote request's user header, read back from its header slot.
    usr_scratch: Box<[u8]>,
    remote_tx: pollers::mpsc::Sender<RemoteReq>,
    remote_rx: pollers::mpsc::Receiver<RemoteReq>,
    subs: Vec<pollers::spsc::Producer<Completion>>,
}

impl<F: Fabric> std::fmt::Debug for CltCore<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CltCore({})", self.core)
    }
}

impl<F: Fabric> CltCore<F> {
    pub(crate) fn new(
        core: u32,
        sess: Arc<CltSess<F>>,
        inbox: pollers::spsc::Consumer<CoreMsg<F>>,
        to_ctl: pollers::mpsc::Sender<CtlMsg<F>>,
    ) -> CltCore<F> {
        let qd = sess.queue_depth as usize;
        let (remote_tx, remote_rx) = pollers::mpsc::channel(qd.max(2));
        CltCore {
            remote_tx,
            remote_rx,
            subs: Vec::new(),
            core,
            paths: Vec::with_capacity(MAX_PATHS),
            held: (0..qd).map(|_| None).collect(),
            inbox,
            to_ctl,
            unsent: Vec::with_capacity(2 * MAX_PATHS),
            views: Vec::with_capacity(MAX_PATHS),
            rr: None,
            wcs: [Wc::default(); WC_BATCH],
            scratch: vec![0u8; sess.max_hdr_size as usize].into_boxed_slice(),
            usr_scratch: vec![0u8; sess.max_hdr_size as usize].into_boxed_slice(),
            sess,
        }
    }

    /// Takes what the control thread handed over at open (paths and their
    /// connections), before the core runs.
    pub(crate) fn absorb(&mut self, now: Instant) {
        while let Some(msg) = self.inbox.pop() {
            self.on_msg(msg, now, &mut |_| {});
        }
    }

    fn on_msg(&mut self, msg: CoreMsg<F>, now: Instant, done: &mut dyn FnMut(Completion)) {
        match msg {
            CoreMsg::AddPath {
                slot,
                path,
                mem,
                first_device,
                reqs,
            } => {
                while self.paths.len() <= slot {
                    self.paths.push(None);
                    self.views.push(PathView::default());
                }
                self.paths[slot] = Some(CorePath {
                    path,
                    mem,
                    first_device,
                    cons: Vec::new(),
                    next_con: 0,
                    reqs,
                    recvs: 0,
                });
            }
            CoreMsg::Cons(slot, cons) => {
                if let Some(Some(p)) = self.paths.get_mut(slot) {
                    p.cons = cons;
                }
            }
            CoreMsg::Drop(slot) => self.retire(slot, now, done),
            CoreMsg::Remove(slot) => {
                self.retire(slot, now, done);
                if let Some(p) = self.paths.get_mut(slot) {
                    *p = None;
                }
            }
        }
    }

    /// A handle other threads submit IO through (up to 255 per core).
    pub fn submitter(&mut self) -> Result<Submitter<F>, CltError> {
        let id = u8::try_from(self.subs.len()).map_err(|_| CltError::Busy)?;
        let (tx, rx) = pollers::spsc::channel(self.sess.queue_depth as usize);
        self.subs.push(tx);
        Ok(Submitter {
            id,
            core: self.core,
            sess: self.sess.clone(),
            tx: self.remote_tx.clone(),
            done: rx,
        })
    }

    /// This core's index.
    pub fn core(&self) -> u32 {
        self.core
    }

    /// The largest data length of one IO on this session.
    pub fn max_io_size(&self) -> u32 {
        self.sess.buf_size as u32
    }

    /// The session's queue depth (permits).
    pub fn queue_depth(&self) -> u32 {
        self.sess.queue_depth
    }

    /// Takes a permit (the kernel's NOWAIT): `None` when all are in flight.
    pub fn get_permit(&mut self) -> Option<IoPermit> {
        self.sess.get_permit(self.core)
    }

    /// Returns a permit to the pool.
    pub fn put_permit(&mut self, p: IoPermit) {
        self.sess.put_permit(p);
    }

    /// The permit's data buffer: fill it before a write, read it after a
    /// read completes. Registered memory; the IO uses it in place.
    pub fn buf<'a>(&'a mut self, p: &'a mut IoPermit) -> &'a mut [u8] {
        self.sess.slots.bytes_mut(&mut p.0)
    }

    /// Submits a write of `len` bytes of the permit's buffer with user
    /// header `usr`. On error the permit comes back with the reason.
    pub fn write(
        &mut self,
        p: IoPermit,
        usr: &[u8],
        len: u32,
        tag: u64,
        now: Instant,
    ) -> Result<(), (IoPermit, CltError)> {
        self.submit(p, Dir::Write, usr, len, tag, now, None)
    }

    /// Submits a write whose data is gathered from `sg` (up to [`MAX_SG`]
    /// entries of memory registered with [`super::Client::reg_buf`]), zero
    /// copy; the permit's buffer is not used. The memory must stay untouched
    /// until the completion.
    pub fn write_sg(
        &mut self,
        p: IoPermit,
        usr: &[u8],
        sg: &[Sge],
        tag: u64,
        now: Instant,
    ) -> Result<(), (IoPermit, CltError)> {
        if sg.len() > MAX_SG {
            return Err((p, CltError::MsgSize));
        }
        let len: u64 = sg.iter().map(|s| u64::from(s.len)).sum();
        let Ok(len) = u32::try_from(len) else {
            return Err((p, CltError::MsgSize));
        };
        self.submit_sg(p, Dir::Write, usr, len, tag, now, None, sg)
    }

    /// Submits a read of `len` bytes into the permit's buffer with user
    /// header `usr`.
    pub fn read(
        &mut self,
        p: IoPermit,
        usr: &[u8],
        len: u32,
        tag: u64,
        now: Instant,
    ) -> Result<(), (IoPermit, CltError)> {
        self.submit(p, Dir::Read, usr, len, tag, now, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        p: IoPermit,
        dir: Dir,
        usr: &[u8],
        len: u32,
        tag: u64,
        now: Instant,
        remote: Option<u8>,
    ) -> Result<(), (IoPermit, CltError)> {
        self.submit_sg(p, dir, usr, len, tag, now, remote, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_sg(
        &mut self,
        p: IoPermit,
        dir: Dir,
        usr: &[u8],
        len: u32,
        tag: u64,
        now: Instant,
        remote: Option<u8>,
        sg: &[Sge],
    ) -> Result<(), (IoPermit, CltError)> {
        let s = &self.sess;
        let msg_len = match dir {
            Dir::Write => RdmaWrite::<&[u8]>::LEN,
            Dir::Read => RdmaRead::<&[u8]>::HDR_LEN + SgDesc::LEN,
        };
        if (sg.is_empty() && len as usize > s.buf_size)
            || usr.len() + msg_len > s.max_hdr_size as usize
            || len as u64 + (usr.len() + msg_len) as u64 > u64::from(s.chunk_size)
        {
            return Err((p, CltError::MsgSize));
        }
        let need_inval = dir == Dir::Read && len > 0 && s.need_inval;
        let req = Req {
            active: true,
            dir,
            len,
            usr_len: usr.len() as u16,
            need_inval,
            tag,
            start: now,
            remote,
            sg: [Sge::default(); MAX_SG],
            sg_n: sg.len() as u8,
        };
        let mut req = req;
        req.sg[..sg.len()].copy_from_slice(sg);
        let id = p.id();
        // The user header and message go to the permit's header slot.
        if let Err(e) = self.build_tail(id, usr, &req) {
            return Err((p, e));
        }
        match self.post_any(id, req, None) {
            Ok(()) => {
                self.held[id as usize] = Some(p);
                Ok(())
            }
            Err(e) => Err((p, e)),
        }
    }

    /// Writes user header and RTRS message into the permit's header slot
    /// (for a read, with a fresh key for the permit's buffer).
    fn build_tail(&mut self, buf_id: u32, usr: &[u8], req: &Req) -> Result<(), CltError> {
        let s = &self.sess;
        let n = match req.dir {
            Dir::Write => chunk::emit_write_tail(&mut self.scratch, usr),
            Dir::Read => {
                // The first path's device's key; a path on another device,
                // and a read with a key of its own, write theirs when they
                // post (`post_on`).
                let desc = if req.len > 0 {
                    let mr = &s.first.rd_mrs[buf_id as usize];
                    Some(SgDesc {
                        addr: mr.addr(),
                        key: mr.rkey(),
                        len: req.len,
                    })
                } else {
                    None
                };
                let rd = RdmaReadRepr {
                    usr_len: 0,
                    need_inval: req.need_inval,
                    desc,
                };
                chunk::emit_read_tail(&mut self.scratch, usr, rd)
            }
        }
        .map_err(CltError::Proto)?;
        s.mem.write(s.hdr_off(buf_id), &self.scratch[..n])?;
        Ok(())
    }

    fn refresh_views(&mut self) {
        for (v, p) in self.views.iter_mut().zip(&self.paths) {
            *v = match p {
                Some(p) => PathView {
                    // A connection of an older round (its teardown not yet
                    // taken from the inbox) is not the path's.
                    connected: p.cons.first().is_some_and(|c| c.epoch == p.path.epoch())
                        && p.path.state() == PathState::Connected,
                    inflight: p.path.inflight(),
                    latency: p.path.latency(),
                },
                None => PathView::default(),
            };
        }
    }

    /// Posts the request on a path the policy picks, skipping `not`.
    fn post_any(&mut self, buf_id: u32, req: Req, not: Option<usize>) -> Result<(), CltError> {
        self.refresh_views();
        if let Some(n) = not {
            self.views[n].connected = false;
        }
        let policy = MpPolicy::from_code(self.sess.policy.load(Ordering::Relaxed));
        let mut it = PathIter::new(policy);
        let mut last = CltError::NoPath;
        while let Some(slot) = it.next(&self.views, &mut self.rr) {
            match self.post_on(slot, buf_id, &req, not.is_some()) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Posts the request on path `slot`. `moved`: it failed over from
    /// another path (a read then goes out with a fresh key).
    fn post_on(
        &mut self,
        slot: usize,
        buf_id: u32,
        req: &Req,
        moved: bool,
    ) -> Result<(), CltError> {
        let s = &self.sess;
        let Some(Some(p)) = self.paths.get_mut(slot) else {
            return Err(CltError::NoPath);
        };
        if req.sg_n > 0 && !p.first_device {
            // Gathered from memory registered on another device.
            return Err(CltError::NoPath);
        }
        let rbuf = &p.path.rbufs[buf_id as usize];
        let (addr, rkey) = (
            rbuf.addr.load(Ordering::Acquire),
            rbuf.rkey.load(Ordering::Acquire),
        );
        if p.cons.is_empty() {
            return Err(CltError::NoPath);
        }
        let k = p.next_con % p.cons.len();
        p.next_con = p.next_con.wrapping_add(1);
        let con = &mut p.cons[k];
        let read = req.dir == Dir::Read && req.len > 0;
        // A per-IO read key: the buffer's next key, bound by a re-key at the
        // head of this request's chain (on rdma a type-2 window bound to
        // this QP), dropped by the server's SEND_WITH_INV: no syscall of
        // its own either way.
        let rekey = if read && s.per_io_keys {
            Some(p.mem.rd_mrs[buf_id as usize].rekey_wr()?)
        } else {
            None
        };
        if let Some(r) = rekey {
            write_read_desc(s, &p.mem, buf_id, req, r.rkey)?;
        } else if read && (moved || !Arc::ptr_eq(&p.mem, &s.first)) {
            let key = p.mem.rd_mrs[buf_id as usize].rkey();
            write_read_desc(s, &p.mem, buf_id, req, key)?;
        }
        let tail = req.usr_len as u32
            + match req.dir {
                Dir::Write => RdmaWrite::<&[u8]>::LEN as u32,
                Dir::Read if req.len > 0 => (RdmaRead::<&[u8]>::HDR_LEN + SgDesc::LEN) as u32,
                Dir::Read => RdmaRead::<&[u8]>::HDR_LEN as u32,
            };
        let hdr = p.mem.lmr.sge(s.hdr_off(buf_id), tail);
        let data = p.mem.lmr.sge(s.buf_off(buf_id), req.len);
        let off = chunk::msg_off(req.len, req.usr_len as usize);
        let imm = s.layout.io_req(buf_id, off).map_err(CltError::Proto)?;
        let wr_id = WR_IO | u64::from(buf_id);
        let both = [data, hdr];
        let only = [hdr];
        let mut gathered = [hdr; MAX_SG + 1];
        let n = req.sg_n as usize;
        gathered[..n].copy_from_slice(&req.sg[..n]);
        gathered[n] = hdr;
        let wr = match req.dir {
            Dir::Write if n > 0 => SendWr::write_with_imm(wr_id, &gathered[..=n], addr, rkey, imm),
            Dir::Write if req.len > 0 => SendWr::write_with_imm(wr_id, &both, addr, rkey, imm),
            Dir::Write => SendWr::write_with_imm(wr_id, &only, addr, rkey, imm),
            Dir::Read => SendWr::write_with_imm(wr_id, &only, addr + u64::from(req.len), rkey, imm),
        };
        match rekey {
            Some(r) => con.post_after(SendWr::rekey(wr_id, r), wr)?,
            None => con.post(wr)?,
        }
        p.reqs[buf_id as usize] = *req;
        bump(&p.path.cores[self.core as usize].inflight, 1);
        Ok(())
    }

    /// Handles what the control loop sent, polls every connection, and calls
    /// `done` for each finished IO. Returns the work done.
    pub fn poll(&mut self, now: Instant, done: &mut dyn FnMut(Completion)) -> usize {
        let mut work = 0;
        while let Some(msg) = self.inbox.pop() {
            work += 1;
            self.on_msg(msg, now, done);
        }
        if !self.unsent.is_empty() {
            self.send_reports();
        }
        for _ in 0..WC_BATCH {
            let Some(r) = self.remote_rx.pop() else { break };
            work += 1;
            let mut usr = std::mem::take(&mut self.usr_scratch);
            let n = (r.usr_len as usize).min(usr.len());
            let at = self.sess.hdr_off(r.permit.id());
            let res = match self.sess.mem.read(at, &mut usr[..n]) {
                Ok(()) => self.submit(
                    r.permit,
                    r.dir,
                    &usr[..n],
                    r.len,
                    r.tag,
                    r.start,
                    Some(r.sub),
                ),
                Err(e) => Err((r.permit, e.into())),
            };
            self.usr_scratch = usr;
            if let Err((permit, e)) = res {
                let c = Completion {
                    permit,
                    tag: r.tag,
                    errno: e.errno(),
                    dir: r.dir,
                    len: r.len,
                    start: r.start,
                };
                self.deliver(Some(r.sub), c, done);
            }
        }
        for slot in 0..self.paths.len() {
            let mut got = 0;
            let mut ci = 0;
            while let Some(Some(p)) = self.paths.get_mut(slot) {
                let Some(con) = p.cons.get_mut(ci) else { break };
                let n = con.poll(&mut self.wcs);
                got += n;
                let mut failed = false;
                for k in 0..n {
                    let wc = self.wcs[k];
                    if let Err(why) = self.on_wc(slot, ci, wc, done) {
                        self.path_failed(slot, why, now, done);
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break;
                }
                ci += 1;
            }
            if got == 0 {
                continue;
            }
            work += got;
            if let Some(Some(p)) = self.paths.get(slot) {
                p.path.cores[self.core as usize]
                    .recvs
                    .store(p.recvs, Ordering::Relaxed);
            }
        }
        work
    }

    /// This core saw path `slot` fail: its IO moves to other paths now, and
    /// the control thread hears why (it tears the path down everywhere and
    /// reconnects it) and gets the connection back to destroy.
    fn path_failed(
        &mut self,
        slot: usize,
        why: DownReason,
        now: Instant,
        done: &mut dyn FnMut(Completion),
    ) {
        let Some(cons) = self.drop_path(slot, now, done) else {
            return;
        };
        self.unsent.push(CtlMsg::PathFailed {
            slot,
            epoch: cons[0].epoch,
            reason: why,
            cons,
        });
        self.send_reports();
    }

    /// The control thread tore path `slot` down: its IO moves over and its
    /// connection goes back to be destroyed off the core.
    fn retire(&mut self, slot: usize, now: Instant, done: &mut dyn FnMut(Completion)) {
        if let Some(cons) = self.drop_path(slot, now, done) {
            self.unsent.push(CtlMsg::Retired(cons));
            self.send_reports();
        }
    }

    /// Hands failure reports to the control thread; what its inbox has no
    /// room for waits for the next poll (never dropped).
    fn send_reports(&mut self) {
        while let Some(m) = self.unsent.pop() {
            if let Err(pollers::Full(m)) = self.to_ctl.push(m) {
                self.unsent.push(m);
                return;
            }
        }
    }

    /// Err when the path failed.
    fn on_wc(
        &mut self,
        slot: usize,
        ci: usize,
        wc: Wc,
        done: &mut dyn FnMut(Completion),
    ) -> Result<(), DownReason> {
        let Some(Some(p)) = self.paths.get_mut(slot) else {
            return Ok(());
        };
        let Some(con) = p.cons.get_mut(ci) else {
            return Ok(());
        };
        let cid = con.cid;
        if wc.status != WcStatus::Success {
            return Err(DownReason::Completion {
                cid,
                status: wc.status,
                opcode: wc.opcode,
            });
        }
        if wc.wr_id & WR_KIND != WR_RECV {
            return Ok(());
        }
        let protocol = |what: String| DownReason::Protocol { cid, what };
        p.recvs += 1;
        let rslot = (wc.wr_id & 0xffff_ffff) as u32;
        let mut rkey_rsp = None;
        if wc.opcode == WcOpcode::Recv && wc.with_imm {
            let mut b = [0u8; RkeyRsp::<&[u8]>::LEN];
            con.mem
                .read(rslot as usize * b.len(), &mut b)
                .map_err(|e| protocol(format!("RKEY_RSP slot: {e}")))?;
            let v = RkeyRsp::new_checked(&b[..(wc.byte_len as usize).min(b.len())])
                .map_err(|e| protocol(format!("RKEY_RSP: {e}")))?;
            rkey_rsp = Some((u32::from(v.buf_id()), v.rkey()));
        }
        con.post_recv(rslot).map_err(|e| DownReason::Local {
            cid,
            what: format!("cannot repost a receive: {e}"),
        })?;
        if !wc.with_imm {
            // SEND_WITH_INV: the type-2 response follows.
            if wc.with_inv {
                con.inv_seen = wc.invalidated_rkey;
            }
            return Ok(());
        }
        match Imm::decode_clt(wc.imm) {
            Ok(Imm::IoRsp {
                msg_id,
                errno,
                inval,
            }) => {
                if msg_id >= self.sess.queue_depth {
                    return Err(protocol(format!(
                        "response for chunk {msg_id} >= queue depth"
                    )));
                }
                if let Some((buf_id, rkey)) = rkey_rsp {
                    if buf_id != msg_id {
                        return Err(protocol(format!(
                            "RKEY_RSP for chunk {buf_id} with response {msg_id}"
                        )));
                    }
                    p.path.rbufs[buf_id as usize]
                        .rkey
                        .store(rkey, Ordering::Release);
                }
                let seen = std::mem::take(&mut con.inv_seen);
                self.complete(slot, msg_id, errno, (inval, seen), done);
                Ok(())
            }
            // The kernel answers a heartbeat on whatever connection it came.
            Ok(Imm::HbMsg) => con.post(hb_wr(WR_HB, true)).map_err(|e| DownReason::Local {
                cid,
                what: format!("cannot ack a heartbeat: {e}"),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(protocol(format!("bad immediate {:#010x}: {e}", wc.imm))),
        }
    }

    /// Completes request `msg_id` of path `slot`; `(inval, seen)`: the
    /// response said its read key was invalidated, and the key the
    /// connection's last SEND_WITH_INV named (it comes just before).
    fn complete(
        &mut self,
        slot: usize,
        msg_id: u32,
        errno: i32,
        (inval, seen): (bool, u32),
        done: &mut dyn FnMut(Completion),
    ) {
        let Some(Some(p)) = self.paths.get_mut(slot) else {
            return;
        };
        let req = &mut p.reqs[msg_id as usize];
        let permit = match self.held[msg_id as usize].take() {
            Some(permit) if req.active => permit,
            held => {
                self.held[msg_id as usize] = held;
                tracing::warn!(msg_id, "response for a chunk with no request; ignored");
                return;
            }
        };
        req.active = false;
        let r = *req;
        if r.dir == Dir::Read && r.len > 0 && self.sess.per_io_keys {
            let mr = &p.mem.rd_mrs[msg_id as usize];
            if !(inval && mr.peer_invalidated(seen)) {
                // Not invalidated by the server (not asked: a fabric whose
                // peers cannot; or asked and not done, or another key
                // named): done here before the data is handed out.
                mr.invalidate();
                // A fallback only where we asked (where the peer cannot
                // invalidate, this is the way).
                if r.need_inval {
                    let c = &p.path.cores[self.core as usize];
                    if c.local_invs.load(Ordering::Relaxed) == 0 {
                        tracing::warn!(
                            path = %p.path.addr,
                            "the server did not invalidate a per-IO read key (no SEND_WITH_INV): \
                             invalidating locally (counted in local_invs)"
                        );
                    }
                    bump(&c.local_invs, 1);
                }
            }
        }
        let c = &p.path.cores[self.core as usize];
        bump(&c.inflight, u64::MAX); // -1
        bump(&c.ios, 1);
        bump(&c.bytes, u64::from(r.len));
        if errno != 0 {
            bump(&c.errors, 1);
        }
        let c = Completion {
            permit,
            tag: r.tag,
            errno,
            dir: r.dir,
            len: r.len,
            start: r.start,
        };
        self.deliver(r.remote, c, done);
    }

    /// Hands a completion to its submitter: the callback, or another
    /// thread's ring (sized to the queue depth, so it has room).
    fn deliver(&mut self, remote: Option<u8>, c: Completion, done: &mut dyn FnMut(Completion)) {
        match remote.and_then(|s| self.subs.get_mut(s as usize)) {
            Some(tx) => {
                if let Err(pollers::Full(c)) = tx.push(c) {
                    // Cannot happen (room for every permit); never lose it.
                    done(c);
                }
            }
            None => done(c),
        }
    }

    /// The path's connections on this core are gone: its requests go to
    /// another path (same permit, same chunk id), or fail with
    /// -ECONNABORTED when none is left. Returns the connections.
    fn drop_path(
        &mut self,
        slot: usize,
        now: Instant,
        done: &mut dyn FnMut(Completion),
    ) -> Option<Vec<CltCon<F>>> {
        let _ = now;
        let Some(Some(p)) = self.paths.get_mut(slot) else {
            return None;
        };
        if p.cons.is_empty() {
            return None;
        }
        let cons = std::mem::take(&mut p.cons);
        let path = p.path.clone();
        let c = &path.cores[self.core as usize];
        for buf_id in 0..self.sess.queue_depth {
            let Some(Some(p)) = self.paths.get_mut(slot) else {
                break;
            };
            let req = p.reqs[buf_id as usize];
            if !req.active {
                continue;
            }
            p.reqs[buf_id as usize].active = false;
            bump(&c.inflight, u64::MAX);
            // A read gets a fresh key where it goes (post_on): the old one
            // may still be in use by the failed path's server.
            let moved = self.post_any(buf_id, req, Some(slot));
            if moved.is_ok() {
                bump(&c.failovers, 1);
            } else if let Some(permit) = self.held[buf_id as usize].take() {
                let done_c = Completion {
                    permit,
                    tag: req.tag,
                    errno: -libc::ECONNABORTED,
                    dir: req.dir,
                    len: req.len,
                    start: req.start,
                };
                self.deliver(req.remote, done_c, done);
            }
        }
        Some(cons)
    }

    /// Requests in flight on this core.
    pub fn inflight(&self) -> usize {
        self.paths
            .iter()
            .flatten()
            .map(|p| p.reqs.iter().filter(|q| q.active).count())
            .sum()
    }
}

/// Writes a read's buffer descriptor into its header slot: `mem`'s buffer
/// (of the device the request goes out on) and `key` for it.
fn write_read_desc<F: Fabric>(
    s: &CltSess<F>,
    mem: &PathMem<F>,
    buf_id: u32,
    req: &Req,
    key: u32,
) -> Result<(), CltError> {
    let rd = RdmaReadRepr {
        usr_len: req.usr_len,
        need_inval: req.need_inval,
        desc: Some(SgDesc {
            addr: mem.rd_mrs[buf_id as usize].addr(),
            key,
            len: req.len,
        }),
    };
    let mut b = [0u8; RdmaRead::<&[u8]>::HDR_LEN + SgDesc::LEN];
    let n = rd.emit(&mut b).map_err(CltError::Proto)?;
    s.mem
        .write(s.hdr_off(buf_id) + req.usr_len as usize, &b[..n])?;
    Ok(())
}

impl<F: Fabric> Drop for CltCore<F> {
    fn drop(&mut self) {
        // Connections close with their QPs; permits held by requests in
        // flight are returned so the session's pool stays whole.
        for p in self.held.iter_mut().filter_map(Option::take) {
            self.sess.put_permit(p);
        }
    }
}
