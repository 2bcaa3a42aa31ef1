//! Perplexity with the GPTQ / SmoothQuant protocol: the whole text tokenized at once with no
//! BOS, cut into non-overlapping full windows of `ctx` tokens (the tail dropped), each window
//! scored from an empty cache; ppl = exp(mean NLL of the ctx−1 next-token predictions of all
//! windows).
//!
//! With a KV budget (the engine's [`crate::kv::KvOptions`]) a window is scored decode-style:
//! every token sees only the cache eviction left. Eviction happens only when a step would
//! overflow the budget, so the fast path runs the window in steps of [`KvCache::room`] tokens
//! (the cache's free room, then one observation window at a time) — the same evictions at the
//! same positions as the exact path, which runs one token per step.

use super::{BatchItem, Engine, Logits};
use crate::error::{Error, Result};
use crate::kv::KvCache;

pub const PROTOCOL: &str = "non-overlapping windows, no BOS, each window from an empty cache, exp(mean NLL of ctx-1 predictions per window)";

#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    pub ppl: f64,
    pub tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    pub protocol: &'static str,
    /// The KV policy and budget in tokens per window (`full` without a budget).
    pub kv_policy: String,
    pub kv_budget: Option<usize>,
}

/// Every prediction of a run: window `w`'s prediction `t` (of token `w·ctx + t + 1`) at index
/// `w·(ctx−1) + t`.
#[derive(Debug, Clone)]
pub struct Scored {
    pub result: PplResult,
    pub nll: Vec<f64>,
    /// Whether the target was the arg-max of the logits.
    pub top1: Vec<bool>,
}

/// How a window with a KV budget runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steps {
    /// As many tokens per step as the cache has room for (one forward per observation window).
    Chunked,
    /// One token per step, as decoding does: the reference the chunked path is tested against.
    TokenByToken,
}

/// `progress(done, total)` is called after each window.
pub fn perplexity(
    engine: &Engine,
    tokens: &[u32],
    ctx: usize,
    progress: impl FnMut(usize, usize),
) -> Result<PplResult> {
    Ok(score(engine, tokens, ctx, Steps::Chunked, progress)?.result)
}

/// [`perplexity`] with every prediction's NLL and top-1 hit kept.
pub fn score(
    engine: &Engine,
    tokens: &[u32],
    ctx: usize,
    steps: Steps,
    progress: impl FnMut(usize, usize),
) -> Result<Scored> {
    Ok(score_windows(engine, None, tokens, ctx, steps, progress)?.0)
}

/// How far a model's next-token distributions are from a reference model's on the same
/// windows (the reference scored with its full cache). Far less noisy than a perplexity
/// difference: every prediction contributes a non-negative distance, where a perplexity change
/// is a sum of per-token gains and losses that cancel by chance.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Divergence {
    /// Mean KL(reference ‖ model) per prediction, in nats.
    pub kl_mean: f64,
    /// The 99th percentile and the largest KL of one prediction.
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Share of predictions whose arg-max token is the same in both.
    pub top1_agree: f64,
    /// The reference's perplexity on the same windows.
    pub reference_ppl: f64,
    /// Standard error of the mean NLL difference (model − reference): how far this text's
    /// perplexity ratio moves by chance, as a fraction (ppl ratio ≈ exp(mean ± se)).
    pub delta_nll_se: f64,
}

/// [`score`], and the divergence of `engine`'s predictions from `reference`'s.
pub fn score_against(
    engine: &Engine,
    reference: &Engine,
    tokens: &[u32],
    ctx: usize,
    steps: Steps,
    progress: impl FnMut(usize, usize),
) -> Result<(Scored, Divergence)> {
    if reference.model().config.vocab_size != engine.model().config.vocab_size {
        return Err(Error::invalid(format!(
            "the reference model has a vocabulary of {} tokens, this one {}: they cannot be compared",
            reference.model().config.vocab_size,
            engine.model().config.vocab_size
        )));
    }
    let (scored, d) = score_windows(engine, Some(reference), tokens, ctx, steps, progress)?;
    let d = d
        .ok_or_else(|| Error::invalid("no reference predictions"))?
        .finish(&scored.nll);
    Ok((scored, d))
}

/// Per-prediction sums of the comparison, folded into a [`Divergence`] at the end.
#[derive(Default)]
struct Compared {
    kl: Vec<f64>,
    reference_nll: Vec<f64>,
    same_top1: usize,
}

