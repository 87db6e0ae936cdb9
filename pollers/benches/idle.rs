//! The cost of an idle core iteration (issue 12, the lazy clock): a core
//! runs `k` pollers that never have work for `--iters` iterations on this
//! thread (pinned to cpu 0); prints ns per iteration, best of `--runs`.
//!
//!   cargo bench -p pollers --bench idle [-- --iters N] [-- --runs R]

use minstant::Instant;
use pollers::{run_core, Poller, Shutdown};
use std::time::Duration;

/// Never has work; the first one stops the core after `limit` polls.
struct Idle {
    polls: u64,
    limit: u64,
    stop: Option<Shutdown>,
}

impl Poller for Idle {
    fn poll(&mut self, _now: Instant) -> usize {
        if let Some(s) = &self.stop {
            self.polls += 1;
            if self.polls == self.limit {
                s.trigger();
            }
        }
        0
    }
}

fn one(k: usize, iters: u64) -> f64 {
    let stop = Shutdown::new();
    let pollers: Vec<Box<dyn Poller>> = (0..k)
        .map(|i| {
            Box::new(Idle {
                polls: 0,
                limit: iters,
                stop: (i == 0).then(|| stop.clone()),
            }) as Box<dyn Poller>
        })
        .collect();
    let t0 = std::time::Instant::now();
    let r = run_core(0, pollers, None, &stop, Duration::from_millis(10));
    let ns = t0.elapsed().as_nanos() as f64;
    assert_eq!(r.stats.iterations, iters);
    ns / iters as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, d: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let iters = arg("--iters", 20_000_000);
    let runs = arg("--runs", 5);
    for k in [1usize, 4, 16] {
        let best = (0..runs)
            .map(|_| one(k, iters))
            .fold(f64::INFINITY, f64::min);
        println!("idle core iteration, {k:>2} idle pollers: {best:.2} ns (best of {runs}, {iters} iterations)");
    }
}
