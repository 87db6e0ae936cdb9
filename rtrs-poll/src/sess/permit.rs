//! Permits: the client's session-wide pool of `queue_depth` tickets. A permit's
//! index is the server chunk (buf_id) the request is written into, on
//! whichever path it goes (wire spec §5.1).
//!
//! As in the kernel, the pool is a bitmap taken with atomic test-and-set and
//! never blocks (a full pool is `None`; the caller queues or retries). Unlike
//! the kernel's strict lowest-free-first, each core starts its search at its
//! own home word and wraps around, so cores do not all fight over word 0; any
//! core can still take any permit.

use std::sync::atomic::{AtomicU64, Ordering};

/// The pool.
#[derive(Debug)]
pub struct Permits {
    words: Box<[AtomicU64]>,
    queue_depth: u32,
    homes: u32,
}

/// A permit: the chunk index the request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Permit(pub u32);

impl Permits {
    /// A pool of `queue_depth` permits shared by `cores` cores.
    pub fn new(queue_depth: u32, cores: u32) -> Permits {
        let n = queue_depth.div_ceil(64) as usize;
        let words: Vec<AtomicU64> = (0..n)
            .map(|w| {
                // Bits past queue_depth in the last word are permanently taken.
                let valid = (queue_depth as usize - w * 64).min(64);
                AtomicU64::new(if valid == 64 { 0 } else { !0u64 << valid })
            })
            .collect();
        Permits {
            words: words.into_boxed_slice(),
            queue_depth,
            homes: cores.max(1),
        }
    }

    /// The pool size.
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    /// Takes a free permit, searching from `core`'s home word.
    pub fn get(&self, core: u32) -> Option<Permit> {
        let n = self.words.len();
        if n == 0 {
            return None;
        }
        let home = (core % self.homes) as usize * n / self.homes as usize;
        for k in 0..n {
            let w = (home + k) % n;
            let word = &self.words[w];
            let mut cur = word.load(Ordering::Relaxed);
            while cur != !0 {
                let bit = (!cur).trailing_zeros();
                let prev = word.fetch_or(1 << bit, Ordering::Acquire);
                if prev & (1 << bit) == 0 {
                    return Some(Permit(w as u32 * 64 + bit));
                }
                cur = prev | (1 << bit);
            }
        }
        None
    }

    /// Returns a permit. Returning one that is not taken (or out of range)
    /// is refused, never corrupting the pool.
    pub fn put(&self, p: Permit) -> bool {
        if p.0 >= self.queue_depth {
            return false;
        }
        let mask = 1u64 << (p.0 % 64);
        let prev = self.words[(p.0 / 64) as usize].fetch_and(!mask, Ordering::Release);
        prev & mask != 0
    }

    /// Permits taken now.
    pub fn in_use(&self) -> u32 {
        let taken: u32 = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum();
        taken - (self.words.len() as u32 * 64 - self.queue_depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn every_permit_once_then_exhausted() {
        for qd in [1u32, 63, 64, 65, 512] {
            let p = Permits::new(qd, 2);
            let got: HashSet<u32> = (0..qd).map(|i| p.get(i % 2).unwrap().0).collect();
            assert_eq!(got.len() as u32, qd);
            assert!(got.iter().all(|&i| i < qd));
            assert_eq!(p.get(0), None);
            assert_eq!(p.in_use(), qd);
            assert!(p.put(Permit(0)));
            assert!(!p.put(Permit(0)), "double put is refused");
            assert!(!p.put(Permit(qd)), "out of range is refused");
            assert_eq!(p.get(1), Some(Permit(0)));
        }
    }

    #[test]
    fn cores_start_apart() {
        let p = Permits::new(512, 2);
        assert_eq!(p.get(0), Some(Permit(0)));
        assert_eq!(p.get(1), Some(Permit(256)));
    }

    #[test]
    fn concurrent_get_put_never_hands_one_permit_twice() {
        let p = Arc::new(Permits::new(128, 4));
        let owners: Arc<Vec<AtomicU64>> = Arc::new((0..128).map(|_| AtomicU64::new(0)).collect());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (p, owners) = (p.clone(), owners.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(x) = p.get(t as u32) {
                            let o = &owners[x.0 as usize];
                            assert_eq!(
                                o.swap(t + 1, Ordering::AcqRel),
                                0,
                                "permit {x:?} handed twice"
                            );
                            o.store(0, Ordering::Release);
                            assert!(p.put(x));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(p.in_use(), 0);
    }
}
