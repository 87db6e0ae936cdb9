//! Verbs-shaped plain types shared by every backend: access flags, scatter-gather
//! entries, work requests, work completions, queue-pair capabilities and state.

use std::fmt;

/// Access rights of a memory region (the subset of `ibv_access_flags` RTRS uses).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access(u32);

impl Access {
    /// The local side may write the memory (receives, RDMA READ targets).
    pub const LOCAL_WRITE: Access = Access(1);
    /// A peer may RDMA WRITE into the memory.
    pub const REMOTE_WRITE: Access = Access(1 << 1);
    /// A peer may RDMA READ the memory.
    pub const REMOTE_READ: Access = Access(1 << 2);
    /// The remote key is made per request, by a re-key posted in the same
    /// chain as the request on the QP that carries it ([`SendWr::rekey`]),
    /// and dropped by the peer's SEND_WITH_INV: a client's per-IO read
    /// buffer. On rdma a type-2 memory window (bound to that QP) where the
    /// device has them; the soft fabrics treat it as any other key.
    pub const PER_IO_KEY: Access = Access(1 << 3);
    /// No rights beyond local read.
    pub const NONE: Access = Access(0);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Builds from raw bits, dropping unknown ones.
    pub const fn from_bits_truncate(bits: u32) -> Access {
        Access(bits & 0b1111)
    }
    /// Whether every right in `other` is granted.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.contains(Access::LOCAL_WRITE) {
            parts.push("LOCAL_WRITE");
        }
        if self.contains(Access::REMOTE_WRITE) {
            parts.push("REMOTE_WRITE");
        }
        if self.contains(Access::REMOTE_READ) {
            parts.push("REMOTE_READ");
        }
        if self.contains(Access::PER_IO_KEY) {
            parts.push("PER_IO_KEY");
        }
        write!(f, "Access({})", parts.join("|"))
    }
}

/// One scatter-gather entry: `len` bytes at virtual address `addr` of the
/// memory region whose local key is `lkey` (as `ibv_sge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sge {
    /// Virtual address in the local process.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of the memory region holding the bytes.
    pub lkey: u32,
}

/// What a send work request does (`ibv_wr_opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// Two-sided send into the peer's next posted receive.
    Send,
    /// Send with 32-bit immediate data.
    SendWithImm,
    /// Send that also invalidates `invalidate_rkey` at the peer.
    SendWithInv,
    /// One-sided write to `remote_addr`/`rkey`.
    RdmaWrite,
    /// Write plus immediate data; consumes one receive at the peer.
    RdmaWriteWithImm,
    /// One-sided read from `remote_addr`/`rkey` into the local sg list.
    RdmaRead,
    /// Invalidates the local rkey `invalidate_rkey`.
    LocalInv,
    /// Re-keys a local MR in order with the requests around it (the
    /// kernel's REG_MR with `ib_inc_rkey`); made by [`SendWr::rekey`].
    Rekey,
}

impl Opcode {
    /// What a completion of this request reports.
    pub fn wc_opcode(self) -> WcOpcode {
        match self {
            Opcode::Send | Opcode::SendWithImm | Opcode::SendWithInv => WcOpcode::Send,
            Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => WcOpcode::RdmaWrite,
            Opcode::RdmaRead => WcOpcode::RdmaRead,
            Opcode::LocalInv => WcOpcode::LocalInv,
            Opcode::Rekey => WcOpcode::Rekey,
        }
    }
}

/// A re-key to post as a work request, from
/// [`Mr::rekey_wr`](super::Mr::rekey_wr): `rkey` is the MR's key once the
/// request has executed. It borrows the MR, so it cannot outlive it.
#[derive(Clone, Copy, Debug)]
pub struct RekeyWr<'a> {
    /// The new key.
    pub rkey: u32,
    /// The backend's handle of the MR's keys; 0: done already, by
    /// `rekey_wr` itself (the request is then a no-op).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) handle: usize,
    _mr: std::marker::PhantomData<&'a ()>,
}

impl<'a> RekeyWr<'a> {
    /// A re-key that `rekey_wr` did at once.
    pub fn done(rkey: u32) -> RekeyWr<'a> {
        RekeyWr {
            rkey,
            handle: 0,
            _mr: std::marker::PhantomData,
        }
    }
    /// A re-key the backend does when the request executes.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn pending(rkey: u32, handle: usize) -> RekeyWr<'a> {
        RekeyWr {
            rkey,
            handle,
            _mr: std::marker::PhantomData,
        }
    }
}

