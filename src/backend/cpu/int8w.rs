//! Weight-only int8 matmul: f32 activations times int8 weights with per-output-channel scales,
//! `out[t, j] = scale_j · Σ_k x[t, k]·w[j, k] (+ b[j])`. For the output head, where quantizing
//! the final hidden state is not wanted but reading 4× fewer weight bytes is.
//!
//! Tiers ([`Tier`]): a portable scalar reference, AVX2 + FMA and AVX-512 (F + BW). Every tier
//! computes a tile of [`TILE`] weight rows per pass over an activation row, one row from each of
//! [`TILE`] *runs* of consecutive rows (rows `s·run + i`). A decoded token (one activation row)
//! then reads four long sequential weight streams, which the hardware prefetchers follow, and
//! keeps eight independent FMA chains busy: one row at a time with two chains was latency bound
//! at ~14 GB/s per thread. With several activation rows (prefill) the tile's weight rows stay in
//! L1 while every row passes over them, instead of streaming all weights once per row.
//!
//! The tiers differ only in the order of the f32 sums, so their results agree within
//! `k·ε` of the sum of magnitudes, not bitwise.

use super::int8::Int8Matrix;
use super::simd::SendPtr;
use rayon::prelude::*;
use std::ops::Range;

/// Below this many multiply-adds a call stays on the caller's thread.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Weight rows per register tile (and sequential weight streams per thread).
pub const TILE: usize = 4;

/// The tiers are the half kernels' ([`Tier`], chosen by [`active_tier`], forced lower with
/// `EDGEMOE_HALF_TIER`): both widen narrow weights to f32 for FMA, on the same CPU features
/// (AVX2 + FMA, AVX-512 F + BW).
pub use super::half::{active_tier, Tier};

/// `out[t·n + j] = w.scales[j] · Σ_i x[t·k + i]·w[j][i] (+ bias[j])` for `t < rows`, on
/// [`active_tier`], split over the pool's threads by output channel.
///
/// # Panics
/// If `x`, `out` or `bias` is too short.
pub fn matmul_w8(x: &[f32], rows: usize, w: &Int8Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_w8_with_tier(active_tier(), x, rows, w, bias, out);
}

/// [`matmul_w8`] on a given tier (tests and benchmarks compare tiers with it).
///
/// # Panics
/// If the CPU cannot run `tier`, or as [`matmul_w8`].
pub fn matmul_w8_with_tier(
    tier: Tier,
    x: &[f32],
    rows: usize,
    w: &Int8Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(
        tier.is_supported(),
        "the {tier} weight-only int8 tier is not supported by this CPU"
    );
    let (n, k, kp) = (w.n, w.k, w.k_padded);
    assert!(
        x.len() >= rows * k && out.len() >= rows * n,
        "matmul_w8: buffer too small"
    );
    // Borrowed once: a stored matrix's buffers may be maps, and the loops below are hot.
    let (data, scales): (&[i8], &[f32]) = (&w.data, &w.scales);
    assert!(
        kp >= k && data.len() >= n * kp && scales.len() >= n,
        "matmul_w8: weights shorter than n × k_padded"
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul_w8: bias too short");
    }
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |cols: Range<usize>| {
        stream_tiles(cols, |js, c| {
            let ws: [&[i8]; TILE] = std::array::from_fn(|i| &data[js[i] * kp..][..k]);
            for t in 0..rows {
                let dots = tile_dots(tier, &x[t * k..(t + 1) * k], ws);
                for (&j, dot) in js[..c].iter().zip(dots) {
                    let v = dot * scales[j] + bias.map_or(0.0, |b| b[j]);
                    // SAFETY: t < rows, j < n, `out` holds rows × n floats and stays borrowed
                    // until all tasks return; tasks own disjoint column ranges.
                    unsafe { *out_ptr.get().add(t * n + j) = v };
                }
            }
        })
    };
    let threads = super::parallel::kernel_threads();
    if threads == 1 || rows * n * k < PARALLEL_MIN_MACS {
        run(0..n);
        return;
    }
    let chunks = column_chunks(n, threads);
    chunks.into_par_iter().for_each(run);
}

