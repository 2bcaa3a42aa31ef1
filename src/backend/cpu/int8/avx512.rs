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
    for (sums_r, acc_r) in sums.iter_mut().zip(&acc) {
        for ((s, &a), &row_sum) in sums_r.iter_mut().zip(acc_r).zip(row_sums) {
            *s = _mm512_reduce_add_epi32(a).wrapping_sub(row_sum.wrapping_mul(128));
        }
    }
}
