//! Expert paging under a memory budget changes where the experts' bytes come from, never what
//! is computed: at every budget, policy, read mode and with or without prefetch, logits equal
//! the unlimited (in place) run's exactly; too small a budget is a clear error; a corrupt block
//! is caught when first read; the cache can shrink and grow between steps.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::experts::blockio::ReadMode;
use edgemoe::experts::budget::MemBudget;
use edgemoe::experts::pager::Policy;
use edgemoe::experts::predict::PredictSource;
use edgemoe::experts::{ExpertService, PagingOptions};
use edgemoe::kv::KvDemand;
use edgemoe::Model;
use std::sync::Arc;

#[path = "common/trained.rs"]
mod trained;
use trained::{fixture, quantized};

fn options(mem: u64, policy: Policy, read_mode: ReadMode, prefetch: bool) -> PagingOptions {
    PagingOptions {
        mem: MemBudget::Bytes(mem),
        policy,
        read_mode,
        prefetch,
        io_threads: 1,
        predict: PredictSource::Both,
        predict_extra: 1,
        profile: None,
        kv: KvDemand::default(),
    }
}

/// Logits of a prefill of `prompt` (every row) and then of `decode` one-token steps.
fn run(engine: &Engine, prompt: &[u32], decode: &[u32]) -> Vec<Vec<f32>> {
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

#[test]
fn paged_logits_equal_the_unlimited_run_at_every_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let text = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    let tokens = model.tokenizer.encode(&text[..4000], false).unwrap();
    let (prompt, decode) = (&tokens[..40], &tokens[40..72]);
    let want = run(&Engine::new(model.clone(), 2).unwrap(), prompt, decode);

    // Fixed costs and slot size from an unlimited plan; budgets then leave 2..=all slots.
    let probe = ExpertService::paged(
        model.clone(),
        &options(1 << 40, Policy::Lru, ReadMode::Direct, false),
    )
    .unwrap();
    let plan = *probe.plan().unwrap();
    assert_eq!(plan.slots, 4 * 8, "an unlimited budget holds every expert");
    drop(probe);
    let budget = |slots: u64| plan.fixed.total() + slots * plan.slot_bytes;
    for slots in [2u64, 3, 7, 16, 32] {
        for policy in [Policy::Lru, Policy::Lfu, Policy::Stats] {
            for (mode, prefetch) in [
                (ReadMode::Direct, true),
                (ReadMode::Pread, false),
                (ReadMode::Direct, false),
            ] {
                let service = ExpertService::paged(
                    model.clone(),
                    &options(budget(slots), policy, mode, prefetch),
                )
                .unwrap();
                assert_eq!(service.plan().unwrap().slots, slots as usize);
                let engine = Engine::new(model.clone(), 2)
                    .unwrap()
                    .with_experts(service)
                    .unwrap();
                let got = run(&engine, prompt, decode);
                assert!(
                    got == want,
                    "logits differ: {slots} slots, {policy:?}, {mode:?}, prefetch {prefetch}"
                );
                let s = engine.experts.cache_stats(0).unwrap();
                assert!(s.misses > 0 && s.bytes_read > 0, "{s:?}");
                if slots < 32 && !prefetch {
                    assert!(s.misses as u64 > slots, "a small cache re-reads: {s:?}");
                }
            }
        }
    }
}

#[test]
fn too_small_a_budget_names_the_smallest_workable_value() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let Err(err) = ExpertService::paged(
        model.clone(),
        &options(1 << 20, Policy::Lru, ReadMode::Direct, true),
    ) else {
        panic!("1 MiB cannot hold the model");
    };
    let err = err.to_string();
    let need: u64 = err
        .rsplit_once('(')
        .and_then(|(_, n)| n.strip_suffix(" bytes)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no smallest value in: {err}"));
    assert!(err.contains("too small"), "{err}");
    // The value it names works, one byte less does not.
    assert!(ExpertService::paged(
        model.clone(),
        &options(need, Policy::Lru, ReadMode::Direct, true)
    )
    .is_ok());
    assert!(ExpertService::paged(
        model,
        &options(need - 1, Policy::Lru, ReadMode::Direct, true)
    )
    .is_err());
}

