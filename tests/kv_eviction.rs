//! KV eviction end to end on the trained fixture (real attention patterns, small enough to run
//! token by token): the chunked decode-style ppl equals the exact token-by-token path, a budget
//! the window never reaches equals the full cache, caches stay within their budget with their
//! tokens' original positions, and generation with a budget runs past it.

use edgemoe::engine::generation::{generate, run, GenerateRequest, Generation};
use edgemoe::engine::ppl::{score, Steps};
use edgemoe::engine::recall::recall;
use edgemoe::engine::sampling::SamplingParams;
use edgemoe::engine::{BatchItem, Logits};
use edgemoe::kv::{Budget, Granularity, KvOptions, Policy};
use edgemoe::{Engine, Model};
use std::path::Path;
use std::sync::Arc;

fn fixture() -> (Arc<Model>, Vec<u32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe");
    let model = Arc::new(Model::load(&dir).unwrap());
    let text = std::fs::read_to_string(dir.join("heldout.txt")).unwrap();
    let tokens = model.tokenizer.encode(&text, false).unwrap();
    (model, tokens)
}

fn options(policy: Policy, budget: usize) -> KvOptions {
    KvOptions {
        policy,
        budget: Some(Budget::Tokens(budget)),
        window: 16,
        sinks: 4,
        threshold: 1.0,
        recent: Some(0.0),
        granularity: Granularity::Layer,
    }
}

/// [`options`] with each KV head keeping its own tokens.
fn per_head(policy: Policy, budget: usize) -> KvOptions {
    KvOptions {
        granularity: Granularity::Head,
        ..options(policy, budget)
    }
}

/// One observation window per step and one token per step evict at the same positions and
/// see the same caches: the predictions agree to f32 rounding of the differently blocked
/// matrix products (relative 1e-4 on the mean NLL; the kept sets are equal, or the NLLs would
/// differ by far more).
#[test]
fn chunked_ppl_matches_token_by_token() {
    let (model, tokens) = fixture();
    let tokens = &tokens[..2 * 300];
    for (policy, granularity) in [
        (Policy::Window, Granularity::Layer),
        (Policy::H2o, Granularity::Layer),
        (Policy::Lazy, Granularity::Layer),
        (Policy::H2o, Granularity::Head),
        (Policy::Lazy, Granularity::Head),
    ] {
        let opts = KvOptions {
            granularity,
            ..options(policy, 100)
        };
        let policy = format!("{policy} per {granularity}");
        let mut engine = Engine::new(model.clone(), 1).unwrap();
        engine.set_kv_options(opts).unwrap();
        let fast = score(&engine, tokens, 300, Steps::Chunked, |_, _| {}).unwrap();
        let exact = score(&engine, tokens, 300, Steps::TokenByToken, |_, _| {}).unwrap();
        let (a, b) = (fast.result.ppl.ln(), exact.result.ppl.ln());
        assert!((a - b).abs() / b < 1e-4, "{policy}: {a} vs {b}");
        for (x, y) in fast.nll.iter().zip(&exact.nll) {
            assert!((x - y).abs() < 2e-3, "{policy}: per-token NLL {x} vs {y}");
        }
        assert_eq!(fast.result.kv_budget, Some(100));
    }
}

/// A budget the window never reaches changes nothing: the same bits as the full cache.
#[test]
fn unreached_budget_equals_full_cache() {
    let (model, tokens) = fixture();
    let tokens = &tokens[..2 * 200];
    let engine = Engine::new(model.clone(), 1).unwrap();
    let full = score(&engine, tokens, 200, Steps::Chunked, |_, _| {}).unwrap();
    let mut lazy = Engine::new(model, 1).unwrap();
    lazy.set_kv_options(options(Policy::Lazy, 200)).unwrap();
    let got = score(&lazy, tokens, 200, Steps::Chunked, |_, _| {}).unwrap();
    assert_eq!(got.nll, full.nll);
}

