//! Fact recall measured directly: given the strings of a text's facts, find where each one's
//! tokens occur inside each scored window, and compare the predictions at its first mention in
//! the window (nothing to copy from) with those at its later mentions (copyable, if the cache
//! still holds the first).

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
                for j in i..i + needle.len() {
                    let p = w * (ctx - 1) + j - 1;
                    acc.add(scored.nll[p], scored.top1[p]);
                }
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
    })
}

#[derive(Default)]
struct Acc {
    n: usize,
    nll: f64,
    hits: usize,
}

impl Acc {
    fn add(&mut self, nll: f64, top1: bool) {
        self.n += 1;
        self.nll += nll;
        self.hits += top1 as usize;
    }
    fn mean_nll(&self) -> f64 {
        self.nll / self.n.max(1) as f64
    }
    fn top1_rate(&self) -> f64 {
        self.hits as f64 / self.n.max(1) as f64
    }
}
