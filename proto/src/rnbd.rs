//! RNBD 2.0 messages: they ride as the RTRS user header (client to server),
//! and the answers to SESS_INFO and OPEN come back as READ data.
//!
//! The kernel's client leaves several bytes uninitialised (the header's
//! padding, `sess_info.reserved`, `open.resv1`/`reserved`, the bytes after
//! the NUL of `dev_name`, the tail of `io`): decoders here ignore exactly
//! those, and check every byte the kernel does set. Messages from the
//! server (sess_info_rsp, open_rsp) are zeroed by the kernel, so their
//! reserved bytes must be zero.

use super::{check_type, cstr, le, need, put_cstr, room, zeros, ProtoError, Result};

/// RNBD protocol major version (the only byte sent).
pub const RNBD_PROTO_VER_MAJOR: u8 = 2;

/// The `type` of the RNBD header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RnbdMsgType {
    /// Session info (client version).
    SessInfo = 0,
    /// Answer to SessInfo.
    SessInfoRsp = 1,
    /// Open a device.
    Open = 2,
    /// Answer to Open.
    OpenRsp = 3,
    /// Block IO.
    Io = 4,
    /// Close a device.
    Close = 5,
}

impl RnbdMsgType {
    /// The type named by a header value.
    pub fn from_u16(t: u16) -> Result<RnbdMsgType> {
        Ok(match t {
            0 => RnbdMsgType::SessInfo,
            1 => RnbdMsgType::SessInfoRsp,
            2 => RnbdMsgType::Open,
            3 => RnbdMsgType::OpenRsp,
            4 => RnbdMsgType::Io,
            5 => RnbdMsgType::Close,
            got => {
                return Err(ProtoError::UnknownType {
                    msg: "rnbd",
                    got: got.into(),
                })
            }
        })
    }
}

fn check_ver(msg: &'static str, ver: u8) -> Result<()> {
    if ver == 0 {
        return Err(ProtoError::BadVersion {
            msg,
            got: ver.into(),
        });
    }
    Ok(())
}

fn put_hdr(b: &mut [u8], t: RnbdMsgType) {
    le::put16(b, 0, t as u16);
    le::put16(b, 2, 0);
}

// ---------------------------------------------------------------- sess_info

/// `rnbd_msg_sess_info`, 36 bytes: the client's protocol version.
#[derive(Debug, Clone, Copy)]
pub struct SessInfo<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> SessInfo<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 36;

    /// Validates length, type and version (any non-zero major; the server
    /// answers with the smaller of the two).
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("sess_info", b.len(), Self::LEN)?;
        check_type("sess_info", b, RnbdMsgType::SessInfo as u16)?;
        check_ver("sess_info", b[4])?;
        Ok(SessInfo { buf })
    }
    /// The client's major version.
    pub fn ver(&self) -> u8 {
        self.buf.as_ref()[4]
    }
}

/// Builds a sess_info (`ver` 2) or a sess_info_rsp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessInfoRepr {
    /// Major version.
    pub ver: u8,
}

impl SessInfoRepr {
    /// Writes a sess_info (36 bytes, zeroed reserve).
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        self.emit_as(buf, RnbdMsgType::SessInfo)
    }
    /// Writes a sess_info_rsp (36 bytes).
    pub fn emit_rsp(&self, buf: &mut [u8]) -> Result<usize> {
        self.emit_as(buf, RnbdMsgType::SessInfoRsp)
    }
    fn emit_as(&self, buf: &mut [u8], t: RnbdMsgType) -> Result<usize> {
        let b = room("sess_info", buf, 36)?;
        b.fill(0);
        put_hdr(b, t);
        b[4] = self.ver;
        Ok(36)
    }
}

/// `rnbd_msg_sess_info_rsp`, 36 bytes: the version the server speaks.
#[derive(Debug, Clone, Copy)]
pub struct SessInfoRsp<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> SessInfoRsp<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 36;

    /// Validates length, type, version and the zeroed reserve.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("sess_info_rsp", b.len(), Self::LEN)?;
        check_type("sess_info_rsp", b, RnbdMsgType::SessInfoRsp as u16)?;
        zeros("sess_info_rsp", "header padding", &b[2..4])?;
        check_ver("sess_info_rsp", b[4])?;
        zeros("sess_info_rsp", "bytes 5..36", &b[5..36])?;
        Ok(SessInfoRsp { buf })
    }
    /// The version both sides now speak.
    pub fn ver(&self) -> u8 {
        self.buf.as_ref()[4]
    }
}

