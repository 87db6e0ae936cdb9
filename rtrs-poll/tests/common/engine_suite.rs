//! The engine's end-to-end suite, run against every backend by
//! `engine_tests!(Backend)`: verified writes and reads from 1 byte to
//! max_io_size with always_invalidate on and off, handler errnos, deferred
//! completions, a full queue depth, failover when a path closes mid-IO while
//! another lives, reconnect, a server in another process, a server killed
//! mid-IO, and hostile clients.

use super::conformance::Backend;
use super::engine::*;
use minstant::Instant;
use rtrs_fabric::{
    memory, Access, Address, Cm, CmEvent, Cq, Fabric, Mr, Pd, Qp, QpCap, RecvWr, SendWr, Wc,
    WcStatus,
};
use rtrs_poll::clt::{CltConfig, CltCore, PathState, ReadKeys};
use rtrs_poll::sess::mp_policy::MpPolicy;
use rtrs_poll::sess::DownReason;
use rtrs_poll::srv::SrvConfig;
use rtrs_proto::imm::ImmLayout;
use rtrs_proto::*;
use std::time::Duration;

pub fn cfg(always_invalidate: bool) -> SrvConfig {
    SrvConfig {
        queue_depth: 32,
        max_chunk_size: 64 << 10,
        always_invalidate,
        ..SrvConfig::default()
    }
}

/// Data of every size through writes and reads, checked on both sides;
/// `read_keys` says how the client keys its read buffers.
pub fn write_read_all_sizes<B: Backend>(always_invalidate: bool, read_keys: ReadKeys) {
    let a = B::addr();
    let srv = TestServer::start(
        B::fabric(),
        std::slice::from_ref(&a),
        cfg(always_invalidate),
        1 << 20,
    );
    let mut cc = CltConfig::new("clt-sizes", vec![a]);
    cc.connect_timeout = Duration::from_secs(10);
    cc.read_keys = read_keys;
    let mut c = TestClient::open_with(&B::fabric(), cc);
    assert_eq!(c.clt.always_invalidate(), always_invalidate);
    let max = c.core.max_io_size() as usize;
    assert_eq!(max, (64 << 10) - 4096);
    let mut off = 0u64;
    for (i, len) in [1usize, 2, 7, 512, 4095, 4096, 4097, 8192, 33333, max]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64, len);
        assert_eq!(c.write(off, &data), 0, "write of {len} bytes");
        let (e, back) = c.read(off, len);
        assert_eq!(e, 0, "read of {len} bytes");
        assert!(back == data, "read back differs for {len} bytes");
        assert!(srv.disk.lock().unwrap()[off as usize..off as usize + len] == data[..]);
        off += len as u64;
    }
    assert_eq!(c.write(0, &[]), 0);
    assert_eq!(c.read(0, 0).0, 0);
    if read_keys == ReadKeys::PerIo && B::fabric().remote_invalidate() {
        // Every read's key was dropped by the server's SEND_WITH_INV,
        // chained in its response: none was invalidated here.
        assert_eq!(c.clt.stats().local_invs, 0, "{:?}", c.clt.stats());
    }
    drop(c);
    let closed = srv.stop();
    assert!(
        closed
            .iter()
            .all(|p| !p.reason.to_string().contains("chunk")),
        "no protocol error: {closed:?}"
    );
}

pub fn handler_errno<B: Backend>() {
    let a = B::addr();
    let _srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 16);
    let mut c = TestClient::open(&B::fabric(), vec![a], "clt-errno");
    for errno in [-libc::EIO, -libc::ENOSPC, -libc::EOPNOTSUPP, -511, -1000] {
        let mut u = usr(OP_FAIL, 0);
        u[1..5].copy_from_slice(&errno.to_le_bytes());
        let p = c.core.get_permit().unwrap();
        c.core
            .write(p, &u, 100, 1, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
        let done = c.wait(1).pop().unwrap();
        // Beyond the immediate's 9 bits the server answers -EIO.
        let want = if errno < -511 { -libc::EIO } else { errno };
        assert_eq!(done.errno, want);
        c.core.put_permit(done.permit);
    }
    assert_eq!(c.write(1 << 16, &[1, 2, 3]), -libc::ENOSPC);
    assert_eq!(c.read(1 << 16, 3).0, -libc::ENOSPC);
    assert_eq!(c.write(0, &[1, 2, 3]), 0, "the path lives on after errors");
    // The test server's place refuses each connection once (a full core
    // inbox): every IO connection waited and was counted, none was lost.
    assert!(_srv.counters().deferred_placements() >= 1);
}

pub fn full_queue_depth_and_deferred<B: Backend>() {
    let a = B::addr();
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 20);
    let mut c = TestClient::open(&B::fabric(), vec![a], "clt-qd");
    let qd = c.core.queue_depth();
    assert_eq!(qd, 32);
    let permits: Vec<_> = (0..qd).map(|_| c.core.get_permit().unwrap()).collect();
    assert!(
        c.core.get_permit().is_none(),
        "no more permits than the queue depth"
    );
    for (i, mut p) in permits.into_iter().enumerate() {
        let data = pattern(100 + i as u64, 4096);
        c.core.buf(&mut p)[..4096].copy_from_slice(&data);
        let op = if i % 2 == 0 { OP_IO } else { OP_LATER };
        c.core
            .write(p, &usr(op, i as u64 * 4096), 4096, i as u64, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
    }
    let done = c.wait(qd as usize);
    let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
    tags.sort();
    assert_eq!(
        tags,
        (0..u64::from(qd)).collect::<Vec<_>>(),
        "every IO exactly once"
    );
    assert!(done.iter().all(|d| d.errno == 0));
    for d in done {
        c.core.put_permit(d.permit);
    }
    let disk = srv.disk.lock().unwrap();
    for i in 0..qd as usize {
        assert!(disk[i * 4096..(i + 1) * 4096] == pattern(100 + i as u64, 4096)[..]);
    }
    assert_eq!(c.clt.permits_in_use(), 0);
}

