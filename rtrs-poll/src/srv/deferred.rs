//! Requests as the handler holds them: [`SrvIo`] for the call, and a
//! [`Deferred`] for an answer given later, from any thread.
//!
//! ```text
//!  core: on_io(SrvIo) ── io.defer() ──> Deferred (owns the chunk's claim; Send)
//!  any thread:                          d.data_mut() ... d.complete(errno)
//!                                          │ (claim, errno)
//!  core: the connection's answers ring <───┘ ──> the response chain, as for Done
//!  the connection gone first: complete() releases the chunk itself (no path to answer on)
//! ```
//!
//! The chunk is the token's until it completes: the core never touches it
//! meanwhile, and nobody else can (the claim is exclusive), so no handler
//! needs a raw pointer to answer later.

use super::{IoDir, IoId};
use mempool::{Claim, Claims};
use std::ops::Range;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A deferred request's answer on its way back to its connection.
pub(crate) struct Answer {
    pub(crate) claim: Claim,
    pub(crate) errno: i32,
}

/// What a connection's [`Deferred`]s share with it.
pub(crate) struct Returns {
    tx: pollers::mpsc::Sender<Answer>,
    chunks: Arc<Claims>,
    /// Set when the connection is gone: answers then release their chunks.
    closed: AtomicBool,
    /// The ring's receiver once the connection is gone (teardown and late
    /// answers only: never on the IO path).
    orphan: Mutex<Option<pollers::mpsc::Receiver<Answer>>>,
    /// Deferreds dropped without `complete` (answered -EIO).
    dropped: AtomicU64,
}

impl Returns {
    /// Hands an answer to the connection, or releases its chunk when the
    /// connection is gone.
    fn give(&self, mut a: Answer) {
        // The ring holds a whole queue depth, and each chunk has at most
        // one answer on the way: it is never full while the connection
        // takes answers, and is drained when it stops.
        while let Err(full) = self.tx.push(a) {
            a = full.0;
            std::thread::yield_now();
        }
        // Pairs with the fence in `AnswersRx::drop`: either the connection
        // drains this answer, or this sees it closed and drains it here.
        fence(Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            let mut g = self.orphan.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(rx) = g.as_mut() {
                release_all(rx, &self.chunks);
            }
        }
    }
}

fn release_all(rx: &mut pollers::mpsc::Receiver<Answer>, chunks: &Claims) {
    while let Some(a) = rx.pop() {
        if let Err(e) = chunks.release(a.claim) {
            tracing::error!("releasing a deferred request's chunk: {e}");
        }
    }
}

/// The connection's end of its answers ring.
pub(crate) struct AnswersRx {
    rx: Option<pollers::mpsc::Receiver<Answer>>,
    returns: Arc<Returns>,
}

