//! `rtrs serve --export NAME=...,ro,allow=...`: read-only exports and
//! per-export session rules through a running server, bad specs and
//! duplicate names refused at startup (docs/rnbd.md).

mod common;
use common::{open, rtrs, session, write, Served};
use rtrs_proto::rnbd::AccessMode;
use std::process::{Command, Stdio};
use std::time::Duration;

const EPERM: i32 = 1;
const EACCES: i32 = 13;

#[test]
fn read_only_and_allow_rules_through_the_server() {
    let name = format!("rtrs-rnbd-access-{}", std::process::id());
    let srv = Served::start(
        &name,
        &["ram0=ram:4M,ro", "priv=ram:1M,allow=cli-ok|cli-too"],
    );
    let up = srv.stderr();
    assert!(up.contains("export ram0: 4194304 bytes, read-only"), "{up}");
    assert!(
        up.contains("export priv: 1048576 bytes, only for session cli-ok, session cli-too"),
        "{up}"
    );

    let (ok, mut ok_core, mut ok_rn) = session(&name, "cli-ok");
    let p = open(&mut ok_core, &mut ok_rn, "priv", AccessMode::Rw).unwrap();
    assert_eq!(write(&mut ok_core, &p, 1), 0, "the allowed session writes");
    assert_eq!(
        open(&mut ok_core, &mut ok_rn, "ram0", AccessMode::Rw).err(),
        Some(-EPERM)
    );
    let r = open(&mut ok_core, &mut ok_rn, "ram0", AccessMode::Ro).unwrap();
    assert_eq!(write(&mut ok_core, &r, 2), -EPERM, "a read-only open");

    let (no, mut no_core, mut no_rn) = session(&name, "cli-no");
    assert_eq!(
        open(&mut no_core, &mut no_rn, "priv", AccessMode::Ro).err(),
        Some(-EACCES),
        "a session the rules do not name"
    );
    assert!(open(&mut no_core, &mut no_rn, "ram0", AccessMode::Ro).is_ok());
    drop((ok_rn, no_rn, ok_core, no_core));
    drop((ok, no));

    let log = srv.stop();
    for line in [
        "rnbd refusals not_allowed: 1",
        "rnbd refusals read_only_export: 1",
        "rnbd refusals read_only_write: 1",
        "the export's allow rules do not name this session",
    ] {
        assert!(log.contains(line), "no {line:?} in: {log}");
    }
}

/// Runs `cmd` for up to 20 s (then stops it by its PID): whether it exited
/// with success (None: still running), and its stderr.
fn exits(mut cmd: Command) -> (Option<bool>, String) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    let mut status = None;
    while status.is_none() && t0.elapsed() < Duration::from_secs(20) {
        status = child.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    if status.is_none() {
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        status.map(|s| s.success()),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_export_specs_and_duplicate_names_are_refused() {
    for (exports, says) in [
        (vec!["r=ram:1M,bogus"], "unknown option"),
        (vec!["r=ram:1M,"], "unknown option"),
        (vec!["r=ram:1M,allow="], "bad session name"),
        (vec!["r=ram:1M,allow=a.b"], "bad session name"),
        (vec!["r=ram:1M,allow-key="], "empty key id"),
        (vec!["r=ram:1M", "s=ram:1M", "r=ram:2M"], "given twice"),
    ] {
        let mut cmd = rtrs();
        cmd.args(["serve", "--listen", "shm:rtrs-never-listens"]);
        for e in &exports {
            cmd.args(["--export", e]);
        }
        let (exited, err) = exits(cmd);
        assert!(exited == Some(false), "{exports:?} served: {err}");
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{exports:?}: {err}"
        );
    }
}
