//! The wrapped CQ: polls the backend's CQ and sorts each completion — retire
//! its request, hide it (a request posted unsignaled), hold it (a delay), fail
//! it (an armed status) — and flushes the QPs a fault killed.

use super::clock::Clock;
use super::link::{bit, Ctr, LinkState, Side, DELAY, FAIL};
use super::qp::QpShared;
use super::ring::{meta_op, Consumer, WrRing, SIGNALED};
use crate::soft::engine::Handoff;
use crate::{Cq, Fabric, Wc, WcOpcode};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Rounds of the backend's CQ per poll while everything it returns is
/// hidden or held (so a poll that could return something does).
const INNER_ROUNDS: usize = 4;

/// What a CQ shares with its QPs: a flag raised when it must look at them
/// (one attached, destroyed or in the error state), and the QPs attached
/// since it last looked.
#[derive(Debug, Default)]
pub(super) struct CqShared {
    attention: AtomicBool,
    attached: Handoff<CqQp>,
}

impl CqShared {
    pub(super) fn raise(&self) {
        self.attention.store(true, Ordering::Release);
    }

    /// Attaches `qp`'s send and/or receive queue.
    pub(super) fn attach(&self, qp: &Arc<QpShared>, send: bool, recv: bool) {
        let q = CqQp {
            qp: qp.clone(),
            link: None,
            send: send.then(|| Consumer::new(&qp.sq)),
            recv: recv.then(|| Consumer::new(&qp.rq)),
            held: [0; 2],
            blocked: [0; 2],
        };
        self.attached.push(q);
        self.raise();
    }
}

/// A QP as one CQ sees it: the queues that report here.
#[derive(Debug)]
pub(super) struct CqQp {
    qp: Arc<QpShared>,
    link: Option<(Arc<LinkState>, Side)>,
    send: Option<Consumer>,
    recv: Option<Consumer>,
    /// Its completions waiting in `held`, per queue (send, receive).
    held: [usize; 2],
    /// The delivery pass that found one of them not due, per queue: the
    /// rest of that queue waits too (completions stay in order per queue).
    blocked: [u64; 2],
}

impl CqQp {
    /// The consumer of one of its queues, with the ring it consumes.
    fn queue(&mut self, recv: bool) -> Option<(&mut Consumer, &WrRing)> {
        let c = if recv {
            self.recv.as_mut()
        } else {
            self.send.as_mut()
        }?;
        Some((c, self.qp.ring(recv)))
    }

    /// Copies the QP's link once the CM has set it.
    fn sync_link(&mut self) {
        if self.link.is_none() {
            self.link = self.qp.link().cloned();
        }
    }

    /// Which request `wc` completes: (receive queue?, position, slot word).
    fn locate(&self, wc: &Wc) -> Option<(bool, u64, u32)> {
        let recv = matches!(wc.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm);
        let find = |recv: bool, op| {
            let c = if recv { &self.recv } else { &self.send };
            let (pos, meta) = c.as_ref()?.find(self.qp.ring(recv), wc.wr_id, op)?;
            Some((recv, pos, meta))
        };
        if wc.status.is_ok() {
            return find(recv, (!recv).then_some(wc.opcode));
        }
        // Error completions may not say what they were (verbs leave the
        // opcode undefined): try the other queue too.
        find(recv, None).or_else(|| find(!recv, None))
    }
}

/// A completion waiting for its time.
#[derive(Clone, Copy, Debug)]
struct Held {
    wc: Wc,
    recv: bool,
    pos: u64,
    visible: bool,
    due_ns: u64,
}

/// A CQ of the [`FaultFabric`](super::FaultFabric).
pub struct FaultCq<F: Fabric> {
    inner: F::Cq,
    pub(super) shared: Arc<CqShared>,
    clock: Clock,
    qps: Vec<CqQp>,
    /// Index in `qps` of the last QP a completion was for.
    last: usize,
    held: VecDeque<Held>,
    pass: u64,
}

