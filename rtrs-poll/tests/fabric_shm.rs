//! The shm backend: the fabric conformance suite and the engine's end-to-end
//! suite.

mod common;

use common::soft::Shm;
use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::Address;

conformance_tests!(Shm);
engine_tests!(Shm);
multipath_tests!(Shm);
admission_tests!(Shm);

/// The child half of `another_user_is_refused`: connects to the listener
/// named in RTRS_SHM_UID_CHILD (as another user) and prints what it heard.
#[test]
fn shm_uid_child() {
    use rtrs_fabric::{Cm, CmEvent, Fabric, Pd, QpCap};
    let Ok(name) = std::env::var("RTRS_SHM_UID_CHILD") else {
        return;
    };
    let fab = ShmFabric::new();
    let pd = fab.alloc_pd().unwrap();
    let cq = pd.create_cq(16).unwrap();
    let qp = pd.create_qp(&cq, &cq, QpCap::default()).unwrap();
    let mut cm = fab.create_cm().unwrap();
    cm.connect(&Address::Shm(name), &qp, b"").unwrap();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(5) {
        if let Some(ev) = cm.poll_event(std::time::Duration::from_millis(10)).unwrap() {
            let kind = match ev {
                CmEvent::Established { .. } => "ESTABLISHED",
                _ => "NOT-ESTABLISHED",
            };
            println!("CHILD-SAW {kind}: {ev:?}");
            return;
        }
    }
    println!("CHILD-SAW NOT-ESTABLISHED: nothing");
}

/// Owner-only: a process of another user is refused at the shm listener
/// (an abstract socket has no file permissions; the CM checks
/// SO_PEERCRED) and counted; the listener's own user is served. Needs root
/// (to run the child as another user); skipped otherwise.
#[test]
fn another_user_is_refused() {
    use rtrs_fabric::{Cm, CmEvent, CmRefusal, Fabric};
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let a = <Shm as common::conformance::Backend>::addr();
    let Address::Shm(name) = &a else {
        unreachable!()
    };
    let fab = ShmFabric::new();
    let mut cm = fab.create_cm().unwrap();
    cm.listen(&a).unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shm_uid_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RTRS_SHM_UID_CHILD", name)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut refused = None;
    let t0 = std::time::Instant::now();
    while refused.is_none() && t0.elapsed() < std::time::Duration::from_secs(10) {
        match cm.poll_event(std::time::Duration::from_millis(10)).unwrap() {
            Some(CmEvent::Refused { why, detail, .. }) => refused = Some((why, detail)),
            Some(CmEvent::ConnectRequest { .. }) => panic!("another user's REQ got through"),
            _ => {}
        }
    }
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let (why, detail) = refused.expect("the listener reports the refusal");
    assert_eq!(why, CmRefusal::Access);
    assert!(detail.contains("uid 65534"), "{detail}");
    assert!(said.contains("CHILD-SAW NOT-ESTABLISHED"), "{said}");
}

/// Issue 12: idle connection polls read no clock (pollers::clock counts
/// reads: the `clock-count` feature, on for these tests).
#[test]
fn idle_polls_read_no_clock() {
    common::engine_suite::idle_polls_read_no_clock::<Shm>();
}