// ---------------------------------------------------------------- open

/// Device access mode of an OPEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AccessMode {
    /// Read-only.
    Ro = 0,
    /// Read-write, one writer per device.
    Rw = 1,
    /// Read-write, two writers allowed (migration).
    Migration = 2,
}

impl AccessMode {
    /// The mode of a byte on the wire.
    pub fn from_u8(v: u8) -> Result<AccessMode> {
        Ok(match v {
            0 => AccessMode::Ro,
            1 => AccessMode::Rw,
            2 => AccessMode::Migration,
            got => {
                return Err(ProtoError::BadField {
                    msg: "open",
                    field: "access_mode",
                    got: got.into(),
                    why: "must be 0 (ro), 1 (rw) or 2 (migration)",
                })
            }
        })
    }
}

const OPEN_NAME: std::ops::Range<usize> = 6..261;

/// `rnbd_msg_open`, 264 bytes: open `dev_name` with an access mode.
#[derive(Debug, Clone, Copy)]
pub struct Open<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Open<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 264;

    /// Validates length, type, access mode and a non-empty NUL-terminated
    /// UTF-8 device name.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("open", b.len(), Self::LEN)?;
        check_type("open", b, RnbdMsgType::Open as u16)?;
        AccessMode::from_u8(b[4])?;
        if cstr("open", "dev_name", &b[OPEN_NAME])?.is_empty() {
            return Err(ProtoError::BadField {
                msg: "open",
                field: "dev_name",
                got: 0,
                why: "must not be empty",
            });
        }
        Ok(Open { buf })
    }
    /// How the device is opened.
    pub fn access_mode(&self) -> AccessMode {
        AccessMode::from_u8(self.buf.as_ref()[4]).unwrap_or(AccessMode::Ro)
    }
    /// The device's name (path below the server's search path).
    pub fn dev_name(&self) -> &str {
        cstr("open", "dev_name", &self.buf.as_ref()[OPEN_NAME]).unwrap_or("")
    }
}

/// Builds an open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenRepr<'a> {
    /// How the device is opened.
    pub access_mode: AccessMode,
    /// The device's name, 1..=254 bytes.
    pub dev_name: &'a str,
}

impl OpenRepr<'_> {
    /// Writes the 264 bytes (zeroed reserve).
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let b = room("open", buf, 264)?;
        b.fill(0);
        put_hdr(b, RnbdMsgType::Open);
        b[4] = self.access_mode as u8;
        put_cstr("open", "dev_name", &mut b[OPEN_NAME], self.dev_name)?;
        Ok(264)
    }
}

// ---------------------------------------------------------------- open_rsp

/// `cache_policy` bit: the device supports FUA.
pub const RNBD_FUA: u8 = 1 << 0;
/// `cache_policy` bit: the device has a volatile write cache.
pub const RNBD_WRITEBACK: u8 = 1 << 1;

mod open_rsp {
    pub const DEVICE_ID: usize = 4;
    pub const NSECTORS: usize = 8;
    pub const MAX_HW_SECTORS: usize = 16;
    pub const MAX_WRITE_SAME: usize = 20;
    pub const MAX_DISCARD: usize = 24;
    pub const DISCARD_GRAN: usize = 28;
    pub const DISCARD_ALIGN: usize = 32;
    pub const PBS: usize = 36;
    pub const LBS: usize = 38;
    pub const MAX_SEGMENTS: usize = 40;
    pub const SECURE_DISCARD: usize = 42;
    pub const ROTATIONAL: usize = 44;
    pub const CACHE_POLICY: usize = 45;
    pub const RESERVED: std::ops::Range<usize> = 46..56;
}

