//! What both software backends share: the per-QP bookkeeping of a verbs
//! provider (send-queue shadow, receive queue, completions waiting for the
//! CQ, the error/flush state machine) and the one-core cell that holds it.

use super::super::{
    Access, FabricError, Opcode, QpCap, QpState, RecvWr, Result, SendWr, Sge, Wc, WcOpcode,
    WcStatus,
};
use super::mr::MrTable;
use super::op;
use crate::live::{Kind, Live};
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Largest receive sg list the software backends take.
pub(crate) const MAX_RECV_SGE: usize = 4;

/// A value driven by one core at a time. Borrowing never waits: a second
/// thread gets [`FabricError::Busy`], which is a usage error (a QP and its CQs
/// belong to one core), not contention to wait out.
pub(crate) struct CoreCell<T> {
    busy: AtomicBool,
    val: UnsafeCell<T>,
}

// SAFETY: access to `val` is exclusive: `with` hands out `&mut T` only while it
// holds `busy`, which it takes with an atomic swap and releases when done.
unsafe impl<T: Send> Sync for CoreCell<T> {}

impl<T> CoreCell<T> {
    pub(crate) fn new(val: T) -> CoreCell<T> {
        CoreCell {
            busy: AtomicBool::new(false),
            val: UnsafeCell::new(val),
        }
    }

    /// Runs `f` with exclusive access.
    pub(crate) fn with<R>(&self, what: &'static str, f: impl FnOnce(&mut T) -> R) -> Result<R> {
        if self.busy.swap(true, Ordering::Acquire) {
            return Err(FabricError::Busy(what));
        }
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _release = Release(&self.busy);
        // SAFETY: `busy` was false and is now ours until `_release` drops, so no
        // other `&mut T` exists.
        Ok(f(unsafe { &mut *self.val.get() }))
    }
}

/// The observable state of a QP, readable from any thread.
#[derive(Debug)]
pub(crate) struct SharedState(AtomicU8);

impl SharedState {
    pub(crate) fn new() -> SharedState {
        SharedState(AtomicU8::new(0))
    }
    pub(crate) fn get(&self) -> QpState {
        match self.0.load(Ordering::Acquire) {
            0 => QpState::Init,
            1 => QpState::Rts,
            _ => QpState::Error,
        }
    }
    pub(crate) fn set(&self, s: QpState) {
        let v = match s {
            QpState::Init => 0,
            QpState::Rts => 1,
            QpState::Error => 2,
        };
        self.0.store(v, Ordering::Release);
    }
}

/// One outstanding send work request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SqEntry {
    pub wr_id: u64,
    pub opcode: WcOpcode,
    pub signaled: bool,
    pub byte_len: u32,
    /// Wire sequence number (local operations take the next one without using it).
    pub psn: u64,
    /// Whether it travels on the wire (else it is a local operation).
    pub wire: bool,
}

/// One posted receive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RqEntry {
    pub wr_id: u64,
    pub nsge: u8,
    pub sges: [Sge; MAX_RECV_SGE],
}

