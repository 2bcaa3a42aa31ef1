//! Every model family runs through the features around the forward pass, not only through
//! `hf_logits`'s logits: expert paging under a budget (the same bits as unlimited), KV eviction
//! (an unreached budget is the full cache's bits; decoding past a small one keeps each layer
//! within it), `profile`, `serve` (the text `generate` gives) and the C API (the engine's
//! greedy text, also under a memory and a KV budget).

use edgemoe::capi::*;
use edgemoe::engine::ppl::{score, Steps};
use edgemoe::engine::{BatchItem, Logits};
use edgemoe::experts::blockio::ReadMode;
use edgemoe::experts::budget::MemBudget;
use edgemoe::experts::pager::Policy as ExpertPolicy;
use edgemoe::experts::predict::PredictSource;
use edgemoe::experts::{ExpertService, PagingOptions};
use edgemoe::kv::{Budget, Granularity, KvDemand, KvOptions, Policy};
use edgemoe::quant::{self, store::write_emoe, Method, QuantOptions};
use edgemoe::{generate, Engine, GenerateRequest, Model, SamplingParams};
use std::ffi::{CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// One tiny transformers checkpoint of each family the issue lists (and its variants).
const FAMILIES: &[&str] = &[
    "qwen3moe-tiny",
    "olmoe-tiny",
    "granitemoe-tiny",
    "granitemoeshared-tiny",
    "glm4moe-tiny",
    "gptoss-tiny",
    "deepseekv2-tiny",
    "deepseekv3-tiny",
];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Token ids of some English text in the family's own tokenizer.
fn tokens(model: &Model, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(dir("trained-moe").join("heldout.txt")).unwrap();
    let t = model.tokenizer.encode(&text[..6000], false).unwrap();
    assert!(t.len() >= n, "{} tokens", t.len());
    t[..n].to_vec()
}

/// Logits of a prefill of `prompt` (every row) and then of `decode` one-token steps.
fn logits(engine: &Engine, prompt: &[u32], decode: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = engine.new_cache();
    let mut out = Vec::new();
    let mut step = |tokens: &[u32], logits| {
        out.extend(
            engine
                .forward(&mut [BatchItem {
                    tokens,
                    cache: &mut cache,
                    logits,
                }])
                .unwrap(),
        );
    };
    step(prompt, Logits::All);
    for &t in decode {
        step(&[t], Logits::Last);
    }
    out
}

/// The family quantized (round to nearest) into an .emoe store in `tmp`: paging reads expert
/// blocks from one.
fn quantized(name: &str, tmp: &Path) -> PathBuf {
    let model = Model::load(&dir(name)).unwrap();
    let opts = QuantOptions {
        threads: 2,
        ..QuantOptions::new(Method::Rtn, &model)
    };
    let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {})
        .unwrap_or_else(|e| panic!("{name}: quantize: {e}"));
    let path = tmp.join(format!("{name}.emoe"));
    write_emoe(&q, serde_json::json!({"method": "rtn"}), &path).unwrap();
    path
}

fn paging(mem: u64) -> PagingOptions {
    PagingOptions {
        mem: MemBudget::Bytes(mem),
        policy: ExpertPolicy::Stats,
        read_mode: ReadMode::Pread,
        prefetch: true,
        io_threads: 1,
        predict: PredictSource::Both,
        predict_extra: 1,
        profile: None,
        kv: KvDemand::default(),
    }
}

/// Two expert slots for the whole model: every layer's experts are read again and again, and
/// the logits are still the unlimited run's, bit for bit.
#[test]
fn paged_experts_give_the_unlimited_logits_in_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    for &name in FAMILIES {
        let model = Arc::new(Model::load(&quantized(name, tmp.path())).unwrap());
        let t = tokens(&model, 40);
        let want = logits(&Engine::new(model.clone(), 2).unwrap(), &t[..24], &t[24..]);
        let probe = ExpertService::paged(model.clone(), &paging(1 << 40)).unwrap();
        let plan = *probe.plan().unwrap();
        drop(probe);
        let service = ExpertService::paged(
            model.clone(),
            &paging(plan.fixed.total() + 2 * plan.slot_bytes),
        )
        .unwrap();
        assert_eq!(service.plan().unwrap().slots, 2, "{name}");
        let engine = Engine::new(model.clone(), 2)
            .unwrap()
            .with_experts(service)
            .unwrap();
        let got = logits(&engine, &t[..24], &t[24..]);
        assert!(got == want, "{name}: paged logits differ");
        let s = engine.experts.cache_stats(0).unwrap();
        assert!(s.misses > 2 && s.bytes_read > 0, "{name}: {s:?}");
    }
}

fn kv(policy: Policy, budget: usize, granularity: Granularity) -> KvOptions {
    KvOptions {
        policy,
        budget: Some(Budget::Tokens(budget)),
        window: 8,
        sinks: 2,
        threshold: 1.0,
        recent: Some(0.0),
        granularity,
    }
}