/// `rnbd_msg_open_rsp`, 56 bytes: the opened device's id and geometry.
#[derive(Debug, Clone, Copy)]
pub struct OpenRsp<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> OpenRsp<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 56;

    /// Validates length, type, a non-zero logical block size (the kernel
    /// client refuses 0), cache-policy bits and the zeroed reserve.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("open_rsp", b.len(), Self::LEN)?;
        check_type("open_rsp", b, RnbdMsgType::OpenRsp as u16)?;
        zeros("open_rsp", "header padding", &b[2..4])?;
        let lbs = le::u16(b, open_rsp::LBS);
        if lbs == 0 {
            return Err(ProtoError::BadField {
                msg: "open_rsp",
                field: "logical_block_size",
                got: 0,
                why: "must not be 0",
            });
        }
        if b[open_rsp::CACHE_POLICY] & !(RNBD_FUA | RNBD_WRITEBACK) != 0 {
            return Err(ProtoError::Reserved {
                msg: "open_rsp",
                field: "cache_policy bits 2..7",
            });
        }
        zeros("open_rsp", "bytes 46..56", &b[open_rsp::RESERVED])?;
        Ok(OpenRsp { buf })
    }
}

/// An open_rsp's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenRspRepr {
    /// Per-session device id, used in every IO and CLOSE.
    pub device_id: u32,
    /// Size in 512-byte sectors.
    pub nsectors: u64,
    /// Largest request, in sectors (the kernel client ignores it).
    pub max_hw_sectors: u32,
    /// Always 0 (write-same is gone).
    pub max_write_same_sectors: u32,
    /// Largest discard, in sectors.
    pub max_discard_sectors: u32,
    /// Discard granularity, bytes.
    pub discard_granularity: u32,
    /// Discard alignment, bytes.
    pub discard_alignment: u32,
    /// Physical block size, bytes.
    pub physical_block_size: u16,
    /// Logical block size, bytes (not 0).
    pub logical_block_size: u16,
    /// Largest segment count (the kernel client ignores it).
    pub max_segments: u16,
    /// Secure-erase support (the kernel sends its sector count, truncated).
    pub secure_discard: u16,
    /// Obsolete; 0.
    pub obsolete_rotational: u8,
    /// `RNBD_FUA` | `RNBD_WRITEBACK`.
    pub cache_policy: u8,
}

impl OpenRspRepr {
    /// Reads a validated view.
    pub fn parse<T: AsRef<[u8]>>(v: &OpenRsp<T>) -> OpenRspRepr {
        use open_rsp::*;
        let b = v.buf.as_ref();
        OpenRspRepr {
            device_id: le::u32(b, DEVICE_ID),
            nsectors: le::u64(b, NSECTORS),
            max_hw_sectors: le::u32(b, MAX_HW_SECTORS),
            max_write_same_sectors: le::u32(b, MAX_WRITE_SAME),
            max_discard_sectors: le::u32(b, MAX_DISCARD),
            discard_granularity: le::u32(b, DISCARD_GRAN),
            discard_alignment: le::u32(b, DISCARD_ALIGN),
            physical_block_size: le::u16(b, PBS),
            logical_block_size: le::u16(b, LBS),
            max_segments: le::u16(b, MAX_SEGMENTS),
            secure_discard: le::u16(b, SECURE_DISCARD),
            obsolete_rotational: b[ROTATIONAL],
            cache_policy: b[CACHE_POLICY],
        }
    }
    /// Writes the 56 bytes.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        use open_rsp::*;
        let b = room("open_rsp", buf, 56)?;
        b.fill(0);
        put_hdr(b, RnbdMsgType::OpenRsp);
        le::put32(b, DEVICE_ID, self.device_id);
        le::put64(b, NSECTORS, self.nsectors);
        le::put32(b, MAX_HW_SECTORS, self.max_hw_sectors);
        le::put32(b, MAX_WRITE_SAME, self.max_write_same_sectors);
        le::put32(b, MAX_DISCARD, self.max_discard_sectors);
        le::put32(b, DISCARD_GRAN, self.discard_granularity);
        le::put32(b, DISCARD_ALIGN, self.discard_alignment);
        le::put16(b, PBS, self.physical_block_size);
        le::put16(b, LBS, self.logical_block_size);
        le::put16(b, MAX_SEGMENTS, self.max_segments);
        le::put16(b, SECURE_DISCARD, self.secure_discard);
        b[ROTATIONAL] = self.obsolete_rotational;
        b[CACHE_POLICY] = self.cache_policy;
        Ok(56)
    }
}

