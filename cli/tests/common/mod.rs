//! What the server tests share: `rtrs serve` as a child stopped by its
//! PID (on a failed test too), and an RNBD session of an in-process client.
#![allow(dead_code)]

use minstant::Instant;
use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::Address;
use rtrs_poll::clt::{Client, CltConfig, CltCore};
use rtrs_poll::rnbd::{clt as rc, RnbdClient, RnbdDev, RnbdError};
use rtrs_proto::rnbd::{AccessMode, RnbdOp};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn rtrs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rtrs"))
}

/// The server process, stopped by its PID when dropped (a failed test too).
pub struct Served {
    pub child: Child,
    log: std::path::PathBuf,
}

impl Served {
    pub fn start(name: &str, exports: &[&str]) -> Served {
        Served::start_with(name, exports, &[])
    }

    /// With more flags.
    pub fn start_with(name: &str, exports: &[&str], flags: &[&str]) -> Served {
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let mut cmd = rtrs();
        cmd.args(["serve", "--listen", &format!("shm:{name}")]);
        for e in exports {
            cmd.args(["--export", e]);
        }
        cmd.args(flags);
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

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C (SIGINT to its PID), then its log.
    pub fn stop(mut self) -> String {
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
pub fn session(
    name: &str,
    sessname: &str,
) -> (Client<ShmFabric>, CltCore<ShmFabric>, RnbdClient<ShmFabric>) {
    session_with(name, sessname, |_| {})
}

/// With the client's settings changed by `tune`.
pub fn session_with(
    name: &str,
    sessname: &str,
    tune: impl FnOnce(&mut CltConfig),
) -> (Client<ShmFabric>, CltCore<ShmFabric>, RnbdClient<ShmFabric>) {
    let mut cfg = CltConfig::new(sessname, vec![Address::Shm(name.to_string())]);
    cfg.connect_timeout = Duration::from_secs(10);
    tune(&mut cfg);
    let (clt, mut cores) = Client::open(&ShmFabric::new(), cfg).unwrap();
    let mut core = cores.remove(0);
    let mut rn = RnbdClient::new(&clt, core.submitter().unwrap());
    rn.sess_info(&mut || {
        core.poll(Instant::now(), &mut |_| {});
    })
    .unwrap();
    (clt, core, rn)
}

pub fn open(
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
pub fn write(core: &mut CltCore<ShmFabric>, dev: &RnbdDev, byte: u8) -> i32 {
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

/// A temp dir removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `rtrs ctl --socket S ARGS`: success, stdout, stderr.
pub fn ctl(socket: &Path, args: &[&str]) -> (bool, String, String) {
    ctl_as(socket, args, None)
}

pub fn ctl_as(socket: &Path, args: &[&str], uid: Option<u32>) -> (bool, String, String) {
    let mut cmd = rtrs();
    cmd.arg("ctl").arg("--socket").arg(socket).args(args);
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        // SAFETY: setgid/setuid only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `rtrs ctl --json ARGS`: its data, asserting success.
pub fn json(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (ok, out, err) = ctl(socket, &a);
    assert!(ok, "rtrs ctl {args:?}: {err} {out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["v"], 1);
    assert_eq!(v["ok"], true);
    v["data"].clone()
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "waited for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
