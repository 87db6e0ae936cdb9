//! The engine on virtual time: servers and clients over shared memory
//! wrapped in the fault fabric, every control stepped (no control thread)
//! and every connection polled from the test's one thread, at a time the
//! test moves. Nothing sleeps and nothing reads the wall clock for the
//! protocol: a heartbeat's 30 s take a few milliseconds of test, and a run
//! does the same thing whatever else the machine is doing.
//!
//! ```text
//!  Sim.t ──> each turn: server controls, server connections (the cores'
//!            pollers), client controls, client cores; all at t
//!        ──> then t moves: not at all after a control did something (a
//!            handshake's messages cross at once), 1 ms after IO only,
//!            else to the next deadline any control gave (at most 100 ms
//!            on); the fault clock with it (held completions, delayed CM
//!            events)
//! ```

#![allow(dead_code)]

use super::engine::{usr, Ram, OP_IO};
use minstant::Instant;
use pollers::{Poller, Stepper};
use rtrs_fabric::fault::{Clock, FaultFabric, Faults};
use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::Address;
use rtrs_poll::clt::{Client, CltConfig, CltCore, CltEvent, Completion, Events, IoPermit};
use rtrs_poll::srv::{Server, SrvConfig, SrvEvent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The fabric of every party: shm under the fault wrapper.
pub type SimFabric = FaultFabric<ShmFabric>;

/// A turn with IO moves the clock this much (IO cares for no deadline:
/// coarser steps only thin out the turns of a long run).
const BUSY_STEP: Duration = Duration::from_millis(5);
/// An idle turn moves it to the next deadline, at most this far.
const IDLE_STEP_MAX: Duration = Duration::from_millis(100);
/// Turns in a row at one time before it moves anyway (a control that
/// keeps finding work must not stop the clock).
const SAME_TIME_TURNS: u32 = 64;

/// A server: its stepped control, its IO connections, its RAM disk.
pub struct SimServer {
    pub srv: Option<Server<SimFabric, Ram>>,
    ctl: Option<Stepper>,
    cons: Arc<Mutex<Vec<Box<dyn Poller>>>>,
    pub disk: Arc<Mutex<Vec<u8>>>,
    pub events: std::sync::mpsc::Receiver<SrvEvent>,
    pub addrs: Vec<Address>,
}

/// A client: its stepped control, its cores, what completed on them.
pub struct SimClient {
    pub clt: Client<SimFabric>,
    ctl: Option<Stepper>,
    pub cores: Vec<CltCore<SimFabric>>,
    pub events: Events,
    pub done: Vec<Completion>,
    /// Writes in flight: tag -> (offset, the server it went to).
    pub inflight: HashMap<u64, (u64, usize)>,
    next_tag: u64,
}

/// The world: parties, the virtual time, the faults.
pub struct Sim {
    pub faults: Faults,
    pub t: Instant,
    t0: Instant,
    pub servers: Vec<Option<SimServer>>,
    pub clients: Vec<Option<SimClient>>,
    pub turns: u64,
    /// Turns in a row at this `t`.
    same_t: u32,
}

/// What a turn did: the connections' work and the controls'.
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    pub io: usize,
    pub control: usize,
}

impl Default for Sim {
    fn default() -> Self {
        Self::new()
    }
}

impl Sim {
    /// An empty world at virtual time 0, its fault clock manual.
    pub fn new() -> Sim {
        let t = Instant::now();
        Sim {
            faults: Faults::with_clock(Clock::manual()),
            t,
            t0: t,
            servers: Vec::new(),
            clients: Vec::new(),
            turns: 0,
            same_t: 0,
        }
    }

    /// A fabric of this world's (each party its own, one `Faults`).
    pub fn fabric(&self) -> SimFabric {
        FaultFabric::new(ShmFabric::new(), self.faults.clone())
    }

    /// Virtual time since the world began.
    pub fn elapsed(&self) -> Duration {
        self.t.saturating_duration_since(self.t0)
    }