impl AnswersRx {
    /// The ring for a connection of `queue_depth` chunks (allocated at
    /// connect time).
    pub(crate) fn new(chunks: Arc<Claims>, queue_depth: usize) -> AnswersRx {
        let (tx, rx) = pollers::mpsc::channel(queue_depth.max(1));
        AnswersRx {
            rx: Some(rx),
            returns: Arc::new(Returns {
                tx,
                chunks,
                closed: AtomicBool::new(false),
                orphan: Mutex::new(None),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// The next answer, if one came.
    pub(crate) fn pop(&mut self) -> Option<Answer> {
        self.rx.as_mut()?.pop()
    }

    /// Deferreds dropped without `complete`, so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.returns.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for AnswersRx {
    fn drop(&mut self) {
        let Some(rx) = self.rx.take() else { return };
        let r = &*self.returns;
        let mut g = r.orphan.lock().unwrap_or_else(|p| p.into_inner());
        r.closed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let rx = g.insert(rx);
        release_all(rx, &r.chunks);
    }
}

/// Where a request lies in its chunk, and what it is.
#[derive(Clone, Debug)]
pub(crate) struct Req {
    pub(crate) id: IoId,
    pub(crate) dir: IoDir,
    /// The user header's bytes in the chunk.
    pub(crate) usr: Range<usize>,
    /// The data's bytes in the chunk.
    pub(crate) data: Range<usize>,
}

/// An IO request as the handler sees it during [`Handler::on_io`]: views
/// into its chunk (zero-copy), and [`defer`](SrvIo::defer) to answer later.
///
/// [`Handler::on_io`]: super::Handler::on_io
pub struct SrvIo<'a> {
    req: Req,
    /// The chunk; taken by `defer`.
    claim: &'a mut Option<Claim>,
    chunks: &'a Claims,
    returns: &'a Arc<Returns>,
}

impl std::fmt::Debug for SrvIo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrvIo").field("req", &self.req).finish()
    }
}

impl<'a> SrvIo<'a> {
    /// Request `req` in `claim`'s chunk (its header and data checked to
    /// lie in the chunk, apart).
    pub(crate) fn new(
        req: Req,
        claim: &'a mut Option<Claim>,
        chunks: &'a Claims,
        answers: &'a AnswersRx,
    ) -> Option<SrvIo<'a>> {
        chunks.split(claim.as_mut()?, req.usr.clone(), req.data.clone())?;
        Some(SrvIo {
            req,
            claim,
            chunks,
            returns: &answers.returns,
        })
    }

    /// Which request (its chunk).
    pub fn id(&self) -> IoId {
        self.req.id
    }

    /// Write (the client sent data) or read (fill the data).
    pub fn dir(&self) -> IoDir {
        self.req.dir
    }

    /// The user header (an RNBD message, for RNBD).
    pub fn usr(&self) -> &[u8] {
        view(self.chunks, self.claim.as_ref(), &self.req.usr)
    }

    /// The data: what a write sent, or the buffer a read fills (the
    /// requested length), sent to the client when the request completes.
    pub fn data(&mut self) -> &mut [u8] {
        self.parts().1
    }

    /// The user header and the data at once.
    pub fn parts(&mut self) -> (&[u8], &mut [u8]) {
        parts(
            self.chunks,
            self.claim.as_mut(),
            &self.req.usr,
            &self.req.data,
        )
    }

    /// Bytes of data (a read: the length the client asked for).
    pub fn data_len(&self) -> usize {
        self.req.data.len()
    }

    /// Keeps the request to answer later: the returned token owns its chunk
    /// and may go to any thread. Return [`Verdict::Later`] from `on_io`.
    ///
    /// [`Verdict::Later`]: super::Verdict::Later
    pub fn defer(self) -> Deferred {
        Deferred {
            claim: self.claim.take(),
            req: self.req,
            returns: self.returns.clone(),
        }
    }
}

/// A request answered later: owns its chunk until [`complete`](Deferred::complete),
/// from any thread. Dropped without completing, it answers -EIO (logged,
/// counted in the path's `handler_faults`).
///
/// A connection that closes first does not wait for it: completing then
/// releases the chunk (there is no path to answer on; the client's failover
/// sends the request again elsewhere).
pub struct Deferred {
    claim: Option<Claim>,
    req: Req,
    returns: Arc<Returns>,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("id", &self.req.id)
            .field("dir", &self.req.dir)
            .field("data_len", &self.req.data.len())
            .finish()
    }
}

impl Deferred {
    /// Which request (its chunk).
    pub fn id(&self) -> IoId {
        self.req.id
    }

    /// Write or read.
    pub fn dir(&self) -> IoDir {
        self.req.dir
    }

    /// The user header.
    pub fn usr(&self) -> &[u8] {
        view(&self.returns.chunks, self.claim.as_ref(), &self.req.usr)
    }

    /// The data (a read: fill it before completing).
    pub fn data(&self) -> &[u8] {
        view(&self.returns.chunks, self.claim.as_ref(), &self.req.data)
    }

    /// The data, to fill.
    pub fn data_mut(&mut self) -> &mut [u8] {
        parts(
            &self.returns.chunks,
            self.claim.as_mut(),
            &self.req.usr,
            &self.req.data,
        )
        .1
    }

