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
    mut progress: impl FnMut(usize, usize),
) -> Result<Scored> {
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
    let (mut nll, mut top1) = (Vec::new(), Vec::new());
    let mut budget = None;
    for w in 0..windows {
        let window = &tokens[w * ctx..(w + 1) * ctx];
        cache.clear();
        engine.prepare_cache(&mut cache, ctx)?;
        budget = cache.eviction_config().map(|c| c.budget);
        let logits = window_logits(engine, window, &mut cache, steps)?;
        for t in 0..ctx - 1 {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let target = window[t + 1] as usize;
            nll.push(-log_softmax_at(row, target));
            top1.push(argmax(row) == target);
        }
        progress(w + 1, windows);
    }
    let mean = nll.iter().sum::<f64>() / nll.len() as f64;
    Ok(Scored {
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
    })
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
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row[target] as f64 - lse
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
