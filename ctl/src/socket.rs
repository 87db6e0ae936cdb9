//! The control socket: bound with mode 0600 (a stale file replaced, a live
//! one refused), served from a thread of its own (never a poll core), each
//! peer checked by SO_PEERCRED (same uid or root); one request line of at
//! most [`MAX_LINE`] bytes, one response line. And [`request`], the other
//! end.

use crate::{Response, Role, MAX_LINE};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What answers one request line.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// A bound control socket not served yet (bound early, so a bad `--ctl`
/// stops the program before it does anything else).
#[derive(Debug)]
pub struct CtlSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl CtlSocket {
    /// Binds `path` (mode 0600; its directory made with 0700 when missing).
    /// A stale socket file is replaced; a live one (another process answers
    /// on it) is an error.
    pub fn bind(path: &Path) -> Result<CtlSocket, String> {
        Ok(CtlSocket {
            listener: Some(bind(path)?),
            path: path.to_path_buf(),
        })
    }

    /// Where it is bound.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CtlSocket {
    /// Never served (the program failed to start): the file goes.
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A served control socket: its thread stops and the file goes when this
/// is dropped.
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
    /// own (never a core) until dropped: each request line goes to
    /// `handler`; `refused` counts the connections refused (a foreign uid).
    pub fn serve(
        mut sock: CtlSocket,
        role: Role,
        handler: Handler,
        refused: Arc<AtomicU64>,
    ) -> Result<CtlServer, String> {
        let l = sock
            .listener
            .take()
            .ok_or("the control socket is served already")?;
        let path = sock.path.as_path();
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let thread = std::thread::Builder::new()
            .name("rtrs-ctl".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => serve_one(s, role, &*handler, me, &refused),
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
        tracing::info!(socket = %path.display(), role = role.name(), "ctl socket listening");
        Ok(CtlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
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
fn serve_one(
    s: UnixStream,
    role: Role,
    handler: &(dyn Fn(&str) -> Response + Send + Sync),
    me: u32,
    refused: &AtomicU64,
) {
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
                    format!(
                        "uid {uid} may not control this {} (uid {me} or root may)",
                        role.name()
                    ),
                    Some(-libc::EACCES),
                )
                .with_role(role),
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
            let resp = handler(&line);
            if !resp.ok {
                tracing::info!(request = line.trim(), error = ?resp.error, "ctl: request failed");
            }
            resp
        }
        Ok(_) => Response::err(
            "a request is one line of at most 64 KiB",
            Some(-libc::EINVAL),
        )
        .with_role(role),
        Err(e) => {
            Response::err(format!("reading the request: {e}"), Some(-libc::EIO)).with_role(role)
        }
    };
    write(&s, &resp);
}

/// The other end: sends `req` to the socket at `socket`, returns the
/// response.
pub fn request(socket: &Path, req: &crate::Request) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach {}: {e} (is rtrs serve running with --ctl {}, or a client with --ctl?)",
            socket.display(),
            socket.display()
        )
    })?;
    // A client's add_path and reconnect return once the path is up.
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(crate::encode(req).as_bytes())
        .map_err(|e| format!("sending to {}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("reading from {}: {e}", socket.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("a bad response: {e}"))
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
