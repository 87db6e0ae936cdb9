//! The fabric objects this process holds now, counted process-wide: a
//! backend counts an object when it makes it and again when it frees it,
//! so a census ([`counts`]) read before and after a churn of connections
//! says whether anything was left behind.
//!
//! ```text
//!  backend: alloc_pd / reg_mr / create_cq / create_qp / alloc_mw / region ──> made(kind)   +1
//!           drop of the object (or the raw verbs free)                    ──> freed(kind) -1
//!  census:  counts() ──> LiveCounts { pds, mrs, cqs, qps, mws, regions }  (rtrs ctl stats, rtrs-perf --json)
//! ```
//!
//! Objects are made and freed at connect and teardown time, on control
//! paths: a relaxed atomic add each, never on a core's per-IO path (the one
//! exception, rdma's type-2 window renewed when a peer did not invalidate
//! it, already costs two syscalls there). A backend whose object owns its
//! verbs handle holds a [`Live`] token (counted on creation, uncounted on
//! drop); one that frees raw handles in several places calls [`made`] and
//! [`freed`] beside the verbs calls. What is counted is what the backend
//! holds: rdma counts its verbs objects (an MR's local registration and
//! each remote registration are MRs; the binder QPs and CQs of the keys
//! are QPs and CQs), the software backends their own objects.
//!
//! The counts are signed: a backend that frees an object twice shows a
//! negative count rather than a wrapped one.

use std::sync::atomic::{AtomicI64, Ordering};

/// A kind of fabric object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Protection domains.
    Pd,
    /// Memory registrations.
    Mr,
    /// Completion queues.
    Cq,
    /// Queue pairs.
    Qp,
    /// Memory windows (rdma).
    Mw,
    /// Shareable memories a PD lists for its peers (shm's region table).
    Region,
}

impl Kind {
    /// Every kind, in the order [`LiveCounts`] lists them.
    pub const ALL: [Kind; 6] = [
        Kind::Pd,
        Kind::Mr,
        Kind::Cq,
        Kind::Qp,
        Kind::Mw,
        Kind::Region,
    ];

    /// The name a census shows.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pd => "pds",
            Kind::Mr => "mrs",
            Kind::Cq => "cqs",
            Kind::Qp => "qps",
            Kind::Mw => "mws",
            Kind::Region => "regions",
        }
    }

    fn slot(self) -> &'static AtomicI64 {
        &COUNTS[self as usize]
    }
}

static COUNTS: [AtomicI64; 6] = [const { AtomicI64::new(0) }; 6];

/// Counts one more object of `kind` (made).
#[inline]
pub fn made(kind: Kind) {
    kind.slot().fetch_add(1, Ordering::Relaxed);
}

/// Counts one object of `kind` less (freed).
#[inline]
pub fn freed(kind: Kind) {
    kind.slot().fetch_sub(1, Ordering::Relaxed);
}

/// One live object of a kind: counted while the token lives. Not `Clone`
/// (a clone would count an object that does not exist); a backend's object
/// that is shared (`Arc`) keeps its token in the shared part.
#[derive(Debug)]
pub struct Live(Kind);

impl Live {
    /// Counts a new object of `kind` until the token drops.
    pub fn new(kind: Kind) -> Live {
        made(kind);
        Live(kind)
    }

    /// What it counts.
    pub fn kind(&self) -> Kind {
        self.0
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        freed(self.0);
    }
}

/// The live objects of every kind at one moment (each count read on its
/// own: objects made or freed meanwhile on other threads may or may not
/// show).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// Protection domains.
    pub pds: i64,
    /// Memory registrations.
    pub mrs: i64,
    /// Completion queues.
    pub cqs: i64,
    /// Queue pairs.
    pub qps: i64,
    /// Memory windows.
    pub mws: i64,
    /// Shareable memories listed in region tables (shm).
    pub regions: i64,
}

impl LiveCounts {
    /// The count of `kind`.
    pub fn get(&self, kind: Kind) -> i64 {
        match kind {
            Kind::Pd => self.pds,
            Kind::Mr => self.mrs,
            Kind::Cq => self.cqs,
            Kind::Qp => self.qps,
            Kind::Mw => self.mws,
            Kind::Region => self.regions,
        }
    }

    /// What changed since `earlier`, kind by kind (`self - earlier`).
    pub fn since(&self, earlier: &LiveCounts) -> LiveCounts {
        LiveCounts {
            pds: self.pds - earlier.pds,
            mrs: self.mrs - earlier.mrs,
            cqs: self.cqs - earlier.cqs,
            qps: self.qps - earlier.qps,
            mws: self.mws - earlier.mws,
            regions: self.regions - earlier.regions,
        }
    }

    /// The kinds whose count is not zero, with it (for a delta: what moved).
    pub fn nonzero(&self) -> Vec<(Kind, i64)> {
        Kind::ALL
            .iter()
            .map(|&k| (k, self.get(k)))
            .filter(|&(_, n)| n != 0)
            .collect()
    }
}

/// The live objects of this process now.
pub fn counts() -> LiveCounts {
    let c = |k: Kind| k.slot().load(Ordering::Relaxed);
    LiveCounts {
        pds: c(Kind::Pd),
        mrs: c(Kind::Mr),
        cqs: c(Kind::Cq),
        qps: c(Kind::Qp),
        mws: c(Kind::Mw),
        regions: c(Kind::Region),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The counts are process-wide and other tests of this binary make
    // fabric objects in parallel: these tests count a kind no backend of
    // the unit tests makes in the background, and compare deltas of
    // tokens held here only through `Live::kind` and `since`'s arithmetic.

    #[test]
    fn deltas_are_kind_by_kind() {
        let a = LiveCounts {
            pds: 1,
            mrs: 10,
            cqs: 3,
            qps: 3,
            mws: 0,
            regions: 2,
        };
        let b = LiveCounts {
            mrs: 12,
            regions: 1,
            ..a
        };
        let d = b.since(&a);
        assert_eq!(d.nonzero(), vec![(Kind::Mr, 2), (Kind::Region, -1)]);
        assert_eq!(a.since(&a), LiveCounts::default());
        assert_eq!(d.get(Kind::Mr), 2);
    }

    #[test]
    fn a_token_counts_while_it_lives() {
        // Memory windows: only the rdma backend makes them, and it is not
        // built into the unit tests' fabrics.
        let before = counts().mws;
        let t = Live::new(Kind::Mw);
        let u = Live::new(Kind::Mw);
        assert_eq!(t.kind(), Kind::Mw);
        assert_eq!(counts().mws - before, 2);
        drop(t);
        assert_eq!(counts().mws - before, 1);
        drop(u);
        made(Kind::Mw);
        freed(Kind::Mw);
        assert_eq!(counts().mws, before);
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names, ["pds", "mrs", "cqs", "qps", "mws", "regions"]);
    }
}
