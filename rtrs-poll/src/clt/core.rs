//! A client core: the IO connections of every path on this core, the
//! requests it submitted, and their completions. Owned by one thread (the
//! embedder's core); no lock, no allocation per IO.

use super::con::{CltCon, WR_IO, WR_KIND, WR_RECV};
use super::path::{bump, LinkState};
use super::{CltError, CltSess, IoPermit};
use crate::fabric::memory::bytes_mut;
use crate::fabric::{Fabric, Mr, Qp, SendWr, Sge, Wc, WcOpcode, WcStatus};
use crate::proto::chunk;
use crate::proto::imm::Imm;
use crate::proto::{RdmaReadRepr, RkeyRsp, SgDesc};
use crate::sess::mp_policy::{MpPolicy, PathIter, PathView};
use minstant::Instant;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Direction of a client IO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Data to the server.
    Write,
    /// Data from the server.
    Read,
}

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

#[derive(Clone, Copy)]
struct Req {
    active: bool,
    dir: Dir,
    len: u32,
    usr_len: u16,
    need_inval: bool,
    tag: u64,
    start: Instant,
    /// The submitter (another thread) to hand the completion to.
    remote: Option<u8>,
    /// A write's data in the caller's registered memory (`sg_n` entries);
    /// none: the permit's buffer.
    sg: [Sge; MAX_SG],
    sg_n: u8,
}

/// Most scatter-gather entries of one write's data.
pub const MAX_SG: usize = 8;

/// Longest user header a [`Submitter`] carries inline.
pub const REMOTE_USR_MAX: usize = 64;

/// A request from another thread.
struct RemoteReq {
    sub: u8,
    permit: u32,
    dir: Dir,
    usr: [u8; REMOTE_USR_MAX],
    usr_len: u8,
    len: u32,
    tag: u64,
    start: Instant,
}