/// Decoding past the budget: every layer holds at most the budget, the sinks and the last
/// window are always there, positions stay the original ones (ascending, unique), and the
/// freed slots are reused (the buffers never grow past the budget).
#[test]
fn decode_stays_within_budget_and_keeps_positions() {
    let (model, tokens) = fixture();
    let kinds = [Policy::Window, Policy::H2o, Policy::Lazy]
        .into_iter()
        .flat_map(|p| [options(p, 64), per_head(p, 64)]);
    for opts in kinds {
        let policy = format!("{} per {}", opts.policy, opts.granularity);
        let mut engine = Engine::new(model.clone(), 1).unwrap();
        engine.set_kv_options(opts).unwrap();
        let mut cache = engine.new_cache();
        engine.prepare_cache(&mut cache, 400).unwrap();
        let heads = match opts.granularity {
            Granularity::Layer => 1,
            Granularity::Head => model.config.num_kv_heads,
        };
        assert_eq!(cache.layers[0].position_maps(), heads);
        let capacity = cache.allocated_bytes();
        for (i, &t) in tokens[..400].iter().enumerate() {
            engine
                .forward(&mut [BatchItem {
                    tokens: &[t],
                    cache: &mut cache,
                    logits: Logits::Last,
                }])
                .unwrap();
            for layer in &cache.layers {
                for h in 0..heads {
                    let map = layer.head_positions(h);
                    assert!(map.len() <= 64);
                    assert!(map.windows(2).all(|w| w[0] < w[1]));
                    assert!((0..4.min(i as u32 + 1)).all(|p| map.contains(&p)));
                    let recent = (i + 1).saturating_sub(16) as u32..=i as u32;
                    assert!(recent.clone().all(|p| map.contains(&p)), "{policy}");
                }
            }
        }
        assert_eq!(
            cache.allocated_bytes(),
            capacity,
            "{policy}: the cache grew"
        );
        let ev = cache.eviction().unwrap();
        // 400 tokens, budget 64, window 16: the first eviction at 64, then one every 16.
        assert_eq!(ev.evictions, (400usize - 64).div_ceil(16));
    }
}

/// The eviction policies differ on a real model: H2O and lazy keep different slots than the
/// window somewhere in the run (otherwise the comparison would measure nothing).
#[test]
fn policies_keep_different_sets() {
    let (model, tokens) = fixture();
    let kept = |policy| {
        let mut engine = Engine::new(model.clone(), 1).unwrap();
        engine.set_kv_options(options(policy, 64)).unwrap();
        let mut cache = engine.new_cache();
        engine.prepare_cache(&mut cache, 300).unwrap();
        engine
            .forward(&mut [BatchItem {
                tokens: &tokens[..64],
                cache: &mut cache,
                logits: Logits::Last,
            }])
            .unwrap();
        for &t in &tokens[64..200] {
            engine
                .forward(&mut [BatchItem {
                    tokens: &[t],
                    cache: &mut cache,
                    logits: Logits::Last,
                }])
                .unwrap();
        }
        cache.layers[1].positions().to_vec()
    };
    let window = kept(Policy::Window);
    assert_ne!(kept(Policy::H2o), window);
    assert_ne!(kept(Policy::Lazy), window);
}

/// Per-KV-head eviction with the window policy keeps in every head what the layer keeps: the
/// per-head masks, compaction and position maps give the layer's bits exactly.
#[test]
fn per_head_window_equals_the_layer_window() {
    let (model, tokens) = fixture();
    let tokens = &tokens[..2 * 300];
    let nll = |opts| {
        let mut engine = Engine::new(model.clone(), 1).unwrap();
        engine.set_kv_options(opts).unwrap();
        score(&engine, tokens, 300, Steps::Chunked, |_, _| {})
            .unwrap()
            .nll
    };
    assert_eq!(
        nll(per_head(Policy::Window, 100)),
        nll(options(Policy::Window, 100))
    );
}

/// With h2o and lazy per KV head, the heads of a layer rank their own attention and keep
/// different tokens somewhere in the run (otherwise per-head eviction would measure nothing).
#[test]
fn per_head_policies_keep_different_tokens_per_head() {
    let (model, tokens) = fixture();
    for policy in [Policy::H2o, Policy::Lazy] {
        let mut engine = Engine::new(model.clone(), 1).unwrap();
        engine.set_kv_options(per_head(policy, 64)).unwrap();
        let mut cache = engine.new_cache();
        engine.prepare_cache(&mut cache, 300).unwrap();
        for &t in &tokens[..200] {
            engine
                .forward(&mut [BatchItem {
                    tokens: &[t],
                    cache: &mut cache,
                    logits: Logits::Last,
                }])
                .unwrap();
        }
        let differ = cache
            .layers
            .iter()
            .any(|l| (1..l.position_maps()).any(|h| l.head_positions(h) != l.head_positions(0)));
        assert!(differ, "{policy}: every head kept the same tokens");
    }
}

