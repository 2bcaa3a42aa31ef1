//! The f64 linear algebra GPTQ needs: Cholesky factorization, triangular inverse, and the two
//! vector kernels everything reduces to (a dot product and y −= a·x). The kernels are written
//! so the compiler vectorizes them (independent accumulators, no reduction in the axpy) and are
//! compiled twice: for AVX2+FMA, chosen at run time, and for the baseline. The factorizations
//! are blocked so most of their work is `tile`'s register-tiled kernel; `reference` keeps the
//! unblocked ones they are tested against.

use crate::backend::cpu::simd::cpu_features;
use rayon::prelude::*;

pub mod reference;
pub mod tile;

/// Lanes of independent partial sums in `dot`: enough to fill two AVX-512 registers.
const LANES: usize = 16;

#[inline(always)]
fn dot_body(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn sub_scaled_body(y: &mut [f64], a: f64, x: &[f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y -= a * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f64], b: &[f64]) -> f64 {
    dot_body(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sub_scaled_avx2(y: &mut [f64], a: f64, x: &[f64]) {
    sub_scaled_body(y, a, x)
}

/// Σ aᵢ·bᵢ over the shorter length.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { dot_avx2(a, b) };
    }
    dot_body(a, b)
}

/// y −= a·x, over the shorter length.
pub fn sub_scaled(y: &mut [f64], a: f64, x: &[f64]) {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { sub_scaled_avx2(y, a, x) };
    }
    sub_scaled_body(y, a, x)
}

/// Block width of both factorizations: the rows of the panel each step's GEMM-like update reads.
/// 32, 64, 96 and 128 timed within noise of each other at k = 3584 (2 threads, under load);
/// wider blocks leave more work to the short dot products of the diagonal-block solves.
const NB: usize = 64;
/// Rows per parallel task: enough for several 4-row tiles per panel piece.
const RC: usize = 16;

/// Lower-triangular L with L Lᵀ = A (A symmetric positive definite, `k × k` row-major), or
/// `None` when A is not positive definite. Blocked, left-looking: for each block of NB columns,
/// every row below subtracts its dot products with the block's rows over the columns already
/// done (the GEMM-like part, rows in parallel, `tile::dots_add`), then the diagonal block is
/// factored unblocked and the rows below solve against it.
pub fn cholesky_lower(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; k * k];
    for i in 0..k {
        l[i * k..=i * k + i].copy_from_slice(&a[i * k..=i * k + i]);
    }
    for j0 in (0..k).step_by(NB) {
        let j1 = (j0 + NB).min(k);
        let w = j1 - j0;
        if j0 > 0 {
            // The block's rows over the finished columns, copied so the rows below may change.
            let panel: Vec<f64> = (j0..j1)
                .flat_map(|c| l[c * k..c * k + j0].iter().copied())
                .collect();
            let prows: Vec<&[f64]> = panel.chunks(j0).collect();
            l[j0 * k..]
                .par_chunks_mut(RC * k)
                .enumerate()
                .for_each(|(t, rows)| {
                    let first = j0 + t * RC;
                    let n = rows.len() / k;
                    let mut s = vec![0f64; n * w];
                    let ar: Vec<&[f64]> = rows.chunks(k).map(|r| &r[..j0]).collect();
                    tile::dots_add(&ar, &prows, 0, j0, &mut s);
                    for (o, row) in rows.chunks_mut(k).enumerate() {
                        // Only the lower triangle: columns j0 + c ≤ row index.
                        let cols = (first + o + 1 - j0).min(w);
                        for c in 0..cols {
                            row[j0 + c] -= s[o * w + c];
                        }
                    }
                });
        }
        // The diagonal block, column by column over its own columns.
        for c in j0..j1 {
            let lc: Vec<f64> = l[c * k + j0..c * k + c].to_vec();
            let d = l[c * k + c] - dot(&lc, &lc);
            if d <= 0.0 || !d.is_finite() {
                return None;
            }
            let d = d.sqrt();
            l[c * k + c] = d;
            for i in c + 1..j1 {
                let v = (l[i * k + c] - dot(&l[i * k + j0..i * k + c], &lc)) / d;
                l[i * k + c] = v;
            }
        }
        // The rows below: a forward substitution against the factored diagonal block, in
        // axpy form (each solved entry updates the rest of the row at once) so the inner loop
        // is a vectorized `sub_scaled` over a column of the block, stored as a row of `dt`.
        let dt = block_transposed(&l, k, j0, j1);
        l[j1 * k..].par_chunks_mut(RC * k).for_each(|rows| {
            for row in rows.chunks_mut(k) {
                let x = &mut row[j0..j1];
                for c in 0..w {
                    let v = x[c] / dt[c * w + c];
                    x[c] = v;
                    sub_scaled(&mut x[c + 1..], v, &dt[c * w + c + 1..(c + 1) * w]);
                }
            }
        });
    }
    Some(l)
}

