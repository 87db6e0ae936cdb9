//! Owned pieces of a region, handed out as tokens, so code that owns a
//! piece gets a plain slice of it without `unsafe` of its own.
//!
//! ```text
//!   Slots   n fixed-size slots; get(home) -> Slot (a bit won in a bitmap, each
//!           home starting its search at its own word); put(Slot). A Slot is
//!           not Clone: holding `&mut Slot` is holding the slot's bytes.
//!   Claims  n fixed-size chunks whose index comes from outside (a peer's
//!           message); claim(i) -> Claim (an atomic flag won), release(Claim).
//!           A chunk is claimed by one holder at a time, whoever asks.
//! ```
//! The memory itself may also be written by a NIC or a peer process (that is
//! what it is registered for); the protocol above says when it does not, and
//! these tokens say who, in this process, may look at it meanwhile.

use crate::region::Region;
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::PoolError;
use std::ops::Range;
use std::sync::Arc;

/// A pool's identity, so a token of one pool never opens another's bytes.
fn pool_id<T>(x: &T) -> usize {
    x as *const T as usize
}

/// The slot `idx` of `size` bytes of `region` from `base`, checked once at
/// construction to lie inside the region.
fn slot_ptr(region: &Region, base: usize, size: usize, idx: u32) -> *mut u8 {
    // The pool checked base + n * size <= len: in bounds for idx < n.
    region.as_ptr().wrapping_add(base + idx as usize * size)
}

/// A slot taken from [`Slots`]. Not `Clone`: it is returned once.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Slot {
    idx: u32,
    pool: usize,
}

impl Slot {
    /// The slot's index.
    pub fn index(&self) -> u32 {
        self.idx
    }
}

/// `n` slots of `size` bytes of a region, taken and returned without a lock.
#[derive(Debug)]
pub struct Slots {
    region: Arc<Region>,
    base: usize,
    size: usize,
    n: u32,
    homes: u32,
    words: Box<[AtomicU64]>,
}

impl Slots {
    /// `n` slots of `size` bytes from `base` of `region`, shared by `homes`
    /// takers (cores) that each start their search apart.
    pub fn new(
        region: Arc<Region>,
        base: usize,
        size: usize,
        n: u32,
        homes: u32,
    ) -> Result<Slots, PoolError> {
        if n == 0 || size == 0 {
            return Err(PoolError::Empty);
        }
        let len = (n as usize)
            .checked_mul(size)
            .and_then(|l| l.checked_add(base))
            .ok_or(PoolError::TooLarge(usize::MAX))?;
        if len > region.len() {
            return Err(PoolError::OutOfBounds { off: base, len });
        }
        let words = (0..n.div_ceil(64) as usize)
            .map(|w| {
                // Bits past n in the last word are permanently taken.
                let valid = (n as usize - w * 64).min(64);
                AtomicU64::new(if valid == 64 { 0 } else { !0u64 << valid })
            })
            .collect();
        Ok(Slots {
            region,
            base,
            size,
            n,
            homes: homes.max(1),
            words,
        })
    }

    /// Slots in the pool.
    pub fn len(&self) -> u32 {
        self.n
    }

    /// Whether the pool has no slot (never: `new` refuses that).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.size
    }

    /// Takes a free slot, searching from `home`'s word (`None`: all taken).
    pub fn get(&self, home: u32) -> Option<Slot> {
        let n = self.words.len();
        let start = (home % self.homes) as usize * n / self.homes as usize;
        for k in 0..n {
            let w = (start + k) % n;
            let word = &self.words[w];
            let mut cur = word.load(Ordering::Relaxed);
            while cur != !0 {
                let bit = (!cur).trailing_zeros();
                let prev = word.fetch_or(1 << bit, Ordering::Acquire);
                if prev & (1 << bit) == 0 {
                    return Some(Slot {
                        idx: w as u32 * 64 + bit,
                        pool: pool_id(self),
                    });
                }
                cur = prev | (1 << bit);
            }
        }
        None
    }

    /// Returns a slot. A slot of another pool is refused (and stays out).
    pub fn put(&self, s: Slot) -> Result<(), PoolError> {
        if s.pool != pool_id(self) || s.idx >= self.n {
            return Err(PoolError::ForeignChunk(s.idx));
        }
        let mask = 1u64 << (s.idx % 64);
        let prev = self.words[(s.idx / 64) as usize].fetch_and(!mask, Ordering::Release);
        if prev & mask == 0 {
            // Cannot happen: a Slot is minted once per win of its bit.
            return Err(PoolError::DoubleFree(s.idx));
        }
        Ok(())
    }

    /// The slot's bytes (empty for a slot of another pool).
    pub fn bytes_mut<'a>(&'a self, s: &'a mut Slot) -> &'a mut [u8] {
        if s.pool != pool_id(self) || s.idx >= self.n {
            return &mut [];
        }
        let p = slot_ptr(&self.region, self.base, self.size, s.idx);
        // SAFETY: the slot lies inside the region (checked in `new`), which
        // stays mapped while `self` holds it; `s` was minted by `get` when
        // its bit was won and is not Clone, so `&mut Slot` is the only
        // handle to these bytes in this process for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(p, self.size) }
    }

    /// Slots taken now.
    pub fn in_use(&self) -> u32 {
        let taken: u32 = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum();
        taken - (self.words.len() as u32 * 64 - self.n)
    }
}

