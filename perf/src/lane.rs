//! One session core's IO, and the IO threads that run lanes in turn.
//!
//! ```text
//!  IO thread k (pinned to --cores[k]):  loop { clock (lazily); for lane in lanes: lane.step }
//!     lane = core k of one session: keeps iodepth IOs in flight on its CltCore,
//!            checks every read back (--verify), counts each completion once
//!  sessions s0..sN-1 each have one CltCore per IO thread, so N sessions on
//!  2 threads are 2 busy threads, not 2N; each session's IO stays in its own
//!  slice of the device (lanes of one session share it), so sessions never
//!  write over each other's blocks
//! ```
//!
//! No lock, allocation or syscall per IO: a lane's buffers are sized once
//! (queue depth), the clock is read as a pollers core reads it.

use crate::engine_bench::{alloc_count, ClientOpts, DirResult, Rw, DEFAULT_SIZE};
use minstant::Instant;
use rtrs_fabric::Fabric;
use rtrs_poll::clt::{CltCore, CltError, Dir, IoPermit};
use rtrs_poll::rnbd::RnbdDev;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How long a lane waits before trying again when no path takes IO.
const NO_PATH_WAIT: Duration = Duration::from_millis(1);

/// Offsets and directions, a xorshift per lane.
pub(crate) struct Gen {
    x: u64,
    rw: Rw,
    bs: u64,
    /// Blocks of the lane's slice.
    blocks: u64,
    /// The slice's first byte.
    base: u64,
    seq: u64,
    /// randrw: percent of reads.
    mix: u64,
}

impl Gen {
    fn next(&mut self) -> (Dir, u64) {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        let rand_block = self.x % self.blocks;
        let seq_block = {
            self.seq = (self.seq + 1) % self.blocks;
            self.seq
        };
        let at = |b: u64| self.base + b * self.bs;
        match self.rw {
            Rw::Read => (Dir::Read, at(seq_block)),
            Rw::Write => (Dir::Write, at(seq_block)),
            Rw::Randread => (Dir::Read, at(rand_block)),
            Rw::Randwrite => (Dir::Write, at(rand_block)),
            Rw::Randrw if (self.x >> 32) % 100 < self.mix => (Dir::Read, at(rand_block)),
            Rw::Randrw => (Dir::Write, at(rand_block)),
        }
    }
}

/// Slice `index` of `count` equal slices of `size` bytes in blocks of
/// `bs`: (first byte, blocks); at least one block.
pub(crate) fn slice(size: u64, bs: u64, index: u64, count: u64) -> (u64, u64) {
    let blocks = (size / bs / count.max(1)).max(1);
    (index * blocks * bs, blocks)
}

fn usr_hdr(off: u64) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[0] = 1;
    u[8..].copy_from_slice(&off.to_le_bytes());
    u
}

/// The verify pattern of the block at `off`, generation `seq`: a header
/// (magic, offset, generation, checksum of the rest) then pseudo-random
/// bytes, as fio's verify headers do.
pub(crate) fn fill_block(buf: &mut [u8], off: u64, seq: u64) {
    let mut x =
        off.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xd6e8_feb8_6659_fd93) | 1;
    for b in buf.iter_mut().skip(32) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let sum = checksum(&buf[32.min(buf.len())..]);
    let head = [VERIFY_MAGIC, off, seq, sum];
    for (i, w) in head.iter().enumerate() {
        if buf.len() >= (i + 1) * 8 {
            buf[i * 8..(i + 1) * 8].copy_from_slice(&w.to_le_bytes());
        }
    }
}

const VERIFY_MAGIC: u64 = 0x5946_5952_5653_5452; // "RTSVRYFY"

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Checks a block read back: never written (all zero) or a valid header for
/// this offset with a matching checksum.
pub(crate) fn check_block(buf: &[u8], off: u64) -> bool {
    if buf.len() < 32 {
        return true;
    }
    let w = |i: usize| u64::from_le_bytes(buf[i * 8..(i + 1) * 8].try_into().unwrap_or([0; 8]));
    if w(0) == 0 && buf.iter().all(|&b| b == 0) {
        return true;
    }
    w(0) == VERIFY_MAGIC && w(1) == off && w(3) == checksum(&buf[32..])
}

