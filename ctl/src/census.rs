//! The resource census of a process: what it holds now, for a script to
//! compare before and after a churn (`rtrs ctl stats`, a client's `--ctl`
//! socket, `rtrs-perf --json`).
//!
//! ```text
//!  fds          entries of /proc/self/fd (the listing's own descriptor not counted)
//!  vm_rss_kb    VmRSS of /proc/self/status, after malloc_trim(0)    vm_hwm_kb  its peak, VmHWM
//!  huge_*       HugePages_Total/Free/Rsvd of /proc/meminfo (the host's, in pages)
//!  huge_held    hugepage bytes this process's mempool regions hold
//!  fabric       rtrs_fabric::live::counts(): PDs, MRs, CQs, QPs, MWs, shm regions
//! ```
//!
//! Resident memory is read after `malloc_trim(0)` (glibc): the allocator
//! hands what is free back first, so VmRSS is memory in use and in the
//! binary, not what glibc's arenas keep after a peak (a burst of torn-down
//! connections whose buffers a busy core frees late can leave tens of MiB
//! free in an arena for good). VmHWM still shows the peak.
//!
//! Reading it opens two files and a directory and trims the heap: a
//! control path, never a core's.

use rtrs_fabric::live::LiveCounts;
use serde::{Deserialize, Serialize};

/// The fabric objects of the process ([`rtrs_fabric::live`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricCensus {
    pub pds: i64,
    pub mrs: i64,
    pub cqs: i64,
    pub qps: i64,
    pub mws: i64,
    pub regions: i64,
}

impl From<LiveCounts> for FabricCensus {
    fn from(c: LiveCounts) -> FabricCensus {
        FabricCensus {
            pds: c.pds,
            mrs: c.mrs,
            cqs: c.cqs,
            qps: c.qps,
            mws: c.mws,
            regions: c.regions,
        }
    }
}

/// What a process holds at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Census {
    /// Open file descriptors.
    pub fds: u64,
    /// Resident memory, KiB (VmRSS).
    pub vm_rss_kb: u64,
    /// Peak resident memory, KiB (VmHWM).
    pub vm_hwm_kb: u64,
    /// The host's hugepages: reserved in all, free, promised but not yet
    /// faulted in (pages of the default size).
    pub huge_total: u64,
    pub huge_free: u64,
    pub huge_rsvd: u64,
    /// Hugepage bytes this process's mempool regions hold.
    pub huge_held: u64,
    pub fabric: FabricCensus,
}

impl Census {
    /// This process, now.
    pub fn take() -> Census {
        trim();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Census {
            fds: open_fds(),
            vm_rss_kb: field(&status, "VmRSS:"),
            vm_hwm_kb: field(&status, "VmHWM:"),
            huge_total: field(&meminfo, "HugePages_Total:"),
            huge_free: field(&meminfo, "HugePages_Free:"),
            huge_rsvd: field(&meminfo, "HugePages_Rsvd:"),
            huge_held: mempool::huge_stats().held,
            fabric: rtrs_fabric::live::counts().into(),
        }
    }

    /// The census as table rows (name, value), in a fixed order.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let f = &self.fabric;
        vec![
            ("fds", self.fds.to_string()),
            ("vm_rss_kb", self.vm_rss_kb.to_string()),
            ("vm_hwm_kb", self.vm_hwm_kb.to_string()),
            ("huge_total", self.huge_total.to_string()),
            ("huge_free", self.huge_free.to_string()),
            ("huge_rsvd", self.huge_rsvd.to_string()),
            ("huge_held", self.huge_held.to_string()),
            ("pds", f.pds.to_string()),
            ("mrs", f.mrs.to_string()),
            ("cqs", f.cqs.to_string()),
            ("qps", f.qps.to_string()),
            ("mws", f.mws.to_string()),
            ("regions", f.regions.to_string()),
        ]
    }
}

/// Gives the heap's free memory back to the system (glibc's arenas keep it).
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; it
    // takes the arenas' locks itself and touches nothing in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The first number after `key` in a `/proc` "Key: value [kB]" text (0
/// when missing).
fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Entries of /proc/self/fd, less the one the listing itself holds open.
fn open_fds() -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => (d.count() as u64).saturating_sub(1),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_parse_and_missing_ones_are_zero() {
        let status = "Name:\trtrs\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\n";
        assert_eq!(field(status, "VmRSS:"), 1024);
        assert_eq!(field(status, "VmHWM:"), 2048);
        assert_eq!(field(status, "VmSwap:"), 0);
        assert_eq!(field("HugePages_Free:      12\n", "HugePages_Free:"), 12);
    }

    #[test]
    fn the_census_sees_descriptors_come_and_go() {
        // Other tests of this binary open and close sockets in parallel
        // (a few each): 64 files held here stand out of that.
        let before = Census::take();
        assert!(before.fds > 0 && before.vm_rss_kb > 0 && before.vm_hwm_kb >= before.vm_rss_kb);
        let files: Vec<std::fs::File> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        let held = Census::take();
        assert!(
            held.fds >= before.fds + 32,
            "{} then {}",
            before.fds,
            held.fds
        );
        drop(files);
        assert!(Census::take().fds + 32 <= held.fds);
        let rows = held.rows();
        assert_eq!(rows[0].0, "fds");
        assert_eq!(rows.len(), 13);
        let json = serde_json::to_value(&held).unwrap();
        assert!(json["fabric"]["mrs"].is_i64());
    }
}
