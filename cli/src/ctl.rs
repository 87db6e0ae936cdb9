//! `rtrs ctl`: a running server's control plane over a unix socket (the
//! kernel's rtrs-srv/rnbd-srv sysfs as the model). One request line, one
//! JSON response line, then the server closes the connection.
//!
//! ```text
//!  rtrs ctl ──{"v":1,"cmd":"list_sessions"}\n──> ctl thread (SO_PEERCRED: same uid or root)
//!           <──{"v":1,"ok":true,"role":"server","data":...}\n──  -> Backend: snapshot / close paths / exports
//!                                                      (the server's control thread does the closes)
//! ```
//! The dispatch ([`handle_line`]) has no I/O: tested with a fake
//! [`Backend`]. The protocol, the socket ([`CtlSocket`], [`CtlServer`],
//! [`request`]) and a client session's side of it are the `rtrs-ctl`
//! crate's: `rtrs ctl` speaks to both, and shows a client's answers (role
//! "client") with `rtrs_ctl::client::human`.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

// The protocol and the socket are shared with clients (rtrs-ctl).
pub use rtrs_ctl::{
    default_socket, parse_request, request, table, us, CtlServer, CtlSocket, Request, Response,
    Role,
};

/// Request latency quantiles (ns) of a histogram snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub count: u64,
    pub sum_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
}

impl Quantiles {
    pub fn of(s: &rtrs_poll::srv::lat::LatSnapshot) -> Quantiles {
        Quantiles {
            count: s.count(),
            sum_ns: s.sum_ns(),
            p50_ns: s.quantile(0.5),
            p90_ns: s.quantile(0.9),
            p99_ns: s.quantile(0.99),
            p999_ns: s.quantile(0.999),
        }
    }
}

/// One direction's RDMA counters (the kernel's rtrs-srv `stats/rdma`:
/// count and bytes per direction).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DirStats {
    pub cnt: u64,
    pub bytes: u64,
}

/// A path's counters: the kernel's (`stats/rdma`: read and write count and
/// bytes) and ours (inflight, errors, heartbeats missed, latency).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathCounters {
    /// Client reads (the kernel's `rdma` READ: data the server writes).
    pub read: DirStats,
    /// Client writes.
    pub write: DirStats,
    pub inflight: u64,
    pub ios: u64,
    pub errors: u64,
    pub hb_missed: u32,
    pub latency: Quantiles,
}

/// A path, as `list paths` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathView {
    /// The path's uuid (hex): what `disconnect` takes.
    pub id: String,
    pub session: String,
    pub session_uuid: String,
    pub peer: String,
    pub state: String,
    /// Connections accepted of those the client asked for.
    pub cons: u32,
    pub cons_wanted: u16,
    pub uptime_s: f64,
    pub stats: PathCounters,
}

/// An open device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub session: String,
    pub device_id: u32,
    pub export: String,
    pub mode: String,
}

/// A session (a client's paths_uuid).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub name: String,
    pub uuid: String,
    pub paths: Vec<PathView>,
    pub devices: Vec<DeviceView>,
}

/// A poll core's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreView {
    pub core: usize,
    pub cpu: usize,
    pub polls: u64,
    pub busy_polls: u64,
    pub busy_ratio: f64,
    pub parks: u64,
    pub active_cons: u64,
    pub parked_cons: u64,
    pub ios: u64,
    pub latency: Quantiles,
}

/// An export served now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportView {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
}

/// Everything a ctl command shows, taken at once.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub sessions: Vec<SessionView>,
    pub cores: Vec<CoreView>,
    pub exports: Vec<ExportView>,
    /// Paths the operator closed so far.
    pub operator_closes: u64,
    /// ctl connections refused (foreign uid).
    pub ctl_refused: u64,
    /// Connect requests refused so far, in all and by kind (srv::Refusal's
    /// names): a storm of reconnects must not be turned away in a loop.
    #[serde(default)]
    pub refused_total: u64,
    #[serde(default)]
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// Chunk memory the sessions hold now (bytes).
    #[serde(default)]
    pub chunk_memory: u64,
    /// `stats`: what the process holds now (descriptors, memory,
    /// hugepages, fabric objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census: Option<rtrs_ctl::Census>,
}