/// `--io-threads 100000000` started threads until the OS refused one (EAGAIN), tens of
/// thousands of them; now it is refused before any starts.
#[test]
fn an_absurd_io_thread_count_is_refused_before_any_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let opts = PagingOptions {
        io_threads: 100_000_000,
        ..options(1 << 30, Policy::Lru, ReadMode::Pread, true)
    };
    let Err(err) = ExpertService::paged(model.clone(), &opts) else {
        panic!("10^8 I/O threads accepted");
    };
    let err = err.to_string();
    assert!(
        err.contains("I/O threads") && err.contains("at most 256"),
        "{err}"
    );
    let most = PagingOptions {
        io_threads: edgemoe::experts::pager::MAX_IO_THREADS,
        ..opts
    };
    assert!(ExpertService::paged(model, &most).is_ok());
}

#[test]
fn a_corrupt_block_is_an_error_when_first_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = quantized(tmp.path());
    let model = Model::load(&path).unwrap();
    // Flip a byte inside layer 2's expert 3 block (not read at load).
    let file = edgemoe::model::emoe::EmoeFile::open(&path).unwrap();
    let b = file
        .expert_blocks()
        .iter()
        .find(|b| b.layer == 2 && b.expert == 3)
        .unwrap()
        .clone();
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[b.offset as usize + 100] ^= 0x40;
    let bad = tmp.path().join("bad.emoe");
    std::fs::write(&bad, &bytes).unwrap();
    drop(model);
    let model = Arc::new(Model::load(&bad).unwrap());
    let service = ExpertService::paged(
        model.clone(),
        &options(1 << 40, Policy::Lru, ReadMode::Direct, false),
    )
    .unwrap();
    let engine = Engine::new(model.clone(), 2)
        .unwrap()
        .with_experts(service)
        .unwrap();
    let tokens: Vec<u32> = (0..200).map(|i| (i * 37 % 2000) as u32).collect();
    let mut cache = engine.new_cache();
    let err = engine
        .forward(&mut [BatchItem {
            tokens: &tokens,
            cache: &mut cache,
            logits: Logits::Last,
        }])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 2, expert 3") && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn the_cache_shrinks_and_grows_between_steps_without_changing_results() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let tokens: Vec<u32> = (0..48).map(|i| (i * 53 % 2000) as u32).collect();
    let want = run(
        &Engine::new(model.clone(), 2).unwrap(),
        &tokens[..8],
        &tokens[8..],
    );
    let service = ExpertService::paged(
        model.clone(),
        &options(1 << 40, Policy::Stats, ReadMode::Direct, true),
    )
    .unwrap();
    let plan = *service.plan().unwrap();
    let engine = Engine::new(model.clone(), 2)
        .unwrap()
        .with_experts(service)
        .unwrap();
    let mut cache = engine.new_cache();
    let mut got = Vec::new();
    let mut step = |t: &[u32], logits| {
        got.extend(
            engine
                .forward(&mut [BatchItem {
                    tokens: t,
                    cache: &mut cache,
                    logits,
                }])
                .unwrap(),
        );
    };
    step(&tokens[..8], Logits::All);
    for (i, &t) in tokens[8..].iter().enumerate() {
        let slots = [32u64, 9, 2, 5, 32][i % 5];
        let n = engine
            .experts
            .set_mem(plan.fixed.total() + slots * plan.slot_bytes)
            .unwrap();
        assert_eq!(n, slots as usize);
        step(&[t], Logits::Last);
    }
    assert!(got == want, "logits changed when the cache was resized");
    assert!(
        engine.experts.set_mem(1 << 20).is_err(),
        "too small a budget is refused"
    );
}

