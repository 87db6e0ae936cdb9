//! The client path state machine with the kernel's connect sequence and
//! reconnect timing (wire spec §4.2, §4.6, §7.2), quinn-style: events and
//! `now` in, actions out ([`ClientPath::poll_action`]), deadlines out
//! ([`ClientPath::poll_timeout`]). No clock, no I/O, no threads: a connect
//! and the INFO exchange are states with deadlines, never waits.
//!
//! ```text
//!          open / attempt
//!  Closed ───────────────> Connecting ── Established(cid) ──> Connect(cid + 1)
//!    ^                     │  (cid 0..cid_num, then INFO)  └─ last cid ─> SendInfo
//!    │                     │── InfoDone ───────────────────> Connected ─> Up
//!    │                     └── Failed / deadline ─> ConnectingErr ─ Teardown ─┐
//!    │  Connected ── Failed ─> Reconnecting (Teardown) <──── torn_down ───────┘
//!    │  Reconnecting ── delay + jitter ─> backoff ─> Connecting (attempt + 1)
//!    │               └─ attempts spent ─> Closing (Teardown)
//!    └──── torn_down ──── Closing <─── close(reason) from any state
//! ```

use super::reason::{DownReason, Step};
use minstant::Instant;
use std::collections::VecDeque;
use std::time::Duration;

/// Path states, named as the kernel's client names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathState {
    /// Connecting its connections and exchanging INFO_REQ/INFO_RSP.
    Connecting,
    /// A connection round failed; its connections are being torn down.
    ConnectingErr,
    /// Up: IO may use it.
    Connected,
    /// Down, waiting for the next reconnect attempt.
    Reconnecting,
    /// Being closed: its connections are being torn down.
    Closing,
    /// Closed (by the operator, out of reconnect attempts, or not opened).
    Closed,
}

impl PathState {
    /// The kernel's name for the state (sysfs `state`).
    pub fn name(self) -> &'static str {
        match self {
            PathState::Connecting => "connecting",
            PathState::ConnectingErr => "connecting_err",
            PathState::Connected => "connected",
            PathState::Reconnecting => "reconnecting",
            PathState::Closing => "closing",
            PathState::Closed => "closed",
        }
    }

    /// The state as a byte (for an atomic that publishes it).
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// Back from [`PathState::to_u8`].
    pub fn from_u8(v: u8) -> PathState {
        match v {
            0 => PathState::Connecting,
            1 => PathState::ConnectingErr,
            2 => PathState::Connected,
            3 => PathState::Reconnecting,
            4 => PathState::Closing,
            _ => PathState::Closed,
        }
    }
}

/// What happened, as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathEvent {
    /// Connection `cid` is established (its CON_RSP is valid).
    Established {
        /// The connection.
        cid: u16,
    },
    /// INFO_RSP arrived and is valid; every receive is posted.
    InfoDone,
    /// Something failed.
    Failed(DownReason),
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Create connection `cid` and send its CON_REQ with `recon_cnt`.
    Connect {
        /// The connection.
        cid: u16,
        /// The round's reconnect counter.
        recon_cnt: u16,
    },
    /// Every connection is up: post INFO_REQ on cid 0.
    SendInfo,
    /// The path is up: start its heartbeat, let IO use it.
    Up {
        /// Whether it was up before (a reconnect).
        reconnect: bool,
    },
    /// Tear the connections down and fail the path's IO over to other
    /// paths; then call [`ClientPath::torn_down`].
    Teardown(DownReason),
    /// The path is closed, with why.
    Closed(DownReason),
}

/// Reconnect parameters (`rtrs_clt_open` arguments in the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Wait after a failure before the next attempt starts (kernel's RNBD: 30 s).
    pub delay: Duration,
    /// Attempts before giving up; negative means forever (RNBD passes -1).
    pub max_attempts: i32,
    /// The sleep at the start of every attempt (`RTRS_RECONNECT_BACKOFF`, 1 s).
    pub backoff: Duration,
}

impl Default for ReconnectPolicy {
    /// What the kernel's RNBD client uses.
    fn default() -> Self {
        ReconnectPolicy {
            delay: Duration::from_secs(30),
            max_attempts: -1,
            backoff: Duration::from_millis(1000),
        }
    }
}

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Connecting: the current step's deadline.
    Step,
    /// Reconnecting: `delay` + jitter after the failure.
    Delay,
    /// Reconnecting: the backoff sleep at the start of an attempt.
    Backoff,
}

