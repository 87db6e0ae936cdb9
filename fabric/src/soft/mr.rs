//! The memory-region table of a software protection domain.
//!
//! A key is `index << 8 | key byte`, as verbs keys are: the index finds the
//! entry, the byte tells generations apart. Lookups on the data path are
//! lock-free: an entry's current rkey is one atomic word, written last when a
//! region is registered or re-keyed, and read first (and again after the other
//! fields) when a request is checked, so a request that starts after an
//! invalidation always sees it. Registration takes a lock (setup time only).

use super::super::{Access, FabricError, Memory, Result};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Index 0 is never used, so key 0 never validates (zero-length RDMA WRITEs
/// carry rkey 0 and skip the check, as the IB spec says).
const FIRST_INDEX: u32 = 1;

#[derive(Debug, Default)]
struct Entry {
    /// Current rkey, 0 when invalid.
    rkey: AtomicU32,
    /// Current lkey, 0 when the slot is free.
    lkey: AtomicU32,
    /// Last key byte handed out (keeps advancing across invalidations).
    key8: AtomicU32,
    addr: AtomicU64,
    len: AtomicU64,
    access: AtomicU32,
    /// Region id in the PD's region table (shm), and offset of `addr` in it.
    region: AtomicU32,
    region_off: AtomicU64,
}

/// Where a checked access lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Checked {
    /// Local pointer to the first byte.
    pub ptr: *mut u8,
    /// Region id and offset inside it, for peers that map the region.
    pub region: u32,
    pub region_off: u64,
}

/// Why an access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// Unknown, invalidated or stale key.
    BadKey,
    /// Outside the region.
    OutOfBounds,
    /// The region lacks the right.
    NoAccess,
}

/// The table: fixed capacity, chosen when the PD is created.
pub struct MrTable {
    entries: Box<[Entry]>,
    /// Keeps registered memory alive; touched only at (de)registration.
    owners: Mutex<Owners>,
}

struct Owners {
    mems: Vec<Option<Arc<dyn Memory>>>,
    free: Vec<u32>,
}

impl std::fmt::Debug for MrTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MrTable({} entries)", self.entries.len())
    }
}

impl MrTable {
    pub(crate) fn new(capacity: u32) -> MrTable {
        let capacity = capacity.clamp(2, 1 << 24);
        let entries: Vec<Entry> = (0..capacity).map(|_| Entry::default()).collect();
        let free = (FIRST_INDEX..capacity).rev().collect();
        MrTable {
            entries: entries.into_boxed_slice(),
            owners: Mutex::new(Owners {
                mems: (0..capacity).map(|_| None).collect(),
                free,
            }),
        }
    }

    /// Registers `len` bytes at `offset` of `mem`; `region` says where peers
    /// find those bytes. Returns the entry index.
    pub(crate) fn register(
        &self,
        mem: Arc<dyn Memory>,
        offset: usize,
        len: usize,
        access: Access,
        region: (u32, u64),
    ) -> Result<u32> {
        let end = offset
            .checked_add(len)
            .ok_or(FabricError::BadMemory("range overflows"))?;
        if end > mem.len() {
            return Err(FabricError::BadMemory("range is outside the memory"));
        }
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        let index = owners
            .free
            .pop()
            .ok_or(FabricError::TableFull("memory region"))?;
        let e = &self.entries[index as usize];
        let key8 = (e.key8.load(Ordering::Relaxed) + 1) & 0xff;
        e.key8.store(key8, Ordering::Relaxed);
        e.addr
            .store(mem.as_ptr() as u64 + offset as u64, Ordering::Relaxed);
        e.len.store(len as u64, Ordering::Relaxed);
        e.access.store(access.bits(), Ordering::Relaxed);
        e.region.store(region.0, Ordering::Relaxed);
        e.region_off
            .store(region.1 + offset as u64, Ordering::Relaxed);
        let key = index << 8 | key8;
        e.lkey.store(key, Ordering::Release);
        let remote = access.contains(Access::REMOTE_WRITE) || access.contains(Access::REMOTE_READ);
        e.rkey
            .store(if remote { key } else { 0 }, Ordering::Release);
        owners.mems[index as usize] = Some(mem);
        Ok(index)
    }