pub fn oversized_io_refused_locally<B: Backend>() {
    let a = B::addr();
    let _srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(false), 1 << 16);
    let mut c = TestClient::open(&B::fabric(), vec![a], "clt-big");
    let max = c.core.max_io_size();
    let p = c.core.get_permit().unwrap();
    let (p, e) = c
        .core
        .write(p, &usr(OP_IO, 0), max + 1, 0, Instant::now())
        .unwrap_err();
    assert_eq!(e.errno(), -libc::EMSGSIZE);
    let (p, e) = c
        .core
        .read(p, &[0u8; 4096], 16, 0, Instant::now())
        .unwrap_err();
    assert_eq!(e.errno(), -libc::EMSGSIZE);
    c.core.put_permit(p);
    assert_eq!(c.write(0, &[9; 10]), 0);
}

fn two_path_client<B: Backend>(name: &str) -> (TestServer, TestClient<B::F>, [Address; 2]) {
    let (a, b) = (B::addr(), B::addr());
    let srv = TestServer::start(B::fabric(), &[a.clone(), b.clone()], cfg(true), 1 << 20);
    let mut cc = CltConfig::new(name, vec![a.clone(), b.clone()]);
    cc.mp_policy = MpPolicy::RoundRobin;
    cc.connect_timeout = Duration::from_secs(10);
    cc.reconnect.delay = Duration::from_millis(50);
    cc.reconnect.backoff = Duration::from_millis(10);
    let c = TestClient::open_with(&B::fabric(), cc);
    (srv, c, [a, b])
}

/// Submits `n` verified writes (tags `base..`), runs `cut` after
/// `cut_after` completions, and returns all `n` completions.
fn writes_with_cut<F: Fabric>(
    c: &mut TestClient<F>,
    base: u64,
    n: u32,
    cut_after: usize,
    mut cut: impl FnMut(&mut TestClient<F>),
) -> Vec<rtrs_poll::clt::Completion> {
    for i in 0..n {
        let mut p = c.core.get_permit().unwrap();
        let tag = base + u64::from(i);
        c.core.buf(&mut p)[..4096].copy_from_slice(&pattern(tag, 4096));
        c.core
            .write(
                p,
                &usr(OP_IO, tag * 4096 % (1 << 20)),
                4096,
                tag,
                Instant::now(),
            )
            .map_err(|(_, e)| e)
            .unwrap();
    }
    let mut out = c.wait(cut_after);
    cut(c);
    let left = n as usize - out.len();
    out.extend(c.wait(left));
    assert_eq!(out.len(), n as usize, "no completion twice");
    out
}

pub fn path_closed_mid_io_second_path_lives<B: Backend>() {
    let (srv, mut c, _) = two_path_client::<B>("clt-failover");
    for round in 0..4u64 {
        // Round 1 cuts path 0 while all 32 writes are in flight on both.
        let done = writes_with_cut(&mut c, round * 32, 32, 0, |c| {
            if round == 1 {
                let id = c.clt.paths()[0].id();
                c.clt.disconnect_path(id).unwrap();
            }
        });
        let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
        tags.sort();
        assert_eq!(
            tags,
            (round * 32..round * 32 + 32).collect::<Vec<_>>(),
            "round {round}: every IO exactly once"
        );
        assert!(
            done.iter().all(|d| d.errno == 0),
            "round {round}: no IO lost"
        );
        for d in done {
            c.core.put_permit(d.permit);
        }
    }
    let paths = c.clt.paths();
    assert_eq!(paths[0].state(), PathState::Closed);
    assert_eq!(paths[1].state(), PathState::Connected);
    assert!(
        paths[1].stats().ios >= 64,
        "the second path carried the rest"
    );
    assert!(
        paths[0].stats().failovers > 0,
        "path 0's IO in flight moved over"
    );
    let s = c.clt.stats();
    assert_eq!(s.ios, 128, "the session counted every IO once: {s:?}");
    assert_eq!((s.errors, s.inflight), (0, 0));
    let disk = srv.disk.lock().unwrap();
    for tag in 0..128u64 {
        let at = (tag * 4096 % (1 << 20)) as usize;
        assert!(
            disk[at..at + 4096] == pattern(tag, 4096)[..],
            "block of tag {tag}"
        );
    }
}

pub fn reconnect_after_disconnect<B: Backend>() {
    let (_srv, mut c, _) = two_path_client::<B>("clt-reconnect");
    let id = c.clt.paths()[0].id();
    c.clt.disconnect_path(id).unwrap();
    assert_eq!(c.write(0, &[1; 100]), 0, "IO goes on over path 1");
    // Returns once the path is up again (after the 10 ms backoff).
    c.clt.reconnect_path(id).unwrap();
    assert_eq!(c.clt.paths()[0].state(), PathState::Connected);
    assert_eq!(c.clt.paths()[0].stats().reconnects, 1);
    // Both paths carry IO again.
    for i in 0..16u64 {
        assert_eq!(c.write(i * 4096, &pattern(i, 4096)), 0);
    }
    assert!(c.clt.paths()[0].stats().ios > 0);
}