// ---------------------------------------------------------------- close

/// `rnbd_msg_close`, 8 bytes.
#[derive(Debug, Clone, Copy)]
pub struct Close<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Close<T> {
    /// Bytes on the wire.
    pub const LEN: usize = 8;

    /// Validates length and type.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("close", b.len(), Self::LEN)?;
        check_type("close", b, RnbdMsgType::Close as u16)?;
        Ok(Close { buf })
    }
    /// The device to close.
    pub fn device_id(&self) -> u32 {
        le::u32(self.buf.as_ref(), 4)
    }
}

/// Builds a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRepr {
    /// The device to close.
    pub device_id: u32,
}

impl CloseRepr {
    /// Writes the 8 bytes.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let b = room("close", buf, 8)?;
        put_hdr(b, RnbdMsgType::Close);
        le::put32(b, 4, self.device_id);
        Ok(8)
    }
}

// ---------------------------------------------------------------- io

/// Block operation in the low byte of `rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RnbdOp {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
    /// Cache flush (travels as an RTRS READ with no data).
    Flush = 2,
    /// Discard a range.
    Discard = 3,
    /// Securely erase a range.
    SecureErase = 4,
}

/// `rw` flag: a sync request.
pub const RNBD_F_SYNC: u32 = 1 << 8;
/// `rw` flag: FUA (or preflush).
pub const RNBD_F_FUA: u32 = 1 << 9;
const RNBD_OP_MASK: u32 = 0xFF;

impl RnbdOp {
    /// Splits an `rw` field into op and flags, refusing unknown ops (the
    /// kernel's server would WARN and read) and unknown flag bits.
    pub fn from_rw(rw: u32) -> Result<(RnbdOp, u32)> {
        let op = match rw & RNBD_OP_MASK {
            0 => RnbdOp::Read,
            1 => RnbdOp::Write,
            2 => RnbdOp::Flush,
            3 => RnbdOp::Discard,
            4 => RnbdOp::SecureErase,
            got => {
                return Err(ProtoError::BadField {
                    msg: "io",
                    field: "rw op",
                    got: got.into(),
                    why: "must be read, write, flush, discard or secure erase",
                })
            }
        };
        let flags = rw & !RNBD_OP_MASK;
        if flags & !(RNBD_F_SYNC | RNBD_F_FUA) != 0 {
            return Err(ProtoError::Reserved {
                msg: "io",
                field: "rw bits other than SYNC and FUA",
            });
        }
        Ok((op, flags))
    }
    /// The RTRS direction the kernel's client uses: the low bit of the
    /// block layer's op (REQ_OP_FLUSH = 2 is a READ with no data,
    /// REQ_OP_SECURE_ERASE = 5 a WRITE).
    pub fn is_rtrs_write(self) -> bool {
        matches!(self, RnbdOp::Write | RnbdOp::Discard | RnbdOp::SecureErase)
    }
}

/// `rnbd_msg_io`: 32 bytes on the wire (26 of fields, 6 of tail padding).
#[derive(Debug, Clone, Copy)]
pub struct Io<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Io<T> {
    /// Bytes the kernel sends (`sizeof`, with tail padding).
    pub const LEN: usize = 32;
    /// Bytes up to `bi_size`: the least a server can act on.
    pub const MIN_LEN: usize = 24;

