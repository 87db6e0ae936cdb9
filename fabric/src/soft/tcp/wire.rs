//! The tcp wire: frames on the one TCP connection of a queue pair.
//!
//! Every frame is a 48-byte header, then `piece` payload bytes. A message (a
//! request, or the response to an RDMA READ) travels as one or more pieces of
//! at most the sender's piece size, so requests and responses interleave at
//! piece boundaries and an acknowledgement never waits behind a long payload.
//!
//! ```text
//!   0 kind  1 op  2 flags  3 -   4 piece (payload bytes after the header)
//!   8 psn                        16 ack (peer requests executed: all psns below)
//!  24 total (message length)    28 off (of this piece in the message)
//!  32 raddr                      40 rkey  44 word (imm, invalidated rkey, or NAK status)
//! ```
//! All fields are little-endian. `ack` rides on every frame.

/// Header length in bytes.
pub const HDR: usize = 48;
/// Largest piece a receiver accepts (the sender picks its own, up to this).
pub const MAX_PIECE: u32 = 1 << 20;
/// Most sg entries a send work request may have.
pub const MAX_SEND_SGE: u32 = 32;
/// Most inline bytes a send work request may carry.
pub const MAX_INLINE: u32 = 1024;

/// Frame kinds.
pub mod kind {
    /// A piece of a request (its `op` says which).
    pub const REQ: u8 = 1;
    /// A piece of an RDMA READ response; `psn` is the READ's.
    pub const RESP: u8 = 2;
    /// Acknowledgement only (no payload).
    pub const ACK: u8 = 3;
    /// Fatal refusal of request `psn` with status `word` (ibv code).
    pub const NAK: u8 = 4;
    /// Receiver not ready for request `psn`: retry it (and all after it) later.
    pub const RNR_NAK: u8 = 5;
}

/// Request opcodes (`word`: the immediate of SEND_IMM and WRITE_IMM, the
/// rkey of SEND_INV; READ carries no payload).
pub use crate::soft::op;

/// First piece of a message.
pub const F_FIRST: u8 = 1;
/// Last piece of a message.
pub const F_LAST: u8 = 2;
/// The initiator wants this request acknowledged promptly (it is signaled, or
/// its send queue needs room): the responder sends an ACK if nothing else
/// carries one.
pub const F_ACKREQ: u8 = 4;

/// A frame header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    /// Frame kind (`kind::*`).
    pub kind: u8,
    /// Request opcode (`op::*`; REQ frames only).
    pub op: u8,
    /// `F_FIRST`, `F_LAST`, `F_ACKREQ`.
    pub flags: u8,
    /// Payload bytes after the header.
    pub piece: u32,
    /// The request's sequence number (of the READ for RESP, of the refused
    /// request for NAKs).
    pub psn: u64,
    /// How many of the peer's requests the sender has executed.
    pub ack: u64,
    /// Message length.
    pub total: u32,
    /// Offset of this piece in the message.
    pub off: u32,
    /// Remote address (WRITE, READ).
    pub raddr: u64,
    /// Remote key (WRITE, READ).
    pub rkey: u32,
    /// Immediate, rkey to invalidate, or NAK status.
    pub word: u32,
}

impl Hdr {
    /// Writes the header into the first `HDR` bytes of `b`.
    pub fn write(&self, b: &mut [u8]) {
        let b = &mut b[..HDR];
        b[0] = self.kind;
        b[1] = self.op;
        b[2] = self.flags;
        b[3] = 0;
        b[4..8].copy_from_slice(&self.piece.to_le_bytes());
        b[8..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..24].copy_from_slice(&self.ack.to_le_bytes());
        b[24..28].copy_from_slice(&self.total.to_le_bytes());
        b[28..32].copy_from_slice(&self.off.to_le_bytes());
        b[32..40].copy_from_slice(&self.raddr.to_le_bytes());
        b[40..44].copy_from_slice(&self.rkey.to_le_bytes());
        b[44..48].copy_from_slice(&self.word.to_le_bytes());
    }

    /// Reads a header from the first `HDR` bytes of `b` (unchecked: see
    /// [`Hdr::parse`]).
    pub fn read(b: &[u8]) -> Hdr {
        let b = &b[..HDR];
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        Hdr {
            kind: b[0],
            op: b[1],
            flags: b[2],
            piece: u32_at(4),
            psn: u64_at(8),
            ack: u64_at(16),
            total: u32_at(24),
            off: u32_at(28),
            raddr: u64_at(32),
            rkey: u32_at(40),
            word: u32_at(44),
        }
    }

    /// A checked header from the first `HDR` bytes of `b`: too short, or a
    /// field out of range, is an error naming it.
    pub fn parse(b: &[u8]) -> Result<Hdr, &'static str> {
        if b.len() < HDR {
            return Err("frame header shorter than 48 bytes");
        }
        let h = Hdr::read(b);
        h.check()?;
        Ok(h)
    }

    /// Whether the header is well formed on its own (kind, op, piece
    /// bounds), and if not, what is wrong.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.piece > MAX_PIECE {
            return Err("frame piece above 1 MiB");
        }
        let in_bounds = u64::from(self.off) + u64::from(self.piece) <= u64::from(self.total);
        match self.kind {
            kind::REQ if !(op::SEND..=op::READ).contains(&self.op) => Err("unknown request opcode"),
            kind::REQ if self.op == op::READ && self.piece != 0 => {
                Err("READ request with a payload")
            }
            kind::REQ | kind::RESP if !in_bounds => Err("frame piece beyond its message"),
            kind::REQ | kind::RESP => Ok(()),
            kind::ACK | kind::NAK | kind::RNR_NAK if self.piece != 0 => {
                Err("control frame with a payload")
            }
            kind::ACK | kind::NAK | kind::RNR_NAK => Ok(()),
            _ => Err("unknown frame kind"),
        }
    }

    /// Whether the header is well formed on its own.
    pub fn sane(&self) -> bool {
        self.check().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Hdr {
            kind: kind::REQ,
            op: op::WRITE_IMM,
            flags: F_FIRST | F_ACKREQ,
            piece: 4096,
            psn: 0x0102_0304_0506_0708,
            ack: u64::MAX - 3,
            total: 1 << 20,
            off: 0,
            raddr: 0xdead_beef_0000_1000,
            rkey: 0x1234_5601,
            word: 0xcafe_f00d,
        };
        let mut b = [0u8; HDR];
        h.write(&mut b);
        assert_eq!(Hdr::read(&b), h);
        assert!(h.sane());
    }

    #[test]
    fn insane_headers_are_refused() {
        let ok = Hdr {
            kind: kind::REQ,
            op: op::SEND,
            piece: 10,
            total: 10,
            ..Hdr::default()
        };
        assert!(ok.sane());
        assert!(!Hdr { kind: 9, ..ok }.sane());
        assert!(!Hdr { op: 0, ..ok }.sane());
        assert!(!Hdr { off: 1, ..ok }.sane());
        assert!(!Hdr { op: op::READ, ..ok }.sane());
        assert!(!Hdr {
            kind: kind::ACK,
            ..ok
        }
        .sane());
        assert!(!Hdr {
            piece: MAX_PIECE + 1,
            total: u32::MAX,
            ..ok
        }
        .sane());
    }
}
