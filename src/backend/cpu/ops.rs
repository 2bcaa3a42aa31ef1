//! Row-wise f32 operations of the forward pass: norms, activations, softmax, RoPE.

use super::simd;
use crate::model::config::{Activation, ClampedSwiglu};
pub use crate::model::rotation::{dct_entry, hadamard_in_blocks, rotate_rows, rotate_rows_back};
use crate::model::weights::Norm;

/// Normalizes each `dim`-wide row of `x` into `out`.
pub fn norm_rows(norm: &Norm, x: &[f32], dim: usize, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        match norm {
            Norm::Rms { weight, eps, .. } => {
                let ms = simd::sum_squares(xr) / dim as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
                    *o = w * (v * r);
                }
            }
            Norm::Layer {
                weight, bias, eps, ..
            } => {
                let mean = simd::sum(xr) / dim as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                let r = 1.0 / (var + eps).sqrt();
                for (((o, &v), &w), &b) in or.iter_mut().zip(xr).zip(weight).zip(bias) {
                    *o = (v - mean) * r * w + b;
                }
            }
        }
    }
}

pub fn activate(act: Activation, v: f32) -> f32 {
    match act {
        Activation::Silu => v / (1.0 + (-v).exp()),
        Activation::Relu => v.max(0.0),
        // Exact (erf) GELU, as torch's default.
        Activation::Gelu => 0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f32::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044_715 * v * v * v)).tanh())
        }
    }
}

/// `gate ← act(gate) ⊙ up`, the gated-MLP middle.
pub fn gated_activation(act: Activation, gate: &mut [f32], up: &[f32]) {
    if act == Activation::Silu {
        super::vexp::silu_in_place(gate);
        gate.iter_mut().zip(up).for_each(|(g, &u)| *g *= u);
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = activate(act, *g) * u;
    }
}

/// `gate ← (up' + 1) · g · sigmoid(alpha · g)` with `g = min(gate, limit)` and `up'` = `up`
/// clamped to `[-limit, limit]` (GPT-OSS's experts; transformers' `GptOssExperts._apply_gate`).
pub fn clamped_swiglu(s: ClampedSwiglu, gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = g.min(s.limit);
        let u = u.clamp(-s.limit, s.limit);
        *g = (u + 1.0) * (x * sigmoid(x * s.alpha));
    }
}

pub fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

pub use super::vexp::softmax;

/// Abramowitz–Stegun 7.1.26 is too coarse for logit tests; use the f64 series/continued form.
fn erf(x: f32) -> f32 {
    // erf = 1 − erfc, with the Numerical Recipes erfc approximation (fractional error < 1.2e-7,
    // below f32 resolution of the GELU output). Horner form over a table (a nested expression
    // of this depth makes rustfmt take half a minute).
    const C: [f64; 10] = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let poly = C.iter().rev().fold(0.0, |acc, &c| acc * t + c);
    let y = 1.0 - t * (-x * x + poly).exp();
    (if x >= 0.0 { y } else { -y }) as f32
}

/// Rotary embedding tables for one head dimension, as transformers computes them (in f32).
pub struct Rope {
    inv_freq: Vec<f32>,
    scale: f32,
}

impl Rope {
    /// The rotation of the given inverse frequencies, cos and sin multiplied by `scale`
    /// (YaRN's attention factor; 1 otherwise).
    pub fn from_freqs(inv_freq: Vec<f32>, scale: f32) -> Rope {
        Rope { inv_freq, scale }
    }

    pub fn new(head_dim: usize, theta: f32) -> Rope {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope {
            inv_freq,
            scale: 1.0,
        }
    }

    /// The cos/sin of every angle at each of `positions`, computed once per forward pass and
    /// shared by all layers (sin/cos are the costly part of applying the rotation).
    pub fn table(&self, positions: &[usize]) -> RopeTable {
        let scale = self.scale;
        let cos_sin = positions
            .iter()
            .flat_map(|&p| {
                self.inv_freq.iter().map(move |&f| {
                    let a = p as f32 * f;
                    // × 1.0 leaves every value as it was (plain RoPE).
                    (a.cos() * scale, a.sin() * scale)
                })
            })
            .collect();
        RopeTable {
            half: self.inv_freq.len(),
            cos_sin,
        }
    }
}

/// Rotation angles for the rows of one forward pass.
pub struct RopeTable {
    half: usize,
    cos_sin: Vec<(f32, f32)>,
}

impl RopeTable {
    /// Rotates each `2·half`-wide head of `x` (rotate-half convention) by row `row`'s angles.
    pub fn apply(&self, row: usize, x: &mut [f32]) {
        self.apply_heads(row, x, 2 * self.half);
    }

    /// [`Self::apply`] on the first `2·half` values of each `head_dim`-wide head of `x`, the
    /// rest left as they are (partial rotary).
    pub fn apply_heads(&self, row: usize, x: &mut [f32], head_dim: usize) {
        let half = self.half;
        let cs = &self.cos_sin[row * half..(row + 1) * half];
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = head[..2 * half].split_at_mut(half);
            for ((a, b), &(c, s)) in a.iter_mut().zip(b.iter_mut()).zip(cs) {
                let (x0, x1) = (*a, *b);
                *a = x0 * c - x1 * s;
                *b = x1 * c + x0 * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (-1.0, -0.842_700_8),
        ] {
            assert!(
                (erf(x) - want).abs() < 2e-7,
                "erf({x}) = {} vs {want}",
                erf(x)
            );
        }
    }
}
