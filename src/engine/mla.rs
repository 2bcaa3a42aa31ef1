//! Multi-head latent attention (DeepSeek-V2/V3), absorbed: the KV cache holds one row a token
//! and layer, `c = [kv_a_layernorm(latent) | rotated shared key]` (`kv_lora_rank +
//! qk_rope_head_dim` floats), and attention runs as multi-query attention with that row as the
//! one KV head. `kv_b_proj` is never applied to the cache: per head `h` its key half `W_UK_h`
//! moves into the query, `q'_h = [q_nope_h · W_UK_h | q_rope_h]`, so `q'_h · c = q_nope_h ·
//! k_nope_h + q_rope_h · k_rope` is transformers' score; the value read is the latent prefix of
//! `c` ([`crate::kv::KvLayout::key_prefix`]: stored once), and the head's output is `(Σ p ·
//! latent) · W_UV_hᵀ`. Prefill runs the same way, so every token's cache row is the same
//! whichever step wrote it.
//!
//! `W_UK_hᵀ` and `W_UV_h` are split from `kv_b_proj` once ([`AbsorbedHeads`], on the first
//! step; bf16 stays bf16) and applied per step, head by head: folding them into
//! `q_proj`/`o_proj` instead would multiply those matrices' size by about `kv_lora_rank /
//! v_head_dim` (4× for DeepSeek-V2-Lite), which a decode step streams every token. The split is
//! a second copy of `kv_b_proj`'s size, which stays loaded (for `export`) but is never
//! multiplied by.
//!
//! The kernel scales scores by `1/sqrt(key width)`; the queries carry the factor that makes it
//! transformers' `1/sqrt(qk_nope_head_dim + qk_rope_head_dim)` (times YaRN's `mscale²`).
//! Eviction ranks the shared row by the attention of all query heads: one KV head, so the
//! per-layer mass is the mean over the heads and the per-KV-head mass their sum.
//!
//! The rotated values of an interleaved model are de-interleaved (pairs (0,1), (2,3)… become
//! halves) on both the query and the key: the same reordering on both sides leaves every score
//! as transformers computes it, and the rotated part is then what [`Backend::apply_rope`]
//! turns.

use super::Engine;
use crate::backend::Backend;
use crate::kv::AttentionShape;
use crate::model::config::LatentAttention;
use crate::model::weights::{AbsorbedHeads, Attention, LatentParts};

impl<B: Backend> Engine<B> {
    /// The step's absorbed queries (`rows × heads·(kv_lora_rank + rope)`, scaled for the
    /// kernel) and cache rows (`rows × (kv_lora_rank + rope)`) from the normalized input `h`,
    /// rotated by `rope` (rows `first_row..`).
    pub(super) fn latent_qc(
        &self,
        a: &Attention,
        parts: &LatentParts,
        h: &B::Act,
        rope: Option<&B::Rope>,
        first_row: usize,
    ) -> [B::Act; 2] {
        let cfg = &self.model.config;
        let be = &self.backend;
        let m = mla_of(cfg);
        let heads = cfg.num_heads;
        let l = Layout::new(&m, heads);
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
        let latent: Vec<f32> = compressed
            .chunks_exact(l.row())
            .flat_map(|r| r[..l.latent].iter().copied())
            .collect();
        let latent = be.norm(&parts.kv_a_norm, &be.upload_rows(latent, l.latent));
        // kv_b_proj's input, though it only runs split per head (calibration records it here).
        self.observe(&a.v, &latent);
        let latent = be.to_host(&latent).into_owned();
        let q = be.to_host(&q).into_owned();
        let (q_nope, q_rope, k_rope) = l.split(&q, &compressed, rows);
        let mut q_rope = be.upload_rows(q_rope, heads * l.rope);
        let mut k_rope = be.upload_rows(k_rope, l.rope);
        if let Some(rope) = rope {
            be.apply_rope(&mut q_rope, rope, first_row);
            be.apply_rope(&mut k_rope, rope, first_row);
        }
        let absorbed = absorbed(a, parts, &m, heads);
        let q_latent: Vec<Vec<f32>> = (0..heads)
            .map(|hd| {
                let x = be.upload_rows(l.head_cols(&q_nope, hd, l.nope), l.nope);
                // The split is not a linear of the checkpoint's: nothing to observe.
                be.to_host(&be.linear(&absorbed.uk_t[hd], &x)).into_owned()
            })
            .collect();
        let q = l.queries(&q_latent, &be.to_host(&q_rope), rows, query_scale(cfg, &m));
        let c = l.cache_rows(&latent, &be.to_host(&k_rope));
        [
            be.upload_rows(q, heads * l.row()),
            be.upload_rows(c, l.row()),
        ]
    }