/// L⁻¹ for lower-triangular L, built as its transpose T (row c of T is column c of L⁻¹, the
/// solution of L x = e_c). Blocked like `cholesky_lower`: for each block of NB rows of L, every
/// row of T subtracts its dot products with those rows over the entries already solved (rows of
/// T in parallel, `tile::dots_add`), then finishes the block by forward substitution.
pub fn invert_lower(l: &[f64], k: usize) -> Vec<f64> {
    let mut t = vec![0f64; k * k];
    for r0 in (0..k).step_by(NB) {
        let r1 = (r0 + NB).min(k);
        let w = r1 - r0;
        let lrows: Vec<&[f64]> = (r0..r1).map(|r| &l[r * k..r * k + r0]).collect();
        let dt = block_transposed(l, k, r0, r1);
        t[..r1 * k]
            .par_chunks_mut(RC * k)
            .enumerate()
            .for_each(|(tc, rows)| {
                let c0 = tc * RC;
                let n = rows.len() / k;
                let mut s = vec![0f64; n * w];
                if c0 < r0 {
                    // Rows of T are zero before their own index, so the group's range can
                    // start at its first row's.
                    let nr = n.min(r0 - c0);
                    let ar: Vec<&[f64]> = rows.chunks(k).take(nr).map(|r| &r[..r0]).collect();
                    tile::dots_add(&ar, &lrows, c0, r0, &mut s[..nr * w]);
                }
                // Forward substitution in axpy form, as in `cholesky_lower`: x[r0..r1] holds the
                // partial sums until each entry is solved.
                for (o, x) in rows.chunks_mut(k).enumerate() {
                    let c = c0 + o;
                    let start = c.max(r0);
                    x[start..r1].copy_from_slice(&s[o * w + start - r0..(o + 1) * w]);
                    for r in start..r1 {
                        let i = r - r0;
                        let d = dt[i * w + i];
                        let v = if r == c { 1.0 / d } else { -x[r] / d };
                        x[r] = v;
                        sub_scaled(&mut x[r + 1..r1], -v, &dt[i * w + i + 1..(i + 1) * w]);
                    }
                }
            });
    }
    transpose_in_place(&mut t, k);
    t
}

/// The diagonal block rows/columns j0..j1 of `m`, transposed: row c holds column j0 + c.
fn block_transposed(m: &[f64], k: usize, j0: usize, j1: usize) -> Vec<f64> {
    let w = j1 - j0;
    let mut t = vec![0f64; w * w];
    for i in 0..w {
        for c in 0..w {
            t[c * w + i] = m[(j0 + i) * k + j0 + c];
        }
    }
    t
}

/// Square transpose in place, in tiles so both sides of each swap stay in cache.
fn transpose_in_place(m: &mut [f64], k: usize) {
    const T: usize = 32;
    for i0 in (0..k).step_by(T) {
        for j0 in (i0..k).step_by(T) {
            for i in i0..(i0 + T).min(k) {
                for j in j0.max(i + 1)..(j0 + T).min(k) {
                    m.swap(i * k + j, j * k + i);
                }
            }
        }
    }
}

/// Upper-triangular U with Uᵀ U = A⁻¹, as GPTQ uses it, with one factorization: with P the
/// reversal permutation, P A P = L Lᵀ gives A = V Vᵀ for the upper V = P L P, so
/// A⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹ = P L⁻¹ P (unique, as upper Cholesky factors are).
///
/// Takes `A` by value: reversing both indices of a square matrix is reversing its storage, so P A P
/// and P L⁻¹ P are made in place, and at most two k × k matrices exist at once (a Mixtral
/// down-projection's k = 3584 makes each 103 MB).
pub fn inverse_upper_cholesky(a: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    inverse_upper_with(a, k, cholesky_lower, invert_lower)
}

