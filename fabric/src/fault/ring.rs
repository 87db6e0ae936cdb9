//! The outstanding work requests of one work queue (send or receive) of a
//! wrapped QP, so that a QP a fault kills can flush them as verbs would.
//!
//! ```text
//!   post ── write slot, publish head ──> [ ring of max_*_wr slots ] ──> CQ poll
//!           (the QP: producer)              │                          (the CQ: consumer)
//!                                           │   matches each completion to its slot,
//!   room = limit - (head - tail) - stuck <──┘   retires in order (tail), keeps the
//!                                               swallowed aside (stuck), flushes all
//! ```
//! One producer (the core posting to the QP) and one consumer (the core
//! polling the CQ): plain atomic loads and stores, no read-modify-write, no
//! lock. The consumer's bookkeeping (slot states, swallowed requests it moved
//! aside) is its own.

use crate::{FabricError, Result, Wc, WcOpcode, WcStatus};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Slot flags (above the opcode in the low four bits).
pub(super) const SIGNALED: u32 = 1 << 4;
/// A black hole took it: no completion will come from the wrapped QP.
pub(super) const SWALLOWED: u32 = 1 << 5;
/// Posted on a QP in the error state: flushed by the wrapper.
pub(super) const FLUSH: u32 = 1 << 6;
const OP_MASK: u32 = 0xf;

const OPS: [WcOpcode; 7] = [
    WcOpcode::Send,
    WcOpcode::RdmaWrite,
    WcOpcode::RdmaRead,
    WcOpcode::LocalInv,
    WcOpcode::Rekey,
    WcOpcode::Recv,
    WcOpcode::RecvRdmaWithImm,
];

/// The slot word of a request completing as `op`.
pub(super) fn meta(op: WcOpcode, signaled: bool) -> u32 {
    let i = OPS.iter().position(|o| *o == op).unwrap_or(0) as u32;
    i | if signaled { SIGNALED } else { 0 }
}

/// The opcode in a slot word.
pub(super) fn meta_op(meta: u32) -> WcOpcode {
    OPS[((meta & OP_MASK) as usize).min(OPS.len() - 1)]
}

#[derive(Debug, Default)]
struct Slot {
    wr_id: AtomicU64,
    meta: AtomicU32,
}

/// One work queue's outstanding requests.
#[derive(Debug)]
pub(super) struct WrRing {
    queue: &'static str,
    /// Requests outstanding at most (`max_send_wr` or `max_recv_wr`).
    limit: u64,
    mask: u64,
    slots: Box<[Slot]>,
    /// Published by the producer: slots below are written.
    head: AtomicU64,
    /// Published by the consumer: slots below are retired.
    tail: AtomicU64,
    /// Swallowed requests the consumer moved aside (still outstanding).
    stuck: AtomicU64,
}

/// The producer's own view: where it writes next and the room it knows of.
#[derive(Debug)]
pub(super) struct Producer {
    head: u64,
    room: u64,
}

impl WrRing {
    pub(super) fn new(queue: &'static str, limit: u32) -> (WrRing, Producer) {
        let limit = u64::from(limit.max(1));
        let cap = limit.next_power_of_two();
        let ring = WrRing {
            queue,
            limit,
            mask: cap - 1,
            slots: (0..cap).map(|_| Slot::default()).collect(),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            stuck: AtomicU64::new(0),
        };
        (
            ring,
            Producer {
                head: 0,
                room: limit,
            },
        )
    }

    fn slot(&self, pos: u64) -> &Slot {
        &self.slots[(pos & self.mask) as usize]
    }

    /// (wr_id, slot word) of a published position.
    fn read(&self, pos: u64) -> (u64, u32) {
        let s = self.slot(pos);
        (
            s.wr_id.load(Ordering::Relaxed),
            s.meta.load(Ordering::Relaxed),
        )
    }

