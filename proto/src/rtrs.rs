//! RTRS 2.0 messages: views over received bytes and reprs that emit them.

use super::{
    check_type, cstr, le, need, put_cstr, room, zeros, ProtoError, Result, MAGIC, MAX_CID_NUM,
    PRIVATE_DATA_LEN, VERSION, VERSION_MAJOR,
};

/// The `type` field of RTRS messages carried in SENDs and chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    /// Client's path info (sessname), SEND on cid 0.
    InfoReq = 0,
    /// Server's chunk descriptors, SEND on cid 0.
    InfoRsp = 1,
    /// IO write request, at the tail of the written chunk area.
    Write = 2,
    /// IO read request, at the tail of the written chunk area.
    Read = 3,
    /// A chunk's new rkey (always_invalidate), SEND_WITH_IMM.
    RkeyRsp = 4,
}

impl MsgType {
    /// The type of a message.
    pub fn from_u16(t: u16) -> Result<MsgType> {
        Ok(match t {
            0 => MsgType::InfoReq,
            1 => MsgType::InfoRsp,
            2 => MsgType::Write,
            3 => MsgType::Read,
            4 => MsgType::RkeyRsp,
            got => {
                return Err(ProtoError::UnknownType {
                    msg: "rtrs",
                    got: got.into(),
                })
            }
        })
    }
}

/// `RTRS_MSG_NEED_INVAL_F`: the client wants its read buffer invalidated.
pub const NEED_INVAL_F: u16 = 1 << 0;
/// `RTRS_MSG_NEW_RKEY_F`: the server refreshes chunk rkeys (always_invalidate).
pub const NEW_RKEY_F: u32 = 1 << 1;

fn check_magic_version(msg: &'static str, b: &[u8], at: usize) -> Result<()> {
    let magic = le::u16(b, at);
    if magic != MAGIC {
        return Err(ProtoError::BadMagic { msg, got: magic });
    }
    let version = le::u16(b, at + 2);
    if (version >> 8) as u8 != VERSION_MAJOR {
        return Err(ProtoError::BadVersion { msg, got: version });
    }
    Ok(())
}

// ---------------------------------------------------------------- conn_req

mod conn_req {
    pub const CMA: std::ops::Range<usize> = 0..2;
    pub const MAGIC: usize = 2;
    pub const CID: usize = 6;
    pub const CID_NUM: usize = 8;
    pub const RECON_CNT: usize = 10;
    pub const SESS_UUID: std::ops::Range<usize> = 12..28;
    pub const PATHS_UUID: std::ops::Range<usize> = 28..44;
    pub const FLAGS: usize = 44;
    pub const RESERVED: std::ops::Range<usize> = 45..56;
}

/// `rtrs_msg_conn_req`: the 56 bytes of rdma_connect private data.
#[derive(Debug, Clone, Copy)]
pub struct ConnReq<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> ConnReq<T> {
    /// Bytes on the wire.
    pub const LEN: usize = PRIVATE_DATA_LEN;
    const MSG: &'static str = "conn_req";

    /// Validates the private data of a connect request. AF_IB peers hand in
    /// 92 bytes: only the first 56 are RTRS's.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need(Self::MSG, b.len(), Self::LEN)?;
        zeros(Self::MSG, "cma bytes 0..2", &b[conn_req::CMA])?;
        check_magic_version(Self::MSG, b, conn_req::MAGIC)?;
        if b[conn_req::FLAGS] & !1 != 0 {
            return Err(ProtoError::Reserved {
                msg: Self::MSG,
                field: "bits 1..7 of byte 44",
            });
        }
        zeros(Self::MSG, "bytes 45..56", &b[conn_req::RESERVED])?;
        let (cid, cid_num) = (le::u16(b, conn_req::CID), le::u16(b, conn_req::CID_NUM));
        if cid_num == 0 || cid_num > MAX_CID_NUM {
            return Err(ProtoError::BadField {
                msg: Self::MSG,
                field: "cid_num",
                got: cid_num.into(),
                why: "must be 1..=4096",
            });
        }
        if cid >= cid_num {
            return Err(ProtoError::BadField {
                msg: Self::MSG,
                field: "cid",
                got: cid.into(),
                why: "must be below cid_num",
            });
        }
        Ok(ConnReq { buf })
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// The sender's protocol version (major in the high byte).
    pub fn version(&self) -> u16 {
        le::u16(self.b(), conn_req::MAGIC + 2)
    }
    /// Index of this connection in its path.
    pub fn cid(&self) -> u16 {
        le::u16(self.b(), conn_req::CID)
    }
    /// Connections in the path.
    pub fn cid_num(&self) -> u16 {
        le::u16(self.b(), conn_req::CID_NUM)
    }
    /// The path's reconnect counter.
    pub fn recon_cnt(&self) -> u16 {
        le::u16(self.b(), conn_req::RECON_CNT)
    }
    /// The path's uuid (the kernel's `sess_uuid`).
    pub fn sess_uuid(&self) -> [u8; 16] {
        uuid(&self.b()[conn_req::SESS_UUID])
    }
    /// The client session's uuid, the same on every path (`paths_uuid`).
    pub fn paths_uuid(&self) -> [u8; 16] {
        uuid(&self.b()[conn_req::PATHS_UUID])
    }
    /// Whether the server may create a session for `paths_uuid`.
    pub fn first_conn(&self) -> bool {
        self.b()[conn_req::FLAGS] & 1 != 0
    }
}

