//! The orthogonal rotation of a rotated model's down-projection input (`quantize --rotate`):
//! part of what such a model computes, so every backend implements exactly this transform and
//! the exporter undoes it. These scalar functions are the definition (the CPU backend runs them).

/// `x ← H_b·x` on every run of `block` values (the normalized Walsh–Hadamard transform, its
/// own inverse; `block` a power of two). Butterflies over contiguous halves, which the
/// compiler vectorizes from a span of 8 up.
pub fn hadamard_in_blocks(x: &mut [f32], block: usize) {
    debug_assert!(block.is_power_of_two());
    let norm = 1.0 / (block as f32).sqrt();
    for run in x.chunks_exact_mut(block) {
        let mut h = 1;
        while h < block {
            for pair in run.chunks_exact_mut(2 * h) {
                let (lo, hi) = pair.split_at_mut(h);
                for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                    let (x, y) = (*a, *b);
                    *a = x + y;
                    *b = x - y;
                }
            }
            h *= 2;
        }
        run.iter_mut().for_each(|v| *v *= norm);
    }
}

/// Entry `(k, n)` of the orthonormal `m × m` DCT-II matrix: an orthogonal matrix every backend
/// computes from `m` alone (no stored table), dense enough to mix every input into every output.
pub fn dct_entry(m: usize, k: usize, n: usize) -> f32 {
    let scale = if k == 0 {
        (1.0 / m as f64).sqrt()
    } else {
        (2.0 / m as f64).sqrt()
    };
    let angle = std::f64::consts::PI * (n as f64 + 0.5) * k as f64 / m as f64;
    (scale * angle.cos()) as f32
}

/// `x ← (C_m ⊗ H_b)·x` on every row of `width = m·b` values: the Walsh–Hadamard transform on
/// each run of `b`, then the runs mixed position by position by the orthonormal DCT-II `C_m`
/// (`m = 1`: the Hadamard alone). Orthogonal, so a linear reading the result holds the same
/// transform of its weights; it spreads any one channel over the whole row.
pub fn rotate_rows(x: &mut [f32], width: usize, block: usize) {
    hadamard_in_blocks(x, block);
    mix_runs(x, width, block, false);
}

/// The inverse (transpose) of [`rotate_rows`]: `x ← (C_mᵀ ⊗ H_b)·x`.
pub fn rotate_rows_back(x: &mut [f32], width: usize, block: usize) {
    hadamard_in_blocks(x, block);
    mix_runs(x, width, block, true);
}

/// Each row's runs of `block` mixed position by position by `C_m` (or `C_mᵀ`).
///
/// Output run `k` is `Σ_j C[k][j]·run_j`, built as whole-run multiply-adds over contiguous
/// values (which vectorize) in the order `j = 0, 1, …` — the same operations, in the same order,
/// as a dot product over `j` at each position, so the result is that definition's bit for bit.
fn mix_runs(x: &mut [f32], width: usize, block: usize, transposed: bool) {
    debug_assert!(width.is_multiple_of(block) && x.len().is_multiple_of(width));
    let m = width / block;
    if m == 1 {
        return;
    }
    let c: Vec<f32> = (0..m * m)
        .map(|i| {
            let (k, n) = (i / m, i % m);
            if transposed {
                dct_entry(m, n, k)
            } else {
                dct_entry(m, k, n)
            }
        })
        .collect();
    let mut mixed = vec![0f32; width];
    for row in x.chunks_exact_mut(width) {
        for (k, out) in mixed.chunks_exact_mut(block).enumerate() {
            let ck = &c[k * m..(k + 1) * m];
            out.iter_mut()
                .zip(&row[..block])
                .for_each(|(o, &v)| *o = ck[0] * v);
            for (j, run) in row.chunks_exact(block).enumerate().skip(1) {
                out.iter_mut().zip(run).for_each(|(o, &v)| *o += ck[j] * v);
            }
        }
        row.copy_from_slice(&mixed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    /// The definition, position by position: gather the `m` values at `t`, dot with `C`'s rows.
    fn mix_runs_by_position(x: &mut [f32], width: usize, block: usize, transposed: bool) {
        let m = width / block;
        for row in x.chunks_exact_mut(width) {
            for t in 0..block {
                let gathered: Vec<f32> = (0..m).map(|j| row[j * block + t]).collect();
                for k in 0..m {
                    let c = |j: usize| {
                        if transposed {
                            dct_entry(m, j, k)
                        } else {
                            dct_entry(m, k, j)
                        }
                    };
                    row[k * block + t] = (0..m).map(|j| c(j) * gathered[j]).sum();
                }
            }
        }
    }

    #[test]
    fn run_mixing_equals_the_per_position_dot_products_bit_for_bit() {
        let mut rng = SplitMix64::new(7);
        for (m, block, rows) in [(1, 64, 2), (3, 32, 3), (7, 64, 2), (5, 128, 1)] {
            let width = m * block;
            let x: Vec<f32> = (0..rows * width).map(|_| rng.normal()).collect();
            for transposed in [false, true] {
                let (mut got, mut want) = (x.clone(), x.clone());
                mix_runs(&mut got, width, block, transposed);
                mix_runs_by_position(&mut want, width, block, transposed);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "m {m} block {block} t {transposed}"
                );
            }
        }
    }
}
