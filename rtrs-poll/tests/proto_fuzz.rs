//! A fuzz target per decoder, bounded in time so CI can run it: valid
//! messages are mutated (bit flips, interesting field values, truncation,
//! extension, splices) and fed to the decoder. A decoder must never panic,
//! and whatever it accepts must re-encode to bytes it decodes to the same
//! value. Plus proptest over arbitrary bytes for each.
//!
//! `RTRS_FUZZ_SECS` is the budget for all targets together (default 3 s; the
//! test command gives 20, on its dev build). Run only these with `cargo test fuzz`
//! (`--release` for more cases a second).

use proptest::prelude::*;
use rtrs_proto::chunk::{self, IoReqKind};
use rtrs_proto::imm::{Imm, ImmLayout};
use rtrs_proto::rnbd::*;
use rtrs_proto::*;

const TARGETS: u32 = 12;

#[path = "common/mutate.rs"]
mod mutate;
use mutate::fuzz as fuzz_in;

fn fuzz(name: &str, seeds: Vec<Vec<u8>>, check: impl FnMut(&[u8])) {
    fuzz_in(name, TARGETS, seeds, check);
}

fn emit(f: impl FnOnce(&mut [u8]) -> Result<usize>) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    let n = f(&mut b).unwrap();
    b.truncate(n);
    b
}

fn desc(i: u32) -> SgDesc {
    SgDesc {
        addr: 0x10_0000 + u64::from(i) * 65536,
        key: 0x100 + i,
        len: 65536,
    }
}

fn check_conn_req(b: &[u8]) {
    if let Ok(v) = ConnReq::new_checked(b) {
        let r = ConnReqRepr::parse(&v);
        let again = emit(|o| r.emit(o));
        assert_eq!(
            ConnReqRepr::parse(&ConnReq::new_checked(&again[..]).unwrap()),
            r
        );
    }
}

fn check_conn_rsp(b: &[u8]) {
    if let Ok(v) = ConnRsp::new_checked(b) {
        let r = ConnRspRepr::parse(&v);
        let again = emit(|o| r.emit(o));
        assert_eq!(
            ConnRspRepr::parse(&ConnRsp::new_checked(&again[..]).unwrap()),
            r
        );
    }
}

fn check_info_req(b: &[u8]) {
    if let Ok(v) = InfoReq::new_checked(b) {
        let name = v.sessname();
        let again = emit(|o| InfoReqRepr { sessname: name }.emit(o));
        assert_eq!(InfoReq::new_checked(&again[..]).unwrap().sessname(), name);
        let _ = check_sessname(name);
    }
}

fn check_info_rsp(b: &[u8]) {
    if let Ok(v) = InfoRsp::new_checked(b) {
        let descs: Vec<SgDesc> = v.descs().iter().collect();
        assert_eq!(descs.len(), v.sg_cnt() as usize);
        let again = emit(|o| InfoRspRepr { descs: &descs }.emit(o));
        assert_eq!(&again[..], &b[..again.len()]);
        for qd in [1u16, 2, 4, 512] {
            let mut n = 0;
            if slice_chunks(&v, qd, 65536, |i, _, _| {
                assert_eq!(i, n);
                n += 1;
            })
            .is_ok()
            {
                assert_eq!(n, qd as usize);
            }
        }
    }
}

fn check_small(b: &[u8]) {
    if let Ok(v) = RkeyRsp::new_checked(b) {
        let r = RkeyRspRepr::parse(&v);
        assert_eq!(emit(|o| r.emit(o)), &b[..8]);
    }
    if let Ok(v) = RdmaRead::new_checked(b) {
        let r = RdmaReadRepr::parse(&v);
        assert_eq!(emit(|o| r.emit(o)), &b[..v.len()]);
    }
    if let Ok(v) = RdmaWrite::new_checked(b) {
        assert_eq!(
            emit(|o| RdmaWriteRepr {
                usr_len: v.usr_len()
            }
            .emit(o)),
            &b[..4]
        );
    }
}

