//! The RC logic of the tcp fabric without sockets: two engines over an
//! in-memory pipe, or one engine and a test that speaks raw frames.

use super::stream::ByteStream;
use super::testkit::{run, MemStream, Side};
use super::wire::{kind, op, Hdr, F_FIRST, F_LAST, HDR};
use super::TcpConfig;
use crate::{QpCap, QpState, SendWr, Wc, WcOpcode, WcStatus};

/// Tiny buffers and pieces: every message below streams in many pieces.
fn tiny() -> TcpConfig {
    TcpConfig {
        tx_buf: 16 << 10,
        rx_buf: 4 << 10,
        piece: 1024,
        ..TcpConfig::default()
    }
}

fn cap() -> QpCap {
    QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 2,
        max_recv_sge: 1,
        max_inline_data: 64,
        rnr_retry: 7,
    }
}

fn statuses(wcs: &[Wc]) -> Vec<(u64, WcStatus)> {
    wcs.iter().map(|w| (w.wr_id, w.status)).collect()
}

/// Polls both sides until `done` or a generous bound (never a timing
/// assertion: the bound only keeps a broken engine from hanging the test).
fn run_until(a: &mut Side, b: &mut Side, mut done: impl FnMut(&Side, &Side) -> bool) {
    for _ in 0..20_000 {
        if done(a, b) {
            return;
        }
        run(a, b, 1);
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    panic!("not done after 20000 rounds");
}

fn frame(h: Hdr, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; HDR];
    h.write(&mut v);
    v.extend_from_slice(payload);
    v
}

#[test]
fn write_send_read_land_and_complete_in_order() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
    a.mem.write(0, &data).unwrap();
    b.recv(100, 40_000, 20_000);
    let (bs, brk) = (b.addr(1000), b.rkey);
    let s = [a.sge(0, 20_000)];
    a.post(&SendWr::write(1, &s, bs, brk));
    a.post(&SendWr::send_with_imm(2, &s, 0xabcd));
    let r = [a.sge(30_000, 20_000)];
    a.post(&SendWr::read(3, &r, bs, brk));
    run_until(&mut a, &mut b, |a, b| a.wcs.len() == 3 && b.wcs.len() == 1);
    let aw = a.take();
    let ops: Vec<_> = aw.iter().map(|w| (w.wr_id, w.opcode, w.status)).collect();
    assert_eq!(
        ops,
        [
            (1, WcOpcode::RdmaWrite, WcStatus::Success),
            (2, WcOpcode::Send, WcStatus::Success),
            (3, WcOpcode::RdmaRead, WcStatus::Success),
        ]
    );
    let bw = b.take();
    assert_eq!((bw[0].wr_id, bw[0].opcode), (100, WcOpcode::Recv));
    assert_eq!(
        (bw[0].byte_len, bw[0].imm, bw[0].with_imm),
        (20_000, 0xabcd, true)
    );
    assert_eq!(b.read_mem(1000, 20_000), data, "WRITE landed");
    assert_eq!(b.read_mem(40_000, 20_000), data, "SEND landed");
    assert_eq!(a.read_mem(30_000, 20_000), data, "READ came back");
    // Nothing left in flight: both sides go quiet.
    run(&mut a, &mut b, 4);
    assert!(a.e.quiet() && b.e.quiet());
}

#[test]
fn write_with_imm_consumes_a_receive() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    b.recv(7, 0, 0);
    let s = [a.sge(0, 3000)];
    a.post(&SendWr::write_with_imm(1, &s, b.addr(100), b.rkey, 42));
    run_until(&mut a, &mut b, |a, b| a.wcs.len() == 1 && b.wcs.len() == 1);
    let w = b.take()[0];
    assert_eq!(
        (w.wr_id, w.opcode, w.byte_len, w.imm),
        (7, WcOpcode::RecvRdmaWithImm, 3000, 42)
    );
}

#[test]
fn bad_rkey_naks_and_both_sides_go_to_error() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    b.recv(100, 0, 64);
    let s = [a.sge(0, 64)];
    let good = b.addr(0);
    a.post(&SendWr::write(1, &s, good, b.rkey));
    a.post(&SendWr::write(2, &s, good, b.rkey ^ 0x100)); // another index
    a.post(&SendWr::write(3, &s, good, b.rkey));
    run_until(&mut a, &mut b, |a, b| {
        a.wcs.len() == 3 && b.e.state() == QpState::Error && a.e.state() == QpState::Error
    });
    assert_eq!(
        statuses(&a.take()),
        [
            (1, WcStatus::Success),
            (2, WcStatus::RemAccessErr),
            (3, WcStatus::WrFlushErr)
        ]
    );
    run(&mut a, &mut b, 2);
    assert_eq!(statuses(&b.take()), [(100, WcStatus::WrFlushErr)]);
}