/// Splits `0..n` into about four ranges per thread (so an unlucky thread does not hold the
/// others up), each a multiple of [`TILE`] long but the last: a tile's runs are cut from one
/// range, so every range is whole tiles and its own [`TILE`] sequential streams.
fn column_chunks(n: usize, threads: usize) -> Vec<Range<usize>> {
    let size = n.div_ceil(threads * 4).next_multiple_of(TILE).max(TILE);
    (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect()
}

/// Tiles of `cols`, [`TILE`] output channels each.
///
/// `cols` is cut into [`TILE`] equal runs of consecutive channels and a tile takes one channel
/// from each run, so the kernel reads [`TILE`] long sequential streams (adjacent channels, 1-4
/// KiB apart, were measured much slower in the int8 GEMV); the remainder, fewer than [`TILE`]
/// adjacent channels, is one tile whose missing slots repeat its last channel (computed and
/// dropped: `tile`'s second argument is the number of real channels).
fn stream_tiles(cols: Range<usize>, mut tile: impl FnMut(&[usize; TILE], usize)) {
    let run = cols.len() / TILE;
    for i in 0..run {
        tile(&std::array::from_fn(|s| cols.start + s * run + i), TILE);
    }
    let rest = cols.start + TILE * run..cols.end;
    if let Some(last) = rest.clone().last() {
        tile(
            &std::array::from_fn(|s| (rest.start + s).min(last)),
            rest.len(),
        );
    }
}

/// `Σ_i x[i]·ws[c][i]` for each `c`, on `tier` (which the caller checked is supported). Every
/// `ws[c]` is `x.len()` long.
fn tile_dots(tier: Tier, x: &[f32], ws: [&[i8]; TILE]) -> [f32; TILE] {
    match tier {
        Tier::Scalar => ws.map(|w| dot_i8_scalar(x, w)),
        // SAFETY: `matmul_w8_with_tier` asserted avx2 + fma (`Tier::is_supported`).
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => unsafe { x86::dots_avx2(x, ws) },
        // SAFETY: `matmul_w8_with_tier` asserted avx512f + avx512bw.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => unsafe { x86::dots_avx512(x, ws) },
        #[cfg(not(target_arch = "x86_64"))]
        Tier::Avx2 | Tier::Avx512 => unreachable!("only the scalar tier exists here"),
    }
}

/// Reference: Σ x·w in f32, in index order.
pub fn dot_i8_scalar(x: &[f32], w: &[i8]) -> f32 {
    x.iter().zip(w).map(|(&a, &b)| a * b as f32).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dot_i8_scalar, TILE};
    use std::arch::x86_64::*;

    /// The slices' common length, cut into `L`-element chunks: `x`'s and each row's, and the
    /// scalar tail's start.
    type Chunked<'a, const L: usize> = (&'a [[f32; L]], [&'a [[i8; L]]; TILE], usize);

    /// `x` and `ws` as equally many `L`-element chunks.
    ///
    /// # Panics
    /// If a row is shorter than `x`.
    fn chunked<'a, const L: usize>(x: &'a [f32], ws: [&'a [i8]; TILE]) -> Chunked<'a, L> {
        let k = x.len();
        let xc = x.as_chunks::<L>().0;
        let wc = ws.map(|w| w[..k].as_chunks::<L>().0);
        (xc, wc, xc.len() * L)
    }

    /// Adds the scalar tail `x[k0..]·ws[c][k0..]` to each sum.
    fn add_tails(x: &[f32], ws: [&[i8]; TILE], k0: usize, sums: &mut [f32; TILE]) {
        for (s, w) in sums.iter_mut().zip(ws) {
            *s += dot_i8_scalar(&x[k0..], &w[k0..]);
        }
    }

    /// 16 int8 sign-extended to i32 (`vpmovsxbd`), then converted to f32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn i8x16_to_f32(chunk: &[i8; 16]) -> __m512 {
        // SAFETY: `chunk` is 16 readable bytes; `loadu` has no alignment requirement.
        let v = unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) };
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load_f32x16(chunk: &[f32; 16]) -> __m512 {
        // SAFETY: `chunk` is 16 readable floats; `loadu` has no alignment requirement.
        unsafe { _mm512_loadu_ps(chunk.as_ptr()) }
    }

    /// The AVX-512 tile: per 32 values, 2 x loads and 8 weight conversions into 4 rows × 2
    /// independent accumulators (8 of 32 zmm), so the FMA latency is hidden and the loop is
    /// limited by the weight streams.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn dots_avx512(x: &[f32], ws: [&[i8]; TILE]) -> [f32; TILE] {
        let (xc, wc, k0) = chunked::<16>(x, ws);
        let mut acc = [[_mm512_setzero_ps(); 2]; TILE];
        let pairs = xc.len() / 2;
        for i in 0..pairs {
            let xv = [load_f32x16(&xc[2 * i]), load_f32x16(&xc[2 * i + 1])];
            for (acc, w) in acc.iter_mut().zip(&wc) {
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv[h], i8x16_to_f32(&w[2 * i + h]), *a);
                }
            }
        }
        if xc.len() % 2 == 1 {
            let xv = load_f32x16(&xc[2 * pairs]);
            for (acc, w) in acc.iter_mut().zip(&wc) {
                acc[0] = _mm512_fmadd_ps(xv, i8x16_to_f32(&w[2 * pairs]), acc[0]);
            }
        }
        let mut sums = acc.map(|[a, b]| _mm512_reduce_add_ps(_mm512_add_ps(a, b)));
        add_tails(x, ws, k0, &mut sums);
        sums
    }

    /// 8 int8 sign-extended to i32 (`vpmovsxbd`), then converted to f32.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn i8x8_to_f32(chunk: &[i8; 8]) -> __m256 {
        // SAFETY: `chunk` is 8 readable bytes; `loadl` reads 8 bytes, unaligned.
        let v = unsafe { _mm_loadl_epi64(chunk.as_ptr().cast()) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn load_f32x8(chunk: &[f32; 8]) -> __m256 {
        // SAFETY: `chunk` is 8 readable floats; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_ps(chunk.as_ptr()) }
    }

    /// The AVX2 tile: the AVX-512 tile's structure at 8 lanes (8 of 16 ymm accumulate).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dots_avx2(x: &[f32], ws: [&[i8]; TILE]) -> [f32; TILE] {
        let (xc, wc, k0) = chunked::<8>(x, ws);
        let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
        let pairs = xc.len() / 2;
        for i in 0..pairs {
            let xv = [load_f32x8(&xc[2 * i]), load_f32x8(&xc[2 * i + 1])];
            for (acc, w) in acc.iter_mut().zip(&wc) {
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xv[h], i8x8_to_f32(&w[2 * i + h]), *a);
                }
            }
        }
        if xc.len() % 2 == 1 {
            let xv = load_f32x8(&xc[2 * pairs]);
            for (acc, w) in acc.iter_mut().zip(&wc) {
                acc[0] = _mm256_fmadd_ps(xv, i8x8_to_f32(&w[2 * pairs]), acc[0]);
            }
        }
        // SAFETY: avx2 + fma are enabled here, as `hsum` needs.
        let mut sums = acc.map(|[a, b]| unsafe { super::super::simd::hsum(_mm256_add_ps(a, b)) });
        add_tails(x, ws, k0, &mut sums);
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    /// `(out, tolerance)` per output: the f64 product and `k·ε`-style bound on the f32 error
    /// (relative error ~k·eps of the sum of magnitudes).
    fn reference(x: &[f32], rows: usize, m: &Int8Matrix, bias: Option<&[f32]>) -> Vec<(f64, f64)> {
        let (n, k) = (m.n, m.k);
        let mut want = Vec::with_capacity(rows * n);
        for t in 0..rows {
            for j in 0..n {
                let terms = (0..k).map(|i| x[t * k + i] as f64 * m.row(j)[i] as f64);
                let (sum, mag) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                let scale = m.scales[j] as f64;
                let b = bias.map_or(0.0, |b| b[j] as f64);
                want.push((sum * scale + b, 1e-6 * (k as f64) * mag * scale + 1e-6));
            }
        }
        want
    }

    fn random_case(
        rng: &mut SplitMix64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> (Int8Matrix, Vec<f32>) {
        let wf: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let m = Int8Matrix::quantize_rtn(&wf, n, k).unwrap();
        let x: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
        (m, x)
    }

    /// Every supported tier against the f64 reference: odd k (not a multiple of 8, 16 or 64),
    /// n not a multiple of [`TILE`], 1-5 rows, with and without bias, and shapes large enough
    /// to take the parallel split.
    #[test]
    fn every_tier_matches_f64_reference_on_odd_shapes() {
        let mut rng = SplitMix64::new(3);
        let shapes = [
            (1, 1, 1),
            (1, 7, 15),
            (2, 33, 16),
            (3, 64, 130),
            (4, 5, 17),
            (1, 303, 1023),
            (2, 130, 47),
            (5, 301, 1000),
            (1, 1001, 131),
            (1, 4099, 64),
        ];
        for &(rows, n, k) in &shapes {
            let (m, x) = random_case(&mut rng, rows, n, k);
            let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            for bias in [None, Some(&b[..])] {
                let want = reference(&x, rows, &m, bias);
                for tier in Tier::supported() {
                    let mut out = vec![f32::NAN; rows * n];
                    matmul_w8_with_tier(tier, &x, rows, &m, bias, &mut out);
                    for (i, (&got, &(w, tol))) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - w).abs() <= tol,
                            "{tier} {rows}x{n}x{k} bias {} [{}, {}]: {got} vs {w}",
                            bias.is_some(),
                            i / n,
                            i % n
                        );
                    }
                }
            }
        }
    }

    /// The SIMD tiles against the scalar dot for every k from 0 to 80 and a few long ones, with
    /// the tile's four rows all different (a mixed-up stream would show).
    #[test]
    fn tile_dots_agree_with_scalar_for_every_short_k() {
        let mut rng = SplitMix64::new(9);
        for k in (0..=80).chain([127, 1024, 1031]) {
            let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
            let rows: Vec<Vec<i8>> = (0..TILE)
                .map(|_| {
                    (0..k)
                        .map(|_| (rng.next_u64() % 255) as i8)
                        .map(|v| v.max(-127))
                        .collect()
                })
                .collect();
            let ws: [&[i8]; TILE] = std::array::from_fn(|c| &rows[c][..]);
            for tier in Tier::supported() {
                let got = tile_dots(tier, &x, ws);
                for (c, w) in ws.iter().enumerate() {
                    let s = dot_i8_scalar(&x, w);
                    let mag: f32 = x.iter().zip(*w).map(|(&p, &q)| (p * q as f32).abs()).sum();
                    let tol = 1e-6 * k as f32 * mag + 1e-6;
                    assert!(
                        (got[c] - s).abs() <= tol,
                        "{tier} k {k} row {c}: {} vs {s}",
                        got[c]
                    );
                }
            }
        }
    }

    /// Every channel of a range lands in exactly one tile slot, tiles take one channel per run,
    /// and the column chunks cover `0..n` in whole tiles.
    #[test]
    fn tiles_and_chunks_cover_every_channel_once() {
        for len in [0, 1, 3, 4, 5, 8, 13, 4000, 4003] {
            let cols = 10..10 + len;
            let mut seen = vec![0; len];
            stream_tiles(cols.clone(), |js, c| {
                for &j in &js[..c] {
                    seen[j - cols.start] += 1;
                }
                if c == TILE {
                    let run = len / TILE;
                    assert!(js.windows(2).all(|p| p[1] - p[0] == run), "{js:?}");
                }
            });
            assert!(seen.iter().all(|&s| s == 1), "len {len}");
        }
        for (n, threads) in [(32000, 2), (49152, 2), (49152, 1), (7, 2), (4099, 3)] {
            let chunks = column_chunks(n, threads);
            assert_eq!(chunks.first().map(|c| c.start), Some(0));
            assert_eq!(chunks.last().map(|c| c.end), Some(n));
            assert!(chunks.windows(2).all(|p| p[0].end == p[1].start));
            let last = chunks.len() - 1;
            assert!(
                chunks[..last].iter().all(|c| c.len() % TILE == 0),
                "{n} {threads}"
            );
            assert!(
                chunks.len() <= threads * 4,
                "{n} {threads}: {}",
                chunks.len()
            );
        }
    }
}