/// Next-layer prediction (pre-gating + transitions, top-k + 1 per token) on the trained
/// fixture's held-out text, with statistics from its calibration text: recall ≥ 85%.
#[test]
fn next_layer_prediction_recall_on_held_out_text() {
    use edgemoe::engine::ppl::perplexity;
    use edgemoe::experts::predict::Predictor;
    let model = Arc::new(Model::load(&fixture()).unwrap());
    let encode = |f: &str| {
        let t = std::fs::read_to_string(fixture().join(f)).unwrap();
        let mut t = model.tokenizer.encode(&t, false).unwrap();
        t.truncate(4096);
        t
    };
    let profiler = Engine::new(model.clone(), 2).unwrap();
    perplexity(&profiler, &encode("calib.txt"), 256, |_, _| {}).unwrap();
    let profile = profiler.experts.paths.snapshot();
    let top_k = model.config.top_k;
    let predictor = Predictor::new(PredictSource::Both, top_k, 1);
    let service = ExpertService::measuring(&model, predictor, Some(&profile));
    let engine = Engine::new(model.clone(), 2)
        .unwrap()
        .with_experts(service)
        .unwrap();
    perplexity(&engine, &encode("heldout.txt"), 256, |_, _| {}).unwrap();
    let c = engine.experts.prediction().unwrap();
    eprintln!("recall {:.3}, precision {:.3}", c.recall(), c.precision());
    assert!(c.actual > 10_000, "{c:?}");
    assert!(c.recall() >= 0.85, "recall {:.3}", c.recall());
    // Three guesses per token for two choices: precision at most 2/3.
    assert!(
        c.precision() > 0.5 && c.precision() <= 2.0 / 3.0 + 1e-9,
        "{c:?}"
    );
}

/// The CLI: `ppl` and `generate` under `--mem` print what the unlimited run prints, and
/// `--stats` reports the cache's counters; `profile` writes loadable statistics.
#[test]
fn cli_runs_under_a_budget_and_profiles() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let path = quantized(tmp.path());
    let bin = env!("CARGO_BIN_EXE_edgemoe");
    let text = tmp.path().join("text.txt");
    let held = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    std::fs::write(&text, &held[..6000]).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .arg("--model")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let t = text.to_str().unwrap();
    let (want, _) = run(&["ppl", "--text", t, "--ctx", "128", "--threads", "2"]);
    let (got, err) = run(&[
        "ppl",
        "--text",
        t,
        "--ctx",
        "128",
        "--threads",
        "2",
        "--mem",
        "37M",
        "--stats",
    ]);
    assert_eq!(got, want);
    assert!(
        err.contains("expert slots") && err.contains("hit rate") && err.contains("recall"),
        "{err}"
    );
    let gen = [
        "generate",
        "--prompt",
        "And God said",
        "-n",
        "16",
        "--threads",
        "2",
    ];
    let (want, _) = run(&gen);
    let mut lru = gen.to_vec();
    lru.extend([
        "--mem",
        "36M",
        "--expert-policy",
        "lru",
        "--no-prefetch",
        "--expert-io",
        "pread",
    ]);
    assert_eq!(run(&lru).0, want);
    let out = tmp.path().join("stats.json");
    run(&[
        "profile",
        "--text",
        t,
        "--out",
        out.to_str().unwrap(),
        "--threads",
        "2",
    ]);
    let p = edgemoe::experts::paths::PathProfile::load(&out).unwrap();
    assert_eq!((p.layers, p.experts), (4, 8));
    assert_eq!(p.counts.iter().flatten().sum::<u64>(), 2 * 4 * p.tokens);
    let mut with = gen.to_vec();
    with.extend(["--mem", "37M", "--profile", out.to_str().unwrap()]);
    assert_eq!(run(&with).0, want);
}

