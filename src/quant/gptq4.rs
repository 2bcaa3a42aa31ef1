//! Int4 weights for W4A8 experts: GPTQ (the same column-by-column error feedback through the
//! factored inverse Hessian as `gptq.rs`) or rounding, onto a 4-bit grid with one f16 scale
//! (and, asymmetric, one zero point) per row and group of `group` input columns.
//!
//! A group's parameters come from the row's values when GPTQ reaches the group's first column,
//! so they include the error pushed onto them by the columns before (as in GPTQ's grouped
//! variant); with act-order the columns are visited out of order, so the parameters are taken
//! from the original weights instead (static groups). Among a group's candidate ranges GPTQ's
//! own cost picks by default ([`GroupRule::Gptq`]); once the codes are fixed, each row's
//! scales can be refitted by least squares on the input's Hessian ([`refit_scales`]).

use rayon::prelude::*;

use super::gptq::{pin_and_damp, HessianFactor};
use super::linalg;
use crate::model::int4::{round_scale, SYMMETRIC_ZERO};

/// Rows quantized side by side (one task of the pool).
const ROW_TILE: usize = 16;

/// The 4-bit grid: group size along the input dimension, symmetric or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Int4Grid {
    pub group: usize,
    pub symmetric: bool,
}

/// How a group's clipped range is chosen (see `group_params` in this module).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum GroupRule {
    /// The least squared rounding error of the group's values.
    Mse,
    /// The least GPTQ cost: the group quantized column by column with the error pushed onto
    /// its own later columns, Σ (eᵢ / dᵢ)² with dᵢ the factor's diagonal — the increase of
    /// GPTQ's objective (w − ŵ)ᵀ H (w − ŵ) the group's columns cause.
    Gptq,
}

/// Int4 values and their group parameters, row-major: `u` is `n × k`, `scales` and `zeros`
/// `n × ceil(k / group)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Quantized {
    pub u: Vec<u8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<u8>,
}

/// Shrink factors of a group's range tried by [`group_params`]: 1 (the whole range) down to 0.75.
const CLIP_STEPS: usize = 11;

/// Scale (f16-rounded) and zero point of a group of values: of the grids spanning the group's
/// range shrunk by 1, 0.975, …, 0.75, the one with the least squared rounding error (clipping
/// a rare large value buys every other value a finer step; the whole range is a candidate, so
/// the error is never above the plain grid's).
fn group_params(values: impl Iterator<Item = f64>, grid: Int4Grid) -> (f64, u8) {
    let values: Vec<f64> = values.collect();
    best_range(&values, grid, |s, z| {
        values
            .iter()
            .map(|&v| (v - dequantize(quantize_value(v, s, z), s, z)).powi(2))
            .sum()
    })
}

/// [`group_params`] by GPTQ's own cost: the group's (error-updated) `values` at columns
/// `i0..` of the permuted order, each candidate grid run through GPTQ inside the group
/// (`hinv` the `k × k` upper factor of H⁻¹), the one with the least Σ (eᵢ / dᵢ)².
fn group_params_gptq(
    values: &[f64],
    hinv: &[f64],
    i0: usize,
    k: usize,
    grid: Int4Grid,
    scratch: &mut Vec<f64>,
) -> (f64, u8) {
    let len = values.len();
    best_range(values, grid, |s, z| {
        scratch.clear();
        scratch.extend_from_slice(values);
        let mut cost = 0.0;
        for t in 0..len {
            let i = i0 + t;
            let d = hinv[i * k + i];
            let e = (scratch[t] - dequantize(quantize_value(scratch[t], s, z), s, z)) / d;
            cost += e * e;
            linalg::sub_scaled(
                &mut scratch[t + 1..],
                e,
                &hinv[i * k + i + 1..i * k + i0 + len],
            );
        }
        cost
    })
}

