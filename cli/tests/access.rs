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

fn key_file(name: &str, key: &[u8], mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let f = std::env::temp_dir().join(format!("rtrs-key-{}-{name}", std::process::id()));
    std::fs::write(&f, key).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    f
}

/// Opens a session to `addr` with `key` (none: no key) and asks RNBD for
/// its devices.
fn sess_info(addr: &str, key: Option<&std::path::Path>) -> Result<u8, String> {
    use rtrs_fabric::soft::tcp::{TcpConfig, TcpFabric};
    use rtrs_poll::clt::{Client, CltConfig};
    let mut tcfg = TcpConfig::default();
    if let Some(k) = key {
        tcfg = tcfg.with_auth_key_file(k)?;
    }
    let mut cfg = CltConfig::new("access-test", vec![addr.parse().unwrap()]);
    cfg.connect_timeout = Duration::from_secs(5);
    let (clt, mut cores) =
        Client::open(&TcpFabric::with_config(tcfg), cfg).map_err(|e| e.to_string())?;
    let core = &mut cores[0];
    let mut rn = rtrs_poll::rnbd::RnbdClient::new(&clt, core.submitter().unwrap());
    let mut spin = || {
        core.poll(minstant::Instant::now(), &mut |_| {});
    };
    rn.sess_info(&mut spin).map_err(|e| e.to_string())
}

/// --auth-key: an open tcp listener with a key needs no --insecure; a
/// client with the key is served, one with another key or none is not; a
/// key file others may read is refused at startup.
#[test]
fn a_preshared_key_guards_a_tcp_listener() {
    let good = key_file("good", b"0123456789abcdef-good-key\n", 0o600);
    let other = key_file("other", b"0123456789abcdef-other-key", 0o600);
    let open = key_file("open", b"0123456789abcdef-good-key", 0o644);
    let p = port().to_string();
    let (up, err) = serve(&[
        "--listen",
        &format!("tcp:0.0.0.0:{p}"),
        "--export",
        "r=ram:1M",
        "--auth-key",
        open.to_str().unwrap(),
    ]);
    assert!(!up, "{err}");
    assert!(err.contains("chmod 600"), "{err}");

    let addr = format!("tcp:127.0.0.1:{p}");
    let mut child = rtrs()
        .args(["serve", "--listen", &format!("tcp:0.0.0.0:{p}")])
        .args(["--export", "r=ram:1M", "--auth-key", good.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let served = sess_info(&addr, Some(&good));
    let wrong = sess_info(&addr, Some(&other));
    let none = sess_info(&addr, None);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    for f in [&good, &other, &open] {
        std::fs::remove_file(f).unwrap();
    }
    assert_eq!(served, Ok(2), "RNBD protocol version: {err}");
    assert!(!err.contains("INSECURE"), "{err}");
    let wrong = wrong.unwrap_err();
    assert!(wrong.contains("pre-shared key"), "{wrong}");
    let none = none.unwrap_err();
    assert!(none.contains("requires a pre-shared key"), "{none}");
    assert!(err.contains("refused") && err.contains("auth"), "{err}");
}
