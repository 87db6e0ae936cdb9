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

fn json(out: &[u8]) -> serde_json::Value {
    let s = String::from_utf8_lossy(out);
    let line = s.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn embedded_main_job_prints_the_summary_as_json() {
    let _one = one_at_a_time();
    let out = perf()
        .args([
            "embedded",
            "--rw",
            "randrw",
            "--iodepth",
            "4",
            "--runtime",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
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
fn server_and_client_processes_with_verify_and_hist() {
    let _one = one_at_a_time();
    let name = format!("shm:perf-cli-{}", std::process::id());
    let mut srv = perf()
        .args([
            "server",
            "--listen",
            &name,
            "--backend",
            "ram:8M",
            "--cores",
            "1",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let hist = std::env::temp_dir().join(format!("rtrs-perf-hist-{}.log", std::process::id()));
    let out = perf()
        .args([
            "client",
            "--connect",
            &name,
            "--rw",
            "randrw",
            "--bs",
            "8k",
            "--iodepth",
            "8",
            "--verify",
        ])
        .args([
            "--cores",
            "0",
            "--runtime",
            "0.5",
            "--size",
            "8M",
            "--json",
            "--hist",
        ])
        .arg(&hist)
        .output()
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
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
