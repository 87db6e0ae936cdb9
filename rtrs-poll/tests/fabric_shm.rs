//! The shm backend: the fabric conformance suite and the engine's end-to-end
//! suite.

mod common;

use common::soft::Shm;
use rtrs_poll::fabric::soft::shm::ShmFabric;
use rtrs_poll::fabric::Address;

conformance_tests!(Shm);
engine_tests!(Shm);
multipath_tests!(Shm);
admission_tests!(Shm);

/// The child half of `another_user_is_refused`: connects to the listener
/// named in RTRS_SHM_UID_CHILD (as another user) and prints what it heard.
#[test]
fn shm_uid_child() {
    use rtrs_poll::fabric::{Cm, CmEvent, Fabric, Pd, QpCap};
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
    use rtrs_poll::fabric::{Cm, CmEvent, CmRefusal, Fabric};
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