/// A budget the sequence never reaches is the full cache's bits; past a small one every
/// policy keeps each layer (each KV head) within it and the predictions stay finite.
#[test]
fn kv_eviction_runs_in_every_family() {
    for name in FAMILIES {
        let model = Arc::new(Model::load(&dir(name)).unwrap());
        let t = tokens(&model, 96);
        let full = score(
            &Engine::new(model.clone(), 2).unwrap(),
            &t,
            48,
            Steps::Chunked,
            |_, _| {},
        )
        .unwrap();
        let mut lazy = Engine::new(model.clone(), 2).unwrap();
        lazy.set_kv_options(kv(Policy::Lazy, 48, Granularity::Layer))
            .unwrap();
        let same = score(&lazy, &t, 48, Steps::Chunked, |_, _| {}).unwrap();
        assert_eq!(
            same.nll, full.nll,
            "{name}: an unreached budget changed the bits"
        );

        for policy in [Policy::Window, Policy::H2o, Policy::Lazy] {
            for granularity in [Granularity::Layer, Granularity::Head] {
                let mut engine = Engine::new(model.clone(), 2).unwrap();
                engine.set_kv_options(kv(policy, 24, granularity)).unwrap();
                let mut cache = engine.new_cache();
                engine.prepare_cache(&mut cache, t.len()).unwrap();
                let heads = cache.layers[0].position_maps();
                if name.starts_with("deepseek") {
                    // One latent row per token, shared by every head: one position map.
                    assert_eq!(heads, 1, "{name} per {granularity}");
                }
                for &tok in &t {
                    let out = engine
                        .forward(&mut [BatchItem {
                            tokens: &[tok],
                            cache: &mut cache,
                            logits: Logits::Last,
                        }])
                        .unwrap();
                    assert!(out.iter().flatten().all(|x| x.is_finite()), "{name}");
                }
                for layer in &cache.layers {
                    for h in 0..heads {
                        assert!(
                            layer.head_positions(h).len() <= 24,
                            "{name} {policy} per {granularity}"
                        );
                    }
                }
                assert!(cache.eviction().unwrap().evictions > 0, "{name}");
            }
        }
    }
}

/// DeepSeek's KV cache holds one latent row a token and layer, `kv_lora_rank +
/// qk_rope_head_dim` f32 values, the value read from its prefix and not stored again: `edgemoe
/// bench` reports that many bytes per token, the `--mem` plan counts them (and a position), and
/// after a prefill and decode steps the cache's own accounting holds exactly that per token.
#[test]
fn mla_cache_holds_latent_rows() {
    for name in [
        "deepseekv2-tiny",
        "deepseekv3-tiny",
        "deepseekv3-tiny-plain",
    ] {
        let model = Arc::new(Model::load(&dir(name)).unwrap());
        let cfg = &model.config;
        let m = cfg.options.mla.unwrap();
        let row = (m.kv_lora_rank + m.qk_rope_head_dim) as u64;
        let formula = cfg.num_layers as u64 * row * 4;
        // Per-head keys and values (what the cache held before) would be far more.
        assert!(
            formula < (cfg.num_layers * 2 * cfg.kv_dim() * 4) as u64,
            "{name}"
        );

        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(["bench", "-p", "6", "-n", "3", "-r", "1", "--threads", "1"])
            .args(["--backend", "cpu", "--json", "--model"])
            .arg(dir(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["kv_bytes_per_token"], formula, "{name}: bench");

        // The plan adds a u32 position a layer (the full policy keeps no statistics).
        let plan = KvDemand::default().plan_for(cfg).unwrap();
        let per_token = formula + cfg.num_layers as u64 * 4;
        assert_eq!(plan.bytes_per_token, per_token, "{name}: plan");

        let engine = Engine::new(model.clone(), 2).unwrap();
        let mut cache = engine.new_cache();
        let t = tokens(&model, 11);
        let (prompt, decode) = t.split_at(7);
        for step in std::iter::once(prompt).chain(decode.chunks(1)) {
            engine
                .forward(&mut [BatchItem {
                    tokens: step,
                    cache: &mut cache,
                    logits: Logits::Last,
                }])
                .unwrap();
        }
        assert_eq!(cache.bytes() as u64, 11 * per_token, "{name}: cache");
        for layer in &cache.layers {
            let s = layer.storage().unwrap();
            let layout = s.layout();
            assert_eq!(layout.key_dim as u64, row, "{name}");
            assert_eq!(layout.value_prefix, Some(m.kv_lora_rank), "{name}");
            assert_eq!(s.bytes() as u64, 11 * row * 4, "{name}: one row a token");
            assert!(s.to_host().unwrap().values.is_empty(), "{name}");
        }
    }
}

/// `edgemoe profile` counts every token's expert choices in each layer of each family.
#[test]
fn profile_runs_on_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "In the beginning was the word, and the word was with God.",
    )
    .unwrap();
    for name in FAMILIES {
        let out_path = tmp.path().join(format!("{name}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(["profile", "--threads", "2", "--ctx", "8", "--model"])
            .arg(dir(name))
            .arg("--text")
            .arg(&text)
            .arg("--out")
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let profile = std::fs::read_to_string(&out_path).unwrap();
        assert!(profile.len() > 100, "{name}: {profile}");
    }
}

/// Greedy text of the engine: what `serve` and the C API must give.
fn greedy(model: &Arc<Model>, prompt: &str, n: usize) -> String {
    let engine = Engine::new(model.clone(), 2).unwrap();
    let req = GenerateRequest {
        prompt: prompt.to_string(),
        max_tokens: n,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop: vec![],
    };
    generate(&engine, &req, |_| true).unwrap().text
}

const PROMPT: &str = "And it came to pass";

/// `edgemoe serve` (JSON lines over pipes) gives each family's greedy text.
#[test]
fn serve_gives_the_engines_text_in_every_family() {
    for name in FAMILIES {
        let model = Arc::new(Model::load(&dir(name)).unwrap());
        let want = greedy(&model, PROMPT, 12);
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(["serve", "--threads", "2", "--model"])
            .arg(dir(name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let line =
            serde_json::json!({"id": "a", "prompt": PROMPT, "max_tokens": 12, "temperature": 0});
        writeln!(stdin, "{line}").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let answer: serde_json::Value = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["id"] == "a")
            .unwrap_or_else(|| panic!("{name}: no answer in {stdout}"));
        assert_eq!(answer["choices"][0]["text"], want, "{name}");
    }
}

/// The C API loads each family (and its .emoe), and gives the engine's greedy text, also with a
/// memory budget that pages experts and a KV budget.
#[test]
fn c_api_generates_in_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        for (path, budgets) in [(dir(name), false), (quantized(name, tmp.path()), true)] {
            let model = Arc::new(Model::load(&path).unwrap());
            let want = greedy(&model, PROMPT, 16);
            let c_path = CString::new(path.to_str().unwrap()).unwrap();
            let mut session_params = edgemoe_session_default_params();
            session_params.n_threads = 2;
            if budgets {
                // A KV budget the 16 tokens never reach: the full cache's text.
                session_params.kv_budget_tokens = 64;
                session_params.kv_window = 4;
                session_params.kv_policy = EDGEMOE_KV_POLICY_LAZY;
                // The smallest budget the planner accepts: the experts are paged.
                session_params.mem_bytes = smallest_budget(&c_path, session_params);
            }
            let text = unsafe { c_generate(&c_path, &session_params, 16) }
                .unwrap_or_else(|e| panic!("{name} ({}): {e}", path.display()));
            assert_eq!(text, want, "{name} ({})", path.display());
        }
    }
}

