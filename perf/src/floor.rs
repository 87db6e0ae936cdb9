//! `rtrs-perf floor`: what the hardware allows, measured in the same run as
//! the benchmarks: one cache line bounced between two pinned threads, and the
//! same ping-pong moving data exactly as `fabric-lat` does, with nothing but
//! the copies: the pinger stamps its send buffer, the ponger copies it into its
//! receive buffer, the pinger copies that back into its own receive buffer.
//! No copying transport can round-trip faster than the second figure.

use crate::report::{self, LatNs};
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Round-trip latency of a ping-pong moving `size` bytes each way as
/// fabric-lat does (0: the bare cache-line ping-pong).
pub fn ping_pong(size: usize, iters: u64, cores: (usize, usize)) -> Result<LatNs, String> {
    let ping = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let pong = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let n = size.max(8);
    let client_send = crate::shareable(n)?;
    let server_recv = crate::shareable(n)?;
    let client_recv = crate::shareable(n)?;
    let warmup = iters / 10;
    let total = warmup + iters;
    let peer = {
        let (ping, pong) = (ping.clone(), pong.clone());
        let (src, dst) = (client_send.clone(), server_recv.clone());
        std::thread::spawn(move || {
            if let Err(e) = crate::pin(cores.1) {
                // The spinning main thread would wait for this one forever.
                eprintln!("rtrs-perf: {e}");
                std::process::exit(1);
            }
            for i in 1..=total {
                while ping.load(Ordering::Acquire) != i {
                    std::hint::spin_loop();
                }
                if size > 0 {
                    let _ = src.copy_to(0, &*dst, 0, size);
                }
                pong.store(i, Ordering::Release);
            }
        })
    };
    crate::pin(cores.0)?;
    let mut hist = report::histogram();
    for i in 1..=total {
        let t0 = minstant::Instant::now();
        if size > 0 {
            client_send
                .write(0, &i.to_le_bytes())
                .map_err(|e| e.to_string())?;
        }
        ping.store(i, Ordering::Release);
        while pong.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
        if size > 0 {
            server_recv
                .copy_to(0, &*client_recv, 0, size)
                .map_err(|e| e.to_string())?;
        }
        if i > warmup {
            hist.saturating_record(t0.elapsed().as_nanos() as u64);
        }
    }
    let _ = peer.join();
    Ok(LatNs::from_hist(&hist))
}
