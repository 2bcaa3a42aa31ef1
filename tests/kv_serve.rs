//! Per-request KV budgets in `edgemoe serve`: a long request with a small `kv_budget` keeps its
//! cache at the budget while it runs (the `stats` op reports its slots and bytes), and its text
//! equals `edgemoe generate` with the same budget, policy and seed; requests in the same batch
//! without KV fields give their unbudgeted text; bad KV fields are refused by name.

use edgemoe::kv::plan::bytes_per_token;
use edgemoe::kv::Policy;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

/// (id, prompt, max_tokens, temperature, seed, kv_budget, kv_policy)
type Case = (
    &'static str,
    &'static str,
    u64,
    f64,
    u64,
    Option<Value>,
    Option<&'static str>,
);

fn cases() -> Vec<Case> {
    vec![
        (
            "long",
            "In the beginning",
            400,
            0.8,
            5,
            Some(json!(150)),
            Some("lazy"),
        ),
        (
            "half",
            "And God said",
            300,
            0.0,
            0,
            Some(json!("50%")),
            Some("h2o"),
        ),
        ("plain", "Blessed are", 40, 0.7, 3, None, None),
        ("greedy", "The LORD", 30, 0.0, 0, None, None),
    ]
}

/// `edgemoe generate --json` with the same settings; its text.
fn generate(c: &Case) -> String {
    let (_, prompt, n, temp, seed, budget, policy) = c;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgemoe"));
    cmd.args(["generate", "--json", "--threads", "2", "--model"])
        .arg(model_dir())
        .args(["--prompt", prompt, "-n", &n.to_string()])
        .args(["--temp", &temp.to_string(), "--seed", &seed.to_string()]);
    if let Some(b) = budget {
        let b = b.as_str().map_or(b.to_string(), str::to_string);
        cmd.args(["--kv-budget", &b]);
    }
    if let Some(p) = policy {
        cmd.args(["--kv-policy", p]);
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
fn a_request_with_its_own_budget_stays_bounded_and_others_are_unaffected() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(["serve", "--threads", "2", "--model"])
        .arg(model_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = Some(child.stdin.take().unwrap());
    let mut lines = String::new();
    for (id, prompt, n, temp, seed, budget, policy) in cases() {
        let mut r = json!({"id": id, "prompt": prompt, "max_tokens": n, "temperature": temp, "seed": seed, "stream": true});
        if let Some(b) = budget {
            r["kv_budget"] = b;
        }
        if let Some(p) = policy {
            r["kv_policy"] = json!(p);
        }
        lines += &(r.to_string() + "\n");
    }
    let bad = [
        ("b1", json!({"kv_budget": -5}), "invalid_value", "kv_budget"),
        (
            "b2",
            json!({"kv_budget": "lots"}),
            "invalid_value",
            "kv_budget",
        ),
        (
            "b3",
            json!({"kv_budget": 200, "kv_policy": "lru"}),
            "invalid_value",
            "unknown KV policy `lru`",
        ),
        (
            "b4",
            json!({"kv_budget": true}),
            "invalid_type",
            "kv_budget",
        ),
        (
            "b5",
            json!({"kv_budget": 100}),
            "invalid_value",
            "at least 132 tokens",
        ),
        (
            "b6",
            json!({"kv_budget": 200, "kv_policy": "full"}),
            "invalid_value",
            "takes no `kv_budget`",
        ),
        (
            "b7",
            json!({"kv_policy": "h2o"}),
            "invalid_value",
            "needs a `kv_budget`",
        ),
        ("b8", json!({"kv_policy": 2}), "invalid_type", "kv_policy"),
    ];
    for (id, extra, _, _) in &bad {
        let mut r = json!({"id": id, "prompt": "x", "max_tokens": 300});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        lines += &(r.to_string() + "\n");
    }
    stdin.as_mut().unwrap().write_all(lines.as_bytes()).unwrap();

    let (mut texts, mut errors, mut stats) =
        (HashMap::<String, String>::new(), HashMap::new(), None);
    let mut long_chunks = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["object"] == "edgemoe.ready" {
            continue;
        }
        if v["object"] == "edgemoe.stats" {
            stats = Some(v);
            stdin = None; // end of input: the server finishes what runs and exits
            continue;
        }
        if let Some(e) = v.get("error") {
            errors.insert(v["id"].as_str().unwrap().to_string(), e.clone());
            continue;
        }
        let id = v["id"].as_str().unwrap().to_string();
        let text = v["choices"][0]["text"].as_str().unwrap();
        texts.entry(id.clone()).or_default().push_str(text);
        if id == "long" {
            long_chunks += usize::from(!text.is_empty());
            // Well past the budget of 150, while it still runs, ask for stats (at its end at
            // the latest, so the test cannot wait forever).
            let ended = !v["choices"][0]["finish_reason"].is_null();
            if long_chunks == 250 || ended {
                if let Some(s) = stdin.as_mut() {
                    s.write_all(b"{\"op\":\"stats\"}\n").unwrap();
                }
                if ended {
                    stdin = None;
                }
            }
        }
    }
    assert!(child.wait().unwrap().success());

    for (id, _, code, says) in &bad {
        let e = errors
            .get(*id)
            .unwrap_or_else(|| panic!("{id} was not refused"));
        assert_eq!(e["code"], *code, "{id}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{id}: {e}");
    }
    let stats = stats.expect("no stats reply");
    let kv = stats["kv"].as_array().unwrap();
    let long = kv
        .iter()
        .find(|r| r["id"] == "long")
        .unwrap_or_else(|| panic!("{stats}"));
    let model = edgemoe::load_model(Some(&model_dir())).unwrap();
    let per_token = bytes_per_token(
        model.config.num_layers,
        model.config.kv_layout(),
        Policy::Lazy,
    );
    assert_eq!(
        (long["policy"].as_str(), long["budget"].as_u64()),
        (Some("lazy"), Some(150))
    );
    assert!(long["slots"].as_u64().unwrap() <= 150, "{long}");
    assert_eq!(
        long["allocated_bytes"].as_u64().unwrap(),
        150 * per_token,
        "{long}"
    );

    for c in cases() {
        let got = texts
            .get(c.0)
            .unwrap_or_else(|| panic!("no text for {}", c.0));
        assert_eq!(got, &generate(&c), "{}: serve and generate differ", c.0);
    }
}
