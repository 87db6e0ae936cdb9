//! `rtrs ctl`: a running server's control plane over a unix socket (the
//! kernel's rtrs-srv/rnbd-srv sysfs as the model). One request line, one
//! JSON response line, then the server closes the connection.
//!
//! ```text
//!  rtrs ctl ──{"v":1,"cmd":"list_sessions"}\n──> ctl thread (SO_PEERCRED: same uid or root)
//!           <──{"v":1,"ok":true,"data":...}\n───   -> Backend: snapshot / close paths / exports
//!                                                      (the server's control thread does the closes)
//! ```
//! The codec and the dispatch ([`handle_line`]) have no I/O: tested with a
//! fake [`Backend`]; the socket side ([`listen`], [`request`]) is thin.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The protocol's version: requests carry it, responses echo it.
pub const VERSION: u32 = 1;

/// Longest request line taken.
const MAX_LINE: u64 = 64 << 10;

/// A request: `{"v":1,"cmd":...}` and the command's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sessions with their paths and open devices.
    ListSessions {},
    /// Every path.
    ListPaths {},
    /// Open devices per session, and the exports.
    ListDevices {},
    /// Counters, narrowed to a session, a path or a core.
    Stats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        core: Option<usize>,
    },
    /// Close a path's connections (the client reconnects).
    Disconnect { path: String },
    /// Close every path of a session.
    Close { session: String },
    /// Close one open device of a session (the kernel's `force_close`).
    ForceClose { session: String, device_id: u32 },
    /// Serve one more export: `spec` as `--export NAME=SPEC`.
    ExportAdd { name: String, spec: String },
    /// Stop serving an export (-EBUSY while open).
    ExportRemove { name: String },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    req: Request,
}

/// A response: `ok` with `data`, or an `error` (and its errno when there
/// is one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

impl Response {
    fn ok(data: serde_json::Value) -> Response {
        Response {
            v: VERSION,
            ok: true,
            data: Some(data),
            error: None,
            errno: None,
        }
    }
    fn err(error: impl Into<String>, errno: Option<i32>) -> Response {
        Response {
            v: VERSION,
            ok: false,
            data: None,
            error: Some(error.into()),
            errno,
        }
    }
}

/// Encodes a request line (with its newline).
pub fn encode(req: &Request) -> String {
    let mut s = serde_json::to_string(&Envelope {
        v: VERSION,
        req: req.clone(),
    })
    .unwrap_or_default();
    s.push('\n');
    s
}

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

/// Decodes a request line: the version first, then the command with no
/// field it does not know.
fn parse_request(line: &str) -> Result<Envelope, Response> {
    let bad = |e: String| Response::err(format!("bad request: {e}"), Some(-libc::EINVAL));
    let mut obj = match serde_json::from_str::<serde_json::Value>(line.trim()) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => return Err(bad("not a JSON object".into())),
        Err(e) => return Err(bad(e.to_string())),
    };
    let v = match obj.remove("v").and_then(|v| v.as_u64()) {
        Some(v) => v,
        None => return Err(bad("no protocol version (\"v\": 1)".into())),
    };
    if v != u64::from(VERSION) {
        return Err(Response::err(
            format!("protocol version {v} is not served (this server speaks {VERSION})"),
            Some(-libc::EPROTO),
        ));
    }
    let req =
        serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| bad(e.to_string()))?;
    Ok(Envelope { v: VERSION, req })
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
    let env = match parse_request(line) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let json = |v: Result<serde_json::Value, serde_json::Error>| match v {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.to_string(), None),
    };
    match env.req {
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
            if let Some(c) = core {
                if !s.cores.iter().any(|x| x.core == c) {
                    return Response::err(
                        format!("no core {c} (cores 0..{})", s.cores.len()),
                        Some(-libc::ENOENT),
                    );
                }
                s.cores.retain(|x| x.core == c);
            }
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
    }
}

