//! The outlier stress variant of a model: multiply a few channels of the norms before attention
//! and before the feed-forward by a factor and divide the matching input columns of the linears
//! that read them. The f32 function is unchanged, but activations now carry the large, channel-
//! aligned outliers real LLMs have — the case smoothing exists for.

use super::ffn_input_linears;
use crate::model::weights::{Linear, Norm};
use crate::model::Model;

/// Scales channels `channels` (per layer, the same ones) by `factor`.
pub fn inject(model: &mut Model, channels: &[usize], factor: f32) {
    for layer in &mut model.weights.layers {
        scale_norm(&mut layer.attn_norm, channels, factor);
        for lin in super::attn_input_linears(&mut layer.attn) {
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
    channels
        .iter()
        .for_each(|&c| lin.map_input_channel(c, |v| v / factor));
}

/// The feed-forward outlier variant: in every gated MLP (each expert), `channels` of the
/// intermediate activation are multiplied by `factor` through the up-projection's rows, and the
/// down-projection's matching columns divided by it. `act(gate·x) ⊙ (up·x)` is linear in each
/// row of `up`, so the f32 function is unchanged, while the down-projection's input now has
/// outliers that no norm precedes.
pub fn inject_ffn(model: &mut Model, channels: &[usize], factor: f32) {
    for layer in &mut model.weights.layers {
        for mlp in super::gated_mlps(&mut layer.ffn) {
            let mut s = vec![1f32; mlp.up.out_features];
            channels.iter().for_each(|&c| s[c] = factor);
            mlp.up.scale_output_channels(&s);
            for &c in channels {
                mlp.down.map_input_channel(c, |v| v / factor);
            }
        }
    }
}

/// Two intermediate channels of an MLP `ffn` wide (deterministic).
pub fn default_ffn_channels(ffn: usize) -> Vec<usize> {
    vec![ffn / 3 + 1, (2 * ffn) / 3 + 2]
}

/// Four channels spread over the hidden width (deterministic).
pub fn default_channels(hidden: usize) -> Vec<usize> {
    (0..4)
        .map(|i| (i * hidden / 4 + hidden / 8 + 3) % hidden)
        .collect()
}
