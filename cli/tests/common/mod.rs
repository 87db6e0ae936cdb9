//! What the server tests share: `rtrs serve` as a child stopped by its
//! PID (on a failed test too), and an RNBD session of an in-process client.
#![allow(dead_code)]

use minstant::Instant;
use rtrs_poll::clt::{Client, CltConfig, CltCore};
use rtrs_poll::fabric::soft::shm::ShmFabric;
use rtrs_poll::fabric::Address;
use rtrs_poll::proto::rnbd::{AccessMode, RnbdOp};
use rtrs_poll::rnbd::{clt as rc, RnbdClient, RnbdDev, RnbdError};
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
