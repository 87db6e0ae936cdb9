//! The RC engine of one tcp queue pair: both halves of the connection
//! (the requester's in `requester.rs`, the responder's in `responder.rs`)
//! over a byte stream (`stream.rs`), with no socket of its own: the stream is
//! a [`ByteStream`], a non-blocking `TcpStream` in the fabric and an
//! in-memory pipe in the tests, so the whole RC logic runs without sockets.
//!
//! ```text
//!  post_send ─> requester: WQE ring ─> emit_req ─┐
//!                                               ├─> stream: tx ─> send()
//!  responder: READ responses, ACK/NAK ──────────┘
//!  recv() ─> stream: rx ─> parse ─> on_header ─> responder (REQ) | requester (RESP, NAK)
//! ```

use super::requester::{InResp, Wqe};
use super::responder::{InReq, ReadOut};
use super::stream::{Buf, ByteStream, Rtu, RxFrame};
use super::wire::MAX_SEND_SGE;
use super::TcpConfig;
use crate::soft::engine::QpCore;
use crate::soft::mr::MrTable;
use crate::{QpState, Sge, Wc, WcStatus};
use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::Arc;

/// Most segments a checked scatter list holds.
pub(super) const MAX_SEGS: usize = MAX_SEND_SGE as usize;

/// The lkey of the registration `key` (an lkey or rkey) belongs to: it
/// changes only when the region is deregistered, so a payload that spans
/// polls checks it before each copy (an rkey invalidated meanwhile does not
/// stop a transfer under way, as with a DMA; a freed region does).
pub(super) fn reg_key(mrs: &MrTable, key: u32) -> u32 {
    mrs.lkey(key >> 8)
}

/// A checked scatter list: (address, length, registration lkey) in
/// registered memory of ours.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segs {
    s: [(usize, usize, u32); MAX_SEGS],
    n: usize,
}

impl Segs {
    pub(super) const EMPTY: Segs = Segs {
        s: [(0, 0, 0); MAX_SEGS],
        n: 0,
    };

    pub(super) fn push(&mut self, addr: usize, len: usize, reg: u32) {
        if len > 0 {
            self.s[self.n] = (addr, len, reg);
            self.n += 1;
        }
    }

    /// Whether every segment's registration is still the one we checked.
    pub(super) fn alive(&self, mrs: &MrTable) -> bool {
        self.s[..self.n]
            .iter()
            .all(|&(_, _, reg)| reg_key(mrs, reg) == reg)
    }

    /// Copies `data` into the list starting `off` bytes in (clipped to the
    /// list). The caller checked `alive` just before.
    pub(super) fn scatter(&self, mut off: usize, mut data: &[u8]) {
        for &(addr, len, _) in &self.s[..self.n] {
            if data.is_empty() {
                break;
            }
            if off >= len {
                off -= len;
                continue;
            }
            let n = (len - off).min(data.len());
            // SAFETY: (addr, len) was checked against a registration of ours
            // with LOCAL_WRITE (or REMOTE_WRITE for the rkey of an RDMA WRITE)
            // when the message started, and the caller saw that registration
            // still alive; off + n <= len.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (addr + off) as *mut u8, n) };
            data = &data[n..];
            off = 0;
        }
    }
}

/// The per-QP state a core drives: both the initiator's and the responder's
/// halves of one RC connection, and its socket buffers.
pub struct Engine<S: ByteStream = TcpStream> {
    pub(super) core: QpCore,
    /// The protection domain's registrations (the one table requests are
    /// checked against).
    pub(super) mrs: Arc<MrTable>,
    /// The connection, once attached.
    pub(super) link: Option<S>,

