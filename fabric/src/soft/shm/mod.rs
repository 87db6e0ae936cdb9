//! The shared-memory fabric: processes (or threads) on one host.
//!
//! ```text
//!  QP A ──descriptors──> ring A→B (memfd of A, mapped by B) ──> B's core executes:
//!                                                              check B's rkey, copy once
//!                                                              A's memory <-> B's memory
//!  QP A <──acked / nak── consumer header of ring A→B <───────── B publishes progress
//! ```
//! Registered memory must be shareable (a memfd, e.g. mempool's shareable
//! region) for a peer to reach it; other memory works for local keys and
//! inline sends only. A peer maps our memfds through `/proc/PID/fd/N` the first
//! time a request names them (one syscall per region, then cached until the
//! region's slot is reused): the data path itself makes none. A region's
//! entry lives while an MR of the PD uses its memory. The connection manager speaks over an abstract
//! unix socket named after the address; that socket is also how a peer's death
//! is seen.

mod cm;
mod wire;

pub use cm::ShmCm;

use super::engine::{Post, QpCore, SoftCq, ToWire};
use super::mr::MrTable;
use super::verbs::{Ids, SoftBackend, SoftEngine, SoftMr, SoftPd, SoftQp, SoftQpShared};
use super::{sg_copy, Mapping, StackList};
use crate::live::{Kind, Live};
use crate::{
    Access, Fabric, FabricError, Memory, QpCap, QpState, RecvWr, Result, SendWr, Wc, WcOpcode,
    WcStatus,
};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wire::{op, Desc, Ring, WireSge, F_INLINE, NO_REGION};

/// Inbound descriptors one QP executes per poll, so one busy peer cannot
/// starve the others on the same CQ.
const INBOUND_BATCH: usize = 64;
/// One RNR retry's wait (what rdma_cm's default min_rnr_timer gives: 0.64 ms).
const RNR_TIMER: std::time::Duration = std::time::Duration::from_micros(640);

/// Sizes of the tables a protection domain allocates up front.
#[derive(Clone, Copy, Debug)]
pub struct ShmConfig {
    /// Memory regions per PD.
    pub max_mrs: u32,
    /// Distinct shareable memories per PD.
    pub max_regions: u32,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            max_mrs: 1 << 16,
            max_regions: MAX_REGIONS,
        }
    }
}

/// The shm fabric.
#[derive(Clone, Debug, Default)]
pub struct ShmFabric {
    inner: Arc<FabricInner>,
}

#[derive(Debug, Default)]
struct FabricInner {
    cfg: ShmConfig,
    ids: Ids,
}

impl ShmFabric {
    /// A fabric with default table sizes.
    pub fn new() -> ShmFabric {
        ShmFabric::with_config(ShmConfig::default())
    }
    /// A fabric with the given table sizes.
    pub fn with_config(cfg: ShmConfig) -> ShmFabric {
        ShmFabric {
            inner: Arc::new(FabricInner {
                cfg,
                ids: Ids::default(),
            }),
        }
    }
}

impl Fabric for ShmFabric {
    type Pd = ShmPd;
    type Mr = ShmMr;
    type Cq = ShmCq;
    type Qp = ShmQp;
    type Cm = ShmCm;

    fn name(&self) -> &'static str {
        "shm"
    }

    fn alloc_pd(&self) -> Result<ShmPd> {
        self.alloc_pd_sized(self.inner.cfg.max_mrs)
    }

    fn alloc_pd_sized(&self, max_mrs: u32) -> Result<ShmPd> {
        let cfg = self.inner.cfg;
        Ok(SoftPd::new(PdInner {
            _live: Live::new(Kind::Pd),
            fabric: self.inner.clone(),
            mrs: MrTable::new(max_mrs),
            regions: RegionTable::new(cfg.max_regions)?,
        }))
    }

    fn create_cm(&self) -> Result<ShmCm> {
        Ok(ShmCm::new())
    }
}

// ---------------------------------------------------------------------------
// Regions: the shareable memories of a PD, listed in a memfd peers map.
//
// ```text
//  0   header (16 bytes, unused)
//  16  entry[cap]   seq  fd  len   (three u64 words, 24 bytes)
// ```
// An entry is written under a sequence lock (one writer: the table's mutex):
// `seq` odd while it is written, even when stable; fd and len 0 when free.
// Each write advances `seq` by 2, so `seq` tells one use of a slot from the
// next. A region id is `tag << 16 | slot`, the tag being the low 16 bits of
// `seq / 2` when the memory was added: a peer refuses an id whose tag is not
// the entry's (a request that names a memory dropped since), and remaps when
// `seq` is not the one it mapped at.