/// The step a connection round is at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    /// Waiting for connection `cid` to be established.
    Cid(u16),
    /// Waiting for INFO_RSP.
    Info,
}

/// One client path.
#[derive(Clone, Debug)]
pub struct ClientPath {
    state: PathState,
    policy: ReconnectPolicy,
    cid_num: u16,
    connect_timeout: Duration,
    round: Round,
    attempts: u32,
    recon_cnt: u16,
    ever_up: bool,
    timer: Option<(Wait, Instant)>,
    jitter_seed: u64,
    actions: VecDeque<PathAction>,
    last_reason: Option<DownReason>,
    /// Successful reconnects, and failed reconnect attempts.
    pub reconnects: (u64, u64),
}

impl ClientPath {
    /// A new closed path of `cid_num` connections; [`ClientPath::open`]
    /// starts it. `seed` varies the 0-7 ms jitter between paths.
    pub fn new(
        policy: ReconnectPolicy,
        cid_num: u16,
        connect_timeout: Duration,
        seed: u64,
    ) -> ClientPath {
        ClientPath {
            state: PathState::Closed,
            policy,
            cid_num: cid_num.max(1),
            connect_timeout,
            round: Round::Cid(0),
            attempts: 0,
            recon_cnt: 0,
            ever_up: false,
            timer: None,
            jitter_seed: seed | 1,
            actions: VecDeque::new(),
            last_reason: None,
            reconnects: (0, 0),
        }
    }

    /// The state.
    pub fn state(&self) -> PathState {
        self.state
    }

    /// The reconnect counter of the current (or last) round.
    pub fn recon_cnt(&self) -> u16 {
        self.recon_cnt
    }

    /// Whether the path has been up at least once.
    pub fn ever_up(&self) -> bool {
        self.ever_up
    }

    /// Why the path last went down.
    pub fn last_reason(&self) -> Option<&DownReason> {
        self.last_reason.as_ref()
    }

    /// The reconnect policy.
    pub fn policy(&self) -> ReconnectPolicy {
        self.policy
    }

    /// Changes the policy (sysfs `max_reconnect_attempts` and friends); a
    /// pending delay keeps its deadline.
    pub fn set_policy(&mut self, policy: ReconnectPolicy) {
        self.policy = policy;
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<PathAction> {
        self.actions.pop_front()
    }

    /// When [`ClientPath::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timer.map(|(_, at)| at)
    }

    /// Starts the first connection round (from Closed).
    pub fn open(&mut self, now: Instant) -> bool {
        if self.state != PathState::Closed {
            return false;
        }
        self.attempts = 0;
        self.connect(now);
        true
    }

    fn connect(&mut self, now: Instant) {
        self.state = PathState::Connecting;
        self.recon_cnt = self.recon_cnt.wrapping_add(1);
        self.step(Round::Cid(0), now);
        self.actions.push_back(PathAction::Connect {
            cid: 0,
            recon_cnt: self.recon_cnt,
        });
    }

    fn step(&mut self, round: Round, now: Instant) {
        self.round = round;
        self.timer = Some((Wait::Step, now + self.connect_timeout));
    }

    /// Feeds an event. Returns false when it does not apply in this state
    /// (a late event of a round that already failed, say).
    pub fn handle_event(&mut self, ev: PathEvent, now: Instant) -> bool {
        match ev {
            PathEvent::Established { cid } => {
                if self.state != PathState::Connecting || self.round != Round::Cid(cid) {
                    return false;
                }
                if cid + 1 < self.cid_num {
                    self.step(Round::Cid(cid + 1), now);
                    self.actions.push_back(PathAction::Connect {
                        cid: cid + 1,
                        recon_cnt: self.recon_cnt,
                    });
                } else {
                    self.step(Round::Info, now);
                    self.actions.push_back(PathAction::SendInfo);
                }
                true
            }
            PathEvent::InfoDone => {
                if self.state != PathState::Connecting || self.round != Round::Info {
                    return false;
                }
                let reconnect = self.ever_up;
                if reconnect {
                    self.reconnects.0 += 1;
                }
                self.ever_up = true;
                self.state = PathState::Connected;
                self.attempts = 0;
                self.timer = None;
                self.actions.push_back(PathAction::Up { reconnect });
                true
            }
            PathEvent::Failed(reason) => self.fail(reason, now),
        }
    }

