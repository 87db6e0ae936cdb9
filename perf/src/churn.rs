//! `--churn-sessions N`: sessions opened and closed one after another
//! beside the run's own, each with verified IO, on a thread of their own.
//!
//! ```text
//!  churn thread: for j in 0..N { open <sessname>-churnJ (every path up) -> RNBD open
//!                -> IOs on one lane (at least CHURN_IOS, the last slice of the device)
//!                -> close }   census after the first close and after the last
//! ```
//! A session that cannot open is counted (`failed`) and the next one
//! tried; the thread stops early when the run is interrupted.

use crate::engine_bench::{ClientOpts, EventLog};
use crate::lane::{Lane, LaneResult};
use minstant::Instant;
use rtrs_ctl::Census;
use rtrs_fabric::Fabric;
use rtrs_poll::clt::{Client, CltConfig};
use rtrs_poll::rnbd::RnbdClient;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// IOs each churn session completes at least (twice --iodepth if more).
pub const CHURN_IOS: u64 = 64;

/// How long one churn session's IO may take before it is cut short (an
/// error: its IO did not complete).
const CHURN_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the churn did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnSummary {
    /// Sessions asked for.
    pub sessions: u32,
    /// Opened, ran their IO and closed.
    pub done: u32,
    /// Could not open (or open their device), or their IO did not finish.
    pub failed: u32,
    /// The first failure.
    pub first_failure: Option<String>,
    /// IOs completed in all, and those that failed (verify mismatches
    /// included).
    pub ios: u64,
    pub errors: u64,
    pub errors_by_errno: std::collections::BTreeMap<i32, u64>,
    pub verify_failures: u64,
    pub duplicates: u64,
    /// IOs submitted that never completed (lost): must be 0.
    pub lost: u64,
    /// Session opens (every path up, RNBD device open): ms.
    pub open_ms_p50: f64,
    pub open_ms_max: f64,
    /// Seconds the churn took.
    pub secs: f64,
    /// The process after the first churn session closed, and after the
    /// last: what one more session left behind shows as a difference.
    pub census_first: Option<Census>,
    pub census_last: Option<Census>,
}

/// Runs `o.churn_sessions` sessions of `cfg`'s paths one after another,
/// their IO in slice `slice` of the device; stops early when `stop` is set.
pub fn run<F: Fabric>(
    fabric: &F,
    o: &ClientOpts,
    cfg: &CltConfig,
    slice: (u64, u64),
    stop: &AtomicBool,
) -> ChurnSummary {
    let t0 = Instant::now();
    let mut s = ChurnSummary {
        sessions: o.churn_sessions,
        ..Default::default()
    };
    let target = CHURN_IOS.max(2 * u64::from(o.iodepth));
    let mut opens = Vec::new();
    for j in 0..o.churn_sessions {
        if stop.load(Ordering::Relaxed) || crate::interrupted() {
            break;
        }
        let mut c = cfg.clone();
        c.sessname = format!("{}-churn{j}", o.sessname);
        c.cores = 1;
        match one(fabric, o, c, slice, target, j) {
            Ok((r, open_ms)) => {
                opens.push(open_ms);
                s.done += 1;
                s.ios += r.completed;
                s.errors += r.errors;
                for (e, k) in &r.by_errno {
                    *s.errors_by_errno.entry(*e).or_default() += k;
                }
                s.verify_failures += r.verify_failures;
                s.duplicates += r.duplicates;
                s.lost += r.submitted.saturating_sub(r.completed - r.duplicates);
            }
            Err(e) => {
                s.failed += 1;
                if s.first_failure.is_none() {
                    eprintln!("churn session {j}: {e}");
                    s.first_failure = Some(format!("session {j}: {e}"));
                }
            }
        }
        if j == 0 {
            s.census_first = Some(Census::take());
        }
    }
    s.census_last = Some(Census::take());
    opens.sort_by(f64::total_cmp);
    s.open_ms_p50 = opens.get(opens.len() / 2).copied().unwrap_or(0.0);
    s.open_ms_max = opens.last().copied().unwrap_or(0.0);
    s.secs = t0.elapsed().as_secs_f64();
    s
}

/// One churn session: open, IO, close. Its lane's figures and the open's ms.
fn one<F: Fabric>(
    fabric: &F,
    o: &ClientOpts,
    cfg: CltConfig,
    slice: (u64, u64),
    target: u64,
    j: u32,
) -> Result<(LaneResult, f64), String> {
    let t = Instant::now();
    let (clt, mut cores) = Client::open(fabric, cfg).map_err(|e| e.to_string())?;
    let mut core = cores.pop().ok_or("no core")?;
    let dev = Arc::new(OnceLock::new());
    let mut rnbd = match &o.rnbd_device {
        Some(tmpl) => {
            let name = &crate::engine_bench::rnbd_name(tmpl, "churn");
            let sub = core.submitter().map_err(|e| e.to_string())?;
            let mut rn = RnbdClient::new(&clt, sub);
            // This thread serves the submitter: poll the core meanwhile.
            let mut idle = || {
                core.poll(pollers::clock::now(), &mut |_| {});
            };
            rn.sess_info(&mut idle)
                .and_then(|_| rn.open(name, rtrs_proto::rnbd::AccessMode::Rw, &mut idle))
                .map(|d| {
                    let _ = dev.set(d);
                })
                .map_err(|e| format!("RNBD open {name}: {e}"))?;
            Some(rn)
        }
        None => None,
    };
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut events = EventLog::new(&clt, true, None);
    let seed = 0xc4_0c4e_u64 ^ (u64::from(j) << 20);
    let mut lane = Lane::new(core, o, dev, usize::MAX, 0, slice, seed);
    let deadline = Instant::now() + CHURN_IO_TIMEOUT;
    let mut timed_out = false;
    let mut turn = 0u64;
    while lane.completed() < target && !lane.failed() {
        let now = pollers::clock::now();
        if now > deadline {
            timed_out = true;
            break;
        }
        lane.step(now, o, false, false, None);
        turn += 1;
        if turn % 4096 == 0 {
            if let Some(rn) = rnbd.as_mut() {
                // RNBD events (a device to open again after a reconnect).
                rn.poll(&mut || {});
            }
            events.drain();
        }
    }
    let drain_by = Instant::now() + CHURN_IO_TIMEOUT;
    while lane.inflight() > 0 && Instant::now() < drain_by {
        lane.step(pollers::clock::now(), o, true, false, None);
    }
    lane.step(pollers::clock::now(), o, true, false, None);
    let inflight = lane.inflight();
    let (core, r) = lane.finish();
    drop(rnbd);
    clt.close();
    drop(core);
    if timed_out || inflight > 0 {
        return Err(format!(
            "{} of {target} IOs completed in {} s, {inflight} still in flight",
            r.completed,
            CHURN_IO_TIMEOUT.as_secs()
        ));
    }
    if let Some(e) = r.err.clone() {
        return Err(e);
    }
    Ok((r, open_ms))
}
