//! Token sampling: greedy, or temperature → top-k → top-p (the order transformers applies them),
//! from a seeded RNG so a seed reproduces a completion exactly.

#![warn(missing_docs)]

use crate::error::{Error, Result};
use crate::util::rng::SplitMix64;

/// How the next token is chosen. The default is greedy (the most likely token).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// The random generator's seed: the same seed and request give the same text.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Draws tokens from logits as its [`SamplingParams`] say.
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = SplitMix64::new(params.seed);
        Sampler { params, rng }
    }

    /// The next token. Non-finite logits are an error (a model that produced them is broken;
    /// no token is a fair answer). A temperature so small that `logit / t` overflows behaves
    /// as greedy, which is its limit.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if let Some(bad) = logits.iter().position(|l| !l.is_finite()) {
            return Err(Error::invalid(format!(
                "the model produced a non-finite logit ({}) for token id {bad}",
                logits[bad]
            )));
        }
        if logits.is_empty() {
            return Err(Error::invalid("the model produced no logits"));
        }
        let t = self.params.temperature;
        let max_abs = logits.iter().fold(0f32, |m, l| m.max(l.abs()));
        if t <= 0.0 || !(max_abs / t).is_finite() {
            return Ok(argmax(logits));
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        cands.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            cands.truncate(self.params.top_k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f64> = cands.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.uniform() * total;
        for (i, p) in probs.iter().enumerate() {
            u -= p;
            if u < 0.0 {
                return Ok(cands[i].0);
            }
        }
        Ok(cands[probs.len() - 1].0)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]).unwrap(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(Sampler::new(p).sample(&logits).unwrap(), argmax(&logits));
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits).unwrap()).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits).unwrap()).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Token 0 carries ~88% of the mass; top_p 0.5 must always pick it.
        let logits = [4.0, 2.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        });
        assert!((0..200).all(|_| s.sample(&logits).unwrap() == 0));
        // With temperature the distribution is sampled: more than one token must appear.
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            seed: 3,
            ..Default::default()
        });
        let picks: std::collections::HashSet<u32> =
            (0..200).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(picks.len() > 1);
    }

    /// Temperatures so small that logits/t overflow pick the most likely token (their limit),
    /// never the least likely; NaN and inf logits are an error, never a token.
    #[test]
    fn tiny_temperatures_are_greedy_and_bad_logits_fail() {
        let logits = [1.0, 30.0, -5.0, 29.5];
        for t in [1e-40, 1e-38, 1e-30, f32::MIN_POSITIVE] {
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            });
            assert_eq!(s.sample(&logits).unwrap(), 1, "t = {t}");
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.7,
            ..SamplingParams::default()
        });
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let err = s.sample(&[0.0, bad, 1.0]).unwrap_err().to_string();
            assert!(
                err.contains("non-finite logit") && err.contains("token id 1"),
                "{err}"
            );
        }
        assert!(s.sample(&[]).is_err());
    }
}