    /// The user header and the data at once.
    pub fn parts(&mut self) -> (&[u8], &mut [u8]) {
        parts(
            &self.returns.chunks,
            self.claim.as_mut(),
            &self.req.usr,
            &self.req.data,
        )
    }

    /// Answers the request with `errno` (0 or negative): the chunk goes back
    /// to its connection's core, which sends the response.
    pub fn complete(mut self, errno: i32) {
        if let Some(claim) = self.claim.take() {
            self.returns.give(Answer { claim, errno });
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            self.returns.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                chunk = self.req.id.chunk(),
                "a deferred request was dropped without complete(): the client gets -EIO"
            );
            self.returns.give(Answer {
                claim,
                errno: -libc::EIO,
            });
        }
    }
}

fn view<'a>(chunks: &'a Claims, claim: Option<&'a Claim>, r: &Range<usize>) -> &'a [u8] {
    claim
        .and_then(|c| chunks.bytes(c, r.clone()))
        .unwrap_or(&[])
}

fn parts<'a>(
    chunks: &'a Claims,
    claim: Option<&'a mut Claim>,
    usr: &Range<usize>,
    data: &Range<usize>,
) -> (&'a [u8], &'a mut [u8]) {
    claim
        .and_then(|c| chunks.split(c, usr.clone(), data.clone()))
        .unwrap_or((&[], &mut []))
}

/// Requests for a handler under test, without a connection: real chunks,
/// the same [`SrvIo`] and [`Deferred`] the engine hands out.
#[cfg(test)]
pub(crate) mod testkit {
    use super::*;

    /// `n` chunks of `size` bytes, and the answers ring of a connection.
    pub(crate) struct Bench {
        pub(crate) chunks: Arc<Claims>,
        held: Vec<Option<Claim>>,
        lens: Vec<usize>,
        answers: AnswersRx,
    }

    impl Bench {
        /// The connection goes away: its answers ring closes.
        pub(crate) fn close(&mut self) {
            let n = self.held.len();
            let old = std::mem::replace(&mut self.answers, AnswersRx::new(self.chunks.clone(), n));
            drop(old);
        }
    }

    impl Bench {
        pub(crate) fn new(n: u32, size: usize) -> Bench {
            let region = Arc::new(mempool::Region::anonymous(n as usize * size).unwrap());
            let chunks = Arc::new(Claims::new(region, size, n).unwrap());
            Bench {
                answers: AnswersRx::new(chunks.clone(), n as usize),
                chunks,
                held: (0..n).map(|_| None).collect(),
                lens: vec![0; n as usize],
            }
        }

        /// Request `id`: `usr` at the chunk's end, `data` (a write's) or
        /// `len` zero bytes (a read's buffer) at its start.
        pub(crate) fn io(
            &mut self,
            id: u32,
            dir: IoDir,
            usr: &[u8],
            data: &[u8],
            len: usize,
        ) -> SrvIo<'_> {
            let size = self.chunks.chunk_size();
            let mut c = self.chunks.claim(id).expect("the chunk is free");
            let len = len.max(data.len());
            let usr_at = size - usr.len();
            {
                let (_, all) = self.chunks.split(&mut c, 0..0, 0..size).unwrap();
                all.fill(0);
                all[..data.len()].copy_from_slice(data);
                all[usr_at..].copy_from_slice(usr);
            }
            self.held[id as usize] = Some(c);
            self.lens[id as usize] = len;
            let req = Req {
                id: IoId(id),
                dir,
                usr: usr_at..size,
                data: 0..len,
            };
            SrvIo::new(
                req,
                &mut self.held[id as usize],
                &self.chunks,
                &self.answers,
            )
            .expect("the ranges lie in the chunk")
        }

        /// Answers that came back: (chunk, errno); each chunk stays held
        /// here (its data readable) until [`Bench::release`].
        pub(crate) fn answers(&mut self) -> Vec<(u32, i32)> {
            let mut v = Vec::new();
            while let Some(a) = self.answers.pop() {
                let id = a.claim.index();
                v.push((id, a.errno));
                self.held[id as usize] = Some(a.claim);
            }
            v
        }