    /// A server listening on `addrs` with a RAM disk of `disk_len` bytes.
    pub fn add_server(&mut self, addrs: &[Address], cfg: SrvConfig, disk_len: usize) -> usize {
        let disk = Arc::new(Mutex::new(vec![0u8; disk_len]));
        let d = disk.clone();
        let cons: Arc<Mutex<Vec<Box<dyn Poller>>>> = Arc::default();
        let c2 = cons.clone();
        let (srv, mut ctl) = Server::listen_stepped(
            &self.fabric(),
            &addrs[0],
            cfg,
            move |_: &rtrs_poll::srv::ConInfo| Ram::new(d.clone()),
            Box::new(move |_cid, p| {
                c2.lock().unwrap().push(p);
                Ok(())
            }),
            self.t,
        )
        .unwrap();
        // listen_also waits for the control's answer: asked from a thread
        // of its own while this one steps the control (setup only).
        std::thread::scope(|s| {
            let asked = s.spawn(|| {
                for a in &addrs[1..] {
                    srv.listen_also(a).unwrap();
                }
            });
            while !asked.is_finished() {
                ctl.step(self.t);
                std::thread::yield_now();
            }
        });
        let events = srv.subscribe();
        self.servers.push(Some(SimServer {
            srv: Some(srv),
            ctl: Some(ctl),
            cons,
            disk,
            events,
            addrs: addrs.to_vec(),
        }));
        self.servers.len() - 1
    }

