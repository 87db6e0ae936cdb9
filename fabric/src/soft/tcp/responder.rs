//! The responder half of a tcp QP: the peer's requests execute strictly in
//! psn order against our MR table, as a NIC's responder would.
//!
//! ```text
//!  REQ first piece ─> on_req: psn in order? receive posted (else RNR NAK,
//!                     drop until that psn starts again)? rkey, rights,
//!                     bounds (else NAK, QP error) ─> dest (Segs)
//!  every piece ─────> lands straight from the rx buffer in the MR / receive
//!  last piece ──────> req_done: the receive completes, in_psn + 1, ACK if asked
//!  READ ────────────> checked and queued (ReadOut) ─> emit_resp: RESP pieces
//!                     copied from the MR as they are sent
//! ```

use super::rc::{reg_key, Engine, Segs};
use super::stream::{ByteStream, Sink};
use super::wire::{kind, op, Hdr, F_FIRST, F_LAST};
use crate::{Access, Wc, WcOpcode, WcStatus};

/// An inbound request being received (its payload may span pieces and recvs).
#[derive(Clone, Copy, Debug)]
pub(super) struct InReq {
    pub(super) psn: u64,
    pub(super) op: u8,
    pub(super) total: u32,
    /// Payload bytes landed so far.
    pub(super) at: u32,
    pub(super) dest: Segs,
    pub(super) word: u32,
}

/// A READ response we owe the peer: `len` bytes of our memory at `src`.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReadOut {
    pub(super) psn: u64,
    pub(super) src: usize,
    /// The source's registration (see `reg_key`).
    pub(super) reg: u32,
    pub(super) len: u32,
    pub(super) sent: u32,
}
impl<S: ByteStream> Engine<S> {
    /// The memory an inbound payload was landing in was deregistered.
    pub(super) fn dead_dest(&mut self, sink: Sink, psn: u64) {
        if sink == Sink::Resp {
            return self.fail(Some((psn, WcStatus::LocProtErr)));
        }
        let local = self
            .in_req
            .is_some_and(|r| matches!(r.op, op::SEND | op::SEND_IMM | op::SEND_INV))
            .then_some(WcStatus::LocProtErr);
        let status = if local.is_some() {
            WcStatus::RemOpErr
        } else {
            WcStatus::RemAccessErr
        };
        self.refuse(psn, status, local);
    }

    /// Refuses request `psn`: the peer hears `status`, the receive we had
    /// matched (if any) completes with `local`, and this QP goes to error.
    pub(super) fn refuse(&mut self, psn: u64, status: WcStatus, local: Option<WcStatus>) -> Sink {
        if let Some(local) = local {
            if let Some(r) = self.core.rq.pop_front() {
                self.core.recv_wcs.push_back(Wc::new(
                    r.wr_id,
                    local,
                    WcOpcode::Recv,
                    self.core.qp_num,
                ));
            }
        }
        self.nak_out = Some((kind::NAK, psn, status.ibv_code()));
        self.fail(None);
        Sink::Discard
    }

    pub(super) fn on_req(&mut self, h: &Hdr) -> Sink {
        if h.flags & F_FIRST == 0 {
            return match &self.in_req {
                Some(r) if r.psn == h.psn && r.at == h.off && r.total == h.total => Sink::Req,
                None if self.dropping => Sink::Discard,
                _ => {
                    self.protocol_error("request piece out of sequence");
                    Sink::Discard
                }
            };
        }
        if h.psn != self.in_psn || h.off != 0 || self.in_req.is_some() {
            if self.dropping && self.in_req.is_none() && h.psn > self.in_psn {
                return Sink::Discard;
            }
            self.protocol_error("request out of sequence");
            return Sink::Discard;
        }
        let needs_recv = matches!(h.op, op::SEND | op::SEND_IMM | op::SEND_INV | op::WRITE_IMM);
        if needs_recv && self.core.rq.is_empty() {
            // Receiver not ready: drop it and all behind it until it comes again.
            self.nak_out = Some((kind::RNR_NAK, h.psn, 0));
            self.dropping = true;
            return Sink::Discard;
        }
        self.dropping = false;
        let total = u64::from(h.total);
        let dest = match h.op {
            op::WRITE | op::WRITE_IMM => {
                if total == 0 {
                    Segs::EMPTY
                } else {
                    match self
                        .mrs
                        .check_rkey(h.rkey, h.raddr, total, Access::REMOTE_WRITE)
                    {
                        Ok(c) => {
                            let mut d = Segs::EMPTY;
                            d.push(c.ptr as usize, total as usize, reg_key(&self.mrs, h.rkey));
                            d
                        }
                        Err(_) => return self.refuse(h.psn, WcStatus::RemAccessErr, None),
                    }
                }
            }
            op::READ => {
                let (src, reg) = if total == 0 {
                    (0, 0)
                } else {
                    match self
                        .mrs
                        .check_rkey(h.rkey, h.raddr, total, Access::REMOTE_READ)
                    {
                        Ok(c) => (c.ptr as usize, reg_key(&self.mrs, h.rkey)),
                        Err(_) => return self.refuse(h.psn, WcStatus::RemAccessErr, None),
                    }
                };
                if self.reads.len() >= self.peer_depth {
                    self.protocol_error("more READs outstanding than the peer's queue holds");
                    return Sink::Discard;
                }
                self.reads.push_back(ReadOut {
                    psn: h.psn,
                    src,
                    reg,
                    len: h.total,
                    sent: 0,
                });
                self.in_psn += 1;
                return Sink::Discard;
            }
            _ => {
                let r = *self.core.rq.front().expect("checked non-empty");
                if r.capacity() < total {
                    return self.refuse(h.psn, WcStatus::RemInvReqErr, Some(WcStatus::LocLenErr));
                }
                let mut dest = Segs::EMPTY;
                let mut left = total;
                for s in r.sges() {
                    if left == 0 {
                        break;
                    }
                    let take = u64::from(s.len).min(left);
                    match self
                        .mrs
                        .check_lkey(s.lkey, s.addr, take, Access::LOCAL_WRITE)
                    {
                        Ok(c) => dest.push(c.ptr as usize, take as usize, s.lkey),
                        Err(_) => {
                            return self.refuse(
                                h.psn,
                                WcStatus::RemOpErr,
                                Some(WcStatus::LocProtErr),
                            )
                        }
                    }
                    left -= take;
                }
                if h.op == op::SEND_INV && !self.mrs.invalidate(h.word) {
                    return self.refuse(
                        h.psn,
                        WcStatus::RemInvReqErr,
                        Some(WcStatus::RemInvReqErr),
                    );
                }
                dest
            }
        };
        self.in_req = Some(InReq {
            psn: h.psn,
            op: h.op,
            total: h.total,
            at: 0,
            dest,
            word: h.word,
        });
        Sink::Req
    }

