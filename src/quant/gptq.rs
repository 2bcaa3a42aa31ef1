//! GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, pushing each column's
//! rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer
//! input, H = XᵀX. Per-output-channel symmetric int8 scales, damping of 1% of mean diag(H),
//! optional act-order, upper Cholesky factor of H⁻¹.

use rayon::prelude::*;

use super::linalg::{self, inverse_upper_cholesky};

/// Rows quantized side by side (one task of the pool).
const ROW_TILE: usize = 16;

/// f64 working values GPTQ holds at once (64 MiB).
const CHUNK_VALUES: usize = 1 << 23;

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

/// What GPTQ needs of a layer input's Hessian, computed once for every linear that reads it
/// (q/k/v, gate/up): the column order, the inputs that never fire, and the upper Cholesky
/// factor of the damped, permuted H⁻¹.
pub struct HessianFactor {
    pub(super) k: usize,
    pub(super) perm: Vec<usize>,
    pub(super) dead: Vec<bool>,
    /// `None` where H could not be factored: those linears are rounded.
    pub(super) hinv: Option<Vec<f64>>,
}

impl HessianFactor {
    /// From `H` (`k × k`, f32 as calibration stores it or f64), factored in f64.
    pub fn new<T: Copy + Into<f64>>(h: &[T], k: usize, opts: &GptqOptions) -> HessianFactor {
        // Inputs that never fire carry no information: pin them (their weights are zeroed).
        let dead: Vec<bool> = (0..k).map(|i| h[i * k + i].into() == 0.0).collect();
        let perm: Vec<usize> = if opts.act_order {
            let mut p: Vec<usize> = (0..k).collect();
            p.sort_by(|&a, &b| h[b * k + b].into().total_cmp(&h[a * k + a].into()));
            p
        } else {
            (0..k).collect()
        };
        // One f64 copy, permuted (a k² matrix is the largest thing a layer's GPTQ holds).
        let mut hp: Vec<f64> = (0..k * k)
            .map(|idx| h[perm[idx / k] * k + perm[idx % k]].into())
            .collect();
        pin_and_damp(&mut hp, k, |i| dead[perm[i]], opts.damp);
        HessianFactor {
            k,
            perm,
            dead,
            hinv: inverse_upper_cholesky(hp, k),
        }
    }
}

/// GPTQ's damping of `h` (`k × k`, in place): the diagonal of every input `dead(i)` says never
/// fires set to 1, then `damp` × the diagonal's mean added to the whole diagonal.
pub(super) fn pin_and_damp(h: &mut [f64], k: usize, dead: impl Fn(usize) -> bool, damp: f64) {
    for i in (0..k).filter(|&i| dead(i)) {
        h[i * k + i] = 1.0;
    }
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        h[i * k + i] += damp * mean_diag;
    }
}

/// Quantizes `w` (`n × k`, row-major) with Hessian `h` (`k × k`). Returns int8 values (`n × k`)
/// and per-row scales. Falls back to plain rounding where H cannot be factored.
pub fn gptq(w: &[f32], n: usize, k: usize, h: &[f64], opts: &GptqOptions) -> (Vec<i8>, Vec<f32>) {
    gptq_factored(w, n, &HessianFactor::new(h, k, opts))
}

/// [`gptq`] with the input's factor computed already.
pub fn gptq_factored(w: &[f32], n: usize, f: &HessianFactor) -> (Vec<i8>, Vec<f32>) {
    gptq_in_chunks(w, n, f, CHUNK_VALUES)
}

