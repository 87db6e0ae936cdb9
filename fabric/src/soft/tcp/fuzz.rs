//! Entry points for fuzzing the tcp fabric (`tests/tcp_fuzz.rs`): the frame
//! header codec, the CM message codec, and the RC engine fed arbitrary
//! bytes without a socket. Not an API.

use super::testkit::{Side, MEM};
use super::TcpConfig;
use crate::{FabricError, QpCap, QpState, SendWr};

pub use super::wire::{kind, op, Hdr, F_ACKREQ, F_FIRST, F_LAST, HDR, MAX_PIECE};

/// Bytes of a CM message.
pub const CM_MSG_LEN: usize = super::cm::MSG_LEN;

/// The checked frame header decoder.
pub fn decode_frame_header(b: &[u8]) -> Result<Hdr, &'static str> {
    Hdr::parse(b)
}

/// The frame header encoder.
pub fn encode_frame_header(h: &Hdr) -> [u8; HDR] {
    let mut b = [0u8; HDR];
    h.write(&mut b);
    b
}

/// The CM decoder, then the encoder over what it decoded.
pub fn decode_encode_cm(b: &[u8]) -> Result<[u8; CM_MSG_LEN], FabricError> {
    super::cm::decode_encode(b)
}

/// The RTU that opens a passive QP's stream.
pub fn cm_rtu() -> [u8; CM_MSG_LEN] {
    super::cm::rtu_bytes()
}

/// How a fed engine ended.
#[derive(Clone, Copy, Debug)]
pub struct Fed {
    /// The QP's state: `Rts` (still in progress) or `Error`.
    pub state: QpState,
    /// Completions it produced.
    pub completions: usize,
    /// Requests it had posted (each completes at most once).
    pub posted: usize,
    /// Receives it had posted.
    pub receives: usize,
    /// Bytes it sent the peer.
    pub sent: usize,
}

/// Where the fed engine's memory starts (frames aimed at it use this).
pub const FED_MEM: usize = MEM;

/// A QP with work outstanding (a READ, a WRITE, a SEND, receives posted)
/// whose peer sends `chunks`, one per poll, then goes quiet; `passive`: its
/// stream must open with the RTU. Frames may name `rkey` (the QP's key) and
/// addresses from `base`: `f(rkey, base)` makes the chunks.
pub fn feed_engine(passive: bool, f: impl FnOnce(u32, u64) -> Vec<Vec<u8>>) -> Fed {
    let cfg = TcpConfig {
        tx_buf: 16 << 10,
        rx_buf: 4 << 10,
        piece: 512,
        ..TcpConfig::default()
    };
    let cap = QpCap {
        max_send_wr: 8,
        max_recv_wr: 4,
        ..QpCap::default()
    };
    let (mut a, mut raw) = Side::raw(cap, &cfg, passive);
    for i in 0..2 {
        a.recv(100 + i, 8192 * i as usize, 8192);
    }
    let (w, r) = ([a.sge(16384, 3000)], [a.sge(20000, 3000)]);
    a.post(&SendWr::read(1, &r, 0x1000, 0x101));
    a.post(&SendWr::write(2, &w, 0x2000, 0x201));
    a.post(&SendWr::send(3, &w).unsignaled());
    let chunks = f(a.rkey, a.addr(0));
    let mut sent = 0;
    for c in &chunks {
        use super::stream::ByteStream;
        // The pipe holds 1 MiB; what does not fit is dropped, as a test's
        // bytes may be anything.
        let _ = raw.send(c);
        a.poll();
        sent += raw.take_all().len();
    }
    for _ in 0..4 {
        a.poll();
        sent += raw.take_all().len();
    }
    Fed {
        state: a.e.state(),
        completions: a.take().len(),
        posted: 3,
        receives: 2,
        sent,
    }
}