/// What a lane counted.
#[derive(Clone, Debug)]
pub(crate) struct LaneResult {
    /// Its session (index in the run).
    pub session: usize,
    /// Its IO thread (index in --cores).
    pub thread: usize,
    pub read: DirResult,
    pub write: DirResult,
    /// IOs completed while measuring.
    pub ios: u64,
    pub bytes: u64,
    /// IOs submitted and completed in all (measuring or not): equal at the
    /// end, or an IO was lost.
    pub submitted: u64,
    pub completed: u64,
    /// Failed IOs, verify mismatches and second completions.
    pub errors: u64,
    pub by_errno: BTreeMap<i32, u64>,
    /// The errno of the first failed IO (0: a verify mismatch or a duplicate).
    pub first_errno: Option<i32>,
    pub verify_failures: u64,
    pub duplicates: u64,
    pub stalled_ns: u64,
    /// Why the lane stopped submitting before the end.
    pub err: Option<String>,
}

/// One CltCore's IO loop, stepped by the thread that runs it.
pub(crate) struct Lane<F: Fabric> {
    core: CltCore<F>,
    dev: Arc<OnceLock<Arc<RnbdDev>>>,
    /// (slice index, slices): where the session's offsets lie.
    slice: (u64, u64),
    gen: Gen,
    sized: bool,
    bs: u32,
    inflight: u32,
    /// Which permits have an IO in flight: a completion of one that has
    /// not is an IO completing twice.
    in_flight: Vec<bool>,
    /// Sized once: completions of one poll wait here to be resubmitted.
    ready: Vec<(IoPermit, Dir, u64, i32)>,
    free: Vec<IoPermit>,
    seq: u64,
    no_path_since: Option<Instant>,
    r: LaneResult,
}

impl<F: Fabric> Lane<F> {
    /// A lane over `core` of session `session`, offsets in slice
    /// `slice.0` of `slice.1`, seeded by `seed`.
    pub fn new(
        core: CltCore<F>,
        o: &ClientOpts,
        dev: Arc<OnceLock<Arc<RnbdDev>>>,
        session: usize,
        thread: usize,
        slice: (u64, u64),
        seed: u64,
    ) -> Lane<F> {
        let qd = core.queue_depth() as usize;
        let bs = u64::from(o.bs);
        let (base, blocks) = self::slice(o.size.unwrap_or(DEFAULT_SIZE), bs, slice.0, slice.1);
        Lane {
            core,
            dev,
            slice,
            gen: Gen {
                x: seed | 1,
                rw: o.rw,
                bs,
                blocks,
                base,
                seq: seed % 1024 % blocks,
                mix: u64::from(o.rwmixread),
            },
            sized: false,
            bs: o.bs,
            inflight: 0,
            in_flight: vec![false; qd],
            ready: Vec::with_capacity(qd),
            free: Vec::with_capacity(qd),
            seq: seed << 32,
            no_path_since: None,
            r: LaneResult {
                session,
                thread,
                read: DirResult::new(),
                write: DirResult::new(),
                ios: 0,
                bytes: 0,
                submitted: 0,
                completed: 0,
                errors: 0,
                by_errno: BTreeMap::new(),
                first_errno: None,
                verify_failures: 0,
                duplicates: 0,
                stalled_ns: 0,
                err: None,
            },
        }
    }

    /// IOs in flight now.
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    /// IOs completed so far (measuring or not).
    pub fn completed(&self) -> u64 {
        self.r.completed
    }

    /// Whether the lane stopped submitting on an error.
    pub fn failed(&self) -> bool {
        self.r.err.is_some()
    }

