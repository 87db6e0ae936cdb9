//! The client's progress line: the IOs completed in each whole second of
//! measuring, counted by each core on the same second boundaries as its
//! `--hist` intervals (histlog.rs), so a line and the interval of the same
//! second hold the same count.
//!
//! ```text
//!  IO thread (per core)                        main thread
//!   Seconds::tick(now) each loop (one compare)
//!   at a boundary: slot[s % SLOTS] = IOs of    reads `published` (Acquire),
//!   second s, then published = s + 1 (Release)  sums slot s over the cores
//!   (no lock, no syscall, no allocation)        once each is past s, prints
//! ```
//! A second in which a core ran no loop at all (descheduled) is a second
//! with no completion on it: it publishes 0 there, as the interval log has
//! no interval there. The main thread reads every 10 ms; should it fall
//! more than `SLOTS` seconds behind, it says which seconds it lost rather
//! than print numbers that are not theirs.

use minstant::Instant;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Seconds a core's counts stay readable after they are published.
const SLOTS: u64 = 16;

/// Whole seconds since the first tick, counted one boundary at a time
/// (the TSC clock's arithmetic can put a boundary a nanosecond short of the
/// second, so not `elapsed().as_secs()`).
#[derive(Default)]
pub struct Seconds {
    t0: Option<Instant>,
    next: Option<Instant>,
    secs: u64,
}

impl Seconds {
    /// Starts the count at the first call; returns how many boundaries
    /// `now` passed since the last call (0 almost always).
    pub fn tick(&mut self, now: Instant) -> u64 {
        let t0 = *self.t0.get_or_insert(now);
        let next = self.next.get_or_insert(t0 + Duration::from_secs(1));
        let before = self.secs;
        while *next <= now {
            *next += Duration::from_secs(1);
            self.secs += 1;
        }
        self.secs - before
    }

    /// Boundaries passed so far: the index of the second running now.
    pub fn secs(&self) -> u64 {
        self.secs
    }

    /// The first tick's time (None before it).
    pub fn t0(&self) -> Option<Instant> {
        self.t0
    }
}

/// One core's published counts (shared with the main thread).
pub struct CoreCounts {
    slots: [AtomicU64; SLOTS as usize],
    /// Seconds whose count is in `slots`: 0..published.
    published: AtomicU64,
    /// The core has stopped: it publishes nothing more.
    finished: AtomicBool,
    /// Measured IOs so far (for a count-bounded run).
    ios: AtomicU64,
    /// The core has completed an IO (ramp or not).
    warm: AtomicBool,
}

impl CoreCounts {
    /// Measured IOs so far.
    pub fn ios(&self) -> u64 {
        self.ios.load(Ordering::Relaxed)
    }

    /// Whether the core has completed an IO.
    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Relaxed)
    }
}

impl Default for CoreCounts {
    fn default() -> Self {
        CoreCounts {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            published: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            ios: AtomicU64::new(0),
            warm: AtomicBool::new(false),
        }
    }
}

/// The IO thread's end: publishes each second's count as it ends.
pub struct Publisher<'a> {
    to: &'a CoreCounts,
    seconds: Seconds,
    /// The core's count of measured IOs at the last boundary.
    at_boundary: u64,
    warmed: bool,
}

impl<'a> Publisher<'a> {
    /// A publisher into `to`.
    pub fn new(to: &'a CoreCounts) -> Self {
        Publisher {
            to,
            seconds: Seconds::default(),
            at_boundary: 0,
            warmed: false,
        }
    }

    /// Called each loop while measuring, where the interval log ticks and
    /// with the same `now`; `ios` is the core's count of measured IOs so
    /// far (those recorded in the interval log).
    pub fn tick(&mut self, now: Instant, ios: u64) {
        // The running count, stored only when it moved (a store per poll
        // with completions, to this core's own counts).
        if ios != self.to.ios.load(Ordering::Relaxed) {
            self.to.ios.store(ios, Ordering::Relaxed);
        }
        let first = self.seconds.secs();
        if self.seconds.tick(now) == 0 {
            return;
        }
        let end = self.seconds.secs();
        // Second `first` ended with these IOs; any after it passed with no
        // loop run, so with no completion. (A gap longer than SLOTS:
        // only its last SLOTS seconds are kept; the reader says so.)
        for s in first.max(end.saturating_sub(SLOTS))..end {
            let n = if s == first {
                ios - self.at_boundary
            } else {
                0
            };
            self.to.slots[(s % SLOTS) as usize].store(n, Ordering::Relaxed);
        }
        self.at_boundary = ios;
        self.to.published.store(end, Ordering::Release);
    }

    /// The core completed an IO (said once).
    pub fn warm(&mut self) {
        if !self.warmed {
            self.warmed = true;
            self.to.warm.store(true, Ordering::Relaxed);
        }
    }

    /// The core stops: the second running now is not whole and is not
    /// published (the interval log has it as its last, shorter interval).
    pub fn finish(&mut self) {
        self.to.finished.store(true, Ordering::Release);
    }
}

/// What the main thread reads next.
pub enum Line {
    /// Second `index` (from 0) was whole on every core: IOs completed in it.
    Second { index: u64, ios: u64 },
    /// Seconds `from..to` were overwritten before they were read.
    Lost { from: u64, to: u64 },
}

/// The main thread's end: the seconds every core is past, in order.
#[derive(Default)]
pub struct Reader {
    next: u64,
}

