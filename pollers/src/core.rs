//! Pinned run-to-completion cores. A core runs its pollers in a loop: no lock,
//! no syscall, no allocation per iteration; it only counts busy and idle
//! iterations (and their time) with the TSC clock, read lazily: after a busy
//! iteration and every [`IDLE_CLOCK_EVERY`] iterations, so an idle iteration
//! reads no clock (63 of 64 of them). On shutdown it stops taking
//! new work, drains every poller (bounded by a deadline) and reports.
//!
//! ```text
//!   active ──park(now, bell) = Some(until)──> parked   (not polled at all)
//!   active <── woken(now) = None ──────────── parked   asked only when the
//!                                                      core's bell rang or
//!                                                      `until` passed
//! ```
//! A poller with nothing to do for a while (an idle connection) may park: it
//! arranges for a [`Wake`] of the core's [`Bell`] to ring when work comes
//! (e.g. a socket turns readable) and costs the loop nothing until then, so
//! a thousand idle connections do not slow the busy one beside them.

use crate::shutdown::Shutdown;
use crate::{clock, spsc, Full, PollersError};
use minstant::Instant;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A core's doorbell: rung from any thread when one of its parked pollers
/// has work. The core reads it once per iteration (one plain load).
#[derive(Debug, Default)]
pub struct Bell(AtomicBool);

impl Bell {
    fn take(&self) -> bool {
        self.0.load(Ordering::Relaxed) && self.0.swap(false, Ordering::Acquire)
    }
}

/// A parked poller's wake: whoever sees work for it (another thread, a
/// readiness watcher) rings it, which rings its core's bell too.
#[derive(Debug)]
pub struct Wake {
    bell: Arc<Bell>,
    woken: AtomicBool,
}

impl Wake {
    /// A wake that rings `bell`.
    pub fn new(bell: &Arc<Bell>) -> Arc<Wake> {
        Arc::new(Wake {
            bell: bell.clone(),
            woken: AtomicBool::new(false),
        })
    }

    /// There is work: the poller's core looks at it on its next iteration.
    pub fn ring(&self) {
        self.woken.store(true, Ordering::Release);
        self.bell.0.store(true, Ordering::Release);
    }

    /// Whether it rang since the last take (and clears it).
    pub fn take(&self) -> bool {
        self.woken.load(Ordering::Relaxed) && self.woken.swap(false, Ordering::Acquire)
    }
}

/// Work a core does: called in a loop, with a recent time (the core's lazy
/// clock: read after the last busy iteration, or at most
/// [`IDLE_CLOCK_EVERY`] idle iterations ago).
pub trait Poller: Send {
    /// Does what is ready; returns how much work that was (0: nothing). The
    /// core reads the clock after an iteration with work, not after one
    /// without, so a poller must report work it did (a nonzero count).
    fn poll(&mut self, now: Instant) -> usize;
    /// Shutdown: stop taking new work and finish what is in flight. Called in
    /// a loop until it returns true (quiesced) or the drain deadline passes.
    fn drain(&mut self, now: Instant) -> bool {
        let _ = now;
        true
    }
    /// A name for reports.
    fn name(&self) -> &str {
        "poller"
    }
    /// Whether this poller is done for good (e.g. its connection closed): the
    /// core then drops it. Asked every [`FINISHED_CHECK_EVERY`] iterations.
    fn finished(&self) -> bool {
        false
    }
    /// Offered every [`PARK_CHECK_EVERY`] iterations: a poller that has had
    /// nothing to do for a while may park. It arranges for a [`Wake`] of
    /// `bell` to ring when work comes and returns how long it may stay
    /// parked at most; `None` (the default): keep polling it.
    fn park(&mut self, now: Instant, bell: &Arc<Bell>) -> Option<Instant> {
        let _ = (now, bell);
        None
    }
    /// A parked poller, asked when its core's bell rang or its time is up:
    /// `None` to be polled again, or how long it stays parked.
    fn woken(&mut self, now: Instant) -> Option<Instant> {
        let _ = now;
        None
    }
}

