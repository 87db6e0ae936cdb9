//! `rtrs ctl`'s control plane, shared by a server (`rtrs serve --ctl`) and
//! a client (`rtrs-perf client --ctl`, or any embedder of
//! [`rtrs_poll::clt::Client`]): the versioned one-JSON-line-each-way
//! protocol ([`Request`], [`Response`]), the unix socket with its access
//! rules ([`socket`]: mode 0600, SO_PEERCRED same uid or root, stale
//! sockets replaced) and the client's dispatcher ([`client`]).
//!
//! A crate of its own (not a module of `rtrs-cli`) so that `rtrs-perf` and
//! embedders can offer a client's socket without the operator CLI, and
//! (not a feature of `rtrs-poll`) so that the dataplane library stays free
//! of JSON and sockets.
//!
//! ```text
//!  rtrs ctl ──{"v":1,"cmd":"list_paths"}\n──> ctl thread (SO_PEERCRED: same uid or root)
//!           <──{"v":1,"ok":true,"role":"client","data":...}\n──  -> a server's Backend or
//!                                                                   a Client's dispatcher
//! ```

pub mod census;
pub mod client;
pub mod socket;

use serde::{Deserialize, Serialize};

pub use census::Census;
pub use socket::{default_socket, request, CtlServer, CtlSocket};

/// The protocol's version: requests carry it, responses echo it.
pub const VERSION: u32 = 1;

/// Longest request line taken.
pub const MAX_LINE: u64 = 64 << 10;

/// A request: `{"v":1,"cmd":...}` and the command's fields. One enum for
/// both roles: a server answers a client's command (and a client a
/// server's) with an error that says which it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sessions with their paths and open devices (server).
    ListSessions {},
    /// Every path (both).
    ListPaths {},
    /// Open devices per session, and the exports (server).
    ListDevices {},
    /// Counters, narrowed to a session, a path or a core (both; a client's
    /// are per path).
    Stats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        core: Option<usize>,
    },
    /// Close a path's connections (both: a server's client reconnects; a
    /// client's path stays down until `reconnect`, the kernel's sysfs
    /// `disconnect`).
    Disconnect { path: String },
    /// Close every path of a session (server).
    Close { session: String },
    /// Close one open device of a session (server; the kernel's
    /// `force_close`).
    ForceClose { session: String, device_id: u32 },
    /// Serve one more export: `spec` as `--export NAME=SPEC` (server).
    ExportAdd { name: String, spec: String },
    /// Stop serving an export (server; -EBUSY while open).
    ExportRemove { name: String },
    /// Reconnect a path now (client; the kernel's sysfs `reconnect`).
    Reconnect { path: String },
    /// Remove a path (client; the kernel's sysfs `remove_path`).
    RemovePath { path: String },
    /// Add a path to `addr` (client; the kernel's sysfs `add_path`).
    AddPath { addr: String },
    /// Switch the multipath policy (client; the kernel's sysfs
    /// `mpath_policy`): round-robin, min-inflight or min-latency.
    MpPolicy { policy: String },
}

/// Who answers on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `rtrs serve`.
    Server,
    /// A client session (`rtrs-perf client --ctl`, an embedder).
    Client,
}

impl Role {
    /// As responses carry it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

impl Request {
    /// The command's wire name.
    pub fn cmd(&self) -> &'static str {
        match self {
            Request::ListSessions {} => "list_sessions",
            Request::ListPaths {} => "list_paths",
            Request::ListDevices {} => "list_devices",
            Request::Stats { .. } => "stats",
            Request::Disconnect { .. } => "disconnect",
            Request::Close { .. } => "close",
            Request::ForceClose { .. } => "force_close",
            Request::ExportAdd { .. } => "export_add",
            Request::ExportRemove { .. } => "export_remove",
            Request::Reconnect { .. } => "reconnect",
            Request::RemovePath { .. } => "remove_path",
            Request::AddPath { .. } => "add_path",
            Request::MpPolicy { .. } => "mp_policy",
        }
    }

    /// Whether `role` serves the command.
    pub fn served_by(&self, role: Role) -> bool {
        match self {
            Request::ListPaths {} | Request::Stats { .. } | Request::Disconnect { .. } => true,
            Request::ListSessions {}
            | Request::ListDevices {}
            | Request::Close { .. }
            | Request::ForceClose { .. }
            | Request::ExportAdd { .. }
            | Request::ExportRemove { .. } => role == Role::Server,
            Request::Reconnect { .. }
            | Request::RemovePath { .. }
            | Request::AddPath { .. }
            | Request::MpPolicy { .. } => role == Role::Client,
        }
    }

