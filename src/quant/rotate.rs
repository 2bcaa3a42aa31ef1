//! Rotations that remove activation outliers before W8A8 (QuaRot, arXiv 2404.00456): an
//! orthogonal `R` applied to the residual stream leaves the f32 function unchanged — RMSNorm
//! commutes with it once its weight is folded into the linears that read the norm — but spreads
//! every outlier channel over all channels, so a per-token int8 scale no longer has to cover a
//! few huge values. It is folded into the weights offline, at no run-time cost:
//!
//! - linears that read a norm's output, `y = W(γ ⊙ n(x))`: `W ← W·diag(γ)·Rᵀ`, γ ← 1;
//! - linears that write the residual (o_proj, down_proj): `W ← R·W` (and their bias);
//! - the embedding rows `e ← R·e`, the head as a linear that reads the final norm.
//!
//! The down-projection's input (the gated product, no norm before it) is rotated online by a
//! block Hadamard transform (`H·D` with random signs D folded into up_proj's rows and down_proj's
//! columns): the run-time cost is `f·log₂ b` adds per token against `f·h` multiply-adds.

pub use crate::backend::cpu::ops::{hadamard_in_blocks, rotate_rows};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::{Ffn, GatedMlp, Layer, Linear, LinearWeight, Norm, Weights};
use crate::util::rng::SplitMix64;

/// Smallest online Hadamard block worth its cost: below it an outlier is spread too thinly.
const MIN_HADAMARD_BLOCK: usize = 32;
/// Largest online block: beyond it the spread gains little and the transform leaves L1.
const MAX_HADAMARD_BLOCK: usize = 4096;

/// A random orthogonal `d × d` matrix with a fast product: `R = (H_p ⊗ Q_m)·D` where `d = p·m`,
/// `p` is the largest power of two dividing `d`, `H_p` the normalized Walsh–Hadamard matrix, `Q_m`
/// a random orthogonal matrix (Gram–Schmidt of Gaussians) and D random signs.
#[derive(Debug, Clone)]
pub struct Rotation {
    dim: usize,
    pow2: usize,
    odd: usize,
    /// `odd × odd`, row-major, orthonormal rows.
    odd_q: Vec<f64>,
    signs: Vec<f64>,
}

