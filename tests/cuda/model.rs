//! The whole model on the GPU against the CPU int8 engine: the trained fixture, quantized to
//! W8A8 (round-to-nearest, int8 head), scored on its held-out text by both. Top-1 agreement of
//! every position's logits must be at least 99% and the perplexities within 0.3% (the GPU sums
//! in another order, so a near-tie may flip; int8 rounding of activations amplifies that).
//! Token-by-token decoding (the device KV storage) is checked the same way.

use super::common::device;
use edgemoe::backend::{engine_for, Backend, BackendChoice};
use edgemoe::engine::ppl::perplexity;
use edgemoe::engine::{BatchItem, Logits};
use edgemoe::{Engine, Model};
use std::path::PathBuf;
use std::sync::Arc;

/// The fixture's directory: under EDGEMOE_ROOT when set (tools/gpu-check.sh runs this test
/// from a prebuilt executable in another checkout), else this checkout.
fn fixture_dir() -> PathBuf {
    std::env::var_os("EDGEMOE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/fixtures/trained-moe")
}

fn quantized_fixture() -> Arc<Model> {
    let dir = fixture_dir();
    let model = Model::load(&dir).expect("trained fixture");
    let mut opts = edgemoe::quant::QuantOptions::new(edgemoe::quant::Method::Rtn, &model);
    opts.head = edgemoe::quant::HeadQuant::W8A8;
    Arc::new(
        edgemoe::quant::quantize(model, &[], 0, &opts, |_, _, _| {})
            .expect("rtn")
            .0,
    )
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

fn all_logits(engine: &Engine, tokens: &[u32]) -> Vec<f32> {
    let mut cache = engine.new_cache();
    let mut batch = [BatchItem {
        tokens,
        cache: &mut cache,
        logits: Logits::All,
    }];
    engine.forward(&mut batch).expect("forward").remove(0)
}

#[test]
fn gpu_model_agrees_with_the_cpu_int8_engine() {
    if device("model").is_none() {
        return;
    }
    let model = quantized_fixture();
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("heldout.txt")).unwrap();
    let tokens = model.tokenizer.encode(&text, false).unwrap();
    let cpu = engine_for(model.clone(), BackendChoice::Cpu, 0).unwrap();
    let gpu = engine_for(model.clone(), BackendChoice::Cuda, 0).unwrap();
    assert_eq!(edgemoe::backend::Backend::name(gpu.backend()), "cuda");
    let v = model.config.vocab_size;

    // Prefill: every position of the first windows.
    let (ctx, windows) = (256, 8);
    let (mut same, mut total) = (0, 0);
    for w in tokens.chunks_exact(ctx).take(windows) {
        let (a, b) = (all_logits(&cpu, w), all_logits(&gpu, w));
        for (ra, rb) in a.chunks_exact(v).zip(b.chunks_exact(v)) {
            same += (argmax(ra) == argmax(rb)) as usize;
            total += 1;
        }
    }
    let prefill_agree = same as f64 / total as f64;

    // Decode: one token at a time through both engines' caches, fed the CPU's choice.
    let (mut cc, mut gc) = (cpu.new_cache(), gpu.new_cache());
    let (mut same_dec, steps) = (0, 128);
    let mut next = tokens[..32].to_vec();
    for _ in 0..steps {
        let a = cpu
            .forward(&mut [BatchItem {
                tokens: &next,
                cache: &mut cc,
                logits: Logits::Last,
            }])
            .unwrap()
            .remove(0);
        let b = gpu
            .forward(&mut [BatchItem {
                tokens: &next,
                cache: &mut gc,
                logits: Logits::Last,
            }])
            .unwrap()
            .remove(0);
        same_dec += (argmax(&a) == argmax(&b)) as usize;
        next = vec![argmax(&a) as u32];
    }
    let decode_agree = same_dec as f64 / steps as f64;

    let pc = perplexity(&cpu, &tokens, ctx, |_, _| {}).unwrap().ppl;
    let pg = perplexity(&gpu, &tokens, ctx, |_, _| {}).unwrap().ppl;
    let ppl_rel = (pg - pc).abs() / pc;
    println!(
        "MODEL_CHECK {}",
        serde_json::json!({
            "model": "tests/fixtures/trained-moe, W8A8 rtn (int8 head)",
            "prefill_positions": total, "prefill_top1_agreement": prefill_agree,
            "decode_steps": steps, "decode_top1_agreement": decode_agree,
            "ppl_cpu": pc, "ppl_gpu": pg, "ppl_rel_diff": ppl_rel, "ctx": ctx,
        })
    );
    assert!(
        prefill_agree >= 0.99,
        "prefill top-1 agreement {prefill_agree}"
    );
    assert!(
        decode_agree >= 0.99,
        "decode top-1 agreement {decode_agree}"
    );
    assert!(ppl_rel <= 0.003, "ppl {pg} on the GPU vs {pc} on the CPU");
}

