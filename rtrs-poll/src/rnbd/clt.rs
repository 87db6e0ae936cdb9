//! The RNBD client on the RTRS client: SESS_INFO, OPEN, block IO and CLOSE
//! (wire spec §9.1, §9.8). Admin messages are blocking calls for the control
//! side; block IO headers are built for the cores' own submissions.

use crate::clt::{Client, CltCore, CltError, Completion, Dir};
use crate::fabric::Fabric;
use crate::proto::rnbd::*;
use minstant::Instant;
use std::time::Duration;

/// RNBD client errors.
#[derive(Debug, thiserror::Error)]
pub enum RnbdError {
    /// The transport failed.
    #[error(transparent)]
    Rtrs(#[from] CltError),
    /// The server answered with an errno.
    #[error("the server answered errno {0}")]
    Errno(i32),
    /// The server's answer is malformed.
    #[error("malformed answer: {0}")]
    Proto(crate::proto::ProtoError),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// No permit (all in flight).
    #[error("no permit free")]
    NoPermit,
}

/// An opened remote device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RnbdDev {
    /// The server's id for it in this session.
    pub device_id: u32,
    /// Size in 512-byte sectors.
    pub nsectors: u64,
    /// Logical block size, bytes.
    pub logical_block_size: u16,
    /// `RNBD_FUA` | `RNBD_WRITEBACK`.
    pub cache_policy: u8,
}

impl RnbdDev {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.nsectors * 512
    }
}

/// One request, waited for: returns the errno and lets `read` see the data.
fn call<F: Fabric>(
    clt: &mut Client<F>,
    core: &mut CltCore<F>,
    dir: Dir,
    usr: &[u8],
    len: u32,
    read: impl FnOnce(&[u8]),
) -> Result<(), RnbdError> {
    let p = core.get_permit().ok_or(RnbdError::NoPermit)?;
    let now = Instant::now();
    let r = match dir {
        Dir::Write => core.write(p, usr, len, u64::MAX, now),
        Dir::Read => core.read(p, usr, len, u64::MAX, now),
    };
    if let Err((p, e)) = r {
        core.put_permit(p);
        return Err(e.into());
    }
    let limit = Duration::from_secs(30);
    let mut got: Option<Completion> = None;
    let mut turns = 0u32;
    while got.is_none() {
        if now.elapsed() > limit {
            return Err(RnbdError::Timeout(limit));
        }
        core.poll(Instant::now(), &mut |c| got = Some(c));
        turns += 1;
        if turns % 256 == 0 {
            clt.poll(Instant::now());
        }
    }
    let Some(mut c) = got else {
        return Err(RnbdError::Timeout(limit));
    };
    let errno = c.errno;
    if errno == 0 && dir == Dir::Read {
        read(&core.buf(&mut c.permit)[..len as usize]);
    }
    core.put_permit(c.permit);
    if errno != 0 {
        return Err(RnbdError::Errno(errno));
    }
    Ok(())
}

/// SESS_INFO: returns the protocol version both sides speak.
pub fn sess_info<F: Fabric>(clt: &mut Client<F>, core: &mut CltCore<F>) -> Result<u8, RnbdError> {
    let mut usr = [0u8; 36];
    SessInfoRepr {
        ver: RNBD_PROTO_VER_MAJOR,
    }
    .emit(&mut usr)
    .map_err(RnbdError::Proto)?;
    let mut ver = Err(RnbdError::Errno(-libc::EPROTO));
    call(clt, core, Dir::Read, &usr, 36, |d| {
        ver = SessInfoRsp::new_checked(d)
            .map(|v| v.ver())
            .map_err(RnbdError::Proto);
    })?;
    ver
}

/// OPEN: opens `name` on the server.
pub fn open<F: Fabric>(
    clt: &mut Client<F>,
    core: &mut CltCore<F>,
    name: &str,
    mode: AccessMode,
) -> Result<RnbdDev, RnbdError> {
    let mut usr = [0u8; 264];
    OpenRepr {
        access_mode: mode,
        dev_name: name,
    }
    .emit(&mut usr)
    .map_err(RnbdError::Proto)?;
    let mut dev = Err(RnbdError::Errno(-libc::EPROTO));
    call(clt, core, Dir::Read, &usr, 56, |d| {
        dev = OpenRsp::new_checked(d)
            .map(|v| {
                let r = OpenRspRepr::parse(&v);
                RnbdDev {
                    device_id: r.device_id,
                    nsectors: r.nsectors,
                    logical_block_size: r.logical_block_size,
                    cache_policy: r.cache_policy,
                }
            })
            .map_err(RnbdError::Proto);
    })?;
    dev
}

/// CLOSE.
pub fn close<F: Fabric>(
    clt: &mut Client<F>,
    core: &mut CltCore<F>,
    dev: &RnbdDev,
) -> Result<(), RnbdError> {
    let mut usr = [0u8; 8];
    CloseRepr {
        device_id: dev.device_id,
    }
    .emit(&mut usr)
    .map_err(RnbdError::Proto)?;
    call(clt, core, Dir::Write, &usr, 0, |_| {})
}

/// The 32-byte RNBD IO header for `len` bytes at byte `off` (a multiple of
/// 512), as the user header of an RTRS request.
pub fn io_hdr(dev: &RnbdDev, op: RnbdOp, off: u64, len: u32, flags: u32) -> [u8; 32] {
    let mut h = [0u8; 32];
    let _ = IoRepr {
        device_id: dev.device_id,
        sector: off / 512,
        op,
        flags,
        bi_size: len,
        prio: 0,
    }
    .emit(&mut h);
    h
}