    fn fail(&mut self, reason: DownReason, now: Instant) -> bool {
        match self.state {
            PathState::Connected => {
                self.state = PathState::Reconnecting;
                self.arm_delay(now);
            }
            PathState::Connecting => {
                if self.ever_up || self.recon_cnt > 1 {
                    self.reconnects.1 += 1;
                }
                self.state = PathState::ConnectingErr;
                self.timer = None;
            }
            _ => return false,
        }
        self.last_reason = Some(reason.clone());
        self.actions.push_back(PathAction::Teardown(reason));
        true
    }

    fn arm_delay(&mut self, now: Instant) {
        let jitter = self.jitter();
        self.timer = Some((Wait::Delay, now + self.policy.delay + jitter));
    }

    fn jitter(&mut self) -> Duration {
        let mut x = self.jitter_seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_seed = x;
        Duration::from_millis(x % 8)
    }

    /// The driver finished a [`PathAction::Teardown`].
    pub fn torn_down(&mut self, now: Instant) {
        match self.state {
            PathState::ConnectingErr => {
                self.state = PathState::Reconnecting;
                self.arm_delay(now);
            }
            PathState::Closing => {
                self.state = PathState::Closed;
                self.timer = None;
                let why = self
                    .last_reason
                    .clone()
                    .unwrap_or(DownReason::SessionClosed);
                self.actions.push_back(PathAction::Closed(why));
            }
            _ => {}
        }
    }