/// What the dispatch needs of a server.
pub trait Backend {
    fn snapshot(&self) -> Snapshot;
    /// Closes a path (by uuid) or a session (by uuid); how many paths
    /// were open.
    fn close(&self, target: rtrs_poll::srv::CloseTarget) -> Result<usize, String>;
    /// Serves `NAME=SPEC`.
    fn add_export(&self, spec: &str) -> Result<(), String>;
    /// Stops serving `name`: Err(errno).
    fn remove_export(&self, name: &str) -> Result<(), i32>;
    /// Closes device `device_id` of session `uuid`: its export's name, or
    /// Err(errno).
    fn force_close(&self, uuid: [u8; 16], device_id: u32) -> Result<String, i32>;
}

fn hex(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(u)
}

/// The one item of `items` that `key` names: exactly, or as the unique
/// prefix (of at least 4 characters) of its id.
fn pick<'a, T>(
    items: &'a [T],
    key: &str,
    what: &str,
    ids: impl Fn(&T) -> Vec<&str>,
) -> Result<&'a T, String> {
    if let Some(t) = items.iter().find(|t| ids(t).contains(&key)) {
        return Ok(t);
    }
    let hits: Vec<&T> = if key.len() >= 4 {
        items
            .iter()
            .filter(|t| ids(t).iter().any(|i| i.starts_with(key)))
            .collect()
    } else {
        Vec::new()
    };
    match hits.len() {
        1 => Ok(hits[0]),
        0 => Err(format!("no such {what}: {key:?}")),
        n => Err(format!("{key:?} names {n} {what}s: give more of it")),
    }
}

fn all_paths(s: &Snapshot) -> Vec<PathView> {
    s.sessions.iter().flat_map(|x| x.paths.clone()).collect()
}

/// Closes what `found` names: (its uuid in hex, the name to answer with).
fn close_one(
    b: &dyn Backend,
    found: Result<(&String, &String), String>,
    what: &str,
    target: fn([u8; 16]) -> rtrs_poll::srv::CloseTarget,
) -> Response {
    let (id, name) = match found {
        Ok(f) => f,
        Err(e) => return Response::err(e, Some(-libc::ENOENT)),
    };
    let Some(u) = unhex(id) else {
        return Response::err(format!("bad {what} uuid {id:?}"), Some(-libc::EINVAL));
    };
    match b.close(target(u)) {
        Ok(n) => Response::ok(serde_json::json!({ what: name, "closed": n })),
        Err(e) => Response::err(e, Some(-libc::EIO)),
    }
}

/// Runs one request line against `b`: the response line's value.
pub fn handle_line(line: &str, b: &dyn Backend) -> Response {
    handle(line, b).with_role(Role::Server)
}

