//! `rtrs serve`'s access rules: a tcp listener other hosts can reach needs
//! --allow, or --insecure said out loud (and then says so at startup).

use std::process::{Command, Stdio};
use std::time::Duration;

fn rtrs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rtrs"))
}

fn port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs `rtrs serve ARGS` until it says it listens (or exits); stops it by
/// its PID; returns (listened, stderr).
fn serve(args: &[&str]) -> (bool, String) {
    let mut child = rtrs()
        .arg("serve")
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut exited = None;
    while t0.elapsed() < Duration::from_secs(2) {
        if let Some(s) = child.try_wait().unwrap() {
            exited = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if exited.is_none() {
        // Stopped by its PID (Child::kill signals that process only).
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (exited.is_none() || err.contains("listening on"), err)
}

#[test]
fn an_open_tcp_listener_needs_a_rule_or_insecure() {
    let p = port().to_string();
    let addr = format!("tcp:0.0.0.0:{p}");
    let (up, err) = serve(&["--listen", &addr, "--export", "r=ram:1M"]);
    assert!(!up, "served without a rule: {err}");
    assert!(
        err.contains("--allow") && err.contains("--insecure"),
        "{err}"
    );

    let (up, err) = serve(&["--listen", &addr, "--export", "r=ram:1M", "--insecure"]);
    assert!(up, "{err}");
    assert!(err.contains("INSECURE"), "{err}");

    let (up, err) = serve(&[
        "--listen",
        &addr,
        "--export",
        "r=ram:1M",
        "--allow",
        "10.0.0.0/8,127.0.0.1/32",
    ]);
    assert!(up && !err.contains("INSECURE"), "{err}");

    let lo = format!("tcp:127.0.0.1:{p}");
    let (up, err) = serve(&["--listen", &lo, "--export", "r=ram:1M"]);
    assert!(up, "loopback needs no rule: {err}");

    let out = rtrs()
        .args([
            "serve",
            "--listen",
            &lo,
            "--export",
            "r=ram:1M",
            "--allow",
            "10.0.0.0/33",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow"));
}
