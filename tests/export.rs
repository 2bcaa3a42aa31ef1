//! `edgemoe export` writes a Hugging Face checkpoint that edgemoe reads back as the same model:
//! in f32 the very same logits, bit for bit, for the built-in model and every architecture
//! fixture; in bf16/f16 the logits of the original model with each weight rounded to that
//! type (rounded independently here, with the `half` crate), again bit for bit.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::model::arch;
use edgemoe::model::export::{export, ExportDtype};
use edgemoe::model::hf::HfCheckpoint;
use edgemoe::model::safetensors::{Dtype, SafetensorsFile};
use edgemoe::model::tokenizer::Tokenizer;
use edgemoe::model::weights::{Stored, TensorSource, WeightForm};
use edgemoe::quant::{self, Method, QuantOptions};
use edgemoe::Model;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const TEXT: &str = "In the beginning God created the heaven and the earth.";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The model with f32 weights (a bf16 checkpoint widened), so that it and its f32 export run
/// the same kernels and must agree bit for bit.
fn load(spec: &str) -> Model {
    let path = Path::new(spec);
    if path.is_dir() {
        Model::load_f32(path).unwrap()
    } else {
        edgemoe::load_model(Some(path)).unwrap()
    }
}

fn export_to(model: &Model, dir: &Path, dtype: ExportDtype) {
    export(model, dir, dtype, &mut |_, _| {}).unwrap();
}

