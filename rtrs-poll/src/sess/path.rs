//! The client path state machine with the kernel's reconnect timing (wire spec
//! §4.6, §7.2), driven with `now` passed in: no clock, no I/O, no threads.
//!
//! ```text
//!  open ─> Connecting ──connected──> Connected ──error──> Reconnecting
//!             │  └──error──> ConnectingErr ─────────────────┘   │ delay + jitter,
//!             └──────────────────────────────<── attempt ───────┘ then 1 s backoff
//!  Reconnecting ──attempts exhausted──> Closed       close() from anywhere ──> Closed
//! ```

use minstant::Instant;
use std::time::Duration;

/// Path states, named as the kernel's client names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathState {
    /// Connecting its connections and exchanging INFO_REQ/INFO_RSP.
    Connecting,
    /// Connecting failed; recovery is about to be scheduled.
    ConnectingErr,
    /// Up: IO may use it.
    Connected,
    /// Down, waiting for the next reconnect attempt.
    Reconnecting,
    /// Being closed.
    Closing,
    /// Closed for good (closed by the user, or out of reconnect attempts).
    Closed,
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Connect every connection of the path (the CON_REQ carries `recon_cnt`),
    /// then INFO_REQ.
    Connect {
        /// The reconnect counter to send.
        recon_cnt: u16,
    },
    /// The path is up: start its heartbeat, let IO use it.
    Up,
    /// Tear the connections down and fail the path's inflight IO over to
    /// other paths.
    Teardown,
    /// The path is closed for good; fail what is left.
    Closed,
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

/// What the reconnect timer waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// `delay` + jitter after the failure.
    Delay,
    /// The backoff sleep at the start of an attempt.
    Backoff,
}

/// One client path.
#[derive(Clone, Debug)]
pub struct ClientPath {
    state: PathState,
    policy: ReconnectPolicy,
    attempts: u32,
    recon_cnt: u16,
    /// The reconnect timer (Reconnecting only).
    timer: Option<(Wait, Instant)>,
    jitter_seed: u64,
    /// Successful (re)connects after the first, and failed attempts.
    pub reconnects: (u64, u64),
}

impl ClientPath {
    /// A new path; call [`ClientPath::open`] to start it. `seed` varies the
    /// 0-7 ms jitter between paths.
    pub fn new(policy: ReconnectPolicy, seed: u64) -> ClientPath {
        ClientPath {
            state: PathState::Closed,
            policy,
            attempts: 0,
            recon_cnt: 0,
            timer: None,
            jitter_seed: seed | 1,
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

    /// Changes the policy (sysfs `max_reconnect_attempts` and friends).
    pub fn set_policy(&mut self, policy: ReconnectPolicy) {
        self.policy = policy;
    }

    fn connect(&mut self) -> PathAction {
        self.state = PathState::Connecting;
        self.recon_cnt = self.recon_cnt.wrapping_add(1);
        PathAction::Connect {
            recon_cnt: self.recon_cnt,
        }
    }

    /// Starts the first connection round.
    pub fn open(&mut self) -> PathAction {
        self.attempts = 0;
        self.connect()
    }

    /// The round succeeded (INFO_RSP validated, receives posted).
    pub fn connected(&mut self) -> Option<PathAction> {
        if self.state != PathState::Connecting {
            return None;
        }
        if self.recon_cnt > 1 {
            self.reconnects.0 += 1;
        }
        self.state = PathState::Connected;
        self.attempts = 0;
        Some(PathAction::Up)
    }

    fn jitter(&mut self) -> Duration {
        let mut x = self.jitter_seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_seed = x;
        Duration::from_millis(x % 8)
    }

    /// Any error on the path: a CM event, a completion error, a dead heartbeat,
    /// a malformed message. Returns what to do now.
    pub fn error(&mut self, now: Instant) -> Option<PathAction> {
        match self.state {
            PathState::Connected | PathState::Connecting => {
                if self.state == PathState::Connecting {
                    self.reconnects.1 += u64::from(self.recon_cnt > 1);
                }
                self.state = PathState::Reconnecting;
                self.timer = Some((Wait::Delay, now + self.policy.delay + self.jitter()));
                Some(PathAction::Teardown)
            }
            _ => None,
        }
    }

    /// When [`ClientPath::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timer.map(|(_, at)| at)
    }

    /// Runs the reconnect timer.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<PathAction> {
        let (wait, at) = self.timer?;
        if self.state != PathState::Reconnecting || now < at {
            return None;
        }
        match wait {
            Wait::Delay => {
                let max = self.policy.max_attempts;
                if max >= 0 && self.attempts >= max as u32 {
                    self.timer = None;
                    self.state = PathState::Closed;
                    return Some(PathAction::Closed);
                }
                self.attempts += 1;
                if self.policy.backoff > Duration::ZERO {
                    self.timer = Some((Wait::Backoff, now + self.policy.backoff));
                    return None;
                }
                self.timer = None;
                Some(self.connect())
            }
            Wait::Backoff => {
                self.timer = None;
                Some(self.connect())
            }
        }
    }

