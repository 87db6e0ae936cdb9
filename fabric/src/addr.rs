//! Addresses select the backend: `shm:NAME`, `tcp:HOST:PORT`, `rdma:HOST:PORT`.

use super::FabricError;
use std::fmt;
use std::str::FromStr;

/// A fabric address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// Shared memory on this host, rendezvous by name.
    Shm(String),
    /// TCP to `host:port`.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port.
        port: u16,
    },
    /// Real RDMA (rdma_cm) to `host:port`.
    Rdma {
        /// Host name or IP address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Address {
    /// The backend this address selects.
    pub fn scheme(&self) -> &'static str {
        match self {
            Address::Shm(_) => "shm",
            Address::Tcp { .. } => "tcp",
            Address::Rdma { .. } => "rdma",
        }
    }

    /// Whether only this host can reach the address: shm, or a tcp or
    /// rdma host that is `localhost` or a loopback IP (a name is not
    /// resolved: any other name counts as reachable from elsewhere).
    pub fn is_loopback(&self) -> bool {
        match self {
            Address::Shm(_) => true,
            Address::Tcp { host, .. } | Address::Rdma { host, .. } => {
                host == "localhost"
                    || host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}

fn bad(addr: &str, why: &'static str) -> FabricError {
    FabricError::BadAddress {
        addr: addr.to_string(),
        why,
    }
}

fn host_port(s: &str, whole: &str) -> Result<(String, u16), FabricError> {
    // [v6]:port or host:port
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or_else(|| bad(whole, "missing ']'"))?;
        let port = rest[end + 1..]
            .strip_prefix(':')
            .ok_or_else(|| bad(whole, "missing :PORT"))?;
        (&rest[..end], port)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| bad(whole, "missing :PORT"))?
    };
    if host.is_empty() {
        return Err(bad(whole, "empty host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad(whole, "port is not 0..65535"))?;
    Ok((host.to_string(), port))
}

impl FromStr for Address {
    type Err = FabricError;
    fn from_str(s: &str) -> Result<Address, FabricError> {
        let (scheme, rest) = s.split_once(':').ok_or_else(|| bad(s, "missing scheme"))?;
        match scheme {
            "shm" => {
                if rest.is_empty() || rest.len() > 100 {
                    return Err(bad(s, "name must be 1..100 characters"));
                }
                if !rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(bad(s, "name may hold only A-Z a-z 0-9 - _ ."));
                }
                Ok(Address::Shm(rest.to_string()))
            }
            "tcp" => host_port(rest, s).map(|(host, port)| Address::Tcp { host, port }),
            "rdma" => host_port(rest, s).map(|(host, port)| Address::Rdma { host, port }),
            _ => Err(bad(s, "unknown scheme")),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Shm(name) => write!(f, "shm:{name}"),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Address::Rdma { host, port } if host.contains(':') => {
                write!(f, "rdma:[{host}]:{port}")
            }
            Address::Rdma { host, port } => write!(f, "rdma:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            "shm:a-1".parse::<Address>().unwrap(),
            Address::Shm("a-1".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:1234".parse::<Address>().unwrap(),
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        assert_eq!(
            "rdma:[fe80::1]:1234".parse::<Address>().unwrap(),
            Address::Rdma {
                host: "fe80::1".into(),
                port: 1234
            }
        );
        for s in ["shm:x", "tcp:h:1", "tcp:[::1]:9", "rdma:10.0.2.15:1234"] {
            assert_eq!(s.parse::<Address>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for s in [
            "",
            "shm",
            "shm:",
            "shm:a/b",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "udp:h:1",
            "tcp:[::1",
            "tcp:[::1]1",
        ] {
            let e = s.parse::<Address>().unwrap_err();
            assert!(matches!(e, FabricError::BadAddress { .. }), "{s}: {e}");
        }
    }
}
