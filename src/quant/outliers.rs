//! The outlier stress variant of a model: multiply a few channels of the norms before attention
//! and before the feed-forward by a factor and divide the matching input columns of the linears
//! that read them. The f32 function is unchanged, but activations now carry the large, channel-
//! aligned outliers real LLMs have — the case smoothing exists for.

use super::ffn_input_linears;
use crate::model::weights::{Linear, LinearWeight, Norm};
use crate::model::Model;

/// Scales channels `channels` (per layer, the same ones) by `factor`.
pub fn inject(model: &mut Model, channels: &[usize], factor: f32) {
    for layer in &mut model.weights.layers {
        scale_norm(&mut layer.attn_norm, channels, factor);
        let a = &mut layer.attn;
        for lin in [&mut a.q, &mut a.k, &mut a.v] {
            divide_columns(lin, channels, factor);
        }
        scale_norm(&mut layer.ffn_norm, channels, factor);
        for lin in ffn_input_linears(&mut layer.ffn) {
            divide_columns(lin, channels, factor);
        }
    }
}

fn scale_norm(norm: &mut Norm, channels: &[usize], factor: f32) {
    match norm {
        Norm::Rms { weight, .. } => channels.iter().for_each(|&c| weight[c] *= factor),
        Norm::Layer { weight, bias, .. } => channels.iter().for_each(|&c| {
            weight[c] *= factor;
            bias[c] *= factor;
        }),
    }
}

fn divide_columns(lin: &mut Linear, channels: &[usize], factor: f32) {
    if let LinearWeight::F32(w) = &mut lin.weight {
        channels
            .iter()
            .for_each(|&c| w.map_column(c, |v| v / factor));
    }
}

/// Four channels spread over the hidden width (deterministic).
pub fn default_channels(hidden: usize) -> Vec<usize> {
    (0..4)
        .map(|i| (i * hidden / 4 + hidden / 8 + 3) % hidden)
        .collect()
}
