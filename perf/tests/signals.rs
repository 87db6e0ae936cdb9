//! `rtrs-perf fabric-lat` stops on SIGTERM (and Ctrl-C) and takes its
//! busy-polling server child with it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn fabric_lat_stops_on_sigterm_with_its_child() {
    let mut p = Command::new(env!("CARGO_BIN_EXE_rtrs-perf"))
        .args(["fabric-lat", "--fabric", "shm", "--size", "64"])
        .args(["--iters", "4000000000", "--cores", "0,1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = p.id();
    let t0 = Instant::now();
    let mut kids = Vec::new();
    while kids.is_empty() && t0.elapsed() < Duration::from_secs(10) {
        kids = children(pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(kids.len(), 1, "the server child");
    // Let the run start, then stop the parent by its PID.
    std::thread::sleep(Duration::from_millis(500));
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = loop {
        if let Some(s) = p.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            p.kill().unwrap();
            for k in &kids {
                // By PID, as everything here.
                let _ = Command::new("kill")
                    .args(["-KILL", &k.to_string()])
                    .status();
            }
            panic!("fabric-lat did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = p.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "an interrupted run is not a success");
    assert!(err.contains("interrupted"), "{err}");
    for k in kids {
        assert!(
            !std::path::Path::new(&format!("/proc/{k}")).exists(),
            "the server child {k} outlived its parent"
        );
    }
}
