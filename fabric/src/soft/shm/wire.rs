//! The shm "wire": one ring per direction in a memfd the sender creates and
//! the receiver maps. The sender writes descriptors (never payload, unless
//! inline); the receiver executes them in order, copying once between the two
//! sides' registered memories, and publishes how far it got, or why it stopped.
//!
//! ```text
//!   0   producer header   magic depth slot_size max_sge inline rnr_retry closed
//!   64  consumer header   acked  nak_psn nak_status rnr closed
//!   128 slot[depth]       seq(psn+1) op flags nsge len imm inv raddr rkey ack | sges or inline
//! ```
//! `ack` piggybacks how far the sender has executed the *other* ring, so a
//! busy connection acknowledges without touching the consumer header (which
//! the producer reads only when it needs a completion or room).
//! ```text
//! ```

use super::super::{FabricError, Mapping, Result};
use crate::QpCap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MAGIC: u32 = 0x7274_7273; // "rtrs"
const HDR: usize = 128;
const SLOT_HDR: usize = 48;
const WIRE_SGE: usize = 16;
const MAX_DEPTH: u32 = 1 << 20;
/// Most sg entries a descriptor carries.
pub(crate) const MAX_SEND_SGE: u32 = 32;
/// Most inline bytes a descriptor carries.
pub(crate) const MAX_INLINE: u32 = 1024;

mod field {
    pub const MAGIC: usize = 0;
    pub const DEPTH: usize = 4;
    pub const SLOT: usize = 8;
    pub const MAX_SGE: usize = 12;
    pub const INLINE: usize = 16;
    pub const RNR_RETRY: usize = 20;
    pub const P_CLOSED: usize = 24;
    pub const ACKED: usize = 64;
    pub const NAK_PSN: usize = 72;
    pub const NAK_STATUS: usize = 80;
    pub const RNR: usize = 84;
    pub const C_CLOSED: usize = 88;
    // in a slot
    pub const SEQ: usize = 0;
    pub const OP: usize = 8;
    pub const FLAGS: usize = 9;
    pub const NSGE: usize = 10;
    pub const LEN: usize = 12;
    pub const IMM: usize = 16;
    pub const INV: usize = 20;
    pub const RADDR: usize = 24;
    pub const RKEY: usize = 32;
    pub const ACK: usize = 40;
}

/// Descriptor opcodes on the wire.
pub(crate) use crate::soft::op;
/// Descriptor flag: the payload is inline.
pub(crate) const F_INLINE: u8 = 1;

/// Region id meaning "not shareable".
pub(crate) const NO_REGION: u32 = u32::MAX;

/// A descriptor as the receiver reads it (copied out of shared memory once).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Desc {
    pub op: u8,
    pub flags: u8,
    pub nsge: u16,
    pub len: u32,
    pub imm: u32,
    pub inv: u32,
    pub raddr: u64,
    pub rkey: u32,
    /// Descriptors of the reverse ring the sender has executed.
    pub ack: u64,
}

/// One sg entry on the wire: where in the sender's shareable memory.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WireSge {
    pub region: u32,
    pub len: u32,
    pub off: u64,
}

/// A ring mapping with its geometry read once (never re-read from shared
/// memory, which the peer could change under us).
#[derive(Debug)]
pub(crate) struct Ring {
    map: Mapping,
    mask: u64,
    slot_size: usize,
    pub max_sge: u32,
    pub inline_cap: u32,
    pub rnr_retry: u8,
}

fn slot_size(max_sge: u32, inline: u32) -> usize {
    let body = (max_sge as usize * WIRE_SGE).max(inline as usize);
    (SLOT_HDR + body).div_ceil(64) * 64
}

impl Ring {
    /// Creates the outbound ring of a QP with capabilities `cap`.
    pub(crate) fn create(cap: &QpCap) -> Result<(OwnedFd, Ring)> {
        if cap.max_send_sge > MAX_SEND_SGE {
            return Err(FabricError::InvalidWr("max_send_sge above 32"));
        }
        if cap.max_inline_data > MAX_INLINE {
            return Err(FabricError::InvalidWr("max_inline_data above 1024"));
        }
        let depth = cap.max_send_wr.max(1).next_power_of_two();
        if depth > MAX_DEPTH {
            return Err(FabricError::InvalidWr("max_send_wr above 1M"));
        }
        let slot = slot_size(cap.max_send_sge, cap.max_inline_data);
        let len = HDR + depth as usize * slot;
        let (fd, map) = Mapping::memfd("rtrs-shm-ring", len)?;
        let ring = Ring {
            map,
            mask: u64::from(depth - 1),
            slot_size: slot,
            max_sge: cap.max_send_sge,
            inline_cap: cap.max_inline_data,
            rnr_retry: cap.rnr_retry.min(7),
        };
        ring.put_u32(field::DEPTH, depth);
        ring.put_u32(field::SLOT, slot as u32);
        ring.put_u32(field::MAX_SGE, cap.max_send_sge);
        ring.put_u32(field::INLINE, cap.max_inline_data);
        ring.put_u32(field::RNR_RETRY, u32::from(ring.rnr_retry));
        ring.atomic32(field::MAGIC).store(MAGIC, Ordering::Release);
        Ok((fd, ring))
    }