pub fn submitter_from_another_thread<B: Backend>() {
    let a = B::addr();
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 20);
    let mut c = TestClient::open(&B::fabric(), vec![a], "clt-remote");
    let mut sub = c.core.submitter().unwrap();
    let worker = std::thread::spawn(move || {
        let mut back = Vec::new();
        let mut n = 0u64;
        for i in 0..200u64 {
            let mut p = sub.get_permit().expect("a permit");
            sub.buf(&mut p)[..4096].copy_from_slice(&pattern(1000 + i, 4096));
            sub.write(p, &usr(OP_IO, i % 64 * 4096), 4096, i)
                .map_err(|(_, e)| e)
                .unwrap();
            let t0 = Instant::now();
            while back.is_empty() {
                assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
                sub.poll(&mut |c| back.push(c));
            }
            for c in back.drain(..) {
                assert_eq!((c.errno, c.tag), (0, i));
                sub.put_permit(c.permit);
                n += 1;
            }
        }
        n
    });
    while !worker.is_finished() {
        c.core.poll(Instant::now(), &mut |_| {
            panic!("a remote completion went to the core")
        });
    }
    assert_eq!(worker.join().unwrap(), 200);
    let disk = srv.disk.lock().unwrap();
    for i in 136..200u64 {
        let at = (i % 64 * 4096) as usize;
        assert!(disk[at..at + 4096] == pattern(1000 + i, 4096)[..]);
    }
}

pub fn write_sg_gathers_registered_memory<B: Backend>() {
    let a = B::addr();
    let _srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), cfg(true), 1 << 20);
    let mut c = TestClient::open(&B::fabric(), vec![a], "clt-sg");
    let mem = memory::shareable(1 << 16).unwrap();
    let data = pattern(77, 1 << 16);
    mem.write(0, &data).unwrap();
    let mr = c.clt.reg_buf(mem.clone()).unwrap();
    // Three pieces out of order: the server sees them gathered, in sg order.
    let sg = [mr.sge(40000, 1000), mr.sge(0, 4096), mr.sge(12345, 7)];
    let mut want = Vec::new();
    for (off, len) in [(40000usize, 1000usize), (0, 4096), (12345, 7)] {
        want.extend_from_slice(&data[off..off + len]);
    }
    let p = c.core.get_permit().unwrap();
    c.core
        .write_sg(p, &usr(OP_IO, 8192), &sg, 9, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let d = c.wait(1).pop().unwrap();
    assert_eq!(d.errno, 0);
    assert_eq!(d.len as usize, want.len());
    c.core.put_permit(d.permit);
    let (e, back) = c.read(8192, want.len());
    assert_eq!(e, 0);
    assert!(back == want, "gathered data back");
    // More entries than MAX_SG: refused locally.
    let many = vec![mr.sge(0, 8); rtrs_poll::clt::MAX_SG + 1];
    let p = c.core.get_permit().unwrap();
    let (p, e) = c
        .core
        .write_sg(p, &usr(OP_IO, 0), &many, 0, Instant::now())
        .unwrap_err();
    assert_eq!(e.errno(), -libc::EMSGSIZE);
    c.core.put_permit(p);
}

// ---------------------------------------------------------------- idle polls

/// The kernel's heartbeat (heartbeats themselves are tested on virtual
/// time: tests/engine_sim.rs).
const HB: Duration = rtrs_poll::sess::hb::HB_INTERVAL;

fn hb_pair<B: Backend>(name: &str) -> (TestServer, TestClient<B::F>) {
    let a = B::addr();
    let mut scfg = cfg(true);
    scfg.hb_interval = HB;
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), scfg, 1 << 16);
    let mut cc = CltConfig::new(name, vec![a]);
    cc.hb_interval = HB;
    cc.connect_timeout = Duration::from_secs(10);
    (srv, TestClient::open_with(&B::fabric(), cc))
}

/// Polls the client's core for `d` (its control runs on its own thread).
fn idle<F: Fabric>(c: &mut TestClient<F>, d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        c.core.poll(Instant::now(), &mut |_| {});
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn idle_polls_read_no_clock<B: Backend>() {
    let (srv, mut c) = hb_pair::<B>("clt-lazy-clock");
    assert_eq!(c.write(0, &[5; 512]), 0);
    let now = Instant::now();
    let before = pollers::clock::reads();
    let mut polls = 0;
    while polls < 100_000 {
        if c.core.poll(now, &mut |_| {}) == 0 {
            polls += 1;
        }
    }
    assert_eq!(
        pollers::clock::reads() - before,
        0,
        "idle client core polls read the clock"
    );
    let (passes, reads) = (srv.idle_passes.clone(), srv.idle_pass_reads.clone());
    let p0 = passes.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    while passes.load(std::sync::atomic::Ordering::Relaxed) < p0 + 100_000 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the server polls");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        reads.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "idle SrvCon polls read the clock"
    );
    // And an IO after all that idling still works.
    assert_eq!(c.write(512, &[6; 512]), 0);
    drop(c);
    srv.stop();
}

// Silent peers (a server or client that stops answering) need a real
// link fault now that heartbeats run on the library's own threads: they are
// in fault_suite.rs, over the fault-injecting fabric.

// ---------------------------------------------------------------- RNBD

/// Polls a core that serves a submitter on this thread (an admin call's
/// wait).
fn spin<F: Fabric>(core: &mut CltCore<F>) {
    core.poll(Instant::now(), &mut |c| {
        panic!("a block IO completion during an admin call: {c:?}")
    });
}

