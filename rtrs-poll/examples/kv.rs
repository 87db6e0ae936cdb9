//! A key-value store served over RTRS, and an application thread that puts
//! and gets through the client: the smallest embedding of both halves.
//!
//! ```text
//!  app thread ── Submitter::write/read ──> client core (this thread polls it)
//!                                              │ RTRS over shm
//!  pinned server core: SrvCon ── Handler::on_io ──> Kv (an append-only log + index)
//! ```
//! Run it: `cargo run --release -p rtrs-poll --example kv` (shm, so one
//! host; use a `tcp:HOST:PORT` address and `TcpFabric` between hosts). It
//! checks every value it reads back and exits non-zero on any mismatch; the
//! test command runs it.

use rtrs_poll::{
    Address, Client, CltConfig, CorePool, Fabric, Handler, Instant, IoDir, Server, ShmFabric,
    SrvConfig, SrvIo, Submitter, Verdict,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The request header the client sends: the operation, then the key.
const PUT: u8 = 1;
const GET: u8 = 2;
/// Values are at most this long; a GET reads a length word and the value.
const MAX_VALUE: usize = 1024;
const KEYS: u64 = 2000;

fn header(op: u8, key: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0] = op;
    h[8..].copy_from_slice(&key.to_le_bytes());
    h
}

fn value(key: u64) -> Vec<u8> {
    let len = 16 + (key as usize * 37) % (MAX_VALUE - 16);
    (0..len).map(|i| (key as usize * 31 + i) as u8).collect()
}

/// The storage engine: an append-only log and an index of where each
/// key's latest value sits. (Shared by the server's connections: one lock,
/// the engine's own choice; RTRS calls a handler on its connection's core
/// only.)
#[derive(Default)]
struct Log {
    bytes: Vec<u8>,
    index: HashMap<u64, (usize, usize)>,
}

struct Kv {
    log: Arc<Mutex<Log>>,
}

impl Handler for Kv {
    fn on_io(&mut self, mut io: SrvIo<'_>) -> Verdict {
        let dir = io.dir();
        let (usr, data) = io.parts();
        let (Some(&op), Some(key)) = (usr.first(), usr.get(8..16)) else {
            return Verdict::Done(-libc::EINVAL);
        };
        let key = u64::from_le_bytes(key.try_into().unwrap_or_default());
        let Ok(mut log) = self.log.lock() else {
            return Verdict::Done(-libc::EIO);
        };
        match (op, dir) {
            (PUT, IoDir::Write) if data.len() <= MAX_VALUE => {
                let at = log.bytes.len();
                log.bytes.extend_from_slice(data);
                log.index.insert(key, (at, data.len()));
                Verdict::Done(0)
            }
            (GET, IoDir::Read) if data.len() >= 4 + MAX_VALUE => {
                let Some(&(at, len)) = log.index.get(&key) else {
                    return Verdict::Done(-libc::ENOENT);
                };
                data[..4].copy_from_slice(&(len as u32).to_le_bytes());
                data[4..4 + len].copy_from_slice(&log.bytes[at..at + len]);
                Verdict::Done(0)
            }
            _ => Verdict::Done(-libc::EINVAL),
        }
    }
}

/// Waits for the submitter's one IO in flight.
fn wait<F: Fabric>(sub: &mut Submitter<F>) -> rtrs_poll::clt::Completion {
    loop {
        let mut got = None;
        sub.poll(&mut |c| got = Some(c));
        if let Some(c) = got {
            return c;
        }
        // This host may have fewer CPUs than busy threads (server core,
        // client core, this one): let the core run.
        std::thread::yield_now();
    }
}

fn put<F: Fabric>(sub: &mut Submitter<F>, key: u64, v: &[u8]) -> Result<(), String> {
    let mut p = sub.get_permit().ok_or("no permit")?;
    sub.buf(&mut p)[..v.len()].copy_from_slice(v);
    sub.write(p, &header(PUT, key), v.len() as u32, key)
        .map_err(|(_, e)| format!("put {key}: {e}"))?;
    let c = wait(sub);
    sub.put_permit(c.permit);
    match c.errno {
        0 => Ok(()),
        e => Err(format!("put {key}: errno {e}")),
    }
}

fn get<F: Fabric>(sub: &mut Submitter<F>, key: u64) -> Result<Option<Vec<u8>>, String> {
    let p = sub.get_permit().ok_or("no permit")?;
    sub.read(p, &header(GET, key), (4 + MAX_VALUE) as u32, key)
        .map_err(|(_, e)| format!("get {key}: {e}"))?;
    let mut c = wait(sub);
    let r = match c.errno {
        0 => {
            let b = sub.buf(&mut c.permit);
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            Ok(Some(b[4..4 + len.min(MAX_VALUE)].to_vec()))
        }
        e if e == -libc::ENOENT => Ok(None),
        e => Err(format!("get {key}: errno {e}")),
    };
    sub.put_permit(c.permit);
    r
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = Address::Shm(format!("kv-example-{}", std::process::id()));
    let fabric = ShmFabric::new();

    // The server: IO connections on a pinned core, the store behind them.
    let log = Arc::new(Mutex::new(Log::default()));
    let pool = CorePool::launch(&[0])?;
    let l2 = log.clone();
    let srv = Server::listen(
        &fabric,
        &addr,
        SrvConfig::default(),
        move |_: &rtrs_poll::srv::ConInfo| Kv { log: l2.clone() },
        pool.place(),
    )?;

    // The client: one core, driven by this thread; the application
    // submits from its own thread.
    let (clt, mut cores) = Client::open(&fabric, CltConfig::new("kv-example", vec![addr]))?;
    let mut core = cores.remove(0);
    let mut sub = core.submitter()?;
    let app = std::thread::spawn(move || -> Result<(u64, f64), String> {
        let t0 = std::time::Instant::now();
        for k in 0..KEYS {
            put(&mut sub, k, &value(k))?;
        }
        for k in 0..KEYS {
            match get(&mut sub, k)? {
                Some(v) if v == value(k) => {}
                Some(_) => return Err(format!("key {k}: the value read back differs")),
                None => return Err(format!("key {k}: missing")),
            }
        }
        if get(&mut sub, KEYS + 1)?.is_some() {
            return Err("a key never put was found".into());
        }
        Ok((2 * KEYS + 1, t0.elapsed().as_secs_f64()))
    });
    while !app.is_finished() {
        if core.poll(Instant::now(), &mut |_| {}) == 0 {
            std::thread::yield_now();
        }
    }
    let result = app.join().map_err(|_| "the application thread panicked")?;
    clt.close();
    drop(core);
    srv.stop();
    pool.stop();
    let (ops, secs) = result?;
    let stored = log.lock().map(|l| l.bytes.len()).unwrap_or(0);
    println!(
        "kv: {ops} puts and gets checked in {secs:.3} s ({:.0} ops/s, QD1 from the app thread); \
         the log holds {stored} bytes",
        ops as f64 / secs
    );
    Ok(())
}
