//! `rtrs doctor`: is this host ready to run pinned pollers?
//!
//! ```text
//!  hugepages   reserved and free 2 MiB pages           (the mempool's chunks)
//!  memlock     RLIMIT_MEMLOCK                           (rdma registers memory)
//!  cores       each poll core exists, online, isolated  (isolcpus / nohz_full)
//!  clock       the clocksource is the TSC               (minstant stamps)
//!  rdma        devices and their ports' states
//!  irqs        RDMA/NIC interrupts off the poll cores   (smp_affinity_list)
//! ```
//! Each check reads files under a root (`/` on a host; a fake tree in
//! tests) and says OK, WARN (works, but slower or less predictable) or FAIL
//! (cannot run as asked). The exit status is non-zero on a FAIL.

use std::path::Path;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One check's finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub level: Level,
    pub detail: String,
}

fn read(root: &Path, p: &str) -> Option<String> {
    std::fs::read_to_string(root.join(p.trim_start_matches('/')))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Parses a CPU list ("0-3,6").
pub fn cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>()),
        }
    }
    out
}

fn hugepages(root: &Path) -> Finding {
    let d = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let total: u64 = read(root, &format!("{d}/nr_hugepages"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let free: u64 = read(root, &format!("{d}/free_hugepages"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (level, detail) = if total == 0 {
        (
            Level::Warn,
            "none reserved: chunks come from 4 KiB pages (reserve: echo 1024 > \
             /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages, or hugepages=N at boot)"
                .to_string(),
        )
    } else if free == 0 {
        (Level::Warn, format!("{total} reserved, none free"))
    } else {
        (
            Level::Ok,
            format!("{total} reserved, {free} free ({} MiB)", free * 2),
        )
    };
    Finding {
        check: "hugepages",
        level,
        detail,
    }
}

/// RLIMIT_MEMLOCK as (soft) bytes, None when unlimited.
fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Some(0);
    }
    (r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

fn memlock(limit: Option<u64>) -> Finding {
    let (level, detail) = match limit {
        None => (Level::Ok, "unlimited".to_string()),
        Some(b) if b >= 1 << 30 => (Level::Ok, format!("{} MiB", b >> 20)),
        Some(b) => (
            Level::Warn,
            format!(
                "{} KiB: rdma registrations beyond it fail (LimitMEMLOCK=infinity in the unit, \
                 or ulimit -l unlimited)",
                b >> 10
            ),
        ),
    };
    Finding {
        check: "memlock",
        level,
        detail,
    }
}

fn cores(root: &Path, want: &[usize]) -> Vec<Finding> {
    let online = cpu_list(&read(root, "/sys/devices/system/cpu/online").unwrap_or_default());
    let isolated = cpu_list(&read(root, "/sys/devices/system/cpu/isolated").unwrap_or_default());
    let nohz = cpu_list(&read(root, "/sys/devices/system/cpu/nohz_full").unwrap_or_default());
    let mut out = Vec::new();
    for &c in want {
        let (level, detail) = if !online.contains(&c) {
            (
                Level::Fail,
                format!("cpu {c} is not online here (online: {online:?})"),
            )
        } else if !isolated.contains(&c) {
            (
                Level::Warn,
                format!(
                    "cpu {c} is not isolated: the scheduler may run other work on it \
                     (isolcpus={c} nohz_full={c} on the kernel command line; until then \
                     --poll-sched idle lets that work run first)"
                ),
            )
        } else if !nohz.contains(&c) {
            (
                Level::Warn,
                format!("cpu {c} is isolated but still ticks (nohz_full={c})"),
            )
        } else {
            (Level::Ok, format!("cpu {c}: online, isolated, nohz_full"))
        };
        out.push(Finding {
            check: "cores",
            level,
            detail,
        });
    }
    out
}

fn clock(root: &Path) -> Finding {
    let cs = read(
        root,
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    )
    .unwrap_or_else(|| "unknown".into());
    let (level, detail) = if cs == "tsc" {
        (Level::Ok, "tsc".to_string())
    } else {
        (
            Level::Warn,
            format!(
                "{cs}: every clock read may be a trap (clocksource=tsc tsc=reliable where the \
                 TSC is invariant)"
            ),
        )
    };
    Finding {
        check: "clock",
        level,
        detail,
    }
}

fn rdma(root: &Path) -> Vec<Finding> {
    let dir = root.join("sys/class/infiniband");
    let Ok(devs) = std::fs::read_dir(&dir) else {
        return vec![Finding {
            check: "rdma",
            level: Level::Ok,
            detail: "no RDMA devices: shm and tcp only".into(),
        }];
    };
    let mut names: Vec<String> = devs
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for d in names {
        let ports = std::fs::read_dir(dir.join(&d).join("ports"))
            .map(|it| {
                let mut p: Vec<String> = it
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect();
                p.sort();
                p
            })
            .unwrap_or_default();
        for p in ports {
            let state = read(root, &format!("/sys/class/infiniband/{d}/ports/{p}/state"))
                .unwrap_or_else(|| "unknown".into());
            let level = if state.contains("ACTIVE") {
                Level::Ok
            } else {
                Level::Warn
            };
            out.push(Finding {
                check: "rdma",
                level,
                detail: format!("{d} port {p}: {state}"),
            });
        }
    }
    out
}

/// Interrupts of RDMA devices and NICs that land on a poll core.
fn irqs(root: &Path, want: &[usize]) -> Finding {
    const DRIVERS: [&str; 10] = [
        "mlx5", "mlx4", "bnxt", "irdma", "ice", "i40e", "efa", "qed", "hfi1", "rxe",
    ];
    let table = read(root, "/proc/interrupts").unwrap_or_default();
    let mut hits = Vec::new();
    for line in table.lines().skip(1) {
        let Some((irq, rest)) = line.split_once(':') else {
            continue;
        };
        let irq = irq.trim();
        if irq.parse::<u32>().is_err() || !DRIVERS.iter().any(|d| rest.contains(d)) {
            continue;
        }
        let cpus = cpu_list(
            &read(root, &format!("/proc/irq/{irq}/smp_affinity_list")).unwrap_or_default(),
        );
        let on: Vec<usize> = want.iter().copied().filter(|c| cpus.contains(c)).collect();
        if !on.is_empty() {
            hits.push(format!("irq {irq} on cpu {on:?}"));
        }
    }
    if hits.is_empty() {
        Finding {
            check: "irqs",
            level: Level::Ok,
            detail: "no NIC or RDMA interrupt on the poll cores".into(),
        }
    } else {
        Finding {
            check: "irqs",
            level: Level::Warn,
            detail: format!(
                "{} (move them: echo HOUSEKEEPING > /proc/irq/N/smp_affinity_list)",
                hits.join(", ")
            ),
        }
    }
}

/// Every check, for poll cores `want`, reading under `root`.
pub fn run(root: &Path, want: &[usize], memlock_bytes: Option<Option<u64>>) -> Vec<Finding> {
    let mut out = vec![
        hugepages(root),
        memlock(memlock_bytes.unwrap_or_else(memlock_limit)),
    ];
    out.extend(cores(root, want));
    out.push(clock(root));
    out.extend(rdma(root));
    out.push(irqs(root, want));
    out
}

/// Prints the findings; the worst level.
pub fn print(findings: &[Finding], json: bool) -> Level {
    for f in findings {
        if json {
            println!(
                "{{\"check\":\"{}\",\"level\":\"{}\",\"detail\":{:?}}}",
                f.check,
                f.level.name(),
                f.detail
            );
        } else {
            println!("{:<4} {:<9} {}", f.level.name(), f.check, f.detail);
        }
    }
    findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, p: &str, s: &str) {
        let f = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, s).unwrap();
    }

    #[test]
    fn a_fake_host_is_judged_check_by_check() {
        let root = std::env::temp_dir().join(format!("rtrs-doctor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        put(
            &root,
            "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "512\n",
        );
        put(
            &root,
            "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "0\n",
        );
        put(&root, "/sys/devices/system/cpu/online", "0-3\n");
        put(&root, "/sys/devices/system/cpu/isolated", "2-3\n");
        put(&root, "/sys/devices/system/cpu/nohz_full", "3\n");
        put(
            &root,
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            "hpet\n",
        );
        put(
            &root,
            "/sys/class/infiniband/rxe0/ports/1/state",
            "4: ACTIVE\n",
        );
        put(
            &root,
            "/sys/class/infiniband/mlx5_0/ports/1/state",
            "1: DOWN\n",
        );
        put(
            &root,
            "/proc/interrupts",
            "           CPU0 CPU1\n 40: 1 2 PCI-MSI mlx5_comp0@pci:0000:01:00.0\n 41: 0 0 PCI-MSI ahci\n",
        );
        put(&root, "/proc/irq/40/smp_affinity_list", "3\n");
        let f = run(&root, &[1, 2, 3, 7], Some(Some(64 << 10)));
        let level = |check: &str, needle: &str| {
            f.iter()
                .find(|x| x.check == check && x.detail.contains(needle))
                .map(|x| x.level)
        };
        assert_eq!(level("hugepages", "none free"), Some(Level::Warn));
        assert_eq!(level("memlock", "64 KiB"), Some(Level::Warn));
        assert_eq!(level("cores", "cpu 1 is not isolated"), Some(Level::Warn));
        assert_eq!(
            level("cores", "cpu 2 is isolated but still ticks"),
            Some(Level::Warn)
        );
        assert_eq!(level("cores", "cpu 3: online"), Some(Level::Ok));
        assert_eq!(level("cores", "cpu 7 is not online"), Some(Level::Fail));
        assert_eq!(level("clock", "hpet"), Some(Level::Warn));
        assert_eq!(level("rdma", "rxe0 port 1: 4: ACTIVE"), Some(Level::Ok));
        assert_eq!(level("rdma", "mlx5_0 port 1: 1: DOWN"), Some(Level::Warn));
        assert_eq!(level("irqs", "irq 40 on cpu [3]"), Some(Level::Warn));
        assert_eq!(print(&f, true), Level::Fail);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list("0-2,5, 7"), vec![0, 1, 2, 5, 7]);
        assert_eq!(cpu_list(""), Vec::<usize>::new());
    }
}
