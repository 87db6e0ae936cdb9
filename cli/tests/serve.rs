//! `rtrs serve` exporting RNBD devices, used by the library's RNBD client
//! from this process: verified data, and bad arguments.

use minstant::Instant;
use rtrs_fabric::soft::shm::ShmFabric;
use rtrs_fabric::Address;
use rtrs_poll::clt::{Client, CltConfig};
use rtrs_poll::rnbd::{clt as rc, RnbdClient};
use rtrs_proto::rnbd::{AccessMode, RnbdOp};
use std::process::Command;
use std::time::Duration;

fn rtrs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rtrs"))
}

#[test]
fn serve_exports_ram_and_file_devices() {
    let name = format!("rtrs-serve-{}", std::process::id());
    let file = std::env::temp_dir().join(format!("{name}.img"));
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let mut srv = rtrs()
        .args([
            "serve",
            "--listen",
            &format!("shm:{name}"),
            "--export",
            "ram0=ram:4M",
        ])
        .arg("--export")
        .arg(format!("disk0=file:{}", file.display()))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut cfg = CltConfig::new("serve-test", vec![Address::Shm(name.clone())]);
    cfg.connect_timeout = Duration::from_secs(10);
    let (clt, mut cores) = Client::open(&ShmFabric::new(), cfg).unwrap();
    let core = &mut cores[0];
    let mut rn = RnbdClient::new(&clt, core.submitter().unwrap());
    let mut spin = || {
        core.poll(Instant::now(), &mut |_| {});
    };
    assert_eq!(rn.sess_info(&mut spin).unwrap(), 2);
    let disk = rn.open("disk0", AccessMode::Rw, &mut spin).unwrap();
    assert_eq!(disk.size(), 1 << 20);
    let ram = rn.open("ram0", AccessMode::Ro, &mut spin).unwrap();
    assert_eq!(ram.size(), 4 << 20);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut p = core.get_permit().unwrap();
    core.buf(&mut p)[..8192].copy_from_slice(&data);
    let h = rc::io_hdr(&disk, RnbdOp::Write, 4096, 8192, 0);
    core.write(p, &h, 8192, 1, Instant::now())
        .map_err(|(_, e)| e)
        .unwrap();
    let mut got = None;
    let t0 = Instant::now();
    while got.is_none() && t0.elapsed() < Duration::from_secs(10) {
        core.poll(Instant::now(), &mut |c| got = Some(c));
    }
    let c = got.expect("a completion");
    assert_eq!(c.errno, 0);
    core.put_permit(c.permit);
    rn.close(&disk, &mut || {
        core.poll(Instant::now(), &mut |_| {});
    })
    .unwrap();
    drop(cores);
    drop(clt);
    let _ = srv.kill();
    let _ = srv.wait();
    let f = std::fs::read(&file).unwrap();
    assert!(f[4096..4096 + 8192] == data[..], "the file holds the write");
    let _ = std::fs::remove_file(file);
}