    /// Reconnect at once (sysfs `reconnect`): resets the attempts and skips the
    /// delay (the backoff still applies).
    pub fn reconnect_now(&mut self, now: Instant) -> Option<PathAction> {
        match self.state {
            PathState::Connected | PathState::ConnectingErr | PathState::Closed => {
                let was_up = self.state == PathState::Connected;
                self.state = PathState::Reconnecting;
                self.attempts = 0;
                self.timer = Some((Wait::Delay, now));
                was_up.then_some(PathAction::Teardown)
            }
            _ => None,
        }
    }

    /// Closes the path for good.
    pub fn close(&mut self) -> Option<PathAction> {
        if self.state == PathState::Closed {
            return None;
        }
        self.state = PathState::Closed;
        self.timer = None;
        Some(PathAction::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs the timer at every deadline until it yields an action.
    fn run_to_action(p: &mut ClientPath) -> (Instant, Option<PathAction>) {
        loop {
            let Some(at) = p.poll_timeout() else {
                return (Instant::now(), None);
            };
            if let Some(a) = p.handle_timeout(at) {
                return (at, Some(a));
            }
        }
    }

    #[test]
    fn reconnect_waits_delay_jitter_and_backoff_and_counts() {
        let t0 = Instant::now();
        let mut p = ClientPath::new(ReconnectPolicy::default(), 42);
        assert_eq!(p.open(), PathAction::Connect { recon_cnt: 1 });
        assert_eq!(p.connected(), Some(PathAction::Up));
        assert_eq!(p.state(), PathState::Connected);
        assert_eq!(p.error(t0), Some(PathAction::Teardown));
        assert_eq!(p.state(), PathState::Reconnecting);
        // Nothing happens before delay (30 s) + jitter (0-7 ms) + backoff (1 s).
        assert_eq!(p.handle_timeout(t0 + Duration::from_secs(30) - ms(1)), None);
        let (at, a) = run_to_action(&mut p);
        assert_eq!(a, Some(PathAction::Connect { recon_cnt: 2 }));
        let waited = at - t0;
        assert!(
            // minstant counts TSC cycles: durations come back within a few ns.
            waited + us(1) >= Duration::from_secs(31) && waited < Duration::from_secs(31) + ms(8),
            "{waited:?}"
        );
        assert_eq!(p.connected(), Some(PathAction::Up));
        assert_eq!(p.reconnects, (1, 0));
    }

    #[test]
    fn failed_attempts_retry_until_the_budget_is_spent() {
        let t0 = Instant::now();
        let policy = ReconnectPolicy {
            delay: ms(100),
            max_attempts: 2,
            backoff: ms(10),
        };
        let mut p = ClientPath::new(policy, 7);
        p.open();
        p.connected();
        p.error(t0);
        for round in 2..=3u16 {
            let (at, a) = run_to_action(&mut p);
            assert_eq!(a, Some(PathAction::Connect { recon_cnt: round }));
            assert_eq!(
                p.error(at),
                Some(PathAction::Teardown),
                "round {round} fails"
            );
        }
        let (_, a) = run_to_action(&mut p);
        assert_eq!(a, Some(PathAction::Closed));
        assert_eq!(p.state(), PathState::Closed);
        assert_eq!(p.reconnects, (0, 2));
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn zero_attempts_closes_at_the_first_check_and_forever_keeps_going() {
        let t0 = Instant::now();
        let mut p = ClientPath::new(
            ReconnectPolicy {
                max_attempts: 0,
                ..ReconnectPolicy::default()
            },
            1,
        );
        p.open();
        p.connected();
        p.error(t0);
        assert_eq!(run_to_action(&mut p).1, Some(PathAction::Closed));

        let mut p = ClientPath::new(
            ReconnectPolicy {
                delay: ms(1),
                max_attempts: -1,
                backoff: ms(1),
            },
            1,
        );
        p.open();
        let mut now = t0;
        for _ in 0..1000 {
            p.error(now);
            let (at, a) = run_to_action(&mut p);
            assert!(matches!(a, Some(PathAction::Connect { .. })));
            now = at;
        }
        assert_eq!(p.recon_cnt(), 1001);
    }

    #[test]
    fn reconnect_now_and_close() {
        let t0 = Instant::now();
        let mut p = ClientPath::new(ReconnectPolicy::default(), 3);
        p.open();
        p.connected();
        assert_eq!(p.reconnect_now(t0), Some(PathAction::Teardown));
        let (at, a) = run_to_action(&mut p);
        assert_eq!(a, Some(PathAction::Connect { recon_cnt: 2 }));
        let waited = at - t0;
        assert!(
            waited + us(1) >= Duration::from_secs(1) && waited <= Duration::from_secs(1) + us(1),
            "only the backoff: {waited:?}"
        );
        assert_eq!(p.close(), Some(PathAction::Closed));
        assert_eq!(p.close(), None);
        assert_eq!(p.error(at), None, "errors after close do nothing");
    }
}
