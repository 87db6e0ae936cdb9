//! The requester half of a tcp QP: what we post goes out as requests in
//! psn order (in pieces, from the WQE ring that keeps sg lists and inline
//! bytes until acknowledged), acknowledgements retire it, READ responses
//! land in the READ's local sg list, a NAK fails it, an RNR NAK makes it go
//! back and retry after `RNR_TIMER`.
//!
//! ```text
//!  post_send ─> wqes[psn & mask] ─> emit_req (piece by piece, ACKREQ when signaled)
//!  ack on any frame ─> take_ack ─> QpCore::retire (completions in order)
//!  RESP ─> on_resp ─> scatter into the READ's sg list ─> resp_done ─> ack psn + 1
//!  NAK ─> fail (that request's status, the rest flushed)
//!  RNR NAK ─> tx_psn = psn, wait RNR_TIMER, retransmit (rnr_retry times, 7 = forever)
//! ```

use super::rc::{Engine, Segs, MAX_SEGS};
use super::stream::{ByteStream, Sink};
use super::wire::{kind, op, Hdr, F_ACKREQ, F_FIRST, F_LAST};
use crate::soft::engine::{Post, ToWire};
use crate::{Access, RecvWr, Result, SendWr, WcStatus};
use std::time::Duration;

/// One RNR retry's wait (what rdma_cm's default min_rnr_timer gives: 0.64 ms).
pub(super) const RNR_TIMER: Duration = Duration::from_micros(640);

/// A send work request kept (psn-indexed) until acknowledged: the core
/// transmits it in pieces, and again after an RNR NAK.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Wqe {
    pub(super) op: u8,
    pub(super) signaled: bool,
    pub(super) inline: bool,
    pub(super) nsge: u8,
    pub(super) len: u32,
    /// Immediate data or the rkey to invalidate.
    pub(super) word: u32,
    pub(super) raddr: u64,
    pub(super) rkey: u32,
}

/// The response to one of our READs being received.
#[derive(Clone, Copy, Debug)]
pub(super) struct InResp {
    pub(super) psn: u64,
    pub(super) total: u32,
    pub(super) at: u32,
    pub(super) dest: Segs,
}
impl<S: ByteStream> Engine<S> {
    pub(crate) fn post_recv(&mut self, wr: &RecvWr<'_>) -> Result<()> {
        self.core.post_recv(wr)
    }

    /// Posts a send work request: checked, kept in the WQE ring until
    /// acknowledged; it goes on the wire on the next poll.
    pub(crate) fn post_send(&mut self, wr: &SendWr<'_>) -> Result<()> {
        let opcode = wr.opcode.wc_opcode();
        let ToWire {
            op: wop,
            len,
            inline,
            need,
        } = match self.core.admit_send(wr, &self.mrs, self.inline_cap)? {
            Post::Wire(w) => w,
            Post::Done => return Ok(()),
            Post::Failed => {
                self.fail(None);
                return Ok(());
            }
        };
        for s in wr.sg_list {
            if self
                .mrs
                .check_lkey(s.lkey, s.addr, u64::from(s.len), need)
                .is_err()
            {
                self.fail(None);
                self.core.fail_now(wr.wr_id, opcode, WcStatus::LocProtErr);
                return Ok(());
            }
        }
        let psn = self.core.next_psn;
        let slot = (psn & self.mask) as usize;
        if inline {
            let dst = &mut self.inline[slot * self.inline_cap..][..len as usize];
            let mut off = 0;
            for s in wr.sg_list.iter().filter(|s| s.len > 0) {
                let n = s.len as usize;
                // SAFETY: the lkey check above proved s.addr..+len lies in a
                // live registration of ours.
                let src = unsafe { std::slice::from_raw_parts(s.addr as usize as *const u8, n) };
                dst[off..off + n].copy_from_slice(src);
                off += n;
            }
        } else {
            self.sges[slot * self.max_sge..][..wr.sg_list.len()].copy_from_slice(wr.sg_list);
        }
        let word = match wop {
            op::SEND_IMM | op::WRITE_IMM => wr.imm,
            op::SEND_INV => wr.invalidate_rkey,
            _ => 0,
        };
        self.wqes[slot] = Wqe {
            op: wop,
            signaled: wr.signaled,
            inline,
            nsge: wr.sg_list.len() as u8,
            len,
            word,
            raddr: wr.remote_addr,
            rkey: wr.rkey,
        };
        self.core.push_sq(wr.wr_id, opcode, wr.signaled, len, true);
        Ok(())
    }

    /// The peer has executed every request below `ack`: retire them.
    pub(super) fn take_ack(&mut self, ack: u64) {
        let ack = ack.min(self.core.next_psn);
        if ack > self.acked {
            self.acked = ack;
            self.core.retire(ack);
        }
    }

