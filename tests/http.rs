//! `edgemoe serve --http` through a real socket: 32 concurrent streaming completion and chat
//! requests with bad ones among them (broken JSON, an unknown field, an oversize body, a client
//! that disconnects mid-stream). Every good request must produce exactly the text
//! `edgemoe generate` gives with the same seed and settings (a chat: its prompt rendered by the
//! chat template); every bad one its error. Also: the bounded queue, the API key, a resident
//! set that stays flat over 1000 requests, a burst of 32 connections that all start at once,
//! malformed requests and the connection limit.

use edgemoe::serve::chat::ChatTemplate;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("tests/fixtures/trained-moe")
}

fn template_path() -> PathBuf {
    root().join("tests/fixtures/chat/smollm2.jinja")
}

/// A server on a free port; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let mut args = vec![
        "--model".into(),
        model_dir().into_os_string(),
        "--chat-template".into(),
        template_path().into_os_string(),
    ];
    args.extend(extra.iter().map(Into::into));
    start_with(&args)
}

fn start_with(args: &[std::ffi::OsString]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(["serve", "--http", "127.0.0.1:0", "--threads", "2"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(a) = line.trim().strip_prefix("listening on http://") {
            break a.to_string();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let server = Server { child, addr };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = request(&server.addr, "GET", "/health", None, &[]);
        match r.status {
            200 => break,
            503 => assert_eq!(r.json()["status"], "loading"),
            s => panic!("/health answered {s}"),
        }
        assert!(Instant::now() < deadline, "server never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        String::from_utf8(self.body.clone())
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

fn send_head(s: &mut TcpStream, method: &str, path: &str, body: Option<&[u8]>, headers: &[&str]) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // A server may answer an oversize body before reading it all.
        let _ = s.write_all(b);
    }
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

/// One chunk of a chunked body; `None` at its end.
fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let n = usize::from_str_radix(line.trim(), 16).ok()?;
    let mut data = vec![0; n + 2];
    r.read_exact(&mut data).ok()?;
    data.truncate(n);
    (n > 0).then_some(data)
}

fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[&str],
) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    send_head(&mut s, method, path, body, headers);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            body.extend(c);
        }
    } else {
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse::<usize>().unwrap());
        match len {
            Some(n) => {
                body.resize(n, 0);
                r.read_exact(&mut body).unwrap();
            }
            None => {
                r.read_to_end(&mut body).unwrap();
            }
        }
    }
    Response {
        status,
        headers,
        body,
    }
}

fn post(addr: &str, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, Some(body.to_string().as_bytes()), &[])
}

/// A good request and how to reproduce it with `generate`.
struct Good {
    chat: bool,
    prompt: String,
    max_tokens: u64,
    temperature: f64,
    top_k: u64,
    top_p: f64,
    seed: u64,
    stop: Vec<&'static str>,
    /// presence, frequency, repetition.
    penalties: (f64, f64, f64),
}

fn goods() -> Vec<Good> {
    let prompts = [
        "In the beginning",
        "And the LORD said unto Moses",
        "Blessed are",
        "For God so loved",
        "The kingdom of heaven",
        "And it came to pass",
        "Thou shalt",
        "Jesus",
    ];
    (0..32)
        .map(|i| Good {
            chat: i % 2 == 1,
            prompt: prompts[i % prompts.len()].to_string(),
            max_tokens: 8 + (i as u64 * 5) % 17,
            temperature: [0.0, 0.7, 1.0, 1.3][i % 4],
            top_k: [0, 40, 0, 10][(i / 4) % 4],
            top_p: [1.0, 0.9][(i / 2) % 2],
            seed: i as u64 * 7 + 1,
            stop: if i % 5 == 0 { vec![";"] } else { vec![] },
            penalties: match i % 8 {
                3 => (0.8, 0.0, 1.0),
                5 => (0.0, 0.6, 1.3),
                6 => (-0.5, 0.3, 0.9),
                _ => (0.0, 0.0, 1.0),
            },
        })
        .collect()
}

impl Good {
    fn body(&self) -> Value {
        let mut v = json!({
            "model": "trained-moe", "max_tokens": self.max_tokens, "temperature": self.temperature,
            "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed, "stop": self.stop,
            "stream": true, "user": "test", "presence_penalty": self.penalties.0,
            "frequency_penalty": self.penalties.1, "repetition_penalty": self.penalties.2,
        });
        if self.chat {
            v["messages"] = json!([{"role": "user", "content": self.prompt}]);
        } else {
            v["prompt"] = json!(self.prompt);
        }
        v
    }

