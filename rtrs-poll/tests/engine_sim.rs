//! The engine's heartbeat, reconnect, failover and storm on virtual time
//! (`common::sim`): the kernel's own timings (5 s beats, 5 missed, 30 s
//! reconnect delay, 1 s backoff), every control stepped from this thread,
//! the fault fabric's clock moved with the world's. A minute of protocol
//! time takes milliseconds; nothing depends on the machine being idle, and
//! two runs of one scenario give the same timeline.

mod common;

use common::sim::{kernel_cfg, small_srv, Sim};
use rtrs_fabric::fault::{CmEventKind, Count, LinkFaults, Side};
use rtrs_fabric::Address;
use rtrs_poll::clt::{CltEvent, PathState};
use rtrs_poll::sess::DownReason;
use rtrs_poll::srv::SrvEvent;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

fn addr(tag: &str) -> Address {
    static N: AtomicU32 = AtomicU32::new(0);
    Address::Shm(format!(
        "sim-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

const S: Duration = Duration::from_secs(1);

/// What `from` sends on a link vanishes, and so do its disconnects: a cut
/// cable, or a hung host, seen from the other side.
fn silence(link: &LinkFaults, from: Side) {
    link.black_hole(from.sends());
    let to = match from {
        Side::Clt => Side::Srv,
        Side::Srv => Side::Clt,
    };
    link.lose_cm_events(to, CmEventKind::Disconnected, Count::UntilCleared);
}

fn cut(link: &LinkFaults) {
    silence(link, Side::Clt);
    silence(link, Side::Srv);
}

fn mend(link: &LinkFaults) {
    link.clear();
}

fn state(sim: &mut Sim, c: usize, path: usize) -> PathState {
    sim.client(c).clt.paths()[path].state()
}

#[test]
fn a_silent_server_is_declared_dead_on_the_kernels_schedule() {
    let mut sim = Sim::new();
    let a = addr("srv-silent");
    sim.add_server(std::slice::from_ref(&a), small_srv(), 1 << 20);
    let c = sim
        .open_client(kernel_cfg("sim-silent", vec![a.clone()]), 10 * S)
        .unwrap();
    // Some IO, then the server goes silent: no error, no event, nothing.
    sim.run_until(S, |s| s.write_io(c, 0, 4, 4096, 64).0 > 0);
    sim.run_for(2 * S);
    silence(&sim.faults.link(&a), Side::Srv);
    let t0 = sim.elapsed();
    let took = sim
        .run_until(60 * S, |s| state(s, c, 0) != PathState::Connected)
        .expect("declared dead within a minute");
    let why = sim.client(c).clt.paths()[0].last_reason();
    assert!(matches!(why, Some(DownReason::Heartbeat { .. })), "{why:?}");
    // The kernel's rule: dead on the 7th timer run after the last message
    // in: 30-35 s (its IO in flight was the last message at the latest).
    assert!(
        (30 * S..=36 * S).contains(&took),
        "declared dead {took:?} after going silent (at {t0:?})"
    );
}

#[test]
fn a_silent_client_is_declared_dead_by_the_server() {
    let mut sim = Sim::new();
    let a = addr("clt-silent");
    let srv = sim.add_server(std::slice::from_ref(&a), small_srv(), 1 << 20);
    let c = sim
        .open_client(kernel_cfg("sim-clt-silent", vec![a.clone()]), 10 * S)
        .unwrap();
    sim.run_for(S);
    silence(&sim.faults.link(&a), Side::Clt);
    let events = &sim.servers[srv].as_ref().unwrap().events;
    while events.try_recv().is_ok() {}
    let mut closed = None;
    let took = sim
        .run_until(60 * S, |s| {
            let ev = &s.servers[srv].as_ref().unwrap().events;
            for e in ev.try_iter() {
                if let SrvEvent::PathClosed(p) = e {
                    closed = Some(p);
                }
            }
            closed.is_some()
        })
        .expect("closed within a minute");
    let p = closed.unwrap();
    assert!(
        matches!(p.reason, DownReason::Heartbeat { .. }),
        "{:?}",
        p.reason
    );
    assert!((30 * S..=36 * S).contains(&took), "closed {took:?} after");
    let _ = c;
}

#[test]
fn a_mended_path_reconnects_on_the_kernels_schedule() {
    let mut sim = Sim::new();
    let a = addr("reconnect");
    sim.add_server(std::slice::from_ref(&a), small_srv(), 1 << 20);
    let c = sim
        .open_client(kernel_cfg("sim-reconnect", vec![a.clone()]), 10 * S)
        .unwrap();
    let link = sim.faults.link(&a);
    cut(&link);
    sim.run_until(60 * S, |s| state(s, c, 0) != PathState::Connected)
        .expect("declared dead");
    let events = sim.client(c).take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, CltEvent::PathDown { .. })),
        "{events:?}"
    );
    mend(&link);
    let took = sim
        .run_until(120 * S, |s| state(s, c, 0) == PathState::Connected)
        .expect("reconnected");
    // The delay (30 s) + 0-7 ms jitter, then the 1 s backoff: the first
    // attempt finds the link mended.
    assert!(
        (31 * S..31 * S + 200 * Duration::from_millis(1)).contains(&took),
        "reconnected {took:?} after the detection"
    );
    let events = sim.client(c).take_events();
    assert!(
        events.iter().any(|e| matches!(
            e,
            CltEvent::PathUp {
                reconnect: true,
                ..
            }
        )),
        "{events:?}"
    );
    // And it carries IO again, verified.
    let (mut ok, mut err) = (0, 0);
    let r = sim.run_until(5 * S, |s| {
        let (o, e) = s.write_io(c, 0, 8, 4096, 64);
        ok += o;
        err += e;
        ok >= 32
    });
    let inflight = sim.client(c).inflight.len();
    let st = state(&mut sim, c, 0);
    assert!(
        r.is_some(),
        "IO after the reconnect: {ok} ok, {err} failed, {inflight} in flight, path {st:?}"
    );
}

