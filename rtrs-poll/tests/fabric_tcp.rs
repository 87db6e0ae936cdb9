//! The fabric conformance suite over the tcp backend (loopback), plus what is
//! particular to tcp: listen errors and streaming through small buffers.

mod common;

use common::soft::Tcp;
use common::{mem, pattern, MemExt};
use rtrs_fabric::soft::tcp::{TcpConfig, TcpFabric};
use rtrs_fabric::{
    Access, Address, Cm, CmEvent, Cq, Fabric, FabricError, Mr, Pd, Qp, QpCap, RecvWr, SendWr, Wc,
    WcOpcode, WcStatus,
};
use std::time::{Duration, Instant};

fn addr() -> Address {
    common::tcp_addr()
}

conformance_tests!(Tcp);
engine_tests!(Tcp);
multipath_tests!(Tcp);
admission_tests!(Tcp);

/// Small buffers and pieces, so every message streams in many pieces and
/// sends and receives come back partial.
struct TinyTcp;

impl common::conformance::Backend for TinyTcp {
    type F = TcpFabric;
    fn fabric() -> TcpFabric {
        TcpFabric::with_config(TcpConfig {
            tx_buf: 16 << 10,
            rx_buf: 5000,
            piece: 3000,
            ..TcpConfig::default()
        })
    }
    fn addr() -> Address {
        addr()
    }
}

mod tiny {
    use super::*;
    use crate::common::conformance as c;

    #[test]
    fn send_recv_sizes() {
        c::send_recv_sizes::<TinyTcp>();
    }
    #[test]
    fn write_and_write_with_imm_sizes() {
        c::write_and_write_with_imm_sizes::<TinyTcp>();
    }
    #[test]
    fn read_sizes() {
        c::read_sizes::<TinyTcp>();
    }
    #[test]
    fn scatter_gather_lists() {
        c::scatter_gather_lists::<TinyTcp>();
    }
    #[test]
    fn rc_ordering_and_unsignaled() {
        c::rc_ordering_and_unsignaled::<TinyTcp>();
    }
    #[test]
    fn disconnect_mid_traffic() {
        c::disconnect_mid_traffic::<TinyTcp>();
    }
}