impl Rotation {
    pub fn random(dim: usize, seed: u64) -> Rotation {
        let pow2 = 1usize << dim.trailing_zeros();
        let odd = dim / pow2;
        let mut rng = SplitMix64::new(seed);
        let signs = random_signs(dim, &mut rng);
        Rotation {
            dim,
            pow2,
            odd,
            odd_q: random_orthogonal(odd, &mut rng),
            signs,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `x ← R·x`.
    pub fn apply(&self, x: &mut [f32]) {
        let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
        self.apply_f64(&mut v);
        x.iter_mut().zip(&v).for_each(|(o, a)| *o = *a as f32);
    }

    /// `x ← R·x` in f64.
    pub fn apply_f64(&self, v: &mut [f64]) {
        debug_assert_eq!(v.len(), self.dim);
        let m = self.odd;
        v.iter_mut().zip(&self.signs).for_each(|(a, s)| *a *= s);
        // Index i = p·m + q: Q_m on each run of m, then H_p across the runs.
        if m > 1 {
            let mut t = vec![0f64; m];
            for run in v.chunks_exact_mut(m) {
                for (r, out) in t.iter_mut().enumerate() {
                    let row = &self.odd_q[r * m..(r + 1) * m];
                    *out = row.iter().zip(run.iter()).map(|(a, b)| a * b).sum();
                }
                run.copy_from_slice(&t);
            }
        }
        let mut h = 1;
        while h < self.pow2 {
            for start in (0..self.pow2).step_by(2 * h) {
                for p in start..start + h {
                    for q in 0..m {
                        let (i, j) = (p * m + q, (p + h) * m + q);
                        let (a, b) = (v[i], v[j]);
                        v[i] = a + b;
                        v[j] = a - b;
                    }
                }
            }
            h *= 2;
        }
        let norm = 1.0 / (self.pow2 as f64).sqrt();
        v.iter_mut().for_each(|a| *a *= norm);
    }

    /// `R·diag(γ)·Rᵀ`, `dim × dim` row-major, computed in f64 and rounded once: what the
    /// rotated residual stream's normed values go through to meet a head that reads `γ ⊙ n`.
    pub fn conjugated_scale(&self, gamma: &[f32]) -> Vec<f32> {
        let d = self.dim;
        debug_assert_eq!(gamma.len(), d);
        // Column i of R is R·e_i, so row j of R (column j of Rᵀ) is read off these columns.
        let mut cols = vec![0f64; d * d];
        for (i, col) in cols.chunks_exact_mut(d).enumerate() {
            col[i] = 1.0;
            self.apply_f64(col);
        }
        // Column j of G is R·(γ ⊙ Rᵀ·e_j); G is symmetric, so it is also row j.
        let mut g = vec![0f32; d * d];
        for (j, row) in g.chunks_exact_mut(d).enumerate() {
            let mut v: Vec<f64> = (0..d).map(|i| cols[i * d + j] * gamma[i] as f64).collect();
            self.apply_f64(&mut v);
            row.iter_mut().zip(&v).for_each(|(o, a)| *o = *a as f32);
        }
        g
    }
}

/// `n` random ±1.
fn random_signs<T: From<i8>>(n: usize, rng: &mut SplitMix64) -> Vec<T> {
    (0..n)
        .map(|_| T::from(if rng.next_u64() & 1 == 0 { 1 } else { -1 }))
        .collect()
}

/// `m × m` orthonormal rows from Gaussian rows by modified Gram–Schmidt.
fn random_orthogonal(m: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let mut q = vec![0f64; m * m];
    for r in 0..m {
        loop {
            let mut row: Vec<f64> = (0..m).map(|_| gaussian(rng)).collect();
            for p in 0..r {
                let prev = &q[p * m..(p + 1) * m];
                let dot: f64 = row.iter().zip(prev).map(|(a, b)| a * b).sum();
                row.iter_mut().zip(prev).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 1e-6 {
                q[r * m..(r + 1) * m]
                    .iter_mut()
                    .zip(&row)
                    .for_each(|(o, a)| *o = a / norm);
                break;
            }
        }
    }
    q
}

fn gaussian(rng: &mut SplitMix64) -> f64 {
    // Box–Muller from two uniforms in (0, 1].
    let u = |rng: &mut SplitMix64| ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let (a, b) = (u(rng), u(rng));
    (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
}

/// The online Hadamard block for a gated MLP of width `ffn`: the largest power of two dividing
/// it, or `None` when that is too small to spread an outlier.
pub fn hadamard_block(ffn: usize) -> Option<usize> {
    let b = (1usize << ffn.trailing_zeros()).min(MAX_HADAMARD_BLOCK);
    (ffn > 0 && b >= MIN_HADAMARD_BLOCK).then_some(b)
}

/// Why a model cannot be rotated, or `None` when it can: every norm must be an RMSNorm ahead of
/// the block it feeds (a LayerNorm's mean subtraction does not commute with `R`).
pub fn unsupported(cfg: &ModelConfig, w: &Weights) -> Option<String> {
    if !cfg.pre_norm || w.project_in.is_some() || w.project_out.is_some() {
        return Some(format!("{:?} is not a pre-norm RMSNorm model", cfg.arch));
    }
    let rms = |n: &Norm| matches!(n, Norm::Rms { .. });
    let norms_ok = w.final_norm.as_ref().is_some_and(rms)
        && w.layers
            .iter()
            .all(|l| rms(&l.attn_norm) && rms(&l.ffn_norm));
    if !norms_ok {
        return Some("a norm is not an RMSNorm".into());
    }
    if w.layers.iter().any(|l| matches!(l.ffn, Ffn::Plain(_))) {
        return Some("a feed-forward block is not a gated MLP".into());
    }
    let hidden = cfg.hidden_size.max(1);
    let odd = hidden >> hidden.trailing_zeros();
    if odd > MAX_ODD_FACTOR {
        return Some(format!(
            "hidden size {} has an odd factor of {odd} (more than {MAX_ODD_FACTOR}): its dense \
             orthogonal factor would cost odd² work per row",
            cfg.hidden_size
        ));
    }
    None
}

/// Largest odd part of the hidden size rotated (real models have 1–45: 4096, 5120 = 1024 × 5,
/// 2880 = 64 × 45); beyond it the dense `odd × odd` factor grows quadratically (65 537 would
/// take 34 GB).
pub const MAX_ODD_FACTOR: usize = 1023;

/// The rotation of a model's residual stream, its seed and the online block it uses.
pub struct ModelRotation {
    pub residual: Rotation,
    pub seed: u64,
    /// Online Hadamard block of the down-projections' input, where one applies.
    pub ffn_block: Option<usize>,
    /// The value width per head when it is a power of two: each head's values (v_proj's
    /// output, o_proj's input) are rotated by a Hadamard transform offline, exactly, since
    /// attention mixes value vectors only across tokens.
    pub head_block: Option<usize>,
    /// Where the values sit among the value projection's outputs (kv_b_proj's under latent
    /// attention).
    pub heads: super::smooth::HeadLayout,
}

impl ModelRotation {
    pub fn new(cfg: &ModelConfig, seed: u64) -> ModelRotation {
        let widths = [cfg.dense_ffn, cfg.expert_ffn]
            .into_iter()
            .chain(cfg.shared_expert_ffn)
            .filter(|&f| f > 0);
        // One block for every MLP of the model (the engine applies one size).
        // None under GPT-OSS's clamped SwiGLU: the online transform's random signs go into
        // up's rows, which only a product linear in `up` lets through.
        let ffn_block = widths
            .map(hadamard_block)
            .try_fold(usize::MAX, |acc, b| b.map(|b| acc.min(b)))
            .filter(|&b| b != usize::MAX)
            .filter(|_| cfg.options.clamped_swiglu.is_none());
        let heads = super::smooth::HeadLayout::of(cfg);
        ModelRotation {
            residual: Rotation::random(cfg.hidden_size, seed),
            seed,
            ffn_block,
            // Not through a clamp of v (OLMoE's clip_qkv): it does not commute with a rotation.
            head_block: (heads.head_dim.is_power_of_two() && heads.head_dim > 1)
                .then_some(heads.head_dim)
                .filter(|_| cfg.clip_qkv.is_none()),
            heads,
        }
    }

    /// Rotates the embedding rows (`E ← E·Rᵀ`). A head tied to them stays tied: it reads the
    /// final norm's output through `R·diag(γ)·Rᵀ` ([`Self::rotate_head`]), so the model stores
    /// one `vocab × hidden` matrix, as before rotating. Call before any layer runs.
    pub fn rotate_embeddings(&self, cfg: &mut ModelConfig, w: &mut Weights) -> Result<()> {
        let ones = vec![1.0; cfg.hidden_size];
        rotate_reader(&mut w.embed, &ones, &self.residual)?;
        cfg.ffn_hadamard_block = self.ffn_block;
        Ok(())
    }

    /// Moves the final norm's γ (which becomes ones) into what reads it: an untied head,
    /// `head ← head·diag(γ)·Rᵀ`; a tied one, whose rows are the rotated embeddings `E·Rᵀ`,
    /// through `G = R·diag(γ)·Rᵀ` applied before it (`E·Rᵀ·G = E·diag(γ)·Rᵀ`).
    pub fn rotate_head(&self, cfg: &mut ModelConfig, w: &mut Weights) -> Result<()> {
        let gamma = take_norm_weight(w.final_norm.as_mut())?;
        if let Some(head) = w.lm_head.as_mut() {
            return rotate_reader(head, &gamma, &self.residual);
        }
        let norm = match &w.final_norm {
            Some(Norm::Rms { name, .. }) => name,
            _ => return Err(Error::invalid("rotation needs a final RMSNorm")),
        };
        let d = self.residual.dim();
        w.head_transform = Some(Linear::new(
            &format!("{norm}.transform"),
            d,
            d,
            self.residual.conjugated_scale(&gamma),
            None,
        ));
        cfg.head_transform = true;
        Ok(())
    }

    /// Rotates one layer's weights (f32; call after they are read, before calibration).
    pub fn rotate_layer(&self, index: usize, layer: &mut Layer) -> Result<()> {
        let r = &self.residual;
        let gamma = take_norm_weight(Some(&mut layer.attn_norm))?;
        // Latent attention: q_b_proj and kv_b_proj read latents, not the residual stream.
        for lin in super::attn_input_linears(&mut layer.attn) {
            rotate_reader(lin, &gamma, r)?;
        }
        rotate_writer(&mut layer.attn.o, r)?;
        if let Some(hd) = self.head_block {
            rotate_heads(&mut layer.attn.v, &mut layer.attn.o, &self.heads, hd)?;
        }
        let gamma = take_norm_weight(Some(&mut layer.ffn_norm))?;
        for lin in super::ffn_input_linears(&mut layer.ffn) {
            rotate_reader(lin, &gamma, r)?;
        }
        for (j, mlp) in super::gated_mlps(&mut layer.ffn).into_iter().enumerate() {
            rotate_writer(&mut mlp.down, r)?;
            if let Some(b) = self.ffn_block {
                let seed = self.seed ^ ((index as u64) << 32 | j as u64).wrapping_mul(0x9E37);
                rotate_down_input(mlp, b, seed)?;
            }
        }
        Ok(())
    }
}

/// The norm's weight (γ), leaving ones in its place.
fn take_norm_weight(norm: Option<&mut Norm>) -> Result<Vec<f32>> {
    match norm {
        Some(Norm::Rms { weight, .. }) => {
            let ones = vec![1.0; weight.len()];
            Ok(std::mem::replace(weight, ones))
        }
        _ => Err(Error::invalid(
            "rotation needs an RMSNorm before every block",
        )),
    }
}

/// The f32 rows of a linear, `[out, in]`, and whether the CPU held them packed.
fn rows_of(lin: &Linear) -> Result<(Vec<f32>, bool)> {
    let packed = lin.is_prepared();
    let rows = lin
        .f32_rows()
        .ok_or_else(|| Error::invalid(format!("{}: cannot rotate int8 weights", lin.name)))?;
    Ok((rows, packed))
}

fn set_rows(lin: &mut Linear, rows: Vec<f32>, packed: bool) {
    lin.weight = LinearWeight::F32Rows(rows.into());
    if packed {
        crate::backend::cpu::prepare::prepare_linear(lin);
    }
}

/// `W ← W·diag(γ)·Rᵀ`: every row `w ← R·(γ ⊙ w)`.
fn rotate_reader(lin: &mut Linear, gamma: &[f32], r: &Rotation) -> Result<()> {
    let (mut rows, packed) = rows_of(lin)?;
    for row in rows.chunks_exact_mut(lin.in_features) {
        row.iter_mut().zip(gamma).for_each(|(w, g)| *w *= g);
        r.apply(row);
    }
    set_rows(lin, rows, packed);
    Ok(())
}

/// `W ← R·W` (every column rotated) and `b ← R·b`.
fn rotate_writer(lin: &mut Linear, r: &Rotation) -> Result<()> {
    map_columns(lin, |c| r.apply(c))
}

/// `W_v ← blockdiag(H)·W_v` (each head's value channels, and the bias) and
/// `W_o ← W_o·blockdiag(H)` (rows `w ← H·w` per head; H is symmetric and its own inverse).
fn rotate_heads(
    v: &mut Linear,
    o: &mut Linear,
    heads: &super::smooth::HeadLayout,
    hd: usize,
) -> Result<()> {
    if v.out_features != heads.num_kv_heads * heads.v_stride
        || o.in_features != heads.num_heads * heads.head_dim
    {
        return Err(Error::invalid(format!(
            "{}: {} outputs do not match the attention's heads",
            v.name, v.out_features
        )));
    }
    map_columns(v, |c| {
        heads.for_each_head_values(c, |values| hadamard_in_blocks(values, hd))
    })?;
    let (mut rows, packed) = rows_of(o)?;
    rows.chunks_exact_mut(o.in_features)
        .for_each(|r| hadamard_in_blocks(r, hd));
    set_rows(o, rows, packed);
    Ok(())
}

/// Applies `f` to every column of the weights (a vector over the output channels) and to the
/// bias: a transform of the linear's output, `W ← T·W`, `b ← T·b`.
fn map_columns(lin: &mut Linear, f: impl Fn(&mut [f32])) -> Result<()> {
    let (rows, packed) = rows_of(lin)?;
    let (n, k) = (lin.out_features, lin.in_features);
    let mut cols = vec![0f32; n * k];
    for (i, row) in rows.chunks_exact(k).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            cols[j * n + i] = v;
        }
    }
    cols.chunks_exact_mut(n).for_each(&f);
    let mut out = rows;
    for (j, col) in cols.chunks_exact(n).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * k + j] = v;
        }
    }
    if let Some(b) = &mut lin.bias {
        f(b);
    }
    set_rows(lin, out, packed);
    Ok(())
}

