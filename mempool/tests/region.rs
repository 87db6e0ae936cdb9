//! Regions: hugepages or the reported fallback, bounds, and a shareable
//! region mapped by another process.

use mempool::{Region, HUGE_PAGE};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn hugepages_when_reserved_else_a_reported_fallback() {
    let before = free_hugepages();
    let r = Region::anonymous(4 << 20).unwrap();
    if before >= 16 {
        assert!(
            r.is_huge(),
            "{before} hugepages free, yet the region is not huge"
        );
        assert_eq!(r.len() % HUGE_PAGE, 0);
    } else if before == 0 {
        assert!(!r.is_huge(), "no hugepages free, yet the region says huge");
    }
    assert!(r.len() >= 4 << 20);
    assert_eq!(r.as_ptr() as usize % 4096, 0);
    let s = Region::shareable(1 << 20).unwrap();
    assert!(s.fd().is_some());
    assert!(r.fd().is_none());
}

#[test]
fn bounds_are_checked() {
    let r = Region::anonymous(8192).unwrap();
    let n = r.len();
    r.write(n - 4, b"tail").unwrap();
    let mut b = [0u8; 4];
    r.read(n - 4, &mut b).unwrap();
    assert_eq!(&b, b"tail");
    assert!(r.write(n - 3, b"tail").is_err());
    assert!(r.read(usize::MAX, &mut b).is_err());
    assert!(Region::anonymous(0).is_err());
}

const CHILD: &str = "MEMPOOL_REGION_CHILD";

/// Not a test by itself: the child maps the parent's region through
/// /proc/PPID/fd/N, checks the parent's bytes, and writes an answer.
#[test]
fn child_maps_the_region() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let mut it = spec.split(':');
    let (pid, fd, len): (u32, i32, usize) = (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
    );
    let path = std::ffi::CString::new(format!("/proc/{pid}/fd/{fd}")).unwrap();
    // SAFETY: open(2) on a valid C string.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(raw >= 0, "cannot open the parent's memfd");
    // SAFETY: a fresh descriptor we own.
    let r = Region::map_fd(unsafe { OwnedFd::from_raw_fd(raw) }, len).unwrap();
    let mut b = [0u8; 6];
    r.read(len - 6, &mut b).unwrap();
    assert_eq!(&b, b"parent");
    r.write(0, b"child!").unwrap();
}

#[test]
fn another_process_maps_a_shareable_region() {
    let r = Region::shareable(3 << 20).unwrap();
    let len = r.len();
    r.write(len - 6, b"parent").unwrap();
    let fd = r.fd().unwrap().as_raw_fd();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_maps_the_region", "--nocapture"])
        .env(CHILD, format!("{}:{fd}:{len}", std::process::id()))
        .status()
        .unwrap();
    assert!(status.success());
    let mut b = [0u8; 6];
    r.read(0, &mut b).unwrap();
    assert_eq!(&b, b"child!");
}

#[test]
fn prefault_keeps_the_bytes() {
    let r = Region::anonymous(3 << 20).unwrap();
    r.write(4096 * 7 + 5, b"kept").unwrap();
    r.prefault();
    let mut b = [0u8; 4];
    r.read(4096 * 7 + 5, &mut b).unwrap();
    assert_eq!(&b, b"kept");
    let mut z = [1u8; 8];
    r.read(r.len() - 8, &mut z).unwrap();
    assert_eq!(z, [0; 8]);
}

#[test]
fn streaming_writes_land_like_plain_ones() {
    let r = Region::anonymous(1 << 20).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 31 + 7) as u8).collect();
    for (off, len) in [
        (0usize, 4096usize),
        (8192, 8192),
        (100, 640),
        (4096, 100),
        (65536, 0),
    ] {
        r.write_stream(off, &data[..len]).unwrap();
        let mut b = vec![0u8; len];
        r.read(off, &mut b).unwrap();
        assert_eq!(b, &data[..len], "at {off}, {len} bytes");
    }
    assert!(r.write_stream(r.len() - 10, &data[..64]).is_err());
}
