//! The request head: the request line and header fields, read within size and time limits and
//! parsed strictly. Anything malformed becomes one [`Refusal`] (a 4xx or 5xx answer), never a
//! panic.

use super::Refusal;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Longest request line (method, target, version): longer is a 414.
pub const MAX_REQUEST_LINE: usize = 8 << 10;
/// Most bytes of header fields after the request line: more is a 431.
pub const MAX_HEADER_BYTES: usize = 32 << 10;
/// Most header fields: more is a 431.
pub const MAX_HEADERS: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    /// Any other method (PUT, OPTIONS, …): the routes answer them 405 or 404.
    Other,
}

#[derive(Debug)]
pub struct Head {
    pub method: Method,
    /// The request target as sent (path and query).
    pub target: String,
    /// The `x` of `HTTP/1.x`.
    pub minor: u8,
    /// Names as sent; compare them ignoring case.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name` (there may be several fields of one name).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (`Connection`, …) lists `token`.
    pub fn lists(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Reads one request head, up to and including its empty line. `Ok(None)`: the connection
/// closed, failed or stayed silent for `idle` before the request's first byte (nothing to
/// answer). Once a byte has come, the whole head must arrive within `within` (a 408 otherwise).
pub fn read_raw(
    r: &mut BufReader<TcpStream>,
    idle: Duration,
    within: Duration,
) -> Result<Option<Vec<u8>>, Refusal> {
    let mut raw = Vec::new();
    let mut line_start = 0;
    let mut in_request_line = true;
    let mut headers_start = 0;
    let mut deadline: Option<Instant> = None;
    // A buffered pipelined request needs no wait; otherwise the socket's timeout bounds it.
    let _ = r.get_ref().set_read_timeout(Some(idle));
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) && deadline.is_some() => {
                return Err(Refusal::new(
                    408,
                    "request_timeout",
                    "the request head did not arrive in time",
                ))
            }
            Err(_) => return Ok(None),
        };
        if buf.is_empty() {
            return match deadline {
                None => Ok(None),
                Some(_) => Err(Refusal::new(
                    400,
                    "bad_request",
                    "the connection closed inside the request head",
                )),
            };
        }
        let started = *deadline.get_or_insert_with(|| Instant::now() + within);
        let mut used = 0;
        let mut complete = false;
        for &b in buf {
            used += 1;
            raw.push(b);
            if b == b'\n' {
                let line = &raw[line_start..raw.len() - 1];
                let empty = line.is_empty() || line == b"\r";
                if empty && in_request_line {
                    // Empty lines before a request line are skipped (RFC 9112 2.2).
                    raw.clear();
                    line_start = 0;
                    continue;
                }
                if empty {
                    complete = true;
                    break;
                }
                if in_request_line {
                    headers_start = raw.len();
                }
                in_request_line = false;
                line_start = raw.len();
            }
            if in_request_line && raw.len() > MAX_REQUEST_LINE {
                return Err(Refusal::new(
                    414,
                    "uri_too_long",
                    format!("the request line is over {MAX_REQUEST_LINE} bytes"),
                ));
            }
            if !in_request_line && raw.len() - headers_start > MAX_HEADER_BYTES {
                return Err(too_many_headers());
            }
        }
        r.consume(used);
        if complete {
            return Ok(Some(raw));
        }
        let left = started.saturating_duration_since(Instant::now());
        if left.is_zero() || r.get_ref().set_read_timeout(Some(left)).is_err() {
            return Err(Refusal::new(
                408,
                "request_timeout",
                "the request head did not arrive in time",
            ));
        }
    }
}

fn too_many_headers() -> Refusal {
    Refusal::new(
        431,
        "headers_too_large",
        format!("the header fields are over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} fields"),
    )
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(400, "bad_request", message)
}

/// RFC 9110's `tchar`: what methods and field names are made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Parses a head [`read_raw`] returned (also any bytes at all: it never panics).
pub fn parse(raw: &[u8]) -> Result<Head, Refusal> {
    let mut lines = raw
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(bad(
            "malformed request line (want `METHOD TARGET HTTP/1.1`)",
        ));
    };
    if !is_token(method) {
        return Err(bad("malformed method in the request line"));
    }
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        b"POST" => Method::Post,
        _ => Method::Other,
    };
    if target.is_empty() || !target.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(bad("malformed request target"));
    }
    let minor = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        [b'H', b'T', b'T', b'P', b'/', x, b'.', y] if x.is_ascii_digit() && y.is_ascii_digit() => {
            return Err(Refusal::new(
                505,
                "http_version_not_supported",
                "only HTTP/1.0 and HTTP/1.1 are served",
            ))
        }
        _ => return Err(bad("malformed HTTP version in the request line")),
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(bad("obsolete line folding in a header field"));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(bad("a header field without a colon"));
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if !is_token(name) {
            return Err(bad("malformed header field name"));
        }
        let value = value.trim_ascii();
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(bad("a control character in a header field value"));
        }
        if headers.len() == MAX_HEADERS {
            return Err(too_many_headers());
        }
        headers.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Ok(Head {
        method,
        target: String::from_utf8_lossy(target).into_owned(),
        minor,
        headers,
    })
}
