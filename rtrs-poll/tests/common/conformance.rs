//! The fabric conformance suite: one set of tests every backend runs
//! (`conformance_tests!(Backend)` instantiates them). Each test drives both
//! sides from one thread: software backends make progress when their CQs are
//! polled, so the helpers always poll both.

use super::{mem, pattern, MemExt, TestMem};
use rtrs_fabric::{
    Access, Address, Cm, CmEvent, ConnId, Cq, Fabric, FabricError, Mr, Pd, Qp, QpCap, QpState,
    RecvWr, SendWr, Sge, Wc, WcOpcode, WcStatus,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a backend provides to the suite.
pub trait Backend {
    /// The fabric under test.
    type F: Fabric;
    /// A fresh fabric.
    fn fabric() -> Self::F;
    /// A fresh address nobody listens on yet.
    fn addr() -> Address;
    /// Why this backend cannot run here (e.g. no RDMA device), if it cannot:
    /// every test then prints the reason and passes without running.
    fn skip_reason() -> Option<String> {
        None
    }
    /// Whether a re-key keeps the key's index and bumps its key byte (as
    /// `ib_inc_rkey` on a fast-registered MR). Userspace verbs re-key by
    /// registering again, which gives a new index.
    fn rekey_keeps_index() -> bool {
        true
    }
}

/// Whether the suite must skip `B` on this host (printing why).
pub fn skip<B: Backend>() -> bool {
    match B::skip_reason() {
        Some(why) => {
            eprintln!("{why}: skipped");
            true
        }
        None => false,
    }
}

const DEADLINE: Duration = Duration::from_secs(10);
const MEM: usize = 8 << 20;

/// One end of a connection with its memory.
pub struct Side<F: Fabric> {
    pub pd: F::Pd,
    pub cq: F::Cq,
    pub qp: F::Qp,
    pub cm: F::Cm,
    pub id: ConnId,
    pub mem: Arc<TestMem>,
    pub mr: F::Mr,
    pub wcs: Vec<Wc>,
}

impl<F: Fabric> Side<F> {
    pub fn new(fab: &F, cap: QpCap, mem_len: usize) -> Side<F> {
        let pd = fab.alloc_pd().unwrap();
        let cq = pd.create_cq(4096).unwrap();
        let qp = pd.create_qp(&cq, &cq, cap).unwrap();
        let cm = fab.create_cm().unwrap();
        let mem = mem(mem_len);
        let mr = pd
            .reg_mr(
                mem.clone(),
                Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
            )
            .unwrap();
        Side {
            pd,
            cq,
            qp,
            cm,
            id: ConnId(0),
            mem,
            mr,
            wcs: Vec::new(),
        }
    }

    pub fn sge(&self, off: usize, len: usize) -> Sge {
        self.mr.sge(off, len as u32)
    }

    pub fn post_recv(&mut self, wr_id: u64, off: usize, len: usize) {
        let sge = [self.sge(off, len)];
        self.qp
            .post_recv(&RecvWr {
                wr_id,
                sg_list: &sge,
            })
            .unwrap();
    }

    pub fn poll(&mut self) {
        let mut buf = [Wc::default(); 32];
        let n = self.cq.poll(&mut buf);
        self.wcs.extend_from_slice(&buf[..n]);
    }
}

/// Two connected sides: `a` connected actively to `b`'s listener.
pub struct Pair<F: Fabric> {
    pub a: Side<F>,
    pub b: Side<F>,
}

impl<F: Fabric> Pair<F> {
    pub fn connect<B: Backend<F = F>>() -> Pair<F> {
        Self::connect_with::<B>(QpCap::default(), QpCap::default(), MEM)
    }

    pub fn connect_with<B: Backend<F = F>>(cap_a: QpCap, cap_b: QpCap, mem_len: usize) -> Pair<F> {
        let fab = B::fabric();
        Self::connect_on(&fab, &fab, &B::addr(), cap_a, cap_b, mem_len)
    }

    /// `a` on `fab_a` connects to `b` on `fab_b` listening on `addr`.
    pub fn connect_on(
        fab_a: &F,
        fab_b: &F,
        addr: &Address,
        cap_a: QpCap,
        cap_b: QpCap,
        mem_len: usize,
    ) -> Pair<F> {
        let mut a = Side::new(fab_a, cap_a, mem_len);
        let mut b = Side::new(fab_b, cap_b, mem_len);
        b.cm.listen(addr).unwrap();
        a.id = a.cm.connect(addr, &a.qp, b"hello").unwrap();
        let (mut a_up, mut b_up) = (false, false);
        let t0 = Instant::now();
        while !(a_up && b_up) {
            assert!(t0.elapsed() < DEADLINE, "connect timed out");
            if let Some(ev) = b.cm.poll_event(Duration::from_millis(1)).unwrap() {
                match ev {
                    CmEvent::ConnectRequest {
                        id, private_data, ..
                    } => {
                        assert_eq!(private_data.as_bytes(), b"hello");
                        b.id = id;
                        b.cm.accept(id, &b.qp, b"world").unwrap();
                    }
                    CmEvent::Established { id, .. } => {
                        assert_eq!(id, b.id);
                        b_up = true;
                    }
                    other => panic!("passive side: unexpected {other:?}"),
                }
            }
            if let Some(ev) = a.cm.poll_event(Duration::from_millis(1)).unwrap() {
                match ev {
                    CmEvent::Established { id, private_data } => {
                        assert_eq!(id, a.id);
                        assert_eq!(private_data.as_bytes(), b"world");
                        a_up = true;
                    }
                    other => panic!("active side: unexpected {other:?}"),
                }
            }
        }
        assert_eq!(a.qp.state(), QpState::Rts);
        assert_eq!(b.qp.state(), QpState::Rts);
        Pair { a, b }
    }

    /// Polls both sides until `a` has `na` and `b` has `nb` completions.
    pub fn wait(&mut self, na: usize, nb: usize) -> (Vec<Wc>, Vec<Wc>) {
        let t0 = Instant::now();
        while self.a.wcs.len() < na || self.b.wcs.len() < nb {
            assert!(
                t0.elapsed() < DEADLINE,
                "timed out waiting for {na}/{nb} completions: a has {} (first {:?}), b has {} (first {:?})",
                self.a.wcs.len(),
                self.a.wcs.first(),
                self.b.wcs.len(),
                self.b.wcs.first()
            );
            self.a.poll();
            self.b.poll();
        }
        (
            self.a.wcs.drain(..na).collect(),
            self.b.wcs.drain(..nb).collect(),
        )
    }

    /// Polls both sides for `d`, expecting nothing new.
    pub fn idle(&mut self, d: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < d {
            self.a.poll();
            self.b.poll();
        }
    }
}

pub fn ok(wc: &Wc, wr_id: u64, opcode: WcOpcode) {
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (wr_id, WcStatus::Success, opcode),
        "{wc:?}"
    );
}

