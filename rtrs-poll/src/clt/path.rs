//! What a client path's connections and the control loop share: its state,
//! the server's chunk table (`rbufs`), and per-core counters.

use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A client path's state as IO sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkState {
    /// Being (re)connected: IO avoids it.
    Connecting,
    /// Up: IO may use it.
    Connected,
    /// A connection failed: IO fails over; the control loop reconnects.
    Failed,
    /// Closed for good.
    Closed,
}

impl LinkState {
    fn from_u8(v: u8) -> LinkState {
        match v {
            0 => LinkState::Connecting,
            1 => LinkState::Connected,
            2 => LinkState::Failed,
            _ => LinkState::Closed,
        }
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
    pub(crate) addr: String,
    state: AtomicU8,
    pub(crate) rbufs: Box<[RBuf]>,
    pub(crate) cores: Box<[CachePadded<CoreCounters>]>,
    latency_ns: AtomicU64,
    reason: Mutex<Option<String>>,
    pub(crate) reconnects: AtomicU64,
}

/// A path's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathStats {
    /// The server address.
    pub addr: String,
    /// State now.
    pub state: Option<LinkState>,
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
    /// Successful reconnects.
    pub reconnects: u64,
    /// Last heartbeat round trip.
    pub hb_rtt: Duration,
}

impl CltPath {
    pub(crate) fn new(addr: String, queue_depth: u32, cores: usize) -> CltPath {
        CltPath {
            addr,
            state: AtomicU8::new(LinkState::Connecting as u8),
            rbufs: (0..queue_depth).map(|_| RBuf::default()).collect(),
            cores: (0..cores.max(1)).map(|_| CachePadded::default()).collect(),
            latency_ns: AtomicU64::new(0),
            reason: Mutex::new(None),
            reconnects: AtomicU64::new(0),
        }
    }

    /// The state.
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, s: LinkState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Marks the path failed (from a core or the control loop), logging why.
    /// Only a connected or connecting path can fail; the first reason wins.
    pub(crate) fn fail(&self, why: std::fmt::Arguments<'_>) {
        let mut cur = self.state.load(Ordering::Acquire);
        while cur < LinkState::Failed as u8 {
            match self.state.compare_exchange(
                cur,
                LinkState::Failed as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let reason = why.to_string();
                    tracing::warn!(addr = %self.addr, "path failed: {reason}");
                    if let Ok(mut r) = self.reason.lock() {
                        *r = Some(reason);
                    }
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Why the path last failed.
    pub fn last_error(&self) -> Option<String> {
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

    /// Figures summed over cores.
    pub fn stats(&self) -> PathStats {
        let sum = |f: fn(&CoreCounters) -> &AtomicU64| {
            self.cores
                .iter()
                .map(|c| f(c).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        PathStats {
            addr: self.addr.clone(),
            state: Some(self.state()),
            ios: sum(|c| &c.ios),
            bytes: sum(|c| &c.bytes),
            errors: sum(|c| &c.errors),
            inflight: sum(|c| &c.inflight),
            failovers: sum(|c| &c.failovers),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            hb_rtt: self.latency(),
        }
    }
}
