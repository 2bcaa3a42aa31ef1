//! SmoothQuant (Xiao et al., 2023): per input channel j, s_j = max|X_j|^α / max|W_:,j|^(1−α),
//! the weight max taken over every linear that reads the same input. X/s is easier to quantize
//! per token and W·s barely harder per channel; the product is unchanged. 1/s is folded into
//! the preceding norm where there is one, otherwise kept as a per-channel input scale that the
//! int8 kernel applies while quantizing activations.

use super::calibrate::InputStats;
use crate::backend::cpu::int8::{quantize_rows, Int8Matrix, QuantizedRows};
use crate::backend::cpu::matmul::matmul;
use crate::model::weights::{Linear, Norm};
use std::collections::HashMap;

/// Candidate α values for `--alpha auto`.
pub const ALPHA_GRID: [f32; 7] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

pub fn factors(x_max: &[f32], members: &[&mut Linear], alpha: f32) -> Vec<f32> {
    let k = x_max.len();
    let mut w_max = vec![0f32; k];
    for lin in members {
        if let Some(w) = lin.f32_rows() {
            for row in w.chunks(k) {
                for (m, v) in w_max.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
        }
    }
    x_max
        .iter()
        .zip(&w_max)
        .map(|(&x, &w)| {
            if x <= 0.0 || w <= 0.0 {
                return 1.0;
            }
            (x.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5)
        })
        .collect()
}

/// Multiplies the weight columns of every member by `s`.
pub fn scale_columns(members: &mut [&mut Linear], s: &[f32]) {
    for lin in members.iter_mut() {
        for (i, &f) in s.iter().enumerate() {
            lin.map_input_channel(i, |v| v * f);
        }
    }
}

/// Divides a norm's output (weight, and bias for LayerNorm) by `s`.
pub fn fold_into_norm(norm: &mut Norm, s: &[f32]) {
    match norm {
        Norm::Rms { weight, .. } => weight.iter_mut().zip(s).for_each(|(w, f)| *w /= f),
        Norm::Layer { weight, bias, .. } => {
            weight.iter_mut().zip(s).for_each(|(w, f)| *w /= f);
            bias.iter_mut().zip(s).for_each(|(b, f)| *b /= f);
        }
    }
}

/// The statistics of an input that is now X/s.
pub fn rescale_stats(stats: &mut InputStats, s: &[f32]) {
    let k = stats.k;
    stats.max_abs.iter_mut().zip(s).for_each(|(m, f)| *m /= f);
    for i in 0..k {
        for j in 0..k {
            stats.hessian[i * k + j] /= s[i] * s[j];
        }
    }
    for row in stats.samples.chunks_mut(k) {
        row.iter_mut().zip(s).for_each(|(v, f)| *v /= f);
    }
}

/// Scores smoothing factors for one group by the relative output error of W8A8 on the sampled
/// inputs, summed over the members that become int8 (the router stays f32): what the α search
/// minimizes. The f32 weights and exact outputs are taken once, whatever the candidates.
pub struct ErrorProbe<'a> {
    stats: &'a InputStats,
    /// Per int8 member: its f32 weights `[n, k]`, n, and its exact outputs on the samples.
    members: Vec<(Vec<f32>, usize, Vec<f32>)>,
}