const SIZES: [usize; 8] = [0, 1, 63, 4095, 4096, 65537, 1 << 20, 4 << 20];

pub fn connect_and_private_data<B: Backend>() {
    let p = Pair::<B::F>::connect::<B>();
    assert_ne!(p.a.qp.qp_num(), p.b.qp.qp_num());
}

pub fn send_recv_sizes<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    for (i, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, i as u64);
        p.a.mem.fill(0, &data);
        p.b.post_recv(100 + i as u64, MEM / 2, MEM / 2);
        let sge = [p.a.sge(0, len)];
        p.a.qp.post_send(&SendWr::send(i as u64, &sge)).unwrap();
        let (a, b) = p.wait(1, 1);
        ok(&a[0], i as u64, WcOpcode::Send);
        ok(&b[0], 100 + i as u64, WcOpcode::Recv);
        assert_eq!(b[0].byte_len as usize, len);
        assert!(!b[0].with_imm && !b[0].with_inv);
        assert_eq!(p.b.mem.read_vec(MEM / 2, len), data, "size {len}");
    }
}

pub fn send_with_imm<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    p.a.mem.fill(0, b"imm!");
    p.b.post_recv(7, 0, 64);
    let sge = [p.a.sge(0, 4)];
    p.a.qp
        .post_send(&SendWr::send_with_imm(1, &sge, 0xdead_beef))
        .unwrap();
    let (_, b) = p.wait(1, 1);
    ok(&b[0], 7, WcOpcode::Recv);
    assert!(b[0].with_imm);
    assert_eq!((b[0].imm, b[0].byte_len), (0xdead_beef, 4));
    assert_eq!(p.b.mem.read_vec(0, 4), b"imm!");
}

pub fn write_and_write_with_imm_sizes<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    for (i, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, 50 + i as u64);
        p.a.mem.fill(0, &data);
        let sge = [p.a.sge(0, len)];
        let raddr = p.b.mem.addr(MEM / 2);
        let rkey = p.b.mr.rkey();
        p.a.qp
            .post_send(&SendWr::write(i as u64, &sge, raddr, rkey))
            .unwrap();
        let (a, _) = p.wait(1, 0);
        ok(&a[0], i as u64, WcOpcode::RdmaWrite);
        assert_eq!(p.b.mem.read_vec(MEM / 2, len), data, "write size {len}");

        let data = pattern(len, 80 + i as u64);
        p.a.mem.fill(0, &data);
        p.b.post_recv(200 + i as u64, 0, 0);
        p.a.qp
            .post_send(&SendWr::write_with_imm(
                i as u64, &sge, raddr, rkey, i as u32,
            ))
            .unwrap();
        let (a, b) = p.wait(1, 1);
        ok(&a[0], i as u64, WcOpcode::RdmaWrite);
        ok(&b[0], 200 + i as u64, WcOpcode::RecvRdmaWithImm);
        assert!(b[0].with_imm);
        assert_eq!((b[0].imm, b[0].byte_len as usize), (i as u32, len));
        assert_eq!(
            p.b.mem.read_vec(MEM / 2, len),
            data,
            "write_with_imm size {len}"
        );
    }
}

pub fn read_sizes<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    for (i, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, 90 + i as u64);
        p.b.mem.fill(MEM / 2, &data);
        let sge = [p.a.sge(0, len)];
        p.a.qp
            .post_send(&SendWr::read(
                i as u64,
                &sge,
                p.b.mem.addr(MEM / 2),
                p.b.mr.rkey(),
            ))
            .unwrap();
        let (a, _) = p.wait(1, 0);
        ok(&a[0], i as u64, WcOpcode::RdmaRead);
        assert_eq!(p.a.mem.read_vec(0, len), data, "read size {len}");
    }
}

pub fn scatter_gather_lists<B: Backend>() {
    let mut p = Pair::<B::F>::connect_with::<B>(
        QpCap {
            max_send_sge: 3,
            max_recv_sge: 3,
            ..QpCap::default()
        },
        QpCap {
            max_send_sge: 3,
            max_recv_sge: 3,
            ..QpCap::default()
        },
        MEM,
    );
    let parts = [pattern(100, 1), pattern(5000, 2), pattern(7, 3)];
    let offs = [0usize, 4096, 65536];
    for (d, o) in parts.iter().zip(offs) {
        p.a.mem.fill(o, d);
    }
    let whole: Vec<u8> = parts.concat();
    let sges = [p.a.sge(0, 100), p.a.sge(4096, 5000), p.a.sge(65536, 7)];
    // SEND gathered from three pieces, scattered into three receive pieces.
    let rsges = [
        p.b.sge(1000, 10),
        p.b.sge(200_000, 5000),
        p.b.sge(300_000, 1000),
    ];
    p.b.qp
        .post_recv(&RecvWr {
            wr_id: 9,
            sg_list: &rsges,
        })
        .unwrap();
    p.a.qp.post_send(&SendWr::send(1, &sges)).unwrap();
    let (_, b) = p.wait(1, 1);
    assert_eq!(b[0].byte_len as usize, whole.len());
    let mut got = p.b.mem.read_vec(1000, 10);
    got.extend(p.b.mem.read_vec(200_000, 5000));
    got.extend(p.b.mem.read_vec(300_000, whole.len() - 5010));
    assert_eq!(got, whole);
    // RDMA WRITE gathered.
    let (raddr, rkey) = (p.b.mem.addr(MEM / 2), p.b.mr.rkey());
    p.a.qp
        .post_send(&SendWr::write(2, &sges, raddr, rkey))
        .unwrap();
    p.wait(1, 0);
    assert_eq!(p.b.mem.read_vec(MEM / 2, whole.len()), whole);
    // RDMA READ scattered.
    let dst = [p.a.sge(100_000, 3), p.a.sge(200_000, whole.len() - 3)];
    p.a.qp
        .post_send(&SendWr::read(3, &dst, raddr, rkey))
        .unwrap();
    p.wait(1, 0);
    let mut got = p.a.mem.read_vec(100_000, 3);
    got.extend(p.a.mem.read_vec(200_000, whole.len() - 3));
    assert_eq!(got, whole);
}

