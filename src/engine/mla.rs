//! Multi-head latent attention (DeepSeek-V2/V3) in terms of the standard attention the
//! backends run. The latent is decompressed every step and the cache holds per-head keys and
//! values, values zero-padded to the key width (`qk_nope_head_dim + qk_rope_head_dim`), so
//! the kernels, the cache and its eviction policies are the ones every model uses; caching the
//! latent itself would take less memory and is not done.
//!
//! Each head's query and key are laid out `[rotated | unrotated]` (transformers:
//! `[unrotated | rotated]`), with the rotated values of an interleaved model de-interleaved
//! (pairs (0,1), (2,3)… become halves): the same reordering on both sides leaves every score as
//! transformers computes it, and the rotated part then sits where [`Backend::apply_rope_partial`]
//! turns it.

use super::Engine;
use crate::backend::Backend;
use crate::model::config::LatentAttention;
use crate::model::weights::{Attention, LatentParts};

impl<B: Backend> Engine<B> {
    /// The step's q, k and v rows (`rows × heads·head_dim` each) from the normalized input
    /// `h`, rotated by `rope` (rows `first_row..`) and q scaled for the kernel's softmax.
    pub(super) fn latent_qkv(
        &self,
        a: &Attention,
        parts: &LatentParts,
        h: &B::Act,
        rope: Option<&B::Rope>,
        first_row: usize,
    ) -> [B::Act; 3] {
        let cfg = &self.model.config;
        let be = &self.backend;
        let Some(m) = cfg.options.mla else {
            unreachable!("latent attention weights under a config without its shapes")
        };
        let q = match &parts.q_a {
            Some((q_a, norm)) => {
                let low = be.norm(norm, &self.linear(q_a, h));
                self.linear(&a.q, &low)
            }
            None => self.linear(&a.q, h),
        };
        let compressed = self.linear(&a.k, h);
        let compressed = be.to_host(&compressed).into_owned();
        let rows = be.rows(h);
        let latent_cols = m.kv_lora_rank;
        let a_cols = latent_cols + m.qk_rope_head_dim;
        let latent: Vec<f32> = compressed
            .chunks_exact(a_cols)
            .flat_map(|r| r[..latent_cols].iter().copied())
            .collect();
        let latent = be.norm(&parts.kv_a_norm, &be.upload_rows(latent, latent_cols));
        let kv = self.linear(&a.v, &latent);
        let layout = Layout::new(&m, cfg.num_heads);
        let (q, k, v) = layout.assemble(&be.to_host(&q), &compressed, &be.to_host(&kv), rows);
        let cols = cfg.q_dim();
        let (mut q, mut k, v) = (
            be.upload_rows(q, cols),
            be.upload_rows(k, cols),
            be.upload_rows(v, cols),
        );
        if let Some(rope) = rope {
            let dims = (cfg.head_dim, m.qk_rope_head_dim);
            be.apply_rope_partial(&mut q, rope, first_row, dims);
            be.apply_rope_partial(&mut k, rope, first_row, dims);
        }
        let scale = cfg.options.yarn.map_or(1.0, |y| y.softmax_scale());
        if scale != 1.0 {
            // The kernel scales scores by 1/sqrt(head_dim); DeepSeek's YaRN also by mscale².
            be.scale(&mut q, scale as f32);
        }
        [q, k, v]
    }

    /// The attention output without the values' padding: `rows × heads·v_head_dim`, what
    /// `o_proj` reads.
    pub(super) fn latent_output(&self, attn: B::Act) -> B::Act {
        let cfg = &self.model.config;
        let Some(m) = cfg.options.mla else {
            return attn;
        };
        if m.v_head_dim == cfg.head_dim {
            return attn;
        }
        let be = &self.backend;
        let host = be.to_host(&attn);
        let out: Vec<f32> = host
            .chunks_exact(cfg.head_dim)
            .flat_map(|head| head[..m.v_head_dim].iter().copied())
            .collect();
        be.upload_rows(out, cfg.num_heads * m.v_head_dim)
    }
}

/// Where each head's values come from and go (see the module doc).
struct Layout {
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    latent: usize,
    interleaved: bool,
}

impl Layout {
    fn new(m: &LatentAttention, heads: usize) -> Layout {
        Layout {
            heads,
            nope: m.qk_nope_head_dim,
            rope: m.qk_rope_head_dim,
            v: m.v_head_dim,
            latent: m.kv_lora_rank,
            interleaved: m.interleaved,
        }
    }