    // ---- initiator
    pub(super) mask: u64,
    pub(super) wqes: Box<[Wqe]>,
    pub(super) sges: Box<[Sge]>,
    pub(super) max_sge: usize,
    pub(super) inline: Box<[u8]>,
    pub(super) inline_cap: usize,
    /// Next request to put on the wire, and how much of its payload is out.
    pub(super) tx_psn: u64,
    pub(super) tx_off: u32,
    /// Every request below this has been executed by the peer.
    pub(super) acked: u64,
    /// Requests whose psn has these bits set ask for a prompt ACK.
    pub(super) ack_mask: u64,
    /// The request the peer last refused as not ready, and how many times.
    pub(super) rnr: (u64, u32),
    pub(super) rnr_until: Option<minstant::Instant>,
    pub(super) in_resp: Option<InResp>,

    // ---- responder
    /// Next request psn to execute.
    pub(super) in_psn: u64,
    /// After an RNR NAK: drop requests until `in_psn` starts again.
    pub(super) dropping: bool,
    pub(super) in_req: Option<InReq>,
    pub(super) reads: VecDeque<ReadOut>,
    pub(super) peer_depth: usize,
    /// An NAK to send: (kind, psn, status code).
    pub(super) nak_out: Option<(u8, u64, u32)>,
    /// The peer asked for an ACK covering `ack_want` requests.
    pub(super) ack_due: bool,
    pub(super) ack_want: u64,
    pub(super) ack_sent: u64,

    // ---- io
    pub(super) piece: u32,
    pub(super) tx: Buf,
    pub(super) rx: Buf,
    pub(super) frame: Option<RxFrame>,
    pub(super) rtu: Rtu,
    /// In the error state: finish what must go out (READ responses, the
    /// NAK), then shut the writing half; drain the reading half to EOF.
    pub(super) shut: bool,
    pub(super) eof: bool,
}

impl<S: ByteStream> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Engine(qp {}, {:?}, sent psn {}, acked {}, executed {})",
            self.core.qp_num, self.core.state, self.tx_psn, self.acked, self.in_psn
        )
    }
}

/// What the connection manager hands a QP once the handshake is done.
#[derive(Debug)]
pub struct Link<S = TcpStream> {
    /// The connection (non-blocking, tuned); the QP keeps it.
    pub(super) stream: S,
    /// Room for the READ responses the peer may have us owe at once (its
    /// send queue depth), allocated here on the slow path.
    pub(super) reads: VecDeque<ReadOut>,
    pub(super) peer_depth: usize,
    /// Passive side: the stream starts with the peer's RTU.
    pub(super) expect_rtu: bool,
}

impl<S> Link<S> {
    pub(crate) fn new(stream: S, peer_max_send_wr: u32, expect_rtu: bool) -> Link<S> {
        let peer_depth = peer_max_send_wr.clamp(1, 1 << 20) as usize;
        Link {
            stream,
            reads: VecDeque::with_capacity(peer_depth),
            peer_depth,
            expect_rtu,
        }
    }
}

impl<S: ByteStream> Engine<S> {
    /// An engine for `core`, checking requests against `mrs`, with the
    /// buffers `cfg` sizes (allocated here, never on the data path).
    pub(crate) fn new(core: QpCore, mrs: Arc<MrTable>, cfg: &TcpConfig) -> Engine<S> {
        let cap = core.cap;
        let depth = cap.max_send_wr.next_power_of_two() as usize;
        let max_sge = cap.max_send_sge.max(1) as usize;
        let inline_cap = cap.max_inline_data as usize;
        Engine {
            core,
            mrs,
            link: None,
            mask: depth as u64 - 1,
            wqes: vec![Wqe::default(); depth].into_boxed_slice(),
            sges: vec![Sge::default(); depth * max_sge].into_boxed_slice(),
            max_sge,
            inline: vec![0u8; depth * inline_cap].into_boxed_slice(),
            inline_cap,
            tx_psn: 0,
            tx_off: 0,
            acked: 0,
            ack_mask: (depth as u64 / 4).max(1) - 1,
            rnr: (u64::MAX, 0),
            rnr_until: None,
            in_resp: None,
            in_psn: 0,
            dropping: false,
            in_req: None,
            reads: VecDeque::new(),
            peer_depth: 0,
            nak_out: None,
            ack_due: false,
            ack_want: 0,
            ack_sent: 0,
            piece: cfg.piece,
            tx: Buf::new(cfg.tx_buf),
            rx: Buf::new(cfg.rx_buf),
            frame: None,
            rtu: Rtu::Done,
            shut: false,
            eof: false,
        }
    }