fn handle(line: &str, b: &dyn Backend) -> Response {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(r) = req.refused_by(Role::Server) {
        return r;
    }
    let json = |v: Result<serde_json::Value, serde_json::Error>| match v {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.to_string(), None),
    };
    match req {
        Request::ListSessions {} => json(serde_json::to_value(b.snapshot().sessions)),
        Request::ListPaths {} => json(serde_json::to_value(all_paths(&b.snapshot()))),
        Request::ListDevices {} => {
            let s = b.snapshot();
            let devs: Vec<DeviceView> = s.sessions.iter().flat_map(|x| x.devices.clone()).collect();
            json(Ok(
                serde_json::json!({ "devices": devs, "exports": s.exports }),
            ))
        }
        Request::Stats {
            session,
            path,
            core,
        } => {
            let mut s = b.snapshot();
            if let Some(k) = &session {
                match pick(&s.sessions, k, "session", |x| vec![&x.name, &x.uuid]) {
                    Ok(x) => s.sessions = vec![x.clone()],
                    Err(e) => return Response::err(e, Some(-libc::ENOENT)),
                }
            }
            if let Some(k) = &path {
                let paths = all_paths(&s);
                let p = match pick(&paths, k, "path", |x| vec![&x.id]) {
                    Ok(p) => p.clone(),
                    Err(e) => return Response::err(e, Some(-libc::ENOENT)),
                };
                s.sessions.retain(|x| x.uuid == p.session_uuid);
                for x in &mut s.sessions {
                    x.paths.retain(|q| q.id == p.id);
                }
            }
            if let Err(r) = rtrs_ctl::narrow_cores(&mut s.cores, core, |x| x.core) {
                return r;
            }
            s.census = Some(rtrs_ctl::Census::take());
            json(serde_json::to_value(s))
        }
        Request::Disconnect { path } => {
            let paths = all_paths(&b.snapshot());
            let found = pick(&paths, &path, "path", |x| vec![&x.id]).map(|p| (&p.id, &p.id));
            close_one(b, found, "path", rtrs_poll::srv::CloseTarget::Path)
        }
        Request::Close { session } => {
            let s = b.snapshot();
            let found = pick(&s.sessions, &session, "session", |x| vec![&x.name, &x.uuid])
                .map(|x| (&x.uuid, &x.name));
            close_one(b, found, "session", rtrs_poll::srv::CloseTarget::Session)
        }
        Request::ForceClose { session, device_id } => {
            let s = b.snapshot();
            let x = match pick(&s.sessions, &session, "session", |x| vec![&x.name, &x.uuid]) {
                Ok(x) => x,
                Err(e) => return Response::err(e, Some(-libc::ENOENT)),
            };
            let Some(u) = unhex(&x.uuid) else {
                return Response::err("bad session uuid", Some(-libc::EINVAL));
            };
            match b.force_close(u, device_id) {
                Ok(export) => Response::ok(serde_json::json!({
                    "session": x.name, "device_id": device_id, "export": export
                })),
                Err(e) => Response::err(
                    format!("session {:?} has no device {device_id} open", x.name),
                    Some(e),
                ),
            }
        }
        Request::ExportAdd { name, spec } => {
            if name.is_empty() || name.contains('=') {
                return Response::err(format!("bad export name {name:?}"), Some(-libc::EINVAL));
            }
            match b.add_export(&format!("{name}={spec}")) {
                Ok(()) => Response::ok(serde_json::json!({ "export": name, "added": true })),
                Err(e) => Response::err(e, Some(-libc::EINVAL)),
            }
        }
        Request::ExportRemove { name } => match b.remove_export(&name) {
            Ok(()) => Response::ok(serde_json::json!({ "export": name, "removed": true })),
            Err(e) if e == -libc::EBUSY => Response::err(
                format!("export {name:?} is open (EBUSY): close it in its sessions first"),
                Some(e),
            ),
            Err(e) if e == -libc::ENOENT => {
                Response::err(format!("no such export: {name:?}"), Some(e))
            }
            Err(e) => Response::err(format!("export {name:?}: errno {e}"), Some(e)),
        },
        // Refused above.
        other => Response::err(format!("{} is not a server's command", other.cmd()), None),
    }
}

/// The server a ctl socket and the metrics endpoint look into.
pub struct SrvBackend<F: rtrs_fabric::Fabric> {
    pub srv: rtrs_poll::srv::SrvHandle<F>,
    pub rnbd: Arc<rtrs_poll::rnbd::RnbdServer>,
    /// Per core index: its CPU and live figures.
    pub cores: Vec<(usize, Arc<pollers::LiveStats>)>,
    pub refused: Arc<AtomicU64>,
}

fn state_name(s: rtrs_poll::srv::PathState) -> &'static str {
    use rtrs_poll::srv::PathState::*;
    match s {
        Connecting => "connecting",
        Connected => "connected",
        Closing => "closing",
        Closed => "closed",
    }
}