    /// Frees an entry: its keys stop working at once. Returns the region the
    /// registration was tagged with, once (None when the entry was free).
    pub(crate) fn deregister(&self, index: u32) -> Option<u32> {
        let e = self.entries.get(index as usize)?;
        e.rkey.store(0, Ordering::Release);
        e.lkey.store(0, Ordering::Release);
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        let mem = owners.mems[index as usize].take()?;
        // Read before the index is free: the next registration rewrites it.
        let region = e.region.load(Ordering::Relaxed);
        owners.free.push(index);
        drop(owners);
        drop(mem);
        Some(region)
    }

    fn entry(&self, key: u32) -> Option<&Entry> {
        let index = key >> 8;
        if index < FIRST_INDEX {
            return None;
        }
        self.entries.get(index as usize)
    }

    pub(crate) fn addr(&self, index: u32) -> u64 {
        self.entries[index as usize].addr.load(Ordering::Relaxed)
    }
    pub(crate) fn len(&self, index: u32) -> u64 {
        self.entries[index as usize].len.load(Ordering::Relaxed)
    }
    /// The region id entry `index` was registered with (its tag).
    pub(crate) fn region(&self, index: u32) -> u32 {
        self.entries[index as usize].region.load(Ordering::Relaxed)
    }
    pub(crate) fn lkey(&self, index: u32) -> u32 {
        self.entries[index as usize].lkey.load(Ordering::Acquire)
    }
    pub(crate) fn rkey(&self, index: u32) -> u32 {
        self.entries[index as usize].rkey.load(Ordering::Acquire)
    }

    /// Invalidates the current rkey and validates the next one.
    pub(crate) fn rekey(&self, index: u32) -> u32 {
        let e = &self.entries[index as usize];
        // Only the MR's owner re-keys (one thread); a concurrent remote
        // invalidation of the old key is harmless: it fails its compare.
        let key8 = (e.key8.load(Ordering::Relaxed) + 1) & 0xff;
        e.key8.store(key8, Ordering::Relaxed);
        let key = index << 8 | key8;
        e.rkey.store(key, Ordering::Release);
        key
    }

