//! mempool: hugepage regions carved into fixed-size chunks.
#![warn(missing_docs)]
