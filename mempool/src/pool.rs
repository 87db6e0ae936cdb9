//! A chunk pool over a region: fixed-size chunks addressed by index, taken and
//! returned in O(1) with no lock.
//!
//! ```text
//!   shared free list: a Treiber stack of chunk indices, head = (ABA tag << 32 | index + 1)
//!   chunk state:      one byte per chunk (free / in use): a double free or a
//!                     foreign index is refused, never corrupts the list
//! ```
//! The region is registered once, by the caller's [`Registrar`], and the pool
//! keeps the handle: nothing here knows about RDMA.

use crate::region::Region;
use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use crate::PoolError;
use crossbeam_utils::CachePadded;
use std::sync::Arc;

const EMPTY: u32 = 0;
const FREE: u8 = 0;
const USED: u8 = 1;

/// Registers memory once (the fabric implements it; tests can use `()`).
pub trait Registrar {
    /// What registration yields (an MR, say).
    type Handle;
    /// Why it failed.
    type Error: std::fmt::Display;
    /// Registers the whole of `region`.
    fn register(&mut self, region: &Arc<Region>) -> Result<Self::Handle, Self::Error>;
}

/// No registration.
impl Registrar for () {
    type Handle = ();
    type Error = std::convert::Infallible;
    fn register(&mut self, _: &Arc<Region>) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A chunk taken from the pool. Not `Clone`: it is returned once.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Chunk(u32);

impl Chunk {
    /// The chunk's index (the RTRS buf_id of a server chunk).
    pub fn index(&self) -> u32 {
        self.0
    }
}

/// A chunk of a shared pool, returned to it on drop.
pub struct Lease<H: Send + Sync + 'static = ()> {
    pool: Arc<ChunkPool<H>>,
    chunk: Option<Chunk>,
}

impl<H: Send + Sync + 'static> Lease<H> {
    /// The chunk's index.
    pub fn index(&self) -> u32 {
        self.chunk.as_ref().map_or(u32::MAX, Chunk::index)
    }
    /// The chunk's offset in the pool's region.
    pub fn offset(&self) -> usize {
        self.index() as usize * self.pool.chunk_size
    }
    /// The pool.
    pub fn pool(&self) -> &Arc<ChunkPool<H>> {
        &self.pool
    }
}

impl<H: Send + Sync + 'static> std::fmt::Debug for Lease<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({} of {:?})", self.index(), self.pool)
    }
}

impl<H: Send + Sync + 'static> Drop for Lease<H> {
    fn drop(&mut self) {
        if let Some(c) = self.chunk.take() {
            // The chunk came from this pool and is freed once (the lease is
            // not Clone), so this cannot fail.
            let r = self.pool.free(c);
            debug_assert!(r.is_ok(), "a lease's chunk went back twice: {r:?}");
        }
    }
}

/// Pool figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Chunks in the pool.
    pub chunks: u32,
    /// Bytes per chunk.
    pub chunk_size: usize,
    /// Chunks held by users now (not in the free list).
    pub in_use: u64,
    /// Most chunks ever held at once.
    pub high_water: u64,
    /// Allocations that found the pool exhausted.
    pub failed_allocs: u64,
    /// Whether 2 MiB hugepages back the region.
    pub huge: bool,
}

/// The pool: a region carved into fixed-size chunks, handed out by index
/// from a lock-free list.
///
/// ```
/// use mempool::{ChunkPool, PoolError, Region};
/// use std::sync::Arc;
///
/// // 1 MiB at least (rounded up to whole 2 MiB hugepages when reserved),
/// // registered once: `()` registers nowhere; a fabric's protection
/// // domain would make it an MR.
/// let region = Arc::new(Region::anonymous(1 << 20)?);
/// let pool = ChunkPool::new(region, 64 << 10, &mut ())?;
/// assert!(pool.chunks() >= 16);
///
/// let c = pool.alloc()?;
/// let at = pool.chunk_ptr(c.index()).expect("in range");
/// // SAFETY: the chunk is ours until freed; 64 KiB at `at`.
/// unsafe { at.write_bytes(0xab, pool.chunk_size()) };
/// assert_eq!(pool.stats().in_use, 1);
/// pool.free(c)?;
///
/// let held: Vec<_> = (0..pool.chunks()).map(|_| pool.alloc()).collect::<Result<_, _>>()?;
/// assert!(matches!(pool.alloc(), Err(PoolError::Exhausted)));
/// for c in held {
///     pool.free(c)?;
/// }
/// assert_eq!(pool.stats().in_use, 0);
/// # Ok::<(), PoolError>(())
/// ```
pub struct ChunkPool<H = ()> {
    region: Arc<Region>,
    chunk_size: usize,
    count: u32,
    head: CachePadded<AtomicU64>,
    next: Box<[AtomicU32]>,
    state: Box<[AtomicU8]>,
    out: CachePadded<AtomicU64>,
    high_water: AtomicU64,
    failed: AtomicU64,
    handle: H,
}

impl<H> std::fmt::Debug for ChunkPool<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkPool({} x {} B)", self.count, self.chunk_size)
    }
}

