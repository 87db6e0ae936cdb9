//! Multipath policies, as the kernel's client picks paths (wire spec §8.1):
//! round-robin per core, min-inflight (the default) and min-latency. A request
//! asks an iterator for up to `paths` candidates; candidates that are not
//! connected are skipped; a candidate whose submission fails is skipped too.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Most paths a session has (`MAX_PATHS_NUM`).
pub const MAX_PATHS: usize = 128;

/// The kernel's `mpath_policy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MpPolicy {
    /// Each core walks the paths in turn (RR: 0).
    RoundRobin,
    /// The connected path with the fewest requests in flight (MI: 1, default).
    #[default]
    MinInflight,
    /// The connected path with the lowest heartbeat round trip (ML: 2).
    MinLatency,
}

impl MpPolicy {
    /// The policy of a number (unknown numbers give the default).
    pub fn from_code(code: u8) -> MpPolicy {
        match code {
            0 => MpPolicy::RoundRobin,
            2 => MpPolicy::MinLatency,
            _ => MpPolicy::MinInflight,
        }
    }

    /// The kernel's number for the policy.
    pub fn code(self) -> u8 {
        match self {
            MpPolicy::RoundRobin => 0,
            MpPolicy::MinInflight => 1,
            MpPolicy::MinLatency => 2,
        }
    }
}

impl fmt::Display for MpPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MpPolicy::RoundRobin => "round-robin",
            MpPolicy::MinInflight => "min-inflight",
            MpPolicy::MinLatency => "min-latency",
        })
    }
}

impl FromStr for MpPolicy {
    type Err = String;
    /// Accepts what the kernel's sysfs file accepts: 0/1/2, rr/mi/ml, or the names.
    fn from_str(s: &str) -> Result<MpPolicy, String> {
        let t = s.trim();
        let l = t.to_ascii_lowercase();
        Ok(match l.as_str() {
            "0" | "rr" | "round-robin" => MpPolicy::RoundRobin,
            "1" | "mi" | "min-inflight" => MpPolicy::MinInflight,
            "2" | "ml" | "min-latency" => MpPolicy::MinLatency,
            _ => {
                return Err(format!(
                    "unknown multipath policy {t:?}: use round-robin, min-inflight or min-latency"
                ))
            }
        })
    }
}

/// What the policy needs to know of a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathView {
    /// Whether IO may use it.
    pub connected: bool,
    /// Requests in flight on it.
    pub inflight: u64,
    /// Its last heartbeat round trip.
    pub latency: Duration,
}

/// One request's walk over the paths. No allocation: the paths tried so far
/// are a bit set.
#[derive(Clone, Copy, Debug)]
pub struct PathIter {
    policy: MpPolicy,
    tried: u128,
    steps: usize,
}

impl PathIter {
    /// Starts a walk.
    pub fn new(policy: MpPolicy) -> PathIter {
        PathIter {
            policy,
            tried: 0,
            steps: 0,
        }
    }

    /// The next candidate, or None when every path has been offered.
    /// `rr_cursor` is the calling core's round-robin position.
    pub fn next(&mut self, paths: &[PathView], rr_cursor: &mut Option<usize>) -> Option<usize> {
        let n = paths.len().min(MAX_PATHS);
        while self.steps < n {
            self.steps += 1;
            let pick = match self.policy {
                MpPolicy::RoundRobin => {
                    let next = rr_cursor.map_or(0, |c| (c + 1) % n);
                    *rr_cursor = Some(next);
                    Some(next).filter(|&i| paths[i].connected && self.tried & (1 << i) == 0)
                }
                MpPolicy::MinInflight => self.min_by(paths, n, |p| (p.inflight, Duration::ZERO)),
                MpPolicy::MinLatency => self.min_by(paths, n, |p| (0, p.latency)),
            };
            if let Some(i) = pick {
                self.tried |= 1 << i;
                return Some(i);
            }
        }
        None
    }

    fn min_by(
        &self,
        paths: &[PathView],
        n: usize,
        key: impl Fn(&PathView) -> (u64, Duration),
    ) -> Option<usize> {
        (0..n)
            .filter(|&i| paths[i].connected && self.tried & (1 << i) == 0)
            .min_by_key(|&i| key(&paths[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(inflight: u64, lat_us: u64) -> PathView {
        PathView {
            connected: true,
            inflight,
            latency: Duration::from_micros(lat_us),
        }
    }
    const DOWN: PathView = PathView {
        connected: false,
        inflight: 0,
        latency: Duration::ZERO,
    };

    fn all(policy: MpPolicy, paths: &[PathView], cur: &mut Option<usize>) -> Vec<usize> {
        let mut it = PathIter::new(policy);
        std::iter::from_fn(|| it.next(paths, cur)).collect()
    }

    #[test]
    fn round_robin_walks_on_per_core_and_skips_down_paths() {
        let paths = [up(0, 0), DOWN, up(0, 0)];
        let mut core0 = None;
        let mut core1 = None;
        assert_eq!(all(MpPolicy::RoundRobin, &paths, &mut core0), [0, 2]);
        // The cursor moved on every step, the skipped path included: the next
        // request on this core starts after path 2, i.e. at path 0.
        assert_eq!(core0, Some(2));
        let three = [up(0, 0), up(0, 0), up(0, 0)];
        let first = |cur: &mut Option<usize>| PathIter::new(MpPolicy::RoundRobin).next(&three, cur);
        let picks: Vec<_> = (0..4).map(|_| first(&mut core0)).collect();
        assert_eq!(picks, [Some(0), Some(1), Some(2), Some(0)]);
        // Another core walks on its own.
        assert_eq!(first(&mut core1), Some(0));
        assert_eq!(first(&mut core1), Some(1));
    }

    #[test]
    fn min_inflight_prefers_the_least_loaded_then_list_order() {
        let paths = [up(5, 0), up(2, 0), DOWN, up(2, 0)];
        assert_eq!(all(MpPolicy::MinInflight, &paths, &mut None), [1, 3, 0]);
    }

    #[test]
    fn min_latency_uses_the_heartbeat_rtt() {
        let paths = [up(0, 90), up(9, 10), up(0, 50)];
        assert_eq!(all(MpPolicy::MinLatency, &paths, &mut None), [1, 2, 0]);
    }

    #[test]
    fn no_connected_path_yields_nothing() {
        for p in [
            MpPolicy::RoundRobin,
            MpPolicy::MinInflight,
            MpPolicy::MinLatency,
        ] {
            assert!(all(p, &[DOWN, DOWN], &mut None).is_empty());
            assert!(all(p, &[], &mut None).is_empty());
        }
    }

    #[test]
    fn parses_what_sysfs_accepts() {
        for (s, p) in [
            ("0", MpPolicy::RoundRobin),
            ("RR", MpPolicy::RoundRobin),
            ("min-inflight", MpPolicy::MinInflight),
            ("mi", MpPolicy::MinInflight),
            ("2\n", MpPolicy::MinLatency),
            ("Min-Latency", MpPolicy::MinLatency),
        ] {
            assert_eq!(s.parse::<MpPolicy>(), Ok(p), "{s}");
        }
        assert!("fastest".parse::<MpPolicy>().is_err());
        assert_eq!(MpPolicy::default(), MpPolicy::MinInflight);
        assert_eq!(MpPolicy::MinLatency.to_string(), "min-latency");
    }
}
