//! The fleet (tools/fleet.sh, docs/fleet.md): two `edgemoe serve --http` replicas behind nginx
//! on loopback. 32 streaming chat completions run through nginx; one replica is SIGKILLed while
//! they are in flight. Every stream on the survivor must complete, every one cut on the killed
//! replica must end at the client as an incomplete stream (never hang), and new requests must
//! all succeed through the survivor. Each replica's `/metrics` must scrape as Prometheus text
//! before the kill (and the survivor's after), and agree with which replica nginx says served
//! each stream. Skipped, with a line saying so, where nginx is not installed.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAMS: usize = 32;
/// Tokens each stream asks for: at one thread per replica, 16 streams take seconds, so the
/// kill lands mid-stream.
const MAX_TOKENS: usize = 400;
/// The longest any read may block: a stream that says nothing for this long has hung.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// nginx: $EDGEMOE_NGINX, else `nginx` on PATH, else Debian's /usr/sbin/nginx.
fn find_nginx() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EDGEMOE_NGINX") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("nginx"))
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A running fleet: stopped (nginx and every replica) when dropped, even on a failed assert.
struct Fleet {
    dir: tempfile::TempDir,
    nginx: String,
    /// (pid, address) of each replica, from fleet.sh's `replicas` file.
    replicas: Vec<(i32, String)>,
}

impl Fleet {
    fn start(nginx: &Path) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("edgemoe-fleet-test")
            .tempdir()
            .unwrap();
        let port = free_port();
        let fixtures = root().join("tests/fixtures");
        let out = Command::new("bash")
            .arg(root().join("tools/fleet.sh"))
            .args([
                "start",
                "--detach",
                "--replicas",
                "2",
                "--ready-timeout",
                "120",
            ])
            .arg("--port")
            .arg(port.to_string())
            .arg("--dir")
            .arg(dir.path())
            .arg("--bin")
            .arg(env!("CARGO_BIN_EXE_edgemoe"))
            .arg("--nginx")
            .arg(nginx)
            .arg("--")
            .arg("--model")
            .arg(fixtures.join("trained-moe"))
            .arg("--chat-template")
            .arg(fixtures.join("chat/smollm2.jinja"))
            .args(["--threads", "1", "--max-batch", "32"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // Built before the check, so a half-started fleet is stopped by Drop.
        let replicas = std::fs::read_to_string(dir.path().join("replicas"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (pid, addr) = l.split_once(' ')?;
                Some((pid.parse().ok()?, addr.to_string()))
            })
            .collect();
        let fleet = Fleet {
            dir,
            nginx: format!("127.0.0.1:{port}"),
            replicas,
        };
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fleet.sh start failed:\n{log}");
        assert_eq!(fleet.replicas.len(), 2, "{log}");
        fleet
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join("tools/fleet.sh"))
            .arg("stop")
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .status();
        // In case the script could not: nothing outlives the test.
        for (pid, _) in &self.replicas {
            // SAFETY: kill(2) takes plain integers; a pid already gone just fails.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    s
}

fn send_request(s: &mut TcpStream, method: &str, path: &str, body: Option<&[u8]>) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        s.write_all(b).unwrap();
    }
}

/// Status line and headers; `None` when the connection ends first.
fn read_head(r: &mut impl BufRead) -> Option<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Some((status, headers));
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// One chunk of a chunked body: `Ok(None)` at the terminating chunk, `Err` when the
/// connection ended or broke first (what a cut stream looks like).
fn read_chunk(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => return Err("connection closed".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("read failed: {e}")),
    }
    let n = usize::from_str_radix(line.trim(), 16).map_err(|_| format!("bad chunk {line:?}"))?;
    let mut data = vec![0; n + 2];
    r.read_exact(&mut data)
        .map_err(|e| format!("chunk cut short: {e}"))?;
    data.truncate(n);
    Ok((n > 0).then_some(data))
}