fn uuid(b: &[u8]) -> [u8; 16] {
    let mut u = [0; 16];
    u.copy_from_slice(&b[..16]);
    u
}

/// A conn_req to build or the plain value of one received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnReqRepr {
    /// Index of this connection in its path.
    pub cid: u16,
    /// Connections in the path.
    pub cid_num: u16,
    /// Reconnect counter of the path (the kernel sends 1 on the first round).
    pub recon_cnt: u16,
    /// The path's uuid.
    pub sess_uuid: [u8; 16],
    /// The client session's uuid.
    pub paths_uuid: [u8; 16],
    /// The server may create a new session for `paths_uuid`.
    pub first_conn: bool,
}

impl ConnReqRepr {
    /// Reads a validated view.
    pub fn parse<T: AsRef<[u8]>>(v: &ConnReq<T>) -> ConnReqRepr {
        ConnReqRepr {
            cid: v.cid(),
            cid_num: v.cid_num(),
            recon_cnt: v.recon_cnt(),
            sess_uuid: v.sess_uuid(),
            paths_uuid: v.paths_uuid(),
            first_conn: v.first_conn(),
        }
    }
    /// Writes the 56 bytes; returns their number.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let b = room("conn_req", buf, PRIVATE_DATA_LEN)?;
        b.fill(0);
        le::put16(b, conn_req::MAGIC, MAGIC);
        le::put16(b, conn_req::MAGIC + 2, VERSION);
        le::put16(b, conn_req::CID, self.cid);
        le::put16(b, conn_req::CID_NUM, self.cid_num);
        le::put16(b, conn_req::RECON_CNT, self.recon_cnt);
        b[conn_req::SESS_UUID].copy_from_slice(&self.sess_uuid);
        b[conn_req::PATHS_UUID].copy_from_slice(&self.paths_uuid);
        b[conn_req::FLAGS] = self.first_conn as u8;
        Ok(PRIVATE_DATA_LEN)
    }
}

// ---------------------------------------------------------------- conn_rsp

mod conn_rsp {
    pub const MAGIC: usize = 0;
    pub const ERRNO: usize = 4;
    pub const QUEUE_DEPTH: usize = 6;
    pub const MAX_IO_SIZE: usize = 8;
    pub const MAX_HDR_SIZE: usize = 12;
    pub const FLAGS: usize = 16;
    pub const RESERVED: std::ops::Range<usize> = 20..56;
}

/// `rtrs_msg_conn_rsp`: accept or reject private data, 56 bytes.
#[derive(Debug, Clone, Copy)]
pub struct ConnRsp<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> ConnRsp<T> {
    /// Bytes on the wire.
    pub const LEN: usize = PRIVATE_DATA_LEN;
    const MSG: &'static str = "conn_rsp";

