//! The wrapped QP: posts go to the backend's QP unless a fault says
//! otherwise, and every post is recorded so a kill can flush it.

use super::cq::CqShared;
use super::link::{bit, Ctr, LinkState, Side, BLACK_HOLE};
use super::ring::{meta, Producer, WrRing, FLUSH, SWALLOWED};
use crate::{Fabric, FabricError, Opcode, Qp, QpCap, QpState, RecvWr, Result, SendWr, WcOpcode};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

const ALIVE: u8 = 0;
/// The wrapped QP reported an error: it is in the error state itself.
const FAILED: u8 = 1;
/// A fault killed or failed it.
const KILLED: u8 = 2;

/// What the QP, its CQs and the link's handle share.
#[derive(Debug)]
pub(super) struct QpShared {
    qp_num: u32,
    pub(super) sq: WrRing,
    pub(super) rq: WrRing,
    /// Set once, by the CM, when the QP connects or is accepted.
    link: OnceLock<(Arc<LinkState>, Side)>,
    dead: AtomicU8,
    destroyed: AtomicBool,
    send_cq: Arc<CqShared>,
    recv_cq: Arc<CqShared>,
}

impl QpShared {
    pub(super) fn qp_num(&self) -> u32 {
        self.qp_num
    }

    pub(super) fn ring(&self, recv: bool) -> &WrRing {
        if recv {
            &self.rq
        } else {
            &self.sq
        }
    }

    pub(super) fn link(&self) -> Option<&(Arc<LinkState>, Side)> {
        self.link.get()
    }

    /// Puts the QP on `link` as `side` (its first connect or accept only).
    pub(super) fn set_link(self: &Arc<Self>, link: &Arc<LinkState>, side: Side) {
        if self.link.set((link.clone(), side)).is_ok() {
            link.register(side, self);
        }
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed) != ALIVE
    }

    /// Whether a fault killed it (its flushes count).
    pub(super) fn killed(&self) -> bool {
        self.dead.load(Ordering::Relaxed) == KILLED
    }

    pub(super) fn destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    /// Moves the QP to the error state; its CQs flush what is outstanding.
    /// False if it was there already.
    fn die(&self, why: u8) -> bool {
        let alive = self
            .dead
            .compare_exchange(ALIVE, why, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if alive {
            self.send_cq.raise();
            self.recv_cq.raise();
        }
        alive
    }

    /// The wrapped QP failed (an error completion): mirror its state.
    pub(super) fn failed(&self) {
        self.die(FAILED);
    }

    /// A fault moves the QP to the error state (counted on its link).
    pub(super) fn kill(&self) -> bool {
        let alive = self.die(KILLED);
        if alive {
            if let Some((l, _)) = self.link() {
                l.count(Ctr::Killed, 1);
            }
        }
        alive
    }

    /// A fault failed one of its completions: the QP is in error.
    pub(super) fn fail(&self) {
        self.die(KILLED);
    }
}

/// A QP of the [`FaultFabric`](super::FaultFabric): the backend's QP and
/// what the wrapper needs to fault it.
pub struct FaultQp<F: Fabric> {
    inner: F::Qp,
    pub(super) shared: Arc<QpShared>,
    cap: QpCap,
    /// The link, once the CM has set it (a copy: no atomic per post after).
    link: Option<(Arc<LinkState>, Side)>,
    sq: Producer,
    rq: Producer,
}

impl<F: Fabric> std::fmt::Debug for FaultQp<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultQp")
            .field("qp_num", &self.shared.qp_num)
            .field("link", &self.link.as_ref().map(|(_, s)| *s))
            .finish_non_exhaustive()
    }
}

impl<F: Fabric> FaultQp<F> {
    pub(super) fn new(
        inner: F::Qp,
        cap: QpCap,
        send_cq: Arc<CqShared>,
        recv_cq: Arc<CqShared>,
    ) -> FaultQp<F> {
        let (sq, sqp) = WrRing::new("send", cap.max_send_wr);
        let (rq, rqp) = WrRing::new("recv", cap.max_recv_wr);
        let shared = Arc::new(QpShared {
            qp_num: inner.qp_num(),
            sq,
            rq,
            link: OnceLock::new(),
            dead: AtomicU8::new(ALIVE),
            destroyed: AtomicBool::new(false),
            send_cq,
            recv_cq,
        });
        FaultQp {
            inner,
            shared,
            cap,
            link: None,
            sq: sqp,
            rq: rqp,
        }
    }

    pub(super) fn inner(&self) -> &F::Qp {
        &self.inner
    }

    /// Moves the QP to the error state, as a fatal error on a NIC would:
    /// everything outstanding completes with `WrFlushErr` (on the next polls
    /// of its CQs) and later posts flush. The peer is not told (a dead QP on
    /// a real fabric goes silent; the peer learns through its own timeouts or
    /// the CM). Returns false if the QP was in the error state already.
    pub fn kill(&self) -> bool {
        self.shared.kill()
    }

