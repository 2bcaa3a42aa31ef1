//! What is written back: a whole response (status, fields, body with `Content-Length`) or the
//! head of a streamed one, with the `Date`, `Server` and `Connection` fields HTTP/1.1 wants.

use std::time::{SystemTime, UNIX_EPOCH};

/// A whole response. Its `Content-Length` is the body's, added when written.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A 200 with `body`.
    pub fn from_data(body: Vec<u8>) -> Response {
        Response {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    pub fn with_status_code(mut self, status: u16) -> Response {
        self.status = status;
        self
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// The reason phrase of the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// How the body after a head is framed.
pub enum Framing {
    Length(usize),
    Chunked,
    /// Ended by closing the connection (a stream to an HTTP/1.0 client).
    UntilClose,
}

/// The status line and header fields, ending in the empty line. `close` adds
/// `Connection: close`; `keep_alive` (an HTTP/1.0 client that asked) `Connection: keep-alive`.
pub fn head(
    status: u16,
    headers: &[(String, String)],
    framing: Framing,
    close: bool,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: edgemoe\r\nDate: {}\r\n",
        reason(status),
        http_date(SystemTime::now())
    );
    for (k, v) in headers {
        // Names and values are this server's own constants and numbers; a CR or LF in one
        // would split the head, so such a field is left out rather than sent.
        if !(k.contains(['\r', '\n']) || v.contains(['\r', '\n'])) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    match framing {
        Framing::Length(n) => out.push_str(&format!("Content-Length: {n}\r\n")),
        Framing::Chunked => out.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
    if close {
        out.push_str("Connection: close\r\n");
    } else if keep_alive {
        out.push_str("Connection: keep-alive\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// IMF-fixdate (RFC 9110 5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// (year, month 1-12, day 1-31) of a day counted from 1970-01-01, in the proleptic Gregorian
/// calendar: whole 400-year eras, then the year within the era counted from March, so the
/// leap day falls last.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}
