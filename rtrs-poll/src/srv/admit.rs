//! Admission: every refusal of a connect request, as one chain of checks
//! over what the server holds, run before anything is allocated. Pure: the
//! server's registry and limits in, the verdict out ([`admit`]); the
//! control logs, counts and rejects what it refuses.
//!
//! ```text
//!  allowlist -> CON_REQ -> handshakes of the host -> (new session: first_conn,
//!  sessions, sessions of the host, memory budget) -> (next cid of a path in
//!  its handshake: same cid_num, no cid twice | new path: paths of the
//!  session, one per address pair, registration table and the host's share)
//! ```

use super::machine::{Registry, SessRec};
use super::{Refusal, SrvConfig};
use rtrs_fabric::ConnId;
use rtrs_proto::{ConnReq, ConnReqRepr, MAX_PATHS_NUM};

/// Why a connect request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) kind: Refusal,
    /// Positive.
    pub(crate) errno: i32,
    pub(crate) why: String,
}

pub(crate) fn refused(kind: Refusal, errno: i32, why: impl Into<String>) -> Refused {
    Refused {
        kind,
        errno,
        why: why.into(),
    }
}

/// What an admitted request makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admit {
    /// A new session, and its first path with this connection.
    NewSession,
    /// A new path of an existing session.
    NewPath,
    /// The next connection of path `path` (still in its handshake).
    NextCid { path: u64 },
}

/// Where the chunk memory of a new session would come from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// The chunk pool has a free slab.
    pub(crate) slab_free: bool,
    /// Bytes preallocated in the chunk pool.
    pub(crate) pool_bytes: u64,
}

/// The checks, in order, for a connect request from `peer` on `listener`
/// whose private data is `pdata`.
pub(crate) fn admit(
    reg: &Registry,
    cfg: &SrvConfig,
    mem: Memory,
    listener: ConnId,
    pdata: &[u8],
    peer: &str,
) -> Result<(ConnReqRepr, Admit), Refused> {
    let host = host_of(peer);
    let limits = &cfg.limits;
    if !limits.allow.is_empty() {
        // shm peers are local processes: the segment's permissions guard
        // them, not source networks.
        let ok = match ip_of(host) {
            Some(ip) => limits.allows(ip),
            None => peer.starts_with("shm:"),
        };
        if !ok {
            return Err(refused(
                Refusal::Access,
                libc::EACCES,
                "not in the allowlist",
            ));
        }
    }
    let req = match ConnReq::new_checked(pdata) {
        Ok(v) => ConnReqRepr::parse(&v),
        Err(e) => {
            return Err(refused(
                Refusal::Protocol,
                libc::ECONNRESET,
                format!("CON_REQ: {e}"),
            ))
        }
    };
    if reg.handshakes_of(host) >= limits.max_handshakes_per_host {
        return Err(refused(
            Refusal::Handshakes,
            libc::EBUSY,
            format!(
                "{} connections of this host in handshakes",
                limits.max_handshakes_per_host
            ),
        ));
    }
    let admit = match reg.sessions.get(&req.paths_uuid) {
        None => {
            new_session(reg, cfg, mem, &req, host)?;
            Admit::NewSession
        }
        Some(s) => match s.live_path(&req.sess_uuid) {
            Some(p) => {
                if p.connected || p.closing || p.cid_num != req.cid_num {
                    let state = if p.closing {
                        "Closing"
                    } else if p.connected {
                        "Connected"
                    } else {
                        "Connecting"
                    };
                    return Err(refused(
                        Refusal::Protocol,
                        libc::ECONNRESET,
                        format!("path exists and is {state}"),
                    ));
                }
                // No cid twice in one path (the kernel's `con[cid]` check).
                if p.cids.contains(&req.cid) {
                    return Err(refused(
                        Refusal::Protocol,
                        libc::ECONNRESET,
                        format!("cid {} already connected", req.cid),
                    ));
                }
                Admit::NextCid { path: p.id }
            }
            None => {
                new_path(reg, cfg, s, listener, &req, peer)?;
                Admit::NewPath
            }
        },
    };
    if !matches!(admit, Admit::NextCid { .. }) {
        registrations(reg, cfg, host, req.cid_num)?;
    }
    Ok((req, admit))
}

