//! The kernel's wire protocol, without I/O: RTRS 2.0 and RNBD 2.0, byte-exact
//! with Linux 6.1 (docs/rtrs-wire-spec.md in ../shared has every layout).
//!
//! ```text
//!  rdma_cm private data   conn_req (56 B) ──>      <── conn_rsp (56 B, accept or reject)
//!  SEND on cid 0          info_req (272 B) ──>     <── info_rsp (8 + 16·n: one sg_desc per server MR)
//!  WRITE_WITH_IMM         chunk: [data][user hdr][rdma_write | rdma_read + sg_desc] ──> imm = io_req
//!  WRITE_WITH_IMM (0 B)                            <── imm = io_rsp(msg_id, errno)
//!  SEND_WITH_IMM                                   <── rkey_rsp (8 B) + imm = io_rsp   (always_invalidate)
//!  WRITE_WITH_IMM (0 B)   imm = hb_msg / hb_ack, both ways, on cid 0
//!  RNBD                   messages ride as the RTRS user header (sess_info, open, close, io),
//!                         answers to sess_info/open as READ data
//! ```
//!
//! Each message comes in two shapes, as smoltcp does it:
//! - a **view** (`ConnReq<T: AsRef<[u8]>>`, ...) over the buffer it arrived in.
//!   `new_checked` validates everything once (length, magic, version, type,
//!   counts, reserved bits), so no accessor can panic and nothing is copied;
//! - a **repr** (`ConnReqRepr`, ...), a plain value that `emit`s itself into a
//!   buffer and is `parse`d back from a view.
//!
//! Every malformed input gives a [`ProtoError`] that names the message and the
//! field. Nothing here allocates, so the per-IO messages can be decoded on a
//! core's hot path.

pub mod chunk;
pub mod imm;
pub mod rnbd;
pub mod rtrs;

pub use chunk::{IoReq, IoReqKind};
pub use imm::{Imm, ImmLayout};
pub use rtrs::*;

/// RTRS magic, in every conn_req and conn_rsp.
pub const MAGIC: u16 = 0x1BBD;
/// RTRS protocol version as sent: `(major << 8) | minor` = 2.0.
pub const VERSION: u16 = 0x0200;
/// The only major version either side accepts (the minor is ignored).
pub const VERSION_MAJOR: u8 = 2;
/// Most paths a session may have.
pub const MAX_PATHS_NUM: usize = 128;
/// Smallest `max_chunk_size` a server may use.
pub const MIN_CHUNK_SIZE: u32 = 8192;
/// Largest session queue depth (number of chunks).
pub const MAX_SESS_QUEUE_DEPTH: u32 = 65535;
/// Queue depth of the service connection (cid 0).
pub const SERVICE_CON_QUEUE_DEPTH: u32 = 512;
/// Kernel default `max_chunk_size` (bytes).
pub const DEFAULT_MAX_CHUNK_SIZE: u32 = 128 << 10;
/// Kernel default `sess_queue_depth`.
pub const DEFAULT_SESS_QUEUE_DEPTH: u32 = 512;
/// Header reserve of a chunk: the server's PAGE_SIZE. `max_io_size` is
/// `max_chunk_size - MAX_HDR_SIZE`.
pub const MAX_HDR_SIZE: u32 = 4096;
/// Most connections (cid_num) the kernel server accepts in one path.
pub const MAX_CID_NUM: u16 = 4096;
/// The rdma_cm private data RTRS uses for conn_req and conn_rsp.
pub const PRIVATE_DATA_LEN: usize = 56;
/// The port RNBD listens on by default.
pub const RTRS_PORT: u16 = 1234;
/// `NAME_MAX`: the sessname and RNBD device-name fields.
pub const NAME_MAX: usize = 255;

