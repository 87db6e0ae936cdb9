//! A latency histogram a core fills with no lock, no allocation and no
//! syscall: fixed log-linear buckets of atomics (16 exact nanosecond
//! buckets, then 8 per power of two, so a bucket is at most 12.5% wide),
//! each written by one connection only (a relaxed load and store). Readers
//! (the control plane, the metrics endpoint) sum snapshots of them.
//!
//! ```text
//!  ns:     0..16 | 16..32 in 8 | 32..64 in 8 | ... | 2^42.. (clamped)
//!  bucket: 0..16 | 16..24      | 24..32      | ... | LAT_BUCKETS-1
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
const EXACT: usize = 2 * SUB;
/// The largest power of two kept apart (~73 minutes in ns); larger values
/// land in the last bucket.
const MAX_EXP: u32 = 42;
/// Buckets per histogram.
pub const LAT_BUCKETS: usize = EXACT + (MAX_EXP as usize - SUB_BITS as usize) * SUB;

/// The bucket of `ns`.
pub fn bucket_of(ns: u64) -> usize {
    if ns < EXACT as u64 {
        return ns as usize;
    }
    let ns = ns.min((1u64 << (MAX_EXP + 1)) - 1);
    let e = 63 - ns.leading_zeros();
    let sub = ((ns >> (e - SUB_BITS)) as usize) & (SUB - 1);
    EXACT + (e - SUB_BITS - 1) as usize * SUB + sub
}

/// The values bucket `i` holds: `[low, high]`.
pub fn bucket_range(i: usize) -> (u64, u64) {
    if i < EXACT {
        return (i as u64, i as u64);
    }
    let e = ((i - EXACT) / SUB) as u32 + SUB_BITS + 1;
    let sub = ((i - EXACT) % SUB) as u64;
    let width = 1u64 << (e - SUB_BITS);
    let low = (SUB as u64 + sub) * width;
    (low, low + width - 1)
}

/// One writer's histogram.
#[derive(Debug)]
pub struct LatHist {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Default for LatHist {
    fn default() -> LatHist {
        LatHist {
            buckets: (0..LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }
}

fn bump(c: &AtomicU64, by: u64) {
    // One writer: a plain load and store, no locked instruction.
    c.store(
        c.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

impl LatHist {
    /// Counts one latency (called by the histogram's one writer).
    #[inline]
    pub fn record(&self, ns: u64) {
        bump(&self.buckets[bucket_of(ns)], 1);
        bump(&self.sum_ns, ns);
    }

    /// Adds the counts so far into `into`.
    pub fn add_to(&self, into: &mut LatSnapshot) {
        for (a, b) in into.counts.iter_mut().zip(self.buckets.iter()) {
            *a += b.load(Ordering::Relaxed);
        }
        into.sum_ns += self.sum_ns.load(Ordering::Relaxed);
    }
}

/// Summed counts of histograms, read off the hot path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatSnapshot {
    counts: Vec<u64>,
    sum_ns: u64,
}

impl Default for LatSnapshot {
    fn default() -> LatSnapshot {
        LatSnapshot {
            counts: vec![0; LAT_BUCKETS],
            sum_ns: 0,
        }
    }
}

impl LatSnapshot {
    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their sum (ns).
    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    /// Adds another snapshot's counts.
    pub fn merge(&mut self, o: &LatSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
    }

    /// The `q` quantile (0..=1) in ns: the middle of its bucket (within
    /// 6.25% of the truth); 0 when nothing was counted.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, hi) = bucket_range(i);
                return lo + (hi - lo) / 2;
            }
        }
        bucket_range(LAT_BUCKETS - 1).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for i in 0..LAT_BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert!(lo <= hi);
            if i > 0 {
                assert_eq!(lo, last + 1, "bucket {i} starts where {} ended", i - 1);
            }
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            // At most 12.5% wide.
            assert!((hi - lo) as f64 <= lo as f64 / 8.0 + 1.0, "bucket {i}");
            last = hi;
        }
        assert_eq!(bucket_of(u64::MAX), LAT_BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = LatHist::default();
        for ns in 1..=10_000u64 {
            h.record(ns * 100);
        }
        let mut s = LatSnapshot::default();
        h.add_to(&mut s);
        assert_eq!(s.count(), 10_000);
        for (q, want) in [(0.5, 500_000.0), (0.9, 900_000.0), (0.99, 990_000.0)] {
            let got = s.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.07, "q{q}: {got} vs {want}");
        }
        assert_eq!(LatSnapshot::default().quantile(0.5), 0);
        let mut two = s.clone();
        two.merge(&s);
        assert_eq!(two.count(), 20_000);
        assert_eq!(two.quantile(0.5), s.quantile(0.5));
    }
}