#[test]
fn out_of_bounds_read_naks() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    let r = [a.sge(0, 4096)];
    let end = b.addr(super::testkit::MEM - 100);
    a.post(&SendWr::read(1, &r, end, b.rkey));
    run_until(&mut a, &mut b, |a, _| a.wcs.len() == 1);
    assert_eq!(statuses(&a.take()), [(1, WcStatus::RemAccessErr)]);
}

#[test]
fn send_larger_than_the_receive_fails_both_ends() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    b.recv(100, 0, 10);
    let s = [a.sge(0, 64)];
    a.post(&SendWr::send(1, &s));
    run_until(&mut a, &mut b, |a, b| a.wcs.len() == 1 && b.wcs.len() == 1);
    assert_eq!(statuses(&a.take()), [(1, WcStatus::RemInvReqErr)]);
    assert_eq!(statuses(&b.take()), [(100, WcStatus::LocLenErr)]);
}

#[test]
fn rnr_nak_then_retry_once_a_receive_is_posted() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    let s = [a.sge(0, 5000)];
    a.post(&SendWr::send(1, &s));
    // A WRITE behind the SEND is dropped with it and goes again after it.
    a.post(&SendWr::write(2, &s, b.addr(8000), b.rkey));
    run(&mut a, &mut b, 50);
    assert!(a.wcs.is_empty(), "stalled, not failed: {:?}", a.wcs);
    assert_eq!(a.e.state(), QpState::Rts);
    assert_eq!(b.e.state(), QpState::Rts);
    b.recv(100, 20_000, 5000);
    run_until(&mut a, &mut b, |a, b| a.wcs.len() == 2 && b.wcs.len() == 1);
    assert_eq!(
        statuses(&a.take()),
        [(1, WcStatus::Success), (2, WcStatus::Success)]
    );
    assert_eq!(b.take()[0].byte_len, 5000);
}

#[test]
fn rnr_retry_budget_runs_out() {
    let c = QpCap {
        rnr_retry: 1,
        ..cap()
    };
    let (mut a, mut b) = Side::pair(c, &tiny(), 8 << 10);
    let s = [a.sge(0, 100)];
    a.post(&SendWr::send(1, &s));
    a.post(&SendWr::send(2, &s));
    run_until(&mut a, &mut b, |a, _| a.wcs.len() == 2);
    assert_eq!(
        statuses(&a.take()),
        [(1, WcStatus::RnrRetryExcErr), (2, WcStatus::WrFlushErr)]
    );
    assert_eq!(a.e.state(), QpState::Error);
}

#[test]
fn unsignaled_requests_retire_on_acks() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    let s = [a.sge(0, 100)];
    // More than the send queue holds: only acks make room.
    for i in 0..40 {
        let wr = SendWr::write(i, &s, b.addr(0), b.rkey).unsignaled();
        while a.e.post_send(&wr).is_err() {
            run(&mut a, &mut b, 1);
        }
    }
    a.post(&SendWr::write(99, &s, b.addr(0), b.rkey));
    run_until(&mut a, &mut b, |a, _| a.wcs.len() == 1);
    assert_eq!(statuses(&a.take()), [(99, WcStatus::Success)]);
    assert!(a.e.core.sq.is_empty());
}

#[test]
fn garbage_frame_is_a_protocol_error() {
    let (mut a, mut raw) = Side::raw(cap(), &tiny(), false);
    a.recv(100, 0, 64);
    let s = [a.sge(0, 64)];
    a.post(&SendWr::write(1, &s, 0, 0));
    a.poll();
    raw.send(&[0xee; HDR]).unwrap();
    a.poll();
    a.poll();
    assert_eq!(a.e.state(), QpState::Error);
    assert_eq!(
        statuses(&a.take()),
        [(1, WcStatus::WrFlushErr), (100, WcStatus::WrFlushErr)]
    );
    a.poll();
    assert!(raw.peer_shut(), "the errored QP shuts its writing half");
}

#[test]
fn request_shorter_than_announced_is_a_protocol_error() {
    let (mut a, mut raw) = Side::raw(cap(), &tiny(), false);
    let h = Hdr {
        kind: kind::REQ,
        op: op::WRITE,
        flags: F_FIRST | F_LAST,
        piece: 10,
        total: 20,
        raddr: a.addr(0),
        rkey: a.rkey,
        ..Hdr::default()
    };
    raw.send(&frame(h, &[1; 10])).unwrap();
    a.poll();
    assert_eq!(a.e.state(), QpState::Error);
}

#[test]
fn eof_flushes_everything_outstanding() {
    let (mut a, mut raw) = Side::raw(cap(), &tiny(), false);
    a.recv(100, 0, 64);
    let s = [a.sge(0, 64)];
    a.post(&SendWr::write(1, &s, 0, 0));
    a.post(&SendWr::send(2, &s).unsignaled());
    a.poll();
    assert!(!raw.take_all().is_empty(), "the requests went out");
    raw.shutdown_write();
    a.poll();
    assert_eq!(a.e.state(), QpState::Error);
    assert_eq!(
        statuses(&a.take()),
        [
            (1, WcStatus::WrFlushErr),
            (2, WcStatus::WrFlushErr),
            (100, WcStatus::WrFlushErr)
        ]
    );
}

