//! f32 weights in column panels, and the matrix multiply that reads them.
//!
//! A checkpoint stores a linear layer as `[out, in]` rows; multiplying by it row by row takes a
//! horizontal sum per output, which for the short rows of small models (k = 128) costs a
//! quarter of the work. Here the weights are stored in panels of [`PANEL`] output channels:
//! for each input index `i`, the panel's eight weights `w[j..j+8][i]` lie next to each other.
//! The kernel then broadcasts one activation and multiplies it into eight outputs at once,
//! keeping a register tile of rows × panels of running sums and never reducing across lanes.
//!
//! Every output is summed in the same order, `Σ_i x[t][i]·w[j][i]` for i = 0, 1, …, k−1 with a
//! fused multiply-add each, whatever the tile, the thread split or the number of rows: a
//! sequence decoded alone or in a batch gets bit-identical results.

use super::parallel::kernel_threads;
use super::simd::{cpu_features, SendPtr};
use rayon::prelude::*;
use std::ops::Range;

/// Output channels per panel: one AVX2 vector.
pub const PANEL: usize = 8;
/// Activation rows per cache block (48 rows of k = 1024 floats stay in L2).
const X_BLOCK: usize = 48;
/// Below this many multiply-adds a task switch costs more than it saves: run on the caller.
const PARALLEL_MIN_MACS: usize = 1 << 17;
/// Most rows × panels in a register tile (3 × 4 or 6 × 2 vectors of sums).
const TILE_MAX: usize = 12;

/// An `n × k` f32 matrix stored as `ceil(n / 8)` panels of `k × 8` floats; the rows past `n`
/// in the last panel are zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    /// Packs row-major `[n, k]` weights.
    ///
    /// # Panics
    /// If `w` is not `n × k` long.
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> PackedF32 {
        PackedF32::from_row_vec(w.to_vec(), n, k)
    }

    /// Packs row-major `[n, k]` weights in place: rows `8p..8p+8` occupy exactly the floats
    /// that panel `p` does, so each panel is an 8 × k block transposed where it lies, and a
    /// large model is packed without a second copy of any matrix.
    ///
    /// # Panics
    /// If `w` is not `n × k` long.
    pub fn from_row_vec(mut w: Vec<f32>, n: usize, k: usize) -> PackedF32 {
        assert_eq!(w.len(), n * k, "weights are not {n} × {k}");
        w.resize(n.div_ceil(PANEL) * k * PANEL, 0.0);
        if k > 0 {
            // Over the pool: loading a large model packs hundreds of megabytes.
            w.par_chunks_mut(k * PANEL)
                .for_each(|panel| transpose(panel, PANEL, k));
        }
        PackedF32 { n, k, data: w }
    }

    /// The matrix as row-major `[n, k]`, as the checkpoint stores it, unpacked in place.
    pub fn into_rows(self) -> Vec<f32> {
        let (n, k, mut data) = (self.n, self.k, self.data);
        if k > 0 {
            data.par_chunks_mut(k * PANEL)
                .for_each(|panel| transpose(panel, k, PANEL));
        }
        data.truncate(n * k);
        data
    }

    /// Output channels (rows of the checkpoint's matrix).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held, padding included (what a multiply streams).
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    fn index(&self, j: usize, i: usize) -> usize {
        (j / PANEL) * self.k * PANEL + i * PANEL + j % PANEL
    }

    /// Row `j` of the checkpoint's matrix (an embedding lookup).
    pub fn row(&self, j: usize) -> Vec<f32> {
        (0..self.k).map(|i| self.data[self.index(j, i)]).collect()
    }

    /// The matrix as row-major `[n, k]`, as the checkpoint stores it.
    pub fn to_rows(&self) -> Vec<f32> {
        (0..self.n).flat_map(|j| self.row(j)).collect()
    }

    /// Applies `f` to every weight of input channel `i` (column `i` of the checkpoint's matrix).
    pub fn map_column(&mut self, i: usize, f: impl Fn(f32) -> f32) {
        for j in 0..self.n {
            let at = self.index(j, i);
            self.data[at] = f(self.data[at]);
        }
    }
}

/// Turns the row-major `rows × cols` block `m` into its transpose, `cols × rows`, in place.
fn transpose(m: &mut [f32], rows: usize, cols: usize) {
    let src = m.to_vec();
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            m[c * rows + r] = v;
        }
    }
}