    /// Writes rotated values `from` into `to` (de-interleaved where the model pairs them).
    fn rotated(&self, from: &[f32], to: &mut [f32]) {
        let half = self.rope / 2;
        for (i, &x) in from.iter().enumerate() {
            let at = if self.interleaved {
                i / 2 + (i % 2) * half
            } else {
                i
            };
            to[at] = x;
        }
    }

    /// q, k and v rows (`rows × heads·(nope + rope)` each) from the projections' host values:
    /// `q` (`heads·(nope + rope)` a row), `compressed` (`latent + rope`: the shared rotated key
    /// after the latent) and `kv` (`heads·(nope + v)`).
    fn assemble(
        &self,
        q: &[f32],
        compressed: &[f32],
        kv: &[f32],
        rows: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.nope + self.rope;
        let cols = self.heads * d;
        let (mut qo, mut ko, mut vo) = (
            vec![0f32; rows * cols],
            vec![0f32; rows * cols],
            vec![0f32; rows * cols],
        );
        let a_cols = self.latent + self.rope;
        let kv_head = self.nope + self.v;
        for r in 0..rows {
            let shared = &compressed[r * a_cols + self.latent..(r + 1) * a_cols];
            for h in 0..self.heads {
                let out = r * cols + h * d;
                let src_q = &q[r * cols + h * d..r * cols + (h + 1) * d];
                let src_kv =
                    &kv[(r * self.heads + h) * kv_head..(r * self.heads + h + 1) * kv_head];
                let (qh, kh) = (&mut qo[out..out + d], &mut ko[out..out + d]);
                self.rotated(&src_q[self.nope..], &mut qh[..self.rope]);
                qh[self.rope..].copy_from_slice(&src_q[..self.nope]);
                self.rotated(shared, &mut kh[..self.rope]);
                kh[self.rope..].copy_from_slice(&src_kv[..self.nope]);
                vo[out..out + self.v].copy_from_slice(&src_kv[self.nope..]);
            }
        }
        (qo, ko, vo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every score q·k is what the plain layout `[nope | rope]` gives, and the values keep their
    /// order with zeros after them.
    #[test]
    fn reordering_keeps_every_score() {
        for interleaved in [false, true] {
            let l = Layout {
                heads: 2,
                nope: 3,
                rope: 4,
                v: 5,
                latent: 2,
                interleaved,
            };
            let rows = 2;
            let val = |i: usize| ((i * 37) % 11) as f32 - 5.0;
            let q: Vec<f32> = (0..rows * 14).map(val).collect();
            let compressed: Vec<f32> = (0..rows * 6).map(|i| val(i + 3)).collect();
            let kv: Vec<f32> = (0..rows * 16).map(|i| val(i + 7)).collect();
            let (qo, ko, vo) = l.assemble(&q, &compressed, &kv, rows);
            for r in 0..rows {
                for h in 0..2 {
                    let plain_q = &q[r * 14 + h * 7..r * 14 + (h + 1) * 7];
                    let kv_h = &kv[(r * 2 + h) * 8..(r * 2 + h + 1) * 8];
                    let mut plain_k = kv_h[..3].to_vec();
                    plain_k.extend_from_slice(&compressed[r * 6 + 2..(r + 1) * 6]);
                    let want: f32 = plain_q.iter().zip(&plain_k).map(|(a, b)| a * b).sum();
                    let at = r * 14 + h * 7;
                    let got: f32 = qo[at..at + 7]
                        .iter()
                        .zip(&ko[at..at + 7])
                        .map(|(a, b)| a * b)
                        .sum();
                    assert_eq!(got, want);
                    assert_eq!(&vo[at..at + 5], &kv_h[3..]);
                    assert_eq!(&vo[at + 5..at + 7], &[0.0, 0.0]);
                }
            }
            // Interleaved pairs (0,1),(2,3) land as halves: [0, 2, 1, 3] of the rotated part.
            let first = &qo[..4];
            let src = &q[3..7];
            let want = if interleaved {
                [src[0], src[2], src[1], src[3]]
            } else {
                [src[0], src[1], src[2], src[3]]
            };
            assert_eq!(first, &want);
        }
    }
}
