//! Admission limits and access rules of the server (`srv::Limits`), run by
//! `admission_tests!`: each limit refuses with its errno, counts the
//! refusal by kind, and lets a well-behaved client in beside it; a path
//! that never finishes its handshake is torn down with its session's
//! memory.

use super::conformance::Backend;
use super::engine::*;
use super::engine_suite::{cfg, req_bytes, Raw};
use minstant::Instant;
use rtrs_fabric::Address;
use rtrs_poll::clt::{Client, CltConfig, CltError};
use rtrs_poll::sess::DownReason;
use rtrs_poll::srv::{Limits, Refusal, SrvConfig};
use std::time::Duration;

/// A server on `a` with `limits` (and a 64 KiB RAM disk).
fn serve<B: Backend>(a: &Address, limits: Limits) -> TestServer {
    TestServer::start(
        B::fabric(),
        std::slice::from_ref(a),
        srv_with(limits),
        1 << 16,
    )
}

fn srv_with(limits: Limits) -> SrvConfig {
    SrvConfig {
        limits,
        ..cfg(true)
    }
}

/// Opens a one-path client; the errno of a refusal.
fn open<B: Backend>(addr: &Address, name: &str) -> Result<TestClient<B::F>, i32> {
    let mut cc = CltConfig::new(name, vec![addr.clone()]);
    cc.connect_timeout = Duration::from_secs(10);
    match Client::open(&B::fabric(), cc) {
        Ok((clt, mut cores)) => Ok(TestClient {
            clt,
            core: cores.pop().unwrap(),
        }),
        Err(CltError::PathDown {
            reason: DownReason::Rejected { errno, .. },
            ..
        }) => Err(errno),
        // A fabric that turns the peer away at the door (tcp: not
        // admitted) says so before the RTRS exchange.
        Err(CltError::PathDown {
            reason: DownReason::Unreachable { why, .. },
            ..
        }) if why.contains("does not admit") => Err(-libc::EACCES),
        Err(e) => panic!("{name}: {e}"),
    }
}

/// Waits until `f` holds (60 s at most: a loaded host is slow, and these
/// wait for a condition, not a time).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn count(srv: &TestServer, kind: Refusal) -> u64 {
    srv.refusals()
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(0, |(_, n)| *n)
}

/// The allowlist: a source outside it is refused before anything else
/// (-EACCES); one inside is served. (An IP fabric: tcp here.)
pub fn allowlist<B: Backend>() {
    let a = B::addr();
    let outside = Limits {
        allow: vec!["10.0.0.0/8".parse().unwrap()],
        ..Limits::default()
    };
    let srv = serve::<B>(&a, outside);
    assert_eq!(open::<B>(&a, "clt-outside").err(), Some(-libc::EACCES));
    assert_eq!(count(&srv, Refusal::Access), 1);
    assert_eq!(srv.sessions(), (0, 0), "nothing was allocated for it");
    drop(srv);
    let a = B::addr();
    let inside = Limits {
        allow: vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ],
        ..Limits::default()
    };
    let _srv = serve::<B>(&a, inside);
    let mut c = open::<B>(&a, "clt-inside").unwrap();
    assert_eq!(c.write(0, &[1; 512]), 0);
}