/// `out[t, j] = Σ_i x[t, i]·w[j, i] (+ bias[j])` for `rows` rows of `x` (`rows × k`), split over
/// the pool by panels.
///
/// # Panics
/// If a buffer is shorter than the shapes say.
pub fn matmul_packed(x: &[f32], rows: usize, w: &PackedF32, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert!(
        x.len() >= rows * k && out.len() >= rows * n,
        "matmul_packed: buffer too small"
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul_packed: bias too short");
    }
    if rows == 0 || n == 0 {
        return;
    }
    let avx2 = cpu_features().avx2_fma;
    let panels = n.div_ceil(PANEL);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |range: Range<usize>| {
        // SAFETY: `out` holds rows × n floats (asserted) and stays borrowed until every task
        // returns; tasks get disjoint panel ranges, so no output is written twice.
        unsafe { multiply_panels(x, rows, w, bias, out_ptr, range, avx2) }
    };
    let threads = kernel_threads();
    if threads == 1 || rows * n * k < PARALLEL_MIN_MACS {
        run(0..panels);
        return;
    }
    // Several chunks per thread even out unequal finishing; whole groups of eight panels keep
    // the single-row tile full.
    let chunk = panels.div_ceil(threads * 4).next_multiple_of(8);
    (0..panels.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| run(c * chunk..((c + 1) * chunk).min(panels)));
}

/// Rows of one register tile at most; a step of up to this many rows reads each weight once.
const TILE_ROWS_MAX: usize = 7;

/// Rows of the next register tile when `left` remain: all of them up to seven (a decode step's
/// expert with a few tokens reads its weights once), otherwise six at a time.
fn row_tile(left: usize) -> usize {
    if left <= TILE_ROWS_MAX {
        left
    } else {
        6
    }
}

/// Panels of a register tile of `rows` rows: about twelve independent FMA chains (eight hide
/// the latency of two FMA units; more leave room for the weight loads), as the sixteen vector
/// registers allow once a broadcast activation and the weight vectors are counted.
fn panel_tile(rows: usize) -> usize {
    match rows {
        1 => 8,
        2 | 3 => 4,
        4..=6 => 2,
        _ => 1,
    }
}

/// Computes the outputs of `panels` for every row.
///
/// # Safety
/// `out` points to `rows × w.n` writable floats that no one else touches in these panels'
/// columns meanwhile.
unsafe fn multiply_panels(
    x: &[f32],
    rows: usize,
    w: &PackedF32,
    bias: Option<&[f32]>,
    out: SendPtr<f32>,
    panels: Range<usize>,
    avx2: bool,
) {
    // Panels outermost within a block of rows: a group's weights stay in L1 while every row
    // tile of the block uses them, so weights are read from memory once per block. A block
    // that is one row tile needs no groups: each weight is read once, straight into the tile.
    for xb in (0..rows).step_by(X_BLOCK) {
        let xe = (xb + X_BLOCK).min(rows);
        let group = if xe - xb <= TILE_ROWS_MAX {
            panels.len()
        } else {
            4
        };
        let mut p = panels.start;
        while p < panels.end {
            let pe = (p + group).min(panels.end);
            let mut t = xb;
            while t < xe {
                let r = row_tile(xe - t);
                let mut q = p;
                while q < pe {
                    let c = panel_tile(r).min(pe - q);
                    tile(x, t, r, w, q, c, bias, out, avx2);
                    q += c;
                }
                t += r;
            }
            p = pe;
        }
    }
}

/// Computes and stores rows `t..t + r` of panels `q..q + c`.
///
/// # Safety
/// As [`multiply_panels`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    x: &[f32],
    t: usize,
    r: usize,
    w: &PackedF32,
    q: usize,
    c: usize,
    bias: Option<&[f32]>,
    out: SendPtr<f32>,
    avx2: bool,
) {
    let k = w.k;
    assert!(
        (t + r) * k <= x.len() && (q + c) * k * PANEL <= w.data.len(),
        "tile out of bounds"
    );
    if let Some(b) = bias {
        assert!(b.len() >= w.n, "bias too short");
    }
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        macro_rules! dispatch {
            ($($r:literal, $c:literal);*) => {
                match (r, c) {
                    // SAFETY: avx2+fma detected at run time; bounds asserted above, `out` as
                    // the caller promises.
                    $(($r, $c) => tile_avx2::<$r, $c>(x, t, w, q, bias, out),)*
                    _ => unreachable!("tile {r}×{c}"),
                }
            };
        }
        dispatch!(
            1,1; 1,2; 1,3; 1,4; 1,5; 1,6; 1,7; 1,8;
            2,1; 2,2; 2,3; 2,4; 3,1; 3,2; 3,3; 3,4; 4,1; 4,2;
            5,1; 5,2; 6,1; 6,2; 7,1; 7,2
        );
        return;
    }
    let _ = avx2;
    let mut acc = [[0f32; PANEL]; TILE_MAX];
    tile_scalar(x, t, r, w, q, c, &mut acc);
    store(&acc, t, r, q, c, w.n, bias, out);
}