    /// Validates accept or reject private data.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need(Self::MSG, b.len(), Self::LEN)?;
        check_magic_version(Self::MSG, b, conn_rsp::MAGIC)?;
        let errno = le::u16(b, conn_rsp::ERRNO) as i16;
        if errno > 0 {
            return Err(ProtoError::BadField {
                msg: Self::MSG,
                field: "errno",
                got: errno as u64,
                why: "must be 0 or a negative errno",
            });
        }
        let flags = le::u32(b, conn_rsp::FLAGS);
        if flags & !NEW_RKEY_F != 0 {
            return Err(ProtoError::Reserved {
                msg: Self::MSG,
                field: "flags other than NEW_RKEY",
            });
        }
        zeros(Self::MSG, "bytes 20..56", &b[conn_rsp::RESERVED])?;
        Ok(ConnRsp { buf })
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// 0 on accept, a negative errno on reject.
    pub fn errno(&self) -> i16 {
        le::u16(self.b(), conn_rsp::ERRNO) as i16
    }
    /// Chunks in the session.
    pub fn queue_depth(&self) -> u16 {
        le::u16(self.b(), conn_rsp::QUEUE_DEPTH)
    }
    /// Largest data length of one IO.
    pub fn max_io_size(&self) -> u32 {
        le::u32(self.b(), conn_rsp::MAX_IO_SIZE)
    }
    /// Room for user header and message in a chunk.
    pub fn max_hdr_size(&self) -> u32 {
        le::u32(self.b(), conn_rsp::MAX_HDR_SIZE)
    }
    /// `NEW_RKEY_F` or 0.
    pub fn flags(&self) -> u32 {
        le::u32(self.b(), conn_rsp::FLAGS)
    }
}

/// A conn_rsp to build or the plain value of one received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnRspRepr {
    /// 0 on accept, a negative errno on reject.
    pub errno: i16,
    /// Chunks in the session.
    pub queue_depth: u16,
    /// Largest data length of one IO.
    pub max_io_size: u32,
    /// Room for user header and message in a chunk.
    pub max_hdr_size: u32,
    /// The server refreshes chunk rkeys (`NEW_RKEY_F`).
    pub new_rkey: bool,
}

impl ConnRspRepr {
    /// A reject carrying `errno` (negative), as the kernel's server sends it.
    pub fn reject(errno: i16) -> ConnRspRepr {
        ConnRspRepr {
            errno: -(errno.unsigned_abs() as i16),
            ..ConnRspRepr::default()
        }
    }
    /// Reads a validated view.
    pub fn parse<T: AsRef<[u8]>>(v: &ConnRsp<T>) -> ConnRspRepr {
        ConnRspRepr {
            errno: v.errno(),
            queue_depth: v.queue_depth(),
            max_io_size: v.max_io_size(),
            max_hdr_size: v.max_hdr_size(),
            new_rkey: v.flags() & NEW_RKEY_F != 0,
        }
    }
    /// `max_io_size + max_hdr_size`, as the client derives it.
    pub fn chunk_size(&self) -> u64 {
        u64::from(self.max_io_size) + u64::from(self.max_hdr_size)
    }
    /// Writes the 56 bytes; returns their number.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        if self.errno > 0 {
            return Err(ProtoError::BadField {
                msg: "conn_rsp",
                field: "errno",
                got: self.errno as u64,
                why: "must be 0 or a negative errno",
            });
        }
        let b = room("conn_rsp", buf, PRIVATE_DATA_LEN)?;
        b.fill(0);
        le::put16(b, conn_rsp::MAGIC, MAGIC);
        le::put16(b, conn_rsp::MAGIC + 2, VERSION);
        le::put16(b, conn_rsp::ERRNO, self.errno as u16);
        le::put16(b, conn_rsp::QUEUE_DEPTH, self.queue_depth);
        le::put32(b, conn_rsp::MAX_IO_SIZE, self.max_io_size);
        le::put32(b, conn_rsp::MAX_HDR_SIZE, self.max_hdr_size);
        le::put32(
            b,
            conn_rsp::FLAGS,
            if self.new_rkey { NEW_RKEY_F } else { 0 },
        );
        Ok(PRIVATE_DATA_LEN)
    }
}

// ---------------------------------------------------------------- sg_desc

/// `rtrs_sg_desc`: a remote buffer, 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SgDesc {
    /// Remote virtual address (the MR's iova).
    pub addr: u64,
    /// rkey.
    pub key: u32,
    /// Length in bytes.
    pub len: u32,
}

impl SgDesc {
    /// Bytes on the wire.
    pub const LEN: usize = 16;
    fn read(b: &[u8], o: usize) -> SgDesc {
        SgDesc {
            addr: le::u64(b, o),
            key: le::u32(b, o + 8),
            len: le::u32(b, o + 12),
        }
    }
    fn write(&self, b: &mut [u8], o: usize) {
        le::put64(b, o, self.addr);
        le::put32(b, o + 8, self.key);
        le::put32(b, o + 12, self.len);
    }
}

/// The descriptors of an info_rsp or rdma_read, read in place.
#[derive(Debug, Clone, Copy)]
pub struct SgDescs<'a> {
    b: &'a [u8],
}

