//! One server connection (a cid of a path): its QP and CQ, the IO requests
//! that arrive on it, the handler's answers, and for cid 0 the INFO exchange
//! and the heartbeat. IO connections run on cores as pollers; cid 0 runs on
//! the server's control loop. The code is the same.

use super::deferred::{AnswersRx, Req};
use super::path::{PathState, SrvPath};
use super::{Handler, IoDir, IoId, SrvIo, Verdict};
use crate::sess::hb::{hb_wr, HbAction, Heartbeat, Signal};
use crate::sess::DownReason;
use minstant::Instant;
use rtrs_fabric::{Cq, Fabric, Memory, Mr, Qp, RecvWr, SendWr, Wc, WcOpcode, WcStatus};
use rtrs_proto::chunk::{self, IoReqKind};
use rtrs_proto::imm::{io_rsp, Imm};
use rtrs_proto::{check_sessname, InfoReq, InfoRspRepr, RkeyRspRepr, SgDesc};
use std::sync::Arc;
use std::time::Duration;

/// wr_id kinds (top byte); the low bits carry the chunk id where there is one.
pub(crate) const WR_RECV: u64 = 1 << 56;
pub(crate) const WR_INFO_REQ: u64 = 2 << 56;
pub(crate) const WR_INFO_RSP: u64 = 3 << 56;
pub(crate) const WR_RSP: u64 = 4 << 56;
pub(crate) const WR_DATA: u64 = 5 << 56;
pub(crate) const WR_HB: u64 = 6 << 56;

/// How early before a client's heartbeat is due the control thread polls
/// cid 0 closely (once it took one on time), and how long after it stops.
const HB_WATCH_EARLY: Duration = Duration::from_millis(2);
const HB_WATCH_LATE: Duration = Duration::from_millis(8);

/// An RKEY_RSP, as each IO connection's per-chunk slot holds it.
pub(crate) const RKEY_RSP_LEN: usize = rtrs_proto::RkeyRsp::<&[u8]>::LEN;

/// The receive buffer for INFO_REQ, at offset 0 of cid 0's buffers.
pub(crate) const INFO_REQ_LEN: usize = InfoReq::<&[u8]>::LEN;

const WC_BATCH: usize = 32;
/// Heartbeat timer and liveness checks run once per this many polls.
const SLOW_CHECK_EVERY: u32 = 4096;
/// An IO connection with nothing to do for this long parks (when its fabric
/// can wake it): it costs its core nothing until the peer sends.
const PARK_AFTER_IDLE: Duration = Duration::from_millis(5);
/// A parked connection still looks at its path this often (a path closed
/// by the control thread does not ring the wake).
const PARKED_RECHECK: Duration = Duration::from_millis(50);

/// What a request in the handler's hands needs at response time.
#[derive(Default)]
struct Inflight {
    /// The chunk, claimed while the request is in the handler's hands.
    claim: Option<mempool::Claim>,
    /// A read: the client buffer, and whether to invalidate its key.
    read: Option<(SgDesc, bool)>,
    /// The poll that took the request (for its latency).
    taken: Option<Instant>,
    /// The handler deferred it: its chunk is a `Deferred`'s until answered.
    deferred: bool,
}

impl Inflight {
    /// The request is the handler's (or its Deferred's) still.
    fn busy(&self) -> bool {
        self.claim.is_some() || self.deferred
    }
}