const REGION_HDR: usize = 16;
const REGION_ENTRY: usize = 24;
const SLOT_MASK: u32 = 0xffff;
/// Slots per table at most (slot 0xffff would let an id be NO_REGION).
const MAX_REGIONS: u32 = SLOT_MASK;

/// The tag a region id carries for an entry at `seq`.
fn tag_of(seq: u64) -> u32 {
    ((seq >> 1) as u32) & SLOT_MASK
}

/// One entry's three words in a table mapping.
struct EntryWords<'a> {
    seq: &'a AtomicU64,
    fd: &'a AtomicU64,
    len: &'a AtomicU64,
}

/// A shareable memory the PD holds while MRs use it.
struct Held {
    mem: Arc<dyn Memory>,
    /// The region id handed out for it.
    id: u32,
    /// MRs registered over it.
    mrs: u32,
    /// Counted while the entry is held.
    _live: Live,
}

#[derive(Default)]
struct Regions {
    slots: Vec<Option<Held>>,
    /// (address, length) of each held memory to its slot.
    by_key: HashMap<(usize, usize), u32>,
    /// Freed slots, the latest on top.
    free: Vec<u32>,
}

struct RegionTable {
    fd: OwnedFd,
    map: Mapping,
    cap: u32,
    local: Mutex<Regions>,
}

impl std::fmt::Debug for RegionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegionTable(cap {})", self.cap)
    }
}

impl RegionTable {
    fn new(cap: u32) -> Result<RegionTable> {
        let cap = cap.clamp(1, MAX_REGIONS);
        let (fd, map) = Mapping::memfd("rtrs-shm-regions", Self::bytes(cap))?;
        Ok(RegionTable {
            fd,
            map,
            cap,
            local: Mutex::new(Regions::default()),
        })
    }
    fn bytes(cap: u32) -> usize {
        REGION_HDR + cap as usize * REGION_ENTRY
    }
    fn entry(map: &Mapping, i: u32) -> EntryWords<'_> {
        let off = REGION_HDR + i as usize * REGION_ENTRY;
        // SAFETY: callers keep i < cap, so the three 8-aligned words are inside
        // the map, which outlives the borrow.
        unsafe {
            let word = |k: usize| &*(map.ptr().add(off + 8 * k) as *const AtomicU64);
            EntryWords {
                seq: word(0),
                fd: word(1),
                len: word(2),
            }
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Regions> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Rewrites entry `i` (the caller holds the lock: one writer); returns
    /// its new sequence number.
    fn publish(&self, i: u32, fd: u64, len: u64) -> u64 {
        let e = Self::entry(&self.map, i);
        let seq = e.seq.load(Ordering::Relaxed);
        e.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        e.fd.store(fd, Ordering::Relaxed);
        e.len.store(len, Ordering::Relaxed);
        e.seq.store(seq + 2, Ordering::Release);
        seq + 2
    }
    fn in_use(&self) -> usize {
        self.lock().by_key.len()
    }
    /// The region id of `mem` for one more MR, adding it when new.
    fn acquire(&self, mem: &Arc<dyn Memory>) -> Result<u32> {
        let Some(fd) = mem.memfd() else {
            return Ok(NO_REGION);
        };
        let key = (mem.as_ptr() as usize, mem.len());
        let mut g = self.lock();
        let r = &mut *g;
        if let Some(&i) = r.by_key.get(&key) {
            let held = r.slots[i as usize].as_mut().expect("a keyed slot is held");
            held.mrs += 1;
            return Ok(held.id);
        }
        let i = match r.free.pop() {
            Some(i) => i,
            None if (r.slots.len() as u32) < self.cap => {
                r.slots.push(None);
                r.slots.len() as u32 - 1
            }
            None => return Err(FabricError::TableFull("shareable region")),
        };
        let seq = self.publish(i, fd as u32 as u64, mem.len() as u64);
        let id = tag_of(seq) << 16 | i;
        r.slots[i as usize] = Some(Held {
            mem: mem.clone(),
            id,
            mrs: 1,
            _live: Live::new(Kind::Region),
        });
        r.by_key.insert(key, i);
        Ok(id)
    }
    /// One MR of region `id` is gone; the last one frees the entry.
    fn release(&self, id: u32) {
        if id == NO_REGION {
            return;
        }
        let i = id & SLOT_MASK;
        let mut g = self.lock();
        let r = &mut *g;
        let held = match r.slots.get_mut(i as usize).and_then(Option::as_mut) {
            Some(held) if held.id == id => held,
            _ => {
                debug_assert!(false, "release of region {id:#x}, not in use");
                return;
            }
        };
        held.mrs -= 1;
        if held.mrs > 0 {
            return;
        }
        let held = r.slots[i as usize].take().expect("checked above");
        r.by_key
            .remove(&(held.mem.as_ptr() as usize, held.mem.len()));
        // Cleared before the memory (and its memfd) can go, so no peer maps
        // a descriptor number that names another file by then.
        self.publish(i, 0, 0);
        r.free.push(i);
        drop(g);
        drop(held);
    }
}

/// A peer's shareable memories, mapped on first use.
struct PeerMem {
    pid: u32,
    table: Mapping,
    cap: u32,
    /// Each slot's mapping and the entry's `seq` it was made at.
    maps: Vec<Option<(u64, Mapping)>>,
}

impl PeerMem {
    fn open(pid: u32, fd: i32, len: u64) -> Result<PeerMem> {
        if len < REGION_HDR as u64 || len > RegionTable::bytes(MAX_REGIONS) as u64 {
            return Err(FabricError::Protocol("region table length out of range"));
        }
        let cap = ((len as usize - REGION_HDR) / REGION_ENTRY) as u32;
        let table = Mapping::map_peer(pid, fd, len as usize)?;
        Ok(PeerMem {
            pid,
            table,
            cap,
            maps: (0..cap).map(|_| None).collect(),
        })
    }

