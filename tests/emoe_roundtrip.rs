//! A quantized model written to .emoe and loaded back computes exactly what it did in memory,
//! and the CLI accepts the .emoe wherever it accepts a checkpoint directory.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::quant::{self, store::write_emoe, Method, QuantOptions};
use edgemoe::Model;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

fn dir() -> PathBuf {
    fixture("trained-moe")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn logits(model: Arc<Model>, tokens: &[u32]) -> Vec<f32> {
    let engine = Engine::new(model, 2).unwrap();
    let mut cache = engine.new_cache();
    engine
        .forward(&mut [BatchItem {
            tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap()
        .remove(0)
}

#[test]
fn quantized_store_round_trips_exactly() {
    round_trip(&dir());
}

/// The same for the trained DeepSeek-V3 (latent attention: q_a_proj and both latent norms,
/// folded into by haq, in the store) and Qwen3-MoE.
#[test]
fn quantized_deepseekv3_and_qwen3moe_stores_round_trip_exactly() {
    round_trip(&fixture("trained-deepseekv3"));
    round_trip(&fixture("trained-qwen3moe"));
}

fn round_trip(dir: &std::path::Path) {
    let model = Model::load(dir).unwrap();
    let calib = model
        .tokenizer
        .encode(
            &std::fs::read_to_string(dir.join("calib.txt")).unwrap(),
            false,
        )
        .unwrap();
    let opts = QuantOptions {
        threads: 2,
        head: quant::HeadQuant::WeightOnly,
        ..QuantOptions::new(Method::Haq, &model)
    };
    let (q, _) = quant::quantize(model, &calib[..2048], 256, &opts, |_, _, _| {}).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("trained.emoe");
    write_emoe(&q, serde_json::json!({"method": "haq"}), &path).unwrap();
    let loaded = Model::load(&path).unwrap();
    let tokens = q
        .tokenizer
        .encode("And God said, Let there be light", false)
        .unwrap();
    assert_eq!(
        loaded
            .tokenizer
            .encode("And God said, Let there be light", false)
            .unwrap(),
        tokens
    );
    let (a, b) = (
        logits(Arc::new(q), &tokens),
        logits(Arc::new(loaded), &tokens),
    );
    assert_eq!(a, b, "logits differ after the .emoe round trip");

    let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args([
            "generate",
            "--json",
            "-n",
            "8",
            "--prompt",
            "In the beginning",
            "--model",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["completion_tokens"], 8);
}

/// A tied model quantized with rotation (the tied Llama fixture) stores its table once, with
/// no `lm_head` and the head transform beside the final norm, and computes exactly the same
/// after the round trip; the layout quantize wrote before (an untied copy of the table as the
/// head) is a whole int8 `vocab × hidden` matrix larger.
#[test]
fn a_tied_rotated_store_holds_one_table_and_round_trips_exactly() {
    let llama = || {
        Model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny"))
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let write = |mut model: Model, untie: bool, name: &str| {
        if untie {
            let mut head = model.weights.embed.clone();
            head.name = "lm_head".into();
            model.weights.lm_head = Some(head);
            model.config.tie_word_embeddings = false;
        }
        let opts = QuantOptions {
            threads: 2,
            ..QuantOptions::new(Method::Rtn, &model)
        };
        let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
        let path = tmp.path().join(name);
        write_emoe(&q, serde_json::json!({"method": "rtn"}), &path).unwrap();
        (q, path)
    };
    let (q, path) = write(llama(), false, "tied.emoe");
    let (_, old) = write(llama(), true, "untied.emoe");
    let file = edgemoe::model::emoe::EmoeFile::open(&path).unwrap();
    let h = file.header();
    assert!(h.config.tie_word_embeddings && h.config.head_transform);
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(!names.iter().any(|n| n.starts_with("lm_head")), "{names:?}");
    let g = h.get("model.norm.transform.weight").unwrap();
    assert_eq!(g.shape, [64, 64]);
    let big: Vec<&str> = h
        .tensors
        .iter()
        .filter(|t| t.shape.first() == Some(&512) && t.dtype == edgemoe::model::emoe::EmoeDtype::I8)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(big, ["model.embed_tokens.qweight"]);
    let (tied_len, old_len) = (
        std::fs::metadata(&path).unwrap().len(),
        std::fs::metadata(&old).unwrap().len(),
    );
    // The untied head's int8 rows (64-byte padded) and per-row scales and sums, less G.
    let saved = 512 * (64 + 4 + 4) - 64 * 64 * 4;
    eprintln!("tied {tied_len} bytes, untied {old_len}");
    assert!(old_len as i64 - tied_len as i64 >= saved as i64 - 4096);

    let loaded = Model::load(&path).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 512) as u32).collect();
    let (a, b) = (
        logits(Arc::new(q), &tokens),
        logits(Arc::new(loaded), &tokens),
    );
    assert_eq!(a, b, "logits differ after the .emoe round trip");
}
