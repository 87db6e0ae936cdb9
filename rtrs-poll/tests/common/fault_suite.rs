//! The engine under link faults (the `fabric::fault` wrapper over a
//! backend), run by `fault_engine_tests!(Wrapped)`: silent peers found by
//! their heartbeats on the kernel's schedule, a path cut mid-IO failing over
//! with every IO completed exactly once while the other path never misses a
//! beat, the path back when the cut is mended, a connect that hangs without
//! delaying anyone's heartbeat, completion errors and killed QPs as typed
//! reasons.

use super::engine::*;
use super::engine_suite::cfg;
use super::multipath_suite::wait_event;
use minstant::Instant;
use rtrs_poll::clt::{CltConfig, CltEvent, PathState, ReconnectPolicy};
use rtrs_poll::fabric::fault::{CmEventKind, Count, Dir, FaultFabric, Faults, Side};
use rtrs_poll::fabric::{Address, Fabric, WcStatus};
use rtrs_poll::sess::mp_policy::MpPolicy;
use rtrs_poll::sess::{DownReason, Step};
use rtrs_poll::srv::SrvConfig;
use std::time::Duration;

/// A backend the fault wrapper wraps.
pub trait Wrapped: 'static {
    /// The backend.
    type Inner: Fabric;
    /// A fresh one.
    fn inner() -> Self::Inner;
    /// A fresh address.
    fn addr() -> Address;
}

type FF<W> = FaultFabric<<W as Wrapped>::Inner>;

/// The heartbeat of these tests: fast, the kernel's missed count.
const HB: Duration = Duration::from_millis(20);

fn srv_cfg() -> SrvConfig {
    SrvConfig {
        hb_interval: HB,
        ..cfg(true)
    }
}

fn clt_cfg(name: &str, paths: Vec<Address>) -> CltConfig {
    let mut cc = CltConfig::new(name, paths);
    cc.hb_interval = HB;
    cc.connect_timeout = Duration::from_secs(10);
    cc.mp_policy = MpPolicy::RoundRobin;
    cc.reconnect = ReconnectPolicy {
        delay: Duration::from_millis(50),
        max_attempts: -1,
        backoff: Duration::from_millis(10),
    };
    cc
}

/// A server on `addrs` and a client on them, each with its own fabric over
/// one `Faults`.
fn pair<W: Wrapped>(
    faults: &Faults,
    addrs: &[Address],
    name: &str,
) -> (TestServer, TestClient<FF<W>>) {
    pair_with::<W>(faults, addrs, srv_cfg(), clt_cfg(name, addrs.to_vec()))
}

fn pair_with<W: Wrapped>(
    faults: &Faults,
    addrs: &[Address],
    scfg: SrvConfig,
    cc: CltConfig,
) -> (TestServer, TestClient<FF<W>>) {
    let srv = TestServer::start(
        FaultFabric::new(W::inner(), faults.clone()),
        addrs,
        scfg,
        1 << 20,
    );
    let c = TestClient::open_with(&FaultFabric::new(W::inner(), faults.clone()), cc);
    (srv, c)
}

/// Silences what `from` sends on a link, as a cut cable or a hung host
/// would: its work requests vanish and so do its CM disconnects, so the
/// other side can only find out by its heartbeat.
fn silence(link: &rtrs_poll::fabric::fault::LinkFaults, from: Side) {
    link.black_hole(from.sends());
    let to = match from {
        Side::Clt => Side::Srv,
        Side::Srv => Side::Clt,
    };
    link.lose_cm_events(to, CmEventKind::Disconnected, Count::UntilCleared);
}

/// Cuts a link both ways.
fn cut_link(link: &rtrs_poll::fabric::fault::LinkFaults) {
    silence(link, Side::Clt);
    silence(link, Side::Srv);
}

