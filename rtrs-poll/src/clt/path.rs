//! What a client path's cores and the control thread share: the state the
//! control thread publishes, the server's chunk table (`rbufs`), the
//! heartbeat RTT, and per-core counters (one writer each).

use crate::sess::path::PathState;
use crate::sess::DownReason;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A path's identity in its session: unique for the session's life (a
/// removed path's id is never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u32);

impl std::fmt::Display for PathId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "path{}", self.0)
    }
}

/// A remote chunk: where permit `i`'s requests go on this path.
#[derive(Debug, Default)]
pub(crate) struct RBuf {
    pub(crate) addr: AtomicU64,
    pub(crate) rkey: AtomicU32,
}

/// Per-core counters of a path (one writer each).
#[derive(Debug, Default)]
pub(crate) struct CoreCounters {
    pub(crate) inflight: AtomicU64,
    pub(crate) recvs: AtomicU64,
    pub(crate) ios: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) failovers: AtomicU64,
    pub(crate) local_invs: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, by: u64) {
    c.store(
        c.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// One path of a client session.
#[derive(Debug)]
pub struct CltPath {
    pub(crate) id: PathId,
    pub(crate) addr: String,
    state: AtomicU8,
    /// The connection round now up (`recon_cnt`): a core's connection of
    /// an older round is stale even while the path shows Connected.
    epoch: std::sync::atomic::AtomicU16,
    pub(crate) rbufs: Box<[RBuf]>,
    pub(crate) cores: Box<[CachePadded<CoreCounters>]>,
    latency_ns: AtomicU64,
    reason: Mutex<Option<DownReason>>,
    pub(crate) reconnects: AtomicU64,
    pub(crate) failed_reconnects: AtomicU64,
    pub(crate) downs: AtomicU64,
    /// Most heartbeat intervals in a row that passed without an answer.
    pub(crate) hb_missed_peak: AtomicU32,
}

/// A path's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathStats {
    /// The path.
    pub id: Option<PathId>,
    /// The server address.
    pub addr: String,
    /// State now.
    pub state: Option<PathState>,
    /// IOs completed.
    pub ios: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// IOs completed with an error.
    pub errors: u64,
    /// IOs in flight.
    pub inflight: u64,
    /// IOs moved to another path when this one failed.
    pub failovers: u64,
    /// Reads with per-IO keys whose key the server did not invalidate
    /// (no SEND_WITH_INV for it): invalidated here, at a syscall's cost.
    pub local_invs: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Failed reconnect attempts.
    pub failed_reconnects: u64,
    /// Times the path went down.
    pub downs: u64,
    /// Why it last went down.
    pub last_reason: Option<DownReason>,
    /// Last heartbeat round trip.
    pub hb_rtt: Duration,
    /// Most heartbeat intervals in a row that passed without an answer
    /// (0: the path never missed a beat).
    pub hb_missed_peak: u32,
}

/// One core's figures on a path (its IO connection's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// IOs completed.
    pub ios: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// IOs completed with an error.
    pub errors: u64,
    /// IOs in flight.
    pub inflight: u64,
    /// IOs moved to another path when this one failed.
    pub failovers: u64,
}

impl CltPath {
    pub(crate) fn new(id: PathId, addr: String, queue_depth: u32, cores: usize) -> CltPath {
        CltPath {
            id,
            addr,
            state: AtomicU8::new(PathState::Connecting.to_u8()),
            epoch: std::sync::atomic::AtomicU16::new(0),
            rbufs: (0..queue_depth).map(|_| RBuf::default()).collect(),
            cores: (0..cores.max(1)).map(|_| CachePadded::default()).collect(),
            latency_ns: AtomicU64::new(0),
            reason: Mutex::new(None),
            reconnects: AtomicU64::new(0),
            failed_reconnects: AtomicU64::new(0),
            downs: AtomicU64::new(0),
            hb_missed_peak: AtomicU32::new(0),
        }
    }

    /// The path's id.
    pub fn id(&self) -> PathId {
        self.id
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The state, as the control thread last published it.
    pub fn state(&self) -> PathState {
        PathState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Published by the control thread only, after each transition.
    pub(crate) fn publish(&self, s: PathState) {
        self.state.store(s.to_u8(), Ordering::Release);
    }

    /// The round now up (published before the state says Connected).
    pub(crate) fn epoch(&self) -> u16 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn set_epoch(&self, e: u16) {
        self.epoch.store(e, Ordering::Release);
    }

    /// Records why the path went down (the control thread only).
    pub(crate) fn went_down(&self, why: &DownReason) {
        self.downs.fetch_add(1, Ordering::Relaxed);
        self.set_reason(why);
    }

    /// Records why the path changed (closed for good, say).
    pub(crate) fn set_reason(&self, why: &DownReason) {
        if let Ok(mut r) = self.reason.lock() {
            *r = Some(why.clone());
        }
    }

    /// Why the path last went down.
    pub fn last_reason(&self) -> Option<DownReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// Requests in flight on every core.
    pub fn inflight(&self) -> u64 {
        self.cores
            .iter()
            .map(|c| c.inflight.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn recvs(&self) -> u64 {
        self.cores
            .iter()
            .map(|c| c.recvs.load(Ordering::Relaxed))
            .sum()
    }

    /// The last heartbeat round trip.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn set_latency(&self, d: Duration) {
        self.latency_ns
            .store(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Figures per core (index: the core's, as [`super::Client::open`]
    /// returned them).
    pub fn core_stats(&self) -> Vec<CoreStats> {
        self.cores
            .iter()
            .map(|c| CoreStats {
                ios: c.ios.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                inflight: c.inflight.load(Ordering::Relaxed),
                failovers: c.failovers.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Figures summed over cores.
    pub fn stats(&self) -> PathStats {
        let sum = |f: fn(&CoreCounters) -> &AtomicU64| {
            self.cores
                .iter()
                .map(|c| f(c).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        PathStats {
            id: Some(self.id),
            addr: self.addr.clone(),
            state: Some(self.state()),
            ios: sum(|c| &c.ios),
            bytes: sum(|c| &c.bytes),
            errors: sum(|c| &c.errors),
            inflight: sum(|c| &c.inflight),
            failovers: sum(|c| &c.failovers),
            local_invs: sum(|c| &c.local_invs),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            failed_reconnects: self.failed_reconnects.load(Ordering::Relaxed),
            downs: self.downs.load(Ordering::Relaxed),
            last_reason: self.last_reason(),
            hb_rtt: self.latency(),
            hb_missed_peak: self.hb_missed_peak.load(Ordering::Relaxed),
        }
    }
}
