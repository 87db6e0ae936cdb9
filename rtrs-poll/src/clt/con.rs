//! One client connection (a cid of a path): QP, CQ and its receive buffers.
//!
//! Buffers: `nrecv` 8-byte receive slots (RKEY_RSP payloads land there).

use crate::sess::hb::Signal;
use rtrs_fabric::{memory, Access, Cq, Fabric, Memory, Mr, Pd, Qp, QpCap, RecvWr, SendWr, Wc};
use std::sync::Arc;

/// A receive slot: room for an RKEY_RSP.
pub(crate) const SLOT: usize = rtrs_proto::RkeyRsp::<&[u8]>::LEN;

/// wr_id of a receive: its slot index in the low bits.
pub(crate) const WR_RECV: u64 = 1 << 56;
pub(crate) const WR_INFO_RSP: u64 = 2 << 56;
pub(crate) const WR_INFO_REQ: u64 = 3 << 56;
pub(crate) const WR_IO: u64 = 4 << 56;
pub(crate) const WR_HB: u64 = 5 << 56;
pub(crate) const WR_KIND: u64 = 0xff << 56;

/// A client connection.
pub struct CltCon<F: Fabric> {
    pub(crate) cid: u16,
    pub(crate) qp: F::Qp,
    pub(crate) cq: F::Cq,
    pub(crate) mem: Arc<dyn Memory>,
    pub(crate) mr: F::Mr,
    pub(crate) nrecv: u32,
    /// The connection round it belongs to (the path's `recon_cnt`): a
    /// core's failure report names it, so a stale report is ignored.
    pub(crate) epoch: u16,
    pub(crate) signal: Signal,
    /// The key the server's last SEND_WITH_INV on this connection named
    /// (it comes just before the response of the read it ends).
    pub(crate) inv_seen: u32,
}

impl<F: Fabric> std::fmt::Debug for CltCon<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CltCon(cid {})", self.cid)
    }
}

impl<F: Fabric> CltCon<F> {
    /// A connection with room for `nrecv` receives of 8 bytes, whose
    /// requests are signaled as `signal` says.
    pub(crate) fn create(
        pd: &F::Pd,
        cid: u16,
        epoch: u16,
        cap: QpCap,
        nrecv: u32,
        signal: Signal,
    ) -> rtrs_fabric::Result<CltCon<F>> {
        let cq = pd.create_cq(cap.max_send_wr + cap.max_recv_wr)?;
        let qp = pd.create_qp(&cq, &cq, cap)?;
        let mem = memory::shareable(nrecv as usize * SLOT)?;
        let mr = pd.reg_mr(mem.clone(), Access::LOCAL_WRITE)?;
        Ok(CltCon {
            cid,
            qp,
            cq,
            mem,
            mr,
            nrecv,
            epoch,
            signal,
            inv_seen: 0,
        })
    }

    /// Posts receive slot `i` (an 8-byte buffer).
    pub(crate) fn post_recv(&mut self, i: u32) -> rtrs_fabric::Result<()> {
        let sge = [self.mr.sge(i as usize * SLOT, SLOT as u32)];
        self.qp.post_recv(&RecvWr {
            wr_id: WR_RECV | u64::from(i),
            sg_list: &sge,
        })
    }

    /// Posts every receive slot.
    pub(crate) fn post_all_recvs(&mut self) -> rtrs_fabric::Result<()> {
        for i in 0..self.nrecv {
            self.post_recv(i)?;
        }
        Ok(())
    }

    /// Posts `wr`, signaled when its turn comes.
    pub(crate) fn post(&mut self, wr: SendWr<'_>) -> rtrs_fabric::Result<()> {
        let wr = self.signal.apply(wr);
        self.qp.post_send(&wr)
    }

    /// Posts `first` (unsignaled) and `wr` as one chain: one doorbell.
    pub(crate) fn post_after(
        &mut self,
        first: SendWr<'_>,
        wr: SendWr<'_>,
    ) -> rtrs_fabric::Result<()> {
        let wr = self.signal.apply(wr);
        self.qp.post_send_batch(&[first.unsignaled(), wr])
    }

    /// Polls the CQ.
    pub(crate) fn poll(&mut self, wcs: &mut [Wc]) -> usize {
        self.cq.poll(wcs)
    }
}