    /// The error `role` answers a command of the other role's with
    /// (-EOPNOTSUPP), or None when it serves it.
    pub fn refused_by(&self, role: Role) -> Option<Response> {
        if self.served_by(role) {
            return None;
        }
        let (me, other) = match role {
            Role::Server => ("a server's (rtrs serve)", "a client's"),
            Role::Client => ("a client session's", "a server's"),
        };
        Some(
            Response::err(
                format!("{} is {other} command; this socket is {me}", self.cmd()),
                Some(-libc::EOPNOTSUPP),
            )
            .with_role(role),
        )
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    req: Request,
}

/// A response: `ok` with `data`, or an `error` (and its errno when there
/// is one); `role` says who answered ("server" or "client").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

impl Response {
    /// Success with `data`.
    pub fn ok(data: serde_json::Value) -> Response {
        Response {
            v: VERSION,
            ok: true,
            role: None,
            data: Some(data),
            error: None,
            errno: None,
        }
    }

    /// A failure: why, and the errno when there is one.
    pub fn err(error: impl Into<String>, errno: Option<i32>) -> Response {
        Response {
            v: VERSION,
            ok: false,
            role: None,
            data: None,
            error: Some(error.into()),
            errno,
        }
    }

    /// Says who answered.
    pub fn with_role(mut self, role: Role) -> Response {
        self.role = Some(role.name().into());
        self
    }

    /// Who answered, when the response says.
    pub fn role(&self) -> Option<Role> {
        match self.role.as_deref() {
            Some("server") => Some(Role::Server),
            Some("client") => Some(Role::Client),
            _ => None,
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

/// Decodes a request line: the version first, then the command with no
/// field it does not know.
pub fn parse_request(line: &str) -> Result<Request, Response> {
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
    serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| bad(e.to_string()))
}

/// Keeps only core `core` of `cores` (`core_of` tells a core's index);
/// none such is an -ENOENT response.
pub fn narrow_cores<T>(
    cores: &mut Vec<T>,
    core: Option<usize>,
    core_of: impl Fn(&T) -> usize,
) -> Result<(), Response> {
    let Some(c) = core else { return Ok(()) };
    if !cores.iter().any(|x| core_of(x) == c) {
        return Err(Response::err(
            format!("no core {c} (cores 0..{})", cores.len()),
            Some(-libc::ENOENT),
        ));
    }
    cores.retain(|x| core_of(x) == c);
    Ok(())
}

/// A table: each column as wide as its widest cell, numbers right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
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

/// Nanoseconds as microseconds with one decimal.
pub fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_carry_the_version() {
        for r in [
            Request::Stats {
                session: Some("s".into()),
                path: None,
                core: Some(1),
            },
            Request::AddPath {
                addr: "shm:x".into(),
            },
            Request::MpPolicy {
                policy: "min-inflight".into(),
            },
            Request::RemovePath {
                path: "path1".into(),
            },
        ] {
            let line = encode(&r);
            assert!(line.starts_with("{\"v\":1,\"cmd\":"), "{line}");
            assert_eq!(parse_request(&line).unwrap(), r);
        }
        assert_eq!(
            encode(&Request::Stats {
                session: Some("s".into()),
                path: None,
                core: Some(1),
            }),
            "{\"v\":1,\"cmd\":\"stats\",\"session\":\"s\",\"core\":1}\n"
        );
        assert_eq!(
            encode(&Request::AddPath {
                addr: "shm:b".into()
            }),
            "{\"v\":1,\"cmd\":\"add_path\",\"addr\":\"shm:b\"}\n"
        );
    }

    #[test]
    fn each_role_refuses_the_others_commands() {
        let reconnect = Request::Reconnect { path: "1".into() };
        let close = Request::Close {
            session: "s".into(),
        };
        assert!(reconnect.refused_by(Role::Client).is_none());
        assert!(close.refused_by(Role::Server).is_none());
        let r = reconnect.refused_by(Role::Server).unwrap();
        assert_eq!(r.errno, Some(-libc::EOPNOTSUPP));
        assert_eq!(r.role(), Some(Role::Server));
        assert!(r.error.unwrap().contains("reconnect is a client's command"));
        let r = close.refused_by(Role::Client).unwrap();
        assert!(r.error.unwrap().contains("close is a server's command"));
        for both in [
            Request::ListPaths {},
            Request::Disconnect { path: "x".into() },
        ] {
            assert!(both.served_by(Role::Server) && both.served_by(Role::Client));
        }
    }

    #[test]
    fn a_response_without_a_role_still_reads() {
        // An older server's line (no "role").
        let r: Response = serde_json::from_str("{\"v\":1,\"ok\":true,\"data\":[]}").unwrap();
        assert!(r.ok && r.role().is_none());
        let line =
            serde_json::to_string(&Response::ok(serde_json::json!(1)).with_role(Role::Client))
                .unwrap();
        assert_eq!(line, "{\"v\":1,\"ok\":true,\"role\":\"client\",\"data\":1}");
    }
}
