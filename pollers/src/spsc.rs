//! A bounded single-producer single-consumer ring (a core talking to the slow
//! path, or the other way). Fixed capacity (a power of two) chosen at creation;
//! push and pop never allocate, never block, never take a lock; a full ring
//! hands the item back ([`Full`]). Each side caches the other's index so the
//! shared cache lines move only when the cached view runs out.

use crate::sync::{AtomicUsize, Ordering, UnsafeCell};
use crate::Full;
use crossbeam_utils::CachePadded;
use std::mem::MaybeUninit;
use std::sync::Arc;

struct Ring<T> {
    /// Next slot to read (written by the consumer).
    head: CachePadded<AtomicUsize>,
    /// Next slot to write (written by the producer).
    tail: CachePadded<AtomicUsize>,
    mask: usize,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: a slot is written only by the producer while it is outside
// head..tail, and read only by the consumer while inside; the Release/Acquire
// pairs on head and tail order those accesses. T moves across threads: Send.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Ring<T> {}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        for i in head..tail {
            // SAFETY: slots in head..tail hold initialised items nobody else can
            // reach any more (we are being dropped).
            self.slots[i & self.mask].with_mut(|p| unsafe { (*p).assume_init_drop() });
        }
    }
}

/// The sending half.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
    tail: usize,
    head_cache: usize,
}

/// The receiving half.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
    head: usize,
    tail_cache: usize,
}

impl<T> std::fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spsc::Producer(cap {})", self.ring.mask + 1)
    }
}
impl<T> std::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spsc::Consumer(cap {})", self.ring.mask + 1)
    }
}

/// A ring of at least `capacity` slots (rounded up to a power of two, min 2).
///
/// ```
/// use pollers::{spsc, Full};
///
/// let (mut tx, mut rx) = spsc::channel::<u32>(2);
/// tx.push(1).unwrap();
/// tx.push(2).unwrap();
/// assert_eq!(tx.push(3), Err(Full(3))); // back-pressure: the item comes back
/// let t = std::thread::spawn(move || (rx.pop(), rx.pop(), rx.pop()));
/// assert_eq!(t.join().unwrap(), (Some(1), Some(2), None));
/// ```
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let cap = capacity.max(2).next_power_of_two();
    let ring = Arc::new(Ring {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        mask: cap - 1,
        slots: (0..cap)
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect(),
    });
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
            head_cache: 0,
        },
        Consumer {
            ring,
            head: 0,
            tail_cache: 0,
        },
    )
}

impl<T> Producer<T> {
    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }

    /// Free slots (a lower bound), looking at the consumer's index only when
    /// the cached view shows fewer than `want`.
    fn room(&mut self, want: usize) -> usize {
        let cap = self.ring.mask + 1;
        if cap - (self.tail - self.head_cache) < want {
            self.head_cache = self.ring.head.load(Ordering::Acquire);
        }
        cap - (self.tail - self.head_cache)
    }

    /// Adds `item`, or hands it back when the ring is full.
    pub fn push(&mut self, item: T) -> Result<(), Full<T>> {
        if self.room(1) == 0 {
            return Err(Full(item));
        }
        let slot = &self.ring.slots[self.tail & self.ring.mask];
        // SAFETY: the slot is outside head..tail (room > 0), so the consumer
        // does not touch it; we are the only producer.
        slot.with_mut(|p| unsafe { (*p).write(item) });
        self.tail += 1;
        self.ring.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Adds items from `items` while there is room, publishing once. Returns
    /// how many were added; the rest stay in the iterator.
    pub fn push_batch<I: Iterator<Item = T>>(
        &mut self,
        items: &mut std::iter::Peekable<I>,
    ) -> usize {
        let room = self.room(self.ring.mask + 1);
        let mut n = 0;
        while n < room {
            let Some(item) = items.next() else { break };
            let slot = &self.ring.slots[(self.tail + n) & self.ring.mask];
            // SAFETY: as in push: n < room keeps the slot outside head..tail.
            slot.with_mut(|p| unsafe { (*p).write(item) });
            n += 1;
        }
        if n > 0 {
            self.tail += n;
            self.ring.tail.store(self.tail, Ordering::Release);
        }
        n
    }

    /// Whether the consumer is gone.
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.ring) == 1
    }
}