/// A server connection.
pub struct SrvCon<F: Fabric, H: Handler> {
    pub(crate) path: Arc<SrvPath<F>>,
    pub(crate) cid: u16,
    qp: F::Qp,
    cq: F::Cq,
    /// cid 0: [INFO_REQ receive][INFO_RSP send]; IO cids with
    /// always_invalidate: one 8-byte RKEY_RSP slot per chunk.
    mem: Arc<dyn Memory>,
    mr: F::Mr,
    handler: H,
    /// Deferred requests' answers (after `handler`: tokens the handler
    /// holds answer into it as it drops, and it releases their chunks).
    answers: AnswersRx,
    /// `answers.dropped()` as last counted.
    dropped_seen: u64,
    wcs: [Wc; WC_BATCH],
    inflight: Box<[Inflight]>,
    /// Requests whose chunk another connection still holds (a request the
    /// client sent again on this path after another path failed, while
    /// that path's handler is not done with it): taken in order once free.
    waiting: std::collections::VecDeque<(u32, u32)>,
    signal: Signal,
    hb: Option<Heartbeat>,
    /// The client's beats: when the last one arrived and how far apart
    /// they come, so the control thread can be polling when the next one
    /// lands and answer it at once (its RTT steers min-latency).
    peer_hb: Option<(Instant, Option<Duration>)>,
    /// The control thread is polling closely for the next beat.
    watching: bool,
    /// The last beat was taken while watching: its time is exact, not
    /// a tick late, so the next window can be narrow.
    hb_locked: bool,
    seen_recvs: u64,
    recvs: u64,
    polls: u32,
    done: bool,
    /// When this connection last did work (parks after [`PARK_AFTER_IDLE`]).
    last_work: Instant,
    /// Rung by the fabric when a parked connection's peer sends.
    wake: Option<Arc<pollers::Wake>>,
}

impl<F: Fabric, H: Handler> std::fmt::Debug for SrvCon<F, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrvCon")
            .field("path", &self.path)
            .field("cid", &self.cid)
            .finish()
    }
}

impl<F: Fabric, H: Handler> SrvCon<F, H> {
    /// A connection over `qp`/`cq` (receives not yet posted).
    pub(crate) fn new(
        path: Arc<SrvPath<F>>,
        cid: u16,
        qp: F::Qp,
        cq: F::Cq,
        mem: Arc<dyn Memory>,
        mr: F::Mr,
        handler: H,
    ) -> SrvCon<F, H> {
        let qd = path.queue_depth as usize;
        let chunks = path.chunks.clone();
        SrvCon {
            signal: Signal::for_queue_depth(path.queue_depth),
            path,
            cid,
            qp,
            cq,
            mem,
            mr,
            handler,
            answers: AnswersRx::new(chunks, qd),
            dropped_seen: 0,
            wcs: [Wc::default(); WC_BATCH],
            inflight: (0..qd).map(|_| Inflight::default()).collect(),
            waiting: std::collections::VecDeque::with_capacity(qd),
            hb: None,
            peer_hb: None,
            watching: false,
            hb_locked: false,
            seen_recvs: 0,
            recvs: 0,
            polls: 0,
            done: false,
            last_work: Instant::now(),
            wake: None,
        }
    }

    /// Posts what a new connection receives into: cid 0 one INFO_REQ buffer,
    /// an IO cid one zero-length receive per chunk.
    pub(crate) fn post_initial_recvs(&mut self) -> rtrs_fabric::Result<()> {
        if self.cid == 0 {
            let sge = [self.mr.sge(0, INFO_REQ_LEN as u32)];
            self.qp.post_recv(&RecvWr {
                wr_id: WR_INFO_REQ,
                sg_list: &sge,
            })
        } else {
            for _ in 0..self.path.queue_depth {
                self.post_recv()?;
            }
            Ok(())
        }
    }

    /// The QP, for the CM's accept.
    pub(crate) fn qp(&self) -> &F::Qp {
        &self.qp
    }

    fn post_recv(&mut self) -> rtrs_fabric::Result<()> {
        self.qp.post_recv(&RecvWr {
            wr_id: WR_RECV,
            sg_list: &[],
        })
    }

    fn close(&mut self, why: DownReason) {
        self.path.close(why);
        self.done = true;
    }

    fn protocol(&mut self, what: String) {
        let cid = self.cid;
        self.close(DownReason::Protocol { cid, what });
    }

    fn local(&mut self, what: String) {
        let cid = self.cid;
        self.close(DownReason::Local { cid, what });
    }

    /// When the heartbeat timer runs next (cid 0 once connected).
    pub(crate) fn hb_deadline(&self) -> Option<Instant> {
        self.hb.as_ref().map(Heartbeat::poll_timeout)
    }