impl Reader {
    /// The next whole second every core has published (a finished core
    /// holds none back, and has nothing in the seconds it did not
    /// publish), or None until there is one.
    pub fn next(&mut self, cores: &[CoreCounts]) -> Option<Line> {
        let s = self.next;
        let past = |c: &CoreCounts| c.published.load(Ordering::Acquire) > s;
        if cores
            .iter()
            .any(|c| !past(c) && !c.finished.load(Ordering::Acquire))
            || !cores.iter().any(past)
        {
            return None;
        }
        let ios = cores
            .iter()
            .filter(|c| past(c))
            .map(|c| c.slots[(s % SLOTS) as usize].load(Ordering::Relaxed))
            .sum();
        // Checked after the read: a core that has reached second s + SLOTS
        // may be writing it into s's slot.
        let furthest = cores
            .iter()
            .map(|c| c.published.load(Ordering::Acquire))
            .max()
            .unwrap_or(0);
        if furthest >= s + SLOTS {
            self.next = furthest + 1 - SLOTS;
            return Some(Line::Lost {
                from: s,
                to: self.next,
            });
        }
        self.next = s + 1;
        Some(Line::Second { index: s, ios })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core completing `batch` IOs a poll, a poll every `step`, for
    /// `total`: what it publishes against the true count of each second.
    fn run(batch: u64, step: Duration, total: Duration) -> (Vec<u64>, Vec<u64>) {
        let counts = [CoreCounts::default()];
        let mut p = Publisher::new(&counts[0]);
        let mut r = Reader::default();
        let t0 = Instant::now();
        let (mut ios, mut t) = (0u64, Duration::ZERO);
        let mut truth = vec![0u64];
        let mut lines = Vec::new();
        while t < total {
            p.tick(t0 + t, ios);
            // The poll after the tick: its completions are the second's
            // that the tick's `now` is in.
            ios += batch;
            let s = t.as_secs() as usize;
            truth.resize(truth.len().max(s + 1), 0);
            truth[s] += batch;
            while let Some(l) = r.next(&counts) {
                match l {
                    Line::Second { index, ios } => {
                        assert_eq!(index as usize, lines.len());
                        lines.push(ios);
                    }
                    Line::Lost { .. } => panic!("nothing is lost here"),
                }
            }
            t += step;
        }
        p.finish();
        truth.truncate(lines.len());
        (lines, truth)
    }

    #[test]
    fn every_second_is_published_with_its_count_whatever_the_batches() {
        // 3 completions a poll: the count never lands on a multiple of
        // 1024 at a poll's end more than once in 1024 polls, so a counter
        // published only there stood still for seconds.
        let (lines, truth) = run(3, Duration::from_micros(700), Duration::from_millis(5500));
        assert_eq!(lines.len(), 5, "the 5 whole seconds, not the half");
        assert_eq!(lines, truth);
        assert!(lines.iter().all(|&n| n > 4000), "{lines:?}");
    }

    #[test]
    fn a_second_with_no_loop_run_publishes_zero() {
        let counts = [CoreCounts::default()];
        let mut p = Publisher::new(&counts[0]);
        let mut r = Reader::default();
        let t0 = Instant::now();
        p.tick(t0, 0);
        p.tick(t0 + Duration::from_millis(900), 7);
        // Descheduled for 2.5 s: seconds 1 and 2 saw no completion.
        p.tick(t0 + Duration::from_millis(3400), 9);
        let mut got = Vec::new();
        while let Some(Line::Second { ios, .. }) = r.next(&counts) {
            got.push(ios);
        }
        // Second 0 holds what the poll after the 900 ms tick completed too
        // (the interval log records those in its interval 0 as well).
        assert_eq!(got, [9, 0, 0]);
    }

    #[test]
    fn the_reader_waits_for_every_core_and_a_finished_one_holds_none_back() {
        let counts = [CoreCounts::default(), CoreCounts::default()];
        let (mut a, mut b) = (Publisher::new(&counts[0]), Publisher::new(&counts[1]));
        let mut r = Reader::default();
        let t0 = Instant::now();
        a.tick(t0, 0);
        b.tick(t0 + Duration::from_millis(5), 0);
        a.tick(t0 + Duration::from_millis(1000), 10);
        assert!(r.next(&counts).is_none(), "core b is not past second 0");
        b.tick(t0 + Duration::from_millis(1005), 20);
        assert!(matches!(
            r.next(&counts),
            Some(Line::Second { index: 0, ios: 30 })
        ));
        a.tick(t0 + Duration::from_millis(2000), 15);
        assert!(r.next(&counts).is_none());
        b.finish();
        assert!(matches!(
            r.next(&counts),
            Some(Line::Second { index: 1, ios: 5 })
        ));
        assert!(r.next(&counts).is_none());
    }

    #[test]
    fn a_reader_too_far_behind_says_what_it_lost() {
        let counts = [CoreCounts::default()];
        let mut p = Publisher::new(&counts[0]);
        let mut r = Reader::default();
        let t0 = Instant::now();
        for s in 0..=SLOTS + 3 {
            p.tick(t0 + Duration::from_secs(s), s * 10);
        }
        assert!(matches!(
            r.next(&counts),
            Some(Line::Lost { from: 0, to: 4 })
        ));
        assert!(matches!(
            r.next(&counts),
            Some(Line::Second { index: 4, ios: 10 })
        ));
    }
}
