//! The engine under link faults (the `fabric::fault` wrapper over a
//! backend), run by `fault_engine_tests!(Wrapped)` over shm and tcp:
//! completion errors and killed QPs as typed reasons. What depends on time
//! (silent peers found by their heartbeats, a cut path failing over and
//! coming back, a hanging connect that delays no heartbeat, min-latency by
//! heartbeat RTT) runs on virtual time instead: tests/engine_sim.rs.

use super::engine::*;
use super::engine_suite::cfg;
use super::multipath_suite::wait_event;
use minstant::Instant;
use rtrs_fabric::fault::{Count, Dir, FaultFabric, Faults, Side};
use rtrs_fabric::{Address, Fabric, WcStatus};
use rtrs_poll::clt::{CltConfig, CltEvent, ReconnectPolicy};
use rtrs_poll::sess::mp_policy::MpPolicy;
use rtrs_poll::sess::DownReason;
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

/// The kernel's heartbeat: nothing here waits for one, and a fast one
/// would die of a loaded host's scheduling (what depends on heartbeats runs
/// on virtual time: tests/engine_sim.rs).
const HB: Duration = rtrs_poll::sess::hb::HB_INTERVAL;

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

#[macro_export]
macro_rules! fault_engine_tests {
    ($module:ident, $wrapped:ty) => {
        mod $module {
            use super::*;
            use $crate::common::fault_suite as f;

            #[test]
            fn completion_errors_and_killed_qps_are_typed() {
                f::completion_errors_and_killed_qps_are_typed::<$wrapped>();
            }
        }
    };
}
