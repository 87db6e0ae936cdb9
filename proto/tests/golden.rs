//! Golden byte vectors for every RTRS 2.0 and RNBD 2.0 message and
//! immediate, written by hand field by field from the layouts of the wire
//! spec (rtrs-wire-spec.md §2, §3, §9.2), not produced by the encoder: each
//! test decodes the vector, checks every field, and checks that the encoder
//! produces the same bytes. Then each malformed variant gets its error.

use rtrs_proto::chunk::{self, IoReqKind};
use rtrs_proto::imm::{io_rsp, Imm, ImmLayout};
use rtrs_proto::rnbd::*;
use rtrs_proto::*;

/// Concatenates fields into a message.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn emitted(f: impl Fn(&mut [u8]) -> Result<usize>) -> Vec<u8> {
    let mut buf = vec![0xEEu8; 600];
    let n = f(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

const SESS_UUID: [u8; 16] = [
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];
const PATHS_UUID: [u8; 16] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];

fn conn_req_golden() -> Vec<u8> {
    cat(&[
        &[0x00, 0x00], // 0: __cma_version, __ip_version
        &[0xbd, 0x1b], // 2: magic 0x1BBD
        &[0x00, 0x02], // 4: version 2.0
        &[0x03, 0x00], // 6: cid 3
        &[0x05, 0x00], // 8: cid_num 5
        &[0x01, 0x00], // 10: recon_cnt 1
        &SESS_UUID,    // 12: sess_uuid (the path)
        &PATHS_UUID,   // 28: paths_uuid (the session)
        &[0x01],       // 44: first_conn in bit 0
        &[0; 11],      // 45: reserved
    ])
}

#[test]
fn conn_req() {
    let g = conn_req_golden();
    assert_eq!(g.len(), 56);
    let v = ConnReq::new_checked(&g[..]).unwrap();
    let r = ConnReqRepr::parse(&v);
    assert_eq!(
        r,
        ConnReqRepr {
            cid: 3,
            cid_num: 5,
            recon_cnt: 1,
            sess_uuid: SESS_UUID,
            paths_uuid: PATHS_UUID,
            first_conn: true,
        }
    );
    assert_eq!(v.version(), 0x0200);
    assert_eq!(emitted(|b| r.emit(b)), g);
    // AF_IB peers see 92 bytes of private data: the tail is not RTRS's.
    let mut ib = g.clone();
    ib.resize(92, 0x77);
    assert!(ConnReq::new_checked(&ib[..]).is_ok());
    // A newer minor version is still 2.x.
    let mut minor = g.clone();
    minor[4] = 0x07;
    assert!(ConnReq::new_checked(&minor[..]).is_ok());
}

#[test]
fn conn_req_malformed() {
    let g = conn_req_golden();
    let bad = |i: usize, v: u8| {
        let mut m = g.clone();
        m[i] = v;
        ConnReq::new_checked(m).unwrap_err()
    };
    assert!(matches!(
        ConnReq::new_checked(&g[..55]),
        Err(ProtoError::Truncated {
            need: 56,
            len: 55,
            ..
        })
    ));
    assert!(matches!(bad(0, 1), ProtoError::Reserved { .. }));
    assert!(matches!(bad(1, 4), ProtoError::Reserved { .. }));
    assert!(matches!(
        bad(2, 0xbe),
        ProtoError::BadMagic { got: 0x1bbe, .. }
    ));
    assert!(matches!(
        bad(5, 3),
        ProtoError::BadVersion { got: 0x0300, .. }
    ));
    assert!(matches!(bad(44, 0x03), ProtoError::Reserved { .. }));
    assert!(matches!(bad(55, 0x01), ProtoError::Reserved { .. }));
    assert!(matches!(
        bad(6, 5),
        ProtoError::BadField { field: "cid", .. }
    ));
    assert!(matches!(
        bad(8, 0),
        ProtoError::BadField {
            field: "cid_num",
            ..
        }
    ));
    let mut big = g.clone();
    big[8..10].copy_from_slice(&4097u16.to_le_bytes());
    assert!(matches!(
        ConnReq::new_checked(big).unwrap_err(),
        ProtoError::BadField {
            field: "cid_num",
            got: 4097,
            ..
        }
    ));
}