#[test]
fn a_cut_path_fails_over_with_every_io_once_and_comes_back() {
    let mut sim = Sim::new();
    let (a, b) = (addr("fo-a"), addr("fo-b"));
    sim.add_server(&[a.clone(), b.clone()], small_srv(), 1 << 20);
    let c = sim
        .open_client(
            kernel_cfg("sim-failover", vec![a.clone(), b.clone()]),
            10 * S,
        )
        .unwrap();
    let mut ok = 0u64;
    sim.run_until(2 * S, |s| {
        ok += s.write_io(c, 0, 8, 4096, 256).0;
        ok > 200
    })
    .expect("IO on both paths");
    let link = sim.faults.link(&a);
    cut(&link);
    // IO goes on over path 2 from the cut, the cut path's IO waits for the
    // detection and then moves over; nothing fails, nothing twice
    // (write_io panics on a second completion).
    let (mut during, mut errors) = (0u64, 0u64);
    let detected = sim
        .run_until(60 * S, |s| {
            let (o, e) = s.write_io(c, 0, 8, 4096, 256);
            during += o;
            errors += e;
            state(s, c, 0) != PathState::Connected
        })
        .expect("path 1 declared dead");
    assert!(
        (30 * S..=36 * S).contains(&detected),
        "detected after {detected:?}"
    );
    assert!(
        during > 1000,
        "IO went on over path 2 while path 1 was cut: {during}"
    );
    mend(&link);
    sim.run_until(120 * S, |s| {
        errors += s.write_io(c, 0, 8, 4096, 256).1;
        state(s, c, 0) == PathState::Connected
    })
    .expect("path 1 back");
    let before = sim.client(c).clt.paths()[0].stats().ios;
    sim.run_until(10 * S, |s| {
        errors += s.write_io(c, 0, 8, 4096, 256).1;
        s.client(c).clt.paths()[0].stats().ios > before + 100
    })
    .expect("path 1 carries IO again");
    assert_eq!(errors, 0, "no IO failed");
    let paths = sim.client(c).clt.paths();
    assert!(paths[0].stats().failovers > 0, "IO moved off the cut path");
    assert_eq!(
        paths[1].stats().hb_missed_peak,
        0,
        "the healthy path never missed a beat"
    );
}