    /// Runs the deadlines: a connection step that took too long, the
    /// reconnect delay, the backoff.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some((wait, at)) = self.timer else { return };
        if now < at {
            return;
        }
        self.timer = None;
        match (wait, self.state) {
            (Wait::Step, PathState::Connecting) => {
                let (cid, step) = match self.round {
                    Round::Cid(c) => (c, Step::Connect),
                    Round::Info => (0, Step::Info),
                };
                self.fail(DownReason::Timeout { cid, step }, now);
            }
            (Wait::Delay, PathState::Reconnecting) => {
                let max = self.policy.max_attempts;
                if max >= 0 && self.attempts >= max as u32 {
                    let reason = DownReason::AttemptsExhausted {
                        attempts: self.attempts,
                    };
                    self.close(reason);
                    return;
                }
                self.attempts += 1;
                if self.policy.backoff > Duration::ZERO {
                    self.timer = Some((Wait::Backoff, now + self.policy.backoff));
                } else {
                    self.connect(now);
                }
            }
            (Wait::Backoff, PathState::Reconnecting) => self.connect(now),
            _ => {}
        }
    }

    /// Reconnect at once (sysfs `reconnect`): from Connected, ConnectingErr
    /// or Closed; resets the attempts and skips the delay (the backoff
    /// still applies). Already Reconnecting: the delay is skipped. Returns
    /// false (the kernel's -EBUSY) while Connecting or Closing.
    pub fn reconnect_now(&mut self, now: Instant) -> bool {
        match self.state {
            PathState::Connected => {
                self.state = PathState::Reconnecting;
                self.last_reason = Some(DownReason::Operator);
                self.actions
                    .push_back(PathAction::Teardown(DownReason::Operator));
            }
            PathState::ConnectingErr | PathState::Closed => {
                self.state = PathState::Reconnecting;
            }
            PathState::Reconnecting => {}
            PathState::Connecting | PathState::Closing => return false,
        }
        self.attempts = 0;
        self.timer = Some((Wait::Delay, now));
        true
    }

    /// Closes the path for good (tears it down first). No effect when
    /// already closing or closed.
    pub fn close(&mut self, reason: DownReason) -> bool {
        if matches!(self.state, PathState::Closing | PathState::Closed) {
            return false;
        }
        self.state = PathState::Closing;
        self.timer = None;
        self.last_reason = Some(reason.clone());
        self.actions.push_back(PathAction::Teardown(reason));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtrs_fabric::{WcOpcode, WcStatus};

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn dead() -> DownReason {
        DownReason::Completion {
            cid: 1,
            status: WcStatus::RetryExcErr,
            opcode: WcOpcode::RdmaWrite,
        }
    }

    fn actions(p: &mut ClientPath) -> Vec<PathAction> {
        std::iter::from_fn(|| p.poll_action()).collect()
    }

    /// Connects every cid and INFO at `now`; returns the actions.
    fn complete_round(p: &mut ClientPath, cid_num: u16, now: Instant) -> Vec<PathAction> {
        let mut all = actions(p);
        for cid in 0..cid_num {
            assert!(p.handle_event(PathEvent::Established { cid }, now));
            all.extend(actions(p));
        }
        assert!(p.handle_event(PathEvent::InfoDone, now));
        all.extend(actions(p));
        all
    }

    /// Runs the timers at every deadline until an action appears.
    fn run_to_action(p: &mut ClientPath) -> (Instant, Option<PathAction>) {
        loop {
            let Some(at) = p.poll_timeout() else {
                return (Instant::now(), None);
            };
            p.handle_timeout(at);
            if let Some(a) = p.poll_action() {
                return (at, Some(a));
            }
        }
    }

    #[test]
    fn a_round_connects_each_cid_in_order_then_info() {
        let t0 = Instant::now();
        let mut p = ClientPath::new(ReconnectPolicy::default(), 3, ms(100), 1);
        assert!(p.open(t0));
        let got = complete_round(&mut p, 3, t0);
        use PathAction::*;
        assert_eq!(
            got,
            [
                Connect {
                    cid: 0,
                    recon_cnt: 1
                },
                Connect {
                    cid: 1,
                    recon_cnt: 1
                },
                Connect {
                    cid: 2,
                    recon_cnt: 1
                },
                SendInfo,
                Up { reconnect: false }
            ]
        );
        assert_eq!(p.state(), PathState::Connected);
        assert_eq!(p.poll_timeout(), None, "no deadline while up");
        assert!(
            !p.handle_event(PathEvent::Established { cid: 1 }, t0),
            "a late event does nothing"
        );
    }

    #[test]
    fn a_step_that_takes_too_long_fails_the_round() {
        let t0 = Instant::now();
        let mut p = ClientPath::new(ReconnectPolicy::default(), 2, ms(100), 1);
        p.open(t0);
        actions(&mut p);
        p.handle_event(PathEvent::Established { cid: 0 }, t0 + ms(50));
        actions(&mut p);
        // The deadline restarts with each step: 100 ms from the second CON_REQ.
        p.handle_timeout(t0 + ms(149));
        assert_eq!(p.poll_action(), None);
        p.handle_timeout(t0 + ms(150));
        let why = DownReason::Timeout {
            cid: 1,
            step: Step::Connect,
        };
        assert_eq!(p.poll_action(), Some(PathAction::Teardown(why.clone())));
        assert_eq!(p.state(), PathState::ConnectingErr);
        assert_eq!(p.last_reason(), Some(&why));
        p.torn_down(t0 + ms(150));
        assert_eq!(p.state(), PathState::Reconnecting);
    }

    #[test]
    fn reconnect_waits_delay_jitter_and_backoff_and_counts() {
        let t0 = Instant::now();
        let mut p = ClientPath::new(ReconnectPolicy::default(), 1, ms(100), 42);
        p.open(t0);
        complete_round(&mut p, 1, t0);
        assert!(p.handle_event(PathEvent::Failed(dead()), t0));
        assert_eq!(p.poll_action(), Some(PathAction::Teardown(dead())));
        assert_eq!(p.state(), PathState::Reconnecting);
        p.torn_down(t0);
        // Nothing happens before delay (30 s) + jitter (0-7 ms) + backoff (1 s).
        p.handle_timeout(t0 + Duration::from_secs(30) - ms(1));
        assert_eq!(p.poll_action(), None);
        let (at, a) = run_to_action(&mut p);
        assert_eq!(
            a,
            Some(PathAction::Connect {
                cid: 0,
                recon_cnt: 2
            })
        );
        let waited = at - t0;
        assert!(
            // minstant counts TSC cycles: durations come back within a few ns.
            waited + us(1) >= Duration::from_secs(31) && waited < Duration::from_secs(31) + ms(8),
            "{waited:?}"
        );
        p.handle_event(PathEvent::Established { cid: 0 }, at);
        actions(&mut p);
        p.handle_event(PathEvent::InfoDone, at);
        assert_eq!(p.poll_action(), Some(PathAction::Up { reconnect: true }));
        assert_eq!(p.reconnects, (1, 0));
    }

    #[test]
    fn failed_attempts_retry_until_the_budget_is_spent_then_close() {
        let t0 = Instant::now();
        let policy = ReconnectPolicy {
            delay: ms(100),
            max_attempts: 2,
            backoff: ms(10),
        };
        let mut p = ClientPath::new(policy, 1, ms(50), 7);
        p.open(t0);
        complete_round(&mut p, 1, t0);
        p.handle_event(PathEvent::Failed(dead()), t0);
        actions(&mut p);
        p.torn_down(t0);
        for round in 2..=3u16 {
            let (at, a) = run_to_action(&mut p);
            assert_eq!(
                a,
                Some(PathAction::Connect {
                    cid: 0,
                    recon_cnt: round
                })
            );
            let why = DownReason::Rejected {
                cid: 0,
                errno: -libc::ECONNRESET,
            };
            assert!(p.handle_event(PathEvent::Failed(why.clone()), at));
            assert_eq!(p.state(), PathState::ConnectingErr);
            assert_eq!(p.poll_action(), Some(PathAction::Teardown(why)));
            p.torn_down(at);
        }
        let (at, a) = run_to_action(&mut p);
        let spent = DownReason::AttemptsExhausted { attempts: 2 };
        assert_eq!(a, Some(PathAction::Teardown(spent.clone())));
        assert_eq!(p.state(), PathState::Closing);
        p.torn_down(at);
        assert_eq!(p.poll_action(), Some(PathAction::Closed(spent)));
        assert_eq!(p.state(), PathState::Closed);
        assert_eq!(p.reconnects, (0, 2));
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn zero_attempts_closes_at_the_first_check_and_forever_keeps_going() {
        let t0 = Instant::now();
        let policy = ReconnectPolicy {
            max_attempts: 0,
            ..ReconnectPolicy::default()
        };
        let mut p = ClientPath::new(policy, 1, ms(50), 1);
        p.open(t0);
        complete_round(&mut p, 1, t0);
        p.handle_event(PathEvent::Failed(dead()), t0);
        actions(&mut p);
        p.torn_down(t0);
        let (_, a) = run_to_action(&mut p);
        assert!(matches!(a, Some(PathAction::Teardown(_))));

        let policy = ReconnectPolicy {
            delay: ms(1),
            max_attempts: -1,
            backoff: ms(1),
        };
        let mut p = ClientPath::new(policy, 1, ms(50), 1);
        p.open(t0);
        actions(&mut p);
        let mut now = t0;
        for _ in 0..1000 {
            p.handle_event(PathEvent::Failed(dead()), now);
            actions(&mut p);
            p.torn_down(now);
            let (at, a) = run_to_action(&mut p);
            assert!(matches!(a, Some(PathAction::Connect { cid: 0, .. })));
            now = at;
        }
        assert_eq!(p.recon_cnt(), 1001);
    }

    #[test]
    fn reconnect_now_and_close_and_reopen_after_close() {
        let t0 = Instant::now();
        let mut p = ClientPath::new(ReconnectPolicy::default(), 1, ms(50), 3);
        p.open(t0);
        complete_round(&mut p, 1, t0);
        assert!(p.reconnect_now(t0));
        assert_eq!(
            p.poll_action(),
            Some(PathAction::Teardown(DownReason::Operator))
        );
        p.torn_down(t0);
        let (at, a) = run_to_action(&mut p);
        assert_eq!(
            a,
            Some(PathAction::Connect {
                cid: 0,
                recon_cnt: 2
            })
        );
        let waited = at - t0;
        assert!(
            waited + us(1) >= Duration::from_secs(1) && waited <= Duration::from_secs(1) + us(1),
            "only the backoff: {waited:?}"
        );
        assert!(!p.reconnect_now(at), "busy while connecting");
        assert!(p.close(DownReason::Operator));
        assert!(!p.close(DownReason::Operator));
        assert_eq!(
            p.poll_action(),
            Some(PathAction::Teardown(DownReason::Operator))
        );
        p.torn_down(at);
        assert_eq!(
            p.poll_action(),
            Some(PathAction::Closed(DownReason::Operator))
        );
        assert!(
            !p.handle_event(PathEvent::Failed(dead()), at),
            "errors after close do nothing"
        );
        // A closed path comes back through reconnect (sysfs `reconnect`).
        assert!(p.reconnect_now(at));
        let (_, a) = run_to_action(&mut p);
        assert_eq!(
            a,
            Some(PathAction::Connect {
                cid: 0,
                recon_cnt: 3
            })
        );
    }
}