    /// Maps a peer's ring and checks its geometry.
    pub(crate) fn open(pid: u32, fd: i32, len: u64) -> Result<Ring> {
        let len = usize::try_from(len).map_err(|_| FabricError::Protocol("ring length"))?;
        if len < HDR || len > HDR + MAX_DEPTH as usize * slot_size(MAX_SEND_SGE, MAX_INLINE) {
            return Err(FabricError::Protocol("ring length out of range"));
        }
        let map = Mapping::map_peer(pid, fd, len)?;
        let mut ring = Ring {
            map,
            mask: 0,
            slot_size: 64,
            max_sge: 0,
            inline_cap: 0,
            rnr_retry: 7,
        };
        if ring.atomic32(field::MAGIC).load(Ordering::Acquire) != MAGIC {
            return Err(FabricError::Protocol("peer ring has a bad magic"));
        }
        let depth = ring.get_u32(field::DEPTH);
        let slot = ring.get_u32(field::SLOT) as usize;
        let max_sge = ring.get_u32(field::MAX_SGE);
        let inline = ring.get_u32(field::INLINE);
        if !depth.is_power_of_two()
            || depth > MAX_DEPTH
            || max_sge > MAX_SEND_SGE
            || inline > MAX_INLINE
            || slot != slot_size(max_sge, inline)
            || HDR + depth as usize * slot != len
        {
            return Err(FabricError::Protocol("peer ring geometry is inconsistent"));
        }
        ring.mask = u64::from(depth - 1);
        ring.slot_size = slot;
        ring.max_sge = max_sge;
        ring.inline_cap = inline;
        ring.rnr_retry = ring.get_u32(field::RNR_RETRY).min(7) as u8;
        Ok(ring)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    fn atomic32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: off is a 4-aligned header offset < HDR <= len; the mapping is
        // page aligned and lives as long as &self.
        unsafe { &*(self.map.ptr().add(off) as *const AtomicU32) }
    }
    fn atomic64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as atomic32, 8-aligned.
        unsafe { &*(self.map.ptr().add(off) as *const AtomicU64) }
    }
    fn put_u32(&self, off: usize, v: u32) {
        self.atomic32(off).store(v, Ordering::Relaxed);
    }
    fn get_u32(&self, off: usize) -> u32 {
        self.atomic32(off).load(Ordering::Relaxed)
    }

    fn slot(&self, psn: u64) -> *mut u8 {
        let i = (psn & self.mask) as usize;
        // SAFETY: i < depth, and HDR + depth * slot_size == len.
        unsafe { self.map.ptr().add(HDR + i * self.slot_size) }
    }
    fn slot_seq(&self, psn: u64) -> &AtomicU64 {
        // SAFETY: the slot start is 64-aligned inside the mapping.
        unsafe { &*(self.slot(psn).add(field::SEQ) as *const AtomicU64) }
    }

    // ---- producer side ----

    /// Writes descriptor `d` for `psn` with `sges` (or `inline` bytes), then
    /// publishes it. The caller guarantees the slot is free (psn - acked < depth),
    /// that `inline` segments are readable and total at most `inline_cap` bytes.
    pub(crate) fn publish(
        &self,
        psn: u64,
        d: &Desc,
        sges: &[WireSge],
        inline: &[(*const u8, usize)],
    ) {
        let s = self.slot(psn);
        // SAFETY: all offsets are inside this slot; the consumer reads them only
        // after the Release store of seq below.
        unsafe {
            s.add(field::OP).write(d.op);
            s.add(field::FLAGS).write(d.flags);
            (s.add(field::NSGE) as *mut u16).write_unaligned(d.nsge);
            (s.add(field::LEN) as *mut u32).write_unaligned(d.len);
            (s.add(field::IMM) as *mut u32).write_unaligned(d.imm);
            (s.add(field::INV) as *mut u32).write_unaligned(d.inv);
            (s.add(field::RADDR) as *mut u64).write_unaligned(d.raddr);
            (s.add(field::RKEY) as *mut u32).write_unaligned(d.rkey);
            (s.add(field::ACK) as *mut u64).write_unaligned(d.ack);
            let body = s.add(SLOT_HDR);
            if d.flags & F_INLINE != 0 {
                let mut off = 0;
                for &(p, n) in inline {
                    if off + n > self.inline_cap as usize {
                        break;
                    }
                    std::ptr::copy_nonoverlapping(p, body.add(off), n);
                    off += n;
                }
            } else {
                for (i, g) in sges.iter().enumerate() {
                    let e = body.add(i * WIRE_SGE);
                    (e as *mut u32).write_unaligned(g.region);
                    (e.add(4) as *mut u32).write_unaligned(g.len);
                    (e.add(8) as *mut u64).write_unaligned(g.off);
                }
            }
        }
        self.slot_seq(psn).store(psn + 1, Ordering::Release);
    }

    /// How far the receiver got (clamped to what was published).
    pub(crate) fn acked(&self, published: u64) -> u64 {
        self.atomic64(field::ACKED)
            .load(Ordering::Acquire)
            .min(published)
    }
    /// The receiver's refusal, if any: (psn, status code).
    pub(crate) fn nak(&self) -> Option<(u64, u32)> {
        let st = self.atomic32(field::NAK_STATUS).load(Ordering::Acquire);
        (st != 0).then(|| (self.atomic64(field::NAK_PSN).load(Ordering::Relaxed), st))
    }
    /// Marks the ring closed by its producer.
    pub(crate) fn close_producer(&self) {
        self.atomic32(field::P_CLOSED).store(1, Ordering::Release);
    }
    /// Whether the consumer closed the ring.
    pub(crate) fn consumer_closed(&self) -> bool {
        self.atomic32(field::C_CLOSED).load(Ordering::Acquire) != 0
    }

    // ---- consumer side ----

    /// Reads the descriptor for `psn` if it has been published.
    pub(crate) fn peek(&self, psn: u64) -> Option<Desc> {
        if self.slot_seq(psn).load(Ordering::Acquire) != psn + 1 {
            return None;
        }
        let s = self.slot(psn);
        // SAFETY: inside the slot; published before seq (Acquire above). A hostile
        // peer may change the bytes, which only yields values we validate.
        unsafe {
            Some(Desc {
                op: s.add(field::OP).read_volatile(),
                flags: s.add(field::FLAGS).read_volatile(),
                nsge: (s.add(field::NSGE) as *const u16).read_unaligned(),
                len: (s.add(field::LEN) as *const u32).read_unaligned(),
                imm: (s.add(field::IMM) as *const u32).read_unaligned(),
                inv: (s.add(field::INV) as *const u32).read_unaligned(),
                raddr: (s.add(field::RADDR) as *const u64).read_unaligned(),
                rkey: (s.add(field::RKEY) as *const u32).read_unaligned(),
                ack: (s.add(field::ACK) as *const u64).read_unaligned(),
            })
        }
    }

    /// The sg entries of the descriptor at `psn`, at most `nsge` (callers
    /// checked nsge <= max_sge; more are not read).
    pub(crate) fn sges(&self, psn: u64, nsge: usize) -> impl Iterator<Item = WireSge> + '_ {
        let body = self.slot(psn).wrapping_add(SLOT_HDR);
        (0..nsge.min(self.max_sge as usize)).map(move |i| {
            // SAFETY: i < max_sge, and the slot body holds max_sge entries.
            unsafe {
                let e = body.add(i * WIRE_SGE);
                WireSge {
                    region: (e as *const u32).read_unaligned(),
                    len: (e.add(4) as *const u32).read_unaligned(),
                    off: (e.add(8) as *const u64).read_unaligned(),
                }
            }
        })
    }

    /// The inline payload of the descriptor at `psn` (len checked <= inline_cap).
    pub(crate) fn inline(&self, psn: u64, len: u32) -> (*const u8, usize) {
        let len = len.min(self.inline_cap) as usize;
        (self.slot(psn).wrapping_add(SLOT_HDR) as *const u8, len)
    }

    /// Publishes progress: every psn below `acked` is done.
    pub(crate) fn ack(&self, acked: u64) {
        self.atomic64(field::ACKED).store(acked, Ordering::Release);
    }
    /// Refuses `psn` with `status` (the ring is dead after this).
    pub(crate) fn refuse(&self, psn: u64, status: u32) {
        self.atomic64(field::NAK_PSN).store(psn, Ordering::Relaxed);
        self.atomic32(field::NAK_STATUS)
            .store(status, Ordering::Release);
    }
    /// Says whether the receiver is stalled for lack of a posted receive.
    pub(crate) fn set_rnr(&self, stalled: bool) {
        self.atomic32(field::RNR)
            .store(u32::from(stalled), Ordering::Relaxed);
    }
    /// Marks the ring closed by its consumer.
    pub(crate) fn close_consumer(&self) {
        self.atomic32(field::C_CLOSED).store(1, Ordering::Release);
    }
    /// Whether the producer closed the ring.
    pub(crate) fn producer_closed(&self) -> bool {
        self.atomic32(field::P_CLOSED).load(Ordering::Acquire) != 0
    }
}
