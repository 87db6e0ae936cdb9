//! A client session's side of `rtrs ctl` (the kernel's rtrs-clt sysfs as
//! the model): `list_paths`, `stats`, `disconnect`, `reconnect`,
//! `remove_path`, `add_path`, `mp_policy`. The dispatch ([`handle_line`])
//! has no I/O and runs over a [`ClientBackend`] (tested with a fake one);
//! [`serve`] offers a [`Client`]'s socket from the ctl thread (never a
//! poll core): an embedder keeps the returned [`CtlServer`] for as long as
//! the socket should answer.
//!
//! | rtrs ctl        | the kernel's rtrs-clt sysfs                     |
//! |-----------------|-------------------------------------------------|
//! | `list paths`    | `paths/*/state`, `mpath_policy`, `stats/`        |
//! | `stats`         | `paths/*/stats/{rdma,reconnects,...}`            |
//! | `add-path A`    | `add_path`                                       |
//! | `disconnect P`  | `paths/P/disconnect`                             |
//! | `reconnect P`   | `paths/P/reconnect`                              |
//! | `remove-path P` | `paths/P/remove_path`                            |
//! | `mp-policy X`   | `mpath_policy`                                   |

use crate::socket::{CtlServer, CtlSocket};
use crate::{parse_request, table, us, Request, Response, Role};
use rtrs_fabric::{Address, Fabric};
use rtrs_poll::clt::{Client, CltError};
use rtrs_poll::sess::mp_policy::MpPolicy;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// A client path's figures (the kernel's rtrs-clt `stats/` as far as the
/// client counts them: IOs and bytes for both directions together).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientPathView {
    /// `path<N>`: what `disconnect`, `reconnect` and `remove-path` take.
    pub id: String,
    /// The server address.
    pub addr: String,
    /// The kernel's state name (connecting, connected, reconnecting, ...).
    pub state: String,
    pub inflight: u64,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    /// IOs moved to another path when this one failed.
    pub failovers: u64,
    /// Successful reconnects (the kernel's `stats/reconnects`, first).
    pub reconnects: u64,
    /// Failed reconnect attempts (its second figure).
    pub failed_reconnects: u64,
    pub downs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
    pub hb_rtt_ns: u64,
    pub hb_missed_peak: u32,
}

/// A client core's figures, summed over the paths.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientCoreView {
    pub core: usize,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub inflight: u64,
    pub failovers: u64,
}

/// What `list_paths` and `stats` answer with (`cores`: `stats` only).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientView {
    pub session: String,
    pub mp_policy: String,
    pub paths: Vec<ClientPathView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cores: Vec<ClientCoreView>,
    /// `stats`: ctl connections refused (a foreign uid).
    #[serde(default)]
    pub ctl_refused: u64,
    /// `stats`: what the process holds now (descriptors, memory,
    /// hugepages, fabric objects); process-wide, so every session of one
    /// process shows the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census: Option<crate::Census>,
}

/// What the dispatch needs of a client session: errors are (why, errno).
pub trait ClientBackend {
    fn view(&self) -> ClientView;
    /// The new path's id.
    fn add_path(&self, addr: &str) -> Result<u32, (String, i32)>;
    fn remove_path(&self, id: u32) -> Result<(), (String, i32)>;
    fn disconnect(&self, id: u32) -> Result<(), (String, i32)>;
    fn reconnect(&self, id: u32) -> Result<(), (String, i32)>;
    fn set_mp_policy(&self, p: MpPolicy);
}

fn clt_err(e: CltError) -> (String, i32) {
    (e.to_string(), e.errno())
}

