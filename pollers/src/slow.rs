//! The slow-path thread: control work (handshakes, heartbeats, reconnects)
//! with timers, fed by cores over an MPSC ring. Its logic lives in a
//! [`Control`] driven with `now` passed in, so [`SlowLoop::step`] runs the same
//! code under virtual time in tests; [`SlowPath::spawn`] just loops it on a
//! thread (pinned to a housekeeping CPU when [`SlowOpts::cpu`] names one).
//! Allocation is fine here; it is not on the cores. Waiting is bounded: a
//! control never blocks longer than the wait it is given.
//!
//! ```text
//!  cores ──mpsc──> step(now): messages -> due timers -> on_idle(now, wait)
//!                  wait = min(max_wait, next timer, Control::deadline())
//! ```

use crate::shutdown::Shutdown;
use crate::{mpsc, PollersError};
use minstant::Instant;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::time::Duration;

/// Identifies a scheduled timer (for cancelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(u64);

/// Timers keyed by deadline.
#[derive(Debug)]
pub struct Timers<K> {
    heap: BinaryHeap<Reverse<(Instant, TimerId)>>,
    keys: std::collections::HashMap<TimerId, K>,
    cancelled: HashSet<TimerId>,
    next: u64,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
            keys: Default::default(),
            cancelled: HashSet::new(),
            next: 0,
        }
    }
}

impl<K> Timers<K> {
    /// No timers.
    pub fn new() -> Self {
        Self::default()
    }
    /// Fires `key` at `at`.
    pub fn schedule(&mut self, at: Instant, key: K) -> TimerId {
        let id = TimerId(self.next);
        self.next += 1;
        self.heap.push(Reverse((at, id)));
        self.keys.insert(id, key);
        id
    }
    /// Cancels a timer (no effect if it already fired).
    pub fn cancel(&mut self, id: TimerId) {
        if self.keys.remove(&id).is_some() {
            self.cancelled.insert(id);
        }
    }
    /// The earliest pending deadline.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if self.cancelled.remove(&id) {
                self.heap.pop();
                continue;
            }
            return Some(at);
        }
        None
    }
    /// Pops one timer due at `now`.
    pub fn expire(&mut self, now: Instant) -> Option<K> {
        loop {
            let Reverse((at, id)) = *self.heap.peek()?;
            if self.cancelled.remove(&id) {
                self.heap.pop();
                continue;
            }
            if at > now {
                return None;
            }
            self.heap.pop();
            return self.keys.remove(&id);
        }
    }
    /// Pending timers.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The control logic a slow path runs.
pub trait Control: Send + 'static {
    /// What cores send.
    type Msg: Send + 'static;
    /// What timers carry.
    type Timer: Send + 'static;
    /// A message from a core.
    fn on_msg(&mut self, msg: Self::Msg, now: Instant, timers: &mut Timers<Self::Timer>);
    /// A timer fired.
    fn on_timer(&mut self, t: Self::Timer, now: Instant, timers: &mut Timers<Self::Timer>);
    /// Once per loop: other input (a connection manager, say). May block up to
    /// `max_wait`, and must not block longer.
    fn on_idle(&mut self, now: Instant, max_wait: Duration, timers: &mut Timers<Self::Timer>) {
        let _ = (now, timers);
        std::thread::sleep(max_wait);
    }
    /// The loop is stopping.
    fn on_stop(&mut self) {}
    /// The control's own next deadline (besides its timers): the loop's
    /// wait never runs past it.
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// Longest the loop waits before looking at the core ring again, by default.
pub const MAX_WAIT: Duration = Duration::from_millis(1);

/// How a slow-path thread runs.
#[derive(Clone, Debug)]
pub struct SlowOpts {
    /// The thread's name.
    pub name: String,
    /// A housekeeping CPU to pin the thread to; `None`: unpinned.
    pub cpu: Option<usize>,
    /// Longest wait between looks at the inbox (the control's own waits,
    /// e.g. for CM events, are capped by it).
    pub max_wait: Duration,
}

impl Default for SlowOpts {
    fn default() -> SlowOpts {
        SlowOpts {
            name: "rtrs-slow".into(),
            cpu: None,
            max_wait: MAX_WAIT,
        }
    }
}

/// The loop, separate from its thread.
#[derive(Debug)]
pub struct SlowLoop<C: Control> {
    /// The control logic.
    pub control: C,
    /// Its timers.
    pub timers: Timers<C::Timer>,
    rx: mpsc::Receiver<C::Msg>,
}

impl<C: Control> SlowLoop<C> {
    /// A loop fed by a ring of `inbox` messages; returns it with the senders' half.
    pub fn new(control: C, inbox: usize) -> (SlowLoop<C>, mpsc::Sender<C::Msg>) {
        let (tx, rx) = mpsc::channel(inbox);
        (SlowLoop::with_inbox(control, rx), tx)
    }

    /// A loop fed by `rx` (for a control that holds senders of its own
    /// inbox, e.g. to hand them to cores).
    pub fn with_inbox(control: C, rx: mpsc::Receiver<C::Msg>) -> SlowLoop<C> {
        SlowLoop {
            control,
            timers: Timers::new(),
            rx,
        }
    }

