//! GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, pushing each column's
//! rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer
//! input, H = XᵀX. Per-output-channel symmetric int8 scales, damping of 1% of mean diag(H),
//! optional act-order, lazy batch updates of 128 columns, upper Cholesky factor of H⁻¹.

use rayon::prelude::*;

/// Columns quantized together before their error is pushed to the rest.
const BLOCK: usize = 128;

pub struct GptqOptions {
    /// Fraction of mean diag(H) added to the diagonal.
    pub damp: f64,
    /// Quantize columns in order of decreasing diag(H).
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            act_order: false,
        }
    }
}

/// Symmetric per-row scale: max |w| / 127 (1 for an all-zero row).
pub fn row_scale(row: &[f32]) -> f32 {
    let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if m > 0.0 {
        m / 127.0
    } else {
        1.0
    }
}

/// Round half away from zero, clamped to [-127, 127] (the activation quantizer's rule too).
pub fn quantize_value(w: f64, scale: f64) -> i8 {
    (w / scale).round().clamp(-127.0, 127.0) as i8
}

/// Quantizes `w` (`n × k`, row-major) with Hessian `h` (`k × k`). Returns int8 values (`n × k`)
/// and per-row scales. Falls back to plain rounding where H cannot be factored.
pub fn gptq(w: &[f32], n: usize, k: usize, h: &[f64], opts: &GptqOptions) -> (Vec<i8>, Vec<f32>) {
    let scales: Vec<f32> = (0..n).map(|j| row_scale(&w[j * k..(j + 1) * k])).collect();
    let mut h = h.to_vec();
    let mut wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    // Inputs that never fire carry no information: pin them and zero their weights.
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
            for j in 0..n {
                wd[j * k + i] = 0.0;
            }
        }
    }
    let perm: Vec<usize> = if opts.act_order {
        let mut p: Vec<usize> = (0..k).collect();
        p.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        p
    } else {
        (0..k).collect()
    };
    let hp: Vec<f64> = (0..k * k)
        .map(|idx| h[perm[idx / k] * k + perm[idx % k]])
        .collect();
    let mut wp: Vec<f64> = (0..n * k)
        .map(|idx| wd[(idx / k) * k + perm[idx % k]])
        .collect();

    let mean_diag = (0..k).map(|i| hp[i * k + i]).sum::<f64>() / k as f64;
    let mut hd = hp;
    for i in 0..k {
        hd[i * k + i] += opts.damp * mean_diag;
    }
    let Some(hinv) = inverse_upper_cholesky(&hd, k) else {
        let q = w
            .chunks(k)
            .zip(&scales)
            .flat_map(|(row, &s)| row.iter().map(move |&v| quantize_value(v as f64, s as f64)))
            .collect();
        return (q, scales);
    };

    let mut q = vec![0i8; n * k];
    for b0 in (0..k).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(k);
        // Per row: quantize the block's columns, propagating error inside the block, and keep
        // the scaled errors for the lazy update of the columns after the block.
        wp.par_chunks_mut(k)
            .zip(q.par_chunks_mut(k))
            .zip(scales.par_iter())
            .for_each(|((row, qrow), &s)| {
                let mut err = vec![0f64; b1 - b0];
                for i in b0..b1 {
                    let d = hinv[i * k + i];
                    let qi = quantize_value(row[i], s as f64);
                    qrow[i] = qi;
                    let e = (row[i] - qi as f64 * s as f64) / d;
                    for c in i + 1..b1 {
                        row[c] -= e * hinv[i * k + c];
                    }
                    err[i - b0] = e;
                }
                for c in b1..k {
                    let mut acc = 0.0;
                    for i in b0..b1 {
                        acc += err[i - b0] * hinv[i * k + c];
                    }
                    row[c] -= acc;
                }
            });
    }
    // Undo the column permutation.
    let mut out = vec![0i8; n * k];
    for j in 0..n {
        for (pos, &col) in perm.iter().enumerate() {
            out[j * k + col] = q[j * k + pos];
        }
    }
    (out, scales)
}

