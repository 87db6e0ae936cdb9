//! `rtrs serve --metrics ADDR`: the server's counters in the Prometheus
//! text format, on a small HTTP endpoint of its own thread (never a core).
//!
//! ```text
//!  GET /metrics ──> rtrs_refusals_total{kind=...}, rtrs_sessions, rtrs_session_memory_bytes,
//!                   rtrs_deferred_placements_total, rtrs_rnbd_refusals_total{kind=...},
//!                   rtrs_rnbd_backend_events_total{kind=...},
//!                   rtrs_hugepage_bytes, rtrs_hugepage_limit_bytes, rtrs_hugepage_fallbacks_total,
//!                   rtrs_chunk_pool_sessions, rtrs_chunk_pool_in_use, rtrs_chunk_pool_huge,
//!                   rtrs_sessions_chunks_total{kind=pool|own}
//!                   per path {session,path}: rtrs_path_ios_total{dir}, rtrs_path_bytes_total{dir},
//!                     rtrs_path_inflight, rtrs_path_errors_total, rtrs_path_heartbeats_missed,
//!                     rtrs_path_latency_seconds{quantile} (summary)
//!                   per core {core,cpu}: rtrs_core_polls_total, rtrs_core_busy_polls_total,
//!                     rtrs_core_busy_ratio, rtrs_core_ios_total, rtrs_core_connections{state},
//!                     rtrs_io_latency_seconds{quantile} (summary)
//!                   rtrs_session_open_devices{session}, rtrs_operator_path_closes_total,
//!                   rtrs_ctl_refused_total
//! ```
//! The latency summaries are cumulative since the start (fixed log-linear
//! buckets, see `rtrs_poll::srv::lat`): quantiles of every IO so far.

use crate::ctl::{Backend, Quantiles, Snapshot};
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

/// A label value, escaped as the exposition format wants.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One family: HELP and TYPE once, then each sample as `name{labels} value`
/// (`suffix` for a summary's _sum and _count).
fn family(o: &mut String, name: &str, ty: &str, help: &str, samples: &[(&str, String, String)]) {
    o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {ty}\n"));
    for (suffix, labels, v) in samples {
        if labels.is_empty() {
            o.push_str(&format!("{name}{suffix} {v}\n"));
        } else {
            o.push_str(&format!("{name}{suffix}{{{labels}}} {v}\n"));
        }
    }
}

/// A summary's samples: the quantiles, _sum (seconds) and _count.
fn summary(labels: &str, q: &Quantiles) -> Vec<(&'static str, String, String)> {
    let sec = |ns: u64| format!("{:e}", ns as f64 / 1e9);
    let mut v: Vec<(&'static str, String, String)> = [
        ("0.5", q.p50_ns),
        ("0.9", q.p90_ns),
        ("0.99", q.p99_ns),
        ("0.999", q.p999_ns),
    ]
    .iter()
    .map(|(k, ns)| ("", format!("{labels},quantile=\"{k}\""), sec(*ns)))
    .collect();
    v.push(("_sum", labels.to_string(), sec(q.sum_ns)));
    v.push(("_count", labels.to_string(), q.count.to_string()));
    v
}

