//! The RTRS engine end to end over shm: a server with a RAM disk, a client,
//! data verified for writes and reads from 1 byte to max_io_size, with
//! always_invalidate on and off; handler errnos; deferred completions.

mod common;

use common::engine::*;
use minstant::Instant;
use rtrs_poll::fabric::soft::shm::ShmFabric;
use rtrs_poll::fabric::Address;
use rtrs_poll::srv::SrvConfig;
use std::sync::atomic::{AtomicU32, Ordering};

fn addr() -> Address {
    static N: AtomicU32 = AtomicU32::new(0);
    Address::Shm(format!(
        "eng-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn cfg(always_invalidate: bool) -> SrvConfig {
    SrvConfig {
        queue_depth: 32,
        max_chunk_size: 64 << 10,
        always_invalidate,
    }
}

fn write_read_all_sizes(always_invalidate: bool) {
    let a = addr();
    let srv = TestServer::start(
        ShmFabric::new(),
        std::slice::from_ref(&a),
        cfg(always_invalidate),
        1 << 20,
    );
    let mut c = TestClient::open(&ShmFabric::new(), vec![a], "clt-sizes");
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
    // Zero-length requests carry only the header.
    assert_eq!(c.write(0, &[]), 0);
    assert_eq!(c.read(0, 0).0, 0);
    let closed = srv.stop();
    drop(c);
    assert!(
        closed.iter().all(|p| !p.reason.contains("chunk")),
        "{closed:?}"
    );
}

#[test]
fn write_read_verified_always_invalidate() {
    write_read_all_sizes(true);
}

#[test]
fn write_read_verified_without_invalidate() {
    write_read_all_sizes(false);
}

#[test]
fn handler_errno_reaches_the_client() {
    let a = addr();
    let _srv = TestServer::start(
        ShmFabric::new(),
        std::slice::from_ref(&a),
        cfg(true),
        1 << 16,
    );
    let mut c = TestClient::open(&ShmFabric::new(), vec![a], "clt-errno");
    for errno in [-libc::EIO, -libc::ENOSPC, -libc::EOPNOTSUPP, -511] {
        let mut u = usr(OP_FAIL, 0);
        u[1..5].copy_from_slice(&errno.to_le_bytes());
        let p = c.core.get_permit().unwrap();
        c.core
            .write(p, &u, 100, 1, Instant::now())
            .map_err(|(_, e)| e)
            .unwrap();
        let done = c.wait(1).pop().unwrap();
        assert_eq!(done.errno, errno);
        c.core.put_permit(done.permit);
    }
    // Out of range on the RAM disk: the handler's own errno.
    assert_eq!(c.write(1 << 16, &[1, 2, 3]), -libc::ENOSPC);
    // An errno too large for the immediate's 9 bits becomes -EIO.
    let mut u = usr(OP_FAIL, 0);
    u[1..5].copy_from_slice(&(-1000i32).to_le_bytes());
    let p = c.core.get_permit().unwrap();
    c.core
        .write(p, &u, 0, 1, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    assert_eq!(c.wait(1)[0].errno, -libc::EIO);
}

#[test]
fn queue_depth_in_flight_and_deferred_completions() {
    let a = addr();
    let srv = TestServer::start(
        ShmFabric::new(),
        std::slice::from_ref(&a),
        cfg(true),
        1 << 20,
    );
    let mut c = TestClient::open(&ShmFabric::new(), vec![a], "clt-qd");
    let qd = c.core.queue_depth();
    assert_eq!(qd, 32);
    // Fill every permit at once, half of them completed later by the handler.
    let mut permits: Vec<_> = (0..qd).map(|_| c.core.get_permit().unwrap()).collect();
    assert!(
        c.core.get_permit().is_none(),
        "no more permits than the queue depth"
    );
    for (i, mut p) in permits.drain(..).enumerate() {
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

#[test]
fn oversized_io_is_refused_locally() {
    let a = addr();
    let _srv = TestServer::start(
        ShmFabric::new(),
        std::slice::from_ref(&a),
        cfg(false),
        1 << 16,
    );
    let mut c = TestClient::open(&ShmFabric::new(), vec![a], "clt-big");
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
    // The session still works.
    assert_eq!(c.write(0, &[9; 10]), 0);
}