    /// When to poll closely for the client's next heartbeat (once two were
    /// seen): from a little before it is due (a tick before, until one was
    /// taken on time) to a little after.
    pub(crate) fn peer_hb_window(&self) -> Option<(Instant, Instant)> {
        let (at, period) = self.peer_hb?;
        let due = at + period?;
        let early = if self.hb_locked {
            HB_WATCH_EARLY
        } else {
            HB_WATCH_EARLY + crate::sess::CONTROL_TICK
        };
        Some((due - early, due + HB_WATCH_LATE))
    }

    /// The control thread polls closely now (or stopped).
    pub(crate) fn set_watching(&mut self, on: bool) {
        self.watching = on;
    }

    /// Whether the control thread polls closely now.
    pub(crate) fn watching(&self) -> bool {
        self.watching
    }

    fn on_peer_hb(&mut self, now: Instant) {
        self.hb_locked = self.watching;
        let period = self.peer_hb.map(|(last, period)| {
            let d = now.saturating_duration_since(last);
            // A smoothed period: one late beat does not move it much.
            period.map_or(d, |p| (p * 3 + d) / 4)
        });
        self.peer_hb = Some((now, period));
    }

    /// Polls the CQ and the handler; returns the work done.
    pub fn poll_at(&mut self, now: Instant) -> usize {
        if self.done {
            return 0;
        }
        self.polls = self.polls.wrapping_add(1);
        // cid 0 is polled by the control thread, at its pace: check it at
        // every poll; IO connections look at the path now and then.
        if self.cid == 0 || self.polls % SLOW_CHECK_EVERY == 0 {
            self.slow_checks(now);
            if self.done {
                return 0;
            }
        }
        let n = self.cq.poll(&mut self.wcs);
        // The core's clock is lazy (its `now` may be some idle iterations
        // old): completions, whose requests are stamped for the latency
        // histogram, get a fresh read; a poll that finds none reads none.
        let stamp = if n > 0 { pollers::clock::now() } else { now };
        for i in 0..n {
            let wc = self.wcs[i];
            self.on_wc(wc, now, stamp);
            if self.done {
                return n;
            }
        }
        let mut work = n + self.handler.poll();
        while let Some(a) = self.answers.pop() {
            let buf_id = a.claim.index();
            match self.inflight.get_mut(buf_id as usize) {
                Some(slot) if slot.deferred && slot.claim.is_none() => {
                    slot.deferred = false;
                    slot.claim = Some(a.claim);
                    self.respond(buf_id, a.errno);
                }
                _ => {
                    // Not possible (a claim is exclusive): kept safe anyway.
                    tracing::error!(
                        buf_id,
                        "an answer for a request not deferred; chunk released"
                    );
                    if let Err(e) = self.path.chunks.release(a.claim) {
                        tracing::error!("releasing chunk {buf_id}: {e}");
                    }
                }
            }
            work += 1;
            if self.done {
                return work;
            }
        }
        if !self.waiting.is_empty() {
            work += self.take_waiting();
        }
        if n > 0 {
            self.path.note_recvs(self.cid, self.recvs);
        }
        if work > 0 {
            self.last_work = now;
        }
        work
    }

    /// Whether this IO connection may stop being polled: idle for a while,
    /// nothing in the handler's hands or waiting, and its CQ armed to ring
    /// the wake when the client sends. Returns until when it may stay parked.
    fn try_park(&mut self, now: Instant, bell: &Arc<pollers::Bell>) -> Option<Instant> {
        if self.done
            || self.cid == 0
            || now.saturating_duration_since(self.last_work) < PARK_AFTER_IDLE
            || !self.waiting.is_empty()
            || self.inflight.iter().any(Inflight::busy)
        {
            return None;
        }
        // Allocated once, on the first park (off the per-IO path).
        let wake = self.wake.get_or_insert_with(|| pollers::Wake::new(bell));
        // A ring from before (the peer sent while we were polling) is stale.
        wake.take();
        if !self.cq.arm(wake) {
            return None;
        }
        Some(now + PARKED_RECHECK)
    }