    /// Takes the connection the connection manager made (once): the QP is
    /// ready to send.
    pub(crate) fn attach(&mut self, link: Link<S>) {
        if self.link.is_some() {
            return;
        }
        self.link = Some(link.stream);
        self.reads = link.reads;
        self.peer_depth = link.peer_depth;
        self.rtu = if link.expect_rtu {
            Rtu::Expected
        } else {
            Rtu::Done
        };
        if self.core.state == QpState::Init {
            self.core.state = QpState::Rts;
        }
    }

    /// Moves up to `out.len()` of the completions waiting for the send
    /// and/or receive CQ into `out`.
    pub(crate) fn drain_wcs(&mut self, send: bool, recv: bool, out: &mut [Wc]) -> usize {
        self.core.drain_wcs(send, recv, out)
    }

    /// Whether a connection was attached.
    pub(crate) fn linked(&self) -> bool {
        self.link.is_some()
    }

    /// The QP's state as the engine sees it.
    pub(crate) fn state(&self) -> QpState {
        self.core.state
    }

    /// The connection manager broke the QP (a local disconnect, the peer's
    /// CM went away, the QP was destroyed): flush now.
    pub(crate) fn break_off(&mut self) {
        if self.core.state != QpState::Error {
            self.fail(None);
        }
    }

    /// Passive side: true once, when the core has read the peer's RTU.
    pub(crate) fn take_rtu_seen(&mut self) -> bool {
        if self.rtu == Rtu::Seen {
            self.rtu = Rtu::Done;
            return true;
        }
        false
    }

    /// Error state: flush everything outstanding; the socket then winds down.
    pub(super) fn fail(&mut self, failed: Option<(u64, WcStatus)>) {
        self.core.enter_error(failed);
        self.in_req = None;
        self.in_resp = None;
        self.frame = None;
        self.rnr_until = None;
        self.ack_due = false;
    }

    pub(super) fn protocol_error(&mut self, why: &'static str) {
        tracing::warn!(
            "tcp fabric: QP {}: peer broke the protocol: {why}",
            self.core.qp_num
        );
        self.nak_out = None;
        self.reads.clear();
        self.fail(None);
    }

    /// Drives the QP: sends what is ready, receives and executes what came.
    pub(crate) fn drive(&mut self) {
        if self.link.is_some() {
            match self.core.state {
                QpState::Rts => self.pump(),
                QpState::Error => self.wind_down(),
                QpState::Init => {}
            }
        }
        // Local operations queued behind requests that are all done.
        if let Some(e) = self.core.sq.front() {
            if !e.wire && e.psn <= self.acked {
                self.core.retire(self.acked);
            }
        }
    }

    /// Everything posted is on the wire, nothing is buffered either way
    /// and no timer runs: polling would only `recv` nothing until the peer
    /// sends (its acks of what is outstanding included).
    pub(crate) fn quiet(&self) -> bool {
        self.link.is_some()
            && self.core.state == QpState::Rts
            && self.rtu == Rtu::Done
            && self.core.send_wcs.is_empty()
            && self.core.recv_wcs.is_empty()
            && !self.has_output()
            && self.rx.is_empty()
            && self.frame.is_none()
            && self.in_req.is_none()
            && self.in_resp.is_none()
            && self.rnr_until.is_none()
            && !self.eof
    }

    pub(super) fn has_output(&self) -> bool {
        !self.tx.is_empty()
            || self.tx_psn < self.core.next_psn
            || self.nak_out.is_some()
            || self.ack_due
            || !self.reads.is_empty()
    }
}
