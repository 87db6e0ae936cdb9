//! The heartbeat, as both kernel sides run it per path (wire spec §6), driven
//! with `now` passed in.
//!
//! Every `interval` the timer fires: if more than `missed_max` beats went
//! unanswered the path is dead; if one is outstanding the miss count grows;
//! otherwise a beat is sent. Any inbound message resets the count, so a busy
//! path never sends more than one beat per interval and an idle peer that stops
//! answering is declared dead 30-35 s (7 timer runs) after its last message.

use minstant::Instant;
use rtrs_fabric::SendWr;
use rtrs_proto::imm::{HB_ACK, HB_MSG};
use std::time::Duration;

/// The kernel's heartbeat interval (`RTRS_HB_INTERVAL_MS`).
pub const HB_INTERVAL: Duration = Duration::from_millis(5000);
/// The kernel's missed-beat limit (`RTRS_HB_MISSED_MAX`).
pub const HB_MISSED_MAX: u32 = 5;

/// A heartbeat (`ack`: its acknowledgement) as both sides post it on cid 0:
/// a zero-length RDMA_WRITE_WITH_IMM to address 0, rkey 0 (spec §6).
pub fn hb_wr(wr_id: u64, ack: bool) -> SendWr<'static> {
    SendWr::write_with_imm(wr_id, &[], 0, 0, if ack { HB_ACK } else { HB_MSG })
}

/// Signals every `every`-th posted work request, as the kernel does with
/// its signal interval (`min(queue_depth, 512)`), so a send queue is reaped
/// without a completion per request.
#[derive(Clone, Copy, Debug)]
pub struct Signal {
    since: u32,
    every: u32,
}

impl Signal {
    /// Signals every `every`-th request (at least every one).
    pub fn every(every: u32) -> Signal {
        Signal {
            since: 0,
            every: every.max(1),
        }
    }

    /// The kernel's interval for a queue depth: `min(queue_depth, 512)`.
    pub fn for_queue_depth(queue_depth: u32) -> Signal {
        Signal::every(queue_depth.clamp(1, 512))
    }

    /// Whether the next request is signaled (counts it).
    pub fn take_turn(&mut self) -> bool {
        self.since += 1;
        if self.since >= self.every {
            self.since = 0;
            true
        } else {
            false
        }
    }

    /// `wr`, signaled or not as its turn says.
    pub fn apply<'a>(&mut self, wr: SendWr<'a>) -> SendWr<'a> {
        SendWr {
            signaled: self.take_turn(),
            ..wr
        }
    }
}

/// What the caller must do after a timer run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbAction {
    /// Nothing this time.
    Wait,
    /// Post an HB_MSG (zero-length WRITE_WITH_IMM on cid 0).
    Send,
    /// The peer is gone: recover (client) or close (server) the path.
    Dead,
}

/// One path's heartbeat.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    interval: Duration,
    missed_max: u32,
    missed: u32,
    next: Instant,
    last_sent: Option<Instant>,
    latency: Option<Duration>,
}

impl Heartbeat {
    /// Starts the heartbeat at `now` (first run one interval later).
    pub fn start(now: Instant, interval: Duration, missed_max: u32) -> Heartbeat {
        Heartbeat {
            interval,
            missed_max,
            missed: 0,
            next: now + interval,
            last_sent: None,
            latency: None,
        }
    }

    /// With the kernel's interval and limit.
    pub fn kernel(now: Instant) -> Heartbeat {
        Heartbeat::start(now, HB_INTERVAL, HB_MISSED_MAX)
    }

    /// When the timer must run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next
    }

    /// Runs the timer if it is due.
    pub fn handle_timeout(&mut self, now: Instant) -> HbAction {
        if now < self.next {
            return HbAction::Wait;
        }
        self.next = now + self.interval;
        if self.missed > self.missed_max {
            return HbAction::Dead;
        }
        if self.missed > 0 {
            self.missed += 1;
            return HbAction::Wait;
        }
        self.missed = 1;
        self.last_sent = Some(now);
        HbAction::Send
    }

    /// Any message arrived from the peer on this path.
    pub fn on_recv(&mut self) {
        self.missed = 0;
    }

    /// An HB_ACK arrived: also measures the round trip (the client's
    /// `cur_latency`, which min-latency routing uses).
    pub fn on_ack(&mut self, now: Instant) {
        self.missed = 0;
        if let Some(t) = self.last_sent {
            self.latency = Some(now.saturating_duration_since(t));
        }
    }

    /// The last measured heartbeat round trip (zero before the first, as in
    /// the kernel).
    pub fn latency(&self) -> Duration {
        self.latency.unwrap_or(Duration::ZERO)
    }

    /// Beats sent and not answered.
    pub fn missed(&self) -> u32 {
        self.missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_peer_is_dead_on_the_seventh_run() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::kernel(t0);
        assert_eq!(hb.handle_timeout(t0), HbAction::Wait, "not due yet");
        let mut actions = Vec::new();
        for k in 1..=7 {
            // A microsecond past each run: minstant counts TSC cycles, so
            // (t0 + 5 s) + 5 s can land a cycle after t0 + 10 s.
            let at = t0 + HB_INTERVAL * k + Duration::from_micros(k.into());
            actions.push(hb.handle_timeout(at));
        }
        use HbAction::*;
        assert_eq!(actions, [Send, Wait, Wait, Wait, Wait, Wait, Dead]);
        // 35 s after the last message (t0), within the kernel's 30-35 s.
    }

    #[test]
    fn traffic_keeps_the_path_alive_and_acks_measure_latency() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::kernel(t0);
        for k in 1..=100u32 {
            let now = t0 + HB_INTERVAL * k;
            assert_ne!(hb.handle_timeout(now), HbAction::Dead);
            hb.on_recv();
        }
        let now = t0 + HB_INTERVAL * 101;
        assert_eq!(hb.handle_timeout(now), HbAction::Send);
        assert_eq!(hb.latency(), Duration::ZERO);
        hb.on_ack(now + Duration::from_micros(42));
        // minstant counts TSC cycles: a duration survives the round trip
        // through cycles to within a few nanoseconds.
        let l = hb.latency().as_nanos() as i64;
        assert!((l - 42_000).abs() < 10, "latency {l} ns");
        assert_eq!(hb.missed(), 0);
        assert_eq!(hb.poll_timeout(), now + HB_INTERVAL);
    }

    #[test]
    fn one_beat_outstanding_at_a_time() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::start(t0, Duration::from_millis(10), 5);
        assert_eq!(
            hb.handle_timeout(t0 + Duration::from_millis(10)),
            HbAction::Send
        );
        assert_eq!(
            hb.handle_timeout(t0 + Duration::from_millis(20)),
            HbAction::Wait
        );
        hb.on_ack(t0 + Duration::from_millis(21));
        assert_eq!(
            hb.handle_timeout(t0 + Duration::from_millis(30)),
            HbAction::Send
        );
    }
}