    /// Layer `li`'s attention over latent rows: one KV head of `kv_lora_rank + rope` floats
    /// whose latent prefix is the value.
    pub(super) fn latent_shape<'a>(&self, m: &LatentAttention, li: usize) -> AttentionShape<'a> {
        let cfg = &self.model.config;
        AttentionShape {
            num_heads: cfg.num_heads,
            num_kv_heads: 1,
            head_dim: m.kv_lora_rank + m.qk_rope_head_dim,
            value_dim: m.kv_lora_rank,
            sliding_window: cfg.window_of(li),
            sink_logits: None,
        }
    }

    /// The heads' outputs `rows × heads·v_head_dim` (what `o_proj` reads) from the attention's
    /// mix of latents (`rows × heads·kv_lora_rank`): each head's through its `W_UV`.
    pub(super) fn latent_output(&self, a: &Attention, parts: &LatentParts, attn: B::Act) -> B::Act {
        let cfg = &self.model.config;
        let be = &self.backend;
        let m = mla_of(cfg);
        let heads = cfg.num_heads;
        let l = Layout::new(&m, heads);
        let absorbed = absorbed(a, parts, &m, heads);
        let mixed = be.to_host(&attn);
        let outs: Vec<Vec<f32>> = (0..heads)
            .map(|hd| {
                let x = be.upload_rows(l.head_cols(&mixed, hd, l.latent), l.latent);
                be.to_host(&be.linear(&absorbed.uv[hd], &x)).into_owned()
            })
            .collect();
        be.upload_rows(l.interleave_heads(&outs, l.v), heads * l.v)
    }
}

fn mla_of(cfg: &crate::model::config::ModelConfig) -> LatentAttention {
    let Some(m) = cfg.options.mla else {
        unreachable!("latent attention weights under a config without its shapes")
    };
    m
}

/// The layer's `kv_b_proj` split per head (made on first use).
fn absorbed<'p>(
    a: &Attention,
    parts: &'p LatentParts,
    m: &LatentAttention,
    heads: usize,
) -> &'p AbsorbedHeads {
    parts
        .absorbed
        .get_or_init(|| AbsorbedHeads::split(&a.v, heads, m.qk_nope_head_dim, m.v_head_dim))
}