    /// `len` bytes at `off` of the peer's region `region`, if they exist.
    /// The data path: one acquire load when the slot's mapping is current.
    #[inline]
    fn resolve(&mut self, region: u32, off: u64, len: u64) -> Option<*mut u8> {
        let slot = region & SLOT_MASK;
        if slot >= self.cap {
            return None;
        }
        let seq = RegionTable::entry(&self.table, slot)
            .seq
            .load(Ordering::Acquire);
        match &self.maps[slot as usize] {
            Some((at, m)) if *at == seq && tag_of(seq) == region >> 16 => m.at(off, len),
            _ => self.remap(slot, region >> 16)?.at(off, len),
        }
    }

    /// Maps slot `slot` as the entry says now, if its tag is `tag`.
    #[cold]
    fn remap(&mut self, slot: u32, tag: u32) -> Option<&Mapping> {
        let e = RegionTable::entry(&self.table, slot);
        let seq = e.seq.load(Ordering::Acquire);
        let fd = e.fd.load(Ordering::Relaxed) as u32 as i32;
        let rlen = e.len.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let stable = seq % 2 == 0 && e.seq.load(Ordering::Relaxed) == seq;
        let cached = &mut self.maps[slot as usize];
        if stable && cached.as_ref().is_some_and(|(at, _)| *at != seq) {
            // The memory this mapping shows is gone from the peer's table.
            *cached = None;
        }
        // A tag that is not the entry's: the request names a memory the peer
        // dropped since (or one it never had).
        if !stable || tag_of(seq) != tag || rlen == 0 {
            return None;
        }
        let map = match Mapping::map_peer(self.pid, fd, usize::try_from(rlen).ok()?) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("shm: cannot map peer {} region {slot}: {e}", self.pid);
                return None;
            }
        };
        // The peer clears an entry before its memfd can close: an unchanged
        // entry after the open means the descriptor was still that memory's.
        if e.seq.load(Ordering::Acquire) != seq {
            return None;
        }
        let cached = &mut self.maps[slot as usize];
        *cached = Some((seq, map));
        cached.as_ref().map(|(_, m)| m)
    }
}

// ---------------------------------------------------------------------------
// Protection domain and memory regions.

