//! A bounded multi-producer single-consumer ring (several cores reporting to
//! the slow path): Dmitry Vyukov's array queue, each slot stamped with a
//! sequence number. Producers claim a slot with one CAS; the consumer needs no
//! atomic read-modify-write at all. Never allocates after creation, never
//! blocks; a full ring hands the item back ([`Full`]).

use crate::sync::{AtomicUsize, Ordering, UnsafeCell};
use crate::Full;
use crossbeam_utils::{Backoff, CachePadded};
use std::mem::MaybeUninit;
use std::sync::Arc;

struct Slot<T> {
    /// `pos` when free for the producer of position `pos`; `pos + 1` when
    /// holding that producer's item.
    seq: AtomicUsize,
    val: UnsafeCell<MaybeUninit<T>>,
}

struct Queue<T> {
    slots: Box<[Slot<T>]>,
    mask: usize,
    enqueue: CachePadded<AtomicUsize>,
    dequeue: CachePadded<AtomicUsize>,
}

// SAFETY: a slot's value is written only by the producer that won its
// position (CAS on `enqueue`) and read only by the consumer after the
// producer's Release store of `seq`; T crosses threads, so T: Send.
unsafe impl<T: Send> Sync for Queue<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Queue<T> {}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        let mut pos = self.dequeue.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[pos & self.mask];
            if slot.seq.load(Ordering::Relaxed) != pos + 1 {
                break;
            }
            // SAFETY: seq == pos + 1: the slot holds an item nobody took.
            slot.val.with_mut(|p| unsafe { (*p).assume_init_drop() });
            pos += 1;
        }
    }
}

/// A sending half; clone it for each producer.
pub struct Sender<T> {
    q: Arc<Queue<T>>,
}

/// The receiving half.
pub struct Receiver<T> {
    q: Arc<Queue<T>>,
    pos: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender { q: self.q.clone() }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mpsc::Sender(cap {})", self.q.mask + 1)
    }
}
impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mpsc::Receiver(cap {})", self.q.mask + 1)
    }
}

/// A ring of at least `capacity` slots (rounded up to a power of two, min 2).
///
/// ```
/// use pollers::mpsc;
///
/// let (tx, mut rx) = mpsc::channel::<u64>(64);
/// let producers: Vec<_> = (0..4u64)
///     .map(|p| {
///         let tx = tx.clone();
///         std::thread::spawn(move || (0..10).for_each(|i| tx.push(p * 100 + i).unwrap()))
///     })
///     .collect();
/// producers.into_iter().for_each(|t| t.join().unwrap());
/// let mut got = Vec::new();
/// while let Some(v) = rx.pop() {
///     got.push(v);
/// }
/// got.sort();
/// assert_eq!(got, (0..4).flat_map(|p| (0..10).map(move |i| p * 100 + i)).collect::<Vec<_>>());
/// ```
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let cap = capacity.max(2).next_power_of_two();
    let q = Arc::new(Queue {
        slots: (0..cap)
            .map(|i| Slot {
                seq: AtomicUsize::new(i),
                val: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect(),
        mask: cap - 1,
        enqueue: CachePadded::new(AtomicUsize::new(0)),
        dequeue: CachePadded::new(AtomicUsize::new(0)),
    });
    (Sender { q: q.clone() }, Receiver { q, pos: 0 })
}

impl<T> Sender<T> {
    /// Adds `item`, or hands it back when the ring is full.
    pub fn push(&self, item: T) -> Result<(), Full<T>> {
        let q = &*self.q;
        let backoff = Backoff::new();
        let mut pos = q.enqueue.load(Ordering::Relaxed);
        loop {
            let slot = &q.slots[pos & q.mask];
            let seq = slot.seq.load(Ordering::Acquire);
            match seq.wrapping_sub(pos) as isize {
                0 => match q.enqueue.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: winning the CAS for `pos` makes this slot ours
                        // until the Release store below.
                        slot.val.with_mut(|p| unsafe { (*p).write(item) });
                        slot.seq.store(pos + 1, Ordering::Release);
                        return Ok(());
                    }
                    Err(now) => pos = now,
                },
                d if d < 0 => return Err(Full(item)),
                _ => {
                    backoff.spin();
                    pos = q.enqueue.load(Ordering::Relaxed);
                }
            }
        }
    }

    /// Whether the receiver is gone.
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.q) == 1
    }
}

impl<T> Receiver<T> {
    /// Takes the oldest item.
    pub fn pop(&mut self) -> Option<T> {
        let q = &*self.q;
        let slot = &q.slots[self.pos & q.mask];
        if slot.seq.load(Ordering::Acquire) != self.pos + 1 {
            return None;
        }
        // SAFETY: seq == pos + 1: the producer finished writing (Release) and
        // no one else reads this slot.
        let item = slot.val.with_mut(|p| unsafe { (*p).assume_init_read() });
        slot.seq.store(self.pos + q.mask + 1, Ordering::Release);
        self.pos += 1;
        q.dequeue.store(self.pos, Ordering::Relaxed);
        Some(item)
    }

    /// Takes up to `max` items, handing each to `f`.
    pub fn pop_batch(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        while n < max {
            match self.pop() {
                Some(x) => f(x),
                None => break,
            }
            n += 1;
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fifo_full_and_wraparound() {
        let (tx, mut rx) = channel::<u32>(4);
        for round in 0..10 {
            for i in 0..4 {
                tx.push(round * 4 + i).unwrap();
            }
            assert_eq!(tx.push(7), Err(Full(7)));
            for i in 0..4 {
                assert_eq!(rx.pop(), Some(round * 4 + i));
            }
            assert_eq!(rx.pop(), None);
        }
    }

    #[test]
    fn drops_what_is_left() {
        let item = Arc::new(());
        {
            let (tx, mut rx) = channel(4);
            for _ in 0..3 {
                tx.push(item.clone()).unwrap();
            }
            drop(rx.pop());
            assert_eq!(Arc::strong_count(&item), 3);
        }
        assert_eq!(Arc::strong_count(&item), 1);
    }

    #[test]
    fn producers_each_in_order_every_item_once() {
        const P: u64 = 3;
        const N: u64 = 200_000;
        let (tx, mut rx) = channel::<(u64, u64)>(128);
        let threads: Vec<_> = (0..P)
            .map(|p| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut i = 0;
                    while i < N {
                        if tx.push((p, i)).is_ok() {
                            i += 1;
                        }
                    }
                })
            })
            .collect();
        let mut next = [0u64; P as usize];
        let mut total = 0;
        while total < P * N {
            rx.pop_batch(32, |(p, i)| {
                assert_eq!(next[p as usize], i, "producer {p} out of order");
                next[p as usize] += 1;
                total += 1;
            });
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(next, [N; P as usize]);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    #[test]
    fn loom_mpsc() {
        loom::model(|| {
            let (tx, mut rx) = channel::<u32>(2);
            let tx2 = tx.clone();
            let a = loom::thread::spawn(move || {
                let _ = tx.push(1);
            });
            let b = loom::thread::spawn(move || {
                let _ = tx2.push(2);
            });
            a.join().unwrap();
            b.join().unwrap();
            let mut got = Vec::new();
            while let Some(x) = rx.pop() {
                got.push(x);
            }
            got.sort();
            assert_eq!(got, [1, 2]);
        });
    }
}
