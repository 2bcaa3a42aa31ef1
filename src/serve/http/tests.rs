//! Failure isolation through a real socket: requests carrying a test-only fault marker (see
//! `serve::fault`) fail while requests running beside them in the same batches complete with
//! exactly the text they give alone, and the server keeps serving.

use super::{serve_http, HttpOptions};
use crate::engine::Engine;
use crate::model::Model;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A server on a free port, running until the test process ends.
fn start() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let opts = HttpOptions {
        addr: addr.clone(),
        ..HttpOptions::default()
    };
    std::thread::spawn(move || {
        serve_http(opts, || {
            let engine = Engine::new(Arc::new(Model::builtin_default()), 1)?;
            Ok((engine, None))
        })
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while post_raw(&addr, "GET", "/health", "").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the server never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

/// Status and body (de-chunked) of one request; `None` when the server cannot be reached.
fn post_raw(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = line.split(' ').nth(1)?.parse().ok()?;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        if line.trim_end().is_empty() {
            break;
        }
        chunked |= line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).ok()?;
            let n = usize::from_str_radix(line.trim(), 16).ok()?;
            let mut data = vec![0; n + 2];
            r.read_exact(&mut data).ok()?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&data[..n]);
        }
    } else {
        r.read_to_end(&mut out).ok()?;
    }
    Some((status, String::from_utf8(out).ok()?))
}

/// How one completion ended: its text, or the error message the client got.
#[derive(Debug, PartialEq)]
enum Outcome {
    Text(String),
    Error(String),
}

fn complete(addr: &str, prompt: &str, stream: bool) -> Outcome {
    let body = json!({
        "prompt": prompt, "max_tokens": 24, "temperature": 0.8, "seed": 11, "stream": stream
    });
    let (status, text) =
        post_raw(addr, "POST", "/v1/completions", &body.to_string()).expect("the server answers");
    if !stream {
        let v: Value = serde_json::from_str(&text).unwrap();
        return match status {
            200 => Outcome::Text(v["choices"][0]["text"].as_str().unwrap().to_string()),
            _ => Outcome::Error(v["error"]["message"].as_str().unwrap().to_string()),
        };
    }
    assert_eq!(status, 200, "{text}");
    let mut out = String::new();
    for event in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if event == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(event).unwrap();
        if let Some(msg) = v["error"]["message"].as_str() {
            return Outcome::Error(msg.to_string());
        }
        out.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    Outcome::Text(out)
}

#[test]
fn a_faulted_request_fails_alone_over_http() {
    let addr = start();
    let goods: Vec<(String, bool)> = (0..6)
        .map(|i| (format!("request {i}: the quick brown fox"), i % 2 == 0))
        .collect();
    let alone: Vec<Outcome> = goods.iter().map(|(p, s)| complete(&addr, p, *s)).collect();
    assert!(alone
        .iter()
        .all(|o| matches!(o, Outcome::Text(t) if !t.is_empty())));
    let faults = [
        ("<fault:sample> x", true),
        ("<fault:forward-panic> y", false),
        ("<fault:forward-error> z", true),
        ("<fault:forward-panic> w", true),
    ];
    let all: Vec<(String, bool)> = goods
        .iter()
        .cloned()
        .chain(faults.iter().map(|(p, s)| (p.to_string(), *s)))
        .collect();
    let barrier = Arc::new(Barrier::new(all.len()));
    let handles: Vec<_> = all
        .into_iter()
        .map(|(prompt, stream)| {
            let (addr, barrier) = (addr.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                complete(&addr, &prompt, stream)
            })
        })
        .collect();
    let got: Vec<Outcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(&got[i], want, "request {i} beside the faulted ones");
    }
    for (g, (p, _)) in got[goods.len()..].iter().zip(faults) {
        match g {
            Outcome::Error(m) => assert!(
                m.contains("generation failed") && m.contains("injected fault"),
                "{p}: {m}"
            ),
            Outcome::Text(t) => panic!("{p} completed: {t:?}"),
        }
    }
    // Still serving, with the same answers.
    assert_eq!(complete(&addr, &goods[1].0, goods[1].1), alone[1]);
}