impl<'a> SgDescs<'a> {
    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.b.len() / SgDesc::LEN
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
    /// Descriptor `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<SgDesc> {
        (i < self.len()).then(|| SgDesc::read(self.b, i * SgDesc::LEN))
    }
    /// All descriptors, in order.
    pub fn iter(&self) -> impl Iterator<Item = SgDesc> + 'a {
        let b = self.b;
        (0..b.len() / SgDesc::LEN).map(move |i| SgDesc::read(b, i * SgDesc::LEN))
    }
}

// ---------------------------------------------------------------- info_req

/// `rtrs_msg_info_req`: the client's sessname, 272 bytes, SEND on cid 0.
#[derive(Debug, Clone, Copy)]
pub struct InfoReq<T: AsRef<[u8]>> {
    buf: T,
}

const INFO_REQ_NAME: std::ops::Range<usize> = 2..257;

impl<T: AsRef<[u8]>> InfoReq<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 272;
    const MSG: &'static str = "info_req";

    /// Validates length, type, the NUL-terminated UTF-8 name and the reserved
    /// tail (the kernel's buffer is zeroed).
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need(Self::MSG, b.len(), Self::LEN)?;
        check_type(Self::MSG, b, MsgType::InfoReq as u16)?;
        let name = cstr(Self::MSG, "pathname", &b[INFO_REQ_NAME])?;
        zeros(Self::MSG, "pathname after NUL", &b[2 + name.len()..257])?;
        zeros(Self::MSG, "bytes 257..272", &b[257..272])?;
        Ok(InfoReq { buf })
    }
    /// The client's session name.
    pub fn sessname(&self) -> &str {
        // Validated by new_checked; an empty name is the only fallback.
        cstr(Self::MSG, "pathname", &self.buf.as_ref()[INFO_REQ_NAME]).unwrap_or("")
    }
}

/// Builds an info_req.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoReqRepr<'a> {
    /// The client's session name, at most 254 bytes.
    pub sessname: &'a str,
}

impl InfoReqRepr<'_> {
    /// Writes the 272 bytes; returns their number.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let b = room("info_req", buf, 272)?;
        b.fill(0);
        le::put16(b, 0, MsgType::InfoReq as u16);
        put_cstr("info_req", "pathname", &mut b[INFO_REQ_NAME], self.sessname)?;
        Ok(272)
    }
}

/// What the kernel's server requires of a sessname beyond the wire format: no
/// `/` or `.` (it names a sysfs directory), and not empty.
pub fn check_sessname(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '.']) || name.len() >= super::NAME_MAX {
        return Err(ProtoError::BadField {
            msg: "info_req",
            field: "pathname",
            got: name.len() as u64,
            why: "must be 1..=254 bytes without '/' or '.'",
        });
    }
    Ok(())
}

// ---------------------------------------------------------------- info_rsp

/// `rtrs_msg_info_rsp`: the server's chunk descriptors, 8 + 16·sg_cnt bytes.
#[derive(Debug, Clone, Copy)]
pub struct InfoRsp<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> InfoRsp<T> {
    /// Bytes before the descriptors.
    pub const HDR_LEN: usize = 8;
    const MSG: &'static str = "info_rsp";

    /// Validates length, type, reserved bytes and that all `sg_cnt`
    /// descriptors are present.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need(Self::MSG, b.len(), Self::HDR_LEN)?;
        check_type(Self::MSG, b, MsgType::InfoRsp as u16)?;
        zeros(Self::MSG, "bytes 4..8", &b[4..8])?;
        let n = le::u16(b, 2) as usize;
        need(Self::MSG, b.len(), Self::HDR_LEN + n * SgDesc::LEN)?;
        Ok(InfoRsp { buf })
    }
    /// Number of descriptors.
    pub fn sg_cnt(&self) -> u16 {
        le::u16(self.buf.as_ref(), 2)
    }
    /// The descriptors, one per server MR.
    pub fn descs(&self) -> SgDescs<'_> {
        let n = self.sg_cnt() as usize;
        SgDescs {
            b: &self.buf.as_ref()[Self::HDR_LEN..Self::HDR_LEN + n * SgDesc::LEN],
        }
    }
}

/// Builds an info_rsp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRspRepr<'a> {
    /// One descriptor per server MR.
    pub descs: &'a [SgDesc],
}