pub fn rc_ordering_and_unsignaled<B: Backend>() {
    let mut p = Pair::<B::F>::connect_with::<B>(
        QpCap {
            max_send_wr: 1024,
            ..QpCap::default()
        },
        QpCap::default(),
        MEM,
    );
    let (raddr, rkey) = (p.b.mem.addr(0), p.b.mr.rkey());
    // 500 unsignaled writes of increasing counters to one place, each followed
    // in the data by its own slot, then a signaled SEND: when the SEND lands,
    // every write before it has landed.
    for i in 0..500u32 {
        p.a.mem.fill(i as usize * 4, &i.to_le_bytes());
        let sge = [p.a.sge(i as usize * 4, 4)];
        p.a.qp
            .post_send(&SendWr::write(i as u64, &sge, raddr, rkey).unsignaled())
            .unwrap();
        let sge = [p.a.sge(i as usize * 4, 4)];
        p.a.qp
            .post_send(
                &SendWr::write(i as u64, &sge, raddr + 4 + u64::from(i) * 4, rkey).unsignaled(),
            )
            .unwrap();
        if i % 100 == 99 {
            p.a.poll();
        }
    }
    p.b.post_recv(1, MEM / 2, 64);
    p.a.mem.fill(MEM / 2, b"done");
    let sge = [p.a.sge(MEM / 2, 4)];
    p.a.qp.post_send(&SendWr::send(999, &sge)).unwrap();
    let (a, _) = p.wait(1, 1);
    ok(&a[0], 999, WcOpcode::Send);
    assert_eq!(p.b.mem.read_vec(0, 4), 499u32.to_le_bytes());
    for i in 0..500u32 {
        assert_eq!(p.b.mem.read_vec(4 + i as usize * 4, 4), i.to_le_bytes());
    }
    p.idle(Duration::from_millis(20));
    assert!(
        p.a.wcs.is_empty(),
        "unsignaled requests completed: {:?}",
        p.a.wcs
    );
    // Signaled completions come back in posting order.
    for i in 0..64u64 {
        let sge = [p.a.sge(0, 8)];
        p.a.qp
            .post_send(&SendWr::write(i, &sge, raddr, rkey))
            .unwrap();
    }
    let (a, _) = p.wait(64, 0);
    assert_eq!(
        a.iter().map(|w| w.wr_id).collect::<Vec<_>>(),
        (0..64).collect::<Vec<_>>()
    );
}

pub fn inline_data<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    p.a.mem.fill(0, b"inline payload");
    p.b.post_recv(1, 0, 64);
    let sge = [p.a.sge(0, 14)];
    p.a.qp.post_send(&SendWr::send(1, &sge).inlined()).unwrap();
    // The buffer may be reused as soon as post_send returns.
    p.a.mem.fill(0, b"XXXXXXXXXXXXXX");
    let (_, b) = p.wait(1, 1);
    assert_eq!(b[0].byte_len, 14);
    assert_eq!(p.b.mem.read_vec(0, 14), b"inline payload");
    let big = [p.a.sge(0, 4096)];
    assert!(matches!(
        p.a.qp.post_send(&SendWr::send(2, &big).inlined()),
        Err(FabricError::InvalidWr(_))
    ));
}

pub fn expect_access_error<F: Fabric>(p: &mut Pair<F>, wr: SendWr<'_>) {
    p.b.post_recv(50, 0, 64);
    p.a.qp.post_send(&wr).unwrap();
    // A second request behind it is flushed.
    let sge = [p.a.sge(0, 8)];
    p.a.qp
        .post_send(&SendWr::write(77, &sge, p.b.mem.addr(0), p.b.mr.rkey()))
        .unwrap();
    let (a, b) = p.wait(2, 1);
    assert_eq!(
        (a[0].wr_id, a[0].status),
        (wr.wr_id, WcStatus::RemAccessErr),
        "{a:?}"
    );
    assert_eq!((a[1].wr_id, a[1].status), (77, WcStatus::WrFlushErr));
    assert_eq!(p.a.qp.state(), QpState::Error);
    // The responder's posted receive is flushed too.
    assert_eq!((b[0].wr_id, b[0].status), (50, WcStatus::WrFlushErr));
    // Posting on a QP in error completes at once with a flush.
    p.a.qp.post_send(&SendWr::write(78, &sge, 0, 0)).unwrap();
    let (a, _) = p.wait(1, 0);
    assert_eq!((a[0].wr_id, a[0].status), (78, WcStatus::WrFlushErr));
}

pub fn wrong_rkey<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    let sge = [p.a.sge(0, 8)];
    let wr = SendWr::write(1, &sge, p.b.mem.addr(0), p.b.mr.rkey() ^ 0x100);
    expect_access_error(&mut p, wr);
}

pub fn out_of_bounds_rkey<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    let sge = [p.a.sge(0, 16)];
    let wr = SendWr::write(1, &sge, p.b.mem.addr(MEM - 8), p.b.mr.rkey());
    expect_access_error(&mut p, wr);
}

pub fn read_without_remote_read_access<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    let mem = mem(4096);
    let mr =
        p.b.pd
            .reg_mr(mem.clone(), Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
    let sge = [p.a.sge(0, 16)];
    let wr = SendWr::read(1, &sge, mem.addr(0), mr.rkey());
    expect_access_error(&mut p, wr);
}

