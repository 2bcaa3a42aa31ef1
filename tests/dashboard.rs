//! The dashboard without a browser: `serve --http` serves its page (all assets its own, open
//! without the API key) and `/v1/stats` (behind the key) reports the engine's real counters —
//! routing counts that add up to the tokens run, KV evictions, and under `--mem` each expert's
//! tier from the pager; `profile --svg` draws the same heat map as a well-formed SVG.
//! tests/browser/ drives the page itself in chromium (tools/browser-test.sh).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/trained-moe")
}

fn edgemoe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgemoe"))
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

/// Starts `serve --http` with `args`; `Err` is the server's log when it exits before ready.
fn start(args: &[&str]) -> Result<Server, String> {
    let mut child = edgemoe()
        .args(["serve", "--http", "127.0.0.1:0", "--threads", "2"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let addr = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            let _ = child.wait();
            return Err(log);
        }
        log.push_str(&line);
        if let Some(a) = line.trim().strip_prefix("listening on http://") {
            break a.to_string();
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining the log so the server never blocks on a full pipe; pass it on until ready.
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
            let _ = tx.send(std::mem::take(&mut line));
        }
    });
    let mut server = Server { child, addr };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while let Ok(l) = rx.try_recv() {
            log.push_str(&l);
        }
        if server.child.try_wait().unwrap().is_some() {
            // The drain thread ends at the pipe's end: everything the server said is in.
            log.extend(rx.iter());
            return Err(log);
        }
        if let Some(r) = try_request(&server.addr, "GET", "/health", None, None) {
            if r.status == 200 {
                return Ok(server);
            }
        }
        assert!(Instant::now() < deadline, "server never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection; `None` when the server cannot be reached.
fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> Option<Response> {
    let mut s = TcpStream::connect(addr).ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

fn get(addr: &str, path: &str, key: Option<&str>) -> Response {
    try_request(addr, "GET", path, None, key).expect("server unreachable")
}

fn complete(addr: &str, body: Value) -> Value {
    let r = try_request(addr, "POST", "/v1/completions", Some(&body), None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn sum(v: &Value) -> u64 {
    match v {
        Value::Array(a) => a.iter().map(sum).sum(),
        v => v.as_u64().unwrap_or_else(|| panic!("{v} is not a count")),
    }
}

#[test]
fn page_is_the_servers_own_and_open_while_stats_need_the_key() {
    let s = start(&["--api-key", "k1"]).unwrap();
    let page = get(&s.addr, "/", None);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("Content-Type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("Content-Security-Policy").unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    for id in [
        "chat-form",
        "tokens-per-s",
        "queue-waiting",
        "kv-sequences",
        "heatmap",
    ] {
        assert!(page.body.contains(&format!("id=\"{id}\"")), "no #{id}");
    }
    // Every file the page names is this server's (or inline data); none is fetched elsewhere.
    for attr in ["src=\"", "href=\""] {
        for part in page.body.split(attr).skip(1) {
            let url = &part[..part.find('"').unwrap()];
            assert!(url.starts_with('/') || url.starts_with("data:"), "{url}");
            if url.starts_with('/') {
                let r = get(&s.addr, url, None);
                assert_eq!(r.status, 200, "{url}");
                // The only absolute URL in any asset is the SVG namespace, an identifier.
                let outside = r.body.replace("http://www.w3.org/2000/svg", "");
                assert!(
                    !outside.contains("http://") && !outside.contains("https://"),
                    "{url} names another host"
                );
            }
        }
    }
    assert_eq!(get(&s.addr, "/v1/stats", None).status, 401);
    assert_eq!(get(&s.addr, "/v1/stats", Some("k2")).status, 401);
    let stats = get(&s.addr, "/v1/stats", Some("k1"));
    assert_eq!(stats.status, 200);
    assert_eq!(stats.json()["object"], "edgemoe.dashboard");
    let post = try_request(&s.addr, "POST", "/", Some(&json!({})), Some("k1")).unwrap();
    assert_eq!(post.status, 405);
}

#[test]
fn stats_count_what_the_engine_ran() {
    let s = start(&[]).unwrap();
    let before = get(&s.addr, "/v1/stats", None).json();
    assert!(!before["model"].as_str().unwrap().is_empty());
    assert_eq!(before["chat_template"], false);
    assert!(before["tokens_per_s"].as_f64().is_some());
    assert_eq!(before["queue"], json!({"waiting": 0, "active": 0}));
    assert_eq!(before["kv"]["sequences"], json!([]));
    let x = &before["experts"];
    assert_eq!(x["paged"], false);
    assert!(x["cache"].is_null() && x["reads"].is_null());
    for t in ["gpu", "ram", "storage"] {
        assert!(x["palette"][t].as_str().unwrap().starts_with('#'));
    }
    let map = &x["map"];
    assert_eq!(map["layers"], json!([0, 1, 2, 3]));
    assert_eq!(map["experts"], 8);
    assert_eq!(sum(&map["counts"]), 0);
    // In place, every expert is in RAM.
    let tiers: Vec<&str> = map["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|t| t.as_str().unwrap()))
        .collect();
    assert_eq!(tiers, vec!["ram"; 32]);

    // A small KV budget makes the cache evict while the request runs.
    let out = complete(
        &s.addr,
        json!({"prompt": "In the beginning", "max_tokens": 300, "kv_budget": 160, "seed": 3}),
    );
    let generated = out["usage"]["completion_tokens"].as_u64().unwrap();
    let after = get(&s.addr, "/v1/stats", None).json();
    let q = &after["requests"];
    assert_eq!(
        sum(&json!([
            q["finished_stop"],
            q["finished_length"],
            q["finished_cancelled"],
            q["finished_error"]
        ])),
        1
    );
    assert_eq!(q["completion_tokens"].as_u64().unwrap(), generated);
    // Every token run was routed to top-k experts in each of the four MoE layers.
    let tokens = after["runtime"]["tokens"].as_u64().unwrap();
    assert!(tokens > generated, "{tokens} tokens run");
    let counts = &after["experts"]["map"]["counts"];
    assert_eq!(sum(counts), tokens * 2 * 4);
    for row in counts.as_array().unwrap() {
        assert_eq!(sum(row), tokens * 2, "a layer's counts: {row}");
    }
    let heat = after["experts"]["map"]["heat"].as_array().unwrap();
    assert!(heat
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .any(|h| h == 1.0));
    assert!(after["kv"]["evictions"].as_u64().unwrap() > 0, "{after}");
    assert!(after["kv"]["bytes"].as_u64().unwrap() > 0);
}

/// The trained fixture quantized into `dir` (an .emoe can be paged).
fn quantized(dir: &Path) -> PathBuf {
    let out = dir.join("trained.emoe");
    let st = edgemoe()
        .args(["quantize", "--method", "rtn", "--model"])
        .arg(fixture())
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    out
}

#[test]
fn paged_stats_show_each_experts_tier_from_the_pager() {
    let tmp = tempfile::tempdir().unwrap();
    let emoe = quantized(tmp.path());
    let model = emoe.to_str().unwrap();
    let common = ["--model", model, "--max-batch", "2"];
    // The smallest budget, from the refusal of a too small one, plus room for ~8 more slots.
    let refusal = start(&[&common[..], &["--mem", "1M"]].concat())
        .err()
        .expect("1M is too small");
    let least: u64 = refusal
        .split(" bytes)")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no minimum in: {refusal}"));
    let mem = (least + 8 * 110 * 1024).to_string();
    let s = start(&[&common[..], &["--mem", &mem]].concat()).unwrap();
    complete(
        &s.addr,
        json!({"prompt": "And God said", "max_tokens": 40, "seed": 5}),
    );
    let x = get(&s.addr, "/v1/stats", None).json()["experts"].clone();
    assert_eq!(x["paged"], true);
    let cache = &x["cache"];
    let slots = cache["slots"].as_u64().unwrap();
    assert!((4..32).contains(&slots), "{slots} slots");
    assert!(cache["misses"].as_u64().unwrap() > 0);
    assert!(cache["bytes_read"].as_u64().unwrap() > 0);
    let tiers: Vec<String> = x["map"]["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter())
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let in_ram = tiers.iter().filter(|t| *t == "ram").count() as u64;
    let stored = tiers.iter().filter(|t| *t == "storage").count() as u64;
    assert!(
        in_ram > 0 && in_ram <= slots,
        "{in_ram} in RAM, {slots} slots"
    );
    assert_eq!(in_ram + stored, 32);
    // Each read is one block, for a miss (done before its step ends) or a prefetch (perhaps
    // still in flight): the per-expert reads add up to between the two.
    let reads = sum(&x["reads"]);
    let misses = cache["misses"].as_u64().unwrap();
    let prefetches = cache["prefetches"].as_u64().unwrap();
    assert!(
        (misses..=misses + prefetches).contains(&reads),
        "{reads} reads, {misses} misses, {prefetches} prefetches"
    );
    assert!(x["prediction"]["predicted"].as_u64().unwrap() > 0);
}

/// Checks `xml` is well-formed enough for a browser's strict parser: tags nest and close,
/// attribute values are quoted, `&` starts an entity. Returns the start tags' texts.
fn well_formed(xml: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut tags = Vec::new();
    let mut rest = xml.trim();
    while let Some(i) = rest.find('<') {
        let text = &rest[..i];
        for (j, _) in text.match_indices('&') {
            let ent = &text[j..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&#"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "bare & in {text}"
            );
        }
        assert!(i == 0 || !stack.is_empty(), "text outside the root: {text}");
        let end = rest[i..].find('>').expect("unclosed tag") + i;
        let tag = &rest[i + 1..end];
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else {
            let name = tag.split_whitespace().next().unwrap().trim_end_matches('/');
            tags.push(tag.to_string());
            if !tag.ends_with('/') {
                stack.push(name.to_string());
            }
        }
        rest = &rest[end + 1..];
        if stack.is_empty() {
            assert!(rest.trim().is_empty(), "content after the root: {rest}");
        }
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
    tags
}

fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let start = tag
        .find(&format!(" {name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + name.len()
        + 3;
    &tag[start..start + tag[start..].find('"').unwrap()]
}

#[test]
fn profile_draws_the_heat_map_as_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let (json_path, svg_path) = (tmp.path().join("p.json"), tmp.path().join("p.svg"));
    let st = edgemoe()
        .arg("profile")
        .arg("--text")
        .arg(fixture().join("heldout.txt"))
        .args(["--max-tokens", "600", "--out"])
        .arg(&json_path)
        .arg("--svg")
        .arg(&svg_path)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let profile: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let tags = well_formed(&svg);
    assert!(tags[0].starts_with("svg xmlns=\"http://www.w3.org/2000/svg\""));
    let cells: Vec<&String> = tags
        .iter()
        .filter(|t| t.starts_with("rect class=\"cell\""))
        .collect();
    assert_eq!(cells.len(), 4 * 8, "one cell per layer and expert");
    let mut seen = std::collections::HashSet::new();
    let mut by_count: Vec<(u64, f64)> = Vec::new();
    for c in &cells {
        let (l, e): (usize, usize) = (
            attr(c, "data-layer").parse().unwrap(),
            attr(c, "data-expert").parse().unwrap(),
        );
        assert!(seen.insert((l, e)), "({l}, {e}) twice");
        let count: u64 = attr(c, "data-count").parse().unwrap();
        assert_eq!(count, profile["counts"][l][e].as_u64().unwrap());
        // Profiling runs experts in place: all in RAM, the RAM colour.
        assert_eq!(attr(c, "data-tier"), "ram");
        assert_eq!(attr(c, "fill"), "#1f7ae0");
        by_count.push((count, attr(c, "fill-opacity").parse().unwrap()));
    }
    // Colour follows the counts: more tokens, more opaque; the hottest is fully opaque.
    by_count.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for w in by_count.windows(2) {
        assert!(
            w[0].1 <= w[1].1 && (w[0].0 == w[1].0 || w[0].1 < w[1].1),
            "{w:?}"
        );
    }
    assert_eq!(by_count.last().unwrap().1, 1.0);
    assert!(by_count[0].0 < by_count.last().unwrap().0);
}