/// The smallest `mem_bytes` a session of the model accepts, from the error a 1 MiB budget gets.
fn smallest_budget(path: &CStr, mut params: EdgemoeSessionParams) -> u64 {
    params.mem_bytes = 1 << 20;
    let Err(err) = (unsafe { c_generate(path, &params, 1) }) else {
        panic!("1 MiB holds the model");
    };
    err.rsplit_once('(')
        .and_then(|(_, n)| n.strip_suffix(" bytes)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no smallest value in: {err}"))
}

/// Loads `path`, opens a session with `params`, generates `n` greedy tokens after [`PROMPT`].
unsafe fn c_generate(path: &CStr, params: &EdgemoeSessionParams, n: u32) -> Result<String, String> {
    let last_error = || {
        unsafe { CStr::from_ptr(edgemoe_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    let mut model = std::ptr::null_mut();
    if unsafe { edgemoe_model_load(path.as_ptr(), std::ptr::null(), &mut model) } != EDGEMOE_OK {
        return Err(last_error());
    }
    let mut session = std::ptr::null_mut();
    let rc = unsafe { edgemoe_session_new(model, params, &mut session) };
    let result = if rc != EDGEMOE_OK {
        Err(last_error())
    } else {
        let mut gen = edgemoe_generate_default_params();
        gen.max_tokens = n;
        gen.temperature = 0.0;
        let prompt = CString::new(PROMPT).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut len = 0usize;
        let rc = unsafe {
            edgemoe_generate(
                session,
                prompt.as_ptr(),
                &gen,
                None,
                std::ptr::null_mut(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut len,
            )
        };
        assert_eq!(edgemoe_session_free(session), EDGEMOE_OK);
        if rc != EDGEMOE_OK {
            Err(last_error())
        } else {
            Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
        }
    };
    assert_eq!(edgemoe_model_free(model), EDGEMOE_OK);
    result
}

/// `edgemoe quantize` with its defaults (haq: calibration, the smoothing folds, the rotation
/// where exact, GPTQ; layers spilled beside the output) takes every family, DeepSeek's latent
/// attention too, and the .emoe it writes loads and gives finite logits.
#[test]
fn quantize_cli_takes_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let out_path = tmp.path().join(format!("{name}.emoe"));
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args([
                "quantize",
                "--threads",
                "2",
                "--calib-tokens",
                "512",
                "--model",
            ])
            .arg(dir(name))
            .arg("--calib")
            .arg(dir("trained-moe").join("calib.txt"))
            .arg("--out")
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let model = Arc::new(Model::load(&out_path).unwrap());
        let t = tokens(&model, 16);
        let out = logits(&Engine::new(model, 2).unwrap(), &t, &[]);
        assert!(out.iter().flatten().all(|x| x.is_finite()), "{name}");
    }
}
