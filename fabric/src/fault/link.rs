//! The test's handle ([`Faults`]) and each link's fault state: what is armed,
//! read by the data path with relaxed loads; what fired, counted.

use super::clock::{nanos, Clock};
use super::qp::QpShared;
use crate::{Address, CmEvent, WcStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// A direction of travel on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Client to server: what the active side's QPs post.
    C2s,
    /// Server to client: what the passive side's QPs post.
    S2c,
}

impl Dir {
    fn index(self) -> usize {
        self as usize
    }
    /// The other direction.
    pub fn reverse(self) -> Dir {
        match self {
            Dir::C2s => Dir::S2c,
            Dir::S2c => Dir::C2s,
        }
    }
}

/// An end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The active side (`Cm::connect`).
    Clt,
    /// The passive side (the listener, `Cm::accept`).
    Srv,
}

impl Side {
    /// The direction this side's sends travel.
    pub fn sends(self) -> Dir {
        match self {
            Side::Clt => Dir::C2s,
            Side::Srv => Dir::S2c,
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// How many times a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// The next `n` times, then it is spent.
    Next(u32),
    /// Every time until cleared.
    UntilCleared,
}

impl Count {
    /// Fires once, counting down; false when spent.
    fn take(slot: &mut Option<Count>) -> bool {
        match *slot {
            Some(Count::UntilCleared) => true,
            Some(Count::Next(n)) if n > 0 => {
                *slot = (n > 1).then_some(Count::Next(n - 1));
                true
            }
            _ => {
                *slot = None;
                false
            }
        }
    }
}

/// The kind of a [`CmEvent`], to aim CM faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmEventKind {
    /// [`CmEvent::ConnectRequest`] (passive side).
    ConnectRequest,
    /// [`CmEvent::Established`] (both sides).
    Established,
    /// [`CmEvent::Rejected`] (active side).
    Rejected,
    /// [`CmEvent::Unreachable`] (active side).
    Unreachable,
    /// [`CmEvent::Disconnected`] (both sides).
    Disconnected,
    /// [`CmEvent::Refused`] (passive side).
    Refused,
}

impl CmEventKind {
    /// The kind of `ev`.
    pub fn of(ev: &CmEvent) -> CmEventKind {
        match ev {
            CmEvent::ConnectRequest { .. } => CmEventKind::ConnectRequest,
            CmEvent::Established { .. } => CmEventKind::Established,
            CmEvent::Rejected { .. } => CmEventKind::Rejected,
            CmEvent::Unreachable { .. } => CmEventKind::Unreachable,
            CmEvent::Disconnected { .. } => CmEventKind::Disconnected,
            CmEvent::Refused { .. } => CmEventKind::Refused,
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

const KINDS: usize = 6;

/// What the faults of a link (or of every link) did, as counted when they
/// fired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Send work requests a black hole swallowed.
    pub swallowed_wrs: u64,
    /// Completions held back by a delay (those the application sees).
    pub delayed_wcs: u64,
    /// Completions failed with an armed status.
    pub failed_wcs: u64,
    /// Completions flushed (`WrFlushErr`) because a fault killed or failed their QP.
    pub flushed_wcs: u64,
    /// QPs killed.
    pub killed_qps: u64,
    /// CM events lost.
    pub dropped_cm_events: u64,
    /// CM events held back by a delay.
    pub delayed_cm_events: u64,
    /// Connects refused (answered with `Unreachable`).
    pub refused_connects: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.swallowed_wrs += o.swallowed_wrs;
        self.delayed_wcs += o.delayed_wcs;
        self.failed_wcs += o.failed_wcs;
        self.flushed_wcs += o.flushed_wcs;
        self.killed_qps += o.killed_qps;
        self.dropped_cm_events += o.dropped_cm_events;
        self.delayed_cm_events += o.delayed_cm_events;
        self.refused_connects += o.refused_connects;
    }
}

/// Which counter a fault bumps.
#[derive(Clone, Copy, Debug)]
pub(super) enum Ctr {
    Swallowed,
    DelayedWc,
    FailedWc,
    FlushedWc,
    Killed,
    DroppedCm,
    DelayedCm,
    Refused,
}

// Bits of `LinkState::armed`, per direction: what the data path checks.
pub(super) const BLACK_HOLE: [u32; 2] = [1, 1 << 1];
pub(super) const DELAY: [u32; 2] = [1 << 2, 1 << 3];
pub(super) const FAIL: [u32; 2] = [1 << 4, 1 << 5];

/// Armed bit of `bits` for `dir`.
pub(super) fn bit(bits: [u32; 2], dir: Dir) -> u32 {
    bits[dir.index()]
}

/// CM faults of a link, per side and event kind (slow path: under a lock).
#[derive(Debug, Default)]
struct CmFaults {
    lose: [[Option<Count>; KINDS]; 2],
    delay: [[Duration; KINDS]; 2],
    refuse: Option<Count>,
}

/// What happens to one CM event.
pub(super) enum CmVerdict {
    Pass,
    Lose,
    Delay(Duration),
}

/// The fault state of one link, shared by both ends' wrappers and the test.
#[derive(Debug)]
pub(super) struct LinkState {
    addr: Address,
    /// Armed data-path faults (`BLACK_HOLE`, `DELAY`, `FAIL` bits): zero is
    /// the fast path.
    armed: AtomicU32,
    delay_ns: [AtomicU64; 2],
    fail_status: [AtomicU32; 2],
    /// Failures left per direction; -1: until cleared.
    fail_left: [AtomicI64; 2],
    cm: Mutex<CmFaults>,
    /// The QPs connected over the link (set at connect and accept).
    qps: Mutex<Vec<(Side, Weak<QpShared>)>>,
    counters: [AtomicU64; 8],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LinkState {
    fn new(addr: Address) -> LinkState {
        LinkState {
            addr,
            armed: AtomicU32::new(0),
            delay_ns: Default::default(),
            fail_status: Default::default(),
            fail_left: Default::default(),
            cm: Mutex::new(CmFaults::default()),
            qps: Mutex::new(Vec::new()),
            counters: Default::default(),
        }
    }

    /// The armed data-path faults (one relaxed load).
    #[inline]
    pub(super) fn armed(&self) -> u32 {
        self.armed.load(Ordering::Relaxed)
    }

    fn arm(&self, bit: u32, on: bool) {
        if on {
            self.armed.fetch_or(bit, Ordering::Release);
        } else {
            self.armed.fetch_and(!bit, Ordering::Release);
        }
    }

    pub(super) fn count(&self, c: Ctr, n: u64) {
        self.counters[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn counters(&self) -> Counters {
        let c = |k: Ctr| self.counters[k as usize].load(Ordering::Relaxed);
        Counters {
            swallowed_wrs: c(Ctr::Swallowed),
            delayed_wcs: c(Ctr::DelayedWc),
            failed_wcs: c(Ctr::FailedWc),
            flushed_wcs: c(Ctr::FlushedWc),
            killed_qps: c(Ctr::Killed),
            dropped_cm_events: c(Ctr::DroppedCm),
            delayed_cm_events: c(Ctr::DelayedCm),
            refused_connects: c(Ctr::Refused),
        }
    }

    /// The delay of `dir`, in nanoseconds.
    pub(super) fn delay_ns(&self, dir: Dir) -> u64 {
        self.delay_ns[dir.index()].load(Ordering::Relaxed)
    }

    /// The status the next completion in `dir` fails with, if a failure is
    /// armed and left.
    pub(super) fn take_fail(&self, dir: Dir) -> Option<WcStatus> {
        let i = dir.index();
        let status = WcStatus::from_ibv_code(self.fail_status[i].load(Ordering::Relaxed));
        let left = &self.fail_left[i];
        let mut n = left.load(Ordering::Relaxed);
        loop {
            match n {
                0 => return None,
                n if n < 0 => return Some(status),
                _ => match left.compare_exchange(n, n - 1, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => {
                        if n == 1 {
                            self.arm(bit(FAIL, dir), false);
                        }
                        return Some(status);
                    }
                    Err(now) => n = now,
                },
            }
        }
    }

    /// Registers a QP connected (`side`) over the link.
    pub(super) fn register(&self, side: Side, qp: &Arc<QpShared>) {
        let mut qps = lock(&self.qps);
        qps.retain(|(_, w)| w.strong_count() > 0);
        qps.push((side, Arc::downgrade(qp)));
    }

    fn qps(&self) -> Vec<(Side, Arc<QpShared>)> {
        lock(&self.qps)
            .iter()
            .filter_map(|(s, w)| Some((*s, w.upgrade()?)))
            .collect()
    }

    /// What happens to a CM event of `kind` on `side`.
    pub(super) fn cm_verdict(&self, side: Side, kind: CmEventKind) -> CmVerdict {
        let mut cm = lock(&self.cm);
        let (s, k) = (side.index(), kind.index());
        if Count::take(&mut cm.lose[s][k]) {
            return CmVerdict::Lose;
        }
        match cm.delay[s][k] {
            d if d.is_zero() => CmVerdict::Pass,
            d => CmVerdict::Delay(d),
        }
    }

    /// Whether the next connect is refused.
    pub(super) fn take_refuse(&self) -> bool {
        Count::take(&mut lock(&self.cm).refuse)
    }
}

/// The faults of one link, armed and cleared at runtime by a test. A link is
/// the server address of a connection, as spelled in `Cm::connect` and
/// `Cm::listen` (a listener on `0.0.0.0` is another link than `127.0.0.1`).
#[derive(Clone, Debug)]
pub struct LinkFaults {
    state: Arc<LinkState>,
}

impl LinkFaults {
    /// The link's (server) address.
    pub fn addr(&self) -> &Address {
        &self.state.addr
    }

    /// Cuts `dir`: send work requests posted in that direction are swallowed
    /// (never reach the peer, never complete); an RDMA READ is swallowed when
    /// either direction is cut (its data comes back the other way). LOCAL_INV
    /// and re-keys, which are local, still execute.
    pub fn black_hole(&self, dir: Dir) {
        self.state.arm(bit(BLACK_HOLE, dir), true);
    }

    /// Mends `dir`: later requests go through; swallowed ones stay lost.
    pub fn clear_black_hole(&self, dir: Dir) {
        self.state.arm(bit(BLACK_HOLE, dir), false);
    }

    /// Holds back the completions of work requests travelling in `dir` (the
    /// sender's send completions and the receiver's receive completions) by
    /// `by`, in order per QP. `Duration::ZERO` clears (held completions still
    /// wait out their delay).
    pub fn delay(&self, dir: Dir, by: Duration) {
        self.state.delay_ns[dir.index()].store(nanos(by), Ordering::Relaxed);
        self.state.arm(bit(DELAY, dir), !by.is_zero());
    }

    /// Fails the next `count` send completions in `dir` (at the sender) with
    /// `status`; each failure moves its QP to the error state, so everything
    /// else outstanding on it flushes. `WcStatus::Success` clears.
    pub fn fail(&self, dir: Dir, status: WcStatus, count: Count) {
        let i = dir.index();
        let left = match count {
            Count::Next(n) => i64::from(n),
            Count::UntilCleared => -1,
        };
        let on = !status.is_ok() && left != 0;
        self.state.fail_status[i].store(status.ibv_code(), Ordering::Relaxed);
        self.state.fail_left[i].store(if on { left } else { 0 }, Ordering::Relaxed);
        self.state.arm(bit(FAIL, dir), on);
    }

    /// Stops failing completions in `dir`.
    pub fn clear_fail(&self, dir: Dir) {
        self.fail(dir, WcStatus::Success, Count::Next(0));
    }

    /// Kills every QP connected over the link, on both sides (see
    /// [`FaultQp::kill`](super::FaultQp::kill)). Returns how many were alive.
    pub fn kill_all(&self) -> usize {
        self.state.qps().iter().filter(|(_, q)| q.kill()).count()
    }

    /// Kills the QP numbered `qp_num` that `side` connected over the link;
    /// false if there is none alive.
    pub fn kill_qp(&self, side: Side, qp_num: u32) -> bool {
        self.state
            .qps()
            .iter()
            .any(|(s, q)| *s == side && q.qp_num() == qp_num && q.kill())
    }

    /// The numbers of the QPs `side` connected over the link (live handles).
    pub fn qp_nums(&self, side: Side) -> Vec<u32> {
        let qps = self.state.qps();
        qps.iter()
            .filter(|(s, _)| *s == side)
            .map(|(_, q)| q.qp_num())
            .collect()
    }

    /// Loses the next `count` CM events of `kind` that `side`'s connection
    /// manager would report for the link.
    pub fn lose_cm_events(&self, side: Side, kind: CmEventKind, count: Count) {
        lock(&self.state.cm).lose[side.index()][kind.index()] = Some(count);
    }

    /// Holds back CM events of `kind` on `side` by `by` (`Duration::ZERO`
    /// clears). Later events of the link wait behind a held one.
    pub fn delay_cm_events(&self, side: Side, kind: CmEventKind, by: Duration) {
        lock(&self.state.cm).delay[side.index()][kind.index()] = by;
    }

    /// Refuses the next `count` connects to the link: the connect returns an
    /// id at once and its outcome is `Unreachable`.
    pub fn refuse_connects(&self, count: Count) {
        lock(&self.state.cm).refuse = Some(count);
    }

    /// Clears every fault armed on the link (killed QPs stay dead; held
    /// completions and events still wait out their delay).
    pub fn clear(&self) {
        for dir in [Dir::C2s, Dir::S2c] {
            self.clear_black_hole(dir);
            self.delay(dir, Duration::ZERO);
            self.clear_fail(dir);
        }
        *lock(&self.state.cm) = CmFaults::default();
    }

    /// What the link's faults did so far.
    pub fn counters(&self) -> Counters {
        self.state.counters()
    }
}

/// The handle a test holds: every link's faults and the clock. Clones share
/// them; give the same handle to the client's and the server's
/// [`FaultFabric`](super::FaultFabric) so both ends of a link see its faults.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    inner: Arc<FaultsInner>,
}

#[derive(Debug, Default)]
struct FaultsInner {
    clock: Clock,
    links: Mutex<HashMap<Address, Arc<LinkState>>>,
}

impl Faults {
    /// No fault armed, the real clock.
    pub fn new() -> Faults {
        Faults::default()
    }

    /// No fault armed, with `clock` (e.g. [`Clock::manual`]).
    pub fn with_clock(clock: Clock) -> Faults {
        Faults {
            inner: Arc::new(FaultsInner {
                clock,
                links: Mutex::default(),
            }),
        }
    }

    /// The clock delays are measured on.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The faults of the link to `addr` (made on first use).
    pub fn link(&self, addr: &Address) -> LinkFaults {
        LinkFaults {
            state: self.link_state(addr),
        }
    }

    /// What every link's faults did so far.
    pub fn counters(&self) -> Counters {
        let links = lock(&self.inner.links);
        let mut sum = Counters::default();
        for l in links.values() {
            sum += l.counters();
        }
        sum
    }

    pub(super) fn link_state(&self, addr: &Address) -> Arc<LinkState> {
        lock(&self.inner.links)
            .entry(addr.clone())
            .or_insert_with(|| Arc::new(LinkState::new(addr.clone())))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_run_out_and_until_cleared_does_not() {
        let mut c = Some(Count::Next(2));
        assert!(Count::take(&mut c));
        assert!(Count::take(&mut c));
        assert!(!Count::take(&mut c));
        let mut c = Some(Count::UntilCleared);
        assert!((0..10).all(|_| Count::take(&mut c)));
        assert!(!Count::take(&mut None));
    }

    #[test]
    fn fail_arms_counts_down_and_disarms() {
        let f = Faults::new();
        let l = f.link(&Address::Shm("x".into()));
        l.fail(Dir::C2s, WcStatus::RetryExcErr, Count::Next(2));
        let s = &l.state;
        assert_ne!(s.armed() & bit(FAIL, Dir::C2s), 0);
        assert_eq!(s.take_fail(Dir::S2c), None);
        assert_eq!(s.take_fail(Dir::C2s), Some(WcStatus::RetryExcErr));
        assert_eq!(s.take_fail(Dir::C2s), Some(WcStatus::RetryExcErr));
        assert_eq!(s.armed(), 0, "spent");
        assert_eq!(s.take_fail(Dir::C2s), None);
        l.fail(Dir::S2c, WcStatus::RemAccessErr, Count::UntilCleared);
        assert_eq!(s.take_fail(Dir::S2c), Some(WcStatus::RemAccessErr));
        l.clear();
        assert_eq!(s.armed(), 0);
        assert_eq!(s.take_fail(Dir::S2c), None);
    }

    #[test]
    fn links_are_shared_by_address() {
        let f = Faults::new();
        let a = Address::Shm("a".into());
        f.link(&a).black_hole(Dir::S2c);
        assert_eq!(f.clone().link(&a).state.armed(), bit(BLACK_HOLE, Dir::S2c));
        assert_eq!(f.link(&Address::Shm("b".into())).state.armed(), 0);
        assert_eq!(f.counters(), Counters::default());
    }
}