    /// What we can acknowledge: requests executed, except that a READ counts
    /// only once its response is out.
    pub(super) fn ackable(&self) -> u64 {
        self.reads.front().map_or(self.in_psn, |r| r.psn)
    }

    /// Appends a header (with the current ack) and room for `piece` bytes;
    /// One piece of the oldest READ response we owe.
    pub(super) fn emit_resp(&mut self) -> bool {
        let Some(r) = self.reads.front().copied() else {
            return false;
        };
        let Some(n) = self.piece_room(r.len - r.sent) else {
            return false;
        };
        if n > 0 && reg_key(&self.mrs, r.reg) != r.reg {
            // The region went away before we could read it: the stream
            // cannot carry the response, so the connection ends.
            self.reads.clear();
            self.nak_out = None;
            self.fail(None);
            return false;
        }
        let last = r.sent + n == r.len;
        let flags = if r.sent == 0 { F_FIRST } else { 0 } | if last { F_LAST } else { 0 };
        let hdr = Hdr {
            kind: kind::RESP,
            flags,
            piece: n,
            psn: r.psn,
            total: r.len,
            off: r.sent,
            ..Hdr::default()
        };
        let dst = self.put(hdr);
        if n > 0 {
            // SAFETY: src..src+len was checked against a live registration of
            // ours with REMOTE_READ when the READ was executed; sent + n <= len.
            let src = unsafe {
                std::slice::from_raw_parts((r.src + r.sent as usize) as *const u8, n as usize)
            };
            dst.copy_from_slice(src);
        }
        if last {
            self.reads.pop_front();
        } else if let Some(f) = self.reads.front_mut() {
            f.sent += n;
        }
        true
    }

    /// The last piece of a request landed: it completes (its receive, if it
    /// took one) and the next psn may start; `ackreq`: the peer wants an ACK.
    pub(super) fn req_done(&mut self, ackreq: bool) {
        let Some(r) = self.in_req.take() else {
            return;
        };
        if r.at != r.total {
            return self.protocol_error("request shorter than announced");
        }
        if r.op != op::WRITE {
            // SEND or WRITE_WITH_IMM: the receive was matched at the first piece.
            let Some(rq) = self.core.rq.pop_front() else {
                return self.protocol_error("the receive went away under a request");
            };
            let opcode = if r.op == op::WRITE_IMM {
                WcOpcode::RecvRdmaWithImm
            } else {
                WcOpcode::Recv
            };
            let mut wc = Wc::new(rq.wr_id, WcStatus::Success, opcode, self.core.qp_num);
            wc.byte_len = r.total;
            if matches!(r.op, op::WRITE_IMM | op::SEND_IMM) {
                wc.imm = r.word;
                wc.with_imm = true;
            }
            if r.op == op::SEND_INV {
                wc.invalidated_rkey = r.word;
                wc.with_inv = true;
            }
            self.core.recv_wcs.push_back(wc);
        }
        self.in_psn += 1;
        if ackreq {
            self.ack_due = true;
            self.ack_want = self.in_psn;
        }
    }
}
