//! Ctrl-C stops the cores cleanly: a child process runs two cores with work in
//! flight; SIGINT makes them stop taking work, drain, report, and exit 0.

use pollers::{Cores, Poller, Shutdown};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const CHILD: &str = "POLLERS_CTRLC_CHILD";

struct Busy {
    inflight: u32,
}

impl Poller for Busy {
    fn poll(&mut self, _now: minstant::Instant) -> usize {
        self.inflight = (self.inflight + 1).min(8);
        1
    }
    fn drain(&mut self, _now: minstant::Instant) -> bool {
        self.inflight = self.inflight.saturating_sub(1);
        self.inflight == 0
    }
}

/// Not a test by itself: the child's body (a no-op unless the parent ran us).
#[test]
fn child_body() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    let stop = Shutdown::on_ctrlc().unwrap();
    let cores = Cores::launch(&[0, 1], stop.clone(), Duration::from_secs(2), |_| {
        vec![Box::new(Busy { inflight: 0 }) as Box<dyn Poller>]
    })
    .unwrap();
    println!("ready");
    let reports = cores.join();
    let drained = reports.iter().all(|r| r.drained);
    let work: u64 = reports.iter().map(|r| r.pollers[0].1).sum();
    println!("stopped drained={drained} work={work}");
    std::process::exit(if drained && work > 0 { 0 } else { 1 });
}

#[test]
fn sigint_stops_drains_and_reports() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_body", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
    }
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let mut rest = String::new();
    for l in out.lines() {
        rest.push_str(&l.unwrap());
        rest.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(rest.contains("stopped drained=true"), "{rest}");
    assert!(status.success(), "{status:?}: {rest}");
}