#[test]
fn bad_arguments_are_refused_clearly() {
    for args in [
        vec!["serve", "--listen", "shm:x", "--export", "ram0"],
        vec!["serve", "--listen", "shm:x", "--export", "ram0=ram:0"],
        vec![
            "serve",
            "--listen",
            "shm:x",
            "--export",
            "d=file:/nonexistent/file",
        ],
        vec![
            "serve",
            "--listen",
            "shm:x",
            "--export",
            "r=ram:1M",
            "--chunk-size",
            "1000",
        ],
        vec!["serve", "--listen", "bogus:x", "--export", "r=ram:1M"],
        vec!["serve", "--export", "r=ram:1M"],
    ] {
        let out = rtrs().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.trim().is_empty() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// SIGTERM (as systemd stops a service) drains and exits cleanly, as
/// Ctrl-C does: exit status 0, not killed by the signal.
#[test]
fn sigterm_drains_and_exits_cleanly() {
    use std::io::{BufRead, BufReader};
    let name = format!("rtrs-term-{}", std::process::id());
    let mut srv = rtrs()
        .args(["serve", "--listen", &format!("shm:{name}")])
        .args(["--export", "ram0=ram:1M"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(srv.stderr.take().unwrap());
    let mut line = String::new();
    let t0 = std::time::Instant::now();
    while !line.contains("listening on") {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 || t0.elapsed() > Duration::from_secs(10) {
            srv.kill().unwrap();
            panic!("rtrs serve did not start");
        }
    }
    // By its PID.
    let pid = srv.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = srv.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            srv.kill().unwrap();
            panic!("rtrs serve did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// `--log-format json`: every log line is one JSON object (for log
/// shippers), the level and message in their fields.
#[test]
fn json_logs() {
    let name = format!("rtrs-json-{}", std::process::id());
    let mut srv = rtrs()
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            &format!("shm:{name}"),
        ])
        .args(["--export", "a=ram:1M"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    srv.kill().unwrap();
    let out = srv.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let logs: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("\"level\":\"INFO\"") && l.contains("listening")),
        "{err}"
    );
    for l in logs {
        assert!(
            l.ends_with('}') && l.contains("\"fields\""),
            "not a JSON log line: {l}"
        );
    }
}

/// Under systemd (`Type=notify`): READY=1 once it listens, STOPPING=1 when
/// SIGTERM drains it.
#[test]
fn sd_notify_ready_and_stopping() {
    let dir = std::env::temp_dir().join(format!("rtrs-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    // Generous: a loaded host starts and stops a server slowly; the test
    // is what it says, not how fast.
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let name = format!("rtrs-notify-{}", std::process::id());
    let mut srv = rtrs()
        .args(["serve", "--listen", &format!("shm:{name}")])
        .args(["--export", "a=ram:1M"])
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let got = sock.recv(&mut buf);
    let ready = got.as_ref().ok().map(|n| buf[..*n].to_vec());
    // By its PID.
    let term = Command::new("kill")
        .args(["-TERM", &srv.id().to_string()])
        .status()
        .unwrap();
    let got2 = sock.recv(&mut buf);
    let stopping = got2.as_ref().ok().map(|n| buf[..*n].to_vec());
    let t0 = std::time::Instant::now();
    while srv.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if srv.try_wait().unwrap().is_none() {
        srv.kill().unwrap();
    }
    let status = srv.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(term.success());
    assert_eq!(ready.as_deref(), Some(&b"READY=1"[..]), "{got:?}");
    assert_eq!(stopping.as_deref(), Some(&b"STOPPING=1"[..]), "{got2:?}");
    assert!(status.success(), "{status:?}");
}

/// `rtrs doctor`: checks this host; a poll core the host does not have is
/// a FAIL and a non-zero exit, with the reason.
#[test]
fn doctor_checks_the_host() {
    let out = rtrs().args(["doctor", "--cores", "0"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    for check in ["hugepages", "memlock", "cores", "clock", "rdma", "irqs"] {
        assert!(said.contains(check), "{check} missing: {said}");
    }
    let out = rtrs()
        .args(["doctor", "--cores", "9999", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.lines()
            .any(|l| l.contains("\"level\":\"FAIL\"") && l.contains("cpu 9999 is not online")),
        "{said}"
    );
}

/// `--metrics ADDR`: the counters in the Prometheus text format; a refused
/// RNBD open shows in them.
#[test]
fn metrics_endpoint() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = format!("rtrs-metrics-{}", std::process::id());
    let mut srv = rtrs()
        .args(["serve", "--listen", &format!("shm:{name}")])
        .args(["--export", "ro0=ram:1M,ro"])
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A write open of a read-only export: refused, counted.
    let mut cfg = CltConfig::new("metrics-test", vec![Address::Shm(name.clone())]);
    cfg.connect_timeout = Duration::from_secs(10);
    let opened = Client::open(&ShmFabric::new(), cfg).map(|(clt, mut cores)| {
        let core = &mut cores[0];
        let mut rn = RnbdClient::new(&clt, core.submitter().unwrap());
        let mut spin = || {
            core.poll(Instant::now(), &mut |_| {});
        };
        let r = rn.open("ro0", AccessMode::Rw, &mut spin).map(|_| ());
        clt.close();
        r
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    srv.kill().unwrap();
    srv.wait().unwrap();
    assert!(matches!(opened, Ok(Err(_))), "the RW open is refused");
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    for m in [
        "# TYPE rtrs_refusals_total counter",
        "# TYPE rtrs_sessions gauge",
        "rtrs_hugepage_limit_bytes",
        "rtrs_rnbd_refusals_total{kind=\"read_only_export\"} 1",
        "rtrs_rnbd_backend_events_total{kind=\"io_errors\"} 0",
    ] {
        assert!(body.contains(m), "{m} missing in {body}");
    }
}
