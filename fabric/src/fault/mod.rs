//! A fault-injecting fabric: [`FaultFabric<F>`] wraps any backend and is a
//! [`Fabric`] itself, so the engine runs over it unchanged while a test cuts,
//! slows, fails and kills links through a shared [`Faults`] handle.
//!
//! ```text
//!  test ── Faults (Arc) ── link "shm:s1" ── black hole c2s/s2c, delay, fail(status),
//!            │                │               kill QPs, lose/delay CM events, refuse
//!            │                │  (relaxed loads on the data path; counters of what fired)
//!  client: FaultFabric<F> ────┤                         server: FaultFabric<F>
//!    FaultQp  post ─> swallow? ─> F::Qp ════ wire ════ F::Qp <─ FaultQp
//!    FaultCq  poll <─ hold / fail / hide / flush <─ F::Cq        (same, s2c)
//!    FaultCm  connect(addr): the QP's link, Clt   listen(addr) + accept: link, Srv
//! ```
//! A link is the server address of a connection: the one passed to
//! `Cm::connect`, and the listener's on the passive side. The CM puts each QP
//! on its link when it connects or accepts it; client and server wrappers
//! built from one [`Faults`] then see the same faults, c2s being what the
//! active side posts.
//!
//! The wrapper records every posted request (a ring per work queue, sized
//! from [`QpCap`]) so that a QP a fault kills or fails flushes what is
//! outstanding, as verbs do. It posts every send request signaled and hides
//! the completions the caller did not ask for, so each request retires
//! exactly. With no fault armed a post costs two relaxed loads (QP state,
//! link faults) plus its record, a completion its lookup and retirement: no
//! lock, no read-modify-write, no allocation. MRs are the backend's own.

mod clock;
mod cm;
mod cq;
mod link;
mod qp;
mod ring;

pub use clock::Clock;
pub use cm::FaultCm;
pub use cq::FaultCq;
pub use link::{CmEventKind, Count, Counters, Dir, Faults, LinkFaults, Side};
pub use qp::FaultQp;

use super::{Fabric, Memory, Pd, QpCap, Result};
use std::sync::Arc;

/// A backend with faults: every object it makes wraps the backend's.
#[derive(Clone)]
pub struct FaultFabric<F: Fabric> {
    inner: F,
    faults: Faults,
}

impl<F: Fabric> std::fmt::Debug for FaultFabric<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultFabric")
            .field("inner", &self.inner.name())
            .field("faults", &self.faults)
            .finish()
    }
}

impl<F: Fabric> FaultFabric<F> {
    /// Wraps `inner`; faults are armed through `faults` (or a clone of it).
    pub fn new(inner: F, faults: Faults) -> FaultFabric<F> {
        FaultFabric { inner, faults }
    }

    /// The handle the faults are armed through.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &F {
        &self.inner
    }
}

impl<F: Fabric> Fabric for FaultFabric<F> {
    type Pd = FaultPd<F>;
    type Mr = F::Mr;
    type Cq = FaultCq<F>;
    type Qp = FaultQp<F>;
    type Cm = FaultCm<F>;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn authenticates_peers(&self) -> bool {
        self.inner.authenticates_peers()
    }

    fn alloc_pd(&self) -> Result<FaultPd<F>> {
        Ok(FaultPd {
            inner: self.inner.alloc_pd()?,
            faults: self.faults.clone(),
        })
    }

    fn alloc_pd_sized(&self, max_mrs: u32) -> Result<FaultPd<F>> {
        Ok(FaultPd {
            inner: self.inner.alloc_pd_sized(max_mrs)?,
            faults: self.faults.clone(),
        })
    }

    fn create_cm(&self) -> Result<FaultCm<F>> {
        Ok(FaultCm::new(self.inner.create_cm()?, self.faults.clone()))
    }

    fn remote_invalidate(&self) -> bool {
        self.inner.remote_invalidate()
    }
}

/// A protection domain of the [`FaultFabric`].
pub struct FaultPd<F: Fabric> {
    inner: F::Pd,
    faults: Faults,
}

impl<F: Fabric> Clone for FaultPd<F> {
    fn clone(&self) -> Self {
        FaultPd {
            inner: self.inner.clone(),
            faults: self.faults.clone(),
        }
    }
}

impl<F: Fabric> std::fmt::Debug for FaultPd<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultPd").finish_non_exhaustive()
    }
}

impl<F: Fabric> Pd<FaultFabric<F>> for FaultPd<F> {
    fn for_address(&self, addr: &super::Address, local: bool) -> Result<Self> {
        Ok(FaultPd {
            inner: self.inner.for_address(addr, local)?,
            faults: self.faults.clone(),
        })
    }

    fn same_device(&self, other: &Self) -> bool {
        self.inner.same_device(&other.inner)
    }

    fn reg_mr(&self, mem: Arc<dyn Memory>, access: super::Access) -> Result<F::Mr> {
        self.inner.reg_mr(mem, access)
    }

    fn reg_mr_range(
        &self,
        mem: Arc<dyn Memory>,
        offset: usize,
        len: usize,
        access: super::Access,
    ) -> Result<F::Mr> {
        self.inner.reg_mr_range(mem, offset, len, access)
    }

    fn create_cq(&self, depth: u32) -> Result<FaultCq<F>> {
        Ok(FaultCq::new(
            self.inner.create_cq(depth)?,
            self.faults.clock().clone(),
        ))
    }

    fn create_qp(
        &self,
        send_cq: &FaultCq<F>,
        recv_cq: &FaultCq<F>,
        cap: QpCap,
    ) -> Result<FaultQp<F>> {
        let inner = self
            .inner
            .create_qp(send_cq.inner(), recv_cq.inner(), cap)?;
        let qp = FaultQp::new(inner, cap, send_cq.shared.clone(), recv_cq.shared.clone());
        let same = Arc::ptr_eq(&send_cq.shared, &recv_cq.shared);
        send_cq.shared.attach(&qp.shared, true, same);
        if !same {
            recv_cq.shared.attach(&qp.shared, false, true);
        }
        Ok(qp)
    }
}
