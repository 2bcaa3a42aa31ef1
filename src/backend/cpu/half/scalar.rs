//! Portable reference: one dot product at a time, summed in f32 in index order (a plain
//! multiply then add, no fused multiply-add, so the result is the same on every target).

use std::ops::Range;

use super::{HalfView, Sink};

/// Output channels `cols` of the product of `x` (`rows × w.k`) and `w`.
pub(super) fn columns(x: &[f32], rows: usize, w: HalfView, cols: Range<usize>, sink: &Sink) {
    let k = w.k;
    let mut wide = vec![0f32; k];
    for j in cols {
        for (d, &b) in wide.iter_mut().zip(w.row(j)) {
            *d = w.kind.to_f32(b);
        }
        for t in 0..rows {
            let xr = &x[t * k..(t + 1) * k];
            let acc = xr.iter().zip(&wide).fold(0f32, |acc, (&a, &b)| acc + a * b);
            sink.store(t, j, acc);
        }
    }
}
