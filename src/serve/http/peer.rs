//! Whether the client of a request still being generated has gone away, for answers that are
//! written only at the end (a streaming answer finds out when a write fails).
//!
//! The kernel's TCP state of the request's socket tells: it leaves ESTABLISHED once the client
//! closes (CLOSE_WAIT after its FIN) or resets it (CLOSE). A client that only half-closes,
//! shutting its sending side while it waits, counts as gone. Reading cannot tell as well: a
//! pipelined next request would hide the close behind it.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// True once the client has closed (or reset) `socket`; false where the state cannot be read.
pub fn closed(socket: &TcpStream) -> bool {
    // SAFETY: tcp_info is plain data, valid zeroed; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    rc == 0 && i32::from(info.tcpi_state) != TCP_ESTABLISHED
}

/// Linux's `TCP_ESTABLISHED` (include/net/tcp_states.h).
const TCP_ESTABLISHED: i32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener};
    use std::time::{Duration, Instant};

    /// Waits until `closed` says `want` (it follows the kernel, a moment after the client).
    fn becomes(socket: &TcpStream, want: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while closed(socket) != want {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    #[test]
    fn a_closed_client_is_seen() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        assert!(!closed(&server_side));
        drop(client);
        assert!(becomes(&server_side, true), "close never seen");
    }

    #[test]
    fn a_half_closed_client_is_gone_but_a_waiting_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let waiting = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (waiting_side, _) = listener.accept().unwrap();
        let half = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (half_side, _) = listener.accept().unwrap();
        half.shutdown(Shutdown::Write).unwrap();
        assert!(becomes(&half_side, true), "half-close never seen");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!closed(&waiting_side));
        drop(waiting);
    }
}