/// A timeline: every client event with its virtual time (ms).
fn storm_timeline(sessions: usize, clients: usize) -> Vec<String> {
    let mut sim = Sim::new();
    let (a, b) = (addr("storm-a"), addr("storm-b"));
    let srv_cfg = rtrs_poll::srv::SrvConfig {
        limits: rtrs_poll::srv::Limits {
            max_sessions_per_host: sessions + 1,
            prealloc_sessions: 0,
            ..Default::default()
        },
        ..small_srv()
    };
    let srv = sim.add_server(&[a.clone(), b.clone()], srv_cfg.clone(), 4 << 20);
    // Sessions from several client processes: a fabric (CM, memory) each.
    let mut ids = Vec::new();
    for i in 0..sessions {
        let cfg = kernel_cfg(
            &format!("storm{}-{i}", i % clients),
            vec![a.clone(), b.clone()],
        );
        match sim.open_client(cfg, 10 * S) {
            Ok(c) => ids.push(c),
            Err(e) => {
                let ev = &sim.servers[srv].as_ref().unwrap().events;
                let seen: Vec<SrvEvent> = ev.try_iter().collect();
                panic!("session {i}: {e}; the server's events: {seen:#?}");
            }
        }
    }
    for &c in &ids {
        sim.run_until(S, |s| s.write_io(c, srv, 2, 4096, 8).0 > 0)
            .expect("IO");
    }
    let mut lines = Vec::new();
    // The server dies and comes back (a restart: a new process, nothing
    // of the old one left).
    sim.kill_server(srv);
    let killed = sim.elapsed();
    sim.run_for(5 * S);
    // What was in flight at the kill completed (its response was out
    // before the kill) or failed with -ECONNABORTED (no path left); no IO
    // is left hanging.
    for &c in &ids {
        let cl = sim.client(c);
        for d in std::mem::take(&mut cl.done) {
            assert!(
                d.errno == 0 || d.errno == -libc::ECONNABORTED,
                "tag {}: {}",
                d.tag,
                d.errno
            );
            cl.inflight.remove(&d.tag);
            cl.put(d.permit);
        }
        assert!(cl.inflight.is_empty(), "{:?} still in flight", cl.inflight);
    }
    let srv2 = sim.add_server(&[a.clone(), b.clone()], srv_cfg, 4 << 20);
    let all_back = sim
        .run_until(120 * S, |s| {
            let t = s.elapsed().as_micros();
            for &c in &ids {
                for e in s.client(c).take_events() {
                    lines.push(format!("+{t} us session {c}: {}", event_kind(&e)));
                }
            }
            ids.iter().all(|&c| {
                let p = s.client(c).clt.paths();
                p.iter().all(|p| p.state() == PathState::Connected)
            })
        })
        .expect("every session back");
    let back_after = sim.elapsed() - killed;
    // Within twice the reconnect delay of the kill, and none refused in a
    // loop.
    assert!(
        back_after <= 60 * S,
        "back {back_after:?} after the kill ({all_back:?} after the restart)"
    );
    let refused = sim.servers[srv2]
        .as_ref()
        .unwrap()
        .srv
        .as_ref()
        .unwrap()
        .counters()
        .refused_total();
    assert!(
        refused <= 2 * sessions as u64,
        "{refused} refusals for {sessions} sessions"
    );
    for &c in &ids {
        let (mut ok, mut err) = (0, 0);
        sim.run_until(5 * S, |s| {
            let (o, e) = s.write_io(c, srv2, 2, 4096, 8);
            ok += o;
            err += e;
            ok >= 8
        })
        .expect("verified IO after the restart");
        assert_eq!(err, 0);
    }
    lines.push(format!("all back at +{} ms", back_after.as_millis()));
    lines
}

/// An event without its addresses (which differ from run to run).
fn event_kind(e: &CltEvent) -> String {
    match e {
        CltEvent::PathUp {
            path, reconnect, ..
        } => format!("{path} up (reconnect {reconnect})"),
        CltEvent::PathDown { path, reason, .. } => format!("{path} down ({reason})"),
        CltEvent::PathClosed { path, reason, .. } => format!("{path} closed ({reason})"),
        CltEvent::PathRemoved { path, .. } => format!("{path} removed"),
        CltEvent::SessionLost => "session lost".into(),
        CltEvent::SessionReconnected => "session reconnected".into(),
    }
}

