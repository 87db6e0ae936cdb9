//! The RNBD client on the RTRS client: SESS_INFO, OPEN, block IO and CLOSE
//! (wire spec §9.1, §9.8), and what the kernel's rnbd-client does on the
//! session's link events: when the session comes back after it was lost,
//! the server has dropped it with its open devices, so every device is
//! opened again and gets its new device id.
//!
//! ```text
//!  RnbdClient (an admin thread of the embedder's)
//!    admin IO through a core's Submitter: its completions come back on the
//!    submitter's own ring, never mixed with the core's block IO
//!    poll(): SessionLost -> devices wait; SessionReconnected -> SESS_INFO +
//!            OPEN of each device -> new device ids
//!  cores: io_hdr(dev, ...) reads the device's current id (one relaxed load)
//! ```

use crate::clt::{Client, CltError, CltEvent, Completion, Dir, Events, Submitter};
use minstant::Instant;
use rtrs_fabric::Fabric;
use rtrs_proto::rnbd::*;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
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
    Proto(rtrs_proto::ProtoError),
    /// No answer in time (the request's permit comes back when it does).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// No permit (all in flight).
    #[error("no permit free")]
    NoPermit,
}

impl RnbdError {
    /// The errno for it.
    pub fn errno(&self) -> i32 {
        match self {
            RnbdError::Rtrs(e) => e.errno(),
            RnbdError::Errno(e) => *e,
            RnbdError::Proto(_) => -libc::EPROTO,
            RnbdError::Timeout(_) => -libc::ETIMEDOUT,
            RnbdError::NoPermit => -libc::EBUSY,
        }
    }
}

const OPEN: u8 = 0;
const LOST: u8 = 1;
const CLOSED: u8 = 2;

/// An opened remote device, shared by the admin thread and the cores.
#[derive(Debug)]
pub struct RnbdDev {
    name: String,
    mode: AccessMode,
    device_id: AtomicU32,
    nsectors: AtomicU64,
    /// Logical block size, bytes.
    pub logical_block_size: u16,
    /// `RNBD_FUA` | `RNBD_WRITEBACK`.
    pub cache_policy: u8,
    state: AtomicU8,
}

impl RnbdDev {
    /// The server's id for it in the current session.
    pub fn device_id(&self) -> u32 {
        self.device_id.load(Ordering::Relaxed)
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.nsectors.load(Ordering::Relaxed) * 512
    }
    /// Size in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        self.nsectors.load(Ordering::Relaxed)
    }
    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether IO may go to it now (open, and not waiting to be re-opened
    /// after the session was lost).
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPEN
    }
}

/// What the client did on the session's events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RnbdEvent {
    /// The session was lost: IO to the devices fails until it is back.
    Lost,
    /// Device `name` was opened again with a new id.
    Reopened {
        /// The export.
        name: String,
        /// Its id before.
        old_id: u32,
        /// Its id now.
        new_id: u32,
    },
    /// Device `name` could not be opened again (errno); it stays closed.
    ReopenFailed {
        /// The export.
        name: String,
        /// Why.
        errno: i32,
    },
}

/// The RNBD client of one RTRS session.
pub struct RnbdClient<F: Fabric> {
    sub: Submitter<F>,
    events: Events,
    devs: Vec<Arc<RnbdDev>>,
    timeout: Duration,
    next_tag: u64,
}

impl<F: Fabric> std::fmt::Debug for RnbdClient<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RnbdClient")
            .field("devs", &self.devs.len())
            .finish()
    }
}

/// A caller's wait: what to do while an answer is out (poll the core that
/// serves the submitter when it runs on this thread; else sleep a little).
pub type Idle<'a> = &'a mut dyn FnMut();

impl<F: Fabric> RnbdClient<F> {
    /// An RNBD client over `clt`, sending its admin IO through `sub` (a
    /// core's [`Submitter`]; the core must be polled meanwhile, by its
    /// thread or by the `idle` the calls are given).
    pub fn new(clt: &Client<F>, sub: Submitter<F>) -> RnbdClient<F> {
        RnbdClient {
            sub,
            events: clt.subscribe(),
            devs: Vec::new(),
            timeout: Duration::from_secs(30),
            next_tag: 1 << 62,
        }
    }

    /// How long an admin call waits for its answer (default 30 s).
    pub fn set_timeout(&mut self, d: Duration) {
        self.timeout = d;
    }

    /// The devices opened so far.
    pub fn devices(&self) -> &[Arc<RnbdDev>] {
        &self.devs
    }

    /// One admin request, waited for: returns the errno and lets `read`
    /// see the data. Completions of earlier requests that timed out are
    /// taken here too: their permits go back, nothing is lost.
    fn call(
        &mut self,
        dir: Dir,
        usr: &[u8],
        len: u32,
        idle: Idle<'_>,
        read: impl FnOnce(&[u8]),
    ) -> Result<(), RnbdError> {
        let p = self.sub.get_permit().ok_or(RnbdError::NoPermit)?;
        self.next_tag += 1;
        let tag = self.next_tag;
        let r = match dir {
            Dir::Write => self.sub.write(p, usr, len, tag),
            Dir::Read => self.sub.read(p, usr, len, tag),
        };
        if let Err((p, e)) = r {
            self.sub.put_permit(p);
            return Err(e.into());
        }
        let start = Instant::now();
        let mut got: Option<Completion> = None;
        while got.is_none() {
            if start.elapsed() > self.timeout {
                return Err(RnbdError::Timeout(self.timeout));
            }
            idle();
            let sub = &mut self.sub;
            let mut late = Vec::new();
            sub.poll(&mut |c| {
                if c.tag == tag {
                    got = Some(c);
                } else {
                    late.push(c.permit);
                }
            });
            for p in late {
                self.sub.put_permit(p);
            }
        }
        let Some(mut c) = got else {
            return Err(RnbdError::Timeout(self.timeout));
        };
        let errno = c.errno;
        if errno == 0 && dir == Dir::Read {
            read(&self.sub.buf(&mut c.permit)[..len as usize]);
        }
        self.sub.put_permit(c.permit);
        if errno != 0 {
            return Err(RnbdError::Errno(errno));
        }
        Ok(())
    }

