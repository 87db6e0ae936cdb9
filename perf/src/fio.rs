//! `--json`: the summary's own fields (what scripts/ read: iops, ios,
//! errors, lat_ns, config, paths, ...) plus fio's shape, so tools written for
//! `fio --output-format=json+` read it: "rtrs-perf version", "timestamp",
//! "global options", and "jobs" (one per client core) with "read"/"write"
//! (io_bytes, bw in KiB/s, iops, clat_ns with percentiles and json+ bins)
//! and "error" (the first errno). The run's `err` (count, first errno)
//! sits at the top. docs/PERF.md has the mapping.

use crate::engine_bench::{DirResult, Summary};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// fio's default percentile list.
const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// The errno of the run's first failed IO (0: none, or a verify mismatch).
pub fn first_errno(s: &Summary) -> i32 {
    s.jobs.iter().find_map(|j| j.first_errno).unwrap_or(0)
}

/// The summary as one JSON object.
pub fn json(s: &Summary) -> Result<Value, String> {
    let mut v = serde_json::to_value(s).map_err(|e| e.to_string())?;
    let Value::Object(m) = &mut v else {
        return Err("the summary is not a JSON object".into());
    };
    let secs = s.seconds;
    let ts = s
        .started
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    m.insert(
        "rtrs-perf version".into(),
        json!(concat!("rtrs-perf-", env!("CARGO_PKG_VERSION"))),
    );
    m.insert("timestamp".into(), json!(ts.as_secs()));
    m.insert("timestamp_ms".into(), json!(ts.as_millis() as u64));
    m.insert(
        "err".into(),
        json!({
            "count": s.io.errors,
            "first_errno": first_errno(s),
            "verify_mismatches": s.io.verify_failures,
        }),
    );
    let c = &s.config;
    let global = json!({
        "rw": c.rw, "bs": c.bs.to_string(), "iodepth": c.iodepth.to_string(),
        "numjobs": c.cores.len().to_string(), "runtime": c.runtime.to_string(),
        "ramp_time": c.ramp_time.to_string(), "rwmixread": c.rwmixread.to_string(),
        "size": c.size.unwrap_or(crate::engine_bench::DEFAULT_SIZE).to_string(), "verify": c.verify.to_string(),
        "sessname": c.sessname,
        "connect": c.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
    });
    m.insert("global options".into(), global);
    let jobs: Vec<Value> = s
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            json!({
                "jobname": c.sessname,
                "groupid": 0,
                "job": i,
                "cpu": j.cpu,
                "error": j.first_errno.unwrap_or(0),
                "total_err": j.errors,
                "elapsed": secs.round() as u64,
                "job options": {"cpus_allowed": j.cpu.to_string()},
                "read": dir(&j.read, secs),
                "write": dir(&j.write, secs),
                "trim": dir(&empty(), secs),
            })
        })
        .collect();
    m.insert("jobs".into(), Value::Array(jobs));
    Ok(v)
}

fn empty() -> DirResult {
    DirResult {
        hist: crate::report::histogram(),
        ios: 0,
        bytes: 0,
    }
}

/// One direction as fio prints it.
fn dir(d: &DirResult, secs: f64) -> Value {
    let secs = secs.max(1e-9);
    let clat = stats(&d.hist, true);
    json!({
        "io_bytes": d.bytes,
        "io_kbytes": d.bytes / 1024,
        "bw_bytes": (d.bytes as f64 / secs).round() as u64,
        "bw": (d.bytes as f64 / 1024.0 / secs).round() as u64,
        "iops": d.ios as f64 / secs,
        "runtime": (secs * 1000.0).round() as u64,
        "total_ios": d.ios,
        "short_ios": 0,
        "drop_ios": 0,
        // Submission is a function call on the core: no separate slat.
        "slat_ns": stats(&crate::report::histogram(), false),
        "clat_ns": clat,
        "lat_ns": stats(&d.hist, false),
    })
}

fn stats(h: &Histogram<u64>, percentiles: bool) -> Value {
    let n = h.len();
    let z = |x: u64| if n == 0 { 0 } else { x };
    let mut v = json!({
        "min": z(h.min()),
        "max": z(h.max()),
        "mean": if n == 0 { 0.0 } else { h.mean() },
        "stddev": if n == 0 { 0.0 } else { h.stdev() },
        "N": n,
    });
    if percentiles && n > 0 {
        let p: Map<String, Value> = PERCENTILES
            .iter()
            .map(|&q| (format!("{q:.6}"), json!(h.value_at_percentile(q))))
            .collect();
        // json+: the recorded buckets, ns -> count.
        let bins: Map<String, Value> = h
            .iter_recorded()
            .map(|b| {
                (
                    h.highest_equivalent(b.value_iterated_to()).to_string(),
                    json!(b.count_at_value()),
                )
            })
            .collect();
        v["percentile"] = Value::Object(p);
        v["bins"] = Value::Object(bins);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direction_carries_fio_s_fields() {
        let mut d = empty();
        for ns in 1..=1000u64 {
            d.hist.record(ns * 1000).unwrap();
        }
        d.ios = 1000;
        d.bytes = 1000 * 4096;
        let v = dir(&d, 2.0);
        assert_eq!(v["iops"].as_f64(), Some(500.0));
        assert_eq!(v["bw"].as_u64(), Some(2000), "KiB/s");
        assert_eq!(v["io_bytes"].as_u64(), Some(4_096_000));
        let c = &v["clat_ns"];
        let p50 = c["percentile"]["50.000000"].as_u64().unwrap();
        assert!((499_000..=501_000).contains(&p50), "{p50}");
        assert!(c["percentile"]["99.990000"].as_u64().is_some());
        assert!(c["stddev"].as_f64().unwrap() > 250_000.0);
        let bins: u64 = c["bins"]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_u64().unwrap())
            .sum();
        assert_eq!(bins, 1000);
        assert_eq!(dir(&empty(), 1.0)["clat_ns"]["N"].as_u64(), Some(0));
    }
}
