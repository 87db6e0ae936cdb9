//! The tcp fabric's decoders and RC engine under proptest, as `proto` is
//! fuzzed (proto_fuzz.rs, proto_props.rs): the 48-byte frame header, the
//! 96-byte CM message (auth kinds 5..=8 included), and the engine fed
//! arbitrary byte streams without a socket. Nothing may panic; whatever a
//! decoder accepts re-encodes to itself; every out-of-range field is refused;
//! a fed engine ends in progress (RTS) or in the error state. Plus
//! time-bounded mutation targets (`fuzz_tcp_*`, as `proto_fuzz.rs`; run with
//! `cargo test fuzz` in the test command, budget `RTRS_FUZZ_SECS`).

use proptest::prelude::*;
use rtrs_fabric::soft::tcp::fuzz::*;
use rtrs_fabric::QpState;

#[path = "common/mutate.rs"]
mod mutate;

/// Each mutation target gets 1/12 of `RTRS_FUZZ_SECS`, as each of
/// `proto_fuzz.rs`'s twelve does (this file's four take a third more).
const TARGETS: u32 = 12;

const MAGIC: u32 = 0x7074_6372;
const NONCE_AT: usize = 8;
const PROOF_AT: usize = 40;
/// Nonce and proof: 32 bytes each; bytes 72..96 of an auth message are
/// reserved.
const AUTH_END: usize = PROOF_AT + 32;
const PDATA_AT: usize = 40;

fn hdr() -> impl Strategy<Value = Hdr> {
    (
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u32>()),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |((kind, op, flags, piece), (psn, ack, total, off), (raddr, rkey, word))| Hdr {
                kind,
                op,
                flags,
                piece,
                psn,
                ack,
                total,
                off,
                raddr,
                rkey,
                word,
            },
        )
}

/// A header every decoder accepts: a known kind, a request opcode, a piece
/// inside its message.
fn valid_hdr() -> impl Strategy<Value = Hdr> {
    (hdr(), 1u8..=5, 1u8..=6, 0u32..=MAX_PIECE, any::<u32>()).prop_map(
        |(mut h, kind, op, piece, extra)| {
            h.kind = kind;
            h.op = op;
            if kind >= kind::ACK || (kind == kind::REQ && op == op::READ) {
                h.piece = 0;
                h.off = h.off.min(h.total);
            } else {
                h.piece = piece;
                let room = u32::MAX - piece;
                h.off = h.off.min(room);
                h.total = h.off + piece + extra.min(room - h.off);
            }
            h
        },
    )
}

fn cm_msg(kind: u8, plen: u8, body: &[u8; 88]) -> [u8; CM_MSG_LEN] {
    let mut b = [0u8; CM_MSG_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&1u16.to_le_bytes());
    b[6] = kind;
    if (5..=8).contains(&kind) {
        b[NONCE_AT..AUTH_END].copy_from_slice(&body[..AUTH_END - NONCE_AT]);
    } else {
        b[7] = plen;
        b[8..20].copy_from_slice(&body[..12]);
        let p = usize::from(plen).min(56);
        b[PDATA_AT..PDATA_AT + p].copy_from_slice(&body[12..12 + p]);
    }
    b
}

fn body() -> impl Strategy<Value = [u8; 88]> {
    proptest::collection::vec(any::<u8>(), 88).prop_map(|v| v.try_into().unwrap())
}

fn fed_ok(f: &Fed) -> Result<(), TestCaseError> {
    prop_assert!(matches!(f.state, QpState::Rts | QpState::Error), "{f:?}");
    prop_assert!(f.completions <= f.posted + f.receives, "{f:?}");
    Ok(())
}

