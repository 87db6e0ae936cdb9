//! The byte stream under a tcp QP: the tx and rx buffers, the send/recv
//! pump, frame parsing and framing (what goes in the tx buffer, in what
//! order). The stream itself is a [`ByteStream`]: the QP's non-blocking
//! socket, or an in-memory pipe when the engine is tested without sockets.
//!
//! ```text
//!  poll: fill ─> tx ─> send()      (what was posted, READ responses, ACK/NAK)
//!        recv() ─> rx ─> parse ─> on_header ─> responder | requester
//!        fill ─> tx ─> send()      (what executing the peer's requests produced)
//!  error: finish READ responses owed and the NAK, shut the writing half,
//!         drain the reading half to EOF
//! ```

use super::rc::Engine;
use super::sock;
use super::wire::{kind, Hdr, F_ACKREQ, F_LAST, HDR};
use super::{cm, MIN_PIECE};
use crate::{QpState, WcStatus};
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Receives per QP per poll at most (each fills the rx buffer).
const RECV_BATCH: usize = 4;

/// A non-blocking byte stream: what the engine sends and receives through.
pub trait ByteStream {
    /// One send of a prefix of `buf`; `EAGAIN` when there is no room.
    fn send(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// One receive into `buf`: `Ok(0)` is the end of the stream, `EAGAIN`
    /// that nothing has arrived.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Ends the writing half (the peer reads EOF after what was sent).
    fn shutdown_write(&mut self);
}

impl ByteStream for TcpStream {
    #[inline]
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        sock::send(self.as_raw_fd(), buf)
    }
    #[inline]
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sock::recv(self.as_raw_fd(), buf)
    }
    fn shutdown_write(&mut self) {
        sock::shutdown_write(self.as_raw_fd());
    }
}

/// Passive side: the RTU that opens the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rtu {
    /// Not read yet: it comes before any frame.
    Expected,
    /// Read; the connection manager has yet to hear of it.
    Seen,
    /// Told (or not expected).
    Done,
}

/// Where the payload of the frame being received goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sink {
    Discard,
    Req,
    Resp,
}

#[derive(Clone, Copy, Debug)]
/// The frame being received: its header and payload bytes still to come.
pub(super) struct RxFrame {
    pub(super) hdr: Hdr,
    pub(super) left: u32,
    pub(super) sink: Sink,
}

/// A fixed buffer with its valid bytes at `lo..hi`.
pub(super) struct Buf {
    pub(super) b: Box<[u8]>,
    pub(super) lo: usize,
    pub(super) hi: usize,
}

impl Buf {
    pub(super) fn new(len: usize) -> Buf {
        Buf {
            b: vec![0u8; len].into_boxed_slice(),
            lo: 0,
            hi: 0,
        }
    }
    pub(super) fn is_empty(&self) -> bool {
        self.lo == self.hi
    }
    pub(super) fn room(&self) -> usize {
        self.b.len() - self.hi
    }
    /// Moves the valid bytes to the front.
    pub(super) fn compact(&mut self) {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.lo > 0 {
            self.b.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
    }
}
impl<S: ByteStream> Engine<S> {
    pub(super) fn pump(&mut self) {
        if self.has_output() {
            self.fill();
            if let Err(e) = self.flush() {
                return self.socket_failed(e);
            }
        }
        self.read();
        if self.core.state == QpState::Rts && self.has_output() {
            self.fill();
            if let Err(e) = self.flush() {
                return self.socket_failed(e);
            }
        }
        if self.core.state == QpState::Error {
            self.wind_down();
        }
    }

    /// The socket failed: take in what the peer said before (a NAK explains
    /// more than a reset), then flush.
    pub(super) fn socket_failed(&mut self, e: io::Error) {
        if !self.eof {
            self.read();
        }
        if self.core.state == QpState::Rts {
            self.fail_io(&e);
        }
        self.tx.lo = 0;
        self.tx.hi = 0;
        self.shut = true;
        self.wind_down();
    }