fn new_session(
    reg: &Registry,
    cfg: &SrvConfig,
    mem: Memory,
    req: &ConnReqRepr,
    host: &str,
) -> Result<(), Refused> {
    let limits = &cfg.limits;
    if !req.first_conn {
        return Err(refused(
            Refusal::Protocol,
            libc::ENXIO,
            "no such session and not first_conn",
        ));
    }
    if reg.sessions.len() >= limits.max_sessions {
        return Err(refused(
            Refusal::Sessions,
            libc::ENOMEM,
            format!("{} sessions already", limits.max_sessions),
        ));
    }
    let of_host = reg.sessions.values().filter(|s| s.host == host).count();
    if of_host >= limits.max_sessions_per_host {
        return Err(refused(
            Refusal::SessionsPerHost,
            libc::ENOMEM,
            format!("{of_host} sessions of this host already"),
        ));
    }
    if mem.slab_free {
        return Ok(());
    }
    // Memory of its own, within the budget.
    let bytes = session_bytes(cfg);
    let held: u64 = reg
        .sessions
        .values()
        .filter(|s| !s.pooled)
        .map(|s| s.bytes)
        .sum();
    let budget = limits.memory_budget;
    if mem.pool_bytes + held + bytes > budget {
        return Err(refused(
            Refusal::Memory,
            libc::ENOMEM,
            format!(
                "the memory budget ({} MiB, {} MiB of it preallocated) has {} MiB left, a session takes {} MiB",
                budget >> 20,
                mem.pool_bytes >> 20,
                budget.saturating_sub(mem.pool_bytes + held) >> 20,
                bytes >> 20
            ),
        ));
    }
    Ok(())
}

fn new_path(
    _reg: &Registry,
    cfg: &SrvConfig,
    s: &SessRec,
    listener: ConnId,
    _req: &ConnReqRepr,
    peer: &str,
) -> Result<(), Refused> {
    let alive = s.paths.iter().filter(|p| !p.closing);
    let most = cfg.limits.max_paths_per_session.min(MAX_PATHS_NUM);
    if alive.clone().count() >= most {
        return Err(refused(
            Refusal::Paths,
            libc::ECONNRESET,
            format!("the session has {most} paths"),
        ));
    }
    // The kernel refuses a second path between the same two addresses
    // (client host, server address; ports ignored).
    if alive
        .clone()
        .any(|p| p.listener == listener && host_of(&p.peer) == host_of(peer))
    {
        return Err(refused(
            Refusal::Duplicate,
            libc::EEXIST,
            "a path from this address exists",
        ));
    }
    Ok(())
}

/// The registration table's share: a new path of `cid_num` connections
/// from `host` must fit in the table, and its host in a quarter of it.
fn registrations(reg: &Registry, cfg: &SrvConfig, host: &str, cid_num: u16) -> Result<(), Refused> {
    let cap = u64::from(cfg.limits.registrations(cfg.max_chunk_size));
    let need = path_registrations(cfg, cid_num);
    let (mut all, mut of_host) = (0u64, 0u64);
    for p in reg.sessions.values().flat_map(|s| &s.paths) {
        let n = path_registrations(cfg, p.cid_num);
        all += n;
        if host_of(&p.peer) == host {
            of_host += n;
        }
    }
    if all + need > cap {
        return Err(refused(
            Refusal::Memory,
            libc::ENOMEM,
            format!("the registration table is full ({all} of {cap} held, {need} asked)"),
        ));
    }
    if of_host + need > cap / 4 {
        return Err(refused(
            Refusal::Memory,
            libc::ENOMEM,
            format!("this host holds {of_host} registrations; a host may hold a quarter of {cap}"),
        ));
    }
    Ok(())
}

/// Chunk memory of one session (queue_depth x max_chunk_size).
pub(crate) fn session_bytes(cfg: &SrvConfig) -> u64 {
    u64::from(cfg.queue_depth) * u64::from(cfg.max_chunk_size)
}

/// Registrations a path takes: its chunks' (one each with
/// always_invalidate, one for them all otherwise) and one per connection.
fn path_registrations(cfg: &SrvConfig, cid_num: u16) -> u64 {
    let chunks = if cfg.always_invalidate {
        u64::from(cfg.queue_depth)
    } else {
        1
    };
    chunks + u64::from(cid_num)
}

/// The IP of a host part ("tcp:1.2.3.4", "rdma:[::1]"); none for shm.
pub(crate) fn ip_of(host: &str) -> Option<std::net::IpAddr> {
    let h = host
        .strip_prefix("tcp:")
        .or_else(|| host.strip_prefix("rdma:"))?;
    h.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// The host part of a peer address ("tcp:1.2.3.4:5" -> "tcp:1.2.3.4"), for
/// the kernel's one-path-per-address rule (ports are ignored).
pub(crate) fn host_of(peer: &str) -> &str {
    let ip = peer.starts_with("tcp:") || peer.starts_with("rdma:");
    match peer.rsplit_once(':') {
        Some((h, _)) if ip => h,
        _ => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::srv::Limits;

    #[test]
    fn peers_hosts_and_ips() {
        assert_eq!(host_of("tcp:127.0.0.1:5000"), "tcp:127.0.0.1");
        assert_eq!(ip_of("tcp:127.0.0.1"), "127.0.0.1".parse().ok());
        assert_eq!(ip_of(host_of("rdma:[::1]:1234")), "::1".parse().ok());
        assert_eq!(ip_of(host_of("shm:x@pid7")), None);
        let l = Limits {
            allow: vec![
                "10.0.0.0/8".parse().unwrap(),
                "127.0.0.0/8".parse().unwrap(),
            ],
            ..Default::default()
        };
        assert!(l.allows("127.0.0.1".parse().unwrap()));
        assert!(!l.allows("192.168.0.1".parse().unwrap()));
    }
}