/// A send work request (`ibv_send_wr`), borrowed for the duration of the post.
#[derive(Clone, Copy, Debug)]
pub struct SendWr<'a> {
    /// Caller's tag, returned in the completion.
    pub wr_id: u64,
    /// What to do.
    pub opcode: Opcode,
    /// Local data (ignored by `LocalInv`).
    pub sg_list: &'a [Sge],
    /// Generate a completion on success (errors always complete).
    pub signaled: bool,
    /// Copy the payload at post time; the sg list may be reused at once.
    pub inline: bool,
    /// Immediate data, host byte order (the backend puts it on the wire big-endian).
    pub imm: u32,
    /// Key invalidated by `SendWithInv` (at the peer) or `LocalInv` (locally).
    pub invalidate_rkey: u32,
    /// Remote virtual address for RDMA operations.
    pub remote_addr: u64,
    /// Remote key for RDMA operations.
    pub rkey: u32,
    /// What a `Rekey` request re-keys.
    pub rekey: Option<RekeyWr<'a>>,
}

impl<'a> SendWr<'a> {
    fn base(wr_id: u64, opcode: Opcode, sg_list: &'a [Sge]) -> Self {
        SendWr {
            wr_id,
            opcode,
            sg_list,
            signaled: true,
            inline: false,
            imm: 0,
            invalidate_rkey: 0,
            remote_addr: 0,
            rkey: 0,
            rekey: None,
        }
    }
    /// A plain SEND.
    pub fn send(wr_id: u64, sg_list: &'a [Sge]) -> Self {
        Self::base(wr_id, Opcode::Send, sg_list)
    }
    /// SEND_WITH_IMM.
    pub fn send_with_imm(wr_id: u64, sg_list: &'a [Sge], imm: u32) -> Self {
        SendWr {
            imm,
            ..Self::base(wr_id, Opcode::SendWithImm, sg_list)
        }
    }
    /// SEND_WITH_INV of the peer's `rkey`.
    pub fn send_with_inv(wr_id: u64, sg_list: &'a [Sge], rkey: u32) -> Self {
        SendWr {
            invalidate_rkey: rkey,
            ..Self::base(wr_id, Opcode::SendWithInv, sg_list)
        }
    }
    /// RDMA_WRITE to `remote_addr`/`rkey`.
    pub fn write(wr_id: u64, sg_list: &'a [Sge], remote_addr: u64, rkey: u32) -> Self {
        SendWr {
            remote_addr,
            rkey,
            ..Self::base(wr_id, Opcode::RdmaWrite, sg_list)
        }
    }
    /// RDMA_WRITE_WITH_IMM to `remote_addr`/`rkey`.
    pub fn write_with_imm(
        wr_id: u64,
        sg_list: &'a [Sge],
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    ) -> Self {
        SendWr {
            remote_addr,
            rkey,
            imm,
            ..Self::base(wr_id, Opcode::RdmaWriteWithImm, sg_list)
        }
    }
    /// RDMA_READ from `remote_addr`/`rkey` into `sg_list`.
    pub fn read(wr_id: u64, sg_list: &'a [Sge], remote_addr: u64, rkey: u32) -> Self {
        SendWr {
            remote_addr,
            rkey,
            ..Self::base(wr_id, Opcode::RdmaRead, sg_list)
        }
    }
    /// LOCAL_INV of the local `rkey`.
    pub fn local_inv(wr_id: u64, rkey: u32) -> Self {
        SendWr {
            invalidate_rkey: rkey,
            ..Self::base(wr_id, Opcode::LocalInv, &[])
        }
    }
    /// A re-key of a local MR, executed in order with the other requests of
    /// the QP (a response that hands the new key out goes after it).
    pub fn rekey(wr_id: u64, r: RekeyWr<'a>) -> Self {
        SendWr {
            rekey: Some(r),
            ..Self::base(wr_id, Opcode::Rekey, &[])
        }
    }
    /// Builder: post unsignaled (no completion on success).
    pub fn unsignaled(mut self) -> Self {
        self.signaled = false;
        self
    }
    /// Builder: copy the payload at post time.
    pub fn inlined(mut self) -> Self {
        self.inline = true;
        self
    }
    /// Total payload length of the sg list (saturating).
    pub fn payload_len(&self) -> u64 {
        self.sg_list.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// A receive work request (`ibv_recv_wr`).
#[derive(Clone, Copy, Debug)]
pub struct RecvWr<'a> {
    /// Caller's tag, returned in the completion.
    pub wr_id: u64,
    /// Where incoming SEND payload lands (may be empty: a buffer-less receive).
    pub sg_list: &'a [Sge],
}

/// Completion status (`ibv_wc_status`, the ones a transport meets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// The work request completed.
    Success,
    /// Local length error: a receive too small for the incoming SEND, or an sg list too long.
    LocLenErr,
    /// Local QP operation error (e.g. posting on a QP in the error state).
    LocQpOpErr,
    /// Local protection error: a bad lkey or an sge outside its region.
    LocProtErr,
    /// Flushed: the QP went to the error state before this request was done.
    WrFlushErr,
    /// The peer refused the access: wrong, invalidated or out-of-bounds rkey, or missing rights.
    RemAccessErr,
    /// The peer could not execute the request (e.g. SEND_WITH_INV of a key it does not own).
    RemInvReqErr,
    /// Remote operation error at the responder.
    RemOpErr,
    /// The peer had no receive posted for longer than the RNR retry budget.
    RnrRetryExcErr,
    /// The peer stopped answering (transport retries exhausted).
    RetryExcErr,
    /// Anything else.
    GeneralErr,
}

