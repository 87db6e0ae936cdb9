//! rtrs-perf as a user runs it: the embedded main job with --json, a server
//! and a client in separate processes, and bad arguments.

use std::process::{Command, Stdio};
use std::time::Duration;

fn perf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rtrs-perf"))
}

/// One test at a time: each pins busy-polling cores to CPUs 0 and 1, and
/// two of them at once would share those two CPUs four ways.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `rtrs-perf embedded ARGS --json`.
fn embedded(args: &[&str]) -> std::process::Output {
    perf()
        .arg("embedded")
        .args(args)
        .arg("--json")
        .output()
        .unwrap()
}

fn json(out: &[u8]) -> serde_json::Value {
    let s = String::from_utf8_lossy(out);
    let line = s.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn embedded_main_job_prints_the_summary_as_json() {
    let _one = one_at_a_time();
    let out = embedded(&["--rw", "randrw", "--iodepth", "4", "--runtime", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    assert!(v["iops"].as_f64().unwrap() > 0.0);
    assert!(v["ios"].as_u64().unwrap() > 0);
    assert_eq!(v["errors"].as_u64(), Some(0));
    for k in ["min", "mean", "p50", "p90", "p99", "p99_9", "p99_99", "max"] {
        assert!(v["lat_ns"][k].as_u64().is_some(), "lat_ns.{k}");
    }
    assert_eq!(v["config"]["bs"].as_u64(), Some(4096));
    // None per IO. The shm fabric maps a peer's region the first time a
    // request touches it (a path string, once per region): on a loaded
    // machine one of those can fall after the warm-up.
    let allocs = v["allocs_per_io"].as_f64().unwrap();
    assert!(allocs < 1e-3, "heap allocations per IO: {allocs}");
}

#[test]
fn client_cores_run_under_the_poll_sched_asked_for() {
    let _one = one_at_a_time();
    // What is tested is the policy the client's core threads run under
    // (read in /proc), not their IO: under SCHED_IDLE a core gets its CPU
    // only when nothing else wants it, so on a busy host it may complete
    // nothing at all (0 IOs in 2 s, found in a workspace run beside two
    // VMs and a build).
    let child = perf()
        .args([
            "embedded",
            "--iodepth",
            "2",
            "--runtime",
            "60",
            "--poll-sched",
            "idle",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tasks = format!("/proc/{}/task", child.id());
    let policy_of_core = || {
        std::fs::read_dir(&tasks).ok()?.flatten().find_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            // The core threads (rtrs-clt0, ...), not the control thread
            // (rtrs-clt-SESSNAME).
            let core = comm.trim().strip_prefix("rtrs-clt")?;
            if core.is_empty() || !core.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let sched = std::fs::read_to_string(t.path().join("sched")).ok()?;
            let line = sched.lines().find(|l| l.starts_with("policy"))?;
            line.rsplit(':').next().map(|v| v.trim().to_string())
        })
    };
    let t0 = std::time::Instant::now();
    let mut policy = None;
    while policy.as_deref() != Some("5") && t0.elapsed() < std::time::Duration::from_secs(60) {
        policy = policy_of_core();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // By its PID: a clean stop, its summary on stdout.
    let int = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(int.success());
    // SCHED_IDLE is policy 5.
    assert_eq!(policy.as_deref(), Some("5"), "the client core's policy");
    if out.status.success() {
        let v = json(&out.stdout);
        assert_eq!(v["config"]["poll_sched"].as_str(), Some("idle"));
        assert_eq!(v["errors"].as_u64(), Some(0));
    }
}

/// `--number-ios`: the run stops once that many IOs completed, well before
/// its --runtime (whatever the host's speed: a count).
#[test]
fn number_ios_ends_the_run_at_a_count() {
    let _one = one_at_a_time();
    let out = embedded(&["--iodepth", "4", "--runtime", "120", "--number-ios", "5000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    let ios = v["ios"].as_u64().unwrap();
    assert!(ios >= 5000, "{ios} IOs");
    assert!(v["seconds"].as_f64().unwrap() < 120.0, "{v}");
    assert_eq!(v["config"]["number_ios"].as_u64(), Some(5000));
}

#[test]
fn server_and_client_processes_with_verify_and_hist() {
    let _one = one_at_a_time();
    let name = format!("shm:perf-cli-{}", std::process::id());
    let _srv = server(&name, "ram:8M");
    let hist = std::env::temp_dir().join(format!("rtrs-perf-hist-{}.log", std::process::id()));
    let h = hist.to_string_lossy().to_string();
    #[rustfmt::skip]
    let out = client(
        &name,
        &[
            "--rw", "randrw", "--bs", "8k", "--iodepth", "8", "--verify", "--runtime", "0.5",
            "--size", "8M", "--hist", &h,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    assert_eq!(v["errors"].as_u64(), Some(0));
    assert_eq!(v["config"]["rw"].as_str(), Some("randrw"));
    let log = std::fs::read_to_string(&hist).unwrap();
    assert!(log.contains(",HIST"), "an interval log: {log}");
    let _ = std::fs::remove_file(hist);
}

#[test]
fn bad_arguments_get_a_clear_message_and_a_non_zero_exit() {
    let _one = one_at_a_time();
    for args in [
        vec!["client", "--connect", "nonsense", "--runtime", "1"],
        vec!["client", "--connect", "shm:x", "--bs", "0"],
        vec!["client", "--connect", "shm:x", "--rw", "sideways"],
        vec!["client", "--connect", "shm:x", "--runtime", "-1"],
        vec!["server", "--listen", "shm:x", "--backend", "disk"],
        vec![
            "server",
            "--listen",
            "shm:x",
            "--always-invalidate",
            "maybe",
        ],
        vec![
            "embedded",
            "--runtime",
            "0.3",
            "--hist",
            "/nonexistent/x.hlog",
        ],
        vec!["embedded", "--rw", "randread", "--rwmixread", "30"],
        vec!["client", "--connect", "shm:x", "--ramp-time=-1"],
        vec!["client", "--connect", "shm:x", "--sessname", ""],
        vec!["client", "--connect", "shm:x", "--poll-sched", "fifo"],
        // Connections per path: cid 0 and one per core at least, 4096 at most.
        vec!["client", "--connect", "shm:x", "--connections", "1"],
        vec![
            "client",
            "--connect",
            "shm:x",
            "--cores",
            "0,1",
            "--connections",
            "2",
        ],
        vec!["client", "--connect", "shm:x", "--connections", "4097"],
        vec!["client", "--connect", "shm:x", "--sessions", "0"],
        vec!["client", "--connect", "shm:x", "--reconnect-backoff", "-1"],
        // Several sessions cannot share one RNBD device (one writer each).
        vec![
            "client",
            "--connect",
            "shm:x",
            "--rnbd-device",
            "d0",
            "--sessions",
            "2",
        ],
        // More sessions than blocks to give each a slice.
        vec![
            "client",
            "--connect",
            "shm:x",
            "--size",
            "8k",
            "--sessions",
            "3",
        ],
        vec![
            "client",
            "--connect",
            "shm:nobody-listens-here",
            "--runtime",
            "1",
        ],
    ] {
        let out = perf().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{args:?}: no message");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A server process, stopped by its PID when dropped (a failing test too).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server(name: &str, backend: &str) -> Server {
    let s = perf()
        .args([
            "server",
            "--listen",
            name,
            "--backend",
            backend,
            "--cores",
            "1",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    Server(s)
}

fn client(name: &str, args: &[&str]) -> std::process::Output {
    perf()
        .args(["client", "--connect", name, "--cores", "0", "--json"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn failed_io_fails_the_run_with_err_in_the_json() {
    let _one = one_at_a_time();
    let name = format!("shm:perf-fail-{}", std::process::id());
    let _srv = server(&name, "fail:4");
    let out = client(
        &name,
        &[
            "--rw",
            "randwrite",
            "--iodepth",
            "4",
            "--runtime",
            "2",
            "--ramp-time",
            "0",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let v = json(&out.stdout);
    let n = v["err"]["count"].as_u64().unwrap();
    assert!(n > 0 && n == v["errors"].as_u64().unwrap(), "{v}");
    // Every 4th IO fails: a quarter of those measured, give or take the
    // ramp's failures (failed IOs are counted, measured or not) and the
    // queue depth in flight at either end.
    let ios = v["ios"].as_u64().unwrap();
    assert!(
        ios >= 4 && (4 * n).abs_diff(ios) <= ios / 20 + 16,
        "{n} of {ios}"
    );
    assert_eq!(v["err"]["first_errno"].as_i64(), Some(5), "EIO");
    assert_eq!(v["jobs"][0]["error"].as_i64(), Some(5));
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("rtrs-perf: ") && line.contains("IOs failed, first errno 5"),
        "{err}"
    );
}

#[test]
fn connection_errors_name_the_limits() {
    let _one = one_at_a_time();
    let out = perf()
        .args(["client", "--connect", "shm:x", "--cores", "0,1"])
        .args(["--connections", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--connections 2") && err.contains("3 to 4096 with 2 cores"),
        "{err}"
    );
    let out = perf()
        .args(["client", "--connect", "shm:x", "--rnbd-device", "d0"])
        .args(["--churn-sessions", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("name them with {}"), "{err}");
}

#[test]
fn sessions_share_the_core_threads_and_churn_beside_them() {
    let _one = one_at_a_time();
    let name = format!("shm:perf-sessions-{}", std::process::id());
    let _srv = server(&name, "ram:16M");
    let ready = std::env::temp_dir().join(format!("rtrs-perf-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let out = client(
        &name,
        &[
            "--rw",
            "randrw",
            "--verify",
            "--size",
            "16M",
            "--iodepth",
            "4",
            "--runtime",
            "0.5",
            "--sessions",
            "3",
            "--connections",
            "4",
            "--churn-sessions",
            "3",
            "--ready",
            ready.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Written once every session was open: the setup's ms.
    let setup: f64 = std::fs::read_to_string(&ready)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::remove_file(&ready).unwrap();
    assert!(setup > 0.0);
    let v = json(&out.stdout);
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3);
    for (i, s) in sessions.iter().enumerate() {
        assert_eq!(s["name"], format!("rtrs-perf-{i}"));
        assert!(s["ios"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["submitted"], s["completed"], "{s}");
        assert!(s["open_ms"].as_f64().unwrap() > 0.0);
        assert!(s["memory_bytes"].as_u64().unwrap() > 0);
    }
    // One IO thread (--cores 0) polled all three: one job.
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(v["config"]["connections"], 4);
    let churn = &v["churn"];
    assert_eq!(churn["done"], 3, "{churn}");
    assert_eq!(churn["failed"], 0);
    assert!(churn["ios"].as_u64().unwrap() >= 3 * 64, "{churn}");
    assert_eq!(v["errors"], 0);
    assert_eq!(v["verify_failures"], 0);
    // The census at the run's points: descriptors back after the close.
    let c = &v["census"];
    assert!(c["up"]["fds"].as_u64().unwrap() > c["start"]["fds"].as_u64().unwrap());
    assert_eq!(c["closed"]["fds"], c["start"]["fds"], "{c}");
}

#[test]
fn a_verify_mismatch_fails_the_run() {
    let _one = one_at_a_time();
    let name = format!("shm:perf-mismatch-{}", std::process::id());
    let _srv = server(&name, "ram:1M");
    // Fill the disk with 8 KiB verify blocks...
    let common = ["--size", "1M", "--verify", "--iodepth", "4"];
    let w = client(
        &name,
        &[&common[..], &["--rw", "write", "--bs", "8k"]].concat(),
    );
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    // ...and read them back as 4 KiB ones: no 4 KiB block holds what a
    // 4 KiB writer would have written there.
    let r = client(
        &name,
        &[
            &common[..],
            &["--rw", "read", "--bs", "4k", "--runtime", "0.5"],
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    let v = json(&r.stdout);
    assert!(v["err"]["verify_mismatches"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["err"]["first_errno"].as_i64(), Some(0));
    assert!(err.contains("does not match what was written"), "{err}");
}

#[test]
fn cores_outside_the_mask_and_bad_lists_exit_2() {
    let _one = one_at_a_time();
    for (cores, why) in [
        ("99999", "not available to this process"),
        ("0,0", "listed twice"),
        ("", "empty"),
        ("1-0", "backwards"),
        ("x", "not a CPU number"),
    ] {
        for cmd in [
            vec!["client", "--connect", "shm:x", "--cores", cores],
            vec!["server", "--listen", "shm:x", "--cores", cores],
            vec!["fabric-lat", "--cores", cores],
            vec!["floor", "--cores", cores],
        ] {
            let out = perf().args(&cmd).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
            assert!(
                err.contains(why) && !err.contains("panicked"),
                "{cmd:?}: {err}"
            );
        }
    }
    let out = perf()
        .args([
            "client",
            "--connect",
            "shm:x",
            "--cores",
            "0",
            "--numjobs",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--numjobs 2 needs as many --cores"));
}

#[test]
fn fio_shaped_json_with_rwmixread_ramp_and_sessname() {
    let _one = one_at_a_time();
    #[rustfmt::skip]
    let out = embedded(&[
        "--rw", "randrw", "--rwmixread", "100", "--iodepth", "4", "--runtime", "0.5",
        "--ramp-time", "0.2", "--sessname", "fio-like", "--cores", "0", "--numjobs", "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    assert!(v["rtrs-perf version"]
        .as_str()
        .unwrap()
        .starts_with("rtrs-perf-"));
    assert!(v["timestamp"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["global options"]["rwmixread"].as_str(), Some("100"));
    assert_eq!(v["global options"]["ramp_time"].as_str(), Some("0.2"));
    assert_eq!(v["err"]["count"].as_u64(), Some(0));
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    let j = &jobs[0];
    assert_eq!(j["jobname"].as_str(), Some("fio-like"));
    assert_eq!(j["error"].as_i64(), Some(0));
    assert_eq!(j["write"]["total_ios"].as_u64(), Some(0), "all reads");
    let r = &j["read"];
    assert_eq!(r["total_ios"].as_u64(), v["ios"].as_u64());
    assert!(r["iops"].as_f64().unwrap() > 0.0 && r["bw"].as_u64().unwrap() > 0);
    let c = &r["clat_ns"];
    for k in ["min", "max", "mean", "stddev"] {
        assert!(c[k].is_number(), "clat_ns.{k}");
    }
    let p99 = c["percentile"]["99.000000"].as_u64().unwrap();
    let p50 = c["percentile"]["50.000000"].as_u64().unwrap();
    assert!(p50 > 0 && p50 <= p99, "{c}");
    assert_eq!(
        v["seconds"].as_f64().map(|s| s < 0.7),
        Some(true),
        "ramp not counted"
    );
}

#[test]
fn hist_writes_an_interval_a_second_that_reads_back_and_plots() {
    let _one = one_at_a_time();
    let dir = std::env::temp_dir();
    let hist = dir.join(format!("rtrs-perf-hist2-{}.hlog", std::process::id()));
    let svg = dir.join(format!("rtrs-perf-hist2-{}.svg", std::process::id()));
    struct Rm(Vec<std::path::PathBuf>);
    impl Drop for Rm {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _rm = Rm(vec![hist.clone(), svg.clone()]);
    let h = hist.to_string_lossy().to_string();
    #[rustfmt::skip]
    let out = embedded(&[
        "--rw", "randrw", "--iodepth", "4", "--runtime", "2.5", "--cores", "0", "--hist", &h,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    let allocs = v["allocs_per_io"].as_f64().unwrap();
    assert!(
        allocs < 1e-3,
        "the interval hand-off allocates: {allocs} per IO"
    );
    let text = std::fs::read(&hist).unwrap();
    let s = String::from_utf8_lossy(&text);
    assert!(
        s.contains("#[StartTime: ") && s.contains("#[BaseTime: "),
        "{s}"
    );
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    let mut tags = std::collections::BTreeMap::<String, Vec<f64>>::new();
    for e in IntervalLogIterator::new(&text) {
        if let LogEntry::Interval(h) = e.unwrap_or_else(|e| panic!("{e:?}: {s}")) {
            assert!(
                h.encoded_histogram().starts_with("HISTFAAA"),
                "V2 compressed"
            );
            let tag = h.tag().map(|t| t.as_str().to_string()).unwrap_or_default();
            tags.entry(tag)
                .or_default()
                .push(h.start_timestamp().as_secs_f64());
        }
    }
    for t in ["read", "write"] {
        let starts = &tags[t];
        assert_eq!(starts.len(), 3, "2.5 s: intervals at 0, 1, 2 s: {starts:?}");
        assert!(
            starts[0] < 0.1 && (starts[2] - 2.0).abs() < 0.2,
            "{starts:?}"
        );
    }
    // The counts in the log are the IOs the run counted.
    let p = perf()
        .arg("plot")
        .arg(&hist)
        .arg("--out")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let table = String::from_utf8_lossy(&p.stdout);
    let count = |tag: &str| -> u64 {
        let l = table
            .lines()
            .find(|l| l.contains(&format!(" {tag}  ")))
            .unwrap();
        l.split("  ").nth(1).unwrap().parse().unwrap()
    };
    let j = &v["jobs"][0];
    assert_eq!(
        count("read"),
        j["read"]["total_ios"].as_u64().unwrap(),
        "{table}"
    );
    assert_eq!(
        count("write"),
        j["write"]["total_ios"].as_u64().unwrap(),
        "{table}"
    );
    assert_eq!(count("read") + count("write"), v["ios"].as_u64().unwrap());
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2, "read and write");
    // Not a log: a clear error.
    let bad = perf()
        .arg("plot")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(!String::from_utf8_lossy(&bad.stderr).contains("panicked"));
}

/// `[  2s] 0.104 M IOPS (104123 IOs)  406.7 MiB/s  paths: ...` -> (2, the rest).
fn progress_lines(stderr: &str) -> Vec<(u64, String)> {
    stderr
        .lines()
        .filter_map(|l| {
            let (secs, rest) = l.strip_prefix('[')?.split_once("s] ")?;
            rest.contains(" M IOPS ")
                .then(|| (secs.trim().parse().ok(), rest.to_string()))
                .and_then(|(s, r)| Some((s?, r)))
        })
        .collect()
}

#[test]
fn progress_lines_hold_the_counts_of_the_hist_intervals() {
    let _one = one_at_a_time();
    let name = format!("shm:perf-progress-{}", std::process::id());
    let _srv = server(&name, "ram:8M");
    let hist = std::env::temp_dir().join(format!("rtrs-perf-hist3-{}.hlog", std::process::id()));
    let h = hist.to_string_lossy().to_string();
    // QD3: completions come in batches that seldom sum to a multiple of
    // 1024 at a poll's end (where the old counter was published).
    #[rustfmt::skip]
    let out = perf()
        .args([
            "client", "--connect", &name, "--cores", "0", "--rw", "randrw", "--bs", "4k",
            "--iodepth", "3", "--runtime", "3.5", "--size", "8M", "--hist", &h,
        ])
        .output()
        .unwrap();
    let text = std::fs::read(&hist).unwrap_or_default();
    let _ = std::fs::remove_file(&hist);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // IOs (read and write) per interval, by the second it starts in.
    use base64::Engine as _;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;
    // IOs (read and write: an interval each) per second of the log.
    let mut per_s = std::collections::BTreeMap::<u64, u64>::new();
    for e in IntervalLogIterator::new(&text) {
        if let LogEntry::Interval(iv) = e.unwrap() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(iv.encoded_histogram().trim())
                .unwrap();
            let hist: hdrhistogram::Histogram<u64> =
                Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
            let s = iv.start_timestamp().as_secs_f64().round() as u64;
            *per_s.entry(s).or_default() += hist.len();
        }
    }
    let lines = progress_lines(&err);
    // 3.5 s: seconds 0, 1 and 2 whole (lines 1 s to 3 s); the last half
    // second is only in the log. A second may hold no IO at all on a
    // starved host: the line must then say 0 as the log does (the check
    // is that both hold the same count, whatever it is).
    assert_eq!(lines.len(), 3, "{err}");
    assert!(per_s.values().sum::<u64>() > 0, "no IO in the log");
    for (secs, rest) in &lines {
        let n = per_s.get(&(secs - 1)).copied().unwrap_or(0);
        let want = format!(
            "{:.3} M IOPS ({n} IOs)  {:.1} MiB/s  paths: ",
            n as f64 / 1e6,
            (n * 4096) as f64 / (1 << 20) as f64
        );
        assert!(
            rest.starts_with(&want),
            "second {secs}: the line says {rest:?}, the log {n} IOs ({want:?})\n{err}"
        );
    }
}

#[test]
fn fabric_lat_reports_one_way_beside_the_round_trip() {
    let _one = one_at_a_time();
    let out = perf()
        .args(["fabric-lat", "--iters", "2000", "--warmup", "100", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    for k in ["min", "p50", "p99", "max"] {
        let rtt = v["lat_ns"][k].as_u64().unwrap();
        assert_eq!(v["one_way_ns"][k].as_u64(), Some(rtt.div_ceil(2)), "{k}");
    }
    let text = perf()
        .args(["fabric-lat", "--iters", "2000", "--warmup", "100"])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(
        t.contains("one-way = RTT/2") && t.contains("one-way: min"),
        "{t}"
    );
    for (args, why) in [
        (
            vec!["-d", "no-such-dev0"],
            "no RDMA device \"no-such-dev0\"",
        ),
        (vec!["--gid-index", "1"], "go with --ib-dev"),
        (vec!["-d", "x", "--addr", "shm:x"], "give one"),
    ] {
        let out = perf().arg("fabric-lat").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn rnbd_mode_refuses_a_bs_the_device_cannot_take() {
    use rtrs_fabric::soft::shm::ShmFabric;
    use rtrs_poll::rnbd::{Export, RnbdServer};
    let _one = one_at_a_time();
    let name = format!("shm:perf-rnbd-{}", std::process::id());
    let addr: rtrs_fabric::Address = name.parse().unwrap();
    let cfg = rtrs_poll::srv::SrvConfig::default();
    let rnbd = RnbdServer::new(
        vec![Export::ram("ram0", 1 << 20).unwrap()],
        cfg.max_io_size(),
    )
    .unwrap();
    let pool = rtrs_poll::srv::CorePool::launch(&[1]).unwrap();
    let r = rnbd.clone();
    let srv = rtrs_poll::srv::Server::listen(
        &ShmFabric::new(),
        &addr,
        cfg,
        move |info: &rtrs_poll::srv::ConInfo| r.handler(info),
        pool.place(),
    )
    .unwrap();
    // As `rtrs serve` wires it: a session's end closes what it had open.
    srv.on_event(move |ev| {
        if let rtrs_poll::srv::SrvEvent::PathClosed(c) = ev {
            if c.session_ended {
                rnbd.session_ended(&c.paths_uuid);
            }
        }
    })
    .unwrap();
    let run = |bs: &str, size: Option<&str>| {
        let mut args = vec!["--rnbd-device", "ram0", "--runtime", "0.3", "--bs", bs];
        if let Some(s) = size {
            args.extend(["--size", s]);
        }
        client(&name, &args)
    };
    let ok = run("4k", Some("1M"));
    let whole = run("4k", None);
    let bad = run("1000", Some("1M"));
    let big = run("512k", Some("1M"));
    // Larger than the device: refused, not clamped to it.
    let over = run("4k", Some("2M"));
    srv.stop();
    pool.stop();
    for out in [&ok, &whole] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // No --size: the whole device, said in the JSON.
    assert_eq!(
        json(&whole.stdout)["config"]["size"].as_u64(),
        Some(1 << 20)
    );
    for (out, why) in [
        (
            bad,
            "--bs 1000 is not a multiple of the device's logical block size 512",
        ),
        (big, "exceeds the server's max_io_size"),
        (
            over,
            "--size 2097152 is larger than device ram0 (1048576 bytes)",
        ),
    ] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(why) && !err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_closed_stdout_ends_the_run_normally_not_with_a_panic() {
    use std::io::BufRead;
    let _one = one_at_a_time();
    // `rtrs-perf fabric-lat | head -1`: the reader goes after one line.
    // Long enough that the results come after the reader is gone.
    let mut child = perf()
        .args(["fabric-lat", "--iters", "400000", "--warmup", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("fabric-lat"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("panicked"),
        "{:?}: {err}",
        out.status
    );
}

#[test]
fn an_open_tcp_server_needs_an_access_rule_or_insecure() {
    let _one = one_at_a_time();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let open = format!("tcp:0.0.0.0:{port}");
    let args = [
        "server",
        "--listen",
        &open,
        "--backend",
        "null",
        "--cores",
        "1",
    ];
    let out = perf().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served an open listener: {err}");
    assert!(
        err.contains("no access rule") && err.contains("insecure"),
        "{err}"
    );
    // Said out loud: it serves, and says so.
    let mut s = perf()
        .args(args)
        .arg("--insecure")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = s.stderr.take().unwrap();
    let t0 = std::time::Instant::now();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("serving on") && t0.elapsed() < Duration::from_secs(20) {
        use std::io::Read as _;
        match err.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    let _stopped = Server(s);
    assert!(
        seen.contains("INSECURE") && seen.contains("serving on"),
        "{seen}"
    );
}
