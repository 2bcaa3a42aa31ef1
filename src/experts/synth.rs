//! Synthetic MoE checkpoints whose routing looks like a trained model's, for paging benchmarks:
//! random routers route uniformly and every expert is equally hot, which no real model does.
//!
//! How the routing is shaped (Mixtral architecture, byte-level tokenizer, W8A8 experts written
//! straight as int8, so a multi-gigabyte store never exists as f32):
//! - hidden channel 0 of every token embedding holds a constant `anchor`; router row `(l, e)`
//!   puts `bias[l][e] / anchor` there, so after the norm each expert gets a fixed logit offset:
//!   popularity follows `bias` (Zipf-like, `skew` sets the slope; each layer ranks its experts
//!   in its own random order);
//! - the rest of router row `(l+1, π(e))` is `corr ·` row `(l, e)` plus fresh noise, with `π`
//!   a per-layer permutation, so a token that chose `e` at `l` tends to choose `π(e)` at `l+1`;
//! - attention and expert outputs are scaled by `drift`, so the residual stream (what the
//!   routers see) changes gradually from layer to layer, as in trained models.

use crate::error::{Error, Result};
use crate::model::arch;
use crate::model::buf::Buf;
use crate::model::config::ModelConfig;
use crate::model::synthetic::SyntheticTensors;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{Stored, TensorSource, WeightForm};
use crate::model::Model;
use crate::util::rng::SplitMix64;
use rayon::prelude::*;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RoutingShape {
    /// Slope of expert popularity: expert of rank r gets logit offset `-skew · ln(1 + r)`.
    pub skew: f32,
    /// Layer-to-layer correlation of the router rows along the permutation.
    pub corr: f32,
    /// Scale of attention and expert outputs added to the residual stream.
    pub drift: f32,
    /// Spread of the token-dependent part of router logits.
    pub spread: f32,
    pub seed: u64,
}

const ANCHOR: f32 = 4.0;

struct RoutedSource<'a> {
    cfg: &'a ModelConfig,
    shape: &'a RoutingShape,
    base: SyntheticTensors,
    /// Per layer, its routers' `[experts × hidden]` rows.
    routers: Vec<Vec<f32>>,
}

fn hash(name: &str, seed: u64) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl<'a> RoutedSource<'a> {
    fn new(cfg: &'a ModelConfig, shape: &'a RoutingShape) -> RoutedSource<'a> {
        let (h, e_n) = (cfg.hidden_size, cfg.num_experts);
        let mut rng = SplitMix64::new(shape.seed ^ 0x5eed);
        let sigma = shape.spread / (h as f32).sqrt();
        let mut routers: Vec<Vec<f32>> = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut rows = vec![0f32; e_n * h];
            let perm = permutation(&mut rng, e_n);
            let rank = permutation(&mut rng, e_n);
            let fresh = (1.0 - shape.corr * shape.corr).max(0.0).sqrt();
            for e in 0..e_n {
                let to = perm[e];
                let row = &mut rows[to * h..(to + 1) * h];
                for (i, v) in row.iter_mut().enumerate().skip(1) {
                    let prev = routers.last().map_or(0.0, |p| p[e * h + i]);
                    let n = sigma * rng.normal();
                    *v = if l == 0 {
                        n
                    } else {
                        shape.corr * prev + fresh * n
                    };
                }
                row[0] = -shape.skew * (1.0 + rank[to] as f32).ln() / ANCHOR;
            }
            routers.push(rows);
        }
        RoutedSource {
            cfg,
            shape,
            base: SyntheticTensors { seed: shape.seed },
            routers,
        }
    }

    /// Expert `name`'s int8 matrix `[n, k]`, rows zero padded to `kp` for the kernels.
    fn expert_int8(&self, name: &str, n: usize, k: usize, kp: usize) -> Vec<i8> {
        let seed = hash(name, self.shape.seed);
        let mut data = vec![0i8; n * kp];
        data.par_chunks_mut(kp).enumerate().for_each(|(j, row)| {
            let mut r = SplitMix64::new(seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut bits = 0u64;
            for (i, v) in row.iter_mut().enumerate() {
                if i % 8 == 0 {
                    bits = r.next_u64();
                }
                // Uniform in [-127, 127]; the padding stays zero.
                let byte = (bits >> ((i % 8) * 8)) as u8 % 255;
                *v = if i < k {
                    (i16::from(byte) - 127) as i8
                } else {
                    0
                };
            }
        });
        data
    }
}