/// How often (in loop iterations) a core asks its pollers whether they finished.
pub const FINISHED_CHECK_EVERY: u64 = 1024;

/// How often (in loop iterations) a core offers its pollers to park.
pub const PARK_CHECK_EVERY: u64 = 256;

/// The lazy clock: a core reads the clock after a busy iteration and after
/// every iteration whose number is a multiple of this; an idle iteration
/// otherwise reads none. So a parked poller's deadline is seen at most this
/// many idle iterations late (about a microsecond on an idle core), and the
/// `now` a poller is given may be that old: a poller that needs an exact
/// time (a latency stamp) reads [`clock::now`] itself,
/// when it has work.
pub const IDLE_CLOCK_EVERY: u64 = 64;

const _: () = assert!(PARK_CHECK_EVERY % IDLE_CLOCK_EVERY == 0);

/// What a core measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Loop iterations.
    pub iterations: u64,
    /// Iterations in which some poller did work.
    pub busy_iterations: u64,
    /// Time spent in busy iterations.
    pub busy_ns: u64,
    /// Time spent in idle iterations.
    pub idle_ns: u64,
    /// Times a poller parked (stopped being polled until woken).
    pub parks: u64,
    /// Times a parked poller was polled again.
    pub unparks: u64,
}

impl CoreStats {
    /// Busy share of the time, 0..1.
    pub fn busy_ratio(&self) -> f64 {
        let total = self.busy_ns + self.idle_ns;
        if total == 0 {
            0.0
        } else {
            self.busy_ns as f64 / total as f64
        }
    }
}

/// A core's figures as it runs, published by the core every
/// [`PARK_CHECK_EVERY`] iterations (a few relaxed stores, no lock) for a
/// control thread or an operator to read ([`Cores::live`]).
#[derive(Debug, Default)]
pub struct LiveStats {
    iterations: AtomicU64,
    busy_iterations: AtomicU64,
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    parks: AtomicU64,
    unparks: AtomicU64,
    active: AtomicU64,
    parked: AtomicU64,
}

impl LiveStats {
    fn publish(&self, s: &CoreStats, active: usize, parked: usize) {
        let r = Ordering::Relaxed;
        self.iterations.store(s.iterations, r);
        self.busy_iterations.store(s.busy_iterations, r);
        self.busy_ns.store(s.busy_ns, r);
        self.idle_ns.store(s.idle_ns, r);
        self.parks.store(s.parks, r);
        self.unparks.store(s.unparks, r);
        self.active.store(active as u64, r);
        self.parked.store(parked as u64, r);
    }

    /// The loop accounting as last published.
    pub fn stats(&self) -> CoreStats {
        let r = Ordering::Relaxed;
        CoreStats {
            iterations: self.iterations.load(r),
            busy_iterations: self.busy_iterations.load(r),
            busy_ns: self.busy_ns.load(r),
            idle_ns: self.idle_ns.load(r),
            parks: self.parks.load(r),
            unparks: self.unparks.load(r),
        }
    }

    /// Pollers polled every iteration, and parked ones, as last published.
    pub fn pollers(&self) -> (u64, u64) {
        let r = Ordering::Relaxed;
        (self.active.load(r), self.parked.load(r))
    }
}

/// How a core thread is scheduled against other work on its CPU.
///
/// A core never sleeps, so whatever else runs on its CPU waits for the
/// scheduler to take the CPU from it. On an isolated CPU nothing else runs
/// and the choice does not matter. Where the CPU is shared with work the
/// data path itself needs -- soft-RoCE's requester, responder and completion
/// tasklets (ksoftirqd), a NIC's interrupts and softirqs, the kernel client's
/// completion work when the peer is the kernel on the same host, a VM's
/// vCPU -- [`CoreSched::Idle`] lets that work run the moment it is ready
/// instead of after a scheduler tick, and the core takes the rest of the
/// CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CoreSched {
    /// An ordinary thread (SCHED_OTHER, the caller's nice): shares its CPU
    /// fairly with other threads there.
    #[default]
    Normal,
    /// SCHED_IDLE: any other runnable thread on the CPU (ksoftirqd, a
    /// kworker, an application thread) preempts the core at once; the core
    /// runs whenever the CPU would otherwise idle. Unprivileged.
    Idle,
}