    /// A parked connection: back to polling when the client sent or its
    /// path is closing.
    fn try_unpark(&mut self, now: Instant) -> Option<Instant> {
        let rang = self.wake.as_ref().is_some_and(|w| w.take());
        if rang || self.path.state() >= PathState::Closing {
            self.last_work = now;
            return None;
        }
        Some(now + PARKED_RECHECK)
    }

    /// Deferreds dropped without `complete` since the last look, into the
    /// connection's `handler_faults`.
    fn count_dropped(&mut self) {
        let d = self.answers.dropped();
        if d > self.dropped_seen {
            self.path
                .stats
                .on_handler_faults_at(self.cid, d - self.dropped_seen);
            self.dropped_seen = d;
        }
    }

    fn slow_checks(&mut self, now: Instant) {
        self.count_dropped();
        if self.path.state() >= PathState::Closing {
            self.done = true;
            return;
        }
        let Some(hb) = self.hb.as_mut() else { return };
        let seen = self.path.recvs_total();
        if seen != self.seen_recvs {
            self.seen_recvs = seen;
            hb.on_recv();
        }
        let action = hb.handle_timeout(now);
        self.path.set_heartbeats_missed(hb.missed());
        match action {
            HbAction::Wait => {}
            HbAction::Send => {
                if let Err(e) = self.post(hb_wr(WR_HB, false)) {
                    self.local(format!("cannot send a heartbeat: {e}"));
                }
            }
            HbAction::Dead => {
                let missed = hb.missed();
                self.close(DownReason::Heartbeat { missed });
            }
        }
    }

    fn post(&mut self, wr: SendWr<'_>) -> rtrs_fabric::Result<()> {
        let wr = self.signal.apply(wr);
        self.qp.post_send(&wr)
    }

    /// A completion, at `now` (the protocol's time: heartbeats) with
    /// requests stamped `stamp` (a fresh clock read, for their latency).
    fn on_wc(&mut self, wc: Wc, now: Instant, stamp: Instant) {
        if wc.status != WcStatus::Success {
            if self.path.state() < PathState::Closing {
                self.close(DownReason::Completion {
                    cid: self.cid,
                    status: wc.status,
                    opcode: wc.opcode,
                });
            }
            self.done = true;
            return;
        }
        match wc.opcode {
            WcOpcode::RecvRdmaWithImm => {
                self.recvs += 1;
                if let Err(e) = self.post_recv() {
                    return self.local(format!("cannot repost a receive: {e}"));
                }
                match self.path.layout.decode_srv(wc.imm) {
                    Ok(Imm::IoReq { buf_id, off }) => self.on_request(buf_id, off, stamp),
                    Ok(Imm::HbMsg) => {
                        if let Err(e) = self.post(hb_wr(WR_HB, true)) {
                            self.local(format!("cannot ack a heartbeat: {e}"));
                        }
                        self.on_peer_hb(now);
                    }
                    Ok(Imm::HbAck) => {
                        if let Some(hb) = self.hb.as_mut() {
                            hb.on_ack(now);
                        }
                    }
                    Ok(Imm::IoRsp { .. }) | Err(_) => {
                        self.protocol(format!("bad immediate {:#010x}", wc.imm));
                    }
                }
            }
            WcOpcode::Recv if wc.wr_id == WR_INFO_REQ => self.on_info_req(wc.byte_len, now),
            WcOpcode::Recv => self.protocol("unexpected SEND from the client".into()),
            _ => {}
        }
    }