fn permutation(rng: &mut SplitMix64, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    p
}

/// `model.layers.L.block_sparse_moe.experts.E.wX` of a tensor name, if it is an expert's.
fn expert_matrix(name: &str) -> Option<(&str, &str)> {
    let (prefix, part) = name.rsplit_once('.')?;
    prefix.contains(".experts.").then_some((prefix, part))
}

impl TensorSource for RoutedSource<'_> {
    fn has(&self, name: &str) -> bool {
        match expert_matrix(name) {
            Some((_, part)) => matches!(part, "qweight" | "scales" | "row_sums"),
            None => self.base.has(name),
        }
    }

    fn stored(&self, name: &str, shape: &[usize], why: &str) -> Result<Stored> {
        let Some((prefix, part)) = expert_matrix(name) else {
            return Ok(Stored::F32(self.tensor(name, shape, why)?.into()));
        };
        let qname = format!("{prefix}.qweight");
        let is_down = prefix.ends_with(".w2");
        let n = shape[0];
        let k = if is_down {
            self.cfg.expert_ffn
        } else {
            self.cfg.hidden_size
        };
        let kp = crate::model::int8::padded_k(k);
        match part {
            "qweight" => Ok(Stored::I8(Buf::Owned(self.expert_int8(&qname, n, k, kp)))),
            "scales" => {
                // Weight std 1/sqrt(k) (uniform int8 has std 127/sqrt(3)); down scaled by drift.
                let s = 3f32.sqrt() / 127.0 / (k as f32).sqrt();
                let s = if is_down { s * self.shape.drift } else { s };
                Ok(Stored::F32(Buf::Owned(vec![s; n])))
            }
            "row_sums" => {
                let data = self.expert_int8(&qname, n, k, kp);
                let sums = data
                    .chunks(kp)
                    .map(|r| r.iter().map(|&v| i32::from(v)).sum())
                    .collect();
                Ok(Stored::I32(Buf::Owned(sums)))
            }
            _ => Err(Error::MissingTensor {
                name: name.to_string(),
            }),
        }
    }

    fn tensor(&self, name: &str, shape: &[usize], why: &str) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let layer: usize = rest
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if name.ends_with("block_sparse_moe.gate.weight") {
                return Ok(self.routers[layer].clone());
            }
            if name.ends_with("o_proj.weight") {
                let mut w = self.base.tensor(name, shape, why)?;
                w.iter_mut().for_each(|v| *v *= self.shape.drift);
                return Ok(w);
            }
            if name.ends_with("norm.weight") {
                return Ok(vec![1.0; h]);
            }
        }
        let mut w = self.base.tensor(name, shape, why)?;
        if name == "model.embed_tokens.weight" {
            w.chunks_mut(h).for_each(|row| row[0] = ANCHOR);
        }
        Ok(w)
    }
}

/// A Mixtral-shaped model with `cfg`'s shape, int8 experts and routing shaped by `shape`.
pub fn routed_model(cfg: ModelConfig, shape: &RoutingShape) -> Result<Model> {
    let src = RoutedSource::new(&cfg, shape);
    let weights = arch::load_weights(&cfg, &src, WeightForm::F32)?;
    drop(src);
    Ok(Model {
        config: cfg,
        weights,
        tokenizer: Tokenizer::Bytes,
        source: "synthetic routed MoE".to_string(),
    })
}