/// Sessions from one host, sessions in all, and the memory budget.
pub fn session_and_memory_limits<B: Backend>() {
    let a = B::addr();
    let per_session = u64::from(cfg(true).queue_depth) * u64::from(cfg(true).max_chunk_size);
    let limits = Limits {
        max_sessions_per_host: 2,
        ..Limits::default()
    };
    let srv = serve::<B>(&a, limits);
    let mut one = open::<B>(&a, "clt-1").unwrap();
    let two = open::<B>(&a, "clt-2").unwrap();
    assert_eq!(srv.sessions(), (2, 2 * per_session));
    assert_eq!(open::<B>(&a, "clt-3").err(), Some(-libc::ENOMEM));
    assert_eq!(count(&srv, Refusal::SessionsPerHost), 1);
    assert_eq!(one.write(0, &[1; 512]), 0, "the others go on");
    drop(two);
    eventually("the closed session's memory comes back", || {
        srv.sessions() == (1, per_session)
    });
    let _three = open::<B>(&a, "clt-3").unwrap();
    drop(srv);

    let a = B::addr();
    let limits = Limits {
        memory_budget: per_session + per_session / 2,
        ..Limits::default()
    };
    let srv = serve::<B>(&a, limits);
    let _one = open::<B>(&a, "clt-m1").unwrap();
    assert_eq!(open::<B>(&a, "clt-m2").err(), Some(-libc::ENOMEM));
    assert_eq!(count(&srv, Refusal::Memory), 1);
    drop(srv);

    let a = B::addr();
    let limits = Limits {
        max_sessions: 1,
        ..Limits::default()
    };
    let srv = serve::<B>(&a, limits);
    let _one = open::<B>(&a, "clt-s1").unwrap();
    assert_eq!(open::<B>(&a, "clt-s2").err(), Some(-libc::ENOMEM));
    assert_eq!(count(&srv, Refusal::Sessions), 1);
}

/// The chunk pool: preallocated sessions take slabs of it; past them a
/// session gets memory of its own within the budget (the pool counts in
/// it); a closed session's slab goes back to the pool for the next.
pub fn chunk_pool_then_own_memory<B: Backend>() {
    let a = B::addr();
    let per_session = u64::from(cfg(true).queue_depth) * u64::from(cfg(true).max_chunk_size);
    let limits = Limits {
        prealloc_sessions: 2,
        memory_budget: 3 * per_session,
        ..Limits::default()
    };
    let srv = serve::<B>(&a, limits);
    let pool = || srv.counters().pool();
    assert_eq!((pool().sessions, pool().failed), (2, false));
    let mut one = open::<B>(&a, "clt-p1").unwrap();
    let mut two = open::<B>(&a, "clt-p2").unwrap();
    assert_eq!((pool().pooled, pool().own, pool().in_use), (2, 0, 2));
    let mut three = open::<B>(&a, "clt-p3").unwrap();
    assert_eq!(
        (pool().pooled, pool().own),
        (2, 1),
        "past the pool: memory of its own"
    );
    assert_eq!(
        open::<B>(&a, "clt-p4").err(),
        Some(-libc::ENOMEM),
        "the pool counts in the budget"
    );
    assert_eq!(count(&srv, Refusal::Memory), 1);
    for (i, c) in [&mut one, &mut two, &mut three].into_iter().enumerate() {
        let data = vec![i as u8 + 1; 4096];
        let off = i as u64 * 4096;
        assert_eq!(c.write(off, &data), 0);
        assert_eq!(
            c.read(off, 4096),
            (0, data),
            "session {i}'s chunks carry its data"
        );
    }
    drop(one);
    eventually("the closed session's slab goes back", || {
        srv.sessions().0 == 2 && pool().in_use == 1
    });
    let mut again = open::<B>(&a, "clt-p5").unwrap();
    assert_eq!(
        (pool().pooled, pool().own),
        (3, 1),
        "the freed slab is taken again"
    );
    assert_eq!(again.write(0, &[9; 512]), 0);
    assert_eq!(again.read(0, 512), (0, vec![9; 512]));
}