    fn on_info_req(&mut self, byte_len: u32, now: Instant) {
        let path = self.path.clone();
        if path.cons_created() < u32::from(path.cid_num) {
            return self.protocol(format!(
                "INFO_REQ before all {} connections were made",
                path.cid_num
            ));
        }
        let mut req = [0u8; INFO_REQ_LEN];
        let n = (byte_len as usize).min(INFO_REQ_LEN);
        if let Err(e) = self.mem.read(0, &mut req[..n]) {
            return self.local(format!("INFO_REQ: {e}"));
        }
        let buf = &req[..n];
        let name = match InfoReq::new_checked(buf) {
            Ok(v) => match check_sessname(v.sessname()) {
                Ok(()) => v.sessname().to_string(),
                Err(e) => return self.protocol(format!("INFO_REQ: {e}")),
            },
            Err(e) => return self.protocol(format!("INFO_REQ: {e}")),
        };
        path.set_sessname(name);
        for _ in 0..rtrs_proto::SERVICE_CON_QUEUE_DEPTH {
            if let Err(e) = self.post_recv() {
                return self.local(format!("cannot post cid 0 receives: {e}"));
            }
        }
        if !path.set_connected() {
            return self.protocol("INFO_REQ on a path that is not connecting".into());
        }
        self.hb = Some(Heartbeat::start(now, path.hb_interval, path.hb_missed_max));
        let descs = path.descs();
        let rsp = InfoRspRepr { descs: &descs };
        let len = rsp.buffer_len();
        let mut out = vec![0u8; len];
        if let Err(e) = rsp.emit(&mut out) {
            return self.local(format!("INFO_RSP: {e}"));
        }
        if let Err(e) = self.mem.write(INFO_REQ_LEN, &out) {
            return self.local(format!("INFO_RSP: {e}"));
        }
        let sge = [self.mr.sge(INFO_REQ_LEN, len as u32)];
        if let Err(e) = self.qp.post_send(&SendWr::send(WR_INFO_RSP, &sge)) {
            self.local(format!("cannot send INFO_RSP: {e}"));
        }
    }

    fn on_request(&mut self, buf_id: u32, off: u32, now: Instant) {
        // No Arc clone per IO: a locked increment would wait for the
        // handler's stores to drain. Fields are borrowed one by one instead.
        let path = &*self.path;
        if path.state() != PathState::Connected {
            return; // the kernel drops requests on a path that is not connected
        }
        if self.inflight[buf_id as usize].claim.is_some() {
            return self.protocol(format!("request for chunk {buf_id}, which is in use"));
        }
        match path.chunks.claim(buf_id) {
            Some(claim) => self.serve(buf_id, off, claim, now),
            // Another connection of the session still holds the chunk: the
            // client sent the request again here after another path failed,
            // before that path's handler was done with it. It waits.
            None if self.waiting.len() < self.inflight.len() => {
                self.waiting.push_back((buf_id, off))
            }
            None => self.protocol(format!("request for chunk {buf_id}, which is in use")),
        }
    }

    /// Serves the requests that waited for their chunks, in order, as far
    /// as the chunks are free; returns how many.
    fn take_waiting(&mut self) -> usize {
        let mut n = 0;
        while let Some(&(buf_id, off)) = self.waiting.front() {
            let Some(claim) = self.path.chunks.claim(buf_id) else {
                break;
            };
            self.waiting.pop_front();
            // Rare (a request sent again after another path failed).
            self.serve(buf_id, off, claim, pollers::clock::now());
            n += 1;
            if self.done {
                break;
            }
        }
        n
    }

