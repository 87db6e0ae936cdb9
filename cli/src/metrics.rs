//! `rtrs serve --metrics ADDR`: the server's counters in the Prometheus
//! text format, on a small HTTP endpoint of its own thread (never a core).
//!
//! ```text
//!  GET /metrics ──> rtrs_refusals_total{kind=...}, rtrs_sessions, rtrs_session_memory_bytes,
//!                   rtrs_deferred_placements_total, rtrs_rnbd_refusals_total{kind=...},
//!                   rtrs_rnbd_backend_events_total{kind=...},
//!                   rtrs_hugepage_bytes, rtrs_hugepage_limit_bytes, rtrs_hugepage_fallbacks_total
//! ```

use rtrs_poll::rnbd::RnbdServer;
use rtrs_poll::srv::SrvCounters;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

/// One metric: its HELP and TYPE lines, then a sample per (kind label, value)
/// (no label when the kind is empty).
fn metric(o: &mut String, name: &str, ty: &str, help: &str, samples: &[(&str, u64)]) {
    o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {ty}\n"));
    for (kind, v) in samples {
        if kind.is_empty() {
            o.push_str(&format!("{name} {v}\n"));
        } else {
            o.push_str(&format!("{name}{{kind=\"{kind}\"}} {v}\n"));
        }
    }
}

/// The exposition text.
pub fn render(srv: &SrvCounters, rnbd: &RnbdServer) -> String {
    let mut o = String::new();
    let (sessions, bytes) = srv.sessions();
    let huge = mempool::huge_stats();
    let refusals: Vec<(&str, u64)> = srv.refusals().iter().map(|(k, n)| (k.name(), *n)).collect();
    let rnbd_refusals: Vec<(&str, u64)> = rnbd
        .counters()
        .refusals()
        .iter()
        .map(|(k, n)| (k.name(), *n))
        .collect();
    let c = "counter";
    let g = "gauge";
    metric(
        &mut o,
        "rtrs_refusals_total",
        c,
        "Connect requests refused, by kind.",
        &refusals,
    );
    metric(
        &mut o,
        "rtrs_sessions",
        g,
        "Sessions now.",
        &[("", sessions as u64)],
    );
    metric(
        &mut o,
        "rtrs_session_memory_bytes",
        g,
        "Chunk memory the sessions hold.",
        &[("", bytes)],
    );
    metric(
        &mut o,
        "rtrs_deferred_placements_total",
        c,
        "New connections a full core inbox made wait.",
        &[("", srv.deferred_placements())],
    );
    metric(
        &mut o,
        "rtrs_rnbd_refusals_total",
        c,
        "RNBD opens and IOs refused, by kind.",
        &rnbd_refusals,
    );
    metric(
        &mut o,
        "rtrs_rnbd_backend_events_total",
        c,
        "File and device backend events: IO errors answered, short transfers resubmitted, misaligned O_DIRECT refusals, fallocate mode fallbacks, connections served without io_uring.",
        &rnbd.backend_counters().by_kind(),
    );
    metric(
        &mut o,
        "rtrs_hugepage_bytes",
        g,
        "Hugepage memory this process holds.",
        &[("", huge.held)],
    );
    metric(
        &mut o,
        "rtrs_hugepage_limit_bytes",
        g,
        "Hugepage memory this process may take.",
        &[("", huge.limit)],
    );
    metric(
        &mut o,
        "rtrs_hugepage_fallbacks_total",
        c,
        "Regions that came from 4 KiB pages.",
        &[("", huge.fallbacks)],
    );
    o
}

/// Serves `GET /metrics` on `addr` from a thread of its own until the
/// process ends; returns the address it listens on.
pub fn serve(
    addr: SocketAddr,
    srv: Arc<SrvCounters>,
    rnbd: Arc<RnbdServer>,
) -> Result<SocketAddr, String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("--metrics {addr}: {e}"))?;
    let local = l.local_addr().map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("rtrs-metrics".into())
        .spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                if s.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
                    continue;
                }
                let mut req = [0u8; 1024];
                let n = s.read(&mut req).unwrap_or(0);
                let head = String::from_utf8_lossy(&req[..n]);
                let (status, body) = if head.starts_with("GET /metrics") {
                    ("200 OK", render(&srv, &rnbd))
                } else {
                    ("404 Not Found", "GET /metrics\n".to_string())
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = s.write_all(reply.as_bytes()) {
                    tracing::debug!("metrics: {e}");
                }
            }
        })
        .map_err(|e| format!("the metrics thread: {e}"))?;
    Ok(local)
}