pub fn rekey_and_local_invalidate<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    let old = p.b.mr.rkey();
    let new = p.b.mr.rekey().unwrap();
    assert_ne!(old, new);
    if B::rekey_keeps_index() {
        assert_eq!(
            old >> 8,
            new >> 8,
            "re-keying keeps the index, changes the key byte"
        );
    }
    let sge = [p.a.sge(0, 8)];
    // The new key works ...
    p.a.qp
        .post_send(&SendWr::write(1, &sge, p.b.mem.addr(0), new))
        .unwrap();
    let (a, _) = p.wait(1, 0);
    ok(&a[0], 1, WcOpcode::RdmaWrite);
    // ... LOCAL_INV of it completes, after which it fails.
    p.b.qp.post_send(&SendWr::local_inv(5, new)).unwrap();
    let (_, b) = p.wait(0, 1);
    ok(&b[0], 5, WcOpcode::LocalInv);
    assert_eq!(p.b.mr.rkey(), 0);
    let wr = SendWr::write(2, &sge, p.b.mem.addr(0), new);
    expect_access_error(&mut p, wr);
}

/// A re-key posted as a work request (after an invalidation, as a server
/// with always_invalidate does): the new key works once it completed, the
/// old one never again.
pub fn rekey_as_work_request<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    let old = p.b.mr.rkey();
    p.b.mr.invalidate();
    assert_eq!(p.b.mr.rkey(), 0);
    let key = {
        let r = p.b.mr.rekey_wr().unwrap();
        p.b.qp.post_send(&SendWr::rekey(7, r)).unwrap();
        r.rkey
    };
    assert_ne!(key, old);
    assert_ne!(key, 0);
    let (_, b) = p.wait(0, 1);
    ok(&b[0], 7, WcOpcode::Rekey);
    assert_eq!(p.b.mr.rkey(), key);
    let sge = [p.a.sge(0, 8)];
    p.a.qp
        .post_send(&SendWr::write(1, &sge, p.b.mem.addr(0), key))
        .unwrap();
    let (a, _) = p.wait(1, 0);
    ok(&a[0], 1, WcOpcode::RdmaWrite);
    // Once more, unsignaled, chained before a send: the key moves on.
    p.a.post_recv(4, 0, 64);
    let key2 = {
        let r = p.b.mr.rekey_wr().unwrap();
        let chain = [SendWr::rekey(8, r).unsignaled(), SendWr::send(9, &[])];
        p.b.qp.post_send_batch(&chain).unwrap();
        r.rkey
    };
    assert_ne!(key2, key);
    let (a, b) = p.wait(1, 1);
    ok(&b[0], 9, WcOpcode::Send);
    ok(&a[0], 4, WcOpcode::Recv);
    assert_eq!(p.b.mr.rkey(), key2);
    let wr = SendWr::write(2, &sge, p.b.mem.addr(0), old);
    expect_access_error(&mut p, wr);
}

/// The chain a server with always_invalidate posts for a response: the
/// chunk invalidated when the request came, then [re-key (unsignaled),
/// SEND_WITH_IMM of the 8-byte RKEY_RSP, inline]. When the receive
/// completes, the new key is live and the old one dead; the unsignaled
/// re-key completes nothing (on the software fabrics it posts nothing at
/// all: `rekey_wr` did the re-key).
pub fn rekey_chain_as_a_server_posts_it<B: Backend>() {
    let cap = QpCap {
        max_inline_data: 8,
        ..QpCap::default()
    };
    let mut p = Pair::<B::F>::connect_with::<B>(QpCap::default(), cap, MEM);
    let sge = [p.a.sge(0, 8)];
    let mut old = p.b.mr.rkey();
    for round in 0..3u64 {
        // The request arrives: the chunk's key dies at once.
        p.b.mr.invalidate();
        assert_eq!(p.b.mr.rkey(), 0);
        p.a.post_recv(10 + round, 64, 8);
        let key = {
            let r = p.b.mr.rekey_wr().unwrap();
            p.b.mem.fill(128, &u64::from(r.rkey).to_le_bytes());
            let msg = [p.b.sge(128, 8)];
            let chain = [
                SendWr::rekey(20 + round, r).unsignaled(),
                SendWr::send_with_imm(30 + round, &msg, 0x1234).inlined(),
            ];
            p.b.qp.post_send_batch(&chain).unwrap();
            // The slot may be rewritten at once (inline).
            p.b.mem.fill(128, &[0xee; 8]);
            r.rkey
        };
        assert_ne!(key, old);
        assert_ne!(key, 0);
        let (a, b) = p.wait(1, 1);
        let w = a[0];
        ok(&w, 10 + round, WcOpcode::Recv);
        // One completion on the responder: the send; the re-key none.
        ok(&b[0], 30 + round, WcOpcode::Send);
        assert!(w.with_imm);
        assert_eq!((w.imm, w.byte_len), (0x1234, 8));
        assert_eq!(
            p.a.mem.read_vec(64, 8),
            u64::from(key).to_le_bytes(),
            "the new key, as posted (inline)"
        );
        assert_eq!(p.b.mr.rkey(), key, "live when the client learns it");
        // The new key works.
        p.a.qp
            .post_send(&SendWr::write(40 + round, &sge, p.b.mem.addr(0), key))
            .unwrap();
        let (a, _) = p.wait(1, 0);
        ok(&a[0], 40 + round, WcOpcode::RdmaWrite);
        p.idle(Duration::from_millis(5));
        assert!(
            p.b.wcs.is_empty(),
            "unsignaled re-key completed: {:?}",
            p.b.wcs
        );
        old = key;
    }
    // And the previous key is dead (the QP goes to error: last).
    p.b.mr.invalidate();
    let r = p.b.mr.rekey_wr().unwrap();
    p.b.qp
        .post_send(&SendWr::rekey(50, r).unsignaled())
        .unwrap();
    let wr = SendWr::write(2, &sge, p.b.mem.addr(0), old);
    expect_access_error(&mut p, wr);
}

pub fn old_rkey_fails_after_rekey<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    let old = p.b.mr.rkey();
    p.b.mr.rekey().unwrap();
    let sge = [p.a.sge(0, 8)];
    let wr = SendWr::write(1, &sge, p.b.mem.addr(0), old);
    expect_access_error(&mut p, wr);
}