/// Submits IO to a core from another thread, through lock-free rings:
/// requests go in over the core's MPSC ring, completions come back over this
/// submitter's own SPSC ring. Made by [`CltCore::submitter`].
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
        self.sess.permits.get(self.core).map(|p| IoPermit(p.0))
    }
    /// Returns a permit.
    pub fn put_permit(&self, p: IoPermit) {
        self.sess.permits.put(crate::sess::permit::Permit(p.0));
    }
    /// The permit's data buffer (as [`CltCore::buf`]).
    pub fn buf(&mut self, p: &mut IoPermit) -> &mut [u8] {
        let s = &self.sess;
        // SAFETY: as in CltCore::buf: the caller holds the permit (`&mut`,
        // not Copy), so no request of it is in flight and no other slice
        // over its buffer exists.
        unsafe { bytes_mut(&*s.mem, s.buf_off(p.0), s.buf_size) }.unwrap_or(&mut [])
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
        if usr.len() > REMOTE_USR_MAX {
            return Err((p, CltError::MsgSize));
        }
        let mut u = [0u8; REMOTE_USR_MAX];
        u[..usr.len()].copy_from_slice(usr);
        let r = RemoteReq {
            sub: self.id,
            permit: p.0,
            dir,
            usr: u,
            usr_len: usr.len() as u8,
            len,
            tag,
            start: Instant::now(),
        };
        self.tx
            .push(r)
            .map_err(|pollers::Full(r)| (IoPermit(r.permit), CltError::Busy))
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

/// Messages from the control loop to a core.
pub(crate) enum CoreMsg<F: Fabric> {
    /// Path `i`'s connection for this core (after (re)connect).
    Con(usize, CltCon<F>),
    /// Path `i` is being torn down: drop its connection, fail its IO over.
    Drop(usize),
}

const WC_BATCH: usize = 32;

/// One core's side of a client session.
pub struct CltCore<F: Fabric> {
    core: u32,
    sess: Arc<CltSess<F>>,
    cons: Vec<Option<CltCon<F>>>,
    reqs: Vec<Box<[Req]>>,
    recvs: Vec<u64>,
    inbox: pollers::spsc::Consumer<CoreMsg<F>>,
    views: Vec<PathView>,
    rr: Option<usize>,
    wcs: [Wc; WC_BATCH],
    scratch: Box<[u8]>,
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
    ) -> CltCore<F> {
        let n = sess.paths.len();
        let qd = sess.queue_depth as usize;
        let idle = Req {
            active: false,
            dir: Dir::Write,
            len: 0,
            usr_len: 0,
            need_inval: false,
            tag: 0,
            start: Instant::now(),
            remote: None,
            sg: [Sge::default(); MAX_SG],
            sg_n: 0,
        };
        let (remote_tx, remote_rx) = pollers::mpsc::channel(qd.max(2));
        CltCore {
            remote_tx,
            remote_rx,
            subs: Vec::new(),
            core,
            cons: (0..n).map(|_| None).collect(),
            reqs: (0..n).map(|_| vec![idle; qd].into_boxed_slice()).collect(),
            recvs: vec![0; n],
            inbox,
            views: vec![PathView::default(); n],
            rr: None,
            wcs: [Wc::default(); WC_BATCH],
            scratch: vec![0u8; sess.max_hdr_size as usize].into_boxed_slice(),
            sess,
        }
    }

    /// Takes the connections the control loop handed over at open (no
    /// other message can be queued then).
    pub(crate) fn absorb_cons(&mut self) {
        while let Some(msg) = self.inbox.pop() {
            if let CoreMsg::Con(i, con) = msg {
                self.cons[i] = Some(con);
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
        self.sess.permits.get(self.core).map(|p| IoPermit(p.0))
    }

    /// Returns a permit to the pool.
    pub fn put_permit(&mut self, p: IoPermit) {
        self.sess.permits.put(crate::sess::permit::Permit(p.0));
    }

    /// The permit's data buffer: fill it before a write, read it after a
    /// read completes. Registered memory; the IO uses it in place.
    pub fn buf(&mut self, p: &mut IoPermit) -> &mut [u8] {
        let s = &self.sess;
        // SAFETY: the buffer belongs to the permit, which the caller holds
        // (`&mut`, not Copy): no request of it is in flight, so no peer
        // writes it, and no other slice over it exists while this borrow
        // of the permit lasts.
        unsafe { bytes_mut(&*s.mem, s.buf_off(p.0), s.buf_size) }.unwrap_or(&mut [])
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
            Dir::Write => 4,
            Dir::Read => 8 + SgDesc::LEN,
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
        // The user header and message go to the permit's header slot.
        if let Err(e) = self.build_tail(p.0, usr, &req) {
            return Err((p, e));
        }
        match self.post_any(p.0, req, None) {
            Ok(()) => Ok(()),
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
                let desc = if req.len > 0 {
                    let key = s.read_key(buf_id)?;
                    Some(SgDesc {
                        addr: s.rd_mrs[buf_id as usize].addr(),
                        key,
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
        for (i, v) in self.views.iter_mut().enumerate() {
            let p = &self.sess.paths[i];
            *v = PathView {
                connected: self.cons[i].is_some() && p.state() == LinkState::Connected,
                inflight: p.inflight(),
                latency: p.latency(),
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
        while let Some(path) = it.next(&self.views, &mut self.rr) {
            match self.post_on(path, buf_id, &req) {
                Ok(()) => {
                    self.reqs[path][buf_id as usize] = req;
                    bump(&self.sess.paths[path].cores[self.core as usize].inflight, 1);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn post_on(&mut self, path: usize, buf_id: u32, req: &Req) -> Result<(), CltError> {
        let s = &self.sess;
        let rbuf = &s.paths[path].rbufs[buf_id as usize];
        let (addr, rkey) = (
            rbuf.addr.load(Ordering::Acquire),
            rbuf.rkey.load(Ordering::Acquire),
        );
        let con = self.cons[path].as_mut().ok_or(CltError::NoPath)?;
        let tail = match req.dir {
            Dir::Write => req.usr_len as u32 + 4,
            Dir::Read => req.usr_len as u32 + 8 + if req.len > 0 { 16 } else { 0 },
        };
        let hdr = s.lmr.sge(s.hdr_off(buf_id), tail);
        let data = s.lmr.sge(s.buf_off(buf_id), req.len);
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
        let wr = if con.signal_next() {
            wr
        } else {
            wr.unsignaled()
        };
        con.qp.post_send(&wr)?;
        Ok(())
    }

    /// Handles what the control loop sent, polls every connection, and calls
    /// `done` for each finished IO. Returns the work done.
    pub fn poll(&mut self, now: Instant, done: &mut dyn FnMut(Completion)) -> usize {
        let mut work = 0;
        while let Some(msg) = self.inbox.pop() {
            work += 1;
            match msg {
                CoreMsg::Con(i, con) => self.cons[i] = Some(con),
                CoreMsg::Drop(i) => self.drop_path(i, now, done),
            }
        }
        for _ in 0..WC_BATCH {
            let Some(r) = self.remote_rx.pop() else { break };
            work += 1;
            let usr = r.usr;
            let res = self.submit(
                IoPermit(r.permit),
                r.dir,
                &usr[..r.usr_len as usize],
                r.len,
                r.tag,
                r.start,
                Some(r.sub),
            );
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
        for path in 0..self.cons.len() {
            let Some(con) = self.cons[path].as_mut() else {
                continue;
            };
            let n = con.poll(&mut self.wcs);
            if n == 0 {
                continue;
            }
            work += n;
            for k in 0..n {
                let wc = self.wcs[k];
                if !self.on_wc(path, wc, now, done) {
                    self.drop_path(path, now, done);
                    break;
                }
            }
            self.sess.paths[path].cores[self.core as usize]
                .recvs
                .store(self.recvs[path], Ordering::Relaxed);
        }
        work
    }

    /// Returns false when the path failed.
    fn on_wc(
        &mut self,
        path: usize,
        wc: Wc,
        now: Instant,
        done: &mut dyn FnMut(Completion),
    ) -> bool {
        // Borrowed, not cloned: no locked increment per completion.
        let p = &*self.sess.paths[path];
        if wc.status != WcStatus::Success {
            p.fail(format_args!(
                "core {}: {:?} completion of {:?}",
                self.core, wc.status, wc.opcode
            ));
            return false;
        }
        if wc.wr_id & WR_KIND != WR_RECV {
            return true;
        }
        self.recvs[path] += 1;
        let slot = (wc.wr_id & 0xffff_ffff) as u32;
        let con = match self.cons[path].as_mut() {
            Some(c) => c,
            None => return false,
        };
        let mut rkey_rsp = None;
        if wc.opcode == WcOpcode::Recv && wc.with_imm {
            let mut b = [0u8; 8];
            if con.mem.read(slot as usize * 8, &mut b).is_err() {
                return false;
            }
            match RkeyRsp::new_checked(&b[..(wc.byte_len as usize).min(8)]) {
                Ok(v) => rkey_rsp = Some((u32::from(v.buf_id()), v.rkey())),
                Err(e) => {
                    p.fail(format_args!("RKEY_RSP: {e}"));
                    return false;
                }
            }
        }
        if let Err(e) = con.post_recv(slot) {
            p.fail(format_args!("cannot repost a receive: {e}"));
            return false;
        }
        if !wc.with_imm {
            return true; // SEND_WITH_INV: the type-2 response follows
        }
        match Imm::decode_clt(wc.imm) {
            Ok(Imm::IoRsp {
                msg_id,
                errno,
                inval,
            }) => {
                if msg_id >= self.sess.queue_depth {
                    p.fail(format_args!("response for chunk {msg_id} >= queue depth"));
                    return false;
                }
                if let Some((buf_id, rkey)) = rkey_rsp {
                    if buf_id != msg_id {
                        p.fail(format_args!(
                            "RKEY_RSP for chunk {buf_id} with response {msg_id}"
                        ));
                        return false;
                    }
                    p.rbufs[buf_id as usize].rkey.store(rkey, Ordering::Release);
                }
                self.complete(path, msg_id, errno, inval, done);
                true
            }
            Ok(Imm::HbMsg) => {
                let con = self.cons[path].as_mut();
                if let Some(con) = con {
                    let wr = SendWr::write_with_imm(super::con::WR_HB, &[], 0, 0, Imm::join(9, 0));
                    let wr = if con.signal_next() {
                        wr
                    } else {
                        wr.unsignaled()
                    };
                    let _ = con.qp.post_send(&wr);
                }
                true
            }
            Ok(_) => true,
            Err(e) => {
                let _ = now;
                p.fail(format_args!("bad immediate {:#010x}: {e}", wc.imm));
                false
            }
        }
    }

    fn complete(
        &mut self,
        path: usize,
        msg_id: u32,
        errno: i32,
        inval: bool,
        done: &mut dyn FnMut(Completion),
    ) {
        let req = &mut self.reqs[path][msg_id as usize];
        if !req.active {
            tracing::warn!(msg_id, "response for a chunk with no request; ignored");
            return;
        }
        req.active = false;
        let r = *req;
        if r.dir == Dir::Read && r.len > 0 && !inval && self.sess.per_io_keys {
            // The server did not invalidate our buffer: do it locally.
            self.sess.rd_mrs[msg_id as usize].invalidate();
        }
        let c = &self.sess.paths[path].cores[self.core as usize];
        bump(&c.inflight, u64::MAX); // -1
        bump(&c.ios, 1);
        bump(&c.bytes, u64::from(r.len));
        if errno != 0 {
            bump(&c.errors, 1);
        }
        let c = Completion {
            permit: IoPermit(msg_id),
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

    /// The path's connection on this core is gone: its requests go to
    /// another path (same permit, same chunk id), or fail with
    /// -ECONNABORTED when none is left.
    fn drop_path(&mut self, path: usize, now: Instant, done: &mut dyn FnMut(Completion)) {
        let _ = now;
        if self.cons[path].take().is_none() {
            return;
        }
        let sess = self.sess.clone();
        let c = &sess.paths[path].cores[self.core as usize];
        for buf_id in 0..sess.queue_depth {
            let req = self.reqs[path][buf_id as usize];
            if !req.active {
                continue;
            }
            self.reqs[path][buf_id as usize].active = false;
            bump(&c.inflight, u64::MAX);
            // A read gets a fresh key: the old one may still be in use by
            // the failed path's server.
            let rebuilt = match req.dir {
                Dir::Read => self.rebuild_read(buf_id, &req),
                Dir::Write => Ok(()),
            };
            let moved = rebuilt.and_then(|()| self.post_any(buf_id, req, Some(path)));
            if moved.is_ok() {
                bump(&c.failovers, 1);
            } else {
                let done_c = Completion {
                    permit: IoPermit(buf_id),
                    tag: req.tag,
                    errno: -libc::ECONNABORTED,
                    dir: req.dir,
                    len: req.len,
                    start: req.start,
                };
                self.deliver(req.remote, done_c, done);
            }
        }
    }

    /// Re-keys a read's buffer and rewrites its descriptor in the header slot.
    fn rebuild_read(&mut self, buf_id: u32, req: &Req) -> Result<(), CltError> {
        if req.len == 0 {
            return Ok(());
        }
        let s = &self.sess;
        let mr = &s.rd_mrs[buf_id as usize];
        let key = s.read_key(buf_id)?;
        let rd = RdmaReadRepr {
            usr_len: req.usr_len,
            need_inval: req.need_inval,
            desc: Some(SgDesc {
                addr: mr.addr(),
                key,
                len: req.len,
            }),
        };
        let mut b = [0u8; 24];
        let n = rd.emit(&mut b).map_err(CltError::Proto)?;
        s.mem
            .write(s.hdr_off(buf_id) + req.usr_len as usize, &b[..n])?;
        Ok(())
    }

    /// Requests in flight on this core.
    pub fn inflight(&self) -> usize {
        self.reqs
            .iter()
            .map(|r| r.iter().filter(|q| q.active).count())
            .sum()
    }
}

impl<F: Fabric> Drop for CltCore<F> {
    fn drop(&mut self) {
        // Connections close with their QPs; permits held by requests in
        // flight are returned so the session's pool stays whole.
        for path in &self.reqs {
            for (i, r) in path.iter().enumerate() {
                if r.active {
                    self.sess.permits.put(crate::sess::permit::Permit(i as u32));
                }
            }
        }
    }
}