impl<F: rtrs_fabric::Fabric> Backend for SrvBackend<F> {
    fn snapshot(&self) -> Snapshot {
        use rtrs_poll::srv::lat::LatSnapshot;
        let n = self.cores.len().max(1);
        let mut core_lat = vec![LatSnapshot::default(); n];
        let mut core_ios = vec![0u64; n];
        let devices = self.rnbd.open_devices();
        let mut sessions: Vec<SessionView> = Vec::new();
        for p in self.srv.paths() {
            let (paths_uuid, sess_uuid) = p.uuids();
            let st = p.stats();
            let t = st.totals();
            for cid in 1..st.cons() {
                let core = (usize::from(cid) - 1) % n;
                let c = st.con_totals(cid);
                core_ios[core] += c.reads + c.writes;
                st.con_latency_into(cid, &mut core_lat[core]);
            }
            let (wanted, cons) = p.connections();
            let name = p.sessname().unwrap_or("?").to_string();
            let view = PathView {
                id: hex(&sess_uuid),
                session: name.clone(),
                session_uuid: hex(&paths_uuid),
                peer: p.peer().to_string(),
                state: state_name(p.state()).into(),
                cons,
                cons_wanted: wanted,
                uptime_s: p.uptime().as_secs_f64(),
                stats: PathCounters {
                    read: DirStats {
                        cnt: t.reads,
                        bytes: t.bytes_read,
                    },
                    write: DirStats {
                        cnt: t.writes,
                        bytes: t.bytes_written,
                    },
                    inflight: t.inflight,
                    ios: t.reads + t.writes,
                    errors: t.errors,
                    hb_missed: p.heartbeats_missed(),
                    latency: Quantiles::of(&st.latency()),
                },
            };
            match sessions.iter_mut().find(|s| s.uuid == view.session_uuid) {
                Some(s) => s.paths.push(view),
                None => {
                    let devs = devices
                        .iter()
                        .find(|(u, _)| *u == paths_uuid)
                        .map(|(_, d)| d.as_slice())
                        .unwrap_or(&[]);
                    sessions.push(SessionView {
                        name: name.clone(),
                        uuid: view.session_uuid.clone(),
                        devices: devs
                            .iter()
                            .map(|d| DeviceView {
                                session: name.clone(),
                                device_id: d.device_id,
                                export: d.export.clone(),
                                mode: d.mode.into(),
                            })
                            .collect(),
                        paths: vec![view],
                    })
                }
            }
        }
        sessions.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
        let cores = self
            .cores
            .iter()
            .enumerate()
            .map(|(i, (cpu, live))| {
                let s = live.stats();
                let (active, parked) = live.pollers();
                CoreView {
                    core: i,
                    cpu: *cpu,
                    polls: s.iterations,
                    busy_polls: s.busy_iterations,
                    busy_ratio: s.busy_ratio(),
                    parks: s.parks,
                    active_cons: active,
                    parked_cons: parked,
                    ios: core_ios[i],
                    latency: Quantiles::of(&core_lat[i]),
                }
            })
            .collect();
        let counters = self.srv.counters();
        Snapshot {
            sessions,
            cores,
            exports: self
                .rnbd
                .export_names()
                .into_iter()
                .map(|(name, size, read_only)| ExportView {
                    name,
                    size,
                    read_only,
                })
                .collect(),
            operator_closes: counters.operator_closes(),
            ctl_refused: self.refused.load(Ordering::Relaxed),
            refused_total: counters.refused_total(),
            refusals: counters
                .refusals()
                .into_iter()
                .map(|(k, n)| (k.name().to_string(), n))
                .collect(),
            chunk_memory: counters.sessions().1,
            census: None,
        }
    }

    fn close(&self, target: rtrs_poll::srv::CloseTarget) -> Result<usize, String> {
        self.srv.close(target).map_err(|e| e.to_string())
    }

    fn add_export(&self, spec: &str) -> Result<(), String> {
        let e = rtrs_poll::rnbd::Export::parse(spec).map_err(|e| e.to_string())?;
        self.rnbd.add_export(e).map_err(|e| e.to_string())
    }