/// A chunk claimed from [`Claims`]. Not `Clone`: it is released once.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Claim {
    idx: u32,
    pool: usize,
}

impl Claim {
    /// The chunk's index.
    pub fn index(&self) -> u32 {
        self.idx
    }
}

/// `n` chunks of `size` bytes of a region, each claimed by one holder at a
/// time. The index to claim comes from outside (a peer names the chunk);
/// a chunk already claimed is refused, so two holders never see one
/// chunk's bytes at once.
#[derive(Debug)]
pub struct Claims {
    region: Arc<Region>,
    base: usize,
    size: usize,
    claimed: Box<[AtomicBool]>,
    /// Whatever must live as long as the chunks (a pool lease).
    keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Claims {
    /// `n` chunks of `size` bytes from the start of `region`.
    pub fn new(region: Arc<Region>, size: usize, n: u32) -> Result<Claims, PoolError> {
        Claims::new_at(region, 0, size, n)
    }

    /// `n` chunks of `size` bytes from `base` in `region` (a slab of a
    /// shared pool, say).
    pub fn new_at(
        region: Arc<Region>,
        base: usize,
        size: usize,
        n: u32,
    ) -> Result<Claims, PoolError> {
        if n == 0 || size == 0 {
            return Err(PoolError::Empty);
        }
        let len = (n as usize)
            .checked_mul(size)
            .ok_or(PoolError::TooLarge(usize::MAX))?;
        if base.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(PoolError::OutOfBounds { off: base, len });
        }
        Ok(Claims {
            region,
            base,
            size,
            claimed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            keep: None,
        })
    }

    /// Keeps `k` (a pool lease) alive as long as the chunks: it is dropped
    /// with the last reference to them.
    pub fn keeping(mut self, k: impl std::any::Any + Send + Sync) -> Claims {
        self.keep = Some(Box::new(k));
        self
    }

    /// Where the chunks start in the region.
    pub fn base(&self) -> usize {
        self.base
    }