impl CoreSched {
    /// The policy's name as flags and configs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            CoreSched::Normal => "normal",
            CoreSched::Idle => "idle",
        }
    }

    /// Applies the policy to the calling thread (a no-op for `Normal`).
    pub fn apply(self) -> std::io::Result<()> {
        match self {
            CoreSched::Normal => Ok(()),
            CoreSched::Idle => {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: sched_setscheduler reads `param` (a valid local)
                // and changes only the calling thread's (pid 0) policy.
                let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
        }
    }
}

impl std::str::FromStr for CoreSched {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(CoreSched::Normal),
            "idle" => Ok(CoreSched::Idle),
            _ => Err(format!("poll sched {s:?}: expected normal or idle")),
        }
    }
}

impl std::fmt::Display for CoreSched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A core's report when it stops.
#[derive(Clone, Debug)]
pub struct CoreReport {
    /// The CPU it asked for.
    pub cpu: usize,
    /// Whether pinning worked.
    pub pinned: bool,
    /// Loop accounting.
    pub stats: CoreStats,
    /// Work done per poller, by name.
    pub pollers: Vec<(String, u64)>,
    /// Whether every poller drained before the deadline.
    pub drained: bool,
}

type Factory = Arc<dyn Fn(usize) -> Vec<Box<dyn Poller>> + Send + Sync>;

/// Runs pollers on the calling thread until `stop` is set; then drains.
pub fn run_core(
    cpu: usize,
    pollers: Vec<Box<dyn Poller>>,
    adds: Option<spsc::Consumer<Box<dyn Poller>>>,
    stop: &Shutdown,
    drain_deadline: Duration,
) -> CoreReport {
    run_core_live(cpu, pollers, adds, stop, drain_deadline, None)
}

