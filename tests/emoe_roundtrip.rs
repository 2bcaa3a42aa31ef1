//! A quantized model written to .emoe and loaded back computes exactly what it did in memory,
//! and the CLI accepts the .emoe wherever it accepts a checkpoint directory.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::quant::{self, store::write_emoe, Method, QuantOptions};
use edgemoe::Model;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
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
    let model = Model::load(&dir()).unwrap();
    let calib = model
        .tokenizer
        .encode(
            &std::fs::read_to_string(dir().join("calib.txt")).unwrap(),
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