/// Prefill logits of every position of `tokens[..n-3]`, then three single-token decode steps.
fn logits(model: Arc<Model>, tokens: &[u32]) -> Vec<f32> {
    let engine = Engine::new(model, 2).unwrap();
    let mut cache = engine.new_cache();
    let split = tokens.len() - 3;
    let mut out = engine
        .forward(&mut [BatchItem {
            tokens: &tokens[..split],
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap()
        .remove(0);
    for t in split..tokens.len() {
        let step = engine
            .forward(&mut [BatchItem {
                tokens: &tokens[t..t + 1],
                cache: &mut cache,
                logits: Logits::Last,
            }])
            .unwrap();
        out.extend_from_slice(&step[0]);
    }
    out
}

fn assert_bit_identical(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let differ = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differ, 0, "{what}: {differ} of {} logits differ", got.len());
}

/// Largest |difference| over the largest |logit|.
fn relative_worst(got: &[f32], want: &[f32]) -> f32 {
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    worst / max
}

/// f32 export → reload: same config, same tokenization, bit-identical logits.
fn f32_round_trip(spec: &str) {
    let original = load(spec);
    let tmp = tempfile::tempdir().unwrap();
    export_to(&original, tmp.path(), ExportDtype::F32);
    let reloaded = Model::load(tmp.path()).unwrap();
    assert_eq!(reloaded.config, original.config, "{spec}: config");
    let tokens = original.tokenizer.encode(TEXT, false).unwrap();
    assert_eq!(
        reloaded.tokenizer.encode(TEXT, false).unwrap(),
        tokens,
        "{spec}: tokenizer"
    );
    assert_eq!(
        reloaded.tokenizer.decode(&tokens),
        original.tokenizer.decode(&tokens)
    );
    let (a, b) = (
        logits(Arc::new(original), &tokens),
        logits(Arc::new(reloaded), &tokens),
    );
    assert_bit_identical(spec, &b, &a);
}

#[test]
fn builtin_default_f32_export_is_bit_identical() {
    f32_round_trip("builtin:default");
}

#[test]
fn every_architecture_fixture_f32_export_is_bit_identical() {
    for name in [
        "mixtral-tiny",
        "mixtral-tiny-bf16-sharded",
        "qwen2moe-tiny",
        "qwen2moe-tiny-normtopk",
        "opt-tiny",
        "qwen3moe-tiny",
        "qwen3moe-tiny-step2",
        "olmoe-tiny",
        "olmoe-tiny-normtopk",
        "granitemoe-tiny",
        "granitemoeshared-tiny",
        "glm4moe-tiny",
        "glm4moe-tiny-plain",
        "gptoss-tiny",
        "gptoss-tiny-legacy",
        "deepseekv2-tiny",
        "deepseekv3-tiny",
        "deepseekv3-tiny-plain",
        "opt-tiny-proj",
    ] {
        f32_round_trip(fixture(name).to_str().unwrap());
    }
}

/// Tensors of a checkpoint rounded to a 16-bit float type on the way out.
struct Rounded<'a> {
    inner: &'a HfCheckpoint,
    round: fn(f32) -> f32,
}

impl TensorSource for Rounded<'_> {
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }

    fn stored(&self, name: &str, shape: &[usize], why: &str) -> edgemoe::Result<Stored> {
        let v = self.inner.tensor(name, shape, why)?;
        Ok(Stored::F32(
            v.into_iter().map(self.round).collect::<Vec<_>>().into(),
        ))
    }
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// A 16-bit export holds exactly the rounded f32 values, and its logits are those of the
/// original model with rounded weights, bit for bit: that is the check.
///
/// Against the unrounded model the logits differ by what 8 (bf16) or 11 (f16) mantissa bits
/// lose, a relative error up to 2^-9 or 2^-12 per weight. In a dense model that stays small
/// (`tol`); in an MoE model a rounding that changes which experts a router picks for a token
/// changes that token's logits by O(1) (builtin:default in bf16: 0.17 of max|logit|), so no
/// small tolerance holds there and the difference is only printed.
fn half_round_trip(spec: &str, dtype: ExportDtype, round: fn(f32) -> f32, tol: Option<f32>) {
    let original = load(spec);
    let tmp = tempfile::tempdir().unwrap();
    let (f32_dir, half_dir) = (tmp.path().join("f32"), tmp.path().join("half"));
    export_to(&original, &f32_dir, ExportDtype::F32);
    export_to(&original, &half_dir, dtype);

    let full = SafetensorsFile::open(&f32_dir.join("model.safetensors")).unwrap();
    let half = SafetensorsFile::open(&half_dir.join("model.safetensors")).unwrap();
    assert_eq!(
        full.tensors().keys().collect::<Vec<_>>(),
        half.tensors().keys().collect::<Vec<_>>()
    );
    for (name, info) in full.tensors() {
        let h = half.info(name).unwrap();
        let want = match dtype {
            ExportDtype::Bf16 => Dtype::BF16,
            _ => Dtype::F16,
        };
        assert_eq!((h.dtype, &h.shape), (want, &info.shape), "{name}");
        let rounded: Vec<f32> = full
            .read_f32(name)
            .unwrap()
            .into_iter()
            .map(round)
            .collect();
        let stored = half.read_f32(name).unwrap();
        assert_bit_identical(name, &stored, &rounded);
    }

    let ckpt = HfCheckpoint::open(&f32_dir).unwrap();
    let config = original.config.clone();
    let reference = Model {
        weights: arch::load_weights(
            &config,
            &Rounded {
                inner: &ckpt,
                round,
            },
            WeightForm::F32,
        )
        .unwrap(),
        config,
        tokenizer: Tokenizer::Bytes,
        source: format!("{spec}, rounded"),
    };
    // Widened to f32, the export runs exactly the rounded model.
    let widened = Model::load_f32(&half_dir).unwrap();
    assert_eq!(widened.config, original.config);
    let tokens = original.tokenizer.encode(TEXT, false).unwrap();
    let want = logits(Arc::new(reference), &tokens);
    assert_bit_identical(spec, &logits(Arc::new(widened), &tokens), &want);
    // As stored (the half-precision kernels), it differs from that only in summation order:
    // for a dense model within 1e-4 of max|logit| (as the transformers checks); an MoE router
    // may pick other experts for a token on a near tie, so there the figure is only printed.
    let got = logits(Arc::new(Model::load(&half_dir).unwrap()), &tokens);
    let kernels = relative_worst(&got, &want);
    eprintln!("{spec} {dtype:?}: half kernels vs rounded f32 model: {kernels:.2e}");
    if tol.is_some() {
        assert!(kernels < 1e-4, "{spec}: half kernels differ by {kernels}");
    }
    let rel = relative_worst(&got, &logits(Arc::new(original), &tokens));
    eprintln!("{spec} {dtype:?}: worst |logit - f32 logit| / max|logit| = {rel:.2e}");
    if let Some(tol) = tol {
        assert!(rel < tol, "{spec} {dtype:?}: {rel} ≥ {tol}");
    }
}

#[test]
fn bf16_export_is_the_bf16_rounded_model() {
    half_round_trip("builtin:default", ExportDtype::Bf16, bf16_round, None);
    let mixtral = fixture("mixtral-tiny");
    half_round_trip(
        mixtral.to_str().unwrap(),
        ExportDtype::Bf16,
        bf16_round,
        None,
    );
    // Dense: 30 · 2^-9 allows the per-weight error to add up over a few products per layer.
    let opt = fixture("opt-tiny");
    half_round_trip(
        opt.to_str().unwrap(),
        ExportDtype::Bf16,
        bf16_round,
        Some(0.06),
    );
}