/// Frames from a small alphabet, aimed at the fed engine: psns near the
/// start, its real rkey or another, addresses in or near its memory.
fn frames() -> impl Strategy<Value = Vec<(Hdr, Vec<u8>, bool)>> {
    let one = (
        1u8..=6,
        0u8..=7,
        0u8..=8,
        0u64..4,
        0u64..5,
        0u32..2048,
        0u32..64,
        (0u64..(FED_MEM as u64 + 4096), any::<bool>(), any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            |(kind, op, flags, psn, ack, total, off, (raddr, real_key, word), trunc)| {
                let piece = if kind <= 2 && op != 6 {
                    total.saturating_sub(off).min(600)
                } else {
                    0
                };
                let mut h = Hdr::default();
                (h.kind, h.op, h.flags, h.piece) = (kind, op, flags, piece);
                (h.psn, h.ack, h.total, h.off) = (psn, ack, total, off);
                // u32::MAX stands for the fed engine's real rkey.
                let rkey = if real_key { u32::MAX } else { word };
                (h.raddr, h.rkey, h.word) = (raddr, rkey, word);
                (h, vec![0x5a; piece as usize], trunc)
            },
        );
    proptest::collection::vec(one, 0..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn frame_header_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
        match decode_frame_header(&b) {
            Ok(h) => {
                prop_assert!(b.len() >= HDR);
                let e = encode_frame_header(&h);
                prop_assert_eq!(decode_frame_header(&e), Ok(h));
                // Every byte but the reserved one is the input's.
                prop_assert_eq!(&e[..3], &b[..3]);
                prop_assert_eq!(&e[4..], &b[4..HDR]);
            }
            Err(_) => prop_assert!(b.len() < HDR || Hdr::read(&b).check().is_err()),
        }
    }

    #[test]
    fn frame_header_round_trips(h in valid_hdr()) {
        let e = encode_frame_header(&h);
        prop_assert_eq!(decode_frame_header(&e), Ok(h));
        prop_assert_eq!(Hdr::read(&e), h);
    }

    #[test]
    fn frame_header_any_fields_encode_and_read_back(h in hdr()) {
        let e = encode_frame_header(&h);
        prop_assert_eq!(Hdr::read(&e), h);
        prop_assert_eq!(decode_frame_header(&e).is_ok(), h.check().is_ok());
    }

    #[test]
    fn frame_header_out_of_range_fields_are_refused(h in valid_hdr(), bad: u8, big in MAX_PIECE + 1.., short in 0usize..HDR) {
        let refused = |h: Hdr| decode_frame_header(&encode_frame_header(&h)).is_err();
        let bad_kind = if (1..=5).contains(&bad) { bad + 5 } else { bad };
        prop_assert!(refused(Hdr { kind: bad_kind, ..h }), "kind {}", bad_kind);
        let bad_op = if (1..=6).contains(&bad) { bad + 6 } else { bad };
        prop_assert!(refused(Hdr { kind: kind::REQ, op: bad_op, ..h }), "op {}", bad_op);
        prop_assert!(refused(Hdr { piece: big, total: u32::MAX, off: 0, ..h }), "piece {}", big);
        if h.total < u32::MAX {
            let piece = (h.total - h.off.min(h.total)).saturating_add(1).min(MAX_PIECE);
            let off = h.total + 1 - piece;
            prop_assert!(refused(Hdr { kind: kind::RESP, piece, off, ..h }), "piece beyond total");
        }
        for k in [kind::ACK, kind::NAK, kind::RNR_NAK] {
            prop_assert!(refused(Hdr { kind: k, piece: 1, total: 1, off: 0, ..h }), "control kind {}", k);
        }
        prop_assert!(refused(Hdr { kind: kind::REQ, op: op::READ, piece: 1, total: 1, off: 0, ..h }), "READ with payload");
        prop_assert!(decode_frame_header(&encode_frame_header(&h)[..short]).is_err());
    }

    #[test]
    fn cm_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(e) = decode_encode_cm(&b) {
            prop_assert_eq!(b.len(), CM_MSG_LEN);
            prop_assert_eq!(decode_encode_cm(&e).ok(), Some(e));
            prop_assert_eq!(&e[..7], &b[..7]);
        }
    }

    #[test]
    fn cm_messages_round_trip(kind in 1u8..=8, plen in 0u8..=56, body in body()) {
        let m = cm_msg(kind, plen, &body);
        prop_assert_eq!(decode_encode_cm(&m).ok(), Some(m));
    }

    #[test]
    fn cm_out_of_range_fields_are_refused(kind in 1u8..=8, plen in 0u8..=56, body in body(),
                                         magic: u32, version: u16, bad_kind: u8, bad_plen in 57u8..,
                                         len in 0usize..300) {
        let m = cm_msg(kind, plen, &body);
        let mut b = m;
        b[0..4].copy_from_slice(&magic.to_le_bytes());
        prop_assert_eq!(decode_encode_cm(&b).is_ok(), magic == MAGIC);
        let mut b = m;
        b[4..6].copy_from_slice(&version.to_le_bytes());
        prop_assert_eq!(decode_encode_cm(&b).is_ok(), version == 1);
        let mut b = m;
        b[6] = bad_kind;
        prop_assert_eq!(decode_encode_cm(&b).is_ok(), (1..=8).contains(&bad_kind));
        if kind <= 4 {
            let mut b = m;
            b[7] = bad_plen;
            prop_assert!(decode_encode_cm(&b).is_err(), "plen {}", bad_plen);
        }
        if len != CM_MSG_LEN {
            let mut v = m.to_vec();
            v.resize(len, 0);
            prop_assert!(decode_encode_cm(&v).is_err(), "length {}", len);
        }
    }

    #[test]
    fn engine_fed_arbitrary_bytes_never_panics(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..12),
        passive: bool,
    ) {
        let f = feed_engine(passive, |_, _| chunks);
        fed_ok(&f)?;
    }

    #[test]
    fn engine_fed_frames_never_panics(frames in frames(), passive: bool, rtu: bool, split in 1usize..200) {
        let f = feed_engine(passive, |rkey, base| {
            let mut bytes = Vec::new();
            if passive && rtu {
                bytes.extend_from_slice(&cm_rtu());
            }
            for (mut h, payload, trunc) in frames {
                if h.rkey == u32::MAX {
                    h.rkey = rkey;
                }
                h.raddr = h.raddr.wrapping_add(base);
                bytes.extend_from_slice(&encode_frame_header(&h));
                let n = if trunc { payload.len() / 2 } else { payload.len() };
                bytes.extend_from_slice(&payload[..n]);
            }
            bytes.chunks(split).map(<[u8]>::to_vec).collect()
        });
        fed_ok(&f)?;
    }
}