/// The shm fabric's PD internals (the backend of the generic objects).
#[derive(Debug)]
pub struct PdInner {
    /// Counted while the PD or any MR of it lives (an MR holds its PD).
    _live: Live,
    fabric: Arc<FabricInner>,
    mrs: MrTable,
    regions: RegionTable,
}

/// A protection domain of the shm fabric.
pub type ShmPd = SoftPd<PdInner>;
/// A memory region of the shm fabric; deregistered on drop.
pub type ShmMr = SoftMr<PdInner>;
/// A completion queue of the shm fabric. Polling it drives its QPs.
pub type ShmCq = SoftCq<QpShared>;
/// A queue pair of the shm fabric.
pub type ShmQp = SoftQp<PdInner>;
/// What an shm QP shares between its core, its CQs and the CM.
pub(crate) type QpShared = SoftQpShared<PdInner>;

impl ShmPd {
    /// Shareable memories registered on this PD now (entries of its region
    /// table in use, of `ShmConfig::max_regions`).
    pub fn regions_in_use(&self) -> usize {
        self.backend().regions.in_use()
    }
}

impl ShmMr {
    /// The slot of this MR's memory in its PD's region table (None: the
    /// memory is not shareable). For tests.
    #[doc(hidden)]
    pub fn region_slot(&self) -> Option<u32> {
        let (pd, index) = self.entry();
        let region = pd.mrs.region(index);
        (region != NO_REGION).then_some(region & SLOT_MASK)
    }
}

/// What an shm QP keeps beside the generic state: its outbound ring's memfd
/// (the CM tells the peer where to map it) and its PD.
#[derive(Debug)]
pub struct ShmQpExtra {
    out_fd: OwnedFd,
    out_len: usize,
    pd: Arc<PdInner>,
}

impl SoftBackend for PdInner {
    type Fabric = ShmFabric;
    type Engine = Engine;
    type Link = Link;
    type QpExtra = ShmQpExtra;
    const NAME: &'static str = "Shm";

    fn mrs(&self) -> &MrTable {
        &self.mrs
    }

    fn tag(&self, mem: &Arc<dyn Memory>) -> Result<(u32, u64)> {
        Ok((self.regions.acquire(mem)?, 0))
    }

    fn untag(&self, region: u32) {
        self.regions.release(region);
    }

    fn ids(&self) -> &Ids {
        &self.fabric.ids
    }

    fn new_qp(pd: &Arc<Self>, cap: QpCap) -> Result<(u32, Engine, ShmQpExtra)> {
        let qp_num = pd.fabric.ids.next_qp();
        let core = QpCore::new(qp_num, cap)?;
        let (out_fd, out) = Ring::create(&cap)?;
        let extra = ShmQpExtra {
            out_fd,
            out_len: out.len(),
            pd: pd.clone(),
        };
        let engine = Engine {
            core,
            out,
            link: None,
            in_psn: 0,
            in_dead: false,
            rnr_since: None,
            pd: pd.clone(),
            polls: 0,
            acked_seen: 0,
        };
        Ok((qp_num, engine, extra))
    }

    fn on_destroy(qp: &QpShared) {
        let _ = qp.engine.with("qp", |e| {
            e.out.close_producer();
            if let Some(l) = &e.link {
                l.inbound.close_consumer();
            }
        });
    }
}

impl SoftEngine<PdInner> for Engine {
    fn sync(&mut self, qp: &QpShared) {
        Engine::sync(self, qp)
    }
    fn progress(&mut self, qp: &QpShared) {
        Engine::progress(self, qp)
    }
    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        Engine::post_send(self, wr)
    }
    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        Engine::post_recv(self, wr)
    }
    fn drain_wcs(&mut self, send: bool, recv: bool, out: &mut [Wc]) -> usize {
        self.core.drain_wcs(send, recv, out)
    }
}

// ---------------------------------------------------------------------------
// Queue pairs.

/// What the connection manager hands a QP once both sides have mapped each
/// other: the peer's ring and its memory.
pub struct Link {
    inbound: Ring,
    peer: PeerMem,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link(peer pid {})", self.peer.pid)
    }
}

impl Link {
    pub(crate) fn open(pid: u32, ring: (i32, u64), regions: (i32, u64)) -> Result<Link> {
        Ok(Link {
            inbound: Ring::open(pid, ring.0, ring.1)?,
            peer: PeerMem::open(pid, regions.0, regions.1)?,
        })
    }
}