#[test]
fn a_reconnect_storm_brings_every_session_back() {
    let t = storm_timeline(64, 4);
    eprintln!("{}", t.last().unwrap());
}

#[test]
fn the_same_scenario_gives_the_same_timeline() {
    let one = storm_timeline(4, 2);
    let two = storm_timeline(4, 2);
    assert!(one.len() > 8, "{one:#?}");
    assert_eq!(one, two);
}

#[test]
fn a_hanging_connect_delays_no_heartbeat() {
    let mut sim = Sim::new();
    let (a, b) = (addr("hang-a"), addr("hang-b"));
    sim.add_server(&[a.clone(), b.clone()], small_srv(), 1 << 20);
    let mut cc = kernel_cfg("sim-hang", vec![a.clone(), b.clone()]);
    cc.connect_timeout = 2 * S;
    let c = sim.open_client(cc, 10 * S).unwrap();
    let id_b = sim.client(c).clt.paths()[1].id();
    let call = sim.client(c).clt.begin_disconnect_path(id_b).unwrap();
    sim.run_until(10 * S, |_| call.poll().is_some())
        .expect("disconnected");
    // Path b's connects never hear back: its round times out after 2 s,
    // while path a's heartbeats (5 s apart) go on for a minute.
    sim.faults
        .link(&b)
        .lose_cm_events(Side::Clt, CmEventKind::Established, Count::UntilCleared);
    let call = sim.client(c).clt.begin_reconnect_path(id_b).unwrap();
    let mut answer = None;
    let took = sim
        .run_until(10 * S, |_| {
            answer = call.poll();
            answer.is_some()
        })
        .expect("an answer");
    let e = answer.unwrap().unwrap_err();
    assert_eq!(e.errno(), -libc::ETIMEDOUT, "{e}");
    // The backoff (1 s), then the connect's 2 s.
    assert!(
        (3 * S..3 * S + 100 * Duration::from_millis(1)).contains(&took),
        "{took:?}"
    );
    assert!(matches!(
        sim.client(c).clt.paths()[1].last_reason(),
        Some(DownReason::Timeout {
            step: rtrs_poll::sess::Step::Connect,
            ..
        })
    ));
    sim.run_for(60 * S);
    let p = &sim.client(c).clt.paths()[0];
    assert_eq!(p.state(), PathState::Connected);
    assert_eq!(p.stats().hb_missed_peak, 0, "path a never missed a beat");
    sim.run_until(S, |s| s.write_io(c, 0, 1, 4096, 8).0 > 0)
        .expect("IO on path a");
}

#[test]
fn min_latency_steers_by_heartbeat_rtt() {
    let mut sim = Sim::new();
    let (a, b) = (addr("minlat-a"), addr("minlat-b"));
    sim.add_server(&[a.clone(), b.clone()], small_srv(), 1 << 20);
    let c = sim
        .open_client(kernel_cfg("sim-minlat", vec![a.clone(), b.clone()]), 10 * S)
        .unwrap();
    // Path a's answers come 30 ms late: its heartbeat RTT shows it, to
    // the millisecond on virtual time.
    sim.faults
        .link(&a)
        .delay(rtrs_fabric::fault::Dir::S2c, Duration::from_millis(30));
    // (The other path's RTT is the virtual network's: 0.)
    sim.run_until(20 * S, |s| {
        s.client(c).clt.paths()[0].latency() > Duration::ZERO
    })
    .expect("path a's RTT measured");
    sim.run_for(10 * S);
    let p = sim.client(c).clt.paths();
    let (slow, fast) = (p[0].latency(), p[1].latency());
    assert!(
        (Duration::from_millis(30)..Duration::from_millis(40)).contains(&slow),
        "{slow:?}"
    );
    assert!(fast < Duration::from_millis(10), "{fast:?}");
    sim.client(c)
        .clt
        .set_mp_policy(rtrs_poll::sess::mp_policy::MpPolicy::MinLatency);
    let before = p[0].stats().ios;
    let mut ok = 0;
    sim.run_until(5 * S, |s| {
        ok += s.write_io(c, 0, 4, 4096, 16).0;
        ok >= 64
    })
    .expect("IO");
    assert_eq!(
        sim.client(c).clt.paths()[0].stats().ios,
        before,
        "min-latency sent nothing to the slow path"
    );
}

