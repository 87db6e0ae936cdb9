//! Pinned run-to-completion cores. A core runs its pollers in a loop: no lock,
//! no syscall, no allocation per iteration; it only counts busy and idle
//! iterations (and their time) with the TSC clock. On shutdown it stops taking
//! new work, drains every poller (bounded by a deadline) and reports.

use crate::shutdown::Shutdown;
use crate::{spsc, Full, PollersError};
use minstant::Instant;
use std::sync::Arc;
use std::time::Duration;

/// Work a core does: called in a loop, with the time of this iteration.
pub trait Poller: Send {
    /// Does what is ready; returns how much work that was (0: nothing).
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
}

/// How often (in loop iterations) a core asks its pollers whether they finished.
pub const FINISHED_CHECK_EVERY: u64 = 1024;

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
    mut pollers: Vec<Box<dyn Poller>>,
    mut adds: Option<spsc::Consumer<Box<dyn Poller>>>,
    stop: &Shutdown,
    drain_deadline: Duration,
) -> CoreReport {
    let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    if !pinned {
        tracing::warn!("core {cpu}: could not pin; running unpinned");
    }
    pollers.reserve(16);
    let mut work: Vec<u64> = vec![0; pollers.len()];
    work.reserve(16);
    let mut stats = CoreStats::default();
    let mut last = Instant::now();
    while !stop.is_set() {
        if let Some(rx) = adds.as_mut() {
            // Rare: a poller added at runtime (allocated by the sender).
            while let Some(p) = rx.pop() {
                pollers.push(p);
                work.push(0);
            }
        }
        let mut did = 0;
        for (p, w) in pollers.iter_mut().zip(work.iter_mut()) {
            let n = p.poll(last);
            *w += n as u64;
            did += n;
        }
        let now = Instant::now();
        let spent = now.duration_since(last).as_nanos() as u64;
        stats.iterations += 1;
        if did > 0 {
            stats.busy_iterations += 1;
            stats.busy_ns += spent;
        } else {
            stats.idle_ns += spent;
        }
        last = now;
        if stats.iterations % FINISHED_CHECK_EVERY == 0 {
            // Rare: retire finished pollers (their memory is freed here, off
            // the per-iteration path).
            let mut i = 0;
            while i < pollers.len() {
                if pollers[i].finished() {
                    pollers.swap_remove(i);
                    work.swap_remove(i);
                } else {
                    i += 1;
                }
            }
        }
    }
    let deadline = Instant::now() + drain_deadline;
    let mut drained = false;
    while Instant::now() < deadline {
        let now = Instant::now();
        let mut all = true;
        for p in pollers.iter_mut() {
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
        pollers: pollers
            .iter()
            .zip(work)
            .map(|(p, w)| (p.name().to_string(), w))
            .collect(),
        drained,
    }
}

/// A set of running cores.
pub struct Cores {
    handles: Vec<std::thread::JoinHandle<CoreReport>>,
    adds: Vec<spsc::Producer<Box<dyn Poller>>>,
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
        let make: Factory = Arc::new(make);
        let mut handles = Vec::new();
        let mut adds = Vec::new();
        for (i, &cpu) in cpus.iter().enumerate() {
            let (tx, rx) = spsc::channel(16);
            let (make, stop2) = (make.clone(), stop.clone());
            let h = std::thread::Builder::new()
                .name(format!("rtrs-core{i}"))
                .spawn(move || run_core(cpu, make(i), Some(rx), &stop2, drain_deadline))
                .map_err(PollersError::Spawn)?;
            handles.push(h);
            adds.push(tx);
        }
        Ok(Cores {
            handles,
            adds,
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
        std::thread::sleep(Duration::from_millis(50));
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
}
