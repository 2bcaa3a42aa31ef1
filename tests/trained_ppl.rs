//! Each trained fixture's perplexity on its held-out text equals transformers' (recorded in
//! hf_ppl.json by tools/hf_ppl.py) within 0.1%, with the same windowing protocol: the Mixtral
//! (trained-moe), Qwen3-MoE and DeepSeek-V3 (tools/train_tiny_moe.py --arch …).

use edgemoe::engine::ppl::perplexity;
use edgemoe::{Engine, Model};
use std::path::Path;
use std::sync::Arc;

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf_ppl.json")).unwrap()).unwrap();
    let want = hf["ppl"].as_f64().unwrap();
    let ctx = hf["ctx"].as_u64().unwrap() as usize;
    let model = Arc::new(Model::load(&dir).unwrap());
    let text = std::fs::read_to_string(dir.join("heldout.txt")).unwrap();
    let tokens = model.tokenizer.encode(&text, false).unwrap();
    assert_eq!(
        tokens.len() as u64,
        hf["tokens"].as_u64().unwrap(),
        "{name}: tokenization differs from transformers'"
    );
    let engine = Engine::new(model, 2).unwrap();
    let got = perplexity(&engine, &tokens, ctx, |_, _| {}).unwrap();
    assert_eq!(got.windows as u64, hf["windows"].as_u64().unwrap());
    let rel = (got.ppl - want).abs() / want;
    eprintln!(
        "{name}: edgemoe ppl {:.6}, transformers {want:.6}, relative difference {rel:.2e}",
        got.ppl
    );
    assert!(rel < 1e-3, "{name}: ppl {} vs transformers {want}", got.ppl);
}

#[test]
fn trained_model_ppl_matches_transformers() {
    check("trained-moe");
}

#[test]
fn trained_qwen3moe_ppl_matches_transformers() {
    check("trained-qwen3moe");
}

#[test]
fn trained_deepseekv3_ppl_matches_transformers() {
    check("trained-deepseekv3");
}