impl Compared {
    fn add(&mut self, row: &[f32], reference: &[f32], target: usize) {
        self.kl.push(kl_divergence(reference, row));
        self.reference_nll.push(-log_softmax_at(reference, target));
        self.same_top1 += usize::from(argmax(reference) == argmax(row));
    }

    fn finish(mut self, nll: &[f64]) -> Divergence {
        let n = self.kl.len().max(1) as f64;
        let kl_mean = self.kl.iter().sum::<f64>() / n;
        let diff: Vec<f64> = nll
            .iter()
            .zip(&self.reference_nll)
            .map(|(a, b)| a - b)
            .collect();
        let mean = diff.iter().sum::<f64>() / n;
        let var = diff.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / (n - 1.0).max(1.0);
        self.kl.sort_by(f64::total_cmp);
        let at = |q: f64| {
            self.kl
                .get(((self.kl.len() as f64 - 1.0) * q).round() as usize)
        };
        Divergence {
            kl_mean,
            kl_p99: at(0.99).copied().unwrap_or(0.0),
            kl_max: self.kl.last().copied().unwrap_or(0.0),
            top1_agree: self.same_top1 as f64 / n,
            reference_ppl: (self.reference_nll.iter().sum::<f64>() / n).exp(),
            delta_nll_se: (var / n).sqrt(),
        }
    }
}

fn score_windows(
    engine: &Engine,
    reference: Option<&Engine>,
    tokens: &[u32],
    ctx: usize,
    steps: Steps,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Scored, Option<Compared>)> {
    if ctx < 2 {
        return Err(Error::invalid("--ctx must be at least 2"));
    }
    let limit = engine.model().config.max_position_embeddings;
    if ctx > limit {
        return Err(Error::invalid(format!(
            "a window of {ctx} tokens is longer than the model's context of {limit} tokens"
        )));
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(Error::invalid(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let vocab = engine.model().config.vocab_size;
    let mut cache = engine.new_cache();
    let mut reference_cache = reference.map(Engine::new_cache);
    let mut compared = reference.map(|_| Compared::default());
    let (mut nll, mut top1) = (Vec::new(), Vec::new());
    let mut budget = None;
    for w in 0..windows {
        let window = &tokens[w * ctx..(w + 1) * ctx];
        cache.clear();
        engine.prepare_cache(&mut cache, ctx)?;
        budget = cache.eviction_config().map(|c| c.budget);
        let logits = window_logits(engine, window, &mut cache, steps)?;
        let reference_logits = match (reference, reference_cache.as_mut()) {
            (Some(r), Some(c)) => {
                c.clear();
                r.prepare_cache(c, ctx)?;
                Some(window_logits(r, window, c, Steps::Chunked)?)
            }
            _ => None,
        };
        for t in 0..ctx - 1 {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let target = window[t + 1] as usize;
            nll.push(-log_softmax_at(row, target));
            top1.push(argmax(row) == target);
            if let (Some(c), Some(r)) = (compared.as_mut(), reference_logits.as_ref()) {
                c.add(row, &r[t * vocab..(t + 1) * vocab], target);
            }
        }
        progress(w + 1, windows);
    }
    let mean = nll.iter().sum::<f64>() / nll.len() as f64;
    let scored = Scored {
        result: PplResult {
            ppl: mean.exp(),
            tokens: tokens.len(),
            windows,
            ctx,
            protocol: PROTOCOL,
            kv_policy: engine.kv_options().policy.to_string(),
            kv_budget: budget,
        },
        nll,
        top1,
    };
    Ok((scored, compared))
}

/// KL(p ‖ q) of the softmaxes of two logit rows, in f64.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let (lp, lq) = (log_sum_exp(p_logits), log_sum_exp(q_logits));
    p_logits
        .iter()
        .zip(q_logits)
        .map(|(&a, &b)| {
            let log_p = a as f64 - lp;
            log_p.exp() * (log_p - (b as f64 - lq))
        })
        .sum::<f64>()
        .max(0.0)
}

/// Every token's logits of one window, `ctx × vocab`, run in steps that respect the budget.
fn window_logits(
    engine: &Engine,
    window: &[u32],
    cache: &mut KvCache,
    steps: Steps,
) -> Result<Vec<f32>> {
    let mut logits = Vec::new();
    let mut at = 0;
    while at < window.len() {
        let room = match steps {
            Steps::TokenByToken if cache.eviction_config().is_some() => 1,
            _ => cache.room(),
        };
        let end = window.len().min(at.saturating_add(room));
        let out = engine.forward(&mut [BatchItem {
            tokens: &window[at..end],
            cache,
            logits: Logits::All,
        }])?;
        logits.extend_from_slice(&out[0]);
        at = end;
    }
    Ok(logits)
}

/// log p(target) under softmax(row), in f64.
pub fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    row[target] as f64 - log_sum_exp(row)
}

/// log Σ exp(row), in f64, shifted by the maximum so nothing overflows.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    row.iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max
}