/// A prompt longer than the budget goes in pieces; generation runs and ends by length.
#[test]
fn generation_with_a_budget_runs_past_it() {
    let (model, _) = fixture();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe");
    let prompt: String = std::fs::read_to_string(dir.join("heldout.txt"))
        .unwrap()
        .chars()
        .take(1200)
        .collect();
    let mut engine = Engine::new(model, 1).unwrap();
    engine.set_kv_options(options(Policy::Lazy, 80)).unwrap();
    let req = GenerateRequest {
        prompt,
        max_tokens: 50,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let out = generate(&engine, &req, |_| true).unwrap();
    assert!(out.prompt_tokens > 80);
    assert_eq!(out.completion_tokens, 50);
}

/// A budget below the sinks plus two observation windows is refused with the reason.
#[test]
fn too_small_a_budget_is_refused() {
    let (model, _) = fixture();
    let mut engine = Engine::new(model, 1).unwrap();
    let err = engine
        .set_kv_options(options(Policy::Lazy, 35))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("too small") && err.contains("at least 36"),
        "{err}"
    );
}

/// `recall`'s "reproduced" mentions are the ones greedy generation writes out: for every
/// mention of a few repeated words of the fixture's text, a real greedy generation from the
/// text's tokens just before it (prefilled as `generate` does, evicting under the same budget)
/// is compared with the scoring's all-tokens-top-1 verdict. They may differ only where the
/// chunked scoring's f32 rounding (`chunked_ppl_matches_token_by_token`) flips a near tie.
#[test]
fn reproduced_facts_are_what_greedy_generation_writes() {
    let (model, tokens) = fixture();
    let ctx = 360;
    let window = &tokens[..ctx];
    let words = ["the", "and", "of", "that", "he", "faith", "God", "him"];
    let facts: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    for policy in [Policy::Lazy, Policy::Window, Policy::Full] {
        let mut engine = Engine::new(model.clone(), 1).unwrap();
        if policy != Policy::Full {
            engine.set_kv_options(options(policy, 100)).unwrap();
        }
        let scored = score(&engine, window, ctx, Steps::Chunked, |_, _| {}).unwrap();
        let got = recall(&model.tokenizer, window, &scored, &facts).unwrap();
        let (mut mentions, mut generated, mut disagree) = (0, 0, 0);
        for word in &words {
            let needle = model.tokenizer.encode(&format!(" {word}"), false).unwrap();
            for i in 1..=ctx - needle.len() {
                if window[i..i + needle.len()] != needle[..] {
                    continue;
                }
                let req = GenerateRequest {
                    prompt: String::new(),
                    max_tokens: needle.len(),
                    sampling: SamplingParams::default(),
                    stop: vec![],
                };
                let mut g = Generation::from_tokens(&engine, window[..i].to_vec(), &req).unwrap();
                g.attach_cache(&engine, engine.new_cache());
                let out = run(&engine, g, |_| true).unwrap();
                let wrote = out.text == model.tokenizer.decode(&needle);
                let scored_all_top1 = (i..i + needle.len()).all(|j| scored.top1[j - 1]);
                mentions += 1;
                generated += wrote as usize;
                disagree += (wrote != scored_all_top1) as usize;
            }
        }
        let counted = got.first_reproduced * got.first_mentions as f64
            + got.repeat_reproduced * got.repeat_mentions as f64;
        println!(
            "{policy}: {mentions} mentions, greedy generation wrote {generated}, recall counted {counted}, {disagree} disagree"
        );
        assert_eq!(got.first_mentions + got.repeat_mentions, mentions);
        assert!(mentions >= 30, "too few mentions to compare: {mentions}");
        assert!(
            generated > 0 && generated < mentions,
            "{policy}: {generated} of {mentions}"
        );
        assert!(disagree <= 1, "{policy}: {disagree} of {mentions} disagree");
    }
}
