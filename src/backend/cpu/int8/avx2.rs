//! AVX2 tier: activation quantization and `vpmaddubsw` dot products with the sign trick.
//!
//! `vpmaddubsw` multiplies u8 × s8. We feed it `|x|` (u8) and `w` carrying `x`'s sign
//! (`vpsignb`), so each product is `x·w` exactly. It adds adjacent pairs into saturating i16:
//! with values in [-127, 127] a pair is at most 2·127·127 = 32258 < 32767, so it never saturates.
//! (A -128 weight would break both steps: negating it wraps, and 2·128·128 saturates; hence
//! `Int8Matrix` refuses it.) `vpmaddwd` with ones then widens the pairs into i32 lanes.
//!
//! The kernels are safe `#[target_feature(enable = "avx2")]` functions; the entry points the
//! parent module calls (`quantize_row`, `Avx2::dots`) are unsafe to call, and the parent checks
//! `Tier::is_supported` first.

use std::arch::x86_64::*;

use super::scalar::{quantize_value, smoothed};
use super::{abs_bits, row_scale, DotKernel, RowScale, TileSums, K_ALIGN, TILE};

/// Loads 32 bytes.
#[target_feature(enable = "avx2")]
#[inline]
fn load_i8x32(chunk: &[i8; 32]) -> __m256i {
    // SAFETY: `chunk` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }
}

/// Loads 8 floats.
#[target_feature(enable = "avx2")]
#[inline]
fn load_f32x8(chunk: &[f32; 8]) -> __m256 {
    // SAFETY: `chunk` is 8 readable floats; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(chunk.as_ptr()) }
}

/// Horizontal sum of eight i32 lanes (wrapping, like the lanes themselves).
#[target_feature(enable = "avx2")]
#[inline]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Horizontal max of eight u32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn hmax_u32(v: __m256i) -> u32 {
    let s = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_max_epu32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_max_epu32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s) as u32
}

/// 8 values of `x` (times `inv_smooth` when smoothing), chunk `i`.
#[target_feature(enable = "avx2")]
#[inline]
fn load_smoothed(x: &[[f32; 8]], inv_smooth: Option<&[[f32; 8]]>, i: usize) -> __m256 {
    let v = load_f32x8(&x[i]);
    match inv_smooth {
        Some(s) => _mm256_mul_ps(v, load_f32x8(&s[i])),
        None => v,
    }
}

/// Bits of max |x| over the row, like the scalar code (see `abs_bits`).
#[target_feature(enable = "avx2")]
fn max_abs_bits(x: &[f32], inv_smooth: Option<&[f32]>) -> u32 {
    let (chunks, tail) = x.as_chunks::<8>();
    let s_chunks = inv_smooth.map(|s| s.as_chunks::<8>().0);
    let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
    let mut max = _mm256_setzero_si256();
    for i in 0..chunks.len() {
        let bits = _mm256_castps_si256(load_smoothed(chunks, s_chunks, i));
        max = _mm256_max_epu32(max, _mm256_and_si256(bits, abs_mask));
    }
    let done = chunks.len() * 8;
    (0..tail.len())
        .map(|j| abs_bits(smoothed(x, inv_smooth, done + j)))
        .fold(hmax_u32(max), u32::max)
}

/// `quantize_value` on 8 lanes: `round_half_away(v / scale)` clamped to ±127, as i32.
#[target_feature(enable = "avx2")]
#[inline]
fn quantize_f32x8(v: __m256, scale: __m256) -> __m256i {
    let q = _mm256_div_ps(v, scale);
    // f32::round is half-away-from-zero, which no AVX rounding mode is: truncate, then add ±1
    // where the (exactly computed) fraction is at least one half.
    let truncated = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(q);
    let fraction = _mm256_sub_ps(q, truncated);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let at_least_half =
        _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(fraction, abs_mask), _mm256_set1_ps(0.5));
    let sign_one = _mm256_or_ps(_mm256_andnot_ps(abs_mask, q), _mm256_set1_ps(1.0));
    let rounded = _mm256_add_ps(truncated, _mm256_and_ps(at_least_half, sign_one));
    let clamped = _mm256_min_ps(
        _mm256_max_ps(rounded, _mm256_set1_ps(-127.0)),
        _mm256_set1_ps(127.0),
    );
    _mm256_cvtps_epi32(clamped)
}