/// [`inverse_upper_cholesky`] over a given factorization and triangular inverse (the blocked
/// ones, or `reference`'s).
fn inverse_upper_with(
    mut a: Vec<f64>,
    k: usize,
    cholesky: fn(&[f64], usize) -> Option<Vec<f64>>,
    invert: fn(&[f64], usize) -> Vec<f64>,
) -> Option<Vec<f64>> {
    debug_assert_eq!(a.len(), k * k);
    a.reverse();
    let l = cholesky(&a, k)?;
    drop(a);
    let mut u = invert(&l, k);
    drop(l);
    u.reverse();
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    fn spd(k: usize, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64::new(seed);
        let b: Vec<f64> = (0..k * k).map(|_| rng.normal() as f64).collect();
        let mut a = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                a[i * k + j] = (0..k).map(|m| b[i * k + m] * b[j * k + m]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        a
    }

    #[test]
    fn kernels_equal_plain_loops() {
        let mut rng = SplitMix64::new(3);
        for n in [0, 1, 7, 16, 17, 100] {
            let a: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
            let b: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-12 * (1.0 + plain.abs()));
            let mut y = b.clone();
            sub_scaled(&mut y, 0.5, &a);
            for i in 0..n {
                assert_eq!(y[i], b[i] - 0.5 * a[i]);
            }
        }
    }

    #[test]
    fn cholesky_and_inverse_reconstruct() {
        for k in [1, 5, 40] {
            let a = spd(k, k as u64);
            let l = cholesky_lower(&a, k).unwrap();
            let linv = invert_lower(&l, k);
            for i in 0..k {
                for j in 0..k {
                    let llt: f64 = (0..k).map(|m| l[i * k + m] * l[j * k + m]).sum();
                    assert!((llt - a[i * k + j]).abs() < 1e-9 * a[i * k + i].abs().max(1.0));
                    let id: f64 = (0..k).map(|m| l[i * k + m] * linv[m * k + j]).sum();
                    assert!((id - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
                }
            }
            // Uᵀ U A = I, and U is upper triangular.
            let u = inverse_upper_cholesky(a.clone(), k).unwrap();
            for i in 0..k {
                for j in 0..i {
                    assert_eq!(u[i * k + j], 0.0);
                }
            }
            for i in 0..k {
                for j in 0..k {
                    let mut s = 0.0;
                    for m in 0..k {
                        let utu: f64 = (0..k).map(|p| u[p * k + i] * u[p * k + m]).sum();
                        s += utu * a[m * k + j];
                    }
                    assert!((s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8, "k {k}");
                }
            }
        }
    }

    fn max_abs(m: &[f64]) -> f64 {
        m.iter().fold(0.0, |x, v| x.max(v.abs()))
    }

    /// Sizes around the block (NB = 64), the row task (RC = 16) and the tile widths.
    const EDGES: [usize; 8] = [1, 7, 63, 64, 65, 130, 300, 17];

    #[test]
    fn blocked_equals_unblocked_reference() {
        for k in EDGES {
            let a = spd(k, 100 + k as u64);
            let lb = cholesky_lower(&a, k).unwrap();
            let lr = reference::cholesky_lower(&a, k).unwrap();
            // A = B Bᵀ + I with B k × k standard normal has eigenvalues in [1, ~4k], so both
            // (backward-stable) factorizations agree to ~ε · cond(A) · ‖L‖ ≤ 1e-16 · 1200 · ‖L‖
            // at k = 300; 1e-11 relative leaves a margin for the summation-order growth.
            let scale = max_abs(&lr);
            for (x, y) in lb.iter().zip(&lr) {
                assert!((x - y).abs() <= 1e-11 * scale, "cholesky k {k}: {x} vs {y}");
            }
            // The upper triangle stays exactly zero.
            for i in 0..k {
                assert!(lb[i * k + i + 1..(i + 1) * k].iter().all(|&v| v == 0.0));
            }
            // The inverse of the same L: forward substitution, error bounded by
            // ε · cond(L) · ‖L⁻¹‖ with cond(L) = √cond(A).
            let xb = invert_lower(&lr, k);
            let xr = reference::invert_lower(&lr, k);
            let scale = max_abs(&xr);
            for (i, (x, y)) in xb.iter().zip(&xr).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-12 * scale,
                    "inverse k {k} at {i}: {x} vs {y}"
                );
            }
            let ub = inverse_upper_cholesky(a.clone(), k).unwrap();
            let ur = reference::inverse_upper_cholesky(a, k).unwrap();
            let scale = max_abs(&ur);
            for (x, y) in ub.iter().zip(&ur) {
                assert!((x - y).abs() <= 1e-11 * scale, "upper k {k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn blocked_reconstructs_at_block_edges() {
        for k in [65, 130] {
            let a = spd(k, k as u64);
            let l = cholesky_lower(&a, k).unwrap();
            let linv = invert_lower(&l, k);
            let scale = max_abs(&a);
            for i in 0..k {
                for j in 0..k {
                    let llt: f64 = (0..k).map(|m| l[i * k + m] * l[j * k + m]).sum();
                    // Backward error of Cholesky: ~k · ε · ‖A‖.
                    assert!(
                        (llt - a[i * k + j]).abs() < 1e-12 * scale,
                        "k {k} ({i},{j})"
                    );
                    let id: f64 = (0..k).map(|m| l[i * k + m] * linv[m * k + j]).sum();
                    assert!((id - if i == j { 1.0 } else { 0.0 }).abs() < 1e-10, "k {k}");
                }
            }
        }
    }

    #[test]
    fn not_positive_definite_is_refused() {
        let a = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky_lower(&a, 2).is_none());
        // Failing in a later block, and on a NaN.
        let k = 130;
        let mut a = spd(k, 5);
        a[100 * k + 100] = -1.0;
        assert!(cholesky_lower(&a, k).is_none());
        assert!(inverse_upper_cholesky(a, k).is_none());
        let mut a = spd(k, 6);
        a[120 * k + 90] = f64::NAN;
        assert!(cholesky_lower(&a, k).is_none());
    }
}