    /// SESS_INFO: returns the protocol version both sides speak.
    pub fn sess_info(&mut self, idle: Idle<'_>) -> Result<u8, RnbdError> {
        let mut usr = [0u8; SessInfo::<&[u8]>::LEN];
        SessInfoRepr {
            ver: RNBD_PROTO_VER_MAJOR,
        }
        .emit(&mut usr)
        .map_err(RnbdError::Proto)?;
        let mut ver = Err(RnbdError::Errno(-libc::EPROTO));
        let len = SessInfoRsp::<&[u8]>::LEN as u32;
        self.call(Dir::Read, &usr, len, idle, |d| {
            ver = SessInfoRsp::new_checked(d)
                .map(|v| v.ver())
                .map_err(RnbdError::Proto);
        })?;
        ver
    }

    fn open_msg(
        &mut self,
        name: &str,
        mode: AccessMode,
        idle: Idle<'_>,
    ) -> Result<OpenRspRepr, RnbdError> {
        let mut usr = [0u8; Open::<&[u8]>::LEN];
        OpenRepr {
            access_mode: mode,
            dev_name: name,
        }
        .emit(&mut usr)
        .map_err(RnbdError::Proto)?;
        let mut rsp = Err(RnbdError::Errno(-libc::EPROTO));
        let len = OpenRsp::<&[u8]>::LEN as u32;
        self.call(Dir::Read, &usr, len, idle, |d| {
            rsp = OpenRsp::new_checked(d)
                .map(|v| OpenRspRepr::parse(&v))
                .map_err(RnbdError::Proto);
        })?;
        rsp
    }

    /// OPEN: opens `name` on the server.
    pub fn open(
        &mut self,
        name: &str,
        mode: AccessMode,
        idle: Idle<'_>,
    ) -> Result<Arc<RnbdDev>, RnbdError> {
        let r = self.open_msg(name, mode, idle)?;
        let dev = Arc::new(RnbdDev {
            name: name.to_string(),
            mode,
            device_id: AtomicU32::new(r.device_id),
            nsectors: AtomicU64::new(r.nsectors),
            logical_block_size: r.logical_block_size,
            cache_policy: r.cache_policy,
            state: AtomicU8::new(OPEN),
        });
        self.devs.push(dev.clone());
        Ok(dev)
    }

    /// CLOSE.
    pub fn close(&mut self, dev: &Arc<RnbdDev>, idle: Idle<'_>) -> Result<(), RnbdError> {
        self.devs.retain(|d| !Arc::ptr_eq(d, dev));
        dev.state.store(CLOSED, Ordering::Release);
        let mut usr = [0u8; Close::<&[u8]>::LEN];
        CloseRepr {
            device_id: dev.device_id(),
        }
        .emit(&mut usr)
        .map_err(RnbdError::Proto)?;
        self.call(Dir::Write, &usr, 0, idle, |_| {})
    }

    /// Handles the session's link events (call it from the admin thread
    /// now and then): when the session was lost and is back, SESS_INFO and
    /// every device is opened again with a new id.
    pub fn poll(&mut self, idle: Idle<'_>) -> Vec<RnbdEvent> {
        let mut out = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                CltEvent::SessionLost => {
                    for d in &self.devs {
                        d.state.store(LOST, Ordering::Release);
                    }
                    tracing::warn!("rnbd: session lost; devices wait for it");
                    out.push(RnbdEvent::Lost);
                }
                CltEvent::SessionReconnected => self.reopen_all(idle, &mut out),
                _ => {}
            }
        }
        out
    }

    fn reopen_all(&mut self, idle: Idle<'_>, out: &mut Vec<RnbdEvent>) {
        if let Err(e) = self.sess_info(idle) {
            tracing::warn!("rnbd: SESS_INFO after the reconnect failed: {e}");
        }
        for d in self.devs.clone() {
            match self.open_msg(&d.name, d.mode, idle) {
                Ok(r) => {
                    let old = d.device_id.swap(r.device_id, Ordering::Relaxed);
                    d.nsectors.store(r.nsectors, Ordering::Relaxed);
                    d.state.store(OPEN, Ordering::Release);
                    tracing::info!(dev = %d.name, old, new = r.device_id, "rnbd: re-opened");
                    out.push(RnbdEvent::Reopened {
                        name: d.name.clone(),
                        old_id: old,
                        new_id: r.device_id,
                    });
                }
                Err(e) => {
                    tracing::warn!(dev = %d.name, "rnbd: re-open failed: {e}");
                    out.push(RnbdEvent::ReopenFailed {
                        name: d.name.clone(),
                        errno: e.errno(),
                    });
                }
            }
        }
    }
}

/// The 32-byte RNBD IO header for `len` bytes at byte `off` (a multiple of
/// 512) of `dev`, as the user header of an RTRS request.
pub fn io_hdr(dev: &RnbdDev, op: RnbdOp, off: u64, len: u32, flags: u32) -> [u8; 32] {
    let mut h = [0u8; 32];
    let _ = IoRepr {
        device_id: dev.device_id(),
        sector: off / 512,
        op,
        flags,
        bi_size: len,
        prio: 0,
    }
    .emit(&mut h);
    h
}