#[test]
fn engine_fed_a_valid_read_response_and_acks_completes() {
    // Not arbitrary: the fed engine's READ (psn 0, 3000 bytes) answered in
    // six pieces, which also acknowledges it; then an ACK of the rest.
    let f = feed_engine(false, |_, _| {
        let mut out = Vec::new();
        for i in 0..6u32 {
            let h = Hdr {
                kind: kind::RESP,
                flags: if i == 0 { F_FIRST } else { 0 } | if i == 5 { F_LAST } else { 0 },
                piece: 500,
                psn: 0,
                total: 3000,
                off: i * 500,
                ..Hdr::default()
            };
            let mut b = encode_frame_header(&h).to_vec();
            b.extend_from_slice(&[7; 500]);
            out.push(b);
        }
        let ack = Hdr {
            kind: kind::ACK,
            ack: 3,
            ..Hdr::default()
        };
        out.push(encode_frame_header(&ack).to_vec());
        out
    });
    assert_eq!(f.state, QpState::Rts);
    // READ and WRITE (signaled) complete; the unsignaled SEND retires silently.
    assert_eq!(f.completions, 2);
    assert!(f.sent > 0);
}

// ---------------------------------------------------------------------------
// Mutation targets.

fn hdr_bytes(h: Hdr, payload: usize) -> Vec<u8> {
    let mut b = encode_frame_header(&h).to_vec();
    b.resize(HDR + payload, 0x33);
    b
}

/// Valid frames: a request of each opcode, a READ response, ACK, NAKs.
fn frame_seeds() -> Vec<Vec<u8>> {
    let req = |op, piece, total| Hdr {
        kind: kind::REQ,
        op,
        flags: F_FIRST | F_LAST | F_ACKREQ,
        piece,
        total,
        rkey: 0x101,
        ..Hdr::default()
    };
    let mut v: Vec<Vec<u8>> = (1..=5).map(|o| hdr_bytes(req(o, 64, 64), 64)).collect();
    v.push(hdr_bytes(req(op::READ, 0, 3000), 0));
    let resp = Hdr {
        kind: kind::RESP,
        flags: F_FIRST,
        piece: 500,
        total: 3000,
        ..Hdr::default()
    };
    v.push(hdr_bytes(resp, 500));
    for k in [kind::ACK, kind::NAK, kind::RNR_NAK] {
        v.push(hdr_bytes(
            Hdr {
                kind: k,
                ack: 1,
                word: 10,
                ..Hdr::default()
            },
            0,
        ));
    }
    v
}

fn check_frame(b: &[u8]) {
    if let Ok(h) = decode_frame_header(b) {
        assert_eq!(decode_frame_header(&encode_frame_header(&h)), Ok(h));
    }
}

#[test]
fn fuzz_tcp_frame_header() {
    mutate::fuzz("tcp_frame_header", TARGETS, frame_seeds(), check_frame);
}

#[test]
fn fuzz_tcp_cm() {
    let seeds = (1..=8u8)
        .map(|k| cm_msg(k, 8, &[0x42; 88]).to_vec())
        .collect();
    mutate::fuzz("tcp_cm", TARGETS, seeds, |b| {
        if let Ok(e) = decode_encode_cm(b) {
            assert_eq!(decode_encode_cm(&e).ok(), Some(e));
        }
    });
}

#[test]
fn fuzz_tcp_engine() {
    // Streams of valid frames (the fed engine's READ answered, acks, requests
    // aimed at its memory) mutated, then fed in a few chunks.
    let mut stream = Vec::new();
    for s in frame_seeds() {
        stream.extend_from_slice(&s);
    }
    let cut = stream[..200].to_vec();
    let seeds = vec![stream, cut];
    for passive in [false, true] {
        let name = if passive {
            "tcp_engine_passive"
        } else {
            "tcp_engine"
        };
        mutate::fuzz(name, TARGETS, seeds.clone(), |b| {
            let f = feed_engine(passive, |_, _| {
                let mut v = Vec::new();
                if passive {
                    v.push(cm_rtu().to_vec());
                }
                v.extend(b.chunks(97).map(<[u8]>::to_vec));
                v
            });
            assert!(matches!(f.state, QpState::Rts | QpState::Error), "{f:?}");
            assert!(f.completions <= f.posted + f.receives, "{f:?}");
        });
    }
}