impl RqEntry {
    pub(crate) fn sges(&self) -> &[Sge] {
        &self.sges[..usize::from(self.nsge)]
    }
    pub(crate) fn capacity(&self) -> u64 {
        self.sges().iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Per-QP bookkeeping; lives inside the backend's engine, in a [`CoreCell`].
#[derive(Debug)]
pub(crate) struct QpCore {
    pub qp_num: u32,
    pub cap: QpCap,
    pub state: QpState,
    /// Outstanding sends, oldest first.
    pub sq: VecDeque<SqEntry>,
    /// Next wire sequence number.
    pub next_psn: u64,
    pub rq: VecDeque<RqEntry>,
    pub send_wcs: VecDeque<Wc>,
    pub recv_wcs: VecDeque<Wc>,
    /// Outstanding sends someone waits for (signaled, READs, local operations):
    /// while there are none, acknowledgements need not be fetched eagerly.
    pub sq_notify: usize,
}

impl SqEntry {
    /// Whether completing this entry is observable (else it retires silently).
    pub(crate) fn notifies(&self) -> bool {
        self.signaled || !self.wire || self.opcode == WcOpcode::RdmaRead
    }
}

impl QpCore {
    pub(crate) fn new(qp_num: u32, cap: QpCap) -> Result<QpCore> {
        if cap.max_send_wr == 0 || cap.max_recv_wr == 0 {
            return Err(FabricError::InvalidWr(
                "max_send_wr and max_recv_wr must be > 0",
            ));
        }
        if cap.max_recv_sge as usize > MAX_RECV_SGE {
            return Err(FabricError::InvalidWr("max_recv_sge above 4"));
        }
        if cap.max_send_wr > 1 << 20 || cap.max_recv_wr > 1 << 20 {
            return Err(FabricError::InvalidWr("queue depth above 1M entries"));
        }
        let (s, r) = (cap.max_send_wr as usize, cap.max_recv_wr as usize);
        Ok(QpCore {
            qp_num,
            cap,
            state: QpState::Init,
            sq: VecDeque::with_capacity(s),
            next_psn: 0,
            rq: VecDeque::with_capacity(r),
            send_wcs: VecDeque::with_capacity(s),
            recv_wcs: VecDeque::with_capacity(r),
            sq_notify: 0,
        })
    }

    /// Room for one more send (outstanding plus unpolled completions).
    pub(crate) fn sq_room(&self) -> Result<()> {
        if self.sq.len() + self.send_wcs.len() >= self.cap.max_send_wr as usize {
            return Err(FabricError::QueueFull {
                queue: "send",
                depth: self.cap.max_send_wr,
            });
        }
        Ok(())
    }

    /// Queues a receive (checked by the caller for keys).
    pub(crate) fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        if wr.sg_list.len() > self.cap.max_recv_sge as usize {
            return Err(FabricError::InvalidWr(
                "receive sg list longer than max_recv_sge",
            ));
        }
        if self.rq.len() + self.recv_wcs.len() >= self.cap.max_recv_wr as usize {
            return Err(FabricError::QueueFull {
                queue: "recv",
                depth: self.cap.max_recv_wr,
            });
        }
        let mut e = RqEntry {
            wr_id: wr.wr_id,
            nsge: wr.sg_list.len() as u8,
            sges: [Sge::default(); MAX_RECV_SGE],
        };
        e.sges[..wr.sg_list.len()].copy_from_slice(wr.sg_list);
        if self.state == QpState::Error {
            self.recv_wcs.push_back(Wc::new(
                wr.wr_id,
                WcStatus::WrFlushErr,
                WcOpcode::Recv,
                self.qp_num,
            ));
            return Ok(());
        }
        self.rq.push_back(e);
        Ok(())
    }

    /// Records a send; `wire` ones take a sequence number. Returns the psn.
    pub(crate) fn push_sq(
        &mut self,
        wr_id: u64,
        opcode: WcOpcode,
        signaled: bool,
        byte_len: u32,
        wire: bool,
    ) -> u64 {
        let psn = self.next_psn;
        let e = SqEntry {
            wr_id,
            opcode,
            signaled,
            byte_len,
            psn,
            wire,
        };
        self.sq_notify += usize::from(e.notifies());
        self.sq.push_back(e);
        if wire {
            self.next_psn += 1;
        }
        psn
    }

    /// Retires sends the peer has acknowledged: every wire entry below `acked`
    /// and the local ones queued behind them.
    pub(crate) fn retire(&mut self, acked: u64) {
        while let Some(e) = self.sq.front() {
            let done = if e.wire {
                e.psn < acked
            } else {
                e.psn <= acked
            };
            if !done {
                break;
            }
            self.retire_one();
        }
    }

    /// Completes the oldest outstanding send successfully.
    pub(crate) fn retire_one(&mut self) {
        if let Some(e) = self.sq.pop_front() {
            self.sq_notify -= usize::from(e.notifies());
            if e.signaled {
                let mut wc = Wc::new(e.wr_id, WcStatus::Success, e.opcode, self.qp_num);
                wc.byte_len = e.byte_len;
                self.send_wcs.push_back(wc);
            }
        }
    }

    /// A completion for a send that failed before it reached the wire.
    pub(crate) fn fail_now(&mut self, wr_id: u64, opcode: WcOpcode, status: WcStatus) {
        self.send_wcs
            .push_back(Wc::new(wr_id, status, opcode, self.qp_num));
    }

    /// Moves to the error state: `failed_psn` (if any) completes with `status`,
    /// everything else outstanding with `WrFlushErr`.
    pub(crate) fn enter_error(&mut self, failed: Option<(u64, WcStatus)>) {
        if self.state == QpState::Error {
            return;
        }
        self.state = QpState::Error;
        self.sq_notify = 0;
        while let Some(e) = self.sq.pop_front() {
            let status = match failed {
                Some((psn, st)) if e.wire && e.psn == psn => st,
                _ => WcStatus::WrFlushErr,
            };
            let mut wc = Wc::new(e.wr_id, status, e.opcode, self.qp_num);
            wc.byte_len = e.byte_len;
            self.send_wcs.push_back(wc);
        }
        while let Some(r) = self.rq.pop_front() {
            self.recv_wcs.push_back(Wc::new(
                r.wr_id,
                WcStatus::WrFlushErr,
                WcOpcode::Recv,
                self.qp_num,
            ));
        }
    }

    /// Moves the pending completions for one CQ role into `out`.
    pub(crate) fn drain_wcs(&mut self, send: bool, recv: bool, out: &mut [Wc]) -> usize {
        let mut n = 0;
        if send {
            while n < out.len() {
                match self.send_wcs.pop_front() {
                    Some(wc) => {
                        out[n] = wc;
                        n += 1;
                    }
                    None => break,
                }
            }
        }
        if recv {
            while n < out.len() {
                match self.recv_wcs.pop_front() {
                    Some(wc) => {
                        out[n] = wc;
                        n += 1;
                    }
                    None => break,
                }
            }
        }
        n
    }
}

/// A send work request after the checks every software backend makes at
/// post time (see [`QpCore::admit_send`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Post {
    /// Handled: flushed (QP in error), or a local operation queued.
    Done,
    /// A LOCAL_INV of a key we do not own: the QP went to error (everything
    /// flushed, then the LOCAL_INV completed with `LocProtErr`); the backend
    /// winds its transport down.
    Failed,
    /// For the wire.
    Wire(ToWire),
}

