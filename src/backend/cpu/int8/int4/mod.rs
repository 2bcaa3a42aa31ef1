//! W4A8 kernels: per-token int8 activations × int4 weights with per-group scales
//! ([`Int4Matrix`], whose tiled layout these read in place).
//!
//! The math, per token `t` and output row `j`:
//! - per group `g`, exactly in i32: `d = Σ_{i∈g} x[t][i]·u[j][i] − zero[j][g]·Σ_{i∈g} x[t][i]`
//!   (`u` the unsigned nibbles; the activation group sums are computed once per token);
//! - in f32, group by group in order, one rounding per operation (no fused multiply-add):
//!   `f = f + (d as f32) · scale[j][g]`;
//! - `out[t][j] = f · x_scale[t] (+ bias[j])`.
//!
//! The integer part is exact in every tier and the f32 part is the same operations in the
//! same order (a tile's 16 rows are 16 SIMD lanes, so no tier reassociates), hence every tier's
//! output is bitwise equal to the scalar reference. Nibbles are the unsigned operand of VNNI's
//! `vpdpbusd` (and of AVX2's `vpmaddubsw`), activations the signed one: no shift trick needed.

use std::ops::Range;

use rayon::prelude::*;

use super::{assert_supported, OutPtr, QuantizedRows, Tier};
use crate::model::int4::{Int4Matrix, STEP_K, TILE_ROWS};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;
#[cfg(test)]
mod tests;

/// Most tokens one kernel call takes (its accumulators stay in registers).
const MAX_TOKENS: usize = 4;

/// One tile's inputs: its bytes, scales and zeros, and up to [`MAX_TOKENS`] tokens.
struct TileJob<'a> {
    /// The tile's `k_padded / 8` steps of 64 bytes.
    data: &'a [u8],
    /// f16 bits, `groups × 16`.
    scales: &'a [u16],
    /// `groups × 16`, or `None` (symmetric: 8).
    zeros: Option<&'a [u8]>,
    group: usize,
    /// Columns the activations have (`padded_k(k)`, a multiple of 64): steps beyond are padding.
    k_x: usize,
    /// Token rows (each `k_x` long) and their group sums.
    xs: [&'a [i8]; MAX_TOKENS],
    xsums: [&'a [i32]; MAX_TOKENS],
    tokens: usize,
}

impl TileJob<'_> {
    /// Groups the activations reach.
    fn groups(&self) -> usize {
        self.k_x.div_ceil(self.group)
    }

    /// Steps of group `g`.
    fn steps(&self, g: usize) -> Range<usize> {
        g * self.group / STEP_K..((g + 1) * self.group).min(self.k_x) / STEP_K
    }
}

/// Per token of a job, the 16 rows' f32 sums `f` (before the token's scale).
type TileOut = [[f32; TILE_ROWS]; MAX_TOKENS];