        /// Request `id`'s data (empty when its chunk is not held here).
        pub(crate) fn data(&self, id: u32) -> &[u8] {
            match &self.held[id as usize] {
                Some(c) => self
                    .chunks
                    .bytes(c, 0..self.lens[id as usize])
                    .unwrap_or(&[]),
                None => &[],
            }
        }

        /// Whether request `id`'s chunk is here (answered, or never deferred).
        pub(crate) fn holds(&self, id: u32) -> bool {
            self.held[id as usize].is_some()
        }

        /// Gives request `id`'s chunk back.
        pub(crate) fn release(&mut self, id: u32) {
            if let Some(c) = self.held[id as usize].take() {
                self.chunks.release(c).unwrap();
            }
        }

        /// Deferreds dropped without completing.
        pub(crate) fn dropped(&self) -> u64 {
            self.answers.dropped()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::Bench;
    use super::*;

    #[test]
    fn a_deferred_completes_from_another_thread_with_its_data() {
        let mut b = Bench::new(4, 8192);
        let mut d = b.io(2, IoDir::Read, b"hdr", &[], 100).defer();
        assert!(!b.holds(2), "the chunk is the token's");
        assert_eq!(d.usr(), b"hdr");
        let t = std::thread::spawn(move || {
            d.data_mut().fill(7);
            d.complete(-5);
        });
        t.join().unwrap();
        assert_eq!(b.answers(), vec![(2, -5)]);
        assert!(b.data(2).iter().all(|&x| x == 7) && b.data(2).len() == 100);
        b.release(2);
        assert!(b.chunks.claim(2).is_some(), "released once, free again");
    }

    #[test]
    fn a_dropped_deferred_answers_eio_and_is_counted() {
        let mut b = Bench::new(2, 8192);
        drop(b.io(1, IoDir::Write, b"", b"abc", 3).defer());
        assert_eq!(b.answers(), vec![(1, -libc::EIO)]);
        assert_eq!(b.dropped(), 1);
    }

    #[test]
    fn a_deferred_outliving_its_connection_releases_its_chunk() {
        let mut b = Bench::new(2, 8192);
        let d = b.io(0, IoDir::Read, b"", &[], 10).defer();
        b.close();
        d.complete(0);
        assert!(b.answers().is_empty(), "no connection to answer on");
        assert!(b.chunks.claim(0).is_some(), "the chunk went back");
    }

    #[test]
    fn completions_racing_the_close_release_every_chunk_once() {
        for round in 0..50 {
            let n = 64u32;
            let mut b = Bench::new(n, 4096);
            let tokens: Vec<Deferred> = (0..n)
                .map(|i| b.io(i, IoDir::Read, b"", &[], 8).defer())
                .collect();
            let mut halves =
                tokens
                    .into_iter()
                    .enumerate()
                    .fold((Vec::new(), Vec::new()), |mut h, (i, d)| {
                        if i % 2 == 0 {
                            h.0.push(d)
                        } else {
                            h.1.push(d)
                        }
                        h
                    });
            let (x, y) = (std::mem::take(&mut halves.0), std::mem::take(&mut halves.1));
            let t1 = std::thread::spawn(move || x.into_iter().for_each(|d| d.complete(0)));
            let t2 = std::thread::spawn(move || y.into_iter().for_each(|d| d.complete(0)));
            if round % 2 == 0 {
                std::thread::yield_now();
            }
            // Some answers reach the ring, some find the connection gone.
            let answered = b.answers();
            for &(id, _) in &answered {
                b.release(id);
            }
            b.close();
            t1.join().unwrap();
            t2.join().unwrap();
            for i in 0..n {
                assert!(
                    b.chunks.claim(i).is_some(),
                    "round {round}: chunk {i} was not released"
                );
            }
        }
    }
}