/// `serve` with `--mem`: 16 requests run while `{"op":"set_mem"}` lowers the expert cache to
/// 30% of its slots and raises it back; every request completes with the text an unlimited
/// server gives, and `{"op":"stats"}` reports the cache.
#[test]
fn serve_set_mem_lowered_and_raised_during_requests() {
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let path = quantized(tmp.path());
    let model = Arc::new(Model::load(&path).unwrap());
    // The server's KV plan: a batch of 16 (its default) that may each fill the context.
    let plan = *ExpertService::paged(
        model,
        &PagingOptions {
            kv: KvDemand {
                sequences: 16,
                ..KvDemand::default()
            },
            ..options(1 << 40, Policy::Stats, ReadMode::Direct, true)
        },
    )
    .unwrap()
    .plan()
    .unwrap();
    let full = plan.fixed.total() + 32 * plan.slot_bytes;
    let low = plan.fixed.total() + 10 * plan.slot_bytes;
    let prompts = [
        "In the beginning",
        "And God said",
        "Blessed are",
        "The LORD",
        "Thou shalt",
        "And it came to pass",
        "Jesus",
        "For God so loved",
    ];
    let request = |i: usize| {
        json!({"id": format!("r{i}"), "prompt": prompts[i % 8], "max_tokens": 20 + i, "temperature": 0, "stream": true}).to_string() + "\n"
    };
    // Runs 16 requests; with `mem`, set_mem lines go in once the first chunks stream back.
    let serve = |mem: Option<u64>| -> (std::collections::HashMap<String, String>, Vec<Value>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgemoe"));
        cmd.args(["serve", "--threads", "2", "--model"]).arg(&path);
        if let Some(m) = mem {
            cmd.args(["--mem", &m.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = Some(child.stdin.take().unwrap());
        let first: String = (0..8).map(request).collect();
        stdin.as_mut().unwrap().write_all(first.as_bytes()).unwrap();
        let (mut texts, mut replies) = (
            std::collections::HashMap::<String, String>::new(),
            Vec::new(),
        );
        let (mut chunks, mut done, mut phase) = (0, 0, 0);
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
            if v.get("error").is_some()
                || v["object"] == "edgemoe.set_mem"
                || v["object"] == "edgemoe.stats"
            {
                replies.push(v);
                continue;
            }
            if v["object"] == "edgemoe.ready" {
                continue;
            }
            let id = v["id"].as_str().unwrap().to_string();
            let c = &v["choices"][0];
            texts
                .entry(id)
                .or_default()
                .push_str(c["text"].as_str().unwrap());
            chunks += 1;
            done += usize::from(!c["finish_reason"].is_null());
            let Some(s) = stdin.as_mut() else { continue };
            if phase == 0 && chunks >= 10 {
                let mut lines = String::new();
                if mem.is_some() {
                    lines += &(json!({"op": "set_mem", "bytes": low}).to_string() + "\n");
                }
                lines += &(8..16).map(request).collect::<String>();
                s.write_all(lines.as_bytes()).unwrap();
                phase = 1;
            } else if phase == 1 && done >= 6 {
                if mem.is_some() {
                    s.write_all(
                        (json!({"op": "set_mem", "bytes": full}).to_string() + "\n").as_bytes(),
                    )
                    .unwrap();
                }
                s.write_all(b"{\"op\":\"stats\"}\n").unwrap();
                stdin = None;
                phase = 2;
            }
        }
        assert!(child.wait().unwrap().success());
        (texts, replies)
    };
    let (want, _) = serve(None);
    let (got, replies) = serve(Some(full));
    assert_eq!(want.len(), 16);
    assert_eq!(got, want, "texts differ from the unlimited server's");
    let slots: Vec<u64> = replies.iter().filter_map(|r| r["slots"].as_u64()).collect();
    assert_eq!(slots, vec![10, 32], "{replies:?}");
    let stats = replies
        .iter()
        .find(|r| r["object"] == "edgemoe.stats")
        .unwrap();
    assert!(
        stats["experts"]["cache"]["misses"].as_u64().unwrap() > 0,
        "{stats}"
    );
}

/// The C API: a session with `mem_bytes` pages its experts, `edgemoe_session_set_mem` resizes
/// the cache (refusing too small a budget), and the completion equals an unlimited session's.
#[test]
fn c_api_sessions_take_a_budget_and_set_mem() {
    use edgemoe::capi::*;
    use std::ffi::CString;
    let tmp = tempfile::tempdir().unwrap();
    let path = quantized(tmp.path());
    let plan = *ExpertService::paged(
        Arc::new(Model::load(&path).unwrap()),
        &options(1 << 40, Policy::Stats, ReadMode::Direct, true),
    )
    .unwrap()
    .plan()
    .unwrap();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let mut model = std::ptr::null_mut();
    assert_eq!(
        unsafe { edgemoe_model_load(cpath.as_ptr(), std::ptr::null(), &mut model) },
        EDGEMOE_OK
    );
    let complete = |mem: u64, resize: Option<u64>| -> String {
        let mut params = edgemoe_session_default_params();
        params.n_threads = 2;
        params.mem_bytes = mem;
        let mut s = std::ptr::null_mut();
        assert_eq!(
            unsafe { edgemoe_session_new(model, &params, &mut s) },
            EDGEMOE_OK
        );
        if let Some(bytes) = resize {
            assert_eq!(edgemoe_session_set_mem(s, bytes), EDGEMOE_OK);
            assert_eq!(
                edgemoe_session_set_mem(s, 1 << 20),
                EDGEMOE_ERR_INVALID_INPUT
            );
        }
        let prompt = CString::new("And God said").unwrap();
        let mut g = edgemoe_generate_default_params();
        g.max_tokens = 24;
        let mut buf = vec![0 as std::ffi::c_char; 4096];
        let mut n = 0;
        let rc = unsafe {
            edgemoe_generate(
                s,
                prompt.as_ptr(),
                &g,
                None,
                std::ptr::null_mut(),
                buf.as_mut_ptr(),
                buf.len(),
                &mut n,
            )
        };
        assert_eq!(rc, EDGEMOE_OK);
        assert_eq!(edgemoe_session_free(s), EDGEMOE_OK);
        let bytes: Vec<u8> = buf[..n].iter().map(|&c| c as u8).collect();
        String::from_utf8(bytes).unwrap()
    };
    let want = complete(0, None);
    let full = plan.fixed.total() + 32 * plan.slot_bytes;
    assert_eq!(
        complete(full, Some(plan.fixed.total() + 3 * plan.slot_bytes)),
        want
    );
    let mut params = edgemoe_session_default_params();
    params.mem_bytes = 1 << 20;
    let mut s = std::ptr::null_mut();
    assert_eq!(
        unsafe { edgemoe_session_new(model, &params, &mut s) },
        EDGEMOE_ERR_INVALID_INPUT
    );
    assert_eq!(edgemoe_model_free(model), EDGEMOE_OK);
}

/// The budget changed from another thread while steps run (as the C API allows): no step
/// blocks or fails, and the logits stay the unlimited run's.
#[test]
fn set_mem_from_another_thread_during_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let tokens: Vec<u32> = (0..56).map(|i| (i * 29 % 2000) as u32).collect();
    let want = run(
        &Engine::new(model.clone(), 2).unwrap(),
        &tokens[..24],
        &tokens[24..],
    );
    let service = ExpertService::paged(
        model.clone(),
        &options(1 << 40, Policy::Lru, ReadMode::Direct, true),
    )
    .unwrap();
    let plan = *service.plan().unwrap();
    let engine = Engine::new(model, 2)
        .unwrap()
        .with_experts(service)
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let slots = [2u64, 32, 3, 12][(i % 4) as usize];
                engine
                    .experts
                    .set_mem(plan.fixed.total() + slots * plan.slot_bytes)
                    .unwrap();
                i += 1;
                std::thread::yield_now();
            }
        });
        let got = run(&engine, &tokens[..24], &tokens[24..]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        got
    });
    assert!(got == want, "logits changed while the budget moved");
}