/// Reference tile: one fused multiply-add per weight, in the kernel's order.
fn tile_scalar(
    x: &[f32],
    t: usize,
    r: usize,
    w: &PackedF32,
    q: usize,
    c: usize,
    acc: &mut [[f32; PANEL]; TILE_MAX],
) {
    let k = w.k;
    for rr in 0..r {
        let xr = &x[(t + rr) * k..(t + rr + 1) * k];
        for p in 0..c {
            let panel = &w.data[(q + p) * k * PANEL..(q + p + 1) * k * PANEL];
            let mut sums = [0f32; PANEL];
            for (i, &xv) in xr.iter().enumerate() {
                for (lane, s) in sums.iter_mut().enumerate() {
                    *s = xv.mul_add(panel[i * PANEL + lane], *s);
                }
            }
            acc[rr * c + p] = sums;
        }
    }
}

/// # Safety
/// avx2+fma; `x` holds rows `t..t + R`, `w` panels `q..q + C`; `out` as [`multiply_panels`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const C: usize>(
    x: &[f32],
    t: usize,
    w: &PackedF32,
    q: usize,
    bias: Option<&[f32]>,
    out: SendPtr<f32>,
) {
    use std::arch::x86_64::*;
    let (n, k) = (w.n, w.k);
    let xp = x.as_ptr().add(t * k);
    let wp = w.data.as_ptr().add(q * k * PANEL);
    let mut v = [[_mm256_setzero_ps(); C]; R];
    // Two orders of the same multiply-adds, whichever fits the sixteen vector registers: all
    // rows' activations broadcast first and each weight vector loaded once as it is used
    // (sums + rows + 1 registers), or all weight vectors loaded first and each activation
    // broadcast as it is used (sums + panels + 1). Plain loops, not closures: a closure would
    // not inherit this function's target features, and every intrinsic in it would become an
    // out-of-line call.
    if R * C + R < 16 {
        for i in 0..k {
            prefetch_next_tile::<R, C>(wp, k, i);
            let mut xb = [_mm256_setzero_ps(); R];
            for (rr, xb) in xb.iter_mut().enumerate() {
                *xb = _mm256_broadcast_ss(&*xp.add(rr * k + i));
            }
            for p in 0..C {
                let wv = _mm256_loadu_ps(wp.add(p * k * PANEL + i * PANEL));
                for (vr, &xb) in v.iter_mut().zip(&xb) {
                    vr[p] = _mm256_fmadd_ps(xb, wv, vr[p]);
                }
            }
        }
    } else {
        for i in 0..k {
            prefetch_next_tile::<R, C>(wp, k, i);
            let mut wv = [_mm256_setzero_ps(); C];
            for (p, wv) in wv.iter_mut().enumerate() {
                *wv = _mm256_loadu_ps(wp.add(p * k * PANEL + i * PANEL));
            }
            for (rr, vr) in v.iter_mut().enumerate() {
                let xb = _mm256_broadcast_ss(&*xp.add(rr * k + i));
                for (acc, &wv) in vr.iter_mut().zip(&wv) {
                    *acc = _mm256_fmadd_ps(xb, wv, *acc);
                }
            }
        }
    }
    for (p, _) in v[0].iter().enumerate() {
        let j0 = (q + p) * PANEL;
        let full = j0 + PANEL <= n;
        let b = match bias {
            Some(b) if full => _mm256_loadu_ps(b.as_ptr().add(j0)),
            Some(b) => {
                let mut lanes = [0f32; PANEL];
                lanes[..n - j0].copy_from_slice(&b[j0..n]);
                _mm256_loadu_ps(lanes.as_ptr())
            }
            None => _mm256_setzero_ps(),
        };
        for (rr, vr) in v.iter().enumerate() {
            let sum = _mm256_add_ps(vr[p], b);
            let dst = out.get().add((t + rr) * n + j0);
            if full {
                _mm256_storeu_ps(dst, sum);
            } else {
                let mut lanes = [0f32; PANEL];
                _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n - j0);
            }
        }
    }
}