fn check_chunk(b: &[u8]) {
    // The first four bytes pick the offset; the rest is the chunk.
    if b.len() < 4 {
        return;
    }
    let off = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) % (b.len() as u32 + 8);
    let c = &b[4..];
    if let Ok(r) = chunk::parse(c, off) {
        let end = off as usize;
        assert!(r.usr.len() <= end && end <= c.len());
        match r.kind {
            IoReqKind::Write { data } => assert_eq!(data.len() + r.usr.len(), end),
            IoReqKind::Read { data_len, msg } => {
                assert_eq!(data_len as usize + r.usr.len(), end);
                assert!(msg.descs().iter().all(|d| d.len <= data_len));
            }
        }
    }
}

fn check_imm(b: &[u8]) {
    if b.len() < 8 {
        return;
    }
    let imm = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let qd = u32::from(u16::from_le_bytes([b[4], b[5]]));
    let cs = 1u32 << (13 + b[6] % 15);
    if let Ok(Imm::IoRsp {
        msg_id,
        errno,
        inval,
    }) = Imm::decode_clt(imm)
    {
        assert_eq!(imm::io_rsp(msg_id, errno, inval).unwrap(), imm);
    }
    if let Ok(l) = ImmLayout::new(qd, cs) {
        if let Ok(i) = l.decode_srv(imm) {
            assert_eq!(i.encode(&l).unwrap(), imm);
        }
    }
}

use rtrs_proto::imm;

fn check_rnbd(b: &[u8]) {
    if let Ok(m) = RnbdMsg::parse(b) {
        match m {
            RnbdMsg::SessInfo(v) => assert!(v.ver() > 0),
            RnbdMsg::Open(v) => {
                let r = OpenRepr {
                    access_mode: v.access_mode(),
                    dev_name: v.dev_name(),
                };
                let again = emit(|o| r.emit(o));
                assert_eq!(
                    Open::new_checked(&again[..]).unwrap().dev_name(),
                    r.dev_name
                );
            }
            RnbdMsg::Close(v) => {
                let again = emit(|o| {
                    CloseRepr {
                        device_id: v.device_id(),
                    }
                    .emit(o)
                });
                assert_eq!(
                    Close::new_checked(&again[..]).unwrap().device_id(),
                    v.device_id()
                );
            }
            RnbdMsg::Io(v) => {
                let r = IoRepr::parse(&v);
                let again = emit(|o| r.emit(o));
                assert_eq!(IoRepr::parse(&Io::new_checked(&again[..]).unwrap()), r);
            }
        }
    }
    if let Ok(v) = OpenRsp::new_checked(b) {
        let r = OpenRspRepr::parse(&v);
        assert_eq!(emit(|o| r.emit(o)), &b[..56]);
    }
    if let Ok(v) = SessInfoRsp::new_checked(b) {
        assert_eq!(
            emit(|o| SessInfoRepr { ver: v.ver() }.emit_rsp(o)),
            &b[..36]
        );
    }
}

fn conn_seeds() -> Vec<Vec<u8>> {
    let req = ConnReqRepr {
        cid: 1,
        cid_num: 3,
        recon_cnt: 1,
        sess_uuid: [7; 16],
        paths_uuid: [9; 16],
        first_conn: true,
    };
    let rsp = ConnRspRepr {
        queue_depth: 512,
        max_io_size: 126976,
        max_hdr_size: 4096,
        new_rkey: true,
        ..ConnRspRepr::default()
    };
    vec![
        emit(|o| req.emit(o)),
        emit(|o| rsp.emit(o)),
        emit(|o| ConnRspRepr::reject(-104).emit(o)),
    ]
}

fn info_seeds() -> Vec<Vec<u8>> {
    let descs: Vec<SgDesc> = (0..4).map(desc).collect();
    vec![
        emit(|o| InfoReqRepr { sessname: "clt-a" }.emit(o)),
        emit(|o| InfoRspRepr { descs: &descs }.emit(o)),
        emit(|o| InfoRspRepr { descs: &descs[..1] }.emit(o)),
    ]
}

fn small_seeds() -> Vec<Vec<u8>> {
    vec![
        emit(|o| {
            RkeyRspRepr {
                buf_id: 3,
                rkey: 77,
            }
            .emit(o)
        }),
        emit(|o| {
            RdmaReadRepr {
                usr_len: 32,
                need_inval: true,
                desc: Some(desc(1)),
            }
            .emit(o)
        }),
        emit(|o| RdmaReadRepr::default().emit(o)),
        emit(|o| RdmaWriteRepr { usr_len: 32 }.emit(o)),
    ]
}

