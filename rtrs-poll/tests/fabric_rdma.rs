//! The fabric conformance suite and the engine's end-to-end suite over real
//! verbs (feature `rdma`). Addresses are `rdma:10.0.2.15:PORT`, the guest
//! address of the project's VM (`scripts/vm.sh`; `scripts/vm-rdma-tests.sh`
//! runs this binary there) with soft-RoCE on eth0;
//! set `RTRS_RDMA_HOST` to use another local address of an RDMA device. On a
//! host without an RDMA device every test prints "no RDMA device: skipped"
//! and passes.
#![cfg(feature = "rdma")]

mod common;

use rtrs_fabric::rdma::RdmaFabric;
use rtrs_fabric::Address;
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
    fn rekey_keeps_index() -> bool {
        // A memory window keeps its index; a new registration does not.
        rtrs_fabric::rdma::memory_windows()
    }
    fn skip_reason() -> Option<String> {
        (!rtrs_fabric::rdma::available()).then(|| "no RDMA device".to_string())
    }
}

conformance_tests!(Rdma);
engine_tests!(Rdma);

/// The census (`fabric::live`): every verbs object counted while it lives.
/// Process-wide counts: this binary runs with --test-threads=1 in the VM
/// (scripts/vm-rdma-tests.sh), so no other test's objects show.
mod census {
    use super::Rdma;
    use crate::common::census_suite as s;

    #[test]
    fn census_objects_are_counted_while_they_live() {
        s::objects_are_counted_while_they_live::<Rdma>();
    }

    #[test]
    fn census_a_session_and_its_server_leave_nothing() {
        s::a_session_and_its_server_leave_nothing::<Rdma>();
    }
}

/// What this backend does beyond the suite (see `rtrs_fabric::rdma`):
/// a LOCAL_INV after a re-key, and a peer's SEND_WITH_INV of a key that is
/// not a type-2 window (an ordinary MR's), which the device refuses.
mod rdma_specific {
    use super::Rdma;
    use crate::common::conformance::{self as c, Backend, Pair};
    use rtrs_fabric::{Mr, Qp, QpState, SendWr, WcOpcode};

    #[test]
    fn rekey_then_local_invalidate() {
        if c::skip::<Rdma>() {
            return;
        }
        let mut p = Pair::<<Rdma as Backend>::F>::connect::<Rdma>();
        let old = p.b.mr.rkey();
        let new = p.b.mr.rekey().unwrap();
        assert_ne!(old, new);
        let sge = [p.a.sge(0, 8)];
        let raddr = p.b.mr.addr();
        p.a.qp
            .post_send(&SendWr::write(1, &sge, raddr, new))
            .unwrap();
        let (a, _) = p.wait(1, 0);
        c::ok(&a[0], 1, WcOpcode::RdmaWrite);
        p.b.qp.post_send(&SendWr::local_inv(5, new)).unwrap();
        let (_, b) = p.wait(0, 1);
        c::ok(&b[0], 5, WcOpcode::LocalInv);
        assert_eq!(p.b.mr.rkey(), 0);
        let wr = SendWr::write(2, &sge, raddr, new);
        c::expect_access_error(&mut p, wr);
    }

    #[test]
    fn send_with_invalidate_of_a_user_mr_is_refused() {
        if c::skip::<Rdma>() {
            return;
        }
        use rtrs_fabric::WcStatus;
        let mut p = Pair::<<Rdma as Backend>::F>::connect::<Rdma>();
        let key = p.b.mr.rkey();
        p.b.post_recv(3, 0, 64);
        p.a.qp
            .post_send(&SendWr::send_with_inv(1, &[], key))
            .unwrap();
        // Devices invalidate only fast-registered MRs and memory windows
        // remotely. Soft-RoCE (6.1) acknowledges the SEND, fails the
        // receive and moves the receiver's QP to error; the key stays.
        let (_, b) = p.wait(1, 1);
        assert_ne!(b[0].status, WcStatus::Success);
        assert!(!b[0].with_inv);
        assert_eq!(p.b.mr.rkey(), key);
        assert_eq!(p.b.qp.state(), QpState::Error);
        let _ = WcOpcode::Send;
    }
}