#[test]
fn an_idle_session_lives_on_heartbeats() {
    let mut sim = Sim::new();
    let a = addr("idle");
    let srv = sim.add_server(std::slice::from_ref(&a), small_srv(), 1 << 20);
    let c = sim
        .open_client(kernel_cfg("sim-idle", vec![a]), 10 * S)
        .unwrap();
    sim.run_until(S, |s| s.write_io(c, 0, 1, 4096, 8).0 > 0)
        .expect("IO");
    // 40 heartbeat intervals with no IO: far past the 7 that kill a
    // silent path.
    sim.run_for(200 * S);
    let p = &sim.client(c).clt.paths()[0];
    assert_eq!(p.state(), PathState::Connected, "{:?}", p.last_reason());
    assert_eq!(p.stats().hb_missed_peak, 0, "every beat answered");
    let ev: Vec<SrvEvent> = sim.servers[srv]
        .as_ref()
        .unwrap()
        .events
        .try_iter()
        .collect();
    assert!(
        ev.iter().all(|e| !matches!(e, SrvEvent::PathClosed(_))),
        "{ev:?}"
    );
    sim.run_until(S, |s| s.write_io(c, 0, 1, 4096, 8).0 > 0)
        .expect("IO after the idle time");
}

/// One session whose paths have `cons` connections each, as the kernel's
/// client makes them on a host of `cons - 1` CPUs: verified IO reaches
/// every connection of both paths.
fn crowd(cons: u16) {
    let mut sim = Sim::new();
    let (a, b) = (addr("crowd-a"), addr("crowd-b"));
    let srv = sim.add_server(&[a.clone(), b.clone()], small_srv(), 1 << 20);
    let mut cc = kernel_cfg(&format!("sim-crowd{cons}"), vec![a, b]);
    cc.connections = Some(cons);
    let c = sim.open_client(cc, 30 * S).unwrap();
    let s = sim.servers[srv]
        .as_ref()
        .unwrap()
        .srv
        .as_ref()
        .unwrap()
        .paths();
    assert_eq!(s.len(), 2);
    for p in &s {
        assert_eq!(p.connections().0, cons, "connections of a path");
    }
    let every = |s: &[std::sync::Arc<rtrs_poll::srv::SrvPath<common::sim::SimFabric>>]| {
        s.iter()
            .all(|p| (1..cons).all(|cid| p.stats().con_totals(cid).writes > 0))
    };
    let mut err = 0;
    sim.run_until(60 * S, |x| {
        err += x.write_io(c, srv, 16, 4096, 32).1;
        every(&s)
    })
    .unwrap_or_else(|| panic!("IO on every connection of {cons}"));
    assert_eq!(err, 0);
}

#[test]
fn sessions_of_65_and_129_connections_per_path() {
    crowd(65);
    crowd(129);
}

#[test]
fn sixty_four_sessions_of_two_paths_at_once() {
    let mut sim = Sim::new();
    let (a, b) = (addr("crowd64-a"), addr("crowd64-b"));
    let cfg = rtrs_poll::srv::SrvConfig {
        limits: rtrs_poll::srv::Limits {
            max_sessions_per_host: 64,
            ..Default::default()
        },
        ..small_srv()
    };
    let srv = sim.add_server(&[a.clone(), b.clone()], cfg, 4 << 20);
    let ids: Vec<usize> = (0..64)
        .map(|i| {
            let cc = kernel_cfg(&format!("sim-crowd64-{i}"), vec![a.clone(), b.clone()]);
            sim.open_client(cc, 10 * S).unwrap()
        })
        .collect();
    let server = sim.servers[srv].as_ref().unwrap().srv.as_ref().unwrap();
    assert_eq!(server.counters().sessions().0, 64);
    assert_eq!(server.paths().len(), 128);
    for &c in &ids {
        let mut ok = 0;
        sim.run_until(5 * S, |x| {
            ok += x.write_io(c, srv, 4, 4096, 8).0;
            ok >= 16
        })
        .expect("verified IO on every session");
    }
}