/// Quantizes 32 values (chunks `4i..4i+4`) into 32 bytes.
#[target_feature(enable = "avx2")]
#[inline]
fn quantize_32(
    x: &[[f32; 8]],
    inv_smooth: Option<&[[f32; 8]]>,
    i: usize,
    scale: __m256,
) -> __m256i {
    let q = |c: usize| quantize_f32x8(load_smoothed(x, inv_smooth, 4 * i + c), scale);
    // packs interleave the 128-bit lanes: bytes come out as dwords [a0 b0 c0 d0 a1 b1 c1 d1]
    // (a0 = q(0)'s first four values, ...), and the permute restores a0 a1 b0 b1 c0 c1 d0 d1.
    let ab = _mm256_packs_epi32(q(0), q(1));
    let cd = _mm256_packs_epi32(q(2), q(3));
    let bytes = _mm256_packs_epi16(ab, cd);
    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// AVX2 `scalar::quantize_row`, with identical results.
#[target_feature(enable = "avx2")]
pub(super) fn quantize_row(x: &[f32], inv_smooth: Option<&[f32]>, dst: &mut [i8]) -> f32 {
    let k = x.len();
    let (body, padding) = dst.split_at_mut(k);
    padding.fill(0);
    let scale = match row_scale(max_abs_bits(x, inv_smooth)) {
        RowScale::Quantize(scale) => scale,
        RowScale::Zeros(scale) => {
            body.fill(0);
            return scale;
        }
    };
    let x_chunks = x.as_chunks::<8>().0;
    let s_chunks = inv_smooth.map(|s| s.as_chunks::<8>().0);
    let (out_chunks, _) = body.as_chunks_mut::<32>();
    let scale_v = _mm256_set1_ps(scale);
    for (i, out) in out_chunks.iter_mut().enumerate() {
        let bytes = quantize_32(x_chunks, s_chunks, i, scale_v);
        // SAFETY: `out` is 32 writable bytes; `storeu` has no alignment requirement.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), bytes) };
    }
    let done = k / 32 * 32;
    for (j, q) in body.iter_mut().enumerate().skip(done) {
        *q = quantize_value(smoothed(x, inv_smooth, j), scale);
    }
    scale
}

/// The AVX2 [`DotKernel`].
pub(super) struct Avx2;

impl DotKernel for Avx2 {
    // Blocked: 4 × 2 accumulators + 2 weight vectors + x, |x|, ones and temporaries fit the 16
    // ymm registers. Streaming is memory-bound: 4 streams beat 2 (some spills are free there).
    const GEMM_ROWS: usize = 4;
    const STREAM_COLS: usize = 4;
    const GEMM_COLS: usize = 2;

    unsafe fn dots(xs: &[&[i8]], ws: &[&[i8]], _row_sums: &[i32], sums: &mut TileSums) {
        // SAFETY: the caller guarantees AVX2.
        unsafe { dots_avx2(xs, ws, sums) }
    }

    unsafe fn dot_runs(
        x: &[i8],
        w: &[i8],
        _row_sums: &[i32],
        run: usize,
        sums: &mut [[i32; TILE]],
    ) {
        // SAFETY: the caller guarantees AVX2.
        unsafe { dot_runs_avx2(x, w, run, sums) }
    }
}

/// [`DotKernel::dot_runs`] for four runs: per 32 bytes one `|x|` and four sign-trick
/// multiply-adds, one horizontal sum per row, nothing else in the loop.
#[target_feature(enable = "avx2")]
fn dot_runs_avx2(x: &[i8], w: &[i8], run: usize, sums: &mut [[i32; TILE]]) {
    const RUNS: usize = 4;
    const { assert!(TILE == RUNS) };
    let kp = x.len();
    assert!(kp.is_multiple_of(K_ALIGN) && w.len() == RUNS * run * kp && sums.len() == run);
    let (x_chunks, w_chunks) = (x.as_chunks::<32>().0, w.as_chunks::<32>().0);
    let steps = x_chunks.len();
    let ones = _mm256_set1_epi16(1);
    for (i, out) in sums.iter_mut().enumerate() {
        // Row s·run + i for each run s, sliced once.
        let row = |s: usize| &w_chunks[(s * run + i) * steps..][..steps];
        let rows = [row(0), row(1), row(2), row(3)];
        let mut acc = [_mm256_setzero_si256(); RUNS];
        for (step, xc) in x_chunks.iter().enumerate() {
            let xv = load_i8x32(xc);
            let x_abs = _mm256_abs_epi8(xv);
            for (a, r) in acc.iter_mut().zip(&rows) {
                // |x|·(sign(x)·w) = x·w; pairs fit in i16 (module docs), then widen to i32.
                let pairs = _mm256_maddubs_epi16(x_abs, _mm256_sign_epi8(load_i8x32(&r[step]), xv));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
        }
        *out = [
            hsum_i32(acc[0]),
            hsum_i32(acc[1]),
            hsum_i32(acc[2]),
            hsum_i32(acc[3]),
        ];
    }
}

#[target_feature(enable = "avx2")]
fn dots_avx2(xs: &[&[i8]], ws: &[&[i8]], sums: &mut TileSums) {
    match (xs.len(), ws.len()) {
        (1, 1) => tile::<1, 1>(xs, ws, sums),
        (1, 2) => tile::<1, 2>(xs, ws, sums),
        (1, 3) => tile::<1, 3>(xs, ws, sums),
        (1, 4) => tile::<1, 4>(xs, ws, sums),
        (2, 1) => tile::<2, 1>(xs, ws, sums),
        (2, 2) => tile::<2, 2>(xs, ws, sums),
        (2, 3) => tile::<2, 3>(xs, ws, sums),
        (2, 4) => tile::<2, 4>(xs, ws, sums),
        (3, 1) => tile::<3, 1>(xs, ws, sums),
        (3, 2) => tile::<3, 2>(xs, ws, sums),
        (3, 3) => tile::<3, 3>(xs, ws, sums),
        (3, 4) => tile::<3, 4>(xs, ws, sums),
        (4, 1) => tile::<4, 1>(xs, ws, sums),
        (4, 2) => tile::<4, 2>(xs, ws, sums),
        (4, 3) => tile::<4, 3>(xs, ws, sums),
        (4, 4) => tile::<4, 4>(xs, ws, sums),
        (r, c) => unreachable!("no AVX2 tile for {r} tokens × {c} weight rows"),
    }
}

/// One `R × C` register tile over the whole (padded) k.
#[target_feature(enable = "avx2")]
fn tile<const R: usize, const C: usize>(xs: &[&[i8]], ws: &[&[i8]], sums: &mut TileSums) {
    const { assert!(R <= TILE && C <= TILE) };
    let steps = ws[0].len() / 32;
    let x_chunks: [&[[i8; 32]]; R] = std::array::from_fn(|r| xs[r].as_chunks::<32>().0);
    let w_chunks: [&[[i8; 32]]; C] = std::array::from_fn(|c| ws[c].as_chunks::<32>().0);
    // Equal lengths, a multiple of 64: no tail is skipped, and the indexing below never fails.
    assert!(ws[0].len().is_multiple_of(K_ALIGN));
    assert!(x_chunks.iter().chain(&w_chunks).all(|c| c.len() == steps));

    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); C]; R];
    for i in 0..steps {
        let mut wv = [_mm256_setzero_si256(); C];
        for (v, chunks) in wv.iter_mut().zip(&w_chunks) {
            *v = load_i8x32(&chunks[i]);
        }
        for (acc_r, chunks) in acc.iter_mut().zip(&x_chunks) {
            let xv = load_i8x32(&chunks[i]);
            let x_abs = _mm256_abs_epi8(xv);
            for (a, &w) in acc_r.iter_mut().zip(&wv) {
                // |x|·(sign(x)·w) = x·w; pairs fit in i16 (module docs), then widen to i32.
                let pairs = _mm256_maddubs_epi16(x_abs, _mm256_sign_epi8(w, xv));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    for (sums_r, acc_r) in sums.iter_mut().zip(&acc) {
        for (s, &a) in sums_r.iter_mut().zip(acc_r) {
            *s = hsum_i32(a);
        }
    }
}
