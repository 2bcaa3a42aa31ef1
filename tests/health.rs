//! A sticky device failure (a faulted GPU context refuses every later call) is recorded once in
//! `backend::health`; `serve --http` then reports unhealthy on `/health` (503 with the reason, so
//! a load balancer sends work elsewhere) and refuses completions with that reason. The failure
//! is simulated by recording it, as the CUDA backend does when the device cannot finish its
//! queued work after a failed op. Its own test binary: the record is process-wide.

use edgemoe::serve::http::{HttpOptions, HttpServer};
use edgemoe::EngineBuilder;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (status, body) of one request.
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn a_sticky_device_failure_makes_the_server_unhealthy() {
    let server = HttpServer::bind(HttpOptions {
        addr: "127.0.0.1:0".into(),
        ..HttpOptions::default()
    })
    .unwrap();
    let addr = server.addr().to_string();
    std::thread::spawn(move || {
        server.serve(|| {
            let model = Arc::new(edgemoe::load_model(Some("builtin:default".as_ref()))?);
            Ok((EngineBuilder::new(model).threads(1).build()?, None))
        })
    });
    let started = Instant::now();
    while request(&addr, "GET", "/health", "").0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let completion = r#"{"prompt": "Once", "max_tokens": 4}"#;
    assert_eq!(request(&addr, "POST", "/v1/completions", completion).0, 200);

    edgemoe::backend::health::mark_unusable("the GPU failed and cannot recover (test)".into());
    let (status, body) = request(&addr, "GET", "/health", "");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("unhealthy") && body.contains("cannot recover (test)"),
        "{body}"
    );
    let (status, body) = request(&addr, "POST", "/v1/completions", completion);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot recover (test)"), "{body}");
}