impl<F: Fabric> ClientBackend for Client<F> {
    fn view(&self) -> ClientView {
        let mut cores: Vec<ClientCoreView> = Vec::new();
        for p in self.paths() {
            for (i, c) in p.core_stats().into_iter().enumerate() {
                if cores.len() <= i {
                    cores.resize_with(i + 1, Default::default);
                }
                let v = &mut cores[i];
                v.core = i;
                v.ios += c.ios;
                v.bytes += c.bytes;
                v.errors += c.errors;
                v.inflight += c.inflight;
                v.failovers += c.failovers;
            }
        }
        ClientView {
            cores,
            ctl_refused: 0,
            census: None,
            session: self.sessname().to_string(),
            mp_policy: self.mp_policy().to_string(),
            paths: self
                .paths()
                .iter()
                .map(|p| {
                    let s = p.stats();
                    ClientPathView {
                        id: p.id().to_string(),
                        addr: s.addr,
                        state: p.state().name().into(),
                        inflight: s.inflight,
                        ios: s.ios,
                        bytes: s.bytes,
                        errors: s.errors,
                        failovers: s.failovers,
                        reconnects: s.reconnects,
                        failed_reconnects: s.failed_reconnects,
                        downs: s.downs,
                        last_reason: s.last_reason.map(|r| r.to_string()),
                        hb_rtt_ns: s.hb_rtt.as_nanos() as u64,
                        hb_missed_peak: s.hb_missed_peak,
                    }
                })
                .collect(),
        }
    }
    fn add_path(&self, addr: &str) -> Result<u32, (String, i32)> {
        let a: Address = addr
            .parse()
            .map_err(|e| (format!("bad address {addr:?}: {e}"), -libc::EINVAL))?;
        Client::add_path(self, a).map(|p| p.0).map_err(clt_err)
    }
    fn remove_path(&self, id: u32) -> Result<(), (String, i32)> {
        Client::remove_path(self, rtrs_poll::clt::PathId(id)).map_err(clt_err)
    }
    fn disconnect(&self, id: u32) -> Result<(), (String, i32)> {
        self.disconnect_path(rtrs_poll::clt::PathId(id))
            .map_err(clt_err)
    }
    fn reconnect(&self, id: u32) -> Result<(), (String, i32)> {
        self.reconnect_path(rtrs_poll::clt::PathId(id))
            .map_err(clt_err)
    }
    fn set_mp_policy(&self, p: MpPolicy) {
        Client::set_mp_policy(self, p)
    }
}

