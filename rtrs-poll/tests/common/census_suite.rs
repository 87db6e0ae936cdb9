//! The census contract (`rtrs_fabric::live`): a backend counts every
//! object it makes and frees, so a create/drop cycle, and a whole session
//! with its server, return the process's counts to where they were.
//!
//! The counts are process-wide: these tests must run alone in their
//! process (`--test-threads=1`, or a test binary of their own), or another
//! test's objects show in them.

use super::conformance::{skip, Backend, Pair};
use super::engine::{pattern, TestClient, TestServer};
use rtrs_fabric::live::{counts, Kind, LiveCounts};
use rtrs_fabric::{Access, Cq, Fabric, Pd, QpCap, Wc};
use rtrs_poll::srv::SrvConfig;
use std::time::{Duration, Instant};

/// Counts of `kind` beyond `base` now.
fn more(base: &LiveCounts, kind: Kind) -> i64 {
    counts().since(base).get(kind)
}

/// Waits up to 5 s for the counts to be `base` again (a connection's last
/// objects may go on its CM's or the server's control thread a little
/// after the handle that held them).
fn back_to(base: &LiveCounts, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while counts() != *base && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        counts().since(base).nonzero(),
        vec![],
        "{what}: objects left behind"
    );
}

/// The counts once they stopped moving for 300 ms (at most 5 s): a closed
/// session's objects go on control threads a little after it closed.
fn settled() -> LiveCounts {
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut last, mut since) = (counts(), Instant::now());
    while Instant::now() < deadline && since.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(10));
        let now = counts();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// A PD, an MR with remote access, a CQ and a QP made and dropped one by
/// one: each counted while it lives.
pub fn objects_are_counted_while_they_live<B: Backend>() {
    if skip::<B>() {
        return;
    }
    let fab = B::fabric();
    let base = counts();
    let pd = fab.alloc_pd().unwrap();
    assert_eq!(more(&base, Kind::Pd), 1, "a PD");
    let mem = super::mem(1 << 20);
    let mr = pd
        .reg_mr(mem.clone(), Access::LOCAL_WRITE | Access::REMOTE_WRITE)
        .unwrap();
    assert!(
        more(&base, Kind::Mr) >= 1,
        "an MR: {:?}",
        counts().since(&base)
    );
    // (rdma: the MR's window was bound by a binder of the PD, a QP and a
    // CQ of its own: at least one more of each.)
    let cq = pd.create_cq(64).unwrap();
    assert!(more(&base, Kind::Cq) >= 1, "a CQ");
    let qp = pd.create_qp(&cq, &cq, QpCap::default()).unwrap();
    assert!(more(&base, Kind::Qp) >= 1, "a QP");
    drop(qp);
    drop(cq);
    drop(mr);
    drop(pd);
    drop(mem);
    back_to(&base, "PD, MR, CQ and QP dropped");
    // A connected pair (CMs, QPs, a write) comes and goes the same way.
    let mut p = Pair::<B::F>::connect::<B>();
    let mut wcs = [Wc::default(); 8];
    let _ = p.a.cq.poll(&mut wcs);
    assert!(more(&base, Kind::Qp) >= 2 && more(&base, Kind::Mr) >= 2);
    drop(p);
    back_to(&base, "a connected pair dropped");
}

/// A server and a client session of two paths with IO, closed and
/// stopped: nothing of either is left.
pub fn a_session_and_its_server_leave_nothing<B: Backend>() {
    if skip::<B>() {
        return;
    }
    let base = counts();
    let addrs = vec![B::addr(), B::addr()];
    let srv = TestServer::start(
        B::fabric(),
        &addrs,
        SrvConfig {
            queue_depth: 16,
            ..SrvConfig::default()
        },
        1 << 20,
    );
    // What the server keeps once it served a session (rdma: a binder QP
    // and CQ on its PD for each thread that re-keyed) is the baseline.
    let mut served = None;
    for round in 0..3 {
        let mut c = TestClient::open(&B::fabric(), addrs.clone(), &format!("census{round}"));
        let up = counts().since(served.as_ref().unwrap_or(&base));
        assert!(
            up.get(Kind::Qp) >= 4 && up.get(Kind::Mr) > 0,
            "a session of two paths holds QPs and MRs: {up:?}"
        );
        let data = pattern(round, 4096);
        assert_eq!(c.write(4096 * round, &data), 0);
        assert_eq!(c.read(4096 * round, 4096), (0, data));
        c.clt.close();
        drop(c.core);
        // The server lets go of the session's paths once it sees them close.
        let deadline = Instant::now() + Duration::from_secs(5);
        while srv.sessions().0 > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        match &served {
            None => served = Some(settled()),
            Some(b) => back_to(b, "a session closed"),
        }
    }
    srv.stop();
    back_to(&base, "the server stopped");
}
