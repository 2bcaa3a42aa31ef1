//! Perplexity with the GPTQ / SmoothQuant protocol: the whole text tokenized at once with no
//! BOS, cut into non-overlapping full windows of `ctx` tokens (the tail dropped), each window
//! scored from an empty cache; ppl = exp(mean NLL of the ctx−1 next-token predictions of all
//! windows).

use super::{BatchItem, Engine, Logits};
use crate::error::{Error, Result};

pub const PROTOCOL: &str = "non-overlapping windows, no BOS, each window from an empty cache, exp(mean NLL of ctx-1 predictions per window)";

#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    pub ppl: f64,
    pub tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    pub protocol: &'static str,
}

/// `progress(done, total)` is called after each window.
pub fn perplexity(
    engine: &Engine,
    tokens: &[u32],
    ctx: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<PplResult> {
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
    let mut nll = 0f64;
    for w in 0..windows {
        let window = &tokens[w * ctx..(w + 1) * ctx];
        let mut cache = engine.new_cache();
        let logits = engine.forward(&mut [BatchItem {
            tokens: window,
            cache: &mut cache,
            logits: Logits::All,
        }])?;
        let logits = &logits[0];
        for t in 0..ctx - 1 {
            nll -= log_softmax_at(&logits[t * vocab..(t + 1) * vocab], window[t + 1] as usize);
        }
        progress(w + 1, windows);
    }
    let count = windows * (ctx - 1);
    Ok(PplResult {
        ppl: (nll / count as f64).exp(),
        tokens: tokens.len(),
        windows,
        ctx,
        protocol: PROTOCOL,
    })
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
