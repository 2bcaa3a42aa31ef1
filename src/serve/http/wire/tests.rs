//! The HTTP layer alone, through real sockets: parsing and framing limits, keep-alive,
//! streaming, refusals, the connection limit and a burst of connections opened at once.

use super::body::Body;
use super::head::{self, Method};
use super::response::http_date;
use super::{accept_with, Config, Handler, Job, Refusal, Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn config() -> Config {
    Config {
        max_connections: 256,
        idle_timeout: Duration::from_secs(5),
        head_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(5),
        refusal: |r: &Refusal| {
            Response::from_data(r.message.clone().into_bytes())
                .with_status_code(r.status)
                .with_header("X-Code", r.code)
        },
    }
}

/// The test routes: `/stream` sends three parts, `/slow` one part at once and one a second
/// for two more, `/silent` never answers; anything else answers `METHOD URL BODY`, or 400 with the
/// error when the body cannot be read.
fn routes(mut req: Request<'_>) {
    match req.url() {
        "/stream" | "/slow" => {
            let slow = req.url() == "/slow";
            let Some(mut s) = req.stream(200, &[("Content-Type", "text/plain")]) else {
                return;
            };
            for i in 0..3 {
                if !s.send(format!("part {i}\n").as_bytes()) {
                    return;
                }
                if slow {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            s.finish();
        }
        "/silent" => {}
        _ => {
            let what = format!("{:?} {}", req.method(), req.url());
            let mut body = Vec::new();
            let r = match req.body().read_to_end(&mut body) {
                Ok(_) => Response::from_data(
                    format!("{what} {}", String::from_utf8_lossy(&body)).into_bytes(),
                ),
                Err(e) => Response::from_data(e.to_string().into_bytes()).with_status_code(400),
            };
            req.respond(r);
        }
    }
}

fn start_with(
    config: Config,
    spawn: impl Fn(Job) -> std::io::Result<()> + Send + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handler: Arc<Handler> = Arc::new(routes);
    std::thread::spawn(move || accept_with(listener, config, handler, spawn));
    addr
}

fn start(config: Config) -> SocketAddr {
    start_with(config, |job| {
        std::thread::spawn(job);
        Ok(())
    })
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one answer (a `100 Continue` counts as one); `None` at the connection's end.
fn read_reply(r: &mut impl BufRead, head_only: bool) -> Option<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status = line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if status == 100 || head_only {
        return Some(reply);
    }
    if reply.header("transfer-encoding") == Some("chunked") {
        loop {
            line.clear();
            r.read_line(&mut line).ok()?;
            let n = usize::from_str_radix(line.trim(), 16).ok()?;
            let mut data = vec![0; n + 2];
            r.read_exact(&mut data).ok()?;
            if n == 0 {
                break;
            }
            reply.body.extend_from_slice(&data[..n]);
        }
    } else if let Some(n) = reply.header("content-length") {
        reply.body = vec![0; n.parse().ok()?];
        r.read_exact(&mut reply.body).ok()?;
    } else {
        r.read_to_end(&mut reply.body).ok()?;
    }
    Some(reply)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `bytes`, closes the sending side, and reads every answer to the connection's end.
fn talk(addr: SocketAddr, bytes: &[u8]) -> Vec<Reply> {
    let mut s = connect(addr);
    // A server may answer and close before taking everything.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut r = BufReader::new(s);
    std::iter::from_fn(|| read_reply(&mut r, false)).collect()
}

/// The one answer to `bytes`; the server must then close.
fn one(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let mut replies = talk(addr, bytes);
    assert_eq!(replies.len(), 1, "{replies:?}");
    replies.remove(0)
}

/// The server still serves.
fn alive(addr: SocketAddr) {
    let r = one(addr, b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((r.status, r.text()), (200, "Get /ping ".to_string()));
}

#[test]
fn heads_parse_strictly() {
    let h = head::parse(b"POST /v1/x?q=1 HTTP/1.1\r\nHost: a\r\nX-Two:  b c \r\n\r\n").unwrap();
    assert_eq!(
        (h.method, h.target.as_str(), h.minor),
        (Method::Post, "/v1/x?q=1", 1)
    );
    assert_eq!(h.values("x-two").collect::<Vec<_>>(), ["b c"]);
    let bad = |raw: &[u8]| head::parse(raw).map(|_| ()).unwrap_err().status;
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET  /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1 extra\r\n\r\n",
        b"G(T /x HTTP/1.1\r\n\r\n",
        b"GET /a\x01b HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.x\r\n\r\n",
        b"GET /x HTTP/1.1\r\nNo colon\r\n\r\n",
        b"GET /x HTTP/1.1\r\nBad name: v\r\n\r\n",
        b"GET /x HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET /x HTTP/1.1\r\nA: b\x00c\r\n\r\n",
    ] {
        assert_eq!(bad(raw), 400, "{}", String::from_utf8_lossy(raw));
    }
    assert_eq!(bad(b"GET /x HTTP/2.0\r\n\r\n"), 505);
    let many: String = (0..=head::MAX_HEADERS)
        .map(|i| format!("H{i}: v\r\n"))
        .collect();
    assert_eq!(bad(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), 431);
}

#[test]
fn any_bytes_parse_without_a_panic() {
    // A fixed pseudo-random walk over bytes a head is made of, and some it must not hold.
    let alphabet = b"GET /HTP1.0:\r\n \t\x00\x7f\xffaZ-";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..2000 {
        let raw: Vec<u8> = (0..len % 97)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                alphabet[(x % alphabet.len() as u64) as usize]
            })
            .collect();
        let _ = head::parse(&raw);
    }
}

/// A body `Body::of` frames for these header fields, read to its end from `data`.
fn decode(fields: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let h = head::parse(format!("POST / HTTP/1.1\r\n{fields}\r\n").as_bytes()).unwrap();
    let mut body = Body::of(&h).map_err(|r| format!("{} {}", r.status, r.code))?;
    let mut src = data;
    let mut out = Vec::new();
    let mut buf = [0u8; 3];
    loop {
        match body.read(&mut src, &mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn bodies_are_framed_and_decoded() {
    assert_eq!(
        decode("Content-Length: 5\r\n", b"helloXX").unwrap(),
        b"hello"
    );
    assert_eq!(
        decode("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello").unwrap(),
        b"hello"
    );
    assert_eq!(decode("", b"ignored").unwrap(), b"");
    let chunked = b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
    assert_eq!(
        decode("Transfer-Encoding: chunked\r\n", chunked).unwrap(),
        b"abc0123456789"
    );
    for fields in [
        "Content-Length: abc\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 1 2\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 99999999999999999999\r\n",
    ] {
        assert_eq!(
            decode(fields, b"").unwrap_err(),
            "400 bad_content_length",
            "{fields}"
        );
    }
    assert_eq!(
        decode("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"").unwrap_err(),
        "400 bad_request"
    );
    assert_eq!(
        decode("Transfer-Encoding: gzip, chunked\r\n", b"").unwrap_err(),
        "501 unsupported_transfer_encoding"
    );
    let short = decode("Content-Length: 10\r\n", b"abc").unwrap_err();
    assert!(short.contains("closed before the body's end"), "{short}");
    let te = "Transfer-Encoding: chunked\r\n";
    for bad in [
        &b"zz\r\nabc\r\n0\r\n\r\n"[..],
        b"3\r\nabcdef\r\n0\r\n\r\n",
        b"3\r\nab",
    ] {
        assert!(decode(te, bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn dates_are_imf_fixdate() {
    // RFC 9110's own example, and a leap day.
    let at = |s: u64| http_date(std::time::UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(at(1_709_164_800), "Thu, 29 Feb 2024 00:00:00 GMT");
    assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
}

#[test]
fn keep_alive_pipelining_and_http10() {
    let addr = start(config());
    // Two requests on one connection, the second pipelined with a body.
    let replies = talk(
        addr,
        b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz",
    );
    let texts: Vec<_> = replies.iter().map(|r| (r.status, r.text())).collect();
    assert_eq!(
        texts,
        [(200, "Get /a ".into()), (200, "Post /b xyz".to_string())]
    );
    assert!(replies[0].header("date").is_some());
    // A connection stays open between requests until the client closes it.
    let mut s = connect(addr);
    let mut r = BufReader::new(s.try_clone().unwrap());
    for i in 0..3 {
        write!(s, "GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let reply = read_reply(&mut r, false).unwrap();
        assert_eq!(reply.text(), format!("Get /{i} "));
        assert_eq!(reply.header("connection"), None);
    }
    // HTTP/1.0: closed after the answer unless kept alive; a stream ends by the close.
    let r = one(addr, b"GET /x HTTP/1.0\r\n\r\n");
    assert_eq!(r.header("connection"), Some("close"));
    let r = one(addr, b"GET /stream HTTP/1.0\r\n\r\n");
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.text(), "part 0\npart 1\npart 2\n");
    let replies = talk(
        addr,
        b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
    );
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].header("connection"), Some("keep-alive"));
    // A chunked stream, then the connection carries on.
    let replies = talk(
        addr,
        b"GET /stream HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n",
    );
    assert_eq!(replies[0].text(), "part 0\npart 1\npart 2\n");
    assert_eq!(replies[1].text(), "Get /after ");
}

#[test]
fn head_expect_chunked_and_unanswered_requests() {
    let addr = start(config());
    // HEAD: the head with the body's length, no body.
    let mut s = connect(addr);
    s.write_all(b"HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    let head = read_reply(&mut r, true).unwrap();
    assert_eq!(head.header("content-length"), Some("8"));
    assert_eq!(read_reply(&mut r, false).unwrap().text(), "Get /g ");
    // Expect: 100-continue gets its 100 when the body is read.
    let mut s = connect(addr);
    s.write_all(b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    assert_eq!(read_reply(&mut r, false).unwrap().status, 100);
    s.write_all(b"ok").unwrap();
    assert_eq!(read_reply(&mut r, false).unwrap().text(), "Post /e ok");
    let r = one(addr, b"POST /e HTTP/1.1\r\nExpect: magic\r\n\r\n");
    assert_eq!(r.status, 417);
    // A chunked request body.
    let r = talk(
        addr,
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
    );
    assert_eq!(r[0].text(), "Post /c abc");
    // A request the handler drops unanswered is answered 500, and the connection closes.
    let r = one(
        addr,
        b"GET /silent HTTP/1.1\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
    );
    assert_eq!((r.status, r.header("x-code")), (500, Some("internal")));
}

#[test]
fn malformed_requests_get_one_clear_answer() {
    let addr = start(config());
    let long_target = format!(
        "GET /{} HTTP/1.1\r\n\r\n",
        "a".repeat(head::MAX_REQUEST_LINE)
    );
    let big_headers = format!(
        "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(head::MAX_HEADER_BYTES)
    );
    let cases: [(&[u8], u16, &str); 9] = [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (
            b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"GET / HTTP/3.0\r\n\r\n", 505, "http_version_not_supported"),
        (long_target.as_bytes(), 414, "uri_too_long"),
        (big_headers.as_bytes(), 431, "headers_too_large"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
            400,
            "bad_content_length",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: br\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
        ),
        // The head cut short by the client's close.
        (b"GET / HTTP/1.1\r\nHost: t\r\n", 400, "bad_request"),
    ];
    for (raw, status, code) in cases {
        let r = one(addr, raw);
        let what = String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned();
        assert_eq!(
            (r.status, r.header("x-code")),
            (status, Some(code)),
            "{what}"
        );
        assert_eq!(r.header("connection"), Some("close"), "{what}");
    }
    // A client that closes mid-body: the handler's read fails, it answers 400.
    let r = one(
        addr,
        b"POST /m HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly some",
    );
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("closed before the body's end"),
        "{}",
        r.text()
    );
    // A client that closes at once, or says nothing: no answer, no harm.
    drop(connect(addr));
    let r = talk(addr, b"");
    assert!(r.is_empty(), "{r:?}");
    alive(addr);
}

#[test]
fn slow_and_idle_clients_are_timed_out() {
    let addr = start(Config {
        idle_timeout: Duration::from_millis(300),
        head_timeout: Duration::from_millis(300),
        ..config()
    });
    // A head that never ends: 408 once the head time is up.
    let mut s = connect(addr);
    s.write_all(b"GET / HTTP/1.1\r\nX: ").unwrap();
    let started = Instant::now();
    let r = read_reply(&mut BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    // A kept-alive connection left idle is closed without a word.
    let mut s = connect(addr);
    s.write_all(b"GET /a HTTP/1.1\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(read_reply(&mut r, false).unwrap().status, 200);
    let started = Instant::now();
    assert!(read_reply(&mut r, false).is_none());
    assert!(started.elapsed() < Duration::from_secs(3));
    alive(addr);
}

#[test]
fn more_connections_than_the_limit_are_refused_503() {
    let addr = start(Config {
        max_connections: 2,
        ..config()
    });
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            // Served (a thread each), then held open.
            let mut s = connect(addr);
            s.write_all(b"GET /a HTTP/1.1\r\n\r\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            assert_eq!(read_reply(&mut r, false).unwrap().status, 200);
            s
        })
        .collect();
    let r = one(addr, b"GET /b HTTP/1.1\r\n\r\n");
    assert_eq!((r.status, r.header("x-code")), (503, Some("overloaded")));
    assert!(r.text().contains("more than 2 connections"), "{}", r.text());
    drop(held);
    // Their places come back as their threads see the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = one(addr, b"GET /c HTTP/1.1\r\n\r\n");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the places never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection thread that could not be started kept its place in `max_connections`: after
/// that many failures every connection was refused for good. Now the place is given back.
#[test]
fn a_failed_thread_spawn_gives_its_place_back() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let addr = start_with(
        Config {
            max_connections: 1,
            ..config()
        },
        move |job: Job| {
            // The first connection's thread cannot be started; later ones can.
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(std::io::Error::other("no threads left"));
            }
            std::thread::spawn(job);
            Ok(())
        },
    );
    let first = one(addr, b"GET /a HTTP/1.1\r\n\r\n");
    assert_eq!(
        (first.status, first.header("x-code")),
        (503, Some("overloaded"))
    );
    assert!(first.text().contains("cannot start"), "{}", first.text());
    alive(addr);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Connections opened in the same instant all start at once: each gets its first byte while
/// every other one is still open and streaming (tiny_http 0.12 ran about 4 and held the rest
/// until one of those closed).
#[test]
fn a_burst_of_connections_all_start_at_once() {
    const N: usize = 64;
    let addr = start(config());
    let barrier = Arc::new(Barrier::new(N));
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut s = connect(addr);
                barrier.wait();
                let sent = Instant::now();
                s.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let first = r.fill_buf().map(|b| !b.is_empty()).unwrap_or(false);
                let waited = sent.elapsed();
                let reply = read_reply(&mut r, false);
                (first, waited, reply.map(|r| r.text()), s)
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    for (i, (first, waited, text, _)) in results.iter().enumerate() {
        assert!(*first, "connection {i} got no answer");
        // Each stream takes 3 s; a connection held behind others would wait that long.
        assert!(
            *waited < Duration::from_secs(2),
            "connection {i} waited {waited:?}"
        );
        assert_eq!(text.as_deref(), Some("part 0\npart 1\npart 2\n"));
    }
}