fn conn_rsp_accept_golden() -> Vec<u8> {
    cat(&[
        &[0xbd, 0x1b],             // 0: magic
        &[0x00, 0x02],             // 2: version 2.0
        &[0x00, 0x00],             // 4: errno 0
        &[0x00, 0x02],             // 6: queue_depth 512
        &[0x00, 0xf0, 0x01, 0x00], // 8: max_io_size 126976 = 128 KiB - 4 KiB
        &[0x00, 0x10, 0x00, 0x00], // 12: max_hdr_size 4096
        &[0x02, 0x00, 0x00, 0x00], // 16: flags NEW_RKEY
        &[0; 36],                  // 20: reserved
    ])
}

#[test]
fn conn_rsp() {
    let g = conn_rsp_accept_golden();
    let v = ConnRsp::new_checked(&g[..]).unwrap();
    let r = ConnRspRepr::parse(&v);
    assert_eq!(
        r,
        ConnRspRepr {
            errno: 0,
            queue_depth: 512,
            max_io_size: 126976,
            max_hdr_size: 4096,
            new_rkey: true,
        }
    );
    assert_eq!(r.chunk_size(), 128 << 10);
    assert_eq!(emitted(|b| r.emit(b)), g);

    // A reject: -ECONNRESET (-104) as a two's complement s16, the rest 0.
    let rej = cat(&[
        &[0xbd, 0x1b, 0x00, 0x02],
        &[0x98, 0xff], // errno -104
        &[0; 50],
    ]);
    let v = ConnRsp::new_checked(&rej[..]).unwrap();
    assert_eq!(v.errno(), -104);
    assert_eq!(emitted(|b| ConnRspRepr::reject(104).emit(b)), rej);
    assert_eq!(emitted(|b| ConnRspRepr::reject(-104).emit(b)), rej);

    let bad = |i: usize, v: u8| {
        let mut m = g.clone();
        m[i] = v;
        ConnRsp::new_checked(m).unwrap_err()
    };
    assert!(matches!(bad(0, 0), ProtoError::BadMagic { .. }));
    assert!(matches!(bad(3, 1), ProtoError::BadVersion { .. }));
    assert!(matches!(
        bad(4, 5),
        ProtoError::BadField { field: "errno", .. }
    ));
    assert!(matches!(bad(16, 0x03), ProtoError::Reserved { .. }));
    assert!(matches!(bad(40, 1), ProtoError::Reserved { .. }));
    assert!(ConnRsp::new_checked(&g[..20]).is_err());
}

const DESC_A: [u8; 16] = [
    0x00, 0x50, 0x34, 0x12, 0x00, 0x7f, 0x00, 0x00, // addr 0x00007f0012345000
    0xef, 0xbe, 0xad, 0xde, // key 0xdeadbeef
    0x00, 0x00, 0x02, 0x00, // len 131072
];
const DESC_B: [u8; 16] = [
    0x00, 0x50, 0x36, 0x12, 0x00, 0x7f, 0x00, 0x00, // addr 0x00007f0012365000
    0x01, 0x02, 0x03, 0x04, // key 0x04030201
    0x00, 0x00, 0x02, 0x00, // len 131072
];

#[test]
fn info_req() {
    let mut g = vec![0x00, 0x00]; // type INFO_REQ
    g.extend_from_slice(b"clt-a\0"); // pathname, NUL-terminated
    g.resize(272, 0); // zero padding up to 257, reserved 257..272
    let v = InfoReq::new_checked(&g[..]).unwrap();
    assert_eq!(v.sessname(), "clt-a");
    assert_eq!(emitted(|b| InfoReqRepr { sessname: "clt-a" }.emit(b)), g);
    assert!(check_sessname("clt-a").is_ok());
    assert!(check_sessname("a.b").is_err());
    assert!(check_sessname("a/b").is_err());
    assert!(check_sessname("").is_err());

    let mut no_nul = g.clone();
    no_nul[2..257].fill(b'x');
    assert!(matches!(
        InfoReq::new_checked(no_nul).unwrap_err(),
        ProtoError::BadField {
            field: "pathname",
            ..
        }
    ));
    let mut res = g.clone();
    res[260] = 1;
    assert!(matches!(
        InfoReq::new_checked(res).unwrap_err(),
        ProtoError::Reserved { .. }
    ));
    let mut ty = g.clone();
    ty[0] = 1;
    assert!(matches!(
        InfoReq::new_checked(ty).unwrap_err(),
        ProtoError::BadType {
            got: 1,
            want: 0,
            ..
        }
    ));
    assert!(InfoReq::new_checked(&g[..271]).is_err());
    let mut utf = g.clone();
    utf[3] = 0xff;
    assert!(InfoReq::new_checked(utf).is_err());
    let long = "x".repeat(255);
    assert!(InfoReqRepr { sessname: &long }.emit(&mut [0; 272]).is_err());
}

