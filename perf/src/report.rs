//! Latency histograms and the figures printed from them.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A histogram of nanoseconds, 1 ns .. 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// Latency figures in nanoseconds, as every `--json` prints them.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct LatNs {
    pub min: u64,
    pub mean: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub p99_99: u64,
    pub max: u64,
}

impl LatNs {
    /// Reads the figures off a histogram (all zero when it is empty).
    pub fn from_hist(h: &Histogram<u64>) -> LatNs {
        if h.is_empty() {
            return LatNs::default();
        }
        LatNs {
            min: h.min(),
            mean: h.mean().round() as u64,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            p99_99: h.value_at_quantile(0.9999),
            max: h.max(),
        }
    }
}

impl LatNs {
    /// Each figure halved: one-way latency from round trips, as perftest's
    /// ib_write_lat and ib_send_lat report it (RTT/2).
    pub fn halved(&self) -> LatNs {
        let h = |x: u64| x.div_ceil(2);
        LatNs {
            min: h(self.min),
            mean: h(self.mean),
            p50: h(self.p50),
            p90: h(self.p90),
            p99: h(self.p99),
            p99_9: h(self.p99_9),
            p99_99: h(self.p99_99),
            max: h(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v * 100).unwrap();
        }
        let l = LatNs::from_hist(&h);
        assert_eq!(l.min, 100);
        assert!((499_000..=501_000).contains(&l.p50), "{l:?}");
        assert!((989_000..=991_000).contains(&l.p99), "{l:?}");
        assert!(l.max >= 999_000 && l.max <= 1_001_000, "{l:?}");
        assert_eq!(LatNs::from_hist(&histogram()), LatNs::default());
        let half = l.halved();
        assert_eq!(half.min, 50);
        assert_eq!(half.p50, l.p50.div_ceil(2));
    }
}