/// The down-projection reads `T·D·z` instead of `z = act(gate·x) ⊙ (up·x)`, `T = C_m ⊗ H_b` the
/// backends' `rotate_rows`: D's signs go into up's rows (z is linear in each) and
/// `W_down ← W_down·D·Tᵀ` (rows `w ← T·(D·w)`).
fn rotate_down_input(mlp: &mut GatedMlp, block: usize, seed: u64) -> Result<()> {
    let f = mlp.down.in_features;
    let mut rng = SplitMix64::new(seed);
    let signs: Vec<f32> = random_signs(f, &mut rng);
    let up_packed = mlp.up.is_prepared();
    mlp.up.scale_output_channels(&signs);
    if up_packed {
        crate::backend::cpu::prepare::prepare_linear(&mut mlp.up);
    }
    let (mut rows, packed) = rows_of(&mlp.down)?;
    for row in rows.chunks_exact_mut(f) {
        row.iter_mut().zip(&signs).for_each(|(w, s)| *w *= s);
        rotate_rows(row, f, block);
    }
    set_rows(&mut mlp.down, rows, packed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(r: &Rotation) -> Vec<f32> {
        let d = r.dim();
        let mut m = vec![0f32; d * d];
        for j in 0..d {
            let mut e = vec![0f32; d];
            e[j] = 1.0;
            r.apply(&mut e);
            for i in 0..d {
                m[i * d + j] = e[i];
            }
        }
        m
    }

    /// `G = R·diag(γ)·Rᵀ` against the three steps done explicitly in f64 on random vectors:
    /// `Rᵀ` (the transpose of R's dense matrix), the scale, then `R`.
    #[test]
    fn conjugated_scale_is_rotate_scale_unrotate() {
        for d in [8, 96, 576] {
            let r = Rotation::random(d, 11);
            let mut rng = SplitMix64::new(d as u64);
            let mut uniform = || (rng.next_u64() % 20001) as f64 / 10000.0 - 1.0;
            let gamma: Vec<f32> = (0..d).map(|_| (1.5 * uniform()) as f32).collect();
            let g = r.conjugated_scale(&gamma);
            // Dense R in f64: column j is R·e_j.
            let mut dense = vec![0f64; d * d];
            for j in 0..d {
                let mut e = vec![0f64; d];
                e[j] = 1.0;
                r.apply_f64(&mut e);
                (0..d).for_each(|i| dense[i * d + j] = e[i]);
            }
            for _ in 0..3 {
                let x: Vec<f64> = (0..d).map(|_| uniform()).collect();
                let rt_x: Vec<f64> = (0..d)
                    .map(|i| (0..d).map(|k| dense[k * d + i] * x[k]).sum())
                    .collect();
                let scaled: Vec<f64> = rt_x
                    .iter()
                    .zip(&gamma)
                    .map(|(v, &g)| v * g as f64)
                    .collect();
                let want: Vec<f64> = (0..d)
                    .map(|i| (0..d).map(|k| dense[i * d + k] * scaled[k]).sum())
                    .collect();
                let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
                for (i, w) in want.iter().enumerate() {
                    let got: f64 = (0..d).map(|k| g[i * d + k] as f64 * x[k]).sum();
                    assert!((got - w).abs() < 1e-6 * norm, "d {d} [{i}]: {got} vs {w}");
                }
            }
            // The identity where γ is all ones.
            let id = r.conjugated_scale(&vec![1.0; d]);
            for (i, v) in id.iter().enumerate() {
                let want = if i / d == i % d { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-6, "d {d} [{i}] {v}");
            }
        }
    }

    #[test]
    fn a_huge_odd_factor_is_not_rotated() {
        let mut m = crate::model::synthetic::default_model();
        assert_eq!(unsupported(&m.config, &m.weights), None);
        m.config.hidden_size = 2 * 1025;
        let why = unsupported(&m.config, &m.weights).unwrap();
        assert!(why.contains("odd factor of 1025"), "{why}");
    }

    #[test]
    fn rotations_are_orthogonal() {
        for d in [1, 8, 9, 576, 96, 45] {
            let r = Rotation::random(d, 7);
            let m = dense(&r);
            for i in 0..d {
                for j in 0..d {
                    let dot: f32 = (0..d).map(|t| m[i * d + t] * m[j * d + t]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-5, "d {d} ({i},{j}) {dot}");
                }
            }
        }
    }

    #[test]
    fn hadamard_blocks_match_the_dense_sylvester_product() {
        let b = 64;
        let mut rng = SplitMix64::new(3);
        let x: Vec<f32> = (0..3 * b)
            .map(|_| (rng.next_u64() % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let mut got = x.clone();
        hadamard_in_blocks(&mut got, b);
        for (run, out) in x.chunks(b).zip(got.chunks(b)) {
            for (i, &o) in out.iter().enumerate() {
                // Sylvester: H[i][j] = (-1)^popcount(i & j) / √b.
                let want: f64 = run
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| if (i & j).count_ones().is_multiple_of(2) { v } else { -v } as f64)
                    .sum::<f64>()
                    / (b as f64).sqrt();
                assert!((o as f64 - want).abs() < 1e-4, "{i}: {o} vs {want}");
            }
        }
    }

    #[test]
    fn row_rotation_is_the_kronecker_product_of_dct_and_hadamard() {
        use crate::backend::cpu::ops::dct_entry;
        let (b, m) = (32, 3);
        let w = b * m;
        let mut rng = SplitMix64::new(5);
        let x: Vec<f32> = (0..2 * w)
            .map(|_| (rng.next_u64() % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let mut got = x.clone();
        rotate_rows(&mut got, w, b);
        let h = |t: usize, u: usize| {
            let v = if (t & u).count_ones().is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            v / (b as f64).sqrt()
        };
        for (row, out) in x.chunks(w).zip(got.chunks(w)) {
            for (i, &o) in out.iter().enumerate() {
                let (k, t) = (i / b, i % b);
                let want: f64 = (0..w)
                    .map(|jn| {
                        let (j, u) = (jn / b, jn % b);
                        dct_entry(m, k, j) as f64 * h(t, u) * row[jn] as f64
                    })
                    .sum();
                assert!((o as f64 - want).abs() < 1e-4, "{i}: {o} vs {want}");
            }
        }
        // Its transpose undoes it.
        let mut back = got.clone();
        crate::backend::cpu::ops::rotate_rows_back(&mut back, w, b);
        for (a, o) in back.iter().zip(&x) {
            assert!((a - o).abs() < 1e-4);
        }
        // Orthogonal: the norm of every row is kept.
        for (row, out) in x.chunks(w).zip(got.chunks(w)) {
            let n = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            assert!((n(row) - n(out)).abs() < 1e-3 * n(row));
        }
    }

    #[test]
    fn hadamard_blocks_are_their_own_inverse_and_spread_outliers() {
        let mut x = vec![0f32; 1536];
        x[5] = 100.0;
        let orig = x.clone();
        hadamard_in_blocks(&mut x, 512);
        // One outlier becomes 512 values of 100/√512 in its block, nothing elsewhere.
        assert!(x[..512]
            .iter()
            .all(|v| (v.abs() - 100.0 / 512f32.sqrt()).abs() < 1e-4));
        assert!(x[512..].iter().all(|&v| v == 0.0));
        hadamard_in_blocks(&mut x, 512);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-4);
        }
        assert_eq!(hadamard_block(1536), Some(512));
        assert_eq!(hadamard_block(14336), Some(2048));
        assert_eq!(hadamard_block(45), None);
    }
}
