//! What crosses the rings between a client's cores, its handle and its
//! control thread: the control tells a core about paths and hands it
//! connections (spsc per core, [`CoreMsg`]); cores report failed paths and
//! hand connections back to be destroyed off the core, and the handle sends
//! the operator's commands (one mpsc inbox, [`CtlMsg`]).
//!
//! ```text
//!  control ──CoreMsg: AddPath (+ request table), Cons, Drop, Remove─> core k
//!  core k  ──CtlMsg: PathFailed (+ its cons), Retired (cons)────────> control
//!  Client  ──CtlMsg: Cmd (add/remove/disconnect/reconnect path, ...)─> control
//! ```

use super::con::CltCon;
use super::path::{CltPath, PathId};
use super::{CltError, Dir, PathMem, MAX_SG};
use crate::sess::path::ReconnectPolicy;
use crate::sess::DownReason;
use minstant::Instant;
use rtrs_fabric::{Address, Fabric, Sge};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

/// A command's answer, sent back to the caller waiting on it.
pub(crate) type Reply<T> = SyncSender<Result<T, CltError>>;

/// What reaches the control thread's inbox.
pub(crate) enum CtlMsg<F: Fabric> {
    /// A core saw path `slot` fail in connection round `epoch`; its
    /// connection comes back to be destroyed here, off the core (after the
    /// CM has disconnected it).
    PathFailed {
        slot: usize,
        epoch: u16,
        reason: DownReason,
        cons: Vec<CltCon<F>>,
    },
    /// A core let go of a connection the control thread tore down.
    Retired(Vec<CltCon<F>>),
    /// An operator command from the [`super::Client`] handle.
    Cmd(Cmd),
}

/// Operator commands (the kernel's sysfs verbs).
pub(crate) enum Cmd {
    AddPath(Address, Reply<PathId>),
    RemovePath(PathId, Reply<()>),
    Disconnect(PathId, Reply<()>),
    Reconnect(PathId, Reply<()>),
    SetReconnect(ReconnectPolicy),
}

/// Messages from the control thread to a core.
pub(crate) enum CoreMsg<F: Fabric> {
    /// A path in slot `slot`, with its request table (allocated by the
    /// control thread, so the core never allocates).
    AddPath {
        slot: usize,
        path: Arc<CltPath>,
        /// The session's memory on the path's device.
        mem: Arc<PathMem<F>>,
        /// That device is the first path's (where `Client::reg_buf`
        /// memory is registered, so a gathered write may go there).
        first_device: bool,
        reqs: Box<[Req]>,
    },
    /// The path's connections for this core (after a (re)connect).
    Cons(usize, Vec<CltCon<F>>),
    /// The path is being torn down: drop its connection, fail its IO over.
    Drop(usize),
    /// The path is gone for good: drop it and forget the slot.
    Remove(usize),
}

/// A request table for one path on one core: every permit idle.
pub(crate) fn req_table(queue_depth: u32) -> Box<[Req]> {
    let idle = Req {
        active: false,
        dir: Dir::Write,
        len: 0,
        usr_len: 0,
        need_inval: false,
        tag: 0,
        start: Instant::now(),
        remote: None,
        sg: [Sge::default(); MAX_SG],
        sg_n: 0,
    };
    vec![idle; queue_depth as usize].into_boxed_slice()
}

/// One request slot of a path's table on a core (the permit's request
/// while it is in flight on that path).
#[derive(Clone, Copy)]
pub(crate) struct Req {
    pub(crate) active: bool,
    pub(crate) dir: Dir,
    pub(crate) len: u32,
    pub(crate) usr_len: u16,
    pub(crate) need_inval: bool,
    pub(crate) tag: u64,
    pub(crate) start: Instant,
    /// The submitter (another thread) to hand the completion to.
    pub(crate) remote: Option<u8>,
    /// A write's data in the caller's registered memory (`sg_n` entries);
    /// none: the permit's buffer.
    pub(crate) sg: [Sge; MAX_SG],
    pub(crate) sg_n: u8,
}
