//! `edgemoe serve` driven through pipes: concurrent streaming requests batched together, a
//! cancel, and bad lines. Every good request must produce exactly the text `edgemoe generate`
//! gives with the same seed and settings.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// `edgemoe serve` on the trained fixture with piped stdin/stdout.
fn spawn_server(threads: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(["serve", "--threads", &threads.to_string(), "--model"])
        .arg(model_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

struct Req {
    id: &'static str,
    prompt: &'static str,
    max_tokens: u64,
    temperature: f64,
    top_k: u64,
    top_p: f64,
    seed: u64,
    stop: Vec<&'static str>,
}

fn requests() -> Vec<Req> {
    let r = |id, prompt, max_tokens, temperature, top_k, top_p, seed, stop| Req {
        id,
        prompt,
        max_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
    };
    vec![
        r("r1", "In the beginning", 24, 0.0, 0, 1.0, 0, vec![]),
        r(
            "r2",
            "And the LORD said unto Moses",
            30,
            0.7,
            40,
            0.95,
            1,
            vec![],
        ),
        r("r3", "Blessed are", 20, 1.0, 0, 1.0, 7, vec![]),
        r("r4", "For God so loved", 40, 0.8, 20, 0.9, 3, vec![";"]),
        r(
            "r5",
            "The kingdom of heaven",
            12,
            0.0,
            0,
            1.0,
            0,
            vec![" the"],
        ),
        r("r6", "And it came to pass", 35, 1.2, 50, 1.0, 11, vec![]),
        r("r7", "Thou shalt", 28, 0.5, 0, 0.8, 5, vec![]),
        r("r8", "Jesus", 16, 0.9, 10, 0.95, 99, vec![",", "."]),
    ]
}

/// What `edgemoe generate --json` gives for the same request.
fn generate_text(r: &Req) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgemoe"));
    cmd.args(["generate", "--json", "--threads", "2", "--model"])
        .arg(model_dir());
    cmd.args([
        "--prompt",
        r.prompt,
        "-n",
        &r.max_tokens.to_string(),
        "--temp",
        &r.temperature.to_string(),
    ]);
    cmd.args([
        "--top-k",
        &r.top_k.to_string(),
        "--top-p",
        &r.top_p.to_string(),
        "--seed",
        &r.seed.to_string(),
    ]);
    for s in &r.stop {
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

#[test]
fn concurrent_streams_cancel_and_bad_lines() {
    let mut child = spawn_server(2);
    let mut stdin = child.stdin.take().unwrap();
    let reqs = requests();
    let mut input: Vec<u8> = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let line = json!({"id": r.id, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": r.temperature,
            "top_k": r.top_k, "top_p": r.top_p, "seed": r.seed, "stop": r.stop, "stream": true});
        input.extend_from_slice(format!("{line}\n").as_bytes());
        // Bad lines between the good ones.
        match i {
            0 => input.extend_from_slice(b"{\"id\":\"bad1\",\"prompt\": \n"),
            1 => input
                .extend_from_slice(b"{\"id\":\"bad2\",\"prompt\":\"x\",\"max_tokens\":\"many\"}\n"),
            2 => input.extend_from_slice(b"{\"id\":\"bad3\",\"prompt\":\"\"}\n"),
            3 => input.extend_from_slice(
                format!(
                    "{}\n",
                    json!({"id": "bad4", "prompt": "word ".repeat(2000)})
                )
                .as_bytes(),
            ),
            4 => input.extend_from_slice(b"{\"id\":\"bad5\",\"prompt\":\"\xff\xfe\"}\n"),
            // max_tokens so large that prompt + max_tokens would overflow.
            5 => input.extend_from_slice(
                b"{\"id\":\"bad6\",\"prompt\":\"x\",\"max_tokens\":18446744073709551615}\n",
            ),
            _ => {}
        }
    }
    input.extend_from_slice(format!("{}\n", json!({"id": "victim", "prompt": "And", "max_tokens": 400, "stream": true, "temperature": 0})).as_bytes());
    stdin.write_all(&input).unwrap();
    stdin.flush().unwrap();

    let mut stdin = Some(stdin);
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object per line: {line:?}: {e}"));
        if v["id"] == "victim" && v["object"] == "text_completion.chunk" {
            if let Some(mut s) = stdin.take() {
                // Cancel once the victim is streaming, then end the input.
                s.write_all(b"{\"cancel\":\"victim\"}\n").unwrap();
            }
        }
        lines.push(v);
    }
    assert!(
        child.wait().unwrap().success(),
        "serve must exit 0 at end of input"
    );
    assert_eq!(lines[0]["object"], "edgemoe.ready");

    let mut text: HashMap<String, String> = HashMap::new();
    let mut finish: HashMap<String, Value> = HashMap::new();
    let mut errors: HashMap<String, String> = HashMap::new();
    for v in &lines[1..] {
        if let Some(err) = v.get("error") {
            let key = v["id"]
                .as_str()
                .map_or_else(|| format!("no-id-{}", errors.len()), str::to_string);
            errors.insert(key, err["code"].as_str().unwrap().to_string());
            assert!(err["message"].is_string() && err["type"].is_string());
            continue;
        }
        let id = v["id"].as_str().unwrap().to_string();
        assert!(
            !finish.contains_key(&id),
            "line after the final one for {id}"
        );
        let choice = &v["choices"][0];
        text.entry(id.clone())
            .or_default()
            .push_str(choice["text"].as_str().unwrap());
        if !choice["finish_reason"].is_null() {
            finish.insert(id, v.clone());
        }
    }
    let codes: Vec<&str> = errors.values().map(String::as_str).collect();
    for code in [
        "invalid_json",
        "invalid_type",
        "empty_prompt",
        "context_length_exceeded",
        "invalid_utf8",
    ] {
        assert!(codes.contains(&code), "missing error {code}: {errors:?}");
    }
    assert_eq!(errors.len(), 6, "{errors:?}");
    assert_eq!(errors["bad6"], "context_length_exceeded");
    assert_eq!(finish["victim"]["choices"][0]["finish_reason"], "cancelled");
    for r in &reqs {
        let f = &finish[r.id];
        let reason = f["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(reason == "stop" || reason == "length", "{}: {reason}", r.id);
        assert!(f["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
        assert!(f["timings"]["prompt_ms"].is_number());
        assert_eq!(
            text[r.id],
            generate_text(r),
            "request {} differs from generate",
            r.id
        );
    }
}

#[test]
fn automatic_ids_skip_client_ids_in_flight() {
    let mut child = spawn_server(1);
    // A client picks the id the server would give the next anonymous request.
    let input = concat!(
        "{\"id\":\"cmpl-1\",\"prompt\":\"And\",\"max_tokens\":60,\"temperature\":0}\n",
        "{\"prompt\":\"And\",\"max_tokens\":4,\"temperature\":0}\n",
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().all(|v| v.get("error").is_none()), "{lines:?}");
    let ids: Vec<&str> = lines[1..]
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{lines:?}");
    assert!(
        ids.contains(&"cmpl-1") && ids.iter().any(|&id| id != "cmpl-1"),
        "{ids:?}"
    );
}

/// A prompt prefilled a few tokens per step (between other requests' decode steps) gives the
/// same text as one prefilled whole by `generate`; a chat line (`messages`) works too.
#[test]
fn chunked_prefill_and_messages_match_generate() {
    let heldout = std::fs::read_to_string(model_dir().join("heldout.txt")).unwrap();
    let long: String = heldout.chars().take(400).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(["serve", "--threads", "2", "--prefill-chunk", "7", "--model"])
        .arg(model_dir())
        .arg("--chat-template")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/smollm2.jinja"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = [
        json!({"id": "short", "prompt": "And", "max_tokens": 40, "temperature": 0}),
        json!({"id": "long", "prompt": long, "max_tokens": 20, "temperature": 0.8, "seed": 5}),
        json!({"id": "chat", "messages": [{"role": "user", "content": "Thou shalt"}], "max_tokens": 10, "temperature": 0}),
        json!({"id": "typo", "prompt": "x", "max_tokns": 3}),
    ];
    for l in &lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let mut got: HashMap<String, Value> = HashMap::new();
    for l in String::from_utf8(out.stdout).unwrap().lines().skip(1) {
        let v: Value = serde_json::from_str(l).unwrap();
        got.insert(v["id"].as_str().unwrap().to_string(), v);
    }
    let msg = got["typo"]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`max_tokns`"), "{msg}");
    let generate = |prompt: &str, n: u64, temp: f64, seed: u64| {
        let leaked: &'static str = Box::leak(prompt.to_string().into_boxed_str());
        generate_text(&Req {
            id: "x",
            prompt: leaked,
            max_tokens: n,
            temperature: temp,
            top_k: 0,
            top_p: 1.0,
            seed,
            stop: vec![],
        })
    };
    let text = |id: &str| got[id]["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(got["long"]["usage"]["prompt_tokens"].as_u64().unwrap() > 50);
    assert_eq!(text("long"), generate(&long, 20, 0.8, 5));
    assert_eq!(text("short"), generate("And", 40, 0.0, 0));
    let chat_prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nThou shalt<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(text("chat"), generate(chat_prompt, 10, 0.0, 0));
}

/// `chat_template_kwargs` reach the template: Qwen3's real template with
/// `{"enable_thinking": false}` renders transformers' prompt for that (an empty think block),
/// and without it the plain one (both from tests/fixtures/chat/qwen3.json); a kwarg that is not
/// an object, an unknown `reasoning_effort` and one given twice are refused by name.
#[test]
fn chat_template_kwargs_reach_the_template() {
    let chat = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(chat.join("qwen3.json")).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let find = |kwargs: Value| {
        cases
            .iter()
            .find(|c| {
                c["add_generation_prompt"] == json!(true)
                    && c["messages"].as_array().unwrap().len() == 4
                    && c["tools"].is_null()
                    && c["kwargs"] == kwargs
            })
            .unwrap()
    };
    let (plain, no_think) = (find(Value::Null), find(json!({"enable_thinking": false})));
    assert_ne!(plain["expected"], no_think["expected"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(["serve", "--threads", "2", "--model"])
        .arg(model_dir())
        .arg("--chat-template")
        .arg(chat.join("qwen3.jinja"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let messages = &plain["messages"];
    let lines = [
        json!({"id": "plain", "messages": messages, "max_tokens": 8, "temperature": 0}),
        json!({"id": "nothink", "messages": messages, "max_tokens": 8, "temperature": 0,
               "chat_template_kwargs": {"enable_thinking": false}}),
        json!({"id": "notobj", "messages": messages, "chat_template_kwargs": [1]}),
        json!({"id": "effort", "messages": messages, "reasoning_effort": "extreme"}),
        json!({"id": "twice", "messages": messages, "reasoning_effort": "low",
               "chat_template_kwargs": {"reasoning_effort": "high"}}),
        json!({"id": "reserved", "messages": messages, "chat_template_kwargs": {"messages": []}}),
    ];
    for l in &lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let mut got: HashMap<String, Value> = HashMap::new();
    for l in String::from_utf8(out.stdout).unwrap().lines().skip(1) {
        let v: Value = serde_json::from_str(l).unwrap();
        got.insert(v["id"].as_str().unwrap().to_string(), v);
    }
    let error = |id: &str| {
        got[id]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(error("notobj").contains("`chat_template_kwargs` must be an object"));
    assert!(error("effort").contains("`reasoning_effort`"));
    assert!(error("twice").contains("not both"));
    assert!(
        error("reserved").contains("`messages`"),
        "{}",
        error("reserved")
    );
    for (id, case) in [("plain", plain), ("nothink", no_think)] {
        let prompt: &'static str = Box::leak(
            case["expected"]
                .as_str()
                .unwrap()
                .to_string()
                .into_boxed_str(),
        );
        let want = generate_text(&Req {
            id: "x",
            prompt,
            max_tokens: 8,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
        });
        assert_eq!(
            got[id]["choices"][0]["text"].as_str().unwrap(),
            want,
            "{id}"
        );
        let n = got[id]["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(n > 10, "{id}: {n} prompt tokens");
    }
    assert!(
        got["nothink"]["usage"]["prompt_tokens"].as_u64()
            > got["plain"]["usage"]["prompt_tokens"].as_u64()
    );
}