fn chunk_seeds() -> Vec<Vec<u8>> {
    let mut w = vec![0u8; 4 + 200];
    w[4..104].fill(0xd0);
    let n = chunk::emit_write_tail(&mut w[104..], &[0xa5; 32]).unwrap();
    w[..4].copy_from_slice(&132u32.to_le_bytes());
    w.truncate(104 + n);
    let mut r = vec![0u8; 4 + 300];
    let rd = RdmaReadRepr {
        usr_len: 0,
        need_inval: true,
        desc: Some(SgDesc {
            addr: 0,
            key: 1,
            len: 100,
        }),
    };
    let n = chunk::emit_read_tail(&mut r[104..], &[0x5a; 36], rd).unwrap();
    r[..4].copy_from_slice(&136u32.to_le_bytes());
    r.truncate(104 + n);
    vec![w, r]
}

fn imm_seeds() -> Vec<Vec<u8>> {
    let l = ImmLayout::new(512, 128 << 10).unwrap();
    let mk = |imm: u32| {
        let mut v = imm.to_le_bytes().to_vec();
        v.extend_from_slice(&[0x00, 0x02, 4, 0]);
        v
    };
    vec![
        mk(l.io_req(5, 4132).unwrap()),
        mk(imm::io_rsp(5, -5, true).unwrap()),
        mk(0x8000_0000),
        mk(0x9000_0000),
    ]
}

fn rnbd_seeds() -> Vec<Vec<u8>> {
    let io = IoRepr {
        device_id: 1,
        sector: 8,
        op: RnbdOp::Write,
        flags: RNBD_F_SYNC,
        bi_size: 4096,
        prio: 0,
    };
    vec![
        emit(|o| SessInfoRepr { ver: 2 }.emit(o)),
        emit(|o| SessInfoRepr { ver: 2 }.emit_rsp(o)),
        emit(|o| {
            OpenRepr {
                access_mode: AccessMode::Rw,
                dev_name: "ram0",
            }
            .emit(o)
        }),
        emit(|o| {
            OpenRspRepr {
                device_id: 1,
                nsectors: 1 << 21,
                logical_block_size: 512,
                ..OpenRspRepr::default()
            }
            .emit(o)
        }),
        emit(|o| CloseRepr { device_id: 1 }.emit(o)),
        emit(|o| io.emit(o)),
    ]
}

#[test]
fn fuzz_conn_req() {
    fuzz("conn_req", conn_seeds(), check_conn_req);
}
#[test]
fn fuzz_conn_rsp() {
    fuzz("conn_rsp", conn_seeds(), check_conn_rsp);
}
#[test]
fn fuzz_info_req() {
    fuzz("info_req", info_seeds(), check_info_req);
}
#[test]
fn fuzz_info_rsp() {
    fuzz("info_rsp", info_seeds(), check_info_rsp);
}
#[test]
fn fuzz_rkey_rdma_read_write() {
    fuzz("rkey_rsp/rdma_read/rdma_write", small_seeds(), check_small);
}
#[test]
fn fuzz_chunk_io_request() {
    fuzz("chunk io request", chunk_seeds(), check_chunk);
}
#[test]
fn fuzz_immediates() {
    fuzz("imm", imm_seeds(), check_imm);
}
#[test]
fn fuzz_rnbd() {
    fuzz("rnbd", rnbd_seeds(), check_rnbd);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]
    #[test]
    fn fuzz_arbitrary_bytes_rtrs(b in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_conn_req(&b);
        check_conn_rsp(&b);
        check_info_req(&b);
        check_info_rsp(&b);
        check_small(&b);
    }
    #[test]
    fn fuzz_arbitrary_bytes_chunk(b in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_chunk(&b);
    }
    #[test]
    fn fuzz_arbitrary_bytes_imm(b in proptest::collection::vec(any::<u8>(), 8..9)) {
        check_imm(&b);
    }
    #[test]
    fn fuzz_arbitrary_bytes_rnbd(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_rnbd(&b);
    }
}