    /// Kills server `i` as a crash does: nothing is closed in order, its
    /// connections vanish (the peers' CMs see their sockets close).
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut s) = self.servers[i].take() {
            if let Some(c) = s.ctl.take() {
                c.abort();
            }
            s.cons.lock().unwrap().clear();
            drop(s.srv.take());
        }
    }

    /// Opens a client session (stepping the world until it is open, at
    /// most `limit` of virtual time).
    pub fn open_client(&mut self, cfg: CltConfig, limit: Duration) -> Result<usize, String> {
        let (mut opening, ctl) =
            Client::open_stepped(&self.fabric(), cfg, self.t).map_err(|e| e.to_string())?;
        let mut ctl = Some(ctl);
        let end = self.t + limit;
        let opened = loop {
            let mut w = self.turn();
            if let Some(c) = ctl.as_mut() {
                w.control += c.step(self.t);
            }
            if let Some(r) = opening.poll() {
                break r.map_err(|e| e.to_string())?;
            }
            if self.t > end {
                return Err(format!("not open within {limit:?}"));
            }
            let extra = ctl.as_ref().and_then(|c| c.poll_timeout());
            self.advance(w, extra);
        };
        let (clt, cores) = opened;
        let events = clt.subscribe();
        self.clients.push(Some(SimClient {
            clt,
            ctl,
            cores,
            events,
            done: Vec::new(),
            inflight: HashMap::new(),
            next_tag: 1,
        }));
        Ok(self.clients.len() - 1)
    }

    /// Closes client `i` (its control stops: every path closes).
    pub fn close_client(&mut self, i: usize) {
        if let Some(mut c) = self.clients[i].take() {
            c.cores.clear();
            if let Some(ctl) = c.ctl.take() {
                ctl.stop(self.t);
            }
        }
    }

    /// One turn at `t`: every control and connection once.
    pub fn turn(&mut self) -> Work {
        self.turns += 1;
        let t = self.t;
        let mut w = Work::default();
        for s in self.servers.iter_mut().flatten() {
            if let Some(c) = s.ctl.as_mut() {
                w.control += c.step(t);
            }
            let mut cons = s.cons.lock().unwrap();
            for p in cons.iter_mut() {
                w.io += p.poll(t);
            }
            cons.retain(|p| !p.finished());
        }
        for c in self.clients.iter_mut().flatten() {
            if let Some(ctl) = c.ctl.as_mut() {
                w.control += ctl.step(t);
            }
            let done = &mut c.done;
            for core in &mut c.cores {
                w.io += core.poll(t, &mut |x| done.push(x));
            }
        }
        w
    }

    /// Moves the clock (see the crate doc): not after control work (up to
    /// `SAME_TIME_TURNS` turns), `BUSY_STEP` after IO, else to the next
    /// deadline (of the controls, or `extra`), at least `BUSY_STEP` and at
    /// most `IDLE_STEP_MAX` on.
    fn advance(&mut self, w: Work, extra: Option<Instant>) {
        if w.control > 0 && self.same_t < SAME_TIME_TURNS {
            self.same_t += 1;
            return;
        }
        self.same_t = 0;
        let dt = if w.io > 0 || w.control > 0 {
            BUSY_STEP
        } else {
            let next = self
                .servers
                .iter()
                .flatten()
                .filter_map(|s| s.ctl.as_ref().and_then(Stepper::poll_timeout))
                .chain(
                    self.clients
                        .iter()
                        .flatten()
                        .filter_map(|c| c.ctl.as_ref().and_then(Stepper::poll_timeout)),
                )
                .chain(extra)
                .chain(self.faults.clock().next_due().map(|d| self.t + d))
                .min();
            next.map_or(IDLE_STEP_MAX, |n| n.saturating_duration_since(self.t))
                .clamp(BUSY_STEP, IDLE_STEP_MAX)
        };
        self.t += dt;
        self.faults.clock().advance(dt);
    }

    /// Turns until `done` says so; returns the virtual time it took, or
    /// `None` after `limit`.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&mut Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.t;
        loop {
            let w = self.turn();
            if done(self) {
                return Some(self.t.saturating_duration_since(start));
            }
            if self.t.saturating_duration_since(start) > limit {
                return None;
            }
            self.advance(w, None);
        }
    }

    /// Turns for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    /// Client `i`, which must be open.
    pub fn client(&mut self, i: usize) -> &mut SimClient {
        self.clients[i].as_mut().expect("an open client")
    }

    /// Keeps `qd` verified writes of `bs` bytes in flight on client `i`
    /// core 0 over `blocks` blocks of its own (client `i`'s start at
    /// `i * blocks` blocks: sessions never share a block), and checks each one that
    /// completes against the disk of the server it went to (`srv`, when it
    /// was issued; a server killed since took its disk with it); returns
    /// how many completed, and how many of them with an error.
    pub fn write_io(
        &mut self,
        i: usize,
        srv: usize,
        qd: usize,
        bs: u32,
        blocks: u64,
    ) -> (u64, u64) {
        let disks: Vec<Option<Arc<Mutex<Vec<u8>>>>> = self
            .servers
            .iter()
            .map(|s| s.as_ref().map(|s| s.disk.clone()))
            .collect();
        let now = self.t;
        let c = self.client(i);
        let mut ok = 0;
        let mut failed = 0;
        for d in std::mem::take(&mut c.done) {
            let Some((off, to)) = c.inflight.remove(&d.tag) else {
                panic!(
                    "a completion of an IO not in flight (tag {}): completed twice?",
                    d.tag
                );
            };
            if d.errno == 0 {
                ok += 1;
                if let Some(disk) = &disks[to] {
                    let want = block(bs, d.tag);
                    let g = disk.lock().unwrap();
                    let have = &g[off as usize..off as usize + bs as usize];
                    assert!(
                        have == &want[..],
                        "block at {off}: not what write {} put there (it has write {}'s)",
                        d.tag,
                        u64::from_le_bytes(have[..8].try_into().unwrap())
                    );
                }
            } else {
                failed += 1;
            }
            c.cores[0].put_permit(d.permit);
        }
        // One write per block at a time: two in flight to one block may
        // land in either order (a failed-over one comes later), and RTRS
        // promises no order between them.
        while c.inflight.len() < qd.min(blocks as usize) {
            let busy: Vec<u64> = c.inflight.values().map(|&(o, _)| o).collect();
            let tag = c.next_tag;
            c.next_tag += 1;
            let off = (i as u64 * blocks + tag % blocks) * u64::from(bs);
            if busy.contains(&off) {
                continue;
            }
            let Some(mut p) = c.cores[0].get_permit() else {
                break;
            };
            let data = block(bs, tag);
            c.cores[0].buf(&mut p)[..bs as usize].copy_from_slice(&data);
            match c.cores[0].write(p, &usr(OP_IO, off), bs, tag, now) {
                Ok(()) => {
                    c.inflight.insert(tag, (off, srv));
                }
                Err((p, _)) => {
                    c.cores[0].put_permit(p);
                    break;
                }
            }
        }
        (ok, failed)
    }
}

/// A block of `bs` bytes that names its write: the tag, repeated.
fn block(bs: u32, tag: u64) -> Vec<u8> {
    tag.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(bs as usize)
        .collect()
}

impl SimClient {
    /// The events so far.
    pub fn take_events(&mut self) -> Vec<CltEvent> {
        self.events.try_iter().collect()
    }

    /// A permit back to the pool.
    pub fn put(&mut self, p: IoPermit) {
        self.cores[0].put_permit(p);
    }
}

/// A client config for `name` to `paths` with the kernel's timings (5 s
/// heartbeats, 5 missed, 30 s reconnect delay, 1 s backoff).
pub fn kernel_cfg(name: &str, paths: Vec<Address>) -> CltConfig {
    let mut cc = CltConfig::new(name, paths);
    cc.connect_timeout = Duration::from_secs(10);
    // Reproducible: the seed from the name.
    cc.seed = Some(name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }));
    cc
}

/// A small server config (16 chunks of 8 KiB), the kernel's heartbeat.
pub fn small_srv() -> SrvConfig {
    SrvConfig {
        queue_depth: 16,
        max_chunk_size: 8192,
        ..SrvConfig::default()
    }
}
