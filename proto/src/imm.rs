//! The 32-bit RDMA immediate: 4 type bits (31..28) over 28 payload bits.
//!
//! Values here are host-order `u32`s, as the fabric API carries them; on real
//! verbs the immediate travels big-endian (`htonl`), see [`Imm::wire_bytes`].

use super::{bits, ProtoError, Result};

/// Immediate type of an IO request (client to server).
pub const IO_REQ_IMM: u32 = 0;
/// Immediate type of an IO response.
pub const IO_RSP_IMM: u32 = 1;
/// IO response whose read buffer the server already invalidated (SEND_WITH_INV).
pub const IO_RSP_W_INV_IMM: u32 = 2;
/// Heartbeat.
pub const HB_MSG_IMM: u32 = 8;
/// Heartbeat acknowledgement.
pub const HB_ACK_IMM: u32 = 9;

const PAYLOAD_MASK: u32 = (1 << 28) - 1;
const RSP_ID_BITS: u32 = 19;
const RSP_ID_MASK: u32 = (1 << RSP_ID_BITS) - 1;
/// A heartbeat's immediate (`0x80000000`).
pub const HB_MSG: u32 = Imm::join(HB_MSG_IMM, 0);
/// A heartbeat acknowledgement's immediate (`0x90000000`).
pub const HB_ACK: u32 = Imm::join(HB_ACK_IMM, 0);
/// Largest errno magnitude an IO response carries (9 bits).
pub const MAX_RSP_ERRNO: u32 = 0x1FF;

/// A decoded immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imm {
    /// IO request: the chunk (`buf_id`) and the byte offset of the RTRS message
    /// in it (`data_len + usr_len`).
    IoReq {
        /// Chunk index, below the queue depth.
        buf_id: u32,
        /// Offset of the IO message in the chunk.
        off: u32,
    },
    /// IO response for chunk `msg_id` with `errno` (0 or negative).
    IoRsp {
        /// Chunk index of the request.
        msg_id: u32,
        /// 0 or a negative errno, magnitude at most 511.
        errno: i32,
        /// The server invalidated the client's read rkey (type 2).
        inval: bool,
    },
    /// Heartbeat.
    HbMsg,
    /// Heartbeat acknowledgement.
    HbAck,
}

impl Imm {
    /// Splits an immediate into type and payload.
    pub fn split(imm: u32) -> (u32, u32) {
        (imm >> 28, imm & PAYLOAD_MASK)
    }

    /// Joins type and payload (the kernel's `rtrs_to_imm`).
    pub const fn join(ty: u32, payload: u32) -> u32 {
        ((ty & 0xF) << 28) | (payload & PAYLOAD_MASK)
    }

    /// Decodes a response-side immediate (what a client receives): IO
    /// responses and heartbeats.
    pub fn decode_clt(imm: u32) -> Result<Imm> {
        let (ty, payload) = Imm::split(imm);
        match ty {
            IO_RSP_IMM | IO_RSP_W_INV_IMM => Ok(Imm::IoRsp {
                msg_id: payload & RSP_ID_MASK,
                errno: -(((payload >> RSP_ID_BITS) & MAX_RSP_ERRNO) as i32),
                inval: ty == IO_RSP_W_INV_IMM,
            }),
            HB_MSG_IMM | HB_ACK_IMM => hb(ty, payload),
            got => Err(ProtoError::UnknownType { msg: "imm", got }),
        }
    }

    /// Encodes to the host-order value.
    pub fn encode(&self, layout: &ImmLayout) -> Result<u32> {
        Ok(match *self {
            Imm::IoReq { buf_id, off } => layout.io_req(buf_id, off)?,
            Imm::IoRsp {
                msg_id,
                errno,
                inval,
            } => io_rsp(msg_id, errno, inval)?,
            Imm::HbMsg => HB_MSG,
            Imm::HbAck => HB_ACK,
        })
    }

    /// The four bytes as they travel on verbs (big-endian).
    pub fn wire_bytes(imm: u32) -> [u8; 4] {
        imm.to_be_bytes()
    }
}

fn hb(ty: u32, payload: u32) -> Result<Imm> {
    if payload != 0 {
        return Err(ProtoError::Reserved {
            msg: "imm",
            field: "heartbeat payload",
        });
    }
    Ok(if ty == HB_MSG_IMM {
        Imm::HbMsg
    } else {
        Imm::HbAck
    })
}