impl<T> Consumer<T> {
    /// Items ready (a lower bound), looking at the producer's index only when
    /// the cached view shows fewer than `want`.
    fn ready(&mut self, want: usize) -> usize {
        if self.tail_cache - self.head < want {
            self.tail_cache = self.ring.tail.load(Ordering::Acquire);
        }
        self.tail_cache - self.head
    }

    /// Takes the oldest item.
    pub fn pop(&mut self) -> Option<T> {
        if self.ready(1) == 0 {
            return None;
        }
        let slot = &self.ring.slots[self.head & self.ring.mask];
        // SAFETY: the slot is inside head..tail: initialised by the producer,
        // which published it with Release (our Acquire in ready()).
        let item = slot.with_mut(|p| unsafe { (*p).assume_init_read() });
        self.head += 1;
        self.ring.head.store(self.head, Ordering::Release);
        Some(item)
    }

    /// Takes up to `max` items, handing each to `f`, publishing once.
    pub fn pop_batch(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let n = self.ready(max).min(max);
        for i in 0..n {
            let slot = &self.ring.slots[(self.head + i) & self.ring.mask];
            // SAFETY: as in pop, for every slot below head + ready.
            f(slot.with_mut(|p| unsafe { (*p).assume_init_read() }));
        }
        if n > 0 {
            self.head += n;
            self.ring.head.store(self.head, Ordering::Release);
        }
        n
    }

    /// Items waiting (a snapshot).
    pub fn len(&self) -> usize {
        self.ring.tail.load(Ordering::Acquire) - self.head
    }

    /// Whether nothing is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the producer is gone.
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.ring) == 1
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fifo_full_empty_wraparound() {
        let (mut p, mut c) = channel::<u32>(3);
        assert_eq!(p.capacity(), 4);
        assert_eq!(c.pop(), None);
        for round in 0..10u32 {
            for i in 0..4 {
                p.push(round * 10 + i).unwrap();
            }
            assert_eq!(p.push(99), Err(Full(99)));
            assert_eq!(c.len(), 4);
            for i in 0..4 {
                assert_eq!(c.pop(), Some(round * 10 + i));
            }
            assert!(c.is_empty());
        }
    }

    #[test]
    fn batches() {
        let (mut p, mut c) = channel::<u32>(8);
        let mut it = (0..20).peekable();
        assert_eq!(p.push_batch(&mut it), 8);
        assert_eq!(it.peek(), Some(&8));
        let mut got = Vec::new();
        assert_eq!(c.pop_batch(5, |x| got.push(x)), 5);
        assert_eq!(p.push_batch(&mut it), 5);
        assert_eq!(c.pop_batch(100, |x| got.push(x)), 8);
        assert_eq!(got, (0..13).collect::<Vec<_>>());
    }

    #[test]
    fn drops_what_is_left() {
        let item = Arc::new(());
        {
            let (mut p, _c) = channel(4);
            p.push(item.clone()).unwrap();
            p.push(item.clone()).unwrap();
            assert_eq!(Arc::strong_count(&item), 3);
        }
        assert_eq!(Arc::strong_count(&item), 1);
    }

    #[test]
    fn two_threads_every_item_once_in_order() {
        const N: u64 = 1_000_000;
        let (mut p, mut c) = channel::<u64>(64);
        let t = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                if p.push(i).is_ok() {
                    i += 1;
                }
            }
        });
        let mut next = 0;
        while next < N {
            c.pop_batch(16, |x| {
                assert_eq!(x, next);
                next += 1;
            });
        }
        t.join().unwrap();
        assert!(c.is_abandoned());
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    #[test]
    fn loom_spsc() {
        loom::model(|| {
            let (mut p, mut c) = channel::<u32>(2);
            let t = loom::thread::spawn(move || {
                for i in 0..3 {
                    while p.push(i).is_err() {
                        loom::thread::yield_now();
                    }
                }
            });
            let mut next = 0;
            while next < 3 {
                match c.pop() {
                    Some(x) => {
                        assert_eq!(x, next);
                        next += 1;
                    }
                    None => loom::thread::yield_now(),
                }
            }
            t.join().unwrap();
        });
    }
}