pub fn rnbd_over_rtrs<B: Backend>() {
    use rtrs_poll::rnbd::{clt as rc, Export, RnbdClient, RnbdError};
    use rtrs_proto::rnbd::{AccessMode, RnbdOp};
    let a = B::addr();
    let file = std::env::temp_dir().join(format!(
        "rtrs-rnbd-{}-{}.img",
        std::process::id(),
        B::fabric().name()
    ));
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let exports = vec![
        Export::parse("ram0=ram:2M").unwrap(),
        Export::parse(&format!("disk0=file:{}", file.display())).unwrap(),
    ];
    let scfg = cfg(true);
    let (srv, rnbd) = TestServer::rnbd(B::fabric(), std::slice::from_ref(&a), scfg, exports);
    let mut c = TestClient::open(&B::fabric(), vec![a.clone()], "rnbd-clt");
    let mut rn = RnbdClient::new(&c.clt, c.core.submitter().unwrap());
    assert_eq!(rn.sess_info(&mut || spin(&mut c.core)).unwrap(), 2);
    let ram = rn
        .open("ram0", AccessMode::Rw, &mut || spin(&mut c.core))
        .unwrap();
    assert_eq!(ram.size(), 2 << 20);
    assert_eq!(ram.logical_block_size, 512);
    let disk = rn
        .open("disk0", AccessMode::Rw, &mut || spin(&mut c.core))
        .unwrap();
    assert_eq!(disk.size(), 1 << 20);
    assert_ne!(ram.device_id(), disk.device_id());
    // Opening again in the same session gives the same id.
    let again = rn
        .open("ram0", AccessMode::Rw, &mut || spin(&mut c.core))
        .unwrap();
    assert_eq!(again.device_id(), ram.device_id());
    assert!(matches!(
        rn.open("nope", AccessMode::Ro, &mut || spin(&mut c.core)),
        Err(RnbdError::Errno(e)) if e == -libc::ENOENT
    ));
    // Block IO, verified, on both devices.
    for (dev, n) in [(&ram, 0u64), (&disk, 1)] {
        for (i, len) in [512usize, 4096, 32768].into_iter().enumerate() {
            let off = i as u64 * 65536;
            let data = pattern(n * 10 + i as u64, len);
            let mut p = c.core.get_permit().unwrap();
            c.core.buf(&mut p)[..len].copy_from_slice(&data);
            let h = rc::io_hdr(dev, RnbdOp::Write, off, len as u32, 0);
            c.core
                .write(p, &h, len as u32, 1, Instant::now())
                .map_err(|(_, e)| e)
                .unwrap();
            let d = c.wait(1).pop().unwrap();
            assert_eq!(d.errno, 0);
            c.core.put_permit(d.permit);
            let p = c.core.get_permit().unwrap();
            let h = rc::io_hdr(dev, RnbdOp::Read, off, len as u32, 0);
            c.core
                .read(p, &h, len as u32, 2, Instant::now())
                .map_err(|(_, e)| e)
                .unwrap();
            let mut d = c.wait(1).pop().unwrap();
            assert_eq!(d.errno, 0);
            assert!(
                c.core.buf(&mut d.permit)[..len] == data[..],
                "{len} bytes back"
            );
            c.core.put_permit(d.permit);
        }
    }
    // The file holds what was written.
    let f = std::fs::read(&file).unwrap();
    assert!(f[65536..65536 + 4096] == pattern(11, 4096)[..]);
    // Flush (an RTRS read with no data) and an IO past the end.
    let p = c.core.get_permit().unwrap();
    let h = rc::io_hdr(&disk, RnbdOp::Flush, 0, 0, rtrs_proto::rnbd::RNBD_F_FUA);
    c.core
        .read(p, &h, 0, 3, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let d = c.wait(1).pop().unwrap();
    assert_eq!(d.errno, 0);
    c.core.put_permit(d.permit);
    let p = c.core.get_permit().unwrap();
    let h = rc::io_hdr(&ram, RnbdOp::Write, (2 << 20) - 512, 4096, 0);
    c.core
        .write(p, &h, 4096, 4, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let d = c.wait(1).pop().unwrap();
    assert_eq!(d.errno, -libc::EIO);
    c.core.put_permit(d.permit);
    // A second session may not open ram0 read-write while we hold it.
    let mut c2 = TestClient::open(&B::fabric(), vec![a.clone()], "rnbd-clt2");
    let mut rn2 = RnbdClient::new(&c2.clt, c2.core.submitter().unwrap());
    assert!(matches!(
        rn2.open("ram0", AccessMode::Rw, &mut || spin(&mut c2.core)),
        Err(RnbdError::Errno(e)) if e == -libc::EPERM
    ));
    assert!(rn2
        .open("ram0", AccessMode::Ro, &mut || spin(&mut c2.core))
        .is_ok());
    // IO on a closed id: ENOTCONN.
    rn.close(&disk, &mut || spin(&mut c.core)).unwrap();
    let p = c.core.get_permit().unwrap();
    let h = rc::io_hdr(&disk, RnbdOp::Read, 0, 512, 0);
    c.core
        .read(p, &h, 512, 5, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let d = c.wait(1).pop().unwrap();
    assert_eq!(d.errno, -libc::ENOTCONN);
    c.core.put_permit(d.permit);
    // When our session ends, the server closes what it had open: ram0 is
    // free for a writer again.
    assert_eq!(rnbd.writers("ram0"), Some(1));
    drop(c);
    let t0 = Instant::now();
    while rnbd.writers("ram0") != Some(0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the ended session kept ram0"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(rn2
        .open("ram0", AccessMode::Rw, &mut || spin(&mut c2.core))
        .is_ok());
    drop(c2);
    drop(srv);
    let _ = std::fs::remove_file(&file);
}

/// An RNBD client on `c`'s session, past SESS_INFO.
pub fn rnbd_client<F: Fabric>(c: &mut TestClient<F>) -> rtrs_poll::rnbd::RnbdClient<F> {
    let mut rn = rtrs_poll::rnbd::RnbdClient::new(&c.clt, c.core.submitter().unwrap());
    rn.sess_info(&mut || spin(&mut c.core)).unwrap();
    rn
}

/// OPEN through `rn` on `c`'s core: the device, or the server's errno.
pub fn rnbd_open<F: Fabric>(
    c: &mut TestClient<F>,
    rn: &mut rtrs_poll::rnbd::RnbdClient<F>,
    name: &str,
    mode: rtrs_proto::rnbd::AccessMode,
) -> std::result::Result<std::sync::Arc<rtrs_poll::rnbd::RnbdDev>, i32> {
    match rn.open(name, mode, &mut || spin(&mut c.core)) {
        Ok(d) => Ok(d),
        Err(rtrs_poll::rnbd::RnbdError::Errno(e)) => Err(e),
        Err(e) => panic!("open {name}: {e}"),
    }
}

/// The RNBD access rules end to end: a session that opened a device
/// read-only cannot change it while another session holds it read-write
/// (-EPERM, the data read back unchanged), a read-only export refuses opens
/// for writing, an export with allow rules serves the sessions it names only
/// (-EACCES), and every refusal is counted by kind.
pub fn rnbd_access_rules<B: Backend>() {
    use rtrs_poll::rnbd::{Export, RnbdRefusal};
    use rtrs_proto::rnbd::{AccessMode, RnbdOp};
    let a = B::addr();
    let exports = vec![
        Export::parse("ram0=ram:1M").unwrap(),
        Export::parse("ro0=ram:1M,ro").unwrap(),
        Export::parse("priv=ram:1M,allow=rnbd-owner|rnbd-third").unwrap(),
    ];
    let (srv, rnbd) = TestServer::rnbd(B::fabric(), std::slice::from_ref(&a), cfg(true), exports);

    let mut owner = TestClient::open(&B::fabric(), vec![a.clone()], "rnbd-owner");
    let mut rn = rnbd_client(&mut owner);
    let ram = rnbd_open(&mut owner, &mut rn, "ram0", AccessMode::Rw).unwrap();
    let data = pattern(41, 8192);
    assert_eq!(owner.rnbd_io(&ram, RnbdOp::Write, 0, 8192, &data).0, 0);
    let private = rnbd_open(&mut owner, &mut rn, "priv", AccessMode::Rw).unwrap();
    let (e, _) = owner.rnbd_io(&private, RnbdOp::Write, 0, 4096, &data[..4096]);
    assert_eq!(e, 0);

    // A read-only open of a device another session writes: reads only.
    let mut other = TestClient::open(&B::fabric(), vec![a.clone()], "rnbd-other");
    let mut rn2 = rnbd_client(&mut other);
    let ro = rnbd_open(&mut other, &mut rn2, "ram0", AccessMode::Ro).unwrap();
    let junk = vec![0xa5u8; 8192];
    for (op, len) in [
        (RnbdOp::Write, 8192),
        (RnbdOp::Write, 512),
        (RnbdOp::Discard, 0),
        (RnbdOp::SecureErase, 0),
    ] {
        let e = other.rnbd_io(&ro, op, 0, 8192, &junk[..len]).0;
        assert_eq!(e, -libc::EPERM, "{op:?} of {len} bytes on a read-only open");
    }
    assert_eq!(other.rnbd_io(&ro, RnbdOp::Flush, 0, 0, &[]).0, 0);
    let (e, back) = other.rnbd_io(&ro, RnbdOp::Read, 0, 8192, &[]);
    assert_eq!(e, 0);
    assert!(back == data, "the read-only session changed the device");
    let (e, back) = owner.rnbd_io(&ram, RnbdOp::Read, 0, 8192, &[]);
    assert!(e == 0 && back == data, "the writer reads its data");

    // The read-only export: opens for writing refused, read-only served.
    for mode in [AccessMode::Rw, AccessMode::Migration] {
        let r = rnbd_open(&mut other, &mut rn2, "ro0", mode);
        assert_eq!(r.err(), Some(-libc::EPERM), "{mode:?} open of ro0");
    }
    let ro0 = rnbd_open(&mut other, &mut rn2, "ro0", AccessMode::Ro).unwrap();
    assert_eq!(other.rnbd_io(&ro0, RnbdOp::Read, 0, 512, &[]).0, 0);
    assert_eq!(rnbd.writers("ro0"), Some(0));

    // The private export: not for rnbd-other, served to rnbd-third.
    let r = rnbd_open(&mut other, &mut rn2, "priv", AccessMode::Ro);
    assert_eq!(r.err(), Some(-libc::EACCES));
    let mut third = TestClient::open(&B::fabric(), vec![a.clone()], "rnbd-third");
    let mut rn3 = rnbd_client(&mut third);
    let p3 = rnbd_open(&mut third, &mut rn3, "priv", AccessMode::Ro).unwrap();
    let (e, back) = third.rnbd_io(&p3, RnbdOp::Read, 0, 4096, &[]);
    assert!(
        e == 0 && back[..] == data[..4096],
        "the allowed session reads"
    );

    let c = rnbd.counters();
    assert_eq!(c.refused(RnbdRefusal::ReadOnlyWrite), 4);
    assert_eq!(c.refused(RnbdRefusal::ReadOnlyExport), 2);
    assert_eq!(c.refused(RnbdRefusal::NotAllowed), 1);
    assert_eq!(c.refused(RnbdRefusal::WriterBusy), 0);
    drop((rn3, rn2, rn));
    drop((third, other, owner));
    drop(srv);
}

// ---------------------------------------------------------------- processes

pub const CHILD_ENV: &str = "RTRS_ENGINE_CHILD";

/// The child's side: a server until killed (or 60 s). A no-op unless the
/// parent set `RTRS_ENGINE_CHILD=ADDR`.
pub fn child_server<B: Backend>() {
    let Ok(addr) = std::env::var(CHILD_ENV) else {
        return;
    };
    let addr: Address = addr.parse().unwrap();
    let srv = TestServer::start(B::fabric(), &[addr], cfg(true), 1 << 20);
    println!("READY");
    std::thread::sleep(Duration::from_secs(60));
    drop(srv);
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(addr: &Address, test_name: &str) -> Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, addr.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let child = Child(child);
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("READY") => break,
            Some(Ok(_)) => continue,
            _ => panic!("the child server did not start"),
        }
    }
    child
}

pub fn across_processes<B: Backend>(child_test: &str) {
    let a = B::addr();
    let _child = spawn_child(&a, child_test);
    let mut c = TestClient::open(&B::fabric(), vec![a], "clt-xproc");
    for (i, len) in [1usize, 4096, 60000].into_iter().enumerate() {
        let data = pattern(7 + i as u64, len);
        assert_eq!(c.write(i as u64 * 65536, &data), 0);
        let (e, back) = c.read(i as u64 * 65536, len);
        assert_eq!(e, 0);
        assert!(back == data, "{len} bytes read back across processes");
    }
}

pub fn peer_killed_mid_io<B: Backend>(child_test: &str) {
    let a = B::addr();
    let mut child = spawn_child(&a, child_test);
    let mut c = TestClient::open(&B::fabric(), vec![a], "clt-killed");
    for i in 0..32u64 {
        c.submit_write(i, i * 4096);
    }
    let _ = child.0.kill();
    let _ = child.0.wait();
    // Every IO completes (done before the kill, or failed with the kernel's
    // errno), none hangs, none completes twice.
    let done = c.wait(32);
    let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
    tags.sort();
    assert_eq!(tags, (0..32).collect::<Vec<_>>());
    assert!(done
        .iter()
        .all(|d| d.errno == 0 || d.errno == -libc::ECONNABORTED));
    for d in done {
        c.core.put_permit(d.permit);
    }
    // The path is down: new IO is refused with ECONNABORTED, not hung.
    let t0 = Instant::now();
    loop {
        c.core.poll(Instant::now(), &mut |_| {});
        if c.clt.paths()[0].state() != PathState::Connected {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the dead path still looks connected"
        );
    }
    let p = c.core.get_permit().unwrap();
    let (p, e) = c
        .core
        .write(p, &usr(OP_IO, 0), 16, 0, Instant::now())
        .unwrap_err();
    assert_eq!(e.errno(), -libc::ECONNABORTED);
    c.core.put_permit(p);
}

// ---------------------------------------------------------------- hostile

/// A raw RTRS client on the fabric API: cid 0 only, so it can send anything.
pub struct Raw<F: Fabric> {
    cm: F::Cm,
    qp: F::Qp,
    cq: F::Cq,
    mem: std::sync::Arc<dyn rtrs_fabric::Memory>,
    mr: F::Mr,
    chunks: Vec<(u64, u32)>,
    layout: Option<ImmLayout>,
}

const RAW_QD: u16 = 32;

impl<F: Fabric> Raw<F> {
    /// Connects with conn_req `req`; returns the CM's answer as an errno.
    pub fn connect(fab: &F, addr: &Address, req: &[u8]) -> (Option<Raw<F>>, i32) {
        let pd = fab.alloc_pd().unwrap();
        let mut cm = fab.create_cm().unwrap();
        let cq = pd.create_cq(256).unwrap();
        let qp = pd.create_qp(&cq, &cq, QpCap::default()).unwrap();
        let mem = memory::shareable(1 << 20).unwrap();
        let mr = pd
            .reg_mr(mem.clone(), Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
        let id = cm.connect(addr, &qp, req).unwrap();
        let t0 = Instant::now();
        loop {
            assert!(t0.elapsed() < Duration::from_secs(10), "no CM answer");
            match cm.poll_event(Duration::from_millis(5)).unwrap() {
                Some(CmEvent::Established {
                    id: i,
                    private_data,
                }) if i == id => {
                    let rsp = ConnRsp::new_checked(private_data.as_bytes()).unwrap();
                    assert_eq!(rsp.queue_depth(), RAW_QD);
                    let raw = Raw {
                        cm,
                        qp,
                        cq,
                        mem,
                        mr,
                        chunks: Vec::new(),
                        layout: None,
                    };
                    return (Some(raw), 0);
                }
                Some(CmEvent::Rejected {
                    id: i,
                    private_data,
                }) if i == id => {
                    let e = ConnRsp::new_checked(private_data.as_bytes()).map_or(-1, |v| v.errno());
                    return (None, e.into());
                }
                _ => {}
            }
        }
    }

    fn poll_one(&mut self) -> Wc {
        let mut wcs = [Wc::default(); 1];
        let t0 = Instant::now();
        loop {
            if self.cq.poll(&mut wcs) == 1 {
                return wcs[0];
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
        }
    }

    /// INFO_REQ with `name`, then INFO_RSP into the chunk table.
    fn info(&mut self, name: &str) {
        let mut req = [0u8; 272];
        // A raw emit, so even invalid names go out.
        req[2..2 + name.len()].copy_from_slice(name.as_bytes());
        self.mem.write(0, &req).unwrap();
        let rsge = [self.mr.sge(4096, 8 + 16 * RAW_QD as u32)];
        self.qp
            .post_recv(&RecvWr {
                wr_id: 1,
                sg_list: &rsge,
            })
            .unwrap();
        let ssge = [self.mr.sge(0, 272)];
        self.qp.post_send(&SendWr::send(2, &ssge)).unwrap();
        for _ in 0..2 {
            let wc = self.poll_one();
            assert_eq!(wc.status, WcStatus::Success);
            if wc.wr_id == 1 {
                let mut b = vec![0u8; wc.byte_len as usize];
                self.mem.read(4096, &mut b).unwrap();
                let v = InfoRsp::new_checked(&b[..]).unwrap();
                slice_chunks(&v, RAW_QD, 64 << 10, |_, a, k| self.chunks.push((a, k))).unwrap();
            }
        }
        self.layout = Some(ImmLayout::new(RAW_QD.into(), 64 << 10).unwrap());
        for i in 0..8 {
            // Room for an RKEY_RSP (always_invalidate answers with a SEND).
            let rsge = [self.mr.sge(16384 + 64 * i as usize, 64)];
            self.qp
                .post_recv(&RecvWr {
                    wr_id: 100 + i,
                    sg_list: &rsge,
                })
                .unwrap();
        }
    }

    /// RDMA-writes `bytes` at offset `at` of chunk `buf_id` with immediate `imm`.
    fn write_imm(&mut self, buf_id: usize, at: u64, bytes: &[u8], imm: u32) {
        self.mem.write(8192, bytes).unwrap();
        let sge = [self.mr.sge(8192, bytes.len() as u32)];
        let (addr, key) = self.chunks[buf_id];
        self.qp
            .post_send(&SendWr::write_with_imm(3, &sge, addr + at, key, imm))
            .unwrap();
    }
}

/// IO on the service connection (cid 0), as the kernel's client sends its
/// admin messages (RNBD's open): with always_invalidate the response is a
/// SEND_WITH_IMM whose RKEY_RSP carries the chunk's new key (it once failed
/// on rdma: the service QP had no room for the inline RKEY_RSP).
pub fn io_on_the_service_connection<B: Backend>() {
    let a = B::addr();
    let mut scfg = cfg(true);
    scfg.queue_depth = RAW_QD;
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), scfg, 1 << 20);
    let (raw, e) = Raw::connect(&B::fabric(), &a, &req_bytes(0, 1, true, 77));
    assert_eq!(e, 0, "connect");
    let mut raw = raw.unwrap();
    raw.info("raw-admin");
    let old_key = raw.chunks[5].1;
    // [64 bytes of data][usr][RdmaWrite header], the header's offset in the imm.
    let u = usr(OP_IO, 4096);
    let mut msg = vec![0x5au8; 64];
    msg.extend_from_slice(&u);
    msg.extend_from_slice(&[2, 0, u.len() as u8, 0]);
    let imm = raw.layout.unwrap().io_req(5, 64 + u.len() as u32).unwrap();
    raw.write_imm(5, 0, &msg, imm);
    // The receive (soft-RoCE also flags the send completion of our
    // WRITE_WITH_IMM as "with imm", imm 0).
    let rsp = loop {
        let wc = raw.poll_one();
        assert_eq!(wc.status, WcStatus::Success, "{wc:?}");
        if (100..108).contains(&wc.wr_id) {
            assert!(wc.with_imm, "{wc:?}");
            break wc;
        }
    };
    match Imm::decode_clt(rsp.imm).unwrap() {
        Imm::IoRsp { msg_id, errno, .. } => assert_eq!((msg_id, errno), (5, 0)),
        other => panic!("not an IO response: {other:?}"),
    }
    assert_eq!(rsp.byte_len as usize, RkeyRsp::<&[u8]>::LEN);
    let slot = 16384 + 64 * (rsp.wr_id - 100) as usize;
    let mut b = [0u8; RkeyRsp::<&[u8]>::LEN];
    raw.mem.read(slot, &mut b).unwrap();
    let k = RkeyRsp::new_checked(&b[..]).unwrap();
    assert_eq!(k.buf_id(), 5);
    assert_ne!(k.rkey(), old_key, "a new key for the chunk");
    assert!(srv.disk.lock().unwrap()[4096..4096 + 64] == [0x5a; 64]);
    drop(raw);
    drop(srv.stop());
}

/// A conn_req of a session and path named by `seed`.
pub fn req_bytes(cid: u16, cid_num: u16, first: bool, seed: u8) -> [u8; 56] {
    let mut b = [0u8; 56];
    ConnReqRepr {
        cid,
        cid_num,
        recon_cnt: 1,
        sess_uuid: [seed; 16],
        paths_uuid: [seed ^ 0x5a; 16],
        first_conn: first,
    }
    .emit(&mut b)
    .unwrap();
    b
}

pub fn hostile_clients<B: Backend>() {
    let a = B::addr();
    let mut scfg = cfg(true);
    scfg.queue_depth = RAW_QD;
    let srv = TestServer::start(B::fabric(), std::slice::from_ref(&a), scfg, 1 << 20);
    // A well-behaved session lives through all of it.
    let mut good = TestClient::open(&B::fabric(), vec![a.clone()], "clt-good");
    assert_eq!(good.write(0, &[1; 64]), 0);
    let fab = B::fabric();

    // Refused at connect time, with the kernel's errnos.
    let mut bad_magic = req_bytes(0, 1, true, 1);
    bad_magic[2] = 0;
    assert_eq!(Raw::connect(&fab, &a, &bad_magic).1, -libc::ECONNRESET);
    let mut bad_ver = req_bytes(0, 1, true, 2);
    bad_ver[5] = 3;
    assert_eq!(Raw::connect(&fab, &a, &bad_ver).1, -libc::ECONNRESET);
    assert_eq!(
        Raw::connect(&fab, &a, &req_bytes(2, 2, true, 3)).1,
        -libc::ECONNRESET
    );
    assert_eq!(
        Raw::connect(&fab, &a, &req_bytes(0, 1, false, 4)).1,
        -libc::ENXIO
    );
    assert_eq!(
        Raw::connect(&fab, &a, &bad_magic[..20]).1,
        -libc::ECONNRESET
    );
    // The same cid of one path twice: the second is refused.
    let (first, e) = Raw::connect(&fab, &a, &req_bytes(0, 2, true, 5));
    assert_eq!(e, 0);
    assert_eq!(
        Raw::connect(&fab, &a, &req_bytes(0, 2, true, 5)).1,
        -libc::ECONNRESET
    );
    drop(first);

    // Connected, then misbehaving: each path is dropped with a reason.
    type Act<F> = Box<dyn Fn(&mut Raw<F>)>;
    let cases: Vec<(&str, Act<B::F>)> = vec![
        (
            "bad sessname",
            Box::new(|r: &mut Raw<B::F>| {
                let mut req = [0u8; 272];
                req[2..5].copy_from_slice(b"a/b");
                r.mem.write(0, &req).unwrap();
                let s = [r.mr.sge(0, 272)];
                r.qp.post_send(&SendWr::send(2, &s)).unwrap();
            }),
        ),
        (
            "INFO_REQ twice",
            Box::new(|r: &mut Raw<B::F>| {
                r.info("raw-twice");
                let s = [r.mr.sge(0, 272)];
                r.qp.post_send(&SendWr::send(2, &s)).unwrap();
            }),
        ),
        (
            "unknown immediate",
            Box::new(|r: &mut Raw<B::F>| {
                r.info("raw-imm");
                r.write_imm(0, 0, &[0; 4], 0x5000_0000);
            }),
        ),
        (
            "buf_id out of range",
            Box::new(|r: &mut Raw<B::F>| {
                r.info("raw-bufid");
                r.write_imm(0, 0, &[2, 0, 0, 0], 40 << 23);
            }),
        ),
        (
            "offset out of range",
            Box::new(|r: &mut Raw<B::F>| {
                r.info("raw-off");
                r.write_imm(0, 0, &[2, 0, 0, 0], 70000);
            }),
        ),
        (
            "usr_len beyond the offset",
            Box::new(|r: &mut Raw<B::F>| {
                r.info("raw-usr");
                let imm = r.layout.unwrap().io_req(1, 16).unwrap();
                let mut msg = [0u8; 20];
                msg[16..].copy_from_slice(&[2, 0, 0xff, 0x00]);
                r.write_imm(1, 0, &msg, imm);
            }),
        ),
        (
            "wrong message type",
            Box::new(|r: &mut Raw<B::F>| {
                r.info("raw-type");
                let imm = r.layout.unwrap().io_req(2, 0).unwrap();
                r.write_imm(2, 0, &[4, 0, 0, 0], imm);
            }),
        ),
        (
            "read longer than its room",
            Box::new(|r: &mut Raw<B::F>| {
                r.info("raw-read");
                let imm = r.layout.unwrap().io_req(3, 100).unwrap();
                let mut msg = [0u8; 24];
                RdmaReadRepr {
                    usr_len: 0,
                    need_inval: false,
                    desc: Some(SgDesc {
                        addr: 0,
                        key: 1,
                        len: 5000,
                    }),
                }
                .emit(&mut msg)
                .unwrap();
                r.write_imm(3, 100, &msg, imm);
            }),
        ),
    ];
    let n = cases.len();
    for (i, (what, act)) in cases.into_iter().enumerate() {
        let (raw, e) = Raw::connect(&fab, &a, &req_bytes(0, 1, true, 10 + i as u8));
        assert_eq!(e, 0, "{what}: connect");
        let mut raw = raw.unwrap();
        act(&mut raw);
        // The server drops the path: our QP sees the disconnect.
        let t0 = Instant::now();
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: the server kept the path"
            );
            // Backends that carry the CM on the data socket see the close
            // while their CQ is polled, as a core would.
            let mut wcs = [Wc::default(); 8];
            raw.cq.poll(&mut wcs);
            if raw.qp.state() == rtrs_fabric::QpState::Error {
                break;
            }
            if let Ok(Some(CmEvent::Disconnected { .. })) =
                raw.cm.poll_event(Duration::from_millis(5))
            {
                break;
            }
        }
        assert_eq!(
            good.write(4096, &[i as u8; 64]),
            0,
            "{what}: the good session goes on"
        );
    }
    drop(good);
    let closed = srv.stop();
    let hostile: Vec<_> = closed
        .iter()
        .filter(|p| p.sessname.as_deref() != Some("clt-good"))
        .collect();
    assert!(
        hostile.len() >= n,
        "each hostile path closed with a reason: {closed:#?}"
    );
    assert!(
        hostile
            .iter()
            .all(|p| !matches!(p.reason, DownReason::SessionClosed)),
        "each closed for what it did: {hostile:#?}"
    );
}

