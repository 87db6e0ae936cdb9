//! `rtrs serve --export NAME=...,ro,allow=...`: read-only exports and
//! per-export session rules through a running server, bad specs and
//! duplicate names refused at startup (docs/rnbd.md).

use minstant::Instant;
use rtrs_poll::clt::{Client, CltConfig, CltCore};
use rtrs_poll::fabric::soft::shm::ShmFabric;
use rtrs_poll::fabric::Address;
use rtrs_poll::proto::rnbd::{AccessMode, RnbdOp};
use rtrs_poll::rnbd::{clt as rc, RnbdClient, RnbdDev, RnbdError};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const EPERM: i32 = 1;
const EACCES: i32 = 13;

fn rtrs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rtrs"))
}

/// The server process, stopped by its PID when dropped (a failed test too).
struct Served {
    child: Child,
    log: std::path::PathBuf,
}

impl Served {
    fn start(name: &str, exports: &[&str]) -> Served {
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let mut cmd = rtrs();
        cmd.args(["serve", "--listen", &format!("shm:{name}")]);
        for e in exports {
            cmd.args(["--export", e]);
        }
        let child = cmd
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let s = Served { child, log };
        let t0 = std::time::Instant::now();
        while !s.stderr().contains("listening on") {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the server did not start: {}",
                s.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C (SIGINT to its PID), then its log.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-INT", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -INT {pid}");
        let t0 = std::time::Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(20), "no stop on SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stderr()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // Child::kill signals this process only, by its PID.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A session named `sessname` on the server `name`.
fn session(
    name: &str,
    sessname: &str,
) -> (Client<ShmFabric>, CltCore<ShmFabric>, RnbdClient<ShmFabric>) {
    let mut cfg = CltConfig::new(sessname, vec![Address::Shm(name.to_string())]);
    cfg.connect_timeout = Duration::from_secs(10);
    let (clt, mut cores) = Client::open(&ShmFabric::new(), cfg).unwrap();
    let mut core = cores.remove(0);
    let mut rn = RnbdClient::new(&clt, core.submitter().unwrap());
    rn.sess_info(&mut || {
        core.poll(Instant::now(), &mut |_| {});
    })
    .unwrap();
    (clt, core, rn)
}

fn open(
    core: &mut CltCore<ShmFabric>,
    rn: &mut RnbdClient<ShmFabric>,
    dev: &str,
    mode: AccessMode,
) -> Result<std::sync::Arc<RnbdDev>, i32> {
    let r = rn.open(dev, mode, &mut || {
        core.poll(Instant::now(), &mut |_| {});
    });
    match r {
        Ok(d) => Ok(d),
        Err(RnbdError::Errno(e)) => Err(e),
        Err(e) => panic!("open {dev}: {e}"),
    }
}

/// A 4 KiB write at 0; the errno.
fn write(core: &mut CltCore<ShmFabric>, dev: &RnbdDev, byte: u8) -> i32 {
    let mut p = core.get_permit().unwrap();
    core.buf(&mut p)[..4096].fill(byte);
    let h = rc::io_hdr(dev, RnbdOp::Write, 0, 4096, 0);
    core.write(p, &h, 4096, 1, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let mut got = None;
    let t0 = std::time::Instant::now();
    while got.is_none() && t0.elapsed() < Duration::from_secs(10) {
        core.poll(Instant::now(), &mut |c| got = Some(c));
    }
    let c = got.expect("a completion");
    core.put_permit(c.permit);
    c.errno
}

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