/// The per-session, per-path and per-core families of a snapshot.
fn render_snapshot(o: &mut String, s: &Snapshot) {
    let paths: Vec<(String, &crate::ctl::PathView)> = s
        .sessions
        .iter()
        .flat_map(|x| x.paths.iter())
        .map(|p| {
            (
                format!("session=\"{}\",path=\"{}\"", esc(&p.session), p.id),
                p,
            )
        })
        .collect();
    let per_path = |f: &dyn Fn(&crate::ctl::PathView) -> u64| -> Vec<(&str, String, String)> {
        paths
            .iter()
            .map(|(l, p)| ("", l.clone(), f(p).to_string()))
            .collect()
    };
    let dirs = |f: &dyn Fn(&crate::ctl::DirStats) -> u64| -> Vec<(&str, String, String)> {
        paths
            .iter()
            .flat_map(|(l, p)| {
                [
                    (
                        "",
                        format!("{l},dir=\"read\""),
                        f(&p.stats.read).to_string(),
                    ),
                    (
                        "",
                        format!("{l},dir=\"write\""),
                        f(&p.stats.write).to_string(),
                    ),
                ]
            })
            .collect()
    };
    let (c, g) = ("counter", "gauge");
    family(
        o,
        "rtrs_path_ios_total",
        c,
        "IO requests per path and direction (the kernel's rdma stats cnt).",
        &dirs(&|d| d.cnt),
    );
    family(
        o,
        "rtrs_path_bytes_total",
        c,
        "IO bytes per path and direction (the kernel's rdma stats bytes).",
        &dirs(&|d| d.bytes),
    );
    family(
        o,
        "rtrs_path_inflight",
        g,
        "Requests in the handler's hands per path.",
        &per_path(&|p| p.stats.inflight),
    );
    family(
        o,
        "rtrs_path_errors_total",
        c,
        "Responses with an errno per path.",
        &per_path(&|p| p.stats.errors),
    );
    family(
        o,
        "rtrs_path_heartbeats_missed",
        g,
        "Heartbeats now unanswered in a row per path.",
        &per_path(&|p| u64::from(p.stats.hb_missed)),
    );
    let lat: Vec<_> = paths
        .iter()
        .flat_map(|(l, p)| summary(l, &p.stats.latency))
        .collect();
    family(
        o,
        "rtrs_path_latency_seconds",
        "summary",
        "Request residence time per path (poll that took it to response posted), since the start.",
        &lat,
    );
    let cores: Vec<(String, &crate::ctl::CoreView)> = s
        .cores
        .iter()
        .map(|x| (format!("core=\"{}\",cpu=\"{}\"", x.core, x.cpu), x))
        .collect();
    let per_core = |f: &dyn Fn(&crate::ctl::CoreView) -> String| -> Vec<(&str, String, String)> {
        cores.iter().map(|(l, x)| ("", l.clone(), f(x))).collect()
    };
    family(
        o,
        "rtrs_core_polls_total",
        c,
        "Poll loop iterations per core.",
        &per_core(&|x| x.polls.to_string()),
    );
    family(
        o,
        "rtrs_core_busy_polls_total",
        c,
        "Poll loop iterations that found work, per core.",
        &per_core(&|x| x.busy_polls.to_string()),
    );
    family(
        o,
        "rtrs_core_busy_ratio",
        g,
        "Share of a core's time in busy iterations.",
        &per_core(&|x| format!("{:.4}", x.busy_ratio)),
    );
    family(
        o,
        "rtrs_core_ios_total",
        c,
        "IO requests served per core.",
        &per_core(&|x| x.ios.to_string()),
    );
    let cons: Vec<_> = cores
        .iter()
        .flat_map(|(l, x)| {
            [
                (
                    "",
                    format!("{l},state=\"active\""),
                    x.active_cons.to_string(),
                ),
                (
                    "",
                    format!("{l},state=\"parked\""),
                    x.parked_cons.to_string(),
                ),
            ]
        })
        .collect();
    family(
        o,
        "rtrs_core_connections",
        g,
        "Connections on a core, polled every iteration or parked.",
        &cons,
    );
    let lat: Vec<_> = cores
        .iter()
        .flat_map(|(l, x)| summary(l, &x.latency))
        .collect();
    family(
        o,
        "rtrs_io_latency_seconds",
        "summary",
        "Request residence time per core, since the start.",
        &lat,
    );
    let devs: Vec<_> = s
        .sessions
        .iter()
        .map(|x| {
            (
                "",
                format!("session=\"{}\"", esc(&x.name)),
                x.devices.len().to_string(),
            )
        })
        .collect();
    family(
        o,
        "rtrs_session_open_devices",
        g,
        "Devices a session has open.",
        &devs,
    );
    family(
        o,
        "rtrs_operator_path_closes_total",
        c,
        "Paths closed by the operator (rtrs ctl).",
        &[("", String::new(), s.operator_closes.to_string())],
    );
    family(
        o,
        "rtrs_ctl_refused_total",
        c,
        "Control socket connections refused (another uid).",
        &[("", String::new(), s.ctl_refused.to_string())],
    );
}

/// A family of plain samples: name, type, help, (kind label, value)s.
type Family<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, u64)>);

/// The exposition text.
pub fn render(srv: &SrvCounters, rnbd: &RnbdServer, snap: &Snapshot) -> String {
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
    let pool = srv.pool();
    // (name, type, help, samples): the server-wide families.
    let table: [Family; 13] = [
        ("rtrs_refusals_total", c, "Connect requests refused, by kind.", refusals),
        ("rtrs_sessions", g, "Sessions now.", vec![("", sessions as u64)]),
        ("rtrs_session_memory_bytes", g, "Chunk memory the sessions hold.", vec![("", bytes)]),
        ("rtrs_deferred_placements_total", c, "New connections a full core inbox made wait.", vec![("", srv.deferred_placements())]),
        ("rtrs_rnbd_refusals_total", c, "RNBD opens and IOs refused, by kind.", rnbd_refusals),
        ("rtrs_rnbd_backend_events_total", c, "File and device backend events: IO errors answered, short transfers resubmitted, misaligned O_DIRECT refusals, fallocate mode fallbacks, connections served without io_uring.", rnbd.backend_counters().by_kind().to_vec()),
        ("rtrs_hugepage_bytes", g, "Hugepage memory this process holds.", vec![("", huge.held)]),
        ("rtrs_hugepage_limit_bytes", g, "Hugepage memory this process may take.", vec![("", huge.limit)]),
        ("rtrs_hugepage_fallbacks_total", c, "Regions that came from 4 KiB pages.", vec![("", huge.fallbacks)]),
        ("rtrs_chunk_pool_sessions", g, "Sessions whose chunk memory was preallocated at start.", vec![("", pool.sessions)]),
        ("rtrs_chunk_pool_in_use", g, "Chunk pool slabs held now (by sessions, or by the paths of ended ones until they let go).", vec![("", pool.in_use)]),
        ("rtrs_chunk_pool_huge", g, "1 when hugepages back the chunk pool, 0 on the 4 KiB fallback.", vec![("", u64::from(pool.huge))]),
        ("rtrs_sessions_chunks_total", c, "Sessions so far by where their chunks came from (the pool, or memory of their own).", vec![("pool", pool.pooled), ("own", pool.own)]),
    ];
    for (name, ty, help, samples) in &table {
        metric(&mut o, name, ty, help, samples);
    }
    render_snapshot(&mut o, snap);
    o
}

/// Serves `GET /metrics` on `addr` from a thread of its own until the
/// process ends; returns the address it listens on.
pub fn serve(
    addr: SocketAddr,
    srv: Arc<SrvCounters>,
    rnbd: Arc<RnbdServer>,
    backend: Arc<dyn Backend + Send + Sync>,
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
                    ("200 OK", render(&srv, &rnbd, &backend.snapshot()))
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