    /// The text the model continues: a chat's rendered prompt.
    fn text_prompt(&self) -> String {
        if !self.chat {
            return self.prompt.clone();
        }
        let source = std::fs::read_to_string(template_path()).unwrap();
        let t = ChatTemplate::new(&source, "<s>", "</s>").unwrap();
        t.render(&[json!({"role": "user", "content": self.prompt})], true)
            .unwrap()
    }

    fn generate(&self) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgemoe"));
        cmd.args(["generate", "--json", "--threads", "1", "--model"])
            .arg(model_dir())
            .arg("--prompt")
            .arg(self.text_prompt());
        cmd.args(["-n", &self.max_tokens.to_string()]);
        cmd.args(["--temp", &self.temperature.to_string()]);
        cmd.args(["--top-k", &self.top_k.to_string()]);
        cmd.args(["--top-p", &self.top_p.to_string()]);
        cmd.args(["--seed", &self.seed.to_string()]);
        let (p, f, r) = self.penalties;
        cmd.args([
            "--presence-penalty",
            &p.to_string(),
            "--frequency-penalty",
            &f.to_string(),
        ]);
        cmd.args(["--repetition-penalty", &r.to_string()]);
        for s in &self.stop {
            cmd.args(["--stop", s]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
    }
}

/// The text of a streamed answer, checking the stream's shape on the way.
fn stream_text(r: &Response, chat: bool) -> String {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(finish.is_none(), "a chunk after the last one");
        let c = &v["choices"][0];
        if chat {
            assert_eq!(v["object"], "chat.completion.chunk");
            text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        } else {
            assert_eq!(v["object"], "text_completion");
            text.push_str(c["text"].as_str().unwrap());
        }
        if !c["finish_reason"].is_null() {
            finish = Some(c["finish_reason"].as_str().unwrap().to_string());
        }
    }
    let f = finish.expect("no finish_reason");
    assert!(f == "stop" || f == "length", "{f}");
    text
}

fn metric(addr: &str, name: &str) -> f64 {
    let r = request(addr, "GET", "/metrics", None, &[]);
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn concurrent_streams_match_generate_and_bad_requests_fail_alone() {
    let server = start(&["--max-body", "65536"]);
    let addr = server.addr.clone();
    let reqs = goods();
    std::thread::scope(|s| {
        // A client that leaves after its first token must cancel its request.
        let a = addr.clone();
        let quitter = s.spawn(move || {
            let mut sock = TcpStream::connect(&a).unwrap();
            let body =
                json!({"prompt": "And", "max_tokens": 400, "temperature": 0, "stream": true});
            send_head(
                &mut sock,
                "POST",
                "/v1/completions",
                Some(body.to_string().as_bytes()),
                &[],
            );
            let mut r = BufReader::new(sock);
            let (status, _) = read_head(&mut r);
            assert_eq!(status, 200);
            let first = read_chunk(&mut r).unwrap();
            assert!(first.starts_with(b"data: "));
        });
        let good: Vec<_> = reqs
            .iter()
            .map(|g| {
                let a = addr.clone();
                s.spawn(move || {
                    let path = if g.chat {
                        "/v1/chat/completions"
                    } else {
                        "/v1/completions"
                    };
                    stream_text(&post(&a, path, &g.body()), g.chat)
                })
            })
            .collect();
        let a = addr.as_str();
        let broken = request(a, "POST", "/v1/completions", Some(b"{\"prompt\": "), &[]);
        assert_eq!(
            (broken.status, broken.json()["error"]["code"].clone()),
            (400, json!("invalid_json"))
        );
        let misspelt = post(
            a,
            "/v1/completions",
            &json!({"prompt": "x", "temperatur": 0}),
        );
        assert_eq!(misspelt.status, 400);
        let msg = misspelt.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("`temperatur`"), "{msg}");
        let big = json!({"prompt": "word ".repeat(20_000)});
        let oversize = post(a, "/v1/completions", &big);
        assert_eq!(oversize.status, 413);
        let refused = post(
            a,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true}),
        );
        assert_eq!(refused.status, 400);
        assert!(refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`logprobs`"));
        let long = post(
            a,
            "/v1/completions",
            &json!({"prompt": "word ".repeat(2000)}),
        );
        assert_eq!(
            (long.status, long.json()["error"]["code"].clone()),
            (400, json!("context_length_exceeded"))
        );
        assert_eq!(request(a, "GET", "/nope", None, &[]).status, 404);
        quitter.join().unwrap();
        for (g, h) in reqs.iter().zip(good) {
            let text = h.join().unwrap();
            assert_eq!(
                text,
                g.generate(),
                "{} request {:?} differs from generate",
                if g.chat { "chat" } else { "completion" },
                g.prompt
            );
        }
    });
    // The quitter's request ends cancelled, not run to its 400 tokens.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&addr, "edgemoe_requests_total{finish_reason=\"cancelled\"}") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the disconnected request was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        metric(&addr, "edgemoe_requests_total{finish_reason=\"stop\"}")
            + metric(&addr, "edgemoe_requests_total{finish_reason=\"length\"}")
            >= 32.0
    );
    // Whole (non-streamed) answers and the models list.
    let whole = post(
        &addr,
        "/v1/completions",
        &json!({"prompt": "Jesus", "max_tokens": 5, "temperature": 0, "echo": true}),
    );
    let v = whole.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Jesus"));
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let models = request(&addr, "GET", "/v1/models", None, &[]).json();
    assert_eq!(models["data"][0]["id"], "trained-moe");
}

