//! The wrapped connection manager: learns each connection's link (the
//! address connected to, or the listener's), puts QPs on their link at
//! connect and accept, and loses, holds or refuses what the link's CM faults
//! say.

use super::link::{CmEventKind, CmVerdict, Ctr, Faults, LinkState, Side};
use super::{FaultFabric, FaultQp};
use crate::{Address, Cm, CmEvent, ConnId, Fabric, FabricError, PrivateData, Result};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Ids of connections the wrapper answers itself (refused connects): a
/// range the backends' counters never reach.
const OWN_IDS: u64 = 1 << 63;
/// How long one wait on the backend lasts while events are held, so a held
/// event comes out soon after it is due.
const HELD_WAIT: Duration = Duration::from_millis(1);

#[derive(Debug)]
struct HeldEvent {
    ev: CmEvent,
    link: Arc<LinkState>,
    due_ns: u64,
}

/// The connection manager of the [`FaultFabric`](super::FaultFabric).
pub struct FaultCm<F: Fabric> {
    inner: F::Cm,
    faults: Faults,
    listeners: BTreeMap<ConnId, Arc<LinkState>>,
    conns: BTreeMap<ConnId, (Arc<LinkState>, Side)>,
    /// Outcomes of refused connects.
    ready: VecDeque<CmEvent>,
    held: VecDeque<HeldEvent>,
    next_own: u64,
}

impl<F: Fabric> std::fmt::Debug for FaultCm<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultCm")
            .field("listeners", &self.listeners.len())
            .field("conns", &self.conns.len())
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl<F: Fabric> FaultCm<F> {
    pub(super) fn new(inner: F::Cm, faults: Faults) -> FaultCm<F> {
        FaultCm {
            inner,
            faults,
            listeners: BTreeMap::new(),
            conns: BTreeMap::new(),
            ready: VecDeque::new(),
            held: VecDeque::new(),
            next_own: 0,
        }
    }

    /// The link and side of an event's connection (learning it from a
    /// connect request); forgets connections that end.
    fn classify(&mut self, ev: &CmEvent) -> Option<(Arc<LinkState>, Side)> {
        let id = ev.id();
        if let CmEvent::ConnectRequest { listener, .. } = ev {
            let link = self.listeners.get(listener)?.clone();
            self.conns.insert(id, (link.clone(), Side::Srv));
            return Some((link, Side::Srv));
        }
        let ends = !matches!(ev, CmEvent::Established { .. });
        if ends {
            self.conns.remove(&id)
        } else {
            self.conns.get(&id).cloned()
        }
    }

    /// The first held event that is due and has no earlier held event of its
    /// link before it.
    fn take_due(&mut self) -> Option<CmEvent> {
        let now = self.faults.clock().now_ns();
        let i = (0..self.held.len()).find(|&i| {
            let h = &self.held[i];
            h.due_ns <= now
                && !self
                    .held
                    .iter()
                    .take(i)
                    .any(|e| Arc::ptr_eq(&e.link, &h.link))
        })?;
        self.held.remove(i).map(|h| h.ev)
    }
}

impl<F: Fabric> Cm<FaultFabric<F>> for FaultCm<F> {
    fn admit(&mut self, admit: crate::Admit) {
        self.inner.admit(admit);
    }
    fn listen(&mut self, addr: &Address) -> Result<ConnId> {
        let id = self.inner.listen(addr)?;
        self.listeners.insert(id, self.faults.link_state(addr));
        Ok(id)
    }

    fn connect(&mut self, addr: &Address, qp: &FaultQp<F>, private_data: &[u8]) -> Result<ConnId> {
        let link = self.faults.link_state(addr);
        if link.take_refuse() {
            PrivateData::new(private_data)?;
            let id = ConnId(OWN_IDS | self.next_own);
            self.next_own += 1;
            link.count(Ctr::Refused, 1);
            self.ready.push_back(CmEvent::Unreachable {
                id,
                reason: format!("connect to {addr}: refused (fault)"),
            });
            return Ok(id);
        }
        qp.shared.set_link(&link, Side::Clt);
        let id = self.inner.connect(addr, qp.inner(), private_data)?;
        self.conns.insert(id, (link, Side::Clt));
        Ok(id)
    }

    fn accept(&mut self, id: ConnId, qp: &FaultQp<F>, private_data: &[u8]) -> Result<()> {
        if let Some((link, side)) = self.conns.get(&id) {
            qp.shared.set_link(link, *side);
        }
        self.inner.accept(id, qp.inner(), private_data)
    }

    fn reject(&mut self, id: ConnId, private_data: &[u8]) -> Result<()> {
        self.conns.remove(&id);
        self.inner.reject(id, private_data)
    }

    fn disconnect(&mut self, id: ConnId) -> Result<()> {
        if id.0 & OWN_IDS != 0 {
            return Err(FabricError::Unknown {
                what: "connection",
                id: id.0,
            });
        }
        self.listeners.remove(&id);
        self.inner.disconnect(id)
    }

    fn poll_event(&mut self, timeout: Duration) -> Result<Option<CmEvent>> {
        if let Some(ev) = self.ready.pop_front() {
            return Ok(Some(ev));
        }
        if let Some(ev) = self.take_due() {
            return Ok(Some(ev));
        }
        let wait = if self.held.is_empty() {
            timeout
        } else {
            timeout.min(HELD_WAIT)
        };
        let Some(ev) = self.inner.poll_event(wait)? else {
            return Ok(self.take_due());
        };
        let Some((link, side)) = self.classify(&ev) else {
            return Ok(Some(ev));
        };
        let now = self.faults.clock().now_ns();
        let due_ns = match link.cm_verdict(side, CmEventKind::of(&ev)) {
            CmVerdict::Lose => {
                link.count(Ctr::DroppedCm, 1);
                return Ok(self.take_due());
            }
            CmVerdict::Delay(d) => {
                link.count(Ctr::DelayedCm, 1);
                now.saturating_add(super::clock::nanos(d))
            }
            // In order behind the link's held events, if any.
            CmVerdict::Pass if self.held.iter().any(|h| Arc::ptr_eq(&h.link, &link)) => now,
            CmVerdict::Pass => return Ok(Some(ev)),
        };
        self.faults.clock().note_due(due_ns);
        self.held.push_back(HeldEvent { ev, link, due_ns });
        Ok(self.take_due())
    }
}