    pub(super) fn fail_io(&mut self, e: &io::Error) {
        if e.raw_os_error() == Some(libc::ETIMEDOUT) {
            // TCP gave up retransmitting: the RC transport's retry budget.
            let oldest = self.core.sq.iter().find(|e| e.wire).map(|e| e.psn);
            self.fail(oldest.map(|p| (p, WcStatus::RetryExcErr)));
        } else {
            self.fail(None);
        }
    }

    /// In the error state: send what must still go (READ responses owed before
    /// a refusal, then the NAK), shut the writing half, drain to EOF.
    pub(super) fn wind_down(&mut self) {
        if !self.shut {
            self.tx.compact();
            while !self.reads.is_empty() && self.emit_resp() {}
            if self.reads.is_empty() {
                if let Some((k, psn, word)) = self.nak_out {
                    if self.put_ctl(k, psn, word) {
                        self.nak_out = None;
                    }
                }
            }
            if self.flush().is_err() {
                self.tx.lo = 0;
                self.tx.hi = 0;
                self.reads.clear();
                self.nak_out = None;
            }
            if self.tx.is_empty() && self.reads.is_empty() && self.nak_out.is_none() {
                if let Some(link) = self.link.as_mut() {
                    link.shutdown_write();
                }
                self.shut = true;
            }
        }
        if let (false, Some(link)) = (self.eof, self.link.as_mut()) {
            for _ in 0..RECV_BATCH {
                match link.recv(&mut self.rx.b) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(_) => {
                        self.eof = true;
                        break;
                    }
                }
            }
            self.rx.lo = 0;
            self.rx.hi = 0;
        }
    }

