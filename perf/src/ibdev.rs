//! perftest's `-d/--ib-dev`, `--ib-port`, `--gid-index` for the rdma
//! fabric. The rdma fabric connects through rdma_cm, which picks the device
//! from the IP address; so a device, port and GID index name the address
//! whose GID that is: `/sys/class/infiniband/DEV/ports/PORT/gids/IDX`, an
//! IPv4-mapped GID (RoCE v2) giving the IPv4 address.

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

/// The IP address of `dev`'s port `port`, GID index `gid`, read under
/// `root` (`/sys/class/infiniband` on a live system).
pub fn address(root: &Path, dev: &str, port: u8, gid: u32) -> Result<IpAddr, String> {
    let d = root.join(dev);
    if dev.is_empty() || dev.contains('/') || !d.is_dir() {
        let have: Vec<String> = std::fs::read_dir(root)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(format!(
            "no RDMA device {dev:?} (have: {})",
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        ));
    }
    let p = d.join("ports").join(port.to_string());
    if !p.is_dir() {
        return Err(format!("{dev} has no port {port}"));
    }
    let f = p.join("gids").join(gid.to_string());
    let text = std::fs::read_to_string(&f)
        .map_err(|e| format!("{dev} port {port} GID index {gid}: {e}"))?;
    let ip: Ipv6Addr = text
        .trim()
        .parse()
        .map_err(|_| format!("{}: not a GID: {:?}", f.display(), text.trim()))?;
    if ip.is_unspecified() {
        return Err(format!(
            "{dev} port {port} GID index {gid} is empty (no address on it)"
        ));
    }
    Ok(match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    })
}

/// [`address`] at `gid`, or without one the port's first IPv4 GID (else
/// its first GID that is set).
pub fn pick(root: &Path, dev: &str, port: u8, gid: Option<u32>) -> Result<IpAddr, String> {
    if let Some(g) = gid {
        return address(root, dev, port, g);
    }
    let first = address(root, dev, port, 0);
    let mut any = first.clone().ok();
    for g in 0..256 {
        match address(root, dev, port, g) {
            Ok(ip @ IpAddr::V4(_)) => return Ok(ip),
            Ok(ip) => {
                any.get_or_insert(ip);
            }
            Err(e) if e.contains("empty") => {}
            Err(_) => break,
        }
    }
    any.ok_or_else(|| {
        first
            .err()
            .unwrap_or_else(|| format!("{dev} port {port}: no GID set"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gid_names_the_address() {
        let root = std::env::temp_dir().join(format!("ibdev-unit-{}", std::process::id()));
        let gids = root.join("rxe0/ports/1/gids");
        std::fs::create_dir_all(&gids).unwrap();
        std::fs::write(gids.join("0"), "fe80:0000:0000:0000:5054:00ff:fe12:3456\n").unwrap();
        std::fs::write(gids.join("1"), "0000:0000:0000:0000:0000:ffff:0a00:020f\n").unwrap();
        std::fs::write(gids.join("2"), "0000:0000:0000:0000:0000:0000:0000:0000\n").unwrap();
        let a = |dev: &str, port: u8, gid: u32| address(&root, dev, port, gid);
        assert_eq!(a("rxe0", 1, 1).unwrap().to_string(), "10.0.2.15");
        assert_eq!(
            a("rxe0", 1, 0).unwrap().to_string(),
            "fe80::5054:ff:fe12:3456"
        );
        assert!(a("rxe0", 1, 2).unwrap_err().contains("empty"));
        assert!(a("rxe0", 1, 7).unwrap_err().contains("GID index 7"));
        assert!(a("rxe0", 2, 0).unwrap_err().contains("no port 2"));
        assert!(a("mlx5_0", 1, 0).unwrap_err().contains("have: rxe0"));
        assert!(a("../x", 1, 0).is_err());
        assert_eq!(
            pick(&root, "rxe0", 1, None).unwrap().to_string(),
            "10.0.2.15",
            "the IPv4 GID by default"
        );
        assert!(pick(&root, "rxe0", 1, Some(0)).unwrap().is_ipv6());
        let _ = std::fs::remove_dir_all(&root);
    }
}