/// What the queries are multiplied by so that the kernel's `1/sqrt(key width)` becomes
/// transformers' `1/sqrt(qk_nope + qk_rope)`, times YaRN's `mscale²` where the model has it.
fn query_scale(cfg: &crate::model::config::ModelConfig, m: &LatentAttention) -> f32 {
    let key_width = (m.kv_lora_rank + m.qk_rope_head_dim) as f64;
    let head_dim = (m.qk_nope_head_dim + m.qk_rope_head_dim) as f64;
    let yarn = cfg.options.yarn.map_or(1.0, |y| y.softmax_scale());
    ((key_width / head_dim).sqrt() * yarn) as f32
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

    /// Floats of a cache row (and of a head's absorbed query).
    fn row(&self) -> usize {
        self.latent + self.rope
    }

    /// Appends rotated values `from` to `to`, de-interleaved where the model pairs them.
    fn rotated(&self, from: &[f32], to: &mut Vec<f32>) {
        let at = to.len();
        to.resize(at + from.len(), 0.0);
        let half = self.rope / 2;
        for (i, &x) in from.iter().enumerate() {
            let j = if self.interleaved {
                i / 2 + (i % 2) * half
            } else {
                i
            };
            to[at + j] = x;
        }
    }

    /// From the projections' host values, `q` (`heads·(nope + rope)` a row) and `compressed`
    /// (`latent + rope`: the shared key's rotary part after the latent): the unrotated
    /// queries (`rows × heads·nope`) and, de-interleaved, the rotary queries (`rows ×
    /// heads·rope`) and keys (`rows × rope`).
    fn split(&self, q: &[f32], compressed: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.nope + self.rope;
        let mut nope = Vec::with_capacity(rows * self.heads * self.nope);
        let mut q_rope = Vec::with_capacity(rows * self.heads * self.rope);
        let mut k_rope = Vec::with_capacity(rows * self.rope);
        for r in 0..rows {
            for h in 0..self.heads {
                let head = &q[(r * self.heads + h) * d..][..d];
                nope.extend_from_slice(&head[..self.nope]);
                self.rotated(&head[self.nope..], &mut q_rope);
            }
            self.rotated(
                &compressed[r * self.row() + self.latent..][..self.rope],
                &mut k_rope,
            );
        }
        (nope, q_rope, k_rope)
    }

    /// Head `h`'s `width` columns of every row of `x` (`heads·width` a row).
    fn head_cols(&self, x: &[f32], h: usize, width: usize) -> Vec<f32> {
        x.chunks_exact(self.heads * width)
            .flat_map(|row| row[h * width..(h + 1) * width].iter().copied())
            .collect()
    }

    /// Per-head matrices (`rows × width` each) side by side: `rows × heads·width`.
    fn interleave_heads(&self, per_head: &[Vec<f32>], width: usize) -> Vec<f32> {
        let rows = per_head.first().map_or(0, |x| x.len() / width.max(1));
        let mut out = Vec::with_capacity(rows * self.heads * width);
        for r in 0..rows {
            for head in per_head {
                out.extend_from_slice(&head[r * width..(r + 1) * width]);
            }
        }
        out
    }

    /// Every head's query against a cache row, `[q_nope·W_UK | rotated q_rope] × scale`, from
    /// the heads' latent queries (`rows × latent` each) and the rotated queries (`rows ×
    /// heads·rope`).
    fn queries(&self, latent: &[Vec<f32>], rope: &[f32], rows: usize, scale: f32) -> Vec<f32> {
        let lat = self.interleave_heads(latent, self.latent);
        let mut q = Vec::with_capacity(rows * self.heads * self.row());
        for (l, r) in lat
            .chunks_exact(self.latent)
            .zip(rope.chunks_exact(self.rope))
        {
            q.extend(l.iter().chain(r).map(|x| x * scale));
        }
        q
    }

    /// The cache rows `[normed latent | rotated shared key]`.
    fn cache_rows(&self, latent: &[f32], k_rope: &[f32]) -> Vec<f32> {
        latent
            .chunks_exact(self.latent)
            .zip(k_rope.chunks_exact(self.rope))
            .flat_map(|(l, r)| l.iter().chain(r).copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(interleaved: bool) -> Layout {
        Layout {
            heads: 2,
            nope: 3,
            rope: 4,
            v: 5,
            latent: 2,
            interleaved,
        }
    }

    /// An absorbed query against a cache row scores what transformers' decompressed query and
    /// key do (`q_nope·(W_UK·latent) + q_rope·k_rope`, in the checkpoint's order), and the
    /// value read from the row's prefix through `W_UV` is transformers' value, for plain and
    /// interleaved rotary parts (no rotation: the reordering alone is what is checked).
    #[test]
    fn absorbed_scores_and_values_are_the_decompressed_ones() {
        use crate::model::weights::Linear;
        for interleaved in [false, true] {
            let l = layout(interleaved);
            let rows = 2;
            let val = |i: usize| ((i * 37) % 11) as f32 - 5.0;
            let q: Vec<f32> = (0..rows * 14).map(val).collect();
            let compressed: Vec<f32> = (0..rows * 6).map(|i| val(i + 3)).collect();
            // kv_b_proj: heads × (nope + v) rows of latent.
            let kv_b: Vec<f32> = (0..2 * 8 * 2).map(|i| val(i + 5) / 3.0).collect();
            let lin = Linear::new("kv_b", 16, 2, kv_b.clone(), None);
            let abs = AbsorbedHeads::split(&lin, 2, 3, 5);
            let (nope, q_rope, k_rope) = l.split(&q, &compressed, rows);
            let latent: Vec<f32> = compressed
                .chunks_exact(6)
                .flat_map(|r| r[..2].to_vec())
                .collect();
            // W_UKᵀ applied on the host, as a backend's linear does: x·Wᵀ.
            let apply = |w: &Linear, x: &[f32]| -> Vec<f32> {
                let rows_w = w.f32_rows().unwrap();
                x.chunks_exact(w.in_features)
                    .flat_map(|xr| {
                        rows_w
                            .chunks_exact(w.in_features)
                            .map(|wr| wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>())
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let q_lat: Vec<Vec<f32>> = (0..2)
                .map(|h| apply(&abs.uk_t[h], &l.head_cols(&nope, h, 3)))
                .collect();
            let qa = l.queries(&q_lat, &q_rope, rows, 1.0);
            let c = l.cache_rows(&latent, &k_rope);
            for r in 0..rows {
                for s in 0..rows {
                    for h in 0..2 {
                        let got: f32 = qa[(r * 2 + h) * 6..][..6]
                            .iter()
                            .zip(&c[s * 6..][..6])
                            .map(|(a, b)| a * b)
                            .sum();
                        // transformers: k_nope_h = W_UK_h · latent, key = [k_nope | k_rope].
                        let w = &kv_b[h * 16..];
                        let k_nope: Vec<f32> = (0..3)
                            .map(|i| w[i * 2] * latent[s * 2] + w[i * 2 + 1] * latent[s * 2 + 1])
                            .collect();
                        let plain_q = &q[(r * 2 + h) * 7..][..7];
                        let key: Vec<f32> = k_nope
                            .iter()
                            .chain(&compressed[s * 6 + 2..][..4])
                            .copied()
                            .collect();
                        let want: f32 = plain_q.iter().zip(&key).map(|(a, b)| a * b).sum();
                        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
                        // The value: W_UV_h · latent (the row's prefix).
                        let v = apply(&abs.uv[h], &c[s * 6..][..2]);
                        let want_v: Vec<f32> = (0..5)
                            .map(|j| {
                                let wr = &w[(3 + j) * 2..][..2];
                                wr[0] * latent[s * 2] + wr[1] * latent[s * 2 + 1]
                            })
                            .collect();
                        assert_eq!(v, want_v);
                    }
                }
            }
            // Interleaved pairs (0,1),(2,3) land as halves: [0, 2, 1, 3] of the rotary part.
            let src = &q[3..7];
            let want = if interleaved {
                [src[0], src[2], src[1], src[3]]
            } else {
                [src[0], src[1], src[2], src[3]]
            };
            assert_eq!(&q_rope[..4], &want);
        }
    }

    /// A bf16 `kv_b_proj` splits into bf16 halves holding the same values as the split of its
    /// f32 widening (the split moves bits, never rounds).
    #[test]
    fn half_weights_split_without_rounding() {
        use crate::model::buf::HalfKind;
        use crate::model::weights::{Linear, LinearWeight};
        let (heads, nope, v, rank) = (3, 2, 5, 4);
        let n = heads * (nope + v) * rank;
        let bits: Vec<u16> = (0..n)
            .map(|i| ((i as f32 * 0.37).sin().to_bits() >> 16) as u16)
            .collect();
        let mut half = Linear::new("kv_b", heads * (nope + v), rank, vec![0.0; n], None);
        half.weight = LinearWeight::Half(HalfKind::Bf16, bits.clone().into());
        let wide = Linear::new(
            "kv_b",
            heads * (nope + v),
            rank,
            HalfKind::Bf16.widen(&bits),
            None,
        );
        let (a, b) = (
            AbsorbedHeads::split(&half, heads, nope, v),
            AbsorbedHeads::split(&wide, heads, nope, v),
        );
        for (x, y) in a.uk_t.iter().chain(&a.uv).zip(b.uk_t.iter().chain(&b.uv)) {
            assert!(matches!(x.weight, LinearWeight::Half(HalfKind::Bf16, _)));
            assert_eq!(
                (x.out_features, x.in_features),
                (y.out_features, y.in_features)
            );
            assert_eq!(x.f32_rows(), y.f32_rows());
        }
    }
}