/// The path `key` names: its id (`path3` or `3`) or its address.
fn pick(v: &ClientView, key: &str) -> Result<u32, Response> {
    let hits: Vec<&ClientPathView> = v
        .paths
        .iter()
        .filter(|p| p.id == key || p.id.strip_prefix("path") == Some(key) || p.addr == key)
        .collect();
    let id = |p: &ClientPathView| p.id.trim_start_matches("path").parse::<u32>().ok();
    match hits.as_slice() {
        [p] => id(p).ok_or_else(|| Response::err(format!("bad path id {:?}", p.id), None)),
        [] => Err(Response::err(
            format!(
                "no such path: {key:?} (paths: {})",
                v.paths
                    .iter()
                    .map(|p| format!("{} {}", p.id, p.addr))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(-libc::ENOENT),
        )),
        _ => Err(Response::err(
            format!("{key:?} names {} paths: give its id", hits.len()),
            Some(-libc::EINVAL),
        )),
    }
}

/// Runs one request line against `b`: the response.
pub fn handle_line(line: &str, b: &dyn ClientBackend) -> Response {
    handle(line, b, 0).with_role(Role::Client)
}

/// [`handle_line`], `stats` showing `refused` ctl connections refused.
fn handle_counted(line: &str, b: &dyn ClientBackend, refused: u64) -> Response {
    handle(line, b, refused).with_role(Role::Client)
}

fn done(what: &str, path: &str, r: Result<(), (String, i32)>) -> Response {
    match r {
        Ok(()) => Response::ok(serde_json::json!({ "path": path, what: true })),
        Err((e, errno)) => Response::err(format!("{path}: {e}"), Some(errno)),
    }
}

fn handle(line: &str, b: &dyn ClientBackend, refused: u64) -> Response {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(r) = req.refused_by(Role::Client) {
        return r;
    }
    let json = |v: &ClientView| match serde_json::to_value(v) {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.to_string(), None),
    };
    let by_id = |path: &str, what: &str, f: &dyn Fn(u32) -> Result<(), (String, i32)>| {
        let v = b.view();
        match pick(&v, path) {
            Ok(id) => done(what, &format!("path{id}"), f(id)),
            Err(r) => r,
        }
    };
    match req {
        Request::ListPaths {} => {
            let mut v = b.view();
            v.cores.clear();
            json(&v)
        }
        Request::Stats {
            session,
            path,
            core,
        } => {
            let mut v = b.view();
            if let Some(s) = session.filter(|s| *s != v.session) {
                return Response::err(
                    format!("no such session: {s:?} (this client's is {:?})", v.session),
                    Some(-libc::ENOENT),
                );
            }
            if let Err(r) = crate::narrow_cores(&mut v.cores, core, |x| x.core) {
                return r;
            }
            if let Some(k) = path {
                let id = match pick(&v, &k) {
                    Ok(id) => format!("path{id}"),
                    Err(r) => return r,
                };
                v.paths.retain(|p| p.id == id);
            }
            v.ctl_refused = refused;
            v.census = Some(crate::Census::take());
            json(&v)
        }
        Request::Disconnect { path } => by_id(&path, "disconnected", &|id| b.disconnect(id)),
        Request::Reconnect { path } => by_id(&path, "reconnected", &|id| b.reconnect(id)),
        Request::RemovePath { path } => by_id(&path, "removed", &|id| b.remove_path(id)),
        Request::AddPath { addr } => match b.add_path(&addr) {
            Ok(id) => {
                Response::ok(serde_json::json!({ "path": format!("path{id}"), "addr": addr }))
            }
            Err((e, errno)) => Response::err(format!("add_path {addr}: {e}"), Some(errno)),
        },
        Request::MpPolicy { policy } => match policy.parse::<MpPolicy>() {
            Ok(p) => {
                b.set_mp_policy(p);
                Response::ok(serde_json::json!({ "mp_policy": p.to_string() }))
            }
            Err(e) => Response::err(e, Some(-libc::EINVAL)),
        },
        // Refused above.
        other => Response::err(format!("{} is not a client's command", other.cmd()), None),
    }
}

/// Serves `backend` on the socket at `path` (bound as [`CtlSocket::bind`]
/// binds) from a thread of its own until the returned server is dropped
/// (the file goes then too).
pub fn serve_backend(
    path: &Path,
    backend: Arc<dyn ClientBackend + Send + Sync>,
) -> Result<CtlServer, String> {
    serve_socket(CtlSocket::bind(path)?, backend)
}

/// Serves `backend` on a socket bound before (a bad path fails before the
/// session opens).
pub fn serve_socket(
    sock: CtlSocket,
    backend: Arc<dyn ClientBackend + Send + Sync>,
) -> Result<CtlServer, String> {
    let refused = Arc::new(AtomicU64::new(0));
    let r2 = refused.clone();
    CtlServer::serve(
        sock,
        Role::Client,
        Arc::new(move |line: &str| {
            handle_counted(
                line,
                &*backend,
                r2.load(std::sync::atomic::Ordering::Relaxed),
            )
        }),
        refused,
    )
}

/// Offers `client`'s control socket at `path` (mode 0600, this uid and
/// root) until the returned server is dropped: `rtrs ctl --socket PATH
/// list paths | stats | add-path ADDR | disconnect P | reconnect P |
/// remove-path P | mp-policy X`.
pub fn serve<F: Fabric>(path: &Path, client: Arc<Client<F>>) -> Result<CtlServer, String> {
    serve_backend(path, client)
}

