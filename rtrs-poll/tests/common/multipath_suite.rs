//! Runtime multipath, run against every backend by `multipath_tests!`:
//! paths added and removed on a live session, the session lost and back
//! (with RNBD re-opening its devices), reconnect attempts running out, a
//! server that comes back with another queue depth, and link events.

use super::conformance::Backend;
use super::engine::*;
use super::engine_suite::cfg;
use minstant::Instant;
use rtrs_fabric::Fabric;
use rtrs_poll::clt::{CltConfig, CltError, CltEvent, Events, PathState, ReconnectPolicy};
use rtrs_poll::sess::mp_policy::MpPolicy;
use rtrs_poll::sess::DownReason;
use std::time::Duration;

/// Waits up to 10 s for an event `want` accepts; returns every event seen.
pub fn wait_event(rx: &Events, want: impl Fn(&CltEvent) -> bool) -> Vec<CltEvent> {
    let mut seen = Vec::new();
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(10).saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(ev) => {
                let done = want(&ev);
                seen.push(ev);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("event never came; saw {seen:#?}"),
        }
    }
}

fn quick_reconnect(cc: &mut CltConfig) {
    cc.connect_timeout = Duration::from_secs(10);
    cc.reconnect = ReconnectPolicy {
        delay: Duration::from_millis(20),
        max_attempts: -1,
        backoff: Duration::from_millis(10),
    };
}

