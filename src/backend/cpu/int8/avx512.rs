//! AVX-512 VNNI tier: `vpdpbusd` dot products.
//!
//! `vpdpbusd` multiplies u8 × s8 in groups of four and adds them into i32 lanes. We shift the
//! activations to u8 (`x + 128`, which is `x ^ 0x80`), so a tile computes
//! `Σ (x + 128)·w = Σ x·w + 128·Σ w` and subtracts `128 · row_sums[j]` at the end (the column-sum
//! correction of the W8A8 epilogue). Padding stays exact: padded x becomes 128 but padded w is 0.
//! `vpdpbusd` (unlike `vpdpbusds`) wraps, so even where the shifted sum leaves the i32 range, the
//! wrapping subtraction lands on `Σ x·w`, which fits (`k ≤ MAX_K`).
//!
//! Activations are quantized by the AVX2 code, which every CPU of this tier also runs.

use std::arch::x86_64::*;

use super::{DotKernel, TileSums, K_ALIGN, TILE};

/// Loads 64 bytes.
#[target_feature(enable = "avx512f")]
#[inline]
fn load_i8x64(chunk: &[i8; 64]) -> __m512i {
    // SAFETY: `chunk` is 64 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) }
}

/// The AVX-512 VNNI [`DotKernel`].
pub(super) struct Avx512Vnni;

impl DotKernel for Avx512Vnni {
    // 16 accumulators + 4 weight vectors + the shifted x and the 0x80 constant: 22 of 32 zmm.
    const GEMM_ROWS: usize = 4;
    const STREAM_COLS: usize = 4;
    const GEMM_COLS: usize = 4;

    unsafe fn dots(xs: &[&[i8]], ws: &[&[i8]], row_sums: &[i32], sums: &mut TileSums) {
        // SAFETY: the caller guarantees AVX-512 F + BW + VNNI.
        unsafe { dots_vnni(xs, ws, row_sums, sums) }
    }

    unsafe fn dot_runs(x: &[i8], w: &[i8], row_sums: &[i32], run: usize, sums: &mut [[i32; TILE]]) {
        // SAFETY: the caller guarantees AVX-512 F + BW + VNNI.
        unsafe { dot_runs_vnni(x, w, row_sums, run, sums) }
    }
}

