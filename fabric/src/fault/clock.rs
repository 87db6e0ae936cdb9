//! The wrapper's clock: the real one, or one a test moves by hand so that
//! delays are deterministic.

use minstant::Instant;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where held completions and CM events read the time, in nanoseconds since
/// the clock was made (whole numbers: a delay of `d` is due exactly when the
/// clock has moved by `d`, with no rounding through TSC cycles).
///
/// [`Clock::real`] (the default) reads `minstant::Instant::now()`. A
/// [`Clock::manual`] clock stands still until [`Clock::advance`] moves it;
/// clones share the same time.
#[derive(Clone, Debug)]
pub struct Clock {
    base: Instant,
    manual: Option<Arc<AtomicU64>>,
    /// A manual clock's pending deadlines (held completions and CM
    /// events), so a simulation moves time to the next one instead of
    /// past it.
    dues: Option<Arc<std::sync::Mutex<std::collections::BinaryHeap<std::cmp::Reverse<u64>>>>>,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::real()
    }
}

impl Clock {
    /// The real clock.
    pub fn real() -> Clock {
        Clock {
            base: Instant::now(),
            manual: None,
            dues: None,
        }
    }

    /// A clock that moves only when [`advance`](Clock::advance)d.
    pub fn manual() -> Clock {
        Clock {
            base: Instant::now(),
            manual: Some(Arc::new(AtomicU64::new(0))),
            dues: Some(Arc::default()),
        }
    }

    /// Whether this is a manual clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// Time since the clock was made (a manual clock: the sum of its advances).
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now_ns())
    }

    /// Moves a manual clock forward by `by`.
    ///
    /// # Panics
    /// On the real clock, which nobody moves.
    pub fn advance(&self, by: Duration) {
        let m = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        m.fetch_add(nanos(by), Ordering::AcqRel);
    }

    /// How long until the next thing a fault holds is due (a manual clock
    /// only; `None`: nothing held, or the real clock).
    pub fn next_due(&self) -> Option<Duration> {
        let dues = self.dues.as_ref()?;
        let now = self.now_ns();
        let mut h = dues.lock().unwrap_or_else(|e| e.into_inner());
        while h.peek().is_some_and(|d| d.0 <= now) {
            h.pop();
        }
        h.peek().map(|d| Duration::from_nanos(d.0 - now))
    }

    /// Something is held until `due_ns` (noted on a manual clock).
    pub(super) fn note_due(&self, due_ns: u64) {
        if let Some(dues) = &self.dues {
            dues.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(std::cmp::Reverse(due_ns));
        }
    }

    /// Nanoseconds since the clock was made.
    pub(super) fn now_ns(&self) -> u64 {
        match &self.manual {
            None => nanos(Instant::now().saturating_duration_since(self.base)),
            Some(m) => m.load(Ordering::Acquire),
        }
    }
}

/// `d` in nanoseconds, saturating.
pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = Clock::manual();
        assert_eq!(c.now_ns(), 0);
        let other = c.clone();
        other.advance(Duration::from_millis(3));
        assert_eq!(c.elapsed(), Duration::from_millis(3));
        assert!(!Clock::real().is_manual());
    }

    #[test]
    #[should_panic(expected = "manual clock")]
    fn the_real_clock_cannot_be_advanced() {
        Clock::real().advance(Duration::from_secs(1));
    }
}
