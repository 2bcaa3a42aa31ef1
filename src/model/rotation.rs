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
    let (mut gathered, mut mixed) = (vec![0f32; m], vec![0f32; m]);
    for row in x.chunks_exact_mut(width) {
        for t in 0..block {
            for (j, g) in gathered.iter_mut().enumerate() {
                *g = row[j * block + t];
            }
            for (k, out) in mixed.iter_mut().enumerate() {
                let ck = &c[k * m..(k + 1) * m];
                *out = ck.iter().zip(&gathered).map(|(a, b)| a * b).sum();
            }
            for (k, &v) in mixed.iter().enumerate() {
                row[k * block + t] = v;
            }
        }
    }
}