/// Logits of `tokens` run as a prefill of `prompt` tokens, then one token per step, in a cache
/// prepared with the engine's KV options for the whole sequence; and the cache's allocation.
fn run_budgeted(engine: &Engine, tokens: &[u32], prompt: usize) -> (Vec<Vec<f32>>, usize) {
    let mut cache = engine.new_cache();
    engine.prepare_cache(&mut cache, tokens.len()).unwrap();
    let mut out = Vec::new();
    let mut step = |t: &[u32], logits| {
        out.extend(
            engine
                .forward(&mut [BatchItem {
                    tokens: t,
                    cache: &mut cache,
                    logits,
                }])
                .unwrap(),
        );
    };
    step(&tokens[..prompt], Logits::All);
    for t in &tokens[prompt..] {
        step(std::slice::from_ref(t), Logits::Last);
    }
    let evictions = cache.eviction().map_or(0, |e| e.evictions);
    assert!(evictions > 0, "the budget was never evicted into");
    (out, cache.allocated_bytes())
}

/// `--mem` counts the KV caches the run can allocate: with the same budget, a KV budget of 40
/// tokens leaves the exact number of extra expert slots the plan gives, and the logits (with
/// eviction) equal an unlimited-memory run's with the same KV options.
#[test]
fn a_smaller_kv_budget_leaves_more_expert_slots() {
    use edgemoe::kv::plan::bytes_per_token;
    use edgemoe::kv::{Budget, KvOptions, Policy as KvPolicy};
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let cfg = model.config.clone();
    let (reach, sequences, budget) = (120usize, 4usize, 40usize);
    let full = KvDemand {
        reach,
        sequences,
        ..KvDemand::default()
    };
    let lazy_opts = KvOptions {
        policy: KvPolicy::Lazy,
        budget: Some(Budget::Tokens(budget)),
        window: 8,
        sinks: 4,
        ..KvOptions::default()
    };
    let lazy = KvDemand {
        options: lazy_opts,
        ..full
    };
    let paged = |mem: u64, kv: KvDemand| {
        ExpertService::paged(
            model.clone(),
            &PagingOptions {
                kv,
                ..options(mem, Policy::Stats, ReadMode::Direct, false)
            },
        )
        .unwrap()
    };
    let probe = *paged(1 << 40, full).plan().unwrap();
    let full_kv = (sequences * reach) as u64
        * bytes_per_token(cfg.num_layers, cfg.kv_layout(), KvPolicy::Full);
    let lazy_kv = (sequences * budget) as u64
        * bytes_per_token(cfg.num_layers, cfg.kv_layout(), KvPolicy::Lazy);
    assert_eq!(probe.fixed.kv_bytes, full_kv);
    let other = probe.fixed.total() - full_kv;
    let mem = other + full_kv + 3 * probe.slot_bytes;
    assert_eq!(paged(mem, full).plan().unwrap().slots, 3);
    let service = paged(mem, lazy);
    let plan = *service.plan().unwrap();
    assert_eq!(plan.fixed.kv_bytes, lazy_kv);
    let want_slots = ((mem - other - lazy_kv) / probe.slot_bytes) as usize;
    assert!(want_slots > 3, "the KV saving is worth {want_slots} slots");
    assert_eq!(plan.slots, want_slots);

    // The paged, budgeted run computes what the in-place one with the same budget computes.
    let text = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    let tokens = model.tokenizer.encode(&text[..4000], false).unwrap()[..reach].to_vec();
    let mut reference = Engine::new(model.clone(), 2).unwrap();
    reference.set_kv_options(lazy_opts).unwrap();
    let (want, _) = run_budgeted(&reference, &tokens, budget);
    let mut engine = Engine::new(model.clone(), 2)
        .unwrap()
        .with_experts(service)
        .unwrap();
    engine.set_kv_options(lazy_opts).unwrap();
    let (got, allocated) = run_budgeted(&engine, &tokens, budget);
    assert!(got == want, "paged logits differ from the in-place run's");
    // One sequence allocates exactly its share of the plan.
    assert_eq!(allocated as u64, lazy_kv / sequences as u64);
}

