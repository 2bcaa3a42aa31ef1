//! edgemoe's logits against Hugging Face transformers' (the independent reference), for every
//! architecture fixture, in one prefill and token by token through the KV cache.
//!
//! Tolerance: 1e-4 of the largest |logit|. Both sides compute in f32; what differs is summation
//! order (blocked SIMD dot products vs. torch's GEMM), which moves a logit by ~1e-6 relative.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::model::config::ModelConfig;
use edgemoe::model::safetensors::SafetensorsFile;
use edgemoe::model::weights::LinearWeight;
use edgemoe::quant::{self, Method, QuantOptions};
use edgemoe::Model;
use std::path::Path;
use std::sync::Arc;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    tokens: Vec<u32>,
    logits: Vec<f32>,
}

fn reference(name: &str) -> Reference {
    let f = SafetensorsFile::open(&fixture(name).join("reference.safetensors")).unwrap();
    Reference {
        tokens: f
            .read_i64("input_ids")
            .unwrap()
            .into_iter()
            .map(|t| t as u32)
            .collect(),
        logits: f.read_f32("logits").unwrap(),
    }
}

fn assert_close(name: &str, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name} {what}: length");
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = 1e-4 * max;
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| ((g - w).abs(), i))
        .fold((0f32, 0), |a, (d, i)| if d > a.0 { (d, i) } else { a });
    eprintln!("{name} {what}: worst {worst:.3e} tol {tol:.3e}");
    assert!(
        worst <= tol,
        "{name} {what}: max |diff| {worst} at {at} > {tol} (max |logit| {max})"
    );
}

fn check(name: &str) {
    check_model(name, &fixture(name));
}

/// `model` (a checkpoint directory or file) against the reference logits of fixture `name`.
fn check_model(name: &str, model: &Path) {
    check_loaded(name, Model::load(model).unwrap());
}