/// The region table (the shareable memories of a PD, which peers map): an
/// entry lives as long as an MR uses its memory (two MRs of one memory share
/// it; a re-key keeps it), then drops the table's hold on the memory and its
/// slot goes to the next new memory. A peer that mapped the slot before reads
/// the new memory through it, never the old; a request still naming the old
/// memory when the slot was reused is refused, not served from the new one.
#[test]
fn region_slots_are_freed_and_reused() {
    use common::conformance::{ok, Backend, Pair};
    use common::{mem, pattern, MemExt};
    use rtrs_fabric::soft::shm::ShmConfig;
    use rtrs_fabric::{Access, FabricError, Mr, Pd, Qp, QpCap, SendWr, WcOpcode, WcStatus};
    let fab = ShmFabric::with_config(ShmConfig {
        max_regions: 4,
        ..ShmConfig::default()
    });
    let (cap, len) = (QpCap::default(), 1 << 20);
    let mut p = Pair::connect_on(&fab, &fab, &Shm::addr(), cap, cap, len);
    let (raddr, rkey) = (p.b.mem.addr(0), p.b.mr.rkey());
    let base = p.a.pd.regions_in_use();
    assert_eq!(base, 1, "the side's own memory");
    let write = |p: &mut Pair<ShmFabric>, mr: &rtrs_fabric::soft::shm::ShmMr, id| {
        let sge = [mr.sge(0, 64)];
        p.a.qp
            .post_send(&SendWr::write(id, &sge, raddr, rkey))
            .unwrap();
    };

    // Memory A: two MRs share its entry; a re-key and one MR's drop keep it.
    let a = mem(4096);
    a.fill(0, &pattern(64, 1));
    let mr_a = p.a.pd.reg_mr(a.clone(), Access::LOCAL_WRITE).unwrap();
    let mr_a2 = p.a.pd.reg_mr(a.clone(), Access::LOCAL_WRITE).unwrap();
    let slot = mr_a.region_slot().expect("shareable memory has a region");
    assert_eq!(mr_a2.region_slot(), Some(slot));
    assert_eq!(p.a.pd.regions_in_use(), base + 1);
    mr_a.rekey().unwrap();
    drop(mr_a2);
    assert_eq!(p.a.pd.regions_in_use(), base + 1);
    write(&mut p, &mr_a, 1); // the peer maps slot `slot` (A)
    ok(&p.wait(1, 0).0[0], 1, WcOpcode::RdmaWrite);
    assert_eq!(p.b.mem.read_vec(0, 64), pattern(64, 1));
    let gone = std::sync::Arc::downgrade(&a);
    drop((mr_a, a));
    assert!(gone.upgrade().is_none(), "the table still holds A");
    assert_eq!(p.a.pd.regions_in_use(), base);

    // Memory B takes A's slot; the peer's mapping of A must not serve it.
    let b = mem(4096);
    b.fill(0, &pattern(64, 2));
    let mr_b = p.a.pd.reg_mr(b.clone(), Access::LOCAL_WRITE).unwrap();
    assert_eq!(mr_b.region_slot(), Some(slot), "the freed slot is reused");
    write(&mut p, &mr_b, 2);
    ok(&p.wait(1, 0).0[0], 2, WcOpcode::RdmaWrite);
    assert_eq!(
        p.b.mem.read_vec(0, 64),
        pattern(64, 2),
        "B's bytes, not A's"
    );

    // The table fills (and says so), and a freed slot serves again.
    let more: Vec<_> = (0..2).map(|_| mem(4096)).collect();
    let mrs: Vec<_> = more
        .iter()
        .map(|m| p.a.pd.reg_mr(m.clone(), Access::LOCAL_WRITE).unwrap())
        .collect();
    assert_eq!(p.a.pd.regions_in_use(), 4);
    let full = p.a.pd.reg_mr(mem(4096), Access::LOCAL_WRITE);
    assert!(matches!(full, Err(FabricError::TableFull(_))), "{full:?}");
    drop(mrs);
    for i in 0..100u64 {
        let m = mem(4096);
        let mr = p.a.pd.reg_mr(m, Access::LOCAL_WRITE).unwrap();
        assert!(p.a.pd.regions_in_use() <= base + 2, "cycle {i}");
        drop(mr);
    }
    assert_eq!(
        p.a.pd.regions_in_use(),
        base + 1,
        "B alone beside the side's"
    );

    // A request posted from B, B dropped and its slot reused before the peer
    // executes it: refused (the peer mapped B's slot already).
    write(&mut p, &mr_b, 3);
    drop((mr_b, b));
    let c = mem(4096);
    c.fill(0, &pattern(64, 3));
    let mr_c = p.a.pd.reg_mr(c.clone(), Access::LOCAL_WRITE).unwrap();
    assert_eq!(mr_c.region_slot(), Some(slot));
    let (w, _) = p.wait(1, 0);
    assert_eq!((w[0].wr_id, w[0].status), (3, WcStatus::RemOpErr), "{w:?}");
    assert_ne!(p.b.mem.read_vec(0, 64), pattern(64, 3), "served from C");
}

/// A registration the MR table refuses (full) after its memory got a region
/// entry gives the entry back.
#[test]
fn a_refused_registration_keeps_no_region() {
    use rtrs_fabric::{Access, Fabric, FabricError, Pd};
    let pd = ShmFabric::new().alloc_pd_sized(2).unwrap(); // room for one MR
    let _mr = pd.reg_mr(common::mem(4096), Access::LOCAL_WRITE).unwrap();
    let m = common::mem(4096);
    let gone = std::sync::Arc::downgrade(&m);
    let r = pd.reg_mr(m, Access::LOCAL_WRITE);
    assert!(matches!(r, Err(FabricError::TableFull(_))), "{r:?}");
    assert_eq!(pd.regions_in_use(), 1);
    assert!(gone.upgrade().is_none());
}

/// The bug the region table's freeing fixes, end to end: a server whose PD
/// has room for 8 shareable memories accepts many more connections than that
/// over its life (every reconnect is a new connection with a memory of its
/// own), and the client reconnects as often.
#[test]
fn reconnects_outnumber_the_region_table() {
    use common::conformance::Backend;
    use common::engine::{pattern, TestClient, TestServer};
    use rtrs_fabric::soft::shm::ShmConfig;
    use rtrs_poll::clt::CltConfig;
    use std::time::Duration;
    let small = ShmFabric::with_config(ShmConfig {
        max_regions: 8,
        ..ShmConfig::default()
    });
    let (a, b) = (Shm::addr(), Shm::addr());
    let cfg = common::engine_suite::cfg(true);
    let srv = TestServer::start(small.clone(), &[a.clone(), b.clone()], cfg, 1 << 20);
    let mut cc = CltConfig::new("clt-regions", vec![a, b]);
    cc.connect_timeout = Duration::from_secs(10);
    cc.reconnect.backoff = Duration::from_millis(1);
    let mut c = TestClient::open_with(&small, cc);
    let id = c.clt.paths()[0].id();
    for i in 0..24u64 {
        c.clt.disconnect_path(id).unwrap();
        // (A reconnect the server sees before it has reaped the old path is
        // refused as "path exists": not what this test is about.)
        let t0 = std::time::Instant::now();
        while srv.closed().len() <= i as usize {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "path {i} not reaped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        c.clt.reconnect_path(id).unwrap_or_else(|e| {
            panic!("reconnect {i}: {e} (server refusals {:?})", srv.refusals())
        });
        assert_eq!(
            c.write(i * 4096, &pattern(i, 4096)),
            0,
            "IO after reconnect {i}"
        );
    }
}