#[test]
fn full_queue_answers_503_with_retry_after() {
    let server = start(&["--max-batch", "1", "--max-queue", "1"]);
    let addr = server.addr.as_str();
    let body = json!({"prompt": "And", "max_tokens": 200, "temperature": 0});
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    let r = post(addr, "/v1/completions", &body);
                    (r.status, r.header("retry-after").map(str::to_string))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<_> = statuses.iter().filter(|(s, _)| *s == 503).collect();
    assert!(!busy.is_empty(), "{statuses:?}");
    assert!(busy.iter().all(|(_, ra)| ra.as_deref() == Some("1")));
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    assert!(metric(addr, "edgemoe_requests_rejected_queue_full_total") >= 1.0);
}

#[test]
fn api_key_is_required_but_not_for_health() {
    let server = start(&["--api-key", "sekret"]);
    let addr = server.addr.as_str();
    let body = json!({"prompt": "And", "max_tokens": 2}).to_string();
    let r = request(addr, "POST", "/v1/completions", Some(body.as_bytes()), &[]);
    assert_eq!(r.status, 401);
    let r = request(
        addr,
        "POST",
        "/v1/completions",
        Some(body.as_bytes()),
        &["Authorization: Bearer wrong"],
    );
    assert_eq!(r.status, 401);
    let r = request(
        addr,
        "POST",
        "/v1/completions",
        Some(body.as_bytes()),
        &["Authorization: Bearer sekret"],
    );
    assert_eq!(r.status, 200);
    assert_eq!(request(addr, "GET", "/health", None, &[]).status, 200);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 1000 requests (streamed, whole, chat, refused) leave the resident set where the first 100
/// left it: nothing grows per request. The bound is generous slack for allocator noise.
#[test]
fn rss_stays_flat_over_1000_requests() {
    let server = start(&[]);
    let addr = server.addr.as_str();
    let pid = server.child.id();
    let run = |from: usize, to: usize| {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for i in (from + t..to).step_by(4) {
                        let (path, body) = match i % 4 {
                            0 => ("/v1/completions", json!({"prompt": "And the", "max_tokens": 3, "seed": i, "stream": true})),
                            1 => ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Thou"}], "max_tokens": 3, "seed": i})),
                            2 => ("/v1/completions", json!({"prompt": "Blessed", "max_tokens": 3, "temperature": 0})),
                            _ => ("/v1/completions", json!({"prompt": "x", "top_p": 7})),
                        };
                        let r = post(addr, path, &body);
                        assert_eq!(r.status, if i % 4 == 3 { 400 } else { 200 });
                    }
                });
            }
        })
    };
    run(0, 100);
    let before = rss_kib(pid);
    run(100, 1000);
    let after = rss_kib(pid);
    eprintln!("server RSS after 100 requests {before} KiB, after 1000 {after} KiB");
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