#[test]
fn listen_on_a_taken_address_fails_clearly() {
    let fab = TcpFabric::new();
    let a = addr();
    let mut cm1 = fab.create_cm().unwrap();
    let mut cm2 = fab.create_cm().unwrap();
    cm1.listen(&a).unwrap();
    match cm2.listen(&a) {
        Err(FabricError::Io { what, source }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{what}");
            assert!(what.contains("already in use"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    // Closing the listener frees the address.
    let id = cm1.listen(&addr()).unwrap();
    cm1.disconnect(id).unwrap();
    assert!(matches!(
        cm2.listen(&Address::Shm("x".into())),
        Err(FabricError::WrongBackend(..))
    ));
}

/// READs and SENDs crossing in both directions at once, with RNR in the mix:
/// responses, requests and acknowledgements share one stream each way.
#[test]
fn both_directions_at_once() {
    let fab = TcpFabric::new();
    let a_addr = addr();
    let cap = QpCap {
        max_send_wr: 64,
        max_recv_wr: 64,
        ..QpCap::default()
    };
    let pd_a = fab.alloc_pd().unwrap();
    let pd_b = fab.alloc_pd().unwrap();
    let mut cq_a = pd_a.create_cq(256).unwrap();
    let mut cq_b = pd_b.create_cq(256).unwrap();
    let mut qa = pd_a.create_qp(&cq_a, &cq_a, cap).unwrap();
    let mut qb = pd_b.create_qp(&cq_b, &cq_b, cap).unwrap();
    let mut cm_a = fab.create_cm().unwrap();
    let mut cm_b = fab.create_cm().unwrap();
    let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
    let (ma, mb) = (mem(4 << 20), mem(4 << 20));
    let mr_a = pd_a.reg_mr(ma.clone(), rw).unwrap();
    let mr_b = pd_b.reg_mr(mb.clone(), rw).unwrap();
    cm_a.listen(&a_addr).unwrap();
    cm_b.connect(&a_addr, &qb, b"").unwrap();
    let mut up = 0;
    let t0 = Instant::now();
    while up < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        if let Some(ev) = cm_a.poll_event(Duration::from_millis(1)).unwrap() {
            match ev {
                CmEvent::ConnectRequest { id, .. } => cm_a.accept(id, &qa, b"").unwrap(),
                CmEvent::Established { .. } => up += 1,
                other => panic!("{other:?}"),
            }
        }
        if let Some(ev) = cm_b.poll_event(Duration::from_millis(1)).unwrap() {
            assert!(matches!(ev, CmEvent::Established { .. }), "{ev:?}");
            up += 1;
        }
    }
    let da = pattern(1 << 20, 1);
    let db = pattern(1 << 20, 2);
    ma.fill(0, &da);
    mb.fill(0, &db);
    const N: u64 = 20;
    // Each side READs the other's first MiB into its upper half, and SENDs
    // 100 KiB the other receives only later (RNR until then).
    for i in 0..N {
        let sa = [mr_a.sge(2 << 20, 1 << 20)];
        qa.post_send(&SendWr::read(i, &sa, mb.addr(0), mr_b.rkey()))
            .unwrap();
        let sb = [mr_b.sge(2 << 20, 1 << 20)];
        qb.post_send(&SendWr::read(100 + i, &sb, ma.addr(0), mr_a.rkey()))
            .unwrap();
        let s = [mr_a.sge(0, 100_000)];
        qa.post_send(&SendWr::send(200 + i, &s)).unwrap();
        let s = [mr_b.sge(0, 100_000)];
        qb.post_send(&SendWr::send(300 + i, &s)).unwrap();
    }
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    let mut posted = false;
    let t0 = Instant::now();
    while wa.len() < 3 * N as usize || wb.len() < 3 * N as usize {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "a {} b {}: {:?} {:?}",
            wa.len(),
            wb.len(),
            wa.last(),
            wb.last()
        );
        if !posted && t0.elapsed() > Duration::from_millis(5) {
            posted = true;
            for i in 0..N {
                let s = [mr_a.sge(3 << 20, 100_000)];
                qa.post_recv(&RecvWr {
                    wr_id: 400 + i,
                    sg_list: &s,
                })
                .unwrap();
                let s = [mr_b.sge(3 << 20, 100_000)];
                qb.post_recv(&RecvWr {
                    wr_id: 500 + i,
                    sg_list: &s,
                })
                .unwrap();
            }
        }
        let mut buf = [Wc::default(); 16];
        let n = cq_a.poll(&mut buf);
        wa.extend_from_slice(&buf[..n]);
        let n = cq_b.poll(&mut buf);
        wb.extend_from_slice(&buf[..n]);
    }
    for w in wa.iter().chain(&wb) {
        assert_eq!(w.status, WcStatus::Success, "{w:?}");
    }
    let sends_a: Vec<u64> = wa
        .iter()
        .filter(|w| w.opcode != WcOpcode::Recv)
        .map(|w| w.wr_id)
        .collect();
    let want: Vec<u64> = (0..N).flat_map(|i| [i, 200 + i]).collect();
    assert_eq!(sends_a, want, "completions in posting order");
    assert_eq!(ma.read_vec(2 << 20, 1 << 20), db);
    assert_eq!(mb.read_vec(2 << 20, 1 << 20), da);
    assert_eq!(mb.read_vec(3 << 20, 100_000), da[..100_000].to_vec());
}

/// A region deregistered while a long WRITE streams into it: the rest of the
/// payload is refused (nothing lands in memory that is no longer registered)
/// and the initiator hears `RemAccessErr`.
#[test]
fn region_deregistered_under_a_streaming_write() {
    use common::conformance::Pair;
    let mut p =
        Pair::<TcpFabric>::connect_with::<TinyTcp>(QpCap::default(), QpCap::default(), 8 << 20);
    let len = 4 << 20;
    p.a.mem.fill(0, &pattern(len, 7));
    let sge = [p.a.sge(0, len)];
    let (raddr, rkey) = (p.b.mem.addr(0), p.b.mr.rkey());
    p.a.qp
        .post_send(&SendWr::write(1, &sge, raddr, rkey))
        .unwrap();
    let mut buf = [Wc::default(); 4];
    for _ in 0..20 {
        assert_eq!(p.a.cq.poll(&mut buf), 0);
        assert_eq!(p.b.cq.poll(&mut buf), 0);
    }
    assert_ne!(p.b.mem.read_vec(0, 16), vec![0u8; 16], "some pieces landed");
    let other = mem(4096);
    let fresh =
        p.b.pd
            .reg_mr(other, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
    drop(std::mem::replace(&mut p.b.mr, fresh));
    let (a, _) = p.wait(1, 0);
    assert_eq!((a[0].wr_id, a[0].status), (1, WcStatus::RemAccessErr));
    assert_ne!(
        p.b.mem.read_vec(len - 16, 16),
        pattern(len, 7)[len - 16..].to_vec(),
        "the tail never landed"
    );
}

/// The allowlist needs source IPs: tcp.
#[test]
fn admission_allowlist() {
    common::admission_suite::allowlist::<Tcp>();
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An idle QP's CQ arms (the core may stop polling it); the peer's SEND
/// rings the wake; a CQ with a completion waiting, or a QP with something
/// outstanding to send, does not arm; the peer going away rings it too.
#[test]
fn idle_cq_arms_and_the_peer_wakes_it() {
    use common::conformance::Pair;
    let mut p = Pair::<TcpFabric>::connect::<Tcp>();
    let bell = std::sync::Arc::new(pollers::Bell::default());
    let wake = pollers::Wake::new(&bell);
    p.b.post_recv(1, 0, 4096);
    p.idle(Duration::from_millis(5));
    assert!(p.b.cq.arm(&wake), "an idle QP arms");
    std::thread::sleep(Duration::from_millis(20));
    assert!(!wake.take(), "nothing came: no ring");
    p.a.mem.fill(0, b"knock");
    let s = [p.a.sge(0, 5)];
    p.a.qp.post_send(&SendWr::send(7, &s)).unwrap();
    // Only `a` is polled: `b` is parked until its wake rings.
    wait_until("the wake rings", || {
        p.a.poll();
        wake.take()
    });
    let (_, wb) = p.wait(1, 1);
    assert_eq!((wb[0].wr_id, wb[0].byte_len), (1, 5));
    // A completion not yet taken: no arm.
    p.b.post_recv(2, 0, 4096);
    p.a.qp.post_send(&SendWr::send(8, &s)).unwrap();
    wait_until("b's receive completes", || {
        p.a.poll();
        let mut one = [Wc::default(); 1];
        let n = p.b.cq.poll(&mut one[..0]);
        n == 0 && !p.b.cq.arm(&wake)
    });
    p.wait(1, 1);
    // Idle again: armed; the peer goes away and the wake rings.
    p.idle(Duration::from_millis(5));
    assert!(p.b.cq.arm(&wake));
    wake.take();
    drop(p.a);
    wait_until("the hang-up rings", || wake.take());
}

/// A server on a real pinned core: its IO connection parks while the
/// client is idle (so idle connections cost the core nothing) and the
/// client's next IO wakes it: verified IO before and after.
#[test]
fn idle_io_connections_park_on_their_core() {
    use common::engine::{Ram, TestClient};
    use std::sync::{Arc, Mutex};
    let a = addr();
    let pool = rtrs_poll::srv::CorePool::launch(&[0]).unwrap();
    let disk = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
    let d = disk.clone();
    let srv = rtrs_poll::srv::Server::listen(
        &TcpFabric::new(),
        &a,
        common::engine_suite::cfg(true),
        move |_: &rtrs_poll::srv::ConInfo| Ram::new(d.clone()),
        pool.place(),
    )
    .unwrap();
    let mut c = TestClient::open(&TcpFabric::new(), vec![a], "clt-park");
    // The core's published figures (every few hundred iterations): the one
    // IO connection (cid 1; cid 0 never parks) is waited for, never slept
    // for, so a loaded host only makes the test slower.
    let live = pool.live();
    let unparks = || live.iter().map(|l| l.stats().unparks).sum::<u64>();
    let parked = || live.iter().map(|l| l.pollers().1).sum::<u64>();
    // Idle 5 ms without work, then the core's next offer: it parks.
    wait_until("the idle IO connection parked", || parked() >= 1);
    for round in 0..3u64 {
        let before = unparks();
        let data = common::pattern(8192, round);
        assert_eq!(c.write(round * 8192, &data), 0);
        let (e, back) = c.read(round * 8192, 8192);
        assert_eq!(e, 0);
        assert!(back == data, "round {round}: read back differs");
        // The client's send rang the parked connection back to polling,
        // and once idle again it parks again.
        wait_until(
            &format!("round {round}: the IO unparked its connection"),
            || unparks() > before,
        );
        wait_until(
            &format!("round {round}: the connection parked again"),
            || parked() >= 1,
        );
    }
    drop(c);
    srv.stop();
    let reports = pool.stop();
    let (parks, unparks) = reports
        .iter()
        .fold((0, 0), |(p, u), r| (p + r.stats.parks, u + r.stats.unparks));
    assert!(parks >= 4 && unparks >= 3, "{reports:?}");
}

fn keyed(key: Option<&[u8]>) -> TcpFabric {
    TcpFabric::with_config(TcpConfig {
        auth: key.map(|k| std::sync::Arc::new(rtrs_fabric::soft::tcp::AuthKey::new(k).unwrap())),
        max_pending_per_host: 3,
        ..TcpConfig::default()
    })
}

/// Drives a connect from `client` to a listener on `server` (the listener
/// accepts every request): what the active side heard, and the passive
/// side's refusals.
fn try_connect(client: &TcpFabric, server: &TcpFabric) -> (CmEvent, Vec<CmEvent>) {
    let a = addr();
    let mut cm_s = server.create_cm().unwrap();
    cm_s.listen(&a).unwrap();
    let pd_s = server.alloc_pd().unwrap();
    let cq_s = pd_s.create_cq(16).unwrap();
    let qp_s = pd_s.create_qp(&cq_s, &cq_s, QpCap::default()).unwrap();
    let pd_c = client.alloc_pd().unwrap();
    let cq_c = pd_c.create_cq(16).unwrap();
    let qp_c = pd_c.create_qp(&cq_c, &cq_c, QpCap::default()).unwrap();
    let mut cm_c = client.create_cm().unwrap();
    cm_c.connect(&a, &qp_c, b"hi").unwrap();
    let mut refusals = Vec::new();
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < Duration::from_secs(10), "no outcome");
        if let Some(ev) = cm_s.poll_event(Duration::from_millis(1)).unwrap() {
            match ev {
                CmEvent::ConnectRequest { id, .. } => cm_s.accept(id, &qp_s, b"").unwrap(),
                CmEvent::Refused { .. } => refusals.push(ev),
                _ => {}
            }
        }
        if let Some(ev) = cm_c.poll_event(Duration::from_millis(1)).unwrap() {
            // Let the passive side report its side of it.
            let t1 = Instant::now();
            while t1.elapsed() < Duration::from_millis(50) {
                if let Some(e @ CmEvent::Refused { .. }) =
                    cm_s.poll_event(Duration::from_millis(1)).unwrap()
                {
                    refusals.push(e);
                }
            }
            return (ev, refusals);
        }
    }
}

fn refused_for(evs: &[CmEvent]) -> Vec<rtrs_fabric::CmRefusal> {
    evs.iter()
        .filter_map(|e| match e {
            CmEvent::Refused { why, .. } => Some(*why),
            _ => None,
        })
        .collect()
}

/// The pre-shared key: the same key on both sides connects; another key,
/// no key, or a key against a listener without one never gets a REQ
/// through, and each side says why.
#[test]
fn preshared_key_mutual_auth() {
    use rtrs_fabric::CmRefusal;
    let k1: &[u8] = b"0123456789abcdef-key-one";
    let k2: &[u8] = b"0123456789abcdef-key-two";
    let (ev, refusals) = try_connect(&keyed(Some(k1)), &keyed(Some(k1)));
    assert!(matches!(ev, CmEvent::Established { .. }), "{ev:?}");
    assert!(refusals.is_empty(), "{refusals:?}");
    // Keyed conformance too: data flows after the auth messages.
    let mut p = Pair::connect_on(
        &keyed(Some(k1)),
        &keyed(Some(k1)),
        &addr(),
        QpCap::default(),
        QpCap::default(),
        1 << 16,
    );
    p.b.post_recv(1, 0, 64);
    p.a.mem.fill(0, b"after auth");
    let s = [p.a.sge(0, 10)];
    p.a.qp.post_send(&SendWr::send(2, &s)).unwrap();
    let (_, wb) = p.wait(1, 1);
    assert_eq!(wb[0].byte_len, 10);
    assert_eq!(p.b.mem.read_vec(0, 10), b"after auth".to_vec());

    for (client, server, says, refusal) in [
        (
            Some(k2),
            Some(k1),
            "does not hold our pre-shared key",
            CmRefusal::Auth,
        ),
        (None, Some(k1), "requires a pre-shared key", CmRefusal::Auth),
        (Some(k1), None, "has no pre-shared key", CmRefusal::Auth),
    ] {
        let (ev, refusals) = try_connect(&keyed(client), &keyed(server));
        match &ev {
            CmEvent::Unreachable { reason, .. } => {
                assert!(reason.contains(says), "{client:?}/{server:?}: {reason}")
            }
            other => panic!("{client:?}/{server:?}: {other:?}"),
        }
        assert_eq!(refused_for(&refusals), vec![refusal], "{refusals:?}");
    }
}

use common::conformance::Pair;

/// At the door: garbage and a message cut short are refused as malformed,
/// a host past its handshake allowance is closed at once, an address the
/// application does not admit never gets a handshake slot.
#[test]
fn the_door_refuses_malformed_busy_and_unadmitted_peers() {
    use rtrs_fabric::CmRefusal;
    use std::io::Write;
    let fab = keyed(None);
    let a = addr();
    let mut cm = fab.create_cm().unwrap();
    cm.listen(&a).unwrap();
    let Address::Tcp { host, port } = &a else {
        unreachable!()
    };
    let target = format!("{host}:{port}");
    let events = |cm: &mut rtrs_fabric::soft::tcp::TcpCm, n: usize| {
        let mut got = Vec::new();
        let t0 = Instant::now();
        while got.len() < n {
            assert!(t0.elapsed() < Duration::from_secs(10), "got {got:?}");
            if let Some(ev) = cm.poll_event(Duration::from_millis(1)).unwrap() {
                got.push(ev);
            }
        }
        refused_for(&got)
    };
    let mut g = std::net::TcpStream::connect(&target).unwrap();
    g.write_all(&[0xAB; 96]).unwrap();
    assert_eq!(events(&mut cm, 1), vec![CmRefusal::Malformed]);
    let mut t = std::net::TcpStream::connect(&target).unwrap();
    t.write_all(&0x7074_6372u32.to_le_bytes()).unwrap();
    drop(t);
    assert_eq!(events(&mut cm, 1), vec![CmRefusal::Malformed]);
    // Three may wait in handshakes (this fabric's allowance); the fourth is
    // closed at once.
    let idle: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&target).unwrap())
        .collect();
    assert_eq!(events(&mut cm, 1), vec![CmRefusal::Handshakes]);
    drop(idle);
    cm.admit(std::sync::Arc::new(|ip: std::net::IpAddr| {
        !ip.is_loopback()
    }));
    let _c = std::net::TcpStream::connect(&target).unwrap();
    let got = events(&mut cm, 1);
    assert_eq!(got, vec![CmRefusal::Access]);
}

