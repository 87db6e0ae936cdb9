//! A time-bounded mutation fuzzer shared by the decoder fuzz targets
//! (`proto_fuzz.rs`, `tcp_fuzz.rs`): valid seeds are mutated (bit flips,
//! interesting values, truncation, extension, splices) and checked.
//! `RTRS_FUZZ_SECS` is the budget of all targets of a file together.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// xorshift64*: deterministic per target, so a failure reproduces from the
/// printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One target's share of `RTRS_FUZZ_SECS` (default 3 s), split between
/// `targets` targets.
fn budget(targets: u32) -> Duration {
    let total: f64 = std::env::var("RTRS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64((total / f64::from(targets)).max(0.05))
}

const INTERESTING: [u16; 12] = [0, 1, 2, 3, 4, 5, 0x7f, 0xff, 0x0200, 0x1bbd, 0x8000, 0xffff];

pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seeds[rng.below(seeds.len())]);
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next() as u8;
            }
            2 if len > 1 => {
                let i = rng.below(len - 1);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                out[i..i + 2].copy_from_slice(&v.to_le_bytes());
            }
            3 => out.truncate(rng.below(len + 1)),
            4 => {
                for _ in 0..rng.below(40) {
                    out.push(rng.next() as u8);
                }
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ if len > 3 => {
                let i = rng.below(len - 3);
                let v = rng.next() as u32;
                out[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// Runs `check` on mutants of `seeds` for this target's share of the
/// budget (one of `targets`).
pub fn fuzz(name: &str, targets: u32, seeds: Vec<Vec<u8>>, mut check: impl FnMut(&[u8])) {
    let seed = 0x9e37_79b9_7f4a_7c15
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut rng = Rng(seed);
    let deadline = Instant::now() + budget(targets);
    let mut buf = Vec::with_capacity(1024);
    let mut n = 0u64;
    for s in &seeds {
        check(s);
    }
    while Instant::now() < deadline {
        for _ in 0..256 {
            mutate(&mut rng, &seeds, &mut buf);
            check(&buf);
            n += 1;
        }
    }
    eprintln!("fuzz {name}: {n} inputs, seed {seed:#x}");
}