    /// One turn at `now`: messages, due timers, then idle work for at most
    /// `max_wait` (capped by the next deadline).
    pub fn step(&mut self, now: Instant, max_wait: Duration) {
        let (control, timers) = (&mut self.control, &mut self.timers);
        self.rx.pop_batch(256, |m| control.on_msg(m, now, timers));
        while let Some(t) = self.timers.expire(now) {
            self.control.on_timer(t, now, &mut self.timers);
        }
        let mut wait = max_wait;
        for at in [self.timers.next_deadline(), self.control.deadline()]
            .into_iter()
            .flatten()
        {
            wait = wait.min(at.saturating_duration_since(now));
        }
        self.control.on_idle(now, wait, &mut self.timers);
    }
}

/// A running slow-path thread.
#[derive(Debug)]
pub struct SlowPath<C: Control> {
    tx: mpsc::Sender<C::Msg>,
    handle: std::thread::JoinHandle<C>,
    stop: Shutdown,
}

impl<C: Control> SlowPath<C> {
    /// Starts the thread, unpinned, looking at its inbox every [`MAX_WAIT`].
    pub fn spawn(control: C, inbox: usize, stop: Shutdown) -> Result<SlowPath<C>, PollersError> {
        SlowPath::spawn_with(control, inbox, stop, SlowOpts::default())
    }

    /// Starts the thread as `opts` says.
    pub fn spawn_with(
        control: C,
        inbox: usize,
        stop: Shutdown,
        opts: SlowOpts,
    ) -> Result<SlowPath<C>, PollersError> {
        let (lp, tx) = SlowLoop::new(control, inbox);
        SlowPath::run(lp, tx, stop, opts)
    }

    /// Runs an existing loop (whose inbox sender is `tx`) on a new thread.
    pub fn run(
        mut lp: SlowLoop<C>,
        tx: mpsc::Sender<C::Msg>,
        stop: Shutdown,
        opts: SlowOpts,
    ) -> Result<SlowPath<C>, PollersError> {
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name(opts.name.clone())
            .spawn(move || {
                if let Some(cpu) = opts.cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        tracing::warn!(cpu, "{}: could not pin; running unpinned", opts.name);
                    }
                }
                while !stop2.is_set() {
                    lp.step(Instant::now(), opts.max_wait);
                }
                lp.control.on_stop();
                lp.control
            })
            .map_err(PollersError::Spawn)?;
        Ok(SlowPath { tx, handle, stop })
    }

    /// A sender for a core.
    pub fn sender(&self) -> mpsc::Sender<C::Msg> {
        self.tx.clone()
    }

    /// Stops the thread and returns its control state (`None` when the
    /// thread panicked).
    pub fn stop(self) -> Option<C> {
        self.stop.trigger();
        self.handle.join().ok()
    }

    /// Whether the thread has ended (stopped, or its control panicked).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log {
        events: Vec<String>,
    }

    impl Control for Log {
        type Msg = u32;
        type Timer = &'static str;
        fn on_msg(&mut self, m: u32, _now: Instant, timers: &mut Timers<&'static str>) {
            self.events.push(format!("msg {m}"));
            if m == 1 {
                // e.g. a heartbeat timer armed by a core's report
                let _ = timers;
            }
        }
        fn on_timer(&mut self, t: &'static str, now: Instant, timers: &mut Timers<&'static str>) {
            self.events.push(format!("timer {t}"));
            if t == "hb" {
                timers.schedule(now + Duration::from_secs(5), "hb");
            }
        }
        fn on_idle(&mut self, _now: Instant, _max: Duration, _t: &mut Timers<&'static str>) {}
    }

    #[test]
    fn virtual_time_timers_and_messages() {
        let t0 = Instant::now();
        let (mut lp, tx) = SlowLoop::new(Log::default(), 8);
        lp.timers.schedule(t0 + Duration::from_secs(5), "hb");
        let c = lp.timers.schedule(t0 + Duration::from_secs(1), "cancelled");
        lp.timers.cancel(c);
        tx.push(7).unwrap();
        lp.step(t0, MAX_WAIT);
        assert_eq!(lp.control.events, ["msg 7"]);
        for s in 1..=16 {
            lp.step(t0 + Duration::from_secs(s), MAX_WAIT);
        }
        // Fired at 5, 10 and 15 s, re-armed each time; the cancelled one never.
        assert_eq!(
            lp.control.events,
            ["msg 7", "timer hb", "timer hb", "timer hb"]
        );
        assert_eq!(lp.timers.len(), 1);
    }

    #[test]
    fn the_thread_runs_and_stops() {
        let sp = SlowPath::spawn(Log::default(), 8, Shutdown::new()).unwrap();
        let tx = sp.sender();
        tx.push(1).unwrap();
        tx.push(2).unwrap();
        let t0 = Instant::now();
        while !tx.is_abandoned() && t0.elapsed() < Duration::from_millis(100) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let log = sp.stop().unwrap();
        assert_eq!(log.events, ["msg 1", "msg 2"]);
    }
}