#[test]
fn info_rsp_and_sg_desc() {
    let g = cat(&[
        &[0x01, 0x00], // type INFO_RSP
        &[0x02, 0x00], // sg_cnt 2
        &[0; 4],       // reserved
        &DESC_A,
        &DESC_B,
    ]);
    let v = InfoRsp::new_checked(&g[..]).unwrap();
    assert_eq!(v.sg_cnt(), 2);
    let a = SgDesc {
        addr: 0x7f00_1234_5000,
        key: 0xdead_beef,
        len: 131072,
    };
    let b = SgDesc {
        addr: 0x7f00_1236_5000,
        key: 0x0403_0201,
        len: 131072,
    };
    assert_eq!(v.descs().iter().collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(v.descs().get(2), None);
    assert_eq!(emitted(|buf| InfoRspRepr { descs: &[a, b] }.emit(buf)), g);

    // Slicing into chunks as the client does: 2 MRs of 2 chunks of 64 KiB.
    let mut chunks = Vec::new();
    slice_chunks(&v, 4, 64 << 10, |i, addr, key| chunks.push((i, addr, key))).unwrap();
    assert_eq!(
        chunks,
        vec![
            (0, a.addr, a.key),
            (1, a.addr + 65536, a.key),
            (2, b.addr, b.key),
            (3, b.addr + 65536, b.key)
        ]
    );
    // The client's refusals (spec §4.4).
    let no = |qd, cs| slice_chunks(&v, qd, cs, |_, _, _| {}).unwrap_err();
    assert!(matches!(
        no(3, 64 << 10),
        ProtoError::BadField {
            field: "sg_cnt",
            ..
        }
    ));
    assert!(matches!(
        no(4, 48 << 10),
        ProtoError::BadField {
            field: "desc.len",
            ..
        }
    ));
    assert!(matches!(
        no(8, 64 << 10),
        ProtoError::BadField {
            field: "sg_cnt",
            ..
        }
    ));
    assert!(matches!(
        no(2, 64 << 10),
        ProtoError::BadField {
            field: "desc.len",
            ..
        }
    ));

    // Short by one descriptor, bad reserved, bad type.
    assert!(matches!(
        InfoRsp::new_checked(&g[..39]).unwrap_err(),
        ProtoError::Truncated { need: 40, .. }
    ));
    let mut r = g.clone();
    r[6] = 1;
    assert!(matches!(
        InfoRsp::new_checked(r).unwrap_err(),
        ProtoError::Reserved { .. }
    ));
    let mut t = g.clone();
    t[0] = 4;
    assert!(InfoRsp::new_checked(t).is_err());
}

#[test]
fn rkey_rsp() {
    let g = [
        0x04, 0x00, // type RKEY_RSP
        0xff, 0x01, // buf_id 511
        0x78, 0x56, 0x34, 0x12, // rkey 0x12345678
    ];
    let v = RkeyRsp::new_checked(&g[..]).unwrap();
    let r = RkeyRspRepr::parse(&v);
    assert_eq!(
        r,
        RkeyRspRepr {
            buf_id: 511,
            rkey: 0x1234_5678
        }
    );
    assert_eq!(emitted(|b| r.emit(b)), g);
    assert!(RkeyRsp::new_checked(&g[..7]).is_err());
    assert!(RkeyRsp::new_checked(&[0x03, 0, 0, 0, 0, 0, 0, 0][..]).is_err());
}

#[test]
fn rdma_read_and_write() {
    let g = cat(&[
        &[0x03, 0x00], // type READ
        &[0x20, 0x00], // usr_len 32
        &[0x01, 0x00], // flags NEED_INVAL
        &[0x01, 0x00], // sg_cnt 1
        &DESC_A,
    ]);
    let v = RdmaRead::new_checked(&g[..]).unwrap();
    let r = RdmaReadRepr::parse(&v);
    assert_eq!(r.usr_len, 32);
    assert!(r.need_inval);
    assert_eq!(r.desc.unwrap().key, 0xdead_beef);
    assert_eq!(v.len(), 24);
    assert_eq!(emitted(|b| r.emit(b)), g);
    // A zero-length read: no descriptor, no flag.
    let z = [0x03, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00];
    let r0 = RdmaReadRepr::parse(&RdmaRead::new_checked(&z[..]).unwrap());
    assert_eq!(
        r0,
        RdmaReadRepr {
            usr_len: 8,
            need_inval: false,
            desc: None
        }
    );
    assert_eq!(emitted(|b| r0.emit(b)), z);

    let mut two = g.clone();
    two[6] = 2;
    assert!(matches!(
        RdmaRead::new_checked(two).unwrap_err(),
        ProtoError::BadField {
            field: "sg_cnt",
            got: 2,
            ..
        }
    ));
    let mut fl = g.clone();
    fl[4] = 0x02;
    assert!(matches!(
        RdmaRead::new_checked(fl).unwrap_err(),
        ProtoError::Reserved { .. }
    ));
    assert!(RdmaRead::new_checked(&g[..23]).is_err());

    let w = [0x02, 0x00, 0x20, 0x00]; // type WRITE, usr_len 32
    assert_eq!(RdmaWrite::new_checked(&w[..]).unwrap().usr_len(), 32);
    assert_eq!(emitted(|b| RdmaWriteRepr { usr_len: 32 }.emit(b)), w);
    assert!(RdmaWrite::new_checked(&w[..3]).is_err());
    assert!(RdmaWrite::new_checked(&[0x05, 0x00, 0, 0][..]).is_err());
}

#[test]
fn io_request_immediates() {
    // QD 512, 128 KiB chunks: bits(512) = 9, mem_bits = 19.
    let l = ImmLayout::new(512, 128 << 10).unwrap();
    assert_eq!(l.mem_bits(), 19);
    // buf_id 5, message at 0x1024: 5 << 19 | 0x1024, type 0.
    assert_eq!(l.io_req(5, 0x1024).unwrap(), 0x0028_1024);
    assert_eq!(Imm::wire_bytes(0x0028_1024), [0x00, 0x28, 0x10, 0x24]);
    assert_eq!(
        l.decode_srv(0x0028_1024).unwrap(),
        Imm::IoReq {
            buf_id: 5,
            off: 0x1024
        }
    );
    // QD 2048: mem_bits 17; the largest id and offset fill all 28 bits.
    let l2 = ImmLayout::new(2048, 128 << 10).unwrap();
    assert_eq!(l2.io_req(2047, 131071).unwrap(), 0x0fff_ffff);
    assert!(ImmLayout::new(4096, 128 << 10).is_err());
    // QD 1: mem_bits 28, the id is always 0.
    let l1 = ImmLayout::new(1, 16 << 20).unwrap();
    assert_eq!(l1.io_req(0, 0x00ab_cdef).unwrap(), 0x00ab_cdef);
    assert!(l1.io_req(1, 0).is_err());
    // QD 500 still uses 9 bits, so ids 500..511 decode and are refused.
    let l5 = ImmLayout::new(500, 64 << 10).unwrap();
    assert!(matches!(
        l5.decode_srv(500 << 19),
        Err(ProtoError::BadField {
            field: "buf_id",
            got: 500,
            ..
        })
    ));
    assert!(matches!(
        l5.decode_srv(70000),
        Err(ProtoError::BadField { field: "off", .. })
    ));
    // The server takes only types 0, 8 and 9.
    assert!(matches!(
        l.decode_srv(0x1000_0000),
        Err(ProtoError::UnknownType { got: 1, .. })
    ));
    assert_eq!(l.decode_srv(0x8000_0000).unwrap(), Imm::HbMsg);
    assert_eq!(l.decode_srv(0x9000_0000).unwrap(), Imm::HbAck);
}

#[test]
fn io_response_and_heartbeat_immediates() {
    // msg_id 7, -EIO: (5 << 19) | 7 under type 1, or type 2 with invalidate.
    assert_eq!(io_rsp(7, -5, false).unwrap(), 0x1028_0007);
    assert_eq!(io_rsp(7, -5, true).unwrap(), 0x2028_0007);
    assert_eq!(
        Imm::decode_clt(0x1028_0007).unwrap(),
        Imm::IoRsp {
            msg_id: 7,
            errno: -5,
            inval: false
        }
    );
    assert_eq!(
        Imm::decode_clt(0x2028_0007).unwrap(),
        Imm::IoRsp {
            msg_id: 7,
            errno: -5,
            inval: true
        }
    );
    // The extremes: errno -511, msg_id 2^19 - 1.
    assert_eq!(io_rsp(0x7ffff, -511, false).unwrap(), 0x1fff_ffff);
    assert_eq!(io_rsp(0, 0, false).unwrap(), 0x1000_0000);
    assert!(io_rsp(0, -512, false).is_err());
    assert!(io_rsp(0, 5, false).is_err());
    assert!(io_rsp(1 << 19, 0, false).is_err());
    // Heartbeats carry payload 0.
    assert_eq!(
        Imm::HbMsg
            .encode(&ImmLayout::new(1, 8192).unwrap())
            .unwrap(),
        0x8000_0000
    );
    assert_eq!(
        Imm::HbAck
            .encode(&ImmLayout::new(1, 8192).unwrap())
            .unwrap(),
        0x9000_0000
    );
    assert_eq!(Imm::decode_clt(0x8000_0000).unwrap(), Imm::HbMsg);
    assert_eq!(Imm::decode_clt(0x9000_0000).unwrap(), Imm::HbAck);
    assert!(matches!(
        Imm::decode_clt(0x8000_0001),
        Err(ProtoError::Reserved { .. })
    ));
    // A client does not take requests or unused types.
    for ty in [0u32, 3, 4, 7, 10, 15] {
        assert!(matches!(
            Imm::decode_clt(ty << 28),
            Err(ProtoError::UnknownType { .. })
        ));
    }
}

#[test]
fn chunk_layouts() {
    // WRITE: 100 data bytes, a 32-byte user header, rdma_write at 132.
    let mut c = vec![0u8; 8192];
    c[..100].fill(0xd0);
    c[100..132].fill(0xa5);
    c[132..136].copy_from_slice(&[0x02, 0x00, 0x20, 0x00]);
    let r = chunk::parse(&c, 132).unwrap();
    assert_eq!(r.usr, &[0xa5; 32][..]);
    assert!(matches!(r.kind, IoReqKind::Write { data } if data == &[0xd0; 100][..]));
    let mut tail = [0u8; 64];
    let n = chunk::emit_write_tail(&mut tail, &[0xa5; 32]).unwrap();
    assert_eq!(&tail[..n], &c[100..136]);

    // READ of 4096 bytes: room at 0..4096, 36-byte header, rdma_read at 4132.
    let mut c = vec![0u8; 8192];
    c[4096..4132].fill(0x5a);
    let rd = cat(&[&[0x03, 0x00, 0x24, 0x00, 0x01, 0x00, 0x01, 0x00], &DESC_A]);
    c[4132..4156].copy_from_slice(&rd);
    c[4132 + 20..4132 + 24].copy_from_slice(&4096u32.to_le_bytes());
    let r = chunk::parse(&c, 4132).unwrap();
    assert_eq!(r.usr.len(), 36);
    assert_eq!(r.data_len(), 4096);
    match r.kind {
        IoReqKind::Read { data_len, msg } => {
            assert_eq!(data_len, 4096);
            assert!(msg.need_inval());
            assert_eq!(msg.descs().get(0).unwrap().len, 4096);
        }
        IoReqKind::Write { .. } => panic!("a read decoded as a write"),
    }
    // Hostile layouts.
    assert!(matches!(
        chunk::parse(&c, 8190),
        Err(ProtoError::Truncated { .. })
    ));
    assert!(matches!(
        chunk::parse(&c, u32::MAX),
        Err(ProtoError::Truncated { .. })
    ));
    let mut big_usr = c.clone();
    big_usr[4134..4136].copy_from_slice(&5000u16.to_le_bytes());
    assert!(matches!(
        chunk::parse(&big_usr, 4132),
        Err(ProtoError::BadField {
            field: "usr_len",
            ..
        })
    ));
    let mut long_read = c.clone();
    long_read[4132 + 20..4132 + 24].copy_from_slice(&4097u32.to_le_bytes());
    assert!(matches!(
        chunk::parse(&long_read, 4132),
        Err(ProtoError::BadField {
            field: "desc.len",
            ..
        })
    ));
    let mut info = c.clone();
    info[4132] = 0x01;
    assert!(chunk::parse(&info, 4132).is_err());
    let mut junk = c.clone();
    junk[4132] = 0x09;
    assert!(matches!(
        chunk::parse(&junk, 4132),
        Err(ProtoError::UnknownType { .. })
    ));
}

// ---------------------------------------------------------------- RNBD

#[test]
fn rnbd_sess_info() {
    // From the kernel client: header padding and reserve are uninitialised.
    let g = cat(&[&[0x00, 0x00, 0xaa, 0xaa], &[0x02], &[0xaa; 31]]);
    let v = SessInfo::new_checked(&g[..]).unwrap();
    assert_eq!(v.ver(), 2);
    let clean = cat(&[&[0x00, 0x00, 0x00, 0x00], &[0x02], &[0; 31]]);
    assert_eq!(emitted(|b| SessInfoRepr { ver: 2 }.emit(b)), clean);
    let rsp = cat(&[&[0x01, 0x00, 0x00, 0x00], &[0x02], &[0; 31]]);
    assert_eq!(SessInfoRsp::new_checked(&rsp[..]).unwrap().ver(), 2);
    assert_eq!(emitted(|b| SessInfoRepr { ver: 2 }.emit_rsp(b)), rsp);
    let mut dirty = rsp.clone();
    dirty[20] = 1;
    assert!(matches!(
        SessInfoRsp::new_checked(dirty).unwrap_err(),
        ProtoError::Reserved { .. }
    ));
    let mut v0 = g.clone();
    v0[4] = 0;
    assert!(matches!(
        SessInfo::new_checked(v0).unwrap_err(),
        ProtoError::BadVersion { .. }
    ));
    assert!(SessInfo::new_checked(&g[..35]).is_err());
}

#[test]
fn rnbd_open() {
    let mut g = cat(&[&[0x02, 0x00, 0x13, 0x37], &[0x01], &[0xcc]]); // type OPEN, rw, resv1
    g.extend_from_slice(b"ram0\0");
    g.resize(264, 0xcc); // after the NUL and the reserve: uninitialised
    let v = Open::new_checked(&g[..]).unwrap();
    assert_eq!(v.access_mode(), AccessMode::Rw);
    assert_eq!(v.dev_name(), "ram0");
    let mut clean = cat(&[&[0x02, 0x00, 0x00, 0x00], &[0x01], &[0x00]]);
    clean.extend_from_slice(b"ram0");
    clean.resize(264, 0);
    let r = OpenRepr {
        access_mode: AccessMode::Rw,
        dev_name: "ram0",
    };
    assert_eq!(emitted(|b| r.emit(b)), clean);
    let mut mode = g.clone();
    mode[4] = 3;
    assert!(matches!(
        Open::new_checked(mode).unwrap_err(),
        ProtoError::BadField {
            field: "access_mode",
            ..
        }
    ));
    let mut empty = g.clone();
    empty[6] = 0;
    assert!(Open::new_checked(empty).is_err());
    let mut no_nul = g.clone();
    no_nul[6..261].fill(b'a');
    assert!(Open::new_checked(no_nul).is_err());
}

#[test]
fn rnbd_open_rsp() {
    let g = cat(&[
        &[0x03, 0x00, 0x00, 0x00],                         // hdr: OPEN_RSP
        &[0x07, 0x00, 0x00, 0x00],                         // 4: device_id 7
        &[0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00], // 8: nsectors 0x200000 (1 GiB)
        &[0x00, 0x04, 0x00, 0x00],                         // 16: max_hw_sectors 1024
        &[0x00, 0x00, 0x00, 0x00],                         // 20: max_write_same_sectors 0
        &[0xff, 0xff, 0x3f, 0x00],                         // 24: max_discard_sectors 0x3fffff
        &[0x00, 0x10, 0x00, 0x00],                         // 28: discard_granularity 4096
        &[0x00, 0x00, 0x00, 0x00],                         // 32: discard_alignment 0
        &[0x00, 0x10],                                     // 36: physical_block_size 4096
        &[0x00, 0x02],                                     // 38: logical_block_size 512
        &[0x80, 0x00],                                     // 40: max_segments 128
        &[0x00, 0x00],                                     // 42: secure_discard 0
        &[0x00],                                           // 44: obsolete_rotational
        &[0x03],                                           // 45: cache_policy FUA|WRITEBACK
        &[0; 10],                                          // 46: reserved
    ]);
    assert_eq!(g.len(), 56);
    let r = OpenRspRepr::parse(&OpenRsp::new_checked(&g[..]).unwrap());
    assert_eq!(
        r,
        OpenRspRepr {
            device_id: 7,
            nsectors: 0x20_0000,
            max_hw_sectors: 1024,
            max_write_same_sectors: 0,
            max_discard_sectors: 0x3f_ffff,
            discard_granularity: 4096,
            discard_alignment: 0,
            physical_block_size: 4096,
            logical_block_size: 512,
            max_segments: 128,
            secure_discard: 0,
            obsolete_rotational: 0,
            cache_policy: RNBD_FUA | RNBD_WRITEBACK,
        }
    );
    assert_eq!(emitted(|b| r.emit(b)), g);
    let mut lbs0 = g.clone();
    lbs0[38..40].fill(0);
    assert!(matches!(
        OpenRsp::new_checked(lbs0).unwrap_err(),
        ProtoError::BadField {
            field: "logical_block_size",
            ..
        }
    ));
    let mut cp = g.clone();
    cp[45] = 0x04;
    assert!(OpenRsp::new_checked(cp).is_err());
    let mut res = g.clone();
    res[50] = 1;
    assert!(OpenRsp::new_checked(res).is_err());
}

#[test]
fn rnbd_close_and_io() {
    let close = [0x05, 0x00, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00]; // device_id 42
    assert_eq!(Close::new_checked(&close[..]).unwrap().device_id(), 42);
    assert_eq!(emitted(|b| CloseRepr { device_id: 42 }.emit(b)), close);
    assert!(Close::new_checked(&close[..7]).is_err());

    let io = cat(&[
        &[0x04, 0x00, 0xee, 0xee], // hdr IO, padding uninitialised
        &[0x03, 0x00, 0x00, 0x00], // 4: device_id 3
        &[0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 8: sector 4096
        &[0x01, 0x03, 0x00, 0x00], // 16: rw WRITE | SYNC | FUA
        &[0x00, 0x10, 0x00, 0x00], // 20: bi_size 4096
        &[0x04, 0x40],             // 24: prio class 2 level 4
        &[0xee; 6],                // 26: tail padding
    ]);
    let v = Io::new_checked(&io[..]).unwrap();
    let r = IoRepr::parse(&v);
    assert_eq!(
        r,
        IoRepr {
            device_id: 3,
            sector: 4096,
            op: RnbdOp::Write,
            flags: RNBD_F_SYNC | RNBD_F_FUA,
            bi_size: 4096,
            prio: 0x4004,
        }
    );
    let mut clean = io.clone();
    clean[2..4].fill(0);
    clean[26..32].fill(0);
    assert_eq!(emitted(|b| r.emit(b)), clean);
    // Shorter than 32 bytes: the kernel's server reads no prio.
    assert_eq!(Io::new_checked(&io[..26]).unwrap().prio(), 0);
    assert!(Io::new_checked(&io[..23]).is_err());
    // The kernel's flush: op FLUSH with SYNC|FUA.
    let mut flush = io.clone();
    flush[16..20].copy_from_slice(&[0x02, 0x03, 0x00, 0x00]);
    assert_eq!(Io::new_checked(&flush[..]).unwrap().op(), RnbdOp::Flush);
    let mut op5 = io.clone();
    op5[16] = 5;
    assert!(matches!(
        Io::new_checked(op5).unwrap_err(),
        ProtoError::BadField {
            field: "rw op",
            got: 5,
            ..
        }
    ));
    let mut fl = io.clone();
    fl[17] = 0x04;
    assert!(matches!(
        Io::new_checked(fl).unwrap_err(),
        ProtoError::Reserved { .. }
    ));

    // Dispatch by type, as a server does with a user header.
    assert!(matches!(RnbdMsg::parse(&io), Ok(RnbdMsg::Io(_))));
    assert!(matches!(RnbdMsg::parse(&close), Ok(RnbdMsg::Close(_))));
    assert!(RnbdMsg::parse(&[0x01, 0x00, 0, 0]).is_err());
    assert!(matches!(
        RnbdMsg::parse(&[0x09, 0x00, 0, 0]),
        Err(ProtoError::UnknownType { got: 9, .. })
    ));
    assert!(RnbdMsg::parse(&[0x04]).is_err());
}
