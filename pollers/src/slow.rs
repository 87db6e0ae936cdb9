//! The slow-path thread: control work (handshakes, heartbeats, reconnects),
//! fed by cores and handles over an MPSC ring. The logic lives in a
//! [`Control`] that never reads a clock and never blocks in [`Control::poll`]:
//! `now` comes in, and [`Control::poll_timeout`] says when it wants to run
//! again without new input. [`SlowLoop::step`] runs one turn at any `now`, so
//! a test drives the same code under virtual time (a minute of protocol time
//! in milliseconds, no sleeps); [`SlowPath::spawn`] loops it on a thread
//! (pinned to a housekeeping CPU when [`SlowOpts::cpu`] names one), where the
//! only wait is [`Control::wait`], bounded by the next deadline.
//!
//! ```text
//!  cores, handles ──mpsc──> step(now): messages -> Control::poll(now)
//!  thread: loop { step(clock::now()); wait(min(max_wait, poll_timeout - now)) }
//!  tests:  loop { step(t); t = next deadline }          (no thread, no wait)
//! ```

use crate::shutdown::Shutdown;
use crate::{mpsc, PollersError};
use minstant::Instant;
use std::time::Duration;

/// The control logic a slow path runs.
pub trait Control: Send + 'static {
    /// What cores and handles send.
    type Msg: Send + 'static;
    /// A message from a core or a handle.
    fn on_msg(&mut self, msg: Self::Msg, now: Instant);
    /// Everything else there is to do at `now` (input that has arrived,
    /// deadlines that are due). Never blocks. Returns the work it did
    /// (events taken, completions polled, actions done; 0: nothing
    /// happened), which a stepping loop reads as "more may follow at once".
    fn poll(&mut self, now: Instant) -> usize;
    /// When [`Control::poll`] has work without new input (`None`: only
    /// when input arrives). A deadline at or before `now` means at once.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Waits for input (a connection manager's next event, say) for at most
    /// `max`; must not wait longer. Only the thread calls it; under virtual
    /// time nothing waits.
    fn wait(&mut self, max: Duration) {
        std::thread::sleep(max);
    }
    /// The loop is stopping.
    fn on_stop(&mut self, now: Instant) {
        let _ = now;
    }
}

/// Longest the loop waits before looking at its inbox again, by default.
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
        SlowLoop { control, rx }
    }

    /// One turn at `now`: the messages waiting, then the control's poll;
    /// returns the messages taken and the work done.
    pub fn step(&mut self, now: Instant) -> usize {
        let control = &mut self.control;
        let mut msgs = 0;
        self.rx.pop_batch(256, |m| {
            msgs += 1;
            control.on_msg(m, now)
        });
        msgs + self.control.poll(now)
    }

    /// How long the thread may wait after a step at `now`: `max`, or less
    /// when the control's next deadline comes sooner.
    pub fn wait_for(&self, now: Instant, max: Duration) -> Duration {
        self.control
            .poll_timeout()
            .map_or(max, |at| max.min(at.saturating_duration_since(now)))
    }
}

/// A control plane that no thread of its own runs: its embedder steps it
/// (from its own event loop, or under virtual time in a test). Made by the
/// `*_stepped` constructors of the crates above; stopping it (or dropping
/// it) runs the control's stop.
pub struct Stepper {
    lp: Option<Box<dyn Steppable>>,
}

trait Steppable: Send {
    fn step(&mut self, now: Instant) -> usize;
    fn poll_timeout(&self) -> Option<Instant>;
    fn stop(&mut self, now: Instant);
}

impl<C: Control> Steppable for SlowLoop<C> {
    fn step(&mut self, now: Instant) -> usize {
        SlowLoop::step(self, now)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.control.poll_timeout()
    }
    fn stop(&mut self, now: Instant) {
        self.control.on_stop(now);
    }
}

impl std::fmt::Debug for Stepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stepper")
    }
}

impl Stepper {
    /// A stepper over `lp`.
    pub fn new<C: Control>(lp: SlowLoop<C>) -> Stepper {
        Stepper {
            lp: Some(Box::new(lp)),
        }
    }

    /// One turn at `now` (never blocks); returns the work done (0:
    /// nothing happened, the control waits for input or its deadline).
    pub fn step(&mut self, now: Instant) -> usize {
        self.lp.as_mut().map_or(0, |l| l.step(now))
    }

    /// When the next step has work without new input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lp.as_ref().and_then(|l| l.poll_timeout())
    }

    /// Stops the control at `now` (what its thread does on shutdown).
    pub fn stop(mut self, now: Instant) {
        if let Some(mut l) = self.lp.take() {
            l.stop(now);
        }
    }

    /// Drops the control without stopping it: what a killed process leaves
    /// (its connections vanish; nothing is closed in order).
    pub fn abort(mut self) {
        drop(self.lp.take());
    }
}

impl Drop for Stepper {
    fn drop(&mut self) {
        if let Some(mut l) = self.lp.take() {
            l.stop(crate::clock::now());
        }
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

    /// Runs an existing loop (whose inbox sender is `tx`) on a new thread:
    /// a step at the clock's time, then a wait until the next deadline (at
    /// most `opts.max_wait`); a deadline already due yields the CPU once
    /// instead of waiting.
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
                    let now = crate::clock::now();
                    if lp.step(now) > 0 {
                        // More may follow at once (a reply to what was sent).
                        continue;
                    }
                    let wait = lp.wait_for(now, opts.max_wait);
                    if wait.is_zero() {
                        std::thread::yield_now();
                    } else {
                        lp.control.wait(wait);
                    }
                }
                lp.control.on_stop(crate::clock::now());
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

    /// A heartbeat every 5 s, and the messages it was sent.
    struct Log {
        events: Vec<String>,
        next_beat: Instant,
    }

    impl Control for Log {
        type Msg = u32;
        fn on_msg(&mut self, m: u32, _now: Instant) {
            self.events.push(format!("msg {m}"));
        }
        fn poll(&mut self, now: Instant) -> usize {
            if now < self.next_beat {
                return 0;
            }
            self.events.push("beat".into());
            self.next_beat = now + Duration::from_secs(5);
            1
        }
        fn poll_timeout(&self) -> Option<Instant> {
            Some(self.next_beat)
        }
        fn wait(&mut self, _max: Duration) {}
    }

    #[test]
    fn virtual_time_deadlines_and_messages() {
        let t0 = Instant::now();
        let log = Log {
            events: Vec::new(),
            next_beat: t0 + Duration::from_secs(5),
        };
        let (mut lp, tx) = SlowLoop::new(log, 8);
        tx.push(7).unwrap();
        lp.step(t0);
        assert_eq!(lp.control.events, ["msg 7"]);
        assert_eq!(
            lp.wait_for(t0, Duration::from_secs(60)),
            Duration::from_secs(5)
        );
        assert_eq!(lp.wait_for(t0, MAX_WAIT), MAX_WAIT);
        for s in 1..=16 {
            lp.step(t0 + Duration::from_secs(s));
        }
        // Beats at 5, 10 and 15 s.
        assert_eq!(lp.control.events, ["msg 7", "beat", "beat", "beat"]);
        let at = t0 + Duration::from_secs(20);
        assert_eq!(lp.wait_for(at, MAX_WAIT), Duration::ZERO);
    }

    #[test]
    fn the_thread_runs_and_stops() {
        let log = Log {
            events: Vec::new(),
            next_beat: Instant::now() + Duration::from_secs(3600),
        };
        let sp = SlowPath::spawn(log, 8, Shutdown::new()).unwrap();
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