/// A per-IO key (Access::PER_IO_KEY, a client's read buffer): bound by a
/// re-key chained before a send on the QP that carries it, dropped by the
/// peer's SEND_WITH_INV (the owner learns it through `peer_invalidated`);
/// a re-key while the key is still valid (the peer did not invalidate)
/// kills it first. On rdma this is a type-2 memory window.
pub fn send_with_invalidate<B: Backend>() {
    if !B::fabric().remote_invalidate() {
        eprintln!(
            "{}: peers cannot invalidate this backend's keys: skipped",
            B::fabric().name()
        );
        return;
    }
    let mut p = Pair::<B::F>::connect::<B>();
    let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::PER_IO_KEY;
    let buf =
        p.b.pd
            .reg_mr_range(p.b.mem.clone(), 4096, 4096, rw)
            .unwrap();
    let raddr = buf.addr();
    // Bound in the same chain as a send, as a read request carries it.
    let bind_and_send = |p: &mut Pair<B::F>, id: u64| -> u32 {
        p.a.post_recv(id, 0, 64);
        let r = buf.rekey_wr().unwrap();
        let sge = [p.b.sge(0, 8)];
        p.b.qp
            .post_send_batch(&[SendWr::rekey(id, r).unsignaled(), SendWr::send(id, &sge)])
            .unwrap();
        let (a, b) = p.wait(1, 1);
        ok(&a[0], id, WcOpcode::Recv);
        ok(&b[0], id, WcOpcode::Send);
        assert_eq!(buf.rkey(), r.rkey);
        r.rkey
    };
    let key = bind_and_send(&mut p, 1);
    assert_ne!(key, 0);
    let sge = [p.a.sge(0, 8)];
    p.a.qp
        .post_send(&SendWr::write(2, &sge, raddr, key))
        .unwrap();
    let (a, _) = p.wait(1, 0);
    ok(&a[0], 2, WcOpcode::RdmaWrite);
    // The peer invalidates it.
    p.b.post_recv(3, 0, 64);
    p.a.qp
        .post_send(&SendWr::send_with_inv(4, &[], key))
        .unwrap();
    let (a, b) = p.wait(1, 1);
    ok(&a[0], 4, WcOpcode::Send);
    ok(&b[0], 3, WcOpcode::Recv);
    assert!(b[0].with_inv);
    assert_eq!((b[0].invalidated_rkey, b[0].byte_len), (key, 0));
    assert!(buf.peer_invalidated(key));
    assert_eq!(buf.rkey(), 0);
    // A fresh key for the next IO; the peer does not invalidate this one,
    // so the re-key after it kills it first.
    let key2 = bind_and_send(&mut p, 5);
    assert_ne!(key2, key);
    let key3 = bind_and_send(&mut p, 6);
    assert!(key3 != key2 && key3 != 0);
    p.a.qp
        .post_send(&SendWr::write(7, &sge, raddr, key3))
        .unwrap();
    let (a, _) = p.wait(1, 0);
    ok(&a[0], 7, WcOpcode::RdmaWrite);
    expect_access_error(&mut p, SendWr::write(8, &sge, raddr, key2));
}

pub fn receive_too_small<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    p.b.post_recv(3, 0, 8);
    let sge = [p.a.sge(0, 64)];
    p.a.qp.post_send(&SendWr::send(1, &sge)).unwrap();
    let (a, b) = p.wait(1, 1);
    // IB says REM_INV_REQ; soft-RoCE (6.1) reports REM_OP at the sender.
    assert_eq!(a[0].wr_id, 1);
    assert!(
        matches!(a[0].status, WcStatus::RemInvReqErr | WcStatus::RemOpErr),
        "{:?}",
        a[0].status
    );
    // The receive fails locally: LOC_LEN (soft-RoCE may report LOC_QP_OP,
    // having moved the QP to error first).
    assert_eq!(b[0].wr_id, 3);
    assert!(
        matches!(b[0].status, WcStatus::LocLenErr | WcStatus::LocQpOpErr),
        "{:?}",
        b[0].status
    );
    assert_eq!(p.a.qp.state(), QpState::Error);
}

pub fn rnr_retries_forever_by_default<B: Backend>() {
    let mut p = Pair::<B::F>::connect::<B>();
    p.a.mem.fill(0, b"late");
    let sge = [p.a.sge(0, 4)];
    p.a.qp.post_send(&SendWr::send(1, &sge)).unwrap();
    p.idle(Duration::from_millis(50));
    assert!(
        p.a.wcs.is_empty() && p.b.wcs.is_empty(),
        "a SEND completed with no receive posted"
    );
    assert_eq!(p.a.qp.state(), QpState::Rts);
    p.b.post_recv(2, 0, 64);
    let (a, b) = p.wait(1, 1);
    ok(&a[0], 1, WcOpcode::Send);
    ok(&b[0], 2, WcOpcode::Recv);
    assert_eq!(p.b.mem.read_vec(0, 4), b"late");
}

pub fn rnr_retry_exceeded<B: Backend>() {
    let cap = QpCap {
        rnr_retry: 1,
        ..QpCap::default()
    };
    let mut p = Pair::<B::F>::connect_with::<B>(cap, QpCap::default(), MEM);
    let sge = [p.a.sge(0, 4)];
    p.a.qp.post_send(&SendWr::send(1, &sge)).unwrap();
    p.a.qp.post_send(&SendWr::send(2, &sge)).unwrap();
    let (a, _) = p.wait(2, 0);
    assert_eq!((a[0].wr_id, a[0].status), (1, WcStatus::RnrRetryExcErr));
    assert_eq!((a[1].wr_id, a[1].status), (2, WcStatus::WrFlushErr));
    assert_eq!(p.a.qp.state(), QpState::Error);
}

/// Polls both sides' CQs until `me` sees a CM event.
pub fn wait_event<F: Fabric>(me: &mut Side<F>, other: &mut Side<F>) -> CmEvent {
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < DEADLINE, "no CM event");
        me.poll();
        other.poll();
        if let Some(ev) = me.cm.poll_event(Duration::from_millis(1)).unwrap() {
            return ev;
        }
    }
}

