//! Why a path went down or closed: one typed vocabulary for events, stats
//! and logs, on both sides.

use rtrs_fabric::{WcOpcode, WcStatus};
use std::fmt;

/// Which step of a connection round timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Connecting connection `cid` (CON_REQ sent, no answer).
    Connect,
    /// The INFO_REQ / INFO_RSP exchange on cid 0.
    Info,
}

/// Why a path went down (and, on the client, why it reconnects or closes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// The peer went silent: this many heartbeats missed.
    Heartbeat {
        /// Beats sent and not answered.
        missed: u32,
    },
    /// A work completion failed on connection `cid`.
    Completion {
        /// The connection.
        cid: u16,
        /// Its status.
        status: WcStatus,
        /// What completed.
        opcode: WcOpcode,
    },
    /// The peer (or the network) disconnected connection `cid` (CM
    /// DISCONNECTED).
    Disconnected {
        /// The connection.
        cid: u16,
    },
    /// The server refused connection `cid` with this errno (negative).
    Rejected {
        /// The connection.
        cid: u16,
        /// The errno of the reject.
        errno: i32,
    },
    /// Connection `cid` could not reach the server.
    Unreachable {
        /// The connection.
        cid: u16,
        /// What the fabric said.
        why: String,
    },
    /// A step of the connection round took longer than the connect timeout.
    Timeout {
        /// The connection (0 for INFO).
        cid: u16,
        /// Which step.
        step: Step,
    },
    /// The peer sent something malformed or out of order.
    Protocol {
        /// The connection.
        cid: u16,
        /// What was wrong.
        what: String,
    },
    /// A local call failed (posting, registering, creating a QP).
    Local {
        /// The connection.
        cid: u16,
        /// What failed.
        what: String,
    },
    /// The server's queue depth changed across a reconnect: the path will
    /// not reconnect (as the kernel).
    QueueDepthChanged {
        /// The session's queue depth.
        was: u16,
        /// What the server offers now.
        now: u16,
    },
    /// Out of reconnect attempts.
    AttemptsExhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// Disconnected by the operator (the kernel's sysfs `disconnect`).
    Operator,
    /// Removed by the operator (the kernel's sysfs `remove_path`).
    Removed,
    /// The session was closed.
    SessionClosed,
}

impl DownReason {
    /// A short stable name of the kind, for counters and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            DownReason::Heartbeat { .. } => "heartbeat",
            DownReason::Completion { .. } => "completion",
            DownReason::Disconnected { .. } => "disconnected",
            DownReason::Rejected { .. } => "rejected",
            DownReason::Unreachable { .. } => "unreachable",
            DownReason::Timeout { .. } => "timeout",
            DownReason::Protocol { .. } => "protocol",
            DownReason::Local { .. } => "local",
            DownReason::QueueDepthChanged { .. } => "queue_depth_changed",
            DownReason::AttemptsExhausted { .. } => "attempts_exhausted",
            DownReason::Operator => "operator",
            DownReason::Removed => "removed",
            DownReason::SessionClosed => "session_closed",
        }
    }

    /// The errno an IO or a caller sees for it (the kernel's mapping of CM
    /// events: rejects carry their own, the rest are -ECONNRESET, a
    /// timeout -ETIMEDOUT).
    pub fn errno(&self) -> i32 {
        match self {
            DownReason::Rejected { errno, .. } => -errno.abs(),
            DownReason::Timeout { .. } => -libc::ETIMEDOUT,
            DownReason::Unreachable { .. } => -libc::EHOSTUNREACH,
            DownReason::Removed | DownReason::Operator | DownReason::SessionClosed => {
                -libc::ECONNABORTED
            }
            _ => -libc::ECONNRESET,
        }
    }
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::Heartbeat { missed } => write!(f, "heartbeat: {missed} beats missed"),
            DownReason::Completion {
                cid,
                status,
                opcode,
            } => write!(f, "cid {cid}: {status:?} completion of {opcode:?}"),
            DownReason::Disconnected { cid } => write!(f, "cid {cid}: disconnected"),
            DownReason::Rejected { cid, errno } => {
                write!(f, "cid {cid}: rejected with errno {errno}")
            }
            DownReason::Unreachable { cid, why } => write!(f, "cid {cid}: unreachable: {why}"),
            DownReason::Timeout { cid, step } => match step {
                Step::Connect => write!(f, "cid {cid}: no answer within the connect timeout"),
                Step::Info => write!(f, "no INFO_RSP within the connect timeout"),
            },
            DownReason::Protocol { cid, what } => write!(f, "cid {cid}: protocol: {what}"),
            DownReason::Local { cid, what } => write!(f, "cid {cid}: {what}"),
            DownReason::QueueDepthChanged { was, now } => write!(
                f,
                "queue depth changed from {was} to {now}: reconnect disabled"
            ),
            DownReason::AttemptsExhausted { attempts } => {
                write!(f, "gave up after {attempts} reconnect attempts")
            }
            DownReason::Operator => f.write_str("disconnected by the operator"),
            DownReason::Removed => f.write_str("removed by the operator"),
            DownReason::SessionClosed => f.write_str("session closed"),
        }
    }
}