    /// Hands the request in claimed chunk `buf_id` to the handler.
    fn serve(&mut self, buf_id: u32, off: u32, claim: mempool::Claim, now: Instant) {
        // With always_invalidate the chunk's key changes in the response
        // chain (`try_respond`): the request that makes the new key valid
        // kills the old one, in the same post as the RKEY_RSP that hands the
        // new one out, so an IO costs no post (and no syscall) of its own
        // for it. The client owns the chunk until that response (it holds
        // the permit): it can reach the chunk while its own request is in
        // the handler, never after the response (docs/security.md).
        let path = &*self.path;
        let chunks = &*path.chunks;
        let parsed = match chunks.bytes(&claim, 0..path.chunk_size) {
            None => Err(format!("chunk {buf_id} is not this session's")),
            Some(chunk_bytes) => match chunk::parse(chunk_bytes, off) {
                Ok(r) => Ok(match r.kind {
                    IoReqKind::Write { data } => (r.usr.len(), data.len(), IoDir::Write, None),
                    IoReqKind::Read { msg, .. } => {
                        let d = msg.descs().get(0);
                        let len = d.map_or(0, |d| d.len as usize);
                        (r.usr.len(), len, IoDir::Read, Some((d, msg.need_inval())))
                    }
                }),
                Err(e) => Err(format!("chunk {buf_id}, offset {off}: {e}")),
            },
        };
        let (usr_len, data_len, dir, read) = match parsed {
            Ok(v) => v,
            Err(what) => {
                if let Err(e) = chunks.release(claim) {
                    tracing::error!("releasing chunk {buf_id}: {e}");
                }
                return self.protocol(what);
            }
        };
        path.stats.on_request_at(self.cid, dir, data_len);
        let usr_at = off as usize - usr_len;
        // [0, data_len) and [usr_at, off) do not overlap (data_len <= usr_at:
        // a write's data ends where its header starts, a read's length was
        // checked against its reserved room); split checks it again.
        let mut claim = Some(claim);
        let req = Req {
            id: IoId(buf_id),
            dir,
            usr: usr_at..off as usize,
            data: 0..data_len,
        };
        let verdict = match SrvIo::new(req, &mut claim, chunks, &self.answers) {
            Some(io) => self.handler.on_io(io),
            None => Verdict::Done(-libc::EIO),
        };
        let deferred = claim.is_none();
        self.inflight[buf_id as usize] = Inflight {
            claim,
            read: read.and_then(|(d, inv)| d.map(|d| (d, inv))),
            taken: Some(now),
            deferred,
        };
        match (verdict, deferred) {
            (Verdict::Done(errno), false) => self.respond(buf_id, errno),
            (Verdict::Later, true) => {}
            (Verdict::Done(_), true) => {
                // The token answers; the verdict cannot.
                tracing::warn!(
                    buf_id,
                    "a handler deferred a request and also answered it Done: the Deferred answers"
                );
            }
            (Verdict::Later, false) => {
                path.stats.on_handler_faults_at(self.cid, 1);
                tracing::warn!(
                    buf_id,
                    "a handler answered Later without deferring the request: -EIO"
                );
                self.respond(buf_id, -libc::EIO);
            }
        }
    }

    /// Posts the response chain for chunk `buf_id` (spec §5.5).
    fn respond(&mut self, buf_id: u32, errno: i32) {
        if let Err(why) = self.try_respond(buf_id, errno) {
            self.local(format!("response for chunk {buf_id}: {why}"));
        }
    }