impl WcStatus {
    /// Whether this is `Success`.
    pub fn is_ok(self) -> bool {
        self == WcStatus::Success
    }
    /// Numeric value as libibverbs defines it, for logs and the rdma backend.
    pub fn ibv_code(self) -> u32 {
        match self {
            WcStatus::Success => 0,
            WcStatus::LocLenErr => 1,
            WcStatus::LocQpOpErr => 2,
            WcStatus::LocProtErr => 4,
            WcStatus::WrFlushErr => 5,
            WcStatus::RemInvReqErr => 9,
            WcStatus::RemAccessErr => 10,
            WcStatus::RemOpErr => 11,
            WcStatus::RetryExcErr => 12,
            WcStatus::RnrRetryExcErr => 13,
            WcStatus::GeneralErr => 21,
        }
    }
    /// The status of a libibverbs value ([`WcStatus::ibv_code`]); values this
    /// type does not name are `GeneralErr`.
    pub fn from_ibv_code(code: u32) -> WcStatus {
        [
            WcStatus::Success,
            WcStatus::LocLenErr,
            WcStatus::LocQpOpErr,
            WcStatus::LocProtErr,
            WcStatus::WrFlushErr,
            WcStatus::RemAccessErr,
            WcStatus::RemInvReqErr,
            WcStatus::RemOpErr,
            WcStatus::RnrRetryExcErr,
            WcStatus::RetryExcErr,
        ]
        .into_iter()
        .find(|s| s.ibv_code() == code)
        .unwrap_or(WcStatus::GeneralErr)
    }
}

/// What completed (`ibv_wc_opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    /// A SEND, SEND_WITH_IMM or SEND_WITH_INV of ours.
    Send,
    /// An RDMA WRITE (with or without immediate) of ours.
    RdmaWrite,
    /// An RDMA READ of ours.
    RdmaRead,
    /// A LOCAL_INV of ours.
    LocalInv,
    /// A re-key of ours.
    Rekey,
    /// A receive consumed by a peer's SEND (see the flags for imm / inv).
    Recv,
    /// A receive consumed by a peer's RDMA_WRITE_WITH_IMM.
    RecvRdmaWithImm,
}

/// A work completion (`ibv_wc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wc {
    /// The request's tag.
    pub wr_id: u64,
    /// Outcome.
    pub status: WcStatus,
    /// What completed. For flushed requests, the opcode of the request.
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred (RDMA READ).
    pub byte_len: u32,
    /// Immediate data in host byte order, when `with_imm`.
    pub imm: u32,
    /// Whether `imm` is valid.
    pub with_imm: bool,
    /// The rkey the peer invalidated with SEND_WITH_INV, when `with_inv`.
    pub invalidated_rkey: u32,
    /// Whether `invalidated_rkey` is valid.
    pub with_inv: bool,
    /// The QP this completion belongs to.
    pub qp_num: u32,
}

impl Wc {
    /// A completion with no payload details.
    pub fn new(wr_id: u64, status: WcStatus, opcode: WcOpcode, qp_num: u32) -> Wc {
        Wc {
            wr_id,
            status,
            opcode,
            byte_len: 0,
            imm: 0,
            with_imm: false,
            invalidated_rkey: 0,
            with_inv: false,
            qp_num,
        }
    }
}

impl Default for Wc {
    fn default() -> Wc {
        Wc::new(0, WcStatus::Success, WcOpcode::Send, 0)
    }
}

/// Sizes of a queue pair, fixed at creation (`ibv_qp_cap` plus the RNR policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCap {
    /// Outstanding send work requests (signaled or not) the QP can hold.
    pub max_send_wr: u32,
    /// Posted receives the QP can hold.
    pub max_recv_wr: u32,
    /// Entries per send sg list.
    pub max_send_sge: u32,
    /// Entries per receive sg list.
    pub max_recv_sge: u32,
    /// Largest payload that may be posted `inline`.
    pub max_inline_data: u32,
    /// RNR retries as in `rdma_conn_param.rnr_retry_count`: 7 means retry forever
    /// (what the kernel's RTRS uses); 0..=6 fail with `RnrRetryExcErr` once the
    /// peer has had no receive posted for `rnr_retry` RNR timeouts.
    pub rnr_retry: u8,
}

impl Default for QpCap {
    fn default() -> QpCap {
        QpCap {
            max_send_wr: 256,
            max_recv_wr: 256,
            max_send_sge: 2,
            max_recv_sge: 1,
            max_inline_data: 64,
            rnr_retry: 7,
        }
    }
}

/// Queue-pair state (`ibv_qp_state`, reduced to what a user can observe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QpState {
    /// Created, not yet connected: receives may be posted, sends may not.
    Init,
    /// Connected: ready to send and receive.
    Rts,
    /// Failed or disconnected: every outstanding request completes with `WrFlushErr`.
    Error,
}