/// The first index of the largest value.
fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{default_config, model_from_config};
    use crate::EngineBuilder;
    use std::sync::Arc;

    fn engine(seed: u64) -> Engine {
        let model = model_from_config(default_config(), seed, "test").expect("model");
        EngineBuilder::new(Arc::new(model))
            .threads(1)
            .build()
            .expect("engine")
    }

    /// KL by its definition with explicit probabilities: the reference for `kl_divergence`.
    fn kl_by_definition(p: &[f32], q: &[f32]) -> f64 {
        let probs = |row: &[f32]| {
            let e: Vec<f64> = row.iter().map(|&v| (v as f64).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
        };
        let (p, q) = (probs(p), probs(q));
        p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum()
    }

    #[test]
    fn a_model_against_itself_diverges_by_nothing() {
        let e = engine(7);
        let tokens: Vec<u32> = (0..96).map(|i| (i * 37 % 200) as u32 + 3).collect();
        let (scored, d) =
            score_against(&e, &e, &tokens, 32, Steps::Chunked, |_, _| {}).expect("score");
        assert_eq!(d.kl_mean, 0.0);
        assert_eq!(d.top1_agree, 1.0);
        assert_eq!(d.delta_nll_se, 0.0);
        assert!((d.reference_ppl - scored.result.ppl).abs() < 1e-12 * scored.result.ppl);
    }

    #[test]
    fn divergence_from_another_model_matches_the_definition() {
        let (a, b) = (engine(7), engine(8));
        let tokens: Vec<u32> = (0..64).map(|i| (i * 53 % 200) as u32 + 3).collect();
        let ctx = 32;
        let (scored, d) =
            score_against(&a, &b, &tokens, ctx, Steps::Chunked, |_, _| {}).expect("score");
        // The same from each model's logits of each window, computed here by definition.
        let vocab = a.model().config.vocab_size;
        let (mut kl, mut agree, mut ref_nll) = (Vec::new(), 0usize, 0.0);
        for w in tokens.chunks_exact(ctx) {
            let logits = |e: &Engine| {
                let mut cache = e.new_cache();
                window_logits(e, w, &mut cache, Steps::Chunked).expect("logits")
            };
            let (la, lb) = (logits(&a), logits(&b));
            for t in 0..ctx - 1 {
                let (ra, rb) = (
                    &la[t * vocab..(t + 1) * vocab],
                    &lb[t * vocab..(t + 1) * vocab],
                );
                kl.push(kl_by_definition(rb, ra));
                agree += usize::from(argmax(ra) == argmax(rb));
                ref_nll -= log_softmax_at(rb, w[t + 1] as usize);
            }
        }
        let n = kl.len() as f64;
        let mean = kl.iter().sum::<f64>() / n;
        assert!(mean > 1e-3, "two random models should disagree: KL {mean}");
        assert!(
            (d.kl_mean - mean).abs() <= 1e-9 * mean,
            "{} vs {mean}",
            d.kl_mean
        );
        assert_eq!(d.top1_agree, agree as f64 / n);
        assert!((d.reference_ppl - (ref_nll / n).exp()).abs() <= 1e-9 * d.reference_ppl);
        assert!(d.kl_max >= d.kl_p99 && d.kl_p99 > 0.0);
        assert!(d.delta_nll_se > 0.0);
        assert_ne!(scored.result.ppl, d.reference_ppl);
    }

    #[test]
    fn models_of_other_vocabularies_are_refused() {
        let a = engine(7);
        let mut config = default_config();
        config.vocab_size += 1;
        let model = model_from_config(config, 7, "test").expect("model");
        let b = EngineBuilder::new(Arc::new(model))
            .threads(1)
            .build()
            .expect("engine");
        let tokens: Vec<u32> = (0..64).map(|i| i as u32 + 3).collect();
        let err = score_against(&a, &b, &tokens, 32, Steps::Chunked, |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("vocabulary"), "{err}");
    }
}