/// Handshake squatting: paths that connect cid 0 and say nothing more are
/// torn down after the handshake timeout, with their sessions' memory;
/// meanwhile one host's unfinished handshakes are limited (-EBUSY), and a
/// well-behaved client gets in.
pub fn handshake_squatters_are_limited_and_torn_down<B: Backend>() {
    let a = B::addr();
    let limits = Limits {
        max_handshakes_per_host: 3,
        // Long enough that the four connects below all fall inside it on a
        // loaded host (the deadline itself is tested on virtual time:
        // srv::machine's a_handshake_that_does_not_finish_is_closed_at_its_deadline).
        handshake_timeout: Duration::from_secs(5),
        ..Limits::default()
    };
    let srv = serve::<B>(&a, limits);
    let fab = B::fabric();
    // Each squatter is its own session: cid 0 of 2, then silence.
    let mut squatters = Vec::new();
    for seed in 0..3u8 {
        let (raw, errno) = Raw::connect(&fab, &a, &req_bytes(0, 2, true, seed));
        assert_eq!(errno, 0, "squatter {seed} gets in");
        squatters.push(raw);
    }
    let (raw, errno) = Raw::<B::F>::connect(&fab, &a, &req_bytes(0, 2, true, 9));
    assert!(raw.is_none());
    assert_eq!(errno, -libc::EBUSY, "a fourth handshake of this host");
    assert_eq!(count(&srv, Refusal::Handshakes), 1);
    eventually("the squatters are torn down with their memory", || {
        srv.sessions() == (0, 0)
    });
    let closed = srv.closed();
    assert_eq!(closed.len(), 3, "{closed:?}");
    assert!(closed
        .iter()
        .all(|c| c.session_ended && matches!(c.reason, DownReason::Timeout { .. })));
    // The host may handshake again, and a real client finishes in time.
    let mut good = open::<B>(&a, "clt-good").unwrap();
    assert_eq!(good.write(0, &[2; 512]), 0);
    drop(squatters);
}

/// Paths per session.
pub fn paths_per_session<B: Backend>() {
    let (a, b) = (B::addr(), B::addr());
    let limits = Limits {
        max_paths_per_session: 1,
        ..Limits::default()
    };
    let srv = TestServer::start(
        B::fabric(),
        &[a.clone(), b.clone()],
        srv_with(limits),
        1 << 16,
    );
    let mut cc = CltConfig::new("clt-paths", vec![a, b]);
    cc.connect_timeout = Duration::from_secs(10);
    match Client::open(&B::fabric(), cc) {
        Err(CltError::PathDown {
            reason: DownReason::Rejected { errno, .. },
            ..
        }) => assert_eq!(errno, -libc::ECONNRESET),
        other => panic!("{other:?}"),
    }
    assert_eq!(count(&srv, Refusal::Paths), 1);
}

/// The registration table: sized from the limits, and one host may hold a
/// quarter of it; a session past that is refused (-ENOMEM, counted), and
/// served once the host's other session has gone.
pub fn registrations_per_host<B: Backend>() {
    let a = B::addr();
    // A path here takes queue_depth (32) registrations plus one per
    // connection (2): a quarter of 150 holds one such path, not two.
    let limits = Limits {
        max_registrations: Some(150),
        ..Limits::default()
    };
    let srv = serve::<B>(&a, limits);
    let mut first = open::<B>(&a, "clt-reg-1").unwrap();
    assert_eq!(first.write(0, &[1; 512]), 0);
    assert_eq!(open::<B>(&a, "clt-reg-2").err(), Some(-libc::ENOMEM));
    assert_eq!(count(&srv, Refusal::Memory), 1);
    drop(first);
    eventually("the first session's registrations are given back", || {
        srv.sessions().0 == 0
    });
    let mut second = open::<B>(&a, "clt-reg-3").unwrap();
    assert_eq!(second.write(0, &[2; 512]), 0);
}

#[macro_export]
macro_rules! admission_tests {
    ($backend:ty) => {
        mod admission {
            use super::*;
            use $crate::common::admission_suite as ad;

            #[test]
            fn session_and_memory_limits() {
                ad::session_and_memory_limits::<$backend>();
            }
            #[test]
            fn chunk_pool_then_own_memory() {
                ad::chunk_pool_then_own_memory::<$backend>();
            }
            #[test]
            fn handshake_squatters_are_limited_and_torn_down() {
                ad::handshake_squatters_are_limited_and_torn_down::<$backend>();
            }
            #[test]
            fn paths_per_session() {
                ad::paths_per_session::<$backend>();
            }
            #[test]
            fn registrations_per_host() {
                ad::registrations_per_host::<$backend>();
            }
        }
    };
}
