//! One connection on its own thread: requests one after another (keep-alive), each handed to
//! the handler as a [`Request`] that answers whole ([`Request::respond`]) or streamed
//! ([`Request::stream`]). The connection closes when either side asks, after an answer that
//! left the request's body unread, after a stream that did not finish, and after a refusal.

use super::body::Body;
use super::head::{self, Head, Method};
use super::response::{self, Framing, Response};
use super::{Config, Handler, Refusal};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// How far the current request has been answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    None,
    Whole,
    StreamOpen,
    StreamDone,
}

/// The state of the exchange under way.
struct Exchange {
    body: Body,
    /// The client sent `Expect: 100-continue` and waits for a `100` before the body.
    continue_pending: bool,
    /// Whether the connection may carry another request (the client's wish; cleared when a
    /// write fails).
    keep_alive: bool,
    http10: bool,
    head_only: bool,
    answer: Answer,
}

pub struct Conn {
    reader: BufReader<TcpStream>,
    config: Config,
    ex: Exchange,
}

impl Conn {
    fn new(stream: TcpStream, config: Config) -> Conn {
        Conn {
            reader: BufReader::new(stream),
            config,
            ex: Exchange {
                body: Body::Done,
                continue_pending: false,
                keep_alive: false,
                http10: false,
                head_only: false,
                answer: Answer::None,
            },
        }
    }

    /// Sets up the exchange `head` starts.
    fn begin(&mut self, head: &Head) -> Result<(), Refusal> {
        self.ex.http10 = head.minor == 0;
        self.ex.head_only = head.method == Method::Head;
        self.ex.answer = Answer::None;
        self.ex.keep_alive = if self.ex.http10 {
            head.lists("connection", "keep-alive")
        } else {
            !head.lists("connection", "close")
        };
        self.ex.body = Body::Done;
        let body = Body::of(head)?;
        let mut continue_wanted = false;
        for v in head.values("expect") {
            if !v.eq_ignore_ascii_case("100-continue") {
                return Err(Refusal::new(
                    417,
                    "expectation_failed",
                    "only `Expect: 100-continue` is supported",
                ));
            }
            continue_wanted = true;
        }
        self.ex.continue_pending = continue_wanted && !self.ex.http10 && !body.is_done();
        self.ex.body = body;
        Ok(())
    }

    /// Whether the connection ends after this answer: the client asked, or the body was not
    /// read to its end (its rest would be taken for the next request).
    fn closing(&self) -> bool {
        !self.ex.keep_alive || !self.ex.body.is_done()
    }

    fn write(&mut self, bytes: &[u8]) -> bool {
        let mut s = self.reader.get_ref();
        let ok = s.write_all(bytes).and_then(|_| s.flush()).is_ok();
        if !ok {
            self.ex.keep_alive = false;
        }
        ok
    }

    fn respond(&mut self, r: &Response) {
        let close = self.closing();
        if close {
            self.ex.keep_alive = false;
        }
        let framing = Framing::Length(r.body.len());
        let mut out = response::head(r.status, &r.headers, framing, close, self.ex.http10);
        if !self.ex.head_only {
            out.extend_from_slice(&r.body);
        }
        self.ex.answer = Answer::Whole;
        self.write(&out);
    }

    /// Answers a request that could not be read, and closes.
    fn refuse(mut self, refusal: &Refusal, linger: Linger) {
        self.ex.keep_alive = false;
        let r = (self.config.refusal)(refusal);
        self.respond(&r);
        self.linger(linger);
    }

    /// Ends the exchange after the handler: whether the connection carries on.
    fn end(&mut self) -> bool {
        match self.ex.answer {
            Answer::None => {
                self.ex.keep_alive = false;
                let lost = Refusal::new(500, "internal", "the request was not answered");
                let r = (self.config.refusal)(&lost);
                self.respond(&r);
                false
            }
            Answer::StreamOpen => false,
            Answer::Whole | Answer::StreamDone => !self.closing(),
        }
    }