/// A request for the wire: `op` (`soft::op`) of `len` payload bytes
/// (`inline`: copied at post time), whose sg entries the backend checks
/// for `need`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ToWire {
    pub op: u8,
    pub len: u32,
    pub inline: bool,
    pub need: Access,
}

impl QpCore {
    /// The post-time checks of both software backends: the QP's state, the
    /// sg list against `max_send_sge`, room in the send queue, the payload
    /// size, inline size against `inline_cap`, and the local operations
    /// (re-key: done in software already; LOCAL_INV of `mrs`' key).
    pub(crate) fn admit_send(
        &mut self,
        wr: &SendWr<'_>,
        mrs: &MrTable,
        inline_cap: usize,
    ) -> Result<Post> {
        let opcode = wr.opcode.wc_opcode();
        match self.state {
            QpState::Init => {
                return Err(FabricError::BadQpState {
                    qp_num: self.qp_num,
                    state: QpState::Init,
                })
            }
            QpState::Error => {
                self.sq_room()?;
                self.fail_now(wr.wr_id, opcode, WcStatus::WrFlushErr);
                return Ok(Post::Done);
            }
            QpState::Rts => {}
        }
        if wr.sg_list.len() > self.cap.max_send_sge as usize {
            return Err(FabricError::InvalidWr("sg list longer than max_send_sge"));
        }
        self.sq_room()?;
        let len = wr.payload_len();
        if len > i32::MAX as u64 {
            return Err(FabricError::InvalidWr("payload above 2 GiB"));
        }
        let len = len as u32;
        let op = match wr.opcode {
            Opcode::Rekey if !wr.signaled && wr.rekey.is_none_or(|r| r.handle == 0) => {
                // `rekey_wr` re-keyed in software already and nobody waits
                // for a completion: nothing to queue. A local entry in the
                // send queue would make every poll read the peer's
                // consumer header until it retires (see `notifies`).
                return Ok(Post::Done);
            }
            Opcode::Rekey => {
                // `rekey_wr` re-keyed in software already: a local no-op.
                self.push_sq(wr.wr_id, opcode, wr.signaled, 0, false);
                return Ok(Post::Done);
            }
            Opcode::LocalInv if !mrs.invalidate_local(wr.invalidate_rkey) => {
                self.enter_error(None);
                self.fail_now(wr.wr_id, opcode, WcStatus::LocProtErr);
                return Ok(Post::Failed);
            }
            Opcode::LocalInv => {
                self.push_sq(wr.wr_id, opcode, wr.signaled, 0, false);
                return Ok(Post::Done);
            }
            Opcode::Send => op::SEND,
            Opcode::SendWithImm => op::SEND_IMM,
            Opcode::SendWithInv => op::SEND_INV,
            Opcode::RdmaWrite => op::WRITE,
            Opcode::RdmaWriteWithImm => op::WRITE_IMM,
            Opcode::RdmaRead => op::READ,
        };
        let inline = wr.inline && wr.opcode != Opcode::RdmaRead;
        if inline && len as usize > inline_cap {
            return Err(FabricError::InvalidWr(
                "inline payload above max_inline_data",
            ));
        }
        let need = if wr.opcode == Opcode::RdmaRead {
            Access::LOCAL_WRITE
        } else {
            Access::NONE
        };
        Ok(Post::Wire(ToWire {
            op,
            len,
            inline,
            need,
        }))
    }
}

