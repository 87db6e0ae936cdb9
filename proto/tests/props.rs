//! Round trips: any representable message emits bytes that decode back to
//! the same value, and any immediate encodes and decodes to itself.

use proptest::prelude::*;
use rtrs_proto::chunk::{self, IoReqKind};
use rtrs_proto::imm::{io_rsp, Imm, ImmLayout};
use rtrs_proto::rnbd::*;
use rtrs_proto::*;

fn sg_desc() -> impl Strategy<Value = SgDesc> {
    (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(addr, key, len)| SgDesc {
        addr,
        key,
        len,
    })
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_:@-]{1,254}"
}

proptest! {
    #[test]
    fn conn_req_round_trip(cid_num in 1u16..=4096, cid_frac in 0.0f64..1.0, recon_cnt: u16,
                           sess_uuid: [u8; 16], paths_uuid: [u8; 16], first_conn: bool) {
        let cid = ((cid_num as f64 * cid_frac) as u16).min(cid_num - 1);
        let r = ConnReqRepr { cid, cid_num, recon_cnt, sess_uuid, paths_uuid, first_conn };
        let mut b = [0u8; 56];
        prop_assert_eq!(r.emit(&mut b).unwrap(), 56);
        prop_assert_eq!(ConnReqRepr::parse(&ConnReq::new_checked(&b[..]).unwrap()), r);
    }

    #[test]
    fn conn_rsp_round_trip(errno in i16::MIN + 1..=0, queue_depth: u16, max_io_size: u32,
                           max_hdr_size: u32, new_rkey: bool) {
        let r = ConnRspRepr { errno, queue_depth, max_io_size, max_hdr_size, new_rkey };
        let mut b = [0u8; 56];
        r.emit(&mut b).unwrap();
        prop_assert_eq!(ConnRspRepr::parse(&ConnRsp::new_checked(&b[..]).unwrap()), r);
    }

    #[test]
    fn info_req_round_trip(n in name()) {
        let mut b = [0u8; 272];
        InfoReqRepr { sessname: &n }.emit(&mut b).unwrap();
        let v = InfoReq::new_checked(&b[..]).unwrap();
        prop_assert_eq!(v.sessname(), n.as_str());
    }

    #[test]
    fn info_rsp_round_trip(descs in proptest::collection::vec(sg_desc(), 0..64)) {
        let r = InfoRspRepr { descs: &descs };
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b).unwrap();
        let v = InfoRsp::new_checked(&b[..]).unwrap();
        prop_assert_eq!(v.descs().iter().collect::<Vec<_>>(), descs);
    }

    #[test]
    fn rkey_rdma_read_write_round_trip(buf_id: u16, rkey: u32, usr_len: u16, need_inval: bool,
                                       desc in proptest::option::of(sg_desc())) {
        let mut b = [0u8; 24];
        let r = RkeyRspRepr { buf_id, rkey };
        r.emit(&mut b).unwrap();
        prop_assert_eq!(RkeyRspRepr::parse(&RkeyRsp::new_checked(&b[..8]).unwrap()), r);
        let r = RdmaReadRepr { usr_len, need_inval, desc };
        let n = r.emit(&mut b).unwrap();
        prop_assert_eq!(RdmaReadRepr::parse(&RdmaRead::new_checked(&b[..n]).unwrap()), r);
        RdmaWriteRepr { usr_len }.emit(&mut b).unwrap();
        prop_assert_eq!(RdmaWrite::new_checked(&b[..4]).unwrap().usr_len(), usr_len);
    }

    #[test]
    fn chunk_round_trip(data_len in 0u32..8192, usr in proptest::collection::vec(any::<u8>(), 0..300),
                        read: bool, desc_key: u32) {
        let mut c = vec![0u8; 16384];
        let off = chunk::msg_off(data_len, usr.len());
        let start = data_len as usize;
        if read {
            let d = SgDesc { addr: 0x1000, key: desc_key, len: data_len };
            chunk::emit_read_tail(&mut c[start..], &usr,
                RdmaReadRepr { usr_len: 0, need_inval: true, desc: Some(d) }).unwrap();
        } else {
            c[..start].fill(0x3c);
            chunk::emit_write_tail(&mut c[start..], &usr).unwrap();
        }
        let r = chunk::parse(&c, off).unwrap();
        prop_assert_eq!(r.usr, &usr[..]);
        prop_assert_eq!(r.data_len(), data_len);
        match r.kind {
            IoReqKind::Write { data } => { prop_assert!(!read); prop_assert!(data.iter().all(|&x| x == 0x3c)); }
            IoReqKind::Read { msg, .. } => { prop_assert!(read); prop_assert_eq!(msg.descs().get(0).unwrap().key, desc_key); }
        }
    }

    #[test]
    fn io_req_imm_round_trip(qd in 1u32..=65535, cs_bits in 13u32..=27, id_frac in 0.0f64..1.0, off_frac in 0.0f64..1.0) {
        let cs = 1u32 << cs_bits;
        match ImmLayout::new(qd, cs) {
            Err(_) => prop_assert!(bits(qd) + bits(cs) > 28),
            Ok(l) => {
                let buf_id = ((qd as f64 * id_frac) as u32).min(qd - 1);
                let off = ((cs as f64 * off_frac) as u32).min(cs - 1);
                let imm = l.io_req(buf_id, off).unwrap();
                prop_assert_eq!(imm >> 28, 0);
                prop_assert_eq!(l.decode_srv(imm).unwrap(), Imm::IoReq { buf_id, off });
            }
        }
    }

    #[test]
    fn io_rsp_imm_round_trip(msg_id in 0u32..(1 << 19), mag in 0i32..=511, inval: bool) {
        let imm = io_rsp(msg_id, -mag, inval).unwrap();
        prop_assert_eq!(Imm::decode_clt(imm).unwrap(), Imm::IoRsp { msg_id, errno: -mag, inval });
    }

    #[test]
    fn rnbd_round_trip(n in name(), mode in 0u8..3, device_id: u32, sector: u64, op in 0u8..5,
                       sync: bool, fua: bool, bi_size: u32, prio: u16, nsectors: u64, lbs in 1u16..) {
        let mut b = [0u8; 264];
        let o = OpenRepr { access_mode: AccessMode::from_u8(mode).unwrap(), dev_name: &n };
        o.emit(&mut b).unwrap();
        let v = Open::new_checked(&b[..]).unwrap();
        prop_assert_eq!(v.dev_name(), n.as_str());
        prop_assert_eq!(v.access_mode(), o.access_mode);

        let flags = if sync { RNBD_F_SYNC } else { 0 } | if fua { RNBD_F_FUA } else { 0 };
        let (op, _) = RnbdOp::from_rw(op.into()).unwrap();
        let io = IoRepr { device_id, sector, op, flags, bi_size, prio };
        io.emit(&mut b).unwrap();
        prop_assert_eq!(IoRepr::parse(&Io::new_checked(&b[..32]).unwrap()), io);

        let r = OpenRspRepr { device_id, nsectors, logical_block_size: lbs, cache_policy: (mode & 3),
                              max_discard_sectors: bi_size, ..OpenRspRepr::default() };
        r.emit(&mut b).unwrap();
        prop_assert_eq!(OpenRspRepr::parse(&OpenRsp::new_checked(&b[..56]).unwrap()), r);
        CloseRepr { device_id }.emit(&mut b).unwrap();
        prop_assert_eq!(Close::new_checked(&b[..8]).unwrap().device_id(), device_id);
    }
}
