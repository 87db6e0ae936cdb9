//! The software backends as the suites take them (shm, and tcp on loopback).

use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::soft::tcp::TcpFabric;
use rtrs_fabric::Address;
use std::sync::atomic::{AtomicU32, Ordering};

/// The shm backend: a fresh name per address.
pub struct Shm;

impl super::conformance::Backend for Shm {
    type F = ShmFabric;
    fn fabric() -> ShmFabric {
        ShmFabric::new()
    }
    fn addr() -> Address {
        static N: AtomicU32 = AtomicU32::new(0);
        Address::Shm(format!(
            "conf-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

/// The tcp backend on loopback: a free port per address.
pub struct Tcp;

impl super::conformance::Backend for Tcp {
    type F = TcpFabric;
    fn fabric() -> TcpFabric {
        TcpFabric::new()
    }
    fn addr() -> Address {
        super::tcp_addr()
    }
}
