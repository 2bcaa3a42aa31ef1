//! The unblocked factorizations: one column at a time, each entry a dot product. Slow (about
//! 5 GFLOP/s), but short enough to check by eye, so they are the reference the blocked versions
//! are tested against and the baseline `benches/gptq_factor.rs` times them against.

use super::dot;
use rayon::prelude::*;

/// Rows below which a column step of the factorization runs on the caller's thread.
const PAR_MIN_WORK: usize = 1 << 15;

/// Lower-triangular L with L Lᵀ = A, or `None` when A is not positive definite. Column by
/// column, each entry a dot product of two contiguous row prefixes; rows in parallel.
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
    for i in 0..k {
        for j in i + 1..k {
            cols.swap(i * k + j, j * k + i);
        }
    }
    cols
}

/// `super::inverse_upper_cholesky` made of the unblocked pieces.
pub fn inverse_upper_cholesky(a: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    super::inverse_upper_with(a, k, cholesky_lower, invert_lower)
}