/// 32 verified writes at once; every one completes exactly once, with 0.
fn writes_all_ok<F: Fabric>(c: &mut TestClient<F>, base: u64) {
    for i in 0..32u64 {
        let mut p = c.core.get_permit().unwrap();
        let tag = base + i;
        c.core.buf(&mut p)[..4096].copy_from_slice(&pattern(tag, 4096));
        c.core
            .write(p, &usr(OP_IO, tag % 256 * 4096), 4096, tag, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
    }
    let done = c.wait(32);
    let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
    tags.sort();
    assert_eq!(tags, (base..base + 32).collect::<Vec<_>>(), "each once");
    assert!(done.iter().all(|d| d.errno == 0), "{done:?}");
    for d in done {
        c.core.put_permit(d.permit);
    }
}

pub fn add_and_remove_paths_at_runtime<B: Backend>() {
    let (a, b) = (B::addr(), B::addr());
    let srv = TestServer::start(B::fabric(), &[a.clone(), b.clone()], cfg(true), 1 << 20);
    let mut cc = CltConfig::new("clt-addpath", vec![a.clone()]);
    cc.mp_policy = MpPolicy::RoundRobin;
    quick_reconnect(&mut cc);
    let mut c = TestClient::open_with(&B::fabric(), cc);
    let events = c.clt.subscribe();
    let first = c.clt.paths()[0].id();
    // The same address twice: the kernel's EEXIST.
    let e = c.clt.add_path(a.clone()).unwrap_err();
    assert_eq!(e.errno(), -libc::EEXIST, "{e}");
    let second = c.clt.add_path(b.clone()).unwrap();
    assert_ne!(first, second);
    assert_eq!(c.clt.paths().len(), 2);
    assert!(matches!(
        events.recv_timeout(Duration::from_secs(5)).unwrap(),
        CltEvent::PathUp { path, reconnect: false, .. } if path == second
    ));
    // The core takes the new path's connection on its next poll.
    c.core.poll(Instant::now(), &mut |_| {});
    writes_all_ok(&mut c, 0);
    assert!(
        c.clt.path(second).unwrap().stats().ios > 0,
        "the added path carries IO"
    );
    // Removing a path with IO in flight: it all moves to the other.
    for i in 0..32u64 {
        let mut p = c.core.get_permit().unwrap();
        c.core.buf(&mut p)[..4096].copy_from_slice(&pattern(100 + i, 4096));
        c.core
            .write(p, &usr(OP_IO, i * 4096), 4096, 100 + i, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
    }
    c.clt.remove_path(first).unwrap();
    let done = c.wait(32);
    assert!(done.iter().all(|d| d.errno == 0), "{done:?}");
    for d in done {
        c.core.put_permit(d.permit);
    }
    assert_eq!(c.clt.paths().len(), 1);
    assert_eq!(c.clt.paths()[0].id(), second);
    let seen = wait_event(&events, |e| matches!(e, CltEvent::PathRemoved { .. }));
    assert!(
        seen.iter().any(
            |e| matches!(e, CltEvent::PathDown { path, reason: DownReason::Removed, .. } if *path == first)
        ),
        "{seen:#?}"
    );
    // The last path cannot be removed; an unknown one is not there.
    assert!(matches!(c.clt.remove_path(second), Err(CltError::LastPath)));
    assert_eq!(c.clt.remove_path(first).unwrap_err().errno(), -libc::ENOENT);
    writes_all_ok(&mut c, 200);
    // A path closed by the operator is removed at once.
    let again = c.clt.add_path(a.clone()).unwrap();
    c.clt.disconnect_path(again).unwrap();
    assert_eq!(c.clt.path(again).unwrap().state(), PathState::Closed);
    c.clt.remove_path(again).unwrap();
    assert!(c.clt.path(again).is_none());
    assert_eq!(c.clt.paths().len(), 1);
    let disk = srv.disk.lock().unwrap();
    for i in 0..32u64 {
        let at = ((200 + i) % 256 * 4096) as usize;
        assert!(disk[at..at + 4096] == pattern(200 + i, 4096)[..]);
    }
}

pub fn session_lost_and_back_reopens_rnbd_devices<B: Backend>() {
    use rtrs_poll::rnbd::{clt as rc, Export, RnbdClient, RnbdEvent};
    use rtrs_proto::rnbd::{AccessMode, RnbdOp};
    let a = B::addr();
    let scfg = cfg(true);
    let (_srv, rnbd) = TestServer::rnbd(
        B::fabric(),
        std::slice::from_ref(&a),
        scfg,
        vec![Export::ram("ram0", 1 << 20).unwrap()],
    );
    let mut cc = CltConfig::new("clt-lost", vec![a]);
    quick_reconnect(&mut cc);
    let mut c = TestClient::open_with(&B::fabric(), cc);
    let events = c.clt.subscribe();
    let mut rn = RnbdClient::new(&c.clt, c.core.submitter().unwrap());
    let spin = |core: &mut rtrs_poll::clt::CltCore<B::F>| {
        core.poll(Instant::now(), &mut |_| {});
    };
    let dev = rn
        .open("ram0", AccessMode::Rw, &mut || spin(&mut c.core))
        .unwrap();
    let old_id = dev.device_id();
    // Another session opens ram0 too, so the re-opened device gets a new id.
    let id = c.clt.paths()[0].id();
    c.clt.disconnect_path(id).unwrap();
    let seen = wait_event(&events, |e| *e == CltEvent::SessionLost);
    assert!(
        seen.iter().any(|e| matches!(
            e,
            CltEvent::PathDown {
                reason: DownReason::Operator,
                ..
            }
        )),
        "{seen:#?}"
    );
    assert_eq!(
        rn.poll(&mut || spin(&mut c.core)),
        [RnbdEvent::Lost],
        "the RNBD client saw the session go"
    );
    assert!(!dev.is_open());
    // New IO fails fast while no path is up.
    let p = c.core.get_permit().unwrap();
    let (p, e) = c
        .core
        .write(p, &usr(OP_IO, 0), 512, 0, Instant::now())
        .unwrap_err();
    assert_eq!(e.errno(), -libc::ECONNABORTED);
    c.core.put_permit(p);
    // The server ends the session with its last path: wait for that, so
    // the reconnect makes a new session there.
    let t0 = Instant::now();
    while rnbd.sessions() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "server kept it");
        std::thread::sleep(Duration::from_millis(2));
    }
    c.clt.reconnect_path(id).unwrap();
    wait_event(&events, |e| *e == CltEvent::SessionReconnected);
    // The RNBD client's own subscription gets it too (a moment later).
    let t0 = Instant::now();
    let evs = loop {
        let evs = rn.poll(&mut || spin(&mut c.core));
        if !evs.is_empty() || t0.elapsed() > Duration::from_secs(10) {
            break evs;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        matches!(&evs[..], [RnbdEvent::Reopened { name, old_id: o, .. }] if name == "ram0" && *o == old_id),
        "{evs:?}"
    );
    assert!(dev.is_open());
    // IO with the device's current id works.
    let data = pattern(5, 4096);
    let mut p = c.core.get_permit().unwrap();
    c.core.buf(&mut p)[..4096].copy_from_slice(&data);
    let h = rc::io_hdr(&dev, RnbdOp::Write, 8192, 4096, 0);
    c.core
        .write(p, &h, 4096, 1, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let d = c.wait(1).pop().unwrap();
    assert_eq!(d.errno, 0, "IO on the re-opened device");
    c.core.put_permit(d.permit);
    assert_eq!(rnbd.writers("ram0"), Some(1), "one writer: the new session");
}

pub fn reconnect_attempts_run_out<B: Backend>() {
    let a = B::addr();
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 16);
    let mut cc = CltConfig::new("clt-giveup", vec![a]);
    quick_reconnect(&mut cc);
    cc.reconnect.max_attempts = 2;
    let mut c = TestClient::open_with(&B::fabric(), cc);
    let events = c.clt.subscribe();
    assert_eq!(c.write(0, &[1; 512]), 0);
    drop(srv);
    let seen = wait_event(&events, |e| matches!(e, CltEvent::PathClosed { .. }));
    assert!(seen.contains(&CltEvent::SessionLost), "{seen:#?}");
    let p = &c.clt.paths()[0];
    assert_eq!(p.state(), PathState::Closed);
    assert_eq!(
        p.last_reason(),
        Some(DownReason::AttemptsExhausted { attempts: 2 })
    );
    assert_eq!(p.stats().failed_reconnects, 2);
    // Nothing hangs: new IO is refused at once.
    let pm = c.core.get_permit().unwrap();
    let (pm, e) = c
        .core
        .write(pm, &usr(OP_IO, 0), 16, 0, Instant::now())
        .unwrap_err();
    assert_eq!(e.errno(), -libc::ECONNABORTED);
    c.core.put_permit(pm);
    // The operator can change the budget at runtime and bring it back.
    c.clt
        .set_reconnect(ReconnectPolicy {
            max_attempts: -1,
            ..ReconnectPolicy::default()
        })
        .unwrap();
    let busy = c.clt.reconnect_path(p.id());
    assert!(busy.is_err(), "no server: the attempt fails: {busy:?}");
}

pub fn server_restart_reconnects_and_io_goes_on<B: Backend>() {
    let a = B::addr();
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 16);
    let mut cc = CltConfig::new("clt-restart", vec![a.clone()]);
    quick_reconnect(&mut cc);
    let mut c = TestClient::open_with(&B::fabric(), cc);
    let events = c.clt.subscribe();
    assert_eq!(c.write(0, &[1; 512]), 0);
    drop(srv);
    wait_event(&events, |e| *e == CltEvent::SessionLost);
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 16);
    let seen = wait_event(&events, |e| *e == CltEvent::SessionReconnected);
    assert!(
        seen.iter().any(|e| matches!(
            e,
            CltEvent::PathUp {
                reconnect: true,
                ..
            }
        )),
        "{seen:#?}"
    );
    c.core.poll(Instant::now(), &mut |_| {}); // takes the new connection
    assert_eq!(c.write(512, &[2; 512]), 0, "IO goes on");
    assert!(srv.disk.lock().unwrap()[512..1024].iter().all(|&b| b == 2));
    assert_eq!(c.clt.paths()[0].stats().reconnects, 1);
}