/// Paging experts through RAM onto the plain CUDA backend would leave every expert ever paged on
/// the device (no GPU budget bounds it), so `--mem` without the expert tier is refused.
#[test]
fn paging_on_the_gpu_backend_is_refused() {
    if device("paging refused").is_none() {
        return;
    }
    // Paging reads expert blocks from an .emoe file.
    let dir = tempfile::tempdir().expect("temp dir");
    let tmp = dir.path().join("trained.emoe");
    let quantized = Arc::try_unwrap(quantized_fixture())
        .ok()
        .expect("sole owner");
    edgemoe::quant::store::write_emoe(&quantized, serde_json::json!({"method": "rtn"}), &tmp)
        .expect("write .emoe");
    drop(quantized);
    let model = Arc::new(Model::load(&tmp).expect("the .emoe"));
    let gpu = engine_for(model.clone(), BackendChoice::Cuda, 0).unwrap();
    let opts = edgemoe::experts::PagingOptions::with_budget(
        edgemoe::experts::budget::MemBudget::Percent(50.0),
    );
    let service = edgemoe::experts::ExpertService::paged(model, &opts).expect("paged service");
    let err = match gpu.with_experts(service) {
        Ok(_) => panic!("the CUDA backend accepted paged experts"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--mem") && err.contains("cuda"), "{err}");
}

/// Per-KV-head eviction needs an attention that masks each KV head by its own positions; the
/// CUDA backend keeps one position map per layer and refuses the option by name.
#[test]
fn per_head_eviction_is_refused_on_cuda() {
    use edgemoe::kv::{Budget, Granularity, KvOptions, Policy};
    if device("per-head eviction refused").is_none() {
        return;
    }
    let mut gpu = engine_for(quantized_fixture(), BackendChoice::Cuda, 0).unwrap();
    let opts = KvOptions {
        policy: Policy::Lazy,
        budget: Some(Budget::Tokens(200)),
        granularity: Granularity::Head,
        ..KvOptions::default()
    };
    let err = gpu.set_kv_options(opts).unwrap_err().to_string();
    assert!(
        err.contains("--kv-granularity head") && err.contains("CPU"),
        "{err}"
    );
    gpu.set_kv_options(KvOptions {
        granularity: Granularity::Layer,
        ..opts
    })
    .expect("layer granularity runs on CUDA");
}

/// The device expert tier at 100%, 50% and 25% of the routed experts × each placement: the GPU
/// engine (experts resident, fetched through the pinned ring on the copy stream, or run on the
/// CPU beside it) against the CPU int8 engine, with the model check's bounds (top-1 agreement
/// ≥ 99%, perplexity within 0.3%). Prints one `TIER_CHECK` JSON line per setting.
#[test]
fn gpu_expert_tier_agrees_with_the_cpu_int8_engine() {
    use edgemoe::backend::select::Selected;
    use edgemoe::experts::tier::{ExpertTier, Placement};
    if device("expert tier").is_none() {
        return;
    }
    let model = quantized_fixture();
    let text = std::fs::read_to_string(fixture_dir().join("heldout.txt")).unwrap();
    let tokens = model.tokenizer.encode(&text, false).unwrap();
    let (ctx, windows) = (256, 4);
    let tokens = &tokens[..ctx * windows];
    let cpu = engine_for(model.clone(), BackendChoice::Cpu, 0).unwrap();
    let pc = perplexity(&cpu, tokens, ctx, |_, _| {}).unwrap().ppl;
    let cpu_logits: Vec<Vec<f32>> = tokens
        .chunks_exact(ctx)
        .map(|w| all_logits(&cpu, w))
        .collect();
    let (layers, experts) = (model.config.num_layers, model.config.num_experts);
    let v = model.config.vocab_size;
    let mut failures = Vec::new();
    for percent in [100, 50, 25] {
        for placement in [Placement::Auto, Placement::Gpu, Placement::Cpu] {
            let slots = layers * experts * percent / 100;
            let backend = edgemoe::backend::cuda::CudaBackend::for_tier(&model).unwrap();
            let gpu = Engine::with_backend(model.clone(), Selected::Cuda(backend))
                .with_tier(ExpertTier::new(slots, layers, experts, placement, true), 0)
                .unwrap();
            let (mut same, mut total) = (0, 0);
            for (w, want) in tokens.chunks_exact(ctx).zip(&cpu_logits) {
                let got = all_logits(&gpu, w);
                for (ra, rb) in want.chunks_exact(v).zip(got.chunks_exact(v)) {
                    same += (argmax(ra) == argmax(rb)) as usize;
                    total += 1;
                }
            }
            let pg = perplexity(&gpu, tokens, ctx, |_, _| {}).unwrap().ppl;
            let agree = same as f64 / total as f64;
            let rel = (pg - pc).abs() / pc;
            let stats = gpu.tier().unwrap().stats();
            println!(
                "TIER_CHECK {}",
                serde_json::json!({
                    "percent_of_experts": percent, "slots": slots, "placement": placement,
                    "top1_agreement": agree, "ppl_cpu": pc, "ppl_gpu": pg, "ppl_rel_diff": rel,
                    "tier": stats, "rates": gpu.tier().unwrap().rates(),
                })
            );
            if agree < 0.99 || rel > 0.003 {
                failures.push(format!(
                    "{percent}% {placement:?}: agreement {agree}, ppl {rel}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Qwen3-MoE's per-head q/k norms (`norm_runs` on the device) and OLMoE's whole-projection
/// norms with `clip_qkv` (`clamp`, through the host) on the GPU against the CPU engine, f32
/// weights, prefill and token by token. A misplaced norm or a missing clamp moves logits by
/// O(1) (tests/hf_logits.rs); the tolerance leaves room for the GPU's own summation order.
#[test]
fn gpu_runs_qk_norms_and_clip_qkv_as_the_cpu() {
    if device("model").is_none() {
        return;
    }
    let root = fixture_dir().join("..");
    for name in ["qwen3moe-tiny", "olmoe-tiny"] {
        let model = Arc::new(Model::load(&root.join(name)).expect("fixture"));
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 500 + 3).collect();
        let cpu = engine_for(model.clone(), BackendChoice::Cpu, 0).unwrap();
        let gpu = engine_for(model.clone(), BackendChoice::Cuda, 0).unwrap();
        let want = all_logits(&cpu, &tokens);
        let tol = 1e-2 * want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut cache = gpu.new_cache();
        let mut decoded = Vec::new();
        for t in tokens.chunks(1) {
            let mut batch = [BatchItem {
                tokens: t,
                cache: &mut cache,
                logits: Logits::Last,
            }];
            decoded.extend(gpu.forward(&mut batch).expect("decode").remove(0));
        }
        for (what, got) in [("prefill", all_logits(&gpu, &tokens)), ("decode", decoded)] {
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= tol, "{name} {what}: worst {worst} > {tol}");
        }
    }
}

/// Granite's multipliers (`scale`, through the host) and GLM-4-MoE's partial rotary
/// (`apply_rope_partial`, through the host) with its host-side grouped sigmoid routing, on the
/// GPU against the CPU engine, f32 weights, prefill and token by token, as above.
#[test]
fn gpu_runs_granite_and_glm4_moe_as_the_cpu() {
    if device("model").is_none() {
        return;
    }
    let root = fixture_dir().join("..");
    for name in ["granitemoe-tiny", "glm4moe-tiny"] {
        let model = Arc::new(Model::load(&root.join(name)).expect("fixture"));
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 500 + 3).collect();
        let cpu = engine_for(model.clone(), BackendChoice::Cpu, 0).unwrap();
        let gpu = engine_for(model.clone(), BackendChoice::Cuda, 0).unwrap();
        let want = all_logits(&cpu, &tokens);
        let tol = 1e-2 * want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut cache = gpu.new_cache();
        let mut decoded = Vec::new();
        for t in tokens.chunks(1) {
            let mut batch = [BatchItem {
                tokens: t,
                cache: &mut cache,
                logits: Logits::Last,
            }];
            decoded.extend(gpu.forward(&mut batch).expect("decode").remove(0));
        }
        for (what, got) in [("prefill", all_logits(&gpu, &tokens)), ("decode", decoded)] {
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= tol, "{name} {what}: worst {worst} > {tol}");
        }
    }
}

/// GPT-OSS's attention sinks have no CUDA kernel: the backend refuses the model by name (before
/// it opens a device, so this runs without one) rather than attend without them; `auto` falls
/// back to the CPU.
#[test]
fn gpu_refuses_attention_sinks() {
    let root = fixture_dir().join("..");
    let model = Arc::new(Model::load(&root.join("gptoss-tiny")).expect("fixture"));
    let err = engine_for(model.clone(), BackendChoice::Cuda, 0)
        .err()
        .expect("GPT-OSS on CUDA")
        .to_string();
    assert!(
        err.contains("GptOssForCausalLM") && err.contains("attention sinks"),
        "{err}"
    );
    let auto = engine_for(model, BackendChoice::Auto, 0).expect("auto");
    assert_eq!(auto.backend().name(), "cpu");
}

/// Multi-head latent attention has no GPU path: `--backend cuda` refuses a DeepSeek model by
/// name before touching a device (so this runs on machines without one), and `auto` falls back
/// to the CPU.
#[test]
fn gpu_refuses_latent_attention() {
    let root = fixture_dir().join("..");
    for name in ["deepseekv2-tiny", "deepseekv3-tiny"] {
        let model = Arc::new(Model::load(&root.join(name)).expect("fixture"));
        let e = match engine_for(model.clone(), BackendChoice::Cuda, 1) {
            Ok(_) => panic!("{name}: the GPU took a latent-attention model"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("multi-head latent attention") && e.contains("--backend cpu"),
            "{name}: {e}"
        );
        let auto = engine_for(model, BackendChoice::Auto, 1).expect("auto");
        assert_eq!(auto.backend().name(), "cpu");
    }
}

/// A rotated model whose head stays tied to its embeddings reads the final norm through the
/// `hidden × hidden` head transform (an f32 linear on the device): the tied Llama fixture
/// rotated with every linear kept f32, and quantized (W8A8 layers, weight-only int8 table as
/// the head), on the GPU against the CPU engine, prefill and token by token. A transform
/// skipped or applied transposed moves logits by O(1); the int8 model's tolerance leaves room
/// for an activation's rounding to flip in another summation order.
#[test]
fn gpu_runs_a_tied_head_through_its_transform_as_the_cpu() {
    if device("model").is_none() {
        return;
    }
    let root = fixture_dir().join("..");
    for (keep_f32, rel_tol) in [(true, 1e-3f32), (false, 2e-2)] {
        let model = Model::load(&root.join("llama-tiny")).expect("fixture");
        let mut opts = edgemoe::quant::QuantOptions::new(edgemoe::quant::Method::Rtn, &model);
        if keep_f32 {
            opts.keep_f32 = vec![String::new()];
            opts.head = edgemoe::quant::HeadQuant::F32;
        }
        let model = edgemoe::quant::quantize(model, &[], 0, &opts, |_, _, _| {})
            .expect("rtn")
            .0;
        assert!(model.weights.head_transform.is_some() && model.weights.lm_head.is_none());
        let model = Arc::new(model);
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 500 + 3).collect();
        let cpu = engine_for(model.clone(), BackendChoice::Cpu, 0).unwrap();
        let gpu = engine_for(model.clone(), BackendChoice::Cuda, 0).unwrap();
        let want = all_logits(&cpu, &tokens);
        let tol = rel_tol * want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut cache = gpu.new_cache();
        let mut decoded = Vec::new();
        for t in tokens.chunks(1) {
            let mut batch = [BatchItem {
                tokens: t,
                cache: &mut cache,
                logits: Logits::Last,
            }];
            decoded.extend(gpu.forward(&mut batch).expect("decode").remove(0));
        }
        for (what, got) in [("prefill", all_logits(&gpu, &tokens)), ("decode", decoded)] {
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= tol, "f32 {keep_f32} {what}: worst {worst} > {tol}");
        }
    }
}