    fn link(&mut self) -> Option<&(Arc<LinkState>, Side)> {
        if self.link.is_none() {
            self.link = self.shared.link().cloned();
        }
        self.link.as_ref()
    }

    /// A request on a QP in the error state: recorded for its CQ to flush.
    fn flush_later(&mut self, recv: bool, wr_id: u64, meta: u32) -> Result<()> {
        let (ring, p, cq) = if recv {
            (&self.shared.rq, &mut self.rq, &self.shared.recv_cq)
        } else {
            (&self.shared.sq, &mut self.sq, &self.shared.send_cq)
        };
        ring.stage(p, wr_id, meta | FLUSH)?;
        ring.publish(p);
        cq.raise();
        Ok(())
    }

    /// A request a black hole takes: checked as the QP would check it, then
    /// recorded as outstanding for good.
    fn swallow(&mut self, wr: &SendWr<'_>, meta: u32, link: &LinkState) -> Result<()> {
        if self.inner.state() == QpState::Init {
            return Err(FabricError::BadQpState {
                qp_num: self.shared.qp_num,
                state: QpState::Init,
            });
        }
        if wr.sg_list.len() > self.cap.max_send_sge as usize {
            return Err(FabricError::InvalidWr("sg list longer than max_send_sge"));
        }
        if wr.inline && wr.payload_len() > u64::from(self.cap.max_inline_data) {
            return Err(FabricError::InvalidWr(
                "inline payload above max_inline_data",
            ));
        }
        self.shared
            .sq
            .stage(&mut self.sq, wr.wr_id, meta | SWALLOWED)?;
        self.shared.sq.publish(&mut self.sq);
        link.count(Ctr::Swallowed, 1);
        Ok(())
    }
}

/// Whether a black hole armed as `armed` takes `op` posted by `side`.
fn swallowed(armed: u32, side: Side, op: Opcode) -> bool {
    let out = armed & bit(BLACK_HOLE, side.sends()) != 0;
    match op {
        Opcode::LocalInv | Opcode::Rekey => false,
        // The request goes one way, the data comes back the other.
        Opcode::RdmaRead => out || armed & bit(BLACK_HOLE, side.sends().reverse()) != 0,
        _ => out,
    }
}

impl<F: Fabric> Drop for FaultQp<F> {
    fn drop(&mut self) {
        self.shared.destroyed.store(true, Ordering::Release);
        self.shared.send_cq.raise();
        self.shared.recv_cq.raise();
    }
}

impl<F: Fabric> Qp for FaultQp<F> {
    fn qp_num(&self) -> u32 {
        self.shared.qp_num
    }

    fn state(&self) -> QpState {
        if self.shared.is_dead() {
            return QpState::Error;
        }
        self.inner.state()
    }

    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        let meta = meta(wr.opcode.wc_opcode(), wr.signaled);
        if self.shared.is_dead() {
            return self.flush_later(false, wr.wr_id, meta);
        }
        if let Some((link, side)) = self.link() {
            let armed = link.armed();
            if armed != 0 && swallowed(armed, *side, wr.opcode) {
                let link = link.clone();
                return self.swallow(wr, meta, &link);
            }
        }
        self.shared.sq.stage(&mut self.sq, wr.wr_id, meta)?;
        // Every request is signaled below, so each one's completion retires
        // its slot; the CQ hides those the caller did not ask for.
        let mut wr = *wr;
        wr.signaled = true;
        self.inner.post_send(&wr)?;
        self.shared.sq.publish(&mut self.sq);
        Ok(())
    }

    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        let meta = meta(WcOpcode::Recv, true);
        if self.shared.is_dead() {
            return self.flush_later(true, wr.wr_id, meta);
        }
        self.shared.rq.stage(&mut self.rq, wr.wr_id, meta)?;
        self.inner.post_recv(wr)?;
        self.shared.rq.publish(&mut self.rq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::link::Dir;

    #[test]
    fn what_a_black_hole_takes() {
        let c2s = bit(BLACK_HOLE, Dir::C2s);
        let all = [
            Opcode::Send,
            Opcode::SendWithImm,
            Opcode::SendWithInv,
            Opcode::RdmaWrite,
            Opcode::RdmaWriteWithImm,
        ];
        for op in all {
            assert!(swallowed(c2s, Side::Clt, op), "{op:?}");
            assert!(!swallowed(c2s, Side::Srv, op), "{op:?}");
        }
        for op in [Opcode::LocalInv, Opcode::Rekey] {
            assert!(!swallowed(c2s, Side::Clt, op), "{op:?} is local");
        }
        assert!(swallowed(c2s, Side::Clt, Opcode::RdmaRead));
        assert!(
            swallowed(c2s, Side::Srv, Opcode::RdmaRead),
            "the server's READ data would come back c2s"
        );
        assert!(!swallowed(0, Side::Clt, Opcode::Send));
    }
}