/// [`run_core`], publishing its figures to `live` as it runs.
pub fn run_core_live(
    cpu: usize,
    pollers: Vec<Box<dyn Poller>>,
    mut adds: Option<spsc::Consumer<Box<dyn Poller>>>,
    stop: &Shutdown,
    drain_deadline: Duration,
    live: Option<&LiveStats>,
) -> CoreReport {
    let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    if !pinned {
        tracing::warn!("core {cpu}: could not pin; running unpinned");
    }
    let mut active: Vec<(Box<dyn Poller>, u64)> = pollers.into_iter().map(|p| (p, 0)).collect();
    let mut parked: Vec<(Box<dyn Poller>, u64, Instant)> = Vec::new();
    room_for_all(&mut active, &mut parked, 16);
    let bell = Arc::new(Bell::default());
    let mut stats = CoreStats::default();
    // The lazy clock: `last` is the last clock read, `now` the time the
    // pollers are given (that read). The clock is read after a busy
    // iteration and after every IDLE_CLOCK_EVERY-th iteration, no more.
    let mut last = clock::now();
    let mut now = last;
    // Idle iterations since `last`, and what one costs (picoseconds,
    // measured over idle-only spans) to split a busy span.
    let mut idle_since_read = 0u64;
    let mut idle_iter_ps = 0u64;
    // When the earliest parked poller's time is up.
    let mut next_wake: Option<Instant> = None;
    while !stop.is_set() {
        if let Some(rx) = adds.as_mut() {
            // Rare: a poller added at runtime (allocated by the sender).
            while let Some(p) = rx.pop() {
                active.push((p, 0));
                room_for_all(&mut active, &mut parked, 1);
            }
        }
        let mut did = 0;
        for (p, w) in active.iter_mut() {
            let n = p.poll(now);
            *w += n as u64;
            did += n;
        }
        stats.iterations += 1;
        if did > 0 {
            let t = clock::now();
            let spent = t.saturating_duration_since(last).as_nanos() as u64;
            // The idle iterations before this one since the last read, at
            // their measured cost; the rest is this busy iteration's.
            let idle = (idle_since_read.saturating_mul(idle_iter_ps) / 1000).min(spent);
            stats.busy_iterations += 1;
            stats.busy_ns += spent - idle;
            stats.idle_ns += idle;
            idle_since_read = 0;
            last = t;
            now = t;
        } else if stats.iterations % IDLE_CLOCK_EVERY == 0 {
            let t = clock::now();
            let spent = t.saturating_duration_since(last).as_nanos() as u64;
            idle_since_read += 1;
            stats.idle_ns += spent;
            let ps = spent.saturating_mul(1000) / idle_since_read;
            idle_iter_ps = if idle_iter_ps == 0 {
                ps
            } else {
                (idle_iter_ps * 3 + ps) / 4
            };
            idle_since_read = 0;
            last = t;
            now = t;
        } else {
            // Idle: no clock. `now` stays the last read.
            idle_since_read += 1;
        }
        // PARK_CHECK_EVERY is a multiple of IDLE_CLOCK_EVERY: `now` is fresh.
        if stats.iterations % PARK_CHECK_EVERY == 0 {
            if let Some(l) = live {
                l.publish(&stats, active.len(), parked.len());
            }
            let mut i = 0;
            while i < active.len() {
                match active[i].0.park(now, &bell) {
                    Some(until) => {
                        let (p, w) = active.swap_remove(i);
                        parked.push((p, w, until));
                        next_wake = Some(next_wake.map_or(until, |t| t.min(until)));
                        stats.parks += 1;
                    }
                    None => i += 1,
                }
            }
        }
        if !parked.is_empty() && (bell.take() || next_wake.is_some_and(|t| now >= t)) {
            next_wake = None;
            let mut i = 0;
            while i < parked.len() {
                match parked[i].0.woken(now) {
                    Some(until) => {
                        parked[i].2 = until;
                        next_wake = Some(next_wake.map_or(until, |t| t.min(until)));
                        i += 1;
                    }
                    None => {
                        let (p, w, _) = parked.swap_remove(i);
                        active.push((p, w));
                        stats.unparks += 1;
                    }
                }
            }
        }
        if stats.iterations % FINISHED_CHECK_EVERY == 0 {
            // Rare: retire finished pollers (their memory is freed here, off
            // the per-iteration path).
            active.retain(|(p, _)| !p.finished());
            parked.retain(|(p, _, _)| !p.finished());
        }
    }
    if let Some(l) = live {
        l.publish(&stats, active.len(), parked.len());
    }
    active.extend(parked.drain(..).map(|(p, w, _)| (p, w)));
    let deadline = Instant::now() + drain_deadline;
    let mut drained = false;
    while Instant::now() < deadline {
        let now = Instant::now();
        let mut all = true;
        for (p, _) in active.iter_mut() {
            all &= p.drain(now);
        }
        if all {
            drained = true;
            break;
        }
    }
    CoreReport {
        cpu,
        pinned,
        stats,
        pollers: active
            .iter()
            .map(|(p, w)| (p.name().to_string(), *w))
            .collect(),
        drained,
    }
}

/// Makes room in both lists for every poller plus `extra`, so moving one
/// between them never allocates in the loop.
fn room_for_all(
    active: &mut Vec<(Box<dyn Poller>, u64)>,
    parked: &mut Vec<(Box<dyn Poller>, u64, Instant)>,
    extra: usize,
) {
    let total = active.len() + parked.len() + extra;
    active.reserve(total.saturating_sub(active.len()));
    parked.reserve(total.saturating_sub(parked.len()));
}