/// Of the [`CLIP_STEPS`] candidate grids over `values`' range shrunk by 1, 0.975, …, the one
/// with the least `cost(scale, zero)` (the first of equals).
fn best_range(values: &[f64], grid: Int4Grid, mut cost: impl FnMut(f64, u8) -> f64) -> (f64, u8) {
    let mut best = (f64::INFINITY, 0.0, SYMMETRIC_ZERO);
    for step in 0..CLIP_STEPS {
        let c = 1.0 - 0.025 * step as f64;
        let (s, z) = range_params(values, c, grid);
        let err = cost(s, z);
        if err < best.0 {
            best = (err, s, z);
        }
    }
    (best.1, best.2)
}

/// The grid over the group's range shrunk by `c`.
fn range_params(values: &[f64], c: f64, grid: Int4Grid) -> (f64, u8) {
    let (lo, hi) = values
        .iter()
        .fold((0f64, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo * c, hi * c);
    if grid.symmetric {
        // [-7, 7] around zero point 8: the grid stays symmetric, so does the rounding error.
        let m = (-lo).max(hi);
        (f64::from(round_scale((m / 7.0) as f32)), SYMMETRIC_ZERO)
    } else {
        // The range always holds 0 (GPTQ's convention), so zero is exactly representable.
        let s = f64::from(round_scale(((hi - lo) / 15.0) as f32));
        let z = if s > 0.0 {
            (-lo / s).round().clamp(0.0, 15.0) as u8
        } else {
            SYMMETRIC_ZERO
        };
        (s, z)
    }
}

/// The nibble nearest to `v` on the grid `(s, z)` (half away from zero, clamped).
fn quantize_value(v: f64, s: f64, z: u8) -> u8 {
    if s == 0.0 {
        return z;
    }
    ((v / s).round() + f64::from(z)).clamp(0.0, 15.0) as u8
}

fn dequantize(u: u8, s: f64, z: u8) -> f64 {
    s * (f64::from(u) - f64::from(z))
}

/// Round-to-nearest onto the grid.
pub fn rtn4(w: &[f32], n: usize, k: usize, grid: Int4Grid) -> Int4Quantized {
    let kg = k.div_ceil(grid.group);
    let mut out = Int4Quantized {
        u: vec![0; n * k],
        scales: vec![0.0; n * kg],
        zeros: vec![0; n * kg],
    };
    for j in 0..n {
        for g in 0..kg {
            let cols = g * grid.group..((g + 1) * grid.group).min(k);
            let row = &w[j * k..(j + 1) * k];
            let (s, z) = group_params(row[cols.clone()].iter().map(|&v| f64::from(v)), grid);
            out.scales[j * kg + g] = s as f32;
            out.zeros[j * kg + g] = z;
            for i in cols {
                out.u[j * k + i] = quantize_value(f64::from(row[i]), s, z);
            }
        }
    }
    out
}

/// GPTQ onto the grid with the input's factor; rounding where H could not be factored. `rule`
/// chooses each group's range when GPTQ reaches it (in order; act-order's static groups are
/// chosen by [`GroupRule::Mse`] on the original weights).
pub fn gptq4_factored(
    w: &[f32],
    n: usize,
    f: &HessianFactor,
    grid: Int4Grid,
    rule: GroupRule,
) -> Int4Quantized {
    let k = f.k;
    let Some(hinv) = &f.hinv else {
        return rtn4(w, n, k, grid);
    };
    let kg = k.div_ceil(grid.group);
    let perm = &f.perm;
    let in_order = perm.iter().enumerate().all(|(i, &c)| i == c);
    // Static groups (act-order): parameters from the original weights, dead inputs zeroed.
    let live = |j: usize, c: usize| {
        if f.dead[c] {
            0.0
        } else {
            f64::from(w[j * k + c])
        }
    };
    let static_params = (!in_order).then(|| rtn_params(n, k, grid, &live));
    let mut wp: Vec<f64> = (0..n * k).map(|idx| live(idx / k, perm[idx % k])).collect();
    let mut q = vec![0u8; n * k];
    let mut scales = vec![0f32; n * kg];
    let mut zeros = vec![0u8; n * kg];
    wp.par_chunks_mut(ROW_TILE * k)
        .zip(q.par_chunks_mut(ROW_TILE * k))
        .zip(scales.par_chunks_mut(ROW_TILE * kg))
        .zip(zeros.par_chunks_mut(ROW_TILE * kg))
        .enumerate()
        .for_each(|(tile, (((rows, qrows), tile_scales), tile_zeros))| {
            if let Some((s, z)) = &static_params {
                let at = tile * ROW_TILE * kg;
                tile_scales.copy_from_slice(&s[at..at + tile_scales.len()]);
                tile_zeros.copy_from_slice(&z[at..at + tile_zeros.len()]);
            }
            let mut scratch = Vec::with_capacity(grid.group);
            for i in 0..k {
                let col = perm[i];
                let g = col / grid.group;
                let d = hinv[i * k + i];
                let tail = &hinv[i * k + i + 1..(i + 1) * k];
                let rows_iter = rows
                    .chunks_mut(k)
                    .zip(qrows.chunks_mut(k))
                    .zip(tile_scales.chunks_mut(kg).zip(tile_zeros.chunks_mut(kg)));
                for ((row, qrow), (rs, rz)) in rows_iter {
                    if in_order && i % grid.group == 0 {
                        let end = (i + grid.group).min(k);
                        let (s, z) = match rule {
                            GroupRule::Mse => group_params(row[i..end].iter().copied(), grid),
                            GroupRule::Gptq => {
                                group_params_gptq(&row[i..end], hinv, i, k, grid, &mut scratch)
                            }
                        };
                        rs[g] = s as f32;
                        rz[g] = z;
                    }
                    let (s, z) = (f64::from(rs[g]), rz[g]);
                    let u = quantize_value(row[i], s, z);
                    qrow[i] = u;
                    let e = (row[i] - dequantize(u, s, z)) / d;
                    linalg::sub_scaled(&mut row[i + 1..], e, tail);
                }
            }
        });
    // Undo the column permutation.
    let mut u = vec![0u8; n * k];
    for j in 0..n {
        for (pos, &col) in perm.iter().enumerate() {
            u[j * k + col] = q[j * k + pos];
        }
    }
    Int4Quantized { u, scales, zeros }
}

/// Least-squares refit of each row's group scales with its codes fixed: the scales minimising
/// (w − ŵ)ᵀ H (w − ŵ), ŵᵢ = s_g (uᵢ − z_g) in group g, with H (`k × k`, the input's Hessian as
/// calibration stores it) damped as GPTQ damps it (`damp` × its diagonal's mean; an input
/// that never fires pinned and its weights taken as zero, as GPTQ zeroes them), all of a row's
/// scales at once (a groups × groups system), then rounded to f16. A row keeps its scales
/// unless the rounded refit is finite, positive and strictly lower in that objective, so no
/// row gets worse in it. Returns how many rows changed.
pub fn refit_scales(
    w: &[f32],
    n: usize,
    k: usize,
    h: &[f32],
    damp: f64,
    grid: Int4Grid,
    q: &mut Int4Quantized,
) -> usize {
    let kg = k.div_ceil(grid.group);
    debug_assert_eq!(q.scales.len(), n * kg);
    let (hd, dead) = damped(h, k, damp);
    let (u, zeros) = (&q.u, &q.zeros);
    q.scales
        .par_chunks_mut(kg)
        .enumerate()
        .map(|(j, scales)| {
            let v: Vec<f64> = (0..k)
                .map(|i| f64::from(u[j * k + i]) - f64::from(zeros[j * kg + i / grid.group]))
                .collect();
            let wr: Vec<f64> = (0..k)
                .map(|i| {
                    if dead[i] {
                        0.0
                    } else {
                        f64::from(w[j * k + i])
                    }
                })
                .collect();
            // y_g = H v_g (v_g: the codes of group g, zero elsewhere); A = VᵀHV, b = VᵀHw.
            let mut a = vec![0f64; kg * kg];
            let mut b = vec![0f64; kg];
            let mut y = vec![0f64; k];
            for g in 0..kg {
                y.fill(0.0);
                for i in g * grid.group..((g + 1) * grid.group).min(k) {
                    if v[i] != 0.0 {
                        linalg::sub_scaled(&mut y, -v[i], &hd[i * k..(i + 1) * k]);
                    }
                }
                b[g] = linalg::dot(&wr, &y);
                for g2 in 0..kg {
                    let cols = g2 * grid.group..((g2 + 1) * grid.group).min(k);
                    a[g * kg + g2] = linalg::dot(&v[cols.clone()], &y[cols]);
                }
            }
            // A group whose codes are all zero(-point) has no say: its scale stays.
            let old: Vec<f64> = scales.iter().map(|&s| f64::from(s)).collect();
            for g in 0..kg {
                if a[g * kg + g] == 0.0 {
                    a[g * kg + g] = 1.0;
                    b[g] = old[g];
                }
            }
            let Some(fit) = solve_spd(&a, &b, kg) else {
                return 0;
            };
            let fit: Vec<f64> = fit
                .iter()
                .map(|&s| f64::from(round_scale(s as f32)))
                .collect();
            // The objective less the constant wᵀHw: sᵀAs − 2 sᵀb.
            let cost = |s: &[f64]| {
                (0..kg)
                    .map(|g| s[g] * (linalg::dot(&a[g * kg..(g + 1) * kg], s) - 2.0 * b[g]))
                    .sum::<f64>()
            };
            let ok = fit.iter().all(|&s| s.is_finite() && s > 0.0);
            if ok && cost(&fit) < cost(&old) {
                for (s, f) in scales.iter_mut().zip(&fit) {
                    *s = *f as f32;
                }
                1
            } else {
                0
            }
        })
        .sum()
}

/// H damped as GPTQ damps it ([`pin_and_damp`]), in f64, and which inputs never fire.
fn damped(h: &[f32], k: usize, damp: f64) -> (Vec<f64>, Vec<bool>) {
    let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] == 0.0).collect();
    let mut hd: Vec<f64> = h.iter().map(|&v| f64::from(v)).collect();
    pin_and_damp(&mut hd, k, |i| dead[i], damp);
    (hd, dead)
}