/// Upper-triangular U with Uᵀ U = A⁻¹ (A symmetric positive definite), as GPTQ uses it.
fn inverse_upper_cholesky(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let l = cholesky_lower(a, k)?;
    // A⁻¹ = L⁻ᵀ L⁻¹: invert L (lower triangular) by forward substitution.
    let mut linv = vec![0f64; k * k];
    for c in 0..k {
        linv[c * k + c] = 1.0 / l[c * k + c];
        for r in c + 1..k {
            let mut s = 0.0;
            for m in c..r {
                s += l[r * k + m] * linv[m * k + c];
            }
            linv[r * k + c] = -s / l[r * k + r];
        }
    }
    let mut ainv = vec![0f64; k * k];
    ainv.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (j, out) in row.iter_mut().enumerate() {
            // (L⁻ᵀ L⁻¹)[i][j] = Σ_m L⁻¹[m][i] L⁻¹[m][j], m ≥ max(i, j)
            let mut s = 0.0;
            for m in i.max(j)..k {
                s += linv[m * k + i] * linv[m * k + j];
            }
            *out = s;
        }
    });
    // Upper factor of A⁻¹: the transpose of its lower Cholesky factor.
    let l2 = cholesky_lower(&ainv, k)?;
    let mut u = vec![0f64; k * k];
    for r in 0..k {
        for c in 0..=r {
            u[c * k + r] = l2[r * k + c];
        }
    }
    Some(u)
}

fn cholesky_lower(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; k * k];
    for j in 0..k {
        let mut d = a[j * k + j];
        for m in 0..j {
            d -= l[j * k + m] * l[j * k + m];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        l[j * k + j] = d;
        let (done, rest) = l.split_at_mut((j + 1) * k);
        let lj = &done[j * k..j * k + j];
        rest.par_chunks_mut(k).enumerate().for_each(|(off, row)| {
            let i = j + 1 + off;
            let mut s = a[i * k + j];
            for m in 0..j {
                s -= row[m] * lj[m];
            }
            row[j] = s / d;
        });
    }
    Some(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    /// Output error ‖(W − Q)Xᵀ‖² summed over the rows of X.
    fn output_error(w: &[f32], q: &[i8], s: &[f32], x: &[f32], n: usize, k: usize) -> f64 {
        let rows = x.len() / k;
        let mut e = 0.0;
        for r in 0..rows {
            for j in 0..n {
                let mut d = 0.0;
                for i in 0..k {
                    d += (w[j * k + i] as f64 - q[j * k + i] as f64 * s[j] as f64)
                        * x[r * k + i] as f64;
                }
                e += d * d;
            }
        }
        e
    }

    #[test]
    fn gptq_beats_rounding_on_correlated_inputs() {
        let (n, k, rows) = (16, 48, 400);
        let mut rng = SplitMix64::new(5);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        // Correlated inputs with a few strong channels: where GPTQ's compensation matters.
        let basis: Vec<f32> = (0..8 * k).map(|_| rng.normal()).collect();
        let mut x = vec![0f32; rows * k];
        for r in 0..rows {
            let coef: Vec<f32> = (0..8).map(|_| rng.normal()).collect();
            for i in 0..k {
                x[r * k + i] =
                    (0..8).map(|b| coef[b] * basis[b * k + i]).sum::<f32>() + 0.1 * rng.normal();
            }
        }
        let mut h = vec![0f64; k * k];
        for r in 0..rows {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[r * k + i] as f64 * x[r * k + j] as f64;
                }
            }
        }
        let scales: Vec<f32> = (0..n).map(|j| row_scale(&w[j * k..(j + 1) * k])).collect();
        let rtn: Vec<i8> = (0..n * k)
            .map(|i| quantize_value(w[i] as f64, scales[i / k] as f64))
            .collect();
        for act_order in [false, true] {
            let (q, s) = gptq(
                &w,
                n,
                k,
                &h,
                &GptqOptions {
                    damp: 0.01,
                    act_order,
                },
            );
            assert_eq!(s, scales);
            let (eg, er) = (
                output_error(&w, &q, &s, &x, n, k),
                output_error(&w, &rtn, &scales, &x, n, k),
            );
            assert!(
                eg < 0.7 * er,
                "act_order {act_order}: gptq {eg} vs rtn {er}"
            );
        }
    }

    #[test]
    fn inverse_cholesky_is_correct() {
        let k = 5;
        let mut rng = SplitMix64::new(1);
        let b: Vec<f64> = (0..k * k).map(|_| rng.normal() as f64).collect();
        let mut a = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                a[i * k + j] = (0..k).map(|m| b[i * k + m] * b[j * k + m]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let u = inverse_upper_cholesky(&a, k).unwrap();
        // Uᵀ U A = I
        for i in 0..k {
            for j in 0..k {
                let mut s = 0.0;
                for m in 0..k {
                    let utu: f64 = (0..k).map(|p| u[p * k + i] * u[p * k + m]).sum();
                    s += utu * a[m * k + j];
                }
                assert!((s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
    }
}