/// A set of running cores.
///
/// ```
/// use minstant::Instant;
/// use pollers::{Cores, Poller, Shutdown};
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// /// Work to run to completion on a core: here, counting to 1000.
/// struct Counter(Arc<AtomicU64>);
/// impl Poller for Counter {
///     fn poll(&mut self, _now: Instant) -> usize {
///         let n = self.0.load(Ordering::Relaxed);
///         if n == 1000 {
///             return 0; // nothing to do: an idle iteration
///         }
///         self.0.store(n + 1, Ordering::Relaxed);
///         1
///     }
///     fn name(&self) -> &str {
///         "counter"
///     }
/// }
///
/// let count = Arc::new(AtomicU64::new(0));
/// // One core, pinned to CPU 0; its pollers are made on its own thread.
/// let mut cores = Cores::launch(&[0], Shutdown::new(), Duration::from_secs(1), |_| Vec::new())?;
/// // Pollers can also be handed over while it runs (a ring, no lock).
/// assert!(cores.add(0, Box::new(Counter(count.clone()))).is_ok(), "room in the ring");
/// while count.load(Ordering::Relaxed) < 1000 {
///     std::thread::yield_now();
/// }
/// let reports = cores.stop(); // stops, drains, reports
/// assert_eq!(reports[0].pollers, vec![("counter".to_string(), 1000)]);
/// assert!(reports[0].stats.busy_iterations >= 1000);
/// # Ok::<(), pollers::PollersError>(())
/// ```
pub struct Cores {
    handles: Vec<std::thread::JoinHandle<CoreReport>>,
    adds: Vec<spsc::Producer<Box<dyn Poller>>>,
    live: Vec<Arc<LiveStats>>,
    stop: Shutdown,
}

impl std::fmt::Debug for Cores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cores({})", self.handles.len())
    }
}

impl Cores {
    /// Starts one thread per entry of `cpus`, pinned to it. `make(i)` builds
    /// core `i`'s pollers on that core's own thread (so its memory is local).
    pub fn launch(
        cpus: &[usize],
        stop: Shutdown,
        drain_deadline: Duration,
        make: impl Fn(usize) -> Vec<Box<dyn Poller>> + Send + Sync + 'static,
    ) -> Result<Cores, PollersError> {
        Cores::launch_sched(cpus, CoreSched::Normal, stop, drain_deadline, make)
    }

    /// [`Cores::launch`], each core thread scheduled as `sched` says. A
    /// policy that cannot be applied is logged (once per core) and the core
    /// runs as an ordinary thread.
    pub fn launch_sched(
        cpus: &[usize],
        sched: CoreSched,
        stop: Shutdown,
        drain_deadline: Duration,
        make: impl Fn(usize) -> Vec<Box<dyn Poller>> + Send + Sync + 'static,
    ) -> Result<Cores, PollersError> {
        let make: Factory = Arc::new(make);
        let mut handles = Vec::new();
        let mut adds = Vec::new();
        let mut lives = Vec::new();
        for (i, &cpu) in cpus.iter().enumerate() {
            let (tx, rx) = spsc::channel(16);
            let (make, stop2) = (make.clone(), stop.clone());
            let live = Arc::new(LiveStats::default());
            let l2 = live.clone();
            let h = std::thread::Builder::new()
                .name(format!("rtrs-core{i}"))
                .spawn(move || {
                    if let Err(e) = sched.apply() {
                        tracing::warn!("core {i}: cannot schedule as {sched}: {e}; running normal");
                    }
                    run_core_live(cpu, make(i), Some(rx), &stop2, drain_deadline, Some(&l2))
                })
                .map_err(PollersError::Spawn)?;
            handles.push(h);
            adds.push(tx);
            lives.push(live);
        }
        Ok(Cores {
            handles,
            adds,
            live: lives,
            stop,
        })
    }

