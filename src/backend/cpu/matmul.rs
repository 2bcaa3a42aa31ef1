//! f32 matrix multiply `out[t, j] = Σ_k x[t, k]·w[j, k] (+ b[j])` with W row-major, `[out, in]`:
//! for matrices that are not packed into panels (a head tied to the row-major embedding table,
//! calibration's XᵀX). Linear layers use [`super::packed`].
//!
//! Work is split over output channels across the pool; each task computes register tiles of
//! `TX` activation rows × `TW` weight rows as dot products along k (AVX2+FMA where the CPU has
//! it, a scalar reference otherwise). Activation rows are processed in blocks that stay in L2.

use super::simd::{cpu_features, SendPtr};
use rayon::prelude::*;

/// Weight rows per register tile.
const TW: usize = 4;
/// Activation rows per register tile.
const TX: usize = 3;
/// Activation rows per cache block (48 × 4 KiB rows of k = 1024 stay in L2).
const X_BLOCK: usize = 48;
/// Below this many multiply-adds a task switch costs more than it saves: run on the caller.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Multiplies `x` (`rows × k`) by `wᵀ` (`w` is `n × k`) into `out` (`rows × n`).
pub fn matmul(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(
        x.len() >= rows * k && w.len() >= n * k && out.len() >= rows * n,
        "matmul: buffer too small"
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul: bias too short");
    }
    if rows == 0 || n == 0 {
        return;
    }
    let use_avx2 = cpu_features().avx2_fma;
    let threads = super::parallel::kernel_threads();
    let out_ptr = SendPtr(out.as_mut_ptr());
    if threads == 1 || rows * n * k < PARALLEL_MIN_MACS {
        matmul_cols(x, rows, w, n, k, bias, out_ptr, 0..n, use_avx2);
        return;
    }
    // Several chunks per thread balance uneven finishing; chunks are whole tiles.
    let chunk = n.div_ceil(threads * 4).next_multiple_of(TW).max(TW);
    let chunks = n.div_ceil(chunk);
    (0..chunks).into_par_iter().for_each(|c| {
        let cols = c * chunk..((c + 1) * chunk).min(n);
        matmul_cols(x, rows, w, n, k, bias, out_ptr, cols, use_avx2);
    });
}

#[allow(clippy::too_many_arguments)]
fn matmul_cols(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: SendPtr<f32>,
    cols: std::ops::Range<usize>,
    use_avx2: bool,
) {
    for xb in (0..rows).step_by(X_BLOCK) {
        let xe = (xb + X_BLOCK).min(rows);
        let mut j = cols.start;
        while j < cols.end {
            let tw = (cols.end - j).min(TW);
            let mut t = xb;
            while t < xe {
                let tx = x_tile_rows(xe - t);
                let mut acc = [[0f32; TW]; TX];
                if use_avx2 {
                    // SAFETY: avx2+fma were detected at run time.
                    unsafe { super::simd::dot_tile_avx2(x, t, tx, w, j, tw, k, &mut acc) };
                } else {
                    dot_tile_scalar(x, t, tx, w, j, tw, k, &mut acc);
                }
                for (r, acc_row) in acc.iter().enumerate().take(tx) {
                    for (c, &v) in acc_row.iter().enumerate().take(tw) {
                        // SAFETY: `out` holds rows × n floats (asserted by `matmul`, which keeps
                        // it borrowed until every task returns); t + r < rows and j + c < n; each
                        // task owns the columns `cols`, so no element is written by two tasks,
                        // and no reference to `out` exists meanwhile.
                        unsafe {
                            *out.get().add((t + r) * n + j + c) = v + bias.map_or(0.0, |b| b[j + c])
                        };
                    }
                }
                t += tx;
            }
            j += tw;
        }
    }
}

/// Rows of the next register tile when `left` rows remain: tiles of three, but two and two
/// rather than three and one for the last four. A one-row tile has too few FMA chains to hide
/// their latency, so four rows as 3 + 1 cost about as much as six. Which tile a row lands in
/// does not change its results.
fn x_tile_rows(left: usize) -> usize {
    if left == TX + 1 {
        2
    } else {
        left.min(TX)
    }
}

/// Reference tile: `acc[r][c] = x[t + r] · w[j + c]`.
#[allow(clippy::too_many_arguments)]
pub fn dot_tile_scalar(
    x: &[f32],
    t: usize,
    tx: usize,
    w: &[f32],
    j: usize,
    tw: usize,
    k: usize,
    acc: &mut [[f32; TW]; TX],
) {
    for r in 0..tx {
        let xr = &x[(t + r) * k..(t + r + 1) * k];
        for c in 0..tw {
            let wr = &w[(j + c) * k..(j + c + 1) * k];
            acc[r][c] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
}

pub const TILE_W: usize = TW;
pub const TILE_X: usize = TX;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    fn reference(
        x: &[f32],
        rows: usize,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for t in 0..rows {
            for j in 0..n {
                let mut s = bias.map_or(0.0, |b| b[j] as f64);
                for i in 0..k {
                    s += x[t * k + i] as f64 * w[j * k + i] as f64;
                }
                out[t * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut rng = SplitMix64::new(7);
        for &(rows, n, k) in &[
            (1, 1, 1),
            (1, 5, 7),
            (2, 9, 8),
            (3, 17, 33),
            (7, 64, 100),
            (50, 13, 129),
            (97, 40, 17),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let mut out = vec![0f32; rows * n];
            matmul(&x, rows, &w, n, k, Some(&b), &mut out);
            let want = reference(&x, rows, &w, n, k, Some(&b));
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                // f32 accumulation of k terms of size ~1: error grows like sqrt(k)·eps.
                let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6;
                assert!(
                    (got as f64 - want).abs() <= tol * (1.0 + want.abs()),
                    "{rows}x{n}x{k} [{i}]: {got} vs {want}"
                );
            }
        }
    }
}
