//! The RC engine without sockets: an in-memory byte pipe ([`MemStream`])
//! and a QP's engine with its own MR table and memory ([`Side`]), for the
//! unit tests and the fuzz entries.
//!
//! ```text
//!  Side A: Engine<MemStream> ──pipe A→B──> Side B: Engine<MemStream>
//!                            <──pipe B→A──
//!  or  Side A <──pipe──> a test's raw end (bytes in, frames out)
//! ```
#![cfg_attr(not(test), allow(dead_code))]

use super::rc::{Engine, Link};
use super::stream::ByteStream;
use super::TcpConfig;
use crate::soft::engine::QpCore;
use crate::soft::mr::MrTable;
use crate::soft::Heap;
use crate::{Access, Memory, QpCap, RecvWr, SendWr, Sge, Wc};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

/// One direction of a pipe.
#[derive(Debug, Default)]
struct Pipe {
    data: VecDeque<u8>,
    /// The writer shut its half: the reader sees EOF once `data` is empty.
    shut: bool,
    /// The connection was reset: both ends fail.
    reset: bool,
}

/// One end of an in-memory, non-blocking byte stream (at most `cap` bytes
/// in flight each way, so flow control backs up as TCP's does).
#[derive(Debug)]
pub(crate) struct MemStream {
    rx: Arc<Mutex<Pipe>>,
    tx: Arc<Mutex<Pipe>>,
    cap: usize,
}

fn lock(p: &Mutex<Pipe>) -> std::sync::MutexGuard<'_, Pipe> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl MemStream {
    /// Two connected ends.
    pub(crate) fn pair(cap: usize) -> (MemStream, MemStream) {
        let (ab, ba) = (Arc::default(), Arc::default());
        (
            MemStream {
                rx: Arc::clone(&ba),
                tx: Arc::clone(&ab),
                cap,
            },
            MemStream {
                rx: ab,
                tx: ba,
                cap,
            },
        )
    }

    /// Resets the connection (both ends' calls fail with `ECONNRESET`).
    pub(crate) fn reset(&self) {
        lock(&self.rx).reset = true;
        lock(&self.tx).reset = true;
    }

    /// Everything the peer sent so far (a test's raw end).
    pub(crate) fn take_all(&mut self) -> Vec<u8> {
        lock(&self.rx).data.drain(..).collect()
    }

    /// Whether the peer shut its writing half.
    pub(crate) fn peer_shut(&self) -> bool {
        lock(&self.rx).shut
    }
}

impl ByteStream for MemStream {
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut p = lock(&self.tx);
        if p.reset {
            return Err(err(libc::ECONNRESET));
        }
        if p.shut {
            return Err(err(libc::EPIPE));
        }
        let n = buf.len().min(self.cap - p.data.len().min(self.cap));
        if n == 0 && !buf.is_empty() {
            return Err(err(libc::EAGAIN));
        }
        p.data.extend(&buf[..n]);
        Ok(n)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut p = lock(&self.rx);
        if p.reset {
            return Err(err(libc::ECONNRESET));
        }
        if p.data.is_empty() {
            return if p.shut {
                Ok(0)
            } else {
                Err(err(libc::EAGAIN))
            };
        }
        let n = buf.len().min(p.data.len());
        for (d, s) in buf.iter_mut().zip(p.data.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }

    fn shutdown_write(&mut self) {
        lock(&self.tx).shut = true;
    }
}

/// A QP's engine over a pipe, with one registered memory (`mem`, all
/// rights) it posts from and peers reach.
pub(crate) struct Side {
    pub e: Engine<MemStream>,
    pub mrs: Arc<MrTable>,
    pub mem: Arc<dyn Memory>,
    pub index: u32,
    pub lkey: u32,
    pub rkey: u32,
    /// Completions taken so far.
    pub wcs: Vec<Wc>,
}

/// Bytes of each side's registered memory.
pub(crate) const MEM: usize = 64 << 10;

impl Side {
    /// A QP with `cap` and buffers of `cfg`, not yet connected.
    pub(crate) fn new(qp_num: u32, cap: QpCap, cfg: &TcpConfig) -> Side {
        let mrs = Arc::new(MrTable::new(16));
        let mem: Arc<dyn Memory> = Arc::new(Heap::zeroed(MEM));
        let all = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
        let index = mrs
            .register(mem.clone(), 0, MEM, all, (0, 0))
            .expect("a fresh table has room");
        let core = QpCore::new(qp_num, cap).expect("test caps are valid");
        Side {
            e: Engine::new(core, mrs.clone(), cfg),
            lkey: mrs.lkey(index),
            rkey: mrs.rkey(index),
            mrs,
            mem,
            index,
            wcs: Vec::new(),
        }
    }

    /// Attaches one end of a pipe (the peer's send queue `peer_depth` deep).
    pub(crate) fn attach(&mut self, s: MemStream, peer_depth: u32, expect_rtu: bool) {
        self.e.attach(Link::new(s, peer_depth, expect_rtu));
    }

    /// A side whose peer is a test's raw end (`raw`).
    pub(crate) fn raw(cap: QpCap, cfg: &TcpConfig, expect_rtu: bool) -> (Side, MemStream) {
        let mut a = Side::new(1, cap, cfg);
        let (sa, raw) = MemStream::pair(1 << 20);
        a.attach(sa, cap.max_send_wr, expect_rtu);
        (a, raw)
    }

    /// Two sides connected by a pipe of `cap` bytes each way.
    pub(crate) fn pair(cap: QpCap, cfg: &TcpConfig, pipe: usize) -> (Side, Side) {
        let (mut a, mut b) = (Side::new(1, cap, cfg), Side::new(2, cap, cfg));
        let (sa, sb) = MemStream::pair(pipe);
        a.attach(sa, cap.max_send_wr, false);
        b.attach(sb, cap.max_send_wr, false);
        (a, b)
    }

    /// The address of byte `off` of our memory.
    pub(crate) fn addr(&self, off: usize) -> u64 {
        self.mem.as_ptr() as u64 + off as u64
    }

    /// An sg entry over `len` bytes of our memory at `off`.
    pub(crate) fn sge(&self, off: usize, len: u32) -> Sge {
        Sge {
            addr: self.addr(off),
            len,
            lkey: self.lkey,
        }
    }

    pub(crate) fn post(&mut self, wr: &SendWr<'_>) {
        self.e.post_send(wr).expect("post_send");
    }

    pub(crate) fn recv(&mut self, wr_id: u64, off: usize, len: u32) {
        let sge = [self.sge(off, len)];
        self.e
            .post_recv(&RecvWr {
                wr_id,
                sg_list: &sge,
            })
            .expect("post_recv");
    }

    /// One poll: drives the engine, keeps its completions.
    pub(crate) fn poll(&mut self) {
        self.e.drive();
        let mut out = [Wc::default(); 16];
        loop {
            let n = self.e.drain_wcs(true, true, &mut out);
            self.wcs.extend_from_slice(&out[..n]);
            if n < out.len() {
                break;
            }
        }
    }

    /// Takes the completions polled so far.
    pub(crate) fn take(&mut self) -> Vec<Wc> {
        std::mem::take(&mut self.wcs)
    }

    pub(crate) fn read_mem(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(off, &mut v).expect("inside the memory");
        v
    }
}

/// Polls both sides `rounds` times, alternating.
pub(crate) fn run(a: &mut Side, b: &mut Side, rounds: usize) {
    for _ in 0..rounds {
        a.poll();
        b.poll();
    }
}