impl InfoRspRepr<'_> {
    /// Bytes the message takes.
    pub fn buffer_len(&self) -> usize {
        8 + SgDesc::LEN * self.descs.len()
    }
    /// Writes the message; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let n = u16::try_from(self.descs.len()).map_err(|_| ProtoError::BadField {
            msg: "info_rsp",
            field: "sg_cnt",
            got: self.descs.len() as u64,
            why: "must fit in 16 bits",
        })?;
        let len = self.buffer_len();
        let b = room("info_rsp", buf, len)?;
        b[..8].fill(0);
        le::put16(b, 0, MsgType::InfoRsp as u16);
        le::put16(b, 2, n);
        for (i, d) in self.descs.iter().enumerate() {
            d.write(b, 8 + i * SgDesc::LEN);
        }
        Ok(len)
    }
}

/// The client's checks of an info_rsp against the conn_rsp of cid 0 (spec
/// §4.4): returns `(addr, rkey)` of chunk `i` through `chunk`, `queue_depth`
/// times, or an error naming what is wrong. `chunk_size` is
/// `max_io_size + max_hdr_size`.
pub fn slice_chunks<T: AsRef<[u8]>>(
    rsp: &InfoRsp<T>,
    queue_depth: u16,
    chunk_size: u64,
    mut chunk: impl FnMut(usize, u64, u32),
) -> Result<()> {
    const MSG: &str = "info_rsp";
    let bad = |field, got: u64, why| ProtoError::BadField {
        msg: MSG,
        field,
        got,
        why,
    };
    let sg_cnt = u32::from(rsp.sg_cnt());
    let qd = u32::from(queue_depth);
    if sg_cnt == 0 || qd % sg_cnt != 0 || sg_cnt > qd {
        return Err(bad(
            "sg_cnt",
            sg_cnt.into(),
            "must be non-zero and divide the queue depth",
        ));
    }
    if chunk_size == 0 || chunk_size > u64::from(u32::MAX) {
        return Err(bad("chunk_size", chunk_size, "must be 1..2^32"));
    }
    if super::bits(sg_cnt) + super::bits(chunk_size as u32) > 28 {
        return Err(bad(
            "sg_cnt",
            sg_cnt.into(),
            "bits(sg_cnt)+bits(chunk_size) > 28",
        ));
    }
    let mut i = 0usize;
    for d in rsp.descs().iter() {
        let len = u64::from(d.len);
        if len == 0 || len % chunk_size != 0 {
            return Err(bad(
                "desc.len",
                len,
                "must be a non-zero multiple of chunk_size",
            ));
        }
        for k in 0..len / chunk_size {
            if i == qd as usize {
                return Err(bad(
                    "desc.len",
                    len,
                    "descriptors hold more than queue_depth chunks",
                ));
            }
            chunk(i, d.addr.wrapping_add(k * chunk_size), d.key);
            i += 1;
        }
    }
    if i != qd as usize {
        return Err(bad(
            "sg_cnt",
            i as u64,
            "descriptors hold fewer than queue_depth chunks",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- rkey_rsp

/// `rtrs_msg_rkey_rsp`: a chunk's new rkey, 8 bytes, SEND_WITH_IMM.
#[derive(Debug, Clone, Copy)]
pub struct RkeyRsp<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> RkeyRsp<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 8;

    /// Validates length and type.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("rkey_rsp", b.len(), Self::LEN)?;
        check_type("rkey_rsp", b, MsgType::RkeyRsp as u16)?;
        Ok(RkeyRsp { buf })
    }
    /// The chunk index (the IO's msg_id).
    pub fn buf_id(&self) -> u16 {
        le::u16(self.buf.as_ref(), 2)
    }
    /// The chunk's new rkey.
    pub fn rkey(&self) -> u32 {
        le::u32(self.buf.as_ref(), 4)
    }
}

/// Builds an rkey_rsp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RkeyRspRepr {
    /// The chunk index.
    pub buf_id: u16,
    /// The chunk's new rkey.
    pub rkey: u32,
}

impl RkeyRspRepr {
    /// Reads a validated view.
    pub fn parse<T: AsRef<[u8]>>(v: &RkeyRsp<T>) -> RkeyRspRepr {
        RkeyRspRepr {
            buf_id: v.buf_id(),
            rkey: v.rkey(),
        }
    }
    /// Writes the 8 bytes; returns their number.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let b = room("rkey_rsp", buf, 8)?;
        le::put16(b, 0, MsgType::RkeyRsp as u16);
        le::put16(b, 2, self.buf_id);
        le::put32(b, 4, self.rkey);
        Ok(8)
    }
}

// ---------------------------------------------------------------- rdma_read