    /// Invalidates `rkey` if it is the current key. Returns whether it was.
    pub(crate) fn invalidate(&self, rkey: u32) -> bool {
        match self.entry(rkey) {
            Some(e) => e
                .rkey
                .compare_exchange(rkey, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok(),
            None => false,
        }
    }

    /// LOCAL_INV: invalidates `rkey`; succeeds too when `rkey` is the entry's
    /// latest key and is already invalid (e.g. by the peer's SEND_WITH_INV).
    pub(crate) fn invalidate_local(&self, rkey: u32) -> bool {
        let Some(e) = self.entry(rkey) else {
            return false;
        };
        if self.invalidate(rkey) {
            return true;
        }
        e.lkey.load(Ordering::Acquire) != 0
            && e.rkey.load(Ordering::Acquire) == 0
            && e.key8.load(Ordering::Relaxed) == rkey & 0xff
    }

    /// Invalidates whatever rkey entry `index` has.
    pub(crate) fn invalidate_index(&self, index: u32) {
        if let Some(e) = self.entries.get(index as usize) {
            e.rkey.store(0, Ordering::Release);
        }
    }

    fn check(
        &self,
        e: &Entry,
        key_word: &AtomicU32,
        key: u32,
        addr: u64,
        len: u64,
        need: Access,
    ) -> std::result::Result<Checked, KeyError> {
        if key == 0 || key_word.load(Ordering::Acquire) != key {
            return Err(KeyError::BadKey);
        }
        let base = e.addr.load(Ordering::Relaxed);
        let size = e.len.load(Ordering::Relaxed);
        let access = Access::from_bits_truncate(e.access.load(Ordering::Relaxed));
        let region = e.region.load(Ordering::Relaxed);
        let region_off = e.region_off.load(Ordering::Relaxed);
        // Re-read the key: if it changed while we read the fields, they may
        // belong to another registration.
        if key_word.load(Ordering::Acquire) != key {
            return Err(KeyError::BadKey);
        }
        if !access.contains(need) {
            return Err(KeyError::NoAccess);
        }
        let off = addr.checked_sub(base).ok_or(KeyError::OutOfBounds)?;
        let end = off.checked_add(len).ok_or(KeyError::OutOfBounds)?;
        if end > size {
            return Err(KeyError::OutOfBounds);
        }
        Ok(Checked {
            ptr: (base + off) as *mut u8,
            region,
            region_off: region_off + off,
        })
    }

    /// Checks a remote access with `rkey`.
    pub(crate) fn check_rkey(
        &self,
        rkey: u32,
        addr: u64,
        len: u64,
        need: Access,
    ) -> std::result::Result<Checked, KeyError> {
        let e = self.entry(rkey).ok_or(KeyError::BadKey)?;
        self.check(e, &e.rkey, rkey, addr, len, need)
    }

    /// Checks a local access with `lkey` (receives need LOCAL_WRITE).
    pub(crate) fn check_lkey(
        &self,
        lkey: u32,
        addr: u64,
        len: u64,
        need: Access,
    ) -> std::result::Result<Checked, KeyError> {
        let e = self.entry(lkey).ok_or(KeyError::BadKey)?;
        self.check(e, &e.lkey, lkey, addr, len, need)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rekey_and_invalidate() {
        let t = MrTable::new(16);
        let mem: Arc<dyn Memory> = Arc::new(crate::soft::Heap::zeroed(4096));
        let base = mem.as_ptr() as u64;
        let i = t
            .register(
                mem,
                0,
                4096,
                Access::LOCAL_WRITE | Access::REMOTE_WRITE,
                (0, 0),
            )
            .unwrap();
        let k1 = t.rkey(i);
        assert_ne!(k1, 0);
        assert!(t.check_rkey(k1, base, 4096, Access::REMOTE_WRITE).is_ok());
        assert_eq!(
            t.check_rkey(k1, base + 1, 4096, Access::REMOTE_WRITE),
            Err(KeyError::OutOfBounds)
        );
        assert_eq!(
            t.check_rkey(k1, base, 1, Access::REMOTE_READ),
            Err(KeyError::NoAccess)
        );
        let k2 = t.rekey(i);
        assert_ne!(k1, k2);
        assert_eq!(k1 >> 8, k2 >> 8);
        assert_eq!(
            t.check_rkey(k1, base, 1, Access::REMOTE_WRITE),
            Err(KeyError::BadKey)
        );
        assert!(t.invalidate(k2));
        assert!(!t.invalidate(k2));
        assert_eq!(
            t.check_rkey(k2, base, 1, Access::REMOTE_WRITE),
            Err(KeyError::BadKey)
        );
        assert_eq!(
            t.check_rkey(0, base, 0, Access::REMOTE_WRITE),
            Err(KeyError::BadKey)
        );
        let lk = t.lkey(i);
        assert!(t.check_lkey(lk, base, 10, Access::LOCAL_WRITE).is_ok());
        t.deregister(i);
        assert_eq!(
            t.check_lkey(lk, base, 10, Access::NONE),
            Err(KeyError::BadKey)
        );
    }

    #[test]
    fn key_byte_wraps_around() {
        let t = MrTable::new(4);
        let mem: Arc<dyn Memory> = Arc::new(crate::soft::Heap::zeroed(64));
        let i = t
            .register(mem, 0, 64, Access::REMOTE_WRITE, (0, 0))
            .unwrap();
        let first = t.rkey(i);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..256 {
            seen.insert(t.rekey(i));
        }
        assert_eq!(seen.len(), 256);
        assert!(seen.contains(&first));
    }
}
