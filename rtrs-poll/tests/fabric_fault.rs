//! The fault-injecting wrapper (`rtrs_fabric::fault`): the conformance
//! suite over `FaultFabric<ShmFabric>` and `FaultFabric<TcpFabric>` with no
//! fault armed (the wrapper is transparent), the engine's suite over shm
//! through it, and each fault over both backends. Client and server get a
//! fabric each, built from one `Faults` handle; delays run on a manual clock.

mod common;

use common::conformance::{ok, wait_event, Backend, Pair};
use common::{pattern, MemExt};
use rtrs_fabric::fault::{Clock, CmEventKind, Count, Dir, FaultFabric, Faults, LinkFaults, Side};
use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::soft::tcp::TcpFabric;
use rtrs_fabric::{
    Address, Cm, CmEvent, Fabric, Mr, Qp, QpCap, QpState, SendWr, Wc, WcOpcode, WcStatus,
};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::fault_suite::Wrapped;

struct Shm;

impl Wrapped for Shm {
    type Inner = ShmFabric;
    fn inner() -> ShmFabric {
        ShmFabric::new()
    }
    fn addr() -> Address {
        static N: AtomicU32 = AtomicU32::new(0);
        Address::Shm(format!(
            "fault-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

struct Tcp;

impl Wrapped for Tcp {
    type Inner = TcpFabric;
    fn inner() -> TcpFabric {
        TcpFabric::new()
    }
    fn addr() -> Address {
        common::tcp_addr()
    }
}

/// The wrapped backend with nothing armed, for the suites.
struct Fault<W>(PhantomData<W>);

impl<W: Wrapped> Backend for Fault<W> {
    type F = FaultFabric<W::Inner>;
    fn fabric() -> Self::F {
        FaultFabric::new(W::inner(), Faults::new())
    }
    fn addr() -> Address {
        W::addr()
    }
}

conformance_tests!(shm_conformance, Fault<Shm>);
conformance_tests!(tcp_conformance, Fault<Tcp>);
engine_tests!(Fault<Shm>);
fault_engine_tests!(shm_engine_faults, Shm);
fault_engine_tests!(tcp_engine_faults, Tcp);

// ---------------------------------------------------------------------------
// The faults.

type End<W> = common::conformance::Side<FaultFabric<<W as Wrapped>::Inner>>;

const MEM: usize = 1 << 20;
/// How long "nothing happens" is watched for (polling all along).
const QUIET: Duration = Duration::from_millis(30);
const DEADLINE: Duration = Duration::from_secs(10);

/// A client and a server fabric sharing `faults`, and the link's faults.
fn fabrics<W: Wrapped>(faults: &Faults) -> (FaultFabric<W::Inner>, FaultFabric<W::Inner>) {
    (
        FaultFabric::new(W::inner(), faults.clone()),
        FaultFabric::new(W::inner(), faults.clone()),
    )
}

/// A connected pair (`a` the client) and the faults of its link.
fn connect<W: Wrapped>(faults: &Faults) -> (Pair<FaultFabric<W::Inner>>, LinkFaults) {
    let (clt, srv) = fabrics::<W>(faults);
    let addr = W::addr();
    let cap = QpCap::default();
    let p = Pair::connect_on(&clt, &srv, &addr, cap, cap, MEM);
    (p, faults.link(&addr))
}

/// (wr_id, status, opcode) of each completion.
fn seen(wcs: &[Wc]) -> Vec<(u64, WcStatus, WcOpcode)> {
    wcs.iter().map(|w| (w.wr_id, w.status, w.opcode)).collect()
}

fn quiet<F: Fabric>(p: &mut Pair<F>) {
    p.idle(QUIET);
    assert!(
        p.a.wcs.is_empty() && p.b.wcs.is_empty(),
        "completions that should not be: a {:?} b {:?}",
        p.a.wcs,
        p.b.wcs
    );
}

/// Polls both ends (CQs and CMs) for a while, expecting no CM event.
fn no_event<F: Fabric>(
    me: &mut common::conformance::Side<F>,
    other: &mut common::conformance::Side<F>,
) {
    let t0 = Instant::now();
    while t0.elapsed() < QUIET {
        me.poll();
        other.poll();
        for cm in [&mut me.cm, &mut other.cm] {
            if let Some(ev) = cm.poll_event(Duration::from_millis(1)).unwrap() {
                panic!("unexpected {ev:?}");
            }
        }
    }
}

/// Drives a connect of `a` to `b` (listening) to both Established events.
fn handshake<F: Fabric>(
    a: &mut common::conformance::Side<F>,
    b: &mut common::conformance::Side<F>,
) {
    let (mut a_up, mut b_up) = (false, false);
    let t0 = Instant::now();
    while !(a_up && b_up) {
        assert!(t0.elapsed() < DEADLINE, "connect timed out");
        match b.cm.poll_event(Duration::from_millis(1)).unwrap() {
            Some(CmEvent::ConnectRequest { id, .. }) => {
                b.id = id;
                b.cm.accept(id, &b.qp, b"").unwrap();
            }
            Some(CmEvent::Established { .. }) => b_up = true,
            Some(other) => panic!("server: {other:?}"),
            None => {}
        }
        match a.cm.poll_event(Duration::from_millis(1)).unwrap() {
            Some(CmEvent::Established { .. }) => a_up = true,
            Some(other) => panic!("client: {other:?}"),
            None => {}
        }
    }
}

/// A black hole c2s swallows a WRITE_WITH_IMM (nothing lands, nothing
/// completes, the QP stays up) while s2c works; mended, later requests go
/// through. READs are cut by either direction, local operations still run,
/// and a kill flushes what was swallowed.
fn black_hole<W: Wrapped>() {
    let faults = Faults::new();
    let (mut p, link) = connect::<W>(&faults);
    let data = pattern(4096, 1);
    p.a.mem.fill(0, &data);
    p.b.post_recv(100, 0, 0);
    link.black_hole(Dir::C2s);
    let sge = [p.a.sge(0, 4096)];
    let (raddr, rkey) = (p.b.mem.addr(MEM / 2), p.b.mr.rkey());
    p.a.qp
        .post_send(&SendWr::write_with_imm(1, &sge, raddr, rkey, 7))
        .unwrap();
    quiet(&mut p);
    assert_eq!(
        p.b.mem.read_vec(MEM / 2, 4096),
        vec![0u8; 4096],
        "nothing landed"
    );
    assert_eq!(p.a.qp.state(), QpState::Rts, "a cut cable raises no error");
    assert_eq!(link.counters().swallowed_wrs, 1);

    // The other direction still works.
    p.a.post_recv(200, 0, 0);
    let sge_b = [p.b.sge(0, 64)];
    let (a_addr, a_key) = (p.a.mem.addr(MEM / 2), p.a.mr.rkey());
    p.b.qp
        .post_send(&SendWr::write_with_imm(2, &sge_b, a_addr, a_key, 8))
        .unwrap();
    let (a, b) = p.wait(1, 1);
    ok(&b[0], 2, WcOpcode::RdmaWrite);
    ok(&a[0], 200, WcOpcode::RecvRdmaWithImm);
    assert_eq!(a[0].imm, 8);

    // Mended: the next request goes through; the swallowed one stays lost.
    link.clear_black_hole(Dir::C2s);
    p.a.qp
        .post_send(&SendWr::write_with_imm(3, &sge, raddr, rkey, 9))
        .unwrap();
    let (a, b) = p.wait(1, 1);
    ok(&a[0], 3, WcOpcode::RdmaWrite);
    ok(&b[0], 100, WcOpcode::RecvRdmaWithImm);
    assert_eq!(b[0].imm, 9);
    assert_eq!(p.b.mem.read_vec(MEM / 2, 4096), data);

    // A READ's data would come back s2c: cut. LOCAL_INV is local: it runs.
    link.black_hole(Dir::S2c);
    let dst = [p.a.sge(8192, 64)];
    p.a.qp
        .post_send(&SendWr::read(4, &dst, raddr, rkey))
        .unwrap();
    let own = p.a.mr.rkey();
    p.a.qp.post_send(&SendWr::local_inv(5, own)).unwrap();
    let (a, _) = p.wait(1, 0);
    ok(&a[0], 5, WcOpcode::LocalInv);
    assert_eq!(p.a.mr.rkey(), 0);
    assert_eq!(link.counters().swallowed_wrs, 2);
    quiet(&mut p);

    // What a black hole took is outstanding: a kill flushes it, in order.
    assert!(p.a.qp.kill());
    let (a, _) = p.wait(2, 0);
    assert_eq!(
        seen(&a),
        [
            (1, WcStatus::WrFlushErr, WcOpcode::RdmaWrite),
            (4, WcStatus::WrFlushErr, WcOpcode::RdmaRead)
        ]
    );
    let c = link.counters();
    assert_eq!((c.killed_qps, c.flushed_wcs), (1, 2));
    quiet(&mut p);
}

/// A delay c2s holds the client's send completions and the server's receive
/// completions until the clock has moved by the delay, then hands them out in
/// order; the data itself moved at once, and s2c is not held.
fn delay<W: Wrapped>() {
    let clock = Clock::manual();
    let faults = Faults::with_clock(clock.clone());
    let (mut p, link) = connect::<W>(&faults);
    let d = Duration::from_millis(5);
    link.delay(Dir::C2s, d);
    let data = pattern(64, 3);
    p.a.mem.fill(0, &data);
    let sge = [p.a.sge(0, 64)];
    let (raddr, rkey) = (p.b.mem.addr(MEM / 2), p.b.mr.rkey());
    for i in 0..3 {
        p.b.post_recv(100 + i, 0, 0);
    }
    p.a.qp
        .post_send(&SendWr::write(9, &sge, raddr, rkey).unsignaled())
        .unwrap();
    for i in 0..3u64 {
        p.a.qp
            .post_send(&SendWr::write_with_imm(i, &sge, raddr, rkey, i as u32))
            .unwrap();
    }
    quiet(&mut p);
    assert_eq!(
        p.b.mem.read_vec(MEM / 2, 64),
        data,
        "the data moved at once"
    );
    assert_eq!(link.counters().delayed_wcs, 6, "3 sends, 3 receives");

    // s2c is not delayed, even on the QPs holding c2s completions.
    p.a.post_recv(200, 0, 0);
    let sge_b = [p.b.sge(0, 8)];
    let (a_addr, a_key) = (p.a.mem.addr(MEM / 2), p.a.mr.rkey());
    p.b.qp
        .post_send(&SendWr::write_with_imm(50, &sge_b, a_addr, a_key, 50))
        .unwrap();
    let (a, b) = p.wait(1, 1);
    ok(&a[0], 200, WcOpcode::RecvRdmaWithImm);
    ok(&b[0], 50, WcOpcode::RdmaWrite);

    clock.advance(d - Duration::from_nanos(1));
    quiet(&mut p);
    clock.advance(Duration::from_nanos(1));
    let (a, b) = p.wait(3, 3);
    assert_eq!(a.iter().map(|w| w.wr_id).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(a.iter().all(|w| w.status == WcStatus::Success));
    assert_eq!(
        b.iter().map(|w| (w.wr_id, w.imm)).collect::<Vec<_>>(),
        [(100, 0), (101, 1), (102, 2)]
    );
    quiet(&mut p);

    // A shorter delay does not overtake a longer one on the same queue.
    link.delay(Dir::C2s, 2 * d);
    p.a.qp
        .post_send(&SendWr::write(5, &sge, raddr, rkey))
        .unwrap();
    quiet(&mut p);
    link.delay(Dir::C2s, d);
    p.a.qp
        .post_send(&SendWr::write(6, &sge, raddr, rkey))
        .unwrap();
    quiet(&mut p);
    clock.advance(d);
    quiet(&mut p);
    clock.advance(d);
    let (a, _) = p.wait(2, 0);
    assert_eq!(a.iter().map(|w| w.wr_id).collect::<Vec<_>>(), [5, 6]);

    // Cleared: the next completion is not held.
    link.delay(Dir::C2s, Duration::ZERO);
    p.a.qp
        .post_send(&SendWr::write(7, &sge, raddr, rkey))
        .unwrap();
    let (a, _) = p.wait(1, 0);
    ok(&a[0], 7, WcOpcode::RdmaWrite);
    assert_eq!(link.counters().delayed_wcs, 8);
}

/// A failure armed c2s fails the next send completion with its status (even
/// of a request posted unsignaled: errors always complete), the QP goes to
/// error and everything else on it flushes; s2c fails on its own.
fn fail_with_status<W: Wrapped>() {
    let faults = Faults::new();
    let (mut p, link) = connect::<W>(&faults);
    link.fail(Dir::C2s, WcStatus::RemAccessErr, Count::Next(1));
    let sge = [p.a.sge(0, 64)];
    let (raddr, rkey) = (p.b.mem.addr(0), p.b.mr.rkey());
    p.a.qp
        .post_send(&SendWr::write(1, &sge, raddr, rkey).unsignaled())
        .unwrap();
    p.a.qp
        .post_send(&SendWr::write(2, &sge, raddr, rkey))
        .unwrap();
    p.a.qp
        .post_send(&SendWr::send(3, &sge).unsignaled())
        .unwrap();
    p.a.post_recv(10, 0, 64);
    let (a, _) = p.wait(4, 0);
    assert_eq!(
        seen(&a),
        [
            (1, WcStatus::RemAccessErr, WcOpcode::RdmaWrite),
            (2, WcStatus::WrFlushErr, WcOpcode::RdmaWrite),
            (3, WcStatus::WrFlushErr, WcOpcode::Send),
            (10, WcStatus::WrFlushErr, WcOpcode::Recv)
        ]
    );
    assert_eq!(p.a.qp.state(), QpState::Error);
    p.a.qp
        .post_send(&SendWr::write(4, &sge, raddr, rkey))
        .unwrap();
    let (a, _) = p.wait(1, 0);
    assert_eq!(seen(&a), [(4, WcStatus::WrFlushErr, WcOpcode::RdmaWrite)]);
    let c = link.counters();
    assert_eq!((c.failed_wcs, c.flushed_wcs, c.killed_qps), (1, 4, 0));
    assert_eq!(p.b.qp.state(), QpState::Rts);

    // s2c, until cleared.
    link.fail(Dir::S2c, WcStatus::RetryExcErr, Count::UntilCleared);
    let sge_b = [p.b.sge(0, 8)];
    p.b.qp
        .post_send(&SendWr::write(20, &sge_b, p.a.mem.addr(0), p.a.mr.rkey()))
        .unwrap();
    let (_, b) = p.wait(0, 1);
    assert_eq!(seen(&b), [(20, WcStatus::RetryExcErr, WcOpcode::RdmaWrite)]);
    assert_eq!(p.b.qp.state(), QpState::Error);
    assert_eq!(link.counters().failed_wcs, 2);
}

/// Killing a QP flushes everything outstanding on it in posting order (a
/// SEND stalled for a receive, a signaled and an unsignaled WRITE, posted
/// receives); later posts flush; the peer's QP is untouched. QP numbers
/// repeat across the two fabrics, so kills name the side.
fn kill<W: Wrapped>() {
    let faults = Faults::new();
    let (mut p, link) = connect::<W>(&faults);
    assert_eq!(link.qp_nums(Side::Clt), [p.a.qp.qp_num()]);
    assert_eq!(link.qp_nums(Side::Srv), [p.b.qp.qp_num()]);
    let sge = [p.a.sge(0, 64)];
    let (raddr, rkey) = (p.b.mem.addr(0), p.b.mr.rkey());
    p.a.qp.post_send(&SendWr::send(1, &sge)).unwrap();
    p.a.qp
        .post_send(&SendWr::write(2, &sge, raddr, rkey))
        .unwrap();
    p.a.qp
        .post_send(&SendWr::write(3, &sge, raddr, rkey).unsignaled())
        .unwrap();
    p.a.post_recv(10, 0, 64);
    p.a.post_recv(11, 0, 64);
    quiet(&mut p);
    assert!(link.kill_qp(Side::Clt, p.a.qp.qp_num()));
    assert!(!link.kill_qp(Side::Clt, p.a.qp.qp_num()), "dead already");
    let (a, _) = p.wait(5, 0);
    let flush = WcStatus::WrFlushErr;
    assert_eq!(
        seen(&a),
        [
            (1, flush, WcOpcode::Send),
            (2, flush, WcOpcode::RdmaWrite),
            (3, flush, WcOpcode::RdmaWrite),
            (10, flush, WcOpcode::Recv),
            (11, flush, WcOpcode::Recv)
        ]
    );
    assert_eq!(p.a.qp.state(), QpState::Error);
    assert_eq!(p.b.qp.state(), QpState::Rts);
    p.a.qp.post_send(&SendWr::send(4, &sge)).unwrap();
    p.a.post_recv(12, 0, 64);
    let (a, _) = p.wait(2, 0);
    assert_eq!(
        seen(&a),
        [(4, flush, WcOpcode::Send), (12, flush, WcOpcode::Recv)]
    );
    quiet(&mut p);
    let c = link.counters();
    assert_eq!((c.killed_qps, c.flushed_wcs), (1, 7));

    // Every QP of the link: the server's, with a WRITE outstanding.
    let sge_b = [p.b.sge(0, 8)];
    p.b.qp
        .post_send(&SendWr::write(30, &sge_b, p.a.mem.addr(0), p.a.mr.rkey()))
        .unwrap();
    assert_eq!(link.kill_all(), 1, "the client's was dead already");
    let (_, b) = p.wait(0, 1);
    assert_eq!(seen(&b), [(30, flush, WcOpcode::RdmaWrite)]);
    assert_eq!(link.counters().killed_qps, 2);
}

/// A lost ESTABLISHED on the client: the server sees the whole handshake,
/// the client never hears how its connect ended.
fn lost_established<W: Wrapped>() {
    let faults = Faults::new();
    let (clt, srv) = fabrics::<W>(&faults);
    let addr = W::addr();
    let link = faults.link(&addr);
    link.lose_cm_events(Side::Clt, CmEventKind::Established, Count::Next(1));
    let mut a = End::<W>::new(&clt, QpCap::default(), 4096);
    let mut b = End::<W>::new(&srv, QpCap::default(), 4096);
    b.cm.listen(&addr).unwrap();
    a.cm.connect(&addr, &a.qp, b"").unwrap();
    let mut b_up = false;
    let t0 = Instant::now();
    while !b_up {
        assert!(
            t0.elapsed() < DEADLINE,
            "the server never saw the connection up"
        );
        match b.cm.poll_event(Duration::from_millis(1)).unwrap() {
            Some(CmEvent::ConnectRequest { id, .. }) => b.cm.accept(id, &b.qp, b"").unwrap(),
            Some(CmEvent::Established { .. }) => b_up = true,
            Some(other) => panic!("server: {other:?}"),
            None => {}
        }
        if let Some(ev) = a.cm.poll_event(Duration::from_millis(1)).unwrap() {
            panic!("client: {ev:?}");
        }
    }
    no_event(&mut a, &mut b);
    assert_eq!(link.counters().dropped_cm_events, 1);
}

/// A lost DISCONNECTED on the server: the client's disconnect still tears
/// the connection down (the server's receive flushes), but its CM says
/// nothing.
fn lost_disconnected<W: Wrapped>() {
    let faults = Faults::new();
    let (mut p, link) = connect::<W>(&faults);
    link.lose_cm_events(Side::Srv, CmEventKind::Disconnected, Count::Next(1));
    p.b.post_recv(5, 0, 64);
    let id = p.a.id;
    p.a.cm.disconnect(id).unwrap();
    let ev = wait_event(&mut p.a, &mut p.b);
    assert!(
        matches!(ev, CmEvent::Disconnected { id: i } if i == id),
        "{ev:?}"
    );
    let (_, b) = p.wait(0, 1);
    assert_eq!(seen(&b), [(5, WcStatus::WrFlushErr, WcOpcode::Recv)]);
    no_event(&mut p.b, &mut p.a);
    assert_eq!(p.b.qp.state(), QpState::Error);
    assert_eq!(link.counters().dropped_cm_events, 1);
}

/// A delayed CONNECT_REQUEST reaches the server only once the clock has
/// moved by the delay; the connection then comes up.
fn delayed_connect_request<W: Wrapped>() {
    let clock = Clock::manual();
    let faults = Faults::with_clock(clock.clone());
    let (clt, srv) = fabrics::<W>(&faults);
    let addr = W::addr();
    let link = faults.link(&addr);
    let d = Duration::from_millis(20);
    link.delay_cm_events(Side::Srv, CmEventKind::ConnectRequest, d);
    let mut a = End::<W>::new(&clt, QpCap::default(), 4096);
    let mut b = End::<W>::new(&srv, QpCap::default(), 4096);
    b.cm.listen(&addr).unwrap();
    a.cm.connect(&addr, &a.qp, b"").unwrap();
    no_event(&mut b, &mut a);
    assert_eq!(link.counters().delayed_cm_events, 1);
    clock.advance(d);
    handshake(&mut a, &mut b);
    assert_eq!(a.qp.state(), QpState::Rts);
}

/// A refused connect ends `Unreachable` and the server never hears of it;
/// the count spent, the next connect goes through.
fn refused_connect<W: Wrapped>() {
    let faults = Faults::new();
    let (clt, srv) = fabrics::<W>(&faults);
    let addr = W::addr();
    let link = faults.link(&addr);
    link.refuse_connects(Count::Next(1));
    let mut a = End::<W>::new(&clt, QpCap::default(), 4096);
    let mut b = End::<W>::new(&srv, QpCap::default(), 4096);
    b.cm.listen(&addr).unwrap();
    let id = a.cm.connect(&addr, &a.qp, b"x").unwrap();
    let ev = wait_event(&mut a, &mut b);
    assert!(
        matches!(ev, CmEvent::Unreachable { id: i, .. } if i == id),
        "{ev:?}"
    );
    no_event(&mut b, &mut a);
    assert_eq!(link.counters().refused_connects, 1);
    a.cm.connect(&addr, &a.qp, b"y").unwrap();
    handshake(&mut a, &mut b);
    assert_eq!(faults.counters().refused_connects, 1);
}

macro_rules! fault_tests {
    ($module:ident, $wrapped:ty) => {
        mod $module {
            use super::*;
            #[test]
            fn black_hole_swallows_one_direction() {
                black_hole::<$wrapped>();
            }
            #[test]
            fn delay_holds_completions_in_order() {
                delay::<$wrapped>();
            }
            #[test]
            fn fail_with_status_then_flush() {
                fail_with_status::<$wrapped>();
            }
            #[test]
            fn kill_flushes_everything_outstanding() {
                kill::<$wrapped>();
            }
            #[test]
            fn lost_established_never_reports_the_connect() {
                lost_established::<$wrapped>();
            }
            #[test]
            fn lost_disconnected_is_never_reported() {
                lost_disconnected::<$wrapped>();
            }
            #[test]
            fn delayed_connect_request_comes_late() {
                delayed_connect_request::<$wrapped>();
            }
            #[test]
            fn refused_connect_is_unreachable() {
                refused_connect::<$wrapped>();
            }
        }
    };
}

fault_tests!(shm_faults, Shm);
fault_tests!(tcp_faults, Tcp);
