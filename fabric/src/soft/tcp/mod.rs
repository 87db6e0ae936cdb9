//! The tcp fabric: hosts over TCP, one connection per queue pair.
//!
//! ```text
//!  QP A  post_send ─> WQE ring (psn-indexed, kept until acked)
//!        CQ poll ───> tx buffer: request pieces | READ response pieces | ACK/NAK
//!                     one send() ────── TCP ──────> rx buffer of B (one recv())
//!                                                   B's core executes in psn order
//!                                                   against B's MR table: WRITE
//!                                                   lands from the rx buffer in the
//!                                                   MR, SEND in the posted receive,
//!                                                   READ queues a response
//!  QP A  <── ack (on every frame) / READ response / NAK / RNR NAK ───────── B
//! ```
//! The core busy-polls its non-blocking sockets when it polls a CQ: per QP at
//! most two `send`s (what was posted, then what executing the peer's requests
//! produced; each everything gathered so far in a preallocated tx buffer) and
//! one `recv` into a preallocated rx buffer (up to four when they fill it). Payloads stream in
//! pieces, so buffers are fixed at QP creation whatever the message size. The
//! connection manager ([`TcpCm`]) makes the connection on the slow-path thread
//! and hands the socket to the QP once the handshake is done.
//!
//! What a NIC enforces is enforced by the responder: rkeys (a refusal NAKs the
//! request, both QPs go to error), receive-not-ready (RNR NAK; the initiator
//! retries the request and everything after it every 0.64 ms, `rnr_retry`
//! times), and a peer that goes away (EOF, reset, or TCP's user timeout)
//! flushes everything outstanding.

//!
//! The house:
//!
//! ```text
//!  verbs.rs      TcpFabric, TcpPd, TcpMr, TcpCq, TcpQp, QpShared (core <-> CM)
//!  rc.rs         Engine: one RC connection's state, no socket of its own
//!  requester.rs  posting, requests out, acks in, READ responses in, NAK, RNR retry
//!  responder.rs  the peer's requests against our MRs, READ responses out, NAKs
//!  stream.rs     ByteStream (socket or test pipe), tx/rx buffers, pump, framing
//!  wire.rs       the 48-byte frame header    cm.rs  the connection manager
//! ```

mod auth;
mod cm;
mod rc;
mod requester;
mod responder;
mod sock;
mod stream;
mod testkit;
#[cfg(test)]
mod tests;
mod verbs;
mod watch;
mod wire;

#[doc(hidden)]
pub mod fuzz;

pub use auth::{AuthKey, MIN_KEY_LEN};
pub use cm::TcpCm;
pub(crate) use rc::Link;
pub(crate) use verbs::QpShared;
pub use verbs::{TcpCq, TcpFabric, TcpMr, TcpPd, TcpQp};

use std::sync::Arc;

/// Smallest piece worth a header when the tx buffer is nearly full.
const MIN_PIECE: u32 = 512;

/// Sizes a fabric allocates up front, and its access rules.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Memory regions per PD.
    pub max_mrs: u32,
    /// Bytes of each QP's tx buffer (what one poll can hand to one `send`).
    pub tx_buf: usize,
    /// Bytes of each QP's rx buffer (what one `recv` can take in).
    pub rx_buf: usize,
    /// Largest payload piece per frame; longer messages stream in pieces.
    pub piece: u32,
    /// A pre-shared key: listeners admit only peers that prove they hold
    /// it, connects only listeners that prove it (mutual HMAC-SHA256
    /// challenge-response before any RTRS byte).
    pub auth: Option<Arc<AuthKey>>,
    /// Connections one host may have between accept and its connect
    /// request (authentication included); more are closed at once.
    pub max_pending_per_host: usize,
}

impl TcpConfig {
    /// This config with the pre-shared key read from `path` (see
    /// [`AuthKey::from_file`]).
    pub fn with_auth_key_file(self, path: &std::path::Path) -> std::result::Result<Self, String> {
        Ok(TcpConfig {
            auth: Some(Arc::new(AuthKey::from_file(path)?)),
            ..self
        })
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_mrs: 1 << 16,
            tx_buf: 256 << 10,
            rx_buf: 256 << 10,
            piece: 64 << 10,
            auth: None,
            max_pending_per_host: 64,
        }
    }
}
