//! alloc+free pair cost: one core, and two cores hammering one pool at once,
//! printed beside a Mutex<Vec<u32>> pool doing the same in the same run.
//!
//!   cargo bench -p mempool --bench pool [-- --json] [-- --iters N]

use mempool::{ChunkPool, Region};
use minstant::Instant;
use std::sync::{Arc, Barrier, Mutex};

fn pin(core: usize) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        eprintln!("warning: cannot pin to core {core}");
    }
}

struct MutexPool(Mutex<Vec<u32>>);

impl MutexPool {
    fn new(n: u32) -> MutexPool {
        MutexPool(Mutex::new((0..n).collect()))
    }
    fn alloc(&self) -> Option<u32> {
        self.0.lock().unwrap().pop()
    }
    fn free(&self, i: u32) {
        self.0.lock().unwrap().push(i)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Shared,
    Mutex,
}

/// ns per alloc+free pair on `threads` threads (pinned to cores 0..threads).
fn run(kind: Kind, threads: usize, iters: u64) -> f64 {
    let pool = Arc::new(
        ChunkPool::new(Arc::new(Region::anonymous(4 << 20).unwrap()), 2048, &mut ()).unwrap(),
    );
    let mx = Arc::new(MutexPool::new(pool.chunks()));
    let start = Arc::new(Barrier::new(threads));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (pool, mx, start) = (pool.clone(), mx.clone(), start.clone());
            std::thread::spawn(move || {
                pin(t);
                start.wait();
                let t0 = Instant::now();
                for _ in 0..iters {
                    match kind {
                        Kind::Shared => {
                            let c = pool.alloc().unwrap();
                            pool.free(std::hint::black_box(c)).unwrap();
                        }
                        Kind::Mutex => {
                            let c = mx.alloc().unwrap();
                            mx.free(std::hint::black_box(c));
                        }
                    }
                }
                t0.elapsed().as_nanos() as f64 / iters as f64
            })
        })
        .collect();
    let per: Vec<f64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    per.iter().sum::<f64>() / per.len() as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let iters: u64 = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let rows = [
        ("lock-free shared list", Kind::Shared),
        ("Mutex<Vec<u32>> (peer)", Kind::Mutex),
    ];
    let figs: Vec<(&str, f64, f64)> = rows
        .iter()
        .map(|&(name, k)| (name, run(k, 1, iters), run(k, 2, iters)))
        .collect();
    if json {
        let parts: Vec<String> = figs
            .iter()
            .map(|(n, one, two)| {
                format!("{{\"pool\":\"{n}\",\"one_core_ns\":{one:.1},\"two_cores_ns\":{two:.1}}}")
            })
            .collect();
        println!("[{}]", parts.join(","));
        return;
    }
    println!("alloc+free pair, ns ({iters} pairs per thread; two cores: both at once on one pool)");
    println!("{:<28} {:>10} {:>10}", "", "one core", "two cores");
    for (n, one, two) in figs {
        println!("{n:<28} {one:>10.1} {two:>10.1}");
    }
}