impl<F: Fabric> std::fmt::Debug for FaultCq<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultCq")
            .field("qps", &self.qps.len())
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl<F: Fabric> FaultCq<F> {
    pub(super) fn new(inner: F::Cq, clock: Clock) -> FaultCq<F> {
        FaultCq {
            inner,
            shared: Arc::default(),
            clock,
            qps: Vec::new(),
            last: 0,
            held: VecDeque::new(),
            pass: 0,
        }
    }

    pub(super) fn inner(&self) -> &F::Cq {
        &self.inner
    }

    fn find_qp(&mut self, qp_num: u32) -> Option<usize> {
        if self
            .qps
            .get(self.last)
            .is_some_and(|q| q.qp.qp_num() == qp_num)
        {
            return Some(self.last);
        }
        self.last = self.qps.iter().position(|q| q.qp.qp_num() == qp_num)?;
        Some(self.last)
    }

    /// Takes in attached QPs and forgets destroyed ones.
    fn pick_up(&mut self) {
        self.shared.attached.take_into(&mut self.qps);
        if self.qps.iter().any(|q| q.qp.destroyed()) {
            let held = &mut self.held;
            self.qps.retain(|q| {
                let gone = q.qp.destroyed();
                if gone && q.held != [0; 2] {
                    held.retain(|h| h.wc.qp_num != q.qp.qp_num());
                }
                !gone
            });
            self.last = 0;
        }
    }

    /// Flushes the QPs in the error state, as far as `out` has room.
    fn flush_dead(&mut self, out: &mut [Wc]) -> usize {
        let mut n = 0;
        for q in &mut self.qps {
            if !q.qp.is_dead() {
                continue;
            }
            if q.held != [0; 2] {
                let num = q.qp.qp_num();
                self.held.retain(|h| h.wc.qp_num != num);
                q.held = [0; 2];
            }
            let killed = q.qp.killed();
            q.sync_link();
            let link = q.link.as_ref().map(|(l, _)| l.clone());
            for recv in [false, true] {
                let num = q.qp.qp_num();
                let Some((c, ring)) = q.queue(recv) else {
                    continue;
                };
                let (k, all) = c.flush(ring, num, &mut out[n..]);
                n += k;
                if let (true, Some(l), true) = (killed, &link, k > 0) {
                    l.count(Ctr::FlushedWc, k as u64);
                }
                if !all {
                    self.shared.raise();
                    return n;
                }
            }
        }
        n
    }

    /// Delivers the held completions that are due, in order per queue.
    fn deliver_held(&mut self, out: &mut [Wc]) -> usize {
        let now = self.clock.now_ns();
        self.pass += 1;
        let (mut i, mut n) = (0, 0);
        while i < self.held.len() && n < out.len() {
            let h = self.held[i];
            let Some(qi) = self.find_qp(h.wc.qp_num) else {
                self.held.remove(i);
                continue;
            };
            let q = &mut self.qps[qi];
            let k = usize::from(h.recv);
            if q.blocked[k] == self.pass || q.qp.is_dead() || h.due_ns > now {
                q.blocked[k] = self.pass;
                i += 1;
                continue;
            }
            self.held.remove(i);
            q.held[k] -= 1;
            if let Some(wc) = deliver(q, h.recv, h.pos, h.wc, h.visible) {
                out[n] = wc;
                n += 1;
            }
        }
        n
    }

    /// One completion of the backend: what the caller gets of it, if anything.
    fn sort(&mut self, mut wc: Wc) -> Option<Wc> {
        let Some(qi) = self.find_qp(wc.qp_num) else {
            return Some(wc);
        };
        let q = &mut self.qps[qi];
        if q.qp.is_dead() {
            // Flushed from the ring instead.
            return None;
        }
        let Some((recv, pos, meta)) = q.locate(&wc) else {
            return Some(wc);
        };
        if !recv && !wc.status.is_ok() {
            wc.opcode = meta_op(meta);
        }
        let visible = recv || meta & SIGNALED != 0 || !wc.status.is_ok();
        q.sync_link();
        let delay = match &q.link {
            Some((l, side)) => {
                let dir = if recv {
                    side.sends().reverse()
                } else {
                    side.sends()
                };
                (l.armed() & bit(DELAY, dir) != 0).then(|| (l.clone(), l.delay_ns(dir)))
            }
            None => None,
        };
        let k = usize::from(recv);
        if q.held[k] == 0 && delay.is_none() {
            return deliver(q, recv, pos, wc, visible);
        }
        let now = self.clock.now_ns();
        let due_ns = match delay {
            Some((l, d)) => {
                if visible {
                    l.count(Ctr::DelayedWc, 1);
                }
                now.saturating_add(d)
            }
            None => now,
        };
        if let Some((c, ring)) = q.queue(recv) {
            c.hold(ring, pos);
        }
        q.held[k] += 1;
        self.clock.note_due(due_ns);
        self.held.push_back(Held {
            wc,
            recv,
            pos,
            visible,
            due_ns,
        });
        None
    }
}

/// Hands a completion to the caller: an armed failure replaces its status
/// (moving the QP to error), an error moves the QP to error, the request
/// retires; a completion of a request posted unsignaled stays hidden.
fn deliver(q: &mut CqQp, recv: bool, pos: u64, mut wc: Wc, mut visible: bool) -> Option<Wc> {
    q.sync_link();
    if !recv {
        if let Some((l, side)) = &q.link {
            let dir = side.sends();
            if l.armed() & bit(FAIL, dir) != 0 {
                if let Some(status) = l.take_fail(dir) {
                    wc.status = status;
                    visible = true;
                    l.count(Ctr::FailedWc, 1);
                    q.qp.fail();
                }
            }
        }
    }
    if !wc.status.is_ok() {
        q.qp.failed();
    }
    if let Some((c, ring)) = q.queue(recv) {
        c.done(ring, pos);
    }
    visible.then_some(wc)
}

impl<F: Fabric> Cq for FaultCq<F> {
    fn poll(&mut self, wcs: &mut [Wc]) -> usize {
        let mut n = 0;
        if self.shared.attention.load(Ordering::Relaxed)
            && self.shared.attention.swap(false, Ordering::Acquire)
        {
            self.pick_up();
            n += self.flush_dead(wcs);
        }
        if !self.held.is_empty() {
            n += self.deliver_held(&mut wcs[n..]);
        }
        for _ in 0..INNER_ROUNDS {
            let room = wcs.len() - n;
            if room == 0 {
                break;
            }
            let got = self.inner.poll(&mut wcs[n..]);
            let start = n;
            for i in start..start + got {
                if let Some(wc) = self.sort(wcs[i]) {
                    wcs[n] = wc;
                    n += 1;
                }
            }
            if got < room || n > start {
                break;
            }
        }
        n
    }
}
