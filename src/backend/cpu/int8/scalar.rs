//! Portable reference kernels: the definition every SIMD tier is tested against bit for bit.

use std::ops::Range;

use super::{abs_bits, row_scale, ColumnSink, Int8Matrix, QuantizedRows, RowScale};

/// `x[j] * inv_smooth[j]`, or `x[j]` without smoothing.
#[inline(always)]
pub(super) fn smoothed(x: &[f32], inv_smooth: Option<&[f32]>, j: usize) -> f32 {
    match inv_smooth {
        Some(s) => x[j] * s[j],
        None => x[j],
    }
}

/// `round_half_away_from_zero(v / scale)` clamped to `[-127, 127]`.
#[inline(always)]
pub(super) fn quantize_value(v: f32, scale: f32) -> i8 {
    // The clamp keeps -128 out (and bounds any rounding above 127); `as` is exact afterwards.
    (v / scale).round().clamp(-127.0, 127.0) as i8
}

/// Quantizes one row of `x` into `dst` (`dst.len() ≥ x.len()`; the rest is zeroed as padding)
/// and returns the row's scale.
pub(super) fn quantize_row(x: &[f32], inv_smooth: Option<&[f32]>, dst: &mut [i8]) -> f32 {
    let max_bits = (0..x.len())
        .map(|j| abs_bits(smoothed(x, inv_smooth, j)))
        .max()
        .unwrap_or(0);
    let (body, padding) = dst.split_at_mut(x.len());
    padding.fill(0);
    match row_scale(max_bits) {
        RowScale::Quantize(scale) => {
            for (j, q) in body.iter_mut().enumerate() {
                *q = quantize_value(smoothed(x, inv_smooth, j), scale);
            }
            scale
        }
        RowScale::Zeros(scale) => {
            body.fill(0);
            scale
        }
    }
}

/// Exact `Σ a[i]·b[i]` (cannot overflow for lengths up to `MAX_K` of values in [-127, 127]).
pub(super) fn dot(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| i32::from(a) * i32::from(b))
        .sum()
}

/// Output channels `cols` of the product, one dot product at a time.
pub(super) fn gemm_columns(
    x: &QuantizedRows,
    w: &Int8Matrix,
    cols: Range<usize>,
    sink: &ColumnSink,
) {
    for t in 0..x.rows {
        let x_row = x.row(t);
        for j in cols.clone() {
            sink.store(t, j, dot(x_row, w.row(j)));
        }
    }
}