pub fn disconnect_mid_traffic<B: Backend>() {
    let mut p = Pair::<B::F>::connect_with::<B>(
        QpCap {
            max_send_wr: 512,
            ..QpCap::default()
        },
        QpCap::default(),
        MEM,
    );
    let (raddr, rkey) = (p.b.mem.addr(0), p.b.mr.rkey());
    let sge = [p.a.sge(0, 65536)];
    for i in 0..256 {
        p.a.qp
            .post_send(&SendWr::write(i, &sge, raddr, rkey))
            .unwrap();
    }
    p.b.post_recv(9, 0, 64);
    let a_id = p.a.id;
    p.a.cm.disconnect(a_id).unwrap();
    let ev = wait_event(&mut p.a, &mut p.b);
    assert!(
        matches!(ev, CmEvent::Disconnected { id } if id == a_id),
        "{ev:?}"
    );
    let ev = wait_event(&mut p.b, &mut p.a);
    assert!(matches!(ev, CmEvent::Disconnected { .. }), "{ev:?}");
    // Every request completes exactly once: done before the cut, or flushed.
    let (a, b) = p.wait(256, 1);
    let mut seen: Vec<u64> = a.iter().map(|w| w.wr_id).collect();
    seen.sort();
    assert_eq!(seen, (0..256).collect::<Vec<_>>());
    assert!(a
        .iter()
        .all(|w| w.status == WcStatus::Success || w.status == WcStatus::WrFlushErr));
    let first_flush = a
        .iter()
        .position(|w| w.status == WcStatus::WrFlushErr)
        .unwrap_or(256);
    assert!(a[first_flush..]
        .iter()
        .all(|w| w.status == WcStatus::WrFlushErr));
    assert_eq!((b[0].wr_id, b[0].status), (9, WcStatus::WrFlushErr));
    assert_eq!(p.a.qp.state(), QpState::Error);
    assert_eq!(p.b.qp.state(), QpState::Error);
}

pub fn reject_and_unreachable<B: Backend>() {
    let fab = B::fabric();
    let addr = B::addr();
    let mut a = Side::new(&fab, QpCap::default(), 4096);
    let mut b = Side::new(&fab, QpCap::default(), 4096);
    // Nobody listens yet.
    let id = a.cm.connect(&addr, &a.qp, b"x").unwrap();
    let ev = wait_event(&mut a, &mut b);
    assert!(
        matches!(ev, CmEvent::Unreachable { id: i, .. } if i == id),
        "{ev:?}"
    );
    b.cm.listen(&addr).unwrap();
    let id = a.cm.connect(&addr, &a.qp, b"please").unwrap();
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < DEADLINE, "no connect request");
        // Both CMs: a connect may go on (route, REQ) as its CM is polled.
        if let Some(ev) = a.cm.poll_event(Duration::from_millis(1)).unwrap() {
            panic!("active side before the reject: {ev:?}");
        }
        if let Some(CmEvent::ConnectRequest { id, .. }) =
            b.cm.poll_event(Duration::from_millis(5)).unwrap()
        {
            b.cm.reject(id, b"no thanks").unwrap();
            break;
        }
    }
    let ev = wait_event(&mut a, &mut b);
    match ev {
        CmEvent::Rejected {
            id: i,
            private_data,
        } => {
            assert_eq!(i, id);
            assert_eq!(private_data.as_bytes(), b"no thanks");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        a.cm.connect(&addr, &a.qp, &[0u8; 57]),
        Err(FabricError::PrivateDataTooLong(57))
    ));
    let sge = [a.sge(0, 1)];
    assert!(matches!(
        a.qp.post_send(&SendWr::send(1, &sge)),
        Err(FabricError::BadQpState { .. })
    ));
}

pub fn many_qps_on_one_cq<B: Backend>() {
    const N: usize = 8;
    let fab = B::fabric();
    let addr = B::addr();
    let pd_a = fab.alloc_pd().unwrap();
    let pd_b = fab.alloc_pd().unwrap();
    let mut cq_a = pd_a.create_cq(1024).unwrap();
    let mut cq_b = pd_b.create_cq(1024).unwrap();
    let mut cm_a = fab.create_cm().unwrap();
    let mut cm_b = fab.create_cm().unwrap();
    let mem_a = mem(1 << 20);
    let mem_b = mem(1 << 20);
    let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    let mr_a = pd_a.reg_mr(mem_a.clone(), rw).unwrap();
    let mr_b = pd_b.reg_mr(mem_b.clone(), rw).unwrap();
    let mut qa: Vec<_> = (0..N)
        .map(|_| pd_a.create_qp(&cq_a, &cq_a, QpCap::default()).unwrap())
        .collect();
    let mut qb: Vec<_> = (0..N)
        .map(|_| pd_b.create_qp(&cq_b, &cq_b, QpCap::default()).unwrap())
        .collect();
    cm_b.listen(&addr).unwrap();
    let mut up = 0;
    let mut accepted = 0;
    for q in &qa {
        cm_a.connect(&addr, q, b"").unwrap();
    }
    let t0 = Instant::now();
    while up < 2 * N {
        assert!(t0.elapsed() < DEADLINE);
        if let Some(ev) = cm_b.poll_event(Duration::from_millis(1)).unwrap() {
            match ev {
                CmEvent::ConnectRequest { id, .. } => {
                    cm_b.accept(id, &qb[accepted], b"").unwrap();
                    accepted += 1;
                }
                CmEvent::Established { .. } => up += 1,
                other => panic!("{other:?}"),
            }
        }
        if let Some(ev) = cm_a.poll_event(Duration::from_millis(1)).unwrap() {
            assert!(matches!(ev, CmEvent::Established { .. }), "{ev:?}");
            up += 1;
        }
    }
    // Which passive QP each active QP reached is up to the listener's order;
    // every passive QP posts receives, every active QP writes with its index.
    for (i, q) in qb.iter_mut().enumerate() {
        for k in 0..4 {
            q.post_recv(&RecvWr {
                wr_id: (i * 10 + k) as u64,
                sg_list: &[],
            })
            .unwrap();
        }
    }
    for (i, q) in qa.iter_mut().enumerate() {
        mem_a.fill(i * 64, &[i as u8; 64]);
        let sge = [mr_a.sge(i * 64, 64)];
        for k in 0..4u32 {
            q.post_send(&SendWr::write_with_imm(
                (i * 10) as u64 + u64::from(k),
                &sge,
                mem_b.addr(i * 64),
                mr_b.rkey(),
                (i as u32) << 8 | k,
            ))
            .unwrap();
        }
    }
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    while wa.len() < 4 * N || wb.len() < 4 * N {
        assert!(t0.elapsed() < DEADLINE, "{} {}", wa.len(), wb.len());
        let mut buf = [Wc::default(); 5];
        let n = cq_a.poll(&mut buf);
        wa.extend_from_slice(&buf[..n]);
        let n = cq_b.poll(&mut buf);
        wb.extend_from_slice(&buf[..n]);
    }
    assert!(wa.iter().chain(&wb).all(|w| w.status == WcStatus::Success));
    let qa_nums: Vec<u32> = qa.iter().map(|q| q.qp_num()).collect();
    let qb_nums: Vec<u32> = qb.iter().map(|q| q.qp_num()).collect();
    for w in &wa {
        assert_eq!(qa_nums[(w.wr_id / 10) as usize], w.qp_num);
    }
    for q in &qb_nums {
        assert_eq!(wb.iter().filter(|w| w.qp_num == *q).count(), 4);
    }
    for i in 0..N {
        assert_eq!(mem_b.read_vec(i * 64, 64), vec![i as u8; 64]);
    }
}

