//! A client session's control socket: `rtrs serve` over shm with two
//! listeners (two paths), `rtrs-perf client --connect A,B --ctl SOCK
//! --verify` against it, and `rtrs ctl --socket SOCK` steering its paths
//! while the IO runs: listed, disconnected, reconnected, removed, added
//! again, the multipath policy switched; bad commands refused with the
//! client unaffected; a foreign uid refused. The run (ended by Ctrl-C) exits 0 with
//! no IO error and no verify mismatch: no IO lost while the paths were steered.
//! (docs/deploy.md "Looking into a running server", "... and a client")

mod common;
use common::{ctl, ctl_as, json, wait_for, Served, TempDir};
use std::path::Path;
use std::process::{Command, Stdio};

/// rtrs-perf, built beside rtrs (`cargo test --workspace` builds both).
fn rtrs_perf() -> Command {
    let p = Path::new(env!("CARGO_BIN_EXE_rtrs")).with_file_name("rtrs-perf");
    assert!(
        p.exists(),
        "{} is missing: cargo build -p rtrs-perf (cargo test --workspace builds it)",
        p.display()
    );
    Command::new(p)
}

/// The rtrs-perf process, stopped by its PID when dropped (a failed test
/// too); its socket goes with it.
struct Perf(Option<std::process::Child>);

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The paths of a client's `list paths`: (id, addr, state).
fn paths(sock: &Path) -> Vec<(String, String, String)> {
    let v = json(sock, &["list", "paths"]);
    v["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap().to_string();
            (s("id"), s("addr"), s("state"))
        })
        .collect()
}

fn ios_of(sock: &Path, id: &str) -> u64 {
    let v = json(sock, &["stats", "--path", id]);
    v["paths"][0]["ios"].as_u64().unwrap()
}

