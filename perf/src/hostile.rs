//! `rtrs-perf hostile`: a hostile peer of a tcp RTRS server, for the
//! hostile-peer suite (`scripts/hostile.sh`, docs/security.md).
//!
//! Each attack is a function that talks to the server the way a broken or
//! malicious peer would, for `--secs` seconds, and prints one line of what
//! it saw: connections made, answers and refusals (with their errno or
//! reason), connections the server closed, and connections the server let
//! it hold. Errors on the attacker's side are the point: they are counted,
//! never fatal. The suite judges the server by what a well-behaved client
//! beside the attacker sees; this line says what the attacker got.
//!
//! ```text
//!  garbage        random bytes on fresh connections
//!  truncated      valid prefixes of a CM REQ, and of a frame header after a
//!                 valid handshake, then a close or a stall
//!  oversized      frame headers claiming huge lengths after a valid
//!                 handshake; a CM REQ claiming 255 bytes of private data
//!  cm-fuzz        CM REQs with each field (and each conn_req field) mutated
//!  squat          valid conn_reqs for cid 0 of 2, the RTU, then silence
//!  conn-flood     as many TCP connections as --count, held silent
//!  idle-flood     full sessions with --cons IO connections each, never used
//!  slowloris      CM REQs one byte at a time, slowly
//!  ro-write       an RNBD device opened read-only, then written
//!  outside-allow  sessions opened from an address the server does not allow
//!  no-key         sessions opened with no key against a keyed listener
//!  wrong-key      sessions opened with another key (--auth-key FILE)
//! ```
//! The suite runs these two against a listener with a key: a session that
//! opens is a breach.

use rtrs_fabric::soft::tcp::{TcpConfig, TcpFabric};
use rtrs_fabric::Address;
use rtrs_poll::clt::{Client, CltConfig, CltCore, PathState, ReconnectPolicy};
use rtrs_poll::rnbd::RnbdClient;
use rtrs_proto::rnbd::{AccessMode, RnbdOp};
use rtrs_proto::{ConnReqRepr, ConnRsp, PRIVATE_DATA_LEN};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    Garbage,
    Truncated,
    Oversized,
    CmFuzz,
    Squat,
    ConnFlood,
    IdleFlood,
    Slowloris,
    RoWrite,
    OutsideAllow,
    NoKey,
    WrongKey,
}

/// What the attacker was asked to do.
#[derive(Clone, Debug)]
pub struct Opts {
    pub target: Address,
    pub attack: Attack,
    pub secs: f64,
    pub count: usize,
    pub cons: usize,
    pub device: String,
    pub json: bool,
    /// Continuous attacks: new connections or messages per second.
    pub rate: f64,
    /// Touched once the attack is in place (its connections held).
    pub ready: Option<std::path::PathBuf>,
    /// The attack ends when this file appears (or after `secs`).
    pub stop_file: Option<std::path::PathBuf>,
    /// The pre-shared key sessions prove (wrong-key: another one).
    pub auth_key: Option<std::path::PathBuf>,
}

/// Whether the attack is over: its time is up, Ctrl-C, or the stop file.
fn over(o: &Opts, end: Instant) -> bool {
    Instant::now() >= end
        || crate::interrupted()
        || o.stop_file.as_ref().is_some_and(|f| f.exists())
}

/// Says the attack is in place.
fn ready(o: &Opts, t: &mut Tally) {
    if let Some(f) = &o.ready {
        if let Err(e) = std::fs::write(f, b"ready\n") {
            t.notes.push(format!("cannot write {}: {e}", f.display()));
        }
    }
}

/// Paces a continuous attack at `rate` per second.
fn pace(o: &Opts) {
    std::thread::sleep(Duration::from_secs_f64(1.0 / o.rate));
}

/// What the attacker saw.
#[derive(Debug, Default)]
struct Tally {
    /// TCP connections (or sessions) the attacker opened.
    made: u64,
    /// Outcome -> how many times.
    seen: BTreeMap<String, u64>,
    /// Something the server should not have let through (an attack the
    /// server accepted where it must refuse).
    breaches: u64,
    notes: Vec<String>,
}

