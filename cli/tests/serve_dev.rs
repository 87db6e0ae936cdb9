//! `rtrs serve --export NAME=dev:/dev/loopN`: a block device exported by the
//! process (as root, on a loop device; skipped otherwise), written through
//! the engine with FUA, its size and block size in the OPEN answer.

use minstant::Instant;
use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::Address;
use rtrs_poll::clt::{Client, CltConfig};
use rtrs_poll::rnbd::{clt as rc, RnbdClient};
use rtrs_proto::rnbd::{AccessMode, RnbdOp, RNBD_F_FUA};
use std::process::{Child, Command};
use std::time::Duration;

/// The loop device, its backing file and the server; all gone on drop.
struct Setup {
    dev: String,
    file: std::path::PathBuf,
    srv: Option<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut s) = self.srv.take() {
            if let Err(e) = s.kill().and_then(|()| s.wait().map(drop)) {
                eprintln!("stopping rtrs serve: {e}");
            }
        }
        let detached = Command::new("losetup")
            .args(["-d", &self.dev])
            .status()
            .is_ok_and(|s| s.success());
        if !detached {
            eprintln!("could not detach {}", self.dev);
        }
        if let Err(e) = std::fs::remove_file(&self.file) {
            eprintln!("removing {}: {e}", self.file.display());
        }
    }
}

#[test]
fn serve_exports_a_block_device() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a loop device needs root");
        return;
    }
    let name = format!("rtrs-serve-dev-{}", std::process::id());
    let file = std::path::PathBuf::from(format!("/var/tmp/{name}.img"));
    std::fs::write(&file, vec![0u8; 4 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&file)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("skipped: no loop device here");
        std::fs::remove_file(&file).unwrap();
        return;
    }
    let mut s = Setup {
        dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        file,
        srv: None,
    };
    s.srv = Some(
        Command::new(env!("CARGO_BIN_EXE_rtrs"))
            .args(["serve", "--listen", &format!("shm:{name}"), "--export"])
            .arg(format!("blk=dev:{}", s.dev))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let cfg = CltConfig {
        connect_timeout: Duration::from_secs(10),
        ..CltConfig::new("serve-dev", vec![Address::Shm(name.clone())])
    };
    let (clt, mut cores) = Client::open(&ShmFabric::new(), cfg).unwrap();
    let core = &mut cores[0];
    let mut rn = RnbdClient::new(&clt, core.submitter().unwrap());
    let dev = rn
        .open("blk", AccessMode::Rw, &mut || {
            core.poll(Instant::now(), &mut |_| {});
        })
        .unwrap();
    assert_eq!(dev.size(), 4 << 20);
    assert_eq!(dev.logical_block_size, 512);
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 11 + 5) as u8).collect();
    let mut p = core.get_permit().unwrap();
    core.buf(&mut p)[..data.len()].copy_from_slice(&data);
    let h = rc::io_hdr(&dev, RnbdOp::Write, 1 << 20, data.len() as u32, RNBD_F_FUA);
    core.write(p, &h, data.len() as u32, 1, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let mut errno = None;
    let t0 = Instant::now();
    while errno.is_none() && t0.elapsed() < Duration::from_secs(10) {
        core.poll(Instant::now(), &mut |c| errno = Some(c.errno));
    }
    assert_eq!(errno, Some(0), "the FUA write completes");
    drop(cores);
    drop(clt);
    // Durable on the device: the loop device's backing file has it.
    let f = std::fs::read(&s.file).unwrap();
    assert!(f[1 << 20..(1 << 20) + data.len()] == data[..]);
    drop(s);
}