fn paths_table(v: &ClientView, stats: bool) -> String {
    let rows: Vec<Vec<String>> = v
        .paths
        .iter()
        .map(|p| {
            let mut r = vec![
                p.id.clone(),
                p.addr.clone(),
                p.state.clone(),
                v.mp_policy.clone(),
                p.inflight.to_string(),
                p.reconnects.to_string(),
            ];
            if stats {
                r.extend([
                    p.failed_reconnects.to_string(),
                    p.ios.to_string(),
                    p.bytes.to_string(),
                    p.errors.to_string(),
                    p.failovers.to_string(),
                    p.downs.to_string(),
                    us(p.hb_rtt_ns),
                    p.hb_missed_peak.to_string(),
                ]);
            }
            r
        })
        .collect();
    let mut h = vec![
        "PATH",
        "ADDR",
        "STATE",
        "MP_POLICY",
        "INFLIGHT",
        "RECONNECTS",
    ];
    if stats {
        h.extend([
            "FAILED_RECONNECTS",
            "IOS",
            "BYTES",
            "ERRORS",
            "FAILOVERS",
            "DOWNS",
            "HB_RTT_US",
            "HB_MISSED",
        ]);
    }
    format!("session {}\n", v.session) + &table(&h, &rows)
}

/// A census as a two-row table (names, then values), after a blank line.
pub fn census_table(c: &crate::Census) -> String {
    let rows = c.rows();
    let head: Vec<&str> = rows.iter().map(|(k, _)| *k).collect();
    let vals: Vec<String> = rows.into_iter().map(|(_, v)| v).collect();
    let upper: Vec<String> = head.iter().map(|h| h.to_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    format!("\nprocess census\n{}", table(&upper, &[vals]))
}

/// Human tables of a client's response data for `req`.
pub fn human(req: &Request, data: &serde_json::Value) -> String {
    let view = || serde_json::from_value::<ClientView>(data.clone()).unwrap_or_default();
    match req {
        Request::ListPaths {} => paths_table(&view(), false),
        Request::Stats { .. } => {
            let v = view();
            let cores: Vec<Vec<String>> = v
                .cores
                .iter()
                .map(|c| {
                    vec![
                        c.core.to_string(),
                        c.ios.to_string(),
                        c.bytes.to_string(),
                        c.inflight.to_string(),
                        c.errors.to_string(),
                        c.failovers.to_string(),
                    ]
                })
                .collect();
            paths_table(&v, true)
                + "\n"
                + &table(
                    &["CORE", "IOS", "BYTES", "INFLIGHT", "ERRORS", "FAILOVERS"],
                    &cores,
                )
                + &v.census.as_ref().map(census_table).unwrap_or_default()
        }
        Request::AddPath { .. } => format!(
            "added {} ({})\n",
            data["path"].as_str().unwrap_or("?"),
            data["addr"].as_str().unwrap_or("?")
        ),
        Request::MpPolicy { .. } => {
            format!("mp_policy {}\n", data["mp_policy"].as_str().unwrap_or("?"))
        }
        Request::Disconnect { .. } | Request::Reconnect { .. } | Request::RemovePath { .. } => {
            let what = ["disconnected", "reconnected", "removed"]
                .into_iter()
                .find(|w| data.get(*w).is_some())
                .unwrap_or("done");
            format!("{} {what}\n", data["path"].as_str().unwrap_or("?"))
        }
        _ => format!("{data}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;
    use std::sync::Mutex;

    /// A client of paths path0 (shm:a) and path1 (shm:b).
    struct Fake {
        paths: Mutex<Vec<(u32, String, String)>>,
        policy: Mutex<MpPolicy>,
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                paths: Mutex::new(vec![
                    (0, "shm:a".into(), "connected".into()),
                    (1, "shm:b".into(), "connected".into()),
                ]),
                policy: Mutex::new(MpPolicy::MinInflight),
                calls: Mutex::new(Vec::new()),
            }
        }
        fn set(&self, id: u32, state: &str) -> Result<(), (String, i32)> {
            let mut p = self.paths.lock().unwrap();
            match p.iter_mut().find(|p| p.0 == id) {
                Some(p) => {
                    p.2 = state.into();
                    Ok(())
                }
                None => Err(("no path".into(), -libc::ENOENT)),
            }
        }
    }

    impl ClientBackend for Fake {
        fn view(&self) -> ClientView {
            ClientView {
                session: "s".into(),
                mp_policy: self.policy.lock().unwrap().to_string(),
                paths: self
                    .paths
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(id, addr, state)| ClientPathView {
                        id: format!("path{id}"),
                        addr: addr.clone(),
                        state: state.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ctl_refused: 0,
                census: None,
                cores: (0..2)
                    .map(|core| ClientCoreView {
                        core,
                        ios: 10 + core as u64,
                        ..Default::default()
                    })
                    .collect(),
            }
        }
        fn add_path(&self, addr: &str) -> Result<u32, (String, i32)> {
            let _: Address = addr.parse().map_err(|e| (format!("{e}"), -libc::EINVAL))?;
            let mut p = self.paths.lock().unwrap();
            if p.iter().any(|p| p.1 == addr) {
                return Err(("exists".into(), -libc::EEXIST));
            }
            let id = p.iter().map(|p| p.0 + 1).max().unwrap_or(0);
            p.push((id, addr.into(), "connected".into()));
            Ok(id)
        }
        fn remove_path(&self, id: u32) -> Result<(), (String, i32)> {
            let mut p = self.paths.lock().unwrap();
            if p.len() == 1 {
                return Err(("the last path".into(), -libc::EBUSY));
            }
            p.retain(|p| p.0 != id);
            Ok(())
        }
        fn disconnect(&self, id: u32) -> Result<(), (String, i32)> {
            self.calls.lock().unwrap().push(format!("disconnect {id}"));
            self.set(id, "closed")
        }
        fn reconnect(&self, id: u32) -> Result<(), (String, i32)> {
            self.calls.lock().unwrap().push(format!("reconnect {id}"));
            self.set(id, "connected")
        }
        fn set_mp_policy(&self, p: MpPolicy) {
            *self.policy.lock().unwrap() = p;
        }
    }

    fn run(b: &Fake, req: Request) -> Response {
        let r = handle_line(&encode(&req), b);
        assert_eq!(r.role(), Some(Role::Client));
        r
    }

    fn view(r: Response) -> ClientView {
        assert!(r.ok, "{r:?}");
        serde_json::from_value(r.data.unwrap()).unwrap()
    }

    #[test]
    fn paths_are_listed_steered_and_named_by_id_or_address() {
        let b = Fake::new();
        let v = view(run(&b, Request::ListPaths {}));
        assert_eq!(v.paths.len(), 2);
        assert_eq!(v.mp_policy, "min-inflight");
        for key in ["path1", "1", "shm:b"] {
            let r = run(&b, Request::Disconnect { path: key.into() });
            assert!(r.ok, "{key}: {r:?}");
            assert_eq!(r.data.unwrap()["path"], "path1");
        }
        assert_eq!(b.view().paths[1].state, "closed");
        let r = run(&b, Request::Reconnect { path: "1".into() });
        assert!(r.ok);
        assert_eq!(b.view().paths[1].state, "connected");
        assert_eq!(
            b.calls.lock().unwrap().last().map(String::as_str),
            Some("reconnect 1")
        );
        let r = run(
            &b,
            Request::RemovePath {
                path: "shm:a".into(),
            },
        );
        assert!(r.ok, "{r:?}");
        let r = run(
            &b,
            Request::RemovePath {
                path: "path1".into(),
            },
        );
        assert_eq!(r.errno, Some(-libc::EBUSY), "the last path stays");
        let r = run(
            &b,
            Request::AddPath {
                addr: "shm:a".into(),
            },
        );
        assert_eq!(r.data.unwrap()["path"], "path2");
        let r = run(
            &b,
            Request::AddPath {
                addr: "shm:a".into(),
            },
        );
        assert_eq!(r.errno, Some(-libc::EEXIST));
        let r = run(
            &b,
            Request::AddPath {
                addr: "nonsense".into(),
            },
        );
        assert_eq!(r.errno, Some(-libc::EINVAL));
        assert!(r.error.unwrap().contains("nonsense"));
        let r = run(
            &b,
            Request::MpPolicy {
                policy: "rr".into(),
            },
        );
        assert_eq!(r.data.unwrap()["mp_policy"], "round-robin");
        let r = run(
            &b,
            Request::MpPolicy {
                policy: "fastest".into(),
            },
        );
        assert_eq!(r.errno, Some(-libc::EINVAL));
        assert_eq!(
            view(run(&b, Request::ListPaths {})).mp_policy,
            "round-robin"
        );
        let h = human(
            &Request::ListPaths {},
            &run(&b, Request::ListPaths {}).data.unwrap(),
        );
        assert!(
            h.contains("PATH") && h.contains("path2") && h.contains("round-robin"),
            "{h}"
        );
    }

    #[test]
    fn bad_and_foreign_requests_get_errors() {
        let b = Fake::new();
        for (req, errno) in [
            (
                Request::Disconnect {
                    path: "path9".into(),
                },
                -libc::ENOENT,
            ),
            (Request::Reconnect { path: "".into() }, -libc::ENOENT),
            (Request::ListSessions {}, -libc::EOPNOTSUPP),
            (
                Request::Close {
                    session: "s".into(),
                },
                -libc::EOPNOTSUPP,
            ),
            (
                Request::Stats {
                    session: None,
                    path: None,
                    core: Some(7),
                },
                -libc::ENOENT,
            ),
            (
                Request::Stats {
                    session: Some("other".into()),
                    path: None,
                    core: None,
                },
                -libc::ENOENT,
            ),
        ] {
            let r = run(&b, req.clone());
            assert_eq!(r.errno, Some(errno), "{req:?}: {r:?}");
        }
        for line in [
            "",
            "{\"v\":2,\"cmd\":\"list_paths\"}",
            "{\"v\":1,\"cmd\":\"reboot\"}",
        ] {
            let r = handle_line(line, &b);
            assert!(!r.ok && r.role() == Some(Role::Client), "{line}");
        }
        // Nothing changed.
        assert_eq!(b.view().paths.len(), 2);
        assert!(b.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn stats_narrow_to_a_path() {
        let b = Fake::new();
        let v = view(run(
            &b,
            Request::Stats {
                session: Some("s".into()),
                path: Some("shm:b".into()),
                core: None,
            },
        ));
        assert_eq!(v.paths.len(), 1);
        assert_eq!(v.paths[0].id, "path1");
        assert_eq!(v.cores.len(), 2);
        let c = view(run(
            &b,
            Request::Stats {
                session: None,
                path: None,
                core: Some(1),
            },
        ));
        assert_eq!(c.cores.len(), 1);
        assert_eq!(c.cores[0].ios, 11);
        assert!(view(run(&b, Request::ListPaths {})).cores.is_empty());
        let h = human(
            &Request::Stats {
                session: None,
                path: None,
                core: None,
            },
            &serde_json::to_value(&v).unwrap(),
        );
        assert!(
            h.contains("FAILED_RECONNECTS") && h.contains("path1"),
            "{h}"
        );
        // Stats carry the process's census, listing paths does not.
        let census = v.census.expect("stats carry the census");
        assert!(census.fds > 0 && census.vm_rss_kb > 0);
        assert!(
            h.contains("process census") && h.contains("VM_RSS_KB"),
            "{h}"
        );
        assert!(view(run(&b, Request::ListPaths {})).census.is_none());
    }

    #[test]
    fn a_socket_serves_the_fake_and_goes_at_drop() {
        let dir = std::env::temp_dir().join(format!("rtrs-ctl-unit-{}", std::process::id()));
        let sock = dir.join("c.sock");
        let srv = serve_backend(&sock, Arc::new(Fake::new())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let r = crate::request(&sock, &Request::ListPaths {}).unwrap();
        assert_eq!(r.role(), Some(Role::Client));
        assert_eq!(view(r).paths.len(), 2);
        drop(srv);
        assert!(!sock.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
