//! Row-wise f32 operations of the forward pass: norms, activations, softmax, RoPE.

use crate::model::config::Activation;
use crate::model::weights::Norm;

/// Normalizes each `dim`-wide row of `x` into `out`.
pub fn norm_rows(norm: &Norm, x: &[f32], dim: usize, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        match norm {
            Norm::Rms { weight, eps, .. } => {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
                    *o = w * (v * r);
                }
            }
            Norm::Layer {
                weight, bias, eps, ..
            } => {
                let mean = xr.iter().sum::<f32>() / dim as f32;
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
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = activate(act, *g) * u;
    }
}

pub fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// In-place softmax, computed stably.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

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
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32) -> Rope {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { inv_freq }
    }

    /// Rotates each `head_dim` slice of `x` (rotate-half convention) for `position`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, position: usize) {
        let half = head_dim / 2;
        let cs: Vec<(f32, f32)> = self
            .inv_freq
            .iter()
            .map(|&f| {
                let a = position as f32 * f;
                (a.cos(), a.sin())
            })
            .collect();
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
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