/// What a software CQ needs of a backend's QP: whether it is gone, and to
/// drive it and take its completions.
pub trait PolledQp: Send + Sync + 'static {
    /// The QP was destroyed: its CQ forgets it.
    fn destroyed(&self) -> bool;
    /// Drives the QP's transport, then moves up to `out.len()` of its send
    /// and/or receive completions into `out`; returns how many.
    fn progress_into(&self, send: bool, recv: bool, out: &mut [Wc]) -> usize;
    /// Arms the QP (see `Cq::arm`): true when it is quiet and will ring
    /// `wake` when something arrives. The default: never (keep polling).
    fn arm(&self, wake: &std::sync::Arc<pollers::Wake>) -> bool {
        let _ = wake;
        false
    }
}

struct CqEntry<Q> {
    qp: std::sync::Arc<Q>,
    send: bool,
    recv: bool,
}

/// Values the slow path hands to a core: pushed under a lock, taken by the
/// core only when the flag says there are some, so the core's check is one
/// plain load (no locked instruction, no lock) when there are none.
pub(crate) struct Handoff<T> {
    ready: AtomicBool,
    list: std::sync::Mutex<Vec<T>>,
}

impl<T> Default for Handoff<T> {
    fn default() -> Self {
        Handoff {
            ready: AtomicBool::new(false),
            list: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl<T> std::fmt::Debug for Handoff<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handoff(ready {})", self.ready.load(Ordering::Relaxed))
    }
}

impl<T> Handoff<T> {
    /// Hands `v` over.
    pub(crate) fn push(&self, v: T) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(v);
        self.ready.store(true, Ordering::Release);
    }