/// `rtrs_msg_rdma_read`: an IO read request, 8 + 16·sg_cnt bytes.
#[derive(Debug, Clone, Copy)]
pub struct RdmaRead<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> RdmaRead<T> {
    /// Bytes before the descriptors.
    pub const HDR_LEN: usize = 8;
    const MSG: &'static str = "rdma_read";

    /// Validates length, type, flags and the descriptor count (0 or 1, all the
    /// kernel's server accepts).
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need(Self::MSG, b.len(), Self::HDR_LEN)?;
        check_type(Self::MSG, b, MsgType::Read as u16)?;
        let flags = le::u16(b, 4);
        if flags & !NEED_INVAL_F != 0 {
            return Err(ProtoError::Reserved {
                msg: Self::MSG,
                field: "flags other than NEED_INVAL",
            });
        }
        let n = le::u16(b, 6);
        if n > 1 {
            return Err(ProtoError::BadField {
                msg: Self::MSG,
                field: "sg_cnt",
                got: n.into(),
                why: "must be 0 or 1",
            });
        }
        need(Self::MSG, b.len(), Self::HDR_LEN + n as usize * SgDesc::LEN)?;
        Ok(RdmaRead { buf })
    }
    /// Length of the user header before this message.
    pub fn usr_len(&self) -> u16 {
        le::u16(self.buf.as_ref(), 2)
    }
    /// `NEED_INVAL_F` or 0.
    pub fn flags(&self) -> u16 {
        le::u16(self.buf.as_ref(), 4)
    }
    /// Whether the client asks the server to invalidate its buffer.
    pub fn need_inval(&self) -> bool {
        self.flags() & NEED_INVAL_F != 0
    }
    /// Number of descriptors (0 or 1).
    pub fn sg_cnt(&self) -> u16 {
        le::u16(self.buf.as_ref(), 6)
    }
    /// The client buffers the read data goes to.
    pub fn descs(&self) -> SgDescs<'_> {
        let n = self.sg_cnt() as usize;
        SgDescs {
            b: &self.buf.as_ref()[Self::HDR_LEN..Self::HDR_LEN + n * SgDesc::LEN],
        }
    }
    /// Bytes this message takes.
    pub fn len(&self) -> usize {
        Self::HDR_LEN + self.sg_cnt() as usize * SgDesc::LEN
    }
    /// Never: a read message has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Builds an rdma_read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaReadRepr {
    /// Length of the user header before the message.
    pub usr_len: u16,
    /// Ask the server to invalidate `desc`'s rkey with its response.
    pub need_inval: bool,
    /// Where the data goes; `None` for a zero-length read.
    pub desc: Option<SgDesc>,
}

impl RdmaReadRepr {
    /// Reads a validated view.
    pub fn parse<T: AsRef<[u8]>>(v: &RdmaRead<T>) -> RdmaReadRepr {
        RdmaReadRepr {
            usr_len: v.usr_len(),
            need_inval: v.need_inval(),
            desc: v.descs().get(0),
        }
    }
    /// Bytes the message takes.
    pub fn buffer_len(&self) -> usize {
        8 + if self.desc.is_some() { SgDesc::LEN } else { 0 }
    }
    /// Writes the message; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        let b = room("rdma_read", buf, len)?;
        le::put16(b, 0, MsgType::Read as u16);
        le::put16(b, 2, self.usr_len);
        le::put16(b, 4, if self.need_inval { NEED_INVAL_F } else { 0 });
        le::put16(b, 6, self.desc.is_some() as u16);
        if let Some(d) = self.desc {
            d.write(b, 8);
        }
        Ok(len)
    }
}

// ---------------------------------------------------------------- rdma_write

/// `rtrs_msg_rdma_write`: an IO write request, 4 bytes.
#[derive(Debug, Clone, Copy)]
pub struct RdmaWrite<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> RdmaWrite<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 4;

    /// Validates length and type.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("rdma_write", b.len(), Self::LEN)?;
        check_type("rdma_write", b, MsgType::Write as u16)?;
        Ok(RdmaWrite { buf })
    }
    /// Length of the user header before this message.
    pub fn usr_len(&self) -> u16 {
        le::u16(self.buf.as_ref(), 2)
    }
}

/// Builds an rdma_write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaWriteRepr {
    /// Length of the user header before the message.
    pub usr_len: u16,
}

impl RdmaWriteRepr {
    /// Writes the 4 bytes; returns their number.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let b = room("rdma_write", buf, 4)?;
        le::put16(b, 0, MsgType::Write as u16);
        le::put16(b, 2, self.usr_len);
        Ok(4)
    }
}
