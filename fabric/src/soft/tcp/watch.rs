//! Idle QPs leave the poll loop: the tcp fabric's completion channel.
//!
//! ```text
//!  core: CQ armed (every QP quiet) ──epoll_ctl(ONESHOT, EPOLLIN|RDHUP)──┐
//!        stops polling the connection                                    v
//!  watcher thread (one per fabric, asleep in epoll_wait) ── readable ──> wake.ring()
//!  core: its bell rang ──> polls the connection again (recv, as before)
//! ```
//! A socket with nothing to read costs a busy core a `recv()` per loop
//! iteration; a thousand idle ones cost it everything. Armed, they cost it
//! nothing: the watcher sleeps until one turns readable (or hangs up) and
//! rings the wake its connection left. The thread starts with the first arm.

use crate::{FabricError, Result};
use pollers::Wake;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

/// The token of the watcher's own stop eventfd (QP numbers are u32).
const STOP: u64 = u64::MAX;

/// The wakes of armed QPs, by QP number.
type Wakes = Arc<Mutex<HashMap<u32, Arc<Wake>>>>;

#[derive(Debug)]
struct Running {
    epfd: Arc<OwnedFd>,
    stop: OwnedFd,
    wakes: Wakes,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The fabric's watcher of armed QPs' sockets.
#[derive(Debug, Default)]
pub(crate) struct Watcher {
    /// Started with the first arm; `None` when it could not start (logged
    /// once; connections then stay polled, as before).
    running: OnceLock<Option<Mutex<Running>>>,
}

fn last_os(what: &'static str) -> FabricError {
    FabricError::last_os(what)
}

fn start() -> Result<Running> {
    // SAFETY: plain syscall; the descriptor is checked and owned below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(last_os("epoll_create1"));
    }
    // SAFETY: a fresh descriptor we own.
    let epfd = Arc::new(unsafe { OwnedFd::from_raw_fd(ep) });
    // SAFETY: plain syscall; checked and owned below.
    let ev = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if ev < 0 {
        return Err(last_os("eventfd"));
    }
    // SAFETY: a fresh descriptor we own.
    let stop = unsafe { OwnedFd::from_raw_fd(ev) };
    ctl(
        &epfd,
        libc::EPOLL_CTL_ADD,
        stop.as_raw_fd(),
        libc::EPOLLIN as u32,
        STOP,
    )?;
    let wakes: Wakes = Arc::default();
    let (ep2, w2) = (epfd.clone(), wakes.clone());
    let thread = std::thread::Builder::new()
        .name("rtrs-tcp-watch".into())
        .spawn(move || watch(&ep2, &w2))
        .map_err(|e| FabricError::io("starting the tcp watcher thread", e))?;
    Ok(Running {
        epfd,
        stop,
        wakes,
        thread: Some(thread),
    })
}

fn ctl(epfd: &OwnedFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: both descriptors are open; `ev` lives across the call.
    if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), op, fd, &mut ev) } != 0 {
        return Err(last_os("epoll_ctl"));
    }
    Ok(())
}

/// The watcher thread: rings the wake of each QP whose socket turned
/// readable, until its stop eventfd is written.
fn watch(epfd: &OwnedFd, wakes: &Wakes) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        // SAFETY: `events` is a valid buffer of 64 entries for the call.
        let n = unsafe { libc::epoll_wait(epfd.as_raw_fd(), events.as_mut_ptr(), 64, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("tcp fabric: the idle-connection watcher stops: epoll_wait: {e}");
            return;
        }
        let Ok(map) = wakes.lock() else { return };
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == STOP {
                return;
            }
            if let Some(w) = map.get(&(token as u32)) {
                w.ring();
            }
        }
    }
}

impl Watcher {
    fn running(&self) -> Result<&Mutex<Running>> {
        let r = self.running.get_or_init(|| match start() {
            Ok(r) => Some(Mutex::new(r)),
            Err(e) => {
                tracing::warn!("tcp fabric: idle connections stay polled: {e}");
                None
            }
        });
        r.as_ref().ok_or_else(|| {
            FabricError::io(
                "the tcp watcher did not start",
                std::io::ErrorKind::Unsupported.into(),
            )
        })
    }

    /// Watches `fd` (QP `qp_num`'s socket) once: `wake` rings when it turns
    /// readable or hangs up. `first`: the QP was never armed before.
    pub(crate) fn arm(&self, qp_num: u32, fd: RawFd, wake: &Arc<Wake>, first: bool) -> Result<()> {
        let r = self.running()?;
        let g = r.lock().unwrap_or_else(|e| e.into_inner());
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;
        if first {
            g.wakes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(qp_num, wake.clone());
            ctl(&g.epfd, libc::EPOLL_CTL_ADD, fd, events, u64::from(qp_num))
        } else {
            ctl(&g.epfd, libc::EPOLL_CTL_MOD, fd, events, u64::from(qp_num))
        }
    }

    /// QP `qp_num` goes away: stop watching its socket.
    pub(crate) fn forget(&self, qp_num: u32, fd: RawFd) {
        let Some(Some(r)) = self.running.get() else {
            return;
        };
        let g = r.lock().unwrap_or_else(|e| e.into_inner());
        g.wakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&qp_num);
        // The socket may be shut already; a failure only means it was
        // never added or is gone, and then there is nothing to watch.
        if ctl(&g.epfd, libc::EPOLL_CTL_DEL, fd, 0, 0).is_err() {
            tracing::trace!(qp_num, "tcp watcher: socket already gone");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our own eventfd.
        let n = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        if n == 8 {
            if let Some(t) = self.thread.take() {
                if t.join().is_err() {
                    tracing::error!("tcp watcher thread panicked");
                }
            }
        } else {
            // Not joined: the thread holds its own references and exits
            // with the process.
            tracing::error!("tcp watcher: cannot signal the thread to stop");
        }
    }
}