/// `bits(n)` as the kernel computes it (`ilog2(n - 1) + 1`): `ceil(log2(n))`
/// for n >= 2 and 0 for n <= 1.
pub const fn bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// A malformed or unencodable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The buffer is shorter than the message needs.
    #[error("{msg}: {len} bytes, need at least {need}")]
    Truncated {
        /// The message being decoded.
        msg: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The buffer is too small to emit the message into.
    #[error("{msg}: output buffer of {len} bytes, need {need}")]
    NoRoom {
        /// The message being encoded.
        msg: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Wrong magic.
    #[error("{msg}: bad magic {got:#06x} (want 0x1bbd)")]
    BadMagic {
        /// The message.
        msg: &'static str,
        /// The magic found.
        got: u16,
    },
    /// Unsupported major version.
    #[error("{msg}: unsupported version {got:#06x} (want major {VERSION_MAJOR})")]
    BadVersion {
        /// The message.
        msg: &'static str,
        /// The version found.
        got: u16,
    },
    /// The type field names another message.
    #[error("{msg}: type {got}, want {want}")]
    BadType {
        /// The message.
        msg: &'static str,
        /// The type found.
        got: u16,
        /// The type this message has.
        want: u16,
    },
    /// An unknown message type.
    #[error("{msg}: unknown type {got}")]
    UnknownType {
        /// The protocol layer.
        msg: &'static str,
        /// The type found.
        got: u32,
    },
    /// Reserved bits or bytes are not zero.
    #[error("{msg}: reserved {field} not zero")]
    Reserved {
        /// The message.
        msg: &'static str,
        /// The reserved field.
        field: &'static str,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{msg}: {field} = {got} is invalid: {why}")]
    BadField {
        /// The message.
        msg: &'static str,
        /// The field.
        field: &'static str,
        /// Its value.
        got: u64,
        /// What the protocol requires.
        why: &'static str,
    },
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, ProtoError>;

/// Little-endian readers and writers for offsets already bounds-checked by a
/// view's `new_checked`. Out of range is a bug, not malformed input.
pub(crate) mod le {
    pub(crate) fn u16(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    pub(crate) fn u32(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }
    pub(crate) fn u64(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes([
            b[o],
            b[o + 1],
            b[o + 2],
            b[o + 3],
            b[o + 4],
            b[o + 5],
            b[o + 6],
            b[o + 7],
        ])
    }
    pub(crate) fn put16(b: &mut [u8], o: usize, v: u16) {
        b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn put32(b: &mut [u8], o: usize, v: u32) {
        b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn put64(b: &mut [u8], o: usize, v: u64) {
        b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// Fails with `Truncated` unless `len >= need`.
pub(crate) fn need(msg: &'static str, len: usize, need: usize) -> Result<()> {
    if len < need {
        Err(ProtoError::Truncated { msg, len, need })
    } else {
        Ok(())
    }
}

/// Fails with `NoRoom` unless the output has `need` bytes; returns its head.
pub(crate) fn room<'a>(msg: &'static str, buf: &'a mut [u8], need: usize) -> Result<&'a mut [u8]> {
    let len = buf.len();
    buf.get_mut(..need)
        .ok_or(ProtoError::NoRoom { msg, len, need })
}

/// Fails with `BadType` unless the LE u16 at the head of `b` is `want`.
pub(crate) fn check_type(msg: &'static str, b: &[u8], want: u16) -> Result<()> {
    let got = le::u16(b, 0);
    if got != want {
        return Err(ProtoError::BadType { msg, got, want });
    }
    Ok(())
}

/// Fails with `Reserved` unless every byte of `b` is zero.
pub(crate) fn zeros(msg: &'static str, field: &'static str, b: &[u8]) -> Result<()> {
    if b.iter().all(|&x| x == 0) {
        Ok(())
    } else {
        Err(ProtoError::Reserved { msg, field })
    }
}

/// The NUL-terminated UTF-8 string at the head of a fixed-size name field.
pub(crate) fn cstr<'a>(msg: &'static str, field: &'static str, b: &'a [u8]) -> Result<&'a str> {
    let end = b.iter().position(|&x| x == 0).ok_or(ProtoError::BadField {
        msg,
        field,
        got: b.len() as u64,
        why: "no NUL terminator",
    })?;
    std::str::from_utf8(&b[..end]).map_err(|e| ProtoError::BadField {
        msg,
        field,
        got: e.valid_up_to() as u64,
        why: "not UTF-8 at this byte",
    })
}

/// Writes `s` NUL-terminated and zero-padded into a fixed-size name field.
pub(crate) fn put_cstr(
    msg: &'static str,
    field: &'static str,
    b: &mut [u8],
    s: &str,
) -> Result<()> {
    if s.len() >= b.len() || s.as_bytes().contains(&0) {
        return Err(ProtoError::BadField {
            msg,
            field,
            got: s.len() as u64,
            why: "longer than the field allows (254 bytes) or holds a NUL",
        });
    }
    b.fill(0);
    b[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::bits;

    #[test]
    fn bits_matches_the_kernel() {
        assert_eq!(bits(0), 0);
        assert_eq!(bits(1), 0);
        assert_eq!(bits(2), 1);
        assert_eq!(bits(3), 2);
        assert_eq!(bits(4), 2);
        assert_eq!(bits(5), 3);
        assert_eq!(bits(512), 9);
        assert_eq!(bits(513), 10);
        assert_eq!(bits(2048), 11);
        assert_eq!(bits(128 << 10), 17);
        assert_eq!(bits(65535), 16);
    }
}