/// Encodes an IO response: `(|errno| << 19) | msg_id` under type 1 or 2.
pub fn io_rsp(msg_id: u32, errno: i32, inval: bool) -> Result<u32> {
    let mag = errno.unsigned_abs();
    if errno > 0 || mag > MAX_RSP_ERRNO {
        return Err(ProtoError::BadField {
            msg: "imm",
            field: "errno",
            got: errno as i64 as u64,
            why: "must be 0 or a negative errno down to -511",
        });
    }
    if msg_id > RSP_ID_MASK {
        return Err(ProtoError::BadField {
            msg: "imm",
            field: "msg_id",
            got: msg_id.into(),
            why: "must fit in 19 bits",
        });
    }
    let ty = if inval { IO_RSP_W_INV_IMM } else { IO_RSP_IMM };
    Ok(Imm::join(ty, (mag << RSP_ID_BITS) | msg_id))
}

/// How an IO request immediate packs chunk id and offset for one session:
/// `mem_bits = 28 - bits(queue_depth)` low bits of offset, the id above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImmLayout {
    queue_depth: u32,
    max_chunk_size: u32,
    mem_bits: u32,
}

impl ImmLayout {
    /// The layout for a session of `queue_depth` chunks of `max_chunk_size`
    /// bytes. Fails where the kernel's server refuses to load: the two must
    /// fit 28 bits together.
    pub fn new(queue_depth: u32, max_chunk_size: u32) -> Result<ImmLayout> {
        if queue_depth == 0 || queue_depth > super::MAX_SESS_QUEUE_DEPTH {
            return Err(ProtoError::BadField {
                msg: "imm layout",
                field: "queue_depth",
                got: queue_depth.into(),
                why: "must be 1..=65535",
            });
        }
        if bits(queue_depth) + bits(max_chunk_size) > 28 || max_chunk_size == 0 {
            return Err(ProtoError::BadField {
                msg: "imm layout",
                field: "max_chunk_size",
                got: max_chunk_size.into(),
                why: "bits(queue_depth) + bits(max_chunk_size) must be <= 28",
            });
        }
        Ok(ImmLayout {
            queue_depth,
            max_chunk_size,
            mem_bits: 28 - bits(queue_depth),
        })
    }

    /// Offset bits of an IO request immediate.
    pub fn mem_bits(&self) -> u32 {
        self.mem_bits
    }

    /// The permit's `mem_off` for chunk `buf_id`: `buf_id << mem_bits`.
    pub fn mem_off(&self, buf_id: u32) -> u32 {
        buf_id << self.mem_bits
    }

    /// Encodes an IO request for chunk `buf_id`, message at `off`.
    pub fn io_req(&self, buf_id: u32, off: u32) -> Result<u32> {
        self.check(buf_id, off)?;
        Ok(Imm::join(IO_REQ_IMM, self.mem_off(buf_id) | off))
    }

    fn check(&self, buf_id: u32, off: u32) -> Result<()> {
        if buf_id >= self.queue_depth {
            return Err(ProtoError::BadField {
                msg: "imm",
                field: "buf_id",
                got: buf_id.into(),
                why: "must be below the queue depth",
            });
        }
        if off >= self.max_chunk_size {
            return Err(ProtoError::BadField {
                msg: "imm",
                field: "off",
                got: off.into(),
                why: "must be below max_chunk_size",
            });
        }
        Ok(())
    }

    /// Decodes a request-side immediate (what a server receives): IO requests
    /// with the kernel server's bounds (`buf_id < queue_depth`,
    /// `off < max_chunk_size`) and heartbeats.
    pub fn decode_srv(&self, imm: u32) -> Result<Imm> {
        let (ty, payload) = Imm::split(imm);
        match ty {
            IO_REQ_IMM => {
                let buf_id = payload >> self.mem_bits;
                let off = payload & ((1 << self.mem_bits) - 1);
                self.check(buf_id, off)?;
                Ok(Imm::IoReq { buf_id, off })
            }
            HB_MSG_IMM | HB_ACK_IMM => hb(ty, payload),
            got => Err(ProtoError::UnknownType { msg: "imm", got }),
        }
    }
}
