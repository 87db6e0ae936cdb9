//! Socket calls of the tcp fabric: the few std does not offer (a non-blocking
//! connect, flags on send/recv, TCP keepalive and user timeout), as thin
//! wrappers over libc.

use crate::{Address, FabricError, Result};
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How long the kernel may hold unacknowledged data before it gives up on
/// the peer (`TCP_USER_TIMEOUT`): the RC transport's retry budget.
pub(crate) const USER_TIMEOUT_MS: u32 = 15_000;

/// Resolves a `tcp:HOST:PORT` address (slow path: may ask DNS).
pub(crate) fn resolve(addr: &Address) -> Result<SocketAddr> {
    let Address::Tcp { host, port } = addr else {
        return Err(FabricError::WrongBackend(addr.to_string(), "tcp"));
    };
    let mut it = (host.as_str(), *port)
        .to_socket_addrs()
        .map_err(|e| FabricError::io("resolve the tcp address", e))?;
    it.next().ok_or(FabricError::BadAddress {
        addr: addr.to_string(),
        why: "host resolves to no address",
    })
}

/// Starts a non-blocking connect; completion shows as writability, and the
/// outcome in `take_error`.
pub(crate) fn connect_start(sa: &SocketAddr) -> io::Result<TcpStream> {
    let family = match sa {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: ss holds a valid sockaddr of `len` bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &ss as *const _ as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(TcpStream::from(fd))
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, val: libc::c_int) {
    // SAFETY: val is a live c_int and we pass its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &val as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Options of a data connection: no Nagle, keepalive and a user timeout so a
/// vanished host is noticed even on an idle or stuck connection.
pub(crate) fn tune(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    let fd = s.as_raw_fd();
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 5);
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        USER_TIMEOUT_MS as libc::c_int,
    );
    Ok(())
}

/// One non-blocking send, never raising SIGPIPE.
#[inline]
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking receive (`Ok(0)` is end of stream).
#[inline]
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Looks at what has arrived without taking it.
pub(crate) fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Shuts down the writing half (FIN after what is queued).
pub(crate) fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor we hold; errors (already shut,
    // reset) do not matter here.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}