    /// Appends what was handed over since the last take to `out`.
    pub(crate) fn take_into(&self, out: &mut Vec<T>) {
        if self.ready.load(Ordering::Relaxed) && self.ready.swap(false, Ordering::Acquire) {
            out.append(&mut self.list.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

/// The completion queue of the software backends: the QPs attached to it,
/// polled round-robin (polling drives their transports). QPs are attached
/// from the slow path through a [`Handoff`]: no lock on a poll otherwise.
pub struct SoftCq<Q> {
    id: u64,
    pending: std::sync::Arc<Handoff<CqEntry<Q>>>,
    qps: Vec<CqEntry<Q>>,
    next: usize,
    _live: Live,
}

impl<Q: PolledQp> SoftCq<Q> {
    pub(crate) fn new(id: u64) -> SoftCq<Q> {
        SoftCq {
            id,
            pending: std::sync::Arc::default(),
            // Room for a core's usual QPs, so attaching allocates on the
            // slow path's side only.
            qps: Vec::with_capacity(4),
            next: 0,
            _live: Live::new(Kind::Cq),
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn len(&self) -> usize {
        self.qps.len()
    }

    /// Attaches `qp`'s send and/or receive completions.
    pub(crate) fn attach(&self, qp: &std::sync::Arc<Q>, send: bool, recv: bool) {
        self.pending.push(CqEntry {
            qp: qp.clone(),
            send,
            recv,
        });
    }

    /// Arms every QP on this CQ (see `Cq::arm`); false when one is not
    /// quiet (a QP armed before it stays armed: at worst a spare wake).
    pub(crate) fn arm(&mut self, wake: &std::sync::Arc<pollers::Wake>) -> bool {
        self.pending.take_into(&mut self.qps);
        !self.qps.is_empty() && self.qps.iter().all(|e| !e.qp.destroyed() && e.qp.arm(wake))
    }

    pub(crate) fn poll(&mut self, wcs: &mut [Wc]) -> usize {
        self.pending.take_into(&mut self.qps);
        let n_qps = self.qps.len();
        if n_qps == 0 {
            return 0;
        }
        let mut n = 0;
        let mut dead = false;
        for k in 0..n_qps {
            let entry = &self.qps[(self.next + k) % n_qps];
            if entry.qp.destroyed() {
                dead = true;
                continue;
            }
            n += entry
                .qp
                .progress_into(entry.send, entry.recv, &mut wcs[n..]);
            if n == wcs.len() {
                break;
            }
        }
        self.next = (self.next + 1) % n_qps;
        if dead {
            self.qps.retain(|e| !e.qp.destroyed());
            self.next = 0;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retire_in_order_and_flush() {
        let mut q = QpCore::new(7, QpCap::default()).unwrap();
        q.state = QpState::Rts;
        q.push_sq(1, WcOpcode::Send, true, 8, true); // psn 0
        q.push_sq(2, WcOpcode::RdmaWrite, false, 8, true); // psn 1
        q.push_sq(3, WcOpcode::LocalInv, true, 0, false); // after psn 1
        q.push_sq(4, WcOpcode::RdmaRead, true, 8, true); // psn 2
        q.retire(1);
        let mut out = [Wc::default(); 8];
        assert_eq!(q.drain_wcs(true, false, &mut out), 1);
        assert_eq!(out[0].wr_id, 1);
        q.retire(2); // psn 1 done (unsignaled), local inv behind it done
        assert_eq!(q.drain_wcs(true, false, &mut out), 1);
        assert_eq!((out[0].wr_id, out[0].opcode), (3, WcOpcode::LocalInv));
        q.post_recv(&RecvWr {
            wr_id: 9,
            sg_list: &[],
        })
        .unwrap();
        q.enter_error(Some((2, WcStatus::RemAccessErr)));
        assert_eq!(q.drain_wcs(true, true, &mut out), 2);
        assert_eq!((out[0].wr_id, out[0].status), (4, WcStatus::RemAccessErr));
        assert_eq!((out[1].wr_id, out[1].status), (9, WcStatus::WrFlushErr));
        // Posting a receive in the error state flushes it at once.
        q.post_recv(&RecvWr {
            wr_id: 10,
            sg_list: &[],
        })
        .unwrap();
        assert_eq!(q.drain_wcs(false, true, &mut out), 1);
        assert_eq!(out[0].status, WcStatus::WrFlushErr);
    }

    #[test]
    fn a_done_unsignaled_rekey_queues_nothing() {
        let mrs = MrTable::new(4);
        let mem: std::sync::Arc<dyn crate::Memory> =
            std::sync::Arc::new(crate::soft::Heap::zeroed(64));
        let i = mrs
            .register(mem, 0, 64, Access::REMOTE_WRITE, (0, 0))
            .unwrap();
        let old = mrs.rkey(i);
        let mut q = QpCore::new(7, QpCap::default()).unwrap();
        q.state = QpState::Rts;
        // What a server does: invalidate on the request, re-key (done in
        // software at once) when it answers.
        mrs.invalidate_index(i);
        let new = mrs.rekey(i);
        let r = crate::RekeyWr::done(new);
        let wr = SendWr::rekey(1, r).unsignaled();
        assert!(matches!(q.admit_send(&wr, &mrs, 0), Ok(Post::Done)));
        // Nothing queued, nothing that needs the peer's header read.
        assert!(q.sq.is_empty());
        assert_eq!(q.sq_notify, 0);
        // The keys moved already: the old one fails, the new one works.
        assert_eq!(
            mrs.check_rkey(old, mrs.addr(i), 1, Access::REMOTE_WRITE),
            Err(super::super::mr::KeyError::BadKey)
        );
        assert!(mrs
            .check_rkey(new, mrs.addr(i), 1, Access::REMOTE_WRITE)
            .is_ok());
        // Signaled, it still completes, in order with the sends around it.
        let wr = SendWr::rekey(2, crate::RekeyWr::done(mrs.rekey(i)));
        assert!(matches!(q.admit_send(&wr, &mrs, 0), Ok(Post::Done)));
        assert_eq!(q.sq.len(), 1);
        q.retire(0);
        let mut out = [Wc::default(); 2];
        assert_eq!(q.drain_wcs(true, false, &mut out), 1);
        assert_eq!((out[0].wr_id, out[0].opcode), (2, WcOpcode::Rekey));
        // In the error state it is flushed like any request.
        q.enter_error(None);
        let wr = SendWr::rekey(3, crate::RekeyWr::done(mrs.rekey(i))).unsignaled();
        assert!(matches!(q.admit_send(&wr, &mrs, 0), Ok(Post::Done)));
        assert_eq!(q.drain_wcs(true, false, &mut out), 1);
        assert_eq!((out[0].wr_id, out[0].status), (3, WcStatus::WrFlushErr));
    }

    #[test]
    fn core_cell_refuses_a_second_borrower() {
        let c = CoreCell::new(1u32);
        let r = c.with("x", |v| {
            *v += 1;
            c.with("x", |_| ()).is_err()
        });
        assert!(r.unwrap());
        assert_eq!(c.with("x", |v| *v).unwrap(), 2);
    }
}
