//! A server path: what its connections share (chunk memory and MRs, state,
//! counters). Each counter has one writer (its connection), so cores never
//! contend on a cache line.

use super::IoDir;
use crate::sess::DownReason;
use crossbeam_utils::CachePadded;
use rtrs_fabric::{Fabric, Mr, Sge};
use rtrs_proto::imm::ImmLayout;
use rtrs_proto::SgDesc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

/// A path's life (the kernel's `rtrs_srv_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathState {
    /// Connections are being accepted; no IO yet.
    Connecting,
    /// INFO exchanged: IO flows.
    Connected,
    /// Failing or closing: no new IO, connections being torn down.
    Closing,
    /// Gone.
    Closed,
}

impl PathState {
    fn from_u8(v: u8) -> PathState {
        match v {
            0 => PathState::Connecting,
            1 => PathState::Connected,
            2 => PathState::Closing,
            _ => PathState::Closed,
        }
    }
}

/// Per-connection counters, written only by that connection.
#[derive(Debug, Default)]
pub struct ConCounters {
    /// Receives with immediate data (requests and heartbeats).
    pub recvs: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Read requests.
    pub reads: AtomicU64,
    /// Bytes written by clients.
    pub bytes_written: AtomicU64,
    /// Bytes read by clients.
    pub bytes_read: AtomicU64,
    /// Responses with a non-zero errno.
    pub errors: AtomicU64,
    /// Requests in the handler's hands now.
    pub inflight: AtomicU64,
    /// The handler API misused, each answered -EIO (and logged): `Later`
    /// without deferring, or a `Deferred` dropped without `complete`.
    pub handler_faults: AtomicU64,
    /// Request residence time: from the poll that took the request to
    /// its response posted.
    pub lat: super::lat::LatHist,
}

/// A server path's figures, summed over its connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathTotals {
    /// Write requests.
    pub writes: u64,
    /// Read requests.
    pub reads: u64,
    /// Bytes written by the client.
    pub bytes_written: u64,
    /// Bytes read by the client.
    pub bytes_read: u64,
    /// Responses with an errno.
    pub errors: u64,
    /// Requests in flight.
    pub inflight: u64,
    /// Handler API misuse answered -EIO ([`ConCounters::handler_faults`]).
    pub handler_faults: u64,
}

