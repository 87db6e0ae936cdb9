//! mempool: memory for a dataplane, like DPDK's rte_mempool (no RDMA in it).
//!
//! ```text
//!   Region      one allocation: 2 MiB hugepages when reserved, else 4 KiB pages
//!               with MADV_HUGEPAGE (logged once, with the command to reserve them);
//!               shareable regions live in a memfd another process can map
//!   ChunkPool   the region carved into fixed-size chunks addressed by index;
//!               registered once through the caller's Registrar
//!   Slots       slots taken as tokens from a bitmap (a client's permits):
//!               `&mut Slot` is the slot's bytes, no `unsafe` for the holder
//!   Claims      chunks a peer names, claimed one holder at a time (a
//!               server's chunks): the claim is the chunk's bytes
//! ```
#![warn(missing_docs)]

mod pool;
mod region;
mod slots;
mod sync;

pub use pool::{Chunk, ChunkPool, Lease, PoolStats, Registrar};
pub use region::{huge_stats, set_hugepage_limit, HugeStats, Region, HUGE_PAGE};
pub use slots::{Claim, Claims, Slot, Slots};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every chunk is taken.
    #[error("the pool is exhausted: every chunk is in use")]
    Exhausted,
    /// A zero size was asked for.
    #[error("empty region or chunk size")]
    Empty,
    /// A size the system cannot provide.
    #[error("{0} bytes is more than can be mapped")]
    TooLarge(usize),
    /// The region holds no chunk, or too many.
    #[error("a region of {0} chunks is not usable (need 1 .. 2^32-1)")]
    BadChunkCount(usize),
    /// A chunk returned twice.
    #[error("chunk {0} returned twice")]
    DoubleFree(u32),
    /// A chunk index not of this pool.
    #[error("chunk {0} does not belong to this pool")]
    ForeignChunk(u32),
    /// Access outside a region.
    #[error("{len} bytes at offset {off} lie outside the region")]
    OutOfBounds {
        /// Offset.
        off: usize,
        /// Length.
        len: usize,
    },
    /// The caller's registration failed.
    #[error("registering the region failed: {0}")]
    Registration(String),
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl PoolError {
    pub(crate) fn os(what: &'static str) -> PoolError {
        PoolError::Os {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}