impl Tally {
    fn saw(&mut self, what: impl Into<String>) {
        *self.seen.entry(what.into()).or_default() += 1;
    }
    fn breach(&mut self, what: impl Into<String>) {
        self.breaches += 1;
        self.saw(what);
    }
}

// The tcp fabric's CM message (soft/tcp/cm.rs).
const CM_LEN: usize = 96;
const CM_MAGIC: u32 = 0x7074_6372;
const CM_PDATA_AT: usize = 40;
const REQ: u8 = 1;
const ACC: u8 = 2;
const REJ: u8 = 3;
const RTU: u8 = 4;
// The frame header (soft/tcp/wire.rs).
const HDR: usize = 48;

/// How long the attacker waits for the server's answer to one message.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

fn cm_msg(kind: u8, pdata: &[u8]) -> [u8; CM_LEN] {
    let mut b = [0u8; CM_LEN];
    b[0..4].copy_from_slice(&CM_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&1u16.to_le_bytes());
    b[6] = kind;
    let n = pdata.len().min(CM_LEN - CM_PDATA_AT);
    b[7] = n as u8;
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&256u32.to_le_bytes());
    b[16..20].copy_from_slice(&256u32.to_le_bytes());
    b[CM_PDATA_AT..CM_PDATA_AT + n].copy_from_slice(&pdata[..n]);
    b
}

/// A small xorshift: the attack's randomness needs no quality.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(t ^ u64::from(std::process::id()) << 40 | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A conn_req for cid `cid` of `cid_num`, for a fresh session.
fn conn_req(rng: &mut Rng, cid: u16, cid_num: u16) -> [u8; PRIVATE_DATA_LEN] {
    let mut b = [0u8; PRIVATE_DATA_LEN];
    let (mut sess, mut paths) = ([0u8; 16], [0u8; 16]);
    rng.fill(&mut sess);
    rng.fill(&mut paths);
    let r = ConnReqRepr {
        cid,
        cid_num,
        recon_cnt: 1,
        sess_uuid: sess,
        paths_uuid: paths,
        first_conn: true,
    }
    .emit(&mut b);
    debug_assert!(r.is_ok());
    b
}

fn errno_name(e: i32) -> String {
    let n = match -e {
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOMEM => "ENOMEM",
        libc::EBUSY => "EBUSY",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ENXIO => "ENXIO",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::EPROTO => "EPROTO",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        _ => return format!("errno {e}"),
    };
    format!("-{n}")
}

fn io_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_name(-n),
        None => format!("{:?}", e.kind()),
    }
}

fn sockaddr(a: &Address) -> Result<SocketAddr, String> {
    match a {
        Address::Tcp { host, port } => (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| format!("{a}: {e}"))?
            .next()
            .ok_or_else(|| format!("{a}: no address")),
        other => Err(format!(
            "hostile attacks speak tcp only, not {}",
            other.scheme()
        )),
    }
}

/// A fresh connection, or what refused it.
fn dial(to: SocketAddr, t: &mut Tally) -> Option<TcpStream> {
    match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
        Ok(s) => {
            t.made += 1;
            // Small writes go out at once (slowloris, truncation).
            if let Err(e) = s.set_nodelay(true) {
                t.saw(format!("set TCP_NODELAY: {}", io_name(&e)));
            }
            Some(s)
        }
        Err(e) => {
            t.saw(format!("connect failed {}", io_name(&e)));
            None
        }
    }
}

/// How a connection ended, after the attacker's last message: the server
/// closed it (EOF or reset), it answered bytes, or it held it `wait`.
fn fate(s: &mut TcpStream, wait: Duration) -> String {
    let end = Instant::now() + wait;
    let mut got = 0usize;
    let mut b = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return if got > 0 {
                format!("answered {got} B, then held open")
            } else {
                "held open (no answer)".into()
            };
        }
        if let Err(e) = s.set_read_timeout(Some(left)) {
            return format!("set a timeout: {}", io_name(&e));
        }
        match s.read(&mut b) {
            Ok(0) => return "closed by the server".into(),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return "reset by the server".into()
            }
            Err(e) => return format!("read failed {}", io_name(&e)),
        }
    }
}

