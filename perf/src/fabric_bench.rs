//! `rtrs-perf fabric-lat` and `fabric-bw`: RDMA WRITE_WITH_IMM ping-pong and
//! streaming between two processes on two pinned cores, in the spirit of
//! perftest's ib_write_lat / ib_write_bw.
//!
//! The parent is the client; unless `--role` is given it starts itself as the
//! server child on the second core. Buffers and keys are exchanged in the CM's
//! private data (address + rkey, 12 bytes).

use crate::report::{self, LatNs};
use rtrs_fabric::{
    Access, Address, Cm, CmEvent, Cq, Fabric, Mr, Pd, Qp, QpCap, QpState, RecvWr, SendWr, Wc,
    WcOpcode, WcStatus,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// Ping-pong round trips.
    Lat,
    /// One-way streaming.
    Bw,
}

/// Options shared by both tests and both roles.
#[derive(Clone, Debug)]
pub struct Opts {
    pub test: Test,
    pub size: usize,
    pub iters: u64,
    pub warmup: u64,
    pub window: u32,
    pub json: bool,
    pub core: Option<usize>,
}

const RECV_DEPTH: u32 = 1024;

fn keys(addr: u64, rkey: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..].copy_from_slice(&rkey.to_le_bytes());
    b
}

fn parse_keys(b: &[u8]) -> Result<(u64, u32), String> {
    if b.len() != 12 {
        return Err(format!(
            "peer sent {} bytes of private data, expected 12",
            b.len()
        ));
    }
    Ok((
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u32::from_le_bytes(b[8..].try_into().expect("4 bytes")),
    ))
}

struct Ends<F: Fabric> {
    _pd: F::Pd,
    cq: F::Cq,
    qp: F::Qp,
    cm: F::Cm,
    mr: F::Mr,
    mem: Arc<dyn rtrs_fabric::Memory>,
}

/// The PD, CQ, QP, CM and buffer of one side, on the device that carries
/// `addr` (the server's own address, `local`; else the route to it), so
/// `--ib-dev` picks the device as rdma_cm does.
fn ends<F: Fabric>(
    fab: &F,
    addr: &Address,
    local: bool,
    size: usize,
    window: u32,
) -> Result<Ends<F>, String> {
    let pd = fab
        .alloc_pd()
        .and_then(|pd| pd.for_address(addr, local))
        .map_err(|e| e.to_string())?;
    let cq = pd.create_cq(2 * RECV_DEPTH).map_err(|e| e.to_string())?;
    let cap = QpCap {
        max_send_wr: window.max(64) * 2,
        max_recv_wr: RECV_DEPTH,
        max_send_sge: 1,
        max_recv_sge: 1,
        ..QpCap::default()
    };
    let qp = pd.create_qp(&cq, &cq, cap).map_err(|e| e.to_string())?;
    let cm = fab.create_cm().map_err(|e| e.to_string())?;
    // Lower half: what this side sends; upper half: where the peer writes.
    let mem = crate::shareable(2 * size.max(64))?;
    let mr = pd
        .reg_mr(
            mem.clone(),
            Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
        )
        .map_err(|e| e.to_string())?;
    Ok(Ends {
        _pd: pd,
        cq,
        qp,
        cm,
        mr,
        mem,
    })
}

