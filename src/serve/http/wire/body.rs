//! A request body: its framing (`Content-Length` or chunked `Transfer-Encoding`, checked
//! against request smuggling) and a reader that decodes it and stops at its end.

use super::head::Head;
use super::Refusal;
use std::io::{self, BufRead};

/// Longest chunk-size line or trailer field of a chunked body.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// Most bytes of trailer fields after a chunked body.
const MAX_TRAILER_BYTES: usize = 16 << 10;

/// Where a request body is in its reading.
#[derive(Debug)]
pub enum Body {
    /// `left` bytes of a `Content-Length` body still to read.
    Length { left: u64 },
    /// A chunked body: `left` bytes of the current chunk to read; `started` once a chunk-size
    /// line has been read (each chunk after it ends in CRLF).
    Chunked { left: u64, started: bool },
    /// Read to its end (or there was none).
    Done,
}

impl Body {
    /// The framing `head` declares. Both a length and chunking, several different lengths, or
    /// a transfer coding other than `chunked` alone are refused: a proxy in front might read
    /// the message's end elsewhere (RFC 9112 6.3).
    pub fn of(head: &Head) -> Result<Body, Refusal> {
        let has_length = head.values("content-length").next().is_some();
        if head.values("transfer-encoding").next().is_some() {
            if has_length {
                return Err(Refusal::new(
                    400,
                    "bad_request",
                    "both Content-Length and Transfer-Encoding are set",
                ));
            }
            if head.minor == 0 {
                return Err(Refusal::new(
                    400,
                    "bad_request",
                    "Transfer-Encoding in an HTTP/1.0 request",
                ));
            }
            let codings: Vec<String> = head
                .values("transfer-encoding")
                .flat_map(|v| v.split(','))
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect();
            if codings != ["chunked"] {
                return Err(Refusal::new(
                    501,
                    "unsupported_transfer_encoding",
                    "only the `chunked` transfer coding is supported in requests",
                ));
            }
            return Ok(Body::Chunked {
                left: 0,
                started: false,
            });
        }
        let mut length: Option<u64> = None;
        for v in head.values("content-length").flat_map(|v| v.split(',')) {
            let v = v.trim();
            let n = (!v.is_empty() && v.len() <= 18 && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<u64>().ok())
                .flatten();
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(l)) if n == l => {}
                _ => {
                    return Err(Refusal::new(
                        400,
                        "bad_content_length",
                        "Content-Length must be one decimal number",
                    ))
                }
            }
        }
        Ok(match length {
            Some(left) if left > 0 => Body::Length { left },
            _ => Body::Done,
        })
    }

    /// The declared length of a body not yet read (`None` for a chunked one).
    pub fn length(&self) -> Option<u64> {
        match self {
            Body::Length { left } => Some(*left),
            Body::Chunked { .. } => None,
            Body::Done => Some(0),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Body::Done)
    }

    /// Reads body bytes from `r` into `buf`; 0 at the body's end. A connection that ends or
    /// falls silent inside the body, and malformed chunking, are errors.
    pub fn read(&mut self, r: &mut impl BufRead, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self {
                Body::Done => return Ok(0),
                Body::Length { left } => {
                    let n = read_some(r, buf, *left)?;
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Body::Done;
                    }
                    return Ok(n);
                }
                Body::Chunked { left: 0, started } => {
                    if *started {
                        let end = read_line(r, MAX_CHUNK_LINE)?;
                        if !end.is_empty() {
                            return Err(invalid("chunk data longer than its size"));
                        }
                    }
                    let size = chunk_size(&read_line(r, MAX_CHUNK_LINE)?)?;
                    if size == 0 {
                        read_trailers(r)?;
                        *self = Body::Done;
                    } else {
                        *self = Body::Chunked {
                            left: size,
                            started: true,
                        };
                    }
                }
                Body::Chunked { left, .. } => {
                    let n = read_some(r, buf, *left)?;
                    *left -= n as u64;
                    return Ok(n);
                }
            }
        }
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

fn read_error(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, "the body stopped arriving")
        }
        _ => e,
    }
}

fn closed_mid_body() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the connection closed before the body's end",
    )
}

/// Reads at most `limit` bytes; at least one, or an error.
fn read_some(r: &mut impl BufRead, buf: &mut [u8], limit: u64) -> io::Result<usize> {
    let want = buf.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
    loop {
        return match r.read(&mut buf[..want]) {
            Ok(0) => Err(closed_mid_body()),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(read_error(e)),
        };
    }
}

/// One line without its CRLF (or bare LF), at most `limit` bytes.
fn read_line(r: &mut impl BufRead, limit: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        };
        if buf.is_empty() {
            return Err(closed_mid_body());
        }
        let (used, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..used]);
        r.consume(used);
        if line.len() > limit + 2 {
            return Err(invalid("a chunk line is too long"));
        }
        if found {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
    }
}

/// A chunk-size line's size (its extensions after `;` are ignored).
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(invalid("malformed chunk size"));
    }
    let text = std::str::from_utf8(digits).map_err(|_| invalid("malformed chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| invalid("malformed chunk size"))
}

/// The trailer fields after the last chunk, up to the empty line (read and dropped).
fn read_trailers(r: &mut impl BufRead) -> io::Result<()> {
    let mut total = 0;
    loop {
        let line = read_line(r, MAX_CHUNK_LINE)?;
        if line.is_empty() {
            return Ok(());
        }
        total += line.len();
        if total > MAX_TRAILER_BYTES {
            return Err(invalid("the trailer fields are too large"));
        }
    }
}