#[macro_export]
macro_rules! engine_tests {
    ($backend:ty) => {
        mod engine {
            use super::*;
            use $crate::common::engine_suite as e;

            #[test]
            fn write_read_verified_always_invalidate_keys_per_io() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::write_read_all_sizes::<$backend>(true, rtrs_poll::clt::ReadKeys::PerIo);
            }
            #[test]
            fn write_read_verified_without_invalidate_keys_per_session() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::write_read_all_sizes::<$backend>(false, rtrs_poll::clt::ReadKeys::Session);
            }
            #[test]
            fn handler_errno_reaches_the_client() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::handler_errno::<$backend>();
            }
            #[test]
            fn full_queue_depth_and_deferred_completions() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::full_queue_depth_and_deferred::<$backend>();
            }
            #[test]
            fn oversized_io_is_refused_locally() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::oversized_io_refused_locally::<$backend>();
            }
            #[test]
            fn path_closed_mid_io_second_path_lives() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::path_closed_mid_io_second_path_lives::<$backend>();
            }
            #[test]
            fn reconnect_after_disconnect() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::reconnect_after_disconnect::<$backend>();
            }
            #[test]
            fn submitter_from_another_thread() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::submitter_from_another_thread::<$backend>();
            }
            #[test]
            fn write_sg_gathers_registered_memory() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::write_sg_gathers_registered_memory::<$backend>();
            }
            #[test]
            fn rnbd_over_rtrs() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::rnbd_over_rtrs::<$backend>();
            }
            #[test]
            fn rnbd_access_rules() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::rnbd_access_rules::<$backend>();
            }
            #[test]
            fn across_processes() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::across_processes::<$backend>("engine::child_server");
            }
            #[test]
            fn peer_killed_mid_io() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::peer_killed_mid_io::<$backend>("engine::child_server");
            }
            #[test]
            fn io_on_the_service_connection() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::io_on_the_service_connection::<$backend>();
            }
            #[test]
            fn hostile_clients_lose_their_path_only() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::hostile_clients::<$backend>();
            }
            /// Not a test: the server process of the two tests above.
            #[test]
            fn child_server() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                e::child_server::<$backend>();
            }
        }
    };
}
