//! Chat templates rendered by edgemoe (minijinja) against transformers' `apply_chat_template`
//! on the same templates and conversations (tests/fixtures/chat/smollm2.json, written by
//! tools/chat_template_reference.py): SmolLM2-135M-Instruct's real template and a stress
//! template using whitespace control, namespaces, loop filters and Python string methods.
//! The prompts must be identical, byte for byte.

use edgemoe::serve::chat::ChatTemplate;
use serde_json::Value;
use std::path::PathBuf;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/smollm2.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn check(t: &ChatTemplate, cases: &[Value], name: &str) {
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(messages, gen).unwrap();
        assert_eq!(got, case["expected"].as_str().unwrap(), "{name} case {i}");
    }
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