/// Polls the client's core until `done` or 10 s.
fn poll_until<F: Fabric>(
    c: &mut TestClient<F>,
    what: &str,
    mut done: impl FnMut(&TestClient<F>) -> bool,
) {
    let t0 = Instant::now();
    while !done(c) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        c.core.poll(Instant::now(), &mut |_| {});
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn silent_server_is_declared_dead<W: Wrapped>() {
    let faults = Faults::new();
    let a = W::addr();
    let (srv, mut c) = pair::<W>(&faults, std::slice::from_ref(&a), "clt-silent-srv");
    assert_eq!(c.write(0, &[5; 512]), 0);
    // The server goes silent: no error, no event, nothing.
    silence(&faults.link(&a), Side::Srv);
    let t0 = Instant::now();
    poll_until(&mut c, "declared dead", |c| {
        c.clt.paths()[0].state() != PathState::Connected
    });
    let why = c.clt.paths()[0].last_reason();
    assert!(matches!(why, Some(DownReason::Heartbeat { .. })), "{why:?}");
    // The kernel's timing: dead on the 7th timer run after the last message.
    assert!(
        t0.elapsed() >= HB * 5,
        "declared dead too early: {:?}",
        t0.elapsed()
    );
    drop(c);
    drop(srv);
}

pub fn silent_client_is_declared_dead<W: Wrapped>() {
    let faults = Faults::new();
    let a = W::addr();
    // The client's own beats are slower: it must not find the silence
    // first (its teardown would reach the server through the backend).
    let mut cc = clt_cfg("clt-silent", vec![a.clone()]);
    cc.hb_interval = HB * 4;
    let (srv, mut c) = pair_with::<W>(&faults, std::slice::from_ref(&a), srv_cfg(), cc);
    assert_eq!(c.write(0, &[5; 512]), 0);
    silence(&faults.link(&a), Side::Clt);
    let t0 = Instant::now();
    loop {
        c.core.poll(Instant::now(), &mut |_| {});
        let closed = srv.closed();
        if closed
            .iter()
            .any(|p| matches!(p.reason, DownReason::Heartbeat { .. }))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the server kept the silent path: {closed:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(t0.elapsed() >= HB * 5, "declared dead too early");
}

pub fn cut_path_fails_over_and_comes_back<W: Wrapped>() {
    let faults = Faults::new();
    let (a, b) = (W::addr(), W::addr());
    // The server's beats are slower, so the client finds the cut first
    // (what the server then sees of the client's teardown leaks through
    // the backend, which a real cut would not carry).
    let scfg = SrvConfig {
        hb_interval: HB * 4,
        ..srv_cfg()
    };
    let addrs = [a.clone(), b];
    let (srv, mut c) = pair_with::<W>(&faults, &addrs, scfg, clt_cfg("clt-cut", addrs.to_vec()));
    let events = c.clt.subscribe();
    // Path 0 is cut both ways, then 32 writes go out round-robin: half of
    // them into the cut, where they wait for the heartbeat to find it.
    let cut = faults.link(&a);
    cut_link(&cut);
    for i in 0..32u64 {
        c.submit_write(i, i * 4096);
    }
    let done = c.wait(32);
    let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
    tags.sort();
    assert_eq!(tags, (0..32).collect::<Vec<_>>(), "every IO exactly once");
    assert!(done.iter().all(|d| d.errno == 0), "no IO lost: {done:?}");
    for d in done {
        c.core.put_permit(d.permit);
    }
    let paths = c.clt.paths();
    let why = paths[0].last_reason();
    assert!(matches!(why, Some(DownReason::Heartbeat { .. })), "{why:?}");
    assert!(paths[0].stats().failovers > 0, "IO moved off the cut path");
    assert_eq!(paths[1].state(), PathState::Connected);
    assert_eq!(
        paths[1].stats().hb_missed_peak,
        0,
        "the healthy path never missed a beat (last RTT {:?})",
        paths[1].latency()
    );
    let disk = srv.disk.lock().unwrap().clone();
    for i in 0..32u64 {
        let at = (i * 4096) as usize;
        assert!(disk[at..at + 4096] == pattern(i, 4096)[..], "block {i}");
    }
    // Mended: the path reconnects on its schedule and takes IO again.
    cut.clear();
    wait_event(&events, |e| {
        matches!(
            e,
            CltEvent::PathUp {
                reconnect: true,
                ..
            }
        )
    });
    c.core.poll(Instant::now(), &mut |_| {});
    let before = paths[0].stats().ios;
    for i in 0..8u64 {
        assert_eq!(c.write(i * 4096, &pattern(100 + i, 4096)), 0);
    }
    assert!(paths[0].stats().ios > before, "the mended path carries IO");
    // The server closed only the cut path, once.
    let closed = srv.closed();
    assert_eq!(closed.len(), 1, "{closed:?}");
}

pub fn a_hanging_connect_delays_no_heartbeat<W: Wrapped>() {
    let faults = Faults::new();
    let (a, b) = (W::addr(), W::addr());
    let mut cc = clt_cfg("clt-hang", vec![a.clone(), b.clone()]);
    cc.connect_timeout = Duration::from_secs(1);
    // Beats every 100 ms: a miss means an answer later than that, not the
    // control threads' 10 ms tick on a loaded test machine.
    cc.hb_interval = Duration::from_millis(100);
    let (srv, mut c) = pair_with::<W>(&faults, &[a, b.clone()], srv_cfg(), cc);
    let id_b = c.clt.paths()[1].id();
    c.clt.disconnect_path(id_b).unwrap();
    // Path b's connects never hear back; its round times out after 1 s.
    faults
        .link(&b)
        .lose_cm_events(Side::Clt, CmEventKind::Established, Count::UntilCleared);
    let t0 = Instant::now();
    let r = std::thread::scope(|s| {
        let clt = &c.clt;
        let h = s.spawn(move || clt.reconnect_path(id_b));
        // Meanwhile path a's heartbeats go on (10 intervals of them).
        while !h.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().unwrap()
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "the round took {:?}",
        t0.elapsed()
    );
    let e = r.unwrap_err();
    assert_eq!(e.errno(), -libc::ETIMEDOUT, "{e}");
    let p = &c.clt.paths()[0];
    assert_eq!(p.state(), PathState::Connected);
    assert_eq!(
        p.stats().hb_missed_peak,
        0,
        "path a never missed a beat while b hung"
    );
    assert!(
        srv.closed()
            .iter()
            .all(|x| !matches!(x.reason, DownReason::Heartbeat { .. })),
        "the server closed no path on heartbeats: {:?}",
        srv.closed()
    );
    assert_eq!(c.write(0, &[7; 512]), 0);
    // The round timed out at INFO or a connect, as a typed reason.
    assert!(matches!(
        c.clt.paths()[1].last_reason(),
        Some(DownReason::Timeout {
            step: Step::Connect,
            ..
        })
    ));
}

pub fn completion_errors_and_killed_qps_are_typed<W: Wrapped>() {
    let faults = Faults::new();
    let (a, b) = (W::addr(), W::addr());
    let (_srv, mut c) = pair::<W>(&faults, &[a.clone(), b.clone()], "clt-wcerr");
    let events = c.clt.subscribe();
    let (id_a, id_b) = (c.clt.paths()[0].id(), c.clt.paths()[1].id());
    // The next send on path a fails with a remote access error.
    faults
        .link(&a)
        .fail(Dir::C2s, WcStatus::RemAccessErr, Count::Next(1));
    for i in 0..8u64 {
        assert_eq!(c.write(i * 512, &[i as u8; 512]), 0, "write {i}");
    }
    let seen = wait_event(
        &events,
        |e| matches!(e, CltEvent::PathDown { path, .. } if *path == id_a),
    );
    assert!(
        matches!(
            seen.last(),
            Some(CltEvent::PathDown {
                reason: DownReason::Completion {
                    status: WcStatus::RemAccessErr,
                    ..
                },
                ..
            })
        ),
        "{seen:#?}"
    );
    wait_event(
        &events,
        |e| matches!(e, CltEvent::PathUp { path, .. } if *path == id_a),
    );
    c.core.poll(Instant::now(), &mut |_| {});
    // Killing the client's QPs of path b: flushed, typed, the IO goes on
    // over a.
    let lb = faults.link(&b);
    for qp in lb.qp_nums(Side::Clt) {
        lb.kill_qp(Side::Clt, qp);
    }
    for i in 0..8u64 {
        assert_eq!(
            c.write(i * 512, &[i as u8; 512]),
            0,
            "write {i} after the kill"
        );
    }
    let seen = wait_event(
        &events,
        |e| matches!(e, CltEvent::PathDown { path, .. } if *path == id_b),
    );
    assert!(
        matches!(
            seen.last(),
            Some(CltEvent::PathDown {
                reason: DownReason::Completion {
                    status: WcStatus::WrFlushErr,
                    ..
                },
                ..
            })
        ),
        "{seen:#?}"
    );
}

pub fn min_latency_steers_by_heartbeat_rtt<W: Wrapped>() {
    let faults = Faults::new();
    let (a, b) = (W::addr(), W::addr());
    let mut cc = clt_cfg("clt-minlat", vec![a.clone(), b.clone()]);
    cc.hb_interval = Duration::from_millis(50);
    let (_srv, mut c) = pair_with::<W>(&faults, &[a.clone(), b], srv_cfg(), cc);
    // Path a's answers come 30 ms late: its heartbeat RTT shows it.
    faults.link(&a).delay(Dir::S2c, Duration::from_millis(30));
    poll_until(&mut c, "both RTTs measured", |c| {
        let p = c.clt.paths();
        p[0].latency() >= Duration::from_millis(30) && p[1].latency() > Duration::ZERO
    });
    let (slow, fast) = (c.clt.paths()[0].latency(), c.clt.paths()[1].latency());
    assert!(fast < slow, "a {slow:?}, b {fast:?}");
    c.clt.set_mp_policy(MpPolicy::MinLatency);
    let before = c.clt.paths()[0].stats().ios;
    for i in 0..32u64 {
        assert_eq!(c.write(i * 512, &[i as u8; 512]), 0);
    }
    assert_eq!(
        c.clt.paths()[0].stats().ios,
        before,
        "min-latency sent nothing to the slow path (a {slow:?}, b {fast:?})"
    );
}

#[macro_export]
macro_rules! fault_engine_tests {
    ($module:ident, $wrapped:ty) => {
        mod $module {
            use super::*;
            use $crate::common::fault_suite as f;

            #[test]
            fn silent_server_is_declared_dead() {
                f::silent_server_is_declared_dead::<$wrapped>();
            }
            #[test]
            fn silent_client_is_declared_dead() {
                f::silent_client_is_declared_dead::<$wrapped>();
            }
            #[test]
            fn cut_path_fails_over_and_comes_back() {
                f::cut_path_fails_over_and_comes_back::<$wrapped>();
            }
            #[test]
            fn a_hanging_connect_delays_no_heartbeat() {
                f::a_hanging_connect_delays_no_heartbeat::<$wrapped>();
            }
            #[test]
            fn completion_errors_and_killed_qps_are_typed() {
                f::completion_errors_and_killed_qps_are_typed::<$wrapped>();
            }
            #[test]
            fn min_latency_steers_by_heartbeat_rtt() {
                f::min_latency_steers_by_heartbeat_rtt::<$wrapped>();
            }
        }
    };
}