    /// Hands a new poller to core `i` (it starts on that core's next iteration).
    pub fn add(&mut self, i: usize, p: Box<dyn Poller>) -> Result<(), Full<Box<dyn Poller>>> {
        match self.adds.get_mut(i) {
            Some(tx) => tx.push(p),
            None => Err(Full(p)),
        }
    }

    /// Core `i`'s figures as it runs (published every
    /// [`PARK_CHECK_EVERY`] iterations).
    pub fn live(&self, i: usize) -> Option<Arc<LiveStats>> {
        self.live.get(i).cloned()
    }

    /// How many cores run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether no core runs.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops every core, waits for them to drain, and returns their reports.
    pub fn stop(self) -> Vec<CoreReport> {
        self.stop.trigger();
        self.join()
    }

    /// Waits for the cores to stop (after the shutdown was triggered).
    pub fn join(self) -> Vec<CoreReport> {
        self.handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Counter {
        left: u64,
        inflight: u64,
        done: Arc<AtomicU64>,
    }

    impl Poller for Counter {
        fn poll(&mut self, _now: Instant) -> usize {
            if self.left > 0 {
                self.left -= 1;
                self.inflight += 1;
            }
            if self.inflight > 0 && self.left % 2 == 0 {
                self.inflight -= 1;
                self.done.fetch_add(1, Ordering::Relaxed);
                return 1;
            }
            0
        }
        fn drain(&mut self, _now: Instant) -> bool {
            // Stop taking work; finish what is in flight.
            self.left = 0;
            if self.inflight > 0 {
                self.inflight -= 1;
                self.done.fetch_add(1, Ordering::Relaxed);
            }
            self.inflight == 0
        }
        fn name(&self) -> &str {
            "counter"
        }
    }

    /// The calling thread's policy number, as /proc shows it.
    fn policy() -> Option<i32> {
        let s = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = s.lines().find(|l| l.starts_with("policy"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    /// Reports its thread's policy once.
    struct Policy(Arc<std::sync::Mutex<Option<Option<i32>>>>);
    impl Poller for Policy {
        fn poll(&mut self, _now: Instant) -> usize {
            let mut g = self.0.lock().unwrap();
            if g.is_none() {
                *g = Some(policy());
            }
            0
        }
    }

    #[test]
    fn cores_take_the_sched_policy_they_are_given() {
        for (sched, want) in [
            (CoreSched::Idle, libc::SCHED_IDLE),
            (CoreSched::Normal, libc::SCHED_OTHER),
        ] {
            let seen = Arc::new(std::sync::Mutex::new(None));
            let s2 = seen.clone();
            let cores = Cores::launch_sched(
                &[0],
                sched,
                Shutdown::new(),
                Duration::from_secs(1),
                move |_| vec![Box::new(Policy(s2.clone())) as Box<dyn Poller>],
            )
            .unwrap();
            while seen.lock().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            cores.stop();
            assert_eq!(*seen.lock().unwrap(), Some(Some(want)), "{sched}");
        }
        assert_eq!("idle".parse::<CoreSched>(), Ok(CoreSched::Idle));
        assert_eq!("normal".parse::<CoreSched>(), Ok(CoreSched::Normal));
        assert!("fifo".parse::<CoreSched>().is_err());
    }

    #[test]
    fn cores_run_drain_and_report() {
        let stop = Shutdown::new();
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        let mut cores = Cores::launch(&[0, 1], stop.clone(), Duration::from_secs(1), move |_| {
            vec![Box::new(Counter {
                left: 1_000_000,
                inflight: 0,
                done: d.clone(),
            }) as Box<dyn Poller>]
        })
        .unwrap();
        let d2 = done.clone();
        cores
            .add(
                0,
                Box::new(Counter {
                    left: 10,
                    inflight: 0,
                    done: d2,
                }),
            )
            .map_err(|_| "full")
            .unwrap();
        // Until both cores have run and the added poller is done: on a
        // loaded host a core thread may not run for a while after launch.
        let t0 = std::time::Instant::now();
        while !(done.load(Ordering::Relaxed) >= 10
            && (0..2).all(|i| cores.live(i).is_some_and(|l| l.stats().iterations > 0)))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the cores never ran"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let reports = cores.stop();
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert!(r.drained, "{r:?}");
            assert!(r.stats.iterations > 0);
            assert!(r.stats.busy_iterations <= r.stats.iterations);
            assert!(r.stats.busy_ratio() <= 1.0);
        }
        let work: u64 = reports
            .iter()
            .flat_map(|r| r.pollers.iter().map(|p| p.1))
            .sum();
        assert!(work > 0);
        assert!(!reports[0].pollers.is_empty());
        assert!(done.load(Ordering::Relaxed) >= work);
    }

    /// Parks at once (for an hour, or `nap` when given) each time it is
    /// offered, and publishes its wake.
    struct Sleeper {
        polls: Arc<AtomicU64>,
        woken_calls: Arc<AtomicU64>,
        wake: Arc<std::sync::Mutex<Option<Arc<Wake>>>>,
        nap: Option<Duration>,
    }

    impl Poller for Sleeper {
        fn poll(&mut self, _now: Instant) -> usize {
            self.polls.fetch_add(1, Ordering::Relaxed);
            0
        }
        fn park(&mut self, now: Instant, bell: &Arc<Bell>) -> Option<Instant> {
            let w = Wake::new(bell);
            *self.wake.lock().unwrap() = Some(w);
            Some(now + self.nap.unwrap_or(Duration::from_secs(3600)))
        }
        fn woken(&mut self, now: Instant) -> Option<Instant> {
            self.woken_calls.fetch_add(1, Ordering::Relaxed);
            let rang = self.wake.lock().unwrap().as_ref().is_some_and(|w| w.take());
            match self.nap {
                // A timed nap: back when its time is up.
                Some(_) => None,
                // Parked until rung; a bell for another poller is ignored.
                None if rang => None,
                None => Some(now + Duration::from_secs(3600)),
            }
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn parked_pollers_are_not_polled_until_rung() {
        let stop = Shutdown::new();
        let (polls, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let wake = Arc::new(std::sync::Mutex::new(None));
        let (p2, c2, w2) = (polls.clone(), calls.clone(), wake.clone());
        let mut cores = Cores::launch(&[0], stop, Duration::from_secs(1), |_| Vec::new()).unwrap();
        cores
            .add(
                0,
                Box::new(Sleeper {
                    polls: p2,
                    woken_calls: c2,
                    wake: w2,
                    nap: None,
                }),
            )
            .map_err(|_| "full")
            .unwrap();
        wait_for("parked", || wake.lock().unwrap().is_some());
        // The core publishes its figures as it runs.
        let live = cores.live(0).unwrap();
        wait_for("published as parked", || live.pollers() == (0, 1));
        let it = live.stats().iterations;
        assert!(live.stats().parks >= 1);
        wait_for("iterations published", || live.stats().iterations > it);
        assert!(cores.live(1).is_none());
        let before = polls.load(Ordering::Relaxed);
        // Parked: many core iterations go by and it is never polled.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(polls.load(Ordering::Relaxed), before);
        assert_eq!(calls.load(Ordering::Relaxed), 0);
        wake.lock().unwrap().as_ref().unwrap().ring();
        wait_for("polled after the ring", || {
            polls.load(Ordering::Relaxed) > before
        });
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        let r = cores.stop();
        assert!(r[0].stats.parks >= 1 && r[0].stats.unparks >= 1, "{r:?}");
        assert_eq!(r[0].pollers.len(), 1, "a parked poller is still reported");
    }

    #[test]
    fn a_parked_poller_comes_back_when_its_time_is_up() {
        let stop = Shutdown::new();
        let (polls, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let wake = Arc::new(std::sync::Mutex::new(None));
        let (p2, c2, w2) = (polls.clone(), calls.clone(), wake.clone());
        let cores = Cores::launch(&[0], stop, Duration::from_secs(1), move |_| {
            vec![Box::new(Sleeper {
                polls: p2.clone(),
                woken_calls: c2.clone(),
                wake: w2.clone(),
                nap: Some(Duration::from_millis(2)),
            }) as Box<dyn Poller>]
        })
        .unwrap();
        // Never rung: it parks, its time runs out, it is polled, it parks...
        wait_for("three naps", || calls.load(Ordering::Relaxed) >= 3);
        let r = cores.stop();
        assert!(r[0].stats.unparks >= 3, "{r:?}");
    }

    /// Polled `limit` times, then stops its core; works every `every`-th
    /// poll (0: never).
    struct Scripted {
        polls: u64,
        limit: u64,
        every: u64,
        stop: Shutdown,
    }

    impl Poller for Scripted {
        fn poll(&mut self, _now: Instant) -> usize {
            self.polls += 1;
            if self.polls == self.limit {
                self.stop.trigger();
            }
            usize::from(self.every > 0 && self.polls % self.every == 0)
        }
    }

    /// Runs a core on this thread for `limit` iterations of two pollers,
    /// one idle and one working every `every`-th poll; returns the clock
    /// reads of the loop and its stats.
    fn clock_reads(limit: u64, every: u64) -> (u64, CoreStats) {
        let stop = Shutdown::new();
        let pollers: Vec<Box<dyn Poller>> = vec![
            Box::new(Scripted {
                polls: 0,
                limit,
                every: 0,
                stop: stop.clone(),
            }),
            Box::new(Scripted {
                polls: 0,
                limit: 0,
                every,
                stop: stop.clone(),
            }),
        ];
        // A thread of its own: the count is per thread, and the pin too.
        std::thread::spawn(move || {
            let before = clock::reads();
            let r = run_core(0, pollers, None, &stop, Duration::from_millis(100));
            (clock::reads() - before, r.stats)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn an_idle_iteration_reads_no_clock() {
        let n = 64 * 1000;
        let (reads, stats) = clock_reads(n, 0);
        assert_eq!(stats.iterations, n);
        assert_eq!(stats.busy_iterations, 0);
        // One read to start, then one per IDLE_CLOCK_EVERY iterations.
        assert!(
            reads <= 1 + n / IDLE_CLOCK_EVERY,
            "{reads} clock reads in {n} idle iterations"
        );
        assert!(stats.idle_ns > 0 && stats.busy_ns == 0, "{stats:?}");
    }

    #[test]
    fn a_busy_iteration_reads_the_clock_once() {
        let n = 64 * 1000;
        let (reads, stats) = clock_reads(n, 1);
        assert_eq!(stats.busy_iterations, n);
        assert_eq!(reads, 1 + n, "one read to start, one per busy iteration");
        assert!(stats.busy_ns > 0, "{stats:?}");
        // One busy iteration in ten: a read for each, and the idle ones
        // between them read none (but every IDLE_CLOCK_EVERY-th).
        let (reads, stats) = clock_reads(n, 10);
        assert_eq!(stats.busy_iterations, n / 10);
        assert!(reads <= 1 + n / 10 + n / IDLE_CLOCK_EVERY, "{reads} reads");
        assert!(stats.busy_ns > 0 && stats.idle_ns > 0, "{stats:?}");
    }

    #[test]
    fn the_loop_reads_the_clock_only_through_the_counted_one() {
        // The loop of run_core_live, up to its drain: a direct TSC read in
        // it would not be counted by the tests above.
        let src = include_str!("core.rs");
        let start = src.find("pub fn run_core_live(").unwrap();
        let end = start + src[start..].find("let deadline = ").unwrap();
        let direct = ["Instant", "::now()"].concat();
        assert!(
            !src[start..end].contains(&direct),
            "the poll loop reads the clock directly"
        );
    }
}
