//! Where an IO request sits in a server chunk.
//!
//! ```text
//!  WRITE: [ data (data_len) ][ user header (usr_len) ][ rdma_write (4) ]
//!  READ:  [ room for read data (data_len), not written ][ user header ][ rdma_read (8 + 16·n) ]
//!                                                                      ^ imm offset = data_len + usr_len
//! ```
//! The client RDMA-writes everything from chunk offset 0 (WRITE) or
//! `data_len` (READ) up to the end of the message, in one WRITE_WITH_IMM whose
//! immediate carries the chunk id and the message's offset.

use super::rtrs::{MsgType, RdmaRead, RdmaReadRepr, RdmaWrite, RdmaWriteRepr};
use super::{le, need, ProtoError, Result};

/// A decoded IO request: zero-copy views into the chunk.
#[derive(Debug, Clone, Copy)]
pub struct IoReq<'a> {
    /// The user header (an RNBD message, for RNBD).
    pub usr: &'a [u8],
    /// Write or read, with what each carries.
    pub kind: IoReqKind<'a>,
}

/// The two kinds of IO request.
#[derive(Debug, Clone, Copy)]
pub enum IoReqKind<'a> {
    /// The data the client wrote, at chunk offset 0.
    Write {
        /// The written data.
        data: &'a [u8],
    },
    /// A read of `data_len` bytes into the client buffer `msg.descs()`; the
    /// server puts the data at chunk offset 0 and RDMA-writes it from there.
    Read {
        /// Chunk bytes reserved for the read data.
        data_len: u32,
        /// The read message with the client's buffer descriptor.
        msg: RdmaRead<&'a [u8]>,
    },
}

impl IoReq<'_> {
    /// Bytes of data the request moves (written, or to read).
    pub fn data_len(&self) -> u32 {
        match self.kind {
            IoReqKind::Write { data } => data.len() as u32,
            IoReqKind::Read { data_len, .. } => data_len,
        }
    }
}

/// Decodes the IO request whose message sits at `off` of `chunk` (the
/// immediate's offset). Validates what the message says against the chunk:
/// the user header must fit before the message, the message inside the
/// chunk, and a read's client buffer in the room the client reserved.
pub fn parse(chunk: &[u8], off: u32) -> Result<IoReq<'_>> {
    const MSG: &str = "io request";
    let off = off as usize;
    need(MSG, chunk.len(), off.saturating_add(4))?;
    let msg = &chunk[off..];
    let usr_len = le::u16(msg, 2) as usize;
    if usr_len > off {
        return Err(ProtoError::BadField {
            msg: MSG,
            field: "usr_len",
            got: usr_len as u64,
            why: "user header does not fit before the message",
        });
    }
    let usr = &chunk[off - usr_len..off];
    let data_len = off - usr_len;
    match MsgType::from_u16(le::u16(msg, 0))? {
        MsgType::Write => {
            RdmaWrite::new_checked(msg)?;
            Ok(IoReq {
                usr,
                kind: IoReqKind::Write {
                    data: &chunk[..data_len],
                },
            })
        }
        MsgType::Read => {
            let rd = RdmaRead::new_checked(msg)?;
            if let Some(d) = rd.descs().get(0) {
                if d.len as usize > data_len {
                    return Err(ProtoError::BadField {
                        msg: MSG,
                        field: "desc.len",
                        got: d.len.into(),
                        why: "read is longer than the chunk room reserved for it",
                    });
                }
            }
            Ok(IoReq {
                usr,
                kind: IoReqKind::Read {
                    data_len: data_len as u32,
                    msg: rd,
                },
            })
        }
        t => Err(ProtoError::BadType {
            msg: MSG,
            got: t as u16,
            want: MsgType::Write as u16,
        }),
    }
}

/// The immediate offset of a request: `data_len + usr_len`.
pub fn msg_off(data_len: u32, usr_len: usize) -> u32 {
    data_len + usr_len as u32
}

fn usr_len(usr: &[u8]) -> Result<u16> {
    u16::try_from(usr.len()).map_err(|_| ProtoError::BadField {
        msg: "io request",
        field: "usr_len",
        got: usr.len() as u64,
        why: "must fit in 16 bits",
    })
}

/// Writes the tail of a WRITE request (user header, then rdma_write) into
/// `out`; returns its length. The data goes before it in the chunk.
pub fn emit_write_tail(out: &mut [u8], usr: &[u8]) -> Result<usize> {
    let ul = usr_len(usr)?;
    let n = usr.len() + RdmaWrite::<&[u8]>::LEN;
    super::room("io request", out, n)?;
    out[..usr.len()].copy_from_slice(usr);
    RdmaWriteRepr { usr_len: ul }.emit(&mut out[usr.len()..])?;
    Ok(n)
}

/// Writes the tail of a READ request (user header, then rdma_read with `rd`'s
/// descriptor) into `out`; returns its length. `rd.usr_len` is set from `usr`.
pub fn emit_read_tail(out: &mut [u8], usr: &[u8], rd: RdmaReadRepr) -> Result<usize> {
    let rd = RdmaReadRepr {
        usr_len: usr_len(usr)?,
        ..rd
    };
    let n = usr.len() + rd.buffer_len();
    super::room("io request", out, n)?;
    out[..usr.len()].copy_from_slice(usr);
    rd.emit(&mut out[usr.len()..])?;
    Ok(n)
}