impl SoftQpShared<PdInner> {
    /// (ring fd, ring len, regions fd, regions len) for the CM messages.
    pub(crate) fn endpoint(&self) -> (i32, u64, i32, u64) {
        let x = &self.extra;
        (
            x.out_fd.as_raw_fd(),
            x.out_len as u64,
            x.pd.regions.fd.as_raw_fd(),
            x.pd.regions.map.len() as u64,
        )
    }
}

/// The RC engine of one shm QP, driven by the core that polls its CQ.
pub struct Engine {
    core: QpCore,
    out: Ring,
    link: Option<Link>,
    /// Next inbound descriptor to execute.
    in_psn: u64,
    /// We refused an inbound descriptor: execute nothing more.
    in_dead: bool,
    rnr_since: Option<minstant::Instant>,
    pd: Arc<PdInner>,
    /// Polls since the consumer header was last read.
    polls: u32,
    /// The highest acknowledgement piggybacked on the peer's requests.
    acked_seen: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Engine(qp {}, {:?}, executed {})",
            self.core.qp_num, self.core.state, self.in_psn
        )
    }
}

/// Polls between two reads of the consumer header when nothing needs it, so a
/// refusal or a close is still seen on a connection with nothing outstanding.
const HEADER_EVERY: u32 = 1024;

/// Why an inbound descriptor was not executed.
enum Stop {
    /// No receive posted: try again later.
    Rnr,
    /// Refused: tell the sender `status`; `fatal` moves our QP to error too.
    Refuse { status: WcStatus, fatal: bool },
}

/// Room for every segment of a request plus one.
type Segs<P> = StackList<(P, usize), { wire::MAX_SEND_SGE as usize + 1 }>;
/// The sg entries of one descriptor.
type WireSges = StackList<WireSge, { wire::MAX_SEND_SGE as usize }>;

impl Engine {
    /// Picks up the connection manager's news.
    fn sync(&mut self, shared: &QpShared) {
        if self.link.is_none() && shared.attach_ready.load(Ordering::Acquire) {
            let link = shared
                .attach
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(link) = link {
                self.link = Some(link);
                if self.core.state == QpState::Init {
                    self.core.state = QpState::Rts;
                }
            }
        }
        if self.core.state == QpState::Rts {
            self.polls = self.polls.wrapping_add(1);
            // The consumer header is a line the peer rewrites after each
            // request; read it only when a completion or room depends on it.
            let header = self.core.sq_notify > 0
                || self.core.sq.len() * 2 >= self.core.cap.max_send_wr as usize
                || self.polls % HEADER_EVERY == 0;
            let gone = shared.broken.load(Ordering::Acquire)
                || self
                    .link
                    .as_ref()
                    .is_some_and(|l| l.inbound.producer_closed())
                || (header && self.out.consumer_closed());
            if header || gone {
                // The peer's verdict on our requests first: a refusal names the
                // request that failed, even if the peer has closed since.
                if let Some((psn, code)) = self.out.nak() {
                    self.core.retire(psn);
                    self.fail(Some((psn, WcStatus::from_ibv_code(code))));
                } else {
                    self.core.retire(self.out.acked(self.core.next_psn));
                    if gone {
                        self.fail(None);
                    }
                }
            }
        }
        shared.state.set(self.core.state);
    }

    /// Error state: flush, and close both rings so the peer flushes too.
    fn fail(&mut self, failed: Option<(u64, WcStatus)>) {
        self.core.enter_error(failed);
        self.out.close_producer();
        if let Some(l) = &self.link {
            l.inbound.close_consumer();
        }
    }

    fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        self.core.post_recv(wr)
    }

    fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        let opcode = wr.opcode.wc_opcode();
        let inline_cap = self.out.inline_cap as usize;
        let ToWire {
            op: wop,
            len,
            inline,
            need,
        } = match self.core.admit_send(wr, &self.pd.mrs, inline_cap)? {
            Post::Wire(w) => w,
            Post::Done => return Ok(()),
            Post::Failed => {
                self.fail(None);
                return Ok(());
            }
        };
        // admit_send checked the list against max_send_sge (<= MAX_SEND_SGE).
        let mut sges: WireSges = StackList::new();
        let mut parts: Segs<*const u8> = StackList::new();
        for s in wr.sg_list {
            match self
                .pd
                .mrs
                .check_lkey(s.lkey, s.addr, u64::from(s.len), need)
            {
                Ok(c) if inline || c.region != NO_REGION => {
                    sges.push(WireSge {
                        region: c.region,
                        len: s.len,
                        off: c.region_off,
                    });
                    parts.push((c.ptr as *const u8, s.len as usize));
                }
                _ => {
                    self.fail(None);
                    self.core.fail_now(wr.wr_id, opcode, WcStatus::LocProtErr);
                    return Ok(());
                }
            }
        }
        let n = sges.as_slice().len();
        let flags = if inline { F_INLINE } else { 0 };
        let d = Desc {
            ack: self.in_psn,
            op: wop,
            flags,
            nsge: n as u16,
            len,
            imm: wr.imm,
            inv: wr.invalidate_rkey,
            raddr: wr.remote_addr,
            rkey: wr.rkey,
        };
        let psn = self.core.push_sq(wr.wr_id, opcode, wr.signaled, len, true);
        let parts = if inline { parts.as_slice() } else { &[] };
        self.out.publish(psn, &d, sges.as_slice(), parts);
        Ok(())
    }

    /// Drives the QP: retires acknowledged sends, executes inbound requests.
    fn progress(&mut self, shared: &QpShared) {
        self.sync(shared);
        if self.core.state != QpState::Rts {
            return;
        }
        self.inbound();
        shared.state.set(self.core.state);
    }

    fn inbound(&mut self) {
        if self.in_dead {
            return;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let start = self.in_psn;
        for _ in 0..INBOUND_BATCH {
            let Some(d) = link.inbound.peek(self.in_psn) else {
                break;
            };
            // The acknowledgement the peer piggybacked on this request.
            if d.ack > self.acked_seen {
                self.acked_seen = d.ack.min(self.core.next_psn);
            }
            match execute(&mut self.core, &self.pd, link, self.in_psn, &d) {
                Ok(()) => self.in_psn += 1,
                Err(Stop::Rnr) => {
                    link.inbound.set_rnr(true);
                    let now = minstant::Instant::now();
                    let since = *self.rnr_since.get_or_insert(now);
                    let retry = link.inbound.rnr_retry;
                    if retry < 7 && now.duration_since(since) >= RNR_TIMER * u32::from(retry) {
                        link.inbound
                            .refuse(self.in_psn, WcStatus::RnrRetryExcErr.ibv_code());
                        self.in_dead = true;
                    }
                    break;
                }
                Err(Stop::Refuse { status, fatal }) => {
                    link.inbound.refuse(self.in_psn, status.ibv_code());
                    self.in_dead = true;
                    if fatal {
                        self.fail(None);
                    }
                    break;
                }
            }
        }
        if self.acked_seen > 0 {
            self.core.retire(self.acked_seen);
        }
        if self.in_psn != start {
            if let Some(link) = self.link.as_ref() {
                link.inbound.ack(self.in_psn);
                if self.rnr_since.take().is_some() {
                    link.inbound.set_rnr(false);
                }
            }
        }
    }
}