    /// A piece of the response to one of our READs.
    pub(super) fn on_resp(&mut self, h: &Hdr) -> Sink {
        if h.flags & F_FIRST == 0 {
            return match &self.in_resp {
                Some(r) if r.psn == h.psn && r.at == h.off && r.total == h.total => Sink::Resp,
                _ => {
                    self.protocol_error("READ response piece out of sequence");
                    Sink::Discard
                }
            };
        }
        let slot = (h.psn & self.mask) as usize;
        let w = self.wqes[slot];
        if self.in_resp.is_some()
            || h.psn < self.acked
            || h.psn >= self.tx_psn.max(self.acked)
            || w.op != op::READ
            || w.len != h.total
            || h.off != 0
        {
            self.protocol_error("READ response for no outstanding READ");
            return Sink::Discard;
        }
        let mut dest = Segs::EMPTY;
        for s in &self.sges[slot * self.max_sge..][..usize::from(w.nsge)] {
            match self
                .mrs
                .check_lkey(s.lkey, s.addr, u64::from(s.len), Access::LOCAL_WRITE)
            {
                Ok(c) => dest.push(c.ptr as usize, s.len as usize, s.lkey),
                Err(_) => {
                    self.fail(Some((h.psn, WcStatus::LocProtErr)));
                    return Sink::Discard;
                }
            }
        }
        self.in_resp = Some(InResp {
            psn: h.psn,
            total: h.total,
            at: 0,
            dest,
        });
        Sink::Resp
    }

    /// A refusal (NAK: fatal) or receiver-not-ready (RNR NAK: go back).
    pub(super) fn on_nak(&mut self, h: &Hdr) {
        if h.psn < self.acked || h.psn >= self.core.next_psn {
            return self.protocol_error("NAK for no outstanding request");
        }
        if h.kind == kind::NAK {
            return self.fail(Some((h.psn, WcStatus::from_ibv_code(h.word))));
        }
        let n = if self.rnr.0 == h.psn {
            self.rnr.1 + 1
        } else {
            1
        };
        self.rnr = (h.psn, n);
        let retry = self.core.cap.rnr_retry;
        if retry < 7 && n > u32::from(retry) {
            return self.fail(Some((h.psn, WcStatus::RnrRetryExcErr)));
        }
        // Go back: resend it and everything after it once the timer expires.
        self.tx_psn = h.psn;
        self.tx_off = 0;
        self.rnr_until = Some(minstant::Instant::now() + RNR_TIMER);
    }

    /// One piece of the next request.
    pub(super) fn emit_req(&mut self) -> bool {
        if let Some(t) = self.rnr_until {
            if minstant::Instant::now() < t {
                return false;
            }
            self.rnr_until = None;
        }
        let psn = self.tx_psn;
        let slot = (psn & self.mask) as usize;
        let w = self.wqes[slot];
        let payload = if w.op == op::READ { 0 } else { w.len };
        let Some(n) = self.piece_room(payload - self.tx_off) else {
            return false;
        };
        let off = self.tx_off;
        // Where the payload comes from, checked again now that we read it.
        let mut src = [(0usize, 0usize); MAX_SEGS + 1];
        let mut nsrc = 0;
        if n > 0 && w.inline {
            src[0] = (
                self.inline[slot * self.inline_cap + off as usize..].as_ptr() as usize,
                n as usize,
            );
            nsrc = 1;
        } else if n > 0 {
            let (mut skip, mut left) = (off as u64, u64::from(n));
            for s in &self.sges[slot * self.max_sge..][..usize::from(w.nsge)] {
                if left == 0 {
                    break;
                }
                let sl = u64::from(s.len);
                if skip >= sl {
                    skip -= sl;
                    continue;
                }
                let take = (sl - skip).min(left);
                match self
                    .mrs
                    .check_lkey(s.lkey, s.addr + skip, take, Access::NONE)
                {
                    Ok(c) => {
                        src[nsrc] = (c.ptr as usize, take as usize);
                        nsrc += 1;
                    }
                    Err(_) => {
                        self.fail(Some((psn, WcStatus::LocProtErr)));
                        return false;
                    }
                }
                skip = 0;
                left -= take;
            }
        }
        let last = off + n == payload;
        let mut flags = if off == 0 { F_FIRST } else { 0 };
        if last {
            flags |= F_LAST;
            if w.signaled || psn & self.ack_mask == self.ack_mask {
                flags |= F_ACKREQ;
            }
        }
        let hdr = Hdr {
            kind: kind::REQ,
            op: w.op,
            flags,
            piece: n,
            psn,
            total: w.len,
            off,
            raddr: w.raddr,
            rkey: w.rkey,
            word: w.word,
            ..Hdr::default()
        };
        let dst = self.put(hdr);
        let mut at = 0;
        for &(p, len) in &src[..nsrc] {
            // SAFETY: inline bytes live in our own buffer; other segments were
            // just checked against live registrations of ours.
            let s = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
            dst[at..at + len].copy_from_slice(s);
            at += len;
        }
        if last {
            self.tx_psn += 1;
            self.tx_off = 0;
        } else {
            self.tx_off += n;
        }
        true
    }

    /// The last piece of a READ response landed: the READ completes.
    pub(super) fn resp_done(&mut self) {
        let Some(r) = self.in_resp.take() else {
            return;
        };
        if r.at != r.total {
            return self.protocol_error("READ response shorter than announced");
        }
        // The response acknowledges the READ and everything before it.
        self.take_ack(r.psn + 1);
    }
}