    /// Closes after an answer: the sending side first, then whatever the client still sends is
    /// read and dropped for a moment, so the answer is not lost to a reset that closing on
    /// unread data would send.
    fn linger(self, linger: Linger) {
        let s = self.reader.into_inner();
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.set_read_timeout(Some(linger.each_read));
        let until = Instant::now() + linger.at_most;
        let mut sink = [0u8; 8192];
        while Instant::now() < until {
            match (&s).read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// How long a closing connection drains what the client still sends.
#[derive(Clone, Copy)]
pub struct Linger {
    pub each_read: Duration,
    pub at_most: Duration,
}

/// After an answer on a connection of its own thread.
const LINGER: Linger = Linger {
    each_read: Duration::from_secs(1),
    at_most: Duration::from_secs(3),
};

/// For a connection refused on the shared refusing thread: brief.
const LINGER_QUICK: Linger = Linger {
    each_read: Duration::from_millis(200),
    at_most: Duration::from_millis(500),
};

/// Serves the requests of one connection until it closes.
pub fn serve(stream: TcpStream, config: Config, handler: &Handler) {
    // Each event of a stream is written at once, not held back to fill a packet.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(config.io_timeout));
    let mut conn = Conn::new(stream, config);
    loop {
        let raw = match head::read_raw(&mut conn.reader, config.idle_timeout, config.head_timeout) {
            Ok(Some(raw)) => raw,
            Ok(None) => return,
            Err(refusal) => return conn.refuse(&refusal, LINGER),
        };
        let head = match head::parse(&raw).and_then(|h| conn.begin(&h).map(|_| h)) {
            Ok(h) => h,
            Err(refusal) => return conn.refuse(&refusal, LINGER),
        };
        let _ = conn
            .reader
            .get_ref()
            .set_read_timeout(Some(config.io_timeout));
        handler(Request {
            head,
            conn: &mut conn,
        });
        if !conn.end() {
            break;
        }
    }
    conn.linger(LINGER);
}

/// Answers `refusal` to a connection that gets no thread of its own, reading its request
/// head first (briefly) so the answer is not lost to a reset.
pub fn refuse(stream: TcpStream, config: Config, refusal: &Refusal) {
    let _ = stream.set_write_timeout(Some(LINGER_QUICK.at_most));
    let mut conn = Conn::new(stream, config);
    let quick = LINGER_QUICK.at_most;
    if let Ok(Some(raw)) = head::read_raw(&mut conn.reader, quick, quick) {
        if let Ok(h) = head::parse(&raw) {
            conn.ex.http10 = h.minor == 0;
            conn.ex.head_only = h.method == Method::Head;
        }
    }
    conn.refuse(refusal, LINGER_QUICK);
}

/// One request, handed to the handler; answered by [`Self::respond`] or [`Self::stream`]
/// (dropped unanswered, it is answered 500).
pub struct Request<'c> {
    head: Head,
    conn: &'c mut Conn,
}

impl<'c> Request<'c> {
    pub fn method(&self) -> Method {
        self.head.method
    }

    /// The request target: the path and query.
    pub fn url(&self) -> &str {
        &self.head.target
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body's declared length; `None` for a chunked body (known only once read).
    pub fn body_length(&self) -> Option<u64> {
        self.conn.ex.body.length()
    }

    /// The body, decoded; its first read sends the `100 Continue` a client may wait for.
    pub fn body(&mut self) -> impl Read + '_ {
        BodyReader {
            conn: &mut *self.conn,
        }
    }

    /// Whether the client has closed or reset the connection (see `peer`); for answers
    /// that are written only at the end.
    pub fn client_closed(&self) -> bool {
        super::super::peer::closed(self.conn.reader.get_ref())
    }

    /// Answers with `r` (a client that has gone needs no answer: write errors only end the
    /// connection).
    pub fn respond(self, r: Response) {
        self.conn.respond(&r);
    }

    /// Starts a streamed answer: its head now, then its body in [`Stream::send`]s (chunks, or
    /// for an HTTP/1.0 client bytes ended by closing). `None` when the client has gone.
    pub fn stream(self, status: u16, headers: &[(&str, &str)]) -> Option<Stream<'c>> {
        let conn = self.conn;
        let chunked = !conn.ex.http10;
        let close = conn.closing() || !chunked;
        if close {
            conn.ex.keep_alive = false;
        }
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let framing = if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
        let head = response::head(status, &headers, framing, close, false);
        conn.ex.answer = Answer::StreamOpen;
        if !conn.write(&head) {
            return None;
        }
        let discard = conn.ex.head_only;
        Some(Stream {
            conn,
            chunked,
            discard,
        })
    }
}

struct BodyReader<'a> {
    conn: &'a mut Conn,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let conn = &mut *self.conn;
        if conn.ex.continue_pending {
            conn.ex.continue_pending = false;
            if !conn.write(b"HTTP/1.1 100 Continue\r\n\r\n") {
                return Err(std::io::Error::other("the client has gone"));
            }
        }
        conn.ex.body.read(&mut conn.reader, buf)
    }
}

/// A streamed answer under way. Dropped before [`Self::finish`], it ends by closing the
/// connection, which the client sees as an incomplete answer.
pub struct Stream<'c> {
    conn: &'c mut Conn,
    chunked: bool,
    /// For HEAD: the head is sent, the body is not.
    discard: bool,
}

impl Stream<'_> {
    /// Sends `data` at once; false when the client has gone.
    pub fn send(&mut self, data: &[u8]) -> bool {
        if self.discard || data.is_empty() {
            // An empty chunk would end the body.
            return true;
        }
        if !self.chunked {
            return self.conn.write(data);
        }
        let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
        frame.extend_from_slice(data);
        frame.extend_from_slice(b"\r\n");
        self.conn.write(&frame)
    }

    /// Ends the body; false when the client has gone.
    pub fn finish(self) -> bool {
        let ok = self.discard || !self.chunked || self.conn.write(b"0\r\n\r\n");
        if ok {
            self.conn.ex.answer = Answer::StreamDone;
        }
        ok
    }
}