    /// Writes the next request into its slot, unpublished: `publish` makes
    /// it outstanding once the wrapped QP took it. `QueueFull` when `limit`
    /// requests are outstanding.
    pub(super) fn stage(&self, p: &mut Producer, wr_id: u64, meta: u32) -> Result<()> {
        if p.room == 0 {
            // Tail before stuck: the consumer publishes them the other way round.
            let tail = self.tail.load(Ordering::Acquire);
            let stuck = self.stuck.load(Ordering::Acquire);
            p.room = self.limit.saturating_sub(p.head - tail + stuck);
            if p.room == 0 {
                return Err(FabricError::QueueFull {
                    queue: self.queue,
                    depth: self.limit as u32,
                });
            }
        }
        // The slot's last occupant is below the tail: the consumer is done with it.
        let s = self.slot(p.head);
        s.wr_id.store(wr_id, Ordering::Relaxed);
        s.meta.store(meta, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the staged request outstanding.
    pub(super) fn publish(&self, p: &mut Producer) {
        p.head += 1;
        p.room -= 1;
        self.head.store(p.head, Ordering::Release);
    }
}

const PENDING: u8 = 0;
/// Its completion arrived and waits in the CQ (a delay).
const HELD: u8 = 1;
/// Delivered (or retired silently).
const DONE: u8 = 2;

/// The consumer's side of a ring: owned by the CQ the queue reports to.
#[derive(Debug)]
pub(super) struct Consumer {
    state: Box<[u8]>,
    tail: u64,
    /// Swallowed requests behind the tail, oldest first: (wr_id, slot word).
    stuck: Vec<(u64, u32)>,
}

impl Consumer {
    pub(super) fn new(ring: &WrRing) -> Consumer {
        Consumer {
            state: vec![PENDING; ring.slots.len()].into_boxed_slice(),
            tail: 0,
            stuck: Vec::new(),
        }
    }

    fn state(&mut self, ring: &WrRing, pos: u64) -> &mut u8 {
        &mut self.state[(pos & ring.mask) as usize]
    }

    /// The oldest pending request a completion of `wr_id` (and `op`, when
    /// given) belongs to: (position, slot word).
    pub(super) fn find(
        &self,
        ring: &WrRing,
        wr_id: u64,
        op: Option<WcOpcode>,
    ) -> Option<(u64, u32)> {
        let head = ring.head.load(Ordering::Acquire);
        (self.tail..head).find_map(|pos| {
            if self.state[(pos & ring.mask) as usize] != PENDING {
                return None;
            }
            let (id, meta) = ring.read(pos);
            let wanted = id == wr_id
                && meta & (SWALLOWED | FLUSH) == 0
                && op.is_none_or(|o| meta_op(meta) == o);
            wanted.then_some((pos, meta))
        })
    }

    /// Its completion waits in the CQ.
    pub(super) fn hold(&mut self, ring: &WrRing, pos: u64) {
        *self.state(ring, pos) = HELD;
    }

    /// Its completion was delivered: retire what can be.
    pub(super) fn done(&mut self, ring: &WrRing, pos: u64) {
        *self.state(ring, pos) = DONE;
        self.advance(ring);
    }

    /// Moves the tail over delivered requests, setting swallowed ones aside.
    fn advance(&mut self, ring: &WrRing) {
        let head = ring.head.load(Ordering::Acquire);
        let (start, stuck) = (self.tail, self.stuck.len());
        while self.tail < head {
            let pos = self.tail;
            match *self.state(ring, pos) {
                DONE => {}
                PENDING => {
                    let (wr_id, meta) = ring.read(pos);
                    if meta & SWALLOWED == 0 {
                        break;
                    }
                    self.stuck.push((wr_id, meta));
                }
                _ => break,
            }
            *self.state(ring, pos) = PENDING;
            self.tail += 1;
        }
        if self.stuck.len() != stuck {
            ring.stuck.store(self.stuck.len() as u64, Ordering::Release);
        }
        if self.tail != start {
            ring.tail.store(self.tail, Ordering::Release);
        }
    }

    /// Whether anything is outstanding.
    pub(super) fn outstanding(&self, ring: &WrRing) -> bool {
        !self.stuck.is_empty() || self.tail < ring.head.load(Ordering::Acquire)
    }

    /// Completes everything outstanding with `WrFlushErr`, oldest first, as
    /// far as `out` has room; returns how many and whether that was all.
    pub(super) fn flush(&mut self, ring: &WrRing, qp_num: u32, out: &mut [Wc]) -> (usize, bool) {
        let flushed =
            |(wr_id, meta): (u64, u32)| Wc::new(wr_id, WcStatus::WrFlushErr, meta_op(meta), qp_num);
        let k = self.stuck.len().min(out.len());
        for (o, e) in out.iter_mut().zip(self.stuck.drain(..k)) {
            *o = flushed(e);
        }
        ring.stuck.store(self.stuck.len() as u64, Ordering::Release);
        let mut n = k;
        let head = ring.head.load(Ordering::Acquire);
        let mut pos = self.tail;
        while pos < head && n < out.len() {
            let st = self.state(ring, pos);
            if *st != DONE {
                *st = DONE;
                out[n] = flushed(ring.read(pos));
                n += 1;
            }
            pos += 1;
        }
        self.advance(ring);
        (n, !self.outstanding(ring))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(r: &WrRing, p: &mut Producer, wr_id: u64, meta: u32) -> Result<()> {
        r.stage(p, wr_id, meta)?;
        r.publish(p);
        Ok(())
    }

    #[test]
    fn retires_in_order_and_refuses_when_full() {
        let (r, mut p) = WrRing::new("send", 3);
        let mut c = Consumer::new(&r);
        let w = meta(WcOpcode::RdmaWrite, true);
        for id in 0..3 {
            post(&r, &mut p, id, w).unwrap();
        }
        assert!(matches!(
            post(&r, &mut p, 9, w),
            Err(FabricError::QueueFull { depth: 3, .. })
        ));
        // Out of order (a completion made in software at post time).
        let (pos, _) = c.find(&r, 2, Some(WcOpcode::RdmaWrite)).unwrap();
        c.done(&r, pos);
        assert!(post(&r, &mut p, 9, w).is_err(), "0 and 1 still outstanding");
        assert_eq!(c.find(&r, 0, Some(WcOpcode::Send)), None, "wrong opcode");
        for id in [0, 1] {
            let (pos, _) = c.find(&r, id, None).unwrap();
            c.done(&r, pos);
        }
        assert!(!c.outstanding(&r));
        for id in 10..13 {
            post(&r, &mut p, id, w).unwrap();
        }
    }

    #[test]
    fn swallowed_requests_step_aside_and_flush_in_order() {
        let (r, mut p) = WrRing::new("send", 4);
        let mut c = Consumer::new(&r);
        let w = meta(WcOpcode::RdmaWrite, true);
        post(&r, &mut p, 1, w).unwrap();
        post(&r, &mut p, 2, w | SWALLOWED).unwrap();
        post(&r, &mut p, 3, meta(WcOpcode::Send, false)).unwrap();
        post(&r, &mut p, 4, w).unwrap();
        // 2 never completes: 1, 3 and 4 do; 2 still takes room.
        for id in [1, 3, 4] {
            assert_eq!(c.find(&r, 2, None), None);
            let (pos, _) = c.find(&r, id, None).unwrap();
            c.done(&r, pos);
        }
        assert_eq!(c.stuck.len(), 1);
        post(&r, &mut p, 5, w).unwrap();
        post(&r, &mut p, 6, w).unwrap();
        post(&r, &mut p, 7, w).unwrap();
        assert!(post(&r, &mut p, 8, w).is_err());
        let (pos, _) = c.find(&r, 5, None).unwrap();
        c.hold(&r, pos);
        let mut out = [Wc::default(); 2];
        let (n, all) = c.flush(&r, 7, &mut out);
        assert_eq!((n, all), (2, false));
        assert_eq!(
            out.map(|w| (w.wr_id, w.status, w.opcode)),
            [
                (2, WcStatus::WrFlushErr, WcOpcode::RdmaWrite),
                (5, WcStatus::WrFlushErr, WcOpcode::RdmaWrite)
            ]
        );
        let (n, all) = c.flush(&r, 7, &mut out);
        assert_eq!((n, all), (2, true));
        assert_eq!(out.map(|w| w.wr_id), [6, 7]);
        for id in 20..24 {
            post(&r, &mut p, id, w).unwrap();
        }
    }
}