/// RNBD exports limited by key (`allow-key=ID`): a client that proved the
/// listener's key is served an export that names that key's id, and refused
/// (-EACCES) one that names another key.
#[test]
fn rnbd_allow_key_matches_the_proved_key() {
    use common::engine::{TestClient, TestServer};
    use common::engine_suite::{cfg, rnbd_client, rnbd_open};
    use rtrs_poll::rnbd::{Export, RnbdRefusal};
    use rtrs_proto::rnbd::AccessMode;
    let k1: &[u8] = b"0123456789abcdef-key-one";
    let id = rtrs_fabric::soft::tcp::AuthKey::new(k1)
        .unwrap()
        .id()
        .to_string();
    let a = addr();
    let exports = vec![
        Export::parse(&format!("mine=ram:1M,allow-key={id}")).unwrap(),
        Export::parse("theirs=ram:1M,allow-key=00000000").unwrap(),
    ];
    let (srv, rnbd) = TestServer::rnbd(
        keyed(Some(k1)),
        std::slice::from_ref(&a),
        cfg(true),
        exports,
    );
    let mut c = TestClient::open(&keyed(Some(k1)), vec![a], "rnbd-keyed");
    let mut rn = rnbd_client(&mut c);
    assert!(rnbd_open(&mut c, &mut rn, "mine", AccessMode::Rw).is_ok());
    let r = rnbd_open(&mut c, &mut rn, "theirs", AccessMode::Ro);
    assert_eq!(r.err(), Some(-libc::EACCES));
    assert_eq!(
        rnbd.counters().refusals(),
        vec![(RnbdRefusal::NotAllowed, 1)]
    );
    drop(rn);
    drop(c);
    drop(srv);
}