/// Registrations over fresh memories made and dropped on one PD, as a server's
/// connections and a client's reconnects make them: many more than a PD keeps
/// tables for. Each one works, the peer gets its bytes (never those of an
/// earlier memory that stood in the same place) and its memory is freed once
/// its MR and the caller's handle are gone.
pub fn registrations_come_and_go<B: Backend>() {
    const CYCLES: u64 = 600;
    let mut p = Pair::<B::F>::connect::<B>();
    let (raddr, rkey) = (p.b.mem.addr(0), p.b.mr.rkey());
    for i in 0..CYCLES {
        let m = mem(4096);
        let data = pattern(64, 1000 + i);
        m.fill(0, &data);
        let mr = p.a.pd.reg_mr(m.clone(), Access::LOCAL_WRITE);
        let mr = mr.unwrap_or_else(|e| panic!("registration {i}: {e}"));
        let sge = [mr.sge(0, 64)];
        p.a.qp
            .post_send(&SendWr::write(i, &sge, raddr, rkey))
            .unwrap();
        let (a, _) = p.wait(1, 0);
        ok(&a[0], i, WcOpcode::RdmaWrite);
        assert_eq!(p.b.mem.read_vec(0, 64), data, "registration {i}");
        let gone = Arc::downgrade(&m);
        drop((mr, m));
        assert!(
            gone.upgrade().is_none(),
            "registration {i}: its memory outlived its MR"
        );
    }
}

// ---------------------------------------------------------------------------
// Across processes: the test binary runs itself as an echo server.

const CHILD_ENV: &str = "RTRS_CONFORMANCE_CHILD";
const SLOT: usize = 64 << 10;
const SLOTS: u32 = 16;

fn keys_pdata(mem: &TestMem, off: usize, rkey: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&mem.addr(off).to_le_bytes());
    b[8..].copy_from_slice(&rkey.to_le_bytes());
    b
}

fn parse_keys(b: &[u8]) -> (u64, u32) {
    assert_eq!(b.len(), 12, "key exchange private data");
    (
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..].try_into().unwrap()),
    )
}

/// The child's side (a no-op unless the parent started this process with
/// `RTRS_CONFORMANCE_CHILD=ADDR`): accept one connection and echo every
/// WRITE_WITH_IMM back into the parent's memory until disconnected.
pub fn child_echo_server<B: Backend>() {
    let Ok(addr) = std::env::var(CHILD_ENV) else {
        return;
    };
    let addr: Address = addr.parse().unwrap();
    let fab = B::fabric();
    let mut me = Side::new(&fab, QpCap::default(), SLOT * SLOTS as usize);
    me.cm.listen(&addr).unwrap();
    let mut peer = None;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        match me
            .cm
            .poll_event(Duration::from_millis(if peer.is_some() { 0 } else { 5 }))
            .unwrap()
        {
            Some(CmEvent::ConnectRequest {
                id, private_data, ..
            }) => {
                peer = Some(parse_keys(private_data.as_bytes()));
                for i in 0..64 {
                    me.qp
                        .post_recv(&RecvWr {
                            wr_id: i,
                            sg_list: &[],
                        })
                        .unwrap();
                }
                let pd = keys_pdata(&*me.mem, 0, me.mr.rkey());
                me.cm.accept(id, &me.qp, &pd).unwrap();
            }
            Some(CmEvent::Disconnected { .. }) => break,
            Some(_) | None => {}
        }
        let Some((raddr, rkey)) = peer else { continue };
        let mut wcs = [Wc::default(); 16];
        let n = me.cq.poll(&mut wcs);
        for wc in &wcs[..n] {
            if wc.opcode != WcOpcode::RecvRdmaWithImm || wc.status != WcStatus::Success {
                continue;
            }
            me.qp
                .post_recv(&RecvWr {
                    wr_id: wc.wr_id,
                    sg_list: &[],
                })
                .unwrap();
            let slot = (wc.imm % SLOTS) as usize * SLOT;
            let sge = [me.sge(slot, wc.byte_len as usize)];
            let wr =
                SendWr::write_with_imm(0, &sge, raddr + slot as u64, rkey, wc.imm).unsignaled();
            if me.qp.post_send(&wr).is_err() {
                break;
            }
        }
    }
    std::process::exit(0);
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the echo child (the test `child_test`, the instance of
/// `child_echo_server` for `B`) and connects to it.
fn connect_child<B: Backend>(child_test: &str) -> (Child, Side<B::F>, (u64, u32)) {
    let addr = B::addr();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, addr.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    let fab = B::fabric();
    // Requests go out of the lower half; echoes land in the upper half.
    let mut me = Side::new(&fab, QpCap::default(), 2 * SLOT * SLOTS as usize);
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < DEADLINE, "the child never listened");
        let pd = keys_pdata(&*me.mem, SLOT * SLOTS as usize, me.mr.rkey());
        me.id = me.cm.connect(&addr, &me.qp, &pd).unwrap();
        let ev = loop {
            if let Some(ev) = me.cm.poll_event(Duration::from_millis(5)).unwrap() {
                break ev;
            }
            assert!(t0.elapsed() < DEADLINE, "no answer from the child");
        };
        match ev {
            CmEvent::Established { private_data, .. } => {
                let keys = parse_keys(private_data.as_bytes());
                return (child, me, keys);
            }
            CmEvent::Unreachable { .. } => std::thread::sleep(Duration::from_millis(10)),
            other => panic!("{other:?}"),
        }
    }
}