/// The server's answer to a CM REQ.
enum Answer {
    Acc,
    Rej(String),
    /// Closed, reset, silent, or not a CM message: what happened.
    Other(String),
}

fn cm_answer(s: &mut TcpStream) -> Answer {
    let mut b = [0u8; CM_LEN];
    if let Err(e) = s.set_read_timeout(Some(ANSWER_WAIT)) {
        return Answer::Other(format!("set a timeout: {}", io_name(&e)));
    }
    let mut got = 0;
    while got < CM_LEN {
        match s.read(&mut b[got..]) {
            Ok(0) => return Answer::Other("closed by the server".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Answer::Other("no answer (held open)".into())
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Answer::Other("reset by the server".into())
            }
            Err(e) => return Answer::Other(format!("read failed {}", io_name(&e))),
        }
    }
    if b[0..4] != CM_MAGIC.to_le_bytes() {
        return Answer::Other("answered something not a CM message".into());
    }
    let plen = usize::from(b[7]).min(CM_LEN - CM_PDATA_AT);
    let pdata = &b[CM_PDATA_AT..CM_PDATA_AT + plen];
    match b[6] {
        ACC => Answer::Acc,
        REJ => Answer::Rej(match ConnRsp::new_checked(pdata) {
            Ok(v) => format!("refused {}", errno_name(v.errno().into())),
            Err(_) => "refused (no errno)".into(),
        }),
        k => Answer::Other(format!("answered CM kind {k}")),
    }
}

fn send(s: &mut TcpStream, b: &[u8], t: &mut Tally) -> bool {
    match s.write_all(b) {
        Ok(()) => true,
        Err(e) => {
            t.saw(format!("send failed {}", io_name(&e)));
            false
        }
    }
}

/// A valid handshake for cid 0 of `cid_num`: REQ, ACC, RTU. The
/// connection is the server's QP's from then on.
fn handshake(to: SocketAddr, rng: &mut Rng, cid_num: u16, t: &mut Tally) -> Option<TcpStream> {
    let mut s = dial(to, t)?;
    if !send(&mut s, &cm_msg(REQ, &conn_req(rng, 0, cid_num)), t) {
        return None;
    }
    match cm_answer(&mut s) {
        Answer::Acc => {}
        Answer::Rej(why) | Answer::Other(why) => {
            t.saw(format!("handshake: {why}"));
            return None;
        }
    }
    send(&mut s, &cm_msg(RTU, &[]), t).then_some(s)
}

fn deadline(o: &Opts) -> Instant {
    Instant::now() + Duration::from_secs_f64(o.secs)
}

fn garbage(o: &Opts, to: SocketAddr, t: &mut Tally) {
    let mut rng = Rng::new();
    let end = deadline(o);
    ready(o, t);
    while !over(o, end) {
        pace(o);
        let Some(mut s) = dial(to, t) else { continue };
        let mut b = vec![0u8; CM_LEN + rng.below(4096) as usize];
        rng.fill(&mut b);
        if send(&mut s, &b, t) {
            t.saw(fate(&mut s, ANSWER_WAIT));
        }
    }
}

fn truncated(o: &Opts, to: SocketAddr, t: &mut Tally) {
    let mut rng = Rng::new();
    let end = deadline(o);
    let mut held = Vec::new();
    let mut i = 0usize;
    ready(o, t);
    while !over(o, end) {
        pace(o);
        i += 1;
        // Stalled connections are held, up to --count of them.
        let stall = i % 2 == 0 && held.len() < o.count;
        let (mut s, prefix, what) = if i % 4 < 2 {
            // A prefix of a CM REQ.
            let Some(s) = dial(to, t) else { continue };
            let req = cm_msg(REQ, &conn_req(&mut rng, 0, 1));
            let n = 1 + rng.below(CM_LEN as u64 - 1) as usize;
            (s, req[..n].to_vec(), "REQ prefix")
        } else {
            // A valid handshake, then a prefix of a SEND frame's header.
            let Some(s) = handshake(to, &mut rng, 1, t) else {
                continue;
            };
            let mut h = [0u8; HDR];
            h[0] = 1; // REQ
            h[1] = 1; // SEND
            h[2] = 3; // first | last
            h[4..8].copy_from_slice(&272u32.to_le_bytes());
            h[24..28].copy_from_slice(&272u32.to_le_bytes());
            let n = 1 + rng.below(HDR as u64 - 1) as usize;
            (s, h[..n].to_vec(), "frame prefix")
        };
        if send(&mut s, &prefix, t) {
            if stall {
                held.push(s);
            } else {
                t.saw(format!("{what} then close: sent"));
            }
        }
    }
    // One look at the stalled ones: which the server closed meanwhile.
    hold(o, held, Instant::now(), t, "stalled prefix");
}