fn bump(c: &AtomicU64, by: u64) {
    // One writer: a plain load and store, no locked instruction.
    c.store(
        c.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// A path's counters, one slot per connection.
#[derive(Debug)]
pub struct PathStats {
    cons: Box<[CachePadded<ConCounters>]>,
}

impl PathStats {
    fn new(cid_num: u16) -> PathStats {
        PathStats {
            cons: (0..cid_num).map(|_| CachePadded::default()).collect(),
        }
    }
    pub(crate) fn con(&self, cid: u16) -> &ConCounters {
        &self.cons[cid as usize]
    }
    /// Connections (cids) the path has slots for.
    pub fn cons(&self) -> u16 {
        self.cons.len() as u16
    }

    /// Connection `cid`'s figures (zero for an unknown cid).
    pub fn con_totals(&self, cid: u16) -> PathTotals {
        self.sum_over(
            self.cons
                .get(cid as usize)
                .map(std::slice::from_ref)
                .unwrap_or(&[]),
        )
    }

    /// Adds connection `cid`'s latencies into `into`.
    pub fn con_latency_into(&self, cid: u16, into: &mut super::lat::LatSnapshot) {
        if let Some(c) = self.cons.get(cid as usize) {
            c.lat.add_to(into);
        }
    }

    /// The path's request latencies (all its connections).
    pub fn latency(&self) -> super::lat::LatSnapshot {
        let mut s = super::lat::LatSnapshot::default();
        for c in self.cons.iter() {
            c.lat.add_to(&mut s);
        }
        s
    }

    /// Totals over the path's connections.
    pub fn totals(&self) -> PathTotals {
        self.sum_over(&self.cons)
    }

    fn sum_over(&self, cons: &[CachePadded<ConCounters>]) -> PathTotals {
        let sum = |f: fn(&ConCounters) -> &AtomicU64| {
            cons.iter()
                .map(|c| f(c).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        PathTotals {
            writes: sum(|c| &c.writes),
            reads: sum(|c| &c.reads),
            bytes_written: sum(|c| &c.bytes_written),
            bytes_read: sum(|c| &c.bytes_read),
            errors: sum(|c| &c.errors),
            inflight: sum(|c| &c.inflight),
            handler_faults: sum(|c| &c.handler_faults),
        }
    }
}

/// One path of a server session.
pub struct SrvPath<F: Fabric> {
    pub(crate) sess_uuid: [u8; 16],
    pub(crate) paths_uuid: [u8; 16],
    pub(crate) cid_num: u16,
    pub(crate) peer: String,
    pub(crate) queue_depth: u32,
    pub(crate) chunk_size: usize,
    pub(crate) layout: ImmLayout,
    pub(crate) always_invalidate: bool,
    pub(crate) hb_interval: std::time::Duration,
    pub(crate) hb_missed_max: u32,
    /// The session's chunks (shared by its paths), claimed one request
    /// at a time whichever path or core it comes on.
    pub(crate) chunks: Arc<mempool::Claims>,
    /// The path's protection domain, on its link's device.
    pub(crate) pd: F::Pd,
    /// One MR per chunk (always_invalidate) or one over all chunks.
    pub(crate) mrs: Vec<F::Mr>,
    state: AtomicU8,
    /// When its first connection came (its handshake's deadline starts).
    pub(crate) born: minstant::Instant,
    reason: OnceLock<DownReason>,
    identity: Arc<OnceLock<super::Identity>>,
    /// The key the client proved on the path's first connection.
    key_id: Option<String>,
    created: AtomicU32,
    /// Heartbeats now unanswered in a row (cid 0's, on the control thread).
    hb_missed: AtomicU32,
    pub(crate) stats: PathStats,
}

impl<F: Fabric> std::fmt::Debug for SrvPath<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrvPath")
            .field("peer", &self.peer)
            .field("sessname", &self.sessname())
            .field("state", &self.state())
            .finish()
    }
}

impl<F: Fabric> SrvPath<F> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sess_uuid: [u8; 16],
        paths_uuid: [u8; 16],
        cid_num: u16,
        peer: String,
        layout: ImmLayout,
        queue_depth: u32,
        chunk_size: usize,
        always_invalidate: bool,
        hb: (std::time::Duration, u32),
        chunks: Arc<mempool::Claims>,
        pd: F::Pd,
        mrs: Vec<F::Mr>,
        key_id: Option<String>,
        born: minstant::Instant,
    ) -> SrvPath<F> {
        SrvPath {
            sess_uuid,
            paths_uuid,
            cid_num,
            peer,
            queue_depth,
            chunk_size,
            layout,
            always_invalidate,
            hb_interval: hb.0,
            hb_missed_max: hb.1,
            chunks,
            pd,
            mrs,
            state: AtomicU8::new(PathState::Connecting as u8),
            born,
            reason: OnceLock::new(),
            identity: Arc::new(OnceLock::new()),
            key_id,
            created: AtomicU32::new(0),
            hb_missed: AtomicU32::new(0),
            stats: PathStats::new(cid_num),
        }
    }

    /// The path's state.
    pub fn state(&self) -> PathState {
        PathState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The session name the client gave in INFO_REQ.
    pub fn sessname(&self) -> Option<&str> {
        self.identity.get().map(|i| i.sessname.as_str())
    }

    /// Who the client is (set by INFO_REQ), shared with the path's
    /// handlers (`ConInfo::identity`).
    pub fn identity(&self) -> &Arc<OnceLock<super::Identity>> {
        &self.identity
    }

    /// Why the path closed, if it did.
    pub fn close_reason(&self) -> Option<&DownReason> {
        self.reason.get()
    }

    /// The client session's uuid (`paths_uuid`) and this path's (`sess_uuid`).
    pub fn uuids(&self) -> ([u8; 16], [u8; 16]) {
        (self.paths_uuid, self.sess_uuid)
    }

    /// The client's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Counters.
    pub fn stats(&self) -> &PathStats {
        &self.stats
    }

    /// How long since its first connection came.
    pub fn uptime(&self) -> std::time::Duration {
        minstant::Instant::now().saturating_duration_since(self.born)
    }

    /// Connections the client asked for (`cid_num`), and those accepted.
    pub fn connections(&self) -> (u16, u32) {
        (self.cid_num, self.cons_created())
    }

    /// The heartbeats now unanswered in a row (the path dies at
    /// `hb_missed_max`).
    pub fn heartbeats_missed(&self) -> u32 {
        self.hb_missed.load(Ordering::Relaxed)
    }

    pub(crate) fn set_heartbeats_missed(&self, n: u32) {
        self.hb_missed.store(n, Ordering::Relaxed);
    }

    pub(crate) fn set_sessname(&self, name: String) {
        // The first INFO_REQ names the path: a second one is refused by
        // set_connected, so an unset name here loses nothing.
        let _ = self.identity.set(super::Identity {
            sessname: name,
            key_id: self.key_id.clone(),
        });
    }

    /// Marks the path closing with a logged reason (the first reason wins).
    pub(crate) fn close(&self, why: DownReason) {
        let mut cur = self.state.load(Ordering::Acquire);
        while cur < PathState::Closing as u8 {
            match self.state.compare_exchange(
                cur,
                PathState::Closing as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // The one line per path down is the control thread's
                    // when the path is closed.
                    tracing::debug!(peer = %self.peer, sessname = ?self.sessname(), "closing path: {why}");
                    // The first reason wins: only the CAS winner sets it.
                    let _ = self.reason.set(why);
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    pub(crate) fn set_closed(&self) {
        self.state.store(PathState::Closed as u8, Ordering::Release);
    }

    pub(crate) fn set_connected(&self) -> bool {
        self.state
            .compare_exchange(
                PathState::Connecting as u8,
                PathState::Connected as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    pub(crate) fn con_created(&self) {
        self.created.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn cons_created(&self) -> u32 {
        self.created.load(Ordering::Acquire)
    }

    pub(crate) fn note_recvs(&self, cid: u16, total: u64) {
        self.stats.con(cid).recvs.store(total, Ordering::Relaxed);
    }

    /// Receives on all connections (the heartbeat's liveness signal).
    pub(crate) fn recvs_total(&self) -> u64 {
        self.stats
            .cons
            .iter()
            .map(|c| c.recvs.load(Ordering::Relaxed))
            .sum()
    }

    /// INFO_RSP's descriptors: one per MR.
    pub(crate) fn descs(&self) -> Vec<SgDesc> {
        self.mrs
            .iter()
            .map(|mr| SgDesc {
                addr: mr.addr(),
                key: mr.rkey(),
                len: mr.len() as u32,
            })
            .collect()
    }

    /// A local sg entry for the first `len` bytes of chunk `buf_id`.
    pub(crate) fn data_sge(&self, buf_id: u32, len: u32) -> Sge {
        if self.always_invalidate {
            self.mrs[buf_id as usize].sge(0, len)
        } else {
            self.mrs[0].sge(buf_id as usize * self.chunk_size, len)
        }
    }
}

impl PathStats {
    pub(crate) fn on_request_at(&self, cid: u16, dir: IoDir, len: usize) {
        let c = self.con(cid);
        bump(&c.inflight, 1);
        match dir {
            IoDir::Write => {
                bump(&c.writes, 1);
                bump(&c.bytes_written, len as u64);
            }
            IoDir::Read => {
                bump(&c.reads, 1);
                bump(&c.bytes_read, len as u64);
            }
        }
    }
    pub(crate) fn on_error_at(&self, cid: u16) {
        bump(&self.con(cid).errors, 1);
    }
    pub(crate) fn on_handler_faults_at(&self, cid: u16, n: u64) {
        bump(&self.con(cid).handler_faults, n);
    }
    pub(crate) fn on_response_at(&self, cid: u16) {
        bump(&self.con(cid).inflight, u64::MAX);
    }
}
