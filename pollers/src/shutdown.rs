//! Clean shutdown: one process-wide flag, set by Ctrl-C (SIGINT/SIGTERM via
//! the ctrlc crate) or programmatically. Cores check it once per iteration.

use crate::PollersError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A shutdown flag shared by cores and the slow path.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<AtomicBool>);

static CTRLC: OnceLock<Shutdown> = OnceLock::new();

impl Shutdown {
    /// A fresh flag, not tied to signals.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// The process-wide flag that Ctrl-C sets; installs the handler the first
    /// time it is asked for.
    pub fn on_ctrlc() -> Result<Shutdown, PollersError> {
        if let Some(s) = CTRLC.get() {
            return Ok(s.clone());
        }
        let s = Shutdown::new();
        let s2 = s.clone();
        ctrlc::set_handler(move || s2.trigger())
            .map_err(|e| PollersError::Signal(e.to_string()))?;
        Ok(CTRLC.get_or_init(|| s).clone())
    }

    /// Asks everyone to stop.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
