//! Weight-only int8 matmul: f32 activations times int8 weights with per-output-channel scales,
//! `out[t, j] = scale_j · Σ_k x[t, k]·w[j, k] (+ b[j])`. For the output head, where quantizing
//! the final hidden state is not wanted but reading 4× fewer weight bytes is.

use super::int8::Int8Matrix;
use super::simd::{cpu_features, SendPtr};
use rayon::prelude::*;

const PARALLEL_MIN_MACS: usize = 1 << 17;

pub fn matmul_w8(x: &[f32], rows: usize, w: &Int8Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert!(
        x.len() >= rows * k && out.len() >= rows * n,
        "matmul_w8: buffer too small"
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul_w8: bias too short");
    }
    let avx2 = cpu_features().avx2_fma;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |cols: std::ops::Range<usize>| {
        for t in 0..rows {
            let xr = &x[t * k..(t + 1) * k];
            for j in cols.clone() {
                let wr = &w.row(j)[..k];
                let dot = if avx2 {
                    // SAFETY: avx2+fma detected at run time; both slices are k long.
                    unsafe { dot_i8_avx2(xr, wr) }
                } else {
                    dot_i8_scalar(xr, wr)
                };
                let v = dot * w.scales[j] + bias.map_or(0.0, |b| b[j]);
                // SAFETY: t < rows, j < n, `out` holds rows × n floats and stays borrowed until
                // all tasks return; tasks own disjoint column ranges.
                unsafe { *out_ptr.get().add(t * n + j) = v };
            }
        }
    };
    let threads = super::parallel::kernel_threads();
    if threads == 1 || rows * n * k < PARALLEL_MIN_MACS {
        run(0..n);
        return;
    }
    let chunk = n.div_ceil(threads * 4).max(1);
    (0..n.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| run(c * chunk..((c + 1) * chunk).min(n)));
}

/// Reference: Σ x·w in f32, in index order.
pub fn dot_i8_scalar(x: &[f32], w: &[i8]) -> f32 {
    x.iter().zip(w).map(|(&a, &b)| a * b as f32).sum()
}

/// # Safety
/// The CPU must support avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_i8_avx2(x: &[f32], w: &[i8]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len().min(w.len());
    let k16 = k / 16 * 16;
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < k16 {
        // In bounds: i + 16 <= k16 <= k. Sign-extend 8 int8 at a time to i32, then to f32.
        let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
            w.as_ptr().add(i).cast(),
        )));
        let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
            w.as_ptr().add(i + 8).cast(),
        )));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), w0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8)), w1, a1);
        i += 16;
    }
    let mut total = super::simd::hsum(_mm256_add_ps(a0, a1));
    for j in k16..k {
        total += x[j] * w[j] as f32;
    }
    total
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn dot_i8_avx2(x: &[f32], w: &[i8]) -> f32 {
    dot_i8_scalar(x, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    #[test]
    fn weight_only_matches_f64_reference_on_odd_shapes() {
        let mut rng = SplitMix64::new(3);
        for &(rows, n, k) in &[
            (1, 1, 1),
            (1, 7, 15),
            (2, 33, 16),
            (3, 64, 130),
            (5, 300, 1000),
        ] {
            let wf: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let m = Int8Matrix::quantize_rtn(&wf, n, k).unwrap();
            let x: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let mut out = vec![0f32; rows * n];
            matmul_w8(&x, rows, &m, Some(&b), &mut out);
            for t in 0..rows {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| x[t * k + i] as f64 * m.row(j)[i] as f64)
                        .sum::<f64>()
                        * m.scales[j] as f64
                        + b[j] as f64;
                    let scale: f64 = (0..k)
                        .map(|i| (x[t * k + i] as f64 * m.row(j)[i] as f64).abs())
                        .sum::<f64>()
                        * m.scales[j] as f64;
                    // f32 accumulation: relative error ~k·eps of the sum of magnitudes.
                    let tol = 1e-6 * (k as f64) * scale + 1e-6;
                    assert!(
                        (out[t * n + j] as f64 - want).abs() <= tol,
                        "{rows}x{n}x{k} [{t},{j}]"
                    );
                }
            }
        }
    }

    #[test]
    fn avx2_dot_agrees_with_scalar() {
        if !cpu_features().avx2_fma {
            return; // only the scalar tier exists here; the test above covers it
        }
        let mut rng = SplitMix64::new(9);
        for k in [0, 1, 15, 16, 17, 100, 1024] {
            let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
            let w: Vec<i8> = (0..k)
                .map(|_| (rng.next_u64() % 255) as i8)
                .map(|v| v.max(-127))
                .collect();
            let (a, s) = (unsafe { dot_i8_avx2(&x, &w) }, dot_i8_scalar(&x, &w));
            let mag: f32 = x.iter().zip(&w).map(|(&p, &q)| (p * q as f32).abs()).sum();
            assert!((a - s).abs() <= 1e-5 * mag + 1e-6, "k {k}: {a} vs {s}");
        }
    }
}
