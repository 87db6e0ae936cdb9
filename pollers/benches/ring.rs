//! Ring latency between two pinned cores, printed beside the cache-line
//! ping-pong floor measured in the same run.
//!
//!   cargo bench -p pollers --bench ring [-- --json] [-- --iters N]

use crossbeam_utils::CachePadded;
use minstant::Instant;
use pollers::{mpsc, spsc};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn pin(core: usize) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        eprintln!("warning: cannot pin to core {core}");
    }
}

/// Sorted samples -> (min, p50, p99) in ns.
fn stats(mut v: Vec<u64>) -> (u64, u64, u64) {
    v.sort_unstable();
    let q = |f: f64| v[((v.len() as f64 - 1.0) * f) as usize];
    (v[0], q(0.5), q(0.99))
}

fn floor_rtt(iters: u64) -> Vec<u64> {
    let ping = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let pong = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let (p2, q2) = (ping.clone(), pong.clone());
    let t = std::thread::spawn(move || {
        pin(1);
        for i in 1..=iters {
            while p2.load(Ordering::Acquire) != i {
                std::hint::spin_loop();
            }
            q2.store(i, Ordering::Release);
        }
    });
    pin(0);
    let mut v = Vec::with_capacity(iters as usize);
    for i in 1..=iters {
        let t0 = Instant::now();
        ping.store(i, Ordering::Release);
        while pong.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
        v.push(t0.elapsed().as_nanos() as u64);
    }
    t.join().unwrap();
    v
}

fn spsc_rtt(iters: u64) -> Vec<u64> {
    let (mut to_b, mut at_b) = spsc::channel::<u64>(64);
    let (mut to_a, mut at_a) = spsc::channel::<u64>(64);
    let t = std::thread::spawn(move || {
        pin(1);
        let mut n = 0;
        while n < iters {
            if let Some(x) = at_b.pop() {
                while to_a.push(x).is_err() {}
                n += 1;
            }
        }
    });
    pin(0);
    let mut v = Vec::with_capacity(iters as usize);
    for i in 0..iters {
        let t0 = Instant::now();
        to_b.push(i).unwrap();
        loop {
            if at_a.pop().is_some() {
                break;
            }
        }
        v.push(t0.elapsed().as_nanos() as u64);
    }
    t.join().unwrap();
    v
}

fn spsc_one_way(iters: u64) -> Vec<u64> {
    let (mut tx, mut rx) = spsc::channel::<Instant>(64);
    let seen = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let seen2 = seen.clone();
    let t = std::thread::spawn(move || {
        pin(1);
        let mut v = Vec::with_capacity(iters as usize);
        for i in 1..=iters {
            let sent = loop {
                if let Some(s) = rx.pop() {
                    break s;
                }
            };
            v.push(Instant::now().duration_since(sent).as_nanos() as u64);
            seen2.store(i, Ordering::Release);
        }
        v
    });
    pin(0);
    for i in 1..=iters {
        tx.push(Instant::now()).unwrap();
        // One message in flight at a time: no queueing in the figure.
        while seen.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
    }
    t.join().unwrap()
}

fn spsc_rate(n: u64) -> f64 {
    let (mut tx, mut rx) = spsc::channel::<u64>(1024);
    let t = std::thread::spawn(move || {
        pin(1);
        let mut got = 0;
        while got < n {
            got += rx.pop_batch(64, |x| {
                std::hint::black_box(x);
            }) as u64;
        }
    });
    pin(0);
    let t0 = Instant::now();
    let mut it = (0..n).peekable();
    while it.peek().is_some() {
        tx.push_batch(&mut it);
    }
    t.join().unwrap();
    n as f64 / t0.elapsed().as_secs_f64()
}

fn mpsc_rate(n: u64) -> f64 {
    let (tx, mut rx) = mpsc::channel::<u64>(1024);
    let t = std::thread::spawn(move || {
        pin(1);
        let mut got = 0;
        while got < n {
            got += rx.pop_batch(64, |x| {
                std::hint::black_box(x);
            }) as u64;
        }
    });
    pin(0);
    let t0 = Instant::now();
    let mut i = 0;
    while i < n {
        if tx.push(i).is_ok() {
            i += 1;
        }
    }
    t.join().unwrap();
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let iters: u64 = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let floor = stats(floor_rtt(iters));
    let rtt = stats(spsc_rtt(iters));
    let one = stats(spsc_one_way(iters));
    let srate = spsc_rate(iters * 50);
    let mrate = mpsc_rate(iters * 20);
    if json {
        println!(
            "{{\"floor_rtt_ns\":{{\"min\":{},\"p50\":{},\"p99\":{}}},\"spsc_rtt_ns\":{{\"min\":{},\"p50\":{},\"p99\":{}}},\"spsc_one_way_ns\":{{\"min\":{},\"p50\":{},\"p99\":{}}},\"spsc_msgs_per_s\":{:.0},\"mpsc_msgs_per_s\":{:.0}}}",
            floor.0, floor.1, floor.2, rtt.0, rtt.1, rtt.2, one.0, one.1, one.2, srate, mrate
        );
        return;
    }
    println!("ring latency between cores 0 and 1 ({iters} samples each), ns");
    println!("{:<40} {:>8} {:>8} {:>8}", "", "min", "p50", "p99");
    println!(
        "{:<40} {:>8} {:>8} {:>8}",
        "floor: cache-line ping-pong RTT", floor.0, floor.1, floor.2
    );
    println!(
        "{:<40} {:>8} {:>8} {:>8}",
        "spsc ring round trip (two rings)", rtt.0, rtt.1, rtt.2
    );
    println!(
        "{:<40} {:>8} {:>8} {:>8}",
        "spsc ring one way (TSC stamps)", one.0, one.1, one.2
    );
    println!("spsc batched throughput: {:.1} M msgs/s", srate / 1e6);
    println!(
        "mpsc throughput (one producer): {:.1} M msgs/s",
        mrate / 1e6
    );
}