    /// One turn at `now`: submits up to the queue depth (unless
    /// `stopping`), polls, checks what was read. `on`: completions count
    /// as measured (and are recorded in `cur`, the interval log's).
    pub fn step(
        &mut self,
        now: Instant,
        o: &ClientOpts,
        stopping: bool,
        on: bool,
        mut cur: Option<&mut crate::histlog::Interval>,
    ) {
        if let (false, Some(d)) = (self.sized, self.dev.get()) {
            // Offsets stay inside the device: a --size larger than it was
            // refused before the device was set.
            let size = o.size.unwrap_or(d.size());
            let (base, blocks) = slice(size, u64::from(self.bs), self.slice.0, self.slice.1);
            self.gen.base = base;
            self.gen.blocks = blocks;
            self.gen.seq %= blocks;
            self.sized = true;
        }
        // RNBD: no IO until the device is open (and while the session is
        // lost, until it is open again).
        let dev_ready = o.rnbd_device.is_none() || self.dev.get().is_some_and(|d| d.is_open());
        let waiting = self
            .no_path_since
            .is_some_and(|t| now.duration_since(t) < NO_PATH_WAIT);
        if !stopping && self.r.err.is_none() && dev_ready && !waiting {
            self.submit(now, o);
        }
        let r = &mut self.r;
        let (in_flight, inflight, ready) =
            (&mut self.in_flight, &mut self.inflight, &mut self.ready);
        self.core.poll(now, &mut |c| {
            let id = c.permit.id() as usize;
            r.completed += 1;
            if !std::mem::replace(&mut in_flight[id], false) {
                r.duplicates += 1;
                r.errors += 1;
                r.first_errno.get_or_insert(0);
                *r.by_errno.entry(0).or_default() += 1;
                ready.push((c.permit, c.dir, c.tag, c.errno));
                return;
            }
            *inflight -= 1;
            if c.errno != 0 {
                // Counted measuring or not: a failed IO is never hidden.
                r.errors += 1;
                r.first_errno.get_or_insert(c.errno.saturating_abs());
                *r.by_errno.entry(c.errno).or_default() += 1;
            }
            if on {
                let ns = pollers::clock::now()
                    .saturating_duration_since(c.start)
                    .as_nanos() as u64;
                let (d, i) = match (c.dir, cur.as_deref_mut()) {
                    (Dir::Read, i) => (&mut r.read, i.map(|i| &mut i.read)),
                    (Dir::Write, i) => (&mut r.write, i.map(|i| &mut i.write)),
                };
                d.hist.saturating_record(ns.max(1));
                d.ios += 1;
                d.bytes += u64::from(c.len);
                if let Some(i) = i {
                    i.saturating_record(ns.max(1));
                }
                r.ios += 1;
                r.bytes += u64::from(c.len);
            }
            ready.push((c.permit, c.dir, c.tag, c.errno));
        });
        let bs = self.bs as usize;
        for (mut p, dir, off, errno) in self.ready.drain(..) {
            if o.verify
                && dir == Dir::Read
                && errno == 0
                && !check_block(&self.core.buf(&mut p)[..bs], off)
            {
                let r = &mut self.r;
                r.errors += 1;
                r.first_errno.get_or_insert(0);
                *r.by_errno.entry(0).or_default() += 1;
                if r.verify_failures < 3 {
                    eprintln!(
                        "verify: block at offset {off} does not match what was written there"
                    );
                }
                r.verify_failures += 1;
            }
            self.free.push(p);
        }
        if stopping {
            for p in self.free.drain(..) {
                self.core.put_permit(p);
            }
        }
    }

    fn submit(&mut self, now: Instant, o: &ClientOpts) {
        let bs = self.bs;
        while self.inflight < o.iodepth {
            let mut p = match self.free.pop() {
                Some(p) => p,
                None => match self.core.get_permit() {
                    Some(p) => p,
                    None => break,
                },
            };
            let (dir, off) = self.gen.next();
            let mut u = [0u8; 32];
            let ulen = match self.dev.get() {
                Some(d) => {
                    let op = match dir {
                        Dir::Write => rtrs_proto::rnbd::RnbdOp::Write,
                        Dir::Read => rtrs_proto::rnbd::RnbdOp::Read,
                    };
                    u = rtrs_poll::rnbd::clt::io_hdr(d, op, off, bs, 0);
                    32
                }
                None => {
                    u[..16].copy_from_slice(&usr_hdr(off));
                    16
                }
            };
            if o.verify && dir == Dir::Write {
                self.seq += 1;
                fill_block(&mut self.core.buf(&mut p)[..bs as usize], off, self.seq);
            }
            let id = p.id() as usize;
            let r = match dir {
                Dir::Write => self.core.write(p, &u[..ulen], bs, off, now),
                Dir::Read => self.core.read(p, &u[..ulen], bs, off, now),
            };
            match r {
                Ok(()) => {
                    self.inflight += 1;
                    self.r.submitted += 1;
                    self.in_flight[id] = true;
                    if let Some(t) = self.no_path_since.take() {
                        self.r.stalled_ns += now.duration_since(t).as_nanos() as u64;
                    }
                }
                Err((p, CltError::NoPath)) => {
                    // No path takes IO now (the session is lost): wait for
                    // one; an IO never submitted is not an error.
                    self.free.push(p);
                    self.no_path_since.get_or_insert(now);
                    break;
                }
                Err((p, e)) => {
                    self.core.put_permit(p);
                    self.r.err = Some(e.to_string());
                    break;
                }
            }
        }
    }

    /// The lane is done: its permits back, its figures and its core (which
    /// must outlive nothing of the session: the caller closes the session
    /// first, then drops the core).
    pub fn finish(mut self) -> (CltCore<F>, LaneResult) {
        for p in self.free.drain(..) {
            self.core.put_permit(p);
        }
        if let Some(t) = self.no_path_since {
            self.r.stalled_ns += Instant::now().duration_since(t).as_nanos() as u64;
        }
        (self.core, self.r)
    }
}