/// Executes one inbound descriptor as the responder.
fn execute(
    core: &mut QpCore,
    pd: &PdInner,
    link: &mut Link,
    psn: u64,
    d: &Desc,
) -> Result<(), Stop> {
    let refuse = |status| {
        Err(Stop::Refuse {
            status,
            fatal: true,
        })
    };
    let nsge = usize::from(d.nsge);
    let inline = d.flags & F_INLINE != 0;
    if nsge > link.inbound.max_sge as usize || (inline && d.len > link.inbound.inline_cap) {
        return refuse(WcStatus::RemInvReqErr);
    }
    let needs_recv = matches!(d.op, op::SEND | op::SEND_IMM | op::SEND_INV | op::WRITE_IMM);
    if needs_recv && core.rq.is_empty() {
        return Err(Stop::Rnr);
    }
    // The sender's side of the transfer, in its memory (or inline in the slot).
    // (Only the entries pushed are written: no zeroed arrays per request.)
    let mut peer: Segs<*mut u8> = StackList::new();
    let len = u64::from(d.len);
    if inline {
        let (p, l) = link.inbound.inline(psn, d.len);
        peer.push((p as *mut u8, l));
    } else {
        let mut total = 0u64;
        let Link { inbound, peer: mem } = &mut *link;
        for g in inbound.sges(psn, nsge) {
            let Some(p) = mem.resolve(g.region, g.off, u64::from(g.len)) else {
                return refuse(WcStatus::RemOpErr);
            };
            peer.push((p, g.len as usize));
            total += u64::from(g.len);
        }
        if total != len {
            return refuse(WcStatus::RemInvReqErr);
        }
    }
    let peer = peer.as_slice();
    let as_src = |segs: &[(*mut u8, usize)]| -> Segs<*const u8> {
        let mut out: Segs<*const u8> = StackList::new();
        for s in segs {
            out.push((s.0 as *const u8, s.1));
        }
        out
    };
    let qp_num = core.qp_num;
    match d.op {
        op::WRITE | op::WRITE_IMM => {
            if len > 0 {
                let Ok(dst) = pd
                    .mrs
                    .check_rkey(d.rkey, d.raddr, len, Access::REMOTE_WRITE)
                else {
                    return refuse(WcStatus::RemAccessErr);
                };
                let src = as_src(peer);
                // SAFETY: dst was checked against a live registration of ours;
                // the sources lie in the peer's mapped memory (bounds checked).
                unsafe { sg_copy(src.as_slice(), &[(dst.ptr, len as usize)]) };
            }
            if d.op == op::WRITE_IMM {
                let r = core.rq.pop_front().expect("checked non-empty");
                let mut wc = Wc::new(
                    r.wr_id,
                    WcStatus::Success,
                    WcOpcode::RecvRdmaWithImm,
                    qp_num,
                );
                wc.byte_len = d.len;
                wc.imm = d.imm;
                wc.with_imm = true;
                core.recv_wcs.push_back(wc);
            }
            Ok(())
        }
        op::SEND | op::SEND_IMM | op::SEND_INV => {
            let r = core.rq.pop_front().expect("checked non-empty");
            let fail = |core: &mut QpCore, local: WcStatus, remote: WcStatus| {
                core.recv_wcs
                    .push_back(Wc::new(r.wr_id, local, WcOpcode::Recv, qp_num));
                Err(Stop::Refuse {
                    status: remote,
                    fatal: true,
                })
            };
            if r.capacity() < len {
                return fail(core, WcStatus::LocLenErr, WcStatus::RemInvReqErr);
            }
            let mut dst: Segs<*mut u8> = StackList::new();
            let mut left = len;
            for s in r.sges() {
                if left == 0 {
                    break;
                }
                let take = u64::from(s.len).min(left);
                match pd.mrs.check_lkey(s.lkey, s.addr, take, Access::LOCAL_WRITE) {
                    Ok(c) => dst.push((c.ptr, take as usize)),
                    Err(_) => return fail(core, WcStatus::LocProtErr, WcStatus::RemOpErr),
                };
                left -= take;
            }
            if d.op == op::SEND_INV && !pd.mrs.invalidate(d.inv) {
                return fail(core, WcStatus::RemInvReqErr, WcStatus::RemInvReqErr);
            }
            let src = as_src(peer);
            // SAFETY: destinations were checked against live registrations with
            // LOCAL_WRITE; sources lie in the peer's mapped memory or the slot.
            unsafe { sg_copy(src.as_slice(), dst.as_slice()) };
            let mut wc = Wc::new(r.wr_id, WcStatus::Success, WcOpcode::Recv, qp_num);
            wc.byte_len = d.len;
            if d.op == op::SEND_IMM {
                wc.imm = d.imm;
                wc.with_imm = true;
            }
            if d.op == op::SEND_INV {
                wc.invalidated_rkey = d.inv;
                wc.with_inv = true;
            }
            core.recv_wcs.push_back(wc);
            Ok(())
        }
        op::READ => {
            if inline {
                return refuse(WcStatus::RemInvReqErr);
            }
            if len > 0 {
                let Ok(src) = pd.mrs.check_rkey(d.rkey, d.raddr, len, Access::REMOTE_READ) else {
                    return refuse(WcStatus::RemAccessErr);
                };
                // SAFETY: the source was checked against a live registration of
                // ours; the destinations lie in the peer's mapped memory.
                unsafe { sg_copy(&[(src.ptr as *const u8, len as usize)], peer) };
            }
            Ok(())
        }
        _ => refuse(WcStatus::RemInvReqErr),
    }
}