/// A whole (non-chunked or chunked) response to a GET.
fn get(addr: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = connect(addr);
    send_request(&mut s, "GET", path, None);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).expect("a response head");
    let mut body = Vec::new();
    if header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while let Some(c) = read_chunk(&mut r).unwrap() {
            body.extend(c);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    (status, headers, String::from_utf8(body).unwrap())
}

/// How one stream went, as its client saw it.
#[derive(Debug)]
struct Stream {
    /// The replica that served it: the last address of nginx's `X-Edgemoe-Upstream`.
    replica: String,
    /// Content events received (a token may decode to no text, so can be fewer than tokens).
    events: usize,
    /// The usage chunk's completion_tokens, sent just before `[DONE]`.
    completion_tokens: Option<u64>,
    finish_reason: Option<String>,
    /// `[DONE]` and the terminating chunk arrived.
    done: bool,
    /// Why it ended early, when it did.
    cut: Option<String>,
    ended: Instant,
}

fn chat_body(seed: usize, max_tokens: usize) -> Vec<u8> {
    json!({
        "messages": [{"role": "user", "content": "Tell me of the kingdom"}],
        "stream": true,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream_options": {"include_usage": true},
    })
    .to_string()
    .into_bytes()
}

/// Runs one streaming chat completion through `addr`; bumps `started` at its first token.
fn stream(addr: &str, seed: usize, max_tokens: usize, started: &AtomicUsize) -> Stream {
    let mut s = connect(addr);
    send_request(
        &mut s,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(seed, max_tokens)),
    );
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).expect("a response head");
    assert_eq!(status, 200, "{headers:?}");
    let upstream = header(&headers, "x-edgemoe-upstream").expect("X-Edgemoe-Upstream");
    let mut st = Stream {
        replica: upstream.rsplit(", ").next().unwrap_or("").to_string(),
        events: 0,
        completion_tokens: None,
        finish_reason: None,
        done: false,
        cut: None,
        ended: Instant::now(),
    };
    let mut text = String::new();
    // Bounded by count as well as by READ_TIMEOUT per read: role, tokens, finish, usage,
    // [DONE] (nginx may merge chunks, never split one event into more than two).
    for _ in 0..2 * (max_tokens + 8) {
        let chunk = match read_chunk(&mut r) {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                st.cut = Some(e);
                break;
            }
        };
        text.push_str(&String::from_utf8(chunk).unwrap());
        // Complete events only; a partial one waits for the next chunk.
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let data = event.trim_end().strip_prefix("data: ").unwrap();
            if data == "[DONE]" {
                st.done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            let choice = &v["choices"][0];
            if choice["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                st.events += 1;
                if st.events == 1 {
                    started.fetch_add(1, Ordering::SeqCst);
                }
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                st.completion_tokens = Some(n);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                st.finish_reason = Some(f.to_string());
            }
        }
    }
    if st.cut.is_none() && !st.done {
        st.cut = Some("ended without [DONE]".into());
    }
    st.ended = Instant::now();
    st
}

/// Prometheus' text format: `# HELP`/`# TYPE` lines, then `name{labels} value` samples.
/// Returns the samples as (name with labels, value); panics on any line that is neither.
fn scrape(addr: &str) -> Vec<(String, f64)> {
    let (status, headers, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{addr}/metrics: {body}");
    let kind = header(&headers, "content-type").unwrap_or("");
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let mut samples = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
        } else if !line.starts_with("# HELP ") {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(
                typed.iter().any(|t| name.starts_with(t.as_str())),
                "{line}: no # TYPE before it"
            );
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            samples.push((series.to_string(), value));
        }
    }
    assert!(!samples.is_empty(), "{addr}/metrics is empty");
    samples
}