    fn try_respond(&mut self, buf_id: u32, errno: i32) -> Result<(), RespondError> {
        let Some(slot) = self.inflight.get_mut(buf_id as usize) else {
            return Ok(());
        };
        let Some(claim) = slot.claim.take() else {
            tracing::warn!(buf_id, "handler completed an IO twice; ignored");
            return Ok(());
        };
        let read = slot.read.take();
        let path = &*self.path;
        if let Some(t) = slot.taken.take() {
            // One TSC read per IO: residence time from the poll that took it.
            let ns = pollers::clock::now()
                .saturating_duration_since(t)
                .as_nanos() as u64;
            path.stats.con(self.cid).lat.record(ns);
        }
        // The chunk is free again before the client can hear so: it may
        // send the next request on it the moment the response lands.
        if let Err(e) = path.chunks.release(claim) {
            tracing::error!("releasing chunk {buf_id}: {e}");
        }
        path.stats.on_response_at(self.cid);
        if path.state() != PathState::Connected {
            return Ok(());
        }
        let errno = clamp_errno(errno);
        if errno != 0 {
            path.stats.on_error_at(self.cid);
        }
        let inv_key = read.and_then(|(d, inv)| inv.then_some(d.key));
        let imm = io_rsp(buf_id, errno, inv_key.is_some()).map_err(RespondError::Proto)?;
        let data_sge;
        let slot_sge;
        let mut wrs: [SendWr<'_>; 4] = [SendWr::local_inv(0, 0); 4];
        let mut n = 0;
        // With always_invalidate the chunk gets its new key first, in the
        // same chain as the RKEY_RSP that hands it out (the kernel's REG_MR).
        let rekey = if path.always_invalidate {
            let r = path.mrs[buf_id as usize]
                .rekey_wr()
                .map_err(RespondError::Rekey)?;
            wrs[n] = SendWr::rekey(WR_DATA, r).unsignaled();
            n += 1;
            Some(r.rkey)
        } else {
            None
        };
        if let (0, Some((d, _))) = (errno, read) {
            data_sge = [path.data_sge(buf_id, d.len)];
            wrs[n] = SendWr::write(WR_DATA, &data_sge, d.addr, d.key).unsignaled();
            n += 1;
        }
        if let Some(key) = inv_key {
            wrs[n] = SendWr::send_with_inv(WR_DATA, &[], key).unsignaled();
            n += 1;
        }
        let last = if let Some(rkey) = rekey {
            let at = buf_id as usize * RKEY_RSP_LEN;
            let mut msg = [0u8; RKEY_RSP_LEN];
            let _ = RkeyRspRepr {
                buf_id: buf_id as u16,
                rkey,
            }
            .emit(&mut msg);
            self.mem.write(at, &msg).map_err(RespondError::Fabric)?;
            slot_sge = [self.mr.sge(at, RKEY_RSP_LEN as u32)];
            SendWr::send_with_imm(WR_RSP | u64::from(buf_id), &slot_sge, imm).inlined()
        } else {
            SendWr::write_with_imm(WR_RSP | u64::from(buf_id), &[], 0, 0, imm)
        };
        wrs[n] = self.signal.apply(last);
        n += 1;
        self.qp
            .post_send_batch(&wrs[..n])
            .map_err(RespondError::Fabric)
    }
}

/// Why a response could not be posted (the path then closes).
#[derive(Debug, thiserror::Error)]
enum RespondError {
    #[error("{0}")]
    Proto(rtrs_proto::ProtoError),
    #[error("cannot re-key the chunk: {0}")]
    Rekey(rtrs_fabric::FabricError),
    #[error("{0}")]
    Fabric(rtrs_fabric::FabricError),
}

/// The errno an IO response can carry: 0 or negative, magnitude <= 511
/// (anything else becomes -EIO).
fn clamp_errno(errno: i32) -> i32 {
    let e = -(errno.unsigned_abs() as i64);
    if e < -(rtrs_proto::imm::MAX_RSP_ERRNO as i64) {
        -libc::EIO
    } else {
        e as i32
    }
}

impl<F: Fabric, H: Handler> Drop for SrvCon<F, H> {
    fn drop(&mut self) {
        // Chunks whose requests never got a response are free for the
        // session's other connections, once the handler no longer touches
        // them (a deferred request's data may be under IO still).
        if self.inflight.iter().any(Inflight::busy) {
            self.handler.quiesce();
        }
        self.count_dropped();
        for c in self.inflight.iter_mut().filter_map(|s| s.claim.take()) {
            if let Err(e) = self.path.chunks.release(c) {
                tracing::error!("releasing a chunk: {e}");
            }
        }
    }
}

impl<F: Fabric, H: Handler> pollers::Poller for SrvCon<F, H> {
    fn poll(&mut self, now: Instant) -> usize {
        self.poll_at(now)
    }
    fn drain(&mut self, now: Instant) -> bool {
        self.poll_at(now);
        self.done || !self.inflight.iter().any(Inflight::busy)
    }
    fn name(&self) -> &str {
        "srv-con"
    }
    fn finished(&self) -> bool {
        self.done
    }
    fn park(&mut self, now: Instant, bell: &Arc<pollers::Bell>) -> Option<Instant> {
        self.try_park(now, bell)
    }
    fn woken(&mut self, now: Instant) -> Option<Instant> {
        self.try_unpark(now)
    }
}
