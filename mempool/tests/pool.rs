//! The chunk pool: single thread, many threads, exhaustion, stats, misuse.

use mempool::{Chunk, ChunkPool, PoolError, Region, Registrar};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn pool(chunks: usize, size: usize) -> ChunkPool {
    let r = Arc::new(Region::anonymous(chunks * size).unwrap());
    ChunkPool::new(r, size, &mut ()).unwrap()
}

#[test]
fn every_chunk_once_then_exhausted_then_reusable() {
    let p = pool(64, 4096);
    let n = p.chunks();
    assert!(n >= 64);
    let got: Vec<Chunk> = (0..n).map(|_| p.alloc().unwrap()).collect();
    let idx: HashSet<u32> = got.iter().map(|c| c.index()).collect();
    assert_eq!(idx.len() as u32, n);
    assert!(matches!(p.alloc(), Err(PoolError::Exhausted)));
    let s = p.stats();
    assert_eq!(
        (s.in_use, s.high_water, s.failed_allocs),
        (u64::from(n), u64::from(n), 1)
    );
    for c in got {
        p.free(c).unwrap();
    }
    assert_eq!(p.stats().in_use, 0);
    assert!(p.alloc().is_ok());
}

#[test]
fn double_free_and_foreign_chunks_are_refused() {
    let p = pool(8, 4096);
    let c = p.alloc().unwrap();
    let i = c.index();
    p.free(c).unwrap();
    // A forged handle for the same index: refused, the list stays intact.
    let forged: Chunk = unsafe_forge(i);
    assert!(matches!(p.free(forged), Err(PoolError::DoubleFree(x)) if x == i));
    assert!(matches!(
        p.free(unsafe_forge(p.chunks() + 5)),
        Err(PoolError::ForeignChunk(_))
    ));
    let all: HashSet<u32> = (0..p.chunks())
        .map(|_| p.alloc().unwrap().index())
        .collect();
    assert_eq!(
        all.len() as u32,
        p.chunks(),
        "no chunk handed out twice after the refused frees"
    );
}

/// A handle for index `i` taken from another pool, as a buggy caller could
/// hold one.
fn unsafe_forge(i: u32) -> Chunk {
    let other = pool(i as usize + 1, 64);
    let mut c = other.alloc().unwrap();
    while c.index() != i {
        c = other.alloc().unwrap();
    }
    c
}

#[test]
fn chunk_addresses_and_registration_once() {
    struct Count(u32);
    impl Registrar for Count {
        type Handle = (usize, usize);
        type Error = String;
        fn register(&mut self, r: &Arc<Region>) -> Result<(usize, usize), String> {
            self.0 += 1;
            Ok((r.as_ptr() as usize, r.len()))
        }
    }
    let r = Arc::new(Region::anonymous(1 << 20).unwrap());
    let mut reg = Count(0);
    let p = ChunkPool::new(r.clone(), 128 << 10, &mut reg).unwrap();
    assert_eq!(reg.0, 1, "the region is registered exactly once");
    assert_eq!(*p.registration(), (r.as_ptr() as usize, r.len()));
    let n = (r.len() / (128 << 10)) as u32;
    assert_eq!(
        p.chunks(),
        n,
        "as many chunks as fit the (page-rounded) region"
    );
    assert_eq!(p.offset(3), Some(3 * (128 << 10)));
    assert_eq!(p.offset(n), None);
    assert_eq!(p.chunk_ptr(1), Some(r.as_ptr().wrapping_add(128 << 10)));
    struct Fails;
    impl Registrar for Fails {
        type Handle = ();
        type Error = &'static str;
        fn register(&mut self, _: &Arc<Region>) -> Result<(), &'static str> {
            Err("no device")
        }
    }
    assert!(matches!(
        ChunkPool::new(r, 4096, &mut Fails),
        Err(PoolError::Registration(e)) if e == "no device"
    ));
}

#[test]
fn threads_never_share_a_chunk() {
    const THREADS: u64 = 4;
    let p = Arc::new(pool(256, 256));
    let owners: Arc<Vec<AtomicU64>> =
        Arc::new((0..p.chunks()).map(|_| AtomicU64::new(0)).collect());
    let threads: Vec<_> = (1..=THREADS)
        .map(|t| {
            let (p, owners) = (p.clone(), owners.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for round in 0..20_000u64 {
                    let c = p.alloc();
                    if let Ok(c) = c {
                        let o = &owners[c.index() as usize];
                        assert_eq!(o.swap(t, Ordering::AcqRel), 0, "chunk {} shared", c.index());
                        // Write the owner into the chunk itself too.
                        p.region()
                            .write(p.offset(c.index()).unwrap(), &t.to_le_bytes())
                            .unwrap();
                        held.push(c);
                    }
                    if held.len() > 8 || (round % 5 == 0 && !held.is_empty()) {
                        let c = held.remove(0);
                        let mut b = [0u8; 8];
                        p.region()
                            .read(p.offset(c.index()).unwrap(), &mut b)
                            .unwrap();
                        assert_eq!(u64::from_le_bytes(b), t, "chunk content changed under us");
                        owners[c.index() as usize].store(0, Ordering::Release);
                        p.free(c).unwrap();
                    }
                }
                for c in held {
                    owners[c.index() as usize].store(0, Ordering::Release);
                    p.free(c).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = p.stats();
    assert_eq!(s.in_use, 0);
    assert!(s.high_water > 0 && s.high_water <= u64::from(s.chunks));
}

#[test]
fn a_lease_goes_back_on_drop_and_claims_sit_at_its_offset() {
    let r = Arc::new(Region::anonymous(4 << 20).unwrap());
    let pool = Arc::new(ChunkPool::new(r.clone(), 1 << 20, &mut ()).unwrap());
    let a = pool.lease().unwrap();
    let b = pool.lease().unwrap();
    assert_ne!(a.offset(), b.offset());
    assert_eq!(pool.stats().in_use, 2);
    let claims = mempool::Claims::new_at(r.clone(), b.offset(), 4096, 256)
        .unwrap()
        .keeping(b);
    let c = claims.claim(3).unwrap();
    let p = claims.bytes(&c, 0..1).unwrap().as_ptr();
    assert_eq!(p as usize - r.as_ptr() as usize, claims.base() + 3 * 4096);
    claims.release(c).unwrap();
    assert!(
        mempool::Claims::new_at(r.clone(), 4 << 20, 4096, 1).is_err(),
        "claims past the region are refused"
    );
    drop(a);
    assert_eq!(pool.stats().in_use, 1, "the dropped lease went back");
    drop(claims);
    assert_eq!(
        pool.stats().in_use,
        0,
        "the claims kept their lease until dropped"
    );
}