/// What an IO thread hands back.
pub(crate) struct ThreadResult<F: Fabric> {
    pub lanes: Vec<(CltCore<F>, LaneResult)>,
    /// Heap allocations on the thread while measuring.
    pub allocs: u64,
}

/// Runs `lanes` in turn until `stop` and every lane's IO has completed.
pub(crate) fn run_thread<F: Fabric>(
    mut lanes: Vec<Lane<F>>,
    o: &ClientOpts,
    stop: &AtomicBool,
    measuring: &AtomicBool,
    progress: &crate::progress::CoreCounts,
    mut log: Option<crate::histlog::CoreLog>,
) -> ThreadResult<F> {
    let mut allocs_at = None;
    let mut allocs = 0u64;
    // The lazy clock (as a pollers core's): read when a lane may submit
    // (the IO's latency starts there) and every IDLE_CLOCK_EVERY
    // iterations (the interval log, the no-path wait), so an iteration
    // that only waits for completions reads no clock; a completion reads
    // it once.
    let mut now = pollers::clock::now();
    let mut iteration = 0u64;
    let mut seconds = crate::progress::Publisher::new(progress);
    loop {
        iteration += 1;
        let may_submit = lanes.iter().any(|l| l.inflight < o.iodepth);
        if may_submit || iteration % pollers::core::IDLE_CLOCK_EVERY == 0 {
            now = pollers::clock::now();
        }
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && lanes.iter().all(|l| l.inflight == 0) {
            break;
        }
        if lanes.iter().all(|l| l.failed() && l.inflight == 0) {
            break;
        }
        let on = measuring.load(Ordering::Relaxed);
        if on && allocs_at.is_none() {
            allocs_at = Some(alloc_count::this_thread());
        }
        if !on {
            if let Some(a) = allocs_at.take() {
                allocs = alloc_count::this_thread() - a;
                if let Some(l) = log.as_mut() {
                    l.finish(now);
                }
            }
        } else {
            // The progress line's seconds and the interval log's: the same
            // boundaries (the same `now`), the same IOs.
            let ios: u64 = lanes.iter().map(|l| l.r.ios).sum();
            seconds.tick(now, ios);
            if let Some(l) = log.as_mut() {
                l.tick(now);
            }
        }
        let mut cur = log.as_mut().and_then(|l| l.cur());
        for lane in &mut lanes {
            let before = lane.completed();
            lane.step(now, o, stopping, on, cur.as_deref_mut());
            if lane.completed() != before {
                seconds.warm();
            }
        }
    }
    seconds.finish();
    if let Some(a) = allocs_at {
        allocs = alloc_count::this_thread() - a;
    }
    if let Some(l) = log.as_mut() {
        l.finish(Instant::now());
    }
    ThreadResult {
        lanes: lanes.into_iter().map(Lane::finish).collect(),
        allocs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_catches_corruption_and_misdirected_blocks() {
        let mut b = vec![0u8; 4096];
        assert!(check_block(&b, 8192), "a block never written passes");
        fill_block(&mut b, 8192, 7);
        assert!(check_block(&b, 8192));
        assert!(!check_block(&b, 4096), "the block of another offset");
        let mut flipped = b.clone();
        flipped[1000] ^= 1;
        assert!(!check_block(&flipped, 8192), "a flipped bit");
        let mut torn = b.clone();
        torn[2048..].fill(0);
        assert!(!check_block(&torn, 8192), "a torn block");
    }

    #[test]
    fn slices_split_the_device_and_never_overlap() {
        // 1 GiB in 4 KiB blocks over 3 sessions.
        let size = 1 << 30;
        let s: Vec<(u64, u64)> = (0..3).map(|i| slice(size, 4096, i, 3)).collect();
        for w in s.windows(2) {
            assert_eq!(w[0].0 + w[0].1 * 4096, w[1].0, "adjacent, no overlap");
        }
        assert!(s[2].0 + s[2].1 * 4096 <= size);
        // More slices than blocks: one block each, still inside... the
        // caller refuses a --size that small for its sessions.
        assert_eq!(slice(8192, 4096, 1, 4), (4096, 1));
        let mut g = Gen {
            x: 99,
            rw: Rw::Randrw,
            bs: 4096,
            blocks: s[1].1,
            base: s[1].0,
            seq: 0,
            mix: 50,
        };
        for _ in 0..10_000 {
            let (_, off) = g.next();
            assert!(off >= s[1].0 && off < s[2].0, "{off} outside slice 1");
        }
    }
}