#[test]
fn f16_export_is_the_f16_rounded_model() {
    let opt = fixture("opt-tiny-proj");
    // Dense: 30 · 2^-12 (as for bf16 above).
    half_round_trip(
        opt.to_str().unwrap(),
        ExportDtype::F16,
        f16_round,
        Some(0.0075),
    );
}

/// A quantized model exports its int8 weights dequantized: the f32 model its kernels
/// approximate, exactly `q · scale` per weight.
#[test]
fn quantized_model_exports_dequantized_weights() {
    let model = Model::load(&fixture("mixtral-tiny")).unwrap();
    let opts = QuantOptions {
        threads: 2,
        ..QuantOptions::new(Method::Rtn, &model)
    };
    let (q, _) = quant::quantize(model, &[], 64, &opts, |_, _, _| {}).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    export_to(&q, tmp.path(), ExportDtype::F32);
    let file = SafetensorsFile::open(&tmp.path().join("model.safetensors")).unwrap();
    let lin = &q.weights.layers[1].attn.k;
    let m = match &lin.weight {
        edgemoe::model::weights::LinearWeight::Int8(m) => m,
        other => panic!("{} is not int8: {other:?}", lin.name),
    };
    let stored = file.read_f32(&format!("{}.weight", lin.name)).unwrap();
    let k = lin.in_features;
    for (j, row) in stored.chunks(k).enumerate() {
        for (i, &w) in row.iter().enumerate() {
            assert_eq!(
                w,
                f32::from(m.row(j)[i]) * m.scales[j],
                "{} [{j}, {i}]",
                lin.name
            );
        }
    }
    let reloaded = Model::load(tmp.path()).unwrap();
    let tokens = q.tokenizer.encode(TEXT, false).unwrap();
    let a = logits(Arc::new(q), &tokens);
    let b = logits(Arc::new(reloaded), &tokens);
    // W8A8 also rounds the activations, which the f32 export does not.
    let rel = relative_worst(&b, &a);
    eprintln!("int8 model vs its dequantized export: {rel:.2e}");
    assert!(rel < 0.05, "{rel}");
}

#[test]
fn cli_exports_a_builtin_model_and_refuses_a_sharded_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_edgemoe");
    let out = Command::new(exe)
        .args([
            "export",
            "--model",
            "builtin:default",
            "--dtype",
            "bf16",
            "--out",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("127 tensors"), "{stdout}");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(tmp.path().join(f).is_file(), "{f}");
    }
    let tok = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 258);

    std::fs::write(tmp.path().join("model.safetensors.index.json"), "{}").unwrap();
    let out = Command::new(exe)
        .args(["export", "--model", "builtin:default", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error:") && stderr.contains("index.json"),
        "{stderr}"
    );
}

/// A rotated tied model (its head reads the final norm through `R·diag(γ)·Rᵀ`) exports the
/// head as its own matrix, table times transform, for transformers, which has no such
/// transform: the reloaded checkpoint is untied and computes the same logits as the rotated
/// model (in f32 to float rounding, quantized as the dequantized weights do).
#[test]
fn a_tied_rotated_model_exports_its_head_untied() {
    for (keep_f32, tolerance) in [(true, 1e-5), (false, 0.05)] {
        let model = Model::load(&fixture("llama-tiny")).unwrap();
        let opts = QuantOptions {
            threads: 2,
            keep_f32: if keep_f32 {
                vec![String::new()]
            } else {
                vec![]
            },
            head: if keep_f32 {
                quant::HeadQuant::F32
            } else {
                quant::HeadQuant::WeightOnly
            },
            ..QuantOptions::new(Method::Rtn, &model)
        };
        let (q, _) = quant::quantize(model, &[], 64, &opts, |_, _, _| {}).unwrap();
        assert!(q.config.head_transform && q.weights.lm_head.is_none());
        let tmp = tempfile::tempdir().unwrap();
        export_to(&q, tmp.path(), ExportDtype::F32);
        let reloaded = Model::load(tmp.path()).unwrap();
        assert!(!reloaded.config.tie_word_embeddings && !reloaded.config.head_transform);
        assert!(reloaded.weights.lm_head.is_some());
        let tokens = q.tokenizer.encode(TEXT, false).unwrap();
        let a = logits(Arc::new(q), &tokens);
        let b = logits(Arc::new(reloaded), &tokens);
        let rel = relative_worst(&b, &a);
        eprintln!("tied rotated (f32 {keep_f32}) vs its export: {rel:.2e}");
        assert!(rel < tolerance, "{rel}");
        if keep_f32 {
            let original = Model::load(&fixture("llama-tiny")).unwrap();
            let rel = relative_worst(&b, &logits(Arc::new(original), &tokens));
            assert!(rel < tolerance, "export vs the unrotated model: {rel}");
        }
    }
}