#[test]
fn reset_flushes_everything_outstanding() {
    let (sa, _raw) = MemStream::pair(64);
    sa.reset();
    let mut c = Side::new(3, cap(), &tiny());
    c.attach(sa, 16, false);
    c.recv(100, 0, 64);
    let s = [c.sge(0, 64)];
    c.post(&SendWr::write(1, &s, 0, 0));
    c.poll();
    assert_eq!(c.e.state(), QpState::Error);
    assert_eq!(
        statuses(&c.take()),
        [(1, WcStatus::WrFlushErr), (100, WcStatus::WrFlushErr)]
    );
}

#[test]
fn quiet_only_when_nothing_is_in_flight_or_buffered() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    assert!(a.e.quiet(), "attached and idle");
    let s = [a.sge(0, 64)];
    a.post(&SendWr::write(1, &s, b.addr(0), b.rkey));
    assert!(!a.e.quiet(), "a request not yet on the wire");
    a.poll();
    b.poll();
    a.e.drive();
    assert!(!a.e.quiet(), "its completion waits for the CQ");
    a.poll();
    assert_eq!(a.take().len(), 1);
    assert!(a.e.quiet());
    // A partial header in the rx buffer is not quiet.
    let (mut c, mut raw) = Side::raw(cap(), &tiny(), false);
    raw.send(&[kind::ACK; 10]).unwrap();
    c.poll();
    assert!(!c.e.quiet());
    assert_eq!(c.e.state(), QpState::Rts);
    // Nor is a QP with a RNR retry timer running, nor one in error.
    let (mut d, mut e) = Side::pair(cap(), &tiny(), 8 << 10);
    d.post(&SendWr::send(1, &s));
    run(&mut d, &mut e, 3);
    assert!(!d.e.quiet());
    d.e.break_off();
    assert!(!d.e.quiet());
    // Not attached: not quiet either (nothing to watch).
    assert!(!Side::new(4, cap(), &tiny()).e.quiet());
}

#[test]
fn passive_stream_must_open_with_the_rtu() {
    let (mut a, mut raw) = Side::raw(cap(), &tiny(), true);
    raw.send(&[0u8; super::cm::MSG_LEN]).unwrap();
    a.poll();
    assert_eq!(a.e.state(), QpState::Error);
    assert!(!a.e.take_rtu_seen());
}

#[test]
fn send_with_inv_invalidates_and_a_dead_key_is_refused() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    b.recv(100, 0, 64);
    let s = [a.sge(0, 64)];
    a.post(&SendWr::send_with_inv(1, &s, b.rkey));
    run_until(&mut a, &mut b, |a, b| a.wcs.len() == 1 && b.wcs.len() == 1);
    let w = b.take()[0];
    assert_eq!((w.with_inv, w.invalidated_rkey), (true, b.rkey));
    a.post(&SendWr::write(2, &s, b.addr(0), b.rkey));
    run_until(&mut a, &mut b, |a, _| a.wcs.len() == 2);
    assert_eq!(a.take()[1].status, WcStatus::RemAccessErr);
}

#[test]
fn deregistered_region_is_refused() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    b.mrs.deregister(b.index);
    let s = [a.sge(0, 64)];
    a.post(&SendWr::write(1, &s, b.addr(0), b.rkey));
    run_until(&mut a, &mut b, |a, _| a.wcs.len() == 1);
    assert_eq!(statuses(&a.take()), [(1, WcStatus::RemAccessErr)]);
}

#[test]
fn local_inv_of_a_foreign_key_fails_after_flushing_the_rest() {
    let (mut a, mut b) = Side::pair(cap(), &tiny(), 8 << 10);
    let s = [a.sge(0, 64)];
    a.post(&SendWr::write(1, &s, b.addr(0), b.rkey));
    a.post(&SendWr::local_inv(2, a.rkey ^ 0x300));
    a.poll();
    b.poll();
    assert_eq!(a.e.state(), QpState::Error);
    let w = a.take();
    assert_eq!(
        statuses(&w),
        [(1, WcStatus::WrFlushErr), (2, WcStatus::LocProtErr)]
    );
    assert_eq!(w[1].opcode, WcOpcode::LocalInv);
    // Its own key is invalidated with success.
    let (mut c, _d) = Side::pair(cap(), &tiny(), 8 << 10);
    c.post(&SendWr::local_inv(3, c.rkey));
    c.poll();
    assert_eq!(statuses(&c.take()), [(3, WcStatus::Success)]);
    assert!(c
        .mrs
        .check_rkey(c.rkey, c.addr(0), 1, crate::Access::NONE)
        .is_err());
}
