//! Fact recall measured directly: given the strings of a text's facts, find where each one's
//! tokens occur inside each scored window, and compare the predictions at its first mention in
//! the window (nothing to copy from) with those at its later mentions (copyable, if the cache
//! still holds the first).
//!
//! Beside the per-token rates, each mention counts as *reproduced* when every one of its tokens
//! is predicted top-1. That is exactly what greedy generation from the text just before the
//! mention would write: while each prediction is the text's next token, the greedy
//! continuation feeds the same tokens the scoring does, so its cache evolves the same way
//! (evictions included). `tests/kv_eviction.rs` checks this against real greedy generations.

use super::ppl::Scored;
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecallResult {
    /// Fact tokens scored at first mentions and at repeats.
    pub first_tokens: usize,
    pub repeat_tokens: usize,
    /// Mean NLL (nats) over those tokens.
    pub first_nll: f64,
    pub repeat_nll: f64,
    /// Fraction of the tokens predicted top-1.
    pub first_top1: f64,
    pub repeat_top1: f64,
    /// Mentions scored: first ones and repeats.
    pub first_mentions: usize,
    pub repeat_mentions: usize,
    /// Fraction of the mentions whose every token is predicted top-1: the facts greedy
    /// generation from the text before them writes out exactly (the accuracy LazyEviction's
    /// paper reports, where perplexity only weighs the tokens).
    pub first_reproduced: f64,
    pub repeat_reproduced: f64,
}

/// Scores the mentions of `facts` (each encoded with a leading space, as it follows a word in
/// the text) in the windows `scored` came from.
pub fn recall(
    tokenizer: &Tokenizer,
    tokens: &[u32],
    scored: &Scored,
    facts: &[String],
) -> Result<RecallResult> {
    let ctx = scored.result.ctx;
    let (mut first, mut repeat) = (Acc::default(), Acc::default());
    let needles: Vec<Vec<u32>> = facts
        .iter()
        .map(|f| tokenizer.encode(&format!(" {}", f.trim()), false))
        .collect::<Result<_>>()?;
    for w in 0..scored.result.windows {
        let window = &tokens[w * ctx..(w + 1) * ctx];
        for needle in needles.iter().filter(|n| !n.is_empty()) {
            // Token 0 of a window is never predicted.
            let hits = (1..window.len().saturating_sub(needle.len() - 1))
                .filter(|&i| window[i..i + needle.len()] == needle[..]);
            for (k, i) in hits.enumerate() {
                let acc = if k == 0 { &mut first } else { &mut repeat };
                let mut reproduced = true;
                for j in i..i + needle.len() {
                    let p = w * (ctx - 1) + j - 1;
                    acc.add(scored.nll[p], scored.top1[p]);
                    reproduced &= scored.top1[p];
                }
                acc.mention(reproduced);
            }
        }
    }
    if first.n == 0 {
        return Err(Error::invalid(
            "none of the facts occurs in the scored windows (check the facts file and --ctx)",
        ));
    }
    Ok(RecallResult {
        first_tokens: first.n,
        repeat_tokens: repeat.n,
        first_nll: first.mean_nll(),
        repeat_nll: repeat.mean_nll(),
        first_top1: first.top1_rate(),
        repeat_top1: repeat.top1_rate(),
        first_mentions: first.mentions,
        repeat_mentions: repeat.mentions,
        first_reproduced: first.reproduced_rate(),
        repeat_reproduced: repeat.reproduced_rate(),
    })
}

#[derive(Default)]
struct Acc {
    n: usize,
    nll: f64,
    hits: usize,
    mentions: usize,
    reproduced: usize,
}

impl Acc {
    fn add(&mut self, nll: f64, top1: bool) {
        self.n += 1;
        self.nll += nll;
        self.hits += top1 as usize;
    }
    fn mention(&mut self, reproduced: bool) {
        self.mentions += 1;
        self.reproduced += reproduced as usize;
    }
    fn reproduced_rate(&self) -> f64 {
        self.reproduced as f64 / self.mentions.max(1) as f64
    }
    fn mean_nll(&self) -> f64 {
        self.nll / self.n.max(1) as f64
    }
    fn top1_rate(&self) -> f64 {
        self.hits as f64 / self.n.max(1) as f64
    }
}
