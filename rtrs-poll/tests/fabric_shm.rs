//! The shm backend: the fabric conformance suite and the engine's end-to-end
//! suite.

mod common;

use rtrs_poll::fabric::soft::shm::ShmFabric;
use rtrs_poll::fabric::Address;
use std::sync::atomic::{AtomicU32, Ordering};

struct Shm;

impl common::conformance::Backend for Shm {
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

conformance_tests!(Shm);
engine_tests!(Shm);
multipath_tests!(Shm);
admission_tests!(Shm);