#[test]
fn a_clients_paths_are_steered_over_its_socket_with_no_io_lost() {
    let name = format!("rtrs-cctl-{}", std::process::id());
    let dir = TempDir::new(&name);
    let sock = dir.0.join("clt.sock");
    let srv_sock = dir.0.join("srv.sock");
    let (a, b) = (format!("shm:{name}"), format!("shm:{name}-b"));
    let srv = Served::start_with(
        &name,
        &["ram0=ram:16M"],
        &[
            "--listen",
            &b,
            "--cores",
            "1",
            "--ctl",
            srv_sock.to_str().unwrap(),
        ],
    );
    let perf_out = dir.0.join("perf.out");
    let err = dir.0.join("perf.err");
    let mut perf = Perf(Some(
        rtrs_perf()
            .args(["client", "--connect", &format!("{a},{b}")])
            // Reads and writes over 4 MiB: every block read back is checked.
            .args([
                "--rnbd-device",
                "ram0",
                "--size",
                "4M",
                "--verify",
                "--rw",
                "randrw",
            ])
            .args([
                "--iodepth",
                "8",
                "--cores",
                "0",
                "--runtime",
                "60",
                "--json",
            ])
            .args(["--ctl", sock.to_str().unwrap()])
            .stdout(Stdio::from(std::fs::File::create(&perf_out).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
            .spawn()
            .unwrap(),
    ));
    let log = || std::fs::read_to_string(&err).unwrap_or_default();
    wait_for("the client's control socket", || sock.exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the socket is the owner's only");
    }

    // Two paths, both up; the human table says the same.
    wait_for("two connected paths", || {
        let p = paths(&sock);
        p.len() == 2 && p.iter().all(|p| p.2 == "connected")
    });
    let p = paths(&sock);
    assert_eq!((p[0].1.as_str(), p[1].1.as_str()), (a.as_str(), b.as_str()));
    let (p0, p1) = (p[0].0.clone(), p[1].0.clone());
    let (ok, table, e) = ctl(&sock, &["list", "paths"]);
    assert!(
        ok && table.contains("MP_POLICY") && table.contains(&b),
        "{table} {e}"
    );
    let (ok, table, e) = ctl(&sock, &["stats"]);
    assert!(ok && table.contains("FAILED_RECONNECTS"), "{table} {e}");
    let c = json(&sock, &["stats", "--core", "0"]);
    assert!(c["cores"][0]["ios"].as_u64().unwrap() > 0, "{c}");
    // The server sees them too, and refuses a client's command.
    assert_eq!(
        json(&srv_sock, &["list", "paths"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (ok, _, e) = ctl(&srv_sock, &["reconnect", "path0"]);
    assert!(!ok && e.contains("a client's command"), "{e}");

    // disconnect (by address): the path closes and stays closed; IO goes
    // on over the other.
    let r = json(&sock, &["disconnect", &b]);
    assert_eq!(r["path"], p1.as_str(), "{r}");
    wait_for("the path closed", || {
        paths(&sock).iter().any(|p| p.0 == p1 && p.2 == "closed")
    });
    let before = ios_of(&sock, &p0);
    wait_for("IO on the other path", || ios_of(&sock, &p0) > before + 100);
    // reconnect brings it back.
    let (ok, out, e) = ctl(&sock, &["reconnect", &p1]);
    assert!(ok && out.contains("reconnected"), "{out} {e}");
    wait_for("the path back", || {
        paths(&sock).iter().all(|p| p.2 == "connected")
    });

    // remove-path: one path left; add-path: two again (a new id).
    let r = json(&sock, &["remove-path", &p1]);
    assert_eq!(r["removed"], true, "{r}");
    assert_eq!(paths(&sock).len(), 1);
    let (ok, _, e) = ctl(&sock, &["remove-path", &p0]);
    assert!(!ok && e.contains("last path"), "the last path stays: {e}");
    let r = json(&sock, &["add-path", &b]);
    let p2 = r["path"].as_str().unwrap().to_string();
    assert_ne!(p2, p1);
    wait_for("two connected paths again", || {
        let p = paths(&sock);
        p.len() == 2 && p.iter().all(|p| p.2 == "connected")
    });
    let before = ios_of(&sock, &p2);
    wait_for("IO on the new path", || ios_of(&sock, &p2) > before);

    // The multipath policy, as the listing shows it.
    for pol in ["round-robin", "min-latency", "min-inflight"] {
        let r = json(&sock, &["mp-policy", pol]);
        assert_eq!(r["mp_policy"], pol);
        assert_eq!(json(&sock, &["list", "paths"])["mp_policy"], pol);
    }

    // Bad commands: errors, non-zero exits, the client unaffected.
    for (args, says) in [
        (vec!["reconnect", "path9"], "no such path"),
        (vec!["disconnect", "shm:nowhere"], "no such path"),
        (vec!["add-path", "nonsense"], "bad address"),
        (vec!["add-path", &b], "already has a path"),
        (vec!["mp-policy", "fastest"], "unknown multipath policy"),
        (vec!["stats", "--core", "5"], "no core 5"),
        (vec!["list", "sessions"], "a server's command"),
        (vec!["export", "remove", "ram0"], "a server's command"),
    ] {
        let (ok, _, e) = ctl(&sock, &args);
        assert!(!ok && e.contains(says), "{args:?}: {e}");
    }
    let (ok, out, _) = ctl(&sock, &["--json", "reconnect", "path9"]);
    assert!(
        !ok && out.contains("\"errno\":-2") && out.contains("\"role\":\"client\""),
        "{out}"
    );
    assert_eq!(paths(&sock).len(), 2);

    // A foreign uid: kept out by the mode, and by SO_PEERCRED with the
    // mode opened up.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ok, _, e) = ctl_as(&sock, &["list", "paths"], Some(65534));
        assert!(!ok && e.contains("Permission denied"), "{e}");
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (ok, _, e) = ctl_as(&sock, &["disconnect", &p0], Some(65534));
        assert!(
            !ok && e.contains("uid 65534 may not control this client"),
            "{e}"
        );
        assert!(paths(&sock).iter().all(|p| p.2 == "connected"));
        assert_eq!(json(&sock, &["stats"])["ctl_refused"], 1, "counted");
    } else {
        eprintln!("skipped the foreign uid: runs rtrs ctl as uid 65534, which needs root");
    }

    // Ctrl-C ends the run as its --runtime would (long enough for the
    // steps above on a loaded machine): exit 0, no error, no verify
    // mismatch; the socket is gone.
    let mut child = perf.0.take().unwrap();
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -INT {pid}");
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rtrs-perf did not finish: {}", log());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&perf_out).unwrap();
    assert!(status.success(), "rtrs-perf: {status}: {} {stdout}", log());
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["err"]["count"], 0, "{v}");
    assert_eq!(v["err"]["verify_mismatches"], 0, "{v}");
    let reads = v["jobs"][0]["read"]["total_ios"].as_u64().unwrap_or(0);
    assert!(reads > 1000, "reads were checked: {v}");
    assert!(!sock.exists(), "the client's socket is removed at exit");
    assert!(!log().contains("panicked"), "{}", log());
    let slog = srv.stop();
    assert!(!slog.contains("panicked"), "{slog}");
}

/// A bad --ctl stops the client before it connects; no socket is left.
#[test]
fn a_bad_ctl_path_fails_the_client_first() {
    let name = format!("rtrs-cctl-bad-{}", std::process::id());
    let dir = TempDir::new(&name);
    let file = dir.0.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let sock = file.join("clt.sock");
    let out = rtrs_perf()
        .args([
            "client",
            "--connect",
            "shm:rtrs-cctl-nobody",
            "--runtime",
            "1",
        ])
        .args(["--ctl", sock.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--ctl"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}