/// Asks for the next tile's weights (they follow this tile's `C` panels at `wp`), each panel
/// at the offset `i` this one reads, one cache line per two steps. Only tiles of 4–6 rows: they
/// compute long enough per weight for the request to overlap, while lighter tiles are bound by
/// the weight stream itself and only lose issue slots to it. (Eight sequences of the trained
/// fixture decode about 3% faster with it: 28.8 against 28.1 thousand tokens/s, medians of two
/// alternated sets of 5 and 6 runs; one sequence does not change.)
///
/// # Safety
/// avx2 (prefetching never faults, even past the end of the matrix).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn prefetch_next_tile<const R: usize, const C: usize>(wp: *const f32, k: usize, i: usize) {
    use std::arch::x86_64::*;
    if (4..=6).contains(&R) && i.is_multiple_of(2) {
        for p in 0..C {
            let at = wp.wrapping_add((C + p) * k * PANEL + i * PANEL);
            _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
        }
    }
}

/// Writes a tile's sums (plus bias) to `out`, leaving out the padding of the last panel.
///
/// # Safety
/// As [`multiply_panels`].
#[allow(clippy::too_many_arguments)]
unsafe fn store(
    acc: &[[f32; PANEL]; TILE_MAX],
    t: usize,
    r: usize,
    q: usize,
    c: usize,
    n: usize,
    bias: Option<&[f32]>,
    out: SendPtr<f32>,
) {
    for rr in 0..r {
        for p in 0..c {
            let j0 = (q + p) * PANEL;
            for (lane, &v) in acc[rr * c + p].iter().enumerate().take(n - j0) {
                let j = j0 + lane;
                // SAFETY: t + rr < rows and j < n, inside the rows × n output (caller's
                // contract); this task owns column j.
                *out.get().add((t + rr) * n + j) = v + bias.map_or(0.0, |b| b[j]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    fn reference(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize, b: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for t in 0..rows {
            for j in 0..n {
                out[t * n + j] = b[j] as f64
                    + (0..k)
                        .map(|i| x[t * k + i] as f64 * w[j * k + i] as f64)
                        .sum::<f64>();
            }
        }
        out
    }

    #[test]
    fn packing_round_trips_and_maps_columns() {
        let (n, k) = (11, 5);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let mut p = PackedF32::from_rows(&w, n, k);
        assert_eq!(p.to_rows(), w);
        assert_eq!(p.clone().into_rows(), w);
        assert_eq!(PackedF32::from_row_vec(w.clone(), n, k), p);
        assert_eq!(p.row(9), w[9 * k..10 * k].to_vec());
        assert_eq!(p.bytes(), 2 * PANEL * k * 4);
        p.map_column(3, |v| -v);
        let rows = p.to_rows();
        for j in 0..n {
            for i in 0..k {
                let want = if i == 3 { -w[j * k + i] } else { w[j * k + i] };
                assert_eq!(rows[j * k + i], want);
            }
        }
    }

    #[test]
    fn matches_f64_reference_and_scalar_bit_for_bit() {
        let mut rng = SplitMix64::new(5);
        for &(rows, n, k) in &[
            (1, 1, 1),
            (1, 5, 7),
            (1, 70, 33),
            (2, 9, 8),
            (3, 17, 33),
            (5, 64, 100),
            (4, 40, 9),
            (6, 33, 20),
            (7, 130, 17),
            (8, 70, 16),
            (50, 13, 129),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let packed = PackedF32::from_rows(&w, n, k);
            let mut out = vec![0f32; rows * n];
            matmul_packed(&x, rows, &packed, Some(&b), &mut out);
            let want = reference(&x, rows, &w, n, k, &b);
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                // f32 accumulation of k terms of size ~1: error grows like sqrt(k)·eps.
                let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6;
                assert!(
                    (got as f64 - want).abs() <= tol * (1.0 + want.abs()),
                    "{rows}x{n}x{k} [{i}]: {got} vs {want}"
                );
            }
            // The scalar tiles and every row on its own give the very same bits.
            let mut scalar = vec![0f32; rows * n];
            let panels = n.div_ceil(PANEL);
            // SAFETY: `scalar` is rows × n and only this call writes it.
            unsafe {
                multiply_panels(
                    &x,
                    rows,
                    &packed,
                    Some(&b),
                    SendPtr(scalar.as_mut_ptr()),
                    0..panels,
                    false,
                )
            };
            assert_eq!(scalar, out, "{rows}x{n}x{k}: scalar tiles differ");
            for t in 0..rows {
                let mut one = vec![0f32; n];
                matmul_packed(&x[t * k..(t + 1) * k], 1, &packed, Some(&b), &mut one);
                assert_eq!(one, out[t * n..(t + 1) * n], "{rows}x{n}x{k} row {t} alone");
            }
        }
    }
}