    /// The region.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.size
    }

    /// Claims chunk `idx` (`None`: out of range, or claimed already).
    pub fn claim(&self, idx: u32) -> Option<Claim> {
        let flag = self.claimed.get(idx as usize)?;
        if flag.swap(true, Ordering::Acquire) {
            return None;
        }
        Some(Claim {
            idx,
            pool: pool_id(self),
        })
    }

    /// Releases a claim (one of another pool is refused).
    pub fn release(&self, c: Claim) -> Result<(), PoolError> {
        match self.claimed.get(c.idx as usize) {
            Some(flag) if c.pool == pool_id(self) => {
                flag.store(false, Ordering::Release);
                Ok(())
            }
            _ => Err(PoolError::ForeignChunk(c.idx)),
        }
    }

    /// Bytes `r` of the claimed chunk (`None`: outside it, or a claim of
    /// another pool).
    pub fn bytes<'a>(&'a self, c: &'a Claim, r: Range<usize>) -> Option<&'a [u8]> {
        let p = self.at(c, &r)?;
        // SAFETY: inside the chunk (checked by `at`), which lies in the
        // mapped region; the claim is the only one of this chunk and is
        // borrowed for the slice's life, so no `&mut` over it exists.
        Some(unsafe { std::slice::from_raw_parts(p, r.len()) })
    }

    /// Two disjoint parts of the claimed chunk, one to read and one to
    /// write (`None`: they overlap or lie outside it).
    pub fn split<'a>(
        &'a self,
        c: &'a mut Claim,
        read: Range<usize>,
        write: Range<usize>,
    ) -> Option<(&'a [u8], &'a mut [u8])> {
        let overlap = read.start < write.end && write.start < read.end;
        if overlap && !read.is_empty() && !write.is_empty() {
            return None;
        }
        let r = self.at(c, &read)?;
        let w = self.at(c, &write)?;
        // SAFETY: both ranges lie inside the chunk (checked by `at`) and do
        // not overlap (checked above); the claim is exclusive and mutably
        // borrowed for the slices' life.
        Some(unsafe {
            (
                std::slice::from_raw_parts(r, read.len()),
                std::slice::from_raw_parts_mut(w, write.len()),
            )
        })
    }

    fn at(&self, c: &Claim, r: &Range<usize>) -> Option<*mut u8> {
        if c.pool != pool_id(self) || r.start > r.end || r.end > self.size {
            return None;
        }
        Some(
            self.region
                .as_ptr()
                .wrapping_add(self.base + c.idx as usize * self.size + r.start),
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn region(len: usize) -> Arc<Region> {
        Arc::new(Region::anonymous(len).unwrap())
    }

    #[test]
    fn every_slot_once_then_exhausted_and_bytes_are_the_slots() {
        for n in [1u32, 63, 64, 65, 512] {
            let s = Slots::new(region(n as usize * 64), 0, 64, n, 2).unwrap();
            let mut got: Vec<Slot> = (0..n).map(|i| s.get(i % 2).unwrap()).collect();
            let idx: HashSet<u32> = got.iter().map(Slot::index).collect();
            assert_eq!(idx.len() as u32, n);
            assert!(s.get(0).is_none());
            assert_eq!(s.in_use(), n);
            for g in &mut got {
                let i = g.index() as u8;
                s.bytes_mut(g).fill(i);
            }
            for g in &mut got {
                let i = g.index() as u8;
                assert!(s.bytes_mut(g).iter().all(|&b| b == i), "slots are disjoint");
            }
            for g in got {
                s.put(g).unwrap();
            }
            assert_eq!(s.in_use(), 0);
        }
    }

    #[test]
    fn homes_start_apart_and_foreign_slots_are_refused() {
        let s = Slots::new(region(512 * 8), 0, 8, 512, 2).unwrap();
        let other = Slots::new(region(512 * 8), 0, 8, 512, 2).unwrap();
        assert_eq!(s.get(0).unwrap().index(), 0);
        assert_eq!(s.get(1).unwrap().index(), 256);
        let mut x = other.get(0).unwrap();
        assert!(
            s.bytes_mut(&mut x).is_empty(),
            "another pool's slot opens nothing"
        );
        assert!(s.put(x).is_err());
        // One slot more than the region holds (it may be a whole
        // hugepage, larger than asked for).
        let r = region(4096);
        let n = (r.len() / 64 + 1) as u32;
        assert!(Slots::new(r, 0, 64, n, 1).is_err(), "does not fit");
    }

    #[test]
    fn a_chunk_is_claimed_once_and_split_checks_ranges() {
        let c = Claims::new(region(4 * 4096), 4096, 4).unwrap();
        let mut a = c.claim(1).unwrap();
        assert!(c.claim(1).is_none(), "claimed already");
        assert!(c.claim(4).is_none(), "out of range");
        {
            let (r, w) = c.split(&mut a, 4000..4096, 0..4000).unwrap();
            w.fill(7);
            assert_eq!(r.len(), 96);
        }
        assert!(c.split(&mut a, 0..10, 5..20).is_none(), "overlap");
        assert!(c.split(&mut a, 0..10, 4000..4097).is_none(), "outside");
        assert_eq!(c.bytes(&a, 0..4).unwrap(), &[7, 7, 7, 7]);
        c.release(a).unwrap();
        let b = c.claim(1).unwrap();
        let other = Claims::new(region(4096), 4096, 1).unwrap();
        assert!(other.bytes(&b, 0..1).is_none(), "another pool's claim");
        assert!(other.release(b).is_err());
    }

    #[test]
    fn concurrent_takers_never_share_a_slot() {
        let s = Arc::new(Slots::new(region(128 * 8), 0, 8, 128, 4).unwrap());
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for k in 0..20_000u64 {
                        if let Some(mut x) = s.get(t) {
                            let b = s.bytes_mut(&mut x);
                            b.copy_from_slice(&k.to_le_bytes());
                            assert_eq!(b, &k.to_le_bytes(), "slot shared");
                            s.put(x).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.in_use(), 0);
    }
}
