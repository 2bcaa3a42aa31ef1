//! A small HTTP/1.1 server: what `serve --http` speaks.
//!
//! One accept thread hands every connection a thread of its own at once, so connections
//! opened together all start together (the thread pool of the library used before, tiny_http
//! 0.12, could leave a burst of new connections waiting behind keep-alive ones for a minute).
//! At most [`Config::max_connections`] are open; one more is answered 503 (from a single
//! refusing thread) and closed. A connection carries requests one after another (keep-alive)
//! and closes after [`Config::idle_timeout`] without one.
//!
//! Requests: HTTP/1.0 and 1.1; a head of at most 8 KiB of request line (414 beyond) and
//! 32 KiB or 128 header fields (431 beyond), arriving within [`Config::head_timeout`] of its
//! first byte (408); bodies framed by `Content-Length` or chunked `Transfer-Encoding`
//! (decoded; both at once, a bad length or another coding is a 400 or 501); `Expect:
//! 100-continue` answered when the handler first reads the body. Anything malformed gets one
//! error answer and the connection closes; nothing a client sends can panic the server.
//! Answers: whole with `Content-Length` (a HEAD request gets the head only), or streamed in
//! chunks (to an HTTP/1.0 client: raw, ended by closing).

mod body;
mod conn;
mod head;
mod response;
#[cfg(test)]
mod tests;

pub use conn::{Request, Stream};
pub use head::Method;
pub use response::Response;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// A request that cannot be served as sent: its status, error code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }
}

/// Limits and timeouts of the server.
#[derive(Clone, Copy)]
pub struct Config {
    /// Most connections open at once (each has a thread); more are answered 503 and closed.
    pub max_connections: usize,
    /// How long an open connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a request head may take to arrive, from its first byte.
    pub head_timeout: Duration,
    /// How long one read of a body or one write of an answer may block.
    pub io_timeout: Duration,
    /// The answer to a refused request (the server's error format).
    pub refusal: fn(&Refusal) -> Response,
}

/// What serves one request on its connection's thread.
pub type Handler = dyn Fn(Request<'_>) + Send + Sync;

/// A connection's work: what runs on its own thread.
pub type Job = Box<dyn FnOnce() + Send>;

/// Accepts connections on `listener` for as long as the process runs.
pub fn accept(listener: TcpListener, config: Config, handler: Arc<Handler>) {
    accept_with(listener, config, handler, |job| {
        std::thread::Builder::new()
            .name("http".into())
            .spawn(job)
            .map(drop)
    })
}

/// A place among the open connections, given back when dropped: when the connection's
/// thread ends (even by a panic), or with its job when the thread could not be started.
struct Place(Arc<AtomicUsize>);

impl Place {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Place> {
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place(Arc::clone(open)))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// [`accept`] with the thread spawner as a parameter (tests make it fail).
pub fn accept_with(
    listener: TcpListener,
    config: Config,
    handler: Arc<Handler>,
    spawn: impl Fn(Job) -> std::io::Result<()>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let max = config.max_connections.max(1);
    let refuser = Refuser::start(config);
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            // A connection reset while queued is no one's concern.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                // Out of descriptors or memory: wait for some to free instead of spinning.
                eprintln!("serve: cannot accept a connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(place) = Place::take(&open, max) else {
            let message = format!("more than {max} connections are open; retry later");
            refuser.refuse(stream, Refusal::new(503, "overloaded", message));
            continue;
        };
        let spare = stream.try_clone().ok();
        let handler = Arc::clone(&handler);
        let job: Job = Box::new(move || {
            let _place = place;
            conn::serve(stream, config, &*handler);
        });
        if spawn(job).is_err() {
            eprintln!("serve: cannot start a connection thread");
            if let Some(s) = spare {
                let message = "cannot start a connection thread; retry later";
                refuser.refuse(s, Refusal::new(503, "overloaded", message));
            }
        }
    }
}

/// Answers refused connections on one thread of its own, so the accept loop never waits on
/// a client; when it falls behind, further refused connections are closed unanswered.
struct Refuser {
    queue: Option<mpsc::SyncSender<(std::net::TcpStream, Refusal)>>,
}

impl Refuser {
    /// Refused connections waiting for an answer at most.
    const QUEUE: usize = 64;

    fn start(config: Config) -> Refuser {
        let (tx, rx) = mpsc::sync_channel::<(std::net::TcpStream, Refusal)>(Self::QUEUE);
        let started = std::thread::Builder::new()
            .name("http-refuse".into())
            .spawn(move || {
                for (stream, refusal) in rx {
                    conn::refuse(stream, config, &refusal);
                }
            })
            .is_ok();
        Refuser {
            queue: started.then_some(tx),
        }
    }

    fn refuse(&self, stream: std::net::TcpStream, refusal: Refusal) {
        if let Some(q) = &self.queue {
            // Full: the stream is dropped, which closes it.
            let _ = q.try_send((stream, refusal));
        }
    }
}