impl<'a> ErrorProbe<'a> {
    pub fn new(stats: &'a InputStats, members: &[&mut Linear]) -> ErrorProbe<'a> {
        let (k, rows) = (stats.k, stats.sample_rows());
        let members = members
            .iter()
            .filter(|l| super::is_quantized_layer(&l.name))
            .filter_map(|lin| {
                let w = lin.f32_rows()?;
                let n = lin.out_features;
                let mut exact = vec![0f32; rows * n];
                matmul(&stats.samples, rows, &w, n, k, None, &mut exact);
                Some((w, n, exact))
            })
            .collect();
        ErrorProbe { stats, members }
    }

    /// The summed relative error after smoothing by `s`.
    pub fn error(&self, s: &[f32]) -> f64 {
        let (k, rows) = (self.stats.k, self.stats.sample_rows());
        if rows == 0 {
            return 0.0;
        }
        let xs: Vec<f32> = self
            .stats
            .samples
            .chunks(k)
            .flat_map(|r| r.iter().zip(s).map(|(v, f)| v / f))
            .collect();
        let mut q = QuantizedRows::new();
        quantize_rows(&xs, rows, k, &mut q);
        let q = &q;
        let xdq: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let scale = q.scales[r];
                q.row(r)[..k].iter().map(move |&v| v as f32 * scale)
            })
            .collect();
        let mut total = 0.0;
        for (w, n, exact) in &self.members {
            let n = *n;
            let ws: Vec<f32> = w
                .chunks(k)
                .flat_map(|r| r.iter().zip(s).map(|(v, f)| v * f))
                .collect();
            let Ok(wq) = Int8Matrix::quantize_rtn(&ws, n, k) else {
                continue;
            };
            // Through the f32 kernel: the dequantized int8 values are exact in f32, and its
            // rounding (~1e-7 relative) is far below the quantization error compared.
            let wq = &wq;
            let wdq: Vec<f32> = (0..n)
                .flat_map(|j| {
                    let scale = wq.scales[j];
                    wq.row(j)[..k].iter().map(move |&v| v as f32 * scale)
                })
                .collect();
            let mut approx = vec![0f32; rows * n];
            matmul(&xdq, rows, &wdq, n, k, None, &mut approx);
            let (mut num, mut den) = (0f64, 0f64);
            for (&a, &e) in approx.iter().zip(exact) {
                num += (a as f64 - e as f64).powi(2);
                den += (e as f64).powi(2);
            }
            total += num / den.max(1e-30);
        }
        total
    }
}

/// Smooths one group of linears that read the same input. `stat_keys` are every record of that
/// input (the group's and per-expert subsets), all rescaled; `x_key` gives max |X| and samples.
/// Returns the factors, or `None` when the input was never observed.
pub fn smooth_group(
    members: &mut [&mut Linear],
    x_key: &str,
    stat_keys: &[String],
    stats: &mut HashMap<String, InputStats>,
    alpha: Option<f32>,
) -> Option<(Vec<f32>, f32)> {
    let x_stats = stats.get(x_key)?;
    let alpha = match alpha {
        Some(a) => a,
        None => {
            let probe = ErrorProbe::new(x_stats, members);
            ALPHA_GRID
                .iter()
                .map(|&a| (a, probe.error(&factors(&x_stats.max_abs, members, a))))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0.5, |best| best.0)
        }
    };
    let s = factors(&x_stats.max_abs, members, alpha);
    scale_columns(members, &s);
    for key in stat_keys {
        if let Some(st) = stats.get_mut(key) {
            rescale_stats(st, &s);
        }
    }
    Some((s, alpha))
}

/// Attention's shape, for the v → o fold and the per-head value rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Values per head (o_proj reads `num_heads × head_dim`).
    pub head_dim: usize,
    /// Output channels of the value projection per KV head, and where its values start among
    /// them: `head_dim` and 0 for v_proj; under latent attention kv_b_proj gives each head its
    /// unrotated key part first, then its values.
    pub v_stride: usize,
    pub v_offset: usize,
}

impl HeadLayout {
    pub fn of(cfg: &crate::model::config::ModelConfig) -> HeadLayout {
        match cfg.options.mla {
            Some(m) => HeadLayout {
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_heads,
                head_dim: m.v_head_dim,
                v_stride: m.qk_nope_head_dim + m.v_head_dim,
                v_offset: m.qk_nope_head_dim,
            },
            None => HeadLayout {
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                v_stride: cfg.head_dim,
                v_offset: 0,
            },
        }
    }

    /// The value projection's output channel holding KV channel `c` (`c < num_kv_heads ×
    /// head_dim`).
    pub fn v_channel(&self, c: usize) -> usize {
        (c / self.head_dim) * self.v_stride + self.v_offset + c % self.head_dim
    }