/// [`DotKernel::dot_runs`] for four runs: per step one shifted x and four `vpdpbusd`, one
/// reduction per four rows, nothing else in the loop.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dot_runs_vnni(x: &[i8], w: &[i8], row_sums: &[i32], run: usize, sums: &mut [[i32; TILE]]) {
    const RUNS: usize = 4;
    const { assert!(TILE == RUNS) };
    let kp = x.len();
    assert!(kp.is_multiple_of(K_ALIGN) && w.len() == RUNS * run * kp);
    assert!(row_sums.len() == RUNS * run && sums.len() == run);
    let (x_chunks, w_chunks) = (x.as_chunks::<64>().0, w.as_chunks::<64>().0);
    let steps = x_chunks.len();
    let to_u8 = _mm512_set1_epi8(i8::MIN);
    for (i, out) in sums.iter_mut().enumerate() {
        // Row s·run + i for each run s, sliced once (written out: a closure here is a call).
        let row = |s: usize| &w_chunks[(s * run + i) * steps..][..steps];
        let rows = [row(0), row(1), row(2), row(3)];
        let mut acc = [[_mm512_setzero_si512(); RUNS]; 1];
        for (step, xc) in x_chunks.iter().enumerate() {
            let x_u8 = _mm512_xor_si512(load_i8x64(xc), to_u8);
            for (a, r) in acc[0].iter_mut().zip(&rows) {
                *a = _mm512_dpbusd_epi32(*a, x_u8, load_i8x64(&r[step]));
            }
        }
        let correction: [i32; RUNS] =
            std::array::from_fn(|s| row_sums[s * run + i].wrapping_mul(128));
        let [c0, c1, c2, c3] = correction;
        let totals = _mm512_sub_epi32(reduce_tile(&acc), _mm512_setr4_epi32(c0, c1, c2, c3));
        // SAFETY: `out` is 4 writable i32 (`TILE` = 4); the low 128 bits hold lanes 0..4.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_castsi512_si128(totals)) };
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dots_vnni(xs: &[&[i8]], ws: &[&[i8]], row_sums: &[i32], sums: &mut TileSums) {
    match (xs.len(), ws.len()) {
        (1, 1) => tile::<1, 1>(xs, ws, row_sums, sums),
        (1, 2) => tile::<1, 2>(xs, ws, row_sums, sums),
        (1, 3) => tile::<1, 3>(xs, ws, row_sums, sums),
        (1, 4) => tile::<1, 4>(xs, ws, row_sums, sums),
        (2, 1) => tile::<2, 1>(xs, ws, row_sums, sums),
        (2, 2) => tile::<2, 2>(xs, ws, row_sums, sums),
        (2, 3) => tile::<2, 3>(xs, ws, row_sums, sums),
        (2, 4) => tile::<2, 4>(xs, ws, row_sums, sums),
        (3, 1) => tile::<3, 1>(xs, ws, row_sums, sums),
        (3, 2) => tile::<3, 2>(xs, ws, row_sums, sums),
        (3, 3) => tile::<3, 3>(xs, ws, row_sums, sums),
        (3, 4) => tile::<3, 4>(xs, ws, row_sums, sums),
        (4, 1) => tile::<4, 1>(xs, ws, row_sums, sums),
        (4, 2) => tile::<4, 2>(xs, ws, row_sums, sums),
        (4, 3) => tile::<4, 3>(xs, ws, row_sums, sums),
        (4, 4) => tile::<4, 4>(xs, ws, row_sums, sums),
        (r, c) => unreachable!("no VNNI tile for {r} tokens × {c} weight rows"),
    }
}

/// One `R × C` register tile over the whole (padded) k.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn tile<const R: usize, const C: usize>(
    xs: &[&[i8]],
    ws: &[&[i8]],
    row_sums: &[i32],
    sums: &mut TileSums,
) {
    const { assert!(R <= TILE && C <= TILE) };
    let steps = ws[0].len() / 64;
    let x_chunks: [&[[i8; 64]]; R] = std::array::from_fn(|r| xs[r].as_chunks::<64>().0);
    let w_chunks: [&[[i8; 64]]; C] = std::array::from_fn(|c| ws[c].as_chunks::<64>().0);
    // Equal lengths, a multiple of 64: no tail is skipped, and the indexing below never fails.
    assert!(ws[0].len().is_multiple_of(K_ALIGN) && row_sums.len() == C);
    assert!(x_chunks.iter().chain(&w_chunks).all(|c| c.len() == steps));

    let to_u8 = _mm512_set1_epi8(i8::MIN);
    let mut acc = [[_mm512_setzero_si512(); C]; R];
    for i in 0..steps {
        let mut wv = [_mm512_setzero_si512(); C];
        for (v, chunks) in wv.iter_mut().zip(&w_chunks) {
            *v = load_i8x64(&chunks[i]);
        }
        for (acc_r, chunks) in acc.iter_mut().zip(&x_chunks) {
            let x_u8 = _mm512_xor_si512(load_i8x64(&chunks[i]), to_u8);
            for (a, &w) in acc_r.iter_mut().zip(&wv) {
                *a = _mm512_dpbusd_epi32(*a, x_u8, w);
            }
        }
    }
    // Sixteen horizontal sums at once: `reduce_tile` leaves sum (r, c) in lane 4r + c.
    let row_sums_x128: [i32; 4] =
        std::array::from_fn(|c| row_sums.get(c).map_or(0, |s| s.wrapping_mul(128)));
    let [c0, c1, c2, c3] = row_sums_x128;
    let correction = _mm512_setr4_epi32(c0, c1, c2, c3);
    let totals = _mm512_sub_epi32(reduce_tile(&acc), correction);
    let mut lanes = [0i32; 16];
    // SAFETY: `lanes` is 16 writable i32; `storeu` has no alignment requirement.
    unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), totals) };
    for (r, sums_r) in sums.iter_mut().enumerate().take(R) {
        sums_r[..C].copy_from_slice(&lanes[4 * r..4 * r + C]);
    }
}

/// Lane sums of up to 4 × 4 accumulators: lane `4r + c` of the result is the sum of the 16
/// lanes of `acc[r][c]` (absent accumulators count as zero). A transpose-and-add tree: about
/// three shuffles or adds per accumulator instead of the eight of a reduction each.
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce_tile<const R: usize, const C: usize>(acc: &[[__m512i; C]; R]) -> __m512i {
    let zero = _mm512_setzero_si512();
    let at = |r: usize, c: usize| if r < R && c < C { acc[r][c] } else { zero };
    // One token's four accumulators → per 128-bit lane L: [Σ_L a0, Σ_L a1, Σ_L a2, Σ_L a3].
    let quad = |r: usize| {
        if r >= R {
            return zero;
        }
        let pair = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
        };
        let (ab, cd) = (pair(at(r, 0), at(r, 1)), pair(at(r, 2), at(r, 3)));
        _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd))
    };
    // Then the four 128-bit lanes of each token's quad added, the quads landing in lane r.
    let halves = |a: __m512i, b: __m512i| {
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
        )
    };
    let (q01, q23) = (halves(quad(0), quad(1)), halves(quad(2), quad(3)));
    halves(q01, q23)
}