/// [`gptq_factored`] holding at most about `chunk_values` f64 working values at once.
fn gptq_in_chunks(
    w: &[f32],
    n: usize,
    f: &HessianFactor,
    chunk_values: usize,
) -> (Vec<i8>, Vec<f32>) {
    let k = f.k;
    let scales: Vec<f32> = (0..n).map(|j| row_scale(&w[j * k..(j + 1) * k])).collect();
    let Some(hinv) = &f.hinv else {
        let q = w
            .chunks(k)
            .zip(&scales)
            .flat_map(|(row, &s)| row.iter().map(move |&v| quantize_value(v as f64, s as f64)))
            .collect();
        return (q, scales);
    };
    let perm = &f.perm;
    // Rows are independent: each quantizes its columns in order, pushing each column's error
    // onto the columns after it. They go in chunks of about `chunk_values` f64 working values,
    // so a vocabulary-sized head holds one chunk, not an f64 copy of the whole matrix.
    let chunk_rows = (chunk_values / k.max(1)).max(1).div_ceil(ROW_TILE) * ROW_TILE;
    let mut out = vec![0i8; n * k];
    for (c, out_rows) in out.chunks_mut(chunk_rows * k).enumerate() {
        let first = c * chunk_rows;
        let rows_here = out_rows.len() / k;
        let mut wp: Vec<f64> = (0..rows_here * k)
            .map(|idx| {
                let col = perm[idx % k];
                if f.dead[col] {
                    0.0
                } else {
                    w[(first + idx / k) * k + col] as f64
                }
            })
            .collect();
        // A tile of rows shares every row of H⁻¹'s factor while it is in cache, which is what
        // GPTQ's lazy batches achieve for a GPU.
        let mut q = vec![0i8; rows_here * k];
        wp.par_chunks_mut(ROW_TILE * k)
            .zip(q.par_chunks_mut(ROW_TILE * k))
            .zip(scales[first..first + rows_here].par_chunks(ROW_TILE))
            .for_each(|((rows, qrows), tile_scales)| {
                for i in 0..k {
                    let d = hinv[i * k + i];
                    let tail = &hinv[i * k + i + 1..(i + 1) * k];
                    for ((row, qrow), &s) in
                        rows.chunks_mut(k).zip(qrows.chunks_mut(k)).zip(tile_scales)
                    {
                        let qi = quantize_value(row[i], s as f64);
                        qrow[i] = qi;
                        let e = (row[i] - qi as f64 * s as f64) / d;
                        linalg::sub_scaled(&mut row[i + 1..], e, tail);
                    }
                }
            });
        // Undo the column permutation.
        for (out_row, q_row) in out_rows.chunks_mut(k).zip(q.chunks(k)) {
            for (pos, &col) in perm.iter().enumerate() {
                out_row[col] = q_row[pos];
            }
        }
    }
    (out, scales)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    /// Inputs with a few strong directions (rows of X), and their XᵀX: where GPTQ's
    /// compensation matters. Shared with the int4 tests.
    pub(crate) fn correlated_inputs(
        rng: &mut SplitMix64,
        rows: usize,
        k: usize,
    ) -> (Vec<f32>, Vec<f64>) {
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
                    h[i * k + j] += f64::from(x[r * k + i]) * f64::from(x[r * k + j]);
                }
            }
        }
        (x, h)
    }

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

    /// Rows are independent, so quantizing them a chunk at a time changes no value.
    #[test]
    fn chunks_of_rows_quantize_as_the_whole_matrix() {
        let (n, k, rows) = (70, 24, 200);
        let mut rng = SplitMix64::new(9);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let x: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
        let mut h = vec![0f64; k * k];
        for r in x.chunks(k) {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += (r[i] * r[j]) as f64;
                }
            }
        }
        for act_order in [false, true] {
            let opts = GptqOptions {
                damp: 0.01,
                act_order,
            };
            let f = HessianFactor::new(&h, k, &opts);
            let whole = gptq_in_chunks(&w, n, &f, n * k);
            // 16-row chunks: 5 chunks, the last one short.
            let chunked = gptq_in_chunks(&w, n, &f, 3 * k);
            assert_eq!(whole, chunked);
        }
    }

    #[test]
    fn gptq_beats_rounding_on_correlated_inputs() {
        let (n, k, rows) = (16, 48, 400);
        let mut rng = SplitMix64::new(5);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        // Correlated inputs with a few strong channels: where GPTQ's compensation matters.
        let (x, h) = correlated_inputs(&mut rng, rows, k);
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

    /// Textbook GPTQ: H⁻¹ by Gauss-Jordan, its upper Cholesky factor by the definition, then
    /// column by column over the whole matrix.
    fn reference_gptq(w: &[f32], n: usize, k: usize, h: &[f64], damp: f64) -> Vec<i8> {
        let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        let mut a: Vec<f64> = h.to_vec();
        (0..k).for_each(|i| a[i * k + i] += damp * mean);
        let mut inv: Vec<f64> = (0..k * k).map(|i| (i / k == i % k) as u8 as f64).collect();
        for c in 0..k {
            let p = a[c * k + c];
            for j in 0..k {
                a[c * k + j] /= p;
                inv[c * k + j] /= p;
            }
            for r in (0..k).filter(|&r| r != c) {
                let f = a[r * k + c];
                for j in 0..k {
                    a[r * k + j] -= f * a[c * k + j];
                    inv[r * k + j] -= f * inv[c * k + j];
                }
            }
        }
        // Upper U with UᵀU = inv: U[i][i] = sqrt(inv[i][i] − Σ_{m<i} U[m][i]²), ...
        let mut u = vec![0f64; k * k];
        for i in 0..k {
            let d = inv[i * k + i] - (0..i).map(|m| u[m * k + i].powi(2)).sum::<f64>();
            u[i * k + i] = d.sqrt();
            for j in i + 1..k {
                let s = inv[i * k + j] - (0..i).map(|m| u[m * k + i] * u[m * k + j]).sum::<f64>();
                u[i * k + j] = s / u[i * k + i];
            }
        }
        let scales: Vec<f64> = (0..n)
            .map(|j| row_scale(&w[j * k..(j + 1) * k]) as f64)
            .collect();
        let mut wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let mut q = vec![0i8; n * k];
        for i in 0..k {
            for j in 0..n {
                let qi = quantize_value(wd[j * k + i], scales[j]);
                q[j * k + i] = qi;
                let e = (wd[j * k + i] - qi as f64 * scales[j]) / u[i * k + i];
                for c in i + 1..k {
                    wd[j * k + c] -= e * u[i * k + c];
                }
            }
        }
        q
    }

    #[test]
    fn fast_gptq_equals_the_textbook_procedure() {
        // Odd sizes: a partial row tile, columns not a multiple of the kernels' lanes.
        let (n, k, rows) = (37, 45, 300);
        let mut rng = SplitMix64::new(9);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| rng.normal() * (1.0 + (i % k) as f32 / 8.0))
            .collect();
        let mut h = vec![0f64; k * k];
        for r in 0..rows {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[r * k + i] as f64 * x[r * k + j] as f64;
                }
            }
        }
        let (fast, _) = gptq(&w, n, k, &h, &GptqOptions::default());
        let slow = reference_gptq(&w, n, k, &h, 0.01);
        // Summation order differs, so a value on a rounding boundary may land one step away.
        let differ = fast.iter().zip(&slow).filter(|(a, b)| a != b).count();
        assert!(fast
            .iter()
            .zip(&slow)
            .all(|(a, b)| (*a as i32 - *b as i32).abs() <= 1));
        assert!(
            differ * 1000 <= n * k,
            "{differ} of {} values differ",
            n * k
        );
    }
}