/// x with A x = b for a small symmetric positive definite A (`m × m`), by Cholesky; `None`
/// when A is not positive definite.
fn solve_spd(a: &[f64], b: &[f64], m: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; m * m];
    for i in 0..m {
        for j in 0..=i {
            let s = a[i * m + j] - (0..j).map(|t| l[i * m + t] * l[j * m + t]).sum::<f64>();
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * m + i] = s.sqrt();
            } else {
                l[i * m + j] = s / l[j * m + j];
            }
        }
    }
    let mut x = b.to_vec();
    for i in 0..m {
        x[i] = (x[i] - (0..i).map(|t| l[i * m + t] * x[t]).sum::<f64>()) / l[i * m + i];
    }
    for i in (0..m).rev() {
        x[i] = (x[i] - (i + 1..m).map(|t| l[t * m + i] * x[t]).sum::<f64>()) / l[i * m + i];
    }
    Some(x)
}

/// Every row's group parameters from `value(row, col)`.
fn rtn_params(
    n: usize,
    k: usize,
    grid: Int4Grid,
    value: &impl Fn(usize, usize) -> f64,
) -> (Vec<f32>, Vec<u8>) {
    let kg = k.div_ceil(grid.group);
    let mut s = vec![0f32; n * kg];
    let mut z = vec![0u8; n * kg];
    for j in 0..n {
        for g in 0..kg {
            let cols = g * grid.group..((g + 1) * grid.group).min(k);
            let (gs, gz) = group_params(cols.map(|c| value(j, c)), grid);
            s[j * kg + g] = gs as f32;
            z[j * kg + g] = gz;
        }
    }
    (s, z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq::tests::correlated_inputs;
    use crate::quant::gptq::GptqOptions;
    use crate::util::rng::SplitMix64;

    fn output_error(
        w: &[f32],
        q: &Int4Quantized,
        x: &[f32],
        n: usize,
        k: usize,
        grid: Int4Grid,
    ) -> f64 {
        let kg = k.div_ceil(grid.group);
        let rows = x.len() / k;
        let mut e = 0.0;
        for r in 0..rows {
            for j in 0..n {
                let mut d = 0.0;
                for i in 0..k {
                    let g = j * kg + i / grid.group;
                    let wq = dequantize(q.u[j * k + i], f64::from(q.scales[g]), q.zeros[g]);
                    d += (f64::from(w[j * k + i]) - wq) * f64::from(x[r * k + i]);
                }
                e += d * d;
            }
        }
        e
    }

    /// Row `j`'s (w − ŵ)ᵀ H_d (w − ŵ), H_d = H + damp · mean diag(H) · I, from the dense
    /// dequantized row (an independent re-computation of what GPTQ and the refit minimise).
    fn row_objective(
        w: &[f32],
        q: &Int4Quantized,
        h: &[f64],
        damp: f64,
        j: usize,
        k: usize,
        grid: Int4Grid,
    ) -> f64 {
        let kg = k.div_ceil(grid.group);
        let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        let r: Vec<f64> = (0..k)
            .map(|i| {
                let g = j * kg + i / grid.group;
                f64::from(w[j * k + i])
                    - dequantize(q.u[j * k + i], f64::from(q.scales[g]), q.zeros[g])
            })
            .collect();
        let mut e = 0.0;
        for a in 0..k {
            for b in 0..k {
                let hab = h[a * k + b] + if a == b { damp * mean } else { 0.0 };
                e += r[a] * hab * r[b];
            }
        }
        e
    }

    /// With one group per row, GPTQ's objective of the row is the group's GPTQ cost, so the
    /// rule that minimises that cost over the same candidates is never worse than the rule that
    /// minimises the squared rounding error (and with several groups, better on the whole).
    #[test]
    fn gptq_group_rule_is_never_worse_in_gptqs_objective() {
        let mut rng = SplitMix64::new(23);
        let (n, damp) = (24, 0.01);
        for (k, group, symmetric) in [(64, 64, true), (64, 64, false), (192, 32, true)] {
            let grid = Int4Grid { group, symmetric };
            let w: Vec<f32> = (0..n * k)
                .map(|_| rng.normal() * if rng.normal() > 2.0 { 4.0 } else { 1.0 })
                .collect();
            let (_, h) = correlated_inputs(&mut rng, 300, k);
            let f = HessianFactor::new(
                &h,
                k,
                &GptqOptions {
                    damp,
                    act_order: false,
                },
            );
            let mse = gptq4_factored(&w, n, &f, grid, GroupRule::Mse);
            let cost = gptq4_factored(&w, n, &f, grid, GroupRule::Gptq);
            let (mut sum_mse, mut sum_cost) = (0.0, 0.0);
            for j in 0..n {
                let (em, ec) = (
                    row_objective(&w, &mse, &h, damp, j, k, grid),
                    row_objective(&w, &cost, &h, damp, j, k, grid),
                );
                if k == group {
                    assert!(ec <= em * (1.0 + 1e-9), "{grid:?} row {j}: {ec} > {em}");
                }
                sum_mse += em;
                sum_cost += ec;
            }
            assert!(sum_cost < sum_mse, "{grid:?}: {sum_cost} vs {sum_mse}");
        }
    }

    /// The refit never raises a row's objective; with one group per row it is the scalar
    /// least-squares scale vᵀHw / vᵀHv (v the codes less the zero point), rounded to f16.
    #[test]
    fn scale_refit_is_the_least_squares_scale_and_never_worse() {
        let mut rng = SplitMix64::new(31);
        let (n, damp) = (24, 0.01);
        for (k, group, symmetric) in [(64, 64, true), (64, 64, false), (192, 64, true)] {
            let grid = Int4Grid { group, symmetric };
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let (_, h) = correlated_inputs(&mut rng, 300, k);
            let hf: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            let f = HessianFactor::new(
                &hf,
                k,
                &GptqOptions {
                    damp,
                    act_order: false,
                },
            );
            let before = gptq4_factored(&w, n, &f, grid, GroupRule::Gptq);
            let mut after = before.clone();
            let changed = refit_scales(&w, n, k, &hf, damp, grid, &mut after);
            assert_eq!(after.u, before.u);
            let hd: Vec<f64> = hf.iter().map(|&v| f64::from(v)).collect();
            let mean = (0..k).map(|i| hd[i * k + i]).sum::<f64>() / k as f64;
            let (mut sum_before, mut sum_after) = (0.0, 0.0);
            for j in 0..n {
                let (eb, ea) = (
                    row_objective(&w, &before, &hd, damp, j, k, grid),
                    row_objective(&w, &after, &hd, damp, j, k, grid),
                );
                assert!(ea <= eb * (1.0 + 1e-9), "{grid:?} row {j}: {ea} > {eb}");
                sum_before += eb;
                sum_after += ea;
                if k == group && after.scales[j] != before.scales[j] {
                    let v: Vec<f64> = (0..k)
                        .map(|i| f64::from(after.u[j * k + i]) - f64::from(after.zeros[j]))
                        .collect();
                    let (mut vhw, mut vhv) = (0.0, 0.0);
                    for a in 0..k {
                        for b in 0..k {
                            let hab = hd[a * k + b] + if a == b { damp * mean } else { 0.0 };
                            vhw += v[a] * hab * f64::from(w[j * k + b]);
                            vhv += v[a] * hab * v[b];
                        }
                    }
                    assert_eq!(after.scales[j], round_scale((vhw / vhv) as f32));
                }
            }
            assert!(changed > 0 && sum_after < sum_before, "{grid:?}");
        }
    }

    #[test]
    fn rounding_is_within_half_a_step_and_gptq_beats_it() {
        let (n, k, rows) = (16, 96, 400);
        let mut rng = SplitMix64::new(11);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let (x, h) = correlated_inputs(&mut rng, rows, k);
        for grid in [
            Int4Grid {
                group: 32,
                symmetric: true,
            },
            Int4Grid {
                group: 64,
                symmetric: false,
            },
        ] {
            let kg = k.div_ceil(grid.group);
            let rtn = rtn4(&w, n, k, grid);
            for j in 0..n {
                for g in 0..kg {
                    let cols = g * grid.group..((g + 1) * grid.group).min(k);
                    let (s, z) = (f64::from(rtn.scales[j * kg + g]), rtn.zeros[j * kg + g]);
                    let (mut err, mut plain_err) = (0.0, 0.0);
                    // The plain grid over the whole range, the searched one's first candidate.
                    let vals: Vec<f64> = cols.clone().map(|i| f64::from(w[j * k + i])).collect();
                    let (ps, pz) = range_params(&vals, 1.0, grid);
                    for i in cols {
                        let v = f64::from(w[j * k + i]);
                        let wq = dequantize(rtn.u[j * k + i], s, z);
                        // Inside the clipped range: half a step, plus the f16 rounding of the
                        // scale over up to 15 steps; outside it, the nearest end.
                        let inside = (f64::from(z) + (v / s).round()).clamp(0.0, 15.0)
                            == f64::from(z) + (v / s).round();
                        if inside {
                            assert!((wq - v).abs() <= s * (0.5 + 15.0 / 1024.0));
                        } else {
                            assert!(rtn.u[j * k + i] == 0 || rtn.u[j * k + i] == 15);
                        }
                        err += (wq - v).powi(2);
                        plain_err += (dequantize(quantize_value(v, ps, pz), ps, pz) - v).powi(2);
                    }
                    assert!(
                        err <= plain_err,
                        "the search is never worse than the whole range"
                    );
                }
            }
            for act_order in [false, true] {
                let f = HessianFactor::new(
                    &h,
                    k,
                    &GptqOptions {
                        damp: 0.01,
                        act_order,
                    },
                );
                let q = gptq4_factored(&w, n, &f, grid, GroupRule::Mse);
                assert!(q.u.iter().chain(&q.zeros).all(|&v| v <= 15));
                let (eg, er) = (
                    output_error(&w, &q, &x, n, k, grid),
                    output_error(&w, &rtn, &x, n, k, grid),
                );
                assert!(
                    eg < 0.7 * er,
                    "{grid:?} act_order {act_order}: gptq {eg} vs rtn {er}"
                );
            }
        }
    }
}