/// The tier [`gemm`] uses for int4: the int8 tier, except that AVX2 needs F16C too (the
/// scales are f16), without which the scalar kernel runs.
pub fn int4_tier(tier: Tier) -> Tier {
    if tier == Tier::Avx2 && !cpu_has_f16c() {
        Tier::Scalar
    } else {
        tier
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_f16c() -> bool {
    is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_f16c() -> bool {
    false
}

/// `out[t*n + j] = Σ_g (dot_g · scale[j][g]) · x.scales[t] (+ bias[j])` on the
/// [`super::active_tier`], threaded over row tiles on `pool`.
///
/// # Panics
/// If the shapes disagree (as [`super::gemm`]).
pub fn gemm(
    out: &mut [f32],
    x: &QuantizedRows,
    w: &Int4Matrix,
    bias: Option<&[f32]>,
    pool: &rayon::ThreadPool,
) {
    gemm_with_tier(int4_tier(super::active_tier()), out, x, w, bias, pool);
}

/// [`gemm`] on a given tier. All tiers give bitwise-equal results.
///
/// # Panics
/// If the CPU cannot run `tier` (AVX2 also needs F16C here), or as [`gemm`].
pub fn gemm_with_tier(
    tier: Tier,
    out: &mut [f32],
    x: &QuantizedRows,
    w: &Int4Matrix,
    bias: Option<&[f32]>,
    pool: &rayon::ThreadPool,
) {
    assert_supported(tier);
    assert!(
        tier != Tier::Avx2 || cpu_has_f16c(),
        "the avx2 int4 kernels need F16C"
    );
    check_shapes(out, x, w, bias);
    let xsums = group_sums(x, w.group);
    let threads = if crate::backend::cpu::parallel::kernel_threads() == 1 {
        1
    } else {
        pool.current_num_threads()
    };
    let chunks = super::column_chunks(x.rows, w.n, w.k_padded, threads);
    let target = OutPtr(out.as_mut_ptr());
    let run = |cols: Range<usize>| {
        // Chunks are multiples of 16 columns, so whole tiles.
        let tiles = cols.start / TILE_ROWS..cols.end.div_ceil(TILE_ROWS);
        // SAFETY: `out` holds `x.rows × w.n` floats (checked) and stays borrowed by this call
        // until every task returns; tasks write only their own tiles' columns, which are
        // disjoint.
        unsafe { run_tiles(tier, x, w, bias, &xsums, tiles, target) };
    };
    match chunks.len() {
        0 => {}
        1 => run(0..w.n),
        _ => pool.install(|| chunks.into_par_iter().for_each(run)),
    }
}

fn check_shapes(out: &[f32], x: &QuantizedRows, w: &Int4Matrix, bias: Option<&[f32]>) {
    assert_eq!(
        x.k, w.k,
        "activations have k = {}, weights k = {}",
        x.k, w.k
    );
    assert!(
        x.k_padded == super::padded_k(x.k) && x.k_padded <= w.k_padded,
        "activation padding disagrees with the weights'"
    );
    assert_eq!(
        Some(x.data.len()),
        x.rows.checked_mul(x.k_padded),
        "x.data size"
    );
    assert_eq!(x.scales.len(), x.rows, "x.scales size");
    let tiles = w.n_tiles();
    assert_eq!(w.data.len(), tiles * w.tile_bytes(), "w.data size");
    let meta = tiles * w.groups() * TILE_ROWS;
    assert_eq!(w.scales.len(), meta, "w.scales size");
    assert!(
        w.zeros.as_ref().is_none_or(|z| z.len() == meta),
        "w.zeros size"
    );
    assert_eq!(
        Some(out.len()),
        x.rows.checked_mul(w.n),
        "out is not rows × n"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), w.n, "bias is not n long");
    }
}

/// Per token, the sums of its quantized activations over each group of `group` columns
/// (`ceil(k_padded / group)` of them; exact).
fn group_sums(x: &QuantizedRows, group: usize) -> Vec<i32> {
    let groups = x.k_padded.div_ceil(group);
    let mut sums = vec![0i32; x.rows * groups];
    for t in 0..x.rows {
        for (g, chunk) in x.row(t).chunks(group).enumerate() {
            sums[t * groups + g] = chunk.iter().map(|&v| i32::from(v)).sum();
        }
    }
    sums
}

/// Row tiles `tiles` of the product: per tile, every token in jobs of up to [`MAX_TOKENS`]
/// (a tile of a few KiB stays in L1/L2 while the token jobs pass over it).
///
/// # Safety
/// `out` must point to `x.rows × w.n` writable floats that nothing else touches meanwhile
/// except other calls with disjoint `tiles`; the CPU must run `tier`.
unsafe fn run_tiles(
    tier: Tier,
    x: &QuantizedRows,
    w: &Int4Matrix,
    bias: Option<&[f32]>,
    xsums: &[i32],
    tiles: Range<usize>,
    out: OutPtr,
) {
    let (data, scales): (&[u8], &[u16]) = (&w.data, &w.scales);
    let zeros: Option<&[u8]> = w.zeros.as_deref();
    let (tile_bytes, meta) = (w.tile_bytes(), w.groups() * TILE_ROWS);
    let x_groups = x.k_padded.div_ceil(w.group);
    for t in tiles {
        let rows = t * TILE_ROWS..((t + 1) * TILE_ROWS).min(w.n);
        for t0 in (0..x.rows).step_by(MAX_TOKENS) {
            let tokens = MAX_TOKENS.min(x.rows - t0);
            let mut job = TileJob {
                data: &data[t * tile_bytes..(t + 1) * tile_bytes],
                scales: &scales[t * meta..(t + 1) * meta],
                zeros: zeros.map(|z| &z[t * meta..(t + 1) * meta]),
                group: w.group,
                k_x: x.k_padded,
                xs: [&[]; MAX_TOKENS],
                xsums: [&[]; MAX_TOKENS],
                tokens,
            };
            for i in 0..tokens {
                job.xs[i] = x.row(t0 + i);
                job.xsums[i] = &xsums[(t0 + i) * x_groups..(t0 + i + 1) * x_groups];
            }
            let mut f = [[0f32; TILE_ROWS]; MAX_TOKENS];
            // SAFETY: the caller guarantees the tier's features.
            unsafe { tile_sums(tier, &job, &mut f) };
            for (i, f_t) in f[..tokens].iter().enumerate() {
                let token = t0 + i;
                for (r, j) in rows.clone().enumerate() {
                    let value = epilogue(f_t[r], x.scales[token], bias.map(|b| b[j]));
                    // SAFETY: token < x.rows and j < w.n: inside `out`; j is in this call's
                    // tiles, which no other call writes.
                    unsafe { out.0.add(token * w.n + j).write(value) };
                }
            }
        }
    }
}

/// # Safety
/// The CPU must run `tier` (and F16C for AVX2).
unsafe fn tile_sums(tier: Tier, job: &TileJob, f: &mut TileOut) {
    match tier {
        Tier::Scalar => scalar::tile(job, f),
        // SAFETY (both): the caller guarantees the features.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => unsafe { avx2::tile(job, f) },
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512Vnni => unsafe { avx512::tile(job, f) },
        #[cfg(not(target_arch = "x86_64"))]
        Tier::Avx2 | Tier::Avx512Vnni => unreachable!("only the scalar tier exists here"),
    }
}

/// The f32 epilogue, shared by every tier.
#[inline(always)]
fn epilogue(f: f32, x_scale: f32, bias: Option<f32>) -> f32 {
    let value = f * x_scale;
    match bias {
        Some(b) => value + b,
        None => value,
    }
}
