//! The f64 linear algebra GPTQ needs: Cholesky factorization, triangular inverse, and the two
//! vector kernels everything reduces to (a dot product and y −= a·x). The kernels are written
//! so the compiler vectorizes them (independent accumulators, no reduction in the axpy) and are
//! compiled twice: for AVX2+FMA, chosen at run time, and for the baseline.

use crate::backend::cpu::simd::cpu_features;
use rayon::prelude::*;

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

/// Rows below which a column step of the factorization runs on the caller's thread.
const PAR_MIN_WORK: usize = 1 << 15;

/// Lower-triangular L with L Lᵀ = A (A symmetric positive definite, `k × k` row-major), or
/// `None` when A is not positive definite. Column by column, each entry a dot product of two
/// contiguous row prefixes; the rows below the diagonal run in parallel.
pub fn cholesky_lower(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; k * k];
    for j in 0..k {
        let lj: Vec<f64> = l[j * k..j * k + j].to_vec();
        let d = a[j * k + j] - dot(&lj, &lj);
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        l[j * k + j] = d;
        let rest = &mut l[(j + 1) * k..];
        let entry = |off: usize, row: &mut [f64]| {
            let i = j + 1 + off;
            row[j] = (a[i * k + j] - dot(&row[..j], &lj)) / d;
        };
        if (k - j) * j < PAR_MIN_WORK {
            rest.chunks_mut(k)
                .enumerate()
                .for_each(|(o, r)| entry(o, r));
        } else {
            rest.par_chunks_mut(k)
                .enumerate()
                .for_each(|(o, r)| entry(o, r));
        }
    }
    Some(l)
}

/// L⁻¹ for lower-triangular L: each column an independent forward substitution (in parallel),
/// written as a row of the transpose and transposed back.
pub fn invert_lower(l: &[f64], k: usize) -> Vec<f64> {
    let mut cols = vec![0f64; k * k];
    cols.par_chunks_mut(k).enumerate().for_each(|(c, x)| {
        // Solve L x = e_c; x[r] = 0 for r < c.
        x[c] = 1.0 / l[c * k + c];
        for r in c + 1..k {
            let s = dot(&l[r * k + c..r * k + r], &x[c..r]);
            x[r] = -s / l[r * k + r];
        }
    });
    // Column-major to row-major, in place (one k × k matrix fewer at the peak).
    for i in 0..k {
        for j in i + 1..k {
            cols.swap(i * k + j, j * k + i);
        }
    }
    cols
}

/// Upper-triangular U with Uᵀ U = A⁻¹, as GPTQ uses it, with one factorization: with P the
/// reversal permutation, P A P = L Lᵀ gives A = V Vᵀ for the upper V = P L P, so
/// A⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹ = P L⁻¹ P (unique, as upper Cholesky factors are).
///
/// Takes `A` by value: reversing both indices of a square matrix is reversing its storage, so P A P
/// and P L⁻¹ P are made in place, and at most two k × k matrices exist at once (a Mixtral
/// down-projection's k = 3584 makes each 103 MB).
pub fn inverse_upper_cholesky(mut a: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    debug_assert_eq!(a.len(), k * k);
    a.reverse();
    let l = cholesky_lower(&a, k)?;
    drop(a);
    let mut u = invert_lower(&l, k);
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

    #[test]
    fn not_positive_definite_is_refused() {
        let a = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky_lower(&a, 2).is_none());
    }
}
