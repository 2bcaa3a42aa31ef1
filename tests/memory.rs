//! Weights stay where they are stored: a bf16 checkpoint's matrices and an .emoe's int8 ones are
//! used in place from the file maps (nothing copied, nothing widened), an .emoe's experts are not
//! read at load, and a corrupt expert block is caught the first time the expert runs.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::model::weights::{Ffn, LinearWeight};
use edgemoe::quant::{self, store::write_emoe, Method, QuantOptions};
use edgemoe::Model;
use std::path::PathBuf;
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn forward(model: Arc<Model>, tokens: &[u32]) -> edgemoe::Result<Vec<f32>> {
    let engine = Engine::new(model, 1)?;
    let mut cache = engine.new_cache();
    Ok(engine
        .forward(&mut [BatchItem {
            tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])?
        .remove(0))
}

#[test]
fn bf16_checkpoint_runs_from_its_map() {
    let model = Model::load(&fixture("mixtral-tiny-bf16-sharded")).unwrap();
    for lin in model.weights.linears() {
        match &lin.weight {
            LinearWeight::Half(_, w) => assert!(w.is_mapped(), "{} was copied", lin.name),
            other => panic!("{} is held as {other:?}, not as stored bf16", lin.name),
        }
    }
    let mem = model.weight_memory();
    // Only norms (f32 copies of tiny vectors) are owned.
    assert!(
        mem.owned_bytes * 50 < mem.mapped_bytes,
        "owned {} of mapped {}",
        mem.owned_bytes,
        mem.mapped_bytes
    );
    // The quantizer's form widens to f32: the same matrices, as row-major f32.
    let f32_model = Model::load_f32(&fixture("mixtral-tiny-bf16-sharded")).unwrap();
    let (a, b) = (
        &model.weights.layers[0].attn.q,
        &f32_model.weights.layers[0].attn.q,
    );
    assert!(matches!(b.weight, LinearWeight::F32Rows(_)));
    assert_eq!(a.f32_rows(), b.f32_rows());
}

/// The trained fixture quantized (RTN: fast) into an .emoe under a temp dir.
fn quantized_store() -> (tempfile::TempDir, PathBuf) {
    let model = Model::load(&fixture("trained-moe")).unwrap();
    let opts = QuantOptions {
        threads: 1,
        ..QuantOptions::new(Method::Rtn, &model)
    };
    let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.emoe");
    write_emoe(&q, serde_json::json!({"method": "rtn"}), &path).unwrap();
    (tmp, path)
}

#[test]
fn emoe_int8_weights_are_used_in_place() {
    let (_tmp, path) = quantized_store();
    let model = Model::load(&path).unwrap();
    let mut int8 = 0;
    for lin in model.weights.linears() {
        if let LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) = &lin.weight {
            assert!(m.data.is_mapped() && m.scales.is_mapped() && m.row_sums.is_mapped());
            int8 += 1;
        }
    }
    assert!(int8 > 0);
    let mem = model.weight_memory();
    assert!(mem.owned_bytes * 20 < mem.mapped_bytes, "{mem:?}");
}

#[test]
fn corrupt_expert_block_fails_when_the_expert_first_runs() {
    let (_tmp, path) = quantized_store();
    let file = edgemoe::model::emoe::EmoeFile::open(&path).unwrap();
    let block = file.expert_blocks()[5].clone();
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[block.offset as usize + 100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    // Opens: expert blocks are not read at load.
    let model = Arc::new(Model::load(&path).unwrap());
    let Ffn::Moe(moe) = &model.weights.layers[block.layer].ffn else {
        panic!("the trained fixture is all MoE")
    };
    let err = moe.experts[block.expert]
        .ensure_verified()
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    // A forward pass long enough to route to every expert fails with that error, not a panic.
    let tokens: Vec<u32> = (0..200).map(|i| (i * 37 % 2000) as u32).collect();
    let err = forward(model, &tokens).unwrap_err().to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains("expert block"),
        "{err}"
    );
}

/// `generate --json` and serve's stats report where the weights live and the resident set.
#[test]
fn generate_and_serve_report_memory() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_edgemoe");
    let model = fixture("mixtral-tiny-bf16-sharded");
    let out = Command::new(bin)
        .args(["generate", "--json", "-n", "4", "--prompt", "hi", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for report in [&v["memory_at_load"], &v["memory"]] {
        assert!(report["weights_mapped_bytes"].as_u64().unwrap() > 0, "{v}");
        assert!(report["rss_bytes"].as_u64().unwrap() > 0, "{v}");
    }
    assert!(v["memory"]["kv_bytes"].as_u64().unwrap() > 0, "{v}");

    let mut child = Command::new(bin)
        .args(["serve", "--model"])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"op\":\"stats\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stats = lines
        .iter()
        .find(|l| l["object"] == "edgemoe.stats")
        .expect("a stats line");
    assert!(stats["memory"]["weights_mapped_bytes"].as_u64().unwrap() > 0);
    assert!(stats["memory"]["peak_rss_bytes"].as_u64().unwrap() > 0);
}