    /// Applies `f` to each KV head's values within a vector over the value projection's outputs.
    pub fn for_each_head_values(&self, col: &mut [f32], mut f: impl FnMut(&mut [f32])) {
        for h in 0..self.num_kv_heads {
            let start = h * self.v_stride + self.v_offset;
            f(&mut col[start..start + self.head_dim]);
        }
    }
}

/// Smooths o_proj's input exactly through v_proj: attention mixes value rows linearly, so
/// dividing v's output channel c by s_c divides channel c of every query head reading that KV
/// head, and o's matching columns take s_c. One s per KV channel, from the largest |x| and |w|
/// over the query heads of its group. Returns the α used, or `None` without o's statistics.
pub fn fold_v_into_o(
    v: &mut Linear,
    o: &mut Linear,
    layout: &HeadLayout,
    stats: &mut HashMap<String, InputStats>,
    alpha: Option<f32>,
) -> Option<f32> {
    let key = super::calibrate::input_key(&o.name);
    let o_stats = stats.get(&key)?;
    let HeadLayout {
        num_heads,
        num_kv_heads,
        head_dim,
        v_stride,
        ..
    } = *layout;
    if num_kv_heads == 0
        || num_heads % num_kv_heads != 0
        || o.in_features != num_heads * head_dim
        || v.out_features != num_kv_heads * v_stride
    {
        return None;
    }
    let group = num_heads / num_kv_heads;
    // o's input channel → the KV channel it reads.
    let kv_of = |j: usize| (j / head_dim / group) * head_dim + j % head_dim;
    let kv_dim = num_kv_heads * head_dim;
    let (mut x_max, mut w_max) = (vec![0f32; kv_dim], vec![0f32; kv_dim]);
    for (j, &x) in o_stats.max_abs.iter().enumerate() {
        x_max[kv_of(j)] = x_max[kv_of(j)].max(x);
    }
    let w = o.f32_rows()?;
    for row in w.chunks(o.in_features) {
        for (j, &v) in row.iter().enumerate() {
            w_max[kv_of(j)] = w_max[kv_of(j)].max(v.abs());
        }
    }
    let o_in = o.in_features;
    let s_for = |alpha: f32| -> Vec<f32> {
        let s_kv: Vec<f32> = x_max
            .iter()
            .zip(&w_max)
            .map(|(&x, &w)| {
                if x <= 0.0 || w <= 0.0 {
                    1.0
                } else {
                    (x.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5)
                }
            })
            .collect();
        (0..o_in).map(|j| s_kv[kv_of(j)]).collect()
    };
    let alpha = match alpha {
        Some(a) => a,
        None => {
            let probe = ErrorProbe::new(o_stats, &[&mut *o]);
            ALPHA_GRID
                .iter()
                .map(|&a| (a, probe.error(&s_for(a))))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0.5, |best| best.0)
        }
    };
    let s_o = s_for(alpha);
    // v's other output channels (a latent attention's unrotated keys) keep their scale.
    let mut inv_v = vec![1f32; v.out_features];
    for c in 0..kv_dim {
        let j = (c / head_dim) * group * head_dim + c % head_dim;
        inv_v[layout.v_channel(c)] = 1.0 / s_o[j];
    }
    v.scale_output_channels(&inv_v);
    scale_columns(&mut [o], &s_o);
    if let Some(st) = stats.get_mut(&key) {
        rescale_stats(st, &s_o);
    }
    Some(alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kv_b_proj's rows per head are `[unrotated key | values]`: the value channels are the ones
    /// after each head's key part, and `for_each_head_values` visits exactly those.
    #[test]
    fn latent_value_channels_skip_the_unrotated_keys() {
        let l = HeadLayout {
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 3,
            v_stride: 5,
            v_offset: 2,
        };
        let channels: Vec<usize> = (0..6).map(|c| l.v_channel(c)).collect();
        assert_eq!(channels, [2, 3, 4, 7, 8, 9]);
        let mut col: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let mut seen = Vec::new();
        l.for_each_head_values(&mut col, |v| seen.extend_from_slice(v));
        assert_eq!(seen, [2.0, 3.0, 4.0, 7.0, 8.0, 9.0]);
    }
}