    /// One send of everything in the tx buffer (the rest waits for the next poll).
    pub(super) fn flush(&mut self) -> io::Result<()> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        if self.tx.is_empty() {
            return Ok(());
        }
        loop {
            match link.send(&self.tx.b[self.tx.lo..self.tx.hi]) {
                Ok(n) => {
                    self.tx.lo += n;
                    if self.tx.is_empty() {
                        self.tx.lo = 0;
                        self.tx.hi = 0;
                    }
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    // ---- receiving

    pub(super) fn read(&mut self) {
        for _ in 0..RECV_BATCH {
            if self.core.state != QpState::Rts {
                return;
            }
            let Some(link) = self.link.as_mut() else {
                return;
            };
            let room = self.rx.room();
            match link.recv(&mut self.rx.b[self.rx.hi..]) {
                Ok(0) => {
                    self.eof = true;
                    if self.core.state == QpState::Rts {
                        self.fail(None);
                    }
                    return;
                }
                Ok(n) => {
                    self.rx.hi += n;
                    self.parse();
                    if n < room {
                        return;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    self.eof = true;
                    if self.core.state == QpState::Rts {
                        self.fail_io(&e);
                    }
                    return;
                }
            }
        }
    }

    /// Executes the frames in the rx buffer; keeps a partial header for later.
    pub(super) fn parse(&mut self) {
        if self.rtu == Rtu::Expected {
            if self.rx.hi - self.rx.lo < cm::MSG_LEN {
                return;
            }
            let m: &[u8; cm::MSG_LEN] = self.rx.b[self.rx.lo..][..cm::MSG_LEN]
                .try_into()
                .expect("length checked");
            if !cm::is_rtu(m) {
                return self.protocol_error("the stream does not start with an RTU");
            }
            self.rx.lo += cm::MSG_LEN;
            self.rtu = Rtu::Seen;
        }
        loop {
            if self.core.state != QpState::Rts {
                self.rx.lo = 0;
                self.rx.hi = 0;
                return;
            }
            if let Some(f) = &mut self.frame {
                let n = (f.left as usize).min(self.rx.hi - self.rx.lo);
                if n > 0 {
                    let data = &self.rx.b[self.rx.lo..self.rx.lo + n];
                    let mrs = &self.mrs;
                    let dest = match f.sink {
                        Sink::Discard => None,
                        Sink::Req => self.in_req.as_mut().map(|r| (&r.dest, &mut r.at, r.psn)),
                        Sink::Resp => self.in_resp.as_mut().map(|r| (&r.dest, &mut r.at, r.psn)),
                    };
                    if let Some((segs, at, psn)) = dest {
                        if !segs.alive(mrs) {
                            // The region went away under the transfer.
                            let sink = f.sink;
                            self.dead_dest(sink, psn);
                            continue;
                        }
                        segs.scatter(*at as usize, data);
                        *at += n as u32;
                    }
                    self.rx.lo += n;
                    f.left -= n as u32;
                }
                if f.left > 0 {
                    break;
                }
                let f = *f;
                self.frame = None;
                self.frame_end(&f);
                continue;
            }
            if self.rx.hi - self.rx.lo < HDR {
                break;
            }
            let h = Hdr::read(&self.rx.b[self.rx.lo..]);
            self.rx.lo += HDR;
            let sink = self.on_header(&h);
            self.frame = Some(RxFrame {
                hdr: h,
                left: h.piece,
                sink,
            });
        }
        self.rx.compact();
    }

    /// A frame header arrived: checked, its ack taken, then the responder
    /// (REQ) or the requester (RESP, NAK) says where its payload goes.
    pub(super) fn on_header(&mut self, h: &Hdr) -> Sink {
        if let Err(why) = h.check() {
            self.protocol_error(why);
            return Sink::Discard;
        }
        self.take_ack(h.ack);
        match h.kind {
            kind::REQ => self.on_req(h),
            kind::RESP => self.on_resp(h),
            kind::NAK | kind::RNR_NAK => {
                self.on_nak(h);
                Sink::Discard
            }
            _ => Sink::Discard,
        }
    }

    /// The end of a frame: the last piece of a message completes it.
    pub(super) fn frame_end(&mut self, f: &RxFrame) {
        if f.hdr.flags & F_LAST == 0 {
            return;
        }
        match f.sink {
            Sink::Req => self.req_done(f.hdr.flags & F_ACKREQ != 0),
            Sink::Resp => self.resp_done(),
            Sink::Discard => {}
        }
    }

    // ---- sending

    /// Appends a header (with the current ack) and room for `piece` bytes;
    /// returns where the payload goes.
    pub(super) fn put(&mut self, mut h: Hdr) -> &mut [u8] {
        h.ack = self.ackable();
        self.ack_sent = self.ack_sent.max(h.ack);
        let at = self.tx.hi;
        let end = at + HDR + h.piece as usize;
        h.write(&mut self.tx.b[at..]);
        self.tx.hi = end;
        &mut self.tx.b[at + HDR..end]
    }

    /// A control frame, if there is room.
    pub(super) fn put_ctl(&mut self, k: u8, psn: u64, word: u32) -> bool {
        if self.tx.room() < HDR {
            return false;
        }
        self.put(Hdr {
            kind: k,
            psn,
            word,
            ..Hdr::default()
        });
        true
    }

    /// Bytes of payload the tx buffer can take in one piece now, or None when
    /// it is too full to bother.
    pub(super) fn piece_room(&self, remaining: u32) -> Option<u32> {
        let room = self.tx.room().saturating_sub(HDR);
        let want = remaining.min(self.piece);
        if (room as u64) < u64::from(want.min(MIN_PIECE)) || self.tx.room() < HDR {
            return None;
        }
        Some(want.min(room.min(u32::MAX as usize) as u32))
    }

    /// Puts outgoing frames in the tx buffer: an RNR NAK first, then READ
    /// responses and requests a piece at a time in turn, then an ACK if one
    /// is owed and nothing carried it.
    pub(super) fn fill(&mut self) {
        if self.tx.room() < self.tx.b.len() / 4 {
            self.tx.compact();
        }
        if let Some((k, psn, word)) = self.nak_out {
            if k == kind::RNR_NAK && self.put_ctl(k, psn, word) {
                self.nak_out = None;
            }
        }
        loop {
            let mut did = false;
            if !self.reads.is_empty() {
                did |= self.emit_resp();
            }
            if self.tx_psn < self.core.next_psn && self.core.state == QpState::Rts {
                did |= self.emit_req();
            }
            if !did {
                break;
            }
        }
        if self.ack_due {
            // A READ response still owed holds the ACK back (it acknowledges
            // only what precedes it); the ACK goes once it is out.
            if self.ackable() > self.ack_sent {
                self.put_ctl(kind::ACK, 0, 0);
            }
            if self.ack_sent >= self.ack_want {
                self.ack_due = false;
            }
        }
    }
}