/// Sum of every sample of `name` (over its labels).
fn total(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s == name || s.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// Requests a replica knows of: finished, running or queued.
fn requests_seen(samples: &[(String, f64)]) -> f64 {
    total(samples, "edgemoe_requests_total")
        + total(samples, "edgemoe_active_requests")
        + total(samples, "edgemoe_queue_depth")
}

#[test]
fn fleet_survives_a_killed_replica() {
    let Some(nginx) = find_nginx() else {
        println!(
            "SKIPPED: nginx is not installed (Debian: apt-get install nginx); .ci/run installs it"
        );
        return;
    };
    let fleet = Fleet::start(&nginx);
    let before: Vec<f64> = fleet
        .replicas
        .iter()
        .map(|(_, a)| requests_seen(&scrape(a)))
        .collect();

    let started = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for i in 0..STREAMS {
        let (addr, started) = (fleet.nginx.clone(), Arc::clone(&started));
        threads.push(std::thread::spawn(move || {
            stream(&addr, i + 1, MAX_TOKENS, &started)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while started.load(Ordering::SeqCst) < STREAMS {
        assert!(
            Instant::now() < deadline,
            "only {} of {STREAMS} streams started within 60 s",
            started.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Every stream is in flight. Each replica's counters must account for the streams nginx
    // says it sent there.
    let during: Vec<f64> = fleet
        .replicas
        .iter()
        .map(|(_, a)| requests_seen(&scrape(a)))
        .collect();
    let (victim_pid, victim) = fleet.replicas[0].clone();
    let survivor = fleet.replicas[1].1.clone();
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(victim_pid, libc::SIGKILL) };
    let killed_at = Instant::now();

    let streams: Vec<Stream> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (r, (_, addr)) in fleet.replicas.iter().enumerate() {
        let served = streams.iter().filter(|s| &s.replica == addr).count();
        assert_eq!(
            during[r] - before[r],
            served as f64,
            "replica {addr}'s /metrics disagrees with nginx's X-Edgemoe-Upstream"
        );
        // least_conn spreads streams that overlap in time.
        assert!(served >= STREAMS / 4, "{addr} served only {served} streams");
    }
    let mut cut = 0;
    for (i, s) in streams.iter().enumerate() {
        if s.replica == survivor {
            assert!(
                s.done && s.cut.is_none(),
                "stream {i} on the survivor: {s:?}"
            );
            assert_eq!(
                s.finish_reason.as_deref(),
                Some("length"),
                "stream {i}: {s:?}"
            );
            assert_eq!(
                s.completion_tokens,
                Some(MAX_TOKENS as u64),
                "stream {i}: {s:?}"
            );
        } else {
            assert_eq!(s.replica, victim, "stream {i}: {s:?}");
            match &s.cut {
                // Cut: no [DONE], and noticed promptly (a hang would be READ_TIMEOUT).
                Some(_) => {
                    assert!(!s.done && s.finish_reason.is_none(), "stream {i}: {s:?}");
                    let noticed = s.ended.saturating_duration_since(killed_at);
                    assert!(noticed < Duration::from_secs(5), "stream {i}: {noticed:?}");
                    cut += 1;
                }
                // Only a stream that ended before the kill may have completed.
                None => assert!(s.done && s.ended <= killed_at, "stream {i}: {s:?}"),
            }
        }
    }
    assert!(cut > 0, "no stream was in flight on the killed replica");

    // New requests: all succeed, served by the survivor (nginx may try the dead one first
    // and say so in X-Edgemoe-Upstream, but must not fail the request).
    let after = Arc::new(AtomicUsize::new(0));
    let news: Vec<Stream> = (0..8)
        .map(|i| {
            let (addr, after) = (fleet.nginx.clone(), Arc::clone(&after));
            std::thread::spawn(move || stream(&addr, 100 + i, 16, &after))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (i, s) in news.iter().enumerate() {
        assert!(s.done && s.cut.is_none(), "new request {i}: {s:?}");
        assert_eq!(s.replica, survivor, "new request {i}: {s:?}");
    }
    let last = scrape(&survivor);
    let survived = streams.iter().filter(|s| s.replica == survivor).count() + news.len();
    // Idle before the streams, so its count then was of finished requests only.
    assert_eq!(
        total(&last, "edgemoe_requests_total") - before[1],
        survived as f64,
        "the survivor's /metrics after the kill"
    );
    println!(
        "fleet: {} streams on the survivor completed, {cut} cut by the kill; nginx log:\n{}",
        streams.len() - cut,
        fleet.log("nginx-error.log")
    );
}
