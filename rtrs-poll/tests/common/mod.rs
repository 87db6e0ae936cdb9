//! Shared by the integration tests: memory for registrations, and the fabric
//! conformance suite every backend runs.
#![allow(dead_code)]

pub mod admission_suite;
pub mod census_suite;
pub mod conformance;
pub mod engine;
pub mod engine_suite;
pub mod fault_suite;
pub mod multipath_suite;
pub mod sim;
pub mod soft;

use rtrs_fabric::{Address, Memory};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Test memory: the library's shareable memory, with helpers.
pub type TestMem = dyn Memory;

/// `len` bytes of shareable memory.
pub fn mem(len: usize) -> Arc<TestMem> {
    rtrs_fabric::memory::shareable(len.max(1)).unwrap()
}

/// Test helpers on memory.
pub trait MemExt {
    /// Copies `data` in at `off`.
    fn fill(&self, off: usize, data: &[u8]);
    /// Copies `len` bytes out from `off`.
    fn read_vec(&self, off: usize, len: usize) -> Vec<u8>;
    /// The virtual address of byte `off`.
    fn addr(&self, off: usize) -> u64;
}

impl MemExt for TestMem {
    fn fill(&self, off: usize, data: &[u8]) {
        self.write(off, data).unwrap();
    }
    fn read_vec(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(off, &mut v).unwrap();
        v
    }
    fn addr(&self, off: usize) -> u64 {
        self.as_ptr() as u64 + off as u64
    }
}

/// A deterministic pattern, different for every seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A loopback tcp address on a port of this process: a block of 64 below the
/// kernel's ephemeral range (32768..), chosen by pid so parallel test
/// binaries rarely meet; a port something else already holds is skipped.
pub fn tcp_addr() -> Address {
    static N: AtomicU32 = AtomicU32::new(0);
    let base = 12_000 + (std::process::id() % 300) * 64;
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let port = (base + n % 64) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            };
        }
        assert!(n < 1024, "no free tcp port near {base}");
    }
}
