//! A diagnostic for choosing which linears of a W4A8 model keep 8 bits: with
//! `EDGEMOE_QUANT_ERRORS=FILE` set, `quantize` appends one JSON line per GPTQ-quantized linear
//! (W4A8 runs only) with GPTQ's objective (w − ŵ)ᵀ H (w − ŵ) summed over rows, at 8 bits and on
//! the 4-bit grid (each by GPTQ on the same factor, the 4-bit one with the group rule and refit
//! in use), and the output energy Σ wᵀ H w, all on the undamped Hessian of the linear's input —
//! the squared output error of each choice on the calibration tokens. The model written is the
//! same with or without it.

use rayon::prelude::*;

use super::gptq::{gptq_factored, HessianFactor};
use super::{gptq4, QuantOptions};
use crate::model::int4::Int4Matrix;

/// Σ over rows of (w − ŵ)ᵀ H (w − ŵ), `w` and `what` `n × k` row-major, `h` `k × k`; with
/// `what` all zeros it is the output energy Σ wᵀ H w.
pub(super) fn hessian_objective(w: &[f32], what: &[f32], k: usize, h: &[f32]) -> f64 {
    w.par_chunks(k)
        .zip(what.par_chunks(k))
        .map(|(row, qrow)| {
            let d: Vec<f64> = row
                .iter()
                .zip(qrow)
                .map(|(&a, &b)| f64::from(a) - f64::from(b))
                .collect();
            let mut total = 0.0;
            for (i, &di) in d.iter().enumerate().filter(|(_, &di)| di != 0.0) {
                let hrow = &h[i * k..(i + 1) * k];
                let dot: f64 = hrow.iter().zip(&d).map(|(&x, &y)| f64::from(x) * y).sum();
                total += di * dot;
            }
            total
        })
        .sum()
}

/// Appends linear `name`'s line to `EDGEMOE_QUANT_ERRORS` when it is set (see the module doc).
#[allow(clippy::too_many_arguments)]
pub(super) fn report(
    name: &str,
    w: &[f32],
    n: usize,
    k: usize,
    f: &HessianFactor,
    h: &[f32],
    opts: &QuantOptions,
    grid: gptq4::Int4Grid,
) {
    let Some(path) = std::env::var_os("EDGEMOE_QUANT_ERRORS") else {
        return;
    };
    // Int8 scales are stored as f32 (the store's int8 layout), so no rounding of them here.
    let (q8, s8) = gptq_factored(w, n, f);
    let w8: Vec<f32> = q8
        .iter()
        .enumerate()
        .map(|(idx, &q)| f32::from(q) * s8[idx / k])
        .collect();
    let mut q4 = gptq4::gptq4_factored(w, n, f, grid, opts.int4_rule);
    if opts.int4_refit && f.hinv.is_some() {
        gptq4::refit_scales(w, n, k, h, opts.damp, grid, &mut q4);
    }
    let zeros = (!grid.symmetric).then_some(&q4.zeros[..]);
    let Ok(m4) = Int4Matrix::from_quantized(n, k, grid.group, &q4.u, &q4.scales, zeros) else {
        return;
    };
    let w4: Vec<f32> = (0..n).flat_map(|j| m4.dequantize_row(j)).collect();
    let line = serde_json::json!({
        "name": name,
        "n": n,
        "k": k,
        "e8": hessian_objective(w, &w8, k, h),
        "e4": hessian_objective(w, &w4, k, h),
        "energy": hessian_objective(w, &vec![0.0; n * k], k, h),
    });
    use std::io::Write;
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{line}"));
    if let Err(e) = written {
        eprintln!("EDGEMOE_QUANT_ERRORS {}: {e}", path.to_string_lossy());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The objective equals the squared output error summed over the tokens whose Gram matrix
    /// H = Σ x xᵀ is, computed from the tokens themselves.
    #[test]
    fn objective_is_the_squared_output_error_on_the_tokens() {
        let (n, k, tokens) = (5, 7, 23);
        let mut state = 0x2545_f491_u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let x: Vec<f32> = (0..tokens * k).map(|_| next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let what: Vec<f32> = w.iter().map(|&v| v + 0.1 * next()).collect();
        let mut h = vec![0f32; k * k];
        for t in x.chunks(k) {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += t[i] * t[j];
                }
            }
        }
        let (mut err, mut energy) = (0f64, 0f64);
        for t in x.chunks(k) {
            for j in 0..n {
                let row = |m: &[f32]| -> f64 {
                    (0..k)
                        .map(|i| f64::from(m[j * k + i]) * f64::from(t[i]))
                        .sum()
                };
                err += (row(&w) - row(&what)).powi(2);
                energy += row(&w).powi(2);
            }
        }
        let got = hessian_objective(&w, &what, k, &h);
        assert!((got - err).abs() <= 1e-4 * err, "{got} vs {err}");
        let got = hessian_objective(&w, &vec![0.0; n * k], k, &h);
        assert!((got - energy).abs() <= 1e-4 * energy, "{got} vs {energy}");
    }
}