/// A bound control socket not served yet (bound early, so a bad `--ctl`
/// stops the server before it listens for clients).
#[derive(Debug)]
pub struct CtlSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl CtlSocket {
    /// Binds `path` (see [`bind`]).
    pub fn bind(path: &Path) -> Result<CtlSocket, String> {
        Ok(CtlSocket {
            listener: Some(bind(path)?),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for CtlSocket {
    /// Never served (the server failed to start): the file goes.
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The server side: the backend, and what it counts.
pub struct CtlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for CtlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CtlServer({})", self.path.display())
    }
}

/// The server a ctl socket and the metrics endpoint look into.
pub struct SrvBackend<F: rtrs_poll::fabric::Fabric> {
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

impl<F: rtrs_poll::fabric::Fabric> Backend for SrvBackend<F> {
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
            operator_closes: self.srv.counters().operator_closes(),
            ctl_refused: self.refused.load(Ordering::Relaxed),
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

/// The uid of a unix socket's peer (SO_PEERCRED).
fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Binds the control socket at `path` (mode 0600; its directory made with
/// 0700 when missing). A stale socket file is replaced; a live one (another
/// server answers on it) is an error.
fn bind(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("--ctl {}: {e}", dir.display()))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "--ctl {}: another server answers on it",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("--ctl {}: {e}", path.display()))?;
    }
    // Created with no access for others from the start (umask), then 0600.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| format!("--ctl {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("--ctl {}: {e}", path.display()))?;
    Ok(l)
}

impl CtlServer {
    /// Serves a socket bound by [`CtlSocket::bind`] from a thread of its
    /// own (never a core) until dropped; `refused` counts the connections
    /// refused (a foreign uid).
    pub fn serve(
        mut sock: CtlSocket,
        backend: Arc<dyn Backend + Send + Sync>,
        refused: Arc<AtomicU64>,
    ) -> Result<CtlServer, String> {
        let l = sock
            .listener
            .take()
            .ok_or("the control socket is served already")?;
        let path = sock.path.as_path();
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, refused2) = (stop.clone(), refused);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let thread = std::thread::Builder::new()
            .name("rtrs-ctl".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => serve_one(s, &*backend, me, &refused2),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => {
                            tracing::warn!("ctl: accept: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|e| format!("the ctl thread: {e}"))?;
        tracing::info!(socket = %path.display(), "ctl socket listening");
        Ok(CtlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection: the peer checked, one request, one response.
fn serve_one(s: UnixStream, b: &dyn Backend, me: u32, refused: &AtomicU64) {
    let write = |mut s: &UnixStream, r: &Response| {
        let mut line = serde_json::to_string(r).unwrap_or_default();
        line.push('\n');
        if let Err(e) = s.write_all(line.as_bytes()) {
            tracing::debug!("ctl: reply: {e}");
        }
    };
    if s.set_nonblocking(false).is_err()
        || s.set_read_timeout(Some(Duration::from_secs(5))).is_err()
    {
        return;
    }
    match peer_uid(&s) {
        Ok(uid) if uid == me || uid == 0 => {}
        Ok(uid) => {
            refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(uid, "ctl: refused a connection from another user");
            return write(
                &s,
                &Response::err(
                    format!("uid {uid} may not control this server (uid {me} or root may)"),
                    Some(-libc::EACCES),
                ),
            );
        }
        Err(e) => {
            refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("ctl: refused a connection: SO_PEERCRED: {e}");
            return;
        }
    }
    let mut line = String::new();
    let mut r = BufReader::new(std::io::Read::take(&s, MAX_LINE));
    let resp = match r.read_line(&mut line) {
        Ok(_) if line.ends_with('\n') => {
            let resp = handle_line(&line, b);
            if !resp.ok {
                tracing::info!(request = line.trim(), error = ?resp.error, "ctl: request failed");
            }
            resp
        }
        Ok(_) => Response::err(
            "a request is one line of at most 64 KiB",
            Some(-libc::EINVAL),
        ),
        Err(e) => Response::err(format!("reading the request: {e}"), Some(-libc::EIO)),
    };
    write(&s, &resp);
}

/// The client side: sends `req` to the server at `socket`, returns its
/// response.
pub fn request(socket: &Path, req: &Request) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach {}: {e} (is rtrs serve running with --ctl {}?)",
            socket.display(),
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(encode(req).as_bytes())
        .map_err(|e| format!("sending to {}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("reading from {}: {e}", socket.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("a bad response from the server: {e}"))
}

/// The default socket: /run/rtrs/ctl.sock for root (the unit's
/// RuntimeDirectory), else $XDG_RUNTIME_DIR/rtrs/ctl.sock.
pub fn default_socket() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|_| !root) {
        Some(d) => Path::new(&d).join("rtrs/ctl.sock"),
        None => PathBuf::from("/run/rtrs/ctl.sock"),
    }
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

/// A table: each column as wide as its widest cell, numbers right-aligned.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in w.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&w).enumerate() {
            let num = c.chars().next().is_some_and(|ch| ch.is_ascii_digit()) && i > 0;
            if num {
                l.push_str(&format!("{c:>w$}  "));
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut o = line(header.to_vec());
    for r in rows {
        o.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    o
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
            paths_table(&all_paths(&s))
                + "\n"
                + &table(
                    &[
                        "CORE", "CPU", "POLLS", "BUSY%", "ACTIVE", "PARKED", "IOS", "P50_US",
                        "P90_US", "P99_US", "P99.9_US",
                    ],
                    &cores,
                )
        }
        _ => format!("{data}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        handle_line(&line, b)
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
        let e: Envelope = serde_json::from_str(&line).unwrap();
        assert_eq!(e.req, r);
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