/// Under `--mem`, a serve request may not ask for a bigger KV cache than the server reserved
/// per request; within the reservation it may choose any budget and policy.
#[test]
fn a_request_cannot_outgrow_the_kv_reservation() {
    use edgemoe::kv::{Budget, KvOptions, Policy as KvPolicy};
    use edgemoe::serve::kv::{options as request_options, RequestKv};
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let server = KvOptions {
        policy: KvPolicy::Lazy,
        budget: Some(Budget::Tokens(150)),
        ..KvOptions::default()
    };
    let service = ExpertService::paged(
        model.clone(),
        &PagingOptions {
            kv: KvDemand {
                options: server,
                reach: usize::MAX,
                sequences: 2,
            },
            ..options(1 << 40, Policy::Stats, ReadMode::Direct, false)
        },
    )
    .unwrap();
    let mut engine = Engine::new(model, 1)
        .unwrap()
        .with_experts(service)
        .unwrap();
    engine.set_kv_options(server).unwrap();
    let ask = |budget: Option<Budget>, policy: Option<KvPolicy>, reach: usize| {
        request_options(&engine, RequestKv { budget, policy }, reach)
    };
    assert_eq!(ask(None, None, 400).unwrap(), server);
    assert!(ask(Some(Budget::Tokens(140)), Some(KvPolicy::H2o), 400).is_ok());
    // A short request fits whatever it asks, since it holds only what it reaches.
    assert!(ask(None, Some(KvPolicy::Full), 140).is_ok());
    for (budget, policy) in [
        (Some(Budget::Tokens(300)), None),
        (None, Some(KvPolicy::Full)),
    ] {
        let (code, msg) = ask(budget, policy, 400).unwrap_err();
        assert_eq!(code, "kv_budget_too_large", "{msg}");
        assert!(msg.contains("(150 tokens)"), "{msg}");
    }
}