    fn remove_export(&self, name: &str) -> Result<(), i32> {
        self.rnbd.remove_export(name)
    }

    fn force_close(&self, uuid: [u8; 16], device_id: u32) -> Result<String, i32> {
        self.rnbd.force_close(&uuid, device_id)
    }
}

fn paths_table(paths: &[PathView]) -> String {
    let rows: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.session.clone(),
                p.peer.clone(),
                p.state.clone(),
                format!("{}/{}", p.cons, p.cons_wanted),
                format!("{:.0}", p.uptime_s),
                p.stats.read.cnt.to_string(),
                p.stats.write.cnt.to_string(),
                p.stats.inflight.to_string(),
                p.stats.errors.to_string(),
                p.stats.hb_missed.to_string(),
                us(p.stats.latency.p50_ns),
                us(p.stats.latency.p99_ns),
            ]
        })
        .collect();
    table(
        &[
            "PATH",
            "SESSION",
            "PEER",
            "STATE",
            "CONS",
            "UPTIME_S",
            "READS",
            "WRITES",
            "INFLIGHT",
            "ERRORS",
            "HB_MISSED",
            "P50_US",
            "P99_US",
        ],
        &rows,
    )
}

/// Human tables of a response's data for `req`.
pub fn human(req: &Request, data: &serde_json::Value) -> String {
    fn from<T: serde::de::DeserializeOwned + Default>(v: &serde_json::Value) -> T {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }
    match req {
        Request::ListSessions {} => {
            let s: Vec<SessionView> = from(data);
            let rows: Vec<Vec<String>> = s
                .iter()
                .map(|x| {
                    vec![
                        x.name.clone(),
                        x.uuid.clone(),
                        x.paths.len().to_string(),
                        x.devices.len().to_string(),
                    ]
                })
                .collect();
            table(&["SESSION", "UUID", "PATHS", "DEVICES"], &rows)
        }
        Request::ListPaths {} => paths_table(&from::<Vec<PathView>>(data)),
        Request::ListDevices {} => {
            let d: Vec<DeviceView> = from(&data["devices"]);
            let e: Vec<ExportView> = from(&data["exports"]);
            let devs: Vec<Vec<String>> = d
                .iter()
                .map(|x| {
                    vec![
                        x.session.clone(),
                        x.device_id.to_string(),
                        x.export.clone(),
                        x.mode.clone(),
                    ]
                })
                .collect();
            let exps: Vec<Vec<String>> = e
                .iter()
                .map(|x| {
                    vec![
                        x.name.clone(),
                        x.size.to_string(),
                        if x.read_only { "yes" } else { "no" }.into(),
                    ]
                })
                .collect();
            table(&["SESSION", "DEV_ID", "EXPORT", "MODE"], &devs)
                + "\n"
                + &table(&["EXPORT", "BYTES", "RO"], &exps)
        }
        Request::Stats { .. } => {
            let s: Snapshot = from(data);
            let cores: Vec<Vec<String>> = s
                .cores
                .iter()
                .map(|c| {
                    vec![
                        c.core.to_string(),
                        c.cpu.to_string(),
                        c.polls.to_string(),
                        format!("{:.1}", c.busy_ratio * 100.0),
                        c.active_cons.to_string(),
                        c.parked_cons.to_string(),
                        c.ios.to_string(),
                        us(c.latency.p50_ns),
                        us(c.latency.p90_ns),
                        us(c.latency.p99_ns),
                        us(c.latency.p999_ns),
                    ]
                })
                .collect();
            let refusals: Vec<String> =
                s.refusals.iter().map(|(k, n)| format!("{k} {n}")).collect();
            paths_table(&all_paths(&s))
                + "\n"
                + &table(
                    &[
                        "CORE", "CPU", "POLLS", "BUSY%", "ACTIVE", "PARKED", "IOS", "P50_US",
                        "P90_US", "P99_US", "P99.9_US",
                    ],
                    &cores,
                )
                + &format!(
                    "\nrefused {}{}{}, chunk memory {} bytes\n",
                    s.refused_total,
                    if refusals.is_empty() { "" } else { ": " },
                    refusals.join(", "),
                    s.chunk_memory
                )
                + &s.census
                    .as_ref()
                    .map(rtrs_ctl::client::census_table)
                    .unwrap_or_default()
        }
        _ => format!("{data}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtrs_ctl::encode;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        closed: Mutex<Vec<rtrs_poll::srv::CloseTarget>>,
        exports: Mutex<Vec<String>>,
    }

    fn snap() -> Snapshot {
        let path = |id: &str, uuid: &str| PathView {
            id: id.into(),
            session: "s1".into(),
            session_uuid: uuid.into(),
            peer: "shm:x".into(),
            state: "connected".into(),
            ..Default::default()
        };
        let u = "11".repeat(16);
        Snapshot {
            sessions: vec![SessionView {
                name: "s1".into(),
                uuid: u.clone(),
                paths: vec![path(&"aa".repeat(16), &u), path(&"ab".repeat(16), &u)],
                devices: vec![],
            }],
            cores: vec![CoreView {
                core: 0,
                ..Default::default()
            }],
            refused_total: 2,
            refusals: [("memory".to_string(), 2)].into(),
            ..Default::default()
        }
    }

    impl Backend for Fake {
        fn snapshot(&self) -> Snapshot {
            snap()
        }
        fn close(&self, t: rtrs_poll::srv::CloseTarget) -> Result<usize, String> {
            self.closed.lock().unwrap().push(t);
            Ok(1)
        }
        fn add_export(&self, spec: &str) -> Result<(), String> {
            rtrs_poll::rnbd::Export::parse(spec).map_err(|e| e.to_string())?;
            self.exports.lock().unwrap().push(spec.into());
            Ok(())
        }
        fn force_close(&self, uuid: [u8; 16], device_id: u32) -> Result<String, i32> {
            if uuid == [0x11; 16] && device_id == 3 {
                Ok("d".into())
            } else {
                Err(-libc::ENOENT)
            }
        }
        fn remove_export(&self, name: &str) -> Result<(), i32> {
            if name == "busy" {
                Err(-libc::EBUSY)
            } else {
                Err(-libc::ENOENT)
            }
        }
    }

    fn run(b: &Fake, req: Request) -> Response {
        let line = encode(&req);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let r = handle_line(&line, b);
        assert_eq!(r.role(), Some(Role::Server));
        r
    }

    #[test]
    fn a_clients_commands_are_refused_with_the_server_unaffected() {
        let b = Fake::default();
        for req in [
            Request::Reconnect {
                path: "aaaa".into(),
            },
            Request::RemovePath {
                path: "aaaa".into(),
            },
            Request::AddPath {
                addr: "shm:x".into(),
            },
            Request::MpPolicy {
                policy: "min-inflight".into(),
            },
        ] {
            let r = run(&b, req.clone());
            assert_eq!(r.errno, Some(-libc::EOPNOTSUPP), "{req:?}");
            assert!(r.error.unwrap().contains("a client's command"));
        }
        assert!(b.closed.lock().unwrap().is_empty());
    }

    #[test]
    fn requests_round_trip_and_carry_the_version() {
        let r = Request::Stats {
            session: Some("s".into()),
            path: None,
            core: Some(1),
        };
        let line = encode(&r);
        assert_eq!(
            line,
            "{\"v\":1,\"cmd\":\"stats\",\"session\":\"s\",\"core\":1}\n"
        );
        assert_eq!(parse_request(&line).unwrap(), r);
    }

    #[test]
    fn bad_requests_get_errors() {
        let b = Fake::default();
        for (line, errno) in [
            ("", -libc::EINVAL),
            ("garbage", -libc::EINVAL),
            ("{\"v\":1}", -libc::EINVAL),
            ("{\"v\":1,\"cmd\":\"reboot\"}", -libc::EINVAL),
            ("{\"v\":1,\"cmd\":\"list_paths\",\"x\":1}", -libc::EINVAL),
            ("{\"v\":2,\"cmd\":\"list_paths\"}", -libc::EPROTO),
            ("{\"cmd\":\"list_paths\"}", -libc::EINVAL),
        ] {
            let r = handle_line(line, &b);
            assert!(!r.ok, "{line}");
            assert_eq!(r.errno, Some(errno), "{line}: {:?}", r.error);
        }
    }

    #[test]
    fn paths_are_named_by_id_or_a_unique_prefix() {
        let b = Fake::default();
        let r = run(
            &b,
            Request::Disconnect {
                path: "aaaa".into(),
            },
        );
        assert!(r.ok, "{r:?}");
        let want = [0xaau8; 16];
        assert_eq!(
            b.closed.lock().unwrap()[0],
            rtrs_poll::srv::CloseTarget::Path(want)
        );
        // "a" is too short, "ab" ambiguous with nothing but too short,
        // "ffff" names nothing.
        for k in ["a", "ffff"] {
            let r = run(&b, Request::Disconnect { path: k.into() });
            assert_eq!(r.errno, Some(-libc::ENOENT), "{k}");
        }
        let r = run(
            &b,
            Request::Close {
                session: "s1".into(),
            },
        );
        assert!(r.ok);
        assert_eq!(
            b.closed.lock().unwrap()[1],
            rtrs_poll::srv::CloseTarget::Session([0x11; 16])
        );
    }

    #[test]
    fn stats_narrow_to_a_path_or_core() {
        let b = Fake::default();
        let r = run(
            &b,
            Request::Stats {
                session: None,
                path: Some("abab".into()),
                core: Some(0),
            },
        );
        let s: Snapshot = serde_json::from_value(r.data.unwrap()).unwrap();
        assert_eq!(all_paths(&s).len(), 1);
        assert_eq!(s.cores.len(), 1);
        let r = run(
            &b,
            Request::Stats {
                session: None,
                path: None,
                core: Some(7),
            },
        );
        assert_eq!(r.errno, Some(-libc::ENOENT));
        let h = human(
            &Request::Stats {
                session: None,
                path: None,
                core: None,
            },
            &run(
                &b,
                Request::Stats {
                    session: None,
                    path: None,
                    core: None,
                },
            )
            .data
            .unwrap(),
        );
        assert!(h.contains("PATH") && h.contains("CORE") && h.contains(&"ab".repeat(16)));
        // The refusals and the process's census come with the stats.
        assert!(h.contains("refused 2: memory 2"), "{h}");
        assert!(h.contains("process census") && h.contains("FDS"), "{h}");
        assert!(s.census.is_some() && s.refusals["memory"] == 2);
    }

    #[test]
    fn exports_are_added_and_refusals_say_why() {
        let b = Fake::default();
        let add = |name: &str, spec: &str| {
            run(
                &b,
                Request::ExportAdd {
                    name: name.into(),
                    spec: spec.into(),
                },
            )
        };
        assert!(add("new", "ram:1M").ok);
        assert_eq!(b.exports.lock().unwrap()[0], "new=ram:1M");
        assert!(!add("bad", "disk:1M").ok);
        assert!(!add("a=b", "ram:1M").ok);
        let r = run(
            &b,
            Request::ExportRemove {
                name: "busy".into(),
            },
        );
        assert_eq!(r.errno, Some(-libc::EBUSY));
        assert!(r.error.unwrap().contains("EBUSY"));
        let r = run(&b, Request::ExportRemove { name: "x".into() });
        assert_eq!(r.errno, Some(-libc::ENOENT));
        let fc = |session: &str, device_id| {
            run(
                &b,
                Request::ForceClose {
                    session: session.into(),
                    device_id,
                },
            )
        };
        assert_eq!(fc("s1", 3).data.unwrap()["export"], "d");
        assert_eq!(fc("s1", 4).errno, Some(-libc::ENOENT));
        assert_eq!(fc("nobody", 3).errno, Some(-libc::ENOENT));
    }
}