pub fn queue_depth_change_stops_reconnecting<B: Backend>() {
    let a = B::addr();
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 16);
    let mut cc = CltConfig::new("clt-qd", vec![a.clone()]);
    quick_reconnect(&mut cc);
    let c = TestClient::open_with(&B::fabric(), cc);
    let events = c.clt.subscribe();
    drop(srv);
    let mut other = cfg(true);
    other.queue_depth = 16;
    let _srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), other, 1 << 16);
    let seen = wait_event(&events, |e| matches!(e, CltEvent::PathClosed { .. }));
    assert!(
        matches!(
            seen.last(),
            Some(CltEvent::PathClosed {
                reason: DownReason::AttemptsExhausted { .. },
                ..
            })
        ),
        "{seen:#?}"
    );
    assert!(
        matches!(
            c.clt.paths()[0].stats().last_reason,
            Some(DownReason::AttemptsExhausted { .. })
        ),
        "closed for good"
    );
    let st = c.clt.paths()[0].stats();
    assert_eq!(st.downs, 1, "down once: the server went");
    assert!(st.failed_reconnects >= 1, "the qd change failed a round");
}

#[macro_export]
macro_rules! multipath_tests {
    ($backend:ty) => {
        mod multipath {
            use super::*;
            use $crate::common::multipath_suite as m;

            #[test]
            fn add_and_remove_paths_at_runtime() {
                m::add_and_remove_paths_at_runtime::<$backend>();
            }
            #[test]
            fn session_lost_and_back_reopens_rnbd_devices() {
                m::session_lost_and_back_reopens_rnbd_devices::<$backend>();
            }
            #[test]
            fn reconnect_attempts_run_out() {
                m::reconnect_attempts_run_out::<$backend>();
            }
            #[test]
            fn server_restart_reconnects_and_io_goes_on() {
                m::server_restart_reconnects_and_io_goes_on::<$backend>();
            }
            #[test]
            fn queue_depth_change_stops_reconnecting() {
                m::queue_depth_change_stops_reconnecting::<$backend>();
            }
        }
    };
}