/// The socket is bound before the model loads: `/health` and the API answer 503 with
/// `Retry-After` while loading, then `/health` answers 200 and requests run.
#[test]
fn health_is_503_while_loading() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let opts = edgemoe::serve::http::HttpOptions {
        addr: addr.clone(),
        ..Default::default()
    };
    std::thread::spawn(move || {
        edgemoe::serve::http::serve_http(opts, move || {
            wait.recv().ok();
            let model = edgemoe::load_model(Some(&model_dir()))?;
            Ok((edgemoe::Engine::new(std::sync::Arc::new(model), 1)?, None))
        })
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let h = request(&addr, "GET", "/health", None, &[]);
    assert_eq!(
        (h.status, h.json()["status"].clone()),
        (503, json!("loading"))
    );
    assert_eq!(h.header("retry-after"), Some("1"));
    let r = post(
        &addr,
        "/v1/completions",
        &json!({"prompt": "And", "max_tokens": 2}),
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (503, json!("loading"))
    );
    go.send(()).unwrap();
    while request(&addr, "GET", "/health", None, &[]).status != 200 {
        assert!(Instant::now() < deadline, "never became ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = post(
        &addr,
        "/v1/completions",
        &json!({"prompt": "And", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);
    // Without a chat template, a chat request says so.
    let r = post(
        &addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("no_chat_template"))
    );
}

/// `n` choices: choice i is the request with seed + i, whole or streamed (chunks carry their
/// choice's index; one `[DONE]` after the last).
#[test]
fn n_choices_are_seeds_in_a_row() {
    let server = start(&[]);
    let addr = server.addr.as_str();
    let g = |seed: u64, chat: bool| Good {
        chat,
        prompt: "Blessed are".into(),
        max_tokens: 12,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed,
        stop: vec![],
        penalties: (0.0, 0.0, 1.0),
    };
    let mut body = g(5, false).body();
    body["n"] = json!(3);
    body["stream"] = json!(false);
    let v = post(addr, "/v1/completions", &body).json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["text"].as_str().unwrap(),
            g(5 + i as u64, false).generate()
        );
    }
    assert_eq!(v["usage"]["completion_tokens"], 36);
    let mut body = g(9, true).body();
    body["n"] = json!(2);
    let r = post(addr, "/v1/chat/completions", &body);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = [String::new(), String::new()];
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        text[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(text[0], g(9, true).generate());
    assert_eq!(text[1], g(10, true).generate());
}

/// A client waiting for a whole (non-streamed) answer that disconnects cancels its request
/// promptly: the server watches the socket while generating, not only when it writes the
/// answer. Greedy decoding of the random built-in model runs its 4000 tokens to the end
/// (several seconds), so a request that ends cancelled with a few hundred was cut short.
#[test]
fn a_non_streaming_client_that_disconnects_is_cancelled() {
    let server = start_with(&["--model".into(), "builtin:default".into()]);
    let addr = server.addr.clone();
    let max_tokens = 4000;
    let mut sock = TcpStream::connect(&addr).unwrap();
    let body = json!({"prompt": "And", "max_tokens": max_tokens, "temperature": 0});
    send_head(
        &mut sock,
        "POST",
        "/v1/completions",
        Some(body.to_string().as_bytes()),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&addr, "edgemoe_active_requests") < 1.0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    drop(sock);
    let left = Instant::now();
    let cancelled = "edgemoe_requests_total{finish_reason=\"cancelled\"}";
    while metric(&addr, cancelled) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the disconnected request was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let generated = metric(&addr, "edgemoe_generated_tokens_total");
    eprintln!(
        "cancelled {:.0} ms after the client left, at {generated} of {max_tokens} tokens",
        left.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        generated < f64::from(max_tokens) / 4.0,
        "{generated} tokens generated before the cancel"
    );
    assert_eq!(metric(&addr, "edgemoe_active_requests"), 0.0);
    // Nothing else finished: the request ended by the cancel, not by running out.
    for reason in ["stop", "length", "error"] {
        let name = format!("edgemoe_requests_total{{finish_reason=\"{reason}\"}}");
        assert_eq!(metric(&addr, &name), 0.0, "{reason}");
    }
}

/// 32 kept-alive connections send a streaming chat completion in the same instant: every one
/// gets its first byte within seconds while all the others stay open. (tiny_http 0.12 started
/// about 4 and held the rest until a connection closed: through nginx, which keeps idle
/// connections 60 s, a minute; here, never.)
#[test]
fn a_burst_of_32_streams_all_start_at_once() {
    const N: usize = 32;
    let server = start(&["--max-batch", "32"]);
    let addr = server.addr.clone();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(N));
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let (addr, barrier) = (addr.clone(), std::sync::Arc::clone(&barrier));
            std::thread::spawn(move || {
                let body = json!({
                    "messages": [{"role": "user", "content": format!("Tell me story {i}")}],
                    "max_tokens": 48, "temperature": 0, "stream": true
                })
                .to_string();
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                barrier.wait();
                let sent = Instant::now();
                // No `Connection: close`: kept alive, as a proxy keeps its connections.
                write!(
                    s,
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let first = r.fill_buf().map(|b| !b.is_empty()).unwrap_or(false);
                let waited = sent.elapsed();
                assert!(first, "stream {i} got no first byte in 30 s");
                let (status, _) = read_head(&mut r);
                let mut events = Vec::new();
                while let Some(c) = read_chunk(&mut r) {
                    events.extend(c);
                }
                let events = String::from_utf8(events).unwrap();
                // Returned, so the connection stays open until every stream has ended.
                (status, waited, events.ends_with("data: [DONE]\n\n"), s)
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let slowest = results.iter().map(|r| r.1).max().unwrap();
    eprintln!("slowest first byte of {N} streams opened at once: {slowest:?}");
    for (i, (status, waited, done, _)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "stream {i}");
        assert!(*done, "stream {i} did not end in [DONE]");
        assert!(
            *waited < Duration::from_secs(10),
            "stream {i} waited {waited:?} for its first byte"
        );
    }
}

/// Sends `raw`, closes the sending side, and reads the one answer; the server must then close.
fn raw_exchange(addr: &str, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The server may answer and close before taking everything.
    let _ = s.write_all(raw);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .expect("an error answer has a Content-Length");
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "a second answer: {:?}",
        String::from_utf8_lossy(&rest)
    );
    Response {
        status,
        headers,
        body,
    }
}

/// Malformed requests each get one error answer in OpenAI's shape (and a closed connection);
/// the server keeps serving.
#[test]
fn malformed_requests_get_one_error_and_the_server_stays_up() {
    let server = start_with(&["--model".into(), "builtin:default".into()]);
    let addr = server.addr.as_str();
    let body = json!({"prompt": "And", "max_tokens": 2}).to_string();
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nCookie: {}\r\n\r\n",
        "c".repeat(40_000)
    );
    let mid_body = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..body.len() / 2]
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "oversized headers",
            big.into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "bad request line",
            b"HELLO THERE\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "bad Content-Length",
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1e3\r\n\r\n{}".to_vec(),
            400,
            "bad_content_length",
        ),
        ("closed mid-body", mid_body.into_bytes(), 400, "bad_body"),
    ];
    for (what, raw, status, code) in cases {
        let r = raw_exchange(addr, &raw);
        let v = r.json();
        assert_eq!(
            (r.status, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {v}"
        );
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert_eq!(r.header("connection"), Some("close"), "{what}");
    }
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "And", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);
}

/// `--max-connections`: one connection more than the limit is answered 503 at once.
#[test]
fn connections_over_the_limit_are_answered_503() {
    let server = start_with(&[
        "--model".into(),
        "builtin:default".into(),
        "--max-connections".into(),
        "2".into(),
    ]);
    let addr = server.addr.as_str();
    // The start-up health checks' connections give their places back when their threads see
    // the close, which on a loaded machine can come after the next connect: until then a held
    // connection may be the one over the limit, so each is retried until it is let in.
    let deadline = Instant::now() + Duration::from_secs(10);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| loop {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            match read_head(&mut r).0 {
                200 => break s,
                503 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                status => panic!("a connection under the limit was answered {status}"),
            }
        })
        .collect();
    let r = raw_exchange(addr, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (503, Some("overloaded"))
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(addr, "GET", "/health", None, &[]).status != 200 {
        assert!(Instant::now() < deadline, "places never given back");
        std::thread::sleep(Duration::from_millis(20));
    }
}
