//! YaRN RoPE scaling (`rope_type: "yarn"`, <https://arxiv.org/abs/2309.00071>): the rotation
//! frequencies blend interpolated (divided by `factor`) and original ones along a linear ramp
//! over the dimensions, and cos/sin are multiplied by an attention factor. Computed as
//! transformers' `_compute_yarn_parameters` does, in f32 where it uses float32 tensors, so the
//! angles are the reference's.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A checkpoint's YaRN parameters, resolved (defaults applied, `factor` and the attention
/// factor known).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f64,
    /// The context the model was pretrained with (the ramp's reference length).
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Whether the ramp's ends are rounded outward to whole dimensions.
    pub truncate: bool,
    /// cos and sin are multiplied by this.
    pub attention_factor: f64,
    /// DeepSeek's `mscale_all_dim` (0: none): its softmax scale is multiplied by
    /// `mscale(factor, mscale_all_dim)²` ([`Self::softmax_scale`]).
    pub mscale_all_dim: f64,
}

/// `0.1·m·ln(scale) + 1` for scale above 1, else 1 (transformers' `get_mscale`).
pub fn mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl Yarn {
    /// Reads a `rope_parameters` / `rope_scaling` block of type yarn; `max_positions` is the
    /// config's `max_position_embeddings` (the default pretrained length, and with it the
    /// default factor). Errors name the key.
    pub fn from_block(block: &Value, max_positions: usize) -> Result<Yarn, String> {
        let num = |key: &str| -> Result<Option<f64>, String> {
            match block.get(key).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("{key}: expected a number, got {v}")),
            }
        };
        let original = match num("original_max_position_embeddings")? {
            None => max_positions,
            Some(x) if x >= 1.0 && x.fract() == 0.0 => x as usize,
            Some(x) => {
                return Err(format!(
                    "original_max_position_embeddings: {x} is not a count"
                ))
            }
        };
        let factor = num("factor")?.unwrap_or(max_positions as f64 / original as f64);
        if !(factor.is_finite() && factor > 0.0) {
            return Err(format!("factor: {factor} must be a positive number"));
        }
        let (m, m_all) = (num("mscale")?, num("mscale_all_dim")?);
        // transformers tests the two for truth: absent and 0 are alike.
        let attention_factor = match num("attention_factor")? {
            Some(a) => a,
            None => match (m.filter(|&v| v != 0.0), m_all.filter(|&v| v != 0.0)) {
                (Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
                _ => mscale(factor, 1.0),
            },
        };
        // `or` in transformers: 0 falls back too.
        let beta_fast = num("beta_fast")?.filter(|&v| v != 0.0).unwrap_or(32.0);
        let beta_slow = num("beta_slow")?.filter(|&v| v != 0.0).unwrap_or(1.0);
        let truncate = match block.get("truncate").filter(|v| !v.is_null()) {
            None => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("truncate: expected true/false, got {v}"))?,
        };
        for (key, v) in [
            ("attention_factor", attention_factor),
            ("beta_fast", beta_fast),
            ("beta_slow", beta_slow),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{key}: {v} must be a positive number"));
            }
        }
        Ok(Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            truncate,
            attention_factor,
            mscale_all_dim: m_all.unwrap_or(0.0),
        })
    }

    /// What [`Self::from_block`] guarantees, for a `Yarn` read back from a store's config:
    /// finite parameters, a positive factor, attention factor and betas, a pretrained length.
    pub fn check(&self) -> Result<(), String> {
        for (key, v) in [
            ("factor", self.factor),
            ("attention_factor", self.attention_factor),
            ("beta_fast", self.beta_fast),
            ("beta_slow", self.beta_slow),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{key}: {v} must be a positive number"));
            }
        }
        if !self.mscale_all_dim.is_finite() {
            return Err(format!(
                "mscale_all_dim: {} must be finite",
                self.mscale_all_dim
            ));
        }
        if self.original_max_position_embeddings == 0 {
            return Err("original_max_position_embeddings: must be positive".into());
        }
        Ok(())
    }

    /// The `dim / 2` inverse frequencies of a `dim`-wide rotation with base `theta`.
    pub fn inv_freq(&self, dim: usize, theta: f32) -> Vec<f32> {
        let base = f64::from(theta);
        // The dimension at which a wavelength makes `rotations` turns over the original context.
        let correction_dim = |rotations: f64| {
            let turns = self.original_max_position_embeddings as f64
                / (rotations * 2.0 * std::f64::consts::PI);
            dim as f64 * turns.ln() / (2.0 * base.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        if low == high {
            high += 0.001; // transformers' guard against a zero-width ramp
        }
        let span = (high - low) as f32;
        let low = low as f32;
        let factor = self.factor as f32;
        (0..dim / 2)
            .map(|i| {
                let pos_freq = theta.powf((2 * i) as f32 / dim as f32);
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (factor * pos_freq);
                let ramp = ((i as f32 - low) / span).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                interpolation * (1.0 - keep) + extrapolation * keep
            })
            .collect()
    }

    /// What DeepSeek multiplies its softmax scale by: `mscale(factor, mscale_all_dim)²`, or 1
    /// without `mscale_all_dim`.
    pub fn softmax_scale(&self) -> f64 {
        if self.mscale_all_dim == 0.0 {
            return 1.0;
        }
        let m = mscale(self.factor, self.mscale_all_dim);
        m * m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plain(dim: usize, theta: f32) -> Vec<f32> {
        (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
            .collect()
    }

    /// High frequencies (many turns over the original context) stay, low ones are divided by
    /// the factor, and the ramp between moves monotonically from one to the other.
    #[test]
    fn frequencies_blend_from_kept_to_interpolated() {
        let y = Yarn::from_block(
            &json!({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}),
            32768,
        )
        .unwrap();
        let (dim, theta) = (64, 10000.0);
        let (got, base) = (y.inv_freq(dim, theta), plain(dim, theta));
        assert_eq!(got.len(), dim / 2);
        assert_eq!(got[0], base[0]);
        let last = dim / 2 - 1;
        assert!((got[last] - base[last] / 8.0).abs() <= 1e-6 * base[last]);
        let ratio: Vec<f32> = got.iter().zip(&base).map(|(g, b)| g / b).collect();
        assert!(ratio.windows(2).all(|w| w[1] <= w[0] + 1e-6), "{ratio:?}");
        assert!(
            ratio.iter().any(|r| *r < 0.99 && *r > 0.13),
            "a ramp: {ratio:?}"
        );
        // No mscale pair: the paper's 0.1·ln(factor) + 1.
        assert!((y.attention_factor - (0.1 * 8f64.ln() + 1.0)).abs() < 1e-12);
        assert_eq!(y.softmax_scale(), 1.0);
    }

    /// DeepSeek-V3's block: mscale = mscale_all_dim makes the cos/sin factor 1 and moves the
    /// scaling into the softmax; factor defaults to max / original.
    #[test]
    fn deepseek_mscale_moves_into_the_softmax() {
        let y = Yarn::from_block(
            &json!({"type": "yarn", "mscale": 1.0, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096}),
            163840,
        )
        .unwrap();
        assert_eq!(y.factor, 40.0);
        assert_eq!(y.attention_factor, 1.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((y.softmax_scale() - m * m).abs() < 1e-12);
        for (block, key) in [
            (json!({"factor": -1.0}), "factor"),
            (json!({"factor": 2.0, "beta_fast": "x"}), "beta_fast"),
            (
                json!({"factor": 2.0, "original_max_position_embeddings": 0.5}),
                "original_max_position_embeddings",
            ),
            (json!({"factor": 2.0, "truncate": 1}), "truncate"),
        ] {
            let e = Yarn::from_block(&block, 1024).unwrap_err();
            assert!(e.starts_with(key), "{key}: {e}");
        }
    }

    /// Every dimension by how often it turns in the original context: at least `beta_fast`
    /// turns kept, at most `beta_slow` divided by the factor, between them in between; the
    /// ramp's ends rounded out under `truncate`.
    #[test]
    fn ramp_follows_the_turns_in_the_original_context() {
        let y = Yarn {
            factor: 4.0,
            original_max_position_embeddings: 256,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: false,
            attention_factor: 1.25,
            mscale_all_dim: 0.0,
        };
        let (dim, theta) = (16, 10000f32);
        let (base, f) = (plain(dim, theta), y.inv_freq(dim, theta));
        let turns = |i: usize| 256.0 * base[i] / (2.0 * std::f32::consts::PI);
        for i in 0..dim / 2 {
            if turns(i) >= 32.0 {
                assert_eq!(f[i], base[i], "{i}");
            } else if turns(i) <= 1.0 {
                assert!((f[i] - base[i] / 4.0).abs() < 1e-9, "{i}");
            } else {
                assert!(f[i] < base[i] && f[i] > base[i] / 4.0, "{i}");
            }
        }
        let truncated = Yarn {
            truncate: true,
            ..y
        };
        assert_ne!(truncated.inv_freq(dim, theta), f);
        assert_eq!(y.check(), Ok(()));
        for bad in [
            Yarn { factor: 0.0, ..y },
            Yarn {
                beta_slow: f64::NAN,
                ..y
            },
            Yarn {
                original_max_position_embeddings: 0,
                ..y
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