fn post_recvs<F: Fabric>(qp: &mut F::Qp, n: u32) -> Result<(), String> {
    for i in 0..n {
        qp.post_recv(&RecvWr {
            wr_id: u64::from(i),
            sg_list: &[],
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The server: accept one connection, then echo (lat) or absorb (bw) until
/// the client goes away.
/// What a run stopped by Ctrl-C or SIGTERM returns.
const INTERRUPTED: &str = "interrupted (Ctrl-C or SIGTERM)";

pub fn server<F: Fabric>(fab: F, addr: &Address, o: &Opts) -> Result<(), String> {
    if let Some(c) = o.core {
        crate::pin(c)?;
    }
    let mut e = ends(&fab, addr, true, o.size, o.window)?;
    e.cm.listen(addr).map_err(|e| e.to_string())?;
    post_recvs::<F>(&mut e.qp, RECV_DEPTH)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let peer = loop {
        if Instant::now() > deadline {
            return Err("no client connected within 60 s".into());
        }
        if crate::interrupted() {
            return Err(INTERRUPTED.into());
        }
        if let Some(CmEvent::ConnectRequest {
            id, private_data, ..
        }) =
            e.cm.poll_event(Duration::from_millis(10))
                .map_err(|e| e.to_string())?
        {
            let peer = parse_keys(private_data.as_bytes())?;
            let pd = keys(e.mr.addr() + o.size.max(64) as u64, e.mr.rkey());
            e.cm.accept(id, &e.qp, &pd).map_err(|e| e.to_string())?;
            break peer;
        }
    };
    // Echo what arrived (the upper half), so the data really crosses cores.
    let sge = [e.mr.sge(o.size.max(64), o.size as u32)];
    let mut wcs = [Wc::default(); 32];
    let mut spins = 0u32;
    loop {
        let n = e.cq.poll(&mut wcs);
        for wc in &wcs[..n] {
            if wc.status != WcStatus::Success {
                return Ok(()); // the client disconnected: flushed requests
            }
            if wc.opcode == WcOpcode::RecvRdmaWithImm {
                e.qp.post_recv(&RecvWr {
                    wr_id: wc.wr_id,
                    sg_list: &[],
                })
                .map_err(|e| e.to_string())?;
                if o.test == Test::Lat {
                    let wr = SendWr::write_with_imm(0, &sge, peer.0, peer.1, wc.imm).unsignaled();
                    if e.qp.post_send(&wr).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if n == 0 {
            spins += 1;
            if spins & 0xffff == 0 {
                if e.qp.state() == QpState::Error {
                    return Ok(());
                }
                if crate::interrupted() {
                    return Err(INTERRUPTED.into());
                }
                // rdma_cm: the client's disconnect arrives as an event (the
                // QP need not go to the error state, nothing is in flight).
                if let Ok(Some(CmEvent::Disconnected { .. })) = e.cm.poll_event(Duration::ZERO) {
                    return Ok(());
                }
            }
        }
    }
}

/// Connects to `addr`, retrying while the server is not yet listening.
fn connect<F: Fabric>(
    e: &mut Ends<F>,
    addr: &Address,
    size: usize,
) -> Result<(rtrs_fabric::ConnId, (u64, u32)), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pd = keys(e.mr.addr() + size.max(64) as u64, e.mr.rkey());
        let id = e.cm.connect(addr, &e.qp, &pd).map_err(|e| e.to_string())?;
        loop {
            if Instant::now() > deadline {
                return Err(format!("could not connect to {addr} within 20 s"));
            }
            if crate::interrupted() {
                return Err(INTERRUPTED.into());
            }
            match e
                .cm
                .poll_event(Duration::from_millis(5))
                .map_err(|e| e.to_string())?
            {
                Some(CmEvent::Established { private_data, .. }) => {
                    return Ok((id, parse_keys(private_data.as_bytes())?))
                }
                Some(CmEvent::Unreachable { .. }) => {
                    std::thread::sleep(Duration::from_millis(20));
                    break;
                }
                Some(CmEvent::Rejected { .. }) => return Err(format!("{addr} rejected us")),
                Some(other) => return Err(format!("unexpected CM event {other:?}")),
                None => {}
            }
        }
    }
}

/// The client: measures, prints, returns the JSON value.
pub fn client<F: Fabric>(fab: F, addr: &Address, o: &Opts) -> Result<serde_json::Value, String> {
    if let Some(c) = o.core {
        crate::pin(c)?;
    }
    let mut e = ends(&fab, addr, false, o.size, o.window)?;
    post_recvs::<F>(&mut e.qp, RECV_DEPTH)?;
    let (id, peer) = connect(&mut e, addr, o.size)?;
    let sge = [e.mr.sge(0, o.size as u32)];
    let mut wcs = [Wc::default(); 32];
    let out = match o.test {
        Test::Lat => {
            let mut hist = report::histogram();
            let half = o.size.max(64);
            for i in 0..o.warmup + o.iters {
                // A fresh stamp in every request; the echo must carry it back.
                let stamp = o.size >= 8;
                if stamp {
                    e.mem
                        .write(0, &i.to_le_bytes())
                        .map_err(|e| e.to_string())?;
                }
                let t0 = minstant::Instant::now();
                let wr = SendWr::write_with_imm(0, &sge, peer.0, peer.1, i as u32).unsignaled();
                e.qp.post_send(&wr).map_err(|e| e.to_string())?;
                let mut spins = 0u32;
                'wait: loop {
                    spins = spins.wrapping_add(1);
                    if spins & 0xffff == 0 && crate::interrupted() {
                        return Err(INTERRUPTED.into());
                    }
                    let n = e.cq.poll(&mut wcs);
                    for wc in &wcs[..n] {
                        if wc.status != WcStatus::Success {
                            return Err(format!("completion error: {wc:?}"));
                        }
                        if wc.opcode == WcOpcode::RecvRdmaWithImm {
                            e.qp.post_recv(&RecvWr {
                                wr_id: wc.wr_id,
                                sg_list: &[],
                            })
                            .map_err(|e| e.to_string())?;
                            break 'wait;
                        }
                    }
                }
                let rtt = t0.elapsed().as_nanos() as u64;
                if i % 1024 == 0 && crate::interrupted() {
                    return Err(INTERRUPTED.into());
                }
                if stamp && e.mem.read_u64(half) != i {
                    return Err(format!("echo {i} came back with the wrong data"));
                }
                if i >= o.warmup {
                    hist.saturating_record(rtt.max(1));
                }
            }
            let lat = LatNs::from_hist(&hist);
            let one = lat.halved();
            if !o.json {
                outln!(
                    "fabric-lat {} {} B x {} (ns; one-way = RTT/2, as perftest's ib_write_lat reports):",
                    addr.scheme(),
                    o.size,
                    o.iters,
                );
                for (what, l) in [("round trip", &lat), ("one-way", &one)] {
                    outln!(
                        "  {what:>10}: min {} p50 {} p90 {} p99 {} p99.9 {} max {}",
                        l.min,
                        l.p50,
                        l.p90,
                        l.p99,
                        l.p99_9,
                        l.max
                    );
                }
            }
            serde_json::json!({
                "test": "fabric-lat", "fabric": addr.scheme(), "size": o.size,
                "iters": o.iters, "lat_ns": lat, "one_way_ns": one,
                "one_way": "RTT/2, as perftest's ib_write_lat reports it",
            })
        }
        Test::Bw => {
            let total = o.warmup + o.iters;
            let (mut posted, mut done) = (0u64, 0u64);
            let mut t0 = Instant::now();
            while done < total {
                while posted < total && posted - done < u64::from(o.window) {
                    let wr = SendWr::write_with_imm(posted, &sge, peer.0, peer.1, posted as u32);
                    e.qp.post_send(&wr).map_err(|e| e.to_string())?;
                    posted += 1;
                }
                let n = e.cq.poll(&mut wcs);
                if n == 0 && crate::interrupted() {
                    return Err(INTERRUPTED.into());
                }
                for wc in &wcs[..n] {
                    if wc.status != WcStatus::Success {
                        return Err(format!("completion error: {wc:?}"));
                    }
                    if wc.opcode == WcOpcode::RdmaWrite {
                        done += 1;
                        if done == o.warmup {
                            t0 = Instant::now();
                        }
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            let rate = o.iters as f64 / secs;
            let bw = rate * o.size as f64;
            if !o.json {
                outln!(
                    "fabric-bw {} {} B x {} (window {}): {:.3} M msg/s, {:.2} GB/s",
                    addr.scheme(),
                    o.size,
                    o.iters,
                    o.window,
                    rate / 1e6,
                    bw / 1e9
                );
            }
            serde_json::json!({
                "test": "fabric-bw", "fabric": addr.scheme(), "size": o.size,
                "iters": o.iters, "window": o.window,
                "msg_rate": rate.round(), "bw_bytes": bw.round(),
            })
        }
    };
    let _ = e.cm.disconnect(id);
    Ok(out)
}