impl<H> ChunkPool<H> {
    /// Carves `region` into chunks of `chunk_size` bytes (as many as fit) and
    /// registers the whole region once with `registrar`.
    pub fn new<R: Registrar<Handle = H>>(
        region: Arc<Region>,
        chunk_size: usize,
        registrar: &mut R,
    ) -> Result<ChunkPool<H>, PoolError> {
        if chunk_size == 0 {
            return Err(PoolError::Empty);
        }
        let count = region.len() / chunk_size;
        if count == 0 || count >= u32::MAX as usize {
            return Err(PoolError::BadChunkCount(count));
        }
        let handle = registrar
            .register(&region)
            .map_err(|e| PoolError::Registration(e.to_string()))?;
        let count = count as u32;
        // Initially every chunk is on the list, lowest index on top.
        let next: Vec<AtomicU32> = (0..count)
            .map(|i| AtomicU32::new(if i + 1 < count { i + 2 } else { EMPTY }))
            .collect();
        Ok(ChunkPool {
            region,
            chunk_size,
            count,
            head: CachePadded::new(AtomicU64::new(1)),
            next: next.into_boxed_slice(),
            state: (0..count).map(|_| AtomicU8::new(FREE)).collect(),
            out: CachePadded::new(AtomicU64::new(0)),
            high_water: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            handle,
        })
    }

    /// The registration of the whole region.
    pub fn registration(&self) -> &H {
        &self.handle
    }
    /// The region.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
    /// Bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }
    /// Chunks in the pool.
    pub fn chunks(&self) -> u32 {
        self.count
    }
    /// Offset of chunk `index` in the region (None when out of range).
    pub fn offset(&self, index: u32) -> Option<usize> {
        (index < self.count).then(|| index as usize * self.chunk_size)
    }
    /// Address of chunk `index` (None when out of range).
    pub fn chunk_ptr(&self, index: u32) -> Option<*mut u8> {
        // SAFETY: offset() < count * chunk_size <= region.len().
        self.offset(index)
            .map(|o| unsafe { self.region.as_ptr().add(o) })
    }

    fn pop(&self) -> Option<u32> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let top = head as u32;
            if top == EMPTY {
                return None;
            }
            let next = self.next[(top - 1) as usize].load(Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            match self.head.compare_exchange_weak(
                head,
                tag << 32 | u64::from(next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(top - 1),
                Err(h) => head = h,
            }
        }
    }

    fn push(&self, index: u32) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            self.next[index as usize].store(head as u32, Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            match self.head.compare_exchange_weak(
                head,
                tag << 32 | u64::from(index + 1),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    fn take_out(&self) {
        let now = self.out.fetch_add(1, Ordering::Relaxed) + 1;
        self.high_water.fetch_max(now, Ordering::Relaxed);
    }

    fn mark_used(&self, index: u32) {
        self.state[index as usize].store(USED, Ordering::Relaxed);
    }

    fn mark_free(&self, index: u32) -> Result<(), PoolError> {
        let s = self
            .state
            .get(index as usize)
            .ok_or(PoolError::ForeignChunk(index))?;
        if s.swap(FREE, Ordering::Relaxed) != USED {
            return Err(PoolError::DoubleFree(index));
        }
        Ok(())
    }

    /// Takes a chunk from the shared list.
    pub fn alloc(&self) -> Result<Chunk, PoolError> {
        match self.pop() {
            Some(i) => {
                self.take_out();
                self.mark_used(i);
                Ok(Chunk(i))
            }
            None => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(PoolError::Exhausted)
            }
        }
    }

    /// Returns a chunk to the shared list.
    pub fn free(&self, c: Chunk) -> Result<(), PoolError> {
        self.mark_free(c.0)?;
        self.push(c.0);
        self.out.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes a chunk that goes back to the pool when the lease is dropped
    /// (by whoever holds it last: a lease can be shared in an `Arc`).
    pub fn lease(self: &Arc<Self>) -> Result<Lease<H>, PoolError>
    where
        H: Send + Sync + 'static,
    {
        let chunk = self.alloc()?;
        Ok(Lease {
            pool: self.clone(),
            chunk: Some(chunk),
        })
    }

    /// The figures now.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            chunks: self.count,
            chunk_size: self.chunk_size,
            in_use: self.out.load(Ordering::Relaxed),
            high_water: self.high_water.load(Ordering::Relaxed),
            failed_allocs: self.failed.load(Ordering::Relaxed),
            huge: self.region.is_huge(),
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    /// Two threads take and return chunks of a two-chunk list at once, one of
    /// them popping twice and pushing back the first chunk before the second
    /// (the ABA pattern the tag guards against): a chunk is never held by two
    /// threads, and every chunk comes back.
    #[test]
    fn loom_free_list() {
        use loom::sync::atomic::AtomicBool;
        let region = Arc::new(Region::anonymous(8192).unwrap());
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(move || {
            let pool = Arc::new(ChunkPool::new(region.clone(), region.len() / 2, &mut ()).unwrap());
            let held = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let take = |pool: &ChunkPool<()>, held: &[AtomicBool; 2]| {
                let c = pool.alloc().ok()?;
                let h = &held[c.index() as usize];
                assert!(!h.swap(true, Ordering::AcqRel), "chunk held twice");
                Some(c)
            };
            let give = |pool: &ChunkPool<()>, held: &[AtomicBool; 2], c: Chunk| {
                held[c.index() as usize].store(false, Ordering::Release);
                pool.free(c).unwrap();
            };
            let t1 = {
                let (pool, held) = (pool.clone(), held.clone());
                loom::thread::spawn(move || {
                    if let Some(c) = take(&pool, &held) {
                        give(&pool, &held, c);
                    }
                })
            };
            let a = take(&pool, &held);
            let b = take(&pool, &held);
            if let Some(a) = a {
                give(&pool, &held, a);
            }
            if let Some(b) = b {
                give(&pool, &held, b);
            }
            t1.join().unwrap();
            let x = pool.alloc().unwrap();
            let y = pool.alloc().unwrap();
            assert_ne!(x.index(), y.index());
            assert!(pool.alloc().is_err());
        });
    }
}