/// Sends one 4 KiB WRITE_WITH_IMM and waits for its echo.
fn echo_once<F: Fabric>(me: &mut Side<F>, keys: (u64, u32), k: u32) {
    let slot = (k % SLOTS) as usize * SLOT;
    let data = pattern(4096, u64::from(k));
    me.mem.fill(slot, &data);
    me.post_recv(u64::from(k), 0, 0);
    // Clear the echo's landing place before sending: a NIC (or soft-RoCE)
    // may echo back before post_send even returns.
    let echo = slot + SLOT * SLOTS as usize;
    me.mem.fill(echo, &[0u8; 4096]);
    let sge = [me.sge(slot, 4096)];
    me.qp
        .post_send(&SendWr::write_with_imm(
            u64::from(k),
            &sge,
            keys.0 + slot as u64,
            keys.1,
            k,
        ))
        .unwrap();
    let t0 = Instant::now();
    let mut got_send = false;
    let mut got_echo = false;
    while !(got_send && got_echo) {
        assert!(t0.elapsed() < DEADLINE, "no echo for {k}");
        me.poll();
        for wc in me.wcs.drain(..) {
            assert_eq!(wc.status, WcStatus::Success, "{wc:?}");
            match wc.opcode {
                WcOpcode::RdmaWrite => got_send = true,
                WcOpcode::RecvRdmaWithImm => {
                    assert_eq!(wc.imm, k);
                    got_echo = true;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(me.mem.read_vec(echo, 4096), data, "echo {k}");
}

pub fn across_processes<B: Backend>(child_test: &str) {
    let (mut child, mut me, keys) = connect_child::<B>(child_test);
    for k in 0..200 {
        echo_once(&mut me, keys, k);
    }
    me.cm.disconnect(me.id).unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "child: {status:?}");
}

pub fn peer_killed_mid_traffic<B: Backend>(child_test: &str) {
    let (mut child, mut me, keys) = connect_child::<B>(child_test);
    for k in 0..20 {
        echo_once(&mut me, keys, k);
    }
    let sge = [me.sge(0, 65536)];
    for k in 0..100u64 {
        me.qp
            .post_send(&SendWr::write(1000 + k, &sge, keys.0, keys.1))
            .unwrap();
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let t0 = Instant::now();
    let mut disconnected = false;
    let mut done = Vec::new();
    while !(disconnected && done.len() == 100) {
        assert!(
            t0.elapsed() < DEADLINE,
            "after the peer died: disconnected {disconnected}, {} of 100 requests completed",
            done.len()
        );
        if let Some(ev) = me.cm.poll_event(Duration::from_millis(1)).unwrap() {
            assert!(matches!(ev, CmEvent::Disconnected { .. }), "{ev:?}");
            disconnected = true;
        }
        me.poll();
        done.append(&mut me.wcs);
    }
    assert!(done
        .iter()
        .all(|w| w.status == WcStatus::Success || w.status == WcStatus::WrFlushErr));
    assert!(done.iter().any(|w| w.status == WcStatus::WrFlushErr) || done.len() == 100);
    assert_eq!(me.qp.state(), QpState::Error);
}

/// Instantiates the suite for a backend, in a module `conformance` or the
/// one named first (to run it for several backends in one test binary).
#[macro_export]
macro_rules! conformance_tests {
    ($backend:ty) => {
        $crate::conformance_tests!(conformance, $backend);
    };
    ($module:ident, $backend:ty) => {
        mod $module {
            use super::*;
            use $crate::common::conformance as c;
            #[test]
            fn connect_and_private_data() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::connect_and_private_data::<$backend>();
            }
            #[test]
            fn send_recv_sizes() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::send_recv_sizes::<$backend>();
            }
            #[test]
            fn send_with_imm() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::send_with_imm::<$backend>();
            }
            #[test]
            fn write_and_write_with_imm_sizes() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::write_and_write_with_imm_sizes::<$backend>();
            }
            #[test]
            fn read_sizes() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::read_sizes::<$backend>();
            }
            #[test]
            fn scatter_gather_lists() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::scatter_gather_lists::<$backend>();
            }
            #[test]
            fn rc_ordering_and_unsignaled() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::rc_ordering_and_unsignaled::<$backend>();
            }
            #[test]
            fn inline_data() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::inline_data::<$backend>();
            }
            #[test]
            fn wrong_rkey() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::wrong_rkey::<$backend>();
            }
            #[test]
            fn out_of_bounds_rkey() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::out_of_bounds_rkey::<$backend>();
            }
            #[test]
            fn read_without_remote_read_access() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::read_without_remote_read_access::<$backend>();
            }
            #[test]
            fn rekey_and_local_invalidate() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::rekey_and_local_invalidate::<$backend>();
            }
            #[test]
            fn old_rkey_fails_after_rekey() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::old_rkey_fails_after_rekey::<$backend>();
            }
            #[test]
            fn rekey_as_work_request() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::rekey_as_work_request::<$backend>();
            }
            #[test]
            fn rekey_chain_as_a_server_posts_it() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::rekey_chain_as_a_server_posts_it::<$backend>();
            }
            #[test]
            fn send_with_invalidate() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::send_with_invalidate::<$backend>();
            }
            #[test]
            fn receive_too_small() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::receive_too_small::<$backend>();
            }
            #[test]
            fn rnr_retries_forever_by_default() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::rnr_retries_forever_by_default::<$backend>();
            }
            #[test]
            fn rnr_retry_exceeded() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::rnr_retry_exceeded::<$backend>();
            }
            #[test]
            fn disconnect_mid_traffic() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::disconnect_mid_traffic::<$backend>();
            }
            #[test]
            fn reject_and_unreachable() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::reject_and_unreachable::<$backend>();
            }
            #[test]
            fn many_qps_on_one_cq() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::many_qps_on_one_cq::<$backend>();
            }
            #[test]
            fn registrations_come_and_go() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::registrations_come_and_go::<$backend>();
            }
            #[test]
            fn across_processes() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::across_processes::<$backend>(concat!(
                    stringify!($module),
                    "::child_echo_server"
                ));
            }
            #[test]
            fn peer_killed_mid_traffic() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::peer_killed_mid_traffic::<$backend>(concat!(
                    stringify!($module),
                    "::child_echo_server"
                ));
            }
            /// Not a test: the child process of the two tests above.
            #[test]
            fn child_echo_server() {
                if $crate::common::conformance::skip::<$backend>() {
                    return;
                }
                c::child_echo_server::<$backend>();
            }
        }
    };
}
