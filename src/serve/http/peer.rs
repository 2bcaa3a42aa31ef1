//! Whether the client of a request still being generated has gone away, for answers that are
//! written only at the end (a streaming answer finds out when a write fails).
//!
//! tiny_http does not hand out a request's socket, so it is found among the process's file
//! descriptors by its two addresses (Linux: `/proc/self/fd`) and duplicated, so the number stays
//! ours; the kernel's TCP state then tells whether the client closed or reset it (a client that
//! only half-closes, shutting its sending side while it waits, counts as gone). Where the socket
//! cannot be found, nothing is detected and the request runs to its end.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct Peer {
    fd: OwnedFd,
}

type AddrFn =
    unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

/// The address `f` (getsockname / getpeername) reports for `fd`, if it is an IP socket.
fn addr_of(fd: RawFd, f: AddrFn) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data, valid zeroed; the call writes at most `len` bytes
    // into it and fails harmlessly on a descriptor that is not a socket.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe {
        f(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn is_connection(fd: RawFd, local_port: u16, remote: SocketAddr) -> bool {
    addr_of(fd, libc::getpeername) == Some(remote)
        && addr_of(fd, libc::getsockname).is_some_and(|a| a.port() == local_port)
}

impl Peer {
    /// The connection from `remote` to this server's `local_port`, if it can be found.
    pub fn find(local_port: u16, remote: SocketAddr) -> Option<Peer> {
        let dir = std::fs::read_dir("/proc/self/fd").ok()?;
        for entry in dir.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<RawFd>().ok())
            else {
                continue;
            };
            if !is_connection(fd, local_port, remote) {
                continue;
            }
            // SAFETY: dup returns a new descriptor (or -1) that nothing else owns.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return None;
            }
            // SAFETY: `dup` is a fresh descriptor we own from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(dup) };
            // The number may have been reused between the check and the dup: check again.
            return is_connection(fd.as_raw_fd(), local_port, remote).then_some(Peer { fd });
        }
        None
    }

    /// True once the client has closed (or reset) the connection: the socket has left TCP's
    /// ESTABLISHED state (CLOSE_WAIT after the client's FIN, CLOSE after a reset). A peek
    /// cannot tell, since tiny_http shuts the socket's read side itself once a request is read.
    pub fn closed(&self) -> bool {
        // SAFETY: tcp_info is plain data, valid zeroed; getsockopt writes at most `len` bytes.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        rc == 0 && i32::from(info.tcpi_state) != TCP_ESTABLISHED
    }
}

/// Linux's `TCP_ESTABLISHED` (include/net/tcp_states.h).
const TCP_ESTABLISHED: i32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_closed_client_is_seen() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server_side, remote) = listener.accept().unwrap();
        assert_eq!(remote, client.local_addr().unwrap());
        let peer = Peer::find(port, remote).expect("the accepted socket is found");
        assert!(!peer.closed());
        drop(client);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !peer.closed() {
            assert!(std::time::Instant::now() < deadline, "close never seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // A connection that does not exist is not found.
        assert!(Peer::find(port, "127.0.0.1:1".parse().unwrap()).is_none());
    }
}