/// Holds `conns` silent until `end`, then counts which the server closed.
fn hold(o: &Opts, conns: Vec<TcpStream>, end: Instant, t: &mut Tally, what: &str) {
    let mut open: Vec<(TcpStream, Instant)> = Vec::new();
    let start = Instant::now();
    for s in conns {
        if let Err(e) = s.set_nonblocking(true) {
            t.saw(format!("{what}: set non-blocking: {}", io_name(&e)));
            continue;
        }
        open.push((s, start));
    }
    let mut closed_after: Vec<f64> = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        open.retain_mut(|(s, _)| match s.read(&mut b) {
            Ok(0) => {
                closed_after.push(start.elapsed().as_secs_f64());
                t.saw(format!("{what}: closed by the server"));
                false
            }
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Err(e) => {
                closed_after.push(start.elapsed().as_secs_f64());
                t.saw(format!("{what}: {}", io_name(&e)));
                false
            }
        });
        if open.is_empty() || over(o, end) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in &open {
        t.saw(format!("{what}: still open at the end"));
    }
    if let Some(last) = closed_after.iter().cloned().reduce(f64::max) {
        t.notes.push(format!(
            "{what}: the server closed {} within {last:.1} s",
            closed_after.len()
        ));
    }
}

fn oversized(o: &Opts, to: SocketAddr, t: &mut Tally) {
    let mut rng = Rng::new();
    let end = deadline(o);
    let mut i = 0usize;
    ready(o, t);
    while !over(o, end) {
        pace(o);
        let v = i % 4;
        i += 1;
        if v == 0 {
            // A CM REQ claiming 255 bytes of private data.
            let Some(mut s) = dial(to, t) else { continue };
            let mut req = cm_msg(REQ, &conn_req(&mut rng, 0, 1));
            req[7] = 255;
            if send(&mut s, &req, t) {
                t.saw(format!(
                    "REQ with 255 B pdata: {}",
                    fate(&mut s, ANSWER_WAIT)
                ));
            }
            continue;
        }
        let Some(mut s) = handshake(to, &mut rng, 1, &mut *t) else {
            continue;
        };
        let mut h = [0u8; HDR];
        h[0] = 1; // REQ
        h[2] = 3; // first | last
        let label = match v {
            1 => {
                // Insane: a piece beyond MAX_PIECE and the message.
                h[1] = 1;
                h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                h[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
                "SEND piece 4 GiB"
            }
            2 => {
                // A sane piece of a 4 GiB message.
                h[1] = 1;
                h[4..8].copy_from_slice(&(1u32 << 20).to_le_bytes());
                h[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
                "SEND of 4 GiB, 1 MiB piece"
            }
            _ => {
                // An RDMA WRITE of 4 GiB to a made-up key.
                h[1] = 4;
                h[4..8].copy_from_slice(&(1u32 << 20).to_le_bytes());
                h[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
                h[32..40].copy_from_slice(&rng.next().to_le_bytes());
                h[40..44].copy_from_slice(&(rng.next() as u32).to_le_bytes());
                "WRITE of 4 GiB"
            }
        };
        if !send(&mut s, &h, t) {
            continue;
        }
        // The piece's payload, as far as the server takes it.
        let chunk = vec![0u8; 64 << 10];
        let mut sent = 0usize;
        if let Err(e) = s.set_write_timeout(Some(ANSWER_WAIT)) {
            t.saw(format!("set a timeout: {}", io_name(&e)));
        }
        while sent < 1 << 20 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        t.saw(format!("{label}: {}", fate(&mut s, ANSWER_WAIT)));
    }
}

fn cm_fuzz(o: &Opts, to: SocketAddr, t: &mut Tally) {
    let mut rng = Rng::new();
    let end = deadline(o);
    // (name, offset in the CM message, width): the CM fields, then the
    // conn_req's in the private data at 40 (proto/rtrs.rs, `conn_req`).
    const FIELDS: &[(&str, usize, usize)] = &[
        ("cm.magic", 0, 4),
        ("cm.version", 4, 2),
        ("cm.kind", 6, 1),
        ("cm.plen", 7, 1),
        ("cm.qp_num", 8, 4),
        ("cm.max_send_wr", 12, 4),
        ("cm.max_recv_wr", 16, 4),
        ("cm.reserved", 20, 20),
        ("req.cma", 40, 2),
        ("req.magic", 42, 2),
        ("req.version", 44, 2),
        ("req.cid", 46, 2),
        ("req.cid_num", 48, 2),
        ("req.recon_cnt", 50, 2),
        ("req.sess_uuid", 52, 16),
        ("req.paths_uuid", 68, 16),
        ("req.flags", 84, 1),
        ("req.reserved", 85, 11),
    ];
    let mut i = 0usize;
    ready(o, t);
    while !over(o, end) {
        pace(o);
        let (name, at, w) = FIELDS[i % FIELDS.len()];
        let variant = (i / FIELDS.len()) % 4;
        i += 1;
        let mut req = cm_msg(REQ, &conn_req(&mut rng, 0, 1));
        let f = &mut req[at..at + w];
        match variant {
            0 => f.fill(0),
            1 => f.fill(0xff),
            2 => rng.fill(f),
            _ => f[0] = f[0].wrapping_add(1),
        }
        let Some(mut s) = dial(to, t) else { continue };
        if !send(&mut s, &req, t) {
            continue;
        }
        let what = match cm_answer(&mut s) {
            Answer::Acc => "accepted".to_string(),
            Answer::Rej(why) | Answer::Other(why) => why,
        };
        t.saw(format!("{name}: {what}"));
    }
    // Collapse per-field outcomes into a short line: per outcome, the count.
    let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
    for (k, n) in &t.seen {
        let outcome = k.split_once(": ").map_or(k.as_str(), |x| x.1);
        *by_outcome.entry(outcome.to_string()).or_default() += n;
    }
    let fields: Vec<String> = t.seen.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    t.notes.push(format!("per field: {}", fields.join(", ")));
    t.seen = by_outcome;
}

fn squat(o: &Opts, to: SocketAddr, t: &mut Tally) {
    let mut rng = Rng::new();
    let end = deadline(o);
    let mut held = Vec::new();
    for _ in 0..o.count {
        if over(o, end) {
            break;
        }
        if let Some(s) = handshake(to, &mut rng, 2, t) {
            t.saw("cid 0 of 2 accepted");
            held.push(s);
        }
    }
    ready(o, t);
    hold(o, held, end, t, "squatted path");
}

fn conn_flood(o: &Opts, to: SocketAddr, t: &mut Tally) {
    let end = deadline(o);
    let mut held = Vec::new();
    for _ in 0..o.count {
        if over(o, end) {
            break;
        }
        if let Some(s) = dial(to, t) {
            held.push(s);
        }
    }
    ready(o, t);
    t.notes.push(format!("{} connections opened", held.len()));
    hold(o, held, end, t, "silent connection");
}

fn slowloris(o: &Opts, to: SocketAddr, t: &mut Tally) {
    let mut rng = Rng::new();
    let end = deadline(o);
    let mut conns: Vec<(TcpStream, [u8; CM_LEN], usize)> = Vec::new();
    for _ in 0..o.count {
        if let Some(s) = dial(to, t) {
            conns.push((s, cm_msg(REQ, &conn_req(&mut rng, 0, 1)), 0));
        }
    }
    ready(o, t);
    let start = Instant::now();
    let mut finished = 0;
    while !over(o, end) && !conns.is_empty() {
        conns.retain_mut(|(s, req, at)| {
            if *at == CM_LEN {
                return true;
            }
            match s.write(&req[*at..*at + 1]) {
                Ok(n) => {
                    *at += n;
                    if *at == CM_LEN {
                        finished += 1;
                    }
                    true
                }
                Err(e) => {
                    t.saw(format!(
                        "closed by the server after {at} B, {:.1} s ({})",
                        start.elapsed().as_secs_f64(),
                        io_name(&e)
                    ));
                    false
                }
            }
        });
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut b = [0u8; 1];
    for (mut s, _, at) in conns {
        if let Err(e) = s.set_nonblocking(true) {
            t.saw(format!("set non-blocking: {}", io_name(&e)));
            continue;
        }
        match s.read(&mut b) {
            Ok(0) => t.saw(format!("closed by the server (after {at} B)")),
            Ok(_) => t.saw("answered"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                t.saw(format!("still open at the end ({at} B sent)"))
            }
            Err(e) => t.saw(format!("closed by the server ({})", io_name(&e))),
        }
    }
    t.notes
        .push(format!("{finished} sent the whole REQ, a byte per 250 ms"));
}

/// Opens a plain session of `cores` IO connections.
type Session = (Client<TcpFabric>, Vec<CltCore<TcpFabric>>);

fn open_session(o: &Opts, name: &str, cores: usize) -> Result<Session, String> {
    let mut cfg = CltConfig::new(name, vec![o.target.clone()]);
    cfg.cores = cores;
    cfg.max_io_size = 4096;
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.reconnect = ReconnectPolicy {
        max_attempts: 0,
        ..Default::default()
    };
    let mut tcfg = TcpConfig::default();
    if let Some(k) = &o.auth_key {
        tcfg = tcfg.with_auth_key_file(k)?;
    }
    Client::open(&TcpFabric::with_config(tcfg), cfg).map_err(|e| e.to_string())
}

fn idle_flood(o: &Opts, t: &mut Tally) {
    let end = deadline(o);
    let mut held = Vec::new();
    for i in 0..o.count {
        if over(o, end) {
            break;
        }
        t.made += 1;
        match open_session(o, &format!("idle{i}-{}", std::process::id()), o.cons) {
            Ok(s) => {
                t.saw(format!("session of {} IO connections opened", o.cons));
                held.push(s);
            }
            Err(e) => t.saw(format!("refused: {e}")),
        }
    }
    t.notes
        .push(format!("{} IO connections held idle", held.len() * o.cons));
    ready(o, t);
    while !over(o, end) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (clt, cores) in held {
        let up = clt
            .paths()
            .iter()
            .all(|p| p.state() == PathState::Connected);
        t.saw(if up {
            "session still connected at the end"
        } else {
            "session lost during the hold"
        });
        clt.close();
        drop(cores);
    }
}

/// Opens the device read-only and writes it: a refusal is right, a
/// completed write is a breach.
fn ro_write(o: &Opts, t: &mut Tally) {
    t.made += 1;
    let (clt, mut cores) = match open_session(o, &format!("rowrite-{}", std::process::id()), 1) {
        Ok(s) => s,
        Err(e) => return t.saw(format!("session refused: {e}")),
    };
    let mut core = cores.remove(0);
    let sub = match core.submitter() {
        Ok(s) => s,
        Err(e) => return t.saw(format!("no submitter: {e}")),
    };
    let mut rn = RnbdClient::new(&clt, sub);
    rn.set_timeout(Duration::from_secs(5));
    let opened = {
        let mut idle = || {
            core.poll(minstant::Instant::now(), &mut |_| {});
        };
        rn.sess_info(&mut idle)
            .and_then(|_| rn.open(&o.device, AccessMode::Ro, &mut idle))
    };
    let dev = match opened {
        Ok(d) => d,
        Err(e) => return t.saw(format!("open read-only refused: {e}")),
    };
    t.saw("opened read-only");
    let end = deadline(o);
    let mut i = 0u64;
    ready(o, t);
    while !over(o, end) {
        pace(o);
        let Some(mut p) = core.get_permit() else {
            t.saw("no permit");
            break;
        };
        core.buf(&mut p)[..4096].fill(0xa5);
        let off = (i % 16) * 4096;
        i += 1;
        let hdr = rtrs_poll::rnbd::clt::io_hdr(&dev, RnbdOp::Write, off, 4096, 0);
        if let Err((p, e)) = core.write(p, &hdr, 4096, i, minstant::Instant::now()) {
            core.put_permit(p);
            t.saw(format!("write not submitted: {e}"));
            break;
        }
        let start = Instant::now();
        let mut done = None;
        while done.is_none() && start.elapsed() < ANSWER_WAIT {
            core.poll(minstant::Instant::now(), &mut |c| done = Some(c));
        }
        match done {
            Some(c) => {
                let errno = c.errno;
                core.put_permit(c.permit);
                if errno == 0 {
                    t.breach("write to a read-only device completed");
                } else {
                    t.saw(format!("write refused {}", errno_name(errno)));
                }
            }
            None => {
                t.saw("write unanswered");
                break;
            }
        }
    }
    drop(rn);
    clt.close();
    drop(core);
}

fn outside_allow(o: &Opts, t: &mut Tally) {
    let end = deadline(o);
    ready(o, t);
    let mut i = 0u64;
    while !over(o, end) {
        pace(o);
        i += 1;
        t.made += 1;
        match open_session(o, &format!("outside{i}-{}", std::process::id()), 1) {
            Ok((clt, cores)) => {
                t.breach("session opened");
                clt.close();
                drop(cores);
            }
            Err(e) => t.saw(format!("refused: {e}")),
        }
    }
}

/// Against a listener with a pre-shared key (the suite starts it so):
/// every session must be refused before any RTRS byte.
fn no_key(o: &Opts, t: &mut Tally, which: &str) {
    ready(o, t);
    let end = deadline(o);
    let mut i = 0;
    while !over(o, end) {
        i += 1;
        t.made += 1;
        match open_session(o, &format!("{which}{i}-{}", std::process::id()), 1) {
            Ok((clt, cores)) => {
                t.breach(format!(
                    "{which}: a session opened without the listener's key"
                ));
                clt.close();
                drop(cores);
            }
            Err(e) => t.saw(format!("refused: {e}")),
        }
        pace(o);
    }
}

/// Runs the attack and prints what the attacker saw.
pub fn run(o: &Opts) -> Result<(), String> {
    let to = sockaddr(&o.target)?;
    if !(o.secs > 0.0 && o.secs.is_finite()) {
        return Err(format!("--secs {} must be a positive number", o.secs));
    }
    if !(o.rate > 0.0 && o.rate.is_finite()) {
        return Err(format!("--rate {} must be a positive number", o.rate));
    }
    if o.cons == 0 || o.cons >= 4095 {
        return Err(format!("--cons {} must be 1..4094", o.cons));
    }
    let mut t = Tally::default();
    let started = Instant::now();
    match o.attack {
        Attack::Garbage => garbage(o, to, &mut t),
        Attack::Truncated => truncated(o, to, &mut t),
        Attack::Oversized => oversized(o, to, &mut t),
        Attack::CmFuzz => cm_fuzz(o, to, &mut t),
        Attack::Squat => squat(o, to, &mut t),
        Attack::ConnFlood => conn_flood(o, to, &mut t),
        Attack::IdleFlood => idle_flood(o, &mut t),
        Attack::Slowloris => slowloris(o, to, &mut t),
        Attack::RoWrite => ro_write(o, &mut t),
        Attack::OutsideAllow => outside_allow(o, &mut t),
        Attack::NoKey => no_key(o, &mut t, "no-key"),
        Attack::WrongKey => no_key(o, &mut t, "wrong-key"),
    }
    let name = format!("{:?}", o.attack);
    let secs = started.elapsed().as_secs_f64();
    if o.json {
        let v = serde_json::json!({
            "attack": name,
            "secs": secs,
            "made": t.made,
            "seen": t.seen,
            "breaches": t.breaches,
            "notes": t.notes,
        });
        outln!("{v}");
    } else {
        let seen: Vec<String> = t.seen.iter().map(|(k, n)| format!("{n} {k}")).collect();
        outln!(
            "hostile {name}: {} made in {secs:.1} s; saw: {}; breaches: {}{}",
            t.made,
            seen.join(", "),
            t.breaches,
            if t.notes.is_empty() {
                String::new()
            } else {
                format!("; {}", t.notes.join("; "))
            }
        );
    }
    Ok(())
}