    /// Validates length, type and `rw`.
    pub fn new_checked(buf: T) -> Result<Self> {
        let b = buf.as_ref();
        need("io", b.len(), Self::MIN_LEN)?;
        check_type("io", b, RnbdMsgType::Io as u16)?;
        RnbdOp::from_rw(le::u32(b, 16))?;
        Ok(Io { buf })
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// The device (from open_rsp).
    pub fn device_id(&self) -> u32 {
        le::u32(self.b(), 4)
    }
    /// First 512-byte sector.
    pub fn sector(&self) -> u64 {
        le::u64(self.b(), 8)
    }
    /// The raw `rw` field.
    pub fn rw(&self) -> u32 {
        le::u32(self.b(), 16)
    }
    /// The operation.
    pub fn op(&self) -> RnbdOp {
        RnbdOp::from_rw(self.rw()).map_or(RnbdOp::Read, |(op, _)| op)
    }
    /// Request length in bytes.
    pub fn bi_size(&self) -> u32 {
        le::u32(self.b(), 20)
    }
    /// I/O priority; 0 when the header is shorter than 32 bytes, as the
    /// kernel's server reads it.
    pub fn prio(&self) -> u16 {
        if self.b().len() >= Self::LEN {
            le::u16(self.b(), 24)
        } else {
            0
        }
    }
}

/// An io's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRepr {
    /// The device.
    pub device_id: u32,
    /// First 512-byte sector.
    pub sector: u64,
    /// The operation.
    pub op: RnbdOp,
    /// `RNBD_F_SYNC` | `RNBD_F_FUA`.
    pub flags: u32,
    /// Length in bytes.
    pub bi_size: u32,
    /// I/O priority (class in bits 15..13).
    pub prio: u16,
}

impl IoRepr {
    /// Reads a validated view.
    pub fn parse<T: AsRef<[u8]>>(v: &Io<T>) -> IoRepr {
        IoRepr {
            device_id: v.device_id(),
            sector: v.sector(),
            op: v.op(),
            flags: v.rw() & !RNBD_OP_MASK,
            bi_size: v.bi_size(),
            prio: v.prio(),
        }
    }
    /// Writes the 32 bytes.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        if self.flags & !(RNBD_F_SYNC | RNBD_F_FUA) != 0 {
            return Err(ProtoError::Reserved {
                msg: "io",
                field: "rw bits other than SYNC and FUA",
            });
        }
        let b = room("io", buf, 32)?;
        b.fill(0);
        put_hdr(b, RnbdMsgType::Io);
        le::put32(b, 4, self.device_id);
        le::put64(b, 8, self.sector);
        le::put32(b, 16, self.op as u32 | self.flags);
        le::put32(b, 20, self.bi_size);
        le::put16(b, 24, self.prio);
        Ok(32)
    }
}

// ---------------------------------------------------------------- dispatch

/// A client-to-server RNBD message, decoded from an RTRS user header.
#[derive(Debug, Clone, Copy)]
pub enum RnbdMsg<'a> {
    /// Session info.
    SessInfo(SessInfo<&'a [u8]>),
    /// Open a device.
    Open(Open<&'a [u8]>),
    /// Close a device.
    Close(Close<&'a [u8]>),
    /// Block IO.
    Io(Io<&'a [u8]>),
}

impl<'a> RnbdMsg<'a> {
    /// Decodes the user header of an RTRS request by its type.
    pub fn parse(usr: &'a [u8]) -> Result<RnbdMsg<'a>> {
        need("rnbd", usr.len(), 4)?;
        Ok(match RnbdMsgType::from_u16(le::u16(usr, 0))? {
            RnbdMsgType::SessInfo => RnbdMsg::SessInfo(SessInfo::new_checked(usr)?),
            RnbdMsgType::Open => RnbdMsg::Open(Open::new_checked(usr)?),
            RnbdMsgType::Close => RnbdMsg::Close(Close::new_checked(usr)?),
            RnbdMsgType::Io => RnbdMsg::Io(Io::new_checked(usr)?),
            t => {
                return Err(ProtoError::BadType {
                    msg: "rnbd request",
                    got: t as u16,
                    want: RnbdMsgType::Io as u16,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_is_an_rtrs_read() {
        assert!(!RnbdOp::Flush.is_rtrs_write());
        assert!(RnbdOp::Write.is_rtrs_write());
        assert!(RnbdOp::Discard.is_rtrs_write());
        assert!(!RnbdOp::Read.is_rtrs_write());
        assert!(RnbdOp::SecureErase.is_rtrs_write());
    }
}
