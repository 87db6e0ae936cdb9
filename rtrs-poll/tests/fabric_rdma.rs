//! The fabric conformance suite and the engine's end-to-end suite over real
//! verbs (feature `rdma`). Addresses are `rdma:10.0.2.15:PORT`, the guest
//! address of `/work/shared/tools/kernel-peer-vm.sh` with soft-RoCE on eth0;
//! set `RTRS_RDMA_HOST` to use another local address of an RDMA device. On a
//! host without an RDMA device every test prints "no RDMA device: skipped"
//! and passes.
#![cfg(feature = "rdma")]

mod common;

use rtrs_poll::fabric::rdma::RdmaFabric;
use rtrs_poll::fabric::Address;
use std::sync::atomic::{AtomicU32, Ordering};

/// Ports for this process: a block of 64 chosen by pid (the echo and server
/// children pick their own, from the address they are given).
fn port() -> u16 {
    static N: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 300) * 64;
    (base + N.fetch_add(1, Ordering::Relaxed) % 64) as u16
}

struct Rdma;

impl common::conformance::Backend for Rdma {
    type F = RdmaFabric;
    fn fabric() -> RdmaFabric {
        RdmaFabric::new().unwrap()
    }
    fn addr() -> Address {
        Address::Rdma {
            host: std::env::var("RTRS_RDMA_HOST").unwrap_or_else(|_| "10.0.2.15".into()),
            port: port(),
        }
    }
    fn skip_reason() -> Option<String> {
        (!rtrs_poll::fabric::rdma::available()).then(|| "no RDMA device".to_string())
    }
}

conformance_tests!(Rdma);
engine_tests!(Rdma);
