//! Chat templates rendered by edgemoe (minijinja) against transformers' `apply_chat_template`
//! on the same templates and conversations (tests/fixtures/chat/*.json, written by
//! tools/chat_template_reference.py): SmolLM2-135M-Instruct's real template, a stress template,
//! and the real templates of the MoE families (Qwen3, GPT-OSS, DeepSeek-V2 and V3.1, GLM-4.6,
//! Granite 3.0 and 3.3, OLMoE) over tools, documents, reasoning fields and template variables.
//! The prompts must be identical, byte for byte.

use edgemoe::serve::chat::{ChatInputs, ChatTemplate};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn read_json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir().join(name)).unwrap()).unwrap()
}

fn fixture() -> Value {
    read_json("smollm2.json")
}

/// Renders every case as the fixture gives it and compares with transformers' string.
fn check(t: &ChatTemplate, cases: &[Value], name: &str) {
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let inputs = ChatInputs {
            tools: case["tools"].as_array().map(Vec::as_slice),
            documents: case["documents"].as_array().map(Vec::as_slice),
            kwargs: case["kwargs"].as_object(),
        };
        if !case["error"].is_null() {
            // transformers raised: edgemoe must fail too, with the template's own message.
            let err = match t.render_with(messages, gen, inputs) {
                Ok(p) => panic!("{name} case {i}: rendered {p:?}, transformers raised"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("the chat template failed"), "{name} case {i}: {err}");
            if let Some(msg) = case["error"]["message"].as_str() {
                assert!(err.ends_with(msg), "{name} case {i}: {err}");
            }
            continue;
        }
        let got = t
            .render_with(messages, gen, inputs)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        let want = case["expected"].as_str().unwrap();
        if got != want {
            let at = got
                .bytes()
                .zip(want.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            let from = at.saturating_sub(80);
            panic!(
                "{name} case {i} differs at byte {at}:\n got: {:?}\nwant: {:?}",
                got.get(from..(at + 80).min(got.len())).unwrap_or(&got),
                want.get(from..(at + 80).min(want.len())).unwrap_or(want),
            );
        }
    }
}

/// The families' templates, each with the cases its features call for.
const FAMILIES: [&str; 8] = [
    "qwen3",
    "gpt-oss",
    "deepseek-v3.1",
    "deepseek-v2",
    "glm-4.6",
    "granite-3.0",
    "granite-3.3",
    "olmoe",
];

fn family(name: &str) -> (ChatTemplate, Value) {
    let f = read_json(&format!("{name}.json"));
    let source = std::fs::read_to_string(dir().join(f["template"].as_str().unwrap())).unwrap();
    let token = |k: &str| f[k].as_str().unwrap_or("").to_string();
    let mut t = ChatTemplate::new(&source, &token("bos_token"), &token("eos_token")).unwrap();
    t.fix_clock(f["now_unix"].as_i64().unwrap());
    (t, f)
}

#[test]
fn family_templates_match_transformers() {
    let mut total = 0;
    for name in FAMILIES {
        let (t, f) = family(name);
        let cases = f["cases"].as_array().unwrap();
        assert!(cases.len() >= 6, "{name}: {} cases", cases.len());
        check(&t, cases, name);
        total += cases.len();
    }
    eprintln!("{total} family cases equal transformers' prompts");
}

#[test]
fn rendering_matches_transformers() {
    let f = fixture();
    let (bos, eos) = (
        f["bos_token"].as_str().unwrap(),
        f["eos_token"].as_str().unwrap(),
    );
    let templates = f["templates"].as_array().unwrap();
    assert_eq!(templates.len(), 2);
    for t in templates {
        let name = t["name"].as_str().unwrap();
        let tmpl = ChatTemplate::new(t["template"].as_str().unwrap(), bos, eos).unwrap();
        check(&tmpl, t["cases"].as_array().unwrap(), name);
    }
}

/// The template and special tokens read from the real GGUF render the same prompts (skipped
/// where the model is not fetched: tools/fetch_smollm2.sh).
#[test]
fn smollm2_gguf_template_is_read_and_matches() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipped: {} not fetched", path.display());
        return;
    }
    let tokenizer = edgemoe::model::gguf::GgufFile::open(&path)
        .unwrap()
        .tokenizer()
        .unwrap();
    let t = ChatTemplate::for_model(&path, &tokenizer)
        .unwrap()
        .expect("the SmolLM2 GGUF carries a chat template");
    let f = fixture();
    check(
        &t,
        f["templates"][0]["cases"].as_array().unwrap(),
        "smollm2 (gguf)",
    );
}

#[test]
fn template_errors_are_clear() {
    let err = ChatTemplate::new("{% for %}", "", "")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("chat template does not compile"), "{err}");
    let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
    let err = t.render(&[], true).unwrap_err().to_string();
    assert!(err.contains("roles must alternate"), "{err}");
}
