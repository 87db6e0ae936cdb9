//! An append-only log served over RTRS with group commit, and a client
//! whose application appends from several threads of its own, each with
//! several appends in flight, then reads every record back.
//!
//! ```text
//!  app thread 0..WRITERS ── Submitter (one each) ──> client core (main thread polls it)
//!                                                        │ RTRS over shm
//!  pinned server core: SrvCon ── Handler::on_io ──> Appender: append, io.defer() -> Deferred
//!                                 Handler::poll ──> Deferred::complete <── committer thread: durable offset
//! ```
//! An append completes only once the committer thread has made its bytes
//! "durable" (a stand-in for an fsync per batch): the handler defers the
//! request ([`SrvIo::defer`], answering [`Verdict::Later`]) and completes
//! its [`Deferred`] on a later poll, once the durable offset has passed
//! the record. No copy, no lock on the core beyond the engine's own.
//!
//! Run it: `cargo run --release -p rtrs-poll --example log`. It checks every
//! record it reads back, then walks the whole log and checks that each
//! append is in it exactly once; exits non-zero on any mismatch. The test
//! command runs it.

use rtrs_poll::{
    Address, Client, CltConfig, Completion, ConInfo, CorePool, Deferred, Fabric, Handler, Instant,
    IoDir, Server, ShmFabric, SrvConfig, SrvIo, Submitter, Verdict,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const APPEND: u8 = 1;
const READ: u8 = 2;
/// Application threads, each appending its own records.
const WRITERS: u32 = 4;
/// Records per writer.
const RECORDS: u32 = 1500;
/// Appends (or reads) each writer keeps in flight.
const DEPTH: usize = 8;
/// A record: writer (4 bytes), sequence (4), length (4), payload.
const REC_HDR: usize = 12;
const MAX_PAYLOAD: usize = 512;

fn header(op: u8, writer: u32, seq: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = op;
    h[4..8].copy_from_slice(&writer.to_le_bytes());
    h[8..12].copy_from_slice(&seq.to_le_bytes());
    h
}

/// The record `writer` appends as its `seq`th: self-describing, so the log
/// can be walked and checked.
fn record(writer: u32, seq: u32) -> Vec<u8> {
    let len = 1 + (writer as usize * 131 + seq as usize * 17) % MAX_PAYLOAD;
    let mut r = Vec::with_capacity(REC_HDR + len);
    r.extend_from_slice(&writer.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&(len as u32).to_le_bytes());
    r.extend((0..len).map(|i| (writer as usize * 7 + seq as usize * 3 + i) as u8));
    r
}

/// The storage engine: the log's bytes, an index of each record's place,
/// and how far the committer has made it durable.
#[derive(Default)]
struct Log {
    bytes: Vec<u8>,
    index: HashMap<(u32, u32), (usize, usize)>,
}

struct Engine {
    log: Mutex<Log>,
    durable: AtomicU64,
}

/// One per connection, on its core: appends wait here for the committer.
struct Appender {
    engine: Arc<Engine>,
    /// (request, log offset it needs durable), in log order. Reserved for
    /// the session's queue depth: no allocation per IO.
    pending: VecDeque<(Deferred, u64)>,
}

impl Handler for Appender {
    fn on_io(&mut self, mut io: SrvIo<'_>) -> Verdict {
        let dir = io.dir();
        let (usr, data) = io.parts();
        if usr.len() < 12 {
            return Verdict::Done(-libc::EINVAL);
        }
        let word = |at: usize| u32::from_le_bytes([usr[at], usr[at + 1], usr[at + 2], usr[at + 3]]);
        let (op, writer, seq) = (usr[0], word(4), word(8));
        let Ok(mut log) = self.engine.log.lock() else {
            return Verdict::Done(-libc::EIO);
        };
        match (op, dir) {
            (APPEND, IoDir::Write) if data.len() >= REC_HDR => {
                let at = log.bytes.len();
                log.bytes.extend_from_slice(data);
                log.index.insert((writer, seq), (at, data.len()));
                let end = log.bytes.len() as u64;
                drop(log);
                self.pending.push_back((io.defer(), end));
                Verdict::Later
            }
            (READ, IoDir::Read) => {
                let Some(&(at, len)) = log.index.get(&(writer, seq)) else {
                    return Verdict::Done(-libc::ENOENT);
                };
                if data.len() < len {
                    return Verdict::Done(-libc::EMSGSIZE);
                }
                data[..len].copy_from_slice(&log.bytes[at..at + len]);
                Verdict::Done(0)
            }
            _ => Verdict::Done(-libc::EINVAL),
        }
    }

    fn poll(&mut self) -> usize {
        let durable = self.engine.durable.load(Ordering::Acquire);
        let mut n = 0;
        while self.pending.front().is_some_and(|&(_, end)| end <= durable) {
            if let Some((d, _)) = self.pending.pop_front() {
                d.complete(0);
                n += 1;
            }
        }
        n
    }
}

/// One application thread: appends its records with up to DEPTH in flight,
/// then reads each back and compares.
fn writer<F: Fabric>(mut sub: Submitter<F>, w: u32) -> Result<(), String> {
    let (mut done, mut next) = (0u32, 0u32);
    let mut back: Vec<Completion> = Vec::with_capacity(DEPTH);
    // Appends. The tag carries the sequence number.
    while done < RECORDS {
        while next < RECORDS && (next - done) < DEPTH as u32 {
            let Some(mut p) = sub.get_permit() else { break };
            let r = record(w, next);
            sub.buf(&mut p)[..r.len()].copy_from_slice(&r);
            sub.write(p, &header(APPEND, w, next), r.len() as u32, u64::from(next))
                .map_err(|(_, e)| format!("writer {w}: append {next}: {e}"))?;
            next += 1;
        }
        sub.poll(&mut |c| back.push(c));
        if back.is_empty() {
            std::thread::yield_now();
        }
        for c in back.drain(..) {
            let (seq, errno) = (c.tag, c.errno);
            sub.put_permit(c.permit);
            if errno != 0 {
                return Err(format!("writer {w}: append {seq}: errno {errno}"));
            }
            done += 1;
        }
    }
    // Reads, one record each, DEPTH in flight; checked as they land.
    let (mut done, mut next) = (0u32, 0u32);
    while done < RECORDS {
        while next < RECORDS && (next - done) < DEPTH as u32 {
            let Some(p) = sub.get_permit() else { break };
            let len = (REC_HDR + MAX_PAYLOAD) as u32;
            sub.read(p, &header(READ, w, next), len, u64::from(next))
                .map_err(|(_, e)| format!("writer {w}: read {next}: {e}"))?;
            next += 1;
        }
        sub.poll(&mut |c| back.push(c));
        if back.is_empty() {
            std::thread::yield_now();
        }
        for mut c in back.drain(..) {
            let seq = c.tag as u32;
            let want = record(w, seq);
            let ok = c.errno == 0 && sub.buf(&mut c.permit)[..want.len()] == want[..];
            sub.put_permit(c.permit);
            if !ok {
                return Err(format!(
                    "writer {w}: record {seq} read back wrong (errno {})",
                    c.errno
                ));
            }
            done += 1;
        }
    }
    Ok(())
}

/// Walks the log: every record well formed, each (writer, seq) once.
fn check_log(bytes: &[u8]) -> Result<usize, String> {
    let mut seen = vec![vec![false; RECORDS as usize]; WRITERS as usize];
    let (mut at, mut n) = (0, 0);
    while at < bytes.len() {
        let word =
            |o: usize| u32::from_le_bytes(bytes[at + o..at + o + 4].try_into().unwrap_or_default());
        if at + REC_HDR > bytes.len() {
            return Err(format!("a torn record header at {at}"));
        }
        let (w, seq, len) = (word(0), word(4), word(8) as usize);
        if w >= WRITERS || seq >= RECORDS || bytes.len() < at + REC_HDR + len {
            return Err(format!("a malformed record at {at}"));
        }
        if bytes[at..at + REC_HDR + len] != record(w, seq)[..] {
            return Err(format!("record {w}/{seq} at {at} differs"));
        }
        if std::mem::replace(&mut seen[w as usize][seq as usize], true) {
            return Err(format!("record {w}/{seq} appended twice"));
        }
        at += REC_HDR + len;
        n += 1;
    }
    if n != (WRITERS * RECORDS) as usize {
        return Err(format!(
            "{n} records in the log, {} appended",
            WRITERS * RECORDS
        ));
    }
    Ok(n)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = Address::Shm(format!("log-example-{}", std::process::id()));
    let fabric = ShmFabric::new();
    let cfg = SrvConfig {
        queue_depth: 64,
        max_chunk_size: 8192,
        ..SrvConfig::default()
    };
    let qd = usize::from(cfg.queue_depth);

    // The engine, and its committer: makes what is appended durable in
    // batches (here: publishes the log's length every 200 µs).
    let engine = Arc::new(Engine {
        log: Mutex::new(Log::default()),
        durable: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let committer = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let len = engine.log.lock().map(|l| l.bytes.len()).unwrap_or(0);
                engine.durable.store(len as u64, Ordering::Release);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };

    let pool = CorePool::launch(&[0])?;
    let e2 = engine.clone();
    let srv = Server::listen(
        &fabric,
        &addr,
        cfg,
        move |_: &ConInfo| Appender {
            engine: e2.clone(),
            pending: VecDeque::with_capacity(qd),
        },
        pool.place(),
    )?;

    // The client: one core, polled by this thread; WRITERS application
    // threads submit through a Submitter each.
    let (clt, mut cores) = Client::open(&fabric, CltConfig::new("log-example", vec![addr]))?;
    let mut core = cores.remove(0);
    let t0 = std::time::Instant::now();
    let mut apps = Vec::new();
    for w in 0..WRITERS {
        let sub = core.submitter()?;
        apps.push(std::thread::spawn(move || writer(sub, w)));
    }
    while !apps.iter().all(|a| a.is_finished()) {
        if core.poll(Instant::now(), &mut |_| {}) == 0 {
            std::thread::yield_now();
        }
    }
    let results: Vec<_> = apps
        .into_iter()
        .map(|a| {
            a.join()
                .unwrap_or_else(|_| Err("an application thread panicked".into()))
        })
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    clt.close();
    drop(core);
    srv.stop();
    pool.stop();
    stop.store(true, Ordering::Relaxed);
    let _ = committer.join();
    for r in results {
        r?;
    }
    let log = engine
        .log
        .lock()
        .map_err(|_| "the log's lock is poisoned")?;
    let n = check_log(&log.bytes)?;
    println!(
        "log: {WRITERS} threads appended {n} records ({} bytes), read each back and found each \
         once in the log, in {secs:.3} s ({DEPTH} in flight per thread, group commit)",
        log.bytes.len()
    );
    Ok(())
}