/// `model` (loaded, or derived from a fixture) against the reference logits of fixture `name`.
fn check_loaded(name: &str, model: Model) {
    let model = Arc::new(model);
    let vocab = model.config.vocab_size;
    let engine = Engine::new(model, 2).unwrap();
    let r = reference(name);

    let mut cache = engine.new_cache();
    let prefill = engine
        .forward(&mut [BatchItem {
            tokens: &r.tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap();
    assert_close(name, "prefill", &prefill[0], &r.logits);

    // Token by token: first a 5-token prefill, then one token per step.
    let mut cache = engine.new_cache();
    let mut got = engine
        .forward(&mut [BatchItem {
            tokens: &r.tokens[..5],
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap()
        .remove(0);
    for t in 5..r.tokens.len() {
        let step = engine
            .forward(&mut [BatchItem {
                tokens: &r.tokens[t..t + 1],
                cache: &mut cache,
                logits: Logits::Last,
            }])
            .unwrap();
        got.extend_from_slice(&step[0]);
    }
    assert_eq!(got.len(), r.tokens.len() * vocab);
    assert_close(name, "decode", &got, &r.logits);
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral-tiny");
}

#[test]
fn mixtral_bf16_sharded_matches_transformers() {
    check("mixtral-tiny-bf16-sharded");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check("qwen2moe-tiny");
}

#[test]
fn qwen2_moe_norm_topk_matches_transformers() {
    check("qwen2moe-tiny-normtopk");
}

/// Per-head q/k norms, head_dim 32 apart from hidden / heads, a dense layer from
/// `mlp_only_layers`, renormalized top-k.
#[test]
fn qwen3_moe_matches_transformers() {
    check("qwen3moe-tiny");
}

/// `decoder_sparse_step 2` (only layer 1 has experts), top-k not renormalized, legacy config.
#[test]
fn qwen3_moe_sparse_step_matches_transformers() {
    check("qwen3moe-tiny-step2");
}

/// q/k norms over the whole projection and `clip_qkv 1.5`, which moves transformers' logits
/// by up to 2 (tools/make_fixtures.py checks it), so ignoring it would fail here.
#[test]
fn olmoe_clip_qkv_matches_transformers() {
    check("olmoe-tiny");
}

/// No clip, renormalized top-k, legacy config.
#[test]
fn olmoe_norm_topk_matches_transformers() {
    check("olmoe-tiny-normtopk");
}

/// Rotation and SmoothQuant's folds, every linear kept f32, leave these models as they were:
/// the q/k norms come after the projections the folds touch, and under clip_qkv the v → o
/// fold and the per-head rotation of v are left out (a clamp commutes with neither). Granite's
/// multipliers are scalars, which commute with both; its biases are rotated with their rows.
#[test]
fn rotation_and_smoothing_folds_are_exact_with_qk_norms_and_clip() {
    for name in [
        "qwen3moe-tiny",
        "olmoe-tiny",
        "granitemoe-tiny",
        "granitemoeshared-tiny",
        "glm4moe-tiny",
        "glm4moe-tiny-plain",
        "gptoss-tiny",
    ] {
        let model = Model::load(&fixture(name)).unwrap();
        let r = reference(name);
        let opts = QuantOptions {
            threads: 2,
            rotate: true,
            keep_f32: vec![String::new()],
            head: quant::HeadQuant::F32,
            ..QuantOptions::new(Method::Smooth, &model)
        };
        let calib = &r.tokens;
        let (folded, summary) =
            quant::quantize(model, calib, calib.len(), &opts, |_, _, _| {}).unwrap();
        assert!(!summary.alphas.is_empty(), "{name}: nothing was smoothed");
        check_loaded(name, folded);
    }
}

/// Stacked experts read as rows, the four scalars (embedding 12, attention 0.6 in place of
/// 1/sqrt(16), residual 0.22, logits / 6: tools/make_fixtures.py checks each moves the
/// logits), q/k/v/o biases, tied head, legacy config.
#[test]
fn granite_moe_matches_transformers() {
    check("granitemoe-tiny");
}

/// The ungated shared MLP (stacked gate/up rows), untied head, bf16 shards.
#[test]
fn granite_moe_shared_matches_transformers() {
    check("granitemoeshared-tiny");
}

/// A Granite store keeps each expert under its own names (the loader's other path): written
/// plain, it reads back as transformers' model; RTN-quantized, its routers stay f32 as
/// every family's do.
#[test]
fn granite_moe_stores_match_transformers() {
    for name in ["granitemoe-tiny", "granitemoeshared-tiny"] {
        let model = Model::load(&fixture(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("plain.emoe");
        edgemoe::quant::store::write_emoe(&model, serde_json::json!({"method": "none"}), &path)
            .unwrap();
        check_model(name, &path);
        let opts = QuantOptions {
            threads: 1,
            ..QuantOptions::new(Method::Rtn, &model)
        };
        let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
        for layer in &q.weights.layers {
            let edgemoe::model::weights::Ffn::Moe(b) = &layer.ffn else {
                panic!("{name}: every Granite layer has experts")
            };
            assert!(b.router.f32_rows().is_some(), "{name}: router quantized");
            assert!(
                b.experts[0].up.f32_rows().is_none(),
                "{name}: experts kept f32"
            );
        }
    }
}

/// Grouped sigmoid routing (4 groups of 2, the best 2; correction bias; renormalized;
/// `routed_scaling_factor` 2.5, which moves the logits by up to 2.7), a leading dense layer,
/// the shared expert, per-head q/k norms, q/k/v biases, RoPE on half of each head.
#[test]
fn glm4_moe_matches_transformers() {
    check("glm4moe-tiny");
}

/// One group, top-k not renormalized, every layer MoE, a shared expert of two experts' width,
/// no q/k norms or biases, RoPE on a quarter of each head; legacy config.
#[test]
fn glm4_moe_plain_matches_transformers() {
    check("glm4moe-tiny-plain");
}

/// Attention sinks, q/k/v/o biases, sliding-window layers (6 tokens) between full ones, YaRN
/// RoPE with its attention factor, a router with a bias, clamped SwiGLU experts whose gate and
/// up columns are interleaved in the stacked checkpoint tensors (tools/make_fixtures.py checks
/// that the window, the clamp limit and YaRN each move the logits).
#[test]
fn gpt_oss_matches_transformers() {
    check("gptoss-tiny");
}

/// bf16 (the transposed experts kept bf16); full then sliding layers (window 9), one KV head,
/// top-3, swiglu_alpha 1.2; legacy config (rope_scaling) with YaRN truncated by default.
#[test]
fn gpt_oss_legacy_matches_transformers() {
    let name = "gptoss-tiny-legacy";
    let model = Model::load(&fixture(name)).unwrap();
    let edgemoe::model::weights::Ffn::Moe(b) = &model.weights.layers[0].ffn else {
        panic!("every GPT-OSS layer has experts")
    };
    assert!(matches!(b.experts[0].gate.weight, LinearWeight::Half(..)));
    check_loaded(name, model);
}

/// The sinks matter to these fixtures: without them the logits leave the tolerance.
#[test]
fn gpt_oss_without_sinks_differs() {
    for name in ["gptoss-tiny", "gptoss-tiny-legacy"] {
        let mut model = Model::load(&fixture(name)).unwrap();
        for layer in &mut model.weights.layers {
            assert!(layer.attn.sinks.take().is_some(), "{name}: no sinks loaded");
        }
        let engine = Engine::new(Arc::new(model), 2).unwrap();
        let r = reference(name);
        let mut cache = engine.new_cache();
        let got = engine
            .forward(&mut [BatchItem {
                tokens: &r.tokens,
                cache: &mut cache,
                logits: Logits::All,
            }])
            .unwrap()
            .remove(0);
        let max = r.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&r.logits)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(worst > 1e-2 * max, "{name}: sinks change nothing ({worst})");
    }
}

/// A GPT-OSS store keeps each expert under its own names with its biases, and the sinks
/// beside the attention: written plain, it reads back as transformers' model; RTN-quantized,
/// its routers stay f32, its experts int8 with their biases, and its store reads back as it.
#[test]
fn gpt_oss_stores_match_transformers() {
    for name in ["gptoss-tiny", "gptoss-tiny-legacy"] {
        let model = Model::load(&fixture(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("plain.emoe");
        edgemoe::quant::store::write_emoe(&model, serde_json::json!({"method": "none"}), &path)
            .unwrap();
        check_model(name, &path);
        let opts = QuantOptions {
            threads: 1,
            ..QuantOptions::new(Method::Rtn, &model)
        };
        let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
        for layer in &q.weights.layers {
            let edgemoe::model::weights::Ffn::Moe(b) = &layer.ffn else {
                panic!("{name}: every GPT-OSS layer has experts")
            };
            assert!(b.router.f32_rows().is_some(), "{name}: router quantized");
            assert!(b.router.bias.is_some(), "{name}: router bias lost");
            let e = &b.experts[0];
            assert!(e.up.f32_rows().is_none(), "{name}: experts kept f32");
            assert!(e.down.bias.is_some(), "{name}: expert bias lost");
            assert!(layer.attn.sinks.is_some(), "{name}: sinks lost");
        }
        let path = tmp.path().join("rtn.emoe");
        edgemoe::quant::store::write_emoe(&q, serde_json::json!({"method": "rtn"}), &path).unwrap();
        // The quantized store reads back as the model it was written from.
        let tokens = reference(name).tokens;
        let [a, b] = [Arc::new(q), Arc::new(Model::load(&path).unwrap())].map(|m| {
            let engine = Engine::new(m, 2).unwrap();
            let mut cache = engine.new_cache();
            engine
                .forward(&mut [BatchItem {
                    tokens: &tokens,
                    cache: &mut cache,
                    logits: Logits::All,
                }])
                .unwrap()
                .remove(0)
        });
        assert_close(name, "rtn store", &b, &a);
    }
}

/// The released checkpoints' MXFP4 experts (`*_blocks` / `*_scales`, random bytes and
/// exponents): decoded to f32 they give the logits of transformers' own dequantization
/// (tools/make_gptoss_mxfp4_fixture.py); a direct run holds them as weight-only int8 rows
/// (one rounding of values already on a coarse grid: near, not equal).
#[test]
fn gpt_oss_mxfp4_experts_match_transformers() {
    let name = "gptoss-tiny-mxfp4";
    check_loaded(name, Model::load_f32(&fixture(name)).unwrap());
    let model = Model::load(&fixture(name)).unwrap();
    for layer in &model.weights.layers {
        let edgemoe::model::weights::Ffn::Moe(b) = &layer.ffn else {
            panic!("every GPT-OSS layer has experts")
        };
        for e in &b.experts {
            for lin in [&e.gate, &e.up, &e.down] {
                assert!(
                    matches!(lin.weight, LinearWeight::Int8WeightOnly(_)),
                    "{}: not int8",
                    lin.name
                );
            }
        }
    }
    // `quantize` reads the blocks in place and decodes a layer at a time: the same model as
    // quantizing the f32 decoding.
    let rtn = |model: Model| {
        let opts = QuantOptions {
            threads: 1,
            ..QuantOptions::new(Method::Rtn, &model)
        };
        Arc::new(
            quant::quantize(model, &[], 0, &opts, |_, _, _| {})
                .unwrap()
                .0,
        )
    };
    let r = reference(name);
    let [a, b] = [
        rtn(Model::load_in_place(&fixture(name)).unwrap()),
        rtn(Model::load_f32(&fixture(name)).unwrap()),
    ]
    .map(|m| {
        let engine = Engine::new(m, 2).unwrap();
        let mut cache = engine.new_cache();
        engine
            .forward(&mut [BatchItem {
                tokens: &r.tokens,
                cache: &mut cache,
                logits: Logits::All,
            }])
            .unwrap()
            .remove(0)
    });
    assert_eq!(
        a, b,
        "{name}: quantized from the blocks and from f32 differ"
    );
    // The direct run's int8 rows: near transformers' logits.
    let engine = Engine::new(Arc::new(model), 2).unwrap();
    let mut cache = engine.new_cache();
    let got = engine
        .forward(&mut [BatchItem {
            tokens: &r.tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap()
        .remove(0);
    let max = r.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&r.logits)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    eprintln!("{name} int8: worst {worst:.3e} of max |logit| {max:.3}");
    assert!(worst < 2e-2 * max, "{name} int8: {worst}");
}

/// Multi-head latent attention with q_proj, complex RoPE under YaRN (the softmax scale's
/// mscale²), values narrower than keys; softmax routing limited to the best 2 of 4 groups,
/// `routed_scaling_factor` 2.0; a leading dense layer, two experts' width of shared expert.
#[test]
fn deepseek_v2_matches_transformers() {
    check("deepseekv2-tiny");
}

/// Latent attention with the low-rank query (q_a_proj, q_a_layernorm, q_b_proj), biases on
/// q_a/kv_a/o, interleaved RoPE under YaRN whose cos/sin factor and softmax scale both differ
/// from 1; grouped sigmoid routing with the correction bias, renormalized, scaling 2.5.
#[test]
fn deepseek_v3_matches_transformers() {
    check("deepseekv3-tiny");
}

/// Rotate-half RoPE (`rope_interleave` false), no YaRN, values as wide as keys, one group,
/// top-k not renormalized, every layer MoE; legacy config.
#[test]
fn deepseek_v3_plain_matches_transformers() {
    check("deepseekv3-tiny-plain");
}

/// A DeepSeek model written to a plain store (q LoRA, latent norms, correction biases and all)
/// reads back as transformers' model (its quantized stores: tests/quant_accuracy.rs and
/// tests/families.rs).
#[test]
fn deepseek_stores_match_transformers() {
    for name in [
        "deepseekv2-tiny",
        "deepseekv3-tiny",
        "deepseekv3-tiny-plain",
    ] {
        let model = Model::load(&fixture(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("plain.emoe");
        edgemoe::quant::store::write_emoe(&model, serde_json::json!({"method": "none"}), &path)
            .unwrap();
        check_model(name, &path);
    }
}

#[test]
fn opt_matches_transformers() {
    check("opt-tiny");
}

#[test]
fn opt_post_norm_projected_matches_transformers() {
    check("opt-tiny-proj");
}

#[test]
fn llama_matches_transformers() {
    check("llama-tiny");
}

/// The same model as a llama.cpp-style GGUF (q/k rows permuted for ggml's RoPE, tokenizer in
/// the metadata) against transformers' logits of the checkpoint.
#[test]
fn llama_gguf_matches_transformers() {
    check_model("llama-tiny", &fixture("llama-tiny/llama-tiny.gguf"));
}

/// The MoE fixtures as llama.cpp lays them out in GGUF (tools/make_moe_gguf_fixtures.py: F32,
/// stacked `ffn_*_exps` experts, `ffn_gate_inp` routers, `{arch}.expert_*` keys) against
/// transformers' logits of the checkpoints. Mixtral is llama.cpp's `llama` arch with
/// `llama.expert_count` and q/k rows permuted; qwen2moe (shared expert, q/k/v biases, a dense
/// layer), qwen3moe (per-head q/k norms, a dense layer) and olmoe (whole q/k norms, clamp_kqv)
/// are stored in transformers' row order.
#[test]
fn moe_ggufs_match_transformers() {
    for name in [
        "mixtral-tiny",
        "qwen2moe-tiny",
        "qwen3moe-tiny",
        "olmoe-tiny",
    ] {
        let path = fixture(name).join(format!("{name}.gguf"));
        let (gguf, hf) = (
            Model::load(&path).unwrap(),
            Model::load(&fixture(name)).unwrap(),
        );
        // generation_config.json may add stop ids the converter does not carry over.
        let without_eos = |m: &Model| ModelConfig {
            eos_token_ids: vec![],
            ..m.config.clone()
        };
        assert_eq!(
            without_eos(&gguf),
            without_eos(&hf),
            "{name}: config from GGUF metadata"
        );
        check_loaded(name, gguf);
    }
}

/// The issue-27 families as llama.cpp lays them out in GGUF (tools/gguf_families.py, F32):
/// granitemoe (q/k rows permuted, the four scalars; with a shared MLP, GraniteMoeShared),
/// glm4moe (NextN-counting block_count, partial rotary, sigmoid groups, exp_probs_b),
/// deepseek2 as V2 and V3 (kv_b_proj split into attn_k_b / attn_v_b, and the older whole
/// attn_kv_b), gpt-oss (de-interleaved experts, sinks, windows, YaRN) — config equal to the
/// checkpoint's and logits to transformers', prefill and token by token; the bf16
/// GraniteMoeShared checkpoint also as a bf16 GGUF (its permuted q/k rows put back in 16
/// bits). YaRN's f64 fields
/// compare at f32: GGUF stores them as f32.
#[test]
fn family_ggufs_match_transformers() {
    for (name, file) in [
        ("granitemoe-tiny", "granitemoe-tiny.gguf"),
        ("granitemoeshared-tiny", "granitemoeshared-tiny.gguf"),
        ("granitemoeshared-tiny", "granitemoeshared-tiny.bf16.gguf"),
        ("glm4moe-tiny", "glm4moe-tiny.gguf"),
        ("deepseekv2-tiny", "deepseekv2-tiny.gguf"),
        ("deepseekv2-tiny", "deepseekv2-tiny.kvb.gguf"),
        ("deepseekv3-tiny", "deepseekv3-tiny.gguf"),
        ("gptoss-tiny", "gptoss-tiny.gguf"),
    ] {
        let path = fixture(name).join(file);
        let (gguf, hf) = (
            Model::load(&path).unwrap(),
            Model::load(&fixture(name)).unwrap(),
        );
        let comparable = |m: &Model| {
            let mut c = ModelConfig {
                eos_token_ids: vec![],
                ..m.config.clone()
            };
            if let Some(y) = c.options.yarn.as_mut() {
                let f32ed = |x: f64| f64::from(x as f32);
                y.factor = f32ed(y.factor);
                y.beta_fast = f32ed(y.beta_fast);
                y.beta_slow = f32ed(y.beta_slow);
                y.attention_factor = f32ed(y.attention_factor);
                y.mscale_all_dim = f32ed(y.mscale_all_dim);
            }
            c
        };
        assert_eq!(
            comparable(&gguf),
            comparable(&hf),
            "{file}: config from GGUF metadata"
        );
        check_loaded(name, gguf);
    }
}

/// Several sequences in one batched step give the same logits as each alone (DeepSeek's latent
/// attention and host routing, GPT-OSS's sinks and per-layer sliding windows too).
#[test]
fn batched_decode_matches_single_sequences() {
    for name in [
        "qwen2moe-tiny",
        "deepseekv2-tiny",
        "deepseekv3-tiny",
        "gptoss-tiny",
        "gptoss-tiny-legacy",
    ] {
        batched_decode_matches_single_sequences_of(name);
    }
}

fn batched_decode_matches_single_sequences_of(name: &str) {
    let model = Arc::new(Model::load(&fixture(name)).unwrap());
    let engine = Engine::new(model, 2).unwrap();
    let r = reference(name);
    let prompts: [&[u32]; 3] = [&r.tokens[..7], &r.tokens[3..12], &r.tokens[10..14]];
    let mut caches: Vec<_> = prompts.iter().map(|_| engine.new_cache()).collect();
    let mut items: Vec<BatchItem> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| BatchItem {
            tokens: p,
            cache: c,
            logits: Logits::Last,
        })
        .collect();
    let batched = engine.forward(&mut items).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let mut c = engine.new_cache();
        let alone = engine
            .forward(&mut [BatchItem {
                tokens: p,
                cache: &mut c,
                logits: Logits::Last,
            }])
            .unwrap();
        assert_close(name, &format!("batched item {i}"), &batched[i], &alone[0]);
    }
    // Then one decode step of all three together (each thread takes a group of sequences
    // through attention) against each sequence's own step: the very same bits.
    let next = [r.tokens[20], r.tokens[21], r.tokens[22]];
    let mut items: Vec<BatchItem> = caches
        .iter_mut()
        .zip(&next)
        .map(|(c, t)| BatchItem {
            tokens: std::slice::from_ref(t),
            cache: c,
            logits: Logits::Last,
        })
        .collect();
    let batched = engine.forward(&mut items).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let mut c = engine.new_cache();
        let mut step = |tokens: &[u32]| {
            engine
                .forward(&mut [BatchItem {
                    tokens,
                    cache: &mut c,
                    logits: Logits::Last,
                }])
                .unwrap()
        };
        step(p);
        let alone = step(&next[i..i + 1]);
        assert_eq!(batched[i], alone[0], "{name}: decode step of item {i}");
    }
}
